//! Waiting for a state a test can observe (a row count, a gauge, a health
//! status, a stream's content) instead of sleeping for a time that is
//! usually enough. A wait returns as soon as the state is there, so its
//! limit can be generous for a loaded machine without slowing the suite;
//! when the limit passes, the failure names what was awaited and what was
//! seen instead.

use std::fmt::Debug;
use std::time::Duration;

/// How long after a failed check the next one is made: short next to every
/// limit, long enough not to busy a shared machine.
const POLL: Duration = Duration::from_millis(20);

/// Runs `check` until it returns Ok, and returns that value. `check`
/// returns Err with what it saw instead; the last one is in the panic
/// message when `limit` passes first (`what` says what was awaited).
pub async fn until<T, E: Debug>(
    what: &str,
    limit: Duration,
    check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    match within(limit, check).await {
        Ok(value) => value,
        Err(seen) => panic!("{what}: not within {limit:?}; last seen: {seen:?}"),
    }
}

/// [`until`] for a caller that handles the timeout itself (it measures a
/// recovery, or reports everything that is late): the last Err when
/// `limit` passes.
pub async fn within<T, E>(
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen = match check().await {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(seen);
        }
        // The poll interval of every wait for state in the tests: the one
        // place they pass time.
        tokio::time::sleep(POLL).await;
    }
}
