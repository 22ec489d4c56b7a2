//! The deliverer: under a lease, one task per enabled endpoint, each
//! walking the event log from the endpoint's stored position.
//!
//! - **In order, once.** An endpoint gets its events one at a time; its
//!   position moves past an event only after a 2xx for it, and is stored
//!   (compared and set, `store/webhooks.rs`) before the next is sent. A
//!   crash between the answer and the store sends that event again, with
//!   the same `webhook-id`: receivers de-duplicate by it.
//! - **No gap.** The log is read only up to the dispatcher's high-water
//!   mark, below which every revision is committed or void, as Watch and
//!   the relay read it.
//! - **Apart.** Each endpoint has its own task, client connection and
//!   retry clock: a slow or failing one holds up no other, and no write
//!   waits for a delivery.
//! - **One deliverer.** Replicas take turns through a lease (`store::lease`;
//!   on SQLite the serving process is the only one).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::WebhookOptions;
use super::envelope;
use super::metrics::WebhookMetrics;
use super::schedule;
use super::sender::Sender;
use crate::events::Broker;
use crate::model::{Event, Kind};
use crate::query::Filter;
use crate::store::{Failure, Lease, Store, StoreError, StoredWebhook};

/// The lease's name: no NATS stream can be called this (streams have no
/// spaces), so it never collides with a relay's lease.
pub const LEASE_NAME: &str = "metadata-service webhooks";

/// What health and tests read.
#[derive(Debug, Default)]
pub struct DelivererState {
    holds_lease: AtomicBool,
    failing: AtomicBool,
}

impl DelivererState {
    pub fn holds_lease(&self) -> bool {
        self.holds_lease.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }
}

pub struct Deliverer {
    store: Arc<Store>,
    broker: Arc<Broker>,
    sender: Arc<Sender>,
    options: WebhookOptions,
    metrics: Arc<WebhookMetrics>,
    state: Arc<DelivererState>,
    /// Poked when this process changes an endpoint: the set is read again
    /// at once instead of at the next refresh.
    changed: Arc<Notify>,
    shutdown: CancellationToken,
}

/// A running endpoint task, and the endpoint's `updated_at` it started
/// with: any other means it was changed (or replayed) since.
struct Running {
    updated_at: DateTime<Utc>,
    stop: CancellationToken,
    /// Asked to stop: a new task for the endpoint starts only once this
    /// one has ended, so that two never deliver to one endpoint at once
    /// (a late answer to the old one would arrive out of order).
    stopping: bool,
    task: AbortOnDrop,
}

/// Aborts the task when dropped: a deliverer's turn that ends abruptly
/// (the process killed in a test, the lease lost) leaves no endpoint task
/// delivering behind it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Deliverer {
    pub fn new(
        store: Arc<Store>,
        broker: Arc<Broker>,
        options: WebhookOptions,
        metrics: Arc<WebhookMetrics>,
        changed: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Deliverer> {
        let sender = Arc::new(Sender::new(options.allowed.clone(), options.timeout)?);
        Ok(Deliverer {
            store,
            broker,
            sender,
            options,
            metrics,
            state: Arc::new(DelivererState::default()),
            changed,
            shutdown,
        })
    }

    pub fn state(&self) -> Arc<DelivererState> {
        self.state.clone()
    }

    /// Takes turns with other replicas until shutdown.
    pub async fn run(self) {
        loop {
            let Some(mut lease) = self.wait_for_lease().await else {
                return;
            };
            self.state.holds_lease.store(true, Ordering::Relaxed);
            self.metrics.lease_held.set(1);
            tracing::info!("webhook lease taken; delivering");
            let interest = self.broker.interest();
            let lost = self.deliver_while_held(&mut lease).await;
            drop(interest);
            self.state.holds_lease.store(false, Ordering::Relaxed);
            self.metrics.lease_held.set(0);
            drop(lease);
            if !lost {
                return;
            }
            tracing::warn!("webhook lease lost (its database connection failed); standing by");
        }
    }

    async fn wait_for_lease(&self) -> Option<Lease> {
        let mut said = false;
        loop {
            let attempt = tokio::select! {
                attempt = self.store.try_lease(LEASE_NAME) => attempt,
                () = self.shutdown.cancelled() => return None,
            };
            match attempt {
                Ok(Some(lease)) => {
                    self.state.failing.store(false, Ordering::Relaxed);
                    return Some(lease);
                }
                Ok(None) => {
                    if !said {
                        tracing::info!("another process holds the webhook lease; standing by");
                        said = true;
                    }
                    self.state.failing.store(false, Ordering::Relaxed);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach the database for the webhook lease");
                    self.state.failing.store(true, Ordering::Relaxed);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.options.lease_interval) => {}
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Keeps one task per enabled endpoint while the lease is held: true
    /// when the lease was lost, false at shutdown.
    async fn deliver_while_held(&self, lease: &mut Lease) -> bool {
        let mut running: HashMap<String, Running> = HashMap::new();
        let lost = loop {
            if self.shutdown.is_cancelled() {
                break false;
            }
            if !lease
                .check(self.options.lease_interval.max(Duration::from_secs(1)))
                .await
            {
                break true;
            }
            match self.all_endpoints().await {
                Ok(endpoints) => {
                    self.state.failing.store(false, Ordering::Relaxed);
                    self.reconcile(&mut running, endpoints);
                }
                Err(err) => {
                    self.state.failing.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %err, "cannot read the webhook endpoints");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.options.refresh) => {}
                () = self.changed.notified() => {}
                () = self.shutdown.cancelled() => {}
            }
        };
        for task in running.values() {
            task.stop.cancel();
        }
        for (_, mut task) in running.drain() {
            // Each finishes the delivery in flight (bounded by the
            // request timeout) and stores its outcome.
            let _ = (&mut task.task.0).await;
        }
        lost
    }

    async fn all_endpoints(&self) -> Result<Vec<StoredWebhook>, StoreError> {
        let mut endpoints = Vec::new();
        loop {
            let after = endpoints.last().map(|e: &StoredWebhook| e.id.clone());
            let page = self.store.webhooks(after.as_deref(), 1000).await?;
            let last = page.len() < 1000;
            endpoints.extend(page);
            if last {
                return Ok(endpoints);
            }
        }
    }

    /// Starts a task for each enabled endpoint that has none (or whose
    /// task ended, or that changed since), and stops the others'.
    fn reconcile(&self, running: &mut HashMap<String, Running>, endpoints: Vec<StoredWebhook>) {
        let head = self.broker.head();
        let mut seen = std::collections::HashSet::new();
        for endpoint in endpoints {
            seen.insert(endpoint.id.clone());
            let id = endpoint.id.clone();
            self.metrics
                .disabled
                .with_label_values(&[&id])
                .set(i64::from(endpoint.disabled));
            self.metrics
                .lag
                .with_label_values(&[&id])
                .set(head.saturating_sub(endpoint.next_revision.saturating_sub(1)) as i64);
            if let Some(task) = running.get_mut(&id) {
                let current = task.updated_at == endpoint.updated_at && !endpoint.disabled;
                if task.task.0.is_finished() {
                    running.remove(&id);
                } else if !current && !task.stopping {
                    task.stop.cancel();
                    task.stopping = true;
                    continue;
                } else {
                    continue;
                }
            }
            if endpoint.disabled {
                continue;
            }
            self.metrics
                .attempts
                .with_label_values(&[&id])
                .set(i64::from(endpoint.attempts));
            let stop = self.shutdown.child_token();
            let updated_at = endpoint.updated_at;
            let task = Endpoint {
                store: self.store.clone(),
                broker: self.broker.clone(),
                sender: self.sender.clone(),
                options: self.options.clone(),
                metrics: self.metrics.clone(),
                stop: stop.clone(),
                ended: self.changed.clone(),
            };
            let task = AbortOnDrop(tokio::spawn(task.run(endpoint)));
            running.insert(
                id,
                Running {
                    updated_at,
                    stop,
                    stopping: false,
                    task,
                },
            );
        }
        running.retain(|id, task| {
            let keep = seen.contains(id);
            if !keep {
                // Deleted: stopped (the delivery in flight may end, its
                // position update then matches no row).
                task.stop.cancel();
                self.metrics.forget(id);
            }
            keep
        });
    }
}

/// One endpoint's deliveries.
struct Endpoint {
    store: Arc<Store>,
    broker: Arc<Broker>,
    sender: Arc<Sender>,
    options: WebhookOptions,
    metrics: Arc<WebhookMetrics>,
    stop: CancellationToken,
    /// Told when this task ends, so that the deliverer starts its
    /// successor at once.
    ended: Arc<Notify>,
}

/// What ended a pass over the log.
enum Pass {
    /// Go on: read the log again from the endpoint's position.
    Again,
    /// The endpoint's row moved under this task (or a store error): read
    /// it again first.
    Reload,
    /// Disabled or gone: this task ends.
    Done,
}

impl Endpoint {
    async fn run(self, hook: StoredWebhook) {
        self.deliver(hook).await;
        self.ended.notify_one();
    }

    async fn deliver(&self, mut hook: StoredWebhook) {
        let mut failures = 0u32;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let pass = self.pass(&mut hook).await;
            match pass {
                Ok(Pass::Again) => failures = 0,
                Ok(Pass::Done) => return,
                Ok(Pass::Reload) | Err(_) => {
                    if let Err(err) = &pass {
                        tracing::warn!(webhook = %hook.id, error = %err, "webhook delivery paused: the database failed");
                        let backoff = Duration::from_millis(100) * 2u32.saturating_pow(failures);
                        failures = failures.saturating_add(1);
                        if self.sleep(backoff.min(Duration::from_secs(5))).await {
                            return;
                        }
                    }
                    match self.store.webhook(&hook.id).await {
                        Ok(Some(fresh)) if !fresh.disabled => hook = fresh,
                        Ok(_) => return,
                        Err(_) => continue,
                    }
                }
            }
        }
    }

    /// Sleeps; true when the task was stopped meanwhile.
    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => false,
            () = self.stop.cancelled() => true,
        }
    }

    /// Waits for the next attempt's time and for events, then delivers
    /// what the log holds from the endpoint's position, one batch.
    async fn pass(&self, hook: &mut StoredWebhook) -> Result<Pass, StoreError> {
        // Checked when stored: a filter that no longer parses stops the
        // endpoint rather than matching everything.
        let filter = match crate::query::parse(&hook.filter, Kind::User.fields()) {
            Ok(filter) => filter,
            Err(err) => {
                let reason = format!("its filter no longer parses: {err}");
                self.disable(hook, &reason).await;
                return Ok(Pass::Done);
            }
        };
        let filter = filter.as_ref();
        if let Some(at) = hook.next_attempt_at {
            let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if !wait.is_zero() && self.sleep(wait).await {
                return Ok(Pass::Done);
            }
        }
        let after = hook.next_revision.saturating_sub(1);
        let head = self.broker.head();
        if head <= after {
            tokio::select! {
                () = self.broker.moved_past(after) => {}
                () = tokio::time::sleep(self.options.refresh) => {}
                () = self.stop.cancelled() => return Ok(Pass::Done),
            }
            return Ok(Pass::Again);
        }
        let batch = self.options.batch;
        let entries = self.store.read_log(after, head, batch).await?;
        // Pruning removes a prefix of the log and records how far in one
        // transaction: read after the events, a mark below the position
        // proves the read complete (as for Watch and the relay).
        let compacted = self.store.compacted_revision().await?;
        if compacted > after {
            let reason = format!(
                "events {} to {compacted} were pruned (--event-retention) before they were \
                 delivered; ReplayWebhook from revision {} or later, then re-enable it",
                after + 1,
                compacted + 1
            );
            self.disable(hook, &reason).await;
            return Ok(Pass::Done);
        }
        let covered = match entries.last() {
            Some(last) if entries.len() as u64 >= batch => last.revision,
            _ => head,
        };
        // Skipped revisions (voids, other types, not matching) are stored
        // with the next delivery, or at the end of the batch.
        let mut skip_to = hook.next_revision;
        for entry in entries {
            if entry.revision < hook.next_revision {
                continue;
            }
            let Some(event) = entry.event.filter(|event| wanted(hook, filter, event)) else {
                skip_to = entry.revision + 1;
                continue;
            };
            if skip_to > hook.next_revision && !self.advance(hook, skip_to).await? {
                return Ok(Pass::Reload);
            }
            // The endpoint as it is now: a secret rotated, a URL changed
            // or a replay made before this event was written applies to
            // it, whatever this task read before.
            match self.store.webhook(&hook.id).await? {
                Some(fresh) if fresh.disabled => return Ok(Pass::Done),
                Some(fresh)
                    if fresh.next_revision == hook.next_revision
                        && fresh.updated_at == hook.updated_at =>
                {
                    *hook = fresh;
                }
                Some(_) => return Ok(Pass::Reload),
                None => return Ok(Pass::Done),
            }
            let now = Utc::now();
            let (outcome, took) = self.sender.deliver(hook, &event, now).await;
            self.metrics.seconds.observe(took.as_secs_f64());
            match outcome {
                Ok(()) => {
                    self.metrics
                        .deliveries
                        .with_label_values(&[&hook.id, "delivered"])
                        .inc();
                    self.options.pauses.delivered.pass().await;
                    if !self.advance(hook, event.revision + 1).await? {
                        return Ok(Pass::Reload);
                    }
                    skip_to = hook.next_revision;
                }
                Err(failed) => {
                    self.metrics
                        .deliveries
                        .with_label_values(&[&hook.id, "failed"])
                        .inc();
                    return self.failed(hook, failed).await;
                }
            }
            if self.stop.is_cancelled() {
                return Ok(Pass::Done);
            }
        }
        let end = skip_to.max(covered + 1);
        if end > hook.next_revision && !self.advance(hook, end).await? {
            return Ok(Pass::Reload);
        }
        Ok(Pass::Again)
    }

    /// Stores the position `to` (from the one `hook` holds): false when
    /// the row moved meanwhile.
    async fn advance(&self, hook: &mut StoredWebhook, to: u64) -> Result<bool, StoreError> {
        if !self
            .store
            .webhook_delivered(&hook.id, hook.next_revision, to)
            .await?
        {
            return Ok(false);
        }
        hook.next_revision = to;
        hook.attempts = 0;
        hook.last_error.clear();
        hook.next_attempt_at = None;
        hook.failing_since = None;
        self.metrics.attempts.with_label_values(&[&hook.id]).set(0);
        Ok(true)
    }

    /// Records a failed attempt and when to try again, or disables the
    /// endpoint once it has failed for longer than the failure window.
    async fn failed(
        &self,
        hook: &mut StoredWebhook,
        failed: super::sender::Failed,
    ) -> Result<Pass, StoreError> {
        let now = Utc::now();
        let failing_since = hook.failing_since.unwrap_or(now);
        let attempts = hook.attempts.saturating_add(1);
        let failing_for = (now - failing_since).to_std().unwrap_or(Duration::ZERO);
        if failing_for >= self.options.failure_window {
            let reason = |error: &str| {
                format!(
                    "failing since {} (the failure window is {}): {error}",
                    failing_since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    humantime::format_duration(self.options.failure_window),
                )
            };
            self.disable_with(hook, &reason(&failed.error), &reason(&failed.summary))
                .await;
            return Ok(Pass::Done);
        }
        let delay = schedule::delay(
            &self.options.schedule,
            attempts,
            failed.retry_after,
            rand::random::<f64>(),
        );
        let failure = Failure {
            attempts,
            error: failed.error,
            next_attempt_at: now + chrono::Duration::from_std(delay).unwrap_or_default(),
            failing_since,
        };
        // The status or the transport error only: a response's text may
        // hold anything, and stays in the database for GetWebhook.
        tracing::info!(
            webhook = %hook.id,
            revision = hook.next_revision,
            attempts,
            error = %failed.summary.escape_debug(),
            retry_in = %humantime::format_duration(delay),
            "webhook delivery failed; retrying later"
        );
        if !self
            .store
            .webhook_failed(&hook.id, hook.next_revision, &failure)
            .await?
        {
            return Ok(Pass::Reload);
        }
        self.metrics
            .attempts
            .with_label_values(&[&hook.id])
            .set(i64::from(attempts));
        hook.attempts = attempts;
        hook.last_error = failure.error;
        hook.next_attempt_at = Some(failure.next_attempt_at);
        hook.failing_since = Some(failing_since);
        Ok(Pass::Again)
    }

    async fn disable(&self, hook: &StoredWebhook, reason: &str) {
        self.disable_with(hook, reason, reason).await;
    }

    /// Disables the endpoint with `reason` (stored, for GetWebhook);
    /// `logged` is what the log line says (no response body in it).
    async fn disable_with(&self, hook: &StoredWebhook, reason: &str, logged: &str) {
        match self
            .store
            .webhook_disable(&hook.id, hook.next_revision, reason)
            .await
        {
            Ok(true) => {
                self.metrics.disabled_total.inc();
                self.metrics.disabled.with_label_values(&[&hook.id]).set(1);
                tracing::warn!(webhook = %hook.id, reason = %logged.escape_debug(), "webhook endpoint disabled");
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(webhook = %hook.id, error = %err, "cannot disable a webhook endpoint")
            }
        }
    }
}

/// Whether `hook` wants `event`: its types, then its filter (before or
/// after matches, as for Watch).
fn wanted(hook: &StoredWebhook, filter: Option<&Filter>, event: &Event) -> bool {
    let event_type = envelope::event_type(event);
    (hook.event_types.is_empty() || hook.event_types.iter().any(|t| t == event_type))
        && filter.is_none_or(|filter| filter.matches_change(&event.before, &event.after))
}
