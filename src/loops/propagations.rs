//! Propagations (DESIGN §7): apply plan-tier changes to live resources through the provisioner.
//!
//! **Claim = a committed lease.** One short UPDATE (`… WHERE id = (SELECT … FOR UPDATE SKIP
//! LOCKED)`) sets `leased_by`, `lease_expires_at`, a fresh `lease_token` and `attempts + 1`, and
//! commits before any provisioner call: no transaction and no row lock is open while the
//! provisioner works. Every later write (renewal, result, release) is fenced on `lease_token` and
//! `attempts`, so a worker whose lease ran out and was taken over writes nothing. An expired lease
//! (a killed pod) is cleared at the start of every pass and the row is due again at once; the lost
//! attempt counts, so a row that kills its worker still reaches the dead letter.
//!
//! **One team at a time.** A partial unique index allows one leased row per team: two replicas
//! never regrade one team at once. The claim skips teams that have a leased row; two claimers
//! racing for two rows of one team end in a unique violation for the second, which claims again.
//!
//! **Newest row wins.** Rows are ordered by `(created_at, id)` (the id breaks ties between rows
//! of one API transaction, identically on every replica). A row *covers* a resource when it names
//! it or names the whole team (`resource_id` NULL). An open row is **superseded** (never sent to
//! the provisioner, `failed_at` set, `last_error = 'superseded by <newest>'`, audit
//! `propagation.superseded`) when a newer row covers its whole target: the same `resource_id`
//! (NULL counting as a value) or, for a one-resource row, a newer whole-team row. A whole-team row
//! with a newer one-resource row for resource X is not superseded (the newer row says nothing
//! about the team's other resources) but it never regrades X: before every call the worker checks
//! that no newer row covers the resource, so an older tier can never land after a newer one.
//!
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
use crate::health::Heartbeat;
use crate::metrics::{kind_label, skip_reason_label, Metrics, UNKNOWN_KIND};
use crate::plans::{Plans, TierMatch};
use crate::provisioner::{Provisioner, RegradeResourceRequest, CALL_DEADLINE};

/// Skip reasons that mean "nothing to do": success.
pub const ALLOWED_SKIPS: &[&str] = &["already_at_tier", "resource_deleted", "not_regradable"];
/// Backoff after failed attempt n (1-based); later attempts clamp to the last entry.
pub const BACKOFF_MINUTES: [i64; 9] = [1, 5, 15, 30, 60, 120, 240, 480, 480];
/// The 10th failed attempt dead-letters the row.
pub const MAX_ATTEMPTS: i32 = 10;
/// Rows processed per pass at most (the rest wait for the next pass).
const BATCH: usize = 100;
/// Claims that lose a race for a team (unique violation) are retried this often per row.
const CLAIM_RETRIES: usize = 5;
/// Rows superseded or recovered per statement (the rest in the next pass).
const SWEEP_LIMIT: i64 = 1000;

pub fn backoff(failed_attempts: i32) -> Duration {
    let idx = (failed_attempts.max(1) - 1) as usize;
    let minutes = BACKOFF_MINUTES[idx.min(BACKOFF_MINUTES.len() - 1)];
    Duration::from_secs(minutes as u64 * 60)
}

/// `n` is a newer row than `p` that covers `p`'s whole target (SQL, used in every query that asks
/// "is this row superseded?").
const NEWER_COVERING: &str = "n.team_id = p.team_id
    AND (n.resource_id IS NULL OR n.resource_id = p.resource_id)
    AND (n.created_at, n.id) > (p.created_at, p.id)";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Propagation {
    pub id: Uuid,
    pub kind: String,
    pub team_id: Uuid,
    pub resource_id: Option<Uuid>,
    pub target_tier: String,
    /// This attempt's number (counted at the claim).
    pub attempts: i32,
}

/// A claim: every write about the row is fenced on `token` and `attempts`.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: Uuid,
    pub token: Uuid,
    pub attempts: i32,
}

/// How this worker claims rows.
#[derive(Debug, Clone)]
pub struct PropagationOptions {
    /// Written to `leased_by` (the pod name); fencing uses a per-claim token, not this.
    pub worker_id: String,
    /// `LEASE_SECONDS`: the slack a claim has beyond the call in progress.
    pub lease: Duration,
    /// The most one provisioner call may take (the gRPC deadline; enforced here too).
    pub call_deadline: Duration,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        Self {
            worker_id: gethostname::gethostname().to_string_lossy().into_owned(),
            lease: Duration::from_secs(60),
            call_deadline: CALL_DEADLINE,
        }
    }
}

impl PropagationOptions {
    /// The lease set at the claim and at every renewal.
    ///
    /// Why renew per call instead of sizing one lease for N × the call deadline: the worker
    /// renews right before each provisioner call (one fenced UPDATE, which also tells it whether
    /// it still holds the row), and each call is cut at `call_deadline`, so `lease + call_deadline`
    /// always covers the call in flight plus the bookkeeping around it. A team with 200 resources
    /// needs no 100-minute lease, and a killed pod's row is claimable again within
    /// `LEASE_SECONDS` + 30 s whatever the team's size.
    fn lease_seconds(&self) -> f64 {
        (self.lease + self.call_deadline).as_secs_f64()
    }
}

/// What a handler concluded for a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every resource regraded or skipped for an allowed reason, except those a newer row covers
    /// (never sent: `left_to_newer`).
    Applied {
        left_to_newer: Vec<Uuid>,
    },
    /// The provisioner skipped with a reason that is not success.
    UnexpectedSkip {
        resource_type: String,
        skip_reason: String,
    },
    Error(String),
    /// The row is no longer ours (lease expired and taken over): write nothing.
    LeaseLost,
}

/// What a handler may do next with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Go,
    /// A newer row covers this resource: leave it to that row.
    LeftToNewer(Uuid),
    LeaseLost,
}

/// A claimed row's working context, handed to its handler.
pub struct Work<'a> {
    pub pool: &'a PgPool,
    lease: &'a Lease,
    options: &'a PropagationOptions,
    heartbeat: &'a Heartbeat,
}

impl Work<'_> {
    pub fn call_deadline(&self) -> Duration {
        self.options.call_deadline
    }

    /// Before each provisioner call: reports progress (/healthz), renews the lease to cover the
    /// call, and checks that no newer row covers the resource — one statement.
    pub async fn before_call(&self, resource_id: Uuid) -> Result<Turn, sqlx::Error> {
        self.heartbeat.progress();
        let (ours, newer): (bool, Option<Uuid>) = sqlx::query_as(
            "WITH renewed AS (
                 UPDATE pending_propagations
                    SET lease_expires_at = now() + make_interval(secs => $3)
                  WHERE id = $1 AND lease_token = $2 AND attempts = $4
                 RETURNING id, team_id, created_at
             )
             SELECT EXISTS (SELECT 1 FROM renewed),
                    (SELECT n.id FROM pending_propagations n JOIN renewed r ON n.team_id = r.team_id
                      WHERE (n.resource_id IS NULL OR n.resource_id = $5)
                        AND (n.created_at, n.id) > (r.created_at, r.id)
                      ORDER BY n.created_at DESC, n.id DESC LIMIT 1)",
        )
        .bind(self.lease.id)
        .bind(self.lease.token)
        .bind(self.options.lease_seconds())
        .bind(self.lease.attempts)
        .bind(resource_id)
        .fetch_one(self.pool)
        .await?;
        Ok(match (ours, newer) {
            (false, _) => Turn::LeaseLost,
            (true, Some(n)) => Turn::LeftToNewer(n),
            (true, None) => Turn::Go,
        })
    }
}

#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, work: &Work<'_>, row: &Propagation) -> Outcome;
}

/// Regrades every active resource of the team (or just `resource_id`) to the target tier.
pub struct Regrade {
    provisioner: Arc<dyn Provisioner>,
    plans: Arc<Plans>,
    metrics: Metrics,
}

#[async_trait]
impl Handler for Regrade {
    async fn handle(&self, work: &Work<'_>, row: &Propagation) -> Outcome {
        let resources: Vec<(Uuid, String)> = match sqlx::query_as(
            "SELECT id, resource_type FROM resources
              WHERE team_id = $1 AND status = 'active' AND ($2::uuid IS NULL OR id = $2)
              ORDER BY id",
        )
        .bind(row.team_id)
        .bind(row.resource_id)
        .fetch_all(work.pool)
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
        let mut left_to_newer = Vec::new();
        for (resource_id, resource_type) in resources {
            match work.before_call(resource_id).await {
                Ok(Turn::Go) => {}
                Ok(Turn::LeftToNewer(newer)) => {
                    tracing::info!(propagation_id = %row.id, %resource_id, newer_id = %newer,
                        "a newer propagation covers this resource: not regraded by the older one");
                    left_to_newer.push(resource_id);
                    continue;
                }
                Ok(Turn::LeaseLost) => return Outcome::LeaseLost,
                Err(e) => {
                    return first_problem
                        .unwrap_or_else(|| Outcome::Error(format!("renewing the lease: {e}")))
                }
            }
            let request = RegradeResourceRequest {
                resource_id: resource_id.to_string(),
                resource_type: resource_type.clone(),
                team_id: row.team_id.to_string(),
                tier: row.target_tier.clone(),
                limits: limits.clone(),
                idempotency_key: row.id.to_string(),
            };
            let deadline = work.call_deadline();
            let outcome =
                match tokio::time::timeout(deadline, self.provisioner.regrade(request)).await {
                    Ok(Ok(r)) if r.applied || ALLOWED_SKIPS.contains(&r.skip_reason.as_str()) => {
                        continue
                    }
                    Ok(Ok(r)) => Outcome::UnexpectedSkip {
                        resource_type,
                        skip_reason: r.skip_reason,
                    },
                    Ok(Err(e)) => Outcome::Error(format!("resource {resource_id}: {e}")),
                    Err(_) => Outcome::Error(format!(
                        "resource {resource_id}: no answer within {} s",
                        deadline.as_secs_f64()
                    )),
                };
            first_problem.get_or_insert(outcome);
        }
        first_problem.unwrap_or(Outcome::Applied { left_to_newer })
    }
}

/// Where a finished attempt leaves its row.
enum Fate {
    Applied,
    Superseded(Uuid),
    Retry(Duration),
    Dead,
}

pub struct Propagations {
    pool: PgPool,
    metrics: Metrics,
    options: PropagationOptions,
    /// `None` when PROVISIONER_ADDR is unset: rows wait, and only the gauge is kept fresh.
    handlers: Option<HashMap<&'static str, Arc<dyn Handler>>>,
}

impl Propagations {
    /// With default options (the hostname as `leased_by`, a 60 s lease, the 30 s call deadline).
    pub fn new(
        pool: PgPool,
        plans: Arc<Plans>,
        metrics: Metrics,
        provisioner: Option<Arc<dyn Provisioner>>,
    ) -> Arc<Self> {
        Self::with_options(
            pool,
            plans,
            metrics,
            provisioner,
            PropagationOptions::default(),
        )
    }

    pub fn with_options(
        pool: PgPool,
        plans: Arc<Plans>,
        metrics: Metrics,
        provisioner: Option<Arc<dyn Provisioner>>,
        options: PropagationOptions,
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
            options,
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

    fn has_handler(&self, kind: &str) -> bool {
        self.handlers.as_ref().is_some_and(|h| h.contains_key(kind))
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

    /// Rows whose lease expired (their worker was killed or lost the database): the lease is
    /// cleared and the row is due at once, or dead-lettered if that was its last attempt.
    pub async fn recover_expired(&self) -> Result<u64, sqlx::Error> {
        #[derive(sqlx::FromRow)]
        struct Recovered {
            id: Uuid,
            kind: String,
            team_id: Uuid,
            resource_id: Option<Uuid>,
            attempts: i32,
            last_error: String,
            dead: bool,
        }
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Recovered> = sqlx::query_as(
            "WITH expired AS (
                 SELECT id, leased_by FROM pending_propagations
                  WHERE lease_token IS NOT NULL AND lease_expires_at < now()
                  ORDER BY lease_expires_at
                  LIMIT $2
                  FOR UPDATE SKIP LOCKED
             )
             UPDATE pending_propagations p
                SET leased_by = NULL, lease_token = NULL, lease_expires_at = NULL,
                    next_attempt_at = now(),
                    failed_at = CASE WHEN p.attempts >= $1 THEN now() END,
                    last_error = 'lease of ' || e.leased_by || ' expired during attempt '
                                 || p.attempts || ' (worker lost)'
               FROM expired e
              WHERE p.id = e.id
             RETURNING p.id, p.kind::text AS kind, p.team_id, p.resource_id, p.attempts,
                       p.last_error, p.failed_at IS NOT NULL AS dead",
        )
        .bind(MAX_ATTEMPTS)
        .bind(SWEEP_LIMIT)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let kind = kind_label(&r.kind);
            if r.dead {
                let (reason, audit_kind) = if self.has_handler(&r.kind) {
                    ("max_attempts", "propagation.dead_lettered")
                } else {
                    ("unknown_kind", "propagation.unknown_kind_dead_lettered")
                };
                audit(
                    &mut *tx,
                    audit_kind,
                    Some(r.team_id),
                    r.resource_id,
                    Some(r.id),
                    json!({ "kind": r.kind, "attempts": r.attempts, "last_error": r.last_error }),
                )
                .await?;
                self.metrics
                    .propagation_dead_lettered
                    .with_label_values(&[reason, kind])
                    .inc();
                tracing::error!(propagation_id = %r.id, kind = %r.kind, attempts = r.attempts,
                    "propagation lease expired on its last attempt: dead-lettered");
            } else {
                audit(
                    &mut *tx,
                    "propagation.retrying",
                    Some(r.team_id),
                    r.resource_id,
                    Some(r.id),
                    json!({ "kind": r.kind, "error": r.last_error, "attempt": r.attempts }),
                )
                .await?;
                tracing::warn!(propagation_id = %r.id, kind = %r.kind, attempts = r.attempts,
                    "propagation lease expired (worker lost): due again");
            }
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Marks every open, unleased row that a newer row covers entirely as superseded.
    pub async fn supersede_stale(&self) -> Result<u64, sqlx::Error> {
        #[derive(sqlx::FromRow)]
        struct Superseded {
            id: Uuid,
            kind: String,
            team_id: Uuid,
            resource_id: Option<Uuid>,
            target_tier: String,
            newer: Uuid,
        }
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Superseded> = sqlx::query_as(&format!(
            "WITH stale AS (
                 SELECT p.id, p.team_id, p.resource_id, p.created_at FROM pending_propagations p
                  WHERE p.applied_at IS NULL AND p.failed_at IS NULL AND p.lease_token IS NULL
                    AND EXISTS (SELECT 1 FROM pending_propagations n WHERE {NEWER_COVERING})
                  ORDER BY p.created_at, p.id
                  LIMIT $1
                  FOR UPDATE OF p SKIP LOCKED
             ), newest AS (
                 SELECT p.id, (SELECT n.id FROM pending_propagations n WHERE {NEWER_COVERING}
                                ORDER BY n.created_at DESC, n.id DESC LIMIT 1) AS newer
                   FROM stale p
             )
             UPDATE pending_propagations p
                SET failed_at = now(), last_error = 'superseded by ' || w.newer
               FROM newest w
              WHERE p.id = w.id AND w.newer IS NOT NULL
             RETURNING p.id, p.kind::text AS kind, p.team_id, p.resource_id, p.target_tier,
                       w.newer"
        ))
        .bind(SWEEP_LIMIT)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            self.record_superseded(
                &mut tx,
                r.id,
                &r.kind,
                r.team_id,
                r.resource_id,
                &r.target_tier,
                r.newer,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_superseded(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: Uuid,
        kind: &str,
        team_id: Uuid,
        resource_id: Option<Uuid>,
        target_tier: &str,
        newer: Uuid,
    ) -> Result<(), sqlx::Error> {
        audit(
            &mut **tx,
            "propagation.superseded",
            Some(team_id),
            resource_id,
            Some(id),
            json!({ "kind": kind, "target_tier": target_tier, "superseded_by": newer }),
        )
        .await?;
        self.metrics
            .propagation_superseded
            .with_label_values(&[kind_label(kind)])
            .inc();
        tracing::info!(propagation_id = %id, %kind, tier = %target_tier, newer_id = %newer,
            "propagation superseded by a newer row; not applied");
        Ok(())
    }

    /// Claims one due row with a committed lease. `None` when nothing is claimable.
    async fn claim(&self) -> Result<Option<(Propagation, Lease)>, sqlx::Error> {
        let sql = format!(
            "UPDATE pending_propagations
                SET leased_by = $1, lease_token = $2,
                    lease_expires_at = now() + make_interval(secs => $3),
                    attempts = attempts + 1
              WHERE id = (
                 SELECT p.id FROM pending_propagations p
                  WHERE p.applied_at IS NULL AND p.failed_at IS NULL AND p.lease_token IS NULL
                    AND p.next_attempt_at <= now()
                    AND NOT EXISTS (SELECT 1 FROM pending_propagations o
                                     WHERE o.team_id = p.team_id AND o.lease_token IS NOT NULL)
                    AND NOT EXISTS (SELECT 1 FROM pending_propagations n WHERE {NEWER_COVERING})
                  ORDER BY p.next_attempt_at, p.created_at, p.id
                  LIMIT 1
                  FOR UPDATE SKIP LOCKED)
             RETURNING id, kind::text AS kind, team_id, resource_id, target_tier, attempts"
        );
        for _ in 0..CLAIM_RETRIES {
            let token = Uuid::new_v4();
            let claimed: Result<Option<Propagation>, sqlx::Error> = sqlx::query_as(&sql)
                .bind(&self.options.worker_id)
                .bind(token)
                .bind(self.options.lease_seconds())
                .fetch_optional(&self.pool)
                .await;
            match claimed {
                Ok(Some(row)) => {
                    let lease = Lease {
                        id: row.id,
                        token,
                        attempts: row.attempts,
                    };
                    return Ok(Some((row, lease)));
                }
                Ok(None) => return Ok(None),
                // Another worker leased a row of the same team after our snapshot: its lease is
                // committed now, so the next try skips that team.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    tracing::debug!("lost a claim race for a team; claiming again");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Claims and works one due row. False when none is claimable (or on abort).
    pub async fn process_one(&self, ctx: &PassContext) -> Result<bool, sqlx::Error> {
        let Some(handlers) = &self.handlers else {
            return Ok(false);
        };
        let Some((row, lease)) = self.claim().await? else {
            return Ok(false);
        };
        let outcome = match handlers.get(row.kind.as_str()) {
            None => None,
            Some(handler) => {
                let work = Work {
                    pool: &self.pool,
                    lease: &lease,
                    options: &self.options,
                    heartbeat: &ctx.heartbeat,
                };
                tokio::select! {
                    o = handler.handle(&work, &row) => Some(o),
                    () = ctx.abort.cancelled() => {
                        self.release(&lease).await?;
                        tracing::info!(propagation_id = %row.id, "propagation interrupted by shutdown; row released");
                        return Ok(false);
                    }
                }
            }
        };
        self.finish(&row, &lease, outcome).await?;
        Ok(true)
    }

    /// Shutdown: the interrupted attempt does not count, and the row is claimable at once.
    async fn release(&self, lease: &Lease) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE pending_propagations
                SET attempts = attempts - 1, leased_by = NULL, lease_token = NULL,
                    lease_expires_at = NULL
              WHERE id = $1 AND lease_token = $2 AND attempts = $3",
        )
        .bind(lease.id)
        .bind(lease.token)
        .bind(lease.attempts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records an attempt's result (`None`: no handler for the kind), fenced on the lease.
    async fn finish(
        &self,
        row: &Propagation,
        lease: &Lease,
        outcome: Option<Outcome>,
    ) -> Result<(), sqlx::Error> {
        let kind = kind_label(&row.kind);
        let mut tx = self.pool.begin().await?;
        let (error, applied_detail) = match &outcome {
            Some(Outcome::LeaseLost) => {
                tracing::warn!(propagation_id = %row.id, "propagation lease lost (taken over); result discarded");
                return Ok(());
            }
            Some(Outcome::Applied { left_to_newer }) => (None, left_to_newer.clone()),
            Some(Outcome::UnexpectedSkip { skip_reason, .. }) => {
                (Some(format!("unexpected skip: {skip_reason}")), Vec::new())
            }
            Some(Outcome::Error(msg)) => (Some(msg.clone()), Vec::new()),
            None => (
                Some(format!("no handler for kind {:?}", row.kind)),
                Vec::new(),
            ),
        };
        let error: Option<String> = error.map(|e| {
            crate::secret::redact_credentials(&e)
                .chars()
                .take(2000)
                .collect()
        });
        let fate = match &error {
            None => Fate::Applied,
            Some(_) => {
                // A failed row that a newer row now covers is not retried: it is superseded.
                let newer: Option<Uuid> = sqlx::query_scalar(&format!(
                    "SELECT n.id FROM pending_propagations n, pending_propagations p
                      WHERE p.id = $1 AND {NEWER_COVERING}
                      ORDER BY n.created_at DESC, n.id DESC LIMIT 1"
                ))
                .bind(row.id)
                .fetch_optional(&mut *tx)
                .await?;
                match newer {
                    Some(n) => Fate::Superseded(n),
                    None if lease.attempts >= MAX_ATTEMPTS => Fate::Dead,
                    None => Fate::Retry(backoff(lease.attempts)),
                }
            }
        };
        if !self
            .write_fate(&mut tx, lease, &fate, error.as_deref())
            .await?
        {
            tracing::warn!(propagation_id = %row.id, "propagation lease lost before recording the result; discarded");
            return Ok(());
        }

        // The row is ours and written: now the audit trail and the metrics.
        let attempts = lease.attempts;
        match &outcome {
            Some(Outcome::UnexpectedSkip {
                resource_type,
                skip_reason,
            }) => {
                let bucket = skip_reason_label(skip_reason);
                self.metrics
                    .propagation_unexpected_skip
                    .with_label_values(&[kind, resource_label(resource_type), bucket])
                    .inc();
                audit(&mut *tx, "propagation.unexpected_skip", Some(row.team_id), row.resource_id, Some(row.id),
                    json!({ "kind": row.kind, "resource_type": resource_type, "skip_reason": skip_reason })).await?;
            }
            Some(Outcome::Error(_)) if !matches!(fate, Fate::Superseded(_)) => {
                audit(
                    &mut *tx,
                    "propagation.retrying",
                    Some(row.team_id),
                    row.resource_id,
                    Some(row.id),
                    json!({ "kind": row.kind, "error": error, "attempt": attempts }),
                )
                .await?;
            }
            None => {
                self.metrics
                    .propagation_unknown_kind
                    .with_label_values(&[UNKNOWN_KIND])
                    .inc();
                tracing::warn!(propagation_id = %row.id, kind = %row.kind, "no handler for this propagation kind");
            }
            _ => {}
        }
        let (dead_reason, dead_audit) = if outcome.is_none() {
            ("unknown_kind", "propagation.unknown_kind_dead_lettered")
        } else {
            ("max_attempts", "propagation.dead_lettered")
        };
        match fate {
            Fate::Applied => {
                let mut detail = json!({ "kind": row.kind, "target_tier": row.target_tier });
                if !applied_detail.is_empty() {
                    detail["left_to_newer"] = json!(applied_detail);
                }
                audit(
                    &mut *tx,
                    "propagation.applied",
                    Some(row.team_id),
                    row.resource_id,
                    Some(row.id),
                    detail,
                )
                .await?;
                self.metrics
                    .propagation_applied
                    .with_label_values(&[kind])
                    .inc();
                tracing::info!(propagation_id = %row.id, kind = %row.kind, tier = %row.target_tier, "propagation applied");
            }
            Fate::Superseded(newer) => {
                self.record_superseded(
                    &mut tx,
                    row.id,
                    &row.kind,
                    row.team_id,
                    row.resource_id,
                    &row.target_tier,
                    newer,
                )
                .await?;
            }
            Fate::Dead => {
                audit(
                    &mut *tx,
                    dead_audit,
                    Some(row.team_id),
                    row.resource_id,
                    Some(row.id),
                    json!({ "kind": row.kind, "attempts": attempts, "last_error": error }),
                )
                .await?;
                self.metrics
                    .propagation_dead_lettered
                    .with_label_values(&[dead_reason, kind])
                    .inc();
                tracing::error!(propagation_id = %row.id, kind = %row.kind, attempts, "propagation dead-lettered");
            }
            Fate::Retry(delay) => {
                tracing::warn!(propagation_id = %row.id, kind = %row.kind, attempts, retry_in_s = delay.as_secs(),
                    error = error.as_deref().unwrap_or_default(), "propagation attempt failed; retrying");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The fenced final UPDATE: false when the row is no longer ours.
    async fn write_fate(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        lease: &Lease,
        fate: &Fate,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        const RELEASE: &str = "leased_by = NULL, lease_token = NULL, lease_expires_at = NULL";
        const FENCE: &str = "WHERE id = $1 AND lease_token = $2 AND attempts = $3";
        let set = match fate {
            Fate::Applied => "applied_at = now(), last_error = NULL",
            Fate::Superseded(_) => "failed_at = now(), last_error = 'superseded by ' || $4::uuid",
            Fate::Dead => "failed_at = now(), last_error = $4",
            Fate::Retry(_) => {
                "last_error = $4, next_attempt_at = now() + make_interval(secs => $5)"
            }
        };
        let sql = format!("UPDATE pending_propagations SET {set}, {RELEASE} {FENCE}");
        let query = sqlx::query(&sql)
            .bind(lease.id)
            .bind(lease.token)
            .bind(lease.attempts);
        let query = match fate {
            Fate::Applied => query,
            Fate::Superseded(newer) => query.bind(*newer),
            Fate::Dead => query.bind(error),
            Fate::Retry(delay) => query.bind(error).bind(delay.as_secs_f64()),
        };
        let done = query.execute(&mut **tx).await?;
        Ok(done.rows_affected() == 1)
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
        if self.handlers.is_some() {
            self.recover_expired().await?;
            self.supersede_stale().await?;
            ctx.heartbeat.progress();
            for _ in 0..BATCH {
                if ctx.shutdown.is_cancelled() || !self.process_one(ctx).await? {
                    break;
                }
                ctx.heartbeat.progress();
            }
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

    #[test]
    fn the_lease_covers_a_whole_call() {
        let o = PropagationOptions {
            worker_id: "w".into(),
            lease: Duration::from_secs(60),
            call_deadline: CALL_DEADLINE,
        };
        assert!(o.lease_seconds() >= CALL_DEADLINE.as_secs_f64() + 60.0);
    }
}
