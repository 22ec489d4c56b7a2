//! The gRPC services: thin translations between protobuf and [`Metadata`].

mod adapters;
mod admission;
mod caller;
mod error;
mod handlers;
mod kind;
mod requests;
mod watch;

pub use admission::{Admission, Bounds, StreamPermit};
pub use caller::Authenticate;
pub use handlers::Handlers;
pub use kind::{ApiKind, EventView, Organizations, RecordView, Users, WriteParts};
pub use requests::RequestLayer;
pub use watch::Routed;

use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use crate::auth::{self, Caller, FieldSet, Operation};
use crate::events::{Broker, WatchError, WatchItem, WatchRequest};
use crate::json::{self, Limits};
use crate::logging::Escaped;
use crate::metrics::Metrics;
use crate::model::{ChangeType, DeleteCommand, Kind, Mode, Record, WriteCommand};
use crate::store::{Sent, Store, StoreError};

/// What both services do, independent of protobuf: validate, then store.
pub struct Metadata {
    store: Arc<Store>,
    broker: Arc<Broker>,
    limits: Limits,
    admission: Admission,
    metrics: Arc<Metrics>,
}

impl Metadata {
    pub fn new(
        store: Arc<Store>,
        broker: Arc<Broker>,
        limits: Limits,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> Self {
        Metadata {
            store,
            broker,
            limits,
            admission,
            metrics,
        }
    }

    pub async fn watch(
        &self,
        request: WatchRequest,
    ) -> Result<mpsc::Receiver<Result<WatchItem, WatchError>>, WatchError> {
        json::validate_watch_ids(request.kind, &request.ids)?;
        self.broker.watch(request).await
    }

    pub async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        json::validate_id(kind, id)?;
        self.store.get(kind, id).await
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
        let compute = Box::new(move |current: &crate::model::Fields| {
            json::apply(mode, &values, current, &limits)
        });
        let outcome = self
            .store
            .write(kind, &id, expected_version, change, compute, sent)
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

/// What a Watch call receives: its items, until the stream ends.
pub type WatchItems = mpsc::Receiver<Result<WatchItem, WatchError>>;

/// The caller (from the request's extensions) and the fields it may see,
/// or PERMISSION_DENIED before any work is done.
fn authorize(
    extensions: &tonic::Extensions,
    operation: &Operation<'_>,
) -> Result<(Caller, FieldSet), Status> {
    let caller = caller::caller(extensions)?;
    // The id is not validated yet: it is escaped wherever it is logged.
    let span = tracing::Span::current();
    span.record("caller", tracing::field::display(&caller));
    if !operation.id.is_empty() {
        span.record("id", tracing::field::display(Escaped(operation.id)));
    }
    match auth::authorize(&caller, operation) {
        Ok(fields) => Ok((caller, fields)),
        Err(denied) => {
            tracing::info!(
                caller = %caller,
                rpc = %operation.action.rpc(),
                kind = %operation.kind.as_str(),
                id = %Escaped(operation.id),
                "call refused: permission denied"
            );
            Err(denied.into())
        }
    }
}
