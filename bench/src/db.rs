//! The benchmark's own database: a fresh SQLite file or a fresh Postgres
//! database, seeded with N ids, and the raw-SQL baseline's connection pool.

use std::time::Duration;

use anyhow::Context;
use std::str::FromStr;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, Executor, PgConnection, PgPool, SqlitePool};

/// The baseline's direct connection to the same database.
#[derive(Clone)]
pub enum RawPool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl RawPool {
    pub async fn close(&self) {
        match self {
            RawPool::Sqlite(pool) => pool.close().await,
            RawPool::Postgres(pool) => pool.close().await,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

pub enum BenchDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

/// The bench's ids: `bench_0` .. `bench_{n-1}`.
pub fn id(n: u64) -> String {
    format!("bench_{n}")
}

/// Digits of the query workloads' ids: enough for `users`, zero-padded, so
/// that id order is numeric order and the gold users are spread evenly
/// over it.
fn id_width(users: u64) -> usize {
    users.saturating_sub(1).max(1).to_string().len()
}

/// The query workloads' id of user `g` of `users` (see
/// [`BenchDb::seed_users`]).
pub fn user_id(g: u64, users: u64) -> String {
    format!("user_{g:0width$}", width = id_width(users))
}

/// Whether seeded user `g` has plan "gold".
pub fn gold(g: u64) -> bool {
    g.is_multiple_of(100)
}

pub const SEED_PUBLIC: &str = r#"{"k1":0,"k2":0,"k3":0,"plan":"free"}"#;

/// The id of the marks in a seeded history (see [`BenchDb::seed_history`]).
pub const MARK_ID: &str = "bench_replay_mark";

impl BenchDb {
    pub async fn create(backend: Backend, admin_url: &str) -> anyhow::Result<BenchDb> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bench.db").display()
                );
                Ok(BenchDb::Sqlite { _dir: dir, url })
            }
            Backend::Postgres => {
                let name = format!("bench_{:016x}", rand::random::<u64>());
                let mut admin = PgConnection::connect(admin_url)
                    .await
                    .context("cannot connect to --postgres-url")?;
                let create = format!("CREATE DATABASE {name}");
                admin.execute(sqlx::AssertSqlSafe(create)).await?;
                admin.close().await?;
                let mut url = with_database(admin_url, &name);
                // Both sides use the same transport: the server's driver
                // would otherwise negotiate TLS on loopback, the baseline's not.
                if !url.contains("sslmode=") {
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str("sslmode=disable");
                }
                Ok(BenchDb::Postgres {
                    admin_url: admin_url.to_owned(),
                    name,
                    url,
                })
            }
        }
    }

    pub fn url(&self) -> &str {
        match self {
            BenchDb::Sqlite { url, .. } | BenchDb::Postgres { url, .. } => url,
        }
    }

    /// Replaces every row with `ids` users holding [`SEED_PUBLIC`]; the
    /// tables must exist (the server created them).
    pub async fn seed(&self, ids: u64) -> anyhow::Result<()> {
        let pool = self.pool(1).await?;
        match &pool {
            RawPool::Postgres(pool) => {
                sqlx::query("TRUNCATE metadata, events")
                    .execute(pool)
                    .await?;
                sqlx::query(
                    "INSERT INTO metadata SELECT 'user', 'bench_' || g, $1::jsonb, '{}', '{}', 1, 0, now(), now() \
                     FROM generate_series(0, $2 - 1) g",
                )
                .bind(SEED_PUBLIC)
                .bind(ids as i64)
                .execute(pool)
                .await?;
                sqlx::query("VACUUM ANALYZE metadata").execute(pool).await?;
            }
            RawPool::Sqlite(pool) => {
                sqlx::query("DELETE FROM metadata").execute(pool).await?;
                sqlx::query("DELETE FROM events").execute(pool).await?;
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
                sqlx::query(
                    "INSERT INTO metadata WITH RECURSIVE s(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM s WHERE g + 1 < ?2) \
                     SELECT 'user', 'bench_' || g, ?1, '{}', '{}', 1, 0, ?3, ?3 FROM s",
                )
                .bind(SEED_PUBLIC)
                .bind(ids as i64)
                .bind(now)
                .execute(pool)
                .await?;
            }
        }
        pool.close().await;
        Ok(())
    }

    /// Replaces every row with `users` users for the query workloads
    /// (query.rs), written as the service writes a record (version 1,
    /// private and unsafe metadata `{}`), ids [`user_id`]`(g, users)`:
    /// public_metadata `{"plan", "region", "score", "beta", "tags"}`, where
    /// `plan` is "gold" for every 100th user (1%, [`gold`]), else "pro"
    /// for every 4th, else "free". Then ANALYZE, so the planner knows the
    /// table's size. The tables (and Postgres's indexes) must exist.
    pub async fn seed_users(&self, users: u64) -> anyhow::Result<()> {
        let pool = self.pool(1).await?;
        let width = id_width(users) as i64;
        match &pool {
            RawPool::Postgres(pool) => {
                sqlx::query("TRUNCATE metadata, events")
                    .execute(pool)
                    .await?;
                sqlx::query(
                    "INSERT INTO metadata (kind, id, public_metadata, private_metadata, unsafe_metadata, \
                       version, revision, created_at, updated_at) \
                     SELECT 'user', 'user_' || lpad(g::text, $2::int, '0'), \
                       jsonb_build_object( \
                         'plan', CASE WHEN g % 100 = 0 THEN 'gold' WHEN g % 4 = 0 THEN 'pro' ELSE 'free' END, \
                         'region', (ARRAY['eu', 'us', 'apac'])[g % 3 + 1], \
                         'score', g % 1000, \
                         'beta', g % 7 = 0, \
                         'tags', CASE WHEN g % 5 = 0 THEN '[\"early\"]'::jsonb ELSE '[]'::jsonb END), \
                       '{}', '{}', 1, 0, now(), now() \
                     FROM generate_series(0, $1 - 1) g",
                )
                .bind(users as i64)
                .bind(width)
                .execute(pool)
                .await?;
                sqlx::query("VACUUM ANALYZE metadata").execute(pool).await?;
            }
            RawPool::Sqlite(pool) => {
                sqlx::query("DELETE FROM metadata").execute(pool).await?;
                sqlx::query("DELETE FROM events").execute(pool).await?;
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
                sqlx::query(
                    "INSERT INTO metadata WITH RECURSIVE s(g) AS (SELECT 0 UNION ALL SELECT g + 1 FROM s WHERE g + 1 < ?1) \
                     SELECT 'user', 'user_' || substr('0000000000000000000' || g, -?2), \
                       json_object( \
                         'plan', CASE WHEN g % 100 = 0 THEN 'gold' WHEN g % 4 = 0 THEN 'pro' ELSE 'free' END, \
                         'region', CASE g % 3 WHEN 0 THEN 'eu' WHEN 1 THEN 'us' ELSE 'apac' END, \
                         'score', g % 1000, \
                         'beta', json(CASE WHEN g % 7 = 0 THEN 'true' ELSE 'false' END), \
                         'tags', json(CASE WHEN g % 5 = 0 THEN '[\"early\"]' ELSE '[]' END)), \
                       '{}', '{}', 1, 0, ?3, ?3 FROM s",
                )
                .bind(users as i64)
                .bind(width)
                .bind(now)
                .execute(pool)
                .await?;
                sqlx::query("ANALYZE").execute(pool).await?;
            }
        }
        pool.close().await;
        Ok(())
    }

    /// Appends an event history of revisions `1..=events` to the (empty)
    /// log, as the service writes events: merges of the bench's 3-key
    /// patches into ids `bench_0..bench_{ids-1}`, with before/after
    /// snapshots, committed now (so retention keeps them). Every
    /// `mark_every`-th revision, and the last, is an event of [`MARK_ID`]
    /// instead, so that a stream watching only that id learns how far its
    /// replay has gone. The revision counter (SQLite) and sequence
    /// (Postgres) are moved to `events`, so new writes come after the
    /// history. Run it after [`BenchDb::seed`], with no server running.
    pub async fn seed_history(&self, events: u64, ids: u64, mark_every: u64) -> anyhow::Result<()> {
        let pool = self.pool(1).await?;
        let now = chrono::Utc::now();
        let stamp = now.to_rfc3339();
        let (events, ids, mark_every) =
            (events as i64, ids.max(1) as i64, mark_every.max(1) as i64);
        match &pool {
            RawPool::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
                     SELECT g, 'user', \
                       CASE WHEN g % $3 = 0 OR g = $1 THEN $4 ELSE 'bench_' || (g % $2) END, \
                       'merged', '[\"public_metadata\"]'::jsonb, \
                       jsonb_build_object('public_metadata', jsonb_build_object('k1', g - 1, 'k2', g - 1, 'k3', g - 1, 'plan', 'free'), \
                         'private_metadata', '{}'::jsonb, 'unsafe_metadata', '{}'::jsonb, \
                         'version', g / $2 + 1, 'revision', GREATEST(g - $2, 0), 'created_at', $5::text, 'updated_at', $5::text), \
                       jsonb_build_object('public_metadata', jsonb_build_object('k1', g, 'k2', g, 'k3', g, 'plan', 'free'), \
                         'private_metadata', '{}'::jsonb, 'unsafe_metadata', '{}'::jsonb, \
                         'version', g / $2 + 2, 'revision', g, 'created_at', $5::text, 'updated_at', $5::text), \
                       $6 \
                     FROM generate_series(1::bigint, $1::bigint) g",
                )
                .bind(events)
                .bind(ids)
                .bind(mark_every)
                .bind(MARK_ID)
                .bind(&stamp)
                .bind(now)
                .execute(pool)
                .await?;
                sqlx::query("SELECT setval('event_revisions', $1)")
                    .bind(events)
                    .execute(pool)
                    .await?;
                sqlx::query("UPDATE revisions SET latest = $1 WHERE id = 1")
                    .bind(events)
                    .execute(pool)
                    .await?;
                sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
            }
            RawPool::Sqlite(pool) => {
                sqlx::query(
                    "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < ?1) \
                     INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
                     SELECT g, 'user', \
                       CASE WHEN g % ?3 = 0 OR g = ?1 THEN ?4 ELSE 'bench_' || (g % ?2) END, \
                       'merged', '[\"public_metadata\"]', \
                       json_object('public_metadata', json_object('k1', g - 1, 'k2', g - 1, 'k3', g - 1, 'plan', 'free'), \
                         'private_metadata', json('{}'), 'unsafe_metadata', json('{}'), \
                         'version', g / ?2 + 1, 'revision', max(g - ?2, 0), 'created_at', ?5, 'updated_at', ?5), \
                       json_object('public_metadata', json_object('k1', g, 'k2', g, 'k3', g, 'plan', 'free'), \
                         'private_metadata', json('{}'), 'unsafe_metadata', json('{}'), \
                         'version', g / ?2 + 2, 'revision', g, 'created_at', ?5, 'updated_at', ?5), \
                       ?6 \
                     FROM s",
                )
                .bind(events)
                .bind(ids)
                .bind(mark_every)
                .bind(MARK_ID)
                .bind(&stamp)
                .bind(now)
                .execute(pool)
                .await?;
                sqlx::query("UPDATE revisions SET latest = ?1 WHERE id = 1")
                    .bind(events)
                    .execute(pool)
                    .await?;
            }
        }
        pool.close().await;
        Ok(())
    }

    /// A pool for the raw-SQL baseline, with the server's settings (WAL and
    /// a 5 s busy timeout on SQLite).
    pub async fn pool(&self, size: u32) -> anyhow::Result<RawPool> {
        match self {
            BenchDb::Sqlite { url, .. } => {
                let options = SqliteConnectOptions::from_str(url)?
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(size)
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(options)
                    .await?;
                Ok(RawPool::Sqlite(pool))
            }
            BenchDb::Postgres { url, .. } => {
                let pool = PgPoolOptions::new()
                    .max_connections(size)
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await?;
                Ok(RawPool::Postgres(pool))
            }
        }
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        if let BenchDb::Postgres {
            admin_url, name, ..
        } = self
        {
            let mut admin = PgConnection::connect(&admin_url).await?;
            let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            admin.execute(sqlx::AssertSqlSafe(drop)).await?;
            admin.close().await?;
        }
        Ok(())
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}
