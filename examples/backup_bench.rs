//! Backup benchmark (figures in the README): one generated Postgres database of about N MB of raw
//! dump — an events table (ids, timestamps, md5 text, repeated payloads) and a pgvector-like
//! table of float arrays, the least compressible kind — and, measured side by side in one run:
//!
//! - the tools a user would pick instead: `pg_dump -Fc -Z0 > /dev/null` (the physical limit of a
//!   logical dump), `… | gzip -6`, `… | pigz -6`, and `… | gzip -6 | aws s3 cp - s3://…` to the
//!   same S3 server (moto on loopback) when the aws CLI is on PATH;
//! - the real binary (`run --once --only backups`) to file:// and to S3, plain and age-encrypted,
//!   with its peak RSS (VmHWM) and the most its TMPDIR ever held;
//! - every GZIP_LEVEL's deflate on the same raw dump, single-threaded, in-process (`--levels`);
//! - restore: the real binary (`run --once --only restores`: download, sha256, full decode and
//!   structural check, pg_restore | psql in one transaction) against `gunzip -c obj | pg_restore`;
//! - `backup-worker verify` of the same backup against that same hand-made restore.
//!
//! ```text
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres MOTO_SERVER=… \
//!     cargo run --release --example backup_bench -- 1000 [--levels]
//! ```
//!
//! Creates and drops the databases bw_bench_src, bw_bench_worker, bw_bench_dst and
//! bw_bench_by_hand on that server.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backup_worker::gzip::{Deflate, GzipEncoder};
use backup_worker_testkit::{S3Server, TEST_ACCESS_KEY};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs a shell pipeline with `env`; its wall time and whatever it printed (a byte count).
fn shell(script: &str, env: &[(&str, &str)]) -> Result<(f64, String), BenchError> {
    let t = Instant::now();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; {script}"))
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("baseline failed: {script}").into());
    }
    Ok((secs, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

struct Bench {
    admin_url: String,
    worker_url: String,
    wpool: sqlx::PgPool,
    team: uuid::Uuid,
    resource: uuid::Uuid,
    s3: S3Server,
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    let mb: i64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or("usage: backup_bench <MB> [--levels]")?;
    let levels = args.iter().any(|a| a == "--levels");
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let admin: PgConnectOptions = admin_url.parse()?;
    let mut conn = admin.connect().await?;
    for db in ["bw_bench_src", "bw_bench_worker", "bw_bench_dst"] {
        conn.execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
            .await?;
        conn.execute(format!("CREATE DATABASE {db}").as_str())
            .await?;
    }
    let db_url = |db: &str| -> Result<String, BenchError> {
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(db);
        Ok(url.to_string())
    };
    let (src_url, worker_url, dst_url) = (
        db_url("bw_bench_src")?,
        db_url("bw_bench_worker")?,
        db_url("bw_bench_dst")?,
    );

    // ~7/8 of the raw dump in events (~150 bytes a row in COPY text), ~1/8 in 96-float vectors
    // (~1 KB a row).
    let events = mb * 1024 * 1024 * 7 / 8 / 150;
    let vectors = mb * 1024 * 1024 / 8 / 1000;
    let t = Instant::now();
    let mut src = src_url.parse::<PgConnectOptions>()?.connect().await?;
    src.execute(
        format!(
            "CREATE TABLE events AS
               SELECT i AS id, timestamptz '2026-01-01' + i * interval '1 second' AS at,
                      md5(i::text) AS token, 'user-' || (i % 9973) AS actor,
                      repeat(substr(md5((i % 101)::text), 1, 8), 8) AS payload
                 FROM generate_series(1, {events}) AS i;
             CREATE TABLE embeddings AS
               SELECT i AS id, (SELECT array_agg(random()::real) FROM generate_series(1, 96) g
                                 WHERE i > 0) AS embedding
                 FROM generate_series(1, {vectors}) AS i;"
        )
        .as_str(),
    )
    .await?;
    println!(
        "source: {events} events + {vectors} vectors generated in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let s3 = S3Server::start().await?;
    s3.store("bench").await?;
    let wpool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&worker_url)
        .await?;
    backup_worker::db::migrate(&wpool).await?;
    let team: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&wpool)
            .await?;
    let resource: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'postgres', $2) RETURNING id",
    )
    .bind(team)
    .bind(&src_url)
    .fetch_one(&wpool)
    .await?;
    let b = Bench {
        admin_url: admin_url.clone(),
        worker_url,
        wpool,
        team,
        resource,
        s3,
    };

    // The tools a user would reach for, on the same database, in this run. One unmeasured dump
    // first: the first read of freshly written tables sets their hint bits, which would slow
    // whichever command came first.
    let env = [("SRC", src_url.as_str())];
    shell("pg_dump -Fc -Z0 -d \"$SRC\" > /dev/null", &env)?;
    let (dump_s, raw) = shell("pg_dump -Fc -Z0 -d \"$SRC\" | wc -c", &env)?;
    let raw: u64 = raw.parse()?;
    let (gzip_s, gzip_bytes) = shell("pg_dump -Fc -Z0 -d \"$SRC\" | gzip -6 | wc -c", &env)?;
    let gzip_bytes: u64 = gzip_bytes.parse()?;
    let (pigz_s, pigz_bytes) = shell("pg_dump -Fc -Z0 -d \"$SRC\" | pigz -6 | wc -c", &env)?;
    let aws_s = if which("aws") {
        let endpoint = b.s3.endpoint.clone();
        let aws_env = [
            ("SRC", src_url.as_str()),
            ("EP", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        Some(
            shell(
                "pg_dump -Fc -Z0 -d \"$SRC\" | gzip -6 | aws --endpoint-url \"$EP\" s3 cp - s3://bench/by-hand.pgdump.gz --only-show-errors",
                &aws_env,
            )?
            .0,
        )
    } else {
        println!("aws CLI not on PATH: the aws s3 cp baseline is skipped");
        None
    };

    let keys = tempfile::tempdir()?;
    let key_file = keys.path().join("master.key");
    {
        use base64::Engine;
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            &key_file,
            base64::engine::general_purpose::STANDARD.encode([42u8; 32]),
        )?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    }
    let file = run_backup(&b, false, None).await?;
    let file_sealed = run_backup(&b, false, Some(&key_file)).await?;
    let s3_run = run_backup(&b, true, None).await?;
    let s3_sealed = run_backup(&b, true, Some(&key_file)).await?;

    let mbs = |bytes: u64| bytes as f64 / 1e6;
    println!();
    println!(
        "backup of {:.0} MB raw (pg_dump -Fc -Z0), {} — the default GZIP_LEVEL 6 ({})",
        mbs(raw),
        chrono::Utc::now().format("%Y-%m-%d"),
        Deflate::for_gzip_level(6)
    );
    println!("| command | seconds | stored MB | worker ÷ it | peak RSS |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, secs: f64, bytes: Option<u64>, rss: Option<f64>| {
        println!(
            "| {name} | {secs:.2} | {} | {:.2}× | {} |",
            bytes.map_or("—".into(), |b| format!("{:.1}", mbs(b))),
            file.secs / secs,
            rss.map_or("—".into(), |r| format!("{r:.1} MiB")),
        );
    };
    row("`pg_dump -Fc -Z0 > /dev/null`", dump_s, None, None);
    row(
        "`pg_dump … | gzip -6 > /dev/null`",
        gzip_s,
        Some(gzip_bytes),
        None,
    );
    row(
        "`pg_dump … | pigz -6 > /dev/null` (2 threads)",
        pigz_s,
        pigz_bytes.parse().ok(),
        None,
    );
    row(
        "**worker → file://**",
        file.secs,
        Some(file.stored),
        Some(file.peak_mib()),
    );
    row(
        "worker → file://, age-encrypted",
        file_sealed.secs,
        Some(file_sealed.stored),
        Some(file_sealed.peak_mib()),
    );
    if let Some(aws_s) = aws_s {
        println!(
            "| `pg_dump … | gzip -6 | aws s3 cp -` (moto) | {aws_s:.2} | {:.1} | {:.2}× (worker → S3 ÷ it) | — |",
            mbs(gzip_bytes),
            s3_run.secs / aws_s
        );
    }
    println!(
        "| **worker → S3** (moto) | {:.2} | {:.1} | {:.2}× (÷ aws s3 cp pipeline) | {:.1} MiB |",
        s3_run.secs,
        mbs(s3_run.stored),
        aws_s.map_or(f64::NAN, |a| s3_run.secs / a),
        s3_run.peak_mib()
    );
    println!(
        "| worker → S3, age-encrypted (moto) | {:.2} | {:.1} | — | {:.1} MiB |",
        s3_sealed.secs,
        mbs(s3_sealed.stored),
        s3_sealed.peak_mib()
    );
    println!(
        "ratios: worker/pg_dump={:.2} worker/gzip6={:.2} worker/pigz6={:.2} worker_s3/aws_pipeline={} stored/gzip6={:.3} temp_disk_max={}",
        file.secs / dump_s,
        file.secs / gzip_s,
        file.secs / pigz_s,
        aws_s.map_or("n/a".into(), |a| format!("{:.2}", s3_run.secs / a)),
        file.stored as f64 / gzip_bytes as f64,
        file.tmp_max.max(s3_run.tmp_max),
    );

    if levels {
        deflate_levels(&src_url, gzip_bytes).await?;
    }
    restore(&b, &file, &dst_url).await?;
    verify(&b, &file).await?;

    b.wpool.close().await;
    drop(src);
    for db in ["bw_bench_src", "bw_bench_worker", "bw_bench_dst"] {
        conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
            .await?;
    }
    Ok(())
}

fn which(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Every GZIP_LEVEL on the same raw dump (a file, so only compression is timed), one thread.
async fn deflate_levels(src_url: &str, gzip6_bytes: u64) -> Result<(), BenchError> {
    let dir = tempfile::tempdir()?;
    let dump = dir.path().join("raw.pgdump");
    let dump_s = dump.to_string_lossy().into_owned();
    shell(
        "pg_dump -Fc -Z0 -d \"$SRC\" > \"$OUT\"",
        &[("SRC", src_url), ("OUT", &dump_s)],
    )?;
    let (gzip_s, _) = shell("gzip -6 < \"$OUT\" > /dev/null", &[("OUT", &dump_s)])?;
    let raw = std::fs::metadata(&dump)?.len();
    println!();
    println!(
        "GZIP_LEVEL on the same {:.0} MB raw dump (in memory, one thread; gzip -6 took {gzip_s:.2} s):",
        raw as f64 / 1e6
    );
    println!("| GZIP_LEVEL | implementation | MB/s (raw) | stored ÷ gzip -6 | × gzip -6's speed |");
    println!("|---|---|---|---|---|");
    let data = std::fs::read(&dump)?;
    for level in 1..=9u32 {
        let deflate = Deflate::for_gzip_level(level);
        let t = Instant::now();
        let mut enc = GzipEncoder::new(deflate);
        let mut out = Vec::with_capacity(1 << 20);
        let mut stored = 0u64;
        for chunk in data.chunks(1 << 20) {
            enc.write(chunk, &mut out)?;
            stored += out.len() as u64;
            out.clear();
        }
        enc.finish(&mut out)?;
        stored += out.len() as u64;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| {level} | {deflate} | {:.0} | {:.3} | {:.1}× |",
            raw as f64 / 1e6 / secs,
            stored as f64 / gzip6_bytes as f64,
            gzip_s / secs
        );
    }
    // Decompression: ISA-L inflate against gunzip, on the default level's output.
    let mut enc = GzipEncoder::new(Deflate::for_gzip_level(6));
    let mut gz = Vec::new();
    for chunk in data.chunks(1 << 20) {
        enc.write(chunk, &mut gz)?;
    }
    enc.finish(&mut gz)?;
    drop(data);
    let gz_path = dir.path().join("raw.pgdump.gz");
    std::fs::write(&gz_path, &gz)?;
    let t = Instant::now();
    let mut dec = backup_worker::gzip::GzipDecoder::new(&gz[..]);
    let mut buf = vec![0u8; 1 << 20];
    while dec.read(&mut buf)? > 0 {}
    let inflate_s = t.elapsed().as_secs_f64();
    let (gunzip_s, _) = shell(
        "gunzip -c \"$GZ\" > /dev/null",
        &[("GZ", &gz_path.to_string_lossy())],
    )?;
    println!(
        "decompression of that output: isa-l inflate {inflate_s:.2} s ({:.0} MB/s raw), gunzip {gunzip_s:.2} s — {:.1}× faster",
        raw as f64 / 1e6 / inflate_s,
        gunzip_s / inflate_s
    );
    Ok(())
}

struct Run {
    backup: uuid::Uuid,
    /// The file:// store (kept alive for the restore and verification that follow).
    store: tempfile::TempDir,
    use_s3: bool,
    secs: f64,
    peak_kib: u64,
    tmp_max: u64,
    stored: u64,
}

impl Run {
    fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// The worker's environment for a store: file:// in `store`, or the bench's S3 server.
fn store_env(b: &Bench, use_s3: bool, store: &Path) -> Vec<(String, String)> {
    if use_s3 {
        vec![
            ("STORAGE_URL".into(), "s3://bench/backups".into()),
            ("S3_ENDPOINT".into(), b.s3.endpoint.clone()),
            ("S3_REGION".into(), "us-east-1".into()),
            ("S3_FORCE_PATH_STYLE".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), TEST_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), TEST_ACCESS_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    } else {
        vec![("STORAGE_URL".into(), format!("file://{}", store.display()))]
    }
}

/// Runs the release binary with `args` and `env`, polling its peak RSS and TMPDIR usage.
fn run_binary(
    args: &[&str],
    env: &[(String, String)],
    worker_url: &str,
) -> Result<(f64, u64, u64), BenchError> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/backup-worker");
    let tmp = tempfile::tempdir()?;
    let t = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("DATABASE_URL", worker_url)
        .env("TMPDIR", tmp.path())
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e} (cargo build --release first)", bin.display()))?;
    let pid = child.id();
    let (mut peak_kib, mut tmp_max) = (0, 0);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak_kib = peak_kib.max(hwm_kib(pid).unwrap_or(0));
        tmp_max = tmp_max.max(dir_bytes(tmp.path()));
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("backup-worker {args:?} failed").into());
    }
    Ok((secs, peak_kib, tmp_max))
}

/// One backup by the release binary (`run --once --only backups`), encrypted when `key_file`
/// is given.
async fn run_backup(b: &Bench, use_s3: bool, key_file: Option<&Path>) -> Result<Run, BenchError> {
    let backup = backup_worker::commands::enqueue_backup(&b.wpool, b.resource).await?;
    let store = tempfile::tempdir()?;
    let mut env = store_env(b, use_s3, store.path());
    if let Some(k) = key_file {
        env.push(("ENCRYPTION_KEY_FILE".into(), k.display().to_string()));
    }
    let (secs, peak_kib, tmp_max) =
        run_binary(&["run", "--once", "--only", "backups"], &env, &b.worker_url)?;
    let (state, stored): (String, Option<i64>) =
        sqlx::query_as("SELECT status, size_bytes FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&b.wpool)
            .await?;
    if state != "succeeded" {
        return Err(format!("backup ended {state}").into());
    }
    Ok(Run {
        backup,
        store,
        use_s3,
        secs,
        peak_kib,
        tmp_max,
        stored: stored.unwrap_or(0) as u64,
    })
}

/// The file:// object on disk.
async fn object_path(b: &Bench, run: &Run) -> Result<std::path::PathBuf, BenchError> {
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(run.backup)
        .fetch_one(&b.wpool)
        .await?;
    Ok(run.store.path().join(key))
}

/// A fresh database for a hand-made restore.
async fn fresh_database(b: &Bench, name: &str) -> Result<String, BenchError> {
    let mut conn = b.admin_url.parse::<PgConnectOptions>()?.connect().await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let mut url = url::Url::parse(&b.admin_url)?;
    url.set_path(name);
    Ok(url.to_string())
}

/// `gunzip -c obj | pg_restore --no-owner -d <fresh db>`: the restore an operator does by hand.
async fn by_hand(b: &Bench, run: &Run) -> Result<f64, BenchError> {
    let url = fresh_database(b, "bw_bench_by_hand").await?;
    let obj = object_path(b, run).await?;
    let (secs, _) = shell(
        "gunzip -c \"$OBJ\" | pg_restore --no-owner -d \"$DST\"",
        &[("OBJ", &obj.to_string_lossy()), ("DST", &url)],
    )?;
    let mut conn = b.admin_url.parse::<PgConnectOptions>()?.connect().await?;
    conn.execute("DROP DATABASE bw_bench_by_hand WITH (FORCE)")
        .await?;
    Ok(secs)
}

/// The worker's restore of the file:// backup into a clone (`run --once --only restores`).
async fn restore(b: &Bench, run: &Run, dst_url: &str) -> Result<(), BenchError> {
    let target: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'postgres', $2) RETURNING id",
    )
    .bind(b.team)
    .bind(dst_url)
    .fetch_one(&b.wpool)
    .await?;
    let id = backup_worker::commands::enqueue_restore(&b.wpool, run.backup, Some(target)).await?;
    let env = store_env(b, run.use_s3, run.store.path());
    let (secs, peak_kib, tmp_max) = run_binary(
        &["run", "--once", "--only", "restores"],
        &env,
        &b.worker_url,
    )?;
    let state: String = sqlx::query_scalar("SELECT status FROM resource_restores WHERE id = $1")
        .bind(id)
        .fetch_one(&b.wpool)
        .await?;
    if state != "succeeded" {
        return Err(format!("restore ended {state}").into());
    }
    let hand_s = by_hand(b, run).await?;
    println!(
        "restore: worker_s={secs:.2} (download + sha256 + decode + check + pg_restore | psql, one transaction) by_hand_s={hand_s:.2} (gunzip -c | pg_restore) ratio={:.2} peak_rss_MiB={:.1} temp_disk_MB={:.1}",
        secs / hand_s,
        peak_kib as f64 / 1024.0,
        tmp_max as f64 / 1e6,
    );
    Ok(())
}

/// `backup-worker verify` of the file:// backup (download + sha256 + full decode + structural
/// check, the test restore — two rewinds as a throwaway role into a scratch database, the second
/// over the first's result —, exact row counts, drop) against the same hand-made restore.
async fn verify(b: &Bench, run: &Run) -> Result<(), BenchError> {
    let mut env = store_env(b, run.use_s3, run.store.path());
    env.push(("VERIFY_DATABASE_URL".into(), b.admin_url.clone()));
    let (verify_s, peak_kib, _) =
        run_binary(&["verify", &run.backup.to_string()], &env, &b.worker_url)?;
    let (download, restore, first, second): (Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(
            "SELECT (detail ->> 'download_seconds')::float8, (detail ->> 'restore_seconds')::float8,
                    (detail -> 'rewind_seconds' ->> 0)::float8, (detail -> 'rewind_seconds' ->> 1)::float8
               FROM backup_verifications WHERE backup_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(run.backup)
        .fetch_one(&b.wpool)
        .await?;
    let hand_s = by_hand(b, run).await?;
    let (first, second) = (first.unwrap_or(0.0), second.unwrap_or(0.0));
    println!(
        "verify: stored_MB={:.0} verify_s={verify_s:.2} download_check_s={:.2} restore_count_s={:.2} first_rewind_s={first:.2} second_rewind_s={second:.2} second_over_first={:.2} MB_per_s_stored={:.1} peak_rss_MiB={:.1} by_hand_s={hand_s:.2} ratio={:.2}",
        run.stored as f64 / 1e6,
        download.unwrap_or(0.0),
        restore.unwrap_or(0.0),
        if first > 0.0 { second / first } else { 0.0 },
        run.stored as f64 / 1e6 / verify_s,
        peak_kib as f64 / 1024.0,
        verify_s / hand_s,
    );
    Ok(())
}
