//! Command line and environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::events::BrokerOptions;
use crate::json::Limits;
use crate::server::{EventOptions, ServerConfig};
use crate::store::StoreOptions;

#[derive(Debug, Parser)]
#[command(
    name = "metadata-service",
    version,
    about = "gRPC service for user and organization JSON metadata"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (the default).
    Serve,
    /// Apply the database migrations, then exit.
    Migrate,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// sqlite://path?mode=rwc or postgres://user@host/db
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://metadata.db?mode=rwc",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// Largest number of open database connections.
    #[arg(
        long,
        env = "METADATA_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub db_max_connections: u32,
    /// How long to wait for a database connection, at start and per call.
    #[arg(long, env = "METADATA_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub db_connect_timeout: Duration,
    /// SQLite: how long a write waits for a lock held by another process.
    #[arg(long, env = "METADATA_SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub sqlite_busy_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on for gRPC.
    #[arg(
        long,
        env = "METADATA_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,
    /// Largest metadata field, as compact JSON, after the write is applied.
    #[arg(long, env = "METADATA_MAX_FIELD_BYTES", default_value_t = Limits::default().max_field_bytes, global = true)]
    pub max_field_bytes: usize,
    /// Deepest nesting of objects and lists in a field (the field is level 1).
    #[arg(long, env = "METADATA_MAX_DEPTH", default_value_t = Limits::default().max_depth, global = true)]
    pub max_depth: usize,
    /// Largest request message; bigger ones are refused before decoding.
    #[arg(long, env = "METADATA_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024, global = true)]
    pub max_request_bytes: usize,
    /// Idle time after which a Watch stream that asked for it gets a progress message.
    #[arg(long, env = "METADATA_WATCH_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub watch_progress_interval: Duration,
    /// How often the event table is polled when no notification arrives.
    #[arg(long, env = "METADATA_WATCH_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub watch_poll_interval: Duration,
    /// Events kept in memory for live Watch streams; slower streams read the table.
    #[arg(long, env = "METADATA_WATCH_BUFFER", default_value_t = BrokerOptions::default().buffer, global = true)]
    pub watch_buffer: usize,
    /// Events older than this are pruned; Watch from a pruned revision is FAILED_PRECONDITION.
    #[arg(long, env = "METADATA_EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration, global = true)]
    pub event_retention: Duration,
    /// How often old events are pruned.
    #[arg(long, env = "METADATA_EVENT_PRUNE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration, global = true)]
    pub event_prune_interval: Duration,
    /// Unary calls in progress at once; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "METADATA_MAX_CONCURRENT_REQUESTS",
        default_value_t = 512,
        global = true
    )]
    pub max_concurrent_requests: usize,
    /// Time budget of a call's database work; a shorter client deadline wins.
    #[arg(long, env = "METADATA_DB_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub db_timeout: Duration,
    /// How often the database is pinged; while it fails, health is NOT_SERVING and calls fail fast.
    #[arg(long, env = "METADATA_DB_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub db_health_interval: Duration,
    /// On SIGTERM/SIGINT, how long open calls may take to finish.
    #[arg(long, env = "METADATA_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,
}

impl DatabaseArgs {
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections,
            connect_timeout: self.db_connect_timeout,
            sqlite_busy_timeout: self.sqlite_busy_timeout,
        }
    }
}

impl Cli {
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            listen: self.server.listen,
            database_url: self.database.database_url.clone(),
            store: self.database.store_options(),
            limits: Limits {
                max_field_bytes: self.server.max_field_bytes,
                max_depth: self.server.max_depth,
            },
            max_request_bytes: self.server.max_request_bytes,
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
            db_timeout: self.server.db_timeout,
            db_health_interval: self.server.db_health_interval,
        }
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
        let config = cli.server_config();
        assert!(cli.command.is_none());
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.database_url, "sqlite://metadata.db?mode=rwc");
        assert_eq!(config.limits, Limits::default());
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
        assert!(matches!(cli.command, Some(Command::Migrate)));
        assert_eq!(cli.database.database_url, "postgres://x/y");
    }
}
