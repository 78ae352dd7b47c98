//! Retention (DESIGN §5, as changed for issue 15) and the reconciliation of orphaned objects,
//! against a real Postgres and a real store (a local directory; S3 where the store matters).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backup_worker::health::{Health, Heartbeat};
use backup_worker::loops::backups::Backups;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::metrics::Metrics;
use backup_worker::plans::{Plans, EMBEDDED_PLANS};
use backup_worker::retention::{
    apply_retention, reconcile_orphans, Reconciler, Retention, RetentionCursor, RetentionLimits,
};
use backup_worker::storage::{put_reader, LocalStore, Metadata, ObjectStore};
use backup_worker_testkit::{test_config, test_deps, S3Server};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn team(pool: &PgPool, tier: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ($1) RETURNING id")
        .bind(tier)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn resource(pool: &PgPool, team: Uuid, status: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url, status)
         VALUES ($1, 'postgres', 'postgres://u:p@127.0.0.1/db', $2) RETURNING id",
    )
    .bind(team)
    .bind(status)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The key a real backup of this row gets.
fn key_of(team: Uuid, resource: Uuid, id: Uuid, at: DateTime<Utc>) -> String {
    backup_worker::loops::backups::object_key("p/", team, resource, at, id, "pgdump")
}

/// A succeeded backup finished `age_hours` before `now`, with its object in the store.
async fn backup(
    pool: &PgPool,
    store: &dyn ObjectStore,
    team: Uuid,
    resource: Uuid,
    now: DateTime<Utc>,
    age_hours: i64,
) -> Uuid {
    let id = Uuid::new_v4();
    let at = now - chrono::Duration::hours(age_hours);
    let key = key_of(team, resource, id, at);
    put_reader(store, &key, &b"dump"[..], Metadata::new())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO resource_backups (id, resource_id, kind, status, created_at, started_at,
                                       finished_at, object_key, sha256, size_bytes)
         VALUES ($1, $2, 'scheduled', 'succeeded', $3, $3, $3, $4, 'x', 4)",
    )
    .bind(id)
    .bind(resource)
    .bind(at)
    .bind(&key)
    .execute(pool)
    .await
    .unwrap();
    id
}

const DAY: i64 = 24;

async fn status(pool: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM resource_backups WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn object_exists(store: &dyn ObjectStore, pool: &PgPool, id: Uuid) -> bool {
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    store.head(&key).await.is_ok()
}

async fn local_store() -> (tempfile::TempDir, Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("store")).await.unwrap();
    (dir, Arc::new(store))
}

fn plans_with(extra_tier: &str) -> Plans {
    let yaml = EMBEDDED_PLANS.replace("tiers:\n", &format!("tiers:\n  {extra_tier}\n"));
    assert_ne!(yaml, EMBEDDED_PLANS, "fixture edit must apply");
    Plans::from_yaml(&yaml, "test").unwrap()
}

#[sqlx::test]
async fn the_newest_backup_of_a_live_resource_is_kept_whatever_its_age(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    // keep_last 0: only the newest-backup rule keeps anything.
    let plans = plans_with("lean: { rpo_minutes: 1440, backup_retention_days: 7, backup_keep_last: 0, limits: { connections: 1, memory_mb: 1, storage_mb: 1 } }");
    let now = Utc::now();
    let t = team(&pool, "lean").await;
    let mut newest = Vec::new();
    let mut older = Vec::new();
    // An active resource whose backups stopped (e.g. failing for weeks) and a paused one.
    for st in ["active", "paused"] {
        let r = resource(&pool, t, st).await;
        older.push(backup(&pool, s, t, r, now, 40 * DAY).await);
        older.push(backup(&pool, s, t, r, now, 30 * DAY).await);
        newest.push(backup(&pool, s, t, r, now, 20 * DAY).await);
    }
    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 4, "{report:?}");
    for id in &newest {
        assert_eq!(status(&pool, *id).await, "succeeded");
        assert!(object_exists(s, &pool, *id).await);
    }
    for id in &older {
        assert_eq!(status(&pool, *id).await, "expired");
        assert!(!object_exists(s, &pool, *id).await, "object deleted");
    }
    // Still kept however much later retention runs.
    let later = now + chrono::Duration::days(365);
    assert_eq!(
        apply_retention(&pool, s, &plans, later)
            .await
            .unwrap()
            .expired,
        0
    );
}

/// Marks a backup as the verifier does when it does not restore.
async fn failed_verification(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "UPDATE resource_backups SET verified_at = now(), verify_status = 'failed' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

async fn verified(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "UPDATE resource_backups SET verified_at = now(), verify_status = 'verified' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn backups_that_failed_verification_protect_nothing_and_keep_the_verified_ones(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let (days, keep) = backup_worker::retention::effective_policy(&plans, "pro");
    assert_eq!((days, keep), (30, 3));
    let now = Utc::now();
    let t = team(&pool, "pro").await;

    // A systematic dump/restore mismatch: the newest 4 (>= keep_last) all failed verification,
    // the older, verified ones are past retention. They are the only restorable backups left.
    let r = resource(&pool, t, "active").await;
    let mut good = Vec::new();
    for age in [45, 44, 43] {
        let id = backup(&pool, s, t, r, now, age * DAY).await;
        verified(&pool, id).await;
        good.push(id);
    }
    let mut bad = Vec::new();
    for age in [40, 5, 3, 1] {
        let id = backup(&pool, s, t, r, now, age * DAY).await;
        failed_verification(&pool, id).await;
        bad.push(id);
    }
    // One older verified backup beyond keep_last: it goes, the 3 newest verified ones stay.
    let oldest_good = backup(&pool, s, t, r, now, 50 * DAY).await;
    verified(&pool, oldest_good).await;

    // A resource whose newest backup failed verification and is past retention: it expires (it
    // is not "the newest backup"), and the newest one that did not fail is kept.
    let r2 = resource(&pool, t, "active").await;
    let kept_newest = backup(&pool, s, t, r2, now, 60 * DAY).await;
    let bad_newest = backup(&pool, s, t, r2, now, 35 * DAY).await;
    failed_verification(&pool, bad_newest).await;

    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    for id in &good {
        assert_eq!(
            status(&pool, *id).await,
            "succeeded",
            "a verified backup within keep_last"
        );
        assert!(object_exists(s, &pool, *id).await);
    }
    assert_eq!(
        status(&pool, oldest_good).await,
        "expired",
        "beyond keep_last"
    );
    assert_eq!(
        status(&pool, bad[0]).await,
        "expired",
        "failed verification, past retention"
    );
    assert!(!object_exists(s, &pool, bad[0]).await);
    for id in &bad[1..] {
        assert_eq!(status(&pool, *id).await, "succeeded", "within retention");
    }
    assert_eq!(
        status(&pool, bad_newest).await,
        "expired",
        "the newest, but it failed verification"
    );
    assert_eq!(
        status(&pool, kept_newest).await,
        "succeeded",
        "the newest that did not fail verification"
    );
    assert_eq!(report.expired, 3, "{report:?}");

    // Not yet verified is not failed (the verifier's turn has not come): three of them are
    // keep_last, and the older one past retention goes.
    let r3 = resource(&pool, t, "active").await;
    let older = backup(&pool, s, t, r3, now, 40 * DAY).await;
    for age in [3, 2, 1] {
        backup(&pool, s, t, r3, now, age * DAY).await;
    }
    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(status(&pool, older).await, "expired");
}

/// DESIGN §15: a backup flagged as an anomaly is never the reason an older one expires — a mass
/// DELETE followed by keep_last more backups must not age out the last backups from before it —
/// and once an operator accepts it, it counts again.
#[sqlx::test]
async fn anomalous_backups_protect_nothing_until_accepted(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let now = Utc::now();
    let t = team(&pool, "pro").await; // 30 days, keep_last 3
    let r = resource(&pool, t, "active").await;
    let before = backup(&pool, s, t, r, now, 40 * DAY).await;
    let mut after = Vec::new();
    for age in [3, 2, 1] {
        let id = backup(&pool, s, t, r, now, age * DAY).await;
        sqlx::query("UPDATE resource_backups SET anomaly = '{\"size\": {}}' WHERE id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        after.push(id);
    }
    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 0, "{report:?}");
    assert_eq!(
        status(&pool, before).await,
        "succeeded",
        "the last backup from before"
    );
    assert!(object_exists(s, &pool, before).await);
    for id in &after {
        backup_worker::commands::accept_anomaly(&pool, *id)
            .await
            .unwrap();
    }
    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(
        status(&pool, before).await,
        "expired",
        "three accepted newer backups keep it no more"
    );
    for id in &after {
        assert_eq!(status(&pool, *id).await, "succeeded");
    }
}

#[sqlx::test]
async fn a_downgrade_to_retention_zero_ages_backups_out_on_the_default_plan(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let d = plans.default_plan();
    assert_eq!((d.backup_retention_days, d.backup_keep_last), (7, 2));
    let now = Utc::now();
    // A pro team downgraded to free (retention 0) yesterday: hourly backups of the last days.
    let t = team(&pool, "free").await;
    let r = resource(&pool, t, "active").await;
    let recent: Vec<Uuid> = {
        let mut v = Vec::new();
        for age in [1, 2, 5, 3 * DAY, 6 * DAY] {
            v.push(backup(&pool, s, t, r, now, age).await);
        }
        v
    };
    let old_one = backup(&pool, s, t, r, now, 8 * DAY).await;
    // Another free team's resource with only old backups: default's keep_last (2) keeps two.
    let t2 = team(&pool, "free_yearly").await;
    let r2 = resource(&pool, t2, "active").await;
    let k1 = backup(&pool, s, t2, r2, now, 10 * DAY).await;
    let k2 = backup(&pool, s, t2, r2, now, 11 * DAY).await;
    let gone = backup(&pool, s, t2, r2, now, 12 * DAY).await;

    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 2, "{report:?}");
    for id in recent.iter().chain([&k1, &k2]) {
        assert_eq!(
            status(&pool, *id).await,
            "succeeded",
            "within default's retention or keep_last"
        );
    }
    assert_eq!(status(&pool, old_one).await, "expired");
    assert_eq!(status(&pool, gone).await, "expired");

    // A week later the recent ones age out too, down to default's keep_last.
    let later = now + chrono::Duration::days(8);
    apply_retention(&pool, s, &plans, later).await.unwrap();
    let kept: Vec<String> = {
        let mut v = Vec::new();
        for id in &recent {
            v.push(status(&pool, *id).await);
        }
        v
    };
    assert_eq!(
        kept,
        ["succeeded", "succeeded", "expired", "expired", "expired"]
    );
}

#[sqlx::test]
async fn a_deleted_resources_backups_stay_until_retention_then_all_go(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let now = Utc::now();
    // pro: 30 days, keep_last 3 — neither keep_last nor the newest rule apply once deleted.
    let t = team(&pool, "pro").await;
    let deleted = resource(&pool, t, "deleted").await;
    let young = backup(&pool, s, t, deleted, now, 2 * DAY).await;
    let mid = backup(&pool, s, t, deleted, now, 20 * DAY).await;
    let old: Vec<Uuid> = {
        let mut v = Vec::new();
        for age in [31, 35, 40] {
            v.push(backup(&pool, s, t, deleted, now, age * DAY).await);
        }
        v
    };
    // The same backups of a live resource: keep_last keeps three.
    let live = resource(&pool, t, "active").await;
    for age in [31, 35, 40, 45] {
        backup(&pool, s, t, live, now, age * DAY).await;
    }

    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 3 + 1, "{report:?}");
    for id in &old {
        assert_eq!(
            status(&pool, *id).await,
            "expired",
            "past retention, no keep_last"
        );
    }
    assert_eq!(
        status(&pool, young).await,
        "succeeded",
        "restorable until its retention"
    );
    assert_eq!(status(&pool, mid).await, "succeeded");

    // After the retention of the youngest, nothing is left: not even the newest.
    let later = now + chrono::Duration::days(27);
    apply_retention(&pool, s, &plans, later).await.unwrap();
    assert_eq!(status(&pool, young).await, "succeeded", "2 + 27 days < 30");
    assert_eq!(status(&pool, mid).await, "expired");
    let later = now + chrono::Duration::days(31);
    apply_retention(&pool, s, &plans, later).await.unwrap();
    assert_eq!(status(&pool, young).await, "expired");
    assert!(!object_exists(s, &pool, young).await);
    let live_kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups WHERE resource_id = $1 AND status = 'succeeded'",
    )
    .bind(live)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(live_kept, 3, "a live resource keeps keep_last");
}

/// Bulk-inserts `n` succeeded backups of `resource`, one an hour back from `newest_age_hours`,
/// with their objects.
async fn many_backups(
    pool: &PgPool,
    store: &dyn ObjectStore,
    team: Uuid,
    resource: Uuid,
    now: DateTime<Utc>,
    newest_age_hours: i64,
    n: i64,
) {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let ats: Vec<DateTime<Utc>> = (0..n)
        .map(|i| now - chrono::Duration::hours(newest_age_hours + i))
        .collect();
    let keys: Vec<String> = ids
        .iter()
        .zip(&ats)
        .map(|(id, at)| key_of(team, resource, *id, *at))
        .collect();
    for k in &keys {
        put_reader(store, k, &b"d"[..], Metadata::new())
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO resource_backups (id, resource_id, kind, status, created_at, started_at,
                                       finished_at, object_key, sha256, size_bytes)
         SELECT id, $4, 'scheduled', 'succeeded', at, at, at, k, 'x', 1
           FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS u(id, at, k)",
    )
    .bind(&ids)
    .bind(&ats)
    .bind(&keys)
    .bind(resource)
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM resource_backups WHERE status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn thousands_of_candidates_expire_in_batches_in_one_run(pool: PgPool) {
    let (dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let now = Utc::now();
    // team (90 days) is the longest retention in use: pro (30 days) and hobby (7 days) rows are
    // found through their teams (phase B), rows past 90 days by age (phase A).
    let (tp, th, tt) = (
        team(&pool, "pro").await,
        team(&pool, "hobby").await,
        team(&pool, "team").await,
    );
    let (rp, rh, rt) = (
        resource(&pool, tp, "active").await,
        resource(&pool, th, "active").await,
        resource(&pool, tt, "active").await,
    );
    // pro: 30 days of hourly backups kept + 1,500 older; hobby: 1,200 older than 7 days;
    // team: 800 older than 90 days.
    many_backups(&pool, s, tp, rp, now, 1, 30 * DAY - 2).await;
    many_backups(&pool, s, tp, rp, now, 30 * DAY + 1, 1500).await;
    many_backups(&pool, s, th, rh, now, 1, 3).await;
    many_backups(&pool, s, th, rh, now, 7 * DAY + 1, 1200).await;
    many_backups(&pool, s, tt, rt, now, 1, 7).await;
    many_backups(&pool, s, tt, rt, now, 90 * DAY + 1, 800).await;
    let kept_before = count(&pool, "succeeded").await - 3500;

    // The loop's heartbeat: a run that takes a while reports progress as it goes.
    let health = Health::new(Metrics::new().unwrap());
    let heartbeat = health.register("backups", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(health.report().1["backups"].seconds_since_progress, 1);

    let mut retention = Retention::default();
    let report = retention
        .run(&pool, s, &plans, now, &heartbeat)
        .await
        .unwrap();
    assert_eq!(report.expired, 3500, "{report:?}");
    assert!(report.batches >= 4, "1,000 rows a batch: {report:?}");
    assert!(!report.incomplete);
    assert_eq!(report.delete_failed, 0);
    assert_eq!(retention.cursor, RetentionCursor::Start, "a whole cycle");
    assert_eq!(health.report().1["backups"].seconds_since_progress, 0);
    assert_eq!(count(&pool, "expired").await, 3500);
    assert_eq!(count(&pool, "succeeded").await, kept_before);
    // Exactly the kept rows' objects remain.
    let objects = LocalStore::new(dir.path().join("store"))
        .await
        .unwrap()
        .list("p/")
        .await
        .unwrap()
        .len();
    assert_eq!(objects as i64, kept_before);
}

#[sqlx::test]
async fn a_bounded_run_stops_and_the_next_continues(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let now = Utc::now();
    let (tp, th) = (team(&pool, "pro").await, team(&pool, "hobby").await);
    let (rp, rh) = (
        resource(&pool, tp, "active").await,
        resource(&pool, th, "active").await,
    );
    many_backups(&pool, s, tp, rp, now, 1, 3).await; // pro keeps 3
    many_backups(&pool, s, tp, rp, now, 31 * DAY, 250).await;
    many_backups(&pool, s, th, rh, now, 1, 2).await;
    many_backups(&pool, s, th, rh, now, 8 * DAY, 250).await;

    let mut retention = Retention::new(RetentionLimits {
        batch: 100,
        max_batches: 2,
        budget: Duration::from_secs(600),
    });
    let hb = Heartbeat::detached("backups");
    let mut total = 0;
    let mut runs = 0;
    loop {
        let r = retention.run(&pool, s, &plans, now, &hb).await.unwrap();
        total += r.expired;
        runs += 1;
        assert!(r.expired <= 200, "bounded: {r:?}");
        if !r.incomplete {
            break;
        }
        assert!(runs < 20, "no progress: {r:?} {:?}", retention.cursor);
    }
    assert!(runs >= 3, "{runs} runs");
    assert_eq!(total, 500);
    assert_eq!(count(&pool, "succeeded").await, 5);
}

#[sqlx::test]
async fn backups_being_read_are_never_expired(pool: PgPool) {
    let (_dir, store) = local_store().await;
    let s = store.as_ref();
    let plans = Plans::load(None).unwrap();
    let now = Utc::now();
    let t = team(&pool, "hobby").await;
    let r = resource(&pool, t, "active").await;
    backup(&pool, s, t, r, now, 1).await;
    backup(&pool, s, t, r, now, 2).await;
    let restoring = backup(&pool, s, t, r, now, 30 * DAY).await;
    let verifying = backup(&pool, s, t, r, now, 31 * DAY).await;
    let free = backup(&pool, s, t, r, now, 32 * DAY).await;
    sqlx::query(
        "INSERT INTO resource_restores (resource_id, backup_id, status, leased_by, lease_expires_at)
         VALUES ($1, $2, 'running', 'w', now() + interval '1 minute')",
    )
    .bind(r)
    .bind(restoring)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO backup_verifications (backup_id, resource_id, status, leased_by, lease_expires_at)
         VALUES ($1, $2, 'running', 'w', now() + interval '1 minute')",
    )
    .bind(verifying)
    .bind(r)
    .execute(&pool)
    .await
    .unwrap();
    let report = apply_retention(&pool, s, &plans, now).await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(status(&pool, restoring).await, "succeeded");
    assert_eq!(status(&pool, verifying).await, "succeeded");
    assert_eq!(status(&pool, free).await, "expired");
    assert!(object_exists(s, &pool, restoring).await);
}

/// Sets a local object's modification time `age` back.
fn age_file(root: &Path, key: &str, age: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(root.join(key))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

#[sqlx::test]
async fn reconciliation_removes_old_unreferenced_backup_objects_only(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(root.clone()).await.unwrap());
    let s = store.as_ref();
    let now = Utc::now();
    let t = team(&pool, "pro").await;
    let r = resource(&pool, t, "active").await;
    let put = |key: String| {
        let store = store.clone();
        async move {
            put_reader(store.as_ref(), &key, &b"dump"[..], Metadata::new())
                .await
                .unwrap();
            key
        }
    };
    let eight_hours = Duration::from_secs(8 * 3600);
    // Committed, never recorded (the result could not be written), 8 h old: an orphan.
    let orphan = put(key_of(t, r, Uuid::new_v4(), now)).await;
    age_file(&root, &orphan, eight_hours);
    let orphan_age = put(format!("{}.age", key_of(t, r, Uuid::new_v4(), now))).await;
    age_file(&root, &orphan_age, eight_hours);
    // The same, but only 10 minutes old: its worker may still be recording it.
    let young = put(key_of(t, r, Uuid::new_v4(), now)).await;
    age_file(&root, &young, Duration::from_secs(600));
    // Referenced by a succeeded row, old.
    let kept = backup(&pool, s, t, r, now, 10 * DAY).await;
    let kept_key: String =
        sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
            .bind(kept)
            .fetch_one(&pool)
            .await
            .unwrap();
    age_file(&root, &kept_key, eight_hours);
    // A running row (an attempt in flight, by the id in its key), and one referencing its key.
    let running_id: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, status, attempts, leased_by, lease_expires_at)
         VALUES ($1, 'running', 1, 'w', now() + interval '1 minute') RETURNING id",
    )
    .bind(r)
    .fetch_one(&pool)
    .await
    .unwrap();
    let running = put(key_of(t, r, running_id, now)).await;
    age_file(&root, &running, eight_hours);
    let r2 = resource(&pool, t, "active").await;
    let running_ref = put(key_of(t, r2, Uuid::new_v4(), now)).await;
    age_file(&root, &running_ref, eight_hours);
    sqlx::query(
        "INSERT INTO resource_backups (resource_id, status, attempts, leased_by, lease_expires_at, object_key)
         VALUES ($1, 'running', 1, 'w', now() + interval '1 minute', $2)",
    )
    .bind(r2)
    .bind(&running_ref)
    .execute(&pool)
    .await
    .unwrap();
    // An expired row's object that survived its delete: an orphan too.
    let expired = backup(&pool, s, t, r, now, 40 * DAY).await;
    sqlx::query("UPDATE resource_backups SET status = 'expired' WHERE id = $1")
        .bind(expired)
        .execute(&pool)
        .await
        .unwrap();
    let expired_key: String =
        sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
            .bind(expired)
            .fetch_one(&pool)
            .await
            .unwrap();
    age_file(&root, &expired_key, eight_hours);
    // Queued for deletion elsewhere (a destroyed key): not this sweep's.
    let queued = put(key_of(t, r, Uuid::new_v4(), now)).await;
    age_file(&root, &queued, eight_hours);
    sqlx::query("INSERT INTO pending_object_deletions (object_key, reason) VALUES ($1, 'test')")
        .bind(&queued)
        .execute(&pool)
        .await
        .unwrap();
    // Not a backup object of this worker's shape: never touched.
    let foreign = put("p/README.txt".to_owned()).await;
    age_file(&root, &foreign, eight_hours);
    let foreign2 = put(format!("p/{t}/{r}/manual-copy.pgdump.gz")).await;
    age_file(&root, &foreign2, eight_hours);

    // Pages of 2 keys, 4 keys a run: the cycle spreads over runs, each continuing after the last
    // key the previous one saw.
    let mut reconciler = Reconciler {
        keys_per_run: 4,
        page: 2,
        after: None,
    };
    let (mut removed, mut listed, mut runs) = (0, 0, 0);
    loop {
        let report = reconciler
            .run(
                &pool,
                s,
                "p/",
                Duration::from_secs(6 * 3600 + 3600),
                now,
                &Heartbeat::detached("backups"),
            )
            .await
            .unwrap();
        assert_eq!(report.delete_failed, 0);
        assert!(report.listed <= 4, "{report:?}");
        removed += report.removed;
        listed += report.listed;
        runs += 1;
        if report.complete {
            break;
        }
        assert!(reconciler.in_progress() && runs < 10, "{report:?}");
    }
    assert!(!reconciler.in_progress());
    assert_eq!((removed, listed, runs), (3, 10, 3));
    let exists = |k: &String| {
        let store = store.clone();
        let k = k.clone();
        async move { store.head(&k).await.is_ok() }
    };
    for k in [&orphan, &orphan_age, &expired_key] {
        assert!(!exists(k).await, "{k} removed");
    }
    for k in [
        &young,
        &kept_key,
        &running,
        &running_ref,
        &queued,
        &foreign,
        &foreign2,
    ] {
        assert!(exists(k).await, "{k} kept");
    }
}

#[sqlx::test]
async fn the_backups_loop_reconciles_and_counts_removed_orphans(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(root.clone()).await.unwrap());
    let t = team(&pool, "pro").await;
    let r = resource(&pool, t, "active").await;
    let now = Utc::now();
    // file:// has no prefix: keys start with the team id.
    let key = |id: Uuid| backup_worker::loops::backups::object_key("", t, r, now, id, "rdb");
    let (old, young) = (key(Uuid::new_v4()), key(Uuid::new_v4()));
    for k in [&old, &young] {
        put_reader(store.as_ref(), k, &b"dump"[..], Metadata::new())
            .await
            .unwrap();
    }
    // BACKUP_TIMEOUT 1 h: objects over 2 h old are judged.
    age_file(&root, &old, Duration::from_secs(2 * 3600 + 60));
    age_file(&root, &young, Duration::from_secs(3600));
    let config = test_config(&[
        ("STORAGE_URL", &format!("file://{}", root.display())),
        ("BACKUP_TIMEOUT", "1h"),
    ])
    .unwrap();
    let deps = test_deps(pool.clone(), store.clone(), config).unwrap();
    let metrics = deps.metrics.clone();
    let ctx = PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("backups"),
    };
    // The first pass runs every housekeeping task (what `run --once` gets).
    Backups::new(deps).pass(&ctx).await.unwrap();
    assert!(store.head(&old).await.is_err(), "orphan removed");
    assert!(
        store.head(&young).await.is_ok(),
        "younger than BACKUP_TIMEOUT + 1 h"
    );
    let text = metrics.render();
    assert!(
        text.contains("backup_worker_orphan_objects_removed_total 1"),
        "{text}"
    );
}

#[sqlx::test]
async fn reconciliation_on_s3(pool: PgPool) {
    // moto: the listing, LastModified from the server, the batched delete. Objects there are
    // fresh, so they are judged at a later `now`.
    let s3 = S3Server::start().await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(s3.store("backups").await.unwrap());
    let s = store.as_ref();
    let t = team(&pool, "pro").await;
    let r = resource(&pool, t, "active").await;
    let now = Utc::now();
    let mut orphans = Vec::new();
    for _ in 0..3 {
        let k = key_of(t, r, Uuid::new_v4(), now);
        put_reader(s, &k, &b"dump"[..], Metadata::new())
            .await
            .unwrap();
        orphans.push(k);
    }
    let kept = backup(&pool, s, t, r, now, 2).await;
    let age = backup_worker::retention::orphan_object_age(Duration::from_secs(3600));
    let hb = Heartbeat::detached("backups");
    let report = reconcile_orphans(&pool, s, "p/", age, now, &hb)
        .await
        .unwrap();
    assert_eq!(report.removed, 0, "all young: {report:?}");
    let later = now + chrono::Duration::minutes(121);
    let report = reconcile_orphans(&pool, s, "p/", age, later, &hb)
        .await
        .unwrap();
    assert_eq!((report.listed, report.removed), (4, 3), "{report:?}");
    for k in &orphans {
        assert!(s.head(k).await.is_err());
    }
    assert!(object_exists(s, &pool, kept).await);
}
