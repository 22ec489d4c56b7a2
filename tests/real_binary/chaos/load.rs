//! The chaos test's clients: writers that record the outcome of every call
//! exactly as the client saw it, and Watch subscribers that resume as
//! README tells a consumer to. What they record is the evidence the test
//! checks against the log afterwards, so nothing here asserts: a task that
//! panicked would take its evidence with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::watch_user_metadata_response::Response;
use metadata_service::proto::v1::{
    MergeUserMetadataRequest, UserMetadataEvent, WatchUserMetadataRequest,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::json::{field, structure};

/// Writers merge into this many users, so that they contend on rows (the
/// unlocked write's revision check, the locking fallback).
pub const USERS: usize = 4;
/// The deadline each write carries: longer than the servers' --db-timeout,
/// so that a server answers a write in doubt itself, after settling it.
const CALL_DEADLINE: Duration = Duration::from_secs(4);
/// Past this the client stops waiting (its own DEADLINE_EXCEEDED).
const CLIENT_PATIENCE: Duration = Duration::from_secs(6);
/// How long a writer prefers the other replica after a failure.
const AVOID: Duration = Duration::from_millis(300);
const PAUSE_ON_ERROR: Duration = Duration::from_millis(25);
/// How long a subscriber waits before it resumes after an error status.
const RESUME_AFTER_ERROR: Duration = Duration::from_millis(100);
/// With progress_notify and the replicas' 1 s progress interval, a stream
/// that says nothing for this long is stuck.
const STALL: Duration = Duration::from_secs(5);

pub fn user_id(n: usize) -> String {
    format!("chaos_u{n}")
}

/// The tag a write puts in `public_metadata.tag`, unique per write: an
/// event of the log names the write it came from.
pub fn tag_of(event_after: &serde_json::Value) -> Option<String> {
    event_after
        .get("tag")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
}

/// What the client learnt of a write.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Acknowledged, with the revision of its change.
    Acked { revision: u64, version: u64 },
    /// UNAVAILABLE answered by the server: certainly not applied.
    Unavailable(String),
    /// DEADLINE_EXCEEDED: the server's "may have been applied", or the
    /// client gave up waiting.
    Deadline(String),
    /// Failed on the client's side (no connection, reset, GOAWAY): the
    /// server may have applied it or never heard of it.
    Transport(String),
    /// Any other status the server answered.
    Other(String),
}

#[derive(Clone, Debug)]
pub struct Write {
    pub tag: String,
    pub user: String,
    pub replica: usize,
    /// Since the test's start.
    pub done: Duration,
    pub outcome: Outcome,
}

/// Whether a status was answered by the server. tonic gives every status it
/// makes up itself (connect errors, h2 resets and GOAWAY, hyper errors) the
/// error behind it as its source; a status read from the server's
/// grpc-status has none.
fn classify(status: &Status) -> Outcome {
    let text = format!("{:?}: {}", status.code(), status.message());
    if std::error::Error::source(status).is_some() {
        return Outcome::Transport(text);
    }
    match status.code() {
        Code::Unavailable => Outcome::Unavailable(text),
        Code::DeadlineExceeded => Outcome::Deadline(text),
        _ => Outcome::Other(text),
    }
}

/// Writes until `stop`, alternating between the replicas and preferring the
/// other one for a moment after a failure (a client with two endpoints).
/// A write in progress when `stop` fires is finished: its outcome counts.
pub async fn writer(
    w: usize,
    replicas: [Channel; 2],
    t0: Instant,
    stop: CancellationToken,
) -> Vec<Write> {
    let mut clients = replicas.map(UserMetadataServiceClient::new);
    let mut avoid_until = [t0; 2];
    let mut next = w % 2;
    let mut out = Vec::new();
    for seq in 0usize.. {
        if stop.is_cancelled() {
            break;
        }
        let now = Instant::now();
        let mut replica = next;
        if avoid_until[replica] > now && avoid_until[1 - replica] <= now {
            replica = 1 - replica;
        }
        next = 1 - replica;
        let tag = format!("w{w}-{seq}");
        let user = user_id((w + seq) % USERS);
        let mut request = tonic::Request::new(MergeUserMetadataRequest {
            user_id: user.clone(),
            public_metadata: Some(structure(&json!({ "tag": tag, format!("w{w}"): seq }))),
            ..Default::default()
        });
        request.set_timeout(CALL_DEADLINE);
        let outcome =
            match tokio::time::timeout(CLIENT_PATIENCE, clients[replica].merge(request)).await {
                Ok(Ok(response)) => {
                    let record = response.into_inner();
                    Outcome::Acked {
                        revision: record.revision,
                        version: record.version,
                    }
                }
                Ok(Err(status)) => classify(&status),
                Err(_) => Outcome::Deadline(format!("client gave up after {CLIENT_PATIENCE:?}")),
            };
        let failed = !matches!(outcome, Outcome::Acked { .. });
        out.push(Write {
            tag,
            user,
            replica,
            done: t0.elapsed(),
            outcome,
        });
        if failed {
            avoid_until[replica] = Instant::now() + AVOID;
            // Time is the client behaviour modelled: a pause before the
            // retry, as a client does, rather than thousands of failing
            // calls a second while a fault lasts.
            tokio::time::sleep(PAUSE_ON_ERROR).await;
        }
    }
    out
}

/// Where a subscriber starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// `start_revision` N: it must see every change after N - 1.
    At(u64),
    /// `start_revision` 0: from its first progress message's revision on.
    Now,
}

#[derive(Debug, Default)]
pub struct Subscription {
    pub name: String,
    /// It must see every change after this revision (known once its first
    /// stream said where it starts).
    pub after: Option<u64>,
    /// (revision, user, tag) in the order received.
    pub delivered: Vec<(u64, String, Option<String>)>,
    /// Streams opened after the first.
    pub resumes: u32,
    /// Streams given up as stuck (no message for [`STALL`]).
    pub stalls: u32,
    /// How its streams ended, by status code.
    pub ends: BTreeMap<String, u32>,
}

/// Watches all users until `stop`, resuming after any error or stall from
/// its last event's revision + 1, on the other replica each time (README's
/// resume: "on any replica: no gap, no duplicate"). `position` is shared
/// with the test, which waits for it to reach the log's head.
pub async fn subscriber(
    name: String,
    replicas: [Channel; 2],
    first_replica: usize,
    start: Start,
    position: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Subscription {
    let mut clients = replicas.map(UserMetadataServiceClient::new);
    let mut sub = Subscription {
        name,
        after: match start {
            Start::At(revision) => Some(revision - 1),
            Start::Now => None,
        },
        ..Default::default()
    };
    if let Some(after) = sub.after {
        position.store(after, Ordering::SeqCst);
    }
    // Whether the last stream ended with an error status.
    let mut failed = false;
    for attempt in 0usize.. {
        if stop.is_cancelled() {
            break;
        }
        if failed {
            // Time is the client behaviour modelled: a pause before it
            // resumes after an error, rather than a stream refused a
            // thousand times a second while a fault lasts.
            tokio::time::sleep(RESUME_AFTER_ERROR).await;
        }
        failed = false;
        if attempt > 0 {
            sub.resumes += 1;
        }
        let replica = (first_replica + attempt) % 2;
        let start_revision = match sub.after {
            Some(_) => position.load(Ordering::SeqCst) + 1,
            None => 0,
        };
        let request = WatchUserMetadataRequest {
            start_revision,
            progress_notify: true,
            ..Default::default()
        };
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            opened = tokio::time::timeout(STALL, clients[replica].watch(request)) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                *sub.ends.entry(end_name(&status)).or_default() += 1;
                failed = true;
                continue;
            }
            Err(_) => {
                sub.stalls += 1;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return sub,
                message = tokio::time::timeout(STALL, stream.message()) => message,
            };
            match message {
                Ok(Ok(Some(message))) => match message.response {
                    Some(Response::Event(event)) => {
                        sub.delivered.push(delivery(&event));
                        position.store(event.revision, Ordering::SeqCst);
                    }
                    // Only a stream from "now" learns its start here; a
                    // resumed one already knows where it is.
                    Some(Response::Progress(progress)) if sub.after.is_none() => {
                        sub.after = Some(progress.revision);
                        position.store(progress.revision, Ordering::SeqCst);
                    }
                    Some(Response::Progress(_)) | None => {}
                },
                Ok(Ok(None)) => {
                    *sub.ends.entry("ended without a status".into()).or_default() += 1;
                    break;
                }
                Ok(Err(status)) => {
                    *sub.ends.entry(end_name(&status)).or_default() += 1;
                    failed = true;
                    break;
                }
                Err(_) => {
                    sub.stalls += 1;
                    break;
                }
            }
        }
    }
    sub
}

fn end_name(status: &Status) -> String {
    let side = if std::error::Error::source(status).is_some() {
        "client"
    } else {
        "server"
    };
    format!("{:?} ({side})", status.code())
}

fn delivery(event: &UserMetadataEvent) -> (u64, String, Option<String>) {
    let after = event.after.as_ref().map(|a| field(&a.public_metadata));
    (
        event.revision,
        event.user_id.clone(),
        after.as_ref().and_then(tag_of),
    )
}
