//! The command-line client (`metadata-service user|org ...`), run as the
//! built binary against a live server.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{Backend, TestServer, start, start_with};
use serde_json::{Value as Json, json};

const BIN: &str = env!("CARGO_BIN_EXE_metadata-service");

fn cli(s: &TestServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--addr", &s.url()])
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

    let watched = cli(
        &s,
        &[
            "user",
            "watch",
            "user_1",
            "--from-revision",
            "1",
            "--max-events",
            "3",
        ],
        None,
    );
    assert!(watched.status.success(), "{watched:?}");
    let events: Vec<Json> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
async fn organization_merge_and_get() {
    let s = start(Backend::Sqlite).await.unwrap();
    let merged = json_out(&cli(
        &s,
        &["org", "merge", "org_1", "--public", r#"{"tier":"pro"}"#],
        None,
    ));
    assert_eq!(merged["organization_id"], json!("org_1"));
    assert_eq!(merged["public_metadata"], json!({"tier": "pro"}));
    assert!(merged.get("unsafe_metadata").is_none(), "{merged}");
    let got = json_out(&cli(&s, &["org", "get", "org_1"], None));
    assert_eq!(got, merged);
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
}
