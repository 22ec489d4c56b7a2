//! JSON <-> protobuf for tests, written independently of the service's own
//! conversions so that a bug there cannot hide in both sides of an assert.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::Value as Json;

pub fn value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(structure(json)),
    };
    Value { kind: Some(kind) }
}

/// Panics unless `json` is an object: test inputs are written by hand.
pub fn structure(json: &Json) -> Struct {
    let Json::Object(map) = json else {
        panic!("not an object: {json}")
    };
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

/// Panics unless `json` is an array (a JSON Patch, say).
pub fn list(json: &Json) -> ListValue {
    let Json::Array(items) = json else {
        panic!("not an array: {json}")
    };
    ListValue {
        values: items.iter().map(value).collect(),
    }
}

/// The JSON a client would see. Integral numbers compare equal to integers.
pub fn json(value: &Value) -> Json {
    match value.kind.as_ref().expect("value is set") {
        Kind::NullValue(_) => Json::Null,
        Kind::BoolValue(b) => Json::Bool(*b),
        Kind::NumberValue(n) if n.fract() == 0.0 && n.abs() < 1e15 => Json::from(*n as i64),
        Kind::NumberValue(n) => Json::from(*n),
        Kind::StringValue(s) => Json::String(s.clone()),
        Kind::ListValue(list) => Json::Array(list.values.iter().map(json).collect()),
        Kind::StructValue(s) => {
            Json::Object(s.fields.iter().map(|(k, v)| (k.clone(), json(v))).collect())
        }
    }
}

/// The JSON of an optional response field, which the service always sets.
pub fn field(value: &Option<Value>) -> Json {
    json(value.as_ref().expect("field is always set"))
}
