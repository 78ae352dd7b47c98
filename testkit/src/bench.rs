//! Measuring the real binary for the benchmarks: one `run --once` in its own process, its wall
//! time and peak RSS (VmHWM, polled every 10 ms from /proc).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::TestError;

/// A `/proc/<pid>/status` field in KiB (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What one measured run took.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub seconds: f64,
    pub peak_kib: u64,
}

impl Run {
    pub fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// Runs `program args` with `env` to its end, polling its peak RSS; fails on a non-zero exit.
pub fn measure(program: &Path, args: &[&str], env: &[(&str, String)]) -> Result<Run, TestError> {
    let t = Instant::now();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e} (cargo build --release first)", program.display()))?;
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak = peak.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(10));
    };
    if !status.success() {
        return Err(format!("{} {args:?} failed: {status}", program.display()).into());
    }
    Ok(Run {
        seconds: t.elapsed().as_secs_f64(),
        peak_kib: peak,
    })
}

/// The release binary, `run --once --only <only>` against `db_url` and a `file://` store.
pub fn run_worker(only: &str, db_url: &str, store: &Path) -> Result<Run, TestError> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/backup-worker");
    measure(
        &bin,
        &["run", "--once", "--only", only],
        &[
            ("DATABASE_URL", db_url.to_owned()),
            ("STORAGE_URL", format!("file://{}", store.display())),
            ("LOG_FORMAT", "json".to_owned()),
        ],
    )
}

/// A fresh, migrated database `name` on `DATABASE_URL`'s server (dropped first if it exists).
pub async fn fresh_database(name: &str) -> Result<sqlx::PgPool, TestError> {
    use sqlx::{ConnectOptions, Executor};
    let admin: sqlx::postgres::PgConnectOptions = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set")?
        .parse()?;
    let mut conn = admin.connect().await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(admin.database(name))
        .await?;
    backup_worker::db::migrate(&pool).await?;
    Ok(pool)
}
