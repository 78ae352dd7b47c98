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

pub(crate) mod base;
pub(crate) mod replay;
mod rewind;
mod scratch;
pub(crate) mod wal;

pub use scratch::{
    parse_scratch_name, scratch_name, test_restore, ScratchServer, TestRestore, SCRATCH_PREFIX,
};

use std::path::Path;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pg_archive::TocEntry;
use super::{
    base_env, credential_file, fail, host_port, percent_decode, pipeline_failure, problem,
    run_failure, split_url, BackupFile, ConfigProblem, Dump, DumpPlan, Failure, RestoreReport,
    RestoreTarget, ToolCommand,
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
    parse_with(url, true)
}

/// A replication connection (pg_receivewal, pg_basebackup, DESIGN §14): physical replication
/// names no database, so the URL need not either.
pub(crate) fn parse_replication(url: &Secret) -> Result<PgConnection, ConfigProblem> {
    parse_with(url, false)
}

fn parse_with(url: &Secret, require_database: bool) -> Result<PgConnection, ConfigProblem> {
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
    if database.is_empty() && require_database {
        return Err(problem("postgres connection URL names no database"));
    }
    if !database.is_empty() {
        set(&mut env, "PGDATABASE", database);
    }
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
    // A base backup of a cluster with tablespaces of its own cannot be one tar stream (§14).
    if lower.contains("can only write single tablespace to stdout") {
        return FailureReason::Config;
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
/// The tenant's role: everything owned by a role it acts as ("ours": itself and the roles it
/// has the privileges of, never the predefined `pg_*`) is dropped — its schemas (not `public`,
/// not one holding an extension another role installed), its extensions, every other object of
/// ours found through pg_shdepend (not an extension's member) and its large objects — while
/// privileges granted to our roles on the platform's objects stay (`DROP OWNED BY` would revoke
/// them, and only the platform could grant them again). Default privileges of our roles go back
/// to the built-in ones, and `public`'s privileges to its initial ones (pg_init_privs) when we
/// act as its owner: the dump's privileges are differences from those. A superuser owns the
/// system catalogs, so for it every large object is unlinked and every user schema dropped
/// instead, and `public` is recreated with its owner and initial grants.
pub(crate) const RESTORE_PREAMBLE: &str = r#"BEGIN;
SET client_min_messages = warning;
SET lock_timeout = '30s';
DO $backup_worker_rewind$
DECLARE
  s record;
  g record;
  stmt text;
  stmts text[];
  ours oid[];
  public_owner text;
  public_acl aclitem[];
  kinds CONSTANT jsonb := '{"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}';
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    ours := ARRAY(SELECT oid FROM pg_roles WHERE pg_has_role(oid, 'USAGE') AND rolname !~ '^pg_');
    FOR s IN SELECT n.nspname FROM pg_namespace n
              WHERE n.nspname !~ '^pg_' AND n.nspname NOT IN ('public', 'information_schema')
                AND n.nspowner = ANY (ours)
                AND NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extnamespace = n.oid
                                   AND e.extowner <> ALL (ours)) LOOP
      EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
    END LOOP;
    -- (An extension of ours another role's extension needs stays: the dump's CREATE EXTENSION
    -- IF NOT EXISTS leaves it be.)
    FOR s IN SELECT e.extname FROM pg_extension e
              WHERE e.extowner = ANY (ours)
                AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension f ON f.oid = d.objid
                                 WHERE d.classid = 'pg_extension'::regclass AND d.refobjid = e.oid
                                   AND d.refclassid = 'pg_extension'::regclass
                                   AND f.extowner <> ALL (ours)) LOOP
      EXECUTE format('DROP EXTENSION IF EXISTS %I CASCADE', s.extname);
    END LOOP;
    PERFORM lo_unlink(d.objid) FROM pg_shdepend d
      WHERE d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND d.classid = 'pg_largeobject'::regclass AND d.deptype = 'o'
        AND d.refobjid = ANY (ours);
    -- Listed first, dropped after: a drop cascades to objects further down the list.
    SELECT coalesce(array_agg(format('DROP %s IF EXISTS %s CASCADE',
             CASE i.type WHEN 'composite type' THEN 'TYPE' WHEN 'statistics object' THEN 'STATISTICS'
                         WHEN 'foreign-data wrapper' THEN 'FOREIGN DATA WRAPPER' ELSE upper(i.type) END,
             i.identity)
             ORDER BY CASE WHEN d.classid = 'pg_class'::regclass THEN 0 ELSE 1 END, d.objid), '{}')
      INTO stmts
      FROM pg_shdepend d, LATERAL pg_identify_object(d.classid, d.objid, d.objsubid) i
     WHERE d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND d.deptype = 'o' AND d.refobjid = ANY (ours)
       AND i.type NOT IN ('schema', 'extension', 'large object', 'default acl', 'database',
                          'event trigger', 'subscription', 'role', 'tablespace')
       AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = d.classid AND x.objid = d.objid
                          AND x.deptype = 'e');
    FOREACH stmt IN ARRAY stmts LOOP
      EXECUTE stmt;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_namespace n JOIN pg_init_privs p ON p.objoid = n.oid
                 AND p.classoid = 'pg_namespace'::regclass AND p.objsubid = 0
                WHERE n.nspname = 'public' AND pg_has_role(n.nspowner, 'USAGE')) THEN
      FOR g IN SELECT a.* FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'public' LOOP
        EXECUTE format('REVOKE %s ON SCHEMA public FROM %s CASCADE', g.privilege_type,
          CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
      END LOOP;
      FOR g IN SELECT a.* FROM pg_init_privs p, aclexplode(p.initprivs) a
                WHERE p.objoid = 'public'::regnamespace AND p.classoid = 'pg_namespace'::regclass
                  AND p.objsubid = 0 LOOP
        EXECUTE format('GRANT %s ON SCHEMA public TO %s%s', g.privilege_type,
          CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
          CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
      END LOOP;
    END IF;
  ELSE
    PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
    FOR s IN SELECT nspname FROM pg_namespace
              WHERE nspname !~ '^pg_' AND nspname NOT IN ('information_schema', 'public') LOOP
      EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
    END LOOP;
    SELECT n.nspowner::regrole::text, coalesce(p.initprivs, n.nspacl) INTO public_owner, public_acl
      FROM pg_namespace n LEFT JOIN pg_init_privs p ON p.objoid = n.oid
       AND p.classoid = 'pg_namespace'::regclass AND p.objsubid = 0
     WHERE n.nspname = 'public';
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
  END IF;
  -- Default privileges of our roles (all roles, for a superuser) back to the built-in ones.
  SELECT coalesce(array_agg(format('ALTER DEFAULT PRIVILEGES FOR ROLE %s %s REVOKE ALL ON %s FROM %s',
           d.defaclrole::regrole::text,
           CASE WHEN d.defaclnamespace = 0 THEN '' ELSE format('IN SCHEMA %I', n.nspname) END,
           kinds ->> d.defaclobjtype::text,
           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)), '{}')
    INTO stmts
    FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace,
         aclexplode(d.defaclacl) a
   WHERE pg_has_role(d.defaclrole, 'MEMBER')
     AND (d.defaclrole NOT IN (SELECT oid FROM pg_roles WHERE rolname ~ '^pg_'));
  SELECT stmts || coalesce(array_agg(format('ALTER DEFAULT PRIVILEGES FOR ROLE %1$s GRANT ALL ON %2$s TO %1$s',
           d.defaclrole::regrole::text, kinds ->> d.defaclobjtype::text)), '{}')
    INTO stmts
    FROM pg_default_acl d
   WHERE d.defaclnamespace = 0 AND pg_has_role(d.defaclrole, 'MEMBER')
     AND (d.defaclrole NOT IN (SELECT oid FROM pg_roles WHERE rolname ~ '^pg_'));
  SELECT stmts || coalesce(array_agg(format('ALTER DEFAULT PRIVILEGES FOR ROLE %s GRANT %s ON %s TO PUBLIC',
           d.defaclrole::regrole::text,
           CASE d.defaclobjtype WHEN 'f' THEN 'EXECUTE' ELSE 'USAGE' END,
           kinds ->> d.defaclobjtype::text)), '{}')
    INTO stmts
    FROM pg_default_acl d
   WHERE d.defaclnamespace = 0 AND d.defaclobjtype IN ('f', 'T') AND pg_has_role(d.defaclrole, 'MEMBER')
     AND (d.defaclrole NOT IN (SELECT oid FROM pg_roles WHERE rolname ~ '^pg_'));
  FOREACH stmt IN ARRAY stmts LOOP
    EXECUTE stmt;
  END LOOP;
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
/// The script's end (its COMMIT, a closing comment, psql's `\unrestrict`) is within this many
/// bytes: held back so the worker's statements go in before that COMMIT.
const SCRIPT_TAIL: usize = 16 * 1024;
/// The script's only COMMIT, written by `pg_restore --single-transaction` at its end.
const SCRIPT_COMMIT: &[u8] = b"\nCOMMIT;\n";

/// The longest probe passed as one argument (Linux takes up to 128 KiB per argument).
const PROBE_ARG_LIMIT: usize = 100 * 1024;

/// The most of pg_restore's `--list` and of the probe's answer we keep in memory.
const LISTING_LIMIT: usize = 64 * 1024 * 1024;

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

/// The failure class of the rewind's psql or pg_restore. Beyond libpq's dialect: a statement
/// the target rejects deterministically — an object it cannot create or drop, a permission the
/// role lacks — is `conflict` (not retried: the same statement would be rejected again).
pub fn classify_restore(stderr: &str) -> FailureReason {
    match classify(stderr) {
        FailureReason::Dump => {}
        other => return other,
    }
    let lower = stderr.to_ascii_lowercase();
    const CONFLICT: &[&str] = &[
        "permission denied",
        "must be owner",
        "must be member",
        "must be able to set role",
        "must be superuser",
        "only superuser",
        "already exists",
        "cannot drop",
        "does not exist",
        "depends on",
        "duplicate key value",
    ];
    let rejected = lower.lines().any(|l| {
        l.contains("error:") && l.starts_with("psql:") && CONFLICT.iter().any(|p| l.contains(p))
    });
    if rejected {
        FailureReason::Conflict
    } else {
        FailureReason::Dump
    }
}

/// The archive's table of contents, read from the backup (only its head).
async fn read_toc(backup: &BackupFile) -> Result<Vec<TocEntry>, Failure> {
    let backup = backup.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = backup.open_blocking()?;
        super::pg_archive::read_toc(&mut raw).map_err(|e| {
            fail(
                FailureReason::Integrity,
                format!("reading the backup's table of contents: {e}"),
            )
        })
    })
    .await
    .map_err(|e| {
        fail(
            FailureReason::Dump,
            format!("reading the backup's table of contents: {e}"),
        )
    })?
}

/// The atomic rewind. `pg_restore --single-transaction` turns the custom-format dump (stdin) into
/// a SQL script (stdout) wrapped in one BEGIN … COMMIT (its own flag matters: without it the
/// script COMMITs around large objects). psql runs our [`RESTORE_PREAMBLE`] — `BEGIN;`,
/// lock_timeout, a block that clears the database — and the plan's own statements before it,
/// then that script with the plan's privileges and owners inserted before its final COMMIT,
/// the only one. An error stops psql before it; a pg_restore that dies midway never writes it;
/// either way the connection closes with the transaction open and Postgres rolls it back,
/// leaving the database exactly as it was. The two tools are supervised as one unit: whichever
/// fails first, the other is killed at once.
pub(crate) async fn restore(
    t: &RestoreTarget<'_>,
    backup: &BackupFile,
) -> Result<RestoreReport, Failure> {
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
    let lines: Vec<String> = String::from_utf8_lossy(&listing)
        .lines()
        .map(str::to_owned)
        .collect();
    let entries = read_toc(backup).await?;
    let probe = rewind::probe_sql(&rewind::named_roles(&entries));
    let probe_cmd =
        psql(&conn, t.url, t.temp)?.args(["--no-align", "--tuples-only", "--field-separator=\x1f"]);
    // In argv (it holds names, never a secret) unless it is too long for one argument.
    let (probe_cmd, input) = if probe.len() < PROBE_ARG_LIMIT {
        (probe_cmd.args(["--command", probe.as_str()]), None)
    } else {
        (probe_cmd.args(["--file=-"]), Some(probe.as_bytes()))
    };
    let (_, answer) = process::run_one(t.tools, &probe_cmd, input, LISTING_LIMIT)
        .await
        .map_err(|e| run_failure(e, classify, "probing the target database"))?;
    let target = rewind::Target::parse(&String::from_utf8_lossy(&answer));
    let plan =
        rewind::plan(&lines, &entries, &target).map_err(|r| fail(FailureReason::Config, r.0))?;
    if !plan.skipped.is_empty() {
        tracing::info!(entries = ?plan.skipped, "restore leaves the platform's objects as they are");
    }
    let list_file = credential_file(t.temp, "use-list-", &plan.use_list)?;

    // 2. The rewind: pg_restore | (preamble + script + privileges and owners) | psql, one
    // transaction.
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
    let headers = std::sync::Arc::new(std::sync::Mutex::new(Headers::default()));
    let relay_headers = headers.clone();
    let (before, after) = (plan.before, plan.after);
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committed_flag = committed.clone();
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
                (Some(r), Some(w)) => relay_script(r, w, &before, &after, &relay_headers)
                    .await
                    .map(|committed| committed_flag.store(committed, Ordering::SeqCst)),
                _ => Ok(()),
            }
        };
        let drain = async {
            match psql_out {
                Some(out) => read_reports(out).await,
                None => Ok(RestoreReport::default()),
            }
        };
        let (a, b, c) = tokio::join!(feed, relay, drain);
        // A failure of our own beats a broken pipe, which a tool's exit explains better.
        let mut pipe = None;
        for r in [a, b, c.as_ref().map(drop).map_err(clone_io)] {
            match r {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                Err(e) => pipe = Some(e),
                Ok(()) => {}
            }
        }
        match pipe {
            Some(e) => Err(e),
            None => c,
        }
    };
    let (finished, dynamic) = match supervise(vec![pgr, psql], io).await {
        Ok(done) => done,
        Err(e) => {
            let mut f = pipeline_failure(e, classify_restore, "restoring");
            if let Some(object) = headers.lock().ok().and_then(|h| h.at_error(&f.detail)) {
                f.detail.push_str(&format!(" (in {object})"));
            }
            f.detail.push_str(" (transaction rolled back)");
            return Err(f);
        }
    };
    drop(list_file);
    if !committed.load(Ordering::SeqCst) {
        return Err(fail(
            FailureReason::Dump,
            "restoring: pg_restore's script ended without its COMMIT (transaction rolled back)",
        ));
    }
    if finished
        .iter()
        .any(|f| f.stderr.contains("there is no transaction in progress"))
    {
        return Err(fail(
            FailureReason::Dump,
            "restore script committed more than once",
        ));
    }
    let mut report = plan.report;
    report.owner_changed.extend(dynamic.owner_changed);
    report.skipped_grants.extend(dynamic.skipped_grants);
    if report != RestoreReport::default() {
        tracing::info!(
            ?report,
            "restore left out grants or owners the target cannot take"
        );
    }
    Ok(report)
}

fn clone_io(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

/// The rewind's report lines on psql's stdout; everything else there (the script's SELECTs) is
/// read and dropped.
async fn read_reports<R: tokio::io::AsyncRead + Unpin>(out: R) -> std::io::Result<RestoreReport> {
    use tokio::io::AsyncBufReadExt;
    let mut report = RestoreReport::default();
    let mut reader = tokio::io::BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(report);
        }
        if line.starts_with(rewind::REPORT_MARK.as_bytes()) && report.owner_changed.len() < 100_000
        {
            let text = String::from_utf8_lossy(&line);
            rewind::read_report(text.trim_end_matches('\n'), &mut report);
        }
    }
}

/// Where each entry's statements begin in the script psql reads (`-- Name: …` comments, by line
/// number), so a failure names the object being restored.
#[derive(Debug, Default)]
struct Headers {
    lines: u64,
    at: Vec<(u64, String)>,
}

impl Headers {
    fn scan(&mut self, bytes: &[u8]) {
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if let Some(rest) = line
                .strip_prefix(b"-- Name: ")
                .or_else(|| line.strip_prefix(b"-- Data for Name: "))
            {
                if self.at.len() < 10_000_000 {
                    let text = String::from_utf8_lossy(rest);
                    self.at.push((self.lines + 1, text.trim_end().to_owned()));
                }
            }
            if line.ends_with(b"\n") {
                self.lines += 1;
            }
        }
    }

    /// The entry psql's `psql:<stdin>:N: ERROR:` line falls in.
    fn at_error(&self, stderr: &str) -> Option<String> {
        let n: u64 = stderr
            .lines()
            .find(|l| l.contains("ERROR:"))?
            .strip_prefix("psql:<stdin>:")?
            .split(':')
            .next()?
            .parse()
            .ok()?;
        let i = self.at.partition_point(|(line, _)| *line <= n);
        let (_, name) = self.at.get(i.checked_sub(1)?)?;
        // "x; Type: TABLE; Schema: s; Owner: o" → "TABLE s.x"
        let mut parts = name.split("; ");
        let object = parts.next()?;
        let kind = parts.next()?.strip_prefix("Type: ")?;
        let schema = parts
            .next()
            .and_then(|s| s.strip_prefix("Schema: "))
            .filter(|s| *s != "-");
        Some(match schema {
            Some(s) => format!("{kind} {s}.{object}"),
            None => format!("{kind} {object}"),
        })
    }
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

/// pg_restore's script into psql: our preamble and `before` first, then the script with its
/// lock_timeout reset replaced by ours, with `after` inserted before its final COMMIT, then EOF.
/// Header comments are noted in `headers` as they pass. Returns whether the COMMIT came (a
/// pg_restore that dies midway never writes it; psql then reaches EOF inside the transaction).
async fn relay_script<R, W>(
    mut from: R,
    mut to: W,
    before: &str,
    after: &str,
    headers: &std::sync::Mutex<Headers>,
) -> std::io::Result<bool>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let note = |bytes: &[u8]| {
        if let Ok(mut h) = headers.lock() {
            h.scan(bytes);
        }
    };
    let start = format!("{RESTORE_PREAMBLE}{before}");
    note(start.as_bytes());
    to.write_all(start.as_bytes()).await?;
    let mut head = Vec::with_capacity(SCRIPT_HEADER);
    let mut buf = vec![0u8; 64 * 1024];
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
    // Everything but the last SCRIPT_TAIL bytes goes through as it comes; the tail is held back.
    let mut held = head;
    loop {
        if held.len() > SCRIPT_TAIL {
            let cut = held.len() - SCRIPT_TAIL;
            // Whole lines, so header comments are noted whole.
            let cut = held[..cut]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            if cut > 0 {
                note(&held[..cut]);
                to.write_all(&held[..cut]).await?;
                held.drain(..cut);
            }
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        held.extend_from_slice(&buf[..n]);
    }
    let Some(at) = held
        .windows(SCRIPT_COMMIT.len())
        .rposition(|w| w == SCRIPT_COMMIT)
    else {
        // pg_restore died before its end, or wrote no COMMIT: psql must not commit either.
        note(&held);
        to.write_all(&held).await?;
        to.shutdown().await?;
        return Ok(false);
    };
    let (script, end) = held.split_at(at + 1);
    note(script);
    to.write_all(script).await?;
    note(after.as_bytes());
    to.write_all(after.as_bytes()).await?;
    to.write_all(end).await?;
    to.shutdown().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_script_keeps_our_lock_timeout_and_takes_our_statements_before_its_commit() {
        let script = b"--\n-- PostgreSQL database dump\n--\n\\restrict k\nSET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\nBEGIN;\n--\n-- Name: t; Type: TABLE; Schema: public; Owner: app\n--\nCREATE TABLE t (x int);\nCOPY t FROM stdin;\nCOMMIT;\n\\.\n\nCOMMIT;\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict k\n\n";
        let headers = std::sync::Mutex::new(Headers::default());
        let mut out = Vec::new();
        let committed = relay_script(&script[..], &mut out, "-- before\n", "GRANT x;\n", &headers)
            .await
            .unwrap();
        assert!(committed);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(RESTORE_PREAMBLE));
        let rest = &text[RESTORE_PREAMBLE.len()..];
        assert!(rest.starts_with("-- before\n--\n-- PostgreSQL"), "{rest}");
        assert!(!rest.contains("SET lock_timeout = 0;"), "{rest}");
        assert!(rest.contains("SET lock_timeout = '30s';\nSET idle_in_transaction"));
        assert!(
            rest.contains("\\.\n\nGRANT x;\nCOMMIT;\n\n--\n-- PostgreSQL database dump complete"),
            "ours before the last COMMIT only: {rest}"
        );
        assert!(rest.ends_with("\\unrestrict k\n\n"));
        // psql's line numbers map back to the entry being restored.
        let line = RESTORE_PREAMBLE.lines().count() + 12;
        let err = format!("psql:<stdin>:3: WARNING:  there is already a transaction in progress\npsql:<stdin>:{line}: ERROR:  permission denied for schema public");
        let object = headers.lock().unwrap().at_error(&err);
        assert_eq!(object.as_deref(), Some("TABLE public.t"));

        // A script that stops short of its COMMIT is passed on without one, and says so.
        let mut out = Vec::new();
        let cut = &script[..script.len() - 80];
        assert!(!relay_script(cut, &mut out, "", "GRANT x;\n", &headers)
            .await
            .unwrap());
        assert!(!String::from_utf8(out).unwrap().contains("GRANT x;"));
    }

    #[test]
    fn a_cluster_with_tablespaces_cannot_be_based_up_to_stdout() {
        assert_eq!(
            classify(
                "pg_basebackup: error: can only write single tablespace to stdout, database has 2"
            ),
            FailureReason::Config
        );
    }

    #[test]
    fn restore_failures_the_target_rejects_are_conflicts() {
        use FailureReason::*;
        for (stderr, want) in [
            ("psql:<stdin>:40: ERROR:  schema \"partman\" already exists", Conflict),
            ("psql:<stdin>:41: ERROR:  permission denied for schema public", Conflict),
            ("psql:<stdin>:42: ERROR:  must be owner of extension vector", Conflict),
            ("psql:<stdin>:43: ERROR:  role \"auditor\" does not exist", Conflict),
            ("psql:<stdin>:12: ERROR:  canceling statement due to lock timeout", Unreachable),
            ("psql: error: connection to server at \"db\" failed: FATAL:  password authentication failed for user \"app\"", Auth),
            ("pg_restore: error: could not read from input file: end of file", Dump),
            ("psql:<stdin>:44: ERROR:  invalid input syntax for type integer: \"x\"", Dump),
        ] {
            assert_eq!(classify_restore(stderr), want, "{stderr}");
        }
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
