//! What one delivery carries: the event's type, and a JSON body wrapping
//! the event exactly as Watch sends it, in its proto3 JSON form.

use crate::model::{ChangeType, Event, Kind};

/// Every event type an endpoint can ask for (`Webhook.event_types`).
pub const EVENT_TYPES: [&str; 4] = [
    "user.metadata.updated",
    "user.metadata.deleted",
    "organization.metadata.updated",
    "organization.metadata.deleted",
];

/// The type of `event`: a delete is `.deleted`, any other change (a first
/// write included) `.updated`.
pub fn event_type(event: &Event) -> &'static str {
    match (event.kind(), event.change) {
        (Kind::User, ChangeType::Deleted) => EVENT_TYPES[1],
        (Kind::User, _) => EVENT_TYPES[0],
        (Kind::Organization, ChangeType::Deleted) => EVENT_TYPES[3],
        (Kind::Organization, _) => EVENT_TYPES[2],
    }
}

/// The body: `{"type", "revision" (a string, as 64-bit integers are in
/// proto3 JSON), "timestamp" (the commit's, RFC 3339), "data" (the
/// event)}`. The event's JSON is pasted in as made, not parsed again.
pub fn body(event: &Event) -> Vec<u8> {
    let data = crate::api::event_json(event);
    let timestamp = event
        .committed_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut body = Vec::with_capacity(data.len() + 128);
    body.extend_from_slice(br#"{"type":""#);
    body.extend_from_slice(event_type(event).as_bytes());
    body.extend_from_slice(br#"","revision":""#);
    body.extend_from_slice(event.revision.to_string().as_bytes());
    body.extend_from_slice(br#"","timestamp":""#);
    body.extend_from_slice(timestamp.as_bytes());
    body.extend_from_slice(br#"","data":"#);
    body.extend_from_slice(&data);
    body.push(b'}');
    body
}

/// The `webhook-id` of `event` sent to endpoint `endpoint`: the same for
/// every attempt and every replay of it there, so that a receiver drops a
/// repeat by it; different at another endpoint.
pub fn message_id(endpoint: &str, revision: u64) -> String {
    format!("{endpoint}_{revision}")
}
