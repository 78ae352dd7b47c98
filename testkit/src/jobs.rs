//! Driving the real loops one pass at a time: a team, a resource, a backup or restore enqueued
//! the way the API does, one pass of the loop, the row read back.

use std::sync::Arc;

use backup_worker::deps::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::storage::{LocalStore, ObjectStore};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{test_config, test_deps, TestError};

fn ctx(name: &'static str) -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached(name),
    }
}

/// Deps over a `file://` store in a fresh temporary directory (kept alive by the caller).
pub async fn local_deps(pool: &PgPool) -> Result<(tempfile::TempDir, Deps), TestError> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().to_path_buf()).await?);
    let deps = test_deps(pool.clone(), store, test_config(&[])?)?;
    Ok((dir, deps))
}

/// A team and a resource of it.
pub async fn team_resource(pool: &PgPool, ty: &str, url: &str) -> Result<Uuid, TestError> {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(pool)
            .await?;
    another_resource(pool, team, ty, url).await
}

/// Another resource of `team` (e.g. a clone's target).
pub async fn another_resource(
    pool: &PgPool,
    team: Uuid,
    ty: &str,
    url: &str,
) -> Result<Uuid, TestError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(ty)
    .bind(url)
    .fetch_one(pool)
    .await?)
}

pub async fn team_of(pool: &PgPool, resource: Uuid) -> Result<Uuid, TestError> {
    Ok(
        sqlx::query_scalar("SELECT team_id FROM resources WHERE id = $1")
            .bind(resource)
            .fetch_one(pool)
            .await?,
    )
}

/// What a job's row says after a pass.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub status: String,
    pub attempts: i32,
    pub failure_reason: Option<String>,
    pub error_summary: Option<String>,
    pub internal_detail: Option<String>,
}

/// Enqueues a backup of `resource`, runs one pass of the backups loop, returns the row.
pub async fn back_up(deps: &Deps, resource: Uuid) -> Result<JobRow, TestError> {
    let id = backup_worker::commands::enqueue_backup(&deps.pool, resource).await?;
    Backups::new(deps.clone()).pass(&ctx("backups")).await?;
    job_row(&deps.pool, "resource_backups", id).await
}

/// Enqueues a restore of `backup` into `into`, runs one pass of the restores loop, returns the
/// row.
pub async fn restore(deps: &Deps, backup: Uuid, into: Uuid) -> Result<JobRow, TestError> {
    let id = backup_worker::commands::enqueue_restore(&deps.pool, backup, Some(into)).await?;
    Restores::new(deps.clone()).pass(&ctx("restores")).await?;
    job_row(&deps.pool, "resource_restores", id).await
}

pub async fn job_row(pool: &PgPool, table: &str, id: Uuid) -> Result<JobRow, TestError> {
    Ok(sqlx::query_as(&format!(
        "SELECT id, status, attempts, failure_reason, error_summary, internal_detail
           FROM {table} WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(pool)
    .await?)
}
