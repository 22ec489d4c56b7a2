//! The plain-HTTP side port: Prometheus metrics and HTTP probes (which work
//! even when the gRPC port speaks TLS, where kubelet gRPC probes cannot).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Whether the process can do its work now; Err says why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>;

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    ready: Readiness,
    /// Cancelled when the process starts to stop.
    draining: CancellationToken,
}

/// A bound HTTP port, serving until its task is aborted.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Binds the metrics port; done before anything slow (connecting to the
/// database, migrations), so that a port in use fails the start at once.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen} for metrics (/metrics, /healthz, /readyz): choose \
             another address with --metrics-listen (METADATA_METRICS_LISTEN), or \
             --metrics-listen off"
        )
    })
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Readiness,
    draining: CancellationToken,
) -> anyhow::Result<HttpServer> {
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Shared {
            metrics,
            ready,
            draining,
        });
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!(error = %err, "metrics server failed");
        }
    });
    Ok(HttpServer { addr, task })
}

async fn metrics_text(State(shared): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        shared.metrics.render(),
    )
}

/// Ready while the process can work (the server: its database answers) and
/// is not stopping.
async fn readiness(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    match (shared.ready)() {
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
    }
}
