//! The server under test, running in this process on a fresh database,
//! with a generated client per kind; and what a test reads from that
//! database beside the server.

use std::net::SocketAddr;

use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{MergeUserMetadataRequest, UserMetadata};
use metadata_service::server::{self, RunningServer, ServerConfig};
use sea_orm::Database;
use serde_json::Value as Json;
use tonic::transport::Channel;

use crate::common::json::structure;
use crate::common::{self, Backend, PgDatabase, TestDb};

pub type Users = UserMetadataServiceClient<Channel>;
pub type Orgs = OrganizationMetadataServiceClient<Channel>;

/// A running server with clients connected to it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub users: Users,
    pub orgs: Orgs,
    pub config: ServerConfig,
    server: Option<RunningServer>,
    // Declared last: the database outlives the server using it.
    pub db: TestDb,
}

pub async fn start(backend: Backend) -> Option<TestServer> {
    start_with(backend, |_| {}).await
}

pub async fn start_with(
    backend: Backend,
    customize: impl FnOnce(&mut ServerConfig),
) -> Option<TestServer> {
    let db = TestDb::create(backend).await?;
    let mut config = common::config(db.url());
    customize(&mut config);
    Some(TestServer::start(config, db).await)
}

impl TestServer {
    pub async fn start(config: ServerConfig, db: TestDb) -> TestServer {
        let server = server::start(&config).await.expect("server starts");
        let addr = server.local_addr();
        let channel = connect(addr).await;
        TestServer {
            addr,
            users: UserMetadataServiceClient::new(channel.clone()),
            orgs: OrganizationMetadataServiceClient::new(channel),
            config,
            server: Some(server),
            db,
        }
    }

    /// The running server, for its metrics and stream counts.
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("the server is running")
    }

    /// The running server's metrics, as /metrics would render them.
    pub fn metrics(&self) -> &std::sync::Arc<metadata_service::metrics::Metrics> {
        self.server().metrics()
    }

    /// Where /metrics is served, when the config asked for it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref()?.metrics_addr()
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// A second server process-equivalent on the same database.
    pub async fn another_server(&self) -> RunningServer {
        self.another_server_with(|_| {}).await
    }

    /// A second server on the same database, its configuration changed.
    pub async fn another_server_with(
        &self,
        customize: impl FnOnce(&mut ServerConfig),
    ) -> RunningServer {
        let mut config = self.config.clone();
        customize(&mut config);
        server::start(&config).await.expect("second server starts")
    }

    /// The value of one series of the server's metrics, as /metrics shows
    /// it (`name` or `name{label="value"}`).
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics().render(), series)
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }

    /// Stops the server and starts a new one on the same database and
    /// configuration (a new port); the clients are reconnected.
    pub async fn restart(&mut self) {
        self.stop().await;
        let server = server::start(&self.config).await.expect("server restarts");
        self.addr = server.local_addr();
        let channel = connect(self.addr).await;
        self.users = UserMetadataServiceClient::new(channel.clone());
        self.orgs = OrganizationMetadataServiceClient::new(channel);
        self.server = Some(server);
    }
}

/// The value of `series` in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .expect("a number")
}

/// A user Merge of `public` into the public metadata of `id`.
pub fn merge(id: &str, public: Json) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id: id.into(),
        public_metadata: Some(structure(&public)),
        ..Default::default()
    }
}

/// [`merge`], which must succeed; the record it returns.
pub async fn write(users: &mut Users, id: &str, public: Json) -> UserMetadata {
    users
        .merge(merge(id, public))
        .await
        .expect("merge")
        .into_inner()
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to test server")
}

/// What in-process tests read from their database.
impl TestDb {
    /// The Postgres database; panics on SQLite (for Postgres-only tests).
    pub fn postgres(&self) -> &PgDatabase {
        match self {
            TestDb::Postgres(pg) => pg,
            TestDb::Sqlite { .. } => panic!("not a Postgres test database"),
        }
    }

    /// Waits until the pruner has removed every event: the retention the
    /// test configured has passed.
    pub async fn until_pruned(&self) {
        crate::common::wait::until(
            "every event is pruned",
            std::time::Duration::from_secs(20),
            async || match self.event_revisions().await {
                left if left.is_empty() => Ok(()),
                left => Err(left),
            },
        )
        .await
    }

    /// A connection of the test's own, beside the server's.
    pub async fn connect(&self) -> sea_orm::DatabaseConnection {
        Database::connect(self.url())
            .await
            .expect("connect to the test database")
    }
}

impl PgDatabase {
    /// A connection to the server's maintenance database, to act on this
    /// one from outside (terminate its sessions, refuse connections).
    pub async fn admin(&self) -> sea_orm::DatabaseConnection {
        Database::connect(&self.admin_url)
            .await
            .expect("connect to TEST_DATABASE_URL")
    }

    /// How many sessions on this database wait for a lock another one
    /// holds: a write that queues behind a test's transaction shows here.
    pub async fn lock_waits(&self) -> i64 {
        use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
        let admin = self.admin().await;
        let waits = admin
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = $1 AND wait_event_type = 'Lock'",
                [self.name.clone().into()],
            ))
            .await
            .expect("read pg_stat_activity")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("a count");
        admin.close().await.ok();
        waits
    }
}

/// The calls of `method` to the user service in progress on a server (its
/// metrics): a call that arrived and has not been answered.
pub fn users_in_flight(metrics: &metadata_service::metrics::Metrics, method: &str) -> i64 {
    metrics
        .in_flight
        .with_label_values(&["metadata.v1.UserMetadataService", method])
        .get()
}

/// What the server logs, captured in memory.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn lines(&self) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }
}

/// Captures, until the guard is dropped, what this thread logs at `level`
/// and above. Only this thread: a test using it runs on a current-thread
/// runtime, so that the server's tasks run (and log) here too.
pub fn capture_logs(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .with_ansi(false)
        .with_max_level(level)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    // Tests run in parallel threads of one process, and tracing caches per
    // call site whether anyone listens: a site first reached by another
    // test while this subscriber was being registered can stay cached as
    // silent. Recompute with this subscriber in place.
    tracing::callsite::rebuild_interest_cache();
    (captured, guard)
}
