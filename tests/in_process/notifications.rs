//! How a replica on the same Postgres database learns of another's commits:
//! not from the write transaction (no NOTIFY in it), but from the writer's
//! commit announcer after the commit; and, when that notification is lost,
//! from its own poll of the log. And that a shutdown, which closes the
//! LISTEN connection's pool, is not reported as a lost connection.

use std::sync::Arc;
use std::time::Duration;

use metadata_service::events::{Broker, BrokerOptions};
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::server::RunningServer;
use metadata_service::store::{ANNOUNCER_APPLICATION_NAME, Store, StoreOptions, StorePauses};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

use crate::common::wait::until;
use crate::common::{Backend, TestDb};
use crate::harness::{TestServer, Users, capture_logs, connect, start, start_with, write};
use crate::watch::{assert_quiet, events, expect_progress, next_event, watch};

/// Long enough that a test never sees the replica's poll.
const NEVER: Duration = Duration::from_secs(3600);

/// A second replica that learns of commits only from notifications (its
/// poll is `poll`), and a Watch stream on it from now.
async fn replica(
    s: &TestServer,
    poll: Duration,
) -> (
    RunningServer,
    tonic::Streaming<metadata_service::proto::v1::WatchUserMetadataResponse>,
) {
    let replica = s
        .another_server_with(|c| {
            c.store.pauses = StorePauses::default();
            c.events.broker.poll_interval = poll;
        })
        .await;
    let mut users: Users = UserMetadataServiceClient::new(connect(replica.local_addr()).await);
    let mut stream = watch(&mut users, 0, &[]).await;
    expect_progress(&mut stream).await;
    (replica, stream)
}

/// A write commits without notifying anyone: the replica, which does not
/// poll, hears of it only once the writer's announcer sends its NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_are_announced_after_the_write_not_in_it() {
    let pauses = StorePauses::default();
    let announce = pauses.announce.clone();
    let Some(mut s) = start_with(Backend::Postgres, |c| c.store.pauses = pauses).await else {
        return;
    };
    let (replica, mut there) = replica(&s, NEVER).await;
    // A first write delivered and announced, so that the announcer is
    // connected, and so that the reads the replica's setup woke (a wake-up
    // that arrives during a read is kept, and makes one more read right
    // after) are behind it: such a read, not a notification, could
    // otherwise find the write under test. Seen: 2 runs in 10 without the
    // warm-up.
    let warm = write(&mut s.users, "u1", json!({"n": 0})).await;
    assert_eq!(next_event(&mut there).await.revision, warm.revision);
    until(
        "the warm-up is announced",
        Duration::from_secs(20),
        async || match s.metric(r#"metadata_commit_notifications_total{outcome="sent"}"#) {
            0.0 => Err(0.0),
            sent => Ok(sent),
        },
    )
    .await;

    announce.arm(1);
    let first = write(&mut s.users, "u1", json!({"n": 1})).await;
    assert!(
        announce.reached(Duration::from_secs(10)).await,
        "the commit woke the announcer"
    );
    // Committed and acknowledged; had its transaction notified, the
    // replica would deliver it within milliseconds.
    assert_quiet(&mut there, Duration::from_millis(500)).await;
    announce.release();
    assert_eq!(next_event(&mut there).await.revision, first.revision);

    // Unpaused, every later commit reaches the replica too.
    let mut written = Vec::new();
    for n in 2..=4 {
        written.push(write(&mut s.users, "u1", json!({ "n": n })).await.revision);
    }
    let got = events(&mut there, written.len()).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), written);
    assert!(s.metric(r#"metadata_commit_notifications_total{outcome="sent"}"#) >= 3.0);
    replica.shutdown().await.unwrap();
}

/// The announcer's connection is killed: its next NOTIFY fails, is counted,
/// and is sent again on a new connection; the replica, which does not poll,
/// still receives every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_killed_announcer_connection_loses_no_event() {
    let Some(mut s) = start_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let (replica, mut there) = replica(&s, NEVER).await;
    // The announcer connects on the first commit it announces.
    let first = write(&mut s.users, "u1", json!({"n": 0})).await;
    assert_eq!(next_event(&mut there).await.revision, first.revision);

    let admin = s.db.postgres().admin().await;
    let killed = admin
        .query_all_raw(Statement::from_string(
            admin.get_database_backend(),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND application_name = '{ANNOUNCER_APPLICATION_NAME}'",
                s.db.postgres().name
            ),
        ))
        .await
        .unwrap();
    admin.close().await.ok();
    assert_eq!(killed.len(), 1, "one announcer had connected: the writer's");

    // The first commit after the kill: its NOTIFY fails, and only the
    // announcer's retry can tell the replica (no later commit will).
    let second = write(&mut s.users, "u1", json!({"n": 1})).await;
    assert_eq!(next_event(&mut there).await.revision, second.revision);
    assert_eq!(
        s.metric(r#"metadata_commit_notifications_total{outcome="failed"}"#),
        1.0,
        "the NOTIFY on the killed connection failed once, and was sent again"
    );
    let mut written = vec![first.revision, second.revision];
    for n in 2..=3 {
        written.push(write(&mut s.users, "u1", json!({ "n": n })).await.revision);
    }
    let got = events(&mut there, 2).await;
    assert_eq!(
        got.iter().map(|e| e.revision).collect::<Vec<_>>(),
        written[2..]
    );
    assert_eq!(s.db.event_revisions().await, written);
    assert_quiet(&mut there, Duration::from_millis(200)).await;
    replica.shutdown().await.unwrap();
}

/// No notification arrives at all (the announcer is stopped before its
/// NOTIFY, for good): the replica's poll still delivers every event, in
/// order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_notifications_are_covered_by_the_poll() {
    let pauses = StorePauses::default();
    let announce = pauses.announce.clone();
    let Some(mut s) = start_with(Backend::Postgres, |c| c.store.pauses = pauses).await else {
        return;
    };
    let (replica, mut there) = replica(&s, Duration::from_millis(200)).await;
    announce.arm(1);
    let mut written = Vec::new();
    for n in 0..5 {
        written.push(
            write(&mut s.users, &format!("u{}", n % 2), json!({ "n": n }))
                .await
                .revision,
        );
    }
    assert!(announce.reached(Duration::from_secs(10)).await);
    let got = events(&mut there, written.len()).await;
    assert_eq!(got.iter().map(|e| e.revision).collect::<Vec<_>>(), written);
    assert_eq!(
        s.metric(r#"metadata_commit_notifications_total{outcome="sent"}"#),
        0.0,
        "every notification was held back"
    );
    assert_quiet(&mut there, Duration::from_millis(300)).await;
    replica.shutdown().await.unwrap();
    s.stop().await;
}

/// A server's stop, end to end, on both servers of a pair (each listens; a
/// Watch and a write make the connections busy): nothing about
/// notifications is logged as a fault, then or in the 0.5 s retry rhythm
/// after. The stop signals shutdown before it closes the pool; the next
/// test covers a pool closed first. Current-thread runtime: the servers'
/// tasks log on this thread, where the capture is.
#[tokio::test]
async fn postgres_shutdown_is_not_a_lost_notification_connection() {
    let (captured, _guard) = capture_logs(tracing::Level::WARN);
    let Some(mut s) = start(Backend::Postgres).await else {
        return;
    };
    let (replica, mut there) = replica(&s, NEVER).await;
    let written = write(&mut s.users, "u1", json!({"n": 0})).await;
    assert_eq!(next_event(&mut there).await.revision, written.revision);
    drop(there);
    replica.shutdown().await.unwrap();
    s.stop().await;
    // Time is what is tested: nothing shows that these tasks ended (they
    // end silently on shutdown), so the test looks for a rhythm, over long
    // enough for a retry every 0.5 s to show more than once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let lines = captured.lines();
    assert!(
        lines.iter().all(|l| !l.contains("notifications")),
        "a shutdown was logged as a notification fault:\n{}",
        lines.join("\n")
    );
}

/// The pool closes under a running dispatcher whose shutdown has not been
/// signalled: the LISTEN task ends instead of reconnecting from a pool that
/// never reopens, and quietly. Closing the pool waits for every connection,
/// the listener's too: without this it hung, warning every 0.5 s.
#[tokio::test]
async fn postgres_a_closed_pool_ends_the_listener_quietly() {
    // Debug too: the listener says so there when it ends.
    let (captured, _guard) = capture_logs(tracing::Level::DEBUG);
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let store = Store::connect(db.url(), &StoreOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let store = Arc::new(store);
    // Never cancelled: only the pool's closing can end the listener.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _broker = Broker::start(store.clone(), BrokerOptions::default(), shutdown)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), store.close_pool())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "closing the pool still waits for the listener's connection:\n{}",
                captured.lines().join("\n")
            )
        });
    // Ended, it can log nothing more; a listener reconnecting from the
    // closed pool would never say so, and warn every 0.5 s instead.
    until("the listener ends", Duration::from_secs(20), async || {
        let lines = captured.lines();
        match lines.iter().any(|l| l.contains("event notifications end")) {
            true => Ok(()),
            false => Err(faults(&lines)),
        }
    })
    .await;
    let faults = faults(&captured.lines());
    assert!(
        faults.is_empty(),
        "a closed pool was logged as a notification fault:\n{}",
        faults.join("\n")
    );
}

/// The lines about notifications logged as a fault (a warning or an
/// error).
fn faults(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            let level = l.split_whitespace().nth(1);
            matches!(level, Some("WARN" | "ERROR")) && l.contains("notifications")
        })
        .cloned()
        .collect()
}
