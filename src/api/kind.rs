//! What differs between the user and the organization API, stated once per
//! kind: the message types, and functions that take each request apart and
//! build each response. Requests are destructured exhaustively
//! (`let MergeUserMetadataRequest { user_id, .. every field } = request;`),
//! so a field added to the proto fails to compile until it is handled
//! here. Everything else, the server's handlers (`service/handlers.rs`)
//! and the client's calls (`client/records.rs`) included, is written once
//! for both kinds, over the kind-neutral parts below. Nothing here knows
//! the server: the client and the relay use it without it.
//!
//! The check is the compiler's: a pattern that leaves out a field of the
//! message (here `expected_version`, as a field added to the proto would
//! be) is error E0027.
//!
//! ```compile_fail,E0027
//! use metadata_service::proto::v1::MergeUserMetadataRequest;
//! fn parts(request: MergeUserMetadataRequest) {
//!     let MergeUserMetadataRequest {
//!         user_id,
//!         public_metadata,
//!         private_metadata,
//!         unsafe_metadata,
//!     } = request;
//! }
//! ```
//!
//! Both implementations come from one macro, `api_kind!`, given each
//! kind's message and field names. Organizations have no unsafe metadata:
//! their invocation is the one place that says so (it names no unsafe
//! field, so their parts carry `unsafe_: None` and their records none).

use prost::Message;
use prost_types::{ListValue, Struct, Value as ProtoValue};

use crate::auth::{Action, FieldSet, Operation};
use crate::convert::{Shown, TreeConvert, timestamp};
use crate::events::{WatchItem, WatchRequest};
use crate::model::{DeleteCommand, Event, Field, Kind, Mode, RestoreCommand, WriteCommand};
use crate::proto::v1::{self as pb, WatchProgress};
use crate::query::{HistoryQuery, ListQuery, parse_filter};
use crate::validation::ValidationError;
use prost_types::Timestamp;

/// A Merge or Replace request, taken apart: `T` is `Struct` for Merge and
/// `Value` for Replace.
#[derive(Clone)]
pub struct WriteParts<T> {
    pub id: String,
    pub public: Option<T>,
    pub private: Option<T>,
    pub unsafe_: Option<T>,
    pub expected_version: Option<u64>,
    /// A Patch's retry key (AIP-155); empty when not given, and for Merge
    /// and Replace, which have none.
    pub request_id: String,
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
            // Handled by whoever runs the command (the handler), not part
            // of what it writes.
            request_id: _,
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

/// A record as received, whatever its kind: for printing it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordView {
    pub id: String,
    /// Each field this kind has, and its value if the caller may see it.
    pub fields: Vec<(Field, Option<ProtoValue>)>,
    pub version: u64,
    pub revision: u64,
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
}

/// An event as received, whatever its kind.
#[derive(Clone, Debug, PartialEq)]
pub struct EventView {
    pub revision: u64,
    pub change_type: i32,
    pub id: String,
    pub changed_fields: Vec<String>,
    pub before: Option<RecordView>,
    pub after: Option<RecordView>,
    pub committed_at: Option<Timestamp>,
    pub actor: String,
    pub trace_id: String,
    pub transaction_id: String,
}

/// One kind's API. Implemented by [`Users`] and [`Organizations`].
pub trait ApiKind: Sized + Send + Sync + 'static {
    const KIND: Kind;
    /// The metadata fields this kind has.
    const FIELDS: &'static [Field];
    /// The gRPC path of Watch (served by `watch::Routed`).
    const WATCH_PATH: &'static str;

    type Record: Message + Clone + Send + 'static;
    type Get: Message + Default + Send + 'static;
    type Merge: Message + Default + Send + 'static;
    type Replace: Message + Default + Send + 'static;
    type Patch: Message + Default + Send + 'static;
    type Delete: Message + Default + Send + 'static;
    type Deleted: Message + Send + 'static;
    type Watch: Message + Default + Send + 'static;
    type WatchResponse: Message + Send + 'static;
    /// The event message, as Watch sends it and the NATS relay publishes it.
    type Event: Message + Send + 'static;
    type BatchGet: Message + Default + Send + 'static;
    type BatchGot: Message + Send + 'static;
    type List: Message + Default + Send + 'static;
    type Listed: Message + Send + 'static;
    type History: Message + Default + Send + 'static;
    type HistoryPage: Message + Send + 'static;
    type Restore: Message + Default + Send + 'static;

    // Requests taken apart (the server).
    /// The id, and the revision to read at when one is asked.
    fn get(request: Self::Get) -> (String, Option<u64>);
    fn merge(request: Self::Merge) -> WriteParts<Struct>;
    fn replace(request: Self::Replace) -> WriteParts<ProtoValue>;
    /// Each field's value is its JSON Patch.
    fn patch(request: Self::Patch) -> WriteParts<ListValue>;
    fn delete(request: Self::Delete) -> DeleteCommand;
    /// Fails on a filter that does not parse.
    fn watch(request: Self::Watch) -> Result<WatchRequest, ValidationError>;
    fn batch_get(request: Self::BatchGet) -> (Vec<String>, Option<u64>);
    /// Fails on a bad filter, page size or page token.
    fn list(request: Self::List) -> Result<ListQuery, ValidationError>;
    /// Fails on a bad id, page size or page token.
    fn history(request: Self::History) -> Result<HistoryQuery, ValidationError>;
    fn restore(request: Self::Restore) -> RestoreCommand;

    // Responses built (the server).
    fn deleted(existed: bool) -> Self::Deleted;
    /// A record as the caller may see it.
    fn record(shown: Shown<'_>) -> Self::Record;
    fn watch_response(item: WatchItem) -> Self::WatchResponse {
        Self::shown_watch_response(item, FieldSet::ALL)
    }
    /// A Watch message as a caller that sees `fields` may receive it.
    fn shown_watch_response(item: WatchItem, fields: FieldSet) -> Self::WatchResponse;
    /// An event of this kind as its message, as a caller that sees
    /// `fields` may: the others are unset in before and after and left out
    /// of changed_fields.
    fn shown_event(event: &Event, fields: FieldSet) -> Self::Event;
    /// An event of this kind as its message, whole (backend callers, relays).
    fn event(event: &Event) -> Self::Event {
        Self::shown_event(event, FieldSet::ALL)
    }
    fn batch_got(records: Vec<Self::Record>, revision: u64) -> Self::BatchGot;
    fn listed(records: Vec<Self::Record>, next_page_token: String, revision: u64) -> Self::Listed;
    fn history_page(
        events: Vec<Self::Event>,
        next_page_token: String,
        oldest_revision: u64,
    ) -> Self::HistoryPage;

    // Requests built and responses taken apart (the client).
    fn get_request(id: String, revision: Option<u64>) -> Self::Get;
    /// `parts.unsafe_` is dropped for a kind without unsafe metadata.
    fn merge_request(parts: WriteParts<Struct>) -> Self::Merge;
    fn replace_request(parts: WriteParts<ProtoValue>) -> Self::Replace;
    fn patch_request(parts: WriteParts<ListValue>) -> Self::Patch;
    fn delete_request(id: String, expected_version: Option<u64>) -> Self::Delete;
    fn watch_request(
        start_revision: u64,
        ids: Vec<String>,
        progress_notify: bool,
        filter: String,
    ) -> Self::Watch;
    fn batch_get_request(ids: Vec<String>, revision: Option<u64>) -> Self::BatchGet;
    fn list_request(filter: String, page_size: i32, page_token: String) -> Self::List;
    fn history_request(
        id: String,
        page_size: i32,
        page_token: String,
        oldest_first: bool,
    ) -> Self::History;
    fn restore_request(id: String, revision: u64, expected_version: Option<u64>) -> Self::Restore;
    fn existed(response: Self::Deleted) -> bool;
    /// The records of a BatchGet response, and its revision.
    fn batch_got_view(response: Self::BatchGot) -> (Vec<RecordView>, u64);
    /// The records of a List page, its next page token and its revision.
    fn listed_view(response: Self::Listed) -> (Vec<RecordView>, String, u64);
    /// The events of a history page, its next page token and the oldest
    /// revision the log holds.
    fn history_view(response: Self::HistoryPage) -> (Vec<EventView>, String, u64);
    fn record_view(record: Self::Record) -> RecordView;
    /// The event of a Watch response; None for progress.
    fn event_view(response: Self::WatchResponse) -> Option<EventView>;
    fn event_message_view(event: Self::Event) -> EventView;

    /// A Merge request as the command it asks for.
    fn merge_command(request: Self::Merge) -> Result<WriteCommand, ValidationError> {
        Self::merge(request).command(Self::KIND, Mode::Merge)
    }

    /// A Replace request as the command it asks for.
    fn replace_command(request: Self::Replace) -> Result<WriteCommand, ValidationError> {
        Self::replace(request).command(Self::KIND, Mode::Replace)
    }

    /// A Patch request as the command it asks for.
    fn patch_command(request: Self::Patch) -> Result<WriteCommand, ValidationError> {
        Self::patch(request).command(Self::KIND, Mode::Patch)
    }
}

/// The user API (`metadata.v1.UserMetadataService`).
pub struct Users;

/// The organization API (`metadata.v1.OrganizationMetadataService`).
pub struct Organizations;

fn changed_fields(event: &Event, fields: FieldSet) -> Vec<String> {
    event
        .changed_fields
        .iter()
        .filter(|f| fields.contains(**f))
        .map(|f| f.name().to_owned())
        .collect()
}

fn change_type(event: &Event) -> i32 {
    pb::ChangeType::from(event.change).into()
}

/// `Field::Unsafe`, for a kind that names its unsafe field.
macro_rules! unsafe_field {
    ($name:ident) => {
        Field::Unsafe
    };
}

/// A Merge or Replace request of type `$message` taken apart.
macro_rules! write_parts {
    ($message:path, $request:expr, $id:ident $(, $unsafe:ident)? $(; $request_id:ident)?) => {{
        let $message {
            $id,
            public_metadata,
            private_metadata,
            $($unsafe,)?
            expected_version,
            $($request_id,)?
        } = $request;
        #[allow(unused_variables)]
        let request_id = String::new();
        $(let request_id = $request_id;)?
        WriteParts {
            id: $id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: None $(.or($unsafe))?,
            expected_version,
            request_id,
        }
    }};
}

/// A Merge or Replace request of type `$message` built from its parts; a
/// kind without unsafe metadata drops `unsafe_`.
macro_rules! write_request {
    ($message:path, $parts:expr, $id:ident $(, $unsafe:ident)? $(; $request_id:ident)?) => {{
        let WriteParts {
            id,
            public,
            private,
            unsafe_,
            expected_version,
            request_id,
        } = $parts;
        let _ = (&unsafe_, &request_id);
        $message {
            $id: id,
            public_metadata: public,
            private_metadata: private,
            $($unsafe: unsafe_,)?
            expected_version,
            $($request_id: request_id,)?
        }
    }};
}

/// Implements [`ApiKind`] for `$api` from its names. Every message is
/// destructured or built with all its fields named: a field added to the
/// proto is a compile error (E0027 or E0063) here until it is handled.
macro_rules! api_kind {
    (
        $api:ident, $kind:expr, $watch_path:literal,
        record: $record:ident, get: $get:ident, merge: $merge:ident, replace: $replace:ident,
        patch: $patch:ident,
        delete: $delete:ident, deleted: $deleted:ident, watch: $watch:ident,
        watch_response: $watch_response:ident :: $response_module:ident, event: $event:ident,
        batch_get: $batch_get:ident, batch_got: $batch_got:ident, list: $list:ident,
        listed: $listed:ident, history: $history:ident, history_page: $history_page:ident,
        restore: $restore:ident, records: $records:ident,
        id: $id:ident, ids: $ids:ident $(, unsafe: $unsafe:ident)?
    ) => {
        impl ApiKind for $api {
            const KIND: Kind = $kind;
            const FIELDS: &'static [Field] =
                &[Field::Public, Field::Private $(, unsafe_field!($unsafe))?];
            const WATCH_PATH: &'static str = $watch_path;

            type Record = pb::$record;
            type Get = pb::$get;
            type Merge = pb::$merge;
            type Replace = pb::$replace;
            type Patch = pb::$patch;
            type Delete = pb::$delete;
            type Deleted = pb::$deleted;
            type Watch = pb::$watch;
            type WatchResponse = pb::$watch_response;
            type Event = pb::$event;
            type BatchGet = pb::$batch_get;
            type BatchGot = pb::$batch_got;
            type List = pb::$list;
            type Listed = pb::$listed;
            type History = pb::$history;
            type HistoryPage = pb::$history_page;
            type Restore = pb::$restore;

            fn get(request: Self::Get) -> (String, Option<u64>) {
                let pb::$get { $id, revision } = request;
                ($id, revision)
            }

            fn merge(request: Self::Merge) -> WriteParts<Struct> {
                write_parts!(pb::$merge, request, $id $(, $unsafe)?)
            }

            fn replace(request: Self::Replace) -> WriteParts<ProtoValue> {
                write_parts!(pb::$replace, request, $id $(, $unsafe)?)
            }

            fn patch(request: Self::Patch) -> WriteParts<ListValue> {
                write_parts!(pb::$patch, request, $id $(, $unsafe)?; request_id)
            }

            fn delete(request: Self::Delete) -> DeleteCommand {
                let pb::$delete { $id, expected_version } = request;
                DeleteCommand {
                    kind: Self::KIND,
                    id: $id,
                    expected_version,
                }
            }

            fn watch(request: Self::Watch) -> Result<WatchRequest, ValidationError> {
                let pb::$watch {
                    start_revision,
                    $ids,
                    progress_notify,
                    filter,
                } = request;
                Ok(WatchRequest {
                    kind: Self::KIND,
                    start_revision,
                    ids: $ids.into_iter().collect(),
                    progress_notify,
                    filter: parse_filter(&filter, Self::FIELDS)?,
                })
            }

            fn batch_get(request: Self::BatchGet) -> (Vec<String>, Option<u64>) {
                let pb::$batch_get { $ids, revision } = request;
                ($ids, revision)
            }

            fn list(request: Self::List) -> Result<ListQuery, ValidationError> {
                let pb::$list {
                    filter,
                    page_size,
                    page_token,
                } = request;
                ListQuery::new(Self::KIND, Self::FIELDS, filter, page_size, &page_token)
            }

            fn history(request: Self::History) -> Result<HistoryQuery, ValidationError> {
                let pb::$history {
                    $id,
                    page_size,
                    page_token,
                    oldest_first,
                } = request;
                HistoryQuery::new(Self::KIND, $id, page_size, &page_token, oldest_first)
            }

            fn restore(request: Self::Restore) -> RestoreCommand {
                let pb::$restore {
                    $id,
                    revision,
                    expected_version,
                } = request;
                RestoreCommand {
                    kind: Self::KIND,
                    id: $id,
                    revision,
                    expected_version,
                }
            }

            fn batch_got(records: Vec<Self::Record>, revision: u64) -> Self::BatchGot {
                pb::$batch_got {
                    $records: records,
                    revision,
                }
            }

            fn listed(
                records: Vec<Self::Record>,
                next_page_token: String,
                revision: u64,
            ) -> Self::Listed {
                pb::$listed {
                    $records: records,
                    next_page_token,
                    revision,
                }
            }

            fn history_page(
                events: Vec<Self::Event>,
                next_page_token: String,
                oldest_revision: u64,
            ) -> Self::HistoryPage {
                pb::$history_page {
                    events,
                    next_page_token,
                    oldest_revision,
                }
            }

            fn deleted(existed: bool) -> Self::Deleted {
                pb::$deleted { existed }
            }

            fn record(shown: Shown<'_>) -> Self::Record {
                pb::$record {
                    public_metadata: shown.field(Field::Public),
                    private_metadata: shown.field(Field::Private),
                    $($unsafe: shown.field(Field::Unsafe),)?
                    $id: shown.record.id.clone(),
                    version: shown.record.version,
                    created_at: shown.record.created_at.map(timestamp),
                    updated_at: shown.record.updated_at.map(timestamp),
                    revision: shown.record.revision,
                }
            }

            fn shown_watch_response(item: WatchItem, fields: FieldSet) -> Self::WatchResponse {
                use pb::$response_module::Response;
                let response = match item {
                    WatchItem::Event(event) => Response::Event(Self::shown_event(&event, fields)),
                    WatchItem::Progress(revision) => {
                        Response::Progress(WatchProgress { revision })
                    }
                };
                pb::$watch_response {
                    response: Some(response),
                }
            }

            fn shown_event(event: &Event, fields: FieldSet) -> Self::Event {
                let shown = |record: &crate::model::Record| {
                    Self::record(Shown { record, fields })
                };
                pb::$event {
                    revision: event.revision,
                    change_type: change_type(event),
                    $id: event.id().to_owned(),
                    changed_fields: changed_fields(event, fields),
                    before: Some(shown(&event.before)),
                    after: Some(shown(&event.after)),
                    committed_at: Some(timestamp(event.committed_at)),
                    actor: event.origin.actor.clone(),
                    trace_id: event.origin.trace_id.clone(),
                    transaction_id: event.origin.transaction_id.clone(),
                }
            }

            fn get_request(id: String, revision: Option<u64>) -> Self::Get {
                pb::$get { $id: id, revision }
            }

            fn merge_request(parts: WriteParts<Struct>) -> Self::Merge {
                write_request!(pb::$merge, parts, $id $(, $unsafe)?)
            }

            fn replace_request(parts: WriteParts<ProtoValue>) -> Self::Replace {
                write_request!(pb::$replace, parts, $id $(, $unsafe)?)
            }

            fn patch_request(parts: WriteParts<ListValue>) -> Self::Patch {
                write_request!(pb::$patch, parts, $id $(, $unsafe)?; request_id)
            }

            fn delete_request(id: String, expected_version: Option<u64>) -> Self::Delete {
                pb::$delete {
                    $id: id,
                    expected_version,
                }
            }

            fn watch_request(
                start_revision: u64,
                ids: Vec<String>,
                progress_notify: bool,
                filter: String,
            ) -> Self::Watch {
                pb::$watch {
                    start_revision,
                    $ids: ids,
                    progress_notify,
                    filter,
                }
            }

            fn batch_get_request(ids: Vec<String>, revision: Option<u64>) -> Self::BatchGet {
                pb::$batch_get { $ids: ids, revision }
            }

            fn history_request(
                id: String,
                page_size: i32,
                page_token: String,
                oldest_first: bool,
            ) -> Self::History {
                pb::$history {
                    $id: id,
                    page_size,
                    page_token,
                    oldest_first,
                }
            }

            fn restore_request(
                id: String,
                revision: u64,
                expected_version: Option<u64>,
            ) -> Self::Restore {
                pb::$restore {
                    $id: id,
                    revision,
                    expected_version,
                }
            }

            fn list_request(filter: String, page_size: i32, page_token: String) -> Self::List {
                pb::$list {
                    filter,
                    page_size,
                    page_token,
                }
            }

            fn batch_got_view(response: Self::BatchGot) -> (Vec<RecordView>, u64) {
                let pb::$batch_got { $records, revision } = response;
                ($records.into_iter().map(Self::record_view).collect(), revision)
            }

            fn listed_view(response: Self::Listed) -> (Vec<RecordView>, String, u64) {
                let pb::$listed {
                    $records,
                    next_page_token,
                    revision,
                } = response;
                let records = $records.into_iter().map(Self::record_view).collect();
                (records, next_page_token, revision)
            }

            fn history_view(response: Self::HistoryPage) -> (Vec<EventView>, String, u64) {
                let pb::$history_page {
                    events,
                    next_page_token,
                    oldest_revision,
                } = response;
                let events = events.into_iter().map(Self::event_message_view).collect();
                (events, next_page_token, oldest_revision)
            }

            fn existed(response: Self::Deleted) -> bool {
                let pb::$deleted { existed } = response;
                existed
            }

            fn record_view(record: Self::Record) -> RecordView {
                let pb::$record {
                    $id,
                    public_metadata,
                    private_metadata,
                    $($unsafe,)?
                    version,
                    created_at,
                    updated_at,
                    revision,
                } = record;
                let fields = vec![
                    (Field::Public, public_metadata),
                    (Field::Private, private_metadata),
                    $((Field::Unsafe, $unsafe),)?
                ];
                RecordView {
                    id: $id,
                    fields,
                    version,
                    revision,
                    created_at,
                    updated_at,
                }
            }

            fn event_view(response: Self::WatchResponse) -> Option<EventView> {
                use pb::$response_module::Response;
                let pb::$watch_response { response } = response;
                let Some(Response::Event(event)) = response else {
                    return None;
                };
                Some(Self::event_message_view(event))
            }

            fn event_message_view(event: Self::Event) -> EventView {
                let pb::$event {
                    revision,
                    change_type,
                    $id,
                    changed_fields,
                    before,
                    after,
                    committed_at,
                    actor,
                    trace_id,
                    transaction_id,
                } = event;
                EventView {
                    revision,
                    change_type,
                    id: $id,
                    changed_fields,
                    before: before.map(Self::record_view),
                    after: after.map(Self::record_view),
                    committed_at,
                    actor,
                    trace_id,
                    transaction_id,
                }
            }
        }
    };
}

api_kind!(
    Users, Kind::User, "/metadata.v1.UserMetadataService/Watch",
    record: UserMetadata, get: GetUserMetadataRequest, merge: MergeUserMetadataRequest,
    replace: ReplaceUserMetadataRequest, patch: PatchUserMetadataRequest, delete: DeleteUserMetadataRequest,
    deleted: DeleteUserMetadataResponse, watch: WatchUserMetadataRequest,
    watch_response: WatchUserMetadataResponse::watch_user_metadata_response,
    event: UserMetadataEvent, batch_get: BatchGetUserMetadataRequest,
    batch_got: BatchGetUserMetadataResponse, list: ListUserMetadataRequest,
    listed: ListUserMetadataResponse, history: ListUserMetadataHistoryRequest,
    history_page: ListUserMetadataHistoryResponse, restore: RestoreUserMetadataRequest,
    records: users,
    id: user_id, ids: user_ids, unsafe: unsafe_metadata
);

api_kind!(
    Organizations, Kind::Organization, "/metadata.v1.OrganizationMetadataService/Watch",
    record: OrganizationMetadata, get: GetOrganizationMetadataRequest,
    merge: MergeOrganizationMetadataRequest, replace: ReplaceOrganizationMetadataRequest,
    patch: PatchOrganizationMetadataRequest,
    delete: DeleteOrganizationMetadataRequest, deleted: DeleteOrganizationMetadataResponse,
    watch: WatchOrganizationMetadataRequest,
    watch_response: WatchOrganizationMetadataResponse::watch_organization_metadata_response,
    event: OrganizationMetadataEvent, batch_get: BatchGetOrganizationMetadataRequest,
    batch_got: BatchGetOrganizationMetadataResponse, list: ListOrganizationMetadataRequest,
    listed: ListOrganizationMetadataResponse, history: ListOrganizationMetadataHistoryRequest,
    history_page: ListOrganizationMetadataHistoryResponse,
    restore: RestoreOrganizationMetadataRequest, records: organizations,
    id: organization_id, ids: organization_ids
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::Problem;
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
