//! Test harness: starts the real server on 127.0.0.1:0 against a fresh
//! SQLite file or a fresh Postgres database, and hands out generated clients.
#![allow(dead_code)]

pub mod grpcurl;
pub mod json;
pub mod tls;

use std::net::SocketAddr;

use metadata_service::json::Limits;
use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::server::{self, RunningServer, ServerConfig};
use metadata_service::store::StoreOptions;
use sea_orm::{ConnectionTrait, Database};
use tonic::transport::Channel;

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test and is removed afterwards.
pub enum TestDb {
    Sqlite { dir: tempfile::TempDir, url: String },
    Postgres(PgDatabase),
}

impl TestDb {
    /// A fresh database, or None (with a note on stderr) for Postgres when
    /// TEST_DATABASE_URL is not set. CI sets METADATA_REQUIRE_POSTGRES so
    /// that a missing variable fails instead of skipping.
    pub async fn create(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("metadata.db").display()
                );
                Some(TestDb::Sqlite { dir, url })
            }
            Backend::Postgres => match std::env::var("TEST_DATABASE_URL") {
                Ok(admin_url) => Some(TestDb::Postgres(PgDatabase::create(admin_url).await)),
                Err(_) => {
                    assert!(
                        std::env::var_os("METADATA_REQUIRE_POSTGRES").is_none(),
                        "METADATA_REQUIRE_POSTGRES is set but TEST_DATABASE_URL is not"
                    );
                    eprintln!("skipped: TEST_DATABASE_URL is not set, Postgres test not run");
                    None
                }
            },
        }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } => url,
            TestDb::Postgres(pg) => &pg.url,
        }
    }

    /// The Postgres database; panics on SQLite (for Postgres-only tests).
    pub fn postgres(&self) -> &PgDatabase {
        match self {
            TestDb::Postgres(pg) => pg,
            TestDb::Sqlite { .. } => panic!("not a Postgres test database"),
        }
    }

    /// A connection of the test's own, beside the server's.
    pub async fn connect(&self) -> sea_orm::DatabaseConnection {
        Database::connect(self.url())
            .await
            .expect("connect to the test database")
    }

    /// Every revision in the event table that is a change (not a void: a
    /// revision taken and never committed), in order.
    pub async fn event_revisions(&self) -> Vec<u64> {
        use sea_orm::Statement;
        let db = self.connect().await;
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT revision FROM events WHERE change_type <> 'void' ORDER BY revision",
            ))
            .await
            .expect("read the event table");
        db.close().await.ok();
        rows.iter()
            .map(|r| r.try_get::<i64>("", "revision").unwrap() as u64)
            .collect()
    }
}

pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the server's maintenance database, to act on this
    /// one from outside (terminate its sessions, refuse connections).
    pub async fn admin(&self) -> sea_orm::DatabaseConnection {
        Database::connect(&self.admin_url)
            .await
            .expect("connect to TEST_DATABASE_URL")
    }

    async fn create(admin_url: String) -> PgDatabase {
        let name = format!("mdtest_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&admin_url)
            .await
            .expect("connect to TEST_DATABASE_URL");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        PgDatabase {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any runtime guarantee (even while unwinding), so
        // use a private runtime on a plain thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(admin) = Database::connect(&admin_url).await {
                    let _ = admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Replaces the database name in a postgres:// URL, keeping its query.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

pub fn config(database_url: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: database_url.to_owned(),
        store: StoreOptions::default(),
        limits: Limits::default(),
        max_request_bytes: 1024 * 1024,
        events: Default::default(),
        shutdown_grace: std::time::Duration::from_secs(10),
        max_concurrent_requests: 512,
        max_watch_streams: 10_000,
        max_streams_per_connection: 1000,
        db_timeout: std::time::Duration::from_secs(5),
        db_health_interval: std::time::Duration::from_secs(1),
        auth: Default::default(),
        allow_unauthenticated: false,
        reflection: true,
        tls: None,
        metrics_listen: None,
    }
}

/// A running server with clients connected to it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub users: UserMetadataServiceClient<Channel>,
    pub orgs: OrganizationMetadataServiceClient<Channel>,
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
    let mut config = config(db.url());
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        server::start(&self.config)
            .await
            .expect("second server starts")
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

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to test server")
}

/// Declares each listed `async fn name(backend: Backend)` as two tests,
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            super::with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://h/test?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
    }
}
