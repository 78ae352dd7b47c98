//! The verifier's Postgres test restore (DESIGN §11): the customer's restore, replayed where it
//! touches no customer. Per verification, on `VERIFY_DATABASE_URL`'s server, a throwaway login
//! role with no attribute beyond LOGIN and a scratch database it owns; as the URL's role only
//! what the platform makes for a tenant (the extensions the dump names, in the schemas it names,
//! with the grants the dump shows on them); then the §6 rewind through the throwaway role, twice
//! — into the empty database, then over its result, as the customer's restore rewinds a live
//! database — and the rows counted as that role. Tenant code in the dump (a CHECK, a default, a
//! trigger, a materialized view) therefore runs with the throwaway role's rights only.
//!
//! Database and role share one name, `bw_verify_<verification>_<attempt>_<unix seconds>`: which
//! attempt owns them and since when, so any replica can drop what a crashed one left behind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::Connection as _;

use super::super::pg_archive::TocEntry;
use super::rewind::{ident, literal, statements, tokens, Acl};
use super::{parse, read_toc, restore};
use crate::domain::FailureReason;
use crate::engines::{fail, problem, BackupFile, ConfigProblem, Failure, RestoreTarget};
use crate::process::Tools;
use crate::secret::Secret;

pub const SCRATCH_PREFIX: &str = "bw_verify_";

pub fn scratch_name(verification: uuid::Uuid, attempt: i32, created_unix: i64) -> String {
    format!(
        "{SCRATCH_PREFIX}{}_{attempt}_{created_unix}",
        verification.simple()
    )
}

/// (verification, attempt, created unix seconds) of a scratch database's (or role's) name.
pub fn parse_scratch_name(name: &str) -> Option<(uuid::Uuid, i32, i64)> {
    let mut parts = name.strip_prefix(SCRATCH_PREFIX)?.split('_');
    let id = uuid::Uuid::try_parse(parts.next()?).ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let created = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((id, attempt, created))
}

/// `url` (VERIFY_DATABASE_URL) logging in as `user` with `password` to `database`: its host,
/// port and TLS settings kept, its own credentials and database left out.
fn login_url(
    url: &Secret,
    database: &str,
    user: &str,
    password: &str,
) -> Result<Secret, ConfigProblem> {
    parse(url)?;
    let raw = url.expose();
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| problem("connection URL has no scheme"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| {
            !p.is_empty()
                && !["dbname=", "user=", "password="]
                    .iter()
                    .any(|k| p.starts_with(k))
        })
        .collect();
    // Names and password are [a-z0-9_]: nothing to percent-encode.
    let mut out = format!("{scheme}://{user}:{password}@{host}/{database}");
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

/// The SCRAM-SHA-256 verifier of a password, as libpq's `PQencryptPasswordConn` makes it: the
/// server stores (and a statement log shows) this, never the password.
fn scram_verifier(password: &str, salt: &[u8]) -> Option<String> {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    const ITERATIONS: u32 = 4096;
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, ITERATIONS, &mut salted);
    let keyed = |message: &[u8]| {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&salted).ok()?;
        mac.update(message);
        Some(mac.finalize().into_bytes())
    };
    let client_key = keyed(b"Client Key")?;
    let server_key = keyed(b"Server Key")?;
    let stored_key = Sha256::digest(client_key);
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    ))
}

/// What the platform makes for a tenant, read off a dump's table of contents: the schemas that
/// hold its extensions (not `public`, not `pg_catalog`), the extensions in them, and the grants
/// the dump shows on the platform's objects (those schemas, the extensions' members) — made to
/// the throwaway role, which stands in for every role of the tenant.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Platform {
    pub schemas: Vec<String>,
    /// (extension, schema), in the dump's order (dependencies first).
    pub extensions: Vec<(String, String)>,
    pub grants: Vec<String>,
}

/// The schema of `CREATE EXTENSION IF NOT EXISTS x WITH SCHEMA s;`.
fn extension_schema(defn: &str) -> Option<String> {
    let t = tokens(defn);
    let at = t
        .windows(2)
        .position(|w| !w[0].1 && w[0].0.eq_ignore_ascii_case("WITH") && w[1].0 == "SCHEMA")?;
    t.get(at + 2).map(|(s, _)| s.clone())
}

/// `GRANT … TO <grantee>` made to `role` instead (PUBLIC kept); None for anything else.
fn regrant(stmt: &str, role: &str) -> Option<String> {
    let Acl::Grant {
        grant: true,
        grantee,
    } = Acl::parse(stmt)
    else {
        return None;
    };
    let text = stmt.trim();
    let Some(grantee) = grantee else {
        return Some(text.to_owned());
    };
    let text = text.strip_suffix(" WITH GRANT OPTION").unwrap_or(text);
    // pg_dump names the grantee last, quoted when it must be (a quoted name may hold " TO ").
    [ident(&grantee), grantee]
        .iter()
        .find_map(|g| text.strip_suffix(g.as_str())?.strip_suffix(" TO "))
        .map(|head| format!("{head} TO {}", ident(role)))
}

pub(crate) fn platform(entries: &[TocEntry], role: &str) -> Platform {
    let mut p = Platform::default();
    for e in entries.iter().filter(|e| e.desc == "EXTENSION") {
        let Some(schema) = extension_schema(&e.defn) else {
            continue;
        };
        if schema != "public" && schema != "pg_catalog" && !p.schemas.contains(&schema) {
            p.schemas.push(schema.clone());
        }
        p.extensions.push((e.tag.clone(), schema));
    }
    let ids: std::collections::BTreeSet<i64> = entries.iter().map(|e| e.id).collect();
    for e in entries.iter().filter(|e| e.desc == "ACL") {
        let on_platform_schema = p
            .schemas
            .iter()
            .any(|s| e.tag == format!("SCHEMA {s}") || e.tag == format!("SCHEMA {}", ident(s)));
        // An object the dump does not create: an extension's member (or `public`) — never a
        // system catalog's (a grant on `pg_catalog.pg_read_file` in the dump must not become
        // the throwaway role's right to read the scratch server's files).
        let system = e.namespace == "information_schema" || e.namespace.starts_with("pg_");
        let not_dumped = !e.deps.iter().any(|d| ids.contains(d)) && !system;
        if on_platform_schema || not_dumped {
            p.grants.extend(
                statements(&e.defn)
                    .into_iter()
                    .filter_map(|s| regrant(s, role)),
            );
        }
    }
    p
}

/// The throwaway login that owns one scratch database.
struct Login {
    role: String,
    password: String,
    url: Secret,
}

/// What a test restore found, and what each of its two rewinds cost.
#[derive(Debug, Clone)]
pub struct TestRestore {
    pub tables: BTreeMap<String, i64>,
    pub rewind_seconds: [f64; 2],
}

/// The server scratch databases are made on (`VERIFY_DATABASE_URL`: a role that may create
/// roles, databases and the tenants' extensions — in practice a superuser; tenant code never
/// runs as it). Connections are opened as they are needed.
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
            .acquire_timeout(Duration::from_secs(15))
            .connect_lazy_with(options.clone());
        Ok(Self {
            url: url.clone(),
            options,
            admin,
        })
    }

    /// The throwaway role (no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS; its
    /// password expires after `valid_for`) and an empty database it owns, both named `name`.
    async fn create(&self, name: &str, valid_for: Duration) -> Result<Login, Failure> {
        let password = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let salt = *uuid::Uuid::new_v4().as_bytes();
        let verifier = scram_verifier(&password, &salt)
            .ok_or_else(|| fail(FailureReason::Config, "cannot hash the scratch password"))?;
        let until = chrono::Utc::now()
            + chrono::Duration::from_std(valid_for).unwrap_or(chrono::Duration::hours(24));
        let role = ident(name);
        let superuser: bool =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                .fetch_one(&self.admin)
                .await
                .map_err(|e| sql_failure("reading the verifier role's attributes", e))?;
        sqlx::query(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS \
             PASSWORD {} VALID UNTIL {}",
            literal(&verifier),
            literal(&until.to_rfc3339())
        ))
        .execute(&self.admin)
        .await
        .map_err(|e| sql_failure("creating the scratch role", e))?;
        if !superuser {
            // A role that is not a superuser may make a database owned by another role only
            // when it is a member of it (and drop that role's objects the same way).
            sqlx::query(&format!("GRANT {role} TO CURRENT_USER"))
                .execute(&self.admin)
                .await
                .map_err(|e| sql_failure("joining the scratch role", e))?;
        }
        sqlx::query(&format!(
            "CREATE DATABASE {role} OWNER {role} TEMPLATE template0"
        ))
        .execute(&self.admin)
        .await
        .map_err(|e| sql_failure("creating the scratch database", e))?;
        Ok(Login {
            url: login_url(&self.url, name, name, &password)?,
            role: name.to_owned(),
            password,
        })
    }

    /// As the URL's role, in the scratch database: what the platform makes for a tenant.
    async fn provide(&self, name: &str, platform: &Platform) -> Result<(), Failure> {
        use sqlx::Executor as _;
        if platform == &Platform::default() {
            return Ok(());
        }
        let mut conn = sqlx::PgConnection::connect_with(&self.options.clone().database(name))
            .await
            .map_err(|e| sql_failure("connecting to the scratch database", e))?;
        for s in &platform.schemas {
            conn.execute(format!("CREATE SCHEMA IF NOT EXISTS {}", ident(s)).as_str())
                .await
                .map_err(|e| sql_failure(&format!("creating the platform's schema {s}"), e))?;
        }
        for (e, s) in &platform.extensions {
            conn.execute(
                format!(
                    "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {} CASCADE",
                    ident(e),
                    ident(s)
                )
                .as_str(),
            )
            .await
            .map_err(|err| {
                sql_failure(
                    &format!("creating the extension {e:?} the backup needs on VERIFY_DATABASE_URL's server"),
                    err,
                )
            })?;
        }
        for g in &platform.grants {
            // A member another version of the extension does not have: nothing to grant.
            if let Err(e) = conn.execute(g.as_str()).await {
                tracing::debug!(grant = %g, error = %e, "a platform grant did not apply in the scratch database");
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Drops a scratch database (disconnecting whoever is still in it), then its role.
    pub async fn drop_scratch(&self, name: &str) -> Result<(), Failure> {
        let forced = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            ident(name)
        ))
        .execute(&self.admin)
        .await;
        match forced {
            Ok(_) => {}
            // Before Postgres 13 there is no FORCE.
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42601") => {
                sqlx::query(&format!("DROP DATABASE IF EXISTS {}", ident(name)))
                    .execute(&self.admin)
                    .await
                    .map_err(|e| sql_failure("dropping the scratch database", e))?;
            }
            Err(e) => return Err(sql_failure("dropping the scratch database", e)),
        }
        sqlx::query(&format!("DROP ROLE IF EXISTS {}", ident(name)))
            .execute(&self.admin)
            .await
            .map(drop)
            .map_err(|e| sql_failure("dropping the scratch role", e))
    }

    /// Every scratch database and role on the server (one name per attempt).
    pub async fn list(&self) -> Result<Vec<String>, Failure> {
        sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)
              UNION SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1)",
        )
        .bind(SCRATCH_PREFIX)
        .fetch_all(&self.admin)
        .await
        .map_err(|e| sql_failure("listing scratch databases and roles", e))
    }

    /// Exact row counts of every user table (`schema.table`; extension-owned tables left out),
    /// read as the throwaway role: row-level security off (the tables are its own; FORCEd ones
    /// are un-forced in a transaction that is rolled back), so no policy — tenant code — runs
    /// and none hides a row.
    async fn count_rows(
        &self,
        name: &str,
        login: &Login,
    ) -> Result<BTreeMap<String, i64>, Failure> {
        use sqlx::Executor as _;
        let options = self
            .options
            .clone()
            .username(&login.role)
            .password(&login.password)
            .database(name);
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| sql_failure("connecting to the scratch database as its role", e))?;
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| sql_failure("counting the restored rows", e))?;
        tx.execute("SET LOCAL row_security = off")
            .await
            .map_err(|e| sql_failure("counting the restored rows", e))?;
        let tables: Vec<(String, String, bool)> = sqlx::query_as(
            "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname),
                    c.relforcerowsecurity
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                   AND d.deptype = 'e')
              ORDER BY 1",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| sql_failure("listing the restored tables", e))?;
        let mut counts = BTreeMap::new();
        for (label, qualified, forced) in tables {
            if forced {
                tx.execute(format!("ALTER TABLE {qualified} NO FORCE ROW LEVEL SECURITY").as_str())
                    .await
                    .map_err(|e| sql_failure(&format!("counting the rows of {label}"), e))?;
            }
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ONLY {qualified}"))
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| sql_failure(&format!("counting the rows of {label}"), e))?;
            counts.insert(label, n);
        }
        let _ = tx.rollback().await;
        let _ = conn.close().await;
        Ok(counts)
    }
}

/// The test restore of a downloaded, verified Postgres backup into the scratch database `name`
/// (and its role), which the caller drops afterwards with [`ScratchServer::drop_scratch`]
/// whatever happened. `valid_for` bounds the throwaway role's password.
pub async fn test_restore(
    server: &ScratchServer,
    name: &str,
    tools: &Tools,
    temp: &std::path::Path,
    backup: &BackupFile,
    valid_for: Duration,
) -> Result<TestRestore, Failure> {
    let entries = read_toc(backup).await?;
    let login = server.create(name, valid_for).await?;
    server.provide(name, &platform(&entries, name)).await?;
    let target = RestoreTarget {
        tools,
        url: &login.url,
        source_url: &login.url,
        temp,
    };
    let mut rewind_seconds = [0.0; 2];
    for (i, what) in [
        "the first rewind (into the empty scratch database)",
        "the second rewind (over the first one's result)",
    ]
    .into_iter()
    .enumerate()
    {
        let started = Instant::now();
        restore(&target, backup).await.map_err(|mut f| {
            f.detail = format!("{what}: {}", f.detail);
            f
        })?;
        rewind_seconds[i] = started.elapsed().as_secs_f64();
    }
    let tables = server.count_rows(name, &login).await?;
    Ok(TestRestore {
        tables,
        rewind_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, desc: &str, tag: &str, defn: &str, deps: &[i64]) -> TocEntry {
        TocEntry {
            id,
            desc: desc.into(),
            tag: tag.into(),
            namespace: String::new(),
            owner: String::new(),
            defn: defn.into(),
            drop_stmt: String::new(),
            has_drop: true,
            deps: deps.to_vec(),
        }
    }

    #[test]
    fn scratch_names_round_trip() {
        let id = uuid::Uuid::new_v4();
        let name = scratch_name(id, 3, 1_700_000_000);
        assert!(name.len() < 64, "a Postgres identifier: {name}");
        assert_eq!(parse_scratch_name(&name), Some((id, 3, 1_700_000_000)));
        assert_eq!(parse_scratch_name("bw_verify_nope"), None);
        assert_eq!(parse_scratch_name("tenant"), None);
    }

    #[test]
    fn the_platform_of_a_dump_is_its_extensions_their_schemas_and_grants_on_them() {
        let entries = [
            entry(1, "SCHEMA", "partman", "", &[]),
            entry(2, "EXTENSION", "pg_partman", "CREATE EXTENSION IF NOT EXISTS pg_partman WITH SCHEMA partman;\n", &[1]),
            entry(3, "EXTENSION", "citext", "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public;\n", &[]),
            entry(4, "EXTENSION", "odd", "CREATE EXTENSION IF NOT EXISTS odd WITH SCHEMA \"my ext\";\n", &[]),
            entry(5, "ACL", "SCHEMA partman", "GRANT ALL ON SCHEMA partman TO tenant_owner;\n", &[1]),
            entry(6, "ACL", "TABLE part_config", "GRANT ALL ON TABLE partman.part_config TO tenant_owner WITH GRANT OPTION;\nREVOKE ALL ON TABLE partman.part_config FROM tenant_ro;\n", &[900]),
            entry(7, "SCHEMA", "app", "", &[]),
            entry(8, "ACL", "SCHEMA app", "GRANT USAGE ON SCHEMA app TO tenant_ro;\n", &[7]),
            entry(9, "ACL", "SCHEMA public", "REVOKE USAGE ON SCHEMA public FROM PUBLIC;\nGRANT USAGE ON SCHEMA public TO PUBLIC;\nGRANT ALL ON SCHEMA public TO \"odd TO name\";\n", &[901]),
            TocEntry {
                namespace: "pg_catalog".into(),
                ..entry(10, "ACL", "FUNCTION pg_read_file(text)", "GRANT ALL ON FUNCTION pg_catalog.pg_read_file(text) TO tenant_owner;\n", &[902])
            },
        ];
        let p = platform(&entries, "bw_verify_x");
        assert_eq!(p.schemas, ["partman", "my ext"]);
        assert_eq!(
            p.extensions,
            [
                ("pg_partman".into(), "partman".into()),
                ("citext".into(), "public".into()),
                ("odd".into(), "my ext".into())
            ]
        );
        assert_eq!(
            p.grants,
            [
                "GRANT ALL ON SCHEMA partman TO \"bw_verify_x\"",
                "GRANT ALL ON TABLE partman.part_config TO \"bw_verify_x\"",
                "GRANT USAGE ON SCHEMA public TO PUBLIC",
                "GRANT ALL ON SCHEMA public TO \"bw_verify_x\"",
            ],
            "the tenant's own schema's grants are the rewind's, not the platform's; a system catalog's are nobody's"
        );
    }

    #[test]
    fn the_login_url_keeps_the_server_and_drops_the_credentials() {
        let url = Secret::new(
            "postgres://admin:s3cret@db.internal:6543/postgres?sslmode=require&user=admin&password=s3cret&dbname=x",
        );
        let login = login_url(&url, "bw_verify_a", "bw_verify_a", "abc123").unwrap();
        assert_eq!(
            login.expose(),
            "postgres://bw_verify_a:abc123@db.internal:6543/bw_verify_a?sslmode=require"
        );
        let socket = Secret::new("postgresql:///postgres?host=/run/postgresql");
        let login = login_url(&socket, "d", "r", "p").unwrap();
        let conn = parse(&login).unwrap();
        let env: BTreeMap<_, _> = conn.env.into_iter().collect();
        assert_eq!(env["PGHOST"], "/run/postgresql");
        assert_eq!(
            (env["PGUSER"].as_str(), env["PGDATABASE"].as_str()),
            ("r", "d")
        );
        assert_eq!(conn.password.as_deref(), Some("p"));
    }

    #[test]
    fn scram_verifiers_are_postgres_own() {
        // RFC 7677's password and salt; the expected verifier computed apart (Python's hashlib
        // and hmac), in pg_authid's format. A real server accepting the login is the test of
        // tests/pg_rewind.rs.
        use base64::Engine as _;
        let salt = base64::engine::general_purpose::STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap();
        let v = scram_verifier("pencil", &salt).unwrap();
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }
}
