//! Schema migrations, run at start and by `metadata-service migrate`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, json_binary, string, timestamp_with_time_zone,
};

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateTables)]
    }
}

// The column names repeat the table name on purpose: they are the API field names.
#[allow(clippy::enum_variant_names)]
#[derive(DeriveIden)]
enum Metadata {
    Table,
    Kind,
    Id,
    PublicMetadata,
    PrivateMetadata,
    UnsafeMetadata,
    Version,
    Revision,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Revision,
    Kind,
    Id,
    ChangeType,
    ChangedFields,
    Before,
    After,
    CommittedAt,
}

#[derive(DeriveIden)]
enum Revisions {
    Table,
    Id,
    Latest,
    Compacted,
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261126_000001_create_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Metadata::Table)
                    .if_not_exists()
                    .col(string(Metadata::Kind))
                    .col(string(Metadata::Id))
                    .col(json_binary(Metadata::PublicMetadata))
                    .col(json_binary(Metadata::PrivateMetadata))
                    .col(json_binary(Metadata::UnsafeMetadata))
                    .col(big_integer(Metadata::Version))
                    .col(big_integer(Metadata::Revision))
                    .col(timestamp_with_time_zone(Metadata::CreatedAt))
                    .col(timestamp_with_time_zone(Metadata::UpdatedAt))
                    .primary_key(Index::create().col(Metadata::Kind).col(Metadata::Id))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .if_not_exists()
                    .col(big_integer(Events::Revision).primary_key())
                    .col(string(Events::Kind))
                    .col(string(Events::Id))
                    .col(string(Events::ChangeType))
                    .col(json_binary(Events::ChangedFields))
                    .col(json_binary(Events::Before))
                    .col(json_binary(Events::After))
                    .col(timestamp_with_time_zone(Events::CommittedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("events_committed_at")
                    .table(Events::Table)
                    .col(Events::CommittedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Revisions::Table)
                    .if_not_exists()
                    .col(integer(Revisions::Id).primary_key())
                    .col(big_integer(Revisions::Latest))
                    .col(big_integer(Revisions::Compacted))
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("CREATE SEQUENCE IF NOT EXISTS event_revisions")
                .await?;
        }
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(Revisions::Table)
                    .columns([Revisions::Id, Revisions::Latest, Revisions::Compacted])
                    .values_panic([1.into(), 0.into(), 0.into()])
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Metadata::Table.into_iden(),
            Events::Table.into_iden(),
            Revisions::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
