//! `metadata.v1.MetadataSchemaService`: JSON Schemas per kind and field
//! (issue 18). Requests are taken apart exhaustively here; the work is in
//! [`Core`] and the store (`store/schemas.rs`). Backend callers only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::core::SchemaChange;
use super::{Core, authorize};
use crate::auth::{Action, FieldSet, Operation};
use crate::convert::{proto_from_json, struct_to_json, timestamp};
use crate::model::{Field, Kind};
use crate::proto::v1::metadata_schema_service_server::MetadataSchemaService;
use crate::proto::v1::{
    DeleteSchemaRequest, DeleteSchemaResponse, GetSchemaRequest, MetadataField, MetadataKind,
    MetadataSchema, SetSchemaRequest,
};
use crate::store::{Sent, StoredSchema};
use crate::validation::{JsonPath, Problem, ValidationError};

/// How long a SetSchema may check stored values when the client sets no
/// deadline (about 1,000,000 documents take seconds; BENCHMARKS.md).
pub const SET_SCHEMA_BUDGET: std::time::Duration = std::time::Duration::from_secs(600);

pub struct SchemaHandlers {
    core: Arc<Core>,
}

impl SchemaHandlers {
    pub fn new(core: Arc<Core>) -> Self {
        SchemaHandlers { core }
    }

    /// Authorizes the caller, then admits the call.
    fn admit(
        &self,
        headers: &tonic::metadata::MetadataMap,
        extensions: &tonic::Extensions,
        kind: Kind,
        action: Action,
    ) -> Result<(crate::auth::Caller, super::admission::Call), Status> {
        let operation = Operation {
            kind,
            action,
            id: "",
            written: FieldSet::NONE,
        };
        let (caller, _) = authorize(extensions, &operation)?;
        let call = self.core.admission.unary(headers)?;
        Ok((caller, call))
    }
}

/// The kind and field a request names; both must be set, and an
/// organization has no unsafe metadata.
fn target(kind: i32, field: i32) -> Result<(Kind, Field), ValidationError> {
    let unspecified = |name| ValidationError::new(JsonPath::root(name), Problem::Unspecified);
    let kind = match MetadataKind::try_from(kind) {
        Ok(MetadataKind::User) => Kind::User,
        Ok(MetadataKind::Organization) => Kind::Organization,
        _ => return Err(unspecified("kind")),
    };
    let field = match MetadataField::try_from(field) {
        Ok(MetadataField::Public) => Field::Public,
        Ok(MetadataField::Private) => Field::Private,
        Ok(MetadataField::Unsafe) if kind == Kind::User => Field::Unsafe,
        Ok(MetadataField::Unsafe) => {
            return Err(ValidationError::new(
                JsonPath::root("field"),
                Problem::NoSuchField {
                    kind: kind.as_str(),
                },
            ));
        }
        _ => return Err(unspecified("field")),
    };
    Ok((kind, field))
}

fn proto_kind(kind: Kind) -> MetadataKind {
    match kind {
        Kind::User => MetadataKind::User,
        Kind::Organization => MetadataKind::Organization,
    }
}

fn proto_field(field: Field) -> MetadataField {
    match field {
        Field::Public => MetadataField::Public,
        Field::Private => MetadataField::Private,
        Field::Unsafe => MetadataField::Unsafe,
    }
}

fn schema_message(stored: StoredSchema) -> MetadataSchema {
    let StoredSchema {
        kind,
        field,
        schema,
        version,
        updated_at,
    } = stored;
    let schema = match schema.map(|schema| proto_from_json(&schema).kind) {
        Some(Some(prost_types::value::Kind::StructValue(schema))) => Some(schema),
        _ => Some(prost_types::Struct::default()),
    };
    MetadataSchema {
        kind: proto_kind(kind).into(),
        field: proto_field(field).into(),
        schema,
        version,
        updated_at: if version == 0 {
            None
        } else {
            updated_at.map(timestamp)
        },
    }
}

#[tonic::async_trait]
impl MetadataSchemaService for SchemaHandlers {
    async fn set_schema(
        &self,
        request: Request<SetSchemaRequest>,
    ) -> Result<Response<MetadataSchema>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let SetSchemaRequest {
            kind,
            field,
            schema,
            validate_only,
            expected_version,
        } = message;
        let (kind, field) = target(kind, field)?;
        let (caller, call) = self.admit(&headers, &extensions, kind, Action::SetSchema)?;
        let call = call.with_budget(SET_SCHEMA_BUDGET);
        let schema = struct_to_json("schema", schema.unwrap_or_default())?;
        let sent = Sent::default();
        let stored = call
            .run_write(
                &sent,
                self.core.set_schema(
                    &caller,
                    SchemaChange {
                        kind,
                        field,
                        schema,
                        expected_version,
                        validate_only,
                    },
                    &sent,
                ),
            )
            .await?;
        Ok(Response::new(schema_message(stored)))
    }

    async fn get_schema(
        &self,
        request: Request<GetSchemaRequest>,
    ) -> Result<Response<MetadataSchema>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let GetSchemaRequest { kind, field } = message;
        let (kind, field) = target(kind, field)?;
        let (_, call) = self.admit(&headers, &extensions, kind, Action::GetSchema)?;
        let stored = call.run(self.core.schema(kind, field)).await?;
        Ok(Response::new(schema_message(stored)))
    }

    async fn delete_schema(
        &self,
        request: Request<DeleteSchemaRequest>,
    ) -> Result<Response<DeleteSchemaResponse>, Status> {
        let (headers, extensions, message) = request.into_parts();
        let DeleteSchemaRequest {
            kind,
            field,
            expected_version,
        } = message;
        let (kind, field) = target(kind, field)?;
        let (caller, call) = self.admit(&headers, &extensions, kind, Action::DeleteSchema)?;
        let sent = Sent::default();
        let existed = call
            .run_write(
                &sent,
                self.core
                    .delete_schema(&caller, kind, field, expected_version, &sent),
            )
            .await?;
        Ok(Response::new(DeleteSchemaResponse { existed }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let user = MetadataKind::User as i32;
        let org = MetadataKind::Organization as i32;
        let unsafe_ = MetadataField::Unsafe as i32;
        assert_eq!(target(user, unsafe_).unwrap(), (Kind::User, Field::Unsafe));
        let err = target(org, unsafe_).unwrap_err().to_string();
        assert!(
            err.starts_with("field: is not a field of organization"),
            "{err}"
        );
        assert_eq!(target(0, 1).unwrap_err().to_string(), "kind: must be set");
        assert_eq!(
            target(user, 0).unwrap_err().to_string(),
            "field: must be set"
        );
        assert_eq!(target(7, 1).unwrap_err().to_string(), "kind: must be set");
    }
}
