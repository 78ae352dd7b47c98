//! Compression on real parts (DESIGN §5: "one standard gzip stream that `gunzip` reads"): every
//! GZIP_LEVEL backs up a real Postgres database far larger than a pipe buffer into an object the
//! real `gunzip` decodes to exactly the raw stream the row describes, and an object written by
//! the worker's earlier zlib pipeline still restores.

use std::io::Read;
use std::process::Command;
use std::sync::Arc;

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::storage::{put_reader, LocalStore, Metadata, ObjectStore};
use backup_worker_testkit::{database_url, test_config, test_deps};
use sha2::Digest;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("test"),
    }
}

async fn deps(pool: &PgPool, dir: &std::path::Path, level: u32) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.to_path_buf()).await.unwrap());
    let level = level.to_string();
    test_deps(
        pool.clone(),
        store,
        test_config(&[("GZIP_LEVEL", level.as_str())]).unwrap(),
    )
    .unwrap()
}

/// ~24 MB of raw dump: text, timestamps and float arrays (the pgvector-like, least compressible
/// kind), so every stage of the pipeline fills and drains many times.
async fn fill(pool: &PgPool) {
    pool.execute(
        "CREATE TABLE events AS
           SELECT i AS id, timestamptz '2026-01-01' + i * interval '1 second' AS at,
                  md5(i::text) AS token, repeat(substr(md5((i % 101)::text), 1, 8), 8) AS payload
             FROM generate_series(1, 120000) AS i;
         CREATE TABLE embeddings AS
           SELECT i AS id, array(SELECT ((i * 7919 + g * 104729) % 1000003) / 1000003.0::real
                                   FROM generate_series(1, 64) g) AS embedding
             FROM generate_series(1, 20000) AS i;",
    )
    .await
    .unwrap();
}

async fn resource(pool: &PgPool, url: &str) -> (Uuid, Uuid) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(pool)
            .await
            .unwrap();
    let res = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'postgres', $2) RETURNING id",
    )
    .bind(team)
    .bind(url)
    .fetch_one(pool)
    .await
    .unwrap();
    (team, res)
}

struct Row {
    key: String,
    raw_bytes: i64,
    size_bytes: i64,
    sha256: String,
}

async fn back_up(d: &Deps, resource: Uuid) -> (Uuid, Row) {
    let id = backup_worker::commands::enqueue_backup(&d.pool, resource)
        .await
        .unwrap();
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    type Columns = (
        String,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<i64>,
        Option<String>,
    );
    let (status, detail, key, raw_bytes, size_bytes, sha256): Columns = sqlx::query_as(
        "SELECT status, internal_detail, object_key, raw_bytes, size_bytes, sha256
           FROM resource_backups WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    (
        id,
        Row {
            key: key.unwrap(),
            raw_bytes: raw_bytes.unwrap(),
            size_bytes: size_bytes.unwrap(),
            sha256: sha256.unwrap(),
        },
    )
}

#[sqlx::test]
async fn every_gzip_level_writes_one_gzip_stream_that_the_real_gunzip_decodes_exactly(
    pool: PgPool,
) {
    fill(&pool).await;
    let (_, res) = resource(&pool, &database_url(&pool)).await;
    let mut sizes = Vec::new();
    for level in 1..=9u32 {
        let dir = tempfile::tempdir().unwrap();
        let d = deps(&pool, dir.path(), level).await;
        let (_, row) = back_up(&d, res).await;
        let path = dir.path().join(&row.key);
        let stored = std::fs::read(&path).unwrap();
        assert_eq!(stored.len() as i64, row.size_bytes, "level {level}");
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&stored)),
            row.sha256,
            "level {level}"
        );
        // One gzip member: the header once, and gunzip (the real binary) reads it all.
        assert_eq!(&stored[..3], &[0x1f, 0x8b, 0x08], "level {level}");
        let out = Command::new("gunzip")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "level {level}: gunzip says {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "level {level}: gunzip warns");
        let raw = out.stdout;
        assert_eq!(raw.len() as i64, row.raw_bytes, "level {level}");
        assert!(raw.len() > 20 << 20, "a dump far larger than a pipe buffer");
        assert_eq!(&raw[..5], b"PGDMP");
        // The worker's own reader and flate2 agree with gunzip byte for byte.
        let mut ours = Vec::new();
        backup_worker::gzip::GzipDecoder::new(&stored[..])
            .read_to_end(&mut ours)
            .unwrap();
        assert!(
            ours == raw,
            "level {level}: ISA-L inflate differs from gunzip"
        );
        let mut theirs = Vec::new();
        flate2::read::GzDecoder::new(&stored[..])
            .read_to_end(&mut theirs)
            .unwrap();
        assert!(theirs == raw, "level {level}: flate2 differs from gunzip");
        // And it is a whole pg_dump archive.
        let dump = dir.path().join("raw.pgdump");
        std::fs::write(&dump, &raw).unwrap();
        let list = Command::new("pg_restore")
            .arg("--list")
            .arg(&dump)
            .output()
            .unwrap();
        assert!(list.status.success(), "level {level}");
        let toc = String::from_utf8_lossy(&list.stdout);
        assert!(toc.contains("TABLE DATA public events"), "level {level}");
        assert!(
            toc.contains("TABLE DATA public embeddings"),
            "level {level}"
        );
        sizes.push((level, row.size_bytes));
    }
    // Levels 1–7 share one implementation (ISA-L level 2) and 8–9 another (zlib-rs level 8),
    // the smaller: the sizes differ within a group only by what the source grew between
    // backups (each backup adds its own rows to this database).
    let size = |l: u32| sizes.iter().find(|(x, _)| *x == l).unwrap().1;
    assert!((size(1) - size(7)).abs() < size(6) / 500, "{sizes:?}");
    assert!(size(8) < size(6) && size(9) < size(6), "{sizes:?}");
}

/// Objects written before ISA-L (zlib-rs through async-compression, level 6) restore unchanged.
#[sqlx::test]
async fn an_object_written_by_the_earlier_zlib_pipeline_still_restores(pool: PgPool) {
    fill(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), 6).await;
    let (team, source) = resource(&pool, &database_url(&pool)).await;
    let (backup, row) = back_up(&d, source).await;

    // Rewrite the object as the zlib pipeline wrote it, and record its sha256 as that run did.
    let isal_gz = std::fs::read(dir.path().join(&row.key)).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&isal_gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut enc, &raw).unwrap();
    let zlib_gz = enc.finish().unwrap();
    assert_ne!(zlib_gz, isal_gz, "a different encoder's bytes");
    put_reader(d.store.as_ref(), &row.key, &zlib_gz[..], Metadata::new())
        .await
        .unwrap();
    sqlx::query("UPDATE resource_backups SET sha256 = $2, size_bytes = $3 WHERE id = $1")
        .bind(backup)
        .bind(hex::encode(sha2::Sha256::digest(&zlib_gz)))
        .bind(zlib_gz.len() as i64)
        .execute(&pool)
        .await
        .unwrap();

    // Restore it into another of the team's databases (a clone), which has drifted.
    let clone_db = format!("bw_cmp_{}", Uuid::new_v4().simple());
    pool.execute(format!("CREATE DATABASE {clone_db}").as_str())
        .await
        .unwrap();
    let mut url = url::Url::parse(&database_url(&pool)).unwrap();
    url.set_path(&clone_db);
    let mut clone = PgConnection::connect(url.as_str()).await.unwrap();
    clone
        .execute("CREATE TABLE events (id int); INSERT INTO events VALUES (-1);")
        .await
        .unwrap();
    let target: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, 'postgres', $2) RETURNING id",
    )
    .bind(team)
    .bind(url.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    let restore = backup_worker::commands::enqueue_restore(&pool, backup, Some(target))
        .await
        .unwrap();
    Restores::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_restores WHERE id = $1")
            .bind(restore)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    let (events, embeddings, lowest): (i64, i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM embeddings),
                (SELECT min(id) FROM events)",
    )
    .fetch_one(&mut clone)
    .await
    .unwrap();
    assert_eq!((events, embeddings, lowest), (120000, 20000, 1));
    clone.close().await.unwrap();
    pool.execute(format!("DROP DATABASE {clone_db} WITH (FORCE)").as_str())
        .await
        .unwrap();
}
