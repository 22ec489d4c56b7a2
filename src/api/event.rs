//! An event as Watch sends it, encoded once for whoever else carries it:
//! protobuf, or its proto3 JSON form (the relay's messages, webhooks'
//! bodies).

use prost::Message;
use prost_reflect::{DynamicMessage, SerializeOptions};

use super::{ApiKind, Organizations, Users};
use crate::model::{Event, Kind};

/// The full name of the kind's event message.
pub fn event_message_name(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "metadata.v1.UserMetadataEvent",
        Kind::Organization => "metadata.v1.OrganizationMetadataEvent",
    }
}

/// The event's message, encoded.
pub fn event_protobuf(event: &Event) -> Vec<u8> {
    match event.kind() {
        Kind::User => Users::event(event).encode_to_vec(),
        Kind::Organization => Organizations::event(event).encode_to_vec(),
    }
}

/// The event's message in proto3 JSON (field names in lowerCamelCase, 64-bit
/// integers as strings, enums by name, timestamps in RFC 3339), made by
/// prost-reflect from the descriptors, so it follows the proto exactly.
pub fn event_json(event: &Event) -> Vec<u8> {
    let descriptor = crate::proto::descriptor_pool()
        .get_message_by_name(event_message_name(event.kind()))
        .expect("the event messages are in the descriptor set");
    let message = DynamicMessage::decode(descriptor, event_protobuf(event).as_slice())
        .expect("a message this process encoded decodes");
    let mut body = Vec::new();
    let mut serializer = serde_json::Serializer::new(&mut body);
    message
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .expect("serializing into memory cannot fail");
    body
}
