//! Postgres and pgvector: `pg_dump --format=custom --compress=0`, connection parameters in libpq
//! environment variables and the password in a 0600 PGPASSFILE — never in argv.

use std::path::Path;

use super::{
    base_env, credential_file, host_port, percent_decode, problem, split_url, ConfigProblem,
    ToolCommand,
};
use crate::secret::Secret;

pub const MAGIC: &[u8] = b"PGDMP";

/// libpq URL query parameters we pass through, and their environment variables.
const PARAMS: &[(&str, &str)] = &[
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcrl", "PGSSLCRL"),
    ("sslnegotiation", "PGSSLNEGOTIATION"),
    ("gssencmode", "PGGSSENCMODE"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("application_name", "PGAPPNAME"),
    ("options", "PGOPTIONS"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
];

/// Connection settings for libpq tools (pg_dump, pg_restore, psql), plus the password.
#[derive(Debug)]
pub(crate) struct PgConnection {
    pub env: Vec<(String, String)>,
    pub password: Option<String>,
}

pub(crate) fn parse(url: &Secret) -> Result<PgConnection, ConfigProblem> {
    let parts = split_url(url.expose())?;
    if parts.scheme != "postgres" && parts.scheme != "postgresql" {
        return Err(problem(
            "postgres connection URL must start with postgres:// or postgresql://",
        ));
    }
    if parts.hosts.contains(',') {
        return Err(problem(
            "multi-host postgres URLs are not supported for backups",
        ));
    }
    let mut env: Vec<(String, String)> = Vec::new();
    fn set(env: &mut Vec<(String, String)>, k: &str, v: String) {
        env.retain(|(name, _)| name != k);
        env.push((k.to_owned(), v));
    }
    if !parts.hosts.is_empty() {
        let (host, port) = host_port(parts.hosts, 5432)?;
        let host = percent_decode(&host)?;
        if !host.is_empty() {
            set(&mut env, "PGHOST", host);
        }
        set(&mut env, "PGPORT", port.to_string());
    }
    let mut user = parts.user.map(percent_decode).transpose()?;
    let mut password = parts.password.map(percent_decode).transpose()?;
    let mut database = percent_decode(parts.path)?;
    for (k, v) in &parts.query {
        let v = percent_decode(v)?;
        match *k {
            "password" => password = Some(v),
            "user" => user = Some(v),
            "dbname" => database = v,
            _ => match PARAMS.iter().find(|(name, _)| name == k) {
                Some((_, var)) => set(&mut env, var, v),
                None => {
                    return Err(problem(format!(
                        "postgres connection URL has an unsupported parameter {k:?}"
                    )))
                }
            },
        }
    }
    if let Some(u) = user {
        set(&mut env, "PGUSER", u);
    }
    if database.is_empty() {
        return Err(problem("postgres connection URL names no database"));
    }
    set(&mut env, "PGDATABASE", database);
    // Fail fast on an unreachable server instead of hanging until the backup timeout.
    if !env.iter().any(|(k, _)| k == "PGCONNECT_TIMEOUT") {
        set(&mut env, "PGCONNECT_TIMEOUT", "15".into());
    }
    Ok(PgConnection {
        env,
        password: password.filter(|p| !p.is_empty()),
    })
}

/// Environment for a libpq tool: the connection, and a passfile holding the password.
pub(crate) fn tool_env(
    conn: &PgConnection,
    temp_dir: &Path,
    cmd: &mut ToolCommand,
) -> Result<(), ConfigProblem> {
    cmd.env.extend(base_env(temp_dir));
    for (k, v) in &conn.env {
        cmd.env.push((k.clone(), v.into()));
    }
    // No password: nothing to write; HOME is the job's temporary directory, so no ~/.pgpass is
    // consulted either.
    if let Some(pw) = &conn.password {
        // One line matching any host/port/db/user: the file exists only for this command.
        let escaped = pw.replace('\\', "\\\\").replace(':', "\\:");
        let file = credential_file(temp_dir, "pgpass-", &format!("*:*:*:*:{escaped}\n"))?;
        cmd.env
            .push(("PGPASSFILE".into(), file.path().as_os_str().to_owned()));
        cmd.credential_files.push(file);
        cmd.secrets.push(pw.clone());
    }
    Ok(())
}

pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<ToolCommand, ConfigProblem> {
    let conn = parse(url)?;
    let mut cmd = ToolCommand {
        program: "pg_dump".into(),
        args: ["--format=custom", "--compress=0", "--no-password"]
            .iter()
            .map(Into::into)
            .collect(),
        env: Vec::new(),
        secrets: vec![url.expose().to_owned()],
        credential_files: Vec::new(),
        magic: MAGIC,
        extension: "pgdump",
    };
    tool_env(&conn, temp_dir, &mut cmd)?;
    Ok(cmd)
}

/// The two halves of an atomic rewind. `pg_restore --single-transaction` turns the custom-format
/// dump (stdin) into a SQL script (stdout) wrapped in one BEGIN … COMMIT (its own flag matters:
/// without it the script COMMITs around large objects). `psql -v ON_ERROR_STOP=1` runs our
/// [`RESTORE_PREAMBLE`] — `BEGIN;` and a block that clears the database — then that script, whose final
/// COMMIT is the only one. An error stops psql before it; a pg_restore that dies midway never
/// writes it; either way the connection closes with the transaction open and Postgres rolls it
/// back, leaving the database exactly as it was.
pub(crate) fn restore_commands(
    url: &Secret,
    temp_dir: &Path,
) -> Result<(ToolCommand, ToolCommand), ConfigProblem> {
    let conn = parse(url)?;
    let pg_restore = ToolCommand {
        program: "pg_restore".into(),
        args: [
            "--single-transaction",
            "--no-owner",
            "--no-privileges",
            "--file=-",
        ]
        .iter()
        .map(Into::into)
        .collect(),
        env: base_env(temp_dir),
        secrets: Vec::new(),
        credential_files: Vec::new(),
        magic: MAGIC,
        extension: "pgdump",
    };
    let mut psql = ToolCommand {
        program: "psql".into(),
        args: [
            "--no-psqlrc",
            "--quiet",
            "--no-password",
            "--set=ON_ERROR_STOP=1",
            "--file=-",
        ]
        .iter()
        .map(Into::into)
        .collect(),
        env: Vec::new(),
        secrets: vec![url.expose().to_owned()],
        credential_files: Vec::new(),
        magic: MAGIC,
        extension: "pgdump",
    };
    tool_env(&conn, temp_dir, &mut psql)?;
    Ok((pg_restore, psql))
}

/// Opens the restore's transaction and clears the database, so objects created after the backup
/// do not survive the rewind. (pg_restore's own BEGIN then only warns.)
///
/// The platform's role owns its database's objects: `DROP OWNED BY CURRENT_USER` removes exactly
/// those and leaves extensions a superuser installed (the script's `CREATE EXTENSION IF NOT
/// EXISTS` then finds them). A superuser owns the system catalogs, so DROP OWNED refuses; for it
/// every large object is unlinked and every user schema dropped instead, and `public` is
/// recreated with its owner and grants.
pub(crate) const RESTORE_PREAMBLE: &[u8] = br#"BEGIN;
SET client_min_messages = warning;
DO $backup_worker_rewind$
DECLARE
  s record;
  g record;
  public_owner text;
  public_acl aclitem[];
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    DROP OWNED BY CURRENT_USER;
    RETURN;
  END IF;
  PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
  FOR s IN SELECT nspname FROM pg_namespace
            WHERE nspname !~ '^pg_' AND nspname NOT IN ('information_schema', 'public') LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
  END LOOP;
  SELECT nspowner::regrole::text, nspacl INTO public_owner, public_acl
    FROM pg_namespace WHERE nspname = 'public';
  IF FOUND THEN
    DROP SCHEMA public CASCADE;
    CREATE SCHEMA public;
    EXECUTE format('ALTER SCHEMA public OWNER TO %s', public_owner);
    FOR g IN SELECT * FROM aclexplode(public_acl) LOOP
      EXECUTE format('GRANT %s ON SCHEMA public TO %s%s', g.privilege_type,
        CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
        CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
  END IF;
END
$backup_worker_rewind$;
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &ToolCommand, k: &str) -> Option<String> {
        cmd.env
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn parses_into_libpq_environment_with_a_passfile() {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new("postgresql://app:p%40ss%3Aw0rd@[2001:db8::5]:6543/my%20db?sslmode=require&application_name=x");
        let cmd = dump_command(&url, dir.path()).unwrap();
        assert_eq!(env_of(&cmd, "PGHOST").as_deref(), Some("2001:db8::5"));
        assert_eq!(env_of(&cmd, "PGPORT").as_deref(), Some("6543"));
        assert_eq!(env_of(&cmd, "PGUSER").as_deref(), Some("app"));
        assert_eq!(env_of(&cmd, "PGDATABASE").as_deref(), Some("my db"));
        assert_eq!(env_of(&cmd, "PGSSLMODE").as_deref(), Some("require"));
        assert_eq!(env_of(&cmd, "LC_ALL").as_deref(), Some("C"));
        let passfile = env_of(&cmd, "PGPASSFILE").unwrap();
        let text = std::fs::read_to_string(&passfile).unwrap();
        assert_eq!(text, "*:*:*:*:p@ss\\:w0rd\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&passfile).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        for a in &cmd.args {
            assert!(!a.to_string_lossy().contains("p@ss"));
        }
        assert!(cmd
            .env
            .iter()
            .all(|(_, v)| !v.to_string_lossy().contains("p@ss")));
        drop(cmd);
        assert!(
            !std::path::Path::new(&passfile).exists(),
            "passfile removed on drop"
        );
    }

    #[test]
    fn bad_urls_are_config_problems() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "mysql://u:p@h/db",
            "postgres://u:p@h:notaport/db",
            "postgres://u:p@h/",
            "postgres://u:p@h1,h2/db",
            "postgres://u:p@h/db?frobnicate=1",
            "postgres://u:p%zz@h/db",
            "garbage",
        ] {
            let err = dump_command(&Secret::new(bad), dir.path()).unwrap_err();
            assert!(!err.0.contains("p%zz") && !err.0.contains(":p@"), "{err}");
        }
    }

    #[test]
    fn unix_socket_hosts_from_the_query() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = dump_command(
            &Secret::new("postgresql:///app?host=/var/run/postgresql"),
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            env_of(&cmd, "PGHOST").as_deref(),
            Some("/var/run/postgresql")
        );
        assert_eq!(env_of(&cmd, "PGPASSFILE"), None);
        assert!(cmd.credential_files.is_empty());
    }
}
