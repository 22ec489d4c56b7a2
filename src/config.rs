//! Command line and environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use crate::auth::{ApiKeys, Authenticator, FrontendConfig, FrontendTokens};
use crate::client::Invocation;

use crate::events::BrokerOptions;
use crate::json::Limits;
use crate::logging::LogFormat;
use crate::server::{EventOptions, ServerConfig, TlsConfig};
use crate::store::StoreOptions;

#[derive(Debug, Parser)]
#[command(
    name = "metadata-service",
    version = crate::build_info::LONG_VERSION,
    about = "gRPC service for user and organization JSON metadata"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, the server runs with these (as `serve` would).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What the process does, once the command line is read.
#[derive(Debug)]
pub enum Run {
    Server(ServerRun),
    Client(crate::client::Invocation),
}

/// The process as a server: it logs, and serves or migrates.
#[derive(Debug)]
pub enum ServerRun {
    Serve(Box<ServeArgs>),
    Migrate(MigrateArgs),
    Relay(Box<RelayArgs>),
}

impl ServerRun {
    pub fn observability(&self) -> &ObservabilityArgs {
        match self {
            ServerRun::Serve(args) => &args.observability,
            ServerRun::Migrate(args) => &args.observability,
            ServerRun::Relay(args) => &args.observability,
        }
    }
}

impl Cli {
    /// Reads the command line. The server's options belong to `serve` (the
    /// default) and `migrate`; given before another subcommand they would
    /// be ignored, so that is refused rather than done silently.
    pub fn read() -> Run {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.get_matches_mut();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit());
        if let Some((name, _)) = matches.subcommand() {
            let given = command
                .get_arguments()
                .map(|arg| arg.get_id().as_str().to_owned())
                .find(|id| {
                    matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
                });
            if let Some(id) = given {
                let flag = id.replace('_', "-");
                command
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("--{flag} goes after the subcommand: `{name} --{flag} ...`"),
                    )
                    .exit();
            }
        }
        cli.into_run()
    }

    pub fn into_run(self) -> Run {
        match self.command {
            None => Run::Server(ServerRun::Serve(Box::new(self.serve))),
            Some(Command::Serve(args)) => Run::Server(ServerRun::Serve(args)),
            Some(Command::Migrate(args)) => Run::Server(ServerRun::Migrate(args)),
            Some(Command::Relay(args)) => Run::Server(ServerRun::Relay(args)),
            Some(Command::User(command)) => {
                Run::Client(Invocation::Metadata(crate::model::Kind::User, command))
            }
            Some(Command::Org(command)) => Run::Client(Invocation::Metadata(
                crate::model::Kind::Organization,
                command,
            )),
            Some(Command::Schema(command)) => Run::Client(Invocation::Schema(command)),
            Some(Command::Txn(command)) => Run::Client(Invocation::Txn(command)),
            Some(Command::Webhook(command)) => Run::Client(Invocation::Webhook(command)),
        }
    }
}

/// The server's options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// With --relay-nats-url, the server also relays its events to NATS
    /// (the way to run the relay with SQLite).
    #[command(flatten)]
    pub relay: NatsArgs,
    /// Webhooks: checked on every endpoint change; with SQLite the server
    /// also delivers them.
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

/// Webhook endpoints and their deliveries.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Non-public networks (private, loopback, link-local...) webhook
    /// deliveries may reach, comma-separated CIDRs; none by default. Plain
    /// http:// is accepted only for hosts in them.
    #[arg(long, env = "METADATA_WEBHOOK_ALLOW_NETWORKS", default_value = "", value_parser = parse_networks)]
    pub webhook_allow_networks: crate::webhook::AllowedNetworks,
    /// Each delivery's timeout (connecting included).
    #[arg(long, env = "METADATA_WEBHOOK_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
    /// An endpoint failing for this long is disabled (re-enable it with UpdateWebhook).
    #[arg(long, env = "METADATA_WEBHOOK_FAILURE_WINDOW", default_value = "5days", value_parser = humantime::parse_duration)]
    pub webhook_failure_window: Duration,
    /// Delays before the 2nd, 3rd... attempt at a failing event (the last
    /// one repeats), each spread by ±20%; a Retry-After answer wins.
    #[arg(long, env = "METADATA_WEBHOOK_RETRY_SCHEDULE", default_value = "5s,5m,30m,2h,5h,10h", value_parser = parse_schedule)]
    pub webhook_retry_schedule: Schedule,
}

fn parse_networks(text: &str) -> Result<crate::webhook::AllowedNetworks, String> {
    crate::webhook::AllowedNetworks::parse(text)
}

/// Retry delays, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

fn parse_schedule(text: &str) -> Result<Schedule, String> {
    let delays = text
        .split(',')
        .map(|item| {
            humantime::parse_duration(item.trim()).map_err(|err| format!("{item:?}: {err}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() {
        return Err("at least one delay".into());
    }
    // A zero delay would retry a failing endpoint in a tight loop.
    if let Some(short) = delays.iter().find(|d| **d < Duration::from_millis(100)) {
        return Err(format!("{short:?}: each delay must be at least 100ms"));
    }
    Ok(Schedule(delays))
}

impl WebhookArgs {
    pub fn options(&self) -> crate::webhook::WebhookOptions {
        crate::webhook::WebhookOptions {
            allowed: Arc::new(self.webhook_allow_networks.clone()),
            timeout: self.webhook_timeout,
            failure_window: self.webhook_failure_window,
            schedule: self.webhook_retry_schedule.0.clone(),
            ..crate::webhook::WebhookOptions::default()
        }
    }
}

/// `relay`: copy the event log into a NATS JetStream stream.
#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    /// Address for gRPC health (grpc.health.v1: "", "relay" and "webhooks").
    #[arg(long, env = "METADATA_RELAY_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// The servers' event retention: the stream's max age unless --nats-max-age is given.
    #[arg(long, env = "METADATA_EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,
    /// How often the event table is polled when no notification arrives.
    #[arg(long, env = "METADATA_WATCH_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub watch_poll_interval: Duration,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

/// Where and how the relay publishes.
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated (nats://host:4222, tls://...).
    /// For `serve`: also relay events to it.
    #[arg(
        long = "nats-url",
        visible_alias = "relay-nats-url",
        env = "METADATA_NATS_URL",
        hide_env_values = true
    )]
    pub nats_url: Option<String>,
    /// JetStream stream the events go to (created if missing).
    #[arg(long, env = "METADATA_NATS_STREAM", default_value = "METADATA")]
    pub nats_stream: String,
    /// Subjects are <prefix>.user.<id> and <prefix>.organization.<id>.
    #[arg(long, env = "METADATA_NATS_SUBJECT_PREFIX", default_value = "metadata")]
    pub nats_subject_prefix: String,
    /// NATS credentials file (.creds: JWT and NKey seed).
    #[arg(long, env = "METADATA_NATS_CREDS", conflicts_with = "nats_user")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "METADATA_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(
        long,
        env = "METADATA_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// PEM CA certificates for the NATS server's TLS certificate; requires TLS.
    #[arg(long, env = "METADATA_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Max age of messages in a stream the relay creates (default: the event retention).
    #[arg(long, env = "METADATA_NATS_MAX_AGE", value_parser = humantime::parse_duration)]
    pub nats_max_age: Option<Duration>,
    /// Duplicate window of a stream the relay creates.
    #[arg(long, env = "METADATA_NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub nats_duplicate_window: Duration,
    /// Replicas of a stream the relay creates (3 on a clustered JetStream).
    #[arg(long, env = "METADATA_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
    /// How long to wait for the NATS connection and for each acknowledgement.
    #[arg(long, env = "METADATA_NATS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,
    /// Message bodies: the event as protobuf (as in Watch) or its proto3 JSON form.
    #[arg(long = "format", visible_alias = "relay-format", env = "METADATA_RELAY_FORMAT", value_enum, default_value_t = crate::relay::Format::Protobuf)]
    pub format: crate::relay::Format,
    /// Reseed a stream that cannot be continued (the event log has moved
    /// past it, or it is empty): a marker, then events after the current
    /// revision. A stream that can be continued is continued, so leaving
    /// it set is harmless.
    #[arg(long = "from-now", visible_alias = "relay-from-now")]
    pub from_now: bool,
}

impl NatsArgs {
    /// The relay's options; None when no NATS URL is given.
    pub fn relay_options(
        &self,
        event_retention: Duration,
    ) -> anyhow::Result<Option<crate::relay::RelayOptions>> {
        let Some(url) = &self.nats_url else {
            return Ok(None);
        };
        crate::relay::subject::check_prefix(&self.nats_subject_prefix)
            .map_err(anyhow::Error::msg)?;
        let stream = &self.nats_stream;
        if stream.is_empty()
            || stream.chars().any(|c| {
                matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
            })
        {
            anyhow::bail!(
                "--nats-stream {stream:?}: a stream name cannot be empty or hold '.', '*', '>', '/', '\\' or spaces"
            );
        }
        let max_age = self.nats_max_age.unwrap_or(event_retention);
        // A max age of zero is no expiry: any duplicate window fits.
        if !max_age.is_zero() && self.nats_duplicate_window > max_age {
            anyhow::bail!(
                "--nats-duplicate-window cannot be longer than the stream's max age ({max_age:?})"
            );
        }
        Ok(Some(crate::relay::RelayOptions {
            nats: crate::relay::NatsOptions {
                url: url.clone(),
                stream: stream.clone(),
                subject_prefix: self.nats_subject_prefix.clone(),
                creds: self.nats_creds.clone(),
                user: self.nats_user.clone(),
                password: self.nats_password.clone(),
                tls_ca: self.nats_tls_ca.clone(),
                max_age,
                duplicate_window: self.nats_duplicate_window,
                replicas: usize::from(self.nats_replicas),
                timeout: self.nats_timeout,
            },
            format: self.format,
            from_now: self.from_now,
            batch: BrokerOptions::default().batch,
            lease_interval: Duration::from_secs(1),
            pauses: Default::default(),
        }))
    }
}

impl RelayArgs {
    pub fn process_config(&self) -> anyhow::Result<crate::relay::RelayProcessConfig> {
        let relay = self.nats.relay_options(self.event_retention)?;
        Ok(crate::relay::RelayProcessConfig {
            database_url: self.database.database_url.clone(),
            store: self.database.store_options(),
            broker: BrokerOptions {
                poll_interval: self.watch_poll_interval,
                ..BrokerOptions::default()
            },
            relay,
            webhooks: self.webhooks.options(),
            listen: self.listen,
            metrics_listen: self.observability.metrics_listen.0,
        })
    }
}

/// What `migrate` needs: the database, and where its log lines go.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

#[derive(Debug, Args)]
pub struct ObservabilityArgs {
    /// Log lines as text or as one JSON object per line.
    #[arg(long, env = "METADATA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Which log lines to keep, in RUST_LOG syntax (e.g. `info,metadata_service=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Plain-HTTP address for /metrics (Prometheus), /healthz and /readyz; `off` disables it.
    #[arg(long, env = "METADATA_METRICS_LISTEN", default_value = "127.0.0.1:9090", value_parser = parse_optional_addr)]
    pub metrics_listen: OptionalAddr,
    /// OTLP/gRPC collector to export traces to (e.g. http://127.0.0.1:4317);
    /// unset, nothing is traced. OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    /// and OTEL_TRACES_SAMPLER(_ARG) apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// A socket address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|err| format!("{err} (expected host:port or `off`)"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (the default).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations, then exit.
    Migrate(MigrateArgs),
    /// Copy every change event into a NATS JetStream stream (with
    /// --nats-url), and deliver webhooks, exactly once and in order
    /// (PostgreSQL; with SQLite the server does both).
    Relay(Box<RelayArgs>),
    /// Call a running server: user metadata (get, merge, replace, delete, watch).
    User(crate::client::ClientCommand),
    /// Call a running server: organization metadata.
    Org(crate::client::ClientCommand),
    /// Call a running server: the JSON Schemas of metadata fields (get, set, delete).
    Schema(crate::client::SchemaCommand),
    /// Call a running server: several writes of users and organizations,
    /// all applied or none (a CommitRequest as JSON).
    Txn(crate::client::TxnCommand),
    /// Call a running server: webhook endpoints (create, list, get, update,
    /// delete, rotate-secret, replay).
    Webhook(crate::client::WebhookCommand),
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// sqlite://path?mode=rwc or postgres://user@host/db
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://metadata.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Largest number of connections in the database pool; the writers open
    /// at most as many again besides it (plus one for point reads and one
    /// for the event dispatcher).
    #[arg(long, env = "METADATA_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// How long to wait for a database connection, at start and per call.
    #[arg(long, env = "METADATA_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_connect_timeout: Duration,
    /// SQLite: how long a write waits for a lock held by another process.
    #[arg(long, env = "METADATA_SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sqlite_busy_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on for gRPC.
    #[arg(long, env = "METADATA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Largest metadata field, as compact JSON, after the write is applied.
    #[arg(long, env = "METADATA_MAX_FIELD_BYTES", default_value_t = Limits::default().max_field_bytes)]
    pub max_field_bytes: usize,
    /// Deepest nesting of objects and lists in a field (the field is level 1).
    #[arg(long, env = "METADATA_MAX_DEPTH", default_value_t = Limits::default().max_depth)]
    pub max_depth: usize,
    /// Largest request message; bigger ones are refused before decoding.
    #[arg(long, env = "METADATA_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Idle time after which a Watch stream that asked for it gets a progress message.
    #[arg(long, env = "METADATA_WATCH_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_progress_interval: Duration,
    /// How often the event table is polled when no notification arrives.
    #[arg(long, env = "METADATA_WATCH_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub watch_poll_interval: Duration,
    /// Events kept in memory for live Watch streams; slower streams read the table.
    #[arg(long, env = "METADATA_WATCH_BUFFER", default_value_t = BrokerOptions::default().buffer)]
    pub watch_buffer: usize,
    /// Events older than this are pruned; Watch from a pruned revision is FAILED_PRECONDITION.
    #[arg(long, env = "METADATA_EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,
    /// How often old events are pruned.
    #[arg(long, env = "METADATA_EVENT_PRUNE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub event_prune_interval: Duration,
    /// How long a Patch's or Commit's request_id answers its retries with the first outcome.
    #[arg(long, env = "METADATA_REQUEST_ID_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub request_id_ttl: Duration,
    /// Unary calls in progress at once; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "METADATA_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Watch streams open at once; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "METADATA_MAX_WATCH_STREAMS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watch_streams: u32,
    /// Calls (HTTP/2 streams) one connection may have open at once; clients queue more.
    #[arg(
        long,
        env = "METADATA_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Time budget of a call's database work; a shorter client deadline wins.
    #[arg(long, env = "METADATA_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_timeout: Duration,
    /// How often the database is pinged; while it fails, health is NOT_SERVING and calls fail fast.
    #[arg(long, env = "METADATA_DB_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub db_health_interval: Duration,
    /// On SIGTERM/SIGINT, how long open calls may take to finish.
    #[arg(long, env = "METADATA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Args)]
pub struct SecurityArgs {
    /// File of backend API keys: one `name:sha256-hex` entry per line, the
    /// SHA-256 of each key (never the key itself).
    #[arg(long, env = "METADATA_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Backend API keys as `name:sha256-hex` entries separated by commas or newlines.
    #[arg(long, env = "METADATA_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// Key of frontend session tokens (JWT): an HMAC secret of at least 32
    /// bytes, or a PEM public key (RSA, EC P-256/P-384, Ed25519); `@path` reads a file.
    #[arg(long, env = "METADATA_FRONTEND_JWT_KEY", hide_env_values = true)]
    pub frontend_jwt_key: Option<String>,
    /// Required `iss` claim of frontend tokens.
    #[arg(long, env = "METADATA_FRONTEND_JWT_ISSUER")]
    pub frontend_jwt_issuer: Option<String>,
    /// Required `aud` claim of frontend tokens.
    #[arg(long, env = "METADATA_FRONTEND_JWT_AUDIENCE")]
    pub frontend_jwt_audience: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf` of frontend tokens.
    #[arg(long, env = "METADATA_FRONTEND_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub frontend_jwt_leeway: Duration,
    /// Serve with no credentials configured on a non-loopback address.
    #[arg(long, env = "METADATA_ALLOW_UNAUTHENTICATED", value_parser = BoolishValueParser::new())]
    pub allow_unauthenticated: bool,
    /// Do not serve gRPC reflection.
    #[arg(long, env = "METADATA_DISABLE_REFLECTION", value_parser = BoolishValueParser::new())]
    pub disable_reflection: bool,
    /// Origins whose pages may call the service from a browser (gRPC-Web),
    /// comma-separated, e.g. https://app.example.com; none by default.
    #[arg(long, env = "METADATA_CORS_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = crate::web::parse_origin)]
    pub cors_allowed_origins: Vec<http::HeaderValue>,
    /// PEM certificate chain to serve TLS with.
    #[arg(long, env = "METADATA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "METADATA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; clients must present a certificate they signed (mTLS).
    #[arg(long, env = "METADATA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl SecurityArgs {
    /// Reads the key files and checks every credential setting.
    pub fn authenticator(&self) -> anyhow::Result<Authenticator> {
        let mut keys = ApiKeys::default();
        if let Some(path) = &self.api_keys_file {
            let text = String::from_utf8(read(path, "--api-keys-file")?)
                .context("--api-keys-file is not UTF-8")?;
            keys =
                ApiKeys::parse(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
        }
        if let Some(text) = &self.api_keys {
            let more = ApiKeys::parse(text, "--api-keys").map_err(anyhow::Error::msg)?;
            keys.extend(more).map_err(anyhow::Error::msg)?;
        }
        let frontend = match &self.frontend_jwt_key {
            None => None,
            Some(key) => {
                let key = match key.strip_prefix('@') {
                    Some(path) => read(Path::new(path), "--frontend-jwt-key")?,
                    None => key.as_bytes().to_vec(),
                };
                let config = FrontendConfig {
                    key,
                    issuer: self.frontend_jwt_issuer.clone(),
                    audience: self.frontend_jwt_audience.clone(),
                    leeway: self.frontend_jwt_leeway,
                };
                Some(FrontendTokens::new(&config).map_err(anyhow::Error::msg)?)
            }
        };
        Ok(Authenticator::new(keys, frontend))
    }

    pub fn tls(&self) -> anyhow::Result<Option<TlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(TlsConfig {
            cert: read(cert, "--tls-cert")?,
            key: read(key, "--tls-key")?,
            client_ca: self
                .tls_client_ca
                .as_deref()
                .map(|ca| read(ca, "--tls-client-ca"))
                .transpose()?,
        }))
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

impl DatabaseArgs {
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections,
            connect_timeout: self.db_connect_timeout,
            sqlite_busy_timeout: self.sqlite_busy_timeout,
            ..StoreOptions::default()
        }
    }
}

impl ServeArgs {
    /// The server's configuration, with every key and certificate file read.
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig {
            listen: self.server.listen,
            database_url: self.database.database_url.clone(),
            store: self.database.store_options(),
            limits: Limits {
                max_field_bytes: self.server.max_field_bytes,
                max_depth: self.server.max_depth,
            },
            max_request_bytes: self.server.max_request_bytes,
            request_id_ttl: self.server.request_id_ttl,
            events: EventOptions {
                broker: BrokerOptions {
                    progress_interval: self.server.watch_progress_interval,
                    poll_interval: self.server.watch_poll_interval,
                    buffer: self.server.watch_buffer,
                    ..BrokerOptions::default()
                },
                retention: self.server.event_retention,
                prune_interval: self.server.event_prune_interval,
            },
            shutdown_grace: self.server.shutdown_grace,
            max_concurrent_requests: self.server.max_concurrent_requests,
            max_watch_streams: self.server.max_watch_streams as usize,
            max_streams_per_connection: self.server.max_streams_per_connection,
            db_timeout: self.server.db_timeout,
            db_health_interval: self.server.db_health_interval,
            auth: Arc::new(self.security.authenticator()?),
            allow_unauthenticated: self.security.allow_unauthenticated,
            cors_allowed_origins: self.security.cors_allowed_origins.clone(),
            reflection: !self.security.disable_reflection,
            tls: self.security.tls()?,
            metrics_listen: self.observability.metrics_listen.0,
            relay: self.relay.relay_options(self.server.event_retention)?,
            webhooks: self.webhooks.options(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_serve_sqlite_on_loopback() {
        let cli = Cli::try_parse_from(["metadata-service"]).unwrap();
        assert!(cli.command.is_none());
        let config = cli.serve.server_config().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.database_url, "sqlite://metadata.db?mode=rwc");
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.max_watch_streams, 10_000);
        assert_eq!(config.max_streams_per_connection, 1000);
    }

    #[test]
    fn stream_limits_are_at_least_one() {
        let cli = Cli::try_parse_from([
            "metadata-service",
            "--max-watch-streams",
            "2",
            "--max-streams-per-connection",
            "3",
        ])
        .unwrap();
        let config = cli.serve.server_config().unwrap();
        assert_eq!(
            (config.max_watch_streams, config.max_streams_per_connection),
            (2, 3)
        );
        for flag in ["--max-watch-streams", "--max-streams-per-connection"] {
            assert!(Cli::try_parse_from(["metadata-service", flag, "0"]).is_err());
        }
    }

    #[test]
    fn a_relay_stream_without_expiry_takes_the_default_duplicate_window() {
        let cli = Cli::try_parse_from([
            "metadata-service",
            "relay",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--nats-max-age",
            "0s",
        ])
        .unwrap();
        let Run::Server(ServerRun::Relay(args)) = cli.into_run() else {
            panic!("relay");
        };
        let config = args.process_config().unwrap();
        assert_eq!(config.relay.unwrap().nats.max_age, Duration::ZERO);
    }

    #[test]
    fn a_relay_without_nats_only_delivers_webhooks() {
        let cli = Cli::try_parse_from([
            "metadata-service",
            "relay",
            "--webhook-allow-networks",
            "10.0.0.0/8, 127.0.0.1",
            "--webhook-retry-schedule",
            "1s,1m",
        ])
        .unwrap();
        let Run::Server(ServerRun::Relay(args)) = cli.into_run() else {
            panic!("relay");
        };
        let config = args.process_config().unwrap();
        assert!(config.relay.is_none());
        assert_eq!(
            config.webhooks.allowed.to_string(),
            "10.0.0.0/8,127.0.0.1/32"
        );
        assert_eq!(
            config.webhooks.schedule,
            [Duration::from_secs(1), Duration::from_secs(60)]
        );
        let refused = Cli::try_parse_from([
            "metadata-service",
            "serve",
            "--webhook-allow-networks",
            "intranet",
        ]);
        assert!(refused.unwrap_err().to_string().contains("\"intranet\""));
        let zero = Cli::try_parse_from([
            "metadata-service",
            "serve",
            "--webhook-retry-schedule",
            "0s,5m",
        ]);
        assert!(zero.unwrap_err().to_string().contains("at least 100ms"));
    }

    #[test]
    fn flags_after_subcommand() {
        let cli = Cli::try_parse_from([
            "metadata-service",
            "migrate",
            "--database-url",
            "postgres://x/y",
        ])
        .unwrap();
        let Run::Server(ServerRun::Migrate(args)) = cli.into_run() else {
            panic!("migrate");
        };
        assert_eq!(args.database.database_url, "postgres://x/y");
    }

    #[test]
    fn serve_takes_the_server_options_as_the_default_does() {
        let explicit = ["metadata-service", "serve", "--listen", "127.0.0.1:7"];
        let Run::Server(ServerRun::Serve(args)) = Cli::try_parse_from(explicit).unwrap().into_run()
        else {
            panic!("serve");
        };
        assert_eq!(
            args.server_config().unwrap().listen.to_string(),
            "127.0.0.1:7"
        );
    }

    #[test]
    fn schema_subcommands_take_kind_field_and_the_client_flags() {
        use crate::client::schemas::{FieldName, KindName, SchemaAction};
        let cli = Cli::try_parse_from([
            "metadata-service",
            "schema",
            "set",
            "user",
            "unsafe",
            "--file",
            "-",
            "--validate-only",
            "--expected-version",
            "2",
            "--addr",
            "http://127.0.0.1:7",
        ])
        .unwrap();
        let Run::Client(Invocation::Schema(command)) = cli.into_run() else {
            panic!("schema");
        };
        assert_eq!(command.connection.addr, "http://127.0.0.1:7");
        let SchemaAction::Set {
            target,
            file,
            validate_only,
            expected_version,
        } = command.action
        else {
            panic!("set");
        };
        assert!(matches!(
            (target.kind, target.field),
            (KindName::User, FieldName::Unsafe)
        ));
        assert_eq!(
            (file.as_str(), validate_only, expected_version),
            ("-", true, Some(2))
        );
        for bad in [
            &["schema", "set", "user", "public"][..],
            &["schema", "get", "user", "secret"],
            &["schema", "get", "team", "public"],
            &["schema", "get", "user"],
            &["schema", "delete", "org", "public", "--file", "s.json"],
        ] {
            let args = [&["metadata-service"][..], bad].concat();
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_client_help_shows_only_the_client() {
        let mut command = Cli::command();
        let user = command.find_subcommand_mut("user").unwrap();
        let help = user.render_long_help().to_string();
        for client in ["--addr", "--token", "--ca", "--client-cert", "--client-key"] {
            assert!(help.contains(client), "{client} missing from:\n{help}");
        }
        for server in [
            "--database-url",
            "--db-max-connections",
            "--tls-cert",
            "--listen",
        ] {
            assert!(!help.contains(server), "{server} in:\n{help}");
        }
        let merge = user.find_subcommand_mut("merge").unwrap();
        let help = merge.render_long_help().to_string();
        assert!(
            help.contains("--addr") && !help.contains("--database-url"),
            "{help}"
        );
    }
}
