//! History (issue 29): whether reading the past costs about what reading
//! the present does. The bar is a Get at a recent revision, and a
//! page of 50 of one record's history, each within 2x of a plain Get's p50
//! at one client; those reads go through the event log rather than the
//! record's row, so what keeps them cheap is the `events_record` index
//! (kind, id, revision), and the plans are printed beside the numbers so a
//! scan would show.
//!
//! The arms share one server, one connection and one client, and are
//! alternated in rounds (each round in a rotated order): on a shared
//! two-core machine, drift over a minute can be as large as the margin
//! being judged, and alternating puts it on every arm alike. The history is
//! written through the service (Merges, not SQL), so that its events, and
//! the records' versions at each revision, are what the service makes;
//! `hist_0`'s writes alternate with writes to other users, so that a
//! revision drawn from the last 1,000 of the log falls sometimes on its
//! events and sometimes between them, and has anything from none to
//! hundreds of its events after it. Every answer is checked (revision,
//! version, page contents), so that a fast wrong answer cannot pass.
//! Beside the service, the same statements in raw SQL on the bench's own
//! connection, so that a miss can be put on the database or on the
//! service.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{
    GetUserMetadataRequest, ListUserMetadataHistoryRequest, MergeUserMetadataRequest,
};
use prost::Message;
use rand::Rng;
use sea_orm::{DatabaseBackend, Statement, Value as SqlValue};
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use tonic::transport::Channel;

use crate::db::{Backend, BenchDb, RawPool};
use crate::load::{self, Measured};
use crate::process::{ServerProcess, channel};
use crate::query::{Plan, explain_prepared};
use crate::{check, ms};

/// The record with a long history.
pub const HIST_ID: &str = "hist_0";
/// A record written once: a Get of a record with no history to speak of.
pub const PLAIN_ID: &str = "plain_0";
/// Users whose writes are interleaved with `hist_0`'s.
pub const OTHER_USERS: u64 = 50;
/// Revisions, counted back from the newest, that a Get at a revision
/// draws from (the "within the last 1,000 revisions").
pub const WINDOW: u64 = 1000;
/// Events per history page (the page of 50).
pub const PAGE_SIZE: u64 = 50;
/// The bar: each arm's p50 within this factor of a plain Get's.
pub const TARGET_RATIO: f64 = 2.0;

pub struct Settings<'a> {
    pub backend: Backend,
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    /// Merges of `hist_0` (each followed by one to another user).
    pub writes: u64,
    /// Rounds; each runs every arm for `duration / rounds`.
    pub rounds: usize,
    /// Unmeasured, per arm, once before the first round.
    pub warmup: Duration,
    /// Measured time of each arm, over all rounds.
    pub duration: Duration,
    pub progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    /// Get of `hist_0`, no revision: the baseline of the ratios.
    Get,
    /// Get of `plain_0`, no revision.
    GetPlain,
    /// Get of `hist_0` at a revision drawn uniformly from the last
    /// [`WINDOW`] of the log.
    GetAt,
    /// ListHistory of `hist_0`, newest first, the first page.
    FirstPage,
    /// ListHistory of `hist_0`, newest first, the page from the middle of
    /// its history (a token got by paging there).
    DeepPage,
    /// The statements of a Get at a revision in raw SQL (sqlx), one after
    /// another, every JSON column decoded: the database's share of it.
    RawGetAt,
    /// The first page's statement in raw SQL, every row's before/after
    /// decoded: the database's share of a page.
    RawFirstPage,
}

const ARMS: [Arm; 7] = [
    Arm::Get,
    Arm::GetPlain,
    Arm::GetAt,
    Arm::FirstPage,
    Arm::DeepPage,
    Arm::RawGetAt,
    Arm::RawFirstPage,
];

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Get => "get",
            Arm::GetPlain => "get (record written once)",
            Arm::GetAt => "get at a revision",
            Arm::FirstPage => "history, first page",
            Arm::DeepPage => "history, deep page",
            Arm::RawGetAt => "get at a revision, raw SQL",
            Arm::RawFirstPage => "first page, raw SQL",
        }
    }

    /// Whether the 2x bar applies to this arm.
    fn targeted(self) -> bool {
        matches!(self, Arm::GetAt | Arm::FirstPage | Arm::DeepPage)
    }
}

#[derive(Debug, Serialize)]
pub struct ArmRow {
    pub backend: &'static str,
    pub arm: &'static str,
    pub ops: u64,
    pub ops_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Each round's p50, in round order (drift shows here).
    pub round_p50_ms: Vec<f64>,
    /// p50 / the plain Get of `hist_0`'s p50.
    pub p50_ratio: f64,
    /// p50_ratio <= [`TARGET_RATIO`]; None for the Gets without a revision.
    pub target_met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct HistoryReport {
    pub backend: &'static str,
    /// Merges of `hist_0`, and of the other users (interleaved).
    pub writes: u64,
    pub other_writes: u64,
    pub other_users: u64,
    pub seed_seconds: f64,
    /// The newest revision after seeding, and the window Get at a revision
    /// draws from (inclusive).
    pub newest_revision: u64,
    pub window: (u64, u64),
    /// `hist_0`'s events within the window.
    pub hist_events_in_window: u64,
    pub page_size: u64,
    /// The deep page starts after this many of `hist_0`'s newest events.
    pub deep_page_after_events: u64,
    /// Encoded sizes of the answers: a Get of `hist_0`, and a first page.
    pub get_bytes: usize,
    pub page_bytes: usize,
    pub rounds: usize,
    pub arm_seconds_per_round: f64,
    pub arms: Vec<ArmRow>,
    /// The store's two history queries: EXPLAIN (ANALYZE, BUFFERS) on
    /// Postgres, EXPLAIN QUERY PLAN on SQLite.
    pub plans: Vec<Plan>,
}

/// What the arms ask and check against, known from the seeding.
struct Known {
    /// Revisions of `hist_0`'s writes, ascending: its version at revision
    /// R is how many are <= R.
    hist_revisions: Vec<u64>,
    window: (u64, u64),
    plain_revision: u64,
    deep_token: String,
    /// Revision of the deep page's first event, and how many of
    /// `hist_0`'s newest events come before it.
    deep_first: u64,
    deep_after: u64,
    /// The bench's own connection, and the store's statements.
    pool: RawPool,
    sql: Sql,
}

/// `hist_0`'s version right after revision `at`.
fn version_at(hist_revisions: &[u64], at: u64) -> u64 {
    hist_revisions.partition_point(|&r| r <= at) as u64
}

/// The last `width` revisions up to `newest`, inclusive (from 1 when the
/// log is shorter).
fn window(newest: u64, width: u64) -> (u64, u64) {
    (newest.saturating_sub(width.max(1) - 1).max(1), newest)
}

/// Pages to skip for the deep page: to the middle of `events`, at least
/// one page in when there are two or more pages.
fn deep_pages(events: u64, page_size: u64) -> u64 {
    let pages = events.div_ceil(page_size);
    match pages {
        0 | 1 => 0,
        _ => (events / 2 / page_size).max(1),
    }
}

fn status(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn merge_request(user_id: &str, n: u64) -> MergeUserMetadataRequest {
    let patch = json!({"n": n, "note": format!("write {n}")});
    let Some(prost_types::value::Kind::StructValue(fields)) =
        metadata_service::convert::proto_from_json(&patch).kind
    else {
        unreachable!("a JSON object")
    };
    MergeUserMetadataRequest {
        user_id: user_id.to_string(),
        public_metadata: Some(fields),
        ..Default::default()
    }
}

fn history_request(page_token: String) -> ListUserMetadataHistoryRequest {
    ListUserMetadataHistoryRequest {
        user_id: HIST_ID.to_string(),
        page_size: PAGE_SIZE as i32,
        page_token,
        oldest_first: false,
    }
}

/// Empties the tables, so that the log holds only this workload's history
/// whatever ran before it on the database. On Postgres the revision
/// sequence starts again too: left where earlier workloads took it, every
/// revision below the first new one would be a gap the dispatcher must
/// settle one by one (thousands, for seconds) before a read at a revision
/// may answer. (A server never meets that: pruning moves the compaction
/// mark, which the dispatcher starts from.)
pub(crate) async fn clear(pool: &RawPool) -> anyhow::Result<()> {
    match pool {
        RawPool::Postgres(pool) => {
            for statement in [
                "TRUNCATE metadata, events, metadata_schemas",
                "ALTER SEQUENCE event_revisions RESTART",
                "UPDATE revisions SET latest = 0, compacted = 0 WHERE id = 1",
            ] {
                sqlx::query(statement).execute(pool).await?;
            }
        }
        RawPool::Sqlite(pool) => {
            for table in ["metadata", "events", "metadata_schemas"] {
                sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
                    .execute(pool)
                    .await?;
            }
        }
    }
    Ok(())
}

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<HistoryReport> {
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let pool = db.pool(1).await?;
    clear(&pool).await?;
    let server = ServerProcess::start(
        settings.binary,
        db.url(),
        settings.server_args,
        settings.server_env,
    )
    .await?;
    let result = measure(&pool, &server, settings).await;
    pool.close().await;
    server.stop().await?;
    result
}

async fn measure(
    pool: &RawPool,
    server: &ServerProcess,
    settings: &Settings<'_>,
) -> anyhow::Result<HistoryReport> {
    let backend = settings.backend;
    if settings.writes == 0 {
        bail!("--history-writes must be at least 1");
    }
    let connection = channel(server.addr).await?;
    let mut users = UserMetadataServiceClient::new(connection.clone());

    let started = Instant::now();
    let mut hist_revisions = Vec::with_capacity(settings.writes as usize);
    for n in 0..settings.writes {
        let written = users
            .merge(merge_request(HIST_ID, n))
            .await
            .context("seeding hist_0")?
            .into_inner();
        hist_revisions.push(written.revision);
        let other = format!("other_{}", n % OTHER_USERS);
        users
            .merge(merge_request(&other, n))
            .await
            .context("seeding the other users")?;
    }
    let plain = users
        .merge(merge_request(PLAIN_ID, 0))
        .await
        .context("seeding plain_0")?
        .into_inner();
    let seed_seconds = started.elapsed().as_secs_f64();
    if !hist_revisions.is_sorted() || hist_revisions.len() as u64 != settings.writes {
        bail!("hist_0's Merges did not answer ascending revisions");
    }
    let newest = plain.revision;
    // What autovacuum would have done by now on Postgres: the planner
    // sees the table's real size. (The server runs no ANALYZE on SQLite,
    // so neither does the bench.)
    if let RawPool::Postgres(pg) = pool {
        sqlx::query("ANALYZE events, metadata").execute(pg).await?;
    }
    let window = window(newest, WINDOW);
    let hist_events_in_window = hist_revisions
        .iter()
        .filter(|&&r| r >= window.0 && r <= window.1)
        .count() as u64;
    if settings.progress {
        eprintln!(
            "  {}: hist_0 written {} times among {} revisions ({} users) in {:.1} s; {} of its events in the window {}..={}",
            backend.name(),
            settings.writes,
            newest,
            OTHER_USERS + 2,
            seed_seconds,
            hist_events_in_window,
            window.0,
            window.1
        );
    }

    // The deep page's token, by paging as a client would.
    let skip = deep_pages(settings.writes, PAGE_SIZE);
    let mut deep_token = String::new();
    for page in 0..skip {
        let answer = users
            .list_history(history_request(deep_token.clone()))
            .await
            .map_err(status)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("ListHistory, page {}", page + 1))?
            .into_inner();
        deep_token = answer.next_page_token;
        if deep_token.is_empty() {
            bail!("ListHistory ended after {} pages", page + 1);
        }
    }
    let deep_after = skip * PAGE_SIZE;
    let get_bytes = users
        .get(GetUserMetadataRequest {
            user_id: HIST_ID.to_string(),
            revision: None,
        })
        .await?
        .into_inner()
        .encoded_len();
    let page_bytes = users
        .list_history(history_request(String::new()))
        .await?
        .into_inner()
        .encoded_len();
    let deep_first = hist_revisions[hist_revisions.len() - 1 - deep_after as usize];
    let known = Arc::new(Known {
        hist_revisions,
        window,
        plain_revision: plain.revision,
        deep_token,
        deep_first,
        deep_after,
        pool: pool.clone(),
        sql: Sql(backend_of(pool)),
    });

    // Warm-up, then rounds of every arm, each round in a rotated order.
    for arm in ARMS {
        let warm = run_arm(arm, &connection, &known, settings.warmup, 0).await;
        check(&warm, arm.name())?;
    }
    let rounds = settings.rounds.max(1);
    let slice = settings.duration / rounds as u32;
    let mut measured: Vec<Vec<Measured>> = ARMS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..ARMS.len() {
            let index = (k + round) % ARMS.len();
            let arm = ARMS[index];
            let seed = (round * ARMS.len() + index + 1) as u64;
            let m = run_arm(arm, &connection, &known, slice, seed).await;
            check(&m, arm.name())?;
            if settings.progress {
                eprintln!(
                    "  {} history round {} {}: {:.0} ops/s, p50 {:.3} ms",
                    backend.name(),
                    round + 1,
                    arm.name(),
                    m.throughput(),
                    ms(m.latency.value_at_quantile(0.5))
                );
            }
            measured[index].push(m);
        }
    }
    let mut arms: Vec<ArmRow> = ARMS
        .iter()
        .zip(&measured)
        .map(|(&arm, runs)| arm_row(backend, arm, runs))
        .collect();
    let base = arms[0].p50_ms;
    for (row, arm) in arms.iter_mut().zip(ARMS) {
        row.p50_ratio = row.p50_ms / base;
        row.target_met = arm.targeted().then_some(row.p50_ratio <= TARGET_RATIO);
    }

    let plans = plans(pool, &known).await?;
    Ok(HistoryReport {
        backend: backend.name(),
        writes: settings.writes,
        other_writes: settings.writes,
        other_users: OTHER_USERS,
        seed_seconds,
        newest_revision: newest,
        window,
        hist_events_in_window,
        page_size: PAGE_SIZE,
        deep_page_after_events: deep_after,
        get_bytes,
        page_bytes,
        rounds,
        arm_seconds_per_round: slice.as_secs_f64(),
        arms,
        plans,
    })
}

/// One arm's runs merged: the latencies of every round in one histogram.
fn arm_row(backend: Backend, arm: Arm, runs: &[Measured]) -> ArmRow {
    let mut latency = load::latency_histogram();
    let (mut ops, mut seconds) = (0u64, 0.0);
    for run in runs {
        latency.add(&run.latency).expect("same bounds");
        ops += run.ops;
        seconds += run.elapsed.as_secs_f64();
    }
    ArmRow {
        backend: backend.name(),
        arm: arm.name(),
        ops,
        ops_per_second: ops as f64 / seconds,
        p50_ms: ms(latency.value_at_quantile(0.5)),
        p99_ms: ms(latency.value_at_quantile(0.99)),
        max_ms: ms(latency.max()),
        round_p50_ms: runs
            .iter()
            .map(|r| ms(r.latency.value_at_quantile(0.5)))
            .collect(),
        p50_ratio: f64::NAN,
        target_met: None,
    }
}

/// One client, closed loop, on the shared connection; every answer
/// checked against what the seeding wrote.
async fn run_arm(
    arm: Arm,
    connection: &Channel,
    known: &Arc<Known>,
    duration: Duration,
    seed: u64,
) -> Measured {
    let connection = connection.clone();
    let known = known.clone();
    load::closed_loop_seeded(1, duration, seed, move |_, rng| {
        let mut users = UserMetadataServiceClient::new(connection.clone());
        let known = known.clone();
        let at = rng.random_range(known.window.0..=known.window.1);
        async move {
            match arm {
                Arm::Get | Arm::GetPlain => {
                    let (id, version, revision) = match arm {
                        Arm::Get => (
                            HIST_ID,
                            known.hist_revisions.len() as u64,
                            *known.hist_revisions.last().unwrap_or(&0),
                        ),
                        _ => (PLAIN_ID, 1, known.plain_revision),
                    };
                    let got = users
                        .get(GetUserMetadataRequest {
                            user_id: id.to_string(),
                            revision: None,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if (got.version, got.revision) != (version, revision) {
                        return Err(format!(
                            "Get {id}: version {} revision {}, expected {version} and {revision}",
                            got.version, got.revision
                        ));
                    }
                }
                Arm::GetAt => {
                    let got = users
                        .get(GetUserMetadataRequest {
                            user_id: HIST_ID.to_string(),
                            revision: Some(at),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    let version = version_at(&known.hist_revisions, at);
                    if (got.version, got.revision) != (version, at) {
                        return Err(format!(
                            "Get at {at}: version {} revision {}, expected {version} and {at}",
                            got.version, got.revision
                        ));
                    }
                }
                Arm::RawGetAt => {
                    raw_get_at(&known.pool, &known.sql, at)
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                }
                Arm::RawFirstPage => {
                    let rows = raw_events(&known.pool, &known.sql.history(None))
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    let expected = (known.hist_revisions.len() as u64).min(PAGE_SIZE) + 1;
                    let expected = expected.min(known.hist_revisions.len() as u64);
                    if rows as u64 != expected {
                        return Err(format!("raw page: {rows} rows, expected {expected}"));
                    }
                }
                Arm::FirstPage | Arm::DeepPage => {
                    let (token, first, skipped) = match arm {
                        Arm::FirstPage => (
                            String::new(),
                            *known.hist_revisions.last().unwrap_or(&0),
                            0,
                        ),
                        _ => (known.deep_token.clone(), known.deep_first, known.deep_after),
                    };
                    let page = users
                        .list_history(history_request(token))
                        .await
                        .map_err(status)?
                        .into_inner();
                    let expected = (known.hist_revisions.len() as u64 - skipped).min(PAGE_SIZE);
                    let head = page.events.first().map(|e| e.revision);
                    if page.events.len() as u64 != expected || head != Some(first) {
                        return Err(format!(
                            "ListHistory: {} events from {head:?}, expected {expected} from {first}",
                            page.events.len()
                        ));
                    }
                }
            }
            Ok(())
        }
    })
    .await
}

/// The bench cannot reach the store's query builders, so the statements a
/// Get at a revision and a history page run are repeated here, as the
/// store builds them for `backend`.
struct Sql(DatabaseBackend);

impl Sql {
    fn p(&self, n: usize) -> String {
        match self.0 {
            DatabaseBackend::Postgres => format!("${n}"),
            _ => "?".to_string(),
        }
    }

    /// `Sql::json_array_elements` of the store: the ids bound as one JSON
    /// array, in a column `id`.
    fn elements(&self, n: usize) -> String {
        match self.0 {
            DatabaseBackend::Postgres => {
                format!("SELECT jsonb_array_elements_text({}) AS id", self.p(n))
            }
            _ => format!("SELECT value AS id FROM json_each({})", self.p(n)),
        }
    }

    /// `Store::history`, newest first, a page of [`PAGE_SIZE`] (it asks for
    /// one more), from before `cursor` when given. sea-orm names every
    /// column where this says `*`, which does not change the plan.
    fn history(&self, cursor: Option<u64>) -> Statement {
        let mut values = vec![kind(), SqlValue::String(Some(HIST_ID.to_string()))];
        let mut sql = format!(
            "SELECT * FROM events WHERE kind = {} AND id = {}",
            self.p(1),
            self.p(2)
        );
        if let Some(cursor) = cursor {
            values.push(SqlValue::BigInt(Some(cursor as i64)));
            sql.push_str(&format!(" AND revision < {}", self.p(values.len())));
        }
        values.push(SqlValue::BigInt(Some(PAGE_SIZE as i64 + 1)));
        sql.push_str(&format!(
            " ORDER BY revision DESC LIMIT {}",
            self.p(values.len())
        ));
        Statement::from_sql_and_values(self.0, sql, values)
    }

    /// `Store::get_many_at`'s first read of `hist_0`: its row now, with
    /// the compaction mark.
    fn get_many(&self) -> Statement {
        Statement::from_sql_and_values(
            self.0,
            format!(
                "SELECT r.compacted AS compacted, m.* FROM revisions r LEFT JOIN metadata m \
                 ON m.kind = {} AND m.id IN ({}) WHERE r.id = 1",
                self.p(1),
                self.elements(2)
            ),
            [kind(), ids()],
        )
    }

    /// `Store::states_at` of `hist_0` at `at`: its first event after `at`
    /// (`Store::states_at_statement` with ids: one `events_record` lookup
    /// per id, a lateral LIMIT 1 on Postgres and a correlated MIN on
    /// SQLite, with the compaction mark in the same statement).
    fn states_at(&self, at: u64) -> Statement {
        let sql = match self.0 {
            DatabaseBackend::Postgres => format!(
                "SELECT e.*, (SELECT compacted FROM revisions WHERE id = 1) AS compacted \
                 FROM ({}) AS i CROSS JOIN LATERAL (SELECT * FROM events x \
                 WHERE x.kind = {} AND x.id = i.id AND x.revision > {} \
                 ORDER BY x.revision LIMIT 1) e",
                self.elements(3),
                self.p(1),
                self.p(2)
            ),
            _ => format!(
                "SELECT *, (SELECT compacted FROM revisions WHERE id = 1) AS compacted \
                 FROM events WHERE revision IN (SELECT (SELECT MIN(x.revision) \
                 FROM events x WHERE x.kind = {} AND x.id = i.id AND x.revision > {}) \
                 FROM ({}) AS i)",
                self.p(1),
                self.p(2),
                self.elements(3)
            ),
        };
        Statement::from_sql_and_values(
            self.0,
            sql,
            [kind(), SqlValue::BigInt(Some(at as i64)), ids()],
        )
    }
}

fn kind() -> SqlValue {
    SqlValue::String(Some("user".to_string()))
}

fn ids() -> SqlValue {
    SqlValue::Json(Some(Box::new(json!([HIST_ID]))))
}

/// The statements whose plans are reported: both history pages (a deep
/// page's cursor is the revision it starts below) and `states_at` at the
/// middle of the window.
fn explained(backend: DatabaseBackend, known: &Known) -> Vec<(String, Statement)> {
    let sql = Sql(backend);
    let mid = (known.window.0 + known.window.1) / 2;
    vec![
        (
            "history, first page (Store::history)".to_string(),
            sql.history(None),
        ),
        (
            "history, deep page (Store::history)".to_string(),
            sql.history(Some(known.deep_first + 1)),
        ),
        (
            format!("get at revision {mid} (Store::states_at)"),
            sql.states_at(mid),
        ),
    ]
}

/// How the database plans the store's history queries, on the seeded log.
async fn plans(pool: &RawPool, known: &Known) -> anyhow::Result<Vec<Plan>> {
    let mut plans = Vec::new();
    match pool {
        RawPool::Postgres(pg) => {
            let mut conn = pg.acquire().await?;
            for (n, (label, statement)) in explained(DatabaseBackend::Postgres, known)
                .into_iter()
                .enumerate()
            {
                let key = format!("history_{n}");
                plans.extend(explain_prepared(&mut conn, &key, &label, &statement).await?);
            }
        }
        RawPool::Sqlite(lite) => {
            for (label, statement) in explained(DatabaseBackend::Sqlite, known) {
                let explain = format!("EXPLAIN QUERY PLAN {}", statement.sql);
                let rows = bind_sqlite(&explain, &statement)?.fetch_all(lite).await?;
                let steps = rows
                    .iter()
                    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(3)?)))
                    .collect::<Result<Vec<(i64, i64, String)>, sqlx::Error>>()?;
                plans.push(Plan {
                    label: format!("{label}, EXPLAIN QUERY PLAN: {}", statement.sql),
                    text: query_plan_tree(&steps),
                });
            }
        }
    }
    Ok(plans)
}

fn backend_of(pool: &RawPool) -> DatabaseBackend {
    match pool {
        RawPool::Postgres(_) => DatabaseBackend::Postgres,
        RawPool::Sqlite(_) => DatabaseBackend::Sqlite,
    }
}

fn values(statement: &Statement) -> impl Iterator<Item = &SqlValue> {
    statement.values.iter().flat_map(|v| v.0.iter())
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `sql` with `statement`'s values bound, as the server's driver binds them.
fn bind_sqlite<'q>(sql: &'q str, statement: &'q Statement) -> anyhow::Result<SqliteQuery<'q>> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for value in values(statement) {
        query = match value {
            SqlValue::String(Some(s)) => query.bind(s.as_str()),
            SqlValue::BigInt(Some(n)) => query.bind(*n),
            SqlValue::Json(Some(j)) => query.bind(j.to_string()),
            other => bail!("no binding for {other:?}"),
        };
    }
    Ok(query)
}

fn bind_postgres<'q>(sql: &'q str, statement: &'q Statement) -> anyhow::Result<PgQuery<'q>> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for value in values(statement) {
        query = match value {
            SqlValue::String(Some(s)) => query.bind(s.as_str()),
            SqlValue::BigInt(Some(n)) => query.bind(*n),
            SqlValue::Json(Some(j)) => query.bind(sqlx::types::Json(j.as_ref().clone())),
            other => bail!("no binding for {other:?}"),
        };
    }
    Ok(query)
}

/// Runs `statement` over `events` and decodes every row's snapshots, as
/// the store does before the service converts them; returns the rows.
async fn raw_events(pool: &RawPool, statement: &Statement) -> anyhow::Result<usize> {
    match pool {
        RawPool::Postgres(pg) => {
            let rows = bind_postgres(&statement.sql, statement)?
                .fetch_all(pg)
                .await?;
            for row in &rows {
                for column in ["before", "after"] {
                    row.try_get::<sqlx::types::Json<serde_json::Value>, _>(column)?;
                }
            }
            Ok(rows.len())
        }
        RawPool::Sqlite(lite) => {
            let rows = bind_sqlite(&statement.sql, statement)?
                .fetch_all(lite)
                .await?;
            for row in &rows {
                for column in ["before", "after"] {
                    serde_json::from_str::<serde_json::Value>(row.try_get::<&str, _>(column)?)?;
                }
            }
            Ok(rows.len())
        }
    }
}

/// What a Get at a settled `at` asks the database, as the store asks it:
/// the row with the compaction mark, and, when the row has moved past
/// `at`, its first event after `at`; every JSON column decoded.
async fn raw_get_at(pool: &RawPool, sql: &Sql, at: u64) -> anyhow::Result<()> {
    let revision: i64 = match pool {
        RawPool::Postgres(pg) => {
            let get = sql.get_many();
            let row = bind_postgres(&get.sql, &get)?.fetch_one(pg).await?;
            for column in ["public_metadata", "private_metadata", "unsafe_metadata"] {
                row.try_get::<sqlx::types::Json<serde_json::Value>, _>(column)?;
            }
            row.try_get("revision")?
        }
        RawPool::Sqlite(lite) => {
            let get = sql.get_many();
            let row = bind_sqlite(&get.sql, &get)?.fetch_one(lite).await?;
            for column in ["public_metadata", "private_metadata", "unsafe_metadata"] {
                serde_json::from_str::<serde_json::Value>(row.try_get::<&str, _>(column)?)?;
            }
            row.try_get("revision")?
        }
    };
    if revision as u64 > at {
        let rows = raw_events(pool, &sql.states_at(at)).await?;
        if rows != 1 {
            bail!("states_at({at}): {rows} rows");
        }
    }
    Ok(())
}

/// SQLite's EXPLAIN QUERY PLAN rows (id, parent, detail) as the sqlite3
/// shell draws them: each step indented under its parent.
fn query_plan_tree(steps: &[(i64, i64, String)]) -> String {
    let mut depth: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    let mut lines = Vec::with_capacity(steps.len());
    for (id, parent, detail) in steps {
        let level = depth.get(parent).map_or(0, |d| d + 1);
        depth.insert(*id, level);
        lines.push(format!("{}`--{detail}", "   ".repeat(level)));
    }
    lines.join("\n")
}

pub fn print(report: &HistoryReport) {
    println!(
        "\nhistory (issue 29), {}: {} written {} times, interleaved with {} writes to {} other users; \
         {} revisions, Get at a revision drawn from {}..={} ({} of {}'s events there); \
         one client, {} rounds of {:.1} s per arm, alternating",
        report.backend,
        HIST_ID,
        report.writes,
        report.other_writes,
        report.other_users,
        report.newest_revision,
        report.window.0,
        report.window.1,
        report.hist_events_in_window,
        HIST_ID,
        report.rounds,
        report.arm_seconds_per_round
    );
    println!(
        "{:<9} {:<26} {:>8} {:>7} {:>7} {:>7} {:>9} {:<14}  round p50s",
        "backend", "arm", "ops/s", "p50ms", "p99ms", "maxms", "p50/get", "target (<=2x)"
    );
    for r in &report.arms {
        let rounds: Vec<String> = r.round_p50_ms.iter().map(|p| format!("{p:.3}")).collect();
        println!(
            "{:<9} {:<26} {:>8.0} {:>7.3} {:>7.3} {:>7.2} {:>9.2} {:<14}  {}",
            r.backend,
            r.arm,
            r.ops_per_second,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.p50_ratio,
            match r.target_met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            },
            rounds.join(" ")
        );
    }
    println!(
        "(deep page: the page after {}'s newest {} events, of {}; answers: a Get {} bytes, a page {} bytes)",
        HIST_ID, report.deep_page_after_events, report.writes, report.get_bytes, report.page_bytes
    );
    for plan in &report.plans {
        println!("\n{}\n{}", plan.label, plan.text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_at_a_revision_counts_the_writes_up_to_it() {
        let revisions = [3, 5, 7];
        assert_eq!(version_at(&revisions, 2), 0);
        assert_eq!(version_at(&revisions, 3), 1);
        assert_eq!(version_at(&revisions, 6), 2);
        assert_eq!(version_at(&revisions, 7), 3);
        assert_eq!(version_at(&revisions, 100), 3);
    }

    #[test]
    fn the_window_is_the_last_revisions_inclusive() {
        assert_eq!(window(4001, 1000), (3002, 4001));
        assert_eq!(window(601, 1000), (1, 601));
        assert_eq!(window(1000, 1000), (1, 1000));
    }

    #[test]
    fn the_deep_page_is_mid_history() {
        assert_eq!(deep_pages(2000, 50), 20);
        assert_eq!(deep_pages(300, 50), 3);
        assert_eq!(deep_pages(60, 50), 1);
        assert_eq!(deep_pages(50, 50), 0);
    }

    #[test]
    fn query_plan_steps_indent_under_their_parent() {
        let steps = [
            (3, 0, "SCAN e".to_string()),
            (5, 0, "SEARCH f".to_string()),
            (7, 5, "USING INDEX events_record".to_string()),
        ];
        assert_eq!(
            query_plan_tree(&steps),
            "`--SCAN e\n`--SEARCH f\n   `--USING INDEX events_record"
        );
    }
}
