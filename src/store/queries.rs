//! The facade's reads beyond a point Get, and schemas: List through the
//! pool, with filters rendered in the backend's dialect (`sql.rs`).
//! BatchGet reads as of a revision (`history.rs`).

use sea_orm::{EntityTrait, Statement};

use super::entities::metadata::Entity;
use super::rows::record_from_row;
use super::schemas::{self, SetSchema, StoredSchema};
use super::sql::Sql;
use super::{Sent, Store, StoreError};
use crate::model::{Field, Kind, Record};
use crate::query::Filter;

impl Store {
    pub(super) fn sql(&self) -> Sql {
        Sql::new(self.shared.db.get_database_backend())
    }

    /// Up to `limit` records of `kind` that exist (version above 0) and
    /// match `filter`, ordered by id, from the first id after `after`.
    /// Keyset paging: each page is one indexed range read, however deep.
    /// On SQLite the filter is evaluated row by row as the scan goes, so
    /// memory stays bounded by the page.
    pub async fn list(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Record>, StoreError> {
        let statement = self.list_statement(kind, filter, after, limit);
        let rows = Entity::find()
            .from_raw_sql(statement)
            .all(&self.shared.db)
            .await?;
        Ok(rows.into_iter().map(record_from_row).collect())
    }

    /// The query [`Store::list`] runs (public for tests that EXPLAIN it).
    pub fn list_statement(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: u64,
    ) -> Statement {
        let mut sql = self.sql();
        sql.push("SELECT * FROM metadata WHERE kind = ");
        sql.bind(kind.as_str()).push(" AND version > 0");
        if let Some(after) = after {
            sql.push(" AND id > ").bind(after.to_owned());
        }
        if let Some(filter) = filter {
            sql.push(" AND ").filter(filter);
        }
        sql.push(" ORDER BY id LIMIT ").bind(limit as i64);
        sql.statement()
    }

    /// The schema of a kind and field, as stored.
    pub async fn schema(&self, kind: Kind, field: Field) -> Result<StoredSchema, StoreError> {
        schemas::read(&self.shared.db, kind, field).await
    }

    /// Checks every stored value of the field against the schema, then
    /// stores it (unless `validate_only`). Writes wait meanwhile; once it
    /// returns, no replica stores a value that breaks it.
    /// `sent` is set once the outcome no longer depends on the caller.
    pub async fn set_schema(
        &self,
        request: SetSchema,
        sent: &Sent,
    ) -> Result<StoredSchema, StoreError> {
        let kind = request.kind;
        let db = &self.shared.db;
        let stored = schemas::set(db, request, &self.shared.pauses.set_schema, sent).await?;
        // Not needed for correctness (writes check the generation), but it
        // spares this process's next write a retry.
        self.shared.schemas.refresh(db, kind).await?;
        Ok(stored)
    }

    /// Removes the schema; false when none was set.
    pub async fn delete_schema(
        &self,
        kind: Kind,
        field: Field,
        expected_version: Option<u64>,
        sent: &Sent,
    ) -> Result<bool, StoreError> {
        let db = &self.shared.db;
        let existed = schemas::delete(db, kind, field, expected_version, sent).await?;
        self.shared.schemas.refresh(db, kind).await?;
        Ok(existed)
    }
}
