//! Scheduler (DESIGN §4) against a real Postgres, with the tick's time passed in so every hour of
//! the day is visited.

use std::sync::Arc;
use std::time::Duration;

use backup_worker::loops::scheduler::{slot_hour, Scheduler, TickReport};
use backup_worker::metrics::Metrics;
use backup_worker::plans::Plans;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
}

fn scheduler(pool: &PgPool) -> (Scheduler, Metrics) {
    scheduler_with(pool, Plans::load(None).unwrap())
}

fn scheduler_with(pool: &PgPool, plans: Plans) -> (Scheduler, Metrics) {
    let metrics = Metrics::new().unwrap();
    (
        Scheduler::new(
            pool.clone(),
            Arc::new(plans),
            metrics.clone(),
            Duration::from_secs(60),
        ),
        metrics,
    )
}

async fn team(pool: &PgPool, tier: &str) -> Uuid {
    team_with_id(pool, Uuid::new_v4(), tier).await
}

async fn team_with_id(pool: &PgPool, id: Uuid, tier: &str) -> Uuid {
    sqlx::query("INSERT INTO teams (id, plan_tier) VALUES ($1, $2)")
        .bind(id)
        .bind(tier)
        .execute(pool)
        .await
        .unwrap();
    id
}

async fn resource(pool: &PgPool, team: Uuid, resource_type: &str, status: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url, status, created_at)
         VALUES ($1, $2, 'postgres://u:p@h/db', $3, '2026-01-01') RETURNING id",
    )
    .bind(team)
    .bind(resource_type)
    .bind(status)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn succeeded_backup(pool: &PgPool, resource: Uuid, when: DateTime<Utc>) {
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, status, created_at, started_at, finished_at,
                                       object_key, sha256, size_bytes)
         VALUES ($1, 'scheduled', 'succeeded', $2, $2, $2, 'k', 'x', 1)",
    )
    .bind(resource)
    .bind(when)
    .execute(pool)
    .await
    .unwrap();
}

/// Pending scheduled rows per resource.
async fn pending(pool: &PgPool, resource: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups
          WHERE resource_id = $1 AND kind = 'scheduled' AND status = 'pending'",
    )
    .bind(resource)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What a backup worker would do: every pending row succeeds at `when`.
async fn complete_all(pool: &PgPool, when: DateTime<Utc>) {
    sqlx::query(
        "UPDATE resource_backups SET status = 'succeeded', finished_at = $1, object_key = 'k',
                sha256 = 'x', size_bytes = 1 WHERE status = 'pending'",
    )
    .bind(when)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn hourly_tiers_are_due_every_hour_and_the_rest_never(pool: PgPool) {
    let (s, metrics) = scheduler(&pool);
    let mut hourly = Vec::new();
    for tier in ["pro", "growth", "team", "pro_yearly"] {
        let t = team(&pool, tier).await;
        for ty in ["postgres", "vector", "mongodb", "redis"] {
            hourly.push(resource(&pool, t, ty, "active").await);
        }
    }
    let mut never = Vec::new();
    for tier in ["free", "anonymous", "free_yearly"] {
        let t = team(&pool, tier).await;
        never.push(resource(&pool, t, "postgres", "active").await);
    }
    let pro = team(&pool, "pro").await;
    never.push(resource(&pool, pro, "postgres", "paused").await);
    never.push(resource(&pool, pro, "postgres", "deleted").await);
    never.push(resource(&pool, pro, "mysql", "active").await);

    for hour in 0..24 {
        let report = s.tick(at(22, hour)).await.unwrap();
        assert_eq!(report.total(), hourly.len() as u64, "hour {hour}");
        for r in &hourly {
            assert_eq!(pending(&pool, *r).await, 1, "hour {hour}");
        }
        for r in &never {
            assert_eq!(pending(&pool, *r).await, 0, "hour {hour}");
        }
        // A second tick in the same hour adds nothing.
        assert_eq!(s.tick(at(22, hour)).await.unwrap().total(), 0);
        complete_all(&pool, at(22, hour)).await;
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM resource_backups")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(total, 24 * hourly.len() as i64);
    let text = metrics.render();
    assert!(
        text.contains("instant_customer_backup_scheduled_total{resource_type=\"postgres\"} 96"),
        "{text}"
    );
}

#[sqlx::test]
async fn retention_zero_vetoes_backups(pool: PgPool) {
    let yaml = backup_worker::plans::EMBEDDED_PLANS.replace(
        "tiers:\n",
        "tiers:\n  archive: { rpo_minutes: 60, backup_retention_days: 0, backup_keep_last: 1, limits: { connections: 1, memory_mb: 1, storage_mb: 1 } }\n",
    );
    let (s, _) = scheduler_with(&pool, Plans::from_yaml(&yaml, "test").unwrap());
    let t = team(&pool, "archive").await;
    let r = resource(&pool, t, "postgres", "active").await;
    for hour in 0..24 {
        s.tick(at(22, hour)).await.unwrap();
    }
    assert_eq!(pending(&pool, r).await, 0);
}

#[sqlx::test]
async fn daily_tiers_back_up_only_in_their_slot_hour(pool: PgPool) {
    let (s, _) = scheduler(&pool);
    let mut teams = Vec::new();
    for tier in ["hobby", "hobby_plus", "hobby_yearly"] {
        let t = team(&pool, tier).await;
        let r = resource(&pool, t, "postgres", "active").await;
        // Backed up yesterday in its slot, as a healthy daily resource is.
        succeeded_backup(&pool, r, at(21, slot_hour(t))).await;
        teams.push((t, r));
    }
    for day in [22, 23] {
        for hour in 0..24 {
            s.tick(at(day, hour)).await.unwrap();
            for (t, r) in &teams {
                let expected = i64::from(hour == slot_hour(*t));
                assert_eq!(
                    pending(&pool, *r).await,
                    expected,
                    "day {day} hour {hour} slot {}",
                    slot_hour(*t)
                );
            }
            complete_all(&pool, at(day, hour)).await;
        }
    }
    for (_, r) in &teams {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM resource_backups WHERE resource_id = $1")
                .bind(r)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(n, 3, "yesterday's plus one per day");
    }
}

#[sqlx::test]
async fn daily_tiers_catch_up_after_downtime_regardless_of_slot(pool: PgPool) {
    let (s, _) = scheduler(&pool);
    let t = team(&pool, "hobby").await;
    let slot = slot_hour(t);
    let now_hour = (slot + 12) % 24;
    let now = at(22, now_hour);
    let down = resource(&pool, t, "redis", "active").await;
    succeeded_backup(&pool, down, now - chrono::Duration::hours(30)).await;
    let never_backed_up = resource(&pool, t, "mongodb", "active").await;
    let fresh = resource(&pool, t, "postgres", "active").await;
    succeeded_backup(&pool, fresh, now - chrono::Duration::hours(20)).await;

    s.tick(now).await.unwrap();
    assert_eq!(
        pending(&pool, down).await,
        1,
        "30 h since the last backup: overdue"
    );
    assert_eq!(
        pending(&pool, never_backed_up).await,
        1,
        "never backed up counts as overdue"
    );
    assert_eq!(
        pending(&pool, fresh).await,
        0,
        "not its slot and not overdue"
    );
}

#[sqlx::test]
async fn slot_hour_matches_between_rust_and_sql_and_is_pinned(pool: PgPool) {
    let pinned = Uuid::parse_str("7d0e6a52-3f1c-4e8a-9b2d-5c6f7a8b9c0d").unwrap();
    assert_eq!(slot_hour(pinned), 18);
    let mut ids = vec![pinned, Uuid::nil(), Uuid::max()];
    ids.extend((0..500).map(|_| Uuid::new_v4()));
    let from_sql: Vec<i32> =
        sqlx::query_scalar("SELECT backup_slot_hour(id) FROM unnest($1::uuid[]) AS id")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    for (id, sql) in ids.iter().zip(from_sql) {
        assert_eq!(slot_hour(*id) as i32, sql, "{id}");
    }
    let mut seen = [false; 24];
    for id in &ids {
        seen[slot_hour(*id) as usize] = true;
    }
    assert!(seen.iter().all(|s| *s), "500 teams should cover every hour");
}

#[sqlx::test]
async fn nothing_is_added_beside_a_queued_or_running_backup(pool: PgPool) {
    let (s, _) = scheduler(&pool);
    let t = team(&pool, "pro").await;
    let r = resource(&pool, t, "postgres", "active").await;
    s.tick(at(22, 10)).await.unwrap();
    assert_eq!(pending(&pool, r).await, 1);
    // A worker claims it; an hour later it is still running (a long dump).
    sqlx::query(
        "UPDATE resource_backups SET status = 'running', attempts = 1, leased_by = 'w',
                lease_expires_at = now() + interval '1 minute' WHERE resource_id = $1",
    )
    .bind(r)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(s.tick(at(22, 10)).await.unwrap().total(), 0);
    assert_eq!(
        s.tick(at(22, 11)).await.unwrap().total(),
        0,
        "still running: nothing beside it"
    );
    // A manual backup pending also holds the scheduler back.
    let t2 = team(&pool, "pro").await;
    let r2 = resource(&pool, t2, "postgres", "active").await;
    sqlx::query("INSERT INTO resource_backups (resource_id, kind, created_at) VALUES ($1, 'manual', '2026-11-20')")
        .bind(r2)
        .execute(&pool)
        .await
        .unwrap();
    s.tick(at(22, 12)).await.unwrap();
    assert_eq!(pending(&pool, r2).await, 0);
}

#[sqlx::test]
async fn concurrent_ticks_leave_one_pending_row_per_due_resource(pool: PgPool) {
    let mut due = Vec::new();
    for tier in ["pro", "team", "hobby", "mystery_tier"] {
        let t = team(&pool, tier).await;
        for _ in 0..5 {
            // hobby/mystery: never backed up, so overdue whatever the hour.
            due.push(resource(&pool, t, "postgres", "active").await);
        }
    }
    let opts = (*pool.connect_options()).clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let opts = opts.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let own = PgPoolOptions::new()
                .max_connections(2)
                .connect_with(opts)
                .await
                .unwrap();
            let (s, _) = scheduler(&own);
            barrier.wait().await;
            s.tick(at(22, 9)).await.unwrap()
        }));
    }
    let mut reports: Vec<TickReport> = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }
    let enqueued: u64 = reports.iter().map(TickReport::total).sum();
    assert_eq!(enqueued, due.len() as u64);
    for r in &due {
        assert_eq!(pending(&pool, *r).await, 1);
    }
}

#[sqlx::test]
async fn unknown_tiers_get_the_default_plan_a_warning_and_a_metric(pool: PgPool) {
    let (s, metrics) = scheduler(&pool);
    // Backed up exactly a day ago, outside its slot: the daily window has opened, but it is
    // neither the slot hour nor overdue — under the (daily) default plan it is not due.
    let t1 = team(&pool, "enterprise_2027").await;
    let r1 = resource(&pool, t1, "vector", "active").await;
    let off_slot = (slot_hour(t1) + 1) % 24;
    succeeded_backup(&pool, r1, at(21, off_slot)).await;
    let report = s.tick(at(22, off_slot)).await.unwrap();
    assert_eq!(report.unknown_tiers, ["enterprise_2027"]);
    assert_eq!(
        pending(&pool, r1).await,
        0,
        "default plan is daily: not in the slot, not overdue"
    );
    assert!(metrics
        .render()
        .contains("instant_plan_unknown_tier_total 1"));

    // In its slot hour a day after its last backup, it is due under the default plan.
    let t2 = team(&pool, "enterprise_2027").await;
    let r2 = resource(&pool, t2, "redis", "active").await;
    succeeded_backup(&pool, r2, at(21, slot_hour(t2))).await;
    s.tick(at(22, slot_hour(t2))).await.unwrap();
    assert_eq!(
        pending(&pool, r2).await,
        1,
        "due in its slot under the default plan"
    );
    assert!(metrics
        .render()
        .contains("instant_plan_unknown_tier_total 2"));
}

#[sqlx::test]
async fn rpo_breached_gauge(pool: PgPool) {
    let (s, metrics) = scheduler(&pool);
    let now = at(22, 12);
    let pro = team(&pool, "pro").await;
    let stale = resource(&pool, pro, "postgres", "active").await;
    succeeded_backup(&pool, stale, now - chrono::Duration::minutes(121)).await;
    let ok = resource(&pool, pro, "postgres", "active").await;
    succeeded_backup(&pool, ok, now - chrono::Duration::minutes(100)).await;
    let _never = resource(&pool, pro, "redis", "active").await; // created 2026-01-01: breached
    let hobby = team(&pool, "hobby").await;
    let daily_ok = resource(&pool, hobby, "postgres", "active").await;
    succeeded_backup(&pool, daily_ok, now - chrono::Duration::hours(24)).await;
    let free = team(&pool, "free").await;
    let _free = resource(&pool, free, "postgres", "active").await; // never backed up by design
    assert_eq!(s.refresh_rpo_breached(now).await.unwrap(), 2);
    assert!(metrics
        .render()
        .contains("instant_customer_backup_rpo_breached 2"));
}

/// `backup-worker run --only scheduler --once` is exactly one tick.
#[sqlx::test]
async fn run_once_only_scheduler_is_one_tick(pool: PgPool) {
    let t = team(&pool, "pro").await;
    let r = resource(&pool, t, "postgres", "active").await;
    let url = backup_worker_testkit::database_url(&pool);
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
            .args(["run", "--only", "scheduler", "--once"])
            .env("DATABASE_URL", url.as_str())
            .env("STORAGE_URL", format!("file://{}", dir.path().display()))
            .env("LOG_FORMAT", "json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(pending(&pool, r).await, 1);
    }
}

#[sqlx::test]
async fn a_default_plan_that_never_backs_up_leaves_unknown_tiers_alone(pool: PgPool) {
    let yaml = backup_worker::plans::EMBEDDED_PLANS.replace(
        "default:\n  { rpo_minutes: 1440, backup_retention_days: 7,",
        "default:\n  { rpo_minutes: 0, backup_retention_days: 7,",
    );
    assert_ne!(
        yaml,
        backup_worker::plans::EMBEDDED_PLANS,
        "fixture edit must apply"
    );
    let (s, _) = scheduler_with(&pool, Plans::from_yaml(&yaml, "test").unwrap());
    let unknown = resource(&pool, team(&pool, "mystery").await, "postgres", "active").await;
    let pro = resource(&pool, team(&pool, "pro").await, "postgres", "active").await;
    let free = resource(&pool, team(&pool, "free").await, "postgres", "active").await;
    s.tick(at(22, 5)).await.unwrap();
    assert_eq!(
        (
            pending(&pool, unknown).await,
            pending(&pool, pro).await,
            pending(&pool, free).await
        ),
        (0, 1, 0)
    );
}

#[sqlx::test]
async fn backup_marks_follow_inserts_and_successes(pool: PgPool) {
    let r = resource(&pool, team(&pool, "pro").await, "redis", "active").await;
    let marks = || async {
        sqlx::query_as::<_, (DateTime<Utc>, Option<DateTime<Utc>>)>(
            "SELECT last_created_at, last_succeeded_at FROM resource_backup_marks WHERE resource_id = $1",
        )
        .bind(r)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    succeeded_backup(&pool, r, at(20, 1)).await;
    assert_eq!(marks().await, (at(20, 1), Some(at(20, 1))));
    // An older row arriving later never moves the marks back.
    succeeded_backup(&pool, r, at(19, 1)).await;
    assert_eq!(marks().await, (at(20, 1), Some(at(20, 1))));
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, kind, created_at) VALUES ($1, 'manual', $2)",
    )
    .bind(r)
    .bind(at(22, 3))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        marks().await,
        (at(22, 3), Some(at(20, 1))),
        "pending rows count for the window only"
    );
    complete_all(&pool, at(22, 4)).await;
    assert_eq!(marks().await, (at(22, 3), Some(at(22, 4))));
}

fn pass_ctx() -> backup_worker::loops::PassContext {
    backup_worker::loops::PassContext {
        shutdown: tokio_util::sync::CancellationToken::new(),
        abort: tokio_util::sync::CancellationToken::new(),
        heartbeat: backup_worker::health::Heartbeat::detached("scheduler"),
    }
}

/// The daemon's tick stamps rows with the inserting transaction's now(): a trigger records that
/// now() beside each row's created_at and run_after (a worker clock read before the transaction
/// can never equal it).
#[sqlx::test]
async fn the_daemons_tick_stamps_rows_with_the_transactions_now(pool: PgPool) {
    use backup_worker::loops::Loop;
    for ddl in [
        "CREATE TABLE tick_clock (backup_id uuid, xact_now timestamptz, created_at timestamptz,
                                  run_after timestamptz)",
        "CREATE FUNCTION record_tick_clock() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO tick_clock VALUES (NEW.id, now(), NEW.created_at, NEW.run_after);
             RETURN NEW;
         END $$",
        "CREATE TRIGGER record_tick_clock AFTER INSERT ON resource_backups
             FOR EACH ROW EXECUTE FUNCTION record_tick_clock()",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    let t = team(&pool, "pro").await;
    for ty in ["postgres", "redis"] {
        resource(&pool, t, ty, "active").await;
    }
    let (s, _) = scheduler(&pool);
    s.pass(&pass_ctx()).await.unwrap();
    type Stamps = (Uuid, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>);
    let rows: Vec<Stamps> =
        sqlx::query_as("SELECT backup_id, xact_now, created_at, run_after FROM tick_clock")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (id, xact_now, created_at, run_after) in rows {
        assert_eq!(
            created_at, xact_now,
            "{id}: created_at is not the database's now()"
        );
        assert_eq!(
            run_after, xact_now,
            "{id}: run_after is not the database's now()"
        );
    }
}

/// The due decision follows the database's clock, however far the worker's is from it: with the
/// database's now() shifted to 2030-06-15 07:00 UTC (a `now()` shadowing pg_catalog's on the
/// scheduler's connections), a daily team whose slot is 07 and whose last backup is 24 h 20 min
/// old by that clock is due, and its row is stamped 07:00 — while a team with another slot is not.
#[sqlx::test]
async fn due_decisions_and_timestamps_follow_the_database_clock(pool: PgPool) {
    let db_now = Utc.with_ymd_and_hms(2030, 6, 15, 7, 0, 0).unwrap();
    sqlx::query(
        "CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql STABLE
             AS $$ SELECT timestamptz '2030-06-15 07:00:00+00' $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    let skewed = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .options([("search_path", "public,pg_catalog")]),
        )
        .await
        .unwrap();
    let shifted: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&skewed)
        .await
        .unwrap();
    assert_eq!(
        shifted, db_now,
        "the scheduler's connections see the shifted clock"
    );

    let slot_id = |hour: u32| loop {
        let id = Uuid::new_v4();
        if slot_hour(id) == hour {
            break id;
        }
    };
    let due_team = team_with_id(&pool, slot_id(7), "hobby").await;
    let due = resource(&pool, due_team, "postgres", "active").await;
    let other_team = team_with_id(&pool, slot_id(19), "hobby").await;
    let not_due = resource(&pool, other_team, "postgres", "active").await;
    for r in [due, not_due] {
        succeeded_backup(&pool, r, db_now - chrono::Duration::minutes(24 * 60 + 20)).await;
    }

    let metrics = Metrics::new().unwrap();
    let s = Scheduler::new(
        skewed,
        Arc::new(Plans::load(None).unwrap()),
        metrics,
        Duration::from_secs(60),
    );
    backup_worker::loops::Loop::pass(&s, &pass_ctx())
        .await
        .unwrap();
    assert_eq!(pending(&pool, due).await, 1);
    assert_eq!(pending(&pool, not_due).await, 0);
    let (created_at, run_after): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT created_at, run_after FROM resource_backups WHERE resource_id = $1 AND status = 'pending'",
    )
    .bind(due)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((created_at, run_after), (db_now, db_now));
}

/// The API cancels a pending manual backup by deleting its row: the marks forget it, so the
/// resource's next scheduled backup is not held back by the window of a row that no longer exists.
#[sqlx::test]
async fn a_deleted_pending_backup_does_not_delay_the_next_scheduled_one(pool: PgPool) {
    let (s, _) = scheduler(&pool);
    let r = resource(&pool, team(&pool, "pro").await, "postgres", "active").await;
    // Hourly plan, last backed up two hours ago: due.
    succeeded_backup(&pool, r, at(22, 1)).await;
    let manual: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, kind, created_at) VALUES ($1, 'manual', $2)
         RETURNING id",
    )
    .bind(r)
    .bind(at(22, 3))
    .fetch_one(&pool)
    .await
    .unwrap();
    // While the manual row waits, nothing else is queued for the resource.
    assert_eq!(
        s.tick(at(22, 3) + chrono::Duration::minutes(1))
            .await
            .unwrap()
            .total(),
        0
    );
    sqlx::query("DELETE FROM resource_backups WHERE id = $1")
        .bind(manual)
        .execute(&pool)
        .await
        .unwrap();
    let report = s
        .tick(at(22, 3) + chrono::Duration::minutes(2))
        .await
        .unwrap();
    assert_eq!(
        report.total(),
        1,
        "enqueued again at once, not an RPO later"
    );
    assert_eq!(pending(&pool, r).await, 1);
}

#[sqlx::test]
async fn backup_marks_are_recomputed_from_the_rows_left_after_a_delete(pool: PgPool) {
    let r = resource(&pool, team(&pool, "pro").await, "redis", "active").await;
    let other = resource(&pool, team(&pool, "pro").await, "redis", "active").await;
    let marks = |id: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (DateTime<Utc>, Option<DateTime<Utc>>)>(
                "SELECT last_created_at, last_succeeded_at FROM resource_backup_marks
                  WHERE resource_id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    let delete = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    succeeded_backup(&pool, r, at(20, 1)).await;
    succeeded_backup(&pool, r, at(21, 1)).await;
    succeeded_backup(&pool, other, at(21, 5)).await;
    // A newer backup that failed verification is not a good backup (as 20261124000001 counts).
    succeeded_backup(&pool, r, at(21, 9)).await;
    sqlx::query("UPDATE resource_backups SET verify_status = 'failed' WHERE created_at = $1")
        .bind(at(21, 9))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO resource_backups (resource_id, kind, status, created_at) VALUES ($1, 'manual', 'failed', $2)")
        .bind(r)
        .bind(at(22, 2))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(marks(r).await, Some((at(22, 2), Some(at(21, 1)))));

    // Deleting the newest row (of any status) moves last_created_at back to the next one, and the
    // succeeded mark is recomputed with the same rule: the backup that failed verification still
    // does not count.
    delete("DELETE FROM resource_backups WHERE status = 'failed'").await;
    assert_eq!(marks(r).await, Some((at(21, 9), Some(at(21, 1)))));
    delete("DELETE FROM resource_backups WHERE verify_status = 'failed'").await;
    assert_eq!(marks(r).await, Some((at(21, 1), Some(at(21, 1)))));
    // Deleting the newest succeeded row moves last_succeeded_at back.
    succeeded_backup(&pool, r, at(21, 12)).await;
    assert_eq!(marks(r).await, Some((at(21, 12), Some(at(21, 12)))));
    sqlx::query("DELETE FROM resource_backups WHERE resource_id = $1 AND created_at = $2")
        .bind(r)
        .bind(at(21, 12))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(marks(r).await, Some((at(21, 1), Some(at(21, 1)))));
    // Deleting an older row changes nothing; another resource's marks are never touched.
    sqlx::query("DELETE FROM resource_backups WHERE resource_id = $1 AND created_at = $2")
        .bind(r)
        .bind(at(20, 1))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(marks(r).await, Some((at(21, 1), Some(at(21, 1)))));
    assert_eq!(marks(other).await, Some((at(21, 5), Some(at(21, 5)))));
    // Expired rows still count as backed up (the catch-up rule): only their deletion moves it.
    sqlx::query("UPDATE resource_backups SET status = 'expired' WHERE resource_id = $1")
        .bind(r)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(marks(r).await, Some((at(21, 1), Some(at(21, 1)))));
    // A resource with no rows left has no marks: never backed up, so overdue.
    delete("DELETE FROM resource_backups").await;
    assert_eq!(marks(r).await, None);
    assert_eq!(marks(other).await, None);
}
