//! The event log and who hears of it, as the dispatcher, Watch and the
//! relay see it. Off the hot path the same on both backends (catch-up
//! reads of Watch streams, the compaction mark, the newest revision,
//! pruning); the dispatcher's tail of the log, gaps, notifications and
//! the relay's lease are each backend's (`sqlite/`, `postgres/`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use super::entities::{event, revision};
use super::postgres::{AnnouncerState, CommitAnnouncer, CommitListener, Lease};
use super::rows::{Logged, VOID, event_from_row};
use super::{Backend, Store, StoreError};
use crate::model::{Event, Kind};

/// Most events one transaction writes (a Commit's operation limit, with
/// room to spare): how far a read of the log looks past its limit to end
/// at a transaction's end.
pub const MAX_TRANSACTION_EVENTS: u64 = 128;

impl Store {
    /// Every event up to this revision has been pruned.
    pub async fn compacted_revision(&self) -> Result<u64, StoreError> {
        compacted_revision(&self.shared.db).await
    }

    /// The log with `after < revision <= up_to`, oldest first, at most
    /// `limit` revisions, and whole transactions: a read that `limit` or
    /// `up_to` would end inside one goes on to its last event (a
    /// transaction's events are consecutive and commit together: if one
    /// is visible, all are), so that whoever publishes what it read (the
    /// dispatcher, the relay) never publishes part of a transaction. The
    /// dispatcher's and the relay's tail, on a connection of the backend's
    /// own.
    pub async fn read_log(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        let mut entries = self.read_log_once(after, up_to, limit).await?;
        // Only a read that `limit` or `up_to` stopped can end inside one:
        // below both, the rest of a transaction would have been read too.
        let stopped = entries.len() as u64 >= limit
            || entries.last().is_some_and(|entry| entry.revision >= up_to);
        if stopped
            && let Some(Logged {
                revision,
                event: Some(event),
            }) = entries.last()
            && !event.origin.transaction_id.is_empty()
        {
            let (last, transaction) = (*revision, event.origin.transaction_id.clone());
            // A transaction's events are consecutive: the rest of this one
            // is what follows, up to its end.
            let rest = self
                .read_log_once(last, u64::MAX, MAX_TRANSACTION_EVENTS)
                .await?;
            entries.extend(rest.into_iter().take_while(|entry| {
                entry
                    .event
                    .as_ref()
                    .is_some_and(|e| e.origin.transaction_id == transaction)
            }));
        }
        Ok(entries)
    }

    async fn read_log_once(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.read_log(after, up_to, limit).await,
            Backend::Postgres(postgres) => postgres.read_log(after, up_to, limit).await,
        }
    }

    /// The revisions after `after` in the log (events and voids alike),
    /// oldest first, at most `limit`: how the dispatcher moves its mark
    /// while nobody needs the events themselves.
    pub async fn read_revisions(&self, after: u64, limit: u64) -> Result<Vec<u64>, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.read_revisions(after, limit).await,
            Backend::Postgres(postgres) => postgres.read_revisions(after, limit).await,
        }
    }

    /// The events of `kind` (and of `ids`, unless empty) with
    /// `after < revision <= up_to`, oldest first, at most `limit`: a Watch
    /// stream's catch-up, filtered in the database.
    pub async fn read_events_of(
        &self,
        kind: Kind,
        ids: &std::collections::HashSet<String>,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        read_events_of(&self.shared.db, kind, ids, after, up_to, limit).await
    }

    /// Settles a revision found missing below a visible one, where
    /// revisions are not dense: waits (at most `wait`) for the writer that
    /// took it, and only for that writer; if the revision is still missing
    /// once it has ended, a void is written in its place so that it can
    /// never commit later. With dense revisions nothing can fill the gap:
    /// settled at once.
    pub async fn claim_revision(&self, revision: u64, wait: Duration) -> Result<Claim, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Claim::Settled),
            Backend::Postgres(postgres) => postgres.claim_revision(revision, wait).await,
        }
    }

    /// The newest committed revision (older ones may still be in flight).
    pub async fn newest_revision(&self) -> Result<u64, StoreError> {
        let txn = match &self.backend {
            Backend::Sqlite(_) => self.shared.db.begin().await?,
            Backend::Postgres(postgres) => postgres.begin_snapshot().await?,
        };
        let newest = newest_revision(&txn).await?;
        txn.commit().await?;
        Ok(newest)
    }

    /// A revision below which nothing can commit any more: the newest
    /// visible one, once every transaction that might still commit an older
    /// one has ended (waiting at most `wait`).
    pub async fn settled_revision(&self, wait: Duration) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.settled_revision().await,
            Backend::Postgres(postgres) => postgres.settled_revision(wait).await,
        }
    }

    /// Deletes events committed before `cutoff`; returns how many.
    pub async fn prune_events(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        prune_events(&self.shared.db, cutoff).await
    }

    /// The in-process signal raised after every commit of this store.
    pub fn commit_notifier(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.shared.commits.local.clone()
    }

    /// Where other processes write too, the task that tells them of this
    /// store's commits (run it with [`CommitAnnouncer::run`]).
    pub fn commit_announcer(&self) -> Option<CommitAnnouncer> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(postgres) => Some(postgres.commit_announcer()),
        }
    }

    /// The commit announcer's counts of notifications (None without one).
    pub fn announcer_state(&self) -> Option<&AnnouncerState> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(postgres) => Some(postgres.announcer_state()),
        }
    }

    /// Where other processes write too, a listener for their commits.
    pub async fn listen_for_commits(&self) -> Result<Option<CommitListener>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(postgres) => postgres.listen_for_commits().await.map(Some),
        }
    }

    /// Takes the lease called `name` if no other process holds it: `None`
    /// when another does. Always granted where one process owns the store.
    pub async fn try_lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Some(Lease::sole())),
            Backend::Postgres(postgres) => postgres.try_lease(name).await,
        }
    }
}

/// What [`super::Store::claim_revision`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The revision is in the log now, as an event or a void.
    Settled,
    /// Its writer still runs: look again later.
    Owned,
}

/// Revisions are below 2^63 (the database's bigint); a bound above that
/// means "no bound".
pub(super) fn bound(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

/// Every event up to this revision has been pruned.
pub(super) async fn compacted_revision(db: &impl ConnectionTrait) -> Result<u64, StoreError> {
    let row = revision::Entity::find_by_id(1)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::Internal("the revisions row is missing".into()))?;
    Ok(row.compacted as u64)
}

/// The newest revision in the log as `db` sees it.
pub(super) async fn newest_revision(db: &impl ConnectionTrait) -> Result<u64, StoreError> {
    let row = event::Entity::find()
        .order_by_desc(event::Column::Revision)
        .one(db)
        .await?;
    Ok(row.map_or(0, |r| r.revision as u64))
}

/// The events of `kind` (and of `ids`, unless empty) with
/// `after < revision <= up_to`, oldest first, at most `limit`. The filter
/// runs in the database: a replay that wants a few ids out of a long
/// history does not decode the rest.
pub(super) async fn read_events_of(
    db: &DatabaseConnection,
    kind: Kind,
    ids: &std::collections::HashSet<String>,
    after: u64,
    up_to: u64,
    limit: u64,
) -> Result<Vec<Event>, StoreError> {
    let mut query = event::Entity::find()
        .filter(event::Column::Revision.gt(bound(after)))
        .filter(event::Column::Revision.lte(bound(up_to)))
        .filter(event::Column::Kind.eq(kind.as_str()))
        .filter(event::Column::ChangeType.ne(VOID));
    if !ids.is_empty() {
        query = query.filter(event::Column::Id.is_in(ids.iter().cloned()));
    }
    query
        .order_by_asc(event::Column::Revision)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(event_from_row)
        .collect()
}

/// Deletes events committed before `cutoff`; returns how many.
pub(super) async fn prune_events(
    db: &DatabaseConnection,
    cutoff: DateTime<Utc>,
) -> Result<u64, StoreError> {
    // On SQLite this waits (busy timeout) while the committer writes.
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    let txn = db.begin_with_options(options).await?;
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
