//! Redis restore benchmark: a Redis of about N MB (1 KiB strings, plus lists and hashes) backed
//! up and restored by the real binary (`run --once --only backups`, then `--only restores` into a
//! second, empty Redis), against what a user would do instead — `redis-cli --rdb` and a
//! `redis-server` loading that file (what the worker itself did before it cut RDBs itself).
//! Reports wall times, the worker's peak RSS (VmHWM), and whether it ever had a redis-server
//! child.
//!
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example redis_restore_bench -- 1024   # MB of data
//!
//! Creates and drops the database bw_bench_redis on that server.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backup_worker_testkit::bench::status_kib;
use backup_worker_testkit::RedisServer;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `pid` has a child process named redis-server.
fn has_redis_child(pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((comm, rest)) = stat.split_once(") ") else {
            return false;
        };
        let ppid = rest.split_whitespace().nth(1);
        comm.ends_with("(redis-server") && ppid == Some(&pid.to_string())
    })
}

/// Runs the worker once and returns (seconds, peak RSS KiB, had a redis-server child).
fn run_worker(
    bin: &Path,
    only: &str,
    db_url: &str,
    store: &Path,
) -> Result<(f64, u64, bool), BenchError> {
    let t = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(["run", "--once", "--only", only])
        .env("DATABASE_URL", db_url)
        .env("STORAGE_URL", format!("file://{}", store.display()))
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e} (cargo build --release first)", bin.display()))?;
    let pid = child.id();
    let (mut peak, mut server_child) = (0, false);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak = peak.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        server_child |= has_redis_child(pid);
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(format!("worker ({only}) failed").into());
    }
    Ok((t.elapsed().as_secs_f64(), peak, server_child))
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let mb: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let mut conn = admin_url.parse::<PgConnectOptions>()?.connect().await?;
    conn.execute("DROP DATABASE IF EXISTS bw_bench_redis")
        .await?;
    conn.execute("CREATE DATABASE bw_bench_redis").await?;
    let mut url = url::Url::parse(&admin_url)?;
    url.set_path("bw_bench_redis");
    let worker_url = url.to_string();

    let source = RedisServer::start(None).await?;
    let target = RedisServer::start(None).await?;
    let t = Instant::now();
    let client = redis::Client::open(source.url())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    // Values of pseudo-random hex: LZF cannot shrink them, so the RDB is as big as the data.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random_hex = |n: usize| -> String {
        let mut out = String::with_capacity(n);
        while out.len() < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.push_str(&format!("{state:016x}"));
        }
        out.truncate(n);
        out
    };
    let keys = mb * 1024;
    for start in (0..keys).step_by(1000) {
        let mut p = redis::pipe();
        for i in start..(start + 1000).min(keys) {
            p.cmd("SET")
                .arg(format!("key:{i}"))
                .arg(random_hex(1024))
                .ignore();
        }
        p.query_async::<()>(&mut c).await?;
    }
    for i in 0..100 {
        let items: Vec<String> = (0..1000).map(|j| format!("item-{i}-{j}")).collect();
        redis::cmd("RPUSH")
            .arg(format!("list:{i}"))
            .arg(&items)
            .query_async::<()>(&mut c)
            .await?;
        redis::cmd("HSET")
            .arg(format!("hash:{i}"))
            .arg(
                items
                    .iter()
                    .flat_map(|s| [s.clone(), s.repeat(2)])
                    .collect::<Vec<_>>(),
            )
            .query_async::<()>(&mut c)
            .await?;
    }
    println!(
        "source: {keys} strings + 100 lists + 100 hashes in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Baseline: the RDB fetched with redis-cli, loaded by a private redis-server.
    let scratch = tempfile::tempdir()?;
    let rdb = scratch.path().join("dump.rdb");
    let t = Instant::now();
    let ok = std::process::Command::new("redis-cli")
        .args(["-p", &source.port.to_string(), "--rdb"])
        .arg(&rdb)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    let fetch_s = t.elapsed().as_secs_f64();
    if !ok {
        return Err("redis-cli --rdb failed".into());
    }
    let rdb_mb = std::fs::metadata(&rdb)?.len() as f64 / 1e6;
    let sock = scratch.path().join("s.sock");
    let t = Instant::now();
    let mut server = std::process::Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--appendonly", "no"])
        .arg("--unixsocket")
        .arg(&sock)
        .arg("--dir")
        .arg(scratch.path())
        .args(["--dbfilename", "dump.rdb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let loaded = loop {
        let out = std::process::Command::new("redis-cli")
            .arg("-s")
            .arg(&sock)
            .arg("PING")
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            break t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let server_rss = status_kib(server.id(), "VmRSS:").unwrap_or(0);
    server.kill()?;
    server.wait()?;

    let wpool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&worker_url)
        .await?;
    backup_worker::db::migrate(&wpool).await?;
    let team: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&wpool)
            .await?;
    let mut ids = Vec::new();
    for url in [source.url(), target.url()] {
        let id: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'redis', $2) RETURNING id",
        )
        .bind(team)
        .bind(url)
        .fetch_one(&wpool)
        .await?;
        ids.push(id);
    }
    let store = tempfile::tempdir()?;
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/backup-worker");
    let backup = backup_worker::commands::enqueue_backup(&wpool, ids[0]).await?;
    let (backup_s, backup_peak, _) = run_worker(&bin, "backups", &worker_url, store.path())?;
    let restore = backup_worker::commands::enqueue_restore(&wpool, backup, Some(ids[1])).await?;
    let (restore_s, restore_peak, server_child) =
        run_worker(&bin, "restores", &worker_url, store.path())?;
    let (state, raw): (String, Option<i64>) = sqlx::query_as(
        "SELECT r.status, b.raw_bytes FROM resource_restores r JOIN resource_backups b ON b.id = r.backup_id WHERE r.id = $1",
    )
    .bind(restore)
    .fetch_one(&wpool)
    .await?;
    let restored = target.cli(&["DBSIZE"]).await?;
    println!(
        "rdb_MB={rdb_mb:.0} raw_MB={:.0} restore={state} keys_restored={} \
         worker_backup_s={backup_s:.2} worker_backup_peak_MiB={:.1} \
         worker_restore_s={restore_s:.2} worker_restore_peak_MiB={:.1} redis_server_child={server_child} \
         baseline_fetch_s={fetch_s:.2} baseline_load_s={loaded:.2} baseline_server_rss_MiB={:.0}",
        raw.unwrap_or(0) as f64 / 1e6,
        restored.trim(),
        backup_peak as f64 / 1024.0,
        restore_peak as f64 / 1024.0,
        server_rss as f64 / 1024.0,
    );
    wpool.close().await;
    conn.execute("DROP DATABASE bw_bench_redis WITH (FORCE)")
        .await?;
    Ok(())
}
