//! Integrity under concurrency, overload and database trouble: nothing lost,
//! every error clear, recovery without a restart.

use std::time::{Duration, Instant};

use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::json::{field, structure};
use crate::common::wait::until;
use crate::common::{self, Backend};
use crate::harness::{TestServer, Users, merge, start, start_with, write};

async fn get(users: &mut Users, id: &str) -> UserMetadata {
    users
        .get(GetUserMetadataRequest {
            user_id: id.into(),
            revision: None,
        })
        .await
        .expect("get")
        .into_inner()
}

/// The (revision, version) of every event of `id`, in revision order.
async fn event_log(s: &TestServer, id: &str) -> Vec<(u64, u64)> {
    let db = s.db.connect().await;
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            "SELECT revision, after FROM events WHERE id = $1 ORDER BY revision",
            [id.into()],
        ))
        .await
        .unwrap();
    db.close().await.ok();
    rows.iter()
        .map(|row| {
            let revision: i64 = row.try_get("", "revision").unwrap();
            let after: Json = row.try_get("", "after").unwrap();
            (revision as u64, after["version"].as_u64().unwrap())
        })
        .collect()
}

/// Exactly one event per version 1..=version, in order.
async fn assert_one_event_per_version(s: &TestServer, id: &str, version: u64) {
    let log = event_log(s, id).await;
    let versions: Vec<u64> = log.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        versions,
        (1..=version).collect::<Vec<_>>(),
        "events of {id}"
    );
    assert!(
        log.windows(2).all(|w| w[0].0 < w[1].0),
        "revisions increase"
    );
}

/// 16 clients each merge 100 distinct keys into one id, spread over the
/// given clients (one per server).
async fn merge_storm(clients: &[Users], id: &str) {
    const CLIENTS: usize = 16;
    const KEYS: usize = 100;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut users = clients[c % clients.len()].clone();
        let id = id.to_owned();
        tasks.push(tokio::spawn(async move {
            for k in 0..KEYS {
                users
                    .merge(merge(&id, json!({ format!("c{c}k{k}"): k })))
                    .await
                    .expect("no merge fails");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// 1,600 keys are more than the default 8 KiB field limit, and a loaded CI
/// machine must not turn queueing into timeouts: this test is about loss.
fn roomy(config: &mut metadata_service::server::ServerConfig) {
    config.limits.max_field_bytes = 64 * 1024;
    config.db_timeout = Duration::from_secs(60);
}

async fn no_lost_updates(backend: Backend) {
    let Some(mut s) = start_with(backend, roomy).await else {
        return;
    };
    merge_storm(&[s.users.clone()], "hot").await;
    let m = get(&mut s.users, "hot").await;
    let Json::Object(keys) = field(&m.public_metadata) else {
        panic!("object")
    };
    assert_eq!((keys.len(), m.version), (1600, 1600));
    assert_one_event_per_version(&s, "hot", 1600).await;
}

async fn first_writes_race_without_loss(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let mut tasks = Vec::new();
    for c in 0..32 {
        let mut users = s.users.clone();
        tasks.push(tokio::spawn(async move {
            users
                .merge(merge("brand_new", json!({ format!("c{c}"): c })))
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("no first write fails");
    }
    let m = get(&mut s.users, "brand_new").await;
    let Json::Object(keys) = field(&m.public_metadata) else {
        panic!("object")
    };
    assert_eq!((keys.len(), m.version), (32, 32));
    assert_one_event_per_version(&s, "brand_new", 32).await;
}

async fn expected_version_race_has_one_winner(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for round in 0..3u64 {
        // Round 0 races on a new id (expected version 0).
        let mut tasks = Vec::new();
        for c in 0..16 {
            let mut users = s.users.clone();
            tasks.push(tokio::spawn(async move {
                // "round" makes every write a real change: a no-op with the
                // right expected_version also succeeds, by design.
                let mut request = merge("contended", json!({ "winner": c, "round": round }));
                request.expected_version = Some(round);
                users.merge(request).await.map(|r| r.into_inner())
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(m) => winners.push(m),
                Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one writer wins");
        let stored = get(&mut s.users, "contended").await;
        assert_eq!(stored.version, round + 1);
        assert_eq!(stored, winners[0], "the losers changed nothing");
    }
    assert_one_event_per_version(&s, "contended", 3).await;
}

/// Concurrent writes with different fates at once (SQLite runs them in one
/// group transaction): each gets its own outcome, a refused one writes
/// nothing, and the others are stored with one event each.
async fn concurrent_writes_keep_their_own_outcomes(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    let big = "x".repeat(5000);
    write(&mut s.users, "big", json!({ "a": big })).await;
    write(&mut s.users, "contended", json!({ "seed": true })).await;
    let mut tasks = Vec::new();
    for c in 0..48u64 {
        let mut users = s.users.clone();
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            let request = match c % 3 {
                // Only the first of these to run wins.
                0 => {
                    let mut r = merge("contended", json!({ "winner": c }));
                    r.expected_version = Some(1);
                    r
                }
                // Over the field limit once merged: refused inside the write.
                1 => merge("big", json!({ format!("b{c}"): big })),
                _ => merge(&format!("own{c}"), json!({ "c": c })),
            };
            (c % 3, users.merge(request).await.map(|r| r.into_inner()))
        }));
    }
    let (mut winners, mut own) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (0, Ok(_)) => winners += 1,
            (0, Err(status)) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
            (1, result) => {
                let status = result.expect_err("over the limit");
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            }
            (_, result) => {
                assert_eq!(result.expect("own id").version, 1);
                own += 1;
            }
        }
    }
    assert_eq!((winners, own), (1, 16));
    assert_eq!(
        get(&mut s.users, "big").await.version,
        1,
        "refused writes wrote nothing"
    );
    assert_eq!(get(&mut s.users, "contended").await.version, 2);
    // Seeds, the winner and the 16 own ids: one event each, no gap.
    let revisions = s.db.event_revisions().await;
    assert_eq!(revisions.len(), 2 + 1 + 16, "{revisions:?}");
    if backend == Backend::Sqlite {
        assert_eq!(revisions, (1..=19).collect::<Vec<u64>>());
    }
}

/// Many Gets at once (the store reads them in batches): each gets its own
/// record, for both kinds, repeated ids and ids never written.
async fn concurrent_gets_each_get_their_own_record(backend: Backend) {
    let Some(mut s) = start(backend).await else {
        return;
    };
    for n in 0..10u64 {
        write(&mut s.users, &format!("reader{n}"), json!({ "n": n })).await;
        let org = MergeOrganizationMetadataRequest {
            organization_id: format!("reader{n}"),
            public_metadata: Some(structure(&json!({ "org": n }))),
            ..Default::default()
        };
        s.orgs.merge(org).await.unwrap();
    }
    let mut tasks = Vec::new();
    for c in 0..120u64 {
        let (mut users, mut orgs) = (s.users.clone(), s.orgs.clone());
        tasks.push(tokio::spawn(async move {
            // Ids 10..14 were never written.
            let n = c % 15;
            let id = format!("reader{n}");
            if c % 2 == 0 {
                let got = users
                    .get(GetUserMetadataRequest {
                        user_id: id,
                        revision: None,
                    })
                    .await
                    .unwrap();
                let expected = if n < 10 { json!({ "n": n }) } else { json!({}) };
                assert_eq!(field(&got.into_inner().public_metadata), expected);
            } else {
                let request = GetOrganizationMetadataRequest {
                    organization_id: id,
                    revision: None,
                };
                let got = orgs.get(request).await.unwrap().into_inner();
                let expected = if n < 10 {
                    json!({ "org": n })
                } else {
                    json!({})
                };
                assert_eq!(field(&got.public_metadata), expected);
                assert_eq!(got.version, u64::from(n < 10));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

backend_tests!(
    timed_out_writes_say_whether_they_may_have_committed,
    no_lost_updates,
    first_writes_race_without_loss,
    expected_version_race_has_one_winner,
    concurrent_writes_keep_their_own_outcomes,
    concurrent_gets_each_get_their_own_record
);

/// Two server processes on one Postgres database, 16 clients split over
/// them: still no lost update, one event per version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_no_lost_updates_across_servers() {
    let Some(mut s) = start_with(Backend::Postgres, roomy).await else {
        return;
    };
    let other = s.another_server().await;
    let other_users =
        UserMetadataServiceClient::new(crate::harness::connect(other.local_addr()).await);
    merge_storm(&[s.users.clone(), other_users], "hot").await;
    let m = get(&mut s.users, "hot").await;
    let Json::Object(keys) = field(&m.public_metadata) else {
        panic!("object")
    };
    assert_eq!((keys.len(), m.version), (1600, 1600));
    assert_one_event_per_version(&s, "hot", 1600).await;
    other.shutdown().await.unwrap();
}

/// Postgres writes to an existing row read it without a lock and write in
/// one statement if it has not moved on. Here another write lands between
/// the read and that statement (the first is stopped right before it): the
/// first must see that, and build on the other's result in a locked
/// transaction instead; an `expected_version` read before the other write
/// must then refuse. Nothing is lost, each version has one event whose
/// `before` is the previous one's `after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_overtaken_after_its_read_builds_on_the_newer_row() {
    use metadata_service::store::StorePauses;
    let pauses = StorePauses::default();
    let commit = pauses.commit.clone();
    let Some(mut s) = start_with(Backend::Postgres, |c| c.store.pauses = pauses).await else {
        return;
    };
    write(&mut s.users, "u", json!({"base": 0})).await;

    commit.arm(1);
    let mut first = s.users.clone();
    let overtaken = tokio::spawn(async move { first.merge(merge("u", json!({"first": 1}))).await });
    assert!(commit.reached(Duration::from_secs(10)).await);
    // Not stopped (the pause was armed for one pass): lands first.
    let second = write(&mut s.users, "u", json!({"second": 2})).await;
    assert_eq!(second.version, 2);
    commit.release();
    let first = overtaken.await.unwrap().expect("the overtaken write lands");
    let first = first.into_inner();
    assert_eq!(first.version, 3);
    assert_eq!(
        field(&first.public_metadata),
        json!({"base": 0, "first": 1, "second": 2})
    );
    assert_one_event_per_version(&s, "u", 3).await;
    let db = s.db.connect().await;
    let chained = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT bool_and(e.before = p.after) AS chained FROM events e \
             JOIN events p ON p.id = e.id AND (p.after->>'version')::int + 1 = (e.after->>'version')::int \
             WHERE e.id = 'u'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<bool>("", "chained")
        .unwrap();
    db.close().await.ok();
    assert!(chained, "each event's before is the previous one's after");

    // The same race with a version check decided before the other write.
    commit.arm(1);
    let mut checked = s.users.clone();
    let refused = tokio::spawn(async move {
        checked
            .replace(ReplaceUserMetadataRequest {
                user_id: "u".into(),
                public_metadata: Some(crate::common::json::value(&json!({"replaced": true}))),
                expected_version: Some(3),
                ..Default::default()
            })
            .await
    });
    assert!(commit.reached(Duration::from_secs(10)).await);
    write(&mut s.users, "u", json!({"third": 3})).await;
    commit.release();
    let status = refused.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let now = get(&mut s.users, "u").await;
    assert_eq!(now.version, 4);
    assert_eq!(
        field(&now.public_metadata),
        json!({"base": 0, "first": 1, "second": 2, "third": 3})
    );
    assert_one_event_per_version(&s, "u", 4).await;
}

/// Holds SQLite's write lock from another connection until dropped.
pub(crate) struct SqliteLock(DatabaseConnection);

impl SqliteLock {
    pub(crate) async fn take(s: &TestServer) -> SqliteLock {
        let db = s.db.connect().await;
        db.execute_unprepared("BEGIN EXCLUSIVE")
            .await
            .expect("take the lock");
        SqliteLock(db)
    }

    pub(crate) async fn release(self) {
        self.0.execute_unprepared("ROLLBACK").await.unwrap();
        self.0.close().await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once() {
    use metadata_service::store::StorePauses;
    let pauses = StorePauses::default();
    let commit = pauses.commit.clone();
    let mut s = start_with(Backend::Sqlite, |c| {
        c.max_concurrent_requests = 1;
        c.store.pauses = pauses;
    })
    .await
    .unwrap();
    s.users.merge(merge("u", json!({"a":1}))).await.unwrap();
    // This write holds the only permit while it is stopped before its
    // COMMIT: admitted, and not done.
    commit.arm(1);
    let mut blocked_client = s.users.clone();
    let blocked =
        tokio::spawn(async move { blocked_client.merge(merge("u", json!({"b":2}))).await });
    assert!(
        commit.reached(Duration::from_secs(10)).await,
        "the write holding the permit is under way"
    );
    let started = Instant::now();
    let status = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u".into(),
            revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 1 concurrent"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused without queueing"
    );
    // Watch streams are not counted against the bound.
    s.users
        .watch(WatchUserMetadataRequest::default())
        .await
        .expect("watch still admitted");
    commit.release();
    assert_eq!(
        blocked
            .await
            .unwrap()
            .expect("the blocked write completes")
            .into_inner()
            .version,
        2
    );
    assert_eq!(
        get(&mut s.users, "u").await.version,
        2,
        "a permit is free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_time_budget_and_deadlines() {
    let mut s = start_with(Backend::Sqlite, |c| {
        c.db_timeout = Duration::from_millis(400)
    })
    .await
    .unwrap();
    s.users.merge(merge("u", json!({"a":1}))).await.unwrap();
    let lock = SqliteLock::take(&s).await;

    // The server's own budget: UNAVAILABLE, retryable.
    let started = Instant::now();
    let status = s.users.merge(merge("u", json!({"b":2}))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("did not answer within"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // A client deadline shorter than the budget: DEADLINE_EXCEEDED.
    let mut request = Request::new(merge("u", json!({"c":3})));
    request.set_timeout(Duration::from_millis(100));
    let status = s.users.merge(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    lock.release().await;
    let after = get(&mut s.users, "u").await;
    assert_eq!(
        (after.version, field(&after.public_metadata)),
        (1, json!({"a":1})),
        "nothing half-written"
    );
}

/// When the server's own budget runs out, the status tells whether the
/// write may have happened: UNAVAILABLE (retry) only while it certainly did
/// not, DEADLINE_EXCEEDED once its COMMIT may have been sent. Both are shown
/// to be true: the refused write never lands, the other one does.
async fn timed_out_writes_say_whether_they_may_have_committed(backend: Backend) {
    use metadata_service::store::StorePauses;
    let pauses = StorePauses::default();
    let commit = pauses.commit.clone();
    let Some(mut s) = start_with(backend, |c| {
        c.db_timeout = Duration::from_millis(400);
        c.store.pauses = pauses;
    })
    .await
    else {
        return;
    };
    s.users.merge(merge("u", json!({"a":1}))).await.unwrap();

    // Certainly not: the write waits for a lock before anything is sent.
    let db = s.db.connect().await;
    let blocker = match backend {
        Backend::Sqlite => "BEGIN EXCLUSIVE",
        Backend::Postgres => "BEGIN; SELECT 1 FROM metadata WHERE id = 'u' FOR UPDATE",
    };
    db.execute_unprepared(blocker).await.unwrap();
    let status = s.users.merge(merge("u", json!({"b":2}))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    db.execute_unprepared("ROLLBACK").await.unwrap();
    db.close().await.ok();
    // Had the refused write gone on once the lock was free, it would be
    // ahead of this one (on SQLite for the one writer connection, on
    // Postgres for the row's lock), and this one would not be version 2.
    let next = write(&mut s.users, "u", json!({"d":4})).await;
    assert_eq!(
        (next.version, field(&next.public_metadata)),
        (2, json!({"a":1,"d":4})),
        "the refused write never happened"
    );

    // May have: the write is stopped right before its COMMIT.
    commit.arm(1);
    let status = s.users.merge(merge("u", json!({"c":3}))).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("may have been applied"),
        "{}",
        status.message()
    );
    assert!(commit.reached(Duration::from_secs(5)).await);
    commit.release();
    let after = until(
        "the write told it may have been applied commits in the end",
        Duration::from_secs(10),
        async || {
            let after = get(&mut s.users, "u").await;
            if after.version == 3 {
                Ok(after)
            } else {
                Err(after.version)
            }
        },
    )
    .await;
    assert_eq!(field(&after.public_metadata), json!({"a":1,"d":4,"c":3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_database_is_a_clear_error() {
    let mut s = start_with(Backend::Sqlite, |c| {
        c.store.sqlite_busy_timeout = Duration::from_millis(200)
    })
    .await
    .unwrap();
    let lock = SqliteLock::take(&s).await;
    let status = s.users.merge(merge("u", json!({"a":1}))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the database is locked; retry later");
    lock.release().await;
    assert_eq!(
        s.users
            .merge(merge("u", json!({"a":1})))
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    assert_eq!(get(&mut s.users, "u").await.version, 1);
}

/// A write whose caller gave up (told UNAVAILABLE: certainly not applied)
/// while its group could not begin must not be run alone afterwards: the
/// caller may retry, and the write would then land twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_given_up_before_its_group_began_never_lands() {
    let busy = Duration::from_millis(300);
    let mut s = start_with(Backend::Sqlite, |c| {
        c.store.sqlite_busy_timeout = busy;
        c.db_timeout = Duration::from_millis(150);
    })
    .await
    .unwrap();
    let lock = SqliteLock::take(&s).await;
    let status = s
        .users
        .merge(merge("u", json!({"given_up": true})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("retry later"), "{status:?}");
    // Past the busy timeout, the group's BEGIN has failed (had it not, the
    // group would drop the write whose caller left, which passes too). Time
    // is what is tested: the timeout is SQLite's own, run out while the
    // lock is held, and nothing in the server shows the moment it fails.
    tokio::time::sleep(busy + Duration::from_millis(100)).await;
    lock.release().await;
    let next = s
        .users
        .merge(merge("u", json!({"next": true})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.version, 1, "the given-up write landed first");
    assert_eq!(field(&next.public_metadata), json!({"next": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_read_only_database_is_a_clear_error() {
    let mut s = start(Backend::Sqlite).await.unwrap();
    s.users.merge(merge("u", json!({"a":1}))).await.unwrap();
    s.stop().await;
    let read_only_url = s.db.url().replace("mode=rwc", "mode=ro");
    let mut config = common::config(&read_only_url);
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = metadata_service::server::start(&config)
        .await
        .expect("serves a read-only file");
    let mut users =
        UserMetadataServiceClient::new(crate::harness::connect(server.local_addr()).await);
    assert_eq!(get(&mut users, "u").await.version, 1, "reads work");
    let status = users.merge(merge("u", json!({"b":2}))).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "the database is read-only");
    assert_eq!(get(&mut users, "u").await.version, 1);
    server.shutdown().await.unwrap();
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

async fn wait_for_health(s: &TestServer, wanted: ServingStatus) {
    let what = format!("health becomes {wanted:?}");
    until(&what, Duration::from_secs(15), async || {
        match health(s.channel().await).await {
            Ok(status) if status == wanted => Ok(()),
            seen => Err(seen),
        }
    })
    .await
}

/// The database refuses this service's connections, then accepts them
/// again: calls fail fast with UNAVAILABLE, health follows, and everything
/// recovers without a restart, Watch included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_and_recovery() {
    let Some(mut s) = start_with(Backend::Postgres, |c| {
        c.db_health_interval = Duration::from_millis(200);
        c.db_timeout = Duration::from_secs(2);
        c.events.broker.poll_interval = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let first = s
        .users
        .merge(merge("u", json!({"n":0})))
        .await
        .unwrap()
        .into_inner();
    let database = s.db.postgres().name.clone();
    let admin = s.db.postgres().admin().await;
    let sql = |text: String| Statement::from_string(admin.get_database_backend(), text);

    // Outage: no new connections, existing ones killed.
    admin
        .execute_raw(sql(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
        )))
        .await
        .unwrap();
    admin
        .execute_raw(sql(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        )))
        .await
        .unwrap();
    wait_for_health(&s, ServingStatus::NotServing).await;
    for _ in 0..5 {
        let mut request = Request::new(merge("u", json!({"lost": true})));
        request.set_timeout(Duration::from_secs(3));
        let started = Instant::now();
        let status = s.users.merge(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "fails fast: {:?}",
            started.elapsed()
        );
    }
    let status = s
        .users
        .get(GetUserMetadataRequest {
            user_id: "u".into(),
            revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    // Recovery.
    admin
        .execute_raw(sql(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        )))
        .await
        .unwrap();
    admin.close().await.ok();
    wait_for_health(&s, ServingStatus::Serving).await;
    let second = until("writes recover", Duration::from_secs(10), async || match s
        .users
        .merge(merge("u", json!({"n":1})))
        .await
    {
        Ok(m) => Ok(m.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            Err(status)
        }
    })
    .await;
    assert_eq!(second.version, 2, "the failed writes wrote nothing");
    // A watcher resuming from before the outage gets both events.
    let mut stream = s
        .users
        .watch(WatchUserMetadataRequest {
            start_revision: first.revision,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut revisions = Vec::new();
    while revisions.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(watch_user_metadata_response::Response::Event(e)) = message.response {
            revisions.push(e.revision);
        }
    }
    assert_eq!(revisions, vec![first.revision, second.revision]);
}
