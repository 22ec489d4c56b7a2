use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Deletes events older than `retention` every `interval` until shutdown.
/// Any replica may prune; the deletes are idempotent.
pub async fn prune_periodically(
    store: Arc<Store>,
    retention: Duration,
    interval: Duration,
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
    }
}
