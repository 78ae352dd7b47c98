//! Backup lifecycle (DESIGN §2 invariants, §5 "Lifecycle"): lease renewal and fencing, recovery
//! of rows whose worker died, timeouts, graceful shutdown, retention and the orphan-upload sweep.
//! Process behaviour is tested on real processes: the binary, killed and signalled.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::jobs::{self, JobTable};
use backup_worker::loops::backups::Backups;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::process::Tools;
use backup_worker::retention::{abort_stale_uploads, apply_retention};
use backup_worker::storage::{LocalStore, Metadata, ObjectStore};
use backup_worker_testkit::{free_port, http_get, test_config, test_deps, wait_until, S3Server};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");

/// A directory with the fake pg_dump installed as `pg_dump`, its behaviour file beside it.
struct FakeTools {
    dir: tempfile::TempDir,
}

impl FakeTools {
    fn new(behaviour: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            Path::new(FIXTURES).join("fake-pg_dump"),
            dir.path().join("pg_dump"),
        )
        .unwrap();
        std::fs::copy(
            Path::new(FIXTURES).join("fake-pg_dump.pgdump"),
            dir.path().join("dump.pgdump"),
        )
        .unwrap();
        let t = Self { dir };
        t.set(behaviour);
        t
    }
    fn set(&self, behaviour: &str) {
        std::fs::write(self.dir.path().join("behaviour"), behaviour).unwrap();
    }
    fn open_gate(&self) {
        std::fs::write(self.dir.path().join("open"), "").unwrap();
    }
    fn tools(&self) -> Tools {
        Tools::default().with_override("pg_dump", self.dir.path().join("pg_dump"))
    }
    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap()
        )
    }
    /// Pids the fake recorded, one per call.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("pid=")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }
}

impl Drop for FakeTools {
    fn drop(&mut self) {
        // A SIGKILLed daemon cannot kill its child: do it for the test — only pids that are
        // still our fake (pids are reused), never another test's process.
        let ours = |pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains(&*self.dir.path().to_string_lossy()) || c == "sleep\x003600\x00"
            })
        };
        for pid in self.pids().into_iter().filter(ours) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// SIGTERM to the daemon; it must exit 0 within SHUTDOWN_GRACE + 1 s.
async fn sigterm_and_wait(daemon: &mut tokio::process::Child, grace: Duration) {
    let sent = Instant::now();
    let pid = daemon.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(grace + Duration::from_secs(1), daemon.wait())
        .await
        .expect("exit within SHUTDOWN_GRACE + 1 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
    println!("exited {:?} after SIGTERM", sent.elapsed());
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    started_at: DateTime<Utc>,
    run_after: DateTime<Utc>,
    leased_by: Option<String>,
    failure_reason: Option<String>,
    object_key: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    internal_detail: Option<String>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT status, attempts, started_at, run_after, leased_by, failure_reason, object_key,
                lease_expires_at, internal_detail
           FROM resource_backups WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn team_resource(pool: &PgPool, tier: &str) -> (Uuid, Uuid) {
    let team: Uuid = sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ($1) RETURNING id")
        .bind(tier)
        .fetch_one(pool)
        .await
        .unwrap();
    let res: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         VALUES ($1, 'postgres', 'postgres://u:p@127.0.0.1/db') RETURNING id",
    )
    .bind(team)
    .fetch_one(pool)
    .await
    .unwrap();
    (team, res)
}

async fn enqueue(pool: &PgPool) -> Uuid {
    let (_, res) = team_resource(pool, "pro").await;
    backup_worker::commands::enqueue_backup(pool, res)
        .await
        .unwrap()
}

fn db_url(pool: &PgPool) -> String {
    backup_worker_testkit::database_url(pool)
}

fn daemon(
    pool: &PgPool,
    fake: &FakeTools,
    store: &Path,
    worker: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (tokio::process::Child, u16) {
    let port = free_port().unwrap();
    let mut c = tokio::process::Command::new(BIN);
    c.arg("run")
        .args(extra)
        .env("DATABASE_URL", db_url(pool))
        .env("STORAGE_URL", format!("file://{}", store.display()))
        .env("WORKER_ID", worker)
        .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "json")
        .env("PATH", fake.path_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    (c.spawn().unwrap(), port)
}

async fn wait_status(pool: &PgPool, id: Uuid, status: &str, within: Duration) -> Row {
    let what = format!("backup {id} to be {status}");
    wait_until(within, &what, || async {
        row(pool, id).await.status == status
    })
    .await
    .unwrap();
    row(pool, id).await
}

fn objects(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".gz")
                && !p.file_name().unwrap().to_string_lossy().starts_with('.')
            {
                out.push(p);
            }
        }
    }
    out
}

#[sqlx::test]
async fn a_killed_daemons_backup_is_recovered_by_another(pool: PgPool) {
    let fake = FakeTools::new("forever");
    let store = tempfile::tempdir().unwrap();
    let id = enqueue(&pool).await;
    let lease = Duration::from_secs(2);
    let (mut a, _) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-a",
        &["--only", "backups"],
        &[("LEASE_SECONDS", "2")],
    );
    let first = wait_status(&pool, id, "running", Duration::from_secs(20)).await;
    assert_eq!(first.leased_by.as_deref(), Some("pod-a"));
    a.kill().await.unwrap(); // SIGKILL: no cleanup, no release
    a.wait().await.unwrap();
    assert_eq!(row(&pool, id).await.status, "running", "nobody released it");

    fake.set("ok");
    let killed_at = Instant::now();
    let (_b, port) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-b",
        &["--only", "backups"],
        &[("LEASE_SECONDS", "2")],
    );
    // Recovery sweeps run every min(LEASE_SECONDS, 10 s): lease + one sweep, plus generous
    // start-up slack for a loaded machine (the elapsed time is printed, not asserted).
    let done = wait_status(&pool, id, "succeeded", lease * 2 + Duration::from_secs(30)).await;
    println!(
        "recovered and completed {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(done.attempts, 2);
    assert_eq!(done.leased_by.as_deref(), Some("pod-b"));
    assert!(done.started_at >= first.started_at);
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM resource_backups WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, 1);
    assert_eq!(objects(store.path()).len(), 1, "exactly one object");
    let (_, metrics) = http_get(([127, 0, 0, 1], port).into(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("instant_customer_backup_stuck_recovered_total 1"),
        "{metrics}"
    );
}

#[sqlx::test]
async fn sigterm_releases_running_backups_at_once(pool: PgPool) {
    let fake = FakeTools::new("forever");
    let store = tempfile::tempdir().unwrap();
    let id = enqueue(&pool).await;
    let grace = Duration::from_secs(1);
    let (mut a, _) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-a",
        &[],
        &[("SHUTDOWN_GRACE", "1")],
    );
    wait_status(&pool, id, "running", Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "the dump tool to start",
        || async { !fake.pids().is_empty() },
    )
    .await
    .unwrap();
    let child_pid = fake.pids()[0];
    assert!(alive(child_pid));

    sigterm_and_wait(&mut a, grace).await;
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.attempts, r.leased_by.as_deref()),
        ("pending", 0, None),
        "{r:?}"
    );
    assert!(r.run_after <= Utc::now());
    assert!(!alive(child_pid), "the dump tool was killed");
    assert!(objects(store.path()).is_empty());

    fake.set("ok");
    let (mut b, _) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-b",
        &["--once", "--only", "backups"],
        &[],
    );
    assert!(b.wait().await.unwrap().success());
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("succeeded", 1));
    assert_eq!(objects(store.path()).len(), 1);
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, pgrp, …
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

#[sqlx::test]
async fn sigterm_releases_a_backup_whose_tool_has_a_child_holding_its_pipes(pool: PgPool) {
    // A wrapper script whose child inherits stdout and stderr: killing the wrapper alone leaves
    // both pipes open, and waiting for stderr EOF would hang past the abort window.
    let fake = FakeTools::new("wrapper");
    let store = tempfile::tempdir().unwrap();
    let id = enqueue(&pool).await;
    let grace = Duration::from_secs(1);
    let (mut a, _) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-a",
        &[],
        &[("SHUTDOWN_GRACE", "1")],
    );
    wait_status(&pool, id, "running", Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "the wrapper and its child to start",
        || async { fake.pids().len() >= 2 },
    )
    .await
    .unwrap();
    let (wrapper, child) = (fake.pids()[0], fake.pids()[1]);
    assert!(alive(wrapper) && alive(child));
    assert_eq!(
        group_members(wrapper).len(),
        2,
        "the tool runs in its own group"
    );

    sigterm_and_wait(&mut a, grace).await;
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.attempts, r.leased_by.as_deref()),
        ("pending", 0, None),
        "released at once: {r:?}"
    );
    assert_eq!(
        group_members(wrapper),
        Vec::<u32>::new(),
        "no process of the group is left"
    );
    assert!(!alive(child));
    assert!(objects(store.path()).is_empty());
}

fn deps(pool: &PgPool, store: Arc<dyn ObjectStore>, tools: Tools, env: &[(&str, &str)]) -> Deps {
    let mut d = test_deps(pool.clone(), store, test_config(env).unwrap()).unwrap();
    d.tools = tools;
    d
}

fn ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("backups"),
    }
}

async fn take_over(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "UPDATE resource_backups SET leased_by = 'intruder', attempts = attempts + 1,
                lease_expires_at = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn a_stale_worker_cannot_finish_and_its_object_is_deleted(pool: PgPool) {
    let fake = FakeTools::new("gate");
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let id = enqueue(&pool).await;
    // A long lease: no renewal happens before the job ends, so only the final fence can notice.
    let d = deps(
        &pool,
        store.clone(),
        fake.tools(),
        &[("LEASE_SECONDS", "600")],
    );
    let backups = Backups::new(d);
    let worker = tokio::spawn({
        let b = backups.clone();
        async move { b.pass(&ctx()).await.unwrap() }
    });
    wait_status(&pool, id, "running", Duration::from_secs(10)).await;
    take_over(&pool, id).await;
    fake.open_gate();
    worker.await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.leased_by.as_deref(), r.attempts),
        ("running", Some("intruder"), 2),
        "{r:?}"
    );
    assert!(r.object_key.is_none());
    assert!(
        objects(dir.path()).is_empty(),
        "the stale worker's object was deleted"
    );
}

#[sqlx::test]
async fn losing_the_lease_stops_the_job(pool: PgPool) {
    let fake = FakeTools::new("gate");
    let s3 = S3Server::start().await.unwrap();
    let store = Arc::new(s3.store("backups").await.unwrap());
    let id = enqueue(&pool).await;
    let d = deps(
        &pool,
        store.clone(),
        fake.tools(),
        &[("LEASE_SECONDS", "2")],
    );
    let backups = Backups::new(d);
    let worker = tokio::spawn({
        let b = backups.clone();
        async move { b.pass(&ctx()).await.unwrap() }
    });
    wait_status(&pool, id, "running", Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(10),
        "the dump tool to start",
        || async { !fake.pids().is_empty() },
    )
    .await
    .unwrap();
    take_over(&pool, id).await;
    // The next renewal (every LEASE_SECONDS/3) finds the row gone and stops the job.
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("job stopped")
        .unwrap();
    let pid = *fake.pids().first().unwrap();
    assert!(!alive(pid), "the dump tool was killed");
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.leased_by.as_deref()),
        ("running", Some("intruder")),
        "untouched"
    );
    assert!(store.list("").await.unwrap().is_empty());
    assert!(
        store.list_incomplete_uploads("").await.unwrap().is_empty(),
        "upload aborted"
    );
}

#[sqlx::test]
async fn backup_timeout_kills_and_retries(pool: PgPool) {
    let fake = FakeTools::new("forever");
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let id = enqueue(&pool).await;
    // Long enough for bash to start and log its pid on a loaded machine.
    let d = deps(&pool, store, fake.tools(), &[("BACKUP_TIMEOUT", "3")]);
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref(), r.attempts),
        ("pending", Some("timeout"), 1),
        "{r:?}"
    );
    assert!(!alive(*fake.pids().first().unwrap()));
    assert!(objects(dir.path()).is_empty());
    assert!(d.metrics.render().contains(
        "instant_customer_backup_by_type_total{resource_type=\"postgres\",result=\"timeout\"} 1"
    ));
}

/// The recovery sweep, run against the database: expired leases go back to pending (or fail on
/// their last attempt) and started_at is never written.
#[sqlx::test]
async fn recovery_never_touches_started_at(pool: PgPool) {
    let started: DateTime<Utc> = "2026-11-22T01:02:03Z".parse().unwrap();
    let mut ids = Vec::new();
    for (attempts, expired) in [(1, true), (3, true), (2, false)] {
        let id = enqueue(&pool).await;
        sqlx::query(
            "UPDATE resource_backups SET status = 'running', attempts = $2, started_at = $3,
                    leased_by = 'dead-pod',
                    lease_expires_at = now() + CASE WHEN $4 THEN interval '-1 minute' ELSE interval '1 hour' END
              WHERE id = $1",
        )
        .bind(id)
        .bind(attempts)
        .bind(started)
        .bind(expired)
        .execute(&pool)
        .await
        .unwrap();
        ids.push(id);
    }
    let d = deps(
        &pool,
        Arc::new(backup_worker_testkit::MemoryStore::new()),
        Tools::default(),
        &[],
    );
    let recovered = Backups::new(d.clone()).recover_expired().await.unwrap();
    assert_eq!(recovered.len(), 2);

    let r = row(&pool, ids[0]).await;
    assert_eq!(
        (r.status.as_str(), r.attempts, r.leased_by.as_deref()),
        ("pending", 1, None)
    );
    assert!(r.run_after <= Utc::now());
    let r3 = row(&pool, ids[1]).await;
    assert_eq!(
        (r3.status.as_str(), r3.failure_reason.as_deref()),
        ("failed", Some("timeout")),
        "{r3:?}"
    );
    let audit: Vec<String> = sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1")
        .bind(ids[1])
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(audit, ["backup.failed"]);
    let (summary, audit_summary): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT b.error_summary, a.detail ->> 'error_summary'
           FROM resource_backups b JOIN audit_log a ON a.subject_id = b.id WHERE b.id = $1",
    )
    .bind(ids[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(summary, audit_summary);
    assert!(
        !summary.unwrap_or_default().contains("retry"),
        "a row failed for good never promises a retry"
    );
    let live = row(&pool, ids[2]).await;
    assert_eq!(
        (live.status.as_str(), live.leased_by.as_deref()),
        ("running", Some("dead-pod"))
    );
    for id in &ids {
        assert_eq!(
            row(&pool, *id).await.started_at,
            started,
            "started_at untouched"
        );
    }
    let text = d.metrics.render();
    assert!(text.contains("instant_customer_backup_stuck_recovered_total 2"));
    assert!(text.contains("instant_customer_backup_failed_total 1"));
    // A second sweep finds nothing.
    assert!(Backups::new(d).recover_expired().await.unwrap().is_empty());
}

/// A worker SIGKILLed between committing its object and recording the row (or mid-upload)
/// leaves storage no row will ever reference: the recovery of its expired lease deletes the
/// dead attempt's object and aborts its incomplete upload (found by the attempt's key stem), and
/// touches nothing of any other attempt.
#[sqlx::test]
async fn recovery_removes_a_dead_attempts_object_and_upload(pool: PgPool) {
    let started: DateTime<Utc> = "2026-11-22T01:02:03Z".parse().unwrap();
    let (team, res) = team_resource(&pool, "pro").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = backup_worker::commands::enqueue_backup(&pool, res)
            .await
            .unwrap();
        ids.push(id);
    }
    sqlx::query(
        "UPDATE resource_backups SET status = 'running', attempts = 1, started_at = $2,
                leased_by = 'dead-pod', lease_expires_at = now() - interval '1 second'
          WHERE id = $1",
    )
    .bind(ids[0])
    .bind(started)
    .execute(&pool)
    .await
    .unwrap();
    let store = Arc::new(backup_worker_testkit::MemoryStore::new());
    let key = |id, at, ext| backup_worker::loops::backups::object_key("", team, res, at, id, ext);
    // The dead attempt's committed object and another of its uploads, never finished.
    let committed = key(ids[0], started, "pgdump");
    backup_worker::storage::put_reader(store.as_ref(), &committed, &b"dump"[..], Metadata::new())
        .await
        .unwrap();
    let stuck = store
        .begin_upload(&format!("{committed}.age"), Metadata::new())
        .await
        .unwrap();
    // Another attempt of the same row (a second later) and another row: not the dead attempt's.
    let other_attempt = key(ids[0], started + chrono::Duration::seconds(1), "pgdump");
    let other_row = key(ids[1], started, "pgdump");
    for k in [&other_attempt, &other_row] {
        backup_worker::storage::put_reader(store.as_ref(), k, &b"x"[..], Metadata::new())
            .await
            .unwrap();
    }
    let d = deps(&pool, store.clone(), Tools::default(), &[]);
    let recovered = Backups::new(d).recover_expired().await.unwrap();
    assert_eq!(recovered.len(), 1);
    wait_until(
        Duration::from_secs(10),
        "the dead attempt's storage to be cleaned up",
        || async {
            store.list("").await.unwrap().len() == 2
                && store.list_incomplete_uploads("").await.unwrap().is_empty()
        },
    )
    .await
    .unwrap();
    let mut left: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    left.sort();
    let mut want = vec![other_attempt, other_row];
    want.sort();
    assert_eq!(left, want);
    drop(stuck);
}

async fn succeeded_backup(
    pool: &PgPool,
    store: &dyn ObjectStore,
    resource: Uuid,
    age_days: i64,
    with_object: bool,
) -> Uuid {
    let id = Uuid::new_v4();
    let key = format!("r/{resource}/{id}.pgdump.gz");
    if with_object {
        backup_worker::storage::put_reader(store, &key, &b"x"[..], Metadata::new())
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO resource_backups (id, resource_id, kind, status, created_at, started_at, finished_at,
                                       object_key, sha256, size_bytes)
         VALUES ($1, $2, 'scheduled', 'succeeded', $3, $3, $3, $4, 'x', 1)",
    )
    .bind(id)
    .bind(resource)
    .bind(Utc::now() - chrono::Duration::days(age_days) - chrono::Duration::hours(1))
    .bind(&key)
    .execute(pool)
    .await
    .unwrap();
    id
}

#[sqlx::test]
async fn retention_by_tier_with_keep_last(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let plans = backup_worker::plans::Plans::load(None).unwrap();
    let s = store.as_ref();

    // pro: 30 days, keep 3. Ages 1, 10, 40, 50, 60 → 40/50/60 are old but keep_last keeps 3.
    let (_, pro) = team_resource(&pool, "pro").await;
    let mut pro_ids = Vec::new();
    for age in [1, 10, 40, 50, 60] {
        pro_ids.push(succeeded_backup(&pool, s, pro, age, true).await);
    }
    // hobby: 7 days, keep 2. Ages 1, 8, 9, 30 → 9 and 30 go (8 is the 2nd newest), one object already gone.
    let (_, hobby) = team_resource(&pool, "hobby").await;
    let h1 = succeeded_backup(&pool, s, hobby, 1, true).await;
    let h8 = succeeded_backup(&pool, s, hobby, 8, true).await;
    let h9 = succeeded_backup(&pool, s, hobby, 9, true).await;
    let h30 = succeeded_backup(&pool, s, hobby, 30, false).await;
    // Old backup needed by a pending restore: kept whatever its age.
    let h40 = succeeded_backup(&pool, s, hobby, 40, true).await;
    sqlx::query("INSERT INTO resource_restores (resource_id, backup_id) VALUES ($1, $2)")
        .bind(hobby)
        .bind(h40)
        .execute(&pool)
        .await
        .unwrap();
    // A failed row and an unknown tier (default: 7 days, keep 2) with only two backups.
    let (_, other) = team_resource(&pool, "legacy_2019").await;
    let o1 = succeeded_backup(&pool, s, other, 20, true).await;
    let o2 = succeeded_backup(&pool, s, other, 25, true).await;

    let report = apply_retention(&pool, s, &plans, Utc::now()).await.unwrap();
    assert_eq!(
        (report.expired, report.delete_failed, report.incomplete),
        (4, 0, false),
        "{report:?}"
    );

    let status = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM resource_backups WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for id in &pro_ids[..3] {
        assert_eq!(status(*id).await, "succeeded");
    }
    assert_eq!(status(pro_ids[3]).await, "expired");
    assert_eq!(status(pro_ids[4]).await, "expired");
    assert_eq!(status(h1).await, "succeeded");
    assert_eq!(status(h8).await, "succeeded");
    assert_eq!(status(h9).await, "expired");
    assert_eq!(status(h30).await, "expired");
    assert_eq!(status(h40).await, "succeeded", "a pending restore reads it");
    assert_eq!(status(o1).await, "succeeded");
    assert_eq!(status(o2).await, "succeeded");
    // Four rows expired; one of them had no object left to delete.
    let remaining = store.list("r/").await.unwrap().len();
    assert_eq!(remaining, 11 - 3, "of eleven objects, three deleted");

    let again = apply_retention(&pool, s, &plans, Utc::now()).await.unwrap();
    assert_eq!(again.expired, 0, "idempotent");
}

async fn nothing_running() -> Result<Vec<String>, sqlx::Error> {
    Ok(Vec::new())
}

/// moto reports every incomplete upload as initiated in 2010 (a store's clock is not ours): a
/// replica's first orphan sweep — a replacement pod starting — must still never abort the upload
/// of an attempt running on another replica (it did: that backup failed `upload` with a retry an
/// hour's backoff away), only a dead attempt's.
#[sqlx::test]
async fn the_orphan_sweep_never_aborts_a_running_attempts_upload(pool: PgPool) {
    let (team, res) = team_resource(&pool, "pro").await;
    let id = backup_worker::commands::enqueue_backup(&pool, res)
        .await
        .unwrap();
    let started: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE resource_backups SET status = 'running', attempts = 1, started_at = now(),
                leased_by = 'other-pod', lease_expires_at = now() + interval '1 hour'
          WHERE id = $1 RETURNING started_at",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let s3 = S3Server::start().await.unwrap();
    let store = Arc::new(s3.store("backups").await.unwrap());
    let live_key = backup_worker::loops::backups::object_key("", team, res, started, id, "pgdump");
    let dead_key = backup_worker::loops::backups::object_key(
        "",
        team,
        res,
        started - chrono::Duration::minutes(5),
        id,
        "pgdump",
    );
    for key in [&live_key, &dead_key] {
        let mut up = store.begin_upload(key, Metadata::new()).await.unwrap();
        up.write(&vec![7u8; backup_worker::storage::S3_MIN_PART_SIZE + 1])
            .await
            .unwrap();
        std::mem::forget(up);
    }
    let d = deps(&pool, store.clone(), Tools::default(), &[]);
    Backups::new(d).pass(&ctx()).await.unwrap();
    let left: Vec<String> = store
        .list_incomplete_uploads("")
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.key)
        .collect();
    assert_eq!(left, [live_key]);
}

#[tokio::test]
async fn orphaned_uploads_older_than_a_day_are_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::new(dir.path().to_path_buf()).await.unwrap();
    // A crashed process: the upload is neither committed nor aborted nor dropped.
    let mut old = local
        .begin_upload("p/a/old.pgdump.gz", Metadata::new())
        .await
        .unwrap();
    old.write(b"partial").await.unwrap();
    std::mem::forget(old);
    let mut fresh = local
        .begin_upload("p/a/fresh.pgdump.gz", Metadata::new())
        .await
        .unwrap();
    fresh.write(b"partial").await.unwrap();
    std::mem::forget(fresh);
    for u in local.list_incomplete_uploads("p/").await.unwrap() {
        if u.key.ends_with("old.pgdump.gz") {
            let name = format!(".old.pgdump.gz.partial-{}", u.upload_id);
            let f = std::fs::File::options()
                .write(true)
                .open(dir.path().join("p/a").join(name))
                .unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 86400))
                .unwrap();
        }
    }
    let day = backup_worker::loops::backups::ORPHAN_UPLOAD_AGE;
    assert_eq!(
        abort_stale_uploads(&local, "p/", day, Utc::now(), nothing_running)
            .await
            .unwrap(),
        1
    );
    let left = local.list_incomplete_uploads("p/").await.unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0].key.ends_with("fresh.pgdump.gz"));

    let s3 = S3Server::start().await.unwrap();
    let store = s3.store("backups").await.unwrap();
    let mut up = store.begin_upload("p/x.gz", Metadata::new()).await.unwrap();
    up.write(&vec![7u8; backup_worker::storage::S3_MIN_PART_SIZE + 1])
        .await
        .unwrap();
    std::mem::forget(up);
    // moto reports every upload as initiated in 2010, so only the abort itself is checked here
    // (the age filter is checked on the local store above).
    assert_eq!(store.list_incomplete_uploads("p/").await.unwrap().len(), 1);
    assert_eq!(
        abort_stale_uploads(&store, "p/", day, Utc::now(), nothing_running)
            .await
            .unwrap(),
        1
    );
    assert!(store
        .list_incomplete_uploads("p/")
        .await
        .unwrap()
        .is_empty());
}

#[sqlx::test]
async fn sigterm_lets_jobs_that_finish_within_the_grace_finish(pool: PgPool) {
    let fake = FakeTools::new("gate");
    let store = tempfile::tempdir().unwrap();
    let id = enqueue(&pool).await;
    let (mut a, _) = daemon(
        &pool,
        &fake,
        store.path(),
        "pod-a",
        &[],
        &[("SHUTDOWN_GRACE", "10")],
    );
    wait_status(&pool, id, "running", Duration::from_secs(20)).await;
    wait_until(
        Duration::from_secs(10),
        "the dump tool to start",
        || async { !fake.pids().is_empty() },
    )
    .await
    .unwrap();
    let pid = a.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Still draining: the daemon waits for the running job.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a.try_wait().unwrap().is_none(),
        "exited before its job finished"
    );
    fake.open_gate();
    let status = tokio::time::timeout(Duration::from_secs(11), a.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("succeeded", 1), "{r:?}");
    assert_eq!(objects(store.path()).len(), 1);
}

/// A renewal that hangs (here the row is locked by another session, as a network partition would
/// stall it) stops the job before its lease runs out: once it has, another replica may take the
/// row over, and two workers must never run one row. Without the bound, the renewal waits for the
/// lock and the job runs on.
#[sqlx::test]
async fn a_renewal_that_hangs_stops_the_job_before_the_lease_runs_out(pool: PgPool) {
    let fake = FakeTools::new("gate");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let id = enqueue(&pool).await;
    let d = deps(&pool, store, fake.tools(), &[("LEASE_SECONDS", "4")]);
    let backups = Backups::new(d);
    let worker = tokio::spawn({
        let b = backups.clone();
        async move { b.pass(&ctx()).await.unwrap() }
    });
    wait_status(&pool, id, "running", Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(10),
        "the dump tool to start",
        || async { !fake.pids().is_empty() },
    )
    .await
    .unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM resource_backups WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let expires_when_locked = row(&pool, id).await.lease_expires_at.unwrap();
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("the job stopped while its renewal hung")
        .unwrap();
    let stopped_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let pid = *fake.pids().first().unwrap();
    assert!(!alive(pid), "the dump tool was killed");
    // Stopped no later than the lease it last held (plus scheduling slack on a loaded machine).
    assert!(
        stopped_at < expires_when_locked + chrono::Duration::seconds(1),
        "stopped at {stopped_at}, lease ran out at {expires_when_locked}"
    );
    lock.rollback().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("running", 1),
        "nothing recorded: {r:?}"
    );
    assert!(objects(dir.path()).is_empty());
}

/// A job that panics (a bug) ends its lease at once and leaves no renewer behind: the row is
/// recovered by the next sweep instead of staying `running`, its resource blocked, until the
/// process restarts.
#[sqlx::test]
async fn a_panicking_job_ends_its_lease_and_leaves_no_renewer_behind(pool: PgPool) {
    let id = enqueue(&pool).await;
    let claimer = jobs::Claimer::new(JobTable::Backups);
    let claimed = claimer
        .claim(
            &pool,
            &format!("SELECT id FROM resource_backups WHERE id = '{id}' FOR UPDATE SKIP LOCKED"),
            "test-worker",
            Duration::from_secs(2),
        )
        .await
        .unwrap()
        .expect("claimed");
    let first_expiry = row(&pool, id).await.lease_expires_at.unwrap();
    let ran = jobs::run_leased(&pool, &claimed.lease, Duration::from_secs(2), |_lost| {
        let pool = pool.clone();
        async move {
            // The renewer is alive while the job runs…
            wait_until(Duration::from_secs(10), "a renewal", || async {
                row(&pool, id).await.lease_expires_at.unwrap() > first_expiry
            })
            .await
            .unwrap();
            panic!("boom");
        }
    })
    .await;
    let panicked = match ran {
        Err(p) => p,
        Ok(()) => panic!("the job's panic was not reported"),
    };
    assert_eq!(panicked.0, "boom");
    jobs::after_panic(&pool, &claimed.lease, &panicked).await;
    let ended = row(&pool, id).await.lease_expires_at.unwrap();
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ended < now, "the lease was ended at once");
    // …and gone with it: over three renewal periods nothing extends the lease again.
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        assert_eq!(row(&pool, id).await.lease_expires_at, Some(ended));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = jobs::recover_and_audit(&pool, JobTable::Backups, "backup.failed")
        .await
        .unwrap();
    assert_eq!(recovered.len(), 1);
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("pending", 1), "{r:?}");
}

/// A TCP relay to `upstream` that loses the answer to the statement whose text contains `trigger`
/// (the server still executes and commits it) and then closes the connection: an answer lost
/// after commit, as in a Postgres restart or a broken connection.
async fn cutting_relay(upstream: std::net::SocketAddr, trigger: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                let mut armed = false;
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // sqlx prepares first (Parse + Describe, answered), then binds and executes:
                    // the answer to lose is the one to the first Bind after the trigger's Parse.
                    let cut = armed && buf[0] == b'B';
                    armed |= buf[..n].windows(trigger.len()).any(|w| w == trigger);
                    if cut {
                        // No answer reaches the client from here on.
                        down.abort();
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if cut {
                        // Keep relaying the rest of the exchange (bind, execute, sync) for a
                        // moment so the server runs and commits it, then close the connection.
                        let until = tokio::time::Instant::now() + Duration::from_millis(500);
                        while let Ok(Ok(n)) =
                            tokio::time::timeout_at(until, cr.read(&mut buf)).await
                        {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        tokio::time::sleep_until(until).await;
                        return;
                    }
                }
                down.abort();
            });
        }
    });
    port
}

/// A claim whose answer is lost after it committed is given back — pending, the attempt not
/// counted — at the next pass, instead of sitting `running` until its lease expires and then
/// counting an attempt that never ran.
#[sqlx::test]
async fn a_claim_whose_answer_is_lost_is_given_back_without_spending_an_attempt(pool: PgPool) {
    let fake = FakeTools::new("ok");
    let id = enqueue(&pool).await;
    let mut url = url::Url::parse(&db_url(&pool)).unwrap();
    let upstream: std::net::SocketAddr =
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap();
    let port = cutting_relay(upstream, b"claim_token = $3").await;
    url.set_port(Some(port)).unwrap();
    // In clear, so the relay can see the claim go by.
    url.query_pairs_mut().append_pair("sslmode", "disable");
    let relayed = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url.as_str())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let backups = Backups::new(deps(&relayed, store.clone(), fake.tools(), &[]));
    assert!(
        backups.claim().await.is_err(),
        "the claim's answer was lost"
    );
    // The server received the whole statement and commits it a moment after the client saw the
    // connection drop.
    wait_until(
        Duration::from_secs(10),
        "the lost claim to commit",
        || async { row(&pool, id).await.status == "running" },
    )
    .await
    .unwrap();
    assert_eq!(row(&pool, id).await.attempts, 1);
    // The next pass gives it back first (settling runs through the relay: only claims are cut),
    // then claims and runs it as attempt 1 — on a direct pool, as a reconnected worker would.
    backup_worker::jobs::Queue::housekeeping(backups.as_ref(), &Heartbeat::detached("test")).await;
    let direct = Backups::new(deps(&pool, store, fake.tools(), &[]));
    direct.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("succeeded", 1), "{r:?}");
}

/// When the store fails mid-stream, the row says `upload` (a temporary storage problem), not
/// `dump` ("we couldn't read your database"): the tool is stopped because of the store, and the
/// storage error is what is recorded.
#[sqlx::test]
async fn a_store_failing_mid_stream_is_recorded_as_upload_not_as_the_dump(pool: PgPool) {
    use sqlx::Executor;
    // ~40 MB of raw dump: several 5 MiB parts, far more than a pipe buffer.
    pool.execute(
        "CREATE TABLE bulk AS SELECT i, md5(i::text) || md5((i * 7)::text) AS t
           FROM generate_series(1, 500000) i",
    )
    .await
    .unwrap();
    let mut s3 = S3Server::start().await.unwrap();
    let store = Arc::new(s3.store("backups").await.unwrap());
    let (_, res) = team_resource(&pool, "pro").await;
    sqlx::query("UPDATE resources SET connection_url = $2 WHERE id = $1")
        .bind(res)
        .bind(db_url(&pool))
        .execute(&pool)
        .await
        .unwrap();
    let id = backup_worker::commands::enqueue_backup(&pool, res)
        .await
        .unwrap();
    let d = deps(&pool, store, Tools::default(), &[]);
    let worker = tokio::spawn({
        let b = Backups::new(d);
        async move { b.pass(&ctx()).await.unwrap() }
    });
    wait_status(&pool, id, "running", Duration::from_secs(10)).await;
    s3.kill().await;
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the attempt ended")
        .unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref()),
        ("pending", Some("upload")),
        "{r:?}"
    );
    assert!(
        r.internal_detail
            .as_deref()
            .unwrap_or("")
            .contains("object storage"),
        "the storage error is recorded: {r:?}"
    );
}
