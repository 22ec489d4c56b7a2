//! The generated tonic service traits, each RPC one line: the work is in
//! `handlers.rs`, once for both kinds.

use tonic::{Request, Response, Status};

use super::handlers::{Handlers, WatchStream};
use super::kind::{ApiKind, Organizations, Users};
use crate::proto::v1::organization_metadata_service_server::OrganizationMetadataService;
use crate::proto::v1::user_metadata_service_server::UserMetadataService;

type Answer<T> = Result<Response<T>, Status>;

/// The two traits differ only in their names and message types.
macro_rules! delegate {
    ($service:ident for $kind:ty) => {
        #[tonic::async_trait]
        impl $service for Handlers<$kind> {
            async fn get(
                &self,
                r: Request<<$kind as ApiKind>::Get>,
            ) -> Answer<<$kind as ApiKind>::Record> {
                Handlers::get(self, r).await
            }
            async fn merge(
                &self,
                r: Request<<$kind as ApiKind>::Merge>,
            ) -> Answer<<$kind as ApiKind>::Record> {
                Handlers::merge(self, r).await
            }
            async fn replace(
                &self,
                r: Request<<$kind as ApiKind>::Replace>,
            ) -> Answer<<$kind as ApiKind>::Record> {
                Handlers::replace(self, r).await
            }
            async fn delete(
                &self,
                r: Request<<$kind as ApiKind>::Delete>,
            ) -> Answer<<$kind as ApiKind>::Deleted> {
                Handlers::delete(self, r).await
            }
            type WatchStream = WatchStream<$kind>;
            async fn watch(
                &self,
                r: Request<<$kind as ApiKind>::Watch>,
            ) -> Answer<WatchStream<$kind>> {
                Handlers::watch(self, r).await
            }
        }
    };
}

delegate!(UserMetadataService for Users);
delegate!(OrganizationMetadataService for Organizations);
