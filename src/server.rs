//! Wiring: storage, the two services, health, reflection and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::api::{Organizations, Users};
use crate::auth::Authenticator;
use crate::events::{self, Broker, BrokerOptions};
use crate::health::{DbHealth, LIVENESS};
use crate::http::HttpServer;
use crate::json::Limits;
use crate::metrics::Metrics;
use crate::proto::v1::metadata_schema_service_server::MetadataSchemaServiceServer;
use crate::proto::v1::metadata_transaction_service_server::MetadataTransactionServiceServer;
use crate::proto::v1::metadata_webhook_service_server::MetadataWebhookServiceServer;
use crate::service::{
    Admission, Authenticate, Bounds, Core, Handlers, RequestLayer, Routed, SchemaHandlers, Served,
    TransactionHandlers, WebhookHandlers,
};
use crate::store::{Store, StoreOptions};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    pub store: StoreOptions,
    pub limits: Limits,
    pub max_request_bytes: usize,
    pub events: EventOptions,
    /// How long a request id (Patch, Commit) answers retries.
    pub request_id_ttl: Duration,
    /// After a stop request, how long open calls may take to finish before
    /// their connections are closed.
    pub shutdown_grace: Duration,
    /// Unary calls in progress at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Watch streams open at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// HTTP/2 streams (calls) one connection may have open at once; the
    /// client queues more until one ends.
    pub max_streams_per_connection: u32,
    /// Time budget of a call's database work (shortened by a client deadline).
    pub db_timeout: Duration,
    /// How often the database is pinged for health.
    pub db_health_interval: Duration,
    /// Who may call; with no credentials configured, everyone may.
    pub auth: Arc<Authenticator>,
    /// Serve without credentials on a non-loopback address.
    pub allow_unauthenticated: bool,
    /// Origins whose pages may call from a browser (CORS); none by default.
    pub cors_allowed_origins: Vec<http::HeaderValue>,
    /// Serve gRPC reflection (for grpcurl and similar tools).
    pub reflection: bool,
    pub tls: Option<TlsConfig>,
    /// Plain-HTTP port for /metrics, /healthz and /readyz; None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Relay events to NATS from this process (`--relay-nats-url`).
    pub relay: Option<crate::relay::RelayOptions>,
    /// Webhook endpoints' checks, and deliveries (this process delivers
    /// them on SQLite; the `relay` process on Postgres).
    pub webhooks: crate::webhook::WebhookOptions,
}

/// PEM certificate chain and key; with `client_ca`, clients must present a
/// certificate signed by it (mTLS).
#[derive(Clone)]
pub struct TlsConfig {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mtls", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            // A client that opens a connection and never finishes the
            // handshake must not hold it forever.
            .timeout(Duration::from_secs(10));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Refuses to expose an open server beyond this machine by accident.
fn check_exposure(config: &ServerConfig) -> anyhow::Result<()> {
    if config.auth.is_open() && !config.listen.ip().is_loopback() && !config.allow_unauthenticated {
        anyhow::bail!(
            "refusing to listen on {} without authentication: anyone who can reach it could \
             read and change all metadata. Configure backend API keys (--api-keys-file or \
             METADATA_API_KEYS) and/or --frontend-jwt-key, or pass --allow-unauthenticated \
             if something in front of the service already authenticates callers",
            config.listen
        );
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct EventOptions {
    pub broker: BrokerOptions,
    /// Events older than this are pruned.
    pub retention: Duration,
    pub prune_interval: Duration,
}

impl Default for EventOptions {
    fn default() -> Self {
        EventOptions {
            broker: BrokerOptions::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// A server accepting calls; stop it with [`RunningServer::shutdown`].
pub struct RunningServer {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    http: Option<HttpServer>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
    store: Arc<Store>,
    broker: Arc<Broker>,
    grace: Duration,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where /metrics is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|http| http.addr)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Watch streams whose task still runs (a stream whose client left
    /// counts until its task notices).
    pub fn broker_open_streams(&self) -> u64 {
        self.broker
            .stats
            .open_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops accepting calls, lets in-flight calls finish (for at most the
    /// shutdown grace: a client holding a stream open, such as a health
    /// watcher, must not keep the process alive) and closes the database
    /// pool.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        // The task may already have ended on its own; its result says why.
        let _ = self.stop.send(());
        let result = match tokio::time::timeout(self.grace, &mut self.task).await {
            Ok(joined) => joined.context("server task panicked")?,
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "shutdown grace elapsed; closing open connections");
                self.task.abort();
                Ok(())
            }
        };
        self.store.close_pool().await;
        if let Some(http) = self.http.take() {
            http.task.abort();
            // Wait for the listener to be dropped: the port is free after.
            let _ = http.task.await;
        }
        result
    }
}

/// Health names that follow the database and shutdown (readiness).
const SERVICE_NAMES: &[&str] = &[
    "",
    <<Users as Served>::Server as tonic::server::NamedService>::NAME,
    <<Organizations as Served>::Server as tonic::server::NamedService>::NAME,
    <MetadataSchemaServiceServer<SchemaHandlers> as tonic::server::NamedService>::NAME,
    <MetadataTransactionServiceServer<TransactionHandlers> as tonic::server::NamedService>::NAME,
    <MetadataWebhookServiceServer<WebhookHandlers> as tonic::server::NamedService>::NAME,
];

/// Opens the store, binds `config.listen` (port 0 picks a free port) and
/// serves until [`RunningServer::shutdown`].
pub async fn start(config: &ServerConfig) -> anyhow::Result<RunningServer> {
    check_exposure(config)?;
    let metrics = Metrics::new();
    // Without it, one connection could open streams until memory runs out;
    // it is advertised in SETTINGS, so well-behaved clients wait instead.
    // HTTP/1.1 too: browsers send gRPC-Web over it (`web.rs`).
    let mut builder = tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(config.max_streams_per_connection);
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.server_config())
            .context("invalid TLS certificate or key")?;
    }
    // Outermost first: CORS answers a preflight before anything counts it
    // as a call; gRPC-Web translates before the telemetry, which then
    // sees every call as gRPC (its status in trailers).
    let mut builder = builder
        .layer(crate::web::CorsGateLayer::new(&config.cors_allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(RequestLayer::new(metrics.clone()));
    log_configuration(config);
    // The ports first: a port in use fails the start at once, before the
    // database is connected to and migrated.
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {} for gRPC: choose another address with --listen \
             (METADATA_LISTEN)",
            config.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let http_listener = match config.metrics_listen {
        Some(listen) => Some(crate::http::bind(listen).await?),
        None => None,
    };
    let store = Store::open(&config.database_url, &config.store).await?;
    store.instrument(metrics.db_acquire.clone(), metrics.write_group_size.clone());
    let store = Arc::new(store);

    let shutdown = CancellationToken::new();
    let broker = Broker::start(
        store.clone(),
        config.events.broker.clone(),
        shutdown.clone(),
    )
    .await
    .context("cannot start the event dispatcher")?;
    tokio::spawn(events::prune_periodically(
        store.clone(),
        config.events.retention,
        config.events.prune_interval,
        config.request_id_ttl,
        shutdown.clone(),
    ));
    let (reporter, health) = tonic_health::server::health_reporter();
    crate::health::set_all(&reporter, SERVICE_NAMES, ServingStatus::Serving).await;
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let db_health = Arc::new(DbHealth::default());
    tokio::spawn(crate::health::monitor(
        store.clone(),
        db_health.clone(),
        reporter.clone(),
        SERVICE_NAMES,
        config.db_health_interval,
        config.db_timeout,
        shutdown.clone(),
    ));
    if let Some(relay) = &config.relay {
        crate::relay::start_in_server(
            store.clone(),
            broker.clone(),
            relay.clone(),
            &metrics,
            reporter.clone(),
            shutdown.clone(),
        )
        .await
        .context("cannot start the NATS relay")?;
    }
    // Endpoint changes made here wake a deliverer running here at once.
    let webhooks_changed = Arc::new(tokio::sync::Notify::new());
    if !store.shared() {
        // SQLite: one process owns the file, so it delivers too (on
        // Postgres, the `relay` process does, under its lease).
        let (state, _deliverer) = crate::webhook::start(
            store.clone(),
            broker.clone(),
            config.webhooks.clone(),
            &metrics,
            webhooks_changed.clone(),
            shutdown.clone(),
        )
        .context("cannot start the webhook deliverer")?;
        tokio::spawn(crate::webhook::report_health(
            state,
            reporter.clone(),
            shutdown.clone(),
        ));
    }
    metrics.sample(store.clone(), broker.clone());
    tokio::spawn(crate::metrics::track_latest_revision(
        metrics.clone(),
        store.clone(),
        config.db_health_interval,
        shutdown.clone(),
    ));
    let http = match http_listener {
        Some(listener) => Some(
            crate::http::serve(
                listener,
                metrics.clone(),
                db_readiness(db_health.clone()),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let bounds = Bounds {
        max_concurrent: config.max_concurrent_requests,
        max_streams: config.max_watch_streams,
    };
    let admission = Admission::new(
        bounds,
        metrics.watch_streams_refused.clone(),
        config.db_timeout,
        db_health,
        shutdown.clone(),
    );
    let core = Arc::new(Core::new(
        store.clone(),
        broker.clone(),
        config.limits,
        admission,
        metrics.clone(),
        config.request_id_ttl,
    ));
    let authenticate = Authenticate(config.auth.clone());
    let max = config.max_request_bytes;
    let users = mount::<Users>(&core, &authenticate, max);
    let organizations = mount::<Organizations>(&core, &authenticate, max);
    let schemas = InterceptedService::new(
        MetadataSchemaServiceServer::new(SchemaHandlers::new(core.clone()))
            .max_decoding_message_size(max),
        authenticate.clone(),
    );

    let transactions = InterceptedService::new(
        MetadataTransactionServiceServer::new(TransactionHandlers::new(core.clone()))
            .max_decoding_message_size(max),
        authenticate.clone(),
    );

    let webhooks = InterceptedService::new(
        MetadataWebhookServiceServer::new(WebhookHandlers::new(
            core.clone(),
            broker.clone(),
            config.webhooks.allowed.clone(),
            webhooks_changed,
        ))
        .max_decoding_message_size(max),
        authenticate.clone(),
    );

    // grpcurl 1.8 speaks only v1alpha; newer clients use v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc's error details: grpcurl then prints a status's
            // details (ErrorInfo, BadRequest, ...) instead of raw bytes.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        (
            Some(reflection().build_v1()?),
            Some(reflection().build_v1alpha()?),
        )
    } else {
        (None, None)
    };

    let (stop, stopped) = oneshot::channel::<()>();
    let router = builder
        .add_service(health)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(users)
        .add_service(organizations)
        .add_service(schemas)
        .add_service(transactions)
        .add_service(webhooks);

    let served_store = store.clone();
    let task = tokio::spawn(async move {
        let mut reporter = reporter;
        let signal = async move {
            let _ = stopped.await;
            crate::health::set_all(&reporter, SERVICE_NAMES, ServingStatus::NotServing).await;
            // Health Watch streams see NOT_SERVING, then end: a watcher
            // must not hold the drain open for the whole grace period.
            for name in SERVICE_NAMES.iter().chain([&LIVENESS]) {
                reporter.clear_service_status(name).await;
            }
            tracing::info!("shutting down");
            // New calls are refused from here on; Watch streams end with
            // UNAVAILABLE so clients resume elsewhere (the server waits for
            // open calls, so they must end first).
            shutdown.cancel();
        };
        router
            .serve_with_incoming_shutdown(incoming(listener), signal)
            .await
            .context("server failed")?;
        served_store.close_pool().await;
        Ok(())
    });
    tracing::info!(
        %addr,
        metrics = %http.as_ref().map_or("off".to_string(), |h| h.addr.to_string()),
        "serving gRPC"
    );
    Ok(RunningServer {
        addr,
        metrics,
        http,
        stop,
        task,
        store,
        broker,
        grace: config.shutdown_grace,
    })
}

fn db_readiness(db: Arc<DbHealth>) -> crate::http::Readiness {
    Arc::new(move || {
        if db.is_up() {
            Ok(())
        } else {
            Err("database unavailable")
        }
    })
}

/// One kind's service as served: authenticated, Watch routed to the
/// encode-once path, everything else to the generated server.
fn mount<K: Served>(
    core: &Arc<Core>,
    authenticate: &Authenticate,
    max_request_bytes: usize,
) -> InterceptedService<Routed<K::Server, K>, Authenticate> {
    let server = K::server(Handlers::new(core.clone()), max_request_bytes);
    InterceptedService::new(
        Routed::new(server, core.clone(), max_request_bytes),
        authenticate.clone(),
    )
}

/// Accepted connections with TCP_NODELAY: tonic sets it only on listeners
/// it binds itself, and without it a small response can wait for the
/// client's delayed ACK (tens of milliseconds).
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            // Best effort: a socket that refuses it still works.
            let _ = stream.set_nodelay(true);
        }
        accepted
    })
}

/// The effective configuration, without secrets: the database URL's
/// password is masked, credentials are only counted.
fn log_configuration(config: &ServerConfig) {
    tracing::info!(
        version = crate::build_info::VERSION,
        revision = crate::build_info::REVISION,
        listen = %config.listen,
        database = %crate::store::redact_url(&config.database_url),
        db_max_connections = config.store.max_connections,
        max_field_bytes = config.limits.max_field_bytes,
        max_depth = config.limits.max_depth,
        max_request_bytes = config.max_request_bytes,
        max_concurrent_requests = config.max_concurrent_requests,
        max_watch_streams = config.max_watch_streams,
        max_streams_per_connection = config.max_streams_per_connection,
        db_timeout = ?config.db_timeout,
        shutdown_grace = ?config.shutdown_grace,
        event_retention = ?config.events.retention,
        request_id_ttl = ?config.request_id_ttl,
        auth = %config.auth,
        tls = config.tls.is_some(),
        mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        reflection = config.reflection,
        metrics_listen = ?config.metrics_listen,
        webhook_allow_networks = %config.webhooks.allowed,
        "configuration"
    );
}
