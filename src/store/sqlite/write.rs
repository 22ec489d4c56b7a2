//! One write inside the committer's transaction (`commit.rs`): read the
//! row, decide (`store::write::plan`), take the next revision from the
//! counter row, store the row and append its event; and a transaction's
//! writes, the same steps each done for all of its records in one
//! statement. SQLite has one writer at a time and the transaction holds
//! the write lock from its `BEGIN IMMEDIATE`, so revisions are dense and
//! in commit order, and no row lock is needed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, Row, SqliteConnection};

use crate::model::{ChangeType, Kind, Origin, Record};
use crate::pause::PausePoint;
use crate::store::StoreError;
use crate::store::entities::metadata;
use crate::store::rows::{decode, event_row, record_from_row, row_from_record};
use crate::store::shared::Shared;
use crate::store::transaction::Decided;
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

/// A transaction's changes stored and their events appended, with
/// revisions taken in one statement: whatever their number, a few
/// statements in all, since every statement is a hand-off to sqlx's
/// worker thread and back, and on the one writer those hand-offs, not the
/// work, set the pace. `pause` is passed between the rows and the events.
/// None when the schemas moved on or a revision was taken already: nothing
/// may be kept, and the transaction must start over.
pub(super) async fn store_changes(
    connection: &mut SqliteConnection,
    decided: &mut Decided,
    origins: &[&Origin],
    pause: &PausePoint,
) -> Result<Option<()>, StoreError> {
    let count = decided.changes.len();
    if count == 0 {
        return Ok(Some(()));
    }
    let generations: Vec<(&str, i64)> = decided
        .generations()
        .into_iter()
        .map(|(kind, generation)| (kind.as_str(), generation))
        .collect();
    let taken: Option<i64> = sqlx::query_scalar(TAKE_REVISIONS)
        .bind(count as i64)
        .bind(serde_json::json!(generations))
        .fetch_optional(&mut *connection)
        .await?;
    let Some(last) = taken else {
        return Ok(None);
    };
    decided.number(last as u64 + 1 - count as u64);
    let rows = serde_json::Value::Array(
        decided
            .changes
            .iter()
            .map(|change| {
                let row = row_from_record(&change.next, change.at);
                serde_json::json!([
                    row.kind,
                    row.id,
                    row.public_metadata.to_string(),
                    row.private_metadata.to_string(),
                    row.unsafe_metadata.to_string(),
                    row.version,
                    row.revision,
                    as_stored(row.created_at),
                    as_stored(row.updated_at),
                ])
            })
            .collect(),
    );
    sqlx::query(STORE_ROWS)
        .bind(rows)
        .execute(&mut *connection)
        .await?;
    pause.pass().await;
    let events = serde_json::Value::Array(
        decided
            .changes
            .iter()
            .map(|c| {
                let event = event_row(c.change, &c.before, &c.next, c.at, origins[c.index]);
                serde_json::json!([
                    event.revision,
                    event.kind,
                    event.id,
                    event.change_type,
                    event.changed_fields.to_string(),
                    event.before.to_string(),
                    event.after.to_string(),
                    as_stored(event.committed_at),
                    event.actor,
                    event.trace_id,
                    event.transaction_id,
                ])
            })
            .collect(),
    );
    let appended = sqlx::query(APPEND_EVENTS)
        .bind(events)
        .execute(&mut *connection)
        .await?
        .rows_affected();
    Ok((appended == count as u64).then_some(()))
}

/// A time as sqlx stores a `DateTime<Utc>` in SQLite, so that rows and
/// events a transaction writes read back as any others.
fn as_stored(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// Takes `?1` revisions at once, only while every kind's schema generation
/// in `?2` (`[[kind, generation], ...]`) is still the one its writes were
/// validated under; answers the last.
const TAKE_REVISIONS: &str = "UPDATE revisions SET latest = latest + ?1 WHERE id = 1 \
     AND NOT EXISTS (SELECT 1 FROM json_each(?2) g \
          WHERE (SELECT COALESCE(SUM(version), 0) FROM metadata_schemas \
                 WHERE kind = json_extract(g.value, '$[0]')) != json_extract(g.value, '$[1]')) \
     RETURNING latest";

/// A transaction's rows in one statement, whatever their number: `?1` is
/// `[[kind, id, public, private, unsafe, version, revision, created_at,
/// updated_at], ...]`, each JSON field as its text (a JSON string, which
/// `json_extract` answers unquoted), as sqlx would bind it.
const STORE_ROWS: &str = "INSERT INTO metadata (kind, id, public_metadata, \
     private_metadata, unsafe_metadata, version, revision, created_at, updated_at) \
     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
     json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), \
     json_extract(value, '$[5]'), json_extract(value, '$[6]'), json_extract(value, '$[7]'), \
     json_extract(value, '$[8]') FROM json_each(?1) WHERE true \
     ON CONFLICT (kind, id) DO UPDATE SET \
     public_metadata = excluded.public_metadata, private_metadata = excluded.private_metadata, \
     unsafe_metadata = excluded.unsafe_metadata, version = excluded.version, \
     revision = excluded.revision, created_at = excluded.created_at, \
     updated_at = excluded.updated_at";

/// A transaction's events in one statement, as [`STORE_ROWS`] its rows;
/// one already at its revision is not inserted (the caller counts).
const APPEND_EVENTS: &str = "INSERT INTO events (revision, kind, id, change_type, \
     changed_fields, before, after, committed_at, actor, trace_id, transaction_id) \
     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
     json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), \
     json_extract(value, '$[5]'), json_extract(value, '$[6]'), json_extract(value, '$[7]'), \
     json_extract(value, '$[8]'), json_extract(value, '$[9]'), json_extract(value, '$[10]') \
     FROM json_each(?1) WHERE true ON CONFLICT (revision) DO NOTHING";

/// The rows of a transaction's records, in one statement: `?1` is
/// `[[kind, id], ...]`.
pub(super) async fn read_rows(
    connection: &mut SqliteConnection,
    ops: &mut [Op],
) -> Result<HashMap<(Kind, String), Record>, StoreError> {
    let targets = serde_json::Value::Array(
        ops.iter()
            .map(|op| {
                let (kind, id) = op.target();
                serde_json::json!([kind.as_str(), id])
            })
            .collect(),
    );
    let rows = sqlx::query(
        "SELECT m.* FROM json_each(?1) t JOIN metadata m \
         ON m.kind = json_extract(t.value, '$[0]') AND m.id = json_extract(t.value, '$[1]')",
    )
    .bind(targets)
    .fetch_all(connection)
    .await?;
    rows.into_iter()
        .map(|row| {
            let record = record_from_row(decode::<metadata::Model>(row)?);
            Ok(((record.kind, record.id.clone()), record))
        })
        .collect()
}
