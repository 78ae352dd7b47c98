//! Fleet scale (issue 25) on a real Postgres: every claim is an index scan that stops at the first
//! row it can lock, whatever the queue's length (EXPLAIN ANALYZE, not a timing); the verifier's
//! enqueue and gauge read only due (or overdue) resources through `resource_verify_marks`; and the
//! marks, kept by triggers, agree with the per-resource definitions they replace (the old queries
//! are the oracle) through random histories, concurrent transactions, deletes and retention.

use backup_worker::jobs::{Claimer, JobTable};
use backup_worker::loops::copies::Copies;
use backup_worker::loops::{backups, restores, verifier};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// Rows in each queue: enough that a sort of the oldest cohort would show in the plan.
const QUEUE: i64 = 20_000;
/// Rows another claimer holds locked while the plan is measured.
const HELD: i64 = 25;

/// Every plan node, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            nodes(c, out);
        }
    }
}

/// EXPLAIN (ANALYZE, FORMAT JSON) of `sql` in a transaction that is rolled back.
async fn explain(conn: &mut PgConnection, sql: &str, binds: &[f64]) -> Vec<Value> {
    let mut tx = conn.begin().await.unwrap();
    let text = format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}");
    let mut q = sqlx::query_scalar::<_, Value>(&text);
    for b in binds {
        q = q.bind(*b);
    }
    let plan = q.fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let mut all = Vec::new();
    nodes(&plan[0]["Plan"], &mut all);
    all
}

/// One team of `QUEUE` resources, each with a succeeded backup; returns the team.
async fn fleet(pool: &PgPool) -> Uuid {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(pool)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         SELECT $1, 'postgres', 'postgres://tenant@db/app' FROM generate_series(1, $2)",
    )
    .bind(team)
    .bind(QUEUE)
    .execute(pool)
    .await
    .unwrap();
    team
}

/// Asserts the claim plan reads the job table `alias x` through an index, sorts nothing, and
/// stops right after the held rows (SKIP LOCKED skips them; the next row is the claim).
fn assert_claim_plan(what: &str, plan: &[Value]) {
    let kinds: Vec<&str> = plan
        .iter()
        .filter_map(|n| n["Node Type"].as_str())
        .collect();
    assert!(
        !kinds.iter().any(|k| k.contains("Sort")),
        "{what}: the claim sorts: {kinds:?}"
    );
    let scan = plan
        .iter()
        .find(|n| n["Alias"] == "x")
        .unwrap_or_else(|| panic!("{what}: no scan of the job table in {kinds:?}"));
    let kind = scan["Node Type"].as_str().unwrap_or_default();
    assert!(
        kind == "Index Scan" || kind == "Index Only Scan",
        "{what}: the job table is read by a {kind}, not an index scan"
    );
    let rows = scan["Actual Rows"].as_f64().unwrap_or(f64::MAX)
        * scan["Actual Loops"].as_f64().unwrap_or(1.0);
    assert!(
        rows <= (HELD + 2) as f64,
        "{what}: the claim read {rows} rows of a {QUEUE}-row queue with {HELD} held"
    );
    assert_eq!(plan[0]["Actual Rows"], 1, "{what}: the claim found no row");
}

/// Holds the first `HELD` rows of `order` locked in another transaction (other replicas' claims
/// in flight) while `sql` is explained.
async fn plan_with_held_rows(pool: &PgPool, table: &str, order: &str, sql: &str) -> Vec<Value> {
    let mut other = pool.acquire().await.unwrap().detach();
    let mut held = other.begin().await.unwrap();
    let locked: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT x.id FROM {table} x WHERE x.status = 'pending' ORDER BY {order} LIMIT $1 FOR UPDATE"
    ))
    .bind(HELD)
    .fetch_all(&mut *held)
    .await
    .unwrap();
    assert_eq!(locked.len() as i64, HELD);
    let mut conn = pool.acquire().await.unwrap();
    let plan = explain(&mut conn, sql, &[]).await;
    held.rollback().await.unwrap();
    plan
}

#[sqlx::test]
async fn every_claim_is_an_index_scan_that_stops_at_the_first_unlocked_row(pool: PgPool) {
    let team = fleet(&pool).await;
    // One cohort: a scheduler tick stamps every row with the same run_after and created_at.
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, run_after, created_at)
         SELECT id, 'scheduled', now() - interval '1 minute', now() - interval '1 minute'
           FROM resources WHERE team_id = $1",
    )
    .bind(team)
    .execute(&pool)
    .await
    .unwrap();
    // Restores, verifications and copies of other rows (the FKs want a backup to point at).
    let backup: Uuid = sqlx::query_scalar("SELECT id FROM resource_backups LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO resource_restores (resource_id, backup_id, run_after, created_at)
         SELECT id, $2, now() - interval '1 minute', now() - interval '1 minute'
           FROM resources WHERE team_id = $1",
    )
    .bind(team)
    .bind(backup)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO backup_verifications (backup_id, resource_id, team_rank, previous_at, run_after, created_at)
         SELECT $2, id, 1, NULL, now() - interval '1 minute', now() - interval '1 minute'
           FROM resources WHERE team_id = $1",
    )
    .bind(team)
    .bind(backup)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO backup_copies (backup_id, resource_id, destination, run_after, created_at)
         SELECT b.id, b.resource_id, 'copy', now() - interval '1 minute', now() - interval '1 minute'
           FROM resource_backups b",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();

    let queues = [
        ("backups", JobTable::Backups, backups::CLAIM_ORDER),
        ("restores", JobTable::Restores, restores::CLAIM_ORDER),
        (
            "verifications",
            JobTable::Verifications,
            verifier::CLAIM_ORDER,
        ),
    ];
    for (what, table, order) in queues {
        let sql = Claimer::new(table).candidates(order);
        let plan = plan_with_held_rows(&pool, table.table(), order, &sql).await;
        assert_claim_plan(what, &plan);
    }
    let plan = plan_with_held_rows(
        &pool,
        "backup_copies",
        "x.run_after, x.created_at",
        &Copies::candidates(),
    )
    .await;
    assert_claim_plan("copies", &plan);
}

/// The verifier's definitions before the marks, per resource with lateral probes: the oracle.
const ORACLE_DUE: &str = "
    SELECT r.id, n.id
      FROM resources r
      CROSS JOIN LATERAL (
            SELECT b.id, b.verify_status FROM resource_backups b
             WHERE b.resource_id = r.id AND b.status = 'succeeded'
             ORDER BY b.finished_at DESC NULLS LAST LIMIT 1) n
      LEFT JOIN LATERAL (
            SELECT x.status, x.started_at, x.finished_at, x.backup_id
              FROM backup_verifications x
             WHERE x.resource_id = r.id
             ORDER BY x.started_at DESC LIMIT 1) v ON true
     WHERE r.status <> 'deleted'
       AND n.verify_status IS DISTINCT FROM 'failed'
       AND (v.status IS NULL
            OR (v.status = 'verified' AND v.started_at <= now() - make_interval(secs => $1))
            OR (v.status = 'failed'
                AND (v.backup_id <> n.id OR v.finished_at <= now() - interval '1 hour')))
     ORDER BY 1";

const ORACLE_UNVERIFIED: &str = "
    SELECT count(*)
      FROM resources r
      CROSS JOIN LATERAL (
            SELECT b.verify_status, b.finished_at FROM resource_backups b
             WHERE b.resource_id = r.id AND b.status = 'succeeded'
             ORDER BY b.finished_at DESC NULLS LAST LIMIT 1) n
     WHERE r.status <> 'deleted'
       AND (n.verify_status = 'failed'
            OR (n.finished_at < now() - interval '1 hour'
                AND NOT EXISTS (
                      SELECT 1 FROM backup_verifications v
                       WHERE v.resource_id = r.id AND v.status = 'verified'
                         AND v.started_at > now() - make_interval(secs => $1) - interval '1 hour')))";

/// What the enqueue reads as due.
fn marks_due() -> String {
    format!(
        "SELECT resource_id, backup_id FROM ({}) d ORDER BY 1",
        verifier::DUE_SQL
    )
}

const ORACLE_UNPROTECTED: &str = "
    SELECT count(*) FROM resource_backups b
     WHERE b.status = 'succeeded' AND b.finished_at < now() - interval '1 hour'
       AND NOT EXISTS (SELECT 1 FROM backup_copies c
                        WHERE c.backup_id = b.id AND c.destination = 'copy' AND c.status = 'succeeded')";

const MARKS_UNPROTECTED: &str = "
    SELECT count(*) FROM resource_backups b
     WHERE b.status = 'succeeded' AND b.copy_status IS DISTINCT FROM 'succeeded'
       AND b.finished_at < now() - interval '1 hour'";

const EVERY: f64 = 7.0 * 86400.0;

/// A seeded xorshift: the same history on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn assert_marks_agree(pool: &PgPool, step: &str) {
    let oracle: Vec<(Uuid, Uuid)> = sqlx::query_as(ORACLE_DUE)
        .bind(EVERY)
        .fetch_all(pool)
        .await
        .unwrap();
    let marks: Vec<(Uuid, Uuid)> = sqlx::query_as(&marks_due())
        .bind(EVERY)
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(marks, oracle, "due resources after {step}");
    let oracle: i64 = sqlx::query_scalar(ORACLE_UNVERIFIED)
        .bind(EVERY)
        .fetch_one(pool)
        .await
        .unwrap();
    let mut verifier_gauge = pool.acquire().await.unwrap();
    let marks: i64 = sqlx::query_scalar(verifier::UNVERIFIED_SQL)
        .bind(EVERY)
        .fetch_one(&mut *verifier_gauge)
        .await
        .unwrap();
    assert_eq!(marks, oracle, "unverified gauge after {step}");
    let oracle: i64 = sqlx::query_scalar(ORACLE_UNPROTECTED)
        .fetch_one(pool)
        .await
        .unwrap();
    let marks: i64 = sqlx::query_scalar(MARKS_UNPROTECTED)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(marks, oracle, "unprotected backups after {step}");
}

/// A random history of what the API, the backups loop, the verifier, retention and the copies
/// loop do to a handful of resources; after every step the marks agree with the oracle.
#[sqlx::test]
async fn marks_agree_with_the_per_resource_definitions_through_random_histories(pool: PgPool) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut resources = Vec::new();
    for _ in 0..6 {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO resources (team_id, resource_type, connection_url)
             VALUES ($1, 'postgres', 'postgres://tenant@db/app') RETURNING id",
        )
        .bind(team)
        .fetch_one(&pool)
        .await
        .unwrap();
        resources.push(id);
    }
    let mut rng = Rng(0x2025_1206);
    assert_marks_agree(&pool, "start").await;
    for step in 0..400 {
        let r = resources[rng.below(resources.len())];
        // Times spread over two weeks around now, so every rule's window is crossed.
        let hours = -(rng.below(400) as f64) - 0.5;
        let op = rng.below(13);
        let sql: &str = match op {
            0 | 1 => "INSERT INTO resource_backups (resource_id, status, finished_at, object_key, sha256, size_bytes)
                      VALUES ($1, 'succeeded', now() + $2 * interval '1 hour', 'k/' || gen_random_uuid(), 'x', 1)",
            2 => "UPDATE resource_backups SET status = 'succeeded', finished_at = now() + $2 * interval '1 hour',
                          object_key = 'k/' || id, sha256 = 'x', size_bytes = 1
                   WHERE id = (SELECT id FROM resource_backups WHERE resource_id = $1 AND status = 'pending' LIMIT 1)",
            3 => "INSERT INTO resource_backups (resource_id) SELECT $1 WHERE $2 < 1",
            // retention
            4 => "UPDATE resource_backups SET status = 'expired'
                   WHERE id = (SELECT id FROM resource_backups WHERE resource_id = $1 AND status = 'succeeded'
                                ORDER BY random() LIMIT 1) AND $2 < 1",
            5 => "UPDATE resource_backups SET verify_status = CASE WHEN $2 < -200 THEN 'failed' ELSE 'verified' END
                   WHERE id = (SELECT id FROM resource_backups WHERE resource_id = $1 AND status = 'succeeded'
                                ORDER BY random() LIMIT 1)",
            // the verifier: enqueue, claim, finish
            6 => "INSERT INTO backup_verifications (backup_id, resource_id, started_at)
                  SELECT b.id, b.resource_id, now() + $2 * interval '1 hour' FROM resource_backups b
                   WHERE b.resource_id = $1 AND b.status = 'succeeded' ORDER BY random() LIMIT 1
                  ON CONFLICT (resource_id) WHERE status IN ('pending', 'running') DO NOTHING",
            7 => "UPDATE backup_verifications SET status = 'running', started_at = now() + $2 * interval '1 hour'
                   WHERE resource_id = $1 AND status = 'pending'",
            8 => "UPDATE backup_verifications
                     SET status = CASE WHEN $2 < -200 THEN 'failed' ELSE 'verified' END,
                         finished_at = started_at + interval '5 minutes'
                   WHERE resource_id = $1 AND status IN ('pending', 'running')",
            // the API deletes rows; the resource is deleted or comes back
            9 => "DELETE FROM resource_backups
                   WHERE id = (SELECT id FROM resource_backups WHERE resource_id = $1 ORDER BY random() LIMIT 1)
                     AND NOT EXISTS (SELECT 1 FROM resource_restores x WHERE x.backup_id = resource_backups.id)
                     AND $2 < 1",
            10 => "UPDATE resources SET status = CASE WHEN $2 < -300 THEN 'deleted' ELSE 'active' END WHERE id = $1",
            // copies: enqueue, finish, delete
            11 => "INSERT INTO backup_copies (backup_id, resource_id, destination,
                                              status)
                   SELECT b.id, b.resource_id, 'copy', CASE WHEN $2 < -200 THEN 'succeeded' ELSE 'pending' END
                     FROM resource_backups b WHERE b.resource_id = $1 AND b.status = 'succeeded'
                   ON CONFLICT DO NOTHING",
            _ => "UPDATE backup_copies SET status = CASE WHEN $2 < -300 THEN 'failed' ELSE 'succeeded' END
                   WHERE id = (SELECT id FROM backup_copies WHERE resource_id = $1 ORDER BY random() LIMIT 1)",
        };
        sqlx::query(sql)
            .bind(r)
            .bind(hours)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("step {step} op {op}: {e}"));
        assert_marks_agree(&pool, &format!("step {step} (op {op})")).await;
    }
    // Bulk statements: a retention run expiring many rows at once, a bulk delete of verifications.
    sqlx::query("UPDATE resource_backups SET status = 'expired' WHERE status = 'succeeded' AND finished_at < now() - interval '200 hours'")
        .execute(&pool)
        .await
        .unwrap();
    assert_marks_agree(&pool, "bulk expiry").await;
    sqlx::query("DELETE FROM backup_verifications WHERE status = 'verified'")
        .execute(&pool)
        .await
        .unwrap();
    assert_marks_agree(&pool, "bulk delete of verifications").await;
}

/// Two transactions change one resource at once (a backup succeeds while a verification of its
/// previous backup finishes): whichever recomputes second does so after the first committed, so
/// the mark holds both.
#[sqlx::test]
async fn concurrent_changes_to_one_resource_leave_a_mark_with_both(pool: PgPool) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    let r: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         VALUES ($1, 'postgres', 'postgres://tenant@db/app') RETURNING id",
    )
    .bind(team)
    .fetch_one(&pool)
    .await
    .unwrap();
    let old: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, status, finished_at, object_key, sha256, size_bytes)
         VALUES ($1, 'succeeded', now() - interval '9 days', 'k/old', 'x', 1) RETURNING id",
    )
    .bind(r)
    .fetch_one(&pool)
    .await
    .unwrap();
    let pending: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, status) VALUES ($1, 'pending') RETURNING id",
    )
    .bind(r)
    .fetch_one(&pool)
    .await
    .unwrap();
    let verification: Uuid = sqlx::query_scalar(
        "INSERT INTO backup_verifications (backup_id, resource_id, status, started_at)
         VALUES ($1, $2, 'running', now() - interval '8 days') RETURNING id",
    )
    .bind(old)
    .bind(r)
    .fetch_one(&pool)
    .await
    .unwrap();

    let url = backup_worker_testkit::database_url(&pool);
    for backup_first in [true, false] {
        let mut a = PgConnection::connect(&url).await.unwrap();
        let mut ta = a.begin().await.unwrap();
        let backup = "UPDATE resource_backups SET status = 'succeeded', finished_at = now() - interval '2 hours',
                             object_key = 'k/new', sha256 = 'x', size_bytes = 1 WHERE id = $1";
        let verify = "UPDATE backup_verifications SET status = 'verified', finished_at = now() WHERE id = $1";
        let (first, second, first_id, second_id) = if backup_first {
            (backup, verify, pending, verification)
        } else {
            (verify, backup, verification, pending)
        };
        sqlx::query(first)
            .bind(first_id)
            .execute(&mut *ta)
            .await
            .unwrap();
        // The second blocks on the mark the first holds; commit the first while it waits.
        let second_url = url.clone();
        let waiting = tokio::spawn(async move {
            let mut b = PgConnection::connect(&second_url).await.unwrap();
            let mut tb = b.begin().await.unwrap();
            sqlx::query(second)
                .bind(second_id)
                .execute(&mut *tb)
                .await
                .unwrap();
            tb.commit().await.unwrap();
        });
        backup_worker_testkit::wait_until(std::time::Duration::from_secs(10), "the second to wait", || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting > 0
        })
        .await
        .unwrap();
        ta.commit().await.unwrap();
        waiting.await.unwrap();
        let (backup_id, last_status, passed): (Option<Uuid>, Option<String>, bool) = sqlx::query_as(
            "SELECT backup_id, last_status, passed_at > '-infinity' FROM resource_verify_marks WHERE resource_id = $1",
        )
        .bind(r)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            backup_id,
            Some(pending),
            "newest backup (backup first: {backup_first})"
        );
        assert_eq!(
            last_status.as_deref(),
            Some("verified"),
            "verification (backup first: {backup_first})"
        );
        assert!(passed);
        assert_marks_agree(&pool, "concurrent changes").await;
        // Back to where it was for the other order.
        sqlx::query(
            "UPDATE resource_backups SET status = 'pending', finished_at = NULL WHERE id = $1",
        )
        .bind(pending)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE backup_verifications SET status = 'running', finished_at = NULL WHERE id = $1",
        )
        .bind(verification)
        .execute(&pool)
        .await
        .unwrap();
    }
}

/// The enqueue and the gauge with nothing due read no resource: their scans return only the
/// due (here none) whatever the fleet's size.
#[sqlx::test]
async fn verifier_enqueue_and_gauge_read_only_the_due(pool: PgPool) {
    let team = fleet(&pool).await;
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, status, finished_at, object_key, sha256, size_bytes)
         SELECT id, 'succeeded', now() - interval '2 days', 'k/' || id, 'x', 1 FROM resources WHERE team_id = $1",
    )
    .bind(team)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO backup_verifications (backup_id, resource_id, status, started_at, finished_at)
         SELECT id, resource_id, 'verified', now() - interval '1 day', now() - interval '1 day'
           FROM resource_backups",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Five are due: their verification is older than VERIFY_EVERY.
    sqlx::query(
        "UPDATE backup_verifications SET started_at = now() - interval '8 days'
          WHERE id IN (SELECT id FROM backup_verifications LIMIT 5)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for (what, sql, binds) in [
        ("enqueue", verifier::DUE_SQL, vec![EVERY]),
        ("gauge", verifier::UNVERIFIED_SQL, vec![EVERY]),
    ] {
        let plan = explain(&mut conn, sql, &binds).await;
        for n in &plan {
            let kind = n["Node Type"].as_str().unwrap_or_default();
            assert!(
                !kind.contains("Seq Scan") && !kind.contains("Bitmap"),
                "{what}: a {kind} on {:?}",
                n["Relation Name"]
            );
            if n["Relation Name"].is_string() {
                let rows = n["Actual Rows"].as_f64().unwrap_or(0.0)
                    * n["Actual Loops"].as_f64().unwrap_or(1.0);
                assert!(
                    rows <= 10.0,
                    "{what}: {rows} rows of {:?} read for 5 due",
                    n["Relation Name"]
                );
            }
        }
    }
    let due: Vec<(Uuid, Uuid)> = sqlx::query_as(&marks_due())
        .bind(EVERY)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(due.len(), 5);
    assert_marks_agree(&pool, "fleet").await;
}
