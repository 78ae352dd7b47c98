//! Redis: the dump (`redis-cli --rdb -` streams the server's RDB), the restore (every key
//! DUMPed from a private copy of the backup and RESTOREd into the target), and redis-cli's error
//! dialect. The password travels in REDISCLI_AUTH, the (non-secret) ACL user in `--user`,
//! `--tls` for rediss://.

use std::path::Path;
use std::time::Duration;

use tokio::fs::File;
use tokio::io::AsyncWriteExt;

use super::{
    base_env, fail, host_port, percent_decode, problem, split_url, BackupFile, ConfigProblem, Dump,
    Failure, RestoreTarget, ToolCommand,
};
use crate::classify::Dialect;
use crate::domain::FailureReason;
use crate::process::{spawn, RunningTool};
use crate::secret::Secret;

/// redis-cli and the server's replies.
const DIALECT: Dialect = Dialect {
    auth: &[
        "wrongpass",
        "noauth",
        "invalid username-password pair",
        "auth failed",
        "invalid password",
    ],
    unreachable: &["could not connect to redis", "loading redis is loading"],
};

/// The failure class of a Redis tool's non-zero exit (or a server's error reply).
pub fn classify(stderr: &str) -> FailureReason {
    crate::classify::classify(stderr, &DIALECT)
}

pub const MAGIC: &[u8] = b"REDIS";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisConnection {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    pub db: u32,
}

pub(crate) fn parse(url: &Secret) -> Result<RedisConnection, ConfigProblem> {
    let parts = split_url(url.expose())?;
    let tls = match parts.scheme {
        "redis" => false,
        "rediss" => true,
        _ => {
            return Err(problem(
                "redis connection URL must start with redis:// or rediss://",
            ))
        }
    };
    if parts.hosts.is_empty() || parts.hosts.contains(',') {
        return Err(problem("redis connection URL must name exactly one host"));
    }
    if let Some((k, _)) = parts.query.first() {
        return Err(problem(format!(
            "redis connection URL has an unsupported parameter {k:?}"
        )));
    }
    let (host, port) = host_port(parts.hosts, 6379)?;
    let db = match parts.path {
        "" => 0,
        p => p
            .parse::<u32>()
            .map_err(|_| problem("redis connection URL database must be a number"))?,
    };
    Ok(RedisConnection {
        host: percent_decode(&host)?,
        port,
        user: parts.user.map(percent_decode).transpose()?,
        password: parts
            .password
            .map(percent_decode)
            .transpose()?
            .filter(|p| !p.is_empty()),
        tls,
        db,
    })
}

/// Connection arguments (no secrets) and the environment for redis-cli.
pub(crate) fn cli_connection(conn: &RedisConnection, cmd: &mut ToolCommand) {
    cmd.args.extend([
        "-h".into(),
        conn.host.clone().into(),
        "-p".into(),
        conn.port.to_string().into(),
    ]);
    if conn.tls {
        cmd.args.push("--tls".into());
    }
    if let Some(user) = &conn.user {
        cmd.args.extend(["--user".into(), user.into()]);
    }
    if let Some(pw) = &conn.password {
        cmd.env.push(("REDISCLI_AUTH".into(), pw.into()));
        cmd.secrets.push(pw.clone());
    }
    cmd.args.push("--no-auth-warning".into());
}

pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<Dump, ConfigProblem> {
    let conn = parse(url)?;
    let mut cmd = ToolCommand::new("redis-cli", base_env(temp_dir));
    cmd.secrets.push(url.expose().to_owned());
    cli_connection(&conn, &mut cmd);
    cmd.args.extend(["--rdb".into(), "-".into()]);
    Ok(Dump {
        command: cmd,
        extension: "rdb",
    })
}

/// Keys moved per pipelined batch.
const REDIS_BATCH: usize = 500;

/// Redis: the RDB is loaded into a private redis-server (unix socket, no TCP port); a probe
/// RESTORE checks the target accepts its payloads; then, per logical database in the backup,
/// FLUSHDB on the target and DUMP/RESTORE every key with its remaining TTL.
pub(crate) async fn restore(t: &RestoreTarget<'_>, backup: &BackupFile) -> Result<(), Failure> {
    let (tools, temp) = (t.tools, t.temp);
    let target = parse(t.url)?;
    let io = |e: std::io::Error| fail(FailureReason::Dump, format!("preparing the RDB: {e}"));
    let rdb = temp.join("dump.rdb");
    let mut decoder = backup.open().await?;
    let mut out = File::create(&rdb).await.map_err(io)?;
    tokio::io::copy(&mut decoder, &mut out).await.map_err(io)?;
    out.flush().await.map_err(io)?;
    drop(out);

    let sock = temp.join("redis.sock");
    let log = temp.join("redis.log");
    let mut cmd = ToolCommand::new("redis-server", Vec::new());
    cmd.args = vec![
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
    ];
    let mut server = spawn(tools, &cmd, false)?;
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
    server: &mut RunningTool,
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

fn target_info(t: &RedisConnection, db: i64) -> redis::ConnectionInfo {
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
        match classify(&text) {
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
    target: &RedisConnection,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_tls_ipv6_and_db() {
        let c = parse(&Secret::new("rediss://admin:p%40ss@[::1]:6380/3")).unwrap();
        assert_eq!(
            c,
            RedisConnection {
                host: "::1".into(),
                port: 6380,
                user: Some("admin".into()),
                password: Some("p@ss".into()),
                tls: true,
                db: 3
            }
        );
        let c = parse(&Secret::new("redis://:pw@cache")).unwrap();
        assert_eq!((c.user, c.port, c.db), (None, 6379, 0));
        assert!(parse(&Secret::new("redis://h/x")).is_err());
        assert!(parse(&Secret::new("redis://h?ssl=true")).is_err());
        assert!(parse(&Secret::new("memcached://h")).is_err());
    }

    #[test]
    fn password_only_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = dump_command(&Secret::new("rediss://u:topsecret@h:1/0"), dir.path())
            .unwrap()
            .command;
        let argv: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "-h",
                "h",
                "-p",
                "1",
                "--tls",
                "--user",
                "u",
                "--no-auth-warning",
                "--rdb",
                "-"
            ]
        );
        assert!(cmd
            .env
            .iter()
            .any(|(k, v)| k == "REDISCLI_AUTH" && v == "topsecret"));
    }
}
