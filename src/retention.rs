//! Housekeeping of the backup store: retention per plan tier, and the sweep of multipart uploads
//! left behind by a crashed process.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::plans::Plans;
use crate::storage::{ObjectStore, StorageError};

/// Rows considered per retention run; the next run continues.
const RETENTION_BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("retention query failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Rows marked `expired`.
    pub expired: u64,
    /// Of those, objects that were already gone.
    pub already_gone: u64,
    /// Objects whose delete failed (the row is expired; the object is logged as an orphan).
    pub delete_failed: u64,
}

/// Expires succeeded backups older than their tier's `backup_retention_days`, never leaving a
/// resource fewer than `backup_keep_last` succeeded ones, and never one a pending or running
/// restore reads. The row is marked first, then the object deleted: a row never points at a
/// missing object, and a failed delete leaves only an orphan object behind.
pub async fn apply_retention(
    pool: &PgPool,
    store: &dyn ObjectStore,
    plans: &Plans,
    now: DateTime<Utc>,
) -> Result<RetentionReport, RetentionError> {
    let a = plans.sql_arrays();
    let candidates: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH plan AS (
             SELECT * FROM unnest($1::text[], $2::int[], $3::int[]) AS p(tier, retention_days, keep_last)
         ),
         ranked AS (
             SELECT b.id, b.object_key, b.finished_at,
                    row_number() OVER (PARTITION BY b.resource_id ORDER BY b.finished_at DESC, b.id) AS rn,
                    COALESCE(p.retention_days, $4) AS retention_days,
                    COALESCE(p.keep_last, $5) AS keep_last
               FROM resource_backups b
               JOIN resources r ON r.id = b.resource_id
               JOIN teams t ON t.id = r.team_id
               LEFT JOIN plan p ON p.tier = t.plan_tier
              WHERE b.status = 'succeeded'
         )
         SELECT id, object_key FROM ranked
          WHERE rn > keep_last
            AND finished_at < $6 - make_interval(days => retention_days)
          ORDER BY finished_at
          LIMIT $7",
    )
    .bind(&a.tiers)
    .bind(&a.retention_days)
    .bind(&a.keep_last)
    .bind(a.default.backup_retention_days as i32)
    .bind(a.default.backup_keep_last as i32)
    .bind(now)
    .bind(RETENTION_BATCH)
    .fetch_all(pool)
    .await?;

    let mut report = RetentionReport::default();
    for (id, key) in candidates {
        let marked = sqlx::query(
            "UPDATE resource_backups SET status = 'expired'
              WHERE id = $1 AND status = 'succeeded'
                AND NOT EXISTS (SELECT 1 FROM resource_restores rr
                                 WHERE rr.backup_id = $1 AND rr.status IN ('pending', 'running'))
                AND NOT EXISTS (SELECT 1 FROM backup_verifications v
                                 WHERE v.backup_id = $1 AND v.status = 'running')",
        )
        .bind(id)
        .execute(pool)
        .await?;
        if marked.rows_affected() == 0 {
            continue; // expired by another replica, or a restore needs it
        }
        report.expired += 1;
        match store.head(&key).await {
            Err(StorageError::NotFound { .. }) => {
                report.already_gone += 1;
                continue;
            }
            Err(e) => {
                tracing::warn!(backup_id = %id, object_key = %key, error = %e, "head before delete failed")
            }
            Ok(_) => {}
        }
        if let Err(e) = store.delete(&key).await {
            report.delete_failed += 1;
            tracing::error!(backup_id = %id, object_key = %key, error = %e,
                "expired backup's object could not be deleted: orphan object");
        }
    }
    Ok(report)
}

/// Aborts uploads under `prefix` started more than `older_than` ago and never finished (the
/// process writing them died), except those whose key starts with one of the stems `in_use`
/// returns (attempts running now). A store's `Initiated` is its own clock, and some report
/// nonsense (moto: always 2010), so age alone must never abort a live worker's upload. `in_use`
/// is asked after the listing: an upload listed belongs either to an attempt still running then,
/// or to one that has completed or aborted it already (aborting it again is a no-op). Returns
/// how many were aborted.
pub async fn abort_stale_uploads<F, Fut>(
    store: &dyn ObjectStore,
    prefix: &str,
    older_than: Duration,
    now: DateTime<Utc>,
    in_use: F,
) -> Result<usize, RetentionError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, sqlx::Error>>,
{
    let Some(cutoff) = chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
    else {
        return Ok(0);
    };
    let old: Vec<_> = store
        .list_incomplete_uploads(prefix)
        .await?
        .into_iter()
        .filter(|u| u.initiated.is_some_and(|t| t < cutoff))
        .collect();
    if old.is_empty() {
        return Ok(0);
    }
    let in_use = in_use().await?;
    let mut aborted = 0;
    for upload in old {
        if in_use
            .iter()
            .any(|stem| upload.key.starts_with(stem.as_str()))
        {
            tracing::warn!(key = %upload.key, initiated = ?upload.initiated,
                "an incomplete upload the store calls stale belongs to a running attempt; kept");
            continue;
        }
        store.abort_incomplete_upload(&upload).await?;
        tracing::info!(key = %upload.key, upload_id = %upload.upload_id, "aborted a stale incomplete upload");
        aborted += 1;
    }
    Ok(aborted)
}

/// Deletes objects queued in `pending_object_deletions` (a destroyed team key's backups), a
/// batch at a time; a row leaves the queue once its object is gone (or was already).
pub async fn delete_requested_objects(
    pool: &PgPool,
    store: &dyn ObjectStore,
) -> Result<u64, RetentionError> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT object_key FROM pending_object_deletions ORDER BY requested_at LIMIT $1",
    )
    .bind(RETENTION_BATCH)
    .fetch_all(pool)
    .await?;
    let mut deleted = 0;
    for key in keys {
        match store.delete(&key).await {
            Ok(()) | Err(StorageError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(object_key = %key, error = %e, "deleting a requested object failed; retried");
                continue;
            }
        }
        sqlx::query("DELETE FROM pending_object_deletions WHERE object_key = $1")
            .bind(&key)
            .execute(pool)
            .await?;
        deleted += 1;
    }
    Ok(deleted)
}
