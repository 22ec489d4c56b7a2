//! Issue 28: every status the service returns carries details a program can
//! act on (`google.rpc.Status` in `grpc-status-details-bin`), decoded here
//! as any gRPC client decodes them (`tonic-types`), one test per status
//! family (UNAVAILABLE and DEADLINE_EXCEEDED of writes in `in_doubt.rs`,
//! an expired deadline and a shutdown in `service/admission.rs`); and
//! README's table of reasons is held to the code's list.

use std::collections::HashMap;
use std::time::Duration;

use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use metadata_service::proto::v1::{
    GetUserMetadataRequest, MergeUserMetadataRequest, MetadataField, MetadataKind,
    SetSchemaRequest, WatchUserMetadataRequest,
};
use metadata_service::reason::{DOMAIN, Reason};
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::{ORG, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::structure;
use crate::harness::{merge, start_with, write};

/// What a status says to a program: its reason, metadata and details.
pub(crate) struct Said {
    pub code: Code,
    pub reason: String,
    pub metadata: HashMap<String, String>,
    pub details: ErrorDetails,
}

pub(crate) fn said(status: &Status) -> Said {
    let details = status
        .check_error_details()
        .unwrap_or_else(|err| panic!("undecodable details in {status:?}: {err}"));
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, DOMAIN, "{status:?}");
    Said {
        code: status.code(),
        reason: info.reason.clone(),
        metadata: info.metadata.clone(),
        details,
    }
}

/// `status` has `reason`, and the code that reason always comes with.
pub(crate) fn expect(status: &Status, reason: Reason) -> Said {
    let said = said(status);
    assert_eq!(said.reason, reason.as_str(), "{status:?}");
    assert_eq!(said.code, reason.code(), "{status:?}");
    assert_eq!(status.code(), reason.code());
    said
}

#[tokio::test]
async fn invalid_argument_names_each_field_with_its_reason() {
    let mut s = start_with(Backend::Sqlite, |_| {}).await.unwrap();
    let status = s
        .users
        .merge(merge("u", json!({"a": {"b": ["x", "nul\u{0}"]}})))
        .await
        .unwrap_err();
    let said = expect(&status, Reason::NulInString);
    let violations = &said
        .details
        .bad_request()
        .expect("a BadRequest")
        .field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "public_metadata.a.b[1]");
    assert_eq!(violations[0].reason, "NUL_IN_STRING");
    assert!(violations[0].description.contains("U+0000"));
    assert_eq!(said.metadata["field"], "public_metadata.a.b[1]");
    // The message is the sentence it always was.
    assert!(status.message().starts_with("public_metadata.a.b[1]: "));

    let status = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "has space".into(),
            revision: None,
        })
        .await
        .unwrap_err();
    expect(&status, Reason::IdCharacter);
}

#[tokio::test]
async fn a_schema_violation_names_the_field_and_pointer() {
    let mut s = start_with(Backend::Sqlite, |_| {}).await.unwrap();
    let mut schemas = MetadataSchemaServiceClient::new(s.channel().await);
    schemas
        .set_schema(SetSchemaRequest {
            kind: MetadataKind::User as i32,
            field: MetadataField::Private as i32,
            schema: Some(structure(&json!({
                "properties": {"age": {"type": "integer", "minimum": 0},
                               "name": {"type": "string"}}
            }))),
            validate_only: false,
            expected_version: None,
        })
        .await
        .unwrap();
    let status = s
        .users
        .merge(MergeUserMetadataRequest {
            user_id: "u".into(),
            private_metadata: Some(structure(&json!({"age": -1, "name": 3}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let said = expect(&status, Reason::SchemaViolation);
    let mut fields: Vec<_> = said
        .details
        .bad_request()
        .expect("a BadRequest")
        .field_violations
        .iter()
        .map(|v| (v.field.clone(), v.reason.clone()))
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            (
                "private_metadata/age".to_owned(),
                "SCHEMA_VIOLATION".to_owned()
            ),
            (
                "private_metadata/name".to_owned(),
                "SCHEMA_VIOLATION".to_owned()
            ),
        ]
    );

    // SetSchema refused by what is stored: the documents, counted.
    write(&mut s.users, "u2", json!({"n": "text"})).await;
    let status = schemas
        .set_schema(SetSchemaRequest {
            kind: MetadataKind::User as i32,
            field: MetadataField::Public as i32,
            schema: Some(structure(
                &json!({"properties": {"n": {"type": "integer"}}}),
            )),
            validate_only: false,
            expected_version: None,
        })
        .await
        .unwrap_err();
    let said = expect(&status, Reason::NonconformingDocuments);
    assert_eq!(said.metadata["count"], "1");
    assert_eq!(said.metadata["field"], "public_metadata");
    let violations = &said
        .details
        .precondition_failure()
        .expect("a PreconditionFailure")
        .violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].subject, "user/u2");
}

#[tokio::test]
async fn a_version_mismatch_gives_both_versions() {
    let mut s = start_with(Backend::Sqlite, |_| {}).await.unwrap();
    write(&mut s.users, "u", json!({"a": 1})).await;
    let status = s
        .users
        .merge(MergeUserMetadataRequest {
            expected_version: Some(7),
            ..merge("u", json!({"a": 2}))
        })
        .await
        .unwrap_err();
    let said = expect(&status, Reason::VersionMismatch);
    assert_eq!(said.metadata["expected_version"], "7");
    assert_eq!(said.metadata["current_version"], "1");
}

#[tokio::test]
async fn a_compacted_watch_start_gives_the_oldest_revision() {
    let mut s = start_with(Backend::Sqlite, |c| {
        c.events.retention = Duration::from_millis(200);
        c.events.prune_interval = Duration::from_millis(50);
    })
    .await
    .unwrap();
    for i in 0..3 {
        write(&mut s.users, "u", json!({ "i": i })).await;
    }
    s.db.until_pruned().await;
    let status = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let said = expect(&status, Reason::RevisionCompacted);
    assert_eq!(said.metadata["requested_revision"], "1");
    assert_eq!(said.metadata["oldest_revision"], "4");
}

#[tokio::test]
async fn overload_says_when_to_retry_and_which_bound() {
    // No permit at all: every unary call is refused at once.
    let mut s = start_with(Backend::Sqlite, |c| c.max_concurrent_requests = 0)
        .await
        .unwrap();
    let status = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u".into(),
            revision: None,
        })
        .await
        .unwrap_err();
    let said = expect(&status, Reason::TooManyRequests);
    assert_eq!(said.metadata["limit"], "0");
    assert!(
        said.details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .is_some()
    );
    let quota = said.details.quota_failure().expect("a QuotaFailure");
    assert_eq!(quota.violations[0].subject, "max_concurrent_requests");
}

#[tokio::test]
async fn refused_callers_are_told_why_without_their_secret() {
    let s = start_with(Backend::Sqlite, |c| {
        c.auth = authenticator(crate::auth::SECRET)
    })
    .await
    .unwrap();
    let mut users = s.users.clone();
    let get = |id: &str| GetUserMetadataRequest {
        user_id: id.into(),
        revision: None,
    };

    let status = users.get(with_token(get(USER), None)).await.unwrap_err();
    expect(&status, Reason::MissingCredentials);
    let status = users
        .get(with_token(get(USER), Some("not-a-key")))
        .await
        .unwrap_err();
    expect(&status, Reason::UnknownApiKey);
    let expired = crate::auth::expired_session(USER);
    let status = users
        .get(with_token(get(USER), Some(&expired)))
        .await
        .unwrap_err();
    let said = expect(&status, Reason::TokenExpired);
    assert!(said.metadata.values().all(|v| !v.contains(&expired)));

    let token = session(USER, Some(ORG));
    let status = users
        .get(with_token(get("someone_else"), Some(&token)))
        .await
        .unwrap_err();
    expect(&status, Reason::NotOwnRecord);
    let status = users
        .merge(with_token(
            MergeUserMetadataRequest {
                user_id: USER.into(),
                public_metadata: Some(structure(&json!({"a": 1}))),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .unwrap_err();
    expect(&status, Reason::FieldNotWritable);
}

/// README's "Error reasons" table lists exactly the reasons the code can
/// give, in its order, each with the status it comes with.
#[test]
fn the_readme_table_and_the_code_agree() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Error reasons\n")
        .nth(1)
        .expect("README has an Error reasons section");
    let section = section.split("\n## ").next().unwrap();
    let rows: Vec<(String, String)> = section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect();
    let code: Vec<(String, String)> = Reason::ALL
        .iter()
        .map(|r| {
            (
                r.as_str().to_owned(),
                upper_snake(&format!("{:?}", r.code())),
            )
        })
        .collect();
    assert_eq!(
        rows, code,
        "README's table against Reason::ALL (reason, status)"
    );
}

/// `InvalidArgument` as gRPC spells its codes: `INVALID_ARGUMENT`.
fn upper_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The same details read from outside, by Python's grpcio-status, one call
/// per status family (INTERNAL has no call that can provoke it; its
/// mapping is the one function every status goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_status_reads_them() {
    use metadata_service::proto::v1::DeleteUserMetadataRequest;
    use prost::Message;
    use serde_json::Value as Json;

    fn call(method: &str, request: impl Message, metadata: &[(&str, &str)]) -> Json {
        json!({
            "method": format!("/metadata.v1.{method}"),
            "request_hex": hex::encode(request.encode_to_vec()),
            "metadata": metadata,
        })
    }
    let get = |id: &str| GetUserMetadataRequest {
        user_id: id.into(),
        revision: None,
    };

    // One server for what needs no special set-up, a locked database.
    let mut s = start_with(Backend::Sqlite, |c| {
        c.db_timeout = Duration::from_millis(500)
    })
    .await
    .unwrap();
    write(&mut s.users, "u", json!({"n": "text"})).await;
    let calls = vec![
        call("UserMetadataService/Get", get(""), &[]),
        call(
            "UserMetadataService/Delete",
            DeleteUserMetadataRequest {
                user_id: "u".into(),
                expected_version: Some(4),
            },
            &[],
        ),
        call(
            "MetadataSchemaService/SetSchema",
            SetSchemaRequest {
                kind: MetadataKind::User as i32,
                field: MetadataField::Public as i32,
                schema: Some(structure(
                    &json!({"properties": {"n": {"type": "integer"}}}),
                )),
                validate_only: false,
                expected_version: None,
            },
            &[],
        ),
        call(
            "UserMetadataService/Get",
            GetUserMetadataRequest {
                user_id: "u".into(),
                revision: Some(999),
            },
            &[],
        ),
    ];
    let Some(mut answers) = python(s.addr, &calls).await else {
        return;
    };
    let lock = crate::integrity::SqliteLock::take(&s).await;
    let mut with_deadline = call(
        "UserMetadataService/Merge",
        merge("u", json!({"c": 1})),
        &[],
    );
    // Shorter than --db-timeout: the server answers for the client's
    // deadline, a little before it.
    with_deadline["timeout"] = json!(0.3);
    let locked = vec![
        call(
            "UserMetadataService/Merge",
            merge("u", json!({"b": 1})),
            &[],
        ),
        with_deadline,
    ];
    answers.extend(python(s.addr, &locked).await.unwrap());
    lock.release().await;

    let overloaded = start_with(Backend::Sqlite, |c| c.max_concurrent_requests = 0)
        .await
        .unwrap();
    answers.extend(
        python(
            overloaded.addr,
            &[call("UserMetadataService/Get", get("u"), &[])],
        )
        .await
        .unwrap(),
    );

    let secured = start_with(Backend::Sqlite, |c| {
        c.auth = authenticator(crate::auth::SECRET)
    })
    .await
    .unwrap();
    let token = format!("Bearer {}", session(USER, Some(ORG)));
    answers.extend(
        python(
            secured.addr,
            &[
                call("UserMetadataService/Get", get(USER), &[]),
                call(
                    "UserMetadataService/Get",
                    get("another"),
                    &[("authorization", &token)],
                ),
            ],
        )
        .await
        .unwrap(),
    );

    let expected = [
        ("INVALID_ARGUMENT", "EMPTY_ID"),
        ("ABORTED", "VERSION_MISMATCH"),
        ("FAILED_PRECONDITION", "NONCONFORMING_DOCUMENTS"),
        ("OUT_OF_RANGE", "REVISION_NOT_REACHED"),
        ("UNAVAILABLE", "DATABASE_TIMEOUT"),
        ("DEADLINE_EXCEEDED", "DEADLINE_EXPIRED"),
        ("RESOURCE_EXHAUSTED", "TOO_MANY_REQUESTS"),
        ("UNAUTHENTICATED", "MISSING_CREDENTIALS"),
        ("PERMISSION_DENIED", "NOT_OWN_RECORD"),
    ];
    assert_eq!(answers.len(), expected.len(), "{answers:#?}");
    for (answer, (code, reason)) in answers.iter().zip(expected) {
        assert_eq!(answer["code"], code, "{answer}");
        let info = answer["details"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["type"] == "ErrorInfo"))
            .unwrap_or_else(|| panic!("no ErrorInfo: {answer}"));
        assert_eq!(info["reason"], reason, "{answer}");
        assert_eq!(info["domain"], DOMAIN, "{answer}");
    }
    let kinds = |i: usize| -> Vec<String> {
        answers[i]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(answers[0]["details"][1]["fields"][0]["field"], "user_id");
    assert_eq!(answers[1]["details"][0]["metadata"]["current_version"], "1");
    assert!(kinds(2).contains(&"PreconditionFailure".to_owned()));
    assert_eq!(
        answers[3]["details"][0]["metadata"]["current_revision"],
        "1"
    );
    assert!(kinds(4).contains(&"RetryInfo".to_owned()));
    assert!(kinds(6).contains(&"QuotaFailure".to_owned()));
}

/// Runs `calls` against `addr` through `tests/fixtures/status_details.py`;
/// None (with the reason printed) when Python lacks grpcio or
/// grpcio-status, unless METADATA_REQUIRE_GRPCIO is set.
async fn python(
    addr: std::net::SocketAddr,
    calls: &[serde_json::Value],
) -> Option<Vec<serde_json::Value>> {
    use tokio::io::AsyncWriteExt;
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_status"])
        .output()
        .await;
    if !probe.as_ref().is_ok_and(|out| out.status.success()) {
        assert!(
            std::env::var_os("METADATA_REQUIRE_GRPCIO").is_none(),
            "METADATA_REQUIRE_GRPCIO is set but python3 cannot import grpc and grpc_status: \
             {probe:?}"
        );
        eprintln!("skipped: pip install grpcio grpcio-status");
        return None;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/status_details.py"
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python3");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(serde_json::to_string(calls).unwrap().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the Python client finishes")
        .unwrap();
    assert!(out.status.success(), "status_details.py failed: {out:?}");
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect(),
    )
}
