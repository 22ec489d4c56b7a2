//! Schema migrations, run at start and by `metadata-service migrate`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, integer, json_binary, string, text, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTables),
            Box::new(MetadataIndexes),
            Box::new(CreateSchemas),
            Box::new(EventHistory),
            Box::new(Transactions),
            Box::new(CreateWebhooks),
        ]
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
    Actor,
    TraceId,
    TransactionId,
}

/// Outcomes of writes that carried a request id (AIP-155), kept for the
/// retry window so that a retry is answered without writing again.
#[derive(DeriveIden)]
enum Requests {
    Table,
    RequestId,
    Fingerprint,
    Outcome,
    CreatedAt,
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

/// Postgres: a GIN `jsonb_path_ops` index on each metadata column, for the
/// containment (`@>`) that List's `=` and `:` filters become. Such an index
/// answers containment only, and is a third of the size of the default
/// `jsonb_ops` one. SQLite has no index for JSON documents: its filters
/// scan the kind's rows.
struct MetadataIndexes;

impl MigrationName for MetadataIndexes {
    fn name(&self) -> &str {
        "m20261130_000001_metadata_indexes"
    }
}

/// The index of each metadata column. On a large existing table, create
/// them beforehand with `CREATE INDEX CONCURRENTLY` under these names: the
/// migration runs in a transaction, where building an index blocks writes.
const METADATA_INDEXES: [(&str, &str); 3] = [
    ("metadata_public_metadata_path_ops", "public_metadata"),
    ("metadata_private_metadata_path_ops", "private_metadata"),
    ("metadata_unsafe_metadata_path_ops", "unsafe_metadata"),
];

#[async_trait::async_trait]
impl MigrationTrait for MetadataIndexes {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        for (name, column) in METADATA_INDEXES {
            manager
                .get_connection()
                .execute_unprepared(&format!(
                    "CREATE INDEX IF NOT EXISTS {name} ON metadata USING gin ({column} jsonb_path_ops)"
                ))
                .await?;
            // The planner estimates a containment from the column's
            // statistics; with the default sample a key held by 1% of the
            // documents was estimated anywhere from 95 to 19,652 rows of
            // 10,000 (1M users), and the low draws chose the GIN index
            // plus a sort of every match (31 ms a page, and quadratic
            // paging) over reading the primary key in id order (1.2 ms).
            // A tenfold sample estimated 9,386-10,755 in 20 of 20 draws.
            manager
                .get_connection()
                .execute_unprepared(&format!(
                    "ALTER TABLE metadata ALTER COLUMN {column} SET STATISTICS 1000"
                ))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        for (name, _) in METADATA_INDEXES {
            manager
                .get_connection()
                .execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                .await?;
        }
        Ok(())
    }
}

/// The JSON Schema of each kind and field (issue 18). A row stays once a
/// schema was set: a deleted schema is JSON null with its version, so that
/// versions only grow and their sum per kind changes with every change
/// (the generation writes check, see `store::schemas`).
struct CreateSchemas;

impl MigrationName for CreateSchemas {
    fn name(&self) -> &str {
        "m20261130_000002_create_metadata_schemas"
    }
}

#[derive(DeriveIden)]
enum MetadataSchemas {
    Table,
    Kind,
    Field,
    Schema,
    Version,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for CreateSchemas {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(MetadataSchemas::Table)
                    .if_not_exists()
                    .col(string(MetadataSchemas::Kind))
                    .col(string(MetadataSchemas::Field))
                    .col(json_binary(MetadataSchemas::Schema))
                    .col(big_integer(MetadataSchemas::Version))
                    .col(timestamp_with_time_zone(MetadataSchemas::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(MetadataSchemas::Kind)
                            .col(MetadataSchemas::Field),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(MetadataSchemas::Table).to_owned())
            .await
    }
}

/// History (issue 29): who made each change, and an index that finds one
/// record's events in revision order, for ListHistory and reads as of a
/// revision (the first event of a record after a revision holds its state
/// at that revision in `before`). Events written before this migration
/// read as made by nobody (`''`).
struct EventHistory;

impl MigrationName for EventHistory {
    fn name(&self) -> &str {
        "m20261207_000001_event_history"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for EventHistory {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in [Events::Actor, Events::TraceId] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Events::Table)
                        .add_column_if_not_exists(string(column).default(""))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("events_record")
                    .table(Events::Table)
                    .col(Events::Kind)
                    .col(Events::Id)
                    .col(Events::Revision)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("events_record")
                    .table(Events::Table)
                    .to_owned(),
            )
            .await?;
        for column in [Events::Actor, Events::TraceId] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Events::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

/// Transactions (issue 30): the transaction each event belongs to (`''`
/// for a single write, and for every event written before), and the
/// outcomes of writes that carried a request id, read by a retry (on any
/// replica, after any restart) instead of writing again.
struct Transactions;

impl MigrationName for Transactions {
    fn name(&self) -> &str {
        "m20261207_000002_transactions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Transactions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .add_column_if_not_exists(string(Events::TransactionId).default(""))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Requests::Table)
                    .if_not_exists()
                    .col(string(Requests::RequestId).primary_key())
                    .col(string(Requests::Fingerprint))
                    .col(json_binary(Requests::Outcome))
                    .col(timestamp_with_time_zone(Requests::CreatedAt))
                    .to_owned(),
            )
            .await?;
        // The expiry sweep reads the oldest first.
        manager
            .create_index(
                Index::create()
                    .name("requests_created_at")
                    .table(Requests::Table)
                    .col(Requests::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Requests::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .drop_column(Events::TransactionId)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}

/// Webhook endpoints (issue 32) and their delivery state: where each one
/// is in the event log, and its failures. Kept in the database so that a
/// deliverer taking over (after a crash, on another replica) goes on
/// exactly where the last one stopped.
#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Id,
    Url,
    Description,
    EventTypes,
    Filter,
    Disabled,
    DisabledReason,
    NextRevision,
    Secret,
    PreviousSecret,
    PreviousSecretUntil,
    Attempts,
    LastError,
    NextAttemptAt,
    FailingSince,
    CreatedAt,
    UpdatedAt,
}

struct CreateWebhooks;

impl MigrationName for CreateWebhooks {
    fn name(&self) -> &str {
        "m20261208_000001_webhooks"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateWebhooks {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Webhooks::Table)
                    .if_not_exists()
                    .col(string(Webhooks::Id).primary_key())
                    .col(text(Webhooks::Url))
                    .col(text(Webhooks::Description))
                    .col(json_binary(Webhooks::EventTypes))
                    .col(text(Webhooks::Filter))
                    .col(boolean(Webhooks::Disabled))
                    .col(text(Webhooks::DisabledReason))
                    .col(big_integer(Webhooks::NextRevision))
                    .col(text(Webhooks::Secret))
                    .col(text(Webhooks::PreviousSecret))
                    .col(timestamp_with_time_zone_null(Webhooks::PreviousSecretUntil))
                    .col(integer(Webhooks::Attempts))
                    .col(text(Webhooks::LastError))
                    .col(timestamp_with_time_zone_null(Webhooks::NextAttemptAt))
                    .col(timestamp_with_time_zone_null(Webhooks::FailingSince))
                    .col(timestamp_with_time_zone(Webhooks::CreatedAt))
                    .col(timestamp_with_time_zone(Webhooks::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Webhooks::Table).to_owned())
            .await
    }
}
