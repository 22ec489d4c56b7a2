//! The NATS JetStream relay: copies the event log into a stream, every
//! revision exactly once and in revision order, across crashes, outages and
//! replicas.
//!
//! - **Where to go on.** The stream itself says: its last message carries
//!   `Metadata-Revision`, and the relay continues after it. Nothing else is
//!   stored, so no state can disagree with the stream.
//! - **Exactly once.** Each publish waits for JetStream's ack before the
//!   next, and is fenced with `Nats-Expected-Last-Sequence` (see
//!   `jetstream`); a refused, lost or doubtful publish makes the relay read
//!   the stream's end again. `Nats-Msg-Id` is the revision, so JetStream's
//!   duplicate window drops a repeat as well.
//! - **In order, no gap.** The relay reads the event table only up to the
//!   dispatcher's high-water mark (`Broker::head`), below which every
//!   revision is committed or void, exactly as a Watch stream does.
//! - **One at a time.** Replicas take turns through a Postgres advisory
//!   lock (`store::lease`); on SQLite the relay runs in the server process.
//! - **Too old.** A stream that ends below the oldest event the table keeps
//!   stops the relay with an error that says how to reseed (`--from-now`).

mod jetstream;
pub mod message;
mod metrics;
mod process;
pub mod subject;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use jetstream::{JetStream, NatsOptions, StreamEnd};
pub use message::Format;
pub use metrics::RelayMetrics;
pub use process::{RELAY_HEALTH, RelayProcessConfig, RunningRelay, start_in_server, start_process};

use crate::events::Broker;
use crate::pause::PausePoint;
use crate::store::{Lease, Store, StoreError};
use message::MarkerReason;

#[derive(Clone, Debug)]
pub struct RelayOptions {
    pub nats: NatsOptions,
    pub format: Format,
    /// Reseed a stream that cannot be continued (empty, emptied, or ending
    /// below what the event table keeps): a marker, then the events after
    /// the current revision. A stream that can be continued is continued.
    pub from_now: bool,
    /// Events read from the table per query.
    pub batch: u64,
    /// How often a standby tries to take the lease, and the holder checks
    /// that it still has it.
    pub lease_interval: Duration,
    /// Test-only stopping places; never armed in production.
    pub pauses: RelayPauses,
}

/// Where a test can stop the relay (see [`PausePoint`]): the moments a
/// crash is the most likely to lose or repeat an event.
#[derive(Clone, Debug, Default)]
pub struct RelayPauses {
    /// An event's publish is sent and its ack not yet read.
    pub sent: PausePoint,
    /// An event's ack is read and the relay has not moved on yet.
    pub acked: PausePoint,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error(
        "NATS stream {stream} exists with subjects {found:?}, not [\"{wanted}\"]: it is not this \
         relay's stream; choose another --nats-stream or --nats-subject-prefix"
    )]
    ForeignStream {
        stream: String,
        found: Vec<String>,
        wanted: String,
    },
    #[error(
        "the last message of NATS stream {stream} (sequence {sequence}, subject {subject}) has no \
         Metadata-Revision header: something other than the relay publishes to it"
    )]
    ForeignMessage {
        stream: String,
        sequence: u64,
        subject: String,
    },
    #[error(
        "NATS stream {stream} has no message left (its last, sequence {last_sequence}, expired or \
         was purged), so where the relay stopped is unknown; restart it once with --from-now to \
         reseed the stream from the current revision (a marker message says where it resumes)"
    )]
    Emptied { stream: String, last_sequence: u64 },
    #[error(
        "NATS stream {stream} ends at revision {last}, but the event table keeps only revisions \
         from {oldest} on (older events were pruned by --event-retention), so revisions {} to {} \
         can no longer be relayed; restart the relay once with --from-now to reseed the stream \
         from the current revision (a marker message says where it resumes)",
        last + 1, oldest - 1
    )]
    PastRetention {
        stream: String,
        last: u64,
        oldest: u64,
    },
    #[error(
        "the event on {subject} is larger than the NATS server accepts ({message}); raise the \
         server's max_payload, or lower --max-field-bytes so that no event is that large"
    )]
    TooLarge { subject: String, message: String },
    /// Another publisher moved the stream's end, or a publish may have
    /// been stored twice: read the end again.
    #[error("the stream's end moved under this relay")]
    Fenced,
    #[error("NATS {operation} failed: {message}")]
    Nats {
        operation: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RelayError {
    /// An error no retry can mend: the relay stops with it.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            RelayError::Connect { .. }
                | RelayError::ForeignStream { .. }
                | RelayError::ForeignMessage { .. }
                | RelayError::Emptied { .. }
                | RelayError::PastRetention { .. }
                | RelayError::TooLarge { .. }
        )
    }

    fn operation(&self) -> &'static str {
        match self {
            RelayError::Nats { operation, .. } => operation,
            RelayError::Fenced => "fenced",
            RelayError::Store(_) => "database",
            _ => "other",
        }
    }
}

/// What the relay's health and metrics read.
#[derive(Debug, Default)]
pub struct RelayState {
    /// False while NATS or the database fails the relay.
    failing: AtomicBool,
    /// The revision up to which the stream is complete (as far as known).
    revision: AtomicU64,
    holds_lease: AtomicBool,
}

impl RelayState {
    pub fn is_healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Relaxed)
    }

    pub fn holds_lease(&self) -> bool {
        self.holds_lease.load(Ordering::Relaxed)
    }
}

/// The position of a relay holding the lease: the stream is complete up to
/// `revision`, and its last message is at `sequence`.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    revision: u64,
    sequence: u64,
    /// When the last message was stored (or the cursor read).
    since: Instant,
}

impl Cursor {
    fn new(revision: u64, sequence: u64) -> Cursor {
        Cursor {
            revision,
            sequence,
            since: Instant::now(),
        }
    }

    fn stored(&mut self, revision: u64, sequence: u64) {
        *self = Cursor::new(revision, sequence);
    }
}

/// How a turn holding the lease ended.
enum Turn {
    ShuttingDown,
    LeaseLost,
}

pub struct Relay {
    store: Arc<Store>,
    broker: Arc<Broker>,
    nats: JetStream,
    options: RelayOptions,
    state: Arc<RelayState>,
    metrics: Arc<RelayMetrics>,
    /// Called with the new health whenever it changes.
    on_health: Box<dyn Fn(bool) + Send + Sync>,
    shutdown: CancellationToken,
}

/// Retry delays after a failure: quick at first, then every few seconds.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

impl Relay {
    /// Connects to NATS and makes sure the stream is there and is ours;
    /// both failures are configuration errors, returned at once.
    pub async fn connect(
        store: Arc<Store>,
        broker: Arc<Broker>,
        options: RelayOptions,
        metrics: Arc<RelayMetrics>,
        on_health: Box<dyn Fn(bool) + Send + Sync>,
        shutdown: CancellationToken,
    ) -> Result<Relay, RelayError> {
        let mut nats = JetStream::connect(options.nats.clone()).await?;
        nats.ensure_stream().await?;
        let state = Arc::new(RelayState::default());
        metrics.observe(state.clone(), broker.clone());
        Ok(Relay {
            store,
            broker,
            nats,
            options,
            state,
            metrics,
            on_health,
            shutdown,
        })
    }

    pub fn state(&self) -> Arc<RelayState> {
        self.state.clone()
    }

    /// Takes turns with other replicas until shutdown, or until an error
    /// that no retry mends.
    pub async fn run(self) -> Result<(), RelayError> {
        loop {
            let Some(mut lease) = self.wait_for_lease().await else {
                return Ok(());
            };
            self.state.holds_lease.store(true, Ordering::Relaxed);
            self.metrics.lease_held.set(1);
            tracing::info!(stream = %self.options.nats.stream, "relay lease taken; publishing");
            // The relay follows the dispatcher's mark: keep it moving.
            let interest = self.broker.interest();
            // A mark left behind while nobody needed it would make a
            // reseed (--from-now) start in the past.
            if let Err(err) = self.broker.settle().await {
                tracing::warn!(error = %err, "cannot bring the event mark up to date; going on");
            }
            let turn = self.publish_while_held(&mut lease).await;
            drop(interest);
            self.state.holds_lease.store(false, Ordering::Relaxed);
            self.metrics.lease_held.set(0);
            drop(lease);
            match turn {
                Ok(Turn::ShuttingDown) => return Ok(()),
                Ok(Turn::LeaseLost) => {
                    tracing::warn!(
                        "relay lease lost (its database connection failed); standing by"
                    );
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Idle time after which a progress marker is written: a quarter of the
    /// stream's max age, at most an hour; never when messages do not expire
    /// (a max age of zero).
    fn heartbeat(&self) -> Duration {
        // The stream's own setting: an existing stream keeps the max age it
        // was made with, whatever --nats-max-age says now.
        let max_age = self.nats.max_age();
        if max_age.is_zero() {
            return Duration::MAX;
        }
        (max_age / 4).min(Duration::from_secs(3600))
    }

    fn set_health(&self, healthy: bool) {
        let was = self.state.failing.swap(!healthy, Ordering::Relaxed);
        if was == healthy {
            (self.on_health)(healthy);
        }
    }

    /// Waits until this process holds the lease; None at shutdown.
    async fn wait_for_lease(&self) -> Option<Lease> {
        let mut said = false;
        loop {
            let attempt = tokio::select! {
                attempt = self.store.try_lease(&self.options.nats.stream) => attempt,
                () = self.shutdown.cancelled() => return None,
            };
            match attempt {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) => {
                    if !said {
                        tracing::info!("another relay holds the lease; standing by");
                        said = true;
                    }
                    self.set_health(self.nats.is_connected());
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach the database for the relay lease");
                    self.set_health(false);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.options.lease_interval) => {}
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    async fn publish_while_held(&self, lease: &mut Lease) -> Result<Turn, RelayError> {
        let mut cursor: Option<Cursor> = None;
        let mut failures = 0u32;
        let mut lease_checked = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(Turn::ShuttingDown);
            }
            if lease_checked.elapsed() >= self.options.lease_interval {
                if !lease
                    .check(self.options.lease_interval.max(Duration::from_secs(1)))
                    .await
                {
                    return Ok(Turn::LeaseLost);
                }
                lease_checked = Instant::now();
            }
            // A step may wait on NATS for long (requests queue while it
            // reconnects): shutdown must not wait with it. Dropping a
            // publish in flight is safe: the fence decides if it lands.
            let step = async {
                match cursor.as_mut() {
                    None => self.start(self.options.from_now).await.map(|start| {
                        cursor = Some(start);
                    }),
                    Some(at) => self.forward(at).await,
                }
            };
            let step = tokio::select! {
                step = step => step,
                () = self.shutdown.cancelled() => return Ok(Turn::ShuttingDown),
            };
            match step {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!("relay publishing again");
                    }
                    failures = 0;
                    // Caught up and idle, nothing tells the relay NATS is
                    // gone but the client's own connection state.
                    self.set_health(self.nats.is_connected());
                }
                Err(err) if err.is_fatal() => return Err(err),
                Err(err) => {
                    self.metrics
                        .nats_errors
                        .with_label_values(&[err.operation()])
                        .inc();
                    if failures == 0 || matches!(err, RelayError::Fenced) {
                        tracing::warn!(error = %err, "relay paused; reading the stream's end again");
                    } else {
                        tracing::debug!(error = %err, "relay still paused");
                    }
                    if !matches!(err, RelayError::Fenced) {
                        self.set_health(false);
                    }
                    cursor = None;
                    let backoff = (BACKOFF.0 * 2u32.saturating_pow(failures)).min(BACKOFF.1);
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => return Ok(Turn::ShuttingDown),
                    }
                    continue;
                }
            }
            if let Some(at) = cursor.as_mut()
                && self.broker.head() <= at.revision
            {
                if at.since.elapsed() >= self.heartbeat() {
                    let prefix = &self.options.nats.subject_prefix;
                    let marker = message::marker(
                        MarkerReason::Progress,
                        at.revision,
                        at.sequence + 1,
                        prefix,
                    );
                    match self
                        .nats
                        .publish(marker, at.sequence, &PausePoint::default())
                        .await
                    {
                        Ok(sequence) => at.stored(at.revision, sequence),
                        // Read the end again, and say why.
                        Err(err) => {
                            tracing::warn!(error = %err, "relay progress marker failed");
                            cursor = None;
                        }
                    }
                    continue;
                }
                // Caught up: wait for the log to move (or the next lease check).
                tokio::select! {
                    () = self.broker.moved_past(at.revision) => {}
                    () = tokio::time::sleep(self.options.lease_interval) => {}
                    () = self.shutdown.cancelled() => return Ok(Turn::ShuttingDown),
                }
            }
        }
    }

    /// Reads where the stream ends and decides where to go on from.
    ///
    /// `--from-now` reseeds only a stream that cannot be continued (empty,
    /// emptied, or ending below what the table keeps). A stream that can be
    /// continued is continued whatever the flag says: the flag left set on
    /// a replica that takes the lease later, or a reseed marker stored
    /// whose ack was lost, must not skip the revisions since.
    async fn start(&self, from_now: bool) -> Result<Cursor, RelayError> {
        let stream = &self.options.nats.stream;
        let end = self.nats.end().await?;
        let prefix = &self.options.nats.subject_prefix;
        let compacted = self.store.compacted_revision().await?;
        let reseed = |after: u64| async move {
            let head = self.broker.head();
            let marker = message::marker(MarkerReason::Reseed, head, after + 1, prefix);
            let sequence = self
                .nats
                .publish(marker, after, &PausePoint::default())
                .await?;
            tracing::warn!(stream = %stream, revision = head, "stream reseeded: it goes on after the current revision (--from-now)");
            Ok::<_, RelayError>(Cursor::new(head, sequence))
        };
        let cursor = match end {
            StreamEnd::At {
                revision,
                sequence,
                age,
            } if revision >= compacted => {
                if from_now {
                    tracing::info!(stream = %stream, revision, "the stream can be continued: --from-now has nothing to reseed");
                }
                let mut cursor = Cursor::new(revision, sequence);
                // The last message is already `age` old: it expires that
                // much sooner, so the next progress marker is due sooner.
                cursor.since = Instant::now().checked_sub(age).unwrap_or(cursor.since);
                cursor
            }
            StreamEnd::At { sequence, .. } if from_now => reseed(sequence).await?,
            StreamEnd::At { revision, .. } => {
                return Err(RelayError::PastRetention {
                    stream: stream.clone(),
                    last: revision,
                    oldest: compacted + 1,
                });
            }
            StreamEnd::Emptied { last_sequence } if from_now => reseed(last_sequence).await?,
            StreamEnd::Emptied { last_sequence } => {
                return Err(RelayError::Emptied {
                    stream: stream.clone(),
                    last_sequence,
                });
            }
            StreamEnd::Empty if from_now => reseed(0).await?,
            StreamEnd::Empty => {
                // A new stream holds what the table still has.
                let marker = message::marker(MarkerReason::Start, compacted, 1, prefix);
                let sequence = self.nats.publish(marker, 0, &PausePoint::default()).await?;
                tracing::info!(stream = %stream, revision = compacted, "new stream: relaying the event log from the oldest event kept");
                Cursor::new(compacted, sequence)
            }
        };
        self.state
            .revision
            .store(cursor.revision, Ordering::Relaxed);
        Ok(cursor)
    }

    /// Publishes what the log holds after the cursor, up to the high-water
    /// mark, one batch.
    async fn forward(&self, at: &mut Cursor) -> Result<(), RelayError> {
        let head = self.broker.head();
        if head <= at.revision {
            return Ok(());
        }
        let batch = self.options.batch;
        let entries = self.store.read_log(at.revision, head, batch).await?;
        // Pruning removes a prefix of the log and records how far, in one
        // transaction: read after the events, a mark below the cursor
        // proves the read complete (as for Watch).
        let compacted = self.store.compacted_revision().await?;
        if compacted > at.revision {
            return Err(RelayError::PastRetention {
                stream: self.options.nats.stream.clone(),
                last: at.revision,
                oldest: compacted + 1,
            });
        }
        let covered = match entries.last() {
            Some(last) if entries.len() as u64 >= batch => last.revision,
            _ => head,
        };
        let prefix = &self.options.nats.subject_prefix;
        // `read_log` reads transactions whole: each one's end is here.
        let mut ends = std::collections::HashMap::new();
        for event in entries.iter().filter_map(|entry| entry.event.as_ref()) {
            if !event.origin.transaction_id.is_empty() {
                ends.insert(event.origin.transaction_id.clone(), event.revision);
            }
        }
        for entry in entries {
            let Some(event) = entry.event else {
                continue;
            };
            let end = ends.get(&event.origin.transaction_id).copied();
            let outgoing = message::for_event(&event, prefix, self.options.format, end);
            let sequence = self
                .nats
                .publish(outgoing, at.sequence, &self.options.pauses.sent)
                .await?;
            self.options.pauses.acked.pass().await;
            at.stored(event.revision, sequence);
            self.state.revision.store(at.revision, Ordering::Relaxed);
            self.metrics.published.inc();
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
        }
        at.revision = at.revision.max(covered);
        self.state.revision.store(at.revision, Ordering::Relaxed);
        Ok(())
    }
}
