//! Restore steps (DESIGN §6): verify the downloaded backup, then rewind the target with its
//! engine. Every step before the engine's first destructive statement is a guard; the engines
//! are written so a failure leaves the target as it was (Postgres: one transaction; Redis: the
//! backup is loaded and probed against the target before anything is flushed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_compression::tokio::bufread::GzipDecoder;
use sha2::{Digest, Sha256};
use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::classify::classify_tool_failure;
use crate::domain::FailureReason;
use crate::engines::{self, ConfigProblem, ToolCommand};
use crate::process::{spawn, SpawnError, Tools};
use crate::secret::Secret;
use crate::storage::{ObjectStore, StorageError};

/// Why a restore step failed: the class and an internal detail (secrets already redacted).
#[derive(Debug)]
pub struct Failure {
    pub reason: FailureReason,
    pub detail: String,
}

fn fail(reason: FailureReason, detail: impl Into<String>) -> Failure {
    Failure {
        reason,
        detail: detail.into(),
    }
}

impl From<ConfigProblem> for Failure {
    fn from(p: ConfigProblem) -> Self {
        fail(FailureReason::Config, p.0)
    }
}

fn spawn_failure(e: SpawnError) -> Failure {
    match e {
        SpawnError::Missing { .. } => fail(FailureReason::Config, e.to_string()),
        SpawnError::Other { .. } => fail(FailureReason::Dump, e.to_string()),
    }
}

async fn gunzip(path: &Path) -> std::io::Result<GzipDecoder<BufReader<File>>> {
    let file = File::open(path).await?;
    Ok(GzipDecoder::new(BufReader::with_capacity(128 * 1024, file)))
}

/// Downloads `key` into `dir` while hashing it; refuses (integrity) unless the sha256 matches
/// the row, the whole gzip stream decodes (its CRC checks out) and the dump starts with `magic`.
pub async fn download_verified(
    store: &dyn ObjectStore,
    key: &str,
    expected_sha256: &str,
    magic: &[u8],
    dir: &Path,
) -> Result<PathBuf, Failure> {
    let path = dir.join("backup.gz");
    let mut reader = match store.get(key).await {
        Ok(r) => r,
        Err(StorageError::NotFound { .. }) => {
            return Err(fail(
                FailureReason::Integrity,
                format!("backup object {key} is missing"),
            ))
        }
        Err(e) => return Err(fail(FailureReason::Upload, e.to_string())),
    };
    let io = |e: std::io::Error| fail(FailureReason::Upload, format!("downloading {key}: {e}"));
    let mut file = File::create(&path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(fail(
            FailureReason::Integrity,
            format!("sha256 of {key} is {actual}, the backup row says {expected_sha256}"),
        ));
    }
    // Decode it all once before anything destructive: a truncated or corrupt stream fails here.
    let mut decoder = gunzip(&path).await.map_err(io)?;
    let mut head = Vec::new();
    loop {
        let n = decoder.read(&mut buf).await.map_err(|e| {
            fail(
                FailureReason::Integrity,
                format!("{key} does not decompress: {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        if head.len() < magic.len() {
            head.extend_from_slice(&buf[..n.min(magic.len() - head.len())]);
        }
    }
    if !head.starts_with(magic) {
        return Err(fail(
            FailureReason::Integrity,
            format!(
                "{key} does not start with {} (got {})",
                hex::encode(magic),
                hex::encode(&head)
            ),
        ));
    }
    Ok(path)
}

/// Feeds `source` to a tool's stdin (the tool reading the dump), drains its stdout, and maps a
/// non-zero exit to a failure class from its stderr.
async fn run_with_stdin(
    tools: &Tools,
    cmd: &ToolCommand,
    mut source: impl AsyncRead + Unpin,
) -> Result<(), Failure> {
    let mut tool = spawn(tools, cmd, true).map_err(spawn_failure)?;
    let stdin = tool.stdin.take();
    let mut stdout = tool.stdout.take();
    // The feeder owns stdin and drops it when done: the tool sees EOF.
    let feed = async move {
        let Some(mut stdin) = stdin else {
            return Ok(());
        };
        let r = tokio::io::copy(&mut source, &mut stdin).await;
        let _ = stdin.shutdown().await;
        r.map(|_| ())
    };
    let drain = async {
        if let Some(out) = stdout.as_mut() {
            let _ = tokio::io::copy(out, &mut tokio::io::sink()).await;
        }
    };
    let (fed, ()) = tokio::join!(feed, drain);
    let finished = tool.wait().await.map_err(|e| {
        fail(
            FailureReason::Dump,
            format!("waiting for {}: {e}", cmd.program),
        )
    })?;
    if !finished.status.success() {
        return Err(fail(
            classify_tool_failure(&finished.stderr),
            format!(
                "{} exited with {}: {}",
                cmd.program, finished.status, finished.stderr
            ),
        ));
    }
    fed.map_err(|e| fail(FailureReason::Dump, format!("feeding {}: {e}", cmd.program)))
}

/// Postgres/pgvector: pg_restore's script, after our preamble, into one psql transaction.
pub async fn postgres(
    tools: &Tools,
    url: &Secret,
    dump_gz: &Path,
    temp: &Path,
) -> Result<(), Failure> {
    let (pgr_cmd, psql_cmd) = engines::postgres::restore_commands(url, temp)?;
    let mut pgr = spawn(tools, &pgr_cmd, true).map_err(spawn_failure)?;
    let mut psql = spawn(tools, &psql_cmd, true).map_err(spawn_failure)?;
    let decoder = gunzip(dump_gz)
        .await
        .map_err(|e| fail(FailureReason::Dump, format!("opening the backup: {e}")))?;
    let (mut pgr_in, mut pgr_out) = (pgr.stdin.take(), pgr.stdout.take());
    let (mut psql_in, mut psql_out) = (psql.stdin.take(), psql.stdout.take());
    let feed = async move {
        let mut decoder = decoder;
        if let Some(w) = pgr_in.as_mut() {
            let _ = tokio::io::copy(&mut decoder, w).await;
            let _ = w.shutdown().await;
        }
    };
    let pipe = async {
        if let (Some(r), Some(w)) = (pgr_out.as_mut(), psql_in.as_mut()) {
            if w.write_all(engines::postgres::RESTORE_PREAMBLE)
                .await
                .is_ok()
            {
                let _ = tokio::io::copy(r, w).await;
            }
            let _ = w.shutdown().await;
        }
        drop(psql_in.take());
    };
    let drain = async {
        if let Some(out) = psql_out.as_mut() {
            let _ = tokio::io::copy(out, &mut tokio::io::sink()).await;
        }
    };
    tokio::join!(feed, pipe, drain);
    drop(pgr_out);
    let pgr_done = pgr.wait().await;
    let psql_done = psql.wait().await;
    let psql_done =
        psql_done.map_err(|e| fail(FailureReason::Dump, format!("waiting for psql: {e}")))?;
    if !psql_done.status.success() {
        return Err(fail(
            classify_tool_failure(&psql_done.stderr),
            format!(
                "psql exited with {} (transaction rolled back): {}",
                psql_done.status, psql_done.stderr
            ),
        ));
    }
    let pgr_done =
        pgr_done.map_err(|e| fail(FailureReason::Dump, format!("waiting for pg_restore: {e}")))?;
    if !pgr_done.status.success() {
        // Its script never reached COMMIT, so psql's transaction was rolled back at EOF.
        return Err(fail(
            FailureReason::Dump,
            format!(
                "pg_restore exited with {}: {}",
                pgr_done.status, pgr_done.stderr
            ),
        ));
    }
    if psql_done
        .stderr
        .contains("there is no transaction in progress")
    {
        return Err(fail(
            FailureReason::Dump,
            "restore script committed more than once",
        ));
    }
    Ok(())
}

/// MongoDB: the archive on mongorestore's stdin, `--drop` for the tenant database only.
pub async fn mongodb(
    tools: &Tools,
    url: &Secret,
    dump_gz: &Path,
    temp: &Path,
) -> Result<(), Failure> {
    let cmd = engines::mongodb::restore_command(url, temp)?;
    let decoder = gunzip(dump_gz)
        .await
        .map_err(|e| fail(FailureReason::Dump, format!("opening the backup: {e}")))?;
    run_with_stdin(tools, &cmd, decoder).await
}

/// Keys moved per pipelined batch.
const REDIS_BATCH: usize = 500;

/// Redis: the RDB is loaded into a private redis-server (unix socket, no TCP port); a probe
/// RESTORE checks the target accepts its payloads; then, per logical database in the backup,
/// FLUSHDB on the target and DUMP/RESTORE every key with its remaining TTL.
pub async fn redis(
    tools: &Tools,
    url: &Secret,
    dump_gz: &Path,
    temp: &Path,
) -> Result<(), Failure> {
    let target = engines::redis::parse(url)?;
    let io = |e: std::io::Error| fail(FailureReason::Dump, format!("preparing the RDB: {e}"));
    let rdb = temp.join("dump.rdb");
    let mut decoder = gunzip(dump_gz).await.map_err(io)?;
    let mut out = File::create(&rdb).await.map_err(io)?;
    tokio::io::copy(&mut decoder, &mut out).await.map_err(io)?;
    out.flush().await.map_err(io)?;
    drop(out);

    let sock = temp.join("redis.sock");
    let log = temp.join("redis.log");
    let cmd = ToolCommand {
        program: "redis-server".into(),
        args: vec![
            "--port".into(),
            "0".into(),
            "--unixsocket".into(),
            sock.clone().into(),
            "--unixsocketperm".into(),
            "700".into(),
            "--dir".into(),
            temp.into(),
            "--dbfilename".into(),
            "dump.rdb".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--logfile".into(),
            log.clone().into(),
        ],
        env: Vec::new(),
        secrets: Vec::new(),
        credential_files: Vec::new(),
        magic: engines::magic(crate::domain::ResourceType::Redis),
        extension: "rdb",
    };
    let mut server = spawn(tools, &cmd, false).map_err(spawn_failure)?;
    let local = redis::ConnectionInfo {
        addr: redis::ConnectionAddr::Unix(sock.clone()),
        redis: redis::RedisConnectionInfo::default(),
    };
    let loaded = wait_loaded(&local, &mut server).await;
    let result = match loaded {
        Ok(dbs) => copy_databases(&local, &target, &dbs).await,
        Err(why) => {
            let tail = tokio::fs::read_to_string(&log).await.unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            Err(fail(
                FailureReason::Config,
                format!(
                    "the worker's redis-server could not load this backup ({why}); log: {tail}"
                ),
            ))
        }
    };
    server.kill().await;
    result
}

/// Waits until the private server answers PING (it refuses with LOADING until the RDB is in) and
/// returns the logical databases that hold keys.
async fn wait_loaded(
    local: &redis::ConnectionInfo,
    server: &mut crate::process::RunningTool,
) -> Result<Vec<i64>, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        if server.has_exited() {
            return Err("it exited".into());
        }
        if let Ok(client) = redis::Client::open(local.clone()) {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if ping.is_ok() {
                    let info: String = redis::cmd("INFO")
                        .arg("keyspace")
                        .query_async(&mut c)
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(keyspace_dbs(&info));
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err("it did not finish loading within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn target_info(t: &engines::redis::RedisConnection, db: i64) -> redis::ConnectionInfo {
    let addr = if t.tls {
        redis::ConnectionAddr::TcpTls {
            host: t.host.clone(),
            port: t.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(t.host.clone(), t.port)
    };
    let info = redis::RedisConnectionInfo {
        db,
        username: t.user.clone(),
        password: t.password.clone(),
        ..Default::default()
    };
    redis::ConnectionInfo { addr, redis: info }
}

fn redis_failure(stage: &str, e: redis::RedisError) -> Failure {
    let text = e.to_string();
    let reason = if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        FailureReason::Unreachable
    } else {
        match classify_tool_failure(&text) {
            FailureReason::Auth => FailureReason::Auth,
            _ => FailureReason::Dump,
        }
    };
    fail(reason, format!("{stage}: {text}"))
}

async fn connect(
    info: redis::ConnectionInfo,
    stage: &str,
) -> Result<redis::aio::MultiplexedConnection, Failure> {
    let client = redis::Client::open(info).map_err(|e| redis_failure(stage, e))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| redis_failure(stage, e))
}

async fn copy_databases(
    local: &redis::ConnectionInfo,
    target: &engines::redis::RedisConnection,
    dbs: &[i64],
) -> Result<(), Failure> {
    // Probe: can the target RESTORE this backup's payloads? Checked before anything is flushed.
    for db in dbs {
        let mut src = connect(with_db(local, *db), "connecting to the loaded backup").await?;
        let keys: (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(0)
            .arg("COUNT")
            .arg(10)
            .query_async(&mut src)
            .await
            .map_err(|e| redis_failure("scanning the backup", e))?;
        if let Some(key) = keys.1.first() {
            let payload: Vec<u8> = redis::cmd("DUMP")
                .arg(key)
                .query_async(&mut src)
                .await
                .map_err(|e| redis_failure("reading the backup", e))?;
            let mut dst = connect(target_info(target, *db), "connecting to the target").await?;
            let probe = format!("__backup_worker_restore_probe:{}", uuid::Uuid::new_v4());
            let r: redis::RedisResult<()> = redis::cmd("RESTORE")
                .arg(&probe)
                .arg(10_000)
                .arg(payload)
                .query_async(&mut dst)
                .await;
            if let Err(e) = r {
                return Err(fail(
                    FailureReason::Config,
                    format!("the target Redis cannot accept this backup (is it older than the source?): {e}"),
                ));
            }
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(&probe).query_async(&mut dst).await;
            break;
        }
    }
    // A rewind also empties the target's databases the backup has no keys in (keys written there
    // since the backup are "objects created since").
    let mut dst = connect(target_info(target, 0), "connecting to the target").await?;
    let info: String = redis::cmd("INFO")
        .arg("keyspace")
        .query_async(&mut dst)
        .await
        .map_err(|e| redis_failure("reading the target's keyspace", e))?;
    for db in keyspace_dbs(&info)
        .into_iter()
        .filter(|db| !dbs.contains(db))
    {
        let mut dst = connect(target_info(target, db), "connecting to the target").await?;
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut dst)
            .await
            .map_err(|e| redis_failure("FLUSHDB on the target", e))?;
    }
    for db in dbs {
        let mut src = connect(with_db(local, *db), "connecting to the loaded backup").await?;
        let mut dst = connect(target_info(target, *db), "connecting to the target").await?;
        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut dst)
            .await
            .map_err(|e| redis_failure("FLUSHDB on the target", e))?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(REDIS_BATCH)
                .query_async(&mut src)
                .await
                .map_err(|e| redis_failure("scanning the backup", e))?;
            if !keys.is_empty() {
                let mut read = redis::pipe();
                for k in &keys {
                    read.cmd("DUMP").arg(k).cmd("PTTL").arg(k);
                }
                let values: Vec<redis::Value> = read
                    .query_async(&mut src)
                    .await
                    .map_err(|e| redis_failure("reading the backup", e))?;
                let mut write = redis::pipe();
                for (k, pair) in keys.iter().zip(values.chunks(2)) {
                    let (redis::Value::BulkString(payload), ttl) = (&pair[0], &pair[1]) else {
                        continue;
                    };
                    let ttl = match ttl {
                        redis::Value::Int(t) if *t > 0 => *t,
                        redis::Value::Int(-1) => 0,
                        _ => continue, // expired while we copied
                    };
                    write
                        .cmd("RESTORE")
                        .arg(k)
                        .arg(ttl)
                        .arg(payload.as_slice())
                        .arg("REPLACE")
                        .ignore();
                }
                let _: () = write
                    .query_async(&mut dst)
                    .await
                    .map_err(|e| redis_failure("RESTORE on the target", e))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// The logical databases that hold keys, from `INFO keyspace` ("db3:keys=2,expires=1,…").
fn keyspace_dbs(info: &str) -> Vec<i64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
        .collect()
}

fn with_db(info: &redis::ConnectionInfo, db: i64) -> redis::ConnectionInfo {
    let mut i = info.clone();
    i.redis.db = db;
    i
}
