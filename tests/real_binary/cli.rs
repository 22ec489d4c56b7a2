//! The command-line client (`metadata-service user|org ...`), run as the
//! built binary against a live server.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

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

/// Every line printed on stdout, each one JSON document.
fn json_lines(output: &Output) -> Vec<Json> {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Like [`cli`], for a command that may wait for something that never
/// comes (a Watch short of events): killed after `limit`, failing the test
/// rather than hanging it.
async fn cli_within(s: &TestServer, args: &[&str], limit: Duration) -> Output {
    let url = s.url();
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .args(["--addr", &url])
        .env_remove("METADATA_ADDR")
        .env_remove("METADATA_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the binary");
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{}` still running after {limit:?}", args.join(" ")))
        .unwrap()
}

/// `kind merge id --public public`, which must succeed.
fn merge(s: &TestServer, kind: &str, id: &str, public: &str) -> Json {
    json_out(&cli(s, &[kind, "merge", id, "--public", public], None))
}

/// The `key` of each object in `values`.
fn each<'a>(values: &'a [Json], key: &str) -> Vec<&'a Json> {
    values.iter().map(|v| &v[key]).collect()
}

/// A gRPC error of the CLI: exit status 64 + `code`, and stderr starting
/// with `error: <name>: ` and naming `what`.
fn assert_grpc_error(out: &Output, code: i32, name: &str, what: &[&str]) {
    assert_eq!(out.status.code(), Some(64 + code), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with(&format!("error: {name}: ")), "{stderr}");
    for what in what {
        assert!(stderr.contains(what), "`{what}` not in {stderr}");
    }
    assert!(out.stdout.is_empty(), "{out:?}");
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
    // The details follow the message: the reason and the field.
    assert!(
        stderr.contains("\n  reason: EMPTY_ID field=user_id\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  field user_id: must not be empty (EMPTY_ID)"),
        "{stderr}"
    );
    merge(&s, "user", "user_1", r#"{"a":1}"#);
    let out = cli(
        &s,
        &["user", "delete", "user_1", "--expected-version", "4"],
        None,
    );
    assert_eq!(out.status.code(), Some(64 + 10), "ABORTED: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reason: VERSION_MISMATCH current_version=1 expected_version=4"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_prints_each_id_in_request_order() {
    let s = start(Backend::Sqlite).await.unwrap();
    merge(&s, "user", "user_1", r#"{"a":1}"#);
    merge(&s, "user", "user_2", r#"{"b":2}"#);

    let got = json_out(&cli(
        &s,
        &["user", "batch-get", "user_2", "user_9", "user_1", "user_2"],
        None,
    ));
    let keys: Vec<&String> = got.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["revision", "users"], "{got}");
    let users = got["users"].as_array().unwrap();
    assert_eq!(
        each(users, "user_id"),
        [
            &json!("user_2"),
            &json!("user_9"),
            &json!("user_1"),
            &json!("user_2")
        ]
    );
    // Each record as `get` prints it; a repeated id answered again, one
    // never written empty at version 0.
    let user_2 = json_out(&cli(&s, &["user", "get", "user_2"], None));
    assert_eq!(users[0], user_2);
    assert_eq!(users[3], user_2);
    assert_eq!(
        users[1],
        json!({
            "user_id": "user_9",
            "public_metadata": {},
            "private_metadata": {},
            "unsafe_metadata": {},
            "version": 0,
            "revision": 0,
            "created_at": null,
            "updated_at": null,
        })
    );
    assert_eq!(users[2]["public_metadata"], json!({"a": 1}));
    // The revision the read is exactly as of: the newest (2).
    assert_eq!(got["revision"], json!(2), "{got}");

    // Organizations: `organizations`, and no unsafe metadata.
    merge(&s, "org", "org_1", r#"{"tier":"pro"}"#);
    let orgs = json_out(&cli(&s, &["org", "batch-get", "org_1", "org_2"], None));
    let organizations = orgs["organizations"].as_array().unwrap();
    assert_eq!(
        each(organizations, "organization_id"),
        [&json!("org_1"), &json!("org_2")]
    );
    assert_eq!(organizations[0]["public_metadata"], json!({"tier": "pro"}));
    assert!(organizations[0].get("unsafe_metadata").is_none(), "{orgs}");
    assert!(orgs.get("users").is_none(), "{orgs}");

    // 1,001 ids of which 1,000 distinct are one batch; 1,001 distinct are
    // too many.
    let mut ids: Vec<String> = (0..1000).map(|i| format!("user_{i}")).collect();
    ids.push("user_0".into());
    let mut args = vec!["user", "batch-get"];
    args.extend(ids.iter().map(String::as_str));
    let many = json_out(&cli(&s, &args, None));
    assert_eq!(many["users"].as_array().unwrap().len(), 1001);
    assert_eq!(many["users"][1000]["user_id"], json!("user_0"));
    args.push("user_1000");
    let out = cli(&s, &args, None);
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["user_ids: has 1001 distinct ids"],
    );

    // A bad id is named by its index; no id at all is a usage error.
    let out = cli(&s, &["user", "batch-get", "user_1", "bad id"], None);
    assert_grpc_error(&out, 3, "InvalidArgument", &["user_ids[1]"]);
    let out = cli(&s, &["user", "batch-get"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `get --at`, `history` and `restore`: a record as of a revision, its
/// changes newest first with who made them, and putting one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_get_at_and_restore() {
    let s = start(Backend::Sqlite).await.unwrap();
    // Revision 1, before user_1 existed.
    merge(&s, "user", "other", r#"{"o":1}"#);
    let first = merge(&s, "user", "user_1", r#"{"plan":"free"}"#);
    merge(&s, "user", "user_1", r#"{"plan":"pro","seats":5}"#);
    let at = first["revision"].as_u64().unwrap().to_string();

    let then = json_out(&cli(&s, &["user", "get", "user_1", "--at", &at], None));
    assert_eq!(then["public_metadata"], json!({"plan": "free"}));
    assert_eq!(then["revision"], first["revision"]);

    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let history = cli(
        &s,
        &["user", "history", "user_1", "--traceparent", traceparent],
        None,
    );
    let events = json_lines(&history);
    assert_eq!(
        each(&events, "revision"),
        [&json!(3), &json!(2)],
        "newest first"
    );
    assert_eq!(events[0]["change_type"], json!("CHANGE_TYPE_MERGED"));
    assert_eq!(events[0]["actor"], json!(""), "an open server names nobody");
    let limited = json_lines(&cli(
        &s,
        &[
            "user",
            "history",
            "user_1",
            "--limit",
            "1",
            "--oldest-first",
        ],
        None,
    ));
    assert_eq!(each(&limited, "revision"), [&json!(2)]);

    let restored = json_out(&cli(
        &s,
        &[
            "user",
            "restore",
            "user_1",
            "--to",
            &at,
            "--expected-version",
            "2",
        ],
        None,
    ));
    assert_eq!(restored["public_metadata"], json!({"plan": "free"}));
    assert_eq!(restored["version"], json!(3));
    let traced = json_lines(&cli(
        &s,
        &[
            "user",
            "restore",
            "user_1",
            "--to",
            "1",
            "--traceparent",
            traceparent,
        ],
        None,
    ));
    assert_eq!(traced[0]["version"], json!(0), "nothing then: deleted");
    let last = json_lines(&cli(
        &s,
        &["user", "history", "user_1", "--limit", "1"],
        None,
    ));
    assert_eq!(last[0]["change_type"], json!("CHANGE_TYPE_DELETED"));
    assert_eq!(
        last[0]["trace_id"],
        json!("0af7651916cd43dd8448eb211c80319c")
    );

    let out = cli(&s, &["user", "get", "user_1", "--at", "99"], None);
    assert_grpc_error(
        &out,
        11,
        "OutOfRange",
        &["revision 99 is not reached yet", "REVISION_NOT_REACHED"],
    );
}

/// Three users with a public plan, one with a plan in private metadata
/// only, and one deleted.
fn planned_users(s: &TestServer) {
    merge(s, "user", "user_1", r#"{"plan":"gold","seats":12}"#);
    merge(s, "user", "user_2", r#"{"plan":"free","seats":1}"#);
    merge(s, "user", "user_3", r#"{"plan":"gold","seats":3}"#);
    let private = ["user", "merge", "user_4", "--private", r#"{"plan":"gold"}"#];
    json_out(&cli(s, &private, None));
    merge(s, "user", "user_5", r#"{"plan":"gold"}"#);
    json_out(&cli(s, &["user", "delete", "user_5"], None));
}

const GOLD: &str = r#"public_metadata.plan = "gold""#;

async fn list_prints_one_page_with_its_token(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    planned_users(&s);

    let list = |extra: &[&str]| {
        let mut args = vec!["user", "list"];
        args.extend_from_slice(extra);
        cli(&s, &args, None)
    };
    let first = json_out(&list(&["--filter", GOLD, "--page-size", "1"]));
    let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["next_page_token", "revision", "users"], "{first}");
    let users = first["users"].as_array().unwrap();
    assert_eq!(each(users, "user_id"), [&json!("user_1")], "{first}");
    assert_eq!(
        users[0]["public_metadata"],
        json!({"plan": "gold", "seats": 12})
    );
    let revision = first["revision"].as_u64().expect("revision is a number");
    assert!(revision <= 6, "{first}");
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    assert!(!token.is_empty(), "{first}");

    // The token continues the listing, also with another page size; the
    // last page has an empty token.
    for size in ["1", "5"] {
        let last = json_out(&list(&[
            "--filter",
            GOLD,
            "--page-size",
            size,
            "--page-token",
            &token,
        ]));
        assert_eq!(
            each(last["users"].as_array().unwrap(), "user_id"),
            [&json!("user_3")]
        );
        assert_eq!(last["next_page_token"], json!(""), "{last}");
    }

    // No filter and the default page size: every user holding something,
    // in id order (user_5 was deleted).
    let all = json_out(&list(&[]));
    assert_eq!(
        each(all["users"].as_array().unwrap(), "user_id"),
        [
            &json!("user_1"),
            &json!("user_2"),
            &json!("user_3"),
            &json!("user_4")
        ]
    );
    assert_eq!(all["next_page_token"], json!(""), "{all}");

    // A token belongs to its kind and filter; page sizes are not negative.
    let out = list(&["--filter", "", "--page-token", &token]);
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["page_token: ", "another filter"],
    );
    let out = cli(
        &s,
        &["org", "list", "--filter", GOLD, "--page-token", &token],
        None,
    );
    assert_grpc_error(&out, 3, "InvalidArgument", &["page_token: ", "other kind"]);
    let out = list(&["--filter", GOLD, "--page-token", "not-a-token"]);
    assert_grpc_error(&out, 3, "InvalidArgument", &["page_token: "]);
    let out = list(&["--page-size=-1"]);
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["page_size: must not be negative"],
    );
    // One page or all of them, not both.
    let out = list(&["--all", "--page-token", &token]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_one_page_with_its_token_sqlite() {
    list_prints_one_page_with_its_token(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_one_page_with_its_token_postgres() {
    list_prints_one_page_with_its_token(Backend::Postgres).await;
}

async fn list_all_prints_every_record_once_per_line(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    planned_users(&s);
    for (id, tier) in [("org_a", "pro"), ("org_b", "free"), ("org_c", "pro")] {
        merge(&s, "org", id, &format!(r#"{{"tier":"{tier}"}}"#));
    }

    // Page after page of one record: each record once, as `get` prints it,
    // one per line (no page object).
    let lines = json_lines(&cli(
        &s,
        &["user", "list", "--all", "--page-size", "1"],
        None,
    ));
    assert_eq!(
        each(&lines, "user_id"),
        [
            &json!("user_1"),
            &json!("user_2"),
            &json!("user_3"),
            &json!("user_4")
        ]
    );
    for line in &lines {
        let id = line["user_id"].as_str().unwrap();
        assert_eq!(line, &json_out(&cli(&s, &["user", "get", id], None)));
    }

    let gold = json_lines(&cli(
        &s,
        &[
            "user",
            "list",
            "--all",
            "--page-size",
            "1",
            "--filter",
            GOLD,
        ],
        None,
    ));
    assert_eq!(each(&gold, "user_id"), [&json!("user_1"), &json!("user_3")]);
    let private_gold = json_lines(&cli(
        &s,
        &[
            "user",
            "list",
            "--all",
            "--filter",
            r#"private_metadata.plan:"gold""#,
        ],
        None,
    ));
    assert_eq!(each(&private_gold, "user_id"), [&json!("user_4")]);
    let none = cli(
        &s,
        &[
            "user",
            "list",
            "--all",
            "--filter",
            "public_metadata.seats > 100",
        ],
        None,
    );
    assert_eq!(json_lines(&none), Vec::<Json>::new());

    let pro = json_lines(&cli(
        &s,
        &[
            "org",
            "list",
            "--all",
            "--page-size",
            "1",
            "--filter",
            r#"NOT public_metadata.tier = "free""#,
        ],
        None,
    ));
    assert_eq!(
        each(&pro, "organization_id"),
        [&json!("org_a"), &json!("org_c")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_prints_every_record_once_per_line_sqlite() {
    list_all_prints_every_record_once_per_line(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_prints_every_record_once_per_line_postgres() {
    list_all_prints_every_record_once_per_line(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_filter_exits_67_and_names_the_column() {
    let s = start(Backend::Sqlite).await.unwrap();
    merge(&s, "user", "user_1", r#"{"plan":"gold"}"#);
    let bare_word = "public_metadata.plan = gold";
    for args in [
        &["user", "list", "--filter", bare_word][..],
        &["user", "list", "--all", "--filter", bare_word],
    ] {
        let out = cli(&s, args, None);
        assert_grpc_error(
            &out,
            3,
            "InvalidArgument",
            &["filter: expected a value", "found `gold` at column 24"],
        );
    }
    // Organizations have no unsafe metadata.
    let out = cli(&s, &["org", "list", "--filter", "unsafe_metadata:*"], None);
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["filter: unknown field `unsafe_metadata`", "at column 1"],
    );
    let long = format!("{GOLD}{}", " OR public_metadata.a = 1".repeat(90));
    let out = cli(&s, &["user", "list", "--filter", &long], None);
    assert_grpc_error(&out, 3, "InvalidArgument", &["filter: ", "2048 bytes"]);
    // Watch refuses it before streaming.
    let watch = [
        "user",
        "watch",
        "--filter",
        "public_metadata.plan =",
        "--max-events",
        "1",
    ];
    let out = cli_within(&s, &watch, Duration::from_secs(30)).await;
    assert_grpc_error(&out, 3, "InvalidArgument", &["filter: ", "at column 23"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filter_prints_only_the_events_that_match() {
    let s = start(Backend::Sqlite).await.unwrap();
    merge(&s, "user", "user_1", r#"{"plan":"gold","seats":1}"#); // 1: enters gold
    merge(&s, "user", "user_2", r#"{"plan":"free"}"#); // 2
    merge(&s, "user", "user_1", r#"{"seats":2}"#); // 3: changes inside gold
    merge(&s, "user", "user_1", r#"{"plan":"free"}"#); // 4: leaves gold
    merge(&s, "user", "user_2", r#"{"seats":9}"#); // 5
    merge(&s, "user", "user_2", r#"{"plan":"gold"}"#); // 6: enters gold
    json_out(&cli(&s, &["user", "delete", "user_2"], None)); // 7: leaves gold
    json_out(&cli(&s, &["user", "delete", "user_1"], None)); // 8

    let limit = Duration::from_secs(30);
    let watch = |filter: &'static str, ids: &'static [&'static str], count: usize| {
        let count = count.to_string();
        let s = &s;
        async move {
            let mut args = vec!["user", "watch"];
            args.extend_from_slice(ids);
            args.extend(["--from-revision", "1", "--filter", filter]);
            args.extend(["--max-events", &count]);
            json_lines(&cli_within(s, &args, limit).await)
        }
    };
    let revisions = |events: &[Json]| -> Vec<u64> {
        events
            .iter()
            .map(|e| e["revision"].as_u64().unwrap())
            .collect()
    };

    // Entering, inside and leaving: the before or the after matches.
    let gold = watch(GOLD, &[], 5).await;
    assert_eq!(revisions(&gold), [1, 3, 4, 6, 7], "{gold:?}");
    assert_eq!(
        each(&gold, "change_type")[4],
        &json!("CHANGE_TYPE_DELETED"),
        "{gold:?}"
    );
    // The empty side of a first write or a delete matches nothing, not
    // even a negated filter: the creation of user_1 (1) and the deletion
    // of user_2 (7) are not sent.
    let not_gold = watch(r#"NOT public_metadata.plan = "gold""#, &[], 5).await;
    assert_eq!(revisions(&not_gold), [2, 4, 5, 6, 8], "{not_gold:?}");
    // ANDed with the ids.
    let user_1 = watch(GOLD, &["user_1"], 3).await;
    assert_eq!(revisions(&user_1), [1, 3, 4], "{user_1:?}");
    assert!(
        user_1.iter().all(|e| e["user_id"] == "user_1"),
        "{user_1:?}"
    );
    // A stream past the history waits for the next matching event: the
    // ones written below, whether it connects before they commit or after
    // (it starts at revision 5 either way).
    let waiting = tokio::spawn({
        let args: Vec<String> = [
            "user",
            "watch",
            "--from-revision",
            "5",
            "--filter",
            GOLD,
            "--max-events",
            "3",
            "--addr",
            &s.url(),
        ]
        .map(String::from)
        .to_vec();
        async move {
            tokio::process::Command::new(BIN)
                .args(&args)
                .env_remove("METADATA_TOKEN")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .unwrap()
        }
    });
    merge(&s, "user", "user_3", r#"{"plan":"free"}"#); // 9
    merge(&s, "user", "user_3", r#"{"plan":"gold"}"#); // 10: enters gold
    let live = tokio::time::timeout(limit, waiting)
        .await
        .expect("the stream ends after 3 events")
        .unwrap();
    assert_eq!(revisions(&json_lines(&live)), [6, 7, 10], "{live:?}");
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
    // The schema subcommands send it too.
    let got = json_out(&run(&["schema", "get", "user", "public"], &env, None));
    assert_eq!(got["version"], json!(0), "{got}");
    let out = run(
        &["schema", "get", "user", "public", "--addr", &url],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(64 + 16), "UNAUTHENTICATED: {out:?}");
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
        self.run(scheme, action, flags, None)
    }

    /// [`TlsSetup::cli`] with `stdin`.
    fn run(&self, scheme: &str, action: &[&str], flags: &[&str], stdin: Option<&str>) -> Output {
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
        run(&args, &[], stdin)
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
    let set = ["schema", "set", "user", "public", "--file", "-"];
    let schema = json_out(&tls.run("https", &set, flags, Some(r#"{"type":"object"}"#)));
    assert_eq!(schema["version"], json!(1), "{schema}");
    let deleted = json_out(&tls.cli("https", &["schema", "delete", "user", "public"], flags));
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

/// What README's worked example declares for `unsafe_metadata`.
const UNSAFE_SCHEMA: &str = r#"{"type":"object","properties":{"theme":{"enum":["light","dark"]},"age":{"type":"integer","minimum":0}},"additionalProperties":false}"#;

/// `schema <args...>`, which must succeed, printing one JSON document.
fn schema(s: &TestServer, args: &[&str], stdin: Option<&str>) -> Json {
    json_out(&cli(s, &[&["schema"][..], args].concat(), stdin))
}

async fn schema_set_get_delete(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    // Never set: an empty schema, version 0, no time.
    let none = schema(&s, &["get", "user", "unsafe"], None);
    assert_eq!(
        none,
        json!({
            "kind": "METADATA_KIND_USER",
            "field": "METADATA_FIELD_UNSAFE",
            "schema": {},
            "version": 0,
            "updated_at": null,
        })
    );

    // From a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unsafe-schema.json");
    std::fs::write(&file, UNSAFE_SCHEMA).unwrap();
    let file = file.display().to_string();
    let set = schema(&s, &["set", "user", "unsafe", "--file", &file], None);
    let declared: Json = serde_json::from_str(UNSAFE_SCHEMA).unwrap();
    assert_eq!(set["schema"], declared, "{set}");
    assert_eq!(set["version"], json!(1), "{set}");
    assert_eq!(set["kind"], json!("METADATA_KIND_USER"), "{set}");
    assert_eq!(set["field"], json!("METADATA_FIELD_UNSAFE"), "{set}");
    let updated_at = set["updated_at"].as_str().expect("updated_at is set");
    chrono::DateTime::parse_from_rfc3339(updated_at).unwrap();
    assert_eq!(schema(&s, &["get", "user", "unsafe"], None), set);

    // A write that breaks it: exit 67, the violations, nothing written.
    let merge_unsafe = ["user", "merge", "user_1", "--unsafe"];
    let out = cli(&s, &[&merge_unsafe[..], &[r#"{"age":-3}"#]].concat(), None);
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["unsafe_metadata/age: -3 is less than the minimum of 0"],
    );
    let out = cli(
        &s,
        &[&merge_unsafe[..], &[r#"{"age":-3,"theme":"pink"}"#]].concat(),
        None,
    );
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &[
            "unsafe_metadata/age: -3 is less than the minimum of 0; unsafe_metadata/theme: ",
            "(enum)",
        ],
    );
    let got = json_out(&cli(&s, &["user", "get", "user_1"], None));
    assert_eq!(got["version"], json!(0), "nothing was written: {got}");
    let merged = json_out(&cli(
        &s,
        &[&merge_unsafe[..], &[r#"{"age":36,"theme":"dark"}"#]].concat(),
        None,
    ));
    assert_eq!(
        merged["unsafe_metadata"],
        json!({"age": 36, "theme": "dark"})
    );
    // Other fields have no schema.
    merge(&s, "user", "user_1", r#"{"age":-3}"#);

    // From standard input: a dry run answers as SetSchema would (the next
    // version) and stores nothing.
    let stricter = r#"{"type":"object","required":["theme"]}"#;
    let set_stdin = ["set", "user", "unsafe", "--file", "-"];
    let dry = schema(
        &s,
        &[&set_stdin[..], &["--validate-only"]].concat(),
        Some(stricter),
    );
    assert_eq!(dry["version"], json!(2), "{dry}");
    assert_eq!(
        dry["schema"],
        json!({"type": "object", "required": ["theme"]})
    );
    assert_eq!(schema(&s, &["get", "user", "unsafe"], None), set);
    let stored = schema(
        &s,
        &[&set_stdin[..], &["--expected-version", "1"]].concat(),
        Some(stricter),
    );
    assert_eq!(stored["version"], json!(2), "{stored}");
    assert_eq!(stored["schema"], dry["schema"]);
    let out = cli(
        &s,
        &[&["schema"][..], &set_stdin, &["--expected-version", "1"]].concat(),
        Some(stricter),
    );
    assert_grpc_error(&out, 10, "Aborted", &["expected version 1"]);

    // Delete: once it existed, then not; the version moved once.
    let deleted = schema(
        &s,
        &["delete", "user", "unsafe", "--expected-version", "2"],
        None,
    );
    assert_eq!(deleted, json!({"existed": true}));
    let deleted = schema(&s, &["delete", "user", "unsafe"], None);
    assert_eq!(deleted, json!({"existed": false}));
    let gone = schema(&s, &["get", "user", "unsafe"], None);
    assert_eq!(gone["schema"], json!({}), "{gone}");
    assert_eq!(gone["version"], json!(3), "{gone}");
    // Nothing checks the field now.
    let merged = json_out(&cli(
        &s,
        &[&merge_unsafe[..], &[r#"{"age":-3}"#]].concat(),
        None,
    ));
    assert_eq!(merged["unsafe_metadata"]["age"], json!(-3));

    // Organizations: public and private.
    let org = schema(
        &s,
        &["set", "org", "public", "--file", "-"],
        Some(r#"{"properties":{"tier":{"type":"string"}}}"#),
    );
    assert_eq!(org["kind"], json!("METADATA_KIND_ORGANIZATION"), "{org}");
    assert_eq!(org["field"], json!("METADATA_FIELD_PUBLIC"), "{org}");
    let out = cli(
        &s,
        &["org", "merge", "org_1", "--public", r#"{"tier":1}"#],
        None,
    );
    assert_grpc_error(&out, 3, "InvalidArgument", &["public_metadata/tier: "]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_set_get_delete_sqlite() {
    schema_set_get_delete(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_set_get_delete_postgres() {
    schema_set_get_delete(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_refusals_and_their_exit_statuses() {
    let s = start(Backend::Sqlite).await.unwrap();
    // Bad input is exit 2, found before any call: JSON with its position,
    // not an object, no such file, no --file.
    for (stdin, message) in [
        (
            "{\n  \"type\": nope}",
            "--file: invalid JSON: expected ident at line 2 column 12",
        ),
        ("true", "--file: a schema must be a JSON object"),
    ] {
        let out = cli(
            &s,
            &["schema", "set", "user", "public", "--file", "-"],
            Some(stdin),
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }
    let missing = [
        "schema",
        "set",
        "user",
        "public",
        "--file",
        "/nonexistent/s.json",
    ];
    let out = cli(&s, &missing, None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--file: cannot read /nonexistent/s.json"),
        "{out:?}"
    );
    for args in [
        &["schema", "set", "user", "public"][..],
        &["schema", "get", "user", "secret"],
        &["schema", "get", "team", "public"],
    ] {
        let out = cli(&s, args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let nowhere = [
        "schema",
        "set",
        "user",
        "public",
        "--file",
        "-",
        "--addr",
        "http://127.0.0.1:9",
    ];
    let out = run(&nowhere, &[], Some("[]"));
    assert_eq!(
        out.status.code(),
        Some(2),
        "checked before connecting: {out:?}"
    );
    let got = schema(&s, &["get", "user", "public"], None);
    assert_eq!(got["version"], json!(0), "nothing was set: {got}");

    // The server's refusals: 64 + the code.
    let out = cli(
        &s,
        &["schema", "set", "org", "unsafe", "--file", "-"],
        Some("{}"),
    );
    assert_grpc_error(
        &out,
        3,
        "InvalidArgument",
        &["field: is not a field of organization"],
    );
    let out = cli(&s, &["schema", "get", "org", "unsafe"], None);
    assert_grpc_error(&out, 3, "InvalidArgument", &["field: "]);
    let out = cli(
        &s,
        &["schema", "set", "user", "public", "--file", "-"],
        Some(r#"{"$schema":"https://example.com/my-draft"}"#),
    );
    assert_grpc_error(&out, 3, "InvalidArgument", &["schema: ", "$schema"]);
    let out = cli(
        &s,
        &["schema", "set", "user", "public", "--file", "-"],
        Some(r#"{"$ref":"https://example.com/schema.json"}"#),
    );
    assert_grpc_error(&out, 3, "InvalidArgument", &["schema: "]);
    // A `$ref` within the document is fine.
    let local_ref =
        r##"{"$defs":{"n":{"type":"integer"}},"properties":{"n":{"$ref":"#/$defs/n"}}}"##;
    let set = schema(
        &s,
        &["set", "user", "private", "--file", "-"],
        Some(local_ref),
    );
    assert_eq!(set["version"], json!(1), "{set}");
    let private = ["user", "merge", "user_9", "--private", r#"{"n":"x"}"#];
    let out = cli(&s, &private, None);
    assert_grpc_error(&out, 3, "InvalidArgument", &["private_metadata/n: "]);

    // Stored values that break the schema, in a dry run and for real.
    merge(&s, "user", "user_2", r#"{"plan":7}"#);
    merge(&s, "user", "user_1", r#"{"plan":8}"#);
    merge(&s, "user", "user_3", r#"{"plan":"gold"}"#);
    let plan = r#"{"properties":{"plan":{"type":"string"}}}"#;
    for extra in [&["--validate-only"][..], &[]] {
        let args = [
            &["schema", "set", "user", "public", "--file", "-"][..],
            extra,
        ]
        .concat();
        let out = cli(&s, &args, Some(plan));
        assert_grpc_error(
            &out,
            9,
            "FailedPrecondition",
            &[
                "2 stored user public_metadata value(s) do not conform to the schema (ids: user_1, user_2); change them first",
            ],
        );
    }
    let got = schema(&s, &["get", "user", "public"], None);
    assert_eq!(got["version"], json!(0), "nothing was set: {got}");
}

/// `txn --file FILE|-`: a CommitRequest as JSON (camelCase or the proto's
/// names), answered with every result in order; a refused operation exits
/// 64 + ABORTED and writes nothing; JSON that is not a CommitRequest is bad
/// input (exit 2) before any call; `--request-id` makes a retry answer the
/// first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_commits_from_a_file_or_standard_input() {
    let s = start(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("move.json");
    std::fs::write(
        &file,
        r#"{"operations": [
            {"mergeUser": {"userId": "u1", "publicMetadata": {"org": "o1"}}},
            {"merge_organization": {"organization_id": "o1", "public_metadata": {"seats": 1}}},
            {"deleteUser": {"userId": "nobody"}}
        ]}"#,
    )
    .unwrap();
    let done = json_out(&cli(&s, &["txn", "--file", file.to_str().unwrap()], None));
    assert_eq!(done["revision"], json!(2));
    assert_eq!(done["results"][0]["user_id"], json!("u1"));
    assert_eq!(done["results"][0]["public_metadata"], json!({"org": "o1"}));
    assert_eq!(done["results"][1]["organization_id"], json!("o1"));
    assert_eq!(done["results"][2], json!({"deleted": {"existed": false}}));
    assert_eq!(done["transaction_id"].as_str().unwrap().len(), 36);

    let refused = r#"{"operations": [
        {"mergeUser": {"userId": "u2", "publicMetadata": {"a": 1}}},
        {"patchOrganization": {"organizationId": "o1",
            "publicMetadata": [{"op": "test", "path": "/seats", "value": 9}]}}
    ]}"#;
    let out = cli(&s, &["txn", "--file", "-"], Some(refused));
    assert_eq!(out.status.code(), Some(64 + 10), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PATCH_TEST_FAILED"), "{stderr}");
    assert!(
        stderr.contains("operations[1].patch_organization"),
        "{stderr}"
    );
    let u2 = json_out(&cli(&s, &["user", "get", "u2"], None));
    assert_eq!(u2["version"], json!(0), "nothing written");

    let out = cli(&s, &["txn", "--file", "-"], Some(r#"{"operationz": []}"#));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a CommitRequest"));

    let append = r#"{"operations": [{"patchUser": {"userId": "u1",
        "publicMetadata": [{"op": "add", "path": "/n", "value": 1}]}}]}"#;
    let id = "2b7e3c1d-5f4a-4b6c-8d9e-0a1b2c3d4e5f";
    let first = json_out(&cli(
        &s,
        &["txn", "--file", "-", "--request-id", id],
        Some(append),
    ));
    let again = json_out(&cli(
        &s,
        &["txn", "--file", "-", "--request-id", id],
        Some(append),
    ));
    assert_eq!(first, again, "a retry answers the first outcome");
    assert_eq!(first["results"][0]["version"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_commands_manage_an_endpoint() {
    let s = start_with(Backend::Sqlite, |config| {
        config.webhooks.allowed = std::sync::Arc::new(
            metadata_service::webhook::AllowedNetworks::parse("127.0.0.0/8").unwrap(),
        );
    })
    .await
    .unwrap();
    let created = json_out(&cli(
        &s,
        &[
            "webhook",
            "create",
            "--url",
            "http://127.0.0.1:9/hook",
            "--description",
            "billing",
            "--event-type",
            "user.metadata.deleted",
            "--disabled",
            "true",
        ],
        None,
    ));
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    let webhook = &created["webhook"];
    let id = webhook["id"].as_str().unwrap().to_owned();
    assert_eq!(webhook["eventTypes"], json!(["user.metadata.deleted"]));
    assert_eq!(webhook["disabled"], json!(true));
    let got = json_out(&cli(&s, &["webhook", "get", &id], None));
    assert_eq!(got["description"], json!("billing"));
    assert!(!got.to_string().contains("whsec_"), "{got}");
    let updated = json_out(&cli(
        &s,
        &[
            "webhook",
            "update",
            &id,
            "--all-event-types",
            "--filter",
            "public_metadata.plan = \"pro\"",
        ],
        None,
    ));
    assert_eq!(updated.get("eventTypes"), None, "{updated}");
    assert_eq!(updated["filter"], json!("public_metadata.plan = \"pro\""));
    assert_eq!(updated["description"], json!("billing"), "left alone");
    let rotated = json_out(&cli(
        &s,
        &["webhook", "rotate-secret", &id, "--grace-period", "0s"],
        None,
    ));
    assert_ne!(rotated["secret"].as_str().unwrap(), secret);
    merge(&s, "user", "u1", r#"{"n": 1}"#);
    let replayed = json_out(&cli(
        &s,
        &["webhook", "replay", &id, "--revision", "1"],
        None,
    ));
    assert_eq!(replayed["nextRevision"], json!("1"));
    let listed = json_out(&cli(&s, &["webhook", "list"], None));
    assert_eq!(listed["webhooks"][0]["id"], json!(id));
    let nothing = cli(&s, &["webhook", "update", &id], None);
    assert_eq!(nothing.status.code(), Some(2), "{nothing:?}");
    let refused = cli(
        &s,
        &["webhook", "create", "--url", "http://10.0.0.1/hook"],
        None,
    );
    assert_grpc_error(
        &refused,
        3,
        "InvalidArgument",
        &["INVALID_WEBHOOK_URL", "webhook.url"],
    );
    let deleted = json_out(&cli(&s, &["webhook", "delete", &id], None));
    assert_eq!(deleted, json!({"existed": true}));
    let missing = cli(&s, &["webhook", "get", &id], None);
    assert_grpc_error(&missing, 5, "NotFound", &["WEBHOOK_NOT_FOUND"]);
}
