//! The built `metadata-service` binary as an operator runs it: start-up
//! failures, `migrate`, serving, signals and `--help`. Every child process is
//! bounded in time and killed when its handle is dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{GetUserMetadataRequest, MergeUserMetadataRequest};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::json;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::json::{field, structure};
use crate::common::wait::{until, within};
use crate::common::{self, Backend, TestDb};
use crate::programs::BIN;

/// Longest any run of the binary may take before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long a started server may take to answer SERVING.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM or SIGINT.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// Every migration of `src/store/migration.rs`, in order.
const MIGRATIONS: [&str; 6] = [
    "m20261126_000001_create_tables",
    "m20261130_000001_metadata_indexes",
    "m20261130_000002_create_metadata_schemas",
    "m20261207_000001_event_history",
    "m20261207_000002_transactions",
    "m20261208_000001_webhooks",
];
const USERS: &str = "metadata.v1.UserMetadataService";

/// Settings the binary reads from the environment; cleared so that the
/// caller's environment cannot change what a test sees.
const ENV_VARS: [&str; 44] = [
    "METADATA_API_KEYS",
    "METADATA_API_KEYS_FILE",
    "METADATA_FRONTEND_JWT_KEY",
    "METADATA_FRONTEND_JWT_ISSUER",
    "METADATA_FRONTEND_JWT_AUDIENCE",
    "METADATA_FRONTEND_JWT_LEEWAY",
    "METADATA_ALLOW_UNAUTHENTICATED",
    "METADATA_DISABLE_REFLECTION",
    "METADATA_TLS_CERT",
    "METADATA_TLS_KEY",
    "METADATA_TLS_CLIENT_CA",
    "METADATA_SHUTDOWN_GRACE",
    "METADATA_WATCH_PROGRESS_INTERVAL",
    "METADATA_WATCH_POLL_INTERVAL",
    "METADATA_WATCH_BUFFER",
    "METADATA_EVENT_RETENTION",
    "METADATA_EVENT_PRUNE_INTERVAL",
    "METADATA_REQUEST_ID_TTL",
    "DATABASE_URL",
    "METADATA_LISTEN",
    "METADATA_DB_MAX_CONNECTIONS",
    "METADATA_DB_CONNECT_TIMEOUT",
    "METADATA_MAX_FIELD_BYTES",
    "METADATA_MAX_DEPTH",
    "METADATA_MAX_REQUEST_BYTES",
    "METADATA_MAX_WATCH_STREAMS",
    "METADATA_MAX_STREAMS_PER_CONNECTION",
    "METADATA_NATS_URL",
    "METADATA_NATS_STREAM",
    "METADATA_NATS_SUBJECT_PREFIX",
    "METADATA_NATS_CREDS",
    "METADATA_NATS_USER",
    "METADATA_NATS_PASSWORD",
    "METADATA_NATS_TLS_CA",
    "METADATA_NATS_MAX_AGE",
    "METADATA_NATS_DUPLICATE_WINDOW",
    "METADATA_NATS_REPLICAS",
    "METADATA_NATS_TIMEOUT",
    "METADATA_RELAY_FORMAT",
    "METADATA_RELAY_LISTEN",
    "METADATA_WEBHOOK_ALLOW_NETWORKS",
    "METADATA_WEBHOOK_TIMEOUT",
    "METADATA_WEBHOOK_FAILURE_WINDOW",
    "METADATA_WEBHOOK_RETRY_SCHEDULE",
];

/// The binary with a clean environment, run in `dir` so that a default
/// `sqlite://metadata.db` could never land in the source tree.
pub(crate) fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for var in ENV_VARS {
        cmd.env_remove(var);
    }
    // Port 0: tests run in parallel, and a fixed metrics port would collide.
    cmd.env("RUST_LOG", "info")
        .env("METADATA_METRICS_LISTEN", "127.0.0.1:0")
        .env_remove("METADATA_LOG_FORMAT")
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

pub(crate) struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exited with {} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs the binary with `args` to completion, killing it after [`RUN_LIMIT`].
pub(crate) async fn run_bin(dir: &Path, args: &[&str]) -> Finished {
    let started = Instant::now();
    let child = command(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metadata-service");
    let output = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("metadata-service {args:?} ran longer than {RUN_LIMIT:?}"))
        .expect("wait for metadata-service");
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn assert_no_panic(what: &str, output: &str) {
    let lower = output.to_lowercase();
    assert!(
        !lower.contains("panicked") && !lower.contains("backtrace"),
        "{what} shows a panic:\n{output}"
    );
}

/// A start-up failure: exit status 1 and one `error: ` line on stderr,
/// which is returned.
pub(crate) fn assert_one_line_error(run: &Finished) -> &str {
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be one line: {run:?}");
    assert!(lines[0].starts_with("error: "), "{run:?}");
    assert_no_panic("stderr", &run.stderr);
    assert_no_panic("stdout", &run.stdout);
    lines[0]
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("m.db").display())
}

#[tokio::test]
async fn bad_database_url_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--database-url", "nonsense://x"][..],
        &["serve", "--database-url", "nonsense://x"],
        &["migrate", "--database-url", "nonsense://x"],
    ] {
        let run = run_bin(dir.path(), args).await;
        let line = assert_one_line_error(&run);
        assert!(
            line.starts_with("error: cannot connect to the database at nonsense://x: "),
            "{args:?}: {run:?}"
        );
        assert!(line.contains("postgres:// or sqlite:"), "{args:?}: {run:?}");
    }
    // A SQLite file in a missing directory is a start-up error too.
    let missing = dir.path().join("no/such/dir");
    let run = run_bin(dir.path(), &["--database-url", &sqlite_url(&missing)]).await;
    let line = assert_one_line_error(&run);
    assert!(line.contains("unable to open database file"), "{run:?}");
    // Nothing was created in the working directory (no default database).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn unreachable_postgres_fails_within_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["serve", "migrate"] {
        let run = run_bin(
            dir.path(),
            &[
                command,
                "--database-url",
                "postgres://postgres@127.0.0.1:1/x",
                "--db-connect-timeout",
                "2s",
            ],
        )
        .await;
        let line = assert_one_line_error(&run);
        // Once, where, why, and what to check (issue 28): not the pool's
        // "timed out while waiting for an open connection".
        assert!(
            line.starts_with(
                "error: cannot connect to the database at postgres://postgres@127.0.0.1:1/x: "
            ),
            "{run:?}"
        );
        assert!(line.contains("Connection refused"), "{run:?}");
        assert!(line.contains("--database-url"), "{run:?}");
        assert_eq!(line.matches("cannot connect").count(), 1, "{run:?}");
        // 2 s to give up, plus slack for a loaded machine; far below the
        // default 5 s timeout plus slack, so the flag is honoured.
        assert!(
            run.elapsed < Duration::from_secs(2) + Duration::from_secs(4),
            "{command}: {run:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_postgres_database_is_named() {
    let Some(db) = crate::common::TestDb::create(crate::common::Backend::Postgres).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = db.url().rsplit_once('/').unwrap();
    let url = format!("{base}/no_such_database_here");
    let run = run_bin(dir.path(), &["migrate", "--database-url", &url]).await;
    let line = assert_one_line_error(&run);
    assert!(
        line.contains(r#"database "no_such_database_here" does not exist"#),
        "{run:?}"
    );
    assert!(!line.contains("at line"), "{run:?}");
}

#[tokio::test]
async fn a_metrics_port_in_use_is_named_before_the_database_is_touched() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let run = run_bin(
        dir.path(),
        &[
            "--database-url",
            &sqlite_url(dir.path()),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &port,
        ],
    )
    .await;
    let line = assert_one_line_error(&run);
    assert!(
        line.contains(&format!("cannot listen on {port}")),
        "{run:?}"
    );
    assert!(line.contains("--metrics-listen off"), "{run:?}");
    // Refused before the database was opened, let alone migrated.
    assert!(!db.exists(), "{run:?}");
}

/// Asserts that `url` holds exactly the applied migrations and a `metadata`
/// table with every column, and no rows.
async fn assert_schema(url: &str) {
    let db = Database::connect(url)
        .await
        .expect("connect to migrated db");
    let backend = db.get_database_backend();
    let versions: Vec<String> = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .expect("seaql_migrations exists")
        .iter()
        .map(|row| row.try_get_by_index(0).unwrap())
        .collect();
    assert_eq!(versions, MIGRATIONS);
    let rows = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT kind, id, public_metadata, private_metadata, unsafe_metadata, \
             version, revision, created_at, updated_at FROM metadata",
        ))
        .await
        .expect("metadata table has every column");
    assert!(rows.is_empty());
    let events = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT revision, kind, id, change_type, changed_fields, before, after, committed_at, \
             actor, trace_id FROM events",
        ))
        .await
        .expect("events table has every column");
    assert!(events.is_empty());
    let counter = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT latest, compacted FROM revisions WHERE id = 1",
        ))
        .await
        .expect("revisions table")
        .expect("the counter row exists");
    let (latest, compacted): (i64, i64) = (
        counter.try_get("", "latest").unwrap(),
        counter.try_get("", "compacted").unwrap(),
    );
    assert_eq!((latest, compacted), (0, 0));
    db.close().await.unwrap();
}

/// `migrate` creates the schema, is idempotent, and a server starts on the
/// result.
async fn migrate_then_serve(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    for attempt in ["first", "second"] {
        let run = run_bin(dir.path(), &["migrate", "--database-url", url]).await;
        assert!(run.status.success(), "{attempt} migrate: {run:?}");
        assert!(
            !run.stderr.lines().any(|l| l.starts_with("error")),
            "{run:?}"
        );
        assert_no_panic("migrate", &format!("{}{}", run.stdout, run.stderr));
        assert_schema(url).await;
    }
    let server = Server::start(url, dir.path()).await;
    server.stop("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    migrate_then_serve(&url).await;
    assert!(dir.path().join("m.db").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_postgres() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    migrate_then_serve(db.url()).await;
}

/// A free port on 127.0.0.1, released for the binary to take. Another
/// process may grab it in between; [`Server::start`] retries then.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary serving on a known port, its output going to files.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    async fn start(database_url: &str, dir: &Path) -> Server {
        Self::start_with(database_url, dir, &[]).await
    }

    pub(crate) async fn start_with(database_url: &str, dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(database_url, dir, extra, &[]).await
    }

    async fn start_with_env(
        database_url: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        for attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let stdout = dir.join(format!("stdout.{attempt}.log"));
            let stderr = dir.join(format!("stderr.{attempt}.log"));
            let child = command(dir)
                .args(["--database-url", database_url])
                .args(["--listen", &addr.to_string()])
                .args(extra)
                .envs(env.iter().copied())
                .stdout(std::fs::File::create(&stdout).unwrap())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .expect("spawn metadata-service");
            let mut server = Server {
                child,
                addr,
                stdout,
                stderr,
            };
            match server.wait_until_serving().await {
                Ok(()) => return server,
                Err(status) if server.stderr().contains("cannot listen on") => {
                    eprintln!("port {} was taken ({status}), retrying", addr.port());
                }
                Err(status) => panic!("server exited with {status}: {}", server.output()),
            }
        }
        panic!("no free port after 3 attempts");
    }

    /// Polls the health service until the server and the user service are
    /// SERVING; Err with the exit status if the process ends first.
    async fn wait_until_serving(&mut self) -> Result<(), ExitStatus> {
        // Ok(None) once serving, Ok(Some) once exited.
        let ready = within(READY_LIMIT, async || {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Ok(Some(status));
            }
            match self.health().await {
                Ok(statuses) if statuses == [ServingStatus::Serving; 2] => Ok(None),
                Ok(statuses) => Err(format!("{statuses:?}")),
                Err(err) => Err(err),
            }
        })
        .await;
        match ready {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(status),
            Err(last) => panic!(
                "not SERVING within {READY_LIMIT:?} (last: {last}): {}",
                self.output()
            ),
        }
    }

    /// Health of the server as a whole and of the user service.
    async fn health(&self) -> Result<[ServingStatus; 2], String> {
        let channel = self.channel().await.map_err(|e| e.to_string())?;
        let mut health = HealthClient::new(channel);
        let mut out = [ServingStatus::Unknown; 2];
        for (slot, service) in out.iter_mut().zip(["", USERS]) {
            let response = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map_err(|s| s.to_string())?;
            *slot = response.into_inner().status();
        }
        Ok(out)
    }

    /// SIGKILL: no chance to finish anything.
    pub(crate) async fn kill(mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(STOP_LIMIT, self.child.wait())
            .await
            .expect("a killed process ends")
            .unwrap();
        assert_eq!(status.code(), None, "killed by a signal");
    }

    pub(crate) async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn output(&self) -> String {
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        format!("\n--- stdout\n{stdout}\n--- stderr\n{}", self.stderr())
    }

    /// Sends `kill -<signal>` and asserts a clean exit (status 0) within
    /// [`STOP_LIMIT`].
    async fn stop(mut self, signal: &str) {
        let pid = self.child.id().expect("server still running").to_string();
        let kill = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .await
            .expect("run kill");
        assert!(kill.success(), "kill -s {signal} {pid}: {kill}");
        let started = Instant::now();
        let status = tokio::time::timeout(STOP_LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "still running {STOP_LIMIT:?} after SIG{signal}: {}",
                    self.output()
                )
            })
            .unwrap();
        // A process killed by the signal has no exit code.
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{signal} after {:?}: {status}{}",
            started.elapsed(),
            self.output()
        );
        let stderr = self.stderr();
        assert!(
            !stderr.lines().any(|l| l.starts_with("error")),
            "{}",
            self.output()
        );
        assert_no_panic("server output", &self.output());
    }
}

/// Serve, write through the generated client, stop with `signal` while the
/// client is still connected; then restart on the same file and read the
/// write back.
async fn graceful_stop_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());

    let server = Server::start(&url, dir.path()).await;
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let written = users
        .merge(MergeUserMetadataRequest {
            user_id: "user_bin".into(),
            public_metadata: Some(structure(&json!({"a": {"b": [1, "two"]}}))),
            ..Default::default()
        })
        .await
        .expect("merge")
        .into_inner();
    assert_eq!(written.version, 1);
    assert_eq!(
        field(&written.public_metadata),
        json!({"a": {"b": [1, "two"]}})
    );
    server.stop(signal).await;
    // The connection is gone with the server.
    let err = users
        .get(GetUserMetadataRequest {
            user_id: "user_bin".into(),
            revision: None,
        })
        .await
        .expect_err("server is stopped");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let server = Server::start(&url, dir.path()).await;
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let read = users
        .get(GetUserMetadataRequest {
            user_id: "user_bin".into(),
            revision: None,
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(read.version, 1);
    assert_eq!(
        field(&read.public_metadata),
        json!({"a": {"b": [1, "two"]}})
    );
    assert_eq!(read.created_at, written.created_at);
    server.stop(signal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly() {
    graceful_stop_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_cleanly() {
    graceful_stop_on("INT").await;
}

/// Graceful shutdown waits for every open stream, so a Health/Watch stream
/// (a load balancer, a client-side health checker) must end on SIGTERM, or
/// it would keep the process alive for the whole shutdown grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_despite_open_health_watch() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &sqlite_url(dir.path()),
        dir.path(),
        &["--shutdown-grace", "2s"],
    )
    .await;
    let mut health = HealthClient::new(server.channel().await.unwrap());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.unwrap().expect("first update");
    assert_eq!(first.status(), ServingStatus::Serving);
    server.stop("TERM").await;
    drop(watch);
}

#[tokio::test]
async fn help_names_flags_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_bin(dir.path(), &["--help"]).await;
    assert!(run.status.success(), "{run:?}");
    for needle in [
        "--database-url",
        "--listen",
        "--db-connect-timeout",
        "DATABASE_URL",
        "METADATA_LISTEN",
        "migrate",
    ] {
        assert!(
            run.stdout.contains(needle),
            "--help lacks {needle}: {run:?}"
        );
    }

    let run = run_bin(dir.path(), &["migrate", "--help"]).await;
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.contains("--database-url"), "{run:?}");
}

/// `--version` names the crate version and the commit the binary was built
/// from. build.rs's variable reaches this test crate too (same build script
/// run as the binary's), so the two cannot disagree by a rebuild between
/// them; whether build.rs found the right commit is checked against git.
#[tokio::test]
async fn version_names_the_git_revision() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_bin(dir.path(), &["--version"]).await;
    assert!(run.status.success(), "{run:?}");
    let revision = env!("METADATA_GIT_REVISION");
    assert_eq!(
        run.stdout.trim(),
        format!(
            "metadata-service {} ({revision})",
            env!("CARGO_PKG_VERSION")
        ),
        "{run:?}"
    );

    let repo = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(repo)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let toplevel = std::process::Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .current_dir(repo)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| std::fs::canonicalize(String::from_utf8_lossy(&out.stdout).trim()).ok());
    if toplevel != std::fs::canonicalize(repo).ok() {
        // A source archive (build.rs's rule too): nothing to name, and
        // nothing to check it with.
        eprintln!("not a git checkout of its own: --version says {revision}");
        return;
    }
    // Built in this checkout with no override: a commit of this repository,
    // named by 12 hex digits (`unknown` would mean build.rs missed it).
    assert!(
        revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
        "revision {revision:?} is not 12 hex digits (METADATA_GIT_REVISION set at build time?)"
    );
    assert!(
        git(&["cat-file", "-e", &format!("{revision}^{{commit}}")]),
        "revision {revision} is not a commit of {repo}"
    );
}

/// Declares `$sqlite` and `$postgres` tests that run `$body(database_url)`
/// on a fresh SQLite file and a fresh Postgres database.
macro_rules! on_both_backends {
    ($sqlite:ident, $postgres:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = tempfile::tempdir().unwrap();
            $body(&sqlite_url(dir.path())).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(db) = TestDb::create(Backend::Postgres).await else {
                return;
            };
            $body(db.url()).await;
        }
    };
}

/// Waits until every writer has had writes acknowledged: the load is on,
/// and a stop now lands in the middle of it.
async fn until_every_writer_is_under_way(acked: &[std::sync::atomic::AtomicU64]) {
    until(
        "every writer has writes acknowledged",
        READY_LIMIT,
        async || {
            let counts: Vec<u64> = acked
                .iter()
                .map(|n| n.load(std::sync::atomic::Ordering::SeqCst))
                .collect();
            match counts.iter().all(|&n| n >= 20) {
                true => Ok(()),
                false => Err(counts),
            }
        },
    )
    .await
}

/// kill -9 during a write load: after a restart every acknowledged write is
/// there, each id's version equals its number of events, and the newest
/// event of each id is exactly its stored state (no partial write).
async fn crash_during_writes_loses_nothing(database_url: &str) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const WRITERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(database_url, dir.path()).await;
    let channel = server.channel().await.unwrap();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut users = UserMetadataServiceClient::new(channel.clone());
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let request = MergeUserMetadataRequest {
                    user_id: format!("crash{w}"),
                    public_metadata: Some(structure(&json!({ format!("k{n}"): n }))),
                    ..Default::default()
                };
                match users.merge(request).await {
                    Ok(response) => {
                        assert_eq!(response.into_inner().version, n + 1);
                        acked[w].store(n + 1, Ordering::SeqCst);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    until_every_writer_is_under_way(&acked).await;
    server.kill().await;
    for task in tasks {
        task.await.unwrap();
    }

    let server = Server::start(database_url, dir.path()).await;
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let db = Database::connect(database_url).await.unwrap();
    for w in 0..WRITERS {
        let id = format!("crash{w}");
        let acked = acked[w].load(Ordering::SeqCst);
        assert!(acked > 0, "{id}: the load wrote something before the kill");
        let stored = users
            .get(GetUserMetadataRequest {
                user_id: id.clone(),
                revision: None,
            })
            .await
            .unwrap()
            .into_inner();
        // At most the one write in flight at the kill may have landed too.
        assert!(
            stored.version == acked || stored.version == acked + 1,
            "{id}: acked {acked}, stored {}",
            stored.version
        );
        let public = field(&stored.public_metadata);
        let keys = public.as_object().unwrap();
        assert_eq!(keys.len() as u64, stored.version, "{id}: one key per write");
        for n in 0..acked {
            assert_eq!(public[format!("k{n}")], json!(n), "{id}: acked write {n}");
        }
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                db.get_database_backend(),
                "SELECT after FROM events WHERE id = $1 ORDER BY revision",
                [id.clone().into()],
            ))
            .await
            .unwrap();
        let afters: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| r.try_get("", "after").unwrap())
            .collect();
        let versions: Vec<u64> = afters
            .iter()
            .map(|a| a["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (1..=stored.version).collect::<Vec<_>>(),
            "{id}: events"
        );
        assert_eq!(
            afters.last().unwrap()["public_metadata"],
            public,
            "{id}: newest event is the state"
        );
    }
    db.close().await.ok();
    server.stop("TERM").await;
}

on_both_backends!(
    crash_during_writes_sqlite,
    crash_during_writes_postgres,
    crash_during_writes_loses_nothing
);

/// kill -9 while transactions move seats between organizations (each a
/// Commit of two Patches that test the counts they read): after a restart
/// no seat is lost or made, each transaction in the log has both its
/// events on consecutive revisions, and each organization's version equals
/// its number of events: none half-applied.
async fn crash_during_transactions_leaves_none_half_applied(database_url: &str) {
    use metadata_service::proto::v1::metadata_transaction_service_client::MetadataTransactionServiceClient;
    use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
    use metadata_service::proto::v1::transaction_operation::Operation;
    use metadata_service::proto::v1::{
        BatchGetOrganizationMetadataRequest, CommitRequest, MergeOrganizationMetadataRequest,
        PatchOrganizationMetadataRequest, TransactionOperation,
    };
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const WRITERS: usize = 6;
    const ORGS: usize = 4;
    const SEATS: i64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(database_url, dir.path()).await;
    let channel = server.channel().await.unwrap();
    let ids: Vec<String> = (0..ORGS).map(|i| format!("seats{i}")).collect();
    let mut orgs = OrganizationMetadataServiceClient::new(channel.clone());
    for id in &ids {
        orgs.merge(MergeOrganizationMetadataRequest {
            organization_id: id.clone(),
            public_metadata: Some(structure(&json!({"seats": SEATS / ORGS as i64}))),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let seats = |mut orgs: OrganizationMetadataServiceClient<Channel>, ids: Vec<String>| async move {
        let batch = orgs
            .batch_get(BatchGetOrganizationMetadataRequest {
                organization_ids: ids,
                revision: None,
            })
            .await?
            .into_inner();
        Ok::<_, tonic::Status>(
            batch
                .organizations
                .iter()
                .map(|o| field(&o.public_metadata)["seats"].as_i64().unwrap())
                .collect::<Vec<i64>>(),
        )
    };
    let patch = |id: &str, from: i64, to: i64| TransactionOperation {
        operation: Some(Operation::PatchOrganization(
            PatchOrganizationMetadataRequest {
                organization_id: id.into(),
                public_metadata: Some(common::json::list(&json!([
                    {"op": "test", "path": "/seats", "value": from},
                    {"op": "replace", "path": "/seats", "value": to}
                ]))),
                ..Default::default()
            },
        )),
    };
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut txn = MetadataTransactionServiceClient::new(channel.clone());
        let orgs = OrganizationMetadataServiceClient::new(channel.clone());
        let (acked, ids) = (acked.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0usize.. {
                let (from, to) = ((w + n) % ORGS, (w + n + 1) % ORGS);
                let Ok(now) = seats(orgs.clone(), ids.clone()).await else {
                    return;
                };
                if now[from] == 0 {
                    continue;
                }
                let request = CommitRequest {
                    operations: vec![
                        patch(&ids[from], now[from], now[from] - 1),
                        patch(&ids[to], now[to], now[to] + 1),
                    ],
                    request_id: String::new(),
                };
                match txn.commit(request).await {
                    Ok(_) => {
                        acked[w].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) if status.code() == tonic::Code::Aborted => {}
                    Err(_) => return,
                }
            }
        }));
    }
    until_every_writer_is_under_way(&acked).await;
    server.kill().await;
    for task in tasks {
        task.await.unwrap();
    }

    let server = Server::start(database_url, dir.path()).await;
    let orgs = OrganizationMetadataServiceClient::new(server.channel().await.unwrap());
    let now = seats(orgs.clone(), ids.clone()).await.unwrap();
    assert_eq!(
        now.iter().sum::<i64>(),
        SEATS,
        "seats after the crash: {now:?}"
    );
    let db = Database::connect(database_url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT revision, id, transaction_id, after FROM events \
             WHERE change_type <> 'void' ORDER BY revision",
        ))
        .await
        .unwrap();
    let mut transactions: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let mut events_of: std::collections::HashMap<String, u64> = Default::default();
    for row in &rows {
        let revision: i64 = row.try_get("", "revision").unwrap();
        let id: String = row.try_get("", "id").unwrap();
        let transaction: String = row.try_get("", "transaction_id").unwrap();
        *events_of.entry(id).or_default() += 1;
        if !transaction.is_empty() {
            transactions.entry(transaction).or_default().push(revision);
        }
    }
    db.close().await.ok();
    let committed: u64 = acked.iter().map(|n| n.load(Ordering::SeqCst)).sum();
    assert!(
        transactions.len() as u64 >= committed,
        "every acknowledged one is there"
    );
    for (transaction, revisions) in &transactions {
        assert_eq!(revisions.len(), 2, "{transaction}: {revisions:?}");
        assert_eq!(
            revisions[1],
            revisions[0] + 1,
            "{transaction}: {revisions:?}"
        );
    }
    let mut orgs = orgs;
    for id in &ids {
        let stored = orgs
            .get(
                metadata_service::proto::v1::GetOrganizationMetadataRequest {
                    organization_id: id.clone(),
                    revision: None,
                },
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stored.version, events_of[id], "{id}: one event per version");
    }
    server.stop("TERM").await;
}

on_both_backends!(
    crash_during_transactions_sqlite,
    crash_during_transactions_postgres,
    crash_during_transactions_leaves_none_half_applied
);

/// SIGTERM during a write load: health turns NOT_SERVING, Watch streams end
/// with UNAVAILABLE, every call either completes (and is then stored) or
/// fails with UNAVAILABLE (and wrote nothing), and the process exits 0.
async fn sigterm_during_writes_loses_nothing(database_url: &str) {
    use metadata_service::proto::v1::WatchUserMetadataRequest;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const WRITERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(database_url, dir.path()).await;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        // A connection each, so that the drain meets several connections.
        let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let request = MergeUserMetadataRequest {
                    user_id: format!("term{w}"),
                    public_metadata: Some(structure(&json!({ format!("k{n}"): n }))),
                    ..Default::default()
                };
                match users.merge(request).await {
                    Ok(response) => {
                        assert_eq!(response.into_inner().version, n + 1);
                        acked[w].store(n + 1, Ordering::SeqCst);
                    }
                    Err(status) => return status,
                }
            }
            unreachable!()
        }));
    }
    let mut health = HealthClient::new(server.channel().await.unwrap());
    let mut health = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = health.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let mut watch = users
        .watch(WatchUserMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();

    until_every_writer_is_under_way(&acked).await;
    server.stop("TERM").await;

    for (w, task) in tasks.into_iter().enumerate() {
        let status = task.await.unwrap();
        // A request the client had queued when the server's GOAWAY closed
        // the connection was never sent, or sent on a stream the GOAWAY
        // refused; tonic reports it as CANCELLED or INTERNAL ("h2 protocol
        // error: GoAway(NO_ERROR)") with the client's transport error as
        // its source, never as a status from the server (grpc-go would
        // retry it transparently). The stored versions below prove it wrote
        // nothing.
        let unsent = matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::Internal
        ) && std::error::Error::source(&status)
            .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
        assert!(
            status.code() == tonic::Code::Unavailable || unsent,
            "writer {w} after SIGTERM: {status:?}"
        );
    }
    let status = health.message().await.map(|m| m.map(|m| m.status()));
    assert!(
        matches!(status, Ok(Some(ServingStatus::NotServing))),
        "health after SIGTERM: {status:?}"
    );
    let mut watch_end = None;
    while let Some(item) = watch.message().await.transpose() {
        if let Err(status) = item {
            watch_end = Some(status.code());
            break;
        }
    }
    assert_eq!(
        watch_end,
        Some(tonic::Code::Unavailable),
        "Watch ends with UNAVAILABLE"
    );

    let server = Server::start(database_url, dir.path()).await;
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    for w in 0..WRITERS {
        let id = format!("term{w}");
        let acked = acked[w].load(Ordering::SeqCst);
        assert!(acked > 0, "{id}: the load wrote something before SIGTERM");
        let stored = users
            .get(GetUserMetadataRequest {
                user_id: id.clone(),
                revision: None,
            })
            .await
            .unwrap()
            .into_inner();
        // Graceful: no write is stored without its answer reaching the client.
        assert_eq!(stored.version, acked, "{id}");
    }
    server.stop("TERM").await;
}

on_both_backends!(
    sigterm_during_writes_sqlite,
    sigterm_during_writes_postgres,
    sigterm_during_writes_loses_nothing
);

/// Removes terminal colour codes, so that assertions see the plain text.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// Every write is logged with who, which RPC, which id and the resulting
/// version, even at debug level no log line holds a metadata key or value,
/// an API key or a token, whether the call succeeds or fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_the_caller_but_never_values_keys_or_tokens() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use metadata_service::auth::hash_key;
    use metadata_service::proto::v1::{DeleteUserMetadataRequest, ReplaceUserMetadataRequest};

    // Everything secret carries this marker; no log line may.
    const MARK: &str = "SECRET";
    let api_key = "api-key-SECRET-4f1e0c";
    let jwt_secret = "jwt-signing-secret-SECRET-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("jwt.key");
    std::fs::write(&key_file, jwt_secret).unwrap();
    let api_keys = format!("ci-logs:{}", hash_key(api_key));
    let key_arg = format!("@{}", key_file.display());
    let server = Server::start_with_env(
        &sqlite_url(dir.path()),
        dir.path(),
        &["--api-keys", &api_keys, "--frontend-jwt-key", &key_arg],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let claims = json!({"sub": "user_log", "exp": chrono::Utc::now().timestamp() + 600});
    let session = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(jwt_secret.as_bytes()),
    )
    .unwrap();
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let secret_patch = || structure(&json!({"key_SECRET": {"nested_SECRET": "value_SECRET"}}));

    let merge = MergeUserMetadataRequest {
        user_id: "user_log".into(),
        public_metadata: Some(secret_patch()),
        private_metadata: Some(secret_patch()),
        ..Default::default()
    };
    let merged = users.merge(bearer(merge, api_key)).await.unwrap();
    assert_eq!(merged.into_inner().version, 1);
    let replace = ReplaceUserMetadataRequest {
        user_id: "user_log".into(),
        private_metadata: Some(common::json::value(&json!({"other_SECRET": 1}))),
        ..Default::default()
    };
    users.replace(bearer(replace, api_key)).await.unwrap();
    let own = MergeUserMetadataRequest {
        user_id: "user_log".into(),
        unsafe_metadata: Some(secret_patch()),
        ..Default::default()
    };
    let merged = users.merge(bearer(own, &session)).await.unwrap();
    assert_eq!(merged.into_inner().version, 3);

    // Refused and invalid calls.
    let denied = MergeUserMetadataRequest {
        user_id: "user_log".into(),
        public_metadata: Some(secret_patch()),
        ..Default::default()
    };
    let err = users.merge(bearer(denied, &session)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    for token in ["wrong-key-SECRET", "eyJhbGciOiJIUzI1NiJ9.e30.SECRET"] {
        let get = GetUserMetadataRequest {
            user_id: "user_log".into(),
            revision: None,
        };
        let err = users.get(bearer(get, token)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let invalid = MergeUserMetadataRequest {
        user_id: "user_log".into(),
        private_metadata: Some(structure(&json!({"bad_SECRET": "nul\u{0}SECRET"}))),
        ..Default::default()
    };
    let err = users.merge(bearer(invalid, api_key)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("bad_SECRET"), "the caller is told");

    let delete = DeleteUserMetadataRequest {
        user_id: "user_log".into(),
        expected_version: None,
    };
    assert!(
        users
            .delete(bearer(delete, api_key))
            .await
            .unwrap()
            .into_inner()
            .existed
    );

    let output = plain(&server.output());
    server.stop("TERM").await;
    let leaks: Vec<&str> = output
        .lines()
        .filter(|l| l.contains(MARK) || l.contains(&session) || l.contains(jwt_secret))
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
    let logged = |needles: &[&str]| {
        output
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    };
    for needles in [
        &[
            "metadata written",
            "caller=backend:ci-logs",
            "rpc=Merge",
            "id=user_log",
            "version=1",
        ][..],
        &[
            "metadata written",
            "caller=backend:ci-logs",
            "rpc=Replace",
            "id=user_log",
            "version=2",
        ],
        &[
            "metadata written",
            "caller=frontend:user_log",
            "rpc=Merge",
            "id=user_log",
            "version=3",
        ],
        &[
            "metadata deleted",
            "caller=backend:ci-logs",
            "rpc=Delete",
            "id=user_log",
        ],
        &[
            "permission denied",
            "caller=frontend:user_log",
            "rpc=Merge",
            "id=user_log",
        ],
        &["not authenticated", "unknown API key"],
        &["not authenticated", "invalid token"],
    ] {
        assert!(logged(needles), "no line with {needles:?}:\n{output}");
    }
}

/// `--log-format json`: every line is one JSON object, and a write's line
/// carries the request span's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(
        &sqlite_url(dir.path()),
        dir.path(),
        &["--log-format", "json"],
        &[("RUST_LOG", "info,metadata_service=debug")],
    )
    .await;
    let mut users = UserMetadataServiceClient::new(server.channel().await.unwrap());
    let merge = MergeUserMetadataRequest {
        user_id: "user_json".into(),
        public_metadata: Some(structure(&json!({"a": 1}))),
        ..Default::default()
    };
    users.merge(merge).await.unwrap();
    let stdout = std::fs::read_to_string(&server.stdout).unwrap();
    server.stop("TERM").await;
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let written = lines
        .iter()
        .find(|l| l["message"] == "metadata written")
        .unwrap_or_else(|| panic!("no write logged: {stdout}"));
    assert_eq!(written["span"]["method"], "Merge", "{written}");
    assert_eq!(written["span"]["id"], "user_json", "{written}");
    assert_eq!(written["version"], 1, "{written}");
    let finished = lines
        .iter()
        .find(|l| l["message"] == "request finished" && l["span"]["method"] == "Merge")
        .unwrap_or_else(|| panic!("no request end logged: {stdout}"));
    assert_eq!(finished["code"], "OK", "{finished}");
    assert!(finished["micros"].as_u64().is_some(), "{finished}");
    assert_eq!(
        finished["span"]["service"],
        "metadata.v1.UserMetadataService"
    );
    let config = lines
        .iter()
        .find(|l| l["message"] == "configuration")
        .unwrap_or_else(|| panic!("no configuration logged: {stdout}"));
    assert!(
        config["database"]
            .as_str()
            .unwrap()
            .starts_with("sqlite://")
    );
}

/// Ids and token subjects are whatever the caller sent: a newline, a
/// carriage return or an ANSI sequence in them must not write a line of
/// the caller's making, in either log format, whether the call is refused
/// before validation (permission denied), fails validation, or names its
/// caller. Each value is logged escaped, and text and JSON show it alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_values_cannot_forge_log_lines() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use metadata_service::auth::hash_key;
    use metadata_service::logging::Escaped;
    use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
    use metadata_service::proto::v1::{
        DeleteUserMetadataRequest, GetOrganizationMetadataRequest, WatchUserMetadataRequest,
    };

    const FORGED: &str =
        "2026-01-01T00:00:00Z  INFO metadata written caller=backend:billing rpc=Delete id=victim";
    let ids = [
        format!("x\n{FORGED}"),
        format!("x\r{FORGED}"),
        format!("x\r\n{FORGED}"),
        "x\u{1b}[31mred\u{1b}[0m\u{1b}[2K".to_string(),
        format!("{{\"message\":\"x\"}}\n{{\"level\":\"INFO\",\"message\":\"{FORGED}\"}}"),
    ];
    let api_key = "forge-test-api-key";
    let jwt_secret = "forge-test-jwt-secret-0123456789abcdef";
    let session = |sub: &str| {
        let claims = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 600});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(jwt_secret.as_bytes()),
        )
        .unwrap()
    };
    let evil_sub = format!("evil\n{FORGED}\u{1b}[31m\r");

    for format in ["text", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let api_keys = format!("billing:{}", hash_key(api_key));
        let server = Server::start_with(
            &sqlite_url(dir.path()),
            dir.path(),
            &[
                "--api-keys",
                &api_keys,
                "--frontend-jwt-key",
                jwt_secret,
                "--log-format",
                format,
                "--log-filter",
                "info",
            ],
        )
        .await;
        let channel = server.channel().await.unwrap();
        let mut users = UserMetadataServiceClient::new(channel.clone());
        let mut orgs = OrganizationMetadataServiceClient::new(channel);
        let own = session("user_1");
        let evil = session(&evil_sub);
        for id in &ids {
            let get = || GetUserMetadataRequest {
                user_id: id.clone(),
                revision: None,
            };
            let merge = || MergeUserMetadataRequest {
                user_id: id.clone(),
                unsafe_metadata: Some(structure(&json!({"a": 1}))),
                ..Default::default()
            };
            let delete = || DeleteUserMetadataRequest {
                user_id: id.clone(),
                expected_version: None,
            };
            let watch = || WatchUserMetadataRequest {
                user_ids: vec![id.clone()],
                ..Default::default()
            };
            let org = || GetOrganizationMetadataRequest {
                organization_id: id.clone(),
                revision: None,
            };
            // A frontend token is refused before the id is validated.
            for (code, status) in [
                (
                    tonic::Code::PermissionDenied,
                    users.get(bearer(get(), &own)).await.err(),
                ),
                (
                    tonic::Code::PermissionDenied,
                    users.merge(bearer(merge(), &own)).await.err(),
                ),
                (
                    tonic::Code::PermissionDenied,
                    users.delete(bearer(delete(), &own)).await.err(),
                ),
                (
                    tonic::Code::PermissionDenied,
                    users.watch(bearer(watch(), &own)).await.err(),
                ),
                (
                    tonic::Code::PermissionDenied,
                    orgs.get(bearer(org(), &own)).await.err(),
                ),
                // A backend's call fails validation, its span holding the id.
                (
                    tonic::Code::InvalidArgument,
                    users.get(bearer(get(), api_key)).await.err(),
                ),
                (
                    tonic::Code::InvalidArgument,
                    users.merge(bearer(merge(), api_key)).await.err(),
                ),
                (
                    tonic::Code::InvalidArgument,
                    users.delete(bearer(delete(), api_key)).await.err(),
                ),
                (
                    tonic::Code::InvalidArgument,
                    users.watch(bearer(watch(), api_key)).await.err(),
                ),
            ] {
                assert_eq!(status.map(|s| s.code()), Some(code), "{format} {id:?}");
            }
        }
        // A token whose sub forges a line: its own id passes authorization
        // and fails validation; another id is refused, naming the caller.
        let status = users
            .get(bearer(
                GetUserMetadataRequest {
                    user_id: evil_sub.clone(),
                    revision: None,
                },
                &evil,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = users
            .get(bearer(
                GetUserMetadataRequest {
                    user_id: "user_1".into(),
                    revision: None,
                },
                &evil,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);

        let (stdout, stderr) = (server.stdout.clone(), server.stderr.clone());
        server.stop("TERM").await;
        let mut output = std::fs::read(&stdout).unwrap();
        output.extend(std::fs::read(&stderr).unwrap());
        let output = String::from_utf8(output).expect("logs are UTF-8");
        for byte in ['\u{1b}', '\r'] {
            assert!(
                !output.contains(byte),
                "{format}: raw {byte:?} in the log:\n{output}"
            );
        }
        for line in output.lines() {
            assert!(
                !line.contains("\"message\":\"x\"") && !line.starts_with(FORGED),
                "{format}: forged line {line:?}"
            );
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("{e}: {line}"));
            }
        }
        // Each value is there, escaped, and JSON shows the same characters
        // as text.
        let shown = |value: &str| match format {
            "json" => serde_json::to_string(&Escaped(value).to_string()).unwrap(),
            _ => Escaped(value).to_string(),
        };
        let refused = output
            .lines()
            .filter(|l| l.contains("call refused: permission denied"))
            .collect::<Vec<_>>();
        for id in &ids {
            let id = shown(id);
            assert!(
                refused.iter().any(|l| l.contains(id.trim_matches('"'))),
                "{format}: no refusal logged with {id}:\n{output}"
            );
        }
        let evil_caller = shown(&format!("frontend:{evil_sub}"));
        assert!(
            output.contains(evil_caller.trim_matches('"')),
            "{format}: caller {evil_caller} not logged:\n{output}"
        );
    }
}

#[tokio::test]
async fn bad_log_filter_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_bin(dir.path(), &["--log-filter", "metadata_service=loud"]).await;
    let line = assert_one_line_error(&run);
    assert!(line.contains("invalid log filter"), "{run:?}");
}
