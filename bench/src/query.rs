//! Queries (issue 17): List with a filter and BatchGet, through the service
//! and, side by side, in raw SQL doing the same database work.
//!
//! - The table holds N users seeded straight into it
//!   ([`BenchDb::seed_users`](crate::db::BenchDb::seed_users)); 1% have
//!   `public_metadata.plan = "gold"`.
//! - **list**: the first page (`--list-page-size`, 50) of [`FILTER`],
//!   closed loop at each client count. The raw baseline runs the very
//!   statement the service runs: its text and values come from
//!   `Store::list_statement` (on Postgres, containment `public_metadata @>
//!   $json`, which the GIN `jsonb_path_ops` index answers), LIMIT page size
//!   + 1 as the service asks, every column decoded.
//! - **paging**: one client pages through every match, at each of
//!   `--page-sizes`, through the service (page tokens) and in raw SQL (the
//!   statement with `id > last`); the mean latency of the first and of the
//!   last tenth of the pages shows whether a late page costs more than an
//!   early one (it would with OFFSET). Every match must come exactly once,
//!   in id order.
//! - **batchget**: BatchGet of `--batch-size` (100) distinct random ids
//!   against single Gets, at the same clients, both through the service;
//!   records per second, and each next to its raw-SQL floor (a point select;
//!   one `id IN (...)` select).
//! - Postgres: EXPLAIN (ANALYZE, BUFFERS) of the first-page and a late-page
//!   statement, as custom and as generic plans, and which of the two a
//!   prepared statement (as sqlx keeps them) settles on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metadata_service::model::{Field, Kind};
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{
    BatchGetUserMetadataRequest, GetUserMetadataRequest, ListUserMetadataRequest,
};
use metadata_service::query::Filter;
use metadata_service::store::{Store, StoreOptions};
use rand::Rng;
use sea_orm::{Statement, Value as SqlValue};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use tonic::transport::Channel;

use crate::db::{Backend, BenchDb, RawPool, gold, user_id};
use crate::load::{Measured, closed_loop};
use crate::process::{ServerProcess, channel};
use crate::{cpu_cores, ms};

/// The filter of the list workload: 1% of the seeded users match.
pub const FILTER: &str = r#"public_metadata.plan = "gold""#;

pub struct Settings {
    pub backend: Backend,
    pub users: u64,
    pub clients: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub list: bool,
    pub batchget: bool,
    /// Page size of the first-page runs.
    pub page_size: u64,
    /// Page sizes to page through every match at.
    pub page_sizes: Vec<u64>,
    /// Measured passes through every match, per page size and target.
    pub passes: usize,
    /// Ids per BatchGet.
    pub batch: usize,
    pub progress: bool,
}

/// A closed-loop run of list, get or batchget.
#[derive(Debug, Serialize)]
pub struct QueryRow {
    pub backend: &'static str,
    pub users: u64,
    pub clients: usize,
    /// "list" (first page), "get" or "batchget".
    pub workload: &'static str,
    /// "service" or "raw-sql".
    pub target: &'static str,
    /// Records each call returns: the page size, 1, or the batch size.
    pub per_call: u64,
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub calls_per_second: f64,
    pub records_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Service rows: throughput / the raw-SQL row's of the same workload.
    pub ratio: Option<f64>,
    /// Service batchget: records/s / service get's records/s, same clients.
    pub records_vs_get: Option<f64>,
    pub server_cpu_cores: Option<f64>,
}

/// Paging through every match at one page size.
#[derive(Debug, Serialize)]
pub struct PagingRow {
    pub backend: &'static str,
    pub users: u64,
    pub target: &'static str,
    pub page_size: u64,
    pub passes: usize,
    /// Pages in one pass (the last may be short).
    pub pages: usize,
    /// Records in one pass: every match.
    pub records: u64,
    /// Mean time of one whole pass.
    pub pass_ms: f64,
    /// Mean page latency over all pages of all passes.
    pub page_mean_ms: f64,
    /// Mean latency of the first tenth of the pages (at least one page).
    pub first_tenth_ms: f64,
    /// Mean latency of the last tenth of the pages (at least one page).
    pub last_tenth_ms: f64,
    /// last_tenth_ms / first_tenth_ms: about 1 when a page's cost does not
    /// depend on how deep it is (keyset paging); it grows with depth under
    /// OFFSET.
    pub late_vs_early: f64,
}

/// An EXPLAIN of the listing statement (Postgres).
#[derive(Debug, Serialize)]
pub struct Plan {
    pub label: String,
    pub text: String,
}

#[derive(Debug, Default, Serialize)]
pub struct QueryReport {
    pub users: u64,
    /// Users matching [`FILTER`].
    pub matches: u64,
    pub filter: &'static str,
    pub rows: Vec<QueryRow>,
    pub paging: Vec<PagingRow>,
    pub plans: Vec<Plan>,
}

fn matches(users: u64) -> u64 {
    (0..users).filter(|&g| gold(g)).count() as u64
}

/// The listing statements, built by the server's own code.
struct Statements {
    store: Store,
    filter: Filter,
}

impl Statements {
    async fn new(url: &str) -> anyhow::Result<Self> {
        let options = StoreOptions {
            max_connections: 1,
            ..StoreOptions::default()
        };
        let store = Store::connect(url, &options).await?;
        let filter = metadata_service::query::parse(FILTER, &Field::ALL)
            .map_err(|e| anyhow::anyhow!("{FILTER}: {e}"))?
            .context("empty filter")?;
        Ok(Statements { store, filter })
    }

    /// Exactly what the service's List runs for a page of `page_size`
    /// after `after` (it asks for one more row, to know whether a next
    /// page exists).
    fn page(&self, after: Option<&str>, page_size: u64) -> Arc<Statement> {
        Arc::new(
            self.store
                .list_statement(Kind::User, Some(&self.filter), after, page_size + 1),
        )
    }
}

fn values(statement: &Statement) -> &[SqlValue] {
    statement.values.as_ref().map_or(&[], |v| v.0.as_slice())
}

fn status(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

type RawResult<T> = Result<T, String>;

fn sql_error(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// Runs `statement` (the server's text and values) and decodes every
/// column of every row, as the service decodes a record; returns the ids.
async fn raw_rows(pool: &RawPool, statement: &Statement) -> RawResult<Vec<String>> {
    let sql = sqlx::AssertSqlSafe(statement.sql.as_str());
    match pool {
        RawPool::Postgres(pool) => {
            let mut query = sqlx::query(sql);
            for value in values(statement) {
                query = match value {
                    SqlValue::String(s) => query.bind(s.clone()),
                    SqlValue::BigInt(n) => query.bind(*n),
                    SqlValue::Int(n) => query.bind(*n),
                    SqlValue::Bool(b) => query.bind(*b),
                    SqlValue::Double(d) => query.bind(*d),
                    SqlValue::Json(j) => query.bind(j.as_deref().cloned()),
                    other => return Err(format!("cannot bind {other:?}")),
                };
            }
            let rows = query.fetch_all(pool).await.map_err(sql_error)?;
            rows.iter().map(decode_postgres).collect()
        }
        RawPool::Sqlite(pool) => {
            let mut query = sqlx::query(sql);
            for value in values(statement) {
                query = match value {
                    SqlValue::String(s) => query.bind(s.clone()),
                    SqlValue::BigInt(n) => query.bind(*n),
                    SqlValue::Int(n) => query.bind(*n),
                    SqlValue::Bool(b) => query.bind(*b),
                    SqlValue::Double(d) => query.bind(*d),
                    SqlValue::Json(j) => query.bind(j.as_deref().map(Value::to_string)),
                    other => return Err(format!("cannot bind {other:?}")),
                };
            }
            let rows = query.fetch_all(pool).await.map_err(sql_error)?;
            rows.iter().map(decode_sqlite).collect()
        }
    }
}

fn decode_postgres(row: &sqlx::postgres::PgRow) -> RawResult<String> {
    let id: String = row.try_get("id").map_err(sql_error)?;
    for column in ["public_metadata", "private_metadata", "unsafe_metadata"] {
        row.try_get::<sqlx::types::Json<Value>, _>(column)
            .map_err(sql_error)?;
    }
    row.try_get::<i64, _>("version").map_err(sql_error)?;
    row.try_get::<i64, _>("revision").map_err(sql_error)?;
    for column in ["created_at", "updated_at"] {
        row.try_get::<chrono::DateTime<chrono::Utc>, _>(column)
            .map_err(sql_error)?;
    }
    Ok(id)
}

fn decode_sqlite(row: &sqlx::sqlite::SqliteRow) -> RawResult<String> {
    let id: String = row.try_get("id").map_err(sql_error)?;
    for column in ["public_metadata", "private_metadata", "unsafe_metadata"] {
        serde_json::from_str::<Value>(row.try_get::<&str, _>(column).map_err(sql_error)?)
            .map_err(sql_error)?;
    }
    row.try_get::<i64, _>("version").map_err(sql_error)?;
    row.try_get::<i64, _>("revision").map_err(sql_error)?;
    for column in ["created_at", "updated_at"] {
        row.try_get::<&str, _>(column).map_err(sql_error)?;
    }
    Ok(id)
}

/// The raw point or batch select of `ids` (distinct), every column decoded.
async fn raw_get(pool: &RawPool, ids: &[String]) -> RawResult<usize> {
    let placeholders: Vec<String> = match pool {
        RawPool::Postgres(_) => (0..ids.len()).map(|n| format!("${}", n + 2)).collect(),
        RawPool::Sqlite(_) => vec!["?".to_string(); ids.len()],
    };
    let (kind, list) = match pool {
        RawPool::Postgres(_) => ("$1", placeholders.join(", ")),
        RawPool::Sqlite(_) => ("?", placeholders.join(", ")),
    };
    let text = if ids.len() == 1 {
        format!("SELECT * FROM metadata WHERE kind = {kind} AND id = {list}")
    } else {
        format!("SELECT * FROM metadata WHERE kind = {kind} AND id IN ({list})")
    };
    let values: Vec<SqlValue> = std::iter::once("user".to_string())
        .chain(ids.iter().cloned())
        .map(|s| SqlValue::String(Some(s)))
        .collect();
    let backend = match pool {
        RawPool::Postgres(_) => sea_orm::DatabaseBackend::Postgres,
        RawPool::Sqlite(_) => sea_orm::DatabaseBackend::Sqlite,
    };
    let statement = Statement::from_sql_and_values(backend, text, values);
    let found = raw_rows(pool, &statement).await?.len();
    if found != ids.len() {
        return Err(format!("{found} rows for {} ids", ids.len()));
    }
    Ok(found)
}

/// `count` distinct random users.
fn random_ids(rng: &mut impl Rng, users: u64, count: usize) -> Vec<String> {
    rand::seq::index::sample(rng, users as usize, count.min(users as usize))
        .into_iter()
        .map(|g| user_id(g as u64, users))
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    /// The first page of the filter.
    List,
    Get,
    BatchGet,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::List => "list",
            Call::Get => "get",
            Call::BatchGet => "batchget",
        }
    }
}

struct Load {
    users: u64,
    page_size: u64,
    batch: usize,
    /// Records a first page holds.
    first_page: usize,
}

async fn service_loop(
    channels: Arc<Vec<Channel>>,
    call: Call,
    clients: usize,
    load: Arc<Load>,
    duration: Duration,
) -> Measured {
    closed_loop(clients, duration, move |client, rng| {
        let mut users = UserMetadataServiceClient::new(channels[client % channels.len()].clone());
        let load = load.clone();
        let ids = match call {
            Call::List => Vec::new(),
            Call::Get => random_ids(rng, load.users, 1),
            Call::BatchGet => random_ids(rng, load.users, load.batch),
        };
        async move {
            match call {
                Call::List => {
                    let request = ListUserMetadataRequest {
                        filter: FILTER.to_string(),
                        page_size: load.page_size as i32,
                        page_token: String::new(),
                    };
                    let page = users.list(request).await.map_err(status)?.into_inner();
                    if page.users.len() != load.first_page {
                        return Err(format!(
                            "{} users on the first page, {} expected",
                            page.users.len(),
                            load.first_page
                        ));
                    }
                }
                Call::Get => {
                    let user_id = ids.into_iter().next().unwrap_or_default();
                    let record = users
                        .get(GetUserMetadataRequest {
                            user_id,
                            revision: None,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if record.version == 0 {
                        return Err("a seeded user read as never written".into());
                    }
                }
                Call::BatchGet => {
                    let asked = ids.len();
                    let got = users
                        .batch_get(BatchGetUserMetadataRequest {
                            user_ids: ids,
                            revision: None,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if got.users.len() != asked || got.users.iter().any(|u| u.version == 0) {
                        return Err(format!(
                            "{} of {asked} users, or one empty",
                            got.users.len()
                        ));
                    }
                }
            }
            Ok(())
        }
    })
    .await
}

async fn raw_loop(
    pool: RawPool,
    call: Call,
    clients: usize,
    load: Arc<Load>,
    first_page: Arc<Statement>,
    duration: Duration,
) -> Measured {
    closed_loop(clients, duration, move |_, rng| {
        let pool = pool.clone();
        let load = load.clone();
        let first_page = first_page.clone();
        let ids = match call {
            Call::List => Vec::new(),
            Call::Get => random_ids(rng, load.users, 1),
            Call::BatchGet => random_ids(rng, load.users, load.batch),
        };
        async move {
            match call {
                Call::List => {
                    let found = raw_rows(&pool, &first_page).await?.len();
                    // The service reads one row more than it returns.
                    if found.min(load.page_size as usize) != load.first_page {
                        return Err(format!("{found} rows for the first page"));
                    }
                }
                Call::Get | Call::BatchGet => {
                    raw_get(&pool, &ids).await?;
                }
            }
            Ok(())
        }
    })
    .await
}

fn row(
    settings: &Settings,
    clients: usize,
    call: Call,
    target: &'static str,
    per_call: u64,
    m: &Measured,
) -> QueryRow {
    let q = |q: f64| ms(m.latency.value_at_quantile(q));
    QueryRow {
        backend: settings.backend.name(),
        users: settings.users,
        clients,
        workload: call.name(),
        target,
        per_call,
        calls: m.ops,
        errors: m.errors,
        first_error: m.first_error.clone(),
        calls_per_second: m.throughput(),
        records_per_second: m.throughput() * per_call as f64,
        p50_ms: q(0.5),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        max_ms: ms(m.latency.max()),
        ratio: None,
        records_vs_get: None,
        server_cpu_cores: None,
    }
}

fn check(m: &Measured, what: &str) -> anyhow::Result<()> {
    if m.ops == 0 || m.errors > 0 {
        bail!(
            "{what}: {} calls, {} errors (first: {})",
            m.ops,
            m.errors,
            m.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// Runs `call` through the service and in raw SQL at `clients`; returns
/// the two rows (service first, its ratio filled in).
#[allow(clippy::too_many_arguments)]
async fn side_by_side(
    settings: &Settings,
    server: &ServerProcess,
    channels: &Arc<Vec<Channel>>,
    pool: &RawPool,
    load: &Arc<Load>,
    first_page: &Arc<Statement>,
    call: Call,
    clients: usize,
) -> anyhow::Result<[QueryRow; 2]> {
    let per_call = match call {
        Call::List => load.first_page as u64,
        Call::Get => 1,
        Call::BatchGet => load.batch.min(load.users as usize) as u64,
    };
    let service = |duration| service_loop(channels.clone(), call, clients, load.clone(), duration);
    service(settings.warmup).await;
    let before = server.usage()?;
    let measured = service(settings.duration).await;
    let after = server.usage()?;
    check(&measured, &format!("service {}", call.name()))?;
    let raw = |duration| {
        raw_loop(
            pool.clone(),
            call,
            clients,
            load.clone(),
            first_page.clone(),
            duration,
        )
    };
    raw(settings.warmup).await;
    let floor = raw(settings.duration).await;
    check(&floor, &format!("raw SQL {}", call.name()))?;
    let mut service_row = row(settings, clients, call, "service", per_call, &measured);
    service_row.ratio = Some(measured.throughput() / floor.throughput());
    service_row.server_cpu_cores = Some(cpu_cores(before, after, measured.elapsed));
    let raw_row = row(settings, clients, call, "raw-sql", per_call, &floor);
    if settings.progress {
        eprintln!(
            "  {} users={} clients={} {}: {:.0} calls/s, {:.0} records/s, p50 {:.2} ms (x{:.2} of raw SQL)",
            service_row.backend,
            settings.users,
            clients,
            call.name(),
            service_row.calls_per_second,
            service_row.records_per_second,
            service_row.p50_ms,
            service_row.ratio.unwrap_or(f64::NAN)
        );
    }
    Ok([service_row, raw_row])
}

/// One pass through every match: each page's latency, checking that every
/// match comes once, in id order.
async fn service_pass(
    channel: &Channel,
    page_size: u64,
    expected: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut users = UserMetadataServiceClient::new(channel.clone());
    let mut latencies = Vec::new();
    let mut token = String::new();
    let mut last: Option<String> = None;
    let mut records = 0u64;
    loop {
        let started = Instant::now();
        let page = users
            .list(ListUserMetadataRequest {
                filter: FILTER.to_string(),
                page_size: page_size as i32,
                page_token: token,
            })
            .await
            .map_err(|s| anyhow::anyhow!(status(s)))?
            .into_inner();
        latencies.push(started.elapsed().as_micros() as u64);
        for user in &page.users {
            if last.as_ref().is_some_and(|last| *last >= user.user_id) {
                bail!("paging: {} after {:?}", user.user_id, last);
            }
            last = Some(user.user_id.clone());
        }
        records += page.users.len() as u64;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if records != expected {
        bail!("paging through the service: {records} records, {expected} match");
    }
    Ok(latencies)
}

async fn raw_pass(
    pool: &RawPool,
    statements: &Statements,
    page_size: u64,
    expected: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::new();
    let mut after: Option<String> = None;
    let mut records = 0u64;
    loop {
        let started = Instant::now();
        let statement = statements.page(after.as_deref(), page_size);
        let mut ids = raw_rows(pool, &statement)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let more = ids.len() as u64 > page_size;
        ids.truncate(page_size as usize);
        latencies.push(started.elapsed().as_micros() as u64);
        for id in &ids {
            if after.as_ref().is_some_and(|after| after >= id) {
                bail!("raw paging: {id} after {after:?}");
            }
            after = Some(id.clone());
        }
        records += ids.len() as u64;
        if !more {
            break;
        }
    }
    if records != expected {
        bail!("paging in raw SQL: {records} records, {expected} match");
    }
    Ok(latencies)
}

/// What paging with OFFSET instead of `id > last` would cost: the first
/// page's statement with `OFFSET k * page_size` appended, page after page.
/// A reference for the keyset rows, raw SQL only.
async fn raw_offset_pass(
    pool: &RawPool,
    statements: &Statements,
    page_size: u64,
    expected: u64,
) -> anyhow::Result<Vec<u64>> {
    let first = statements.page(None, page_size);
    let mut latencies = Vec::new();
    let mut records = 0u64;
    for page in 0.. {
        let started = Instant::now();
        let statement = Statement {
            sql: format!("{} OFFSET {}", first.sql, page * page_size),
            ..(*first).clone()
        };
        let found = raw_rows(pool, &statement)
            .await
            .map_err(|e| anyhow::anyhow!(e))?
            .len() as u64;
        latencies.push(started.elapsed().as_micros() as u64);
        records += found.min(page_size);
        if found <= page_size {
            break;
        }
    }
    if records != expected {
        bail!("paging with OFFSET: {records} records, {expected} match");
    }
    Ok(latencies)
}

fn paging_row(
    settings: &Settings,
    target: &'static str,
    page_size: u64,
    expected: u64,
    passes: &[Vec<u64>],
) -> PagingRow {
    let pages = passes.first().map_or(0, Vec::len);
    let tenth = (pages / 10).max(1);
    let mean = |selected: Vec<u64>| {
        selected.iter().sum::<u64>() as f64 / selected.len().max(1) as f64 / 1000.0
    };
    let all: Vec<u64> = passes.iter().flatten().copied().collect();
    let first: Vec<u64> = passes
        .iter()
        .flat_map(|p| p[..tenth.min(p.len())].iter().copied())
        .collect();
    let last: Vec<u64> = passes
        .iter()
        .flat_map(|p| p[p.len().saturating_sub(tenth)..].iter().copied())
        .collect();
    let pass_ms = passes.iter().map(|p| p.iter().sum::<u64>()).sum::<u64>() as f64
        / passes.len().max(1) as f64
        / 1000.0;
    let (first_tenth_ms, last_tenth_ms) = (mean(first), mean(last));
    PagingRow {
        backend: settings.backend.name(),
        users: settings.users,
        target,
        page_size,
        passes: passes.len(),
        pages,
        records: expected,
        pass_ms,
        page_mean_ms: mean(all),
        first_tenth_ms,
        last_tenth_ms,
        late_vs_early: last_tenth_ms / first_tenth_ms,
    }
}

/// Pages through every match at each page size, service then raw SQL,
/// one unmeasured pass first.
async fn paging(
    settings: &Settings,
    server: &ServerProcess,
    pool: &RawPool,
    statements: &Statements,
    expected: u64,
) -> anyhow::Result<Vec<PagingRow>> {
    let channel = channel(server.addr).await?;
    let mut rows = Vec::new();
    for &page_size in &settings.page_sizes {
        let mut passes = Vec::new();
        for pass in 0..=settings.passes {
            let latencies = service_pass(&channel, page_size, expected).await?;
            if pass > 0 {
                passes.push(latencies);
            }
        }
        let service = paging_row(settings, "service", page_size, expected, &passes);
        let mut passes = Vec::new();
        for pass in 0..=settings.passes {
            let latencies = raw_pass(pool, statements, page_size, expected).await?;
            if pass > 0 {
                passes.push(latencies);
            }
        }
        let raw = paging_row(settings, "raw-sql", page_size, expected, &passes);
        if settings.progress {
            eprintln!(
                "  {} paging {} matches by {page_size}: service {:.1} ms a pass (first/last tenth {:.2}/{:.2} ms a page), raw SQL {:.1} ms ({:.2}/{:.2})",
                service.backend,
                expected,
                service.pass_ms,
                service.first_tenth_ms,
                service.last_tenth_ms,
                raw.pass_ms,
                raw.first_tenth_ms,
                raw.last_tenth_ms
            );
        }
        rows.push(service);
        rows.push(raw);
    }
    // OFFSET, for reference: one pass at the smallest page size, where
    // its cost grows most with depth. (Postgres bounds a deep page's cost:
    // past some offset it plans a read of every match and a sort.)
    if let Some(&page_size) = settings.page_sizes.iter().min() {
        let latencies = raw_offset_pass(pool, statements, page_size, expected).await?;
        let offset = paging_row(
            settings,
            "raw-sql+offset",
            page_size,
            expected,
            &[latencies],
        );
        if settings.progress {
            eprintln!(
                "  {} paging {} matches by {page_size} with OFFSET (raw SQL): {:.1} ms a pass (first/last tenth {:.2}/{:.2} ms a page)",
                offset.backend,
                expected,
                offset.pass_ms,
                offset.first_tenth_ms,
                offset.last_tenth_ms
            );
        }
        rows.push(offset);
    }
    Ok(rows)
}

/// A value as a SQL literal, and its type, for PREPARE / EXECUTE.
fn literal(value: &SqlValue) -> anyhow::Result<(String, &'static str)> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    Ok(match value {
        SqlValue::String(Some(s)) => (quote(s), "text"),
        SqlValue::BigInt(Some(n)) => (n.to_string(), "int8"),
        SqlValue::Json(Some(j)) => (quote(&j.to_string()), "jsonb"),
        other => bail!("no literal for {other:?}"),
    })
}

/// Postgres: how the listing statement is planned, for a first page and a
/// late one (after the first 90% of the matches): see [`explain_prepared`].
async fn plans(
    pool: &RawPool,
    statements: &Statements,
    settings: &Settings,
) -> anyhow::Result<Vec<Plan>> {
    let RawPool::Postgres(pool) = pool else {
        return Ok(Vec::new());
    };
    let mut conn = pool.acquire().await?;
    let gold_ids: Vec<u64> = (0..settings.users).filter(|&g| gold(g)).collect();
    let late = gold_ids
        .get(gold_ids.len() * 9 / 10)
        .map(|&g| user_id(g, settings.users));
    let mut plans = Vec::new();
    let cases = [
        ("first page", None),
        ("late page (after 90% of the matches)", late),
    ];
    for (n, (label, after)) in cases.into_iter().enumerate() {
        let statement = statements.page(after.as_deref(), settings.page_size);
        plans.extend(explain_prepared(&mut conn, &n.to_string(), label, &statement).await?);
    }
    Ok(plans)
}

/// Postgres: EXPLAIN (ANALYZE, BUFFERS) of `statement` (the server's text
/// and values), prepared as the server's driver prepares it: as a custom
/// plan (the values known), as a generic plan (the one a prepared
/// statement may switch to after five runs), and the plan that ten runs
/// of a prepared statement settle on. `key` makes the prepared names
/// unique on the connection.
pub(crate) async fn explain_prepared(
    conn: &mut sqlx::PgConnection,
    key: &str,
    label: &str,
    statement: &Statement,
) -> anyhow::Result<Vec<Plan>> {
    let mut plans = Vec::new();
    let (args, types): (Vec<String>, Vec<&str>) = values(statement)
        .iter()
        .map(literal)
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let name = format!("bench_plan_{key}");
    let prepare = format!("PREPARE {name}({}) AS {}", types.join(", "), statement.sql);
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
        .execute(&mut *conn)
        .await?;
    let execute = format!("EXECUTE {name}({})", args.join(", "));
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let explain = format!("SET plan_cache_mode = {mode}; EXPLAIN (ANALYZE, BUFFERS) {execute}");
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(explain))
            .fetch_all(&mut *conn)
            .await?;
        let text: Vec<String> = rows
            .iter()
            .filter_map(|row| row.try_get::<String, _>(0).ok())
            .collect();
        plans.push(Plan {
            label: format!("{label}, {mode}: {}", statement.sql),
            text: text.join("\n"),
        });
    }
    // Which plan the default (auto) settles on, as for the server's and
    // the baseline's prepared statements: a fresh statement, run ten
    // times, then the plan it uses now.
    let auto = format!("bench_auto_{key}");
    let mut runs = format!(
        "RESET plan_cache_mode; PREPARE {auto}({}) AS {};",
        types.join(", "),
        statement.sql
    );
    let execute_auto = format!("EXECUTE {auto}({})", args.join(", "));
    for _ in 0..10 {
        runs.push_str(&format!(" {execute_auto};"));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(runs))
        .execute(&mut *conn)
        .await?;
    let counts = sqlx::query(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = $1",
    )
    .bind(&auto)
    .fetch_one(&mut *conn)
    .await?;
    let (generic, custom): (i64, i64) = (counts.try_get(0)?, counts.try_get(1)?);
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) {execute_auto}"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let text: Vec<String> = rows
        .iter()
        .filter_map(|row| row.try_get::<String, _>(0).ok())
        .collect();
    plans.push(Plan {
        label: format!(
            "{label}, plan_cache_mode = auto after 10 runs ({generic} generic, {custom} custom plans)"
        ),
        text: text.join("\n"),
    });
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DEALLOCATE {name}; DEALLOCATE {auto}"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(plans)
}

/// The query workloads against `server`, whose database `db` holds
/// `settings.users` seeded users.
pub async fn run(
    db: &BenchDb,
    server: &ServerProcess,
    settings: &Settings,
    pool_size: u32,
) -> anyhow::Result<QueryReport> {
    let expected = matches(settings.users);
    let mut report = QueryReport {
        users: settings.users,
        matches: expected,
        filter: FILTER,
        ..QueryReport::default()
    };
    let statements = Statements::new(db.url()).await?;
    let pool = db.pool(pool_size).await?;
    let load = Arc::new(Load {
        users: settings.users,
        page_size: settings.page_size,
        batch: settings.batch,
        first_page: expected.min(settings.page_size) as usize,
    });
    let first_page = statements.page(None, settings.page_size);
    let result = async {
        for &clients in &settings.clients {
            let mut channels = Vec::with_capacity(clients);
            for _ in 0..clients {
                channels.push(channel(server.addr).await?);
            }
            let channels = Arc::new(channels);
            let mut calls = Vec::new();
            if settings.list {
                calls.push(Call::List);
            }
            if settings.batchget {
                calls.extend([Call::Get, Call::BatchGet]);
            }
            for call in calls {
                let rows = side_by_side(
                    settings,
                    server,
                    &channels,
                    &pool,
                    &load,
                    &first_page,
                    call,
                    clients,
                )
                .await?;
                report.rows.extend(rows);
            }
            let get = report.rows.iter().find(|r| {
                r.clients == clients && r.workload == "get" && r.target == "service"
            });
            let get_rate = get.map(|r| r.records_per_second);
            if let Some(batch) = report.rows.iter_mut().find(|r| {
                r.clients == clients && r.workload == "batchget" && r.target == "service"
            }) {
                batch.records_vs_get = get_rate.map(|get| batch.records_per_second / get);
                if settings.progress {
                    eprintln!(
                        "  {} clients={clients}: BatchGet({}) {:.0} records/s = x{:.1} of single Gets",
                        batch.backend,
                        batch.per_call,
                        batch.records_per_second,
                        batch.records_vs_get.unwrap_or(f64::NAN)
                    );
                }
            }
        }
        if settings.list {
            report.paging = paging(settings, server, &pool, &statements, expected).await?;
            report.plans = plans(&pool, &statements, settings).await?;
        }
        anyhow::Ok(())
    }
    .await;
    pool.close().await;
    statements.store.close().await?;
    result?;
    Ok(report)
}

pub fn print(report: &QueryReport) {
    println!(
        "\nqueries: {} users, filter {} matching {}",
        report.users, report.filter, report.matches
    );
    println!(
        "{:<9} {:>7} {:<8} {:<8} {:>5} {:>9} {:>10} {:>7} {:>7} {:>7} {:>8} {:>6} {:>5}  note",
        "backend",
        "clients",
        "load",
        "target",
        "n",
        "calls/s",
        "records/s",
        "p50ms",
        "p95ms",
        "p99ms",
        "maxms",
        "ratio",
        "cpu"
    );
    for r in &report.rows {
        let note = r
            .records_vs_get
            .map(|x| format!("x{x:.1} the records/s of single Gets"))
            .unwrap_or_default();
        println!(
            "{:<9} {:>7} {:<8} {:<8} {:>5} {:>9.0} {:>10.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>6} {:>5}  {}",
            r.backend,
            r.clients,
            r.workload,
            r.target,
            r.per_call,
            r.calls_per_second,
            r.records_per_second,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.ratio
                .map_or(String::new(), |x| format!("{:.0}%", x * 100.0)),
            r.server_cpu_cores
                .map_or(String::new(), |x| format!("{x:.2}")),
            note
        );
    }
    if !report.paging.is_empty() {
        println!(
            "\npaging through all {} matches, one client (means over {} passes; raw-sql+offset: one pass with OFFSET instead of id > last)",
            report.matches, report.paging[0].passes
        );
        println!(
            "{:<9} {:<14} {:>9} {:>6} {:>9} {:>10} {:>12} {:>12} {:>10}",
            "backend",
            "target",
            "page size",
            "pages",
            "pass ms",
            "page ms",
            "first 10% ms",
            "last 10% ms",
            "last/first"
        );
        for p in &report.paging {
            println!(
                "{:<9} {:<14} {:>9} {:>6} {:>9.1} {:>10.2} {:>12.2} {:>12.2} {:>10.2}",
                p.backend,
                p.target,
                p.page_size,
                p.pages,
                p.pass_ms,
                p.page_mean_ms,
                p.first_tenth_ms,
                p.last_tenth_ms,
                p.late_vs_early
            );
        }
    }
    for plan in &report.plans {
        println!("\n{}\n{}", plan.label, plan.text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_in_a_hundred_is_gold() {
        assert_eq!(matches(1_000_000), 10_000);
        assert_eq!(matches(5_000), 50);
        assert_eq!(matches(101), 2);
        assert_eq!(user_id(7, 1_000_000), "user_000007");
        assert_eq!(user_id(999_999, 1_000_000), "user_999999");
    }

    #[test]
    fn paging_rows_compare_the_first_and_last_tenth() {
        let settings = Settings {
            backend: Backend::Postgres,
            users: 1000,
            clients: vec![1],
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            list: true,
            batchget: false,
            page_size: 50,
            page_sizes: vec![1],
            passes: 2,
            batch: 100,
            progress: false,
        };
        let pass: Vec<u64> = (1..=20).map(|n| n * 1000).collect();
        let row = paging_row(&settings, "service", 1, 20, &[pass.clone(), pass]);
        assert_eq!(row.pages, 20);
        assert_eq!(row.first_tenth_ms, 1.5);
        assert_eq!(row.last_tenth_ms, 19.5);
        assert_eq!(row.pass_ms, 210.0);
    }
}
