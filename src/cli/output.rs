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

/// The fields both kinds of record share, after their id and metadata.
struct Stamps<'a> {
    version: u64,
    revision: u64,
    created_at: &'a Option<prost_types::Timestamp>,
    updated_at: &'a Option<prost_types::Timestamp>,
}

fn record(
    id: (&str, &str),
    fields: &[(&str, &Option<prost_types::Value>)],
    stamps: Stamps,
) -> Value {
    let mut map = Map::new();
    map.insert(id.0.into(), json!(id.1));
    for (name, value) in fields {
        // A field the caller may not see is left out, as in the response.
        if let Some(value) = value {
            map.insert(name.to_string(), json_for_display(value));
        }
    }
    map.insert("version".into(), json!(stamps.version));
    map.insert("revision".into(), json!(stamps.revision));
    map.insert("created_at".into(), time(stamps.created_at));
    map.insert("updated_at".into(), time(stamps.updated_at));
    Value::Object(map)
}

pub fn user(m: &UserMetadata) -> Value {
    let fields = [
        ("public_metadata", &m.public_metadata),
        ("private_metadata", &m.private_metadata),
        ("unsafe_metadata", &m.unsafe_metadata),
    ];
    let stamps = Stamps {
        version: m.version,
        revision: m.revision,
        created_at: &m.created_at,
        updated_at: &m.updated_at,
    };
    record(("user_id", &m.user_id), &fields, stamps)
}

pub fn organization(m: &OrganizationMetadata) -> Value {
    let fields = [
        ("public_metadata", &m.public_metadata),
        ("private_metadata", &m.private_metadata),
    ];
    let stamps = Stamps {
        version: m.version,
        revision: m.revision,
        created_at: &m.created_at,
        updated_at: &m.updated_at,
    };
    record(("organization_id", &m.organization_id), &fields, stamps)
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
