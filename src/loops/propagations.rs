//! Propagations (DESIGN §7): apply plan-tier changes to live resources through the provisioner.
//! A row is processed inside a transaction that holds its row lock (`FOR UPDATE SKIP LOCKED`),
//! so two workers never process one row at once and a dead worker's row is simply due again.
//! Outcomes follow the contract: allowed skips are success, anything else is retried on the
//! backoff schedule and dead-lettered at the 10th failed attempt — unknown kinds included.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::db::audit;
use crate::metrics::{kind_label, skip_reason_label, Metrics, UNKNOWN_KIND};
use crate::plans::{Plans, TierMatch};
use crate::provisioner::{Provisioner, RegradeResourceRequest};

/// Skip reasons that mean "nothing to do": success.
pub const ALLOWED_SKIPS: &[&str] = &["already_at_tier", "resource_deleted", "not_regradable"];
/// Backoff after failed attempt n (1-based); later attempts clamp to the last entry.
pub const BACKOFF_MINUTES: [i64; 9] = [1, 5, 15, 30, 60, 120, 240, 480, 480];
/// The 10th failed attempt dead-letters the row.
pub const MAX_ATTEMPTS: i32 = 10;
/// Rows processed per pass at most (the rest wait for the next pass).
const BATCH: usize = 100;

pub fn backoff(failed_attempts: i32) -> Duration {
    let idx = (failed_attempts.max(1) - 1) as usize;
    let minutes = BACKOFF_MINUTES[idx.min(BACKOFF_MINUTES.len() - 1)];
    Duration::from_secs(minutes as u64 * 60)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Propagation {
    pub id: Uuid,
    pub kind: String,
    pub team_id: Uuid,
    pub resource_id: Option<Uuid>,
    pub target_tier: String,
    pub attempts: i32,
}

/// What a handler concluded for a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The provisioner skipped with a reason that is not success.
    UnexpectedSkip {
        resource_type: String,
        skip_reason: String,
    },
    Error(String),
}

#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, pool: &PgPool, row: &Propagation) -> Outcome;
}

/// Regrades every active resource of the team (or just `resource_id`) to the target tier.
pub struct Regrade {
    provisioner: Arc<dyn Provisioner>,
    plans: Arc<Plans>,
    metrics: Metrics,
}

#[async_trait]
impl Handler for Regrade {
    async fn handle(&self, pool: &PgPool, row: &Propagation) -> Outcome {
        let resources: Vec<(Uuid, String)> = match sqlx::query_as(
            "SELECT id, resource_type FROM resources
              WHERE team_id = $1 AND status = 'active' AND ($2::uuid IS NULL OR id = $2)
              ORDER BY id",
        )
        .bind(row.team_id)
        .bind(row.resource_id)
        .fetch_all(pool)
        .await
        {
            Ok(r) => r,
            Err(e) => return Outcome::Error(format!("listing resources: {e}")),
        };
        let (plan, how) = self.plans.resolve(&row.target_tier);
        if how == TierMatch::Default {
            tracing::warn!(tier = %row.target_tier, "target tier not in plans.yaml: using the default limits");
            self.metrics.unknown_tier.inc();
        }
        let limits = plan.limits.as_map();
        // Every resource is attempted; any failure retries the whole row (regrades are idempotent).
        let mut first_problem = None;
        for (resource_id, resource_type) in resources {
            let request = RegradeResourceRequest {
                resource_id: resource_id.to_string(),
                resource_type: resource_type.clone(),
                team_id: row.team_id.to_string(),
                tier: row.target_tier.clone(),
                limits: limits.clone(),
                idempotency_key: row.id.to_string(),
            };
            let outcome = match self.provisioner.regrade(request).await {
                Ok(r) if r.applied || ALLOWED_SKIPS.contains(&r.skip_reason.as_str()) => continue,
                Ok(r) => Outcome::UnexpectedSkip {
                    resource_type,
                    skip_reason: r.skip_reason,
                },
                Err(e) => Outcome::Error(format!("resource {resource_id}: {e}")),
            };
            first_problem.get_or_insert(outcome);
        }
        first_problem.unwrap_or(Outcome::Applied)
    }
}

pub struct Propagations {
    pool: PgPool,
    metrics: Metrics,
    /// `None` when PROVISIONER_ADDR is unset: rows wait, and only the gauge is kept fresh.
    handlers: Option<HashMap<&'static str, Arc<dyn Handler>>>,
}

impl Propagations {
    pub fn new(
        pool: PgPool,
        plans: Arc<Plans>,
        metrics: Metrics,
        provisioner: Option<Arc<dyn Provisioner>>,
    ) -> Arc<Self> {
        let handlers = provisioner.map(|p| {
            let regrade: Arc<dyn Handler> = Arc::new(Regrade {
                provisioner: p,
                plans,
                metrics: metrics.clone(),
            });
            HashMap::from([
                ("tier_elevation", regrade.clone()),
                ("tier_demotion", regrade),
            ])
        });
        if handlers.is_none() {
            tracing::info!("PROVISIONER_ADDR is not set: expected unless plan-tier propagations are used; the propagations loop idles and any pending_propagations rows wait (backup_worker_propagations_waiting)");
        }
        Arc::new(Self {
            pool,
            metrics,
            handlers,
        })
    }

    /// Kinds with a handler (empty without a provisioner).
    pub fn handled_kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<_> = self
            .handlers
            .iter()
            .flat_map(|h| h.keys().copied())
            .collect();
        k.sort_unstable();
        k
    }

    async fn refresh_waiting(&self) -> Result<(), sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pending_propagations
              WHERE applied_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()",
        )
        .fetch_one(&self.pool)
        .await?;
        self.metrics.propagations_waiting.set(n);
        Ok(())
    }

    /// Processes one due row, holding its lock for the whole attempt. False when none is due.
    pub async fn process_one(&self) -> Result<bool, sqlx::Error> {
        let Some(handlers) = &self.handlers else {
            return Ok(false);
        };
        let mut tx = self.pool.begin().await?;
        let row: Option<Propagation> = sqlx::query_as(
            "SELECT id, kind::text AS kind, team_id, resource_id, target_tier, attempts
               FROM pending_propagations
              WHERE applied_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
              ORDER BY next_attempt_at
              LIMIT 1
              FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        let kind = kind_label(&row.kind);
        match handlers.get(row.kind.as_str()) {
            None => self.unknown_kind(&mut tx, &row).await?,
            Some(handler) => match handler.handle(&self.pool, &row).await {
                Outcome::Applied => {
                    sqlx::query(
                        "UPDATE pending_propagations SET applied_at = now(), attempts = attempts + 1,
                                last_error = NULL WHERE id = $1",
                    )
                    .bind(row.id)
                    .execute(&mut *tx)
                    .await?;
                    audit(
                        &mut *tx,
                        "propagation.applied",
                        Some(row.team_id),
                        row.resource_id,
                        Some(row.id),
                        json!({ "kind": row.kind, "target_tier": row.target_tier }),
                    )
                    .await?;
                    self.metrics
                        .propagation_applied
                        .with_label_values(&[kind])
                        .inc();
                    tracing::info!(propagation_id = %row.id, kind = %row.kind, tier = %row.target_tier, "propagation applied");
                }
                Outcome::UnexpectedSkip {
                    resource_type,
                    skip_reason,
                } => {
                    let bucket = skip_reason_label(&skip_reason);
                    self.metrics
                        .propagation_unexpected_skip
                        .with_label_values(&[kind, resource_label(&resource_type), bucket])
                        .inc();
                    audit(&mut *tx, "propagation.unexpected_skip", Some(row.team_id), row.resource_id, Some(row.id),
                        json!({ "kind": row.kind, "resource_type": resource_type, "skip_reason": skip_reason })).await?;
                    let msg = format!("unexpected skip: {skip_reason}");
                    self.fail_attempt(
                        &mut tx,
                        &row,
                        &msg,
                        "max_attempts",
                        "propagation.dead_lettered",
                    )
                    .await?;
                }
                Outcome::Error(msg) => {
                    audit(
                        &mut *tx,
                        "propagation.retrying",
                        Some(row.team_id),
                        row.resource_id,
                        Some(row.id),
                        json!({ "kind": row.kind, "error": msg, "attempt": row.attempts + 1 }),
                    )
                    .await?;
                    self.fail_attempt(
                        &mut tx,
                        &row,
                        &msg,
                        "max_attempts",
                        "propagation.dead_lettered",
                    )
                    .await?;
                }
            },
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A kind this worker has no handler for: retried on the same schedule, dead-lettered at the
    /// same ceiling — never skipped silently, never retried forever.
    async fn unknown_kind(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        row: &Propagation,
    ) -> Result<(), sqlx::Error> {
        self.metrics
            .propagation_unknown_kind
            .with_label_values(&[UNKNOWN_KIND])
            .inc();
        tracing::warn!(propagation_id = %row.id, kind = %row.kind, "no handler for this propagation kind");
        let msg = format!("no handler for kind {:?}", row.kind);
        self.fail_attempt(
            tx,
            row,
            &msg,
            "unknown_kind",
            "propagation.unknown_kind_dead_lettered",
        )
        .await
    }

    /// attempts+1; dead-letter at MAX_ATTEMPTS, else schedule the next attempt.
    async fn fail_attempt(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        row: &Propagation,
        error: &str,
        dead_reason: &'static str,
        dead_audit: &str,
    ) -> Result<(), sqlx::Error> {
        let attempts = row.attempts + 1;
        let error: String = crate::secret::redact_credentials(error)
            .chars()
            .take(2000)
            .collect();
        if attempts >= MAX_ATTEMPTS {
            sqlx::query(
                "UPDATE pending_propagations SET attempts = $2, failed_at = now(), last_error = $3 WHERE id = $1",
            )
            .bind(row.id)
            .bind(attempts)
            .bind(&error)
            .execute(&mut **tx)
            .await?;
            audit(
                &mut **tx,
                dead_audit,
                Some(row.team_id),
                row.resource_id,
                Some(row.id),
                json!({ "kind": row.kind, "attempts": attempts, "last_error": error }),
            )
            .await?;
            self.metrics
                .propagation_dead_lettered
                .with_label_values(&[dead_reason, kind_label(&row.kind)])
                .inc();
            tracing::error!(propagation_id = %row.id, kind = %row.kind, attempts, "propagation dead-lettered");
        } else {
            let delay = backoff(attempts);
            sqlx::query(
                "UPDATE pending_propagations
                    SET attempts = $2, last_error = $3, next_attempt_at = now() + make_interval(secs => $4)
                  WHERE id = $1",
            )
            .bind(row.id)
            .bind(attempts)
            .bind(&error)
            .bind(delay.as_secs_f64())
            .execute(&mut **tx)
            .await?;
            tracing::warn!(propagation_id = %row.id, kind = %row.kind, attempts, retry_in_s = delay.as_secs(),
                error = %error, "propagation attempt failed; retrying");
        }
        Ok(())
    }
}

fn resource_label(resource_type: &str) -> &'static str {
    crate::domain::ResourceType::parse(resource_type)
        .map_or("other", crate::domain::ResourceType::as_str)
}

#[async_trait]
impl Loop for Arc<Propagations> {
    fn name(&self) -> LoopName {
        LoopName::Propagations
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        for _ in 0..BATCH {
            if ctx.shutdown.is_cancelled() || !self.process_one().await? {
                break;
            }
            ctx.heartbeat.progress();
        }
        self.refresh_waiting().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule_and_clamp() {
        let minutes: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs() / 60).collect();
        assert_eq!(
            minutes,
            [1, 5, 15, 30, 60, 120, 240, 480, 480, 480, 480, 480]
        );
    }
}
