//! The daemon in-process: HTTP endpoints, supervision (restart with backoff, stall detection),
//! graceful shutdown, and `--once`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backup_worker::app::{run_loops, RunOptions};
use backup_worker::loops::{Loop, LoopError, LoopName, PassContext};
use backup_worker_testkit::MemoryStore;
use backup_worker_testkit::{http_get, test_config, test_deps, wait_until, TestDaemon};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn deps(pool: PgPool) -> backup_worker::Deps {
    test_deps(
        pool,
        Arc::new(MemoryStore::new()),
        test_config(&[]).unwrap(),
    )
    .unwrap()
}

#[sqlx::test]
async fn serves_metrics_health_and_readiness(pool: PgPool) {
    let daemon = TestDaemon::start(deps(pool), RunOptions::default())
        .await
        .unwrap();
    let (code, body) = daemon.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE instant_customer_backup_by_type_total counter"));
    assert!(body.contains(
        "instant_customer_backup_by_type_total{resource_type=\"redis\",result=\"sanity\"} 0"
    ));
    assert!(body.contains("process_resident_memory_bytes"));

    let (code, body) = daemon.get("/healthz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    for l in LoopName::ALL {
        assert!(
            body.contains(&format!("\"{l}\"")),
            "{l} missing from {body}"
        );
    }
    let (code, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.get("/nope").await.unwrap().0, 404);
    daemon.stop().await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn not_ready_until_migrated(pool: PgPool) {
    let daemon = TestDaemon::start(deps(pool.clone()), RunOptions::default())
        .await
        .unwrap();
    let (code, body) = daemon.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("migrations_pending"), "{body}");
    backup_worker::db::migrate(&pool).await.unwrap();
    assert_eq!(daemon.get("/readyz").await.unwrap().0, 200);
    daemon.stop().await.unwrap();
}

/// Fails its first `fail_first` passes, then succeeds; counts passes.
struct Flaky {
    name: LoopName,
    fail_first: usize,
    passes: Arc<AtomicUsize>,
    panic: bool,
}

#[async_trait]
impl Loop for Flaky {
    fn name(&self) -> LoopName {
        self.name
    }
    fn interval(&self) -> Duration {
        Duration::from_millis(20)
    }
    async fn pass(&self, _ctx: &PassContext) -> Result<(), LoopError> {
        let n = self.passes.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            if self.panic {
                panic!("injected panic");
            }
            return Err(format!("injected failure {n} postgres://u:hunter2@db/x").into());
        }
        Ok(())
    }
}

#[sqlx::test]
async fn a_failing_loop_is_restarted_with_backoff(pool: PgPool) {
    let errors = Arc::new(AtomicUsize::new(0));
    let panics = Arc::new(AtomicUsize::new(0));
    let loops: Vec<Arc<dyn Loop>> = vec![
        Arc::new(Flaky {
            name: LoopName::Backups,
            fail_first: 2,
            passes: errors.clone(),
            panic: false,
        }),
        Arc::new(Flaky {
            name: LoopName::Restores,
            fail_first: 1,
            passes: panics.clone(),
            panic: true,
        }),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_loops(
        deps(pool),
        loops,
        false,
        Some(listener),
        shutdown.clone(),
    ));

    // Backoff is 1 s then 2 s: the third pass (the first success) comes after both.
    wait_until(
        Duration::from_secs(10),
        "the flaky loops to recover",
        || async { errors.load(Ordering::SeqCst) >= 3 && panics.load(Ordering::SeqCst) >= 2 },
    )
    .await
    .unwrap();
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("backup_worker_loop_restarts_total{loop=\"backups\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("backup_worker_loop_restarts_total{loop=\"restores\"} 1"));
    let (code, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("hunter2"),
        "secrets must not reach /healthz: {body}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Never finishes a pass and never reports progress.
struct Stuck;

#[async_trait]
impl Loop for Stuck {
    fn name(&self) -> LoopName {
        LoopName::Propagations
    }
    fn interval(&self) -> Duration {
        Duration::from_millis(10)
    }
    fn stall_after(&self) -> Duration {
        Duration::from_millis(300)
    }
    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        ctx.abort.cancelled().await;
        Ok(())
    }
}

#[sqlx::test]
async fn healthz_reports_a_stalled_loop(pool: PgPool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let mut config = test_config(&[("SHUTDOWN_GRACE", "0")]).unwrap();
    config.shutdown_grace = Duration::from_millis(100);
    let deps = test_deps(pool, Arc::new(MemoryStore::new()), config).unwrap();
    let task = tokio::spawn(run_loops(
        deps,
        vec![Arc::new(Stuck)],
        false,
        Some(listener),
        shutdown.clone(),
    ));
    wait_until(Duration::from_secs(5), "/healthz to report the stall", || async {
        matches!(http_get(addr, "/healthz").await, Ok((503, body)) if body.contains("\"propagations\""))
    })
    .await
    .unwrap();
    // Shutdown: the pass ignores the stop signal, so the grace runs out and abort ends it.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("daemon exits after grace + abort window")
        .unwrap()
        .unwrap();
}

#[sqlx::test]
async fn once_runs_one_pass_of_each_selected_loop(pool: PgPool) {
    let a = Arc::new(AtomicUsize::new(0));
    let b = Arc::new(AtomicUsize::new(0));
    let loops: Vec<Arc<dyn Loop>> = vec![
        Arc::new(Flaky {
            name: LoopName::Scheduler,
            fail_first: 0,
            passes: a.clone(),
            panic: false,
        }),
        Arc::new(Flaky {
            name: LoopName::Backups,
            fail_first: 0,
            passes: b.clone(),
            panic: false,
        }),
    ];
    run_loops(
        deps(pool.clone()),
        loops,
        true,
        None,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)), (1, 1));

    // A failing pass is the exit status of --once.
    let failing: Vec<Arc<dyn Loop>> = vec![Arc::new(Flaky {
        name: LoopName::Backups,
        fail_first: 1,
        passes: Arc::new(AtomicUsize::new(0)),
        panic: false,
    })];
    let err = run_loops(deps(pool), failing, true, None, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("backups pass failed"), "{err}");
}

/// Ignores the stop signal; once aborted, takes `release_takes` to "kill its tools, abort its
/// upload and release its row", then records that it did.
struct SlowRelease {
    release_takes: Duration,
    entered: Arc<std::sync::atomic::AtomicBool>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Loop for SlowRelease {
    fn name(&self) -> LoopName {
        LoopName::Backups
    }
    fn interval(&self) -> Duration {
        Duration::from_secs(1)
    }
    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        self.entered.store(true, Ordering::SeqCst);
        ctx.abort.cancelled().await;
        tokio::time::sleep(self.release_takes).await;
        self.released.store(true, Ordering::SeqCst);
        Ok(())
    }
}

async fn shut_down_with(
    pool: PgPool,
    abort_window: Option<&str>,
    release_takes: Duration,
) -> (bool, Duration) {
    let mut env = vec![("SHUTDOWN_GRACE", "0")];
    if let Some(w) = abort_window {
        env.push(("SHUTDOWN_ABORT_WINDOW", w));
    }
    let mut config = test_config(&env).unwrap();
    config.shutdown_grace = Duration::from_millis(100);
    let deps = test_deps(pool, Arc::new(MemoryStore::new()), config).unwrap();
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_loops(
        deps,
        vec![Arc::new(SlowRelease {
            release_takes,
            entered: entered.clone(),
            released: released.clone(),
        })],
        false,
        None,
        shutdown.clone(),
    ));
    wait_until(Duration::from_secs(10), "the job to run", || async {
        entered.load(Ordering::SeqCst)
    })
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the daemon exits")
        .unwrap()
        .unwrap();
    (released.load(Ordering::SeqCst), started.elapsed())
}

/// After the grace, cancelled jobs get SHUTDOWN_ABORT_WINDOW (default 10 s) to release their
/// rows: a release that takes 1.5 s completes (it was dropped at 0.7 s before).
#[sqlx::test]
async fn cancelled_jobs_get_the_abort_window_to_release_their_rows(pool: PgPool) {
    let (released, took) = shut_down_with(pool, None, Duration::from_millis(1500)).await;
    assert!(released, "the release was cut short after {took:?}");
}

/// The window bounds the exit: a job that never finishes releasing is dropped after it.
#[sqlx::test]
async fn the_abort_window_bounds_the_exit(pool: PgPool) {
    let (released, took) = shut_down_with(pool, Some("1"), Duration::from_secs(60)).await;
    assert!(!released);
    assert!(
        took >= Duration::from_millis(1100) && took < Duration::from_secs(5),
        "exited after {took:?}"
    );
}
