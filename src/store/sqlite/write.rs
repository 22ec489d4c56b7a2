//! One write inside the committer's transaction (`commit.rs`): read the
//! row, decide (`store::write::plan`), take the next revision from the
//! counter row, store the row and append its event. SQLite has one writer
//! at a time and the transaction holds the write lock from its `BEGIN
//! IMMEDIATE`, so revisions are dense and in commit order, and no row lock
//! is needed.

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, Row, SqliteConnection};

use crate::model::{ChangeType, Kind, Origin, Record};
use crate::store::StoreError;
use crate::store::entities::metadata;
use crate::store::rows::{decode, event_row, record_from_row, row_from_record};
use crate::store::shared::Shared;
use crate::store::write::{Op, Plan, Step, plan, written};

/// Takes the next revision, only while the kind's schema generation is
/// still the one the write was validated under (`?1`, NULL for a delete;
/// `?2` the kind): otherwise nothing is returned and the write starts over.
const TAKE_REVISION: &str = "UPDATE revisions SET latest = latest + 1 WHERE id = 1 \
     AND (?1 IS NULL \
          OR (SELECT COALESCE(SUM(version), 0) FROM metadata_schemas WHERE kind = ?2) = ?1) \
     RETURNING latest";

const STORE_ROW: &str = "INSERT INTO metadata (kind, id, public_metadata, private_metadata, \
     unsafe_metadata, version, revision, created_at, updated_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (kind, id) DO UPDATE SET public_metadata = excluded.public_metadata, \
     private_metadata = excluded.private_metadata, unsafe_metadata = excluded.unsafe_metadata, \
     version = excluded.version, revision = excluded.revision, \
     created_at = excluded.created_at, updated_at = excluded.updated_at";

/// The event; a row already at the revision makes it insert nothing.
const APPEND_EVENT: &str = "INSERT INTO events (revision, kind, id, change_type, \
     changed_fields, before, after, committed_at, actor, trace_id, transaction_id) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (revision) DO NOTHING";

pub(super) async fn step(
    shared: &Shared,
    connection: &mut SqliteConnection,
    op: &mut Op,
) -> Result<Step, StoreError> {
    let (kind, id) = match op {
        Op::Write { kind, id, .. } | Op::Delete { kind, id, .. } => (*kind, id.clone()),
    };
    let current = read_row(connection, kind, &id)
        .await?
        .map_or_else(|| Record::empty(kind, id), record_from_row);
    match plan(op, &current, &shared.schemas, &shared.db).await? {
        Plan::Unchanged(done) => Ok(Step::Unchanged(done)),
        Plan::Store {
            change,
            next,
            at,
            generation,
        } => match write_change(
            connection,
            change,
            &current,
            next,
            at,
            generation,
            op.origin(),
        )
        .await?
        {
            Some(record) => Ok(Step::Written(written(op, record))),
            None => Ok(Step::StartOver),
        },
    }
}

async fn read_row(
    connection: &mut SqliteConnection,
    kind: Kind,
    id: &str,
) -> Result<Option<metadata::Model>, StoreError> {
    let row = sqlx::query("SELECT * FROM metadata WHERE kind = ? AND id = ?")
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(connection)
        .await?;
    row.map(decode).transpose()
}

/// Stores `next` with the next revision and appends its event. None when
/// the schema generation moved past `generation`, or the revision is taken
/// already: nothing was written, and the write must start over.
async fn write_change(
    connection: &mut SqliteConnection,
    change: ChangeType,
    before: &Record,
    mut next: Record,
    at: DateTime<Utc>,
    generation: Option<i64>,
    origin: &Origin,
) -> Result<Option<Record>, StoreError> {
    let taken = sqlx::query(TAKE_REVISION)
        .bind(generation)
        .bind(next.kind.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    let Some(taken) = taken else {
        return Ok(None);
    };
    next.revision = taken.try_get::<i64, _>("latest")? as u64;
    let row = row_from_record(&next, at);
    sqlx::query(STORE_ROW)
        .bind(row.kind)
        .bind(row.id)
        .bind(row.public_metadata)
        .bind(row.private_metadata)
        .bind(row.unsafe_metadata)
        .bind(row.version)
        .bind(row.revision)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&mut *connection)
        .await?;
    let event = event_row(change, before, &next, at, origin);
    let appended = sqlx::query(APPEND_EVENT)
        .bind(event.revision)
        .bind(event.kind)
        .bind(event.id)
        .bind(event.change_type)
        .bind(event.changed_fields)
        .bind(event.before)
        .bind(event.after)
        .bind(event.committed_at)
        .bind(event.actor)
        .bind(event.trace_id)
        .bind(event.transaction_id)
        .execute(&mut *connection)
        .await?;
    Ok((appended.rows_affected() > 0).then_some(next))
}
