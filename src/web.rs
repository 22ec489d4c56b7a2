//! Browsers: gRPC-Web (tonic-web) on the gRPC port, and CORS for the
//! origins the operator allows. A browser's `fetch` has no HTTP/2
//! trailers, so it speaks gRPC-Web over HTTP/1.1 or HTTP/2; the layer
//! translates it to gRPC for the same services, native gRPC passes through
//! untouched. CORS answers preflights and marks responses for the allowed
//! origins only: a page from any other origin is refused by its browser.
//! Credentials travel in `authorization`, never in cookies, so credentialed
//! CORS (`Access-Control-Allow-Credentials`) is never answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response};
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// What gRPC-Web requests carry besides the simple headers.
const ALLOWED_HEADERS: [&str; 7] = [
    "content-type",
    "authorization",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "traceparent",
    "connect-protocol-version",
];

/// What a page must be able to read of an answer: the status, and its
/// details (ErrorInfo, BadRequest, ...).
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// An origin as `scheme://host[:port]`: what browsers send in `Origin`.
pub fn parse_origin(text: &str) -> Result<HeaderValue, String> {
    let text = text.trim();
    let bad = |why: &str| format!("{text:?} is not an origin ({why}): write scheme://host[:port]");
    let uri: http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    // An Origin header has no path: "https://app.example.com/" never matches.
    if !matches!(uri.path(), "" | "/") || text.ends_with('/') || uri.query().is_some() {
        return Err(bad("no path, query or trailing slash"));
    }
    HeaderValue::from_str(text).map_err(|_| bad("not a header value"))
}

/// CORS for the allowed origins only: a request from any other origin
/// gets no CORS header at all (its preflight a bare 403), so its browser
/// refuses the call; a request without `Origin` (not from a browser page:
/// native gRPC, grpcurl) passes untouched.
#[derive(Clone)]
pub struct CorsGateLayer {
    allowed: Arc<[HeaderValue]>,
}

impl CorsGateLayer {
    pub fn new(origins: &[HeaderValue]) -> Self {
        CorsGateLayer {
            allowed: origins.into(),
        }
    }
}

impl<S> Layer<S> for CorsGateLayer {
    type Service = CorsGate<S>;

    fn layer(&self, inner: S) -> CorsGate<S> {
        CorsGate {
            cors: cors(&self.allowed),
            inner,
            allowed: self.allowed.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CorsGate<S> {
    cors: CorsLayer,
    inner: S,
    allowed: Arc<[HeaderValue]>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for CorsGate<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
    B: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The service readied above serves this call; its clone the next.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        match request.headers().get(http::header::ORIGIN) {
            Some(origin) if self.allowed.contains(origin) => {
                Box::pin(self.cors.layer(ready).call(request))
            }
            Some(_) if request.method() == Method::OPTIONS => Box::pin(async {
                let mut forbidden = Response::new(R::default());
                *forbidden.status_mut() = http::StatusCode::FORBIDDEN;
                Ok(forbidden)
            }),
            _ => {
                let mut ready = ready;
                Box::pin(ready.call(request))
            }
        }
    }
}

/// tower-http's CORS for `origins`: what an allowed origin's requests get.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let header = |name: &str| HeaderName::from_static_str(name);
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(ALLOWED_HEADERS.map(header))
        .expose_headers(EXPOSED_HEADERS.map(header))
        .max_age(PREFLIGHT_MAX_AGE)
}

trait FromStaticStr {
    fn from_static_str(name: &str) -> HeaderName;
}

impl FromStaticStr for HeaderName {
    fn from_static_str(name: &str) -> HeaderName {
        HeaderName::from_bytes(name.as_bytes()).expect("the names above are valid header names")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in ["http://127.0.0.1:8080", "https://app.example.com"] {
            assert_eq!(parse_origin(good).unwrap(), good);
        }
        for bad in [
            "app.example.com",
            "ftp://x.example",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com?q=1",
            "*",
            "",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad:?}");
        }
    }
}
