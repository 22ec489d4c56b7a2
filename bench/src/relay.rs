//! The NATS JetStream relay (issue 19): how fast it copies the event log
//! into a stream, how long a write takes to reach a JetStream consumer, and
//! whether every revision arrives exactly once and in order.
//!
//! Postgres: the server and a `metadata-service relay` process on the same
//! database. SQLite: the server with `--relay-nats-url` (the relay runs
//! inside it). Each run uses a stream and subject prefix of its own (random
//! suffix), deleted at the end.
//!
//! 1. **Service alone**: the merge workload (load.rs, closed loop, C
//!    clients) with no relay running: the service's own maximum write rate
//!    on this machine. Its writes (warm-up included) are the backlog of 2.
//! 2. **Backlog**: the relay is started (SQLite: the server is restarted
//!    with the relay) on that backlog; the stream is polled every few
//!    milliseconds until it holds every event. Rate: events stored per
//!    second between the first poll that saw an event and the one that saw
//!    the last (so process start, connecting and creating the stream are
//!    left out; the wall time from the start is reported too).
//! 3. **Live**: the same merge workload with the relay running: the merge
//!    rate next to it, the relay's publish rate over the same window, how
//!    many events the stream lagged behind the table at the end of the
//!    window, and how long it took to drain them.
//! 4. **Latency**, at each of `rates` writes/s (open loop, watch.rs): an
//!    ordered push consumer on the stream (deliver new) receives every
//!    event; latency = receipt in the bench minus the moment the write's
//!    Merge response reached the bench (the commit time as the client
//!    sees it), matched by the `Metadata-Revision` header. Also measured
//!    from the event's own `committed_at` (in the body, the server's
//!    clock; Watch's definition). The events received must be exactly the
//!    table's revisions of the window, once each, in order.
//! 5. **The whole stream**: read from its first message (the start
//!    marker) to its last and compared with `SELECT revision FROM events
//!    ORDER BY revision`: every revision once, in order, each message on
//!    `<prefix>.user.<id>` with `Nats-Msg-Id` = `Metadata-Revision` = the
//!    body's revision.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push};
use hdrhistogram::Histogram;
use metadata_service::model::Kind;
use metadata_service::proto::v1::MergeUserMetadataRequest;
use metadata_service::proto::v1::UserMetadataEvent;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::relay::{message, subject};
use prost::Message as _;
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::Rng;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::db::{Backend, BenchDb, RawPool, id};
use crate::load::{self, Workload, latency_histogram};
use crate::process::{ServerProcess, Usage, channel};

/// How often the stream's state is polled.
const POLL: Duration = Duration::from_millis(5);

/// How long the stream may take to catch up with the table.
const PATIENCE: Duration = Duration::from_secs(120);

pub struct Settings<'a> {
    pub backend: Backend,
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    pub nats_url: String,
    /// Clients of the closed-loop merges (service alone and live).
    pub clients: usize,
    pub ids: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Writes per second of each latency run.
    pub rates: Vec<u32>,
    pub rate_duration: Duration,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct RelayReport {
    pub backend: &'static str,
    /// "relay process" (Postgres) or "in the server" (SQLite).
    pub relay: &'static str,
    pub stream: String,
    pub subject_prefix: String,
    pub throughput: Throughput,
    pub latency: Vec<LatencyRow>,
    pub stream_check: StreamCheck,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub clients: usize,
    /// Merge, closed loop, no relay running.
    pub service_merges_per_second: f64,
    pub service_p99_ms: f64,
    pub service_cpu_cores: f64,
    /// Events in the table when the relay started.
    pub backlog_events: u64,
    /// The relay on the backlog: events stored per second, from the first
    /// to the last seen stored.
    pub backlog_events_per_second: f64,
    pub backlog_seconds: f64,
    /// From starting the relay (SQLite: the server with it) to the stream
    /// holding the whole backlog.
    pub backlog_wall_seconds: f64,
    /// CPU of the process running the relay over the backlog, in cores
    /// (from its start: includes start-up).
    pub backlog_relay_cpu_cores: f64,
    /// backlog_events_per_second / service_merges_per_second.
    pub backlog_ratio: f64,
    /// The bench publishing the same messages to a scratch stream: the
    /// ceiling of a relay that waits for each ack, and of one that does not.
    pub floor: Floor,
    /// Merge, closed loop, with the relay running.
    pub live_merges_per_second: f64,
    pub live_p99_ms: f64,
    /// Events the relay stored per second over the same window.
    pub live_relay_events_per_second: f64,
    /// Events in the table not yet in the stream at the end of the window.
    pub live_lag_events: u64,
    /// From the end of the window until the stream held every event.
    pub live_drain_ms: f64,
    /// The server's CPU over the window, in cores (SQLite: relay included).
    pub live_server_cpu_cores: f64,
    /// The relay process's (Postgres).
    pub live_relay_cpu_cores: Option<f64>,
    /// CPU per Merge of the whole stack (server, relay, bench, Postgres
    /// backends of the bench's database, nats-server), alone and live.
    pub service_stack_cpu_us_per_merge: f64,
    pub live_stack_cpu_us_per_merge: f64,
    /// nats-server's CPU, in cores, alone and live (None: not found).
    pub service_nats_cpu_cores: Option<f64>,
    pub live_nats_cpu_cores: Option<f64>,
    /// Postgres: transactions committed in the database per Merge, alone
    /// and live (the relay's reads are the difference).
    pub service_transactions_per_merge: Option<f64>,
    pub live_transactions_per_merge: Option<f64>,
}

/// JetStream alone, from the bench: a stored event message (body and
/// headers) published to a scratch stream as the relay publishes (fenced
/// with `Nats-Expected-Last-Sequence`, unique `Nats-Msg-Id`), one at a time
/// waiting for each ack, then pipelined (acks awaited in windows, each
/// message fenced with the sequence it is bound to follow).
#[derive(Debug, Serialize)]
pub struct Floor {
    pub messages: u64,
    pub body_bytes: usize,
    pub sequential_per_second: f64,
    /// Publish to ack, one at a time.
    pub ack_p50_us: f64,
    pub ack_p99_us: f64,
    pub pipelined_per_second: f64,
    pub pipeline_window: usize,
}

/// Revisions received against the table's.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Accounting {
    /// Revisions in the table.
    pub expected: u64,
    /// Event messages received (repeats included).
    pub received: u64,
    pub missed: u64,
    /// Extra copies of a revision already received.
    pub duplicated: u64,
    /// Messages whose revision is below the one before.
    pub out_of_order: u64,
    /// Revisions not in the table.
    pub unexpected: u64,
}

impl Accounting {
    pub fn exact(&self) -> bool {
        self.missed == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

/// Compares the revisions `received` (in arrival order) with `expected`
/// (sorted, distinct).
pub fn account(expected: &[u64], received: &[u64]) -> Accounting {
    let mut distinct = received.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    Accounting {
        expected: expected.len() as u64,
        received: received.len() as u64,
        missed: expected
            .iter()
            .filter(|r| distinct.binary_search(r).is_err())
            .count() as u64,
        duplicated: (received.len() - distinct.len()) as u64,
        out_of_order: received.windows(2).filter(|w| w[1] < w[0]).count() as u64,
        unexpected: distinct
            .iter()
            .filter(|r| expected.binary_search(r).is_err())
            .count() as u64,
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub rate: u32,
    pub writes: u64,
    pub failed_writes: u64,
    pub first_error: Option<String>,
    /// Acknowledged writes / the time from the first send to the last
    /// response.
    pub achieved_per_second: f64,
    /// Merge response at the bench to receipt by the consumer.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Events received before their Merge response (counted as 0 ms).
    pub before_response: u64,
    /// The event's committed_at (server clock) to receipt.
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub commit_max_ms: f64,
    /// The consumer's events against the table's revisions of the window.
    pub accounting: Accounting,
}

#[derive(Debug, Serialize)]
pub struct StreamCheck {
    /// Messages in the stream (the marker included).
    pub messages: u64,
    /// The first message is the relay's start marker.
    pub marker_first: bool,
    /// Markers after the first message.
    pub extra_markers: u64,
    /// Event messages whose subject, Nats-Msg-Id or body disagree with
    /// their Metadata-Revision, or that do not decode.
    pub malformed: u64,
    pub accounting: Accounting,
}

impl RelayReport {
    /// Revisions missed, repeated, out of order or unknown, and bad
    /// messages, over every check.
    pub fn faults(&self) -> u64 {
        let count = |a: &Accounting| a.missed + a.duplicated + a.out_of_order + a.unexpected;
        self.latency
            .iter()
            .map(|r| count(&r.accounting))
            .sum::<u64>()
            + count(&self.stream_check.accounting)
            + self.stream_check.malformed
            + self.stream_check.extra_markers
            + u64::from(!self.stream_check.marker_first)
    }
}

/// The bench's side of NATS.
struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

impl Nats {
    async fn connect(url: &str) -> anyhow::Result<Nats> {
        let client = async_nats::ConnectOptions::new()
            .name("metadata-service bench")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .with_context(|| {
                format!(
                    "relay workload: cannot connect to NATS at {url} (--nats-url; JetStream \
                     needed: nats-server -js), or leave relay out of --workloads"
                )
            })?;
        let suffix = format!("{:08x}", rand::random::<u32>());
        Ok(Nats {
            js: jetstream::new(client.clone()),
            client,
            stream: format!("BENCH_RELAY_{suffix}"),
            prefix: format!("bench_relay_{suffix}"),
        })
    }

    /// Messages in the stream; 0 while it does not exist.
    async fn messages(&self) -> anyhow::Result<u64> {
        match self.js.get_stream(&self.stream).await {
            // get_stream has just fetched the stream's info.
            Ok(stream) => Ok(stream.cached_info().state.messages),
            Err(err)
                if matches!(
                    err.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok(0)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Events in the stream (messages but the start marker).
    async fn events(&self) -> anyhow::Result<u64> {
        Ok(self.messages().await?.saturating_sub(1))
    }

    async fn last_sequence(&self) -> anyhow::Result<u64> {
        let stream = self.js.get_stream(&self.stream).await?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Polls until the stream holds `events` events: when it first saw
    /// one (and how many), and when it saw them all.
    async fn wait_for(&self, events: u64) -> anyhow::Result<Progress> {
        let deadline = Instant::now() + PATIENCE;
        let mut first = None;
        loop {
            let now = Instant::now();
            let seen = self.events().await?;
            if seen > 0 && first.is_none() {
                first = Some((now, seen));
            }
            if seen >= events {
                return Ok(Progress { first, done: now });
            }
            if now > deadline {
                bail!(
                    "the stream holds {seen} of {events} events after {PATIENCE:?}: the relay \
                     stopped or fell behind"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn delete(&self) -> anyhow::Result<()> {
        match self.js.delete_stream(&self.stream).await {
            Ok(_) => Ok(()),
            Err(err) if err.to_string().contains("not found") => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Options the relay needs (its own process's, or the server's).
    fn relay_args(&self, url: &str) -> Vec<String> {
        [
            "--nats-url",
            url,
            "--nats-stream",
            &self.stream,
            "--nats-subject-prefix",
            &self.prefix,
        ]
        .map(String::from)
        .to_vec()
    }
}

struct Progress {
    first: Option<(Instant, u64)>,
    done: Instant,
}

/// One message as the consumer received it.
struct Got {
    at: Instant,
    wall: SystemTime,
    sequence: u64,
    subject: String,
    revision: Option<u64>,
    msg_id: Option<String>,
    marker: bool,
    payload: bytes::Bytes,
}

/// An ordered push consumer recording every message it receives.
struct Collector {
    task: JoinHandle<anyhow::Result<()>>,
    got: Arc<Mutex<Vec<Got>>>,
    newest_revision: Arc<AtomicU64>,
    newest_sequence: Arc<AtomicU64>,
}

impl Collector {
    async fn start(nats: &Nats, deliver: DeliverPolicy) -> anyhow::Result<Collector> {
        let stream = nats.js.get_stream(&nats.stream).await?;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: nats.client.new_inbox(),
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .context("creating the ordered consumer")?;
        let mut messages = consumer.messages().await?;
        nats.client.flush().await?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let newest_revision = Arc::new(AtomicU64::new(0));
        let newest_sequence = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (got, newest_revision, newest_sequence) = (
                got.clone(),
                newest_revision.clone(),
                newest_sequence.clone(),
            );
            async move {
                while let Some(message) = messages.next().await {
                    let message = message?;
                    let (at, wall) = (Instant::now(), SystemTime::now());
                    let headers = message.headers.as_ref();
                    let header = |name: &str| {
                        headers
                            .and_then(|h| h.get(name))
                            .map(|v| v.as_str().to_string())
                    };
                    let revision = header(message::REVISION).and_then(|r| r.parse().ok());
                    let sequence = message.info().map_or(0, |i| i.stream_sequence);
                    let item = Got {
                        at,
                        wall,
                        sequence,
                        subject: message.subject.to_string(),
                        revision,
                        msg_id: header(message::MSG_ID),
                        marker: header(message::MARKER).is_some(),
                        payload: message.payload.clone(),
                    };
                    got.lock().unwrap().push(item);
                    if let Some(revision) = revision {
                        newest_revision.fetch_max(revision, Ordering::SeqCst);
                    }
                    newest_sequence.fetch_max(sequence, Ordering::SeqCst);
                }
                bail!("the consumer's message stream ended")
            }
        });
        Ok(Collector {
            task,
            got,
            newest_revision,
            newest_sequence,
        })
    }

    /// Waits (at most `patience`) until a message of revision `revision`
    /// or later, or of stream sequence `sequence` or later, has arrived,
    /// then stops and returns what arrived. A consumer that fails ends the
    /// wait with its error; one that never gets there returns what it has
    /// (the accounting shows what is missing).
    async fn finish(
        self,
        revision: u64,
        sequence: u64,
        patience: Duration,
    ) -> anyhow::Result<Vec<Got>> {
        let deadline = Instant::now() + patience;
        while self.newest_revision.load(Ordering::SeqCst) < revision
            && self.newest_sequence.load(Ordering::SeqCst) < sequence
            && Instant::now() < deadline
        {
            if self.task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.task.is_finished() {
            self.task.await??;
        } else {
            self.task.abort();
        }
        Ok(std::mem::take(&mut *self.got.lock().unwrap()))
    }
}

/// Acks outstanding at once in the pipelined floor.
const WINDOW: usize = 256;

/// Publishes `count` copies of the stream's first event message to a
/// scratch stream of its own (deleted after), one ack at a time and then
/// pipelined.
async fn floor(nats: &Nats, count: u64) -> anyhow::Result<Floor> {
    let sample = nats
        .js
        .get_stream(&nats.stream)
        .await?
        .get_raw_message(2)
        .await
        .context("reading an event message")?;
    let name = format!("{}_FLOOR", nats.stream);
    let prefix = format!("{}_floor", nats.prefix);
    let subject = format!("{prefix}.user.bench_0");
    nats.js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .context("creating the scratch stream")?;
    let result = async {
        let numbered = |n: u64| {
            let mut headers = sample.headers.clone();
            headers.insert(message::MSG_ID, n.to_string().as_str());
            headers.insert(message::REVISION, n.to_string().as_str());
            jetstream::message::PublishMessage::build()
                .payload(sample.payload.clone())
                .headers(headers)
        };
        let mut acks = latency_histogram();
        let started = Instant::now();
        let mut last = 0;
        for n in 1..=count {
            let t = Instant::now();
            let ack = nats
                .js
                .send_publish(subject.clone(), numbered(n).expected_last_sequence(last))
                .await?
                .await?;
            acks.saturating_record(t.elapsed().as_micros() as u64);
            last = ack.sequence;
        }
        let sequential = count as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut n = count;
        while n < 2 * count {
            let mut pending = Vec::with_capacity(WINDOW);
            for _ in 0..WINDOW.min((2 * count - n) as usize) {
                n += 1;
                // Fenced as well: message n is stored at sequence n when
                // the bench is the only publisher, so a relay could fence
                // a whole window before the first ack is back.
                let publish = numbered(n).expected_last_sequence(n - 1);
                pending.push(nats.js.send_publish(subject.clone(), publish).await?);
            }
            for ack in pending {
                ack.await?;
            }
        }
        let pipelined = count as f64 / started.elapsed().as_secs_f64();
        anyhow::Ok(Floor {
            messages: count,
            body_bytes: sample.payload.len(),
            sequential_per_second: sequential,
            ack_p50_us: acks.value_at_quantile(0.5) as f64,
            ack_p99_us: acks.value_at_quantile(0.99) as f64,
            pipelined_per_second: pipelined,
            pipeline_window: WINDOW,
        })
    }
    .await;
    nats.js.delete_stream(&name).await?;
    result
}

/// The table's revisions after `after`, in order.
pub(crate) async fn revisions_after(pool: &RawPool, after: u64) -> anyhow::Result<Vec<u64>> {
    let rows: Vec<i64> = match pool {
        RawPool::Postgres(pool) => {
            sqlx::query_scalar("SELECT revision FROM events WHERE revision > $1 AND change_type <> 'void' ORDER BY revision")
                .bind(after as i64)
                .fetch_all(pool)
                .await?
        }
        RawPool::Sqlite(pool) => {
            sqlx::query_scalar("SELECT revision FROM events WHERE revision > ?1 AND change_type <> 'void' ORDER BY revision")
                .bind(after as i64)
                .fetch_all(pool)
                .await?
        }
    };
    Ok(rows.into_iter().map(|r| r as u64).collect())
}

// Voids (revisions taken and never committed, settled by a dispatcher's
// claim: on Postgres, with a relay process beside the server, that happens)
// are in the table and never in the stream: every query here skips them.
async fn event_count(pool: &RawPool) -> anyhow::Result<u64> {
    let count: i64 = match pool {
        RawPool::Postgres(pool) => {
            sqlx::query_scalar("SELECT count(*) FROM events WHERE change_type <> 'void'")
                .fetch_one(pool)
                .await?
        }
        RawPool::Sqlite(pool) => {
            sqlx::query_scalar("SELECT count(*) FROM events WHERE change_type <> 'void'")
                .fetch_one(pool)
                .await?
        }
    };
    Ok(count as u64)
}

pub(crate) async fn newest_revision(pool: &RawPool) -> anyhow::Result<u64> {
    let newest: i64 =
        match pool {
            RawPool::Postgres(pool) => sqlx::query_scalar(
                "SELECT COALESCE(max(revision), 0)::bigint FROM events WHERE change_type <> 'void'",
            )
            .fetch_one(pool)
            .await?,
            RawPool::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT COALESCE(max(revision), 0) FROM events WHERE change_type <> 'void'",
                )
                .fetch_one(pool)
                .await?
            }
        };
    Ok(newest as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn q_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn cores(before: Usage, after: Usage, elapsed: Duration) -> f64 {
    (after.cpu_seconds - before.cpu_seconds) / elapsed.as_secs_f64()
}

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<RelayReport> {
    let nats = Nats::connect(&settings.nats_url).await?;
    if settings.progress {
        eprintln!(
            "  relay: stream {}, subjects {}.>",
            nats.stream, nats.prefix
        );
    }
    let result = measure(db, settings, &nats).await;
    let deleted = nats.delete().await;
    let report = result?;
    deleted.with_context(|| format!("deleting stream {}", nats.stream))?;
    Ok(report)
}

/// The process the relay runs in, and the server.
struct Processes {
    server: ServerProcess,
    /// Postgres: the relay process.
    relay: Option<ServerProcess>,
}

impl Processes {
    fn relay_usage(&self) -> anyhow::Result<Usage> {
        self.relay.as_ref().unwrap_or(&self.server).usage()
    }

    async fn stop(self) -> anyhow::Result<()> {
        if let Some(relay) = self.relay {
            relay.stop().await.context("stopping the relay")?;
        }
        self.server.stop().await
    }
}

async fn measure(
    db: &BenchDb,
    settings: &Settings<'_>,
    nats: &Nats,
) -> anyhow::Result<RelayReport> {
    let backend = settings.backend;
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    db.seed(settings.ids).await.context("seeding")?;
    let pool = db.pool(2).await?;
    let relay_args = nats.relay_args(&settings.nats_url);
    // 1. The service alone.
    let server = ServerProcess::start(
        settings.binary,
        db.url(),
        settings.server_args,
        settings.server_env,
    )
    .await?;
    let alone = merges(&server, None, settings, &pool).await?;
    let backlog = event_count(&pool).await?;
    if settings.progress {
        eprintln!(
            "  relay: service alone {:.0} merges/s; backlog {backlog} events",
            alone.measured.throughput()
        );
    }
    // 2. The relay on the backlog.
    let started = Instant::now();
    let start_relay = async {
        match backend {
            Backend::Postgres => {
                let relay = ServerProcess::start_command(
                    settings.binary,
                    &["relay"],
                    db.url(),
                    &relay_args,
                    settings.server_env,
                )
                .await?;
                Ok(Processes {
                    server,
                    relay: Some(relay),
                })
            }
            Backend::Sqlite => {
                server.stop().await?;
                let args: Vec<String> = settings
                    .server_args
                    .iter()
                    .cloned()
                    .chain(relay_args.iter().cloned())
                    .collect();
                let server =
                    ServerProcess::start(settings.binary, db.url(), &args, settings.server_env)
                        .await?;
                anyhow::Ok(Processes {
                    server,
                    relay: None,
                })
            }
        }
    };
    let (processes, progress) = tokio::join!(start_relay, nats.wait_for(backlog));
    let processes = processes?;
    let result = async {
        let progress = progress?;
        let relay_cpu = processes.relay_usage()?.cpu_seconds;
        let wall = progress.done - started;
        let (backlog_seconds, backlog_rate) = match progress.first {
            Some((first, seen)) if progress.done > first => {
                let seconds = (progress.done - first).as_secs_f64();
                (seconds, (backlog - seen) as f64 / seconds)
            }
            _ => (0.0, f64::NAN),
        };
        if settings.progress {
            eprintln!(
                "  relay: backlog of {backlog} events in {backlog_seconds:.2} s: {backlog_rate:.0} events/s ({:.2} s from the start)",
                wall.as_secs_f64()
            );
        }
        let floor = floor(nats, backlog.clamp(100, 5_000)).await?;
        if settings.progress {
            eprintln!(
                "  relay: JetStream from the bench ({} B bodies): {:.0}/s one ack at a time (ack p50 {:.0} µs), {:.0}/s pipelined",
                floor.body_bytes,
                floor.sequential_per_second,
                floor.ack_p50_us,
                floor.pipelined_per_second
            );
        }
        // 3. Live: merges with the relay running.
        let before = (processes.server.usage()?, processes.relay_usage()?);
        let window_start = nats.events().await?;
        let live = merges(&processes.server, processes.relay.as_ref(), settings, &pool).await?;
        let window_end = nats.events().await?;
        let written = event_count(&pool).await?;
        let ended = Instant::now();
        let after = (processes.server.usage()?, processes.relay_usage()?);
        let drained = nats.wait_for(written).await?;
        let live_rate = (window_end - window_start) as f64 / live.measured.elapsed.as_secs_f64();
        if settings.progress {
            eprintln!(
                "  relay: live {:.0} merges/s, relay {live_rate:.0} events/s, {} behind at the end, drained in {:.0} ms",
                live.measured.throughput(),
                written.saturating_sub(window_end),
                ms(drained.done - ended)
            );
        }
        let throughput = Throughput {
            clients: settings.clients,
            service_merges_per_second: alone.measured.throughput(),
            service_p99_ms: q_ms(&alone.measured.latency, 0.99),
            service_cpu_cores: alone.server_cores,
            backlog_events: backlog,
            backlog_events_per_second: backlog_rate,
            backlog_seconds,
            backlog_wall_seconds: wall.as_secs_f64(),
            backlog_relay_cpu_cores: relay_cpu / wall.as_secs_f64(),
            backlog_ratio: backlog_rate / alone.measured.throughput(),
            floor,
            live_merges_per_second: live.measured.throughput(),
            live_p99_ms: q_ms(&live.measured.latency, 0.99),
            live_relay_events_per_second: live_rate,
            live_lag_events: written.saturating_sub(window_end),
            live_drain_ms: ms(drained.done.saturating_duration_since(ended)),
            live_server_cpu_cores: cores(before.0, after.0, live.measured.elapsed),
            live_relay_cpu_cores: processes
                .relay
                .as_ref()
                .map(|_| cores(before.1, after.1, live.measured.elapsed)),
            service_stack_cpu_us_per_merge: alone.stack_cpu_us_per_merge,
            live_stack_cpu_us_per_merge: live.stack_cpu_us_per_merge,
            service_nats_cpu_cores: alone.nats_cores,
            live_nats_cpu_cores: live.nats_cores,
            service_transactions_per_merge: alone.transactions_per_merge,
            live_transactions_per_merge: live.transactions_per_merge,
        };
        // 4. Latency at each rate.
        let mut latency = Vec::new();
        for &rate in &settings.rates {
            let row = latency_run(&processes.server, settings, nats, &pool, rate).await?;
            if settings.progress {
                eprintln!(
                    "  relay: {rate} writes/s: {} writes ({} failed), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} of {} revisions, {} missed, {} repeated, {} out of order",
                    row.writes,
                    row.failed_writes,
                    row.p50_ms,
                    row.p99_ms,
                    row.max_ms,
                    row.accounting.received,
                    row.accounting.expected,
                    row.accounting.missed,
                    row.accounting.duplicated,
                    row.accounting.out_of_order
                );
            }
            latency.push(row);
        }
        // 5. The whole stream against the table.
        let stream_check = check_stream(nats, &pool).await?;
        if settings.progress {
            let a = &stream_check.accounting;
            eprintln!(
                "  relay: stream of {} messages: {} of {} revisions, {} missed, {} repeated, {} out of order, {} unknown, {} malformed",
                stream_check.messages,
                a.received,
                a.expected,
                a.missed,
                a.duplicated,
                a.out_of_order,
                a.unexpected,
                stream_check.malformed
            );
        }
        anyhow::Ok(RelayReport {
            backend: backend.name(),
            relay: match backend {
                Backend::Postgres => "relay process",
                Backend::Sqlite => "in the server",
            },
            stream: nats.stream.clone(),
            subject_prefix: nats.prefix.clone(),
            throughput,
            latency,
            stream_check,
        })
    }
    .await;
    let stopped = processes.stop().await;
    pool.close().await;
    let report = result?;
    stopped?;
    Ok(report)
}

struct MergeRun {
    measured: load::Measured,
    server_cores: f64,
    stack_cpu_us_per_merge: f64,
    nats_cores: Option<f64>,
    transactions_per_merge: Option<f64>,
}

/// Postgres: transactions committed in the bench's database so far
/// (`pg_stat_database`, every statement outside a transaction counts one).
async fn transactions(pool: &RawPool) -> anyhow::Result<Option<u64>> {
    Ok(match pool {
        RawPool::Postgres(pool) => {
            // Statistics reach pg_stat_database when a backend's
            // transaction ends (and at most every second while idle).
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(pool)
                .await?;
            let n: i64 = sqlx::query_scalar(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            )
            .fetch_one(pool)
            .await?;
            Some(n as u64)
        }
        RawPool::Sqlite(_) => None,
    })
}

/// The nats-server process on this machine, if there is one to read.
fn nats_server_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "nats-server").then_some(pid)
    })
}

/// CPU seconds used so far by `pids`, this bench, and on Postgres every
/// backend connected to the bench's database but the one asking (as
/// schema.rs's stack CPU, plus the relay and NATS).
async fn stack_cpu(pool: &RawPool, pids: &[u32]) -> anyhow::Result<HashMap<u32, f64>> {
    let mut all = pids.to_vec();
    all.push(std::process::id());
    if let RawPool::Postgres(pool) = pool {
        let backends: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(pool)
        .await?;
        all.extend(backends.into_iter().map(|p| p as u32));
    }
    Ok(all
        .into_iter()
        .filter_map(|pid| Usage::of(pid).ok().map(|u| (pid, u.cpu_seconds)))
        .collect())
}

/// CPU seconds between two [`stack_cpu`] readings: processes in both, and
/// those that started in between (from 0).
fn cpu_between(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, a)| a - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn fresh_seed() -> u64 {
    rand::random::<u64>() | 1
}

/// The merge workload of load.rs: warm-up, then the measured run, each of
/// whose merges must write an event.
async fn merges(
    server: &ServerProcess,
    relay: Option<&ServerProcess>,
    settings: &Settings<'_>,
    pool: &RawPool,
) -> anyhow::Result<MergeRun> {
    let nats_pid = nats_server_pid();
    let mut pids = vec![server.pid];
    pids.extend(relay.map(|r| r.pid));
    pids.extend(nats_pid);
    let mut channels = Vec::with_capacity(settings.clients);
    for _ in 0..settings.clients {
        channels.push(channel(server.addr).await?);
    }
    let (clients, ids) = (settings.clients, settings.ids);
    // Seeds of their own: the same seeds would repeat earlier merges, and
    // a merge that changes nothing writes no event.
    let warmup = settings.warmup;
    load::service_seeded(
        channels.clone(),
        Workload::Merge,
        clients,
        ids,
        warmup,
        fresh_seed(),
    )
    .await;
    let before = server.usage()?;
    let stack_before = stack_cpu(pool, &pids).await?;
    let xacts_before = transactions(pool).await?;
    let events_before = event_count(pool).await?;
    let seed = fresh_seed();
    let measured = load::service_seeded(
        channels,
        Workload::Merge,
        clients,
        ids,
        settings.duration,
        seed,
    )
    .await;
    let after = server.usage()?;
    let stack_after = stack_cpu(pool, &pids).await?;
    let xacts_after = transactions(pool).await?;
    let events = event_count(pool).await? - events_before;
    crate::check(&measured, "merge (relay workload)")?;
    if events != measured.ops {
        bail!(
            "{} merges acknowledged but {events} events written: some merges changed nothing",
            measured.ops
        );
    }
    let nats_seconds = nats_pid.map_or(0.0, |pid| {
        stack_after.get(&pid).copied().unwrap_or(0.0)
            - stack_before.get(&pid).copied().unwrap_or(0.0)
    });
    Ok(MergeRun {
        server_cores: cores(before, after, measured.elapsed),
        stack_cpu_us_per_merge: cpu_between(&stack_before, &stack_after) * 1e6
            / measured.ops as f64,
        nats_cores: nats_pid.map(|_| nats_seconds / measured.elapsed.as_secs_f64()),
        transactions_per_merge: xacts_before
            .zip(xacts_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / measured.ops as f64),
        measured,
    })
}

async fn latency_run(
    server: &ServerProcess,
    settings: &Settings<'_>,
    nats: &Nats,
    pool: &RawPool,
    rate: u32,
) -> anyhow::Result<LatencyRow> {
    // Start from a caught-up stream, so that the window holds only its
    // own writes.
    let before = newest_revision(pool).await?;
    nats.wait_for(event_count(pool).await?).await?;
    let collector = Collector::start(nats, DeliverPolicy::New).await?;
    let users = UserMetadataServiceClient::new(channel(server.addr).await?);
    let responses: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let ids = settings.ids;
    let first_send = Instant::now();
    let written = crate::watch::open_loop(rate, settings.rate_duration, || {
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
            let patch = Struct {
                fields: [(
                    "relayed".to_string(),
                    ProtoValue {
                        kind: Some(ProtoKind::NumberValue(value)),
                    },
                )]
                .into(),
            };
            let request = MergeUserMetadataRequest {
                user_id,
                public_metadata: Some(patch),
                ..Default::default()
            };
            let result = users.merge(request).await;
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
    let newest = newest_revision(pool).await?;
    let got = collector.finish(newest, u64::MAX, PATIENCE).await?;
    let expected = revisions_after(pool, before).await?;
    let mut received = Vec::with_capacity(got.len());
    let mut latency = latency_histogram();
    let mut commit_latency = latency_histogram();
    let mut before_response = 0;
    for g in got.iter().filter(|g| !g.marker) {
        let Some(revision) = g.revision else {
            continue;
        };
        received.push(revision);
        if let Some(&response) = responses.get(&revision) {
            match g.at.checked_duration_since(response) {
                Some(d) => latency.saturating_record(d.as_micros() as u64),
                None => {
                    before_response += 1;
                    latency.saturating_record(0);
                }
            }
        }
        if let Ok(event) = UserMetadataEvent::decode(g.payload.as_ref())
            && let Some(at) = event.committed_at
        {
            let committed =
                SystemTime::UNIX_EPOCH + Duration::new(at.seconds as u64, at.nanos as u32);
            let d = g.wall.duration_since(committed).unwrap_or_default();
            commit_latency.saturating_record(d.as_micros() as u64);
        }
    }
    let acked = written.revisions.len() as u64;
    Ok(LatencyRow {
        rate,
        writes: acked,
        failed_writes: written.failed,
        first_error: written.first_error,
        achieved_per_second: acked as f64
            / last_response
                .saturating_duration_since(first_send)
                .as_secs_f64()
                .max(1e-9),
        p50_ms: q_ms(&latency, 0.5),
        p99_ms: q_ms(&latency, 0.99),
        max_ms: latency.max() as f64 / 1000.0,
        before_response,
        commit_p50_ms: q_ms(&commit_latency, 0.5),
        commit_p99_ms: q_ms(&commit_latency, 0.99),
        commit_max_ms: commit_latency.max() as f64 / 1000.0,
        accounting: account(&expected, &received),
    })
}

/// Whether an event message agrees with itself: subject, Nats-Msg-Id and
/// body all say what its Metadata-Revision says.
fn well_formed(g: &Got, prefix: &str) -> bool {
    let Some(revision) = g.revision else {
        return false;
    };
    let Ok(event) = UserMetadataEvent::decode(g.payload.as_ref()) else {
        return false;
    };
    event.revision == revision
        && g.msg_id.as_deref() == Some(revision.to_string().as_str())
        && g.subject == subject::event_subject(prefix, Kind::User, &event.user_id)
}

/// Reads the whole stream and compares it with the event table.
async fn check_stream(nats: &Nats, pool: &RawPool) -> anyhow::Result<StreamCheck> {
    nats.wait_for(event_count(pool).await?).await?;
    let last = nats.last_sequence().await?;
    let collector = Collector::start(nats, DeliverPolicy::All).await?;
    let got = collector.finish(u64::MAX, last, PATIENCE).await?;
    let expected = revisions_after(pool, 0).await?;
    let marker_subject = subject::marker_subject(&nats.prefix);
    let marker_first = got
        .first()
        .is_some_and(|g| g.marker && g.subject == marker_subject && g.sequence == 1);
    let extra_markers = got.iter().skip(1).filter(|g| g.marker).count() as u64;
    let events: Vec<&Got> = got.iter().filter(|g| !g.marker).collect();
    let malformed = events
        .iter()
        .filter(|g| !well_formed(g, &nats.prefix))
        .count() as u64;
    let received: Vec<u64> = events.iter().filter_map(|g| g.revision).collect();
    Ok(StreamCheck {
        messages: got.len() as u64,
        marker_first,
        extra_markers,
        malformed,
        accounting: account(&expected, &received),
    })
}

pub fn print(report: &RelayReport) {
    let t = &report.throughput;
    println!(
        "\nrelay ({}, {}): stream {}, subjects {}.>",
        report.backend, report.relay, report.stream, report.subject_prefix
    );
    println!(
        "{:<9} {:>7} {:>9} {:>7} {:>8} {:>9} {:>7} {:>6} {:>9} {:>9} {:>7} {:>8} {:>9}",
        "backend",
        "clients",
        "merge/s",
        "p99ms",
        "backlog",
        "relay/s",
        "ratio",
        "cpu",
        "live m/s",
        "relay/s",
        "lag",
        "drainms",
        "cpu s+r"
    );
    println!(
        "{:<9} {:>7} {:>9.0} {:>7.2} {:>8} {:>9.0} {:>6.0}% {:>6.2} {:>9.0} {:>9.0} {:>7} {:>8.0} {:>9}",
        report.backend,
        t.clients,
        t.service_merges_per_second,
        t.service_p99_ms,
        t.backlog_events,
        t.backlog_events_per_second,
        t.backlog_ratio * 100.0,
        t.backlog_relay_cpu_cores,
        t.live_merges_per_second,
        t.live_relay_events_per_second,
        t.live_lag_events,
        t.live_drain_ms,
        match t.live_relay_cpu_cores {
            Some(relay) => format!("{:.2}+{relay:.2}", t.live_server_cpu_cores),
            None => format!("{:.2}", t.live_server_cpu_cores),
        }
    );
    println!(
        "stack CPU per Merge: {:.0} µs alone, {:.0} µs with the relay; nats-server {} cores alone, {} with the relay",
        t.service_stack_cpu_us_per_merge,
        t.live_stack_cpu_us_per_merge,
        t.service_nats_cpu_cores
            .map_or("?".to_string(), |c| format!("{c:.2}")),
        t.live_nats_cpu_cores
            .map_or("?".to_string(), |c| format!("{c:.2}"))
    );
    if let (Some(a), Some(l)) = (
        t.service_transactions_per_merge,
        t.live_transactions_per_merge,
    ) {
        println!("Postgres transactions per Merge: {a:.2} alone, {l:.2} with the relay");
    }
    let f = &t.floor;
    println!(
        "JetStream from the bench ({} messages of {} B): {:.0}/s one ack at a time (ack p50 {:.0} µs, p99 {:.0} µs), {:.0}/s pipelined ({} acks in flight)",
        f.messages,
        f.body_bytes,
        f.sequential_per_second,
        f.ack_p50_us,
        f.ack_p99_us,
        f.pipelined_per_second,
        f.pipeline_window
    );
    println!(
        "\n{:<9} {:>7} {:>7} {:>6} {:>8} {:>7} {:>7} {:>8} {:>6} {:>8} {:>8} {:>9} {:>7} {:>7} {:>6} {:>7}",
        "backend",
        "rate/s",
        "writes",
        "failed",
        "acked/s",
        "p50ms",
        "p99ms",
        "maxms",
        "early",
        "c.p50ms",
        "c.p99ms",
        "c.maxms",
        "events",
        "missed",
        "dups",
        "order"
    );
    for r in &report.latency {
        let a = &r.accounting;
        println!(
            "{:<9} {:>7} {:>7} {:>6} {:>8.0} {:>7.2} {:>7.2} {:>8.2} {:>6} {:>8.2} {:>8.2} {:>9.2} {:>7} {:>7} {:>6} {:>7}",
            report.backend,
            r.rate,
            r.writes,
            r.failed_writes,
            r.achieved_per_second,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.before_response,
            r.commit_p50_ms,
            r.commit_p99_ms,
            r.commit_max_ms,
            a.received,
            a.missed,
            a.duplicated,
            a.out_of_order
        );
    }
    let c = &report.stream_check;
    let a = &c.accounting;
    println!(
        "\nwhole stream: exactly once and in order: {}; {} messages, marker first: {}, {} of {} revisions; missed {}, repeated {}, out of order {}, unknown {}, malformed {}, extra markers {}",
        if a.exact() && c.malformed == 0 && c.marker_first && c.extra_markers == 0 {
            "yes"
        } else {
            "NO"
        },
        c.messages,
        c.marker_first,
        a.received,
        a.expected,
        a.missed,
        a.duplicated,
        a.out_of_order,
        a.unexpected,
        c.malformed,
        c.extra_markers
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_delivery() {
        let a = account(&[1, 2, 3], &[1, 2, 3]);
        assert!(a.exact());
        assert_eq!((a.expected, a.received), (3, 3));
    }

    #[test]
    fn counts_each_fault() {
        let a = account(&[1, 2, 3, 4, 5], &[1, 3, 2, 3, 5, 9]);
        assert_eq!(a.missed, 1, "4");
        assert_eq!(a.duplicated, 1, "the second 3");
        // 3 -> 2 and 3 -> ... (2 -> 3 is forward); 3 -> 5 forward.
        assert_eq!(a.out_of_order, 1);
        assert_eq!(a.unexpected, 1, "9");
        assert!(!a.exact());
    }

    #[test]
    fn nothing_received() {
        let a = account(&[4, 7], &[]);
        assert_eq!(a.missed, 2);
        assert_eq!(a.received, 0);
    }
}
