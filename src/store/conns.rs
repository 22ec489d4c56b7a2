//! Connections for the hot paths, kept out of sqlx's pool.
//!
//! sqlx 0.9 pings every connection returned to its pool
//! (`PoolConnection::return_to_pool`, not configurable): one more round
//! trip after every point read, every write and every read of the log,
//! which on two shared cores cost a third of a Merge's round trips. The
//! reader, the writers and the event dispatcher therefore take their
//! connections from a [`Conns`]: idle connections on a stack, at most
//! `max` in use, connected on demand and never pinged. Instead of a ping,
//! a connection goes back only when its last call left it in a known state
//! ([`Held::release`] after a success or an error the database answered);
//! one dropped mid-call (cancelled) or broken is closed, and the next user
//! connects anew. The pool stays for everything else (migrations, schemas,
//! queries, pruning).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx::{self, ConnectOptions, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StoreError;

/// Connections of one kind to one database, without a release ping.
pub(super) struct Conns<C: Connection> {
    options: <C as Connection>::Options,
    /// Gives each new connection a session name of its own (see
    /// [`Conns::named`]).
    name: Option<Namer<C>>,
    idle: Mutex<Vec<Idle<C>>>,
    permits: Arc<Semaphore>,
    /// How long to wait for a free connection, or for a new one.
    timeout: Duration,
    closed: AtomicBool,
}

/// How long a connection may sit idle before it is pinged on reuse, as
/// the pool does (`test_before_acquire_if_idle_for`): a database restart or
/// a dropped idle socket then costs a reconnect, not a failed call.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(10);

/// The options a connection is opened with, given its session name.
type Namer<C> = fn(&<C as Connection>::Options, &str) -> <C as Connection>::Options;

struct Idle<C> {
    connection: C,
    session: Option<Arc<str>>,
    since: Instant,
}

/// A connection in use. Dropped without [`Held::release`], it is closed.
pub(super) struct Held<C: Connection> {
    connection: Option<C>,
    session: Option<Arc<str>>,
    home: Arc<Conns<C>>,
    _permit: OwnedSemaphorePermit,
}

impl<C: Connection> Conns<C> {
    pub(super) fn new(
        options: <C as Connection>::Options,
        max: u32,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Conns {
            options,
            name: None,
            idle: Mutex::default(),
            permits: Arc::new(Semaphore::new(max.max(1) as usize)),
            timeout,
            closed: AtomicBool::new(false),
        })
    }

    /// Connections that each open a session the database knows by a name
    /// of its own ([`Held::session`]), which `name` sets in the options: a
    /// connection lost mid-call leaves a session that can then be found
    /// and ended from another connection.
    pub(super) fn named(
        options: <C as Connection>::Options,
        max: u32,
        timeout: Duration,
        name: Namer<C>,
    ) -> Arc<Self> {
        let mut conns = Self::new(options, max, timeout);
        Arc::get_mut(&mut conns).expect("not shared yet").name = Some(name);
        conns
    }

    /// A connection, waiting for one to be free (at most the timeout).
    pub(super) async fn get(self: &Arc<Self>) -> Result<Held<C>, StoreError> {
        let permit = tokio::time::timeout(self.timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| StoreError::unavailable("no database connection available", "timed out"))?
            .map_err(|_| closed())?;
        self.held(permit).await
    }

    /// A connection only if one is free now: a caller with another way to
    /// go (a queue) does not wait.
    pub(super) async fn try_get(self: &Arc<Self>) -> Option<Result<Held<C>, StoreError>> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.held(permit).await)
    }

    async fn held(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Result<Held<C>, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let idle = match idle {
            Some(mut idle) if idle.since.elapsed() >= PING_IF_IDLE_FOR => {
                let alive = tokio::time::timeout(self.timeout, idle.connection.ping()).await;
                matches!(alive, Ok(Ok(()))).then_some(idle)
            }
            idle => idle,
        };
        if let Some(Idle {
            connection,
            session,
            ..
        }) = idle
        {
            return Ok(Held {
                connection: Some(connection),
                session,
                home: self.clone(),
                _permit: permit,
            });
        }
        let session = self.name.map(|_| new_session_name("writer"));
        let options = match (self.name, &session) {
            (Some(name), Some(session)) => name(&self.options, session),
            _ => self.options.clone(),
        };
        let connection = tokio::time::timeout(self.timeout, options.connect())
            .await
            .map_err(|_| StoreError::unavailable("cannot connect to the database", "timed out"))?
            // Whatever the reason (refused, a database that does not
            // accept connections now), as the pool reports it.
            .map_err(|err| StoreError::unavailable("cannot connect to the database", err))?;
        Ok(Held {
            connection: Some(connection),
            session,
            home: self.clone(),
            _permit: permit,
        })
    }

    /// Closes the idle connections, and every other one as it comes back;
    /// later calls fail with UNAVAILABLE.
    pub(super) async fn close(&self) {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            self.closed.store(true, Ordering::SeqCst);
            std::mem::take(&mut *idle)
        };
        self.permits.close();
        for idle in idle {
            let _ = idle.connection.close().await;
        }
    }
}

/// How long one call on a hot-path connection may take, as a multiple of
/// the connect timeout: a peer that vanished without closing its socket
/// (a partition, a frozen host) would otherwise hold the call, and the
/// task that made it, for the kernel's retransmission timeout (about a
/// quarter of an hour), and with the reader's one connection every Get.
const CALL_LIMIT_FACTOR: u32 = 2;

/// Runs `call` for at most `limit`; past it, a timed-out I/O error, which
/// closes the connection on release (see [`Reuse`]).
pub(super) async fn within<T, E: From<sqlx::Error>>(
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(limit, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(E::from(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the database did not answer in time",
        )))),
    }
}

impl<C: Connection> Held<C> {
    /// The longest one call on this connection may take (see [`within`]).
    pub(super) fn limit(&self) -> Duration {
        self.home.timeout * CALL_LIMIT_FACTOR
    }

    /// The session name of a connection from [`Conns::named`].
    pub(super) fn session(&self) -> Option<Arc<str>> {
        self.session.clone()
    }

    pub(super) fn connection(&mut self) -> &mut C {
        // Only `release` takes it, and that consumes the guard.
        self.connection.as_mut().expect("a held connection")
    }

    /// Returns the connection for reuse if `outcome` leaves it usable: a
    /// success, or an error the database itself answered (the connection
    /// is in step with it). Anything else closes it.
    pub(super) fn release<T, E: Reuse>(mut self, outcome: &Result<T, E>) {
        let usable = outcome.as_ref().err().is_none_or(Reuse::leaves_usable);
        if !usable {
            return;
        }
        // Checked under the stack's lock, which `close` takes after setting
        // it: a connection is either drained by `close` or never pushed.
        let mut idle = self.home.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !self.home.closed.load(Ordering::SeqCst)
            && let Some(connection) = self.connection.take()
        {
            idle.push(Idle {
                connection,
                session: self.session.take(),
                since: Instant::now(),
            });
        }
    }
}

/// Whether a connection is still usable after a call failed with this.
pub(super) trait Reuse {
    fn leaves_usable(&self) -> bool;
}

impl Reuse for sqlx::Error {
    /// An error the database answered, unless it says the session is over
    /// or in doubt (a shutdown, a lost connection, a terminated backend:
    /// what the store reports as UNAVAILABLE).
    fn leaves_usable(&self) -> bool {
        matches!(self, sqlx::Error::Database(_)) && StoreError::from_sqlx(self).leaves_usable()
    }
}

impl Reuse for StoreError {
    /// Conservative: a transient failure may be a broken connection, and a
    /// new one costs only a connect.
    fn leaves_usable(&self) -> bool {
        !matches!(
            self,
            StoreError::Unavailable { .. }
                | StoreError::NotApplied { .. }
                | StoreError::InDoubt { .. }
                | StoreError::ReadOnly(_)
        )
    }
}

/// A session name no other connection has, on any replica: what it is for
/// (a word), a random number for the process (from the standard library's
/// hash seed) and a counter. Short of Postgres's 63 bytes.
pub(super) fn new_session_name(role: &str) -> Arc<str> {
    use std::hash::{BuildHasher, Hasher};
    static PROCESS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("metadata-service {role} {:016x}.{n}", *PROCESS).into()
}

fn closed() -> StoreError {
    StoreError::unavailable("the store is shutting down", "its connections are closed")
}
