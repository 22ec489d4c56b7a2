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
use super::history::{PageQuery, PageRead};
use super::reads::{PointRead, Reader};
use super::rows::{Logged, decode, logged_from_row};
use super::shared::Shared;
use super::write::{Done, Op};
use super::{PAGE_CONNECTIONS, StoreError, StoreOptions, log};
use crate::model::{Kind, Record};

pub(super) struct Sqlite {
    shared: Arc<Shared>,
    committer: commit::Committer,
    /// The committer's one connection (kept to close it).
    writing: Arc<Conns<SqliteConnection>>,
    reader: Reader<PointReads>,
    /// The dispatcher's connection.
    tail: Arc<Conns<SqliteConnection>>,
    /// History pages' connections.
    pages: Arc<Conns<SqliteConnection>>,
}

/// One page of a record's history and the compaction mark in one row and
/// one statement: the page's revisions as `1,2,3`, or its events as one
/// JSON array, because sqlx-sqlite hands each row over from its worker
/// thread on its own, and 51 hand-overs cost more than the query. The
/// stored snapshots are JSON text already: they are pasted in, not parsed.
/// `?3` bounds the revisions, `?4` is the limit.
macro_rules! history_page_sql {
    (revisions, $compare:literal, $order:literal) => {
        concat!(
            "SELECT (SELECT compacted FROM revisions WHERE id = 1) AS compacted, \
             (SELECT group_concat(revision) \
             FROM (SELECT revision FROM events WHERE kind = ?1 AND id = ?2 AND revision ",
            $compare,
            " ?3 ORDER BY revision ",
            $order,
            " LIMIT ?4)) AS page"
        )
    };
    (events, $compare:literal, $order:literal) => {
        concat!(
            "SELECT (SELECT compacted FROM revisions WHERE id = 1) AS compacted, \
             (SELECT '[' || COALESCE(group_concat('{\"revision\":' || revision \
             || ',\"kind\":' || json_quote(kind) || ',\"id\":' || json_quote(id) \
             || ',\"change_type\":' || json_quote(change_type) \
             || ',\"changed_fields\":' || changed_fields || ',\"before\":' || before \
             || ',\"after\":' || after || ',\"committed_at\":' || json_quote(committed_at) \
             || ',\"actor\":' || json_quote(actor) || ',\"trace_id\":' || json_quote(trace_id) \
             || ',\"transaction_id\":' || json_quote(transaction_id) || '}', ','), '') || ']' \
             FROM (SELECT * FROM events WHERE kind = ?1 AND id = ?2 AND revision ",
            $compare,
            " ?3 ORDER BY revision ",
            $order,
            " LIMIT ?4)) AS page"
        )
    };
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
            pages: Conns::new(connect, PAGE_CONNECTIONS, options.connect_timeout),
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

    /// Up to `limit` events of one record after (oldest first) or before
    /// `bound`, as `what` asks, and the compaction mark.
    pub(super) async fn history_page(
        &self,
        page: &PageQuery<'_>,
        what: PageRead,
    ) -> Result<(i64, Option<String>), StoreError> {
        let sql = what.pick(
            page.oldest_first,
            [
                history_page_sql!(revisions, ">", "ASC"),
                history_page_sql!(revisions, "<", "DESC"),
                history_page_sql!(events, ">", "ASC"),
                history_page_sql!(events, "<", "DESC"),
            ],
        );
        super::history::read_page_sqlite(&self.pages, sql, page).await
    }

    pub(super) async fn close(&self) {
        self.writing.close().await;
        self.tail.close().await;
        self.pages.close().await;
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
