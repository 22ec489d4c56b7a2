//! The Postgres write path.
//!
//! A Merge or Replace of a row that exists first tries the short way
//! ([`Postgres::write_unlocked`]): a batched point read without a lock,
//! then one statement, its own transaction, that writes only if the row is
//! still at the revision read (`write_change.sql`). Otherwise, and for
//! every delete and first write, a transaction locks the row (`SELECT ...
//! FOR UPDATE`; a first write inserts an empty row with `ON CONFLICT DO
//! NOTHING` before it locks, so concurrent creators queue on the row
//! instead of racing, and neither fails nor burns a revision) and runs the
//! same statement. A COMMIT, once due, runs in a task of its own: it
//! completes even if the caller stops waiting, who is then told that the
//! write may have happened (`Sent`). A write whose connection fails after
//! it was sent is settled before it is answered: applied, or certainly not
//! (`doubt.rs`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, PgConnection, Row};
use tracing::Instrument;

use super::doubt::{Trace, end_session_later, not_applied};
use super::{Postgres, sqlstate_is};
use crate::model::{ChangeType, Kind, Origin, Record};
use crate::store::StoreError;
use crate::store::conns::{Held, Reuse, within};
use crate::store::entities::metadata;
use crate::store::rows::{changed_fields_json, decode, record_from_row, row_from_record, snapshot};
use crate::store::write::{Done, Op, Plan, Step, now, plan, written};

/// `write_change.sql` without its comments, which would otherwise travel
/// with every prepare and fill the statement's name in `pg_stat_statements`.
static WRITE_CHANGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("write_change.sql")
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
});

impl Postgres {
    pub(in crate::store) async fn submit(&self, mut op: Op) -> Result<Done, StoreError> {
        let unlocked = tracing::info_span!(target: crate::otel::TARGET, "db.write_unlocked");
        if let Some(done) = self.write_unlocked(&mut op).instrument(unlocked).await? {
            return Ok(done);
        }
        let span = tracing::info_span!(
            target: crate::otel::TARGET,
            "db.transaction",
            kind = op.kind().as_str(),
            attempts = tracing::field::Empty,
        );
        self.run_locked(op, &span).instrument(span.clone()).await
    }

    /// A Merge or Replace of a row that exists, in two round trips: None
    /// when it did not write (a first write, a row that moved on or is
    /// locked by another writer), and the caller runs it in a transaction
    /// that locks the row first: a busy row costs a retry, never a lost
    /// update.
    async fn write_unlocked(&self, op: &mut Op) -> Result<Option<Done>, StoreError> {
        let Op::Write { kind, id, sent, .. } = op else {
            return Ok(None);
        };
        let (kind, sent) = (*kind, sent.clone());
        let current = self.reader.get(kind, id).await?;
        if current.revision == 0 {
            // Never written: the row is created under a lock.
            return Ok(None);
        }
        // A read issued after the call arrived: a refusal or a no-op
        // decided on it is one at that moment, as for a Get.
        let (change, next, at, generation) =
            match plan(op, &current, &self.shared.schemas, &self.shared.db).await? {
                Plan::Unchanged(done) => return Ok(Some(done)),
                Plan::Store {
                    change,
                    next,
                    at,
                    generation,
                } => (change, next, at, generation),
            };
        // The connection first: a caller that gives up while waiting for
        // one is told its write certainly did not happen, and it does not.
        let mut held = self.conns.get().await?;
        let session = held.session();
        sent.mark();
        let shared = self.shared.clone();
        let origin = op.origin().clone();
        let write = tokio::spawn(async move {
            shared.pauses.commit.pass().await;
            let limit = held.limit();
            let stored = within(
                limit,
                write_change(
                    held.connection(),
                    change,
                    &current,
                    &next,
                    at,
                    generation,
                    &origin,
                ),
            )
            .await;
            held.release(&stored);
            if matches!(stored, Ok(Some(_))) {
                shared.commits.committed();
            }
            (stored, current, next)
        });
        let (stored, current, mut next) = write
            .await
            .map_err(|err| StoreError::Internal(format!("the write task failed: {err}")))?;
        next.revision = match stored {
            Ok(Some(revision)) => revision,
            Ok(None) => {
                sent.unmark();
                return Ok(None);
            }
            Err(err) if !err.leaves_usable() => {
                let snapshot = snapshot(&next);
                let trace = Trace::FirstAfter {
                    kind,
                    id: &next.id,
                    after: current.revision,
                    snapshot: &snapshot,
                };
                self.settle_sent(session, trace, err).await?
            }
            Err(err) => return Err(err.into()),
        };
        Ok(Some(written(op, next)))
    }

    /// The revision of a write whose connection failed after it was sent,
    /// if it committed; UNAVAILABLE if it certainly did not (`doubt.rs`).
    pub(super) async fn settle_sent(
        &self,
        session: Option<Arc<str>>,
        trace: Trace<'_>,
        failure: sqlx::Error,
    ) -> Result<u64, StoreError> {
        let Some(session) = session else {
            return Err(StoreError::InDoubt {
                detail: format!("{failure} (on a connection without a session name)"),
            });
        };
        match self.settle(&session, trace, &failure).await? {
            Some(revision) => {
                // Its commit was not seen here: the dispatcher and the
                // announcer still have to hear of it.
                self.shared.commits.committed();
                Ok(revision)
            }
            None => Err(not_applied(failure)),
        }
    }

    async fn run_locked(&self, mut op: Op, span: &tracing::Span) -> Result<Done, StoreError> {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            span.record("attempts", i64::from(attempts));
            let mut held = self.begin().await?;
            match self.step(held.connection(), &mut op).await {
                Ok(Step::Unchanged(done)) => {
                    self.roll_back(held).await?;
                    return Ok(done);
                }
                Ok(Step::Written(done)) => {
                    op.sent().mark();
                    let session = held.session();
                    return match self.commit(held).await {
                        Ok(()) => Ok(done),
                        Err(err) if !err.leaves_usable() => {
                            let (kind, id) = op.target();
                            let trace = Trace::Revision {
                                kind,
                                id,
                                revision: done.committed(),
                            };
                            self.settle_sent(session, trace, err).await?;
                            Ok(done)
                        }
                        Err(err) => Err(err.into()),
                    };
                }
                Ok(Step::StartOver) => {
                    self.roll_back(held).await?;
                    // The kind's schemas may have changed (the write's
                    // guard failed): read them again before the next try.
                    self.shared
                        .schemas
                        .refresh(&self.shared.db, op.kind())
                        .await?;
                }
                Err(err) => {
                    // The error is the answer; a failed rollback only
                    // costs the connection.
                    let _ = self.roll_back(held).await;
                    return Err(err);
                }
            }
        }
    }

    /// A connection in a transaction; the wait is what the acquire
    /// histogram records.
    pub(super) async fn begin(&self) -> Result<Held<PgConnection>, StoreError> {
        let timer = self.shared.acquire_timer.get().map(|h| h.start_timer());
        let mut held = self.conns.get().await?;
        // On failure the connection is dropped, and closed with it.
        sqlx::raw_sql("BEGIN").execute(held.connection()).await?;
        drop(timer);
        Ok(held)
    }

    /// Commits in a task of its own (see the module's comment).
    pub(super) async fn commit(&self, mut held: Held<PgConnection>) -> Result<(), sqlx::Error> {
        let shared = self.shared.clone();
        let commit = tokio::spawn(async move {
            shared.pauses.commit.pass().await;
            let limit = held.limit();
            let committed = within(limit, sqlx::raw_sql("COMMIT").execute(held.connection())).await;
            // A failed COMMIT may leave the transaction open: the
            // connection is closed (on drop), not reused.
            if committed.is_ok() {
                held.release(&committed);
            }
            committed?;
            shared.commits.committed();
            Ok(())
        });
        // A commit task that failed is a COMMIT in doubt like any other.
        commit
            .await
            .map_err(|err| sqlx::Error::Protocol(format!("the commit task failed: {err}")))?
    }

    /// Rolls the transaction back. If that fails, the connection is lost;
    /// its session, if a partition keeps it open, would go on holding the
    /// row's lock, so it is ended (`doubt.rs`).
    pub(super) async fn roll_back(&self, mut held: Held<PgConnection>) -> Result<(), StoreError> {
        let session = held.session();
        let rolled_back = sqlx::raw_sql("ROLLBACK").execute(held.connection()).await;
        held.release(&rolled_back);
        if let (Err(err), Some(session)) = (&rolled_back, session)
            && !err.leaves_usable()
        {
            end_session_later(&self.shared.db, session);
        }
        rolled_back?;
        Ok(())
    }

    /// One operation inside the transaction on `connection`: lock the row,
    /// decide, write the row and append the event. An error before
    /// anything was written leaves the transaction as it was.
    async fn step(&self, connection: &mut PgConnection, op: &mut Op) -> Result<Step, StoreError> {
        let (kind, id) = match op {
            Op::Write { kind, id, .. } | Op::Delete { kind, id, .. } => (*kind, id.clone()),
        };
        let row = lock_row(connection, kind, &id).await?;
        let exists = row.is_some();
        let current = row.map_or_else(|| Record::empty(kind, id.clone()), record_from_row);
        let (change, next, at, generation) =
            match plan(op, &current, &self.shared.schemas, &self.shared.db).await? {
                Plan::Unchanged(done) => return Ok(Step::Unchanged(done)),
                Plan::Store {
                    change,
                    next,
                    at,
                    generation,
                } => (change, next, at, generation),
            };
        if !exists {
            // A first write: an empty row to lock, so that concurrent
            // first writes to this id queue behind this one (the insert
            // waits for ours) instead of both taking a revision and one
            // failing. Nothing but the row lock is new: the fields are
            // still the empty ones the write was computed from.
            create_row(connection, kind, &id).await?;
            if lock_row(connection, kind, &id)
                .await?
                .is_none_or(|row| row.version != 0)
            {
                // Another first write committed before our insert: its
                // value is what this one must build on.
                return Ok(Step::StartOver);
            }
        }
        match write_change(
            connection,
            change,
            &current,
            &next,
            at,
            generation,
            op.origin(),
        )
        .await?
        {
            Some(revision) => {
                let next = Record { revision, ..next };
                Ok(Step::Written(written(op, next)))
            }
            None => Ok(Step::StartOver),
        }
    }
}

async fn lock_row(
    connection: &mut PgConnection,
    kind: Kind,
    id: &str,
) -> Result<Option<metadata::Model>, StoreError> {
    let row = sqlx::query("SELECT * FROM metadata WHERE kind = $1 AND id = $2 FOR UPDATE")
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(connection)
        .await?;
    row.map(decode).transpose()
}

/// Inserts an empty row (version 0, `{}` fields, revision 0) unless one
/// exists; waits for a concurrent insert of the same id to end.
async fn create_row(connection: &mut PgConnection, kind: Kind, id: &str) -> Result<(), StoreError> {
    let row = row_from_record(&Record::empty(kind, id.to_owned()), now());
    sqlx::query(
        "INSERT INTO metadata (kind, id, public_metadata, private_metadata, unsafe_metadata, \
         version, revision, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (kind, id) DO NOTHING",
    )
    .bind(row.kind)
    .bind(row.id)
    .bind(row.public_metadata)
    .bind(row.private_metadata)
    .bind(row.unsafe_metadata)
    .bind(row.version)
    .bind(row.revision)
    .bind(row.created_at)
    .bind(row.updated_at)
    .execute(connection)
    .await?;
    Ok(())
}

/// Stores `next` as the row's new state and appends the change's event
/// under a new revision (`write_change.sql`), which it returns. None when nothing was
/// written: the row moved on since `before` was read (its revision is
/// unique to each write, so this cannot be fooled the way a version could,
/// by a delete and new writes), another transaction holds its lock
/// (NOWAIT: the caller then waits for the lock in a transaction, before
/// anything is sent), the revision taken was claimed as a void, or the
/// kind's schemas moved past `generation`.
pub(super) async fn write_change(
    connection: &mut PgConnection,
    change: ChangeType,
    before: &Record,
    next: &Record,
    at: DateTime<Utc>,
    generation: Option<i64>,
    origin: &Origin,
) -> Result<Option<u64>, sqlx::Error> {
    let row = row_from_record(next, at);
    let answer = sqlx::query(sqlx::AssertSqlSafe(WRITE_CHANGE.as_str()))
        .bind(row.kind)
        .bind(row.id)
        .bind(row.public_metadata)
        .bind(row.private_metadata)
        .bind(row.unsafe_metadata)
        .bind(row.version)
        .bind(row.created_at)
        .bind(row.updated_at)
        .bind(change.as_str())
        .bind(changed_fields_json(before, next))
        .bind(snapshot(before))
        .bind(snapshot(next))
        .bind(before.revision as i64)
        .bind(generation)
        .bind(&origin.actor)
        .bind(&origin.trace_id)
        .bind(&origin.transaction_id)
        .fetch_optional(connection)
        .await;
    let answer = match answer {
        Ok(Some(answer)) => answer,
        // The row moved on (or is not there), or the schemas did.
        Ok(None) => return Ok(None),
        // Locked by another writer (NOWAIT), or a void holds the revision.
        Err(err) if sqlstate_is(&err, "55P03") || sqlstate_is(&err, "23505") => return Ok(None),
        Err(err) => return Err(err),
    };
    if !answer.try_get::<bool, _>("owned")? {
        return Ok(None);
    }
    let stored: i64 = answer.try_get("stored")?;
    let appended: i64 = answer.try_get("appended")?;
    if stored != 1 || appended != 1 {
        return Err(sqlx::Error::Protocol(
            "a write locked its row but did not store it".into(),
        ));
    }
    Ok(Some(answer.try_get::<i64, _>("latest")? as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_statement_locks_revisions_under_the_lock_class() {
        let class = super::super::log::LOCK_CLASS.to_string();
        assert!(super::WRITE_CHANGE.contains(&format!("pg_try_advisory_xact_lock({class}, ")));
        let alloc = super::super::log::ALLOC_CLASS.to_string();
        assert!(super::WRITE_CHANGE.contains(&format!("pg_advisory_xact_lock_shared({alloc}, 0)")));
    }
}
