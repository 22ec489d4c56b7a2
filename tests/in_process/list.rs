//! List on a running server, for users and organizations on SQLite and
//! Postgres: what a filter selects against a reference evaluation in plain
//! Rust (a property test), paging (page sizes, tokens, stability under
//! concurrent writes and deletes), refused filters, who may List, and the
//! revision a page reflects (List, then Watch, misses nothing).
//!
//! Also the kind-neutral List, BatchGet and Watch-from-a-revision calls
//! ([`Reads`]) that `batch_get.rs` shares. As in `kinds.rs`, every message is
//! built and read field by field.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering as Atomic};
use std::time::Duration;

use metadata_service::model::{Field, Fields};
use metadata_service::proto::v1::watch_organization_metadata_response::Response as OrgResponse;
use metadata_service::proto::v1::watch_user_metadata_response::Response as UserResponse;
use metadata_service::proto::v1::{
    BatchGetOrganizationMetadataRequest, BatchGetOrganizationMetadataResponse,
    BatchGetUserMetadataRequest, BatchGetUserMetadataResponse, ListOrganizationMetadataRequest,
    ListOrganizationMetadataResponse, ListUserMetadataRequest, ListUserMetadataResponse,
    OrganizationMetadataEvent, UserMetadataEvent, WatchOrganizationMetadataRequest,
    WatchOrganizationMetadataResponse, WatchUserMetadataRequest, WatchUserMetadataResponse,
};
use metadata_service::query::filter::parse;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use serde_json::{Value as Json, json};
use tonic::{Code, IntoRequest, Status, Streaming};

use crate::auth::{BACKEND_KEY, ORG, SECRET, USER, authenticator, session, with_token};
use crate::common::Backend;
use crate::harness::{TestServer, start, start_with};
use crate::kinds::{Delete, Get, Kind, KindClient, Merge, Record, Replace};

// ---------------------------------------------------------------------------
// Kind-neutral List, BatchGet and Watch.

/// List of either kind.
#[derive(Clone, Debug)]
pub struct List {
    pub filter: String,
    pub page_size: i32,
    pub page_token: String,
}

impl List {
    /// The first page of `filter`, of the default size.
    pub fn new(filter: &str) -> List {
        List {
            filter: filter.into(),
            page_size: 0,
            page_token: String::new(),
        }
    }

    pub fn page_size(mut self, page_size: i32) -> List {
        self.page_size = page_size;
        self
    }

    pub fn page_token(mut self, page_token: &str) -> List {
        self.page_token = page_token.into();
        self
    }
}

/// A List response of either kind.
#[derive(Clone, Debug)]
pub struct Page {
    pub records: Vec<Record>,
    pub next_page_token: String,
    pub revision: u64,
}

impl Page {
    pub fn ids(&self) -> Vec<&str> {
        self.records.iter().map(|r| r.id.as_str()).collect()
    }
}

/// BatchGet of either kind.
#[derive(Clone, Debug)]
pub struct BatchGet {
    pub ids: Vec<String>,
    /// Read as of this revision, rather than now.
    pub revision: Option<u64>,
}

impl BatchGet {
    pub fn new<S: AsRef<str>>(ids: impl IntoIterator<Item = S>) -> BatchGet {
        BatchGet {
            ids: ids.into_iter().map(|id| id.as_ref().to_owned()).collect(),
            revision: None,
        }
    }

    pub fn at<S: AsRef<str>>(ids: impl IntoIterator<Item = S>, revision: u64) -> BatchGet {
        BatchGet {
            revision: Some(revision),
            ..BatchGet::new(ids)
        }
    }
}

/// Watch of either kind, of every id, from `start_revision`.
#[derive(Clone, Debug)]
pub struct WatchFrom {
    pub start_revision: u64,
    pub filter: String,
}

/// A change a Watch delivered.
#[derive(Clone, Debug)]
pub struct Change {
    pub revision: u64,
    pub id: String,
    pub before: Record,
    pub after: Record,
}

/// A Watch stream of either kind, read for its events.
pub enum Changes {
    User(Streaming<WatchUserMetadataResponse>),
    Organization(Streaming<WatchOrganizationMetadataResponse>),
}

impl Changes {
    /// The next event, skipping progress; fails the test if none comes
    /// within 10 s or the stream ends.
    pub async fn next(&mut self) -> Change {
        loop {
            let message = match self {
                Changes::User(s) => tokio::time::timeout(Duration::from_secs(10), s.message())
                    .await
                    .map(|m| m.map(|m| m.map(|m| m.response.map(UserOrOrg::User)))),
                Changes::Organization(s) => {
                    tokio::time::timeout(Duration::from_secs(10), s.message())
                        .await
                        .map(|m| m.map(|m| m.map(|m| m.response.map(UserOrOrg::Organization))))
                }
            };
            let response = message
                .expect("an event within 10 s")
                .expect("stream healthy")
                .expect("stream open")
                .expect("response set");
            match response {
                UserOrOrg::User(UserResponse::Event(event)) => {
                    let UserMetadataEvent {
                        revision,
                        user_id,
                        before,
                        after,
                        ..
                    } = event;
                    return Change {
                        revision,
                        id: user_id,
                        before: Record::from(before.expect("before is set")),
                        after: Record::from(after.expect("after is set")),
                    };
                }
                UserOrOrg::Organization(OrgResponse::Event(event)) => {
                    let OrganizationMetadataEvent {
                        revision,
                        organization_id,
                        before,
                        after,
                        ..
                    } = event;
                    return Change {
                        revision,
                        id: organization_id,
                        before: Record::from(before.expect("before is set")),
                        after: Record::from(after.expect("after is set")),
                    };
                }
                UserOrOrg::User(UserResponse::Progress(_))
                | UserOrOrg::Organization(OrgResponse::Progress(_)) => {}
            }
        }
    }
}

enum UserOrOrg {
    User(UserResponse),
    Organization(OrgResponse),
}

/// List, BatchGet and Watch from a revision, on the client of either kind.
/// A request may carry metadata: pass a [`tonic::Request`].
pub(crate) trait Reads {
    async fn list(&mut self, request: impl IntoRequest<List>) -> Result<Page, Status>;
    /// The records, in request order, and the response's revision.
    async fn batch_get(
        &mut self,
        request: impl IntoRequest<BatchGet>,
    ) -> Result<(Vec<Record>, u64), Status>;
    async fn watch_from(&mut self, request: impl IntoRequest<WatchFrom>)
    -> Result<Changes, Status>;
}

impl Reads for KindClient {
    async fn list(&mut self, request: impl IntoRequest<List>) -> Result<Page, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(
                    |List {
                         filter,
                         page_size,
                         page_token,
                     }| ListUserMetadataRequest {
                        filter,
                        page_size,
                        page_token,
                    },
                );
                let ListUserMetadataResponse {
                    users,
                    next_page_token,
                    revision,
                } = c.list(request).await?.into_inner();
                Ok(Page {
                    records: users.into_iter().map(Record::from).collect(),
                    next_page_token,
                    revision,
                })
            }
            KindClient::Organization(c) => {
                let request = request.map(
                    |List {
                         filter,
                         page_size,
                         page_token,
                     }| ListOrganizationMetadataRequest {
                        filter,
                        page_size,
                        page_token,
                    },
                );
                let ListOrganizationMetadataResponse {
                    organizations,
                    next_page_token,
                    revision,
                } = c.list(request).await?.into_inner();
                Ok(Page {
                    records: organizations.into_iter().map(Record::from).collect(),
                    next_page_token,
                    revision,
                })
            }
        }
    }

    async fn batch_get(
        &mut self,
        request: impl IntoRequest<BatchGet>,
    ) -> Result<(Vec<Record>, u64), Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request =
                    request.map(|BatchGet { ids, revision }| BatchGetUserMetadataRequest {
                        user_ids: ids,
                        revision,
                    });
                let BatchGetUserMetadataResponse { users, revision } =
                    c.batch_get(request).await?.into_inner();
                Ok((users.into_iter().map(Record::from).collect(), revision))
            }
            KindClient::Organization(c) => {
                let request =
                    request.map(
                        |BatchGet { ids, revision }| BatchGetOrganizationMetadataRequest {
                            organization_ids: ids,
                            revision,
                        },
                    );
                let BatchGetOrganizationMetadataResponse {
                    organizations,
                    revision,
                } = c.batch_get(request).await?.into_inner();
                Ok((
                    organizations.into_iter().map(Record::from).collect(),
                    revision,
                ))
            }
        }
    }

    async fn watch_from(
        &mut self,
        request: impl IntoRequest<WatchFrom>,
    ) -> Result<Changes, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(
                    |WatchFrom {
                         start_revision,
                         filter,
                     }| WatchUserMetadataRequest {
                        start_revision,
                        user_ids: Vec::new(),
                        progress_notify: false,
                        filter,
                    },
                );
                Ok(Changes::User(c.watch(request).await?.into_inner()))
            }
            KindClient::Organization(c) => {
                let request = request.map(
                    |WatchFrom {
                         start_revision,
                         filter,
                     }| WatchOrganizationMetadataRequest {
                        start_revision,
                        organization_ids: Vec::new(),
                        progress_notify: false,
                        filter,
                    },
                );
                Ok(Changes::Organization(c.watch(request).await?.into_inner()))
            }
        }
    }
}

/// The page size the contract says a request gets.
fn effective(page_size: i32) -> usize {
    match page_size {
        0 => 50,
        n => (n as usize).min(1000),
    }
}

/// Every page of `filter`, the page sizes taken in turn from `sizes`: the
/// records in order, and each page's revision. An error says which page
/// failed, or that a page was larger than asked or the pages never ended.
pub async fn list_all(
    client: &mut KindClient,
    filter: &str,
    sizes: &[i32],
) -> Result<(Vec<Record>, Vec<u64>), String> {
    let mut records = Vec::new();
    let mut revisions = Vec::new();
    let mut token = String::new();
    for (page, size) in sizes.iter().copied().cycle().enumerate() {
        let request = List::new(filter).page_size(size).page_token(&token);
        let got = client
            .list(request)
            .await
            .map_err(|status| format!("page {page} of {filter:?}: {status:?}"))?;
        if got.records.len() > effective(size) {
            return Err(format!(
                "page {page} of {filter:?}: {} records for page size {size}",
                got.records.len()
            ));
        }
        records.extend(got.records);
        revisions.push(got.revision);
        if got.next_page_token.is_empty() {
            return Ok((records, revisions));
        }
        // Even pages of one record cannot outnumber the records listed.
        if page > records.len() + 1 {
            return Err(format!(
                "{filter:?}: page {page} still has a next page, after {} records",
                records.len()
            ));
        }
        token = got.next_page_token;
    }
    unreachable!("the sizes cycle forever")
}

/// Runs `merges` at most 32 at a time; their records, in order.
pub async fn merge_all(client: &KindClient, merges: Vec<Merge>) -> Vec<Record> {
    let mut records = Vec::with_capacity(merges.len());
    for chunk in merges.chunks(32) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|merge| {
                let mut client = client.clone();
                tokio::spawn(async move { client.merge(merge).await })
            })
            .collect();
        for task in tasks {
            records.push(task.await.expect("merge task").expect("merge"));
        }
    }
    records
}

/// Applies a change a Watch delivered to what a read returned (by id):
/// only a change the read does not reflect yet, one after the record's own
/// revision. The record after a change has that change's revision.
pub fn apply(state: &mut BTreeMap<String, Record>, change: Change) {
    let reflected = state.get(&change.id).map_or(0, |r| r.revision);
    if change.revision > reflected {
        let record = Record {
            revision: change.revision,
            ..change.after
        };
        state.insert(change.id, record);
    }
}

/// The newest revision in the event log, events and voids alike: no read
/// can reflect a revision beyond it.
pub async fn newest_revision(server: &TestServer) -> u64 {
    use sea_orm::{ConnectionTrait, Statement};
    let db = server.db.connect().await;
    let statement = Statement::from_string(
        db.get_database_backend(),
        "SELECT MAX(revision) AS newest FROM events",
    );
    let row = db.query_one_raw(statement).await.unwrap().expect("a row");
    db.close().await.ok();
    let newest: Option<i64> = row.try_get("", "newest").unwrap();
    newest.unwrap_or(0) as u64
}

/// The status of a call that must fail with `code`.
pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

// ---------------------------------------------------------------------------
// The property: List selects what the filter selects in plain Rust.
//
// Documents and filters come from small alphabets so that filters hit:
// keys a, b, c, B (case), and keys that must be quoted: "x.y", a quote, a
// backslash, "é", the empty key, "0"; values small integers, a few
// doubles (and numbers beyond 2^53), short strings (some differing only in
// case, some beyond ASCII or with characters JSON escapes), true, false,
// null, small arrays and objects. The filter is
// generated as a tree, written out as text (parentheses only where the
// tree needs them or at random), and evaluated by an oracle written here
// from the issue's semantics; the crate's own evaluator, `parse(text)`
// then `matches`, must agree with the oracle, and List with both.

/// Keys of stored objects; a filter may also name `c`, never stored.
const KEYS: [&str; 9] = ["a", "b", "B", "x.y", "q\"k", "b\\s", "é", "", "0"];
const TEXTS: [&str; 11] = ["", "a", "b", "B", "x", "X", "xy", "é", "\"", "\\", "😀"];

fn key() -> BoxedStrategy<String> {
    prop::sample::select(&KEYS[..])
        .prop_map(str::to_owned)
        .boxed()
}

fn path_key() -> BoxedStrategy<String> {
    prop_oneof![9 => key(), 1 => Just("c".to_owned())].boxed()
}

fn scalar() -> BoxedStrategy<Json> {
    prop_oneof![
        3 => (-1i64..=2).prop_map(Json::from),
        1 => prop::sample::select(&[0.5, 1.5, -0.5, 2.5, 1e300, 1152921504606846976.0][..])
            .prop_map(Json::from),
        3 => prop::sample::select(&TEXTS[..]).prop_map(Json::from),
        1 => any::<bool>().prop_map(Json::Bool),
        1 => Just(Json::Null),
    ]
    .boxed()
}

fn object(values: BoxedStrategy<Json>, min: usize, max: usize) -> BoxedStrategy<Json> {
    prop::collection::btree_map(key(), values, min..=max)
        .prop_map(|map| Json::Object(map.into_iter().collect()))
        .boxed()
}

fn array(items: BoxedStrategy<Json>) -> BoxedStrategy<Json> {
    prop::collection::vec(items, 0..=3)
        .prop_map(Json::Array)
        .boxed()
}

/// A member of a stored object: a scalar, an array (of scalars, now and
/// then an object), or an object one level down.
fn member() -> BoxedStrategy<Json> {
    prop_oneof![
        4 => scalar(),
        1 => array(prop_oneof![4 => scalar(), 1 => object(scalar(), 0, 2)].boxed()),
        2 => object(prop_oneof![3 => scalar(), 1 => array(scalar())].boxed(), 0, 3),
    ]
    .boxed()
}

/// A stored field: mostly an object, sometimes JSON null (a Replace with
/// null stores it).
fn stored() -> BoxedStrategy<Json> {
    prop_oneof![9 => object(member(), 1, 4), 1 => Just(Json::Null)].boxed()
}

/// The fields written for `kind`; `{}` for an organization's unsafe.
fn fields(kind: Kind) -> BoxedStrategy<Fields> {
    (stored(), stored(), stored())
        .prop_map(move |(public, private, unsafe_)| Fields {
            public,
            private,
            unsafe_: match kind {
                Kind::User => unsafe_,
                Kind::Organization => json!({}),
            },
        })
        .boxed()
}

/// What happens to one id in a case: one or two Replaces of every field,
/// then perhaps a Delete.
#[derive(Clone, Debug)]
struct History {
    writes: Vec<Fields>,
    deleted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }
}

/// A literal as written in the filter, and its value.
#[derive(Clone, Debug)]
struct Literal {
    text: String,
    value: Json,
}

#[derive(Clone, Debug)]
enum Test {
    Compare(Cmp, Literal),
    /// `path:literal`
    Has(Literal),
    /// `path:*`
    Exists,
}

#[derive(Clone, Debug)]
struct Restriction {
    field: Field,
    /// Each key, and whether to quote it when it need not be.
    keys: Vec<(String, bool)>,
    test: Test,
    /// Spaces around the operator.
    spaced: bool,
}

#[derive(Clone, Debug)]
enum Expr {
    Restriction(Restriction),
    Not(Box<Expr>),
    /// The operands, and whether to parenthesize where it is not needed.
    And(Vec<Expr>, bool),
    Or(Vec<Expr>, bool),
}

fn literal() -> BoxedStrategy<Literal> {
    let parsed = |text: &str| Literal {
        text: text.to_owned(),
        value: serde_json::from_str(text).expect("a JSON literal"),
    };
    prop_oneof![
        3 => prop::sample::select(&["-1", "0", "1", "2", "0.5", "1.5", "-0.5", "2.0", "1e0", "-0"][..])
            .prop_map(parsed),
        // Beyond 2^53: stored numbers are f64, and so are literals.
        1 => prop::sample::select(&["1152921504606846976", "1152921504606846980", "1e300"][..])
            .prop_map(parsed),
        3 => prop::sample::select(&TEXTS[..]).prop_map(|s| Literal {
            text: Json::from(s).to_string(),
            value: Json::from(s),
        }),
        // An escape in a string literal.
        1 => Just(Literal { text: r#""\u00e9""#.into(), value: json!("é") }),
        2 => prop::sample::select(&["true", "false", "null"][..]).prop_map(parsed),
    ]
    .boxed()
}

fn cmp() -> BoxedStrategy<Cmp> {
    prop::sample::select(&[Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge][..]).boxed()
}

/// A value stored in a case's documents, for restrictions that hit: a
/// scalar at a path, or (not `scalar`) an element of an array or a key of
/// an object at a path.
#[derive(Clone, Debug)]
struct Fact {
    field: Field,
    keys: Vec<String>,
    value: Json,
    scalar: bool,
}

fn facts(kind: Kind, histories: &[History]) -> Vec<Fact> {
    fn walk(field: Field, keys: &mut Vec<String>, value: &Json, facts: &mut Vec<Fact>) {
        let fact = |keys: &[String], value: &Json, scalar| Fact {
            field,
            keys: keys.to_vec(),
            value: value.clone(),
            scalar,
        };
        match value {
            Json::Object(map) => {
                for (key, member) in map {
                    facts.push(fact(keys, &Json::from(key.as_str()), false));
                    keys.push(key.clone());
                    walk(field, keys, member, facts);
                    keys.pop();
                }
            }
            Json::Array(items) => facts.extend(
                items
                    .iter()
                    .filter(|item| !item.is_object())
                    .map(|item| fact(keys, item, false)),
            ),
            scalar => facts.push(fact(keys, scalar, true)),
        }
    }
    let mut facts = Vec::new();
    for doc in histories.iter().flat_map(|h| &h.writes) {
        for field in kind.fields() {
            walk(*field, &mut Vec::new(), doc.get(*field), &mut facts);
        }
    }
    facts
}

/// A restriction on a stored value, which some documents likely hold.
fn hit(facts: Vec<Fact>) -> BoxedStrategy<Restriction> {
    (
        prop::sample::select(facts),
        cmp(),
        0..6u8,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(fact, cmp, pick, quoted, spaced)| {
            let literal = Literal {
                text: fact.value.to_string(),
                value: fact.value,
            };
            let test = match (fact.scalar, pick) {
                (true, 0) => Test::Exists,
                (true, 1) => Test::Has(literal),
                (true, _) => Test::Compare(cmp, literal),
                (false, _) => Test::Has(literal),
            };
            Restriction {
                field: fact.field,
                keys: fact.keys.into_iter().map(|key| (key, quoted)).collect(),
                test,
                spaced,
            }
        })
        .boxed()
}

/// Mostly a restriction on a stored value; else any restriction.
fn restriction(kind: Kind, facts: &[Fact]) -> BoxedStrategy<Restriction> {
    if facts.is_empty() {
        return any_restriction(kind);
    }
    prop_oneof![2 => hit(facts.to_vec()), 1 => any_restriction(kind)].boxed()
}

fn any_restriction(kind: Kind) -> BoxedStrategy<Restriction> {
    let keys = prop_oneof![
        1 => prop::collection::vec((path_key(), any::<bool>()), 0..=0),
        6 => prop::collection::vec((path_key(), prop::bool::weighted(0.1)), 1..=1),
        2 => prop::collection::vec((path_key(), prop::bool::weighted(0.1)), 2..=2),
    ];
    let test = prop_oneof![
        6 => (cmp(), literal()).prop_map(|(cmp, literal)| Test::Compare(cmp, literal)),
        2 => literal().prop_map(Test::Has),
        2 => Just(Test::Exists),
    ];
    (
        prop::sample::select(kind.fields().to_vec()),
        keys,
        test,
        prop::bool::weighted(0.8),
    )
        .prop_map(|(field, keys, test, spaced)| Restriction {
            field,
            keys,
            test,
            spaced,
        })
        .boxed()
}

fn expr(kind: Kind, facts: &[Fact]) -> BoxedStrategy<Expr> {
    restriction(kind, facts)
        .prop_map(Expr::Restriction)
        .prop_recursive(2, 6, 2, |inner| {
            prop_oneof![
                1 => inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                2 => (prop::collection::vec(inner.clone(), 2..=2), prop::bool::weighted(0.3))
                    .prop_map(|(operands, parens)| Expr::And(operands, parens)),
                2 => (prop::collection::vec(inner, 2..=3), prop::bool::weighted(0.3))
                    .prop_map(|(operands, parens)| Expr::Or(operands, parens)),
            ]
        })
        .boxed()
}

/// Where an expression is written: what it must be parenthesized for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Top,
    And,
    Or,
    Not,
}

/// A key as a bare name where it can be one.
fn is_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !["AND", "OR", "NOT"].contains(&key)
}

fn write(expr: &Expr, slot: Slot, out: &mut String) {
    let join = |operands: &[Expr], joiner: &str, inner: Slot, parens: bool, out: &mut String| {
        if parens {
            out.push('(');
        }
        for (i, operand) in operands.iter().enumerate() {
            if i > 0 {
                out.push_str(joiner);
            }
            write(operand, inner, out);
        }
        if parens {
            out.push(')');
        }
    };
    match expr {
        Expr::Restriction(r) => {
            out.push_str(r.field.name());
            for (key, quoted) in &r.keys {
                out.push('.');
                if *quoted || !is_name(key) {
                    out.push_str(&Json::from(key.as_str()).to_string());
                } else {
                    out.push_str(key);
                }
            }
            let gap = if r.spaced { " " } else { "" };
            let (operator, literal) = match &r.test {
                Test::Compare(cmp, literal) => (cmp.symbol(), Some(literal)),
                Test::Has(literal) => (":", Some(literal)),
                Test::Exists => (":", None),
            };
            out.push_str(gap);
            out.push_str(operator);
            out.push_str(gap);
            out.push_str(literal.map_or("*", |l| l.text.as_str()));
        }
        Expr::Not(inner) => {
            out.push_str("NOT ");
            write(inner, Slot::Not, out);
        }
        // AND binds loosest: inside OR or NOT it needs parentheses.
        Expr::And(operands, parens) => {
            let parens = *parens || matches!(slot, Slot::Or | Slot::Not);
            join(operands, " AND ", Slot::And, parens, out);
        }
        Expr::Or(operands, parens) => {
            let parens = *parens || slot == Slot::Not;
            join(operands, " OR ", Slot::Or, parens, out);
        }
    }
}

fn text(filter: &Option<Expr>) -> String {
    let mut out = String::new();
    if let Some(expr) = filter {
        write(expr, Slot::Top, &mut out);
    }
    out
}

// The oracle.

fn holds(expr: &Expr, doc: &Fields) -> bool {
    match expr {
        Expr::Restriction(r) => restriction_holds(r, doc),
        Expr::Not(inner) => !holds(inner, doc),
        Expr::And(operands, _) => operands.iter().all(|e| holds(e, doc)),
        Expr::Or(operands, _) => operands.iter().any(|e| holds(e, doc)),
    }
}

/// The value at the path: keys walk objects only (never into an array).
fn at<'a>(doc: &'a Fields, r: &Restriction) -> Option<&'a Json> {
    let mut value = doc.get(r.field);
    for (key, _) in &r.keys {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

/// Of the same JSON type and equal; numbers by value (2 = 2.0).
fn equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        (Json::String(x), Json::String(y)) => x == y,
        (Json::Bool(x), Json::Bool(y)) => x == y,
        (Json::Null, Json::Null) => true,
        _ => false,
    }
}

fn restriction_holds(r: &Restriction, doc: &Fields) -> bool {
    // Any test on a missing key is false, `!=` included.
    let Some(found) = at(doc, r) else {
        return false;
    };
    match &r.test {
        Test::Exists => true,
        Test::Has(literal) => match found {
            Json::Array(items) => items.iter().any(|item| equal(item, &literal.value)),
            Json::Object(map) => literal.value.as_str().is_some_and(|k| map.contains_key(k)),
            other => equal(other, &literal.value),
        },
        Test::Compare(cmp, literal) => {
            let equality = matches!(cmp, Cmp::Eq | Cmp::Ne);
            let ordering = match (found, &literal.value) {
                (Json::Number(x), Json::Number(y)) => x.as_f64().partial_cmp(&y.as_f64()),
                // By Unicode code point.
                (Json::String(x), Json::String(y)) => Some(x.chars().cmp(y.chars())),
                // Booleans and null compare for equality only.
                (Json::Bool(_), Json::Bool(_)) | (Json::Null, Json::Null) if equality => {
                    Some(if equal(found, &literal.value) {
                        Ordering::Equal
                    } else {
                        Ordering::Less
                    })
                }
                // Across types: false, whatever the operator.
                _ => None,
            };
            let Some(ordering) = ordering else {
                return false;
            };
            match cmp {
                Cmp::Eq => ordering.is_eq(),
                Cmp::Ne => ordering.is_ne(),
                Cmp::Lt => ordering.is_lt(),
                Cmp::Le => ordering.is_le(),
                Cmp::Gt => ordering.is_gt(),
                Cmp::Ge => ordering.is_ge(),
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    histories: Vec<History>,
    filters: Vec<Option<Expr>>,
    /// The page sizes of a listing, in turn.
    sizes: Vec<i32>,
}

fn case(kind: Kind) -> impl Strategy<Value = Case> {
    let history = (
        prop::collection::vec(fields(kind), 1..=2),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(writes, deleted)| History { writes, deleted });
    (
        prop::collection::vec(history, 10..=16),
        prop::collection::vec(1i32..=4, 1..=3),
    )
        .prop_flat_map(move |(histories, sizes)| {
            let facts = facts(kind, &histories);
            let filter = prop::option::weighted(0.95, expr(kind, &facts));
            (
                Just(histories),
                prop::collection::vec(filter, 4),
                Just(sizes),
            )
        })
        .prop_map(|(histories, filters, sizes)| Case {
            histories,
            filters,
            sizes,
        })
}

/// What the runs of one test share across cases.
#[derive(Default)]
struct Shared {
    cases: usize,
    /// The live records of the last case, deleted when the next starts.
    live: Vec<String>,
    filters: usize,
    /// Filters that selected some but not all of the live records.
    some: usize,
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(32);
    Config {
        cases,
        // Failing seeds are replayed first on the next run.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/list.txt",
        ))),
        // Each step writes to the server: bound the shrinking.
        max_shrink_iters: 200,
        ..Config::default()
    }
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// The fields of a written record as JSON, for an organization with `{}`
/// for unsafe, as the oracle sees them.
fn written_fields(record: &Record) -> Fields {
    let (public, private, unsafe_) = record.fields();
    Fields {
        public,
        private,
        unsafe_: unsafe_.unwrap_or_else(|| json!({})),
    }
}

/// Writes one history; the record it leaves (None if there is none).
async fn play(
    mut client: KindClient,
    kind: Kind,
    id: String,
    history: History,
) -> Result<Option<Record>, String> {
    let mut last = None;
    for doc in &history.writes {
        let replace = Replace::new(&id)
            .public(doc.public.clone())
            .private(doc.private.clone());
        let replace = match kind {
            Kind::User => replace.unsafe_(doc.unsafe_.clone()),
            Kind::Organization => replace,
        };
        let record = client
            .replace(replace)
            .await
            .map_err(|s| format!("replace {id}: {s:?}"))?;
        if written_fields(&record) != *doc {
            return Err(format!("{id}: wrote {doc:?}, the response has {record:?}"));
        }
        // Writing `{}` everywhere to a new id changes nothing: it stays
        // unwritten, version 0, and is not listed.
        last = Some(record).filter(|r| r.version > 0);
    }
    if history.deleted {
        let existed = client
            .delete(Delete::new(&id))
            .await
            .map_err(|s| format!("delete {id}: {s:?}"))?;
        if existed != last.is_some() {
            return Err(format!("{id}: the delete says existed = {existed}"));
        }
        last = None;
    }
    Ok(last)
}

async fn check_case(
    server: &TestServer,
    kind: Kind,
    shared: &Mutex<Shared>,
    case: Case,
) -> Result<(), TestCaseError> {
    let (n, previous) = {
        let mut shared = shared.lock().unwrap();
        shared.cases += 1;
        (shared.cases, std::mem::take(&mut shared.live))
    };
    let client = kind.client(server);
    // The last case's records become tombstones, which no List returns.
    let deletes: Vec<_> = previous
        .into_iter()
        .map(|id| {
            let mut client = client.clone();
            tokio::spawn(async move { client.delete(Delete::new(&id)).await })
        })
        .collect();
    for delete in deletes {
        let existed = delete.await.expect("delete task").expect("delete");
        assert!(existed, "a live record of the last case");
    }

    // Fixed width, lowercase and digits: id order is byte order everywhere.
    let ids: Vec<String> = (0..case.histories.len())
        .map(|i| format!("c{n:04}i{i:02}"))
        .collect();
    let plays: Vec<_> = ids
        .iter()
        .zip(&case.histories)
        .map(|(id, history)| tokio::spawn(play(client.clone(), kind, id.clone(), history.clone())))
        .collect();
    let mut live: Vec<(Record, Fields)> = Vec::new();
    let mut failed = None;
    for (played, history) in plays.into_iter().zip(&case.histories) {
        match played.await.expect("write task") {
            Ok(Some(record)) => live.push((record, history.writes.last().unwrap().clone())),
            Ok(None) => {}
            Err(e) => failed = Some(e),
        }
    }
    shared.lock().unwrap().live = live.iter().map(|(r, _)| r.id.clone()).collect();
    if let Some(e) = failed {
        return Err(fail(e));
    }

    for filter in &case.filters {
        let text = text(filter);
        let parsed = parse(&text, kind.fields()).map_err(|e| fail(format!("{text}: {e}")))?;
        prop_assert_eq!(parsed.is_some(), filter.is_some(), "{}", text);
        let mut expected = Vec::new();
        for (record, doc) in &live {
            let oracle = filter.as_ref().is_none_or(|f| holds(f, doc));
            let evaluator = parsed.as_ref().is_none_or(|f| f.matches(doc));
            prop_assert_eq!(
                evaluator,
                oracle,
                "Filter::matches disagrees with the oracle on {} for {:?}",
                text,
                doc
            );
            if oracle {
                expected.push(record.clone());
            }
        }
        let mut client = client.clone();
        let (listed, _) = list_all(&mut client, &text, &case.sizes)
            .await
            .map_err(fail)?;
        let listed_ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
        let expected_ids: Vec<&str> = expected.iter().map(|r| r.id.as_str()).collect();
        prop_assert_eq!(&listed_ids, &expected_ids, "{} listed", text);
        prop_assert_eq!(&listed, &expected, "{} records", text);

        let mut shared = shared.lock().unwrap();
        shared.filters += 1;
        if !expected.is_empty() && expected.len() < live.len() {
            shared.some += 1;
        }
    }
    Ok(())
}

async fn list_selects_what_the_filter_selects(backend: Backend, kind: Kind) {
    let Some(server) = start(backend).await else {
        return;
    };
    let shared = Mutex::new(Shared::default());
    let mut runner = TestRunner::new(config());
    let handle = tokio::runtime::Handle::current();
    // The runner is synchronous; each case runs on this runtime, whose
    // other worker keeps serving.
    let result = tokio::task::block_in_place(|| {
        runner.run(&case(kind), |case| {
            handle.block_on(check_case(&server, kind, &shared, case))
        })
    });
    if let Err(err) = result {
        panic!("{kind:?} on {backend:?}: {err}");
    }
    // The generators are worth their time: many filters select some
    // records and leave others (about 45%).
    let shared = shared.lock().unwrap();
    eprintln!(
        "{} cases, {} of {} filters selected some records but not all",
        shared.cases, shared.some, shared.filters
    );
    assert!(
        shared.some * 4 >= shared.filters,
        "only {} of {} filters selected a proper subset",
        shared.some,
        shared.filters
    );
}

// ---------------------------------------------------------------------------
// Paging.

/// `r00`, `r01`, ...: public {"n": i, "even": i is even}.
fn numbered(count: usize) -> Vec<Merge> {
    (0..count)
        .map(|i| Merge::new(&format!("r{i:04}")).public(json!({"n": i, "even": i % 2 == 0})))
        .collect()
}

async fn page_sizes_and_tokens(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    let written = merge_all(&c, numbered(55)).await;

    // 0 is the default, 50.
    let first = c.list(List::new("")).await.unwrap();
    assert_eq!(first.records, written[..50]);
    assert!(!first.next_page_token.is_empty());
    let rest = c
        .list(List::new("").page_token(&first.next_page_token))
        .await
        .unwrap();
    assert_eq!(rest.records, written[50..]);
    assert_eq!(rest.next_page_token, "", "the last page has no next page");

    for negative in [-1, i32::MIN] {
        let status = assert_code(
            c.list(List::new("").page_size(negative)).await,
            Code::InvalidArgument,
        );
        assert!(status.message().contains("page_size"), "{status:?}");
    }

    // The page size may change from page to page.
    let even = "public_metadata.even = true";
    let (records, _) = list_all(&mut c, even, &[1, 7, 3, 100]).await.unwrap();
    let evens: Vec<Record> = written.iter().step_by(2).cloned().collect();
    assert_eq!(records, evens);
    // A page that ends exactly at the last record is the last page.
    let all = c.list(List::new("").page_size(55)).await.unwrap();
    assert_eq!(all.records, written);
    assert_eq!(all.next_page_token, "");

    // A token continues only the listing it came from.
    let page = c.list(List::new(even).page_size(3)).await.unwrap();
    let token = page.next_page_token;
    let same = c
        .list(List::new(even).page_size(3).page_token(&token))
        .await
        .unwrap();
    assert_eq!(same.ids(), ["r0006", "r0008", "r0010"]);
    for other in [
        "",
        "public_metadata.even = false",
        "public_metadata.even=true",
    ] {
        let status = assert_code(
            c.list(List::new(other).page_token(&token)).await,
            Code::InvalidArgument,
        );
        assert!(status.message().starts_with("page_token: "), "{status:?}");
    }
    for garbage in [
        "garbage",
        "%%%",
        "AAAA",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &token[..token.len() / 2],
    ] {
        let status = assert_code(
            c.list(List::new(even).page_token(garbage)).await,
            Code::InvalidArgument,
        );
        assert!(status.message().starts_with("page_token: "), "{status:?}");
    }

    // A token of the other kind's List, for the same (empty) filter.
    let mut other = kind.other().client(&s);
    merge_all(&other, numbered(3)).await;
    let theirs = other.list(List::new("").page_size(1)).await.unwrap();
    assert!(!theirs.next_page_token.is_empty());
    let status = assert_code(
        c.list(List::new("").page_token(&theirs.next_page_token))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().starts_with("page_token: "), "{status:?}");
    // Each kind lists its own records only.
    let (ours, _) = list_all(&mut c, "", &[1000]).await.unwrap();
    assert_eq!(ours, written);
}

/// Users only: the cap is the same code for both kinds, and this test
/// writes 1,005 records.
async fn page_size_is_capped_at_1000(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = Kind::User.client(&s);
    let written = merge_all(&c, numbered(1005)).await;
    for size in [1001, i32::MAX] {
        let page = c.list(List::new("").page_size(size)).await.unwrap();
        assert_eq!(page.records.len(), 1000, "page size {size}");
        assert_eq!(page.records, written[..1000]);
        let rest = c
            .list(
                List::new("")
                    .page_size(size)
                    .page_token(&page.next_page_token),
            )
            .await
            .unwrap();
        assert_eq!(rest.records, written[1000..]);
        assert_eq!(rest.next_page_token, "");
    }
}

/// Between pages: delete records already listed and not yet listed, add
/// records before and after the cursor, update a listed and an unlisted
/// record so that they still match, and make an unlisted one stop
/// matching. Every record that matched throughout appears exactly once;
/// none appears twice; every record listed matched when its page was read.
async fn paging_is_stable_under_writes_and_deletes(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    const FILTER: &str = "public_metadata.m = true";
    // Even ids match, odd ones do not.
    let merges = (0..60)
        .map(|i| Merge::new(&format!("r{i:02}")).public(json!({"m": i % 2 == 0, "n": i})))
        .collect();
    merge_all(&c, merges).await;
    let mut matching: Vec<String> = (0..60).step_by(2).map(|i| format!("r{i:02}")).collect();
    // Matched, then no longer (deleted or changed) while unlisted.
    let mut dropped: Vec<String> = Vec::new();
    // Changed while unlisted, still matching: listed with the change.
    let mut touched: BTreeMap<String, usize> = BTreeMap::new();

    let mut listed: Vec<Record> = Vec::new();
    let mut token = String::new();
    for step in 0.. {
        assert!(step < 60, "the listing does not end");
        let page = c
            .list(List::new(FILTER).page_size(4).page_token(&token))
            .await
            .unwrap();
        listed.extend(page.records.iter().cloned());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        let cursor = listed.last().unwrap().id.clone();
        let unlisted: Vec<String> = matching
            .iter()
            .filter(|id| **id > cursor && !touched.contains_key(*id))
            .cloned()
            .collect();

        // An already listed record goes, another is updated (and matches).
        let gone = listed[step % listed.len()].id.clone();
        c.delete(Delete::new(&gone)).await.unwrap();
        let kept = &listed[listed.len() - 1];
        if kept.id != gone {
            c.merge(Merge::new(&kept.id).public(json!({"listed": step})))
                .await
                .unwrap();
        }
        // New matching records before the cursor and after it.
        let before = format!("{}b{step:02}", listed[0].id);
        assert!(before < cursor || listed.len() == 1);
        c.merge(Merge::new(&before).public(json!({"m": true})))
            .await
            .unwrap();
        c.merge(Merge::new(&format!("r99b{step:02}")).public(json!({"m": true})))
            .await
            .unwrap();
        // Unlisted records: one updated and still matching, one changed to
        // match no more, one deleted.
        if let [still, stops, deleted, ..] = &unlisted[..] {
            c.merge(Merge::new(still).public(json!({"touched": step})))
                .await
                .unwrap();
            touched.insert(still.clone(), step);
            c.merge(Merge::new(stops).public(json!({"m": false})))
                .await
                .unwrap();
            c.delete(Delete::new(deleted)).await.unwrap();
            dropped.extend([stops.clone(), deleted.clone()]);
            matching.retain(|id| id != stops && id != deleted);
        }
    }

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for record in &listed {
        *seen.entry(record.id.as_str()).or_default() += 1;
        let public = crate::common::json::field(&record.public);
        assert_eq!(public["m"], json!(true), "{record:?} does not match");
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "listed more than once: {twice:?}");
    for id in &matching {
        assert_eq!(seen.get(id.as_str()), Some(&1), "{id} matched throughout");
    }
    for id in &dropped {
        assert_eq!(seen.get(id.as_str()), None, "{id} no longer matched");
    }
    // The unlisted records changed are listed as changed.
    for (id, step) in &touched {
        let record = listed.iter().find(|r| r.id == *id).unwrap();
        let public = crate::common::json::field(&record.public);
        assert_eq!(public["touched"], json!(step), "{id}");
    }
    // Pages are in id order, so the listing is too.
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id));
}

// ---------------------------------------------------------------------------
// Filters refused.

async fn bad_filters_are_refused_with_their_column(backend: Backend, kind: Kind) {
    let Some(s) = start(backend).await else {
        return;
    };
    let mut c = kind.client(&s);
    c.merge(Merge::new("r1").public(json!({"a": 1})))
        .await
        .unwrap();
    let long = format!(r#"public_metadata.a = "{}""#, "x".repeat(2048));
    let mut cases: Vec<(String, usize, &str)> = vec![
        ("metadata.a = 1".into(), 1, "unknown field `metadata`"),
        (
            "public_metadata.a = 1 AND privat.b = 2".into(),
            27,
            "unknown field `privat`",
        ),
        ("public_metadata.a = ".into(), 21, "ends where a value"),
        ("public_metadata.a ~ 1".into(), 19, "unexpected character"),
        ("(public_metadata.a = 1".into(), 23, "`)`"),
        ("public_metadata.a = 1 public_metadata.a = 1".into(), 23, ""),
        ("public_metadata.a = gold".into(), 21, "expected a value"),
        // Columns count characters, not bytes.
        (
            r#"public_metadata.é = "x" OR )"#.into(),
            28,
            "expected a field",
        ),
        (long, 1, "at most 2048 bytes"),
    ];
    if kind == Kind::Organization {
        cases.push((
            "unsafe_metadata.a = 1".into(),
            1,
            "unknown field `unsafe_metadata`",
        ));
        cases.push((
            "public_metadata.a = 1 OR unsafe_metadata:*".into(),
            26,
            "unknown field `unsafe_metadata`",
        ));
    }
    for (filter, column, says) in cases {
        let status = assert_code(c.list(List::new(&filter)).await, Code::InvalidArgument);
        let message = status.message();
        assert!(message.starts_with("filter: "), "{filter}: {message}");
        assert!(
            message.contains(&format!("column {column}")),
            "{filter}: {message}"
        );
        assert!(message.contains(says), "{filter}: {message}");
    }

    // 2,048 bytes is not too long.
    let padding = 2048 - r#"public_metadata.a = """#.len();
    let longest = format!(r#"public_metadata.a = "{}""#, "x".repeat(padding));
    assert_eq!(longest.len(), 2048);
    let page = c.list(List::new(&longest)).await.unwrap();
    assert!(page.records.is_empty());
    if kind == Kind::User {
        let page = c.list(List::new("unsafe_metadata:*")).await.unwrap();
        assert_eq!(page.ids(), ["r1"]);
    }
}

// ---------------------------------------------------------------------------
// Who may List.

async fn only_backend_callers_list(backend: Backend, kind: Kind) {
    let auth = authenticator(SECRET);
    let Some(s) = start_with(backend, |c| c.auth = auth).await else {
        return;
    };
    let mut c = kind.client(&s);
    let own = match kind {
        Kind::User => USER,
        Kind::Organization => ORG,
    };
    let replace = Replace::new(own)
        .public(json!({"plan": "free"}))
        .private(json!({"tier": "gold"}));
    let replace = match kind {
        Kind::User => replace.unsafe_(json!({"theme": "dark"})),
        Kind::Organization => replace,
    };
    let stored = c
        .replace(with_token(replace, Some(BACKEND_KEY)))
        .await
        .unwrap();

    // A backend key filters on any field and sees every field.
    let mut filters = vec![r#"private_metadata.tier = "gold""#, "private_metadata:*"];
    if kind == Kind::User {
        filters.push(r#"unsafe_metadata.theme = "dark""#);
    }
    for filter in filters {
        let page = c
            .list(with_token(List::new(filter), Some(BACKEND_KEY)))
            .await
            .unwrap();
        assert_eq!(page.records, std::slice::from_ref(&stored), "{filter}");
    }

    // A frontend token may neither List nor Watch, even its own record by
    // a public field.
    let token = session(USER, Some(ORG));
    for filter in ["", r#"public_metadata.plan = "free""#] {
        let status = assert_code(
            c.list(with_token(List::new(filter), Some(&token))).await,
            Code::PermissionDenied,
        );
        assert!(
            status.message().contains("backend callers only"),
            "{status:?}"
        );
        let watch = WatchFrom {
            start_revision: 0,
            filter: filter.into(),
        };
        let refused = c.watch_from(with_token(watch, Some(&token))).await;
        assert_code(refused.map(drop), Code::PermissionDenied);
    }
    // No credentials at all.
    assert_code(
        c.list(with_token(List::new(""), None)).await,
        Code::Unauthenticated,
    );
}

// ---------------------------------------------------------------------------
// The revision of a page.

/// Records change, enter and leave the result, and go while the pages of
/// `filter` are read; then more changes come. The pages, and a Watch of
/// `filter` from the first page's revision + 1, give the current result:
/// every change after the listing is delivered, and none that the listing
/// missed is skipped.
async fn list_then_watch(backend: Backend, kind: Kind, filter: &str) {
    let Some(s) = start(backend).await else {
        return;
    };
    let query = parse(filter, kind.fields()).unwrap();
    let matches =
        |r: &Record| r.version > 0 && query.as_ref().is_none_or(|q| q.matches(&written_fields(r)));
    let mut c = kind.client(&s);
    let ids: Vec<String> = (0..12).map(|i| format!("g{i:02}")).collect();
    merge_all(
        &c,
        ids[..8]
            .iter()
            .enumerate()
            .map(|(i, id)| Merge::new(id).public(json!({"n": 0, "odd": i % 2 == 1})))
            .collect(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mut c, ids, stop) = (c.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while i < 20 || !stop.load(Atomic::SeqCst) {
                let id = &ids[i * 7 % ids.len()];
                if i % 5 == 4 {
                    c.delete(Delete::new(id)).await.unwrap();
                } else {
                    let public = json!({"n": i, "odd": i % 2 == 1});
                    c.merge(Merge::new(id).public(public)).await.unwrap();
                }
                i += 1;
            }
        })
    };
    let (listed, revisions) = list_all(&mut c, filter, &[3]).await.unwrap();
    stop.store(true, Atomic::SeqCst);
    writer.await.unwrap();
    assert!(listed.iter().all(matches), "{filter}: {listed:?}");

    // Changes made after the listing's last response, each to a record in
    // the result before or after it.
    let mut later = Vec::new();
    for id in ids.iter().step_by(3) {
        let public = json!({"late": true, "odd": true});
        let record = c.merge(Merge::new(id).public(public)).await.unwrap();
        later.push(record.revision);
    }
    c.delete(Delete::new(&ids[3])).await.unwrap();
    later.push(c.get(Get::new(&ids[3])).await.unwrap().revision);
    let public = json!({"last": true, "odd": true});
    let last = c
        .merge(Merge::new(&ids[2]).public(public))
        .await
        .unwrap()
        .revision;
    later.push(last);

    let newest = newest_revision(&s).await;
    assert!(
        revisions.iter().all(|r| *r <= newest),
        "page revisions {revisions:?} beyond the newest revision {newest}"
    );
    let from = revisions.iter().min().unwrap() + 1;
    let mut state: BTreeMap<String, Record> =
        listed.into_iter().map(|r| (r.id.clone(), r)).collect();
    let request = WatchFrom {
        start_revision: from,
        filter: filter.into(),
    };
    let mut changes = c.watch_from(request).await.unwrap();
    let mut delivered = Vec::new();
    while delivered.last() != Some(&last) {
        let change = changes.next().await;
        assert!(change.revision >= from, "{change:?} before {from}");
        assert!(
            delivered.last().is_none_or(|r| *r < change.revision),
            "out of order: {change:?} after {delivered:?}"
        );
        assert!(
            matches(&change.before) || matches(&change.after),
            "{filter}: {change:?}"
        );
        delivered.push(change.revision);
        apply(&mut state, change);
    }
    for revision in later {
        assert!(
            delivered.contains(&revision),
            "the change at {revision} after the listing was not delivered"
        );
    }
    state.retain(|_, r| matches(r));
    let replayed: Vec<Record> = state.into_values().collect();
    let (now, _) = list_all(&mut c, filter, &[1000]).await.unwrap();
    assert_eq!(
        replayed, now,
        "{filter}: listing + watch = the current result"
    );
}

async fn list_then_watch_has_no_gap(backend: Backend, kind: Kind) {
    list_then_watch(backend, kind, "").await
}

async fn list_then_watch_of_a_query_has_no_gap(backend: Backend, kind: Kind) {
    list_then_watch(backend, kind, "public_metadata.odd = true").await
}

kind_tests!(
    list_selects_what_the_filter_selects,
    page_sizes_and_tokens,
    paging_is_stable_under_writes_and_deletes,
    bad_filters_are_refused_with_their_column,
    only_backend_callers_list,
    list_then_watch_has_no_gap,
    list_then_watch_of_a_query_has_no_gap,
);

backend_tests!(page_size_is_capped_at_1000);
