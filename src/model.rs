//! Domain types shared by every layer: what is stored and what a write asks for.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// Which kind of owner the metadata belongs to. Both kinds share one storage
/// table and one code path; organizations simply never carry unsafe metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    User,
    Organization,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Organization => "organization",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "user" => Some(Kind::User),
            "organization" => Some(Kind::Organization),
            _ => None,
        }
    }

    /// The metadata fields records of this kind have.
    pub const fn fields(self) -> &'static [Field] {
        match self {
            Kind::User => &Field::ALL,
            Kind::Organization => &[Field::Public, Field::Private],
        }
    }

    /// Name of the id field in requests, used in error messages.
    pub const fn id_field(self) -> &'static str {
        match self {
            Kind::User => "user_id",
            Kind::Organization => "organization_id",
        }
    }

    /// Name of the Watch filter's id list, used in error messages.
    pub const fn ids_field(self) -> &'static str {
        match self {
            Kind::User => "user_ids",
            Kind::Organization => "organization_ids",
        }
    }
}

/// One top-level metadata field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    Public,
    Private,
    Unsafe,
}

impl Field {
    pub const ALL: [Field; 3] = [Field::Public, Field::Private, Field::Unsafe];

    pub const fn name(self) -> &'static str {
        match self {
            Field::Public => "public_metadata",
            Field::Private => "private_metadata",
            Field::Unsafe => "unsafe_metadata",
        }
    }
}

/// The three metadata values of one id. Each is an object or JSON null.
#[derive(Clone, Debug, PartialEq)]
pub struct Fields {
    pub public: Value,
    pub private: Value,
    pub unsafe_: Value,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            public: empty_object(),
            private: empty_object(),
            unsafe_: empty_object(),
        }
    }
}

impl Fields {
    pub fn get(&self, field: Field) -> &Value {
        match field {
            Field::Public => &self.public,
            Field::Private => &self.private,
            Field::Unsafe => &self.unsafe_,
        }
    }

    pub fn get_mut(&mut self, field: Field) -> &mut Value {
        match field {
            Field::Public => &mut self.public,
            Field::Private => &mut self.private,
            Field::Unsafe => &mut self.unsafe_,
        }
    }
}

pub fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// The stored state of one id. `version == 0` means nothing is stored, and
/// then the timestamps are `None` and every field is `{}` (the revision may
/// still name the delete that emptied it).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub id: String,
    pub fields: Fields,
    pub version: u64,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Revision of the last change to this id, 0 if none. Kept after a
    /// delete, so a reader can resume watching right after it.
    pub revision: u64,
}

impl Record {
    /// What an id that was never written (or was deleted) looks like.
    pub fn empty(kind: Kind, id: String) -> Self {
        Record {
            kind,
            id,
            fields: Fields::default(),
            version: 0,
            created_at: None,
            updated_at: None,
            revision: 0,
        }
    }
}

/// How the provided values are combined with the stored ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// RFC 7396 deep merge: null removes a key at any level.
    Merge,
    /// The provided value overwrites the field in full.
    Replace,
    /// RFC 6902 JSON Patch: each provided value is a list of operations,
    /// `test` ones being preconditions on paths.
    Patch,
}

impl Mode {
    /// The RPC that asks for this mode, for logs.
    pub const fn rpc(self) -> &'static str {
        match self {
            Mode::Merge => "Merge",
            Mode::Replace => "Replace",
            Mode::Patch => "Patch",
        }
    }
}

/// A Merge or Replace request after conversion from protobuf.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteCommand {
    pub kind: Kind,
    pub id: String,
    pub mode: Mode,
    /// Only the provided fields; omitted fields are untouched.
    pub values: Vec<(Field, Value)>,
    pub expected_version: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteCommand {
    pub kind: Kind,
    pub id: String,
    pub expected_version: Option<u64>,
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum TxnCommand {
    /// A Merge, Replace or Patch.
    Write(WriteCommand),
    Delete(DeleteCommand),
}

impl TxnCommand {
    pub fn target(&self) -> (Kind, &str) {
        match self {
            TxnCommand::Write(command) => (command.kind, &command.id),
            TxnCommand::Delete(command) => (command.kind, &command.id),
        }
    }
}

/// A Commit request after conversion from protobuf: each operation with
/// where it is in the request (`operations[2].merge_user`), which errors
/// about it name.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitCommand {
    pub operations: Vec<(String, TxnCommand)>,
    /// Empty when the caller gave none.
    pub request_id: String,
    /// A digest of the request as sent (without its request id) and of
    /// its caller: a retry must match it.
    pub fingerprint: String,
}

/// A Restore request after conversion from protobuf: put back the record's
/// fields as they were right after `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreCommand {
    pub kind: Kind,
    pub id: String,
    pub revision: u64,
    pub expected_version: Option<u64>,
}

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
    pub origin: Origin,
}

/// Who made a change, as its event records it. Never a credential: an API
/// key by its name, a frontend token by its `sub`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// `key:<api key name>`, `frontend:<sub>`, or empty (a server without
    /// credentials, or an event written before actors were recorded).
    pub actor: String,
    /// The W3C trace id of the call, empty when it carried none.
    pub trace_id: String,
    /// The Commit that made it, empty for a single write.
    pub transaction_id: String,
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
