//! A transaction on Postgres: several writes in one database transaction,
//! their revisions consecutive.
//!
//! Its rows are created (first writes) and locked first, all in one
//! statement each, in (kind, id) order: two transactions that share records
//! queue on the first one they share instead of deadlocking. Each
//! operation is then decided on its locked row (`store::write::plan`);
//! nothing is written until all have been. Then the transaction takes the
//! allocation lock exclusive (every single write takes it shared before
//! its revision, `write_change.sql`), so that the revisions its writes take
//! one after the other are consecutive, writes each record and its event
//! with the single write's statement, and commits. Readers see all of it
//! or none: it is one database transaction.

use sea_orm::sqlx::{self, PgConnection};

use super::Postgres;
use super::doubt::Trace;
use super::log::ALLOC_CLASS;
use super::write::write_change;
use crate::model::{Kind, Record};
use crate::store::StoreError;
use crate::store::conns::Reuse;
use crate::store::entities::metadata;
use crate::store::requests::{Claim, claim_postgres, record_postgres};
use crate::store::rows::{decode, record_from_row};
use crate::store::transaction::in_operation;
use crate::store::transaction::{Committed, RequestKey, kinds};
use crate::store::write::{Done, Op, Plan, now, plan, written};

/// Why a transaction's attempt stopped before its COMMIT.
enum Stopped {
    /// Nothing to write: every operation left its record as it was (and
    /// there is no request id to record).
    Unchanged(Committed),
    /// An earlier attempt with the request id committed: its outcome.
    Answered(Committed),
    /// A statement wrote nothing (schemas moved, a revision voided, a
    /// first write lost to a concurrent one): roll back and run again.
    StartOver,
    Failed(StoreError),
}

impl From<StoreError> for Stopped {
    fn from(err: StoreError) -> Self {
        Stopped::Failed(err)
    }
}

impl From<sqlx::Error> for Stopped {
    fn from(err: sqlx::Error) -> Self {
        Stopped::Failed(err.into())
    }
}

impl Postgres {
    pub(in crate::store) async fn run_transaction(
        &self,
        mut ops: Vec<Op>,
        request: Option<&RequestKey>,
        transaction_id: &str,
    ) -> Result<Committed, StoreError> {
        loop {
            let mut held = self.begin().await?;
            let attempt = self.attempt(held.connection(), &mut ops, request, transaction_id);
            match attempt.await {
                Ok((committed, done)) => {
                    ops.iter().for_each(|op| op.sent().mark());
                    let session = held.session();
                    return match self.commit(held).await {
                        Ok(()) => Ok(committed),
                        Err(err) if !err.leaves_usable() && committed.revision == 0 => {
                            // Only the request id's outcome was written: no
                            // event tells whether it committed. A retry
                            // with the id is safe either way.
                            Err(StoreError::InDoubt {
                                detail: format!("{err} (a transaction that changed nothing)"),
                            })
                        }
                        Err(err) if !err.leaves_usable() => {
                            // All or nothing: its last event tells.
                            let (kind, id) = ops
                                .iter()
                                .zip(&done)
                                .rev()
                                .find(|(_, done)| done.committed() > 0)
                                .map(|(op, _)| op.target())
                                .unwrap_or((Kind::User, ""));
                            let revision = done.iter().map(Done::committed).max().unwrap_or(0);
                            let trace = Trace::Revision { kind, id, revision };
                            self.settle_sent(session, trace, err).await?;
                            Ok(committed)
                        }
                        Err(err) => Err(err.into()),
                    };
                }
                Err(Stopped::Unchanged(committed) | Stopped::Answered(committed)) => {
                    self.roll_back(held).await?;
                    return Ok(committed);
                }
                Err(Stopped::StartOver) => {
                    self.roll_back(held).await?;
                    // The kinds' schemas may have changed (a write's guard
                    // failed): read them again before the next try.
                    for kind in kinds(&ops) {
                        self.shared.schemas.refresh(&self.shared.db, kind).await?;
                    }
                }
                Err(Stopped::Failed(err)) => {
                    // The error is the answer; a failed rollback only
                    // costs the connection.
                    let _ = self.roll_back(held).await;
                    return Err(err);
                }
            }
        }
    }

    /// Everything before the COMMIT: Ok with the outcome (and each
    /// operation's result) once every write, and the outcome under the
    /// request id if there is one, is in the transaction.
    async fn attempt(
        &self,
        connection: &mut PgConnection,
        ops: &mut [Op],
        request: Option<&RequestKey>,
        transaction_id: &str,
    ) -> Result<(Committed, Vec<Done>), Stopped> {
        if let Some(request) = request {
            // First, before any record is locked (see `requests.rs`).
            if let Claim::Answered(committed) = claim_postgres(connection, request).await? {
                return Err(Stopped::Answered(committed));
            }
        }
        let mut targets: Vec<(Kind, String, bool)> = ops
            .iter()
            .map(|op| {
                let (kind, id) = op.target();
                (kind, id.to_owned(), matches!(op, Op::Write { .. }))
            })
            .collect();
        targets.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        create_rows(connection, &targets).await?;
        let mut rows = lock_rows(connection, &targets).await?;
        let mut plans = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter_mut().enumerate() {
            let (kind, id) = op.target();
            let current = match rows.remove(&(kind, id.to_owned())) {
                Some(row) => record_from_row(row),
                None => Record::empty(kind, id.to_owned()),
            };
            let planned = plan(op, &current, &self.shared.schemas, &self.shared.db)
                .await
                .map_err(|err| Stopped::Failed(in_operation(index, err)))?;
            plans.push((current, planned));
        }
        let changes = plans
            .iter()
            .any(|(_, planned)| matches!(planned, Plan::Store { .. }));
        if changes {
            sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
                .bind(ALLOC_CLASS)
                .execute(&mut *connection)
                .await?;
        }
        let mut done = Vec::with_capacity(ops.len());
        let mut wrote = false;
        // `iter_mut`: a shared `&Op` held across an await would make the
        // future not Send (an operation's computation is not Sync).
        for (op, (current, planned)) in ops.iter_mut().zip(plans) {
            let (change, next, at, generation) = match planned {
                Plan::Unchanged(result) => {
                    done.push(result);
                    continue;
                }
                Plan::Store {
                    change,
                    next,
                    at,
                    generation,
                } => (change, next, at, generation),
            };
            if wrote {
                self.shared.pauses.transaction_step.pass().await;
            }
            let origin = op.origin().clone();
            let stored =
                write_change(connection, change, &current, &next, at, generation, &origin).await?;
            let Some(revision) = stored else {
                return Err(Stopped::StartOver);
            };
            wrote = true;
            done.push(written(op, Record { revision, ..next }));
        }
        let committed = Committed::of(&done, transaction_id);
        match request {
            Some(request) => record_postgres(connection, request, &committed).await?,
            None if !changes => return Err(Stopped::Unchanged(committed)),
            None => {}
        }
        Ok((committed, done))
    }
}

/// Empty rows (version 0) for the records written that have none, so that
/// each can be locked: a concurrent first write of the same id waits for
/// this transaction instead of racing it. In (kind, id) order, as locks are
/// taken.
async fn create_rows(
    connection: &mut PgConnection,
    targets: &[(Kind, String, bool)],
) -> Result<(), StoreError> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) = targets
        .iter()
        .filter(|(_, _, written)| *written)
        .map(|(kind, id, _)| (kind.as_str(), id.as_str()))
        .unzip();
    if kinds.is_empty() {
        return Ok(());
    }
    let at = now();
    sqlx::query(
        "INSERT INTO metadata (kind, id, public_metadata, private_metadata, unsafe_metadata, \
         version, revision, created_at, updated_at) \
         SELECT t.kind, t.id, '{}'::jsonb, '{}'::jsonb, '{}'::jsonb, 0, 0, $3, $3 \
         FROM unnest($1::text[], $2::text[]) AS t(kind, id) ORDER BY t.kind, t.id \
         ON CONFLICT (kind, id) DO NOTHING",
    )
    .bind(kinds)
    .bind(ids)
    .bind(at)
    .execute(connection)
    .await?;
    Ok(())
}

/// Locks the rows of `targets` in (kind, id) order; the rows found.
async fn lock_rows(
    connection: &mut PgConnection,
    targets: &[(Kind, String, bool)],
) -> Result<std::collections::HashMap<(Kind, String), metadata::Model>, StoreError> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) = targets
        .iter()
        .map(|(kind, id, _)| (kind.as_str(), id.as_str()))
        .unzip();
    let rows = sqlx::query(
        "SELECT m.* FROM metadata m \
         JOIN unnest($1::text[], $2::text[]) AS t(kind, id) ON m.kind = t.kind AND m.id = t.id \
         ORDER BY m.kind, m.id FOR UPDATE OF m",
    )
    .bind(kinds)
    .bind(ids)
    .fetch_all(connection)
    .await?;
    rows.into_iter()
        .map(|row| {
            let row: metadata::Model = decode(row)?;
            let kind = Kind::parse(&row.kind)
                .ok_or_else(|| StoreError::Internal(format!("unknown kind {:?}", row.kind)))?;
            Ok(((kind, row.id.clone()), row))
        })
        .collect()
}
