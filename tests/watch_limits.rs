//! Limits on Watch. A stream holds its filter for as long as it is open, so
//! the filter is bounded.

mod common;

use std::time::Duration;

use common::{Backend, start};
use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::*;
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

type Users = UserMetadataServiceClient<Channel>;
type Orgs = OrganizationMetadataServiceClient<Channel>;

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
