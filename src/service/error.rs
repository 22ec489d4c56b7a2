//! The one place where errors become gRPC statuses.

use tonic::Status;

use crate::auth::{AuthError, Denied};
use crate::events::WatchError;
use crate::store::StoreError;
use crate::validation::ValidationError;

impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Invalid(err) => err.into(),
            StoreError::VersionMismatch { .. } => Status::aborted(err.to_string()),
            StoreError::SchemaViolation(_) => Status::invalid_argument(err.to_string()),
            StoreError::Nonconforming { .. } => Status::failed_precondition(err.to_string()),
            StoreError::Unavailable { reason, detail } => {
                tracing::warn!(error = %detail, "database unavailable");
                Status::unavailable(format!("{reason}; retry later"))
            }
            StoreError::InDoubt { detail } => {
                tracing::warn!(error = %detail, "write outcome unknown");
                Status::deadline_exceeded(
                    "lost the database connection after the write was sent, and could not \
                     reach the database since to learn its outcome; it may have been applied: \
                     read before retrying",
                )
            }
            StoreError::ReadOnly(detail) => {
                tracing::error!(error = %detail, "database refuses writes");
                Status::failed_precondition("the database is read-only")
            }
            StoreError::Internal(detail) => {
                // The detail can hold SQL; it goes to the log, not the caller.
                tracing::error!(error = %detail, "database error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<WatchError> for Status {
    fn from(err: WatchError) -> Self {
        match err {
            WatchError::TooOld { .. } => Status::failed_precondition(err.to_string()),
            WatchError::ShuttingDown => {
                Status::unavailable("server is shutting down; resume on another replica or later")
            }
            WatchError::Invalid(err) => err.into(),
            WatchError::Store(err) => err.into(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        Status::unauthenticated(err.to_string())
    }
}

impl From<Denied> for Status {
    fn from(err: Denied) -> Self {
        Status::permission_denied(err.0)
    }
}
