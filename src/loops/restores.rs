//! Restores (DESIGN §6): claim a `resource_restores` row with a lease, check the guards, download
//! and verify the backup, and rewind the resource with its engine — [`Restores::attempt`] reads
//! top to bottom. Lease renewal, fencing, retries and recovery are the backups' (jobs.rs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::db::audit;
use crate::deps::Deps;
use crate::domain::{FailureReason, ResourceType};
use crate::engines::{self, Failure, RestoreReport, RestoreTarget};
use crate::jobs::{self, FailureOutcome, JobTable, Lease, Stopped};
use crate::restore;
use crate::secret::Secret;

/// A claimed restore, its target and the backup it rewinds to.
/// Claim order: oldest due first (`resource_restores_due_idx` holds it, so a claim reads O(1) rows).
pub const CLAIM_ORDER: &str = "x.run_after, x.created_at, x.id";

#[derive(Debug)]
pub struct Job {
    pub lease: Lease,
    pub resource_id: Uuid,
    pub backup_id: Uuid,
    pub team_id: Uuid,
    pub resource_type: String,
    pub resource_status: String,
    pub connection_url: Secret,
    pub backup_status: String,
    pub backup_team_id: Uuid,
    pub backup_resource_type: String,
    /// The connection of the resource the backup was taken of (a clone's source).
    pub backup_connection_url: Secret,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    /// Stored bytes: what the download needs on the temporary volume.
    pub size_bytes: Option<i64>,
    /// The team key the backup is encrypted to (DESIGN §12).
    pub key_id: Option<Uuid>,
    /// A restore to an instant (DESIGN §14): the worker chooses the base backup.
    pub target_time: Option<chrono::DateTime<chrono::Utc>>,
}

enum Attempt {
    /// With what the target could not take as it was (grants, owners), never silent.
    Succeeded(RestoreReport, restore::Source),
    Failed(Failure),
    Cancelled,
    LeaseLost,
}

/// Why an attempt stopped short of success.
enum Halt {
    Failed(Failure),
    /// The lease is not ours (or not known to be): nothing may be written.
    LeaseLost,
}

impl From<Failure> for Halt {
    fn from(f: Failure) -> Self {
        Halt::Failed(f)
    }
}

#[derive(sqlx::FromRow)]
struct Context {
    backup_id: Option<Uuid>,
    team_id: Uuid,
    resource_type: String,
    resource_status: String,
    connection_url: String,
    backup_status: Option<String>,
    backup_team_id: Option<Uuid>,
    backup_resource_type: Option<String>,
    backup_connection_url: Option<String>,
    object_key: Option<String>,
    sha256: Option<String>,
    size_bytes: Option<i64>,
    key_id: Option<Uuid>,
    target_time: Option<chrono::DateTime<chrono::Utc>>,
}

pub struct Restores {
    deps: Deps,
    claimer: jobs::Claimer,
    last_recovery: jobs::Every,
}

impl Restores {
    pub fn new(deps: Deps) -> Arc<Self> {
        Arc::new(Self {
            deps,
            claimer: jobs::Claimer::new(JobTable::Restores),
            last_recovery: jobs::Every::default(),
        })
    }

    fn pool(&self) -> &PgPool {
        &self.deps.pool
    }

    /// One statement, `FOR UPDATE SKIP LOCKED`, with a lease; never beside a running backup or
    /// restore of the same resource (the database enforces it too).
    pub async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        let Some(claimed) = self
            .claimer
            .claim_next(
                self.pool(),
                CLAIM_ORDER,
                &self.deps.config.worker_id,
                self.deps.config.lease,
            )
            .await?
        else {
            return Ok(None);
        };
        let context: Result<Context, sqlx::Error> = sqlx::query_as(
            "SELECT rr.backup_id, tr.team_id, tr.resource_type, tr.status AS resource_status,
                    tr.connection_url, b.status AS backup_status, br.team_id AS backup_team_id,
                    br.resource_type AS backup_resource_type, br.connection_url AS backup_connection_url,
                    b.object_key, b.sha256, b.size_bytes, b.key_id, rr.target_time
               FROM resource_restores rr
               JOIN resources tr ON tr.id = rr.resource_id
               LEFT JOIN resource_backups b ON b.id = rr.backup_id
               LEFT JOIN resources br ON br.id = b.resource_id
              WHERE rr.id = $1",
        )
        .bind(claimed.lease.id)
        .fetch_one(self.pool())
        .await;
        let c = match context {
            Ok(c) => c,
            Err(e) => {
                self.claimer
                    .give_back(self.pool(), &claimed.lease, &e)
                    .await;
                return Err(e);
            }
        };
        Ok(Some(Job {
            lease: claimed.lease,
            resource_id: claimed.resource_id,
            backup_id: c.backup_id.unwrap_or_default(),
            team_id: c.team_id,
            resource_type: c.resource_type,
            resource_status: c.resource_status,
            connection_url: Secret::new(c.connection_url.clone()),
            backup_status: c.backup_status.unwrap_or_else(|| "none".into()),
            backup_team_id: c.backup_team_id.unwrap_or(c.team_id),
            backup_resource_type: c.backup_resource_type.unwrap_or_default(),
            backup_connection_url: Secret::new(c.backup_connection_url.unwrap_or(c.connection_url)),
            target_time: c.target_time,
            object_key: c.object_key,
            sha256: c.sha256,
            size_bytes: c.size_bytes,
            key_id: c.key_id,
        }))
    }

    /// Runs one claimed restore to a recorded result. The lease is renewed until the result is
    /// recorded, and the recording is retried while the lease holds: a result lost to a database
    /// blip left the row running until its lease expired, and the rewind ran again (DESIGN §6).
    pub async fn run_job(self: Arc<Self>, job: Job, abort: CancellationToken) {
        let started = Instant::now();
        let timeout = self.deps.config.backup_timeout;
        let (this, job_ref, abort) = (&self, &job, &abort);
        let ran = jobs::run_leased(
            self.pool(),
            &job.lease,
            self.deps.config.lease,
            |lost| async move {
                // Dropping the attempt kills its children (kill_on_drop): psql's open transaction
                // rolls back; a Redis copy stops and is redone by the retry.
                let attempt =
                    match jobs::until_stopped(this.attempt(job_ref, &lost), timeout, abort, &lost)
                        .await
                    {
                        Ok(Ok((report, source))) => Attempt::Succeeded(report, source),
                        Ok(Err(Halt::Failed(f))) => Attempt::Failed(f),
                        Ok(Err(Halt::LeaseLost)) => Attempt::LeaseLost,
                        Err(Stopped::TimedOut) => Attempt::Failed(Failure {
                            reason: FailureReason::Timeout,
                            detail: format!("restore exceeded BACKUP_TIMEOUT of {timeout:?}"),
                        }),
                        Err(Stopped::Aborted) => Attempt::Cancelled,
                        Err(Stopped::LeaseLost) => Attempt::LeaseLost,
                    };
                // Left unrecorded, the row waits out its lease; if its rewind had begun the
                // recovery then fails it as an unknown outcome (never re-run).
                let _ = jobs::record(
                    &job_ref.lease,
                    this.deps.config.lease,
                    &lost,
                    "recording the restore result",
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

    /// Guards, then download + verify, then — once the row records that the destructive step
    /// begins — the engine's rewind.
    async fn attempt(
        &self,
        job: &Job,
        lost: &CancellationToken,
    ) -> Result<(RestoreReport, restore::Source), Halt> {
        let config = |detail: String| {
            Halt::Failed(Failure {
                reason: FailureReason::Config,
                detail,
            })
        };
        if let Some(target) = job.target_time {
            return self.attempt_to_time(job, target, lost).await;
        }
        // Another team's backup is never reachable, whatever the row says.
        if job.backup_team_id != job.team_id {
            return Err(config(format!(
                "backup {} belongs to another team",
                job.backup_id
            )));
        }
        // A crypto-shredded backup says so, whatever else is true of it.
        let identity = restore::backup_identity(
            self.pool(),
            self.deps.config.master_key.as_deref(),
            job.key_id,
        )
        .await?;
        if job.backup_status != "succeeded" {
            return Err(config(format!(
                "backup {} is {}, not succeeded",
                job.backup_id, job.backup_status
            )));
        }
        if job.backup_resource_type != job.resource_type {
            return Err(config(format!(
                "backup {} is of a {} resource; the target is {}",
                job.backup_id, job.backup_resource_type, job.resource_type
            )));
        }
        if job.resource_status == "deleted" {
            return Err(config("target resource is deleted".into()));
        }
        let Some(resource_type) = ResourceType::parse(&job.resource_type) else {
            return Err(config(format!(
                "unsupported resource type {:?}",
                job.resource_type
            )));
        };
        if engines::is_control_database(
            resource_type,
            &job.connection_url,
            &self.deps.config.database_url,
        )
        .await
        {
            return Err(config(
                "the target resource is backup-worker's own control database (DATABASE_URL): \
                 restoring into it would rewind the worker's queue; restore into another resource"
                    .into(),
            ));
        }
        let (Some(key), Some(sha)) = (&job.object_key, &job.sha256) else {
            return Err(config("backup row has no object".into()));
        };
        let temp = crate::process::private_tempdir().map_err(|e| Failure {
            reason: FailureReason::Dump,
            detail: format!("cannot create a temporary directory: {e}"),
        })?;
        let copy_key = crate::loops::copies::copy_key(&self.deps.config, key);
        let (backup, source) = restore::download_from_any(
            self.deps.store.as_ref(),
            self.deps
                .copy_store
                .as_deref()
                .map(|store| (store, copy_key.as_str())),
            key,
            sha,
            job.size_bytes.and_then(|n| u64::try_from(n).ok()),
            || engines::stream_check(resource_type),
            temp.path(),
            identity,
        )
        .await?;
        let target = RestoreTarget {
            tools: &self.deps.tools,
            url: &job.connection_url,
            source_url: &job.backup_connection_url,
            temp: temp.path(),
        };
        Ok((
            self.rewind(job, lost, resource_type, &target, &backup)
                .await?,
            source,
        ))
    }

    /// The destructive step, at most once per row: from the mark on, a lapsed lease means
    /// "outcome unknown", not "run it again". Without the mark written there is no rewind (the
    /// row is not ours, or the database cannot say so): the job stops and the recovery gives the
    /// row back.
    async fn rewind(
        &self,
        job: &Job,
        lost: &CancellationToken,
        resource_type: ResourceType,
        target: &RestoreTarget<'_>,
        backup: &engines::BackupFile,
    ) -> Result<RestoreReport, Halt> {
        let marked = jobs::record(
            &job.lease,
            self.deps.config.lease,
            lost,
            "marking the restore's rewind as begun",
            || jobs::mark_applying(self.pool(), &job.lease),
        )
        .await;
        if marked != Ok(true) {
            return Err(Halt::LeaseLost);
        }
        Ok(engines::restore(resource_type, target, backup).await?)
    }

    /// A restore to an instant (DESIGN §14): the newest base backup whose WAL chain reaches the
    /// target, replayed in a private server of its major to the target, dumped, and rewound into
    /// the resource with the §6 rewind. The chosen base backup is recorded in `backup_id`.
    async fn attempt_to_time(
        &self,
        job: &Job,
        target: chrono::DateTime<chrono::Utc>,
        lost: &CancellationToken,
    ) -> Result<(RestoreReport, restore::Source), Halt> {
        let config = |detail: String| Halt::Failed(engines::fail(FailureReason::Config, detail));
        let Some(resource_type @ (ResourceType::Postgres | ResourceType::Vector)) =
            ResourceType::parse(&job.resource_type)
        else {
            return Err(config(format!(
                "restores to a point in time are for postgres and vector, not {}",
                job.resource_type
            )));
        };
        if job.resource_status == "deleted" {
            return Err(config("target resource is deleted".into()));
        }
        if job.backup_id != Uuid::nil() && job.backup_team_id != job.team_id {
            return Err(config(format!(
                "backup {} belongs to another team",
                job.backup_id
            )));
        }
        if engines::is_control_database(
            resource_type,
            &job.connection_url,
            &self.deps.config.database_url,
        )
        .await
        {
            return Err(config(
                "the target resource is backup-worker's own control database (DATABASE_URL)".into(),
            ));
        }
        let history = crate::pitr::History::load(self.pool(), job.resource_id)
            .await
            .map_err(|e| {
                engines::fail(
                    FailureReason::Unreachable,
                    format!("reading the WAL history: {e}"),
                )
            })?;
        let (base, window) = history.plan(target)?;
        sqlx::query(
            "UPDATE resource_restores SET backup_id = $4
              WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
        )
        .bind(job.lease.id)
        .bind(&job.lease.worker)
        .bind(job.lease.attempts)
        .bind(base.id)
        .execute(self.pool())
        .await
        .map_err(|e| {
            engines::fail(
                FailureReason::Unreachable,
                format!("recording the chosen base backup: {e}"),
            )
        })?;
        let identity = restore::backup_identity(
            self.pool(),
            self.deps.config.master_key.as_deref(),
            base.key_id,
        )
        .await?;
        let temp = crate::process::private_tempdir().map_err(|e| {
            engines::fail(
                FailureReason::Dump,
                format!("cannot create a temporary directory: {e}"),
            )
        })?;
        let slot: crate::engines::postgres::base::BaseInfoSlot = Default::default();
        let (base_file, source) = restore::download_from_any(
            self.deps.store.as_ref(),
            None,
            &base.object_key,
            &base.sha256,
            base.size_bytes.and_then(|n| u64::try_from(n).ok()),
            || Box::new(crate::engines::postgres::base::TarCheck::new(slot.clone())),
            temp.path(),
            identity,
        )
        .await?;
        let conn = crate::engines::postgres::parse(&job.connection_url)
            .map_err(|p| engines::fail(FailureReason::Config, p.0))?;
        let env = |k: &str| {
            conn.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let user = env("PGUSER").unwrap_or_else(|| "postgres".into());
        let database = env("PGDATABASE").unwrap_or_default();
        let wal = std::sync::Arc::new(crate::pitr::StoreWal::new(
            self.deps.store.clone(),
            &history,
            self.pool().clone(),
            self.deps.config.master_key.clone(),
        ));
        let server = crate::engines::postgres::replay::PrivateServer::start(
            crate::engines::postgres::replay::Replay {
                bin_dir: self.deps.config.pg_bin_dir(base.pg_major as u32),
                base: &base_file,
                target_time: Some(target),
                wal: wal.clone(),
                user,
            },
        )
        .await?;
        if server.reached_end
            && wal.served_max.load(std::sync::atomic::Ordering::Relaxed) < window.end_segno as u64
        {
            server.stop().await;
            return Err(Halt::Failed(engines::fail(
                FailureReason::Integrity,
                format!(
                    "the replay ended before segment {} of the chain: the target {} is not reached",
                    window.end_segno,
                    crate::pitr::text(target)
                ),
            )));
        }
        let dumped = server.dump(&self.deps.tools, &database, temp.path()).await;
        server.stop().await;
        let dump = dumped?;
        let target_spec = RestoreTarget {
            tools: &self.deps.tools,
            url: &job.connection_url,
            source_url: &job.connection_url,
            temp: temp.path(),
        };
        Ok((
            self.rewind(job, lost, resource_type, &target_spec, &dump)
                .await?,
            source,
        ))
    }

    async fn finish(
        &self,
        job: &Job,
        attempt: &Attempt,
        elapsed: Duration,
    ) -> Result<(), sqlx::Error> {
        let lease = &job.lease;
        let type_label =
            ResourceType::parse(&job.resource_type).map_or("unsupported", ResourceType::as_str);
        let m = &self.deps.metrics;
        match attempt {
            Attempt::Succeeded(report, source) => {
                let noted = report_detail(report);
                let mut tx = self.pool().begin().await?;
                let done = sqlx::query(
                    "UPDATE resource_restores
                        SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL,
                            failure_reason = NULL, error_summary = NULL, internal_detail = $4
                      WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .bind(&noted)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    // A retry after a commit whose answer was lost finds its own result there
                    // (the claim token is this attempt's; the recovery never writes succeeded).
                    let ours: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM resource_restores
                                         WHERE id = $1 AND status = 'succeeded' AND claim_token = $2)",
                    )
                    .bind(lease.id)
                    .bind(lease.token)
                    .fetch_one(&mut *tx)
                    .await?;
                    if ours {
                        tracing::info!(restore_id = %lease.id, "restore result already recorded by an earlier try");
                    } else {
                        tracing::warn!(restore_id = %lease.id, "lease taken over before the restore was recorded");
                    }
                    return Ok(());
                }
                let backup_id = chosen_backup(&mut tx, job).await?;
                let detail = json!({
                    "resource_type": job.resource_type,
                    "backup_id": backup_id,
                    "target_time": job.target_time,
                    "skipped_grants": report.skipped_grants,
                    "owner_changed": report.owner_changed,
                    "source": source.as_str(),
                });
                audit(
                    &mut *tx,
                    "restore.succeeded",
                    Some(job.team_id),
                    Some(job.resource_id),
                    Some(lease.id),
                    detail,
                )
                .await?;
                tx.commit().await?;
                m.restore_by_type
                    .with_label_values(&[type_label, "ok"])
                    .inc();
                if *source == restore::Source::Copy {
                    m.copy_reads.with_label_values(&["restore"]).inc();
                }
                tracing::info!(restore_id = %lease.id, resource_id = %job.resource_id, backup_id = %job.backup_id,
                    seconds = elapsed.as_secs_f64(), skipped_grants = report.skipped_grants.len(),
                    owner_changed = report.owner_changed.len(), "restore succeeded");
            }
            Attempt::Failed(Failure { reason, detail }) => {
                let reason = *reason;
                let detail = crate::secret::redact_known(
                    detail,
                    &[
                        job.connection_url.expose(),
                        job.backup_connection_url.expose(),
                    ],
                );
                let detail: String = detail.chars().take(8192).collect();
                let mut tx = self.pool().begin().await?;
                let outcome = jobs::record_failure(&mut tx, lease, reason, &detail).await?;
                if outcome == FailureOutcome::Failed {
                    let backup_id = chosen_backup(&mut tx, job).await?;
                    let mut audit_detail = json!({
                        "resource_type": job.resource_type,
                        "backup_id": backup_id,
                        "target_time": job.target_time,
                        "failure_reason": reason.as_str(),
                        "error_summary": reason.restore_summary(true),
                    });
                    // A partly applied restore says how far it got (the engine's counts).
                    for field in ["documents_restored", "documents_failed"] {
                        if let Some(n) = counted(&detail, field) {
                            audit_detail[field] = json!(n);
                        }
                    }
                    audit(
                        &mut *tx,
                        "restore.failed",
                        Some(job.team_id),
                        Some(job.resource_id),
                        Some(lease.id),
                        audit_detail,
                    )
                    .await?;
                }
                tx.commit().await?;
                if outcome != FailureOutcome::Stale {
                    m.restore_by_type
                        .with_label_values(&[type_label, reason.as_str()])
                        .inc();
                }
                tracing::warn!(restore_id = %lease.id, resource_id = %job.resource_id, failure_reason = reason.as_str(),
                    outcome = ?outcome, detail = %detail, "restore attempt failed");
            }
            Attempt::Cancelled => {
                let released = jobs::release(self.pool(), lease).await?;
                tracing::info!(restore_id = %lease.id, released, "restore cancelled by shutdown; row released");
            }
            Attempt::LeaseLost => {
                tracing::warn!(restore_id = %lease.id, "lease lost mid-restore: job stopped, nothing recorded");
            }
        }
        Ok(())
    }
}

/// The backup a restore rewinds to: the row's, or for a restore to an instant the base backup the
/// worker chose (recorded on the row; null when none was restorable).
async fn chosen_backup(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &Job,
) -> Result<Option<Uuid>, sqlx::Error> {
    if job.target_time.is_none() {
        return Ok(Some(job.backup_id));
    }
    sqlx::query_scalar("SELECT backup_id FROM resource_restores WHERE id = $1")
        .bind(job.lease.id)
        .fetch_one(&mut **tx)
        .await
}

/// A succeeded restore's internal_detail: what the target could not take as it was (DESIGN §6:
/// never a failure, never silent), one line each; NULL when it took everything.
fn report_detail(report: &RestoreReport) -> Option<String> {
    let mut lines = Vec::new();
    lines.extend(
        report
            .skipped_grants
            .iter()
            .map(|l| format!("skipped grant: {l}")),
    );
    lines.extend(
        report
            .owner_changed
            .iter()
            .map(|l| format!("owner changed: {l}")),
    );
    if lines.is_empty() {
        return None;
    }
    let text = lines.join("\n");
    let mut cut: String = text.chars().take(8192).collect();
    if cut.len() < text.len() {
        cut.push_str("\n… (the audit row lists them all)");
    }
    Some(cut)
}

/// `<field>=<n>` in an engine's detail text.
fn counted(detail: &str, field: &str) -> Option<u64> {
    let at = detail.find(&format!("{field}="))? + field.len() + 1;
    let digits: String = detail[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[async_trait]
impl Loop for Arc<Restores> {
    fn name(&self) -> LoopName {
        LoopName::Restores
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        jobs::drive(self, ctx).await
    }
}

#[async_trait]
impl jobs::Queue for Restores {
    type Job = Job;

    fn concurrency(&self) -> usize {
        self.deps.config.restore_concurrency
    }

    async fn housekeeping(&self, _heartbeat: &crate::health::Heartbeat) {
        self.claimer.settle(self.pool()).await;
        if self
            .last_recovery
            .due(jobs::recovery_every(self.deps.config.lease))
        {
            // Private replay servers' directories left by a worker killed with -9 (DESIGN §14).
            crate::engines::postgres::replay::sweep();
            // Expired leases back to pending (or failed after the last attempt), as for backups.
            match jobs::recover_and_audit(self.pool(), JobTable::Restores, "restore.failed").await {
                Ok(recovered) => {
                    let m = &self.deps.metrics;
                    m.restore_stuck_recovered.inc_by(recovered.len() as u64);
                    for r in recovered.iter().filter(|r| r.outcome_unknown) {
                        m.restore_outcome_unknown.inc();
                        let t = ResourceType::parse(&r.resource_type)
                            .map_or("unsupported", ResourceType::as_str);
                        m.restore_by_type.with_label_values(&[t, "timeout"]).inc();
                    }
                }
                Err(e) => tracing::error!(error = %e, "stuck-restore recovery failed"),
            }
        }
    }

    async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        Restores::claim(self).await
    }

    async fn run(self: Arc<Self>, job: Job, abort: CancellationToken) {
        tracing::info!(restore_id = %job.lease.id, resource_id = %job.resource_id, backup_id = %job.backup_id,
            attempt = job.lease.attempts, "restore claimed");
        self.run_job(job, abort).await;
    }
}
