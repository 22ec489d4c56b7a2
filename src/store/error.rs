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
