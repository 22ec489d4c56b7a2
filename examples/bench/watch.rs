//! Watch fan-out: S subscribers on one or more replicas while a writer makes
//! W changes per second; delivery latency from commit (the event's
//! committed_at) to receipt, and a check that every subscriber received
//! every revision once, in order.

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

use crate::db::id;
use crate::load::latency_histogram;
use crate::process::channel;

/// Streams per HTTP/2 connection, as a client library would multiplex them.
const STREAMS_PER_CONNECTION: usize = 100;

pub struct WatchOutcome {
    pub subscribers: usize,
    pub writes: u64,
    pub delivered: u64,
    pub missed: u64,
    /// Deliveries out of order or repeated.
    pub disordered: u64,
    /// Commit to receipt, microseconds.
    pub latency: Histogram<u64>,
}

struct Received {
    revisions: Vec<u64>,
    latency: Histogram<u64>,
}

pub struct Subscribers {
    tasks: Vec<JoinHandle<anyhow::Result<Received>>>,
    /// Set when the writer is done: subscribers stop after this revision.
    last: watch::Sender<u64>,
}

/// Opens `count` live Watch streams, spread over `servers`, and returns once
/// each has received its first message (so the stream is registered).
pub async fn subscribe(servers: &[SocketAddr], count: usize) -> anyhow::Result<Subscribers> {
    let (last, last_rx) = watch::channel(u64::MAX);
    let ready = Arc::new(AtomicUsize::new(0));
    let all_ready = Arc::new(Notify::new());
    let mut channels = Vec::new();
    for n in 0..count.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(channel(servers[n % servers.len()]).await?);
    }
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let mut users =
            UserMetadataServiceClient::new(channels[n / STREAMS_PER_CONNECTION].clone());
        let (mut last, ready, all_ready) = (last_rx.clone(), ready.clone(), all_ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = users
                .watch(WatchUserMetadataRequest::default())
                .await
                .context("Watch refused")?
                .into_inner();
            let first = stream.message().await?.context("stream ended at once")?;
            if !matches!(first.response, Some(Response::Progress(_))) {
                bail!("the first message is not a progress message");
            }
            if ready.fetch_add(1, Ordering::SeqCst) + 1 == count {
                all_ready.notify_one();
            }
            let mut received = Received {
                revisions: Vec::new(),
                latency: latency_histogram(),
            };
            loop {
                let last_revision = *last.borrow_and_update();
                if last_revision == 0
                    || received
                        .revisions
                        .last()
                        .is_some_and(|r| *r >= last_revision)
                {
                    return Ok(received);
                }
                let message = tokio::select! {
                    message = stream.message() => message?,
                    _ = last.changed() => continue,
                };
                let Some(message) = message else {
                    bail!("stream ended");
                };
                if let Some(Response::Event(event)) = message.response {
                    let now = SystemTime::now();
                    if let Some(committed) = event.committed_at {
                        let committed = SystemTime::UNIX_EPOCH
                            + Duration::new(committed.seconds as u64, committed.nanos as u32);
                        let micros = now
                            .duration_since(committed)
                            .unwrap_or_default()
                            .as_micros();
                        received.latency.saturating_record(micros as u64);
                    }
                    received.revisions.push(event.revision);
                }
            }
        }));
    }
    let wait_ready = async {
        while ready.load(Ordering::SeqCst) < count {
            all_ready.notified().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait_ready)
        .await
        .context("subscribers not ready within 60s")?;
    Ok(Subscribers { tasks, last })
}

/// What the writer did: the revisions of its acknowledged writes, and how
/// many writes failed (the server could not keep up with the rate).
#[derive(Default)]
pub struct Written {
    pub revisions: Vec<u64>,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Merges at `rate` per second for `duration` through `server` (an open
/// loop: a slow server makes writes pile up, not the rate drop).
pub async fn write(
    server: SocketAddr,
    rate: u32,
    duration: Duration,
    ids: u64,
) -> anyhow::Result<Written> {
    let users = UserMetadataServiceClient::new(channel(server).await?);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut writes = Vec::new();
    while Instant::now() < end {
        ticks.tick().await;
        let mut users = users.clone();
        let (user_id, value) = {
            let mut rng = rand::rng();
            (
                id(rng.random_range(0..ids)),
                rng.random_range(0..1_000_000) as f64,
            )
        };
        writes.push(tokio::spawn(async move {
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
            users.merge(request).await.map(|r| r.into_inner().revision)
        }));
    }
    let mut written = Written::default();
    for write in writes {
        match write.await? {
            Ok(revision) => written.revisions.push(revision),
            Err(status) => {
                written.failed += 1;
                written
                    .first_error
                    .get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    written.revisions.sort_unstable();
    Ok(written)
}

impl Subscribers {
    /// Waits (at most `patience`) for every subscriber to reach the newest
    /// written revision, then compares what each received with `written`.
    pub async fn finish(self, written: &[u64], patience: Duration) -> anyhow::Result<WatchOutcome> {
        let newest = written.last().copied().unwrap_or(0);
        self.last.send_replace(newest);
        let mut outcome = WatchOutcome {
            subscribers: self.tasks.len(),
            writes: written.len() as u64,
            delivered: 0,
            missed: 0,
            disordered: 0,
            latency: latency_histogram(),
        };
        let deadline = Instant::now() + patience;
        for task in self.tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = match tokio::time::timeout(left, task).await {
                Ok(joined) => joined??,
                Err(_) => bail!("a subscriber did not reach revision {newest} within {patience:?}"),
            };
            outcome.delivered += received.revisions.len() as u64;
            outcome.disordered += received
                .revisions
                .windows(2)
                .filter(|w| w[1] <= w[0])
                .count() as u64;
            let mut seen = received.revisions.clone();
            seen.sort_unstable();
            seen.dedup();
            outcome.missed += written
                .iter()
                .filter(|r| seen.binary_search(r).is_err())
                .count() as u64;
            outcome.latency.add(received.latency).unwrap();
        }
        Ok(outcome)
    }
}
