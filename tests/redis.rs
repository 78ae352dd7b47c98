//! Redis on real redis-servers (7.x, and 6.2 via RedisServer::start_old): pooled tenants'
//! restores never touch another tenant's keys (DESIGN §6), the worker's own client classifies
//! its errors as redis-cli's are (§5), and large values go through the byte-bounded queues.

use std::collections::BTreeMap;

use backup_worker::domain::FailureReason;
use backup_worker_testkit::jobs::{backup_row, local_deps, restore_row, JobRow};
use backup_worker_testkit::{
    free_port, insert_resource, insert_team, KeyState, RedisServer, TestError,
};
use sqlx::PgPool;
use uuid::Uuid;

const ADMIN_PW: &str = "admin-pw-7c1";
const TENANT_PW: &str = "tenant-pw-9e4";

/// The ACL shapes pooled tenants are given. The first is the common one that may run FLUSHDB
/// (`@keyspace`/`@write` hold it, and key patterns do not restrict a command without keys).
const SHAPES: &[&[&str]] = &[
    &["~t1:*", "+@connection", "+@read", "+@write", "+@keyspace"],
    &["~t1:*", "+@all", "-@admin"],
    &["~t1:*", "+@all", "-@dangerous", "+restore"],
];

/// A Redis resource of a new team.
async fn resource(pool: &PgPool, url: &str) -> Result<Uuid, TestError> {
    let team = insert_team(pool, "pro").await?;
    insert_resource(pool, team, "redis", url).await
}

async fn team_of(pool: &PgPool, resource: Uuid) -> Result<Uuid, TestError> {
    Ok(
        sqlx::query_scalar("SELECT team_id FROM resources WHERE id = $1")
            .bind(resource)
            .fetch_one(pool)
            .await?,
    )
}

type Snapshot = BTreeMap<(i64, Vec<u8>), KeyState>;

/// Every key of databases 0–2 that `keep` selects.
async fn snapshot(r: &RedisServer, keep: fn(&[u8]) -> bool) -> Snapshot {
    let mut all = BTreeMap::new();
    for db in 0..3 {
        for (k, v) in r.snapshot(db, keep).await.unwrap() {
            all.insert((db, k), v);
        }
    }
    all
}

/// Panics naming the keys that differ between two snapshots.
fn assert_same(got: &Snapshot, want: &Snapshot, what: &str) {
    let show = |(db, k): &(i64, Vec<u8>)| format!("{db}:{}", String::from_utf8_lossy(k));
    let missing: Vec<String> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .map(show)
        .collect();
    let extra: Vec<String> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(show)
        .collect();
    let changed: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, v)| {
            format!(
                "{} {:?} -> {:?}",
                show(k),
                v.expire_at_ms,
                got[k].expire_at_ms
            )
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && changed.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}, changed {changed:?}"
    );
}

fn tenant1(k: &[u8]) -> bool {
    k.starts_with(b"t1:")
}

fn others(k: &[u8]) -> bool {
    !tenant1(k)
}

async fn cli_db(r: &RedisServer, db: i64, args: &[&str]) {
    let db = db.to_string();
    let mut all = vec!["-n", db.as_str()];
    all.extend_from_slice(args);
    r.cli(&all).await.unwrap();
}

/// Tenant 1's keys (several types, TTLs) in database 0, and other tenants' keys beside them in
/// databases 0, 1 and 2 — some with TTLs, some under names tenant 1's pattern nearly matches.
async fn populate_shared(r: &RedisServer) {
    for i in 0..120 {
        cli_db(r, 0, &["SET", &format!("t1:k{i}"), &format!("mine {i}")]).await;
    }
    cli_db(r, 0, &["HSET", "t1:h", "a", "1", "b", "2"]).await;
    cli_db(r, 0, &["PEXPIRE", "t1:h", "3600000"]).await;
    cli_db(r, 0, &["RPUSH", "t1:l", "x", "y", "z"]).await;
    cli_db(r, 0, &["ZADD", "t1:z", "1", "a", "2", "b"]).await;
    for db in 0..3 {
        for i in 0..150 {
            cli_db(
                r,
                db,
                &["SET", &format!("t2:k{i}"), &format!("theirs {db}/{i}")],
            )
            .await;
        }
        cli_db(r, db, &["SADD", "t2:s", "p", "q"]).await;
        cli_db(r, db, &["PEXPIREAT", "t2:s", "4102444800000"]).await;
        cli_db(r, db, &["SET", "t1x:not-t1", "close but not t1"]).await;
        cli_db(r, db, &["HSET", "shared:cfg", "owner", "admin"]).await;
    }
    // Tenant 1's keys in another database: beyond its resource when its user may not INFO.
    cli_db(r, 1, &["SET", "t1:in-db1", "mine too"]).await;
}

/// Changes after the backup: tenant 1 loses, gains and changes keys; the others change too (so
/// a restore that rewrote them would show).
async fn drift(r: &RedisServer) {
    cli_db(r, 0, &["DEL", "t1:k7"]).await;
    cli_db(r, 0, &["SET", "t1:added", "after the backup"]).await;
    cli_db(r, 0, &["SET", "t1:k8", "changed"]).await;
    cli_db(r, 0, &["SET", "t2:k1", "changed by tenant 2"]).await;
    cli_db(r, 1, &["SET", "t2:new", "tenant 2's new key"]).await;
}

fn assert_flush_never_sent(calls: &std::collections::HashMap<String, u64>, what: &str) {
    for cmd in ["flushdb", "flushall"] {
        assert_eq!(calls.get(cmd), None, "{what}: {cmd} was sent ({calls:?})");
    }
}

/// Backs tenant 1 up, drifts, restores, and checks: tenant 1 is rewound, everyone else is
/// byte-for-byte as before the restore, and FLUSHDB/FLUSHALL were never sent.
async fn tenant_round_trip(pool: &PgPool, r: &RedisServer, shape: &[&str]) {
    r.acl_user("t1", TENANT_PW, shape).await.unwrap();
    populate_shared(r).await;
    let (_dir, d) = local_deps(pool).await.unwrap();
    let res = resource(pool, &r.user_url("t1", TENANT_PW, None))
        .await
        .unwrap();
    let backup = backup_row(&d, res).await.unwrap();
    assert_eq!(backup.status, "succeeded", "{shape:?}: {backup:?}");
    let mode: Option<String> =
        sqlx::query_scalar("SELECT dump_mode FROM resource_backups WHERE id = $1")
            .bind(backup.id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(mode.as_deref(), Some("keyspace"), "{shape:?}");
    let mine_at_backup = snapshot(r, tenant1).await;

    drift(r).await;
    let others_before = snapshot(r, others).await;
    assert!(others_before.len() > 450, "{}", others_before.len());
    r.cli(&["CONFIG", "RESETSTAT"]).await.unwrap();
    let done = restore_row(&d, backup.id, res).await.unwrap();
    assert_eq!(done.status, "succeeded", "{shape:?}: {done:?}");

    assert_same(
        &snapshot(r, others).await,
        &others_before,
        &format!("{shape:?}: other tenants' keys, in database 0 and in 1 and 2, are untouched"),
    );
    assert_same(
        &snapshot(r, tenant1).await,
        &mine_at_backup,
        &format!("{shape:?}: tenant 1 is exactly as backed up"),
    );
    assert_flush_never_sent(&r.command_calls().await.unwrap(), &format!("{shape:?}"));
}

#[sqlx::test]
async fn pooled_tenant_restores_leave_other_tenants_keys_byte_for_byte(pool: PgPool) {
    for shape in SHAPES {
        let r = RedisServer::start(Some(ADMIN_PW)).await.unwrap();
        tenant_round_trip(&pool, &r, shape).await;
    }
}

#[sqlx::test]
async fn pooled_tenant_restores_on_redis_6_2(pool: PgPool) {
    for shape in [SHAPES[0], SHAPES[1]] {
        let r = RedisServer::start_old(Some(ADMIN_PW)).await.unwrap();
        assert!(r
            .cli(&["INFO", "server"])
            .await
            .unwrap()
            .contains("redis_version:6.2"));
        tenant_round_trip(&pool, &r, shape).await;
    }
}

/// An instance-mode backup (taken of a whole instance whose user may SYNC) restored into a
/// tenant whose user may run FLUSHDB but not SYNC: still no flush — only tenant 1's keys go.
#[sqlx::test]
async fn an_instance_backup_into_a_tenant_never_flushes(pool: PgPool) {
    let source = RedisServer::start(None).await.unwrap();
    for i in 0..50 {
        source
            .cli(&["SET", &format!("t1:k{i}"), &format!("from the source {i}")])
            .await
            .unwrap();
    }
    let shared = RedisServer::start(Some(ADMIN_PW)).await.unwrap();
    shared.acl_user("t1", TENANT_PW, SHAPES[0]).await.unwrap();
    populate_shared(&shared).await;
    let (_dir, d) = local_deps(&pool).await.unwrap();
    let from = resource(&pool, &source.url()).await.unwrap();
    let team = team_of(&pool, from).await.unwrap();
    let into = insert_resource(
        &pool,
        team,
        "redis",
        &shared.user_url("t1", TENANT_PW, None),
    )
    .await
    .unwrap();
    let backup = backup_row(&d, from).await.unwrap();
    assert_eq!(backup.status, "succeeded", "{backup:?}");
    let mode: Option<String> =
        sqlx::query_scalar("SELECT dump_mode FROM resource_backups WHERE id = $1")
            .bind(backup.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(mode.as_deref(), Some("instance"));

    let others_before = snapshot(&shared, others).await;
    shared.cli(&["CONFIG", "RESETSTAT"]).await.unwrap();
    let done = restore_row(&d, backup.id, into).await.unwrap();
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_same(&snapshot(&shared, others).await, &others_before, "others");
    assert_flush_never_sent(&shared.command_calls().await.unwrap(), "instance backup");
    let mine = shared.snapshot(0, tenant1).await.unwrap();
    assert_eq!(mine.len(), 50, "only the source's keys: {:?}", mine.keys());
    assert_eq!(
        shared.cli(&["GET", "t1:k3"]).await.unwrap().trim(),
        "from the source 3"
    );
}

/// The instance's own admin (a user that may SYNC) restoring an instance backup still gets
/// FLUSHDB: the fast path stays where the instance is the resource's.
#[sqlx::test]
async fn an_admin_restore_of_an_instance_backup_flushes(pool: PgPool) {
    for r in [
        RedisServer::start(Some(ADMIN_PW)).await.unwrap(),
        RedisServer::start_old(Some(ADMIN_PW)).await.unwrap(),
    ] {
        r.populate(100).await.unwrap();
        let (_dir, d) = local_deps(&pool).await.unwrap();
        let res = resource(&pool, &r.url()).await.unwrap();
        let backup = backup_row(&d, res).await.unwrap();
        assert_eq!(backup.status, "succeeded", "{backup:?}");
        r.cli(&["SET", "added", "after"]).await.unwrap();
        r.cli(&["CONFIG", "RESETSTAT"]).await.unwrap();
        let done = restore_row(&d, backup.id, res).await.unwrap();
        assert_eq!(done.status, "succeeded", "{done:?}");
        let calls = r.command_calls().await.unwrap();
        assert!(calls.get("flushdb").is_some_and(|n| *n >= 1), "{calls:?}");
        assert_eq!(r.cli(&["EXISTS", "added"]).await.unwrap().trim(), "0");
        assert_eq!(r.cli(&["DBSIZE"]).await.unwrap().trim(), "100");
    }
}

fn assert_no_secret(row: &JobRow, secrets: &[&str]) {
    let detail = row.internal_detail.as_deref().unwrap_or("");
    for s in secrets {
        assert!(!detail.contains(s), "secret in internal_detail: {detail}");
    }
}

/// The worker's own client (keyspace mode, the restore) classifies as redis-cli's stderr is.
#[sqlx::test]
async fn keyspace_mode_failures_are_classified_like_redis_cli(pool: PgPool) {
    let r = RedisServer::start(Some(ADMIN_PW)).await.unwrap();
    r.populate(20).await.unwrap();
    let (_dir, d) = local_deps(&pool).await.unwrap();

    // A wrong password on a /N resource: auth, not retried, the auth summary.
    let wrong = format!("redis://:not-the-password@127.0.0.1:{}/0", r.port);
    let res = resource(&pool, &wrong).await.unwrap();
    let row = backup_row(&d, res).await.unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.failure_reason.as_deref(),
            row.attempts
        ),
        ("failed", Some("auth"), 1),
        "{row:?}"
    );
    assert_eq!(
        row.error_summary.as_deref(),
        Some(FailureReason::Auth.final_summary())
    );
    assert_no_secret(&row, &["not-the-password", ADMIN_PW]);
    // A wrong password for an ACL user, and no password at all.
    r.acl_user("t1", TENANT_PW, SHAPES[1]).await.unwrap();
    for url in [
        r.user_url("t1", "wrong-tenant-pw", Some(0)),
        format!("redis://127.0.0.1:{}/0", r.port),
    ] {
        let res = resource(&pool, &url).await.unwrap();
        let row = backup_row(&d, res).await.unwrap();
        assert_eq!(
            (row.status.as_str(), row.failure_reason.as_deref()),
            ("failed", Some("auth")),
            "{url}: {row:?}"
        );
        assert_no_secret(&row, &["wrong-tenant-pw"]);
    }

    // Nothing listening: unreachable, retried.
    let port = free_port().unwrap();
    let refused = format!("redis://:some-pw@127.0.0.1:{port}/0");
    let res = resource(&pool, &refused).await.unwrap();
    let row = backup_row(&d, res).await.unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.failure_reason.as_deref(),
            row.attempts
        ),
        ("pending", Some("unreachable"), 1),
        "{row:?}"
    );
    assert_eq!(
        row.error_summary.as_deref(),
        Some(FailureReason::Unreachable.customer_summary())
    );
    assert_no_secret(&row, &["some-pw"]);

    // A user that may not SCAN, which keyspace mode needs: config, not retried.
    r.acl_user("noscan", TENANT_PW, &["~*", "+@all", "-scan"])
        .await
        .unwrap();
    let res = resource(&pool, &r.user_url("noscan", TENANT_PW, Some(0)))
        .await
        .unwrap();
    let row = backup_row(&d, res).await.unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.failure_reason.as_deref(),
            row.attempts
        ),
        ("failed", Some("config"), 1),
        "{row:?}"
    );
    assert!(
        row.internal_detail
            .as_deref()
            .unwrap_or("")
            .contains("NOPERM"),
        "{row:?}"
    );
    assert_no_secret(&row, &[TENANT_PW]);

    // Restores: a target user that may not RESTORE is config (before anything is removed); a
    // wrong password is auth.
    let good = resource(&pool, &r.url_db(0)).await.unwrap();
    let backup = backup_row(&d, good).await.unwrap();
    assert_eq!(backup.status, "succeeded", "{backup:?}");
    let team = team_of(&pool, good).await.unwrap();
    r.acl_user("norestore", TENANT_PW, &["~*", "+@all", "-restore"])
        .await
        .unwrap();
    for (url, want) in [
        (r.user_url("norestore", TENANT_PW, Some(0)), "config"),
        (r.user_url("t1", "wrong-tenant-pw", Some(0)), "auth"),
        (format!("redis://:x@127.0.0.1:{port}/0"), "unreachable"),
    ] {
        let into = insert_resource(&pool, team, "redis", &url).await.unwrap();
        let row = restore_row(&d, backup.id, into).await.unwrap();
        assert_eq!(row.failure_reason.as_deref(), Some(want), "{url}: {row:?}");
        assert_no_secret(&row, &[TENANT_PW, "wrong-tenant-pw"]);
    }
    assert_eq!(
        r.cli(&["DBSIZE"]).await.unwrap().trim(),
        "20",
        "nothing was removed"
    );
}

/// Values larger than every byte budget (the keyspace dump's DUMP group, the restore's queue and
/// batch) go through alone, whole, between small keys — in both dump modes.
#[sqlx::test]
async fn values_larger_than_the_budgets_round_trip(pool: PgPool) {
    let r = RedisServer::start(None).await.unwrap();
    let mut c = r.admin(0).await.unwrap();
    for i in 0..3u8 {
        // 9 MiB of varied bytes (LZF cannot shrink them): larger than the 8 MiB restore queue.
        let v: Vec<u8> = (0..9 * 1024 * 1024u32)
            .map(|j| (j.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
            .collect();
        redis::cmd("SET")
            .arg(format!("big:{i}"))
            .arg(v)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    r.populate(500).await.unwrap();
    let before = r.snapshot(0, |_| true).await.unwrap();
    let (_dir, d) = local_deps(&pool).await.unwrap();
    for url in [r.url(), r.url_db(0)] {
        let res = resource(&pool, &url).await.unwrap();
        let backup = backup_row(&d, res).await.unwrap();
        assert_eq!(backup.status, "succeeded", "{url}: {backup:?}");
        r.cli(&["FLUSHALL"]).await.unwrap();
        let done = restore_row(&d, backup.id, res).await.unwrap();
        assert_eq!(done.status, "succeeded", "{url}: {done:?}");
        assert_eq!(r.snapshot(0, |_| true).await.unwrap(), before, "{url}");
    }
}
