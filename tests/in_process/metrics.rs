//! The Prometheus endpoint and HTTP probes of a running server: counters
//! move with traffic, gauges follow streams, probes follow readiness.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use metadata_service::proto::v1::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::common::Backend;
use crate::common::json::structure;
use crate::common::wait::until;
use crate::harness::TestServer;

/// How long a wait for a state may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

/// GET `path` over HTTP/1.1; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response within 10s")
    .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Every sample of the scrape, by name with labels as printed.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

struct Scraper {
    addr: SocketAddr,
}

impl Scraper {
    async fn scrape(&self) -> BTreeMap<String, f64> {
        let (status, body) = http_get(self.addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        samples(&body)
    }

    async fn value(&self, sample: &str) -> f64 {
        self.scrape().await.get(sample).copied().unwrap_or(0.0)
    }
}

fn handled(method: &str, code: &str) -> String {
    format!(
        r#"grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",grpc_service="metadata.v1.UserMetadataService"}}"#
    )
}

async fn start() -> (TestServer, Scraper) {
    let server = crate::harness::start_with(Backend::Sqlite, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    .unwrap();
    let addr = server.metrics_addr().expect("metrics are served");
    (server, Scraper { addr })
}

fn merge(id: &str) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id: id.into(),
        public_metadata: Some(structure(&json!({"plan": "pro"}))),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_traffic() {
    let (server, metrics) = start().await;
    let mut users = server.users.clone();
    let before = metrics.scrape().await;
    assert_eq!(before.get(&handled("Merge", "OK")), None, "fresh server");
    assert_eq!(
        before.get(&format!(
            r#"metadata_build_info{{revision="{}",version="0.1.0"}}"#,
            env!("METADATA_GIT_REVISION")
        )),
        Some(&1.0)
    );
    assert!(before["process_resident_memory_bytes"] > 0.0);

    users.merge(merge("m1")).await.unwrap();
    users.merge(merge("m2")).await.unwrap();
    // A no-op merge is a call but not a change.
    users.merge(merge("m2")).await.unwrap();
    let err = users
        .get(GetUserMetadataRequest {
            user_id: "".into(),
            revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let after = metrics.scrape().await;
    assert_eq!(after[&handled("Merge", "OK")], 3.0);
    assert_eq!(after[&handled("Get", "InvalidArgument")], 1.0);
    let count = r#"grpc_server_handling_seconds_count{grpc_method="Merge",grpc_service="metadata.v1.UserMetadataService"}"#;
    assert_eq!(after[count], 3.0);
    assert_eq!(after[r#"metadata_events_written_total{kind="user"}"#], 2.0);
    let in_flight = r#"grpc_server_in_flight_requests{grpc_method="Merge",grpc_service="metadata.v1.UserMetadataService"}"#;
    assert_eq!(after[in_flight], 0.0);
    assert!(after["metadata_db_acquire_seconds_count"] >= 2.0);
    assert_eq!(after["metadata_db_pool_max_connections"], 16.0);
    let open = after[r#"metadata_db_pool_connections{state="idle"}"#]
        + after[r#"metadata_db_pool_connections{state="in_use"}"#];
    assert!(open >= 1.0, "{after:?}");
}

/// Writes that queue while SQLite's write lock is taken are committed
/// together once it is free: typically 1 write alone (the one already
/// waiting for the lock), then the rest in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_sqlite_writes_share_one_transaction() {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    const WRITES: usize = 12;
    let (server, metrics) = start().await;
    // Another connection holds the write lock, as another process could.
    let other = server.db.connect().await;
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    let lock = other.begin_with_options(options).await.unwrap();

    let calls: Vec<_> = (0..WRITES)
        .map(|i| {
            let mut users = server.users.clone();
            tokio::spawn(async move { users.merge(merge(&format!("g{i}"))).await })
        })
        .collect();
    let in_flight = r#"grpc_server_in_flight_requests{grpc_method="Merge",grpc_service="metadata.v1.UserMetadataService"}"#;
    until("every write arrives", WAIT, async || {
        match metrics.value(in_flight).await {
            arrived if arrived >= WRITES as f64 => Ok(()),
            arrived => Err(arrived),
        }
    })
    .await;
    // In flight is counted on arrival, a moment before the handler reaches
    // the queue: a late one only makes a third, smaller group, which the
    // check below allows.
    lock.commit().await.unwrap();
    for call in calls {
        call.await.unwrap().expect("every queued write succeeds");
    }

    let after = metrics.scrape().await;
    assert_eq!(
        after["metadata_sqlite_write_group_size_sum"], WRITES as f64,
        "every write counted once"
    );
    // One transaction per write would be WRITES.
    let groups = after["metadata_sqlite_write_group_size_count"];
    assert!(
        groups < WRITES as f64,
        "{groups} transactions for {WRITES} queued writes"
    );
    assert_eq!(
        after[r#"metadata_events_written_total{kind="user"}"#],
        WRITES as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_with_their_code() {
    use metadata_service::auth::{ApiKeys, Authenticator, hash_key};
    let auth = std::sync::Arc::new(Authenticator::new(
        ApiKeys::parse(&format!("k:{}", hash_key("the-key")), "test").unwrap(),
        None,
    ));
    let server = crate::harness::start_with(Backend::Sqlite, |c| {
        c.auth = auth;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    .unwrap();
    let metrics = Scraper {
        addr: server.metrics_addr().unwrap(),
    };
    let err = server.users.clone().merge(merge("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        metrics.value(&handled("Merge", "Unauthenticated")).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_and_deliveries_are_counted() {
    let (server, metrics) = start().await;
    let mut users = server.users.clone();
    let request = WatchUserMetadataRequest::default();
    let mut stream = users.watch(request).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("progress first");
    assert_eq!(metrics.value("metadata_watch_streams_open").await, 1.0);

    users.merge(merge("w1")).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
    assert!(matches!(event, Ok(Ok(Some(_)))), "{event:?}");
    assert_eq!(
        metrics.value("metadata_watch_events_delivered_total").await,
        1.0
    );
    // The dispatcher reached the newest revision: no lag once it is read.
    until("the dispatcher reaches revision 1", WAIT, async || {
        let now = metrics.scrape().await;
        let seen = (
            now["metadata_events_latest_revision"],
            now["metadata_events_delivery_lag_revisions"],
        );
        if seen == (1.0, 0.0) {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;
    assert_eq!(
        metrics.value("metadata_events_dispatched_revision").await,
        1.0
    );

    drop(stream);
    until(
        "a dropped stream is no longer counted",
        WAIT,
        async || match metrics.value("metadata_watch_streams_open").await {
            0.0 => Ok(()),
            open => Err(open),
        },
    )
    .await;
    let watch = r#"grpc_server_handled_total{grpc_code="Canceled",grpc_method="Watch",grpc_service="metadata.v1.UserMetadataService"}"#;
    assert_eq!(metrics.value(watch).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_readiness_and_shutdown() {
    let (mut server, metrics) = start().await;
    assert_eq!(http_get(metrics.addr, "/healthz").await.0, 200);
    assert_eq!(http_get(metrics.addr, "/readyz").await.0, 200);
    assert_eq!(http_get(metrics.addr, "/nothing").await.0, 404);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let liveness = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: metadata_service::health::LIVENESS.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        liveness.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    server.stop().await;
    // The metrics port closes with the server.
    assert!(tokio::net::TcpStream::connect(metrics.addr).await.is_err());
}
