//! Watch with a filter, list-then-watch, and the plan of List's query on
//! Postgres (issue 17).

use std::time::Duration;

use metadata_service::events::BrokerPauses;
use metadata_service::model::Kind;
use metadata_service::proto::v1::*;
use metadata_service::query::parse;
use metadata_service::service::{MAX_BATCH_BYTES, MAX_PAGE_BYTES};
use metadata_service::store::{Store, StoreOptions};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;
use tonic::Streaming;

use crate::common::Backend;
use crate::common::json::field;
use crate::common::wait::until;
use crate::harness::{Users, start, start_with, write};
use crate::watch::{assert_quiet, events, expect_progress, next_event};

async fn watch_filtered(
    users: &mut Users,
    start_revision: u64,
    ids: &[&str],
    filter: &str,
) -> Streaming<WatchUserMetadataResponse> {
    users
        .watch(WatchUserMetadataRequest {
            start_revision,
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
            progress_notify: false,
            filter: filter.into(),
        })
        .await
        .expect("watch starts")
        .into_inner()
}

async fn delete(users: &mut Users, id: &str) {
    users
        .delete(DeleteUserMetadataRequest {
            user_id: id.into(),
            expected_version: None,
        })
        .await
        .expect("delete");
}

async fn list(users: &mut Users, filter: &str) -> ListUserMetadataResponse {
    users
        .list(ListUserMetadataRequest {
            filter: filter.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
}

const GOLD: &str = r#"public_metadata.plan = "gold""#;

/// A record entering the result, changing inside it and leaving it is
/// sent; changes outside it are not; the empty side of a first write or a
/// delete matches nothing, not even a negated filter. The same events come
/// live and replayed from the table.
async fn watch_filter_sends_what_enters_changes_inside_and_leaves(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut live = watch_filtered(&mut s.users, 0, &[], GOLD).await;
    let mut not_gold = watch_filtered(&mut s.users, 0, &[], &format!("NOT {GOLD}")).await;
    let mut only_u2 = watch_filtered(&mut s.users, 0, &["u2"], GOLD).await;
    for stream in [&mut live, &mut not_gold, &mut only_u2] {
        assert_eq!(expect_progress(stream).await, 0);
    }

    write(&mut s.users, "u1", json!({"plan": "silver"})).await; // 1: outside
    write(&mut s.users, "u1", json!({"plan": "gold"})).await; // 2: enters
    write(&mut s.users, "u1", json!({"seats": 3})).await; // 3: inside
    write(&mut s.users, "u1", json!({"plan": "silver"})).await; // 4: leaves
    write(&mut s.users, "u1", json!({"seats": 4})).await; // 5: outside
    write(&mut s.users, "u2", json!({"plan": "gold"})).await; // 6: first write, enters
    delete(&mut s.users, "u2").await; // 7: deleted, leaves
    write(&mut s.users, "u3", json!({"plan": "silver"})).await; // 8: first write, outside

    let expected = [2, 3, 4, 6, 7];
    let got = events(&mut live, expected.len()).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), expected);
    assert_eq!(
        field(&got[0].after.as_ref().unwrap().public_metadata),
        json!({"plan": "gold"})
    );
    assert_eq!(got[4].change_type, ChangeType::Deleted as i32);
    assert_quiet(&mut live, Duration::from_millis(300)).await;

    // NOT gold: every u1 change but the one entering gold (its before is
    // silver, which matches); the first writes of u2 (gold) and u3 have an
    // empty before, which matches nothing; u2's delete (gold before, empty
    // after) does not match either.
    let expected_not = [1, 2, 4, 5, 8];
    let got = events(&mut not_gold, expected_not.len()).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        expected_not
    );
    assert_quiet(&mut not_gold, Duration::from_millis(300)).await;

    // The id list and the filter combine by AND.
    let got = events(&mut only_u2, 2).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), [6, 7]);

    // Replayed from the table: the same selection.
    let mut replay = watch_filtered(&mut s.users, 1, &[], GOLD).await;
    assert_eq!(expect_progress(&mut replay).await, 0);
    let got = events(&mut replay, expected.len()).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), expected);
}

/// Watch's filter is checked like List's: a bad one is INVALID_ARGUMENT
/// naming the filter and the column, for each kind's own fields.
async fn watch_refuses_a_bad_filter(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let err = s
        .users
        .watch(WatchUserMetadataRequest {
            filter: "public_metadata.a = ".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("filter: "), "{}", err.message());
    assert!(err.message().contains("column 21"), "{}", err.message());
    let err = s
        .orgs
        .watch(WatchOrganizationMetadataRequest {
            filter: "unsafe_metadata.a = 1".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unknown field `unsafe_metadata`"),
        "{}",
        err.message()
    );
}

/// List-then-watch when a write is acknowledged while the dispatcher is
/// held behind it: the List waits for the log to settle up to that write,
/// answers a revision at least as new, with every record exactly as of it,
/// and a Watch from the next revision sends every later change and none
/// the listing already showed (issue 29: nothing replayed).
async fn list_then_watch_misses_nothing_and_replays_nothing(backend: Backend) {
    let pauses = BrokerPauses::default();
    let published = pauses.published.clone();
    let Some(mut s) = start_with(backend, |c| c.events.broker.pauses = pauses).await else {
        return;
    };
    // A List keeps the dispatcher reading the log for a while (it reads
    // only while someone needs it): the next write is then dispatched.
    list(&mut s.users, GOLD).await;
    published.arm(1);
    let first = write(&mut s.users, "a", json!({"plan": "gold", "n": 1})).await;
    assert!(
        published.reached(Duration::from_secs(10)).await,
        "the dispatcher stops after publishing a revision"
    );
    let second = write(&mut s.users, "a", json!({"n": 2})).await;
    assert!(second.revision > first.revision);
    let listing = {
        let mut users = s.users.clone();
        tokio::spawn(async move { list(&mut users, GOLD).await })
    };
    let mut listing = listing;
    // Held: the List may not answer below `second`; whether it answered
    // already or waits, its answer is checked once the dispatcher goes on.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut listing).await;
    published.release();
    let listed = match early {
        Ok(listed) => listed.unwrap(),
        Err(_) => listing.await.unwrap(),
    };
    assert_eq!(listed.users.len(), 1);
    assert_eq!(
        listed.users[0].revision, second.revision,
        "the read shows every acknowledged write"
    );
    assert!(
        listed.revision >= second.revision,
        "exactly as of its revision"
    );

    let mut stream = watch_filtered(&mut s.users, listed.revision + 1, &[], GOLD).await;
    expect_progress(&mut stream).await;
    let third = write(&mut s.users, "b", json!({"plan": "gold"})).await;
    let fourth = write(&mut s.users, "a", json!({"plan": "silver"})).await;
    let got = events(&mut stream, 2).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [third.revision, fourth.revision],
        "every later change, and none the listing showed"
    );
}

/// A List under writes: applying every watched event from the listing's
/// revision on (none of them already in it) to the listed set gives what a
/// List at the end returns.
async fn list_then_watch_converges_under_writes(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for i in 0..10 {
        let plan = if i % 2 == 0 { "gold" } else { "silver" };
        write(&mut s.users, &format!("u{i}"), json!({ "plan": plan })).await;
    }
    let writer = {
        let mut users = s.users.clone();
        tokio::spawn(async move {
            for i in 0..60u64 {
                let plan = if i % 3 == 0 { "silver" } else { "gold" };
                let id = format!("u{}", i % 12);
                if i % 7 == 6 {
                    delete(&mut users, &id).await;
                } else {
                    write(&mut users, &id, json!({ "plan": plan, "i": i })).await;
                }
            }
        })
    };
    // The List comes while the writer is under way.
    until(
        "the writer's first change",
        Duration::from_secs(20),
        async || match s.db.event_revisions().await.len() {
            n if n > 10 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    let listed = list(&mut s.users, GOLD).await;
    let mut view: std::collections::BTreeMap<String, (u64, serde_json::Value)> = listed
        .users
        .iter()
        .map(|u| (u.user_id.clone(), (u.revision, field(&u.public_metadata))))
        .collect();
    let mut stream = watch_filtered(&mut s.users, listed.revision + 1, &[], GOLD).await;
    expect_progress(&mut stream).await;
    writer.await.unwrap();
    let last = {
        let mut probe = write(&mut s.users, "zz_last", json!({"plan": "gold"})).await;
        probe.revision = probe.revision.max(1);
        probe.revision
    };
    let filter = parse(GOLD, &metadata_service::model::Field::ALL)
        .unwrap()
        .unwrap();
    loop {
        let event = next_event(&mut stream).await;
        let seen = view
            .get(&event.user_id)
            .map_or(0, |(revision, _)| *revision);
        // The listing is exactly as of its revision: no event after it is
        // one a listed record already shows.
        assert!(event.revision > seen, "{} replayed", event.revision);
        let after = event.after.as_ref().expect("after");
        let fields = metadata_service::model::Fields {
            public: field(&after.public_metadata),
            private: json!({}),
            unsafe_: json!({}),
        };
        if after.version > 0 && filter.matches(&fields) {
            view.insert(event.user_id.clone(), (event.revision, fields.public));
        } else {
            view.remove(&event.user_id);
        }
        if event.revision >= last {
            break;
        }
    }
    let end = list(&mut s.users, GOLD).await;
    let end: std::collections::BTreeMap<String, (u64, serde_json::Value)> = end
        .users
        .iter()
        .map(|u| (u.user_id.clone(), (u.revision, field(&u.public_metadata))))
        .collect();
    assert_eq!(view, end);
}

/// Pages end at the byte budget before page_size, counted as encoded: an
/// array of zeros is 2 bytes per element as JSON and 11 as protobuf. Every
/// page still fits the 4 MiB a default client accepts (the test's client
/// is one), and the listing returns everything.
async fn large_records_make_shorter_pages(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let zeros = json!({ "a": vec![0; 3900] });
    let per_record = 3900 * 11;
    let count = 2 * MAX_PAGE_BYTES / per_record + 10;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut users, zeros) = (s.users.clone(), zeros.clone());
            tokio::spawn(async move {
                for i in (w..count).step_by(8) {
                    write(&mut users, &format!("big{i:04}"), zeros.clone()).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = s
            .users
            .list(ListUserMetadataRequest {
                filter: String::new(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("every page fits a default client")
            .into_inner();
        pages.push(page.users.len());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages.len() >= 3, "pages: {pages:?}");
    assert_eq!(pages.iter().sum::<usize>(), count);
}

/// BatchGet answers duplicates, but not without bound: past 10,000 ids, or
/// past MAX_BATCH_BYTES of encoded records, it is INVALID_ARGUMENT.
async fn batch_get_answers_are_bounded(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let big = json!({ "s": "x".repeat(8000) });
    s.users
        .merge(MergeUserMetadataRequest {
            user_id: "u1".into(),
            public_metadata: Some(crate::common::json::structure(&big)),
            private_metadata: Some(crate::common::json::structure(&big)),
            unsafe_metadata: Some(crate::common::json::structure(&big)),
            expected_version: None,
        })
        .await
        .expect("a large record");
    let batch = |n: usize| BatchGetUserMetadataRequest {
        user_ids: vec!["u1".to_owned(); n],
        revision: None,
    };
    let err = s
        .users
        .batch_get(batch(10_001))
        .await
        .expect_err("too many");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("user_ids: has 10001 ids"),
        "{}",
        err.message()
    );
    let n = MAX_BATCH_BYTES / (3 * 8000) + 10;
    let err = s.users.batch_get(batch(n)).await.expect_err("too large");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("ask for fewer ids"),
        "{}",
        err.message()
    );
    let fine = s
        .users
        .batch_get(batch(100))
        .await
        .expect("100 copies")
        .into_inner();
    assert_eq!(fine.users.len(), 100);
}

/// Events a filter leaves out do not hold back progress messages: a
/// consumer under steady unrelated writes still learns how far it has
/// come, so that it resumes from there.
async fn filtered_out_events_do_not_delay_progress(backend: Backend) {
    let Some(mut s) = start_with(backend, |c| {
        c.events.broker.progress_interval = Duration::from_millis(200)
    })
    .await
    else {
        return;
    };
    let mut stream = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: 0,
            user_ids: vec![],
            progress_notify: true,
            filter: GOLD.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(expect_progress(&mut stream).await, 0);
    let writer = {
        let mut users = s.users.clone();
        tokio::spawn(async move {
            for i in 0..1000 {
                write(&mut users, "other", json!({ "plan": "silver", "i": i })).await;
                // Time is the scenario: unrelated writes at a steady rate,
                // several within each progress interval.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Each of these comes 200 ms after the previous message although a
    // filtered-out write passes every 50 ms; each reports further.
    let mut last = 0;
    for _ in 0..3 {
        let revision = expect_progress(&mut stream).await;
        assert!(revision >= last, "{revision} after {last}");
        last = revision;
    }
    assert!(last > 0, "progress moved past the filtered-out writes");
    writer.abort();
}

backend_tests!(
    batch_get_answers_are_bounded,
    filtered_out_events_do_not_delay_progress,
    large_records_make_shorter_pages,
    watch_filter_sends_what_enters_changes_inside_and_leaves,
    watch_refuses_a_bad_filter,
    list_then_watch_misses_nothing_and_replays_nothing,
    list_then_watch_converges_under_writes,
);

/// The plan Postgres makes for List's own statement: `=`, and `:` with a
/// value that is not a string, on a metadata field are answered by the
/// field's GIN index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_equality_and_has_filters_use_the_gin_index() {
    let Some(mut s) = start(Backend::Postgres).await else {
        return;
    };
    let db = s.db.connect().await;
    // 20,000 users, 0.1% gold: enough that a scan costs more than the index.
    db.execute_unprepared(
        "INSERT INTO metadata (kind, id, public_metadata, private_metadata, unsafe_metadata, \
         version, revision, created_at, updated_at) \
         SELECT 'user', 'p' || lpad(i::text, 6, '0'), \
           jsonb_build_object('plan', CASE WHEN i % 1000 = 0 THEN 'gold' ELSE 'silver' END, \
                              'tags', CASE WHEN i % 1000 = 1 THEN '[\"beta\"]'::jsonb ELSE '[]'::jsonb END), \
           '{}', '{}', 1, 0, now(), now() FROM generate_series(1, 20000) AS i",
    )
    .await
    .expect("seed");
    db.execute_unprepared("ANALYZE metadata")
        .await
        .expect("analyze");
    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .expect("store");
    for (filter, index) in [
        (GOLD, "metadata_public_metadata_path_ops"),
        // `:` with a string may also mean an object's key, which no
        // jsonb_path_ops index answers; with any other value it is two
        // containments.
        (
            "public_metadata.tags:7",
            "metadata_public_metadata_path_ops",
        ),
        (
            r#"private_metadata.a.b = 1"#,
            "metadata_private_metadata_path_ops",
        ),
        (
            r#"unsafe_metadata.x = true"#,
            "metadata_unsafe_metadata_path_ops",
        ),
    ] {
        let parsed = parse(filter, &metadata_service::model::Field::ALL)
            .unwrap()
            .unwrap();
        let statement = store.list_statement(Kind::User, Some(&parsed), None, 51);
        let explain = Statement::from_sql_and_values(
            statement.db_backend,
            format!("EXPLAIN (FORMAT JSON) {}", statement.sql),
            statement.values.expect("bound values").0,
        );
        let plan = db
            .query_one_raw(explain)
            .await
            .expect("explain")
            .expect("a plan");
        let plan: serde_json::Value = plan.try_get("", "QUERY PLAN").expect("the plan as JSON");
        let plan = plan.to_string();
        assert!(plan.contains(index), "{filter}: expected {index} in {plan}");
    }
    // And List through the service returns the 20 gold users.
    let listed = list(&mut s.users, GOLD).await;
    assert_eq!(listed.users.len(), 20);
    store.close().await.ok();
}

/// A Postgres error whose SQLSTATE is all digits is not read as a SQLite
/// result code: 22021 (0x5605, low byte 5, SQLite's BUSY) is a bad byte
/// sequence, not a locked database to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sqlstates_are_not_sqlite_codes() {
    let Some(s) = start(Backend::Postgres).await else {
        return;
    };
    let db = s.db.connect().await;
    let err = db
        .execute_unprepared("SELECT convert_from('\\x6100'::bytea, 'UTF8')")
        .await
        .expect_err("NUL is not UTF8 text in Postgres");
    let err = metadata_service::store::StoreError::from(err);
    assert!(
        matches!(err, metadata_service::store::StoreError::Internal(_)),
        "{err:?}"
    );
}
