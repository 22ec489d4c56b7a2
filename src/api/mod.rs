//! The gRPC API of each kind, as both ends see it: its messages, and how
//! each is taken apart (the server) or built (the client, the relay), in
//! terms of the proto-free [`crate::model`]. No server here: `service`
//! serves it, `client` calls it, `relay` publishes its events.

mod event;
mod kind;

pub use event::{event_json, event_message_name, event_protobuf};
pub use kind::{ApiKind, EventView, Organizations, RecordView, Users, WriteParts};
