//! Limits on Watch: ids per filter, open streams per server and calls per
//! connection. A stream holds memory and a task for as long as it is open,
//! so each of these is what one client could otherwise grow without end.

use std::time::{Duration, Instant};

use metadata_service::proto::v1::*;
use tokio::time::timeout;
use tonic::{Code, Status, Streaming};

use crate::common::wait::until;
use crate::common::{self, Backend};
use crate::harness::{Orgs, Users, start, start_with};

fn ids(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("id_{i:04}")).collect()
}

/// A user Watch that has started: its first message (the progress that
/// says where it starts) has arrived.
async fn open(
    users: &mut Users,
    user_ids: Vec<String>,
) -> Result<Streaming<WatchUserMetadataResponse>, Status> {
    let request = WatchUserMetadataRequest {
        user_ids,
        ..Default::default()
    };
    let mut stream = users.watch(request).await?.into_inner();
    let first = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("first message within 10 s")?
        .expect("stream open");
    assert!(
        matches!(
            first.response,
            Some(watch_user_metadata_response::Response::Progress(_))
        ),
        "{first:?}"
    );
    Ok(stream)
}

async fn open_org(
    orgs: &mut Orgs,
    organization_ids: Vec<String>,
) -> Result<Streaming<WatchOrganizationMetadataResponse>, Status> {
    let request = WatchOrganizationMetadataRequest {
        organization_ids,
        ..Default::default()
    };
    let mut stream = orgs.watch(request).await?.into_inner();
    timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("first message within 10 s")?
        .expect("stream open");
    Ok(stream)
}

async fn filters_hold_at_most_1000_ids(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let status = open(&mut s.users, ids(1001)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "user_ids: has 1001 ids, the limit is 1000"
    );
    let status = open_org(&mut s.orgs, ids(1001)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "organization_ids: has 1001 ids, the limit is 1000"
    );
    // The limit itself is allowed, and the stream works.
    let mut users = open(&mut s.users, ids(1000)).await.expect("1000 user ids");
    open_org(&mut s.orgs, ids(1000))
        .await
        .expect("1000 organization ids");
    s.users
        .merge(MergeUserMetadataRequest {
            user_id: "id_0999".into(),
            public_metadata: Some(common::json::structure(&serde_json::json!({"a": 1}))),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = timeout(Duration::from_secs(10), users.message())
        .await
        .expect("event within 10 s")
        .unwrap()
        .expect("stream open");
    match event.response {
        Some(watch_user_metadata_response::Response::Event(e)) => assert_eq!(e.user_id, "id_0999"),
        other => panic!("expected the event, got {other:?}"),
    }
}

backend_tests!(filters_hold_at_most_1000_ids);

fn refused_total(s: &crate::harness::TestServer) -> u64 {
    s.metric("metadata_watch_streams_refused_total") as u64
}

/// `--max-watch-streams`: past it a Watch is refused at once with
/// RESOURCE_EXHAUSTED and counted; once a client drops its stream, its
/// place is free again. Unary calls have their own bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_past_the_bound_are_refused_until_one_ends() {
    let mut s = start_with(Backend::Sqlite, |c| c.max_watch_streams = 2)
        .await
        .unwrap();
    let first = open(&mut s.users, vec![]).await.expect("first stream");
    let _second = open_org(&mut s.orgs, vec![]).await.expect("second stream");
    assert_eq!(refused_total(&s), 0);

    let started = Instant::now();
    let status = open(&mut s.users, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 2 Watch streams"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    let status = open_org(&mut s.orgs, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(refused_total(&s), 2);
    s.users
        .get(GetUserMetadataRequest {
            user_id: "u".into(),
            revision: None,
        })
        .await
        .expect("unary calls are not bound by streams");

    // The client goes away; the server notices when the stream is reset.
    drop(first);
    let mut refusals = 2;
    let _third = until(
        "the dropped stream's place is given back",
        Duration::from_secs(10),
        async || match open(&mut s.users, vec![]).await {
            Ok(stream) => Ok(stream),
            Err(status) if status.code() == Code::ResourceExhausted => {
                refusals += 1;
                Err(status)
            }
            Err(status) => panic!("{status:?}"),
        },
    )
    .await;
    assert_eq!(refused_total(&s), refusals);
}

/// `--max-streams-per-connection` is advertised in HTTP/2 SETTINGS: a
/// client with that many calls open on one connection queues the next
/// one (tonic's client does; a client that ignored the setting would get
/// the stream refused by the server) until one of them ends, while other
/// connections are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_per_connection_are_bounded() {
    let s = start_with(Backend::Sqlite, |c| c.max_streams_per_connection = 2)
        .await
        .unwrap();
    let mut users = Users::new(s.channel().await);
    let first = open(&mut users, vec![]).await.expect("first stream");
    let _second = open(&mut users, vec![]).await.expect("second stream");

    let mut same_connection = users.clone();
    let mut third = tokio::spawn(async move { open(&mut same_connection, vec![]).await });
    assert!(
        timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third call started on a connection limited to 2"
    );
    let mut other_connection = Users::new(s.channel().await);
    timeout(Duration::from_secs(5), open(&mut other_connection, vec![]))
        .await
        .expect("another connection is not held up")
        .expect("stream on another connection");

    drop(first);
    timeout(Duration::from_secs(10), third)
        .await
        .expect("the queued call starts once a stream on its connection ends")
        .unwrap()
        .expect("third stream");
}
