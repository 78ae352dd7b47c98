//! Redis memory benchmark (issue 22 item 6): a Redis of N keys of M MiB each (incompressible
//! bytes) backed up and restored by the real binary, one `run --once` per step in its own
//! process, each step's peak RSS (VmHWM) against the bound "64 MiB plus two values":
//!
//! - instance backup (`redis-cli --rdb -` → gzip → file://) and keyspace backup (the worker's
//!   own SCAN + MEMORY USAGE + DUMP of the `/0` resource);
//! - the restore of each into a second, empty Redis (RDB reader → RESTORE … ABSTTL).
//!
//! Baselines in the same run: `redis-cli --rdb -` to /dev/null, and a plain DUMP → RESTORE loop
//! (one key at a time, this binary's `loop` mode) — the least memory a copy can hold.
//!
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example redis_memory_bench -- 200 8   # keys, MiB per value
//!
//! Creates and drops the database bw_bench_redis_mem on that server.

use backup_worker_testkit::bench::{measure, run_worker, Run};
use backup_worker_testkit::RedisServer;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

const MIB: usize = 1024 * 1024;

/// The plain copy: SCAN the source, then DUMP and RESTORE one key at a time.
async fn plain_loop(src: &str, dst: &str) -> Result<(), BenchError> {
    let mut s = redis::Client::open(src)?
        .get_multiplexed_async_connection()
        .await?;
    let mut d = redis::Client::open(dst)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) =
            redis::cmd("SCAN").arg(cursor).query_async(&mut s).await?;
        for k in keys {
            let payload: Vec<u8> = redis::cmd("DUMP").arg(&k).query_async(&mut s).await?;
            redis::cmd("RESTORE")
                .arg(&k)
                .arg(0)
                .arg(payload)
                .arg("REPLACE")
                .query_async::<()>(&mut d)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn dbsize(r: &RedisServer) -> Result<u64, BenchError> {
    Ok(r.cli(&["DBSIZE"]).await?.trim().parse()?)
}

fn show(what: &str, run: &Run, bound_mib: f64) {
    println!(
        "{what:<42} {:>7.2} s  peak {:>6.1} MiB  {}",
        run.seconds,
        run.peak_mib(),
        if run.peak_mib() <= bound_mib {
            "within the bound"
        } else {
            "OVER THE BOUND"
        }
    );
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("loop") {
        return plain_loop(&args[2], &args[3]).await;
    }
    let keys: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let value_mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let bound_mib = 64.0 + 2.0 * value_mib as f64;
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let mut conn = admin_url.parse::<PgConnectOptions>()?.connect().await?;
    conn.execute("DROP DATABASE IF EXISTS bw_bench_redis_mem")
        .await?;
    conn.execute("CREATE DATABASE bw_bench_redis_mem").await?;
    let mut url = url::Url::parse(&admin_url)?;
    url.set_path("bw_bench_redis_mem");
    let worker_url = url.to_string();

    let source = RedisServer::start(None).await?;
    let target = RedisServer::start(None).await?;
    let mut c = source.admin(0).await?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..keys {
        let mut v = Vec::with_capacity(value_mib * MIB);
        while v.len() < value_mib * MIB {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            v.extend_from_slice(&state.to_le_bytes());
        }
        redis::cmd("SET")
            .arg(format!("big:{i}"))
            .arg(v)
            .query_async::<()>(&mut c)
            .await?;
    }
    println!(
        "source: {keys} keys of {value_mib} MiB ({} MiB); bound: 64 MiB + 2 values = {bound_mib:.0} MiB",
        keys * value_mib
    );

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&worker_url)
        .await?;
    backup_worker::db::migrate(&pool).await?;
    let team: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&pool)
            .await?;
    let mut ids = Vec::new();
    for url in [
        source.url(),
        source.url_db(0),
        target.url(),
        target.url_db(0),
    ] {
        let id: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'redis', $2) RETURNING id",
        )
        .bind(team)
        .bind(url)
        .fetch_one(&pool)
        .await?;
        ids.push(id);
    }
    let store = tempfile::tempdir()?;

    let redis_cli = which("redis-cli")?;
    let port = source.port.to_string();
    let rdb = measure(&redis_cli, &["-p", &port, "--rdb", "-"], &[])?;
    show("baseline: redis-cli --rdb - > /dev/null", &rdb, f64::MAX);

    let mut backups = Vec::new();
    for (what, resource) in [
        ("worker backup, instance (redis-cli)", ids[0]),
        ("worker backup, keyspace (/0)", ids[1]),
    ] {
        let backup = backup_worker::commands::enqueue_backup(&pool, resource).await?;
        let run = run_worker("backups", &worker_url, store.path())?;
        let (status, mode): (String, Option<String>) =
            sqlx::query_as("SELECT status, dump_mode FROM resource_backups WHERE id = $1")
                .bind(backup)
                .fetch_one(&pool)
                .await?;
        if status != "succeeded" {
            return Err(format!("{what}: {status}").into());
        }
        show(
            &format!("{what} [{}]", mode.unwrap_or_default()),
            &run,
            bound_mib,
        );
        backups.push(backup);
    }
    for (what, backup, into) in [
        ("worker restore of the instance backup", backups[0], ids[2]),
        ("worker restore of the keyspace backup", backups[1], ids[3]),
    ] {
        target.cli(&["FLUSHALL"]).await?;
        let restore = backup_worker::commands::enqueue_restore(&pool, backup, Some(into)).await?;
        let run = run_worker("restores", &worker_url, store.path())?;
        let status: String =
            sqlx::query_scalar("SELECT status FROM resource_restores WHERE id = $1")
                .bind(restore)
                .fetch_one(&pool)
                .await?;
        let restored = dbsize(&target).await?;
        if status != "succeeded" || restored != keys as u64 {
            return Err(format!("{what}: {status}, {restored} keys").into());
        }
        show(what, &run, bound_mib);
    }
    target.cli(&["FLUSHALL"]).await?;
    let me = std::env::current_exe()?;
    let plain = measure(&me, &["loop", &source.url(), &target.url()], &[])?;
    show("baseline: plain DUMP → RESTORE loop", &plain, f64::MAX);

    pool.close().await;
    conn.execute("DROP DATABASE bw_bench_redis_mem WITH (FORCE)")
        .await?;
    Ok(())
}

fn which(program: &str) -> Result<std::path::PathBuf, BenchError> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.exists())
        })
        .ok_or_else(|| format!("{program} not found").into())
}
