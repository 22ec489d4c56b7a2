//! Reading and writing the event log, and waking watchers.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};
use serde_json::{Value, json};

use super::entities::{event, revision};
use super::{Store, StoreError, record_from_parts};
use crate::events::{ChangeType, Event, changed_fields};
use crate::model::{Field, Fields, Kind, Record};

/// Postgres channel on which every commit is announced to all replicas.
pub(super) const CHANNEL: &str = "metadata_events";

/// The last revision handed out, and the last one pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revisions {
    pub latest: u64,
    pub compacted: u64,
}

/// Takes the next revision. The counter row stays locked until commit, so
/// revisions become visible in order; call it as late as possible in the
/// transaction to keep that serialized tail short.
pub(super) async fn next_revision(txn: &DatabaseTransaction) -> Result<u64, StoreError> {
    let backend = txn.get_database_backend();
    let row = txn
        .query_one_raw(Statement::from_string(
            backend,
            "UPDATE revisions SET latest = latest + 1 WHERE id = 1 RETURNING latest",
        ))
        .await?
        .ok_or_else(|| StoreError::Internal("the revisions row is missing".into()))?;
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
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        // Delivered to every listening replica when (and only if) the
        // transaction commits.
        txn.execute_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("NOTIFY {CHANNEL}"),
        ))
        .await?;
    }
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
    })
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
            Err(err) => Err(StoreError::Unavailable(err.to_string())),
        }
    }
}

impl Store {
    pub async fn revisions(&self) -> Result<Revisions, StoreError> {
        let row = revision::Entity::find_by_id(1)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::Internal("the revisions row is missing".into()))?;
        Ok(Revisions {
            latest: row.latest as u64,
            compacted: row.compacted as u64,
        })
    }

    /// Committed events with revision > `after`, oldest first.
    pub async fn events_after(&self, after: u64, limit: u64) -> Result<Vec<Event>, StoreError> {
        event::Entity::find()
            .filter(event::Column::Revision.gt(after as i64))
            .order_by_asc(event::Column::Revision)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(event_from_row)
            .collect()
    }

    /// Deletes events committed before `cutoff`; returns how many.
    pub async fn prune_events(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let _gate = self.enter_write().await;
        let txn = self.begin_write().await?;
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
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Some(CommitListener(listener)))
    }
}
