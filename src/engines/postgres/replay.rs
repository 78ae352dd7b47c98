//! The private Postgres server of a point-in-time restore or a base backup's verification
//! (DESIGN §14): a base backup unpacked into a directory of the job's, started by the server
//! binaries of its own major (`PG_BIN_DIR`), listening on a Unix socket in that directory only,
//! replaying WAL that a `restore_command` asks the worker for, one file at a time, until its
//! recovery target (then it promotes).
//!
//! The `restore_command` is a small shell script: it drops a request into `spool/want/` and waits
//! until the worker has put the verified file into `spool/ready/` (or a marker into
//! `spool/missing/`). No credential, store setting or key ever reaches the server's side.
//!
//! Cleanup: the postmaster dies with the worker (`PR_SET_PDEATHSIG`, and SIGKILL on drop), and
//! its directory is removed on drop; a directory left by a worker killed with -9 names its pid in
//! `owner` and is removed by [`sweep`] on any later start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::process::Child;
use tokio::task::JoinHandle;

use super::super::{fail, BackupFile, Failure};
use crate::domain::FailureReason;

/// Directory prefix of private servers (under TMPDIR), for [`sweep`].
pub const DIR_PREFIX: &str = "backup-worker-pitr-";
/// The socket's port number (it only names the socket file; nothing listens on TCP).
const PORT: u16 = 5432;
/// What Postgres logs when WAL ends before a time target (PG 13+: a FATAL, not a promotion).
const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";

/// Serves the WAL files a replay asks for.
#[async_trait]
pub trait WalFetch: Send + Sync {
    /// Writes WAL file `name` (a segment or a `.history`) to `into`, verified; `Ok(false)` when
    /// the chain has no such file (Postgres probes for files that do not exist).
    async fn fetch(&self, name: &str, into: &Path) -> Result<bool, Failure>;
}

/// What to rebuild and how far to replay.
pub struct Replay<'a> {
    /// `PG_BIN_DIR` resolved for the base backup's major.
    pub bin_dir: PathBuf,
    pub base: &'a BackupFile,
    /// `None`: to the end of the chain (the verifier).
    pub target_time: Option<DateTime<Utc>>,
    pub wal: Arc<dyn WalFetch>,
    /// The role the worker connects as (a role of the tenant's cluster; trust on the socket).
    pub user: String,
}

/// A running private server, promoted and accepting connections on its socket.
pub struct PrivateServer {
    child: Option<Child>,
    spool: JoinHandle<()>,
    dir: Option<tempfile::TempDir>,
    socket_dir: PathBuf,
    user: String,
    /// The replay stopped at the end of the WAL rather than at a target (see [`TARGET_NOT_REACHED`]).
    pub reached_end: bool,
    /// Declared after `dir`: deregistered once the directory is gone.
    _live: Live,
}

/// The OS user the server runs as: ourselves, or `postgres` when we are root (Postgres refuses
/// to run as root).
fn run_as() -> Result<Option<(u32, u32)>, Failure> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or_else(|| {
            fail(
                FailureReason::Config,
                "the worker runs as root and there is no `postgres` OS user to run the private \
                 Postgres server as (Postgres refuses root)",
            )
        })?;
    let field = |i: usize| entry.split(':').nth(i).and_then(|v| v.parse::<u32>().ok());
    match (field(2), field(3)) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(fail(
            FailureReason::Config,
            "the `postgres` OS user's entry in /etc/passwd is unreadable",
        )),
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| {
        let reason = if matches!(e.raw_os_error(), Some(28) | Some(122)) {
            FailureReason::Config
        } else {
            FailureReason::Dump
        };
        fail(reason, format!("{what}: {e}"))
    }
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    let ids = (
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    );
    rustix::fs::chown(path, ids.0, ids.1)?;
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), owner)?;
        }
    }
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Directories of this process's servers that are running: a directory of ours not in it was
/// left by a dropped job whose removal raced its dying postmaster.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory in [`LIVE`] from its creation until dropped (with its server, or on a failed start).
struct Live(PathBuf);

impl Live {
    fn register(dir: &Path) -> Self {
        live().push(dir.to_path_buf());
        Self(dir.to_path_buf())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        live().retain(|d| *d != self.0);
    }
}

/// Removes private-server directories whose worker is gone (killed before its drop ran), and this
/// worker's own that no running server holds.
pub fn sweep() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(e.path().join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let ours = owner == i32::try_from(std::process::id()).ok();
        let alive = owner
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|pid| rustix::process::test_kill_process(pid).is_ok());
        let stale = if ours {
            !live().contains(&e.path())
        } else {
            owner.is_some() && !alive
        };
        if stale {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    tracing::info!(dir = %e.path().display(), "removed a dead worker's private Postgres directory")
                }
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove a dead worker's private Postgres directory")
                }
            }
        }
    }
}

/// The restore_command script: one request file, then wait for the worker's answer.
fn restore_script(spool: &Path) -> String {
    let spool = spool.display().to_string().replace('\'', "");
    format!(
        "#!/bin/sh\n\
         # restore_command of backup-worker's private server: asks the worker for one WAL file.\n\
         spool='{spool}'\n\
         f=\"$1\"\n\
         : > \"$spool/want/$f\" || exit 1\n\
         while :; do\n\
         \x20 if [ -e \"$spool/ready/$f\" ]; then\n\
         \x20   cp \"$spool/ready/$f\" \"$2\" && rm -f \"$spool/ready/$f\" && exit 0\n\
         \x20   exit 1\n\
         \x20 fi\n\
         \x20 if [ -e \"$spool/missing/$f\" ]; then rm -f \"$spool/missing/$f\"; exit 1; fi\n\
         \x20 sleep 0.05\n\
         done\n"
    )
}

/// Answers the script's requests until aborted. A fetch that fails is answered "missing" (the
/// replay then ends there) and remembered: the job reports it.
async fn serve_spool(
    spool: PathBuf,
    wal: Arc<dyn WalFetch>,
    failed: Arc<std::sync::Mutex<Option<Failure>>>,
) {
    let want = spool.join("want");
    loop {
        let mut names: Vec<String> = match std::fs::read_dir(&want) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        for name in names {
            let _ = std::fs::remove_file(want.join(&name));
            let tmp = spool.join("ready").join(format!(".{name}.tmp"));
            let answer = if name.contains('/') || name.starts_with('.') {
                Ok(false)
            } else {
                wal.fetch(&name, &tmp).await
            };
            let done = match answer {
                Ok(true) => std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                    .and_then(|()| std::fs::rename(&tmp, spool.join("ready").join(&name))),
                Ok(false) => std::fs::write(spool.join("missing").join(&name), b""),
                Err(f) => {
                    tracing::warn!(file = %name, reason = f.reason.as_str(), detail = %f.detail, "a WAL file of the chain could not be served");
                    failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(f);
                    std::fs::write(spool.join("missing").join(&name), b"")
                }
            };
            if let Err(e) = done {
                tracing::warn!(file = %name, error = %e, "answering the private server's WAL request failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl PrivateServer {
    /// Unpacks the base backup, starts the server and waits until it has replayed to its target
    /// and promoted. Bounded by the caller (BACKUP_TIMEOUT); dropping the future kills the server.
    pub async fn start(replay: Replay<'_>) -> Result<PrivateServer, Failure> {
        let owner = run_as()?;
        let postgres = replay.bin_dir.join("postgres");
        if !postgres.exists() {
            return Err(fail(
                FailureReason::Config,
                format!(
                    "no Postgres server binaries at {} (PG_BIN_DIR): the image must carry the \
                     base backup's major version",
                    replay.bin_dir.display()
                ),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(io("creating the private server's directory"))?;
        std::fs::write(dir.path().join("owner"), std::process::id().to_string())
            .map_err(io("writing the private server's owner file"))?;
        let registered = Live::register(dir.path());
        let data = dir.path().join("data");
        let spool = dir.path().join("spool");
        for d in ["want", "ready", "missing"] {
            std::fs::create_dir_all(spool.join(d)).map_err(io("creating the WAL spool"))?;
        }
        std::fs::create_dir(&data).map_err(io("creating the data directory"))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(io("creating the data directory"))?;
        unpack(replay.base, &data).await?;
        configure(&data, dir.path(), &spool, replay.target_time)?;
        chown_tree(dir.path(), owner).map_err(io("handing the directory to the postgres user"))?;

        let failed = Arc::new(std::sync::Mutex::new(None));
        let spool_task = tokio::spawn(serve_spool(spool, replay.wal.clone(), failed.clone()));
        let mut server = PrivateServer {
            child: None,
            spool: spool_task,
            socket_dir: dir.path().to_path_buf(),
            dir: Some(dir),
            user: replay.user.clone(),
            reached_end: false,
            _live: registered,
        };
        match server.run_until_promoted(&postgres, &data, owner).await {
            Ok(()) => {}
            Err(f) if f.detail.contains(TARGET_NOT_REACHED) && replay.target_time.is_some() => {
                // The WAL ends before any commit after the target: everything stored was
                // committed before it, so the end of the WAL *is* the target's state.
                configure(
                    &data,
                    server.socket_dir.clone().as_path(),
                    &server.socket_dir.join("spool"),
                    None,
                )?;
                chown_tree(&data, owner)
                    .map_err(io("handing the directory to the postgres user"))?;
                server.run_until_promoted(&postgres, &data, owner).await?;
                server.reached_end = true;
            }
            Err(f) => return Err(f),
        }
        if let Some(f) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(f);
        }
        Ok(server)
    }

    async fn run_until_promoted(
        &mut self,
        postgres: &Path,
        data: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<(), Failure> {
        let log_path = self.socket_dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening the private server's log"))?;
        let log_err = log
            .try_clone()
            .map_err(io("opening the private server's log"))?;
        let mut cmd = tokio::process::Command::new(postgres);
        cmd.arg("-D")
            .arg(data)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: pre_exec runs between fork and exec; prctl is async-signal-safe. It runs after
        // the uid switch (which would clear the death signal).
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            fail(
                FailureReason::Config,
                format!("cannot start {}: {e}", postgres.display()),
            )
        })?;
        let options = PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(PORT)
            .username(&self.user)
            // template1 exists in every cluster (a tenant may have dropped `postgres`).
            .database("template1")
            .disable_statement_logging();
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(io("watching the private server"))?
            {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: String = text
                    .lines()
                    .rev()
                    .take(12)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(fail(
                    FailureReason::Integrity,
                    format!("the private server's replay stopped ({status}): {tail}"),
                ));
            }
            if let Ok(mut c) = options.connect().await {
                let recovering: Result<bool, _> = sqlx::query_scalar("SELECT pg_is_in_recovery()")
                    .fetch_one(&mut c)
                    .await;
                let _ = c.close().await;
                if let Ok(false) = recovering {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// libpq environment for tools connecting to the server (trust on its socket: no password).
    pub fn libpq_env(&self, database: &str) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), self.socket_dir.display().to_string()),
            ("PGPORT".into(), PORT.to_string()),
            ("PGUSER".into(), self.user.clone()),
            ("PGDATABASE".into(), database.to_owned()),
        ]
    }

    /// Rows per `schema.table` of `database`, counted as the cluster's bootstrap superuser (oid
    /// 10, whatever its name: row security never hides a row from it).
    pub async fn count_rows(
        &self,
        database: &str,
    ) -> Result<std::collections::BTreeMap<String, i64>, Failure> {
        let connect = |user: String, db: String| {
            let socket = self.socket_dir.clone();
            async move {
                PgConnectOptions::new()
                    .socket(&socket)
                    .port(PORT)
                    .username(&user)
                    .database(&db)
                    .disable_statement_logging()
                    .connect()
                    .await
                    .map_err(|e| {
                        fail(
                            FailureReason::Dump,
                            format!("connecting to the private server: {e}"),
                        )
                    })
            }
        };
        let mut probe = connect(self.user.clone(), "template1".into()).await?;
        let superuser: String =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE oid = 10")
                .fetch_one(&mut probe)
                .await
                .map_err(|e| {
                    fail(
                        FailureReason::Dump,
                        format!("reading the replayed cluster's roles: {e}"),
                    )
                })?;
        let _ = probe.close().await;
        let mut c = connect(superuser, database.to_owned()).await?;
        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
              ORDER BY 1, 2",
        )
        .fetch_all(&mut c)
        .await
        .map_err(|e| {
            fail(
                FailureReason::Dump,
                format!("listing the replayed database's tables: {e}"),
            )
        })?;
        let mut counts = std::collections::BTreeMap::new();
        for (schema, table) in tables {
            let sql = format!(
                "SELECT count(*) FROM {}.{}",
                super::rewind::ident(&schema),
                super::rewind::ident(&table)
            );
            let n: i64 = sqlx::query_scalar(&sql)
                .fetch_one(&mut c)
                .await
                .map_err(|e| {
                    fail(
                        FailureReason::Integrity,
                        format!("counting {schema}.{table}: {e}"),
                    )
                })?;
            counts.insert(format!("{schema}.{table}"), n);
        }
        let _ = c.close().await;
        Ok(counts)
    }

    /// Stops the server (immediate shutdown: nothing of it is kept) and removes its directory.
    pub async fn stop(mut self) {
        self.shut_down().await;
    }

    async fn shut_down(&mut self) {
        self.spool.abort();
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove the private server's directory");
            }
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // A dropped job (timeout, shutdown): SIGKILL the postmaster (kill_on_drop); its backends
        // exit on postmaster death. The directory goes with the TempDir; what a dying backend
        // writes meanwhile is left to the sweeper (the directory is no longer live).
        self.spool.abort();
    }
}

/// Unpacks the base backup's tar stream into `data` (decrypted and decompressed as it is read).
async fn unpack(base: &BackupFile, data: &Path) -> Result<(), Failure> {
    let reader = base.open_blocking()?;
    let data = data.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(false);
        archive.set_overwrite(true);
        archive.unpack(&data)
    })
    .await
    .map_err(|e| {
        fail(
            FailureReason::Dump,
            format!("unpacking the base backup: {e}"),
        )
    })?
    .map_err(|e| {
        let reason = if matches!(e.raw_os_error(), Some(28) | Some(122)) {
            FailureReason::Config
        } else {
            FailureReason::Integrity
        };
        fail(reason, format!("unpacking the base backup: {e}"))
    })
}

/// The private server's configuration: ours only (the tenant's settings, libraries and HBA rules
/// do not apply to a throwaway replay), recovery to the target, WAL from the spool.
fn configure(
    data: &Path,
    dir: &Path,
    spool: &Path,
    target: Option<DateTime<Utc>>,
) -> Result<(), Failure> {
    let script = dir.join("restore_wal.sh");
    std::fs::write(&script, restore_script(spool)).map_err(io("writing the restore_command"))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .map_err(io("writing the restore_command"))?;
    let mut conf = format!(
        "# backup-worker's private replay server: nothing of the tenant's configuration applies.\n\
         listen_addresses = ''\n\
         port = {PORT}\n\
         unix_socket_directories = {socket}\n\
         unix_socket_permissions = 0700\n\
         hba_file = {hba}\n\
         ident_file = {ident}\n\
         shared_preload_libraries = ''\n\
         max_connections = 20\n\
         hot_standby = off\n\
         archive_mode = off\n\
         fsync = off\n\
         synchronous_commit = off\n\
         logging_collector = off\n\
         log_min_messages = warning\n\
         restore_command = {restore}\n\
         recovery_target_timeline = 'latest'\n",
        socket = quote(&dir.display().to_string()),
        hba = quote(&dir.join("pg_hba.conf").display().to_string()),
        ident = quote(&dir.join("pg_ident.conf").display().to_string()),
        restore = quote(&format!("{} \"%f\" \"%p\"", script.display())),
    );
    if let Some(t) = target {
        conf.push_str(&format!(
            "recovery_target_time = {}\nrecovery_target_action = 'promote'\n",
            // Postgres' own spelling: its GUC check refuses the RFC 3339 `T…Z` form.
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        ));
    }
    let write = |name: &Path, text: &str| {
        std::fs::write(name, text).map_err(io("configuring the private server"))
    };
    write(&data.join("postgresql.conf"), &conf)?;
    write(&data.join("postgresql.auto.conf"), "")?;
    write(&dir.join("pg_hba.conf"), "local all all trust\n")?;
    write(&dir.join("pg_ident.conf"), "")?;
    write(&data.join("recovery.signal"), "")?;
    for stale in [
        "standby.signal",
        "postmaster.pid",
        "postmaster.opts",
        "tablespace_map",
    ] {
        let _ = std::fs::remove_file(data.join(stale));
    }
    std::fs::create_dir_all(data.join("pg_wal").join("archive_status"))
        .map_err(io("configuring the private server"))?;
    Ok(())
}

impl PrivateServer {
    /// `pg_dump --format=custom` of `database` as the worker's role, through gzip into a file of
    /// `temp` — what the §6 rewind restores from (it reads the table of contents first).
    pub async fn dump(
        &self,
        tools: &crate::process::Tools,
        database: &str,
        temp: &Path,
    ) -> Result<BackupFile, Failure> {
        let mut cmd = super::ToolCommand::new("pg_dump", super::super::base_env(temp)).args([
            "--format=custom",
            "--compress=0",
            "--no-password",
        ]);
        for (k, v) in self.libpq_env(database) {
            cmd.env.push((k, v.into()));
        }
        let mut tool = crate::process::spawn(tools, &cmd, false)?;
        let stdout = tool
            .stdout
            .take()
            .ok_or_else(|| fail(FailureReason::Dump, "pg_dump has no stdout"))?;
        let store = crate::storage::LocalStore::new(temp.to_path_buf())
            .await
            .map_err(|e| fail(FailureReason::Dump, format!("the dump's directory: {e}")))?;
        let key = "pitr-dump.pgdump.gz";
        let mut upload = crate::storage::ObjectStore::begin_upload(&store, key, Default::default())
            .await
            .map_err(|e| fail(FailureReason::Dump, e.to_string()))?;
        let streamed = crate::pipeline::gzip_to_upload(
            stdout,
            Box::new(super::DumpCheck::default()),
            upload.as_mut(),
            crate::gzip::Deflate::for_gzip_level(1),
            None,
        )
        .await;
        let finished = tool.wait().await;
        let streamed = match streamed {
            Ok(s) if finished.status.success() => s,
            Ok(_) => {
                let _ = upload.abort().await;
                return Err(fail(
                    FailureReason::Dump,
                    format!(
                        "pg_dump of the replayed database failed: {}",
                        finished.describe()
                    ),
                ));
            }
            Err(e) => {
                let _ = upload.abort().await;
                return Err(fail(
                    FailureReason::Dump,
                    format!("dumping the replayed database: {e}"),
                ));
            }
        };
        if let Err(why) = &streamed.check {
            let _ = upload.abort().await;
            return Err(fail(
                FailureReason::Dump,
                format!("the replayed database's dump is incomplete: {why}"),
            ));
        }
        upload
            .commit(Default::default())
            .await
            .map_err(|e| fail(FailureReason::Dump, e.to_string()))?;
        Ok(BackupFile {
            path: temp.join(key),
            identity: None,
        })
    }
}
