//! Point-in-time recovery (DESIGN §14) on real parts: a private tenant Postgres initdb'd by the
//! test (wal_level replica, a REPLICATION role), the real wal, scheduler, backups and restores
//! loops, pg_receivewal, pg_basebackup, a private replay server of the same major, pg_dump and
//! the §6 rewind through the tenant's own role.

use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::scheduler::Scheduler;
use backup_worker::loops::wal::Wal;
use backup_worker::loops::Loop;
use backup_worker_testkit::jobs::{job_row, local_deps};
use backup_worker_testkit::{insert_team, pass_ctx, PgServer, TestError};
use sqlx::{Connection, Executor, PgPool};
use uuid::Uuid;

/// A tenant as the platform makes one, plus a REPLICATION role: (tenant URL, replication URL).
async fn pitr_tenant(server: &PgServer) -> Result<(String, String), TestError> {
    sqlx::PgConnection::connect(&server.url("postgres"))
        .await?
        .execute("CREATE ROLE shop_app")
        .await?;
    let url = server
        .tenant_database(
            "shop",
            "shop_owner",
            "owner-pw",
            "CREATE TABLE orders (id int PRIMARY KEY, note text);
             GRANT SELECT, INSERT ON orders TO shop_app;",
        )
        .await?;
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres")).await?;
    admin
        .execute("CREATE ROLE shop_repl LOGIN REPLICATION PASSWORD 'repl-pw'")
        .await?;
    let repl = format!(
        "postgres://shop_repl:repl-pw@127.0.0.1:{}/postgres",
        server.port
    );
    Ok((url, repl))
}

async fn pitr_resource(
    pool: &PgPool,
    tier: &str,
    url: &str,
    repl: &str,
) -> Result<Uuid, TestError> {
    let team = insert_team(pool, tier).await?;
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url, replication_url)
         VALUES ($1, 'postgres', $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(url)
    .bind(repl)
    .fetch_one(pool)
    .await?)
}

async fn ids(url: &str) -> Result<Vec<i32>, TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(&mut c)
        .await?)
}

async fn insert(url: &str, from: i32, to: i32) -> Result<(), TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query("INSERT INTO orders SELECT g, 'order ' || g FROM generate_series($1, $2) g")
        .bind(from)
        .bind(to)
        .execute(&mut c)
        .await?;
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn a_restore_to_an_instant_brings_back_exactly_its_rows(
    pool: PgPool,
) -> Result<(), TestError> {
    let tenant = PgServer::start().await?;
    let (url, repl) = pitr_tenant(&tenant).await?;
    let resource = pitr_resource(&pool, "growth", &url, &repl).await?;
    let (_store, deps) = local_deps(&pool).await?;
    let wal = Wal::new(deps.clone(), true);
    let scheduler = Scheduler::new(
        pool.clone(),
        deps.plans.clone(),
        deps.metrics.clone(),
        std::time::Duration::from_secs(60),
    );

    // The stream starts (slot created), the scheduler asks for a base backup, the backups loop takes it.
    wal.pass(&pass_ctx()).await?;
    let (status, slot): (String, String) =
        sqlx::query_as("SELECT status, slot_name FROM wal_streams WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert_eq!(status, "stopped", "a --once pass releases its stream");
    assert_eq!(slot, format!("backup_worker_{}", resource.simple()));
    let report = scheduler.tick_now().await?;
    assert_eq!(report.base_backups, 1, "{report:?}");
    Backups::new(deps.clone()).pass(&pass_ctx()).await?;
    let (format, bstatus, key, detail): (String, String, Option<String>, Option<String>) =
        sqlx::query_as(
            "SELECT format, status, object_key, internal_detail FROM resource_backups
          WHERE resource_id = $1 AND format = 'base'",
        )
        .bind(resource)
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        (format.as_str(), bstatus.as_str()),
        ("base", "succeeded"),
        "{detail:?}"
    );
    assert!(key.unwrap().ends_with(".base.tar.gz"));

    insert(&url, 1, 100).await?;
    let t: chrono::DateTime<chrono::Utc> = {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut c)
            .await?
    };
    insert(&url, 101, 150).await?;
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        c.execute("DELETE FROM orders WHERE id <= 50").await?;
    }
    wal.pass(&pass_ctx()).await?;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wal_segments WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert!(stored >= 1);

    let restore: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2) RETURNING id",
    )
    .bind(resource)
    .bind(t)
    .fetch_one(&pool)
    .await?;
    Restores::new(deps.clone()).pass(&pass_ctx()).await?;
    let row = job_row(&pool, "resource_restores", restore).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(
        ids(&url).await?,
        (1..=100).collect::<Vec<_>>(),
        "the rows of T and nothing after"
    );
    let chosen: Option<Uuid> =
        sqlx::query_scalar("SELECT backup_id FROM resource_restores WHERE id = $1")
            .bind(restore)
            .fetch_one(&pool)
            .await?;
    assert!(chosen.is_some(), "the base backup chosen is recorded");
    let leftovers = std::fs::read_dir(std::env::temp_dir())?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("backup-worker-pitr-")
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("owner"))
                .ok()
                .as_deref()
                == Some(&std::process::id().to_string())
        })
        .count();
    assert_eq!(leftovers, 0, "the private server's directory is removed");
    Ok(())
}
