//! Postgres and pgvector: the dump (`pg_dump --format=custom --compress=0`), the restore (an
//! atomic rewind through `pg_restore | psql`), and libpq's error dialect. Connection parameters
//! travel in libpq environment variables and the password in a 0600 PGPASSFILE — never in argv.
//!
//! The rewind works through the tenant's own role even when the platform's superuser created
//! extensions in the database: the dump's table of contents is listed first, and the entries the
//! role cannot apply and must not touch — an installed extension it does not own, that
//! extension's comment, the data of the extension's configuration tables — are left out. A
//! needed extension that is missing and that the role cannot create fails `config` before
//! anything is touched.

use std::collections::BTreeSet;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    base_env, credential_file, fail, host_port, percent_decode, pipeline_failure, problem,
    run_failure, split_url, BackupFile, ConfigProblem, Dump, DumpPlan, Failure, RestoreTarget,
    ToolCommand,
};
use crate::classify::Dialect;
use crate::domain::FailureReason;
use crate::process::{self, spawn, supervise};
use crate::secret::Secret;

/// The custom-format archive's header and table of contents parse, and every entry's data block
/// arrives whole ([`pg_archive`](super::pg_archive)).
#[derive(Default)]
pub(crate) struct DumpCheck {
    check: super::pg_archive::PgDumpCheck,
    error: Option<String>,
}

impl crate::pipeline::StreamCheck for DumpCheck {
    fn update(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.check.update(bytes) {
                self.error = Some(e.to_string());
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<String, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let s = self.check.finish().map_err(|e| e.to_string())?;
        Ok(format!(
            "pg_dump archive {}.{}.{} of {:?}: {} entries, {} with data",
            s.archive_version.0,
            s.archive_version.1,
            s.archive_version.2,
            s.dbname,
            s.toc_entries,
            s.data_entries
        ))
    }
}

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

/// libpq, pg_dump, pg_restore and psql.
const DIALECT: Dialect = Dialect {
    auth: &[
        "password authentication failed",
        "no pg_hba.conf entry",
        "pg_hba.conf rejects connection",
        "no password supplied",
        "peer authentication failed",
        "sasl authentication failed",
    ],
    unreachable: &[
        "could not connect to server",
        "server closed the connection unexpectedly",
        "the database system is starting up",
        "the database system is shutting down",
        "the database system is in recovery mode",
        "too many connections",
        // lock_timeout: a customer transaction holds a lock the rewind needs; retried later.
        "canceling statement due to lock timeout",
        "could not obtain lock",
    ],
};

/// The failure class of a libpq tool's non-zero exit.
pub fn classify(stderr: &str) -> FailureReason {
    let lower = stderr.to_ascii_lowercase();
    // `FATAL: role "x" does not exist` is a rejected login; other "does not exist" are not.
    if lower.contains("fatal:") && lower.contains("role \"") && lower.contains("does not exist") {
        return FailureReason::Auth;
    }
    crate::classify::classify(stderr, &DIALECT)
}

pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<Dump, ConfigProblem> {
    let conn = parse(url)?;
    let mut cmd = ToolCommand::new("pg_dump", Vec::new()).args([
        "--format=custom",
        "--compress=0",
        "--no-password",
    ]);
    cmd.secrets.push(url.expose().to_owned());
    tool_env(&conn, temp_dir, &mut cmd)?;
    Ok(Dump {
        plan: DumpPlan::Tool(cmd),
        extension: "pgdump",
        mode: None,
        fallback: None,
    })
}

/// Opens the restore's transaction and clears the database, so objects created after the backup
/// do not survive the rewind. (pg_restore's own BEGIN then only warns.)
///
/// The platform's role owns its database's objects: `DROP OWNED BY CURRENT_USER` removes exactly
/// those and leaves extensions a superuser installed. A superuser owns the system catalogs, so
/// DROP OWNED refuses; for it every large object is unlinked and every user schema dropped
/// instead, and `public` is recreated with its owner and grants.
pub(crate) const RESTORE_PREAMBLE: &str = r#"BEGIN;
SET client_min_messages = warning;
SET lock_timeout = '30s';
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

/// Any statement of the rewind waits at most 30 s for a lock, then the rewind fails `unreachable`
/// and rolls back, rather than queueing the customer's traffic behind it. pg_restore's script
/// header resets lock_timeout for its session; ours must stay in force.
const SCRIPT_LOCK_RESET: &[u8] = b"SET lock_timeout = 0;";
const SCRIPT_LOCK_OURS: &[u8] = b"SET lock_timeout = '30s';";
/// The script header (SET lines) is within its first few hundred bytes.
const SCRIPT_HEADER: usize = 16 * 1024;

/// The most of pg_restore's `--list` and of the probe's answer we keep in memory.
const LISTING_LIMIT: usize = 64 * 1024 * 1024;

/// The dump's table of contents (`pg_restore --list`) and the extensions it creates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Toc {
    /// Every line of `pg_restore --list`, in order.
    lines: Vec<String>,
    /// Extensions the dump creates.
    extensions: BTreeSet<String>,
}

impl Toc {
    pub(crate) fn parse(listing: &str) -> Self {
        let mut toc = Toc::default();
        for line in listing.lines() {
            if let Some(name) = entry(line).and_then(|e| e.strip_prefix("EXTENSION - ")) {
                if let Some(name) = name.split_whitespace().next() {
                    toc.extensions.insert(name.to_owned());
                }
            }
            toc.lines.push(line.to_owned());
        }
        toc
    }
}

/// The part of a TOC line after `<dump id>; <catalog oid> <object oid> `, or None for comments.
fn entry(line: &str) -> Option<&str> {
    let (id, rest) = line.split_once("; ")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut parts = rest.splitn(3, ' ');
    let (_catalog, _oid) = (parts.next()?, parts.next()?);
    parts.next()
}

/// What the target database says about extensions, as the restoring role sees it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Target {
    superuser: bool,
    /// Installed extensions, and whether the role owns each.
    installed: Vec<(String, bool)>,
    /// Extensions the role could create (available, and trusted or the role is a superuser).
    creatable: BTreeSet<String>,
    /// (extension, `schema name`) of every table that belongs to an extension.
    members: BTreeSet<(String, String)>,
}

/// One query, answered as `kind<US>a<US>b` lines (US = 0x1f, which no name contains). `trusted`
/// is read through to_jsonb: the column exists from Postgres 13, and 12 has no trusted extensions.
const PROBE_SQL: &str = "\
SELECT 'super', (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)::text, ''
UNION ALL
SELECT 'installed', e.extname, (pg_get_userbyid(e.extowner) = current_user)::text FROM pg_extension e
UNION ALL
SELECT 'creatable', a.name, '' FROM pg_available_extensions a
  JOIN pg_available_extension_versions v ON v.name = a.name AND v.version = a.default_version
 WHERE (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
    OR (coalesce((to_jsonb(v) ->> 'trusted')::boolean, false)
        AND has_database_privilege(current_database(), 'CREATE'))
UNION ALL
SELECT 'member', e.extname, n.nspname || ' ' || c.relname FROM pg_depend d
  JOIN pg_class c ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_extension e ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
 WHERE d.deptype = 'e'";

impl Target {
    pub(crate) fn parse(answer: &str) -> Self {
        let mut t = Target::default();
        for line in answer.lines() {
            let mut f = line.split('\x1f');
            let (Some(kind), Some(a), b) = (f.next(), f.next(), f.next().unwrap_or("")) else {
                continue;
            };
            match kind {
                "super" => t.superuser = a == "true",
                "installed" => t.installed.push((a.to_owned(), b == "true")),
                "creatable" => {
                    t.creatable.insert(a.to_owned());
                }
                "member" => {
                    t.members.insert((a.to_owned(), b.to_owned()));
                }
                _ => {}
            }
        }
        t
    }
}

/// The use-list for pg_restore: the dump's entries, minus those the role cannot apply and must
/// not touch. Fails `config` (naming the extension) when the dump needs an extension the target
/// lacks and the role cannot create.
pub(crate) fn use_list(toc: &Toc, target: &Target) -> Result<(String, Vec<String>), ConfigProblem> {
    let mut foreign = BTreeSet::new();
    for ext in &toc.extensions {
        match target.installed.iter().find(|(name, _)| name == ext) {
            Some((_, owned)) if *owned || target.superuser => {}
            Some(_) => {
                foreign.insert(ext.as_str());
            }
            None if target.creatable.contains(ext) => {}
            None => {
                return Err(problem(format!(
                    "the backup needs the extension {ext:?}, which is not installed in the target \
                     database and which its role cannot create; install it (as a superuser) and retry"
                )))
            }
        }
    }
    let mut skipped = Vec::new();
    let mut out = String::new();
    for line in &toc.lines {
        let skip = entry(line).is_some_and(|e| {
            let ext_entry = e
                .strip_prefix("EXTENSION - ")
                .or_else(|| e.strip_prefix("COMMENT - EXTENSION "))
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|name| foreign.contains(name));
            // Data of a left-alone extension's own (configuration) tables belongs to it.
            let member_data = ["TABLE DATA ", "SEQUENCE SET "].iter().any(|kind| {
                e.strip_prefix(kind).is_some_and(|rest| {
                    let t: Vec<&str> = rest.split(' ').collect();
                    t.len() >= 2
                        && target.members.iter().any(|(ext, table)| {
                            foreign.contains(ext.as_str()) && *table == format!("{} {}", t[0], t[1])
                        })
                })
            });
            ext_entry || member_data
        });
        if skip {
            skipped.push(line.clone());
            out.push(';');
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok((out, skipped))
}

/// psql reading SQL from stdin, stopping at the first error, as the resource's role.
fn psql(conn: &PgConnection, url: &Secret, temp: &Path) -> Result<ToolCommand, ConfigProblem> {
    let mut cmd = ToolCommand::new("psql", Vec::new()).args([
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--set=ON_ERROR_STOP=1",
    ]);
    cmd.secrets.push(url.expose().to_owned());
    tool_env(conn, temp, &mut cmd)?;
    Ok(cmd)
}

/// The atomic rewind. `pg_restore --single-transaction` turns the custom-format dump (stdin) into
/// a SQL script (stdout) wrapped in one BEGIN … COMMIT (its own flag matters: without it the
/// script COMMITs around large objects). psql runs our [`RESTORE_PREAMBLE`] — `BEGIN;`,
/// lock_timeout, a block that clears the database — then that script, whose final COMMIT is the
/// only one. An error stops psql before it; a pg_restore that dies midway never writes it; either
/// way the connection closes with the transaction open and Postgres rolls it back, leaving the
/// database exactly as it was. The two tools are supervised as one unit: whichever fails first,
/// the other is killed at once.
pub(crate) async fn restore(t: &RestoreTarget<'_>, backup: &BackupFile) -> Result<(), Failure> {
    let conn = parse(t.url)?;

    // 1. What the dump holds, and what the target allows — before anything is touched.
    let list_cmd = ToolCommand::new("pg_restore", base_env(t.temp)).args(["--list"]);
    let (_, listing) = process::run_one(
        t.tools,
        &list_cmd,
        Some(backup.open().await?),
        LISTING_LIMIT,
    )
    .await
    .map_err(|e| run_failure(e, classify, "listing the backup's contents"))?;
    if listing.len() >= LISTING_LIMIT {
        // A cut listing would silently restore only its head: refuse instead.
        return Err(fail(
            FailureReason::Config,
            format!("the backup's table of contents lists more than {LISTING_LIMIT} bytes of entries; too large to filter"),
        ));
    }
    let toc = Toc::parse(&String::from_utf8_lossy(&listing));
    let probe_cmd = psql(&conn, t.url, t.temp)?.args([
        "--no-align",
        "--tuples-only",
        "--field-separator=\x1f",
        "--command",
        PROBE_SQL,
    ]);
    let (_, answer) = process::run_one(t.tools, &probe_cmd, None::<&[u8]>, LISTING_LIMIT)
        .await
        .map_err(|e| run_failure(e, classify, "probing the target database"))?;
    let target = Target::parse(&String::from_utf8_lossy(&answer));
    let (list, skipped) = use_list(&toc, &target)?;
    if !skipped.is_empty() {
        tracing::info!(entries = ?skipped, "restore leaves entries owned by another role as they are");
    }
    let list_file = credential_file(t.temp, "use-list-", &list)?;

    // 2. The rewind: pg_restore | (preamble + script) | psql, one transaction.
    let mut list_arg = std::ffi::OsString::from("--use-list=");
    list_arg.push(list_file.path());
    let pgr_cmd = ToolCommand::new("pg_restore", base_env(t.temp)).args([
        "--single-transaction".into(),
        "--no-owner".into(),
        "--no-privileges".into(),
        "--file=-".into(),
        list_arg,
    ]);
    let psql_cmd = psql(&conn, t.url, t.temp)?.args(["--file=-"]);
    let source = backup.open().await?;
    let mut pgr = spawn(t.tools, &pgr_cmd, true)?;
    let mut psql = spawn(t.tools, &psql_cmd, true)?;
    let (pgr_in, pgr_out) = (pgr.stdin.take(), pgr.stdout.take());
    let (psql_in, psql_out) = (psql.stdin.take(), psql.stdout.take());
    let io = async move {
        let feed = async {
            match pgr_in {
                // pg_restore stops reading once it has the last entry it needs (the tail may be
                // left out by the use-list): its exit status says whether that was fine.
                Some(w) => match process::pump(source, w).await {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                    r => r.map(drop),
                },
                None => Ok(()),
            }
        };
        let relay = async {
            match (pgr_out, psql_in) {
                (Some(r), Some(w)) => relay_script(r, w).await,
                _ => Ok(()),
            }
        };
        let drain = async {
            match psql_out {
                Some(out) => process::capture(out, 0).await.map(drop),
                None => Ok(()),
            }
        };
        let (a, b, c) = tokio::join!(feed, relay, drain);
        // A failure of our own beats a broken pipe, which a tool's exit explains better.
        let results = [a, b, c];
        let mut pipe = None;
        for r in results {
            match r {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                Err(e) => pipe = Some(e),
                Ok(()) => {}
            }
        }
        pipe.map_or(Ok(()), Err)
    };
    let finished = match supervise(vec![pgr, psql], io).await {
        Ok((finished, ())) => finished,
        Err(e) => {
            let mut f = pipeline_failure(e, classify, "restoring");
            f.detail.push_str(" (transaction rolled back)");
            return Err(f);
        }
    };
    drop(list_file);
    if finished
        .iter()
        .any(|f| f.stderr.contains("there is no transaction in progress"))
    {
        return Err(fail(
            FailureReason::Dump,
            "restore script committed more than once",
        ));
    }
    Ok(())
}

/// Where a postgres URL points: host (lowercased; a socket directory or none is "local"), port
/// and database.
fn endpoint(url: &Secret) -> Result<(String, u16, String), ConfigProblem> {
    let conn = parse(url)?;
    let get = |k: &str| {
        conn.env
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    let host = get("PGHOST").unwrap_or_default().to_ascii_lowercase();
    let host = if host.is_empty() || host.starts_with('/') {
        "local".to_owned()
    } else {
        host
    };
    let port = get("PGPORT").and_then(|p| p.parse().ok()).unwrap_or(5432);
    Ok((host, port, get("PGDATABASE").unwrap_or_default()))
}

fn loopback(host: &str) -> bool {
    host == "local"
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether two postgres URLs name the same database: same name, same port, and the same host —
/// by name, both loopback, or resolving to a common address.
pub(crate) async fn same_database(a: &Secret, b: &Secret) -> bool {
    let (Ok((host_a, port_a, db_a)), Ok((host_b, port_b, db_b))) = (endpoint(a), endpoint(b))
    else {
        return false;
    };
    if db_a != db_b || port_a != port_b {
        return false;
    }
    if host_a == host_b || (loopback(&host_a) && loopback(&host_b)) {
        return true;
    }
    let resolve = |host: String| async move {
        let lookup = tokio::net::lookup_host((host.as_str(), port_a));
        match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
            Ok(Ok(addrs)) => addrs
                .map(|a| a.ip())
                .map(|ip| if ip.is_loopback() { None } else { Some(ip) })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        }
    };
    let (ips_a, ips_b) = tokio::join!(resolve(host_a.clone()), resolve(host_b.clone()));
    let both_loopback = |ips: &[Option<std::net::IpAddr>], host: &str| {
        loopback(host) || (!ips.is_empty() && ips.iter().all(Option::is_none))
    };
    (both_loopback(&ips_a, &host_a) && both_loopback(&ips_b, &host_b))
        || ips_a.iter().flatten().any(|ip| ips_b.contains(&Some(*ip)))
}

/// The verifier's scratch databases (DESIGN §11) are named `bw_verify_<verification>_<attempt>_<unix
/// seconds>`: which attempt owns one and when it was made, so a replica can drop what a crashed
/// one left behind (and nothing a live attempt still uses).
pub const SCRATCH_PREFIX: &str = "bw_verify_";

pub fn scratch_name(verification: uuid::Uuid, attempt: i32, created_unix: i64) -> String {
    format!(
        "{SCRATCH_PREFIX}{}_{attempt}_{created_unix}",
        verification.simple()
    )
}

/// (verification, attempt, created unix seconds) of a scratch database's name.
pub fn parse_scratch_name(name: &str) -> Option<(uuid::Uuid, i32, i64)> {
    let mut parts = name.strip_prefix(SCRATCH_PREFIX)?.split('_');
    let id = uuid::Uuid::try_parse(parts.next()?).ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let created = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((id, attempt, created))
}

/// `url` with its database replaced (and any `dbname=` parameter dropped): the scratch
/// database's URL for psql, credentials kept.
pub(crate) fn with_database(url: &Secret, database: &str) -> Result<Secret, ConfigProblem> {
    parse(url)?;
    let raw = url.expose();
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| problem("connection URL has no scheme"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let authority = rest.split('/').next().unwrap_or("");
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("dbname="))
        .collect();
    let mut out = format!("{scheme}://{authority}/{database}");
    if !params.is_empty() {
        out.push('?');
        out.push_str(&params.join("&"));
    }
    Ok(Secret::new(out))
}

/// A failure talking to the verifier's Postgres: rejected logins are `auth`, anything on the wire
/// `unreachable`, the rest (a role that may not create databases, …) `config`.
fn sql_failure(what: &str, e: sqlx::Error) -> Failure {
    let reason = match &e {
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("28P01" | "28000") => FailureReason::Auth,
            Some(c) if c.starts_with("08") || c.starts_with("57P") => FailureReason::Unreachable,
            _ => FailureReason::Config,
        },
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
            FailureReason::Unreachable
        }
        // Anything else on the verifier's own server is the server's problem, never the
        // backup's (`dump` is reserved for the tools refusing the backup's contents).
        _ => FailureReason::Config,
    };
    fail(
        reason,
        crate::secret::redact_credentials(&format!("{what}: {e}")),
    )
}

/// The server scratch databases are made on (`VERIFY_DATABASE_URL`, a role that may CREATE
/// DATABASE). Connections are opened as they are needed.
pub struct ScratchServer {
    url: Secret,
    options: sqlx::postgres::PgConnectOptions,
    admin: sqlx::PgPool,
}

impl ScratchServer {
    pub fn new(url: &Secret) -> Result<Self, ConfigProblem> {
        let options: sqlx::postgres::PgConnectOptions = url
            .expose()
            .parse()
            .map_err(|_| problem("VERIFY_DATABASE_URL is not a valid postgres URL"))?;
        let options = options.application_name("backup-worker verifier");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(15))
            .connect_lazy_with(options.clone());
        Ok(Self {
            url: url.clone(),
            options,
            admin,
        })
    }

    /// Creates an empty database (from template0) and returns its URL.
    pub async fn create(&self, name: &str) -> Result<Secret, Failure> {
        sqlx::query(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .execute(&self.admin)
            .await
            .map_err(|e| sql_failure("creating the scratch database", e))?;
        Ok(with_database(&self.url, name)?)
    }

    /// Drops a scratch database, disconnecting whoever is still in it.
    pub async fn drop_database(&self, name: &str) -> Result<(), Failure> {
        let forced = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&self.admin)
            .await;
        match forced {
            Ok(_) => Ok(()),
            // Before Postgres 13 there is no FORCE.
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42601") => {
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                    .execute(&self.admin)
                    .await
                    .map(drop)
                    .map_err(|e| sql_failure("dropping the scratch database", e))
            }
            Err(e) => Err(sql_failure("dropping the scratch database", e)),
        }
    }

    /// Every scratch database on the server.
    pub async fn list(&self) -> Result<Vec<String>, Failure> {
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(SCRATCH_PREFIX)
            .fetch_all(&self.admin)
            .await
            .map_err(|e| sql_failure("listing scratch databases", e))
    }

    /// Exact row counts of every user table (`schema.table`; extension-owned tables left out).
    pub async fn count_rows(
        &self,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, i64>, Failure> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect_with(&self.options.clone().database(name))
            .await
            .map_err(|e| sql_failure("connecting to the scratch database", e))?;
        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype = 'e')
              ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| sql_failure("listing the restored tables", e))?;
        let mut counts = std::collections::BTreeMap::new();
        for (label, qualified) in tables {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ONLY {qualified}"))
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_failure(&format!("counting the rows of {label}"), e))?;
            counts.insert(label, n);
        }
        let _ = conn.close().await;
        Ok(counts)
    }
}

/// pg_restore's script into psql: our preamble first, then the script with its lock_timeout
/// reset replaced by ours, then EOF.
async fn relay_script<R, W>(mut from: R, mut to: W) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    to.write_all(RESTORE_PREAMBLE.as_bytes()).await?;
    let mut head = Vec::with_capacity(SCRIPT_HEADER);
    let mut buf = vec![0u8; SCRIPT_HEADER];
    while head.len() < SCRIPT_HEADER {
        let n = from.read(&mut buf[..SCRIPT_HEADER - head.len()]).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    if let Some(at) = head
        .windows(SCRIPT_LOCK_RESET.len())
        .position(|w| w == SCRIPT_LOCK_RESET)
    {
        head.splice(
            at..at + SCRIPT_LOCK_RESET.len(),
            SCRIPT_LOCK_OURS.iter().copied(),
        );
    }
    to.write_all(&head).await?;
    process::pump(from, to).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pg_restore --list` of a tenant database with superuser-created extensions (Postgres 15).
    const LISTING: &str = "\
;
; Archive created at 2026-11-22 10:00:00 UTC
;     dbname: tenant
;
; Selected TOC Entries:
;
2; 3079 16385 EXTENSION - citext 
3390; 0 0 COMMENT - EXTENSION citext 
3; 3079 16480 EXTENSION - pg_trgm 
3391; 0 0 COMMENT - EXTENSION pg_trgm 
4; 3079 16600 EXTENSION - postgis 
215; 1259 16570 TABLE public notes app
3383; 0 16570 TABLE DATA public notes app
3384; 0 16700 TABLE DATA public spatial_ref_sys postgres
3240; 2606 16576 CONSTRAINT public notes notes_pkey app
3241; 1259 16578 INDEX public notes_body_trgm app
";

    fn target(super_: bool, installed: &[(&str, bool)], creatable: &[&str]) -> Target {
        Target {
            superuser: super_,
            installed: installed.iter().map(|(n, o)| ((*n).into(), *o)).collect(),
            creatable: creatable.iter().map(|n| (*n).into()).collect(),
            members: [("postgis".to_owned(), "public spatial_ref_sys".to_owned())].into(),
        }
    }

    fn commented(list: &str) -> Vec<&str> {
        list.lines()
            .filter_map(|l| l.strip_prefix(';'))
            .filter(|l| l.contains(' '))
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .collect()
    }

    #[test]
    fn the_tenant_role_skips_extensions_it_does_not_own() {
        let toc = Toc::parse(LISTING);
        assert_eq!(
            toc.extensions
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["citext", "pg_trgm", "postgis"]
        );
        let t = target(
            false,
            &[("citext", false), ("pg_trgm", true), ("postgis", false)],
            &[],
        );
        let (list, skipped) = use_list(&toc, &t).unwrap();
        assert_eq!(
            commented(&list),
            [
                "2; 3079 16385 EXTENSION - citext ",
                "3390; 0 0 COMMENT - EXTENSION citext ",
                "4; 3079 16600 EXTENSION - postgis ",
                "3384; 0 16700 TABLE DATA public spatial_ref_sys postgres",
            ],
            "the role's own extension (pg_trgm) and everything it owns are kept"
        );
        assert_eq!(skipped.len(), 4);
        assert_eq!(list.lines().count(), LISTING.lines().count(), "order kept");
    }

    #[test]
    fn a_superuser_keeps_everything() {
        let toc = Toc::parse(LISTING);
        let t = target(
            true,
            &[("citext", false), ("pg_trgm", false), ("postgis", false)],
            &[],
        );
        let (list, skipped) = use_list(&toc, &t).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(list, format!("{LISTING}"));
    }

    #[test]
    fn a_missing_extension_is_created_when_trusted_else_refused_by_name() {
        let toc = Toc::parse(LISTING);
        let ok = target(false, &[("postgis", false)], &["citext", "pg_trgm"]);
        assert!(use_list(&toc, &ok).is_ok());
        let refused = target(false, &[("citext", false)], &["citext", "pg_trgm"]);
        let err = use_list(&toc, &refused).unwrap_err();
        assert!(err.0.contains("\"postgis\""), "{err}");
    }

    #[test]
    fn probe_answers_parse() {
        let t = Target::parse(
            "super\x1ffalse\x1f\ninstalled\x1fplpgsql\x1ffalse\ninstalled\x1fcitext\x1ftrue\n\
             creatable\x1fhstore\x1f\nmember\x1fpostgis\x1fpublic spatial_ref_sys\n",
        );
        assert!(!t.superuser);
        assert_eq!(
            t.installed,
            [("plpgsql".to_owned(), false), ("citext".to_owned(), true)]
        );
        assert!(t.creatable.contains("hstore"));
        assert!(t
            .members
            .contains(&("postgis".to_owned(), "public spatial_ref_sys".to_owned())));
    }

    #[tokio::test]
    async fn the_script_keeps_our_lock_timeout() {
        let script = b"--\n-- PostgreSQL database dump\n--\nSET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\nBEGIN;\nCREATE TABLE t (x int);\nCOMMIT;\n";
        let mut out = Vec::new();
        relay_script(&script[..], &mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(RESTORE_PREAMBLE));
        let rest = &text[RESTORE_PREAMBLE.len()..];
        assert!(!rest.contains("SET lock_timeout = 0;"), "{rest}");
        assert!(rest.contains("SET lock_timeout = '30s';\nSET idle_in_transaction"));
        assert!(rest.ends_with("COMMIT;\n"));
    }

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
        let cmd = dump_command(&url, dir.path()).unwrap().command();
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
            let Err(err) = dump_command(&Secret::new(bad), dir.path()) else {
                panic!("{bad} must be refused")
            };
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
        .unwrap()
        .command();
        assert_eq!(
            env_of(&cmd, "PGHOST").as_deref(),
            Some("/var/run/postgresql")
        );
        assert_eq!(env_of(&cmd, "PGPASSFILE"), None);
        assert!(cmd.credential_files.is_empty());
    }
}

#[cfg(test)]
mod control_database {
    use super::*;

    fn s(url: &str) -> Secret {
        Secret::new(url.to_owned())
    }

    #[tokio::test]
    async fn the_same_database_by_any_loopback_name() {
        let control = s("postgres://worker:pw@127.0.0.1:5432/backup_worker");
        for same in [
            "postgres://tenant:x@localhost/backup_worker",
            "postgresql://other@[::1]:5432/backup_worker?sslmode=disable",
            "postgres:///backup_worker",
            "postgres://u@127.0.0.1/postgres?dbname=backup_worker",
        ] {
            assert!(same_database(&s(same), &control).await, "{same}");
        }
        for other in [
            "postgres://worker:pw@127.0.0.1:5432/backup_worker_demo",
            "postgres://worker:pw@127.0.0.1:5433/backup_worker",
            "postgres://worker:pw@db.invalid:5432/backup_worker",
            "not a url",
        ] {
            assert!(!same_database(&s(other), &control).await, "{other}");
        }
    }
}
