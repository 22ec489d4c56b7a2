//! How replicas on one Postgres database learn of each other's commits:
//! LISTEN on one channel, and NOTIFY on it after commits, never inside them.
//!
//! A `NOTIFY` inside a write transaction makes Postgres take a
//! database-wide lock at commit and hold it through the commit record's
//! flush, so notifying transactions commit one at a time and lose group
//! commit (half the write rate on the database alone, BENCHMARKS.md). So
//! writers only raise [`Commits`]; one [`CommitAnnouncer`] per server sends
//! at most one `NOTIFY` at a time, on a connection of its own with
//! `synchronous_commit = off` (its transaction writes nothing worth a flush),
//! covering every commit since its previous one. A lost notification costs
//! latency, never an event: every dispatcher also reads the log at least
//! every `--watch-poll-interval` (1 s), and re-reads it after reconnecting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener};
use sea_orm::sqlx::{Connection, Executor, PgConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Postgres;
use crate::pause::PausePoint;
use crate::store::StoreError;

/// Postgres channel on which commits are announced to all replicas.
const CHANNEL: &str = "metadata_events";

/// `application_name` of the announcer's connection, so that an operator
/// (or a test) can find it in `pg_stat_activity`.
pub const ANNOUNCER_APPLICATION_NAME: &str = "metadata-service notifier";

/// The announcer's counts of `NOTIFY`s, for the metrics, and the backend
/// of its connection, whose notifications this server's listener skips.
#[derive(Debug, Default)]
pub struct AnnouncerState {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// 0 while not connected.
    backend_pid: AtomicU32,
}

/// Tells the other replicas, after this server's commits, that the log
/// moved: one `NOTIFY` at a time, each covering every commit since the
/// previous one.
pub struct CommitAnnouncer {
    options: PgConnectOptions,
    commits: Arc<Notify>,
    stats: Arc<AnnouncerState>,
    connection: Option<PgConnection>,
    pause: PausePoint,
}

/// The first retry after a failed `NOTIFY` is at once (the usual cause is a
/// connection that died while idle); later ones back off up to the poll's
/// order of magnitude, since the poll covers a lost notification anyway.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

impl CommitAnnouncer {
    fn new(
        pool_options: &PgConnectOptions,
        commits: Arc<Notify>,
        stats: Arc<AnnouncerState>,
        pause: PausePoint,
    ) -> Self {
        let options = pool_options
            .clone()
            .application_name(ANNOUNCER_APPLICATION_NAME)
            .options([("synchronous_commit", "off")]);
        CommitAnnouncer {
            options,
            commits,
            stats,
            connection: None,
            pause,
        }
    }

    /// Announces commits until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                () = self.commits.notified() => {}
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = self.pause.pass() => {}
                () = shutdown.cancelled() => return,
            }
            match self.announce().await {
                Ok(()) => {
                    failures = 0;
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    self.connection = None;
                    if failures == 0 {
                        tracing::debug!(error = %err, "commit notification failed; reconnecting");
                    } else {
                        tracing::warn!(error = %err, "commit notifications failing; replicas fall back to polling");
                    }
                    // Try again for the commits this one was to announce.
                    self.commits.notify_one();
                    let backoff = match failures {
                        0 => Duration::ZERO,
                        n => (RETRY_BACKOFF.0 * 2u32.saturating_pow(n - 1)).min(RETRY_BACKOFF.1),
                    };
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn announce(&mut self) -> Result<(), sea_orm::sqlx::Error> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => {
                self.stats.backend_pid.store(0, Ordering::Relaxed);
                let mut connection = PgConnection::connect_with(&self.options).await?;
                let (pid,): (i32,) = sea_orm::sqlx::query_as("SELECT pg_backend_pid()")
                    .fetch_one(&mut connection)
                    .await?;
                self.stats.backend_pid.store(pid as u32, Ordering::Relaxed);
                self.connection.insert(connection)
            }
        };
        // A statement of its own, outside any write: Postgres delivers it
        // when this one-statement transaction commits.
        connection.execute(sea_orm::sqlx::raw_sql(NOTIFY)).await?;
        Ok(())
    }
}

impl Postgres {
    /// The task that tells other replicas of this store's commits (run it
    /// with [`CommitAnnouncer::run`]).
    pub(in crate::store) fn commit_announcer(&self) -> CommitAnnouncer {
        CommitAnnouncer::new(
            &self
                .shared
                .db
                .get_postgres_connection_pool()
                .connect_options(),
            self.shared.commits.announce.clone(),
            self.announcer_state.clone(),
            self.shared.pauses.announce.clone(),
        )
    }

    pub(in crate::store) fn announcer_state(&self) -> &AnnouncerState {
        &self.announcer_state
    }

    /// A listener for commits made by any replica.
    pub(in crate::store) async fn listen_for_commits(&self) -> Result<CommitListener, StoreError> {
        let pool = self.shared.db.get_postgres_connection_pool();
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(|e| StoreError::unavailable("cannot listen for events", e))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(|e| StoreError::unavailable("cannot listen for events", e))?;
        Ok(CommitListener {
            listener,
            own: self.announcer_state.clone(),
        })
    }
}

/// `NOTIFY` takes an identifier, which cannot be a bound parameter.
const NOTIFY: &str = "NOTIFY metadata_events";

/// Wakes a replica whenever another replica commits (Postgres LISTEN).
pub struct CommitListener {
    listener: PgListener,
    /// This server's own announcer, whose commits woke the dispatcher in
    /// process already: a second wake-up would cost a second read of the
    /// log for nothing.
    own: Arc<AnnouncerState>,
}

/// What [`CommitListener::next`] heard.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Another server's notification, or a lost-and-restored connection
    /// (after which the caller must re-read the table: notifications sent
    /// meanwhile are gone).
    Commits,
    /// The pool was closed: the server is stopping. No connection will come
    /// back, and the listener must be dropped, since closing the pool waits
    /// for the connection it holds.
    Closed,
}

impl CommitListener {
    pub async fn next(&mut self) -> Result<Heard, StoreError> {
        loop {
            match self.listener.try_recv().await {
                Ok(Some(notification))
                    if notification.process_id()
                        == self.own.backend_pid.load(Ordering::Relaxed) => {}
                Ok(_) => return Ok(Heard::Commits),
                Err(sea_orm::sqlx::Error::PoolClosed) => return Ok(Heard::Closed),
                Err(err) => {
                    return Err(StoreError::unavailable(
                        "event notifications interrupted",
                        err,
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notify_statement_names_the_listened_channel() {
        assert_eq!(NOTIFY, format!("NOTIFY {CHANNEL}"));
    }
}
