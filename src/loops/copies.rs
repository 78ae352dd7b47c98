//! The copies loop (DESIGN §13): every succeeded backup also lands on the second destination
//! (`COPY_STORAGE_URL`). The dump is taken once; each pass enqueues a `backup_copies` row for
//! succeeded backups that have none yet (newest first, bounded — which is also the backfill when
//! a destination is first configured), then claims rows like the other queues (`jobs`: SKIP
//! LOCKED, lease, fencing, recovery) and streams each object from the primary to the copy store
//! in bounded memory, recomputing the sha256 on the way. The upload is committed only when the
//! bytes read equal the backup row's sha256, and the row only when the copy, read back, does too:
//! a store that corrupts never holds a copy we count. Retried 1 min … 1 h apart, failed after 10
//! attempts. Without a copy destination the loop does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::deps::Deps;
use crate::domain::FailureReason;
use crate::engines::{fail, Failure};
use crate::jobs::{self, FailureOutcome, JobTable, Lease, Stopped};
use crate::storage::{Metadata, ObjectStore, StorageError};

/// The `destination` of copies to COPY_STORAGE_URL (the primary is `primary`).
pub const DESTINATION: &str = "copy";
/// Rows a pass enqueues at most (the backfill of an existing fleet takes several passes).
const ENQUEUE_BATCH: i64 = 1000;
/// A backup is counted unprotected once it has been succeeded this long without every copy.
const UNPROTECTED_AFTER: &str = "1 hour";

/// Where the copy of the primary object `key` lives on the copy store: the same path, under
/// COPY_STORAGE_URL's prefix instead of STORAGE_URL's.
pub fn copy_key(config: &crate::config::Config, key: &str) -> String {
    match &config.copy {
        None => key.to_owned(),
        Some(copy) => {
            let rest = key.strip_prefix(config.storage_url.prefix()).unwrap_or(key);
            format!("{}{rest}", copy.url.prefix())
        }
    }
}

/// A claimed copy and the backup it copies.
#[derive(Debug)]
pub struct Job {
    pub lease: Lease,
    pub backup_id: Uuid,
    /// The primary's key, and the copy's.
    pub object_key: String,
    pub copy_key: String,
    pub sha256: String,
    pub team_id: Uuid,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

enum Attempt {
    Copied { bytes: u64 },
    Failed(Failure),
    Cancelled,
    LeaseLost,
}

pub struct Copies {
    deps: Deps,
    copy: Option<Arc<dyn ObjectStore>>,
    claimer: jobs::Claimer,
    last_recovery: jobs::Every,
    last_reconcile: jobs::Every,
    /// The copy store's reconciliation cursor: the last key seen (None: start over).
    reconcile_after: std::sync::Mutex<Option<String>>,
}

/// Copy objects of backups that are no longer succeeded deleted per pass at most.
const DELETE_BATCH: i64 = 1000;
/// How often the copy store is walked for objects no copy row accounts for, and how many keys a
/// pass walks at most (a cycle continues at the next one).
const RECONCILE_EVERY: Duration = Duration::from_secs(3600);
const RECONCILE_KEYS_PER_PASS: usize = 20_000;

impl Copies {
    pub fn new(deps: Deps) -> Arc<Self> {
        Arc::new(Self {
            copy: deps.copy_store.clone(),
            deps,
            claimer: jobs::Claimer::new(JobTable::Copies),
            last_recovery: jobs::Every::default(),
            last_reconcile: jobs::Every::default(),
            reconcile_after: std::sync::Mutex::default(),
        })
    }

    /// Deletes reach the copy (DESIGN §13): the copy of every backup that is no longer
    /// succeeded (expired by retention, crypto-shredded) is deleted, and its row with it — the
    /// row goes only once the object is gone, so a failed delete is retried, never forgotten.
    /// Rows of copies that never happened (failed) go with their backup. Returns copies deleted.
    pub async fn delete_expired(&self) -> Result<u64, LoopError> {
        let Some(copy) = &self.copy else {
            return Ok(0);
        };
        sqlx::query(
            "DELETE FROM backup_copies c USING resource_backups b
              WHERE b.id = c.backup_id AND c.destination = $1 AND c.status = 'failed'
                AND b.status <> 'succeeded'",
        )
        .bind(DESTINATION)
        .execute(self.pool())
        .await?;
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT c.id, c.object_key FROM backup_copies c JOIN resource_backups b ON b.id = c.backup_id
              WHERE c.destination = $1 AND c.status = 'succeeded' AND c.object_key IS NOT NULL
                AND b.status <> 'succeeded'
              LIMIT $2",
        )
        .bind(DESTINATION)
        .bind(DELETE_BATCH)
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = rows.iter().map(|(_, k)| k.clone()).collect();
        let failed = copy.delete_many(&keys).await;
        for f in &failed {
            tracing::warn!(object_key = %f.key, error = %f.error,
                "deleting an expired backup's copy failed; retried next pass");
        }
        let gone: Vec<Uuid> = rows
            .into_iter()
            .filter(|(_, k)| !failed.iter().any(|f| &f.key == k))
            .map(|(id, _)| id)
            .collect();
        sqlx::query("DELETE FROM backup_copies WHERE id = ANY($1)")
            .bind(&gone)
            .execute(self.pool())
            .await?;
        Ok(gone.len() as u64)
    }

    /// A bounded slice of the copy store's reconciliation: backup-shaped objects under the copy
    /// prefix, older than [`crate::retention::orphan_object_age`], whose backup has no pending,
    /// running or succeeded copy row (a copy whose row was lost, a read-back that failed to
    /// delete) are removed. Returns the objects removed.
    pub async fn reconcile(&self) -> Result<u64, LoopError> {
        let Some(copy) = &self.copy else {
            return Ok(0);
        };
        let prefix = self
            .deps
            .config
            .copy
            .as_ref()
            .map(|c| c.url.prefix().to_owned())
            .unwrap_or_default();
        let age = chrono::Duration::from_std(crate::retention::orphan_object_age(
            self.deps.config.backup_timeout,
        ))
        .unwrap_or(chrono::Duration::days(1));
        let cutoff = chrono::Utc::now() - age;
        let mut after = self
            .reconcile_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (mut listed, mut removed) = (0usize, 0u64);
        loop {
            let (page, more) = copy
                .list_page(&prefix, after.as_deref(), 1000)
                .await
                .map_err(|e| e.to_string())?;
            listed += page.len();
            after = page.last().map(|o| o.key.clone()).or(after);
            let candidates: Vec<(String, Uuid)> = page
                .into_iter()
                .filter(|o| o.last_modified.is_some_and(|t| t < cutoff))
                .filter_map(|o| {
                    crate::retention::backup_object_id(&prefix, &o.key).map(|id| (o.key, id))
                })
                .collect();
            if !candidates.is_empty() {
                let (keys, ids): (Vec<String>, Vec<Uuid>) = candidates.into_iter().unzip();
                let orphans: Vec<String> = sqlx::query_scalar(
                    "SELECT o.k FROM unnest($1::text[], $2::uuid[]) AS o(k, id)
                      WHERE NOT EXISTS (SELECT 1 FROM backup_copies c
                                         WHERE c.backup_id = o.id AND c.destination = $3
                                           AND c.status IN ('pending', 'running', 'succeeded'))",
                )
                .bind(&keys)
                .bind(&ids)
                .bind(DESTINATION)
                .fetch_all(self.pool())
                .await?;
                if !orphans.is_empty() {
                    let failed = copy.delete_many(&orphans).await;
                    removed += (orphans.len() - failed.len()) as u64;
                    for key in orphans
                        .iter()
                        .filter(|k| !failed.iter().any(|f| &f.key == *k))
                    {
                        tracing::info!(object_key = %key, "removed an orphaned copy");
                    }
                }
            }
            if !more {
                after = None;
                break;
            }
            if listed >= RECONCILE_KEYS_PER_PASS {
                break;
            }
        }
        *self
            .reconcile_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = after;
        self.deps.metrics.orphan_objects_removed.inc_by(removed);
        Ok(removed)
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.deps.pool
    }

    /// Copy rows for succeeded backups that have none for this destination, newest first.
    pub async fn enqueue(&self) -> Result<u64, sqlx::Error> {
        if self.copy.is_none() {
            return Ok(0);
        }
        let done = sqlx::query(
            // `copy_status` (kept by triggers on backup_copies) is null while a backup has no
            // copy row: an index range of the uncopied, never every succeeded backup.
            "INSERT INTO backup_copies (backup_id, resource_id, destination)
             SELECT b.id, b.resource_id, $1 FROM resource_backups b
              WHERE b.status = 'succeeded' AND b.copy_status IS NULL
                AND b.object_key IS NOT NULL AND b.sha256 IS NOT NULL
              ORDER BY b.finished_at DESC
              LIMIT $2
             ON CONFLICT (backup_id, destination) DO NOTHING",
        )
        .bind(DESTINATION)
        .bind(ENQUEUE_BATCH)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// `backup_worker_unprotected_backups`: succeeded backups older than an hour that some
    /// configured destination does not hold yet (none without a copy destination).
    pub async fn refresh_unprotected(&self) -> Result<i64, sqlx::Error> {
        let n: i64 = if self.copy.is_none() {
            0
        } else {
            sqlx::query_scalar(&format!(
                "SELECT count(*) FROM resource_backups b
                  WHERE b.status = 'succeeded' AND b.copy_status IS DISTINCT FROM 'succeeded'
                    AND b.finished_at < now() - interval '{UNPROTECTED_AFTER}'"
            ))
            .fetch_one(self.pool())
            .await?
        };
        self.deps.metrics.unprotected_backups.set(n);
        Ok(n)
    }

    /// The claim's candidate query: oldest due first, an index scan of `backup_copies_due_idx`
    /// that stops at the first row it can lock.
    pub fn candidates() -> String {
        format!(
            "SELECT x.id FROM backup_copies x
              WHERE x.status = 'pending' AND x.run_after <= now() AND x.destination = '{DESTINATION}'
              ORDER BY x.run_after, x.created_at
              LIMIT 1
              FOR UPDATE SKIP LOCKED"
        )
    }

    /// One statement, `FOR UPDATE SKIP LOCKED`, with a lease: the oldest due row (a copy does
    /// not wait for the resource's running backup or restore — it never touches the customer).
    pub async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        loop {
            let candidates = Self::candidates();
            let Some(claimed) = self
                .claimer
                .claim(
                    self.pool(),
                    &candidates,
                    &self.deps.config.worker_id,
                    self.deps.config.lease,
                )
                .await?
            else {
                return Ok(None);
            };
            match self.job(claimed.lease.clone()).await {
                Ok(Some(job)) => return Ok(Some(job)),
                Ok(None) => continue,
                Err(e) => {
                    self.claimer
                        .give_back(self.pool(), &claimed.lease, &e)
                        .await;
                    return Err(e);
                }
            }
        }
    }

    /// The job for a claimed row, or `None` when its backup is no longer succeeded (expired
    /// before it was copied): the row is deleted, there is nothing to protect.
    async fn job(&self, lease: Lease) -> Result<Option<Job>, sqlx::Error> {
        type Row = (
            Uuid,
            String,
            Option<String>,
            Option<String>,
            Uuid,
            Option<chrono::DateTime<chrono::Utc>>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT b.id, b.status, b.object_key, b.sha256, r.team_id, b.finished_at
               FROM backup_copies c JOIN resource_backups b ON b.id = c.backup_id
               JOIN resources r ON r.id = b.resource_id
              WHERE c.id = $1",
        )
        .bind(lease.id)
        .fetch_optional(self.pool())
        .await?;
        match row {
            Some((backup_id, status, Some(object_key), Some(sha256), team_id, finished_at))
                if status == "succeeded" =>
            {
                let copy_key = copy_key(&self.deps.config, &object_key);
                Ok(Some(Job {
                    lease,
                    backup_id,
                    object_key,
                    copy_key,
                    sha256,
                    team_id,
                    finished_at: finished_at.unwrap_or_else(chrono::Utc::now),
                }))
            }
            _ => {
                sqlx::query(
                    "DELETE FROM backup_copies
                      WHERE id = $1 AND leased_by = $2 AND attempts = $3 AND status = 'running'",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .execute(self.pool())
                .await?;
                Ok(None)
            }
        }
    }

    pub async fn run_job(self: Arc<Self>, job: Job, abort: CancellationToken) {
        let Some(copy) = self.copy.clone() else {
            return;
        };
        let started = Instant::now();
        let timeout = self.deps.config.backup_timeout;
        let (this, job_ref, abort) = (&self, &job, &abort);
        let ran = jobs::run_leased(
            self.pool(),
            &job.lease,
            self.deps.config.lease,
            |lost| async move {
                let work = async {
                    let bytes =
                        copy_object(this.deps.store.as_ref(), copy.as_ref(), job_ref).await?;
                    this.lock_copy(copy.as_ref(), job_ref).await?;
                    Ok(bytes)
                };
                let attempt = match jobs::until_stopped(work, timeout, abort, &lost).await {
                    Ok(Ok(bytes)) => Attempt::Copied { bytes },
                    Ok(Err(f)) => Attempt::Failed(f),
                    Err(Stopped::TimedOut) => Attempt::Failed(fail(
                        FailureReason::Timeout,
                        format!("the copy exceeded BACKUP_TIMEOUT of {timeout:?}"),
                    )),
                    Err(Stopped::Aborted) => Attempt::Cancelled,
                    Err(Stopped::LeaseLost) => Attempt::LeaseLost,
                };
                let _ = jobs::record(
                    &job_ref.lease,
                    this.deps.config.lease,
                    &lost,
                    "recording the copy's result",
                    || this.finish(job_ref, &attempt, started.elapsed()),
                )
                .await;
            },
        )
        .await;
        if let Err(panicked) = ran {
            jobs::after_panic(self.pool(), &job.lease, &panicked).await;
        }
    }

    /// COPY_OBJECT_LOCK_MODE: the verified copy locked until the backup's retention is over
    /// (+ 1 day). A copy that cannot be locked as configured is deleted and the attempt retried.
    async fn lock_copy(&self, copy: &dyn ObjectStore, job: &Job) -> Result<(), Failure> {
        let Some(mode) = self.deps.config.copy.as_ref().and_then(|c| c.object_lock) else {
            return Ok(());
        };
        let until = crate::retention::retain_until(
            self.pool(),
            &self.deps.plans,
            job.team_id,
            job.finished_at,
        )
        .await
        .map_err(|e| {
            fail(
                FailureReason::Upload,
                format!("reading the team's retention: {e}"),
            )
        })?;
        if let Err(e) = copy.lock(&job.copy_key, mode, until).await {
            let _ = copy.delete(&job.copy_key).await;
            return Err(store_failure(
                &format!("setting Object Lock ({}) on the copy", mode.as_str()),
                &e,
            ));
        }
        Ok(())
    }

    async fn finish(
        &self,
        job: &Job,
        attempt: &Attempt,
        elapsed: Duration,
    ) -> Result<(), sqlx::Error> {
        let lease = &job.lease;
        let m = &self.deps.metrics;
        match attempt {
            Attempt::Copied { bytes } => {
                let done = sqlx::query(
                    "UPDATE backup_copies
                        SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL,
                            object_key = $4, sha256 = $5, failure_reason = NULL,
                            error_summary = NULL, internal_detail = NULL
                      WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .bind(&job.copy_key)
                .bind(&job.sha256)
                .execute(self.pool())
                .await?;
                if done.rows_affected() == 0 {
                    tracing::warn!(copy_id = %lease.id, "lease taken over before the copy was recorded");
                    return Ok(());
                }
                m.copies.with_label_values(&[DESTINATION, "ok"]).inc();
                tracing::info!(copy_id = %lease.id, backup_id = %job.backup_id, bytes,
                    seconds = elapsed.as_secs_f64(), "backup copied");
            }
            Attempt::Failed(f) => {
                let internal = crate::secret::redact_credentials(&f.detail);
                let internal: String = internal.chars().take(8192).collect();
                let mut tx = self.pool().begin().await?;
                let outcome = jobs::record_failure(&mut tx, lease, f.reason, &internal).await?;
                tx.commit().await?;
                match outcome {
                    FailureOutcome::Retry { after } => {
                        tracing::warn!(copy_id = %lease.id, backup_id = %job.backup_id, reason = f.reason.as_str(),
                            retry_in_s = after.as_secs(), detail = %internal, "copy failed; retrying")
                    }
                    FailureOutcome::Failed => {
                        m.copies
                            .with_label_values(&[DESTINATION, f.reason.as_str()])
                            .inc();
                        tracing::error!(copy_id = %lease.id, backup_id = %job.backup_id, reason = f.reason.as_str(),
                            detail = %internal, "copy failed for good");
                    }
                    FailureOutcome::Stale => {}
                }
            }
            Attempt::Cancelled => {
                jobs::release(self.pool(), lease).await?;
            }
            Attempt::LeaseLost => {}
        }
        Ok(())
    }

    async fn recover(&self) {
        let recovered = async {
            let mut tx = self.pool().begin().await?;
            let rows = jobs::recover_expired(&mut tx, JobTable::Copies).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        match recovered {
            Ok(rows) => {
                for r in rows {
                    tracing::warn!(copy_id = %r.id, failed = r.failed, "recovered a copy whose lease expired");
                    // A dead attempt cleans up nothing: its upload to the copy store is aborted
                    // here, before the row can be claimed again.
                    if let Err(e) = self.abort_dead_upload(r.id).await {
                        tracing::warn!(copy_id = %r.id, error = %e,
                            "aborting a dead copy attempt's upload failed; the copy store may keep its parts");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "stuck-copy recovery failed"),
        }
    }

    /// Aborts the incomplete uploads under a copy's key (a replica died mid-upload).
    async fn abort_dead_upload(&self, copy_id: Uuid) -> Result<(), LoopError> {
        let Some(copy) = &self.copy else {
            return Ok(());
        };
        let key: Option<String> = sqlx::query_scalar(
            "SELECT b.object_key FROM backup_copies c JOIN resource_backups b ON b.id = c.backup_id
              WHERE c.id = $1",
        )
        .bind(copy_id)
        .fetch_optional(self.pool())
        .await?
        .flatten();
        let Some(key) = key else {
            return Ok(());
        };
        let target = copy_key(&self.deps.config, &key);
        for upload in copy
            .list_incomplete_uploads(&target)
            .await
            .map_err(|e| e.to_string())?
        {
            if upload.key == target {
                copy.abort_incomplete_upload(&upload)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(object_key = %upload.key, "aborted a dead copy attempt's upload");
            }
        }
        Ok(())
    }
}

fn store_failure(what: &str, e: &StorageError) -> Failure {
    let reason = match e {
        StorageError::NotFound { .. } => FailureReason::Integrity,
        _ => FailureReason::Upload,
    };
    fail(reason, format!("{what}: {e}"))
}

/// Streams `job`'s object from `primary` to `copy` (its copy key, the same metadata), hashing it:
/// the upload is committed only when the bytes equal the row's sha256, and kept only when the
/// copy read back does too. Returns the bytes copied.
async fn copy_object(
    primary: &dyn ObjectStore,
    copy: &dyn ObjectStore,
    job: &Job,
) -> Result<u64, Failure> {
    let (key, target) = (&job.object_key, &job.copy_key);
    let (_, metadata) = primary
        .head(key)
        .await
        .map_err(|e| store_failure("reading the primary object", &e))?;
    let mut source = primary
        .get(key)
        .await
        .map_err(|e| store_failure("reading the primary object", &e))?;
    let mut upload = copy
        .begin_upload(target, metadata)
        .await
        .map_err(|e| store_failure("starting the copy's upload", &e))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match source.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(fail(
                    FailureReason::Upload,
                    format!("reading the primary object: {e}"),
                ));
            }
        };
        hasher.update(&buf[..n]);
        bytes += n as u64;
        if let Err(e) = upload.write(&buf[..n]).await {
            let _ = upload.abort().await;
            return Err(store_failure("writing the copy", &e));
        }
    }
    let read = hex::encode(hasher.finalize());
    if read != job.sha256 {
        let _ = upload.abort().await;
        return Err(fail(
            FailureReason::Integrity,
            format!(
                "the primary object's sha256 is {read}, the backup row's {}: not copied (the primary is damaged)",
                job.sha256
            ),
        ));
    }
    upload
        .commit(Metadata::new())
        .await
        .map_err(|e| store_failure("committing the copy", &e))?;
    let held = read_sha256(copy, target)
        .await
        .map_err(|e| store_failure("reading the copy back", &e))?;
    if held != job.sha256 {
        let _ = copy.delete(target).await;
        return Err(fail(
            FailureReason::Upload,
            format!(
                "the copy store returned bytes with sha256 {held}, not {}: the copy was deleted",
                job.sha256
            ),
        ));
    }
    Ok(bytes)
}

/// The sha256 of an object as a store returns it.
async fn read_sha256(store: &dyn ObjectStore, key: &str) -> Result<String, StorageError> {
    let mut r = store.get(key).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = r.read(&mut buf).await.map_err(|source| StorageError::Io {
            op: "read back",
            path: key.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[async_trait]
impl Loop for Arc<Copies> {
    fn name(&self) -> LoopName {
        LoopName::Copies
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(30)
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        if self.copy.is_none() {
            return Ok(());
        }
        let enqueued = self.enqueue().await?;
        if enqueued > 0 {
            tracing::info!(enqueued, "copies enqueued");
        }
        let deleted = self.delete_expired().await?;
        if deleted > 0 {
            tracing::info!(deleted, "copies of expired backups deleted");
        }
        let continuing = self
            .reconcile_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let reconcile = self.last_reconcile.due(RECONCILE_EVERY) || continuing;
        if reconcile {
            if let Err(e) = self.reconcile().await {
                tracing::error!(error = %e, "reconciling the copy store failed; tried again next hour");
            }
        }
        jobs::drive(self, ctx).await?;
        self.refresh_unprotected().await?;
        Ok(())
    }
}

#[async_trait]
impl jobs::Queue for Copies {
    type Job = Job;

    fn concurrency(&self) -> usize {
        self.deps.config.backup_concurrency
    }

    async fn housekeeping(&self, _heartbeat: &crate::health::Heartbeat) {
        self.claimer.settle(self.pool()).await;
        if self
            .last_recovery
            .due(jobs::recovery_every(self.deps.config.lease))
        {
            self.recover().await;
        }
    }

    async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        Copies::claim(self).await
    }

    async fn run(self: Arc<Self>, job: Job, abort: CancellationToken) {
        tracing::info!(copy_id = %job.lease.id, backup_id = %job.backup_id,
            attempt = job.lease.attempts, "copy claimed");
        self.run_job(job, abort).await;
    }
}
