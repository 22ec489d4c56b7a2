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

use chrono::{DateTime, Utc};

pub use retention::prune_periodically;

pub use broker::{
    Broker, BrokerOptions, BrokerPauses, BrokerStats, MAX_REVISION, WatchError, WatchItem,
    WatchRequest,
};

use crate::model::{Field, Kind, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Merged,
    Replaced,
    Deleted,
}

impl ChangeType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ChangeType::Merged => "merged",
            ChangeType::Replaced => "replaced",
            ChangeType::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "merged" => Some(ChangeType::Merged),
            "replaced" => Some(ChangeType::Replaced),
            "deleted" => Some(ChangeType::Deleted),
            _ => None,
        }
    }
}

/// The protobuf encoding of an event, made by the gRPC layer on its first
/// delivery and shared by every stream that sends it. A cache, not part of
/// the event's value: any two compare equal.
#[derive(Clone, Default)]
pub struct WireCache(std::sync::Arc<std::sync::OnceLock<bytes::Bytes>>);

impl WireCache {
    pub fn get_or_init(&self, encode: impl FnOnce() -> bytes::Bytes) -> bytes::Bytes {
        self.0.get_or_init(encode).clone()
    }
}

impl PartialEq for WireCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for WireCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireCache")
    }
}

/// One committed change.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub revision: u64,
    pub change: ChangeType,
    /// The fields whose value differs between `before` and `after`.
    pub changed_fields: Vec<Field>,
    pub before: Record,
    pub after: Record,
    pub committed_at: DateTime<Utc>,
    pub wire: WireCache,
}

impl Event {
    pub fn kind(&self) -> Kind {
        self.after.kind
    }

    pub fn id(&self) -> &str {
        &self.after.id
    }
}

/// The fields that differ between two records, in field order.
pub fn changed_fields(before: &Record, after: &Record) -> Vec<Field> {
    Field::ALL
        .into_iter()
        .filter(|f| before.fields.get(*f) != after.fields.get(*f))
        .collect()
}
