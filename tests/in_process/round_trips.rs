//! Issue 26: on Postgres, a Merge of a row that exists (the fast path)
//! costs at most 2 round trips of its own and a Get 1, pings included.
//! Latency on a busy database is mostly round trips, and the ones a call
//! causes after it has answered (sqlx's ping of a connection returned to
//! its pool, the event dispatcher's read of the new event) are just as
//! much load: so they are counted on the wire, by a proxy between the
//! server and Postgres, until the traffic stops.
//!
//! Not counted as the call's own: the commit announcer's NOTIFY (on its
//! own connection, for the other replicas) and the LISTEN connection;
//! they are printed beside the counts.

use std::time::Duration;

use metadata_service::proto::v1::GetUserMetadataRequest;
use metadata_service::store::ANNOUNCER_APPLICATION_NAME;
use serde_json::json;

use crate::common::{self, Backend, TestDb};
use crate::harness::{TestServer, write};
use crate::pg_proxy::{Activity, PgProxy, through, upstream};

const MERGE_LIMIT: usize = 2;
const GET_LIMIT: usize = 1;
/// Each measured alone and checked: one lucky call proves little.
const REPETITIONS: usize = 3;
/// sqlx's release ping follows the response within milliseconds.
const QUIET: Duration = Duration::from_millis(300);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Long enough that nothing periodic runs during the test.
const NEVER: Duration = Duration::from_secs(3600);
const ID: &str = "user_round_trips";

/// A warm-up gives up after this many rounds and measures anyway: a
/// statement prepared on every use then shows in the counts.
const MAX_WARM_UP_ROUNDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_merge_costs_two_round_trips_and_a_get_one() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let proxy = PgProxy::start(upstream(db.url())).await;
    let mut config = common::config(&through(db.url(), proxy.addr()));
    // Nothing periodic may reach the database while a call is measured:
    // the health ping and the latest-revision metric (db_health_interval),
    // pruning, and the dispatcher's poll of the log.
    config.db_health_interval = NEVER;
    config.events.prune_interval = NEVER;
    config.events.broker.poll_interval = NEVER;
    let mut s = TestServer::start(config, db).await;

    // The first write creates the row under a lock: the slow path.
    write(&mut s.users, ID, json!({"n": 0})).await;
    proxy.settle(QUIET, SETTLE_TIMEOUT).await;

    // sqlx prepares a statement the first time each connection runs it
    // (Parse+Describe, a round trip of its own), and the pool hands out
    // its idle connections in turn: warm them all, so that what is
    // measured is the steady state. The rounds are clean once none
    // prepares or opens anything for longer than a turn of the pool.
    let mut n = 0;
    let mut clean = 0;
    let mut rounds = 0;
    while rounds < MAX_WARM_UP_ROUNDS {
        rounds += 1;
        n += 1;
        let merge = measure(&proxy, merge(&mut s, n)).await;
        let get = measure(&proxy, get(&mut s)).await;
        clean = if merge.warm() && get.warm() {
            clean + 1
        } else {
            0
        };
        if clean > pool_size(&proxy) {
            break;
        }
    }
    println!(
        "warm-up: {rounds} rounds of a Merge and a Get, {clean} of them clean at the end; \
         {} pool connections",
        pool_size(&proxy)
    );

    let mut report = String::new();
    let mut over = false;
    for _ in 0..REPETITIONS {
        n += 1;
        let merge = measure(&proxy, merge(&mut s, n)).await;
        over |= merge.round_trips() > MERGE_LIMIT;
        report += &merge.report(
            &format!("Merge of an existing row ({{\"n\": {n}}})"),
            MERGE_LIMIT,
        );
        let get = measure(&proxy, get(&mut s)).await;
        over |= get.round_trips() > GET_LIMIT;
        report += &get.report("Get", GET_LIMIT);
    }
    s.stop().await;
    assert!(
        !over,
        "a Merge took more than {MERGE_LIMIT} round trips or a Get more than {GET_LIMIT}:\n{report}"
    );
    // The counts of a passing run, for `--nocapture`.
    println!("{report}");
}

async fn merge(s: &mut TestServer, n: usize) {
    write(&mut s.users, ID, json!({ "n": n })).await;
}

async fn get(s: &mut TestServer) {
    s.users
        .get(GetUserMetadataRequest {
            user_id: ID.into(),
            revision: None,
        })
        .await
        .expect("get");
}

/// What reached Postgres because of `call`, until the traffic stopped.
async fn measure(proxy: &PgProxy, call: impl Future<Output = ()>) -> Measured {
    let mark = proxy.mark();
    call.await;
    proxy.settle(QUIET, SETTLE_TIMEOUT).await;
    let (counted, excluded) = proxy.since(&mark).into_iter().partition(counted);
    Measured { counted, excluded }
}

/// Whether a connection's round trips are the call's own: not the
/// announcer's (it tells other replicas, and leaves this server's pool
/// alone), nor the LISTEN connection's (a pool connection with no name of
/// its own, known by the LISTEN it sent, that stays checked out).
fn counted(activity: &Activity) -> bool {
    activity.application_name != ANNOUNCER_APPLICATION_NAME && !activity.listens
}

/// Connections whose round trips count, opened so far.
fn pool_size(proxy: &PgProxy) -> usize {
    proxy.everything().iter().filter(|a| counted(a)).count()
}

struct Measured {
    counted: Vec<Activity>,
    excluded: Vec<Activity>,
}

impl Measured {
    fn round_trips(&self) -> usize {
        self.counted.iter().map(|a| a.round_trips().len()).sum()
    }

    /// Round trips of the excluded connections that match `which`.
    fn excluded(&self, which: impl Fn(&Activity) -> bool) -> usize {
        self.excluded
            .iter()
            .filter(|a| which(a))
            .map(|a| a.round_trips().len())
            .sum()
    }

    /// Every statement came from sqlx's cache, on connections already open.
    fn warm(&self) -> bool {
        self.counted.iter().all(|a| !a.opened && a.parses() == 0)
    }

    /// The counts, and every round trip in the order it was sent.
    fn report(&self, call: &str, limit: usize) -> String {
        let mut out = format!(
            "{call}: {} round trips (at most {limit}); not counted: {} of the commit \
             announcer, {} of the LISTEN connection\n",
            self.round_trips(),
            self.excluded(|a| a.application_name == ANNOUNCER_APPLICATION_NAME),
            self.excluded(|a| a.listens),
        );
        let mut trips: Vec<_> = [(true, &self.counted), (false, &self.excluded)]
            .into_iter()
            .flat_map(|(counted, activities)| activities.iter().map(move |a| (counted, a)))
            .flat_map(|(counted, a)| a.round_trips().into_iter().map(move |t| (counted, a, t)))
            .collect();
        trips.sort_by_key(|(_, _, trip)| trip.seq);
        for (counted, a, trip) in trips {
            out += &format!(
                "  {}connection {} ({:?}{}): {}\n",
                if counted { "" } else { "not counted: " },
                a.connection,
                a.application_name,
                if a.opened { ", opened by the call" } else { "" },
                trip.what
            );
        }
        out
    }
}
