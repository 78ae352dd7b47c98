//! `run(deps, options, listener, shutdown)`: everything the daemon does once configuration is
//! parsed. Tests call it in-process with their own token and a listener on 127.0.0.1:0.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use crate::deps::Deps;
use crate::health::{Health, Heartbeat};
use crate::http::HttpState;
use crate::loops::backups::Backups;
use crate::loops::propagations::{PropagationOptions, Propagations};
use crate::loops::restores::Restores;
use crate::loops::scheduler::Scheduler;
use crate::loops::verifier::Verifier;
use crate::loops::{Loop, LoopError, LoopName, PassContext};

const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Loops to run, in [`LoopName::ALL`] order.
    pub only: Vec<LoopName>,
    pub once: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            only: LoopName::ALL.to_vec(),
            once: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{name} pass failed: {source}")]
    Pass {
        name: LoopName,
        #[source]
        source: LoopError,
    },
    #[error("{name} pass panicked")]
    Panic { name: LoopName },
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// The loop implementations, one per selected name.
pub fn build_loops(deps: &Deps, names: &[LoopName], once: bool) -> Vec<Arc<dyn Loop>> {
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| -> Arc<dyn Loop> {
            match name {
                LoopName::Scheduler => Arc::new(Scheduler::new(
                    deps.pool.clone(),
                    deps.plans.clone(),
                    deps.metrics.clone(),
                    deps.config.scheduler_interval,
                )),
                LoopName::Backups => Arc::new(Backups::new(deps.clone())),
                LoopName::Restores => Arc::new(Restores::new(deps.clone())),
                LoopName::Verifier => Arc::new(Verifier::new(deps.clone())),
                LoopName::Copies => Arc::new(crate::loops::copies::Copies::new(deps.clone())),
                LoopName::Wal => Arc::new(crate::loops::wal::Wal::new(deps.clone(), once)),
                LoopName::Propagations => Arc::new(Propagations::with_options(
                    deps.pool.clone(),
                    deps.plans.clone(),
                    deps.metrics.clone(),
                    deps.provisioner.clone(),
                    PropagationOptions {
                        worker_id: deps.config.worker_id.clone(),
                        lease: deps.config.lease,
                        call_deadline: crate::provisioner::CALL_DEADLINE,
                    },
                )),
            }
        })
        .collect()
}

pub async fn run(
    deps: Deps,
    options: RunOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let loops = build_loops(&deps, &options.only, options.once);
    run_loops(deps, loops, options.once, listener, shutdown).await
}

/// [`run`] with the loops given: tests inject loops that fail, panic or stall.
pub async fn run_loops(
    deps: Deps,
    loops: Vec<Arc<dyn Loop>>,
    once: bool,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if once {
        return run_once(&loops, shutdown).await;
    }
    let names: Vec<&str> = loops.iter().map(|l| l.name().as_str()).collect();

    let health = Health::new(deps.metrics.clone());
    let abort = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for lp in loops {
        let heartbeat = health.register(lp.name().as_str(), lp.stall_after());
        let ctx = PassContext {
            shutdown: shutdown.clone(),
            abort: abort.clone(),
            heartbeat,
        };
        tasks.spawn(supervise(lp, ctx));
    }

    let http_stop = CancellationToken::new();
    let http = listener.map(|l| {
        let state = HttpState {
            metrics: deps.metrics.clone(),
            health: health.clone(),
            pool: deps.pool.clone(),
        };
        tokio::spawn(crate::http::serve(l, state, http_stop.clone()))
    });
    tracing::info!(
        worker_id = %deps.config.worker_id,
        storage = %deps.config.storage_url,
        loops = ?names,
        "backup-worker started"
    );

    shutdown.cancelled().await;
    let grace = deps.config.shutdown_grace;
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "shutdown requested: no new claims; draining"
    );
    let drained = tokio::time::timeout(grace, drain(&mut tasks)).await.is_ok();
    if !drained {
        tracing::warn!("shutdown grace elapsed: cancelling running jobs and releasing their rows");
        abort.cancel();
        // SHUTDOWN_ABORT_WINDOW: cancelled jobs kill their tools, abort their uploads and release
        // their rows; a job still running after it is dropped and its row waits for its lease.
        if tokio::time::timeout(deps.config.shutdown_abort_window, drain(&mut tasks))
            .await
            .is_err()
        {
            tracing::error!("loops did not stop after cancellation; exiting anyway");
            tasks.abort_all();
        }
    }
    http_stop.cancel();
    if let Some(h) = http {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_millis(200), h).await {
            return Err(RunError::Http(e));
        }
    }
    tracing::info!("backup-worker stopped");
    Ok(())
}

async fn drain(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// One pass of each selected loop, in order; the first failure is the exit status.
async fn run_once(loops: &[Arc<dyn Loop>], shutdown: CancellationToken) -> Result<(), RunError> {
    for lp in loops {
        let name = lp.name();
        let ctx = PassContext {
            shutdown: shutdown.clone(),
            abort: shutdown.clone(),
            heartbeat: Heartbeat::detached(name.as_str()),
        };
        match std::panic::AssertUnwindSafe(lp.pass(&ctx))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => tracing::info!(loop_name = %name, "pass complete"),
            Ok(Err(source)) => return Err(RunError::Pass { name, source }),
            Err(_) => return Err(RunError::Panic { name }),
        }
    }
    Ok(())
}

/// Runs passes until shutdown; a failed or panicking pass is logged and retried with backoff.
async fn supervise(lp: Arc<dyn Loop>, ctx: PassContext) {
    let name = lp.name();
    let mut failures: u32 = 0;
    while !ctx.shutdown.is_cancelled() {
        ctx.heartbeat.busy();
        let outcome = std::panic::AssertUnwindSafe(lp.pass(&ctx))
            .catch_unwind()
            .await;
        let wait = match outcome {
            Ok(Ok(())) => {
                failures = 0;
                ctx.heartbeat.progress();
                ctx.heartbeat.idle();
                lp.interval()
            }
            Ok(Err(e)) => {
                failures += 1;
                let msg = crate::secret::redact_credentials(&e.to_string());
                tracing::error!(loop_name = %name, error = %msg, failures, "pass failed; restarting after backoff");
                ctx.heartbeat.failed(&msg);
                backoff(failures)
            }
            Err(_) => {
                failures += 1;
                tracing::error!(loop_name = %name, failures, "pass panicked; restarting after backoff");
                ctx.heartbeat.failed("panic");
                backoff(failures)
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    ctx.heartbeat.stopped();
}

/// 1 s, 2 s, 4 s … capped at a minute.
fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
