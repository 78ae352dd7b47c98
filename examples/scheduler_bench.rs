//! Scheduler tick benchmark: N resources (mixed tiers and types, 3 succeeded backups each), timing
//! the first tick (which enqueues) and a re-tick (nothing due: the steady state), plus the plan.
//!
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example scheduler_bench -- 100000 [--explain]
//!
//! Creates (and drops first) the database `bw_scheduler_bench` on that server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backup_worker::loops::scheduler::Scheduler;
use backup_worker::metrics::Metrics;
use backup_worker::plans::Plans;
use chrono::Utc;
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Executor};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    let n: i64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or("usage: scheduler_bench <resources> [--explain]")?;
    let explain = args.iter().any(|a| a == "--explain");
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let admin: sqlx::postgres::PgConnectOptions = admin_url.parse()?;
    let mut conn = admin.connect().await?;
    conn.execute("DROP DATABASE IF EXISTS bw_scheduler_bench")
        .await?;
    conn.execute("CREATE DATABASE bw_scheduler_bench").await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(admin.clone().database("bw_scheduler_bench"))
        .await?;
    backup_worker::db::migrate(&pool).await?;

    let started = Instant::now();
    sqlx::query(
        "INSERT INTO teams (plan_tier)
         SELECT (ARRAY['pro','growth','team','hobby','hobby_plus','free','anonymous','pro_yearly','startup_2027'])[1 + i % 9]
           FROM generate_series(1, $1) AS i",
    )
    .bind(n / 2)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO resources (team_id, resource_type, connection_url, status, created_at)
         SELECT t.id, (ARRAY['postgres','vector','mongodb','redis','mysql'])[1 + (hashtext(t.id::text || k) & 65535) % 5],
                'postgres://u:p@h/db',
                CASE WHEN (hashtext(t.id::text || k) & 255) < 13 THEN 'paused' ELSE 'active' END,
                now() - interval '30 days'
           FROM teams t, generate_series(1, 2) AS k",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, status, created_at, started_at, finished_at,
                                       object_key, sha256, size_bytes)
         SELECT r.id, 'scheduled', 'succeeded', ts, ts, ts, 'k', 'x', 1
           FROM resources r, unnest(ARRAY[now() - interval '20 hours', now() - interval '44 hours',
                                          now() - interval '68 hours']) AS ts",
    )
    .execute(&pool)
    .await?;
    pool.execute("VACUUM ANALYZE").await?;
    println!(
        "resources={n} setup_seconds={:.1}",
        started.elapsed().as_secs_f64()
    );

    let scheduler = Scheduler::new(
        pool.clone(),
        Arc::new(Plans::load(None)?),
        Metrics::new()?,
        Duration::from_secs(60),
    );
    let now = Utc::now();
    let t = Instant::now();
    let first = scheduler.tick(now).await?;
    let first_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let again = scheduler.tick(now).await?;
    let retick_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let breached = scheduler.refresh_rpo_breached(now).await?;
    let gauge_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "first_tick_ms={first_ms:.0} enqueued={} retick_ms={retick_ms:.0} enqueued={} rpo_gauge_ms={gauge_ms:.0} breached={breached}",
        first.total(),
        again.total()
    );
    if explain {
        println!("{}", scheduler.explain_tick(now).await?);
    }
    pool.close().await;
    conn.execute("DROP DATABASE bw_scheduler_bench").await?;
    Ok(())
}
