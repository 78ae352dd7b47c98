//! Redis: `redis-cli --rdb -` streams the server's RDB; the password travels in REDISCLI_AUTH,
//! the (non-secret) ACL user in `--user`, `--tls` for rediss://.

use super::{base_env, host_port, percent_decode, problem, split_url, ConfigProblem, ToolCommand};
use crate::secret::Secret;

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

pub(super) fn dump_command(url: &Secret) -> Result<ToolCommand, ConfigProblem> {
    let conn = parse(url)?;
    let temp = std::env::temp_dir();
    let mut cmd = ToolCommand {
        program: "redis-cli".into(),
        args: Vec::new(),
        env: base_env(&temp),
        secrets: vec![url.expose().to_owned()],
        credential_files: Vec::new(),
        magic: MAGIC,
        extension: "rdb",
    };
    cli_connection(&conn, &mut cmd);
    cmd.args.extend(["--rdb".into(), "-".into()]);
    Ok(cmd)
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
        let cmd = dump_command(&Secret::new("rediss://u:topsecret@h:1/0")).unwrap();
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
