//! Health: whether the database answers, published through grpc.health.v1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Store;

/// Health name that is SERVING for as long as the process serves, whatever
/// the database does: for liveness probes, which must not restart a pod
/// because its database is away.
pub const LIVENESS: &str = "liveness";

/// Whether the last check reached the database. Calls are refused at once
/// while it is down, instead of each waiting out its timeout.
#[derive(Debug)]
pub struct DbHealth {
    up: AtomicBool,
}

impl Default for DbHealth {
    fn default() -> Self {
        DbHealth {
            up: AtomicBool::new(true),
        }
    }
}

impl DbHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
    }
}

/// Every service name reported: the server as a whole and each service.
pub type ServiceNames = &'static [&'static str];

pub async fn set_all(reporter: &HealthReporter, names: ServiceNames, status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Pings the database every `interval` (each ping bounded by `timeout`) and
/// reports SERVING or NOT_SERVING accordingly, until shutdown.
pub async fn monitor(
    store: Arc<Store>,
    db: Arc<DbHealth>,
    reporter: HealthReporter,
    names: ServiceNames,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let up = matches!(
            tokio::time::timeout(timeout, store.ping()).await,
            Ok(Ok(()))
        );
        if shutdown.is_cancelled() {
            return;
        }
        if db.set(up) {
            if up {
                tracing::info!("database reachable again; serving");
                set_all(&reporter, names, ServingStatus::Serving).await;
            } else {
                tracing::warn!("database unreachable; not serving");
                set_all(&reporter, names, ServingStatus::NotServing).await;
            }
        }
    }
}
