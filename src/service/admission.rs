//! What every call must pass before any work is done, and the time budget
//! it then works within; a Watch stream also holds a place under the stream
//! bound for as long as it is open.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::error;
use crate::health::DbHealth;
use crate::reason::Reason;
use crate::store::Sent;

/// How many calls may be in progress at once.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Unary calls.
    pub max_concurrent: usize,
    /// Watch streams: each holds memory and a task for as long as it is open.
    pub max_streams: usize,
}

pub struct Admission {
    permits: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    bounds: Bounds,
    /// Watch streams refused for want of a place.
    streams_refused: IntCounter,
    db_timeout: Duration,
    db: Arc<DbHealth>,
    /// Cancelled once the server starts to stop: new calls are refused.
    draining: CancellationToken,
}

/// An admitted unary call: holds its concurrency permit until dropped.
pub struct Call {
    _permit: Option<OwnedSemaphorePermit>,
    budget: Duration,
    /// Whether the budget is the client's deadline (else the database timeout).
    client_deadline: bool,
    db_timeout: Duration,
}

/// A Watch stream's place under the stream bound; given back when dropped.
pub struct StreamPermit {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(
        bounds: Bounds,
        streams_refused: IntCounter,
        db_timeout: Duration,
        db: Arc<DbHealth>,
        draining: CancellationToken,
    ) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(bounds.max_concurrent)),
            streams: Arc::new(Semaphore::new(bounds.max_streams)),
            bounds,
            streams_refused,
            db_timeout,
            db,
            draining,
        }
    }

    /// Admits a unary call: refuses an expired deadline, a database known to
    /// be down, and a call past the concurrency bound, each at once rather
    /// than after queueing.
    pub fn unary(&self, metadata: &MetadataMap) -> Result<Call, Status> {
        let mut call = self.check(metadata)?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            error::exhausted(
                format!(
                    "the server is at its limit of {} concurrent requests; retry with backoff",
                    self.bounds.max_concurrent
                ),
                Reason::TooManyRequests,
                "max_concurrent_requests",
                self.bounds.max_concurrent,
            )
        })?;
        call._permit = Some(permit);
        Ok(call)
    }

    /// Admits a Watch stream. The unary bound does not apply (a stream is
    /// long-lived and mostly idle); the stream bound does, refused at once
    /// when full. The stream must hold the permit for as long as it is open
    /// ([`StreamPermit::hold`]).
    pub fn stream(&self, metadata: &MetadataMap) -> Result<(Call, StreamPermit), Status> {
        let call = self.check(metadata)?;
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.streams_refused.inc();
            return Err(error::exhausted(
                format!(
                    "the server is at its limit of {} Watch streams; retry with backoff or on \
                     another replica",
                    self.bounds.max_streams
                ),
                Reason::TooManyStreams,
                "max_watch_streams",
                self.bounds.max_streams,
            ));
        };
        Ok((call, StreamPermit { _permit: permit }))
    }

    /// What every call must pass, streams included.
    fn check(&self, metadata: &MetadataMap) -> Result<Call, Status> {
        let deadline = grpc_timeout(metadata);
        if deadline == Some(Duration::ZERO) {
            return Err(error::deadline_expired(
                "the deadline expired before the call started",
            ));
        }
        if self.draining.is_cancelled() {
            return Err(error::shutting_down(
                "server is shutting down; retry on another replica or later",
            ));
        }
        if !self.db.is_up() {
            return Err(error::unavailable(
                "database unavailable; retry later",
                Reason::DatabaseUnavailable,
            ));
        }
        // Give up a little before the client does, so that it receives this
        // server's DEADLINE_EXCEEDED rather than only its own cancellation.
        let (budget, client_deadline) = match deadline {
            Some(d) if d < self.db_timeout => (d - (d / 4).min(Duration::from_millis(100)), true),
            _ => (self.db_timeout, false),
        };
        Ok(Call {
            _permit: None,
            budget,
            client_deadline,
            db_timeout: self.db_timeout,
        })
    }
}

impl StreamPermit {
    /// `stream`, holding this permit until the stream is dropped: tonic
    /// drops a response stream when it ends or when the client goes away.
    pub fn hold<S: Stream>(self, stream: S) -> Held<S> {
        Held {
            stream,
            _permit: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream with its [`StreamPermit`].
    pub struct Held<S> {
        #[pin]
        stream: S,
        _permit: StreamPermit,
    }
}

impl<S: Stream> Stream for Held<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.project().stream.poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.stream.size_hint()
    }
}

impl Call {
    /// The call with `budget` instead of --db-timeout, unless the client's
    /// own deadline is shorter: for work that is long by nature (a
    /// SetSchema checks every stored value).
    pub fn with_budget(mut self, budget: Duration) -> Call {
        if !self.client_deadline {
            self.budget = budget;
        }
        self
    }

    /// Runs the call's work within its budget.
    pub async fn run<T, E>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, Status>
    where
        Status: From<E>,
    {
        match tokio::time::timeout(self.budget, work).await {
            Ok(result) => result.map_err(Status::from),
            Err(_) if self.client_deadline => Err(error::deadline_expired("deadline exceeded")),
            Err(_) => Err(self.timed_out()),
        }
    }
}

impl Call {
    /// Runs a write within the call's budget. When the budget runs out,
    /// the status says whether the write may have happened: UNAVAILABLE
    /// (retry) only when it certainly did not, DEADLINE_EXCEEDED (gRPC's
    /// "may have completed": read before retrying) once it may have.
    pub async fn run_write<T, E>(
        &self,
        sent: &Sent,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Status>
    where
        Status: From<E>,
    {
        // `timeout` has dropped `work` when it returns: a write not yet
        // marked as sent can no longer be (see `Sent`).
        match tokio::time::timeout(self.budget, work).await {
            Ok(result) => result.map_err(Status::from),
            Err(_) if self.client_deadline && sent.may_have_committed() => {
                // The client's deadline, as gRPC words it; the reason
                // says what the code alone cannot: it may have happened.
                Err(error::in_doubt("deadline exceeded"))
            }
            Err(_) if self.client_deadline => Err(error::deadline_expired("deadline exceeded")),
            Err(_) if sent.may_have_committed() => Err(error::in_doubt(format!(
                "the database did not confirm the write within {:?}; it may have been applied: \
                 read before retrying",
                self.db_timeout
            ))),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Status {
        error::unavailable(
            format!(
                "the database did not answer within {:?}; retry later",
                self.db_timeout
            ),
            Reason::DatabaseTimeout,
        )
    }
}

/// The client's deadline from the `grpc-timeout` header: digits and a unit
/// (H, M, S, m, u, n). Unparseable values are ignored, as tonic does.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&metadata)
    }

    #[test]
    fn a_longer_budget_never_outlasts_the_clients_deadline() {
        let call = |budget, client_deadline| Call {
            _permit: None,
            budget,
            client_deadline,
            db_timeout: Duration::from_secs(5),
        };
        let long = Duration::from_secs(600);
        assert_eq!(
            call(Duration::from_secs(5), false).with_budget(long).budget,
            long
        );
        let client = Duration::from_secs(2);
        assert_eq!(call(client, true).with_budget(long).budget, client);
    }

    #[test]
    fn parses_grpc_timeout() {
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("0n"), Some(Duration::ZERO));
        assert_eq!(timeout_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout_of("S"), None);
        assert_eq!(timeout_of("123456789S"), None);
        assert_eq!(timeout_of("5x"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }

    /// One permit of each kind; the token starts the drain.
    fn admission(db_timeout: Duration) -> (Admission, CancellationToken) {
        let draining = CancellationToken::new();
        let db = Arc::new(DbHealth::default());
        let bounds = Bounds {
            max_concurrent: 1,
            max_streams: 1,
        };
        let refused = IntCounter::new("refused", "refused").unwrap();
        (
            Admission::new(bounds, refused, db_timeout, db, draining.clone()),
            draining,
        )
    }

    #[test]
    fn calls_after_the_drain_starts_are_unavailable() {
        let (admission, draining) = admission(Duration::from_secs(5));
        drop(admission.unary(&MetadataMap::new()).unwrap());
        draining.cancel();
        for status in [
            admission.unary(&MetadataMap::new()).err().unwrap(),
            admission.stream(&MetadataMap::new()).err().unwrap(),
        ] {
            assert_eq!(status.code(), Code::Unavailable);
            assert!(status.message().contains("shutting down"), "{status:?}");
            let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
            assert_eq!(info.reason, "SHUTTING_DOWN");
        }
    }

    #[test]
    fn expired_deadline_is_refused_before_anything_else() {
        let admission = admission(Duration::from_secs(5)).0;
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "0n".parse().unwrap());
        for status in [
            admission.unary(&metadata).err().unwrap(),
            admission.stream(&metadata).err().unwrap(),
        ] {
            assert_eq!(status.code(), Code::DeadlineExceeded);
            let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
            assert_eq!(info.reason, "DEADLINE_EXPIRED");
        }
        // The refused call took no permit.
        assert!(admission.unary(&MetadataMap::new()).is_ok());
    }

    #[tokio::test]
    async fn bound_and_budget() {
        let admission = admission(Duration::from_millis(50)).0;
        let first = admission.unary(&MetadataMap::new()).unwrap();
        let refused = admission.unary(&MetadataMap::new()).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        // Streams do not count against the unary bound.
        assert!(admission.stream(&MetadataMap::new()).is_ok());
        let slow = first
            .run(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<(), Status>(())
            })
            .await;
        assert_eq!(slow.unwrap_err().code(), Code::Unavailable);
        drop(first);
        assert!(admission.unary(&MetadataMap::new()).is_ok());
    }

    #[tokio::test]
    async fn a_stream_holds_its_place_until_dropped() {
        use tokio_stream::StreamExt;

        let admission = admission(Duration::from_secs(5)).0;
        let (_, permit) = admission.stream(&MetadataMap::new()).unwrap();
        let mut held = permit.hold(tokio_stream::iter([1, 2]));
        let refused = admission.stream(&MetadataMap::new()).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("limit of 1 Watch streams"));
        assert_eq!(admission.streams_refused.get(), 1);
        // Unary calls have a bound of their own.
        assert!(admission.unary(&MetadataMap::new()).is_ok());
        // Still held after the stream is exhausted, given back on drop.
        assert_eq!(held.next().await, Some(1));
        assert_eq!(held.next().await, Some(2));
        assert_eq!(held.next().await, None);
        assert!(admission.stream(&MetadataMap::new()).is_err());
        drop(held);
        assert!(admission.stream(&MetadataMap::new()).is_ok());
        assert_eq!(admission.streams_refused.get(), 2);
    }
}
