//! A lease that at most one process holds at a time, for work that must run
//! once per database however many replicas run it (the NATS relay).
//!
//! On Postgres it is a session advisory lock on a connection of its own:
//! Postgres releases it the moment that connection ends, so a holder killed
//! with SIGKILL frees it as soon as its socket closes, and a standby polling
//! with `pg_try_advisory_lock` takes over within one poll. (On SQLite one
//! process owns the file, so the lease is always granted: [`Lease::sole`].)

use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::{Connection, PgConnection};

use super::Postgres;
use crate::store::StoreError;

/// `application_name` of a lease's connection, so that an operator (or a
/// test) can find the holder in `pg_stat_activity`.
pub const LEASE_APPLICATION_NAME: &str = "metadata-service relay lease";

/// First key of the two-key advisory lock: "metl" in ASCII, so that the
/// service's locks do not collide with another application's, and never
/// with the writers' revision locks ("meta", `log.rs`): a lease whose name
/// hashed to a revision would make every dispatcher wait for that
/// revision's "writer" for as long as the lease is held. The second key is
/// the lease's name, hashed by Postgres.
const LOCK_CLASS: i32 = 0x6d65_746c;

/// A held lease. Dropping it (or losing its connection) releases it.
pub struct Lease {
    /// None on SQLite.
    connection: Option<PgConnection>,
}

impl Lease {
    /// Whether the lease is still held: its connection answers. A lease
    /// whose connection broke was released by Postgres, and another process
    /// may hold it now.
    pub async fn check(&mut self, timeout: Duration) -> bool {
        match &mut self.connection {
            None => true,
            Some(connection) => matches!(
                tokio::time::timeout(timeout, connection.ping()).await,
                Ok(Ok(()))
            ),
        }
    }
}

impl Lease {
    /// The lease of a store only one process uses (SQLite): always granted.
    pub(in crate::store) fn sole() -> Lease {
        Lease { connection: None }
    }
}

impl Postgres {
    /// Takes the lease called `name` if no other process holds it: `None`
    /// when another does.
    pub(in crate::store) async fn try_lease(
        &self,
        name: &str,
    ) -> Result<Option<Lease>, StoreError> {
        let options: PgConnectOptions = self
            .shared
            .db
            .get_postgres_connection_pool()
            .connect_options()
            .as_ref()
            .clone()
            .application_name(LEASE_APPLICATION_NAME)
            // A holder cut off without its socket closing (a partition, a
            // frozen node) keeps the lock until Postgres notices the
            // session is dead: seconds with these, two hours with Linux's
            // keepalive defaults, during which no replica could take over.
            .options([
                ("tcp_keepalives_idle", "5"),
                ("tcp_keepalives_interval", "2"),
                ("tcp_keepalives_count", "3"),
                ("tcp_user_timeout", "10000"),
            ]);
        let mut connection = PgConnection::connect_with(&options)
            .await
            .map_err(|e| StoreError::unavailable("cannot connect for the relay lease", e))?;
        let (taken,): (bool,) =
            sea_orm::sqlx::query_as("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(name)
                .fetch_one(&mut connection)
                .await
                .map_err(|e| StoreError::unavailable("cannot take the relay lease", e))?;
        if taken {
            Ok(Some(Lease {
                connection: Some(connection),
            }))
        } else {
            // Closing politely; the lock was never ours.
            let _ = connection.close().await;
            Ok(None)
        }
    }
}
