//! What restores and verifications stage on disk (DESIGN §6, §11): one copy of the stored object,
//! decrypted and decompressed as it is read — and a temporary directory without room for it is
//! the worker's environment (`config`, the bytes needed), never the backup's fault. Real tmpfs
//! filesystems of a given size as the binary's TMPDIR, a real private Postgres, the real binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backup_worker::deps::Deps;
use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{
    back_up, database_url, insert_resource, insert_team, test_config, test_deps, PgServer,
};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");

/// A tmpfs of `bytes` mounted on a fresh directory, unmounted on drop: a temporary volume of a
/// known size (the tests run as root, as CI does).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn used(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).unwrap();
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn key_file(dir: &Path) -> PathBuf {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("master.key");
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]) + "\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A tenant database of about 3.4 MB of incompressible rows.
async fn tenant(pg: &PgServer) -> String {
    pg.tenant_database(
        "shop",
        "shop",
        "shop-pw",
        "CREATE TABLE blobs (id int PRIMARY KEY, b bytea);
         INSERT INTO blobs SELECT i, decode(md5(random()::text) || md5(random()::text), 'hex')
           FROM generate_series(1, 100000) AS i;",
    )
    .await
    .unwrap()
}

struct Setup {
    _pg: PgServer,
    store: tempfile::TempDir,
    keys: tempfile::TempDir,
    url: String,
    backup: Uuid,
    size: u64,
}

/// An encrypted backup of the tenant, then the tenant damaged (a restore must bring it back).
async fn encrypted_backup(pool: &PgPool) -> Setup {
    let pg = PgServer::start().await.unwrap();
    let url = tenant(&pg).await;
    let store = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path());
    let local: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(store.path().to_path_buf())
            .await
            .unwrap(),
    );
    let key_env = key.display().to_string();
    let d: Deps = test_deps(
        pool.clone(),
        local,
        test_config(&[("ENCRYPTION_KEY_FILE", &key_env)]).unwrap(),
    )
    .unwrap();
    let team = insert_team(pool, "pro").await.unwrap();
    let res = insert_resource(pool, team, "postgres", &url).await.unwrap();
    let backup = back_up(&d, res).await.unwrap();
    let (size, key_id): (i64, Option<Uuid>) =
        sqlx::query_as("SELECT size_bytes, key_id FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(key_id.is_some(), "the backup is encrypted");
    assert!(size > 3_000_000, "the object is {size} bytes");
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute("DELETE FROM blobs WHERE id > 10").await.unwrap();
    Setup {
        _pg: pg,
        store,
        keys,
        url,
        backup,
        size: size as u64,
    }
}

/// `backup-worker run --once --only <loops>` with `tmpdir` as its temporary directory.
async fn run_once(pool: &PgPool, s: &Setup, only: &str, tmpdir: &Path) {
    let out = tokio::process::Command::new(BIN)
        .args(["run", "--once", "--only", only])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("DATABASE_URL", database_url(pool))
        .env(
            "STORAGE_URL",
            format!("file://{}", s.store.path().display()),
        )
        .env("ENCRYPTION_KEY_FILE", s.keys.path().join("master.key"))
        .env("TMPDIR", tmpdir)
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn rows(url: &str) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM blobs")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

async fn restore_row(pool: &PgPool, id: Uuid) -> (String, Option<String>, String, String) {
    let (status, reason, summary, detail): (
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT status, failure_reason, error_summary, internal_detail
               FROM resource_restores WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    (
        status,
        reason,
        summary.unwrap_or_default(),
        detail.unwrap_or_default(),
    )
}

/// An encrypted restore needs room for the object once, not twice: it succeeds in a temporary
/// volume of 1.4× the object's size (decrypting to a copy beside it needed 2×).
#[sqlx::test]
async fn an_encrypted_restore_stages_one_copy_of_the_object(pool: PgPool) {
    let s = encrypted_backup(&pool).await;
    let disk = SmallDisk::new(s.size * 14 / 10);
    let restore = backup_worker::commands::enqueue_restore(&pool, s.backup, None)
        .await
        .unwrap();
    run_once(&pool, &s, "restores", disk.path()).await;
    let (status, reason, _, detail) = restore_row(&pool, restore).await;
    assert_eq!((status.as_str(), reason), ("succeeded", None), "{detail}");
    assert_eq!(rows(&s.url).await, 100_000);
    assert!(
        disk.used() < 64 * 1024,
        "the job's directory is removed after"
    );
}

/// A temporary volume smaller than the object: the restore fails `config` before downloading,
/// naming the bytes needed; the tenant is untouched. The same for a verification, which does not
/// blame the backup (no verify_status, no audit, no fresh backup).
#[sqlx::test]
async fn a_full_temporary_directory_is_config_and_blames_no_backup(pool: PgPool) {
    let s = encrypted_backup(&pool).await;
    let disk = SmallDisk::new(1024 * 1024);
    let restore = backup_worker::commands::enqueue_restore(&pool, s.backup, None)
        .await
        .unwrap();
    run_once(&pool, &s, "restores", disk.path()).await;
    let (status, reason, summary, detail) = restore_row(&pool, restore).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config"))
    );
    assert!(
        detail.contains("temporary directory is full")
            && detail.contains(&format!("{} bytes needed", s.size)),
        "{detail}"
    );
    assert!(!summary.contains("retry"), "{summary}");
    assert_eq!(rows(&s.url).await, 10, "the tenant is untouched");

    run_once(&pool, &s, "verifier", disk.path()).await;
    let (vstatus, vreason, vdetail): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM backup_verifications
          WHERE backup_id = $1",
    )
    .bind(s.backup)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (vstatus.as_str(), vreason.as_deref()),
        ("failed", Some("config")),
        "{vdetail:?}"
    );
    let verdict: Option<String> =
        sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
            .bind(s.backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verdict, None, "a full disk says nothing about the backup");
    let blamed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE kind = 'backup.verification_failed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(blamed, 0);
}

/// The volume fills while downloading (the row's size no longer tells: another job took the
/// room): ENOSPC is `config` too, with the bytes needed, and nothing of the tenant is touched.
#[sqlx::test]
async fn enospc_while_downloading_is_config(pool: PgPool) {
    let s = encrypted_backup(&pool).await;
    let disk = SmallDisk::new(1024 * 1024);
    // The row understates the object, so the free-space check passes and the write hits ENOSPC.
    sqlx::query("UPDATE resource_backups SET size_bytes = 1000 WHERE id = $1")
        .bind(s.backup)
        .execute(&pool)
        .await
        .unwrap();
    let restore = backup_worker::commands::enqueue_restore(&pool, s.backup, None)
        .await
        .unwrap();
    run_once(&pool, &s, "restores", disk.path()).await;
    let (status, reason, _, detail) = restore_row(&pool, restore).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail}"
    );
    assert!(detail.contains("temporary directory is full"), "{detail}");
    assert_eq!(rows(&s.url).await, 10, "the tenant is untouched");
}
