//! Pause points: named places in the server's own tasks where a test can
//! stop the code, act while it is stopped, and let it go on. Races between
//! the dispatcher, the streams and the writers are tested this way, at a
//! chosen moment, rather than by hoping a stress run hits them.
//!
//! A point that is not armed costs one atomic load; the server never arms
//! one itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// A place in the code that stops while armed. Clones share one state.
#[derive(Clone, Default)]
pub struct PausePoint(Arc<State>);

struct State {
    /// How many more passes stop.
    armed: AtomicUsize,
    /// A permit per stopped pass, taken by the test that waits for it.
    reached: Semaphore,
    /// A permit per pass the test lets go on.
    released: Semaphore,
}

impl Default for State {
    fn default() -> Self {
        State {
            armed: AtomicUsize::new(0),
            reached: Semaphore::new(0),
            released: Semaphore::new(0),
        }
    }
}

impl std::fmt::Debug for PausePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PausePoint")
            .field("armed", &self.0.armed.load(Ordering::Relaxed))
            .finish()
    }
}

impl PausePoint {
    /// Called by the code under test: stops here if the point is armed,
    /// until the test releases it.
    pub async fn pass(&self) {
        let armed = self
            .0
            .armed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if armed.is_ok() {
            self.0.reached.add_permits(1);
            if let Ok(permit) = self.0.released.acquire().await {
                permit.forget();
            }
        }
    }

    /// The next `passes` passes stop.
    pub fn arm(&self, passes: usize) {
        self.0.armed.fetch_add(passes, Ordering::AcqRel);
    }

    /// Waits until a pass has stopped here; false if none did within `wait`.
    pub async fn reached(&self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.0.reached.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                true
            }
            _ => false,
        }
    }

    /// Lets one stopped pass go on.
    pub fn release(&self) {
        self.0.released.add_permits(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_only_armed_passes() {
        let point = PausePoint::default();
        // Unarmed: passes straight through.
        tokio::time::timeout(Duration::from_secs(1), point.pass())
            .await
            .expect("an unarmed point does not stop");
        point.arm(1);
        let task = tokio::spawn({
            let point = point.clone();
            async move {
                point.pass().await;
                point.pass().await;
            }
        });
        assert!(point.reached(Duration::from_secs(5)).await);
        assert!(!task.is_finished());
        point.release();
        task.await.unwrap();
        assert!(!point.reached(Duration::from_millis(10)).await);
    }
}
