//! Prometheus metrics: every metric the server exports, in one registry per
//! server (so that tests running several servers see their own numbers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::events::Broker;
use crate::store::Store;

/// Latency buckets from half a millisecond to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Sampler = Box<dyn Fn() + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    /// Finished calls by service, method and status code.
    pub handled: IntCounterVec,
    /// Call latency, from the request to its final status.
    pub handling: HistogramVec,
    pub in_flight: IntGaugeVec,
    /// Changes committed by this server, by kind (one event each).
    pub events_written: IntCounterVec,
    pub events_delivered: IntCounter,
    pub watch_lagged: IntCounter,
    pub watch_streams: IntGauge,
    /// Watch streams refused at `--max-watch-streams`.
    pub watch_streams_refused: IntCounter,
    pub latest_revision: IntGauge,
    pub dispatched_revision: IntGauge,
    pub delivery_lag: IntGauge,
    /// Postgres: this server's NOTIFYs to other replicas, by outcome.
    pub commit_notifications: IntCounterVec,
    pub db_connections: IntGaugeVec,
    pub db_max_connections: IntGauge,
    /// Time to obtain a pooled connection and begin a write transaction.
    pub db_acquire: Histogram,
    /// Writes per SQLite transaction (group commit).
    pub write_group_size: Histogram,
    /// Refreshes gauges from their sources just before each scrape.
    samplers: Mutex<Vec<Sampler>>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn histogram(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let handled = IntCounterVec::new(
            opts(
                "grpc_server_handled_total",
                "gRPC calls completed, by service, method and status code.",
            ),
            &["grpc_service", "grpc_method", "grpc_code"],
        )
        .unwrap();
        let handling = HistogramVec::new(
            histogram(
                "grpc_server_handling_seconds",
                "gRPC call latency until the final status (streams: their whole life).",
            ),
            &["grpc_service", "grpc_method"],
        )
        .unwrap();
        let in_flight = IntGaugeVec::new(
            opts("grpc_server_in_flight_requests", "gRPC calls in progress."),
            &["grpc_service", "grpc_method"],
        )
        .unwrap();
        let events_written = IntCounterVec::new(
            opts(
                "metadata_events_written_total",
                "Changes committed by this server (each appends one event), by kind.",
            ),
            &["kind"],
        )
        .unwrap();
        let events_delivered = IntCounter::new(
            "metadata_watch_events_delivered_total",
            "Events sent to Watch streams of this server.",
        )
        .unwrap();
        let watch_lagged = IntCounter::new(
            "metadata_watch_lagged_total",
            "Times a Watch stream fell behind the in-memory buffer and caught up from the table.",
        )
        .unwrap();
        let watch_streams =
            IntGauge::new("metadata_watch_streams_open", "Open Watch streams.").unwrap();
        let watch_streams_refused = IntCounter::new(
            "metadata_watch_streams_refused_total",
            "Watch streams refused with RESOURCE_EXHAUSTED at --max-watch-streams.",
        )
        .unwrap();
        let latest_revision = IntGauge::new(
            "metadata_events_latest_revision",
            "Newest revision in the event table (any replica).",
        )
        .unwrap();
        let dispatched_revision = IntGauge::new(
            "metadata_events_dispatched_revision",
            "Revision up to which this server has dispatched events to its Watch streams.",
        )
        .unwrap();
        let delivery_lag = IntGauge::new(
            "metadata_events_delivery_lag_revisions",
            "How many revisions this server's event delivery is behind the newest one.",
        )
        .unwrap();
        let commit_notifications = IntCounterVec::new(
            opts(
                "metadata_commit_notifications_total",
                "Postgres NOTIFYs telling other replicas of this server's commits (each covers \
                 every commit since the previous one), by outcome (sent, failed).",
            ),
            &["outcome"],
        )
        .unwrap();
        let db_connections = IntGaugeVec::new(
            opts(
                "metadata_db_pool_connections",
                "Database pool connections, by state (idle, in_use).",
            ),
            &["state"],
        )
        .unwrap();
        let db_max_connections = IntGauge::new(
            "metadata_db_pool_max_connections",
            "Configured database pool size.",
        )
        .unwrap();
        let db_acquire = Histogram::with_opts(histogram(
            "metadata_db_acquire_seconds",
            "Time to obtain a pooled connection and begin a write transaction.",
        ))
        .unwrap();
        let write_group_size = Histogram::with_opts(
            HistogramOpts::new(
                "metadata_sqlite_write_group_size",
                "Writes taken into one SQLite transaction by group commit; \
                 empty on Postgres.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )
        .unwrap();
        let build_info = IntGaugeVec::new(
            opts(
                "metadata_build_info",
                "Always 1; the labels name the build.",
            ),
            &["version", "revision"],
        )
        .unwrap();
        build_info
            .with_label_values(&[crate::build_info::VERSION, crate::build_info::REVISION])
            .set(1);

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(handled.clone()),
            Box::new(handling.clone()),
            Box::new(in_flight.clone()),
            Box::new(events_written.clone()),
            Box::new(events_delivered.clone()),
            Box::new(watch_lagged.clone()),
            Box::new(watch_streams.clone()),
            Box::new(watch_streams_refused.clone()),
            Box::new(latest_revision.clone()),
            Box::new(dispatched_revision.clone()),
            Box::new(delivery_lag.clone()),
            Box::new(commit_notifications.clone()),
            Box::new(db_connections.clone()),
            Box::new(db_max_connections.clone()),
            Box::new(db_acquire.clone()),
            Box::new(write_group_size.clone()),
            Box::new(build_info),
            // Resident memory, CPU time, open files of this process.
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Arc::new(Metrics {
            registry,
            handled,
            handling,
            in_flight,
            events_written,
            events_delivered,
            watch_lagged,
            watch_streams,
            watch_streams_refused,
            latest_revision,
            dispatched_revision,
            delivery_lag,
            commit_notifications,
            db_connections,
            db_max_connections,
            db_acquire,
            write_group_size,
            samplers: Mutex::new(Vec::new()),
        })
    }

    /// Adds metrics defined elsewhere (the relay's) to this registry.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("metric names are unique");
    }

    pub fn add_sampler(&self, sampler: impl Fn() + Send + Sync + 'static) {
        self.samplers.lock().unwrap().push(Box::new(sampler));
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        for sample in self.samplers.lock().unwrap().iter() {
            sample();
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Gauges read from the pool and the broker at scrape time.
    pub fn sample(self: &Arc<Self>, store: Arc<Store>, broker: Arc<Broker>) {
        let metrics = Arc::downgrade(self);
        self.add_sampler(move || {
            let Some(m) = metrics.upgrade() else { return };
            if let Some(pool) = store.pool_status() {
                m.db_connections
                    .with_label_values(&["idle"])
                    .set(pool.idle as i64);
                m.db_connections
                    .with_label_values(&["in_use"])
                    .set(pool.size as i64 - pool.idle as i64);
                m.db_max_connections.set(pool.max as i64);
            }
            use std::sync::atomic::Ordering::Relaxed;
            if let Some(announced) = store.announcer_state() {
                for (outcome, total) in [("sent", &announced.sent), ("failed", &announced.failed)] {
                    catch_up(
                        &m.commit_notifications.with_label_values(&[outcome]),
                        total.load(Relaxed),
                    );
                }
            }
            let stats = &broker.stats;
            m.watch_streams.set(stats.open_streams.load(Relaxed) as i64);
            catch_up(&m.events_delivered, stats.delivered.load(Relaxed));
            catch_up(&m.watch_lagged, stats.lagged.load(Relaxed));
            m.dispatched_revision.set(broker.head() as i64);
            // An idle dispatcher (nobody watching) delivers nothing and so
            // lags behind nothing, however old its mark.
            let lag = match broker.following() {
                true => (m.latest_revision.get() - m.dispatched_revision.get()).max(0),
                false => 0,
            };
            m.delivery_lag.set(lag);
        });
    }
}

/// Advances a counter to a total kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// Reads the newest revision every `interval`, for the delivery lag (a
/// database query, so not done at scrape time).
pub async fn track_latest_revision(
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(Ok(newest)) = tokio::time::timeout(interval, store.newest_revision()).await {
            metrics.latest_revision.set(newest as i64);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_in_text_format() {
        let metrics = Metrics::new();
        metrics
            .handled
            .with_label_values(&["metadata.v1.UserMetadataService", "Get", "OK"])
            .inc();
        metrics
            .events_written
            .with_label_values(&["user"])
            .inc_by(2);
        let text = metrics.render();
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Get",grpc_service="metadata.v1.UserMetadataService"} 1"#
        ), "{text}");
        assert!(
            text.contains(r#"metadata_events_written_total{kind="user"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"metadata_build_info{revision=""#), "{text}");
        assert!(
            text.contains("# TYPE metadata_db_acquire_seconds histogram"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn catch_up_only_moves_forward() {
        let counter = IntCounter::new("c", "c").unwrap();
        catch_up(&counter, 5);
        catch_up(&counter, 3);
        assert_eq!(counter.get(), 5);
    }
}
