//! What differs between the user and the organization API, stated once per
//! kind: the message types, and functions that take each request apart and
//! build each response. Requests are destructured exhaustively
//! (`let MergeUserMetadataRequest { user_id, .. every field } = request;`),
//! so a field added to the proto fails to compile until it is handled
//! here. Everything else, the handlers included, is written once for both
//! kinds (`handlers.rs`), over the kind-neutral parts below.
//!
//! Organizations have no unsafe metadata: their messages have no such
//! field, and [`Organizations`] is the one place that says so (its parts
//! carry `unsafe_: None`, its records and events leave it out).

use prost::Message;
use prost_types::{Struct, Value as ProtoValue};

use super::handlers::Handlers;
use crate::auth::{Action, FieldSet, Operation};
use crate::convert::{Shown, TreeConvert, timestamp};
use crate::events::{WatchItem, WatchRequest};
use crate::json::ValidationError;
use crate::model::{DeleteCommand, Event, Field, Kind, Mode, WriteCommand};
use crate::proto::v1::{self as pb, WatchProgress};

/// A Merge or Replace request, taken apart: `T` is `Struct` for Merge and
/// `Value` for Replace.
pub struct WriteParts<T> {
    pub id: String,
    pub public: Option<T>,
    pub private: Option<T>,
    pub unsafe_: Option<T>,
    pub expected_version: Option<u64>,
}

impl<T> WriteParts<T> {
    /// What the request asks, for authorization, before any value is decoded.
    pub fn operation(&self, kind: Kind, action: Action) -> Operation<'_> {
        let provided = [
            (Field::Public, self.public.is_some()),
            (Field::Private, self.private.is_some()),
            (Field::Unsafe, self.unsafe_.is_some()),
        ];
        Operation {
            kind,
            action,
            id: &self.id,
            written: FieldSet::of(provided.into_iter().filter(|(_, p)| *p).map(|(f, _)| f)),
        }
    }

    /// The domain command: each provided field decoded to JSON, in field
    /// order; errors are located under the field's name.
    pub fn command(self, kind: Kind, mode: Mode) -> Result<WriteCommand, ValidationError>
    where
        T: TreeConvert,
    {
        let WriteParts {
            id,
            public,
            private,
            unsafe_,
            expected_version,
        } = self;
        let values = [
            (Field::Public, public),
            (Field::Private, private),
            (Field::Unsafe, unsafe_),
        ]
        .into_iter()
        .filter_map(|(field, value)| value.map(|v| v.decode(field).map(|json| (field, json))))
        .collect::<Result<Vec<_>, _>>()?;
        Ok(WriteCommand {
            kind,
            id,
            mode,
            values,
            expected_version,
        })
    }
}

/// One kind's API. Implemented by [`Users`] and [`Organizations`].
pub trait ApiKind: Sized + Send + Sync + 'static {
    const KIND: Kind;
    /// The gRPC path of Watch (served by `watch::Routed`).
    const WATCH_PATH: &'static str;

    /// The generated tonic server of this kind's service.
    type Server: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static;

    /// The generated server over `handlers`, refusing requests larger than
    /// `max_request_bytes` before decoding them.
    fn server(handlers: Handlers<Self>, max_request_bytes: usize) -> Self::Server;

    type Record: Message + Send + 'static;
    type Get: Message + Default + Send + 'static;
    type Merge: Message + Default + Send + 'static;
    type Replace: Message + Default + Send + 'static;
    type Delete: Message + Default + Send + 'static;
    type Deleted: Message + Send + 'static;
    type Watch: Message + Default + Send + 'static;
    type WatchResponse: Message + Send + 'static;

    fn get(request: Self::Get) -> String;
    fn merge(request: Self::Merge) -> WriteParts<Struct>;
    fn replace(request: Self::Replace) -> WriteParts<ProtoValue>;
    fn delete(request: Self::Delete) -> DeleteCommand;
    fn watch(request: Self::Watch) -> WatchRequest;

    fn deleted(existed: bool) -> Self::Deleted;
    /// A record as the caller may see it.
    fn record(shown: Shown) -> Self::Record;
    fn watch_response(item: WatchItem) -> Self::WatchResponse;

    /// A Merge request as the command it asks for.
    fn merge_command(request: Self::Merge) -> Result<WriteCommand, ValidationError> {
        Self::merge(request).command(Self::KIND, Mode::Merge)
    }

    /// A Replace request as the command it asks for.
    fn replace_command(request: Self::Replace) -> Result<WriteCommand, ValidationError> {
        Self::replace(request).command(Self::KIND, Mode::Replace)
    }
}

/// The user API (`metadata.v1.UserMetadataService`).
pub struct Users;

/// The organization API (`metadata.v1.OrganizationMetadataService`).
pub struct Organizations;

fn changed_fields(event: &Event) -> Vec<String> {
    event
        .changed_fields
        .iter()
        .map(|f| f.name().to_owned())
        .collect()
}

fn change_type(event: &Event) -> i32 {
    pb::ChangeType::from(event.change).into()
}

impl ApiKind for Users {
    type Server = pb::user_metadata_service_server::UserMetadataServiceServer<Handlers<Self>>;

    fn server(handlers: Handlers<Self>, max_request_bytes: usize) -> Self::Server {
        pb::user_metadata_service_server::UserMetadataServiceServer::new(handlers)
            .max_decoding_message_size(max_request_bytes)
    }

    const KIND: Kind = Kind::User;
    const WATCH_PATH: &'static str = "/metadata.v1.UserMetadataService/Watch";

    type Record = pb::UserMetadata;
    type Get = pb::GetUserMetadataRequest;
    type Merge = pb::MergeUserMetadataRequest;
    type Replace = pb::ReplaceUserMetadataRequest;
    type Delete = pb::DeleteUserMetadataRequest;
    type Deleted = pb::DeleteUserMetadataResponse;
    type Watch = pb::WatchUserMetadataRequest;
    type WatchResponse = pb::WatchUserMetadataResponse;

    fn get(request: Self::Get) -> String {
        let pb::GetUserMetadataRequest { user_id } = request;
        user_id
    }

    fn merge(request: Self::Merge) -> WriteParts<Struct> {
        let pb::MergeUserMetadataRequest {
            user_id,
            public_metadata,
            private_metadata,
            unsafe_metadata,
            expected_version,
        } = request;
        WriteParts {
            id: user_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: unsafe_metadata,
            expected_version,
        }
    }

    fn replace(request: Self::Replace) -> WriteParts<ProtoValue> {
        let pb::ReplaceUserMetadataRequest {
            user_id,
            public_metadata,
            private_metadata,
            unsafe_metadata,
            expected_version,
        } = request;
        WriteParts {
            id: user_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: unsafe_metadata,
            expected_version,
        }
    }

    fn delete(request: Self::Delete) -> DeleteCommand {
        let pb::DeleteUserMetadataRequest {
            user_id,
            expected_version,
        } = request;
        DeleteCommand {
            kind: Self::KIND,
            id: user_id,
            expected_version,
        }
    }

    fn watch(request: Self::Watch) -> WatchRequest {
        let pb::WatchUserMetadataRequest {
            start_revision,
            user_ids,
            progress_notify,
        } = request;
        WatchRequest {
            kind: Self::KIND,
            start_revision,
            ids: user_ids.into_iter().collect(),
            progress_notify,
        }
    }

    fn deleted(existed: bool) -> Self::Deleted {
        pb::DeleteUserMetadataResponse { existed }
    }

    fn record(shown: Shown) -> Self::Record {
        pb::UserMetadata {
            public_metadata: shown.field(Field::Public),
            private_metadata: shown.field(Field::Private),
            unsafe_metadata: shown.field(Field::Unsafe),
            user_id: shown.record.id,
            version: shown.record.version,
            created_at: shown.record.created_at.map(timestamp),
            updated_at: shown.record.updated_at.map(timestamp),
            revision: shown.record.revision,
        }
    }

    fn watch_response(item: WatchItem) -> Self::WatchResponse {
        use pb::watch_user_metadata_response::Response;
        let response = match item {
            WatchItem::Event(event) => Response::Event(pb::UserMetadataEvent {
                revision: event.revision,
                change_type: change_type(&event),
                user_id: event.id().to_owned(),
                changed_fields: changed_fields(&event),
                before: Some(Self::record(Shown::all(event.before.clone()))),
                after: Some(Self::record(Shown::all(event.after.clone()))),
                committed_at: Some(timestamp(event.committed_at)),
            }),
            WatchItem::Progress(revision) => Response::Progress(WatchProgress { revision }),
        };
        pb::WatchUserMetadataResponse {
            response: Some(response),
        }
    }
}

impl ApiKind for Organizations {
    type Server =
        pb::organization_metadata_service_server::OrganizationMetadataServiceServer<Handlers<Self>>;

    fn server(handlers: Handlers<Self>, max_request_bytes: usize) -> Self::Server {
        pb::organization_metadata_service_server::OrganizationMetadataServiceServer::new(handlers)
            .max_decoding_message_size(max_request_bytes)
    }

    const KIND: Kind = Kind::Organization;
    const WATCH_PATH: &'static str = "/metadata.v1.OrganizationMetadataService/Watch";

    type Record = pb::OrganizationMetadata;
    type Get = pb::GetOrganizationMetadataRequest;
    type Merge = pb::MergeOrganizationMetadataRequest;
    type Replace = pb::ReplaceOrganizationMetadataRequest;
    type Delete = pb::DeleteOrganizationMetadataRequest;
    type Deleted = pb::DeleteOrganizationMetadataResponse;
    type Watch = pb::WatchOrganizationMetadataRequest;
    type WatchResponse = pb::WatchOrganizationMetadataResponse;

    fn get(request: Self::Get) -> String {
        let pb::GetOrganizationMetadataRequest { organization_id } = request;
        organization_id
    }

    fn merge(request: Self::Merge) -> WriteParts<Struct> {
        let pb::MergeOrganizationMetadataRequest {
            organization_id,
            public_metadata,
            private_metadata,
            expected_version,
        } = request;
        WriteParts {
            id: organization_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: None,
            expected_version,
        }
    }

    fn replace(request: Self::Replace) -> WriteParts<ProtoValue> {
        let pb::ReplaceOrganizationMetadataRequest {
            organization_id,
            public_metadata,
            private_metadata,
            expected_version,
        } = request;
        WriteParts {
            id: organization_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: None,
            expected_version,
        }
    }

    fn delete(request: Self::Delete) -> DeleteCommand {
        let pb::DeleteOrganizationMetadataRequest {
            organization_id,
            expected_version,
        } = request;
        DeleteCommand {
            kind: Self::KIND,
            id: organization_id,
            expected_version,
        }
    }

    fn watch(request: Self::Watch) -> WatchRequest {
        let pb::WatchOrganizationMetadataRequest {
            start_revision,
            organization_ids,
            progress_notify,
        } = request;
        WatchRequest {
            kind: Self::KIND,
            start_revision,
            ids: organization_ids.into_iter().collect(),
            progress_notify,
        }
    }

    fn deleted(existed: bool) -> Self::Deleted {
        pb::DeleteOrganizationMetadataResponse { existed }
    }

    fn record(shown: Shown) -> Self::Record {
        pb::OrganizationMetadata {
            public_metadata: shown.field(Field::Public),
            private_metadata: shown.field(Field::Private),
            organization_id: shown.record.id,
            version: shown.record.version,
            created_at: shown.record.created_at.map(timestamp),
            updated_at: shown.record.updated_at.map(timestamp),
            revision: shown.record.revision,
        }
    }

    fn watch_response(item: WatchItem) -> Self::WatchResponse {
        use pb::watch_organization_metadata_response::Response;
        let response = match item {
            WatchItem::Event(event) => Response::Event(pb::OrganizationMetadataEvent {
                revision: event.revision,
                change_type: change_type(&event),
                organization_id: event.id().to_owned(),
                changed_fields: changed_fields(&event),
                before: Some(Self::record(Shown::all(event.before.clone()))),
                after: Some(Self::record(Shown::all(event.after.clone()))),
                committed_at: Some(timestamp(event.committed_at)),
            }),
            WatchItem::Progress(revision) => Response::Progress(WatchProgress { revision }),
        };
        pb::WatchOrganizationMetadataResponse {
            response: Some(response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::Problem;
    use prost_types::ListValue;
    use prost_types::value::Kind as ProtoKind;
    use serde_json::json;

    fn number(n: f64) -> ProtoValue {
        ProtoValue {
            kind: Some(ProtoKind::NumberValue(n)),
        }
    }

    fn structure(fields: Vec<(&str, ProtoValue)>) -> Struct {
        Struct {
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_path() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let request = pb::MergeUserMetadataRequest {
                user_id: "u".into(),
                private_metadata: Some(structure(vec![(
                    "a",
                    ProtoValue {
                        kind: Some(ProtoKind::ListValue(ListValue {
                            values: vec![number(1.0), number(bad)],
                        })),
                    },
                )])),
                ..Default::default()
            };
            let err = Users::merge_command(request).unwrap_err();
            assert_eq!(err.problem, Problem::NonFiniteNumber);
            assert_eq!(err.path.to_string(), "private_metadata.a[1]");
        }
    }

    #[test]
    fn unset_value_is_refused() {
        let request = pb::ReplaceUserMetadataRequest {
            user_id: "u".into(),
            unsafe_metadata: Some(ProtoValue { kind: None }),
            ..Default::default()
        };
        let err = Users::replace_command(request).unwrap_err();
        assert_eq!(err.problem, Problem::MissingValue);
        assert_eq!(err.path.to_string(), "unsafe_metadata");
    }

    #[test]
    fn omitted_fields_are_not_in_the_command() {
        let request = pb::MergeOrganizationMetadataRequest {
            organization_id: "org".into(),
            private_metadata: Some(structure(vec![("k", number(2.0))])),
            expected_version: Some(3),
            ..Default::default()
        };
        let command = Organizations::merge_command(request).unwrap();
        assert_eq!(command.values, vec![(Field::Private, json!({"k":2}))]);
        assert_eq!(command.expected_version, Some(3));
        assert_eq!(command.kind, Kind::Organization);
    }

    #[test]
    fn the_operation_names_the_provided_fields() {
        let request = pb::MergeUserMetadataRequest {
            user_id: "u".into(),
            unsafe_metadata: Some(Struct::default()),
            ..Default::default()
        };
        let parts = Users::merge(request);
        let operation = parts.operation(Kind::User, Action::Merge);
        assert_eq!(operation.id, "u");
        assert!(operation.written.contains(Field::Unsafe));
        assert!(!operation.written.contains(Field::Public));
    }
}
