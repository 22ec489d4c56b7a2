//! The one mapping between stored rows and the model: a `metadata` row and
//! a [`Record`], an `events` row and an [`Event`] (its before and after as
//! JSON snapshots), for both backends.

use chrono::{DateTime, Utc};
use sea_orm::{FromQueryResult, QueryResult};
use serde_json::{Value, json};

use super::StoreError;
use super::entities::{event, metadata};
use crate::json::canonical_numbers;
use crate::model::{ChangeType, Event, Field, Fields, Kind, Origin, Record, changed_fields};

/// `change_type` of a void row: a revision taken and never committed
/// (Postgres; see `postgres/log.rs`).
pub(super) const VOID: &str = "void";

/// One revision of the log.
#[derive(Debug)]
pub struct Logged {
    pub revision: u64,
    /// None for a void: a revision taken and never committed.
    pub event: Option<Event>,
}

/// A row read on a connection outside the pool, as sea-orm would decode it.
pub(super) fn decode<M: FromQueryResult>(row: impl Into<QueryResult>) -> Result<M, StoreError> {
    M::from_query_result(&row.into(), "").map_err(|err| StoreError::Internal(err.to_string()))
}

pub(super) fn record_from_row(row: metadata::Model) -> Record {
    let kind = Kind::parse(&row.kind).unwrap_or(Kind::User);
    let fields = Fields {
        public: row.public_metadata,
        private: row.private_metadata,
        unsafe_: row.unsafe_metadata,
    };
    record_from_parts(
        kind,
        row.id,
        fields,
        row.version as u64,
        row.revision as u64,
        Some(row.created_at),
        Some(row.updated_at),
    )
}

/// The one place a stored record is rebuilt, from a row or an event
/// snapshot: numbers are brought back to canonical form, and a version-0
/// record (never written, or deleted) shows no timestamps.
pub(crate) fn record_from_parts(
    kind: Kind,
    id: String,
    mut fields: Fields,
    version: u64,
    revision: u64,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
) -> Record {
    if version == 0 {
        return Record {
            revision,
            ..Record::empty(kind, id)
        };
    }
    canonical_numbers(&mut fields.public);
    canonical_numbers(&mut fields.private);
    canonical_numbers(&mut fields.unsafe_);
    Record {
        kind,
        id,
        fields,
        version,
        created_at,
        updated_at,
        revision,
    }
}

/// The row for a record; a version-0 record (a tombstone) gets `at` as its
/// timestamps, which are never shown.
pub(super) fn row_from_record(record: &Record, at: DateTime<Utc>) -> metadata::Model {
    metadata::Model {
        kind: record.kind.as_str().to_owned(),
        id: record.id.clone(),
        public_metadata: record.fields.public.clone(),
        private_metadata: record.fields.private.clone(),
        unsafe_metadata: record.fields.unsafe_.clone(),
        version: record.version as i64,
        revision: record.revision as i64,
        created_at: record.created_at.unwrap_or(at),
        updated_at: record.updated_at.unwrap_or(at),
    }
}

/// The names of the fields a change touched, as stored in its event.
pub(super) fn changed_fields_json(before: &Record, after: &Record) -> Value {
    Value::Array(
        changed_fields(before, after)
            .into_iter()
            .map(|f| Value::from(f.name()))
            .collect(),
    )
}

/// The event row of a change (its revision is `after`'s).
pub(super) fn event_row(
    change: ChangeType,
    before: &Record,
    after: &Record,
    committed_at: DateTime<Utc>,
    origin: &Origin,
) -> event::Model {
    event::Model {
        revision: after.revision as i64,
        kind: after.kind.as_str().to_owned(),
        id: after.id.clone(),
        change_type: change.as_str().to_owned(),
        changed_fields: changed_fields_json(before, after),
        before: snapshot(before),
        after: snapshot(after),
        committed_at,
        actor: origin.actor.clone(),
        trace_id: origin.trace_id.clone(),
        transaction_id: origin.transaction_id.clone(),
    }
}

/// A record as stored in an event: everything but kind and id.
pub(super) fn snapshot(record: &Record) -> Value {
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

pub(super) fn from_snapshot(kind: Kind, id: &str, mut value: Value) -> Result<Record, StoreError> {
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

pub(super) fn logged_from_row(row: event::Model) -> Result<Logged, StoreError> {
    let revision = row.revision as u64;
    let event = (row.change_type != VOID)
        .then(|| event_from_row(row))
        .transpose()?;
    Ok(Logged { revision, event })
}

/// An `events` row as a history page's JSON array carries it (the
/// backends' `history_page`), decoded straight into its parts: a page is
/// 100 snapshots, and a map per snapshot and per event only to take them
/// apart again is most of its decoding.
#[derive(serde::Deserialize)]
pub(super) struct PagedEvent {
    revision: u64,
    kind: String,
    id: String,
    change_type: String,
    changed_fields: Vec<String>,
    before: PagedSnapshot,
    after: PagedSnapshot,
    committed_at: String,
    actor: String,
    trace_id: String,
    transaction_id: String,
}

/// A snapshot as [`snapshot`] writes it.
#[derive(serde::Deserialize)]
struct PagedSnapshot {
    public_metadata: Value,
    private_metadata: Value,
    unsafe_metadata: Value,
    version: u64,
    revision: u64,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl PagedSnapshot {
    fn into_record(self, kind: Kind, id: String) -> Result<Record, StoreError> {
        let time = |text: Option<String>| text.as_deref().map(parse_time).transpose();
        Ok(record_from_parts(
            kind,
            id,
            Fields {
                public: self.public_metadata,
                private: self.private_metadata,
                unsafe_: self.unsafe_metadata,
            },
            self.version,
            self.revision,
            time(self.created_at)?,
            time(self.updated_at)?,
        ))
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| StoreError::Internal(format!("malformed time in events: {err}")))
}

impl PagedEvent {
    pub(super) fn into_event(self) -> Result<Event, StoreError> {
        let kind = parse_kind(&self.kind)?;
        Ok(Event {
            revision: self.revision,
            change: parse_change(&self.change_type)?,
            changed_fields: self
                .changed_fields
                .iter()
                .filter_map(|name| parse_field(name))
                .collect(),
            before: self.before.into_record(kind, self.id.clone())?,
            after: self.after.into_record(kind, self.id)?,
            committed_at: parse_time(&self.committed_at)?,
            origin: Origin {
                actor: self.actor,
                trace_id: self.trace_id,
                transaction_id: self.transaction_id,
            },
        })
    }
}

fn parse_kind(text: &str) -> Result<Kind, StoreError> {
    Kind::parse(text)
        .ok_or_else(|| StoreError::Internal(format!("unknown kind {text:?} in events")))
}

fn parse_change(text: &str) -> Result<ChangeType, StoreError> {
    ChangeType::parse(text)
        .ok_or_else(|| StoreError::Internal(format!("unknown change type {text:?} in events")))
}

fn parse_field(name: &str) -> Option<Field> {
    Field::ALL.into_iter().find(|f| f.name() == name)
}

pub(super) fn event_from_row(row: event::Model) -> Result<Event, StoreError> {
    let kind = parse_kind(&row.kind)?;
    let changed_fields = row
        .changed_fields
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|name| name.as_str().and_then(parse_field))
        .collect();
    Ok(Event {
        revision: row.revision as u64,
        change: parse_change(&row.change_type)?,
        changed_fields,
        before: from_snapshot(kind, &row.id, row.before)?,
        after: from_snapshot(kind, &row.id, row.after)?,
        committed_at: row.committed_at,
        origin: Origin {
            actor: row.actor,
            trace_id: row.trace_id,
            transaction_id: row.transaction_id,
        },
    })
}
