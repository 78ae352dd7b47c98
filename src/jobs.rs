//! Lease machinery shared by the backup and restore queues: renewal, fencing, retry/fail
//! bookkeeping and release. Every finishing UPDATE is fenced on `leased_by` and `attempts`, so a
//! worker that lost its lease (taken over after expiry) can never overwrite the current owner.

use std::time::Duration;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::health::Heartbeat;
use crate::pass::{LoopError, PassContext};

use crate::domain::FailureReason;

/// Attempts before a retryable failure becomes final.
pub const MAX_ATTEMPTS: i32 = 3;
/// Backoff before attempt n+1, indexed by n−1 (DESIGN §5: 1, 5, 15 minutes).
pub const RETRY_BACKOFF_MINUTES: [i64; 3] = [1, 5, 15];
/// Copies (DESIGN §13) outlast a destination's outage: 10 attempts, 1 min … 1 h apart.
pub const COPY_MAX_ATTEMPTS: i32 = 10;
pub const COPY_BACKOFF_MINUTES: [i64; 5] = [1, 5, 15, 30, 60];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobTable {
    Backups,
    Restores,
    Verifications,
    Copies,
}

impl JobTable {
    pub fn table(self) -> &'static str {
        match self {
            JobTable::Backups => "resource_backups",
            JobTable::Restores => "resource_restores",
            JobTable::Verifications => "backup_verifications",
            JobTable::Copies => "backup_copies",
        }
    }

    /// Attempts before a retryable failure (or an expired lease) becomes final.
    pub fn max_attempts(self) -> i32 {
        match self {
            JobTable::Copies => COPY_MAX_ATTEMPTS,
            _ => MAX_ATTEMPTS,
        }
    }

    /// The pause before attempt n+1.
    pub fn retry_delay(self, attempts: i32) -> Duration {
        let steps: &[i64] = match self {
            JobTable::Copies => &COPY_BACKOFF_MINUTES,
            _ => &RETRY_BACKOFF_MINUTES,
        };
        let idx = (attempts.max(1) - 1) as usize;
        Duration::from_secs(steps[idx.min(steps.len() - 1)] as u64 * 60)
    }
}

/// A claimed row: the fencing token is (worker, attempts).
#[derive(Debug, Clone)]
pub struct Lease {
    pub table: JobTable,
    pub id: Uuid,
    pub attempts: i32,
    pub worker: String,
    pub started_at: DateTime<Utc>,
    /// When the claim was sent (this process's clock): the lease lasts at least until then +
    /// its length.
    pub claimed_at: tokio::time::Instant,
    /// The claim's token (see [`Claimer`]).
    pub token: Uuid,
}

/// Where a failed attempt leaves its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Back to pending, to run after the backoff.
    Retry { after: Duration },
    /// Final: status failed.
    Failed,
    /// The lease was no longer ours: nothing was written.
    Stale,
}

pub fn retry_delay(attempts: i32) -> Duration {
    JobTable::Backups.retry_delay(attempts)
}

/// Extends the lease; false when the row is no longer ours (taken over, released, finished).
pub async fn renew(pool: &PgPool, lease: &Lease, duration: Duration) -> Result<bool, sqlx::Error> {
    fenced_update(
        pool,
        lease,
        "lease_expires_at = now() + make_interval(secs => $4)",
        Some(duration.as_secs_f64()),
    )
    .await
}

/// `UPDATE <table> SET <set>` on the lease's row only while the lease still holds it (status
/// running, our worker, our attempt): the fence every write of a job goes through. `$4`, when
/// `set` uses it, is `seconds`. True when the row was ours and is updated.
async fn fenced_update(
    pool: &PgPool,
    lease: &Lease,
    set: &str,
    seconds: Option<f64>,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "UPDATE {} SET {set}
          WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
        lease.table.table()
    );
    let mut query = sqlx::query(&sql)
        .bind(lease.id)
        .bind(&lease.worker)
        .bind(lease.attempts);
    if let Some(seconds) = seconds {
        query = query.bind(seconds);
    }
    Ok(query.execute(pool).await?.rows_affected() == 1)
}

/// Gives a row back at once (graceful shutdown): pending, runnable now, and the attempt it was
/// on does not count against it. started_at is left as it was.
pub async fn release(pool: &PgPool, lease: &Lease) -> Result<bool, sqlx::Error> {
    fenced_update(
        pool,
        lease,
        "status = 'pending', attempts = greatest(attempts - 1, 0), run_after = now(),
         leased_by = NULL, lease_expires_at = NULL",
        None,
    )
    .await
}

/// Records a failed attempt, fenced: retried (pending after backoff) while attempts remain and
/// the class is retryable, else failed with finished_at.
pub async fn record_failure(
    tx: &mut Transaction<'_, Postgres>,
    lease: &Lease,
    reason: FailureReason,
    internal_detail: &str,
) -> Result<FailureOutcome, sqlx::Error> {
    let retry = reason.retryable() && lease.attempts < lease.table.max_attempts();
    let sql = if retry {
        format!(
            "UPDATE {} SET status = 'pending', run_after = now() + make_interval(secs => $7),
                    leased_by = NULL, lease_expires_at = NULL,
                    failure_reason = $4, error_summary = $5, internal_detail = $6
              WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3",
            lease.table.table()
        )
    } else {
        format!(
            "UPDATE {} SET status = 'failed', finished_at = now(), lease_expires_at = NULL,
                    failure_reason = $4, error_summary = $5, internal_detail = $6
              WHERE id = $1 AND status = 'running' AND leased_by = $2 AND attempts = $3
                AND $7 >= 0",
            lease.table.table()
        )
    };
    let delay = lease.table.retry_delay(lease.attempts);
    let done = sqlx::query(&sql)
        .bind(lease.id)
        .bind(&lease.worker)
        .bind(lease.attempts)
        .bind(reason.as_str())
        .bind(summary(lease.table, reason, !retry))
        .bind(internal_detail)
        .bind(delay.as_secs_f64())
        .execute(&mut **tx)
        .await?;
    Ok(match (done.rows_affected(), retry) {
        (0, _) => FailureOutcome::Stale,
        (_, true) => FailureOutcome::Retry { after: delay },
        (_, false) => FailureOutcome::Failed,
    })
}

/// The customer-facing text of a failure of `table`'s job, `final_` when the row failed for good:
/// restores have texts of their own (DESIGN §6), backups and verifications the backup's.
pub fn summary(table: JobTable, reason: FailureReason, final_: bool) -> &'static str {
    match (table, final_) {
        (JobTable::Restores, _) => reason.restore_summary(final_),
        (_, true) => reason.final_summary(),
        (_, false) => reason.customer_summary(),
    }
}

/// A database error that says nothing about the statement, only that the database could not be
/// reached or answer (a restart, a failover, a broken connection): worth retrying.
pub fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception, 57: operator intervention (admin shutdown, crash recovery,
        // cannot connect now), 53: insufficient resources, 40001/40P01: serialization/deadlock.
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            c.starts_with("08")
                || c.starts_with("57")
                || c.starts_with("53")
                || c == "40001"
                || c == "40P01"
        }),
        _ => false,
    }
}

/// Each try at recording a result is bounded by a quarter of the lease within these limits (a
/// connection being re-established after a database restart backs off for up to seconds; a fresh
/// try starts a fresh connection), and tries are this far apart.
const RECORD_TRY_MIN: Duration = Duration::from_millis(500);
const RECORD_TRY_MAX: Duration = Duration::from_secs(10);
const RECORD_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How long one try at writing a job's result may take, for a lease of `length`.
pub fn record_try(length: Duration) -> Duration {
    (length / 4).clamp(RECORD_TRY_MIN, RECORD_TRY_MAX)
}

/// Writes a job's result (or any fenced step of it) with `write`, again and again while the
/// database cannot be reached (a restart, a failover) and the lease still holds — `lost` is the
/// renewer's token, so the lease is renewed meanwhile by [`run_leased`]. Each try is bounded by
/// [`record_try`], so a fresh connection is sought soon after the database is back. Giving up at
/// the first error threw results away for an outage shorter than the lease (a finished backup's
/// object deleted; a restore's rewind run a second time after its lease expired). `write` must be
/// one transaction, fenced, so a try whose commit's answer was lost is harmless to repeat. Err:
/// the last error, once it is not transient or the lease is gone.
pub async fn record<T, F, Fut>(
    lease: &Lease,
    length: Duration,
    lost: &CancellationToken,
    what: &str,
    mut write: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let per_try = record_try(length);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let (error, transient) = match tokio::time::timeout(per_try, write()).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => (e.to_string(), transient(&e)),
            Err(_) => (format!("no answer within {per_try:?}"), true),
        };
        if !transient || lost.is_cancelled() {
            tracing::error!(table = lease.table.table(), id = %lease.id, tries, error = %error,
                "{what} failed");
            return Err(error);
        }
        tracing::warn!(table = lease.table.table(), id = %lease.id, tries, error = %error,
            "{what} failed; retrying while the lease holds");
        tokio::select! {
            _ = tokio::time::sleep(RECORD_RETRY_PAUSE) => {}
            _ = lost.cancelled() => {}
        }
    }
}

/// Marks a restore's destructive step as begun (DESIGN §6: a restore is applied at most once per
/// row), fenced on the lease. From here on, a lease that lapses makes the row's outcome unknown:
/// the recovery fails it instead of running the rewind again. False: the row is not ours.
pub async fn mark_applying(pool: &PgPool, lease: &Lease) -> Result<bool, sqlx::Error> {
    fenced_update(pool, lease, "applying_since = now()", None).await
}

/// A running row whose lease had expired (its worker died or hung), as the sweep left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub id: Uuid,
    pub resource_id: Uuid,
    pub team_id: Uuid,
    pub resource_type: String,
    /// When the dead attempt began (`started_at`, untouched): it names the attempt's object.
    pub started_at: DateTime<Utc>,
    /// True when it had used its last attempt and is now `failed` (reason `timeout`).
    pub failed: bool,
    /// A restore whose destructive step had begun: `failed` (reason `timeout`) at once, never
    /// re-run, since nobody knows whether its rewind took effect (DESIGN §6).
    pub outcome_unknown: bool,
}

/// (id, resource_id, team_id, resource_type, started_at, failed, outcome_unknown).
type RecoveredRow = (Uuid, Uuid, Uuid, String, DateTime<Utc>, bool, bool);

/// The customer-facing summary of a restore whose outcome is unknown (DESIGN §6): never a
/// promise to retry.
pub const OUTCOME_UNKNOWN_SUMMARY: &str = "We lost track of your restore after it began changing \
your database, so we can't tell whether it finished; it was not run again. Our team is alerted \
and will check your database.";

/// Returns every `running` row of `table` whose lease has expired to `pending` (runnable now), or
/// to `failed` with reason `timeout` once it has used MAX_ATTEMPTS. `started_at` is never
/// written (it is NOT NULL and keeps the time the attempt began). Safe to run on every replica
/// at once: a row being renewed right now no longer matches when its lock is released.
pub async fn recover_expired(
    tx: &mut Transaction<'_, Postgres>,
    table: JobTable,
) -> Result<Vec<Recovered>, sqlx::Error> {
    // Only restores have a destructive step to be applied at most once.
    let unknown = if table == JobTable::Restores {
        "j.applying_since IS NOT NULL"
    } else {
        "false"
    };
    let sql = format!(
        "UPDATE {t} AS j
            SET status = CASE WHEN j.attempts >= $1 OR {unknown} THEN 'failed' ELSE 'pending' END,
                finished_at = CASE WHEN j.attempts >= $1 OR {unknown} THEN now() END,
                run_after = now(),
                failure_reason = CASE WHEN j.attempts >= $1 OR {unknown} THEN 'timeout'
                                      ELSE j.failure_reason END,
                error_summary = CASE WHEN {unknown} THEN $3
                                     WHEN j.attempts >= $1 THEN $2 ELSE j.error_summary END,
                internal_detail = 'lease held by ' || coalesce(j.leased_by, '?') || ' expired at '
                                  || j.lease_expires_at::text || ' (attempt ' || j.attempts || ')'
                                  || CASE WHEN {unknown}
                                          THEN '; its rewind of the target had begun; the outcome is unknown, so it is not run again'
                                          ELSE '' END,
                leased_by = NULL,
                lease_expires_at = NULL
           FROM resources r
          WHERE j.id IN (SELECT id FROM {t} WHERE status = 'running' AND lease_expires_at < now()
                          FOR UPDATE SKIP LOCKED)
            AND r.id = j.resource_id
         RETURNING j.id, j.resource_id, r.team_id, r.resource_type, j.started_at,
                   j.status = 'failed', {unknown}",
        t = table.table()
    );
    let rows: Vec<RecoveredRow> = sqlx::query_as(&sql)
        .bind(table.max_attempts())
        .bind(summary(table, FailureReason::Timeout, true))
        .bind(OUTCOME_UNKNOWN_SUMMARY)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, resource_id, team_id, resource_type, started_at, failed, outcome_unknown)| {
                Recovered {
                    id,
                    resource_id,
                    team_id,
                    resource_type,
                    started_at,
                    failed,
                    outcome_unknown,
                }
            },
        )
        .collect())
}

/// Renews the lease every third of its length; cancels `lost` when the row is no longer ours, or
/// when we can no longer be sure it is. Each renewal is bounded by the time the lease is known to
/// last, counted from when the last successful renewal was *sent* (the database starts the new
/// lease no earlier than that), less a safety margin: a renewal that hangs (a network partition, a
/// lock) stops the job before another replica may take the row over — never two workers on one
/// row.
pub async fn renew_lease(pool: PgPool, lease: Lease, length: Duration, lost: CancellationToken) {
    let every = (length / 3).max(Duration::from_millis(500));
    // Stop this much before the lease's end: room for killing tools and for clock drift.
    let margin = (length / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut valid_until = lease.claimed_at + length.saturating_sub(margin);
    let mut retrying = false;
    loop {
        if !retrying {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = tokio::time::sleep_until(valid_until) => {}
            }
        }
        retrying = false;
        let sent = tokio::time::Instant::now();
        if sent >= valid_until {
            tracing::error!(id = %lease.id, "lease ran out without a successful renewal; stopping the job");
            lost.cancel();
            return;
        }
        match tokio::time::timeout_at(valid_until, renew(&pool, &lease, length)).await {
            Ok(Ok(true)) => valid_until = sent + length.saturating_sub(margin),
            Ok(Ok(false)) => {
                tracing::warn!(id = %lease.id, "lease taken over; stopping the job");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(id = %lease.id, error = %e, "lease renewal failed; retrying");
                // Retry soon, not a third of the lease later: a database back within the lease
                // must not cost a long job its run.
                let soon = (sent + Duration::from_secs(1).min(every)).min(valid_until);
                tokio::time::sleep_until(soon).await;
                retrying = true;
            }
            Err(_) => {
                tracing::error!(id = %lease.id, "lease renewal did not answer before the lease ran out; stopping the job");
                lost.cancel();
                return;
            }
        }
    }
}

/// A spawned task aborted when this guard is dropped — also when the job holding it unwinds.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A job under a lease that panicked (a bug): its lease was ended at once.
#[derive(Debug)]
pub struct Panicked(pub String);

/// Runs the job `work` builds under `lease`: renewed (see [`renew_lease`]) while it runs, its
/// `lost` token cancelled when the lease is lost or in doubt. The renewer never outlives this
/// call, and a panic is caught: the row's lease is ended at once, so the recovery sweep returns it
/// to pending (or fails it after its last attempt) instead of a detached renewer keeping the
/// resource blocked until the process restarts.
pub async fn run_leased<T, F, Fut>(
    pool: &PgPool,
    lease: &Lease,
    length: Duration,
    work: F,
) -> Result<T, Panicked>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    use futures::FutureExt;
    let lost = CancellationToken::new();
    let renewer = AbortOnDrop(tokio::spawn(renew_lease(
        pool.clone(),
        lease.clone(),
        length,
        lost.clone(),
    )));
    let outcome = std::panic::AssertUnwindSafe(work(lost))
        .catch_unwind()
        .await;
    drop(renewer);
    outcome.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        Panicked(msg)
    })
}

/// Why a job was stopped before its work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `BACKUP_TIMEOUT` ran out.
    TimedOut,
    /// The shutdown grace ran out: the row is to be released.
    Aborted,
    /// The lease was lost or is in doubt: nothing may be written.
    LeaseLost,
}

/// Runs `work` until it finishes or the job must stop: its timeout, the shutdown abort, or the
/// lease's `lost` token. Dropping `work` kills what it started (tools run kill-on-drop).
pub async fn until_stopped<T>(
    work: impl std::future::Future<Output = T>,
    timeout: Duration,
    abort: &CancellationToken,
    lost: &CancellationToken,
) -> Result<T, Stopped> {
    tokio::select! {
        done = work => Ok(done),
        _ = tokio::time::sleep(timeout) => Err(Stopped::TimedOut),
        _ = abort.cancelled() => Err(Stopped::Aborted),
        _ = lost.cancelled() => Err(Stopped::LeaseLost),
    }
}

/// Ends a lease now (a panicked job): the next recovery sweep treats the row like a dead
/// worker's. Fenced like every write.
pub async fn expire_lease(pool: &PgPool, lease: &Lease) -> Result<bool, sqlx::Error> {
    fenced_update(
        pool,
        lease,
        "lease_expires_at = now() - interval '1 millisecond'",
        None,
    )
    .await
}

/// Logs a panicked job and ends its lease (the recovery sweep does the rest).
pub async fn after_panic(pool: &PgPool, lease: &Lease, panicked: &Panicked) {
    tracing::error!(table = lease.table.table(), id = %lease.id, panic = %panicked.0,
        "job panicked; its lease is ended so the row is recovered at once");
    if let Err(e) = expire_lease(pool, lease).await {
        tracing::error!(id = %lease.id, error = %e, "ending a panicked job's lease failed; it expires on its own");
    }
}

/// A freshly claimed row: its lease and resource.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub lease: Lease,
    pub resource_id: Uuid,
}

/// Claims for one table. Each claim stamps a fresh token; when the worker cannot learn whether a
/// claim took (the statement's answer was lost: a Postgres restart, a broken connection) or the
/// job cannot be loaded after it, the token is kept and the row given back — pending, runnable
/// now, the attempt not counted — at the next [`Claimer::settle`], instead of the row waiting
/// out its lease and then counting an attempt that never ran.
pub struct Claimer {
    table: JobTable,
    unsettled: std::sync::Mutex<Vec<Uuid>>,
}

impl Claimer {
    pub fn new(table: JobTable) -> Self {
        Self {
            table,
            unsettled: std::sync::Mutex::default(),
        }
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, Vec<Uuid>> {
        self.unsettled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the first due `pending` row in `order_by` order whose resource has no backup or
    /// restore running (the rule every queue shares; the database enforces it too), in one
    /// statement with `FOR UPDATE SKIP LOCKED`. `order_by` names the table as `x`.
    pub async fn claim_next(
        &self,
        pool: &PgPool,
        order_by: &str,
        worker: &str,
        length: Duration,
    ) -> Result<Option<Claimed>, sqlx::Error> {
        let candidates = self.candidates(order_by);
        self.claim(pool, &candidates, worker, length).await
    }

    /// The candidate query of [`Claimer::claim_next`]: with an index in `order_by` order it is an
    /// index scan that stops at the first row it can lock, whatever the queue's length (the
    /// claim-plan tests EXPLAIN it).
    pub fn candidates(&self, order_by: &str) -> String {
        format!(
            "SELECT x.id FROM {t} x
              WHERE x.status = 'pending' AND x.run_after <= now()
                AND NOT EXISTS (SELECT 1 FROM resource_backups o
                                 WHERE o.resource_id = x.resource_id AND o.status = 'running')
                AND NOT EXISTS (SELECT 1 FROM resource_restores o
                                 WHERE o.resource_id = x.resource_id AND o.status = 'running')
              ORDER BY {order_by}
              LIMIT 1
              FOR UPDATE SKIP LOCKED",
            t = self.table.table()
        )
    }

    /// Claims the first row `candidates` selects (a `SELECT x.id FROM <table> x … ORDER BY …
    /// LIMIT 1 FOR UPDATE SKIP LOCKED` that may bind nothing), in one statement, with a lease of
    /// `length`. A unique violation (another worker started an operation on the same resource
    /// between our check and our update) looks again, a few times.
    pub async fn claim(
        &self,
        pool: &PgPool,
        candidates: &str,
        worker: &str,
        length: Duration,
    ) -> Result<Option<Claimed>, sqlx::Error> {
        // A restore's new attempt has not begun its destructive step (see `mark_applying`).
        let fresh = if self.table == JobTable::Restores {
            ", applying_since = NULL"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE {t} SET status = 'running', attempts = attempts + 1, started_at = now(),
                    leased_by = $1, lease_expires_at = now() + make_interval(secs => $2),
                    claim_token = $3{fresh}
              WHERE id = ({candidates})
             RETURNING id, resource_id, attempts, started_at",
            t = self.table.table()
        );
        for _ in 0..CLAIM_RETRIES {
            let token = Uuid::new_v4();
            let claimed_at = tokio::time::Instant::now();
            let row: Result<Option<ClaimedRow>, sqlx::Error> = sqlx::query_as(&sql)
                .bind(worker)
                .bind(length.as_secs_f64())
                .bind(token)
                .fetch_optional(pool)
                .await;
            match row {
                Ok(Some((id, resource_id, attempts, started_at))) => {
                    return Ok(Some(Claimed {
                        lease: Lease {
                            table: self.table,
                            id,
                            attempts,
                            worker: worker.to_owned(),
                            started_at,
                            claimed_at,
                            token,
                        },
                        resource_id,
                    }))
                }
                Ok(None) => return Ok(None),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => continue,
                Err(e) => {
                    // It may have committed all the same: give it back by its token.
                    self.unsettled().push(token);
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// The claim of `lease` could not be followed through (its job failed to load): on a
    /// [`transient`] error its row goes back as if never claimed, now or at the next settle.
    /// Any other error (one that would recur every time) leaves the row to its lease, so its
    /// attempts count and it ends `failed` rather than being claimed and given back forever.
    pub async fn give_back(&self, pool: &PgPool, lease: &Lease, error: &sqlx::Error) {
        if !transient(error) {
            return;
        }
        self.unsettled().push(lease.token);
        self.settle(pool).await;
    }

    /// Gives back every row claimed under an unsettled token. Logs its own errors (kept for
    /// the next call).
    pub async fn settle(&self, pool: &PgPool) {
        let tokens: Vec<Uuid> = self.unsettled().clone();
        if tokens.is_empty() {
            return;
        }
        let sql = format!(
            "UPDATE {} SET status = 'pending', attempts = greatest(attempts - 1, 0),
                    run_after = now(), leased_by = NULL, lease_expires_at = NULL, claim_token = NULL
              WHERE claim_token = ANY($1) AND status = 'running'",
            self.table.table()
        );
        match sqlx::query(&sql).bind(&tokens).execute(pool).await {
            Ok(done) => {
                self.unsettled().retain(|t| !tokens.contains(t));
                if done.rows_affected() > 0 {
                    tracing::warn!(
                        table = self.table.table(),
                        rows = done.rows_affected(),
                        "gave back rows whose claim could not be followed through"
                    );
                }
            }
            Err(e) => tracing::warn!(table = self.table.table(), error = %e,
                "giving back unsettled claims failed; retried at the next pass"),
        }
    }
}

/// Claim attempts when a concurrent claimer wins the same resource (a unique violation).
const CLAIM_RETRIES: usize = 5;

/// (id, resource_id, attempts, started_at) of a freshly claimed row.
type ClaimedRow = (Uuid, Uuid, i32, DateTime<Utc>);

/// Runs [`recover_expired`] and writes `<audit_kind>` (backup.failed / restore.failed) for rows
/// that used their last attempt, in one transaction.
pub async fn recover_and_audit(
    pool: &PgPool,
    table: JobTable,
    audit_kind: &str,
) -> Result<Vec<Recovered>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let recovered = recover_expired(&mut tx, table).await?;
    for r in recovered.iter().filter(|r| r.failed) {
        let (kind, summary) = if r.outcome_unknown {
            ("restore.outcome_unknown", OUTCOME_UNKNOWN_SUMMARY)
        } else {
            (audit_kind, summary(table, FailureReason::Timeout, true))
        };
        let detail = serde_json::json!({
            "resource_type": r.resource_type,
            "failure_reason": FailureReason::Timeout.as_str(),
            "error_summary": summary,
        });
        crate::db::audit(
            &mut *tx,
            kind,
            Some(r.team_id),
            Some(r.resource_id),
            Some(r.id),
            detail,
        )
        .await?;
    }
    tx.commit().await?;
    for r in &recovered {
        if r.outcome_unknown {
            tracing::error!(table = table.table(), id = %r.id, resource_id = %r.resource_id,
                "a restore's lease expired after its rewind began: outcome unknown, failed, not run again");
        } else {
            tracing::warn!(table = table.table(), id = %r.id, resource_id = %r.resource_id,
                failed = r.failed, "recovered a row whose lease expired");
        }
    }
    Ok(recovered)
}

/// True (and stamps `last`) when `every` has passed since `last`, or it never ran.
pub fn due(last: &mut Option<std::time::Instant>, every: Duration) -> bool {
    if last.is_some_and(|t| t.elapsed() < every) {
        return false;
    }
    *last = Some(std::time::Instant::now());
    true
}

/// [`due`] behind a lock, for housekeeping that several tasks of a queue may ask about.
#[derive(Debug, Default)]
pub struct Every(std::sync::Mutex<Option<std::time::Instant>>);

impl Every {
    /// True (and stamped) when `every` has passed since it was last true, or never was.
    pub fn due(&self, every: Duration) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        due(&mut last, every)
    }
}

/// How often a queue looks for expired leases: every few seconds, never less often than a lease
/// lasts.
pub fn recovery_every(lease: Duration) -> Duration {
    lease.min(Duration::from_secs(10))
}

/// How often a pass with running jobs looks for more work (and reports progress).
const POLL: Duration = Duration::from_secs(1);

/// A claimable queue (backups, restores) driven by [`drive`].
#[async_trait::async_trait]
pub trait Queue: Send + Sync + 'static {
    type Job: Send + 'static;
    /// Jobs at once in this replica.
    fn concurrency(&self) -> usize;
    /// Recovery sweeps and the like; called before each round of claims. Logs its own errors.
    /// Long housekeeping (retention, reconciliation) calls `heartbeat.progress()` as it goes, so
    /// /healthz never takes it for a stall.
    async fn housekeeping(&self, heartbeat: &Heartbeat);
    /// Claims one due row, or `None`.
    async fn claim(&self) -> Result<Option<Self::Job>, sqlx::Error>;
    /// Runs a claimed job to a written-down result; `abort` cancels it (shutdown grace over).
    async fn run(self: Arc<Self>, job: Self::Job, abort: CancellationToken);
}

/// One pass: claims up to `concurrency` jobs at a time until nothing is due and nothing runs. On
/// shutdown it stops claiming and waits for running jobs (which `ctx.abort` cancels). A claim
/// error stops claiming; running jobs still finish before the error is returned.
pub async fn drive<Q: Queue>(queue: &Arc<Q>, ctx: &PassContext) -> Result<(), LoopError> {
    let mut running = JoinSet::new();
    let mut claim_error = None;
    loop {
        queue.housekeeping(&ctx.heartbeat).await;
        while claim_error.is_none()
            && running.len() < queue.concurrency()
            && !ctx.shutdown.is_cancelled()
        {
            match queue.claim().await {
                Ok(Some(job)) => {
                    running.spawn(Arc::clone(queue).run(job, ctx.abort.clone()));
                }
                Ok(None) => break,
                Err(e) => claim_error = Some(e),
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            Some(done) = running.join_next() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "job panicked; its lease will expire and be recovered");
                }
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        ctx.heartbeat.progress();
    }
    match claim_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_trouble_is_transient() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(transient(&sqlx::Error::Io(io)));
        assert!(transient(&sqlx::Error::PoolTimedOut));
        assert!(!transient(&sqlx::Error::RowNotFound));
        assert!(!transient(&sqlx::Error::ColumnNotFound("x".into())));
    }

    #[test]
    fn backoff_schedule() {
        assert_eq!(retry_delay(1), Duration::from_secs(60));
        assert_eq!(retry_delay(2), Duration::from_secs(300));
        assert_eq!(retry_delay(3), Duration::from_secs(900));
        assert_eq!(retry_delay(9), Duration::from_secs(900));
    }
}
