//! Distributed tracing: the `tracing` spans of the server exported over
//! OTLP/gRPC when an endpoint is configured, the caller's W3C trace context
//! taken from the request headers, and the `traceparent` the CLI sends.
//! Off by default; when off no OpenTelemetry layer exists at all, and the
//! spans made only for traces (target [`TARGET`]) are disabled at their
//! call sites, so the only cost left is an [`exporting`] check.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::Code;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Target of the spans that exist for traces only (database work, Watch
/// delivery): never shown in the log, so that its lines stay as they were.
pub const TARGET: &str = "metadata_service::otel";

/// The service name when neither OTEL_SERVICE_NAME nor a `service.name` in
/// OTEL_RESOURCE_ATTRIBUTES gives one.
pub const DEFAULT_SERVICE_NAME: &str = "metadata-service";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: guards the work that only a trace needs.
#[inline]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The tracer provider exporting to `endpoint` (`http://host:4317`), with
/// the resource and sampler the OTEL_* variables ask for. Needs a Tokio
/// runtime: the exporter's channel lives on it.
pub fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let sampler = sampler(
        env("OTEL_TRACES_SAMPLER").as_deref(),
        env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    )
    .map_err(|err| anyhow::anyhow!("OTEL_TRACES_SAMPLER: {err}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|err| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {err}"))?;
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource())
        .with_batch_exporter(exporter)
        .build())
}

/// The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
/// their fallback name (`unknown_service:<exe>`) is replaced by ours.
fn resource() -> Resource {
    let name = Key::new("service.name");
    let detected = Resource::builder().build();
    let named = detected
        .get(&name)
        .is_some_and(|value| !value.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    builder.build()
}

/// The sampler of OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG. The SDK
/// reads them too, but falls back silently on a bad value; a typo here
/// must stop the start instead of sampling everything or nothing.
pub fn sampler(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, String> {
    let ratio = || -> Result<f64, String> {
        match arg {
            None => Ok(1.0),
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG {text:?} is not a ratio between 0 and 1")
                }),
        }
    };
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    Ok(match name.unwrap_or("parentbased_always_on") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio()?)),
        other => {
            return Err(format!(
                "unknown sampler {other:?} (expected always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off or parentbased_traceidratio)"
            ));
        }
    })
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// Makes the request span `span` a server span of the caller's trace (the
/// `traceparent` and `tracestate` of `headers`, when valid) and gives it
/// the RPC attributes. Call before the span is first entered: its parent
/// cannot change after that.
pub fn start_request(
    span: &tracing::Span,
    headers: &http::HeaderMap,
    service: &'static str,
    method: &'static str,
) {
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when the span is disabled, which leaves nothing to join.
        let _ = span.set_parent(cx);
    }
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service);
    span.set_attribute("rpc.method", method);
}

/// Records the final status of the call on its span. Following the gRPC
/// semantic conventions for servers, only the codes that are the server's
/// fault make the span an error: a NOT_FOUND or INVALID_ARGUMENT is a
/// correct answer.
pub fn finish_request(span: &tracing::Span, code: Code, name: &'static str) {
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if server_fault(code) {
        span.set_status(Status::error(name));
    }
}

fn server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The trace id of the call's W3C `traceparent` header, empty when it has
/// none or one that is not valid (an event records it, never the rest).
pub fn trace_id(headers: &http::HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| check_traceparent(text).ok())
        .and_then(|text| text.split('-').nth(1).map(str::to_owned))
        .unwrap_or_default()
}

/// Checks a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lower case,
/// ids not all zero), as the CLI sends it.
pub fn check_traceparent(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |part: &str| part.bytes().all(|b| b == b'0');
    let valid = matches!(
        parts.as_slice(),
        [version, trace, parent, flags]
            if *version == "00"
                && hex(trace, 32) && !zero(trace)
                && hex(parent, 16) && !zero(parent)
                && hex(flags, 2)
    );
    if valid {
        Ok(text.to_owned())
    } else {
        Err("expected a W3C traceparent: 00-<32 lower-case hex trace id>-<16 hex parent id>-<2 hex flags>, ids not all zero".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_are_read_and_bad_ones_refused() {
        let parse = |name, arg| format!("{:?}", sampler(name, arg).unwrap());
        assert_eq!(
            parse(None, None),
            format!("{:?}", Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        );
        assert_eq!(parse(Some("always_off"), None), "AlwaysOff");
        assert_eq!(
            parse(Some("traceidratio"), Some("0.25")),
            "TraceIdRatioBased(0.25)"
        );
        assert!(
            parse(Some("parentbased_traceidratio"), Some("0.5")).contains("TraceIdRatioBased(0.5)")
        );
        assert!(
            sampler(Some("sometimes"), None)
                .unwrap_err()
                .contains("unknown sampler")
        );
        assert!(sampler(Some("traceidratio"), Some("2")).is_err());
        assert!(sampler(Some("traceidratio"), Some("half")).is_err());
    }

    #[test]
    fn the_trace_id_is_taken_from_a_valid_traceparent_only() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(trace_id(&headers), "");
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&headers), "0af7651916cd43dd8448eb211c80319c");
        headers.insert("traceparent", "00-zz-b7ad6b7169203331-01".parse().unwrap());
        assert_eq!(trace_id(&headers), "");
    }

    #[test]
    fn traceparents_are_checked() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(check_traceparent(good).unwrap(), good);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(check_traceparent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_server_faults_are_errors() {
        assert!(server_fault(Code::Internal));
        assert!(server_fault(Code::Unavailable));
        assert!(!server_fault(Code::Ok));
        assert!(!server_fault(Code::NotFound));
        assert!(!server_fault(Code::InvalidArgument));
    }
}
