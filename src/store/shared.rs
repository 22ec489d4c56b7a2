//! What both backends share: the pool for everything off the hot paths,
//! this process's schema cache, the test pause points, the metrics a
//! write reports, and the signal raised after every commit.

use std::sync::{Arc, OnceLock};

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

use super::StorePauses;
use super::schemas::SchemaCache;

pub(super) struct Shared {
    /// sea-orm's pool: migrations, schemas, queries, pruning, claims.
    pub db: DatabaseConnection,
    /// The compiled schemas writes are checked against.
    pub schemas: SchemaCache,
    pub pauses: StorePauses,
    pub commits: Commits,
    /// Where the time to begin a write transaction is recorded, if anywhere.
    pub acquire_timer: OnceLock<prometheus::Histogram>,
    /// Where the size of each SQLite write group is recorded, if anywhere.
    pub group_sizes: OnceLock<prometheus::Histogram>,
    /// The newest revision this process committed.
    pub committed_here: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn new(db: DatabaseConnection, pauses: StorePauses) -> Arc<Self> {
        Arc::new(Shared {
            db,
            schemas: SchemaCache::default(),
            pauses,
            commits: Commits::default(),
            acquire_timer: OnceLock::new(),
            group_sizes: OnceLock::new(),
            committed_here: Default::default(),
        })
    }
}

/// Raised after every commit of this store: wakes this server's event
/// dispatcher, and its announcer (Postgres) which tells the other replicas.
/// Each is a `Notify` holding at most one pending wake-up, so a burst of
/// commits while either is busy costs it one more round, not one per commit.
#[derive(Clone, Default)]
pub(super) struct Commits {
    pub local: Arc<Notify>,
    pub announce: Arc<Notify>,
}

impl Commits {
    pub fn committed(&self) {
        self.local.notify_one();
        self.announce.notify_one();
    }
}
