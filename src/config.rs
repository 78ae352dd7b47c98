//! Configuration from the environment (DESIGN §9), validated once at start. Every error names the
//! variable; values that may hold secrets are never echoed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;
pub use crate::storage::S3Options;
use crate::storage::StorageUrl;

/// Every variable the daemon reads, for docs and for manifests cross-checks.
pub const ENV_VARS: &[&str] = &[
    "DATABASE_URL",
    "STORAGE_URL",
    "S3_ENDPOINT",
    "S3_REGION",
    "S3_FORCE_PATH_STYLE",
    "PLANS_PATH",
    "PROVISIONER_ADDR",
    "WORKER_ID",
    "METRICS_ADDR",
    "LOG_FORMAT",
    "BACKUP_CONCURRENCY",
    "RESTORE_CONCURRENCY",
    "SCHEDULER_INTERVAL",
    "LEASE_SECONDS",
    "BACKUP_TIMEOUT",
    "SHUTDOWN_GRACE",
    "SHUTDOWN_ABORT_WINDOW",
    "GZIP_LEVEL",
    "VERIFY_INTERVAL",
    "VERIFY_EVERY",
    "VERIFY_CONCURRENCY",
    "VERIFY_DATABASE_URL",
    "VERIFY_REDIS_URL",
    "ENCRYPTION_KEY_FILE",
    "COPY_STORAGE_URL",
    "COPY_S3_ENDPOINT",
    "COPY_S3_REGION",
    "COPY_S3_FORCE_PATH_STYLE",
    "COPY_AWS_ACCESS_KEY_ID",
    "COPY_AWS_SECRET_ACCESS_KEY",
    "COPY_AWS_PROFILE",
    "OBJECT_LOCK_MODE",
    "COPY_OBJECT_LOCK_MODE",
    "WAL_STREAMS_PER_REPLICA",
    "PG_BIN_DIR",
];

/// Where the Postgres server binaries of each major live (DESIGN §14); `{major}` is replaced.
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/{major}/bin";

pub const DEFAULT_STORAGE_URL: &str = "file://./var/backups";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

fn bad(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Secret,
    pub storage_url: StorageUrl,
    pub s3: S3Options,
    pub plans_path: Option<PathBuf>,
    pub provisioner_addr: Option<String>,
    pub worker_id: String,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    pub backup_concurrency: usize,
    pub restore_concurrency: usize,
    pub scheduler_interval: Duration,
    pub lease: Duration,
    pub backup_timeout: Duration,
    pub shutdown_grace: Duration,
    /// After SHUTDOWN_GRACE, how long cancelled jobs get to kill their tools, abort their uploads
    /// and release their rows before the process exits regardless.
    pub shutdown_abort_window: Duration,
    pub gzip_level: u32,
    /// Pause between verifier passes.
    pub verify_interval: Duration,
    /// How often each resource's newest backup is proven restorable.
    pub verify_every: Duration,
    pub verify_concurrency: usize,
    /// Where Postgres test restores create their scratch databases; `None`: integrity only.
    pub verify_database_url: Option<Secret>,
    /// The scratch Redis that Redis test restores RESTORE into; `None`: Redis backups are cut, not
    /// RESTOREd.
    pub verify_redis_url: Option<Secret>,
    /// The master key (ENCRYPTION_KEY_FILE); `None`: backups are stored unencrypted.
    pub master_key: Option<std::sync::Arc<crate::crypto::MasterKey>>,
    /// The second destination (COPY_STORAGE_URL, DESIGN §13); `None`: backups exist once.
    pub copy: Option<CopyDestination>,
    /// OBJECT_LOCK_MODE: primary objects are written with S3 Object Lock retention.
    pub object_lock: Option<crate::storage::LockMode>,
    /// WAL streams one replica holds at most (DESIGN §14).
    pub wal_streams_per_replica: usize,
    /// PG_BIN_DIR: a directory pattern with `{major}` for the private servers of PITR restores.
    pub pg_bin_dir: String,
}

impl Config {
    /// The directory of the Postgres server binaries of `major`.
    pub fn pg_bin_dir(&self, major: u32) -> PathBuf {
        PathBuf::from(self.pg_bin_dir.replace("{major}", &major.to_string()))
    }
}

/// An S3-compatible store's endpoint settings, from the three variables named.
fn s3_options(
    get: &impl Fn(&str) -> Option<String>,
    endpoint_var: &'static str,
    region_var: &'static str,
    path_style_var: &'static str,
) -> Result<S3Options, ConfigError> {
    let endpoint = get(endpoint_var);
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(bad(
                endpoint_var,
                format!("must be an http:// or https:// URL, got {e:?}"),
            ));
        }
    }
    let force_path_style = match get(path_style_var) {
        None => false,
        Some(v) => parse_bool(&v)
            .ok_or_else(|| bad(path_style_var, format!("expected true or false, got {v:?}")))?,
    };
    Ok(S3Options {
        endpoint,
        region: get(region_var),
        force_path_style,
    })
}

/// OBJECT_LOCK_MODE / COPY_OBJECT_LOCK_MODE: `governance` or `compliance`, on an s3:// store only.
fn lock_mode(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    url: &StorageUrl,
) -> Result<Option<crate::storage::LockMode>, ConfigError> {
    let Some(v) = get(var) else {
        return Ok(None);
    };
    let mode = crate::storage::LockMode::parse(&v)
        .ok_or_else(|| bad(var, format!("expected governance or compliance, got {v:?}")))?;
    if !matches!(url, StorageUrl::S3 { .. }) {
        return Err(bad(
            var,
            format!("S3 Object Lock needs an s3:// destination, not {url}"),
        ));
    }
    Ok(Some(mode))
}

/// A copy destination: its own URL, endpoint settings and credentials — nothing taken from the
/// primary's (a different provider is the normal case).
#[derive(Debug, Clone)]
pub struct CopyDestination {
    pub url: StorageUrl,
    pub s3: S3Options,
    pub credentials: CopyCredentials,
    /// COPY_OBJECT_LOCK_MODE.
    pub object_lock: Option<crate::storage::LockMode>,
}

#[derive(Clone)]
pub enum CopyCredentials {
    /// A file:// destination needs none.
    None,
    Static {
        access_key_id: String,
        secret_access_key: Secret,
    },
    /// A named profile of the shared AWS config and credentials files.
    Profile(String),
}

impl std::fmt::Debug for CopyCredentials {
    // A bare key is no URL for `Secret` to redact: never printed at all.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Static { access_key_id, .. } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"***")
                .finish(),
            Self::Profile(p) => f.debug_tuple("Profile").field(p).finish(),
        }
    }
}

/// COPY_STORAGE_URL and its settings; every problem names its variable.
fn copy_destination(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<CopyDestination>, ConfigError> {
    let Some(raw) = get("COPY_STORAGE_URL") else {
        for var in [
            "COPY_S3_ENDPOINT",
            "COPY_S3_REGION",
            "COPY_S3_FORCE_PATH_STYLE",
            "COPY_AWS_ACCESS_KEY_ID",
            "COPY_AWS_SECRET_ACCESS_KEY",
            "COPY_AWS_PROFILE",
            "COPY_OBJECT_LOCK_MODE",
        ] {
            if get(var).is_some() {
                return Err(bad(
                    "COPY_STORAGE_URL",
                    format!(
                        "is unset but {var} is set: set COPY_STORAGE_URL to use a copy destination"
                    ),
                ));
            }
        }
        return Ok(None);
    };
    let url = StorageUrl::parse(&raw).map_err(|e| bad("COPY_STORAGE_URL", e))?;
    let s3 = s3_options(
        get,
        "COPY_S3_ENDPOINT",
        "COPY_S3_REGION",
        "COPY_S3_FORCE_PATH_STYLE",
    )?;
    let credentials = match (
        get("COPY_AWS_ACCESS_KEY_ID"),
        get("COPY_AWS_SECRET_ACCESS_KEY"),
        get("COPY_AWS_PROFILE"),
    ) {
        (Some(_), Some(_), Some(_)) => {
            return Err(bad(
                "COPY_AWS_PROFILE",
                "set either COPY_AWS_PROFILE or COPY_AWS_ACCESS_KEY_ID/COPY_AWS_SECRET_ACCESS_KEY, not both",
            ))
        }
        (Some(id), Some(secret), None) => CopyCredentials::Static {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
        },
        (Some(_), None, _) => {
            return Err(bad(
                "COPY_AWS_SECRET_ACCESS_KEY",
                "is required with COPY_AWS_ACCESS_KEY_ID",
            ))
        }
        (None, Some(_), _) => {
            return Err(bad(
                "COPY_AWS_ACCESS_KEY_ID",
                "is required with COPY_AWS_SECRET_ACCESS_KEY",
            ))
        }
        (None, None, Some(profile)) => CopyCredentials::Profile(profile),
        (None, None, None) => CopyCredentials::None,
    };
    if matches!(url, StorageUrl::S3 { .. }) && matches!(credentials, CopyCredentials::None) {
        return Err(bad(
            "COPY_AWS_ACCESS_KEY_ID",
            "an s3:// COPY_STORAGE_URL needs its own credentials (COPY_AWS_ACCESS_KEY_ID and COPY_AWS_SECRET_ACCESS_KEY, or COPY_AWS_PROFILE): the primary's are never used for the copy",
        ));
    }
    let object_lock = lock_mode(get, "COPY_OBJECT_LOCK_MODE", &url)?;
    Ok(Some(CopyDestination {
        url,
        s3,
        credentials,
        object_lock,
    }))
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any lookup (tests pass a map instead of mutating the
    /// process environment). Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };

        let database_url = get("DATABASE_URL").ok_or_else(|| {
            bad(
                "DATABASE_URL",
                "required (postgres://user@host:5432/db; put the password in the URL or PGPASSFILE)",
            )
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(bad(
                "DATABASE_URL",
                "must start with postgres:// or postgresql://",
            ));
        }

        let storage_raw = get("STORAGE_URL").unwrap_or_else(|| DEFAULT_STORAGE_URL.to_owned());
        let storage_url = StorageUrl::parse(&storage_raw).map_err(|e| bad("STORAGE_URL", e))?;

        let s3 = s3_options(&get, "S3_ENDPOINT", "S3_REGION", "S3_FORCE_PATH_STYLE")?;

        let provisioner_addr = get("PROVISIONER_ADDR")
            .map(|a| provisioner_endpoint(&a).map_err(|why| bad("PROVISIONER_ADDR", why)))
            .transpose()?;

        let worker_id = match get("WORKER_ID") {
            Some(id) => id,
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        if worker_id.is_empty() || worker_id.len() > 200 || worker_id.chars().any(char::is_control)
        {
            return Err(bad(
                "WORKER_ID",
                "must be 1-200 printable characters (defaults to the hostname)",
            ));
        }

        let metrics_addr = match get("METRICS_ADDR") {
            None => SocketAddr::from(([0, 0, 0, 0], 9090)),
            Some(v) => listen_addr(&v).ok_or_else(|| {
                bad(
                    "METRICS_ADDR",
                    format!("expected host:port such as 0.0.0.0:9090 (or :9090), got {v:?}"),
                )
            })?,
        };

        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(bad(
                    "LOG_FORMAT",
                    format!("expected json or pretty, got {other:?}"),
                ))
            }
        };

        let verify_database_url = get("VERIFY_DATABASE_URL");
        if let Some(url) = &verify_database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(bad(
                    "VERIFY_DATABASE_URL",
                    "must start with postgres:// or postgresql:// (a role that may CREATE DATABASE)",
                ));
            }
            if url.parse::<sqlx::postgres::PgConnectOptions>().is_err() {
                return Err(bad("VERIFY_DATABASE_URL", "is not a valid postgres URL"));
            }
        }

        let verify_redis_url = get("VERIFY_REDIS_URL").map(Secret::new);
        if let Some(url) = &verify_redis_url {
            crate::engines::ScratchRedis::new(url).map_err(|p| bad("VERIFY_REDIS_URL", p.0))?;
        }

        let master_key = get("ENCRYPTION_KEY_FILE")
            .map(|path| {
                crate::crypto::MasterKey::load(std::path::Path::new(&path))
                    .map(std::sync::Arc::new)
                    .map_err(|why| bad("ENCRYPTION_KEY_FILE", why))
            })
            .transpose()?;

        let copy = copy_destination(&get)?;
        let object_lock = lock_mode(&get, "OBJECT_LOCK_MODE", &storage_url)?;
        if let Some(c) = &copy {
            if c.url.to_string() == storage_url.to_string() {
                return Err(bad(
                    "COPY_STORAGE_URL",
                    "names the same place as STORAGE_URL: a copy must be somewhere else",
                ));
            }
        }

        let pg_bin_dir = get("PG_BIN_DIR").unwrap_or_else(|| DEFAULT_PG_BIN_DIR.to_owned());
        if !pg_bin_dir.contains("{major}") {
            return Err(bad(
                "PG_BIN_DIR",
                format!("must contain {{major}} (e.g. {DEFAULT_PG_BIN_DIR}), got {pg_bin_dir:?}"),
            ));
        }
        Ok(Config {
            database_url: Secret::new(database_url),
            storage_url,
            s3,
            plans_path: get("PLANS_PATH").map(PathBuf::from),
            provisioner_addr,
            worker_id,
            metrics_addr,
            log_format,
            backup_concurrency: int_in(&get, "BACKUP_CONCURRENCY", 2, 1, 64)? as usize,
            restore_concurrency: int_in(&get, "RESTORE_CONCURRENCY", 1, 1, 16)? as usize,
            scheduler_interval: duration_in(&get, "SCHEDULER_INTERVAL", 60, 1, 3600)?,
            lease: Duration::from_secs(int_in(&get, "LEASE_SECONDS", 60, 2, 3600)?),
            backup_timeout: duration_in(&get, "BACKUP_TIMEOUT", 6 * 3600, 1, 7 * 24 * 3600)?,
            shutdown_grace: duration_in(&get, "SHUTDOWN_GRACE", 30, 0, 3600)?,
            shutdown_abort_window: duration_in(&get, "SHUTDOWN_ABORT_WINDOW", 10, 1, 600)?,
            gzip_level: int_in(&get, "GZIP_LEVEL", 6, 1, 9)? as u32,
            verify_interval: duration_in(&get, "VERIFY_INTERVAL", 300, 1, 24 * 3600)?,
            verify_every: duration_in(&get, "VERIFY_EVERY", 7 * 24 * 3600, 1, 365 * 24 * 3600)?,
            verify_concurrency: int_in(&get, "VERIFY_CONCURRENCY", 1, 1, 16)? as usize,
            verify_database_url: verify_database_url.map(Secret::new),
            verify_redis_url,
            master_key,
            copy,
            object_lock,
            wal_streams_per_replica: int_in(&get, "WAL_STREAMS_PER_REPLICA", 50, 0, 10_000)?
                as usize,
            pg_bin_dir,
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn int_in(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(default);
    };
    match raw.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            var,
            format!("expected a whole number from {min} to {max}, got {raw:?}"),
        )),
    }
}

/// Durations are whole seconds (`90`) or a number with a unit: `500ms`, `90s`, `5m`, `2h`.
fn duration_in(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default_secs: u64,
    min_secs: u64,
    max_secs: u64,
) -> Result<Duration, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(Duration::from_secs(default_secs));
    };
    let problem = || {
        bad(
            var,
            format!(
                "expected a duration from {min_secs}s to {max_secs}s such as 60, 60s, 5m, 1h or 7d, got {raw:?}"
            ),
        )
    };
    let d = parse_duration(&raw).ok_or_else(problem)?;
    if d < Duration::from_secs(min_secs) || d > Duration::from_secs(max_secs) {
        return Err(problem());
    }
    Ok(d)
}

pub fn parse_duration(raw: &str) -> Option<Duration> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" => n.checked_mul(1000)?,
        "ms" => n,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// A listen address: `ip:port`, `:port` (all interfaces) or `host:port` (resolved once).
fn listen_addr(v: &str) -> Option<SocketAddr> {
    if let Some(port) = v.strip_prefix(':') {
        return Some(SocketAddr::from(([0, 0, 0, 0], port.parse().ok()?)));
    }
    if let Ok(addr) = v.parse() {
        return Some(addr);
    }
    if !v.contains(':') {
        return None;
    }
    std::net::ToSocketAddrs::to_socket_addrs(v).ok()?.next()
}

/// The provisioner's gRPC endpoint as tonic wants it. gRPC addresses are usually written
/// `host:port`; that and `grpc://` mean plaintext HTTP/2 (`http://`), `grpcs://` means TLS.
fn provisioner_endpoint(addr: &str) -> Result<String, String> {
    let url = match addr.split_once("://") {
        None => format!("http://{addr}"),
        Some(("http" | "https", _)) => addr.to_owned(),
        Some(("grpc", rest)) => format!("http://{rest}"),
        Some(("grpcs", rest)) => format!("https://{rest}"),
        Some((scheme, _)) => {
            return Err(format!(
            "unsupported scheme {scheme:?}: use host:port, http://host:port or https://host:port"
        ))
        }
    };
    let needs_port = !addr.contains("://");
    match url.parse::<tonic::transport::Uri>() {
        Ok(uri)
            if uri.host().is_some_and(|h| !h.is_empty())
                && (uri.port_u16().is_some() || !needs_port) =>
        {
            Ok(url)
        }
        _ => Err(format!(
            "not a gRPC endpoint (want host:port, http://host:port or https://host:port): {addr:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry("DATABASE_URL".into())
            .or_insert_with(|| "postgres://u:pw@localhost/db".into());
        Config::from_lookup(move |k| map.get(k).cloned())
    }

    #[test]
    fn a_copy_destination_has_settings_of_its_own() {
        let keys = [
            ("COPY_STORAGE_URL", "s3://copies/c"),
            ("COPY_AWS_ACCESS_KEY_ID", "id"),
            ("COPY_AWS_SECRET_ACCESS_KEY", "secret-x"),
            ("COPY_OBJECT_LOCK_MODE", "Compliance"),
        ];
        let c = cfg(&keys).unwrap();
        let copy = c.copy.unwrap();
        assert_eq!(copy.url.prefix(), "c/");
        assert_eq!(copy.object_lock, Some(crate::storage::LockMode::Compliance));
        assert!(!format!("{copy:?}").contains("secret-x"), "{copy:?}");
        assert!(c.object_lock.is_none());
        for (pairs, var) in [
            (vec![("COPY_AWS_PROFILE", "p")], "COPY_STORAGE_URL"),
            (
                vec![("COPY_STORAGE_URL", "s3://copies")],
                "COPY_AWS_ACCESS_KEY_ID",
            ),
            (
                vec![
                    ("COPY_STORAGE_URL", "s3://copies"),
                    ("COPY_AWS_ACCESS_KEY_ID", "id"),
                ],
                "COPY_AWS_SECRET_ACCESS_KEY",
            ),
            (
                vec![
                    ("COPY_STORAGE_URL", "s3://copies"),
                    ("COPY_AWS_ACCESS_KEY_ID", "id"),
                    ("COPY_AWS_SECRET_ACCESS_KEY", "s"),
                    ("COPY_AWS_PROFILE", "p"),
                ],
                "COPY_AWS_PROFILE",
            ),
            (
                vec![
                    ("COPY_STORAGE_URL", "file:///tmp/c"),
                    ("COPY_S3_FORCE_PATH_STYLE", "maybe"),
                ],
                "COPY_S3_FORCE_PATH_STYLE",
            ),
            (
                vec![("COPY_STORAGE_URL", "file://./var/backups")],
                "COPY_STORAGE_URL",
            ),
            (vec![("OBJECT_LOCK_MODE", "governance")], "OBJECT_LOCK_MODE"),
            (
                vec![
                    ("STORAGE_URL", "s3://bucket"),
                    ("OBJECT_LOCK_MODE", "forever"),
                ],
                "OBJECT_LOCK_MODE",
            ),
        ] {
            let err = cfg(&pairs).unwrap_err();
            assert_eq!(err.var, var, "{pairs:?}: {err}");
        }
        // A file:// copy needs no credentials.
        assert!(cfg(&[("COPY_STORAGE_URL", "file:///srv/copies")])
            .unwrap()
            .copy
            .is_some());
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.scheduler_interval, Duration::from_secs(60));
        assert_eq!(c.gzip_level, 6);
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(matches!(c.storage_url, StorageUrl::File { .. }));
        assert!(!c.worker_id.is_empty());
        assert_eq!(c.verify_interval, Duration::from_secs(300));
        assert_eq!(c.verify_every, Duration::from_secs(7 * 86400));
        assert_eq!(c.verify_concurrency, 1);
        assert!(c.verify_database_url.is_none());
        assert!(c.verify_redis_url.is_none());
        assert_eq!(c.shutdown_abort_window, Duration::from_secs(10));
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (var, value) in [
            ("GZIP_LEVEL", "12"),
            ("GZIP_LEVEL", "x"),
            ("BACKUP_CONCURRENCY", "0"),
            ("SCHEDULER_INTERVAL", "soon"),
            ("LEASE_SECONDS", "1"),
            ("SHUTDOWN_GRACE", "-1"),
            ("SHUTDOWN_ABORT_WINDOW", "0"),
            ("SHUTDOWN_ABORT_WINDOW", "soon"),
            ("SHUTDOWN_ABORT_WINDOW", "11m"),
            ("BACKUP_TIMEOUT", "8d"),
            ("VERIFY_EVERY", "1w"),
            ("VERIFY_INTERVAL", "0"),
            ("VERIFY_CONCURRENCY", "17"),
            ("VERIFY_DATABASE_URL", "mysql://root@x/db"),
            ("VERIFY_REDIS_URL", "postgres://x/db"),
            ("VERIFY_REDIS_URL", "redis://scratch:6379/3"),
            ("VERIFY_REDIS_URL", "redis://a:1,b:2"),
            ("METRICS_ADDR", "9090"),
            ("LOG_FORMAT", "xml"),
            ("STORAGE_URL", "ftp://x"),
            ("STORAGE_URL", "s3://"),
            ("S3_FORCE_PATH_STYLE", "maybe"),
            ("S3_ENDPOINT", "localhost:9000"),
            ("PROVISIONER_ADDR", "ftp://provisioner:50051"),
            ("PROVISIONER_ADDR", "provisioner"),
            ("DATABASE_URL", "mysql://root@x/db"),
        ] {
            let err = cfg(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{err}");
            let line = err.to_string();
            assert!(
                line.starts_with(&format!("invalid configuration: {var}: ")),
                "{line}"
            );
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn database_url_is_required_and_never_echoed() {
        let err = Config::from_lookup(|_| None).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        let err = cfg(&[("DATABASE_URL", "mysql://u:hunter2@x/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        let c = cfg(&[("DATABASE_URL", "postgres://u:hunter2@x/db")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn verify_redis_url_is_a_secret() {
        let c = cfg(&[("VERIFY_REDIS_URL", "rediss://verify:hunter2@scratch:6380")]).unwrap();
        assert!(c.verify_redis_url.is_some());
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = cfg(&[("VERIFY_REDIS_URL", "redis://:hunter2@scratch/1")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn metrics_addresses() {
        for (given, want) in [
            ("0.0.0.0:9090", "0.0.0.0:9090"),
            (":9091", "0.0.0.0:9091"),
            ("[::]:9090", "[::]:9090"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            assert_eq!(
                listen_addr(given).map(|a| a.to_string()).as_deref(),
                Some(want)
            );
        }
        assert!(listen_addr("localhost:9090").is_some_and(|a| a.port() == 9090));
        for bad in ["9090", "0.0.0.0", ":http", "nonexistent.invalid:9090"] {
            assert_eq!(listen_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn provisioner_addresses() {
        for (given, want) in [
            ("127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("provisioner.infra:50051", "http://provisioner.infra:50051"),
            ("[::1]:50051", "http://[::1]:50051"),
            ("http://provisioner:50051", "http://provisioner:50051"),
            (
                "https://provisioner.example.com",
                "https://provisioner.example.com",
            ),
            ("grpc://provisioner:50051", "http://provisioner:50051"),
            ("grpcs://provisioner:443", "https://provisioner:443"),
        ] {
            assert_eq!(provisioner_endpoint(given).as_deref(), Ok(want), "{given}");
        }
        for bad in ["provisioner", "ftp://x:1", "http://", "::"] {
            assert!(provisioner_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1.5s"), None);
        let c = cfg(&[("SCHEDULER_INTERVAL", "5m"), ("SHUTDOWN_GRACE", "0")]).unwrap();
        assert_eq!(c.scheduler_interval, Duration::from_secs(300));
        assert_eq!(c.shutdown_grace, Duration::ZERO);
        let c = cfg(&[("SHUTDOWN_ABORT_WINDOW", "20")]).unwrap();
        assert_eq!(c.shutdown_abort_window, Duration::from_secs(20));
        let c = cfg(&[("SHUTDOWN_ABORT_WINDOW", "1500ms")]).unwrap();
        assert_eq!(c.shutdown_abort_window, Duration::from_millis(1500));
    }
}
