//! What both test binaries share: a fresh database per test (a SQLite file
//! or a Postgres database of its own), the configuration of a server on
//! 127.0.0.1:0 for it, JSON <-> protobuf, certificates made in the test, and
//! waiting for a state rather than for a time.
//! Each binary starts servers its own way (`in_process/harness.rs`,
//! `real_binary/served.rs`).

pub mod json;
pub mod nats;
pub mod tls;
pub mod wait;

use metadata_service::json::Limits;
use metadata_service::server::ServerConfig;
use metadata_service::store::StoreOptions;
use sea_orm::{ConnectionTrait, Database};

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test and is removed afterwards.
pub enum TestDb {
    Sqlite {
        /// Removed with the database file when the test ends.
        _dir: tempfile::TempDir,
        url: String,
    },
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
                Some(TestDb::Sqlite { _dir: dir, url })
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
}

pub struct PgDatabase {
    /// TEST_DATABASE_URL: the server's maintenance database.
    pub admin_url: String,
    pub name: String,
    /// This database.
    pub url: String,
}

impl PgDatabase {
    pub async fn create(admin_url: String) -> PgDatabase {
        let name = format!("mdtest_{}", uuid::Uuid::new_v4().simple());
        let (admin, admin_url) = connect_admin(admin_url).await;
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

/// A connection to create test databases from: TEST_DATABASE_URL's
/// database or, when that one does not exist (a fresh server has no
/// `test`), the same server's `postgres` database; and the URL used. A
/// server that cannot be reached is one line saying so.
async fn connect_admin(url: String) -> (sea_orm::DatabaseConnection, String) {
    let shown = metadata_service::store::redact_url(&url);
    match Database::connect(&url).await {
        Ok(admin) => (admin, url),
        Err(err) if err.to_string().contains("does not exist") => {
            let fallback = with_database(&url, "postgres");
            match Database::connect(&fallback).await {
                Ok(admin) => (admin, fallback),
                Err(err) => panic!(
                    "TEST_DATABASE_URL ({shown}) names a database that does not exist, and the \
                     server's `postgres` database cannot be used instead: {err}"
                ),
            }
        }
        Err(err) => panic!(
            "cannot connect to TEST_DATABASE_URL ({shown}): {err}; start PostgreSQL, or \
             point TEST_DATABASE_URL at a running server"
        ),
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

/// What tests read from the event table beside the server.
impl TestDb {
    /// Every revision in the event table that is a change (not a void: a
    /// revision taken and never committed), in order.
    pub async fn event_revisions(&self) -> Vec<u64> {
        use sea_orm::Statement;
        let db = Database::connect(self.url())
            .await
            .expect("connect to the test database");
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

pub fn config(database_url: &str) -> ServerConfig {
    ServerConfig {
        request_id_ttl: std::time::Duration::from_secs(24 * 3600),
        cors_allowed_origins: Vec::new(),
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
        relay: None,
        webhooks: Default::default(),
    }
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
