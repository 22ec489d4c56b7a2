//! Docs that cannot rot: every `grpcurl` and `metadata-service` command in
//! README.md's `sh` blocks runs here, in order, against the real binary, as
//! a reader would paste them into a shell.
//!
//! How the README is played:
//! - Each command runs in bash in one scratch directory (the reader's
//!   working directory), where the harness has put the files the README
//!   assumes the reader has: `private.json`, `clerk-public.pem` (and a
//!   matching `$SESSION_JWT`), `ca.pem`, `server.pem`, `server-key.pem`,
//!   `clients-ca.pem`, `client.pem`, `client-key.pem`. Shell variables a
//!   command assigns (`KEY=...`) carry over to later commands.
//! - `cargo run --release` is the default server: the built binary with no
//!   flags, started once and shared by every block, as in a second terminal.
//!   A `metadata-service --flag ...` line starts that server for the rest of
//!   its block instead; it must stop cleanly on SIGTERM when the block ends.
//! - The only rewrites are addresses: each server listens on port 0 (the
//!   README's `:50051` becomes the port it got; `metadata.example.com`
//!   becomes `localhost`, which the test certificate names), and the CLI
//!   gets the current server in `METADATA_ADDR`.
//! - A command must exit 0. A Watch must print something and still be
//!   streaming 300 ms later; it is then stopped.
//! - Every other command must be listed in [`role`] with where it is
//!   checked instead (helm: `.ci/check-helm`), so a new kind of command in
//!   README fails this test until it is handled.

mod common;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_metadata-service");
/// Longest one README command may run.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long a server may take to log that it serves, and to stop.
const SERVER_LIMIT: Duration = Duration::from_secs(20);
/// How long a Watch may take to print its first message.
const FIRST_MESSAGE_LIMIT: Duration = Duration::from_secs(15);
const STDIN: &str = "{\"from\":\"standard input\"}\n";
const VARS_FILE: &str = ".readme-vars";
/// The address given to commands that call nothing (set-up, server lines).
const NOWHERE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

/// One command of an `sh` block, with `\` continuations joined.
#[derive(Debug, Clone)]
struct Snippet {
    line: usize,
    text: String,
}

#[derive(Debug)]
struct Block {
    snippets: Vec<Snippet>,
}

/// The `sh` blocks of a Markdown text; blank and comment-only lines are
/// dropped (trailing comments stay: bash ignores them).
fn sh_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut block: Option<Block> = None;
    let mut pending: Option<Snippet> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim();
        let Some(current) = block.as_mut() else {
            if trimmed == "```sh" {
                block = Some(Block {
                    snippets: Vec::new(),
                });
            }
            continue;
        };
        if trimmed.starts_with("```") {
            assert!(pending.is_none(), "line {index}: block ends after `\\`");
            blocks.extend(block.take());
            continue;
        }
        match pending.as_mut() {
            Some(snippet) => {
                snippet.text.push('\n');
                snippet.text.push_str(line);
            }
            None if trimmed.is_empty() || trimmed.starts_with('#') => continue,
            None => {
                pending = Some(Snippet {
                    line: index + 1,
                    text: line.to_string(),
                })
            }
        }
        if !line.ends_with('\\') {
            current.snippets.extend(pending.take());
        }
    }
    blocks
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// grpcurl or the CLI, against the current server.
    Client { streaming: bool },
    /// `metadata-service --flags`: this block's server.
    Server,
    /// `cargo run --release`: the default server.
    DefaultServer,
    /// Shell set-up (variables, files).
    Shell,
    /// Not run here; the reason says what checks it.
    Elsewhere(&'static str),
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty() && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
    })
}

fn role(text: &str) -> Option<Role> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    if let Some(first) = words.first()
        && is_assignment(first)
        && first.split_once('=').unwrap().1.starts_with("$(")
    {
        return Some(Role::Shell);
    }
    // `NAME=value command ...`: the command decides.
    while words.len() > 1 && is_assignment(words[0]) {
        words.remove(0);
    }
    let role = match words.as_slice() {
        ["grpcurl", ..] => Role::Client {
            streaming: text.contains("/Watch"),
        },
        ["metadata-service", "user" | "org", action, ..] => Role::Client {
            streaming: *action == "watch" && !text.contains("--max-events"),
        },
        ["metadata-service", flag, ..] if flag.starts_with('-') => Role::Server,
        ["cargo", "run", "--release"] => Role::DefaultServer,
        ["cargo", "test"] => Role::Elsewhere("the test command: this test is part of it"),
        ["cargo", "run", "--example", "consumer", ..] => {
            Role::Elsewhere("tests/consumer_example.rs runs the consumer against a live server")
        }
        ["helm", ..] => Role::Elsewhere(".ci/check-helm renders, validates and lints the chart"),
        ["kubectl", ..] => Role::Elsewhere("needs a Kubernetes cluster"),
        ["echo", ..] => Role::Shell,
        [word] if is_assignment(word) => Role::Shell,
        _ => return None,
    };
    Some(role)
}

/// What playing a README did.
#[derive(Debug, Default)]
struct Report {
    clients: usize,
    streaming: usize,
    cli: usize,
    servers: usize,
    elsewhere: Vec<(usize, &'static str)>,
}

/// A running `metadata-service` started for the README.
struct Served {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Served {
    /// Starts the binary with the README's `args` in `dir`, on port 0, and
    /// waits for the "serving gRPC" line that names the address it got.
    async fn start(dir: &Path, args: &[String], log_name: &str) -> Result<Served, String> {
        let mut args = args.to_vec();
        match args.iter().position(|a| a == "--listen") {
            Some(i) if i + 1 < args.len() => {
                let host = args[i + 1].rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                args[i + 1] = format!("{host}:0");
            }
            Some(_) => return Err("--listen without a value".into()),
            None => args.extend(["--listen".into(), "127.0.0.1:0".into()]),
        }
        let log = dir.join(log_name);
        let child = Command::new(BIN)
            .args(&args)
            .current_dir(dir)
            // Nothing from the caller's environment may configure it.
            .env_clear()
            .env("RUST_LOG", "info")
            .env("METADATA_LOG_FORMAT", "json")
            // A fixed metrics port would collide with other tests.
            .env("METADATA_METRICS_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {BIN}: {e}"))?;
        let mut served = Served {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            log,
        };
        let deadline = Instant::now() + SERVER_LIMIT;
        loop {
            if let Some(addr) = served.serving_addr() {
                served.addr = addr;
                return Ok(served);
            }
            if let Some(status) = served.child.try_wait().unwrap() {
                return Err(format!(
                    "server {args:?} exited with {status}{}",
                    served.output()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "server {args:?} not serving after {SERVER_LIMIT:?}{}",
                    served.output()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn serving_addr(&self) -> Option<SocketAddr> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "serving gRPC")?;
        let mut addr: SocketAddr = line["addr"].as_str()?.parse().ok()?;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Some(addr)
    }

    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "\n--- server stdout\n{}\n--- server stderr\n{}",
            read(&self.log),
            read(&self.log.with_extension("err"))
        )
    }

    /// SIGTERM; the server must exit 0 in time.
    async fn stop(mut self) -> Result<(), String> {
        let pid = self.child.id().ok_or("server already gone")?;
        signal_group_or_pid("TERM", &pid.to_string()).await;
        match tokio::time::timeout(SERVER_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(status) => Err(format!("server stopped with {status:?}{}", self.output())),
            Err(_) => Err(format!("server ignored SIGTERM{}", self.output())),
        }
    }
}

async fn signal_group_or_pid(signal: &str, target: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, "--", target])
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -s {signal} -- {target}: {status}");
}

struct Outcome {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "exited with {status}")?,
            None => write!(f, "was still running")?,
        }
        write!(
            f,
            "\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        )
    }
}

/// The reader's shell: a scratch directory with the files README assumes,
/// and `metadata-service` on PATH.
struct Reader {
    dir: tempfile::TempDir,
    path: OsString,
    /// Shell variables the README assigns, kept between commands.
    vars: Vec<String>,
    session_jwt: String,
    default_server: Option<Served>,
    block_server: Option<Served>,
    servers_started: usize,
}

impl Reader {
    fn new(grpcurl: &OsString, vars: Vec<String>) -> Reader {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(".bin");
        std::fs::create_dir(&bin).unwrap();
        // Client subcommands run the real binary; a server line only
        // records its arguments, and the harness starts that server.
        write_executable(
            &bin.join("metadata-service"),
            "#!/bin/sh\n\
             case \"$1\" in user|org) exec \"$README_BIN\" \"$@\" ;; esac\n\
             for arg in \"$@\"; do printf '%s\\0' \"$arg\"; done > \"$README_SERVER_ARGS\"\n",
        );
        if Path::new(grpcurl).components().count() > 1 {
            write_executable(
                &bin.join("grpcurl"),
                &format!("#!/bin/sh\nexec '{}' \"$@\"\n", grpcurl.to_string_lossy()),
            );
        }
        let mut path = OsString::from(&bin);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());

        let files = dir.path();
        std::fs::write(files.join("private.json"), r#"{"stripe_id":"cus_1"}"#).unwrap();
        std::fs::write(
            files.join("clerk-public.pem"),
            include_str!("fixtures/jwt-rsa-public.pem"),
        )
        .unwrap();
        let ca = common::tls::Ca::new("README CA");
        let server = ca.server_leaf();
        std::fs::write(files.join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(files.join("server.pem"), &server.cert).unwrap();
        std::fs::write(files.join("server-key.pem"), &server.key).unwrap();
        let clients_ca = common::tls::Ca::new("README clients CA");
        let client = clients_ca.client_leaf("billing");
        std::fs::write(files.join("clients-ca.pem"), &clients_ca.pem).unwrap();
        std::fs::write(files.join("client.pem"), &client.cert).unwrap();
        std::fs::write(files.join("client-key.pem"), &client.key).unwrap();

        Reader {
            dir,
            path,
            vars,
            session_jwt: session_jwt(),
            default_server: None,
            block_server: None,
            servers_started: 0,
        }
    }

    async fn default_server(&mut self) -> Result<SocketAddr, String> {
        if self.default_server.is_none() {
            self.servers_started += 1;
            self.default_server = Some(Served::start(self.dir.path(), &[], "default.log").await?);
        }
        Ok(self.default_server.as_ref().unwrap().addr)
    }

    /// The server the next client command talks to.
    async fn current(&mut self) -> Result<SocketAddr, String> {
        match &self.block_server {
            Some(served) => Ok(served.addr),
            None => self.default_server().await,
        }
    }

    async fn end_block(&mut self) -> Result<(), String> {
        match self.block_server.take() {
            Some(served) => served.stop().await,
            None => Ok(()),
        }
    }

    /// `text` as a bash script in the scratch directory: the README's
    /// variables are loaded before and saved after.
    fn bash(&self, text: &str, addr: SocketAddr) -> Command {
        let port = addr.port().to_string();
        let text = text
            .replace("127.0.0.1:50051", &addr.to_string())
            .replace("metadata.example.com:50051", &format!("localhost:{port}"));
        // `declare -p` with no names would dump every variable.
        let save = match self.vars.is_empty() {
            true => String::new(),
            false => format!(
                "declare -p {} > {VARS_FILE} 2>/dev/null",
                self.vars.join(" ")
            ),
        };
        let script = format!(
            "[ -f {VARS_FILE} ] && . ./{VARS_FILE}\n\
             {text}\n\
             __readme_status=$?\n\
             {save}\n\
             exit $__readme_status\n"
        );
        let mut command = Command::new("bash");
        command.arg("-c").arg(script);
        // The caller's settings must not change what the commands do.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("METADATA_") || name == "DATABASE_URL" || name == "RUST_LOG" {
                command.env_remove(&*name);
            }
        }
        command
            .current_dir(self.dir.path())
            .env("PATH", &self.path)
            .env("README_BIN", BIN)
            .env("README_SERVER_ARGS", self.dir.path().join(".server-args"))
            .env("METADATA_ADDR", format!("http://{addr}"))
            .env("SESSION_JWT", &self.session_jwt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, text: &str, addr: SocketAddr) -> Outcome {
        let mut child = self.bash(text, addr).spawn().expect("run bash");
        feed_stdin(&mut child).await;
        let output = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("`{text}` ran longer than {RUN_LIMIT:?}"))
            .unwrap();
        Outcome {
            status: Some(output.status),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A streaming command: Ok once it has printed and is still running
    /// 300 ms later; it is then stopped with its process group.
    async fn run_streaming(&self, text: &str, addr: SocketAddr) -> Result<(), Outcome> {
        let mut command = self.bash(text, addr);
        command.process_group(0);
        let mut child = command.spawn().expect("run bash");
        feed_stdin(&mut child).await;
        let mut stdout = child.stdout.take().unwrap();
        let mut printed = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + FIRST_MESSAGE_LIMIT;
        while printed.is_empty() {
            match tokio::time::timeout_at(deadline, stdout.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => printed.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let still_running = child.try_wait().unwrap().is_none();
        if still_running {
            let group = format!("-{}", child.id().unwrap());
            signal_group_or_pid("TERM", &group).await;
        }
        let _ = stdout.read_to_end(&mut printed).await;
        let output = child.wait_with_output().await.unwrap();
        let outcome = Outcome {
            status: (!still_running).then_some(output.status),
            stdout: String::from_utf8_lossy(&printed).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if still_running && !outcome.stdout.trim().is_empty() {
            Ok(())
        } else {
            Err(outcome)
        }
    }

    /// A server line: bash expands it (quotes, variables), the wrapper
    /// records the arguments, and this block's server is replaced.
    async fn start_block_server(&mut self, text: &str) -> Result<(), String> {
        let args_file = self.dir.path().join(".server-args");
        let _ = std::fs::remove_file(&args_file);
        let outcome = self.run(text, NOWHERE).await;
        if outcome.status.is_none_or(|s| !s.success()) {
            return Err(format!("{outcome}"));
        }
        let recorded = std::fs::read(&args_file).map_err(|e| format!("no arguments: {e}"))?;
        let args: Vec<String> = recorded
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        self.end_block().await?;
        self.servers_started += 1;
        let db = format!(
            "sqlite://{}?mode=rwc",
            self.dir
                .path()
                .join(format!("block-{}.db", self.servers_started))
                .display()
        );
        let mut all = args;
        all.extend(["--database-url".into(), db]);
        let log = format!("server-{}.log", self.servers_started);
        self.block_server = Some(Served::start(self.dir.path(), &all, &log).await?);
        Ok(())
    }
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn feed_stdin(child: &mut Child) {
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    // A command that does not read its input closes the pipe early.
    let _ = stdin.write_all(STDIN.as_bytes()).await;
}

/// A session token for `user_1` from the issuer README configures, signed
/// with the key pair whose public half is `clerk-public.pem`.
fn session_jwt() -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-rsa-private.pem")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "user_1",
        "iss": "https://clerk.example.com",
        "exp": now + 3600,
    });
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
}

/// Plays every `sh` block of `markdown` in order; Err names the README line
/// of the first command that failed and shows its output.
async fn play(markdown: &str, grpcurl: &OsString) -> Result<Report, String> {
    let blocks = sh_blocks(markdown);
    let mut roles = Vec::new();
    let mut vars = Vec::new();
    for snippet in blocks.iter().flat_map(|b| &b.snippets) {
        let role = role(&snippet.text).ok_or_else(|| {
            format!(
                "README line {}: `{}` is neither run by tests/readme.rs nor listed as checked \
                 elsewhere; teach `role` about it",
                snippet.line, snippet.text
            )
        })?;
        if role == Role::Shell
            && let Some((name, _)) = snippet.text.split_once('=')
            && is_assignment(&snippet.text)
        {
            vars.push(name.to_string());
        }
        roles.push(role);
    }
    let mut reader = Reader::new(grpcurl, vars);
    let mut report = Report::default();
    let mut roles = roles.into_iter();
    for block in &blocks {
        for snippet in &block.snippets {
            let role = roles.next().unwrap();
            let at = |detail: String| {
                format!("README line {}: `{}` {detail}", snippet.line, snippet.text)
            };
            match role {
                Role::Elsewhere(reason) => report.elsewhere.push((snippet.line, reason)),
                Role::DefaultServer => {
                    reader.default_server().await.map_err(at)?;
                }
                Role::Server => {
                    reader.start_block_server(&snippet.text).await.map_err(at)?;
                    report.servers += 1;
                }
                Role::Shell => {
                    let outcome = reader.run(&snippet.text, NOWHERE).await;
                    if outcome.status.is_none_or(|s| !s.success()) {
                        return Err(at(outcome.to_string()));
                    }
                }
                Role::Client { streaming: false } => {
                    let addr = reader.current().await.map_err(at)?;
                    let outcome = reader.run(&snippet.text, addr).await;
                    if outcome.status.is_none_or(|s| !s.success()) {
                        return Err(at(outcome.to_string()));
                    }
                }
                Role::Client { streaming: true } => {
                    let addr = reader.current().await.map_err(at)?;
                    reader
                        .run_streaming(&snippet.text, addr)
                        .await
                        .map_err(|outcome| at(format!("did not stream: {outcome}")))?;
                    report.streaming += 1;
                }
            }
            if let Role::Client { .. } = role {
                report.clients += 1;
                if snippet.text.contains("metadata-service ") {
                    report.cli += 1;
                }
            }
        }
        reader
            .end_block()
            .await
            .map_err(|e| format!("at the end of a block: {e}"))?;
    }
    if let Some(served) = reader.default_server.take() {
        served.stop().await?;
    }
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_readme_works() {
    let Some(grpcurl) = common::grpcurl::locate() else {
        return;
    };
    let readme = include_str!("../README.md");
    let report = play(readme, &grpcurl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report:#?}");
    let expected_clients = sh_blocks(readme)
        .iter()
        .flat_map(|b| &b.snippets)
        .filter(|s| matches!(role(&s.text), Some(Role::Client { .. })))
        .count();
    assert_eq!(report.clients, expected_clients);
    // The README's walkthrough has all of these; a parser that found none
    // would pass vacuously.
    assert!(report.clients >= 20, "{report:?}");
    assert!(report.cli >= 5, "{report:?}");
    assert!(report.streaming >= 3, "{report:?}");
    assert!(report.servers >= 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_play_and_names_its_line() {
    let Some(grpcurl) = common::grpcurl::locate() else {
        return;
    };
    let readme = "Intro.\n\n```sh\ngrpcurl -plaintext 127.0.0.1:50051 list\n\n\
                  # An empty id is INVALID_ARGUMENT.\n\
                  grpcurl -plaintext -d '{\"user_id\":\"\"}' \\\n  \
                  127.0.0.1:50051 metadata.v1.UserMetadataService/Get\n```\n";
    let err = play(readme, &grpcurl).await.unwrap_err();
    assert!(err.starts_with("README line 7: "), "{err}");
    assert!(err.contains("InvalidArgument"), "{err}");

    // A CLI error and a Watch that ends at once fail too.
    let cli = "```sh\nmetadata-service user delete user_1 --expected-version 4\n```\n";
    let err = play(cli, &grpcurl).await.unwrap_err();
    assert!(err.contains("exit status: 74"), "ABORTED is 64 + 10: {err}");
    let watch = "```sh\ngrpcurl -plaintext -d '{\"user_ids\":[\"\"]}' \
                 127.0.0.1:50051 metadata.v1.UserMetadataService/Watch\n```\n";
    let err = play(watch, &grpcurl).await.unwrap_err();
    assert!(err.contains("did not stream"), "{err}");
}

#[tokio::test]
async fn an_unknown_command_fails_before_anything_runs() {
    let readme = "```sh\ncurl http://127.0.0.1:9090/metrics\n```\n";
    let err = play(readme, &OsString::from("grpcurl")).await.unwrap_err();
    assert!(err.contains("README line 2: `curl"), "{err}");
    assert!(err.contains("teach `role`"), "{err}");
}

#[test]
fn blocks_join_continuations_and_drop_comments() {
    let markdown = "text\n```sh\n# a comment\nA=1   # kept\n\ngrpcurl -d '{}' \\\n  host:1 \\\n  m/M\n```\n\
                    ```toml\nnot = \"sh\"\n```\n";
    let blocks = sh_blocks(markdown);
    assert_eq!(blocks.len(), 1);
    let snippets: Vec<(usize, &str)> = blocks[0]
        .snippets
        .iter()
        .map(|s| (s.line, s.text.as_str()))
        .collect();
    assert_eq!(
        snippets,
        [
            (4, "A=1   # kept"),
            (6, "grpcurl -d '{}' \\\n  host:1 \\\n  m/M")
        ]
    );
    assert_eq!(role("KEY=$(openssl rand -hex 32)"), Some(Role::Shell));
    assert_eq!(
        role("METADATA_TOKEN=$KEY metadata-service user get u --addr x"),
        Some(Role::Client { streaming: false })
    );
    assert_eq!(
        role("metadata-service user watch --from-revision 1   # until stopped"),
        Some(Role::Client { streaming: true })
    );
    assert_eq!(
        role("metadata-service --api-keys-file k"),
        Some(Role::Server)
    );
    assert_eq!(role("metadata-service frobnicate"), None);
}
