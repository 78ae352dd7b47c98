//! Prometheus metrics (DESIGN §8). Names are an interface with dashboards and alerts: every family
//! is registered at start, and label sets that dashboards sum over are primed with zeros.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::domain::{FailureReason, SUPPORTED_RESOURCE_TYPES};

/// Propagation kinds known to this build; anything else is reported as `unknown_kind`.
pub const KNOWN_PROPAGATION_KINDS: &[&str] = &["tier_elevation", "tier_demotion"];
pub const UNKNOWN_KIND: &str = "unknown_kind";
/// The bounded `skip_reason` label values; anything else is `other`.
pub const SKIP_REASON_BUCKETS: &[&str] = &[
    "postgres_admin_secret_missing",
    "redis_auth_secret_missing",
    "namespace_not_found",
    "pod_not_found",
    "resource_not_reachable",
    "legacy_resource",
    "other",
];

/// `kind` values of `backup_worker_backup_anomalies_total` (DESIGN §15).
pub const ANOMALY_KINDS: [&str; 2] = ["size", "content"];

/// `state` values of `backup_worker_wal_streams` (the `wal_streams.status` values, DESIGN §14).
pub const WAL_STREAM_STATES: [&str; 3] = ["streaming", "stopped", "failed"];

/// Buckets for job durations: seconds up to the 6 h default timeout.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
    21600.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub backup_succeeded: IntCounter,
    pub backup_failed: IntCounter,
    pub backup_by_type: IntCounterVec,
    pub backup_duration: HistogramVec,
    pub backup_bytes: IntCounterVec,
    pub backup_scheduled: IntCounterVec,
    pub backup_stuck_recovered: IntCounter,
    pub restore_stuck_recovered: IntCounter,
    pub restore_outcome_unknown: IntCounter,
    pub backup_rpo_breached: IntGauge,
    pub restore_by_type: IntCounterVec,
    pub backup_verified: IntCounterVec,
    pub unverified_backups: IntGauge,
    pub copies: IntCounterVec,
    pub unprotected_backups: IntGauge,
    pub copy_reads: IntCounterVec,
    pub backup_anomalies: IntCounterVec,
    pub wal_streams: IntGaugeVec,
    pub pitr_rpo_breached: IntGauge,
    pub wal_bytes: IntCounter,
    pub pitr_gaps: IntCounter,
    pub propagation_applied: IntCounterVec,
    pub propagation_unexpected_skip: IntCounterVec,
    pub propagation_dead_lettered: IntCounterVec,
    pub propagation_unknown_kind: IntCounterVec,
    pub propagation_superseded: IntCounterVec,
    pub unknown_tier: IntCounter,
    pub backups_expired: IntCounter,
    pub propagations_waiting: IntGauge,
    pub backed_up_resources: IntGauge,
    pub stale_uploads_aborted: IntCounter,
    pub orphan_objects_removed: IntCounter,
    pub loop_restarts: IntCounterVec,
    pub loop_busy: IntGaugeVec,
    pub loop_last_progress: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let backup_duration = HistogramVec::new(
            HistogramOpts::new(
                "instant_customer_backup_duration_seconds",
                "Wall time of finished backup attempts, from claim to final row update.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["resource_type"],
        )?;
        r.register(Box::new(backup_duration.clone()))?;
        let backup_rpo_breached = IntGauge::new(
            "instant_customer_backup_rpo_breached",
            "Active backed-up resources whose newest succeeded backup is older than their RPO + 60 min.",
        )?;
        r.register(Box::new(backup_rpo_breached.clone()))?;

        let m = Metrics {
            backup_succeeded: counter(
                &r,
                "instant_customer_backup_succeeded_total",
                "Backups that finished and were committed to object storage.",
            )?,
            backup_failed: counter(
                &r,
                "instant_customer_backup_failed_total",
                "Backups that ended failed (after their last attempt).",
            )?,
            backup_by_type: counter_vec(
                &r,
                "instant_customer_backup_by_type_total",
                "Backup attempt outcomes by resource type; result is ok or a failure reason.",
                &["resource_type", "result"],
            )?,
            backup_duration,
            backup_bytes: counter_vec(
                &r,
                "instant_customer_backup_bytes_total",
                "Bytes stored (compressed) by succeeded backups.",
                &["resource_type"],
            )?,
            backup_scheduled: counter_vec(
                &r,
                "instant_customer_backup_scheduled_total",
                "Scheduled backup rows enqueued by the scheduler.",
                &["resource_type"],
            )?,
            backup_stuck_recovered: counter(
                &r,
                "instant_customer_backup_stuck_recovered_total",
                "Running rows whose lease expired and were returned to pending or failed.",
            )?,
            restore_stuck_recovered: counter(
                &r,
                "instant_customer_restore_stuck_recovered_total",
                "Running restores whose lease expired and were returned to pending or failed.",
            )?,
            restore_outcome_unknown: counter(
                &r,
                "backup_worker_restore_outcome_unknown_total",
                "Restores whose lease expired after their rewind began: failed as outcome unknown, never re-run.",
            )?,
            backup_rpo_breached,
            restore_by_type: counter_vec(
                &r,
                "instant_customer_restore_by_type_total",
                "Restore outcomes by resource type; result is ok or a failure reason.",
                &["resource_type", "result"],
            )?,
            backup_verified: counter_vec(
                &r,
                "instant_customer_backup_verified_total",
                "Finished verifications by resource type; result is ok or a failure reason.",
                &["resource_type", "result"],
            )?,
            unverified_backups: {
                let g = IntGauge::new(
                    "backup_worker_unverified_backups",
                    "Resources whose newest succeeded backup failed verification, or that have no passing verification within VERIFY_EVERY (refreshed by the verifier).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            copies: counter_vec(
                &r,
                "backup_worker_copies_total",
                "Copies to a second destination that ended (DESIGN §13); result is ok or a failure reason.",
                &["destination", "result"],
            )?,
            unprotected_backups: {
                let g = IntGauge::new(
                    "backup_worker_unprotected_backups",
                    "Succeeded backups older than an hour that some configured copy destination does not hold yet (refreshed by the copies loop).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            copy_reads: counter_vec(
                &r,
                "backup_worker_copy_reads_total",
                "Restores and verifications whose object was read from the copy destination because the primary's was missing, unreadable or altered.",
                &["reader"],
            )?,
            backup_anomalies: counter_vec(
                &r,
                "backup_worker_backup_anomalies_total",
                "Succeeded backups flagged as anomalous against their resource's previous one (DESIGN §15); kind is size or content.",
                &["resource_type", "kind"],
            )?,
            wal_streams: gauge_vec(
                &r,
                "backup_worker_wal_streams",
                "WAL streams of PITR resources by state (DESIGN §14): streaming (a replica holds it and pg_receivewal runs), stopped (nobody holds it), failed (it cannot run; retried with backoff). Fleet-wide, refreshed by the wal loop.",
                &["state"],
            )?,
            pitr_rpo_breached: {
                let g = IntGauge::new(
                    "backup_worker_pitr_rpo_breached",
                    "PITR resources whose newest stored WAL is older than their pitr_rpo_seconds + 60 s (refreshed by the wal loop).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            wal_bytes: counter(
                &r,
                "backup_worker_wal_bytes_total",
                "Bytes of WAL stored (raw, before compression), partial segments counted by what they added.",
            )?,
            pitr_gaps: counter(
                &r,
                "backup_worker_pitr_gaps_total",
                "WAL gaps detected: WAL the tenant's server dropped before it was stored (an invalidated slot).",
            )?,
            propagation_applied: counter_vec(
                &r,
                "instant_propagation_applied_total",
                "Propagation rows applied (or skipped for an allowed reason).",
                &["kind"],
            )?,
            propagation_unexpected_skip: counter_vec(
                &r,
                "instant_propagation_unexpected_skip_total",
                "Provisioner skips with a reason that is not an allowed success.",
                &["kind", "resource_type", "skip_reason"],
            )?,
            propagation_dead_lettered: counter_vec(
                &r,
                "instant_propagation_dead_lettered_total",
                "Propagation rows given up on (failed_at set).",
                &["reason", "kind"],
            )?,
            propagation_unknown_kind: counter_vec(
                &r,
                "instant_propagation_unknown_kind_total",
                "Propagation attempts for a kind this worker has no handler for.",
                &["kind"],
            )?,
            propagation_superseded: counter_vec(
                &r,
                "instant_propagation_superseded_total",
                "Propagation rows superseded by a newer row for the same target (never applied).",
                &["kind"],
            )?,
            unknown_tier: counter(
                &r,
                "instant_plan_unknown_tier_total",
                "Lookups of a plan tier missing from plans.yaml (the default plan was used).",
            )?,
            propagations_waiting: {
                let g = IntGauge::new(
                    "backup_worker_propagations_waiting",
                    "Propagation rows due now and not yet applied or dead-lettered.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            backed_up_resources: {
                let g = IntGauge::new(
                    "backup_worker_backed_up_resources",
                    "Active resources whose plan backs them up (refreshed by the scheduler).",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            backups_expired: counter(
                &r,
                "backup_worker_backups_expired_total",
                "Succeeded backups expired by retention (row marked expired, object deleted).",
            )?,
            stale_uploads_aborted: counter(
                &r,
                "backup_worker_stale_uploads_aborted_total",
                "Incomplete uploads aborted by the orphan sweep (older than max(1 day, BACKUP_TIMEOUT + 1 h)).",
            )?,
            orphan_objects_removed: counter(
                &r,
                "backup_worker_orphan_objects_removed_total",
                "Backup objects no running or succeeded row references, older than BACKUP_TIMEOUT + 1 h, removed by the reconciliation.",
            )?,
            loop_restarts: counter_vec(
                &r,
                "backup_worker_loop_restarts_total",
                "Times a loop failed and was restarted by the supervisor.",
                &["loop"],
            )?,
            loop_busy: gauge_vec(
                &r,
                "backup_worker_loop_busy",
                "1 while a loop is doing work, 0 while it idles.",
                &["loop"],
            )?,
            loop_last_progress: gauge_vec(
                &r,
                "backup_worker_loop_last_progress_timestamp_seconds",
                "Unix time a loop last reported progress.",
                &["loop"],
            )?,
            registry: r,
        };
        m.prime();
        Ok(m)
    }

    /// Exports every bounded label combination dashboards sum over, at zero, from process start.
    fn prime(&self) {
        for t in SUPPORTED_RESOURCE_TYPES {
            self.backup_by_type.with_label_values(&[t, "ok"]);
            for r in FailureReason::BACKUP {
                self.backup_by_type.with_label_values(&[t, r.as_str()]);
            }
            self.restore_by_type.with_label_values(&[t, "ok"]);
            for r in FailureReason::RESTORE {
                self.restore_by_type.with_label_values(&[t, r.as_str()]);
            }
            self.backup_verified.with_label_values(&[t, "ok"]);
            for r in FailureReason::RESTORE {
                self.backup_verified.with_label_values(&[t, r.as_str()]);
            }
            self.backup_duration.with_label_values(&[t]);
            self.backup_bytes.with_label_values(&[t]);
            self.backup_scheduled.with_label_values(&[t]);
            for kind in ANOMALY_KINDS {
                self.backup_anomalies.with_label_values(&[t, kind]);
            }
        }
        self.copies
            .with_label_values(&[crate::loops::copies::DESTINATION, "ok"]);
        for r in [
            FailureReason::Upload,
            FailureReason::Integrity,
            FailureReason::Timeout,
        ] {
            self.copies
                .with_label_values(&[crate::loops::copies::DESTINATION, r.as_str()]);
        }
        for reader in ["restore", "verify"] {
            self.copy_reads.with_label_values(&[reader]);
        }
        for state in WAL_STREAM_STATES {
            self.wal_streams.with_label_values(&[state]);
        }
        for k in KNOWN_PROPAGATION_KINDS.iter().chain([&UNKNOWN_KIND]) {
            self.propagation_applied.with_label_values(&[k]);
            self.propagation_superseded.with_label_values(&[k]);
            self.propagation_dead_lettered
                .with_label_values(&["max_attempts", k]);
            for t in SUPPORTED_RESOURCE_TYPES {
                for reason in SKIP_REASON_BUCKETS {
                    self.propagation_unexpected_skip
                        .with_label_values(&[k, t, reason]);
                }
            }
        }
        self.propagation_dead_lettered
            .with_label_values(&[UNKNOWN_KIND, UNKNOWN_KIND]);
        self.propagation_unknown_kind
            .with_label_values(&[UNKNOWN_KIND]);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on a malformed family, which registration rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Bounded label value for a propagation kind.
pub fn kind_label(kind: &str) -> &'static str {
    KNOWN_PROPAGATION_KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or(UNKNOWN_KIND)
}

/// Bounded label value for a provisioner skip reason.
pub fn skip_reason_label(reason: &str) -> &'static str {
    SKIP_REASON_BUCKETS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_family_is_exported_from_start() {
        let m = Metrics::new().unwrap();
        let text = m.render();
        for family in [
            "instant_customer_backup_succeeded_total",
            "instant_customer_backup_failed_total",
            "instant_customer_backup_by_type_total",
            "instant_customer_backup_duration_seconds",
            "instant_customer_backup_bytes_total",
            "instant_customer_backup_scheduled_total",
            "instant_customer_backup_stuck_recovered_total",
            "instant_customer_backup_rpo_breached",
            "instant_customer_restore_by_type_total",
            "instant_propagation_applied_total",
            "instant_propagation_unexpected_skip_total",
            "instant_propagation_dead_lettered_total",
            "instant_propagation_unknown_kind_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
        for t in SUPPORTED_RESOURCE_TYPES {
            for r in [
                "ok",
                "auth",
                "unreachable",
                "dump",
                "sanity",
                "upload",
                "timeout",
                "config",
            ] {
                let line = format!(
                    "instant_customer_backup_by_type_total{{resource_type=\"{t}\",result=\"{r}\"}} 0"
                );
                assert!(text.contains(&line), "{line} missing");
            }
        }
    }

    #[test]
    fn skip_reasons_are_bucketed() {
        for r in SKIP_REASON_BUCKETS {
            assert_eq!(skip_reason_label(r), *r);
        }
        for r in [
            "",
            "Pod_Not_Found",
            "pod not found",
            "namespace_gone",
            "x".repeat(500).as_str(),
        ] {
            assert_eq!(skip_reason_label(r), "other", "{r}");
        }
    }

    #[test]
    fn superseded_is_exported_from_start_per_kind() {
        let text = Metrics::new().unwrap().render();
        for k in ["tier_elevation", "tier_demotion", "unknown_kind"] {
            let line = format!("instant_propagation_superseded_total{{kind=\"{k}\"}} 0");
            assert!(text.contains(&line), "{line} missing");
        }
    }

    #[test]
    fn kind_labels_are_bounded() {
        assert_eq!(kind_label("tier_elevation"), "tier_elevation");
        assert_eq!(kind_label("tier_shuffle"), "unknown_kind");
    }
}
