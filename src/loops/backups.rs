//! Backups (DESIGN §5): claim a pending row with a lease, dump the resource with its engine's
//! tool, stream stdout → gzip → sha256 → object storage, and record the result — the whole data
//! path reads top to bottom in [`Backups::attempt`] and [`Backups::finish`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::db::audit;
use crate::deps::Deps;
use crate::domain::{FailureReason, ResourceType};
use crate::engines::{self, DumpSource};
use crate::gzip::Deflate;
use crate::health::Heartbeat;
use crate::jobs::{self, FailureOutcome, JobTable, Lease};
use crate::pipeline::{gzip_to_upload, PipelineError, Streamed};
use crate::retention;
use crate::secret::Secret;
use crate::storage::Metadata;

/// A claimed backup row and its resource.
#[derive(Debug)]
pub struct Job {
    pub lease: Lease,
    pub resource_id: Uuid,
    pub team_id: Uuid,
    pub resource_type: String,
    pub resource_status: String,
    pub connection_url: Secret,
    /// `logical` or `base` (DESIGN §14).
    pub format: String,
    pub replication_url: Option<Secret>,
}

/// How one attempt ended, before it is written down.
enum Attempt {
    Succeeded {
        key: String,
        streamed: Streamed,
        /// `dump_mode` (Redis: instance | keyspace).
        mode: Option<&'static str>,
        /// The team key the object is encrypted to (DESIGN §12), when encryption is on.
        key_id: Option<Uuid>,
        /// A base backup's chain start (DESIGN §14).
        base: Option<crate::engines::postgres::base::BaseInfo>,
    },
    Failed {
        reason: FailureReason,
        detail: String,
    },
    /// Shutdown grace ran out: the row goes back to pending at once.
    Cancelled,
    /// Another worker owns the row now: write nothing.
    LeaseLost,
}

fn failed(reason: FailureReason, detail: impl Into<String>) -> Attempt {
    Attempt::Failed {
        reason,
        detail: detail.into(),
    }
}

/// `<prefix><team>/<resource>/<YYYYMMDDTHHMMSSZ>-<backup id>.<ext>.gz` — unique per row.
pub fn object_key(
    prefix: &str,
    team_id: Uuid,
    resource_id: Uuid,
    at: DateTime<Utc>,
    backup_id: Uuid,
    extension: &str,
) -> String {
    format!(
        "{}{extension}.gz",
        attempt_stem(prefix, team_id, resource_id, at, backup_id)
    )
}

/// `<prefix><team>/<resource>/<YYYYMMDDTHHMMSSZ>-<backup id>.`: what every object and upload of
/// one attempt (started at `at`) starts with, whatever its engine and encryption. Attempts of one
/// row start at least a lease apart (a new claim follows the recovery of the old lease), so no
/// two attempts share a stem.
pub fn attempt_stem(
    prefix: &str,
    team_id: Uuid,
    resource_id: Uuid,
    at: DateTime<Utc>,
    backup_id: Uuid,
) -> String {
    format!(
        "{prefix}{team_id}/{resource_id}/{}-{backup_id}.",
        at.format("%Y%m%dT%H%M%SZ")
    )
}

/// How long the clean-up of a dead attempt's storage may take before it is left to the sweeps.
const DEAD_ATTEMPT_CLEANUP: Duration = Duration::from_secs(120);

/// How often each replica runs retention, the orphan-upload sweep and the reconciliation of
/// orphaned objects.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(3600);
const RECONCILE_EVERY: Duration = Duration::from_secs(3600);
/// The least age of an incomplete upload the sweep aborts; the age applied is
/// [`retention::orphan_upload_age`] (never less than `BACKUP_TIMEOUT` + 1 h).
/// Claim order: oldest due first (`resource_backups_due_idx` holds it, so a claim reads O(1) rows).
pub const CLAIM_ORDER: &str = "x.run_after, x.created_at, x.id";
pub const ORPHAN_UPLOAD_AGE: Duration = Duration::from_secs(24 * 3600);

/// When each housekeeping task last ran in this process (`None`: never, so it runs on the first
/// pass — which is what `--once` gets), and where bounded retention runs continue.
#[derive(Default)]
struct Housekeeping {
    recovery: Option<Instant>,
    retention: Option<Instant>,
    orphans: Option<Instant>,
    reconcile: Option<Instant>,
    retention_state: retention::Retention,
    reconciler: retention::Reconciler,
}

pub struct Backups {
    deps: Deps,
    claimer: jobs::Claimer,
    housekeeping: std::sync::Mutex<Housekeeping>,
}

impl Backups {
    pub fn new(deps: Deps) -> Arc<Self> {
        Arc::new(Self {
            deps,
            claimer: jobs::Claimer::new(JobTable::Backups),
            housekeeping: std::sync::Mutex::default(),
        })
    }

    /// Stuck-row recovery (every pass and, while jobs run, at least every lease or 10 s),
    /// retention (every 10 min, bounded, continued next run), the orphan-upload sweep and the
    /// reconciliation of orphaned objects (hourly). Long work reports progress on the loop's
    /// heartbeat. Failures are logged: they must not stop backups.
    async fn housekeeping(&self, heartbeat: &Heartbeat) {
        let (recover, retain, orphans, reconcile) = {
            let mut h = self.housekeeping.lock().unwrap_or_else(|p| p.into_inner());
            let sweep_every = self.deps.config.lease.min(Duration::from_secs(10));
            (
                jobs::due(&mut h.recovery, sweep_every),
                jobs::due(&mut h.retention, RETENTION_EVERY),
                jobs::due(&mut h.orphans, ORPHAN_SWEEP_EVERY),
                jobs::due(&mut h.reconcile, RECONCILE_EVERY),
            )
        };
        self.claimer.settle(self.pool()).await;
        if recover {
            if let Err(e) = self.recover_expired().await {
                tracing::error!(error = %e, "stuck-backup recovery failed");
            }
            // Objects of crypto-shredded backups (`keys destroy`), deleted in the background.
            match retention::delete_requested_objects(self.pool(), self.deps.store.as_ref()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    deleted = n,
                    "deleted the objects of destroyed keys' backups"
                ),
                Err(e) => tracing::error!(error = %e, "deleting requested objects failed"),
            }
        }
        if retain {
            // The state leaves the lock for the run (the lock is never held across an await).
            let mut state = {
                let mut h = self.housekeeping.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::take(&mut h.retention_state)
            };
            let run = state
                .run(
                    self.pool(),
                    self.deps.store.as_ref(),
                    &self.deps.plans,
                    Utc::now(),
                    heartbeat,
                )
                .await;
            self.housekeeping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retention_state = state;
            match run {
                Ok(r) => {
                    self.deps.metrics.backups_expired.inc_by(r.expired);
                    if r.expired > 0 || r.incomplete {
                        tracing::info!(
                            expired = r.expired,
                            batches = r.batches,
                            delete_failed = r.delete_failed,
                            continues_next_run = r.incomplete,
                            "retention expired backups"
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
        }
        let prefix = self.deps.config.storage_url.prefix();
        if orphans {
            if let Err(e) = self.sweep_orphan_uploads().await {
                tracing::error!(error = %e, "orphan upload sweep failed");
            }
        }
        // A cycle starts hourly; a store of millions of keys is walked over several passes, a
        // bounded slice each, so claims are never starved.
        let (reconcile, mut reconciler) = {
            let mut h = self.housekeeping.lock().unwrap_or_else(|p| p.into_inner());
            let go = reconcile || h.reconciler.in_progress();
            (go, std::mem::take(&mut h.reconciler))
        };
        if reconcile {
            let run = reconciler
                .run(
                    self.pool(),
                    self.deps.store.as_ref(),
                    prefix,
                    retention::orphan_object_age(self.deps.config.backup_timeout),
                    Utc::now(),
                    heartbeat,
                )
                .await;
            match run {
                Ok(r) => {
                    self.deps.metrics.orphan_objects_removed.inc_by(r.removed);
                    if r.removed > 0 || r.delete_failed > 0 {
                        tracing::info!(
                            listed = r.listed,
                            removed = r.removed,
                            delete_failed = r.delete_failed,
                            cycle_complete = r.complete,
                            "reconciliation removed orphaned backup objects"
                        );
                    }
                }
                Err(e) => {
                    // Start over at the next hourly cycle.
                    reconciler.after = None;
                    tracing::error!(error = %e, "reconciliation of orphaned objects failed");
                }
            }
        }
        self.housekeeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reconciler = reconciler;
    }

    /// Aborts incomplete uploads older than [`retention::orphan_upload_age`], never one of an attempt that is
    /// running now (however old the store says it is).
    async fn sweep_orphan_uploads(&self) -> Result<(), retention::RetentionError> {
        let prefix = self.deps.config.storage_url.prefix();
        let pool = self.pool().clone();
        let aborted = retention::abort_stale_uploads(
            self.deps.store.as_ref(),
            prefix,
            retention::orphan_upload_age(self.deps.config.backup_timeout),
            Utc::now(),
            || running_attempt_stems(pool, prefix.to_owned()),
        )
        .await?;
        self.deps
            .metrics
            .stale_uploads_aborted
            .inc_by(aborted as u64);
        Ok(())
    }

    /// Returns rows whose lease expired (a killed pod) to pending, or fails them after their
    /// last attempt.
    pub async fn recover_expired(&self) -> Result<Vec<jobs::Recovered>, sqlx::Error> {
        let recovered =
            jobs::recover_and_audit(self.pool(), JobTable::Backups, "backup.failed").await?;
        self.clean_up_dead_attempts(&recovered);
        let m = &self.deps.metrics;
        for r in &recovered {
            m.backup_stuck_recovered.inc();
            if r.failed {
                let type_label = ResourceType::parse(&r.resource_type)
                    .map_or("unsupported", ResourceType::as_str);
                m.backup_failed.inc();
                m.backup_by_type
                    .with_label_values(&[type_label, FailureReason::Timeout.as_str()])
                    .inc();
            }
        }
        Ok(recovered)
    }

    /// A worker that died (SIGKILL, a lost node) between committing its object and recording
    /// the row leaves a committed object no row will ever reference, and one that died mid-upload
    /// leaves an incomplete multipart upload. The recovered attempt's stem names both: delete and
    /// abort them now, in the background (a frozen store must not hold up claims), instead of
    /// leaving them to the hourly/daily sweeps. A worker that is not dead but only lost its lease
    /// is fenced: its late commit is discarded by its own `finish`.
    fn clean_up_dead_attempts(&self, recovered: &[jobs::Recovered]) {
        if recovered.is_empty() {
            return;
        }
        let prefix = self.deps.config.storage_url.prefix();
        let stems: Vec<String> = recovered
            .iter()
            .map(|r| attempt_stem(prefix, r.team_id, r.resource_id, r.started_at, r.id))
            .collect();
        let store = Arc::clone(&self.deps.store);
        tokio::spawn(async move {
            let cleanup = async {
                for stem in &stems {
                    if let Err(e) = clean_up_attempt(store.as_ref(), stem).await {
                        tracing::warn!(attempt = %stem, error = %e,
                            "cleaning up a dead attempt's storage failed; the sweeps remove it later");
                    }
                }
            };
            if tokio::time::timeout(DEAD_ATTEMPT_CLEANUP, cleanup)
                .await
                .is_err()
            {
                tracing::warn!(
                    "cleaning up dead attempts' storage timed out; the sweeps remove the rest"
                );
            }
        });
    }

    fn pool(&self) -> &PgPool {
        &self.deps.pool
    }

    /// Claims the oldest due pending row whose resource has nothing running (one statement,
    /// `FOR UPDATE SKIP LOCKED`, with a lease). `None` when nothing is due.
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
        #[allow(clippy::type_complexity)]
        let resource: Result<
            (Uuid, String, String, String, Option<String>, String),
            sqlx::Error,
        > = sqlx::query_as(
            "SELECT r.team_id, r.resource_type, r.status, r.connection_url, r.replication_url,
                        b.format
                   FROM resources r JOIN resource_backups b ON b.resource_id = r.id
                  WHERE r.id = $1 AND b.id = $2",
        )
        .bind(claimed.resource_id)
        .bind(claimed.lease.id)
        .fetch_one(self.pool())
        .await;
        let (team_id, resource_type, resource_status, url, replication_url, format) = match resource
        {
            Ok(r) => r,
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
            team_id,
            resource_type,
            resource_status,
            connection_url: Secret::new(url),
            format,
            replication_url: replication_url.map(Secret::new),
        }))
    }

    /// Runs one claimed job to a written-down result. The lease is renewed until the result is
    /// recorded, not only while the data moves: a result that waits for the database (a restart)
    /// must not lose its lease meanwhile.
    pub async fn run_job(self: Arc<Self>, job: Job, abort: CancellationToken) {
        let started = Instant::now();
        let this = &self;
        let job_ref = &job;
        let ran = jobs::run_leased(
            self.pool(),
            &job.lease,
            self.deps.config.lease,
            |lost| async move {
                let attempt = this.attempt(job_ref, &abort, lost.clone()).await;
                this.record(job_ref, attempt, started, &lost).await;
            },
        )
        .await;
        if let Err(panicked) = ran {
            jobs::after_panic(self.pool(), &job.lease, &panicked).await;
        }
    }

    /// Writes the attempt down. While the database is unreachable (a restart, a failover) and
    /// the lease is still ours, the write is retried, each try bounded so a fresh connection is
    /// sought soon after the database is back: giving up at the first error threw away finished
    /// backups (their objects deleted, their attempts counted) for an outage shorter than the
    /// lease. If it cannot be written, a committed object is deleted unless the row records it
    /// (a commit whose answer was lost); when even that cannot be checked it is left to whoever
    /// recovers the expired lease, which removes the attempt's objects.
    async fn record(
        &self,
        job: &Job,
        attempt: Attempt,
        started: Instant,
        lost: &CancellationToken,
    ) {
        let recorded = jobs::record(
            &job.lease,
            self.deps.config.lease,
            lost,
            "recording the backup result",
            || self.finish(job, &attempt, started.elapsed()),
        )
        .await;
        if let (Err(_), Attempt::Succeeded { key, .. }) = (recorded, &attempt) {
            self.discard_unrecorded(job, key, jobs::record_try(self.deps.config.lease))
                .await;
        }
    }

    /// Deletes the committed object of a result that could not be recorded — unless the row
    /// records it after all (the commit went through, its answer was lost), or that cannot be
    /// known now. The row is read `FOR UPDATE`: a try of ours that timed out after its UPDATE
    /// holds the row's lock until its COMMIT lands or rolls back, and the answer must come after.
    async fn discard_unrecorded(&self, job: &Job, key: &str, within: Duration) {
        let recorded = tokio::time::timeout(
            within,
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(object_key = $2, false) FROM resource_backups
                  WHERE id = $1 FOR UPDATE",
            )
            .bind(job.lease.id)
            .bind(key)
            .fetch_optional(self.pool()),
        )
        .await
        .map(|r| r.map(|row| row.unwrap_or(false)));
        match recorded {
            Ok(Ok(false)) => self.discard(key, "its result could not be recorded").await,
            Ok(Ok(true)) => tracing::info!(backup_id = %job.lease.id, object_key = %key,
                "the result was recorded after all (its commit's answer was lost); object kept"),
            Ok(Err(_)) | Err(_) => tracing::warn!(backup_id = %job.lease.id, object_key = %key,
                "cannot tell whether the result was recorded: the object is kept; the recovery of \
                 the expired lease removes it if the row does not reference it"),
        }
    }

    /// The data path: resource → dump command → child → gzip/sha256 → upload → commit or abort.
    async fn attempt(
        &self,
        job: &Job,
        abort: &CancellationToken,
        lease_lost: CancellationToken,
    ) -> Attempt {
        let cfg = &self.deps.config;
        let Some(resource_type) = ResourceType::parse(&job.resource_type) else {
            return failed(
                FailureReason::Config,
                format!("unsupported resource type {:?}", job.resource_type),
            );
        };
        if job.resource_status == "deleted" {
            return failed(FailureReason::Config, "resource is deleted");
        }
        // A private 0700 directory for credential files and the tool's HOME/TMPDIR.
        let temp = match crate::process::private_tempdir() {
            Ok(t) => t,
            Err(e) => {
                return failed(
                    FailureReason::Dump,
                    format!("cannot create a temporary directory: {e}"),
                )
            }
        };
        let base_info: crate::engines::postgres::base::BaseInfoSlot = Default::default();
        let dump = if job.format == "base" {
            // A base backup (DESIGN §14) reads the tenant's cluster through its replication role.
            let url = match (&job.replication_url, resource_type) {
                (Some(u), ResourceType::Postgres | ResourceType::Vector) => u,
                (None, _) => {
                    return failed(
                        FailureReason::Config,
                        "a base backup needs the resource's replication_url",
                    )
                }
                _ => {
                    return failed(
                        FailureReason::Config,
                        format!(
                            "base backups are for postgres and vector, not {}",
                            resource_type.as_str()
                        ),
                    )
                }
            };
            match crate::engines::postgres::base::dump_command(url, temp.path()) {
                Ok(d) => d,
                Err(p) => return failed(FailureReason::Config, p.0),
            }
        } else {
            match engines::prepare_dump(resource_type, &job.connection_url, temp.path()).await {
                Ok(d) => d,
                Err(f) => return failed(f.reason, f.detail),
            }
        };
        // With a master key, the object is encrypted to the team's own key (made on first use).
        let team_key = match &cfg.master_key {
            None => None,
            Some(master) => {
                match crate::crypto::team_recipient(self.pool(), master, job.team_id).await {
                    Ok(k) => Some(k),
                    Err(crate::crypto::KeyError::Db(e)) => {
                        return failed(
                            FailureReason::Upload,
                            format!("reading the team's backup key: {e}"),
                        )
                    }
                    Err(e) => {
                        return failed(FailureReason::Config, format!("the team's backup key: {e}"))
                    }
                }
            }
        };
        let mut key = object_key(
            cfg.storage_url.prefix(),
            job.team_id,
            job.resource_id,
            job.lease.started_at,
            job.lease.id,
            dump.extension,
        );
        let encrypt = match &team_key {
            None => None,
            Some((_, recipient)) => {
                key.push_str(".age");
                match crate::crypto::Encrypt::new(recipient) {
                    Ok(e) => Some(e),
                    Err(e) => return failed(FailureReason::Config, format!("encryption: {e}")),
                }
            }
        };
        enum Stop {
            Timeout,
            Abort,
            LeaseLost,
        }
        // BACKUP_TIMEOUT bounds everything from here, the wait for a tool's first byte included.
        let deadline = tokio::time::sleep(cfg.backup_timeout);
        tokio::pin!(deadline);
        let started = tokio::select! {
            r = DumpSource::start(dump, &self.deps.tools, resource_type) => r,
            _ = &mut deadline => return failed(
                FailureReason::Timeout,
                format!("BACKUP_TIMEOUT of {:?} exceeded", cfg.backup_timeout),
            ),
            _ = abort.cancelled() => return Attempt::Cancelled,
            _ = lease_lost.cancelled() => return Attempt::LeaseLost,
        };
        let (source, stream, mode) = match started {
            Ok(s) => s,
            Err(f) => return failed(f.reason, f.detail),
        };
        let metadata = Metadata::from([
            ("backup-id".to_owned(), job.lease.id.to_string()),
            ("resource-id".to_owned(), job.resource_id.to_string()),
            (
                "resource-type".to_owned(),
                resource_type.as_str().to_owned(),
            ),
        ]);
        let mut upload = match self.deps.store.begin_upload(&key, metadata).await {
            Ok(u) => u,
            Err(e) => {
                source.stop().await;
                return failed(FailureReason::Upload, e.to_string());
            }
        };

        let check: Box<dyn crate::pipeline::StreamCheck> = if job.format == "base" {
            Box::new(crate::engines::postgres::base::TarCheck::new(
                base_info.clone(),
            ))
        } else {
            engines::stream_check(resource_type)
        };
        let streamed = tokio::select! {
            r = gzip_to_upload(stream, check, upload.as_mut(), Deflate::for_gzip_level(cfg.gzip_level), encrypt) => Ok(r),
            _ = &mut deadline => Err(Stop::Timeout),
            _ = abort.cancelled() => Err(Stop::Abort),
            _ = lease_lost.cancelled() => Err(Stop::LeaseLost),
        };
        let stopped = |stop: Stop| match stop {
            Stop::Timeout => failed(
                FailureReason::Timeout,
                format!("BACKUP_TIMEOUT of {:?} exceeded", cfg.backup_timeout),
            ),
            Stop::Abort => Attempt::Cancelled,
            Stop::LeaseLost => Attempt::LeaseLost,
        };
        let streamed = match streamed {
            Ok(s) => s,
            Err(stop) => {
                source.stop().await;
                let _ = upload.abort().await;
                return stopped(stop);
            }
        };
        // Our side failing first (the store, the compressor, the encryptor) stops reading, and
        // the tool dies of a broken pipe: our error is the cause, not the tool's exit.
        if let Err(
            e
            @ (PipelineError::Storage(_) | PipelineError::Compress(_) | PipelineError::Encrypt(_)),
        ) = &streamed
        {
            let detail = e.to_string();
            source.stop().await;
            let _ = upload.abort().await;
            return failed(FailureReason::Upload, detail);
        }
        // The stream is drained: only now is the source's outcome meaningful. (Dropping the wait
        // on a stop kills the tool's group.)
        let ended = tokio::select! {
            r = source.finish() => Ok(r),
            _ = &mut deadline => Err(Stop::Timeout),
            _ = abort.cancelled() => Err(Stop::Abort),
            _ = lease_lost.cancelled() => Err(Stop::LeaseLost),
        };
        let ended = match ended {
            Ok(r) => r,
            Err(stop) => {
                let _ = upload.abort().await;
                return stopped(stop);
            }
        };

        // A failed dump always discards the output, whatever was streamed.
        if let Err(f) = ended {
            let _ = upload.abort().await;
            return failed(f.reason, f.detail);
        }
        let streamed = match streamed {
            Ok(s) => s,
            Err(PipelineError::Storage(e)) => {
                let _ = upload.abort().await;
                return failed(FailureReason::Upload, e.to_string());
            }
            Err(e @ PipelineError::Source(_)) => {
                let _ = upload.abort().await;
                return failed(FailureReason::Dump, e.to_string());
            }
            Err(e @ (PipelineError::Encrypt(_) | PipelineError::Compress(_))) => {
                let _ = upload.abort().await;
                return failed(FailureReason::Upload, e.to_string());
            }
        };
        if let Err(why) = &streamed.check {
            let _ = upload.abort().await;
            return failed(
                FailureReason::Sanity,
                format!(
                    "the {} dump is incomplete ({} bytes, starting with {}): {why}",
                    resource_type.as_str(),
                    streamed.raw_bytes,
                    hex::encode(&streamed.head[..streamed.head.len().min(8)]),
                ),
            );
        }
        let final_meta = Metadata::from([
            ("sha256".to_owned(), streamed.sha256.clone()),
            ("raw-bytes".to_owned(), streamed.raw_bytes.to_string()),
        ]);
        match upload.commit(final_meta).await {
            Ok(_) => {
                if let Some(mode) = cfg.object_lock {
                    if let Err(e) = self.lock_object(job, &key, mode).await {
                        // Not locked as configured is not kept: the next attempt writes it again.
                        let _ = self.deps.store.delete(&key).await;
                        return failed(FailureReason::Upload, e);
                    }
                }
                Attempt::Succeeded {
                    key,
                    streamed,
                    mode,
                    key_id: team_key.map(|(id, _)| id),
                    base: base_info.lock().unwrap_or_else(|p| p.into_inner()).take(),
                }
            }
            Err(e) => failed(FailureReason::Upload, e.to_string()),
        }
        // `temp` (and with it any credential file) is removed here either way.
    }

    /// OBJECT_LOCK_MODE: the committed object locked until its retention is over (+ 1 day).
    async fn lock_object(
        &self,
        job: &Job,
        key: &str,
        mode: crate::storage::LockMode,
    ) -> Result<(), String> {
        let until = retention::retain_until(self.pool(), &self.deps.plans, job.team_id, Utc::now())
            .await
            .map_err(|e| format!("reading the team's retention for Object Lock: {e}"))?;
        self.deps
            .store
            .lock(key, mode, until)
            .await
            .map_err(|e| format!("setting Object Lock ({}) on {key}: {e}", mode.as_str()))
    }

    /// Writes the attempt's result to the row (fenced), the audit log and the metrics.
    async fn finish(
        &self,
        job: &Job,
        attempt: &Attempt,
        elapsed: Duration,
    ) -> Result<(), sqlx::Error> {
        let m = &self.deps.metrics;
        let type_label =
            ResourceType::parse(&job.resource_type).map_or("unsupported", ResourceType::as_str);
        let lease = &job.lease;
        match attempt {
            Attempt::Succeeded {
                key,
                streamed,
                mode,
                key_id,
                base,
            } => {
                let mut tx = self.pool().begin().await?;
                let done = sqlx::query(
                    "UPDATE resource_backups
                        SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL,
                            object_key = $4, size_bytes = $5, raw_bytes = $6, sha256 = $7,
                            dump_mode = $8, key_id = $9,
                            start_lsn = $10::text::pg_lsn, timeline = $11, pg_major = $12,
                            failure_reason = NULL, error_summary = NULL, internal_detail = NULL
                      WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3
                        -- a team key destroyed while this backup ran: it must not count as good
                        AND ($9::uuid IS NULL OR EXISTS (SELECT 1 FROM team_backup_keys k
                                                          WHERE k.key_id = $9 AND k.destroyed_at IS NULL))",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .bind(key)
                .bind(streamed.stored_bytes as i64)
                .bind(streamed.raw_bytes as i64)
                .bind(&streamed.sha256)
                .bind(*mode)
                .bind(*key_id)
                .bind(base.as_ref().map(|b| crate::engines::postgres::wal::lsn_text(b.start_lsn)))
                .bind(base.as_ref().map(|b| b.timeline as i32))
                .bind(base.as_ref().map(|b| b.pg_major as i32))
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    // A retry after a commit whose answer was lost finds its own result there.
                    let ours: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM resource_backups
                                         WHERE id = $1 AND status = 'succeeded' AND object_key = $2)",
                    )
                    .bind(lease.id)
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.rollback().await?;
                    if ours {
                        tracing::info!(backup_id = %lease.id, object_key = %key,
                            "backup result already recorded by an earlier try");
                        return Ok(());
                    }
                    self.discard(
                        key,
                        "the lease was taken over before the result was recorded",
                    )
                    .await;
                    return Ok(());
                }
                audit(
                    &mut *tx,
                    "backup.succeeded",
                    Some(job.team_id),
                    Some(job.resource_id),
                    Some(lease.id),
                    json!({ "resource_type": job.resource_type, "object_key": key,
                            "size_bytes": streamed.stored_bytes, "sha256": streamed.sha256,
                            "dump_mode": mode, "format": job.format }),
                )
                .await?;
                // A base backup is a cluster, not the database: never compared with the dumps.
                let anomalous =
                    base.is_none() && crate::anomaly::check_size(&mut tx, lease.id).await?;
                tx.commit().await?;
                if anomalous {
                    m.backup_anomalies
                        .with_label_values(&[type_label, "size"])
                        .inc();
                }
                m.backup_succeeded.inc();
                m.backup_by_type
                    .with_label_values(&[type_label, "ok"])
                    .inc();
                m.backup_bytes
                    .with_label_values(&[type_label])
                    .inc_by(streamed.stored_bytes);
                m.backup_duration
                    .with_label_values(&[type_label])
                    .observe(elapsed.as_secs_f64());
                tracing::info!(backup_id = %lease.id, resource_id = %job.resource_id,
                    resource_type = %job.resource_type, attempt = lease.attempts,
                    raw_bytes = streamed.raw_bytes, stored_bytes = streamed.stored_bytes,
                    seconds = elapsed.as_secs_f64(), object_key = %key, "backup succeeded");
            }
            Attempt::Failed { reason, detail } => {
                let mut secrets = vec![job.connection_url.expose()];
                if let Some(u) = &job.replication_url {
                    secrets.push(u.expose());
                }
                let detail = crate::secret::redact_known(detail, &secrets);
                let detail: String = detail.chars().take(8192).collect();
                let mut tx = self.pool().begin().await?;
                let outcome = jobs::record_failure(&mut tx, lease, *reason, &detail).await?;
                if outcome == FailureOutcome::Failed {
                    audit(
                        &mut *tx,
                        "backup.failed",
                        Some(job.team_id),
                        Some(job.resource_id),
                        Some(lease.id),
                        json!({ "resource_type": job.resource_type, "failure_reason": reason.as_str(),
                                "error_summary": reason.final_summary() }),
                    )
                    .await?;
                }
                tx.commit().await?;
                if outcome == FailureOutcome::Stale {
                    tracing::warn!(backup_id = %lease.id, "lease lost before recording a failure; discarded");
                    return Ok(());
                }
                m.backup_by_type
                    .with_label_values(&[type_label, reason.as_str()])
                    .inc();
                m.backup_duration
                    .with_label_values(&[type_label])
                    .observe(elapsed.as_secs_f64());
                if outcome == FailureOutcome::Failed {
                    m.backup_failed.inc();
                }
                tracing::warn!(backup_id = %lease.id, resource_id = %job.resource_id,
                    resource_type = %job.resource_type, attempt = lease.attempts,
                    failure_reason = reason.as_str(), outcome = ?outcome, detail = %detail,
                    "backup attempt failed");
            }
            Attempt::Cancelled => {
                let released = jobs::release(self.pool(), lease).await?;
                tracing::info!(backup_id = %lease.id, released, "backup cancelled by shutdown; row released");
            }
            Attempt::LeaseLost => {
                tracing::warn!(backup_id = %lease.id, "lease lost mid-backup: job stopped, nothing recorded");
            }
        }
        Ok(())
    }

    /// An object no row will point at must not survive: a stale worker's (the current owner
    /// writes its own), or one whose result could not be recorded.
    async fn discard(&self, key: &str, why: &str) {
        tracing::warn!(object_key = %key, why, "deleting a committed backup object");
        if let Err(e) = self.deps.store.delete(key).await {
            tracing::error!(object_key = %key, error = %e,
                "deleting a backup object failed; the reconciliation sweep removes it later");
        }
    }
}

/// The key stems of every backup attempt running now (any replica's).
pub async fn running_attempt_stems(
    pool: PgPool,
    prefix: String,
) -> Result<Vec<String>, sqlx::Error> {
    let running: Vec<(Uuid, Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT b.id, b.resource_id, r.team_id, b.started_at
           FROM resource_backups b JOIN resources r ON r.id = b.resource_id
          WHERE b.status = 'running'",
    )
    .fetch_all(&pool)
    .await?;
    Ok(running
        .into_iter()
        .map(|(id, resource, team, started)| attempt_stem(&prefix, team, resource, started, id))
        .collect())
}

/// Deletes every object and aborts every incomplete upload of one dead attempt (`stem`).
pub async fn clean_up_attempt(
    store: &dyn crate::storage::ObjectStore,
    stem: &str,
) -> Result<(), crate::storage::StorageError> {
    for upload in store.list_incomplete_uploads(stem).await? {
        store.abort_incomplete_upload(&upload).await?;
        tracing::info!(object_key = %upload.key, "aborted a dead attempt's incomplete upload");
    }
    for object in store.list(stem).await? {
        store.delete(&object.key).await?;
        tracing::warn!(object_key = %object.key,
            "deleted the object of an attempt whose worker died before recording it");
    }
    Ok(())
}

#[async_trait]
impl Loop for Arc<Backups> {
    fn name(&self) -> LoopName {
        LoopName::Backups
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        jobs::drive(self, ctx).await
    }
}

#[async_trait]
impl jobs::Queue for Backups {
    type Job = Job;

    fn concurrency(&self) -> usize {
        self.deps.config.backup_concurrency
    }

    async fn housekeeping(&self, heartbeat: &Heartbeat) {
        Backups::housekeeping(self, heartbeat).await;
    }

    async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        Backups::claim(self).await
    }

    async fn run(self: Arc<Self>, job: Job, abort: CancellationToken) {
        tracing::info!(backup_id = %job.lease.id, resource_id = %job.resource_id,
            attempt = job.lease.attempts, "backup claimed");
        self.run_job(job, abort).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn object_keys_follow_the_contract() {
        let team = Uuid::parse_str("11111111-1111-1111-1111-111111111111").unwrap();
        let res = Uuid::parse_str("22222222-2222-2222-2222-222222222222").unwrap();
        let id = Uuid::parse_str("33333333-3333-3333-3333-333333333333").unwrap();
        let at = Utc.with_ymd_and_hms(2026, 11, 22, 3, 4, 5).unwrap();
        assert_eq!(
            object_key("backups/", team, res, at, id, "pgdump"),
            "backups/11111111-1111-1111-1111-111111111111/22222222-2222-2222-2222-222222222222/20261122T030405Z-33333333-3333-3333-3333-333333333333.pgdump.gz"
        );
    }
}
