//! Backup benchmark: a Postgres database of about N MB backed up by the real binary
//! (`run --once --only backups`, file:// store), against the baseline
//! `pg_dump -Fc -Z0 | gzip -6 > /dev/null`. Reports wall times, the ratio, the worker's peak RSS
//! and the most temporary-directory space it ever used.
//!
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example backup_bench -- 1000 [s3]   # MB of raw dump; s3: moto
//!
//! Creates and drops the databases bw_bench_src and bw_bench_worker on that server.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

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

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let mb: i64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("usage: backup_bench <MB> [s3]")?;
    let use_s3 = std::env::args().nth(2).as_deref() == Some("s3");
    let admin_url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let admin: PgConnectOptions = admin_url.parse()?;
    let mut conn = admin.connect().await?;
    for db in ["bw_bench_src", "bw_bench_worker"] {
        conn.execute(format!("DROP DATABASE IF EXISTS {db}").as_str())
            .await?;
        conn.execute(format!("CREATE DATABASE {db}").as_str())
            .await?;
    }
    let mut url = url::Url::parse(&admin_url)?;
    url.set_path("bw_bench_src");
    let src_url = url.to_string();
    url.set_path("bw_bench_worker");
    let worker_url = url.to_string();

    // ~200 raw bytes a row, moderately compressible like real application data.
    let rows = mb * 1024 * 1024 / 200;
    let t = Instant::now();
    let mut src = src_url.parse::<PgConnectOptions>()?.connect().await?;
    src.execute(
        format!(
            "CREATE TABLE events AS
               SELECT i AS id, now() - (i || ' seconds')::interval AS at,
                      md5(i::text) AS token, 'user-' || (i % 9973) AS actor,
                      repeat(substr(md5((i % 101)::text), 1, 8), 16) AS payload
                 FROM generate_series(1, {rows}) AS i"
        )
        .as_str(),
    )
    .await?;
    println!(
        "source: {rows} rows generated in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let baseline = std::process::Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; pg_dump -Fc -Z0 -d \"$SRC\" | gzip -6 > /dev/null")
        .env("SRC", &src_url)
        .status()?;
    let baseline_s = t.elapsed().as_secs_f64();
    if !baseline.success() {
        return Err("baseline pipeline failed".into());
    }

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
    // The same database backed up twice, in this run: plain, then encrypted to the team's key.
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
    let plain = run_worker(use_s3, &worker_url, &wpool, resource, None).await?;
    let sealed = run_worker(use_s3, &worker_url, &wpool, resource, Some(&key_file)).await?;
    println!(
        "store={} raw_MB={:.0} stored_MB={:.0} baseline_s={baseline_s:.2} worker_s={:.2} ratio={:.3} peak_rss_MiB={:.1} tmp_max_bytes={} | encrypted: worker_s={:.2} cost={:+.1}% peak_rss_MiB={:.1} tmp_max_bytes={}",
        if use_s3 { "s3" } else { "file" },
        plain.raw as f64 / 1e6,
        plain.stored as f64 / 1e6,
        plain.secs,
        plain.secs / baseline_s,
        plain.peak_kib as f64 / 1024.0,
        plain.tmp_max,
        sealed.secs,
        (sealed.secs / plain.secs - 1.0) * 100.0,
        sealed.peak_kib as f64 / 1024.0,
        sealed.tmp_max,
    );
    if !use_s3 {
        verify(&admin_url, &worker_url, &wpool, &plain).await?;
    }
    wpool.close().await;
    drop(src);
    for db in ["bw_bench_src", "bw_bench_worker"] {
        conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
            .await?;
    }
    Ok(())
}

struct Run {
    backup: uuid::Uuid,
    /// The file:// store (kept alive for the verification that follows).
    store: tempfile::TempDir,
    secs: f64,
    peak_kib: u64,
    tmp_max: u64,
    raw: i64,
    stored: i64,
}

/// One backup of `resource` by the release binary (`run --once --only backups`), encrypted when
/// `key_file` is given; its wall time, peak RSS and most temporary disk.
async fn run_worker(
    use_s3: bool,
    worker_url: &str,
    wpool: &sqlx::PgPool,
    resource: uuid::Uuid,
    key_file: Option<&Path>,
) -> Result<Run, BenchError> {
    let backup = backup_worker::commands::enqueue_backup(wpool, resource).await?;
    let store = tempfile::tempdir()?;
    let tmp = tempfile::tempdir()?;
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/backup-worker");
    let mut cmd = std::process::Command::new(&bin);
    let _s3;
    if use_s3 {
        let server = backup_worker::testkit::S3Server::start().await?;
        server.store("bench").await?;
        cmd.env("STORAGE_URL", "s3://bench/backups")
            .env("S3_ENDPOINT", &server.endpoint)
            .env("S3_REGION", "us-east-1")
            .env("S3_FORCE_PATH_STYLE", "true")
            .env("AWS_ACCESS_KEY_ID", backup_worker::testkit::TEST_ACCESS_KEY)
            .env(
                "AWS_SECRET_ACCESS_KEY",
                backup_worker::testkit::TEST_ACCESS_KEY,
            )
            .env("AWS_EC2_METADATA_DISABLED", "true");
        _s3 = server;
    } else {
        cmd.env("STORAGE_URL", format!("file://{}", store.path().display()));
    }
    if let Some(k) = key_file {
        cmd.env("ENCRYPTION_KEY_FILE", k);
    }
    let t = Instant::now();
    let mut child = cmd
        .args(["run", "--once", "--only", "backups"])
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
        return Err("worker failed".into());
    }
    let (state, raw, stored): (String, Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT status, raw_bytes, size_bytes FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(wpool)
            .await?;
    if state != "succeeded" {
        return Err(format!("backup ended {state}").into());
    }
    Ok(Run {
        backup,
        store,
        secs,
        peak_kib,
        tmp_max,
        raw: raw.unwrap_or(0),
        stored: stored.unwrap_or(0),
    })
}

/// `backup-worker verify` of the plain backup (download, sha256, gunzip, structural check, a test
/// restore into a scratch database, exact row counts, drop) against what an operator does by
/// hand: `gunzip -c | pg_restore -d <fresh database>`.
async fn verify(
    admin_url: &str,
    worker_url: &str,
    wpool: &sqlx::PgPool,
    run: &Run,
) -> Result<(), BenchError> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/backup-worker");
    let t = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(["verify", &run.backup.to_string()])
        .env("DATABASE_URL", worker_url)
        .env(
            "STORAGE_URL",
            format!("file://{}", run.store.path().display()),
        )
        .env("VERIFY_DATABASE_URL", admin_url)
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak_kib = 0;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak_kib = peak_kib.max(hwm_kib(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    };
    let verify_s = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err("verification failed".into());
    }
    let (download, restore): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT (detail ->> 'download_seconds')::float8, (detail ->> 'restore_seconds')::float8
           FROM backup_verifications WHERE backup_id = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(run.backup)
    .fetch_one(wpool)
    .await?;
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(run.backup)
        .fetch_one(wpool)
        .await?;
    let mut conn = admin_url.parse::<PgConnectOptions>()?.connect().await?;
    conn.execute("DROP DATABASE IF EXISTS bw_bench_by_hand")
        .await?;
    conn.execute("CREATE DATABASE bw_bench_by_hand").await?;
    let mut url = url::Url::parse(admin_url)?;
    url.set_path("bw_bench_by_hand");
    let t = Instant::now();
    let by_hand = std::process::Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; gunzip -c \"$OBJ\" | pg_restore --no-owner -d \"$DST\"")
        .env("OBJ", run.store.path().join(&key))
        .env("DST", url.as_str())
        .status()?;
    let by_hand_s = t.elapsed().as_secs_f64();
    conn.execute("DROP DATABASE bw_bench_by_hand WITH (FORCE)")
        .await?;
    if !by_hand.success() {
        return Err("gunzip | pg_restore failed".into());
    }
    println!(
        "verify: stored_MB={:.0} verify_s={verify_s:.2} download_check_s={:.2} restore_count_s={:.2} MB_per_s_stored={:.1} peak_rss_MiB={:.1} by_hand_s={by_hand_s:.2} ratio={:.2}",
        run.stored as f64 / 1e6,
        download.unwrap_or(0.0),
        restore.unwrap_or(0.0),
        run.stored as f64 / 1e6 / verify_s,
        peak_kib as f64 / 1024.0,
        verify_s / by_hand_s,
    );
    Ok(())
}
