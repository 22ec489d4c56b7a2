//! `metadata-service relay`: the relay and the webhook deliverer as a
//! process of its own (Postgres), with its health (gRPC and HTTP) and
//! metrics; and the wiring the server uses to run the relay inside itself
//! (`serve --relay-nats-url`, SQLite).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::{Relay, RelayError, RelayMetrics, RelayOptions};
use crate::events::{Broker, BrokerOptions};
use crate::http::HttpServer;
use crate::metrics::Metrics;
use crate::store::{Store, StoreOptions};

/// Health name of the relay, in the relay process and in a server that
/// runs it: SERVING while it reaches NATS and the database (publishing or
/// standing by), NOT_SERVING while a failure pauses it or after it stopped.
pub const RELAY_HEALTH: &str = "relay";

#[derive(Clone, Debug)]
pub struct RelayProcessConfig {
    pub database_url: String,
    pub store: StoreOptions,
    pub broker: BrokerOptions,
    /// None without --nats-url: the process only delivers webhooks.
    pub relay: Option<RelayOptions>,
    pub webhooks: crate::webhook::WebhookOptions,
    /// gRPC health (grpc.health.v1) only.
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
}

/// Follows the relay's health on `names`, SERVING at first; ends with
/// NOT_SERVING when the sender is dropped (the relay stopped).
pub fn report_health(
    reporter: HealthReporter,
    names: &'static [&'static str],
) -> Box<dyn Fn(bool) + Send + Sync> {
    let (sender, mut receiver) = watch::channel(true);
    tokio::spawn(async move {
        loop {
            let healthy = *receiver.borrow_and_update();
            let status = if healthy {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            crate::health::set_all(&reporter, names, status).await;
            if receiver.changed().await.is_err() {
                crate::health::set_all(&reporter, names, ServingStatus::NotServing).await;
                return;
            }
        }
    });
    Box::new(move |healthy| {
        sender.send_replace(healthy);
    })
}

/// Starts the relay inside a server: fails on bad configuration (NATS
/// unreachable, a foreign stream); a later fatal error stops the relay
/// only, with an error line and its health NOT_SERVING.
pub async fn start_in_server(
    store: Arc<Store>,
    broker: Arc<Broker>,
    options: RelayOptions,
    metrics: &Arc<Metrics>,
    reporter: HealthReporter,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let relay = Relay::connect(
        store,
        broker,
        options,
        RelayMetrics::new(metrics),
        report_health(reporter, &[RELAY_HEALTH]),
        shutdown,
    )
    .await?;
    tokio::spawn(async move {
        if let Err(err) = relay.run().await {
            tracing::error!(error = %err, "the NATS relay stopped");
        }
    });
    Ok(())
}

/// A relay process; it runs until [`RunningRelay::shutdown`] or a fatal
/// error ([`RunningRelay::stopped`]).
pub struct RunningRelay {
    addr: SocketAddr,
    http: Option<HttpServer>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RelayError>>,
    health: JoinHandle<()>,
    store: Arc<Store>,
    /// The NATS relay's (a default, never publishing, without --nats-url).
    pub state: Arc<super::RelayState>,
    pub webhooks: Arc<crate::webhook::DelivererState>,
    deliverer: JoinHandle<()>,
}

impl RunningRelay {
    /// Where gRPC health is served.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|http| http.addr)
    }

    /// Waits for the relay to end by itself: only a fatal error ends it.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        match (&mut self.task).await {
            Ok(result) => result.map_err(anyhow::Error::from),
            Err(err) => Err(anyhow::anyhow!("relay task failed: {err}")),
        }
    }

    /// Stops at once, as a crash would (for tests): nothing is flushed or
    /// closed politely; the lease goes when its connection is dropped.
    pub fn kill(self) {
        self.task.abort();
        self.deliverer.abort();
        self.health.abort();
        if let Some(http) = self.http {
            http.task.abort();
        }
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = match self.task.await {
            Ok(result) => result.map_err(anyhow::Error::from),
            Err(err) if err.is_cancelled() => Ok(()),
            Err(err) => Err(anyhow::anyhow!("relay task failed: {err}")),
        };
        let _ = self.deliverer.await;
        self.health.abort();
        let _ = self.health.await;
        if let Some(http) = self.http {
            http.task.abort();
            let _ = http.task.await;
        }
        self.store.close_pool().await;
        result
    }
}

/// Health names of the relay process: the process as a whole and the relay.
const PROCESS_NAMES: &[&str] = &["", RELAY_HEALTH];

pub async fn start_process(config: RelayProcessConfig) -> anyhow::Result<RunningRelay> {
    let store = crate::store::Store::open(&config.database_url, &config.store).await?;
    if !store.shared() {
        anyhow::bail!(
            "`relay` needs PostgreSQL; with SQLite one process owns the file, so the server \
             relays and delivers webhooks itself: `serve --relay-nats-url ...`"
        );
    }
    tracing::info!(
        database = %crate::store::redact_url(&config.database_url),
        nats = %config.relay.as_ref().map_or("off".into(), |relay| super::jetstream::redact_nats_url(&relay.nats.url)),
        stream = ?config.relay.as_ref().map(|relay| &relay.nats.stream),
        subject_prefix = ?config.relay.as_ref().map(|relay| &relay.nats.subject_prefix),
        format = ?config.relay.as_ref().map(|relay| relay.format),
        from_now = config.relay.as_ref().is_some_and(|relay| relay.from_now),
        webhook_allow_networks = %config.webhooks.allowed,
        "relay configuration"
    );
    let store = Arc::new(store);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let broker = Broker::start(store.clone(), config.broker.clone(), shutdown.clone())
        .await
        .context("cannot start the event dispatcher")?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(crate::health::LIVENESS, ServingStatus::Serving)
        .await;
    let relay = match &config.relay {
        Some(options) => Some(
            Relay::connect(
                store.clone(),
                broker.clone(),
                options.clone(),
                RelayMetrics::new(&metrics),
                report_health(reporter.clone(), PROCESS_NAMES),
                shutdown.clone(),
            )
            .await?,
        ),
        None => {
            crate::health::set_all(&reporter, &[""], ServingStatus::Serving).await;
            None
        }
    };
    let state = relay.as_ref().map_or_else(Default::default, Relay::state);
    let (webhooks, deliverer) = crate::webhook::start(
        store.clone(),
        broker,
        config.webhooks.clone(),
        &metrics,
        Default::default(),
        shutdown.clone(),
    )?;
    tokio::spawn(crate::webhook::report_health(
        webhooks.clone(),
        reporter,
        shutdown.clone(),
    ));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let health_shutdown = shutdown.clone();
    let health = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                health_shutdown.cancelled_owned(),
            )
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "health server failed");
        }
    });
    let http = match config.metrics_listen {
        Some(listen) => {
            let ready_state = state.clone();
            let ready_webhooks = webhooks.clone();
            let ready: crate::http::Readiness = Arc::new(move || {
                if !ready_state.is_healthy() {
                    Err("relay paused: NATS or the database is unreachable")
                } else if !ready_webhooks.is_healthy() {
                    Err("webhook deliveries paused: the database is unreachable")
                } else {
                    Ok(())
                }
            });
            let listener = crate::http::bind(listen).await?;
            Some(crate::http::serve(listener, metrics.clone(), ready, shutdown.clone()).await?)
        }
        None => None,
    };
    let task = match relay {
        Some(relay) => tokio::spawn(relay.run()),
        // Only webhooks: nothing ends by itself but shutdown.
        None => {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                Ok(())
            })
        }
    };
    tracing::info!(
        %addr,
        metrics = %http.as_ref().map_or("off".to_string(), |h| h.addr.to_string()),
        nats = config.relay.is_some(),
        "relay running"
    );
    Ok(RunningRelay {
        addr,
        http,
        shutdown,
        task,
        health,
        store,
        state,
        webhooks,
        deliverer,
    })
}
