//! Loop liveness for /healthz. Each loop reports Busy/Idle and progress; a loop is unhealthy when
//! it has not made progress within its stall limit (a pass that keeps failing makes none).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopState {
    Starting,
    Idle,
    Busy,
    /// The last pass failed; the supervisor is backing off before the next.
    BackingOff,
    Stopped,
}

#[derive(Debug)]
struct Entry {
    state: LoopState,
    last_progress: Instant,
    stall_after: Duration,
    restarts: u64,
    last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LoopReport {
    pub state: LoopState,
    pub healthy: bool,
    pub seconds_since_progress: u64,
    pub stall_after_seconds: u64,
    pub restarts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone)]
pub struct Health {
    entries: Arc<Mutex<BTreeMap<&'static str, Entry>>>,
    metrics: Metrics,
}

impl Health {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            entries: Arc::default(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, Entry>> {
        // Entries are replaced field by field; a poisoned lock is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, name: &'static str, stall_after: Duration) -> Heartbeat {
        self.lock().insert(
            name,
            Entry {
                state: LoopState::Starting,
                last_progress: Instant::now(),
                stall_after,
                restarts: 0,
                last_error: None,
            },
        );
        // The loop's series exist from start, at zero (dashboards sum over them; a counter
        // without a child would be missing from /metrics until the first restart).
        self.metrics.loop_restarts.with_label_values(&[name]);
        self.metrics.loop_busy.with_label_values(&[name]).set(0);
        let hb = Heartbeat {
            name,
            health: Some(self.clone()),
        };
        hb.progress();
        hb
    }

    /// (every loop healthy, per-loop report).
    pub fn report(&self) -> (bool, BTreeMap<&'static str, LoopReport>) {
        let now = Instant::now();
        let reports: BTreeMap<_, _> = self
            .lock()
            .iter()
            .map(|(name, e)| {
                let since = now.saturating_duration_since(e.last_progress);
                let healthy = since <= e.stall_after && e.state != LoopState::Stopped;
                (
                    *name,
                    LoopReport {
                        state: e.state,
                        healthy,
                        seconds_since_progress: since.as_secs(),
                        stall_after_seconds: e.stall_after.as_secs(),
                        restarts: e.restarts,
                        last_error: e.last_error.clone(),
                    },
                )
            })
            .collect();
        (reports.values().all(|r| r.healthy), reports)
    }
}

/// A loop's handle on its own health entry. `Heartbeat::detached()` reports nowhere (--once).
#[derive(Clone)]
pub struct Heartbeat {
    name: &'static str,
    health: Option<Health>,
}

impl Heartbeat {
    pub fn detached(name: &'static str) -> Self {
        Self { name, health: None }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(h) = &self.health {
            if let Some(e) = h.lock().get_mut(self.name) {
                f(e);
            }
        }
    }

    fn set_state(&self, state: LoopState) {
        self.update(|e| e.state = state);
        if let Some(h) = &self.health {
            h.metrics
                .loop_busy
                .with_label_values(&[self.name])
                .set(i64::from(state == LoopState::Busy));
        }
    }

    /// The loop is alive and moving: call after each pass and periodically during long work.
    pub fn progress(&self) {
        self.update(|e| {
            e.last_progress = Instant::now();
            e.last_error = None;
        });
        if let Some(h) = &self.health {
            h.metrics
                .loop_last_progress
                .with_label_values(&[self.name])
                .set(chrono::Utc::now().timestamp());
        }
    }

    pub fn busy(&self) {
        self.set_state(LoopState::Busy);
    }

    pub fn idle(&self) {
        self.set_state(LoopState::Idle);
    }

    pub fn stopped(&self) {
        self.set_state(LoopState::Stopped);
    }

    pub fn failed(&self, error: &str) {
        self.update(|e| {
            e.state = LoopState::BackingOff;
            e.restarts += 1;
            e.last_error = Some(error.chars().take(500).collect());
        });
        if let Some(h) = &self.health {
            h.metrics
                .loop_restarts
                .with_label_values(&[self.name])
                .inc();
            h.metrics.loop_busy.with_label_values(&[self.name]).set(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_without_progress_is_reported_unhealthy() {
        let health = Health::new(Metrics::new().unwrap());
        let a = health.register("a", Duration::from_secs(3600));
        let b = health.register("b", Duration::ZERO);
        a.idle();
        std::thread::sleep(Duration::from_millis(5));
        let (ok, report) = health.report();
        assert!(!ok);
        assert!(report["a"].healthy);
        assert!(!report["b"].healthy);
        b.failed("boom");
        assert_eq!(health.report().1["b"].restarts, 1);
        assert_eq!(health.report().1["b"].state, LoopState::BackingOff);
    }

    #[test]
    fn a_registered_loops_series_are_exported_at_zero() {
        let metrics = Metrics::new().unwrap();
        let health = Health::new(metrics.clone());
        let _hb = health.register("scheduler", Duration::from_secs(60));
        let text = metrics.render();
        for line in [
            "backup_worker_loop_restarts_total{loop=\"scheduler\"} 0",
            "backup_worker_loop_busy{loop=\"scheduler\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        assert!(
            text.contains("backup_worker_loop_last_progress_timestamp_seconds{loop=\"scheduler\"}")
        );
    }
}
