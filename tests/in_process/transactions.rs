//! Commit (issue 30, items 2 and 4) on both backends: operations on users
//! and organizations applied all or none, results in request order, events
//! on consecutive revisions carrying the transaction's id; a refused
//! operation named and nothing written; bad input named by operation; no
//! reader sees part of a transaction (a pause point between two of its
//! writes); all-or-nothing under concurrent writers; backend keys only.

use std::time::Duration;

use metadata_service::proto::v1::metadata_transaction_service_client::MetadataTransactionServiceClient;
use metadata_service::proto::v1::transaction_operation::Operation as Op;
use metadata_service::proto::v1::transaction_result::Record as Result_;
use metadata_service::proto::v1::{
    BatchGetOrganizationMetadataRequest, CommitRequest, CommitResponse, DeleteUserMetadataRequest,
    GetOrganizationMetadataRequest, GetUserMetadataRequest, MergeOrganizationMetadataRequest,
    MergeUserMetadataRequest, PatchOrganizationMetadataRequest, PatchUserMetadataRequest,
    ReplaceUserMetadataRequest, TransactionOperation, WatchOrganizationMetadataRequest,
    WatchUserMetadataRequest, watch_organization_metadata_response, watch_user_metadata_response,
};
use metadata_service::reason::Reason;
use metadata_service::store::StorePauses;
use serde_json::{Value as Json, json};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::{BACKEND_KEY, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::common::json::{field, structure};
use crate::error_details::expect;
use crate::harness::{TestServer, start, start_with};

type Txn = MetadataTransactionServiceClient<Channel>;

async fn client(s: &TestServer) -> Txn {
    MetadataTransactionServiceClient::new(s.channel().await)
}

fn merge_user(id: &str, public: Json) -> TransactionOperation {
    TransactionOperation {
        operation: Some(Op::MergeUser(MergeUserMetadataRequest {
            user_id: id.into(),
            public_metadata: Some(structure(&public)),
            ..Default::default()
        })),
    }
}

fn merge_org(id: &str, public: Json, expected_version: Option<u64>) -> TransactionOperation {
    TransactionOperation {
        operation: Some(Op::MergeOrganization(MergeOrganizationMetadataRequest {
            organization_id: id.into(),
            public_metadata: Some(structure(&public)),
            expected_version,
            ..Default::default()
        })),
    }
}

fn list(ops: Json) -> prost_types::ListValue {
    crate::common::json::list(&ops)
}

fn patch_user(id: &str, ops: Json) -> TransactionOperation {
    TransactionOperation {
        operation: Some(Op::PatchUser(PatchUserMetadataRequest {
            user_id: id.into(),
            public_metadata: Some(list(ops)),
            ..Default::default()
        })),
    }
}

fn patch_org(id: &str, ops: Json) -> TransactionOperation {
    TransactionOperation {
        operation: Some(Op::PatchOrganization(PatchOrganizationMetadataRequest {
            organization_id: id.into(),
            public_metadata: Some(list(ops)),
            ..Default::default()
        })),
    }
}

fn delete_user(id: &str, expected_version: Option<u64>) -> TransactionOperation {
    TransactionOperation {
        operation: Some(Op::DeleteUser(DeleteUserMetadataRequest {
            user_id: id.into(),
            expected_version,
        })),
    }
}

fn commit(operations: Vec<TransactionOperation>) -> CommitRequest {
    CommitRequest {
        operations,
        request_id: String::new(),
    }
}

async fn user(s: &TestServer, id: &str) -> (Json, u64) {
    let got = s
        .users
        .clone()
        .get(GetUserMetadataRequest {
            user_id: id.into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    (field(&got.public_metadata), got.version)
}

async fn org(s: &TestServer, id: &str) -> (Json, u64) {
    let got = s
        .orgs
        .clone()
        .get(GetOrganizationMetadataRequest {
            organization_id: id.into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    (field(&got.public_metadata), got.version)
}

async fn seed(s: &TestServer) {
    let mut txn = client(s).await;
    txn.commit(commit(vec![
        merge_user("u1", json!({"org": "o1"})),
        merge_user("u2", json!({"keep": true})),
        merge_org("o1", json!({"seats": 1}), Some(0)),
        merge_org("o2", json!({"seats": 0}), Some(0)),
    ]))
    .await
    .unwrap();
}

async fn commits_apply_every_operation_in_order(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut txn = client(&s).await;
    let mut users = s.users.clone();
    let mut user_events = users
        .watch(WatchUserMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut orgs = s.orgs.clone();
    let mut org_events = orgs
        .watch(WatchOrganizationMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();
    user_events.next().await.unwrap().unwrap();
    org_events.next().await.unwrap().unwrap();

    let seeded = txn
        .commit(commit(vec![
            merge_user("u1", json!({"org": "o1"})),
            merge_user("u2", json!({"keep": true})),
            merge_org("o1", json!({"seats": 1}), Some(0)),
            merge_org("o2", json!({"seats": 0}), Some(0)),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seeded.results.len(), 4);
    assert_eq!(seeded.revision, 4, "four events, the last at 4");

    // Move u1 from o1 to o2, delete u2, and a no-op, in one transaction.
    let moved: CommitResponse = txn
        .commit(commit(vec![
            patch_user(
                "u1",
                json!([{"op": "test", "path": "/org", "value": "o1"},
                       {"op": "replace", "path": "/org", "value": "o2"}]),
            ),
            patch_org(
                "o1",
                json!([{"op": "test", "path": "/seats", "value": 1},
                       {"op": "replace", "path": "/seats", "value": 0}]),
            ),
            merge_org("o2", json!({"seats": 1}), Some(1)),
            delete_user("u2", Some(1)),
            delete_user("never", None),
            merge_user("u3", json!({})),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(!moved.transaction_id.is_empty());
    assert_eq!(moved.revision, 8, "four changes after revision 4");
    let kinds: Vec<String> = moved
        .results
        .iter()
        .map(|r| match r.record.as_ref().unwrap() {
            Result_::User(u) => format!("user {} v{} r{}", u.user_id, u.version, u.revision),
            Result_::Organization(o) => {
                format!("org {} v{} r{}", o.organization_id, o.version, o.revision)
            }
            Result_::Deleted(d) => format!("deleted {}", d.existed),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "user u1 v2 r5",
            "org o1 v2 r6",
            "org o2 v2 r7",
            "deleted true",
            "deleted false",
            // A merge of nothing into nothing writes nothing.
            "user u3 v0 r0",
        ]
    );
    assert_eq!(user(&s, "u1").await, (json!({"org": "o2"}), 2));
    assert_eq!(org(&s, "o1").await, (json!({"seats": 0}), 2));
    assert_eq!(org(&s, "o2").await, (json!({"seats": 1}), 2));
    assert_eq!(user(&s, "u2").await, (json!({}), 0));

    // Watch: every event, consecutive revisions, the transaction's id on
    // the second transaction's events.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let next = user_events.next().await.unwrap().unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = next.response {
            seen.push((e.revision, e.user_id, e.transaction_id));
        }
    }
    let mut org_seen = Vec::new();
    while org_seen.len() < 4 {
        let next = org_events.next().await.unwrap().unwrap();
        if let Some(watch_organization_metadata_response::Response::Event(e)) = next.response {
            org_seen.push((e.revision, e.organization_id, e.transaction_id));
        }
    }
    let first = &seen[0].2;
    assert!(!first.is_empty() && first != &moved.transaction_id);
    let t = moved.transaction_id.clone();
    assert_eq!(
        seen,
        [
            (1, "u1".into(), first.clone()),
            (2, "u2".into(), first.clone()),
            (5, "u1".into(), t.clone()),
            (8, "u2".into(), t.clone()),
        ]
    );
    assert_eq!(
        org_seen,
        [
            (3, "o1".into(), first.clone()),
            (4, "o2".into(), first.clone()),
            (6, "o1".into(), t.clone()),
            (7, "o2".into(), t.clone()),
        ]
    );
    let single = users
        .merge(MergeUserMetadataRequest {
            user_id: "u9".into(),
            public_metadata: Some(structure(&json!({"a": 1}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Single writes carry none.
    loop {
        let next = user_events.next().await.unwrap().unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = next.response {
            assert_eq!(
                (e.revision, e.transaction_id.as_str()),
                (single.revision, "")
            );
            break;
        }
    }

    // A transaction that changes nothing: no revision, no id.
    let nothing = txn
        .commit(commit(vec![merge_user("u1", json!({"org": "o2"}))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((nothing.revision, nothing.transaction_id.as_str()), (0, ""));
}

async fn a_refused_operation_writes_nothing(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    seed(&s).await;
    let mut txn = client(&s).await;
    let before = (
        user(&s, "u1").await,
        org(&s, "o1").await,
        org(&s, "o2").await,
    );
    let moves = |expected_o2: Option<u64>, seats_test: i64| {
        commit(vec![
            patch_user(
                "u1",
                json!([{"op": "replace", "path": "/org", "value": "o2"}]),
            ),
            patch_org(
                "o1",
                json!([{"op": "test", "path": "/seats", "value": seats_test},
                       {"op": "replace", "path": "/seats", "value": 0}]),
            ),
            merge_org("o2", json!({"seats": 1}), expected_o2),
        ])
    };

    // The version check of the third operation.
    let err = txn.commit(moves(Some(7), 1)).await.unwrap_err();
    let said = expect(&err, Reason::VersionMismatch);
    assert_eq!(said.metadata["operation"], "2", "{err:?}");
    assert_eq!(said.metadata["current_version"], "1");
    assert!(
        err.message().contains("operations[2].merge_organization"),
        "{err:?}"
    );

    // A failed test in the second.
    let err = txn.commit(moves(None, 5)).await.unwrap_err();
    let said = expect(&err, Reason::PatchTestFailed);
    assert_eq!(
        said.metadata["field"],
        "operations[1].patch_organization.public_metadata"
    );
    assert_eq!(said.metadata["operation"], "0");
    assert_eq!(said.metadata["path"], "/seats");

    // "Must not exist" on a record that does.
    let err = txn
        .commit(commit(vec![
            merge_user("fresh", json!({"a": 1})),
            merge_org("o1", json!({"x": 1}), Some(0)),
        ]))
        .await
        .unwrap_err();
    let said = expect(&err, Reason::VersionMismatch);
    assert_eq!(said.metadata["operation"], "1");

    let after = (
        user(&s, "u1").await,
        org(&s, "o1").await,
        org(&s, "o2").await,
    );
    assert_eq!(before, after, "nothing written");
    assert_eq!(user(&s, "fresh").await, (json!({}), 0));
    // Nor any revision taken: the next write follows the seed's.
    let next = txn.commit(moves(Some(1), 1)).await.unwrap().into_inner();
    assert_eq!(
        next.revision, 7,
        "revisions 5 to 7, right after the seed's 4"
    );
}

async fn bad_input_names_the_operation(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    seed(&s).await;
    let mut txn = client(&s).await;
    let field_of = |err: &Status, reason: Reason| {
        let said = expect(err, reason);
        said.metadata.get("field").cloned().unwrap_or_default()
    };

    let err = txn.commit(commit(vec![])).await.unwrap_err();
    assert_eq!(field_of(&err, Reason::NoOperations), "operations");

    let many = (0..101)
        .map(|i| merge_user(&format!("m{i}"), json!({"i": i})))
        .collect();
    let err = txn.commit(commit(many)).await.unwrap_err();
    assert_eq!(field_of(&err, Reason::TooManyOperations), "operations");
    assert!(err.message().contains("101"), "{err:?}");

    let err = txn
        .commit(commit(vec![
            merge_user("u1", json!({"a": 1})),
            merge_org("u1", json!({"a": 1}), None),
            delete_user("u1", None),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::DuplicateRecord),
        "operations[2].delete_user"
    );
    assert!(err.message().contains("operations[0]"), "{err:?}");

    let err = txn
        .commit(commit(vec![
            merge_user("u1", json!({"a": 1})),
            TransactionOperation { operation: None },
        ]))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err, Reason::Unspecified), "operations[1]");

    let err = txn
        .commit(commit(vec![
            merge_user("u1", json!({"a": 1})),
            patch_user("u2", json!([{"op": "frobnicate", "path": "/a"}])),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::InvalidPatch),
        "operations[1].patch_user.public_metadata[0]"
    );

    // A pointer into a scalar: found when the patch is applied.
    let err = txn
        .commit(commit(vec![
            merge_user("u1", json!({"a": 1})),
            patch_user(
                "u2",
                json!([{"op": "add", "path": "/keep/deeper", "value": 1}]),
            ),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::InvalidPatch),
        "operations[1].patch_user.public_metadata[0]"
    );

    let big = "x".repeat(300 * 1024);
    let err = txn
        .commit(commit(vec![
            merge_user("u1", json!({"a": 1})),
            patch_user("u2", json!([{"op": "add", "path": "/big", "value": big}])),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::TooLarge),
        "operations[1].patch_user.public_metadata"
    );

    let err = txn
        .commit(commit(vec![TransactionOperation {
            operation: Some(Op::PatchUser(PatchUserMetadataRequest {
                user_id: "u1".into(),
                public_metadata: Some(list(json!([]))),
                request_id: "inner".into(),
                ..Default::default()
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::RequestIdInOperation),
        "operations[0].patch_user.request_id"
    );

    let err = txn
        .commit(commit(vec![TransactionOperation {
            operation: Some(Op::ReplaceUser(ReplaceUserMetadataRequest {
                user_id: String::new(),
                ..Default::default()
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(
        field_of(&err, Reason::EmptyId),
        "operations[0].replace_user.user_id"
    );

    assert_eq!(
        user(&s, "u1").await,
        (json!({"org": "o1"}), 1),
        "nothing written"
    );
}

/// The proof of item 2: a transaction stopped between two of its writes
/// (the first written, the second not, nothing committed). Meanwhile every
/// reader sees none of it: Get, BatchGet, List and a Get at the newest
/// revision show the records as before, and Watch streams receive nothing.
/// Released, both events arrive on consecutive revisions, with its id.
async fn no_reader_sees_part_of_a_transaction(backend: Backend) {
    let pauses = StorePauses::default();
    let step = pauses.transaction_step.clone();
    let Some(s) = start_with(backend, |c| c.store.pauses = pauses).await else {
        return;
    };
    seed(&s).await;
    let mut users = s.users.clone();
    let mut user_events = users
        .watch(WatchUserMetadataRequest {
            start_revision: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut orgs = s.orgs.clone();
    let mut org_events = orgs
        .watch(WatchOrganizationMetadataRequest {
            start_revision: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    user_events.next().await.unwrap().unwrap();
    org_events.next().await.unwrap().unwrap();

    step.arm(1);
    let mut txn = client(&s).await;
    let running = tokio::spawn(async move {
        txn.commit(commit(vec![
            merge_user("u1", json!({"org": "o2"})),
            merge_org("o2", json!({"seats": 1}), Some(1)),
        ]))
        .await
    });
    assert!(
        step.reached(Duration::from_secs(10)).await,
        "the transaction stops between its writes"
    );
    // Postgres: every other writer waits for the transaction's revisions
    // (the allocation lock); SQLite: for its one writer. Readers do not.
    assert_eq!(user(&s, "u1").await, (json!({"org": "o1"}), 1));
    assert_eq!(org(&s, "o2").await, (json!({"seats": 0}), 1));
    let batch = s
        .orgs
        .clone()
        .batch_get(BatchGetOrganizationMetadataRequest {
            organization_ids: vec!["o1".into(), "o2".into()],
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.revision, 4, "as of the seed");
    assert_eq!(
        batch
            .organizations
            .iter()
            .map(|o| o.version)
            .collect::<Vec<_>>(),
        [1, 1]
    );
    let listed = s
        .users
        .clone()
        .list(metadata_service::proto::v1::ListUserMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.revision, 4);
    assert!(listed.users.iter().all(|u| u.version == 1));
    // What a subscriber receives while the transaction is stopped: nothing.
    // (A bound on how long is all a test of absence can give; the log has
    // no event above 4 to send, which the reads above show.)
    let quiet = tokio::time::timeout(Duration::from_millis(300), user_events.next()).await;
    assert!(quiet.is_err(), "no user event mid-transaction: {quiet:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(50), org_events.next()).await;
    assert!(quiet.is_err(), "no org event mid-transaction: {quiet:?}");

    step.release();
    let done = running.await.unwrap().unwrap().into_inner();
    assert_eq!(done.revision, 6);
    let event = loop {
        let next = user_events.next().await.unwrap().unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = next.response {
            break e;
        }
    };
    assert_eq!(
        (event.revision, event.transaction_id.as_str()),
        (5, done.transaction_id.as_str())
    );
    let event = loop {
        let next = org_events.next().await.unwrap().unwrap();
        if let Some(watch_organization_metadata_response::Response::Event(e)) = next.response {
            break e;
        }
    };
    assert_eq!(
        (event.revision, event.transaction_id.as_str()),
        (6, done.transaction_id.as_str())
    );
    assert_eq!(user(&s, "u1").await, (json!({"org": "o2"}), 2));
}

/// Seats move between organizations in transactions that test the counts
/// they read (`test` operations: a count changed meanwhile is ABORTED and
/// read again); readers check at every read that no seat is lost or made.
async fn transactions_under_concurrent_writers_are_all_or_nothing(backend: Backend) {
    const ORGS: usize = 4;
    const SEATS: i64 = 40;
    const MOVES: usize = 15;
    let Some(s) = start(backend).await else {
        return;
    };
    let mut txn = client(&s).await;
    let seeded = (0..ORGS)
        .map(|i| {
            merge_org(
                &format!("o{i}"),
                json!({"seats": SEATS / ORGS as i64}),
                Some(0),
            )
        })
        .collect();
    txn.commit(commit(seeded)).await.unwrap();
    let ids: Vec<String> = (0..ORGS).map(|i| format!("o{i}")).collect();

    let read = |orgs: metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient<Channel>,
                ids: Vec<String>| async move {
        let mut orgs = orgs;
        let batch = orgs
            .batch_get(BatchGetOrganizationMetadataRequest {
                organization_ids: ids,
                revision: None,
            })
            .await
            .unwrap()
            .into_inner();
        batch
            .organizations
            .iter()
            .map(|o| field(&o.public_metadata)["seats"].as_i64().unwrap())
            .collect::<Vec<i64>>()
    };
    let mut writers = Vec::new();
    for w in 0..3usize {
        let (mut txn, orgs, ids) = (client(&s).await, s.orgs.clone(), ids.clone());
        writers.push(tokio::spawn(async move {
            let mut aborted = 0;
            for m in 0..MOVES {
                let (from, to) = ((w + m) % ORGS, (w + m + 1 + m % 2) % ORGS);
                loop {
                    let seats = read(orgs.clone(), ids.clone()).await;
                    if seats[from] == 0 {
                        break;
                    }
                    let result = txn
                        .commit(commit(vec![
                            patch_org(
                                &ids[from],
                                json!([{"op": "test", "path": "/seats", "value": seats[from]},
                                       {"op": "replace", "path": "/seats", "value": seats[from] - 1}]),
                            ),
                            patch_org(
                                &ids[to],
                                json!([{"op": "test", "path": "/seats", "value": seats[to]},
                                       {"op": "replace", "path": "/seats", "value": seats[to] + 1}]),
                            ),
                        ]))
                        .await;
                    match result {
                        Ok(_) => break,
                        Err(err) if err.code() == Code::Aborted => aborted += 1,
                        Err(err) => panic!("{err:?}"),
                    }
                }
            }
            aborted
        }));
    }
    let reader = {
        let (orgs, ids) = (s.orgs.clone(), ids.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            loop {
                let seats = read(orgs.clone(), ids.clone()).await;
                assert_eq!(seats.iter().sum::<i64>(), SEATS, "a read saw {seats:?}");
                reads += 1;
                if reads >= 60 {
                    return reads;
                }
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(reader.await.unwrap() >= 60);
    let seats = read(s.orgs.clone(), ids.clone()).await;
    assert_eq!(seats.iter().sum::<i64>(), SEATS);

    // The log: each transaction's events consecutive, each its two.
    let db = s.db.connect().await;
    use sea_orm::{ConnectionTrait, Statement};
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT revision, transaction_id FROM events WHERE change_type <> 'void' \
             ORDER BY revision",
        ))
        .await
        .unwrap();
    let log: Vec<(i64, String)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get::<i64>("", "revision").unwrap(),
                r.try_get::<String>("", "transaction_id").unwrap(),
            )
        })
        .collect();
    if backend == Backend::Postgres {
        // Transactions take the revision allocation lock (1835365474, 0)
        // exclusive as a session lock, within one statement: none may
        // still hold it, or every single write would wait for ever.
        let held = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT count(*) AS held FROM pg_locks WHERE locktype = 'advisory' \
                 AND classid = 1835365474::oid AND objid = 0::oid AND granted",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "held")
            .unwrap();
        assert_eq!(held, 0, "a session still holds the allocation lock");
        s.users
            .clone()
            .merge(metadata_service::proto::v1::MergeUserMetadataRequest {
                user_id: "after".into(),
                public_metadata: Some(crate::common::json::structure(&json!({"a": 1}))),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    db.close().await.ok();
    let mut groups: Vec<(String, Vec<i64>)> = Vec::new();
    for (revision, id) in log {
        match groups.last_mut() {
            Some((last, revisions)) if *last == id => revisions.push(revision),
            _ => groups.push((id, vec![revision])),
        }
    }
    let mut ids_seen = std::collections::HashSet::new();
    for (id, revisions) in &groups[1..] {
        assert!(
            ids_seen.insert(id.clone()),
            "transaction {id} split: {groups:?}"
        );
        assert_eq!(revisions.len(), 2, "{id}: {revisions:?}");
        assert_eq!(revisions[1], revisions[0] + 1, "{id}: {revisions:?}");
    }
}

/// What the dispatcher and the relay read from the log (`read_log`): whole
/// transactions, though their batch (2 here) or their upper bound would
/// end inside one; and Watch then delivers a transaction's events in one
/// publish, one after the other.
async fn the_log_is_read_in_whole_transactions(backend: Backend) {
    use metadata_service::store::{Store, StoreOptions};
    let Some(s) = start_with(backend, |c| c.events.broker.batch = 2).await else {
        return;
    };
    let mut users = s.users.clone();
    let mut events = users
        .watch(WatchUserMetadataRequest::default())
        .await
        .unwrap()
        .into_inner();
    events.next().await.unwrap().unwrap();
    let mut txn = client(&s).await;
    txn.commit(commit(vec![merge_user("single", json!({"n": 0}))]))
        .await
        .unwrap();
    let five = (0..5)
        .map(|i| merge_user(&format!("t{i}"), json!({"n": i})))
        .collect();
    let done = txn.commit(commit(five)).await.unwrap().into_inner();
    assert_eq!(done.revision, 6);
    let mut revisions = Vec::new();
    while revisions.len() < 6 {
        let next = events.next().await.unwrap().unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = next.response {
            revisions.push(e.revision);
        }
    }
    assert_eq!(revisions, [1, 2, 3, 4, 5, 6]);

    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    let read = |after: u64, up_to: u64, limit: u64| {
        let store = &store;
        async move {
            store
                .read_log(after, up_to, limit)
                .await
                .unwrap()
                .iter()
                .map(|entry| entry.revision)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        read(0, u64::MAX, 1).await,
        [1],
        "a single write ends a read"
    );
    assert_eq!(read(0, u64::MAX, 2).await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        read(0, 3, 10).await,
        [1, 2, 3, 4, 5, 6],
        "past up_to, to its end"
    );
    assert_eq!(read(3, u64::MAX, 1).await, [4, 5, 6]);
    store.close().await.unwrap();
}

backend_tests!(
    the_log_is_read_in_whole_transactions,
    commits_apply_every_operation_in_order,
    a_refused_operation_writes_nothing,
    bad_input_names_the_operation,
    no_reader_sees_part_of_a_transaction,
    transactions_under_concurrent_writers_are_all_or_nothing,
    a_retried_request_id_is_answered_once,
    an_expired_request_id_runs_again,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_backend_keys_commit() {
    let s = start_with(Backend::Sqlite, |c| {
        c.auth = authenticator(crate::auth::SECRET)
    })
    .await
    .unwrap();
    let mut txn = client(&s).await;
    let own = commit(vec![TransactionOperation {
        operation: Some(Op::MergeUser(MergeUserMetadataRequest {
            user_id: USER.into(),
            unsafe_metadata: Some(structure(&json!({"theme": "dark"}))),
            ..Default::default()
        })),
    }]);
    let token = session(USER, Some("org_1"));
    let err = txn
        .commit(with_token(own.clone(), Some(&token)))
        .await
        .unwrap_err();
    expect(&err, Reason::BackendOnly);
    let err = txn.commit(with_token(own.clone(), None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = txn
        .commit(with_token(own.clone(), Some("not-a-key")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let done = txn
        .commit(with_token(own, Some(BACKEND_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revision, 1);
}

/// Item 3 (AIP-155): a Patch or Commit retried with its request id is
/// answered the first attempt's outcome without writing again, after a
/// restart too, and (Postgres) on another replica; a different request
/// with the id is refused; an attempt that failed recorded nothing.
async fn a_retried_request_id_is_answered_once(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    seed(&s).await;
    let id = "9f1c7e52-4b7a-4f0e-9d36-2a5c8b1e7d40";
    // Not idempotent by itself: each run appends.
    let append = || PatchUserMetadataRequest {
        user_id: "u1".into(),
        public_metadata: Some(list(json!([{"op": "add", "path": "/log/-", "value": "x"}]))),
        request_id: id.into(),
        ..Default::default()
    };
    let mut users = s.users.clone();
    // The first attempt fails (no /log yet): nothing is recorded.
    let err = users.patch(append()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    users
        .merge(MergeUserMetadataRequest {
            user_id: "u1".into(),
            public_metadata: Some(structure(&json!({"log": []}))),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = users.patch(append()).await.unwrap().into_inner();
    assert_eq!(field(&first.public_metadata)["log"], json!(["x"]));
    let again = users.patch(append()).await.unwrap().into_inner();
    assert_eq!(again, first, "answered, not run again");
    let changed = PatchUserMetadataRequest {
        public_metadata: Some(list(json!([{"op": "add", "path": "/log/-", "value": "y"}]))),
        ..append()
    };
    let err = users.patch(changed).await.unwrap_err();
    assert_eq!(
        expect(&err, Reason::RequestIdReused).metadata["field"],
        "request_id"
    );
    let err = users
        .patch(PatchUserMetadataRequest {
            request_id: "not-a-uuid".into(),
            ..append()
        })
        .await
        .unwrap_err();
    expect(&err, Reason::InvalidRequestId);

    let moved = || CommitRequest {
        operations: vec![
            patch_org("o1", json!([{"op": "add", "path": "/moves/-", "value": 1}])),
            merge_user("u2", json!({"moved": true})),
        ],
        request_id: "0c3b5a7e-2f41-4d8e-b6a9-7e15c2d4f803".into(),
    };
    let mut txn = client(&s).await;
    let err = txn.commit(moved()).await.unwrap_err();
    expect(&err, Reason::InvalidPatch);
    txn.commit(commit(vec![merge_org("o1", json!({"moves": []}), None)]))
        .await
        .unwrap();
    let committed = txn.commit(moved()).await.unwrap().into_inner();
    assert!(!committed.transaction_id.is_empty());
    assert_eq!(txn.commit(moved()).await.unwrap().into_inner(), committed);

    s.restart().await;
    let mut users = s.users.clone();
    assert_eq!(users.patch(append()).await.unwrap().into_inner(), first);
    let mut txn = client(&s).await;
    assert_eq!(txn.commit(moved()).await.unwrap().into_inner(), committed);
    if backend == Backend::Postgres {
        let replica = s.another_server().await;
        let channel = crate::harness::connect(replica.local_addr()).await;
        let mut txn = MetadataTransactionServiceClient::new(channel);
        assert_eq!(txn.commit(moved()).await.unwrap().into_inner(), committed);
        replica.shutdown().await.unwrap();
    }
    assert_eq!(user(&s, "u1").await.0["log"], json!(["x"]), "appended once");
    assert_eq!(org(&s, "o1").await.0["moves"], json!([1]), "appended once");

    // Sent twice at once: one runs, the other waits for its outcome.
    let twice = || CommitRequest {
        operations: vec![patch_org(
            "o2",
            json!([{"op": "add", "path": "/n", "value": 1}]),
        )],
        request_id: "5d2e8f14-9a6b-4c3d-8e7f-1a2b3c4d5e6f".into(),
    };
    let (mut a, mut b) = (client(&s).await, client(&s).await);
    let (first, second) = tokio::join!(a.commit(twice()), b.commit(twice()));
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_eq!(first, second);
    assert_eq!(org(&s, "o2").await.1, 2, "written once");
}

/// Past the retry window a request id is new again: with a window of 0,
/// a retry runs again.
async fn an_expired_request_id_runs_again(backend: Backend) {
    let Some(s) = start_with(backend, |c| c.request_id_ttl = Duration::ZERO).await else {
        return;
    };
    seed(&s).await;
    let request = || CommitRequest {
        operations: vec![patch_org(
            "o1",
            json!([{"op": "replace", "path": "/seats", "value": 5}]),
        )],
        request_id: "3e4f5a6b-7c8d-4e9f-a0b1-c2d3e4f5a6b7".into(),
    };
    let mut txn = client(&s).await;
    let first = txn.commit(request()).await.unwrap().into_inner();
    assert_eq!(first.revision, 5);
    // Runs again, and changes nothing this time.
    let again = txn.commit(request()).await.unwrap().into_inner();
    assert_eq!((again.revision, again.transaction_id.as_str()), (0, ""));
}
