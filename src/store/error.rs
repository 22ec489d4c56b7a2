use sea_orm::{DbErr, RuntimeErr, sqlx};

use crate::validation::ValidationError;

/// What can go wrong in a storage call; mapped to a gRPC status in
/// `service::error` and nowhere else.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("expected version {expected}, but the current version is {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Transient: the database could not be reached, is locked or is
    /// overloaded. `reason` is safe to show a caller; `detail` is for logs.
    #[error("{reason}: {detail}")]
    Unavailable {
        reason: &'static str,
        detail: String,
    },
    /// A write whose connection failed after it was sent, settled as
    /// certainly not applied (UNAVAILABLE: retry). `detail` is for logs.
    #[error("lost the database connection; the write was not applied: {detail}")]
    NotApplied { detail: String },
    /// A write whose connection failed after it was sent, and whose outcome
    /// could not be learned since (the database stayed out of reach): it
    /// may have been applied. `detail` is for logs.
    #[error("the write may have been applied: {detail}")]
    InDoubt { detail: String },
    /// The database refuses writes (a read-only SQLite file or mode).
    #[error("the database is read-only: {0}")]
    ReadOnly(String),
    #[error("database error: {0}")]
    Internal(String),
    /// The server stops: a read that waited for the event log gives up
    /// (UNAVAILABLE; another replica can answer).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A read at a revision whose history was pruned (FAILED_PRECONDITION).
    #[error(
        "revision {requested} is older than the history kept: the oldest revision still \
         readable is {oldest} (see --event-retention)"
    )]
    RevisionCompacted { requested: u64, oldest: u64 },
    /// No webhook endpoint has the id (NOT_FOUND).
    #[error("no webhook endpoint has id {id:?}")]
    WebhookNotFound { id: String },
    /// A read at a revision not committed yet (OUT_OF_RANGE).
    #[error("revision {requested} is not reached yet: the current revision is {current}")]
    RevisionNotReached { requested: u64, current: u64 },
    /// A write whose result breaks its field's schema: each violation,
    /// `field/pointer: message`, joined by "; ".
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    SchemaViolation(Vec<crate::schema::Violation>),
    /// SetSchema refused: stored values break the schema.
    #[error(
        "{} stored {} {} value(s) do not conform to the schema (ids: {}); change them first",
        found.count,
        kind.as_str(),
        field.name(),
        found.ids.join(", ")
    )]
    Nonconforming {
        kind: crate::model::Kind,
        field: crate::model::Field,
        found: super::schemas::Nonconforming,
    },
    /// One operation of a transaction refused it (a precondition, a
    /// schema, its input): nothing of the transaction was written.
    #[error("{at}: {source}")]
    Operation {
        index: usize,
        /// Where the operation is in the request (`TxnOp::at`).
        at: String,
        source: Box<StoreError>,
    },
}

impl StoreError {
    /// Driver errors can quote the connection URL; never let its password
    /// reach a log line.
    pub(crate) fn redacting(self, url: &str) -> Self {
        let redacted = redact_url(url);
        let scrub = |text: String| text.replace(url, &redacted);
        match self {
            StoreError::Unavailable { reason, detail } => StoreError::Unavailable {
                reason,
                detail: scrub(detail),
            },
            StoreError::Internal(text) => StoreError::Internal(scrub(text)),
            StoreError::InDoubt { detail } => StoreError::InDoubt {
                detail: scrub(detail),
            },
            StoreError::NotApplied { detail } => StoreError::NotApplied {
                detail: scrub(detail),
            },
            other => other,
        }
    }
}

/// `scheme://user:secret@host/db` becomes `scheme://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &url[scheme_end + at..]
        ),
        _ => url.to_owned(),
    }
}

impl StoreError {
    pub(crate) fn unavailable(reason: &'static str, detail: impl ToString) -> Self {
        StoreError::Unavailable {
            reason,
            detail: detail.to_string(),
        }
    }
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        let sqlx_error = match &err {
            DbErr::ConnectionAcquire(_) => {
                return StoreError::unavailable("no database connection available", &err);
            }
            DbErr::Conn(_) => {
                return StoreError::unavailable("cannot connect to the database", &err);
            }
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => e,
            _ => return StoreError::Internal(err.to_string()),
        };
        match classify(sqlx_error) {
            Class::Transient(reason) => StoreError::unavailable(reason, &err),
            Class::ReadOnly => StoreError::ReadOnly(err.to_string()),
            Class::Other => StoreError::Internal(err.to_string()),
        }
    }
}

/// A driver error from a connection outside the pool (`conns.rs`),
/// classified as the pool's errors are.
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::from_sqlx(&err)
    }
}

impl StoreError {
    pub(crate) fn from_sqlx(err: &sqlx::Error) -> Self {
        match classify(err) {
            Class::Transient(reason) => StoreError::unavailable(reason, err),
            Class::ReadOnly => StoreError::ReadOnly(err.to_string()),
            Class::Other => StoreError::Internal(err.to_string()),
        }
    }
}

enum Class {
    Transient(&'static str),
    ReadOnly,
    Other,
}

fn classify(err: &sqlx::Error) -> Class {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => {
            Class::Transient("lost the database connection")
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Class::Transient("no database connection available")
        }
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else {
                return Class::Other;
            };
            let code = code.as_ref();
            // SQLite reports extended result codes; the primary code is the
            // low byte. Only for SQLite: many Postgres SQLSTATEs are digits
            // too (22021 is not "locked").
            let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
            let sqlite_primary = code
                .parse::<u32>()
                .ok()
                .filter(|_| sqlite)
                .map(|c| c & 0xff);
            match (code, sqlite_primary) {
                (_, Some(5)) | (_, Some(6)) => Class::Transient("the database is locked"),
                (_, Some(8)) => Class::ReadOnly,
                (c, _) if c.starts_with("08") => Class::Transient("lost the database connection"),
                (c, _) if c.starts_with("57P0") => {
                    Class::Transient("the database is shutting down or starting")
                }
                ("53300", _) => Class::Transient("the database has too many connections"),
                ("40001" | "40P01", _) => Class::Transient("a conflicting transaction won; retry"),
                ("25006", _) => Class::ReadOnly,
                _ => Class::Other,
            }
        }
        _ => Class::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("sqlite://a:b.db?mode=rwc"),
            "sqlite://a:b.db?mode=rwc"
        );
        let err = StoreError::Internal("bad 'postgress://u:hunter2@h/db' here".into())
            .redacting("postgress://u:hunter2@h/db");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
