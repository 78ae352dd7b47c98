//! Anomalies (DESIGN §15) on real parts: a real Postgres tenant whose content collapses (raw size
//! below half: `size`), a real redis-server whose big logical database loses most of its keys
//! (the verifier's counts: `content`); the audit rows, the metric, `backup-worker backups` and
//! `backups --accept` through the real binary; no false alarm on a resource's first backup, an
//! empty database or a small one.

use std::sync::Arc;

use backup_worker::deps::Deps;
use backup_worker::loops::verifier::Verifier;
use backup_worker::storage::{LocalStore, ObjectStore};
use backup_worker_testkit::{
    back_up, database_url, insert_resource, insert_team, test_config, test_deps, PgServer,
    RedisServer,
};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");

async fn deps(pool: &PgPool, dir: &std::path::Path) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.to_path_buf()).await.unwrap());
    test_deps(pool.clone(), store, test_config(&[]).unwrap()).unwrap()
}

async fn anomaly(pool: &PgPool, backup: Uuid) -> Option<Value> {
    sqlx::query_scalar("SELECT anomaly FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn audits(pool: &PgPool, kind: &str, backup: Uuid) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE kind = $1 AND subject_id = $2 ORDER BY id",
    )
    .bind(kind)
    .bind(backup)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `backup-worker <args>` against the test database: (exit ok, stdout + stderr).
fn cli(pool: &PgPool, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", database_url(pool))
        .env("LOG_FORMAT", "pretty")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[sqlx::test]
async fn a_postgres_backup_whose_raw_size_collapsed_is_flagged_and_an_empty_one_is_not(
    pool: PgPool,
) {
    let pg = PgServer::start().await.unwrap();
    // ~3 MB of rows: well above the size floor.
    let url = pg
        .tenant_database(
            "shop",
            "shop_owner",
            "pw-shop",
            "CREATE TABLE orders (id int PRIMARY KEY, note text);
             INSERT INTO orders SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g;",
        )
        .await
        .unwrap();
    let empty = pg
        .tenant_database("empty", "empty_owner", "pw-empty", "SELECT 1")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path()).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let shop = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let quiet = insert_resource(&pool, team, "postgres", &empty)
        .await
        .unwrap();

    let first = back_up(&d, shop).await.unwrap();
    assert_eq!(
        anomaly(&pool, first).await,
        None,
        "a resource's first backup is never flagged"
    );
    let e1 = back_up(&d, quiet).await.unwrap();
    let e2 = back_up(&d, quiet).await.unwrap();

    // A bad deploy's mass DELETE.
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("DELETE FROM orders WHERE id > 3000")
        .execute(&mut c)
        .await
        .unwrap();
    let second = back_up(&d, shop).await.unwrap();

    let flagged = anomaly(&pool, second)
        .await
        .expect("the collapsed backup is flagged");
    let (from, to): (i64, i64) = sqlx::query_as("SELECT (SELECT raw_bytes FROM resource_backups WHERE id = $1), (SELECT raw_bytes FROM resource_backups WHERE id = $2)")
        .bind(first)
        .bind(second)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(to * 2 < from, "{from} → {to}");
    assert_eq!(flagged["size"]["from_raw_bytes"], from, "{flagged}");
    assert_eq!(flagged["size"]["to_raw_bytes"], to);
    assert_eq!(flagged["size"]["previous_backup_id"], first.to_string());
    let audit = audits(&pool, "backup.anomaly", second).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["kind"], "size");
    assert_eq!(audit[0]["from_raw_bytes"], from);
    assert_eq!(audit[0]["resource_type"], "postgres");
    assert_eq!(
        d.metrics
            .backup_anomalies
            .with_label_values(&["postgres", "size"])
            .get(),
        1
    );
    assert_eq!(anomaly(&pool, e1).await, None);
    assert_eq!(
        anomaly(&pool, e2).await,
        None,
        "an empty database is no alarm"
    );
    assert!(d.metrics.render().contains(
        "backup_worker_backup_anomalies_total{kind=\"size\",resource_type=\"postgres\"} 1"
    ));

    // The operator's view and the way out.
    let (ok, text) = cli(&pool, &["backups", &shop.to_string()]);
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&second.to_string()))
        .unwrap();
    assert!(line.trim_end().ends_with("size"), "{line}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&first.to_string()))
        .unwrap();
    assert!(line.trim_end().ends_with('-'), "{line}");
    assert!(text.contains("1 backup flagged as an anomaly"), "{text}");
    assert!(text.contains("--accept"), "{text}");

    let (ok, text) = cli(&pool, &["backups", "--accept", &second.to_string()]);
    assert!(ok, "{text}");
    assert!(text.contains("anomaly accepted"), "{text}");
    assert_eq!(anomaly(&pool, second).await, None);
    let accepted = audits(&pool, "backup.anomaly_accepted", second).await;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["anomaly"], flagged);
    let (ok, text) = cli(&pool, &["backups", &shop.to_string()]);
    assert!(ok);
    let line = text
        .lines()
        .find(|l| l.starts_with(&second.to_string()))
        .unwrap();
    assert!(line.trim_end().ends_with("accepted"), "{line}");
    assert!(!text.contains("flagged as an anomaly"), "{text}");
    // Twice: a clear error, nothing written.
    let (ok, text) = cli(&pool, &["backups", "--accept", &second.to_string()]);
    assert!(!ok);
    assert!(text.contains("is not flagged as an anomaly"), "{text}");
    let (ok, text) = cli(&pool, &["backups", "--accept", &Uuid::new_v4().to_string()]);
    assert!(!ok);
    assert!(text.contains("not found"), "{text}");
    assert_eq!(
        audits(&pool, "backup.anomaly_accepted", second).await.len(),
        1
    );
}

/// Keys `key:<i>` in logical database `db`.
async fn fill(server: &RedisServer, db: u32, n: usize) {
    let pairs: Vec<String> = (0..n)
        .flat_map(|i| [format!("key:{i}"), format!("v{i}")])
        .collect();
    let db = db.to_string();
    let mut args = vec!["-n", db.as_str(), "MSET"];
    args.extend(pairs.iter().map(String::as_str));
    server.cli(&args).await.unwrap();
}

#[sqlx::test]
async fn a_redis_database_that_lost_most_of_its_keys_is_flagged_from_the_verifiers_counts(
    pool: PgPool,
) {
    let src = RedisServer::start(None).await.unwrap();
    fill(&src, 0, 3000).await;
    fill(&src, 3, 999).await; // small: never flagged
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path()).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let verifier = Verifier::new(d.clone());

    let first = back_up(&d, r).await.unwrap();
    let report = verifier.verify_now(first).await.unwrap();
    assert_eq!(report.status, "verified", "{:?}", report.internal_detail);
    assert_eq!(report.detail["databases"]["0"], 3000, "{}", report.detail);
    assert_eq!(anomaly(&pool, first).await, None, "first backup");

    // Growth and small changes are no alarm.
    fill(&src, 0, 3500).await;
    let grown = back_up(&d, r).await.unwrap();
    verifier.verify_now(grown).await.unwrap();
    assert_eq!(anomaly(&pool, grown).await, None);

    // Most of database 0 goes; database 3 (999 keys) empties entirely.
    src.cli(&["-n", "0", "FLUSHDB"]).await.unwrap();
    fill(&src, 0, 1000).await;
    src.cli(&["-n", "3", "FLUSHDB"]).await.unwrap();
    let collapsed = back_up(&d, r).await.unwrap();
    assert_eq!(
        anomaly(&pool, collapsed).await,
        None,
        "kilobytes: below the size floor"
    );
    let report = verifier.verify_now(collapsed).await.unwrap();
    assert_eq!(report.status, "verified");
    let flagged = anomaly(&pool, collapsed)
        .await
        .expect("flagged by the verifier's counts");
    let changes = flagged["content"]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{flagged}");
    assert_eq!(changes[0]["name"], "0");
    assert_eq!(changes[0]["from"], 3500);
    assert_eq!(changes[0]["to"], 1000);
    assert_eq!(changes[0]["change"], "shrank");
    assert_eq!(flagged["content"]["previous_backup_id"], grown.to_string());
    let audit = audits(&pool, "backup.anomaly", collapsed).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["kind"], "content");
    assert_eq!(audit[0]["resource_type"], "redis");
    assert_eq!(
        d.metrics
            .backup_anomalies
            .with_label_values(&["redis", "content"])
            .get(),
        1
    );

    // Accepted, then verified again: not flagged a second time.
    let (ok, text) = cli(&pool, &["backups", "--accept", &collapsed.to_string()]);
    assert!(ok, "{text}");
    verifier.verify_now(collapsed).await.unwrap();
    assert_eq!(anomaly(&pool, collapsed).await, None);
    assert_eq!(audits(&pool, "backup.anomaly", collapsed).await.len(), 1);

    // A vanished database that was big is flagged.
    src.cli(&["-n", "0", "FLUSHDB"]).await.unwrap();
    fill(&src, 5, 10).await;
    let gone = back_up(&d, r).await.unwrap();
    verifier.verify_now(gone).await.unwrap();
    let flagged = anomaly(&pool, gone).await.expect("database 0 vanished");
    assert_eq!(
        flagged["content"]["changes"][0]["change"], "vanished",
        "{flagged}"
    );
    assert_eq!(flagged["content"]["changes"][0]["from"], 1000);
}
