//! Signed webhooks (issue 32): every change delivered to HTTP endpoints,
//! in revision order per endpoint, signed to the Standard Webhooks
//! specification.
//!
//! - `endpoint.rs`: what an endpoint may be (URL, types, filter), checked
//!   when it is created or changed;
//! - `network.rs`: which addresses a delivery may reach (SSRF);
//! - `envelope.rs`: a delivery's body and `webhook-id`;
//! - `signing.rs`: secrets and the `webhook-signature` header;
//! - `schedule.rs`: when a failed delivery is tried again;
//! - `sender.rs`: one delivery over HTTP;
//! - `deliverer.rs`: the loop under the lease, one task per endpoint;
//! - `metrics.rs`.
//!
//! Endpoints and their positions are the store's (`store/webhooks.rs`);
//! the gRPC service is `service/webhooks.rs`.

mod deliverer;
pub mod endpoint;
pub mod envelope;
mod metrics;
pub mod network;
pub mod schedule;
mod sender;
pub mod signing;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use deliverer::{Deliverer, DelivererState, LEASE_NAME};
pub use metrics::WebhookMetrics;
pub use network::AllowedNetworks;

use crate::events::Broker;
use crate::pause::PausePoint;
use crate::store::Store;

/// Health name of the deliverer, in the process that runs it: SERVING
/// while it reaches the database (delivering or standing by).
pub const WEBHOOK_HEALTH: &str = "webhooks";

#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Non-public networks deliveries may reach (`--webhook-allow-networks`).
    pub allowed: Arc<AllowedNetworks>,
    /// Each request's timeout, connection included.
    pub timeout: Duration,
    /// An endpoint failing for this long is disabled.
    pub failure_window: Duration,
    /// Delays after the first, second... failed attempt at one event.
    pub schedule: Vec<Duration>,
    /// How often the endpoints are read again (changes made by another
    /// replica), and a caught-up endpoint looks at the log.
    pub refresh: Duration,
    /// How often a standby tries to take the lease, and the holder checks
    /// that it still has it.
    pub lease_interval: Duration,
    /// Events read from the log per query.
    pub batch: u64,
    /// Test-only stopping places; never armed in production.
    pub pauses: WebhookPauses,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            allowed: Arc::new(AllowedNetworks::default()),
            timeout: Duration::from_secs(15),
            failure_window: Duration::from_secs(5 * 24 * 3600),
            schedule: schedule::DEFAULT_SCHEDULE.to_vec(),
            refresh: Duration::from_secs(1),
            lease_interval: Duration::from_secs(1),
            batch: 256,
            pauses: WebhookPauses::default(),
        }
    }
}

/// Where a test can stop the deliverer (see [`PausePoint`]).
#[derive(Clone, Debug, Default)]
pub struct WebhookPauses {
    /// A delivery was answered 2xx and the endpoint's position is not yet
    /// stored: a crash here sends the event again (same `webhook-id`).
    pub delivered: PausePoint,
}

/// Starts the deliverer as a task of this process; it stops at `shutdown`
/// (or when its task is aborted: a crash, in tests). `changed` is what
/// this process's service pokes when it changes an endpoint.
pub fn start(
    store: Arc<Store>,
    broker: Arc<Broker>,
    options: WebhookOptions,
    metrics: &crate::metrics::Metrics,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<(Arc<DelivererState>, tokio::task::JoinHandle<()>)> {
    let deliverer = Deliverer::new(
        store,
        broker,
        options,
        WebhookMetrics::new(metrics),
        changed,
        shutdown,
    )?;
    let state = deliverer.state();
    Ok((state, tokio::spawn(deliverer.run())))
}

/// Follows the deliverer's health on [`WEBHOOK_HEALTH`].
pub async fn report_health(
    state: Arc<DelivererState>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let healthy = state.is_healthy();
        if last != Some(healthy) {
            let status = if healthy {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            crate::health::set_all(&reporter, &[WEBHOOK_HEALTH], status).await;
            last = Some(healthy);
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            () = shutdown.cancelled() => {
                crate::health::set_all(&reporter, &[WEBHOOK_HEALTH], tonic_health::ServingStatus::NotServing).await;
                return;
            }
        }
    }
}
