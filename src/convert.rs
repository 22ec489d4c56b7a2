//! Protobuf <-> JSON values, timestamps and change types: the conversions
//! both kinds share. Conversions into the domain refuse what JSON cannot
//! represent (NaN, infinities, unset values); limits are checked afterwards
//! by [`crate::json::validate_command`]. Each kind's messages are built and
//! taken apart in `service::kind`.

use prost_types::value::Kind as ProtoKind;
use prost_types::{ListValue, Struct, Timestamp, Value as ProtoValue};
use serde_json::{Map, Value};

use crate::auth::FieldSet;
use crate::json::json_number;
use crate::model::{ChangeType, Field, Record};
use crate::proto::v1 as pb;
use crate::validation::{JsonPath, Problem, ValidationError};
use crate::validation::{Segment, TreeError, within};

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

/// A protobuf value that decodes to JSON: a Merge patch (`Struct`) or a
/// Replace value (`Value`).
pub trait TreeConvert: Sized {
    /// The value of `field` as JSON; an error names its path in the field.
    fn decode(self, field: Field) -> Result<Value, ValidationError>;
}

fn located(field: Field, result: Result<Value, TreeError>) -> Result<Value, ValidationError> {
    located_under(field.name(), result)
}

fn located_under(root: &str, result: Result<Value, TreeError>) -> Result<Value, ValidationError> {
    result.map_err(|(problem, segments)| {
        ValidationError::new(JsonPath::from_reversed(root, &segments), problem)
    })
}

/// A Struct of a request field named `root` (not a metadata field, e.g. a
/// schema) as JSON; an error names its path under `root`.
pub fn struct_to_json(root: &str, value: Struct) -> Result<Value, ValidationError> {
    located_under(root, json_from_struct(value))
}

impl TreeConvert for Struct {
    fn decode(self, field: Field) -> Result<Value, ValidationError> {
        located(field, json_from_struct(self))
    }
}

/// A JSON Patch: a list of operations.
impl TreeConvert for prost_types::ListValue {
    fn decode(self, field: Field) -> Result<Value, ValidationError> {
        let list = ProtoValue {
            kind: Some(ProtoKind::ListValue(self)),
        };
        located(field, json_from_proto(list))
    }
}

impl TreeConvert for ProtoValue {
    fn decode(self, field: Field) -> Result<Value, ValidationError> {
        located(field, json_from_proto(self))
    }
}

/// A record as one caller may see it: fields outside `fields` are left out.
/// Borrowed: the message is built from it, so an event's snapshots need no
/// copy first.
pub struct Shown<'a> {
    pub record: &'a Record,
    pub fields: FieldSet,
}

impl<'a> Shown<'a> {
    /// The whole record, as backend callers and events see it.
    pub fn all(record: &'a Record) -> Self {
        Shown {
            record,
            fields: FieldSet::ALL,
        }
    }

    /// A field's value, if the caller may see it.
    pub fn field(&self, field: Field) -> Option<ProtoValue> {
        self.fields
            .contains(field)
            .then(|| proto_from_json(self.record.fields.get(field)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn number(n: f64) -> ProtoValue {
        ProtoValue {
            kind: Some(ProtoKind::NumberValue(n)),
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
    fn round_trip() {
        let value = json!({"a":[1,2.5,"s",true,null,{"b":{}}],"c":-3});
        let back = json_from_proto(proto_from_json(&value)).unwrap();
        assert_eq!(back, value);
    }
}
