//! The Postgres event log: revisions from a sequence, so writers to
//! different ids never wait for each other, and *voids* that keep the log
//! dense.
//!
//! Every revision up to the dispatcher's high-water mark is a row, either
//! an event or a void, the mark of a revision that was taken and never
//! committed. A writer holds an advisory lock keyed by its revision from
//! the moment it takes it until it ends (`write_change.sql`), so the
//! dispatcher, finding a revision missing below a visible one, waits for
//! that writer alone ([`Postgres::claim_revision`]) and then, if the
//! revision is still missing, writes the void itself. The void's row makes
//! a later commit of that revision impossible (the writer's insert finds it
//! and the writer starts over with a new revision), so nothing can appear
//! behind a revision that has been delivered.

use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, RuntimeErr, Statement, TransactionTrait};

use super::Postgres;
use crate::store::rows::VOID;
use crate::store::{Claim, StoreError, log};

/// The first key of the advisory locks writers hold on their revision (the
/// second is the revision modulo 2^31): keeps them apart from any other
/// advisory lock in the database. A collision could only make the
/// dispatcher wait longer, never skip: voids are what guarantee order.
/// `write_change.sql` spells it as a number.
pub(super) const LOCK_CLASS: i32 = 0x6d65_7461; // "meta"

/// The advisory lock writers take, shared, before they take a revision,
/// and a transaction exclusive while it takes its revisions, so that they
/// are consecutive (second key 0). `write_change.sql` and
/// `transaction.rs`'s statement spell it as a number; tests check they do.
#[cfg(test)]
pub(super) const ALLOC_CLASS: i32 = 0x6d65_7462; // "metb"

/// The advisory lock key of a revision, as SQL arguments.
fn lock_key(revision: &str) -> String {
    format!("{LOCK_CLASS}, ({revision} % 2147483648)::int4")
}

/// The statement a Postgres writer takes its revision with: `latest`, and
/// `owned`, whether it holds the revision's lock. Public so that tests can
/// play a writer that stalls or rolls back at a chosen moment.
pub fn take_revision_sql() -> String {
    format!(
        "SELECT r AS latest, pg_try_advisory_xact_lock({}) AS owned \
         FROM nextval('event_revisions') AS r",
        lock_key("r")
    )
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

impl Postgres {
    /// Postgres: settles a revision found missing below a visible one.
    /// Waits (at most `wait`) for the writer that took it, and only for
    /// that writer; if the revision is still missing once it has ended, it
    /// rolled back (or never took its lock), and a void is written in its
    /// place so that it can never commit later.
    pub(in crate::store) async fn claim_revision(
        &self,
        revision: u64,
        wait: std::time::Duration,
    ) -> Result<Claim, StoreError> {
        let backend = DatabaseBackend::Postgres;
        let txn = self.shared.db.begin().await?;
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

    /// A revision below which nothing can commit any more: the newest
    /// visible one, once every transaction that might still commit an older
    /// one has ended (waiting at most `wait`).
    ///
    /// Every writer owns a transaction id before it takes its revision (it
    /// holds a row lock), so a revision missing below a visible one belongs
    /// to a transaction running when the first snapshot was taken, or to
    /// one that rolled back.
    pub(in crate::store) async fn settled_revision(
        &self,
        wait: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let txn = self.begin_snapshot().await?;
        let compacted = log::compacted_revision(&self.shared.db).await?;
        let first = current_snapshot(&txn).await?;
        let newest = log::newest_revision(&txn).await?.max(compacted);
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
            .shared
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
    pub(in crate::store) async fn begin_snapshot(
        &self,
    ) -> Result<sea_orm::DatabaseTransaction, StoreError> {
        let options = sea_orm::TransactionOptions {
            isolation_level: Some(sea_orm::IsolationLevel::RepeatableRead),
            access_mode: Some(sea_orm::AccessMode::ReadOnly),
            ..Default::default()
        };
        Ok(self.shared.db.begin_with_options(options).await?)
    }
}

async fn current_snapshot(txn: &sea_orm::DatabaseTransaction) -> Result<Snapshot, StoreError> {
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
