//! Scheduler (DESIGN §4): every tick, one atomic `INSERT … SELECT … WHERE NOT EXISTS` enqueues a
//! `scheduled` backup for each active resource of a supported type whose team's plan is due.
//!
//! Idempotent under any number of replicas: the tick runs under a transaction-scoped advisory
//! *try*-lock (a replica that finds another ticking skips, never waits), and the partial unique
//! index on pending scheduled rows turns any residual race into `ON CONFLICT DO NOTHING`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::domain::{ResourceType, SUPPORTED_RESOURCE_TYPES};
use crate::metrics::Metrics;
use crate::plans::{PlanArrays, Plans, TierMatch};
use sqlx::postgres::PgArguments;
use sqlx::Arguments;

/// Key of the transaction-scoped advisory lock every replica's tick tries to take.
const TICK_LOCK_KEY: i64 = 0x6261_636b_7570_7363; // "backupsc"
/// RPOs of a day or more back up in the team's slot hour, not whenever the window opens.
const DAILY_RPO_MINUTES: u32 = 1440;
/// The tick's clock in SQL. In production $7 is NULL and the database's `now()` (the tick
/// transaction's start) is the only clock: row timestamps (`created_at`, `run_after`), the "due"
/// window, the slot hour and the RPO gauge never depend on a worker's clock, which may be skewed
/// between replicas. Tests and benchmarks pass an explicit time to visit every hour of the day.
const CLOCK: &str = "coalesce($7::timestamptz, now())";

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler query failed: {0}")]
    Db(#[from] sqlx::Error),
}

/// The daily slot of a team: sha256 of the id's 16 bytes, first 4 bytes big-endian, mod 24.
/// Mirrors the SQL function `backup_slot_hour` (migrations/…_scheduler.sql).
pub fn slot_hour(team_id: Uuid) -> u32 {
    let h = Sha256::digest(team_id.as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 24
}

/// Whether a resource of `resource_type` on `tier` may ever get a scheduled backup.
pub fn schedulable(plans: &Plans, tier: &str, resource_type: &str) -> bool {
    ResourceType::parse(resource_type).is_some() && plans.resolve(tier).0.backs_up()
}

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Another replica held the tick lock: this one did nothing.
    pub skipped_locked: bool,
    /// Rows enqueued, by resource type.
    pub enqueued: BTreeMap<String, u64>,
    /// Tiers of active teams missing from plans.yaml (the default plan applied).
    pub unknown_tiers: Vec<String>,
    /// Rows the SQL produced that the plan check in Rust refused (and removed): a bug guard.
    pub vetoed: u64,
    /// Base backups enqueued for PITR resources (DESIGN §14).
    pub base_backups: u64,
}

impl TickReport {
    pub fn total(&self) -> u64 {
        self.enqueued.values().sum()
    }
}

/// Shared plan CTE: $1 tiers, $2 rpo_minutes, $3 retention_days, $4/$5 the default plan,
/// $6 the supported types, $8 the tier filter (see [`tier_filter`]). Only resources whose plan
/// backs up are candidates. The filter is a plain list on `plan_tier` rather than a test on the
/// joined plan values, so the planner's row estimates (from the column's statistics) stay right
/// and it picks hash joins.
fn candidates_cte(table: &PlanArrays) -> String {
    let filter = if table.default.backs_up() {
        "t.plan_tier <> ALL($8::text[])" // $8: listed tiers that never back up
    } else {
        "t.plan_tier = ANY($8::text[])" // $8: listed tiers that back up
    };
    format!(
        "
    plan AS (
        SELECT * FROM unnest($1::text[], $2::int[], $3::int[]) AS p(tier, rpo_minutes, retention_days)
    ),
    candidates AS (
        SELECT r.id AS resource_id, r.team_id, r.created_at,
               COALESCE(p.rpo_minutes, $4) AS rpo_minutes,
               COALESCE(p.retention_days, $5) AS retention_days
          FROM resources r
          JOIN teams t ON t.id = r.team_id
          LEFT JOIN plan p ON p.tier = t.plan_tier
         WHERE r.status = 'active'
           AND r.resource_type = ANY($6::text[])
           AND {filter}
    )"
    )
}

/// The tiers `candidates_cte` lists in $8: those that never back up when the default plan does
/// (unknown tiers then back up), else those that do (unknown tiers then never do).
fn tier_filter(table: &PlanArrays) -> Vec<String> {
    let backs_up = |i: usize| table.rpo_minutes[i] > 0 && table.retention_days[i] > 0;
    let want = !table.default.backs_up();
    (0..table.tiers.len())
        .filter(|&i| backs_up(i) == want)
        .map(|i| table.tiers[i].clone())
        .collect()
}

/// The parameters of [`candidates_cte`] ($1–$6, $8) and the tick's time ($7; `None`: the
/// database's now(), see [`CLOCK`]), shared by every statement built on it.
fn plan_args(table: &PlanArrays, now: Option<DateTime<Utc>>) -> Result<PgArguments, sqlx::Error> {
    let mut args = PgArguments::default();
    let add = |r: Result<(), sqlx::error::BoxDynError>| r.map_err(sqlx::Error::Encode);
    add(args.add(&table.tiers))?;
    add(args.add(&table.rpo_minutes))?;
    add(args.add(&table.retention_days))?;
    add(args.add(table.default.rpo_minutes as i32))?;
    add(args.add(table.default.backup_retention_days as i32))?;
    add(args.add(SUPPORTED_RESOURCE_TYPES))?;
    add(args.add(now))?;
    add(args.add(tier_filter(table)))?;
    Ok(args)
}

/// The tick statement: the plan CTE's parameters, [`CLOCK`] the tick's time.
fn tick_sql(table: &PlanArrays) -> String {
    let candidates = candidates_cte(table);
    format!(
            "WITH {candidates},
            due AS (
                SELECT c.resource_id
                  FROM candidates c
                  LEFT JOIN resource_backup_marks m ON m.resource_id = c.resource_id
                 -- no backup of any status created within rpo − 10 minutes
                 WHERE (m.last_created_at IS NULL
                        OR m.last_created_at <= {CLOCK} - make_interval(mins => c.rpo_minutes - 10))
                   AND (c.rpo_minutes < {DAILY_RPO_MINUTES}
                        OR backup_slot_hour(c.team_id) = extract(hour FROM {CLOCK} AT TIME ZONE 'UTC')::int
                        -- catch-up: newest succeeded backup older than rpo + 60 (or none at all)
                        OR m.last_succeeded_at IS NULL
                        OR m.last_succeeded_at <= {CLOCK} - make_interval(mins => c.rpo_minutes + 60))
                   -- nothing already queued or running for it
                   AND NOT EXISTS (
                        SELECT 1 FROM resource_backups b
                         WHERE b.resource_id = c.resource_id AND b.format = 'logical'
                           AND b.status IN ('pending', 'running'))
            ),
            inserted AS (
                INSERT INTO resource_backups (resource_id, kind, status, run_after, created_at)
                SELECT resource_id, 'scheduled', 'pending', {CLOCK}, {CLOCK} FROM due
                ON CONFLICT (resource_id, format) WHERE status = 'pending' AND kind = 'scheduled' DO NOTHING
                RETURNING id, resource_id
            )
            SELECT i.id, r.resource_type, t.plan_tier
              FROM inserted i
              JOIN resources r ON r.id = i.resource_id
              JOIN teams t ON t.id = r.team_id"
        )
}

pub struct Scheduler {
    pool: PgPool,
    plans: Arc<Plans>,
    metrics: Metrics,
    interval: Duration,
}

impl Scheduler {
    pub fn new(pool: PgPool, plans: Arc<Plans>, metrics: Metrics, interval: Duration) -> Self {
        Self {
            pool,
            plans,
            metrics,
            interval,
        }
    }

    /// One tick at `now` (a parameter, so tests can visit every hour of the day).
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<TickReport, SchedulerError> {
        self.tick_at(Some(now)).await
    }

    /// One tick on the database's clock (what the daemon runs).
    pub async fn tick_now(&self) -> Result<TickReport, SchedulerError> {
        self.tick_at(None).await
    }

    async fn tick_at(&self, now: Option<DateTime<Utc>>) -> Result<TickReport, SchedulerError> {
        let table = self.plans.sql_arrays();
        let mut report = TickReport::default();
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(TICK_LOCK_KEY)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            report.skipped_locked = true;
            tx.rollback().await?;
            return Ok(report);
        }

        let sql = tick_sql(&table);
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as_with(&sql, plan_args(&table, now)?)
            .fetch_all(&mut *tx)
            .await?;

        // Defence in depth: a row the plans say must never exist (free tier, retention 0,
        // unsupported type) is removed before commit, whatever the SQL let through.
        let mut vetoed = Vec::new();
        for (id, resource_type, tier) in &rows {
            if schedulable(&self.plans, tier, resource_type) {
                *report.enqueued.entry(resource_type.clone()).or_default() += 1;
            } else {
                tracing::error!(backup_id = %id, %tier, %resource_type,
                    "scheduler produced a row its plan forbids; removing it");
                vetoed.push(*id);
            }
        }
        if !vetoed.is_empty() {
            sqlx::query("DELETE FROM resource_backups WHERE id = ANY($1)")
                .bind(&vetoed)
                .execute(&mut *tx)
                .await?;
            report.vetoed = vetoed.len() as u64;
        }

        report.base_backups = crate::pitr::enqueue_base_backups(&mut tx, &self.plans).await?;

        report.unknown_tiers = sqlx::query_scalar(
            "SELECT DISTINCT t.plan_tier FROM teams t
              WHERE t.plan_tier <> ALL($1::text[])
                AND EXISTS (SELECT 1 FROM resources r
                             WHERE r.team_id = t.id AND r.status = 'active'
                               AND r.resource_type = ANY($2::text[]))
              ORDER BY 1",
        )
        .bind(&table.tiers)
        .bind(SUPPORTED_RESOURCE_TYPES)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        for (resource_type, n) in &report.enqueued {
            self.metrics
                .backup_scheduled
                .with_label_values(&[resource_type])
                .inc_by(*n);
        }
        for tier in &report.unknown_tiers {
            debug_assert_eq!(self.plans.resolve(tier).1, TierMatch::Default);
            tracing::warn!(%tier, "plan tier not in plans.yaml: using the default plan");
            self.metrics.unknown_tier.inc();
        }
        Ok(report)
    }

    /// `EXPLAIN (ANALYZE, BUFFERS)` of the tick statement at `now`, executed in a transaction that
    /// is rolled back (for benchmarks and operators checking index use).
    pub async fn explain_tick(&self, now: DateTime<Utc>) -> Result<String, SchedulerError> {
        let table = self.plans.sql_arrays();
        let mut tx = self.pool.begin().await?;
        let lines: Vec<String> = sqlx::query_scalar_with(
            &format!("EXPLAIN (ANALYZE, BUFFERS) {}", tick_sql(&table)),
            plan_args(&table, Some(now))?,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        Ok(lines.join("\n"))
    }

    /// Active backed-up resources whose newest succeeded backup is older than RPO + 60 minutes
    /// (resources younger than that are not yet counted). Sets that gauge and the count of
    /// backed-up resources in one query; returns the breached count.
    pub async fn refresh_rpo_breached(&self, now: DateTime<Utc>) -> Result<i64, SchedulerError> {
        self.refresh_rpo_breached_at(Some(now)).await
    }

    /// [`Self::refresh_rpo_breached`] on the database's clock (what the daemon runs).
    pub async fn refresh_rpo_breached_now(&self) -> Result<i64, SchedulerError> {
        self.refresh_rpo_breached_at(None).await
    }

    async fn refresh_rpo_breached_at(
        &self,
        now: Option<DateTime<Utc>>,
    ) -> Result<i64, SchedulerError> {
        let table = self.plans.sql_arrays();
        let candidates = candidates_cte(&table);
        let sql = format!(
            "WITH {candidates}
            SELECT count(*) FILTER (
                       WHERE c.created_at < {CLOCK} - make_interval(mins => c.rpo_minutes + 60)
                         AND (m.last_succeeded_at IS NULL
                              OR m.last_succeeded_at <= {CLOCK} - make_interval(mins => c.rpo_minutes + 60))),
                   count(*)
              FROM candidates c
              LEFT JOIN resource_backup_marks m ON m.resource_id = c.resource_id"
        );
        let (n, backed_up): (i64, i64) = sqlx::query_as_with(&sql, plan_args(&table, now)?)
            .fetch_one(&self.pool)
            .await?;
        self.metrics.backed_up_resources.set(backed_up);
        self.metrics.backup_rpo_breached.set(n);
        Ok(n)
    }
}

#[async_trait]
impl Loop for Scheduler {
    fn name(&self) -> LoopName {
        LoopName::Scheduler
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn pass(&self, _ctx: &PassContext) -> Result<(), LoopError> {
        let report = self.tick_now().await?;
        if report.skipped_locked {
            tracing::debug!("another replica is ticking; skipped");
        } else if report.total() > 0 || report.vetoed > 0 || report.base_backups > 0 {
            tracing::info!(enqueued = report.total(), by_type = ?report.enqueued,
                base_backups = report.base_backups, vetoed = report.vetoed, "scheduled backups enqueued");
        }
        self.refresh_rpo_breached_now().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulable_follows_the_plan_and_the_type_list() {
        let plans = Plans::load(None).unwrap();
        assert!(schedulable(&plans, "pro", "postgres"));
        assert!(schedulable(&plans, "hobby_yearly", "redis"));
        assert!(
            schedulable(&plans, "mystery", "mongodb"),
            "unknown tiers take the default plan"
        );
        assert!(!schedulable(&plans, "free", "postgres"));
        assert!(!schedulable(&plans, "anonymous", "vector"));
        assert!(!schedulable(&plans, "pro", "mysql"));
    }

    #[test]
    fn slot_hour_is_pinned() {
        // Changing the hash moves every team's backup slot: this must fail loudly.
        let team = Uuid::parse_str("7d0e6a52-3f1c-4e8a-9b2d-5c6f7a8b9c0d").unwrap();
        assert_eq!(slot_hour(team), SLOT_OF_PINNED_TEAM);
        assert_eq!(slot_hour(Uuid::nil()), SLOT_OF_NIL);
    }

    const SLOT_OF_PINNED_TEAM: u32 = 18;
    const SLOT_OF_NIL: u32 = 23;
}
