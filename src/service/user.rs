use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use tonic::{Request, Response, Status};

use super::{Metadata, authorize};
use crate::convert::Shown;
use crate::events::WatchRequest;
use crate::model::{DeleteCommand, Kind, WriteCommand};
use crate::proto::v1::user_metadata_service_server::UserMetadataService;
use crate::proto::v1::{
    DeleteUserMetadataRequest, DeleteUserMetadataResponse, GetUserMetadataRequest,
    MergeUserMetadataRequest, ReplaceUserMetadataRequest, UserMetadata, WatchUserMetadataRequest,
    WatchUserMetadataResponse,
};
use crate::store::Sent;

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
        let (_, fields) = authorize(&request)?;
        let call = self.metadata.admission.unary(request.metadata())?;
        let id = request.into_inner().user_id;
        let record = call.run(self.metadata.get(Kind::User, &id)).await?;
        Ok(Response::new(Shown { record, fields }.into()))
    }

    async fn merge(
        &self,
        request: Request<MergeUserMetadataRequest>,
    ) -> Result<Response<UserMetadata>, Status> {
        let (caller, fields) = authorize(&request)?;
        let call = self.metadata.admission.unary(request.metadata())?;
        let command = WriteCommand::try_from(request.into_inner())?;
        let sent = Sent::default();
        let write = self.metadata.write(&caller, command, sent.clone());
        let record = call.run_write(&sent, write).await?;
        Ok(Response::new(Shown { record, fields }.into()))
    }

    async fn replace(
        &self,
        request: Request<ReplaceUserMetadataRequest>,
    ) -> Result<Response<UserMetadata>, Status> {
        let (caller, fields) = authorize(&request)?;
        let call = self.metadata.admission.unary(request.metadata())?;
        let command = WriteCommand::try_from(request.into_inner())?;
        let sent = Sent::default();
        let write = self.metadata.write(&caller, command, sent.clone());
        let record = call.run_write(&sent, write).await?;
        Ok(Response::new(Shown { record, fields }.into()))
    }

    async fn delete(
        &self,
        request: Request<DeleteUserMetadataRequest>,
    ) -> Result<Response<DeleteUserMetadataResponse>, Status> {
        let (caller, _) = authorize(&request)?;
        let call = self.metadata.admission.unary(request.metadata())?;
        let command = DeleteCommand::from(request.into_inner());
        let sent = Sent::default();
        let delete = self.metadata.delete(&caller, command, sent.clone());
        let existed = call.run_write(&sent, delete).await?;
        Ok(Response::new(DeleteUserMetadataResponse { existed }))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<WatchUserMetadataResponse, Status>> + Send>>;

    /// The server mounts this service through [`super::Routed`], which
    /// serves Watch with events encoded once for all streams; this
    /// per-stream path is what the generated service would do without it.
    async fn watch(
        &self,
        request: Request<WatchUserMetadataRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authorize(&request)?;
        let (call, permit) = self.metadata.admission.stream(request.metadata())?;
        let request = WatchRequest::from(request.into_inner());
        let items = call.run(self.metadata.watch(request)).await?;
        let stream =
            ReceiverStream::new(items).map(|item| item.map(Into::into).map_err(Into::into));
        Ok(Response::new(Box::pin(permit.hold(stream))))
    }
}
