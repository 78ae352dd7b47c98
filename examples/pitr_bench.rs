//! Point-in-time recovery benchmarks (`scripts/bench pitr`; figures in the README):
//!
//! - `pitr_bench rpo <pitr_rpo_seconds> <kib_per_second> <seconds>`: the release binary streams a
//!   private tenant's WAL (`run --only wal`) under a steady write load; for every commit, the
//!   seconds until a stored segment reaches its LSN (the RPO achieved), p50/p99/max, and the
//!   replica's peak RSS.
//! - `pitr_bench restore <MiB>`: a tenant database of that size, a base backup and a logical dump
//!   of it, WAL to a target; a PITR restore to the target against a plain restore of the dump
//!   (`run --once --only restores`, each in its own process): seconds, peak RSS and peak
//!   temporary disk of both, and their ratio.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backup_worker_testkit::bench::{fresh_database, status_kib};
use backup_worker_testkit::{free_port, PgServer, TestError};
use sqlx::{Connection, Executor, PgPool};
use uuid::Uuid;

const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/backup-worker");

fn lsn(text: &str) -> u64 {
    text.split_once('/')
        .and_then(|(h, l)| {
            Some((u64::from_str_radix(h, 16).ok()? << 32) | u64::from_str_radix(l, 16).ok()?)
        })
        .unwrap_or(0)
}

async fn tenant(server: &PgServer) -> Result<(String, String), TestError> {
    let url = server
        .tenant_database(
            "bench",
            "bench_owner",
            "owner-pw",
            "CREATE TABLE t (id bigint PRIMARY KEY, pad text)",
        )
        .await?;
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres")).await?;
    admin
        .execute("CREATE ROLE bench_repl LOGIN REPLICATION PASSWORD 'repl-pw'")
        .await?;
    Ok((
        url,
        format!(
            "postgres://bench_repl:repl-pw@127.0.0.1:{}/postgres",
            server.port
        ),
    ))
}

async fn resource(pool: &PgPool, tier: &str, url: &str, repl: &str) -> Result<Uuid, TestError> {
    let team: Uuid = sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ($1) RETURNING id")
        .bind(tier)
        .fetch_one(pool)
        .await?;
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url, replication_url)
         VALUES ($1, 'postgres', $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(url)
    .bind(repl)
    .fetch_one(pool)
    .await?)
}

fn plans(dir: &Path, pitr: u32) -> Result<std::path::PathBuf, TestError> {
    let path = dir.join("plans.yaml");
    std::fs::write(
        &path,
        format!(
            "tiers:\n  bench: {{ rpo_minutes: 60, backup_retention_days: 7, backup_keep_last: 2, pitr_rpo_seconds: {pitr},\n           limits: {{ connections: 10, memory_mb: 256, storage_mb: 1024 }} }}\n\
             default: {{ rpo_minutes: 1440, backup_retention_days: 7, backup_keep_last: 2,\n           limits: {{ connections: 10, memory_mb: 256, storage_mb: 1024 }} }}\n"
        ),
    )?;
    Ok(path)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn rpo(pitr: u32, kib_per_second: u64, seconds: u64) -> Result<(), TestError> {
    let pool = fresh_database("bw_pitr_bench").await?;
    let server = PgServer::start().await?;
    let (url, repl) = tenant(&server).await?;
    let id = resource(&pool, "bench", &url, &repl).await?;
    let dir = tempfile::tempdir()?;
    let plans = plans(dir.path(), pitr)?;
    let mut worker = tokio::process::Command::new(BIN)
        .args(["run", "--only", "wal"])
        .env("DATABASE_URL", backup_worker_testkit::database_url(&pool))
        .env(
            "STORAGE_URL",
            format!("file://{}", dir.path().join("store").display()),
        )
        .env("PLANS_PATH", &plans)
        .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()?))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = worker.id().ok_or("no pid")?;
    backup_worker_testkit::wait_until(Duration::from_secs(60), "the stream to start", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM wal_segments WHERE resource_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
                > 0
        }
    })
    .await?;
    // The stored position, polled every 100 ms.
    let stored: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let done = tokio_util::sync::CancellationToken::new();
    let poller = {
        let (pool, stored, done) = (pool.clone(), stored.clone(), done.clone());
        tokio::spawn(async move {
            while !done.is_cancelled() {
                if let Ok(Some(text)) = sqlx::query_scalar::<_, Option<String>>(
                    "SELECT max(end_lsn)::text FROM wal_segments WHERE resource_id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                {
                    stored.lock().unwrap().push((Instant::now(), lsn(&text)));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Ten commits a second, `kib_per_second` KiB of rows in all.
    let mut c = sqlx::PgConnection::connect(&url).await?;
    let pad = "x".repeat((kib_per_second as usize * 1024 / 10).max(1));
    let mut commits = Vec::new();
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < Duration::from_secs(seconds) {
        n += 1;
        sqlx::query("INSERT INTO t VALUES ($1, $2)")
            .bind(n)
            .bind(&pad)
            .execute(&mut c)
            .await?;
        let at: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut c)
            .await?;
        commits.push((Instant::now(), lsn(&at)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = commits.last().map(|c| c.1).unwrap_or(0);
    backup_worker_testkit::wait_until(
        Duration::from_secs(u64::from(pitr) * 3 + 30),
        "the last commit to be stored",
        || {
            let stored = stored.clone();
            async move { stored.lock().unwrap().last().is_some_and(|s| s.1 >= last) }
        },
    )
    .await?;
    done.cancel();
    let _ = poller.await;
    let rss = status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    worker.start_kill()?;
    let _ = worker.wait().await;
    let stored = stored.lock().unwrap().clone();
    let mut delays: Vec<f64> = commits
        .iter()
        .filter_map(|(at, l)| {
            stored
                .iter()
                .find(|(t, s)| t >= at && s >= l)
                .map(|(t, _)| t.duration_since(*at).as_secs_f64())
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    println!(
        "pitr rpo: pitr_rpo_seconds {pitr}, {kib_per_second} KiB/s for {seconds} s ({} commits): \
         commit → stored p50 {:.1} s, p99 {:.1} s, max {:.1} s; replica peak RSS {rss:.1} MiB",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays.last().copied().unwrap_or(f64::NAN),
    );
    Ok(())
}

/// Runs `run --once --only <only>` with `TMPDIR` = `tmp`, polling its peak RSS and the peak size
/// of `tmp`.
async fn measured(
    env: &[(&str, String)],
    only: &str,
    tmp: &Path,
) -> Result<(f64, f64, f64), TestError> {
    let t = Instant::now();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["run", "--once", "--only", only])
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (mut rss, mut disk) = (0u64, 0u64);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        rss = rss.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        disk = disk.max(du(tmp));
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        return Err(format!("run --once --only {only} failed: {status}").into());
    }
    Ok((
        t.elapsed().as_secs_f64(),
        rss as f64 / 1024.0,
        disk as f64 / 1048576.0,
    ))
}

fn du(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}

async fn restore(mib: u64) -> Result<(), TestError> {
    let pool = fresh_database("bw_pitr_bench").await?;
    let server = PgServer::start().await?;
    let (url, repl) = tenant(&server).await?;
    let id = resource(&pool, "bench", &url, &repl).await?;
    let dir = tempfile::tempdir()?;
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // The private server runs as `postgres` when we are root: it must reach its directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    }
    let env = vec![
        ("DATABASE_URL", backup_worker_testkit::database_url(&pool)),
        (
            "STORAGE_URL",
            format!("file://{}", dir.path().join("store").display()),
        ),
        ("PLANS_PATH", plans(dir.path(), 60)?.display().to_string()),
        ("LOG_FORMAT", "json".to_owned()),
    ];
    let mut c = sqlx::PgConnection::connect(&url).await?;
    // ~1 KiB rows.
    let rows = mib * 1000;
    let t0 = Instant::now();
    c.execute(
        format!(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, {rows}) g"
        )
        .as_str(),
    )
    .await?;
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut c)
        .await?;
    eprintln!(
        "loaded {:.0} MiB in {:.0} s",
        size as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    // The stream (slot), then the day's base backup and the hour's dump.
    measured(&env, "wal", &tmp).await?;
    measured(&env, "scheduler,backups", &tmp).await?;
    c.execute("INSERT INTO t VALUES (-1, 'at the target')")
        .await?;
    let target: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut c)
        .await?;
    c.execute("DELETE FROM t WHERE id % 2 = 0").await?;
    measured(&env, "wal", &tmp).await?;
    let logical: Uuid = sqlx::query_scalar(
        "SELECT id FROM resource_backups WHERE resource_id = $1 AND format = 'logical' AND status = 'succeeded'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;

    sqlx::query("INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2)")
        .bind(id)
        .bind(target)
        .execute(&pool)
        .await?;
    let pitr = measured(&env, "restores", &tmp).await?;
    let ok: i64 =
        sqlx::query_scalar("SELECT count(*) FROM resource_restores WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await?;
    let back: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut c)
        .await?;
    if ok != 1 || back != rows as i64 + 1 {
        return Err(
            format!("the PITR restore did not bring back the target's rows ({back})").into(),
        );
    }
    sqlx::query("INSERT INTO resource_restores (resource_id, backup_id) VALUES ($1, $2)")
        .bind(id)
        .bind(logical)
        .execute(&pool)
        .await?;
    let plain = measured(&env, "restores", &tmp).await?;
    let ok: i64 =
        sqlx::query_scalar("SELECT count(*) FROM resource_restores WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await?;
    if ok != 2 {
        return Err("the plain restore failed".into());
    }
    println!(
        "pitr restore of a {:.0} MiB database: to an instant {:.1} s, peak RSS {:.1} MiB, peak temp disk {:.0} MiB; \
         plain restore of its logical dump {:.1} s, {:.1} MiB, {:.0} MiB; time ratio {:.2}",
        size as f64 / 1048576.0,
        pitr.0,
        pitr.1,
        pitr.2,
        plain.0,
        plain.1,
        plain.2,
        pitr.0 / plain.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), TestError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("rpo") => rpo(num(1, 10) as u32, num(2, 64), num(3, 120)).await,
        Some("restore") => restore(num(1, 1024)).await,
        _ => Err(
            "usage: pitr_bench rpo <pitr_rpo_seconds> <kib_per_second> <seconds> | restore <MiB>"
                .into(),
        ),
    }
}
