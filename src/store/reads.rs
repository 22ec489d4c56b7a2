//! Point reads, batched under load and inline when alone.
//!
//! Each Get is one query, and on a small machine most of its cost is waking
//! the database process and being woken by it, not the lookup. The reader
//! has one connection of its own (never pinged on release, `conns.rs`). A
//! Get that finds it free and nobody queued reads on it at once, in the
//! caller's task: no hand-over to another task and back. Gets that arrive
//! while it is busy queue, and one reader task reads them together, one
//! `id IN (...)` query per kind, so that batches grow with the load instead
//! of being split between connections (Postgres, 2 cores, 16 clients: 74%
//! of the gRPC-plus-query bound with one reader, 61% with four). A query is
//! issued after every Get in it arrived, so each still sees every write
//! committed before it was asked (reads stay linearizable).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use sea_orm::sqlx;
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use super::StoreError;
use super::conns::{Conns, within};
use super::entities::metadata::Model;
use super::rows::record_from_row;
use crate::model::{Kind, Record};

/// Most ids in one query.
const MAX_BATCH: usize = 64;

/// A backend's point read: the rows of `kind` among `ids`.
pub(super) trait PointRead: Send + Sync + 'static {
    type Connection: sqlx::Connection;

    fn read<'a>(
        connection: &'a mut Self::Connection,
        kind: Kind,
        ids: &'a [&'a str],
    ) -> impl Future<Output = Result<Vec<Model>, StoreError>> + Send + 'a;
}

struct Job {
    kind: Kind,
    id: String,
    reply: oneshot::Sender<Result<Record, StoreError>>,
    /// The caller's span, when traced: the batch's span joins its trace.
    span: tracing::Span,
}

struct Shared<R: PointRead> {
    /// One connection: the reader's.
    connection: Arc<Conns<R::Connection>>,
    queue: Mutex<Vec<Job>>,
    /// Raised when a job is queued.
    queued: Notify,
}

pub(super) struct Reader<R: PointRead> {
    shared: Arc<Shared<R>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R: PointRead> Drop for Reader<R> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<R: PointRead> Reader<R> {
    /// `connection` should allow one connection: a second would split the
    /// batches.
    pub(super) fn start(connection: Arc<Conns<R::Connection>>) -> Self {
        let shared = Arc::new(Shared {
            connection,
            queue: Mutex::default(),
            queued: Notify::new(),
        });
        let task = tokio::spawn(run(shared.clone()));
        Reader { shared, task }
    }

    /// Closes the reader's connection: later Gets fail with UNAVAILABLE.
    pub(super) async fn close(&self) {
        self.shared.connection.close().await;
    }

    pub(super) async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        let shared = &self.shared;
        if shared.queue().is_empty()
            && let Some(held) = shared.connection.try_get().await
        {
            let mut held = held?;
            let ids = [id];
            // A batch of one, named as every read is.
            let span = tracing::info_span!(
                target: crate::otel::TARGET,
                "db.read_batch",
                kind = kind.as_str(),
                size = 1i64,
            );
            let limit = held.limit();
            let rows = within(limit, R::read(held.connection(), kind, &ids))
                .instrument(span)
                .await;
            held.release(&rows);
            // Gets that queued meanwhile found the connection busy.
            if !shared.queue().is_empty() {
                shared.queued.notify_one();
            }
            let row = rows?.into_iter().next();
            return Ok(row.map_or_else(|| Record::empty(kind, id.to_owned()), record_from_row));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            kind,
            id: id.to_owned(),
            reply,
            span: if crate::otel::exporting() {
                tracing::Span::current()
            } else {
                tracing::Span::none()
            },
        };
        shared.queue().push(job);
        shared.queued.notify_one();
        answer.await.map_err(|_| stopped())?
    }
}

impl<R: PointRead> Shared<R> {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable {
        reason: "the store is shutting down",
        detail: "the batched reader has stopped".into(),
    }
}

async fn run<R: PointRead>(shared: Arc<Shared<R>>) {
    loop {
        shared.queued.notified().await;
        loop {
            // The connection first: Gets that arrive while it is busy join
            // this batch.
            let held = shared.connection.get().await;
            let mut batch: Vec<Job> = {
                let mut queue = shared.queue();
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            batch.retain(|job| !job.reply.is_closed());
            if batch.is_empty() {
                // Unused, so still good: back to the stack, not closed.
                if let Ok(held) = held {
                    held.release::<(), StoreError>(&Ok(()));
                }
                if shared.queue().is_empty() {
                    break;
                }
                continue;
            }
            let mut held = match held {
                Ok(held) => held,
                Err(err) => {
                    for job in batch {
                        let _ = job.reply.send(Err(err.clone()));
                    }
                    continue;
                }
            };
            let mut outcome = Ok(());
            for kind in [Kind::User, Kind::Organization] {
                let jobs: Vec<Job> = batch.extract_if(.., |job| job.kind == kind).collect();
                if jobs.is_empty() {
                    continue;
                }
                let span = batch_span(kind, &jobs);
                let ids: Vec<&str> = jobs.iter().map(|job| job.id.as_str()).collect();
                let limit = held.limit();
                let rows = within(limit, R::read(held.connection(), kind, &ids))
                    .instrument(span)
                    .await;
                if let Err(err) = &rows {
                    outcome = Err(err.clone());
                }
                answer(kind, jobs, rows);
            }
            held.release(&outcome);
        }
    }
}

fn answer(kind: Kind, jobs: Vec<Job>, rows: Result<Vec<Model>, StoreError>) {
    match rows {
        Ok(rows) => {
            let found: HashMap<String, Record> = rows
                .into_iter()
                .map(|row| (row.id.clone(), record_from_row(row)))
                .collect();
            for job in jobs {
                // The same id may be asked twice in one batch.
                let record = found
                    .get(&job.id)
                    .cloned()
                    .unwrap_or_else(|| Record::empty(kind, job.id.clone()));
                let _ = job.reply.send(Ok(record));
            }
        }
        Err(err) => {
            // Each caller gets its own error value; they share the cause.
            for job in jobs {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}

/// A span for one batched query, a child of the first caller's span and
/// linked from the others: one query answers several traces.
fn batch_span(kind: Kind, jobs: &[Job]) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::otel::TARGET,
        parent: &jobs[0].span,
        "db.read_batch",
        kind = kind.as_str(),
        size = jobs.len() as i64,
    );
    if !span.is_disabled() {
        for job in &jobs[1..] {
            span.follows_from(&job.span);
        }
    }
    span
}
