//! Change events and the Watch stream, on SQLite and Postgres.

use std::time::Duration;

use metadata_service::events::BrokerPauses;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_organization_metadata_response::Response as OrgResponse;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::*;
use metadata_service::store::take_revision_sql;
use serde_json::{Value as Json, json};
use tokio::time::timeout;
use tonic::Code;
use tonic::Streaming;

use crate::common::Backend;
use crate::common::json::{field, structure, value};
use crate::common::wait::until;
use crate::harness::{Users, merge, start, start_with, write};

pub(crate) async fn watch(
    users: &mut Users,
    start_revision: u64,
    ids: &[&str],
) -> Streaming<WatchUserMetadataResponse> {
    users
        .watch(WatchUserMetadataRequest {
            start_revision,
            user_ids: ids.iter().map(|s| s.to_string()).collect(),
            progress_notify: false,
            filter: String::new(),
        })
        .await
        .expect("watch starts")
        .into_inner()
}

/// The next message, failing the test if none comes within 10 s.
async fn next(stream: &mut Streaming<WatchUserMetadataResponse>) -> Response {
    timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message within 10 s")
        .expect("stream healthy")
        .expect("stream open")
        .response
        .expect("response set")
}

pub(crate) async fn next_event(
    stream: &mut Streaming<WatchUserMetadataResponse>,
) -> UserMetadataEvent {
    match next(stream).await {
        Response::Event(event) => event,
        Response::Progress(p) => panic!("expected an event, got progress {}", p.revision),
    }
}

pub(crate) async fn expect_progress(stream: &mut Streaming<WatchUserMetadataResponse>) -> u64 {
    match next(stream).await {
        Response::Progress(p) => p.revision,
        Response::Event(e) => panic!("expected progress, got event {}", e.revision),
    }
}

/// `count` events, skipping progress messages.
pub(crate) async fn events(
    stream: &mut Streaming<WatchUserMetadataResponse>,
    count: usize,
) -> Vec<UserMetadataEvent> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        if let Response::Event(event) = next(stream).await {
            out.push(event);
        }
    }
    out
}

/// Nothing but (optional) progress arrives within `wait`.
pub(crate) async fn assert_quiet(
    stream: &mut Streaming<WatchUserMetadataResponse>,
    wait: Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await {
        if let Some(Response::Event(e)) = message.expect("stream healthy").and_then(|m| m.response)
        {
            panic!(
                "unexpected event at revision {} for {}",
                e.revision, e.user_id
            );
        }
    }
}

async fn stream_starts_with_progress_then_follows_live(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    write(&mut s.users, "u1", json!({"a":1})).await;
    let mut stream = watch(&mut s.users, 0, &[]).await;
    assert_eq!(
        expect_progress(&mut stream).await,
        1,
        "starts after the latest revision"
    );
    let written = write(&mut s.users, "u1", json!({"b":2})).await;
    assert_eq!(written.revision, 2);
    let event = next_event(&mut stream).await;
    assert_eq!(event.revision, 2);
    assert_eq!(event.user_id, "u1");
    assert_eq!(
        event.after.as_ref().unwrap(),
        &written,
        "after is what the write returned"
    );
}

async fn get_then_watch_has_no_gap(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for i in 0..5 {
        write(&mut s.users, "u1", json!({ format!("k{i}"): i })).await;
    }
    let read = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u1".into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((read.version, read.revision), (5, 5));
    // Changes after the read, before the watch starts.
    write(&mut s.users, "u1", json!({"late":1})).await;
    write(&mut s.users, "u2", json!({"other":1})).await;
    let mut stream = watch(&mut s.users, read.revision + 1, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, read.revision);
    let got = events(&mut stream, 2).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![6, 7]
    );
    assert_eq!(
        got[0].before.as_ref().unwrap(),
        &read,
        "the event continues exactly from the read"
    );
}

async fn resume_from_the_middle(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for i in 0..10 {
        write(&mut s.users, &format!("u{}", i % 3), json!({ "i": i })).await;
    }
    let mut stream = watch(&mut s.users, 4, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 3);
    let got = events(&mut stream, 7).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (4..=10).collect::<Vec<_>>()
    );
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
    // Then live, seamlessly.
    write(&mut s.users, "u9", json!({"live":true})).await;
    assert_eq!(next_event(&mut stream).await.revision, 11);
}

async fn filter_by_ids_and_kind(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut stream = watch(&mut s.users, 0, &["a", "c"]).await;
    expect_progress(&mut stream).await;
    let mut orgs_stream = s
        .orgs
        .watch(WatchOrganizationMetadataRequest {
            start_revision: 0,
            organization_ids: vec![],
            progress_notify: false,
            filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for (i, id) in ["a", "b", "c", "b", "a"].into_iter().enumerate() {
        write(&mut s.users, id, json!({ "i": i })).await;
    }
    s.orgs
        .merge(MergeOrganizationMetadataRequest {
            organization_id: "a".into(),
            public_metadata: Some(structure(&json!({"tier":"pro"}))),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = events(&mut stream, 3).await;
    let seen: Vec<(u64, &str)> = got
        .iter()
        .map(|e| (e.revision, e.user_id.as_str()))
        .collect();
    assert_eq!(seen, vec![(1, "a"), (3, "c"), (5, "a")]);
    assert_quiet(&mut stream, Duration::from_millis(300)).await;

    // The organization stream sees only the organization change; revisions are global.
    let first = timeout(Duration::from_secs(10), orgs_stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first.response, Some(OrgResponse::Progress(_))));
    let event = timeout(Duration::from_secs(10), orgs_stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(OrgResponse::Event(event)) = event.response else {
        panic!("event expected")
    };
    assert_eq!((event.revision, event.organization_id.as_str()), (6, "a"));
    assert_eq!(event.change_type(), ChangeType::Merged);
}

async fn progress_notifications_while_idle(backend: Backend) {
    let Some(mut s) = start_with(backend, |c| {
        c.events.broker.progress_interval = Duration::from_millis(200)
    })
    .await
    else {
        return;
    };
    write(&mut s.users, "other", json!({"a":1})).await;
    let mut stream = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: 0,
            user_ids: vec!["mine".into()],
            progress_notify: true,
            filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expect_progress(&mut stream).await, 1);
    // Idle: progress keeps coming with the same revision.
    assert_eq!(expect_progress(&mut stream).await, 1);
    // Changes to ids this stream does not watch still move its progress.
    write(&mut s.users, "other", json!({"b":1})).await;
    let mut revision = expect_progress(&mut stream).await;
    if revision == 1 {
        revision = expect_progress(&mut stream).await;
    }
    assert_eq!(revision, 2);
    // Without progress_notify, nothing but the first message.
    let mut quiet = watch(&mut s.users, 0, &["mine"]).await;
    assert_eq!(expect_progress(&mut quiet).await, 2);
    let silent = timeout(Duration::from_millis(700), quiet.message()).await;
    assert!(silent.is_err(), "no progress without progress_notify");
}

async fn events_carry_before_after_and_changed_fields(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut stream = watch(&mut s.users, 0, &[]).await;
    expect_progress(&mut stream).await;

    let created = s
        .users
        .merge(MergeUserMetadataRequest {
            user_id: "u1".into(),
            public_metadata: Some(structure(&json!({"a":{"b":1}}))),
            private_metadata: Some(structure(&json!({"s":1}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = next_event(&mut stream).await;
    assert_eq!(e.change_type(), ChangeType::Merged);
    assert_eq!(
        e.changed_fields,
        vec!["public_metadata", "private_metadata"]
    );
    let before = e.before.as_ref().unwrap();
    assert_eq!(
        (before.version, field(&before.public_metadata)),
        (0, json!({}))
    );
    assert_eq!(field(&before.unsafe_metadata), json!({}));
    assert!(before.created_at.is_none());
    assert_eq!(e.after.as_ref().unwrap(), &created);
    assert_eq!(e.committed_at, created.updated_at);

    let replaced = s
        .users
        .replace(ReplaceUserMetadataRequest {
            user_id: "u1".into(),
            public_metadata: Some(value(&json!({"z":1}))),
            private_metadata: Some(value(&json!({"s":1}))),
            unsafe_metadata: Some(value(&Json::Null)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = next_event(&mut stream).await;
    assert_eq!(e.change_type(), ChangeType::Replaced);
    assert_eq!(
        e.changed_fields,
        vec!["public_metadata", "unsafe_metadata"],
        "private did not change"
    );
    assert_eq!(e.before.as_ref().unwrap(), &created);
    assert_eq!(e.after.as_ref().unwrap(), &replaced);
    assert_eq!(
        field(&e.after.as_ref().unwrap().unsafe_metadata),
        Json::Null
    );

    let deleted = s
        .users
        .delete(DeleteUserMetadataRequest {
            user_id: "u1".into(),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    let e = next_event(&mut stream).await;
    assert_eq!(e.change_type(), ChangeType::Deleted);
    assert_eq!(
        e.changed_fields,
        vec!["public_metadata", "private_metadata", "unsafe_metadata"]
    );
    assert_eq!(e.before.as_ref().unwrap(), &replaced);
    let after = e.after.as_ref().unwrap();
    assert_eq!(after.version, 0);
    assert_eq!(
        (
            field(&after.public_metadata),
            field(&after.private_metadata),
            field(&after.unsafe_metadata)
        ),
        (json!({}), json!({}), json!({}))
    );
    assert_eq!(after.revision, e.revision);
    // Get after the delete names the delete's revision, to resume from.
    let read = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u1".into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((read.version, read.revision), (0, e.revision));
}

async fn no_event_for_no_op_or_failed_writes(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    write(&mut s.users, "u1", json!({"a":1})).await;
    let mut stream = watch(&mut s.users, 0, &[]).await;
    expect_progress(&mut stream).await;
    // No-ops.
    write(&mut s.users, "u1", json!({"a":1})).await;
    write(&mut s.users, "u1", json!({"missing":null})).await;
    write(&mut s.users, "nobody", json!({})).await;
    assert!(
        !s.users
            .delete(DeleteUserMetadataRequest {
                user_id: "nobody".into(),
                expected_version: None
            })
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    // Failures.
    let mut stale = merge("u1", json!({"b":2}));
    stale.expected_version = Some(7);
    assert_eq!(
        s.users.merge(stale).await.unwrap_err().code(),
        Code::Aborted
    );
    let too_big = merge("u1", json!({"big": "x".repeat(9000)}));
    assert_eq!(
        s.users.merge(too_big).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
    let next_write = write(&mut s.users, "u1", json!({"c":3})).await;
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.revision, next_write.revision),
        (2, 2),
        "no revision was used by the no-ops"
    );
    assert_eq!(s.db.event_revisions().await.len(), 2);
}

async fn paused_consumer_receives_everything_in_order(backend: Backend) {
    // A small in-memory buffer makes the paused stream fall behind it.
    let Some(s) = start_with(backend, |c| c.events.broker.buffer = 64).await else {
        return;
    };
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 1250;
    let mut users = s.users.clone();
    let mut stream = watch(&mut users, 0, &[]).await;
    expect_progress(&mut stream).await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut users = s.users.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                write(&mut users, &format!("w{w}"), json!({ "i": i })).await;
            }
        }));
    }
    // The consumer reads nothing while all 10,000 events are written.
    for task in tasks {
        task.await.unwrap();
    }
    let got = events(&mut stream, WRITERS * PER_WRITER).await;
    let revisions: Vec<u64> = got.iter().map(|e| e.revision).collect();
    assert_eq!(
        revisions,
        (1..=(WRITERS * PER_WRITER) as u64).collect::<Vec<_>>()
    );
    // Per id, versions arrive in order too.
    for w in 0..WRITERS {
        let id = format!("w{w}");
        let versions: Vec<u64> = got
            .iter()
            .filter(|e| e.user_id == id)
            .map(|e| e.after.as_ref().unwrap().version)
            .collect();
        assert_eq!(
            versions,
            (1..=PER_WRITER as u64).collect::<Vec<_>>(),
            "{id}"
        );
    }
    assert_quiet(&mut stream, Duration::from_millis(200)).await;
}

async fn pruned_revisions_are_refused(backend: Backend) {
    let Some(mut s) = start_with(backend, |c| {
        c.events.retention = Duration::from_millis(300);
        c.events.prune_interval = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    for i in 0..3 {
        write(&mut s.users, "u1", json!({ "i": i })).await;
    }
    // Wait until the pruner has removed them.
    s.db.until_pruned().await;
    let status = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: 2,
            ..Default::default()
        })
        .await
        .expect_err("too old");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("oldest available revision is 4"),
        "{}",
        status.message()
    );
    // Get, then Watch from its revision + 1, is the way back.
    let read = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u1".into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = watch(&mut s.users, read.revision + 1, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 3);
    write(&mut s.users, "u1", json!({"again":1})).await;
    assert_eq!(next_event(&mut stream).await.revision, 4);
}

async fn restart_and_resume_misses_nothing(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut stream = watch(&mut s.users, 0, &[]).await;
    expect_progress(&mut stream).await;
    for i in 0..5 {
        write(&mut s.users, "u1", json!({ "i": i })).await;
    }
    let got = events(&mut stream, 3).await;
    let last_seen = got.last().unwrap().revision;
    s.stop().await;
    // The stream ends with UNAVAILABLE (after any messages still queued).
    let ended = loop {
        match timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable);

    s.restart().await;
    for i in 5..8 {
        write(&mut s.users, "u1", json!({ "i": i })).await;
    }
    let mut resumed = watch(&mut s.users, last_seen + 1, &[]).await;
    assert_eq!(expect_progress(&mut resumed).await, last_seen);
    let rest = events(&mut resumed, 5).await;
    assert_eq!(
        rest.iter().map(|e| e.revision).collect::<Vec<_>>(),
        (4..=8).collect::<Vec<_>>()
    );
    assert_quiet(&mut resumed, Duration::from_millis(300)).await;
}

async fn concurrent_writers_are_seen_in_commit_order(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut users = s.users.clone();
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let mut stream = watch(&mut users, 0, &[]).await;
        expect_progress(&mut stream).await;
        watchers.push(stream);
    }
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 40;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut users = s.users.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                // Half of the writers share one id, half have their own.
                let id = if w % 2 == 0 {
                    "shared".to_string()
                } else {
                    format!("own{w}")
                };
                write(&mut users, &id, json!({ format!("w{w}i{i}"): i })).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = (WRITERS * PER_WRITER) as u64;
    let expected = s.db.event_revisions().await;
    assert_eq!(expected.len() as u64, total, "one event per write");
    for mut stream in watchers {
        let got = events(&mut stream, total as usize).await;
        assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), expected);
    }
}

async fn invalid_watch_requests(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let status = s
        .users
        .watch(WatchUserMetadataRequest {
            user_ids: vec!["ok".into(), "bad id".into()],
            ..Default::default()
        })
        .await
        .expect_err("invalid id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("user_id"),
        "{}",
        status.message()
    );
    // A future revision is allowed: the stream waits for it.
    let mut stream = watch(&mut s.users, 3, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 2);
    for i in 0..3 {
        write(&mut s.users, "u", json!({ "i": i })).await;
    }
    assert_eq!(next_event(&mut stream).await.revision, 3);
}

/// A stream that subscribes right after the dispatcher published revision
/// r, and before anything else moves, still gets r: it cannot see r in its
/// receiver, so the mark it reads must already include r.
async fn subscribing_right_after_a_publish_misses_nothing(backend: Backend) {
    let pauses = BrokerPauses::default();
    let published = pauses.published.clone();
    let Some(mut s) = start_with(backend, |c| c.events.broker.pauses = pauses).await else {
        return;
    };
    write(&mut s.users, "u1", json!({"a":1})).await;
    // Its progress says revision 1 has been published.
    let mut before = watch(&mut s.users, 0, &[]).await;
    assert_eq!(expect_progress(&mut before).await, 1);

    published.arm(1);
    let written = write(&mut s.users, "u1", json!({"b":2})).await;
    assert_eq!(written.revision, 2);
    assert!(
        published.reached(Duration::from_secs(10)).await,
        "the dispatcher published revision 2"
    );
    // The dispatcher is stopped right after publishing 2.
    let mut stream = watch(&mut s.users, 2, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 1);
    assert_eq!(next_event(&mut stream).await.revision, 2);
    published.release();
    write(&mut s.users, "u1", json!({"c":3})).await;
    assert_eq!(next_event(&mut stream).await.revision, 3);
    let got = events(&mut before, 2).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![2, 3]
    );
}

/// Writers run while streams keep opening at the newest revision; each
/// must receive exactly what a reference stream from revision 1 received
/// from its start on. The broadcast buffer (4) is far smaller than a table
/// batch (16), so streams that are not read fall behind it and catch up
/// from the table while the dispatcher is mid-batch.
async fn streams_resuming_at_the_newest_revision_under_load(backend: Backend) {
    use std::sync::Arc;
    let Some(mut s) = start_with(backend, |c| {
        c.events.broker.buffer = 4;
        c.events.broker.batch = 16;
    })
    .await
    else {
        return;
    };
    const WRITERS: usize = 4;
    const WRITES: usize = 50;
    let mut reference = watch(&mut s.users, 1, &[]).await;
    assert_eq!(expect_progress(&mut reference).await, 0);
    // The newest revision written; closed once every writer is done.
    let newest = Arc::new(tokio::sync::watch::Sender::new(0u64));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut users = s.users.clone();
        let newest = newest.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..WRITES {
                let id = format!("w{w}_{}", i % 3);
                let written = write(&mut users, &id, json!({ "i": i })).await;
                newest.send_if_modified(|n| {
                    let later = written.revision > *n;
                    *n = (*n).max(written.revision);
                    later
                });
            }
        }));
    }
    let opener = {
        let mut users = s.users.clone();
        let mut newest = newest.subscribe();
        tokio::spawn(async move {
            let mut opened = Vec::new();
            while opened.len() < 60 {
                let start = (*newest.borrow_and_update()).max(1);
                opened.push((start, watch(&mut users, start, &[]).await));
                // The next stream starts once a write has moved the newest
                // revision on; none does after the writers are done.
                if newest.changed().await.is_err() {
                    break;
                }
            }
            opened
        })
    };
    drop(newest);
    for writer in writers {
        writer.await.unwrap();
    }
    let opened = opener.await.unwrap();
    assert!(opened.len() >= 5, "only {} streams opened", opened.len());
    let total = WRITERS * WRITES;
    let expected: Vec<u64> = events(&mut reference, total)
        .await
        .iter()
        .map(|e| e.revision)
        .collect();
    assert!(expected.windows(2).all(|w| w[0] < w[1]));
    let last = *expected.last().unwrap();
    for (start, mut stream) in opened {
        let want: Vec<u64> = expected.iter().copied().filter(|r| *r >= start).collect();
        let got: Vec<u64> = events(&mut stream, want.len())
            .await
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(got, want, "stream from {start} (newest {last})");
        assert_quiet(&mut stream, Duration::from_millis(50)).await;
    }
}

/// Revisions are a database bigint: a start revision above 2^63 - 1 can
/// never exist and is refused, naming the field.
async fn impossible_start_revisions_are_refused(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for start_revision in [1u64 << 63, u64::MAX] {
        let status = s
            .users
            .watch(WatchUserMetadataRequest {
                start_revision,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with("start_revision"),
            "{}",
            status.message()
        );
    }
    // The largest possible one waits without work, as any future one does.
    let mut stream = watch(&mut s.users, (1u64 << 63) - 1, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, (1u64 << 63) - 2);
    write(&mut s.users, "u", json!({"a":1})).await;
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
}

/// A replay whose filter matches nothing sends nothing; it must still end
/// when its client leaves, before its next table read.
async fn a_replay_ends_when_its_client_leaves(backend: Backend) {
    let pauses = BrokerPauses::default();
    let replay = pauses.replay_read.clone();
    let Some(mut s) = start_with(backend, |c| {
        c.events.broker.pauses = pauses;
        c.events.broker.batch = 2;
    })
    .await
    else {
        return;
    };
    for i in 0..10 {
        write(&mut s.users, "u1", json!({ "i": i })).await;
    }
    // The server has seen a client leave once it counted the call.
    let metrics = s.server().metrics().clone();
    let cancelled = move || {
        metrics
            .handled
            .with_label_values(&["metadata.v1.UserMetadataService", "Watch", "Canceled"])
            .get()
    };
    let until_cancelled = async |count| {
        until(
            "the client leaves",
            Duration::from_secs(10),
            async || match cancelled() {
                seen if seen >= count => Ok(()),
                seen => Err(seen),
            },
        )
        .await
    };
    // Published: a stream from 1 reads all ten from the table.
    assert_eq!(
        expect_progress(&mut watch(&mut s.users, 0, &[]).await).await,
        10
    );
    until_cancelled(1).await;
    replay.arm(2);
    let mut stream = watch(&mut s.users, 1, &["nobody"]).await;
    assert_eq!(expect_progress(&mut stream).await, 0);
    assert!(replay.reached(Duration::from_secs(10)).await);
    drop(stream);
    until_cancelled(2).await;
    replay.release();
    assert!(
        !replay.reached(Duration::from_secs(1)).await,
        "the replay read on after its client left"
    );
    until(
        "the stream's task ends",
        Duration::from_secs(10),
        async || match s.server().broker_open_streams() {
            0 => Ok(()),
            open => Err(open),
        },
    )
    .await;
}

/// Events pruned while a stream replays them end the stream with
/// FAILED_PRECONDITION naming the oldest revision left, never a silent
/// skip.
async fn pruning_under_a_catching_up_stream_is_reported(backend: Backend) {
    let pauses = BrokerPauses::default();
    let replay = pauses.replay_read.clone();
    let Some(mut s) = start_with(backend, |c| {
        c.events.broker.pauses = pauses;
        c.events.broker.batch = 2;
        c.events.retention = Duration::from_secs(2);
        c.events.prune_interval = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    for i in 0..6 {
        write(&mut s.users, "u1", json!({ "i": i })).await;
    }
    // Published: a stream from 1 reads all six from the table.
    assert_eq!(
        expect_progress(&mut watch(&mut s.users, 0, &[]).await).await,
        6
    );
    replay.arm(2);
    let mut stream = watch(&mut s.users, 1, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 0);
    // Stopped before its first read; let it read one batch (1, 2).
    assert!(replay.reached(Duration::from_secs(10)).await);
    replay.release();
    assert!(replay.reached(Duration::from_secs(10)).await);
    let got = events(&mut stream, 2).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), [1, 2]);
    // Now the rest is pruned under it.
    s.db.until_pruned().await;
    replay.release();
    let status = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream answers")
        .expect_err("the stream ends");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("oldest available revision is 7"),
        "{}",
        status.message()
    );
}

/// After FAILED_PRECONDITION, README's recovery ends for every id, one
/// never written included: Watch from now, take its first progress
/// revision, Get, and apply only events newer than what Get returned.
async fn recovery_after_pruning_terminates_for_a_never_written_id(backend: Backend) {
    let Some(mut s) = start_with(backend, |c| {
        c.events.retention = Duration::from_millis(300);
        c.events.prune_interval = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    for i in 0..5 {
        write(&mut s.users, "other", json!({ "i": i })).await;
    }
    s.db.until_pruned().await;
    let status = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: 1,
            user_ids: vec!["never".into()],
            ..Default::default()
        })
        .await
        .expect_err("pruned");
    assert_eq!(status.code(), Code::FailedPrecondition);
    // The recipe.
    let mut stream = watch(&mut s.users, 0, &["never"]).await;
    let from = expect_progress(&mut stream).await;
    assert_eq!(from, 5);
    let read = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "never".into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.version, 0);
    let written = write(&mut s.users, "never", json!({"now":1})).await;
    let event = next_event(&mut stream).await;
    assert!(event.revision > read.revision);
    assert_eq!(event.after.unwrap(), written);
}

/// The dispatcher reads the log only while someone needs it. Writes land
/// while nobody does; a List then keeps it reading, and with nobody
/// subscribed it moves its mark by revision numbers alone. Stopped right
/// after moving the mark past a revision whose event it never read, two
/// streams subscribe: each still receives every revision, the one from
/// revision 1 from the table, both the next write live.
async fn streams_arriving_while_the_mark_moves_without_events_miss_nothing(backend: Backend) {
    let pauses = BrokerPauses::default();
    let published = pauses.published.clone();
    let Some(mut s) = start_with(backend, |c| c.events.broker.pauses = pauses).await else {
        return;
    };
    write(&mut s.users, "u1", json!({"a":1})).await;
    write(&mut s.users, "u2", json!({"a":2})).await;
    // A List keeps the dispatcher reading; its mark (the List's revision)
    // reaches 2 once the dispatcher has caught up, by numbers only.
    until(
        "the List's mark reaches 2",
        Duration::from_secs(10),
        async || {
            let listed = s
                .users
                .list(ListUserMetadataRequest::default())
                .await
                .unwrap()
                .into_inner();
            match listed.revision {
                2 => Ok(()),
                mark => Err(mark),
            }
        },
    )
    .await;
    published.arm(1);
    let third = write(&mut s.users, "u1", json!({"b":3})).await;
    assert_eq!(third.revision, 3);
    assert!(
        published.reached(Duration::from_secs(10)).await,
        "the dispatcher moved its mark to revision 3"
    );
    let mut from_now = watch(&mut s.users, 0, &[]).await;
    assert_eq!(expect_progress(&mut from_now).await, 3);
    let mut from_one = watch(&mut s.users, 1, &[]).await;
    assert_eq!(expect_progress(&mut from_one).await, 0);
    published.release();
    let fourth = write(&mut s.users, "u2", json!({"b":4})).await;
    assert_eq!(next_event(&mut from_now).await.revision, fourth.revision);
    let got = events(&mut from_one, 4).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

backend_tests!(
    streams_arriving_while_the_mark_moves_without_events_miss_nothing,
    subscribing_right_after_a_publish_misses_nothing,
    streams_resuming_at_the_newest_revision_under_load,
    impossible_start_revisions_are_refused,
    a_replay_ends_when_its_client_leaves,
    pruning_under_a_catching_up_stream_is_reported,
    recovery_after_pruning_terminates_for_a_never_written_id,
    stream_starts_with_progress_then_follows_live,
    get_then_watch_has_no_gap,
    resume_from_the_middle,
    filter_by_ids_and_kind,
    progress_notifications_while_idle,
    events_carry_before_after_and_changed_fields,
    no_event_for_no_op_or_failed_writes,
    paused_consumer_receives_everything_in_order,
    pruned_revisions_are_refused,
    restart_and_resume_misses_nothing,
    concurrent_writers_are_seen_in_commit_order,
    invalid_watch_requests,
);

/// Two servers on one Postgres database: every watcher on either receives
/// exactly the rows of the event table, in order, whoever wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_deliver_every_event() {
    let Some(s) = start(Backend::Postgres).await else {
        return;
    };
    let replica = s.another_server().await;
    let replica_channel = crate::harness::connect(replica.local_addr()).await;
    let mut clients = [
        s.users.clone(),
        UserMetadataServiceClient::new(replica_channel),
    ];
    let mut watchers = Vec::new();
    for client in clients.iter_mut() {
        for _ in 0..2 {
            let mut stream = watch(client, 0, &[]).await;
            expect_progress(&mut stream).await;
            watchers.push(stream);
        }
    }
    const WRITERS: usize = 8;
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut users = clients[w % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < stop_at {
                write(
                    &mut users,
                    &format!("id{}", n % 5),
                    json!({ format!("w{w}"): n }),
                )
                .await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let expected = s.db.event_revisions().await;
    assert_eq!(expected.len() as u64, total, "one event per write");
    for mut stream in watchers {
        let got = events(&mut stream, total as usize).await;
        assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), expected);
        assert_quiet(&mut stream, Duration::from_millis(200)).await;
    }
    replica.shutdown().await.unwrap();
}

/// A transaction that took a lower revision but commits after a higher one
/// must still reach a watcher that is already level with the higher one; a
/// revision whose transaction rolls back must not stall delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_late_commit_is_not_skipped() {
    use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
    let Some(mut s) = start(Backend::Postgres).await else {
        return;
    };
    write(&mut s.users, "warm", json!({"a":1})).await;
    let mut stream = watch(&mut s.users, 0, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 1);

    // A writer that takes its revision and then stalls before committing.
    let db = Database::connect(s.db.url()).await.unwrap();
    let late = db.begin().await.unwrap();
    late.execute_unprepared("SELECT pg_current_xact_id()")
        .await
        .unwrap();
    let row = late
        .query_one_raw(Statement::from_string(
            late.get_database_backend(),
            "SELECT nextval('event_revisions') AS r",
        ))
        .await
        .unwrap()
        .unwrap();
    let late_revision = row.try_get::<i64>("", "r").unwrap() as u64;
    assert_eq!(late_revision, 2);
    let empty = r#"{"public_metadata":{},"private_metadata":{},"unsafe_metadata":{},"version":0,"revision":0,"created_at":null,"updated_at":null}"#;
    let after = r#"{"public_metadata":{"l":1},"private_metadata":{},"unsafe_metadata":{},"version":1,"revision":2,"created_at":"2026-01-01T00:00:00+00:00","updated_at":"2026-01-01T00:00:00+00:00"}"#;
    late.execute_unprepared(&format!(
        "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
         VALUES (2, 'user', 'late', 'merged', '[\"public_metadata\"]', '{empty}', '{after}', now())"
    ))
    .await
    .unwrap();

    // A later write commits revision 3 first.
    let early = write(&mut s.users, "early", json!({"e":1})).await;
    assert_eq!(early.revision, 3);
    assert_quiet(&mut stream, Duration::from_millis(500)).await;
    // A watcher starting now also waits: it starts after revision 1.
    let mut fresh = watch(&mut s.users, 0, &[]).await;
    assert_eq!(expect_progress(&mut fresh).await, 1);

    late.commit().await.unwrap();
    for stream in [&mut stream, &mut fresh] {
        let got = events(stream, 2).await;
        assert_eq!(
            got.iter()
                .map(|e| (e.revision, e.user_id.as_str()))
                .collect::<Vec<_>>(),
            vec![(2, "late"), (3, "early")]
        );
    }

    // A revision taken the way the service takes it, by a transaction that
    // then rolls back, holds delivery only until that transaction ends.
    let doomed = db.begin().await.unwrap();
    let taken = doomed
        .query_one_raw(Statement::from_string(
            doomed.get_database_backend(),
            take_revision_sql(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.try_get::<i64>("", "latest").unwrap(), 4);
    assert!(taken.try_get::<bool>("", "owned").unwrap());
    let next = write(&mut s.users, "after_hole", json!({"h":1})).await;
    assert_eq!(next.revision, 5);
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
    doomed.rollback().await.unwrap();
    assert_eq!(next_event(&mut stream).await.revision, 5);
    db.close().await.ok();
}

/// A revision burned while an unrelated transaction stays open (another
/// application on the same cluster) is passed over as soon as its own
/// writer ends; the unrelated one is never waited for. A writer that took
/// its revision without holding its lock (stalled in between) and tries to
/// commit it after it was passed over is refused: nothing can appear
/// behind a delivered revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_burned_revision_waits_only_for_its_writer() {
    use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
    let Some(mut s) = start(Backend::Postgres).await else {
        return;
    };
    write(&mut s.users, "warm", json!({"a":1})).await;
    let mut stream = watch(&mut s.users, 0, &[]).await;
    assert_eq!(expect_progress(&mut stream).await, 1);

    let unrelated = Database::connect(s.db.url()).await.unwrap();
    let open = unrelated.begin().await.unwrap();
    open.execute_unprepared("SELECT pg_current_xact_id()")
        .await
        .unwrap();

    let db = Database::connect(s.db.url()).await.unwrap();
    let burner = db.begin().await.unwrap();
    let taken = burner
        .query_one_raw(Statement::from_string(
            burner.get_database_backend(),
            take_revision_sql(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.try_get::<i64>("", "latest").unwrap(), 2);
    burner.rollback().await.unwrap();

    // A writer stalled between taking a revision and locking it.
    let stalled = db.begin().await.unwrap();
    stalled
        .execute_unprepared("SELECT nextval('event_revisions')")
        .await
        .unwrap();

    let after = write(&mut s.users, "u1", json!({"b":2})).await;
    assert_eq!(after.revision, 4);
    let event = next_event(&mut stream).await;
    assert_eq!(
        event.revision, 4,
        "delivered while the unrelated transaction is open"
    );
    let more = write(&mut s.users, "u1", json!({"c":3})).await;
    assert_eq!(next_event(&mut stream).await.revision, more.revision);

    let empty = r#"{"public_metadata":{},"private_metadata":{},"unsafe_metadata":{},"version":0,"revision":0,"created_at":null,"updated_at":null}"#;
    let late = stalled
        .execute_unprepared(&format!(
            "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
             VALUES (3, 'user', 'late', 'merged', '[]', '{empty}', '{empty}', now())"
        ))
        .await;
    assert!(
        late.is_err(),
        "revision 3 was passed over and cannot commit"
    );
    stalled.rollback().await.ok();
    open.rollback().await.unwrap();
    assert_eq!(s.db.event_revisions().await, vec![1, 4, 5]);
    db.close().await.ok();
    unrelated.close().await.ok();
}

/// Two first writes to one id: the second waits for the first and builds on
/// it, with no revision burned (no void, no hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_first_writes_burn_no_revision() {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};
    let Some(s) = start(Backend::Postgres).await else {
        return;
    };
    let db = Database::connect(s.db.url()).await.unwrap();
    // A first write in progress, as the service makes it: the empty row.
    let first = db.begin().await.unwrap();
    first
        .execute_unprepared(
            "INSERT INTO metadata (kind, id, public_metadata, private_metadata, unsafe_metadata, \
             version, revision, created_at, updated_at) \
             VALUES ('user', 'new', '{}', '{}', '{}', 0, 0, now(), now())",
        )
        .await
        .unwrap();
    let mut users = s.users.clone();
    let second = tokio::spawn(async move { write(&mut users, "new", json!({"second":2})).await });
    until(
        "the second first write queues behind the first",
        Duration::from_secs(20),
        async || match s.db.postgres().lock_waits().await {
            0 => Err(0),
            n => Ok(n),
        },
    )
    .await;
    assert!(!second.is_finished(), "the second first write waits");
    first.rollback().await.unwrap();
    let written = second.await.unwrap();
    assert_eq!((written.version, written.revision), (1, 1));
    // And two at once, many times over.
    let mut tasks = Vec::new();
    for id in 0..10 {
        for n in 0..3 {
            let mut users = s.users.clone();
            tasks.push(tokio::spawn(async move {
                write(
                    &mut users,
                    &format!("id{id}"),
                    json!({ format!("k{n}"): n }),
                )
                .await
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(s.db.event_revisions().await, (1..=31).collect::<Vec<_>>());
    let voids = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM events WHERE change_type = 'void'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(voids, 0);
    db.close().await.ok();
}

/// Every connection of the service to its database is killed (the pool's
/// and the LISTEN one): watchers keep receiving events without a gap, from
/// both replicas, once connections are re-established.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_watch_survives_lost_connections() {
    use sea_orm::{ConnectionTrait, Statement};
    let Some(mut s) = start_with(Backend::Postgres, |c| {
        c.events.broker.poll_interval = Duration::from_millis(200)
    })
    .await
    else {
        return;
    };
    let replica = s.another_server().await;
    let mut replica_users =
        UserMetadataServiceClient::new(crate::harness::connect(replica.local_addr()).await);
    let mut here = watch(&mut s.users, 0, &[]).await;
    let mut there = watch(&mut replica_users, 0, &[]).await;
    expect_progress(&mut here).await;
    expect_progress(&mut there).await;
    write(&mut s.users, "u1", json!({"before":1})).await;

    let admin = s.db.postgres().admin().await;
    let database = s.db.postgres().name.clone();
    let killed = admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{database}' AND pid <> pg_backend_pid()"
            ),
        ))
        .await
        .unwrap();
    assert!(killed.len() >= 2, "the service had connections to kill");
    admin.close().await.ok();

    // Writes may fail while the pool notices; retry each until it lands.
    for i in 0..5 {
        until("the write lands", Duration::from_secs(10), async || match s
            .users
            .merge(merge("u1", json!({ "after": i })))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                Err(status)
            }
        })
        .await;
    }
    let expected = s.db.event_revisions().await;
    assert_eq!(expected.len(), 6);
    for stream in [&mut here, &mut there] {
        let got = events(stream, 6).await;
        assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), expected);
    }
    replica.shutdown().await.unwrap();
}
