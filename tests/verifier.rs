//! The verifier (DESIGN §11) on real parts: a private Postgres with password auth as the source
//! and as VERIFY_DATABASE_URL's server, real pg_dump/pg_restore/psql, a real redis-server, the fake
//! mongodump (real archive format), the real binary for kill -9 and for replicas.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::scheduler::Scheduler;
use backup_worker::loops::verifier::Verifier;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::process::Tools;
use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{
    database_url, test_config, test_deps, wait_until, PgServer, RedisServer,
};
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");

fn ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("test"),
    }
}

/// Deps over a local-directory store; `verify_url` is VERIFY_DATABASE_URL.
async fn deps(
    pool: &PgPool,
    dir: &Path,
    verify_url: Option<&str>,
    extra: &[(&str, &str)],
    tools: Tools,
) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(dir.to_path_buf())
            .await
            .unwrap(),
    );
    let mut env: Vec<(&str, &str)> = extra.to_vec();
    if let Some(url) = verify_url {
        env.push(("VERIFY_DATABASE_URL", url));
    }
    let mut d = test_deps(pool.clone(), store, test_config(&env).unwrap()).unwrap();
    d.tools = tools;
    d
}

async fn team(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn resource(pool: &PgPool, team: Uuid, ty: &str, url: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(ty)
    .bind(url)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Backs `resource` up through the real backups loop; the succeeded backup's id.
async fn back_up(d: &Deps, resource: Uuid) -> Uuid {
    let id = backup_worker::commands::enqueue_backup(&d.pool, resource)
        .await
        .unwrap();
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_backups WHERE id = $1")
            .bind(id)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    id
}

#[derive(Debug, sqlx::FromRow)]
struct Verification {
    backup_id: Uuid,
    status: String,
    failure_reason: Option<String>,
    internal_detail: Option<String>,
    detail: Value,
    attempts: i32,
}

async fn verifications(pool: &PgPool) -> Vec<Verification> {
    sqlx::query_as(
        "SELECT backup_id, status, failure_reason, internal_detail, detail, attempts
           FROM backup_verifications ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Scratch databases and throwaway roles on the server (`database <name>`, `role <name>`).
async fn scratch_databases(pg: &PgServer) -> Vec<String> {
    let mut c = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query_scalar(
        "SELECT 'database ' || datname FROM pg_database WHERE datname LIKE 'bw\\_verify\\_%'
          UNION ALL SELECT 'role ' || rolname FROM pg_roles WHERE rolname LIKE 'bw\\_verify\\_%'
          ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
}

/// A database owned by a non-superuser role, with contrib extensions the superuser created.
async fn tenant_database(pg: &PgServer, db: &str) -> String {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let _ = admin
        .execute("CREATE ROLE tenant LOGIN PASSWORD 'tenant-pw'")
        .await;
    admin
        .execute(format!("CREATE DATABASE {db} OWNER tenant").as_str())
        .await
        .unwrap();
    let mut su = PgConnection::connect(&pg.url(db)).await.unwrap();
    su.execute("CREATE EXTENSION citext; CREATE EXTENSION pg_trgm;")
        .await
        .unwrap();
    let url = format!("postgres://tenant:tenant-pw@127.0.0.1:{}/{db}", pg.port);
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(
        r#"
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE people (id serial PRIMARY KEY, email citext UNIQUE, mood mood, bio text);
        CREATE INDEX people_bio_trgm ON people USING gin (bio gin_trgm_ops);
        INSERT INTO people (email, mood, bio)
             SELECT 'P' || i || '@Example.com', (ARRAY['sad','ok','happy'])[1 + i % 3]::mood,
                    'bio ' || md5(i::text)
               FROM generate_series(1, 4321) i;
        CREATE SCHEMA billing;
        CREATE TABLE billing.invoices (id bigint PRIMARY KEY, person int REFERENCES people, cents bigint);
        INSERT INTO billing.invoices SELECT i, 1 + i % 4321, i * 7 FROM generate_series(1, 777) i;
        CREATE TABLE empty_table (x int);
        CREATE TABLE measurements (at date NOT NULL, v float8) PARTITION BY RANGE (at);
        CREATE TABLE measurements_2026 PARTITION OF measurements
            FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        INSERT INTO measurements SELECT '2026-01-01'::date + (i % 300), random() FROM generate_series(1, 99) i;
        "#,
    )
    .await
    .unwrap();
    url
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[sqlx::test]
async fn postgres_backup_verifies_with_exact_row_counts_and_leaves_no_scratch_database(
    pool: PgPool,
) {
    let pg = PgServer::start().await.unwrap();
    let src = tenant_database(&pg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let verify_url = pg.url("postgres");
    let d = deps(&pool, dir.path(), Some(&verify_url), &[], Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &src).await;
    let backup = back_up(&d, res).await;

    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 1, "{v:?}");
    let v = &v[0];
    assert_eq!(
        (v.status.as_str(), v.backup_id),
        ("verified", backup),
        "{v:?}"
    );
    assert_eq!(v.detail["level"], "restore", "{}", v.detail);
    let tables = &v.detail["tables"];
    assert_eq!(tables["public.people"], 4321, "{tables}");
    assert_eq!(tables["billing.invoices"], 777, "{tables}");
    assert_eq!(tables["public.empty_table"], 0, "{tables}");
    assert_eq!(tables["public.measurements_2026"], 99, "{tables}");
    assert!(
        tables.get("public.measurements").is_none(),
        "a partitioned parent is not counted twice: {tables}"
    );
    assert_eq!(v.detail["rows_total"], 4321 + 777 + 99);
    let (status, verified_at): (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT verify_status, verified_at FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status.as_deref(), Some("verified"));
    assert!(verified_at.is_some());
    assert!(scratch_databases(&pg).await.is_empty());
    let text = d.metrics.render();
    assert_eq!(
        metric(
            &text,
            "instant_customer_backup_verified_total{resource_type=\"postgres\",result=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "backup_worker_unverified_backups"), Some(0.0));

    // Not due again within VERIFY_EVERY.
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    assert_eq!(verifications(&pool).await.len(), 1);

    // The command: the same steps now, counts printed, exit 0.
    let out = tokio::process::Command::new(BIN)
        .args(["verify", &backup.to_string()])
        .env("DATABASE_URL", database_url(&pool))
        .env("STORAGE_URL", format!("file://{}", dir.path().display()))
        .env("VERIFY_DATABASE_URL", &verify_url)
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VERIFIED"), "{stdout}");
    assert!(
        stdout.contains(", rewinds "),
        "both rewinds' times: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("public.people") && l.trim_end().ends_with("4321")),
        "{stdout}"
    );
    assert!(!stdout.contains(&pg.password) && !stderr.contains(&pg.password));
    assert!(!stderr.contains("tenant-pw"));
    assert_eq!(verifications(&pool).await.len(), 2);
    assert!(scratch_databases(&pg).await.is_empty());
}

#[sqlx::test]
async fn without_verify_database_url_postgres_verifies_at_integrity_level(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let src = tenant_database(&pg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), None, &[], Tools::default()).await;
    let res = resource(&pool, team(&pool).await, "vector", &src).await;
    back_up(&d, res).await;
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].status, "verified", "{v:?}");
    assert_eq!(v[0].detail["level"], "integrity", "{}", v[0].detail);
    assert!(v[0].detail.get("tables").is_none());
}

/// Flips 4 bytes in the middle of a file.
fn flip(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).unwrap();
}

#[sqlx::test]
async fn corrupted_truncated_and_missing_objects_fail_and_get_a_fresh_backup(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let src = tenant_database(&pg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let verify_url = pg.url("postgres");
    let d = deps(&pool, dir.path(), Some(&verify_url), &[], Tools::default()).await;
    let t = team(&pool).await;
    let mut cases = Vec::new();
    for _ in 0..3 {
        let res = resource(&pool, t, "postgres", &src).await;
        cases.push((res, back_up(&d, res).await));
    }
    // Resources old enough for the RPO gauge to count them.
    sqlx::query("UPDATE resources SET created_at = now() - interval '1 day'")
        .execute(&pool)
        .await
        .unwrap();
    let scheduler = Scheduler::new(
        pool.clone(),
        d.plans.clone(),
        d.metrics.clone(),
        Duration::from_secs(60),
    );
    assert_eq!(
        scheduler
            .refresh_rpo_breached(chrono::Utc::now())
            .await
            .unwrap(),
        0
    );
    let root = dir.path().to_path_buf();
    let key = |backup: Uuid| {
        let pool = pool.clone();
        let root = root.clone();
        async move {
            let key: String =
                sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
                    .bind(backup)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            root.join(key)
        }
    };
    // 1: four bytes flipped.
    flip(&key(cases[0].1).await);
    // 2: truncated to half, and the row's sha256 made to match, so only the decode can tell.
    let truncated = key(cases[1].1).await;
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes[..bytes.len() / 2]))
    };
    sqlx::query("UPDATE resource_backups SET sha256 = $2 WHERE id = $1")
        .bind(cases[1].1)
        .bind(sha)
        .execute(&pool)
        .await
        .unwrap();
    // 3: deleted.
    std::fs::remove_file(key(cases[2].1).await).unwrap();

    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 3, "{v:?}");
    let expect = ["sha256", "decompress", "missing"];
    for ((res, backup), want) in cases.iter().zip(expect) {
        let row = v.iter().find(|v| v.backup_id == *backup).unwrap();
        assert_eq!(
            (row.status.as_str(), row.failure_reason.as_deref()),
            ("failed", Some("integrity")),
            "{row:?}"
        );
        let why = row.internal_detail.as_deref().unwrap_or("");
        assert!(why.contains(want), "{want}: {why}");
        assert_eq!(row.detail["backup_at_fault"], true);
        let status: Option<String> =
            sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
                .bind(backup)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(status.as_deref(), Some("failed"));
        let fresh: Vec<(String, String)> = sqlx::query_as(
            "SELECT kind, status FROM resource_backups WHERE resource_id = $1 AND id <> $2",
        )
        .bind(res)
        .bind(backup)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            fresh,
            [("scheduled".to_owned(), "pending".to_owned())],
            "a fresh backup is enqueued at once"
        );
        let audit: Value = sqlx::query_scalar(
            "SELECT detail FROM audit_log WHERE kind = 'backup.verification_failed' AND resource_id = $1",
        )
        .bind(res)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(audit["failure_reason"], "integrity");
        assert_eq!(audit["resource_type"], "postgres");
        assert_eq!(audit["backup_id"], backup.to_string());
    }
    assert_eq!(
        scheduler
            .refresh_rpo_breached(chrono::Utc::now())
            .await
            .unwrap(),
        3,
        "a backup that failed verification is not a good backup"
    );
    let text = d.metrics.render();
    assert_eq!(
        metric(
            &text,
            "instant_customer_backup_verified_total{resource_type=\"postgres\",result=\"integrity\"}"
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(metric(&text, "backup_worker_unverified_backups"), Some(3.0));
    assert!(scratch_databases(&pg).await.is_empty());

    // A second pass neither re-verifies a failed backup nor enqueues more backups.
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    assert_eq!(verifications(&pool).await.len(), 3);
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM resource_backups WHERE status = 'pending'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pending, 3);

    // The fresh backups land and are verified at the next pass.
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(
        v.iter().filter(|v| v.status == "verified").count(),
        3,
        "{v:?}"
    );
    assert_eq!(
        scheduler
            .refresh_rpo_breached(chrono::Utc::now())
            .await
            .unwrap(),
        0
    );

    // The command on a corrupted backup: exit 1, the reason printed.
    let out = tokio::process::Command::new(BIN)
        .args(["verify", &cases[0].1.to_string()])
        .env("DATABASE_URL", database_url(&pool))
        .env("STORAGE_URL", format!("file://{}", dir.path().display()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAILED (integrity)"), "{stdout}");
}

#[sqlx::test]
async fn a_verifier_killed_mid_restore_leaves_its_scratch_database_to_the_next_pass(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let src = tenant_database(&pg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let verify_url = pg.url("postgres");
    let lease = [("LEASE_SECONDS", "2")];
    let d = deps(
        &pool,
        dir.path(),
        Some(&verify_url),
        &lease,
        Tools::default(),
    )
    .await;
    let res = resource(&pool, team(&pool).await, "postgres", &src).await;
    let backup = back_up(&d, res).await;

    // A psql whose rewind session hangs: it marks that the test restore is under way, then
    // blocks (pg_restore's output backs up behind it).
    let wrap = tempfile::tempdir().unwrap();
    let gate = wrap.path().join("restoring");
    let script = format!(
        "#!/usr/bin/env bash\n\
         here=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         PATH=$(echo \"$PATH\" | tr ':' '\\n' | grep -vxF \"$here\" | paste -sd: -)\n\
         for a in \"$@\"; do if [ \"$a\" = --file=- ]; then echo $$ > {gate}; exec sleep 60; fi; done\n\
         exec psql \"$@\"\n",
        gate = gate.display()
    );
    let psql = wrap.path().join("psql");
    std::fs::write(&psql, script).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&psql, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        wrap.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--once", "--only", "verifier"])
        .env("DATABASE_URL", database_url(&pool))
        .env("STORAGE_URL", format!("file://{}", dir.path().display()))
        .env("VERIFY_DATABASE_URL", &verify_url)
        .env("LEASE_SECONDS", "2")
        .env("WORKER_ID", "doomed")
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(60),
        "the test restore to start",
        || async { gate.exists() },
    )
    .await
    .unwrap();
    let left = scratch_databases(&pg).await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(
        left[0].strip_prefix("database "),
        left[1].strip_prefix("role "),
        "the attempt's database and its role: {left:?}"
    );
    // The test restore runs as the throwaway role, which has no attribute beyond LOGIN.
    let mut c = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let (login, attributes, owns): (bool, bool, bool) = sqlx::query_as(
        "SELECT r.rolcanlogin, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
                OR r.rolbypassrls,
                EXISTS (SELECT 1 FROM pg_database d WHERE d.datname = r.rolname AND d.datdba = r.oid)
           FROM pg_roles r WHERE r.rolname LIKE 'bw\\_verify\\_%'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!((login, attributes, owns), (true, false, true));
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let sleeper: i32 = std::fs::read_to_string(&gate)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-9", &sleeper.to_string()])
        .status();

    // Once the lease has run out, the next pass drops the leftover and verifies again.
    wait_until(Duration::from_secs(30), "the lease to expire", || async {
        sqlx::query_scalar::<_, bool>("SELECT lease_expires_at < now() FROM backup_verifications")
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the scratch name's age is whole seconds
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0].status.as_str(), v[0].attempts, v[0].backup_id),
        ("verified", 2, backup),
        "{v:?}"
    );
    assert!(
        scratch_databases(&pg).await.is_empty(),
        "the killed attempt's scratch database and role {left:?} were dropped"
    );
}

#[sqlx::test]
async fn redis_and_mongodb_backups_verify_with_their_counts(pool: PgPool) {
    let redis = RedisServer::start(Some("verify-redis-pw")).await.unwrap();
    redis.populate(1500).await.unwrap();
    redis
        .cli(&["-n", "3", "MSET", "a", "1", "b", "2", "c", "3"])
        .await
        .unwrap();
    redis
        .cli(&["-n", "3", "HSET", "h", "f1", "v1", "f2", "v2"])
        .await
        .unwrap();
    let fx = tempfile::tempdir().unwrap();
    let fake = fx.path().join("fake-mongodump");
    std::fs::copy(Path::new(FIXTURES).join("fake-mongodump"), &fake).unwrap();
    std::fs::write(fx.path().join("docs"), "2345").unwrap();
    let tools = Tools::default().with_override("mongodump", fake);
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), None, &[], tools).await;
    let t = team(&pool).await;
    let r = resource(&pool, t, "redis", &redis.url()).await;
    let m = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw@db.example:27017/shop?authSource=admin",
    )
    .await;
    let rb = back_up(&d, r).await;
    let mb = back_up(&d, m).await;
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 2, "{v:?}");
    let redis_v = v.iter().find(|v| v.backup_id == rb).unwrap();
    assert_eq!(redis_v.status, "verified", "{redis_v:?}");
    assert_eq!(redis_v.detail["level"], "restore");
    assert_eq!(redis_v.detail["databases"]["0"], 1500, "{}", redis_v.detail);
    assert_eq!(redis_v.detail["databases"]["3"], 4, "{}", redis_v.detail);
    assert_eq!(redis_v.detail["keys_total"], 1504);
    let mongo_v = v.iter().find(|v| v.backup_id == mb).unwrap();
    assert_eq!(mongo_v.status, "verified", "{mongo_v:?}");
    assert_eq!(
        mongo_v.detail["namespaces"]["shop.orders"], 2345,
        "{}",
        mongo_v.detail
    );
    assert_eq!(mongo_v.detail["namespaces"]["shop.customers"], 10);
    assert_eq!(mongo_v.detail["documents_total"], 2355);
}

/// Inserts `n` resources of one team, each with a succeeded backup row pointing at `object`.
async fn fleet(pool: &PgPool, team: Uuid, n: usize, url: &str, object: (&str, &str, i64)) {
    sqlx::query(
        "WITH r AS (
            INSERT INTO resources (team_id, resource_type, connection_url)
            SELECT $1, 'redis', $2 FROM generate_series(1, $3) RETURNING id)
         INSERT INTO resource_backups (resource_id, kind, status, finished_at, object_key, sha256, size_bytes)
         SELECT id, 'scheduled', 'succeeded', now() - interval '2 hours', $4, $5, $6 FROM r",
    )
    .bind(team)
    .bind(url)
    .bind(n as i32)
    .bind(object.0)
    .bind(object.1)
    .bind(object.2)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn four_verifiers_on_two_replicas_verify_each_backup_once(pool: PgPool) {
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(300).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), None, &[], Tools::default()).await;
    let t = team(&pool).await;
    let first = resource(&pool, t, "redis", &redis.url()).await;
    let b = back_up(&d, first).await;
    let (key, sha, size): (String, String, i64) =
        sqlx::query_as("SELECT object_key, sha256, size_bytes FROM resource_backups WHERE id = $1")
            .bind(b)
            .fetch_one(&pool)
            .await
            .unwrap();
    fleet(&pool, t, 199, &redis.url(), (&key, &sha, size)).await;

    let replica = |name: &str| {
        tokio::process::Command::new(BIN)
            .args(["run", "--once", "--only", "verifier"])
            .env("DATABASE_URL", database_url(&pool))
            .env("STORAGE_URL", format!("file://{}", dir.path().display()))
            .env("VERIFY_CONCURRENCY", "2")
            .env("WORKER_ID", name)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b2) = (replica("replica-a"), replica("replica-b"));
    let (a, b2) = tokio::join!(a.wait_with_output(), b2.wait_with_output());
    for out in [a.unwrap(), b2.unwrap()] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (rows, backups, verified, workers): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT backup_id), count(*) FILTER (WHERE status = 'verified'),
                count(DISTINCT leased_by)
           FROM backup_verifications",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, backups, verified), (200, 200, 200));
    assert!((1..=2).contains(&workers), "{workers}");
    let unverified: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups WHERE verify_status IS DISTINCT FROM 'verified'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unverified, 0);

    // The next round starts only after VERIFY_EVERY.
    let again = replica("replica-c").wait_with_output().await.unwrap();
    assert!(again.status.success());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_verifications")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 200);
}

#[sqlx::test]
async fn claims_are_fair_across_teams_and_never_beside_a_running_backup(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), None, &[], Tools::default()).await;
    let big = team(&pool).await;
    let small = team(&pool).await;
    fleet(&pool, big, 50, "redis://127.0.0.1:1", ("k", "00", 1)).await;
    fleet(&pool, small, 1, "redis://127.0.0.1:1", ("k", "00", 1)).await;
    let verifier = Verifier::new(d.clone());
    assert_eq!(verifier.enqueue().await.unwrap(), 51);
    assert_eq!(verifier.enqueue().await.unwrap(), 0, "idempotent");
    let mut teams = Vec::new();
    for _ in 0..2 {
        let job = verifier.claim().await.unwrap().unwrap();
        teams.push(job.team_id);
    }
    assert!(
        teams.contains(&small),
        "one team's fifty resources do not starve another's one"
    );

    // A resource with a running backup is not verified beside it.
    let busy: Uuid = sqlx::query_scalar(
        "SELECT resource_id FROM backup_verifications WHERE status = 'pending' LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE backup_verifications SET status = 'verified' WHERE status = 'pending' AND resource_id <> $1")
        .bind(busy)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, status, leased_by, lease_expires_at)
         VALUES ($1, 'running', 'other', now() + interval '1 minute')",
    )
    .bind(busy)
    .execute(&pool)
    .await
    .unwrap();
    assert!(verifier.claim().await.unwrap().is_none());
}

#[sqlx::test]
async fn a_broken_scratch_server_is_not_blamed_on_the_backup(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let src = tenant_database(&pg, "shop").await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = format!(
        "postgres://postgres:not-the-password@127.0.0.1:{}/postgres",
        pg.port
    );
    let d = deps(&pool, dir.path(), Some(&wrong), &[], Tools::default()).await;
    let res = resource(&pool, team(&pool).await, "postgres", &src).await;
    let backup = back_up(&d, res).await;
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        (v[0].status.as_str(), v[0].failure_reason.as_deref()),
        ("failed", Some("auth")),
        "{v:?}"
    );
    assert_eq!(v[0].detail["backup_at_fault"], false);
    assert!(!v[0]
        .internal_detail
        .as_deref()
        .unwrap_or("")
        .contains("not-the-password"));
    let status: Option<String> =
        sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, None, "the backup was never tested: no verdict");
    let (audits, backups): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM audit_log WHERE kind = 'backup.verification_failed'),
                (SELECT count(*) FROM resource_backups)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((audits, backups), (0, 1), "no audit, no fresh backup");
    let text = d.metrics.render();
    assert_eq!(
        metric(
            &text,
            "instant_customer_backup_verified_total{resource_type=\"postgres\",result=\"auth\"}"
        ),
        Some(1.0)
    );
    // Tried again an hour later, not at every pass.
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    assert_eq!(verifications(&pool).await.len(), 1);
    sqlx::query("UPDATE backup_verifications SET finished_at = now() - interval '61 minutes'")
        .execute(&pool)
        .await
        .unwrap();
    let fixed = deps(
        &pool,
        dir.path(),
        Some(&pg.url("postgres")),
        &[],
        Tools::default(),
    )
    .await;
    Verifier::new(fixed).pass(&ctx()).await.unwrap();
    let v = verifications(&pool).await;
    assert_eq!(v.len(), 2);
    assert_eq!(v[1].status, "verified", "{v:?}");
}
