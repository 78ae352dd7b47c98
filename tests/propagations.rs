//! Propagations (DESIGN §7) against real Postgres and a real tonic gRPC server on 127.0.0.1:0,
//! scripted per test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backup_worker::health::{Health, Heartbeat};
use backup_worker::loops::propagations::{backoff, PropagationOptions, Propagations};
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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Reply = Result<RegradeResourceResponse, tonic::Status>;
type Script = Box<dyn Fn(&RegradeResourceRequest, usize) -> Reply + Send + Sync>;

/// A provisioner that answers by script and records every request.
struct Fake {
    script: Script,
    seen: Mutex<Vec<RegradeResourceRequest>>,
    calls: AtomicUsize,
    /// Calls that reached the fake (answered or not).
    started: AtomicUsize,
    delay: Duration,
    /// When set, every call waits for a permit before answering.
    gate: Option<Arc<Semaphore>>,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight_per_key: AtomicUsize,
    in_flight_team: Mutex<HashMap<String, usize>>,
    max_in_flight_per_team: AtomicUsize,
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
        let team = req.team_id.clone();
        {
            let mut f = self.in_flight.lock().unwrap();
            let n = f.entry(key.clone()).or_default();
            *n += 1;
            self.max_in_flight_per_key.fetch_max(*n, Ordering::SeqCst);
            let mut t = self.in_flight_team.lock().unwrap();
            let n = t.entry(team.clone()).or_default();
            *n += 1;
            self.max_in_flight_per_team.fetch_max(*n, Ordering::SeqCst);
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        tokio::time::sleep(self.delay).await;
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let reply = (self.script)(&req, call);
        self.seen.lock().unwrap().push(req);
        *self.in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
        *self.in_flight_team.lock().unwrap().get_mut(&team).unwrap() -= 1;
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
    harness_with(pool, delay, script, None, PropagationOptions::default()).await
}

/// A harness whose provisioner holds every call until `gate` has a permit, and whose worker
/// claims with `options`.
async fn harness_with(
    pool: &PgPool,
    delay: Duration,
    script: Script,
    gate: Option<Arc<Semaphore>>,
    options: PropagationOptions,
) -> Harness {
    let fake = Arc::new(Fake {
        script,
        seen: Mutex::default(),
        calls: AtomicUsize::new(0),
        started: AtomicUsize::new(0),
        delay,
        gate,
        in_flight: Mutex::default(),
        max_in_flight_per_key: AtomicUsize::new(0),
        in_flight_team: Mutex::default(),
        max_in_flight_per_team: AtomicUsize::new(0),
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
    let loop_ = Propagations::with_options(
        pool.clone(),
        Arc::new(Plans::load(None).unwrap()),
        metrics.clone(),
        Some(Arc::new(client)),
        options,
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
    propagation_to(pool, kind, team, resource, "pro", attempts).await
}

async fn propagation_to(
    pool: &PgPool,
    kind: &str,
    team: Uuid,
    resource: Option<Uuid>,
    tier: &str,
    attempts: i32,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO pending_propagations (kind, team_id, resource_id, target_tier, attempts)
         VALUES ($1::propagation_kind, $2, $3, $4, $5) RETURNING id",
    )
    .bind(kind)
    .bind(team)
    .bind(resource)
    .bind(tier)
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
    // One row per position of the schedule: a row that has failed n times fails again. One team
    // per row: rows for one resource would supersede each other.
    let mut ids = Vec::new();
    for n in 0..9 {
        let (team, res) = team_with(&pool, 2).await;
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
    // Two teams: the newer of two whole-team rows of one team would supersede the older.
    let (team, _) = team_with(&pool, 1).await;
    let young = propagation(&pool, "tier_shuffle", team, None, 0).await;
    let (team, _) = team_with(&pool, 1).await;
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
    // Ten teams (rows of one team are applied one at a time, the newest superseding the rest).
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (team, _) = team_with(&pool, 2).await;
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
    let url = backup_worker_testkit::database_url(&pool);
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

// ---- Leases, one team at a time, superseding (DESIGN §7 as revised) ----

fn gated() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(0))
}

async fn wait_for_calls(fake: &Fake, n: usize) {
    backup_worker_testkit::wait_until(
        Duration::from_secs(20),
        "the provisioner to receive a call",
        || async { fake.started.load(Ordering::SeqCst) >= n },
    )
    .await
    .unwrap();
}

#[derive(Debug, sqlx::FromRow)]
struct AuditRow {
    kind: String,
    team_id: Option<Uuid>,
    resource_id: Option<Uuid>,
    subject_id: Option<Uuid>,
    detail: serde_json::Value,
}

async fn audit_rows(pool: &PgPool, id: Uuid) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT kind, team_id, resource_id, subject_id, detail FROM audit_log
          WHERE subject_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// (tier, resource_id) of every request the provisioner answered, in order.
fn sent(fake: &Fake) -> Vec<(String, String)> {
    fake.seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.tier.clone(), r.resource_id.clone()))
        .collect()
}

/// While the provisioner holds a call, the row is leased (committed, visible to everyone) but
/// neither locked nor inside an open transaction of the worker.
#[sqlx::test]
async fn no_lock_or_transaction_is_held_during_a_provisioner_call(pool: PgPool) {
    let gate = gated();
    let options = PropagationOptions {
        worker_id: "pod-a".into(),
        ..PropagationOptions::default()
    };
    let h = harness_with(
        &pool,
        Duration::ZERO,
        Box::new(|_, _| ok()),
        Some(gate.clone()),
        options,
    )
    .await;
    let (team, _) = team_with(&pool, 1).await;
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    let worker = h.loop_.clone();
    let pass = tokio::spawn(async move { worker.pass(&ctx()).await });
    wait_for_calls(&h.fake, 1).await;

    // Another session may lock the row at once: nobody holds it.
    let mut tx = pool.begin().await.unwrap();
    let locked: Uuid =
        sqlx::query_scalar("SELECT id FROM pending_propagations WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .expect("the row is not locked during the provisioner call");
    assert_eq!(locked, id);
    tx.rollback().await.unwrap();
    // No session of this database (the worker's pool included) sits in an open transaction.
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(state, '') || ': ' || left(query, 80) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND (state LIKE 'idle in transaction%' OR xact_start IS NOT NULL)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(open.is_empty(), "open transactions: {open:?}");
    // The claim is a committed lease.
    let (leased_by, live, attempts): (Option<String>, bool, i32) = sqlx::query_as(
        "SELECT leased_by, lease_expires_at > now(), attempts FROM pending_propagations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (leased_by.as_deref(), live, attempts),
        (Some("pod-a"), true, 1)
    );

    gate.add_permits(1);
    pass.await.unwrap().unwrap();
    let r = row(&pool, id).await;
    assert!(r.applied && r.attempts == 1, "{r:?}");
    let cleared: bool = sqlx::query_scalar(
        "SELECT leased_by IS NULL AND lease_token IS NULL AND lease_expires_at IS NULL
           FROM pending_propagations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(cleared, "a finished row holds no lease");
}

/// An elevation fails, a demotion is inserted, the elevation comes due again: it is superseded,
/// never sent again, and the provisioner's last word is the demotion's tier.
#[sqlx::test]
async fn a_retried_elevation_after_a_newer_demotion_is_superseded(pool: PgPool) {
    let h = harness(
        &pool,
        Duration::ZERO,
        Box::new(|_, call| {
            if call == 0 {
                Err(tonic::Status::unavailable("provisioner overloaded"))
            } else {
                ok()
            }
        }),
    )
    .await;
    let (team, res) = team_with(&pool, 1).await;
    let elevation = propagation_to(&pool, "tier_elevation", team, None, "pro", 0).await;
    h.loop_.pass(&ctx()).await.unwrap();
    assert_eq!(row(&pool, elevation).await.attempts, 1);

    let demotion = propagation_to(&pool, "tier_demotion", team, None, "hobby", 0).await;
    // The elevation's retry is due now (later than the demotion's next_attempt_at, so a worker
    // ordering by due time alone would apply the elevation last).
    sqlx::query("UPDATE pending_propagations SET next_attempt_at = now() WHERE id = $1")
        .bind(elevation)
        .execute(&pool)
        .await
        .unwrap();
    h.loop_.pass(&ctx()).await.unwrap();

    let e = row(&pool, elevation).await;
    assert!(!e.applied && e.failed && e.attempts == 1, "{e:?}");
    assert_eq!(
        e.last_error.as_deref(),
        Some(format!("superseded by {demotion}").as_str())
    );
    assert_eq!(
        audits(&pool, elevation).await,
        ["propagation.retrying", "propagation.superseded"]
    );
    let d = row(&pool, demotion).await;
    assert!(d.applied && d.attempts == 1, "{d:?}");
    let r0 = res[0].to_string();
    assert_eq!(
        sent(&h.fake),
        [("pro".to_owned(), r0.clone()), ("hobby".to_owned(), r0)],
        "after the demotion, only its tier reaches the provisioner"
    );
    // Later passes never pick the superseded row up again.
    sqlx::query("UPDATE pending_propagations SET next_attempt_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    h.loop_.pass(&ctx()).await.unwrap();
    assert_eq!(h.fake.started.load(Ordering::SeqCst), 2);
}

/// The superseded row's audit entry and the counter, for one-resource rows.
#[sqlx::test]
async fn superseded_rows_are_audited_and_counted(pool: PgPool) {
    let h = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let (team, res) = team_with(&pool, 2).await;
    let (x, y) = (res[0], res[1]);
    let old = propagation_to(&pool, "tier_elevation", team, Some(x), "pro", 0).await;
    let new = propagation_to(&pool, "tier_demotion", team, Some(x), "hobby", 0).await;
    // Another resource's row is independent of both.
    let other = propagation_to(&pool, "tier_elevation", team, Some(y), "pro", 0).await;
    h.loop_.pass(&ctx()).await.unwrap();

    let audit = audit_rows(&pool, old).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let a = &audit[0];
    assert_eq!(a.kind, "propagation.superseded");
    assert_eq!(
        (a.team_id, a.resource_id, a.subject_id),
        (Some(team), Some(x), Some(old))
    );
    assert_eq!(a.detail["superseded_by"], new.to_string());
    assert_eq!(a.detail["kind"], "tier_elevation");
    assert_eq!(a.detail["target_tier"], "pro");
    let o = row(&pool, old).await;
    assert!(o.failed && !o.applied && o.attempts == 0, "{o:?}");
    assert!(row(&pool, new).await.applied);
    assert!(row(&pool, other).await.applied);

    let text = h.metrics.render();
    assert!(
        text.contains("instant_propagation_superseded_total{kind=\"tier_elevation\"} 1"),
        "{text}"
    );
    assert!(text.contains("instant_propagation_superseded_total{kind=\"tier_demotion\"} 0"));
    let mut seen = sent(&h.fake);
    seen.sort();
    let mut want = vec![
        ("hobby".to_owned(), x.to_string()),
        ("pro".to_owned(), y.to_string()),
    ];
    want.sort();
    assert_eq!(
        seen, want,
        "the superseded row never reaches the provisioner"
    );
    // `backup-worker status` tells superseded rows from dead letters.
    let status = backup_worker::commands::status(&pool).await.unwrap();
    assert!(
        status.contains("superseded") && !status.contains("dead_lettered"),
        "{status}"
    );
}

/// A whole-team row and one-resource rows of the same team: an older one-resource row is
/// superseded by a newer whole-team row; an older whole-team row is applied, but never to a
/// resource a newer row covers.
#[sqlx::test]
async fn a_whole_team_row_never_regrades_a_resource_a_newer_row_covers(pool: PgPool) {
    let h = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let (team, res) = team_with(&pool, 2).await;
    let (x, y) = (res[0], res[1]);
    let y_growth = propagation_to(&pool, "tier_elevation", team, Some(y), "growth", 0).await;
    let team_pro = propagation_to(&pool, "tier_elevation", team, None, "pro", 0).await;
    let x_hobby = propagation_to(&pool, "tier_demotion", team, Some(x), "hobby", 0).await;
    h.loop_.pass(&ctx()).await.unwrap();

    let g = row(&pool, y_growth).await;
    assert!(g.failed && !g.applied, "{g:?}");
    assert_eq!(
        g.last_error.as_deref(),
        Some(format!("superseded by {team_pro}").as_str())
    );
    assert!(row(&pool, team_pro).await.applied);
    assert!(row(&pool, x_hobby).await.applied);
    let applied = audit_rows(&pool, team_pro).await;
    assert_eq!(applied[0].kind, "propagation.applied");
    assert_eq!(applied[0].detail["left_to_newer"], serde_json::json!([x]));

    let mut seen = sent(&h.fake);
    seen.sort();
    let mut want = vec![
        ("hobby".to_owned(), x.to_string()),
        ("pro".to_owned(), y.to_string()),
    ];
    want.sort();
    assert_eq!(seen, want, "x never gets the older team-wide tier");
}

/// Two replicas passing at once over rows of one team (distinct resources, none superseded):
/// never two provisioner calls for the team in flight, every row applied once.
#[sqlx::test]
async fn two_replicas_never_regrade_one_team_at_once(pool: PgPool) {
    let h = harness(&pool, Duration::from_millis(100), Box::new(|_, _| ok())).await;
    let second =
        GrpcProvisioner::new(&format!("http://{}", h.addr), Duration::from_secs(5)).unwrap();
    let other = Propagations::with_options(
        pool.clone(),
        Arc::new(Plans::load(None).unwrap()),
        Metrics::new().unwrap(),
        Some(Arc::new(second)),
        PropagationOptions {
            worker_id: "pod-b".into(),
            ..PropagationOptions::default()
        },
    );
    let (team, res) = team_with(&pool, 4).await;
    let mut ids = Vec::new();
    for r in &res {
        ids.push(propagation(&pool, "tier_elevation", team, Some(*r), 0).await);
    }
    // Rounds of concurrent passes until every row is applied (a replica that finds the team
    // busy ends its pass; the holder keeps claiming).
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (a, b) = (h.loop_.clone(), other.clone());
        let (ra, rb) = tokio::join!(async move { a.pass(&ctx()).await }, async move {
            b.pass(&ctx()).await
        });
        ra.unwrap();
        rb.unwrap();
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pending_propagations WHERE applied_at IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{open} rows never applied"
        );
    }
    assert_eq!(h.fake.max_in_flight_per_team.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.calls.load(Ordering::SeqCst), 4);
    for id in &ids {
        let r = row(&pool, *id).await;
        assert!(r.applied && r.attempts == 1, "{r:?}");
    }
}

/// While one replica holds a team, another skips that team's rows and works other teams; the
/// database itself refuses a second lease in the team.
#[sqlx::test]
async fn a_busy_team_is_skipped_and_the_database_refuses_a_second_lease(pool: PgPool) {
    let gate = gated();
    let a = harness_with(
        &pool,
        Duration::ZERO,
        Box::new(|_, _| ok()),
        Some(gate.clone()),
        PropagationOptions::default(),
    )
    .await;
    let b = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let (busy, res) = team_with(&pool, 2).await;
    let first = propagation(&pool, "tier_elevation", busy, Some(res[0]), 0).await;
    let second = propagation(&pool, "tier_elevation", busy, Some(res[1]), 0).await;
    let (free, free_res) = team_with(&pool, 1).await;
    let elsewhere = propagation(&pool, "tier_elevation", free, None, 0).await;

    let worker = a.loop_.clone();
    let pass = tokio::spawn(async move { worker.pass(&ctx()).await });
    wait_for_calls(&a.fake, 1).await;
    // a holds `first` (the oldest due row).
    let holder: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM pending_propagations WHERE lease_token IS NOT NULL AND team_id = $1",
    )
    .bind(busy)
    .fetch_optional(&pool)
    .await
    .unwrap();
    assert_eq!(holder, Some(first));

    b.loop_.pass(&ctx()).await.unwrap();
    assert_eq!(
        sent(&b.fake),
        [("pro".to_owned(), free_res[0].to_string())],
        "b works only the other team"
    );
    assert!(row(&pool, elsewhere).await.applied);
    let s = row(&pool, second).await;
    assert!(!s.applied && s.attempts == 0, "{s:?}");

    let refused = sqlx::query(
        "UPDATE pending_propagations
            SET leased_by = 'intruder', lease_token = gen_random_uuid(),
                lease_expires_at = now() + interval '1 minute'
          WHERE id = $1",
    )
    .bind(second)
    .execute(&pool)
    .await
    .expect_err("a second lease in one team is refused");
    assert!(
        matches!(&refused, sqlx::Error::Database(e) if e.is_unique_violation()),
        "{refused}"
    );

    gate.add_permits(10);
    pass.await.unwrap().unwrap();
    assert!(row(&pool, first).await.applied);
    assert!(row(&pool, second).await.applied);
    assert_eq!(a.fake.max_in_flight_per_team.load(Ordering::SeqCst), 1);
}

/// A worker killed mid-call leaves its lease behind; nobody takes the row while the lease lives,
/// and another replica takes it once it expires (the lost attempt counts).
#[sqlx::test]
async fn a_killed_workers_lease_expires_and_another_replica_takes_the_row(pool: PgPool) {
    let killed = harness_with(
        &pool,
        Duration::ZERO,
        Box::new(|_, _| ok()),
        Some(gated()),
        // A 1 s lease beyond a 3 s call: the row is claimable again 4 s after the last renewal.
        PropagationOptions {
            worker_id: "pod-killed".into(),
            lease: Duration::from_secs(1),
            call_deadline: Duration::from_secs(3),
        },
    )
    .await;
    let survivor = harness(&pool, Duration::ZERO, Box::new(|_, _| ok())).await;
    let (team, _) = team_with(&pool, 1).await;
    let id = propagation(&pool, "tier_demotion", team, None, 0).await;

    let worker = killed.loop_.clone();
    let pass = tokio::spawn(async move { worker.pass(&ctx()).await });
    wait_for_calls(&killed.fake, 1).await;
    pass.abort();
    assert!(pass.await.unwrap_err().is_cancelled());

    // The lease is still live: the survivor leaves the row alone.
    survivor.loop_.pass(&ctx()).await.unwrap();
    let (leased_by, live): (Option<String>, bool) = sqlx::query_as(
        "SELECT leased_by, lease_expires_at > now() FROM pending_propagations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leased_by.as_deref(), Some("pod-killed"));
    if live {
        assert_eq!(survivor.fake.started.load(Ordering::SeqCst), 0);
    }

    // Once it expires, the survivor's next passes take the row.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !row(&pool, id).await.applied {
        assert!(
            tokio::time::Instant::now() < until,
            "the row was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        survivor.loop_.pass(&ctx()).await.unwrap();
    }
    let r = row(&pool, id).await;
    assert_eq!(r.attempts, 2, "the killed attempt counts");
    assert_eq!(
        audits(&pool, id).await,
        ["propagation.retrying", "propagation.applied"]
    );
    let retry = &audit_rows(&pool, id).await[0];
    assert!(
        retry.detail["error"]
            .as_str()
            .unwrap()
            .contains("lease of pod-killed expired"),
        "{:?}",
        retry.detail
    );
    assert_eq!(survivor.fake.calls.load(Ordering::SeqCst), 1);
    assert_eq!(killed.fake.calls.load(Ordering::SeqCst), 0);
}

/// A row with many slow resources: /healthz's heartbeat moves between calls and the lease is
/// renewed, so it never lapses while the worker is busy.
#[sqlx::test]
async fn a_long_row_keeps_the_heartbeat_and_the_lease_alive(pool: PgPool) {
    let h = harness_with(
        &pool,
        Duration::from_millis(200),
        Box::new(|_, _| ok()),
        None,
        // A 2 s lease in all; the row takes about 15 × 200 ms.
        PropagationOptions {
            worker_id: "pod-slow".into(),
            lease: Duration::from_secs(1),
            call_deadline: Duration::from_secs(1),
        },
    )
    .await;
    let (team, _) = team_with(&pool, 15).await;
    let id = propagation(&pool, "tier_elevation", team, None, 0).await;
    let health = Health::new(Metrics::new().unwrap());
    let ctx = PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: health.register("propagations", Duration::from_millis(1500)),
    };
    let worker = h.loop_.clone();
    let pass = tokio::spawn(async move { worker.pass(&ctx).await });
    let mut samples = 0;
    while !pass.is_finished() {
        let (healthy, report) = health.report();
        assert!(healthy, "stalled during a long row: {report:?}");
        let lapsed: Option<bool> = sqlx::query_scalar(
            "SELECT lease_expires_at <= now() FROM pending_propagations
              WHERE id = $1 AND lease_token IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .unwrap();
        assert_ne!(
            lapsed,
            Some(true),
            "the lease lapsed while the row was worked"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pass.await.unwrap().unwrap();
    assert!(samples > 20, "the pass took {samples} samples");
    assert!(row(&pool, id).await.applied);
    assert_eq!(h.fake.calls.load(Ordering::SeqCst), 15);
}

/// Shutdown past the grace: the interrupted attempt is released (not counted) at once.
#[sqlx::test]
async fn an_aborted_attempt_releases_its_row(pool: PgPool) {
    let h = harness_with(
        &pool,
        Duration::ZERO,
        Box::new(|_, _| ok()),
        Some(gated()),
        PropagationOptions::default(),
    )
    .await;
    let (team, _) = team_with(&pool, 1).await;
    let id = propagation(&pool, "tier_elevation", team, None, 3).await;
    let c = ctx();
    let (abort, worker) = (c.abort.clone(), h.loop_.clone());
    let pass = tokio::spawn(async move { worker.pass(&c).await });
    wait_for_calls(&h.fake, 1).await;
    abort.cancel();
    pass.await.unwrap().unwrap();
    let (attempts, leased): (i32, bool) = sqlx::query_as(
        "SELECT attempts, lease_token IS NOT NULL FROM pending_propagations WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((attempts, leased), (3, false));
}
