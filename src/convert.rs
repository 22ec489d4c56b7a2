//! Every protobuf <-> domain conversion, in one place. Conversions into the
//! domain refuse what JSON cannot represent (NaN, infinities, unset values);
//! limits are checked afterwards by [`crate::json::validate_command`].

use prost_types::value::Kind as ProtoKind;
use prost_types::{ListValue, Struct, Timestamp, Value as ProtoValue};
use serde_json::{Map, Value};

use crate::auth::{Action, FieldSet, Operation};
use crate::events::{ChangeType, Event, WatchItem, WatchRequest};
use crate::json::{JsonPath, Problem, ValidationError, json_number};
use crate::json::{Segment, TreeError, within};
use crate::model::{DeleteCommand, Field, Kind, Mode, Record, WriteCommand};
use crate::proto::v1::{
    self as pb, DeleteOrganizationMetadataRequest, DeleteUserMetadataRequest,
    GetOrganizationMetadataRequest, GetUserMetadataRequest, MergeOrganizationMetadataRequest,
    MergeUserMetadataRequest, OrganizationMetadata, OrganizationMetadataEvent,
    ReplaceOrganizationMetadataRequest, ReplaceUserMetadataRequest, UserMetadata,
    UserMetadataEvent, WatchOrganizationMetadataRequest, WatchOrganizationMetadataResponse,
    WatchProgress, WatchUserMetadataRequest, WatchUserMetadataResponse,
    watch_organization_metadata_response, watch_user_metadata_response,
};

fn json_from_proto(value: ProtoValue) -> Result<Value, TreeError> {
    match value.kind {
        None => Err((Problem::MissingValue, Vec::new())),
        Some(ProtoKind::NullValue(_)) => Ok(Value::Null),
        Some(ProtoKind::BoolValue(b)) => Ok(Value::Bool(b)),
        Some(ProtoKind::StringValue(s)) => Ok(Value::String(s)),
        Some(ProtoKind::NumberValue(n)) => json_number(n)
            .map(Value::Number)
            .ok_or((Problem::NonFiniteNumber, Vec::new())),
        Some(ProtoKind::StructValue(s)) => json_from_struct(s),
        Some(ProtoKind::ListValue(list)) => list
            .values
            .into_iter()
            .enumerate()
            .map(|(index, item)| json_from_proto(item).map_err(within(|| Segment::Index(index))))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

/// A value received from the service, as JSON for people to read (the
/// command-line client). What JSON cannot hold (an unset value, NaN) shows
/// as null; the service never sends either.
pub fn json_for_display(value: &ProtoValue) -> Value {
    json_from_proto(value.clone()).unwrap_or(Value::Null)
}

fn json_from_struct(value: Struct) -> Result<Value, TreeError> {
    let mut map = Map::new();
    for (key, item) in value.fields {
        let item = json_from_proto(item).map_err(within(|| Segment::Key(key.clone())))?;
        map.insert(key, item);
    }
    Ok(Value::Object(map))
}

/// The JSON form of one request field, with errors located under `field`.
fn field_json<T>(
    field: Field,
    value: T,
    convert: fn(T) -> Result<Value, TreeError>,
) -> Result<(Field, Value), ValidationError> {
    convert(value)
        .map(|json| (field, json))
        .map_err(|(problem, segments)| {
            ValidationError::new(JsonPath::from_reversed(field.name(), &segments), problem)
        })
}

pub fn proto_from_json(value: &Value) -> ProtoValue {
    let kind = match value {
        Value::Null => ProtoKind::NullValue(0),
        Value::Bool(b) => ProtoKind::BoolValue(*b),
        Value::Number(n) => ProtoKind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => ProtoKind::StringValue(s.clone()),
        Value::Array(items) => ProtoKind::ListValue(ListValue {
            values: items.iter().map(proto_from_json).collect(),
        }),
        Value::Object(map) => ProtoKind::StructValue(Struct {
            fields: map
                .iter()
                .map(|(key, item)| (key.clone(), proto_from_json(item)))
                .collect(),
        }),
    };
    ProtoValue { kind: Some(kind) }
}

pub fn timestamp(time: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// Collects the provided fields of a write request, in field order.
fn write_command<T>(
    kind: Kind,
    id: String,
    mode: Mode,
    fields: [(Field, Option<T>); 3],
    convert: fn(T) -> Result<Value, TreeError>,
    expected_version: Option<u64>,
) -> Result<WriteCommand, ValidationError> {
    let values = fields
        .into_iter()
        .filter_map(|(field, value)| value.map(|v| field_json(field, v, convert)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WriteCommand {
        kind,
        id,
        mode,
        values,
        expected_version,
    })
}

impl TryFrom<MergeUserMetadataRequest> for WriteCommand {
    type Error = ValidationError;

    fn try_from(r: MergeUserMetadataRequest) -> Result<Self, Self::Error> {
        let fields = [
            (Field::Public, r.public_metadata),
            (Field::Private, r.private_metadata),
            (Field::Unsafe, r.unsafe_metadata),
        ];
        write_command(
            Kind::User,
            r.user_id,
            Mode::Merge,
            fields,
            json_from_struct,
            r.expected_version,
        )
    }
}

impl TryFrom<ReplaceUserMetadataRequest> for WriteCommand {
    type Error = ValidationError;

    fn try_from(r: ReplaceUserMetadataRequest) -> Result<Self, Self::Error> {
        let fields = [
            (Field::Public, r.public_metadata),
            (Field::Private, r.private_metadata),
            (Field::Unsafe, r.unsafe_metadata),
        ];
        write_command(
            Kind::User,
            r.user_id,
            Mode::Replace,
            fields,
            json_from_proto,
            r.expected_version,
        )
    }
}

impl TryFrom<MergeOrganizationMetadataRequest> for WriteCommand {
    type Error = ValidationError;

    fn try_from(r: MergeOrganizationMetadataRequest) -> Result<Self, Self::Error> {
        let fields = [
            (Field::Public, r.public_metadata),
            (Field::Private, r.private_metadata),
            (Field::Unsafe, None),
        ];
        write_command(
            Kind::Organization,
            r.organization_id,
            Mode::Merge,
            fields,
            json_from_struct,
            r.expected_version,
        )
    }
}

impl TryFrom<ReplaceOrganizationMetadataRequest> for WriteCommand {
    type Error = ValidationError;

    fn try_from(r: ReplaceOrganizationMetadataRequest) -> Result<Self, Self::Error> {
        let fields = [
            (Field::Public, r.public_metadata),
            (Field::Private, r.private_metadata),
            (Field::Unsafe, None),
        ];
        write_command(
            Kind::Organization,
            r.organization_id,
            Mode::Replace,
            fields,
            json_from_proto,
            r.expected_version,
        )
    }
}

impl From<DeleteUserMetadataRequest> for DeleteCommand {
    fn from(r: DeleteUserMetadataRequest) -> Self {
        DeleteCommand {
            kind: Kind::User,
            id: r.user_id,
            expected_version: r.expected_version,
        }
    }
}

impl From<DeleteOrganizationMetadataRequest> for DeleteCommand {
    fn from(r: DeleteOrganizationMetadataRequest) -> Self {
        DeleteCommand {
            kind: Kind::Organization,
            id: r.organization_id,
            expected_version: r.expected_version,
        }
    }
}

/// A record as one caller may see it: fields outside `fields` are left out.
pub struct Shown {
    pub record: Record,
    pub fields: FieldSet,
}

impl Shown {
    fn field(&self, field: Field) -> Option<ProtoValue> {
        self.fields
            .contains(field)
            .then(|| proto_from_json(self.record.fields.get(field)))
    }
}

impl From<Shown> for UserMetadata {
    fn from(shown: Shown) -> Self {
        UserMetadata {
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
}

impl From<Shown> for OrganizationMetadata {
    fn from(shown: Shown) -> Self {
        OrganizationMetadata {
            public_metadata: shown.field(Field::Public),
            private_metadata: shown.field(Field::Private),
            organization_id: shown.record.id,
            version: shown.record.version,
            created_at: shown.record.created_at.map(timestamp),
            updated_at: shown.record.updated_at.map(timestamp),
            revision: shown.record.revision,
        }
    }
}

/// The whole record, as backend callers and events see it.
impl From<Record> for UserMetadata {
    fn from(record: Record) -> Self {
        Shown {
            record,
            fields: FieldSet::ALL,
        }
        .into()
    }
}

impl From<Record> for OrganizationMetadata {
    fn from(record: Record) -> Self {
        Shown {
            record,
            fields: FieldSet::ALL,
        }
        .into()
    }
}

/// The fields a write request provides, seen before any value is decoded.
fn provided<const N: usize>(fields: [(Field, bool); N]) -> FieldSet {
    FieldSet::of(fields.into_iter().filter(|(_, p)| *p).map(|(f, _)| f))
}

fn operation(kind: Kind, action: Action, id: &str, written: FieldSet) -> Operation<'_> {
    Operation {
        kind,
        action,
        id,
        written,
    }
}

impl<'a> From<&'a GetUserMetadataRequest> for Operation<'a> {
    fn from(r: &'a GetUserMetadataRequest) -> Self {
        operation(Kind::User, Action::Get, &r.user_id, FieldSet::NONE)
    }
}

impl<'a> From<&'a MergeUserMetadataRequest> for Operation<'a> {
    fn from(r: &'a MergeUserMetadataRequest) -> Self {
        let written = provided([
            (Field::Public, r.public_metadata.is_some()),
            (Field::Private, r.private_metadata.is_some()),
            (Field::Unsafe, r.unsafe_metadata.is_some()),
        ]);
        operation(Kind::User, Action::Merge, &r.user_id, written)
    }
}

impl<'a> From<&'a ReplaceUserMetadataRequest> for Operation<'a> {
    fn from(r: &'a ReplaceUserMetadataRequest) -> Self {
        let written = provided([
            (Field::Public, r.public_metadata.is_some()),
            (Field::Private, r.private_metadata.is_some()),
            (Field::Unsafe, r.unsafe_metadata.is_some()),
        ]);
        operation(Kind::User, Action::Replace, &r.user_id, written)
    }
}

impl<'a> From<&'a DeleteUserMetadataRequest> for Operation<'a> {
    fn from(r: &'a DeleteUserMetadataRequest) -> Self {
        operation(Kind::User, Action::Delete, &r.user_id, FieldSet::ALL)
    }
}

impl<'a> From<&'a WatchUserMetadataRequest> for Operation<'a> {
    fn from(_: &'a WatchUserMetadataRequest) -> Self {
        operation(Kind::User, Action::Watch, "", FieldSet::NONE)
    }
}

impl<'a> From<&'a GetOrganizationMetadataRequest> for Operation<'a> {
    fn from(r: &'a GetOrganizationMetadataRequest) -> Self {
        operation(
            Kind::Organization,
            Action::Get,
            &r.organization_id,
            FieldSet::NONE,
        )
    }
}

impl<'a> From<&'a MergeOrganizationMetadataRequest> for Operation<'a> {
    fn from(r: &'a MergeOrganizationMetadataRequest) -> Self {
        let written = provided([
            (Field::Public, r.public_metadata.is_some()),
            (Field::Private, r.private_metadata.is_some()),
        ]);
        operation(
            Kind::Organization,
            Action::Merge,
            &r.organization_id,
            written,
        )
    }
}

impl<'a> From<&'a ReplaceOrganizationMetadataRequest> for Operation<'a> {
    fn from(r: &'a ReplaceOrganizationMetadataRequest) -> Self {
        let written = provided([
            (Field::Public, r.public_metadata.is_some()),
            (Field::Private, r.private_metadata.is_some()),
        ]);
        operation(
            Kind::Organization,
            Action::Replace,
            &r.organization_id,
            written,
        )
    }
}

impl<'a> From<&'a DeleteOrganizationMetadataRequest> for Operation<'a> {
    fn from(r: &'a DeleteOrganizationMetadataRequest) -> Self {
        operation(
            Kind::Organization,
            Action::Delete,
            &r.organization_id,
            FieldSet::ALL,
        )
    }
}

impl<'a> From<&'a WatchOrganizationMetadataRequest> for Operation<'a> {
    fn from(_: &'a WatchOrganizationMetadataRequest) -> Self {
        operation(Kind::Organization, Action::Watch, "", FieldSet::NONE)
    }
}

impl From<ChangeType> for pb::ChangeType {
    fn from(change: ChangeType) -> Self {
        match change {
            ChangeType::Merged => pb::ChangeType::Merged,
            ChangeType::Replaced => pb::ChangeType::Replaced,
            ChangeType::Deleted => pb::ChangeType::Deleted,
        }
    }
}

fn field_names(event: &Event) -> Vec<String> {
    event
        .changed_fields
        .iter()
        .map(|f| f.name().to_owned())
        .collect()
}

impl From<&Event> for UserMetadataEvent {
    fn from(event: &Event) -> Self {
        UserMetadataEvent {
            revision: event.revision,
            change_type: pb::ChangeType::from(event.change).into(),
            user_id: event.id().to_owned(),
            changed_fields: field_names(event),
            before: Some(event.before.clone().into()),
            after: Some(event.after.clone().into()),
            committed_at: Some(timestamp(event.committed_at)),
        }
    }
}

impl From<&Event> for OrganizationMetadataEvent {
    fn from(event: &Event) -> Self {
        OrganizationMetadataEvent {
            revision: event.revision,
            change_type: pb::ChangeType::from(event.change).into(),
            organization_id: event.id().to_owned(),
            changed_fields: field_names(event),
            before: Some(event.before.clone().into()),
            after: Some(event.after.clone().into()),
            committed_at: Some(timestamp(event.committed_at)),
        }
    }
}

impl From<WatchItem> for WatchUserMetadataResponse {
    fn from(item: WatchItem) -> Self {
        use watch_user_metadata_response::Response;
        let response = match item {
            WatchItem::Event(event) => Response::Event(event.as_ref().into()),
            WatchItem::Progress(revision) => Response::Progress(WatchProgress { revision }),
        };
        WatchUserMetadataResponse {
            response: Some(response),
        }
    }
}

impl From<WatchItem> for WatchOrganizationMetadataResponse {
    fn from(item: WatchItem) -> Self {
        use watch_organization_metadata_response::Response;
        let response = match item {
            WatchItem::Event(event) => Response::Event(event.as_ref().into()),
            WatchItem::Progress(revision) => Response::Progress(WatchProgress { revision }),
        };
        WatchOrganizationMetadataResponse {
            response: Some(response),
        }
    }
}

impl From<WatchUserMetadataRequest> for WatchRequest {
    fn from(r: WatchUserMetadataRequest) -> Self {
        WatchRequest {
            kind: Kind::User,
            start_revision: r.start_revision,
            ids: r.user_ids.into_iter().collect(),
            progress_notify: r.progress_notify,
        }
    }
}

impl From<WatchOrganizationMetadataRequest> for WatchRequest {
    fn from(r: WatchOrganizationMetadataRequest) -> Self {
        WatchRequest {
            kind: Kind::Organization,
            start_revision: r.start_revision,
            ids: r.organization_ids.into_iter().collect(),
            progress_notify: r.progress_notify,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn integral_doubles_become_integers() {
        assert_eq!(json_from_proto(number(1.0)).unwrap().to_string(), "1");
        assert_eq!(json_from_proto(number(-0.0)).unwrap().to_string(), "0");
        assert_eq!(json_from_proto(number(1.5)).unwrap().to_string(), "1.5");
        assert_eq!(
            json_from_proto(number(9_007_199_254_740_992.0))
                .unwrap()
                .to_string(),
            "9007199254740992"
        );
        // Beyond 2^53 a double may not be the integer the client meant.
        assert_eq!(json_from_proto(number(1e20)).unwrap().to_string(), "1e+20");
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_path() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let request = MergeUserMetadataRequest {
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
            let err = WriteCommand::try_from(request).unwrap_err();
            assert_eq!(err.problem, Problem::NonFiniteNumber);
            assert_eq!(err.path.to_string(), "private_metadata.a[1]");
        }
    }

    #[test]
    fn unset_value_is_refused() {
        let request = ReplaceUserMetadataRequest {
            user_id: "u".into(),
            unsafe_metadata: Some(ProtoValue { kind: None }),
            ..Default::default()
        };
        let err = WriteCommand::try_from(request).unwrap_err();
        assert_eq!(err.problem, Problem::MissingValue);
        assert_eq!(err.path.to_string(), "unsafe_metadata");
    }

    #[test]
    fn omitted_fields_are_not_in_the_command() {
        let request = MergeOrganizationMetadataRequest {
            organization_id: "org".into(),
            private_metadata: Some(structure(vec![("k", number(2.0))])),
            expected_version: Some(3),
            ..Default::default()
        };
        let command = WriteCommand::try_from(request).unwrap();
        assert_eq!(command.values, vec![(Field::Private, json!({"k":2}))]);
        assert_eq!(command.expected_version, Some(3));
        assert_eq!(command.kind, Kind::Organization);
    }

    #[test]
    fn round_trip() {
        let value = json!({"a":[1,2.5,"s",true,null,{"b":{}}],"c":-3});
        let back = json_from_proto(proto_from_json(&value)).unwrap();
        assert_eq!(back, value);
    }
}
