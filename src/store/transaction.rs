//! Transactions: several writes of any records, all applied or none, their
//! events on consecutive revisions (the facade's call; each backend runs
//! them in its own folder: `sqlite/commit.rs`, `postgres/transaction.rs`).
//!
//! Nobody sees part of a transaction: its rows and events commit in one
//! database transaction, so a read (Get, BatchGet, List) sees all of its
//! writes or none; the event log shows all of its events or none, and the
//! dispatcher and the relay read and publish a transaction's events as one
//! unit (`events::broker`, `relay`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::shared::Shared;
use super::write::{Compute, Done, Op, Plan, Sent, WriteOutcome, plan, written};
use super::{Store, StoreError};
use crate::model::{ChangeType, Field, Kind, Origin, Record};
use crate::validation::{JsonPath, Problem, ValidationError};

/// A request id and what identifies the request it was first used for.
#[derive(Clone, Debug)]
pub struct RequestKey {
    pub id: String,
    /// A digest of the request (and its caller), without the id: the same
    /// id with a different request is refused.
    pub fingerprint: String,
    /// How long an outcome answers retries.
    pub ttl: Duration,
}

impl RequestKey {
    pub(super) fn cutoff(&self) -> DateTime<Utc> {
        let ttl = chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        Utc::now()
            .checked_sub_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub(super) fn reused(&self) -> StoreError {
        ValidationError::new(JsonPath::root("request_id"), Problem::RequestIdReused).into()
    }
}

/// One operation of a transaction.
pub struct TxnOp {
    /// Where the operation is in the caller's request, e.g.
    /// `operations[2].merge_user`: what an error about it names.
    pub at: String,
    pub kind: Kind,
    pub id: String,
    /// `Some(0)`: the record must not exist.
    pub expected_version: Option<u64>,
    pub action: TxnAction,
}

pub enum TxnAction {
    /// A Merge, Replace or Patch: as [`Store::write`]'s arguments.
    Write {
        change: ChangeType,
        provided: Vec<Field>,
        compute: Compute,
    },
    Delete,
}

/// What one operation did.
#[derive(Clone, Debug, PartialEq)]
pub enum TxnDone {
    Written(WriteOutcome),
    Deleted { existed: bool },
}

/// A committed transaction: one result per operation, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    pub results: Vec<TxnDone>,
    /// The last revision it wrote; 0 when it changed nothing.
    pub revision: u64,
    /// On each of its events; empty when it changed nothing.
    pub transaction_id: String,
}

impl Committed {
    /// What `done` (one per operation) committed, under `transaction_id`.
    pub(super) fn of(done: &[Done], transaction_id: &str) -> Committed {
        let revision = done.iter().map(Done::committed).max().unwrap_or(0);
        let results = done
            .iter()
            .map(|done| match done {
                Done::Written(outcome) => TxnDone::Written(outcome.clone()),
                Done::Deleted(existed, _) => TxnDone::Deleted { existed: *existed },
            })
            .collect();
        Committed {
            results,
            revision,
            transaction_id: match revision {
                0 => String::new(),
                _ => transaction_id.to_owned(),
            },
        }
    }
}

impl Store {
    /// Runs `ops` (on distinct records) in one database transaction: every
    /// one applies or none does. An operation that refuses (its
    /// precondition, its schema, its input) is [`StoreError::Operation`]
    /// naming it, and nothing is written. The changed records' events take
    /// consecutive revisions and carry `origin` (its transaction id).
    /// With a `request` key, a retry of a committed transaction is answered
    /// its outcome without running again (`requests.rs`).
    pub async fn commit(
        &self,
        ops: Vec<TxnOp>,
        sent: Sent,
        origin: Origin,
        request: Option<RequestKey>,
    ) -> Result<Committed, StoreError> {
        let transaction_id = origin.transaction_id.clone();
        let mut at = Vec::with_capacity(ops.len());
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|op| {
                let TxnOp {
                    at: label,
                    kind,
                    id,
                    expected_version,
                    action,
                } = op;
                at.push(label);
                let (sent, origin) = (sent.clone(), origin.clone());
                match action {
                    TxnAction::Write {
                        change,
                        provided,
                        compute,
                    } => Op::Write {
                        kind,
                        id,
                        expected_version,
                        change,
                        provided,
                        compute,
                        sent,
                        origin,
                    },
                    TxnAction::Delete => Op::Delete {
                        kind,
                        id,
                        expected_version,
                        sent,
                        origin,
                    },
                }
            })
            .collect();
        let span = tracing::info_span!(
            target: crate::otel::TARGET,
            "store.commit",
            operations = ops.len() as i64,
            revision = tracing::field::Empty,
        );
        let request = request.as_ref();
        let ran = match &self.backend {
            super::Backend::Sqlite(sqlite) => {
                sqlite
                    .run_transaction(ops, request, &transaction_id)
                    .instrument(span.clone())
                    .await
            }
            super::Backend::Postgres(postgres) => {
                postgres
                    .run_transaction(ops, request, &transaction_id)
                    .instrument(span.clone())
                    .await
            }
        };
        let committed = match ran {
            Err(StoreError::Operation { index, source, .. }) => {
                return Err(StoreError::Operation {
                    at: at.get(index).cloned().unwrap_or_default(),
                    index,
                    source,
                });
            }
            other => other?,
        };
        span.record("revision", committed.revision as i64);
        self.shared
            .committed_here
            .fetch_max(committed.revision, std::sync::atomic::Ordering::SeqCst);
        Ok(committed)
    }
}

/// `err`, raised by the operation at `index`, as the transaction's answer.
pub(super) fn in_operation(index: usize, err: StoreError) -> StoreError {
    match err {
        // Whole-transaction failures name no operation.
        StoreError::Unavailable { .. }
        | StoreError::NotApplied { .. }
        | StoreError::InDoubt { .. }
        | StoreError::ReadOnly(_)
        | StoreError::Internal(_)
        | StoreError::ShuttingDown => err,
        err => StoreError::Operation {
            index,
            // The facade names it.
            at: String::new(),
            source: Box::new(err),
        },
    }
}

/// The distinct kinds `ops` write (to read their schemas again).
pub(super) fn kinds(ops: &[Op]) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = ops.iter().map(Op::kind).collect();
    kinds.dedup();
    if kinds.len() > 1 {
        kinds = vec![Kind::User, Kind::Organization];
    }
    kinds
}

/// A transaction's operations as decided on their current records, in
/// order: what each answers if it changes nothing, and the changes to
/// store. The backends store all of the changes in a few statements,
/// whatever their number (`sqlite/write.rs`, `postgres/transaction.rs`).
pub(super) struct Decided {
    /// One per operation: its answer, or None for a change (answered once
    /// its revision is known).
    pub unchanged: Vec<Option<Done>>,
    pub changes: Vec<Change>,
}

/// One record's change in a transaction.
pub(super) struct Change {
    /// The operation's index.
    pub index: usize,
    pub change: ChangeType,
    pub before: Record,
    /// Its revision is set by [`Decided::number`].
    pub next: Record,
    pub at: DateTime<Utc>,
    pub generation: Option<i64>,
}

impl Decided {
    /// Decides each of `ops` on its current record (`current` by kind and
    /// id; a record without one was never written). Err names the
    /// operation that refused or failed.
    pub(super) async fn decide(
        ops: &mut [Op],
        mut current: HashMap<(Kind, String), Record>,
        shared: &Shared,
    ) -> Result<Decided, (usize, StoreError)> {
        let mut decided = Decided {
            unchanged: Vec::with_capacity(ops.len()),
            changes: Vec::new(),
        };
        for (index, op) in ops.iter_mut().enumerate() {
            let (kind, id) = op.target();
            let before = current
                .remove(&(kind, id.to_owned()))
                .unwrap_or_else(|| Record::empty(kind, id.to_owned()));
            match plan(op, &before, &shared.schemas, &shared.db).await {
                Ok(Plan::Unchanged(done)) => decided.unchanged.push(Some(done)),
                Ok(Plan::Store {
                    change,
                    next,
                    at,
                    generation,
                }) => {
                    decided.unchanged.push(None);
                    decided.changes.push(Change {
                        index,
                        change,
                        before,
                        next,
                        at,
                        generation,
                    });
                }
                Err(err) => return Err((index, err)),
            }
        }
        Ok(decided)
    }

    /// Gives the changes their revisions, consecutive from `first`, in
    /// operation order.
    pub(super) fn number(&mut self, first: u64) {
        for (offset, change) in self.changes.iter_mut().enumerate() {
            change.next.revision = first + offset as u64;
        }
    }

    /// The kinds' schema generations the changes were checked under, each
    /// once: the statement that takes the revisions checks they still hold.
    pub(super) fn generations(&self) -> Vec<(Kind, i64)> {
        let mut generations: Vec<(Kind, i64)> = self
            .changes
            .iter()
            .filter_map(|c| c.generation.map(|g| (c.next.kind, g)))
            .collect();
        generations.sort_by_key(|(kind, _)| kind.as_str());
        generations.dedup();
        generations
    }

    /// Each operation's answer, once the changes are stored.
    pub(super) fn answers(self, ops: &[Op]) -> Vec<Done> {
        let mut changes = self.changes.into_iter().peekable();
        self.unchanged
            .into_iter()
            .enumerate()
            .map(|(index, unchanged)| match unchanged {
                Some(done) => done,
                None => {
                    let change = changes
                        .next()
                        .expect("one change per operation not answered");
                    written(&ops[index], change.next)
                }
            })
            .collect()
    }
}
