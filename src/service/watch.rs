//! Watch, served so that each event is converted and encoded once, however
//! many streams send it. The generated servers encode every message per
//! stream; with a thousand subscribers that was most of the server's CPU.
//! [`Routed`] takes the Watch path of a generated server and serves it with
//! a codec whose messages are already-encoded bytes; every other path goes
//! to the generated server unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::Core;
use super::handlers::Handlers;
use crate::api::ApiKind;
use crate::auth::FieldSet;
use crate::events::WatchItem;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// The encoded response for `item`; an event is encoded on first use and
/// the bytes shared by every stream that sends it.
fn encode<K: ApiKind>(item: WatchItem) -> Bytes {
    match &item {
        WatchItem::Event(event) => {
            event.encoded(|_| K::watch_response(item.clone()).encode_to_vec().into())
        }
        WatchItem::Progress(_) => K::watch_response(item).encode_to_vec().into(),
    }
}

/// A generated server with its Watch path served by [`WatchHandler`].
pub struct Routed<S, K> {
    inner: S,
    core: Arc<Core>,
    max_request_bytes: usize,
    kind: PhantomData<fn() -> K>,
}

impl<S, K> Routed<S, K> {
    pub fn new(inner: S, core: Arc<Core>, max_request_bytes: usize) -> Self {
        Routed {
            inner,
            core,
            max_request_bytes,
            kind: PhantomData,
        }
    }
}

impl<S: Clone, K> Clone for Routed<S, K> {
    fn clone(&self) -> Self {
        Routed {
            inner: self.inner.clone(),
            core: self.core.clone(),
            max_request_bytes: self.max_request_bytes,
            kind: PhantomData,
        }
    }
}

impl<S: NamedService, K> NamedService for Routed<S, K> {
    const NAME: &'static str = S::NAME;
}

impl<S, K> tower::Service<http::Request<Body>> for Routed<S, K>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    K: ApiKind,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != K::WATCH_PATH {
            return Box::pin(self.inner.call(request));
        }
        let handler = WatchHandler::<K>(Arc::new(Handlers::new(self.core.clone())));
        let codec = PreEncoded::<K::Watch>(PhantomData);
        let max = self.max_request_bytes;
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.server_streaming(handler, request).await)
        })
    }
}

struct WatchHandler<K>(Arc<Handlers<K>>);

impl<K: ApiKind> ServerStreamingService<K::Watch> for WatchHandler<K> {
    type Response = Bytes;
    type ResponseStream = ByteStream;
    type Future = BoxFuture<Result<Response<ByteStream>, Status>>;

    fn call(&mut self, request: Request<K::Watch>) -> Self::Future {
        let handlers = self.0.clone();
        Box::pin(async move {
            let (items, permit, fields) = handlers.open_watch(request).await?;
            // Whole events are encoded once for all streams; a stream that
            // sees fewer fields (a frontend token's) encodes its own.
            let stream = ReceiverStream::new(items).map(move |item| {
                item.map(|item| match fields == FieldSet::ALL {
                    true => encode::<K>(item),
                    false => K::shown_watch_response(item, fields).encode_to_vec().into(),
                })
                .map_err(Status::from)
            });
            Ok(Response::new(Box::pin(permit.hold(stream)) as ByteStream))
        })
    }
}

/// Decodes requests with prost; encodes responses that are already bytes.
struct PreEncoded<D>(PhantomData<fn() -> D>);

impl<D: Message + Default + Send + 'static> Codec for PreEncoded<D> {
    type Encode = Bytes;
    type Decode = D;
    type Encoder = BytesEncoder;
    type Decoder = tonic_prost::ProstDecoder<D>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Default::default())
    }
}

struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Users;
    use crate::events::SharedEvent;
    use crate::model::{ChangeType, Event};
    use crate::model::{Kind, Record};
    use crate::proto::v1::WatchUserMetadataResponse;

    #[test]
    fn an_event_is_encoded_once_and_as_the_generated_code_would() {
        let after = Record {
            version: 1,
            revision: 7,
            ..Record::empty(Kind::User, "user_1".into())
        };
        let event = Arc::new(SharedEvent::new(Event {
            revision: 7,
            change: ChangeType::Merged,
            changed_fields: vec![],
            before: Record::empty(Kind::User, "user_1".into()),
            after,
            committed_at: chrono::Utc::now(),
            origin: crate::model::Origin {
                actor: "key:billing".into(),
                trace_id: String::new(),
                transaction_id: String::new(),
            },
        }));
        let expected = Users::watch_response(WatchItem::Event(event.clone())).encode_to_vec();
        let first = encode::<Users>(WatchItem::Event(event.clone()));
        let second = encode::<Users>(WatchItem::Event(event.clone()));
        assert_eq!(first.as_ref(), expected.as_slice());
        // The same buffer: encoded once, shared.
        assert_eq!(first.as_ptr(), second.as_ptr());
        let progress = encode::<Users>(WatchItem::Progress(3));
        let decoded = WatchUserMetadataResponse::decode(progress).unwrap();
        assert_eq!(decoded, Users::watch_response(WatchItem::Progress(3)));
    }
}
