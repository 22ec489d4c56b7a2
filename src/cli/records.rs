//! Each kind's generated client behind one interface, so that the CLI's
//! flow (`perform`) is written once: requests are built here, responses
//! come back as the JSON the CLI prints.

use std::pin::Pin;

use serde_json::Value;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Bearer, Fields, output};
use crate::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use crate::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use crate::proto::v1::*;

/// Watch messages: `Some` event as JSON, `None` for progress.
pub(super) type Events = Pin<Box<dyn Stream<Item = Result<Option<Value>, Status>> + Send>>;

pub(super) trait Records {
    async fn get(&mut self, id: String) -> Result<Value, Status>;
    async fn merge(
        &mut self,
        id: String,
        fields: Patches,
        expected: Option<u64>,
    ) -> Result<Value, Status>;
    async fn replace(
        &mut self,
        id: String,
        fields: Values,
        expected: Option<u64>,
    ) -> Result<Value, Status>;
    /// Whether anything was stored.
    async fn delete(&mut self, id: String, expected: Option<u64>) -> Result<bool, Status>;
    async fn watch(&mut self, ids: Vec<String>, from_revision: u64) -> Result<Events, Status>;
}

type Intercepted = InterceptedService<Channel, Bearer>;
type Patches = Fields<prost_types::Struct>;
type Values = Fields<prost_types::Value>;

impl Records for UserMetadataServiceClient<Intercepted> {
    async fn get(&mut self, id: String) -> Result<Value, Status> {
        let record = self.get(GetUserMetadataRequest { user_id: id }).await?;
        Ok(output::user(&record.into_inner()))
    }

    async fn merge(
        &mut self,
        id: String,
        fields: Patches,
        expected: Option<u64>,
    ) -> Result<Value, Status> {
        let request = MergeUserMetadataRequest {
            user_id: id,
            public_metadata: fields.public,
            private_metadata: fields.private,
            unsafe_metadata: fields.unsafe_,
            expected_version: expected,
        };
        Ok(output::user(&self.merge(request).await?.into_inner()))
    }

    async fn replace(
        &mut self,
        id: String,
        fields: Values,
        expected: Option<u64>,
    ) -> Result<Value, Status> {
        let request = ReplaceUserMetadataRequest {
            user_id: id,
            public_metadata: fields.public,
            private_metadata: fields.private,
            unsafe_metadata: fields.unsafe_,
            expected_version: expected,
        };
        Ok(output::user(&self.replace(request).await?.into_inner()))
    }

    async fn delete(&mut self, id: String, expected: Option<u64>) -> Result<bool, Status> {
        let request = DeleteUserMetadataRequest {
            user_id: id,
            expected_version: expected,
        };
        Ok(self.delete(request).await?.into_inner().existed)
    }

    async fn watch(&mut self, ids: Vec<String>, from_revision: u64) -> Result<Events, Status> {
        let request = WatchUserMetadataRequest {
            start_revision: from_revision,
            user_ids: ids,
            progress_notify: false,
        };
        let stream = self.watch(request).await?.into_inner();
        Ok(Box::pin(stream.map(|message| {
            Ok(match message?.response {
                Some(watch_user_metadata_response::Response::Event(event)) => {
                    Some(output::user_event(&event))
                }
                _ => None,
            })
        })))
    }
}

impl Records for OrganizationMetadataServiceClient<Intercepted> {
    async fn get(&mut self, id: String) -> Result<Value, Status> {
        let request = GetOrganizationMetadataRequest {
            organization_id: id,
        };
        Ok(output::organization(&self.get(request).await?.into_inner()))
    }

    async fn merge(
        &mut self,
        id: String,
        fields: Patches,
        expected: Option<u64>,
    ) -> Result<Value, Status> {
        let request = MergeOrganizationMetadataRequest {
            organization_id: id,
            public_metadata: fields.public,
            private_metadata: fields.private,
            expected_version: expected,
        };
        Ok(output::organization(
            &self.merge(request).await?.into_inner(),
        ))
    }

    async fn replace(
        &mut self,
        id: String,
        fields: Values,
        expected: Option<u64>,
    ) -> Result<Value, Status> {
        let request = ReplaceOrganizationMetadataRequest {
            organization_id: id,
            public_metadata: fields.public,
            private_metadata: fields.private,
            expected_version: expected,
        };
        Ok(output::organization(
            &self.replace(request).await?.into_inner(),
        ))
    }

    async fn delete(&mut self, id: String, expected: Option<u64>) -> Result<bool, Status> {
        let request = DeleteOrganizationMetadataRequest {
            organization_id: id,
            expected_version: expected,
        };
        Ok(self.delete(request).await?.into_inner().existed)
    }

    async fn watch(&mut self, ids: Vec<String>, from_revision: u64) -> Result<Events, Status> {
        let request = WatchOrganizationMetadataRequest {
            start_revision: from_revision,
            organization_ids: ids,
            progress_notify: false,
        };
        let stream = self.watch(request).await?.into_inner();
        Ok(Box::pin(stream.map(|message| {
            Ok(match message?.response {
                Some(watch_organization_metadata_response::Response::Event(event)) => {
                    Some(output::organization_event(&event))
                }
                _ => None,
            })
        })))
    }
}
