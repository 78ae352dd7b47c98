//! Fleet benchmark (figures in the README; `scripts/bench fleet`):
//! - `claims N`: claims per second from a queue of N due backup rows stamped as one scheduler
//!   cohort (one run_after and created_at), through the real claim statement
//!   (`Claimer::claim_next` with the backups loop's order), each claim followed by its row's
//!   final update (as a job's end), one claimer and four at once;
//!   with `--old-index` the pre-issue-25 index (run_after alone) is put back for comparison.
//! - `verifier N`: N resources, each with a succeeded backup verified a day ago (nothing due):
//!   the verifier's enqueue and the unverified gauge (`Verifier::enqueue`,
//!   `refresh_unverified`), then the per-resource queries they replaced, in the same run; then the
//!   release binary's `run --once --only scheduler,verifier` with its peak RSS.
//!
//! ```text
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example fleet_bench -- claims 1000000
//! ```
//!
//! Creates (and drops first) the database bw_fleet_bench on that server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backup_worker::jobs::{Claimer, JobTable};
use backup_worker::loops::backups;
use backup_worker::loops::verifier::Verifier;
use backup_worker::storage::{LocalStore, ObjectStore};
use backup_worker_testkit::{bench::run_worker, test_config, test_deps};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

const DB: &str = "bw_fleet_bench";

async fn fresh(admin: &PgConnectOptions) -> Result<PgPool, BenchError> {
    let mut conn = admin.connect().await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {DB}").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {DB}").as_str())
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(admin.clone().database(DB))
        .await?;
    backup_worker::db::migrate(&pool).await?;
    Ok(pool)
}

/// N resources of 1000-resource teams.
async fn resources(pool: &PgPool, n: i64) -> Result<(), BenchError> {
    sqlx::query("INSERT INTO teams (plan_tier) SELECT 'pro' FROM generate_series(1, greatest($1 / 1000, 1))")
        .bind(n)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO resources (team_id, resource_type, connection_url, created_at)
         SELECT t.id, 'postgres', 'postgres://u:p@h/db', now() - interval '30 days'
           FROM (SELECT id, row_number() OVER () AS k FROM teams) t, generate_series(1, 1000) AS i
          WHERE (t.k - 1) * 1000 + i <= $1",
    )
    .bind(n)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims per second: `claimers` tasks claiming `total` rows between them.
async fn claim_rate(pool: &PgPool, claimers: usize, total: usize) -> Result<f64, BenchError> {
    let claimer = Arc::new(Claimer::new(JobTable::Backups));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..claimers {
        let (pool, claimer) = (pool.clone(), claimer.clone());
        tasks.spawn(async move {
            let worker = format!("bench-{i}");
            for _ in 0..total / claimers {
                let claimed = claimer
                    .claim_next(
                        &pool,
                        backups::CLAIM_ORDER,
                        &worker,
                        Duration::from_secs(600),
                    )
                    .await?;
                let Some(claimed) = claimed else {
                    return Err::<(), sqlx::Error>(sqlx::Error::RowNotFound);
                };
                // The job ends (as a failed attempt would): running rows stay as few as a
                // fleet's concurrency, not the count of claims so far.
                sqlx::query(
                    "UPDATE resource_backups SET status = 'failed', finished_at = now(),
                            lease_expires_at = NULL, failure_reason = 'dump'
                      WHERE id = $1",
                )
                .bind(claimed.lease.id)
                .execute(&pool)
                .await?;
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn claims(pool: &PgPool, n: i64, old_index: bool) -> Result<(), BenchError> {
    let t = Instant::now();
    resources(pool, n).await?;
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, run_after, created_at)
         SELECT id, 'scheduled', now() - interval '1 minute', now() - interval '1 minute' FROM resources",
    )
    .execute(pool)
    .await?;
    if old_index {
        pool.execute("DROP INDEX resource_backups_due_idx; CREATE INDEX resource_backups_claim_idx ON resource_backups (run_after) WHERE status = 'pending'")
            .await?;
    }
    pool.execute("VACUUM ANALYZE").await?;
    let setup = t.elapsed().as_secs_f64();
    // The same claims at every size: what differs is only the queue behind them.
    let total = (n as usize / 2).min(if old_index { 100 } else { 500 });
    let one = claim_rate(pool, 1, total).await?;
    let four = claim_rate(pool, 4, total).await?;
    println!(
        "claims due_rows={n} index={} setup_s={setup:.0} claims_per_s_1={one:.0} claims_per_s_4={four:.0} (each of {total} claims)",
        if old_index { "run_after (before)" } else { "claim order" }
    );
    Ok(())
}

async fn time<T, F: std::future::Future<Output = Result<T, sqlx::Error>>>(
    f: F,
) -> Result<(f64, T), BenchError> {
    let t = Instant::now();
    let out = f.await?;
    Ok((t.elapsed().as_secs_f64() * 1000.0, out))
}

/// The verifier's enqueue and gauge before the marks (per resource, two lateral probes each).
const OLD_DUE: &str = "
    SELECT count(*) FROM resources r
      CROSS JOIN LATERAL (SELECT b.id, b.verify_status FROM resource_backups b
                           WHERE b.resource_id = r.id AND b.status = 'succeeded'
                           ORDER BY b.finished_at DESC NULLS LAST LIMIT 1) n
      LEFT JOIN LATERAL (SELECT x.status, x.started_at, x.finished_at, x.backup_id FROM backup_verifications x
                          WHERE x.resource_id = r.id ORDER BY x.started_at DESC LIMIT 1) v ON true
     WHERE r.status <> 'deleted' AND n.verify_status IS DISTINCT FROM 'failed'
       AND (v.status IS NULL
            OR (v.status = 'verified' AND v.started_at <= now() - interval '7 days')
            OR (v.status = 'failed' AND (v.backup_id <> n.id OR v.finished_at <= now() - interval '1 hour')))";
const OLD_GAUGE: &str = "
    SELECT count(*) FROM resources r
      CROSS JOIN LATERAL (SELECT b.verify_status, b.finished_at FROM resource_backups b
                           WHERE b.resource_id = r.id AND b.status = 'succeeded'
                           ORDER BY b.finished_at DESC NULLS LAST LIMIT 1) n
     WHERE r.status <> 'deleted'
       AND (n.verify_status = 'failed'
            OR (n.finished_at < now() - interval '1 hour'
                AND NOT EXISTS (SELECT 1 FROM backup_verifications v
                                 WHERE v.resource_id = r.id AND v.status = 'verified'
                                   AND v.started_at > now() - interval '7 days 1 hour')))";

async fn verifier(pool: &PgPool, n: i64) -> Result<(), BenchError> {
    let t = Instant::now();
    resources(pool, n).await?;
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, status, created_at, started_at, finished_at,
                                       object_key, sha256, size_bytes, raw_bytes)
         SELECT id, 'scheduled', 'succeeded', now() - interval '2 days', now() - interval '2 days',
                now() - interval '2 days', 'k/' || id, 'x', 1, 1 FROM resources",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO backup_verifications (backup_id, resource_id, status, started_at, finished_at)
         SELECT id, resource_id, 'verified', now() - interval '1 day', now() - interval '1 day'
           FROM resource_backups",
    )
    .execute(pool)
    .await?;
    pool.execute("VACUUM ANALYZE").await?;
    let setup = t.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().to_path_buf()).await?);
    let deps = test_deps(pool.clone(), store, test_config(&[])?)?;
    let v = Verifier::new(deps);
    let (enqueue_ms, enqueued) = time(v.enqueue()).await?;
    let (gauge_ms, unverified) = time(v.refresh_unverified()).await?;
    let (old_due_ms, old_due) = time(sqlx::query_scalar::<_, i64>(OLD_DUE).fetch_one(pool)).await?;
    let (old_gauge_ms, old_unverified) =
        time(sqlx::query_scalar::<_, i64>(OLD_GAUGE).fetch_one(pool)).await?;
    println!(
        "verifier resources={n} setup_s={setup:.0} enqueue_ms={enqueue_ms:.1} (enqueued {enqueued}) gauge_ms={gauge_ms:.1} (unverified {unverified}) before: enqueue_scan_ms={old_due_ms:.0} (due {old_due}) gauge_ms={old_gauge_ms:.0} (unverified {old_unverified})"
    );
    // A replica: the release binary's scheduler tick and verifier pass over this fleet.
    let url = std::env::var("DATABASE_URL")?;
    let mut db_url = url::Url::parse(&url)?;
    db_url.set_path(DB);
    let run = run_worker("scheduler,verifier", db_url.as_str(), dir.path())?;
    println!(
        "replica resources={n} run_once_scheduler_verifier_s={:.1} peak_rss_mib={:.1}",
        run.seconds,
        run.peak_mib()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fleet_bench claims|verifier <n> [--old-index]";
    let what = args.get(1).ok_or(usage)?.clone();
    let n: i64 = args.get(2).and_then(|s| s.parse().ok()).ok_or(usage)?;
    let admin: PgConnectOptions = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL")?
        .parse()?;
    let pool = fresh(&admin).await?;
    match what.as_str() {
        "claims" => claims(&pool, n, args.iter().any(|a| a == "--old-index")).await?,
        "verifier" => verifier(&pool, n).await?,
        _ => return Err(usage.into()),
    }
    pool.close().await;
    admin
        .connect()
        .await?
        .execute(format!("DROP DATABASE {DB}").as_str())
        .await?;
    Ok(())
}
