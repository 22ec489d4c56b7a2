//! The command-line client (`metadata-service user|org ...`), run as the
//! built binary against a live server.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use metadata_service::server::{self, RunningServer, TlsConfig};
use serde_json::{Value as Json, json};

use crate::common::tls::Ca;
use crate::common::{self, Backend, TestDb};
use crate::programs::BIN;
use crate::served::{TestServer, start, start_with};

fn cli(s: &TestServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = args.to_vec();
    let url = s.url();
    all.extend(["--addr", &url]);
    run(&all, &[], stdin)
}

/// The binary with `args` and `env`, and none of the caller's client
/// settings.
fn run(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("METADATA_ADDR")
        .env_remove("METADATA_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// `<kind> watch <id> --from-revision 1 --max-events <count>`: one JSON
/// object per line.
fn first_events(s: &TestServer, kind: &str, id: &str, count: u64) -> Vec<Json> {
    let count = count.to_string();
    let args = [
        kind,
        "watch",
        id,
        "--from-revision",
        "1",
        "--max-events",
        &count,
    ];
    let watched = cli(s, &args, None);
    assert!(watched.status.success(), "{watched:?}");
    String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The one JSON document printed on stdout (compact: stdout is a pipe).
fn json_out(output: &Output) -> Json {
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 1, "compact when piped: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_merge_replace_get_delete_watch() {
    let s = start(Backend::Sqlite).await.unwrap();
    let merged = json_out(&cli(
        &s,
        &[
            "user",
            "merge",
            "user_1",
            "--public",
            r#"{"a":{"b":1,"c":2}}"#,
            "--private",
            r#"{"p":true}"#,
        ],
        None,
    ));
    assert_eq!(merged["public_metadata"], json!({"a": {"b": 1, "c": 2}}));
    assert_eq!(merged["version"], json!(1));

    let removed = json_out(&cli(
        &s,
        &[
            "user",
            "merge",
            "user_1",
            "--public",
            r#"{"a":{"b":null}}"#,
            "--expected-version",
            "1",
        ],
        None,
    ));
    assert_eq!(removed["public_metadata"], json!({"a": {"c": 2}}));

    // From a file and from standard input.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unsafe.json");
    std::fs::write(&file, r#"{"theme":"dark"}"#).unwrap();
    let at_file = format!("@{}", file.display());
    let replaced = json_out(&cli(
        &s,
        &[
            "user",
            "replace",
            "user_1",
            "--unsafe",
            &at_file,
            "--private",
            "-",
        ],
        Some("null"),
    ));
    assert_eq!(replaced["unsafe_metadata"], json!({"theme": "dark"}));
    assert_eq!(replaced["private_metadata"], Json::Null);
    assert_eq!(replaced["version"], json!(3));

    let got = json_out(&cli(&s, &["user", "get", "user_1"], None));
    assert_eq!(got, replaced);

    let events = first_events(&s, "user", "user_1", 3);
    let revisions: Vec<&Json> = events.iter().map(|e| &e["revision"]).collect();
    assert_eq!(revisions, [&json!(1), &json!(2), &json!(3)]);
    assert_eq!(events[2]["change_type"], json!("CHANGE_TYPE_REPLACED"));

    let deleted = json_out(&cli(&s, &["user", "delete", "user_1"], None));
    assert_eq!(deleted, json!({"existed": true}));
    assert_eq!(
        json_out(&cli(&s, &["user", "get", "user_1"], None))["version"],
        json!(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_merge_replace_get_delete_watch() {
    let s = start(Backend::Sqlite).await.unwrap();
    let merged = json_out(&cli(
        &s,
        &[
            "org",
            "merge",
            "org_1",
            "--public",
            r#"{"tier":"pro","seats":5}"#,
        ],
        None,
    ));
    assert_eq!(merged["organization_id"], json!("org_1"));
    assert_eq!(
        merged["public_metadata"],
        json!({"tier": "pro", "seats": 5})
    );
    assert!(merged.get("unsafe_metadata").is_none(), "{merged}");
    let got = json_out(&cli(&s, &["org", "get", "org_1"], None));
    assert_eq!(got, merged);

    let replaced = json_out(&cli(
        &s,
        &[
            "org",
            "replace",
            "org_1",
            "--public",
            "-",
            "--expected-version",
            "1",
        ],
        Some(r#"{"tier":"enterprise"}"#),
    ));
    assert_eq!(replaced["public_metadata"], json!({"tier": "enterprise"}));
    assert_eq!(replaced["version"], json!(2));

    let deleted = json_out(&cli(&s, &["org", "delete", "org_1"], None));
    assert_eq!(deleted, json!({"existed": true}));

    let events = first_events(&s, "org", "org_1", 3);
    let changes: Vec<&Json> = events.iter().map(|e| &e["change_type"]).collect();
    assert_eq!(
        changes,
        [
            &json!("CHANGE_TYPE_MERGED"),
            &json!("CHANGE_TYPE_REPLACED"),
            &json!("CHANGE_TYPE_DELETED")
        ]
    );
    assert_eq!(
        events[1]["after"]["public_metadata"],
        json!({"tier": "enterprise"})
    );
}

/// On a terminal (a pseudo-terminal made by util-linux `script`), results
/// are indented; piped, they are one line (every other test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_indented_on_a_terminal() {
    let s = start(Backend::Sqlite).await.unwrap();
    let merge = format!(
        "'{BIN}' user merge user_1 --public '{{\"a\":{{\"b\":1}}}}' --addr {}",
        s.url()
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &merge, "/dev/null"])
        .env_remove("METADATA_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    assert!(text.starts_with("{\n  \""), "{text}");
    assert!(text.contains("\n  \"user_id\": \"user_1\""), "{text}");
    let parsed: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["public_metadata"], json!({"a": {"b": 1}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_reported_with_its_position_before_any_call() {
    let s = start(Backend::Sqlite).await.unwrap();
    let out = cli(
        &s,
        &[
            "user",
            "merge",
            "user_1",
            "--public",
            r#"{"ok":1}"#,
            "--private",
            "{\n  \"a\": nope}",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--private: invalid JSON: expected ident at line 2 column 9"),
        "{stderr}"
    );
    // Nothing was sent: the valid field was not written either.
    assert_eq!(
        json_out(&cli(&s, &["user", "get", "user_1"], None))["version"],
        json!(0)
    );
    let out = cli(&s, &["user", "merge", "user_1", "--public", "[1]"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Checked before connecting: no server needed.
    let nowhere = ["--addr", "http://127.0.0.1:9"];
    let merge = ["user", "merge", "user_1", "--public", "[1]"];
    let out = run(&[&merge[..], &nowhere].concat(), &[], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--public: a merge patch must be a JSON object"),
        "{out:?}"
    );
    let out = run(
        &[&["user", "get", "user_1"][..], &nowhere].concat(),
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "no server: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("error: cannot connect to http://127.0.0.1:9: "),
        "{out:?}"
    );
    let out = cli(&s, &["org", "merge", "org_1", "--unsafe", "{}"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_print_the_code_and_exit_64_plus_it() {
    let s = start(Backend::Sqlite).await.unwrap();
    let out = cli(&s, &["user", "get", ""], None);
    assert_eq!(out.status.code(), Some(64 + 3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: InvalidArgument: user_id"),
        "{stderr}"
    );
    let out = cli(
        &s,
        &["user", "delete", "user_1", "--expected-version", "4"],
        None,
    );
    assert_eq!(out.status.code(), Some(64 + 10), "ABORTED: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_sent_as_a_bearer_credential() {
    use metadata_service::auth::{ApiKeys, Authenticator, hash_key};
    let keys = ApiKeys::parse(&format!("cli:{}", hash_key("cli-test-key")), "test").unwrap();
    let auth = std::sync::Arc::new(Authenticator::new(keys, None));
    let s = start_with(Backend::Sqlite, |c| c.auth = auth)
        .await
        .unwrap();
    let out = cli(&s, &["user", "get", "user_1"], None);
    assert_eq!(out.status.code(), Some(64 + 16), "UNAUTHENTICATED: {out:?}");
    let got = json_out(&cli(
        &s,
        &["user", "get", "user_1", "--token", "cli-test-key"],
        None,
    ));
    assert_eq!(got["user_id"], json!("user_1"));
    // The variables, which keep the token out of `ps`.
    let url = s.url();
    let env = [
        ("METADATA_ADDR", url.as_str()),
        ("METADATA_TOKEN", "cli-test-key"),
    ];
    let got = json_out(&run(&["user", "get", "user_1"], &env, None));
    assert_eq!(got["user_id"], json!("user_1"));
    let env = [("METADATA_ADDR", url.as_str()), ("METADATA_TOKEN", "wrong")];
    let out = run(&["user", "get", "user_1"], &env, None);
    assert_eq!(out.status.code(), Some(64 + 16), "UNAUTHENTICATED: {out:?}");
    // --help names the variable but never shows its value.
    let env = [("METADATA_TOKEN", "cli-test-key")];
    let help = run(&["user", "get", "--help"], &env, None);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("METADATA_TOKEN"), "{text}");
    assert!(!text.contains("cli-test-key"), "{text}");
}

/// A TLS server, requiring client certificates from a second CA when
/// `mtls`, and the PEM files a user of the CLI would have.
struct TlsSetup {
    _db: TestDb,
    server: RunningServer,
    dir: tempfile::TempDir,
}

impl TlsSetup {
    async fn start(mtls: bool) -> TlsSetup {
        let ca = Ca::new("CLI server CA");
        let clients = Ca::new("CLI clients CA");
        let db = TestDb::create(Backend::Sqlite).await.unwrap();
        let mut config = common::config(db.url());
        let leaf = ca.server_leaf();
        config.tls = Some(TlsConfig {
            cert: leaf.cert.into_bytes(),
            key: leaf.key.into_bytes(),
            client_ca: mtls.then(|| clients.pem.clone().into_bytes()),
        });
        let server = server::start(&config).await.expect("TLS server starts");
        let dir = tempfile::tempdir().unwrap();
        let client = clients.client_leaf("cli");
        // Signed by a CA the server does not accept for clients.
        let stranger = ca.client_leaf("stranger");
        for (name, pem) in [
            ("ca.pem", &ca.pem),
            ("other-ca.pem", &Ca::new("unrelated CA").pem),
            ("client.pem", &client.cert),
            ("client-key.pem", &client.key),
            ("stranger.pem", &stranger.cert),
            ("stranger-key.pem", &stranger.key),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        TlsSetup {
            _db: db,
            server,
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The CLI against `scheme://localhost:port`, with `flags` (file names
    /// in the set-up's directory are made absolute).
    fn cli(&self, scheme: &str, action: &[&str], flags: &[&str]) -> Output {
        let addr = format!("{scheme}://localhost:{}", self.server.local_addr().port());
        let mut args = action.to_vec();
        args.extend(["--addr", &addr]);
        let flags: Vec<String> = flags
            .iter()
            .map(|f| match f.ends_with(".pem") {
                true => self.path(f),
                false => f.to_string(),
            })
            .collect();
        args.extend(flags.iter().map(String::as_str));
        run(&args, &[], None)
    }
}

const MTLS: [&str; 6] = [
    "--ca",
    "ca.pem",
    "--client-cert",
    "client.pem",
    "--client-key",
    "client-key.pem",
];

/// Every subcommand over https with `flags`.
async fn every_subcommand_over(tls: TlsSetup, flags: &[&str]) {
    let merge = ["user", "merge", "user_1", "--public", r#"{"via":"tls"}"#];
    let merged = json_out(&tls.cli("https", &merge, flags));
    assert_eq!(merged["public_metadata"], json!({"via": "tls"}));
    let replace = ["user", "replace", "user_1", "--private", r#"{"p":1}"#];
    let replaced = json_out(&tls.cli("https", &replace, flags));
    assert_eq!(replaced["version"], json!(2));
    let got = json_out(&tls.cli("https", &["user", "get", "user_1"], flags));
    assert_eq!(got, replaced);
    let deleted = json_out(&tls.cli("https", &["user", "delete", "user_1"], flags));
    assert_eq!(deleted, json!({"existed": true}));
    let watch = ["user", "watch", "--from-revision", "1", "--max-events", "3"];
    let watched = tls.cli("https", &watch, flags);
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(String::from_utf8_lossy(&watched.stdout).lines().count(), 3);
    tls.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_over_tls() {
    let tls = TlsSetup::start(false).await;
    every_subcommand_over(tls, &["--ca", "ca.pem"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_over_mtls() {
    let tls = TlsSetup::start(true).await;
    every_subcommand_over(tls, &MTLS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_refusals_are_reported_and_write_nothing() {
    let tls = TlsSetup::start(true).await;
    let merge = ["user", "merge", "user_1", "--public", r#"{"a":1}"#];
    // Exit 1, the server could not be reached, with the cause. How a
    // refused client certificate shows on the client is a race (the TLS
    // alert, a closed connection or a broken pipe), hence only its kind.
    let refused = ["cannot connect to https://localhost:"];
    let failed = |out: &Output, what: &str, causes: &[&str]| {
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{what}: {stderr}");
        assert!(
            causes.iter().any(|c| stderr.contains(c)),
            "{what}: {stderr}"
        );
        assert_no_panic(&stderr);
    };
    // No client certificate, one from the wrong CA, an untrusted server,
    // and plaintext to a TLS port.
    failed(
        &tls.cli("https", &merge, &["--ca", "ca.pem"]),
        "no client certificate",
        &refused,
    );
    let out = tls.cli("https", &merge, &["--ca", "ca.pem"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.ends_with(
            "(if the server requires client certificates: --client-cert, --client-key)\n"
        ),
        "{stderr}"
    );
    let stranger = [
        "--ca",
        "ca.pem",
        "--client-cert",
        "stranger.pem",
        "--client-key",
        "stranger-key.pem",
    ];
    failed(
        &tls.cli("https", &merge, &stranger),
        "client certificate from the wrong CA",
        &refused,
    );
    let mut untrusted = MTLS;
    untrusted[1] = "other-ca.pem";
    failed(
        &tls.cli("https", &merge, &untrusted),
        "server not trusted",
        &["invalid peer certificate: UnknownIssuer"],
    );
    failed(
        &tls.cli("http", &merge, &[]),
        "plaintext",
        &["transport error"],
    );

    // Bad input is exit 2, before any connection.
    let out = tls.cli("https", &merge, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https:// needs --ca"),
        "{out:?}"
    );
    let out = tls.cli("https", &merge, &["--ca", "missing.pem"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = tls.cli(
        "https",
        &merge,
        &["--ca", "ca.pem", "--client-cert", "client.pem"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "--client-cert needs --client-key: {out:?}"
    );

    let got = json_out(&tls.cli("https", &["user", "get", "user_1"], &MTLS));
    assert_eq!(got["version"], json!(0), "nothing was written");
    tls.server.shutdown().await.unwrap();
}

fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
}
