//! Storage behind sea-orm: SQLite (embedded default) or Postgres.
//!
//! Every write is one transaction that reads the row under a lock, computes
//! the new value with a pure function, and writes it back. Postgres locks the
//! row (`SELECT ... FOR UPDATE`, and `INSERT ... ON CONFLICT DO NOTHING` for a
//! first write so concurrent creators neither fail nor lose data); SQLite
//! uses WAL with `BEGIN IMMEDIATE`, and writes are queued in-process so they
//! wait in order instead of spinning on the busy handler.

mod entities;
mod error;
mod events;
mod migration;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{
    ActiveModelTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend,
    DatabaseConnection, DatabaseTransaction, EntityTrait, IntoActiveModel, QuerySelect,
    SqliteTransactionMode, TransactionOptions, TransactionTrait, TryInsertResult,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, Notify};

pub use error::{StoreError, redact_url};
pub use events::{CommitListener, EventRead, Snapshot};

use crate::events::ChangeType;
use crate::json::{ValidationError, canonical_numbers};
use crate::model::{Fields, Kind, Record};
use entities::metadata::{self as entity, Entity, Model};
use migration::Migrator;

/// Connection settings, from the command line.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub max_connections: u32,
    /// How long to wait for a connection, at start and for every call.
    pub connect_timeout: Duration,
    /// How long SQLite waits on a lock held by another process.
    pub sqlite_busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            sqlite_busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The result of a Merge or Replace.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome {
    pub record: Record,
    /// False when the write left every value as it was: nothing was written
    /// and the version did not move.
    pub changed: bool,
}

pub struct Store {
    db: DatabaseConnection,
    /// SQLite only: one writer at a time, queued fairly in this process.
    write_gate: Option<Mutex<()>>,
    /// Raised after every commit, to wake the event dispatcher at once.
    committed: Arc<Notify>,
    max_connections: u32,
    /// Where the time to begin a write transaction is recorded, if anywhere.
    acquire_timer: Option<prometheus::Histogram>,
}

/// Connections of the pool at one moment.
#[derive(Clone, Copy, Debug)]
pub struct PoolStatus {
    pub size: u32,
    pub idle: usize,
    pub max: u32,
}

impl Store {
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let mut connect = ConnectOptions::new(url);
        connect
            .max_connections(options.max_connections)
            .min_connections(1)
            .connect_timeout(options.connect_timeout)
            .acquire_timeout(options.connect_timeout)
            // sqlx pings every connection it takes from the pool by default:
            // a second round trip for every call. Only a connection idle for
            // a while is checked; a busy one that died fails its statement
            // (UNAVAILABLE, safe to retry), and the health monitor pings
            // every --db-health-interval.
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
        let write_gate =
            (db.get_database_backend() == DatabaseBackend::Sqlite).then(|| Mutex::new(()));
        Ok(Store {
            db,
            write_gate,
            committed: Arc::new(Notify::new()),
            max_connections: options.max_connections,
            acquire_timer: None,
        })
    }

    /// Records the time each write waits for a connection and its BEGIN.
    pub fn time_acquire(&mut self, histogram: prometheus::Histogram) {
        self.acquire_timer = Some(histogram);
    }

    pub fn pool_status(&self) -> Option<PoolStatus> {
        let (size, idle) = match self.backend() {
            DatabaseBackend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            DatabaseBackend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => return None,
        };
        Some(PoolStatus {
            size,
            idle,
            max: self.max_connections,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await.map_err(StoreError::from)
    }

    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await.map_err(StoreError::from)
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.db.close().await.map_err(StoreError::from)
    }

    /// Closes the pool while others may still hold the store: their next
    /// query fails with UNAVAILABLE.
    pub async fn close_pool(&self) {
        self.db.close_by_ref().await.ok();
    }

    pub async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        let row = Entity::find_by_id(key(kind, id)).one(&self.db).await?;
        Ok(row.map_or_else(|| Record::empty(kind, id.to_owned()), record_from_row))
    }

    /// Reads the row under a lock, checks `expected_version`, computes the
    /// new fields with `compute`, writes them and appends the event, all in
    /// one transaction. `compute` may run more than once (a lost insert race
    /// is retried).
    pub async fn write<F>(
        &self,
        kind: Kind,
        id: &str,
        expected_version: Option<u64>,
        change: ChangeType,
        mut compute: F,
    ) -> Result<WriteOutcome, StoreError>
    where
        F: FnMut(&Fields) -> Result<Fields, ValidationError>,
    {
        let _gate = self.enter_write().await;
        loop {
            let txn = self.begin_write().await?;
            let row = lock_row(&txn, kind, id).await?;
            let exists = row.is_some();
            let current = row.map_or_else(|| Record::empty(kind, id.to_owned()), record_from_row);
            check_version(expected_version, current.version)?;
            let fields = compute(&current.fields)?;
            if fields == current.fields {
                txn.rollback().await?;
                return Ok(WriteOutcome {
                    record: current,
                    changed: false,
                });
            }
            let now = now();
            let revision = events::next_revision(&txn, exists).await?;
            let record = Record {
                fields,
                version: current.version + 1,
                created_at: Some(current.created_at.unwrap_or(now)),
                updated_at: Some(now),
                revision,
                ..current.clone()
            };
            let model = row_from_record(&record, now);
            if exists {
                model.into_active_model().reset_all().update(&txn).await?;
            } else if !insert_if_absent(&txn, model).await? {
                // Another transaction created the row after our read: start
                // over, and this time lock the row it wrote.
                txn.rollback().await?;
                continue;
            }
            events::append(&txn, change, &current, &record, now).await?;
            self.commit(txn).await?;
            return Ok(WriteOutcome {
                record,
                changed: true,
            });
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
    ) -> Result<bool, StoreError> {
        let _gate = self.enter_write().await;
        let txn = self.begin_write().await?;
        let current = lock_row(&txn, kind, id)
            .await?
            .map_or_else(|| Record::empty(kind, id.to_owned()), record_from_row);
        check_version(expected_version, current.version)?;
        if current.version == 0 {
            txn.rollback().await?;
            return Ok(false);
        }
        let now = now();
        let revision = events::next_revision(&txn, true).await?;
        let record = Record {
            revision,
            ..Record::empty(kind, id.to_owned())
        };
        row_from_record(&record, now)
            .into_active_model()
            .reset_all()
            .update(&txn)
            .await?;
        events::append(&txn, ChangeType::Deleted, &current, &record, now).await?;
        self.commit(txn).await?;
        Ok(true)
    }

    async fn commit(&self, txn: DatabaseTransaction) -> Result<(), StoreError> {
        txn.commit().await?;
        self.committed.notify_one();
        Ok(())
    }

    async fn enter_write(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }

    async fn begin_write(&self) -> Result<DatabaseTransaction, StoreError> {
        let options = TransactionOptions {
            // Take the write lock up front: a deferred transaction that
            // reads and then writes can fail with SQLITE_BUSY mid-way.
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let timer = self.acquire_timer.as_ref().map(|h| h.start_timer());
        let transaction = self.db.begin_with_options(options).await?;
        drop(timer);
        Ok(transaction)
    }
}

fn key(kind: Kind, id: &str) -> (String, String) {
    (kind.as_str().to_owned(), id.to_owned())
}

async fn lock_row(
    txn: &DatabaseTransaction,
    kind: Kind,
    id: &str,
) -> Result<Option<Model>, StoreError> {
    // FOR UPDATE on Postgres; SQLite already holds the database write lock.
    let mut query = Entity::find_by_id(key(kind, id));
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        query = query.lock_exclusive();
    }
    Ok(query.one(txn).await?)
}

/// Returns false when a concurrent transaction inserted the row first.
async fn insert_if_absent(txn: &DatabaseTransaction, model: Model) -> Result<bool, StoreError> {
    let result = Entity::insert(model.into_active_model())
        .on_conflict_do_nothing_on([entity::Column::Kind, entity::Column::Id])
        .exec_without_returning(txn)
        .await?;
    Ok(matches!(result, TryInsertResult::Inserted(n) if n > 0))
}

fn check_version(expected: Option<u64>, actual: u64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != actual => {
            Err(StoreError::VersionMismatch { expected, actual })
        }
        _ => Ok(()),
    }
}

/// Postgres keeps microseconds; truncating here makes the returned time equal
/// to what a later Get reads back.
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

fn record_from_row(row: Model) -> Record {
    let kind = Kind::parse(&row.kind).unwrap_or(Kind::User);
    let fields = Fields {
        public: row.public_metadata,
        private: row.private_metadata,
        unsafe_: row.unsafe_metadata,
    };
    record_from_parts(
        kind,
        row.id,
        fields,
        row.version as u64,
        row.revision as u64,
        Some(row.created_at),
        Some(row.updated_at),
    )
}

/// The one place a stored record is rebuilt, from a row or an event
/// snapshot: numbers are brought back to canonical form, and a version-0
/// record (never written, or deleted) shows no timestamps.
pub(crate) fn record_from_parts(
    kind: Kind,
    id: String,
    mut fields: Fields,
    version: u64,
    revision: u64,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
) -> Record {
    if version == 0 {
        return Record {
            revision,
            ..Record::empty(kind, id)
        };
    }
    canonical_numbers(&mut fields.public);
    canonical_numbers(&mut fields.private);
    canonical_numbers(&mut fields.unsafe_);
    Record {
        kind,
        id,
        fields,
        version,
        created_at,
        updated_at,
        revision,
    }
}

/// The row for a record; a version-0 record (a tombstone) gets `at` as its
/// timestamps, which are never shown.
fn row_from_record(record: &Record, at: DateTime<Utc>) -> Model {
    Model {
        kind: record.kind.as_str().to_owned(),
        id: record.id.clone(),
        public_metadata: record.fields.public.clone(),
        private_metadata: record.fields.private.clone(),
        unsafe_metadata: record.fields.unsafe_.clone(),
        version: record.version as i64,
        revision: record.revision as i64,
        created_at: record.created_at.unwrap_or(at),
        updated_at: record.updated_at.unwrap_or(at),
    }
}
