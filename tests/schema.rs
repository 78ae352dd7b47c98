//! The schema of DESIGN §2 against a real Postgres: every contract column, idempotent
//! migrations, and the invariants enforced by the database under concurrent writers.

use std::sync::Arc;

use backup_worker::db;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Barrier;
use uuid::Uuid;

const CONTRACT_COLUMNS: &[(&str, &[&str])] = &[
    ("teams", &["id", "plan_tier", "created_at"]),
    (
        "resources",
        &[
            "id",
            "team_id",
            "resource_type",
            "connection_url",
            "status",
            "created_at",
        ],
    ),
    (
        "resource_backups",
        &[
            "id",
            "resource_id",
            "kind",
            "status",
            "attempts",
            "run_after",
            "started_at",
            "lease_expires_at",
            "leased_by",
            "finished_at",
            "object_key",
            "size_bytes",
            "raw_bytes",
            "sha256",
            "failure_reason",
            "error_summary",
            "internal_detail",
            "created_at",
        ],
    ),
    (
        "resource_restores",
        &[
            "id",
            "resource_id",
            "backup_id",
            "status",
            "attempts",
            "run_after",
            "started_at",
            "lease_expires_at",
            "leased_by",
            "finished_at",
            "failure_reason",
            "error_summary",
            "internal_detail",
            "created_at",
        ],
    ),
    (
        "pending_propagations",
        &[
            "id",
            "kind",
            "team_id",
            "resource_id",
            "target_tier",
            "attempts",
            "next_attempt_at",
            "applied_at",
            "failed_at",
            "last_error",
            "created_at",
        ],
    ),
    (
        "audit_log",
        &[
            "id",
            "kind",
            "team_id",
            "resource_id",
            "subject_id",
            "detail",
            "created_at",
        ],
    ),
];

#[sqlx::test]
async fn every_contract_column_exists(pool: PgPool) {
    for (table, columns) in CONTRACT_COLUMNS {
        let have: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1",
        )
        .bind(table)
        .fetch_all(&pool)
        .await
        .unwrap();
        for c in *columns {
            assert!(have.iter().any(|h| h == c), "{table}.{c} missing");
        }
    }
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT unnest(enum_range(NULL::propagation_kind))::text")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kinds, ["tier_elevation", "tier_demotion"]);
    // NOT NULL where the contract says so (the seed worker once bound NULL to started_at).
    let nullable: String = sqlx::query_scalar(
        "SELECT is_nullable::text FROM information_schema.columns
          WHERE table_name = 'resource_backups' AND column_name = 'started_at'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(nullable, "NO");
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_once_and_report_current(pool: PgPool) {
    assert!(!db::migrations_current(&pool).await.unwrap());
    db::migrate(&pool).await.unwrap();
    assert!(db::migrations_current(&pool).await.unwrap());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    db::migrate(&pool).await.unwrap();
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, again);
    assert_eq!(count as usize, db::MIGRATOR.iter().count());
}

/// `sqlx migrate run` (sqlx-cli) resolves the migrations directory at run time with
/// `Migrator::new(path)` and keeps the same `_sqlx_migrations` ledger as the embedded migrator:
/// either order, run twice, is a no-op once current (same versions, same checksums).
#[sqlx::test(migrations = false)]
async fn the_directory_and_the_embedded_migrations_share_one_ledger(pool: PgPool) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let from_dir = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    assert_eq!(from_dir.iter().count(), db::MIGRATOR.iter().count());
    for (a, b) in from_dir.iter().zip(db::MIGRATOR.iter()) {
        assert_eq!((a.version, &a.checksum), (b.version, &b.checksum));
    }
    let ledger = |pool: PgPool| async move {
        sqlx::query_as::<_, (i64, Vec<u8>)>(
            "SELECT version, checksum FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // The directory first (as sqlx-cli would), then the binary's embedded copy, then both again.
    from_dir.run(&pool).await.unwrap();
    let first = ledger(pool.clone()).await;
    db::migrate(&pool).await.unwrap();
    from_dir.run(&pool).await.unwrap();
    db::migrate(&pool).await.unwrap();
    assert_eq!(ledger(pool.clone()).await, first);
    assert!(db::migrations_current(&pool).await.unwrap());
}

async fn seed(pool: &PgPool) -> (Uuid, Uuid) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(pool)
            .await
            .unwrap();
    let resource: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         VALUES ($1, 'postgres', 'postgres://u:p@h/db') RETURNING id",
    )
    .bind(team)
    .fetch_one(pool)
    .await
    .unwrap();
    (team, resource)
}

async fn insert_backup(pool: &PgPool, resource: Uuid, kind: &str) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, kind) VALUES ($1, $2) RETURNING id",
    )
    .bind(resource)
    .bind(kind)
    .fetch_one(pool)
    .await
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

#[sqlx::test]
async fn defaults_and_checks(pool: PgPool) {
    let (_, resource) = seed(&pool).await;
    let id: Uuid =
        sqlx::query_scalar("INSERT INTO resource_backups (resource_id) VALUES ($1) RETURNING id")
            .bind(resource)
            .fetch_one(&pool)
            .await
            .unwrap();
    let (kind, status, attempts): (String, String, i32) =
        sqlx::query_as("SELECT kind, status, attempts FROM resource_backups WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), status.as_str(), attempts),
        ("manual", "pending", 0)
    );

    let bad_status = sqlx::query("UPDATE resource_backups SET status = 'done' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await;
    assert!(bad_status.is_err());
    let null_started = sqlx::query("UPDATE resource_backups SET started_at = NULL WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await;
    assert!(null_started.is_err());
    let running_without_lease =
        sqlx::query("UPDATE resource_backups SET status = 'running' WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await;
    assert!(running_without_lease.is_err());
}

#[sqlx::test]
async fn one_pending_scheduled_backup_per_resource(pool: PgPool) {
    let (_, resource) = seed(&pool).await;
    insert_backup(&pool, resource, "scheduled").await.unwrap();
    let dup = insert_backup(&pool, resource, "scheduled")
        .await
        .unwrap_err();
    assert!(is_unique_violation(&dup), "{dup}");
    // Manual backups are not limited.
    insert_backup(&pool, resource, "manual").await.unwrap();
    insert_backup(&pool, resource, "manual").await.unwrap();
}

const CLAIM_BACKUP: &str = "UPDATE resource_backups
    SET status = 'running', attempts = attempts + 1, started_at = now(),
        leased_by = $2, lease_expires_at = now() + interval '1 minute'
  WHERE id = $1";
const CLAIM_RESTORE: &str = "UPDATE resource_restores
    SET status = 'running', attempts = attempts + 1, started_at = now(),
        leased_by = $2, lease_expires_at = now() + interval '1 minute'
  WHERE id = $1";

/// Eight writers on separate connections try to start an operation on one resource at the same
/// instant — four backups and four restores. The database lets exactly one through.
#[sqlx::test]
async fn at_most_one_running_operation_per_resource(pool: PgPool) {
    let (_, resource) = seed(&pool).await;
    let done: Uuid = insert_backup(&pool, resource, "manual").await.unwrap();
    sqlx::query(
        "UPDATE resource_backups SET status = 'succeeded', object_key = 'k', sha256 = 'x',
                size_bytes = 1, finished_at = now() WHERE id = $1",
    )
    .bind(done)
    .execute(&pool)
    .await
    .unwrap();

    let mut jobs = Vec::new();
    for i in 0..8 {
        let (sql, id) = if i % 2 == 0 {
            (
                CLAIM_BACKUP,
                insert_backup(&pool, resource, "manual").await.unwrap(),
            )
        } else {
            let id: Uuid = sqlx::query_scalar(
                "INSERT INTO resource_restores (resource_id, backup_id) VALUES ($1, $2) RETURNING id",
            )
            .bind(resource)
            .bind(done)
            .fetch_one(&pool)
            .await
            .unwrap();
            (CLAIM_RESTORE, id)
        };
        jobs.push((sql, id));
    }

    let opts = pool.connect_options();
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let mut tasks = Vec::new();
    for (i, (sql, id)) in jobs.into_iter().enumerate() {
        let opts = (*opts).clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let own = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(opts)
                .await
                .unwrap();
            let mut tx = own.begin().await.unwrap();
            barrier.wait().await;
            let r = sqlx::query(sql)
                .bind(id)
                .bind(format!("w{i}"))
                .execute(&mut *tx)
                .await;
            match r {
                Ok(_) => tx.commit().await.is_ok(),
                Err(e) => {
                    assert!(is_unique_violation(&e), "unexpected error: {e}");
                    false
                }
            }
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
    let running: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM resource_backups WHERE status = 'running')
              + (SELECT count(*) FROM resource_restores WHERE status = 'running')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(running, 1);
}

#[sqlx::test]
async fn unknown_propagation_kinds_decode_as_text(pool: PgPool) {
    let (team, _) = seed(&pool).await;
    // A newer API adds a kind before this worker knows it.
    sqlx::query("ALTER TYPE propagation_kind ADD VALUE 'tier_shuffle'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO pending_propagations (kind, team_id, target_tier) VALUES ('tier_shuffle', $1, 'pro')",
    )
    .bind(team)
    .execute(&pool)
    .await
    .unwrap();
    let kind: String = sqlx::query_scalar("SELECT kind::text FROM pending_propagations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kind, "tier_shuffle");
}
