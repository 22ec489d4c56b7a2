//! The semantics of every RPC, for users and organizations from one source,
//! run against SQLite and Postgres through the generated clients on a real
//! server.

use metadata_service::model::Field;
use serde_json::{Value as Json, json};
use tonic::Code;

use crate::common::Backend;
use crate::common::json::{field, structure, value};
use crate::harness::{TestServer, start};
use crate::kinds::{Delete, Get, Kind, KindClient, Merge, Record, Replace};

async fn get(c: &mut KindClient, id: &str) -> Record {
    c.get(Get::new(id)).await.expect("get")
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

async fn unknown_id_reads_as_empty(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let m = get(&mut c, "never_written").await;
    assert_eq!(m.id, "never_written");
    assert_eq!(
        m.fields(),
        (json!({}), json!({}), kind.users_only(json!({})))
    );
    assert_eq!(m.version, 0);
    assert!(m.created_at.is_none() && m.updated_at.is_none());
}

async fn merge_is_deep_and_null_removes(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let first = c
        .merge(Merge::new("u1").public(json!({"a":{"b":1,"c":2},"d":[1,2]})))
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(field(&first.public), json!({"a":{"b":1,"c":2},"d":[1,2]}));
    assert!(first.created_at.is_some());
    assert_eq!(first.created_at, first.updated_at);

    let second = c
        .merge(Merge::new("u1").public(json!({"a":{"c":null,"e":3},"d":[3]})))
        .await
        .unwrap();
    assert_eq!(field(&second.public), json!({"a":{"b":1,"e":3},"d":[3]}));
    assert_eq!(second.version, 2);
    assert_eq!(second.created_at, first.created_at);
    assert!(micros(&second.updated_at) >= micros(&first.updated_at));
    assert_eq!(
        get(&mut c, "u1").await,
        second,
        "Get returns what Merge returned"
    );

    // Null removes at any depth; removing an absent key is harmless.
    let third = c
        .merge(Merge::new("u1").public(json!({"a":{"b":null},"x":{"y":{"z":null}}})))
        .await
        .unwrap();
    assert_eq!(
        field(&third.public),
        json!({"a":{"e":3},"d":[3],"x":{"y":{}}})
    );
}

async fn merge_leaves_omitted_fields_untouched(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(
        Merge::new("u1")
            .public(json!({"p":1}))
            .private(json!({"s":1}))
            .unsafe_(kind.users_only(json!({"u":1}))),
    )
    .await
    .unwrap();
    let m = c
        .merge(Merge::new("u1").private(json!({"s2":2})))
        .await
        .unwrap();
    assert_eq!(
        m.fields(),
        (
            json!({"p":1}),
            json!({"s":1,"s2":2}),
            kind.users_only(json!({"u":1}))
        )
    );
}

async fn replace_overwrites_each_provided_field(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(
        Merge::new("u1")
            .public(json!({"a":{"b":1,"c":2}}))
            .private(json!({"k":1}))
            .unsafe_(kind.users_only(json!({"t":1}))),
    )
    .await
    .unwrap();
    // No merge at any level; omitted fields untouched.
    let m = c
        .replace(Replace::new("u1").public(json!({"a":{"z":9}})))
        .await
        .unwrap();
    assert_eq!(
        m.fields(),
        (
            json!({"a":{"z":9}}),
            json!({"k":1}),
            kind.users_only(json!({"t":1}))
        )
    );
    assert_eq!(m.version, 2);

    // {} clears, null stores null, and both survive a Get.
    let m = c
        .replace(
            Replace::new("u1")
                .private(json!({}))
                .unsafe_(kind.users_only(Json::Null)),
        )
        .await
        .unwrap();
    let expected = (json!({"a":{"z":9}}), json!({}), kind.users_only(Json::Null));
    assert_eq!(m.fields(), expected);
    let read = get(&mut c, "u1").await;
    assert_eq!(read.fields(), expected);
    if kind == Kind::User {
        assert!(matches!(
            read.unsafe_.unwrap().kind,
            Some(prost_types::value::Kind::NullValue(_))
        ));
    }

    // The same in private_metadata, which both kinds have.
    let m = c
        .replace(Replace::new("u1").private(Json::Null))
        .await
        .unwrap();
    let expected = (
        json!({"a":{"z":9}}),
        Json::Null,
        kind.users_only(Json::Null),
    );
    assert_eq!(m.fields(), expected);
    let read = get(&mut c, "u1").await;
    assert_eq!(read.fields(), expected);
    assert!(matches!(
        read.private.unwrap().kind,
        Some(prost_types::value::Kind::NullValue(_))
    ));

    // Merge into a stored null starts from {}.
    let m = c
        .merge(
            Merge::new("u1")
                .private(json!({"n":1}))
                .unsafe_(kind.users_only(json!({"n":1}))),
        )
        .await
        .unwrap();
    assert_eq!(
        m.fields(),
        (
            json!({"a":{"z":9}}),
            json!({"n":1}),
            kind.users_only(json!({"n":1}))
        )
    );
}

async fn replace_with_a_non_struct_is_refused(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(Merge::new("u1").public(json!({"keep":1})))
        .await
        .unwrap();
    let before = get(&mut c, "u1").await;
    let bad_values = [
        value(&json!(1)),
        value(&json!("text")),
        value(&json!(true)),
        value(&json!([1, 2])),
        prost_types::Value { kind: None },
    ];
    for bad in bad_values {
        let request = Replace::new("u1")
            .private(json!({"ok":1}))
            .value(Field::Public, bad.clone());
        let status = assert_code(c.replace(request).await, Code::InvalidArgument);
        assert!(
            status.message().starts_with("public_metadata"),
            "{}",
            status.message()
        );
    }
    assert_eq!(get(&mut c, "u1").await, before, "nothing was written");
}

async fn writes_that_change_nothing_keep_the_version(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    // A no-op on an unknown id stores nothing.
    let m = c.merge(Merge::new("new").public(json!({}))).await.unwrap();
    assert_eq!(m.version, 0);
    assert!(m.created_at.is_none());
    let m = c
        .replace(Replace::new("new").public(json!({})))
        .await
        .unwrap();
    assert_eq!(m.version, 0);

    let written = c
        .merge(Merge::new("u1").public(json!({"a":{"b":1}})))
        .await
        .unwrap();
    for request in [
        Merge::new("u1").public(json!({"a":{"b":1}})),
        Merge::new("u1")
            .public(json!({"missing":null}))
            .private(json!({})),
    ] {
        let again = c.merge(request).await.unwrap();
        assert_eq!(again, written, "same version and updated_at");
    }
    let again = c
        .replace(
            Replace::new("u1")
                .public(json!({"a":{"b":1}}))
                .private(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(again, written);
    // A double that equals the stored integer is the same value.
    let again = c
        .merge(Merge::new("u1").public(json!({"a":{"b":1.0}})))
        .await
        .unwrap();
    assert_eq!(again.version, 1);
}

async fn expected_version_guards_every_write(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let request = Merge::new("u1").public(json!({"a":1}));
    let status = assert_code(
        c.merge(request.clone().expected_version(1)).await,
        Code::Aborted,
    );
    assert!(
        status.message().contains("current version is 0"),
        "{}",
        status.message()
    );
    assert_eq!(get(&mut c, "u1").await.version, 0);

    let request = request.expected_version(0);
    assert_eq!(c.merge(request.clone()).await.unwrap().version, 1);
    // Same expected version again: the first writer won.
    assert_code(c.merge(request).await, Code::Aborted);

    let r = Replace::new("u1").public(json!({"b":2}));
    assert_code(
        c.replace(r.clone().expected_version(0)).await,
        Code::Aborted,
    );
    assert_eq!(c.replace(r.expected_version(1)).await.unwrap().version, 2);

    let delete = |v| Delete::new("u1").expected_version(v);
    assert_code(c.delete(delete(1)).await, Code::Aborted);
    assert_eq!(field(&get(&mut c, "u1").await.public), json!({"b":2}));
    assert!(c.delete(delete(2)).await.unwrap());
    // A no-op still checks the version.
    let noop = Merge::new("u1").public(json!({})).expected_version(5);
    assert_code(c.merge(noop).await, Code::Aborted);
}

async fn delete_removes_everything(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let delete = Delete::new("u1");
    assert!(!c.delete(delete.clone()).await.unwrap());
    let first = c
        .merge(
            Merge::new("u1")
                .public(json!({"a":1}))
                .private(json!({"b":2}))
                .unsafe_(kind.users_only(json!({"c":3}))),
        )
        .await
        .unwrap();
    assert!(c.delete(delete.clone()).await.unwrap());
    let m = get(&mut c, "u1").await;
    assert_eq!(
        (m.fields(), m.version),
        ((json!({}), json!({}), kind.users_only(json!({}))), 0)
    );
    assert!(m.created_at.is_none());
    assert!(!c.delete(delete).await.unwrap());
    // Written again, it starts over.
    let again = c
        .merge(Merge::new("u1").public(json!({"z":1})))
        .await
        .unwrap();
    assert_eq!(again.version, 1);
    assert_eq!(
        again.fields(),
        (json!({"z":1}), json!({}), kind.users_only(json!({})))
    );
    assert!(micros(&again.created_at) >= micros(&first.created_at));
}

async fn numbers_keep_their_form(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let numbers = json!({"int":1.0,"neg":-42,"frac":1.5,"big":9007199254740992.0,"huge":1e300,"tiny":1e-300,"precise":93474.39979392891,"sum":0.30000000000000004});
    let m = c
        .merge(Merge::new("u1").public(numbers.clone()))
        .await
        .unwrap();
    let expected = json!({"int":1,"neg":-42,"frac":1.5,"big":9007199254740992.0,"huge":1e300,"tiny":1e-300,"precise":93474.39979392891,"sum":0.30000000000000004});
    assert_eq!(field(&m.public), expected);
    assert_eq!(field(&get(&mut c, "u1").await.public), expected);
    // Integral values are stored as JSON integers.
    let stored = stored_json(&s, kind, "u1").await;
    assert_eq!(stored["int"].to_string(), "1");
    assert_eq!(stored["big"].to_string(), "9007199254740992");
    assert_eq!(stored["frac"].to_string(), "1.5");
}

/// The public metadata as the database holds it, read with raw SQL.
async fn stored_json(s: &TestServer, kind: Kind, id: &str) -> Json {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(s.db.url()).await.unwrap();
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DatabaseBackend::Postgres => {
            "SELECT public_metadata::text AS t FROM metadata WHERE kind = $1 AND id = $2"
        }
        _ => "SELECT CAST(public_metadata AS TEXT) AS t FROM metadata WHERE kind = $1 AND id = $2",
    };
    let kind = match kind {
        Kind::User => "user",
        Kind::Organization => "organization",
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [kind.into(), id.into()],
        ))
        .await
        .unwrap()
        .expect("row exists");
    let text: String = row.try_get("", "t").unwrap();
    db.close().await.ok();
    serde_json::from_str(&text).unwrap()
}

async fn invalid_input_is_refused_and_nothing_is_written(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(Merge::new("u1").public(json!({"keep":1})))
        .await
        .unwrap();
    let before = get(&mut c, "u1").await;

    let deep = (1..33).fold(json!({}), |inner, _| json!({ "k": inner }));
    let ok_deep = (1..32).fold(json!({}), |inner, _| json!({ "k": inner }));
    // The kind's last field: unsafe_metadata for users, private for
    // organizations.
    let last = *kind.fields().last().unwrap();
    let cases: Vec<(&str, Merge, &str)> = vec![
        (
            "NaN",
            Merge::new("u1").public(json!({"keep":1})),
            "public_metadata.n: NaN",
        ),
        (
            "nul key",
            Merge::new("u1").public(json!({"a\u{0}b":1})),
            "U+0000",
        ),
        (
            "nul string",
            Merge::new("u1").private(json!({"a":["x\u{0}"]})),
            "private_metadata.a[0]: string contains U+0000",
        ),
        (
            "too deep",
            Merge::new("u1").patch(last, structure(&deep)),
            "nesting depth 33 exceeds the limit of 32",
        ),
        (
            // Small enough alone; too large with the stored {"keep":1}.
            "result too large",
            Merge::new("u1").public(json!({"big":"x".repeat(8180)})),
            "public_metadata: is 8199 bytes as compact JSON, the limit is 8192",
        ),
        (
            "patch too large on its own",
            Merge::new("u1").public(json!({"big":"x".repeat(8200)})),
            "public_metadata: would be at least 8210 bytes as compact JSON, the limit is 8192",
        ),
    ];
    for (name, mut request, expected) in cases {
        if name == "NaN" {
            request.public.as_mut().unwrap().fields.insert(
                "n".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
                },
            );
        }
        let status = assert_code(c.merge(request).await, Code::InvalidArgument);
        assert!(
            status.message().contains(expected),
            "{name}: {}",
            status.message()
        );
        assert_eq!(get(&mut c, "u1").await, before, "{name}: nothing written");
    }
    // 32 levels is within the limit.
    c.merge(Merge::new("u2").public(ok_deep)).await.unwrap();

    // A merge whose result, not its request, is over the limit.
    let half = "y".repeat(5000);
    c.merge(Merge::new("u3").public(json!({"a": half})))
        .await
        .unwrap();
    let before3 = get(&mut c, "u3").await;
    let status = assert_code(
        c.merge(Merge::new("u3").public(json!({"b": half}))).await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("public_metadata: is 10015 bytes"),
        "{}",
        status.message()
    );
    assert_eq!(get(&mut c, "u3").await, before3);
}

async fn ids_are_validated_on_every_rpc(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let prefix = format!("{}: ", kind.id_field());
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
        let refusals = [
            assert_code(c.get(Get::new(bad)).await, Code::InvalidArgument),
            assert_code(
                c.merge(Merge::new(bad).public(json!({"a":1}))).await,
                Code::InvalidArgument,
            ),
            assert_code(
                c.replace(Replace::new(bad).public(json!({"a":1}))).await,
                Code::InvalidArgument,
            ),
            assert_code(c.delete(Delete::new(bad)).await, Code::InvalidArgument),
        ];
        for status in refusals {
            assert!(
                status.message().starts_with(&prefix),
                "{bad:?}: {}",
                status.message()
            );
        }
    }
    // The longest valid id works.
    let long = "x".repeat(256);
    let m = c
        .merge(Merge::new(&long).public(json!({"a":1})))
        .await
        .unwrap();
    assert_eq!(m.version, 1);
}

/// Users and organizations are separate namespaces: the same id in the
/// other kind is another record, untouched by writes to this one.
async fn kinds_are_separate_namespaces(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let (mut c, mut other) = (kind.client(&s), kind.other().client(&s));
    let written = c
        .merge(
            Merge::new("same_id")
                .public(json!({"p":1}))
                .private(json!({"s":1})),
        )
        .await
        .unwrap();
    assert_eq!(written.version, 1);
    let theirs = get(&mut other, "same_id").await;
    assert_eq!(theirs.version, 0);
    assert_eq!(
        theirs.fields(),
        (json!({}), json!({}), kind.other().users_only(json!({})))
    );
    assert!(!other.delete(Delete::new("same_id")).await.unwrap());
    let theirs = other
        .merge(Merge::new("same_id").public(json!({"q":2})))
        .await
        .unwrap();
    assert_eq!(theirs.version, 1);
    assert_eq!(get(&mut c, "same_id").await, written);
}

async fn organizations_have_public_and_private_only(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut orgs = Kind::Organization.client(&s);
    let org = orgs
        .merge(
            Merge::new("org_1")
                .public(json!({"tier":"pro","x":{"y":1}}))
                .private(json!({"billing":"b"}))
                .expected_version(0),
        )
        .await
        .unwrap();
    assert_eq!(org.version, 1);
    let org = orgs
        .merge(Merge::new("org_1").public(json!({"x":{"y":null,"z":2}})))
        .await
        .unwrap();
    assert_eq!(field(&org.public), json!({"tier":"pro","x":{"z":2}}));
    let org = orgs
        .replace(Replace::new("org_1").private(Json::Null))
        .await
        .unwrap();
    assert_eq!(
        org.fields(),
        (json!({"tier":"pro","x":{"z":2}}), Json::Null, None)
    );
    assert_eq!(org.version, 3);
    // Users and organizations are separate namespaces.
    let mut users = Kind::User.client(&s);
    assert_eq!(get(&mut users, "org_1").await.version, 0);
    let deleted = orgs
        .delete(Delete::new("org_1").expected_version(3))
        .await
        .unwrap();
    assert!(deleted);
    assert_code(
        orgs.replace(Replace::new("org_1").public(json!(3))).await,
        Code::InvalidArgument,
    );
}

async fn concurrent_merges_lose_no_update(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    const CLIENTS: usize = 16;
    const KEYS: usize = 10;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut c = kind.client(&s);
        tasks.push(tokio::spawn(async move {
            for key in 0..KEYS {
                let patch = json!({ format!("c{client}_k{key}"): key });
                c.merge(Merge::new("shared").public(patch)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let m = get(&mut kind.client(&s), "shared").await;
    let Json::Object(map) = field(&m.public) else {
        panic!("object")
    };
    assert_eq!(map.len(), CLIENTS * KEYS);
    assert_eq!(m.version, (CLIENTS * KEYS) as u64);
}

async fn concurrent_first_writes_to_a_new_id(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    const CLIENTS: usize = 16;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut c = kind.client(&s);
        tasks.push(tokio::spawn(async move {
            c.merge(Merge::new("fresh").private(json!({ format!("c{client}"): client })))
                .await
                .map(|r| r.version)
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
    let m = get(&mut kind.client(&s), "fresh").await;
    let Json::Object(map) = field(&m.private) else {
        panic!("object")
    };
    assert_eq!(map.len(), CLIENTS);
}

kind_tests!(
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
    kinds_are_separate_namespaces,
    concurrent_merges_lose_no_update,
    concurrent_first_writes_to_a_new_id,
);

backend_tests!(organizations_have_public_and_private_only);
