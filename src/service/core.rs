//! What both services do, independent of protobuf: validate, then store,
//! log who changed what, and count it. Called by the handlers of both
//! kinds.

use std::sync::Arc;

use crate::auth::{Caller, FieldSet};
use crate::events::{Broker, WatchError, WatchRequest};
use crate::json::{self, Limits};
use crate::logging::Escaped;
use crate::metrics::Metrics;
use crate::model::{
    DeleteCommand, Field, Kind, Mode, Origin, Record, RestoreCommand, WriteCommand,
};
use crate::query::{HistoryQuery, ListQuery};
use crate::schema::Schema;
use crate::store::{Sent, Store, StoreError};
use crate::store::{SetSchema, StoredSchema};
use crate::validation::{JsonPath, Problem, ValidationError};

use super::WatchItems;
use super::admission::Admission;

/// One page of a List, before it is encoded.
pub struct Page {
    /// At most the page size, ordered by id, each exactly as of `revision`.
    pub records: Vec<Record>,
    /// Where the next page starts after, when records may follow.
    pub next_after: Option<String>,
    pub revision: u64,
}

/// One page of a record's history, before it is encoded.
pub struct HistoryPage {
    pub events: Vec<Arc<crate::model::Event>>,
    /// The revision the next page starts past, when events may follow.
    pub next_cursor: Option<u64>,
    /// The oldest revision the log still holds.
    pub oldest_revision: u64,
}

/// A SetSchema as a caller asked it, its schema not yet compiled.
pub struct SchemaChange {
    pub kind: Kind,
    pub field: Field,
    pub schema: serde_json::Value,
    pub expected_version: Option<u64>,
    pub validate_only: bool,
}

/// What both services do, independent of protobuf: validate, then store.
pub struct Core {
    pub(super) store: Arc<Store>,
    broker: Arc<Broker>,
    pub(super) limits: Limits,
    pub(super) admission: Admission,
    pub(super) metrics: Arc<Metrics>,
    /// How long a request id answers retries (AIP-155).
    pub(super) request_id_ttl: std::time::Duration,
}

impl Core {
    pub fn new(
        store: Arc<Store>,
        broker: Arc<Broker>,
        limits: Limits,
        admission: Admission,
        metrics: Arc<Metrics>,
        request_id_ttl: std::time::Duration,
    ) -> Self {
        Core {
            store,
            broker,
            limits,
            admission,
            metrics,
            request_id_ttl,
        }
    }

    pub async fn watch(&self, request: WatchRequest) -> Result<WatchItems, WatchError> {
        json::validate_watch_ids(request.kind, &request.ids)?;
        self.broker.watch(request).await
    }

    pub async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        json::validate_id(kind, id)?;
        self.store.get(kind, id).await
    }

    /// The record as it was right after `revision`; its revision is the one
    /// asked for.
    pub async fn get_at(&self, kind: Kind, id: &str, revision: u64) -> Result<Record, StoreError> {
        json::validate_id(kind, id)?;
        let revision = self.broker.settled_at(revision).await?;
        let record = self.store.get_at(kind, id, revision).await?;
        Ok(Record { revision, ..record })
    }

    /// The records of the distinct `ids`, in the order they first appear,
    /// exactly as of the revision returned: `at` when given, else one at
    /// least as new as every write acknowledged before the call (see
    /// [`Broker::read_revision`]).
    pub async fn batch_get(
        &self,
        kind: Kind,
        ids: &[String],
        at: Option<u64>,
    ) -> Result<(Vec<Record>, u64), StoreError> {
        json::validate_batch_ids(kind, ids)?;
        let revision = match at {
            Some(revision) => self.broker.settled_at(revision).await?,
            None => self.broker.read_revision().await?,
        };
        let records = self.store.get_many_at(kind, ids, revision).await?;
        Ok((records, revision))
    }

    /// One page of a listing, exactly as of its revision (as BatchGet's):
    /// a Watch from the next revision sends every change after the page,
    /// and none it already shows.
    pub async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let revision = self.broker.read_revision().await?;
        let listed = self
            .store
            .list_at(
                query.kind,
                query.filter.as_deref(),
                query.after.as_deref(),
                query.page_size,
                revision,
            )
            .await?;
        Ok(Page {
            records: listed.records,
            next_after: listed.next_after,
            revision,
        })
    }

    /// One page of a record's events, of those that changed a field in
    /// `visible` (a frontend token sees only its fields): the others are
    /// passed over in the store's pages, so that neither the page's length
    /// nor its token tells of them.
    pub async fn history(
        &self,
        query: &HistoryQuery,
        visible: FieldSet,
    ) -> Result<HistoryPage, StoreError> {
        let wanted = query.page_size as usize + 1;
        let mut events = Vec::with_capacity(wanted);
        let mut cursor = query.cursor;
        let compacted = loop {
            let read = self
                .store
                .history(
                    query.kind,
                    &query.id,
                    cursor,
                    query.oldest_first,
                    wanted as u64,
                )
                .await?;
            let exhausted = read.events.len() < wanted;
            cursor = read.events.last().map(|e| e.revision).or(cursor);
            events.extend(
                read.events
                    .into_iter()
                    .filter(|e| e.changed_fields.iter().any(|f| visible.contains(*f))),
            );
            if exhausted || events.len() >= wanted {
                // Read with the last events: a prune before them can only
                // make it newer than what they show, never claim history
                // that is gone.
                break read.compacted;
            }
        };
        let more = events.len() >= wanted;
        events.truncate(query.page_size as usize);
        let next_cursor = more.then(|| events.last().map(|e| e.revision)).flatten();
        let oldest_revision = compacted + 1;
        Ok(HistoryPage {
            events,
            next_cursor,
            oldest_revision,
        })
    }

    /// Puts back the record's fields as they were right after the
    /// revision: a Replace of every field, or a Delete when the record did
    /// not exist then. Answers the record as it is afterwards.
    pub async fn restore(
        &self,
        caller: &Caller,
        command: RestoreCommand,
        sent: Sent,
        origin: Origin,
    ) -> Result<Record, StoreError> {
        let RestoreCommand {
            kind,
            id,
            revision,
            expected_version,
        } = command;
        json::validate_id(kind, &id)?;
        if revision == 0 {
            // An unset field reads as 0; "as before anything" would delete.
            return Err(
                ValidationError::new(JsonPath::root("revision"), Problem::RevisionUnset).into(),
            );
        }
        let revision = self.broker.settled_at(revision).await?;
        let then = self.store.get_at(kind, &id, revision).await?;
        if then.version == 0 {
            let delete = DeleteCommand {
                kind,
                id: id.clone(),
                expected_version,
            };
            self.delete(caller, delete, sent, origin).await?;
            return self.store.get(kind, &id).await;
        }
        let values = kind
            .fields()
            .iter()
            .map(|field| (*field, then.fields.get(*field).clone()))
            .collect();
        let command = WriteCommand {
            kind,
            id,
            mode: Mode::Replace,
            values,
            expected_version,
        };
        self.write(caller, command, sent, origin).await
    }

    pub async fn schema(&self, kind: Kind, field: Field) -> Result<StoredSchema, StoreError> {
        self.store.schema(kind, field).await
    }

    /// Compiles the schema (INVALID_ARGUMENT naming `schema` if it cannot
    /// be used), then has the store check and set it.
    pub async fn set_schema(
        &self,
        caller: &Caller,
        change: SchemaChange,
        sent: &Sent,
    ) -> Result<StoredSchema, StoreError> {
        let SchemaChange {
            kind,
            field,
            schema,
            expected_version,
            validate_only,
        } = change;
        let compiled = Schema::compile(&schema).map_err(|err| {
            ValidationError::new(JsonPath::root("schema"), Problem::Schema(err.0))
        })?;
        let stored = self
            .store
            .set_schema(
                SetSchema {
                    kind,
                    field,
                    schema,
                    compiled,
                    expected_version,
                    validate_only,
                },
                sent,
            )
            .await?;
        if !validate_only {
            tracing::info!(
                caller = %caller,
                rpc = %"SetSchema",
                kind = %kind.as_str(),
                field = %field.name(),
                version = stored.version,
                "schema set"
            );
        }
        Ok(stored)
    }

    pub async fn delete_schema(
        &self,
        caller: &Caller,
        kind: Kind,
        field: Field,
        expected_version: Option<u64>,
        sent: &Sent,
    ) -> Result<bool, StoreError> {
        let existed = self
            .store
            .delete_schema(kind, field, expected_version, sent)
            .await?;
        if existed {
            tracing::info!(
                caller = %caller,
                rpc = %"DeleteSchema",
                kind = %kind.as_str(),
                field = %field.name(),
                "schema deleted"
            );
        }
        Ok(existed)
    }

    /// `sent` says, if the caller gives up, whether the write may still
    /// have committed.
    pub async fn write(
        &self,
        caller: &Caller,
        command: WriteCommand,
        sent: Sent,
        origin: Origin,
    ) -> Result<Record, StoreError> {
        json::validate_command(&command, &self.limits)?;
        let WriteCommand {
            kind,
            id,
            mode,
            values,
            expected_version,
        } = command;
        let (change, provided, compute) = self.computation(mode, values);
        let outcome = self
            .store
            .write(
                kind,
                &id,
                expected_version,
                change,
                provided,
                compute,
                sent,
                origin,
            )
            .await?;
        if outcome.changed {
            self.metrics
                .events_written
                .with_label_values(&[kind.as_str()])
                .inc();
            // Who, what and where; never the values or their keys.
            tracing::info!(
                caller = %caller,
                rpc = %mode.rpc(),
                kind = %kind.as_str(),
                id = %Escaped(&id),
                version = outcome.record.version,
                revision = outcome.record.revision,
                "metadata written"
            );
        }
        Ok(outcome.record)
    }

    pub async fn delete(
        &self,
        caller: &Caller,
        command: DeleteCommand,
        sent: Sent,
        origin: Origin,
    ) -> Result<bool, StoreError> {
        json::validate_delete(&command)?;
        let existed = self
            .store
            .delete(
                command.kind,
                &command.id,
                command.expected_version,
                sent,
                origin,
            )
            .await?;
        if existed {
            self.metrics
                .events_written
                .with_label_values(&[command.kind.as_str()])
                .inc();
            tracing::info!(
                caller = %caller,
                rpc = %"Delete",
                kind = %command.kind.as_str(),
                id = %Escaped(&command.id),
                version = 0,
                "metadata deleted"
            );
        }
        Ok(existed)
    }
}
