//! Reading and writing the event log, and waking watchers.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde_json::{Value, json};

use super::entities::{event, revision};
use super::{Store, StoreError, record_from_parts};
use crate::events::{ChangeType, Event, changed_fields};
use crate::model::{Field, Fields, Kind, Record};

/// Postgres channel on which every commit is announced to all replicas.
pub(super) const CHANNEL: &str = "metadata_events";

/// Postgres sequence the revisions come from. Its default CACHE 1 matters:
/// values are then handed out in time order across all sessions.
pub(super) const SEQUENCE: &str = "event_revisions";

/// A Postgres snapshot (`pg_current_snapshot()`) that events were read in.
///
/// Every writer owns a transaction id before it takes its revision, so a
/// revision missing below a visible one belongs to a transaction that was
/// running when the snapshot was taken, or to one that rolled back. Running
/// then means: listed in `xip`, or with an id at or above `xmax` (which is
/// one past the latest *completed* id, not the next one to be assigned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
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
    pub fn covers(&self, earlier: &Snapshot, bound: u64) -> bool {
        earlier.xip.iter().all(|x| self.has_finished(*x))
            && (earlier.xmax..bound).all(|x| self.has_finished(x))
    }
}

/// Events read in one snapshot.
#[derive(Debug, Default)]
pub struct EventRead {
    pub events: Vec<Event>,
    /// None where there are no concurrent writers (SQLite): revisions then
    /// become visible strictly in order and a gap is never filled later.
    pub snapshot: Option<Snapshot>,
}

/// Takes the next revision, as late as possible in the write transaction.
///
/// Postgres: a sequence, so writers to different ids never wait for each
/// other; readers deliver only up to a safe high-water mark (see the
/// dispatcher). The transaction must own a transaction id before it takes
/// the value, which `has_xid` says it does (it holds a row lock).
/// SQLite: a counter row in the writing transaction; SQLite has one writer
/// at a time, so revisions are dense and in commit order.
pub(super) async fn next_revision(
    txn: &DatabaseTransaction,
    has_xid: bool,
) -> Result<u64, StoreError> {
    let backend = txn.get_database_backend();
    let sql = match backend {
        DatabaseBackend::Postgres => {
            if !has_xid {
                txn.execute_unprepared("SELECT pg_current_xact_id()")
                    .await?;
            }
            // The notification rides on the same round trip; Postgres
            // delivers it to every listening replica when (and only if) the
            // transaction commits.
            format!("SELECT nextval('{SEQUENCE}') AS latest FROM pg_notify('{CHANNEL}', '')")
        }
        _ => "UPDATE revisions SET latest = latest + 1 WHERE id = 1 RETURNING latest".to_owned(),
    };
    let row = txn
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| StoreError::Internal("no revision was returned".into()))?;
    let latest: i64 = row.try_get("", "latest")?;
    Ok(latest as u64)
}

/// Appends the event of a change, in the writing transaction.
pub(super) async fn append(
    txn: &DatabaseTransaction,
    change: ChangeType,
    before: &Record,
    after: &Record,
    committed_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let fields: Vec<Value> = changed_fields(before, after)
        .into_iter()
        .map(|f| Value::from(f.name()))
        .collect();
    let row = event::Model {
        revision: after.revision as i64,
        kind: after.kind.as_str().to_owned(),
        id: after.id.clone(),
        change_type: change.as_str().to_owned(),
        changed_fields: Value::Array(fields),
        before: snapshot(before),
        after: snapshot(after),
        committed_at,
    };
    event::Entity::insert(event::ActiveModel::from(row))
        .exec_without_returning(txn)
        .await?;
    Ok(())
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
        wire: Default::default(),
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

/// Wakes a replica whenever any replica commits (Postgres LISTEN).
pub struct CommitListener(PgListener);

impl CommitListener {
    /// Ok(()) for a notification or a lost-and-restored connection (after
    /// which the caller must re-read the table: notifications sent
    /// meanwhile are gone).
    pub async fn next(&mut self) -> Result<(), StoreError> {
        match self.0.try_recv().await {
            Ok(_) => Ok(()),
            Err(err) => Err(StoreError::unavailable(
                "event notifications interrupted",
                err,
            )),
        }
    }
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

    /// Events with revision > `after`, oldest first, with the snapshot they
    /// were read in.
    pub async fn read_events(&self, after: u64, limit: u64) -> Result<EventRead, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            let events = self
                .events_between(&self.db, after, u64::MAX, limit)
                .await?;
            return Ok(EventRead {
                events,
                snapshot: None,
            });
        }
        let txn = self.begin_snapshot().await?;
        let snapshot = current_snapshot(&txn).await?;
        let events = self.events_between(&txn, after, u64::MAX, limit).await?;
        txn.commit().await?;
        Ok(EventRead {
            events,
            snapshot: Some(snapshot),
        })
    }

    /// Committed events with `after < revision <= up_to`, oldest first.
    pub async fn events_in(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        self.events_between(&self.db, after, up_to, limit).await
    }

    async fn events_between<C: ConnectionTrait>(
        &self,
        db: &C,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let up_to = i64::try_from(up_to).unwrap_or(i64::MAX);
        event::Entity::find()
            .filter(event::Column::Revision.gt(after as i64))
            .filter(event::Column::Revision.lte(up_to))
            .order_by_asc(event::Column::Revision)
            .limit(limit)
            .all(db)
            .await?
            .into_iter()
            .map(event_from_row)
            .collect()
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

    /// The current Postgres snapshot.
    pub async fn current_snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.begin_snapshot().await?;
        let snapshot = current_snapshot(&txn).await?;
        txn.commit().await?;
        Ok(snapshot)
    }

    /// A new transaction id (Postgres), larger than that of every
    /// transaction running before this call.
    pub async fn fresh_xid(&self) -> Result<u64, StoreError> {
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
        self.committed.clone()
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
        Ok(Some(CommitListener(listener)))
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
