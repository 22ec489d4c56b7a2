//! History (issue 29): reads as of a revision against a reference built
//! from the writes, one record's history paged under writes, retention's
//! limits, who made each change, Restore, who may call what, and reads
//! whose revision is exact (a plain read equals the read at the revision
//! it returned, on any replica, with the dispatcher held back or not).

use std::collections::BTreeMap;
use std::time::Duration;

use metadata_service::events::BrokerPauses;
use metadata_service::proto::v1::ChangeType;
use metadata_service::reason::Reason;
use metadata_service::store::{Store, StoreOptions};
use serde_json::json;
use tonic::Code;

use crate::auth::{BACKEND_KEY, ORG, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::error_details::expect;
use crate::harness::{start, start_with};
use crate::kinds::{
    Delete, Get, History, Kind, KindClient, Merge, Record, Replace, Restore, Watch,
};
use crate::list::{BatchGet, Reads};

/// What a reader compares: everything but the revision, which names the
/// last change for a plain read and the revision asked for at one.
fn state(record: &Record) -> (serde_json::Value, u64, Option<i64>, Option<i64>) {
    let (public, private, unsafe_) = record.fields();
    (
        json!([public, private, unsafe_]),
        record.version,
        record.created_at.as_ref().map(|t| t.seconds),
        record.updated_at.as_ref().map(|t| t.seconds),
    )
}

/// The state of a record never written, or deleted.
fn empty(kind: Kind, id: &str) -> Record {
    Record {
        kind,
        id: id.into(),
        public: Some(crate::common::json::value(&json!({}))),
        private: Some(crate::common::json::value(&json!({}))),
        unsafe_: kind.users_only(crate::common::json::value(&json!({}))),
        version: 0,
        created_at: None,
        updated_at: None,
        revision: 0,
    }
}

/// Each write's record, in revision order: the reference a read as of any
/// revision is checked against.
#[derive(Default)]
struct Timeline(Vec<Record>);

impl Timeline {
    fn push(&mut self, record: Record) -> u64 {
        assert!(
            self.0
                .last()
                .is_none_or(|last| last.revision < record.revision)
        );
        let revision = record.revision;
        self.0.push(record);
        revision
    }

    /// `id` right after `revision`.
    fn at(&self, kind: Kind, id: &str, revision: u64) -> Record {
        self.0
            .iter()
            .rev()
            .find(|r| r.id == id && r.revision <= revision)
            .cloned()
            .unwrap_or_else(|| empty(kind, id))
    }
}

/// After a delete a Get answers the tombstone: its revision is the delete's.
async fn deleted(c: &mut KindClient, id: &str) -> Record {
    assert!(c.delete(Delete::new(id)).await.unwrap());
    c.get(Get::new(id)).await.unwrap()
}

async fn reads_at_every_revision_match_the_writes(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let mut timeline = Timeline::default();
    let write = |m: Merge| m;
    let steps: Vec<Merge> = vec![
        write(
            Merge::new("a")
                .public(json!({"x": 1, "y": {"z": 1}}))
                .private(json!({"p": 1})),
        ),
        write(Merge::new("b").public(json!({"b": true}))),
        write(Merge::new("a").public(json!({"y": {"z": null}}))),
    ];
    for step in steps {
        timeline.push(c.merge(step).await.unwrap());
    }
    timeline.push(
        c.replace(Replace::new("a").public(json!({"only": true})))
            .await
            .unwrap(),
    );
    timeline.push(deleted(&mut c, "a").await);
    timeline.push(
        c.replace(Replace::new("b").private(Some(json!(null))))
            .await
            .unwrap(),
    );
    let last = timeline.push(
        c.merge(Merge::new("a").private(json!({"again": 2})))
            .await
            .unwrap(),
    );

    let ids = ["a", "b", "never"];
    for revision in 0..=last {
        for id in ids {
            let expected = timeline.at(kind, id, revision);
            let got = c.get(Get::at(id, revision)).await.unwrap();
            assert_eq!(state(&got), state(&expected), "{id} at {revision}");
            assert_eq!(got.revision, revision, "Get answers the revision asked");
        }
        let (records, at) = c.batch_get(BatchGet::at(ids, revision)).await.unwrap();
        assert_eq!(at, revision);
        for (id, got) in ids.iter().zip(&records) {
            let expected = timeline.at(kind, id, revision);
            assert_eq!(state(got), state(&expected), "batch {id} at {revision}");
            // The record's own revision: its last change up to then.
            let own = if expected.version == 0 && expected.revision == 0 {
                0
            } else {
                expected.revision
            };
            assert_eq!(got.revision, own, "batch {id} at {revision}");
        }
    }
    // A plain read is the read at the revision it returns.
    let (now, at) = c.batch_get(BatchGet::new(ids)).await.unwrap();
    assert_eq!(at, last);
    for (id, got) in ids.iter().zip(&now) {
        assert_eq!(state(got), state(&timeline.at(kind, id, last)));
    }
}

async fn history_pages_every_event_once_in_order_under_writes(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let mut written = Vec::new();
    for i in 0..25 {
        let record = c
            .merge(Merge::new("h").public(json!({ "n": i })))
            .await
            .unwrap();
        written.push(record.revision);
        c.merge(Merge::new("other").public(json!({ "n": i })))
            .await
            .unwrap();
    }
    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let mut more = Vec::new();
            for i in 25..45 {
                let record = c
                    .merge(Merge::new("h").public(json!({ "n": i })))
                    .await
                    .unwrap();
                more.push(record.revision);
            }
            more
        })
    };
    // Newest first, while the writer adds events on top.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .history(History {
                id: "h".into(),
                page_size: 4,
                page_token,
                oldest_first: false,
            })
            .await
            .unwrap();
        assert!(page.events.len() <= 4);
        assert_eq!(page.oldest_revision, 1, "nothing was pruned");
        seen.extend(page.events.iter().map(|e| e.revision));
        assert!(page.events.iter().all(|e| e.id == "h"));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, once");
    for revision in &written {
        assert!(seen.contains(revision), "{revision} was listed");
    }
    written.extend(writer.await.unwrap());

    // Oldest first, in one page (the default size is 50), as a chain.
    let page = c
        .history(History {
            id: "h".into(),
            oldest_first: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.next_page_token.is_empty());
    let revisions: Vec<u64> = page.events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, written);
    let mut before = empty(kind, "h");
    for event in &page.events {
        assert_eq!(state(&event.before), state(&before), "{}", event.revision);
        assert_eq!(event.after.revision, event.revision);
        before = event.after.clone();
    }
    assert_eq!(page.events[0].change_type, ChangeType::Merged);

    // A token continues only its own history.
    let first = c
        .history(History {
            id: "h".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = c
        .history(History {
            id: "other".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let said = expect(&err, Reason::InvalidPageToken);
    assert_eq!(said.metadata["field"], "page_token");
}

/// Reads before what retention kept, and past what was written.
async fn retention_bounds_reads_history_and_restore(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    for i in 1..=3 {
        c.merge(Merge::new("r").public(json!({ "n": i })))
            .await
            .unwrap();
    }
    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    let pruned = store
        .prune_events(chrono::Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let fourth = c
        .merge(Merge::new("r").public(json!({ "n": 4 })))
        .await
        .unwrap();
    assert_eq!(fourth.revision, 4);

    let err = c.get(Get::at("r", 2)).await.unwrap_err();
    let said = expect(&err, Reason::RevisionCompacted);
    assert_eq!(said.metadata["oldest_revision"], "3");
    assert!(
        err.message()
            .contains("oldest revision still readable is 3")
    );
    let third = c.get(Get::at("r", 3)).await.unwrap();
    assert_eq!(third.version, 3, "the state right after 3 is readable");
    let err = c.get(Get::at("r", 5)).await.unwrap_err();
    let said = expect(&err, Reason::RevisionNotReached);
    assert_eq!(said.metadata["current_revision"], "4");
    assert_eq!(err.code(), Code::OutOfRange);

    let page = c.history(History::of("r")).await.unwrap();
    assert_eq!(page.oldest_revision, 4);
    assert_eq!(
        page.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [4]
    );
    let err = c
        .restore(Restore {
            id: "r".into(),
            revision: 1,
            expected_version: None,
        })
        .await
        .unwrap_err();
    expect(&err, Reason::RevisionCompacted);
}

async fn restore_round_trips(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    // So that a revision before "x" existed is not 0.
    c.merge(Merge::new("other").public(json!({"o": 1})))
        .await
        .unwrap();
    let v1 = c
        .merge(
            Merge::new("x")
                .public(json!({"a": 1}))
                .private(json!({"s": 1})),
        )
        .await
        .unwrap();
    c.replace(Replace::new("x").public(json!({"b": 2})))
        .await
        .unwrap();
    let v3 = c
        .merge(Merge::new("x").private(json!({"s": null, "t": 3})))
        .await
        .unwrap();

    let err = c
        .restore(Restore {
            id: "x".into(),
            revision: v1.revision,
            expected_version: Some(2),
        })
        .await
        .unwrap_err();
    let said = expect(&err, Reason::VersionMismatch);
    assert_eq!(said.metadata["current_version"], "3");

    let restored = c
        .restore(Restore {
            id: "x".into(),
            revision: v1.revision,
            expected_version: Some(3),
        })
        .await
        .unwrap();
    assert_eq!(restored.fields(), v1.fields());
    assert_eq!(restored.version, 4);
    let again = c
        .restore(Restore {
            id: "x".into(),
            revision: v1.revision,
            expected_version: None,
        })
        .await
        .unwrap();
    assert_eq!(again.version, 4, "restoring what is there changes nothing");

    let page = c
        .history(History {
            id: "x".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let event = &page.events[0];
    assert_eq!(event.change_type, ChangeType::Replaced);
    assert_eq!(event.revision, restored.revision);
    assert_eq!(state(&event.before), state(&v3));
    assert_eq!(event.after.fields(), v1.fields());

    // An unset revision reads as 0: refused, rather than a delete.
    let err = c
        .restore(Restore {
            id: "x".into(),
            revision: 0,
            expected_version: None,
        })
        .await
        .unwrap_err();
    let said = expect(&err, Reason::Unspecified);
    assert_eq!(said.metadata["field"], "revision");
    assert_eq!(c.get(Get::new("x")).await.unwrap().version, 4);

    // Before the record existed: restoring deletes it.
    let gone = c
        .restore(Restore {
            id: "x".into(),
            revision: v1.revision - 1,
            expected_version: None,
        })
        .await
        .unwrap();
    assert_eq!(state(&gone), state(&empty(kind, "x")));
    let page = c
        .history(History {
            id: "x".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.events[0].change_type, ChangeType::Deleted);
    assert_eq!(gone.revision, page.events[0].revision);
}

/// Restore checks the schemas as any write does.
async fn restore_meets_the_schemas(backend: Backend) {
    use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
    use metadata_service::proto::v1::{MetadataField, MetadataKind, SetSchemaRequest};
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    let v1 = c
        .merge(Merge::new("x").public(json!({"a": 1})))
        .await
        .unwrap();
    c.replace(Replace::new("x").public(json!({"b": 2})))
        .await
        .unwrap();
    let mut schemas = MetadataSchemaServiceClient::new(s.channel().await);
    schemas
        .set_schema(SetSchemaRequest {
            kind: MetadataKind::User as i32,
            field: MetadataField::Public as i32,
            schema: Some(crate::common::json::structure(
                &json!({"type": "object", "required": ["b"]}),
            )),
            validate_only: false,
            expected_version: None,
        })
        .await
        .unwrap();
    let err = c
        .restore(Restore {
            id: "x".into(),
            revision: v1.revision,
            expected_version: None,
        })
        .await
        .unwrap_err();
    let said = expect(&err, Reason::SchemaViolation);
    let fields = said
        .details
        .bad_request()
        .expect("a BadRequest")
        .field_violations
        .clone();
    assert_eq!(fields[0].field, "public_metadata");
    assert_eq!(
        c.get(Get::new("x")).await.unwrap().version,
        2,
        "nothing written"
    );
}

/// Who made each change, in Watch and in history: an API key by name, a
/// frontend token by its sub, nobody on an open server; and the caller's
/// trace id.
async fn events_name_their_actor_and_trace(backend: Backend) {
    let Some(s) = start_with(backend, |c| c.auth = authenticator(crate::auth::SECRET)).await else {
        return;
    };
    let mut users = Kind::User.client(&s);
    let mut orgs = Kind::Organization.client(&s);
    let key = Some(BACKEND_KEY);
    let mut stream = users.watch(with_token(Watch, key)).await.unwrap();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut traced = with_token(Merge::new(USER).public(json!({"p": 1})), key);
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-b7ad6b7169203331-01").parse().unwrap(),
    );
    users.merge(traced).await.unwrap();
    let token = session(USER, Some(ORG));
    users
        .merge(with_token(
            Merge::new(USER).unsafe_(json!({"u": 1})),
            Some(&token),
        ))
        .await
        .unwrap();
    let by_key = stream.event().await.unwrap().unwrap();
    assert_eq!(
        (by_key.actor.as_str(), by_key.trace_id.as_str()),
        ("key:ci-backend", trace)
    );
    let by_token = stream.event().await.unwrap().unwrap();
    assert_eq!(
        (by_token.actor.as_str(), by_token.trace_id.as_str()),
        ("frontend:user_1", "")
    );
    let page = users
        .history(with_token(
            History {
                id: USER.into(),
                oldest_first: true,
                ..Default::default()
            },
            key,
        ))
        .await
        .unwrap();
    let actors: Vec<&str> = page.events.iter().map(|e| e.actor.as_str()).collect();
    assert_eq!(actors, ["key:ci-backend", "frontend:user_1"]);
    orgs.merge(with_token(Merge::new(ORG).public(json!({"o": 1})), key))
        .await
        .unwrap();
    let page = orgs
        .history(with_token(History::of(ORG), key))
        .await
        .unwrap();
    assert_eq!(page.events[0].actor, "key:ci-backend");

    // No credentials configured: nobody is named.
    let Some(open) = start(backend).await else {
        return;
    };
    let mut users = Kind::User.client(&open);
    users
        .merge(Merge::new("u").public(json!({"a": 1})))
        .await
        .unwrap();
    let page = users.history(History::of("u")).await.unwrap();
    assert_eq!(page.events[0].actor, "");
}

/// A history page carries each event exactly as Watch delivered it, whether
/// read from the log or, the second time, from the server's cache of
/// events: every field of the event (actor, trace, timestamps, changed
/// fields, a deletion's empty after), oldest first and newest first.
async fn history_pages_match_watch_cold_and_cached(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let mut stream = c.watch(Watch).await.unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut traced = tonic::Request::new(Merge::new("r").public(json!({"a": {"b": [1, 2.5]}})));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    c.merge(traced).await.unwrap();
    c.merge(Merge::new("other").public(json!({"x": 1})))
        .await
        .unwrap();
    c.merge(Merge::new("r").private(json!({"p": "q\"\\"})))
        .await
        .unwrap();
    c.replace(Replace::new("r").public(json!({"z": null})))
        .await
        .unwrap();
    deleted(&mut c, "r").await;
    c.merge(Merge::new("r").public(json!({"again": true})))
        .await
        .unwrap();
    let mut watched = Vec::new();
    while watched.len() < 6 {
        watched.push(stream.event().await.unwrap().unwrap());
    }
    watched.retain(|e| e.id == "r");
    assert_eq!(watched.len(), 5);
    assert_eq!(watched[0].trace_id, trace);
    for round in ["from the log", "from the cache"] {
        let oldest_first = c
            .history(History {
                id: "r".into(),
                oldest_first: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(oldest_first.events, watched, "oldest first, {round}");
        let newest_first = c.history(History::of("r")).await.unwrap();
        let mut reversed = watched.clone();
        reversed.reverse();
        assert_eq!(newest_first.events, reversed, "newest first, {round}");
    }
    // Paged two at a time, the cached events join the ones read fresh.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .history(History {
                id: "r".into(),
                oldest_first: true,
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap();
        paged.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, watched);
}

/// A frontend token reads its own record as of a revision and its own
/// history, of the fields it may see; nothing else, and never Restore.
async fn frontend_tokens_read_only_their_own_history(backend: Backend) {
    let Some(s) = start_with(backend, |c| c.auth = authenticator(crate::auth::SECRET)).await else {
        return;
    };
    let key = Some(BACKEND_KEY);
    let token = session(USER, Some(ORG));
    let mut users = Kind::User.client(&s);
    let mut orgs = Kind::Organization.client(&s);
    let first = users
        .merge(with_token(
            Merge::new(USER)
                .public(json!({"a": 1}))
                .private(json!({"secret": 1})),
            key,
        ))
        .await
        .unwrap();
    users
        .merge(with_token(
            Merge::new(USER).private(json!({"secret": 2})),
            key,
        ))
        .await
        .unwrap();
    users
        .merge(with_token(
            Merge::new("user_2").public(json!({"x": 1})),
            key,
        ))
        .await
        .unwrap();
    orgs.merge(with_token(
        Merge::new(ORG)
            .public(json!({"o": 1}))
            .private(json!({"p": 1})),
        key,
    ))
    .await
    .unwrap();

    let then = users
        .get(with_token(Get::at(USER, first.revision), Some(&token)))
        .await
        .unwrap();
    assert_eq!(then.private, None, "private stays hidden at any revision");
    assert_eq!(then.version, 1);
    let page = users
        .history(with_token(History::of(USER), Some(&token)))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1, "a change of private only is left out");
    // Paged one by one, over private-only changes: every page holds an
    // event, and the last token leads to nothing (no page, and no token,
    // stands for a hidden change).
    for i in 0..3 {
        users
            .merge(with_token(Merge::new(USER).private(json!({ "s": i })), key))
            .await
            .unwrap();
        users
            .merge(with_token(Merge::new(USER).unsafe_(json!({ "u": i })), key))
            .await
            .unwrap();
    }
    let mut page_token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = users
            .history(with_token(
                History {
                    id: USER.into(),
                    page_size: 1,
                    page_token,
                    oldest_first: false,
                },
                Some(&token),
            ))
            .await
            .unwrap();
        assert_eq!(page.events.len(), 1, "no empty page: {seen:?}");
        seen.push(page.events[0].revision);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 4, "three unsafe changes and the first write");
    let event = &page.events[0];
    assert_eq!(event.changed_fields, ["public_metadata"]);
    assert_eq!(
        (event.before.private.as_ref(), event.after.private.as_ref()),
        (None, None)
    );

    for denied in [
        users
            .get(with_token(Get::at("user_2", first.revision), Some(&token)))
            .await
            .unwrap_err(),
        users
            .history(with_token(History::of("user_2"), Some(&token)))
            .await
            .unwrap_err(),
        orgs.history(with_token(History::of("org_2"), Some(&token)))
            .await
            .unwrap_err(),
    ] {
        expect(&denied, Reason::NotOwnRecord);
    }
    let own_org = orgs
        .history(with_token(History::of(ORG), Some(&token)))
        .await
        .unwrap();
    assert_eq!(own_org.events[0].changed_fields, ["public_metadata"]);
    assert_eq!(own_org.events[0].after.private, None);
    for kind in Kind::ALL {
        let err = kind
            .client(&s)
            .restore(with_token(
                Restore {
                    id: if kind == Kind::User { USER } else { ORG }.into(),
                    revision: first.revision,
                    expected_version: None,
                },
                Some(&token),
            ))
            .await
            .unwrap_err();
        expect(&err, Reason::BackendOnly);
    }
    let err = users
        .history(with_token(History::of(USER), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// The dispatcher is held right after publishing an older revision while a
/// write at a newer one is acknowledged: a BatchGet started then must not
/// answer the older revision with the newer record in it (the
/// contradiction issue 29 found), nor leave out the acknowledged write. It
/// waits for the log to settle up to that write.
async fn a_read_waits_for_the_dispatcher_held_behind_a_committed_write(backend: Backend) {
    let pauses = BrokerPauses::default();
    let published = pauses.published.clone();
    let Some(s) = start_with(backend, |c| c.events.broker.pauses = pauses).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    let ids = vec!["a".to_owned()];
    // Keeps the dispatcher reading, so that it publishes the next write.
    c.batch_get(BatchGet::new(&ids)).await.unwrap();
    published.arm(1);
    let first = c
        .merge(Merge::new("a").public(json!({"n": 1})))
        .await
        .unwrap();
    assert!(
        published.reached(Duration::from_secs(10)).await,
        "the dispatcher stops after publishing the first write"
    );
    let second = c
        .merge(Merge::new("a").public(json!({"n": 2})))
        .await
        .unwrap();
    assert!(second.revision > first.revision);
    let mut read = {
        let mut c = c.clone();
        let ids = ids.clone();
        tokio::spawn(async move { c.batch_get(BatchGet::new(&ids)).await })
    };
    // Before issue 29 the read answered at once with the held-back mark and
    // the newer record; now it waits for the dispatcher. A read that
    // answers while the dispatcher is held is checked all the same.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut read).await;
    published.release();
    let answered = match early {
        Ok(answered) => answered,
        Err(_) => read.await,
    };
    let (records, revision) = answered.unwrap().unwrap();
    assert!(
        revision >= second.revision,
        "{revision} < {}",
        second.revision
    );
    assert_eq!(records[0].revision, second.revision);
    assert_eq!(state(&records[0]), state(&second));
}

/// Concurrent writers; every plain BatchGet and List equals the BatchGet at
/// the revision it returned, and a Watch from the next revision replays
/// nothing the read showed.
async fn plain_reads_equal_reads_at_their_revision(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let ids: Vec<String> = (0..6).map(|i| format!("id{i}")).collect();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let mut c = Kind::User.client(&s);
            let ids = ids.clone();
            tokio::spawn(async move {
                for i in 0..40u64 {
                    let id = &ids[((i * 7 + w * 3) % 6) as usize];
                    match (i + w) % 5 {
                        4 => {
                            c.delete(Delete::new(id)).await.unwrap();
                        }
                        3 => {
                            c.replace(Replace::new(id).public(json!({ "w": w, "i": i })))
                                .await
                                .unwrap();
                        }
                        _ => {
                            c.merge(Merge::new(id).public(json!({ "i": i })))
                                .await
                                .unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    let mut c = Kind::User.client(&s);
    let mut users = s.users.clone();
    let mut compared = 0;
    while !writers.iter().all(|w| w.is_finished()) || compared < 5 {
        let (plain, revision) = c.batch_get(BatchGet::new(&ids)).await.unwrap();
        let (at, again) = c.batch_get(BatchGet::at(&ids, revision)).await.unwrap();
        assert_eq!(again, revision);
        assert_eq!(plain, at, "BatchGet at {revision}");

        let listed = users
            .list(metadata_service::proto::v1::ListUserMetadataRequest {
                filter: String::new(),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let (at, _) = c
            .batch_get(BatchGet::at(&ids, listed.revision))
            .await
            .unwrap();
        let existing: BTreeMap<String, Record> = at
            .into_iter()
            .filter(|r| r.version > 0)
            .map(|r| (r.id.clone(), r))
            .collect();
        let listed_records: BTreeMap<String, Record> = listed
            .users
            .into_iter()
            .map(|u| (u.user_id.clone(), Record::from(u)))
            .collect();
        assert_eq!(listed_records, existing, "List at {}", listed.revision);
        compared += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
}

/// Two replicas on one database: a read on one shows every write the other
/// acknowledged before it, exactly as of the revision it returns.
async fn a_replica_reads_what_another_acknowledged(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    if backend == Backend::Sqlite {
        return;
    }
    let other = s.another_server().await;
    let channel = crate::harness::connect(other.local_addr()).await;
    let mut elsewhere = KindClient::User(
        metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient::new(
            channel,
        ),
    );
    let mut c = Kind::User.client(&s);
    for i in 0..20 {
        let written = c
            .merge(Merge::new("a").public(json!({ "i": i })))
            .await
            .unwrap();
        let (records, revision) = elsewhere.batch_get(BatchGet::new(["a"])).await.unwrap();
        assert!(
            revision >= written.revision,
            "{revision} < {}",
            written.revision
        );
        assert_eq!(records[0].revision, written.revision);
    }
    other.shutdown().await.unwrap();
}

/// Events written before actors were recorded (a database from an older
/// version, its columns added by the migration) read as made by nobody,
/// and every read at a revision still works on them.
async fn events_from_before_actors_read_as_made_by_nobody(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let Some(mut s) = start_with(backend, |c| c.auth = authenticator(crate::auth::SECRET)).await
    else {
        return;
    };
    let key = Some(BACKEND_KEY);
    let mut users = Kind::User.client(&s);
    let written = users
        .merge(with_token(Merge::new("old").public(json!({"a": 1})), key))
        .await
        .unwrap();
    s.stop().await;
    // The database as the previous version left it.
    let db = s.db.connect().await;
    for statement in [
        "DROP INDEX events_record",
        "ALTER TABLE events DROP COLUMN actor",
        "ALTER TABLE events DROP COLUMN trace_id",
        "DELETE FROM seaql_migrations WHERE version = 'm20261207_000001_event_history'",
    ] {
        db.execute_unprepared(statement).await.unwrap();
    }
    db.close().await.unwrap();
    s.restart().await;
    let mut users = Kind::User.client(&s);
    let page = users
        .history(with_token(History::of("old"), key))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(
        (
            page.events[0].actor.as_str(),
            page.events[0].trace_id.as_str()
        ),
        ("", "")
    );
    let then = users
        .get(with_token(Get::at("old", written.revision), key))
        .await
        .unwrap();
    assert_eq!(state(&then), state(&written));
}

/// The plans of the two history queries: one record's events (ListHistory,
/// and a read as of a revision of given ids) are ranges of `events_record`;
/// the records moved past a fresh revision (a List's) come from the
/// primary key's range, never from every event of the kind.
async fn history_queries_use_their_index(backend: Backend) {
    use metadata_service::model::Kind as ModelKind;
    use sea_orm::{ConnectionTrait, Statement};
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    for i in 0..200 {
        c.merge(Merge::new(&format!("u{}", i % 20)).public(json!({ "i": i })))
            .await
            .unwrap();
    }
    let db = s.db.connect().await;
    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    let explain = match backend {
        // Few rows: make the planner show what it would do on many.
        Backend::Postgres => {
            db.execute_unprepared("ANALYZE events").await.unwrap();
            db.execute_unprepared("SET enable_seqscan = off")
                .await
                .unwrap();
            "EXPLAIN"
        }
        Backend::Sqlite => "EXPLAIN QUERY PLAN",
    };
    let plan = |statement: Statement| {
        let db = &db;
        async move {
            let explain = Statement::from_sql_and_values(
                statement.db_backend,
                format!("{explain} {}", statement.sql),
                statement.values.expect("bound values").0,
            );
            let rows = db.query_all_raw(explain).await.unwrap();
            rows.iter()
                .map(|row| match backend {
                    Backend::Postgres => row.try_get::<String>("", "QUERY PLAN").unwrap(),
                    Backend::Sqlite => row.try_get::<String>("", "detail").unwrap(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let of_ids = plan(store.states_at_statement(ModelKind::User, Some(&["u1", "u2"]), 150)).await;
    let moved = plan(store.states_at_statement(ModelKind::User, None, 190)).await;
    match backend {
        Backend::Sqlite => {
            assert!(
                of_ids.contains("events_record (kind=? AND id=? AND revision>?)"),
                "{of_ids}"
            );
            assert!(
                moved.contains("(rowid>?)") || moved.contains("(revision>?)"),
                "{moved}"
            );
        }
        Backend::Postgres => {
            // One index lookup per id, never a pass over the log.
            assert!(
                of_ids.contains("Index Scan using events_record"),
                "{of_ids}"
            );
            assert!(!of_ids.contains("Hash"), "{of_ids}");
            assert!(moved.contains("Index Cond: (revision > "), "{moved}");
        }
    }
    assert!(!moved.contains("events_record"), "{moved}");
    store.close().await.ok();
}

/// A List exactly as of a revision puts a record changed since back in
/// List's order, which on Postgres is the id column's collation: here a
/// language's (ICU `en-US`: `A < b < C`, where bytes say `A < C < b`), so
/// that a page neither skips nor repeats a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_list_at_a_revision_keeps_a_language_collation() {
    use metadata_service::model::Kind as ModelKind;
    use sea_orm::ConnectionTrait;
    let Some(crate::common::TestDb::Postgres(template)) =
        crate::common::TestDb::create(Backend::Postgres).await
    else {
        return;
    };
    let name = format!("{}_icu", template.name);
    let admin = sea_orm::Database::connect(&template.admin_url)
        .await
        .unwrap();
    admin
        .execute_unprepared(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu \
             ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        ))
        .await
        .unwrap();
    admin.close().await.unwrap();
    let db = crate::common::TestDb::Postgres(crate::common::PgDatabase {
        admin_url: template.admin_url.clone(),
        url: template.url.replace(&template.name, &name),
        name,
    });
    let s = crate::harness::TestServer::start(crate::common::config(db.url()), db).await;
    let mut c = Kind::User.client(&s);
    for id in ["A", "C", "b"] {
        c.merge(Merge::new(id).public(json!({"plan": "gold"})))
            .await
            .unwrap();
    }
    let before = c.get(Get::new("b")).await.unwrap().revision;
    c.merge(Merge::new("b").public(json!({"plan": "silver"})))
        .await
        .unwrap();

    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    let first = store
        .list_at(ModelKind::User, None, None, 2, before)
        .await
        .unwrap();
    let ids: Vec<&str> = first.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["A", "b"], "List's order is the collation's");
    assert_eq!(
        first.records[1].fields.public,
        json!({"plan": "gold"}),
        "b as it was"
    );
    let after = first.next_after.expect("a next page");
    let second = store
        .list_at(ModelKind::User, None, Some(&after), 2, before)
        .await
        .unwrap();
    let ids: Vec<&str> = second.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["C"]);
    assert_eq!(second.next_after, None);
    store.close().await.ok();
}

/// A read at a revision whose first later event was pruned while the read
/// ran (past the check at its start) is refused, not answered with the
/// state after a later event. Played on the store, whose checks are the
/// last line: events 1 and 2 pruned, the row of "x" at 3, a read at 0.
async fn a_read_past_what_was_pruned_meanwhile_is_refused(backend: Backend) {
    use metadata_service::model::Kind as ModelKind;
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    c.merge(Merge::new("x").public(json!({"v": 1})))
        .await
        .unwrap();
    c.merge(Merge::new("y").public(json!({"v": 1})))
        .await
        .unwrap();
    let cut = chrono::Utc::now();
    let third = c
        .merge(Merge::new("x").public(json!({"v": 2})))
        .await
        .unwrap();
    assert_eq!(third.revision, 3);
    let store = Store::connect(s.db.url(), &StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(store.prune_events(cut).await.unwrap(), 2);
    let err = store
        .get_at(ModelKind::User, "x", 0)
        .await
        .expect_err("the state at 0 is gone with event 1");
    assert!(
        matches!(
            err,
            metadata_service::store::StoreError::RevisionCompacted {
                requested: 0,
                oldest: 2
            }
        ),
        "{err:?}"
    );
    // At 2 it is readable: every event after 2 is there.
    let at_two = store.get_at(ModelKind::User, "x", 2).await.unwrap();
    assert_eq!(at_two.version, 1);
    store.close().await.ok();
}

/// History pages end before the encoded events pass the page byte budget
/// (as List's do), and the listing still returns every event once.
async fn history_pages_end_at_the_byte_budget(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    // About 43 KB per field as protobuf, twice per event (before, after).
    for i in 0..50 {
        c.replace(Replace::new("big").public(json!({ "a": vec![0; 3900], "i": i })))
            .await
            .unwrap();
    }
    let mut page_token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = c
            .history(History {
                id: "big".into(),
                page_token,
                ..Default::default()
            })
            .await
            .unwrap();
        pages.push(page.events.iter().map(|e| e.revision).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages.len() > 1, "50 events of ~86 KB do not fit one page");
    assert!(pages[0].len() < 50);
    let all: Vec<u64> = pages.concat();
    assert_eq!(
        all,
        (1..=50).rev().collect::<Vec<u64>>(),
        "each event once, in order"
    );
}

kind_tests!(
    reads_at_every_revision_match_the_writes,
    history_pages_every_event_once_in_order_under_writes,
    retention_bounds_reads_history_and_restore,
    restore_round_trips,
    history_pages_match_watch_cold_and_cached,
);

mod any_kind {
    use super::*;
    backend_tests!(
        restore_meets_the_schemas,
        events_name_their_actor_and_trace,
        frontend_tokens_read_only_their_own_history,
        a_read_waits_for_the_dispatcher_held_behind_a_committed_write,
        plain_reads_equal_reads_at_their_revision,
        a_replica_reads_what_another_acknowledged,
        events_from_before_actors_read_as_made_by_nobody,
        history_queries_use_their_index,
        a_read_past_what_was_pruned_meanwhile_is_refused,
        history_pages_end_at_the_byte_budget,
    );
}
