//! The `revisions` table: a single row. Taking the next revision locks it
//! until commit, which is what assigns revisions in commit order.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "revisions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i32,
    /// The last revision handed out (and committed, once visible).
    pub latest: i64,
    /// Every event up to here has been pruned.
    pub compacted: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
