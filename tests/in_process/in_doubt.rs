//! Issue 27: a write whose connection is lost after it was sent. The
//! server cannot tell from the lost connection whether the write
//! committed, so it finds out before answering: success with the record
//! if it did, UNAVAILABLE (retry) if it certainly did not.
//!
//! A proxy between the server and Postgres cuts the connection at the
//! write's last message (the one statement of a Merge of an existing row;
//! the COMMIT of a first write, of a delete, of SetSchema): once after
//! the server has committed it and answered, and once before the server
//! hears it, leaving the server's side open as a partition does, with the
//! transaction and its locks alive until someone ends it. Afterwards the
//! record, the log and the schema must agree with the answer, and the
//! next write to the same row must go through.

use std::time::Duration;

use metadata_service::proto::v1::metadata_schema_service_client::MetadataSchemaServiceClient;
use metadata_service::proto::v1::{
    DeleteUserMetadataRequest, GetSchemaRequest, GetUserMetadataRequest, MetadataField,
    MetadataKind, SetSchemaRequest, UserMetadata,
};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use serde_json::{Value as Json, json};
use tonic::Code;

use crate::common::json::{field, structure};
use crate::common::wait::until;
use crate::common::{self, Backend, TestDb};
use crate::harness::{TestServer, merge, write};
use crate::pg_proxy::{Cut, PgProxy, Sent, through, upstream};

const ID: &str = "user_in_doubt";

/// The write whose connection is cut.
#[derive(Clone, Copy, Debug)]
enum Case {
    /// A Merge of a row that exists: one statement, its own transaction.
    MergeOfExistingRow,
    /// A Merge that creates the row: a transaction, then COMMIT.
    FirstWrite,
    Delete,
    SetSchema,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_of_an_existing_row_cut_after_it_committed_succeeds() {
    cut_write(Case::MergeOfExistingRow, Cut::AfterServerAnswers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_of_an_existing_row_cut_before_the_database_heard_it_is_unavailable() {
    cut_write(Case::MergeOfExistingRow, Cut::BeforeServerHears).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_write_cut_after_its_commit_succeeds() {
    cut_write(Case::FirstWrite, Cut::AfterServerAnswers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_write_cut_before_its_commit_was_heard_is_unavailable() {
    cut_write(Case::FirstWrite, Cut::BeforeServerHears).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_after_its_commit_succeeds() {
    cut_write(Case::Delete, Cut::AfterServerAnswers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_before_its_commit_was_heard_is_unavailable() {
    cut_write(Case::Delete, Cut::BeforeServerHears).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_schema_cut_after_its_commit_succeeds() {
    cut_write(Case::SetSchema, Cut::AfterServerAnswers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_schema_cut_before_its_commit_was_heard_is_unavailable() {
    cut_write(Case::SetSchema, Cut::BeforeServerHears).await;
}

/// The third answer: the write committed, its connection was lost before
/// the answer came, and the database stayed out of reach until the call's
/// deadline. The server cannot know, and says so: DEADLINE_EXCEEDED, "may
/// have been applied". Here it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_after_it_committed_while_the_database_stays_out_of_reach_may_have_been_applied()
 {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let proxy = PgProxy::start(upstream(db.url())).await;
    let mut config = common::config(&through(db.url(), proxy.addr()));
    config.db_timeout = Duration::from_secs(2);
    let mut s = TestServer::start(config, db).await;
    write(&mut s.users, ID, json!({"n": 0})).await;

    proxy.cut_then_unreachable(
        |sent| matches!(sent, Sent::Bind(sql) if sql.contains("WITH locked AS MATERIALIZED")),
        Cut::AfterServerAnswers,
    );
    let status = s
        .users
        .merge(merge(ID, json!({"n": 1})))
        .await
        .expect_err("no answer can be known");
    assert_eq!(proxy.cuts(), 1, "the cut did not fire");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("may have been applied"),
        "{status:?}"
    );
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("an ErrorInfo");
    assert_eq!(info.reason, "WRITE_IN_DOUBT");

    proxy.set_reachable(true);
    // The server's health follows the database back within its interval.
    let after = until(
        "the database comes back",
        Duration::from_secs(20),
        async || match s
            .users
            .get(GetUserMetadataRequest {
                user_id: ID.into(),
                revision: None,
            })
            .await
        {
            Ok(record) => Ok(record.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                Err(status)
            }
        },
    )
    .await;
    assert_eq!(
        field(&after.public_metadata),
        json!({"n": 1}),
        "it was applied"
    );
    s.stop().await;
}

/// What a call answered, reduced to what the checks compare.
#[derive(Debug)]
enum Answer {
    Record(UserMetadata),
    Deleted(bool),
    Schema(u64),
}

async fn cut_write(case: Case, how: Cut) {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let proxy = PgProxy::start(upstream(db.url())).await;
    let mut config = common::config(&through(db.url(), proxy.addr()));
    // Long enough for the server to settle what it cannot see, short
    // enough that a call left hanging fails the test quickly.
    config.db_timeout = Duration::from_secs(10);
    let mut s = TestServer::start(config, db).await;
    let log = s.db.connect().await;

    if matches!(case, Case::MergeOfExistingRow | Case::Delete) {
        write(&mut s.users, ID, json!({"n": 0})).await;
    }
    let before = get(&mut s).await;
    let events_before = events(&log).await;

    match case {
        // The statement that writes the row and appends the event.
        Case::MergeOfExistingRow => proxy.cut(
            |sent| matches!(sent, Sent::Bind(sql) if sql.contains("WITH locked AS MATERIALIZED")),
            how,
        ),
        Case::FirstWrite | Case::Delete | Case::SetSchema => proxy.cut(is_commit, how),
    }
    let answer = match case {
        Case::MergeOfExistingRow | Case::FirstWrite => s
            .users
            .merge(merge(ID, json!({"n": 1})))
            .await
            .map(|r| Answer::Record(r.into_inner())),
        Case::Delete => s
            .users
            .delete(DeleteUserMetadataRequest {
                user_id: ID.into(),
                expected_version: None,
            })
            .await
            .map(|r| Answer::Deleted(r.into_inner().existed)),
        Case::SetSchema => schemas(&s)
            .await
            .set_schema(schema_request())
            .await
            .map(|r| Answer::Schema(r.into_inner().version)),
    };
    assert_eq!(proxy.cuts(), 1, "{case:?}: the cut did not fire");

    let after = get(&mut s).await;
    let new_events: Vec<Event> = events(&log)
        .await
        .into_iter()
        .filter(|e| !events_before.contains(e))
        .collect();
    match (how, answer) {
        (Cut::AfterServerAnswers, Ok(Answer::Record(record))) => {
            assert_eq!(
                after, record,
                "{case:?}: the record is not what the write answered"
            );
            assert_eq!(
                new_events,
                vec![Event::of(&record)],
                "{case:?}: the log does not hold the write once"
            );
        }
        (Cut::AfterServerAnswers, Ok(Answer::Deleted(existed))) => {
            assert!(existed, "{case:?}: the delete says nothing was there");
            assert_eq!(after.version, 0, "{case:?}: the record is still there");
            assert_eq!(
                new_events.len(),
                1,
                "{case:?}: the log does not hold the delete once: {new_events:?}"
            );
            assert_eq!(new_events[0].change, "deleted");
        }
        (Cut::AfterServerAnswers, Ok(Answer::Schema(version))) => {
            assert_eq!(version, 1);
            assert_eq!(
                schema_version(&s).await,
                1,
                "{case:?}: the schema is not stored"
            );
        }
        (Cut::BeforeServerHears, Err(status)) => {
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "{case:?}: a write that certainly did not happen must say so: {status:?}"
            );
            let info = tonic_types::StatusExt::get_details_error_info(&status);
            assert!(
                info.is_some_and(|info| info.reason == "WRITE_NOT_APPLIED"),
                "{case:?}: {status:?}"
            );
            assert_eq!(after, before, "{case:?}: the record changed");
            assert!(
                new_events.iter().all(|e| e.change == "void"),
                "{case:?}: an event was logged for a write answered UNAVAILABLE: {new_events:?}"
            );
            if let Case::SetSchema = case {
                assert_eq!(
                    schema_version(&s).await,
                    0,
                    "{case:?}: the schema was stored"
                );
            }
        }
        (how, answer) => panic!(
            "{case:?} cut {how:?}: the answer does not say what happened to the write: {answer:?}"
        ),
    }

    // Whatever the lost connection held (the row's lock, the table's) is
    // free: the next write goes through, within the call's time.
    let next = s
        .users
        .merge(merge(ID, json!({"n": 2})))
        .await
        .expect("the next write after the cut");
    let next = next.into_inner();
    assert_eq!(field(&next.public_metadata)["n"], json!(2));
    assert_eq!(next.version, after.version + 1, "{case:?}: the next write");
    s.stop().await;
}

fn is_commit(sent: &Sent) -> bool {
    matches!(sent, Sent::Query(sql) | Sent::Bind(sql) if sql.trim().eq_ignore_ascii_case("COMMIT"))
}

async fn get(s: &mut TestServer) -> UserMetadata {
    s.users
        .get(GetUserMetadataRequest {
            user_id: ID.into(),
            revision: None,
        })
        .await
        .expect("get")
        .into_inner()
}

type Schemas = MetadataSchemaServiceClient<tonic::transport::Channel>;

async fn schemas(s: &TestServer) -> Schemas {
    MetadataSchemaServiceClient::new(s.channel().await)
}

fn schema_request() -> SetSchemaRequest {
    SetSchemaRequest {
        kind: MetadataKind::User as i32,
        field: MetadataField::Unsafe as i32,
        schema: Some(structure(&json!({"type": "object"}))),
        validate_only: false,
        expected_version: None,
    }
}

async fn schema_version(s: &TestServer) -> u64 {
    schemas(s)
        .await
        .get_schema(GetSchemaRequest {
            kind: MetadataKind::User as i32,
            field: MetadataField::Unsafe as i32,
        })
        .await
        .expect("get schema")
        .into_inner()
        .version
}

/// An event of the log, as far as these tests compare them.
#[derive(Clone, Debug, PartialEq)]
struct Event {
    revision: i64,
    change: String,
    version: Option<i64>,
    public: Json,
}

impl Event {
    /// The event a write answered with `record` must have logged.
    fn of(record: &UserMetadata) -> Event {
        Event {
            revision: record.revision as i64,
            change: "merged".into(),
            version: Some(record.version as i64),
            public: field(&record.public_metadata),
        }
    }
}

/// This test's id's events and every void, in revision order.
async fn events(log: &sea_orm::DatabaseConnection) -> Vec<Event> {
    let rows = log
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT revision, change_type, after FROM events \
             WHERE id = $1 OR change_type = 'void' ORDER BY revision",
            [ID.into()],
        ))
        .await
        .expect("read the log");
    rows.into_iter()
        .map(|row| {
            let after: Json = row.try_get("", "after").expect("after");
            Event {
                revision: row.try_get("", "revision").expect("revision"),
                change: row.try_get("", "change_type").expect("change_type"),
                version: after.get("version").and_then(Json::as_i64),
                public: after.get("public_metadata").cloned().unwrap_or(Json::Null),
            }
        })
        .collect()
}
