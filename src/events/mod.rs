//! Change events: one per committed change, written in the same transaction
//! as the change (the `events` table is the outbox and the source of truth),
//! then fanned out to Watch streams by the [`Broker`].
//!
//! Revisions are taken as the last step of a write transaction: from a
//! counter row on SQLite (one writer at a time, so dense and in commit
//! order), from a sequence on Postgres (writers to different ids never wait
//! for each other, so a lower revision can commit after a higher one). The
//! dispatcher publishes a revision only once every lower one is settled:
//! committed, or marked void once its writer has ended without it (see
//! `store::events`). A watcher that has seen N can never miss a lower one.

mod broker;
mod retention;

pub use retention::prune_periodically;

pub use broker::{
    Broker, BrokerOptions, BrokerPauses, BrokerStats, MAX_REVISION, WatchError, WatchItem,
    WatchRequest,
};

use std::sync::OnceLock;

use bytes::Bytes;

use crate::model::Event;

/// An event as the broker shares it with every stream that sends it, with
/// its wire encoding, made by the first stream and reused by the others
/// (with a thousand subscribers, encoding per stream was most of the
/// server's CPU). The domain [`Event`] knows nothing of the encoding.
#[derive(Debug)]
pub struct SharedEvent {
    event: Event,
    encoded: OnceLock<Bytes>,
}

impl SharedEvent {
    pub fn new(event: Event) -> Self {
        SharedEvent {
            event,
            encoded: OnceLock::new(),
        }
    }

    /// The encoding of this event, made with `encode` on first use.
    pub fn encoded(&self, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.encoded.get_or_init(|| encode(&self.event)).clone()
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}
