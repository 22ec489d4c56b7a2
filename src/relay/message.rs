//! What the relay publishes: each event as Watch sends it (the kind's
//! `...MetadataEvent`, protobuf or its proto3 JSON form), with headers a
//! consumer can route on without decoding, and the relay's own markers.
//!
//! Every message carries `Metadata-Revision`: the revision up to which the
//! stream is complete once it is stored. That is what a restarted relay
//! reads back from the stream's last message to continue exactly after it.

use async_nats::HeaderMap;
use bytes::Bytes;

use super::subject;
use crate::api::{event_json, event_message_name as message_name, event_protobuf};
use crate::model::Event;

/// The body's encoding (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The event message, binary protobuf, as in Watch.
    Protobuf,
    /// The same message in its proto3 JSON form.
    Json,
}

pub const REVISION: &str = "Metadata-Revision";
pub const KIND: &str = "Metadata-Kind";
pub const CHANGE_TYPE: &str = "Metadata-Change-Type";
pub const MARKER: &str = "Metadata-Marker";
/// Who made the change (the event's `actor`), percent-encoded outside
/// printable ASCII; absent when nobody is named.
pub const ACTOR: &str = "Metadata-Actor";
/// The transaction that made the change (the event's `transaction_id`);
/// absent for a single write.
pub const TRANSACTION_ID: &str = "Metadata-Transaction-Id";
/// The revision of the transaction's last event: a consumer that needs a
/// transaction whole holds its messages until this one.
pub const TRANSACTION_END: &str = "Metadata-Transaction-End";
pub const CONTENT_TYPE: &str = "Content-Type";
pub const MSG_ID: &str = "Nats-Msg-Id";

/// A message ready to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The stream is complete up to here once this message is stored.
    pub revision: u64,
}

/// The message for `event`, on `prefix`; `transaction_end`: the revision
/// of the last event of its transaction, if it has one.
pub fn for_event(
    event: &Event,
    prefix: &str,
    format: Format,
    transaction_end: Option<u64>,
) -> Outgoing {
    let kind = event.kind();
    let (body, content_type) = match format {
        Format::Protobuf => (
            event_protobuf(event),
            format!("application/protobuf; proto={}", message_name(kind)),
        ),
        Format::Json => (
            event_json(event),
            format!("application/json; proto={}", message_name(kind)),
        ),
    };
    let revision = event.revision.to_string();
    let mut headers = HeaderMap::new();
    // JetStream drops a second message with the same id within the
    // stream's duplicate window.
    headers.insert(MSG_ID, revision.as_str());
    headers.insert(REVISION, revision.as_str());
    headers.insert(KIND, subject::kind_token(kind));
    headers.insert(CHANGE_TYPE, event.change.as_str());
    if !event.origin.actor.is_empty() {
        headers.insert(ACTOR, header_value(&event.origin.actor).as_str());
    }
    if let (false, Some(end)) = (event.origin.transaction_id.is_empty(), transaction_end) {
        // A UUID the service made: printable as it is.
        headers.insert(TRANSACTION_ID, event.origin.transaction_id.as_str());
        headers.insert(TRANSACTION_END, end.to_string().as_str());
    }
    headers.insert(CONTENT_TYPE, content_type.as_str());
    Outgoing {
        subject: subject::event_subject(prefix, kind, event.id()),
        headers,
        body: body.into(),
        revision: event.revision,
    }
}

/// `text` as a header value: a token's `sub` is whatever its issuer signed,
/// and a line break would end the header. Bytes outside printable ASCII,
/// and `%` itself, are percent-encoded.
fn header_value(text: &str) -> String {
    let mut value = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'%' => value.push_str("%25"),
            0x20..=0x7e => value.push(byte as char),
            _ => value.push_str(&format!("%{byte:02X}")),
        }
    }
    value
}

/// Why the relay published a marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerReason {
    /// A new stream: it holds the log from after `revision` (what the event
    /// table still had), not from the beginning.
    Start,
    /// `--from-now`: the events up to `revision` are not in the stream,
    /// whatever came before this marker.
    Reseed,
    /// Nothing happened for a while: the stream is complete up to
    /// `revision`. Written when the relay has been idle for a quarter of
    /// the stream's max age, so that the stream never expires down to
    /// nothing while the relay runs (the last message is where a restarted
    /// relay goes on from).
    Progress,
}

impl MarkerReason {
    pub fn name(self) -> &'static str {
        match self {
            MarkerReason::Start => "start",
            MarkerReason::Reseed => "reseed",
            MarkerReason::Progress => "progress",
        }
    }
}

/// A marker: no event, only the revision after which the stream goes on.
/// `at` is the stream sequence it is expected at, which makes its id
/// unique (two progress markers may carry the same revision).
pub fn marker(reason: MarkerReason, revision: u64, at: u64, prefix: &str) -> Outgoing {
    let mut headers = HeaderMap::new();
    headers.insert(
        MSG_ID,
        format!("{}-{revision}-{at}", reason.name()).as_str(),
    );
    headers.insert(REVISION, revision.to_string().as_str());
    headers.insert(MARKER, reason.name());
    headers.insert(CONTENT_TYPE, "application/json");
    let body = serde_json::json!({
        "marker": reason.name(),
        "revision": revision.to_string(),
        "note": "the stream goes on after this revision",
    });
    Outgoing {
        subject: subject::marker_subject(prefix),
        headers,
        body: serde_json::to_vec(&body)
            .expect("serializing into memory cannot fail")
            .into(),
        revision,
    }
}

/// The revision a stored message says the stream is complete up to.
pub fn stored_revision(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get(REVISION)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_stay_one_header_line() {
        assert_eq!(header_value("key:billing"), "key:billing");
        assert_eq!(
            header_value("frontend:a\r\nX-Evil: 1%é"),
            "frontend:a%0D%0AX-Evil: 1%25%C3%A9"
        );
    }
}
