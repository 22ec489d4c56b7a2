//! The `events` table: the outbox, one row per committed change.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub revision: i64,
    pub kind: String,
    pub id: String,
    pub change_type: String,
    /// JSON list of field names, e.g. `["public_metadata"]`.
    #[sea_orm(column_type = "JsonBinary")]
    pub changed_fields: Json,
    /// Snapshots of the record, see `store::events`.
    #[sea_orm(column_type = "JsonBinary")]
    pub before: Json,
    #[sea_orm(column_type = "JsonBinary")]
    pub after: Json,
    pub committed_at: DateTimeUtc,
    /// Who made the change (`model::Origin`); empty on older events.
    pub actor: String,
    pub trace_id: String,
    /// The Commit that made it; empty for a single write.
    pub transaction_id: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
