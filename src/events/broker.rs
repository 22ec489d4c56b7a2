//! Fan-out of committed events to Watch streams.
//!
//! One dispatcher task per server tails the event log (woken by local
//! commits, by Postgres NOTIFY from other replicas, and by a periodic poll
//! that covers lost notifications) and publishes each revision once, in
//! order, never past one that is still missing (see `store::events` for how
//! a missing revision is settled). Every Watch stream is a task of its own
//! with a cursor, `position`: it catches up from the table, then follows the
//! broadcast. Whenever what it receives does not continue from its position
//! (it fell behind the broadcast buffer, a void was passed over, events were
//! pruned) it reads the missing range from the table, so it never skips a
//! revision without a word: what the table no longer has ends the stream
//! with FAILED_PRECONDITION.
//!
//! A stream subscribes to the broadcast and reads the high-water mark in one
//! step, under the lock the dispatcher publishes under: every revision is
//! then either at or below the mark it reads (and in the table) or in its
//! receiver.
//!
//! The dispatcher reads the log only while someone needs it: a Watch
//! stream, a relay, a Watch being set up, or a List or BatchGet in the
//! last [`LINGER`] (they read as of a revision the mark has reached).
//! Otherwise commits do not
//! wake it into a read, and its mark stays where it was. Whoever needs it
//! again registers an [`Interest`] first and waits for the mark to reach
//! what was committed before; while nobody is subscribed to the broadcast
//! the dispatcher moves the mark reading revision numbers only
//! ([`Fanout::skip_to`]: never past a subscriber, checked under the lock
//! subscribers take).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::SharedEvent;
use crate::model::Event;
use crate::model::Kind;
use crate::pause::PausePoint;
use crate::query::Filter;
use crate::store::{Claim, Heard, Logged, Store, StoreError};
use crate::validation::{JsonPath, Problem, ValidationError};

/// The largest revision there can be: revisions are a database bigint.
pub const MAX_REVISION: u64 = i64::MAX as u64;

#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Events held in memory for live streams; a stream further behind reads
    /// from the table instead.
    pub buffer: usize,
    /// How often the table is polled when no notification arrives.
    pub poll_interval: Duration,
    /// Idle time after which a stream that asked for it gets a WatchProgress.
    pub progress_interval: Duration,
    /// Events read from the table per query.
    pub batch: u64,
    /// Messages queued per stream before it waits for the client.
    pub stream_queue: usize,
    /// Table reads of catching-up streams in progress at once, whatever the
    /// number of streams: replays must not take the connections writes need.
    pub replay_reads: usize,
    /// Test-only stopping places; never armed in production.
    pub pauses: BrokerPauses,
}

/// Where a test can stop the broker (see [`PausePoint`]).
#[derive(Clone, Debug, Default)]
pub struct BrokerPauses {
    /// The dispatcher, right after it published a revision.
    pub published: PausePoint,
    /// A catching-up stream, before each table read.
    pub replay_read: PausePoint,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            buffer: 1024,
            poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(10),
            batch: 512,
            stream_queue: 64,
            replay_reads: 4,
            pauses: BrokerPauses::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WatchRequest {
    pub kind: Kind,
    /// 0 = only changes after the stream starts.
    pub start_revision: u64,
    /// Empty = every id.
    pub ids: HashSet<String>,
    pub progress_notify: bool,
    /// Only events whose before or after matches (None: every event).
    pub filter: Option<Arc<Filter>>,
}

#[derive(Clone, Debug)]
pub enum WatchItem {
    Event(Arc<SharedEvent>),
    /// Every event up to this revision has been sent.
    Progress(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("revision {requested} has been pruned; the oldest available revision is {oldest}")]
    TooOld { requested: u64, oldest: u64 },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters for what happens to streams; exported as metrics later.
#[derive(Debug, Default)]
pub struct BrokerStats {
    pub open_streams: AtomicU64,
    pub lagged: AtomicU64,
    pub delivered: AtomicU64,
}

/// The broadcast and its high-water mark, changed together.
struct Fanout {
    /// The last revision published: every revision up to it is in the
    /// table, and every event above it will be broadcast.
    head: Mutex<u64>,
    sender: broadcast::Sender<Arc<SharedEvent>>,
    /// Follows `head`, for those who wait for it to move.
    moved: watch::Sender<u64>,
}

impl Fanout {
    fn head(&self) -> u64 {
        *self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of every event published after this call, and the mark
    /// at that moment.
    fn subscribe(&self) -> (broadcast::Receiver<Arc<SharedEvent>>, u64) {
        let head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        (self.sender.subscribe(), *head)
    }

    /// Moves the mark to `revision` without its event, only while nobody is
    /// subscribed: false (and nothing moves) once somebody is, and the
    /// event must then be read and published.
    fn skip_to(&self, revision: u64) -> bool {
        {
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            if self.sender.receiver_count() > 0 {
                return false;
            }
            *head = revision;
        }
        self.moved.send_replace(revision);
        true
    }

    fn subscribed(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Publishes `revision`: the mark moves and its event, if it has one
    /// (a void has none), is broadcast, as one step.
    fn publish(&self, revision: u64, event: Option<Event>) {
        self.publish_all(revision, event.into_iter().collect());
    }

    /// Publishes every revision up to `revision`, whose events (a
    /// transaction's, consecutive) are `events`, as one step: nobody sees
    /// the mark inside a transaction, and a subscriber finds all of its
    /// events in its receiver or none.
    fn publish_all(&self, revision: u64, events: Vec<Event>) {
        {
            let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            *head = revision;
            for event in events {
                // No receiver is not an error: nobody is watching.
                let _ = self.sender.send(Arc::new(SharedEvent::new(event)));
            }
        }
        self.moved.send_replace(revision);
    }
}

/// How long a List or BatchGet keeps the dispatcher reading after it: their
/// revision is one the mark must reach, and a client that pages
/// through a listing should not pay for waking the dispatcher every page.
pub const LINGER: Duration = Duration::from_secs(10);

/// How long a read waits for the revisions below the one it reads as of
/// to settle: a writer holds one back for at most its statement timeout.
pub const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Who needs the dispatcher to read the log, besides subscribers.
#[derive(Default)]
struct Demand {
    /// Relays, and Watch streams being set up.
    interests: std::sync::atomic::AtomicUsize,
    /// Until when a List or BatchGet keeps it reading.
    linger_until: Mutex<Option<Instant>>,
    /// Raised when demand appears.
    changed: Notify,
    /// The dispatcher read the log since its last wake-up (its mark is as
    /// fresh as a following dispatcher's).
    following: std::sync::atomic::AtomicBool,
}

/// Keeps the dispatcher reading the log while held; registered on creation,
/// unregistered on drop.
pub struct Interest(Arc<Broker>);

impl Drop for Interest {
    fn drop(&mut self) {
        self.0.demand.interests.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Broker {
    store: Arc<Store>,
    fanout: Fanout,
    demand: Demand,
    /// Permits for the table reads of catching-up streams.
    replay: Semaphore,
    shutdown: CancellationToken,
    options: BrokerOptions,
    pub stats: BrokerStats,
}

impl Broker {
    /// Starts the dispatcher after the newest revision below which nothing
    /// can commit any more.
    pub async fn start(
        store: Arc<Store>,
        options: BrokerOptions,
        shutdown: CancellationToken,
    ) -> Result<Arc<Broker>, StoreError> {
        let settled = store.settled_revision(Duration::from_secs(5)).await?;
        let (sender, _) = broadcast::channel(options.buffer.max(1));
        let (moved, _) = watch::channel(settled);
        let wake = store.commit_notifier();
        if let Some(listener) = store.listen_for_commits().await? {
            tokio::spawn(listen(listener, wake.clone(), shutdown.clone()));
        }
        if let Some(announcer) = store.commit_announcer() {
            tokio::spawn(announcer.run(shutdown.clone()));
        }
        let broker = Arc::new(Broker {
            store,
            fanout: Fanout {
                head: Mutex::new(settled),
                sender,
                moved,
            },
            replay: Semaphore::new(options.replay_reads.max(1)),
            demand: Demand::default(),
            shutdown,
            options,
            stats: BrokerStats::default(),
        });
        tokio::spawn(dispatch(broker.clone(), wake));
        Ok(broker)
    }

    /// The last revision dispatched to live streams: the safe high-water
    /// mark, below which every committed event is known. While nobody needs
    /// the dispatcher it stays where it was: see [`Broker::read_revision`].
    pub fn head(&self) -> u64 {
        self.fanout.head()
    }

    /// Keeps the dispatcher reading the log until dropped.
    pub fn interest(self: &Arc<Self>) -> Interest {
        self.demand.interests.fetch_add(1, Ordering::SeqCst);
        self.demand.changed.notify_one();
        Interest(self.clone())
    }

    /// The revision a List or BatchGet reads as of: everything at or below
    /// it is settled (nothing there can still commit), and it is at least
    /// every revision committed before this call, on any replica, so that
    /// the read shows every acknowledged write. The read then shows each
    /// record exactly as of it (`Store::get_many_at`, `Store::list_at`),
    /// and a Watch from the next revision sends every later change, none
    /// twice. Keeps the dispatcher reading for [`LINGER`], so that the
    /// next pages find it there.
    pub async fn read_revision(self: &Arc<Self>) -> Result<u64, StoreError> {
        self.linger();
        let target = if self.store.shared() {
            // Other replicas commit too: the log says how far they went.
            let (newest, compacted) = self.store.log_bounds().await?;
            newest.max(compacted)
        } else {
            // One process writes: what it committed, or what was there at
            // start (the mark begins there and only grows).
            self.store.committed_here().max(self.head())
        };
        self.reach(target).await?;
        Ok(target)
    }

    /// `revision` itself, once settled, for a read as of it: OUT_OF_RANGE
    /// past the newest revision in the log, FAILED_PRECONDITION below what
    /// was pruned.
    pub async fn settled_at(self: &Arc<Self>, revision: u64) -> Result<u64, StoreError> {
        if revision <= self.head() {
            // Settled already, and reached: no query. Whether it was
            // pruned, the read learns with its rows (`Store::get_many_at`).
            return Ok(revision);
        }
        let (newest, compacted) = self.store.log_bounds().await?;
        let current = newest.max(compacted);
        if revision > current {
            return Err(StoreError::RevisionNotReached {
                requested: revision,
                current,
            });
        }
        if revision < compacted {
            return Err(StoreError::RevisionCompacted {
                requested: revision,
                oldest: compacted,
            });
        }
        self.linger();
        self.reach(revision).await?;
        Ok(revision)
    }

    /// Keeps the dispatcher reading for [`LINGER`] from now, waking it if
    /// it was idle.
    fn linger(&self) {
        let until = Instant::now() + LINGER;
        let was_idle = {
            let mut linger = self
                .demand
                .linger_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let was_idle = linger.is_none_or(|t| t <= Instant::now());
            *linger = Some(until);
            was_idle
        };
        if was_idle {
            self.demand.changed.notify_one();
        }
    }

    /// Waits until the mark is at `target` or past it: every revision up
    /// to it settled. UNAVAILABLE after [`SETTLE_WAIT`]: a writer in flight
    /// below it holds the log back for longer than a read should wait.
    async fn reach(self: &Arc<Self>, target: u64) -> Result<(), StoreError> {
        let _interest = self.interest();
        let mut moved = self.fanout.moved.subscribe();
        let reached = tokio::time::timeout(SETTLE_WAIT, moved.wait_for(|h| *h >= target));
        tokio::select! {
            reached = reached => match reached {
                Ok(_) => Ok(()),
                Err(_) => Err(StoreError::Unavailable {
                    reason: "the event log is held back by a write in flight",
                    detail: format!(
                        "the mark stayed at {} below revision {target} for {SETTLE_WAIT:?}",
                        self.head()
                    ),
                }),
            },
            // The dispatcher stops with the server; the sender lives on
            // with the broker, so the wait alone would not end.
            () = self.shutdown.cancelled() => Err(StoreError::ShuttingDown),
        }
    }

    /// The mark once it has reached what was committed before this call
    /// (waiting at most a second), for a caller that starts from it.
    pub async fn settle(self: &Arc<Self>) -> Result<u64, StoreError> {
        let _interest = self.interest();
        self.settle_head().await
    }

    /// Whether the dispatcher must read the log.
    fn wanted(&self) -> bool {
        self.fanout.subscribed()
            || self.demand.interests.load(Ordering::SeqCst) > 0
            || self
                .demand
                .linger_until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t > Instant::now())
    }

    /// Whether the dispatcher is reading the log (for the delivery lag,
    /// which means nothing while it does not).
    pub fn following(&self) -> bool {
        self.demand.following.load(Ordering::SeqCst)
    }

    /// Resolves once the high-water mark is above `revision`, or at
    /// shutdown.
    pub async fn moved_past(&self, revision: u64) {
        let mut moved = self.fanout.moved.subscribe();
        tokio::select! {
            _ = moved.wait_for(|head| *head > revision) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// The high-water mark, once it has reached what was committed before
    /// this call, so that a stream "from now" does not replay the writes a
    /// client made just before it. Waits at most a second: a transaction
    /// in flight may hold the mark back, and then the stream starts lower
    /// (its first message says where).
    async fn settle_head(&self) -> Result<u64, StoreError> {
        // A log pruned empty still had its revisions: the mark goes up to
        // the compaction mark at least.
        let newest = self
            .store
            .newest_revision()
            .await?
            .max(self.store.compacted_revision().await?);
        let mut moved = self.fanout.moved.subscribe();
        let reached =
            tokio::time::timeout(Duration::from_secs(1), moved.wait_for(|h| *h >= newest));
        let _ = reached.await;
        Ok(self.head())
    }

    /// Checks the start revision, then runs the stream in its own task. The
    /// stream ends when the receiver is dropped or the server shuts down.
    pub async fn watch(
        self: &Arc<Self>,
        request: WatchRequest,
    ) -> Result<mpsc::Receiver<Result<WatchItem, WatchError>>, WatchError> {
        if request.start_revision > MAX_REVISION {
            return Err(ValidationError::new(
                JsonPath::root("start_revision"),
                Problem::RevisionTooLarge {
                    limit: MAX_REVISION,
                },
            )
            .into());
        }
        if self.shutdown.is_cancelled() {
            return Err(WatchError::ShuttingDown);
        }
        // The dispatcher may be idle, its mark behind: bring it up to what
        // was committed before this call, then subscribe.
        let interest = self.interest();
        let settled = self.settle_head().await?;
        let compacted = self.store.compacted_revision().await?;
        let position = match request.start_revision {
            // Never below what was pruned: a stream "from now" must not
            // meet a jump it would have to report as too old.
            0 => settled.max(compacted),
            n => {
                if n <= compacted {
                    return Err(WatchError::TooOld {
                        requested: n,
                        oldest: compacted + 1,
                    });
                }
                n - 1
            }
        };
        let (live, head) = self.fanout.subscribe();
        // The receiver keeps the dispatcher reading from here on.
        drop(interest);
        let position = match request.start_revision {
            0 => position.max(head),
            _ => position,
        };
        let (tx, rx) = mpsc::channel(self.options.stream_queue.max(1));
        let stream = Stream {
            broker: self.clone(),
            request,
            position,
            tx,
            live,
            sent: 0,
            trace: if crate::otel::exporting() {
                tracing::Span::current()
            } else {
                tracing::Span::none()
            },
        };
        tokio::spawn(stream.run(head));
        Ok(rx)
    }
}

/// Counts itself in `open_streams` for as long as it lives.
struct OpenStream<'a>(&'a BrokerStats);

impl<'a> OpenStream<'a> {
    fn new(stats: &'a BrokerStats) -> Self {
        stats.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(stats)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Stream {
    broker: Arc<Broker>,
    request: WatchRequest,
    /// Every revision up to here has been sent or filtered out.
    position: u64,
    tx: mpsc::Sender<Result<WatchItem, WatchError>>,
    live: broadcast::Receiver<Arc<SharedEvent>>,
    /// Events sent so far: a stream is idle, for progress messages, while
    /// this does not move, however many filtered-out events pass.
    sent: u64,
    /// The Watch call's span, when traced: each delivery is a child of it.
    trace: tracing::Span,
}

/// Why a stream stops.
enum Stop {
    ClientGone,
    ShuttingDown,
    /// What it must send next has been pruned.
    TooOld {
        requested: u64,
        oldest: u64,
    },
    Failed(StoreError),
}

impl Stream {
    /// `head`: the mark when the stream subscribed; everything up to it
    /// comes from the table, the rest from the broadcast.
    async fn run(mut self, head: u64) {
        let broker = self.broker.clone();
        let _open = OpenStream::new(&broker.stats);
        let outcome = async {
            self.send(WatchItem::Progress(self.position)).await?;
            self.catch_up(head).await?;
            self.follow().await
        }
        .await;
        let error = match outcome {
            Ok(()) | Err(Stop::ClientGone) => return,
            Err(Stop::ShuttingDown) => WatchError::ShuttingDown,
            Err(Stop::TooOld { requested, oldest }) => WatchError::TooOld { requested, oldest },
            Err(Stop::Failed(err)) => WatchError::Store(err),
        };
        // A client that stopped reading must not hold up shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(Err(error))).await;
    }

    fn wants(&self, event: &Event) -> bool {
        event.kind() == self.request.kind
            && (self.request.ids.is_empty() || self.request.ids.contains(event.id()))
            && self
                .request
                .filter
                .as_ref()
                .is_none_or(|filter| filter.matches_change(&event.before, &event.after))
    }

    async fn send(&mut self, item: WatchItem) -> Result<(), Stop> {
        tokio::select! {
            sent = self.tx.send(Ok(item)) => sent.map_err(|_| Stop::ClientGone),
            () = self.broker.shutdown.cancelled() => Err(Stop::ShuttingDown),
        }
    }

    /// Sends `event` if it is the stream's next revision and it wants it.
    async fn deliver(&mut self, event: Arc<SharedEvent>) -> Result<(), Stop> {
        if event.revision <= self.position {
            return Ok(());
        }
        self.position = event.revision;
        if self.wants(&event) {
            let span = tracing::info_span!(
                target: crate::otel::TARGET,
                parent: &self.trace,
                "watch.deliver",
                revision = event.revision as i64,
            );
            self.send(WatchItem::Event(event)).instrument(span).await?;
            self.sent += 1;
            self.broker.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends every event after `position` up to `up_to` that the stream
    /// wants, from the table (filtered there). `up_to` is at most the
    /// high-water mark, so the range is complete in the table unless it
    /// was pruned, which ends the stream. Checks for a
    /// client that left and for shutdown before every read, so a replay
    /// that sends nothing still ends with its client.
    async fn catch_up(&mut self, up_to: u64) -> Result<(), Stop> {
        let broker = self.broker.clone();
        while self.position < up_to {
            broker.options.pauses.replay_read.pass().await;
            let permit = tokio::select! {
                biased;
                () = self.tx.closed() => return Err(Stop::ClientGone),
                () = broker.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                permit = broker.replay.acquire() => permit.map_err(|_| Stop::ShuttingDown)?,
            };
            let batch = broker.options.batch;
            let span = tracing::info_span!(
                target: crate::otel::TARGET,
                parent: &self.trace,
                "watch.catch_up",
                from = (self.position + 1) as i64,
                to = up_to as i64,
                events = tracing::field::Empty,
            );
            let read = broker
                .store
                .read_events_of(
                    self.request.kind,
                    &self.request.ids,
                    self.position,
                    up_to,
                    batch,
                )
                .instrument(span.clone())
                .await;
            drop(permit);
            let events = read.map_err(Stop::Failed)?;
            span.record("events", events.len() as i64);
            // Pruning removes a prefix of the log and records how far it
            // went, in one transaction: read after the events, a mark below
            // the position proves the read was complete.
            let expected = self.position + 1;
            let compacted = broker
                .store
                .compacted_revision()
                .await
                .map_err(Stop::Failed)?;
            if compacted >= expected {
                return Err(Stop::TooOld {
                    requested: expected,
                    oldest: compacted + 1,
                });
            }
            // A short read covered the whole range; a full one, up to its
            // last event.
            let covered = match events.last() {
                Some(last) if events.len() as u64 >= batch => last.revision,
                _ => up_to,
            };
            for event in events {
                self.deliver(Arc::new(SharedEvent::new(event))).await?;
            }
            self.position = self.position.max(covered);
            if self.tx.is_closed() {
                return Err(Stop::ClientGone);
            }
        }
        Ok(())
    }

    async fn follow(&mut self) -> Result<(), Stop> {
        let interval = self.broker.options.progress_interval;
        let mut idle_until = Instant::now() + interval;
        loop {
            let progress = async {
                if self.request.progress_notify {
                    tokio::time::sleep_until(idle_until).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(event) => {
                        let sent = self.sent;
                        if event.revision > self.position + 1 {
                            // A void, or a range this stream missed: the
                            // table has it (or says it was pruned).
                            self.catch_up(event.revision - 1).await?;
                        }
                        self.deliver(event).await?;
                        // Progress is due after an interval without an
                        // event sent: events filtered out move the
                        // position it reports, not the clock.
                        if self.sent != sent {
                            idle_until = Instant::now() + interval;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.broker.stats.lagged.fetch_add(1, Ordering::Relaxed);
                        // Everything up to the mark is in the table; what
                        // is published after it is still in the receiver.
                        let head = self.broker.head();
                        self.catch_up(head).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::ShuttingDown),
                },
                () = progress => {
                    // Every published revision moves `position`, filtered
                    // out or not, so it is exactly what this stream has
                    // covered.
                    self.send(WatchItem::Progress(self.position)).await?;
                    idle_until = Instant::now() + interval;
                }
                () = self.broker.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                () = self.tx.closed() => return Err(Stop::ClientGone),
            }
        }
    }
}

/// What the dispatcher does after one read of the log.
enum Next {
    /// Read again at once: there may be more.
    More,
    /// Wait for a wake-up or the poll.
    Idle,
    /// A revision is still missing: look again soon.
    Soon,
    /// The read failed this many times in a row.
    Failed(u32),
}

/// Tails the log and publishes each revision once, in order, never past
/// one that a transaction still in flight might fill.
async fn dispatch(broker: Arc<Broker>, wake: Arc<Notify>) {
    let mut last = broker.head();
    let mut gap = None;
    let mut was_idle = false;
    let mut failures = 0u32;
    loop {
        if !broker.wanted() {
            // Nobody needs the log read: commits wake nothing until
            // somebody does.
            broker.demand.following.store(false, Ordering::SeqCst);
            tokio::select! {
                () = broker.demand.changed.notified() => {}
                () = broker.shutdown.cancelled() => return,
            }
            was_idle = true;
            continue;
        }
        if was_idle {
            match pass_pruned(&broker, &mut last).await {
                Ok(()) => was_idle = false,
                Err(err) => {
                    tracing::warn!(error = %err, "reading the compaction mark failed; retrying")
                }
            }
        }
        let next = match dispatch_once(&broker, &mut last, &mut gap).await {
            Ok(next) => {
                if matches!(next, Next::Idle) {
                    broker.demand.following.store(true, Ordering::SeqCst);
                }
                next
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %err, "reading events failed; retrying");
                } else {
                    tracing::debug!(error = %err, "reading events still fails; retrying");
                }
                Next::Failed(failures)
            }
        };
        if !matches!(next, Next::Failed(_)) {
            failures = 0;
        }
        let wait = match next {
            Next::More => continue,
            Next::Idle => broker.options.poll_interval,
            Next::Soon => GAP_GRACE,
            // A database that refuses connections answers at once: back
            // off, up to the poll's interval, rather than retry 100 times a
            // second.
            Next::Failed(n) => (GAP_GRACE * 2u32.saturating_pow(n.min(16)))
                .min(broker.options.poll_interval.max(GAP_GRACE)),
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = broker.demand.changed.notified() => {}
            () = broker.shutdown.cancelled() => return,
        }
    }
}

/// Revisions read per query while the mark moves without events: numbers
/// only, so many at a time.
const SKIP_BATCH: u64 = 8192;

/// After an idle spell: events pruned meanwhile can no longer be read, and
/// with none left above them no gap would show it. The mark goes past
/// them at once (a stream that needed them meets the jump and ends with
/// FAILED_PRECONDITION, as when they are pruned under it).
async fn pass_pruned(broker: &Broker, last: &mut u64) -> Result<(), StoreError> {
    let compacted = broker.store.compacted_revision().await?;
    if compacted > *last {
        *last = compacted;
        broker.fanout.publish(compacted, None);
    }
    Ok(())
}

/// A missing revision, and when the dispatcher first found it missing.
struct Gap {
    revision: u64,
    since: Instant,
}

/// How long a missing revision may stay missing before the dispatcher
/// settles it itself. Under load a lower revision often commits a moment
/// after a higher one; a re-read (woken by that commit) is cheaper than a
/// claim, which is for writers that stall or roll back.
const GAP_GRACE: Duration = Duration::from_millis(10);

async fn dispatch_once(
    broker: &Broker,
    last: &mut u64,
    gap: &mut Option<Gap>,
) -> Result<Next, StoreError> {
    // Nobody subscribed: the events would be read and decoded for nobody.
    // Revision numbers are enough to move the mark, gaps settled the same.
    let subscribed = broker.fanout.subscribed();
    let (entries, batch) = if subscribed {
        let batch = broker.options.batch;
        (broker.store.read_log(*last, u64::MAX, batch).await?, batch)
    } else {
        let revisions = broker.store.read_revisions(*last, SKIP_BATCH).await?;
        let entries = revisions
            .into_iter()
            .map(|revision| Logged {
                revision,
                event: None,
            })
            .collect();
        (entries, SKIP_BATCH)
    };
    let full = entries.len() as u64 >= batch;
    let mut entries = entries.into_iter().peekable();
    while let Some(Logged { revision, event }) = entries.next() {
        if revision != *last + 1 {
            let missing = *last + 1;
            match gap {
                Some(seen) if seen.revision == missing && seen.since.elapsed() >= GAP_GRACE => {}
                Some(seen) if seen.revision == missing => return Ok(Next::Soon),
                _ => {
                    *gap = Some(Gap {
                        revision: missing,
                        since: Instant::now(),
                    });
                    return Ok(Next::Soon);
                }
            }
            return settle_gap(broker, last, revision).await;
        }
        if subscribed {
            // A transaction's events (consecutive, and read whole by
            // `read_log`) go out together.
            let mut published = revision;
            let mut events: Vec<Event> = event.into_iter().collect();
            let transaction = events
                .first()
                .map(|e| e.origin.transaction_id.clone())
                .unwrap_or_default();
            while !transaction.is_empty()
                && let Some(next) = entries.next_if(|next| {
                    next.revision == published + 1
                        && next
                            .event
                            .as_ref()
                            .is_some_and(|e| e.origin.transaction_id == transaction)
                })
            {
                published = next.revision;
                events.extend(next.event);
            }
            broker.fanout.publish_all(published, events);
            *last = published;
        } else if !broker.fanout.skip_to(revision) {
            // Somebody subscribed meanwhile: from this revision on, every
            // event is read and published.
            return Ok(Next::More);
        } else {
            *last = revision;
        }
        broker.options.pauses.published.pass().await;
    }
    Ok(if full { Next::More } else { Next::Idle })
}

/// The revision after `last` is missing while `visible`, a later one, is
/// in the log.
async fn settle_gap(broker: &Broker, last: &mut u64, visible: u64) -> Result<Next, StoreError> {
    let missing = *last + 1;
    let compacted = broker.store.compacted_revision().await?;
    if compacted >= missing {
        // Pruned before it was published (the dispatcher was behind by
        // more than the retention). Streams see the jump and end with
        // FAILED_PRECONDITION when they reach it.
        let skipped_to = compacted.min(visible - 1);
        tracing::warn!(
            from = missing,
            to = skipped_to,
            "events were pruned before they were dispatched"
        );
        *last = skipped_to;
        broker.fanout.publish(skipped_to, None);
        return Ok(Next::More);
    }
    if broker.store.revisions_dense() {
        // One writer at a time: a revision missing below a visible one was
        // never committed and never will be.
        *last = visible - 1;
        broker.fanout.publish(*last, None);
        return Ok(Next::More);
    }
    match broker
        .store
        .claim_revision(missing, Duration::from_secs(1))
        .await?
    {
        Claim::Settled => Ok(Next::More),
        Claim::Owned => Ok(Next::Soon),
    }
}

/// Wakes the dispatcher on every NOTIFY from any replica, and after a lost
/// connection (notifications sent meanwhile are gone; the table is not).
/// Ends quietly when the server stops: a closed pool is not a lost
/// connection to reconnect from (it never reopens, and closing it waits for
/// the connection this task holds), and an error seen once shutdown began
/// is its consequence, not a fault.
async fn listen(
    mut listener: crate::store::CommitListener,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        // Biased: once shutdown began, an error ready at the same time must
        // not be reported as a fault.
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            next = listener.next() => next,
        };
        match next {
            Ok(Heard::Commits) => {}
            Ok(Heard::Closed) => {
                tracing::debug!("event notifications end: the database pool is closed");
                return;
            }
            Err(err) if shutdown.is_cancelled() => {
                tracing::debug!(error = %err, "event notifications end: shutting down");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "event notifications interrupted; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
        wake.notify_one();
    }
}
