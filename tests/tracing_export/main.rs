//! Distributed tracing, end to end: the server's spans are exported over
//! OTLP/gRPC to a receiver in this process, joined to the caller's trace
//! by its `traceparent`, with the RPC attributes and the database spans,
//! and never a metadata value. A test binary of its own because it
//! installs the process's global subscriber (as `main` does, through
//! `logging::init`), which the other tests must not share.

#[allow(dead_code)]
#[path = "../common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metadata_service::logging::{self, LogFormat, Telemetry};
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{GetUserMetadataRequest, MergeUserMetadataRequest};
use metadata_service::server;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tonic::transport::Channel;

use common::{Backend, TestDb};

/// In every merged value: no exported byte may contain it.
const MARKER: &str = "secret-marker-7f3a9c";

/// The collector's side of OTLP/gRPC: keeps every export.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// Everything received, as text: what a leak would show up in.
    fn dump(&self) -> String {
        format!("{:?}", self.0.lock().unwrap())
    }
}

/// One caller's trace: its ids and the `traceparent` that carries them.
struct Caller {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl Caller {
    fn new(seed: u8) -> Caller {
        Caller {
            trace_id: [seed; 16].map(|b| b.wrapping_add(0x11)),
            span_id: [seed; 8].map(|b| b.wrapping_add(0x22)),
        }
    }

    fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("traceparent", self.traceparent().parse().unwrap());
        request
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string(span: &Span, key: &str) -> Option<String> {
    match attribute(&span.attributes, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attribute(&span.attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// Flushes until `done` holds for what was received: a span is exported
/// when it closes, which on the server can be just after the client has
/// its answer.
async fn wait_for(
    telemetry: &Telemetry,
    receiver: &Receiver,
    done: impl Fn(&[Span]) -> bool,
) -> Vec<Span> {
    let provider = telemetry.provider().expect("spans are exported").clone();
    common::wait::until(
        "the expected spans arrive",
        Duration::from_secs(20),
        async || {
            let flushing = provider.clone();
            tokio::task::spawn_blocking(move || flushing.force_flush())
                .await
                .unwrap()
                .expect("flush");
            let spans = receiver.spans();
            if done(&spans) {
                return Ok(spans);
            }
            let received: Vec<_> = spans
                .iter()
                .map(|s| (s.name.clone(), hex::encode(&s.trace_id)))
                .collect();
            Err(received)
        },
    )
    .await
}

/// The request span of `method` in the trace of `caller`.
fn request_span<'a>(spans: &'a [Span], caller: &Caller, method: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.trace_id == caller.trace_id
            && s.name == "request"
            && string(s, "rpc.method").as_deref() == Some(method)
    })
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_join_the_callers_trace_without_metadata() {
    let (receiver, addr) = Receiver::start().await;
    let telemetry = logging::init(LogFormat::Text, "warn", Some(&format!("http://{addr}")))
        .expect("the subscriber installs");

    for (seed, backend) in [(1, Backend::Sqlite), (2, Backend::Postgres)] {
        let Some(db) = TestDb::create(backend).await else {
            continue;
        };
        let running = server::start(&common::config(db.url()))
            .await
            .expect("server starts");
        let channel = Channel::from_shared(format!("http://{}", running.local_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut users = UserMetadataServiceClient::new(channel);
        let caller = Caller::new(seed);

        let merge = MergeUserMetadataRequest {
            user_id: "user_traced".into(),
            public_metadata: Some(common::json::structure(&serde_json::json!({
                "note": MARKER,
                "nested": {"deep": [MARKER]},
            }))),
            private_metadata: Some(common::json::structure(
                &serde_json::json!({ "token": MARKER }),
            )),
            ..Default::default()
        };
        users.merge(caller.request(merge)).await.expect("merge");
        users
            .get(caller.request(GetUserMetadataRequest {
                user_id: "user_traced".into(),
                revision: None,
            }))
            .await
            .expect("get");
        let refused = users
            .get(caller.request(GetUserMetadataRequest {
                user_id: String::new(),
                revision: None,
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);

        let spans = wait_for(&telemetry, &receiver, |spans| {
            let Some(merge) = request_span(spans, &caller, "Merge") else {
                return false;
            };
            let Some(get) = request_span(spans, &caller, "Get") else {
                return false;
            };
            let written = spans
                .iter()
                .any(|s| s.name == "store.write" && s.parent_span_id == merge.span_id);
            let read = spans
                .iter()
                .any(|s| s.name == "db.read_batch" && s.parent_span_id == get.span_id);
            let both_gets = spans
                .iter()
                .filter(|s| {
                    s.trace_id == caller.trace_id
                        && string(s, "rpc.method").as_deref() == Some("Get")
                })
                .count()
                == 2;
            written && read && both_gets
        })
        .await;
        let context = format!("{backend:?}: {spans:#?}");

        // The caller's trace, our span a server child of the caller's.
        let merge = request_span(&spans, &caller, "Merge").unwrap();
        assert_eq!(merge.parent_span_id, caller.span_id, "{context}");
        assert_eq!(merge.kind, SpanKind::Server as i32, "{context}");
        assert_eq!(string(merge, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            string(merge, "rpc.service").as_deref(),
            Some("metadata.v1.UserMetadataService")
        );
        assert_eq!(int(merge, "rpc.grpc.status_code"), Some(0), "{context}");
        assert_eq!(string(merge, "id").as_deref(), Some("user_traced"));
        assert_ne!(
            merge.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );

        // The write's spans, under the request span.
        let write = children(&spans, merge)
            .into_iter()
            .find(|s| s.name == "store.write")
            .unwrap_or_else(|| panic!("no store.write under Merge: {context}"));
        assert_eq!(string(write, "kind").as_deref(), Some("user"), "{context}");
        assert_eq!(string(write, "change").as_deref(), Some("merged"));
        assert!(int(write, "revision").is_some_and(|r| r > 0), "{context}");
        let database = children(&spans, write);
        let expected = match backend {
            Backend::Sqlite => "sqlite.group_commit",
            Backend::Postgres => "db.transaction",
        };
        assert!(
            database.iter().any(|s| s.name == expected),
            "no {expected} under store.write: {context}"
        );

        // The batched read, under the Get's span; the refused Get's code.
        let get = request_span(&spans, &caller, "Get").unwrap();
        let gets: Vec<&Span> = spans
            .iter()
            .filter(|s| s.trace_id == caller.trace_id && s.name == "request")
            .filter(|s| string(s, "rpc.method").as_deref() == Some("Get"))
            .collect();
        let codes: Vec<Option<i64>> = gets
            .iter()
            .map(|s| int(s, "rpc.grpc.status_code"))
            .collect();
        assert!(
            codes.contains(&Some(0)) && codes.contains(&Some(3)),
            "{codes:?}"
        );
        assert!(
            spans.iter().any(
                |s| s.name == "db.read_batch" && s.parent_span_id == get.span_id
                    || gets
                        .iter()
                        .any(|g| s.name == "db.read_batch" && s.parent_span_id == g.span_id)
            ),
            "{context}"
        );

        running.shutdown().await.expect("clean shutdown");
    }

    let received = receiver.0.lock().unwrap().clone();
    let resource = received[0].resource_spans[0].resource.clone().unwrap();
    let resource_string = |key: &str| match attribute(&resource.attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    assert_eq!(
        resource_string("service.name").as_deref(),
        Some("metadata-service")
    );
    assert_eq!(
        resource_string("service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let dump = receiver.dump();
    assert!(!dump.contains(MARKER), "a metadata value was exported");
    telemetry.shutdown().await;
}
