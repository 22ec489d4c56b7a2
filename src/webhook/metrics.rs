//! The deliverer's metrics, per endpoint (labelled by its id, never by its
//! URL: a URL may carry a token in its path), in the registry of the
//! process it runs in (the relay's, or the server's on SQLite).

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::metrics::Metrics;

pub struct WebhookMetrics {
    /// By endpoint and outcome (`delivered`, `failed`).
    pub deliveries: IntCounterVec,
    /// Revisions committed and not yet delivered (or skipped), by endpoint.
    pub lag: IntGaugeVec,
    /// Failed attempts at the endpoint's next event (its retry backlog):
    /// 0 while it delivers.
    pub attempts: IntGaugeVec,
    pub disabled: IntGaugeVec,
    /// Endpoints disabled by the deliverer (failure window, pruned events).
    pub disabled_total: IntCounter,
    pub seconds: Histogram,
    pub lease_held: IntGauge,
}

impl WebhookMetrics {
    pub fn new(metrics: &Metrics) -> Arc<WebhookMetrics> {
        let by_endpoint =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["webhook"]).unwrap();
        let deliveries = IntCounterVec::new(
            Opts::new(
                "metadata_webhook_deliveries_total",
                "Webhook delivery attempts by this process, by endpoint id and outcome \
                 (delivered: a 2xx answer; failed: anything else, retried later).",
            ),
            &["webhook", "outcome"],
        )
        .unwrap();
        let lag = by_endpoint(
            "metadata_webhook_lag_revisions",
            "Revisions committed after the endpoint's position (not yet delivered or skipped).",
        );
        let attempts = by_endpoint(
            "metadata_webhook_retry_attempts",
            "Failed attempts at the endpoint's next event, waiting for a retry (0 while it delivers).",
        );
        let disabled = by_endpoint(
            "metadata_webhook_disabled",
            "1 while the endpoint is disabled (by UpdateWebhook, or by the deliverer).",
        );
        let disabled_total = IntCounter::new(
            "metadata_webhook_disabled_total",
            "Endpoints the deliverer disabled: failing past --webhook-failure-window, or their \
             next events pruned.",
        )
        .unwrap();
        let seconds = Histogram::with_opts(
            HistogramOpts::new(
                "metadata_webhook_request_seconds",
                "Time from sending a delivery to its answer (or failure).",
            )
            .buckets(vec![0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0]),
        )
        .unwrap();
        let lease_held = IntGauge::new(
            "metadata_webhook_lease_held",
            "1 on the replica that holds the webhook lease and delivers, 0 on a standby.",
        )
        .unwrap();
        for collector in [
            Box::new(deliveries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lag.clone()),
            Box::new(attempts.clone()),
            Box::new(disabled.clone()),
            Box::new(disabled_total.clone()),
            Box::new(seconds.clone()),
            Box::new(lease_held.clone()),
        ] {
            metrics.register(collector);
        }
        Arc::new(WebhookMetrics {
            deliveries,
            lag,
            attempts,
            disabled,
            disabled_total,
            seconds,
            lease_held,
        })
    }

    /// Drops a deleted endpoint's series.
    pub fn forget(&self, id: &str) {
        for vec in [&self.lag, &self.attempts, &self.disabled] {
            let _ = vec.remove_label_values(&[id]);
        }
        for outcome in ["delivered", "failed"] {
            let _ = self.deliveries.remove_label_values(&[id, outcome]);
        }
    }
}
