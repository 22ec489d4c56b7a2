//! The handlers of every RPC, written once for both kinds. Each one: take
//! the request apart (`kind.rs`), authorize the caller for what it asks,
//! pass admission, then do the work in [`Core`] within the call's
//! budget. The generated tonic traits delegate here (`adapters.rs`).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::kind::{ApiKind, WriteParts};
use super::{Core, authorize};
use crate::auth::{Action, FieldSet, Operation};
use crate::convert::{Shown, TreeConvert};
use crate::model::Mode;
use crate::store::Sent;

/// A stream of one kind's Watch responses, encoded per stream.
pub type WatchStream<K> =
    Pin<Box<dyn Stream<Item = Result<<K as ApiKind>::WatchResponse, Status>> + Send>>;

/// One kind's service: the handlers, over [`Core`].
pub struct Handlers<K> {
    pub(super) core: Arc<Core>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Handlers<K> {
    pub fn new(core: Arc<Core>) -> Self {
        Handlers {
            core,
            kind: PhantomData,
        }
    }
}

impl<K: ApiKind> Handlers<K> {
    pub async fn get(&self, request: Request<K::Get>) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let id = K::get(message);
        let operation = Operation {
            kind: K::KIND,
            action: Action::Get,
            id: &id,
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let record = call.run(self.core.get(K::KIND, &id)).await?;
        Ok(Response::new(K::record(Shown { record, fields })))
    }

    /// Every id is authorized as a Get of it; the fields shown are the same
    /// for all (a frontend token may name only its own id).
    pub async fn batch_get(
        &self,
        request: Request<K::BatchGet>,
    ) -> Result<Response<K::BatchGot>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let ids = K::batch_get(message);
        let mut fields = FieldSet::ALL;
        for id in &ids {
            let operation = Operation {
                kind: K::KIND,
                action: Action::BatchGet,
                id,
                written: FieldSet::NONE,
            };
            fields = authorize(&extensions, &operation)?.1;
        }
        let call = self.core.admission.unary(&headers)?;
        let (records, revision) = call.run(self.core.batch_get(K::KIND, &ids)).await?;
        let records = records
            .into_iter()
            .map(|record| K::record(Shown { record, fields }))
            .collect();
        Ok(Response::new(K::batch_got(records, revision)))
    }

    pub async fn list(&self, request: Request<K::List>) -> Result<Response<K::Listed>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let operation = Operation {
            kind: K::KIND,
            action: Action::List,
            id: "",
            written: FieldSet::NONE,
        };
        let (_, fields) = authorize(&extensions, &operation)?;
        let query = K::list(message)?;
        let call = self.core.admission.unary(&headers)?;
        let page = call.run(self.core.list(&query)).await?;
        let records = page
            .records
            .into_iter()
            .map(|record| K::record(Shown { record, fields }))
            .collect();
        Ok(Response::new(K::listed(
            records,
            page.next_page_token,
            page.revision,
        )))
    }

    pub async fn merge(&self, request: Request<K::Merge>) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        self.write(&headers, &extensions, Mode::Merge, K::merge(message))
            .await
    }

    pub async fn replace(
        &self,
        request: Request<K::Replace>,
    ) -> Result<Response<K::Record>, Status> {
        let (headers, extensions, message) = request.into_parts();
        self.write(&headers, &extensions, Mode::Replace, K::replace(message))
            .await
    }

    async fn write<T: TreeConvert>(
        &self,
        headers: &tonic::metadata::MetadataMap,
        extensions: &tonic::Extensions,
        mode: Mode,
        parts: WriteParts<T>,
    ) -> Result<Response<K::Record>, Status> {
        let action = match mode {
            Mode::Merge => Action::Merge,
            Mode::Replace => Action::Replace,
        };
        let (caller, fields) = authorize(extensions, &parts.operation(K::KIND, action))?;
        let call = self.core.admission.unary(headers)?;
        let command = parts.command(K::KIND, mode)?;
        let sent = Sent::default();
        let write = self.core.write(&caller, command, sent.clone());
        let record = call.run_write(&sent, write).await?;
        Ok(Response::new(K::record(Shown { record, fields })))
    }

    pub async fn delete(
        &self,
        request: Request<K::Delete>,
    ) -> Result<Response<K::Deleted>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let command = K::delete(message);
        let operation = Operation {
            kind: K::KIND,
            action: Action::Delete,
            id: &command.id,
            written: FieldSet::ALL,
        };
        let (caller, _) = authorize(&extensions, &operation)?;
        let call = self.core.admission.unary(&headers)?;
        let sent = Sent::default();
        let delete = self.core.delete(&caller, command, sent.clone());
        let existed = call.run_write(&sent, delete).await?;
        Ok(Response::new(K::deleted(existed)))
    }

    /// Watch with each message encoded by its own stream: what the
    /// generated service serves. The server mounts Watch through
    /// `watch::Routed` instead, which encodes each event once for all.
    pub async fn watch(
        &self,
        request: Request<K::Watch>,
    ) -> Result<Response<WatchStream<K>>, Status> {
        let (items, permit) = self.open_watch(request).await?;
        let stream = ReceiverStream::new(items)
            .map(|item| item.map(K::watch_response).map_err(Status::from));
        Ok(Response::new(Box::pin(permit.hold(stream))))
    }

    /// Authorizes, admits and starts a Watch; the permit must live as long
    /// as the stream.
    pub(super) async fn open_watch(
        &self,
        request: Request<K::Watch>,
    ) -> Result<(super::WatchItems, super::StreamPermit), Status> {
        let (headers, extensions, message) = request.into_parts();
        let operation = Operation {
            kind: K::KIND,
            action: Action::Watch,
            id: "",
            written: FieldSet::NONE,
        };
        authorize(&extensions, &operation)?;
        let watch = K::watch(message)?;
        let (call, permit) = self.core.admission.stream(&headers)?;
        let items = call.run(self.core.watch(watch)).await?;
        Ok((items, permit))
    }
}
