//! Schemas for metadata fields (issue 18): a SetSchema racing with writes,
//! on one server and across replicas, held at a chosen moment.

use std::time::Duration;

use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::*;
use metadata_service::store::StorePauses;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::Backend;
use crate::common::json::{field, structure};
use crate::common::wait::until;
use crate::harness::{Users, connect, start_with, users_in_flight, write};

/// How long a wait for a state may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

type Schemas = MetadataSchemaServiceClient<Channel>;

fn unsafe_schema() -> SetSchemaRequest {
    SetSchemaRequest {
        kind: MetadataKind::User as i32,
        field: MetadataField::Unsafe as i32,
        schema: Some(structure(&json!({
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0}},
        }))),
        validate_only: false,
        expected_version: None,
    }
}

async fn merge_unsafe(
    users: &mut Users,
    id: &str,
    value: serde_json::Value,
) -> Result<UserMetadata, tonic::Status> {
    users
        .merge(MergeUserMetadataRequest {
            user_id: id.into(),
            unsafe_metadata: Some(structure(&value)),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn stored_unsafe(users: &mut Users, id: &str) -> serde_json::Value {
    let record = users
        .get(GetUserMetadataRequest {
            user_id: id.into(),
            revision: None,
        })
        .await
        .expect("get")
        .into_inner();
    field(&record.unsafe_metadata)
}

/// A write that a process validated against the schemas it had (none)
/// reaches the database while SetSchema holds its check open: it waits,
/// and once the schema is stored it is validated again against it and
/// refused; nothing of it is stored. `writer` is a client of the process
/// that writes (the same server, or a replica).
async fn a_write_racing_set_schema_meets_the_new_schema(backend: Backend, replica: bool) {
    let pauses = StorePauses::default();
    let held = pauses.set_schema.clone();
    let Some(mut s) = start_with(backend, |c| c.store.pauses = pauses).await else {
        return;
    };
    let other = match replica {
        true => Some(
            s.another_server_with(|c| c.store.pauses = StorePauses::default())
                .await,
        ),
        false => None,
    };
    let mut writer: Users = match &other {
        Some(server) => UserMetadataServiceClient::new(connect(server.local_addr()).await),
        None => s.users.clone(),
    };
    // The writing process has read the (empty) schemas of users.
    merge_unsafe(&mut writer, "u1", json!({"age": 1}))
        .await
        .expect("a first write");

    let mut schemas = Schemas::new(s.channel().await);
    held.arm(1);
    let set = tokio::spawn(async move { schemas.set_schema(unsafe_schema()).await });
    assert!(
        held.reached(Duration::from_secs(10)).await,
        "SetSchema checked and holds"
    );

    let racing = {
        let mut writer = writer.clone();
        tokio::spawn(async move { merge_unsafe(&mut writer, "u1", json!({"age": -5})).await })
    };
    // The write cannot finish while the check is open. It is under way
    // first: in flight on the process that writes and, on Postgres, queued
    // behind SetSchema's table lock (SQLite shows no waiting writer).
    let writing = other.as_ref().unwrap_or(s.server()).metrics().clone();
    until(
        "the racing write arrives",
        WAIT,
        async || match users_in_flight(&writing, "Merge") {
            1 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    if backend == Backend::Postgres {
        until(
            "the racing write waits for the lock",
            WAIT,
            async || match s.db.postgres().lock_waits().await {
                0 => Err(0),
                n => Ok(n),
            },
        )
        .await;
    }
    assert!(
        !racing.is_finished(),
        "a write went through while SetSchema held its check"
    );
    held.release();
    let stored = set.await.unwrap().expect("SetSchema succeeds").into_inner();
    assert_eq!(stored.version, 1);

    let refused = racing
        .await
        .unwrap()
        .expect_err("the racing write is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("unsafe_metadata/age: -5 is less than the minimum of 0"),
        "{}",
        refused.message()
    );
    assert_eq!(stored_unsafe(&mut s.users, "u1").await, json!({"age": 1}));
    // Writes that conform go on, on either process.
    merge_unsafe(&mut writer, "u1", json!({"age": 2}))
        .await
        .expect("conforming write");
    write(&mut s.users, "u2", json!({"any": "public"})).await;
    if let Some(server) = other {
        server.shutdown().await.expect("replica stops");
    }
}

async fn on_one_server(backend: Backend) {
    a_write_racing_set_schema_meets_the_new_schema(backend, false).await
}

backend_tests!(on_one_server);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_replica_write_racing_set_schema_meets_the_new_schema() {
    a_write_racing_set_schema_meets_the_new_schema(Backend::Postgres, true).await
}

/// A replica that read the schemas before another replica changed them
/// refuses a violating write at once afterwards, and accepts one that a
/// deleted schema no longer forbids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_replica_follows_schema_changes() {
    let Some(mut s) = start_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let other = s.another_server().await;
    let mut replica: Users = UserMetadataServiceClient::new(connect(other.local_addr()).await);
    merge_unsafe(&mut replica, "u1", json!({"age": 1}))
        .await
        .unwrap();

    let mut schemas = Schemas::new(s.channel().await);
    schemas.set_schema(unsafe_schema()).await.unwrap();
    let refused = merge_unsafe(&mut replica, "u1", json!({"age": -1}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let deleted = schemas
        .delete_schema(DeleteSchemaRequest {
            kind: MetadataKind::User as i32,
            field: MetadataField::Unsafe as i32,
            expected_version: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    merge_unsafe(&mut replica, "u1", json!({"age": -1}))
        .await
        .expect("no schema any more");
    assert_eq!(stored_unsafe(&mut s.users, "u1").await, json!({"age": -1}));
    other.shutdown().await.expect("replica stops");
}
