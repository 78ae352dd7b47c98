//! Copy benchmark (figures in the README; `scripts/bench copy`): one backup object of N bytes of
//! incompressible data on one S3-protocol server (moto), copied to a second one by the real
//! binary (`run --once --only copies`: stream, sha256, commit, read back, sha256 again) against
//! what an operator would do by hand in the same run — `aws s3 cp s3://primary/k - | aws s3 cp -
//! s3://copies/k` between the same two servers — with the worker's peak RSS.
//!
//! ```text
//!   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres MOTO_SERVER=… PATH=<venv with aws>:$PATH \
//!     cargo run --release --example copy_bench -- 1G
//! ```
//!
//! Creates and drops the database bw_bench_copy on that server.

use std::path::Path;
use std::time::Instant;

use backup_worker::storage::{Metadata, ObjectStore};
use backup_worker_testkit::bench::measure;
use backup_worker_testkit::{S3Server, TEST_ACCESS_KEY};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

type BenchError = Box<dyn std::error::Error + Send + Sync>;

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'M' | 'm' => (&s[..s.len() - 1], 1u64 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let size = std::env::args()
        .nth(1)
        .and_then(|s| parse_size(&s))
        .unwrap_or(1 << 30);
    let admin_url = std::env::var("DATABASE_URL")?;
    let admin: PgConnectOptions = admin_url.parse()?;
    let mut conn = admin.connect().await?;
    conn.execute("DROP DATABASE IF EXISTS bw_bench_copy WITH (FORCE)")
        .await?;
    conn.execute("CREATE DATABASE bw_bench_copy").await?;
    let worker_url = {
        let mut u = url::Url::parse(&admin_url)?;
        u.set_path("bw_bench_copy");
        u.to_string()
    };
    let pool = sqlx::PgPool::connect(&worker_url).await?;
    backup_worker::db::migrate(&pool).await?;

    let primary_s3 = S3Server::start().await?;
    let copy_s3 = S3Server::start().await?;
    let primary = primary_s3.store("primary").await?;
    copy_s3.store("copies").await?;

    // The object, as a backup of this shape would be stored: incompressible bytes.
    let team: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&pool)
            .await?;
    let resource: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         VALUES ($1, 'postgres', 'postgres://unused@127.0.0.1/unused') RETURNING id",
    )
    .bind(team)
    .fetch_one(&pool)
    .await?;
    let backup = uuid::Uuid::new_v4();
    let key = format!("{team}/{resource}/20261204T000000Z-{backup}.pgdump.gz");
    let started = Instant::now();
    let mut upload = primary.begin_upload(&key, Metadata::new()).await?;
    let mut hasher = Sha256::new();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < size {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = (size - written).min(buf.len() as u64) as usize;
        hasher.update(&buf[..n]);
        upload.write(&buf[..n]).await?;
        written += n as u64;
    }
    upload.commit(Metadata::new()).await?;
    let sha = hex::encode(hasher.finalize());
    println!(
        "source: {} MB uploaded to the primary in {:.1}s",
        size / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    sqlx::query(
        "INSERT INTO resource_backups (id, resource_id, status, object_key, sha256, size_bytes, finished_at)
         VALUES ($1, $2, 'succeeded', $3, $4, $5, now())",
    )
    .bind(backup)
    .bind(resource)
    .bind(&key)
    .bind(&sha)
    .bind(size as i64)
    .execute(&pool)
    .await?;

    // The worker: `run --once --only copies`.
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/backup-worker");
    let env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", worker_url.clone()),
        ("STORAGE_URL", "s3://primary".into()),
        ("S3_ENDPOINT", primary_s3.endpoint.clone()),
        ("S3_FORCE_PATH_STYLE", "true".into()),
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("COPY_STORAGE_URL", "s3://copies".into()),
        ("COPY_S3_ENDPOINT", copy_s3.endpoint.clone()),
        ("COPY_S3_FORCE_PATH_STYLE", "true".into()),
        ("COPY_AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY.into()),
        ("COPY_AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY.into()),
        ("LOG_FORMAT", "json".into()),
    ];
    let worker = measure(&bin, &["run", "--once", "--only", "copies"], &env)?;
    let status: String =
        sqlx::query_scalar("SELECT status FROM backup_copies WHERE backup_id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await?;
    if status != "succeeded" {
        return Err(format!("the copy ended {status}").into());
    }

    // By hand: the aws CLI piped between the same two servers.
    let by_hand = {
        let t = Instant::now();
        let out = std::process::Command::new("bash")
            .args([
                "-c",
                "set -o pipefail; aws --endpoint-url \"$A\" s3 cp \"s3://primary/$K\" - \
                 | aws --endpoint-url \"$B\" s3 cp - \"s3://copies/by-hand/$K\"",
            ])
            .env("A", &primary_s3.endpoint)
            .env("B", &copy_s3.endpoint)
            .env("K", &key)
            .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "aws s3 cp pipeline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        t.elapsed().as_secs_f64()
    };
    println!();
    println!(
        "copy of {} MB between two moto servers, 2026-12-04, one run",
        size / 1_000_000
    );
    println!("| | seconds | MB/s | peak RSS | ÷ by hand |");
    println!("|---|---|---|---|---|");
    println!(
        "| **worker** (`run --once --only copies`: stream + sha256 + commit + read back + sha256) | {:.2} | {:.0} | {:.1} MiB | **{:.2}×** |",
        worker.seconds,
        size as f64 / 1e6 / worker.seconds,
        worker.peak_mib(),
        worker.seconds / by_hand
    );
    println!(
        "| by hand: `aws s3 cp s3://primary/k - \\| aws s3 cp - s3://copies/k` | {by_hand:.2} | {:.0} | — | 1.00× |",
        size as f64 / 1e6 / by_hand
    );
    pool.close().await;
    conn.execute("DROP DATABASE IF EXISTS bw_bench_copy WITH (FORCE)")
        .await?;
    Ok(())
}
