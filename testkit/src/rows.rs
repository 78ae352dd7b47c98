//! The rows the platform API writes, and one pass of a loop, for tests that drive the loops
//! in-process.

use backup_worker::deps::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::{Loop, PassContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::TestError;

/// A pass context nobody cancels.
pub fn pass_ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("test"),
    }
}

/// A team on `tier`.
pub async fn insert_team(pool: &PgPool, tier: &str) -> Result<Uuid, TestError> {
    Ok(
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ($1) RETURNING id")
            .bind(tier)
            .fetch_one(pool)
            .await?,
    )
}

/// An active resource of `team`.
pub async fn insert_resource(
    pool: &PgPool,
    team: Uuid,
    resource_type: &str,
    url: &str,
) -> Result<Uuid, TestError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3)
         RETURNING id",
    )
    .bind(team)
    .bind(resource_type)
    .bind(url)
    .fetch_one(pool)
    .await?)
}

/// Backs `resource` up through the real backups loop; the succeeded backup's id.
pub async fn back_up(d: &Deps, resource: Uuid) -> Result<Uuid, TestError> {
    let id = backup_worker::commands::enqueue_backup(&d.pool, resource).await?;
    Backups::new(d.clone()).pass(&pass_ctx()).await?;
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_backups WHERE id = $1")
            .bind(id)
            .fetch_one(&d.pool)
            .await?;
    if status != "succeeded" {
        return Err(format!("backup {id} is {status}: {detail:?}").into());
    }
    Ok(id)
}
