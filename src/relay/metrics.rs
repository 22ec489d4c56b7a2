//! The relay's metrics, in the registry of the process it runs in (the
//! relay's own, or the server's on SQLite).

use std::sync::{Arc, Weak};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::RelayState;
use crate::events::Broker;
use crate::metrics::Metrics;

pub struct RelayMetrics {
    pub published: IntCounter,
    pub revision: IntGauge,
    pub lag: IntGauge,
    pub nats_errors: IntCounterVec,
    pub lease_held: IntGauge,
    pub healthy: IntGauge,
    metrics: Weak<Metrics>,
}

impl RelayMetrics {
    pub fn new(metrics: &Arc<Metrics>) -> Arc<RelayMetrics> {
        let published = IntCounter::new(
            "metadata_relay_published_total",
            "Events published to NATS JetStream and acknowledged, by this process.",
        )
        .unwrap();
        let revision = IntGauge::new(
            "metadata_relay_revision",
            "Revision up to which the NATS stream is complete, as this process last knew it.",
        )
        .unwrap();
        let lag = IntGauge::new(
            "metadata_relay_lag_revisions",
            "Revisions committed to the event log and not yet in the NATS stream \
             (0 on a standby relay).",
        )
        .unwrap();
        let nats_errors = IntCounterVec::new(
            Opts::new(
                "metadata_relay_errors_total",
                "Relay failures by operation (publish, publish ack, stream info, fenced, database...); \
                 each pauses the relay until it succeeds again.",
            ),
            &["operation"],
        )
        .unwrap();
        let lease_held = IntGauge::new(
            "metadata_relay_lease_held",
            "1 on the relay replica that holds the lease and publishes, 0 on a standby.",
        )
        .unwrap();
        let healthy = IntGauge::new(
            "metadata_relay_healthy",
            "1 while the relay reaches NATS and the database, 0 while it is paused by a failure.",
        )
        .unwrap();
        for collector in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(revision.clone()),
            Box::new(lag.clone()),
            Box::new(nats_errors.clone()),
            Box::new(lease_held.clone()),
            Box::new(healthy.clone()),
        ] {
            metrics.register(collector);
        }
        healthy.set(1);
        Arc::new(RelayMetrics {
            published,
            revision,
            lag,
            nats_errors,
            lease_held,
            healthy,
            metrics: Arc::downgrade(metrics),
        })
    }

    /// Refreshes the position gauges at every scrape.
    pub(super) fn observe(self: &Arc<Self>, state: Arc<RelayState>, broker: Arc<Broker>) {
        let Some(metrics) = self.metrics.upgrade() else {
            return;
        };
        let relay = Arc::downgrade(self);
        metrics.add_sampler(move || {
            let Some(relay) = relay.upgrade() else { return };
            let revision = state.revision();
            relay.revision.set(revision as i64);
            relay.healthy.set(i64::from(state.is_healthy()));
            let lag = if state.holds_lease() {
                broker.head().saturating_sub(revision)
            } else {
                0
            };
            relay.lag.set(lag as i64);
        });
    }
}
