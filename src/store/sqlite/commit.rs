//! SQLite group commit. SQLite has one writer at a time, and every commit
//! waits for its fsync; one transaction per call made that wait the limit
//! of the service. The committer takes every write queued at the moment it
//! becomes free (up to [`MAX_GROUP`]) and runs them in one transaction:
//! each in turn, each reading what the previous ones wrote, one commit for
//! all. Every caller still gets exactly its own result:
//! - a write refused before it wrote anything (version mismatch, invalid
//!   result) is answered with that error, and the others go on;
//! - if the group fails as a whole (a database error, a failed commit),
//!   it is rolled back and each write is run again alone, so each gets the
//!   error (or success) it would have got alone;
//! - a write whose caller gave up before the group's transaction began is
//!   not run; once it began, the write runs whether or not its caller
//!   still waits, and the caller is told it may have happened (`Sent`).
//!
//! A write that finds nothing queued and the connection free is a group of
//! one: it runs in its caller's task, without the hand-over to the
//! committer and back (as a lone Get does, `store/reads.rs`).
//!
//! A transaction (`store/transaction.rs`) is one job of the group, under a
//! savepoint, so that one that refuses undoes the others and leaves the
//! rest of the group alone: its rows are read in one statement, each
//! operation is decided in turn, then all of its changes are stored in a
//! few statements whatever their number (`write.rs`). One writer at a
//! time, so its revisions are consecutive.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sea_orm::sqlx::{self, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::write::{read_rows, step, store_changes};
use crate::model::Origin;
use crate::store::StoreError;
use crate::store::conns::{Conns, Held, within};
use crate::store::requests::{Claim, claim_sqlite, record_sqlite};
use crate::store::shared::Shared;
use crate::store::transaction::{Committed, Decided, RequestKey, in_operation, kinds};
use crate::store::write::{Done, Op, Step};

/// Most writes in one transaction: bounds how long the first one waits.
const MAX_GROUP: usize = 64;

/// What makes a job a transaction.
#[derive(Clone)]
struct Txn {
    id: String,
    request: Option<RequestKey>,
}

/// What a job did.
pub(super) enum Ran {
    Single(Done),
    Transaction(Committed),
}

struct Job {
    /// One write, or a transaction's operations.
    ops: Vec<Op>,
    /// A transaction: its operations apply together or not at all, and a
    /// refusal names the operation.
    transaction: Option<Txn>,
    reply: oneshot::Sender<Result<Ran, StoreError>>,
    /// The caller's span, when traced: the group's span joins its trace.
    span: tracing::Span,
}

pub(super) struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs sent and not yet taken by the committer task.
    queued: Arc<AtomicUsize>,
    writer: Arc<Writer>,
}

/// The committer's side: its one connection, and what every write needs.
struct Writer {
    shared: Arc<Shared>,
    connection: Arc<Conns<SqliteConnection>>,
}

impl Committer {
    /// `connection` allows one connection: SQLite has one writer anyway.
    pub(super) fn start(shared: Arc<Shared>, connection: Arc<Conns<SqliteConnection>>) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let writer = Arc::new(Writer { shared, connection });
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(writer.clone(), queue, queued.clone()));
        Committer {
            jobs,
            queued,
            writer,
        }
    }

    pub(super) async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        match self.run(vec![op], None).await? {
            Ran::Single(done) => Ok(done),
            Ran::Transaction(_) => Err(StoreError::Internal(
                "a write answered as a transaction".into(),
            )),
        }
    }

    /// A transaction's operations, all applied or none.
    pub(super) async fn commit(
        &self,
        ops: Vec<Op>,
        request: Option<RequestKey>,
        transaction_id: &str,
    ) -> Result<Committed, StoreError> {
        let transaction = Txn {
            id: transaction_id.to_owned(),
            request,
        };
        match self.run(ops, Some(transaction)).await? {
            Ran::Transaction(committed) => Ok(committed),
            Ran::Single(_) => Err(StoreError::Internal(
                "a transaction answered as a write".into(),
            )),
        }
    }

    async fn run(&self, ops: Vec<Op>, transaction: Option<Txn>) -> Result<Ran, StoreError> {
        if self.queued.load(Ordering::SeqCst) == 0
            && let Some(held) = self.writer.connection.try_get().await
        {
            let span = tracing::info_span!(
                target: crate::otel::TARGET,
                "sqlite.group_commit",
                size = 1i64,
            );
            if let Some(sizes) = self.writer.shared.group_sizes.get() {
                sizes.observe(1.0);
            }
            return self
                .writer
                .run_alone_on(held?, ops, transaction)
                .instrument(span)
                .await;
        }
        let (reply, answer) = oneshot::channel();
        let span = if crate::otel::exporting() {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        };
        let job = Job {
            ops,
            transaction,
            reply,
            span,
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable {
        reason: "the store is shutting down",
        detail: "the SQLite committer has stopped".into(),
    }
}

/// Whether `err` refused one write before it wrote anything, leaving the
/// transaction usable for the rest of the group.
fn refused(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::VersionMismatch { .. }
            | StoreError::Invalid(_)
            | StoreError::SchemaViolation(_)
    )
}

/// Why a job's operations stopped before they all ran.
enum Stopped {
    /// An operation refused (see [`refused`]); what the job wrote must be
    /// undone, and the rest of the transaction is usable.
    Refused(StoreError),
    /// A write's statement wrote nothing: run again, alone.
    StartOver,
    /// The transaction cannot go on.
    Failed(StoreError),
}

/// A job's operations in order, in the transaction on `connection`; with
/// whether it wrote. A transaction claims its request id first, if it has
/// one (and is answered at once if an earlier attempt committed), reads
/// its rows and decides every operation, then stores its changes together
/// (`write::store_changes`, which passes the `transaction_step` pause point
/// between the rows and the events), and records its outcome under the id
/// last.
async fn run_ops(
    shared: &Shared,
    connection: &mut SqliteConnection,
    ops: &mut [Op],
    transaction: Option<&Txn>,
) -> Result<(Ran, bool), Stopped> {
    let mut wrote = false;
    let request = transaction.and_then(|t| t.request.as_ref());
    if let Some(request) = request {
        match claim_sqlite(connection, request).await {
            Ok(Claim::Taken) => wrote = true,
            Ok(Claim::Answered(committed)) => return Ok((Ran::Transaction(committed), false)),
            Err(err) if refused(&err) => return Err(Stopped::Refused(err)),
            Err(err) => return Err(Stopped::Failed(err)),
        }
    }
    let Some(transaction) = transaction else {
        let op = ops
            .first_mut()
            .ok_or_else(|| Stopped::Failed(StoreError::Internal("a job without a write".into())))?;
        return match step(shared, connection, op).await {
            Ok(Step::Unchanged(done)) => Ok((Ran::Single(done), false)),
            Ok(Step::Written(done)) => Ok((Ran::Single(done), true)),
            Ok(Step::StartOver) => Err(Stopped::StartOver),
            Err(err) if refused(&err) => Err(Stopped::Refused(err)),
            Err(err) => Err(Stopped::Failed(err)),
        };
    };
    let current = read_rows(connection, ops).await.map_err(Stopped::Failed)?;
    let mut decided = match Decided::decide(ops, current, shared).await {
        Ok(decided) => decided,
        Err((index, err)) if refused(&err) => {
            return Err(Stopped::Refused(in_operation(index, err)));
        }
        Err((_, err)) => return Err(Stopped::Failed(err)),
    };
    let origins: Vec<&Origin> = ops.iter().map(Op::origin).collect();
    let pause = &shared.pauses.transaction_step;
    match store_changes(connection, &mut decided, &origins, pause).await {
        Ok(Some(())) => {}
        Ok(None) => return Err(Stopped::StartOver),
        Err(err) => return Err(Stopped::Failed(err)),
    }
    let changed = !decided.changes.is_empty();
    let done = decided.answers(ops);
    let committed = Committed::of(&done, &transaction.id);
    if let Some(request) = request {
        record_sqlite(connection, request, &committed)
            .await
            .map_err(Stopped::Failed)?;
    }
    Ok((Ran::Transaction(committed), wrote || changed))
}

async fn execute(connection: &mut SqliteConnection, sql: &'static str) -> Result<(), StoreError> {
    sqlx::raw_sql(sql).execute(connection).await?;
    Ok(())
}

async fn run(
    writer: Arc<Writer>,
    mut queue: mpsc::UnboundedReceiver<Job>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        queued.fetch_sub(group.len(), Ordering::SeqCst);
        group.retain(|job| !job.reply.is_closed());
        if group.is_empty() {
            continue;
        }
        let span = group_span(&group);
        run_group(&writer, group).instrument(span).await;
    }
}

/// A span for the group's transaction, a child of the first write's span
/// and linked from the others: one transaction serves several traces.
fn group_span(group: &[Job]) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::otel::TARGET,
        parent: &group[0].span,
        "sqlite.group_commit",
        size = group.len() as i64,
    );
    if !span.is_disabled() {
        for job in &group[1..] {
            span.follows_from(&job.span);
        }
    }
    span
}

async fn run_group(writer: &Writer, mut group: Vec<Job>) {
    match try_group(writer, &mut group).await {
        Ok(results) => {
            for (job, result) in group.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(_) => {
            // Nothing of the group was committed: each write alone, so that
            // each gets the outcome it would have got without the others.
            // Marked before the check, as in a group: a caller that gave up
            // before it was told its write certainly did not happen, and
            // it is not run.
            for Job {
                ops,
                transaction,
                reply,
                ..
            } in group
            {
                ops.iter().for_each(|op| op.sent().mark());
                if reply.is_closed() {
                    continue;
                }
                let _ = reply.send(writer.run_alone(ops, transaction).await);
            }
        }
    }
}

/// Runs the group in one transaction; Err leaves nothing committed. The
/// writes whose callers gave up while the transaction began (the write
/// lock can take a while) are dropped from `group` and not run.
async fn try_group(
    writer: &Writer,
    group: &mut Vec<Job>,
) -> Result<Vec<Result<Ran, StoreError>>, StoreError> {
    let mut held = writer.begin().await?;
    // Marked before the check: a caller that gives up after its mark is
    // told its write may have happened, and it will (see `Sent`).
    for job in group.iter() {
        job.ops.iter().for_each(|op| op.sent().mark());
    }
    group.retain(|job| !job.reply.is_closed());
    if let (Some(sizes), false) = (writer.shared.group_sizes.get(), group.is_empty()) {
        sizes.observe(group.len() as f64);
    }
    let mut results = Vec::with_capacity(group.len());
    let mut wrote = false;
    for job in group.iter_mut() {
        // A transaction's claim and writes are undone together when one of
        // its operations refuses; a single write that refuses wrote nothing.
        let savepoint = job.transaction.is_some();
        if savepoint {
            execute(held.connection(), "SAVEPOINT txn").await?;
        }
        match run_ops(
            &writer.shared,
            held.connection(),
            &mut job.ops,
            job.transaction.as_ref(),
        )
        .await
        {
            Ok((done, written)) => {
                if savepoint {
                    execute(held.connection(), "RELEASE txn").await?;
                }
                wrote |= written;
                results.push(Ok(done));
            }
            Err(Stopped::StartOver) => {
                // The kind's schemas changed since this process read them
                // (the write's guard failed): run the group again, each
                // job alone, which reads them again.
                rollback(held).await?;
                return Err(StoreError::Internal(
                    "a write had to start over under SQLite".into(),
                ));
            }
            Err(Stopped::Refused(err)) => {
                if savepoint {
                    // Undoes what the transaction's earlier operations
                    // wrote; the group's other jobs stay.
                    execute(held.connection(), "ROLLBACK TO txn").await?;
                    execute(held.connection(), "RELEASE txn").await?;
                }
                results.push(Err(err));
            }
            Err(Stopped::Failed(err)) => {
                let _ = rollback(held).await;
                return Err(err);
            }
        }
    }
    if wrote {
        writer.commit(held).await?;
    } else {
        rollback(held).await?;
    }
    Ok(results)
}

impl Writer {
    /// The connection in a write transaction: the write lock taken up
    /// front (a deferred transaction that reads and then writes can fail
    /// with SQLITE_BUSY mid-way). The wait is what the acquire histogram
    /// records.
    async fn begin(&self) -> Result<Held<SqliteConnection>, StoreError> {
        let timer = self.shared.acquire_timer.get().map(|h| h.start_timer());
        let held = self.connection.get().await?;
        let held = self.begin_on(held).await?;
        drop(timer);
        Ok(held)
    }

    async fn begin_on(
        &self,
        mut held: Held<SqliteConnection>,
    ) -> Result<Held<SqliteConnection>, StoreError> {
        let begun = sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(held.connection())
            .await;
        // On failure the connection is dropped, and closed with it.
        begun?;
        Ok(held)
    }

    /// Commits in a task of its own: once a COMMIT is due, it completes
    /// even if the caller stops waiting, who is then told that the write
    /// may have happened (`Sent`); it must not depend on when they left.
    async fn commit(&self, mut held: Held<SqliteConnection>) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        let commit = tokio::spawn(async move {
            shared.pauses.commit.pass().await;
            let limit = held.limit();
            let committed = within(limit, sqlx::raw_sql("COMMIT").execute(held.connection())).await;
            // A failed COMMIT may leave the transaction open: the
            // connection is closed (on drop), not reused.
            if committed.is_ok() {
                held.release(&committed);
            }
            committed?;
            shared.commits.committed();
            Ok(())
        });
        commit
            .await
            .map_err(|err| StoreError::Internal(format!("the commit task failed: {err}")))?
    }

    /// One job in its own transaction, started over (with the kinds'
    /// schemas read again) while a statement writes nothing.
    async fn run_alone(&self, ops: Vec<Op>, transaction: Option<Txn>) -> Result<Ran, StoreError> {
        let held = self.connection.get().await?;
        self.run_alone_on(held, ops, transaction).await
    }

    /// [`Writer::run_alone`] on a connection already taken.
    async fn run_alone_on(
        &self,
        held: Held<SqliteConnection>,
        mut ops: Vec<Op>,
        transaction: Option<Txn>,
    ) -> Result<Ran, StoreError> {
        let mut first = Some(held);
        loop {
            let mut held = match first.take() {
                Some(held) => {
                    let timer = self.shared.acquire_timer.get().map(|h| h.start_timer());
                    let held = self.begin_on(held).await?;
                    drop(timer);
                    held
                }
                None => self.begin().await?,
            };
            match run_ops(
                &self.shared,
                held.connection(),
                &mut ops,
                transaction.as_ref(),
            )
            .await
            {
                Ok((done, false)) => {
                    rollback(held).await?;
                    return Ok(done);
                }
                Ok((done, true)) => {
                    ops.iter().for_each(|op| op.sent().mark());
                    self.commit(held).await?;
                    return Ok(done);
                }
                Err(Stopped::StartOver) => {
                    rollback(held).await?;
                    for kind in kinds(&ops) {
                        self.shared.schemas.refresh(&self.shared.db, kind).await?;
                    }
                }
                Err(Stopped::Refused(err) | Stopped::Failed(err)) => {
                    let _ = rollback(held).await;
                    return Err(err);
                }
            }
        }
    }
}

async fn rollback(mut held: Held<SqliteConnection>) -> Result<(), StoreError> {
    let rolled_back = sqlx::raw_sql("ROLLBACK").execute(held.connection()).await;
    held.release(&rolled_back);
    rolled_back?;
    Ok(())
}
