//! A browser calls the service (issue 31): the page of tests/browser/ runs
//! in headless Chromium on an origin the server allows (`--cors-allowed-origins`)
//! and calls the real binary over gRPC-Web (connect-web, fetch, HTTP/1.1)
//! with a frontend session token: it reads and merges what a frontend may,
//! is refused the rest with PERMISSION_DENIED as the page sees it, watches
//! its own user while a backend writes over native gRPC and never sees
//! private_metadata; a page of an origin the server does not allow cannot
//! call it at all.
//!
//! Needs node (20 or later), npm and Chromium (`/usr/bin/chromium`, or the
//! `CHROMIUM` variable); `npm ci` runs in tests/browser when its
//! node_modules is missing or older than its package-lock.json. Without
//! them the test prints why and passes, unless METADATA_REQUIRE_BROWSER is
//! set (CI): then it fails.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use metadata_service::auth::hash_key;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{GetUserMetadataRequest, MergeUserMetadataRequest};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use crate::binary::command;
use crate::common::json::{field, structure};
use crate::common::wait::within;

const API_KEY: &str = "browser-test-backend-key";
const JWT_SECRET: &str = "browser-test-frontend-secret-0123456789abcdef";
const USER: &str = "user_browser";
const OTHER_USER: &str = "user_someone_else";
/// In the private metadata the backend writes; nothing the page receives
/// may contain it.
const PRIVATE_MARK: &str = "private-only-for-backends";
/// `npm ci`, on a first run, may download for a while.
const INSTALL_LIMIT: Duration = Duration::from_secs(300);
/// Code generation and bundling.
const BUILD_LIMIT: Duration = Duration::from_secs(60);
/// How long the server may take to serve.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// The driver's whole run (it gives up itself after 50 s).
const DRIVER_LIMIT: Duration = Duration::from_secs(55);
const SKIPPED: &str = "skipped: the browser test needs node >= 20, npm and Chromium";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_an_allowed_origin_uses_grpc_web_with_a_frontend_token() {
    let Some(chromium) = browser_tools().await else {
        return;
    };
    let page_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !install(&page_dir).await {
        return;
    }
    let built = run(&page_dir, "npm", &["run", "--silent", "build"], BUILD_LIMIT).await;
    assert!(built.status.success(), "npm run build: {}", shown(&built));

    let dir = tempfile::tempdir().unwrap();
    // The driver serves the page on this port: the origin the server allows.
    let page_port = free_port();
    let allowed = format!("http://127.0.0.1:{page_port}");
    let server = Server::start(
        dir.path(),
        &[
            "--api-keys",
            &format!("browser-test:{}", hash_key(API_KEY)),
            "--frontend-jwt-key",
            JWT_SECRET,
            "--cors-allowed-origins",
            &allowed,
        ],
    )
    .await;
    let mut backend = UserMetadataServiceClient::new(server.channel().await);
    backend
        .merge(bearer(merge(
            USER,
            json!({"plan": "pro"}),
            json!({"note": PRIVATE_MARK}),
            json!({"theme": "dark"}),
        )))
        .await
        .expect("backend seeds the page's user");
    backend
        .merge(bearer(merge(
            OTHER_USER,
            json!({"plan": "free"}),
            json!({}),
            json!({}),
        )))
        .await
        .expect("backend seeds another user");

    let token = session(USER);
    let mut driver = Command::new("node")
        .arg("run.mjs")
        .args(["--server", &server.url(), "--token", &token])
        .args(["--user", USER, "--other-user", OTHER_USER])
        .args(["--page-port", &page_port.to_string()])
        .args(["--chromium".as_ref(), chromium.as_os_str()])
        .current_dir(&page_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn node run.mjs");
    let stderr = collect(driver.stderr.take().unwrap());
    let talked = tokio::time::timeout(DRIVER_LIMIT, talk(&mut driver, &mut backend)).await;
    let (results, origins) = match talked {
        Ok(Ok(done)) => done,
        Ok(Err(err)) => panic!(
            "driver: {err}\n--- its stderr\n{}{}",
            stderr_now(&mut driver, stderr).await,
            server.output()
        ),
        Err(_) => panic!(
            "driver still running after {DRIVER_LIMIT:?}\n--- its stderr\n{}{}",
            stderr_now(&mut driver, stderr).await,
            server.output()
        ),
    };
    let status = driver.wait().await.unwrap();
    let stderr = stderr.await.unwrap();
    assert!(status.success(), "driver exited {status}:\n{stderr}");
    assert!(
        origins.starts_with(&format!("{allowed} ")),
        "the page is served at {allowed}: {origins}"
    );
    let all = serde_json::to_string_pretty(&results).unwrap();
    let context = format!("origins {origins}; what the browser saw:\n{all}\n--- driver\n{stderr}");
    eprintln!("browser test: {context}");
    check(&results, &context);

    // What the page was refused left no trace; what it merged is there.
    let stored = backend
        .get(bearer(GetUserMetadataRequest {
            user_id: USER.into(),
            revision: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        field(&stored.private_metadata),
        json!({"note": PRIVATE_MARK, "watched": "yes"}),
        "{context}"
    );
    assert_eq!(
        field(&stored.unsafe_metadata),
        json!({"theme": "dark", "fromBrowser": {"step": "b"}}),
        "{context}"
    );
}

/// Every step's outcome, as the page reported it.
fn check(results: &Json, context: &str) {
    let step = |name: &str| &results[name];
    assert!(
        results.get("error").is_none(),
        "the driver failed: {context}"
    );

    // (a) its own record: public and unsafe metadata, private_metadata unset.
    let own = ok(step("getOwn"), "getOwn", context);
    assert_eq!(own["json"]["userId"], USER, "{context}");
    assert_eq!(
        own["json"]["publicMetadata"],
        json!({"plan": "pro"}),
        "{context}"
    );
    assert_eq!(
        own["json"]["unsafeMetadata"],
        json!({"theme": "dark"}),
        "{context}"
    );
    assert_eq!(
        own["has"],
        json!({"public": true, "private": false, "unsafe": true}),
        "{context}"
    );

    // (b) its own unsafe metadata.
    let merged = ok(step("mergeUnsafe"), "mergeUnsafe", context);
    assert_eq!(
        merged["json"]["unsafeMetadata"],
        json!({"theme": "dark", "fromBrowser": {"step": "b"}}),
        "{context}"
    );
    assert_eq!(merged["has"]["private"], false, "{context}");

    // (c), (d): refused, and the page is told why (grpc-status is exposed).
    for name in ["mergePrivate", "getOther"] {
        assert_eq!(
            (
                &step(name)["ok"],
                &step(name)["codeName"],
                &step(name)["code"]
            ),
            (&json!(false), &json!("PermissionDenied"), &json!(7)),
            "{name}: {context}"
        );
    }

    // (e) the Watch of its own user over gRPC-Web: the backend's write,
    // without private_metadata on either side.
    ok(step("watchStart"), "watchStart", context);
    let watched = ok(step("watchEvents"), "watchEvents", context);
    assert_eq!(watched["ended"], Json::Null, "still streaming: {context}");
    let events = watched["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "one write, one event: {context}");
    let event = &events[0];
    assert_eq!(event["json"]["userId"], USER, "{context}");
    assert_eq!(
        event["json"]["changeType"], "CHANGE_TYPE_MERGED",
        "{context}"
    );
    assert_eq!(
        event["after"]["json"]["publicMetadata"],
        json!({"plan": "pro", "watched": "yes"}),
        "{context}"
    );
    // The backend changed both fields; the page is told of the one it sees.
    assert_eq!(
        event["json"]["changedFields"],
        json!(["public_metadata"]),
        "{context}"
    );
    for side in ["before", "after"] {
        assert_eq!(event[side]["has"]["private"], false, "{side}: {context}");
        assert_eq!(event[side]["has"]["public"], true, "{side}: {context}");
    }
    let seen_by_page = [
        step("getOwn"),
        step("mergeUnsafe"),
        step("watchEvents"),
        step("otherOriginGet"),
    ];
    for seen in seen_by_page {
        assert!(
            !seen.to_string().contains(PRIVATE_MARK),
            "private metadata reached the page: {context}"
        );
    }
    // Nothing failed in the allowed page: no CORS complaint, no request lost.
    let page = step("allowedPage");
    for what in ["console", "pageErrors", "failedRequests"] {
        assert_eq!(page[what], json!([]), "{what}: {context}");
    }

    // (f) a page of another origin: the browser does not let it call (the
    // server sends it no CORS headers), so the page sees a failed fetch,
    // not a gRPC status, and Chromium says why.
    let blocked = step("otherOriginGet");
    assert_eq!(blocked["ok"], false, "{context}");
    assert!(
        ["Unknown", "Unavailable"].contains(&blocked["codeName"].as_str().unwrap_or("")),
        "a network error, not a gRPC status: {context}"
    );
    let console = step("otherOriginPage")["console"].to_string();
    assert!(
        console.contains("blocked by CORS policy"),
        "Chromium names CORS as the reason: {context}"
    );
}

/// The value of a step that must have succeeded.
fn ok<'a>(outcome: &'a Json, name: &str, context: &str) -> &'a Json {
    assert_eq!(outcome["ok"], true, "{name} failed: {context}");
    &outcome["value"]
}

/// Speaks the driver's protocol (run.mjs): writes for the backend once the
/// page watches, and returns the page's results and the origins it used.
async fn talk(
    driver: &mut Child,
    backend: &mut UserMetadataServiceClient<Channel>,
) -> Result<(Json, String), String> {
    let mut stdin = driver.stdin.take().unwrap();
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let mut origins = String::new();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        if let Some(rest) = line.strip_prefix("ORIGINS ") {
            origins = rest.to_owned();
        } else if line == "WATCHING" {
            // Public and private metadata, over native gRPC with the key.
            let write = merge(
                USER,
                json!({"watched": "yes"}),
                json!({"watched": "yes"}),
                json!({}),
            );
            backend
                .merge(bearer(write))
                .await
                .map_err(|s| format!("backend write during the watch: {s}"))?;
            stdin
                .write_all(b"written\n")
                .await
                .map_err(|e| e.to_string())?;
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            let results = serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?;
            return Ok((results, origins));
        } else {
            return Err(format!("unexpected line from the driver: {line}"));
        }
    }
    Err("the driver ended without a RESULT line".into())
}

/// Chromium's path once node (>= 20), npm and Chromium are all there;
/// else None after printing why (or a panic when they are required).
async fn browser_tools() -> Option<PathBuf> {
    let chromium: PathBuf = std::env::var_os("CHROMIUM")
        .unwrap_or_else(|| "/usr/bin/chromium".into())
        .into();
    let here = Path::new(".");
    let limit = Duration::from_secs(30);
    let reason = match (
        try_run(here, "node", &["--version"], limit).await,
        try_run(here, "npm", &["--version"], limit).await,
    ) {
        (Err(err), _) => format!("cannot run node: {err}"),
        (_, Err(err)) => format!("cannot run npm: {err}"),
        (Ok(node), Ok(npm)) if !node.status.success() || !npm.status.success() => {
            format!(
                "node --version: {}; npm --version: {}",
                shown(&node),
                shown(&npm)
            )
        }
        (Ok(node), Ok(_)) => {
            let version = String::from_utf8_lossy(&node.stdout).trim().to_owned();
            let major: u32 = version
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major < 20 {
                format!("node {version} is older than 20 (playwright-core needs 20)")
            } else if !chromium.is_file() {
                format!(
                    "no Chromium at {} (apt-get install chromium, or set CHROMIUM)",
                    chromium.display()
                )
            } else {
                return Some(chromium);
            }
        }
    };
    required(&reason);
    None
}

/// Panics if METADATA_REQUIRE_BROWSER is set, else prints why the test is
/// skipped.
fn required(reason: &str) {
    assert!(
        std::env::var_os("METADATA_REQUIRE_BROWSER").is_none(),
        "METADATA_REQUIRE_BROWSER is set but the browser test cannot run: {reason}"
    );
    eprintln!("{SKIPPED} ({reason})");
}

/// `npm ci` in tests/browser unless node_modules is as new as the lock
/// file; false (after printing why) when it fails and is not required.
async fn install(page_dir: &Path) -> bool {
    let modified = |path: PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let installed = modified(page_dir.join("node_modules/.package-lock.json"));
    let locked = modified(page_dir.join("package-lock.json"));
    if installed.is_some() && installed >= locked {
        return true;
    }
    let args = ["ci", "--no-audit", "--no-fund", "--loglevel=error"];
    let ci = run(page_dir, "npm", &args, INSTALL_LIMIT).await;
    if ci.status.success() {
        return true;
    }
    required(&format!(
        "npm ci in {} failed: {}",
        page_dir.display(),
        shown(&ci)
    ));
    false
}

async fn try_run(
    dir: &Path,
    program: &str,
    args: &[&str],
    limit: Duration,
) -> std::io::Result<Output> {
    let child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} ran longer than {limit:?}"))
}

async fn run(dir: &Path, program: &str, args: &[&str], limit: Duration) -> Output {
    try_run(dir, program, args, limit)
        .await
        .unwrap_or_else(|err| panic!("cannot run {program} {args:?}: {err}"))
}

fn shown(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Everything a pipe gives until it closes.
fn collect(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes).await;
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The driver's stderr so far, for a failure message: the driver is
/// killed, so that its pipe closes.
async fn stderr_now(driver: &mut Child, stderr: tokio::task::JoinHandle<String>) -> String {
    let _ = driver.start_kill();
    let _ = driver.wait().await;
    stderr.await.unwrap_or_default()
}

/// A frontend session token of `sub`, valid for ten minutes.
fn session(sub: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let claims = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 600});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn merge(user: &str, public: Json, private: Json, unsafe_: Json) -> MergeUserMetadataRequest {
    let some = |patch: Json| (patch != json!({})).then(|| structure(&patch));
    MergeUserMetadataRequest {
        user_id: user.into(),
        public_metadata: some(public),
        private_metadata: some(private),
        unsafe_metadata: some(unsafe_),
        ..Default::default()
    }
}

/// A backend call: the API key as the bearer token.
fn bearer<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {API_KEY}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// A free port on 127.0.0.1, released for another process to take.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary serving a SQLite database in `dir`, its output in files
/// there; killed when dropped.
struct Server {
    _child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    async fn start(dir: &Path, extra: &[&str]) -> Server {
        let database = format!("sqlite://{}?mode=rwc", dir.join("m.db").display());
        for attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let log = dir.join(format!("server.{attempt}.log"));
            let file = std::fs::File::create(&log).unwrap();
            let mut child = command(dir)
                .args(["--database-url", &database])
                .args(["--listen", &addr.to_string()])
                .args(extra)
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .expect("spawn metadata-service");
            let ready = within(READY_LIMIT, async || {
                if let Some(status) = child.try_wait().unwrap() {
                    return Ok(Some(status));
                }
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                let get = GetUserMetadataRequest {
                    user_id: "nobody".into(),
                    revision: None,
                };
                // Any gRPC answer (NOT_FOUND) means it serves.
                match UserMetadataServiceClient::new(channel)
                    .get(bearer(get))
                    .await
                {
                    Err(s) if s.code() == tonic::Code::Unavailable => Err(s.to_string()),
                    _ => Ok(None),
                }
            })
            .await;
            let server = Server {
                _child: child,
                addr,
                log,
            };
            match ready {
                Ok(None) => return server,
                Ok(Some(_)) if server.output().contains("cannot listen on") => {
                    eprintln!("port {} was taken, retrying", addr.port());
                }
                Ok(Some(status)) => panic!("server exited with {status}: {}", server.output()),
                Err(last) => panic!(
                    "not serving within {READY_LIMIT:?} (last: {last}): {}",
                    server.output()
                ),
            }
        }
        panic!("no free port after 3 attempts");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect to the server")
    }

    fn output(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("\n--- server output\n{log}")
    }
}
