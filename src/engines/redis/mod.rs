//! Redis: the dump in its two modes, the restore, and the error dialect (DESIGN §5, §6).
//!
//! - **Instance mode**: `redis-cli --rdb -` streams the server's point-in-time RDB of the whole
//!   instance, when the resource's user may run SYNC (asked up front: `MULTI`, `SYNC`, `DISCARD`
//!   — a refused SYNC answers `NOPERM` at queue time and nothing is ever synced).
//! - **Keyspace mode**: for pooled tenants whose ACL user may not SYNC, and for one-database
//!   resources (`redis://…/N`), the worker SCANs the keys it may see, DUMPs each with its PTTL and
//!   writes an RDB stream itself ([`rdb::RdbWriter`]): one stored format.
//! - **Restore**: the RDB is read as a stream ([`rdb::RdbReader`]) and every key's value is cut
//!   out as a DUMP payload and `RESTORE … ABSTTL REPLACE`d, pipelined in batches bounded in bytes.
//!   No private server, no decompressed copy on disk; memory is bounded in bytes, whatever the
//!   dataset's or the values' sizes. Only an instance backup into a user that may SYNC is
//!   flushed; anyone else gets exactly its own keys UNLINKed.
//!
//! The password travels in REDISCLI_AUTH (or the client's AUTH), the (non-secret) ACL user in
//! `--user`, `--tls` for rediss://.
//!
//! Files: `dump.rs` (both dump modes), `restore.rs` (the rewind and the verifier's census),
//! `verify.rs` (the verifier's test restore into the scratch server of `VERIFY_REDIS_URL`),
//! `classify.rs` (the error dialect of redis-cli and of the worker's own client), `check.rs` (the
//! stored stream's structural check and the diskless EOF mark), `rdb/` (the RDB check, reader and
//! writer). This file: URL parsing and connections.

mod check;
mod classify;
mod dump;
pub(crate) mod rdb;
mod restore;
mod verify;

use super::{host_port, percent_decode, problem, split_url, ConfigProblem, Failure, ToolCommand};
use crate::secret::Secret;

pub(crate) use check::{RdbStreamCheck, StripEofMark};
pub use classify::classify;
use classify::redis_failure;
pub(super) use dump::prepare_dump;
pub use dump::KeyspaceDump;
pub(crate) use restore::{count_keys, restore};
pub use verify::{DbCount, ScratchRedis, ScratchReport};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisConnection {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    /// The one logical database the resource is (`redis://…/N`); `None`: the whole instance.
    pub db: Option<u32>,
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
        "" => None,
        p => Some(
            p.parse::<u32>()
                .map_err(|_| problem("redis connection URL database must be a number"))?,
        ),
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

fn is_noperm(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("NOPERM")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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

async fn connect(
    t: &RedisConnection,
    db: i64,
    stage: &str,
) -> Result<redis::aio::MultiplexedConnection, Failure> {
    let client = redis::Client::open(target_info(t, db)).map_err(|e| redis_failure(stage, e))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| redis_failure(stage, e))
}

/// The logical databases that hold keys, from `INFO keyspace` ("db3:keys=2,expires=1,…").
fn keyspace_dbs(info: &str) -> Vec<i64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::dump::dump_command;
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
                db: Some(3)
            }
        );
        let c = parse(&Secret::new("redis://:pw@cache")).unwrap();
        assert_eq!((c.user, c.port, c.db), (None, 6379, None));
        assert!(parse(&Secret::new("redis://h/x")).is_err());
        assert!(parse(&Secret::new("redis://h?ssl=true")).is_err());
        assert!(parse(&Secret::new("memcached://h")).is_err());
    }

    #[test]
    fn password_only_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = dump_command(&Secret::new("rediss://u:topsecret@h:1/0"), dir.path())
            .unwrap()
            .command();
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
