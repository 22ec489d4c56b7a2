use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Metadata;
use crate::model::{DeleteCommand, Kind, WriteCommand};
use crate::proto::v1::user_metadata_service_server::UserMetadataService;
use crate::proto::v1::{
    DeleteUserMetadataRequest, DeleteUserMetadataResponse, GetUserMetadataRequest,
    MergeUserMetadataRequest, ReplaceUserMetadataRequest, UserMetadata,
};

pub struct UserService {
    metadata: Arc<Metadata>,
}

impl UserService {
    pub fn new(metadata: Arc<Metadata>) -> Self {
        UserService { metadata }
    }
}

#[tonic::async_trait]
impl UserMetadataService for UserService {
    async fn get(
        &self,
        request: Request<GetUserMetadataRequest>,
    ) -> Result<Response<UserMetadata>, Status> {
        let id = request.into_inner().user_id;
        let record = self.metadata.get(Kind::User, &id).await?;
        Ok(Response::new(record.into()))
    }

    async fn merge(
        &self,
        request: Request<MergeUserMetadataRequest>,
    ) -> Result<Response<UserMetadata>, Status> {
        let command = WriteCommand::try_from(request.into_inner())?;
        Ok(Response::new(self.metadata.write(command).await?.into()))
    }

    async fn replace(
        &self,
        request: Request<ReplaceUserMetadataRequest>,
    ) -> Result<Response<UserMetadata>, Status> {
        let command = WriteCommand::try_from(request.into_inner())?;
        Ok(Response::new(self.metadata.write(command).await?.into()))
    }

    async fn delete(
        &self,
        request: Request<DeleteUserMetadataRequest>,
    ) -> Result<Response<DeleteUserMetadataResponse>, Status> {
        let existed = self
            .metadata
            .delete(DeleteCommand::from(request.into_inner()))
            .await?;
        Ok(Response::new(DeleteUserMetadataResponse { existed }))
    }
}
