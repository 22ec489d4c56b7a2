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
//! following Postgres without a restart. A run takes about 65 s; it needs
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
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::json::field;
use crate::common::nats::{self, TestStream};
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

/// One fault of the schedule, as it happened.
struct Fault {
    name: &'static str,
    /// Since the test's start.
    start: Duration,
    /// When the fault was over: the link back, the process serving again.
    end: Duration,
    /// The replica it hit: that replica's own writes must resume too.
    replica: Option<usize>,
    /// Recoveries measured while it happened: (what, how long).
    measured: Vec<(String, Option<Duration>)>,
}

async fn run(cluster: &PgCluster, nats_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let direct = cluster.url(cluster.port);
    let pg_proxy = Proxy::start(([127, 0, 0, 1], cluster.port).into()).await;
    let nats_proxy = Proxy::start(nats_addr(nats_url).await).await;
    let stream = TestStream::new(nats_url).await;
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
        subscribers.push((task, position));
    };
    // Three ways in: from the first revision, from "now" (its first
    // progress message) and from a head read beside the service.
    subscribe("subscriber-1 (from 1)", 0, Start::At(1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(load::writer(w, channels(), t0, stop_writers.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscribe("subscriber-2 (from now)", 1, Start::Now);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let head = verify::head(&direct).await;
    subscribe("subscriber-3 (from head+1)", 0, Start::At(head + 1));

    let mut faults = Vec::new();
    let now = || t0.elapsed();

    tokio::time::sleep(GAP).await;
    let start = now();
    eprintln!("{start:>7.1?}  postgres proxy cut for 3 s");
    pg_proxy.cut(Duration::from_secs(3)).await;
    faults.push(Fault {
        name: "postgres link cut 3 s",
        start,
        end: now(),
        replica: None,
        measured: vec![],
    });

    tokio::time::sleep(GAP).await;
    let start = now();
    eprintln!("{start:>7.1?}  replica-a kill -9, restarted after 1 s");
    replicas[0].kill9().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    replicas[0].start().await;
    faults.push(Fault {
        name: "replica-a kill -9",
        start,
        end: now(),
        replica: Some(0),
        measured: vec![],
    });

    tokio::time::sleep(GAP).await;
    let holder = lease_holder(&relays).await;
    let start = now();
    eprintln!(
        "{start:>7.1?}  {} (lease holder) kill -9, restarted after 1 s",
        relays[holder].name
    );
    relays[holder].kill9().await;
    let published = stream_head(&stream).await.unwrap_or(0);
    let (takeover, ()) = tokio::join!(stream_reaches(&stream, published + 1, t0), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        relays[holder].start().await;
    });
    faults.push(Fault {
        name: "lease-holding relay kill -9",
        start,
        end: start,
        replica: None,
        measured: vec![(
            "stream moves on".into(),
            takeover.map(|t| t.saturating_sub(start)),
        )],
    });

    tokio::time::sleep(GAP).await;
    let start = now();
    eprintln!("{start:>7.1?}  NATS proxy cut for 4 s");
    nats_proxy.cut(Duration::from_secs(4)).await;
    let end = now();
    let target = verify::head(&direct).await;
    let caught_up = stream_reaches(&stream, target, t0).await;
    faults.push(Fault {
        name: "NATS link cut 4 s",
        start,
        end,
        replica: None,
        measured: vec![(
            format!("stream reaches {target}"),
            caught_up.map(|t| t.saturating_sub(end)),
        )],
    });

    tokio::time::sleep(GAP).await;
    let start = now();
    eprintln!("{start:>7.1?}  replica-b SIGTERM, restarted after 0.5 s");
    replicas[1].sigterm().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[1].start().await;
    faults.push(Fault {
        name: "replica-b SIGTERM",
        start,
        end: now(),
        replica: Some(1),
        measured: vec![],
    });

    tokio::time::sleep(GAP).await;
    let start = now();
    eprintln!("{start:>7.1?}  postgres proxy cut for 2 s");
    pg_proxy.cut(Duration::from_secs(2)).await;
    faults.push(Fault {
        name: "postgres link cut 2 s",
        start,
        end: now(),
        replica: None,
        measured: vec![],
    });

    tokio::time::sleep(GAP).await;
    let pids = [replicas[0].pid(), replicas[1].pid()];
    let sampling = CancellationToken::new();
    let samplers: Vec<_> = addrs
        .iter()
        .map(|addr| tokio::spawn(sample_health(*addr, t0, sampling.clone())))
        .collect();
    let start = now();
    eprintln!("{start:>7.1?}  postgres restart (pg_ctl restart -m fast)");
    cluster.restart().await;
    let end = now();
    let mut measured = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let serving = serving_again(*addr, t0).await;
        measured.push((
            format!("{} SERVING", replicas[i].name),
            serving.map(|t| t.saturating_sub(end)),
        ));
    }
    // One more sample each, so that the history shows SERVING again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sampling.cancel();
    for (i, sampler) in samplers.into_iter().enumerate() {
        let seen = sampler.await.unwrap();
        eprintln!(
            "         {} health during the restart: {}",
            replicas[i].name,
            seen.join(", ")
        );
    }
    for (i, replica) in replicas.iter_mut().enumerate() {
        assert!(
            replica.running() && replica.pid() == pids[i],
            "{} did not survive the Postgres restart:\n{}",
            replica.name,
            replica.log_tail(30)
        );
    }
    faults.push(Fault {
        name: "postgres restart",
        start,
        end,
        replica: None,
        measured,
    });

    tokio::time::sleep(GAP).await;
    eprintln!("{:>7.1?}  writers stop", now());
    stop_writers.cancel();
    let mut writes: Vec<Write> = Vec::new();
    for writer in writers {
        writes.extend(writer.await.expect("a writer panicked"));
    }
    let writing = now();

    // A write answered DEADLINE_EXCEEDED "completes on its own": give those
    // their budget before reading the log, then read it until it stays
    // the same while subscribers and the relay catch up with it.
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
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        let mut holders = Vec::new();
        for (i, relay) in relays.iter().enumerate() {
            if let Ok(metrics) = relay.metrics().await
                && metrics.get("metadata_relay_lease_held") == Some(&1.0)
            {
                holders.push(i);
            }
        }
        if let [holder] = holders[..] {
            return holder;
        }
        assert!(
            Instant::now() < deadline,
            "no single lease holder within {RECOVERY_LIMIT:?}: {holders:?}\n{}{}",
            relays[0].log_tail(20),
            relays[1].log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
async fn stream_reaches(stream: &TestStream, revision: u64, t0: Instant) -> Option<Duration> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    while Instant::now() < deadline {
        if stream_head(stream).await.is_some_and(|r| r >= revision) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// When (since `t0`) the replica at `addr` was SERVING again; None if not
/// within [`RECOVERY_LIMIT`].
async fn serving_again(addr: SocketAddr, t0: Instant) -> Option<Duration> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    while Instant::now() < deadline {
        if health_at(addr).await == Ok([ServingStatus::Serving; 2]) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Health of a replica every 100 ms until `stop`, as a list of changes
/// ("NOT_SERVING at 41.2s"), to show that health followed the database.
async fn sample_health(addr: SocketAddr, t0: Instant, stop: CancellationToken) -> Vec<String> {
    let mut seen = Vec::new();
    let mut last = String::new();
    while !stop.is_cancelled() {
        let now = match health_at(addr).await {
            Ok([a, b]) if a == b => format!("{a:?}"),
            Ok(statuses) => format!("{statuses:?}"),
            Err(_) => "no answer".to_owned(),
        };
        if now != last {
            seen.push(format!("{now} at {:.1?}", t0.elapsed()));
            last = now;
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    seen
}

/// Waits until every subscriber and the stream have reached `revision`;
/// Some(who is behind) at `deadline`.
async fn wait_for_everyone(
    subscribers: &[(tokio::task::JoinHandle<Subscription>, Arc<AtomicU64>)],
    stream: &TestStream,
    revision: u64,
    deadline: Instant,
) -> Option<String> {
    loop {
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
        if behind.is_empty() {
            return None;
        }
        if Instant::now() >= deadline {
            return Some(behind.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
