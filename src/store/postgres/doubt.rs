//! Writes whose connection failed after they were sent (issue 27).
//!
//! When a write's last message (a Merge's one statement, a transaction's
//! COMMIT) has gone out and the connection then breaks or times out, the
//! database may have committed the write or not, and the broken
//! connection cannot say which. Answering UNAVAILABLE ("not applied,
//! retry") would be wrong whenever it did commit, and a retried
//! `expected_version` write would then fail or, worse, apply twice. So
//! the writer finds out before it answers, on another connection:
//!
//! 1. It ends the session that ran the write. Every writer's connection
//!    opens a session named for it alone (`Conns::named`); if that session
//!    still runs (a partition leaves it open, in its transaction, holding
//!    its row lock), it is terminated, and waited for until it is gone.
//!    From then on the outcome is final: committed, or rolled back.
//! 2. It looks for its own change in the log ([`Trace`]).
//! 3. Found: the write's answer is success. Not found: UNAVAILABLE, which
//!    is now certain.
//!
//! While the database cannot be reached, it tries again; the call's
//! budget ends the wait, and the caller is told that the write may have
//! been applied (DEADLINE_EXCEEDED). Ending a session that is already
//! gone costs nothing, so every failure that closes a writer's connection
//! is settled this way, whatever it was.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use serde_json::Value;

use super::Postgres;
use crate::model::Kind;
use crate::store::StoreError;

/// Where a write's change is in the log, if it committed.
pub(super) enum Trace<'a> {
    /// A transaction knows the revision it took (it holds the revision's
    /// advisory lock until it ends, so no one else can commit it).
    Revision {
        kind: Kind,
        id: &'a str,
        revision: u64,
    },
    /// A Merge's one statement took its revision inside the database. It
    /// writes only on top of the revision it read, so if it committed,
    /// the row's first change after that revision is this write's, with
    /// its `after` snapshot (but the revision, which the statement sets).
    FirstAfter {
        kind: Kind,
        id: &'a str,
        after: u64,
        snapshot: &'a Value,
    },
}

/// Waits between attempts while the database cannot be reached.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a terminated session is waited for, per attempt.
const TERMINATE_WAIT_MS: i64 = 2000;
/// Gives up for a caller with no budget of its own; a call's budget
/// (`--db-timeout` or the client's deadline) is normally much shorter.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

impl Postgres {
    /// The revision the write behind `session` committed, or None if it
    /// certainly did not commit (see the module's comment). `failure` is
    /// what broke the write's connection, for the answer's detail.
    pub(super) async fn settle(
        &self,
        session: &str,
        trace: Trace<'_>,
        failure: &(dyn std::fmt::Display + Sync),
    ) -> Result<Option<u64>, StoreError> {
        settle(&self.shared.db, session, failure, || self.find(&trace)).await
    }

    async fn find(&self, trace: &Trace<'_>) -> Result<Option<u64>, StoreError> {
        let statement = match *trace {
            Trace::Revision { kind, id, revision } => Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT revision FROM events WHERE revision = $1 AND kind = $2 AND id = $3",
                [(revision as i64).into(), kind.as_str().into(), id.into()],
            ),
            Trace::FirstAfter {
                kind,
                id,
                after,
                snapshot,
            } => Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT revision FROM (SELECT revision, after FROM events \
                 WHERE kind = $1 AND id = $2 AND revision > $3 ORDER BY revision LIMIT 1) first \
                 WHERE first.after - 'revision' = $4::jsonb - 'revision'",
                [
                    kind.as_str().into(),
                    id.into(),
                    (after as i64).into(),
                    snapshot.clone().into(),
                ],
            ),
        };
        let found = self.shared.db.query_one_raw(statement).await?;
        Ok(found
            .map(|row| row.try_get::<i64>("", "revision"))
            .transpose()?
            .map(|revision| revision as u64))
    }
}

/// Ends, in the background, the session of a writer's connection that
/// failed before its write was sent: the answer (not applied) is already
/// certain, but a session left open by a partition would hold the row's
/// lock, and every later write to the row would wait for it.
pub(super) fn end_session_later(db: &DatabaseConnection, session: Arc<str>) {
    let db = db.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + GIVE_UP_AFTER;
        let mut wait = RETRY_FIRST;
        while end_session(&db, &session).await.is_err() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    });
}

/// Terminates the session named `session` if it still runs, and waits
/// (a while) until it is gone; UNAVAILABLE if it is not yet.
async fn end_session(db: &DatabaseConnection, session: &str) -> Result<(), StoreError> {
    let left = db
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT count(*) FILTER (WHERE NOT pg_terminate_backend(pid, $2)) AS left \
             FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            [session.into(), TERMINATE_WAIT_MS.into()],
        ))
        .await?
        .map(|row| row.try_get::<i64>("", "left"))
        .transpose()?
        .unwrap_or(0);
    if left > 0 {
        return Err(StoreError::unavailable(
            "a failed write's session is still ending",
            format!("{left} session(s) outlived {TERMINATE_WAIT_MS} ms"),
        ));
    }
    Ok(())
}

/// Ends the session and then looks for the write with `find`, trying
/// again while the database cannot be reached (see the module's comment).
pub(in crate::store) async fn settle<T, F, Found>(
    db: &DatabaseConnection,
    session: &str,
    failure: &(dyn std::fmt::Display + Sync),
    find: F,
) -> Result<Option<T>, StoreError>
where
    F: Fn() -> Found,
    Found: Future<Output = Result<Option<T>, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + GIVE_UP_AFTER;
    let mut wait = RETRY_FIRST;
    loop {
        let attempt = async {
            end_session(db, session).await?;
            find().await
        };
        match attempt.await {
            Ok(found) => {
                tracing::info!(
                    committed = found.is_some(),
                    "settled a write whose connection failed after it was sent"
                );
                return Ok(found);
            }
            // Unreachable, for now.
            Err(StoreError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
            Err(err) => {
                return Err(StoreError::InDoubt {
                    detail: format!("{failure}; then, settling it: {err}"),
                });
            }
        }
    }
}

/// A write that certainly did not commit: UNAVAILABLE, "retry".
pub(in crate::store) fn not_applied(failure: impl std::fmt::Display) -> StoreError {
    StoreError::NotApplied {
        detail: failure.to_string(),
    }
}
