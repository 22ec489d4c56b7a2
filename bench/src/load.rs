//! Closed-loop load: C clients, each issuing its next call when the previous
//! one returns, for a fixed time; through the service, or the same database
//! work in raw SQL (the baseline).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::{GetUserMetadataRequest, MergeUserMetadataRequest};
use prost_types::value::Kind as ProtoKind;
use prost_types::{Struct, Value as ProtoValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::db::{RawPool, id};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Merge,
    Get,
    /// 90% Get, 10% Merge.
    Mix,
    /// grpc.health.v1 Check: a call with no database work, the ceiling of
    /// gRPC calls this machine can make (its baseline is `SELECT 1`).
    Ping,
    /// Merge, its clients spread over two replicas on one database.
    Merge2,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Merge => "merge",
            Workload::Get => "get",
            Workload::Mix => "mix",
            Workload::Ping => "ping",
            Workload::Merge2 => "merge2",
        }
    }

    fn merges(self, rng: &mut SmallRng) -> bool {
        match self {
            Workload::Merge | Workload::Merge2 => true,
            Workload::Get | Workload::Ping => false,
            Workload::Mix => rng.random_range(0..10) == 0,
        }
    }
}

/// Microseconds from 1 µs to an hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// What a run measured.
pub struct Measured {
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
}

impl Measured {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `clients` loops of `op` for `duration` and merges their results.
/// Each client gets its own index (for its own connection or id range).
///
/// Client n's random numbers are seeded with n + 1, the same in every run:
/// a run after a warm-up of the same workload repeats the warm-up's merges
/// first, and a merge that finds its id still holding those values writes
/// nothing. See [`closed_loop_seeded`].
pub async fn closed_loop<F, Fut>(clients: usize, duration: Duration, op: F) -> Measured
where
    F: Fn(usize, &mut SmallRng) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    closed_loop_seeded(clients, duration, 0, op).await
}

/// [`closed_loop`] with client n seeded with `seed * 65_537 + n + 1`: runs
/// given different seeds draw different ids and values.
pub async fn closed_loop_seeded<F, Fut>(
    clients: usize,
    duration: Duration,
    seed: u64,
    op: F,
) -> Measured
where
    F: Fn(usize, &mut SmallRng) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let end = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(
                    seed.wrapping_mul(65_537).wrapping_add(client as u64 + 1),
                );
                let mut latency = latency_histogram();
                let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < end {
                    let t = Instant::now();
                    match op(client, &mut rng).await {
                        Ok(()) => {
                            ops += 1;
                            latency.saturating_record(t.elapsed().as_micros() as u64);
                        }
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert(err);
                        }
                    }
                }
                (ops, errors, first_error, latency)
            })
        })
        .collect();
    let mut total = Measured {
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latency: latency_histogram(),
    };
    for task in tasks {
        let (ops, errors, first_error, latency) = task.await.expect("client task");
        total.ops += ops;
        total.errors += errors;
        if total.first_error.is_none() {
            total.first_error = first_error;
        }
        total.latency.add(latency).unwrap();
    }
    total.elapsed = started.elapsed();
    total
}

fn number(n: f64) -> ProtoValue {
    ProtoValue {
        kind: Some(ProtoKind::NumberValue(n)),
    }
}

/// The patch every Merge sends: three keys with fresh values.
pub fn patch(rng: &mut SmallRng) -> [(String, i64); 3] {
    ["k1", "k2", "k3"].map(|k| (k.to_string(), rng.random_range(0..1_000_000)))
}

pub async fn service(
    channels: Vec<Channel>,
    workload: Workload,
    clients: usize,
    ids: u64,
    duration: Duration,
) -> Measured {
    service_seeded(channels, workload, clients, ids, duration, 0).await
}

/// [`service`], seeded as [`closed_loop_seeded`].
pub async fn service_seeded(
    channels: Vec<Channel>,
    workload: Workload,
    clients: usize,
    ids: u64,
    duration: Duration,
    seed: u64,
) -> Measured {
    let channels = Arc::new(channels);
    closed_loop_seeded(clients, duration, seed, move |client, rng| {
        let channel = channels[client % channels.len()].clone();
        let mut users = UserMetadataServiceClient::new(channel.clone());
        let user_id = id(rng.random_range(0..ids));
        let merge = workload.merges(rng);
        let fields = patch(rng);
        async move {
            if workload == Workload::Ping {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                return health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(drop)
                    .map_err(|status| format!("{:?}: {}", status.code(), status.message()));
            }
            if merge {
                let request = MergeUserMetadataRequest {
                    user_id,
                    public_metadata: Some(Struct {
                        fields: fields
                            .into_iter()
                            .map(|(k, v)| (k, number(v as f64)))
                            .collect(),
                    }),
                    ..Default::default()
                };
                users.merge(request).await.map(drop)
            } else {
                users
                    .get(GetUserMetadataRequest {
                        user_id,
                        revision: None,
                    })
                    .await
                    .map(drop)
            }
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
        }
    })
    .await
}

/// The baseline. `notify`: Postgres merges also `pg_notify` before they
/// commit, as the service's writers did when replicas learned of new
/// revisions that way, so that the cost of an in-transaction NOTIFY stays
/// measured next to the floor.
pub async fn raw(
    pool: RawPool,
    workload: Workload,
    clients: usize,
    ids: u64,
    duration: Duration,
    notify: bool,
) -> Measured {
    // SQLite has one writer at a time; like the service, queue writers in
    // the process rather than let them spin on SQLITE_BUSY.
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    closed_loop(clients, duration, move |_, rng| {
        let pool = pool.clone();
        let gate = gate.clone();
        let user_id = id(rng.random_range(0..ids));
        let merge = workload.merges(rng);
        let fields = patch(rng);
        async move {
            let result = match (&pool, merge) {
                (RawPool::Postgres(pool), _) if workload == Workload::Ping => {
                    sqlx::query("SELECT 1").execute(pool).await.map(drop)
                }
                (RawPool::Sqlite(pool), _) if workload == Workload::Ping => {
                    sqlx::query("SELECT 1").execute(pool).await.map(drop)
                }
                (RawPool::Postgres(pool), true) => {
                    raw_merge_postgres(pool, &user_id, &fields, notify).await
                }
                (RawPool::Sqlite(pool), true) => {
                    let _gate = gate.lock().await;
                    raw_merge_sqlite(pool, &user_id, &fields).await
                }
                (RawPool::Postgres(pool), false) => raw_get_postgres(pool, &user_id).await,
                (RawPool::Sqlite(pool), false) => raw_get_sqlite(pool, &user_id).await,
            };
            result.map_err(|err| err.to_string())
        }
    })
    .await
}

/// The stored state and the event snapshots, as the service writes them.
pub fn snapshot(
    public: &Value,
    version: i64,
    revision: i64,
    created: &str,
    updated: &str,
) -> Value {
    json!({
        "public_metadata": public,
        "private_metadata": {},
        "unsafe_metadata": {},
        "version": version,
        "revision": revision,
        "created_at": created,
        "updated_at": updated,
    })
}

pub fn merged(mut public: Value, fields: &[(String, i64); 3]) -> Value {
    if let Value::Object(map) = &mut public {
        for (k, v) in fields {
            map.insert(k.clone(), json!(v));
        }
    }
    public
}

type RawResult = Result<(), sqlx::Error>;

/// Lock the row, compute the merge, write the row, take a revision, append
/// the event with before/after, (notify,) commit.
async fn raw_merge_postgres(
    pool: &sqlx::PgPool,
    user_id: &str,
    fields: &[(String, i64); 3],
    notify: bool,
) -> RawResult {
    use sqlx::Row;
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT public_metadata, version, revision, created_at FROM metadata \
         WHERE kind = 'user' AND id = $1 FOR UPDATE",
    )
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    let before: Value = row.try_get::<sqlx::types::Json<Value>, _>(0)?.0;
    let version: i64 = row.try_get(1)?;
    let old_revision: i64 = row.try_get(2)?;
    let created: chrono::DateTime<chrono::Utc> = row.try_get(3)?;
    let after = merged(before.clone(), fields);
    let now = chrono::Utc::now();
    // The revision is taken as the service takes it (sequence and the
    // advisory lock on it), so the event stream sees a writer like any
    // other and the work compared is the same.
    let taken = sqlx::query(sqlx::AssertSqlSafe(
        metadata_service::store::take_revision_sql(),
    ))
    .fetch_one(&mut *tx)
    .await?;
    let revision: i64 = taken.try_get("latest")?;
    if !taken.try_get::<bool, _>("owned")? {
        return Err(sqlx::Error::Protocol("revision claimed as void".into()));
    }
    sqlx::query(
        "UPDATE metadata SET public_metadata = $2, version = version + 1, \
         revision = $4, updated_at = $3 WHERE kind = 'user' AND id = $1",
    )
    .bind(user_id)
    .bind(sqlx::types::Json(&after))
    .bind(now)
    .bind(revision)
    .execute(&mut *tx)
    .await?;
    let created = created.to_rfc3339();
    let updated = now.to_rfc3339();
    sqlx::query(
        "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
         VALUES ($1, 'user', $2, 'merged', '[\"public_metadata\"]', $3, $4, $5) \
         ON CONFLICT (revision) DO NOTHING",
    )
    .bind(revision)
    .bind(user_id)
    .bind(sqlx::types::Json(snapshot(&before, version, old_revision, &created, &created)))
    .bind(sqlx::types::Json(snapshot(&after, version + 1, revision, &created, &updated)))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if notify {
        // A channel of its own: the cost is Postgres's commit-time lock,
        // whatever the channel, and the idle server under test must not be
        // woken (and read its log) by every baseline write.
        sqlx::query("SELECT pg_notify('bench_events', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

async fn raw_merge_sqlite(
    pool: &sqlx::SqlitePool,
    user_id: &str,
    fields: &[(String, i64); 3],
) -> RawResult {
    use sqlx::Row;
    let mut conn = pool.acquire().await?;
    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    let row = sqlx::query(
        "SELECT public_metadata, version, revision, created_at FROM metadata WHERE kind = 'user' AND id = ?",
    )
    .bind(user_id)
    .fetch_one(&mut *tx)
    .await?;
    let before: Value = serde_json::from_str(row.try_get::<&str, _>(0)?)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let version: i64 = row.try_get(1)?;
    let old_revision: i64 = row.try_get(2)?;
    let created: String = row.try_get(3)?;
    let after = merged(before.clone(), fields);
    let revision: i64 = sqlx::query_scalar(
        "UPDATE revisions SET latest = latest + 1 WHERE id = 1 RETURNING latest",
    )
    .fetch_one(&mut *tx)
    .await?;
    let updated = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    sqlx::query(
        "UPDATE metadata SET public_metadata = ?2, version = version + 1, revision = ?3, updated_at = ?4 \
         WHERE kind = 'user' AND id = ?1",
    )
    .bind(user_id)
    .bind(after.to_string())
    .bind(revision)
    .bind(&updated)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at) \
         VALUES (?1, 'user', ?2, 'merged', '[\"public_metadata\"]', ?3, ?4, ?5)",
    )
    .bind(revision)
    .bind(user_id)
    .bind(snapshot(&before, version, old_revision, &created, &created).to_string())
    .bind(snapshot(&after, version + 1, revision, &created, &updated).to_string())
    .bind(&updated)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The point select, with the JSON decoded (the service decodes it too).
async fn raw_get_postgres(pool: &sqlx::PgPool, user_id: &str) -> RawResult {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT public_metadata, private_metadata, unsafe_metadata, version, revision, created_at, updated_at \
         FROM metadata WHERE kind = 'user' AND id = $1",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await?;
    for column in 0..3 {
        row.try_get::<sqlx::types::Json<Value>, _>(column)?;
    }
    Ok(())
}

async fn raw_get_sqlite(pool: &sqlx::SqlitePool, user_id: &str) -> RawResult {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT public_metadata, private_metadata, unsafe_metadata, version, revision, created_at, updated_at \
         FROM metadata WHERE kind = 'user' AND id = ?",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await?;
    for column in 0..3 {
        serde_json::from_str::<Value>(row.try_get::<&str, _>(column)?)
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    }
    Ok(())
}
