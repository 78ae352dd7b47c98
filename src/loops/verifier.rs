//! The verifier (DESIGN §11): proves, continuously, that stored backups restore — without
//! touching the customer. Each pass enqueues the newest succeeded backup of every resource that
//! is due (no verification within VERIFY_EVERY, fairest first), then claims rows like the other
//! queues (`FOR UPDATE SKIP LOCKED` + a lease) and, per row — [`Verifier::attempt`] reads top to
//! bottom — downloads the object (sha256, full decode, structural check), test-restores it the
//! way the customer's restore runs (Postgres: the rewind as a throwaway unprivileged role, twice,
//! into a scratch database; both always dropped — `engines::postgres_test_restore`; Redis:
//! every key RESTOREd into a scratch server, or cut out of the RDB; MongoDB read whole), and
//! records the counts it found. A backup that fails is no longer a good backup: its row says so,
//! the RPO gauge stops counting it, an audit row is written and a fresh backup is enqueued.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::db::audit;
use crate::deps::Deps;
use crate::domain::{FailureReason, ResourceType, SUPPORTED_RESOURCE_TYPES};
use crate::engines::{self, fail, Census, Failure, ScratchServer};
use crate::jobs::{self, FailureOutcome, JobTable, Lease, Stopped};
use crate::restore;

// A verification that failed for the verifier's own environment (its scratch server, the object
// store) is tried again an hour later rather than at the next pass: `resource_verify_state`'s
// `due_at` (migrations/20261206000001_fleet_scale.sql).
/// Claim order: every team's first due resource before any team's second, never-verified first
/// (`backup_verifications_claim` holds it, so a claim reads O(1) rows).
pub const CLAIM_ORDER: &str = "x.team_rank, x.previous_at NULLS FIRST, x.created_at";
/// Verifications enqueued per pass at most: more than a pass can verify, fewer than a fleet
/// (the LIMITs of [`DUE_SQL`]).
const ENQUEUE_BATCH: i64 = 10_000;
/// The due resources (resource_id, backup_id, previous_at, since) from `resource_verify_marks`,
/// longest due first; `$1` is VERIFY_EVERY in seconds. Three index ranges: due now (never
/// verified, or failed for an older backup), failed for the verifier's environment over an hour
/// ago (ENVIRONMENT_RETRY), passed longer than VERIFY_EVERY ago. Deleted resources are in none.
pub const DUE_SQL: &str = "
    (SELECT m.resource_id, m.backup_id, m.last_started_at AS previous_at,
            '-infinity'::timestamptz AS since
       FROM resource_verify_marks m
      WHERE m.live AND m.due
      ORDER BY m.resource_id LIMIT 10000)
    UNION ALL
    (SELECT m.resource_id, m.backup_id, m.last_started_at, m.retry_from + interval '1 hour'
       FROM resource_verify_marks m
      WHERE m.live AND m.retry_from IS NOT NULL AND m.retry_from <= now() - interval '1 hour'
      ORDER BY m.retry_from, m.resource_id LIMIT 10000)
    UNION ALL
    (SELECT m.resource_id, m.backup_id, m.last_started_at, m.verified_since + make_interval(secs => $1)
       FROM resource_verify_marks m
      WHERE m.live AND m.verified_since IS NOT NULL
        AND m.verified_since <= now() - make_interval(secs => $1)
      ORDER BY m.verified_since, m.resource_id LIMIT 10000)";
/// `backup_worker_unverified_backups` from the marks; `$1` is VERIFY_EVERY in seconds. A newest
/// backup that failed verification counts at once; otherwise no pass within VERIFY_EVERY plus an
/// hour (the verifier's turn), for a backup over an hour old.
pub const UNVERIFIED_SQL: &str = "
    SELECT (SELECT count(*) FROM resource_verify_marks m WHERE m.live AND m.backup_failed)
         + (SELECT count(*) FROM resource_verify_marks m
             WHERE m.live AND m.backup_id IS NOT NULL AND NOT m.backup_failed
               AND m.passed_at <= now() - make_interval(secs => $1) - interval '1 hour'
               AND m.backup_finished_at < now() - interval '1 hour')";
/// The advisory lock one replica's enqueue holds (its transaction's).
const ENQUEUE_LOCK: i64 = 0x7665_7269_6679; // "verify"

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("backup {0} not found")]
    BackupNotFound(Uuid),
    #[error("backup {id} is {status}, not succeeded: there is nothing to verify")]
    NotSucceeded { id: Uuid, status: String },
    #[error("a verification of resource {0} is already running; try again when it has finished")]
    Busy(Uuid),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A claimed verification and what it needs to know about its backup.
#[derive(Debug)]
pub struct Job {
    pub lease: Lease,
    pub backup_id: Uuid,
    pub resource_id: Uuid,
    pub team_id: Uuid,
    pub resource_type: String,
    pub object_key: Option<String>,
    pub sha256: Option<String>,
    pub size_bytes: Option<i64>,
    pub key_id: Option<Uuid>,
    /// The resource's connection, as its restore would use it (MongoDB: the database).
    pub connection_url: crate::secret::Secret,
    /// `logical` or `base` (DESIGN §14: a base backup is verified by replaying its WAL chain).
    pub format: String,
}

#[derive(sqlx::FromRow)]
struct Context {
    team_id: Uuid,
    resource_type: String,
    backup_status: String,
    object_key: Option<String>,
    sha256: Option<String>,
    size_bytes: Option<i64>,
    key_id: Option<Uuid>,
    connection_url: String,
    format: String,
}

/// How a verification failed: its class, and whether the backup is to blame (it does not
/// restore) or the verifier's environment is (scratch server, store, tools).
#[derive(Debug)]
pub struct Failed {
    pub failure: Failure,
    pub backup_at_fault: bool,
    /// The step it failed in: `download` or `restore`.
    pub step: &'static str,
}

enum Attempt {
    Verified(Value),
    Failed(Failed, Value),
    Cancelled,
    LeaseLost,
}

/// What `backup-worker verify` prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub verification_id: Uuid,
    pub backup_id: Uuid,
    pub resource_id: Uuid,
    pub resource_type: String,
    pub status: String,
    pub failure_reason: Option<String>,
    pub internal_detail: Option<String>,
    pub detail: Value,
}

type ClaimedRow = (Uuid, Uuid, Uuid, i32, DateTime<Utc>);

pub struct Verifier {
    deps: Deps,
    scratch: Option<ScratchServer>,
    /// VERIFY_REDIS_URL's scratch Redis; `None`: Redis backups are cut, not RESTOREd.
    redis_scratch: Option<engines::ScratchRedis>,
    claimer: jobs::Claimer,
    last_recovery: jobs::Every,
}

impl Verifier {
    pub fn new(deps: Deps) -> Arc<Self> {
        let scratch = deps.config.verify_database_url.as_ref().and_then(|url| {
            match ScratchServer::new(url) {
                Ok(s) => Some(s),
                Err(e) => {
                    // Config validation parses the URL first; this is belt and braces.
                    tracing::error!(error = %e, "Postgres test restores disabled");
                    None
                }
            }
        });
        let redis_scratch = deps.config.verify_redis_url.as_ref().and_then(|url| {
            engines::ScratchRedis::new(url)
                .inspect_err(
                    |e| tracing::error!(error = %e, "Redis scratch test restores disabled"),
                )
                .ok()
        });
        Arc::new(Self {
            deps,
            scratch,
            redis_scratch,
            claimer: jobs::Claimer::new(JobTable::Verifications),
            last_recovery: jobs::Every::default(),
        })
    }

    fn pool(&self) -> &PgPool {
        &self.deps.pool
    }

    /// Enqueues the newest succeeded backup of every due resource (at most [`ENQUEUE_BATCH`] per
    /// pass, longest due first); idempotent across replicas (one open verification per resource,
    /// enforced by a unique index; one replica enqueues at a time). A resource is due when its
    /// newest verification passed more than VERIFY_EVERY ago, or failed for a newer backup than
    /// its newest, or failed for the environment over an hour ago — or it has none. A resource
    /// whose newest backup failed verification waits for the fresh backup that failure enqueued.
    /// Due resources are read from `resource_verify_marks` (kept by triggers): index ranges of
    /// the due, never a probe of every resource. Each team's resources are ranked so claims take
    /// every team's first before any team's second.
    pub async fn enqueue(&self) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        // Another replica is enqueueing: its rows are ours to claim.
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(ENQUEUE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0);
        }
        // Rows whose backup expired (or was deleted) while they waited are gone stale.
        sqlx::query(
            "DELETE FROM backup_verifications v USING resource_backups b
              WHERE v.status = 'pending' AND b.id = v.backup_id AND b.status <> 'succeeded'",
        )
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(&format!(
            "WITH due AS ({DUE_SQL}),
             batch AS (
                SELECT d.*, r.team_id FROM due d JOIN resources r ON r.id = d.resource_id
                 WHERE r.resource_type = ANY($2::text[])
                 ORDER BY d.since, d.resource_id LIMIT {ENQUEUE_BATCH}
             )
             INSERT INTO backup_verifications (backup_id, resource_id, team_rank, previous_at)
             SELECT backup_id, resource_id,
                    row_number() OVER (PARTITION BY team_id
                                       ORDER BY previous_at NULLS FIRST, resource_id),
                    previous_at
               FROM batch
             ON CONFLICT (resource_id) WHERE status IN ('pending', 'running') DO NOTHING"
        ))
        .bind(self.deps.config.verify_every.as_secs_f64())
        .bind(SUPPORTED_RESOURCE_TYPES)
        .execute(&mut *tx)
        .await?;
        // Base backups (DESIGN §14) are rarely a PITR resource's newest backup (the hour's dumps
        // are): the newest of each resource is due on its own once VERIFY_EVERY has passed since
        // a base backup of the resource was last verified, when no verification is open.
        let bases = sqlx::query(&format!(
            "WITH newest AS (
                SELECT DISTINCT ON (b.resource_id) b.id, b.resource_id
                  FROM resource_backups b
                 WHERE b.format = 'base' AND b.status = 'succeeded'
                 ORDER BY b.resource_id, b.finished_at DESC
             )
             INSERT INTO backup_verifications (backup_id, resource_id, team_rank)
             SELECT n.id, n.resource_id, 1 FROM newest n
              WHERE NOT EXISTS (
                    SELECT 1 FROM backup_verifications v JOIN resource_backups vb ON vb.id = v.backup_id
                     WHERE v.resource_id = n.resource_id AND vb.format = 'base'
                       AND (v.status IN ('pending', 'running')
                            OR v.finished_at > now() - make_interval(secs => $1)))
              LIMIT {ENQUEUE_BATCH}
             ON CONFLICT (resource_id) WHERE status IN ('pending', 'running') DO NOTHING"
        ))
        .bind(self.deps.config.verify_every.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() + bases.rows_affected())
    }

    /// `backup_worker_unverified_backups`: resources whose newest succeeded backup failed
    /// verification, or that have had no passing verification within VERIFY_EVERY (plus an hour:
    /// the verifier's turn; a backup taken within the last hour is not counted either). Read from
    /// the marks: index ranges of the failed and the overdue, not every resource.
    pub async fn refresh_unverified(&self) -> Result<i64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(UNVERIFIED_SQL)
            .bind(self.deps.config.verify_every.as_secs_f64())
            .fetch_one(self.pool())
            .await?;
        self.deps.metrics.unverified_backups.set(n);
        Ok(n)
    }

    /// One statement, `FOR UPDATE SKIP LOCKED`, with a lease; never beside a running backup or
    /// restore of the same resource; fair across teams (see [`Verifier::enqueue`]).
    pub async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        loop {
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
            let backup_id: Result<Uuid, sqlx::Error> =
                sqlx::query_scalar("SELECT backup_id FROM backup_verifications WHERE id = $1")
                    .bind(claimed.lease.id)
                    .fetch_one(self.pool())
                    .await;
            let job = match backup_id {
                Ok(backup_id) => {
                    self.job(claimed.lease.clone(), backup_id, claimed.resource_id)
                        .await
                }
                Err(e) => Err(e),
            };
            match job {
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

    /// The job for a claimed row, or `None` (row deleted) when its backup is no longer there
    /// to verify (expired by retention after it was enqueued).
    async fn job(
        &self,
        lease: Lease,
        backup_id: Uuid,
        resource_id: Uuid,
    ) -> Result<Option<Job>, sqlx::Error> {
        let c: Option<Context> = sqlx::query_as(
            "SELECT r.team_id, r.resource_type, b.status AS backup_status, b.object_key, b.sha256,
                    b.size_bytes, b.key_id, r.connection_url, b.format
               FROM resource_backups b JOIN resources r ON r.id = b.resource_id
              WHERE b.id = $1",
        )
        .bind(backup_id)
        .fetch_optional(self.pool())
        .await?;
        let c = match c {
            Some(c) if c.backup_status == "succeeded" => c,
            _ => {
                sqlx::query(
                    "DELETE FROM backup_verifications
                      WHERE id = $1 AND leased_by = $2 AND attempts = $3 AND status = 'running'",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .execute(self.pool())
                .await?;
                return Ok(None);
            }
        };
        Ok(Some(Job {
            lease,
            backup_id,
            resource_id,
            team_id: c.team_id,
            resource_type: c.resource_type,
            object_key: c.object_key,
            sha256: c.sha256,
            size_bytes: c.size_bytes,
            key_id: c.key_id,
            connection_url: crate::secret::Secret::new(c.connection_url),
            format: c.format,
        }))
    }

    /// Runs a claimed verification to a recorded result (or a released row on shutdown).
    pub async fn run_job(self: Arc<Self>, job: Job, abort: CancellationToken) {
        let started = Instant::now();
        let scratch =
            engines::scratch_name(job.lease.id, job.lease.attempts, Utc::now().timestamp());
        let timeout = self.deps.config.backup_timeout;
        let (this, job_ref, scratch_ref, abort) = (&self, &job, &scratch, &abort);
        let ran = jobs::run_leased(
            self.pool(),
            &job.lease,
            self.deps.config.lease,
            |lost| async move {
                let work = this.attempt(job_ref, scratch_ref);
                let attempt = match jobs::until_stopped(work, timeout, abort, &lost).await {
                    Ok((Ok(detail), _)) => Attempt::Verified(detail),
                    Ok((Err(f), detail)) => Attempt::Failed(f, detail),
                    Err(Stopped::TimedOut) => Attempt::Failed(
                        Failed {
                            failure: fail(
                                FailureReason::Timeout,
                                format!("verification exceeded BACKUP_TIMEOUT of {timeout:?}"),
                            ),
                            backup_at_fault: false,
                            step: "restore",
                        },
                        json!({}),
                    ),
                    Err(Stopped::Aborted) => Attempt::Cancelled,
                    Err(Stopped::LeaseLost) => Attempt::LeaseLost,
                };
                // Recorded while the lease is renewed, retried across a database blip: a
                // verdict lost at the last step cost the whole test restore again.
                let _ = jobs::record(
                    &job_ref.lease,
                    this.deps.config.lease,
                    &lost,
                    "recording the verification result",
                    || this.finish(job_ref, &attempt, started.elapsed()),
                )
                .await;
            },
        )
        .await;
        // Whatever happened (a dropped attempt cannot clean up after itself), the scratch
        // database and its role do not outlive their attempt.
        if let (Some(server), true) = (&self.scratch, is_postgres(&job.resource_type)) {
            if let Err(e) = server.drop_scratch(&scratch).await {
                tracing::warn!(verification_id = %job.lease.id, error = %e.detail,
                    "dropping the scratch database and role failed; a later pass drops them");
            }
        }
        if let Err(panicked) = ran {
            jobs::after_panic(self.pool(), &job.lease, &panicked).await;
        }
    }

    /// The verified download (sha256, full decode, structural check), then the test restore.
    /// Returns the detail to record, also on failure (how far it got).
    async fn attempt(&self, job: &Job, scratch: &str) -> (Result<Value, Failed>, Value) {
        let started = Instant::now();
        let mut detail = json!({ "level": "integrity", "object_key": job.object_key, "stored_bytes": job.size_bytes });
        let result = self.steps(job, scratch, &mut detail, started).await;
        detail["seconds"] = json!(round(started.elapsed().as_secs_f64()));
        match result {
            Ok(()) => (Ok(detail.clone()), detail),
            Err(f) => {
                detail["failed_step"] = json!(f.step);
                (Err(f), detail)
            }
        }
    }

    async fn steps(
        &self,
        job: &Job,
        scratch: &str,
        detail: &mut Value,
        started: Instant,
    ) -> Result<(), Failed> {
        let download = |failure: Failure| Failed {
            // A store that fails to answer, or a full temporary directory (config), is ours;
            // an object that is missing, altered or undecodable is the backup's.
            backup_at_fault: failure.reason == FailureReason::Integrity,
            failure,
            step: "download",
        };
        let environment = |failure: Failure| Failed {
            failure,
            backup_at_fault: false,
            step: "restore",
        };
        let Some(resource_type) = ResourceType::parse(&job.resource_type) else {
            return Err(environment(fail(
                FailureReason::Config,
                format!("unsupported resource type {:?}", job.resource_type),
            )));
        };
        let (Some(key), Some(sha)) = (&job.object_key, &job.sha256) else {
            return Err(download(fail(
                FailureReason::Integrity,
                "the backup row has no object",
            )));
        };
        let temp = crate::process::private_tempdir().map_err(|e| {
            environment(fail(
                FailureReason::Config,
                format!("cannot create a temporary directory: {e}"),
            ))
        })?;

        // 1. Download: sha256 against the row, decryption, the whole gzip stream, the check.
        let identity = restore::backup_identity(
            self.pool(),
            self.deps.config.master_key.as_deref(),
            job.key_id,
        )
        .await
        .map_err(environment)?;
        if job.format == "base" {
            return self
                .replay_base(job, key, sha, identity, temp.path(), detail, started)
                .await;
        }
        // A primary object that does not serve is read from the copy, as a restore would.
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
        .await
        .map_err(download)?;
        detail["source"] = json!(source.as_str());
        if source == restore::Source::Copy {
            self.deps
                .metrics
                .copy_reads
                .with_label_values(&["verify"])
                .inc();
        }
        detail["download_seconds"] = json!(round(started.elapsed().as_secs_f64()));

        // 2. The test restore, touching no customer.
        let restore_started = Instant::now();
        let census = match (resource_type, &self.scratch) {
            (ResourceType::Postgres | ResourceType::Vector, Some(server)) => {
                // The throwaway role's password outlives the attempt only by a margin.
                let valid_for = self.deps.config.backup_timeout + Duration::from_secs(600);
                let result = engines::postgres_test_restore(
                    server,
                    scratch,
                    &self.deps.tools,
                    temp.path(),
                    &backup,
                    valid_for,
                )
                .await;
                if let Err(e) = server.drop_scratch(scratch).await {
                    tracing::warn!(error = %e.detail, "dropping the scratch database and role failed; retried after the attempt");
                }
                let restored = result.map_err(|mut failure| {
                    // A dump format newer than the scratch server's pg_restore reads is the
                    // verifier's to fix (run a newer Postgres there), not the backup's.
                    if failure.detail.contains("unsupported version") {
                        failure.reason = FailureReason::Config;
                    }
                    Failed {
                        // The dump's contents refused, or a statement the tenant's own restore
                        // would be refused too, is the backup's fault; a login, a connection,
                        // an extension or tool the scratch server lacks is ours.
                        backup_at_fault: matches!(
                            failure.reason,
                            FailureReason::Dump
                                | FailureReason::Conflict
                                | FailureReason::Integrity
                        ),
                        failure,
                        step: "restore",
                    }
                })?;
                detail["rewind_seconds"] = json!(restored.rewind_seconds.map(round));
                Some(Census::Tables(restored.tables))
            }
            // A payload the scratch Redis refuses as corrupt (or a file that does not read) is
            // the backup's fault; the scratch server's trouble is the environment's.
            (ResourceType::Redis, _) => Some(
                engines::redis_test_restore(
                    &backup,
                    self.redis_scratch.as_ref(),
                    &format!("{}/{}", job.lease.id, job.lease.attempts),
                )
                .await
                .map_err(|(failure, backup_at_fault)| Failed {
                    failure,
                    backup_at_fault,
                    step: "restore",
                })?,
            ),
            _ => engines::test_restore(resource_type, &backup, &job.connection_url)
                .await
                .map_err(|failure| Failed {
                    // Reading the file needs nothing but the file.
                    backup_at_fault: true,
                    failure,
                    step: "restore",
                })?,
        };
        if let Some(census) = census {
            detail["level"] = json!("restore");
            detail["restore_seconds"] = json!(round(restore_started.elapsed().as_secs_f64()));
            census_detail(&census, detail);
        }
        Ok(())
    }

    /// A base backup (DESIGN §14): downloaded and its tar checked, then replayed with its WAL to
    /// the end of its chain in a private server of its major, and its database's rows counted.
    #[allow(clippy::too_many_arguments)]
    async fn replay_base(
        &self,
        job: &Job,
        key: &str,
        sha: &str,
        identity: Option<age::x25519::Identity>,
        temp: &std::path::Path,
        detail: &mut Value,
        started: Instant,
    ) -> Result<(), Failed> {
        let failed = |failure: Failure, step: &'static str| Failed {
            backup_at_fault: failure.reason == FailureReason::Integrity,
            failure,
            step,
        };
        let slot: crate::engines::postgres::base::BaseInfoSlot = Default::default();
        let (backup, _) = restore::download_from_any(
            self.deps.store.as_ref(),
            None,
            key,
            sha,
            job.size_bytes.and_then(|n| u64::try_from(n).ok()),
            || Box::new(crate::engines::postgres::base::TarCheck::new(slot.clone())),
            temp,
            identity,
        )
        .await
        .map_err(|f| failed(f, "download"))?;
        detail["download_seconds"] = json!(round(started.elapsed().as_secs_f64()));
        let info = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(info) = info else {
            return Err(failed(
                fail(
                    FailureReason::Integrity,
                    "the base backup's label was not read",
                ),
                "download",
            ));
        };
        let history = crate::pitr::History::load(self.pool(), job.resource_id)
            .await
            .map_err(|e| {
                failed(
                    fail(
                        FailureReason::Unreachable,
                        format!("reading the WAL history: {e}"),
                    ),
                    "restore",
                )
            })?;
        // A chain that does not reach the base backup's end yet (the stream lags, or is down)
        // says nothing of the backup: the verification waits, the backup is not blamed.
        if !history.windows().iter().any(|w| w.base_id == job.backup_id) {
            return Err(failed(
                fail(
                    FailureReason::Config,
                    "the base backup's WAL chain is not stored up to its end yet (the resource's \
                     WAL stream lags or is down): nothing to replay it to",
                ),
                "restore",
            ));
        }
        let conn = crate::engines::postgres::parse(&job.connection_url)
            .map_err(|p| failed(fail(FailureReason::Config, p.0), "restore"))?;
        let env = |k: &str| {
            conn.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let user = env("PGUSER").unwrap_or_else(|| "postgres".into());
        let database = env("PGDATABASE").unwrap_or_default();
        let wal = Arc::new(crate::pitr::StoreWal::new(
            self.deps.store.clone(),
            &history,
            self.pool().clone(),
            self.deps.config.master_key.clone(),
        ));
        let replay_started = Instant::now();
        let server = crate::engines::postgres::replay::PrivateServer::start(
            crate::engines::postgres::replay::Replay {
                bin_dir: self.deps.config.pg_bin_dir(info.pg_major),
                base: &backup,
                target_time: None,
                wal: wal.clone(),
                user,
            },
        )
        .await
        .map_err(|f| failed(f, "restore"))?;
        let counted = server.count_rows(&database).await;
        server.stop().await;
        let tables = counted.map_err(|f| failed(f, "restore"))?;
        detail["level"] = json!("replay");
        detail["pg_major"] = json!(info.pg_major);
        detail["replayed_to_segment"] =
            json!(wal.served_max.load(std::sync::atomic::Ordering::Relaxed));
        detail["restore_seconds"] = json!(round(replay_started.elapsed().as_secs_f64()));
        census_detail(&Census::Tables(tables), detail);
        Ok(())
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
            Attempt::Verified(detail) => {
                let mut tx = self.pool().begin().await?;
                lock_backup(&mut tx, job.backup_id).await?;
                let done = sqlx::query(
                    "UPDATE backup_verifications
                        SET status = 'verified', finished_at = now(), lease_expires_at = NULL,
                            detail = $4, failure_reason = NULL, error_summary = NULL,
                            internal_detail = NULL
                      WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
                )
                .bind(lease.id)
                .bind(&lease.worker)
                .bind(lease.attempts)
                .bind(detail)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    tracing::warn!(verification_id = %lease.id, "lease taken over before the verification was recorded");
                    return Ok(());
                }
                sqlx::query(
                    "UPDATE resource_backups SET verified_at = now(), verify_status = 'verified'
                      WHERE id = $1",
                )
                .bind(job.backup_id)
                .execute(&mut *tx)
                .await?;
                let anomalous =
                    crate::anomaly::check_content(&mut tx, job.backup_id, detail).await?;
                tx.commit().await?;
                if anomalous {
                    m.backup_anomalies
                        .with_label_values(&[type_label, "content"])
                        .inc();
                }
                m.backup_verified
                    .with_label_values(&[type_label, "ok"])
                    .inc();
                tracing::info!(verification_id = %lease.id, backup_id = %job.backup_id, resource_id = %job.resource_id,
                    level = %detail["level"], seconds = elapsed.as_secs_f64(), "backup verified");
            }
            Attempt::Failed(f, detail) => {
                let reason = f.failure.reason;
                let internal = crate::secret::redact_credentials(&f.failure.detail);
                let internal: String = internal.chars().take(8192).collect();
                let mut tx = self.pool().begin().await?;
                lock_backup(&mut tx, job.backup_id).await?;
                let outcome = jobs::record_failure(&mut tx, lease, reason, &internal).await?;
                if outcome != FailureOutcome::Stale {
                    let mut detail = detail.clone();
                    detail["backup_at_fault"] = json!(f.backup_at_fault);
                    sqlx::query("UPDATE backup_verifications SET detail = $2 WHERE id = $1")
                        .bind(lease.id)
                        .bind(&detail)
                        .execute(&mut *tx)
                        .await?;
                }
                let mut fresh = None;
                // A backup that expired meanwhile (retention, a destroyed key) is gone by design,
                // not broken: nothing to blame.
                let still_succeeded: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM resource_backups WHERE id = $1 AND status = 'succeeded')",
                )
                .bind(job.backup_id)
                .fetch_one(&mut *tx)
                .await?;
                if outcome == FailureOutcome::Failed && f.backup_at_fault && still_succeeded {
                    sqlx::query(
                        "UPDATE resource_backups SET verified_at = now(), verify_status = 'failed'
                          WHERE id = $1",
                    )
                    .bind(job.backup_id)
                    .execute(&mut *tx)
                    .await?;
                    audit(
                        &mut *tx,
                        "backup.verification_failed",
                        Some(job.team_id),
                        Some(job.resource_id),
                        Some(lease.id),
                        json!({
                            "resource_type": job.resource_type,
                            "failure_reason": reason.as_str(),
                            "backup_id": job.backup_id,
                            "verification_id": lease.id,
                        }),
                    )
                    .await?;
                    // A backup whose contents the engine refuses (a module type, a dump
                    // pg_restore rejects) will likely be taken the same way again: one fresh
                    // backup a day at most, not one per verification.
                    let recent: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM backup_verifications
                                         WHERE resource_id = $1 AND id <> $2 AND status = 'failed'
                                           AND (detail ->> 'backup_at_fault')::boolean
                                           AND finished_at > now() - interval '1 day')",
                    )
                    .bind(job.resource_id)
                    .bind(lease.id)
                    .fetch_one(&mut *tx)
                    .await?;
                    if reason == FailureReason::Integrity || !recent {
                        fresh = self.enqueue_fresh_backup(&mut tx, job).await?;
                    }
                }
                tx.commit().await?;
                if outcome == FailureOutcome::Failed {
                    m.backup_verified
                        .with_label_values(&[type_label, reason.as_str()])
                        .inc();
                }
                if fresh.is_some() {
                    m.backup_scheduled.with_label_values(&[type_label]).inc();
                }
                tracing::warn!(verification_id = %lease.id, backup_id = %job.backup_id, resource_id = %job.resource_id,
                    failure_reason = reason.as_str(), backup_at_fault = f.backup_at_fault, step = f.step,
                    outcome = ?outcome, fresh_backup = ?fresh, detail = %internal, "verification failed");
            }
            Attempt::Cancelled => {
                let released = jobs::release(self.pool(), lease).await?;
                tracing::info!(verification_id = %lease.id, released, "verification cancelled by shutdown; row released");
            }
            Attempt::LeaseLost => {
                tracing::warn!(verification_id = %lease.id, "lease lost mid-verification: job stopped, nothing recorded");
            }
        }
        Ok(())
    }

    /// A fresh `scheduled` backup of a resource whose backup failed verification, at once —
    /// when the resource is active and its plan backs up, and nothing is already queued
    /// (the usual uniqueness).
    async fn enqueue_fresh_backup(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        job: &Job,
    ) -> Result<Option<Uuid>, sqlx::Error> {
        let tier: Option<String> = sqlx::query_scalar(
            "SELECT t.plan_tier FROM resources r JOIN teams t ON t.id = r.team_id
              WHERE r.id = $1 AND r.status = 'active'",
        )
        .bind(job.resource_id)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(tier) = tier else {
            return Ok(None);
        };
        if !self.deps.plans.resolve(&tier).0.backs_up() {
            return Ok(None);
        }
        sqlx::query_scalar(
            "INSERT INTO resource_backups (resource_id, kind)
             SELECT $1, 'scheduled'
              WHERE NOT EXISTS (SELECT 1 FROM resource_backups
                                 WHERE resource_id = $1 AND status IN ('pending', 'running'))
             ON CONFLICT (resource_id, format) WHERE status = 'pending' AND kind = 'scheduled' DO NOTHING
             RETURNING id",
        )
        .bind(job.resource_id)
        .fetch_optional(&mut **tx)
        .await
    }

    /// Expired leases back to pending (or failed after the last attempt), then scratch
    /// databases no running attempt owns (a verifier killed mid-restore) dropped.
    async fn recover(&self) {
        let recovered = async {
            let mut tx = self.pool().begin().await?;
            let rows = jobs::recover_expired(&mut tx, JobTable::Verifications).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        match recovered {
            Ok(rows) => {
                for r in rows {
                    tracing::warn!(verification_id = %r.id, resource_id = %r.resource_id, failed = r.failed,
                        "recovered a verification whose lease expired");
                }
            }
            Err(e) => tracing::error!(error = %e, "stuck-verification recovery failed"),
        }
        if let Err(e) = self.drop_leftovers().await {
            tracing::warn!(error = %e, "dropping leftover scratch databases failed");
        }
    }

    /// Drops scratch databases and roles older than a lease whose attempt is not running any more.
    pub async fn drop_leftovers(&self) -> Result<usize, LoopError> {
        let Some(server) = &self.scratch else {
            return Ok(0);
        };
        let names = server.list().await.map_err(|f| f.detail)?;
        let now = Utc::now().timestamp();
        let lease = self.deps.config.lease.as_secs() as i64;
        let mut dropped = 0;
        for name in names {
            let Some((id, attempt, created)) = engines::parse_scratch_name(&name) else {
                continue;
            };
            if now - created < lease {
                continue;
            }
            let live: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM backup_verifications
                                 WHERE id = $1 AND attempts = $2 AND status = 'running')",
            )
            .bind(id)
            .bind(attempt)
            .fetch_one(self.pool())
            .await?;
            if !live {
                server.drop_scratch(&name).await.map_err(|f| f.detail)?;
                tracing::info!(database = %name, "dropped a scratch database and role left by an earlier attempt");
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// `backup-worker verify <backup_id>`: the same steps as the loop, now, recorded like any
    /// verification. A pending verification of the resource is replaced by this one.
    pub async fn verify_now(self: &Arc<Self>, backup_id: Uuid) -> Result<Report, VerifyError> {
        let row: Option<(Uuid, String)> =
            sqlx::query_as("SELECT resource_id, status FROM resource_backups WHERE id = $1")
                .bind(backup_id)
                .fetch_optional(self.pool())
                .await?;
        let (resource_id, status) = row.ok_or(VerifyError::BackupNotFound(backup_id))?;
        if status != "succeeded" {
            return Err(VerifyError::NotSucceeded {
                id: backup_id,
                status,
            });
        }
        let worker = &self.deps.config.worker_id;
        let mut tx = self.pool().begin().await?;
        let claimed_at = tokio::time::Instant::now();
        sqlx::query(
            "DELETE FROM backup_verifications WHERE resource_id = $1 AND status = 'pending'",
        )
        .bind(resource_id)
        .execute(&mut *tx)
        .await?;
        let claimed: Option<ClaimedRow> = sqlx::query_as(
            "INSERT INTO backup_verifications
                    (backup_id, resource_id, status, attempts, started_at, leased_by, lease_expires_at)
             VALUES ($1, $2, 'running', 1, now(), $3, now() + make_interval(secs => $4))
             ON CONFLICT (resource_id) WHERE status IN ('pending', 'running') DO NOTHING
             RETURNING id, backup_id, resource_id, attempts, started_at",
        )
        .bind(backup_id)
        .bind(resource_id)
        .bind(worker)
        .bind(self.deps.config.lease.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, _, _, attempts, started_at)) = claimed else {
            return Err(VerifyError::Busy(resource_id));
        };
        tx.commit().await?;
        let lease = Lease {
            table: JobTable::Verifications,
            id,
            attempts,
            worker: worker.clone(),
            started_at,
            claimed_at,
            token: Uuid::nil(),
        };
        let Some(job) = self.job(lease, backup_id, resource_id).await? else {
            return Err(VerifyError::NotSucceeded {
                id: backup_id,
                status: "gone".into(),
            });
        };
        let resource_type = job.resource_type.clone();
        Arc::clone(self)
            .run_job(job, CancellationToken::new())
            .await;
        let (status, failure_reason, internal_detail, detail): (
            String,
            Option<String>,
            Option<String>,
            Value,
        ) = sqlx::query_as(
            "SELECT status, failure_reason, internal_detail, detail
                   FROM backup_verifications WHERE id = $1",
        )
        .bind(id)
        .fetch_one(self.pool())
        .await?;
        Ok(Report {
            verification_id: id,
            backup_id,
            resource_id,
            resource_type,
            status,
            failure_reason,
            internal_detail,
            detail,
        })
    }
}

fn is_postgres(resource_type: &str) -> bool {
    matches!(
        ResourceType::parse(resource_type),
        Some(ResourceType::Postgres | ResourceType::Vector)
    )
}

/// Locks the verified backup's row before the verification's: the order retention and the
/// backups loop take (backup row, then the resource's verify mark through the triggers), so a
/// verification finishing while retention expires its backup waits instead of deadlocking.
async fn lock_backup(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    backup: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM resource_backups WHERE id = $1 FOR NO KEY UPDATE")
        .bind(backup)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn round(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// The counts of a census, as recorded in `detail`.
fn census_detail(census: &Census, detail: &mut Value) {
    match census {
        Census::Tables(tables) => {
            detail["method"] = json!("scratch_database");
            detail["tables"] = json!(tables);
            detail["rows_total"] = json!(tables.values().sum::<i64>());
        }
        Census::Namespaces(namespaces) => {
            detail["method"] = json!("archive_read");
            detail["namespaces"] = json!(namespaces);
            detail["documents_total"] = json!(namespaces.values().sum::<u64>());
        }
        Census::Databases { keys, functions } => {
            detail["method"] = json!("rdb_cut");
            let dbs: serde_json::Map<String, Value> = keys
                .iter()
                .map(|(db, n)| (db.to_string(), json!(n)))
                .collect();
            detail["databases"] = Value::Object(dbs);
            detail["keys_total"] = json!(keys.values().sum::<u64>());
            detail["functions"] = json!(functions);
        }
        Census::RedisScratch(r) => {
            detail["method"] = json!("scratch_server");
            let per = |f: fn(&engines::DbCount) -> u64| -> Value {
                Value::Object(
                    r.databases
                        .iter()
                        .map(|(db, c)| (db.to_string(), json!(f(c))))
                        .collect(),
                )
            };
            detail["databases"] = per(|c| c.restored);
            detail["counted"] = per(|c| c.counted);
            detail["expired"] = per(|c| c.expired);
            detail["duplicates"] = per(|c| c.duplicates);
            detail["keys_total"] = json!(r.databases.values().map(|c| c.restored).sum::<u64>());
            detail["functions"] = json!(r.functions);
            detail["redis_server_version"] = json!(r.server_version);
            detail["sanitize_dump_payload"] = json!(r.sanitize);
            detail["scratch_db"] = json!(r.slot);
        }
    }
}

#[async_trait]
impl Loop for Arc<Verifier> {
    fn name(&self) -> LoopName {
        LoopName::Verifier
    }

    fn interval(&self) -> Duration {
        self.deps.config.verify_interval
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        // Recovery and leftover scratch databases are housekeeping, before every claim round.
        let enqueued = self.enqueue().await?;
        if enqueued > 0 {
            tracing::info!(enqueued, "verifications enqueued");
        }
        jobs::drive(self, ctx).await?;
        self.refresh_unverified().await?;
        Ok(())
    }
}

#[async_trait]
impl jobs::Queue for Verifier {
    type Job = Job;

    fn concurrency(&self) -> usize {
        self.deps.config.verify_concurrency
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
        Verifier::claim(self).await
    }

    async fn run(self: Arc<Self>, job: Job, abort: CancellationToken) {
        tracing::info!(verification_id = %job.lease.id, backup_id = %job.backup_id, resource_id = %job.resource_id,
            attempt = job.lease.attempts, "verification claimed");
        self.run_job(job, abort).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn census_details_name_their_counts() {
        let mut d = json!({});
        census_detail(
            &Census::Databases {
                keys: [(0, 5), (3, 2)].into(),
                functions: 1,
            },
            &mut d,
        );
        assert_eq!(d["databases"]["3"], 2);
        assert_eq!(d["keys_total"], 7);
        let mut d = json!({});
        census_detail(
            &Census::Tables([("public.a".to_owned(), 3), ("s.b".to_owned(), 4)].into()),
            &mut d,
        );
        assert_eq!(d["rows_total"], 7);
        assert_eq!(d["tables"]["s.b"], 4);
    }

    #[test]
    fn scratch_names_round_trip() {
        let id = Uuid::new_v4();
        let name = engines::scratch_name(id, 2, 1_790_000_000);
        assert!(name.len() <= 63, "{name}");
        assert_eq!(
            engines::parse_scratch_name(&name),
            Some((id, 2, 1_790_000_000))
        );
        assert_eq!(engines::parse_scratch_name("bw_verify_nope"), None);
        assert_eq!(engines::parse_scratch_name("postgres"), None);
    }
}
