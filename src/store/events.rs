//! Reading and writing the event log, and waking watchers.
//!
//! The log is dense: every revision up to the dispatcher's high-water mark
//! is a row, either an event or a *void*, the mark of a revision that was
//! taken and never committed. On Postgres a writer holds an advisory lock
//! keyed by its revision from the moment it takes it until it ends, so the
//! dispatcher, finding a revision missing below a visible one, waits for
//! that writer alone ([`Store::claim_revision`]) and then, if the revision
//! is still missing, writes the void itself. The void's row makes a later
//! commit of that revision impossible (the writer's insert finds it and the
//! writer starts over with a new revision), so nothing can appear behind a
//! revision that has been delivered.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseTransaction, DbErr,
    EntityTrait, IntoActiveModel, QueryFilter, QueryOrder, QuerySelect, RuntimeErr, Statement,
    TransactionTrait, TryInsertResult,
};
use serde_json::{Value, json};

use super::entities::{event, revision};
use super::notifications::{AnnouncerState, CHANNEL, CommitAnnouncer, CommitListener};
use super::{Store, StoreError, record_from_parts, row_from_record};
use crate::model::{ChangeType, Event, Field, Fields, Kind, Record, changed_fields};

/// Postgres sequence the revisions come from. Its default CACHE 1 matters:
/// values are then handed out in time order across all sessions.
pub(super) const SEQUENCE: &str = "event_revisions";

/// The first key of the advisory locks writers hold on their revision (the
/// second is the revision modulo 2^31): keeps them apart from any other
/// advisory lock in the database. A collision could only make the
/// dispatcher wait longer, never skip: voids are what guarantee order.
const LOCK_CLASS: i32 = 0x6d65_7461; // "meta"

/// `change_type` of a void row.
const VOID: &str = "void";

/// The advisory lock key of a revision, as SQL arguments.
fn lock_key(revision: &str) -> String {
    format!("{LOCK_CLASS}, ({revision} % 2147483648)::int4")
}

/// A Postgres snapshot (`pg_current_snapshot()`), used once at start to
/// find a revision below which nothing can still commit.
///
/// Every writer owns a transaction id before it takes its revision, so a
/// revision missing below a visible one belongs to a transaction that was
/// running when the snapshot was taken, or to one that rolled back. Running
/// then means: listed in `xip`, or with an id at or above `xmax` (which is
/// one past the latest *completed* id, not the next one to be assigned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let _xmin: u64 = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot { xmax, xip })
    }

    fn has_finished(&self, xid: u64) -> bool {
        xid < self.xmax && !self.xip.contains(&xid)
    }

    /// Whether every transaction that may have been running when `earlier`
    /// was taken has ended by this snapshot. `bound` is a transaction id
    /// assigned after `earlier` was taken: every transaction running then
    /// has a smaller id.
    fn covers(&self, earlier: &Snapshot, bound: u64) -> bool {
        earlier.xip.iter().all(|x| self.has_finished(*x))
            && (earlier.xmax..bound).all(|x| self.has_finished(x))
    }
}

/// One revision of the log.
#[derive(Debug)]
pub struct Logged {
    pub revision: u64,
    /// None for a void: a revision taken and never committed.
    pub event: Option<Event>,
}

/// What [`Store::claim_revision`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The revision is in the log now, as an event or a void.
    Settled,
    /// Its writer still runs: look again later.
    Owned,
}

/// Stores `next` as the row's new state and appends the change's event,
/// under a new revision, in the writing transaction (the row is locked).
/// None when the revision was claimed as a void meanwhile (Postgres): the
/// transaction must not commit, and the write starts over.
///
/// Revisions. Postgres: a sequence, so writers to different ids never wait
/// for each other; the advisory lock on the revision, held until the
/// transaction ends, tells the dispatcher this revision's writer still
/// runs. If the lock is already taken, or a void already holds the
/// revision, the dispatcher saw a later one commit first and claimed this
/// one. The transaction owns a transaction id before it takes the value (it
/// holds a row lock), which the start-up check in
/// [`Store::settled_revision`] relies on. SQLite: a counter row in the
/// writing transaction; SQLite has one writer at a time, so revisions are
/// dense and in commit order.
/// `generation`: for a Merge or Replace, the schema generation its result
/// was validated under (`schemas.rs`); nothing is written (None) if the
/// kind's schemas changed since.
pub(super) async fn write_change(
    txn: &DatabaseTransaction,
    change: ChangeType,
    before: &Record,
    mut next: Record,
    at: DateTime<Utc>,
    generation: Option<i64>,
) -> Result<Option<Record>, StoreError> {
    let backend = txn.get_database_backend();
    if backend == DatabaseBackend::Postgres {
        return write_change_postgres(txn, change, before, next, at, generation).await;
    }
    let (sql, values) = match generation {
        Some(generation) => (
            format!(
                "UPDATE revisions SET latest = latest + 1 WHERE id = 1 AND {} RETURNING latest",
                super::schemas::guard("?", "?")
            ),
            vec![next.kind.as_str().into(), generation.into()],
        ),
        None => (
            "UPDATE revisions SET latest = latest + 1 WHERE id = 1 RETURNING latest".to_owned(),
            vec![],
        ),
    };
    let Some(row) = txn
        .query_one_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?
    else {
        // Only the schema guard can stop it: the counter row is always there.
        return Ok(None);
    };
    next.revision = row.try_get::<i64>("", "latest")? as u64;
    row_from_record(&next, at)
        .into_active_model()
        .reset_all()
        .update(txn)
        .await?;
    Ok(append(txn, change, before, &next, at)
        .await?
        .then_some(next))
}

/// The Postgres write in one statement: the row, still at `before`'s
/// revision, locked; a revision taken; the row written; the event appended.
/// A statement each would cost three more round trips per write, and on 2
/// cores round trips are most of a write's CPU. It runs inside a transaction
/// that locked the row already, or alone (its own transaction, see
/// [`super::Writer::write_alone`]), after an unlocked read: then the lock
/// and the revision check are what make it safe. None when nothing was
/// written: the row moved on since `before` was read (its revision is
/// unique to each write, so this cannot be fooled the way a version
/// could, by a delete and new writes), another transaction holds its lock
/// (NOWAIT: the caller then waits for the lock in a transaction, before
/// anything is sent), or the revision taken was claimed as a void.
pub(super) async fn write_change_postgres(
    db: &impl ConnectionTrait,
    change: ChangeType,
    before: &Record,
    mut next: Record,
    at: DateTime<Utc>,
    generation: Option<i64>,
) -> Result<Option<Record>, StoreError> {
    // Every CTE is MATERIALIZED, so the revision is taken once, and only if
    // the row was locked (`rev` reads `locked`). The event's `after`
    // snapshot gets its revision in SQL, the one value Rust cannot know in
    // advance. Data-modifying CTEs run whether read or not; both are read,
    // to check that the row was there. A void already at the revision
    // fails the event's insert, and with it the whole statement.
    // The schema guard reads metadata_schemas with this statement's
    // snapshot, taken once its lock on `metadata` was granted: after any
    // SetSchema that held that table.
    let guard = match generation {
        Some(_) => format!(" AND {}", super::schemas::guard("$1", "$14")),
        None => String::new(),
    };
    let sql = format!(
        "WITH locked AS MATERIALIZED (SELECT 1 FROM metadata \
             WHERE kind = $1 AND id = $2 AND revision = $13{guard} FOR UPDATE NOWAIT), \
         rev AS MATERIALIZED (SELECT nextval('{SEQUENCE}') AS r FROM locked), \
         taken AS MATERIALIZED (SELECT r AS latest, pg_try_advisory_xact_lock({lock}) AS owned \
             FROM rev), \
         stored AS (UPDATE metadata SET public_metadata = $3, private_metadata = $4, \
             unsafe_metadata = $5, version = $6, revision = taken.latest, created_at = $7, \
             updated_at = $8 \
           FROM taken WHERE taken.owned AND metadata.kind = $1 AND metadata.id = $2 \
           RETURNING 1), \
         appended AS (INSERT INTO events (revision, kind, id, change_type, changed_fields, \
             before, after, committed_at) \
           SELECT taken.latest, $1, $2, $9, $10, $11, \
             jsonb_set($12, '{{revision}}', to_jsonb(taken.latest)), $8 \
           FROM taken WHERE taken.owned RETURNING 1) \
         SELECT taken.latest, taken.owned, \
           (SELECT count(*) FROM stored) AS stored, (SELECT count(*) FROM appended) AS appended \
         FROM taken",
        lock = lock_key("r")
    );
    let row = row_from_record(&next, at);
    let mut values: Vec<sea_orm::Value> = vec![
        row.kind.into(),
        row.id.into(),
        row.public_metadata.into(),
        row.private_metadata.into(),
        row.unsafe_metadata.into(),
        row.version.into(),
        row.created_at.into(),
        row.updated_at.into(),
        change.as_str().into(),
        changed_fields_json(before, &next).into(),
        snapshot(before).into(),
        snapshot(&next).into(),
        (before.revision as i64).into(),
    ];
    values.extend(generation.map(sea_orm::Value::from));
    let statement = Statement::from_sql_and_values(DatabaseBackend::Postgres, sql, values);
    let answer = match db.query_one_raw(statement).await {
        Ok(Some(answer)) => answer,
        // The row moved on (or is not there).
        Ok(None) => return Ok(None),
        Err(err) if lock_not_available(&err) || revision_taken(&err) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if !answer.try_get::<bool>("", "owned")? {
        return Ok(None);
    }
    if answer.try_get::<i64>("", "stored")? != 1 || answer.try_get::<i64>("", "appended")? != 1 {
        return Err(StoreError::Internal(
            "a write locked its row but did not store it".into(),
        ));
    }
    next.revision = answer.try_get::<i64>("", "latest")? as u64;
    Ok(Some(next))
}

/// The statement a Postgres writer takes its revision with: `latest`, and
/// `owned`, whether it holds the revision's lock. Public so that tests can
/// play a writer that stalls or rolls back at a chosen moment.
pub fn take_revision_sql() -> String {
    // No NOTIFY here: it would serialize every commit (notifications.rs).
    format!(
        "SELECT r AS latest, pg_try_advisory_xact_lock({}) AS owned \
         FROM nextval('{SEQUENCE}') AS r",
        lock_key("r")
    )
}

/// The names of the fields a change touched, as stored in its event.
fn changed_fields_json(before: &Record, after: &Record) -> Value {
    Value::Array(
        changed_fields(before, after)
            .into_iter()
            .map(|f| Value::from(f.name()))
            .collect(),
    )
}

/// Appends the event of a change, in the writing transaction (SQLite). False
/// when the revision is taken already: the write must start over.
async fn append(
    txn: &DatabaseTransaction,
    change: ChangeType,
    before: &Record,
    after: &Record,
    committed_at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let row = event::Model {
        revision: after.revision as i64,
        kind: after.kind.as_str().to_owned(),
        id: after.id.clone(),
        change_type: change.as_str().to_owned(),
        changed_fields: changed_fields_json(before, after),
        before: snapshot(before),
        after: snapshot(after),
        committed_at,
    };
    let inserted = event::Entity::insert(event::ActiveModel::from(row))
        .on_conflict_do_nothing_on([event::Column::Revision])
        .exec_without_returning(txn)
        .await?;
    Ok(matches!(inserted, TryInsertResult::Inserted(n) if n > 0))
}

/// A record as stored in an event: everything but kind and id.
fn snapshot(record: &Record) -> Value {
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    json!({
        "public_metadata": record.fields.public,
        "private_metadata": record.fields.private,
        "unsafe_metadata": record.fields.unsafe_,
        "version": record.version,
        "revision": record.revision,
        "created_at": time(record.created_at),
        "updated_at": time(record.updated_at),
    })
}

fn from_snapshot(kind: Kind, id: &str, mut value: Value) -> Result<Record, StoreError> {
    let bad = || {
        StoreError::Internal(format!(
            "malformed event snapshot for {} {id}",
            kind.as_str()
        ))
    };
    let mut take = |field: Field| value.get_mut(field.name()).map(Value::take).ok_or_else(bad);
    let fields = Fields {
        public: take(Field::Public)?,
        private: take(Field::Private)?,
        unsafe_: take(Field::Unsafe)?,
    };
    let number = |name: &str| value.get(name).and_then(Value::as_u64).ok_or_else(bad);
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
        match value.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    };
    Ok(record_from_parts(
        kind,
        id.to_owned(),
        fields,
        number("version")?,
        number("revision")?,
        time("created_at")?,
        time("updated_at")?,
    ))
}

fn logged_from_row(row: event::Model) -> Result<Logged, StoreError> {
    let revision = row.revision as u64;
    let event = (row.change_type != VOID)
        .then(|| event_from_row(row))
        .transpose()?;
    Ok(Logged { revision, event })
}

fn event_from_row(row: event::Model) -> Result<Event, StoreError> {
    let kind = Kind::parse(&row.kind)
        .ok_or_else(|| StoreError::Internal(format!("unknown kind {:?} in events", row.kind)))?;
    let change = ChangeType::parse(&row.change_type).ok_or_else(|| {
        StoreError::Internal(format!(
            "unknown change type {:?} in events",
            row.change_type
        ))
    })?;
    let changed_fields = row
        .changed_fields
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|name| {
            Field::ALL
                .into_iter()
                .find(|f| Some(f.name()) == name.as_str())
        })
        .collect();
    Ok(Event {
        revision: row.revision as u64,
        change,
        changed_fields,
        before: from_snapshot(kind, &row.id, row.before)?,
        after: from_snapshot(kind, &row.id, row.after)?,
        committed_at: row.committed_at,
    })
}

async fn newest_revision(txn: &DatabaseTransaction) -> Result<u64, StoreError> {
    let row = event::Entity::find()
        .order_by_desc(event::Column::Revision)
        .one(txn)
        .await?;
    Ok(row.map_or(0, |r| r.revision as u64))
}

async fn current_snapshot(txn: &DatabaseTransaction) -> Result<Snapshot, StoreError> {
    let row = txn
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT pg_current_snapshot()::text AS snapshot",
        ))
        .await?
        .ok_or_else(|| StoreError::Internal("no snapshot was returned".into()))?;
    let text: String = row.try_get("", "snapshot")?;
    Snapshot::parse(&text)
        .ok_or_else(|| StoreError::Internal(format!("unreadable snapshot {text:?}")))
}

/// The SQLSTATE of a statement's failure, if the database gave one.
fn sqlstate(err: &DbErr) -> Option<std::borrow::Cow<'_, str>> {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            e.as_database_error().and_then(|db| db.code())
        }
        _ => None,
    }
}

/// A lock was not available: `lock_timeout` expired, or NOWAIT (55P03).
fn lock_not_available(err: &DbErr) -> bool {
    sqlstate(err).is_some_and(|code| code == "55P03")
}

/// An event row already holds the revision: a void claimed it (23505).
fn revision_taken(err: &DbErr) -> bool {
    sqlstate(err).is_some_and(|code| code == "23505")
}

impl Store {
    /// Every event up to this revision has been pruned.
    pub async fn compacted_revision(&self) -> Result<u64, StoreError> {
        let row = revision::Entity::find_by_id(1)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::Internal("the revisions row is missing".into()))?;
        Ok(row.compacted as u64)
    }

    /// The log with `after < revision <= up_to`, oldest first, at most
    /// `limit` revisions.
    pub async fn read_log(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        // Revisions are below 2^63 (the database's bigint); a bound above
        // that means "no bound".
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let up_to = i64::try_from(up_to).unwrap_or(i64::MAX);
        event::Entity::find()
            .filter(event::Column::Revision.gt(after))
            .filter(event::Column::Revision.lte(up_to))
            .order_by_asc(event::Column::Revision)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(logged_from_row)
            .collect()
    }

    /// The events of `kind` (and of `ids`, unless empty) with
    /// `after < revision <= up_to`, oldest first, at most `limit`. The
    /// filter runs in the database: a replay that wants a few ids out of a
    /// long history does not decode the rest.
    pub async fn read_events_of(
        &self,
        kind: Kind,
        ids: &std::collections::HashSet<String>,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let up_to = i64::try_from(up_to).unwrap_or(i64::MAX);
        let mut query = event::Entity::find()
            .filter(event::Column::Revision.gt(after))
            .filter(event::Column::Revision.lte(up_to))
            .filter(event::Column::Kind.eq(kind.as_str()))
            .filter(event::Column::ChangeType.ne(VOID));
        if !ids.is_empty() {
            query = query.filter(event::Column::Id.is_in(ids.iter().cloned()));
        }
        query
            .order_by_asc(event::Column::Revision)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(event_from_row)
            .collect()
    }

    /// Postgres: settles a revision found missing below a visible one.
    /// Waits (at most `wait`) for the writer that took it, and only for
    /// that writer; if the revision is still missing once it has ended, it
    /// rolled back (or never took its lock), and a void is written in its
    /// place so that it can never commit later.
    pub async fn claim_revision(
        &self,
        revision: u64,
        wait: std::time::Duration,
    ) -> Result<Claim, StoreError> {
        let backend = DatabaseBackend::Postgres;
        let txn = self.db.begin().await?;
        let timeout = format!("SET LOCAL lock_timeout = '{}ms'", wait.as_millis().max(1));
        txn.execute_unprepared(&timeout).await?;
        let lock = format!(
            "SELECT pg_advisory_xact_lock({})",
            lock_key(&revision.to_string())
        );
        match txn.execute_unprepared(&lock).await {
            Ok(_) => {}
            Err(err) if lock_not_available(&err) => {
                txn.rollback().await.ok();
                return Ok(Claim::Owned);
            }
            Err(err) => return Err(err.into()),
        }
        let present = txn
            .query_one_raw(Statement::from_string(
                backend,
                format!("SELECT 1 AS present FROM events WHERE revision = {revision}"),
            ))
            .await?
            .is_some();
        if !present {
            // ON CONFLICT: a writer that never got its lock may have
            // inserted meanwhile; the insert then waits for its outcome.
            let void = format!(
                "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, \
                 after, committed_at) VALUES ({revision}, '', '', '{VOID}', '[]', 'null', \
                 'null', now()) ON CONFLICT (revision) DO NOTHING"
            );
            match txn.execute_unprepared(&void).await {
                Ok(_) => {}
                Err(err) if lock_not_available(&err) => {
                    txn.rollback().await.ok();
                    return Ok(Claim::Owned);
                }
                Err(err) => return Err(err.into()),
            }
        }
        txn.commit().await?;
        Ok(Claim::Settled)
    }

    /// The newest committed revision (older ones may still be in flight).
    pub async fn newest_revision(&self) -> Result<u64, StoreError> {
        let txn = self.begin_snapshot().await?;
        let newest = newest_revision(&txn).await?;
        txn.commit().await?;
        Ok(newest)
    }

    /// A revision below which nothing can commit any more: the newest
    /// visible one, once every transaction that might still commit an older
    /// one has ended (waiting at most `wait`).
    pub async fn settled_revision(&self, wait: std::time::Duration) -> Result<u64, StoreError> {
        let txn = self.begin_snapshot().await?;
        let compacted = self.compacted_revision().await?;
        if self.backend() != DatabaseBackend::Postgres {
            let newest = newest_revision(&txn).await?;
            txn.commit().await?;
            return Ok(newest.max(compacted));
        }
        let first = current_snapshot(&txn).await?;
        let newest = newest_revision(&txn).await?.max(compacted);
        txn.commit().await?;
        let bound = self.fresh_xid().await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.current_snapshot().await?.covers(&first, bound) {
                return Ok(newest);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "transactions still open after {wait:?}; starting event delivery anyway"
                );
                return Ok(newest);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    async fn current_snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.begin_snapshot().await?;
        let snapshot = current_snapshot(&txn).await?;
        txn.commit().await?;
        Ok(snapshot)
    }

    /// A new transaction id (Postgres), larger than that of every
    /// transaction running before this call.
    async fn fresh_xid(&self) -> Result<u64, StoreError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT pg_current_xact_id()::text AS xid",
            ))
            .await?
            .ok_or_else(|| StoreError::Internal("no transaction id was returned".into()))?;
        let text: String = row.try_get("", "xid")?;
        text.parse()
            .map_err(|_| StoreError::Internal(format!("unreadable transaction id {text:?}")))
    }

    /// A read-only transaction whose statements all see one snapshot.
    async fn begin_snapshot(&self) -> Result<DatabaseTransaction, StoreError> {
        let options = sea_orm::TransactionOptions {
            isolation_level: Some(sea_orm::IsolationLevel::RepeatableRead),
            access_mode: Some(sea_orm::AccessMode::ReadOnly),
            ..Default::default()
        };
        let options = if self.backend() == DatabaseBackend::Postgres {
            options
        } else {
            sea_orm::TransactionOptions::default()
        };
        Ok(self.db.begin_with_options(options).await?)
    }

    /// Deletes events committed before `cutoff`; returns how many.
    pub async fn prune_events(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        // On SQLite this waits (busy timeout) while the committer writes.
        let txn = self.writer.begin().await?;
        let newest_old = event::Entity::find()
            .filter(event::Column::CommittedAt.lt(cutoff))
            .order_by_desc(event::Column::Revision)
            .one(&txn)
            .await?;
        let Some(newest_old) = newest_old else {
            txn.rollback().await?;
            return Ok(0);
        };
        let deleted = event::Entity::delete_many()
            .filter(event::Column::Revision.lte(newest_old.revision))
            .exec(&txn)
            .await?
            .rows_affected;
        // Readers check `compacted` to refuse a start revision that is gone.
        revision::Entity::update_many()
            .col_expr(
                revision::Column::Compacted,
                sea_orm::sea_query::Expr::val(newest_old.revision),
            )
            .filter(revision::Column::Id.eq(1))
            .filter(revision::Column::Compacted.lt(newest_old.revision))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(deleted)
    }

    /// The in-process signal raised after every commit of this store.
    pub fn commit_notifier(&self) -> Arc<tokio::sync::Notify> {
        self.commits.local.clone()
    }

    /// On Postgres, the task that tells other replicas of this store's
    /// commits (run it with [`CommitAnnouncer::run`]).
    pub fn commit_announcer(&self) -> Option<CommitAnnouncer> {
        if self.backend() != DatabaseBackend::Postgres {
            return None;
        }
        Some(CommitAnnouncer::new(
            &self.db.get_postgres_connection_pool().connect_options(),
            self.commits.announce.clone(),
            self.announcer_state.clone(),
            self.writer.pauses.announce.clone(),
        ))
    }

    /// The commit announcer's counts of notifications (zero on SQLite).
    pub fn announcer_state(&self) -> &AnnouncerState {
        &self.announcer_state
    }

    /// On Postgres, a listener for commits made by any replica.
    pub async fn listen_for_commits(&self) -> Result<Option<CommitListener>, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        let mut listener = PgListener::connect_with(self.db.get_postgres_connection_pool())
            .await
            .map_err(|e| StoreError::unavailable("cannot listen for events", e))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| StoreError::unavailable("cannot listen for events", e))?;
        Ok(Some(CommitListener {
            listener,
            own: self.announcer_state.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn snapshots() {
        let s0 = Snapshot::parse("10:20:12,15").unwrap();
        assert_eq!(s0.xip, vec![12, 15]);
        assert!(s0.has_finished(11) && s0.has_finished(19));
        assert!(!s0.has_finished(12) && !s0.has_finished(20));
        assert_eq!(Snapshot::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert!(Snapshot::parse("junk").is_none());
        // 12 and 15 were running, and so may have been 20..25 (bound 25).
        let later = |text| Snapshot::parse(text).unwrap();
        assert!(later("30:30:").covers(&s0, 25));
        assert!(!later("12:30:12").covers(&s0, 25), "12 still running");
        assert!(
            !later("22:30:22").covers(&s0, 25),
            "22 started before the bound"
        );
        assert!(
            later("26:30:26").covers(&s0, 25),
            "26 started after the bound"
        );
        assert!(
            !later("16:24:").covers(&s0, 25),
            "24 not known to have ended"
        );
    }
}
