use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Deletes events older than `retention`, and request ids older than
/// `request_id_ttl`, every `interval` until shutdown. Any replica may
/// prune; the deletes are idempotent.
pub async fn prune_periodically(
    store: Arc<Store>,
    retention: Duration,
    interval: Duration,
    request_id_ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(retention) = chrono::Duration::from_std(retention) else {
            return;
        };
        let cutoff = chrono::Utc::now() - retention;
        match store.prune_events(cutoff).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned old events"),
            Err(err) => tracing::warn!(error = %err, "pruning events failed; will retry"),
        }
        // Lookups ignore expired ids anyway: this only keeps the table small.
        match store.prune_requests(request_id_ttl).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned expired request ids"),
            Err(err) => tracing::warn!(error = %err, "pruning request ids failed; will retry"),
        }
    }
}
