//! Storage: SQLite (embedded default) or Postgres, behind one facade.
//!
//! Each backend is a folder holding its whole concurrency design:
//! `sqlite/` (one process, a committer that writes in groups, a counter
//! row for revisions) and `postgres/` (many replicas, a sequence and
//! advisory locks for revisions, voids, LISTEN/NOTIFY, the relay's lease).
//! Around them, what both share:
//! - `write.rs`: what a write is and what it decides before storing;
//! - `rows.rs`: rows to records and events, and back;
//! - `reads.rs`: point reads, batched under load and inline when alone;
//! - `conns.rs`: hot-path connections that sqlx never pings on release;
//! - `log.rs`: the event log and who hears of it (the facade's calls for
//!   the dispatcher, Watch and the relay);
//! - `queries.rs`: List and schemas (the facade's calls);
//! - `history.rs`: one record's events, and reads as of a revision;
//! - `transaction.rs`: several writes, all applied or none;
//! - `webhooks.rs`: webhook endpoints and where their deliveries are;
//! - `schemas.rs`, `sql.rs` (a filter as SQL, per dialect),
//!   `migration.rs`, `entities/`, `error.rs`.
//!
//! Nothing outside this folder asks which backend runs; it asks what the
//! store guarantees ([`Store::revisions_dense`], [`Store::shared`]).

mod conns;
mod entities;
mod error;
mod history;
mod log;
mod migration;
mod postgres;
mod queries;
mod reads;
mod requests;
mod rows;
mod schemas;
mod shared;
pub(crate) mod sql;
mod sqlite;
mod transaction;
mod webhooks;
mod write;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{ConnectOptions, Database, DatabaseBackend};
use sea_orm_migration::MigratorTrait;
use tracing::Instrument;

pub use error::{StoreError, redact_url};
pub use history::{HistoryRead, ListedAt};
pub use log::Claim;
pub use postgres::{
    ANNOUNCER_APPLICATION_NAME, AnnouncerState, CommitAnnouncer, CommitListener, Heard,
    LEASE_APPLICATION_NAME, Lease, take_revision_sql,
};

pub use rows::Logged;
pub use schemas::{MAX_LISTED_IDS, Nonconforming, SetSchema, StoredSchema};
pub use transaction::{Committed, RequestKey, TxnAction, TxnDone, TxnOp};
pub use webhooks::{Failure, NewWebhook, StoredWebhook, WebhookUpdate};
pub use write::{Compute, Sent, WriteOutcome};

use crate::model::{ChangeType, Field, Kind, Origin, Record};
use crate::pause::PausePoint;
use shared::Shared;
use write::{Done, Op};

/// Connection settings, from the command line.
/// Connections each backend keeps for history pages (outside sqlx's pool,
/// so never pinged on release): pages past these wait for one.
const PAGE_CONNECTIONS: u32 = 4;

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Connections of the pool, and as many again for the hot paths.
    pub max_connections: u32,
    /// How long to wait for a connection, at start and for every call.
    pub connect_timeout: Duration,
    /// How long SQLite waits on a lock held by another process.
    pub sqlite_busy_timeout: Duration,
    /// Test-only stopping places; never armed in production.
    pub pauses: StorePauses,
}

/// Where a test can stop the store (see [`PausePoint`]).
#[derive(Clone, Debug, Default)]
pub struct StorePauses {
    /// A write transaction, right before its COMMIT is sent.
    pub commit: PausePoint,
    /// The commit announcer (Postgres), right before it sends a NOTIFY.
    pub announce: PausePoint,
    /// SetSchema, after its check, right before its COMMIT.
    pub set_schema: PausePoint,
    /// A transaction (Commit), between two of its writes: some of its
    /// records written, the others not yet, nothing committed.
    pub transaction_step: PausePoint,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            sqlite_busy_timeout: Duration::from_secs(5),
            pauses: StorePauses::default(),
        }
    }
}

/// Connections of the pool at one moment.
#[derive(Clone, Copy, Debug)]
pub struct PoolStatus {
    pub size: u32,
    pub idle: usize,
    pub max: u32,
}

pub struct Store {
    shared: Arc<Shared>,
    backend: Backend,
    /// Events read by history pages (`history.rs`).
    events: history::EventCache,
    max_connections: u32,
}

/// A closed set of two, matched where they differ: no dynamic dispatch on
/// the hot paths, and a third backend is a compile error until handled.
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

impl Store {
    /// Connects to the database and applies the migrations: what the
    /// server and the relay do first.
    pub async fn open(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        use anyhow::Context;
        let store = match Store::connect(url, options).await {
            Ok(store) => store,
            Err(err) => anyhow::bail!("{}", connect_failure(url, options, &err).await),
        };
        store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
        Ok(store)
    }

    /// Connects to the database, without migrating.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let mut connect = ConnectOptions::new(url);
        connect
            .max_connections(options.max_connections)
            .min_connections(1)
            .connect_timeout(options.connect_timeout)
            .acquire_timeout(options.connect_timeout)
            // sqlx pings every connection it takes from the pool by default:
            // a second round trip for every call. Only a connection idle for
            // a while is checked; the health monitor pings every
            // --db-health-interval.
            .test_before_acquire_if_idle_for(Duration::from_secs(10))
            .sqlx_logging(false);
        let busy_timeout = options.sqlite_busy_timeout;
        connect.map_sqlx_sqlite_opts(move |sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(busy_timeout)
        });
        let db = Database::connect(connect)
            .await
            .map_err(|err| StoreError::from(err).redacting(url))?;
        let postgres = db.get_database_backend() == DatabaseBackend::Postgres;
        let shared = Shared::new(db, options.pauses.clone());
        let backend = match postgres {
            true => Backend::Postgres(postgres::Postgres::new(shared.clone(), options)),
            false => Backend::Sqlite(sqlite::Sqlite::new(shared.clone(), options)),
        };
        Ok(Store {
            shared,
            backend,
            events: history::EventCache::new(),
            max_connections: options.max_connections,
        })
    }

    /// Records the time each write waits for a connection and its BEGIN,
    /// and how many writes share each SQLite transaction.
    pub fn instrument(&self, acquire: prometheus::Histogram, group_size: prometheus::Histogram) {
        let _ = self.shared.acquire_timer.set(acquire);
        let _ = self.shared.group_sizes.set(group_size);
    }

    /// Whether every revision up to the newest committed one is in the log
    /// as soon as it is visible (one writer at a time), so that a revision
    /// missing below a visible one was never committed. False where
    /// writers commit concurrently and a gap must be settled
    /// ([`Store::claim_revision`]).
    pub fn revisions_dense(&self) -> bool {
        matches!(self.backend, Backend::Sqlite(_))
    }

    /// Whether several processes may use this database at once (replicas,
    /// a relay process of its own).
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    pub fn pool_status(&self) -> Option<PoolStatus> {
        let (size, idle) = match self.backend {
            Backend::Postgres(_) => {
                let pool = self.shared.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            Backend::Sqlite(_) => {
                let pool = self.shared.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
        };
        Some(PoolStatus {
            size,
            idle,
            max: self.max_connections,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        migration::Migrator::up(&self.shared.db, None)
            .await
            .map_err(StoreError::from)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.shared.db.ping().await.map_err(StoreError::from)
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.close_pool().await;
        Ok(())
    }

    /// Closes every connection while others may still hold the store:
    /// their next call fails with UNAVAILABLE.
    pub async fn close_pool(&self) {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.close().await,
            Backend::Postgres(postgres) => postgres.close().await,
        }
        self.shared.db.close_by_ref().await.ok();
    }

    pub async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.get(kind, id).await,
            Backend::Postgres(postgres) => postgres.get(kind, id).await,
        }
    }

    /// Merges or replaces: reads the row, checks `expected_version`,
    /// computes the new fields with `compute` (which may run more than
    /// once), checks them against their schemas (`provided`: the fields
    /// the write gives), writes them and appends the event, atomically.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        kind: Kind,
        id: &str,
        expected_version: Option<u64>,
        change: ChangeType,
        provided: Vec<Field>,
        compute: Compute,
        sent: Sent,
        origin: Origin,
    ) -> Result<WriteOutcome, StoreError> {
        let id = id.to_owned();
        let op = Op::Write {
            kind,
            id,
            expected_version,
            change,
            provided,
            compute,
            sent,
            origin,
        };
        // Kind and change only: the request span already has the id, and a
        // trace never carries metadata.
        let span = tracing::info_span!(
            target: crate::otel::TARGET,
            "store.write",
            kind = kind.as_str(),
            change = change.as_str(),
            revision = tracing::field::Empty,
        );
        match self.submit(op).instrument(span.clone()).await? {
            Done::Written(outcome) => {
                // As i64: OTLP has no unsigned integers.
                span.record("revision", outcome.record.revision as i64);
                Ok(outcome)
            }
            Done::Deleted(..) => Err(StoreError::Internal("a write answered as a delete".into())),
        }
    }

    /// Removes all metadata of the id; returns whether anything was stored.
    /// The row stays as a tombstone (version 0, `{}` fields) carrying the
    /// delete's revision.
    pub async fn delete(
        &self,
        kind: Kind,
        id: &str,
        expected_version: Option<u64>,
        sent: Sent,
        origin: Origin,
    ) -> Result<bool, StoreError> {
        let op = Op::Delete {
            kind,
            id: id.to_owned(),
            expected_version,
            sent,
            origin,
        };
        let span =
            tracing::info_span!(target: crate::otel::TARGET, "store.delete", kind = kind.as_str());
        match self.submit(op).instrument(span).await? {
            Done::Deleted(existed, _) => Ok(existed),
            Done::Written(_) => Err(StoreError::Internal("a delete answered as a write".into())),
        }
    }

    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let done = match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.submit(op).await,
            Backend::Postgres(postgres) => postgres.submit(op).await,
        }?;
        self.shared
            .committed_here
            .fetch_max(done.committed(), std::sync::atomic::Ordering::SeqCst);
        Ok(done)
    }

    /// The newest revision this process's writes committed (0 before the
    /// first): a revision known to be committed without asking the
    /// database.
    pub fn committed_here(&self) -> u64 {
        self.shared
            .committed_here
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why the database at `url` cannot be used, once, in words a person can
/// act on. The pool only says that it timed out waiting for a connection,
/// which hides the cause (refused, no such database, bad password): one
/// connection is made alone to learn it.
async fn connect_failure(url: &str, options: &StoreOptions, pool: &StoreError) -> String {
    use sea_orm::sqlx::{Connection, PgConnection, SqliteConnection};
    let alone = async {
        if url.starts_with("postgres") {
            PgConnection::connect(url).await?.close().await
        } else if url.starts_with("sqlite") {
            SqliteConnection::connect(url).await?.close().await
        } else {
            Err(sea_orm::sqlx::Error::Configuration(
                "the URL must start with postgres:// or sqlite:".into(),
            ))
        }
    };
    let cause = match tokio::time::timeout(options.connect_timeout, alone).await {
        Err(_) => format!("no answer within {:?}", options.connect_timeout),
        Ok(Err(sea_orm::sqlx::Error::Database(db))) => db.message().to_owned(),
        Ok(Err(sea_orm::sqlx::Error::Io(io))) => io.to_string(),
        Ok(Err(other)) => other.to_string(),
        // Alone it connects: the pool's own error is the one to show.
        Ok(Ok(())) => pool.to_string(),
    };
    let url = redact_url(url);
    format!(
        "cannot connect to the database at {url}: {cause}; check that it is running and \
         that --database-url (METADATA_DATABASE_URL) names it",
        cause = cause.replace(&url, "<url>"),
    )
}
