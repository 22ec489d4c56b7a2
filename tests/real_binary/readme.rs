//! Docs that cannot rot: every `grpcurl` and `metadata-service` command in
//! README.md's shell blocks runs here, in order, against the real binary,
//! as a reader would paste them into one shell.
//!
//! How the README is played:
//! - Each command runs in bash (with `pipefail`) in one scratch directory,
//!   the reader's working directory. The harness has put there the files the
//!   README assumes the reader has: `clerk-public.pem` (with
//!   a matching `$SESSION_JWT`), `ca.pem`, `server.pem`, `server-key.pem`,
//!   `clients-ca.pem`, `client.pem`, `client-key.pem`. Shell variables a
//!   command assigns (`KEY=...`) carry over to later commands.
//! - One server runs at a time, as for the reader, who stops one server
//!   before starting the next (README says so): `cargo run --release` starts
//!   the built binary with no flags, a `metadata-service --flag ...` line
//!   starts it with those flags. Both serve `metadata.db` in the working
//!   directory. A server that is replaced must stop cleanly on SIGTERM.
//! - What a shared test machine needs is rewritten, nothing else: a server
//!   listens on a free port, not 50051, and serves metrics on a free port,
//!   not 9090; commands' `127.0.0.1:50051` and `metadata.example.com:50051`
//!   become that port (`localhost` for the name, which the test certificate
//!   holds); the CLI finds the server in `METADATA_ADDR`. A client command
//!   still naming port 50051 after that fails the test.
//! - A command must exit 0, unless it ends with a comment `# -> Code`: then
//!   it must fail with that gRPC code. A Watch must print a message and
//!   still be streaming 300 ms later; it is then stopped.
//! - Client and server lines must be single commands (no `|`, `;`, `&`),
//!   so that their own exit status is what is checked.
//! - Every other command must be listed in [`role`] with what checks it
//!   instead (helm: `.ci/check-helm`), so a new kind of command in README
//!   fails this test until it is handled.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::common;
use crate::common::wait::within;
use crate::programs::BIN;

/// Longest one README command may run.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long a server may take to log that it serves, and to stop.
const SERVER_LIMIT: Duration = Duration::from_secs(20);
/// How long a Watch may take to print its first message.
const FIRST_MESSAGE_LIMIT: Duration = Duration::from_secs(15);
const STDIN: &str = "{\"from\":\"standard input\"}\n";
const VARS_FILE: &str = ".readme-vars";
/// Fence languages whose blocks are played.
const SHELLS: [&str; 4] = ["sh", "bash", "shell", "console"];
/// gRPC code names a `# -> Code` comment may expect.
const CODES: [&str; 16] = [
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// One command of a shell block, with `\` continuations joined.
#[derive(Debug, Clone)]
struct Snippet {
    line: usize,
    text: String,
}

/// The commands of the shell blocks of a Markdown text, in order; blank and
/// comment-only lines are dropped (trailing comments stay: bash ignores
/// them).
fn shell_snippets(markdown: &str) -> Vec<Snippet> {
    let mut snippets = Vec::new();
    let mut in_block = false;
    let mut pending: Option<Snippet> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim();
        if !in_block {
            if let Some(language) = trimmed.strip_prefix("```") {
                in_block = SHELLS.contains(&language.trim());
            }
            continue;
        }
        if trimmed.starts_with("```") {
            assert!(pending.is_none(), "line {index}: block ends after `\\`");
            in_block = false;
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
            snippets.extend(pending.take());
        }
    }
    snippets
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// grpcurl or the CLI, against the running server.
    Client { streaming: bool },
    /// `metadata-service --flags`: replaces the running server.
    Server,
    /// `cargo run --release`: the server with no flags.
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

/// `NAME=$(...)` and nothing else (but a comment).
fn is_substitution_assignment(text: &str) -> bool {
    let code = text.split(" #").next().unwrap_or_default().trim_end();
    code.split_once('=').is_some_and(|(name, value)| {
        is_assignment(&format!("{name}=")) && value.starts_with("$(") && value.ends_with(')')
    }) && code.matches("$(").count() == 1
}

fn role(text: &str) -> Option<Role> {
    if is_substitution_assignment(text) {
        return Some(Role::Shell);
    }
    let mut words: Vec<&str> = text.split_whitespace().collect();
    // `NAME=value command ...`: the command decides.
    let mut prefixed = false;
    while words.len() > 1 && is_assignment(words[0]) {
        words.remove(0);
        prefixed = true;
    }
    let role = match words.as_slice() {
        ["grpcurl", ..] => Role::Client {
            streaming: text.contains("/Watch"),
        },
        [
            "metadata-service",
            "user" | "org" | "schema" | "webhook",
            action,
            ..,
        ] => Role::Client {
            streaming: *action == "watch" && !text.contains("--max-events"),
        },
        ["metadata-service", "txn", ..] => Role::Client { streaming: false },
        ["metadata-service", "relay", ..] => Role::Elsewhere(
            "tests/real_binary/relay.rs runs the relay against Postgres and a real NATS",
        ),
        // A server that relays would write to the machine's shared NATS.
        ["metadata-service", ..] if text.contains("--relay-nats-url") => Role::Elsewhere(
            "tests/in_process/relay.rs (sqlite::server_relays_json) runs the server's relay",
        ),
        // The harness starts servers itself, from their arguments only.
        ["metadata-service", flag, ..] if flag.starts_with('-') && !prefixed => Role::Server,
        ["cargo", "run", "--release"] if !prefixed => Role::DefaultServer,
        ["cargo", "test"] => Role::Elsewhere("the test command: this test is part of it"),
        ["cargo", "run", "--example", "consumer", ..] => Role::Elsewhere(
            "tests/in_process/consumer_example.rs runs the consumer against a live server",
        ),
        ["cargo", "run", "--example", "nats_consumer", ..] => Role::Elsewhere(
            "tests/in_process/nats_consumer_example.rs runs the NATS consumer against a relay",
        ),
        ["nats", ..] => Role::Elsewhere(
            "the nats CLI is not installed here; tests/in_process/nats_consumer_example.rs \
             reads the stream with a durable pull consumer through async-nats",
        ),
        ["helm", ..] => Role::Elsewhere(".ci/check-helm renders, validates and lints the chart"),
        ["python3", "receiver.py"] => Role::Elsewhere(
            "tests/real_binary/webhooks.rs runs the same receiver \
             (tests/fixtures/webhook_receiver.py) against the binary",
        ),
        ["kubectl", ..] => Role::Elsewhere("needs a Kubernetes cluster"),
        ["echo", ..] => Role::Shell,
        [word] if is_assignment(word) => Role::Shell,
        _ => return None,
    };
    Some(role)
}

/// Whether `text` has a `|`, `;` or `&` outside quotes and comments: then
/// its exit status would not be the command's own.
fn has_control_operator(text: &str) -> bool {
    let (mut single, mut double, mut escaped, mut word_start) = (false, false, false, true);
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if single {
            single = c != '\'';
        } else {
            match c {
                '\\' => escaped = true,
                '\'' if !double => single = true,
                '"' => double = !double,
                '#' if !double && word_start => return false,
                '|' | ';' | '&' if !double => return true,
                _ => {}
            }
        }
        word_start = c.is_whitespace();
    }
    false
}

/// The code a `# -> Code` comment expects, if any.
fn expected_failure(text: &str) -> Option<&'static str> {
    let (_, comment) = text.rsplit_once("# -> ")?;
    let code = comment.split_whitespace().next()?;
    CODES.into_iter().find(|known| *known == code)
}

/// What playing a README did.
#[derive(Debug, Default)]
struct Report {
    clients: usize,
    expected_failures: usize,
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
        // Ok(Ok) once it logs where it serves, Ok(Err) once it exited.
        let started = within(SERVER_LIMIT, async || {
            if let Some(addr) = served.serving_addr() {
                return Ok(Ok(addr));
            }
            match served.child.try_wait().unwrap() {
                Some(status) => Ok(Err(status)),
                None => Err(()),
            }
        })
        .await;
        match started {
            Ok(Ok(addr)) => {
                served.addr = addr;
                Ok(served)
            }
            Ok(Err(status)) => Err(format!(
                "server {args:?} exited with {status}{}",
                served.output()
            )),
            Err(()) => Err(format!(
                "server {args:?} not serving after {SERVER_LIMIT:?}{}",
                served.output()
            )),
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
        signal("TERM", &pid.to_string()).await;
        match tokio::time::timeout(SERVER_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(status) => Err(format!("server stopped with {status:?}{}", self.output())),
            Err(_) => Err(format!("server ignored SIGTERM{}", self.output())),
        }
    }
}

/// `kill -s signal -- target`; a target that is already gone is fine.
async fn signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--", target])
        .stderr(Stdio::null())
        .status()
        .await;
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
/// `metadata-service` and `grpcurl` on PATH, and the server running now.
struct Reader {
    // Declared first, so dropped first: no server outlives its directory.
    server: Option<Served>,
    servers_started: usize,
    path: OsString,
    /// Shell variables the README assigns, kept between commands.
    vars: Vec<String>,
    session_jwt: String,
    dir: tempfile::TempDir,
}

impl Reader {
    fn new(grpcurl: &Path, vars: Vec<String>) -> Reader {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(".bin");
        std::fs::create_dir(&bin).unwrap();
        // Client subcommands run the real binary; a server line only
        // records its arguments, and the harness starts that server.
        write_executable(
            &bin.join("metadata-service"),
            "#!/bin/sh\n\
             case \"$1\" in user|org|schema|txn) exec \"$README_BIN\" \"$@\" ;; esac\n\
             for arg in \"$@\"; do printf '%s\\0' \"$arg\"; done > \"$README_SERVER_ARGS\"\n",
        );
        // The grpcurl the test located, whatever the scratch directory
        // would make a pyenv shim pick.
        write_executable(
            &bin.join("grpcurl"),
            &format!("#!/bin/sh\nexec '{}' \"$@\"\n", grpcurl.display()),
        );
        let mut path = OsString::from(&bin);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());

        let files = dir.path();
        std::fs::write(
            files.join("clerk-public.pem"),
            include_str!("../fixtures/jwt-rsa-public.pem"),
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
            server: None,
            servers_started: 0,
            path,
            vars,
            session_jwt: session_jwt(),
            dir,
        }
    }

    /// Stops the running server, if any, and starts one with `args`.
    async fn replace_server(&mut self, args: &[String]) -> Result<(), String> {
        if let Some(served) = self.server.take() {
            served.stop().await?;
        }
        self.servers_started += 1;
        let log = format!("server-{}.log", self.servers_started);
        self.server = Some(Served::start(self.dir.path(), args, &log).await?);
        Ok(())
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        match &self.server {
            Some(served) => Ok(served.addr),
            None => Err("no server is running at this point of README".into()),
        }
    }

    /// `text` as a bash script in the scratch directory, with the README's
    /// variables loaded before and saved after. `addr` is the server's.
    fn bash(&self, text: &str, addr: Option<SocketAddr>) -> Command {
        // `declare -p` with no names would dump every variable.
        let save = match self.vars.is_empty() {
            true => String::new(),
            false => format!(
                "declare -p {} > {VARS_FILE} 2>/dev/null",
                self.vars.join(" ")
            ),
        };
        let script = format!(
            "set -o pipefail\n\
             [ -f {VARS_FILE} ] && . ./{VARS_FILE}\n\
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
        if let Some(addr) = addr {
            command.env("METADATA_ADDR", format!("http://{addr}"));
        }
        command
            .current_dir(self.dir.path())
            .env("PATH", &self.path)
            .env("README_BIN", BIN)
            .env("README_SERVER_ARGS", self.dir.path().join(".server-args"))
            .env("SESSION_JWT", &self.session_jwt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        command
    }

    /// A client command's text, aimed at the running server.
    fn aimed(&self, text: &str) -> Result<(String, SocketAddr), String> {
        let addr = self.addr()?;
        let text = text.replace("127.0.0.1:50051", &addr.to_string()).replace(
            "metadata.example.com:50051",
            &format!("localhost:{}", addr.port()),
        );
        if text.contains("50051") {
            return Err("names port 50051 in a form the test cannot aim at its server".into());
        }
        Ok((text, addr))
    }

    async fn run(&self, text: &str, addr: Option<SocketAddr>) -> Outcome {
        let mut child = self.bash(text, addr).spawn().expect("run bash");
        feed_stdin(&mut child).await;
        match tokio::time::timeout(RUN_LIMIT, read_all(&mut child)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                stop_group(&mut child).await;
                panic!("`{text}` ran longer than {RUN_LIMIT:?}");
            }
        }
    }

    /// A streaming command: Ok once it has printed a message (errors go to
    /// stderr, so a refused call prints nothing on stdout) and is still
    /// running 300 ms later, so that a stream that fails at once is caught;
    /// it is then stopped with its process group.
    async fn run_streaming(&self, text: &str, addr: SocketAddr) -> Result<(), Outcome> {
        let mut child = self.bash(text, Some(addr)).spawn().expect("run bash");
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
        // Time is what is tested: still running a moment after its first
        // message, where a stream that fails at once would have ended.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let still_running = child.try_wait().unwrap().is_none();
        stop_group(&mut child).await;
        let _ = tokio::time::timeout(RUN_LIMIT, stdout.read_to_end(&mut printed)).await;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = tokio::time::timeout(RUN_LIMIT, pipe.read_to_string(&mut stderr)).await;
        }
        let outcome = Outcome {
            status: (!still_running)
                .then(|| child.try_wait().ok().flatten())
                .flatten(),
            stdout: String::from_utf8_lossy(&printed).into_owned(),
            stderr,
        };
        if still_running && !outcome.stdout.trim().is_empty() {
            Ok(())
        } else {
            Err(outcome)
        }
    }

    /// A server line: bash expands it (quotes, variables), the wrapper
    /// records the arguments, and the running server is replaced.
    async fn start_server_line(&mut self, text: &str) -> Result<(), String> {
        let args_file = self.dir.path().join(".server-args");
        let _ = std::fs::remove_file(&args_file);
        let outcome = self.run(text, None).await;
        if outcome.status.is_none_or(|s| !s.success()) {
            return Err(format!("{outcome}"));
        }
        let recorded = std::fs::read(&args_file).map_err(|e| format!("no arguments: {e}"))?;
        let args: Vec<String> = recorded
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        self.replace_server(&args).await
    }
}

/// Everything the command prints and its exit status.
async fn read_all(child: &mut Child) -> Outcome {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (read_out, read_err) =
        tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    read_out.unwrap();
    read_err.unwrap();
    Outcome {
        status: Some(child.wait().await.unwrap()),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// SIGTERM to the command's process group (bash and what it started),
/// SIGKILL if it is still there after a while.
async fn stop_group(child: &mut Child) {
    let Some(pid) = child.id() else { return };
    signal("TERM", &format!("-{pid}")).await;
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        signal("KILL", &format!("-{pid}")).await;
        let _ = child.wait().await;
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
    let key = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rsa-private.pem")).unwrap();
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

/// Each snippet with its role; Err names the first one the harness does not
/// know, or a client or server line that is not a single command.
fn cast(snippets: &[Snippet]) -> Result<Vec<Role>, String> {
    snippets
        .iter()
        .map(|snippet| {
            let at = |why: &str| format!("README line {}: `{}` {why}", snippet.line, snippet.text);
            let role = role(&snippet.text).ok_or_else(|| {
                at(
                    "is neither run by tests/real_binary/readme.rs nor listed as checked elsewhere; \
                    teach `role` about it",
                )
            })?;
            if matches!(role, Role::Client { .. } | Role::Server)
                && has_control_operator(&snippet.text)
            {
                return Err(at(
                    "is not a single command (|, ; or &): its exit status would not be its own",
                ));
            }
            Ok(role)
        })
        .collect()
}

/// Plays every shell block of `markdown` in order; Err names the README
/// line of the first command that failed and shows its output.
async fn play(markdown: &str, grpcurl: &Path) -> Result<Report, String> {
    let snippets = shell_snippets(markdown);
    let roles = cast(&snippets)?;
    let vars = snippets
        .iter()
        .zip(&roles)
        .filter(|(s, role)| **role == Role::Shell && is_assignment(&s.text))
        .filter_map(|(s, _)| Some(s.text.split_once('=')?.0.to_string()))
        .collect();
    let mut reader = Reader::new(grpcurl, vars);
    let mut report = Report::default();
    for (snippet, role) in snippets.iter().zip(roles) {
        let at =
            |detail: String| format!("README line {}: `{}` {detail}", snippet.line, snippet.text);
        match role {
            Role::Elsewhere(reason) => report.elsewhere.push((snippet.line, reason)),
            Role::DefaultServer => {
                reader.replace_server(&[]).await.map_err(at)?;
                report.servers += 1;
            }
            Role::Server => {
                reader.start_server_line(&snippet.text).await.map_err(at)?;
                report.servers += 1;
            }
            Role::Shell => {
                let outcome = reader.run(&snippet.text, None).await;
                if outcome.status.is_none_or(|s| !s.success()) {
                    return Err(at(outcome.to_string()));
                }
            }
            Role::Client { streaming } => {
                let (text, addr) = reader.aimed(&snippet.text).map_err(at)?;
                if streaming {
                    reader
                        .run_streaming(&text, addr)
                        .await
                        .map_err(|outcome| at(format!("did not stream: {outcome}")))?;
                    report.streaming += 1;
                } else {
                    let outcome = reader.run(&text, Some(addr)).await;
                    let ok = outcome.status.is_some_and(|s| s.success());
                    match expected_failure(&snippet.text) {
                        None if ok => {}
                        None => return Err(at(outcome.to_string())),
                        Some(code) if !ok && outcome.stderr.contains(code) => {
                            report.expected_failures += 1;
                        }
                        Some(code) => {
                            return Err(at(format!("should fail with {code}: {outcome}")));
                        }
                    }
                }
                report.clients += 1;
                if snippet.text.contains("metadata-service ") {
                    report.cli += 1;
                }
            }
        }
    }
    if let Some(served) = reader.server.take() {
        served.stop().await?;
    }
    Ok(report)
}

/// The grpcurl to run, as an absolute path.
fn grpcurl() -> Option<PathBuf> {
    let program = PathBuf::from(crate::programs::grpcurl()?);
    if program.components().count() > 1 {
        return Some(program);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(&program))
        .find(|candidate| candidate.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_readme_works() {
    let Some(grpcurl) = grpcurl() else { return };
    let readme = include_str!("../../README.md");
    let report = play(readme, &grpcurl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report:#?}");
    // The README's walkthrough has all of these; a parser that found none
    // would pass vacuously.
    assert!(report.clients >= 20, "{report:?}");
    assert!(report.cli >= 5, "{report:?}");
    assert!(report.streaming >= 3, "{report:?}");
    assert!(report.expected_failures >= 2, "{report:?}");
    assert!(report.servers >= 4, "{report:?}");
}

/// A small README with the given shell block, after the default server.
fn readme_with(block: &str) -> String {
    format!("Intro.\n\n```sh\ncargo run --release\n```\n\n```sh\n{block}\n```\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_play_and_names_its_line() {
    let Some(grpcurl) = grpcurl() else { return };
    let readme = readme_with(
        "grpcurl -plaintext 127.0.0.1:50051 list\n\n\
         # An empty id is INVALID_ARGUMENT.\n\
         grpcurl -plaintext -d '{\"user_id\":\"\"}' \\\n  \
         127.0.0.1:50051 metadata.v1.UserMetadataService/Get",
    );
    let err = play(&readme, &grpcurl).await.unwrap_err();
    assert!(err.starts_with("README line 11: "), "{err}");
    assert!(err.contains("InvalidArgument"), "{err}");

    // A CLI error, a Watch that ends at once, a failure with another code
    // than announced, and a success where a failure was announced.
    let cli = readme_with("metadata-service user delete user_1 --expected-version 4");
    let err = play(&cli, &grpcurl).await.unwrap_err();
    assert!(err.contains("exit status: 74"), "ABORTED is 64 + 10: {err}");
    let watch = readme_with(
        "grpcurl -plaintext -d '{\"user_ids\":[\"\"]}' \
         127.0.0.1:50051 metadata.v1.UserMetadataService/Watch",
    );
    let err = play(&watch, &grpcurl).await.unwrap_err();
    assert!(err.contains("did not stream"), "{err}");
    let wrong_code =
        readme_with("metadata-service user delete user_1 --expected-version 4   # -> NotFound");
    let err = play(&wrong_code, &grpcurl).await.unwrap_err();
    assert!(err.contains("should fail with NotFound"), "{err}");
    let no_failure = readme_with("metadata-service user get user_1   # -> NotFound");
    let err = play(&no_failure, &grpcurl).await.unwrap_err();
    assert!(err.contains("should fail with NotFound"), "{err}");
    // The announced code passes.
    let announced =
        readme_with("metadata-service user delete user_1 --expected-version 4   # -> Aborted");
    let report = play(&announced, &grpcurl).await.unwrap();
    assert_eq!(report.expected_failures, 1);
}

#[tokio::test]
async fn commands_the_harness_cannot_check_fail_before_anything_runs() {
    let nowhere = Path::new("/nonexistent/grpcurl");
    for (block, why) in [
        ("curl http://127.0.0.1:9090/metrics", "teach `role`"),
        (
            "grpcurl -plaintext 127.0.0.1:50051 list | grep metadata",
            "not a single command",
        ),
        (
            "metadata-service user get u || true",
            "not a single command",
        ),
        (
            "METADATA_API_KEYS=x metadata-service --listen 0.0.0.0:50051",
            "teach `role`",
        ),
        (
            "KEY=$(openssl rand -hex 32) metadata-service --api-keys-file k",
            "teach `role`",
        ),
    ] {
        let err = play(&readme_with(block), nowhere).await.unwrap_err();
        assert!(err.starts_with("README line 8: "), "{block}: {err}");
        assert!(err.contains(why), "{block}: {err}");
    }
}

#[tokio::test]
async fn a_client_aimed_at_an_unmapped_address_fails() {
    let Some(grpcurl) = grpcurl() else { return };
    let readme = readme_with("grpcurl -plaintext localhost:50051 list");
    let err = play(&readme, &grpcurl).await.unwrap_err();
    assert!(err.contains("names port 50051"), "{err}");
}

#[test]
fn snippets_join_continuations_and_drop_comments() {
    let markdown = "text\n```sh\n# a comment\nA=1   # kept\n\ngrpcurl -d '{}' \\\n  host:1 \\\n  m/M\n```\n\
                    ```toml\nnot = \"sh\"\n```\n```bash\necho b\n```\n";
    let snippets: Vec<(usize, String)> = shell_snippets(markdown)
        .into_iter()
        .map(|s| (s.line, s.text))
        .collect();
    assert_eq!(
        snippets,
        [
            (4, "A=1   # kept".to_string()),
            (6, "grpcurl -d '{}' \\\n  host:1 \\\n  m/M".to_string()),
            (14, "echo b".to_string()),
        ]
    );
}

#[test]
fn roles_operators_and_expected_codes() {
    assert_eq!(
        role("KEY=$(openssl rand -hex 32)   # a key"),
        Some(Role::Shell)
    );
    assert_eq!(role("KEY=$(a) metadata-service --x y"), None);
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
    assert_eq!(
        role("metadata-service schema set user unsafe --file s.json   # -> InvalidArgument"),
        Some(Role::Client { streaming: false })
    );
    assert_eq!(role("metadata-service frobnicate"), None);

    assert!(!has_control_operator(
        r#"grpcurl -d '{"a":"x|y;z&"}' h m   # a; b | c"#
    ));
    assert!(!has_control_operator(r#"echo "a|b" > f"#));
    assert!(has_control_operator("grpcurl h list | jq ."));
    assert!(has_control_operator("metadata-service user get u; echo"));
    assert!(has_control_operator("metadata-service user get u &"));

    assert_eq!(
        expected_failure("grpcurl x   # -> Unauthenticated"),
        Some("Unauthenticated")
    );
    assert_eq!(expected_failure("grpcurl x   # -> Nonsense"), None);
    assert_eq!(expected_failure("grpcurl x   # all fine"), None);
}
