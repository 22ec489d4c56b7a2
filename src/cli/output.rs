//! Responses as JSON, with the field names of the protobuf messages.

use serde_json::{Map, Value, json};

use crate::convert::json_for_display;
use crate::proto::v1::{
    ChangeType, OrganizationMetadata, OrganizationMetadataEvent, UserMetadata, UserMetadataEvent,
};

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

fn fields(map: &mut Map<String, Value>, fields: [(&str, &Option<prost_types::Value>); 3]) {
    for (name, value) in fields {
        // A field the caller may not see is left out, as in the response.
        if let Some(value) = value {
            map.insert(name.to_string(), json_for_display(value));
        }
    }
}

pub fn user(m: &UserMetadata) -> Value {
    let mut map = Map::new();
    map.insert("user_id".into(), json!(m.user_id));
    fields(
        &mut map,
        [
            ("public_metadata", &m.public_metadata),
            ("private_metadata", &m.private_metadata),
            ("unsafe_metadata", &m.unsafe_metadata),
        ],
    );
    map.insert("version".into(), json!(m.version));
    map.insert("revision".into(), json!(m.revision));
    map.insert("created_at".into(), time(&m.created_at));
    map.insert("updated_at".into(), time(&m.updated_at));
    Value::Object(map)
}

pub fn organization(m: &OrganizationMetadata) -> Value {
    let mut map = Map::new();
    map.insert("organization_id".into(), json!(m.organization_id));
    fields(
        &mut map,
        [
            ("public_metadata", &m.public_metadata),
            ("private_metadata", &m.private_metadata),
            ("unsafe_metadata", &None),
        ],
    );
    map.insert("version".into(), json!(m.version));
    map.insert("revision".into(), json!(m.revision));
    map.insert("created_at".into(), time(&m.created_at));
    map.insert("updated_at".into(), time(&m.updated_at));
    Value::Object(map)
}

fn change(change: i32) -> Value {
    let name = ChangeType::try_from(change).map_or("CHANGE_TYPE_UNSPECIFIED", |c| c.as_str_name());
    json!(name)
}

pub fn user_event(e: &UserMetadataEvent) -> Value {
    json!({
        "revision": e.revision,
        "change_type": change(e.change_type),
        "user_id": e.user_id,
        "changed_fields": e.changed_fields,
        "before": e.before.as_ref().map(user),
        "after": e.after.as_ref().map(user),
        "committed_at": time(&e.committed_at),
    })
}

pub fn organization_event(e: &OrganizationMetadataEvent) -> Value {
    json!({
        "revision": e.revision,
        "change_type": change(e.change_type),
        "organization_id": e.organization_id,
        "changed_fields": e.changed_fields,
        "before": e.before.as_ref().map(organization),
        "after": e.after.as_ref().map(organization),
        "committed_at": time(&e.committed_at),
    })
}
