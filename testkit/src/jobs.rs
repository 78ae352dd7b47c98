//! One job through the real loops, whatever its outcome: a backup or restore enqueued the way
//! the API does, one pass of its loop, and the row read back (status, attempts, reason, summary,
//! detail) — for tests of failures as much as of successes. Rows are inserted with
//! [`insert_team`](crate::insert_team) / [`insert_resource`](crate::insert_resource).

use std::sync::Arc;

use backup_worker::deps::Deps;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::Loop;
use backup_worker::storage::{LocalStore, ObjectStore};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{pass_ctx, test_config, test_deps, TestError};

/// Deps over a `file://` store in a fresh temporary directory (kept alive by the caller).
pub async fn local_deps(pool: &PgPool) -> Result<(tempfile::TempDir, Deps), TestError> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().to_path_buf()).await?);
    let deps = test_deps(pool.clone(), store, test_config(&[])?)?;
    Ok((dir, deps))
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
pub async fn backup_row(deps: &Deps, resource: Uuid) -> Result<JobRow, TestError> {
    let id = backup_worker::commands::enqueue_backup(&deps.pool, resource).await?;
    Backups::new(deps.clone()).pass(&pass_ctx()).await?;
    job_row(&deps.pool, "resource_backups", id).await
}

/// Enqueues a restore of `backup` into `into`, runs one pass of the restores loop, returns the
/// row.
pub async fn restore_row(deps: &Deps, backup: Uuid, into: Uuid) -> Result<JobRow, TestError> {
    let id = backup_worker::commands::enqueue_restore(&deps.pool, backup, Some(into)).await?;
    Restores::new(deps.clone()).pass(&pass_ctx()).await?;
    job_row(&deps.pool, "resource_restores", id).await
}

/// A backup's or restore's row (`table`: resource_backups | resource_restores).
pub async fn job_row(pool: &PgPool, table: &str, id: Uuid) -> Result<JobRow, TestError> {
    Ok(sqlx::query_as(&format!(
        "SELECT id, status, attempts, failure_reason, error_summary, internal_detail
           FROM {table} WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(pool)
    .await?)
}
