//! Load generator for metadata-service, with side-by-side baselines: the
//! same database work in raw SQL (sqlx) on the same database, at the same
//! concurrency, in the same run. See BENCHMARKS.md.
//!
//! It starts the server binary as a child process (so that its CPU and
//! memory can be read from /proc), seeds N ids directly in the database,
//! and prints a table (or JSON with --json).

mod db;
mod etcd;
mod grpc_web;
mod history;
mod interference;
mod load;
mod pgbench;
mod process;
mod query;
mod relay;
mod schema;
mod transactions;
mod watch;
mod watch_filter;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;
use tonic::transport::Channel;

use db::{Backend, BenchDb};
use load::{Measured, Workload};
use process::{ServerProcess, Usage};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Load generator and side-by-side baselines for metadata-service"
)]
struct Args {
    /// Database the server (and the baseline) runs on.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Postgres to create a throw-away benchmark database in.
    #[arg(
        long,
        env = "TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// The server binary; default: `metadata-service` next to this binary.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Concurrent clients; a comma-separated list runs each.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    clients: Vec<usize>,
    /// Stored ids the load picks from at random; a list runs each.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    ids: Vec<u64>,
    /// Measured time of each load run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Workloads to run: merge, merge2 (merge with the clients spread over
    /// two replicas on one database; Postgres), ping (a health check: the
    /// gRPC ceiling), get, mix (90% get), etcd (a single-node etcd side by
    /// side: read-modify-write, Gets, Watch fan-out), watch, interference
    /// (small merges alone, while Watch streams replay a long history, and
    /// while ~1 MB patches arrive), watch-filter (watch, each subscriber
    /// with a filter matching a tenth of the writes), list (List with a
    /// filter matching 1% of --query-users: first pages, paging through
    /// every match; Postgres: EXPLAIN), batchget (BatchGet of --batch-size
    /// ids against single Gets), schema (merge without and with a JSON
    /// Schema on the merged field, alternating), set-schema (SetSchema's
    /// check of --schema-docs stored documents), relay (the NATS JetStream
    /// relay: its throughput next to the service's own merge rate, and
    /// commit-to-consumer latency at --relay-rates; needs NATS with
    /// JetStream at --nats-url), history (issue 29: at one client, Get at a
    /// revision among the last 1,000 and pages of one record's history
    /// against a plain Get, alternating; the plans of the store's history
    /// queries), transactions (issue 30: at --clients, a Commit of 10
    /// Merges against the same 10 Merges sent one by one, and Patch against
    /// Merge of the same change, alternating), grpc-web (issue 31: Get at
    /// --clients over native gRPC against gRPC-Web over HTTP/1.1,
    /// alternating), webhooks (issue 32: deliveries per second of a
    /// --webhook-backlog to one local endpoint, and commit-to-delivery
    /// latency at --webhook-rate). The load workloads run in
    /// that order whatever the order given, since merge2 and get read
    /// earlier rows.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "merge,merge2,ping,get,mix,etcd,watch,watch-filter,list,batchget,interference,schema,set-schema,history,transactions,grpc-web,relay,webhooks"
    )]
    workloads: Vec<String>,
    /// Database connections of the server and of the baseline.
    #[arg(long, default_value_t = 16)]
    pool: u32,
    /// Watch subscribers.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Writes per second during the Watch run.
    #[arg(long, default_value_t = 200)]
    write_rate: u32,
    /// Length of the Watch run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    watch_duration: Duration,
    /// watch-filter: subscriber n watches `public_metadata.group = n % G`,
    /// and each write sets its id's group: each subscriber is owed 1/G of
    /// the writes.
    #[arg(long, default_value_t = 10)]
    watch_groups: usize,
    /// list, batchget: users seeded (1% match the list's filter); default
    /// 1,000,000 on Postgres, 100,000 on SQLite.
    #[arg(long)]
    query_users: Option<u64>,
    /// list: page size of the first-page runs.
    #[arg(long, default_value_t = 50)]
    list_page_size: u64,
    /// list: page sizes to page through every match at.
    #[arg(long, value_delimiter = ',', default_value = "50,200,1000")]
    page_sizes: Vec<u64>,
    /// list: measured passes through every match, per page size (after
    /// one unmeasured pass).
    #[arg(long, default_value_t = 3)]
    paging_passes: usize,
    /// batchget: distinct ids per BatchGet.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Interference: revisions of event history seeded for the replays.
    #[arg(long, default_value_t = 200_000)]
    history: u64,
    /// Interference: Watch streams replaying the history from revision 1.
    #[arg(long, default_value_t = 50)]
    replay_streams: usize,
    /// Interference: clients sending big Merge patches in a closed loop.
    #[arg(long, default_value_t = 2)]
    big_writers: usize,
    /// Interference: compact JSON size of each big patch (the server's
    /// --max-request-bytes is 1 MiB by default).
    #[arg(long, default_value_t = 1_000_000)]
    big_patch_bytes: usize,
    /// Interference: big patches per second (in all) of the paced run that
    /// follows the closed-loop one; 0: no paced run.
    #[arg(long, default_value_t = 50.0)]
    big_rate: f64,
    /// Schema: (without, with) pairs of merge runs, per clients.
    #[arg(long, default_value_t = 2)]
    schema_rounds: usize,
    /// Set-schema: stored documents SetSchema checks; a list runs each
    /// (growing one database).
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    schema_docs: Vec<u64>,
    /// History: Merges of the record with a long history (each followed by
    /// one to another of 50 users).
    #[arg(long, default_value_t = 2000)]
    history_writes: u64,
    /// History: rounds of the alternation; each runs every arm for
    /// --duration / rounds.
    #[arg(long, default_value_t = 3)]
    history_rounds: usize,
    /// Transactions: rounds of the alternation; each runs every arm for
    /// --duration / rounds.
    #[arg(long, default_value_t = 5)]
    transaction_rounds: usize,
    /// Relay: NATS (with JetStream) the relay publishes to; the bench
    /// creates a stream of its own there and deletes it at the end.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Relay: writes per second of each latency run (open loop).
    #[arg(long, value_delimiter = ',', default_value = "200,2000")]
    relay_rates: Vec<u32>,
    /// Relay: length of each latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    relay_duration: Duration,
    /// Webhooks: events written before the endpoint is enabled.
    #[arg(long, default_value_t = 5000)]
    webhook_backlog: u64,
    /// Webhooks: writes per second of the latency run (open loop).
    #[arg(long, default_value_t = 200)]
    webhook_rate: u32,
    /// Webhooks: length of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    webhook_duration: Duration,
    /// Extra arguments for the server.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Extra environment for the server, KEY=VALUE.
    #[arg(long, value_parser = parse_env)]
    server_env: Vec<(String, String)>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A few seconds in all, for CI: checks that everything works and no
    /// event is lost; its numbers mean nothing.
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Serialize)]
struct LoadRow {
    backend: &'static str,
    ids: u64,
    clients: usize,
    workload: &'static str,
    /// "service", "raw-sql" (the floor: the same data work), or, for
    /// Postgres merges, "raw-sql+notify" (the same plus `pg_notify` before
    /// COMMIT) and "pgbench" (the raw-sql merge run by pgbench's C client:
    /// pgbench.rs).
    target: &'static str,
    ops: u64,
    errors: u64,
    ops_per_second: f64,
    /// Percentiles: None on the pgbench row (pgbench reports an average).
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    latency_avg_ms: Option<f64>,
    /// This row's throughput / the raw-SQL (no notify) throughput of the
    /// same workload (service, raw-sql+notify and pgbench rows; merge2: of
    /// merge).
    ratio: Option<f64>,
    /// Server CPU in cores (1.0 = one core busy), service rows only; merge2:
    /// both replicas'.
    server_cpu_cores: Option<f64>,
    /// merge2: both replicas' together.
    server_rss_mb: Option<f64>,
    /// merge2: throughput / the service merge's on one replica.
    ratio_to_one_replica: Option<f64>,
    /// Service get: what a Get could reach if it cost a gRPC call (the
    /// service's ping) plus the database's point select (raw-SQL get) and
    /// nothing else, 1 / (1/ping + 1/raw get), at the same clients.
    bound_ops_per_second: Option<f64>,
    /// Service get: ping p50 + raw-SQL get p50 (the bound at one client).
    bound_p50_ms: Option<f64>,
    /// Service get: throughput / bound_ops_per_second.
    ratio_to_bound: Option<f64>,
    /// Service merge (Postgres): throughput / the pgbench row's, same ids
    /// and clients (issue 26: >= 0.55 at 16 clients).
    ratio_to_pgbench: Option<f64>,
    /// Service merge: throughput / etcd's rmw at the same ids and clients,
    /// when the etcd workload ran (etcd.rs).
    ratio_to_etcd_rmw: Option<f64>,
    /// The pgbench row: the numbers it ran with (-c -j -T -D ids=); the
    /// rest of the command and the script are in `pgbench` at the top.
    pgbench_args: Option<String>,
}

#[derive(Debug, Serialize)]
struct WatchRow {
    backend: &'static str,
    replicas: usize,
    subscribers: usize,
    /// Each subscriber's filter (watch-filter); None: every event.
    filter: Option<String>,
    write_rate: u32,
    writes: u64,
    /// Writes the server refused or failed (it could not keep up).
    failed_writes: u64,
    /// Deliveries owed: writes x subscribers, or, with filters, the sum of
    /// the writes each subscriber's filter matches.
    expected: u64,
    delivered: u64,
    missed: u64,
    disordered: u64,
    /// Revisions received that the subscriber was not owed.
    unexpected: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// RSS of the server the subscribers are on, with every stream open.
    server_rss_mb: f64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    /// The server binary measured.
    server: String,
    idle_rss_mb: Option<f64>,
    load: Vec<LoadRow>,
    watch: Vec<WatchRow>,
    interference: Vec<interference::InterferenceRow>,
    /// list and batchget.
    queries: Option<query::QueryReport>,
    /// The etcd side by side (workload etcd), or why it was skipped.
    etcd: Option<etcd::EtcdReport>,
    /// Workloads schema and set-schema.
    schema: Option<schema::SchemaReport>,
    /// Workload history.
    history: Option<history::HistoryReport>,
    /// Workload transactions.
    transactions: Option<transactions::TransactionsReport>,
    /// Workload grpc-web.
    grpc_web: Option<grpc_web::GrpcWebReport>,
    /// Workload relay.
    relay: Option<relay::RelayReport>,
    /// Workload webhooks.
    webhooks: Option<webhooks::WebhooksReport>,
    /// The pgbench merge rows (Postgres, workload merge): the version,
    /// command and script, or why they were skipped.
    pgbench: Option<pgbench::PgbenchInfo>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn row(
    backend: Backend,
    ids: u64,
    clients: usize,
    workload: Workload,
    target: &'static str,
    m: &Measured,
) -> LoadRow {
    let q = |q: f64| ms(m.latency.value_at_quantile(q));
    LoadRow {
        backend: backend.name(),
        ids,
        clients,
        workload: workload.name(),
        target,
        ops: m.ops,
        errors: m.errors,
        ops_per_second: m.throughput(),
        p50_ms: Some(q(0.5)),
        p95_ms: Some(q(0.95)),
        p99_ms: Some(q(0.99)),
        max_ms: Some(ms(m.latency.max())),
        latency_avg_ms: Some(m.latency.mean() / 1000.0),
        ratio: None,
        server_cpu_cores: None,
        server_rss_mb: None,
        ratio_to_one_replica: None,
        bound_ops_per_second: None,
        bound_p50_ms: None,
        ratio_to_bound: None,
        ratio_to_pgbench: None,
        ratio_to_etcd_rmw: None,
        pgbench_args: None,
    }
}

/// The pgbench merge row: its rate over the raw-SQL floor's in `ratio`.
fn pgbench_row(
    backend: Backend,
    ids: u64,
    clients: usize,
    run: pgbench::Outcome,
    floor: &Measured,
) -> LoadRow {
    LoadRow {
        backend: backend.name(),
        ids,
        clients,
        workload: Workload::Merge.name(),
        target: "pgbench",
        ops: run.transactions,
        errors: run.failed,
        ops_per_second: run.tps,
        p50_ms: None,
        p95_ms: None,
        p99_ms: None,
        max_ms: None,
        latency_avg_ms: run.latency_avg_ms,
        ratio: Some(run.tps / floor.throughput()),
        server_cpu_cores: None,
        server_rss_mb: None,
        ratio_to_one_replica: None,
        bound_ops_per_second: None,
        bound_p50_ms: None,
        ratio_to_bound: None,
        ratio_to_pgbench: None,
        ratio_to_etcd_rmw: None,
        pgbench_args: Some(run.args),
    }
}

/// A row measured earlier in this run.
fn find<'a>(
    rows: &'a [LoadRow],
    ids: u64,
    clients: usize,
    workload: &str,
    target: &str,
) -> Option<&'a LoadRow> {
    rows.iter().find(|r| {
        r.ids == ids && r.clients == clients && r.workload == workload && r.target == target
    })
}

async fn connections(server: &ServerProcess, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(process::channel(server.addr).await?);
    }
    Ok(channels)
}

async fn migrate(binary: &PathBuf, url: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new(binary)
        .args(["migrate", "--database-url", url, "--metrics-listen", "off"])
        .env("RUST_LOG", "warn")
        .status()
        .await?;
    if !status.success() {
        bail!("{} migrate failed: {status}", binary.display());
    }
    Ok(())
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

async fn run(mut args: Args) -> anyhow::Result<Report> {
    if args.quick {
        args.clients = vec![4];
        args.ids = vec![200];
        args.duration = Duration::from_secs(1);
        args.warmup = Duration::from_millis(300);
        args.watchers = 50;
        args.write_rate = 50;
        args.watch_duration = Duration::from_secs(2);
        args.history = 2_000;
        args.query_users = Some(5_000);
        args.page_sizes = vec![10, 1000];
        args.paging_passes = 1;
        args.schema_docs = vec![2_000];
        args.history_writes = 300;
        args.transaction_rounds = 2;
        args.relay_rates = vec![200];
        args.relay_duration = Duration::from_secs(1);
        args.webhook_backlog = 200;
        args.webhook_duration = Duration::from_secs(1);
    }
    let mut workloads: Vec<Workload> = args
        .workloads
        .iter()
        .filter_map(|w| match w.as_str() {
            "merge" => Some(Workload::Merge),
            "merge2" => Some(Workload::Merge2),
            "ping" => Some(Workload::Ping),
            "get" => Some(Workload::Get),
            "mix" => Some(Workload::Mix),
            _ => None,
        })
        .collect();
    // merge2 is read against merge, get against ping: measure those first.
    workloads.sort_by_key(|w| match w {
        Workload::Merge => 0,
        Workload::Merge2 => 1,
        Workload::Ping => 2,
        Workload::Get => 3,
        Workload::Mix => 4,
    });
    workloads.dedup();
    if args.backend != Backend::Postgres && workloads.contains(&Workload::Merge2) {
        workloads.retain(|w| *w != Workload::Merge2);
        if !args.json {
            eprintln!("merge2: two replicas need a shared database server (Postgres); skipped");
        }
    }
    let watch = args.workloads.iter().any(|w| w == "watch");
    let watch_filter = args.workloads.iter().any(|w| w == "watch-filter");
    let list = args.workloads.iter().any(|w| w == "list");
    let batchget = args.workloads.iter().any(|w| w == "batchget");
    let with_etcd = args.workloads.iter().any(|w| w == "etcd");
    let interfere = args.workloads.iter().any(|w| w == "interference");
    let schema_merges = args.workloads.iter().any(|w| w == "schema");
    let set_schema = args.workloads.iter().any(|w| w == "set-schema");
    let history = args.workloads.iter().any(|w| w == "history");
    let transactions = args.workloads.iter().any(|w| w == "transactions");
    let grpc_web = args.workloads.iter().any(|w| w == "grpc-web");
    let relay = args.workloads.iter().any(|w| w == "relay");
    let webhooks = args.workloads.iter().any(|w| w == "webhooks");
    let binary = match &args.server_bin {
        Some(path) => path.clone(),
        None => process::sibling_binary()?,
    };
    let backend = args.backend;
    let db = BenchDb::create(backend, &args.postgres_url).await?;
    let server_args: Vec<String> = ["--db-max-connections".to_string(), args.pool.to_string()]
        .into_iter()
        .chain(args.server_arg.iter().cloned())
        .collect();
    let mut report = Report {
        server: binary.display().to_string(),
        ..Report::default()
    };
    // The pgbench floor of the Postgres merge (pgbench.rs): without pgbench
    // its rows are skipped, never the run.
    let pgbench = if backend == Backend::Postgres && workloads.contains(&Workload::Merge) {
        match pgbench::locate().await {
            Ok(pgbench) => {
                report.pgbench = Some(pgbench::PgbenchInfo::of(&pgbench));
                Some(pgbench)
            }
            Err(why) => {
                if !args.json {
                    eprintln!("pgbench: skipped ({why})");
                }
                report.pgbench = Some(pgbench::PgbenchInfo::skipped(why));
                None
            }
        }
    } else {
        None
    };
    let result = async {
        for (round, &ids) in args.ids.iter().enumerate() {
            if workloads.is_empty() && !watch && !watch_filter {
                break;
            }
            migrate(&binary, db.url()).await?;
            db.seed(ids).await.context("seeding")?;
            let server =
                ServerProcess::start(&binary, db.url(), &server_args, &args.server_env).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            if round == 0 {
                report.idle_rss_mb = Some(mb(server.usage()?.rss_bytes));
            }
            let pool = db.pool(args.pool).await?;
            for &clients in &args.clients {
                let channels = connections(&server, clients).await?;
                for &workload in &workloads {
                    if workload == Workload::Merge2 {
                        // A second server on the same database, started
                        // for this run only (so that it does not share the
                        // machine with the other rows); every other
                        // client's connection goes to it.
                        let replica =
                            ServerProcess::start(&binary, db.url(), &server_args, &args.server_env)
                                .await?;
                        let mut spread = Vec::with_capacity(clients);
                        for (n, channel) in channels.iter().enumerate() {
                            spread.push(match n % 2 {
                                0 => channel.clone(),
                                _ => process::channel(replica.addr).await?,
                            });
                        }
                        load::service(spread.clone(), workload, clients, ids, args.warmup).await;
                        let before = [server.usage()?, replica.usage()?];
                        let service =
                            load::service(spread, workload, clients, ids, args.duration).await;
                        let after = [server.usage()?, replica.usage()?];
                        replica.stop().await?;
                        check(&service, "service on two replicas")?;
                        let mut both = row(backend, ids, clients, workload, "service", &service);
                        both.server_cpu_cores = Some(
                            cpu_cores(before[0], after[0], service.elapsed)
                                + cpu_cores(before[1], after[1], service.elapsed),
                        );
                        both.server_rss_mb = Some(mb(after[0].rss_bytes + after[1].rss_bytes));
                        let merge = |target| {
                            find(&report.load, ids, clients, "merge", target)
                                .map(|r| service.throughput() / r.ops_per_second)
                        };
                        both.ratio = merge("raw-sql");
                        both.ratio_to_one_replica = merge("service");
                        progress(&both, args.json);
                        report.load.push(both);
                        continue;
                    }
                    load::service(channels.clone(), workload, clients, ids, args.warmup).await;
                    let before = server.usage()?;
                    let service =
                        load::service(channels.clone(), workload, clients, ids, args.duration)
                            .await;
                    let after = server.usage()?;
                    check(&service, "service")?;
                    let (warmup, duration) = (args.warmup, args.duration);
                    let raw = |notify| {
                        let pool = pool.clone();
                        async move {
                            load::raw(pool.clone(), workload, clients, ids, warmup, notify).await;
                            load::raw(pool, workload, clients, ids, duration, notify).await
                        }
                    };
                    let floor = raw(false).await;
                    check(&floor, "raw SQL")?;
                    // Only where the service's writers once notified in
                    // the transaction: Postgres merges.
                    let notified = if workload == Workload::Merge && backend == Backend::Postgres {
                        let notified = raw(true).await;
                        check(&notified, "raw SQL with pg_notify")?;
                        Some(notified)
                    } else {
                        None
                    };
                    // Right after the raw-sql rows, in the same minute.
                    let pgbench_run = match (&pgbench, &pool) {
                        (Some(pgbench), db::RawPool::Postgres(pg))
                            if workload == Workload::Merge =>
                        {
                            Some(
                                pgbench
                                    .merge(db.url(), pg, ids, clients, args.pool, warmup, duration)
                                    .await?,
                            )
                        }
                        _ => None,
                    };
                    let mut service_row = row(backend, ids, clients, workload, "service", &service);
                    service_row.ratio = Some(service.throughput() / floor.throughput());
                    service_row.ratio_to_pgbench = pgbench_run
                        .as_ref()
                        .map(|run| service.throughput() / run.tps);
                    service_row.server_cpu_cores = Some(cpu_cores(before, after, service.elapsed));
                    service_row.server_rss_mb = Some(mb(after.rss_bytes));
                    if workload == Workload::Get
                        && let Some(ping) = find(&report.load, ids, clients, "ping", "service")
                    {
                        // A Get is a gRPC call plus a point select: were
                        // their costs simply added, per call and on the
                        // same two cores, this is the rate they'd allow.
                        let bound = 1.0 / (1.0 / ping.ops_per_second + 1.0 / floor.throughput());
                        service_row.bound_ops_per_second = Some(bound);
                        service_row.ratio_to_bound = Some(service.throughput() / bound);
                        service_row.bound_p50_ms = ping
                            .p50_ms
                            .map(|p50| p50 + ms(floor.latency.value_at_quantile(0.5)));
                    }
                    progress(&service_row, args.json);
                    report.load.push(service_row);
                    report
                        .load
                        .push(row(backend, ids, clients, workload, "raw-sql", &floor));
                    if let Some(notified) = notified {
                        let mut notify_row =
                            row(backend, ids, clients, workload, "raw-sql+notify", &notified);
                        notify_row.ratio = Some(notified.throughput() / floor.throughput());
                        report.load.push(notify_row);
                    }
                    if let Some(run) = pgbench_run {
                        let pgbench_row = pgbench_row(backend, ids, clients, run, &floor);
                        if !args.json {
                            eprintln!(
                                "  {} ids={} clients={} merge pgbench: {:.0} tps (x{:.2} of raw SQL; service x{:.2} of pgbench)",
                                pgbench_row.backend,
                                ids,
                                clients,
                                pgbench_row.ops_per_second,
                                pgbench_row.ratio.unwrap_or(f64::NAN),
                                service.throughput() / pgbench_row.ops_per_second
                            );
                        }
                        report.load.push(pgbench_row);
                    }
                }
            }
            pool.close().await;
            if (watch || watch_filter) && round == 0 {
                // One replica, then (Postgres) subscribers on a second
                // replica, started for these runs only; unfiltered and
                // filtered side by side.
                let replicas = if backend == Backend::Postgres { 2 } else { 1 };
                for n in 1..=replicas {
                    let replica = match n {
                        1 => None,
                        _ => Some(
                            ServerProcess::start(&binary, db.url(), &server_args, &args.server_env)
                                .await?,
                        ),
                    };
                    let servers: Vec<&ServerProcess> =
                        std::iter::once(&server).chain(replica.as_ref()).collect();
                    if watch {
                        report.watch.push(fan_out(&args, &servers, ids).await?);
                    }
                    if watch_filter {
                        report
                            .watch
                            .push(fan_out_filtered(&args, &servers, ids).await?);
                    }
                    if let Some(replica) = replica {
                        replica.stop().await?;
                    }
                }
            }
            server.stop().await?;
        }
        if list || batchget {
            // A server of its own on a table of --query-users users.
            let users = args.query_users.unwrap_or(match backend {
                Backend::Postgres => 1_000_000,
                Backend::Sqlite => 100_000,
            });
            migrate(&binary, db.url()).await?;
            let seeding = std::time::Instant::now();
            db.seed_users(users).await.context("seeding users")?;
            if !args.json {
                eprintln!(
                    "  {} users seeded in {:.1} s",
                    users,
                    seeding.elapsed().as_secs_f64()
                );
            }
            let server =
                ServerProcess::start(&binary, db.url(), &server_args, &args.server_env).await?;
            let settings = query::Settings {
                backend,
                users,
                clients: args.clients.clone(),
                warmup: args.warmup,
                duration: args.duration,
                list,
                batchget,
                page_size: args.list_page_size,
                page_sizes: args.page_sizes.clone(),
                passes: args.paging_passes,
                batch: args.batch_size,
                progress: !args.json,
            };
            let queries = query::run(&db, &server, &settings, args.pool).await;
            server.stop().await?;
            report.queries = Some(queries?);
        }
        if with_etcd {
            let settings = etcd::Settings {
                ids: args.ids.clone(),
                clients: args.clients.clone(),
                warmup: args.warmup,
                duration: args.duration,
                watchers: args.watchers,
                write_rate: args.write_rate,
                watch_duration: args.watch_duration,
                progress: !args.json,
            };
            let mut etcd = etcd::run(&settings).await?;
            for row in &mut etcd.load {
                let service = find(
                    &report.load,
                    row.ids,
                    row.clients,
                    row.counterpart(),
                    "service",
                );
                row.service_ops_per_second = service.map(|s| s.ops_per_second);
                row.service_ratio = service.map(|s| s.ops_per_second / row.ops_per_second);
                // Also on the service merge row, so that its ratios to
                // every floor of the run are read in one place.
                if row.workload == "rmw"
                    && let Some(merge) = report.load.iter_mut().find(|r| {
                        r.ids == row.ids
                            && r.clients == row.clients
                            && r.workload == "merge"
                            && r.target == "service"
                    })
                {
                    merge.ratio_to_etcd_rmw = Some(merge.ops_per_second / row.ops_per_second);
                }
            }
            report.etcd = Some(etcd);
        }
        if interfere {
            // A server of its own, started after the history is in place
            // (its event dispatcher starts from the newest revision).
            let ids = args.ids[0];
            migrate(&binary, db.url()).await?;
            db.seed(ids).await.context("seeding")?;
            db.seed_history(args.history, ids, interference::MARK_EVERY)
                .await
                .context("seeding the event history")?;
            let server =
                ServerProcess::start(&binary, db.url(), &server_args, &args.server_env).await?;
            let settings = interference::Settings {
                clients: args.clients[0],
                ids,
                warmup: args.warmup,
                duration: args.duration,
                history: args.history,
                replay_streams: args.replay_streams,
                big_writers: args.big_writers,
                big_patch_bytes: args.big_patch_bytes,
                big_rate: (args.big_rate > 0.0).then_some(args.big_rate),
            };
            let rows = interference::run(backend.name(), &server, &settings, !args.json).await;
            server.stop().await?;
            report.interference = rows?;
        }
        if schema_merges || set_schema {
            let settings = schema::Settings {
                backend,
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                clients: args.clients.clone(),
                ids: args.ids[0],
                warmup: args.warmup,
                duration: args.duration,
                rounds: args.schema_rounds,
                merges: schema_merges,
                set_schema_docs: if set_schema {
                    args.schema_docs.clone()
                } else {
                    Vec::new()
                },
                validator_time: Duration::from_millis(if args.quick { 100 } else { 1000 }),
                progress: !args.json,
            };
            report.schema = Some(schema::run(&db, &settings).await?);
        }
        if history {
            let settings = history::Settings {
                backend,
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                writes: args.history_writes,
                rounds: args.history_rounds,
                // Quick: its seven arms in about 5 s.
                warmup: if args.quick {
                    args.warmup / 3
                } else {
                    args.warmup
                },
                duration: if args.quick {
                    args.duration / 2
                } else {
                    args.duration
                },
                progress: !args.json,
            };
            report.history = Some(history::run(&db, &settings).await?);
        }
        if transactions {
            let settings = transactions::Settings {
                backend,
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                clients: args.clients.iter().copied().max().unwrap_or(16),
                rounds: args.transaction_rounds,
                // Quick: its four arms in about 3 s.
                warmup: if args.quick {
                    args.warmup / 3
                } else {
                    args.warmup
                },
                duration: if args.quick {
                    args.duration / 2
                } else {
                    args.duration
                },
                progress: !args.json,
            };
            report.transactions = Some(transactions::run(&db, &settings).await?);
        }
        if grpc_web {
            let settings = grpc_web::Settings {
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                clients: args.clients.iter().copied().max().unwrap_or(16),
                rounds: args.transaction_rounds,
                warmup: args.warmup,
                duration: args.duration,
                progress: !args.json,
            };
            report.grpc_web = Some(grpc_web::run(&db, &settings).await?);
        }
        if relay {
            let settings = relay::Settings {
                backend,
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                nats_url: args.nats_url.clone(),
                clients: args.clients.iter().copied().max().unwrap_or(16),
                ids: args.ids[0],
                warmup: args.warmup,
                duration: args.duration,
                rates: args.relay_rates.clone(),
                rate_duration: args.relay_duration,
                progress: !args.json,
            };
            report.relay = Some(relay::run(&db, &settings).await?);
        }
        if webhooks {
            let settings = webhooks::Settings {
                backend,
                binary: &binary,
                server_args: &server_args,
                server_env: &args.server_env,
                ids: args.ids[0],
                backlog: args.webhook_backlog,
                rate: args.webhook_rate,
                rate_duration: args.webhook_duration,
                progress: !args.json,
            };
            report.webhooks = Some(webhooks::run(&db, &settings).await?);
        }
        anyhow::Ok(())
    }
    .await;
    db.drop_database().await?;
    result?;
    Ok(report)
}

/// Subscribers on the last of `servers`, writes through the first.
async fn fan_out(args: &Args, servers: &[&ServerProcess], ids: u64) -> anyhow::Result<WatchRow> {
    let watched = servers.last().unwrap();
    let subscribers = watch::subscribe(&[watched.addr], args.watchers).await?;
    let rss = watched.usage()?.rss_bytes;
    let written = watch::write(servers[0].addr, args.write_rate, args.watch_duration, ids).await?;
    let outcome = subscribers
        .finish(&written.revisions, Duration::from_secs(30))
        .await?;
    let q = |q: f64| ms(outcome.latency.value_at_quantile(q));
    let row = WatchRow {
        backend: args.backend.name(),
        replicas: servers.len(),
        subscribers: outcome.subscribers,
        filter: None,
        write_rate: args.write_rate,
        writes: outcome.writes,
        failed_writes: written.failed,
        expected: outcome.expected,
        delivered: outcome.delivered,
        missed: outcome.missed,
        disordered: outcome.disordered,
        unexpected: outcome.unexpected,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: ms(outcome.latency.max()),
        server_rss_mb: mb(rss),
    };
    if !args.json {
        eprintln!(
            "  watch on {} replica(s): {} writes, {} failed{}",
            servers.len(),
            row.writes,
            row.failed_writes,
            written
                .first_error
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    Ok(row)
}

/// [`fan_out`] with a filter on each subscriber (watch_filter.rs).
async fn fan_out_filtered(
    args: &Args,
    servers: &[&ServerProcess],
    ids: u64,
) -> anyhow::Result<WatchRow> {
    let watched = servers.last().unwrap();
    let groups = args.watch_groups.max(1);
    let filtered = watch_filter::open(watched.addr, args.watchers, groups).await?;
    let rss = watched.usage()?.rss_bytes;
    let (outcome, written) = filtered
        .run(servers[0].addr, args.write_rate, args.watch_duration, ids)
        .await?;
    let q = |q: f64| ms(outcome.latency.value_at_quantile(q));
    let row = WatchRow {
        backend: args.backend.name(),
        replicas: servers.len(),
        subscribers: outcome.subscribers,
        filter: Some(watch_filter::describe(groups)),
        write_rate: args.write_rate,
        writes: outcome.writes,
        failed_writes: written.failed,
        expected: outcome.expected,
        delivered: outcome.delivered,
        missed: outcome.missed,
        disordered: outcome.disordered,
        unexpected: outcome.unexpected,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: ms(outcome.latency.max()),
        server_rss_mb: mb(rss),
    };
    if !args.json {
        eprintln!(
            "  filtered watch on {} replica(s): {} writes, {} failed{}; {} of {} owed deliveries, p99 {:.2} ms",
            servers.len(),
            row.writes,
            row.failed_writes,
            written
                .first_error
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            row.delivered,
            row.expected,
            row.p99_ms
        );
    }
    Ok(row)
}

fn cpu_cores(before: Usage, after: Usage, elapsed: Duration) -> f64 {
    (after.cpu_seconds - before.cpu_seconds) / elapsed.as_secs_f64()
}

fn progress(row: &LoadRow, json: bool) {
    if !json {
        eprintln!(
            "  {} ids={} clients={} {}: {:.0} ops/s (x{:.2} of raw SQL)",
            row.backend,
            row.ids,
            row.clients,
            row.workload,
            row.ops_per_second,
            row.ratio.unwrap_or(f64::NAN)
        );
    }
}

fn print_table(report: &Report) {
    if let Some(idle) = report.idle_rss_mb {
        println!("server idle RSS: {idle:.1} MB\n");
    }
    if !report.load.is_empty() {
        print_load(report);
    }
    if !report.watch.is_empty() {
        print_watch(&report.watch);
    }
    if let Some(queries) = &report.queries {
        query::print(queries);
    }
    if let Some(etcd) = &report.etcd {
        etcd::print(etcd);
    }
    if !report.interference.is_empty() {
        print_interference(report);
    }
    if let Some(schema) = &report.schema {
        schema::print(schema);
    }
    if let Some(history) = &report.history {
        history::print(history);
    }
    if let Some(grpc_web) = &report.grpc_web {
        grpc_web::print(grpc_web);
    }
    if let Some(transactions) = &report.transactions {
        transactions::print(transactions);
    }
    if let Some(relay) = &report.relay {
        relay::print(relay);
    }
    if let Some(webhooks) = &report.webhooks {
        webhooks::print(webhooks);
    }
}

fn print_load(report: &Report) {
    println!(
        "{:<9} {:>8} {:>7} {:<6} {:<14} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>5} {:>7}  note",
        "backend",
        "ids",
        "clients",
        "load",
        "target",
        "ops/s",
        "p50ms",
        "p95ms",
        "p99ms",
        "maxms",
        "ratio",
        "cpu",
        "rss MB"
    );
    let percent = |x: Option<f64>| x.map_or(String::new(), |x| format!("{:.0}%", x * 100.0));
    let millis = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.2}"));
    for r in &report.load {
        let mut notes = Vec::new();
        if let Some(x) = r.ratio_to_one_replica {
            notes.push(format!("{:.0}% of merge on 1 replica", x * 100.0));
        }
        if let Some(bound) = r.bound_ops_per_second {
            notes.push(format!(
                "{:.0}% of bound {bound:.0}/s (ping + raw-sql get; p50 {:.2} ms)",
                r.ratio_to_bound.unwrap_or(f64::NAN) * 100.0,
                r.bound_p50_ms.unwrap_or(f64::NAN)
            ));
        }
        if let Some(x) = r.ratio_to_pgbench {
            notes.push(format!("{:.0}% of pgbench", x * 100.0));
        }
        if let Some(x) = r.ratio_to_etcd_rmw {
            notes.push(format!("{:.0}% of etcd rmw", x * 100.0));
        }
        if let Some(args) = &r.pgbench_args {
            notes.push(format!(
                "avg {} ms (pgbench gives no percentiles); {args}",
                millis(r.latency_avg_ms)
            ));
        }
        let note = notes.join("; ");
        println!(
            "{:<9} {:>8} {:>7} {:<6} {:<14} {:>9.0} {:>7} {:>7} {:>7} {:>8} {:>6} {:>5} {:>7}  {}",
            r.backend,
            r.ids,
            r.clients,
            r.workload,
            r.target,
            r.ops_per_second,
            millis(r.p50_ms),
            millis(r.p95_ms),
            millis(r.p99_ms),
            millis(r.max_ms),
            percent(r.ratio),
            r.server_cpu_cores
                .map_or(String::new(), |x| format!("{x:.2}")),
            r.server_rss_mb.map_or(String::new(), |x| format!("{x:.1}")),
            note
        );
    }
    match &report.pgbench {
        Some(pgbench::PgbenchInfo {
            skipped: Some(why), ..
        }) => println!("pgbench: skipped ({why})"),
        Some(info) => println!(
            "pgbench rows: {}, {} (script: --json, \"pgbench\")",
            info.version.as_deref().unwrap_or("?"),
            info.command.as_deref().unwrap_or("?")
        ),
        None => {}
    }
}

fn print_watch(rows: &[WatchRow]) {
    println!(
        "\n{:<9} {:>8} {:>11} {:>7} {:>7} {:>10} {:>10} {:>6} {:>10} {:>10} {:>7} {:>7} {:>7} {:>7}  filter",
        "backend",
        "replicas",
        "subscribers",
        "rate/s",
        "writes",
        "owed",
        "delivered",
        "missed",
        "disordered",
        "unexpected",
        "p50ms",
        "p99ms",
        "maxms",
        "rss MB"
    );
    for w in rows {
        println!(
            "{:<9} {:>8} {:>11} {:>7} {:>7} {:>10} {:>10} {:>6} {:>10} {:>10} {:>7.2} {:>7.2} {:>7.2} {:>7.1}  {}",
            w.backend,
            w.replicas,
            w.subscribers,
            w.write_rate,
            w.writes,
            w.expected,
            w.delivered,
            w.missed,
            w.disordered,
            w.unexpected,
            w.p50_ms,
            w.p99_ms,
            w.max_ms,
            w.server_rss_mb,
            w.filter.as_deref().unwrap_or("-")
        );
    }
}

fn print_interference(report: &Report) {
    println!(
        "\nsmall merges (3 keys, closed loop) next to other load; server: {}",
        report.server
    );
    println!(
        "{:<9} {:>7} {:<11} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>6} {:>5} {:>5}  background",
        "backend",
        "clients",
        "condition",
        "ops/s",
        "p50ms",
        "p95ms",
        "p99ms",
        "maxms",
        "p99/alone",
        "errors",
        "cpu",
        "bench"
    );
    for r in &report.interference {
        println!(
            "{:<9} {:>7} {:<11} {:>7.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>9.2} {:>6} {:>5.2} {:>5.2}  {}",
            r.backend,
            r.clients,
            r.condition,
            r.ops_per_second,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.p99_vs_alone,
            r.errors,
            r.server_cpu_cores,
            r.bench_cpu_cores,
            r.background()
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    match run(args).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
            } else {
                print_table(&report);
            }
            let lost: u64 = report
                .watch
                .iter()
                .map(|w| w.missed + w.disordered + w.unexpected + w.failed_writes)
                .sum();
            if lost > 0 {
                eprintln!(
                    "error: {lost} Watch deliveries missed or out of order, or writes failed"
                );
                return ExitCode::FAILURE;
            }
            // etcd's losses are etcd's: worth seeing, not failing the run.
            let etcd_lost = report.etcd.as_ref().map_or(0, |e| e.lost());
            if etcd_lost > 0 {
                eprintln!(
                    "warning: etcd: {etcd_lost} Watch deliveries missed or out of order, or writes failed"
                );
            }
            let failed: u64 = report
                .interference
                .iter()
                .map(|r| r.errors + r.replay.as_ref().map_or(0, |x| x.stream_errors))
                .sum();
            if failed > 0 {
                eprintln!(
                    "error: {failed} small Merges or replaying streams failed (interference)"
                );
                return ExitCode::FAILURE;
            }
            let webhook_faults = report.webhooks.as_ref().map_or(0, |r| r.faults());
            if webhook_faults > 0 {
                eprintln!(
                    "error: webhooks: {webhook_faults} revisions missed, repeated, out of order or unknown"
                );
                return ExitCode::FAILURE;
            }
            let relay_faults = report.relay.as_ref().map_or(0, |r| r.faults());
            if relay_faults > 0 {
                eprintln!(
                    "error: relay: {relay_faults} revisions missed, repeated, out of order or unknown, or messages malformed"
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
