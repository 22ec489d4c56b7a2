//! Schema migrations, run at start and by `metadata-service migrate`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, json_binary, string, timestamp_with_time_zone};

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateMetadata)]
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
    CreatedAt,
    UpdatedAt,
}

struct CreateMetadata;

impl MigrationName for CreateMetadata {
    fn name(&self) -> &str {
        "m20261126_000001_create_metadata"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateMetadata {
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
                    .col(timestamp_with_time_zone(Metadata::CreatedAt))
                    .col(timestamp_with_time_zone(Metadata::UpdatedAt))
                    .primary_key(Index::create().col(Metadata::Kind).col(Metadata::Id))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Metadata::Table).to_owned())
            .await
    }
}
