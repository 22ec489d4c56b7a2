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

use crate::health::DbHealth;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    db: Arc<DbHealth>,
    /// Cancelled when the server starts to stop.
    draining: CancellationToken,
}

/// A bound HTTP port, serving until its task is aborted.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub task: JoinHandle<()>,
}

pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    db: Arc<DbHealth>,
    draining: CancellationToken,
) -> anyhow::Result<HttpServer> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for metrics"))?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Shared {
            metrics,
            db,
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

/// Ready while the database answers and the server is not stopping.
async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !shared.db.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
