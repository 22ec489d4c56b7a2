//! Why a request is refused, and where: the problem and the path of the
//! offending value. Its own module because every layer that checks input
//! reports through it (JSON values, ids, filters, page tokens, schemas),
//! and none of them should depend on another to do so.

use std::fmt;

use crate::reason::Reason;

/// Why a request or its result is refused. Always reported as
/// INVALID_ARGUMENT with the path of the offending value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must not be empty")]
    EmptyId,
    #[error("is {len} bytes long, the limit is {limit}")]
    IdTooLong { len: usize, limit: usize },
    #[error("must be printable ASCII without spaces (byte {position} is not)")]
    IdCharacter { position: usize },
    #[error("NaN and infinite numbers are not valid JSON")]
    NonFiniteNumber,
    #[error("a value must be set (null, number, string, bool, struct or list)")]
    MissingValue,
    #[error("must be a struct or null to replace a field, not {found}")]
    NotAnObject { found: &'static str },
    #[error("key contains U+0000, which cannot be stored")]
    NulInKey,
    #[error("string contains U+0000, which cannot be stored")]
    NulInString,
    #[error("has {count} ids, the limit is {limit}")]
    TooManyIds { count: usize, limit: usize },
    #[error("has {count} distinct ids, the limit is {limit}")]
    TooManyDistinctIds { count: usize, limit: usize },
    #[error("must hold at least one id")]
    NoIds,
    #[error("{0}")]
    Filter(FilterError),
    #[error("must not be negative")]
    NegativePageSize,
    #[error("must be set")]
    Unspecified,
    #[error("{0}")]
    InvalidPatch(String),
    #[error("must hold at least one operation")]
    NoOperations,
    #[error("has {count} operations, the limit is {limit}")]
    TooManyOperations { count: usize, limit: usize },
    #[error(
        "writes the same record as operations[{first}]: a transaction names each record once \
         (combine the two changes)"
    )]
    DuplicateRecord { first: usize },
    #[error(
        "was used by a different request (within the retry window): make a new id for each \
         change, and reuse it only to retry that change"
    )]
    RequestIdReused,
    #[error("is not read inside a transaction: set the CommitRequest's request_id instead")]
    RequestIdInOperation,
    #[error("must be a UUID (e.g. 9f1c7e52-4b7a-4f0e-9d36-2a5c8b1e7d40), made once per change")]
    InvalidRequestId,
    #[error(
        "test of {pointer} failed: the stored value differs; nothing was written (read it again, then retry)"
    )]
    PatchTestFailed { operation: usize, pointer: String },
    #[error(
        "must be set: the revision whose state to put back (to remove the record, call Delete)"
    )]
    RevisionUnset,
    #[error("would be answered with {bytes} bytes, the limit is {limit}; ask for fewer ids")]
    AnswerTooLarge { bytes: usize, limit: usize },
    #[error("is not a field of {kind} metadata (organizations have public and private only)")]
    NoSuchField { kind: &'static str },
    #[error("{0}")]
    Schema(String),
    #[error("{0}")]
    PageToken(&'static str),
    #[error("nesting depth {depth} exceeds the limit of {limit}")]
    TooDeep { depth: usize, limit: usize },
    #[error("is {bytes} bytes as compact JSON, the limit is {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("is larger than any revision can be (at most {limit})")]
    RevisionTooLarge { limit: u64 },
    /// A merge patch too large on its own, whatever is stored: `bytes` is
    /// the patch without its null members, which the result contains.
    #[error("would be at least {bytes} bytes as compact JSON, the limit is {limit}")]
    MergeTooLarge { bytes: usize, limit: usize },
    /// A webhook URL the service will not call, and why.
    #[error("{0}")]
    WebhookUrl(String),
    #[error("{name:?} is not an event type (one of {known})")]
    UnknownEventType { name: String, known: String },
    #[error("is {len} bytes long, the limit is {limit}")]
    TextTooLong { len: usize, limit: usize },
    #[error("{path:?} is not a field that can be updated (one of {known})")]
    UnknownMaskPath { path: String, known: &'static str },
    #[error("is {given}, the limit is {limit}")]
    DurationTooLong { given: String, limit: String },
}

impl Problem {
    /// Its stable code (see `crate::reason`).
    pub fn reason(&self) -> Reason {
        match self {
            Problem::EmptyId => Reason::EmptyId,
            Problem::IdTooLong { .. } => Reason::IdTooLong,
            Problem::IdCharacter { .. } => Reason::IdCharacter,
            Problem::NonFiniteNumber => Reason::NonFiniteNumber,
            Problem::MissingValue => Reason::MissingValue,
            Problem::NotAnObject { .. } => Reason::NotAnObject,
            Problem::NulInKey => Reason::NulInKey,
            Problem::NulInString => Reason::NulInString,
            Problem::TooManyIds { .. } => Reason::TooManyIds,
            Problem::TooManyDistinctIds { .. } => Reason::TooManyDistinctIds,
            Problem::NoIds => Reason::NoIds,
            Problem::Filter(_) => Reason::InvalidFilter,
            Problem::NegativePageSize => Reason::NegativePageSize,
            Problem::Unspecified | Problem::RevisionUnset => Reason::Unspecified,
            Problem::InvalidPatch(_) => Reason::InvalidPatch,
            Problem::NoOperations => Reason::NoOperations,
            Problem::TooManyOperations { .. } => Reason::TooManyOperations,
            Problem::DuplicateRecord { .. } => Reason::DuplicateRecord,
            Problem::RequestIdReused => Reason::RequestIdReused,
            Problem::RequestIdInOperation => Reason::RequestIdInOperation,
            Problem::InvalidRequestId => Reason::InvalidRequestId,
            Problem::PatchTestFailed { .. } => Reason::PatchTestFailed,
            Problem::AnswerTooLarge { .. } => Reason::AnswerTooLarge,
            Problem::NoSuchField { .. } => Reason::NoSuchField,
            Problem::Schema(_) => Reason::InvalidSchema,
            Problem::PageToken(_) => Reason::InvalidPageToken,
            Problem::TooDeep { .. } => Reason::TooDeep,
            Problem::TooLarge { .. } => Reason::TooLarge,
            Problem::RevisionTooLarge { .. } => Reason::RevisionTooLarge,
            Problem::MergeTooLarge { .. } => Reason::MergeTooLarge,
            Problem::WebhookUrl(_) => Reason::InvalidWebhookUrl,
            Problem::UnknownEventType { .. } => Reason::UnknownEventType,
            Problem::TextTooLong { .. } => Reason::TooLarge,
            Problem::UnknownMaskPath { .. } => Reason::InvalidUpdateMask,
            Problem::DurationTooLong { .. } => Reason::DurationTooLong,
        }
    }
}

/// Why a filter was refused, and where: `column` counts characters from 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at column {column}")]
pub struct FilterError {
    pub column: usize,
    pub message: String,
}

/// The location of a value inside a request, e.g. `public_metadata.a.b[2]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonPath(String);

impl JsonPath {
    pub fn root(name: &str) -> Self {
        JsonPath(name.to_owned())
    }

    pub fn key(&self, key: &str) -> Self {
        let plain = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if plain {
            JsonPath(format!("{}.{key}", self.0))
        } else {
            // Quote odd keys so the path stays unambiguous and printable.
            let quoted = serde_json::Value::String(key.to_owned()).to_string();
            JsonPath(format!("{}[{quoted}]", self.0))
        }
    }

    pub fn index(&self, index: usize) -> Self {
        JsonPath(format!("{}[{index}]", self.0))
    }

    /// This path inside the value at `prefix` (a path itself), e.g. a
    /// field's inside a transaction's operation.
    pub fn within(&self, prefix: &str) -> Self {
        match prefix {
            "" => self.clone(),
            prefix => JsonPath(format!("{prefix}.{}", self.0)),
        }
    }
}

/// One step of a path, collected while unwinding out of a failed walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

impl JsonPath {
    /// Builds `root` followed by `reversed` read back to front.
    pub(crate) fn from_reversed(root: &str, reversed: &[Segment]) -> Self {
        reversed
            .iter()
            .rev()
            .fold(JsonPath::root(root), |path, segment| match segment {
                Segment::Key(key) => path.key(key),
                Segment::Index(index) => path.index(*index),
            })
    }
}

/// A problem found somewhere inside a value, with the reversed path to it.
pub(crate) type TreeError = (Problem, Vec<Segment>);

/// Adds the step that led into a failed child while unwinding.
pub(crate) fn within(segment: impl FnOnce() -> Segment) -> impl FnOnce(TreeError) -> TreeError {
    move |(problem, mut segments)| {
        segments.push(segment());
        (problem, segments)
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ValidationError {
    pub path: JsonPath,
    pub problem: Problem,
}

impl ValidationError {
    pub fn new(path: JsonPath, problem: Problem) -> Self {
        ValidationError { path, problem }
    }
}
