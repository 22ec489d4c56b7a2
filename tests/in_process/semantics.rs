//! The semantics of every RPC, run against SQLite and Postgres through the
//! generated client on a real server.

use metadata_service::proto::v1::*;
use serde_json::{Value as Json, json};
use tonic::Code;

use crate::common::Backend;
use crate::common::json::{field, structure, value};
use crate::harness::{TestServer, start};

fn merge(
    id: &str,
    public: Option<Json>,
    private: Option<Json>,
    unsafe_: Option<Json>,
) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id: id.into(),
        public_metadata: public.as_ref().map(structure),
        private_metadata: private.as_ref().map(structure),
        unsafe_metadata: unsafe_.as_ref().map(structure),
        expected_version: None,
    }
}

fn replace(
    id: &str,
    public: Option<Json>,
    private: Option<Json>,
    unsafe_: Option<Json>,
) -> ReplaceUserMetadataRequest {
    ReplaceUserMetadataRequest {
        user_id: id.into(),
        public_metadata: public.as_ref().map(value),
        private_metadata: private.as_ref().map(value),
        unsafe_metadata: unsafe_.as_ref().map(value),
        expected_version: None,
    }
}

async fn get(s: &mut TestServer, id: &str) -> UserMetadata {
    s.users
        .get(GetUserMetadataRequest { user_id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// (public, private, unsafe) as JSON.
fn fields(m: &UserMetadata) -> (Json, Json, Json) {
    (
        field(&m.public_metadata),
        field(&m.private_metadata),
        field(&m.unsafe_metadata),
    )
}

fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000 + i64::from(t.nanos / 1000)
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

async fn unknown_id_reads_as_empty(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let m = get(&mut s, "user_never_written").await;
    assert_eq!(m.user_id, "user_never_written");
    assert_eq!(fields(&m), (json!({}), json!({}), json!({})));
    assert_eq!(m.version, 0);
    assert!(m.created_at.is_none() && m.updated_at.is_none());

    let org = s
        .orgs
        .get(GetOrganizationMetadataRequest {
            organization_id: "org_x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (field(&org.public_metadata), field(&org.private_metadata)),
        (json!({}), json!({}))
    );
    assert_eq!(org.version, 0);
}

async fn merge_is_deep_and_null_removes(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let first = s
        .users
        .merge(merge(
            "u1",
            Some(json!({"a":{"b":1,"c":2},"d":[1,2]})),
            None,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.version, 1);
    assert_eq!(
        field(&first.public_metadata),
        json!({"a":{"b":1,"c":2},"d":[1,2]})
    );
    assert!(first.created_at.is_some());
    assert_eq!(first.created_at, first.updated_at);

    let second = s
        .users
        .merge(merge(
            "u1",
            Some(json!({"a":{"c":null,"e":3},"d":[3]})),
            None,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        field(&second.public_metadata),
        json!({"a":{"b":1,"e":3},"d":[3]})
    );
    assert_eq!(second.version, 2);
    assert_eq!(second.created_at, first.created_at);
    assert!(micros(&second.updated_at) >= micros(&first.updated_at));
    assert_eq!(
        get(&mut s, "u1").await,
        second,
        "Get returns what Merge returned"
    );

    // Null removes at any depth; removing an absent key is harmless.
    let third = s
        .users
        .merge(merge(
            "u1",
            Some(json!({"a":{"b":null},"x":{"y":{"z":null}}})),
            None,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        field(&third.public_metadata),
        json!({"a":{"e":3},"d":[3],"x":{"y":{}}})
    );
}

async fn merge_leaves_omitted_fields_untouched(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    s.users
        .merge(merge(
            "u1",
            Some(json!({"p":1})),
            Some(json!({"s":1})),
            Some(json!({"u":1})),
        ))
        .await
        .unwrap();
    let m = s
        .users
        .merge(merge("u1", None, Some(json!({"s2":2})), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        fields(&m),
        (json!({"p":1}), json!({"s":1,"s2":2}), json!({"u":1}))
    );
}

async fn replace_overwrites_each_provided_field(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    s.users
        .merge(merge(
            "u1",
            Some(json!({"a":{"b":1,"c":2}})),
            Some(json!({"k":1})),
            Some(json!({"t":1})),
        ))
        .await
        .unwrap();
    // No merge at any level; omitted fields untouched.
    let m = s
        .users
        .replace(replace("u1", Some(json!({"a":{"z":9}})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        fields(&m),
        (json!({"a":{"z":9}}), json!({"k":1}), json!({"t":1}))
    );
    assert_eq!(m.version, 2);

    // {} clears, null stores null, and both survive a Get.
    let m = s
        .users
        .replace(replace("u1", None, Some(json!({})), Some(Json::Null)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fields(&m), (json!({"a":{"z":9}}), json!({}), Json::Null));
    let read = get(&mut s, "u1").await;
    assert_eq!(fields(&read), (json!({"a":{"z":9}}), json!({}), Json::Null));
    assert!(matches!(
        read.unsafe_metadata.unwrap().kind,
        Some(prost_types::value::Kind::NullValue(_))
    ));

    // Merge into a stored null starts from {}.
    let m = s
        .users
        .merge(merge("u1", None, None, Some(json!({"n":1}))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(field(&m.unsafe_metadata), json!({"n":1}));
}

async fn replace_with_a_non_struct_is_refused(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    s.users
        .merge(merge("u1", Some(json!({"keep":1})), None, None))
        .await
        .unwrap();
    let before = get(&mut s, "u1").await;
    let bad_values = [
        value(&json!(1)),
        value(&json!("text")),
        value(&json!(true)),
        value(&json!([1, 2])),
        prost_types::Value { kind: None },
    ];
    for bad in bad_values {
        let request = ReplaceUserMetadataRequest {
            user_id: "u1".into(),
            private_metadata: Some(json!({"ok":1})).as_ref().map(value),
            public_metadata: Some(bad.clone()),
            ..Default::default()
        };
        let status = assert_code(s.users.replace(request).await, Code::InvalidArgument);
        assert!(
            status.message().starts_with("public_metadata"),
            "{}",
            status.message()
        );
    }
    assert_eq!(get(&mut s, "u1").await, before, "nothing was written");
}

async fn writes_that_change_nothing_keep_the_version(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    // A no-op on an unknown id stores nothing.
    let m = s
        .users
        .merge(merge("new", Some(json!({})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.version, 0);
    assert!(m.created_at.is_none());
    let m = s
        .users
        .replace(replace("new", Some(json!({})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.version, 0);

    let written = s
        .users
        .merge(merge("u1", Some(json!({"a":{"b":1}})), None, None))
        .await
        .unwrap()
        .into_inner();
    for request in [
        merge("u1", Some(json!({"a":{"b":1}})), None, None),
        merge("u1", Some(json!({"missing":null})), Some(json!({})), None),
    ] {
        let again = s.users.merge(request).await.unwrap().into_inner();
        assert_eq!(again, written, "same version and updated_at");
    }
    let again = s
        .users
        .replace(replace(
            "u1",
            Some(json!({"a":{"b":1}})),
            Some(json!({})),
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, written);
    // A double that equals the stored integer is the same value.
    let again = s
        .users
        .merge(merge("u1", Some(json!({"a":{"b":1.0}})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, 1);
}

async fn expected_version_guards_every_write(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut request = merge("u1", Some(json!({"a":1})), None, None);
    request.expected_version = Some(1);
    let status = assert_code(s.users.merge(request.clone()).await, Code::Aborted);
    assert!(
        status.message().contains("current version is 0"),
        "{}",
        status.message()
    );
    assert_eq!(get(&mut s, "u1").await.version, 0);

    request.expected_version = Some(0);
    assert_eq!(
        s.users
            .merge(request.clone())
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    // Same expected version again: the first writer won.
    assert_code(s.users.merge(request).await, Code::Aborted);

    let mut r = replace("u1", Some(json!({"b":2})), None, None);
    r.expected_version = Some(0);
    assert_code(s.users.replace(r.clone()).await, Code::Aborted);
    r.expected_version = Some(1);
    assert_eq!(s.users.replace(r).await.unwrap().into_inner().version, 2);

    let delete = |v| DeleteUserMetadataRequest {
        user_id: "u1".into(),
        expected_version: Some(v),
    };
    assert_code(s.users.delete(delete(1)).await, Code::Aborted);
    assert_eq!(
        field(&get(&mut s, "u1").await.public_metadata),
        json!({"b":2})
    );
    assert!(
        s.users
            .delete(delete(2))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    // A no-op still checks the version.
    let mut noop = merge("u1", Some(json!({})), None, None);
    noop.expected_version = Some(5);
    assert_code(s.users.merge(noop).await, Code::Aborted);
}

async fn delete_removes_everything(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let delete = DeleteUserMetadataRequest {
        user_id: "u1".into(),
        expected_version: None,
    };
    assert!(
        !s.users
            .delete(delete.clone())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let first = s
        .users
        .merge(merge(
            "u1",
            Some(json!({"a":1})),
            Some(json!({"b":2})),
            Some(json!({"c":3})),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.users
            .delete(delete.clone())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let m = get(&mut s, "u1").await;
    assert_eq!(
        (fields(&m), m.version),
        ((json!({}), json!({}), json!({})), 0)
    );
    assert!(m.created_at.is_none());
    assert!(!s.users.delete(delete).await.unwrap().into_inner().existed);
    // Written again, it starts over.
    let again = s
        .users
        .merge(merge("u1", Some(json!({"z":1})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, 1);
    assert_eq!(fields(&again), (json!({"z":1}), json!({}), json!({})));
    assert!(micros(&again.created_at) >= micros(&first.created_at));
}

async fn numbers_keep_their_form(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let numbers = json!({"int":1.0,"neg":-42,"frac":1.5,"big":9007199254740992.0,"huge":1e300,"tiny":1e-300,"precise":93474.39979392891,"sum":0.30000000000000004});
    let m = s
        .users
        .merge(merge("u1", Some(numbers.clone()), None, None))
        .await
        .unwrap()
        .into_inner();
    let expected = json!({"int":1,"neg":-42,"frac":1.5,"big":9007199254740992.0,"huge":1e300,"tiny":1e-300,"precise":93474.39979392891,"sum":0.30000000000000004});
    assert_eq!(field(&m.public_metadata), expected);
    assert_eq!(field(&get(&mut s, "u1").await.public_metadata), expected);
    // Integral values are stored as JSON integers.
    let stored = stored_json(&s, "u1").await;
    assert_eq!(stored["int"].to_string(), "1");
    assert_eq!(stored["big"].to_string(), "9007199254740992");
    assert_eq!(stored["frac"].to_string(), "1.5");
}

/// The public metadata as the database holds it, read with raw SQL.
async fn stored_json(s: &TestServer, id: &str) -> Json {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(s.db.url()).await.unwrap();
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DatabaseBackend::Postgres => {
            "SELECT public_metadata::text AS t FROM metadata WHERE id = $1"
        }
        _ => "SELECT CAST(public_metadata AS TEXT) AS t FROM metadata WHERE id = $1",
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(backend, sql, [id.into()]))
        .await
        .unwrap()
        .expect("row exists");
    let text: String = row.try_get("", "t").unwrap();
    db.close().await.ok();
    serde_json::from_str(&text).unwrap()
}

async fn invalid_input_is_refused_and_nothing_is_written(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    s.users
        .merge(merge("u1", Some(json!({"keep":1})), None, None))
        .await
        .unwrap();
    let before = get(&mut s, "u1").await;

    let deep = (1..33).fold(json!({}), |inner, _| json!({ "k": inner }));
    let ok_deep = (1..32).fold(json!({}), |inner, _| json!({ "k": inner }));
    let cases: Vec<(&str, MergeUserMetadataRequest, &str)> = vec![
        (
            "NaN",
            merge("u1", Some(json!({"keep":1})), None, None),
            "public_metadata.n: NaN",
        ),
        (
            "nul key",
            merge("u1", Some(json!({"a\u{0}b":1})), None, None),
            "U+0000",
        ),
        (
            "nul string",
            merge("u1", None, Some(json!({"a":["x\u{0}"]})), None),
            "private_metadata.a[0]: string contains U+0000",
        ),
        (
            "too deep",
            merge("u1", None, None, Some(deep)),
            "nesting depth 33 exceeds the limit of 32",
        ),
        (
            // Small enough alone; too large with the stored {"keep":1}.
            "result too large",
            merge("u1", Some(json!({"big":"x".repeat(8180)})), None, None),
            "public_metadata: is 8199 bytes as compact JSON, the limit is 8192",
        ),
        (
            "patch too large on its own",
            merge("u1", Some(json!({"big":"x".repeat(8200)})), None, None),
            "public_metadata: would be at least 8210 bytes as compact JSON, the limit is 8192",
        ),
    ];
    for (name, mut request, expected) in cases {
        if name == "NaN" {
            request.public_metadata.as_mut().unwrap().fields.insert(
                "n".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
                },
            );
        }
        let status = assert_code(s.users.merge(request).await, Code::InvalidArgument);
        assert!(
            status.message().contains(expected),
            "{name}: {}",
            status.message()
        );
        assert_eq!(get(&mut s, "u1").await, before, "{name}: nothing written");
    }
    // 32 levels is within the limit.
    s.users
        .merge(merge("u2", Some(ok_deep), None, None))
        .await
        .unwrap();

    // A merge whose result, not its request, is over the limit.
    let half = "y".repeat(5000);
    s.users
        .merge(merge("u3", Some(json!({"a": half})), None, None))
        .await
        .unwrap();
    let before3 = get(&mut s, "u3").await;
    let status = assert_code(
        s.users
            .merge(merge("u3", Some(json!({"b": half})), None, None))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("public_metadata: is 10015 bytes"),
        "{}",
        status.message()
    );
    assert_eq!(get(&mut s, "u3").await, before3);
}

async fn ids_are_validated_on_every_rpc(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for bad in [
        "",
        " ",
        "a b",
        "tab\t",
        "new\nline",
        "ünïcode",
        &"x".repeat(257),
        "nul\0",
    ] {
        let status = assert_code(
            s.users
                .get(GetUserMetadataRequest {
                    user_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(
            status.message().starts_with("user_id: "),
            "{}",
            status.message()
        );
        assert_code(
            s.users
                .merge(merge(bad, Some(json!({"a":1})), None, None))
                .await,
            Code::InvalidArgument,
        );
        assert_code(
            s.users
                .replace(replace(bad, Some(json!({"a":1})), None, None))
                .await,
            Code::InvalidArgument,
        );
        assert_code(
            s.users
                .delete(DeleteUserMetadataRequest {
                    user_id: bad.into(),
                    expected_version: None,
                })
                .await,
            Code::InvalidArgument,
        );
        let status = assert_code(
            s.orgs
                .get(GetOrganizationMetadataRequest {
                    organization_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(
            status.message().starts_with("organization_id: "),
            "{}",
            status.message()
        );
    }
    // The longest valid id works.
    let long = "x".repeat(256);
    let m = s
        .users
        .merge(merge(&long, Some(json!({"a":1})), None, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.version, 1);
}

async fn organizations_have_public_and_private_only(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let org = s
        .orgs
        .merge(MergeOrganizationMetadataRequest {
            organization_id: "org_1".into(),
            public_metadata: Some(structure(&json!({"tier":"pro","x":{"y":1}}))),
            private_metadata: Some(structure(&json!({"billing":"b"}))),
            expected_version: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(org.version, 1);
    let org = s
        .orgs
        .merge(MergeOrganizationMetadataRequest {
            organization_id: "org_1".into(),
            public_metadata: Some(structure(&json!({"x":{"y":null,"z":2}}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        field(&org.public_metadata),
        json!({"tier":"pro","x":{"z":2}})
    );
    let org = s
        .orgs
        .replace(ReplaceOrganizationMetadataRequest {
            organization_id: "org_1".into(),
            private_metadata: Some(value(&Json::Null)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (field(&org.public_metadata), field(&org.private_metadata)),
        (json!({"tier":"pro","x":{"z":2}}), Json::Null)
    );
    assert_eq!(org.version, 3);
    // Users and organizations are separate namespaces.
    assert_eq!(get(&mut s, "org_1").await.version, 0);
    let deleted = s
        .orgs
        .delete(DeleteOrganizationMetadataRequest {
            organization_id: "org_1".into(),
            expected_version: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    assert_code(
        s.orgs
            .replace(ReplaceOrganizationMetadataRequest {
                organization_id: "org_1".into(),
                public_metadata: Some(value(&json!(3))),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
}

async fn concurrent_merges_lose_no_update(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    const CLIENTS: usize = 16;
    const KEYS: usize = 10;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut users = s.users.clone();
        tasks.push(tokio::spawn(async move {
            for key in 0..KEYS {
                let patch = json!({ format!("c{client}_k{key}"): key });
                users
                    .merge(merge("shared", Some(patch), None, None))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut users = s.users.clone();
    let m = users
        .get(GetUserMetadataRequest {
            user_id: "shared".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Json::Object(map) = field(&m.public_metadata) else {
        panic!("object")
    };
    assert_eq!(map.len(), CLIENTS * KEYS);
    assert_eq!(m.version, (CLIENTS * KEYS) as u64);
}

async fn concurrent_first_writes_to_a_new_id(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    const CLIENTS: usize = 16;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut users = s.users.clone();
        tasks.push(tokio::spawn(async move {
            users
                .merge(merge(
                    "fresh",
                    None,
                    Some(json!({ format!("c{client}"): client })),
                    None,
                ))
                .await
                .map(|r| r.into_inner().version)
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().expect("no first write fails"));
    }
    versions.sort();
    assert_eq!(
        versions,
        (1..=CLIENTS as u64).collect::<Vec<_>>(),
        "each write got its own version"
    );
    let mut users = s.users.clone();
    let m = users
        .get(GetUserMetadataRequest {
            user_id: "fresh".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Json::Object(map) = field(&m.private_metadata) else {
        panic!("object")
    };
    assert_eq!(map.len(), CLIENTS);
}

backend_tests!(
    unknown_id_reads_as_empty,
    merge_is_deep_and_null_removes,
    merge_leaves_omitted_fields_untouched,
    replace_overwrites_each_provided_field,
    replace_with_a_non_struct_is_refused,
    writes_that_change_nothing_keep_the_version,
    expected_version_guards_every_write,
    delete_removes_everything,
    numbers_keep_their_form,
    invalid_input_is_refused_and_nothing_is_written,
    ids_are_validated_on_every_rpc,
    organizations_have_public_and_private_only,
    concurrent_merges_lose_no_update,
    concurrent_first_writes_to_a_new_id,
);
