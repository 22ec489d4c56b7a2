//! A transaction on Postgres: several writes in one database transaction,
//! their revisions consecutive, in a fixed number of statements whatever
//! the number of writes.
//!
//! Its rows are created (first writes) and locked first, all in one
//! statement each, in (kind, id) order: two transactions that share records
//! queue on the first one they share instead of deadlocking. Each
//! operation is then decided on its locked row (`store::transaction`'s
//! `Decided`); nothing is written until all have been. Then one statement
//! takes all of its revisions under the allocation lock, held exclusive
//! only within that statement (every single write takes it shared before
//! its revision, `write_change.sql`), so that they are consecutive; one
//! statement stores every row, one appends every event, and the COMMIT
//! makes them visible together: readers see all of it or none.

use sea_orm::sqlx::{self, PgConnection, Row};

use super::Postgres;
use super::doubt::Trace;
use crate::model::{Kind, Origin};
use crate::store::StoreError;
use crate::store::conns::Reuse;
use crate::store::entities::{event, metadata};
use crate::store::requests::{Claim, claim_postgres, record_postgres};
use crate::store::rows::{decode, event_row, record_from_row, row_from_record};
use crate::store::transaction::{Committed, Decided, RequestKey, in_operation, kinds};
use crate::store::write::{Done, Op, now};

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
    /// Failed where the session may still hold the allocation lock
    /// ([`take_revisions`]): the connection is closed, not rolled back
    /// for reuse.
    Poisoned(StoreError),
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
                Err(Stopped::Poisoned(err)) => {
                    // Dropped unreleased: closed, its session's locks with it.
                    drop(held);
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
        let current = create_and_lock_rows(connection, &targets)
            .await?
            .into_iter()
            .map(|(target, row)| (target, record_from_row(row)))
            .collect();
        let mut decided = Decided::decide(ops, current, &self.shared)
            .await
            .map_err(|(index, err)| Stopped::Failed(in_operation(index, err)))?;
        let changes = !decided.changes.is_empty();
        if changes {
            let Some(first) = take_revisions_and_store(connection, &decided).await? else {
                return Err(Stopped::StartOver);
            };
            decided.number(first);
            self.shared.pauses.transaction_step.pass().await;
            let origins: Vec<&Origin> = ops.iter().map(Op::origin).collect();
            append_events(connection, &decided, &origins).await?;
        }
        let done = decided.answers(ops);
        let committed = Committed::of(&done, transaction_id);
        match request {
            Some(request) => record_postgres(connection, request, &committed).await?,
            None if !changes => return Err(Stopped::Unchanged(committed)),
            None => {}
        }
        Ok((committed, done))
    }
}

/// Creates empty rows (version 0) for the records written that have none,
/// in the order given ((kind, id), sorted by the caller), then locks the
/// others in that order, in one statement: a concurrent first write of the
/// same id waits for this transaction instead of racing it. The rows found
/// existing, locked (the created ones are this transaction's, locked by
/// being uncommitted, and read as never written).
///
/// Each row is found by its key, one index lookup per target (a LATERAL
/// join), whatever the planner thinks of the table's size: a plan cached
/// while the table was small, or never analyzed, would otherwise hash-join
/// a scan of the whole table for every transaction.
async fn create_and_lock_rows(
    connection: &mut PgConnection,
    targets: &[(Kind, String, bool)],
) -> Result<std::collections::HashMap<(Kind, String), metadata::Model>, StoreError> {
    let (kinds, ids): (Vec<&str>, Vec<&str>) = targets
        .iter()
        .map(|(kind, id, _)| (kind.as_str(), id.as_str()))
        .unzip();
    let written: Vec<bool> = targets.iter().map(|(_, _, written)| *written).collect();
    let rows = sqlx::query(
        "WITH created AS (INSERT INTO metadata (kind, id, public_metadata, private_metadata, \
             unsafe_metadata, version, revision, created_at, updated_at) \
             SELECT t.kind, t.id, '{}'::jsonb, '{}'::jsonb, '{}'::jsonb, 0, 0, $4, $4 \
             FROM unnest($1::text[], $2::text[], $3::bool[]) WITH ORDINALITY \
                 AS t(kind, id, written, ord) \
             WHERE t.written ORDER BY t.ord \
             ON CONFLICT (kind, id) DO NOTHING RETURNING 1) \
         SELECT m.*, (SELECT count(*) FROM created) AS created \
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(kind, id, ord) \
         CROSS JOIN LATERAL (SELECT * FROM metadata \
             WHERE metadata.kind = t.kind AND metadata.id = t.id FOR UPDATE) m \
         ORDER BY t.ord",
    )
    .bind(kinds)
    .bind(ids)
    .bind(written)
    .bind(now())
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

/// Takes one revision per change, consecutive, each with its writer's lock
/// (as `write_change.sql` takes one), and stores every changed row at its
/// revision, in one statement: the first revision, or None when the
/// dispatcher voided one of them first or a kind's schemas moved on (roll
/// back and start over). The allocation lock is held exclusive only
/// within this statement (a session lock, taken and let go in it), not
/// until the COMMIT: single writes take it shared before their revision,
/// so none takes one in between, and transactions wait for each other
/// only here. Should the statement fail halfway, the caller closes the
/// connection, and the session's lock goes with it.
///
/// A row is stored only while its kind's schema generation is still the
/// one it was checked under: this statement's snapshot is taken after the
/// rows were locked, so after any SetSchema that held the table.
async fn take_revisions_and_store(
    connection: &mut PgConnection,
    decided: &Decided,
) -> Result<Option<u64>, Taking> {
    let count = decided.changes.len();
    let rows: Vec<metadata::Model> = decided
        .changes
        .iter()
        .map(|change| row_from_record(&change.next, change.at))
        .collect();
    let text =
        |f: fn(&metadata::Model) -> &String| rows.iter().map(|r| f(r).clone()).collect::<Vec<_>>();
    let json = |f: fn(&metadata::Model) -> &serde_json::Value| {
        rows.iter().map(|r| f(r).clone()).collect::<Vec<_>>()
    };
    let row = sqlx::query(TAKE_AND_STORE)
        .bind(count as i64)
        .bind(text(|r| &r.kind))
        .bind(text(|r| &r.id))
        .bind(json(|r| &r.public_metadata))
        .bind(json(|r| &r.private_metadata))
        .bind(json(|r| &r.unsafe_metadata))
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .bind(
            decided
                .changes
                .iter()
                .map(|c| c.generation)
                .collect::<Vec<_>>(),
        )
        .fetch_one(connection)
        .await
        .map_err(Taking)?;
    let revisions: Vec<i64> = row.try_get("revisions").map_err(Taking)?;
    let owned: bool = row.try_get("owned").map_err(Taking)?;
    let stored: i64 = row.try_get("stored").map_err(Taking)?;
    let freed: bool = row.try_get("freed").map_err(Taking)?;
    if !freed {
        return Err(Taking(sqlx::Error::Protocol(
            "the allocation lock was not let go".into(),
        )));
    }
    let consecutive = revisions.windows(2).all(|pair| pair[1] == pair[0] + 1);
    if revisions.len() != count || !consecutive {
        return Err(Taking(sqlx::Error::Protocol(format!(
            "{count} revisions taken under the allocation lock are not consecutive: {revisions:?}"
        ))));
    }
    Ok((owned && stored == count as i64).then(|| revisions[0] as u64))
}

/// An error of [`take_revisions_and_store`]: the session may still hold
/// the allocation lock, so its connection must not be reused.
struct Taking(sqlx::Error);

impl From<Taking> for Stopped {
    fn from(Taking(err): Taking) -> Self {
        Stopped::Poisoned(err.into())
    }
}

/// The advisory keys are `LOCK_CLASS` and `ALLOC_CLASS` of `log.rs`, as in
/// `write_change.sql`. Every CTE that takes or lets go of a lock is
/// MATERIALIZED, so each runs once and in the order they read each other:
/// the lock, the revisions, each one's writer lock, then (after counting
/// them all) the unlock, which `numbered` reads in a column of its own (in
/// an AND beside `owned`, it could be skipped). The rows are stored only
/// if every revision is owned, the n-th change at the first revision plus
/// n - 1, each found by its key (then by its row's address: they are locked
/// by this transaction, so it cannot move) rather than by a join the
/// planner may make a scan of the whole table (see
/// [`create_and_lock_rows`]).
const TAKE_AND_STORE: &str = "WITH alloc AS MATERIALIZED (SELECT pg_advisory_lock(1835365474, 0)), \
     rev AS MATERIALIZED (SELECT nextval('event_revisions') AS r \
         FROM alloc, generate_series(1, $1::bigint)), \
     taken AS MATERIALIZED (SELECT r, \
         pg_try_advisory_xact_lock(1835365473, (r % 2147483648)::int4) AS owned FROM rev), \
     freed AS MATERIALIZED (SELECT pg_advisory_unlock(1835365474, 0) AS freed \
         FROM (SELECT count(*) FROM taken) t), \
     numbered AS MATERIALIZED (SELECT array_agg(r ORDER BY r) AS revisions, min(r) AS first, \
         bool_and(owned) AS owned, (SELECT bool_and(freed) FROM freed) AS freed FROM taken), \
     stored AS (UPDATE metadata m SET public_metadata = u.public, \
         private_metadata = u.private, unsafe_metadata = u.unsafe, version = u.version, \
         revision = numbered.first + u.ord - 1, created_at = u.created_at, \
         updated_at = u.updated_at \
         FROM numbered, (SELECT found.row_id, u.* \
             FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::jsonb[], \
                 $7::bigint[], $8::timestamptz[], $9::timestamptz[], $10::bigint[]) \
                 WITH ORDINALITY AS u(kind, id, public, private, unsafe, version, created_at, \
                 updated_at, generation, ord) \
             CROSS JOIN LATERAL (SELECT ctid AS row_id FROM metadata \
                 WHERE metadata.kind = u.kind AND metadata.id = u.id OFFSET 0) found) u \
         WHERE numbered.owned AND m.ctid = u.row_id AND (u.generation IS NULL \
             OR (SELECT COALESCE(SUM(s.version), 0) FROM metadata_schemas s \
                 WHERE s.kind = u.kind) = u.generation) \
         RETURNING 1) \
     SELECT revisions, owned, freed, (SELECT count(*) FROM stored) AS stored FROM numbered";

/// Appends every change's event in one statement.
async fn append_events(
    connection: &mut PgConnection,
    decided: &Decided,
    origins: &[&Origin],
) -> Result<(), StoreError> {
    let events: Vec<event::Model> = decided
        .changes
        .iter()
        .map(|c| event_row(c.change, &c.before, &c.next, c.at, origins[c.index]))
        .collect();
    let text =
        |f: fn(&event::Model) -> &String| events.iter().map(|e| f(e).clone()).collect::<Vec<_>>();
    let json = |f: fn(&event::Model) -> &serde_json::Value| {
        events.iter().map(|e| f(e).clone()).collect::<Vec<_>>()
    };
    let appended = sqlx::query(
        "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, \
         committed_at, actor, trace_id, transaction_id) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::jsonb[], \
             $6::jsonb[], $7::jsonb[], $8::timestamptz[], $9::text[], $10::text[], $11::text[])",
    )
    .bind(events.iter().map(|e| e.revision).collect::<Vec<_>>())
    .bind(text(|e| &e.kind))
    .bind(text(|e| &e.id))
    .bind(text(|e| &e.change_type))
    .bind(json(|e| &e.changed_fields))
    .bind(json(|e| &e.before))
    .bind(json(|e| &e.after))
    .bind(events.iter().map(|e| e.committed_at).collect::<Vec<_>>())
    .bind(text(|e| &e.actor))
    .bind(text(|e| &e.trace_id))
    .bind(text(|e| &e.transaction_id))
    .execute(connection)
    .await?;
    if appended.rows_affected() != events.len() as u64 {
        return Err(StoreError::Internal(
            "a transaction appended fewer events than it changed records".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn revisions_are_taken_under_the_lock_classes() {
        let alloc = super::super::log::ALLOC_CLASS.to_string();
        let class = super::super::log::LOCK_CLASS.to_string();
        let sql = super::TAKE_AND_STORE;
        assert!(sql.contains(&format!("pg_advisory_lock({alloc}, 0)")));
        assert!(sql.contains(&format!("pg_advisory_unlock({alloc}, 0)")));
        assert!(sql.contains(&format!("pg_try_advisory_xact_lock({class}, ")));
    }
}
