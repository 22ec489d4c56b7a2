//! The pgbench floor of the Postgres merge (issue 26): the raw-SQL merge
//! baseline's transaction (load.rs, `raw_merge_postgres`, without NOTIFY)
//! run by pgbench's C client, at the same clients, warm-up and duration, on
//! the same database, right after the `raw-sql` rows of the same clients.
//!
//! Why a second floor: the `raw-sql` row is measured through sqlx and the
//! bench's own tokio runtime, whose client-side cost shares the two cores
//! with Postgres and the idle server. pgbench's client is as thin as a
//! client gets, so its rate is what Postgres itself allows for this
//! transaction on this machine; the service merge's rate over it is issue
//! 26's target ("Merge at 16 clients >= 0.55 of the pgbench no-notify
//! floor"), read off the service row (`ratio_to_pgbench`).
//!
//! - The same statements in the same round trips: BEGIN; the row locked and
//!   read (`FOR UPDATE`); the revision taken with the service's own
//!   statement (`take_revision_sql()`: `nextval` and the advisory lock on
//!   it); UPDATE; INSERT of the event with its before/after snapshots
//!   (`ON CONFLICT (revision) DO NOTHING`); COMMIT. `-M prepared`, as sqlx
//!   prepares its statements.
//! - The merge and the snapshots are built in SQL from what the locked row
//!   returned (pgbench's client computes nothing but random numbers): the
//!   merged document is sent back as a parameter, as the baseline sends
//!   its merged document. The snapshots carry RFC 3339 times (`to_jsonb`
//!   of a timestamptz), so the events are valid log rows that the server
//!   under test reads and could serve to a Watch.
//! - Its connections: one per client, as many as the baseline's pool can
//!   have at most (`--pool`); threads: one per core the bench's tokio
//!   runtime has, at most one per client.
//! - pgbench has no warm-up: a run of the warm-up's length is made first and
//!   thrown away. Durations are whole seconds (`-T`), at least one.
//! - No pgbench on PATH (or one older than 12, without `\gset`): the row is
//!   skipped with the reason. A pgbench that runs and fails (a client
//!   aborted: the script no longer fits the schema) fails the bench, as a
//!   failing raw-SQL baseline does.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::process::Command;

/// The pgbench the bench runs.
pub struct Pgbench {
    path: PathBuf,
    /// What `pgbench --version` said, e.g. `pgbench (PostgreSQL) 15.20`.
    pub version: String,
}

/// In the JSON report: which pgbench ran the rows and with what, or why
/// there are none.
#[derive(Debug, Default, Serialize)]
pub struct PgbenchInfo {
    pub skipped: Option<String>,
    pub version: Option<String>,
    /// The command line, with the database and the numbers of each row as
    /// placeholders (each row's `pgbench_args` has its numbers).
    pub command: Option<String>,
    /// The transaction script (`-f`).
    pub script: Option<String>,
}

impl PgbenchInfo {
    pub fn skipped(why: String) -> PgbenchInfo {
        PgbenchInfo {
            skipped: Some(why),
            ..PgbenchInfo::default()
        }
    }

    pub fn of(pgbench: &Pgbench) -> PgbenchInfo {
        PgbenchInfo {
            skipped: None,
            version: Some(pgbench.version.clone()),
            command: Some(format!(
                "pgbench {} -c CLIENTS -j THREADS -T SECONDS -D ids=IDS -f merge.sql DATABASE_URL",
                FIXED_ARGS.join(" ")
            )),
            script: Some(script()),
        }
    }
}

/// What one measured pgbench run reported.
pub struct Outcome {
    /// Transactions completed in the measured run.
    pub transactions: u64,
    /// Transactions pgbench counted as failed (0 unless it retries).
    pub failed: u64,
    /// `tps = ... (without initial connection time)`.
    pub tps: f64,
    /// `latency average = ... ms`.
    pub latency_avg_ms: Option<f64>,
    /// The numbers this row ran with: `-c C -j J -T S -D ids=N`.
    pub args: String,
}

/// Options of every run: prepared statements (as sqlx's), no VACUUM of
/// pgbench's own tables (there are none here: the bench never runs
/// `pgbench -i`), and the script's variables as they are.
const FIXED_ARGS: [&str; 3] = ["-M", "prepared", "-n"];

/// The pgbench on PATH, or why there is none the bench can use.
pub async fn locate() -> Result<Pgbench, String> {
    let path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("pgbench"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "pgbench not installed: no pgbench on PATH (Debian: apt-get install postgresql-client)"
                .to_string()
        })?;
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .await
        .map_err(|err| format!("cannot run {}: {err}", path.display()))?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // "pgbench (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    let major = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split(['.', 'b', 'r']).next())
        .and_then(|v| v.parse::<u32>().ok());
    match major {
        // \gset (the locked row's columns, the revision) came in 12.
        Some(major) if major >= 12 => Ok(Pgbench { path, version }),
        Some(_) => Err(format!("{version}: the script needs pgbench 12 or later")),
        None => Err(format!(
            "{}: cannot read its version ({version:?})",
            path.display()
        )),
    }
}

/// The transaction, in pgbench's script language; `:ids` is given with
/// `-D`. Line by line the statements of load.rs's `raw_merge_postgres`.
pub fn script() -> String {
    let take_revision = metadata_service::store::take_revision_sql();
    format!(
        r#"-- metadata-service bench: the raw-sql merge on Postgres, no NOTIFY
-- (bench/src/load.rs, raw_merge_postgres). Run with -M prepared -D ids=N.
-- The bench seeds ids bench_0 .. bench_{{N-1}}; a patch is 3 keys, each a
-- random value in 0..1000000 (load.rs, patch).
\set id random(0, :ids - 1)
\set k1 random(0, 999999)
\set k2 random(0, 999999)
\set k3 random(0, 999999)
BEGIN;
SELECT public_metadata, version, revision, created_at FROM metadata
  WHERE kind = 'user' AND id = 'bench_' || :id FOR UPDATE \gset row_
-- The revision as the service takes it (take_revision_sql()).
{take_revision} \gset
-- Not owned: a server settled this revision as void first (never seen in
-- practice: the raw baseline fails the bench on it). Rolled back, and
-- counted by pgbench as a transaction all the same.
\if :owned
UPDATE metadata SET public_metadata = :row_public_metadata::jsonb
    || jsonb_build_object('k1', :k1::bigint, 'k2', :k2::bigint, 'k3', :k3::bigint),
  version = version + 1, revision = :latest::bigint, updated_at = now()
  WHERE kind = 'user' AND id = 'bench_' || :id;
INSERT INTO events (revision, kind, id, change_type, changed_fields, before, after, committed_at)
  VALUES (:latest::bigint, 'user', 'bench_' || :id, 'merged', '["public_metadata"]',
    jsonb_build_object('public_metadata', :row_public_metadata::jsonb,
      'private_metadata', '{{}}'::jsonb, 'unsafe_metadata', '{{}}'::jsonb,
      'version', :row_version::bigint, 'revision', :row_revision::bigint,
      'created_at', :row_created_at::timestamptz, 'updated_at', :row_created_at::timestamptz),
    jsonb_build_object('public_metadata', :row_public_metadata::jsonb
        || jsonb_build_object('k1', :k1::bigint, 'k2', :k2::bigint, 'k3', :k3::bigint),
      'private_metadata', '{{}}'::jsonb, 'unsafe_metadata', '{{}}'::jsonb,
      'version', :row_version::bigint + 1, 'revision', :latest::bigint,
      'created_at', :row_created_at::timestamptz, 'updated_at', now()),
    now())
  ON CONFLICT (revision) DO NOTHING;
COMMIT;
\else
ROLLBACK;
\endif
"#
    )
}

impl Pgbench {
    /// Runs the merge script on `url` for `warmup` (thrown away), then for
    /// `duration`, and waits until every connection it made is gone, so
    /// that no transaction of its is still open when the next row starts.
    #[allow(clippy::too_many_arguments)]
    pub async fn merge(
        &self,
        url: &str,
        pool: &sqlx::PgPool,
        ids: u64,
        clients: usize,
        connections: u32,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Outcome> {
        let dir = tempfile::tempdir()?;
        let script_path = dir.path().join("merge.sql");
        std::fs::write(&script_path, script())?;
        // The baseline's C tasks share a pool of at most --pool connections:
        // as many transactions at a time as pgbench's clients here.
        let clients = clients.min(connections as usize).max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = clients.min(cores);
        if !warmup.is_zero() {
            self.run(url, &script_path, ids, clients, threads, seconds(warmup))
                .await
                .context("pgbench (warm-up)")?;
        }
        let outcome = self
            .run(url, &script_path, ids, clients, threads, seconds(duration))
            .await
            .context("pgbench")?;
        gone(pool).await?;
        Ok(outcome)
    }

    async fn run(
        &self,
        url: &str,
        script: &std::path::Path,
        ids: u64,
        clients: usize,
        threads: usize,
        seconds: u64,
    ) -> anyhow::Result<Outcome> {
        let args = format!("-c {clients} -j {threads} -T {seconds} -D ids={ids}");
        let child = Command::new(&self.path)
            .args(FIXED_ARGS)
            .args(args.split(' '))
            .arg("-f")
            .arg(script)
            // A connection string as the database name: libpq reads it whole.
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.path.display()))?;
        // -T ends the run; a pgbench stuck past it (a lock never granted)
        // is killed when the future is dropped (kill_on_drop).
        let output =
            tokio::time::timeout(Duration::from_secs(seconds + 60), child.wait_with_output())
                .await
                .context("pgbench did not end within a minute of its duration")??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            // Its errors name the host and the database, never a password.
            bail!(
                "{} {args}: {}\n{}{}",
                self.path.display(),
                output.status,
                tail(&stderr),
                tail(&stdout)
            );
        }
        let outcome = parse(&stdout, args)
            .with_context(|| format!("cannot read pgbench's report:\n{stdout}"))?;
        if outcome.transactions == 0 {
            bail!("pgbench completed no transaction:\n{}", tail(&stderr));
        }
        Ok(outcome)
    }
}

/// Whole seconds for `-T`, at least one.
fn seconds(d: Duration) -> u64 {
    d.as_secs_f64().round().max(1.0) as u64
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads pgbench's summary (14 and later say "without initial connection
/// time", older ones "excluding connections establishing").
fn parse(stdout: &str, args: String) -> anyhow::Result<Outcome> {
    let value = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|v| v.split('/').next().unwrap_or(v).to_string())
    };
    let transactions = value("number of transactions actually processed: ")
        .context("no transaction count")?
        .parse()?;
    let failed = value("number of failed transactions: ").map_or(Ok(0), |v| v.parse())?;
    let tps = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("tps = "))
        .find(|rest| rest.contains("without initial") || rest.contains("excluding"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no tps line")?
        .parse()?;
    let latency_avg_ms = value("latency average = ").and_then(|v| v.parse().ok());
    Ok(Outcome {
        transactions,
        failed,
        tps,
        latency_avg_ms,
        args,
    })
}

/// Waits (up to 10 s) until no backend of pgbench's is left on this
/// database: when pgbench exits, a backend that was waiting for a row lock
/// learns that its client is gone only after the lock is granted.
async fn gone(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'pgbench'",
        )
        .fetch_one(pool)
        .await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} pgbench connections still open 10 s after it exited");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_of_pgbench_15() {
        let out = "transaction type: merge.sql\n\
                   number of transactions actually processed: 12345\n\
                   number of failed transactions: 0 (0.000%)\n\
                   latency average = 5.123 ms\n\
                   initial connection time = 20.1 ms\n\
                   tps = 3086.25 (without initial connection time)\n";
        let o = parse(out, String::new()).unwrap();
        assert_eq!((o.transactions, o.failed), (12345, 0));
        assert_eq!(o.tps, 3086.25);
        assert_eq!(o.latency_avg_ms, Some(5.123));
    }

    #[test]
    fn seconds_are_whole_and_at_least_one() {
        assert_eq!(seconds(Duration::from_millis(300)), 1);
        assert_eq!(seconds(Duration::from_secs(4)), 4);
    }
}
