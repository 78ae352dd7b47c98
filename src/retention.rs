//! Housekeeping of the backup store: retention per plan tier, the reconciliation of orphaned
//! objects, and the sweep of multipart uploads left behind by a crashed process.
//!
//! Retention at fleet scale (1M resources × hourly backups is ~720M succeeded rows at 30 days) is
//! index-driven: no statement reads every succeeded row. A run has two phases, each in batches
//! (one candidate query, one `UPDATE … RETURNING`, one batched object delete per batch, the loop's
//! heartbeat between batches), and a run is bounded (the next run continues from its cursor):
//!
//! - **A, by age:** succeeded rows older than the cutoff of the *longest* effective retention in
//!   use are past every tier's retention. They are walked oldest first through
//!   `resource_backups_retention_idx (finished_at, id) WHERE status = 'succeeded'`, keyset-paged,
//!   so the scan touches only rows that expire now and the few a rule keeps (keep_last, newest,
//!   a restore reading it) — never the history the fleet keeps.
//! - **B, by team:** resources whose tier keeps backups for less than that longest retention are
//!   visited a chunk of teams at a time (primary-key order), one index probe per resource into
//!   `resource_backups_succeeded_idx (resource_id, finished_at DESC)` for rows past its cutoff.
//!
//! Each candidate's keep rules are an index probe of at most `keep_last` newer rows of its
//! resource (passing over newer ones that failed verification: they count for nothing). So a run costs the rows it expires plus one probe per resource on a shorter-retention
//! tier, whatever the total number of rows kept.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::health::Heartbeat;
use crate::plans::{Plan, Plans};
use crate::storage::{ObjectStore, StorageError};

/// Rows per batch (candidates, the UPDATE, the objects deleted together), and queued deletions
/// handled per housekeeping round.
pub const RETENTION_BATCH: usize = 1000;
/// Teams per phase-B chunk.
const TEAMS_PER_CHUNK: i64 = 500;

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
    /// Objects whose delete failed (the row is expired; the object is an orphan, logged, and the
    /// periodic reconciliation of orphaned objects removes it).
    pub delete_failed: u64,
    /// Batches that expired rows.
    pub batches: u64,
    /// The run stopped at its bound; the next run continues where it stopped.
    pub incomplete: bool,
}

/// How much one run may do.
#[derive(Debug, Clone)]
pub struct RetentionLimits {
    pub batch: usize,
    /// Statements (candidate queries) per run.
    pub max_batches: usize,
    /// Wall time per run.
    pub budget: Duration,
}

impl Default for RetentionLimits {
    fn default() -> Self {
        Self {
            batch: RETENTION_BATCH,
            max_batches: 500,
            budget: Duration::from_secs(120),
        }
    }
}

/// Where a bounded run stopped; the next run continues from here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RetentionCursor {
    /// A new cycle: phase A from the oldest row.
    #[default]
    Start,
    /// Phase A, after this (finished_at, id).
    ByAge(DateTime<Utc>, Uuid),
    /// Phase B, after this team id (`None`: from the first).
    ByTeam(Option<Uuid>),
}

/// A tier's retention as applied: a tier with `backup_retention_days: 0` takes no backups, and
/// the ones its teams already have (a downgrade, a billing blip) age out on `default`'s plan —
/// its retention and its keep_last.
pub fn effective_policy(plans: &Plans, tier: &str) -> (i32, i32) {
    let (plan, _) = plans.resolve(tier);
    let plan: &Plan = if plan.backup_retention_days == 0 {
        plans.default_plan()
    } else {
        plan
    };
    (
        plan.backup_retention_days as i32,
        plan.backup_keep_last as i32,
    )
}

/// The policy of every tier the teams table holds, as arrays bound into the statements.
struct Policies {
    tiers: Vec<String>,
    retention_days: Vec<i32>,
    keep_last: Vec<i32>,
    /// The longest retention in use (phase A's cutoff).
    longest: i32,
    /// Tiers keeping backups for less than `longest` (phase B).
    shorter: Vec<String>,
}

async fn policies(pool: &PgPool, plans: &Plans) -> Result<Policies, sqlx::Error> {
    let tiers: Vec<String> = sqlx::query_scalar("SELECT DISTINCT plan_tier FROM teams")
        .fetch_all(pool)
        .await?;
    let mut p = Policies {
        retention_days: Vec::with_capacity(tiers.len()),
        keep_last: Vec::with_capacity(tiers.len()),
        longest: 0,
        shorter: Vec::new(),
        tiers,
    };
    for tier in &p.tiers {
        let (days, keep) = effective_policy(plans, tier);
        p.retention_days.push(days);
        p.keep_last.push(keep);
        p.longest = p.longest.max(days);
    }
    for (tier, days) in p.tiers.iter().zip(&p.retention_days) {
        if *days < p.longest {
            p.shorter.push(tier.clone());
        }
    }
    Ok(p)
}

/// Eligibility of succeeded row `b` of resource `r` under policy `p` at `$now` (bound as the
/// statement's parameter named here): past its tier's retention; for a resource that is not
/// deleted, at least max(keep_last, 1) newer succeeded rows that have not failed verification
/// (keep_last and the newest backup, DESIGN §5; counted per format, §14) — a backup that failed verification, or is
/// flagged as an anomaly and not accepted (§15), counts for nothing, so it protects no older one
/// and is not kept as the newest; not read by a
/// pending/running restore or a running verification.
fn eligible(now: &str) -> String {
    format!(
        "b.finished_at < {now} - make_interval(days => p.retention_days)
         AND (r.status = 'deleted' OR b.verify_status = 'failed' OR b.anomaly IS NOT NULL
              OR EXISTS (
                SELECT 1 FROM resource_backups n
                 WHERE n.resource_id = b.resource_id AND n.status = 'succeeded'
                   -- per format: a day's base backup never stands in for the hour's dumps
                   AND n.format = b.format
                   AND n.verify_status IS DISTINCT FROM 'failed' AND n.anomaly IS NULL
                   AND n.finished_at >= b.finished_at
                   AND (n.finished_at, n.id) > (b.finished_at, b.id)
                OFFSET greatest(p.keep_last, 1) - 1 LIMIT 1))
         AND NOT EXISTS (SELECT 1 FROM resource_restores rr
                          WHERE rr.backup_id = b.id AND rr.status IN ('pending', 'running'))
         AND NOT EXISTS (SELECT 1 FROM backup_verifications v
                          WHERE v.backup_id = b.id AND v.status = 'running')"
    )
}

/// Keyset start of phase A: before any backup.
fn epoch() -> DateTime<Utc> {
    Utc.timestamp_opt(0, 0).single().unwrap_or_default()
}

/// Retention as the backups loop runs it: bounded runs, each continuing from where the last one
/// stopped.
#[derive(Debug, Default)]
pub struct Retention {
    pub limits: RetentionLimits,
    pub cursor: RetentionCursor,
}

impl Retention {
    pub fn new(limits: RetentionLimits) -> Self {
        Self {
            limits,
            cursor: RetentionCursor::Start,
        }
    }

    /// One bounded run: phase A then phase B, until both are done (a whole cycle) or the run's
    /// bound is reached. Calls `heartbeat.progress()` after every batch.
    pub async fn run(
        &mut self,
        pool: &PgPool,
        store: &dyn ObjectStore,
        plans: &Plans,
        now: DateTime<Utc>,
        heartbeat: &Heartbeat,
    ) -> Result<RetentionReport, RetentionError> {
        let started = Instant::now();
        let mut report = RetentionReport::default();
        let pol = policies(pool, plans).await?;
        if pol.tiers.is_empty() {
            self.cursor = RetentionCursor::Start;
            return Ok(report);
        }
        let batch = self.limits.batch.max(1);
        let mut statements = 0;
        // A run goes on from the cursor to the end of the cycle (phase B's last team), or stops
        // at its bound; the next run starts where this one stopped.
        loop {
            if statements >= self.limits.max_batches || started.elapsed() >= self.limits.budget {
                report.incomplete = true;
                break;
            }
            statements += 1;
            match self.cursor.clone() {
                RetentionCursor::Start | RetentionCursor::ByAge(..) => {
                    let after = match &self.cursor {
                        RetentionCursor::ByAge(at, id) => (*at, *id),
                        _ => (epoch(), Uuid::nil()),
                    };
                    let cutoff = now - chrono::Duration::days(i64::from(pol.longest));
                    let rows = by_age(pool, &pol, now, cutoff, after, batch).await?;
                    let full = rows.len() >= batch;
                    let last = rows.last().map(|(id, at)| (*at, *id));
                    let ids: Vec<Uuid> = rows.into_iter().map(|(id, _)| id).collect();
                    expire(pool, store, &ids, &mut report).await?;
                    self.cursor = match (full, last) {
                        (true, Some((at, id))) => RetentionCursor::ByAge(at, id),
                        _ => RetentionCursor::ByTeam(None),
                    };
                }
                RetentionCursor::ByTeam(after) => {
                    if pol.shorter.is_empty() {
                        self.cursor = RetentionCursor::Start;
                        break;
                    }
                    let teams: Vec<Uuid> = sqlx::query_scalar(
                        "SELECT id FROM teams
                          WHERE plan_tier = ANY($1) AND ($2::uuid IS NULL OR id > $2)
                          ORDER BY id LIMIT $3",
                    )
                    .bind(&pol.shorter)
                    .bind(after)
                    .bind(TEAMS_PER_CHUNK)
                    .fetch_all(pool)
                    .await?;
                    // The chunk's candidates, a batch at a time, until the chunk has no more
                    // (or a batch expires nothing: another replica is on the same rows).
                    while !teams.is_empty() {
                        let ids = by_team(pool, &pol, now, &teams, batch).await?;
                        let full = ids.len() >= batch;
                        let expired = expire(pool, store, &ids, &mut report).await?;
                        heartbeat.progress();
                        if !full || expired == 0 {
                            break;
                        }
                        if statements >= self.limits.max_batches
                            || started.elapsed() >= self.limits.budget
                        {
                            // Unfinished chunk: the next run starts at its first team again.
                            report.incomplete = true;
                            return Ok(report);
                        }
                        statements += 1;
                    }
                    match teams.last() {
                        Some(&last) if teams.len() as i64 >= TEAMS_PER_CHUNK => {
                            self.cursor = RetentionCursor::ByTeam(Some(last));
                        }
                        // The last chunk: the cycle is complete.
                        _ => {
                            self.cursor = RetentionCursor::Start;
                            heartbeat.progress();
                            break;
                        }
                    }
                }
            }
            heartbeat.progress();
        }
        Ok(report)
    }
}

/// Phase A: the next `batch` eligible rows older than `cutoff`, after the keyset position.
async fn by_age(
    pool: &PgPool,
    pol: &Policies,
    now: DateTime<Utc>,
    cutoff: DateTime<Utc>,
    after: (DateTime<Utc>, Uuid),
    batch: usize,
) -> Result<Vec<(Uuid, DateTime<Utc>)>, sqlx::Error> {
    let sql = format!(
        "WITH p AS (SELECT * FROM unnest($1::text[], $2::int[], $3::int[])
                               AS p(tier, retention_days, keep_last))
         SELECT b.id, b.finished_at
           FROM resource_backups b
           JOIN resources r ON r.id = b.resource_id
           JOIN teams t ON t.id = r.team_id
           JOIN p ON p.tier = t.plan_tier
          WHERE b.status = 'succeeded'
            AND b.finished_at < $5
            AND (b.finished_at, b.id) > ($6, $7)
            AND {}
          ORDER BY b.finished_at, b.id
          LIMIT $8",
        eligible("$4")
    );
    sqlx::query_as(&sql)
        .bind(&pol.tiers)
        .bind(&pol.retention_days)
        .bind(&pol.keep_last)
        .bind(now)
        .bind(cutoff)
        .bind(after.0)
        .bind(after.1)
        .bind(batch as i64)
        .fetch_all(pool)
        .await
}

/// Phase B: up to `batch` eligible rows of the resources of `teams`.
async fn by_team(
    pool: &PgPool,
    pol: &Policies,
    now: DateTime<Utc>,
    teams: &[Uuid],
    batch: usize,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let sql = format!(
        "WITH p AS (SELECT * FROM unnest($1::text[], $2::int[], $3::int[])
                               AS p(tier, retention_days, keep_last))
         SELECT x.id
           FROM teams t
           JOIN p ON p.tier = t.plan_tier
           JOIN resources r ON r.team_id = t.id
           CROSS JOIN LATERAL (
                SELECT b.id FROM resource_backups b
                 WHERE b.resource_id = r.id AND b.status = 'succeeded'
                   AND {}
                 ORDER BY b.finished_at
                 LIMIT $6) x
          WHERE t.id = ANY($5)
          LIMIT $6",
        eligible("$4")
    );
    sqlx::query_scalar(&sql)
        .bind(&pol.tiers)
        .bind(&pol.retention_days)
        .bind(&pol.keep_last)
        .bind(now)
        .bind(teams)
        .bind(batch as i64)
        .fetch_all(pool)
        .await
}

/// Marks the rows expired (one statement; rows a restore or verification started reading since
/// the candidates were chosen stay), then deletes their objects in one batch. Returns the rows
/// expired.
async fn expire(
    pool: &PgPool,
    store: &dyn ObjectStore,
    ids: &[Uuid],
    report: &mut RetentionReport,
) -> Result<u64, RetentionError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let marked: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE resource_backups b SET status = 'expired'
          WHERE b.id = ANY($1) AND b.status = 'succeeded'
            AND NOT EXISTS (SELECT 1 FROM resource_restores rr
                             WHERE rr.backup_id = b.id AND rr.status IN ('pending', 'running'))
            AND NOT EXISTS (SELECT 1 FROM backup_verifications v
                             WHERE v.backup_id = b.id AND v.status = 'running')
         RETURNING b.id, b.object_key",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    if marked.is_empty() {
        return Ok(0);
    }
    report.batches += 1;
    report.expired += marked.len() as u64;
    let keys: Vec<String> = marked.into_iter().map(|(_, k)| k).collect();
    for f in store.delete_many(&keys).await {
        report.delete_failed += 1;
        tracing::error!(object_key = %f.key, error = %f.error,
            "expired backup's object could not be deleted: orphan object (the reconciliation removes it)");
    }
    Ok(keys.len() as u64)
}

/// One complete retention run with default limits and no heartbeat (tools and tests). The backups
/// loop keeps a [`Retention`] so bounded runs continue where they stopped.
pub async fn apply_retention(
    pool: &PgPool,
    store: &dyn ObjectStore,
    plans: &Plans,
    now: DateTime<Utc>,
) -> Result<RetentionReport, RetentionError> {
    Retention::default()
        .run(pool, store, plans, now, &Heartbeat::detached("retention"))
        .await
}

/// Object Lock's retain-until for a backup of `team` finished at `finished_at` (DESIGN §13):
/// finished_at + the tier's backup_retention_days + 1 day, so retention never meets a locked
/// object it is due to delete — except one whose team moved to a longer-keeping tier.
pub async fn retain_until(
    pool: &PgPool,
    plans: &Plans,
    team_id: Uuid,
    finished_at: DateTime<Utc>,
) -> Result<DateTime<Utc>, sqlx::Error> {
    let tier: Option<String> = sqlx::query_scalar("SELECT plan_tier FROM teams WHERE id = $1")
        .bind(team_id)
        .fetch_optional(pool)
        .await?;
    let (days, _) = effective_policy(plans, tier.as_deref().unwrap_or_default());
    Ok(finished_at + chrono::Duration::days(i64::from(days.max(0)) + 1))
}

/// How old an incomplete upload must be before the sweep aborts it: a day, and never less than
/// a backup may run (`BACKUP_TIMEOUT`, up to days) plus an hour, so a live upload is never cut.
pub fn orphan_upload_age(backup_timeout: Duration) -> Duration {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    DAY.max(backup_timeout.saturating_add(Duration::from_secs(3600)))
}

/// How old an unreferenced object must be before the reconciliation removes it.
pub fn orphan_object_age(backup_timeout: Duration) -> Duration {
    backup_timeout.saturating_add(Duration::from_secs(3600))
}

/// The backup id in a key of this worker's shape,
/// `<prefix><uuid>/<uuid>/<YYYYMMDDTHHMMSSZ>-<uuid>.<pgdump|archive|rdb>.gz[.age]`; `None` for
/// any other key (which the reconciliation never touches).
pub fn backup_object_id(prefix: &str, key: &str) -> Option<Uuid> {
    fn uuid(s: &str) -> Option<Uuid> {
        (s.len() == 36).then(|| Uuid::parse_str(s).ok()).flatten()
    }
    let mut parts = key.strip_prefix(prefix)?.split('/');
    let (team, resource, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || uuid(team).is_none() || uuid(resource).is_none() {
        return None;
    }
    let (stamp, rest) = (file.get(..16)?, file.get(16..)?);
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").ok()?;
    let rest = rest.strip_prefix('-')?;
    let (id, tail) = (uuid(rest.get(..36)?)?, rest.get(36..)?);
    let tail = tail.strip_suffix(".age").unwrap_or(tail);
    matches!(tail, ".pgdump.gz" | ".archive.gz" | ".rdb.gz").then_some(id)
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Keys listed under the prefix.
    pub listed: u64,
    /// Backup-shaped keys old enough to be judged.
    pub old_enough: u64,
    /// Orphans removed.
    pub removed: u64,
    /// Orphans whose delete failed (tried again next cycle).
    pub delete_failed: u64,
    /// The listing reached its end: the cycle is complete.
    pub complete: bool,
}

/// Keys listed per page (one ListObjectsV2 request), compared (one query) and deleted (one
/// DeleteObjects request) together.
const RECONCILE_PAGE: usize = 1000;
/// Keys one call of [`Reconciler::run`] walks; the cycle continues at the next call.
pub const RECONCILE_KEYS_PER_RUN: usize = 20_000;

/// DESIGN §5: every object under the prefix is referenced by a running or succeeded row, or is
/// removed. The store is walked in key order a page at a time (bounded memory however many
/// objects it holds); a page's backup-shaped keys older than `min_age` that no `running` or
/// `succeeded` row references by `object_key` (nor a `running` row by the backup id in the key:
/// an attempt in flight), and that are not queued in `pending_object_deletions` (deleted there),
/// are deleted with one `delete_many`. A call walks at most `keys_per_run` keys; the next call
/// continues after the last key seen.
#[derive(Debug)]
pub struct Reconciler {
    pub keys_per_run: usize,
    /// Keys per listing page (at most 1000).
    pub page: usize,
    /// The last key seen; `None`: the cycle starts at the beginning of the prefix.
    pub after: Option<String>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self {
            keys_per_run: RECONCILE_KEYS_PER_RUN,
            page: RECONCILE_PAGE,
            after: None,
        }
    }
}

impl Reconciler {
    /// True while a cycle is under way (the next call continues it).
    pub fn in_progress(&self) -> bool {
        self.after.is_some()
    }

    pub async fn run(
        &mut self,
        pool: &PgPool,
        store: &dyn ObjectStore,
        prefix: &str,
        min_age: Duration,
        now: DateTime<Utc>,
        heartbeat: &Heartbeat,
    ) -> Result<ReconcileReport, RetentionError> {
        let mut report = ReconcileReport::default();
        let cutoff = chrono::Duration::from_std(min_age)
            .ok()
            .and_then(|d| now.checked_sub_signed(d));
        while (report.listed as usize) < self.keys_per_run.max(1) {
            let (page, more) = store
                .list_page(
                    prefix,
                    self.after.as_deref(),
                    self.page.clamp(1, RECONCILE_PAGE),
                )
                .await?;
            report.listed += page.len() as u64;
            if let Some(last) = page.last() {
                self.after = Some(last.key.clone());
            }
            let candidates: Vec<(String, Uuid)> = page
                .into_iter()
                .filter(|o| cutoff.is_some_and(|c| o.last_modified.is_some_and(|t| t < c)))
                .filter_map(|o| backup_object_id(prefix, &o.key).map(|id| (o.key, id)))
                .collect();
            report.old_enough += candidates.len() as u64;
            remove_orphans(pool, store, candidates, &mut report).await?;
            heartbeat.progress();
            if !more {
                self.after = None;
                report.complete = true;
                break;
            }
        }
        Ok(report)
    }
}

async fn remove_orphans(
    pool: &PgPool,
    store: &dyn ObjectStore,
    candidates: Vec<(String, Uuid)>,
    report: &mut ReconcileReport,
) -> Result<(), RetentionError> {
    if candidates.is_empty() {
        return Ok(());
    }
    let (keys, ids): (Vec<String>, Vec<Uuid>) = candidates.into_iter().unzip();
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT c.k FROM unnest($1::text[], $2::uuid[]) AS c(k, id)
          WHERE NOT EXISTS (SELECT 1 FROM resource_backups b
                             WHERE b.object_key = c.k AND b.object_key IS NOT NULL
                               AND b.status IN ('running', 'succeeded'))
            AND NOT EXISTS (SELECT 1 FROM resource_backups b
                             WHERE b.id = c.id AND b.status = 'running')
            AND NOT EXISTS (SELECT 1 FROM pending_object_deletions d WHERE d.object_key = c.k)",
    )
    .bind(&keys)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    if orphans.is_empty() {
        return Ok(());
    }
    let failed = store.delete_many(&orphans).await;
    for f in &failed {
        tracing::warn!(object_key = %f.key, error = %f.error,
            "removing an orphaned backup object failed; tried again next cycle");
    }
    report.delete_failed += failed.len() as u64;
    report.removed += (orphans.len() - failed.len()) as u64;
    for key in &orphans {
        if !failed.iter().any(|f| &f.key == key) {
            tracing::info!(object_key = %key, "removed an orphaned backup object");
        }
    }
    Ok(())
}

/// One whole reconciliation cycle (tools and tests); the backups loop keeps a [`Reconciler`] so a
/// cycle over millions of keys is spread over passes.
pub async fn reconcile_orphans(
    pool: &PgPool,
    store: &dyn ObjectStore,
    prefix: &str,
    min_age: Duration,
    now: DateTime<Utc>,
    heartbeat: &Heartbeat,
) -> Result<ReconcileReport, RetentionError> {
    let mut r = Reconciler {
        keys_per_run: usize::MAX,
        ..Reconciler::default()
    };
    r.run(pool, store, prefix, min_age, now, heartbeat).await
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
    .bind(RETENTION_BATCH as i64)
    .fetch_all(pool)
    .await?;
    if keys.is_empty() {
        return Ok(0);
    }
    let failed = store.delete_many(&keys).await;
    for f in &failed {
        tracing::warn!(object_key = %f.key, error = %f.error, "deleting a requested object failed; retried");
    }
    let done: Vec<String> = keys
        .into_iter()
        .filter(|k| !failed.iter().any(|f| &f.key == k))
        .collect();
    let deleted = sqlx::query("DELETE FROM pending_object_deletions WHERE object_key = ANY($1)")
        .bind(&done)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphan_uploads_wait_at_least_a_day_and_longer_than_a_backup_may_run() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(orphan_upload_age(h(6)), h(24), "default BACKUP_TIMEOUT");
        assert_eq!(orphan_upload_age(h(23)), h(24));
        assert_eq!(orphan_upload_age(h(24)), h(25));
        assert_eq!(
            orphan_upload_age(h(7 * 24)),
            h(7 * 24 + 1),
            "a 7-day timeout"
        );
        assert_eq!(orphan_upload_age(Duration::MAX), Duration::MAX);
    }

    #[test]
    fn only_this_workers_backup_keys_are_orphan_candidates() {
        let t = "11111111-1111-1111-1111-111111111111";
        let r = "22222222-2222-2222-2222-222222222222";
        let b = "33333333-3333-3333-3333-333333333333";
        let id = Uuid::parse_str(b).unwrap();
        let key = |p: &str, tail: &str| format!("{p}{t}/{r}/20261122T030405Z-{b}{tail}");
        for tail in [".pgdump.gz", ".archive.gz", ".rdb.gz", ".pgdump.gz.age"] {
            assert_eq!(backup_object_id("p/", &key("p/", tail)), Some(id), "{tail}");
            assert_eq!(backup_object_id("", &key("", tail)), Some(id), "{tail}");
        }
        for bad in [
            key("q/", ".pgdump.gz"),                               // another prefix
            key("p/", ".pgdump.gz.meta.json"),                     // a sidecar
            key("p/", ".sql.gz"),                                  // not our extension
            key("p/", ".pgdump"),                                  // not gzip
            format!("p/{t}/{r}/2026-11-22T030405Z-{b}.pgdump.gz"), // not our stamp
            format!("p/{t}/{r}/x/20261122T030405Z-{b}.pgdump.gz"), // too deep
            format!("p/{t}/20261122T030405Z-{b}.pgdump.gz"),       // too shallow
            format!("p/team/{r}/20261122T030405Z-{b}.pgdump.gz"),  // not a uuid
            format!("p/{t}/{r}/20261122T030405Z-{}.pgdump.gz", id.simple()), // not hyphenated
            "p/notes.txt".to_owned(),
        ] {
            assert_eq!(backup_object_id("p/", &bad), None, "{bad}");
        }
    }

    #[test]
    fn a_retention_zero_tier_ages_out_on_the_default_plan() {
        let plans = Plans::load(None).unwrap();
        let d = plans.default_plan();
        let default = (d.backup_retention_days as i32, d.backup_keep_last as i32);
        assert_eq!(effective_policy(&plans, "free"), default);
        assert_eq!(effective_policy(&plans, "free_yearly"), default);
        assert_eq!(effective_policy(&plans, "no_such_tier"), default);
        assert_eq!(effective_policy(&plans, "pro"), (30, 3));
    }
}
