//! The one place where errors become gRPC statuses. Every status carries,
//! besides its sentence for people, details a program can act on
//! (`google.rpc.Status.details`, AIP-193): an `ErrorInfo` with the stable
//! reason (`crate::reason`) and its metadata, and where they apply a
//! `BadRequest` naming each invalid field, a `PreconditionFailure`, a
//! `QuotaFailure` or a `RetryInfo`.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Status;
use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation, QuotaViolation, StatusExt};

use crate::auth::{AuthError, Denied};
use crate::events::WatchError;
use crate::reason::{DOMAIN, Reason};
use crate::store::StoreError;
use crate::validation::ValidationError;

/// How long a caller should wait before retrying a call the database could
/// not serve: about the health check's interval, after which a database
/// that came back is known to be back.
const RETRY_DATABASE: Duration = Duration::from_secs(1);
/// ... one refused at a concurrency bound: a moment, with backoff.
const RETRY_OVERLOAD: Duration = Duration::from_millis(100);

/// A status of the reason's code, with the reason and its metadata, plus
/// `more`.
fn status(
    message: impl Into<String>,
    reason: Reason,
    metadata: &[(&str, String)],
    more: impl FnOnce(&mut ErrorDetails),
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect();
    let mut details = ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata);
    more(&mut details);
    Status::with_error_details(reason.code(), message, details)
}

fn none(_: &mut ErrorDetails) {}

impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Self {
        let reason = err.problem.reason();
        let field = err.path.to_string();
        if let crate::validation::Problem::PatchTestFailed { operation, pointer } = &err.problem {
            // A precondition of the caller's, not bad input: the field by
            // its name (the path names the operation too).
            let name = field
                .rsplit_once('[')
                .map_or(field.as_str(), |(name, _)| name)
                .to_owned();
            let violation = PreconditionViolation::new(
                reason.as_str(),
                format!("{name}{pointer}"),
                err.problem.to_string(),
            );
            let metadata = [
                ("field", name),
                ("operation", operation.to_string()),
                ("path", pointer.clone()),
            ];
            return status(err.to_string(), reason, &metadata, |details| {
                details.set_precondition_failure(vec![violation]);
            });
        }
        let violation = FieldViolation {
            field: field.clone(),
            description: err.problem.to_string(),
            reason: reason.as_str().to_owned(),
            localized_message: None,
        };
        status(err.to_string(), reason, &[("field", field)], |details| {
            details.set_bad_request(vec![violation]);
        })
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            StoreError::Invalid(err) => err.into(),
            StoreError::Operation { index, at, source } => in_operation(index, &at, *source),
            StoreError::VersionMismatch { expected, actual } => status(
                message,
                Reason::VersionMismatch,
                &[
                    ("expected_version", expected.to_string()),
                    ("current_version", actual.to_string()),
                ],
                none,
            ),
            StoreError::SchemaViolation(violations) => {
                let fields = violations
                    .into_iter()
                    .map(|violation| FieldViolation {
                        field: violation.location,
                        description: violation.message,
                        reason: Reason::SchemaViolation.as_str().to_owned(),
                        localized_message: None,
                    })
                    .collect::<Vec<_>>();
                status(message, Reason::SchemaViolation, &[], |details| {
                    details.set_bad_request(fields);
                })
            }
            StoreError::Nonconforming { kind, field, found } => {
                let violations = found
                    .ids
                    .iter()
                    .map(|id| {
                        PreconditionViolation::new(
                            Reason::NonconformingDocuments.as_str(),
                            format!("{}/{id}", kind.as_str()),
                            format!("its {} does not conform to the schema", field.name()),
                        )
                    })
                    .collect::<Vec<_>>();
                status(
                    message,
                    Reason::NonconformingDocuments,
                    &[
                        ("kind", kind.as_str().to_owned()),
                        ("field", field.name().to_owned()),
                        ("count", found.count.to_string()),
                    ],
                    |details| {
                        details.set_precondition_failure(violations);
                    },
                )
            }
            StoreError::Unavailable { reason, detail } => {
                tracing::warn!(error = %detail, "database unavailable");
                unavailable(
                    format!("{reason}; retry later"),
                    Reason::DatabaseUnavailable,
                )
            }
            StoreError::NotApplied { detail } => {
                tracing::warn!(error = %detail, "write settled as not applied");
                unavailable(
                    "lost the database connection; the write was not applied; retry later",
                    Reason::WriteNotApplied,
                )
            }
            StoreError::InDoubt { detail } => {
                tracing::warn!(error = %detail, "write outcome unknown");
                in_doubt(
                    "lost the database connection after the write was sent, and could not \
                     reach the database since to learn its outcome; it may have been applied: \
                     read before retrying",
                )
            }
            StoreError::ReadOnly(detail) => {
                tracing::error!(error = %detail, "database refuses writes");
                status(
                    "the database is read-only",
                    Reason::ReadOnlyDatabase,
                    &[],
                    none,
                )
            }
            StoreError::ShuttingDown => {
                shutting_down("server is shutting down; retry on another replica or later")
            }
            StoreError::RevisionCompacted { requested, oldest } => status(
                message,
                Reason::RevisionCompacted,
                &[
                    ("requested_revision", requested.to_string()),
                    ("oldest_revision", oldest.to_string()),
                ],
                none,
            ),
            StoreError::WebhookNotFound { id } => {
                status(message, Reason::WebhookNotFound, &[("id", id)], none)
            }
            StoreError::RevisionNotReached { requested, current } => status(
                message,
                Reason::RevisionNotReached,
                &[
                    ("requested_revision", requested.to_string()),
                    ("current_revision", current.to_string()),
                ],
                none,
            ),
            StoreError::Internal(detail) => {
                // The detail can hold SQL; it goes to the log, not the caller.
                tracing::error!(error = %detail, "database error");
                internal("internal error")
            }
        }
    }
}

/// The status of `err`, raised by a transaction's operation at `at` (its
/// index `index`): fields are located inside it, and the ErrorInfo names
/// the operation.
fn in_operation(index: usize, at: &str, err: StoreError) -> Status {
    if at.is_empty() {
        // A single write run as a transaction of one (a Patch with a
        // request id): its errors are its own call's.
        return err.into();
    }
    match err {
        StoreError::Invalid(mut err) => {
            err.path = err.path.within(at);
            err.into()
        }
        StoreError::SchemaViolation(mut violations) => {
            for violation in &mut violations {
                violation.location = format!("{at}.{}", violation.location);
            }
            StoreError::SchemaViolation(violations).into()
        }
        StoreError::VersionMismatch { expected, actual } => status(
            format!("{at}: {}", StoreError::VersionMismatch { expected, actual }),
            Reason::VersionMismatch,
            &[
                ("expected_version", expected.to_string()),
                ("current_version", actual.to_string()),
                ("operation", index.to_string()),
            ],
            none,
        ),
        other => other.into(),
    }
}

impl From<WatchError> for Status {
    fn from(err: WatchError) -> Self {
        let message = err.to_string();
        match err {
            WatchError::TooOld { requested, oldest } => status(
                message,
                Reason::RevisionCompacted,
                &[
                    ("requested_revision", requested.to_string()),
                    ("oldest_revision", oldest.to_string()),
                ],
                none,
            ),
            WatchError::ShuttingDown => {
                shutting_down("server is shutting down; resume on another replica or later")
            }
            WatchError::Invalid(err) => err.into(),
            WatchError::Store(err) => err.into(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        status(err.to_string(), err.reason(), &[], none)
    }
}

impl From<Denied> for Status {
    fn from(err: Denied) -> Self {
        status(err.message, err.reason, &[], none)
    }
}

/// UNAVAILABLE: the database could not serve the call; retry after a while.
pub(super) fn unavailable(message: impl Into<String>, reason: Reason) -> Status {
    status(message, reason, &[], |details| {
        details.set_retry_info(Some(RETRY_DATABASE));
    })
}

/// UNAVAILABLE: this server is shutting down; another replica can serve.
pub(super) fn shutting_down(message: impl Into<String>) -> Status {
    status(message, Reason::ShuttingDown, &[], |details| {
        details.set_retry_info(Some(Duration::ZERO));
    })
}

/// RESOURCE_EXHAUSTED at a bound of `limit` (`quota` names it); retry with
/// backoff.
pub(super) fn exhausted(message: String, reason: Reason, quota: &str, limit: usize) -> Status {
    let violation = QuotaViolation::new(quota, message.clone());
    status(
        message,
        reason,
        &[("limit", limit.to_string())],
        |details| {
            details
                .set_retry_info(Some(RETRY_OVERLOAD))
                .set_quota_failure(vec![violation]);
        },
    )
}

/// DEADLINE_EXCEEDED: the call's deadline ran out (or had before it began).
pub(super) fn deadline_expired(message: impl Into<String>) -> Status {
    status(message, Reason::DeadlineExpired, &[], none)
}

/// DEADLINE_EXCEEDED for a write that may have been applied.
pub(super) fn in_doubt(message: impl Into<String>) -> Status {
    status(message, Reason::WriteInDoubt, &[], none)
}

/// INTERNAL: a bug or an unexpected database answer; the message says no
/// more than that.
pub(super) fn internal(message: impl Into<String>) -> Status {
    status(message, Reason::Internal, &[], none)
}
