-- The Postgres write in one statement: the row, still at the revision the
-- writer read ($13), locked; a revision taken with its advisory lock; the
-- row written; the event appended. A statement each would cost three more
-- round trips per write, and on 2 cores round trips are most of a write's
-- CPU.
--
-- Every CTE is MATERIALIZED, so the revision is taken once, and only if
-- the row was locked (`rev` reads `locked`). The event's `after` snapshot
-- gets its revision in SQL, the one value the writer cannot know in
-- advance. Data-modifying CTEs run whether read or not; both are read, to
-- check that the row was there. A void already at the revision fails the
-- event's insert (unique violation), and with it the whole statement.
--
-- Schema guard ($14, NULL for a delete): the kind's schema generation must
-- still be the one the write was validated under. It reads
-- metadata_schemas with this statement's snapshot, taken once its lock on
-- `metadata` was granted: after any SetSchema that held that table.
--
-- The advisory lock's keys: 1835365473 is "meta" in ASCII (LOCK_CLASS in
-- log.rs), the second the revision modulo 2^31.
--
-- Before it takes a revision, a write takes the allocation lock
-- (1835365474, 0) shared (ALLOC_CLASS in log.rs): a transaction takes it
-- exclusive while it takes its revisions, one per record it changes, so
-- that they are consecutive (`transaction.rs`). Shared, writers never wait
-- for each other on it.
--
-- $1 kind, $2 id, $3..$5 public/private/unsafe metadata, $6 version,
-- $7 created_at, $8 updated_at (and the event's committed_at), $9 change
-- type, $10 changed fields, $11 before snapshot, $12 after snapshot,
-- $13 the revision the row must still have, $14 schema generation, $15
-- the actor, $16 the trace id, $17 the transaction id.
WITH locked AS MATERIALIZED (
    SELECT 1 FROM metadata
    WHERE kind = $1 AND id = $2 AND revision = $13
      AND ($14::bigint IS NULL
           OR (SELECT COALESCE(SUM(version), 0) FROM metadata_schemas WHERE kind = $1) = $14)
    FOR UPDATE NOWAIT
),
alloc AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(1835365474, 0) FROM locked),
rev AS MATERIALIZED (SELECT nextval('event_revisions') AS r FROM alloc),
taken AS MATERIALIZED (
    SELECT r AS latest, pg_try_advisory_xact_lock(1835365473, (r % 2147483648)::int4) AS owned
    FROM rev
),
stored AS (
    UPDATE metadata SET public_metadata = $3, private_metadata = $4, unsafe_metadata = $5,
        version = $6, revision = taken.latest, created_at = $7, updated_at = $8
    FROM taken
    WHERE taken.owned AND metadata.kind = $1 AND metadata.id = $2
    RETURNING 1
),
appended AS (
    INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after,
        committed_at, actor, trace_id, transaction_id)
    SELECT taken.latest, $1, $2, $9, $10, $11,
        jsonb_set($12, '{revision}', to_jsonb(taken.latest)), $8, $15, $16, $17
    FROM taken
    WHERE taken.owned
    RETURNING 1
)
SELECT taken.latest, taken.owned,
    (SELECT count(*) FROM stored) AS stored,
    (SELECT count(*) FROM appended) AS appended
FROM taken
