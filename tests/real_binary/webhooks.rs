//! Webhooks as an operator runs them, received by a handler written as a
//! Clerk-style one is: `tests/fixtures/webhook_receiver.py`, verifying
//! every request with the Python `standardwebhooks` package (a library
//! nobody here wrote) and de-duplicating by `webhook-id`. The deliverer is
//! killed with SIGKILL in the middle of a burst: on SQLite the server
//! itself (then restarted on the same file), on Postgres the `relay`
//! process that holds the lease (a standby takes over). Every event
//! arrives verified, in revision order; a repeat only ever carries the
//! `webhook-id` of the event it repeats.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metadata_service::proto::v1::metadata_webhook_service_client::MetadataWebhookServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{
    CreateWebhookRequest, MergeUserMetadataRequest, UpdateWebhookRequest, Webhook,
};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tonic::transport::Channel;

use crate::binary::{Server, command, free_port};
use crate::common::json::structure;
use crate::common::wait::until;
use crate::common::{Backend, TestDb};
use crate::served;

const WAIT: Duration = Duration::from_secs(40);
const RECEIVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/webhook_receiver.py"
);

/// The Python receiver, and every line it printed.
struct Receiver {
    lines: Arc<Mutex<Vec<Json>>>,
    _child: Child,
}

impl Receiver {
    /// None when python3 cannot import `standardwebhooks` and CI did not
    /// ask for it (METADATA_REQUIRE_GRPCIO: CI installs the Python checks).
    async fn start(secret: &str, port: u16) -> Option<Receiver> {
        let probe = tokio::process::Command::new("python3")
            .args(["-c", "import standardwebhooks"])
            .status()
            .await;
        if !probe.is_ok_and(|status| status.success()) {
            assert!(
                std::env::var_os("METADATA_REQUIRE_GRPCIO").is_none(),
                "METADATA_REQUIRE_GRPCIO is set but python3 cannot import standardwebhooks \
                 (pip install standardwebhooks)"
            );
            eprintln!("skipped: python3 cannot import standardwebhooks");
            return None;
        }
        let mut child = tokio::process::Command::new("python3")
            .arg(RECEIVER)
            .arg(port.to_string())
            .env("WEBHOOK_SECRET", secret)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run python3");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(WAIT, stdout.next_line()).await;
        assert!(
            matches!(&first, Ok(Ok(Some(line))) if line == "listening"),
            "{first:?}"
        );
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let line: Json = serde_json::from_str(&line).expect("a JSON line");
                collected.lock().unwrap().push(line);
            }
        });
        Some(Receiver {
            lines,
            _child: child,
        })
    }

    fn lines(&self) -> Vec<Json> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until every revision of `expected` was received, then checks
    /// the whole: all verified, first receipts in revision order without a
    /// gap, every repeat one of an id received before.
    async fn assert_received(&self, expected: &[u64]) {
        let received = until("every event verified by the receiver", WAIT, async || {
            let lines = self.lines();
            let firsts: Vec<u64> = lines
                .iter()
                .filter(|l| l["verified"] == json!(true) && l["duplicate"] == json!(false))
                .map(|l| l["revision"].as_u64().unwrap())
                .collect();
            if firsts.len() >= expected.len() {
                Ok((lines, firsts))
            } else {
                Err(format!("{} of {}", firsts.len(), expected.len()))
            }
        })
        .await;
        let (lines, firsts) = received;
        assert!(
            lines.iter().all(|l| l["verified"] == json!(true)),
            "a delivery failed verification: {lines:?}"
        );
        assert_eq!(firsts, expected, "first receipts in revision order, no gap");
        let mut seen = std::collections::HashSet::new();
        for line in &lines {
            let id = line["id"].as_str().unwrap().to_owned();
            assert_eq!(
                line["duplicate"] == json!(true),
                !seen.insert(id.clone()),
                "{line}"
            );
            assert!(id.ends_with(&format!("_{}", line["revision"])), "{line}");
        }
    }
}

/// Creates a disabled endpoint (its secret is needed to start the
/// receiver), starts the receiver, then enables it.
async fn endpoint_and_receiver(channel: Channel) -> Option<Receiver> {
    let mut hooks = MetadataWebhookServiceClient::new(channel);
    let port = free_port();
    let created = hooks
        .create_webhook(CreateWebhookRequest {
            webhook: Some(Webhook {
                url: format!("http://127.0.0.1:{port}/hook"),
                disabled: true,
                ..Default::default()
            }),
            start_revision: 0,
        })
        .await
        .expect("created")
        .into_inner();
    let receiver = Receiver::start(&created.secret, port).await?;
    let id = created.webhook.unwrap().id;
    hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id,
                disabled: false,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["disabled".into()],
            }),
        })
        .await
        .expect("enabled");
    Some(receiver)
}

/// Merges in a loop until one fails (the server was killed) or `count`
/// are done.
fn burst(channel: Channel, count: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut users = UserMetadataServiceClient::new(channel);
        for n in 0..count {
            let merged = users
                .merge(MergeUserMetadataRequest {
                    user_id: format!("user.{}", n % 7),
                    public_metadata: Some(structure(&json!({ "n": n }))),
                    ..Default::default()
                })
                .await;
            if merged.is_err() {
                return;
            }
        }
    })
}

/// The flags that make a deliverer quick to retry, and allow the loopback
/// receiver.
const WEBHOOK_FLAGS: [&str; 6] = [
    "--webhook-allow-networks",
    "127.0.0.0/8",
    "--webhook-retry-schedule",
    "200ms",
    "--watch-poll-interval",
    "200ms",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_server_killed_mid_burst_delivers_each_event_verified_in_order() {
    let db = TestDb::create(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(db.url(), dir.path(), &WEBHOOK_FLAGS).await;
    let channel = server.channel().await.unwrap();
    let Some(receiver) = endpoint_and_receiver(channel.clone()).await else {
        return;
    };
    let writes = burst(channel, 400);
    until("deliveries under way", WAIT, async || {
        let n = receiver.lines().len();
        if n >= 30 { Ok(()) } else { Err(n) }
    })
    .await;
    server.kill().await;
    writes.await.unwrap();
    let server = Server::start_with(db.url(), dir.path(), &WEBHOOK_FLAGS).await;
    burst(server.channel().await.unwrap(), 20).await.unwrap();
    let expected = db.event_revisions().await;
    let first = receiver.lines()[0]["revision"].as_u64().unwrap();
    let expected: Vec<u64> = expected.into_iter().filter(|r| *r >= first).collect();
    receiver.assert_received(&expected).await;
    server.kill().await;
}

fn spawn_relay(dir: &std::path::Path, database_url: &str) -> Child {
    command(dir)
        .args(["relay", "--database-url", database_url])
        .args(["--listen", "127.0.0.1:0"])
        .args(WEBHOOK_FLAGS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deliverer_killed_mid_burst_fails_over_to_a_standby() {
    let Some(server) = served::start_with(Backend::Postgres, |config| {
        config.webhooks.allowed =
            Arc::new(metadata_service::webhook::AllowedNetworks::parse("127.0.0.0/8").unwrap());
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_url = server.db.url().to_owned();
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let Some(receiver) = endpoint_and_receiver(channel.clone()).await else {
        return;
    };
    // Alone, the first relay takes the lease; the second stands by.
    let mut first = spawn_relay(dir.path(), &db_url);
    let writes = burst(channel.clone(), 400);
    until("the first relay delivers", WAIT, async || {
        let n = receiver.lines().len();
        if n >= 10 { Ok(()) } else { Err(n) }
    })
    .await;
    let mut standby = spawn_relay(dir.path(), &db_url);
    until("deliveries under way", WAIT, async || {
        let n = receiver.lines().len();
        if n >= 40 { Ok(()) } else { Err(n) }
    })
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    writes.await.unwrap();
    let expected = server.db.event_revisions().await;
    let from = receiver.lines()[0]["revision"].as_u64().unwrap();
    let expected: Vec<u64> = expected.into_iter().filter(|r| *r >= from).collect();
    receiver.assert_received(&expected).await;
    standby.start_kill().unwrap();
}
