//! The consumer example (`examples/consumer/`) across a server restart and
//! after its position was pruned: nothing missed, nothing repeated.

#[path = "../../examples/consumer/consumer.rs"]
mod consumer;

use std::time::Duration;

use consumer::{Position, Replica, follow};
use metadata_service::proto::v1::*;
use serde_json::json;

use crate::common::Backend;
use crate::common::json::structure;
use crate::common::wait::until;
use crate::harness::{TestServer, start, start_with};

/// How long a wait for a state may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

async fn write(s: &TestServer, id: &str, n: u64) -> UserMetadata {
    let request = MergeUserMetadataRequest {
        user_id: id.into(),
        public_metadata: Some(structure(&json!({ "n": n }))),
        ..Default::default()
    };
    s.users.clone().merge(request).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_across_a_server_restart_without_gaps_or_repeats() {
    let mut s = start(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let position = Position::new(&dir.path().join("position"));
    let mut replica = Replica::default();
    for n in 0..5 {
        write(&s, &format!("user_{}", n % 2), n).await;
    }
    follow(s.channel().await, &position, &mut replica, Some(5))
        .await
        .unwrap();
    assert_eq!(position.load().unwrap(), 5);

    s.restart().await;
    for n in 5..10 {
        write(&s, &format!("user_{}", n % 3), n).await;
    }
    follow(s.channel().await, &position, &mut replica, Some(5))
        .await
        .unwrap();
    let revisions: Vec<u64> = replica.applied.iter().map(|(r, _, _)| *r).collect();
    assert_eq!(
        revisions,
        (1..=10).collect::<Vec<_>>(),
        "each event once, in order"
    );
    for id in ["user_0", "user_1", "user_2"] {
        let stored = s
            .users
            .clone()
            .get(GetUserMetadataRequest {
                user_id: id.into(),
                revision: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(replica.users[id], stored, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_with_get_when_its_position_was_pruned() {
    let s = start_with(Backend::Sqlite, |c| {
        c.events.retention = Duration::from_millis(300);
        c.events.prune_interval = Duration::from_millis(100);
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let position = Position::new(&dir.path().join("position"));
    let mut replica = Replica::default();
    write(&s, "user_a", 1).await;
    write(&s, "user_b", 1).await;
    follow(s.channel().await, &position, &mut replica, Some(2))
        .await
        .unwrap();
    // While the consumer is away: changes, then their events are pruned.
    write(&s, "user_a", 2).await;
    write(&s, "user_b", 2).await;
    let mut users = s.users.clone();
    let refused = until("revision 3 is pruned", WAIT, async || {
        let request = WatchUserMetadataRequest {
            start_revision: 3,
            ..Default::default()
        };
        match users.watch(request).await {
            Err(status) => Ok(status),
            Ok(_) => Err("a Watch from revision 3 is still served"),
        }
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // The consumer comes back: too old, so it re-reads, then follows live.
    let channel = s.channel().await;
    let follower = tokio::spawn(async move {
        follow(channel, &position, &mut replica, Some(1))
            .await
            .map(|()| replica)
    });
    // Keep writing until the live stream has delivered one change.
    let mut n = 3;
    let latest = until("the live stream delivers a change", WAIT, async || {
        let written = write(&s, "user_a", n).await;
        n += 1;
        match follower.is_finished() {
            true => Ok(written),
            false => Err(format!("{} writes, the follower still waits", n - 3)),
        }
    })
    .await;
    let replica = follower.await.unwrap().unwrap();
    assert_eq!(replica.resyncs, 1);
    let stored_b = s
        .users
        .clone()
        .get(GetUserMetadataRequest {
            user_id: "user_b".into(),
            revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replica.users["user_b"], stored_b, "re-read with Get");
    let a = &replica.users["user_a"];
    assert!(a.version >= 3, "user_a moved on: {a:?}");
    assert!(a.version <= latest.version);
}
