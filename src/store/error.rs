use sea_orm::{DbErr, RuntimeErr, sqlx};

use crate::json::ValidationError;

/// What can go wrong in a storage call; mapped to a gRPC status in
/// `service::error` and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("expected version {expected}, but the current version is {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Transient: the database could not be reached or is overloaded.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Driver errors can quote the connection URL; never let its password
    /// reach a log line.
    pub(crate) fn redacting(self, url: &str) -> Self {
        let redacted = redact_url(url);
        let scrub = |text: String| text.replace(url, &redacted);
        match self {
            StoreError::Unavailable(text) => StoreError::Unavailable(scrub(text)),
            StoreError::Internal(text) => StoreError::Internal(scrub(text)),
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

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        let transient = match &err {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
            DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
                is_transient(e)
            }
            _ => false,
        };
        if transient {
            StoreError::Unavailable(err.to_string())
        } else {
            StoreError::Internal(err.to_string())
        }
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Postgres: connection exceptions (08xxx), shutdown or start-up in
            // progress (57P0x), too many connections, serialization
            // failure and deadlock. SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6).
            code.starts_with("08")
                || code.starts_with("57P0")
                || matches!(code.as_ref(), "53300" | "40001" | "40P01" | "5" | "6")
        }),
        _ => false,
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
