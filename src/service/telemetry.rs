//! One span, one latency sample and one status count per gRPC call, for
//! every service on the server (health and reflection included). The final
//! status of a gRPC call is in the response headers when the call failed
//! before any message, and otherwise in the trailers at the end of the body,
//! so the body is wrapped to see them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::metrics::Metrics;

/// The methods both record services have.
const RECORD_METHODS: &[&str] = &[
    "Get",
    "Merge",
    "Replace",
    "Patch",
    "Delete",
    "Watch",
    "BatchGet",
    "List",
    "ListHistory",
    "Restore",
];

/// Services and methods used as metric labels; anything else is counted as
/// "other", so that a client cannot create label values at will.
const KNOWN: &[(&str, &[&str])] = &[
    ("metadata.v1.UserMetadataService", RECORD_METHODS),
    ("metadata.v1.OrganizationMetadataService", RECORD_METHODS),
    (
        "metadata.v1.MetadataSchemaService",
        &["SetSchema", "GetSchema", "DeleteSchema"],
    ),
    ("metadata.v1.MetadataTransactionService", &["Commit"]),
    (
        "metadata.v1.MetadataWebhookService",
        &[
            "CreateWebhook",
            "GetWebhook",
            "ListWebhooks",
            "UpdateWebhook",
            "DeleteWebhook",
            "RotateWebhookSecret",
            "ReplayWebhook",
        ],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch", "List"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

fn labels(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    KNOWN
        .iter()
        .find(|(name, _)| *name == service)
        .map(|(name, methods)| {
            let method = methods.iter().find(|m| **m == method).copied();
            (*name, method.unwrap_or("other"))
        })
        .unwrap_or(("other", "other"))
}

/// The status code as Prometheus gRPC dashboards spell it (Go's names).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

#[derive(Clone)]
pub struct RequestLayer {
    metrics: Arc<Metrics>,
}

impl RequestLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RequestLayer { metrics }
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Observed<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body,
{
    type Response = http::Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = labels(request.uri().path());
        // The handlers record id and caller once they know them.
        let span = if crate::otel::exporting() {
            // A call site of its own: the span kind is read when the span
            // is made, and the log keeps its fields when nothing is traced.
            let span = tracing::info_span!(
                "request",
                service,
                method,
                id = tracing::field::Empty,
                caller = tracing::field::Empty,
                otel.kind = "server",
            );
            crate::otel::start_request(&span, request.headers(), service, method);
            span
        } else {
            tracing::info_span!(
                "request",
                service,
                method,
                id = tracing::field::Empty,
                caller = tracing::field::Empty,
            )
        };
        let call = CallRecord::start(self.metrics.clone(), service, method, span.clone());
        let response = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(err) => {
                    call.finish(Code::Unknown);
                    return Err(err);
                }
            };
            let (parts, body) = response.into_parts();
            // A call that failed before any message has its status here.
            let call = match status_of(&parts.headers) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(http::Response::from_parts(
                parts,
                ObservedBody { inner: body, call },
            ))
        })
    }
}

/// A call in progress: counted in flight until it finishes, and finished
/// as CANCELLED if dropped first (the client went away).
struct CallRecord {
    metrics: Arc<Metrics>,
    service: &'static str,
    method: &'static str,
    started: Instant,
    span: tracing::Span,
    finished: bool,
}

impl CallRecord {
    fn start(
        metrics: Arc<Metrics>,
        service: &'static str,
        method: &'static str,
        span: tracing::Span,
    ) -> Self {
        metrics
            .in_flight
            .with_label_values(&[service, method])
            .inc();
        CallRecord {
            metrics,
            service,
            method,
            started: Instant::now(),
            span,
            finished: false,
        }
    }

    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let labels = [self.service, self.method];
        self.metrics.in_flight.with_label_values(&labels).dec();
        self.metrics
            .handling
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
        self.metrics
            .handled
            .with_label_values(&[self.service, self.method, code_name(code)])
            .inc();
        let micros = elapsed.as_micros() as u64;
        let status = code;
        let code = code_name(code);
        if crate::otel::exporting() {
            crate::otel::finish_request(&self.span, status, code);
        }
        if matches!(code, "OK") {
            tracing::debug!(parent: &self.span, code, micros, "request finished");
        } else {
            tracing::info!(parent: &self.span, code, micros, "request finished");
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the status.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<CallRecord>,
    }
}

/// An empty body observing no call (what a layer outside this one answers
/// on its own, e.g. a CORS preflight, when no other layer is between).
impl<B: Default> Default for ObservedBody<B> {
    fn default() -> Self {
        ObservedBody {
            inner: B::default(),
            call: None,
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of)
                    && let Some(call) = this.call.take()
                {
                    call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            // A body that ends without trailers carried no status.
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(
            labels("/metadata.v1.UserMetadataService/Merge"),
            ("metadata.v1.UserMetadataService", "Merge")
        );
        assert_eq!(
            labels("/metadata.v1.OrganizationMetadataService/BatchGet"),
            ("metadata.v1.OrganizationMetadataService", "BatchGet")
        );
        assert_eq!(
            labels("/metadata.v1.UserMetadataService/List"),
            ("metadata.v1.UserMetadataService", "List")
        );
        assert_eq!(
            labels("/metadata.v1.UserMetadataService/Nope"),
            ("metadata.v1.UserMetadataService", "other")
        );
        assert_eq!(labels("/evil.Service/x"), ("other", "other"));
        assert_eq!(labels(""), ("other", "other"));
    }

    /// A method added to the proto gets its own label, not "other".
    #[test]
    fn every_method_of_the_proto_is_known() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut checked = 0;
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = format!("{package}.{}", service.name.unwrap_or_default());
                for method in service.method {
                    let method = method.name.unwrap_or_default();
                    let path = format!("/{name}/{method}");
                    assert_eq!(labels(&path), (name.as_str(), method.as_str()), "{path}");
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 14,
            "only {checked} methods in the descriptor set"
        );
    }

    #[test]
    fn codes_use_the_names_dashboards_expect() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::from_bytes(b"16")), "Unauthenticated");
    }
}
