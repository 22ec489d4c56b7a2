//! Safe retries (AIP-155): a transaction that carries a request id claims
//! it first, in its own database transaction, and stores its outcome there
//! when it ends; a retry with that id (on any replica, after any restart)
//! is answered that outcome without writing again. The claim comes before
//! the transaction locks any record: a retry sent while the first attempt
//! still runs waits on the claim (the id's primary key) rather than on the
//! records, and then reads the outcome, instead of running again against
//! what the first attempt wrote. Claims older than the retry window are
//! taken over as if new, and swept (`Store::prune_requests`).

use std::time::Duration;

use sea_orm::sqlx::{self, PgConnection, Row, SqliteConnection};
use serde_json::{Value, json};

use super::StoreError;
use super::rows::{from_snapshot, snapshot};
use super::transaction::{Committed, RequestKey, TxnDone};
use super::write::WriteOutcome;
use crate::model::Kind;

/// What a claim found.
pub(super) enum Claim {
    /// The id is this transaction's now: run it, then [`record`] it.
    Taken,
    /// A first attempt committed: its outcome is the answer.
    Answered(Committed),
}

/// `$n` placeholders as SQLite spells them (`?n`).
fn sqlite(sql: &str) -> String {
    sql.replace('$', "?")
}

const INSERT: &str = "INSERT INTO requests (request_id, fingerprint, outcome, created_at) \
     VALUES ($1, $2, 'null', $3) ON CONFLICT (request_id) DO NOTHING RETURNING 1 AS taken";
const TAKE_OVER: &str = "UPDATE requests SET fingerprint = $2, outcome = 'null', created_at = $3 \
     WHERE request_id = $1 AND created_at < $4 RETURNING 1 AS taken";
const READ: &str = "SELECT fingerprint, outcome FROM requests WHERE request_id = $1";
const RECORD: &str = "UPDATE requests SET outcome = $2 WHERE request_id = $1";

/// The one decision, whatever the backend: `taken` by the insert or the
/// take-over, else the stored row's answer.
fn decide(
    key: &RequestKey,
    taken: bool,
    stored: Option<(String, Value)>,
) -> Result<Claim, StoreError> {
    if taken {
        return Ok(Claim::Taken);
    }
    match stored {
        Some((fingerprint, _)) if fingerprint != key.fingerprint => Err(key.reused()),
        Some((_, outcome)) => Ok(Claim::Answered(decode(&outcome)?)),
        None => Err(StoreError::Internal(
            "a request id was neither free nor stored".into(),
        )),
    }
}

/// The claim and the record of an outcome, on one backend's connection
/// type, with its placeholders (`spell` turns `$n` into them): the same
/// statements and the same decision on both.
macro_rules! claim_and_record {
    ($claim:ident, $record:ident, $connection:ty, $spell:expr) => {
        pub(super) async fn $claim(
            connection: &mut $connection,
            key: &RequestKey,
        ) -> Result<Claim, StoreError> {
            let now = super::write::now();
            let inserted = sqlx::query(sqlx::AssertSqlSafe($spell(INSERT)))
                .bind(&key.id)
                .bind(&key.fingerprint)
                .bind(now)
                .fetch_optional(&mut *connection)
                .await?;
            let mut taken = inserted.is_some();
            if !taken {
                taken = sqlx::query(sqlx::AssertSqlSafe($spell(TAKE_OVER)))
                    .bind(&key.id)
                    .bind(&key.fingerprint)
                    .bind(now)
                    .bind(key.cutoff())
                    .fetch_optional(&mut *connection)
                    .await?
                    .is_some();
            }
            let stored = match taken {
                true => None,
                false => sqlx::query(sqlx::AssertSqlSafe($spell(READ)))
                    .bind(&key.id)
                    .fetch_optional(&mut *connection)
                    .await?
                    .map(|row| -> Result<_, sqlx::Error> {
                        Ok((row.try_get("fingerprint")?, row.try_get("outcome")?))
                    })
                    .transpose()?,
            };
            decide(key, taken, stored)
        }

        pub(super) async fn $record(
            connection: &mut $connection,
            key: &RequestKey,
            committed: &Committed,
        ) -> Result<(), StoreError> {
            sqlx::query(sqlx::AssertSqlSafe($spell(RECORD)))
                .bind(&key.id)
                .bind(encode(committed))
                .execute(connection)
                .await?;
            Ok(())
        }
    };
}

claim_and_record!(claim_postgres, record_postgres, PgConnection, String::from);
claim_and_record!(claim_sqlite, record_sqlite, SqliteConnection, sqlite);

/// An outcome as stored: each result with its record's snapshot.
fn encode(committed: &Committed) -> Value {
    let results: Vec<Value> = committed
        .results
        .iter()
        .map(|done| match done {
            TxnDone::Written(outcome) => json!({
                "kind": outcome.record.kind.as_str(),
                "id": outcome.record.id,
                "changed": outcome.changed,
                "record": snapshot(&outcome.record),
            }),
            TxnDone::Deleted { existed } => json!({ "deleted": existed }),
        })
        .collect();
    json!({
        "results": results,
        "revision": committed.revision,
        "transaction_id": committed.transaction_id,
    })
}

fn decode(outcome: &Value) -> Result<Committed, StoreError> {
    let bad = || StoreError::Internal("a stored request outcome is malformed".into());
    let results = outcome
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|result| {
            if let Some(existed) = result.get("deleted").and_then(Value::as_bool) {
                return Ok(TxnDone::Deleted { existed });
            }
            let kind = result
                .get("kind")
                .and_then(Value::as_str)
                .and_then(Kind::parse)
                .ok_or_else(bad)?;
            let id = result.get("id").and_then(Value::as_str).ok_or_else(bad)?;
            let record = from_snapshot(kind, id, result.get("record").cloned().ok_or_else(bad)?)?;
            let changed = result
                .get("changed")
                .and_then(Value::as_bool)
                .ok_or_else(bad)?;
            Ok(TxnDone::Written(WriteOutcome { record, changed }))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Committed {
        results,
        revision: outcome
            .get("revision")
            .and_then(Value::as_u64)
            .ok_or_else(bad)?,
        transaction_id: outcome
            .get("transaction_id")
            .and_then(Value::as_str)
            .ok_or_else(bad)?
            .to_owned(),
    })
}

impl super::Store {
    /// Deletes request ids older than `ttl`: past the retry window, a
    /// retry is a new request.
    pub async fn prune_requests(&self, ttl: Duration) -> Result<u64, StoreError> {
        use sea_orm::ConnectionTrait;
        let key = RequestKey {
            id: String::new(),
            fingerprint: String::new(),
            ttl,
        };
        let backend = self.shared.db.get_database_backend();
        let sql = match backend {
            sea_orm::DatabaseBackend::Postgres => "DELETE FROM requests WHERE created_at < $1",
            _ => "DELETE FROM requests WHERE created_at < ?",
        };
        let statement =
            sea_orm::Statement::from_sql_and_values(backend, sql, [key.cutoff().into()]);
        Ok(self.shared.db.execute_raw(statement).await?.rows_affected())
    }
}
