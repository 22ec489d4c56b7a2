//! Responses as JSON, with the field names of the protobuf messages, the
//! same printers for both kinds.

use serde_json::{Map, Value, json};

use crate::api::{EventView, RecordView};
use crate::convert::json_for_display;
use crate::model::Kind;
use crate::proto::v1::{ChangeType, MetadataField, MetadataKind, MetadataSchema};

pub fn print(value: &Value, pretty: bool) {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    println!("{}", text.expect("JSON values always serialize"));
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

pub fn record(kind: Kind, view: &RecordView) -> Value {
    let mut map = Map::new();
    map.insert(kind.id_field().into(), json!(view.id));
    for (field, value) in &view.fields {
        // A field the caller may not see is left out, as in the response.
        if let Some(value) = value {
            map.insert(field.name().into(), json_for_display(value));
        }
    }
    map.insert("version".into(), json!(view.version));
    map.insert("revision".into(), json!(view.revision));
    map.insert("created_at".into(), time(&view.created_at));
    map.insert("updated_at".into(), time(&view.updated_at));
    Value::Object(map)
}

/// A BatchGet response, or a List page (with its next page token).
pub fn records(kind: Kind, views: &[RecordView], next: Option<String>, revision: u64) -> Value {
    let name = match kind {
        Kind::User => "users",
        Kind::Organization => "organizations",
    };
    let mut map = Map::new();
    let records = views.iter().map(|view| record(kind, view)).collect();
    map.insert(name.into(), Value::Array(records));
    if let Some(next) = next {
        map.insert("next_page_token".into(), json!(next));
    }
    map.insert("revision".into(), json!(revision));
    Value::Object(map)
}

fn change(change: i32) -> Value {
    let name = ChangeType::try_from(change).map_or("CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
    json!(name)
}

pub fn event(kind: Kind, view: &EventView) -> Value {
    let mut map = Map::new();
    map.insert("revision".into(), json!(view.revision));
    map.insert("change_type".into(), change(view.change_type));
    map.insert(kind.id_field().into(), json!(view.id));
    map.insert("changed_fields".into(), json!(view.changed_fields));
    let record = |r: &Option<RecordView>| r.as_ref().map_or(Value::Null, |r| record(kind, r));
    map.insert("before".into(), record(&view.before));
    map.insert("after".into(), record(&view.after));
    map.insert("committed_at".into(), time(&view.committed_at));
    map.insert("actor".into(), json!(view.actor));
    map.insert("trace_id".into(), json!(view.trace_id));
    Value::Object(map)
}

/// A field's schema: its kind and field by their enum names, the schema
/// (`{}` when none is set), its version and when it last changed.
pub fn schema(message: &MetadataSchema) -> Value {
    let kind = MetadataKind::try_from(message.kind).unwrap_or(MetadataKind::Unspecified);
    let field = MetadataField::try_from(message.field).unwrap_or(MetadataField::Unspecified);
    let schema = prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(
            message.schema.clone().unwrap_or_default(),
        )),
    };
    json!({
        "kind": kind.as_str_name(),
        "field": field.as_str_name(),
        "schema": json_for_display(&schema),
        "version": message.version,
        "updated_at": time(&message.updated_at),
    })
}
