//! A Postgres cluster that only the chaos test uses: its own `initdb` data
//! directory in a temp dir and its own port, so that the test can restart
//! Postgres for real (issue 27, item 4) without disturbing the shared
//! database other tests (and other people) use on this machine.
//!
//! Postgres refuses to run as root, and tests run as root in CI: then
//! every Postgres program runs as the `postgres` user through `runuser`.
//! The cluster is stopped (`-m immediate`: nothing of it needs keeping) and
//! its directory removed when the guard is dropped, also while a failing
//! test unwinds.

use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long any `initdb` or `pg_ctl` run may take.
const PG_CTL_LIMIT: Duration = Duration::from_secs(60);

pub struct PgCluster {
    bin: PathBuf,
    /// Removed after the cluster is stopped (fields drop after `drop`).
    root: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

/// The directory of `initdb` and `pg_ctl`: the newest
/// /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH), else
/// wherever PATH has `initdb`.
fn find_bin() -> Option<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, bin)) = versioned.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

/// Whether this process runs as root (/proc/self belongs to the effective
/// user).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PgCluster {
    /// A running cluster, or None when Postgres is not installed and
    /// METADATA_REQUIRE_POSTGRES is not set (as `TestDb::create` treats a
    /// missing TEST_DATABASE_URL): CI sets it, so there a missing Postgres
    /// fails the test instead of skipping it.
    pub async fn start() -> Option<PgCluster> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("METADATA_REQUIRE_POSTGRES").is_none(),
                "METADATA_REQUIRE_POSTGRES is set but initdb was found neither in \
                 /usr/lib/postgresql/*/bin nor on PATH"
            );
            eprintln!(
                "skipped: initdb not found, the chaos test needs a Postgres cluster of its own"
            );
            return None;
        };
        let root = tempfile::Builder::new()
            .prefix("chaos-pg")
            .tempdir()
            .expect("temp dir for the cluster");
        // The postgres user must reach the data and socket directories.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_postgres = is_root();
        for sub in ["data", "run"] {
            std::fs::create_dir(root.path().join(sub)).unwrap();
        }
        if as_postgres {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(root.path())
                .status()
                .await
                .expect("run chown");
            assert!(chown.success(), "chown the cluster's directory to postgres");
        }
        let mut cluster = PgCluster {
            bin,
            root,
            port: 0,
            as_postgres,
        };
        let data = cluster.data();
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
            )
            .await;
        // A free port may be taken between the probe and the start: retry.
        for attempt in 0..3 {
            cluster.port = free_port();
            let log = cluster.log();
            let started = cluster
                .try_run(
                    "pg_ctl",
                    &[
                        "start",
                        "-w",
                        "-t",
                        "30",
                        "-D",
                        data.to_str().unwrap(),
                        "-l",
                        log.to_str().unwrap(),
                        "-o",
                        &cluster.options(),
                    ],
                )
                .await;
            match started {
                Ok(_) => return Some(cluster),
                Err(out) if attempt < 2 && cluster.log_text().contains("could not bind") => {
                    eprintln!("port {} was taken, retrying: {out}", cluster.port);
                }
                Err(out) => panic!(
                    "pg_ctl start failed: {out}\n--- log\n{}",
                    cluster.log_text()
                ),
            }
        }
        unreachable!()
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.path().join("run").join("postgres.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Server options: loopback TCP on our port, the socket in our own
    /// directory (not /var/run/postgresql, which another cluster owns).
    /// fsync off: the test restarts Postgres cleanly, never pulls the
    /// power, and a temp cluster needs no durability on a machine crash;
    /// it keeps two cores' worth of writers from waiting on the disk.
    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.root.path().join("run").display()
        )
    }

    /// The URL of a database of this cluster, reached at `port` (this
    /// cluster's own, or a proxy's in front of it).
    pub fn url(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    /// `pg_ctl restart -m fast`: the server closes every session, stops
    /// with a checkpoint and starts again on the same data and port.
    pub async fn restart(&self) {
        let data = self.data();
        let log = self.log();
        if let Err(out) = self
            .try_run(
                "pg_ctl",
                &[
                    "restart",
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &self.options(),
                ],
            )
            .await
        {
            panic!("pg_ctl restart failed: {out}\n--- log\n{}", self.log_text());
        }
    }

    fn command(&self, program: &str, args: &[&str]) -> std::process::Command {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        };
        // A directory the postgres user may enter (initdb complains about
        // one it cannot).
        command.args(args).current_dir(self.root.path());
        command
    }

    async fn run(&self, program: &str, args: &[&str]) {
        if let Err(out) = self.try_run(program, args).await {
            panic!("{program} failed: {out}");
        }
    }

    async fn try_run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut command = Command::from(self.command(program, args));
        // pg_ctl start leaves the server running after it exits; with -l
        // the server writes to its log, so these pipes close with pg_ctl.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(PG_CTL_LIMIT, command.output())
            .await
            .unwrap_or_else(|_| panic!("{program} {args:?} ran longer than {PG_CTL_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let text = format!(
            "{program} {args:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Synchronous: Drop may run while a panic unwinds, outside any
        // runtime. The server is not this process's child (pg_ctl
        // daemonizes it), so nothing else would stop it.
        let data = self.data();
        let _ = self
            .command(
                "pg_ctl",
                &["stop", "-m", "immediate", "-w", "-t", "20", "-D"],
            )
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
