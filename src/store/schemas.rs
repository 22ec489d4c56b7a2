//! Stored JSON Schemas (issue 18), and how every write is held to them on
//! every replica.
//!
//! Each process caches the compiled schemas of a kind with their
//! *generation*, the sum of the kind's schema versions (versions only
//! grow, so any change moves it). A write validates what it will store
//! against the cached schemas, and its statement writes only if the
//! generation in the database is still the cached one (the guard in each
//! backend's write statement: `postgres/write_change.sql`,
//! `sqlite/write.rs`); otherwise
//! it writes nothing, the cache is reloaded and the write runs again.
//!
//! SetSchema locks the `metadata` table against writes (`SHARE ROW
//! EXCLUSIVE`: writes wait, reads go on), then checks every stored value
//! and stores the schema, in one transaction. A write that committed before
//! the lock is in the check; one that waits for the lock takes its
//! statement's snapshot after it (Postgres snapshots a statement once its
//! table locks are granted), so it sees the new generation and is
//! validated again against the new schema. On SQLite the check runs in an
//! IMMEDIATE transaction, which excludes every writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction, Statement,
    StreamTrait, TransactionTrait,
};
use serde_json::Value;
use tokio_stream::StreamExt;

use super::{Sent, StoreError};
use crate::model::{Field, Fields, Kind};
use crate::schema::{MAX_VIOLATIONS, Schema};

/// A schema as stored: None when none is set (never, or deleted).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSchema {
    pub kind: Kind,
    pub field: Field,
    pub schema: Option<Value>,
    /// 0 when none was ever set.
    pub version: u64,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What one kind's writes are checked against.
#[derive(Debug, Default)]
pub struct KindSchemas {
    pub generation: i64,
    /// Each field's compiled schema and its version.
    schemas: Vec<(Field, u64, Schema)>,
}

impl KindSchemas {
    /// The fields a write provides, as they will be stored, against their
    /// schemas: at most [`MAX_VIOLATIONS`] violations in all.
    pub fn check(&self, provided: &[Field], fields: &Fields) -> Result<(), StoreError> {
        let mut violations = Vec::new();
        for (field, _, schema) in &self.schemas {
            if provided.contains(field) && violations.len() < MAX_VIOLATIONS {
                violations.extend(schema.violations(*field, fields.get(*field)));
            }
        }
        violations.truncate(MAX_VIOLATIONS);
        match violations.is_empty() {
            true => Ok(()),
            false => Err(StoreError::SchemaViolation(violations)),
        }
    }

    fn compiled(&self, field: Field, version: u64) -> Option<&Schema> {
        self.schemas
            .iter()
            .find(|(f, v, _)| *f == field && *v == version)
            .map(|(_, _, schema)| schema)
    }
}

/// This process's compiled schemas, per kind.
#[derive(Default)]
pub(super) struct SchemaCache {
    kinds: Mutex<HashMap<Kind, Arc<KindSchemas>>>,
}

impl SchemaCache {
    pub(super) async fn get(
        &self,
        db: &impl ConnectionTrait,
        kind: Kind,
    ) -> Result<Arc<KindSchemas>, StoreError> {
        let cached = self.lock().get(&kind).cloned();
        match cached {
            Some(schemas) => Ok(schemas),
            None => self.refresh(db, kind).await,
        }
    }

    /// Reads the kind's schemas again, compiling only those whose version
    /// moved.
    pub(super) async fn refresh(
        &self,
        db: &impl ConnectionTrait,
        kind: Kind,
    ) -> Result<Arc<KindSchemas>, StoreError> {
        let previous = self.lock().get(&kind).cloned().unwrap_or_default();
        let mut fresh = KindSchemas::default();
        for row in read_all(db, kind).await? {
            fresh.generation += row.version as i64;
            let Some(schema) = row.schema else { continue };
            let compiled = match previous.compiled(row.field, row.version) {
                Some(compiled) => compiled.clone(),
                None => Schema::compile(&schema).map_err(|err| {
                    StoreError::Internal(format!(
                        "the stored schema of {} {} does not compile: {err}",
                        kind.as_str(),
                        row.field.name()
                    ))
                })?,
            };
            fresh.schemas.push((row.field, row.version, compiled));
        }
        let fresh = Arc::new(fresh);
        self.lock().insert(kind, fresh.clone());
        Ok(fresh)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Kind, Arc<KindSchemas>>> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn parse_field(text: &str) -> Option<Field> {
    Field::ALL.into_iter().find(|f| f.name() == text)
}

/// Every stored schema row of a kind.
async fn read_all(db: &impl ConnectionTrait, kind: Kind) -> Result<Vec<StoredSchema>, StoreError> {
    let backend = db.get_database_backend();
    let sql = format!(
        "SELECT field, schema, version, updated_at FROM metadata_schemas WHERE kind = {}",
        placeholder(backend, 1)
    );
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [kind.as_str().into()],
        ))
        .await?;
    rows.iter()
        .map(|row| {
            let field: String = row.try_get("", "field")?;
            let schema: Value = row.try_get("", "schema")?;
            let version: i64 = row.try_get("", "version")?;
            let updated_at: DateTime<Utc> = row.try_get("", "updated_at")?;
            let field = parse_field(&field).ok_or_else(|| {
                StoreError::Internal(format!("unknown field {field:?} in metadata_schemas"))
            })?;
            Ok(StoredSchema {
                kind,
                field,
                schema: (!schema.is_null()).then_some(schema),
                version: version as u64,
                updated_at: Some(updated_at),
            })
        })
        .collect()
}

fn placeholder(backend: DatabaseBackend, n: usize) -> String {
    match backend {
        DatabaseBackend::Postgres => format!("${n}"),
        _ => "?".into(),
    }
}

/// The stored schema of a kind and field.
pub(super) async fn read(
    db: &impl ConnectionTrait,
    kind: Kind,
    field: Field,
) -> Result<StoredSchema, StoreError> {
    let found = read_all(db, kind)
        .await?
        .into_iter()
        .find(|s| s.field == field);
    Ok(found.unwrap_or(StoredSchema {
        kind,
        field,
        schema: None,
        version: 0,
        updated_at: None,
    }))
}

/// How many stored values break a schema, and some of their ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nonconforming {
    pub count: u64,
    /// The first [`MAX_LISTED_IDS`], in id order.
    pub ids: Vec<String>,
}

/// Most ids a refused SetSchema names.
pub const MAX_LISTED_IDS: usize = 10;

/// What SetSchema asks.
pub struct SetSchema {
    pub kind: Kind,
    pub field: Field,
    pub schema: Value,
    pub compiled: Schema,
    pub expected_version: Option<u64>,
    pub validate_only: bool,
}

/// Locks out writes, checks every stored value of the field (but `{}`),
/// and stores the schema with the next version, unless `validate_only`:
/// then it answers the same and stores nothing. `before_commit` is a
/// test's pause point.
pub(super) async fn set(
    db: &sea_orm::DatabaseConnection,
    request: SetSchema,
    before_commit: &crate::pause::PausePoint,
    sent: &Sent,
) -> Result<StoredSchema, StoreError> {
    let backend = db.get_database_backend();
    let mut session = None;
    let txn = match backend {
        // A dry run stores nothing, so no write has to wait for it: its
        // answer is the one SetSchema would give on the same snapshot.
        DatabaseBackend::Postgres if request.validate_only => db.begin().await?,
        DatabaseBackend::Postgres => {
            let txn = db.begin().await?;
            txn.execute_unprepared("LOCK TABLE metadata IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            session = Some(name_session(&txn).await?);
            txn
        }
        _ => {
            let options = sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            };
            db.begin_with_options(options).await?
        }
    };
    let current = read(&txn, request.kind, request.field).await?;
    super::write::check_version(request.expected_version, current.version)?;
    let nonconforming = scan(&txn, request.kind, request.field, &request.compiled).await?;
    if nonconforming.count > 0 {
        txn.rollback().await?;
        return Err(StoreError::Nonconforming {
            kind: request.kind,
            field: request.field,
            found: nonconforming,
        });
    }
    let next = StoredSchema {
        kind: request.kind,
        field: request.field,
        schema: Some(request.schema),
        version: current.version + 1,
        updated_at: Some(super::write::now()),
    };
    if request.validate_only {
        txn.rollback().await?;
        return Ok(next);
    }
    store(&txn, &next).await?;
    before_commit.pass().await;
    commit(db, txn, session, &next, sent).await?;
    Ok(next)
}

/// Removes the schema; false (and nothing changes) when none is set.
pub(super) async fn delete(
    db: &sea_orm::DatabaseConnection,
    kind: Kind,
    field: Field,
    expected_version: Option<u64>,
    sent: &Sent,
) -> Result<bool, StoreError> {
    let txn = db.begin().await?;
    let session = match db.get_database_backend() {
        DatabaseBackend::Postgres => Some(name_session(&txn).await?),
        _ => None,
    };
    let current = read(&txn, kind, field).await?;
    super::write::check_version(expected_version, current.version)?;
    if current.schema.is_none() {
        txn.rollback().await?;
        return Ok(false);
    }
    let next = StoredSchema {
        schema: None,
        version: current.version + 1,
        updated_at: Some(super::write::now()),
        ..current
    };
    // A version that moved since the read fails the update's check and
    // the caller retries; two deletes cannot both count.
    let stored = store_if(&txn, &next, current.version).await?;
    if !stored {
        txn.rollback().await?;
        return Err(StoreError::VersionMismatch {
            expected: current.version,
            actual: current.version + 1,
        });
    }
    commit(db, txn, session, &next, sent).await?;
    Ok(true)
}

/// Names the transaction's session (Postgres) until it ends, so that if
/// its connection fails after the COMMIT was sent, the session can be
/// found and ended (`postgres/doubt.rs`).
async fn name_session(txn: &DatabaseTransaction) -> Result<Arc<str>, StoreError> {
    let session = super::conns::new_session_name("schema");
    // The name is ours: hex digits, dots and spaces only.
    txn.execute_unprepared(&format!("SET LOCAL application_name = '{session}'"))
        .await?;
    Ok(session)
}

/// Commits a schema change. If the COMMIT's connection fails (Postgres),
/// the change may or may not be stored: its session is ended and the
/// schema read back to learn which, before answering.
async fn commit(
    db: &DatabaseConnection,
    txn: DatabaseTransaction,
    session: Option<Arc<str>>,
    next: &StoredSchema,
    sent: &Sent,
) -> Result<(), StoreError> {
    sent.mark();
    let failure = match txn.commit().await {
        Ok(()) => return Ok(()),
        Err(err) => StoreError::from(err),
    };
    let (Some(session), StoreError::Unavailable { .. }) = (session, &failure) else {
        return Err(failure);
    };
    let stored = super::postgres::settle(db, &session, &failure, || async {
        let current = read(db, next.kind, next.field).await?;
        Ok(
            (current.version == next.version && current.updated_at == next.updated_at)
                .then_some(()),
        )
    })
    .await?;
    match stored {
        Some(()) => Ok(()),
        None => Err(super::postgres::not_applied(failure)),
    }
}

async fn store(db: &impl ConnectionTrait, schema: &StoredSchema) -> Result<(), StoreError> {
    let backend = db.get_database_backend();
    let p = |n| placeholder(backend, n);
    let sql = format!(
        "INSERT INTO metadata_schemas (kind, field, schema, version, updated_at) \
         VALUES ({}, {}, {}, {}, {}) \
         ON CONFLICT (kind, field) DO UPDATE SET schema = excluded.schema, \
         version = excluded.version, updated_at = excluded.updated_at",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5)
    );
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values(schema)))
        .await?;
    Ok(())
}

/// Updates the row only if its version is still `expected`.
async fn store_if(
    db: &impl ConnectionTrait,
    schema: &StoredSchema,
    expected: u64,
) -> Result<bool, StoreError> {
    let backend = db.get_database_backend();
    let p = |n| placeholder(backend, n);
    let sql = format!(
        "UPDATE metadata_schemas SET schema = {}, version = {}, updated_at = {} \
         WHERE kind = {} AND field = {} AND version = {}",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    );
    let [kind, field, schema_value, version, updated_at] = values(schema);
    let values = [
        schema_value,
        version,
        updated_at,
        kind,
        field,
        (expected as i64).into(),
    ];
    let result = db
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(result.rows_affected() == 1)
}

fn values(schema: &StoredSchema) -> [sea_orm::Value; 5] {
    [
        schema.kind.as_str().into(),
        schema.field.name().into(),
        schema.schema.clone().unwrap_or(Value::Null).into(),
        (schema.version as i64).into(),
        schema.updated_at.unwrap_or_else(super::write::now).into(),
    ]
}

/// Every stored value of the field (of records that exist), but `{}`,
/// against `schema`, streamed: memory stays bounded whatever the count.
async fn scan(
    txn: &sea_orm::DatabaseTransaction,
    kind: Kind,
    field: Field,
    schema: &Schema,
) -> Result<Nonconforming, StoreError> {
    let backend = ConnectionTrait::get_database_backend(txn);
    // The column name comes from the closed set of fields, not a request.
    let sql = format!(
        "SELECT id, {column} AS value FROM metadata WHERE kind = {} AND version > 0 ORDER BY id",
        placeholder(backend, 1),
        column = field.name()
    );
    let statement = Statement::from_sql_and_values(backend, sql, [kind.as_str().into()]);
    let mut rows = txn.stream_raw(statement).await?;
    let mut found = Nonconforming {
        count: 0,
        ids: Vec::new(),
    };
    let mut read = 0u64;
    while let Some(row) = rows.next().await {
        let row = row?;
        read += 1;
        // Rows keep arriving while Postgres fills the socket, so the
        // stream is always ready: without a yield the check would hold a
        // runtime worker for its whole length (Gets stalled for seconds).
        if read.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
        let value: Value = row.try_get("", "value")?;
        if value.as_object().is_some_and(|o| o.is_empty()) || schema.is_valid(&value) {
            continue;
        }
        found.count += 1;
        if found.ids.len() < MAX_LISTED_IDS {
            found.ids.push(row.try_get("", "id")?);
        }
    }
    Ok(found)
}
