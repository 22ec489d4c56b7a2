//! Storage behind sea-orm: SQLite (embedded default) or Postgres.
//!
//! Every write reads the row, computes the new value with a pure function,
//! and writes it back with its event, atomically. On Postgres a write to an
//! existing row first tries the short way (`Store::write_unlocked`): a
//! batched read without a lock, then one statement that writes only if the
//! row is still at the revision read. Otherwise, and for every other write,
//! a transaction locks the row (`SELECT ... FOR UPDATE`; a first write
//! inserts an empty row with `ON CONFLICT DO NOTHING` before it locks, so
//! concurrent creators queue on the row instead of racing, and neither fails
//! nor burns a revision) and runs the same statement; SQLite
//! uses WAL with `BEGIN IMMEDIATE`, and one committer task per process runs
//! the writes queued together in one transaction (`batch.rs`), so they wait
//! in order instead of spinning on the busy handler and share one fsync.
//! Point reads on both backends are batched (`reads.rs`).

mod batch;
mod entities;
mod error;
mod events;
mod lease;
mod migration;
mod notifications;
mod reads;
mod schemas;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, EntityTrait, IntoActiveModel, QuerySelect, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tracing::Instrument;

pub use error::{StoreError, redact_url};
pub use events::{Claim, Logged, take_revision_sql};
pub use lease::{LEASE_APPLICATION_NAME, Lease};
pub use notifications::{
    ANNOUNCER_APPLICATION_NAME, AnnouncerState, CommitAnnouncer, CommitListener, Heard,
};
pub use schemas::{MAX_LISTED_IDS, Nonconforming, SetSchema, StoredSchema};

use crate::json::{ValidationError, canonical_numbers};
use crate::model::{ChangeType, Field, Fields, Kind, Record};
use crate::pause::PausePoint;
use crate::query::Filter;
use crate::query::sql::Sql;
use entities::metadata::{self as entity, Entity, Model};
use migration::Migrator;
use notifications::Commits;

/// Connection settings, from the command line.
#[derive(Clone, Debug)]
pub struct StoreOptions {
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

/// Whether a write may have reached the database: set once its outcome no
/// longer depends on its caller (SQLite: the committer took it into a
/// group; Postgres: its COMMIT was sent). A caller that gives up before
/// that knows the write did not happen; after it, it may have.
#[derive(Clone, Debug, Default)]
pub struct Sent(Arc<std::sync::atomic::AtomicBool>);

impl Sent {
    fn mark(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The write was sent on its own and is known not to have been applied:
    /// it goes on in a transaction that has sent nothing yet.
    fn unmark(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn may_have_committed(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
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
    /// SQLite: the one task that writes, in groups.
    committer: Option<batch::Committer>,
    reader: reads::Reader,
    writer: Writer,
    /// Raised after every commit: wakes the event dispatcher at once, and
    /// the announcer that tells other replicas.
    commits: Commits,
    announcer_state: Arc<AnnouncerState>,
    max_connections: u32,
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
        let commits = Commits::default();
        let writer = Writer {
            db: db.clone(),
            commits: commits.clone(),
            acquire_timer: Arc::new(OnceLock::new()),
            group_sizes: Arc::new(OnceLock::new()),
            pauses: options.pauses.clone(),
            schemas: Arc::default(),
        };
        let committer = (db.get_database_backend() == DatabaseBackend::Sqlite)
            .then(|| batch::Committer::start(writer.clone()));
        let reader = reads::Reader::start(db.clone());
        Ok(Store {
            db,
            committer,
            reader,
            writer,
            commits,
            announcer_state: Arc::default(),
            max_connections: options.max_connections,
        })
    }

    /// Records the time each write waits for a connection and its BEGIN,
    /// and how many writes share each SQLite transaction.
    pub fn instrument(
        &mut self,
        acquire: prometheus::Histogram,
        group_size: prometheus::Histogram,
    ) {
        let _ = self.writer.acquire_timer.set(acquire);
        let _ = self.writer.group_sizes.set(group_size);
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
        self.reader.get(kind, id).await
    }

    /// The records of the distinct `ids`, in the order they first appear,
    /// in one query whatever their number. The ids travel as one JSON
    /// array, so that every batch is the same prepared statement (an `IN`
    /// list would be a new one, and a second round trip, per size).
    pub async fn get_many(&self, kind: Kind, ids: &[String]) -> Result<Vec<Record>, StoreError> {
        let backend = self.backend();
        let elements = match backend {
            DatabaseBackend::Postgres => "SELECT jsonb_array_elements_text(",
            _ => "SELECT value FROM json_each(",
        };
        let mut sql = Sql::new(backend);
        sql.push("SELECT * FROM metadata WHERE kind = ");
        sql.bind(kind.as_str()).push(" AND id IN (").push(elements);
        sql.bind(serde_json::json!(ids)).push("))");
        let statement = Statement::from_sql_and_values(backend, sql.text, sql.values);
        let rows = Entity::find().from_raw_sql(statement).all(&self.db).await?;
        let mut found: std::collections::HashMap<String, Model> =
            rows.into_iter().map(|row| (row.id.clone(), row)).collect();
        let mut seen = std::collections::HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .map(|id| match found.remove(id) {
                Some(row) => record_from_row(row),
                None => Record::empty(kind, id.clone()),
            })
            .collect())
    }

    /// The schema of a kind and field, as stored.
    pub async fn schema(&self, kind: Kind, field: Field) -> Result<StoredSchema, StoreError> {
        schemas::read(&self.db, kind, field).await
    }

    /// Checks every stored value of the field against the schema, then
    /// stores it (unless `validate_only`). Writes wait meanwhile; once it
    /// returns, no replica stores a value that breaks it.
    pub async fn set_schema(&self, request: SetSchema) -> Result<StoredSchema, StoreError> {
        let kind = request.kind;
        let stored = schemas::set(&self.db, request, &self.writer.pauses.set_schema).await?;
        // Not needed for correctness (writes check the generation), but it
        // spares this process's next write a retry.
        self.writer.schemas.refresh(&self.db, kind).await?;
        Ok(stored)
    }

    /// Removes the schema; false when none was set.
    pub async fn delete_schema(
        &self,
        kind: Kind,
        field: Field,
        expected_version: Option<u64>,
    ) -> Result<bool, StoreError> {
        let existed = schemas::delete(&self.db, kind, field, expected_version).await?;
        self.writer.schemas.refresh(&self.db, kind).await?;
        Ok(existed)
    }

    /// Up to `limit` records of `kind` that exist (version above 0) and
    /// match `filter`, ordered by id, from the first id after `after`.
    /// Keyset paging: each page is one indexed range read, however deep.
    /// On SQLite the filter is evaluated row by row as the scan goes, so
    /// memory stays bounded by the page.
    pub async fn list(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Record>, StoreError> {
        let statement = self.list_statement(kind, filter, after, limit);
        let rows = Entity::find().from_raw_sql(statement).all(&self.db).await?;
        Ok(rows.into_iter().map(record_from_row).collect())
    }

    /// The query [`Store::list`] runs (public for tests that EXPLAIN it).
    pub fn list_statement(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: u64,
    ) -> Statement {
        let backend = self.backend();
        let mut sql = Sql::new(backend);
        sql.push("SELECT * FROM metadata WHERE kind = ");
        sql.bind(kind.as_str()).push(" AND version > 0");
        if let Some(after) = after {
            sql.push(" AND id > ").bind(after.to_owned());
        }
        if let Some(filter) = filter {
            sql.push(" AND ").filter(filter);
        }
        sql.push(" ORDER BY id LIMIT ").bind(limit as i64);
        Statement::from_sql_and_values(backend, sql.text, sql.values)
    }

    /// Reads the row under a lock, checks `expected_version`, computes the
    /// new fields with `compute`, writes them and appends the event, all in
    /// one transaction. `compute` may run more than once (a lost insert race
    /// is retried, and SQLite re-runs a failed group alone).
    ///
    /// SQLite: writes go through this process's committer, which puts the
    /// writes queued at the same moment into one transaction (one fsync for
    /// the group; each write's result and error are its own).
    /// `provided`: the fields the write gives, which are checked against
    /// their schemas as they will be stored.
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
    ) -> Result<WriteOutcome, StoreError> {
        let op = Op::Write {
            kind,
            id: id.to_owned(),
            expected_version,
            change,
            provided,
            compute,
            sent,
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
                // As i64: the exporter turns a u64 into a string (OTLP has
                // no unsigned integers); the same for every number traced.
                span.record("revision", outcome.record.revision as i64);
                Ok(outcome)
            }
            Done::Deleted(_) => Err(StoreError::Internal("a write answered as a delete".into())),
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
    ) -> Result<bool, StoreError> {
        let op = Op::Delete {
            kind,
            id: id.to_owned(),
            expected_version,
            sent,
        };
        let span = tracing::info_span!(
            target: crate::otel::TARGET,
            "store.delete",
            kind = kind.as_str(),
        );
        match self.submit(op).instrument(span).await? {
            Done::Deleted(existed) => Ok(existed),
            Done::Written(_) => Err(StoreError::Internal("a delete answered as a write".into())),
        }
    }

    async fn submit(&self, mut op: Op) -> Result<Done, StoreError> {
        match &self.committer {
            Some(committer) => committer.submit(op).await,
            None => {
                let unlocked =
                    tracing::info_span!(target: crate::otel::TARGET, "db.write_unlocked");
                if let Some(done) = self.write_unlocked(&mut op).instrument(unlocked).await? {
                    return Ok(done);
                }
                self.writer.run_alone(op).await
            }
        }
    }

    /// Postgres: a Merge or Replace of a row that exists, in two round
    /// trips instead of four: a batched read with no lock, then one
    /// statement, its own transaction, that writes only if the row is
    /// still at the revision read (`events::write_change_postgres`). None
    /// when it did not write: the caller runs the write in a transaction
    /// that locks the row first (a first write, a row that moved on or is
    /// locked by another writer), so a busy row costs a retry, never a lost
    /// update.
    async fn write_unlocked(&self, op: &mut Op) -> Result<Option<Done>, StoreError> {
        let Op::Write {
            kind,
            id,
            expected_version,
            change,
            provided,
            compute,
            sent,
        } = op
        else {
            return Ok(None);
        };
        let current = self.reader.get(*kind, id).await?;
        if current.revision == 0 {
            // Never written: the row is created under a lock.
            return Ok(None);
        }
        // A read issued after the call arrived: a refusal or a no-op
        // decided on it is one at that moment, as for a Get.
        check_version(*expected_version, current.version)?;
        let fields = compute(&current.fields)?;
        let generation = self
            .writer
            .validate(&self.db, *kind, provided, &fields)
            .await?;
        if fields == current.fields {
            return Ok(Some(Done::Written(WriteOutcome {
                record: current,
                changed: false,
            })));
        }
        let now = now();
        let next = successor(&current, fields, now);
        let written = self
            .writer
            .write_alone(*change, current, next, now, generation, sent)
            .await?;
        Ok(written.map(|record| {
            Done::Written(WriteOutcome {
                record,
                changed: true,
            })
        }))
    }
}

/// How a write computes the new fields from the stored ones.
pub type Compute = Box<dyn FnMut(&Fields) -> Result<Fields, ValidationError> + Send>;

/// A write or delete, as queued for a transaction.
pub(crate) enum Op {
    Write {
        kind: Kind,
        id: String,
        expected_version: Option<u64>,
        change: ChangeType,
        /// The fields the write gives, checked against their schemas.
        provided: Vec<Field>,
        compute: Compute,
        sent: Sent,
    },
    Delete {
        kind: Kind,
        id: String,
        expected_version: Option<u64>,
        sent: Sent,
    },
}

impl Op {
    pub(crate) fn sent(&self) -> &Sent {
        match self {
            Op::Write { sent, .. } | Op::Delete { sent, .. } => sent,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Op::Write { kind, .. } | Op::Delete { kind, .. } => *kind,
        }
    }
}

pub(crate) enum Done {
    Written(WriteOutcome),
    Deleted(bool),
}

/// What one operation did inside a transaction.
enum Step {
    /// Nothing was written (a no-op write, or a delete of nothing).
    Unchanged(Done),
    Written(Done),
    /// Postgres: the dispatcher claimed this transaction's revision as a
    /// void before its event was written (the writer stalled after taking
    /// it). Roll back and run again with a new revision.
    StartOver,
}

/// Runs operations in write transactions.
#[derive(Clone)]
pub(crate) struct Writer {
    db: DatabaseConnection,
    commits: Commits,
    /// Where the time to begin a write transaction is recorded, if anywhere.
    acquire_timer: Arc<OnceLock<prometheus::Histogram>>,
    /// Where the size of each SQLite write group is recorded, if anywhere.
    group_sizes: Arc<OnceLock<prometheus::Histogram>>,
    pauses: StorePauses,
    /// The compiled schemas writes are checked against.
    schemas: Arc<schemas::SchemaCache>,
}

impl Writer {
    async fn begin(&self) -> Result<DatabaseTransaction, StoreError> {
        let options = TransactionOptions {
            // Take the write lock up front: a deferred transaction that
            // reads and then writes can fail with SQLITE_BUSY mid-way.
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let timer = self.acquire_timer.get().map(|h| h.start_timer());
        let transaction = self.db.begin_with_options(options).await?;
        drop(timer);
        Ok(transaction)
    }

    /// Commits in a task of its own: once a COMMIT is due, it completes
    /// even if the caller stops waiting, who is then told that the write
    /// may have happened (`Sent`); it must not depend on when they left.
    async fn commit(&self, txn: DatabaseTransaction) -> Result<(), StoreError> {
        let pause = self.pauses.commit.clone();
        let commits = self.commits.clone();
        let commit = tokio::spawn(async move {
            pause.pass().await;
            txn.commit().await?;
            commits.committed();
            Ok(())
        });
        commit
            .await
            .map_err(|err| StoreError::Internal(format!("the commit task failed: {err}")))?
    }

    /// The Postgres write statement on its own (its own transaction), in a
    /// task of its own like a COMMIT (see [`Writer::commit`]).
    async fn write_alone(
        &self,
        change: ChangeType,
        before: Record,
        next: Record,
        at: DateTime<Utc>,
        generation: i64,
        sent: &Sent,
    ) -> Result<Option<Record>, StoreError> {
        sent.mark();
        let db = self.db.clone();
        let pause = self.pauses.commit.clone();
        let commits = self.commits.clone();
        let write = tokio::spawn(async move {
            pause.pass().await;
            let written =
                events::write_change_postgres(&db, change, &before, next, at, Some(generation))
                    .await?;
            if written.is_some() {
                commits.committed();
            }
            Ok::<_, StoreError>(written)
        });
        let written = write
            .await
            .map_err(|err| StoreError::Internal(format!("the write task failed: {err}")))??;
        if written.is_none() {
            sent.unmark();
        }
        Ok(written)
    }

    /// The schema generation a write's result conforms to; a violation is
    /// checked again against freshly read schemas before it is reported,
    /// in case this process's copy is behind a change that relaxed them.
    async fn validate(
        &self,
        db: &impl ConnectionTrait,
        kind: Kind,
        provided: &[Field],
        fields: &Fields,
    ) -> Result<i64, StoreError> {
        let cached = self.schemas.get(db, kind).await?;
        match cached.check(provided, fields) {
            Ok(()) => Ok(cached.generation),
            Err(_) => {
                let fresh = self.schemas.refresh(db, kind).await?;
                fresh.check(provided, fields)?;
                Ok(fresh.generation)
            }
        }
    }

    /// One operation in its own transaction.
    async fn run_alone(&self, op: Op) -> Result<Done, StoreError> {
        let span = tracing::info_span!(
            target: crate::otel::TARGET,
            "db.transaction",
            kind = op.kind().as_str(),
            attempts = tracing::field::Empty,
        );
        self.run_alone_in(op, &span).instrument(span.clone()).await
    }

    async fn run_alone_in(&self, mut op: Op, span: &tracing::Span) -> Result<Done, StoreError> {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            span.record("attempts", i64::from(attempts));
            let txn = self.begin().await?;
            match step(self, &txn, &mut op).await? {
                Step::Unchanged(done) => {
                    txn.rollback().await?;
                    return Ok(done);
                }
                Step::Written(done) => {
                    op.sent().mark();
                    self.commit(txn).await?;
                    return Ok(done);
                }
                Step::StartOver => {
                    txn.rollback().await?;
                    // The kind's schemas may have changed (the write's
                    // guard failed): read them again before the next try.
                    self.schemas.refresh(&self.db, op.kind()).await?;
                }
            }
        }
    }
}

/// One operation inside `txn`: read the row under a lock, check the
/// version, compute, write the row and append the event. An error before
/// anything was written (version mismatch, invalid result) leaves `txn`
/// as it was.
async fn step(writer: &Writer, txn: &DatabaseTransaction, op: &mut Op) -> Result<Step, StoreError> {
    match op {
        Op::Write {
            kind,
            id,
            expected_version,
            change,
            provided,
            compute,
            sent: _,
        } => {
            let row = lock_row(txn, *kind, id).await?;
            let exists = row.is_some();
            let current = row.map_or_else(|| Record::empty(*kind, id.to_owned()), record_from_row);
            check_version(*expected_version, current.version)?;
            let fields = compute(&current.fields)?;
            let generation = writer.validate(txn, *kind, provided, &fields).await?;
            if fields == current.fields {
                return Ok(Step::Unchanged(Done::Written(WriteOutcome {
                    record: current,
                    changed: false,
                })));
            }
            if !exists {
                // A first write: an empty row to lock, so that concurrent
                // first writes to this id queue behind this one (the
                // insert waits for ours) instead of both taking a revision
                // and one failing. Nothing but the row lock is new: the
                // fields are still the empty ones `compute` saw.
                create_row(txn, *kind, id).await?;
                if lock_row(txn, *kind, id)
                    .await?
                    .is_none_or(|row| row.version != 0)
                {
                    // Another first write committed before our insert: its
                    // value is what this one must build on.
                    return Ok(Step::StartOver);
                }
            }
            let now = now();
            let next = successor(&current, fields, now);
            let Some(record) =
                events::write_change(txn, *change, &current, next, now, Some(generation)).await?
            else {
                return Ok(Step::StartOver);
            };
            Ok(Step::Written(Done::Written(WriteOutcome {
                record,
                changed: true,
            })))
        }
        Op::Delete {
            kind,
            id,
            expected_version,
            sent: _,
        } => {
            let current = lock_row(txn, *kind, id)
                .await?
                .map_or_else(|| Record::empty(*kind, id.to_owned()), record_from_row);
            check_version(*expected_version, current.version)?;
            if current.version == 0 {
                return Ok(Step::Unchanged(Done::Deleted(false)));
            }
            let next = Record::empty(*kind, id.to_owned());
            if events::write_change(txn, ChangeType::Deleted, &current, next, now(), None)
                .await?
                .is_none()
            {
                return Ok(Step::StartOver);
            }
            Ok(Step::Written(Done::Deleted(true)))
        }
    }
}

/// The record a write of `fields` makes of `current` at `now` (its revision
/// is taken when it is stored).
fn successor(current: &Record, fields: Fields, now: DateTime<Utc>) -> Record {
    Record {
        fields,
        version: current.version + 1,
        created_at: Some(current.created_at.unwrap_or(now)),
        updated_at: Some(now),
        ..current.clone()
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

/// Inserts an empty row (version 0, `{}` fields, revision 0) unless one
/// exists; on Postgres, waits for a concurrent insert of the same id to end.
async fn create_row(txn: &DatabaseTransaction, kind: Kind, id: &str) -> Result<(), StoreError> {
    let model = row_from_record(&Record::empty(kind, id.to_owned()), now());
    // Inserted, or the row is there already: either way there is one to lock.
    Entity::insert(model.into_active_model())
        .on_conflict_do_nothing_on([entity::Column::Kind, entity::Column::Id])
        .exec_without_returning(txn)
        .await?;
    Ok(())
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
