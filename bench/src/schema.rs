//! Schemas (issue 18): what a typical JSON Schema on the merged field costs
//! a Merge, and how long SetSchema's check of every stored value takes.
//!
//! - **schema** (the merge comparison): N users seeded with a 20-property
//!   profile (`fixtures/profile.document.json`, varied per id) that
//!   conforms to `fixtures/profile.schema.json` (20 properties, nested
//!   objects, `required`, `pattern`, numeric bounds, `additionalProperties:
//!   false`), then the merge workload (3 integer keys into
//!   `public_metadata`, so every result conforms) on one server, measured
//!   without a schema and with the schema on `public_metadata`, alternating
//!   (without, with, without, with, ...: DeleteSchema / SetSchema between
//!   the runs) so that drift on the shared machine falls on both arms.
//!   Once the schema is set, a nonconforming Merge must be refused, so
//!   that the arm with the schema is known to validate. Besides
//!   throughput, each run's CPU per Merge: the server's, and the whole
//!   stack's (server, bench, and the Postgres backends of the bench's
//!   database), which other load on the machine disturbs far less.
//! - **set-schema**: users seeded straight into the table (the same
//!   conforming profiles), then SetSchema on `public_metadata`, once with
//!   `validate_only` and once for real, timed, with the server's peak RSS
//!   over each call (`VmHWM`, reset before the call through
//!   `/proc/<pid>/clear_refs`), a Merge issued while the check runs
//!   (writes wait for it) and Gets issued one after another meanwhile
//!   (reads are not meant to wait). Before them, the same rows streamed and
//!   decoded by the bench in raw SQL: the floor of reading them. Sizes
//!   grow in one database (each adds rows), so that time and memory can
//!   be read against the count.
//! - **validator**: the schema compiled in this process and run on the
//!   document, as the server does on each write (`violations`, which
//!   lists errors) and in SetSchema's check (`is_valid`), per document.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metadata_service::model::Field;
use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{
    DeleteSchemaRequest, GetSchemaRequest, GetUserMetadataRequest, MergeUserMetadataRequest,
    MetadataField, MetadataKind, SetSchemaRequest,
};
use metadata_service::schema::Schema;
use prost_types::Struct;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::db::{Backend, BenchDb, RawPool, id};
use crate::load::{self, Workload, latency_histogram};
use crate::process::{ServerProcess, Usage, channel};

/// The schema set on `public_metadata`.
pub const SCHEMA: &str = include_str!("fixtures/profile.schema.json");
/// A document that conforms to it; seeded rows vary `k1`, `display_name`
/// and `email` by id.
pub const DOCUMENT: &str = include_str!("fixtures/profile.document.json");

/// What the server's `--db-timeout` is raised to for the set-schema runs
/// (SetSchema works within it; see BENCHMARKS.md), unless given with
/// `--server-arg`.
const SET_SCHEMA_DB_TIMEOUT: &str = "30m";

pub struct Settings<'a> {
    pub backend: Backend,
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    /// Run the merge comparison at each of these clients.
    pub clients: Vec<usize>,
    pub ids: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Pairs (without, with) of the merge comparison, per clients.
    pub rounds: usize,
    pub merges: bool,
    /// Stored documents SetSchema checks, each size in turn; empty: no
    /// set-schema run.
    pub set_schema_docs: Vec<u64>,
    /// How long the validator micro-benchmark runs, per function.
    pub validator_time: Duration,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct SchemaReport {
    /// Compact JSON bytes of the schema and of a seeded document.
    pub schema_bytes: usize,
    pub document_bytes: usize,
    pub validator: ValidatorCost,
    pub merges: Vec<MergeRow>,
    pub summary: Vec<MergeSummary>,
    pub set_schema: Vec<SetSchemaRow>,
}

/// The schema run on one document in this process, per call.
#[derive(Debug, Serialize)]
pub struct ValidatorCost {
    /// What a write calls (`Schema::violations`: the errors, listed).
    pub violations_us: f64,
    /// What SetSchema's check calls (`Schema::is_valid`).
    pub is_valid_us: f64,
    /// `serde_json::from_str` of the document, for scale.
    pub parse_us: f64,
}

#[derive(Debug, Serialize)]
pub struct MergeRow {
    pub backend: &'static str,
    pub ids: u64,
    pub clients: usize,
    pub round: usize,
    pub schema: bool,
    pub ops: u64,
    pub ops_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub server_cpu_cores: f64,
    /// Server CPU time per Merge.
    pub server_cpu_us_per_op: f64,
    /// CPU time per Merge of the whole stack: the server, the bench, and
    /// (Postgres) the database's backends serving this database.
    pub stack_cpu_us_per_op: f64,
}

/// Both arms at one concurrency.
#[derive(Debug, Serialize)]
pub struct MergeSummary {
    pub backend: &'static str,
    pub clients: usize,
    pub rounds: usize,
    /// Means over the rounds.
    pub without_ops_per_second: f64,
    pub with_ops_per_second: f64,
    /// with / without.
    pub ratio: f64,
    /// Each round's with / without.
    pub round_ratios: Vec<f64>,
    /// The round ratios' mean ± two standard errors (their spread is the
    /// machine's noise; the pairs cancel its drift).
    pub round_ratio_mean: f64,
    pub round_ratio_2se: f64,
    pub without_server_cpu_us_per_op: f64,
    pub with_server_cpu_us_per_op: f64,
    pub without_stack_cpu_us_per_op: f64,
    pub with_stack_cpu_us_per_op: f64,
    /// What the schema adds to the stack's CPU per Merge, as a share of it
    /// without: what it costs in throughput wherever the two cores are the
    /// bottleneck, and far less noisy than the throughputs on a shared
    /// machine.
    pub stack_cpu_added: f64,
    /// The schema costs at most 10% of Merge throughput (ratio >= 0.90).
    pub target_met: bool,
}

#[derive(Debug, Serialize)]
pub struct SetSchemaRow {
    pub backend: &'static str,
    pub documents: u64,
    /// The bench streaming the same rows in raw SQL, JSON decoded.
    pub raw_scan_seconds: f64,
    pub validate_only: SetSchemaCall,
    pub set: SetSchemaCall,
    /// Server RSS before the calls.
    pub rss_before_mb: f64,
}

#[derive(Debug, Serialize)]
pub struct SetSchemaCall {
    pub seconds: f64,
    pub documents_per_second: f64,
    /// Server CPU during the call, in seconds.
    pub server_cpu_seconds: f64,
    /// Peak RSS of the server during the call (VmHWM reset just before;
    /// else the peak since it started: see `peak_reset`).
    pub peak_rss_mb: f64,
    pub peak_reset: bool,
    /// A Merge (a new value, so a real write) issued just after the call
    /// was sent: how long it took, and whether it succeeded. Writes wait
    /// for the check.
    pub merge_during_ms: f64,
    pub merge_during: String,
    /// Gets issued one after another (one client, a connection of its
    /// own) while the call ran: reads are not meant to wait.
    pub gets_during: u64,
    pub get_p50_ms: f64,
    pub get_max_ms: f64,
    pub get_errors: u64,
}

impl SetSchemaCall {
    fn rate(&self, documents: u64) -> f64 {
        documents as f64 / self.seconds
    }
}

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<SchemaReport> {
    let schema: Value = serde_json::from_str(SCHEMA).context("the schema fixture")?;
    let document: Value = serde_json::from_str(DOCUMENT).context("the document fixture")?;
    let validator = validator_cost(&schema, &document, settings.validator_time)?;
    if settings.progress {
        eprintln!(
            "  validator: {:.1} µs per write check (violations), {:.1} µs is_valid, {:.1} µs to parse the document",
            validator.violations_us, validator.is_valid_us, validator.parse_us
        );
    }
    let mut report = SchemaReport {
        schema_bytes: serde_json::to_string(&schema)?.len(),
        document_bytes: serde_json::to_string(&document)?.len(),
        validator,
        merges: Vec::new(),
        summary: Vec::new(),
        set_schema: Vec::new(),
    };
    if settings.merges {
        merges(db, settings, &schema, &mut report).await?;
    }
    if !settings.set_schema_docs.is_empty() {
        set_schema_runs(db, settings, &schema, &mut report).await?;
    }
    Ok(report)
}

/// Times `f` over the documents, round after round, for about `time`.
fn per_call(docs: &[Value], time: Duration, mut f: impl FnMut(&Value)) -> f64 {
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < time || calls == 0 {
        for doc in docs {
            f(doc);
        }
        calls += docs.len() as u64;
    }
    started.elapsed().as_secs_f64() * 1e6 / calls as f64
}

fn validator_cost(
    schema: &Value,
    document: &Value,
    time: Duration,
) -> anyhow::Result<ValidatorCost> {
    let compiled = Schema::compile(schema).map_err(|e| anyhow::anyhow!("the schema: {e}"))?;
    let docs: Vec<Value> = (0..1000).map(|n| profile(document, n)).collect();
    let texts: Vec<String> = docs.iter().map(Value::to_string).collect();
    for doc in &docs {
        let found = compiled.violations(Field::Public, doc);
        if !found.is_empty() {
            bail!("a seeded document does not conform: {found:?}");
        }
    }
    let mut sink = 0usize;
    let violations_us = per_call(&docs, time, |doc| {
        sink += compiled.violations(Field::Public, doc).len()
    });
    let is_valid_us = per_call(&docs, time, |doc| sink += compiled.is_valid(doc) as usize);
    let started = Instant::now();
    let mut parsed = 0u64;
    while started.elapsed() < time || parsed == 0 {
        for text in &texts {
            let value: Value = serde_json::from_str(text)?;
            sink += value.as_object().map_or(0, |o| o.len());
        }
        parsed += texts.len() as u64;
    }
    let parse_us = started.elapsed().as_secs_f64() * 1e6 / parsed as f64;
    std::hint::black_box(sink);
    Ok(ValidatorCost {
        violations_us,
        is_valid_us,
        parse_us,
    })
}

/// The document as seeded for id `bench_{n}` (see [`seed`]).
fn profile(document: &Value, n: u64) -> Value {
    let mut doc = document.clone();
    doc["k1"] = json!(n % 1_000_000);
    doc["display_name"] = json!(format!("User {n}"));
    doc["email"] = json!(format!("user.{n}@example.com"));
    doc
}

/// Empties the tables (schemas included) before the first seeding.
async fn clear(pool: &RawPool) -> anyhow::Result<()> {
    match pool {
        RawPool::Postgres(pool) => {
            sqlx::query("TRUNCATE metadata, events, metadata_schemas")
                .execute(pool)
                .await?;
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

/// Adds users `bench_{from}..bench_{to-1}` holding [`DOCUMENT`] in
/// `public_metadata`, varied as [`profile`] varies it.
async fn seed(pool: &RawPool, from: u64, to: u64) -> anyhow::Result<()> {
    let document = serde_json::to_string(&serde_json::from_str::<Value>(DOCUMENT)?)?;
    match pool {
        RawPool::Postgres(pool) => {
            sqlx::query(
                "INSERT INTO metadata SELECT 'user', 'bench_' || g, \
                   $1::jsonb || jsonb_build_object('k1', g % 1000000, 'display_name', 'User ' || g, \
                     'email', 'user.' || g || '@example.com'), \
                   '{}', '{}', 1, 0, now(), now() \
                 FROM generate_series($2::bigint, $3::bigint - 1) g",
            )
            .bind(&document)
            .bind(from as i64)
            .bind(to as i64)
            .execute(pool)
            .await?;
            sqlx::query("VACUUM ANALYZE metadata").execute(pool).await?;
        }
        RawPool::Sqlite(pool) => {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
            sqlx::query(
                "INSERT INTO metadata WITH RECURSIVE s(g) AS (SELECT ?2 UNION ALL SELECT g + 1 FROM s WHERE g + 1 < ?3) \
                 SELECT 'user', 'bench_' || g, \
                   json_patch(?1, json_object('k1', g % 1000000, 'display_name', 'User ' || g, \
                     'email', 'user.' || g || '@example.com')), \
                   '{}', '{}', 1, 0, ?4, ?4 FROM s WHERE g < ?3",
            )
            .bind(&document)
            .bind(from as i64)
            .bind(to as i64)
            .bind(now)
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

fn struct_of(value: &Value) -> anyhow::Result<Struct> {
    match metadata_service::convert::proto_from_json(value).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Ok(s),
        _ => bail!("not a JSON object"),
    }
}

fn set_request(schema: &Value, validate_only: bool) -> anyhow::Result<SetSchemaRequest> {
    Ok(SetSchemaRequest {
        kind: MetadataKind::User.into(),
        field: MetadataField::Public.into(),
        schema: Some(struct_of(schema)?),
        validate_only,
        expected_version: None,
    })
}

async fn delete_schema(schemas: &mut MetadataSchemaServiceClient<Channel>) -> anyhow::Result<()> {
    schemas
        .delete_schema(DeleteSchemaRequest {
            kind: MetadataKind::User.into(),
            field: MetadataField::Public.into(),
            expected_version: None,
        })
        .await
        .context("DeleteSchema")?;
    Ok(())
}

async fn schema_version(schemas: &mut MetadataSchemaServiceClient<Channel>) -> anyhow::Result<u64> {
    Ok(schemas
        .get_schema(GetSchemaRequest {
            kind: MetadataKind::User.into(),
            field: MetadataField::Public.into(),
        })
        .await
        .context("GetSchema")?
        .into_inner()
        .version)
}

fn merge_request(user_id: String, patch: Value) -> anyhow::Result<MergeUserMetadataRequest> {
    Ok(MergeUserMetadataRequest {
        user_id,
        public_metadata: Some(struct_of(&patch)?),
        ..Default::default()
    })
}

/// The merge comparison, on a server of its own.
async fn merges(
    db: &BenchDb,
    settings: &Settings<'_>,
    schema: &Value,
    report: &mut SchemaReport,
) -> anyhow::Result<()> {
    let backend = settings.backend;
    let ids = settings.ids;
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let pool = db.pool(1).await?;
    clear(&pool).await?;
    seed(&pool, 0, ids).await.context("seeding profiles")?;
    let server = ServerProcess::start(
        settings.binary,
        db.url(),
        settings.server_args,
        settings.server_env,
    )
    .await?;
    let result = async {
        let control = channel(server.addr).await?;
        let mut schemas = MetadataSchemaServiceClient::new(control.clone());
        let mut users = UserMetadataServiceClient::new(control);
        let mut enforced = false;
        for &clients in &settings.clients {
            let channels = crate::connections(&server, clients).await?;
            let mut rows: Vec<MergeRow> = Vec::new();
            for round in 0..settings.rounds {
                for with_schema in [false, true] {
                    if with_schema {
                        schemas
                            .set_schema(set_request(schema, false)?)
                            .await
                            .context("SetSchema")?;
                        if !enforced {
                            // The arm with the schema must be validating.
                            let refused = users
                                .merge(merge_request(id(0), json!({"k1": -1}))?)
                                .await;
                            match refused {
                                Err(status) if status.code() == Code::InvalidArgument => {}
                                other => bail!(
                                    "a Merge breaking the schema was not refused: {other:?}"
                                ),
                            }
                            enforced = true;
                        }
                    } else if round > 0 {
                        delete_schema(&mut schemas).await?;
                    }
                    load::service(channels.clone(), Workload::Merge, clients, ids, settings.warmup)
                        .await;
                    let before = server.usage()?;
                    let stack_before = stack_cpu(&pool, server.pid).await?;
                    let measured = load::service(
                        channels.clone(),
                        Workload::Merge,
                        clients,
                        ids,
                        settings.duration,
                    )
                    .await;
                    let after = server.usage()?;
                    let stack_after = stack_cpu(&pool, server.pid).await?;
                    crate::check(&measured, "schema merge")?;
                    let stack: f64 = stack_after
                        .iter()
                        .map(|(pid, cpu)| cpu - stack_before.get(pid).unwrap_or(&0.0))
                        .sum();
                    let cpu = after.cpu_seconds - before.cpu_seconds;
                    let row = MergeRow {
                        backend: backend.name(),
                        ids,
                        clients,
                        round,
                        schema: with_schema,
                        ops: measured.ops,
                        ops_per_second: measured.throughput(),
                        p50_ms: crate::ms(measured.latency.value_at_quantile(0.5)),
                        p99_ms: crate::ms(measured.latency.value_at_quantile(0.99)),
                        server_cpu_cores: crate::cpu_cores(before, after, measured.elapsed),
                        server_cpu_us_per_op: cpu * 1e6 / measured.ops as f64,
                        stack_cpu_us_per_op: stack * 1e6 / measured.ops as f64,
                    };
                    if settings.progress {
                        eprintln!(
                            "  {} clients={} merge {} schema (round {}): {:.0} ops/s, {:.0} µs server CPU per merge",
                            row.backend,
                            clients,
                            if with_schema { "with" } else { "without" },
                            round + 1,
                            row.ops_per_second,
                            row.server_cpu_us_per_op
                        );
                    }
                    rows.push(row);
                }
            }
            delete_schema(&mut schemas).await?;
            report.summary.push(summarize(backend, clients, &rows));
            report.merges.extend(rows);
        }
        anyhow::Ok(())
    }
    .await;
    pool.close().await;
    server.stop().await?;
    result
}

/// CPU seconds used so far by each process of the stack: the server, this
/// bench, and on Postgres every backend connected to the bench's database
/// (but the one asking).
pub(crate) async fn stack_cpu(
    pool: &RawPool,
    server: u32,
) -> anyhow::Result<std::collections::HashMap<u32, f64>> {
    let mut pids = vec![server, std::process::id()];
    if let RawPool::Postgres(pool) = pool {
        let backends: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(pool)
        .await?;
        pids.extend(backends.into_iter().map(|p| p as u32));
    }
    // A backend may have gone meanwhile: it is left out.
    Ok(pids
        .into_iter()
        .filter_map(|pid| Usage::of(pid).ok().map(|u| (pid, u.cpu_seconds)))
        .collect())
}

fn summarize(backend: Backend, clients: usize, rows: &[MergeRow]) -> MergeSummary {
    let mean = |schema: bool, f: fn(&MergeRow) -> f64| {
        let arm: Vec<f64> = rows.iter().filter(|r| r.schema == schema).map(f).collect();
        arm.iter().sum::<f64>() / arm.len().max(1) as f64
    };
    let without = mean(false, |r| r.ops_per_second);
    let with = mean(true, |r| r.ops_per_second);
    let ratio = with / without;
    let round_ratios: Vec<f64> = rows
        .chunks(2)
        .map(|pair| pair[1].ops_per_second / pair[0].ops_per_second)
        .collect();
    let n = round_ratios.len() as f64;
    let round_ratio_mean = round_ratios.iter().sum::<f64>() / n;
    let variance = round_ratios
        .iter()
        .map(|r| (r - round_ratio_mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    MergeSummary {
        backend: backend.name(),
        clients,
        rounds: rows.len() / 2,
        without_ops_per_second: without,
        with_ops_per_second: with,
        ratio,
        round_ratios,
        round_ratio_mean,
        round_ratio_2se: 2.0 * (variance / n).sqrt(),
        without_server_cpu_us_per_op: mean(false, |r| r.server_cpu_us_per_op),
        with_server_cpu_us_per_op: mean(true, |r| r.server_cpu_us_per_op),
        without_stack_cpu_us_per_op: mean(false, |r| r.stack_cpu_us_per_op),
        with_stack_cpu_us_per_op: mean(true, |r| r.stack_cpu_us_per_op),
        stack_cpu_added: mean(true, |r| r.stack_cpu_us_per_op)
            / mean(false, |r| r.stack_cpu_us_per_op)
            - 1.0,
        target_met: ratio >= 0.90,
    }
}

/// Resets the process's peak RSS (VmHWM) to its current RSS; false if
/// the kernel refused.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmHWM")?
        .parse()?;
    Ok(kb * 1024)
}

/// Streams every stored value of `public_metadata` (as SetSchema reads
/// them) and decodes it; returns the seconds and the count.
async fn raw_scan(pool: &RawPool) -> anyhow::Result<(f64, u64)> {
    use sqlx::Row;
    let started = Instant::now();
    let mut count = 0u64;
    match pool {
        RawPool::Postgres(pool) => {
            let mut rows = sqlx::query(
                "SELECT id, public_metadata AS value FROM metadata \
                 WHERE kind = 'user' AND version > 0 ORDER BY id",
            )
            .fetch(pool);
            while let Some(row) = rows.next().await {
                let row = row?;
                let _: String = row.try_get(0)?;
                let value: sqlx::types::Json<Value> = row.try_get(1)?;
                count += value.0.is_object() as u64;
            }
        }
        RawPool::Sqlite(pool) => {
            let mut rows = sqlx::query(
                "SELECT id, public_metadata AS value FROM metadata \
                 WHERE kind = 'user' AND version > 0 ORDER BY id",
            )
            .fetch(pool);
            while let Some(row) = rows.next().await {
                let row = row?;
                let _: String = row.try_get(0)?;
                let value: Value = serde_json::from_str(row.try_get::<&str, _>(1)?)?;
                count += value.is_object() as u64;
            }
        }
    }
    Ok((started.elapsed().as_secs_f64(), count))
}

/// One SetSchema, timed, with the server's peak RSS over it and a Merge
/// sent while it runs.
async fn timed_set(
    server: &ServerProcess,
    schemas: &mut MetadataSchemaServiceClient<Channel>,
    writer: &Channel,
    reader: &Channel,
    request: SetSchemaRequest,
    documents: u64,
) -> anyhow::Result<SetSchemaCall> {
    let peak_reset = reset_peak(server.pid);
    let before: Usage = server.usage()?;
    let stop = Arc::new(AtomicBool::new(false));
    // The Merge goes out once the call has been sent (a little after, so
    // that it finds the check running), and is timed to its answer.
    let merge = {
        let writer = writer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if stop.load(Ordering::Relaxed) {
                return (0.0, "not sent: the call had returned".to_string());
            }
            let value = rand::random_range(0..1_000_000);
            let request = merge_request(id(1), json!({"k2": value})).expect("a patch");
            let started = Instant::now();
            let outcome = UserMetadataServiceClient::new(writer).merge(request).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            match outcome {
                Ok(_) => (ms, "ok".to_string()),
                Err(status) => (ms, format!("{:?}: {}", status.code(), status.message())),
            }
        })
    };
    let gets = {
        let reader = reader.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut users = UserMetadataServiceClient::new(reader);
            let mut latency = latency_histogram();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let user_id = id(rand::random_range(0..documents));
                let started = Instant::now();
                match users
                    .get(GetUserMetadataRequest {
                        user_id,
                        revision: None,
                    })
                    .await
                {
                    Ok(_) => latency.saturating_record(started.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latency, errors)
        })
    };
    let started = Instant::now();
    let answer = schemas.set_schema(request).await;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let after = server.usage()?;
    let peak = peak_rss_bytes(server.pid)?;
    answer.context("SetSchema")?;
    let (merge_during_ms, merge_during) = merge.await?;
    let (gets, get_errors) = gets.await?;
    let mut call = SetSchemaCall {
        seconds,
        documents_per_second: 0.0,
        server_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        peak_rss_mb: crate::mb(peak),
        peak_reset,
        merge_during_ms,
        merge_during,
        gets_during: gets.len(),
        get_p50_ms: crate::ms(gets.value_at_quantile(0.5)),
        get_max_ms: crate::ms(gets.max()),
        get_errors,
    };
    call.documents_per_second = call.rate(documents);
    Ok(call)
}

async fn set_schema_runs(
    db: &BenchDb,
    settings: &Settings<'_>,
    schema: &Value,
    report: &mut SchemaReport,
) -> anyhow::Result<()> {
    let backend = settings.backend;
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let pool = db.pool(1).await?;
    clear(&pool).await?;
    let mut server_args = settings.server_args.to_vec();
    if !server_args.iter().any(|a| a.starts_with("--db-timeout")) {
        server_args.push(format!("--db-timeout={SET_SCHEMA_DB_TIMEOUT}"));
    }
    let server =
        ServerProcess::start(settings.binary, db.url(), &server_args, settings.server_env).await?;
    let result = async {
        let control = channel(server.addr).await?;
        let writer = channel(server.addr).await?;
        let reader = channel(server.addr).await?;
        let mut schemas = MetadataSchemaServiceClient::new(control);
        let mut seeded = 0u64;
        let mut sizes = settings.set_schema_docs.clone();
        sizes.sort_unstable();
        sizes.dedup();
        for documents in sizes {
            let started = Instant::now();
            seed(&pool, seeded, documents)
                .await
                .context("seeding profiles")?;
            seeded = documents;
            if settings.progress {
                eprintln!(
                    "  {}: {documents} documents seeded ({:.1} s)",
                    backend.name(),
                    started.elapsed().as_secs_f64()
                );
            }
            // Once to warm the caches, once measured.
            raw_scan(&pool).await?;
            let (raw_scan_seconds, scanned) = raw_scan(&pool).await?;
            if scanned != documents {
                bail!("the raw scan read {scanned} documents, {documents} are stored");
            }
            let rss_before = server.usage()?.rss_bytes;
            let version = schema_version(&mut schemas).await?;
            let validate_only = timed_set(
                &server,
                &mut schemas,
                &writer,
                &reader,
                set_request(schema, true)?,
                documents,
            )
            .await
            .context("validate_only")?;
            if schema_version(&mut schemas).await? != version {
                bail!("SetSchema with validate_only changed the stored schema");
            }
            let set = timed_set(
                &server,
                &mut schemas,
                &writer,
                &reader,
                set_request(schema, false)?,
                documents,
            )
            .await?;
            if schema_version(&mut schemas).await? != version + 1 {
                bail!("SetSchema did not store the schema");
            }
            delete_schema(&mut schemas).await?;
            let row = SetSchemaRow {
                backend: backend.name(),
                documents,
                raw_scan_seconds,
                validate_only,
                set,
                rss_before_mb: crate::mb(rss_before),
            };
            if settings.progress {
                eprintln!(
                    "  {} set-schema {documents} docs: validate_only {:.2} s, set {:.2} s ({:.0} docs/s), raw scan {:.2} s, peak RSS {:.1} MB",
                    row.backend,
                    row.validate_only.seconds,
                    row.set.seconds,
                    row.set.documents_per_second,
                    row.raw_scan_seconds,
                    row.set.peak_rss_mb.max(row.validate_only.peak_rss_mb)
                );
            }
            report.set_schema.push(row);
        }
        anyhow::Ok(())
    }
    .await;
    pool.close().await;
    server.stop().await?;
    result
}

pub fn print(report: &SchemaReport) {
    let v = &report.validator;
    println!(
        "\nschemas (issue 18): a {}-byte schema on public_metadata, {}-byte documents; \
         in this process: {:.1} µs per write check (violations), {:.1} µs is_valid, {:.1} µs to parse",
        report.schema_bytes, report.document_bytes, v.violations_us, v.is_valid_us, v.parse_us
    );
    if !report.merges.is_empty() {
        println!(
            "{:<9} {:>7} {:>5} {:<7} {:>9} {:>7} {:>7} {:>5} {:>10} {:>12}",
            "backend",
            "clients",
            "round",
            "schema",
            "ops/s",
            "p50ms",
            "p99ms",
            "cpu",
            "cpu µs/op",
            "stack µs/op"
        );
        for r in &report.merges {
            println!(
                "{:<9} {:>7} {:>5} {:<7} {:>9.0} {:>7.2} {:>7.2} {:>5.2} {:>10.0} {:>12.0}",
                r.backend,
                r.clients,
                r.round + 1,
                if r.schema { "with" } else { "without" },
                r.ops_per_second,
                r.p50_ms,
                r.p99_ms,
                r.server_cpu_cores,
                r.server_cpu_us_per_op,
                r.stack_cpu_us_per_op
            );
        }
        println!(
            "\n{:<9} {:>7} {:>10} {:>10} {:>6} {:>13} {:>17} {:>19} {:>7}  target (<= 10% cost)  rounds",
            "backend",
            "clients",
            "without/s",
            "with/s",
            "ratio",
            "rounds ±2se",
            "cpu µs/op w/o→w",
            "stack µs/op w/o→w",
            "added"
        );
        for s in &report.summary {
            let rounds: Vec<String> = s
                .round_ratios
                .iter()
                .map(|r| format!("{:.0}%", r * 100.0))
                .collect();
            println!(
                "{:<9} {:>7} {:>10.0} {:>10.0} {:>5.1}% {:>6.1}±{:<5.1}% {:>8.0} → {:<6.0} {:>9.0} → {:<7.0} {:>6.1}%  {:<20}  {}",
                s.backend,
                s.clients,
                s.without_ops_per_second,
                s.with_ops_per_second,
                s.ratio * 100.0,
                s.round_ratio_mean * 100.0,
                s.round_ratio_2se * 100.0,
                s.without_server_cpu_us_per_op,
                s.with_server_cpu_us_per_op,
                s.without_stack_cpu_us_per_op,
                s.with_stack_cpu_us_per_op,
                s.stack_cpu_added * 100.0,
                if s.target_met { "met" } else { "MISSED" },
                rounds.join(" ")
            );
        }
    }
    if !report.set_schema.is_empty() {
        println!(
            "\n{:<9} {:>9} {:>9} {:<13} {:>8} {:>9} {:>6} {:>7} {:>7} {:>8} {:>5} {:>8} {:>8}  merge sent during the call",
            "backend",
            "documents",
            "raw scan",
            "call",
            "seconds",
            "docs/s",
            "cpu s",
            "rss0 MB",
            "peak MB",
            "merge ms",
            "gets",
            "get p50",
            "get max"
        );
        for r in &report.set_schema {
            for (name, call) in [("validate_only", &r.validate_only), ("set", &r.set)] {
                println!(
                    "{:<9} {:>9} {:>8.2}s {:<13} {:>8.2} {:>9.0} {:>6.2} {:>7.1} {:>7.1} {:>8.0} {:>5} {:>8.2} {:>8.0}  {}{}",
                    r.backend,
                    r.documents,
                    r.raw_scan_seconds,
                    name,
                    call.seconds,
                    call.documents_per_second,
                    call.server_cpu_seconds,
                    r.rss_before_mb,
                    call.peak_rss_mb,
                    call.merge_during_ms,
                    call.gets_during,
                    call.get_p50_ms,
                    call.get_max_ms,
                    call.merge_during,
                    if call.peak_reset {
                        ""
                    } else {
                        " (peak RSS since start: VmHWM could not be reset)"
                    }
                );
            }
        }
    }
}
