//! Postgres: many replicas on one database.
//!
//! - Revisions come from a sequence; each writer holds an advisory lock on
//!   its revision until it ends, and the dispatcher settles a revision
//!   missing below a visible one by waiting for that writer or writing a
//!   void in its place (`log.rs`).
//! - A Merge or Replace of an existing row is two round trips: a batched
//!   point read without a lock, then one statement (`write_change.sql`)
//!   that writes only if the row is still at the revision read; anything
//!   else runs in a transaction that locks the row first (`write.rs`).
//! - Replicas hear of each other's commits by LISTEN/NOTIFY, sent after
//!   commits by one announcer per server, never inside them (`notify.rs`).
//! - A lease (a session advisory lock) elects one relay (`lease.rs`).
//!
//! - A write whose connection fails after it was sent is settled before it
//!   is answered: committed or certainly not (`doubt.rs`).
//!
//! The reader, the writers and the dispatcher's tail of the log use
//! connections outside sqlx's pool, never pinged on release (`conns.rs`).

mod doubt;
mod lease;
mod log;
mod notify;
mod transaction;
mod write;

use std::sync::Arc;

use sea_orm::sqlx;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};

use super::conns::{Conns, within};
use super::entities::{event, metadata};
use super::history::{PageQuery, PageRead};
use super::reads::{PointRead, Reader};
use super::rows::{Logged, decode, logged_from_row};
use super::shared::Shared;
use super::{PAGE_CONNECTIONS, StoreError, StoreOptions};
use crate::model::Kind;

/// One page of a record's history and the compaction mark, in one row:
/// the page's revisions as `1,2,3`, or its events as one JSON array.
/// `$3` bounds the revisions, `$4` is the limit.
macro_rules! history_page_sql {
    (revisions, $compare:literal, $order:literal) => {
        concat!(
            "SELECT (SELECT compacted FROM revisions WHERE id = 1) AS compacted, \
             array_to_string(ARRAY(SELECT revision FROM events \
             WHERE kind = $1 AND id = $2 AND revision ",
            $compare,
            " $3 ORDER BY revision ",
            $order,
            " LIMIT $4), ',') AS page"
        )
    };
    (events, $compare:literal, $order:literal) => {
        concat!(
            "SELECT (SELECT compacted FROM revisions WHERE id = 1) AS compacted, \
             (SELECT COALESCE(json_agg(json_build_object('revision', revision, 'kind', kind, \
             'id', id, 'change_type', change_type, 'changed_fields', changed_fields, \
             'before', before, 'after', after, 'committed_at', committed_at, 'actor', actor, \
             'trace_id', trace_id, 'transaction_id', transaction_id) ORDER BY revision ",
            $order,
            "), '[]')::text FROM (SELECT * FROM events WHERE kind = $1 AND id = $2 AND revision ",
            $compare,
            " $3 ORDER BY revision ",
            $order,
            " LIMIT $4) e) AS page"
        )
    };
}

pub(super) use doubt::{not_applied, settle};
pub use lease::{LEASE_APPLICATION_NAME, Lease};
pub use log::take_revision_sql;
pub use notify::{
    ANNOUNCER_APPLICATION_NAME, AnnouncerState, CommitAnnouncer, CommitListener, Heard,
};

pub(super) struct Postgres {
    shared: Arc<Shared>,
    /// The writers' connections.
    conns: Arc<Conns<PgConnection>>,
    reader: Reader<PointReads>,
    /// The dispatcher's: writers queued on a busy row never hold up the
    /// log's tail.
    tail: Arc<Conns<PgConnection>>,
    /// History pages' connections.
    pages: Arc<Conns<PgConnection>>,
    announcer_state: Arc<AnnouncerState>,
}

impl Postgres {
    pub(super) fn new(shared: Arc<Shared>, options: &StoreOptions) -> Self {
        let connect: PgConnectOptions = shared
            .db
            .get_postgres_connection_pool()
            .connect_options()
            .as_ref()
            .clone();
        // Named: a write whose connection fails is settled by ending its
        // session (`doubt.rs`).
        let conns = Conns::named(
            connect.clone(),
            options.max_connections,
            options.connect_timeout,
            |options: &PgConnectOptions, session| options.clone().application_name(session),
        );
        let reader = Reader::start(Conns::new(connect.clone(), 1, options.connect_timeout));
        Postgres {
            shared,
            conns,
            reader,
            tail: Conns::new(connect.clone(), 1, options.connect_timeout),
            pages: Conns::new(connect, PAGE_CONNECTIONS, options.connect_timeout),
            announcer_state: Arc::default(),
        }
    }

    pub(super) async fn get(
        &self,
        kind: Kind,
        id: &str,
    ) -> Result<crate::model::Record, StoreError> {
        self.reader.get(kind, id).await
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
        let rows = within(
            call_limit,
            sqlx::query(
                "SELECT * FROM events WHERE revision > $1 AND revision <= $2 \
             ORDER BY revision LIMIT $3",
            )
            .bind(super::log::bound(after))
            .bind(super::log::bound(up_to))
            .bind(super::log::bound(limit))
            .fetch_all(held.connection()),
        )
        .await;
        held.release(&rows);
        rows?
            .into_iter()
            .map(|row| logged_from_row(decode::<event::Model>(row)?))
            .collect()
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
                "SELECT revision FROM events WHERE revision > $1 ORDER BY revision LIMIT $2",
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
    /// `bound`, as `what` asks, and the compaction mark: one statement and
    /// one row, rather than a row per event.
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
        super::history::read_page_postgres(&self.pages, sql, page).await
    }

    pub(super) async fn close(&self) {
        self.conns.close().await;
        self.tail.close().await;
        self.pages.close().await;
        self.reader.close().await;
    }
}

/// Point reads: one statement whatever the number of ids (an `IN` list
/// would be a new prepared statement, and a round trip, per size).
pub(super) struct PointReads;

impl PointRead for PointReads {
    type Connection = PgConnection;

    async fn read(
        connection: &mut PgConnection,
        kind: Kind,
        ids: &[&str],
    ) -> Result<Vec<metadata::Model>, StoreError> {
        let rows = sqlx::query("SELECT * FROM metadata WHERE kind = $1 AND id = ANY($2)")
            .bind(kind.as_str())
            .bind(ids)
            .fetch_all(connection)
            .await?;
        rows.into_iter().map(decode).collect()
    }
}

/// Whether `err` is the database's answer with this SQLSTATE.
fn sqlstate_is(err: &sqlx::Error, code: &str) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|c| c == code)
}
