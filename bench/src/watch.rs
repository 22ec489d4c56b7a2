//! Watch fan-out: S subscribers on one or more replicas while a writer makes
//! W changes per second; delivery latency from commit (the event's
//! committed_at) to receipt, and a check that every subscriber received
//! every revision once, in order. The subscriber and writer plumbing is
//! shared with etcd's Watch (etcd.rs), so both are held to the same
//! accounting.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::{MergeUserMetadataRequest, WatchUserMetadataRequest};
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};

use crate::db::id;
use crate::load::latency_histogram;
use crate::process::channel;

/// Streams per HTTP/2 connection, as a client library would multiplex them.
pub const STREAMS_PER_CONNECTION: usize = 100;

pub struct WatchOutcome {
    pub subscribers: usize,
    pub writes: u64,
    /// Deliveries the subscribers were owed: every write for each, or,
    /// with filters, the writes each subscriber's filter matches.
    pub expected: u64,
    pub delivered: u64,
    pub missed: u64,
    /// Deliveries out of order or repeated.
    pub disordered: u64,
    /// Revisions a subscriber received that it was not owed (a filter let
    /// through an event it should have held back).
    pub unexpected: u64,
    /// Commit to receipt, microseconds.
    pub latency: Histogram<u64>,
}

/// One event as a subscriber received it.
pub struct Delivery {
    pub revision: u64,
    /// When the change was committed (or, where the store does not say,
    /// sent): the start of its delivery latency.
    pub committed: Option<SystemTime>,
}

/// What one subscriber received.
pub struct Received {
    revisions: Vec<u64>,
    latency: Histogram<u64>,
}

pub struct Subscribers {
    tasks: Vec<JoinHandle<anyhow::Result<Received>>>,
    /// Set when the writer is done: subscribers stop after this revision.
    last: watch::Sender<u64>,
}

/// Counts the subscribers whose stream is registered, so that the writer
/// starts only once every subscriber is bound to see every write.
#[derive(Clone)]
pub struct Ready {
    registered: Arc<AtomicUsize>,
    all: Arc<Notify>,
    of: usize,
}

impl Ready {
    pub fn done(&self) {
        if self.registered.fetch_add(1, Ordering::SeqCst) + 1 == self.of {
            self.all.notify_one();
        }
    }
}

impl Subscribers {
    /// Spawns `count` subscribers and returns once each has called
    /// [`Ready::done`]. `subscriber(n, ready, last)` opens stream n, says
    /// when it is registered, then [`receive`]s until `last`.
    pub async fn spawn<F, Fut>(count: usize, subscriber: F) -> anyhow::Result<Subscribers>
    where
        F: Fn(usize, Ready, watch::Receiver<u64>) -> Fut,
        Fut: Future<Output = anyhow::Result<Received>> + Send + 'static,
    {
        let (last, last_rx) = watch::channel(u64::MAX);
        let ready = Ready {
            registered: Arc::new(AtomicUsize::new(0)),
            all: Arc::new(Notify::new()),
            of: count,
        };
        let tasks = (0..count)
            .map(|n| tokio::spawn(subscriber(n, ready.clone(), last_rx.clone())))
            .collect();
        let wait_ready = async {
            while ready.registered.load(Ordering::SeqCst) < count {
                ready.all.notified().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait_ready)
            .await
            .context("subscribers not ready within 60s")?;
        Ok(Subscribers { tasks, last })
    }
}

/// Records `deliveries` (batches, as the stream's messages carry them)
/// until the writer's last revision, once [`Subscribers::finish`] has set
/// it, has arrived.
pub async fn receive<S>(last: watch::Receiver<u64>, deliveries: S) -> anyhow::Result<Received>
where
    S: Stream<Item = anyhow::Result<Vec<Delivery>>> + Unpin,
{
    receive_until(last, |newest| newest, deliveries).await
}

/// [`receive`], for a subscriber owed only some of the writes: `owed` maps
/// the writer's last revision to the last one this subscriber is owed (0:
/// none, it stops at once).
pub async fn receive_until<S>(
    mut last: watch::Receiver<u64>,
    owed: impl Fn(u64) -> u64,
    mut deliveries: S,
) -> anyhow::Result<Received>
where
    S: Stream<Item = anyhow::Result<Vec<Delivery>>> + Unpin,
{
    let mut received = Received {
        revisions: Vec::new(),
        latency: latency_histogram(),
    };
    loop {
        let last_revision = owed(*last.borrow_and_update());
        if last_revision == 0
            || received
                .revisions
                .last()
                .is_some_and(|r| *r >= last_revision)
        {
            return Ok(received);
        }
        let batch = tokio::select! {
            batch = deliveries.next() => batch,
            _ = last.changed() => continue,
        };
        let Some(batch) = batch else {
            bail!("stream ended");
        };
        let now = SystemTime::now();
        for delivery in batch? {
            if let Some(committed) = delivery.committed {
                let micros = now
                    .duration_since(committed)
                    .unwrap_or_default()
                    .as_micros();
                received.latency.saturating_record(micros as u64);
            }
            received.revisions.push(delivery.revision);
        }
    }
}

/// Opens `count` live Watch streams, spread over `servers`, and returns once
/// each has received its first message (so the stream is registered).
pub async fn subscribe(servers: &[SocketAddr], count: usize) -> anyhow::Result<Subscribers> {
    let mut channels = Vec::new();
    for n in 0..count.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(channel(servers[n % servers.len()]).await?);
    }
    Subscribers::spawn(count, |n, ready, last| {
        let mut users =
            UserMetadataServiceClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
        async move {
            let mut stream = users
                .watch(WatchUserMetadataRequest::default())
                .await
                .context("Watch refused")?
                .into_inner();
            let first = stream.message().await?.context("stream ended at once")?;
            if !matches!(first.response, Some(Response::Progress(_))) {
                bail!("the first message is not a progress message");
            }
            ready.done();
            let deliveries = stream.map(|message| {
                Ok(match message?.response {
                    Some(Response::Event(event)) => vec![Delivery {
                        revision: event.revision,
                        committed: event.committed_at.map(|at| {
                            SystemTime::UNIX_EPOCH
                                + Duration::new(at.seconds as u64, at.nanos as u32)
                        }),
                    }],
                    _ => Vec::new(),
                })
            });
            receive(last, deliveries).await
        }
    })
    .await
}

/// What the writer did: the revisions of its acknowledged writes, and how
/// many writes failed (the server could not keep up with the rate).
#[derive(Default)]
pub struct Written {
    pub revisions: Vec<u64>,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Calls `write` (which returns the revision it wrote) at `rate` per
/// second for `duration`: an open loop, so a slow store makes writes pile
/// up, not the rate drop.
pub async fn open_loop<F, Fut>(
    rate: u32,
    duration: Duration,
    mut write: F,
) -> anyhow::Result<Written>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, String>> + Send + 'static,
{
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut writes = Vec::new();
    while Instant::now() < end {
        ticks.tick().await;
        writes.push(tokio::spawn(write()));
    }
    let mut written = Written::default();
    for write in writes {
        match write.await? {
            Ok(revision) => written.revisions.push(revision),
            Err(err) => {
                written.failed += 1;
                written.first_error.get_or_insert(err);
            }
        }
    }
    written.revisions.sort_unstable();
    Ok(written)
}

/// Merges at `rate` per second for `duration` through `server`.
pub async fn write(
    server: SocketAddr,
    rate: u32,
    duration: Duration,
    ids: u64,
) -> anyhow::Result<Written> {
    let users = UserMetadataServiceClient::new(channel(server).await?);
    open_loop(rate, duration, || {
        let mut users = users.clone();
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
                    "watched".to_string(),
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
            users
                .merge(request)
                .await
                .map(|r| r.into_inner().revision)
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
        }
    })
    .await
}

impl Subscribers {
    /// Waits (at most `patience`) for every subscriber to reach the newest
    /// written revision, then compares what each received with `written`.
    pub async fn finish(self, written: &[u64], patience: Duration) -> anyhow::Result<WatchOutcome> {
        let newest = written.last().copied().unwrap_or(0);
        self.finish_each(newest, written.len() as u64, |_| written, patience)
            .await
    }

    /// [`Subscribers::finish`] for subscribers owed different writes:
    /// `owed(n)` is what subscriber n must receive (sorted), of `writes`
    /// whose newest revision is `newest`. Each subscriber must stop by
    /// itself once it has its last owed revision ([`receive_until`]).
    pub async fn finish_each<'a>(
        self,
        newest: u64,
        writes: u64,
        owed: impl Fn(usize) -> &'a [u64],
        patience: Duration,
    ) -> anyhow::Result<WatchOutcome> {
        self.last.send_replace(newest);
        let mut outcome = WatchOutcome {
            subscribers: self.tasks.len(),
            writes,
            expected: 0,
            delivered: 0,
            missed: 0,
            disordered: 0,
            unexpected: 0,
            latency: latency_histogram(),
        };
        let deadline = Instant::now() + patience;
        for (n, task) in self.tasks.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = match tokio::time::timeout(left, task).await {
                Ok(joined) => joined??,
                Err(_) => bail!("a subscriber did not reach revision {newest} within {patience:?}"),
            };
            let owed = owed(n);
            outcome.expected += owed.len() as u64;
            outcome.delivered += received.revisions.len() as u64;
            outcome.disordered += received
                .revisions
                .windows(2)
                .filter(|w| w[1] <= w[0])
                .count() as u64;
            let mut seen = received.revisions.clone();
            seen.sort_unstable();
            seen.dedup();
            outcome.missed += owed
                .iter()
                .filter(|r| seen.binary_search(r).is_err())
                .count() as u64;
            outcome.unexpected += seen
                .iter()
                .filter(|r| owed.binary_search(r).is_err())
                .count() as u64;
            outcome.latency.add(received.latency).unwrap();
        }
        Ok(outcome)
    }
}
