//! Copies to a second destination (DESIGN §13, issue 24): two S3-protocol servers (moto) on
//! loopback, a real Postgres backed up through the real backups loop, the copies loop in-process
//! and the real binary configured by COPY_* variables alone.

use std::sync::Arc;

use backup_worker::loops::copies::Copies;
use backup_worker::loops::Loop;
use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{
    back_up, database_url, insert_resource, insert_team, pass_ctx, test_config, test_deps,
    PgServer, S3Server, TEST_ACCESS_KEY,
};
use sqlx::PgPool;
use tokio::io::AsyncReadExt;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");

async fn bytes(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    store
        .get(key)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

async fn copy_row(pool: &PgPool, backup: Uuid) -> (String, i32, Option<String>, Option<String>) {
    sqlx::query_as(
        "SELECT status, attempts, failure_reason, internal_detail FROM backup_copies
          WHERE backup_id = $1 AND destination = 'copy'",
    )
    .bind(backup)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A tenant database with more rows than one upload part holds.
async fn tenant(pg: &PgServer) -> String {
    pg.tenant_database(
        "shop",
        "shop_owner",
        "shop-pw",
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
         INSERT INTO orders SELECT i, md5(i::text) || md5(random()::text) || md5(random()::text)
           FROM generate_series(1, 150000) i;",
    )
    .await
    .unwrap()
}

#[sqlx::test]
async fn backups_are_copied_verified_and_caught_up_after_the_copy_store_was_down(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let primary_s3 = S3Server::start().await.unwrap();
    let mut copy_s3 = S3Server::start().await.unwrap();
    let primary: Arc<dyn ObjectStore> = Arc::new(primary_s3.store("primary").await.unwrap());
    let copy: Arc<dyn ObjectStore> = Arc::new(copy_s3.store("copies").await.unwrap());
    let url = tenant(&pg).await;
    let mut d = test_deps(
        pool.clone(),
        primary.clone(),
        test_config(&[("STORAGE_URL", "s3://primary")]).unwrap(),
    )
    .unwrap();
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();

    // A backup taken before any copy destination was configured: the backfill copies it.
    let backup = back_up(&d, res).await.unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM backup_copies")
            .fetch_one(&pool)
            .await
            .unwrap(),
        0,
        "no copy destination, no copies"
    );

    // The copy store is down: the copy fails `upload`, is retried later, and the backup is
    // counted unprotected once it is an hour old — while it stays succeeded on the primary.
    copy_s3.kill().await;
    d.copy_store = Some(copy.clone());
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, attempts, reason, _) = copy_row(&pool, backup).await;
    assert_eq!(
        (status.as_str(), attempts, reason.as_deref()),
        ("pending", 1, Some("upload"))
    );
    let status: String = sqlx::query_scalar("SELECT status FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "succeeded");
    sqlx::query(
        "UPDATE resource_backups SET finished_at = now() - interval '2 hours' WHERE id = $1",
    )
    .bind(backup)
    .execute(&pool)
    .await
    .unwrap();
    let copies = Copies::new(d.clone());
    assert_eq!(copies.refresh_unprotected().await.unwrap(), 1);
    assert_eq!(
        metric(&d.metrics.render(), "backup_worker_unprotected_backups"),
        Some(1.0)
    );

    // Back up (a new server: the old one's buckets died with it); the retry is due.
    let copy_s3 = S3Server::start().await.unwrap();
    let copy: Arc<dyn ObjectStore> = Arc::new(copy_s3.store("copies").await.unwrap());
    d.copy_store = Some(copy.clone());
    sqlx::query("UPDATE backup_copies SET run_after = now()")
        .execute(&pool)
        .await
        .unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, attempts, _, _) = copy_row(&pool, backup).await;
    assert_eq!((status.as_str(), attempts), ("succeeded", 2));
    let (key, sha): (String, String) =
        sqlx::query_as("SELECT object_key, sha256 FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    let held = bytes(copy.as_ref(), &key).await;
    assert!(
        held.len() > 5 * 1024 * 1024,
        "more than one part: {}",
        held.len()
    );
    assert_eq!(held, bytes(primary.as_ref(), &key).await, "byte-for-byte");
    let copied_sha: String = sqlx::query_scalar(
        "SELECT sha256 FROM backup_copies WHERE backup_id = $1 AND status = 'succeeded'",
    )
    .bind(backup)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(copied_sha, sha);
    let text = d.metrics.render();
    assert_eq!(
        metric(&text, "backup_worker_unprotected_backups"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "backup_worker_copies_total{destination=\"copy\",result=\"ok\"}"
        ),
        Some(1.0)
    );

    // A primary object that no longer matches its row is never copied: failed `integrity` at
    // once (retrying cannot fix the primary), nothing committed on the copy store.
    let second = back_up(&d, res).await.unwrap();
    let key2: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(second)
        .fetch_one(&pool)
        .await
        .unwrap();
    backup_worker::storage::put_reader(
        primary.as_ref(),
        &key2,
        &b"not the backup"[..],
        Default::default(),
    )
    .await
    .unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, _, reason, detail) = copy_row(&pool, second).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("integrity")),
        "{detail:?}"
    );
    assert!(
        matches!(
            copy.head(&key2).await,
            Err(backup_worker::storage::StorageError::NotFound { .. })
        ),
        "nothing of a damaged primary object reaches the copy store"
    );
}

#[sqlx::test]
async fn the_binary_copies_with_the_copy_destinations_own_settings(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let primary_s3 = S3Server::start().await.unwrap();
    let copy_s3 = S3Server::start().await.unwrap();
    let primary: Arc<dyn ObjectStore> = Arc::new(primary_s3.store("primary").await.unwrap());
    let copy: Arc<dyn ObjectStore> = Arc::new(copy_s3.store("copies").await.unwrap());
    let url = tenant(&pg).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let copy_secret = "copy-secret-never-logged";
    let run = |only: &'static str| {
        tokio::process::Command::new(BIN)
            .args(["run", "--once", "--only", only])
            .env("DATABASE_URL", database_url(&pool))
            .env("STORAGE_URL", "s3://primary/p1")
            .env("S3_ENDPOINT", &primary_s3.endpoint)
            .env("S3_FORCE_PATH_STYLE", "true")
            .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("COPY_STORAGE_URL", "s3://copies/elsewhere/c2")
            .env("COPY_S3_ENDPOINT", &copy_s3.endpoint)
            .env("COPY_S3_FORCE_PATH_STYLE", "true")
            .env("COPY_AWS_ACCESS_KEY_ID", "copy-key")
            .env("COPY_AWS_SECRET_ACCESS_KEY", copy_secret)
            .env("LOG_FORMAT", "json")
            .output()
    };
    let id = backup_worker::commands::enqueue_backup(&pool, res)
        .await
        .unwrap();
    let out = run("backups,copies").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(copy_secret), "{stderr}");
    let (status, key): (String, String) =
        sqlx::query_as("SELECT status, object_key FROM resource_backups WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded");
    let (copy_status, _, reason, detail) = copy_row(&pool, id).await;
    assert_eq!(copy_status, "succeeded", "{reason:?} {detail:?}");
    // The same path under the copy destination's own prefix.
    let copy_key: String =
        sqlx::query_scalar("SELECT object_key FROM backup_copies WHERE backup_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(key.starts_with("p1/"), "{key}");
    assert_eq!(copy_key, format!("elsewhere/c2/{}", &key["p1/".len()..]));
    assert_eq!(
        bytes(copy.as_ref(), &copy_key).await,
        bytes(primary.as_ref(), &key).await
    );

    // The operator's view: the copy's state per backup, and the copies in `status`.
    let cli = |args: Vec<String>| {
        let url = database_url(&pool);
        async move {
            let out = tokio::process::Command::new(BIN)
                .args(&args)
                .env("DATABASE_URL", url)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let listing = cli(vec!["backups".into(), res.to_string()]).await;
    let line = listing
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .unwrap_or_default()
        .to_owned();
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert!(
        listing.contains("COPY")
            && columns.get(columns.len().wrapping_sub(2)) == Some(&"succeeded"),
        "the COPY column, before ANOMALY: {listing}"
    );
    let status = cli(vec!["status".into()]).await;
    assert!(
        status.contains("copies        succeeded      1") && status.contains("copies: 1 held"),
        "{status}"
    );

    // Bad copy settings fail at start with one line naming the variable.
    let out = tokio::process::Command::new(BIN)
        .args(["run", "--once", "--only", "copies"])
        .env("DATABASE_URL", database_url(&pool))
        .env("STORAGE_URL", "s3://primary")
        .env("COPY_STORAGE_URL", "s3://copies")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("COPY_AWS_ACCESS_KEY_ID") && stderr.contains("never used for the copy"),
        "{stderr}"
    );
}

#[sqlx::test]
async fn restores_and_verifications_read_the_copy_when_the_primary_object_does_not_serve(
    pool: PgPool,
) {
    use backup_worker::storage::LocalStore;
    let pg = PgServer::start().await.unwrap();
    let copy_s3 = S3Server::start().await.unwrap();
    let primary_dir = tempfile::tempdir().unwrap();
    let primary: Arc<dyn ObjectStore> = Arc::new(
        LocalStore::new(primary_dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    let copy: Arc<dyn ObjectStore> = Arc::new(copy_s3.store("copies").await.unwrap());
    let url = tenant(&pg).await;
    let mut d = test_deps(
        pool.clone(),
        primary.clone(),
        test_config(&[("VERIFY_DATABASE_URL", &pg.url("postgres"))]).unwrap(),
    )
    .unwrap();
    d.copy_store = Some(copy.clone());
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    assert_eq!(copy_row(&pool, backup).await.0, "succeeded");
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();

    // The primary object altered behind the worker's back: the verifier proves the copy.
    backup_worker::storage::put_reader(primary.as_ref(), &key, &b"garbage"[..], Default::default())
        .await
        .unwrap();
    let report = backup_worker::loops::verifier::Verifier::new(d.clone())
        .verify_now(backup)
        .await
        .unwrap();
    assert_eq!(report.status, "verified", "{report:?}");
    assert_eq!(report.detail["source"], "copy", "{}", report.detail);
    assert_eq!(report.detail["tables"]["public.orders"], 150_000);

    // The primary object deleted: a clone restores from the copy, and says so.
    primary.delete(&key).await.unwrap();
    let clone_url = pg
        .tenant_database("shop_clone", "clone_owner", "clone-pw", "SELECT 1")
        .await
        .unwrap();
    let clone = insert_resource(&pool, team, "postgres", &clone_url)
        .await
        .unwrap();
    let id = backup_worker::commands::enqueue_restore(&pool, backup, Some(clone))
        .await
        .unwrap();
    backup_worker::loops::restores::Restores::new(d.clone())
        .pass(&pass_ctx())
        .await
        .unwrap();
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_restores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    let audit: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE kind = 'restore.succeeded' AND subject_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audit["source"], "copy", "{audit}");
    let rows: i64 = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&clone_url).await.unwrap();
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(rows, 150_000);
    let text = d.metrics.render();
    for reader in ["restore", "verify"] {
        assert_eq!(
            metric(
                &text,
                &format!("backup_worker_copy_reads_total{{reader=\"{reader}\"}}")
            ),
            Some(1.0),
            "{text}"
        );
    }

    // Gone from both: the restore fails `integrity`, naming both.
    copy.delete(&key).await.unwrap();
    let id = backup_worker::commands::enqueue_restore(&pool, backup, Some(clone))
        .await
        .unwrap();
    backup_worker::loops::restores::Restores::new(d.clone())
        .pass(&pass_ctx())
        .await
        .unwrap();
    let (status, reason, detail): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM resource_restores WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("integrity")),
        "{detail:?}"
    );
    assert!(
        detail
            .unwrap_or_default()
            .contains("the copy does not serve either"),
        "both destinations named"
    );
}

#[sqlx::test]
async fn deletes_reach_the_copy_and_a_failed_one_is_retried_never_forgotten(pool: PgPool) {
    use backup_worker::storage::LocalStore;
    let pg = PgServer::start().await.unwrap();
    let primary_dir = tempfile::tempdir().unwrap();
    let copy_dir = tempfile::tempdir().unwrap();
    let primary: Arc<dyn ObjectStore> = Arc::new(
        LocalStore::new(primary_dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    let copy: Arc<dyn ObjectStore> = Arc::new(
        LocalStore::new(copy_dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    let url = tenant(&pg).await;
    let mut d = test_deps(pool.clone(), primary.clone(), test_config(&[]).unwrap()).unwrap();
    d.copy_store = Some(copy.clone());
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let kept = back_up(&d, res).await.unwrap();
    let expired = back_up(&d, res).await.unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let key = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT object_key FROM backup_copies WHERE backup_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (kept_key, expired_key) = (key(kept).await, key(expired).await);
    assert!(copy.head(&expired_key).await.is_ok());

    // Retention expires a backup while the copy store is down: the copy row stays, so the
    // delete is tried again and lands once the store is back.
    sqlx::query("UPDATE resource_backups SET status = 'expired' WHERE id = $1")
        .bind(expired)
        .execute(&pool)
        .await
        .unwrap();
    // A copy store nothing listens on any more: every request is refused.
    let down = backup_worker::storage::S3Store::new(backup_worker::storage::S3Settings {
        bucket: "copies".into(),
        endpoint: Some(format!(
            "http://127.0.0.1:{}",
            backup_worker_testkit::free_port().unwrap()
        )),
        region: Some("us-east-1".into()),
        force_path_style: true,
        static_credentials: Some((TEST_ACCESS_KEY.into(), TEST_ACCESS_KEY.into())),
        profile: None,
        part_size: backup_worker::storage::S3_MIN_PART_SIZE,
        parts_in_flight: 1,
    })
    .await;
    let mut d_down = d.clone();
    d_down.copy_store = Some(Arc::new(down));
    assert_eq!(Copies::new(d_down).delete_expired().await.unwrap(), 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_copies WHERE backup_id = $1")
        .bind(expired)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "a failed delete keeps its row");
    assert!(copy.head(&expired_key).await.is_ok());
    let copies = Copies::new(d.clone());
    copies.delete_expired().await.unwrap();
    assert!(matches!(
        copy.head(&expired_key).await,
        Err(backup_worker::storage::StorageError::NotFound { .. })
    ));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_copies WHERE backup_id = $1")
        .bind(expired)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the row goes once the object is gone");
    assert!(
        copy.head(&kept_key).await.is_ok(),
        "a succeeded backup's copy stays"
    );

    // The reconciliation removes an old backup-shaped object no copy row accounts for, and
    // leaves the copies of succeeded backups.
    let orphan_key = format!(
        "{}/{}/20260101T000000Z-{}.pgdump.gz",
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4()
    );
    backup_worker::storage::put_reader(
        copy.as_ref(),
        &orphan_key,
        &b"left over"[..],
        Default::default(),
    )
    .await
    .unwrap();
    for k in [&orphan_key, &kept_key] {
        let status = std::process::Command::new("touch")
            .args(["-d", "3 days ago"])
            .arg(copy_dir.path().join(k))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let removed = Copies::new(d.clone()).reconcile().await.unwrap();
    assert_eq!(removed, 1);
    assert!(copy.head(&orphan_key).await.is_err());
    assert!(copy.head(&kept_key).await.is_ok());
}

/// A bucket with S3 Object Lock enabled (versioned) on `s3`.
async fn locked_bucket(s3: &S3Server, bucket: &str) -> backup_worker::storage::S3Store {
    let store = backup_worker::storage::S3Store::new(s3.settings(bucket)).await;
    store
        .client()
        .create_bucket()
        .bucket(bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    store
}

#[sqlx::test]
async fn object_lock_keeps_backups_and_copies_from_the_credentials_that_wrote_them(pool: PgPool) {
    use aws_sdk_s3::types::ObjectLockMode;
    let pg = PgServer::start().await.unwrap();
    let primary_s3 = S3Server::start().await.unwrap();
    let copy_s3 = S3Server::start().await.unwrap();
    let primary = Arc::new(locked_bucket(&primary_s3, "locked").await);
    let copy = Arc::new(locked_bucket(&copy_s3, "copylocked").await);
    let url = tenant(&pg).await;
    let mut d = test_deps(
        pool.clone(),
        primary.clone(),
        test_config(&[
            ("STORAGE_URL", "s3://locked"),
            ("OBJECT_LOCK_MODE", "governance"),
            ("COPY_STORAGE_URL", "s3://copylocked"),
            ("COPY_AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
            ("COPY_AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY),
            ("COPY_OBJECT_LOCK_MODE", "compliance"),
        ])
        .unwrap(),
    )
    .unwrap();
    d.copy_store = Some(copy.clone());
    // hobby: 7 days, the newest 2 kept.
    let team = insert_team(&pool, "hobby").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let oldest = back_up(&d, res).await.unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(oldest)
        .fetch_one(&pool)
        .await
        .unwrap();
    let eight_days = chrono::Utc::now() + chrono::Duration::days(8);
    for (store, bucket, mode) in [
        (primary.as_ref(), "locked", ObjectLockMode::Governance),
        (copy.as_ref(), "copylocked", ObjectLockMode::Compliance),
    ] {
        let head = store
            .client()
            .head_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.object_lock_mode(), Some(&mode));
        let until = head.object_lock_retain_until_date().unwrap().secs();
        assert!(
            (until - eight_days.timestamp()).abs() < 600,
            "retain-until = finished_at + 7 days + 1 day: {until} vs {}",
            eight_days.timestamp()
        );
    }

    // Retention expires the oldest backup (two newer ones kept): it never fails on the locked
    // object — the row is expired, the object's current version is gone — but its data stays
    // until the lock lapses, and the worker's own credentials cannot delete it sooner.
    back_up(&d, res).await.unwrap();
    back_up(&d, res).await.unwrap();
    sqlx::query("UPDATE resource_backups SET finished_at = now() - interval '30 days', created_at = now() - interval '30 days' WHERE id = $1")
        .bind(oldest)
        .execute(&pool)
        .await
        .unwrap();
    let report = backup_worker::retention::apply_retention(
        &pool,
        primary.as_ref(),
        &d.plans,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM resource_backups WHERE id = $1")
        .bind(oldest)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "expired");
    assert!(primary.head(&key).await.is_err(), "not listed any more");
    let versions = primary
        .client()
        .list_object_versions()
        .bucket("locked")
        .prefix(&key)
        .send()
        .await
        .unwrap();
    let version = versions.versions()[0].version_id().unwrap().to_owned();
    let refused = primary
        .client()
        .delete_object()
        .bucket("locked")
        .key(&key)
        .version_id(&version)
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a locked version cannot be deleted by the worker's credentials"
    );
    // The copies loop deletes the copy's current version the same way, without failing.
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_copies WHERE backup_id = $1")
        .bind(oldest)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // A lock mode on a bucket without Object Lock stops the start, naming the variable.
    let plain = S3Server::start().await.unwrap();
    plain.store("plain").await.unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["run", "--once", "--only", "backups"])
        .env("DATABASE_URL", database_url(&pool))
        .env("STORAGE_URL", "s3://plain")
        .env("S3_ENDPOINT", &plain.endpoint)
        .env("S3_FORCE_PATH_STYLE", "true")
        .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TEST_ACCESS_KEY)
        .env("OBJECT_LOCK_MODE", "compliance")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("OBJECT_LOCK_MODE")
            && stderr.contains("does not have S3 Object Lock enabled"),
        "{stderr}"
    );
}

#[sqlx::test]
async fn a_store_that_corrupts_never_holds_a_counted_copy_and_encrypted_backups_copy_byte_for_byte(
    pool: PgPool,
) {
    use backup_worker::storage::LocalStore;
    use backup_worker_testkit::MemoryStore;
    let pg = PgServer::start().await.unwrap();
    let primary_dir = tempfile::tempdir().unwrap();
    let primary: Arc<dyn ObjectStore> = Arc::new(
        LocalStore::new(primary_dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    // Encrypted backups (ENCRYPTION_KEY_FILE, DESIGN §12): the copy is the same age object.
    let keys = tempfile::tempdir().unwrap();
    let master = keys.path().join("master.key");
    {
        use base64::Engine;
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            &master,
            base64::engine::general_purpose::STANDARD.encode([7u8; 32]) + "\n",
        )
        .unwrap();
        std::fs::set_permissions(&master, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let url = tenant(&pg).await;
    let mut d = test_deps(
        pool.clone(),
        primary.clone(),
        test_config(&[("ENCRYPTION_KEY_FILE", master.to_str().unwrap())]).unwrap(),
    )
    .unwrap();
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(key.ends_with(".pgdump.gz.age"), "{key}");

    // A copy store that flips a byte of what it stores: the copy read back differs, so it is
    // deleted and the attempt retried — never counted as a copy.
    let bad = MemoryStore::corrupting();
    d.copy_store = Some(Arc::new(bad.clone()));
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, _, reason, detail) = copy_row(&pool, backup).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("pending", Some("upload")),
        "{detail:?}"
    );
    assert!(
        detail
            .unwrap_or_default()
            .contains("returned bytes with sha256"),
        "the read-back caught it"
    );
    assert!(bad.bytes(&key).is_none(), "the corrupted copy was deleted");

    // A healthy copy store: the encrypted object is copied byte-for-byte.
    let good = MemoryStore::new();
    d.copy_store = Some(Arc::new(good.clone()));
    sqlx::query("UPDATE backup_copies SET run_after = now()")
        .execute(&pool)
        .await
        .unwrap();
    Copies::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    assert_eq!(copy_row(&pool, backup).await.0, "succeeded");
    assert_eq!(
        good.bytes(&key).unwrap(),
        bytes(primary.as_ref(), &key).await
    );
}
