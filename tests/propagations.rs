//! Propagations (DESIGN §7) against real Postgres and a real tonic gRPC server on 127.0.0.1:0,
//! scripted per test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backup_worker::health::Heartbeat;
use backup_worker::loops::propagations::{backoff, Propagations};
use backup_worker::loops::{Loop, PassContext};
use backup_worker::metrics::Metrics;
use backup_worker::plans::Plans;
use backup_worker::provisioner::pb::provisioner_server::{
    Provisioner as ProvisionerService, ProvisionerServer,
};
use backup_worker::provisioner::{
    GrpcProvisioner, RegradeResourceRequest, RegradeResourceResponse,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Reply = Result<RegradeResourceResponse, tonic::Status>;
type Script = Box<dyn Fn(&RegradeResourceRequest, usize) -> Reply + Send + Sync>;

/// A provisioner that answers by script and records every request.
struct Fake {
    script: Script,
    seen: Mutex<Vec<RegradeResourceRequest>>,
    calls: AtomicUsize,
    delay: Duration,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight_per_key: AtomicUsize,
}

struct Served(Arc<Fake>);

#[tonic::async_trait]
impl ProvisionerService for Served {
    async fn regrade_resource(
        &self,
        request: tonic::Request<RegradeResourceRequest>,
    ) -> Result<tonic::Response<RegradeResourceResponse>, tonic::Status> {
        self.0
            .answer(request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}

impl Fake {
    async fn answer(&self, req: RegradeResourceRequest) -> Reply {
        let key = req.idempotency_key.clone();
        {
            let mut f = self.in_flight.lock().unwrap();
            let n = f.entry(key.clone()).or_default();
            *n += 1;
            self.max_in_flight_per_key.fetch_max(*n, Ordering::SeqCst);
        }
        tokio::time::sleep(self.delay).await;
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let reply = (self.script)(&req, call);
        self.seen.lock().unwrap().push(req);
        *self.in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
        reply
    }
}

fn ok() -> Reply {
    Ok(RegradeResourceResponse {
        applied: true,
        skip_reason: String::new(),
    })
}

fn skip(reason: &str) -> Reply {
    Ok(RegradeResourceResponse {
        applied: false,
        skip_reason: reason.into(),
    })
}

struct Harness {
    addr: std::net::SocketAddr,
    fake: Arc<Fake>,
    loop_: Arc<Propagations>,
    metrics: Metrics,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn harness(pool: &PgPool, delay: Duration, script: Script) -> Harness {
    let fake = Arc::new(Fake {
        script,
        seen: Mutex::default(),
        calls: AtomicUsize::new(0),
        delay,
        in_flight: Mutex::default(),
        max_in_flight_per_key: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = ProvisionerServer::new(Served(fake.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    let metrics = Metrics::new().unwrap();
    let client = GrpcProvisioner::new(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    let loop_ = Propagations::new(
        pool.clone(),
        Arc::new(Plans::load(None).unwrap()),
        metrics.clone(),
        Some(Arc::new(client)),
    );
    Harness {
        addr,
        fake,
        loop_,
        metrics,
        _stop: stop,
    }
}

fn ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("propagations"),
    }
}

async fn team_with(pool: &PgPool, n: usize) -> (Uuid, Vec<Uuid>) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('hobby') RETURNING id")
            .fetch_one(pool)
            .await
            .unwrap();
    let mut res = Vec::new();
    for ty in ["postgres", "redis", "mongodb", "vector"]
        .iter()
        .cycle()
        .take(n)
    {
        res.push(
            sqlx::query_scalar("INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, 'x://') RETURNING id")
                .bind(team)
                .bind(ty)
                .fetch_one(pool)
                .await
                .unwrap(),
        );
    }
    (team, res)
}

async fn propagation(
    pool: &PgPool,
    kind: &str,
    team: Uuid,
    resource: Option<Uuid>,
    attempts: i32,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO pending_propagations (kind, team_id, resource_id, target_tier, attempts)
         VALUES ($1::propagation_kind, $2, $3, 'pro', $4) RETURNING id",
    )
    .bind(kind)
    .bind(team)
    .bind(resource)
    .bind(attempts)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    attempts: i32,
    applied: bool,
    failed: bool,
    /// Seconds from the failed attempt's transaction (its newest audit row shares its now()) to
    /// next_attempt_at: exact, however slow the machine.
    wait_s: f64,
    last_error: Option<String>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT attempts, applied_at IS NOT NULL AS applied, failed_at IS NOT NULL AS failed,
                extract(epoch FROM next_attempt_at - coalesce(
                    (SELECT max(created_at) FROM audit_log WHERE subject_id = p.id), now()
                ))::float8 AS wait_s, last_error
           FROM pending_propagations p WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn audits(pool: &PgPool, id: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn applied_and_allowed_skips_are_success(pool: PgPool) {
    let h = harness(
        &pool,
        Duration::ZERO,
        Box::new(|req, _| {
            if req.resource_type == "redis" {
                skip("already_at_tier")
            } else {
                ok()
            }
        }),
    )
    .await;
    let (team, res) = team_with(&pool, 2).await;
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    h.loop_.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert!(r.applied && !r.failed, "{r:?}");
    assert_eq!(audits(&pool, id).await, ["propagation.applied"]);
    assert!(h
        .metrics
        .render()
        .contains("instant_propagation_applied_total{kind=\"tier_elevation\"} 1"));
    let seen = h.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let pro = Plans::load(None).unwrap().resolve("pro").0.limits.as_map();
    for req in &seen {
        assert_eq!(req.idempotency_key, id.to_string());
        assert_eq!(
            (req.tier.as_str(), req.team_id.clone()),
            ("pro", team.to_string())
        );
        assert_eq!(req.limits, pro);
        assert!(res.iter().any(|r| r.to_string() == req.resource_id));
    }
}

#[sqlx::test]
async fn unexpected_skips_and_errors_retry_on_the_pinned_schedule(pool: PgPool) {
    let h = harness(
        &pool,
        Duration::ZERO,
        Box::new(|req, _| match req.resource_type.as_str() {
            "postgres" => skip("pod_not_found"),
            _ => skip("the moon is in the wrong phase"),
        }),
    )
    .await;
    let (team, res) = team_with(&pool, 2).await;
    // One row per position of the schedule: a row that has failed n times fails again.
    let mut ids = Vec::new();
    for n in 0..9 {
        ids.push((
            n,
            propagation(&pool, "tier_demotion", team, Some(res[(n % 2) as usize]), n).await,
        ));
    }
    h.loop_.pass(&ctx()).await.unwrap();
    for (n, id) in &ids {
        let r = row(&pool, *id).await;
        assert!(!r.applied && !r.failed, "{r:?}");
        assert_eq!(r.attempts, n + 1);
        let want = backoff(n + 1).as_secs_f64();
        assert!(
            (r.wait_s - want).abs() < 1e-6,
            "attempt {}: waits {}s, want {want}s",
            n + 1,
            r.wait_s
        );
        assert!(r.last_error.as_deref().unwrap().contains("unexpected skip"));
        assert_eq!(audits(&pool, *id).await, ["propagation.unexpected_skip"]);
    }
    let text = h.metrics.render();
    assert!(text.contains("instant_propagation_unexpected_skip_total{kind=\"tier_demotion\",resource_type=\"postgres\",skip_reason=\"pod_not_found\"} 5"), "{text}");
    assert!(text.contains("instant_propagation_unexpected_skip_total{kind=\"tier_demotion\",resource_type=\"redis\",skip_reason=\"other\"} 4"));
    assert!(text.contains("instant_propagation_applied_total{kind=\"tier_demotion\"} 0"));
}

#[sqlx::test]
async fn the_tenth_failure_dead_letters(pool: PgPool) {
    let h = harness(
        &pool,
        Duration::ZERO,
        Box::new(|_, _| Err(tonic::Status::unavailable("provisioner overloaded"))),
    )
    .await;
    let (team, _) = team_with(&pool, 1).await;
    let id = propagation(&pool, "tier_elevation", team, None, 9).await;
    h.loop_.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert!(r.failed && !r.applied && r.attempts == 10, "{r:?}");
    assert_eq!(
        audits(&pool, id).await,
        ["propagation.retrying", "propagation.dead_lettered"]
    );
    assert!(h.metrics.render().contains("instant_propagation_dead_lettered_total{kind=\"tier_elevation\",reason=\"max_attempts\"} 1"));
    // Dead rows are never picked again.
    h.loop_.pass(&ctx()).await.unwrap();
    assert_eq!(row(&pool, id).await.attempts, 10);
}

#[sqlx::test]
async fn unknown_kinds_retry_then_dead_letter_as_unknown_kind(pool: PgPool) {
    let h = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    // A newer API adds a kind this worker has no handler for.
    sqlx::query("ALTER TYPE propagation_kind ADD VALUE 'tier_shuffle'")
        .execute(&pool)
        .await
        .unwrap();
    let (team, _) = team_with(&pool, 1).await;
    let young = propagation(&pool, "tier_shuffle", team, None, 0).await;
    let old = propagation(&pool, "tier_shuffle", team, None, 9).await;
    let clock = "SELECT clock_timestamp()";
    let before: DateTime<Utc> = sqlx::query_scalar(clock).fetch_one(&pool).await.unwrap();
    h.loop_.pass(&ctx()).await.unwrap();
    let after: DateTime<Utc> = sqlx::query_scalar(clock).fetch_one(&pool).await.unwrap();
    let r = row(&pool, young).await;
    assert!(!r.applied && !r.failed && r.attempts == 1, "{r:?}");
    // A retry below the ceiling writes no audit row: bound next_attempt_at by the pass instead.
    let next: DateTime<Utc> =
        sqlx::query_scalar("SELECT next_attempt_at FROM pending_propagations WHERE id = $1")
            .bind(young)
            .fetch_one(&pool)
            .await
            .unwrap();
    let minute = chrono::Duration::seconds(60);
    assert!(
        before + minute <= next && next <= after + minute,
        "{next} not in [{before}, {after}] + 1 min"
    );
    let r = row(&pool, old).await;
    assert!(r.failed && r.attempts == 10, "{r:?}");
    assert_eq!(
        audits(&pool, old).await,
        ["propagation.unknown_kind_dead_lettered"]
    );
    let text = h.metrics.render();
    assert!(
        text.contains("instant_propagation_unknown_kind_total{kind=\"unknown_kind\"} 2"),
        "{text}"
    );
    assert!(text.contains(
        "instant_propagation_dead_lettered_total{kind=\"unknown_kind\",reason=\"unknown_kind\"} 1"
    ));
    assert!(!text.contains("tier_shuffle"), "label values stay bounded");
    assert_eq!(h.fake.calls.load(Ordering::SeqCst), 0);
}

#[sqlx::test]
async fn every_kind_in_the_schema_has_a_handler(pool: PgPool) {
    let h = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT unnest(enum_range(NULL::propagation_kind))::text ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!kinds.is_empty());
    assert_eq!(h.loop_.handled_kinds(), kinds);
}

#[sqlx::test]
async fn a_partial_failure_retries_the_whole_row_with_the_same_key(pool: PgPool) {
    let failing = Arc::new(Mutex::new(None::<String>));
    let f = failing.clone();
    let h = harness(
        &pool,
        Duration::ZERO,
        Box::new(move |req, _| {
            if f.lock().unwrap().as_deref() == Some(req.resource_id.as_str()) {
                Err(tonic::Status::internal("namespace busy"))
            } else {
                ok()
            }
        }),
    )
    .await;
    let (team, res) = team_with(&pool, 3).await;
    *failing.lock().unwrap() = Some(res[1].to_string());
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    h.loop_.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert!(!r.applied && r.attempts == 1, "{r:?}");
    assert_eq!(audits(&pool, id).await, ["propagation.retrying"]);

    *failing.lock().unwrap() = None;
    sqlx::query("UPDATE pending_propagations SET next_attempt_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    h.loop_.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert!(r.applied && r.attempts == 2, "{r:?}");
    let seen = h.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "all three resources, twice");
    assert!(seen.iter().all(|s| s.idempotency_key == id.to_string()));
}

#[sqlx::test]
async fn two_workers_never_process_one_row_at_once(pool: PgPool) {
    let h = harness(&pool, Duration::from_millis(50), Box::new(|_, _| ok())).await;
    // A second worker: its own client and registry, the same database and provisioner.
    let second =
        GrpcProvisioner::new(&format!("http://{}", h.addr), Duration::from_secs(5)).unwrap();
    let other = Propagations::new(
        pool.clone(),
        Arc::new(Plans::load(None).unwrap()),
        Metrics::new().unwrap(),
        Some(Arc::new(second)),
    );
    let (team, _) = team_with(&pool, 2).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(propagation(&pool, "tier_elevation", team, None, 0).await);
    }
    let a = h.loop_.clone();
    let b = other;
    let (ra, rb) = tokio::join!(async move { a.pass(&ctx()).await }, async move {
        b.pass(&ctx()).await
    });
    ra.unwrap();
    rb.unwrap();
    for id in &ids {
        let r = row(&pool, *id).await;
        assert!(r.applied && r.attempts == 1, "{r:?}");
        assert_eq!(audits(&pool, *id).await, ["propagation.applied"]);
    }
    assert_eq!(h.fake.max_in_flight_per_key.load(Ordering::SeqCst), 1);
    assert_eq!(
        h.fake.calls.load(Ordering::SeqCst),
        20,
        "each row's two resources exactly once"
    );
}

#[sqlx::test]
async fn without_a_provisioner_rows_wait_and_are_counted(pool: PgPool) {
    let metrics = Metrics::new().unwrap();
    let p = Propagations::new(
        pool.clone(),
        Arc::new(Plans::load(None).unwrap()),
        metrics.clone(),
        None,
    );
    let (team, _) = team_with(&pool, 1).await;
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    propagation(&pool, "tier_demotion", team, None, 0).await;
    p.pass(&ctx()).await.unwrap();
    let r = row(&pool, id).await;
    assert!(!r.applied && r.attempts == 0);
    assert!(metrics
        .render()
        .contains("backup_worker_propagations_waiting 2"));
    assert!(p.handled_kinds().is_empty());
}

/// The way the platform runs it: rows in the table, the binary with `run --only propagations
/// --once` and PROVISIONER_ADDR written gRPC-style as a bare host:port.
#[sqlx::test]
async fn the_binary_applies_rows_through_a_host_port_provisioner_addr(pool: PgPool) {
    let h = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let (team, res) = team_with(&pool, 2).await;
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    let url = backup_worker::testkit::database_url(&pool);
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"));
    for v in backup_worker::config::ENV_VARS {
        cmd.env_remove(v);
    }
    let out = cmd
        .env("DATABASE_URL", url.as_str())
        .env("PROVISIONER_ADDR", h.addr.to_string())
        .env("LOG_FORMAT", "json")
        .args(["run", "--only", "propagations", "--once"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = row(&pool, id).await;
    assert!(r.applied && !r.failed, "{r:?} {stderr}");
    let seen = h.fake.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), res.len());
    assert_eq!(audits(&pool, id).await, ["propagation.applied"]);
}
