//! `metadata-service schema get|set|delete user|org public|private|unsafe`:
//! the JSON Schemas of metadata fields (`metadata.v1.MetadataSchemaService`),
//! with the connection, input and exit-status handling of the rest of the
//! client.

use std::io::IsTerminal;

use clap::{Args, Subcommand, ValueEnum};

use super::{
    Connection, Failure, connect, first_call, object, output, parse_json, read_file, read_stdin,
};
use crate::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use crate::proto::v1::{
    DeleteSchemaRequest, GetSchemaRequest, MetadataField, MetadataKind, SetSchemaRequest,
};

#[derive(Debug, Args)]
pub struct SchemaCommand {
    #[command(subcommand)]
    pub action: SchemaAction,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Debug, Subcommand)]
pub enum SchemaAction {
    /// Print the field's schema (`{}` and version 0 when none was ever set).
    Get {
        #[command(flatten)]
        target: Target,
    },
    /// Set the field's schema, once every stored value of it conforms.
    Set {
        #[command(flatten)]
        target: Target,
        /// The JSON Schema: a file, or `-` for standard input.
        #[arg(long)]
        file: String,
        /// Check the schema and every stored value, print what would be
        /// stored, store nothing.
        #[arg(long)]
        validate_only: bool,
        /// Only if the schema's version is still this one (0: never set).
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Remove the field's schema: writes are no longer checked.
    Delete {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

/// Whose metadata, and which field.
#[derive(Debug, Args)]
pub struct Target {
    #[arg(value_enum)]
    pub kind: KindName,
    /// Organizations have public and private metadata only.
    #[arg(value_enum)]
    pub field: FieldName,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindName {
    User,
    Org,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FieldName {
    Public,
    Private,
    Unsafe,
}

impl Target {
    /// The request's `kind` and `field`. An organization's unsafe field is
    /// sent as asked: the server says why it is refused.
    fn proto(&self) -> (i32, i32) {
        let kind = match self.kind {
            KindName::User => MetadataKind::User,
            KindName::Org => MetadataKind::Organization,
        };
        let field = match self.field {
            FieldName::Public => MetadataField::Public,
            FieldName::Private => MetadataField::Private,
            FieldName::Unsafe => MetadataField::Unsafe,
        };
        (kind.into(), field.into())
    }
}

/// A request with its schema read and parsed.
enum Call {
    Get(GetSchemaRequest),
    Set(SetSchemaRequest),
    Delete(DeleteSchemaRequest),
}

fn prepare(action: SchemaAction) -> Result<Call, Failure> {
    Ok(match action {
        SchemaAction::Get { target } => {
            let (kind, field) = target.proto();
            Call::Get(GetSchemaRequest { kind, field })
        }
        SchemaAction::Set {
            target,
            file,
            validate_only,
            expected_version,
        } => {
            let (kind, field) = target.proto();
            let text = match file.as_str() {
                "-" => read_stdin("file")?,
                path => read_file("file", path)?,
            };
            let schema = object("file", parse_json("file", &text)?, "a schema")?;
            Call::Set(SetSchemaRequest {
                kind,
                field,
                schema: Some(schema),
                validate_only,
                expected_version,
            })
        }
        SchemaAction::Delete {
            target,
            expected_version,
        } => {
            let (kind, field) = target.proto();
            Call::Delete(DeleteSchemaRequest {
                kind,
                field,
                expected_version,
            })
        }
    })
}

pub(super) async fn execute(command: SchemaCommand) -> Result<(), Failure> {
    // The schema is read and parsed before anything is sent.
    let call = prepare(command.action)?;
    let (channel, bearer) = connect(&command.connection).await?;
    let mut client = MetadataSchemaServiceClient::with_interceptor(channel, bearer);
    let result = match call {
        Call::Get(request) => client
            .get_schema(request)
            .await
            .map(|r| output::schema(&r.into_inner())),
        Call::Set(request) => client
            .set_schema(request)
            .await
            .map(|r| output::schema(&r.into_inner())),
        Call::Delete(request) => client
            .delete_schema(request)
            .await
            .map(|r| serde_json::json!({ "existed": r.into_inner().existed })),
    };
    output::print(
        &result.map_err(first_call)?,
        std::io::stdout().is_terminal(),
    );
    Ok(())
}
