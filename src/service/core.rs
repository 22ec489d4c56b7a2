//! What both services do, independent of protobuf: validate, then store,
//! log who changed what, and count it. Called by the handlers of both
//! kinds.

use std::sync::Arc;

use crate::auth::Caller;
use crate::events::{Broker, WatchError, WatchRequest};
use crate::json::{self, Limits};
use crate::logging::Escaped;
use crate::metrics::Metrics;
use crate::model::{ChangeType, DeleteCommand, Field, Kind, Mode, Record, WriteCommand};
use crate::query::ListQuery;
use crate::schema::Schema;
use crate::store::{Sent, Store, StoreError};
use crate::store::{SetSchema, StoredSchema};
use crate::validation::{JsonPath, Problem, ValidationError};

use super::WatchItems;
use super::admission::Admission;

/// One page of a List, before it is encoded.
pub struct Page {
    /// At most the page size, ordered by id.
    pub records: Vec<Record>,
    /// Whether records follow the last one.
    pub more: bool,
    pub revision: u64,
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
    store: Arc<Store>,
    broker: Arc<Broker>,
    limits: Limits,
    pub(super) admission: Admission,
    metrics: Arc<Metrics>,
}

impl Core {
    pub fn new(
        store: Arc<Store>,
        broker: Arc<Broker>,
        limits: Limits,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> Self {
        Core {
            store,
            broker,
            limits,
            admission,
            metrics,
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

    /// The records of the distinct `ids`, in the order they first appear,
    /// and a revision they reflect at least (see [`Core::list`]).
    pub async fn batch_get(
        &self,
        kind: Kind,
        ids: &[String],
    ) -> Result<(Vec<Record>, u64), StoreError> {
        json::validate_batch_ids(kind, ids)?;
        let revision = self.broker.mark().await?;
        let records = self.store.get_many(kind, ids).await?;
        Ok((records, revision))
    }

    /// One page of a listing. Its revision is the dispatcher's mark taken
    /// before the read: every change up to it is committed and so in the
    /// read, and a Watch from the next revision sends every change after
    /// it (one the read already shows has a revision at most the record's
    /// own). It is the store's mark, not the records', so it is as recent
    /// as the read and retention counts from it.
    pub async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let revision = self.broker.mark().await?;
        let mut records = self
            .store
            .list(
                query.kind,
                query.filter.as_deref(),
                query.after.as_deref(),
                query.page_size + 1,
            )
            .await?;
        let more = records.len() as u64 > query.page_size;
        records.truncate(query.page_size as usize);
        Ok(Page {
            records,
            more,
            revision,
        })
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
    ) -> Result<Record, StoreError> {
        json::validate_command(&command, &self.limits)?;
        let WriteCommand {
            kind,
            id,
            mode,
            values,
            expected_version,
        } = command;
        let change = match mode {
            Mode::Merge => ChangeType::Merged,
            Mode::Replace => ChangeType::Replaced,
        };
        let limits = self.limits;
        let provided = values.iter().map(|(field, _)| *field).collect();
        let compute = Box::new(move |current: &crate::model::Fields| {
            json::apply(mode, &values, current, &limits)
        });
        let outcome = self
            .store
            .write(kind, &id, expected_version, change, provided, compute, sent)
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
    ) -> Result<bool, StoreError> {
        json::validate_delete(&command)?;
        let existed = self
            .store
            .delete(command.kind, &command.id, command.expected_version, sent)
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
