//! Each kind's generated client under one interface, [`Calls`], so that
//! the client's flow (`perform` in `mod.rs`) is written once for both
//! kinds; requests are built and responses read through [`ApiKind`].

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Bearer;
use crate::api::{ApiKind, Organizations, Users};
use crate::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use crate::proto::v1::user_metadata_service_client::UserMetadataServiceClient;

/// Watch responses, as they arrive.
pub(super) type Responses<K> =
    Pin<Box<dyn Stream<Item = Result<<K as ApiKind>::WatchResponse, Status>> + Send>>;

pub(super) type Intercepted = InterceptedService<Channel, Bearer>;

/// Largest response the client accepts (tonic's default is 4 MiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The calls of one kind's generated client.
pub(super) trait Calls<K: ApiKind> {
    fn connect(channel: Channel, bearer: Bearer) -> Self;
    async fn get(&mut self, request: K::Get) -> Result<K::Record, Status>;
    async fn merge(&mut self, request: K::Merge) -> Result<K::Record, Status>;
    async fn replace(&mut self, request: K::Replace) -> Result<K::Record, Status>;
    async fn patch(&mut self, request: K::Patch) -> Result<K::Record, Status>;
    async fn delete(&mut self, request: K::Delete) -> Result<K::Deleted, Status>;
    async fn watch(&mut self, request: K::Watch) -> Result<Responses<K>, Status>;
    async fn batch_get(&mut self, request: K::BatchGet) -> Result<K::BatchGot, Status>;
    async fn list(&mut self, request: K::List) -> Result<K::Listed, Status>;
    async fn history(&mut self, request: K::History) -> Result<K::HistoryPage, Status>;
    async fn restore(&mut self, request: K::Restore) -> Result<K::Record, Status>;
}

/// The two generated clients differ only in their names and types.
macro_rules! calls {
    ($client:ident for $kind:ty) => {
        impl Calls<$kind> for $client<Intercepted> {
            fn connect(channel: Channel, bearer: Bearer) -> Self {
                // A BatchGet of 1,000 large records is tens of MiB.
                $client::with_interceptor(channel, bearer)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
            }
            async fn get(
                &mut self,
                r: <$kind as ApiKind>::Get,
            ) -> Result<<$kind as ApiKind>::Record, Status> {
                Ok($client::get(self, r).await?.into_inner())
            }
            async fn merge(
                &mut self,
                r: <$kind as ApiKind>::Merge,
            ) -> Result<<$kind as ApiKind>::Record, Status> {
                Ok($client::merge(self, r).await?.into_inner())
            }
            async fn replace(
                &mut self,
                r: <$kind as ApiKind>::Replace,
            ) -> Result<<$kind as ApiKind>::Record, Status> {
                Ok($client::replace(self, r).await?.into_inner())
            }
            async fn patch(
                &mut self,
                r: <$kind as ApiKind>::Patch,
            ) -> Result<<$kind as ApiKind>::Record, Status> {
                Ok($client::patch(self, r).await?.into_inner())
            }
            async fn delete(
                &mut self,
                r: <$kind as ApiKind>::Delete,
            ) -> Result<<$kind as ApiKind>::Deleted, Status> {
                Ok($client::delete(self, r).await?.into_inner())
            }
            async fn watch(
                &mut self,
                r: <$kind as ApiKind>::Watch,
            ) -> Result<Responses<$kind>, Status> {
                Ok(Box::pin($client::watch(self, r).await?.into_inner()))
            }
            async fn batch_get(
                &mut self,
                r: <$kind as ApiKind>::BatchGet,
            ) -> Result<<$kind as ApiKind>::BatchGot, Status> {
                Ok($client::batch_get(self, r).await?.into_inner())
            }
            async fn list(
                &mut self,
                r: <$kind as ApiKind>::List,
            ) -> Result<<$kind as ApiKind>::Listed, Status> {
                Ok($client::list(self, r).await?.into_inner())
            }
            async fn history(
                &mut self,
                r: <$kind as ApiKind>::History,
            ) -> Result<<$kind as ApiKind>::HistoryPage, Status> {
                Ok($client::list_history(self, r).await?.into_inner())
            }
            async fn restore(
                &mut self,
                r: <$kind as ApiKind>::Restore,
            ) -> Result<<$kind as ApiKind>::Record, Status> {
                Ok($client::restore(self, r).await?.into_inner())
            }
        }
    };
}

calls!(UserMetadataServiceClient for Users);
calls!(OrganizationMetadataServiceClient for Organizations);
