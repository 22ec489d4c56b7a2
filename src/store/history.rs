//! History, read from the event log: one record's events, and records as
//! they were right after a revision.
//!
//! A record's state at revision R is its row when the row's revision is at
//! most R; otherwise it is the `before` of the record's first event after
//! R (a record's events follow its writes in revision order, so that
//! `before` is what the last change at or below R left). One query finds
//! those first events for any number of ids, through the `events_record`
//! index (kind, id, revision); a read at the current revision needs it only
//! for the rows a concurrent write moved past R meanwhile.

use std::collections::HashMap;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, FromQueryResult, Statement};

use super::entities::event;
use super::log::bound;
use super::rows::{PagedEvent, event_from_row, record_from_row};
use super::{Backend, Store, StoreError};
use crate::model::{Event, Kind, Record};
use crate::query::Filter;

/// One page of a List as of a revision.
#[derive(Debug)]
pub struct ListedAt {
    /// Ordered by id, at most the limit asked.
    pub records: Vec<Record>,
    /// Where the next page starts after, when there may be one: past the
    /// last record, or past ids scanned whose records did not belong.
    pub next_after: Option<String>,
}

/// Events of one record, and the compaction mark read with them.
#[derive(Debug)]
pub struct HistoryRead {
    pub events: Vec<Arc<Event>>,
    /// Every event up to it has been pruned.
    pub compacted: u64,
}

/// One page of a record's history as the backends read it.
pub(super) struct PageQuery<'a> {
    pub kind: Kind,
    pub id: &'a str,
    /// Revisions strictly after it (oldest first) or before it.
    pub bound: i64,
    pub oldest_first: bool,
    pub limit: i64,
}

/// What a backend's history page statement answers besides the compaction
/// mark.
#[derive(Clone, Copy)]
pub(super) enum PageRead {
    /// The revisions of the page's events, as `3,2,1`.
    Revisions,
    /// The page's events, as one JSON array.
    Events,
}

impl PageRead {
    /// Which of a backend's four page statements runs: `[revisions
    /// oldest first, revisions newest first, events oldest first, events
    /// newest first]`.
    pub(super) fn pick(self, oldest_first: bool, statements: [&'static str; 4]) -> &'static str {
        let [revisions_asc, revisions_desc, events_asc, events_desc] = statements;
        match (self, oldest_first) {
            (PageRead::Revisions, true) => revisions_asc,
            (PageRead::Revisions, false) => revisions_desc,
            (PageRead::Events, true) => events_asc,
            (PageRead::Events, false) => events_desc,
        }
    }
}

/// A backend's `history_page`: its page statement (`history_page_sql!`,
/// one per dialect) run on one of its page connections (never pinged on
/// release), bounded by the call's time limit. One body for both
/// connection types, as `requests.rs` does.
macro_rules! read_history_page {
    ($name:ident, $connection:ty) => {
        pub(super) async fn $name(
            pages: &std::sync::Arc<super::conns::Conns<$connection>>,
            sql: &'static str,
            page: &PageQuery<'_>,
        ) -> Result<(i64, Option<String>), StoreError> {
            let mut held = pages.get().await?;
            let call_limit = held.limit();
            let row: Result<(i64, Option<String>), sea_orm::sqlx::Error> = super::conns::within(
                call_limit,
                sea_orm::sqlx::query_as(sql)
                    .bind(page.kind.as_str())
                    .bind(page.id)
                    .bind(page.bound)
                    .bind(page.limit)
                    .fetch_one(held.connection()),
            )
            .await;
            held.release(&row);
            Ok(row?)
        }
    };
}

read_history_page!(read_page_sqlite, sea_orm::sqlx::SqliteConnection);
read_history_page!(read_page_postgres, sea_orm::sqlx::PgConnection);

/// Events read by history pages, by revision, up to a total weight (about
/// their JSON text's length): a record's recent history is read again and
/// again (a page of 50 is 100 snapshots to decode), and an event never
/// changes once committed. Pruned events are never asked for again (the
/// page's revisions come from the log), and age out.
pub(super) struct EventCache(quick_cache::sync::Cache<u64, (Arc<Event>, u64), ByWeight>);

/// The cache's bound on the JSON text of the events it holds.
const CACHED_EVENT_BYTES: u64 = 8 << 20;

#[derive(Clone)]
pub(super) struct ByWeight;

impl quick_cache::Weighter<u64, (Arc<Event>, u64)> for ByWeight {
    fn weight(&self, _: &u64, value: &(Arc<Event>, u64)) -> u64 {
        value.1.max(1)
    }
}

impl EventCache {
    pub(super) fn new() -> Self {
        EventCache(quick_cache::sync::Cache::with_weighter(
            4096,
            CACHED_EVENT_BYTES,
            ByWeight,
        ))
    }

    fn get(&self, revision: &u64) -> Option<Arc<Event>> {
        self.0.get(revision).map(|(event, _)| event)
    }

    fn insert(&self, event: Arc<Event>, weight: u64) {
        self.0.insert(event.revision, (event, weight));
    }
}

#[derive(FromQueryResult)]
struct Bounds {
    newest: i64,
    compacted: i64,
}

impl Store {
    /// The newest revision in the log (an event or a void; older ones may
    /// still be in flight) and the compaction mark, in one statement.
    pub async fn log_bounds(&self) -> Result<(u64, u64), StoreError> {
        let statement = Statement::from_string(
            self.shared.db.get_database_backend(),
            "SELECT COALESCE((SELECT MAX(revision) FROM events), 0) AS newest, \
             (SELECT compacted FROM revisions WHERE id = 1) AS compacted",
        );
        let bounds = Bounds::find_by_statement(statement)
            .one(&self.shared.db)
            .await?
            .ok_or_else(|| StoreError::Internal("the revisions row is missing".into()))?;
        Ok((bounds.newest as u64, bounds.compacted as u64))
    }

    /// Up to `limit` events of one record, newest first unless
    /// `oldest_first`, strictly after (or before, newest first) `cursor`,
    /// and the compaction mark as of the same read (one statement: a
    /// prune commits its deletions and its mark together). The page's
    /// revisions are read first; when the cache holds all of their events
    /// (an event never changes once committed), that is the only statement.
    pub async fn history(
        &self,
        kind: Kind,
        id: &str,
        cursor: Option<u64>,
        oldest_first: bool,
        limit: u64,
    ) -> Result<HistoryRead, StoreError> {
        let page = PageQuery {
            kind,
            id,
            bound: match (cursor, oldest_first) {
                (Some(cursor), _) => bound(cursor),
                (None, true) => 0,
                (None, false) => i64::MAX,
            },
            oldest_first,
            limit: bound(limit),
        };
        let (compacted, revisions) = self.history_page(&page, PageRead::Revisions).await?;
        let cached: Option<Vec<Arc<Event>>> = revisions
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| r.parse::<u64>().ok().and_then(|r| self.events.get(&r)))
            .collect();
        if let Some(events) = cached {
            return Ok(HistoryRead { events, compacted });
        }
        let (compacted, json) = self.history_page(&page, PageRead::Events).await?;
        let json = json.unwrap_or_default();
        let paged: Vec<PagedEvent> = serde_json::from_str(&json)
            .map_err(|err| StoreError::Internal(format!("malformed history page: {err}")))?;
        // A rough share of the page's text each, as the cache weighs them.
        let weight = json.len() as u64 / paged.len().max(1) as u64;
        let mut events = paged
            .into_iter()
            .map(|paged| {
                let event = Arc::new(paged.into_event()?);
                self.events.insert(event.clone(), weight);
                Ok(event)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // An aggregate's order is the database's choice.
        match oldest_first {
            true => events.sort_unstable_by_key(|e| e.revision),
            false => events.sort_unstable_by_key(|e| std::cmp::Reverse(e.revision)),
        }
        Ok(HistoryRead { events, compacted })
    }

    async fn history_page(
        &self,
        page: &PageQuery<'_>,
        what: PageRead,
    ) -> Result<(u64, Option<String>), StoreError> {
        let (compacted, read) = match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.history_page(page, what).await?,
            Backend::Postgres(postgres) => postgres.history_page(page, what).await?,
        };
        Ok((compacted as u64, read))
    }

    /// The records of the distinct `ids`, in the order they first appear,
    /// as they were right after `revision` (which must be settled: nothing
    /// at or below it may still commit). FAILED_PRECONDITION when events
    /// after `revision` were pruned: the compaction mark comes with the
    /// rows, in one statement, so that a caller need not ask for it first.
    pub async fn get_many_at(
        &self,
        kind: Kind,
        ids: &[String],
        revision: u64,
    ) -> Result<Vec<Record>, StoreError> {
        let mut sql = self.sql();
        sql.push(
            "SELECT r.compacted AS compacted, m.* FROM revisions r LEFT JOIN metadata m \
             ON m.kind = ",
        );
        sql.bind(kind.as_str()).push(" AND m.id IN (");
        sql.json_array_elements(serde_json::json!(ids))
            .push(") WHERE r.id = 1");
        let rows = self.shared.db.query_all_raw(sql.statement()).await?;
        let mut found: HashMap<String, Record> = HashMap::with_capacity(rows.len());
        for row in rows {
            let compacted: i64 = row.try_get("", "compacted")?;
            if compacted as u64 > revision {
                return Err(StoreError::RevisionCompacted {
                    requested: revision,
                    oldest: compacted as u64,
                });
            }
            // The revisions row alone: none of the ids has a row.
            if row.try_get::<Option<String>>("", "id")?.is_none() {
                continue;
            }
            let record = record_from_row(super::entities::metadata::Model::from_query_result(
                &row, "",
            )?);
            found.insert(record.id.clone(), record);
        }
        let mut seen = std::collections::HashSet::new();
        let mut records: Vec<Record> = ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .map(|id| {
                found
                    .remove(id)
                    .unwrap_or_else(|| Record::empty(kind, id.clone()))
            })
            .collect();
        let newer: Vec<&str> = records
            .iter()
            .filter(|record| record.revision > revision)
            .map(|record| record.id.as_str())
            .collect();
        if newer.is_empty() {
            return Ok(records);
        }
        let mut then = self.states_at(kind, Some(&newer), revision).await?;
        for record in &mut records {
            if record.revision > revision {
                *record = then.remove(&record.id).ok_or_else(|| {
                    StoreError::Internal(format!(
                        "no event after revision {revision} for a row past it"
                    ))
                })?;
            }
        }
        Ok(records)
    }

    /// One record as it was right after `revision` (settled).
    pub async fn get_at(&self, kind: Kind, id: &str, revision: u64) -> Result<Record, StoreError> {
        let mut records = self.get_many_at(kind, &[id.to_owned()], revision).await?;
        records
            .pop()
            .ok_or_else(|| StoreError::Internal("a requested id was not answered".into()))
    }

    /// Up to `page_size` records of `kind` that existed and matched
    /// `filter` right after `revision` (settled), in List's order, from
    /// the first id after `after`. The page is read as List reads it, at
    /// the current state; then every record some write moved past
    /// `revision` is taken back to its state then (found from the events
    /// after `revision`: few for a fresh revision, so the filter still runs
    /// in the database for everything else).
    pub async fn list_at(
        &self,
        kind: Kind,
        filter: Option<&Filter>,
        after: Option<&str>,
        page_size: u64,
        revision: u64,
    ) -> Result<ListedAt, StoreError> {
        let scanned = self.list(kind, filter, after, page_size + 1).await?;
        // After the page: any row it read past `revision` has its event
        // visible by now.
        let moved = self.states_at(kind, None, revision).await?;
        // Past the last id scanned, a full scan says nothing.
        let bound = match scanned.len() as u64 > page_size {
            true => scanned.last().map(|r| r.id.clone()),
            false => None,
        };
        let mut records: Vec<Record> = scanned
            .into_iter()
            .filter(|record| !moved.contains_key(&record.id))
            .collect();
        let joining: Vec<Record> = moved
            .into_values()
            .filter(|then| then.version > 0 && filter.is_none_or(|f| f.matches(&then.fields)))
            .collect();
        if !joining.is_empty() {
            records = self
                .merge_in_order(records, joining, after, bound.as_deref())
                .await?;
        }
        let next_after = if records.len() as u64 > page_size {
            records.truncate(page_size as usize);
            records.last().map(|r| r.id.clone())
        } else {
            // Everything up to the bound is in the page.
            bound
        };
        Ok(ListedAt {
            records,
            next_after,
        })
    }

    /// `page` (in List's order) with those of `joining` that fall after
    /// `after` and up to `bound`, all in List's order: the id column's
    /// collation, which on Postgres may be a language's, not byte order.
    /// The database sorts the ids (one more query, only when a record
    /// changed under the read joins the page).
    async fn merge_in_order(
        &self,
        page: Vec<Record>,
        joining: Vec<Record>,
        after: Option<&str>,
        bound: Option<&str>,
    ) -> Result<Vec<Record>, StoreError> {
        let mut names: Vec<&str> = page.iter().chain(&joining).map(|r| r.id.as_str()).collect();
        names.extend(after);
        names.extend(bound);
        let mut sql = self.sql();
        sql.push("SELECT id FROM (");
        sql.json_array_elements(serde_json::json!(names))
            .push(") AS i ORDER BY id");
        let sorted = self.shared.db.query_all_raw(sql.statement()).await?;
        let mut rank = HashMap::new();
        for (position, row) in sorted.iter().enumerate() {
            let id: String = row.try_get("", "id")?;
            rank.entry(id).or_insert(position);
        }
        let rank_of = |id: &str| rank.get(id).copied().unwrap_or(usize::MAX);
        let (low, high) = (after.map(rank_of), bound.map(rank_of));
        let mut records = page;
        records.extend(joining.into_iter().filter(|then| {
            let at = rank_of(&then.id);
            low.is_none_or(|low| at > low) && high.is_none_or(|high| at <= high)
        }));
        records.sort_by_key(|r| rank_of(&r.id));
        Ok(records)
    }

    /// The state right after `revision` of each record of `kind` (among
    /// `ids` when given) with an event after it: its first such event's
    /// `before`. FAILED_PRECONDITION when events after `revision` are
    /// pruned, read in the same statement as the events (a prune deletes
    /// and moves the mark in one transaction): a first event found after a
    /// prune that took the true first would be the wrong state.
    async fn states_at(
        &self,
        kind: Kind,
        ids: Option<&[&str]>,
        revision: u64,
    ) -> Result<HashMap<String, Record>, StoreError> {
        let rows = self
            .shared
            .db
            .query_all_raw(self.states_at_statement(kind, ids, revision))
            .await?;
        let mut states = HashMap::with_capacity(rows.len());
        for row in rows {
            let compacted: i64 = row.try_get("", "compacted")?;
            if compacted as u64 > revision {
                return Err(StoreError::RevisionCompacted {
                    requested: revision,
                    oldest: compacted as u64,
                });
            }
            let event = event_from_row(event::Model::from_query_result(&row, "")?)?;
            states.insert(event.before.id.clone(), event.before);
        }
        if states.is_empty() && ids.is_some() {
            // No event at all after `revision` for rows past it: pruned.
            let oldest = self.compacted_revision().await?;
            if oldest > revision {
                return Err(StoreError::RevisionCompacted {
                    requested: revision,
                    oldest,
                });
            }
        }
        Ok(states)
    }

    /// The query [`Store::states_at`] runs (public for tests that EXPLAIN
    /// it). With ids, one lookup of `events_record` per id, written per
    /// dialect so that no planner misjudges a JSON array's length into a
    /// scan of the whole log. Without ids, the events after
    /// `revision` by primary key, few for a fresh revision: the kind is
    /// compared as an expression (`kind || ''`) so that no planner takes
    /// `events_record` by its kind alone, which would read every event of
    /// the kind.
    pub fn states_at_statement(
        &self,
        kind: Kind,
        ids: Option<&[&str]>,
        revision: u64,
    ) -> Statement {
        let mut sql = self.sql();
        let postgres = self.shared.db.get_database_backend() == sea_orm::DatabaseBackend::Postgres;
        match ids {
            // Postgres: a lateral LIMIT 1 per id. Its planner guesses a
            // JSON array at 100 rows and, given `revision IN (...)`, hashes
            // the whole log instead.
            Some(ids) if postgres => {
                sql.push(
                    "SELECT e.*, (SELECT compacted FROM revisions WHERE id = 1) AS compacted \
                     FROM (",
                );
                sql.json_array_elements(serde_json::json!(ids))
                    .push(") AS i CROSS JOIN LATERAL (SELECT * FROM events x WHERE x.kind = ");
                sql.bind(kind.as_str())
                    .push(" AND x.id = i.id AND x.revision > ")
                    .bind(bound(revision))
                    .push(" ORDER BY x.revision LIMIT 1) e");
            }
            // SQLite has no LATERAL: the least revision per id, a
            // correlated subquery, then those events by primary key.
            Some(ids) => {
                sql.push(
                    "SELECT *, (SELECT compacted FROM revisions WHERE id = 1) AS compacted \
                     FROM events WHERE revision IN (SELECT (SELECT MIN(x.revision) \
                     FROM events x WHERE x.kind = ",
                );
                sql.bind(kind.as_str())
                    .push(" AND x.id = i.id AND x.revision > ")
                    .bind(bound(revision))
                    .push(") FROM (");
                sql.json_array_elements(serde_json::json!(ids))
                    .push(") AS i)");
            }
            None => {
                sql.push(
                    "SELECT e.*, (SELECT compacted FROM revisions WHERE id = 1) AS compacted \
                     FROM events e JOIN (SELECT id, MIN(revision) AS first \
                     FROM events WHERE kind || '' = ",
                );
                sql.bind(kind.as_str())
                    .push(" AND revision > ")
                    .bind(bound(revision))
                    .push(" GROUP BY id) f ON e.revision = f.first");
            }
        }
        sql.statement()
    }
}
