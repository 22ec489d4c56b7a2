//! What a write is, whatever the backend: the operation as queued, its
//! outcome, whether it may have reached the database ([`Sent`]), and the
//! pure steps every backend takes the same way (the version check, the
//! successor record, the schema check against this process's cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

use super::StoreError;
use super::schemas::SchemaCache;
use crate::model::{ChangeType, Field, Fields, Kind, Origin, Record};
use crate::validation::ValidationError;

/// Whether a write may have reached the database: set once its outcome no
/// longer depends on its caller (SQLite: the committer took it into a
/// group; Postgres: its COMMIT was sent). A caller that gives up before
/// that knows the write did not happen; after it, it may have.
#[derive(Clone, Debug, Default)]
pub struct Sent(Arc<AtomicBool>);

impl Sent {
    pub(super) fn mark(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The write was sent on its own and is known not to have been applied:
    /// it goes on in a transaction that has sent nothing yet.
    pub(super) fn unmark(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    pub fn may_have_committed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
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

/// How a write computes the new fields from the stored ones.
pub type Compute = Box<dyn FnMut(&Fields) -> Result<Fields, ValidationError> + Send>;

/// A write or delete, as queued for a transaction.
pub(super) enum Op {
    Write {
        kind: Kind,
        id: String,
        expected_version: Option<u64>,
        change: ChangeType,
        /// The fields the write gives, checked against their schemas.
        provided: Vec<Field>,
        compute: Compute,
        sent: Sent,
        origin: Origin,
    },
    Delete {
        kind: Kind,
        id: String,
        expected_version: Option<u64>,
        sent: Sent,
        origin: Origin,
    },
}

impl Op {
    pub(super) fn sent(&self) -> &Sent {
        match self {
            Op::Write { sent, .. } | Op::Delete { sent, .. } => sent,
        }
    }

    pub(super) fn kind(&self) -> Kind {
        self.target().0
    }

    /// Who asked for it, for its event.
    pub(super) fn origin(&self) -> &Origin {
        match self {
            Op::Write { origin, .. } | Op::Delete { origin, .. } => origin,
        }
    }

    /// The record it writes.
    pub(super) fn target(&self) -> (Kind, &str) {
        match self {
            Op::Write { kind, id, .. } | Op::Delete { kind, id, .. } => (*kind, id),
        }
    }
}

pub(super) enum Done {
    Written(WriteOutcome),
    /// Whether anything was stored, and the delete's revision (0 if not).
    Deleted(bool, u64),
}

impl Done {
    /// The revision this write committed, 0 when it wrote nothing.
    pub(super) fn committed(&self) -> u64 {
        match self {
            Done::Written(outcome) if outcome.changed => outcome.record.revision,
            Done::Written(_) => 0,
            Done::Deleted(_, revision) => *revision,
        }
    }
}

/// What one operation did inside a transaction.
pub(super) enum Step {
    /// Nothing was written (a no-op write, or a delete of nothing).
    Unchanged(Done),
    Written(Done),
    /// The write's statement wrote nothing: the kind's schemas changed
    /// since they were checked, or (Postgres) the dispatcher claimed its
    /// revision as a void, or a concurrent first write won. Roll back and
    /// run again.
    StartOver,
}

/// What a write decided from the current record, before storing anything.
pub(super) enum Plan {
    /// Nothing changes: answer with this.
    Unchanged(Done),
    /// Store `next` (its revision still to be taken), under the schema
    /// generation it was checked against (None for a delete).
    Store {
        change: ChangeType,
        next: Record,
        at: DateTime<Utc>,
        generation: Option<i64>,
    },
}

/// Checks the version, computes and validates the new record: everything
/// a write decides before it stores anything, the same on every backend.
pub(super) async fn plan(
    op: &mut Op,
    current: &Record,
    schemas: &SchemaCache,
    db: &DatabaseConnection,
) -> Result<Plan, StoreError> {
    match op {
        Op::Write {
            kind,
            expected_version,
            change,
            provided,
            compute,
            ..
        } => {
            check_version(*expected_version, current.version)?;
            let fields = compute(&current.fields)?;
            let generation = validate(schemas, db, *kind, provided, &fields).await?;
            if fields == current.fields {
                return Ok(Plan::Unchanged(Done::Written(WriteOutcome {
                    record: current.clone(),
                    changed: false,
                })));
            }
            let at = now();
            Ok(Plan::Store {
                change: *change,
                next: successor(current, fields, at),
                at,
                generation: Some(generation),
            })
        }
        Op::Delete {
            kind,
            id,
            expected_version,
            ..
        } => {
            check_version(*expected_version, current.version)?;
            if current.version == 0 {
                return Ok(Plan::Unchanged(Done::Deleted(false, 0)));
            }
            Ok(Plan::Store {
                change: ChangeType::Deleted,
                next: Record::empty(*kind, id.clone()),
                at: now(),
                generation: None,
            })
        }
    }
}

/// The answer of a write once `next` was stored with its revision.
pub(super) fn written(op: &Op, next: Record) -> Done {
    match op {
        Op::Write { .. } => Done::Written(WriteOutcome {
            record: next,
            changed: true,
        }),
        Op::Delete { .. } => Done::Deleted(true, next.revision),
    }
}

/// The schema generation a write's result conforms to; a violation is
/// checked again against freshly read schemas before it is reported, in
/// case this process's copy is behind a change that relaxed them.
async fn validate(
    schemas: &SchemaCache,
    db: &DatabaseConnection,
    kind: Kind,
    provided: &[Field],
    fields: &Fields,
) -> Result<i64, StoreError> {
    let cached = schemas.get(db, kind).await?;
    match cached.check(provided, fields) {
        Ok(()) => Ok(cached.generation),
        Err(_) => {
            let fresh = schemas.refresh(db, kind).await?;
            fresh.check(provided, fields)?;
            Ok(fresh.generation)
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

pub(super) fn check_version(expected: Option<u64>, actual: u64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != actual => {
            Err(StoreError::VersionMismatch { expected, actual })
        }
        _ => Ok(()),
    }
}

/// Postgres keeps microseconds; truncating here makes the returned time equal
/// to what a later Get reads back.
pub(super) fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
