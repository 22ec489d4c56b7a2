//! Transactions and Patch (issue 30, item 6): what a Commit of several
//! Merges buys over the same Merges sent one by one, and what a JSON Patch
//! costs next to the Merge of the same change.
//!
//! Four arms, at C clients in a closed loop (16 by default), each client
//! on its own HTTP/2 connection and on records only it writes, so that no
//! two clients wait for each other on a row:
//! - `commit of 10 merges`: `MetadataTransactionService/Commit` with 10
//!   `merge_user` operations, on the client's users `t{c}_0` .. `t{c}_9`;
//! - `10 separate merges`: the same changes of the same 10 users as
//!   `UserMetadataService/Merge` calls, one after the other (each call one
//!   op: its latency is one Merge's);
//! - `merge`: a Merge of `{"k1", "k2"}` into one of the client's users
//!   `p{c}_0` .. `p{c}_9`, in turn;
//! - `patch`: the same change of the same users as a JSON Patch, `add` of
//!   `/k1` and `/k2` (which applies whether or not the key exists).
//!
//! Every write sets `k1` to the version it makes and `k2` to a random
//! number: it always changes the record, and as only its client writes the
//! record, the client knows the exact version (and the revision to exceed)
//! the answer must give. Every answer is checked that way, a Commit's also
//! for one result per operation, in order, on consecutive revisions ending
//! at its `revision`: a fast wrong answer cannot pass.
//!
//! The arms share one server and alternate in rounds, each round in a
//! rotated order (as history.rs): drift on a shared two-core machine falls
//! on every arm alike. Beside each arm, the CPU each record costs the
//! server, the database (Postgres backends; SQLite runs in the server) and
//! the bench's clients.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use metadata_service::proto::v1::metadata_transaction_service_client::MetadataTransactionServiceClient;
use metadata_service::proto::v1::transaction_operation::Operation;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{
    CommitRequest, CommitResponse, MergeUserMetadataRequest, PatchUserMetadataRequest,
    TransactionOperation, UserMetadata, transaction_result,
};
use prost_types::value::Kind as ProtoKind;
use prost_types::{ListValue, Struct, Value as ProtoValue};
use rand::Rng;
use serde::Serialize;
use tonic::transport::Channel;

use crate::db::{Backend, BenchDb, RawPool};
use crate::load::{self, Measured};
use crate::process::{ServerProcess, channel};
use crate::{check, ms};

/// Merges in one Commit, and records each client owns per pair of arms.
pub const OPS_PER_COMMIT: usize = 10;
/// The bar: a Commit of 10 Merges writes at least this many times
/// the records per second of 10 separate Merges.
pub const COMMIT_TARGET: f64 = 3.0;
/// The bar: Patch within 10% of Merge (ops/s).
pub const PATCH_TARGET: f64 = 0.9;

pub struct Settings<'a> {
    pub backend: Backend,
    pub binary: &'a Path,
    pub server_args: &'a [String],
    pub server_env: &'a [(String, String)],
    /// Concurrent clients, each on its own connection and records.
    pub clients: usize,
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
    /// Commit of 10 merge_user operations on the client's `t` users.
    Commit,
    /// The same changes as 10 separate Merges, one after the other.
    Merges,
    /// Merge of k1 and k2 into one of the client's `p` users.
    Merge,
    /// The same change as a JSON Patch.
    Patch,
}

const ARMS: [Arm; 4] = [Arm::Commit, Arm::Merges, Arm::Merge, Arm::Patch];

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Commit => "commit of 10 merges",
            Arm::Merges => "10 separate merges",
            Arm::Merge => "merge",
            Arm::Patch => "patch",
        }
    }

    /// Records each op writes.
    fn records_per_op(self) -> u64 {
        match self {
            Arm::Commit => OPS_PER_COMMIT as u64,
            _ => 1,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ArmRow {
    pub backend: &'static str,
    pub arm: &'static str,
    pub clients: usize,
    /// Calls answered (a Commit is one).
    pub ops: u64,
    pub records: u64,
    pub ops_per_second: f64,
    pub records_per_second: f64,
    /// Of one call: a Commit, or one Merge or Patch.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Each round's records/s, in round order (drift shows here).
    pub round_records_per_second: Vec<f64>,
    /// CPU per record written: the server's, the database's (Postgres
    /// backends connected to the bench's database; 0 on SQLite, which runs
    /// in the server), the bench's (its clients).
    pub server_cpu_us_per_record: f64,
    pub db_cpu_us_per_record: f64,
    pub bench_cpu_us_per_record: f64,
    /// The three together, in cores busy over the arm's time (2 = the
    /// machine).
    pub stack_cpu_cores: f64,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub target: &'static str,
    /// numerator / denominator over all rounds.
    pub ratio: f64,
    /// Met when ratio >= bar.
    pub bar: f64,
    pub met: bool,
    /// The same ratio, round by round.
    pub round_ratios: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct TransactionsReport {
    pub backend: &'static str,
    pub clients: usize,
    pub ops_per_commit: usize,
    pub rounds: usize,
    pub arm_seconds_per_round: f64,
    pub warmup_seconds: f64,
    pub arms: Vec<ArmRow>,
    /// Commit of 10 Merges vs 10 Merges (records/s), and Patch vs Merge
    /// (ops/s).
    pub targets: Vec<Verdict>,
}

/// Records the arms Commit and 10 separate merges write, of client `c`.
fn batch_id(client: usize, k: usize) -> String {
    format!("t{client}_{k}")
}

/// Records the arms merge and patch write, of client `c`.
fn single_id(client: usize, k: usize) -> String {
    format!("p{client}_{k}")
}

/// What a client knows of records only it writes: each one's version and
/// revision now, and which one is next.
#[derive(Clone, Copy, Default)]
struct Owned {
    versions: [u64; OPS_PER_COMMIT],
    revisions: [u64; OPS_PER_COMMIT],
    next: usize,
}

impl Owned {
    fn take_next(&mut self) -> usize {
        let k = self.next;
        self.next = (k + 1) % OPS_PER_COMMIT;
        k
    }
}

#[derive(Default)]
struct ClientState {
    batch: Owned,
    single: Owned,
}

type State = Arc<Vec<Mutex<ClientState>>>;

fn status(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn number(n: u64) -> ProtoValue {
    ProtoValue {
        kind: Some(ProtoKind::NumberValue(n as f64)),
    }
}

fn string(s: &str) -> ProtoValue {
    ProtoValue {
        kind: Some(ProtoKind::StringValue(s.to_string())),
    }
}

/// `{"k1": version, "k2": noise}` merged into `id`.
fn merge_request(id: &str, version: u64, noise: u64) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id: id.to_string(),
        public_metadata: Some(Struct {
            fields: [
                ("k1".to_string(), number(version)),
                ("k2".to_string(), number(noise)),
            ]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

/// The same change as [`merge_request`], as a JSON Patch.
fn patch_request(id: &str, version: u64, noise: u64) -> PatchUserMetadataRequest {
    let add = |path: &str, value: u64| ProtoValue {
        kind: Some(ProtoKind::StructValue(Struct {
            fields: [
                ("op".to_string(), string("add")),
                ("path".to_string(), string(path)),
                ("value".to_string(), number(value)),
            ]
            .into_iter()
            .collect(),
        })),
    };
    PatchUserMetadataRequest {
        user_id: id.to_string(),
        public_metadata: Some(ListValue {
            values: vec![add("/k1", version), add("/k2", noise)],
        }),
        ..Default::default()
    }
}

/// `public_metadata.k1` of an answer.
fn k1(record: &UserMetadata) -> Option<f64> {
    let Some(ProtoKind::StructValue(fields)) = record.public_metadata.as_ref()?.kind.as_ref()
    else {
        return None;
    };
    match fields.fields.get("k1")?.kind {
        Some(ProtoKind::NumberValue(n)) => Some(n),
        _ => None,
    }
}

/// A write's answer: `id` at exactly `version`, `k1` = `version`, and a
/// revision past `before` (the record's previous one).
fn check_written(got: &UserMetadata, id: &str, version: u64, before: u64) -> Result<(), String> {
    if got.user_id != id
        || got.version != version
        || got.revision <= before
        || k1(got) != Some(version as f64)
    {
        return Err(format!(
            "{id}: answered {} version {} revision {} k1 {:?}, expected version {version} past revision {before}",
            got.user_id,
            got.version,
            got.revision,
            k1(got)
        ));
    }
    Ok(())
}

/// A transaction's revisions: one per record, consecutive, the last the
/// Commit's `revision` (never 0: every operation changed its record).
fn consecutive(revisions: &[u64], last: u64) -> bool {
    let mut sorted = revisions.to_vec();
    sorted.sort_unstable();
    last != 0 && sorted.last() == Some(&last) && sorted.windows(2).all(|w| w[1] == w[0] + 1)
}

/// A Commit's answer for merges of `ids` at `versions` (before) and
/// `revisions` (before): one checked result per operation, in order, on
/// consecutive revisions. The revisions written, in order.
fn check_commit(
    answer: &CommitResponse,
    ids: &[String],
    versions: &[u64],
    revisions: &[u64],
) -> Result<Vec<u64>, String> {
    if answer.results.len() != ids.len() {
        return Err(format!(
            "Commit: {} results for {} operations",
            answer.results.len(),
            ids.len()
        ));
    }
    if answer.transaction_id.is_empty() {
        return Err("Commit: no transaction_id".to_string());
    }
    let mut written = Vec::with_capacity(ids.len());
    for (i, result) in answer.results.iter().enumerate() {
        let Some(transaction_result::Record::User(user)) = &result.record else {
            return Err(format!("Commit: operations[{i}] answered no user"));
        };
        check_written(user, &ids[i], versions[i] + 1, revisions[i])?;
        written.push(user.revision);
    }
    if !consecutive(&written, answer.revision) {
        return Err(format!(
            "Commit: revisions {written:?} are not consecutive up to {}",
            answer.revision
        ));
    }
    Ok(written)
}

async fn commit(
    channel: Channel,
    state: &Mutex<ClientState>,
    client: usize,
    noises: &[u64; OPS_PER_COMMIT],
) -> Result<(), String> {
    let owned = state.lock().unwrap().batch;
    let ids: Vec<String> = (0..OPS_PER_COMMIT).map(|k| batch_id(client, k)).collect();
    let operations = ids
        .iter()
        .zip(owned.versions)
        .zip(noises)
        .map(|((id, version), &noise)| TransactionOperation {
            operation: Some(Operation::MergeUser(merge_request(id, version + 1, noise))),
        })
        .collect();
    let answer = MetadataTransactionServiceClient::new(channel)
        .commit(CommitRequest {
            operations,
            request_id: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let written = check_commit(&answer, &ids, &owned.versions, &owned.revisions)?;
    let mut state = state.lock().unwrap();
    for (k, revision) in written.into_iter().enumerate() {
        state.batch.versions[k] += 1;
        state.batch.revisions[k] = revision;
    }
    Ok(())
}

/// One Merge (or Patch) of the client's next record: of its `t` users
/// (`batch`), or of its `p` users.
async fn write_one(
    channel: Channel,
    state: &Mutex<ClientState>,
    client: usize,
    batch: bool,
    patch: bool,
    noise: u64,
) -> Result<(), String> {
    let (k, version, before) = {
        let mut state = state.lock().unwrap();
        let owned = if batch {
            &mut state.batch
        } else {
            &mut state.single
        };
        let k = owned.take_next();
        (k, owned.versions[k] + 1, owned.revisions[k])
    };
    let id = match batch {
        true => batch_id(client, k),
        false => single_id(client, k),
    };
    let mut users = UserMetadataServiceClient::new(channel);
    let got = match patch {
        true => users.patch(patch_request(&id, version, noise)).await,
        false => users.merge(merge_request(&id, version, noise)).await,
    }
    .map_err(status)?
    .into_inner();
    check_written(&got, &id, version, before)?;
    let mut state = state.lock().unwrap();
    let owned = if batch {
        &mut state.batch
    } else {
        &mut state.single
    };
    owned.versions[k] = version;
    owned.revisions[k] = got.revision;
    Ok(())
}

/// C clients in a closed loop, each on its own connection and records.
async fn run_arm(
    arm: Arm,
    channels: &Arc<Vec<Channel>>,
    state: &State,
    duration: Duration,
    seed: u64,
) -> Measured {
    let channels = channels.clone();
    let state = state.clone();
    load::closed_loop_seeded(channels.len(), duration, seed, move |client, rng| {
        let channel = channels[client].clone();
        let state = state.clone();
        let noises: [u64; OPS_PER_COMMIT] = std::array::from_fn(|_| rng.random_range(0..1_000_000));
        async move {
            let state = &state[client];
            match arm {
                Arm::Commit => commit(channel, state, client, &noises).await,
                Arm::Merges => write_one(channel, state, client, true, false, noises[0]).await,
                Arm::Merge => write_one(channel, state, client, false, false, noises[0]).await,
                Arm::Patch => write_one(channel, state, client, false, true, noises[0]).await,
            }
        }
    })
    .await
}

/// Each client's 20 users, created with one Commit each (version 1,
/// `k1` = 1), so that no measured write is a first write.
async fn seed(channels: &[Channel], state: &State) -> anyhow::Result<()> {
    for (client, channel) in channels.iter().enumerate() {
        let ids: Vec<String> = (0..OPS_PER_COMMIT)
            .map(|k| batch_id(client, k))
            .chain((0..OPS_PER_COMMIT).map(|k| single_id(client, k)))
            .collect();
        let operations = ids
            .iter()
            .map(|id| TransactionOperation {
                operation: Some(Operation::MergeUser(merge_request(id, 1, 0))),
            })
            .collect();
        let answer = MetadataTransactionServiceClient::new(channel.clone())
            .commit(CommitRequest {
                operations,
                request_id: String::new(),
            })
            .await
            .with_context(|| format!("seeding client {client}'s users"))?
            .into_inner();
        let zeros = vec![0; ids.len()];
        let written = check_commit(&answer, &ids, &zeros, &zeros)
            .map_err(anyhow::Error::msg)
            .context("seeding")?;
        let mut state = state[client].lock().unwrap();
        for (k, revision) in written.into_iter().enumerate() {
            let owned = match k < OPS_PER_COMMIT {
                true => &mut state.batch,
                false => &mut state.single,
            };
            owned.versions[k % OPS_PER_COMMIT] = 1;
            owned.revisions[k % OPS_PER_COMMIT] = revision;
        }
    }
    Ok(())
}

/// CPU seconds of a run: the server's, the database's, the bench's.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    db: f64,
    bench: f64,
}

fn cpu_between(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>, server: u32) -> Cpu {
    let bench = std::process::id();
    let mut cpu = Cpu::default();
    for (pid, seconds) in after {
        let used = seconds - before.get(pid).copied().unwrap_or(0.0);
        match *pid {
            p if p == server => cpu.server += used,
            p if p == bench => cpu.bench += used,
            _ => cpu.db += used,
        }
    }
    cpu
}

/// `numerator / denominator` against `bar`, overall and round by round.
fn verdict(
    target: &'static str,
    numerator: &ArmRow,
    denominator: &ArmRow,
    per_second: fn(&ArmRow) -> f64,
    rounds: fn(&ArmRow) -> Vec<f64>,
    bar: f64,
) -> Verdict {
    let ratio = per_second(numerator) / per_second(denominator);
    Verdict {
        target,
        ratio,
        bar,
        met: ratio >= bar,
        round_ratios: rounds(numerator)
            .iter()
            .zip(rounds(denominator))
            .map(|(n, d)| n / d)
            .collect(),
    }
}

pub async fn run(db: &BenchDb, settings: &Settings<'_>) -> anyhow::Result<TransactionsReport> {
    crate::migrate(&settings.binary.to_path_buf(), db.url()).await?;
    let pool = db.pool(1).await?;
    crate::history::clear(&pool).await?;
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
) -> anyhow::Result<TransactionsReport> {
    let backend = settings.backend;
    let clients = settings.clients.max(1);
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(channel(server.addr).await?);
    }
    let state: State = Arc::new((0..clients).map(|_| Mutex::default()).collect());
    seed(&connections, &state).await?;
    let channels = Arc::new(connections);

    for (n, arm) in ARMS.into_iter().enumerate() {
        let warm = run_arm(arm, &channels, &state, settings.warmup, 1000 + n as u64).await;
        check(&warm, arm.name())?;
    }
    let rounds = settings.rounds.max(1);
    let slice = settings.duration / rounds as u32;
    let mut measured: Vec<Vec<(Measured, Cpu)>> = ARMS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..ARMS.len() {
            let index = (k + round) % ARMS.len();
            let arm = ARMS[index];
            let seed = (round * ARMS.len() + index + 1) as u64;
            let before = crate::schema::stack_cpu(pool, server.pid).await?;
            let m = run_arm(arm, &channels, &state, slice, seed).await;
            let after = crate::schema::stack_cpu(pool, server.pid).await?;
            check(&m, arm.name())?;
            if settings.progress {
                eprintln!(
                    "  {} transactions round {} {}: {:.0} records/s, p50 {:.2} ms",
                    backend.name(),
                    round + 1,
                    arm.name(),
                    m.throughput() * arm.records_per_op() as f64,
                    ms(m.latency.value_at_quantile(0.5))
                );
            }
            measured[index].push((m, cpu_between(&before, &after, server.pid)));
        }
    }
    let arms: Vec<ArmRow> = ARMS
        .iter()
        .zip(&measured)
        .map(|(&arm, runs)| arm_row(backend, arm, clients, runs))
        .collect();
    let targets = vec![
        verdict(
            "commit of 10 merges / 10 separate merges, records/s",
            &arms[0],
            &arms[1],
            |r| r.records_per_second,
            |r| r.round_records_per_second.clone(),
            COMMIT_TARGET,
        ),
        verdict(
            "patch / merge, ops/s",
            &arms[3],
            &arms[2],
            |r| r.ops_per_second,
            |r| r.round_records_per_second.clone(),
            PATCH_TARGET,
        ),
    ];
    Ok(TransactionsReport {
        backend: backend.name(),
        clients,
        ops_per_commit: OPS_PER_COMMIT,
        rounds,
        arm_seconds_per_round: slice.as_secs_f64(),
        warmup_seconds: settings.warmup.as_secs_f64(),
        arms,
        targets,
    })
}

/// One arm's runs merged: the latencies of every round in one histogram.
fn arm_row(backend: Backend, arm: Arm, clients: usize, runs: &[(Measured, Cpu)]) -> ArmRow {
    let mut latency = load::latency_histogram();
    let (mut ops, mut seconds) = (0u64, 0.0);
    let mut cpu = Cpu::default();
    for (run, used) in runs {
        latency.add(&run.latency).expect("same bounds");
        ops += run.ops;
        seconds += run.elapsed.as_secs_f64();
        cpu.server += used.server;
        cpu.db += used.db;
        cpu.bench += used.bench;
    }
    let records = ops * arm.records_per_op();
    let per_record = |s: f64| s * 1e6 / records.max(1) as f64;
    ArmRow {
        backend: backend.name(),
        arm: arm.name(),
        clients,
        ops,
        records,
        ops_per_second: ops as f64 / seconds,
        records_per_second: records as f64 / seconds,
        p50_ms: ms(latency.value_at_quantile(0.5)),
        p99_ms: ms(latency.value_at_quantile(0.99)),
        max_ms: ms(latency.max()),
        round_records_per_second: runs
            .iter()
            .map(|(r, _)| r.throughput() * arm.records_per_op() as f64)
            .collect(),
        server_cpu_us_per_record: per_record(cpu.server),
        db_cpu_us_per_record: per_record(cpu.db),
        bench_cpu_us_per_record: per_record(cpu.bench),
        stack_cpu_cores: (cpu.server + cpu.db + cpu.bench) / seconds,
    }
}

pub fn print(report: &TransactionsReport) {
    println!(
        "\ntransactions (issue 30), {}: {} clients, each on its own connection and users \
         (t{{c}}_0..{} for the Commit and its {} separate Merges, p{{c}}_0..{} for Merge and Patch); \
         {} rounds of {:.1} s per arm, alternating",
        report.backend,
        report.clients,
        report.ops_per_commit - 1,
        report.ops_per_commit,
        report.ops_per_commit - 1,
        report.rounds,
        report.arm_seconds_per_round
    );
    println!(
        "{:<9} {:<20} {:>8} {:>10} {:>7} {:>7} {:>8} {:>26} {:>5}  round records/s",
        "backend",
        "arm",
        "ops/s",
        "records/s",
        "p50ms",
        "p99ms",
        "maxms",
        "cpu us/record srv/db/bench",
        "cores"
    );
    for r in &report.arms {
        let rounds: Vec<String> = r
            .round_records_per_second
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect();
        println!(
            "{:<9} {:<20} {:>8.0} {:>10.0} {:>7.2} {:>7.2} {:>8.2} {:>26} {:>5.2}  {}",
            r.backend,
            r.arm,
            r.ops_per_second,
            r.records_per_second,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            format!(
                "{:.0}/{:.0}/{:.0}",
                r.server_cpu_us_per_record, r.db_cpu_us_per_record, r.bench_cpu_us_per_record
            ),
            r.stack_cpu_cores,
            rounds.join(" ")
        );
    }
    for t in &report.targets {
        let rounds: Vec<String> = t.round_ratios.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "target: {} = {:.2} (bar >= {}): {}; by round: {}",
            t.target,
            t.ratio,
            t.bar,
            if t.met { "met" } else { "MISSED" },
            rounds.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(records_per_second: f64, ops_per_second: f64, rounds: Vec<f64>) -> ArmRow {
        ArmRow {
            backend: "sqlite",
            arm: "x",
            clients: 16,
            ops: 1,
            records: 1,
            ops_per_second,
            records_per_second,
            p50_ms: 1.0,
            p99_ms: 1.0,
            max_ms: 1.0,
            round_records_per_second: rounds,
            server_cpu_us_per_record: 0.0,
            db_cpu_us_per_record: 0.0,
            bench_cpu_us_per_record: 0.0,
            stack_cpu_cores: 0.0,
        }
    }

    #[test]
    fn a_verdict_is_met_at_the_bar_and_above() {
        let records = |r: &ArmRow| r.records_per_second;
        let rounds = |r: &ArmRow| r.round_records_per_second.clone();
        let commit = row(3000.0, 300.0, vec![2800.0, 3200.0]);
        let merges = row(1000.0, 1000.0, vec![1000.0, 1000.0]);
        let met = verdict("t", &commit, &merges, records, rounds, COMMIT_TARGET);
        assert_eq!(met.ratio, 3.0);
        assert!(met.met);
        assert_eq!(met.round_ratios, vec![2.8, 3.2]);
        let slow = row(2990.0, 299.0, vec![2990.0]);
        assert!(!verdict("t", &slow, &merges, records, rounds, COMMIT_TARGET).met);
        // Patch within 10% of Merge, by ops/s.
        let ops = |r: &ArmRow| r.ops_per_second;
        let merge = row(0.0, 1000.0, vec![]);
        assert!(
            verdict(
                "t",
                &row(0.0, 900.0, vec![]),
                &merge,
                ops,
                rounds,
                PATCH_TARGET
            )
            .met
        );
        assert!(
            !verdict(
                "t",
                &row(0.0, 899.0, vec![]),
                &merge,
                ops,
                rounds,
                PATCH_TARGET
            )
            .met
        );
    }

    #[test]
    fn a_transactions_revisions_are_consecutive_up_to_its_own() {
        assert!(consecutive(&[5, 6, 7], 7));
        assert!(consecutive(&[7, 5, 6], 7));
        assert!(!consecutive(&[5, 7, 8], 8));
        assert!(!consecutive(&[5, 6, 7], 8));
        assert!(!consecutive(&[5, 6, 6], 6));
        assert!(!consecutive(&[], 0));
    }

    #[test]
    fn an_answer_must_give_the_exact_next_version() {
        let answer = |version: u64, revision: u64, k1: u64| UserMetadata {
            user_id: "t0_0".to_string(),
            public_metadata: Some(ProtoValue {
                kind: Some(ProtoKind::StructValue(
                    merge_request("t0_0", k1, 7).public_metadata.unwrap(),
                )),
            }),
            version,
            revision,
            ..Default::default()
        };
        assert!(check_written(&answer(3, 40, 3), "t0_0", 3, 39).is_ok());
        assert!(check_written(&answer(3, 40, 3), "t0_1", 3, 39).is_err());
        assert!(check_written(&answer(2, 40, 2), "t0_0", 3, 39).is_err());
        assert!(check_written(&answer(3, 39, 3), "t0_0", 3, 39).is_err());
        assert!(check_written(&answer(3, 40, 2), "t0_0", 3, 39).is_err());
    }

    #[test]
    fn the_patch_adds_what_the_merge_sets() {
        let merge = merge_request("p1_2", 5, 9).public_metadata.unwrap();
        let patch = patch_request("p1_2", 5, 9).public_metadata.unwrap();
        assert_eq!(patch.values.len(), merge.fields.len());
        for value in patch.values {
            let Some(ProtoKind::StructValue(op)) = value.kind else {
                panic!("an operation is an object")
            };
            let field = |name: &str| op.fields.get(name).and_then(|v| v.kind.clone());
            assert_eq!(field("op"), Some(ProtoKind::StringValue("add".to_string())));
            let Some(ProtoKind::StringValue(path)) = field("path") else {
                panic!("a path")
            };
            let key = path.strip_prefix('/').unwrap();
            assert_eq!(field("value"), merge.fields[key].kind);
        }
    }
}
