//! The gRPC services: thin translations between protobuf and [`Metadata`].

mod admission;
mod error;
mod organization;
mod user;

pub use admission::Admission;

use std::sync::Arc;

pub use organization::OrganizationService;
pub use user::UserService;

use tokio::sync::mpsc;

use crate::events::{Broker, ChangeType, WatchError, WatchItem, WatchRequest};
use crate::json::{self, Limits};
use crate::model::{DeleteCommand, Kind, Mode, Record, WriteCommand};
use crate::store::{Store, StoreError};

/// What both services do, independent of protobuf: validate, then store.
pub struct Metadata {
    store: Arc<Store>,
    broker: Arc<Broker>,
    limits: Limits,
    admission: Admission,
}

impl Metadata {
    pub fn new(
        store: Arc<Store>,
        broker: Arc<Broker>,
        limits: Limits,
        admission: Admission,
    ) -> Self {
        Metadata {
            store,
            broker,
            limits,
            admission,
        }
    }

    pub async fn watch(
        &self,
        request: WatchRequest,
    ) -> Result<mpsc::Receiver<Result<WatchItem, WatchError>>, WatchError> {
        for id in &request.ids {
            json::validate_id(request.kind, id)?;
        }
        self.broker.watch(request).await
    }

    pub async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        json::validate_id(kind, id)?;
        self.store.get(kind, id).await
    }

    pub async fn write(&self, command: WriteCommand) -> Result<Record, StoreError> {
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
        let outcome = self
            .store
            .write(kind, &id, expected_version, change, |current| {
                json::apply(mode, &values, current, &self.limits)
            })
            .await?;
        if outcome.changed {
            tracing::info!(
                kind = kind.as_str(),
                id = %id,
                mode = ?mode,
                version = outcome.record.version,
                "metadata written"
            );
        }
        Ok(outcome.record)
    }

    pub async fn delete(&self, command: DeleteCommand) -> Result<bool, StoreError> {
        json::validate_delete(&command)?;
        let existed = self
            .store
            .delete(command.kind, &command.id, command.expected_version)
            .await?;
        if existed {
            tracing::info!(kind = command.kind.as_str(), id = %command.id, "metadata deleted");
        }
        Ok(existed)
    }
}
