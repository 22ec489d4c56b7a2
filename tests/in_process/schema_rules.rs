//! Schemas for metadata fields (issue 18), the contract in process: how
//! writes are held to a field's schema (as the field will be stored, the
//! fields a write provides only, nothing written and no event when
//! refused, the messages), SetSchema's checks of the schema and of the
//! stored values, validate_only, versions, who may call, and that schema
//! changes are neither Watch events nor unlabelled in the metrics. The
//! races with writes and replicas are in `schemas.rs`.

use std::time::{Duration, Instant};

use metadata_service::model::Field;
use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use metadata_service::proto::v1::{
    DeleteSchemaRequest, GetSchemaRequest, MetadataField, MetadataKind, MetadataSchema,
    SetSchemaRequest,
};
use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::{BACKEND_KEY, SECRET, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::{json, structure};
use crate::common::wait::until;
use crate::harness::{TestServer, capture_logs, start, start_with, users_in_flight};
use crate::kinds::{Delete, Get, Kind, Merge, Record, Replace, Watch, WatchMessage, WatchStream};

type Schemas = MetadataSchemaServiceClient<Channel>;

async fn schemas(s: &TestServer) -> Schemas {
    Schemas::new(s.channel().await)
}

fn proto_kind(kind: Kind) -> i32 {
    match kind {
        Kind::User => MetadataKind::User as i32,
        Kind::Organization => MetadataKind::Organization as i32,
    }
}

fn proto_field(field: Field) -> i32 {
    match field {
        Field::Public => MetadataField::Public as i32,
        Field::Private => MetadataField::Private as i32,
        Field::Unsafe => MetadataField::Unsafe as i32,
    }
}

fn set_request(kind: Kind, field: Field, schema: &Json) -> SetSchemaRequest {
    SetSchemaRequest {
        kind: proto_kind(kind),
        field: proto_field(field),
        schema: Some(structure(schema)),
        validate_only: false,
        expected_version: None,
    }
}

fn validate_request(kind: Kind, field: Field, schema: &Json) -> SetSchemaRequest {
    SetSchemaRequest {
        validate_only: true,
        ..set_request(kind, field, schema)
    }
}

fn get_request(kind: Kind, field: Field) -> GetSchemaRequest {
    GetSchemaRequest {
        kind: proto_kind(kind),
        field: proto_field(field),
    }
}

fn delete_request(kind: Kind, field: Field, expected_version: Option<u64>) -> DeleteSchemaRequest {
    DeleteSchemaRequest {
        kind: proto_kind(kind),
        field: proto_field(field),
        expected_version,
    }
}

/// SetSchema, which must succeed.
async fn set(client: &mut Schemas, kind: Kind, field: Field, schema: Json) -> MetadataSchema {
    client
        .set_schema(set_request(kind, field, &schema))
        .await
        .unwrap_or_else(|err| panic!("SetSchema {kind:?} {field:?} {schema}: {err:?}"))
        .into_inner()
}

async fn get(client: &mut Schemas, kind: Kind, field: Field) -> MetadataSchema {
    client
        .get_schema(get_request(kind, field))
        .await
        .expect("GetSchema")
        .into_inner()
}

/// The schema of a MetadataSchema as JSON; `{}` when empty or absent.
fn schema_json(schema: &MetadataSchema) -> Json {
    let fields = schema.schema.clone().unwrap_or_default().fields;
    Json::Object(fields.iter().map(|(k, v)| (k.clone(), json(v))).collect())
}

/// The error of `result`, which must have `code` and a message containing
/// each of `says`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, says: &[&str]) -> Status {
    let status = match result {
        Ok(ok) => panic!("expected {code:?}, got {ok:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for part in says {
        assert!(
            status.message().contains(part),
            "{:?} lacks {part:?}",
            status.message()
        );
    }
    status
}

/// The parts of a violation message (violations are joined by "; ").
fn parts(message: &str) -> Vec<&str> {
    message.split("; ").collect()
}

async fn stored(s: &TestServer, kind: Kind, id: &str) -> Record {
    kind.client(s).get(Get::new(id)).await.expect("get")
}

/// The stored value of `field` of `id`.
async fn stored_field(s: &TestServer, kind: Kind, id: &str, field: Field) -> Json {
    let record = stored(s, kind, id).await;
    json(record.field(field).expect("the backend sees every field"))
}

/// A Watch of every id of `kind` from now, past its first progress.
async fn watch_from_now(s: &TestServer, kind: Kind) -> WatchStream {
    let mut stream = kind.client(s).watch(Watch).await.expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(
        matches!(first, Ok(Ok(Some(WatchMessage::Progress(_))))),
        "{first:?}"
    );
    stream
}

/// Nothing but progress arrives on `stream` within `wait`.
async fn assert_quiet(stream: &mut WatchStream, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await {
        match message.expect("stream healthy") {
            Some(WatchMessage::Event(revision)) => panic!("unexpected event at {revision}"),
            Some(WatchMessage::Progress(_)) => {}
            None => panic!("the stream ended"),
        }
    }
}

/// The next event's revision on `stream`, skipping progress.
async fn next_event(stream: &mut WatchStream) -> u64 {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a message within 10 s")
            .expect("stream healthy")
            .expect("stream open");
        if let WatchMessage::Event(revision) = message {
            return revision;
        }
    }
}

/// What an age in `field` must be: an object whose `age`, if any, is a
/// non-negative integer.
fn ages() -> Json {
    json!({
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0}},
    })
}

/// An object with a string `name`.
fn named() -> Json {
    json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
    })
}

// ---------------------------------------------------------------------------
// Enforcement

/// A Merge is checked on the field as it will be stored: a patch that is
/// fine on its own but deletes a required key (null) is refused; one that
/// keeps it is accepted though it does not repeat it. Every field of both
/// kinds.
async fn merge_checks_the_field_as_it_will_be_stored(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    for &field in kind.fields() {
        let id = format!("r-{}", field.name());
        client
            .merge(Merge::new(&id).json(field, json!({"name": "Ada"})))
            .await
            .unwrap();
        set(&mut schemas, kind, field, named()).await;

        // `name` is not in the patch but stays in the result.
        let kept = client
            .merge(Merge::new(&id).json(field, json!({"plan": "pro"})))
            .await
            .expect("the result keeps its name");
        assert_eq!(kept.version, 2);

        let err = refused(
            client
                .merge(Merge::new(&id).json(field, json!({"name": null})))
                .await,
            Code::InvalidArgument,
            &[],
        );
        assert_eq!(
            err.message(),
            format!("{}: \"name\" is a required property", field.name())
        );
        let err = refused(
            client
                .merge(Merge::new(&id).json(field, json!({"name": 5})))
                .await,
            Code::InvalidArgument,
            &[],
        );
        assert_eq!(
            err.message(),
            format!("{}/name: 5 is not of type \"string\"", field.name())
        );
        // A Replace is its value as given: the stored name does not help.
        refused(
            client
                .replace(Replace::new(&id).json(field, json!({"plan": "pro"})))
                .await,
            Code::InvalidArgument,
            &["is a required property"],
        );
        assert_eq!(
            stored_field(&s, kind, &id, field).await,
            json!({"name": "Ada", "plan": "pro"})
        );
        assert_eq!(stored(&s, kind, &id).await.version, 2);
    }
}

/// A Replace with null stores JSON null, and that null is what is checked:
/// refused when the schema wants an object, accepted when it allows null.
async fn replace_with_null_checks_json_null(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    set(&mut schemas, kind, Field::Public, json!({"type": "object"})).await;
    set(
        &mut schemas,
        kind,
        Field::Private,
        json!({"type": ["object", "null"]}),
    )
    .await;
    client
        .merge(Merge::new("r").public(json!({"a": 1})))
        .await
        .unwrap();

    let err = refused(
        client.replace(Replace::new("r").public(Json::Null)).await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(
        err.message(),
        "public_metadata: null is not of type \"object\""
    );
    assert_eq!(
        stored_field(&s, kind, "r", Field::Public).await,
        json!({"a": 1})
    );

    let replaced = client
        .replace(Replace::new("r").private(Json::Null))
        .await
        .expect("null is allowed in private");
    assert_eq!(replaced.version, 2);
    assert_eq!(
        stored_field(&s, kind, "r", Field::Private).await,
        Json::Null
    );
    // Both in one write: the refused field refuses the whole write.
    refused(
        client
            .replace(
                Replace::new("r")
                    .public(Json::Null)
                    .private(json!({"b": 2})),
            )
            .await,
        Code::InvalidArgument,
        &["public_metadata: null"],
    );
    assert_eq!(
        stored_field(&s, kind, "r", Field::Private).await,
        Json::Null
    );
}

/// Only the fields a write provides are checked. A record whose public
/// metadata is `{}` (never written, so no SetSchema check stopped it) does
/// not conform to a schema requiring `name`; writes of its other fields go
/// on, while any write providing public, even an empty patch, is checked.
async fn fields_a_write_does_not_provide_are_not_checked(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    client
        .merge(Merge::new("old").private(json!({"k": 0})))
        .await
        .unwrap();
    // `{}` is exempt from SetSchema's check of stored values.
    set(&mut schemas, kind, Field::Public, named()).await;

    let merged = client
        .merge(Merge::new("old").private(json!({"k": 1})))
        .await
        .expect("public is not provided");
    assert_eq!(merged.version, 2);
    assert_eq!(merged.fields().0, json!({}), "nonconforming, unchecked");
    client
        .replace(Replace::new("old").private(json!({"k": 2})))
        .await
        .expect("public is not provided");
    // A first write of another field: public starts as `{}`.
    let new = client
        .merge(Merge::new("new").private(json!({"k": 1})))
        .await
        .expect("public is not provided");
    assert_eq!(new.version, 1);
    if kind == Kind::User {
        client
            .merge(Merge::new("old").unsafe_(json!({"theme": "dark"})))
            .await
            .expect("public is not provided");
    }

    // Provided, even as a patch that changes nothing: checked.
    refused(
        client.merge(Merge::new("old").public(json!({}))).await,
        Code::InvalidArgument,
        &["public_metadata: \"name\" is a required property"],
    );
    refused(
        client
            .merge(
                Merge::new("old")
                    .public(json!({"x": 1}))
                    .private(json!({"k": 9})),
            )
            .await,
        Code::InvalidArgument,
        &["public_metadata: "],
    );
    let old = stored(&s, kind, "old").await;
    assert_eq!(old.version, kind.users_only(4).unwrap_or(3));
    assert_eq!(old.fields().1, json!({"k": 2}));
    client
        .merge(Merge::new("old").public(json!({"name": "Ada"})))
        .await
        .expect("now it conforms");
}

/// A refused write is INVALID_ARGUMENT, writes nothing (value, version and
/// revision unchanged), and emits no event: a Watch opened before stays
/// quiet, the event table has no new change, and the next write's event
/// follows the last one.
async fn a_refused_write_changes_nothing_and_emits_no_event(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    let field = Field::Private;
    let before = client
        .merge(Merge::new("r").private(json!({"age": 1})))
        .await
        .unwrap();
    set(&mut schemas, kind, field, ages()).await;
    let mut stream = watch_from_now(&s, kind).await;
    let events_before = s.db.event_revisions().await;

    let err = refused(
        client
            .merge(Merge::new("r").private(json!({"age": -3})))
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(
        err.message(),
        "private_metadata/age: -3 is less than the minimum of 0"
    );
    refused(
        client
            .replace(Replace::new("r").private(json!({"age": "ten"})))
            .await,
        Code::InvalidArgument,
        &["private_metadata/age: \"ten\" is not of type \"integer\""],
    );
    // With a conforming public in the same write: nothing of it either.
    refused(
        client
            .merge(
                Merge::new("r")
                    .public(json!({"plan": "pro"}))
                    .private(json!({"age": 1.5})),
            )
            .await,
        Code::InvalidArgument,
        &["private_metadata/age: 1.5"],
    );
    // A refused first write creates nothing.
    refused(
        client
            .merge(Merge::new("fresh").private(json!({"age": -1})))
            .await,
        Code::InvalidArgument,
        &[],
    );

    assert_eq!(stored(&s, kind, "r").await, before, "nothing written");
    assert_eq!(stored(&s, kind, "fresh").await.version, 0);
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
    assert_eq!(s.db.event_revisions().await, events_before);

    let next = client
        .merge(Merge::new("r").private(json!({"age": 2})))
        .await
        .expect("conforms");
    assert_eq!(next.version, before.version + 1);
    assert_eq!(next_event(&mut stream).await, next.revision);
    assert_eq!(next.revision, events_before.last().unwrap() + 1);
}

/// A write that breaks two (users: three) provided fields lists each;
/// a write where only one breaks its schema names that one only.
async fn a_write_breaking_several_fields_lists_each(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    for &field in kind.fields() {
        set(&mut schemas, kind, field, ages()).await;
    }
    let mut merge = Merge::new("r");
    let mut replace = Replace::new("r");
    for &field in kind.fields() {
        merge = merge.json(field, json!({"age": -1}));
        replace = replace.json(field, json!({"age": "x"}));
    }
    for err in [
        refused(client.merge(merge).await, Code::InvalidArgument, &[]),
        refused(client.replace(replace).await, Code::InvalidArgument, &[]),
    ] {
        let listed = parts(err.message());
        assert_eq!(listed.len(), kind.fields().len(), "{listed:?}");
        for &field in kind.fields() {
            let prefix = format!("{}/age: ", field.name());
            assert_eq!(
                listed.iter().filter(|p| p.starts_with(&prefix)).count(),
                1,
                "{prefix} in {listed:?}"
            );
        }
    }
    let one = refused(
        client
            .merge(
                Merge::new("r")
                    .public(json!({"age": 3}))
                    .private(json!({"age": -4})),
            )
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(
        one.message(),
        "private_metadata/age: -4 is less than the minimum of 0"
    );
    assert_eq!(stored(&s, kind, "r").await.version, 0);
}

/// The message: `field/pointer: what (keyword)`, the keyword added where
/// the crate's message lacks it (enum, additionalProperties); nested
/// pointers; `required` at the field's root.
async fn violations_name_field_pointer_and_keyword(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = Kind::User.client(&s);
    let mut schemas = schemas(&s).await;
    set(
        &mut schemas,
        Kind::User,
        Field::Unsafe,
        json!({
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0},
                "theme": {"enum": ["light", "dark"]},
                "prefs": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {"langs": {"type": "array", "items": {"type": "string"}}},
                },
            },
        }),
    )
    .await;
    let mut refusal = async |patch: Json| -> String {
        let result = client.merge(Merge::new("u").unsafe_(patch)).await;
        refused(result, Code::InvalidArgument, &[])
            .message()
            .to_owned()
    };
    assert_eq!(
        refusal(json!({"age": -3})).await,
        "unsafe_metadata/age: -3 is less than the minimum of 0"
    );
    let theme = refusal(json!({"theme": "pink"})).await;
    assert!(theme.starts_with("unsafe_metadata/theme: "), "{theme}");
    assert!(theme.contains("\"pink\""), "{theme}");
    assert!(theme.ends_with(" (enum)"), "{theme}");
    let extra = refusal(json!({"prefs": {"font": "serif"}})).await;
    assert!(extra.starts_with("unsafe_metadata/prefs: "), "{extra}");
    assert!(extra.contains("'font'"), "{extra}");
    assert!(extra.ends_with(" (additionalProperties)"), "{extra}");
    assert_eq!(
        refusal(json!({"prefs": {"langs": ["en", 7]}})).await,
        "unsafe_metadata/prefs/langs/1: 7 is not of type \"string\""
    );
    // A key with '/' or '~' is escaped in the pointer.
    set(
        &mut schemas,
        Kind::User,
        Field::Public,
        json!({"additionalProperties": {"type": "string"}}),
    )
    .await;
    let err = refused(
        client
            .merge(Merge::new("u").public(json!({"a/b~c": 1})))
            .await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(
        err.message(),
        "public_metadata/a~1b~0c: 1 is not of type \"string\""
    );
}

/// At most five violations are listed, in one field or across fields.
async fn at_most_five_violations_are_listed(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = Kind::User.client(&s);
    let mut schemas = schemas(&s).await;
    let strings = json!({"additionalProperties": {"type": "string"}});
    for field in Field::ALL {
        set(&mut schemas, Kind::User, field, strings.clone()).await;
    }
    let numbers =
        |n: usize| -> Json { Json::Object((0..n).map(|i| (format!("k{i}"), json!(i))).collect()) };
    let err = refused(
        client.merge(Merge::new("u").public(numbers(9))).await,
        Code::InvalidArgument,
        &[],
    );
    let listed = parts(err.message());
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert!(
        listed.iter().all(|p| p.starts_with("public_metadata/k")),
        "{listed:?}"
    );
    // Exactly five: all listed.
    let err = refused(
        client.merge(Merge::new("u").private(numbers(5))).await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(parts(err.message()).len(), 5);
    let err = refused(
        client.merge(Merge::new("u").private(numbers(4))).await,
        Code::InvalidArgument,
        &[],
    );
    assert_eq!(parts(err.message()).len(), 4);
    // Three fields of four violations each: five in all.
    let err = refused(
        client
            .replace(
                Replace::new("u")
                    .public(numbers(4))
                    .private(numbers(4))
                    .unsafe_(numbers(4)),
            )
            .await,
        Code::InvalidArgument,
        &[],
    );
    let listed = parts(err.message());
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert!(
        listed.iter().any(|p| p.starts_with("public_metadata/"))
            && listed.iter().any(|p| p.starts_with("private_metadata/")),
        "{listed:?}"
    );
}

/// Several writes at once, one of them breaking the schema: it alone is
/// refused; the others (one of them to the same id) are stored. On SQLite
/// they are queued behind a held write lock, so that they share one
/// group's transaction: the refusal must not fail the group (each write
/// run again alone would take a transaction each).
async fn concurrent_writes_one_violating(backend: Backend) {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    const GOOD: usize = 8;
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    set(&mut schemas, Kind::User, Field::Unsafe, ages()).await;
    let acquired = "metadata_db_acquire_seconds_count";
    let acquired_before = s.metric(acquired);

    let other = s.db.connect().await;
    let lock = match backend {
        Backend::Sqlite => {
            let options = TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            };
            Some(other.begin_with_options(options).await.unwrap())
        }
        Backend::Postgres => None,
    };
    let mut writes: Vec<(String, Json)> = (0..GOOD)
        .map(|i| (format!("g{i}"), json!({"age": i})))
        .collect();
    writes.insert(GOOD / 2, ("shared".into(), json!({"age": -1})));
    writes.push(("shared".into(), json!({"age": 40})));
    let calls: Vec<_> = writes
        .iter()
        .map(|(id, value)| {
            let mut users = s.users.clone();
            let request = metadata_service::proto::v1::MergeUserMetadataRequest {
                user_id: id.clone(),
                unsafe_metadata: Some(structure(value)),
                ..Default::default()
            };
            tokio::spawn(async move { users.merge(request).await })
        })
        .collect();
    if let Some(lock) = lock {
        until(
            "the writes arrive",
            Duration::from_secs(20),
            async || match users_in_flight(s.metrics(), "Merge") {
                arrived if arrived >= writes.len() as i64 => Ok(()),
                arrived => Err(arrived),
            },
        )
        .await;
        lock.commit().await.unwrap();
    }
    let mut refusals = Vec::new();
    for ((id, value), call) in writes.iter().zip(calls) {
        match call.await.unwrap() {
            Ok(record) => {
                assert!(value["age"].as_i64().unwrap() >= 0, "{id} {value} stored");
                assert_eq!(record.into_inner().version, 1, "{id}");
            }
            Err(err) => {
                assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err:?}");
                refusals.push((id.clone(), err.message().to_owned()));
            }
        }
    }
    assert_eq!(
        refusals,
        [(
            "shared".to_owned(),
            "unsafe_metadata/age: -1 is less than the minimum of 0".to_owned()
        )]
    );
    for i in 0..GOOD {
        let id = format!("g{i}");
        let record = stored(&s, Kind::User, &id).await;
        assert_eq!(
            (record.version, record.fields().2),
            (1, Some(json!({"age": i})))
        );
    }
    let shared = stored(&s, Kind::User, "shared").await;
    assert_eq!(
        (shared.version, shared.fields().2),
        (1, Some(json!({"age": 40})))
    );
    assert_eq!(s.db.event_revisions().await.len(), GOOD + 1);
    if backend == Backend::Sqlite {
        let transactions = s.metric(acquired) - acquired_before;
        assert!(
            transactions <= 3.0,
            "{transactions} write transactions for {} queued writes",
            writes.len()
        );
    }
    other.close().await.ok();
}

// ---------------------------------------------------------------------------
// SetSchema's checks of the schema

/// A schema that is not one, names an unknown draft, or is too large is
/// INVALID_ARGUMENT naming `schema` with the reason; nothing is stored.
async fn invalid_schemas_are_refused(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let cases: [(Json, &str); 6] = [
        (json!({"type": "nope"}), "is not a valid schema"),
        (json!({"minimum": "zero"}), "is not a valid schema"),
        (json!({"required": "name"}), "is not a valid schema"),
        (
            json!({"$schema": "https://example.com/my-draft"}),
            "https://example.com/my-draft",
        ),
        (json!({"$schema": 4}), "$schema must be a string"),
        (
            json!({"description": "x".repeat(64 * 1024)}),
            "the limit is 65536",
        ),
    ];
    for (schema, says) in cases {
        for validate_only in [false, true] {
            let request = SetSchemaRequest {
                validate_only,
                ..set_request(Kind::User, Field::Public, &schema)
            };
            let err = refused(
                schemas.set_schema(request).await,
                Code::InvalidArgument,
                &[says],
            );
            assert!(err.message().starts_with("schema: "), "{err:?}");
        }
    }
    // Just under the limit is fine (64 KiB as compact JSON).
    let overhead = json!({"description": ""}).to_string().len();
    let largest = json!({"description": "x".repeat(64 * 1024 - overhead)});
    assert_eq!(largest.to_string().len(), 64 * 1024);
    assert_eq!(
        set(&mut schemas, Kind::User, Field::Private, largest)
            .await
            .version,
        1
    );
    let public = get(&mut schemas, Kind::User, Field::Public).await;
    assert_eq!((public.version, schema_json(&public)), (0, json!({})));
}

/// A `$ref` that leaves the schema document is refused at once: nothing
/// is fetched (the address would not answer). A reference inside the
/// document is followed.
async fn a_remote_ref_is_refused_at_once(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    for reference in [
        "http://10.255.255.1/schema.json",
        "https://schemas.example.invalid/profile.json#/definitions/p",
        "other.json#/a",
    ] {
        let schema = json!({"properties": {"p": {"$ref": reference}}});
        let began = Instant::now();
        let err = refused(
            schemas
                .set_schema(set_request(Kind::User, Field::Unsafe, &schema))
                .await,
            Code::InvalidArgument,
            &["schema: is not a valid schema"],
        );
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{reference}: {:?} ({err:?})",
            began.elapsed()
        );
    }
    assert_eq!(
        get(&mut schemas, Kind::User, Field::Unsafe).await.version,
        0
    );
    let local = json!({
        "$defs": {"age": {"type": "integer", "minimum": 0}},
        "properties": {"age": {"$ref": "#/$defs/age"}},
    });
    set(&mut schemas, Kind::User, Field::Unsafe, local).await;
    refused(
        Kind::User
            .client(&s)
            .merge(Merge::new("u").unsafe_(json!({"age": -1})))
            .await,
        Code::InvalidArgument,
        &["unsafe_metadata/age: -1 is less than the minimum of 0"],
    );
}

/// A `$schema` naming draft-04 is honoured: its boolean
/// `exclusiveMinimum` (an invalid schema under the default 2020-12), and
/// draft-07's numeric one.
async fn earlier_drafts_are_honoured(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let mut client = Kind::User.client(&s);
    let draft4 = |uri: Option<&str>| {
        let mut schema = json!({
            "properties": {"n": {"type": "number", "minimum": 0, "exclusiveMinimum": true}},
        });
        if let Some(uri) = uri {
            schema["$schema"] = json!(uri);
        }
        schema
    };
    refused(
        schemas
            .set_schema(set_request(Kind::User, Field::Public, &draft4(None)))
            .await,
        Code::InvalidArgument,
        &["schema: is not a valid schema"],
    );
    let stored = set(
        &mut schemas,
        Kind::User,
        Field::Public,
        draft4(Some("http://json-schema.org/draft-04/schema#")),
    )
    .await;
    assert_eq!(
        schema_json(&stored)["$schema"],
        "http://json-schema.org/draft-04/schema#"
    );
    refused(
        client.merge(Merge::new("u").public(json!({"n": 0}))).await,
        Code::InvalidArgument,
        &["public_metadata/n: 0"],
    );
    client
        .merge(Merge::new("u").public(json!({"n": 0.5})))
        .await
        .expect("above the exclusive minimum");

    set(
        &mut schemas,
        Kind::User,
        Field::Private,
        json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "definitions": {"n": {"exclusiveMinimum": 0}},
            "properties": {"n": {"$ref": "#/definitions/n"}},
        }),
    )
    .await;
    refused(
        client.merge(Merge::new("u").private(json!({"n": 0}))).await,
        Code::InvalidArgument,
        &["private_metadata/n: 0"],
    );
    client
        .merge(Merge::new("u").private(json!({"n": 1})))
        .await
        .expect("above the exclusive minimum");
}

// ---------------------------------------------------------------------------
// SetSchema's check of the stored values

fn ids_in(message: &str) -> Vec<&str> {
    let listed = message
        .split_once("(ids: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .unwrap_or_else(|| panic!("no ids in {message:?}"))
        .0;
    listed.split(", ").collect()
}

/// Twelve stored values that break the new schema: FAILED_PRECONDITION
/// naming 12 and the first ten ids, for SetSchema and validate_only alike;
/// nothing changes (the old schema stays, writes are checked against it
/// only). Once the values are fixed, the schema is set. Every field.
async fn stored_values_that_break_a_schema_block_it(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = kind.client(&s);
    let mut schemas = schemas(&s).await;
    let lenient = json!({"type": "object"});
    for &field in kind.fields() {
        set(&mut schemas, kind, field, lenient.clone()).await;
    }
    let write_all = |id: String, value: Json| {
        let mut merge = Merge::new(&id);
        for &field in kind.fields() {
            merge = merge.json(field, value.clone());
        }
        merge
    };
    // Written in an order that is not the ids'.
    for i in (0..12).rev() {
        client
            .merge(write_all(format!("bad{i:02}"), json!({"name": i})))
            .await
            .unwrap();
    }
    for i in 0..3 {
        client
            .merge(write_all(format!("good{i}"), json!({"name": "n"})))
            .await
            .unwrap();
    }
    let versions = s.db.event_revisions().await;
    let expected: Vec<String> = (0..10).map(|i| format!("bad{i:02}")).collect();
    for &field in kind.fields() {
        for validate_only in [true, false] {
            let request = SetSchemaRequest {
                validate_only,
                ..set_request(kind, field, &named())
            };
            let err = refused(
                schemas.set_schema(request).await,
                Code::FailedPrecondition,
                &["12 stored", field.name(), "do not conform"],
            );
            assert_eq!(ids_in(err.message()), expected, "{err:?}");
        }
        let kept = get(&mut schemas, kind, field).await;
        assert_eq!((kept.version, schema_json(&kept)), (1, lenient.clone()));
        // Still only the old schema: a value without a name is accepted.
        client
            .merge(Merge::new("good0").json(field, json!({"other": true})))
            .await
            .expect("the refused schema is not enforced");
    }
    assert_eq!(
        s.db.event_revisions().await.len(),
        versions.len() + kind.fields().len()
    );

    // Fixing eleven leaves one, named alone.
    for i in 1..12 {
        client
            .merge(write_all(format!("bad{i:02}"), json!({"name": "fixed"})))
            .await
            .unwrap();
    }
    for &field in kind.fields() {
        let err = refused(
            schemas.set_schema(set_request(kind, field, &named())).await,
            Code::FailedPrecondition,
            &["1 stored"],
        );
        assert_eq!(ids_in(err.message()), ["bad00"]);
    }
    client
        .merge(write_all("bad00".into(), json!({"name": "fixed"})))
        .await
        .unwrap();
    for &field in kind.fields() {
        assert_eq!(set(&mut schemas, kind, field, named()).await.version, 2);
    }
}

/// `{}` is exempt from the check: a field never written, written `{}` or
/// cleared by a Merge does not block a schema requiring keys. A stored
/// JSON null is checked like any value.
async fn the_empty_object_is_exempt(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = Kind::User.client(&s);
    let mut schemas = schemas(&s).await;
    client
        .merge(Merge::new("never").unsafe_(json!({"k": 1})))
        .await
        .unwrap();
    client
        .replace(Replace::new("written").public(json!({})))
        .await
        .unwrap();
    client
        .merge(Merge::new("cleared").public(json!({"x": 1})))
        .await
        .unwrap();
    client
        .merge(Merge::new("cleared").public(json!({"x": null})))
        .await
        .unwrap();
    assert_eq!(
        stored_field(&s, Kind::User, "cleared", Field::Public).await,
        json!({})
    );
    client
        .replace(Replace::new("null").private(Json::Null))
        .await
        .unwrap();

    assert_eq!(
        set(&mut schemas, Kind::User, Field::Public, named())
            .await
            .version,
        1
    );
    // The stored null is not exempt.
    let err = refused(
        schemas
            .set_schema(set_request(Kind::User, Field::Private, &named()))
            .await,
        Code::FailedPrecondition,
        &["1 stored"],
    );
    assert_eq!(ids_in(err.message()), ["null"]);
    assert_eq!(
        set(
            &mut schemas,
            Kind::User,
            Field::Private,
            json!({"type": ["object", "null"]})
        )
        .await
        .version,
        1
    );
}

/// A deleted record is not checked: its value is gone.
async fn deleted_records_do_not_count(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut client = Kind::User.client(&s);
    let mut schemas = schemas(&s).await;
    client
        .merge(Merge::new("gone").unsafe_(json!({"age": -1})))
        .await
        .unwrap();
    client
        .merge(Merge::new("kept").unsafe_(json!({"age": 1})))
        .await
        .unwrap();
    refused(
        schemas
            .set_schema(set_request(Kind::User, Field::Unsafe, &ages()))
            .await,
        Code::FailedPrecondition,
        &["(ids: gone)"],
    );
    assert!(client.delete(Delete::new("gone")).await.unwrap());
    assert_eq!(
        set(&mut schemas, Kind::User, Field::Unsafe, ages())
            .await
            .version,
        1
    );
    // Written again, the id is checked like any other.
    refused(
        client
            .merge(Merge::new("gone").unsafe_(json!({"age": -1})))
            .await,
        Code::InvalidArgument,
        &[],
    );
}

/// A schema of one kind and field applies to it only.
async fn schemas_are_per_kind_and_field(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    set(&mut schemas, kind, Field::Private, ages()).await;
    let bad = json!({"age": -1});
    let mut this = kind.client(&s);
    let mut other = kind.other().client(&s);
    this.merge(Merge::new("r").public(bad.clone()))
        .await
        .expect("public has no schema");
    other
        .merge(Merge::new("r").private(bad.clone()))
        .await
        .expect("the other kind has no schema");
    refused(
        this.merge(Merge::new("r").private(bad.clone())).await,
        Code::InvalidArgument,
        &["private_metadata/age"],
    );
    // The other kind's values do not block a schema of this kind, nor the
    // other fields'.
    assert_eq!(
        get(&mut schemas, kind.other(), Field::Private)
            .await
            .version,
        0
    );
    assert_eq!(
        set(&mut schemas, kind, Field::Private, named())
            .await
            .version,
        2
    );
}

// ---------------------------------------------------------------------------
// validate_only, versions

/// validate_only answers what SetSchema answers, the version it would
/// store included, or the same error, and stores nothing: GetSchema is
/// unchanged and writes are not checked against it.
async fn validate_only_answers_as_set_schema_would(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let mut client = Kind::User.client(&s);
    let (kind, field) = (Kind::User, Field::Unsafe);
    let would = schemas
        .set_schema(validate_request(kind, field, &ages()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(would.version, 1);
    assert_eq!(schema_json(&would), ages());
    assert!(would.updated_at.is_some());
    let unchanged = get(&mut schemas, kind, field).await;
    assert_eq!(
        (
            unchanged.version,
            schema_json(&unchanged),
            unchanged.updated_at
        ),
        (0, json!({}), None)
    );
    client
        .merge(Merge::new("u").unsafe_(json!({"age": -1})))
        .await
        .expect("a validate_only schema is not enforced");

    // The same refusal, word for word.
    let errors = [
        schemas
            .set_schema(validate_request(kind, field, &ages()))
            .await,
        schemas.set_schema(set_request(kind, field, &ages())).await,
    ]
    .map(|r| refused(r, Code::FailedPrecondition, &["(ids: u)"]));
    assert_eq!(errors[0].message(), errors[1].message());
    let stale = |validate_only| SetSchemaRequest {
        validate_only,
        expected_version: Some(3),
        ..set_request(kind, field, &ages())
    };
    let errors = [
        schemas.set_schema(stale(true)).await,
        schemas.set_schema(stale(false)).await,
    ]
    .map(|r| refused(r, Code::Aborted, &["expected version 3"]));
    assert_eq!(errors[0].message(), errors[1].message());

    client
        .merge(Merge::new("u").unsafe_(json!({"age": 1})))
        .await
        .unwrap();
    let would = schemas
        .set_schema(validate_request(kind, field, &ages()))
        .await
        .unwrap()
        .into_inner();
    let did = set(&mut schemas, kind, field, ages()).await;
    let without_time = |m: &MetadataSchema| MetadataSchema {
        updated_at: None,
        ..m.clone()
    };
    assert_eq!(without_time(&would), without_time(&did));
    assert_eq!(get(&mut schemas, kind, field).await, did);

    // Over a schema that is set: the next version, and the set one stays.
    let stricter = json!({"type": "object", "required": ["age"]});
    let would = schemas
        .set_schema(SetSchemaRequest {
            expected_version: Some(1),
            ..validate_request(kind, field, &stricter)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((would.version, schema_json(&would)), (2, stricter));
    assert_eq!(get(&mut schemas, kind, field).await, did);
    client
        .merge(Merge::new("u").unsafe_(json!({"age": null})))
        .await
        .expect("only the set schema is enforced");
    refused(
        client
            .merge(Merge::new("u").unsafe_(json!({"age": -2})))
            .await,
        Code::InvalidArgument,
        &[],
    );
}

/// expected_version: a mismatch is ABORTED for SetSchema and DeleteSchema
/// and changes nothing; a match goes through.
async fn expected_version_mismatch_is_aborted(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let (kind, field) = (Kind::Organization, Field::Public);
    let with_version = |schema: &Json, version| SetSchemaRequest {
        expected_version: Some(version),
        ..set_request(kind, field, schema)
    };
    refused(
        schemas.set_schema(with_version(&ages(), 1)).await,
        Code::Aborted,
        &["expected version 1, but the current version is 0"],
    );
    assert_eq!(get(&mut schemas, kind, field).await.version, 0);
    refused(
        schemas
            .delete_schema(delete_request(kind, field, Some(1)))
            .await,
        Code::Aborted,
        &["expected version 1, but the current version is 0"],
    );
    let first = schemas
        .set_schema(with_version(&ages(), 0))
        .await
        .expect("version 0: none was ever set")
        .into_inner();
    assert_eq!(first.version, 1);
    refused(
        schemas.set_schema(with_version(&named(), 0)).await,
        Code::Aborted,
        &["expected version 0, but the current version is 1"],
    );
    refused(
        schemas
            .delete_schema(delete_request(kind, field, Some(2)))
            .await,
        Code::Aborted,
        &["expected version 2, but the current version is 1"],
    );
    assert_eq!(get(&mut schemas, kind, field).await, first);
    let deleted = schemas
        .delete_schema(delete_request(kind, field, Some(1)))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    refused(
        schemas.set_schema(with_version(&named(), 1)).await,
        Code::Aborted,
        &["current version is 2"],
    );
    let again = schemas
        .set_schema(with_version(&named(), 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.version, schema_json(&again)), (3, named()));
}

/// +1 per SetSchema (the same schema again included) and per DeleteSchema
/// that removed one; a DeleteSchema of none answers `existed: false` and
/// changes nothing. After a delete, GetSchema shows an empty schema with
/// the version and time of the delete, and writes are free again.
async fn versions_grow_by_one_per_change(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let mut client = Kind::User.client(&s);
    let (kind, field) = (Kind::User, Field::Private);
    let one = set(&mut schemas, kind, field, ages()).await;
    let two = set(&mut schemas, kind, field, ages()).await;
    assert_eq!((one.version, two.version), (1, 2));
    let time = |m: &MetadataSchema| m.updated_at.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(time(&two) >= time(&one));
    assert_eq!(get(&mut schemas, kind, field).await, two);
    // Other fields and kinds keep their own versions.
    assert_eq!(get(&mut schemas, kind, Field::Public).await.version, 0);
    assert_eq!(
        get(&mut schemas, Kind::Organization, field).await.version,
        0
    );

    let deleted = schemas
        .delete_schema(delete_request(kind, field, None))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    let after_delete = get(&mut schemas, kind, field).await;
    assert_eq!(after_delete.version, 3);
    assert_eq!(schema_json(&after_delete), json!({}));
    assert!(after_delete.updated_at.is_some());
    client
        .merge(Merge::new("u").private(json!({"age": -1})))
        .await
        .expect("no schema any more");

    for expected_version in [None, Some(3)] {
        let again = schemas
            .delete_schema(delete_request(kind, field, expected_version))
            .await
            .unwrap()
            .into_inner();
        assert!(!again.existed);
        assert_eq!(get(&mut schemas, kind, field).await, after_delete);
    }
    let none = schemas
        .delete_schema(delete_request(kind, Field::Public, None))
        .await
        .unwrap()
        .into_inner();
    assert!(!none.existed);
    assert_eq!(get(&mut schemas, kind, Field::Public).await.version, 0);

    let four = set(&mut schemas, kind, field, json!({"type": "object"})).await;
    assert_eq!(four.version, 4);
}

/// GetSchema of a field that never had one: its kind and field, an empty
/// schema, version 0, no time. Every kind and field.
async fn a_schema_never_set_reads_as_empty(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    for kind in Kind::ALL {
        for &field in kind.fields() {
            let read = get(&mut schemas, kind, field).await;
            assert_eq!(read.kind, proto_kind(kind));
            assert_eq!(read.field, proto_field(field));
            assert_eq!(read.version, 0, "{kind:?} {field:?}");
            assert_eq!(schema_json(&read), json!({}));
            assert_eq!(read.updated_at, None);
        }
    }
    // Setting one leaves the others as they were.
    let set_one = set(&mut schemas, Kind::Organization, Field::Private, ages()).await;
    assert_eq!(set_one.kind, MetadataKind::Organization as i32);
    assert_eq!(set_one.field, MetadataField::Private as i32);
    let user = get(&mut schemas, Kind::User, Field::Private).await;
    assert_eq!((user.version, user.updated_at), (0, None));
}

/// Kind and field must be set (INVALID_ARGUMENT naming which), and
/// organizations have no unsafe metadata; for each RPC.
async fn kind_and_field_are_required(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let user = MetadataKind::User as i32;
    let org = MetadataKind::Organization as i32;
    let public = MetadataField::Public as i32;
    let unsafe_ = MetadataField::Unsafe as i32;
    let cases = [
        (0, public, "kind: must be set"),
        (17, public, "kind: must be set"),
        (user, 0, "field: must be set"),
        (user, 17, "field: must be set"),
        (0, 0, "must be set"),
        (org, unsafe_, "field: is not a field of organization"),
    ];
    for (kind, field, says) in cases {
        let set = SetSchemaRequest {
            kind,
            field,
            schema: Some(structure(&ages())),
            validate_only: false,
            expected_version: None,
        };
        refused(
            schemas.set_schema(set).await,
            Code::InvalidArgument,
            &[says],
        );
        let validate = SetSchemaRequest {
            kind,
            field,
            schema: Some(structure(&ages())),
            validate_only: true,
            expected_version: None,
        };
        refused(
            schemas.set_schema(validate).await,
            Code::InvalidArgument,
            &[says],
        );
        refused(
            schemas.get_schema(GetSchemaRequest { kind, field }).await,
            Code::InvalidArgument,
            &[says],
        );
        let delete = DeleteSchemaRequest {
            kind,
            field,
            expected_version: None,
        };
        refused(
            schemas.delete_schema(delete).await,
            Code::InvalidArgument,
            &[says],
        );
    }
    // Nothing was stored for any of them.
    for kind in Kind::ALL {
        for &field in kind.fields() {
            assert_eq!(get(&mut schemas, kind, field).await.version, 0);
        }
    }
}

// ---------------------------------------------------------------------------
// Who, events, metrics, log

/// Backend keys only: a frontend token is PERMISSION_DENIED for all three
/// RPCs (and changes nothing), no credentials UNAUTHENTICATED.
async fn only_backend_callers_manage_schemas(backend: Backend) {
    let auth = authenticator(SECRET);
    let Some(s) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let frontends = [session("user_1", None), session("user_1", Some("org_1"))];
    let expect = |token: Option<&str>, code: Code| {
        let mut schemas = schemas.clone();
        let token = token.map(str::to_owned);
        async move {
            let token = token.as_deref();
            for kind in Kind::ALL {
                for &field in kind.fields() {
                    let set = with_token(set_request(kind, field, &ages()), token);
                    let validate = with_token(validate_request(kind, field, &ages()), token);
                    let get = with_token(get_request(kind, field), token);
                    let delete = with_token(delete_request(kind, field, None), token);
                    let codes = [
                        schemas.set_schema(set).await.err().map(|e| e.code()),
                        schemas.set_schema(validate).await.err().map(|e| e.code()),
                        schemas.get_schema(get).await.err().map(|e| e.code()),
                        schemas.delete_schema(delete).await.err().map(|e| e.code()),
                    ];
                    let expected = (code != Code::Ok).then_some(code);
                    assert_eq!(codes, [expected; 4], "{kind:?} {field:?} {token:?}");
                }
            }
        }
    };
    for token in &frontends {
        expect(Some(token), Code::PermissionDenied).await;
    }
    expect(None, Code::Unauthenticated).await;
    // The backend's own calls: set then deleted, so versions 2.
    expect(Some(BACKEND_KEY), Code::Ok).await;
    let read = schemas
        .get_schema(with_token(
            get_request(Kind::User, Field::Unsafe),
            Some(BACKEND_KEY),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.version, 2, "only the backend's set and delete counted");
    let denied = schemas
        .set_schema(with_token(
            set_request(Kind::User, Field::Unsafe, &ages()),
            Some(&frontends[0]),
        ))
        .await
        .unwrap_err();
    assert!(!denied.message().is_empty());
}

/// SetSchema, validate_only and DeleteSchema are not metadata events:
/// Watch streams of both kinds stay quiet, the event table has no new
/// change, and the next write's event follows the last one.
async fn schema_changes_are_not_watch_events(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let written = Kind::User
        .client(&s)
        .merge(Merge::new("u").public(json!({"a": 1})))
        .await
        .unwrap();
    let mut users = watch_from_now(&s, Kind::User).await;
    let mut orgs = watch_from_now(&s, Kind::Organization).await;
    for kind in Kind::ALL {
        for &field in kind.fields() {
            schemas
                .set_schema(validate_request(kind, field, &ages()))
                .await
                .unwrap();
            set(&mut schemas, kind, field, ages()).await;
            set(&mut schemas, kind, field, json!({})).await;
            let deleted = schemas
                .delete_schema(delete_request(kind, field, None))
                .await
                .unwrap();
            assert!(deleted.into_inner().existed);
        }
    }
    assert_quiet(&mut users, Duration::from_millis(300)).await;
    assert_quiet(&mut orgs, Duration::from_millis(100)).await;
    assert_eq!(s.db.event_revisions().await, [written.revision]);
    let next = Kind::Organization
        .client(&s)
        .merge(Merge::new("o").public(json!({"a": 1})))
        .await
        .unwrap();
    assert_eq!(next.revision, written.revision + 1);
    assert_eq!(next_event(&mut orgs).await, next.revision);
    assert_quiet(&mut users, Duration::from_millis(100)).await;
}

fn handled(method: &str, code: &str) -> String {
    format!(
        r#"grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",grpc_service="metadata.v1.MetadataSchemaService"}}"#
    )
}

/// Each call of MetadataSchemaService is counted under its method's name
/// and its code, never as "other".
async fn schema_calls_are_counted_by_method(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let (kind, field) = (Kind::User, Field::Public);
    set(&mut schemas, kind, field, ages()).await;
    schemas
        .set_schema(validate_request(kind, field, &ages()))
        .await
        .unwrap();
    refused(
        schemas
            .set_schema(set_request(kind, field, &json!({"type": "nope"})))
            .await,
        Code::InvalidArgument,
        &[],
    );
    Kind::User
        .client(&s)
        .merge(Merge::new("u").public(json!({"age": 1})))
        .await
        .unwrap();
    refused(
        schemas
            .set_schema(set_request(kind, field, &json!({"required": ["name"]})))
            .await,
        Code::FailedPrecondition,
        &[],
    );
    for _ in 0..3 {
        get(&mut schemas, kind, field).await;
    }
    refused(
        schemas
            .delete_schema(delete_request(kind, field, Some(9)))
            .await,
        Code::Aborted,
        &[],
    );
    schemas
        .delete_schema(delete_request(kind, field, None))
        .await
        .unwrap();

    let text = s.metrics().render();
    let value = |series: &str| crate::harness::metric(&text, series);
    assert_eq!(value(&handled("SetSchema", "OK")), 2.0);
    assert_eq!(value(&handled("SetSchema", "InvalidArgument")), 1.0);
    assert_eq!(value(&handled("SetSchema", "FailedPrecondition")), 1.0);
    assert_eq!(value(&handled("GetSchema", "OK")), 3.0);
    assert_eq!(value(&handled("DeleteSchema", "Aborted")), 1.0);
    assert_eq!(value(&handled("DeleteSchema", "OK")), 1.0);
    for (method, calls) in [
        ("SetSchema", 4.0),
        ("GetSchema", 3.0),
        ("DeleteSchema", 2.0),
    ] {
        let count = format!(
            r#"grpc_server_handling_seconds_count{{grpc_method="{method}",grpc_service="metadata.v1.MetadataSchemaService"}}"#
        );
        assert_eq!(value(&count), calls, "{method}");
    }
    assert!(
        !text.contains(r#"grpc_method="other",grpc_service="metadata.v1.MetadataSchemaService""#),
        "{text}"
    );
}

backend_tests!(
    violations_name_field_pointer_and_keyword,
    at_most_five_violations_are_listed,
    concurrent_writes_one_violating,
    invalid_schemas_are_refused,
    a_remote_ref_is_refused_at_once,
    earlier_drafts_are_honoured,
    the_empty_object_is_exempt,
    deleted_records_do_not_count,
    validate_only_answers_as_set_schema_would,
    expected_version_mismatch_is_aborted,
    versions_grow_by_one_per_change,
    a_schema_never_set_reads_as_empty,
    kind_and_field_are_required,
    only_backend_callers_manage_schemas,
    schema_changes_are_not_watch_events,
    schema_calls_are_counted_by_method,
);

kind_tests!(
    merge_checks_the_field_as_it_will_be_stored,
    replace_with_null_checks_json_null,
    fields_a_write_does_not_provide_are_not_checked,
    a_refused_write_changes_nothing_and_emits_no_event,
    a_write_breaking_several_fields_lists_each,
    stored_values_that_break_a_schema_block_it,
    schemas_are_per_kind_and_field,
);

/// SetSchema and DeleteSchema are logged with the caller's name, the RPC,
/// kind, field (and version); a validate_only, a refused or a denied call
/// and a delete of nothing are not logged as changes. The log is captured
/// by a subscriber of this thread: the test runs on a current-thread
/// runtime, so the server's tasks run (and log) here too.
async fn schema_changes_are_logged_with_the_caller(backend: Backend) {
    let (captured, _guard) = capture_logs(tracing::Level::INFO);
    let auth = authenticator(SECRET);
    let Some(s) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let mut schemas = schemas(&s).await;
    let frontend = session("user_1", None);
    fn call<T>(request: T) -> tonic::Request<T> {
        with_token(request, Some(BACKEND_KEY))
    }
    schemas
        .set_schema(call(validate_request(Kind::User, Field::Unsafe, &ages())))
        .await
        .unwrap();
    schemas
        .set_schema(with_token(
            set_request(Kind::User, Field::Unsafe, &ages()),
            Some(&frontend),
        ))
        .await
        .unwrap_err();
    schemas
        .delete_schema(call(delete_request(Kind::User, Field::Unsafe, None)))
        .await
        .unwrap();
    assert!(
        captured.lines().iter().all(|l| !l.contains("schema ")),
        "nothing changed yet:\n{}",
        captured.lines().join("\n")
    );

    tracing::callsite::rebuild_interest_cache();
    schemas
        .set_schema(call(set_request(Kind::User, Field::Unsafe, &ages())))
        .await
        .unwrap();
    schemas
        .set_schema(call(set_request(
            Kind::Organization,
            Field::Private,
            &named(),
        )))
        .await
        .unwrap();
    schemas
        .set_schema(call(set_request(
            Kind::User,
            Field::Unsafe,
            &json!({"type": "nope"}),
        )))
        .await
        .unwrap_err();
    schemas
        .delete_schema(call(delete_request(Kind::User, Field::Unsafe, None)))
        .await
        .unwrap();

    let lines = captured.lines();
    let changes: Vec<&String> = lines.iter().filter(|l| l.contains("schema ")).collect();
    assert_eq!(changes.len(), 3, "{}", lines.join("\n"));
    let expected: [&[&str]; 3] = [
        &[
            "schema set",
            "caller=backend:ci-backend",
            "rpc=SetSchema",
            "kind=user",
            "field=unsafe_metadata",
            "version=1",
        ],
        &[
            "schema set",
            "caller=backend:ci-backend",
            "kind=organization",
            "field=private_metadata",
            "version=1",
        ],
        &[
            "schema deleted",
            "caller=backend:ci-backend",
            "rpc=DeleteSchema",
            "kind=user",
            "field=unsafe_metadata",
        ],
    ];
    for (line, needles) in changes.iter().zip(expected) {
        for needle in needles {
            assert!(line.contains(needle), "{needle:?} not in {line}");
        }
        assert!(!line.contains(BACKEND_KEY), "the key is logged: {line}");
    }
}

#[tokio::test]
async fn sqlite_schema_changes_are_logged_with_the_caller() {
    schema_changes_are_logged_with_the_caller(Backend::Sqlite).await
}

#[tokio::test]
async fn postgres_schema_changes_are_logged_with_the_caller() {
    schema_changes_are_logged_with_the_caller(Backend::Postgres).await
}
