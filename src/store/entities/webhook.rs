//! The `webhooks` table: an endpoint, its signing secrets, and where its
//! deliveries are in the event log.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "webhooks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub url: String,
    pub description: String,
    /// A JSON array of event type names; empty: all.
    #[sea_orm(column_type = "JsonBinary")]
    pub event_types: Json,
    pub filter: String,
    pub disabled: bool,
    pub disabled_reason: String,
    /// The first revision not yet delivered (or skipped by the filters).
    pub next_revision: i64,
    pub secret: String,
    /// "" when there is none; signs beside `secret` until
    /// `previous_secret_until`.
    pub previous_secret: String,
    pub previous_secret_until: Option<DateTimeUtc>,
    /// Failed attempts at the event at `next_revision`.
    pub attempts: i32,
    pub last_error: String,
    pub next_attempt_at: Option<DateTimeUtc>,
    pub failing_since: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
