//! The generated tonic service traits, each RPC one line: the work is in
//! `handlers.rs`, once for both kinds. And each kind's generated server
//! ([`Served`]), which the API (`crate::api`) does not know of: the client
//! and the relay use the API without the server.

use tonic::{Request, Response, Status};

use super::handlers::{Handlers, WatchStream};
use crate::api::{ApiKind, Organizations, Users};
use crate::proto::v1::organization_metadata_service_server::{
    OrganizationMetadataService, OrganizationMetadataServiceServer,
};
use crate::proto::v1::user_metadata_service_server::{
    UserMetadataService, UserMetadataServiceServer,
};

/// A kind whose API this process serves.
pub trait Served: ApiKind {
    /// The generated tonic server of this kind's service.
    type Server: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static;

    /// The generated server over `handlers`, refusing requests larger than
    /// `max_request_bytes` before decoding them.
    fn server(handlers: Handlers<Self>, max_request_bytes: usize) -> Self::Server;
}

type Answer<T> = Result<Response<T>, Status>;

/// The two traits differ only in their names and message types.
macro_rules! delegate {
    ($service:ident, $server:ident for $kind:ty) => {
        impl Served for $kind {
            type Server = $server<Handlers<Self>>;

            fn server(handlers: Handlers<Self>, max_request_bytes: usize) -> Self::Server {
                $server::new(handlers).max_decoding_message_size(max_request_bytes)
            }
        }

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
            async fn patch(
                &self,
                r: Request<<$kind as ApiKind>::Patch>,
            ) -> Answer<<$kind as ApiKind>::Record> {
                Handlers::patch(self, r).await
            }
            async fn delete(
                &self,
                r: Request<<$kind as ApiKind>::Delete>,
            ) -> Answer<<$kind as ApiKind>::Deleted> {
                Handlers::delete(self, r).await
            }
            async fn batch_get(
                &self,
                r: Request<<$kind as ApiKind>::BatchGet>,
            ) -> Answer<<$kind as ApiKind>::BatchGot> {
                Handlers::batch_get(self, r).await
            }
            async fn list(
                &self,
                r: Request<<$kind as ApiKind>::List>,
            ) -> Answer<<$kind as ApiKind>::Listed> {
                Handlers::list(self, r).await
            }
            async fn list_history(
                &self,
                r: Request<<$kind as ApiKind>::History>,
            ) -> Answer<<$kind as ApiKind>::HistoryPage> {
                Handlers::history(self, r).await
            }
            async fn restore(
                &self,
                r: Request<<$kind as ApiKind>::Restore>,
            ) -> Answer<<$kind as ApiKind>::Record> {
                Handlers::restore(self, r).await
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

delegate!(UserMetadataService, UserMetadataServiceServer for Users);
delegate!(OrganizationMetadataService, OrganizationMetadataServiceServer for Organizations);

#[cfg(test)]
mod tests {
    //! The server serves Watch through `watch::Routed`; these check that the
    //! generated traits' own Watch serves too, for both kinds.

    use std::sync::Arc;
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::api::WriteParts;
    use crate::auth::Caller;
    use crate::events::{Broker, BrokerOptions};
    use crate::health::DbHealth;
    use crate::json::Limits;
    use crate::metrics::Metrics;
    use crate::service::{Admission, Bounds, Core};
    use crate::store::{Store, StoreOptions};

    async fn core(dir: &tempfile::TempDir) -> Arc<Core> {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let store = Arc::new(store);
        let shutdown = CancellationToken::new();
        let broker = Broker::start(store.clone(), BrokerOptions::default(), shutdown.clone())
            .await
            .unwrap();
        let metrics = Metrics::new();
        let bounds = Bounds {
            max_concurrent: 8,
            max_streams: 8,
        };
        let admission = Admission::new(
            bounds,
            metrics.watch_streams_refused.clone(),
            Duration::from_secs(5),
            Arc::new(DbHealth::default()),
            shutdown,
        );
        Arc::new(Core::new(
            store,
            broker,
            Limits::default(),
            admission,
            metrics,
            std::time::Duration::from_secs(3600),
        ))
    }

    fn request<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller::Open);
        request
    }

    #[tokio::test]
    async fn the_generated_watch_serves_both_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(&dir).await;
        let users = Handlers::<Users>::new(core.clone());
        let organizations = Handlers::<Organizations>::new(core);

        let watch = Users::watch_request(0, vec![], false, String::new());
        let mut user_stream = UserMetadataService::watch(&users, request(watch))
            .await
            .unwrap()
            .into_inner();
        let watch = Organizations::watch_request(0, vec![], false, String::new());
        let mut org_stream = OrganizationMetadataService::watch(&organizations, request(watch))
            .await
            .unwrap()
            .into_inner();
        let first = user_stream.next().await.unwrap().unwrap();
        assert_eq!(Users::event_view(first), None, "progress first");
        org_stream.next().await.unwrap().unwrap();

        let merge = Organizations::merge_request(WriteParts {
            id: "org_1".into(),
            public: Some(prost_types::Struct::default()),
            private: Some(prost_types::Struct {
                fields: [("a".to_owned(), prost_types::Value::from(1.0))].into(),
            }),
            unsafe_: None,
            expected_version: None,
            request_id: String::new(),
        });
        OrganizationMetadataService::merge(&organizations, request(merge))
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), org_stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event = Organizations::event_view(next).expect("an event");
        assert_eq!((event.revision, event.id.as_str()), (1, "org_1"));
    }
}
