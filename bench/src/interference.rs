//! Interference: small Merges (the merge workload) measured alone, then
//! while Watch streams replay a long history, then while other clients send
//! ~1 MB Merge patches, on one server, side by side (issue 14).
//!
//! - The history is seeded straight into the events table
//!   ([`BenchDb::seed_history`](crate::db::BenchDb::seed_history)); every
//!   `MARK_EVERY`-th revision, and the last, belongs to [`MARK_ID`].
//! - Each replaying stream watches [`MARK_ID`] alone from revision 1: the
//!   server reads the whole history from the table and sends only the
//!   marks, which tell the client how far the replay has gone. A stream
//!   that reaches the end of the history is closed and opened again from
//!   revision 1, so every stream is replaying for the whole measured time.
//! - Each big-patch sender merges one patch of ~1 MB of JSON (1,000 keys of
//!   ~1 KB strings, in public_metadata) into a random id, in a closed loop,
//!   and counts the outcomes by status code; then again paced to a fixed
//!   rate (`--big-rate`), so that a server that refuses them sooner does
//!   not simply receive more of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::{MergeUserMetadataRequest, WatchUserMetadataRequest};
use prost::Message;
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::Rng;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::db::{MARK_ID, id};
use crate::load::{self, Measured, Workload, latency_histogram};
use crate::process::{ServerProcess, Usage, channel};

/// A mark every this many revisions of the seeded history.
pub const MARK_EVERY: u64 = 1000;

/// Replaying streams per HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 10;

/// Keys of a big patch; each holds a string sized to make the whole patch
/// the requested size.
const BIG_PATCH_KEYS: usize = 1000;

/// What runs next to the small Merges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    Alone,
    Replay,
    /// Big patches as fast as the senders can (closed loop), or at most
    /// this many per second in all.
    BigPatches(Option<f64>),
}

impl Condition {
    fn name(self) -> String {
        match self {
            Condition::Alone => "alone".into(),
            Condition::Replay => "replay".into(),
            Condition::BigPatches(None) => "big-max".into(),
            Condition::BigPatches(Some(rate)) => format!("big-{rate}/s"),
        }
    }
}

/// Settings of one interference run.
pub struct Settings {
    pub clients: usize,
    pub ids: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Revisions of the seeded history (its last revision).
    pub history: u64,
    pub replay_streams: usize,
    pub big_writers: usize,
    /// Compact JSON size of each big patch.
    pub big_patch_bytes: usize,
    /// Also run the big patches paced to this many per second in all.
    pub big_rate: Option<f64>,
}

/// What the replaying streams did during the measured time.
#[derive(Debug, Serialize)]
pub struct ReplayCounts {
    pub streams: usize,
    pub history: u64,
    /// Revisions the streams passed in their replays (to within a mark).
    pub revisions_replayed: u64,
    pub revisions_per_second: f64,
    /// Table reads this takes at the server's 512 revisions per read.
    pub approx_table_reads: u64,
    /// Replays that reached the end of the history (then opened again).
    pub replays_completed: u64,
    /// Fewest streams replaying at one sample (every 10 ms).
    pub min_replaying: usize,
    pub mean_replaying: f64,
    pub stream_errors: u64,
    pub first_error: Option<String>,
}

/// What the big-patch senders got during the measured time.
#[derive(Debug, Serialize)]
pub struct BigPatchCounts {
    pub senders: usize,
    /// None: closed loop.
    pub rate_limit: Option<f64>,
    pub patch_json_bytes: usize,
    pub request_bytes: usize,
    pub sent: u64,
    pub per_second: f64,
    /// Status code name -> calls.
    pub outcomes: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct InterferenceRow {
    pub backend: &'static str,
    pub clients: usize,
    pub condition: String,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub ops_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 / p99 of the "alone" row.
    pub p99_vs_alone: f64,
    pub server_cpu_cores: f64,
    /// CPU of the bench process itself (all its clients), in cores.
    pub bench_cpu_cores: f64,
    pub replay: Option<ReplayCounts>,
    pub big_patches: Option<BigPatchCounts>,
}

impl InterferenceRow {
    /// The background load in a few words, for the table.
    pub fn background(&self) -> String {
        if let Some(r) = &self.replay {
            let mut text = format!(
                "{} streams replaying {} revisions: {} revisions read ({:.0}/s, ~{} table reads), {} replays done, >= {} replaying",
                r.streams,
                r.history,
                r.revisions_replayed,
                r.revisions_per_second,
                r.approx_table_reads,
                r.replays_completed,
                r.min_replaying
            );
            if r.stream_errors > 0 {
                text.push_str(&format!(
                    ", {} stream errors (first: {})",
                    r.stream_errors,
                    r.first_error.as_deref().unwrap_or("?")
                ));
            }
            return text;
        }
        if let Some(b) = &self.big_patches {
            let outcomes: Vec<String> =
                b.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let pace = match b.rate_limit {
                Some(rate) => format!("at most {rate}/s"),
                None => "closed loop".into(),
            };
            return format!(
                "{} senders of {} B patches, {pace}: {} sent ({:.0}/s, p50 {:.1} ms, p99 {:.1} ms): {}",
                b.senders,
                b.patch_json_bytes,
                b.sent,
                b.per_second,
                b.p50_ms,
                b.p99_ms,
                outcomes.join(", ")
            );
        }
        "-".to_string()
    }
}

/// Runs the three conditions on `server`, whose database holds `ids` ids
/// and a history of `settings.history` revisions.
pub async fn run(
    backend: &'static str,
    server: &ServerProcess,
    settings: &Settings,
    verbose: bool,
) -> anyhow::Result<Vec<InterferenceRow>> {
    let mut channels = Vec::with_capacity(settings.clients);
    for _ in 0..settings.clients {
        channels.push(channel(server.addr).await?);
    }
    let mut rows: Vec<InterferenceRow> = Vec::new();
    let mut conditions = vec![
        Condition::Alone,
        Condition::Replay,
        Condition::BigPatches(None),
    ];
    if let Some(rate) = settings.big_rate {
        conditions.push(Condition::BigPatches(Some(rate)));
    }
    for condition in conditions {
        let mut replay = None;
        let mut big = None;
        match condition {
            Condition::Alone => {}
            Condition::Replay => {
                replay = Some(Replayers::start(server.addr, settings).await?);
            }
            Condition::BigPatches(rate) => {
                big = Some(BigWriters::start(server.addr, settings, rate).await?);
            }
        }
        merges(&channels, settings, settings.warmup).await;
        // Counted from here to the end of the measured time.
        let sampler = replay.as_ref().map(|r| r.sample());
        if let Some(r) = &replay {
            r.stats.measuring.store(true, Ordering::SeqCst);
        }
        if let Some(b) = &big {
            b.stats.measuring.store(true, Ordering::SeqCst);
        }
        let before = server.usage()?;
        let bench_before = Usage::of(std::process::id())?;
        let measured = merges(&channels, settings, settings.duration).await;
        let after = server.usage()?;
        let bench_after = Usage::of(std::process::id())?;
        let replay = match replay {
            Some(r) => Some(r.stop(sampler.expect("sampler"), measured.elapsed).await),
            None => None,
        };
        let big = match big {
            Some(b) => Some(b.stop(measured.elapsed).await),
            None => None,
        };
        let q = |q: f64| crate::ms(measured.latency.value_at_quantile(q));
        let alone_p99 = rows.first().map_or(q(0.99), |r| r.p99_ms);
        let row = InterferenceRow {
            backend,
            clients: settings.clients,
            condition: condition.name(),
            ops: measured.ops,
            errors: measured.errors,
            first_error: measured.first_error.clone(),
            ops_per_second: measured.throughput(),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            max_ms: crate::ms(measured.latency.max()),
            p99_vs_alone: q(0.99) / alone_p99,
            server_cpu_cores: crate::cpu_cores(before, after, measured.elapsed),
            bench_cpu_cores: crate::cpu_cores(bench_before, bench_after, measured.elapsed),
            replay,
            big_patches: big,
        };
        if verbose {
            eprintln!(
                "  {backend} interference {}: {:.0} merges/s, p99 {:.2} ms (x{:.2} of alone), {} errors{}; {}",
                row.condition,
                row.ops_per_second,
                row.p99_ms,
                row.p99_vs_alone,
                row.errors,
                row.first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
                row.background()
            );
        }
        if row.ops == 0 {
            bail!("interference {}: no small Merge succeeded", row.condition);
        }
        rows.push(row);
    }
    Ok(rows)
}

async fn merges(
    channels: &[tonic::transport::Channel],
    settings: &Settings,
    time: Duration,
) -> Measured {
    load::service(
        channels.to_vec(),
        Workload::Merge,
        settings.clients,
        settings.ids,
        time,
    )
    .await
}

#[derive(Default)]
struct ReplayStats {
    measuring: AtomicBool,
    revisions: AtomicU64,
    completed: AtomicU64,
    /// Streams opened and not yet at the end of the history.
    replaying: AtomicUsize,
    /// Streams that have received their first message at least once.
    ready: AtomicUsize,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Replayers {
    stats: Arc<ReplayStats>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    streams: usize,
    history: u64,
}

struct Sampler {
    task: JoinHandle<(usize, f64)>,
    stop: CancellationToken,
}

impl Replayers {
    /// Opens the streams and returns once each has been accepted (its
    /// first message, the progress message, has arrived).
    async fn start(server: SocketAddr, settings: &Settings) -> anyhow::Result<Replayers> {
        let stats = Arc::new(ReplayStats::default());
        let cancel = CancellationToken::new();
        let mut channels = Vec::new();
        for _ in 0..settings.replay_streams.div_ceil(STREAMS_PER_CONNECTION) {
            channels.push(channel(server).await?);
        }
        let history = settings.history;
        let tasks = (0..settings.replay_streams)
            .map(|n| {
                let users =
                    UserMetadataServiceClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
                tokio::spawn(replay_loop(users, history, stats.clone(), cancel.clone()))
            })
            .collect();
        let replayers = Replayers {
            stats,
            cancel,
            tasks,
            streams: settings.replay_streams,
            history,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while replayers.stats.ready.load(Ordering::SeqCst) < replayers.streams {
            if Instant::now() > deadline {
                let first = replayers.stats.first_error.lock().unwrap().clone();
                replayers.cancel.cancel();
                bail!(
                    "replaying streams not accepted within 60s (first error: {})",
                    first.as_deref().unwrap_or("none")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(replayers)
    }

    /// Samples the number of streams replaying every 10 ms until stopped:
    /// (fewest, mean).
    fn sample(&self) -> Sampler {
        let stop = CancellationToken::new();
        let (stats, until) = (self.stats.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut fewest, mut sum, mut samples) = (usize::MAX, 0usize, 0usize);
            let mut ticks = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        let now = stats.replaying.load(Ordering::SeqCst);
                        fewest = fewest.min(now);
                        sum += now;
                        samples += 1;
                    }
                    () = until.cancelled() => break,
                }
            }
            if samples == 0 {
                (0, 0.0)
            } else {
                (fewest, sum as f64 / samples as f64)
            }
        });
        Sampler { task, stop }
    }

    async fn stop(self, sampler: Sampler, elapsed: Duration) -> ReplayCounts {
        self.stats.measuring.store(false, Ordering::SeqCst);
        sampler.stop.cancel();
        let (min_replaying, mean_replaying) = sampler.task.await.unwrap_or((0, 0.0));
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        let revisions = self.stats.revisions.load(Ordering::SeqCst);
        ReplayCounts {
            streams: self.streams,
            history: self.history,
            revisions_replayed: revisions,
            revisions_per_second: revisions as f64 / elapsed.as_secs_f64(),
            approx_table_reads: revisions.div_ceil(512),
            replays_completed: self.stats.completed.load(Ordering::SeqCst),
            min_replaying,
            mean_replaying,
            stream_errors: self.stats.errors.load(Ordering::SeqCst),
            first_error: self.stats.first_error.lock().unwrap().clone(),
        }
    }
}

/// One stream: replays the history from revision 1, again and again.
async fn replay_loop(
    users: UserMetadataServiceClient<tonic::transport::Channel>,
    history: u64,
    stats: Arc<ReplayStats>,
    cancel: CancellationToken,
) {
    let mut ready = false;
    while !cancel.is_cancelled() {
        stats.replaying.fetch_add(1, Ordering::SeqCst);
        let outcome = tokio::select! {
            outcome = replay_once(users.clone(), history, &stats, &mut ready) => Some(outcome),
            () = cancel.cancelled() => None,
        };
        stats.replaying.fetch_sub(1, Ordering::SeqCst);
        match outcome {
            None => return,
            Some(Ok(())) => {
                if stats.measuring.load(Ordering::SeqCst) {
                    stats.completed.fetch_add(1, Ordering::SeqCst);
                }
            }
            Some(Err(err)) => {
                stats.errors.fetch_add(1, Ordering::SeqCst);
                stats
                    .first_error
                    .lock()
                    .unwrap()
                    .get_or_insert(format!("{err:#}"));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Watches [`MARK_ID`] from revision 1 until the mark at the end of the
/// history arrives, counting the revisions passed while measuring.
async fn replay_once(
    mut users: UserMetadataServiceClient<tonic::transport::Channel>,
    history: u64,
    stats: &ReplayStats,
    ready: &mut bool,
) -> anyhow::Result<()> {
    let request = WatchUserMetadataRequest {
        start_revision: 1,
        user_ids: vec![MARK_ID.to_string()],
        progress_notify: false,
        filter: String::new(),
    };
    let mut stream = users
        .watch(request)
        .await
        .map_err(|s| anyhow::anyhow!("Watch refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut passed = 0;
    loop {
        let message = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .context("stream ended before the end of the history")?;
        if !*ready {
            *ready = true;
            stats.ready.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(Response::Event(event)) = message.response {
            let revision = event.revision.min(history);
            if stats.measuring.load(Ordering::SeqCst) {
                stats
                    .revisions
                    .fetch_add(revision.saturating_sub(passed), Ordering::SeqCst);
            }
            passed = revision;
            if event.revision >= history {
                return Ok(());
            }
        }
    }
}

struct BigStats {
    measuring: AtomicBool,
    sent: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
}

struct BigWriters {
    stats: Arc<BigStats>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    senders: usize,
    rate_limit: Option<f64>,
    patch_json_bytes: usize,
    request_bytes: usize,
}

/// A patch of `keys` keys whose compact JSON is at most `bytes` long (as
/// close as the key count allows), and its exact compact size.
fn big_patch(bytes: usize, keys: usize) -> (Struct, usize) {
    // {"b0000":"xx..x",...}: 2 braces, per key 8 for the quoted key and
    // colon, 2 quotes, and a comma between keys.
    let overhead = 2 + keys * 10 + keys.saturating_sub(1);
    let length = bytes.saturating_sub(overhead) / keys.max(1);
    let value = "x".repeat(length);
    let fields = (0..keys)
        .map(|k| {
            (
                format!("b{k:04}"),
                ProtoValue {
                    kind: Some(ProtoKind::StringValue(value.clone())),
                },
            )
        })
        .collect();
    (Struct { fields }, overhead + keys * length)
}

impl BigWriters {
    /// `rate`: at most this many patches per second in all (each sender
    /// its share, waiting for its reply before the next); None: as fast as
    /// replies come.
    async fn start(
        server: SocketAddr,
        settings: &Settings,
        rate: Option<f64>,
    ) -> anyhow::Result<BigWriters> {
        let (patch, patch_json_bytes) = big_patch(settings.big_patch_bytes, BIG_PATCH_KEYS);
        let probe = MergeUserMetadataRequest {
            user_id: id(settings.ids.saturating_sub(1)),
            public_metadata: Some(patch.clone()),
            ..Default::default()
        };
        let request_bytes = probe.encoded_len();
        let stats = Arc::new(BigStats {
            measuring: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            outcomes: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(latency_histogram()),
        });
        let cancel = CancellationToken::new();
        let patch = Arc::new(patch);
        let mut tasks = Vec::new();
        for _ in 0..settings.big_writers {
            let users = UserMetadataServiceClient::new(channel(server).await?);
            let (stats, cancel, patch) = (stats.clone(), cancel.clone(), patch.clone());
            let ids = settings.ids;
            let mut pace = rate.map(|rate| {
                let every = Duration::from_secs_f64(settings.big_writers as f64 / rate);
                let mut ticks = tokio::time::interval(every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            tasks.push(tokio::spawn(async move {
                while !cancel.is_cancelled() {
                    if let Some(ticks) = &mut pace {
                        tokio::select! {
                            _ = ticks.tick() => {}
                            () = cancel.cancelled() => return,
                        }
                    }
                    let user_id = id(rand::rng().random_range(0..ids));
                    let request = MergeUserMetadataRequest {
                        user_id,
                        public_metadata: Some((*patch).clone()),
                        ..Default::default()
                    };
                    let mut users = users.clone();
                    let started = Instant::now();
                    let outcome = tokio::select! {
                        outcome = users.merge(request) => outcome,
                        () = cancel.cancelled() => return,
                    };
                    if !stats.measuring.load(Ordering::SeqCst) {
                        continue;
                    }
                    let code = match outcome {
                        Ok(_) => tonic::Code::Ok,
                        Err(status) => status.code(),
                    };
                    stats.sent.fetch_add(1, Ordering::SeqCst);
                    stats
                        .latency
                        .lock()
                        .unwrap()
                        .saturating_record(started.elapsed().as_micros() as u64);
                    *stats
                        .outcomes
                        .lock()
                        .unwrap()
                        .entry(format!("{code:?}"))
                        .or_default() += 1;
                }
            }));
        }
        Ok(BigWriters {
            stats,
            cancel,
            tasks,
            senders: settings.big_writers,
            rate_limit: rate,
            patch_json_bytes,
            request_bytes,
        })
    }

    async fn stop(self, elapsed: Duration) -> BigPatchCounts {
        self.stats.measuring.store(false, Ordering::SeqCst);
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        let sent = self.stats.sent.load(Ordering::SeqCst);
        let latency = self.stats.latency.lock().unwrap();
        BigPatchCounts {
            senders: self.senders,
            rate_limit: self.rate_limit,
            patch_json_bytes: self.patch_json_bytes,
            request_bytes: self.request_bytes,
            sent,
            per_second: sent as f64 / elapsed.as_secs_f64(),
            outcomes: self.stats.outcomes.lock().unwrap().clone(),
            p50_ms: crate::ms(latency.value_at_quantile(0.5)),
            p99_ms: crate::ms(latency.value_at_quantile(0.99)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::big_patch;

    #[test]
    fn a_big_patch_has_the_size_it_says() {
        for (bytes, keys) in [(1_000_000, 1000), (50_000, 10), (5_000, 1)] {
            let (patch, size) = big_patch(bytes, keys);
            let json = serde_json::Value::Object(
                patch
                    .fields
                    .into_iter()
                    .map(|(k, v)| match v.kind {
                        Some(prost_types::value::Kind::StringValue(s)) => {
                            (k, serde_json::Value::String(s))
                        }
                        _ => unreachable!(),
                    })
                    .collect(),
            );
            assert_eq!(json.to_string().len(), size);
            assert!(size <= bytes && size + keys > bytes, "{size} for {bytes}");
        }
    }
}
