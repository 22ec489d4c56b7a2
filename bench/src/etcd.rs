//! etcd 3.4 side by side (workload `etcd`): the same documents, clients and
//! Watch load against a single-node etcd, so the service's numbers can be
//! read next to a store built for exactly this (compare-and-swap writes,
//! linearizable reads, watches), on the same machine in the same run.
//!
//! - The `etcd` on PATH runs as a child process on free loopback ports with
//!   a temporary data dir, one per --ids value, seeded with the bench's
//!   ids as JSON documents shaped like the service's stored records.
//! - rmw: Get the document, change the 3 keys of a Merge patch, and Put it
//!   back in a Txn that compares the key's mod_revision (retried when
//!   another client got there first): the read-modify-write a client of
//!   etcd writes to do what the service's Merge does.
//! - get / get-serializable: a linearizable Get (through the leader's read
//!   index) and a serializable one (the member's local state), the value
//!   decoded as JSON as the raw-SQL Get decodes its columns.
//! - Watch: the service's fan-out (--watchers, --write-rate,
//!   --watch-duration), each subscriber watching the documents' prefix,
//!   with the same accounting (watch.rs). etcd events carry no commit time,
//!   so each written document holds the time it was sent in `updated_at`,
//!   and latency runs from then (the service's runs from a timestamp taken
//!   inside its transaction: etcd's includes the request's way in).
//!
//! etcd-client's build runs protoc, so this is built only with the cargo
//! feature `bench-etcd`; without it the rows are skipped with a message.

use std::time::Duration;

use serde::Serialize;

use crate::WatchRow;

/// What the etcd part runs: the settings of the service's runs.
// Built without etcd, the bench fills these in and skips.
#[cfg_attr(not(feature = "bench-etcd"), allow(dead_code))]
pub struct Settings {
    pub ids: Vec<u64>,
    pub clients: Vec<usize>,
    pub warmup: Duration,
    pub duration: Duration,
    pub watchers: usize,
    pub write_rate: u32,
    pub watch_duration: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct EtcdRow {
    pub ids: u64,
    pub clients: usize,
    /// "rmw", "get" (linearizable) or "get-serializable".
    pub workload: &'static str,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// rmw: compare failures, each followed by a new Get and Txn.
    pub retries: Option<u64>,
    pub ops_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub etcd_cpu_cores: f64,
    pub etcd_rss_mb: f64,
    /// The service's throughput on the matching workload (merge for rmw,
    /// get for the Gets) at the same ids and clients, in this run.
    pub service_ops_per_second: Option<f64>,
    /// Service / etcd throughput.
    pub service_ratio: Option<f64>,
}

impl EtcdRow {
    /// The service workload this row stands next to.
    pub fn counterpart(&self) -> &'static str {
        if self.workload == "rmw" {
            "merge"
        } else {
            "get"
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct EtcdReport {
    /// Why nothing was measured (not installed, not built in).
    pub skipped: Option<String>,
    /// The version etcd reported.
    pub version: Option<String>,
    pub load: Vec<EtcdRow>,
    pub watch: Option<WatchRow>,
}

impl EtcdReport {
    fn skipped(why: String) -> EtcdReport {
        EtcdReport {
            skipped: Some(why),
            ..EtcdReport::default()
        }
    }

    /// Deliveries etcd missed or disordered: reported, not held against
    /// the run (they are etcd's, not the service's).
    pub fn lost(&self) -> u64 {
        self.watch.as_ref().map_or(0, |w| {
            w.missed + w.disordered + w.unexpected + w.failed_writes
        })
    }
}

pub fn print(report: &EtcdReport) {
    if let Some(why) = &report.skipped {
        println!("\netcd: skipped ({why})");
        return;
    }
    println!(
        "\netcd {} (single node, same machine; ratio: service / etcd at the same ids and clients)",
        report.version.as_deref().unwrap_or("?")
    );
    println!(
        "{:<9} {:>8} {:>7} {:<16} {:>9} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>5} {:>7}",
        "store",
        "ids",
        "clients",
        "load",
        "ops/s",
        "p50ms",
        "p95ms",
        "p99ms",
        "maxms",
        "retries",
        "errors",
        "ratio",
        "cpu",
        "rss MB"
    );
    for r in &report.load {
        println!(
            "{:<9} {:>8} {:>7} {:<16} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>7} {:>6} {:>6} {:>5.2} {:>7.1}",
            "etcd",
            r.ids,
            r.clients,
            r.workload,
            r.ops_per_second,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.retries.map_or(String::new(), |n| n.to_string()),
            r.errors,
            r.service_ratio
                .map_or(String::new(), |x| format!("{:.0}%", x * 100.0)),
            r.etcd_cpu_cores,
            r.etcd_rss_mb,
        );
    }
    if let Some(watch) = &report.watch {
        crate::print_watch(std::slice::from_ref(watch));
    }
}

#[cfg(not(feature = "bench-etcd"))]
pub async fn run(_: &Settings) -> anyhow::Result<EtcdReport> {
    Ok(EtcdReport::skipped(
        "etcd support not built in: build the bench with --features bench-etcd \
         (etcd-client's build needs protoc)"
            .into(),
    ))
}

#[cfg(feature = "bench-etcd")]
pub use measure::run;

#[cfg(feature = "bench-etcd")]
mod measure {
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant, SystemTime};

    use anyhow::{Context, bail};
    use etcd_client::{
        Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, WatchOptions,
    };
    use rand::Rng;
    use serde_json::Value;
    use tokio::process::{Child, Command};
    use tokio_stream::StreamExt;

    use super::{EtcdReport, EtcdRow, Settings};
    use crate::db::{SEED_PUBLIC, id};
    use crate::load::{self, Measured};
    use crate::process::{Usage, free_port};
    use crate::watch::{self, Delivery, STREAMS_PER_CONNECTION, Subscribers};
    use crate::{WatchRow, cpu_cores, mb, ms};

    /// Where the documents live; subscribers watch this prefix.
    const PREFIX: &str = "bench/users/";

    /// Puts per seeding Txn (etcd refuses more than 128 operations in one).
    const SEED_BATCH: u64 = 100;

    fn key(n: u64) -> String {
        format!("{PREFIX}{}", id(n))
    }

    fn now_text() -> String {
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
    }

    /// A document as the service stores a record (load.rs's snapshot).
    fn document(public: &Value, version: i64, created: &str, updated: &str) -> Vec<u8> {
        load::snapshot(public, version, 0, created, updated)
            .to_string()
            .into_bytes()
    }

    #[derive(Clone, Copy)]
    enum Op {
        ReadModifyWrite,
        Get,
        SerializableGet,
    }

    impl Op {
        fn name(self) -> &'static str {
            match self {
                Op::ReadModifyWrite => "rmw",
                Op::Get => "get",
                Op::SerializableGet => "get-serializable",
            }
        }
    }

    struct EtcdProcess {
        child: Child,
        pid: u32,
        endpoint: String,
        dir: tempfile::TempDir,
    }

    fn on_path(name: &str) -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    }

    impl EtcdProcess {
        /// Starts etcd and returns once it answers, with its version.
        async fn start(binary: &Path) -> anyhow::Result<(EtcdProcess, String)> {
            let dir = tempfile::tempdir()?;
            let endpoint = format!("http://127.0.0.1:{}", free_port()?);
            let peer = format!("http://127.0.0.1:{}", free_port()?);
            let log = std::fs::File::create(dir.path().join("etcd.log"))?;
            let child = Command::new(binary)
                .arg("--name=bench")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=bench={peer}"))
                .args(["--initial-cluster-state=new", "--logger=zap"])
                .args(["--log-outputs=stderr", "--log-level=warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            let pid = child.id().context("etcd exited at once")?;
            let mut etcd = EtcdProcess {
                child,
                pid,
                endpoint,
                dir,
            };
            let version = etcd.wait_until_serving().await.map_err(|err| {
                let log =
                    std::fs::read_to_string(etcd.dir.path().join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                err.context(format!("etcd's log ends: {}", tail.join(" | ")))
            })?;
            Ok((etcd, version))
        }

        async fn wait_until_serving(&mut self) -> anyhow::Result<String> {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Some(status) = self.child.try_wait()? {
                    bail!("etcd exited during start-up: {status}");
                }
                if let Ok(mut client) = self.connect().await
                    && let Ok(status) = client.status().await
                    // A member answers status before it has a leader;
                    // the load needs one.
                    && status.leader() != 0
                {
                    return Ok(status.version().to_string());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bail!("etcd not serving within 30s")
        }

        /// A client on a connection of its own.
        async fn connect(&self) -> anyhow::Result<Client> {
            let options = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(30));
            Ok(Client::connect([&self.endpoint], Some(options)).await?)
        }

        fn usage(&self) -> anyhow::Result<Usage> {
            Usage::of(self.pid)
        }

        async fn stop(mut self) -> anyhow::Result<()> {
            self.child.kill().await?;
            Ok(())
        }
    }

    pub async fn run(settings: &Settings) -> anyhow::Result<EtcdReport> {
        let Some(binary) = on_path("etcd") else {
            return Ok(EtcdReport::skipped(
                "etcd not installed: no etcd on PATH (Debian: apt-get install etcd-server)".into(),
            ));
        };
        let mut report = EtcdReport::default();
        for (round, &ids) in settings.ids.iter().enumerate() {
            let (etcd, version) = EtcdProcess::start(&binary).await?;
            report.version = Some(version);
            let result = measure(&etcd, settings, ids, round == 0, &mut report).await;
            etcd.stop().await?;
            result?;
        }
        Ok(report)
    }

    async fn measure(
        etcd: &EtcdProcess,
        settings: &Settings,
        ids: u64,
        watch: bool,
        report: &mut EtcdReport,
    ) -> anyhow::Result<()> {
        seed(&etcd.connect().await?, ids)
            .await
            .context("seeding etcd")?;
        for &clients in &settings.clients {
            let mut kvs = Vec::with_capacity(clients);
            for _ in 0..clients {
                kvs.push(etcd.connect().await?.kv_client());
            }
            let kvs = Arc::new(kvs);
            for op in [Op::ReadModifyWrite, Op::Get, Op::SerializableGet] {
                let retries = Arc::new(AtomicU64::new(0));
                run_op(op, &kvs, clients, ids, settings.warmup, &retries).await;
                retries.store(0, Ordering::Relaxed);
                let before = etcd.usage()?;
                let m = run_op(op, &kvs, clients, ids, settings.duration, &retries).await;
                let after = etcd.usage()?;
                // Errors are etcd's to explain (and reported); a run with
                // no call through at all means the bench is broken.
                if m.ops == 0 {
                    bail!(
                        "etcd {}: no call succeeded ({} errors, first: {})",
                        op.name(),
                        m.errors,
                        m.first_error.as_deref().unwrap_or("none")
                    );
                }
                let row = etcd_row(op, ids, clients, &m, retries.load(Ordering::Relaxed));
                let row = EtcdRow {
                    etcd_cpu_cores: cpu_cores(before, after, m.elapsed),
                    etcd_rss_mb: mb(after.rss_bytes),
                    ..row
                };
                if settings.progress {
                    eprintln!(
                        "  etcd ids={ids} clients={clients} {}: {:.0} ops/s{}",
                        row.workload,
                        row.ops_per_second,
                        if row.errors > 0 {
                            format!(
                                ", {} errors (first: {})",
                                row.errors,
                                row.first_error.as_deref().unwrap_or("")
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                report.load.push(row);
            }
        }
        if watch {
            report.watch = Some(fan_out(etcd, settings, ids).await?);
        }
        Ok(())
    }

    fn etcd_row(op: Op, ids: u64, clients: usize, m: &Measured, retries: u64) -> EtcdRow {
        let q = |q: f64| ms(m.latency.value_at_quantile(q));
        EtcdRow {
            ids,
            clients,
            workload: op.name(),
            ops: m.ops,
            errors: m.errors,
            first_error: m.first_error.clone(),
            retries: matches!(op, Op::ReadModifyWrite).then_some(retries),
            ops_per_second: m.throughput(),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            max_ms: ms(m.latency.max()),
            etcd_cpu_cores: 0.0,
            etcd_rss_mb: 0.0,
            service_ops_per_second: None,
            service_ratio: None,
        }
    }

    /// The bench's ids, each a document holding [`SEED_PUBLIC`], in Txns
    /// of [`SEED_BATCH`] from a few concurrent writers.
    async fn seed(client: &Client, ids: u64) -> anyhow::Result<()> {
        const WRITERS: u64 = 8;
        let public: Value = serde_json::from_str(SEED_PUBLIC)?;
        let now = now_text();
        let value = document(&public, 1, &now, &now);
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let mut kv = client.kv_client();
                let value = value.clone();
                tokio::spawn(async move {
                    let mut first = writer * SEED_BATCH;
                    while first < ids {
                        let puts: Vec<TxnOp> = (first..(first + SEED_BATCH).min(ids))
                            .map(|n| TxnOp::put(key(n), value.clone(), None))
                            .collect();
                        kv.txn(Txn::new().and_then(puts)).await?;
                        first += WRITERS * SEED_BATCH;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for writer in writers {
            writer.await??;
        }
        Ok(())
    }

    async fn run_op(
        op: Op,
        kvs: &Arc<Vec<KvClient>>,
        clients: usize,
        ids: u64,
        duration: Duration,
        retries: &Arc<AtomicU64>,
    ) -> Measured {
        let (kvs, retries) = (kvs.clone(), retries.clone());
        load::closed_loop(clients, duration, move |client, rng| {
            let mut kv = kvs[client % kvs.len()].clone();
            let key = key(rng.random_range(0..ids));
            let fields = load::patch(rng);
            let retries = retries.clone();
            async move {
                match op {
                    Op::ReadModifyWrite => {
                        read_modify_write(&mut kv, &key, &fields, &retries).await
                    }
                    Op::Get => get(&mut kv, &key, None).await,
                    Op::SerializableGet => {
                        get(&mut kv, &key, Some(GetOptions::new().with_serializable())).await
                    }
                }
            }
        })
        .await
    }

    async fn get(kv: &mut KvClient, key: &str, options: Option<GetOptions>) -> Result<(), String> {
        let got = kv.get(key, options).await.map_err(|e| e.to_string())?;
        let stored = got.kvs().first().ok_or("key missing")?;
        serde_json::from_slice::<Value>(stored.value()).map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn read_modify_write(
        kv: &mut KvClient,
        key: &str,
        fields: &[(String, i64); 3],
        retries: &AtomicU64,
    ) -> Result<(), String> {
        let error = |e: etcd_client::Error| e.to_string();
        loop {
            let got = kv.get(key, None).await.map_err(error)?;
            let stored = got.kvs().first().ok_or("key missing")?;
            let mut doc: Value =
                serde_json::from_slice(stored.value()).map_err(|e| e.to_string())?;
            let public = doc["public_metadata"].take();
            doc["public_metadata"] = load::merged(public, fields);
            doc["version"] = (doc["version"].as_i64().unwrap_or(0) + 1).into();
            doc["updated_at"] = now_text().into();
            let put = Txn::new()
                .when([Compare::mod_revision(
                    key,
                    CompareOp::Equal,
                    stored.mod_revision(),
                )])
                .and_then([TxnOp::put(key, doc.to_string(), None)]);
            if kv.txn(put).await.map_err(error)?.succeeded() {
                return Ok(());
            }
            retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When a watched document was sent (its `updated_at`).
    fn sent_at(value: &[u8]) -> Option<SystemTime> {
        let doc: Value = serde_json::from_slice(value).ok()?;
        let at = chrono::DateTime::parse_from_rfc3339(doc.get("updated_at")?.as_str()?).ok()?;
        Some(at.into())
    }

    /// The service's Watch fan-out, against etcd.
    async fn fan_out(
        etcd: &EtcdProcess,
        settings: &Settings,
        ids: u64,
    ) -> anyhow::Result<WatchRow> {
        let mut clients = Vec::new();
        for _ in 0..settings.watchers.div_ceil(STREAMS_PER_CONNECTION) {
            clients.push(etcd.connect().await?);
        }
        let subscribers = Subscribers::spawn(settings.watchers, |n, ready, last| {
            let mut client = clients[n / STREAMS_PER_CONNECTION].watch_client();
            async move {
                let mut stream = client
                    .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                    .await
                    .context("Watch refused")?;
                let first = stream.message().await?.context("stream ended at once")?;
                if !first.created() {
                    bail!("the first message does not confirm the watch");
                }
                ready.done();
                let deliveries = stream.map(|response| {
                    let response = response?;
                    if response.canceled() {
                        bail!("watch canceled: {}", response.cancel_reason());
                    }
                    Ok(response
                        .events()
                        .iter()
                        .filter_map(|event| event.kv())
                        .map(|kv| Delivery {
                            revision: kv.mod_revision() as u64,
                            committed: sent_at(kv.value()),
                        })
                        .collect())
                });
                watch::receive(last, deliveries).await
            }
        })
        .await?;
        let rss = etcd.usage()?.rss_bytes;
        let kv = etcd.connect().await?.kv_client();
        let public: Value = serde_json::from_str(SEED_PUBLIC)?;
        let written = watch::open_loop(settings.write_rate, settings.watch_duration, || {
            let mut kv = kv.clone();
            let (n, value) = {
                let mut rng = rand::rng();
                (rng.random_range(0..ids), rng.random_range(0..1_000_000))
            };
            let mut public = public.clone();
            public["watched"] = value.into();
            async move {
                let now = now_text();
                let put = kv
                    .put(key(n), document(&public, 2, &now, &now), None)
                    .await
                    .map_err(|e| e.to_string())?;
                put.header()
                    .map(|h| h.revision() as u64)
                    .ok_or_else(|| "no header in the reply".to_string())
            }
        })
        .await?;
        let outcome = subscribers
            .finish(&written.revisions, Duration::from_secs(30))
            .await?;
        let q = |q: f64| ms(outcome.latency.value_at_quantile(q));
        let row = WatchRow {
            backend: "etcd",
            replicas: 1,
            subscribers: outcome.subscribers,
            write_rate: settings.write_rate,
            filter: None,
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
        if settings.progress {
            eprintln!(
                "  etcd watch: {} writes, {} failed{}",
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
}
