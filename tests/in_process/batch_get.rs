//! BatchGet on a running server, for users and organizations on SQLite and
//! Postgres: answers in request order (duplicates, ids never written,
//! deleted ids), the limits on its ids, reading its own writes, the
//! revision it reflects (BatchGet, then Watch, misses nothing), who may
//! call it, and the request metrics of List and BatchGet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use tonic::Code;

use crate::auth::{BACKEND_KEY, ORG, SECRET, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::field;
use crate::common::wait::until;
use crate::harness::{start, start_with};
use crate::kinds::{Delete, Get, Kind, KindClient, Merge, Record, Replace};
use crate::list::{
    BatchGet, List, Reads, WatchFrom, apply, assert_code, merge_all, newest_revision,
};

/// Each id's Get, in order.
async fn gets(client: &mut KindClient, ids: &[&str]) -> Vec<Record> {
    let mut records = Vec::new();
    for id in ids {
        records.push(client.get(Get::new(id)).await.expect("get"));
    }
    records
}

async fn answers_in_request_order(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    for (id, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        let merge = Merge::new(id)
            .public(json!({"n": n}))
            .private(json!({"p": n}));
        let merge = match kind {
            Kind::User => merge.unsafe_(json!({"u": n})),
            Kind::Organization => merge,
        };
        c.merge(merge).await.unwrap();
    }
    assert!(c.delete(Delete::new("d")).await.unwrap());

    let ids = ["c", "never", "a", "d", "a", "b", "c", "never"];
    let (records, revision) = c.batch_get(BatchGet::new(ids)).await.unwrap();
    // The same records as each id's Get, in request order.
    assert_eq!(records, gets(&mut c, &ids).await);
    let (n, never, d) = (&records[0], &records[1], &records[3]);
    assert_eq!(n.version, 1);
    assert_eq!(
        n.fields(),
        (
            json!({"n": 3}),
            json!({"p": 3}),
            kind.users_only(json!({"u": 3}))
        )
    );
    for (empty, what) in [(never, "never written"), (d, "deleted")] {
        assert_eq!(empty.version, 0, "{what}");
        assert_eq!(
            empty.fields(),
            (json!({}), json!({}), kind.users_only(json!({}))),
            "{what}"
        );
        assert!(empty.created_at.is_none() && empty.updated_at.is_none());
    }
    assert_eq!(never.revision, 0);
    assert_eq!((never.id.as_str(), d.id.as_str()), ("never", "d"));
    // Nothing later than what was written.
    let newest = newest_revision(&s).await;
    assert!(revision <= newest, "{revision} beyond {newest}");

    // Of the other kind, the same ids are another namespace.
    let (theirs, _) = kind
        .other()
        .client(&s)
        .batch_get(BatchGet::new(["a"]))
        .await
        .unwrap();
    assert_eq!(theirs[0].version, 0);
}

async fn ids_are_checked(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let written = c
        .merge(Merge::new("id0999").public(json!({"here": true})))
        .await
        .unwrap();
    let ids_field = match kind {
        Kind::User => "user_ids",
        Kind::Organization => "organization_ids",
    };

    let status = assert_code(
        c.batch_get(BatchGet::new(Vec::<String>::new())).await,
        Code::InvalidArgument,
    );
    assert!(status.message().starts_with(ids_field), "{status:?}");

    let distinct: Vec<String> = (0..1000).map(|i| format!("id{i:04}")).collect();
    let mut too_many = distinct.clone();
    too_many.push("id1000".into());
    let status = assert_code(
        c.batch_get(BatchGet::new(&too_many)).await,
        Code::InvalidArgument,
    );
    assert!(status.message().starts_with(ids_field), "{status:?}");
    assert!(status.message().contains("1001"), "{status:?}");

    // 1,000 distinct ids, some asked again: answered, in order.
    let mut asked = distinct.clone();
    asked.extend(distinct.iter().rev().step_by(3).cloned());
    asked.insert(0, "id0999".into());
    let (records, _) = c.batch_get(BatchGet::new(&asked)).await.unwrap();
    let answered: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(answered, asked);
    for record in &records {
        if record.id == "id0999" {
            assert_eq!(record, &written);
        } else {
            assert_eq!(record.version, 0, "{record:?}");
        }
    }

    // An invalid id is named by its index.
    let long = "x".repeat(257);
    for (bad, says) in [
        ("", "must not be empty"),
        ("has space", "printable ASCII"),
        (long.as_str(), "257 bytes"),
    ] {
        let ids = ["a", "b", "a", bad, "e"];
        let status = assert_code(c.batch_get(BatchGet::new(ids)).await, Code::InvalidArgument);
        let message = status.message();
        assert!(
            message.starts_with(&format!("{ids_field}[3]: ")),
            "{message}"
        );
        assert!(message.contains(says), "{message}");
    }
}

/// A BatchGet issued after a write was acknowledged reflects it; its
/// revision is never beyond what was written, and reaches the newest write
/// once the server has dispatched it.
async fn reads_its_writes(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    for i in 0..20 {
        let id = format!("w{}", i % 4);
        let written = c
            .merge(Merge::new(&id).public(json!({"i": i})))
            .await
            .unwrap();
        let (records, revision) = c
            .batch_get(BatchGet::new([id.as_str(), "w9"]))
            .await
            .unwrap();
        assert_eq!(records[0], written, "write {i} not read back");
        let newest = newest_revision(&s).await;
        assert!(revision <= newest, "{revision} beyond {newest}");
    }
    c.delete(Delete::new("w2")).await.unwrap();
    let (records, _) = c.batch_get(BatchGet::new(["w2"])).await.unwrap();
    assert_eq!(records[0].version, 0, "the delete not read back");

    // The newest change; the server's mark reaches it once dispatched.
    let newest = s.db.event_revisions().await.into_iter().max().unwrap();
    let what = format!("the revision reaches {newest}");
    until(&what, std::time::Duration::from_secs(10), async || {
        let (_, revision) = c.batch_get(BatchGet::new(["w0"])).await.unwrap();
        let assigned = newest_revision(&s).await;
        assert!(revision <= assigned, "{revision} beyond {assigned}");
        if revision >= newest {
            Ok(())
        } else {
            Err(revision)
        }
    })
    .await;
}

/// Records change and go while BatchGet reads them; then more changes
/// come. The records read, and a Watch from the read's revision + 1, give
/// the current state: nothing after the read is missed.
async fn batch_get_then_watch_has_no_gap(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let ids: Vec<String> = (0..12).map(|i| format!("g{i:02}")).collect();
    merge_all(
        &c,
        ids[..8]
            .iter()
            .map(|id| Merge::new(id).public(json!({"n": 0})))
            .collect(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut c, ids, stop) = (c.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while i < 20 || !stop.load(Ordering::SeqCst) {
                let id = &ids[i * 5 % ids.len()];
                if i % 4 == 3 {
                    c.delete(Delete::new(id)).await.unwrap();
                } else {
                    c.merge(Merge::new(id).public(json!({"n": i})))
                        .await
                        .unwrap();
                }
                i += 1;
            }
        })
    };
    // A few reads while the writer runs; the watch starts after the first.
    let (read, revision) = c.batch_get(BatchGet::new(&ids)).await.unwrap();
    for _ in 0..3 {
        c.batch_get(BatchGet::new(&ids)).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    let mut later = Vec::new();
    for id in ids.iter().step_by(4) {
        let record = c
            .merge(Merge::new(id).public(json!({"late": true})))
            .await
            .unwrap();
        later.push(record.revision);
    }
    c.delete(Delete::new(&ids[3])).await.unwrap();
    later.push(c.get(Get::new(&ids[3])).await.unwrap().revision);
    let last = c
        .merge(Merge::new(&ids[1]).public(json!({"last": true})))
        .await
        .unwrap()
        .revision;
    later.push(last);

    let mut state: BTreeMap<String, Record> = read.into_iter().map(|r| (r.id.clone(), r)).collect();
    let request = WatchFrom {
        start_revision: revision + 1,
        filter: String::new(),
    };
    let mut changes = c.watch_from(request).await.unwrap();
    let mut delivered = Vec::new();
    while delivered.last() != Some(&last) {
        let change = changes.next().await;
        assert!(change.revision > revision, "{change:?}");
        delivered.push(change.revision);
        apply(&mut state, change);
    }
    for revision in later {
        assert!(
            delivered.contains(&revision),
            "the change at {revision} after the read was not delivered"
        );
    }
    let replayed: Vec<Record> = state.into_values().collect();
    let (now, _) = c.batch_get(BatchGet::new(&ids)).await.unwrap();
    assert_eq!(replayed, now, "read + watch = the current state");
}

/// A frontend token may BatchGet only what it may Get, and sees the same
/// fields: its own user (public and unsafe), the organization in its claim
/// (public).
async fn frontend_batch_gets_only_what_it_may_get(backend: Backend, kind: Kind) {
    let auth = authenticator(SECRET);
    let Some(s) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let mut c = kind.client(&s);
    let (own, other) = match kind {
        Kind::User => (USER, "user_2"),
        Kind::Organization => (ORG, "org_2"),
    };
    for id in [own, other] {
        let replace = Replace::new(id)
            .public(json!({"plan": id}))
            .private(json!({"secret": id}));
        let replace = match kind {
            Kind::User => replace.unsafe_(json!({"theme": id})),
            Kind::Organization => replace,
        };
        c.replace(with_token(replace, Some(BACKEND_KEY)))
            .await
            .unwrap();
    }
    let token = session(USER, Some(ORG));

    let get = c
        .get(with_token(Get::new(own), Some(&token)))
        .await
        .unwrap();
    assert_eq!(field(&get.public), json!({"plan": own}));
    assert_eq!(get.private, None);
    assert_eq!(get.unsafe_.is_some(), kind == Kind::User);
    for ids in [vec![own], vec![own, own]] {
        let (records, _) = c
            .batch_get(with_token(BatchGet::new(&ids), Some(&token)))
            .await
            .unwrap();
        assert_eq!(records, vec![get.clone(); ids.len()]);
    }

    let says = match kind {
        Kind::User => "only its own user",
        Kind::Organization => "only the organization in its org_id claim",
    };
    for ids in [vec![other], vec![own, other], vec![other, own, own]] {
        let status = assert_code(
            c.batch_get(with_token(BatchGet::new(&ids), Some(&token)))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains(says), "{ids:?}: {status:?}");
    }
    // A token of another user, or without an organization.
    let stranger = match kind {
        Kind::User => session("user_2", Some(ORG)),
        Kind::Organization => session(USER, None),
    };
    assert_code(
        c.batch_get(with_token(BatchGet::new([own]), Some(&stranger)))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        c.batch_get(with_token(BatchGet::new([own]), None)).await,
        Code::Unauthenticated,
    );

    // A backend key sees every field of every id.
    let (records, _) = c
        .batch_get(with_token(BatchGet::new([other, own]), Some(BACKEND_KEY)))
        .await
        .unwrap();
    assert_eq!(field(&records[0].private), json!({"secret": other}));
    assert_eq!(field(&records[1].private), json!({"secret": own}));
}

/// The request metrics name List and BatchGet, for each kind's service.
async fn list_and_batch_get_are_counted(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(Merge::new("a").public(json!({"n": 1})))
        .await
        .unwrap();
    c.list(List::new("public_metadata.n = 1")).await.unwrap();
    c.batch_get(BatchGet::new(["a", "b"])).await.unwrap();
    c.batch_get(BatchGet::new(["a"])).await.unwrap();
    assert_code(c.list(List::new("nope")).await, Code::InvalidArgument);

    let service = match kind {
        Kind::User => "metadata.v1.UserMetadataService",
        Kind::Organization => "metadata.v1.OrganizationMetadataService",
    };
    for (method, code, count) in [
        ("List", "OK", 1.0),
        ("List", "InvalidArgument", 1.0),
        ("BatchGet", "OK", 2.0),
    ] {
        let series = format!(
            r#"grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",grpc_service="{service}"}}"#
        );
        assert_eq!(s.metric(&series), count, "{series}");
    }
    for (method, count) in [("List", 2.0), ("BatchGet", 2.0)] {
        let series = format!(
            r#"grpc_server_handling_seconds_count{{grpc_method="{method}",grpc_service="{service}"}}"#
        );
        assert_eq!(s.metric(&series), count, "{series}");
    }
}

kind_tests!(
    answers_in_request_order,
    ids_are_checked,
    reads_its_writes,
    batch_get_then_watch_has_no_gap,
    frontend_batch_gets_only_what_it_may_get,
    list_and_batch_get_are_counted,
);
