//! Patch (issue 30, item 1): RFC 6902 JSON Patch over gRPC on both kinds
//! and backends. A failed `test` is ABORTED naming the field, the
//! operation and its path, and writes nothing; patches of different paths
//! of one record, sent at once, all land; a patch that changes nothing
//! writes nothing; bad patches are INVALID_ARGUMENT naming the operation;
//! a frontend token patches what it may merge, nothing more.

use metadata_service::model::Field;
use metadata_service::reason::Reason;
use serde_json::json;
use tonic::Code;

use crate::auth::{BACKEND_KEY, ORG, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::json as to_json;
use crate::error_details::expect;
use crate::harness::{start, start_with};
use crate::kinds::{Get, Kind, Merge, Patch};

async fn patches_apply_and_tests_guard_them(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(
        Merge::new("p")
            .public(json!({"count": 1, "tags": ["a"], "plan": {"name": "free"}}))
            .private(json!({"note": "x"})),
    )
    .await
    .unwrap();
    let patched = c
        .patch(
            Patch::new("p")
                .ops(
                    Field::Public,
                    json!([
                        {"op": "test", "path": "/count", "value": 1},
                        {"op": "replace", "path": "/count", "value": 2},
                        {"op": "add", "path": "/tags/-", "value": "b"},
                        {"op": "move", "from": "/plan/name", "path": "/plan_name"},
                        {"op": "remove", "path": "/plan"}
                    ]),
                )
                .ops(
                    Field::Private,
                    json!([{"op": "copy", "from": "/note", "path": "/copy"}]),
                ),
        )
        .await
        .unwrap();
    assert_eq!(
        to_json(patched.public.as_ref().unwrap()),
        json!({"count": 2, "tags": ["a", "b"], "plan_name": "free"})
    );
    assert_eq!(
        to_json(patched.private.as_ref().unwrap()),
        json!({"note": "x", "copy": "x"})
    );
    assert_eq!(patched.version, 2, "one write for both fields");

    // A failed test: ABORTED, naming the field, the operation and the path;
    // neither field written.
    let err = c
        .patch(
            Patch::new("p")
                .ops(
                    Field::Private,
                    json!([{"op": "add", "path": "/written", "value": true}]),
                )
                .ops(
                    Field::Public,
                    json!([
                        {"op": "replace", "path": "/count", "value": 9},
                        {"op": "test", "path": "/count", "value": 1}
                    ]),
                ),
        )
        .await
        .unwrap_err();
    let said = expect(&err, Reason::PatchTestFailed);
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(said.metadata["field"], "public_metadata");
    assert_eq!(said.metadata["operation"], "1");
    assert_eq!(said.metadata["path"], "/count");
    let violations = said
        .details
        .precondition_failure()
        .expect("a PreconditionFailure")
        .violations
        .clone();
    assert_eq!(violations[0].subject, "public_metadata/count");
    let now = c.get(Get::new("p")).await.unwrap();
    assert_eq!(now.version, 2, "nothing written");
    assert_eq!(now.fields(), patched.fields());

    // A patch that changes nothing writes nothing.
    let same = c
        .patch(Patch::new("p").ops(
            Field::Public,
            json!([{"op": "replace", "path": "/count", "value": 2}]),
        ))
        .await
        .unwrap();
    assert_eq!((same.version, same.revision), (2, patched.revision));

    // expected_version as in Merge.
    let err = c
        .patch(
            Patch::new("p")
                .ops(Field::Public, json!([{"op": "remove", "path": "/tags"}]))
                .expected_version(1),
        )
        .await
        .unwrap_err();
    expect(&err, Reason::VersionMismatch);
}

/// Patches of different paths of one record, sent at once, each guarded by
/// a `test` of its own path: every one lands, none is ABORTED.
async fn concurrent_patches_of_different_paths_all_land(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let initial: serde_json::Map<String, serde_json::Value> =
        keys.iter().map(|k| (k.clone(), json!(0))).collect();
    c.merge(Merge::new("shared").public(serde_json::Value::Object(initial)))
        .await
        .unwrap();
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let mut c = c.clone();
            let key = key.clone();
            tokio::spawn(async move {
                for n in 0..5 {
                    let path = format!("/{key}");
                    c.patch(Patch::new("shared").ops(
                        Field::Public,
                        json!([
                            {"op": "test", "path": path, "value": n},
                            {"op": "replace", "path": path, "value": n + 1}
                        ]),
                    ))
                    .await
                    .unwrap_or_else(|err| panic!("{key} at {n}: {err:?}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let record = c.get(Get::new("shared")).await.unwrap();
    let expected: serde_json::Map<String, serde_json::Value> =
        keys.iter().map(|k| (k.clone(), json!(5))).collect();
    assert_eq!(
        to_json(record.public.as_ref().unwrap()),
        serde_json::Value::Object(expected)
    );
    assert_eq!(record.version, 1 + 8 * 5);
}

async fn bad_patches_name_the_operation(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(Merge::new("b").public(json!({"a": 1, "list": [1]})))
        .await
        .unwrap();
    for (ops, field) in [
        (
            json!([{"op": "test", "path": "/a", "value": 1}, {"op": "frobnicate", "path": "/a"}]),
            "public_metadata[1]",
        ),
        (
            json!([{"op": "add", "path": "/a/b", "value": 1}]),
            "public_metadata[0]",
        ),
        (
            json!([{"op": "remove", "path": "/missing"}]),
            "public_metadata[0]",
        ),
        (
            json!([{"op": "add", "path": "/list/5", "value": 1}]),
            "public_metadata[0]",
        ),
        (
            json!([{"op": "replace", "path": "/a"}]),
            "public_metadata[0]",
        ),
        (
            json!([{"op": "add", "path": "no-slash", "value": 1}]),
            "public_metadata[0]",
        ),
    ] {
        let err = c
            .patch(Patch::new("b").ops(Field::Public, ops.clone()))
            .await
            .unwrap_err();
        let said = expect(&err, Reason::InvalidPatch);
        assert_eq!(said.metadata["field"], field, "{ops}");
    }
    // A patch whose result would pass the field's limit.
    let big = "x".repeat(5000);
    let err = c
        .patch(Patch::new("b").ops(
            Field::Public,
            json!([
                {"op": "add", "path": "/x", "value": big},
                {"op": "copy", "from": "/x", "path": "/y"}
            ]),
        ))
        .await
        .unwrap_err();
    expect(&err, Reason::TooLarge);
    assert_eq!(
        c.get(Get::new("b")).await.unwrap().version,
        1,
        "nothing written"
    );
}

/// A frontend token patches its own user's unsafe_metadata, as it may
/// merge it, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_tokens_patch_what_they_may_merge() {
    let s = start_with(Backend::Sqlite, |c| {
        c.auth = authenticator(crate::auth::SECRET)
    })
    .await
    .unwrap();
    let token = session(USER, Some(ORG));
    let mut users = Kind::User.client(&s);
    let add = json!([{"op": "add", "path": "/theme", "value": "dark"}]);
    let own = users
        .patch(with_token(
            Patch::new(USER).ops(Field::Unsafe, add.clone()),
            Some(&token),
        ))
        .await
        .unwrap();
    assert_eq!(own.private, None, "private stays hidden");
    for (patch, reason) in [
        (
            Patch::new(USER).ops(Field::Public, add.clone()),
            Reason::FieldNotWritable,
        ),
        (
            Patch::new(USER).ops(Field::Private, add.clone()),
            Reason::FieldNotWritable,
        ),
        (
            Patch::new("user_2").ops(Field::Unsafe, add.clone()),
            Reason::NotOwnRecord,
        ),
    ] {
        let err = users
            .patch(with_token(patch, Some(&token)))
            .await
            .unwrap_err();
        expect(&err, reason);
    }
    let err = Kind::Organization
        .client(&s)
        .patch(with_token(
            Patch::new(ORG).ops(Field::Public, add.clone()),
            Some(&token),
        ))
        .await
        .unwrap_err();
    expect(&err, Reason::BackendOnly);
    let err = users
        .patch(with_token(
            Patch::new(USER).ops(Field::Unsafe, add.clone()),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let backend = users
        .patch(with_token(
            Patch::new(USER).ops(Field::Private, add),
            Some(BACKEND_KEY),
        ))
        .await
        .unwrap();
    assert_eq!(backend.version, 2);
}

kind_tests!(
    patches_apply_and_tests_guard_them,
    concurrent_patches_of_different_paths_all_land,
    bad_patches_name_the_operation,
);
