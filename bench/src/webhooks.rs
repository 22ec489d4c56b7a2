//! Signed webhooks (issue 32): how fast one endpoint gets a backlog, and
//! how long a write takes to reach an endpoint at a steady write rate.
//!
//! Postgres: the server and a `metadata-service relay` process (no NATS:
//! it only delivers webhooks) on the same database. SQLite: the server
//! delivers. The receiver is an HTTP server in the bench (axum on
//! 127.0.0.1) that answers 204 at once and records each delivery's
//! revision and arrival time.
//!
//! 1. **Backlog**: an endpoint created disabled; `backlog` Merges written
//!    by 16 clients; the endpoint enabled. Rate: deliveries between the
//!    first and the last receipt (one at a time, each after the previous
//!    one's 204, each signed and its position stored). The deliverer's
//!    CPU over that time is reported too.
//! 2. **Latency** at `rate` writes/s (open loop, watch.rs): receipt in the
//!    bench minus the moment the write's Merge response reached the bench
//!    (the commit as the client sees it), matched by the body's revision.
//!
//! Both check that the endpoint got exactly the table's revisions of the
//! window, once each and in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use metadata_service::proto::v1::MergeUserMetadataRequest;
use metadata_service::proto::v1::metadata_webhook_service_client::MetadataWebhookServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{CreateWebhookRequest, UpdateWebhookRequest, Webhook};
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::Rng;
use serde::Serialize;

use crate::db::{Backend, BenchDb, RawPool, id};
use crate::load::latency_histogram;
use crate::process::{ServerProcess, Usage, channel};
use crate::relay::{Accounting, account, newest_revision, revisions_after};

/// How long the endpoint may take to get everything.
const PATIENCE: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(5);
/// Clients writing the backlog.
const WRITERS: u64 = 16;

pub struct Settings<'a> {
    pub backend: Backend,
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    pub ids: u64,
    /// Events in the backlog.
    pub backlog: u64,
    pub rate: u32,
    pub rate_duration: Duration,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct WebhooksReport {
    pub backlog: BacklogRow,
    pub latency: LatencyRow,
}

#[derive(Debug, Serialize)]
pub struct BacklogRow {
    pub events: u64,
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// CPU of the process that delivers (the server on SQLite, the relay
    /// process on Postgres), in cores, over the same time.
    pub deliverer_cores: f64,
    pub accounting: Accounting,
}

#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub rate: u32,
    pub writes: u64,
    pub failed_writes: u64,
    pub achieved_per_second: f64,
    /// Merge response at the bench to receipt by the endpoint.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub accounting: Accounting,
}

impl WebhooksReport {
    pub fn faults(&self) -> u64 {
        let count = |a: &Accounting| a.missed + a.duplicated + a.out_of_order + a.unexpected;
        count(&self.backlog.accounting) + count(&self.latency.accounting)
    }
}

/// What the receiver got: each delivery's revision and arrival.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(u64, Instant)>>>);

impl Received {
    fn take(&self) -> Vec<(u64, Instant)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Waits until `revision` (or a later one) arrived.
    async fn wait_for(&self, revision: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let last = self.0.lock().unwrap().last().map(|(r, _)| *r);
            if last.is_some_and(|last| last >= revision) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the endpoint did not get revision {revision} within {PATIENCE:?} (last: {last:?})"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn receive(
    axum::extract::State(received): axum::extract::State<Received>,
    body: bytes::Bytes,
) -> axum::http::StatusCode {
    let at = Instant::now();
    let revision = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|body| body["revision"].as_str()?.parse().ok())
        .unwrap_or(0);
    received.0.lock().unwrap().push((revision, at));
    axum::http::StatusCode::NO_CONTENT
}

async fn start_receiver(received: Received) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// The flags both processes take: the receiver is on loopback.
const WEBHOOK_ARGS: [&str; 2] = ["--webhook-allow-networks", "127.0.0.0/8"];

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<WebhooksReport> {
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let pool = db.pool(2).await?;
    let args: Vec<String> = settings
        .server_args
        .iter()
        .cloned()
        .chain(WEBHOOK_ARGS.iter().map(|a| a.to_string()))
        .collect();
    let server =
        ServerProcess::start(settings.binary, db.url(), &args, settings.server_env).await?;
    let deliverer = match settings.backend {
        Backend::Postgres => Some(
            ServerProcess::start_command(
                settings.binary,
                &["relay"],
                db.url(),
                &WEBHOOK_ARGS.map(String::from),
                settings.server_env,
            )
            .await?,
        ),
        Backend::Sqlite => None,
    };
    let result = measure(&server, deliverer.as_ref(), settings, &pool).await;
    if let Some(deliverer) = deliverer {
        deliverer.stop().await.context("stopping the relay")?;
    }
    server.stop().await?;
    result
}

async fn measure(
    server: &ServerProcess,
    deliverer: Option<&ServerProcess>,
    settings: &Settings<'_>,
    pool: &RawPool,
) -> anyhow::Result<WebhooksReport> {
    let received = Received::default();
    let receiver = start_receiver(received.clone()).await?;
    let mut hooks = MetadataWebhookServiceClient::new(channel(server.addr).await?);
    let created = hooks
        .create_webhook(CreateWebhookRequest {
            webhook: Some(Webhook {
                url: format!("http://{receiver}/hook"),
                description: "bench".into(),
                disabled: true,
                ..Default::default()
            }),
            start_revision: 0,
        })
        .await?
        .into_inner();
    let hook_id = created.webhook.context("no webhook")?.id;
    // 1. The backlog.
    let before = newest_revision(pool).await?;
    let users = UserMetadataServiceClient::new(channel(server.addr).await?);
    let per_writer = settings.backlog.div_ceil(WRITERS);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut users = users.clone();
        let ids = settings.ids;
        writers.push(tokio::spawn(async move {
            for n in 0..per_writer {
                users
                    .merge(merge(id((w * per_writer + n) % ids), n as f64))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let expected = revisions_after(pool, before).await?;
    let last = *expected.last().context("no backlog written")?;
    let usage_of = || deliverer.unwrap_or(server).usage();
    let cpu_before = usage_of()?;
    hooks
        .update_webhook(UpdateWebhookRequest {
            webhook: Some(Webhook {
                id: hook_id,
                disabled: false,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["disabled".into()],
            }),
        })
        .await?;
    received.wait_for(last).await?;
    let cpu_after = usage_of()?;
    let got = received.take();
    let (first_at, last_at) = (got[0].1, got[got.len() - 1].1);
    let seconds = (last_at - first_at).as_secs_f64();
    let revisions: Vec<u64> = got.iter().map(|(r, _)| *r).collect();
    let backlog = BacklogRow {
        events: expected.len() as u64,
        seconds,
        deliveries_per_second: (got.len().saturating_sub(1)) as f64 / seconds.max(1e-9),
        deliverer_cores: cores(cpu_before, cpu_after, last_at - first_at),
        accounting: account(&expected, &revisions),
    };
    if settings.progress {
        eprintln!(
            "  webhooks: backlog of {} events delivered in {:.2} s: {:.0}/s ({:.2} cores)",
            backlog.events, backlog.seconds, backlog.deliveries_per_second, backlog.deliverer_cores
        );
    }
    // 2. Latency at a steady rate.
    let latency = latency_run(&users, settings, pool, &received).await?;
    if settings.progress {
        eprintln!(
            "  webhooks: {} writes/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latency.rate, latency.p50_ms, latency.p99_ms, latency.max_ms
        );
    }
    Ok(WebhooksReport { backlog, latency })
}

fn merge(user_id: String, value: f64) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id,
        public_metadata: Some(Struct {
            fields: [(
                "hooked".to_string(),
                ProtoValue {
                    kind: Some(ProtoKind::NumberValue(value)),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

async fn latency_run(
    users: &UserMetadataServiceClient<tonic::transport::Channel>,
    settings: &Settings<'_>,
    pool: &RawPool,
    received: &Received,
) -> anyhow::Result<LatencyRow> {
    let before = newest_revision(pool).await?;
    let responses: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let ids = settings.ids;
    let first_send = Instant::now();
    let written = crate::watch::open_loop(settings.rate, settings.rate_duration, || {
        let mut users = users.clone();
        let responses = responses.clone();
        let (user_id, value) = {
            let mut rng = rand::rng();
            (
                id(rng.random_range(0..ids)),
                rng.random_range(0..1_000_000) as f64,
            )
        };
        async move {
            let result = users.merge(merge(user_id, value)).await;
            let at = Instant::now();
            let revision = result
                .map(|r| r.into_inner().revision)
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
            responses.lock().unwrap().insert(revision, at);
            Ok(revision)
        }
    })
    .await?;
    let responses = std::mem::take(&mut *responses.lock().unwrap());
    let last_response = responses.values().max().copied().unwrap_or(first_send);
    let expected = revisions_after(pool, before).await?;
    if let Some(last) = expected.last() {
        received.wait_for(*last).await?;
    }
    let got = received.take();
    let mut latency: Histogram<u64> = latency_histogram();
    for (revision, at) in &got {
        if let Some(response) = responses.get(revision) {
            let d = at.saturating_duration_since(*response);
            latency.saturating_record(d.as_micros() as u64);
        }
    }
    let revisions: Vec<u64> = got.iter().map(|(r, _)| *r).collect();
    let acked = written.revisions.len() as u64;
    Ok(LatencyRow {
        rate: settings.rate,
        writes: acked,
        failed_writes: written.failed,
        achieved_per_second: acked as f64
            / last_response
                .saturating_duration_since(first_send)
                .as_secs_f64()
                .max(1e-9),
        p50_ms: q_ms(&latency, 0.5),
        p99_ms: q_ms(&latency, 0.99),
        max_ms: latency.max() as f64 / 1000.0,
        accounting: account(&expected, &revisions),
    })
}

fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn cores(before: Usage, after: Usage, elapsed: Duration) -> f64 {
    (after.cpu_seconds - before.cpu_seconds) / elapsed.as_secs_f64().max(1e-9)
}

pub fn print(report: &WebhooksReport) {
    let b = &report.backlog;
    let l = &report.latency;
    println!();
    println!("webhooks (issue 32): one endpoint, a local receiver answering 204");
    println!(
        "backlog   {} events in {:.2} s: {:.0} deliveries/s, deliverer {:.2} cores; missed {} duplicated {} out of order {}",
        b.events,
        b.seconds,
        b.deliveries_per_second,
        b.deliverer_cores,
        b.accounting.missed,
        b.accounting.duplicated,
        b.accounting.out_of_order
    );
    println!(
        "latency   {} writes/s (achieved {:.0}, {} writes, {} failed): commit to delivery p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; missed {} duplicated {} out of order {}",
        l.rate,
        l.achieved_per_second,
        l.writes,
        l.failed_writes,
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        l.accounting.missed,
        l.accounting.duplicated,
        l.accounting.out_of_order
    );
}
