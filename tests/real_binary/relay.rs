//! `metadata-service relay` as an operator runs it, against a real NATS
//! (TEST_NATS_URL): SIGKILL during a burst of writes and a restart leave
//! every revision in the stream once and in order; bad configuration is
//! one error line and exit status 1.

use std::process::Stdio;
use std::time::Duration;

use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{MergeUserMetadataRequest, UserMetadataEvent};
use prost::Message;
use serde_json::json;
use tokio::process::Child;

use crate::binary::{assert_one_line_error, command, run_bin};
use crate::common::json::structure;
use crate::common::nats::{self, TestStream};
use crate::common::{Backend, TestDb};
use crate::served;

const WAIT: Duration = Duration::from_secs(30);

fn relay_args<'a>(db: &'a str, stream: &'a TestStream) -> Vec<&'a str> {
    vec![
        "relay",
        "--database-url",
        db,
        "--nats-url",
        &stream.url,
        "--nats-stream",
        &stream.name,
        "--nats-subject-prefix",
        &stream.prefix,
        "--listen",
        "127.0.0.1:0",
        "--watch-poll-interval",
        "200ms",
    ]
}

fn spawn_relay(dir: &std::path::Path, args: &[&str]) -> Child {
    command(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_then_restart_is_exactly_once_in_order() {
    let Some(url) = nats::url() else {
        return;
    };
    let Some(server) = served::start(Backend::Postgres).await else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = server.db.url().to_owned();
    let args = relay_args(&db_url, &stream);
    let mut relay = spawn_relay(dir.path(), &args);

    let endpoint = server.url();
    let burst = tokio::spawn(async move {
        let mut users = UserMetadataServiceClient::connect(endpoint).await.unwrap();
        for n in 0..300 {
            users
                .merge(MergeUserMetadataRequest {
                    user_id: format!("user.{}", n % 17),
                    public_metadata: Some(structure(&json!({ "n": n }))),
                    ..Default::default()
                })
                .await
                .expect("merge");
        }
    });
    // SIGKILL in the middle of the burst, with publishes in flight.
    stream.wait_for(60, WAIT).await;
    relay.start_kill().unwrap();
    relay.wait().await.unwrap();
    let mut relay = spawn_relay(dir.path(), &args);
    burst.await.unwrap();
    let revisions = server.db.event_revisions().await;
    stream.wait_for(*revisions.last().unwrap(), WAIT).await;
    assert_eq!(stream.event_revisions().await, revisions);
    let messages = stream.messages().await;
    for message in &messages[1..] {
        let event = UserMetadataEvent::decode(message.payload.as_ref()).expect("an event");
        assert_eq!(event.revision, message.revision());
    }
    let subjects: Vec<String> = messages[1..].iter().map(|m| m.subject.clone()).collect();
    assert!(
        subjects
            .iter()
            .all(|s| s.starts_with(&format!("{}.user.user%2E", stream.prefix))),
        "{subjects:?}"
    );
    relay.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_one_error_line() {
    let Some(url) = nats::url() else {
        return;
    };
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let stream = TestStream::new(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("nats://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut args = relay_args(db.url(), &stream);
    args[4] = &unreachable;
    let run = run_bin(dir.path(), &args).await;
    let line = assert_one_line_error(&run);
    assert!(
        line.starts_with(&format!("error: cannot connect to NATS at {unreachable}")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_stream_is_one_error_line() {
    let Some(url) = nats::url() else {
        return;
    };
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let stream = TestStream::new(&url).await;
    stream
        .context
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.name.clone(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = run_bin(dir.path(), &relay_args(db.url(), &stream)).await;
    let line = assert_one_line_error(&run);
    assert!(line.contains("not this relay's stream"), "{line}");
    assert!(line.contains("orders.>"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_sqlite_points_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_bin(
        dir.path(),
        &[
            "relay",
            "--database-url",
            "sqlite://relay.db?mode=rwc",
            "--nats-url",
            "nats://127.0.0.1:4222",
        ],
    )
    .await;
    let line = assert_one_line_error(&run);
    assert!(line.contains("serve --relay-nats-url"), "{line}");
}
