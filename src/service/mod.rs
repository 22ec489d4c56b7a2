//! The gRPC services: thin translations between protobuf and [`Core`].

mod adapters;
mod admission;
mod caller;
mod commit;
mod core;
mod error;
mod handlers;
mod schemas;
mod telemetry;
mod transaction;
mod watch;
mod webhooks;

pub use adapters::Served;
pub use admission::{Admission, Bounds, StreamPermit};
pub use caller::Authenticate;
pub use commit::TransactionHandlers;
pub use core::{Core, Page};
pub use handlers::Handlers;
pub use handlers::{MAX_BATCH_BYTES, MAX_PAGE_BYTES};
pub use schemas::SchemaHandlers;
pub use telemetry::RequestLayer;
pub use transaction::MAX_OPERATIONS;
pub use watch::Routed;
pub use webhooks::WebhookHandlers;

use tokio::sync::mpsc;
use tonic::Status;

use crate::auth::{self, Caller, FieldSet, Operation};
use crate::events::{WatchError, WatchItem};
use crate::logging::Escaped;

/// What a Watch call receives: its items, until the stream ends.
pub type WatchItems = mpsc::Receiver<Result<WatchItem, WatchError>>;

/// The caller (from the request's extensions) and the fields it may see,
/// or PERMISSION_DENIED before any work is done.
fn authorize(
    extensions: &tonic::Extensions,
    operation: &Operation<'_>,
) -> Result<(Caller, FieldSet), Status> {
    let caller = caller::caller(extensions)?;
    // The id is not validated yet: it is escaped wherever it is logged.
    let span = tracing::Span::current();
    span.record("caller", tracing::field::display(&caller));
    if !operation.id.is_empty() {
        span.record("id", tracing::field::display(Escaped(operation.id)));
    }
    match auth::authorize(&caller, operation) {
        Ok(fields) => Ok((caller, fields)),
        Err(denied) => {
            tracing::info!(
                caller = %caller,
                rpc = %operation.action.rpc(),
                kind = %operation.kind.as_str(),
                id = %Escaped(operation.id),
                "call refused: permission denied"
            );
            Err(denied.into())
        }
    }
}
