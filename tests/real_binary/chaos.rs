//! The whole system under faults, as an operator would break it (issue 27,
//! items 3 and 4): two server replicas and two relays of the built binary on
//! a Postgres cluster of the test's own, reached through a TCP proxy the test
//! cuts, NATS through a second one; six writers and three Watch
//! subscribers that resume after any error; and a schedule of faults: the
//! database cut twice, a replica killed -9 and another stopped with
//! SIGTERM (both restarted), the lease-holding relay killed -9, NATS cut,
//! and a real restart of Postgres.
//!
//! Then it proves, against the log read straight from Postgres, what
//! README promises: every acknowledged write is in the log once, at its
//! revision; no write answered UNAVAILABLE is; every subscriber saw the
//! log's changes after its start exactly, in order; each record equals its
//! last event; the JetStream stream equals the log; and the service came
//! back after every fault within a bound (printed), with its health
//! following Postgres without a restart. A run takes about 60 s; it needs
//! `initdb` (METADATA_REQUIRE_POSTGRES makes its absence a failure) and
//! TEST_NATS_URL (METADATA_REQUIRE_NATS likewise).

mod cluster;
mod load;
mod procs;
mod proxy;
mod verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metadata_service::proto::v1::GetUserMetadataRequest;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::json::field;
use crate::common::nats::{self, TestStream};
use crate::common::wait::{until, within};
use cluster::PgCluster;
use load::{Outcome, Start, Subscription, Write};
use procs::{Proc, health_at, lazy_channel};
use proxy::Proxy;
use verify::Findings;

/// The whole test, set-up to proofs; past it the test fails (and every
/// process it started is killed).
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// Between faults: long enough for writes to flow again and be measured.
const GAP: Duration = Duration::from_secs(4);
/// A fault the service does not recover from within this fails the test.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
/// After the writers stop, how long subscribers and the relay may take to
/// reach the log's head.
const DRAIN_LIMIT: Duration = Duration::from_secs(40);
const WRITERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_system_under_faults_loses_nothing() {
    let Some(nats_url) = nats::url() else {
        return;
    };
    let Some(cluster) = PgCluster::start().await else {
        return;
    };
    let started = Instant::now();
    if tokio::time::timeout(TEST_LIMIT, run(&cluster, &nats_url))
        .await
        .is_err()
    {
        panic!(
            "the chaos test ran longer than {TEST_LIMIT:?}\n--- postgres log (end)\n{}",
            tail(&cluster.log_text(), 30)
        );
    }
    eprintln!("chaos test took {:.1?}", started.elapsed());
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A fault the schedule applies.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The Postgres proxy resets every connection and refuses new ones.
    PostgresLink,
    /// A replica is killed -9, and restarted when the fault ends.
    Kill9Replica(usize),
    /// The relay holding the lease is killed -9, and restarted when the
    /// fault ends.
    Kill9LeaseHolder,
    /// The NATS proxy resets every connection and refuses new ones.
    NatsLink,
    /// A replica is stopped with SIGTERM, and restarted when the fault ends.
    SigtermReplica(usize),
    /// `pg_ctl restart -m fast`: over when Postgres has restarted.
    PostgresRestart,
}

/// The faults in turn, each with how long it is held: GAP of load runs
/// before each.
const SCHEDULE: [(Kind, Duration); 7] = [
    (Kind::PostgresLink, Duration::from_secs(3)),
    (Kind::Kill9Replica(0), Duration::from_secs(1)),
    (Kind::Kill9LeaseHolder, Duration::from_secs(1)),
    (Kind::NatsLink, Duration::from_secs(4)),
    (Kind::SigtermReplica(1), Duration::from_millis(500)),
    (Kind::PostgresLink, Duration::from_secs(2)),
    (Kind::PostgresRestart, Duration::ZERO),
];

/// One fault of the schedule, as it happened.
struct Fault {
    name: String,
    /// Since the test's start.
    start: Duration,
    /// When the fault was over: the link back, the process serving again.
    end: Duration,
    /// The replica it hit: that replica's own writes must resume too.
    replica: Option<usize>,
    /// Recoveries measured while it happened: (what, how long).
    measured: Vec<(String, Option<Duration>)>,
}

/// What the schedule acts on.
struct Chaos<'a> {
    cluster: &'a PgCluster,
    pg_proxy: &'a Proxy,
    nats_proxy: &'a Proxy,
    stream: Arc<TestStream>,
    /// The log, straight from Postgres (not through the proxy).
    direct: &'a str,
    replicas: &'a mut [Proc; 2],
    relays: &'a mut [Proc; 2],
    t0: Instant,
}

/// A fault under way: when it began, and what its end needs.
struct Begun {
    start: Duration,
    during: During,
}

enum During {
    Nothing,
    /// The killed relay, and when the stream moved on without it (a task
    /// watching the stream meanwhile).
    Takeover(usize, tokio::task::JoinHandle<Option<Duration>>),
    /// When Postgres was back; the replicas' pids, which must not change;
    /// their health as it changed, recorded until `sampling` is cancelled.
    Restart {
        end: Duration,
        pids: [u32; 2],
        sampling: CancellationToken,
        samplers: Vec<tokio::task::JoinHandle<Vec<String>>>,
    },
}

impl Chaos<'_> {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    async fn begin(&mut self, kind: Kind) -> Begun {
        let start = self.now();
        let during = match kind {
            Kind::PostgresLink => {
                eprintln!("{start:>7.1?}  postgres proxy cut");
                self.pg_proxy.sever();
                During::Nothing
            }
            Kind::NatsLink => {
                eprintln!("{start:>7.1?}  NATS proxy cut");
                self.nats_proxy.sever();
                During::Nothing
            }
            Kind::Kill9Replica(r) => {
                eprintln!("{start:>7.1?}  {} kill -9", self.replicas[r].name);
                self.replicas[r].kill9().await;
                During::Nothing
            }
            Kind::SigtermReplica(r) => {
                eprintln!("{start:>7.1?}  {} SIGTERM", self.replicas[r].name);
                self.replicas[r].sigterm().await;
                During::Nothing
            }
            Kind::Kill9LeaseHolder => {
                let holder = lease_holder(self.relays).await;
                let start = self.now();
                eprintln!(
                    "{start:>7.1?}  {} (lease holder) kill -9",
                    self.relays[holder].name
                );
                self.relays[holder].kill9().await;
                let published = stream_head(&self.stream).await.unwrap_or(0);
                let takeover =
                    tokio::spawn(stream_reaches(self.stream.clone(), published + 1, self.t0));
                return Begun {
                    start,
                    during: During::Takeover(holder, takeover),
                };
            }
            Kind::PostgresRestart => {
                let pids = [self.replicas[0].pid(), self.replicas[1].pid()];
                let sampling = CancellationToken::new();
                let samplers = self
                    .replicas
                    .iter()
                    .map(|r| tokio::spawn(watch_health(r.addr, self.t0, sampling.clone())))
                    .collect();
                eprintln!("{start:>7.1?}  postgres restart (pg_ctl restart -m fast)");
                self.cluster.restart().await;
                During::Restart {
                    end: self.now(),
                    pids,
                    sampling,
                    samplers,
                }
            }
        };
        Begun { start, during }
    }

    /// Ends the fault and measures the recoveries it calls for.
    async fn end(&mut self, kind: Kind, begun: Begun) -> Fault {
        let Begun { start, during } = begun;
        let over = self.now();
        let mut fault = Fault {
            name: String::new(),
            start,
            end: start,
            replica: None,
            measured: vec![],
        };
        let held = || format!("{:.1?}", self.now() - start);
        match (kind, during) {
            (Kind::PostgresLink, _) => {
                self.pg_proxy.restore();
                fault.name = format!("postgres link cut {}", held());
                fault.end = self.now();
            }
            (Kind::NatsLink, _) => {
                self.nats_proxy.restore();
                fault.name = format!("NATS link cut {}", held());
                let end = self.now();
                let target = verify::head(self.direct).await;
                let caught_up = stream_reaches(self.stream.clone(), target, self.t0).await;
                fault.end = end;
                fault.measured.push((
                    format!("stream reaches {target}"),
                    caught_up.map(|t| t.saturating_sub(end)),
                ));
            }
            (Kind::Kill9Replica(r), _) => {
                self.replicas[r].start().await;
                fault.name = format!("{} kill -9", self.replicas[r].name);
                fault.end = self.now();
                fault.replica = Some(r);
            }
            (Kind::SigtermReplica(r), _) => {
                self.replicas[r].start().await;
                fault.name = format!("{} SIGTERM", self.replicas[r].name);
                fault.end = self.now();
                fault.replica = Some(r);
            }
            (Kind::Kill9LeaseHolder, During::Takeover(holder, takeover)) => {
                self.relays[holder].start().await;
                fault.name = "lease-holding relay kill -9".into();
                let took = takeover.await.expect("the takeover watch panicked");
                fault.measured.push((
                    "stream moves on".into(),
                    took.map(|t| t.saturating_sub(start)),
                ));
            }
            (
                Kind::PostgresRestart,
                During::Restart {
                    end,
                    pids,
                    sampling,
                    samplers,
                },
            ) => {
                fault.name = "postgres restart".into();
                fault.end = end;
                for replica in self.replicas.iter() {
                    let serving = serving_again(replica.addr, self.t0).await;
                    fault.measured.push((
                        format!("{} SERVING", replica.name),
                        serving.map(|t| t.saturating_sub(end)),
                    ));
                }
                sampling.cancel();
                for (replica, sampler) in self.replicas.iter().zip(samplers) {
                    let seen = sampler.await.unwrap();
                    eprintln!(
                        "         {} health during the restart: {}",
                        replica.name,
                        seen.join(", ")
                    );
                }
                for (replica, pid) in self.replicas.iter_mut().zip(pids) {
                    assert!(
                        replica.running() && replica.pid() == pid,
                        "{} did not survive the Postgres restart:\n{}",
                        replica.name,
                        replica.log_tail(30)
                    );
                }
            }
            (kind, _) => unreachable!("{kind:?} began without what its end needs"),
        }
        eprintln!("{over:>7.1?}  {} over", fault.name);
        fault
    }
}

async fn run(cluster: &PgCluster, nats_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let direct = cluster.url(cluster.port);
    let pg_proxy = Proxy::start(([127, 0, 0, 1], cluster.port).into()).await;
    let nats_proxy = Proxy::start(nats_addr(nats_url).await).await;
    let stream = Arc::new(TestStream::new(nats_url).await);
    let database_url = cluster.url(pg_proxy.addr.port());
    let nats_via_proxy = format!("nats://{}", nats_proxy.addr);

    let mut replicas = [
        Proc::replica("replica-a", dir.path(), &database_url),
        Proc::replica("replica-b", dir.path(), &database_url),
    ];
    // One after the other: the first one migrates the fresh database.
    for replica in &mut replicas {
        replica.start().await;
    }
    let mut relays = [
        Proc::relay(
            "relay-1",
            dir.path(),
            &database_url,
            &nats_via_proxy,
            &stream,
        ),
        Proc::relay(
            "relay-2",
            dir.path(),
            &database_url,
            &nats_via_proxy,
            &stream,
        ),
    ];
    for relay in &mut relays {
        relay.start().await;
    }
    let addrs = [replicas[0].addr, replicas[1].addr];
    let channels = || addrs.map(lazy_channel);

    let t0 = Instant::now();
    let stop_writers = CancellationToken::new();
    let stop_subscribers = CancellationToken::new();
    let mut subscribers = Vec::new();
    let mut subscribe = |name: &str, first: usize, start: Start| {
        let position = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(load::subscriber(
            name.to_owned(),
            channels(),
            first,
            start,
            position.clone(),
            stop_subscribers.clone(),
        ));
        subscribers.push((task, position.clone()));
        position
    };
    // Three ways in: from the first revision, from "now" (its first
    // progress message) and from a head read beside the service; each
    // under way before the next, so that they start at different points of
    // the load.
    let first = subscribe("subscriber-1 (from 1)", 0, Start::At(1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(load::writer(w, channels(), t0, stop_writers.clone())))
        .collect();
    until(
        "subscriber-1 receives the load",
        RECOVERY_LIMIT,
        async || match first.load(Ordering::SeqCst) {
            0 => Err(0),
            at => Ok(at),
        },
    )
    .await;
    let second = subscribe("subscriber-2 (from now)", 1, Start::Now);
    until(
        "the log moves past subscriber-2's start",
        RECOVERY_LIMIT,
        async || {
            let (start, head) = (second.load(Ordering::SeqCst), verify::head(&direct).await);
            if start > 0 && head > start {
                Ok(())
            } else {
                Err(format!("start {start}, head {head}"))
            }
        },
    )
    .await;
    let head = verify::head(&direct).await;
    subscribe("subscriber-3 (from head+1)", 0, Start::At(head + 1));

    let mut chaos = Chaos {
        cluster,
        pg_proxy: &pg_proxy,
        nats_proxy: &nats_proxy,
        stream: stream.clone(),
        direct: &direct,
        replicas: &mut replicas,
        relays: &mut relays,
        t0,
    };
    // The schedule, as a timeline: GAP of load (writes flow again, and
    // their recovery is measured), then a fault, held for its time; after
    // the last one, GAP more of load.
    let timeline = SCHEDULE
        .iter()
        .flat_map(|&(fault, held)| [(GAP, Some((fault, true))), (held, Some((fault, false)))])
        .chain([(GAP, None)]);
    let mut faults = Vec::new();
    let mut begun = None;
    for (after, step) in timeline {
        // Time is what the schedule is: how long the load runs between
        // faults and how long each fault lasts.
        tokio::time::sleep(after).await;
        match step {
            Some((fault, true)) => begun = Some(chaos.begin(fault).await),
            Some((fault, false)) => {
                let begun = begun.take().expect("a fault ends after it began");
                faults.push(chaos.end(fault, begun).await);
            }
            None => {}
        }
    }
    let now = || t0.elapsed();
    eprintln!("{:>7.1?}  writers stop", now());
    stop_writers.cancel();
    let mut writes: Vec<Write> = Vec::new();
    for writer in writers {
        writes.extend(writer.await.expect("a writer panicked"));
    }
    let writing = now();

    // A write answered DEADLINE_EXCEEDED "completes on its own": give those
    // their budget before reading the log, then read it until it stays
    // the same while subscribers and the relay catch up with it. Time is
    // what is relied on: a replica settles such a write within its
    // --db-timeout (2 s), and nothing outside it shows when it has.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let log = loop {
        let log = verify::read_log(&direct).await;
        let last = log.iter().rev().find(|e| !e.void).map_or(0, |e| e.revision);
        let behind = wait_for_everyone(&subscribers, &stream, last, drain_deadline).await;
        let again = verify::read_log(&direct).await;
        if let Some(behind) = behind {
            panic!(
                "within {DRAIN_LIMIT:?} of the writers' stop, {behind} did not reach \
                 revision {last}\n{}{}{}{}",
                replicas[0].log_tail(15),
                replicas[1].log_tail(15),
                relays[0].log_tail(15),
                relays[1].log_tail(15)
            );
        }
        if again == log {
            break log;
        }
    };
    let drained = now();
    stop_subscribers.cancel();
    let mut subscriptions: Vec<Subscription> = Vec::new();
    for (task, _) in subscribers {
        subscriptions.push(task.await.expect("a subscriber panicked"));
    }
    let messages = stream.messages().await;

    let mut found = Findings::default();
    verify::check_dense(&log, &mut found);
    let tally = verify::check_writes(&log, &writes, &mut found);
    for sub in &subscriptions {
        verify::check_subscription(&log, sub, &mut found);
    }
    verify::check_stream(&log, &messages, &stream.prefix, &mut found);
    check_records(&addrs, &log, &mut found).await;

    // Recovery: from each fault's end to the first acknowledged write after
    // it, on any replica and on the replica it hit.
    writes.sort_by_key(|w| w.done);
    let first_ack = |after: Duration, replica: Option<usize>| {
        writes
            .iter()
            .find(|w| {
                w.done >= after
                    && matches!(w.outcome, Outcome::Acked { .. })
                    && replica.is_none_or(|r| w.replica == r)
            })
            .map(|w| w.done - after)
    };
    let mut rows = Vec::new();
    for fault in &faults {
        let mut recoveries = vec![("writes acknowledged".to_owned(), first_ack(fault.end, None))];
        match fault.replica {
            Some(r) => recoveries.push((
                format!("writes via {}", replicas[r].name),
                first_ack(fault.end, Some(r)),
            )),
            None if fault.name == "postgres restart" => {
                for (r, replica) in replicas.iter().enumerate() {
                    recoveries.push((
                        format!("writes via {}", replica.name),
                        first_ack(fault.end, Some(r)),
                    ));
                }
            }
            None => {}
        }
        recoveries.extend(fault.measured.iter().cloned());
        for (what, took) in &recoveries {
            match took {
                Some(took) if *took <= RECOVERY_LIMIT => {}
                Some(took) => found.violations.push(format!(
                    "after {}: {what} took {took:.1?}, over {RECOVERY_LIMIT:?}",
                    fault.name
                )),
                None => found
                    .violations
                    .push(format!("after {}: {what} never happened", fault.name)),
            }
        }
        rows.push((fault, recoveries));
    }

    let changes = log.iter().filter(|e| !e.void).count();
    let voids = log.len() - changes;
    let markers = messages.iter().filter(|m| m.is_marker()).count();
    let mut table = String::new();
    let mut line = |text: String| {
        table.push_str(&text);
        table.push('\n');
    };
    line(format!(
        "chaos run: {:.1?} of writes, drained {:.1?} later",
        writing,
        drained - writing
    ));
    line(format!(
        "writes: {} sent, {} acknowledged, {} UNAVAILABLE (none applied: checked), \
         {} DEADLINE_EXCEEDED ({} applied, {} not), {} transport failures ({} applied, {} not), \
         {} other ({} applied, {} not)",
        writes.len(),
        tally.acked,
        tally.unavailable,
        tally.deadline.0 + tally.deadline.1,
        tally.deadline.0,
        tally.deadline.1,
        tally.transport.0 + tally.transport.1,
        tally.transport.0,
        tally.transport.1,
        tally.other.0 + tally.other.1,
        tally.other.0,
        tally.other.1,
    ));
    line(format!(
        "log: {} revisions, {changes} events, {voids} voids",
        log.len()
    ));
    for sub in &subscriptions {
        line(format!(
            "{}: after revision {}, {} deliveries, {} resumes, {} stalls, ends {:?}",
            sub.name,
            sub.after.map_or("?".into(), |a| a.to_string()),
            sub.delivered.len(),
            sub.resumes,
            sub.stalls,
            sub.ends
        ));
    }
    line(format!(
        "stream {}: {} messages ({} events, {markers} markers)",
        stream.name,
        messages.len(),
        messages.len() - markers
    ));
    let (pg_reset, pg_refused) = pg_proxy.counts();
    let (nats_reset, nats_refused) = nats_proxy.counts();
    line(format!(
        "proxies: postgres {pg_reset} connections cut, {pg_refused} refused; \
         NATS {nats_reset} cut, {nats_refused} refused"
    ));
    line(format!(
        "{:<28} {:>7} {:>7}  recovery after the fault's end",
        "fault", "at", "lasted"
    ));
    for (fault, recoveries) in &rows {
        let shown: Vec<String> = recoveries
            .iter()
            .map(|(what, took)| match took {
                Some(took) => format!("{what} {:.2}s", took.as_secs_f64()),
                None => format!("{what} NEVER"),
            })
            .collect();
        line(format!(
            "{:<28} {:>6.1}s {:>6.1}s  {}",
            fault.name,
            fault.start.as_secs_f64(),
            (fault.end - fault.start).as_secs_f64(),
            shown.join("; ")
        ));
    }
    line("failures seen by writers (code: message, count):".into());
    for (message, n) in &tally.messages {
        line(format!("  {n:>6}  {message}"));
    }
    println!("{table}");

    // Leave no stream behind on a shared NATS (TestStream's own drop is
    // only best effort once the runtime shuts down).
    let _ = stream.context.delete_stream(&stream.name).await;
    if found.violations.is_empty() {
        return;
    }
    // The processes' whole output, for whoever investigates.
    let logs = dir.keep();
    let _ = std::fs::write(logs.join("postgres.log"), cluster.log_text());
    panic!(
        "{} violations (first 30):\n{}\n\n{table}\nevery process's output is in {}\n{}{}{}{}",
        found.violations.len(),
        found
            .violations
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        logs.display(),
        replicas[0].log_tail(15),
        replicas[1].log_tail(15),
        relays[0].log_tail(15),
        relays[1].log_tail(15),
    );
}

/// NATS's address for the proxy to forward to, from TEST_NATS_URL.
async fn nats_addr(url: &str) -> SocketAddr {
    let host = url.split("://").last().unwrap_or(url);
    let host = host.split(',').next().unwrap();
    let host = host.rsplit('@').next().unwrap();
    tokio::net::lookup_host(host)
        .await
        .unwrap_or_else(|e| panic!("resolve {host}: {e}"))
        .find(SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("{host} has no IPv4 address"))
}

/// The relay that holds the lease (waits for there to be exactly one: after
/// a cut the lease may be changing hands).
async fn lease_holder(relays: &[Proc; 2]) -> usize {
    let holder = within(RECOVERY_LIMIT, async || {
        let mut holders = Vec::new();
        for (i, relay) in relays.iter().enumerate() {
            if let Ok(metrics) = relay.metrics().await
                && metrics.get("metadata_relay_lease_held") == Some(&1.0)
            {
                holders.push(i);
            }
        }
        match holders[..] {
            [holder] => Ok(holder),
            _ => Err(holders),
        }
    })
    .await;
    holder.unwrap_or_else(|holders| {
        panic!(
            "no single lease holder within {RECOVERY_LIMIT:?}: {holders:?}\n{}{}",
            relays[0].log_tail(20),
            relays[1].log_tail(20)
        )
    })
}

/// The revision of the stream's last message (0 when it has none), or None
/// if NATS did not answer in time.
async fn stream_head(stream: &TestStream) -> Option<u64> {
    let read = async {
        let mut js = stream.context.get_stream(&stream.name).await.ok()?;
        let state = js.info().await.ok()?.state.clone();
        if state.messages == 0 {
            return Some(0);
        }
        let message = js.get_raw_message(state.last_sequence).await.ok()?;
        message
            .headers
            .iter()
            .find(|(name, _)| name.to_string().eq_ignore_ascii_case("Metadata-Revision"))
            .and_then(|(_, values)| values.first()?.as_str().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// When (since `t0`) the stream first held `revision` or later; None if not
/// within [`RECOVERY_LIMIT`].
async fn stream_reaches(stream: Arc<TestStream>, revision: u64, t0: Instant) -> Option<Duration> {
    // Futures that own what they use (an async closure's borrow from it,
    // which the compiler cannot prove Send): this runs in a task of its own.
    let check = move || {
        let stream = stream.clone();
        async move {
            match stream_head(&stream).await {
                Some(head) if head >= revision => Ok(t0.elapsed()),
                head => Err(head),
            }
        }
    };
    within(RECOVERY_LIMIT, check).await.ok()
}

/// When (since `t0`) the replica at `addr` was SERVING again; None if not
/// within [`RECOVERY_LIMIT`].
async fn serving_again(addr: SocketAddr, t0: Instant) -> Option<Duration> {
    within(RECOVERY_LIMIT, async || match health_at(addr).await {
        Ok(statuses) if statuses == [ServingStatus::Serving; 2] => Ok(t0.elapsed()),
        seen => Err(seen),
    })
    .await
    .ok()
}

/// The health of the replica at `addr` as it changed ("NOT_SERVING at
/// 41.2s"), from its health Watch, which sends every change: shows that
/// health followed the database. Ends once `stop` is cancelled and SERVING
/// was the last status seen, or when the stream ends.
async fn watch_health(addr: SocketAddr, t0: Instant, stop: CancellationToken) -> Vec<String> {
    let mut seen = Vec::new();
    let mut health = HealthClient::new(lazy_channel(addr));
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut statuses = match health.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return vec![format!("no watch: {status}")],
    };
    let mut serving = false;
    loop {
        let message = tokio::select! {
            () = stop.cancelled(), if serving => return seen,
            message = statuses.message() => message,
        };
        let now = match message {
            Ok(Some(response)) => response.status(),
            Ok(None) => return seen,
            Err(status) => {
                seen.push(format!("watch ended: {status}"));
                return seen;
            }
        };
        serving = now == ServingStatus::Serving;
        seen.push(format!("{now:?} at {:.1?}", t0.elapsed()));
    }
}

/// Waits until every subscriber and the stream have reached `revision`;
/// Some(who is behind) at `deadline`.
async fn wait_for_everyone(
    subscribers: &[(tokio::task::JoinHandle<Subscription>, Arc<AtomicU64>)],
    stream: &TestStream,
    revision: u64,
    deadline: Instant,
) -> Option<String> {
    let limit = deadline.saturating_duration_since(Instant::now());
    within(limit, async || {
        let mut behind = Vec::new();
        for (i, (_, position)) in subscribers.iter().enumerate() {
            let at = position.load(Ordering::SeqCst);
            if at < revision {
                behind.push(format!("subscriber-{} (at {at})", i + 1));
            }
        }
        let streamed = stream_head(stream).await;
        if streamed.is_none_or(|r| r < revision) {
            behind.push(format!("the stream (at {streamed:?})"));
        }
        match behind.is_empty() {
            true => Ok(()),
            false => Err(behind.join(", ")),
        }
    })
    .await
    .err()
}

/// Each user's record, read with Get (on either replica), equals its last
/// event's `after`.
async fn check_records(addrs: &[SocketAddr; 2], log: &[verify::Logged], found: &mut Findings) {
    for n in 0..load::USERS {
        let user = load::user_id(n);
        let mut record = None;
        for addr in addrs {
            let mut client = UserMetadataServiceClient::new(lazy_channel(*addr));
            let get = client.get(GetUserMetadataRequest {
                user_id: user.clone(),
                revision: None,
            });
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(5), get).await {
                record = Some(response.into_inner());
                break;
            }
        }
        match record {
            Some(record) => verify::check_record(
                log,
                &user,
                &field(&record.public_metadata),
                record.version,
                record.revision,
                found,
            ),
            None => found
                .violations
                .push(format!("Get {user} failed on both replicas")),
        }
    }
}
