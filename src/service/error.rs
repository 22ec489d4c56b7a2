//! The one place where errors become gRPC statuses.

use tonic::Status;

use crate::json::ValidationError;
use crate::store::StoreError;

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
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "database unavailable");
                Status::unavailable("database unavailable; retry later")
            }
            StoreError::Internal(detail) => {
                // The detail can hold SQL; it goes to the log, not the caller.
                tracing::error!(error = %detail, "database error");
                Status::internal("internal error")
            }
        }
    }
}
