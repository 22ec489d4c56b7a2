use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Metadata;
use crate::model::{DeleteCommand, Kind, WriteCommand};
use crate::proto::v1::organization_metadata_service_server::OrganizationMetadataService;
use crate::proto::v1::{
    DeleteOrganizationMetadataRequest, DeleteOrganizationMetadataResponse,
    GetOrganizationMetadataRequest, MergeOrganizationMetadataRequest, OrganizationMetadata,
    ReplaceOrganizationMetadataRequest,
};

pub struct OrganizationService {
    metadata: Arc<Metadata>,
}

impl OrganizationService {
    pub fn new(metadata: Arc<Metadata>) -> Self {
        OrganizationService { metadata }
    }
}

#[tonic::async_trait]
impl OrganizationMetadataService for OrganizationService {
    async fn get(
        &self,
        request: Request<GetOrganizationMetadataRequest>,
    ) -> Result<Response<OrganizationMetadata>, Status> {
        let id = request.into_inner().organization_id;
        let record = self.metadata.get(Kind::Organization, &id).await?;
        Ok(Response::new(record.into()))
    }

    async fn merge(
        &self,
        request: Request<MergeOrganizationMetadataRequest>,
    ) -> Result<Response<OrganizationMetadata>, Status> {
        let command = WriteCommand::try_from(request.into_inner())?;
        Ok(Response::new(self.metadata.write(command).await?.into()))
    }

    async fn replace(
        &self,
        request: Request<ReplaceOrganizationMetadataRequest>,
    ) -> Result<Response<OrganizationMetadata>, Status> {
        let command = WriteCommand::try_from(request.into_inner())?;
        Ok(Response::new(self.metadata.write(command).await?.into()))
    }

    async fn delete(
        &self,
        request: Request<DeleteOrganizationMetadataRequest>,
    ) -> Result<Response<DeleteOrganizationMetadataResponse>, Status> {
        let existed = self
            .metadata
            .delete(DeleteCommand::from(request.into_inner()))
            .await?;
        Ok(Response::new(DeleteOrganizationMetadataResponse {
            existed,
        }))
    }
}
