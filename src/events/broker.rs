//! Fan-out of committed events to Watch streams.
//!
//! One dispatcher task per server tails the `events` table (woken by local
//! commits, by Postgres NOTIFY from other replicas, and by a periodic poll
//! that covers lost notifications) and broadcasts each event once. Every
//! Watch stream is a task of its own with a cursor: it catches up from the
//! table, then follows the broadcast; if it falls behind the broadcast
//! buffer it is counted and goes back to the table, so memory per stream is
//! bounded and a slow consumer never silently misses an event.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Event;
use crate::json::ValidationError;
use crate::model::Kind;
use crate::store::{Snapshot, Store, StoreError};

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
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            buffer: 1024,
            poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(10),
            batch: 512,
            stream_queue: 64,
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
}

#[derive(Clone, Debug)]
pub enum WatchItem {
    Event(Arc<Event>),
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

pub struct Broker {
    store: Arc<Store>,
    sender: broadcast::Sender<Arc<Event>>,
    head: watch::Receiver<u64>,
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
        let (head_tx, head) = watch::channel(settled);
        let wake = store.commit_notifier();
        if let Some(listener) = store.listen_for_commits().await? {
            tokio::spawn(listen(listener, wake.clone(), shutdown.clone()));
        }
        let broker = Arc::new(Broker {
            store,
            sender,
            head,
            shutdown,
            options,
            stats: BrokerStats::default(),
        });
        tokio::spawn(dispatch(broker.clone(), head_tx, wake));
        Ok(broker)
    }

    /// The last revision dispatched to live streams: the safe high-water
    /// mark, below which every committed event is known.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The high-water mark, once it has reached what was committed before
    /// this call, so that a stream "from now" does not replay the writes a
    /// client made just before it. Waits at most a second: a transaction
    /// in flight may hold the mark back, and then the stream starts lower
    /// (its first message says where).
    async fn settle_head(&self) -> Result<u64, StoreError> {
        let newest = self.store.newest_revision().await?;
        let mut head = self.head.clone();
        let reached = tokio::time::timeout(Duration::from_secs(1), head.wait_for(|h| *h >= newest));
        let _ = reached.await;
        Ok(self.head())
    }

    /// Checks the start revision, then runs the stream in its own task. The
    /// stream ends when the receiver is dropped or the server shuts down.
    pub async fn watch(
        self: &Arc<Self>,
        request: WatchRequest,
    ) -> Result<mpsc::Receiver<Result<WatchItem, WatchError>>, WatchError> {
        if self.shutdown.is_cancelled() {
            return Err(WatchError::ShuttingDown);
        }
        // Subscribe before reading the table, so nothing falls in between.
        let live = self.sender.subscribe();
        let compacted = self.store.compacted_revision().await?;
        let start_after = match request.start_revision {
            0 => self.settle_head().await?,
            n if n <= compacted => {
                return Err(WatchError::TooOld {
                    requested: n,
                    oldest: compacted + 1,
                });
            }
            n => n - 1,
        };
        let (tx, rx) = mpsc::channel(self.options.stream_queue.max(1));
        let stream = Stream {
            broker: self.clone(),
            request,
            position: start_after,
            tx,
            live,
        };
        tokio::spawn(stream.run());
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
    /// Every event up to here has been sent or filtered out.
    position: u64,
    tx: mpsc::Sender<Result<WatchItem, WatchError>>,
    live: broadcast::Receiver<Arc<Event>>,
}

/// Why a stream stops.
enum Stop {
    ClientGone,
    ShuttingDown,
    Failed(StoreError),
}

impl Stream {
    async fn run(mut self) {
        let broker = self.broker.clone();
        let _open = OpenStream::new(&broker.stats);
        let outcome = async {
            self.send(WatchItem::Progress(self.position)).await?;
            self.catch_up().await?;
            self.follow().await
        }
        .await;
        let error = match outcome {
            Ok(()) | Err(Stop::ClientGone) => return,
            Err(Stop::ShuttingDown) => WatchError::ShuttingDown,
            Err(Stop::Failed(err)) => WatchError::Store(err),
        };
        // A client that stopped reading must not hold up shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(Err(error))).await;
    }

    fn wants(&self, event: &Event) -> bool {
        event.kind() == self.request.kind
            && (self.request.ids.is_empty() || self.request.ids.contains(event.id()))
    }

    async fn send(&mut self, item: WatchItem) -> Result<(), Stop> {
        tokio::select! {
            sent = self.tx.send(Ok(item)) => sent.map_err(|_| Stop::ClientGone),
            () = self.broker.shutdown.cancelled() => Err(Stop::ShuttingDown),
        }
    }

    async fn deliver(&mut self, event: Arc<Event>) -> Result<(), Stop> {
        if event.revision <= self.position {
            return Ok(());
        }
        self.position = event.revision;
        if self.wants(&event) {
            self.send(WatchItem::Event(event)).await?;
            self.broker.stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads from the table up to the dispatcher's high-water mark (never
    /// beyond: a revision above it may still have a lower one in flight).
    async fn catch_up(&mut self) -> Result<(), Stop> {
        let store = self.broker.store.clone();
        let head = self.broker.head();
        loop {
            let batch = store
                .events_in(self.position, head, self.broker.options.batch)
                .await
                .map_err(Stop::Failed)?;
            let full = batch.len() as u64 >= self.broker.options.batch;
            for event in batch {
                self.deliver(Arc::new(event)).await?;
            }
            if !full {
                return Ok(());
            }
        }
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
                        let before = self.position;
                        self.deliver(event).await?;
                        if self.position != before {
                            idle_until = Instant::now() + interval;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.broker.stats.lagged.fetch_add(1, Ordering::Relaxed);
                        self.catch_up().await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::ShuttingDown),
                },
                () = progress => {
                    // Every broadcast event moves `position`, filtered out or
                    // not, so it is exactly what this stream has covered.
                    self.send(WatchItem::Progress(self.position)).await?;
                    idle_until = Instant::now() + interval;
                }
                () = self.broker.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                () = self.tx.closed() => return Err(Stop::ClientGone),
            }
        }
    }
}

/// Tails the table and broadcasts each new event once, in revision order,
/// never past a revision that a transaction still in flight might fill.
async fn dispatch(broker: Arc<Broker>, head: watch::Sender<u64>, wake: Arc<Notify>) {
    let mut gap: Option<Gap> = None;
    let mut last = *head.borrow();
    loop {
        let mut blocked = false;
        loop {
            let read = match broker.store.read_events(last, broker.options.batch).await {
                Ok(read) => read,
                Err(err) => {
                    tracing::warn!(error = %err, "reading events failed; retrying");
                    break;
                }
            };
            let full = read.events.len() as u64 >= broker.options.batch;
            for event in read.events {
                if event.revision != last + 1 {
                    match Gap::check(&mut gap, last, read.snapshot.as_ref(), &broker.store).await {
                        Ok(true) => {}
                        Ok(false) => blocked = true,
                        Err(err) => {
                            tracing::warn!(error = %err, "checking an event gap failed; retrying");
                            blocked = true;
                        }
                    }
                    if blocked {
                        break;
                    }
                }
                last = event.revision;
                // No receiver is not an error: nobody is watching.
                let _ = broker.sender.send(Arc::new(event));
            }
            head.send_replace(last);
            if blocked || !full {
                break;
            }
        }
        // A gap is usually a commit a moment away: look again soon.
        let wait = if blocked {
            Duration::from_millis(5)
        } else {
            broker.options.poll_interval
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = broker.shutdown.cancelled() => return,
        }
    }
}

/// A missing revision right after `after`, seen while a later one was
/// visible in `seen`. Its owner, if any, was running when `seen` was taken;
/// once every such transaction has ended, a read that still lacks the
/// revision proves it rolled back and will never appear.
#[derive(Debug)]
struct Gap {
    after: u64,
    seen: Snapshot,
    /// A transaction id assigned after `seen` was taken.
    bound: u64,
}

impl Gap {
    /// Whether the revision after `after` can be passed over for good.
    async fn check(
        gap: &mut Option<Gap>,
        after: u64,
        snapshot: Option<&Snapshot>,
        store: &Store,
    ) -> Result<bool, StoreError> {
        let Some(snapshot) = snapshot else {
            // One writer at a time: a revision missing now never appears.
            return Ok(true);
        };
        match gap {
            Some(known) if known.after == after => {
                if snapshot.covers(&known.seen, known.bound) {
                    *gap = None;
                    return Ok(true);
                }
                Ok(false)
            }
            _ => {
                let bound = store.fresh_xid().await?;
                *gap = Some(Gap {
                    after,
                    seen: snapshot.clone(),
                    bound,
                });
                Ok(false)
            }
        }
    }
}

/// Wakes the dispatcher on every NOTIFY from any replica, and after a lost
/// connection (notifications sent meanwhile are gone; the table is not).
async fn listen(
    mut listener: crate::store::CommitListener,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            next = listener.next() => {
                if let Err(err) = next {
                    tracing::warn!(error = %err, "event notifications interrupted; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                wake.notify_one();
            }
            () = shutdown.cancelled() => return,
        }
    }
}
