//! SQLite: one process owns the file.
//!
//! - One writer at a time: a committer task per process takes every write
//!   queued at the moment it becomes free and runs them in one transaction
//!   with one fsync (`commit.rs`); each write reads, decides and stores in
//!   turn (`write.rs`).
//! - Revisions come from a counter row taken inside the writing
//!   transaction, so the log is dense and in commit order: a revision
//!   missing below a visible one was never committed and never will be.
//! - No other process writes, so there is nothing to announce or listen
//!   for, and the relay's lease is always granted.
//!
//! The committer, the reader and the dispatcher's tail of the log each
//! have a connection of their own, never pinged on release (`conns.rs`).

mod commit;
mod write;

use std::sync::Arc;

use sea_orm::TransactionTrait;
use sea_orm::sqlx::{self, SqliteConnection};

use super::conns::{Conns, within};
use super::entities::{event, metadata};
use super::reads::{PointRead, Reader};
use super::rows::{Logged, decode, logged_from_row};
use super::shared::Shared;
use super::write::{Done, Op};
use super::{StoreError, StoreOptions, log};
use crate::model::{Kind, Record};

pub(super) struct Sqlite {
    shared: Arc<Shared>,
    committer: commit::Committer,
    /// The committer's one connection (kept to close it).
    writing: Arc<Conns<SqliteConnection>>,
    reader: Reader<PointReads>,
    /// The dispatcher's connection.
    tail: Arc<Conns<SqliteConnection>>,
}

impl Sqlite {
    pub(super) fn new(shared: Arc<Shared>, options: &StoreOptions) -> Self {
        let connect = shared
            .db
            .get_sqlite_connection_pool()
            .connect_options()
            .as_ref()
            .clone();
        let one = || Conns::new(connect.clone(), 1, options.connect_timeout);
        let writing = one();
        Sqlite {
            committer: commit::Committer::start(shared.clone(), writing.clone()),
            shared,
            writing,
            reader: Reader::start(one()),
            tail: one(),
        }
    }

    pub(super) async fn get(&self, kind: Kind, id: &str) -> Result<Record, StoreError> {
        self.reader.get(kind, id).await
    }

    pub(super) async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        self.committer.submit(op).await
    }

    pub(super) async fn run_transaction(
        &self,
        ops: Vec<Op>,
        request: Option<&crate::store::RequestKey>,
        transaction_id: &str,
    ) -> Result<crate::store::Committed, StoreError> {
        self.committer
            .commit(ops, request.cloned(), transaction_id)
            .await
    }

    /// The dispatcher's tail of the log, on a connection of its own.
    pub(super) async fn read_log(
        &self,
        after: u64,
        up_to: u64,
        limit: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        let mut held = self.tail.get().await?;
        let call_limit = held.limit();
        let rows = within(call_limit, sqlx::query(
            "SELECT * FROM events WHERE revision > ? AND revision <= ? ORDER BY revision LIMIT ?",
        )
        .bind(log::bound(after))
        .bind(log::bound(up_to))
        .bind(log::bound(limit))
        .fetch_all(held.connection()))
        .await;
        held.release(&rows);
        rows?
            .into_iter()
            .map(|row| logged_from_row(decode::<event::Model>(row)?))
            .collect()
    }

    /// With one writer at a time, everything committed is settled: the
    /// newest revision in the log (or the compaction mark, if the log was
    /// pruned empty).
    pub(super) async fn settled_revision(&self) -> Result<u64, StoreError> {
        let txn = self.shared.db.begin().await?;
        let compacted = log::compacted_revision(&txn).await?;
        let newest = log::newest_revision(&txn).await?;
        txn.commit().await?;
        Ok(newest.max(compacted))
    }

    pub(super) async fn read_revisions(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut held = self.tail.get().await?;
        let call_limit = held.limit();
        let revisions: Result<Vec<i64>, sqlx::Error> = within(
            call_limit,
            sqlx::query_scalar(
                "SELECT revision FROM events WHERE revision > ? ORDER BY revision LIMIT ?",
            )
            .bind(super::log::bound(after))
            .bind(super::log::bound(limit))
            .fetch_all(held.connection()),
        )
        .await;
        held.release(&revisions);
        Ok(revisions?.into_iter().map(|r| r as u64).collect())
    }

    pub(super) async fn close(&self) {
        self.writing.close().await;
        self.tail.close().await;
        self.reader.close().await;
    }
}

/// Point reads: one statement whatever the number of ids, which travel as
/// one JSON array (an `IN` list would be a new statement per size).
pub(super) struct PointReads;

impl PointRead for PointReads {
    type Connection = SqliteConnection;

    async fn read(
        connection: &mut SqliteConnection,
        kind: Kind,
        ids: &[&str],
    ) -> Result<Vec<metadata::Model>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM metadata WHERE kind = ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(kind.as_str())
        .bind(serde_json::json!(ids))
        .fetch_all(connection)
        .await?;
        rows.into_iter().map(decode).collect()
    }
}
