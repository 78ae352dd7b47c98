//! Engines: one room per resource type, each owning everything engine-specific — its dump
//! command, the check of its raw stream, its restore, and its stderr dialect:
//! [`postgres`] (also pgvector), [`mongodb`], [`redis`]. This module holds what they share: the
//! [`ToolCommand`] (program, argv without secrets, a scrubbed environment, 0600 credential files
//! deleted on drop), URL splitting, and the dispatch by resource type.

pub(crate) mod mongodb;
pub(crate) mod mongodb_archive;
pub(crate) mod pg_archive;
pub(crate) mod postgres;
pub(crate) mod redis;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;
use tokio::io::AsyncRead;

use crate::domain::{FailureReason, ResourceType};
use crate::pipeline::StreamCheck;
use crate::process::{RunningTool, SpawnError, Tools};
use crate::secret::Secret;

pub use mongodb::mongo_database;
pub use postgres::{
    parse_scratch_name, scratch_name, test_restore as postgres_test_restore, ScratchServer,
    TestRestore, SCRATCH_PREFIX,
};
pub use redis::{DbCount, ScratchRedis, ScratchReport};

/// Why a resource's configuration cannot be used (failure reason `config`). Messages name the
/// problem, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblem(pub String);

fn problem(msg: impl Into<String>) -> ConfigProblem {
    ConfigProblem(msg.into())
}

pub use crate::process::ToolCommand;

/// How a backup's raw stream is produced.
pub enum DumpPlan {
    /// A tool whose stdout is the raw stream.
    Tool(ToolCommand),
    /// The worker writes the stream itself (Redis keyspace mode, DESIGN §5).
    Keyspace(redis::KeyspaceDump),
}

/// A backup's dump: how its raw stream is produced, the object key's extension, and the mode
/// recorded on the row (`dump_mode`, Redis only).
pub struct Dump {
    pub plan: DumpPlan,
    pub extension: &'static str,
    pub mode: Option<&'static str>,
    /// Redis: taken instead when the tool is refused SYNC (`NOPERM`) before it wrote a byte.
    pub fallback: Option<redis::KeyspaceDump>,
}

#[cfg(test)]
impl Dump {
    /// The tool command of a tool dump (tests).
    pub(crate) fn command(self) -> ToolCommand {
        match self.plan {
            DumpPlan::Tool(c) => c,
            DumpPlan::Keyspace(_) => panic!("not a tool dump"),
        }
    }
}

/// Decides how to dump a resource (Redis asks the server whether its user may SYNC), or the
/// failure that prevents it.
pub async fn prepare_dump(
    resource_type: ResourceType,
    connection_url: &Secret,
    temp_dir: &Path,
) -> Result<Dump, Failure> {
    Ok(match resource_type {
        ResourceType::Postgres | ResourceType::Vector => {
            postgres::dump_command(connection_url, temp_dir)?
        }
        ResourceType::Mongodb => mongodb::dump_command(connection_url, temp_dir)?,
        ResourceType::Redis => redis::prepare_dump(connection_url, temp_dir).await?,
    })
}

/// A running dump: a tool (its stdout is the stream) or the worker's own producer task.
pub enum DumpSource {
    Tool {
        tool: Box<RunningTool>,
        resource_type: ResourceType,
    },
    Producer(tokio::task::JoinHandle<Result<(), Failure>>),
    /// The tool already ended (it wrote nothing).
    Ended(Result<(), Failure>),
}

/// The raw stream of a [`DumpSource`].
pub type RawStream = Box<dyn AsyncRead + Send + Unpin>;

impl DumpSource {
    /// Starts the dump; the stream is read by the pipeline. Returns the dump mode actually used.
    pub async fn start(
        dump: Dump,
        tools: &Tools,
        resource_type: ResourceType,
    ) -> Result<(Self, RawStream, Option<&'static str>), Failure> {
        let cmd = match dump.plan {
            DumpPlan::Keyspace(k) => {
                let (task, stream) = k.start();
                return Ok((DumpSource::Producer(task), Box::new(stream), dump.mode));
            }
            DumpPlan::Tool(cmd) => cmd,
        };
        let mut tool = crate::process::spawn(tools, &cmd, false)?;
        let Some(stdout) = tool.stdout.take() else {
            return Err(fail(FailureReason::Dump, "the dump tool has no stdout"));
        };
        let stream: RawStream = match resource_type {
            ResourceType::Redis => Box::new(redis::StripEofMark::new(stdout)),
            _ => Box::new(stdout),
        };
        // The credential files live as long as the tool.
        let tool = tool.keep(cmd);
        let Some(fallback) = dump.fallback else {
            return Ok((
                DumpSource::Tool {
                    tool: Box::new(tool),
                    resource_type,
                },
                stream,
                dump.mode,
            ));
        };
        // A user the server refuses SYNC fails before the first byte: look at it before the
        // pipeline does, and take the keyspace dump instead.
        let mut stream = tokio::io::BufReader::new(stream);
        let first = tokio::io::AsyncBufReadExt::fill_buf(&mut stream)
            .await
            .map(|b| b.is_empty());
        if let Ok(true) = first {
            let finished = tool.wait().await;
            if !finished.status.success() && finished.stderr.contains("NOPERM") {
                tracing::info!("the resource's user may not SYNC: taking a keyspace dump instead");
                let (task, stream) = fallback.start();
                return Ok((
                    DumpSource::Producer(task),
                    Box::new(stream),
                    Some("keyspace"),
                ));
            }
            let ended = if finished.status.success() {
                Ok(())
            } else {
                Err(fail(
                    classify(resource_type, &finished.stderr),
                    finished.describe(),
                ))
            };
            return Ok((DumpSource::Ended(ended), Box::new(stream), dump.mode));
        }
        Ok((
            DumpSource::Tool {
                tool: Box::new(tool),
                resource_type,
            },
            Box::new(stream),
            dump.mode,
        ))
    }

    /// Waits for the dump to end (call after the stream is drained): a tool's non-zero exit is
    /// classified in its engine's dialect.
    pub async fn finish(self) -> Result<(), Failure> {
        match self {
            DumpSource::Tool {
                tool,
                resource_type,
            } => {
                let finished = tool.wait().await;
                if finished.status.success() {
                    Ok(())
                } else {
                    Err(fail(
                        classify(resource_type, &finished.stderr),
                        finished.describe(),
                    ))
                }
            }
            DumpSource::Ended(r) => r,
            DumpSource::Producer(task) => match task.await {
                Ok(r) => r,
                Err(e) => Err(fail(
                    FailureReason::Dump,
                    format!("the keyspace dump stopped: {e}"),
                )),
            },
        }
    }

    /// Stops the dump at once (timeout, shutdown, lost lease, failed upload).
    pub async fn stop(self) {
        match self {
            DumpSource::Tool { tool, .. } => {
                tool.kill().await;
            }
            DumpSource::Producer(task) => task.abort(),
            DumpSource::Ended(_) => {}
        }
    }
}

/// The structural check of a raw (decompressed) dump of this type (DESIGN §5 `sanity`), fed the
/// stream as it passes: on the backup path before the object is committed, on the restore path
/// before anything is touched.
pub fn stream_check(resource_type: ResourceType) -> Box<dyn StreamCheck> {
    match resource_type {
        ResourceType::Postgres | ResourceType::Vector => Box::new(postgres::DumpCheck::default()),
        ResourceType::Mongodb => Box::new(mongodb::ArchiveCheck::default()),
        ResourceType::Redis => Box::new(redis::RdbStreamCheck::default()),
    }
}

/// The failure class of a tool's non-zero exit, in its engine's dialect.
pub fn classify(resource_type: ResourceType, stderr: &str) -> FailureReason {
    match resource_type {
        ResourceType::Postgres | ResourceType::Vector => postgres::classify(stderr),
        ResourceType::Mongodb => mongodb::classify(stderr),
        ResourceType::Redis => redis::classify(stderr),
    }
}

/// Why a restore step failed: the class and an internal detail (secrets already redacted).
#[derive(Debug)]
pub struct Failure {
    pub reason: FailureReason,
    pub detail: String,
}

pub fn fail(reason: FailureReason, detail: impl Into<String>) -> Failure {
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

impl From<SpawnError> for Failure {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Missing { .. } => fail(FailureReason::Config, e.to_string()),
            SpawnError::Other { .. } => fail(FailureReason::Dump, e.to_string()),
        }
    }
}

/// A downloaded backup whose sha256 and gzip stream were verified: what an engine restores from.
/// It can be read (decrypted and decompressed as it is read, never a second copy on disk) as many
/// times as the engine needs.
#[derive(Clone)]
pub struct BackupFile {
    /// The stored bytes, exactly as downloaded (gzip, or age around gzip).
    pub path: PathBuf,
    /// The team's identity when the backup is encrypted (DESIGN §12).
    pub identity: Option<age::x25519::Identity>,
}

impl std::fmt::Debug for BackupFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupFile")
            .field("path", &self.path)
            .field("encrypted", &self.identity.is_some())
            .finish()
    }
}

impl BackupFile {
    /// The gzip bytes for a blocking reader: the file, decrypted as it is read when encrypted.
    pub fn open_gzip(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        let file = std::fs::File::open(&self.path)?;
        Ok(match &self.identity {
            Some(identity) => Box::new(crate::crypto::DecryptingReader::new(identity, file)?),
            None => Box::new(file),
        })
    }

    /// The raw dump for a blocking reader, decompressed (and decrypted) as it is read.
    pub fn open_blocking(
        &self,
    ) -> Result<crate::gzip::GzipDecoder<Box<dyn std::io::Read + Send>>, Failure> {
        let gz = self
            .open_gzip()
            .map_err(|e| fail(FailureReason::Dump, format!("opening the backup: {e}")))?;
        Ok(crate::gzip::GzipDecoder::new(gz))
    }

    /// The raw dump, decompressed (and decrypted) as it is read, for async readers.
    pub async fn open(&self) -> Result<crate::gzip::GunzipReader, Failure> {
        let gz = self
            .open_gzip()
            .map_err(|e| fail(FailureReason::Dump, format!("opening the backup: {e}")))?;
        Ok(crate::gzip::gunzip_reader(gz))
    }
}

/// What an engine's restore needs besides the backup itself.
pub struct RestoreTarget<'a> {
    pub tools: &'a Tools,
    /// The resource being rewound.
    pub url: &'a Secret,
    /// The resource the backup was taken of (itself, or another of the team's for a clone).
    pub source_url: &'a Secret,
    /// A private 0700 directory for credential files and tool HOME/TMPDIR.
    pub temp: &'a Path,
}

/// What a restore left out of the backup without failing (DESIGN §6, Postgres): grants to roles
/// missing on the target or made by roles the restoring role cannot act as, and objects it
/// could not give their owner (they stay owned by the restoring role). For the audit detail
/// and internal_detail.
#[derive(Default, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreReport {
    pub skipped_grants: Vec<String>,
    pub owner_changed: Vec<String>,
}

/// Rewinds the target to the backup with its engine.
pub async fn restore(
    resource_type: ResourceType,
    target: &RestoreTarget<'_>,
    backup: &BackupFile,
) -> Result<RestoreReport, Failure> {
    match resource_type {
        ResourceType::Postgres | ResourceType::Vector => postgres::restore(target, backup).await,
        ResourceType::Mongodb => mongodb::restore(target, backup)
            .await
            .map(|()| RestoreReport::default()),
        ResourceType::Redis => redis::restore(target, backup)
            .await
            .map(|()| RestoreReport::default()),
    }
}

/// What a test restore found in a backup (DESIGN §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Census {
    /// Postgres/vector, restored into a scratch database: rows per `schema.table`.
    Tables(std::collections::BTreeMap<String, i64>),
    /// MongoDB, the whole archive read: documents per `db.collection`.
    Namespaces(std::collections::BTreeMap<String, u64>),
    /// Redis, every key cut out of the RDB: keys per logical database, and function libraries.
    Databases {
        keys: std::collections::BTreeMap<u64, u64>,
        functions: u64,
    },
    /// Redis, every key RESTOREd into the scratch server of `VERIFY_REDIS_URL` and counted.
    RedisScratch(ScratchReport),
}

/// The test restore of a downloaded, verified MongoDB or Redis backup, touching no customer:
/// read whole and counted. `None` for Postgres, whose test restore needs a scratch server
/// ([`postgres_test_restore`]). `source_url` is the connection of the resource the backup was
/// taken of, as a restore would use it: a MongoDB one naming no database fails `config` (its
/// restore would be refused).
pub async fn test_restore(
    resource_type: ResourceType,
    backup: &BackupFile,
    source_url: &Secret,
) -> Result<Option<Census>, Failure> {
    Ok(Some(match resource_type {
        ResourceType::Postgres | ResourceType::Vector => return Ok(None),
        ResourceType::Mongodb => Census::Namespaces(mongodb::census(source_url, backup).await?),
        ResourceType::Redis => {
            let (keys, functions) = redis::count_keys(backup).await?;
            Census::Databases { keys, functions }
        }
    }))
}

/// The test restore of a downloaded, verified Redis backup: with a scratch server every key
/// RESTOREd there and counted ([`ScratchRedis::test_restore`]), else every key cut out of the RDB.
/// The error says whether the backup is to blame: a payload the server refuses as corrupt, or a
/// file that does not read, is; the scratch server's own trouble is not.
pub async fn redis_test_restore(
    backup: &BackupFile,
    scratch: Option<&ScratchRedis>,
    label: &str,
) -> Result<Census, (Failure, bool)> {
    match scratch {
        Some(server) => server
            .test_restore(backup, label)
            .await
            .map(Census::RedisScratch)
            .map_err(|r| (r.failure, r.backup_at_fault)),
        // Reading the file needs nothing but the file.
        None => match redis::count_keys(backup).await {
            Ok((keys, functions)) => Ok(Census::Databases { keys, functions }),
            Err(f) => Err((f, true)),
        },
    }
}

/// Checks that a connection URL is usable for a resource of this type (scheme, host, port,
/// database, parameters), without connecting. The message names the problem, never the value.
pub fn validate_url(resource_type: ResourceType, url: &Secret) -> Result<(), ConfigProblem> {
    match resource_type {
        ResourceType::Postgres | ResourceType::Vector => postgres::parse(url).map(drop),
        ResourceType::Redis => redis::parse(url).map(drop),
        ResourceType::Mongodb => {
            let parts = split_url(url.expose())?;
            if !matches!(parts.scheme, "mongodb" | "mongodb+srv") || parts.hosts.is_empty() {
                return Err(problem(
                    "mongodb connection URL must be mongodb://host[:port]/db or mongodb+srv://host/db",
                ));
            }
            Ok(())
        }
    }
}

/// Whether a resource's connection names the worker's own control database (`DATABASE_URL`):
/// restoring into it would rewind the worker's queue under its feet.
pub async fn is_control_database(
    resource_type: ResourceType,
    url: &Secret,
    control: &Secret,
) -> bool {
    matches!(resource_type, ResourceType::Postgres | ResourceType::Vector)
        && postgres::same_database(url, control).await
}

/// The environment every tool starts from: a PATH, a private TMPDIR and the C locale, so tool
/// messages are in the English the failure classifier matches.
fn base_env(temp_dir: &Path) -> Vec<(String, OsString)> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    vec![
        ("PATH".into(), path),
        ("LC_ALL".into(), "C".into()),
        ("LANG".into(), "C".into()),
        ("HOME".into(), temp_dir.as_os_str().to_owned()),
        ("TMPDIR".into(), temp_dir.as_os_str().to_owned()),
    ]
}

/// Writes a credential file readable only by us (tempfile creates it 0600).
fn credential_file(
    temp_dir: &Path,
    prefix: &str,
    contents: &str,
) -> Result<NamedTempFile, ConfigProblem> {
    let mut f = tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(temp_dir)
        .map_err(|e| problem(format!("cannot create a credential file: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| problem(format!("cannot restrict the credential file: {e}")))?;
    }
    f.write_all(contents.as_bytes())
        .and_then(|()| f.flush())
        .map_err(|e| problem(format!("cannot write the credential file: {e}")))?;
    Ok(f)
}

fn percent_decode(s: &str) -> Result<String, ConfigProblem> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| problem("connection URL has a malformed percent-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| problem("connection URL decodes to invalid UTF-8"))
}

/// The parts of `scheme://[user[:password]@]hosts[/path][?query]`, split by hand so multi-host
/// lists (`h1:27017,h2:27017`) and IPv6 literals survive. Values are still percent-encoded.
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlParts<'a> {
    scheme: &'a str,
    user: Option<&'a str>,
    password: Option<&'a str>,
    hosts: &'a str,
    path: &'a str,
    query: Vec<(&'a str, &'a str)>,
}

fn split_url(raw: &str) -> Result<UrlParts<'_>, ConfigProblem> {
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| problem("connection URL has no scheme"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(ui) => match ui.split_once(':') {
            Some((u, p)) => (Some(u), Some(p)),
            None => (Some(ui), None),
        },
    };
    if hosts.chars().any(|c| c.is_whitespace()) {
        return Err(problem("connection URL host contains whitespace"));
    }
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.push((k, v));
    }
    Ok(UrlParts {
        scheme,
        user: user.filter(|u| !u.is_empty()),
        password,
        hosts,
        path,
        query: params,
    })
}

/// Splits `host[:port]` (with `[v6]` literals) into host and port.
fn host_port(hostport: &str, default_port: u16) -> Result<(String, u16), ConfigProblem> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| problem("connection URL has an unterminated IPv6 literal"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err(problem("connection URL has junk after the IPv6 literal")),
        };
        return Ok((host.to_owned(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_owned(), parse_port(p)?)),
        None => Ok((hostport.to_owned(), default_port)),
    }
}

fn parse_port(p: &str) -> Result<u16, ConfigProblem> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| problem("connection URL has an invalid port"))
}

/// A tool run's failure as a restore [`Failure`], classified in the engine's dialect. `what`
/// says what the run was for (e.g. "listing the backup's contents").
pub(crate) fn run_failure(
    f: crate::process::RunFailure,
    classify: fn(&str) -> FailureReason,
    what: &str,
) -> Failure {
    match f {
        crate::process::RunFailure::Spawn(e) => e.into(),
        crate::process::RunFailure::Failed(p) => pipeline_failure(p, classify, what),
    }
}

pub(crate) fn pipeline_failure(
    f: crate::process::PipelineFailure,
    classify: fn(&str) -> FailureReason,
    what: &str,
) -> Failure {
    match f {
        crate::process::PipelineFailure::Tool { finished, .. } => fail(
            classify(&finished.stderr),
            format!("{what}: {}", finished.describe()),
        ),
        crate::process::PipelineFailure::Io { error, .. } => {
            fail(FailureReason::Dump, format!("{what}: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_engine_classifies_its_own_dialect() {
        use FailureReason::*;
        use ResourceType::{Mongodb, Postgres, Redis};
        let cases: &[(ResourceType, &str, FailureReason)] = &[
            (Postgres, "pg_dump: error: connection to server at \"10.0.0.5\", port 5432 failed: FATAL:  password authentication failed for user \"app\"", Auth),
            (Postgres, "pg_dump: error: connection to server at \"db\" (10.1.2.3), port 5432 failed: FATAL:  no pg_hba.conf entry for host \"10.9.8.7\", user \"app\", database \"app\", no encryption", Auth),
            (Postgres, "pg_dump: error: connection to server at \"db\", port 5432 failed: FATAL:  role \"ghost\" does not exist", Auth),
            (Postgres, "psql:<stdin>:40: ERROR:  role \"auditor\" does not exist", Dump),
            (Postgres, "pg_dump: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?", Unreachable),
            (Postgres, "pg_dump: error: could not translate host name \"db.invalid\" to address: Name or service not known", Unreachable),
            (Postgres, "pg_dump: error: connection to server at \"10.0.0.9\", port 5432 failed: timeout expired", Unreachable),
            (Postgres, "psql:<stdin>:12: ERROR:  canceling statement due to lock timeout", Unreachable),
            (Postgres, "pg_dump: error: query failed: ERROR:  permission denied for table secrets", Dump),
            (Postgres, "psql:<stdin>:66: ERROR:  must be owner of extension vector", Dump),
            (Postgres, "pg_dump: error: aborting because of server version mismatch", Dump),
            (Mongodb, "2026-11-21T03:00:01.123+0000\tFailed: can't create session: failed to connect to mongodb://db:27017/: connection() error occurred during connection handshake: auth error: sasl conversation error: unable to authenticate using mechanism \"SCRAM-SHA-256\": (AuthenticationFailed) Authentication failed. socket was unexpectedly closed: EOF", Auth),
            (Mongodb, "Failed: can't create session: could not connect to server: server selection error: server selection timeout, current topology: { Type: Single, Servers: [{ Addr: db:27017, Type: Unknown, Last error: dial tcp 10.0.0.3:27017: connect: connection refused }, ] }", Unreachable),
            (Mongodb, "Failed: error connecting to db server: no reachable servers", Unreachable),
            (Mongodb, "Failed: (Unauthorized) not authorized on shop to execute command { find: \"orders\" }", Auth),
            (Mongodb, "Failed: error reading collection: (CursorNotFound) cursor id 123 not found", Dump),
            (Redis, "AUTH failed: WRONGPASS invalid username-password pair or user is disabled.", Auth),
            (Redis, "REPLCONF capa error: NOAUTH Authentication required.\nSYNC with master failed: -NOAUTH Authentication required.", Auth),
            (Redis, "Could not connect to Redis at 10.0.0.4:6379: Connection refused", Unreachable),
            (Redis, "Could not connect to Redis at cache:6379: Name or service not known", Unreachable),
            (Redis, "Error: Server closed the connection", Dump),
            (Redis, "SYNC with master failed: -ERR unknown command 'SYNC'", Dump),
        ];
        for (ty, line, want) in cases {
            assert_eq!(classify(*ty, line), *want, "{ty:?}: {line}");
        }
    }

    #[test]
    fn splits_urls_by_hand() {
        let p = split_url("mongodb+srv://u:p%40ss@cluster0.x.net/app?authSource=admin&tls=true")
            .unwrap();
        assert_eq!(p.scheme, "mongodb+srv");
        assert_eq!((p.user, p.password), (Some("u"), Some("p%40ss")));
        assert_eq!(p.hosts, "cluster0.x.net");
        assert_eq!(p.path, "app");
        assert_eq!(p.query, [("authSource", "admin"), ("tls", "true")]);
        let p = split_url("mongodb://h1:27017,h2:27018/db").unwrap();
        assert_eq!(p.hosts, "h1:27017,h2:27018");
        assert_eq!(p.user, None);
        let p = split_url("redis://:pw@[::1]:6380/3").unwrap();
        assert_eq!(
            (p.user, p.password, p.hosts, p.path),
            (None, Some("pw"), "[::1]:6380", "3")
        );
        assert!(split_url("not a url").is_err());
    }

    #[test]
    fn host_and_port() {
        assert_eq!(host_port("[::1]:6380", 1).unwrap(), ("::1".into(), 6380));
        assert_eq!(
            host_port("[fe80::1]", 5432).unwrap(),
            ("fe80::1".into(), 5432)
        );
        assert_eq!(
            host_port("db.local", 5432).unwrap(),
            ("db.local".into(), 5432)
        );
        assert_eq!(host_port("db:6543", 5432).unwrap(), ("db".into(), 6543));
        assert!(host_port("db:0", 1).is_err());
        assert!(host_port("db:99999", 1).is_err());
        assert!(host_port("[::1", 1).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("p%40ss%3Aw%2Fd").unwrap(), "p@ss:w/d");
        assert!(percent_decode("bad%4").is_err());
        assert!(percent_decode("bad%zz").is_err());
    }
}
