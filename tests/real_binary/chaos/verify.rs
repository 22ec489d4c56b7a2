//! The proofs of the chaos test: what the clients were told, what the
//! subscribers received and what the JetStream stream holds, each checked
//! against the event log read straight from Postgres (not through the
//! service, whose answers are what is under test). Every violation is
//! collected, so that one failing run shows all that went wrong.

use std::collections::{BTreeMap, HashMap};

use metadata_service::proto::v1::UserMetadataEvent;
use prost::Message;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use serde_json::Value as Json;

use super::load::{Outcome, Subscription, Write, tag_of};
use crate::common::nats::Stored;

/// One row of the `events` table.
#[derive(Clone, Debug, PartialEq)]
pub struct Logged {
    pub revision: u64,
    pub void: bool,
    pub user: String,
    /// `after` as stored: the record after the change.
    pub after: Json,
    pub tag: Option<String>,
}

/// The whole log, in revision order.
pub async fn read_log(url: &str) -> Vec<Logged> {
    let db = Database::connect(url)
        .await
        .expect("connect to the cluster");
    let rows = db
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT revision, change_type, id, after FROM events ORDER BY revision",
        ))
        .await
        .expect("read the event table");
    db.close().await.ok();
    rows.iter()
        .map(|row| {
            let after: Json = row.try_get("", "after").unwrap();
            let change: String = row.try_get("", "change_type").unwrap();
            Logged {
                revision: row.try_get::<i64>("", "revision").unwrap() as u64,
                void: change == "void",
                user: row.try_get("", "id").unwrap(),
                tag: after.get("public_metadata").and_then(tag_of),
                after,
            }
        })
        .collect()
}

/// The newest revision of the log (0 when empty).
pub async fn head(url: &str) -> u64 {
    let db = Database::connect(url)
        .await
        .expect("connect to the cluster");
    let row = db
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT COALESCE(MAX(revision), 0) AS head FROM events",
        ))
        .await
        .expect("read the head")
        .expect("one row");
    db.close().await.ok();
    row.try_get::<i64>("", "head").unwrap() as u64
}

/// What the proofs found, for the table and the verdict.
#[derive(Default)]
pub struct Findings {
    pub violations: Vec<String>,
}

impl Findings {
    fn violation(&mut self, text: String) {
        self.violations.push(text);
    }
}

/// Writes by outcome, and for the unknown ones whether they were applied.
#[derive(Default, Debug)]
pub struct Tally {
    pub acked: usize,
    pub unavailable: usize,
    pub deadline: (usize, usize),
    pub transport: (usize, usize),
    pub other: (usize, usize),
    /// (code and message) -> count, for the failures.
    pub messages: BTreeMap<String, usize>,
}

/// Every acknowledged write is in the log exactly once, at its revision,
/// on its user, with its version; no write answered UNAVAILABLE is; every
/// change of the log was a write of this test. Returns the tally.
pub fn check_writes(log: &[Logged], writes: &[Write], found: &mut Findings) -> Tally {
    let mut by_tag: HashMap<&str, Vec<&Logged>> = HashMap::new();
    for entry in log.iter().filter(|e| !e.void) {
        match &entry.tag {
            Some(tag) => by_tag.entry(tag).or_default().push(entry),
            None => found.violation(format!(
                "revision {} carries no tag: {}",
                entry.revision, entry.after
            )),
        }
    }
    for (tag, entries) in &by_tag {
        if entries.len() > 1 {
            let revisions: Vec<u64> = entries.iter().map(|e| e.revision).collect();
            found.violation(format!(
                "write {tag} is in the log {} times, at {revisions:?}",
                entries.len()
            ));
        }
    }
    let sent: HashMap<&str, &Write> = writes.iter().map(|w| (w.tag.as_str(), w)).collect();
    for tag in by_tag.keys() {
        if !sent.contains_key(tag) {
            found.violation(format!("the log holds {tag}, which no writer sent"));
        }
    }
    let mut tally = Tally::default();
    for write in writes {
        let applied = by_tag.get(write.tag.as_str());
        let note = |tally: &mut Tally, text: &str| {
            // Messages vary by id and time only after a colon or a number;
            // the first 70 characters group them well enough.
            let key: String = text.chars().take(70).collect();
            *tally.messages.entry(key).or_default() += 1;
        };
        match &write.outcome {
            Outcome::Acked { revision, version } => {
                tally.acked += 1;
                match applied.map(Vec::as_slice) {
                    Some([entry]) => {
                        let logged_version = entry.after.get("version").and_then(Json::as_u64);
                        if entry.revision != *revision
                            || entry.user != write.user
                            || logged_version != Some(*version)
                        {
                            found.violation(format!(
                                "write {} acknowledged as {}@{revision} version {version} \
                                 is in the log as {}@{} version {logged_version:?}",
                                write.tag, write.user, entry.user, entry.revision
                            ));
                        }
                    }
                    Some(_) => {} // reported above as a duplicate
                    None => found.violation(format!(
                        "write {} was acknowledged at revision {revision} (via replica {}, \
                         at {:?}) and is not in the log",
                        write.tag, write.replica, write.done
                    )),
                }
            }
            Outcome::Unavailable(text) => {
                tally.unavailable += 1;
                note(&mut tally, text);
                if let Some(entries) = applied {
                    found.violation(format!(
                        "write {} was answered UNAVAILABLE by replica {} at {:?} ({text}) \
                         and is in the log at revision {}",
                        write.tag, write.replica, write.done, entries[0].revision
                    ));
                }
            }
            Outcome::Deadline(text) => {
                note(&mut tally, text);
                count(&mut tally.deadline, applied.is_some());
            }
            Outcome::Transport(text) => {
                note(&mut tally, text);
                count(&mut tally.transport, applied.is_some());
            }
            Outcome::Other(text) => {
                note(&mut tally, text);
                count(&mut tally.other, applied.is_some());
            }
        }
    }
    tally
}

fn count(pair: &mut (usize, usize), applied: bool) {
    if applied {
        pair.0 += 1;
    } else {
        pair.1 += 1;
    }
}

/// The log is dense: every revision from the first to the head is a change
/// or a void (README: "The event log is therefore dense").
pub fn check_dense(log: &[Logged], found: &mut Findings) {
    let mut expected = 1;
    for entry in log {
        if entry.revision != expected {
            found.violation(format!(
                "the log has no row for revisions {expected}..{} (next is {})",
                entry.revision, entry.revision
            ));
        }
        expected = entry.revision + 1;
    }
}

/// A subscriber saw exactly the log's changes after its start, once each,
/// in order, each with its own user and content.
pub fn check_subscription(log: &[Logged], sub: &Subscription, found: &mut Findings) {
    let Some(after) = sub.after else {
        found.violation(format!("{} never learnt where it starts", sub.name));
        return;
    };
    let expected: Vec<&Logged> = log
        .iter()
        .filter(|e| !e.void && e.revision > after)
        .collect();
    let got: Vec<u64> = sub.delivered.iter().map(|d| d.0).collect();
    let want: Vec<u64> = expected.iter().map(|e| e.revision).collect();
    if got != want {
        let mut seen = HashMap::new();
        let repeated: Vec<u64> = got
            .iter()
            .filter(|r| {
                let n = seen.entry(**r).or_insert(0);
                *n += 1;
                *n == 2
            })
            .copied()
            .collect();
        let missing: Vec<u64> = want
            .iter()
            .filter(|r| !seen.contains_key(*r))
            .copied()
            .collect();
        let backwards: Vec<(u64, u64)> = got
            .windows(2)
            .filter(|w| w[1] <= w[0])
            .map(|w| (w[0], w[1]))
            .collect();
        found.violation(format!(
            "{} (after {after}) received {} events, the log has {}: missing {:?}, \
             repeated {:?}, out of order {:?}",
            sub.name,
            got.len(),
            want.len(),
            first(&missing),
            first(&repeated),
            first(&backwards)
        ));
        return;
    }
    for ((revision, user, tag), entry) in sub.delivered.iter().zip(&expected) {
        if *user != entry.user || *tag != entry.tag {
            found.violation(format!(
                "{} received revision {revision} as {user} {tag:?}; the log has {} {:?}",
                sub.name, entry.user, entry.tag
            ));
        }
    }
}

fn first<T: Clone>(items: &[T]) -> Vec<T> {
    items.iter().take(10).cloned().collect()
}

/// The stream holds each change of the log exactly once, in order, with
/// Watch's body (checked by its revision, user and tag).
pub fn check_stream(log: &[Logged], messages: &[Stored], prefix: &str, found: &mut Findings) {
    let events: Vec<&Stored> = messages.iter().filter(|m| !m.is_marker()).collect();
    let changes: Vec<&Logged> = log.iter().filter(|e| !e.void).collect();
    let got: Vec<u64> = events.iter().map(|m| m.revision()).collect();
    let want: Vec<u64> = changes.iter().map(|e| e.revision).collect();
    if got != want {
        let mut held: HashMap<u64, usize> = HashMap::new();
        for revision in &got {
            *held.entry(*revision).or_default() += 1;
        }
        let missing: Vec<u64> = want
            .iter()
            .filter(|r| !held.contains_key(*r))
            .copied()
            .collect();
        let repeated: Vec<u64> = held
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(r, _)| *r)
            .collect();
        found.violation(format!(
            "the stream holds {} events, the log {}: missing {:?}, repeated {:?}",
            got.len(),
            want.len(),
            first(&missing),
            first(&repeated)
        ));
        return;
    }
    for (message, entry) in events.iter().zip(&changes) {
        let event = match UserMetadataEvent::decode(message.payload.as_ref()) {
            Ok(event) => event,
            Err(err) => {
                found.violation(format!(
                    "stream message of revision {} is no UserMetadataEvent: {err}",
                    entry.revision
                ));
                continue;
            }
        };
        let tag = event
            .after
            .as_ref()
            .and_then(|a| tag_of(&crate::common::json::field(&a.public_metadata)));
        let subject = format!("{prefix}.user.{}", entry.user);
        if event.revision != entry.revision
            || event.user_id != entry.user
            || tag != entry.tag
            || message.subject != subject
        {
            found.violation(format!(
                "stream message {} on {}: revision {} {} {tag:?}; the log has {} {:?}",
                message.revision(),
                message.subject,
                event.revision,
                event.user_id,
                entry.user,
                entry.tag
            ));
        }
    }
}

/// A record as Get returned it equals its last event's `after`.
pub fn check_record(
    log: &[Logged],
    user: &str,
    public: &Json,
    version: u64,
    revision: u64,
    found: &mut Findings,
) {
    let Some(last) = log.iter().rev().find(|e| !e.void && e.user == user) else {
        found.violation(format!("{user} has no event in the log"));
        return;
    };
    let want = (
        last.after.get("public_metadata"),
        last.after.get("version").and_then(Json::as_u64),
        last.after.get("revision").and_then(Json::as_u64),
    );
    if want != (Some(public), Some(version), Some(revision)) {
        found.violation(format!(
            "Get {user} = version {version} revision {revision} {public}; its last event \
             (revision {}) has {}",
            last.revision, last.after
        ));
    }
}
