//! Encryption at rest (DESIGN §12) on real parts: a private Postgres, real redis-servers, the
//! fake mongodump/mongorestore, the real binary for the `keys` commands and start-up checks, and
//! the real `age` CLI decrypting an object with an exported identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::verifier::Verifier;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::process::Tools;
use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{database_url, test_config, test_deps, PgServer, RedisServer};
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

/// A master key file (0600) holding `byte` × 32 in base64.
fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]) + "\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn deps(pool: &PgPool, store_dir: &Path, key: Option<&Path>, tools: Tools) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(store_dir.to_path_buf())
            .await
            .unwrap(),
    );
    let key = key.map(|k| k.display().to_string());
    let mut env = Vec::new();
    if let Some(k) = &key {
        env.push(("ENCRYPTION_KEY_FILE", k.as_str()));
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

/// Backs up through the real loop; (backup id, object key).
async fn back_up(d: &Deps, resource: Uuid) -> (Uuid, String) {
    let id = backup_worker::commands::enqueue_backup(&d.pool, resource)
        .await
        .unwrap();
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, key, detail, key_id): (String, Option<String>, Option<String>, Option<Uuid>) =
        sqlx::query_as(
            "SELECT status, object_key, internal_detail, key_id FROM resource_backups WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    let key = key.unwrap();
    assert!(key.ends_with(".gz.age"), "{key}");
    assert!(key_id.is_some());
    (id, key)
}

async fn restore(d: &Deps, backup: Uuid, into: Uuid) -> (String, Option<String>, Option<String>) {
    let id = backup_worker::commands::enqueue_restore(&d.pool, backup, Some(into))
        .await
        .unwrap();
    Restores::new(d.clone()).pass(&ctx()).await.unwrap();
    sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM resource_restores WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&d.pool)
    .await
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The stored object holds none of `plain` and is not a gzip stream.
fn assert_opaque(store: &Path, key: &str, plain: &[&[u8]]) -> Vec<u8> {
    let bytes = std::fs::read(store.join(key)).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    assert!(!bytes.starts_with(&[0x1f, 0x8b]));
    for p in plain {
        assert!(
            !contains(&bytes, p),
            "{:?} in the stored object",
            String::from_utf8_lossy(p)
        );
    }
    bytes
}

#[sqlx::test]
async fn every_engine_round_trips_encrypted_and_the_age_cli_opens_an_exported_identity(
    pool: PgPool,
) {
    let keys = tempfile::tempdir().unwrap();
    let master = key_file(keys.path(), "master.key", 7);
    let store = tempfile::tempdir().unwrap();
    let fx = tempfile::tempdir().unwrap();
    let mut tools = Tools::default();
    for fake in ["fake-mongodump", "fake-mongorestore"] {
        let dest = fx.path().join(fake);
        std::fs::copy(Path::new(FIXTURES).join(fake), &dest).unwrap();
        tools = tools.with_override(fake.trim_start_matches("fake-"), dest);
    }
    let d = deps(&pool, store.path(), Some(&master), tools).await;
    let t = team(&pool).await;

    // Postgres.
    let pg = PgServer::start().await.unwrap();
    let src = pg.create_database("shop").await.unwrap();
    let mut c = PgConnection::connect(&src).await.unwrap();
    c.execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         INSERT INTO notes SELECT i, 'SECRET-ROW-CONTENT-' || i FROM generate_series(1, 3000) i;",
    )
    .await
    .unwrap();
    let pg_res = resource(&pool, t, "postgres", &src).await;
    let (pg_backup, pg_key) = back_up(&d, pg_res).await;
    assert_opaque(store.path(), &pg_key, &[b"PGDMP", b"SECRET-ROW-CONTENT"]);
    c.execute("DELETE FROM notes; CREATE TABLE later (x int);")
        .await
        .unwrap();
    let (status, reason, detail) = restore(&d, pg_backup, pg_res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 3000);

    // Redis.
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(500).await.unwrap();
    redis
        .cli(&["SET", "secret", "SECRET-REDIS-VALUE"])
        .await
        .unwrap();
    let r_res = resource(&pool, t, "redis", &redis.url()).await;
    let (r_backup, r_key) = back_up(&d, r_res).await;
    assert_opaque(store.path(), &r_key, &[b"REDIS", b"SECRET-REDIS-VALUE"]);
    redis.cli(&["FLUSHALL"]).await.unwrap();
    let (status, reason, detail) = restore(&d, r_backup, r_res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(
        redis.cli(&["GET", "secret"]).await.unwrap().trim(),
        "SECRET-REDIS-VALUE"
    );

    // MongoDB.
    let m_res = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw@db.example:27017/shop?authSource=admin",
    )
    .await;
    let (m_backup, m_key) = back_up(&d, m_res).await;
    assert_opaque(
        store.path(),
        &m_key,
        &[b"shop.orders", &[0x6d, 0xe2, 0x99, 0x81]],
    );
    let (status, reason, detail) = restore(&d, m_backup, m_res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");

    // The verifier opens all three.
    Verifier::new(d.clone()).pass(&ctx()).await.unwrap();
    let verified: i64 =
        sqlx::query_scalar("SELECT count(*) FROM backup_verifications WHERE status = 'verified'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verified, 3);

    // One identity for the team, exported to a 0600 file; the age CLI decrypts the object to
    // the gzip stream the worker wrote.
    let ids: i64 = sqlx::query_scalar("SELECT count(*) FROM team_backup_keys WHERE team_id = $1")
        .bind(t)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ids, 1);
    let identity = keys.path().join("team.key");
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&identity)
            .unwrap()
    };
    let out = tokio::process::Command::new(BIN)
        .args(["keys", "export-identity", &t.to_string()])
        .env("DATABASE_URL", database_url(&pool))
        .env("ENCRYPTION_KEY_FILE", &master)
        .stdout(file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&identity).unwrap();
    assert!(text.starts_with("AGE-SECRET-KEY-1"), "{text}");
    // Never to a pipe.
    let piped = tokio::process::Command::new(BIN)
        .args(["keys", "export-identity", &t.to_string()])
        .env("DATABASE_URL", database_url(&pool))
        .env("ENCRYPTION_KEY_FILE", &master)
        .output()
        .await
        .unwrap();
    assert_eq!(piped.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&piped.stdout).contains("AGE-SECRET-KEY"));
    let age = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&identity)
        .arg(store.path().join(&pg_key))
        .output()
        .unwrap();
    assert!(
        age.status.success(),
        "{}",
        String::from_utf8_lossy(&age.stderr)
    );
    assert!(age.stdout.starts_with(&[0x1f, 0x8b]), "the worker's gzip");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&age.stdout[..]), &mut raw)
        .unwrap();
    assert!(raw.starts_with(b"PGDMP"));
}

#[sqlx::test]
async fn master_keys_are_checked_at_start(pool: PgPool) {
    let keys = tempfile::tempdir().unwrap();
    let run = |key: PathBuf| {
        let url = database_url(&pool);
        async move {
            tokio::process::Command::new(BIN)
                .args(["run", "--once", "--only", "restores"])
                .env("DATABASE_URL", url)
                .env("ENCRYPTION_KEY_FILE", key)
                .output()
                .await
                .unwrap()
        }
    };
    // World-readable.
    let loose = key_file(keys.path(), "loose.key", 1);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = run(loose).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ENCRYPTION_KEY_FILE") && err.contains("0600"),
        "{err}"
    );
    // Not 32 bytes.
    let short = keys.path().join("short.key");
    std::fs::write(&short, "c2hvcnQ=\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let out = run(short).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ENCRYPTION_KEY_FILE") && err.contains("32 bytes"),
        "{err}"
    );
    // A key that does not open the team keys in the database.
    let right = key_file(keys.path(), "right.key", 2);
    let master = backup_worker::crypto::MasterKey::load(&right).unwrap();
    let t = team(&pool).await;
    backup_worker::crypto::team_recipient(&pool, &master, t)
        .await
        .unwrap();
    let out = run(key_file(keys.path(), "wrong.key", 3)).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("ENCRYPTION_KEY_FILE") && err.contains("does not open"),
        "{err}"
    );
    let out = run(right).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[sqlx::test]
async fn a_teams_first_backups_on_many_replicas_make_one_identity(pool: PgPool) {
    let keys = tempfile::tempdir().unwrap();
    let master =
        Arc::new(backup_worker::crypto::MasterKey::load(&key_file(keys.path(), "m", 4)).unwrap());
    let t = team(&pool).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (pool, master) = (pool.clone(), master.clone());
        tasks.spawn(async move {
            backup_worker::crypto::team_recipient(&pool, &master, t)
                .await
                .unwrap()
        });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let (key_id, recipient) = r.unwrap();
        ids.insert((key_id, recipient.to_string()));
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM team_backup_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[sqlx::test]
async fn a_tampered_encrypted_object_fails_integrity_before_the_target_is_touched(pool: PgPool) {
    let keys = tempfile::tempdir().unwrap();
    let master = key_file(keys.path(), "master.key", 5);
    let store = tempfile::tempdir().unwrap();
    let d = deps(&pool, store.path(), Some(&master), Tools::default()).await;
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(2000).await.unwrap();
    let res = resource(&pool, team(&pool).await, "redis", &redis.url()).await;
    let (backup, key) = back_up(&d, res).await;
    redis.cli(&["SET", "after-the-backup", "1"]).await.unwrap();
    // Flip bytes inside the ciphertext and make the row's sha256 agree: only the AEAD can tell.
    let path = store.path().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    sqlx::query("UPDATE resource_backups SET sha256 = $2 WHERE id = $1")
        .bind(backup)
        .bind(sha)
        .execute(&pool)
        .await
        .unwrap();
    let (status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("integrity")),
        "{detail:?}"
    );
    assert!(detail.unwrap_or_default().contains("decrypt"));
    assert_eq!(
        redis
            .cli(&["GET", "after-the-backup"])
            .await
            .unwrap()
            .trim(),
        "1",
        "the target was not touched"
    );
}

#[sqlx::test]
async fn rotate_the_master_key_then_destroy_one_teams_key(pool: PgPool) {
    let keys = tempfile::tempdir().unwrap();
    let old = key_file(keys.path(), "old.key", 6);
    let new = key_file(keys.path(), "new.key", 9);
    let store = tempfile::tempdir().unwrap();
    let d_old = deps(&pool, store.path(), Some(&old), Tools::default()).await;
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(100).await.unwrap();
    let (a, b) = (team(&pool).await, team(&pool).await);
    let res_a = resource(&pool, a, "redis", &redis.url_db(0)).await;
    let res_b = resource(&pool, b, "redis", &redis.url_db(0)).await;
    let (backup_a, key_a) = back_up(&d_old, res_a).await;
    let (backup_b, _) = back_up(&d_old, res_b).await;

    let cli = |args: Vec<String>, key: PathBuf| {
        let url = database_url(&pool);
        let dir = store.path().to_path_buf();
        async move {
            tokio::process::Command::new(BIN)
                .args(args)
                .env("DATABASE_URL", url)
                .env("STORAGE_URL", format!("file://{}", dir.display()))
                .env("ENCRYPTION_KEY_FILE", key)
                .output()
                .await
                .unwrap()
        }
    };
    let out = cli(
        vec![
            "keys".into(),
            "rotate-master".into(),
            "--new-key-file".into(),
            new.display().to_string(),
        ],
        old.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-wrapped 2"));
    // Only the new key opens anything now.
    let (status, reason, _) = restore(&d_old, backup_a, res_a).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config"))
    );
    let started = cli(vec!["run".into(), "--once".into()], old.clone()).await;
    assert_eq!(started.status.code(), Some(2));
    let d_new = deps(&pool, store.path(), Some(&new), Tools::default()).await;
    let (status, reason, detail) = restore(&d_new, backup_a, res_a).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");

    // Destroy team A's key: its backups are unreadable, expired and deleted; B's are not.
    let out = cli(
        vec!["keys".into(), "destroy".into(), a.to_string()],
        new.clone(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: String = sqlx::query_scalar("SELECT status FROM resource_backups WHERE id = $1")
        .bind(backup_a)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "expired");
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE kind = 'keys.destroyed' AND team_id = $1",
    )
    .bind(a)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audits, 1);
    Backups::new(d_new.clone()).pass(&ctx()).await.unwrap();
    assert!(!store.path().join(&key_a).exists(), "the object is deleted");
    let (status, reason, detail) = restore(&d_new, backup_a, res_a).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config"))
    );
    assert!(detail.unwrap_or_default().contains("destroyed"));
    let (status, reason, detail) = restore(&d_new, backup_b, res_b).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    // The team's next backup gets a new key.
    let (_, _) = back_up(&d_new, res_a).await;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM team_backup_keys WHERE team_id = $1 AND destroyed_at IS NULL",
    )
    .bind(a)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live, 1);
}

/// `backup-worker` with `args`, DATABASE_URL and ENCRYPTION_KEY_FILE=`key`: (exit code, stdout,
/// stderr).
async fn worker(pool: &PgPool, args: &[&str], key: &Path) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", database_url(pool))
        .env("ENCRYPTION_KEY_FILE", key)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const START: &[&str] = &["run", "--once", "--only", "restores"];

/// The master key file's contents, as they must never be printed.
fn key_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[sqlx::test]
async fn a_rotation_racing_replicas_on_the_old_key_is_finished_by_a_re_run(pool: PgPool) {
    let keys = tempfile::tempdir().unwrap();
    let old = key_file(keys.path(), "old.key", 11);
    let new = key_file(keys.path(), "new.key", 12);
    let old_fp = backup_worker::crypto::MasterKey::load(&old)
        .unwrap()
        .fingerprint();
    let new_fp = backup_worker::crypto::MasterKey::load(&new)
        .unwrap()
        .fingerprint();
    assert_ne!(old_fp, new_fp);
    let store = tempfile::tempdir().unwrap();
    let d_old = deps(&pool, store.path(), Some(&old), Tools::default()).await;
    let d_new = deps(&pool, store.path(), Some(&new), Tools::default()).await;
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(50).await.unwrap();
    let (a, b) = (team(&pool).await, team(&pool).await);
    let res_a = resource(&pool, a, "redis", &redis.url_db(0)).await;
    let res_b = resource(&pool, b, "redis", &redis.url_db(0)).await;
    let (backup_a, _) = back_up(&d_old, res_a).await;

    let rotate = [
        "keys",
        "rotate-master",
        "--new-key-file",
        new.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = worker(&pool, &rotate, &old).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("re-wrapped 1 "), "{stdout}");
    assert!(
        stdout.contains(&old_fp) && stdout.contains(&new_fp),
        "{stdout}"
    );

    // A replica still on the old key takes team B's first backup after the rotation: B's key is
    // wrapped under the old master key.
    let (backup_b, _) = back_up(&d_old, res_b).await;
    let (fp, prev): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT master_fingerprint, previous_fingerprint FROM team_backup_keys WHERE team_id = $1",
    )
    .bind(b)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((fp.as_deref(), prev), (Some(old_fp.as_str()), None));

    // A replica restarting on the new key meanwhile starts (B's key is named, to be moved by
    // the re-run); one restarting on the old key does not.
    let (code, _, stderr) = worker(&pool, START, &new).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("unfinished")
            && stderr.contains(&b.to_string())
            && stderr.contains(&old_fp),
        "{stderr}"
    );
    let (code, _, stderr) = worker(&pool, START, &old).await;
    assert_eq!(code, Some(2), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("ENCRYPTION_KEY_FILE"))
        .unwrap_or_default();
    assert!(
        line.contains("does not open 1 of 2")
            && line.contains(&a.to_string())
            && line.contains(&format!("rotated to master key {new_fp}")),
        "{stderr}"
    );
    // Until the re-run, B's backups do not open on the new key, and the detail says why.
    let (status, reason, detail) = restore(&d_new, backup_b, res_b).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config"))
    );
    let detail = detail.unwrap_or_default();
    assert!(
        detail.contains(&old_fp) && detail.contains("rotate-master"),
        "{detail}"
    );

    // The re-run moves B's key; a third run finds nothing left.
    let (code, stdout, stderr) = worker(&pool, &rotate, &old).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("re-wrapped 1 "), "{stdout}");
    let (code, stdout, stderr) = worker(&pool, &rotate, &old).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("re-wrapped 0 "), "{stdout}");
    let (code, _, stderr) = worker(&pool, START, &new).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("unfinished") && !stderr.contains(&b.to_string()),
        "nothing missing: {stderr}"
    );
    for (backup, res) in [(backup_a, res_a), (backup_b, res_b)] {
        let (status, reason, detail) = restore(&d_new, backup, res).await;
        assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    }
    let under: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT master_fingerprint, previous_fingerprint FROM team_backup_keys ORDER BY team_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(under, vec![(Some(new_fp.clone()), Some(old_fp.clone())); 2]);
    // The same key twice is refused.
    let same = [
        "keys",
        "rotate-master",
        "--new-key-file",
        new.to_str().unwrap(),
    ];
    let (code, _, stderr) = worker(&pool, &same, &new).await;
    assert_eq!(code, Some(2), "{stderr}");
    // No output ever carries a master key.
    for text in [&stdout, &stderr, &line.to_owned(), &detail] {
        assert!(!text.contains(&key_text(&old)) && !text.contains(&key_text(&new)));
    }
}

#[sqlx::test]
async fn the_start_check_records_unrecorded_fingerprints_and_names_keys_nothing_opens(
    pool: PgPool,
) {
    let keys = tempfile::tempdir().unwrap();
    let path = key_file(keys.path(), "master.key", 13);
    let master = backup_worker::crypto::MasterKey::load(&path).unwrap();
    let stranger =
        backup_worker::crypto::MasterKey::load(&key_file(keys.path(), "x.key", 14)).unwrap();
    let (a, c) = (team(&pool).await, team(&pool).await);
    backup_worker::crypto::team_recipient(&pool, &master, a)
        .await
        .unwrap();
    backup_worker::crypto::team_recipient(&pool, &stranger, c)
        .await
        .unwrap();
    // As before the fingerprint column existed.
    sqlx::query("UPDATE team_backup_keys SET master_fingerprint = NULL")
        .execute(&pool)
        .await
        .unwrap();
    let (code, _, stderr) = worker(&pool, START, &path).await;
    assert_eq!(code, Some(2), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("ENCRYPTION_KEY_FILE"))
        .unwrap_or_default();
    assert!(
        line.contains("does not open 1 of 2")
            && line.contains("unrecorded master key")
            && line.contains(&c.to_string())
            && !line.contains(&a.to_string()),
        "{stderr}"
    );
    let fp: Option<String> =
        sqlx::query_scalar("SELECT master_fingerprint FROM team_backup_keys WHERE team_id = $1")
            .bind(a)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        fp,
        Some(master.fingerprint()),
        "recorded: the key opened it"
    );
    // Recorded under the stranger key, it is named by that key's fingerprint.
    sqlx::query("UPDATE team_backup_keys SET master_fingerprint = $2 WHERE team_id = $1")
        .bind(c)
        .bind(stranger.fingerprint())
        .execute(&pool)
        .await
        .unwrap();
    let (code, _, stderr) = worker(&pool, START, &path).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("1 under master key {}", stranger.fingerprint())),
        "{stderr}"
    );
    // Once that team's key is destroyed, nothing is missing.
    backup_worker::crypto::destroy(&pool, c).await.unwrap();
    let (code, _, stderr) = worker(&pool, START, &path).await;
    assert_eq!(code, Some(0), "{stderr}");
}
