//! One test source for both kinds. [`Kind`] names users or organizations;
//! [`KindClient`] calls either generated client with kind-neutral requests
//! and returns kind-neutral [`Record`]s. Every message is built and read
//! field by field (no `..Default::default()`), so a field added to the proto
//! fails to compile here instead of going unnoticed.
//!
//! Organizations have no `unsafe_metadata`: a request that sets it for an
//! organization is a mistake in the test and panics, and a record of an
//! organization has `unsafe_: None`. [`Kind::users_only`] writes what only
//! users have, in requests and in expected values alike.

use metadata_service::model::Field;
use metadata_service::proto::v1::organization_metadata_service_client::OrganizationMetadataServiceClient;
use metadata_service::proto::v1::user_metadata_service_client::UserMetadataServiceClient;
use metadata_service::proto::v1::*;
use prost_types::{Struct, Timestamp, Value};
use serde_json::Value as Json;
use tonic::transport::Channel;
use tonic::{IntoRequest, Request, Status, Streaming};

use crate::common::json::{json, structure, value};
use crate::harness::TestServer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    User,
    Organization,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::User, Kind::Organization];

    /// The request and response field that names the record, as error
    /// messages name it.
    pub fn id_field(self) -> &'static str {
        match self {
            Kind::User => "user_id",
            Kind::Organization => "organization_id",
        }
    }

    /// The metadata fields records of this kind have.
    pub fn fields(self) -> &'static [Field] {
        match self {
            Kind::User => &[Field::Public, Field::Private, Field::Unsafe],
            Kind::Organization => &[Field::Public, Field::Private],
        }
    }

    /// The other kind: its records live in a namespace of their own.
    pub fn other(self) -> Kind {
        match self {
            Kind::User => Kind::Organization,
            Kind::Organization => Kind::User,
        }
    }

    /// `Some(x)` for users, `None` for organizations: for what only users
    /// have (`unsafe_metadata`), in a request or in an expected value.
    pub fn users_only<T>(self, x: T) -> Option<T> {
        (self == Kind::User).then_some(x)
    }

    /// A client of this kind's service on the test server.
    pub fn client(self, s: &TestServer) -> KindClient {
        match self {
            Kind::User => KindClient::User(s.users.clone()),
            Kind::Organization => KindClient::Organization(s.orgs.clone()),
        }
    }
}

/// A record of either kind, as Get, Merge and Replace return it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub id: String,
    pub public: Option<Value>,
    pub private: Option<Value>,
    /// Always None for organizations.
    pub unsafe_: Option<Value>,
    pub version: u64,
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
    pub revision: u64,
}

impl Record {
    /// (public, private, unsafe) as JSON; unsafe is None for organizations.
    /// Panics on a field the service did not set (it always sets them).
    pub fn fields(&self) -> (Json, Json, Option<Json>) {
        let set = |v: &Option<Value>| json(v.as_ref().expect("field is always set"));
        let unsafe_ = match self.kind {
            Kind::User => Some(set(&self.unsafe_)),
            Kind::Organization => None,
        };
        (set(&self.public), set(&self.private), unsafe_)
    }

    /// The value of `field` as returned: None when the response leaves it
    /// out (a caller that may not see it), and for `unsafe` on an
    /// organization.
    pub fn field(&self, field: Field) -> Option<&Value> {
        match field {
            Field::Public => self.public.as_ref(),
            Field::Private => self.private.as_ref(),
            Field::Unsafe => self.unsafe_.as_ref(),
        }
    }
}

impl From<UserMetadata> for Record {
    fn from(m: UserMetadata) -> Record {
        let UserMetadata {
            user_id,
            public_metadata,
            private_metadata,
            unsafe_metadata,
            version,
            created_at,
            updated_at,
            revision,
        } = m;
        Record {
            kind: Kind::User,
            id: user_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: unsafe_metadata,
            version,
            created_at,
            updated_at,
            revision,
        }
    }
}

impl From<OrganizationMetadata> for Record {
    fn from(m: OrganizationMetadata) -> Record {
        let OrganizationMetadata {
            organization_id,
            public_metadata,
            private_metadata,
            version,
            created_at,
            updated_at,
            revision,
        } = m;
        Record {
            kind: Kind::Organization,
            id: organization_id,
            public: public_metadata,
            private: private_metadata,
            unsafe_: None,
            version,
            created_at,
            updated_at,
            revision,
        }
    }
}

/// Get of either kind, of the record now or as of a revision.
#[derive(Clone, Debug)]
pub struct Get {
    pub id: String,
    pub revision: Option<u64>,
}

impl Get {
    pub fn new(id: &str) -> Get {
        Get {
            id: id.into(),
            revision: None,
        }
    }

    pub fn at(id: &str, revision: u64) -> Get {
        Get {
            id: id.into(),
            revision: Some(revision),
        }
    }
}

/// ListHistory of either kind.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub id: String,
    pub page_size: i32,
    pub page_token: String,
    pub oldest_first: bool,
}

impl History {
    /// The first page of `id`'s history, newest first, 50 events.
    pub fn of(id: &str) -> History {
        History {
            id: id.into(),
            ..Default::default()
        }
    }
}

/// A page of ListHistory.
#[derive(Clone, Debug)]
pub struct HistoryPage {
    pub events: Vec<Event>,
    pub next_page_token: String,
    pub oldest_revision: u64,
}

/// Restore of either kind.
#[derive(Clone, Debug)]
pub struct Restore {
    pub id: String,
    pub revision: u64,
    pub expected_version: Option<u64>,
}

/// An event of either kind, as Watch and ListHistory send it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub revision: u64,
    pub change_type: ChangeType,
    pub id: String,
    pub changed_fields: Vec<String>,
    pub before: Record,
    pub after: Record,
    pub actor: String,
    pub trace_id: String,
    pub transaction_id: String,
}

impl From<UserMetadataEvent> for Event {
    fn from(e: UserMetadataEvent) -> Event {
        let UserMetadataEvent {
            revision,
            change_type,
            user_id,
            changed_fields,
            before,
            after,
            committed_at: _,
            actor,
            trace_id,
            transaction_id,
        } = e;
        Event {
            revision,
            change_type: ChangeType::try_from(change_type).expect("a known change type"),
            id: user_id,
            changed_fields,
            before: before.expect("before").into(),
            after: after.expect("after").into(),
            actor,
            trace_id,
            transaction_id,
        }
    }
}

impl From<OrganizationMetadataEvent> for Event {
    fn from(e: OrganizationMetadataEvent) -> Event {
        let OrganizationMetadataEvent {
            revision,
            change_type,
            organization_id,
            changed_fields,
            before,
            after,
            committed_at: _,
            actor,
            trace_id,
            transaction_id,
        } = e;
        Event {
            revision,
            change_type: ChangeType::try_from(change_type).expect("a known change type"),
            id: organization_id,
            changed_fields,
            before: before.expect("before").into(),
            after: after.expect("after").into(),
            actor,
            trace_id,
            transaction_id,
        }
    }
}

/// Merge of either kind: each field a patch, None leaves it untouched.
#[derive(Clone, Debug)]
pub struct Merge {
    pub id: String,
    pub public: Option<Struct>,
    pub private: Option<Struct>,
    /// Users only.
    pub unsafe_: Option<Struct>,
    pub expected_version: Option<u64>,
}

impl Merge {
    pub fn new(id: &str) -> Merge {
        Merge {
            id: id.into(),
            public: None,
            private: None,
            unsafe_: None,
            expected_version: None,
        }
    }

    /// Sets `field` to `patch` (as it is: it need not be valid).
    pub fn patch(mut self, field: Field, patch: Struct) -> Merge {
        *match field {
            Field::Public => &mut self.public,
            Field::Private => &mut self.private,
            Field::Unsafe => &mut self.unsafe_,
        } = Some(patch);
        self
    }

    /// Sets `field` to the patch `json` (an object), if given.
    pub fn json(self, field: Field, json: impl Into<Option<Json>>) -> Merge {
        match json.into() {
            Some(json) => self.patch(field, structure(&json)),
            None => self,
        }
    }

    pub fn public(self, json: impl Into<Option<Json>>) -> Merge {
        self.json(Field::Public, json)
    }

    pub fn private(self, json: impl Into<Option<Json>>) -> Merge {
        self.json(Field::Private, json)
    }

    pub fn unsafe_(self, json: impl Into<Option<Json>>) -> Merge {
        self.json(Field::Unsafe, json)
    }

    pub fn expected_version(mut self, version: u64) -> Merge {
        self.expected_version = Some(version);
        self
    }
}

/// Replace of either kind: each field a whole value (an object or null),
/// None leaves it untouched.
#[derive(Clone, Debug)]
pub struct Replace {
    pub id: String,
    pub public: Option<Value>,
    pub private: Option<Value>,
    /// Users only.
    pub unsafe_: Option<Value>,
    pub expected_version: Option<u64>,
}

impl Replace {
    pub fn new(id: &str) -> Replace {
        Replace {
            id: id.into(),
            public: None,
            private: None,
            unsafe_: None,
            expected_version: None,
        }
    }

    /// Sets `field` to `value` (as it is: it need not be valid).
    pub fn value(mut self, field: Field, value: Value) -> Replace {
        *match field {
            Field::Public => &mut self.public,
            Field::Private => &mut self.private,
            Field::Unsafe => &mut self.unsafe_,
        } = Some(value);
        self
    }

    /// Sets `field` to `json`, if given.
    pub fn json(self, field: Field, json: impl Into<Option<Json>>) -> Replace {
        match json.into() {
            Some(json) => self.value(field, value(&json)),
            None => self,
        }
    }

    pub fn public(self, json: impl Into<Option<Json>>) -> Replace {
        self.json(Field::Public, json)
    }

    pub fn private(self, json: impl Into<Option<Json>>) -> Replace {
        self.json(Field::Private, json)
    }

    pub fn unsafe_(self, json: impl Into<Option<Json>>) -> Replace {
        self.json(Field::Unsafe, json)
    }

    pub fn expected_version(mut self, version: u64) -> Replace {
        self.expected_version = Some(version);
        self
    }
}

/// Patch of either kind: each field a JSON Patch (a list of operations).
#[derive(Clone, Debug)]
pub struct Patch {
    pub id: String,
    pub public: Option<prost_types::ListValue>,
    pub private: Option<prost_types::ListValue>,
    pub unsafe_: Option<prost_types::ListValue>,
    pub expected_version: Option<u64>,
    pub request_id: String,
}

impl Patch {
    pub fn new(id: &str) -> Patch {
        Patch {
            id: id.into(),
            public: None,
            private: None,
            unsafe_: None,
            expected_version: None,
            request_id: String::new(),
        }
    }

    /// `field`'s patch, from its JSON (which must be a list).
    pub fn ops(mut self, field: Field, ops: Json) -> Patch {
        let Some(prost_types::value::Kind::ListValue(list)) = value(&ops).kind else {
            panic!("a JSON Patch is a list: {ops}");
        };
        match field {
            Field::Public => self.public = Some(list),
            Field::Private => self.private = Some(list),
            Field::Unsafe => self.unsafe_ = Some(list),
        }
        self
    }

    pub fn expected_version(mut self, version: u64) -> Patch {
        self.expected_version = Some(version);
        self
    }
}

/// Delete of either kind.
#[derive(Clone, Debug)]
pub struct Delete {
    pub id: String,
    pub expected_version: Option<u64>,
}

impl Delete {
    pub fn new(id: &str) -> Delete {
        Delete {
            id: id.into(),
            expected_version: None,
        }
    }

    pub fn expected_version(mut self, version: u64) -> Delete {
        self.expected_version = Some(version);
        self
    }
}

/// Watch of either kind, from the newest revision, of every id.
#[derive(Clone, Debug, Default)]
pub struct Watch;

fn no_unsafe<T>(unsafe_: Option<T>) {
    assert!(
        unsafe_.is_none(),
        "organizations have no unsafe_metadata: this request is a mistake in the test"
    );
}

/// The generated client of either kind, called with kind-neutral requests.
/// A request may carry metadata and a deadline: pass a [`Request`].
#[derive(Clone)]
pub enum KindClient {
    User(UserMetadataServiceClient<Channel>),
    Organization(OrganizationMetadataServiceClient<Channel>),
}

impl KindClient {
    pub async fn get(&mut self, request: impl IntoRequest<Get>) -> Result<Record, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|Get { id, revision }| GetUserMetadataRequest {
                    user_id: id,
                    revision,
                });
                Ok(c.get(request).await?.into_inner().into())
            }
            KindClient::Organization(c) => {
                let request = request.map(|Get { id, revision }| GetOrganizationMetadataRequest {
                    organization_id: id,
                    revision,
                });
                Ok(c.get(request).await?.into_inner().into())
            }
        }
    }

    pub async fn merge(&mut self, request: impl IntoRequest<Merge>) -> Result<Record, Status> {
        let request: Request<Merge> = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|m| {
                    let Merge {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                    } = m;
                    MergeUserMetadataRequest {
                        user_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        unsafe_metadata: unsafe_,
                        expected_version,
                    }
                });
                Ok(c.merge(request).await?.into_inner().into())
            }
            KindClient::Organization(c) => {
                let request = request.map(|m| {
                    let Merge {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                    } = m;
                    no_unsafe(unsafe_);
                    MergeOrganizationMetadataRequest {
                        organization_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        expected_version,
                    }
                });
                Ok(c.merge(request).await?.into_inner().into())
            }
        }
    }

    pub async fn patch(&mut self, request: impl IntoRequest<Patch>) -> Result<Record, Status> {
        let request: Request<Patch> = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|p| {
                    let Patch {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                        request_id,
                    } = p;
                    PatchUserMetadataRequest {
                        user_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        unsafe_metadata: unsafe_,
                        expected_version,
                        request_id,
                    }
                });
                Ok(c.patch(request).await?.into_inner().into())
            }
            KindClient::Organization(c) => {
                let request = request.map(|p| {
                    let Patch {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                        request_id,
                    } = p;
                    no_unsafe(unsafe_);
                    PatchOrganizationMetadataRequest {
                        organization_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        expected_version,
                        request_id,
                    }
                });
                Ok(c.patch(request).await?.into_inner().into())
            }
        }
    }

    pub async fn replace(&mut self, request: impl IntoRequest<Replace>) -> Result<Record, Status> {
        let request: Request<Replace> = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|r| {
                    let Replace {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                    } = r;
                    ReplaceUserMetadataRequest {
                        user_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        unsafe_metadata: unsafe_,
                        expected_version,
                    }
                });
                Ok(c.replace(request).await?.into_inner().into())
            }
            KindClient::Organization(c) => {
                let request = request.map(|r| {
                    let Replace {
                        id,
                        public,
                        private,
                        unsafe_,
                        expected_version,
                    } = r;
                    no_unsafe(unsafe_);
                    ReplaceOrganizationMetadataRequest {
                        organization_id: id,
                        public_metadata: public,
                        private_metadata: private,
                        expected_version,
                    }
                });
                Ok(c.replace(request).await?.into_inner().into())
            }
        }
    }

    /// Whether the record existed.
    pub async fn delete(&mut self, request: impl IntoRequest<Delete>) -> Result<bool, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(
                    |Delete {
                         id,
                         expected_version,
                     }| {
                        DeleteUserMetadataRequest {
                            user_id: id,
                            expected_version,
                        }
                    },
                );
                let DeleteUserMetadataResponse { existed } = c.delete(request).await?.into_inner();
                Ok(existed)
            }
            KindClient::Organization(c) => {
                let request = request.map(
                    |Delete {
                         id,
                         expected_version,
                     }| {
                        DeleteOrganizationMetadataRequest {
                            organization_id: id,
                            expected_version,
                        }
                    },
                );
                let DeleteOrganizationMetadataResponse { existed } =
                    c.delete(request).await?.into_inner();
                Ok(existed)
            }
        }
    }

    pub async fn history(
        &mut self,
        request: impl IntoRequest<History>,
    ) -> Result<HistoryPage, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|h| {
                    let History {
                        id,
                        page_size,
                        page_token,
                        oldest_first,
                    } = h;
                    ListUserMetadataHistoryRequest {
                        user_id: id,
                        page_size,
                        page_token,
                        oldest_first,
                    }
                });
                let ListUserMetadataHistoryResponse {
                    events,
                    next_page_token,
                    oldest_revision,
                } = c.list_history(request).await?.into_inner();
                Ok(HistoryPage {
                    events: events.into_iter().map(Into::into).collect(),
                    next_page_token,
                    oldest_revision,
                })
            }
            KindClient::Organization(c) => {
                let request = request.map(|h| {
                    let History {
                        id,
                        page_size,
                        page_token,
                        oldest_first,
                    } = h;
                    ListOrganizationMetadataHistoryRequest {
                        organization_id: id,
                        page_size,
                        page_token,
                        oldest_first,
                    }
                });
                let ListOrganizationMetadataHistoryResponse {
                    events,
                    next_page_token,
                    oldest_revision,
                } = c.list_history(request).await?.into_inner();
                Ok(HistoryPage {
                    events: events.into_iter().map(Into::into).collect(),
                    next_page_token,
                    oldest_revision,
                })
            }
        }
    }

    pub async fn restore(&mut self, request: impl IntoRequest<Restore>) -> Result<Record, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(
                    |Restore {
                         id,
                         revision,
                         expected_version,
                     }| RestoreUserMetadataRequest {
                        user_id: id,
                        revision,
                        expected_version,
                    },
                );
                Ok(c.restore(request).await?.into_inner().into())
            }
            KindClient::Organization(c) => {
                let request = request.map(
                    |Restore {
                         id,
                         revision,
                         expected_version,
                     }| RestoreOrganizationMetadataRequest {
                        organization_id: id,
                        revision,
                        expected_version,
                    },
                );
                Ok(c.restore(request).await?.into_inner().into())
            }
        }
    }

    pub async fn watch(&mut self, request: impl IntoRequest<Watch>) -> Result<WatchStream, Status> {
        let request = request.into_request();
        match self {
            KindClient::User(c) => {
                let request = request.map(|Watch| WatchUserMetadataRequest {
                    start_revision: 0,
                    user_ids: Vec::new(),
                    progress_notify: false,
                    filter: String::new(),
                });
                Ok(WatchStream::User(c.watch(request).await?.into_inner()))
            }
            KindClient::Organization(c) => {
                let request = request.map(|Watch| WatchOrganizationMetadataRequest {
                    start_revision: 0,
                    organization_ids: Vec::new(),
                    progress_notify: false,
                    filter: String::new(),
                });
                Ok(WatchStream::Organization(
                    c.watch(request).await?.into_inner(),
                ))
            }
        }
    }
}

/// A Watch stream of either kind.
pub enum WatchStream {
    User(Streaming<WatchUserMetadataResponse>),
    Organization(Streaming<WatchOrganizationMetadataResponse>),
}

/// What a Watch stream sends, by revision.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchMessage {
    Progress(u64),
    Event(u64),
}

impl WatchStream {
    /// The next event, past progress messages; None when the stream ended.
    pub async fn event(&mut self) -> Result<Option<Event>, Status> {
        use watch_organization_metadata_response::Response as Org;
        use watch_user_metadata_response::Response as User;
        loop {
            let event = match self {
                WatchStream::User(s) => match s.message().await? {
                    None => return Ok(None),
                    Some(m) => match m.response.expect("response set") {
                        User::Progress(_) => continue,
                        User::Event(e) => Event::from(e),
                    },
                },
                WatchStream::Organization(s) => match s.message().await? {
                    None => return Ok(None),
                    Some(m) => match m.response.expect("response set") {
                        Org::Progress(_) => continue,
                        Org::Event(e) => Event::from(e),
                    },
                },
            };
            return Ok(Some(event));
        }
    }

    /// The next message; None when the stream ended.
    pub async fn message(&mut self) -> Result<Option<WatchMessage>, Status> {
        use watch_organization_metadata_response::Response as Org;
        use watch_user_metadata_response::Response as User;
        Ok(match self {
            WatchStream::User(s) => {
                s.message()
                    .await?
                    .map(|m| match m.response.expect("response set") {
                        User::Progress(p) => WatchMessage::Progress(p.revision),
                        User::Event(e) => WatchMessage::Event(e.revision),
                    })
            }
            WatchStream::Organization(s) => {
                s.message()
                    .await?
                    .map(|m| match m.response.expect("response set") {
                        Org::Progress(p) => WatchMessage::Progress(p.revision),
                        Org::Event(e) => WatchMessage::Event(e.revision),
                    })
            }
        })
    }
}

/// Declares each listed `async fn name(backend: Backend, kind: Kind)` as four
/// tests, `users::sqlite::name`, `users::postgres::name`,
/// `organizations::sqlite::name` and `organizations::postgres::name`; and
/// each `async fn name(kind: Kind)` after `kind_only:` as
/// `users::name` and `organizations::name`.
macro_rules! kind_tests {
    ($($name:ident),* $(,)? $(; kind_only: $($only:ident),* $(,)?)?) => {
        kind_tests!(@kind users, User; $($name),*; $($($only),*)?);
        kind_tests!(@kind organizations, Organization; $($name),*; $($($only),*)?);
    };
    (@kind $module:ident, $kind:ident; $($name:ident),*; $($only:ident),*) => {
        mod $module {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name(
                            $crate::common::Backend::Sqlite,
                            $crate::kinds::Kind::$kind,
                        )
                        .await
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::super::$name(
                            $crate::common::Backend::Postgres,
                            $crate::kinds::Kind::$kind,
                        )
                        .await
                    }
                )*
            }
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $only() {
                    super::$only($crate::kinds::Kind::$kind).await
                }
            )*
        }
    };
}
