//! Backups (DESIGN §5) on real parts: a private Postgres with password auth and real pg_dump,
//! a private redis-server with requirepass and real redis-cli, the S3-protocol server and the
//! local store; a fake mongodump (no MongoDB can run here) that behaves like the real one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::process::Tools;
use backup_worker::storage::{LocalStore, ObjectStore};
use backup_worker_testkit::{test_config, test_deps, PgServer, RedisServer, S3Server};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    run_after: DateTime<Utc>,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    object_key: Option<String>,
    size_bytes: Option<i64>,
    raw_bytes: Option<i64>,
    sha256: Option<String>,
    failure_reason: Option<String>,
    error_summary: Option<String>,
    internal_detail: Option<String>,
    leased_by: Option<String>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT status, attempts, run_after, started_at, finished_at, object_key, size_bytes,
                raw_bytes, sha256, failure_reason, error_summary, internal_detail, leased_by
           FROM resource_backups WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn resource(pool: &PgPool, resource_type: &str, url: &str) -> (Uuid, Uuid) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(pool)
            .await
            .unwrap();
    let resource: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(resource_type)
    .bind(url)
    .fetch_one(pool)
    .await
    .unwrap();
    (team, resource)
}

async fn enqueue(pool: &PgPool, resource: Uuid) -> Uuid {
    backup_worker::commands::enqueue_backup(pool, resource)
        .await
        .unwrap()
}

fn deps(pool: &PgPool, store: Arc<dyn ObjectStore>, tools: Tools, env: &[(&str, &str)]) -> Deps {
    let mut d = test_deps(pool.clone(), store, test_config(env).unwrap()).unwrap();
    d.tools = tools;
    d
}

async fn pass(deps: &Deps) {
    let backups = Backups::new(deps.clone());
    let ctx = PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("backups"),
    };
    backups.pass(&ctx).await.unwrap();
}

async fn object_bytes(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let mut r = store.get(key).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

async fn audit_kinds(pool: &PgPool, subject: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1 ORDER BY id")
        .bind(subject)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A source database with some data in it.
async fn source_db(server: &PgServer) -> String {
    let url = server
        .create_database(&format!("src_{}", Uuid::new_v4().simple()))
        .await
        .unwrap();
    use sqlx::{Connection, Executor};
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    c.execute(
        "CREATE TABLE orders (id serial PRIMARY KEY, customer text, total numeric, note text);
         INSERT INTO orders (customer, total, note)
              SELECT 'customer ' || i, i * 1.5, repeat('x', i % 50) FROM generate_series(1, 5000) i;
         CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 100;",
    )
    .await
    .unwrap();
    url
}

/// The succeeded row's object matches the row, and pg_restore can list it.
async fn assert_pg_backup(
    pool: &PgPool,
    store: &dyn ObjectStore,
    id: Uuid,
    team: Uuid,
    resource: Uuid,
) {
    let r = row(pool, id).await;
    assert_eq!(r.status, "succeeded", "{r:?}");
    assert_eq!(r.attempts, 1);
    assert!(r.started_at <= r.finished_at.unwrap());
    let key = r.object_key.clone().unwrap();
    assert!(key.starts_with(&format!("{team}/{resource}/")), "{key}");
    assert!(key.ends_with(&format!("-{id}.pgdump.gz")), "{key}");
    let bytes = object_bytes(store, &key).await;
    assert_eq!(r.size_bytes, Some(bytes.len() as i64));
    assert_eq!(
        r.sha256.as_deref(),
        Some(hex::encode(Sha256::digest(&bytes)).as_str())
    );
    let raw = gunzip(&bytes);
    assert_eq!(r.raw_bytes, Some(raw.len() as i64));
    assert!(raw.starts_with(b"PGDMP"));
    let (_, meta) = store.head(&key).await.unwrap();
    assert_eq!(meta.get("sha256"), r.sha256.as_ref());
    assert_eq!(
        meta.get("resource-type").map(String::as_str),
        Some("postgres")
    );

    let mut child = std::process::Command::new("pg_restore")
        .arg("--list")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &raw));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("TABLE public orders") && listing.contains("VIEW public big_orders"),
        "{listing}"
    );
    assert_eq!(audit_kinds(pool, id).await, ["backup.succeeded"]);
}

#[sqlx::test]
async fn postgres_backup_through_s3_and_the_local_store(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();

    let url = source_db(&pg).await;
    let (team, res) = resource(&pool, "postgres", &url).await;

    let s3_store: Arc<dyn ObjectStore> = Arc::new(s3.store("backups").await.unwrap());
    let d = deps(
        &pool,
        s3_store.clone(),
        Tools::default(),
        &[("STORAGE_URL", "s3://backups")],
    );
    let id = enqueue(&pool, res).await;
    pass(&d).await;
    assert_pg_backup(&pool, s3_store.as_ref(), id, team, res).await;
    let text = d.metrics.render();
    assert!(text.contains("instant_customer_backup_succeeded_total 1"));
    assert!(text.contains(
        "instant_customer_backup_by_type_total{resource_type=\"postgres\",result=\"ok\"} 1"
    ));

    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let d = deps(&pool, local.clone(), Tools::default(), &[]);
    let id = enqueue(&pool, res).await;
    pass(&d).await;
    assert_pg_backup(&pool, local.as_ref(), id, team, res).await;
}

#[sqlx::test]
async fn postgres_failures_are_classified(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let url = source_db(&pg).await;
    let wrong = url.replace(&pg.password, "wrong-password-zz9");
    let store: Arc<dyn ObjectStore> = Arc::new(backup_worker_testkit::MemoryStore::new());
    let d = deps(&pool, store.clone(), Tools::default(), &[]);

    let (_, auth_res) = resource(&pool, "postgres", &wrong).await;
    let auth = enqueue(&pool, auth_res).await;
    let closed = format!(
        "postgres://postgres:pw@127.0.0.1:{}/db",
        backup_worker_testkit::free_port().unwrap()
    );
    let (_, closed_res) = resource(&pool, "vector", &closed).await;
    let unreachable = enqueue(&pool, closed_res).await;
    let (_, mysql_res) = resource(&pool, "mysql", "mysql://u:p@h/db").await;
    let unsupported: Uuid =
        sqlx::query_scalar("INSERT INTO resource_backups (resource_id) VALUES ($1) RETURNING id")
            .bind(mysql_res)
            .fetch_one(&pool)
            .await
            .unwrap();
    let (_, bad_res) = resource(&pool, "postgres", "postgres://u:p@h:notaport/db").await;
    let bad_url = enqueue(&pool, bad_res).await;
    let before = Utc::now();
    pass(&d).await;

    let r = row(&pool, auth).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref()),
        ("failed", Some("auth")),
        "{r:?}"
    );
    assert_eq!(
        r.error_summary.as_deref(),
        Some(backup_worker::domain::FailureReason::Auth.customer_summary())
    );
    assert!(
        r.internal_detail
            .as_deref()
            .unwrap()
            .contains("password authentication failed"),
        "{r:?}"
    );
    assert!(!r
        .internal_detail
        .as_deref()
        .unwrap()
        .contains("wrong-password-zz9"));
    assert!(r.finished_at.is_some());
    assert_eq!(audit_kinds(&pool, auth).await, ["backup.failed"]);

    let r = row(&pool, unreachable).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref(), r.attempts),
        ("pending", Some("unreachable"), 1),
        "{r:?}"
    );
    assert!(
        r.run_after >= before + chrono::Duration::seconds(55),
        "retried after a minute: {r:?}"
    );
    assert!(r.leased_by.is_none() && r.finished_at.is_none());
    assert!(
        audit_kinds(&pool, unreachable).await.is_empty(),
        "not finished yet"
    );

    for id in [unsupported, bad_url] {
        let r = row(&pool, id).await;
        assert_eq!(
            (r.status.as_str(), r.failure_reason.as_deref()),
            ("failed", Some("config")),
            "{r:?}"
        );
    }
    assert!(store.list("").await.unwrap().is_empty());
    let text = d.metrics.render();
    assert!(
        text.contains("instant_customer_backup_failed_total 3"),
        "{text}"
    );
    assert!(text.contains(
        "instant_customer_backup_by_type_total{resource_type=\"vector\",result=\"unreachable\"} 1"
    ));
    assert!(text.contains(
        "instant_customer_backup_by_type_total{resource_type=\"postgres\",result=\"auth\"} 1"
    ));
}

#[sqlx::test]
async fn redis_backup_with_requirepass_and_a_wrong_password(pool: PgPool) {
    let redis = RedisServer::start(Some("redis-pw-5d1")).await.unwrap();
    redis.populate(200).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let d = deps(&pool, store.clone(), Tools::default(), &[]);
    let (_, ok_res) = resource(&pool, "redis", &redis.url()).await;
    let ok = enqueue(&pool, ok_res).await;
    let (_, bad_res) = resource(&pool, "redis", &redis.url().replace("redis-pw-5d1", "nope")).await;
    let bad = enqueue(&pool, bad_res).await;
    pass(&d).await;

    let r = row(&pool, ok).await;
    assert_eq!(r.status, "succeeded", "{r:?}");
    assert!(r.object_key.as_deref().unwrap().ends_with(".rdb.gz"));
    let raw = gunzip(&object_bytes(store.as_ref(), r.object_key.as_deref().unwrap()).await);
    assert!(raw.starts_with(b"REDIS"));
    assert!(
        raw.windows(8)
            .any(|w| w == b"key:199\0" || w.starts_with(b"key:199")),
        "the RDB holds the keys"
    );

    let r = row(&pool, bad).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref()),
        ("failed", Some("auth")),
        "{r:?}"
    );
    assert!(r.internal_detail.as_deref().unwrap().contains("WRONGPASS"));
}

/// Copies the fixtures into a private directory so each test has its own call log.
fn fixture_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["fake-mongodump", "fake-pg_dump", "record-exec"] {
        std::fs::copy(Path::new(FIXTURES).join(f), dir.path().join(f)).unwrap();
    }
    // The real archive fake-pg_dump writes (whole or cut).
    std::fs::copy(
        Path::new(FIXTURES).join("fake-pg_dump.pgdump"),
        dir.path().join("dump.pgdump"),
    )
    .unwrap();
    dir
}

#[sqlx::test]
async fn mongodb_through_the_fake_mongodump(pool: PgPool) {
    let fx = fixture_dir();
    let tools = Tools::default().with_override("mongodump", fx.path().join("fake-mongodump"));
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let d = deps(&pool, store.clone(), tools, &[]);
    let (_, ok_res) = resource(
        &pool,
        "mongodb",
        "mongodb+srv://app:mongo-pw-77@cluster0.example.net/shop?authSource=admin",
    )
    .await;
    let ok = enqueue(&pool, ok_res).await;
    let (_, auth_res) = resource(
        &pool,
        "mongodb",
        "mongodb://app:mongo-pw-77@auth-fail:27017/shop",
    )
    .await;
    let auth = enqueue(&pool, auth_res).await;
    let (_, down_res) = resource(
        &pool,
        "mongodb",
        "mongodb://app:mongo-pw-77@unreachable:27017/shop",
    )
    .await;
    let down = enqueue(&pool, down_res).await;
    pass(&d).await;

    let r = row(&pool, ok).await;
    assert_eq!(r.status, "succeeded", "{r:?}");
    assert!(r.object_key.as_deref().unwrap().ends_with(".archive.gz"));
    let raw = gunzip(&object_bytes(store.as_ref(), r.object_key.as_deref().unwrap()).await);
    assert_eq!(&raw[..4], &[0x6d, 0xe2, 0x99, 0x81]);
    assert_eq!(
        row(&pool, auth).await.failure_reason.as_deref(),
        Some("auth")
    );
    let r = row(&pool, down).await;
    assert_eq!(
        (r.status.as_str(), r.failure_reason.as_deref()),
        ("pending", Some("unreachable"))
    );

    // The fake saw a 0600 config file, no credentials in argv, and the file is gone now.
    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap();
    assert_eq!(calls.lines().count(), 3, "{calls}");
    for line in calls.lines() {
        assert!(line.contains("mode=600"), "{line}");
        assert!(
            !line.contains("mongo-pw-77") && !line.contains("ARGV-LEAK"),
            "{line}"
        );
        let path = line
            .split_whitespace()
            .next()
            .unwrap()
            .strip_prefix("config=")
            .unwrap();
        assert!(
            !Path::new(path).exists(),
            "{path} must be removed after the run"
        );
    }
}

#[sqlx::test]
async fn failing_truncated_and_foreign_streams_leave_no_object(pool: PgPool) {
    let s3 = S3Server::start().await.unwrap();
    let store = Arc::new(s3.store("backups").await.unwrap());
    let fx = fixture_dir();
    let tools = Tools::default().with_override("pg_dump", fx.path().join("fake-pg_dump"));
    let d = deps(
        &pool,
        store.clone(),
        tools,
        &[("STORAGE_URL", "s3://backups/p")],
    );
    let (_, res) = resource(&pool, "postgres", "postgres://u:p@127.0.0.1/db").await;

    for (behaviour, status, reason) in [
        ("midway-fail", "pending", "dump"),
        ("truncated", "failed", "sanity"),
        ("wrong-magic", "failed", "sanity"),
    ] {
        std::fs::write(fx.path().join("behaviour"), behaviour).unwrap();
        let id = enqueue(&pool, res).await;
        pass(&d).await;
        let r = row(&pool, id).await;
        assert_eq!(
            (r.status.as_str(), r.failure_reason.as_deref()),
            (status, Some(reason)),
            "{behaviour}: {r:?}"
        );
        assert!(r.object_key.is_none());
        assert!(
            store.list("").await.unwrap().is_empty(),
            "{behaviour}: no object"
        );
        assert!(
            store.list_incomplete_uploads("").await.unwrap().is_empty(),
            "{behaviour}: no parts left"
        );
        let raw_uploads = store
            .client()
            .list_multipart_uploads()
            .bucket("backups")
            .send()
            .await
            .unwrap();
        assert!(raw_uploads.uploads.unwrap_or_default().is_empty());
        // Park the retried row so the next case runs alone.
        sqlx::query("UPDATE resource_backups SET status = 'failed' WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
    }
}

#[sqlx::test]
async fn two_workers_fifty_rows_ten_resources(pool: PgPool) {
    let fx = fixture_dir();
    std::fs::write(fx.path().join("behaviour"), "slow").unwrap();
    let tools = Tools::default().with_override("pg_dump", fx.path().join("fake-pg_dump"));
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let mut resources = Vec::new();
    for _ in 0..10 {
        resources.push(
            resource(&pool, "postgres", "postgres://u:p@127.0.0.1/db")
                .await
                .1,
        );
    }
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(enqueue(&pool, resources[i % 10]).await);
    }
    let w1 = deps(
        &pool,
        store.clone(),
        tools.clone(),
        &[("WORKER_ID", "w1"), ("BACKUP_CONCURRENCY", "4")],
    );
    let w2 = deps(
        &pool,
        store.clone(),
        tools,
        &[("WORKER_ID", "w2"), ("BACKUP_CONCURRENCY", "4")],
    );
    let stop = CancellationToken::new();
    let monitor = {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max_running = 0i64;
            while !stop.is_cancelled() {
                let worst: Option<i64> = sqlx::query_scalar(
                    "SELECT max(n) FROM (SELECT count(*) AS n FROM resource_backups
                      WHERE status = 'running' GROUP BY resource_id) s",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                max_running = max_running.max(worst.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            max_running
        })
    };
    tokio::join!(pass(&w1), pass(&w2));
    stop.cancel();
    assert_eq!(
        monitor.await.unwrap(),
        1,
        "never two running backups of one resource"
    );
    let mut by_worker = std::collections::HashMap::<String, usize>::new();
    for id in &ids {
        let r = row(&pool, *id).await;
        assert_eq!((r.status.as_str(), r.attempts), ("succeeded", 1), "{r:?}");
        *by_worker.entry(r.leased_by.unwrap()).or_default() += 1;
    }
    assert_eq!(
        store.list("").await.unwrap().len(),
        50,
        "one object per row"
    );
    assert_eq!(by_worker.len(), 2, "both workers took rows: {by_worker:?}");
    let audits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE kind = 'backup.succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audits, 50);
}

/// Sentinel passwords per engine never reach a child's argv, the logs, or the rows — checked
/// on the real binary, with recorders in front of the real tools on PATH.
#[sqlx::test]
async fn secrets_stay_out_of_argv_logs_and_rows(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let redis = RedisServer::start(Some("sentinel-redis-4242"))
        .await
        .unwrap();
    redis.populate(100).await.unwrap();
    let fx = fixture_dir();
    let wrappers: PathBuf = fx.path().join("bin");
    std::fs::create_dir(&wrappers).unwrap();
    for tool in ["pg_dump", "redis-cli", "mongodump"] {
        std::fs::copy(fx.path().join("record-exec"), wrappers.join(tool)).unwrap();
    }
    std::fs::copy(
        fx.path().join("fake-mongodump"),
        wrappers.join("real-mongodump"),
    )
    .unwrap();

    // pg: the real password is a sentinel too (the server was started with it).
    let pg_url = source_db(&pg).await;
    let pg_wrong = pg_url.replace(&pg.password, "sentinel-pg-wrong-9911");
    let mongo = "mongodb://app:sentinel-mongo-5151@auth-fail:27017/shop";
    let redis_wrong = redis
        .url()
        .replace("sentinel-redis-4242", "sentinel-redis-wrong-7373");
    let mut ids = Vec::new();
    for (ty, url) in [
        ("postgres", pg_url.as_str()),
        ("postgres", &pg_wrong),
        ("mongodb", mongo),
        ("redis", &redis.url()),
        ("redis", &redis_wrong),
    ] {
        let (_, res) = resource(&pool, ty, url).await;
        ids.push(enqueue(&pool, res).await);
    }
    let sentinels = [
        pg.password.as_str(),
        "sentinel-pg-wrong-9911",
        "sentinel-mongo-5151",
        "sentinel-redis-4242",
        "sentinel-redis-wrong-7373",
    ];

    let db = backup_worker_testkit::database_url(&pool);
    let store = tempfile::tempdir().unwrap();
    let path = format!("{}:{}", wrappers.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
        .args(["run", "--once", "--only", "backups"])
        .env("DATABASE_URL", db.as_str())
        .env("STORAGE_URL", format!("file://{}", store.path().display()))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .env("PATH", path)
        .output()
        .unwrap();
    let logs =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{logs}");

    let recorded = std::fs::read_to_string(wrappers.join("recorded.log")).unwrap();
    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap_or_default();
    assert!(recorded.lines().count() >= 5, "{recorded}");
    let mut rows_text = String::new();
    for id in &ids {
        let r = row(&pool, *id).await;
        rows_text += &format!("{:?} {:?}\n", r.error_summary, r.internal_detail);
    }
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status || ':' || coalesce(failure_reason, '') FROM resource_backups ORDER BY created_at")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        statuses,
        [
            "succeeded:",
            "failed:auth",
            "failed:auth",
            "succeeded:",
            "failed:auth"
        ]
    );
    for s in sentinels {
        assert!(!recorded.contains(s), "{s} in a child's argv: {recorded}");
        assert!(!calls.contains(s), "{s} in mongodump's argv: {calls}");
        assert!(!logs.contains(s), "{s} in the logs");
        assert!(!rows_text.contains(s), "{s} in a row: {rows_text}");
    }
}

/// redis-cli runs with the job's private 0700 directory as HOME and TMPDIR (like pg_dump and
/// mongodump), never the shared /tmp, and the directory is gone after the job.
#[sqlx::test]
async fn redis_cli_gets_the_jobs_private_home_and_tmpdir(pool: PgPool) {
    let fx = tempfile::tempdir().unwrap();
    let log = fx.path().join("env.log");
    let fake = fx.path().join("fake-redis-cli");
    let rdb = Path::new(FIXTURES).join("rdb/redis-7.0.rdb");
    std::fs::write(
        &fake,
        format!(
            "#!/usr/bin/env bash\n\
             {{ echo \"HOME=$HOME\"; echo \"TMPDIR=$TMPDIR\"; echo \"MODE=$(stat -c %a \"$HOME\")\"; }} > '{}'\n\
             exec cat '{}'\n",
            log.display(),
            rdb.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tools = Tools::default().with_override("redis-cli", fake.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(backup_worker_testkit::MemoryStore::new());
    let d = deps(&pool, store, tools, &[]);
    // No database in the URL: instance mode, through redis-cli.
    let (_, res) = resource(&pool, "redis", "redis://:env-pw-1234@127.0.0.1:6379").await;
    let id = enqueue(&pool, res).await;
    pass(&d).await;

    let recorded = std::fs::read_to_string(&log).expect("the fake redis-cli ran");
    let value = |k: &str| {
        recorded
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing from {recorded}"))
            .to_owned()
    };
    let (home, tmpdir, mode) = (value("HOME"), value("TMPDIR"), value("MODE"));
    assert_eq!(home, tmpdir, "{recorded}");
    let shared = std::env::temp_dir();
    for shared_dir in [Path::new("/tmp"), shared.as_path()] {
        assert_ne!(Path::new(&home), shared_dir, "{recorded}");
    }
    assert!(!home.is_empty() && home.starts_with('/'), "{recorded}");
    assert_eq!(mode, "700", "{recorded}");
    assert!(
        !Path::new(&home).exists(),
        "the job's directory is removed after it"
    );
    let r = row(&pool, id).await;
    assert_eq!(r.status, "succeeded", "{r:?}");
}
