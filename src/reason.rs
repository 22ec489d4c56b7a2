//! The stable reason codes of every refused or failed call: what a
//! caller's program matches on, where the status message is a sentence for
//! people that may be reworded. Every non-OK status the service returns
//! carries one in a `google.rpc.ErrorInfo` (domain [`DOMAIN`]), and an
//! invalid field's also in its `BadRequest.FieldViolation` (the mapping is
//! `service/error.rs`). README's "Error reasons" table lists each with its
//! status and metadata keys; a test holds the table and [`Reason::ALL`] to
//! each other, so the list cannot drift from what callers are told.

/// The `ErrorInfo.domain` of every reason.
pub const DOMAIN: &str = "metadata.v1";

/// Declares the reasons once: the enum, its codes and the list of all.
macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident => $code:literal, $status:ident;)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in the order of README's table.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The code as callers see it (UPPER_SNAKE).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => $code,)*
                }
            }

            /// The status code it always comes with.
            pub const fn code(self) -> tonic::Code {
                match self {
                    $(Reason::$name => tonic::Code::$status,)*
                }
            }
        }
    };
}

reasons! {
    // INVALID_ARGUMENT: a request field (its path in the FieldViolation).
    EmptyId => "EMPTY_ID", InvalidArgument;
    IdTooLong => "ID_TOO_LONG", InvalidArgument;
    IdCharacter => "ID_CHARACTER", InvalidArgument;
    NonFiniteNumber => "NON_FINITE_NUMBER", InvalidArgument;
    MissingValue => "MISSING_VALUE", InvalidArgument;
    NotAnObject => "NOT_AN_OBJECT", InvalidArgument;
    NulInKey => "NUL_IN_KEY", InvalidArgument;
    NulInString => "NUL_IN_STRING", InvalidArgument;
    TooManyIds => "TOO_MANY_IDS", InvalidArgument;
    TooManyDistinctIds => "TOO_MANY_DISTINCT_IDS", InvalidArgument;
    NoIds => "NO_IDS", InvalidArgument;
    InvalidFilter => "INVALID_FILTER", InvalidArgument;
    NegativePageSize => "NEGATIVE_PAGE_SIZE", InvalidArgument;
    Unspecified => "UNSPECIFIED", InvalidArgument;
    AnswerTooLarge => "ANSWER_TOO_LARGE", InvalidArgument;
    NoSuchField => "NO_SUCH_FIELD", InvalidArgument;
    InvalidSchema => "INVALID_SCHEMA", InvalidArgument;
    InvalidPageToken => "INVALID_PAGE_TOKEN", InvalidArgument;
    TooDeep => "TOO_DEEP", InvalidArgument;
    TooLarge => "TOO_LARGE", InvalidArgument;
    RevisionTooLarge => "REVISION_TOO_LARGE", InvalidArgument;
    MergeTooLarge => "MERGE_TOO_LARGE", InvalidArgument;
    /// A JSON Patch operation that is malformed or names no location.
    InvalidPatch => "INVALID_PATCH", InvalidArgument;
    /// A Commit without operations.
    NoOperations => "NO_OPERATIONS", InvalidArgument;
    /// A Commit over its operation limit.
    TooManyOperations => "TOO_MANY_OPERATIONS", InvalidArgument;
    /// A Commit that names one record in two operations.
    DuplicateRecord => "DUPLICATE_RECORD", InvalidArgument;
    /// A request id already used, within the retry window, by a different
    /// request.
    RequestIdReused => "REQUEST_ID_REUSED", InvalidArgument;
    /// A request id that is not a UUID.
    InvalidRequestId => "INVALID_REQUEST_ID", InvalidArgument;
    /// A Patch inside a Commit with a request id of its own.
    RequestIdInOperation => "REQUEST_ID_IN_OPERATION", InvalidArgument;
    /// A write whose result breaks its field's schema: one violation per
    /// schema error, `field/pointer`.
    SchemaViolation => "SCHEMA_VIOLATION", InvalidArgument;
    /// A webhook URL that is not https (or http to an allowed network),
    /// carries credentials, or names a refused address.
    InvalidWebhookUrl => "INVALID_WEBHOOK_URL", InvalidArgument;
    /// A webhook event type that does not exist.
    UnknownEventType => "UNKNOWN_EVENT_TYPE", InvalidArgument;
    /// An UpdateWebhook mask path that names no updatable field.
    InvalidUpdateMask => "INVALID_UPDATE_MASK", InvalidArgument;
    /// A duration over its limit (a secret's grace period).
    DurationTooLong => "DURATION_TOO_LONG", InvalidArgument;
    // OUT_OF_RANGE
    /// A read at a revision the log has not reached yet.
    RevisionNotReached => "REVISION_NOT_REACHED", OutOfRange;
    // ABORTED
    VersionMismatch => "VERSION_MISMATCH", Aborted;
    /// A JSON Patch `test` operation failed: the caller re-reads and retries.
    PatchTestFailed => "PATCH_TEST_FAILED", Aborted;
    // NOT_FOUND
    /// No webhook endpoint has the id.
    WebhookNotFound => "WEBHOOK_NOT_FOUND", NotFound;
    // FAILED_PRECONDITION
    RevisionCompacted => "REVISION_COMPACTED", FailedPrecondition;
    NonconformingDocuments => "NONCONFORMING_DOCUMENTS", FailedPrecondition;
    ReadOnlyDatabase => "READ_ONLY_DATABASE", FailedPrecondition;
    // RESOURCE_EXHAUSTED
    TooManyRequests => "TOO_MANY_REQUESTS", ResourceExhausted;
    TooManyStreams => "TOO_MANY_STREAMS", ResourceExhausted;
    // PERMISSION_DENIED
    NotOwnRecord => "NOT_OWN_RECORD", PermissionDenied;
    FieldNotWritable => "FIELD_NOT_WRITABLE", PermissionDenied;
    /// A Watch filter over a field the caller may not read.
    FieldNotReadable => "FIELD_NOT_READABLE", PermissionDenied;
    BackendOnly => "BACKEND_ONLY", PermissionDenied;
    // UNAUTHENTICATED
    MissingCredentials => "MISSING_CREDENTIALS", Unauthenticated;
    MalformedAuthorization => "MALFORMED_AUTHORIZATION", Unauthenticated;
    UnknownApiKey => "UNKNOWN_API_KEY", Unauthenticated;
    InvalidToken => "INVALID_TOKEN", Unauthenticated;
    TokenExpired => "TOKEN_EXPIRED", Unauthenticated;
    // UNAVAILABLE
    DatabaseUnavailable => "DATABASE_UNAVAILABLE", Unavailable;
    /// The write's connection failed after it was sent, and the server
    /// made sure that it did not commit.
    WriteNotApplied => "WRITE_NOT_APPLIED", Unavailable;
    DatabaseTimeout => "DATABASE_TIMEOUT", Unavailable;
    ShuttingDown => "SHUTTING_DOWN", Unavailable;
    // DEADLINE_EXCEEDED
    DeadlineExpired => "DEADLINE_EXPIRED", DeadlineExceeded;
    /// The write may have been applied: read before retrying.
    WriteInDoubt => "WRITE_IN_DOUBT", DeadlineExceeded;
    // INTERNAL
    Internal => "INTERNAL", Internal;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_upper_snake_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            let code = reason.as_str();
            assert!(
                code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{code}"
            );
            assert!(seen.insert(code), "{code} twice");
        }
    }
}
