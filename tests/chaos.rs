//! Chaos (issue 15): four replicas of the real binary against a control database on a private
//! Postgres server, real Postgres and Redis sources and one S3 store (moto). While they work, two
//! replicas are SIGKILLed with their tools (whole process groups), the control Postgres restarts
//! once and the S3 server freezes (SIGSTOP) for longer than a part upload takes, and so does the
//! copy destination (a second S3 server, issue 24). Every backup must end `succeeded` within its
//! attempts, with exactly one correct object in the store and one correct copy on the copy store,
//! and nothing a live replica started may be left behind on either.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{free_port, PgServer, RedisServer, S3Server, TEST_ACCESS_KEY};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");
const BUCKET: &str = "chaos";
const COPY_BUCKET: &str = "chaos-copies";
const COPY_PREFIX: &str = "second/";
const PREFIX: &str = "backups/";
const LEASE_SECONDS: u64 = 5;
const SHUTDOWN_GRACE: u64 = 3;
const SHUTDOWN_ABORT_WINDOW: u64 = 3;
const ROWS: usize = 102;
/// How long every row may take to become final, from the replicas' start.
const SETTLE_DEADLINE: Duration = Duration::from_secs(150);
/// Longer than a part upload takes: the store answers nothing for this long.
const FREEZE: Duration = Duration::from_secs(9);
/// How long the control database stays down: claims, renewals and results fail meanwhile, but a
/// lease (renewed every third of it) outlives it.
const CONTROL_DOWN: Duration = Duration::from_secs(3);

fn ppid_and_pgid(pid: u32) -> Option<(u32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp …: comm may hold spaces, so parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let _state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    Some((ppid, pgid))
}

/// Every live descendant of `root` (children, grandchildren, …).
fn descendants(root: u32) -> Vec<u32> {
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, ppid_and_pgid(pid)?.0)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &procs {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// One replica: the real binary in its own process group, its log in a file.
struct Replica {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
    killed: bool,
}

impl Replica {
    fn start(name: &str, env: &[(String, String)], logs: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut c = tokio::process::Command::new(BIN);
        c.args(["run", "--only", "backups,copies"])
            .env("WORKER_ID", name)
            .env(
                "METRICS_ADDR",
                format!("127.0.0.1:{}", free_port().unwrap()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap();
        let pid = child.id().unwrap();
        Self {
            name: name.to_owned(),
            child,
            pid,
            log,
            killed: false,
        }
    }

    /// kill -9 of the replica's process group and of every tool's group (each tool runs in its
    /// own): what a node losing the pod does.
    fn kill9(&mut self) {
        let own_group = rustix::process::getpgrp();
        let mut groups: HashSet<i32> = HashSet::from([self.pid as i32]);
        for d in descendants(self.pid) {
            if let Some((_, pgid)) = ppid_and_pgid(d) {
                groups.insert(pgid);
            }
        }
        for g in groups {
            if let Some(pgid) = rustix::process::Pid::from_raw(g) {
                if pgid != own_group {
                    let _ =
                        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                }
            }
        }
        self.killed = true;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        }
    }
}

/// Source databases on the shared server, dropped at the end (also on a failed assertion).
struct SourceDbs(Vec<String>);

impl Drop for SourceDbs {
    fn drop(&mut self) {
        for db in &self.0 {
            let _ = std::process::Command::new("dropdb")
                .args([
                    "--if-exists",
                    "--force",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .arg(db)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn shared_url(db: &str) -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(db);
    url.to_string()
}

/// Incompressible bytes (sha256 in counter mode): the dump is as big as the data.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(
            [seed.to_le_bytes(), i.to_le_bytes()].concat(),
        ));
        i += 1;
    }
    out.truncate(len);
    out
}

async fn fill_redis(r: &RedisServer, seed: u64, megabytes: usize) {
    let client = redis::Client::open(r.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    for i in 0..megabytes {
        let _: () = redis::cmd("SET")
            .arg(format!("blob:{i}"))
            .arg(noise(seed * 1000 + i as u64, 1 << 20))
            .query_async(&mut con)
            .await
            .unwrap();
    }
    r.populate(2000).await.unwrap();
}

/// A query that tolerates the control database being down (the restart): `None` on error.
async fn counts(pool: &PgPool) -> Option<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed')),
                count(*) FILTER (WHERE status = 'running')
           FROM resource_backups",
    )
    .fetch_one(pool)
    .await
    .ok()
}

async fn running_by(pool: &PgPool, worker: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups WHERE status = 'running' AND leased_by = $1",
    )
    .bind(worker)
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// Polls until `check` holds, failing the test (with the logs' location) at the deadline.
async fn until<F, Fut>(start: Instant, what: &str, logs: &Path, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while !check().await {
        assert!(
            start.elapsed() < SETTLE_DEADLINE,
            "timed out after {:?} waiting for {what}; replica logs in {}",
            start.elapsed(),
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sha256 of an object as the store returns it.
async fn sha256_of(store: &dyn ObjectStore, key: &str) -> String {
    let mut reader = store.get(key).await.unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            return hex::encode(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// The key prefix (`…/<stamp>-<id>.`) of an attempt that a killed replica held.
fn attempt_key_prefix(team: Uuid, resource: Uuid, started: DateTime<Utc>, id: Uuid) -> String {
    format!(
        "{PREFIX}{team}/{resource}/{}-{id}.",
        started.format("%Y%m%dT%H%M%SZ")
    )
}

/// Rows a just-killed replica held (nobody recovered them yet: their leases still run).
async fn attempts_held_by(pool: &PgPool, worker: &str) -> Vec<String> {
    let rows: Vec<(Uuid, Uuid, Uuid, DateTime<Utc>)> = loop {
        match sqlx::query_as(
            "SELECT b.id, b.resource_id, r.team_id, b.started_at
               FROM resource_backups b JOIN resources r ON r.id = b.resource_id
              WHERE b.status = 'running' AND b.leased_by = $1",
        )
        .bind(worker)
        .fetch_all(pool)
        .await
        {
            Ok(r) => break r,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    rows.into_iter()
        .map(|(id, res, team, started)| attempt_key_prefix(team, res, started, id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_kills_a_control_database_restart_and_a_frozen_store() {
    let logs = tempfile::Builder::new()
        .prefix("bw-chaos-logs-")
        .tempdir()
        .unwrap()
        .keep();

    // The control database, on a private server we may restart.
    let mut control = PgServer::start().await.unwrap();
    let control_url = control.create_database("control").await.unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&control_url)
        .await
        .unwrap();
    backup_worker::db::migrate(&pool).await.unwrap();

    // The store, and the copy destination (another S3-protocol server, DESIGN §13).
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store(BUCKET).await.unwrap();
    let copy_s3 = S3Server::start().await.unwrap();
    let copy_store = copy_s3.store(COPY_BUCKET).await.unwrap();

    // Sources: Postgres databases on the shared server (~1.3 MB dumps), Redis servers with
    // incompressible data (1.5 MB, and 10 MB: two multipart parts).
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let sources = SourceDbs((0..6).map(|i| format!("chaos_{tag}_{i}")).collect());
    let mut admin = PgConnection::connect(&shared_url("postgres"))
        .await
        .unwrap();
    let mut pg_urls = Vec::new();
    for db in &sources.0 {
        admin
            .execute(format!("CREATE DATABASE \"{db}\"").as_str())
            .await
            .unwrap();
        let url = shared_url(db);
        let mut c = PgConnection::connect(&url).await.unwrap();
        c.execute(
            "CREATE TABLE t AS SELECT g AS id, md5(random()::text) AS v
               FROM generate_series(1, 30000) g",
        )
        .await
        .unwrap();
        c.close().await.unwrap();
        pg_urls.push(url);
    }
    let medium = [
        RedisServer::start(None).await.unwrap(),
        RedisServer::start(None).await.unwrap(),
    ];
    let heavy = RedisServer::start(None).await.unwrap();
    fill_redis(&medium[0], 1, 2).await;
    fill_redis(&medium[1], 2, 2).await;
    fill_redis(&heavy, 3, 10).await;

    // 41 resources (30 Postgres, 8 medium Redis, 3 heavy Redis), ROWS manual backups over them.
    let mut resource_urls: Vec<(&str, String)> = Vec::new();
    for i in 0..30 {
        resource_urls.push(("postgres", pg_urls[i % pg_urls.len()].clone()));
    }
    for i in 0..8 {
        resource_urls.push(("redis", medium[i % 2].url()));
    }
    for _ in 0..3 {
        resource_urls.push(("redis", heavy.url()));
    }
    let mut resources = Vec::new();
    let mut heavy_resources = Vec::new();
    for (kind, url) in &resource_urls {
        let team: Uuid =
            sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
                .fetch_one(&pool)
                .await
                .unwrap();
        let res: Uuid = sqlx::query_scalar(
            "INSERT INTO resources (team_id, resource_type, connection_url)
             VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(team)
        .bind(kind)
        .bind(url)
        .fetch_one(&pool)
        .await
        .unwrap();
        if *url == heavy.url() {
            heavy_resources.push(res);
        }
        resources.push(res);
    }
    for i in 0..ROWS {
        backup_worker::commands::enqueue_backup(&pool, resources[i % resources.len()])
            .await
            .unwrap();
    }

    let env: Vec<(String, String)> = [
        ("DATABASE_URL", control_url.as_str()),
        ("STORAGE_URL", &format!("s3://{BUCKET}/{PREFIX}")),
        ("S3_ENDPOINT", &s3.endpoint),
        ("S3_REGION", "us-east-1"),
        ("S3_FORCE_PATH_STYLE", "true"),
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("LOG_FORMAT", "json"),
        ("LEASE_SECONDS", &LEASE_SECONDS.to_string()),
        ("SHUTDOWN_GRACE", &SHUTDOWN_GRACE.to_string()),
        ("SHUTDOWN_ABORT_WINDOW", &SHUTDOWN_ABORT_WINDOW.to_string()),
        ("BACKUP_CONCURRENCY", "2"),
        (
            "COPY_STORAGE_URL",
            &format!("s3://{COPY_BUCKET}/{COPY_PREFIX}"),
        ),
        ("COPY_S3_ENDPOINT", &copy_s3.endpoint),
        ("COPY_S3_FORCE_PATH_STYLE", "true"),
        ("COPY_AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
        ("COPY_AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();

    let start = Instant::now();
    let say = |what: &str| println!("[{:6.2}s] {what}", start.elapsed().as_secs_f64());
    let mut replicas: Vec<Replica> = (1..=4)
        .map(|i| Replica::start(&format!("chaos-{i}"), &env, &logs))
        .collect();
    // Key prefixes of the attempts the killed replicas held: the only ones allowed to leave
    // anything behind (a SIGKILLed process cleans up nothing).
    let mut killed_attempts: Vec<String> = Vec::new();

    // 1. kill -9 a replica mid-work.
    let final_at_least = |n: i64| {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move { counts(&pool).await.is_some_and(|(f, _)| f >= n) }
        }
    };
    until(start, "chaos-1 to run jobs", &logs, || {
        running_by(&pool, "chaos-1").map(|n| n >= 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await; // mid-dump, mid-upload
    replicas[0].kill9();
    killed_attempts.extend(attempts_held_by(&pool, "chaos-1").await);
    say(&format!(
        "kill -9 chaos-1 (held {} attempts)",
        killed_attempts.len()
    ));
    replicas.push(Replica::start("chaos-5", &env, &logs));

    // 2. The copy destination down (frozen) for a while, then the control database restarted,
    //    while jobs run.
    until(start, "15 final rows", &logs, final_at_least(15)).await;
    say("freezing the copy store");
    copy_s3.freeze(true);
    until(start, "20 final rows", &logs, final_at_least(20)).await;
    tokio::time::sleep(FREEZE).await;
    copy_s3.freeze(false);
    say("copy store thawed");
    say(&format!(
        "restarting the control Postgres ({:?})",
        counts(&pool).await
    ));
    control.restart(CONTROL_DOWN).await.unwrap();
    say("control Postgres back");

    // 3. Freeze the store for longer than a part upload takes, while a heavy object uploads if
    //    one is running.
    until(start, "45 final rows", &logs, final_at_least(45)).await;
    until(start, "a 10 MB Redis backup to run", &logs, || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM resource_backups WHERE status = 'running' AND resource_id = ANY($1)",
        )
        .bind(&heavy_resources)
        .fetch_one(&pool)
        .map(|n| n.is_ok_and(|n| n > 0))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // into its multipart upload
    say(&format!(
        "freezing S3 for {FREEZE:?} ({:?})",
        counts(&pool).await
    ));
    s3.freeze(true);
    tokio::time::sleep(FREEZE).await;
    s3.freeze(false);
    say("S3 thawed");

    // 4. kill -9 another replica mid-work.
    until(start, "chaos-2 to run jobs", &logs, || {
        running_by(&pool, "chaos-2").map(|n| n >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[1].kill9();
    let held = attempts_held_by(&pool, "chaos-2").await;
    say(&format!("kill -9 chaos-2 (held {} attempts)", held.len()));
    killed_attempts.extend(held);
    replicas.push(Replica::start("chaos-6", &env, &logs));

    // Every row final.
    until(start, "every row final", &logs, final_at_least(ROWS as i64)).await;
    let settle = start.elapsed();
    say("every row final");
    println!(
        "CHAOS SETTLE TIME: {:.1} s for {ROWS} backups",
        settle.as_secs_f64()
    );

    // The copies catch up while the survivors run (the copies loop passes every 30 s).
    let copies_done = Instant::now();
    let copies: Vec<(Uuid, String, String)> = loop {
        let copies: Vec<(Uuid, String, String)> = sqlx::query_as(
            "SELECT backup_id, object_key, sha256 FROM backup_copies
              WHERE destination = 'copy' AND status = 'succeeded'",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let incomplete = copy_store
            .list_incomplete_uploads(COPY_PREFIX)
            .await
            .map(|u| u.len())
            .unwrap_or(usize::MAX);
        if (copies.len() == ROWS && incomplete == 0)
            || copies_done.elapsed() > Duration::from_secs(240)
        {
            break copies;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Survivors exit 0 on SIGTERM within SHUTDOWN_GRACE + SHUTDOWN_ABORT_WINDOW + slack.
    let limit = Duration::from_secs(SHUTDOWN_GRACE + SHUTDOWN_ABORT_WINDOW + 3);
    for r in replicas.iter_mut() {
        if r.killed {
            let _ = r.child.wait().await;
            continue;
        }
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "{} exited on its own; log: {}",
            r.name,
            r.log.display()
        );
        let pid = rustix::process::Pid::from_raw(r.pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }
    let stopping = Instant::now();
    for r in replicas.iter_mut().filter(|r| !r.killed) {
        let left = limit.saturating_sub(stopping.elapsed());
        let status = tokio::time::timeout(left, r.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", r.name))
            .unwrap();
        assert!(
            status.success(),
            "{}: {status:?}; log: {}",
            r.name,
            r.log.display()
        );
    }

    // Every row succeeded within its attempts.
    type Final = (
        Uuid,
        String,
        i32,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<Final> = sqlx::query_as(
        "SELECT id, status, attempts, object_key, size_bytes, sha256 FROM resource_backups",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), ROWS);
    let bad: Vec<_> = rows
        .iter()
        .filter(|r| r.1 != "succeeded" || r.2 > 3)
        .collect();
    assert!(
        bad.is_empty(),
        "rows not succeeded within 3 attempts: {bad:?}"
    );
    let max_attempts = rows.iter().map(|r| r.2).max().unwrap_or(0);
    let retried = rows.iter().filter(|r| r.2 > 1).count();
    say(&format!(
        "{retried} rows needed more than one attempt (at most {max_attempts})"
    ));

    // Exactly one object per row, with the row's size and sha256; nothing else.
    let objects: BTreeMap<String, u64> = store
        .list(PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let referenced: HashMap<&str, &Final> =
        rows.iter().map(|r| (r.3.as_deref().unwrap(), r)).collect();
    assert_eq!(referenced.len(), ROWS, "object keys are unique per row");
    for (key, row) in &referenced {
        let size = objects
            .get(*key)
            .unwrap_or_else(|| panic!("row {} points at a missing object {key}", row.0));
        assert_eq!(Some(*size as i64), row.4, "size of {key}");
        assert_eq!(Some(sha256_of(&store, key).await), row.5, "sha256 of {key}");
    }
    // Nothing else: no object that no row references, no incomplete upload. Live replicas abort
    // every upload they give up and delete every object they cannot record; a SIGKILLed
    // replica's attempt (uploading, or committed but not recorded) is cleaned up by whoever
    // recovers its expired lease — in the background, so poll briefly for it.
    let by_killed = |key: &str| killed_attempts.iter().any(|p| key.starts_with(p.as_str()));
    let cleaned = Instant::now();
    let (orphans, incomplete) = loop {
        let orphans: Vec<String> = store
            .list(PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !referenced.contains_key(k.as_str()))
            .collect();
        let incomplete: Vec<String> = store
            .list_incomplete_uploads(PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.key)
            .collect();
        if (orphans.is_empty() && incomplete.is_empty())
            || cleaned.elapsed() > Duration::from_secs(20)
        {
            break (orphans, incomplete);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let live_orphans: Vec<&String> = orphans.iter().filter(|k| !by_killed(k)).collect();
    assert!(
        live_orphans.is_empty(),
        "objects no row references, left by LIVE replicas: {live_orphans:?}; logs in {}",
        logs.display()
    );
    assert!(
        orphans.is_empty(),
        "objects of SIGKILLed replicas' attempts not removed by the lease recovery: {orphans:?}"
    );
    let live_incomplete: Vec<&String> = incomplete.iter().filter(|k| !by_killed(k)).collect();
    assert!(
        live_incomplete.is_empty(),
        "incomplete uploads left by LIVE replicas: {live_incomplete:?}; logs in {}",
        logs.display()
    );
    assert!(
        incomplete.is_empty(),
        "incomplete uploads of SIGKILLed replicas' attempts not aborted by the lease recovery: {incomplete:?}"
    );

    // Every backup ends protected: one succeeded copy each, under the copy prefix, byte-for-byte
    // (sha256), and nothing else on the copy store — no object without a copy, no incomplete
    // upload (a SIGKILLed replica's is aborted by whoever recovers its copy's lease). The copies
    // loop passes every 30 s, so this is polled with a deadline.
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status || coalesce(' ' || failure_reason, ''), count(*) FROM backup_copies GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(copies.len(), ROWS, "every backup protected: {states:?}");
    say(&format!("every backup copied ({states:?})"));
    let copy_objects: BTreeMap<String, u64> = copy_store
        .list(COPY_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let by_backup: HashMap<Uuid, &Final> = rows.iter().map(|r| (r.0, r)).collect();
    for (backup, key, sha) in &copies {
        let row = by_backup[backup];
        assert!(key.starts_with(COPY_PREFIX), "{key}");
        assert_eq!(
            copy_objects.get(key).map(|s| *s as i64),
            row.4,
            "the copy of {backup} at {key}"
        );
        assert_eq!(Some(sha), row.5.as_ref());
        assert_eq!(
            &sha256_of(&copy_store, key).await,
            sha,
            "sha256 of the copy {key}"
        );
    }
    assert_eq!(
        copy_objects.len(),
        ROWS,
        "nothing on the copy store but the copies: {:?}",
        copy_objects
            .keys()
            .filter(|k| !copies.iter().any(|c| &c.1 == *k))
            .collect::<Vec<_>>()
    );
    let copy_incomplete = copy_store
        .list_incomplete_uploads(COPY_PREFIX)
        .await
        .unwrap();
    assert!(
        copy_incomplete.is_empty(),
        "incomplete uploads on the copy store: {copy_incomplete:?}"
    );

    // Exactly one backup.succeeded audit row per backup, no backup.failed.
    let audits: Vec<(Option<Uuid>, String, i64)> = sqlx::query_as(
        "SELECT subject_id, kind, count(*) FROM audit_log
          WHERE kind LIKE 'backup.%' GROUP BY subject_id, kind",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let succeeded: HashMap<Uuid, i64> = audits
        .iter()
        .filter(|a| a.1 == "backup.succeeded")
        .filter_map(|a| Some((a.0?, a.2)))
        .collect();
    for row in &rows {
        assert_eq!(
            succeeded.get(&row.0),
            Some(&1),
            "backup.succeeded audit rows of {}",
            row.0
        );
    }
    let others: Vec<_> = audits
        .iter()
        .filter(|a| a.1 != "backup.succeeded")
        .collect();
    assert!(others.is_empty(), "other backup audit rows: {others:?}");

    drop(admin);
    drop(sources);
    if std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
        println!("replica logs in {}", logs.display());
    } else {
        let _ = std::fs::remove_dir_all(&logs);
    }
}
