//! Redis verification against a real scratch server (VERIFY_REDIS_URL, DESIGN §11): real
//! redis-servers (the source, and the scratch server with `sanitize-dump-payload yes`), real
//! backups through the backups loop, the verifier's own `verify_now`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use backup_worker::deps::Deps;
use backup_worker::loops::verifier::{Report, Verifier};
use backup_worker::storage::{LocalStore, ObjectStore};
use backup_worker_testkit::{
    back_up, free_port, insert_resource, insert_team, test_config, test_deps, wait_until,
    RedisServer,
};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

const SANITIZE: &[&str] = &["--sanitize-dump-payload", "yes"];

/// Deps over a local-directory store, VERIFY_REDIS_URL = `scratch` when given.
async fn deps(pool: &PgPool, dir: &std::path::Path, scratch: Option<&str>) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.to_path_buf()).await.unwrap());
    let mut env = vec![];
    if let Some(url) = scratch {
        env.push(("VERIFY_REDIS_URL", url));
    }
    test_deps(pool.clone(), store, test_config(&env).unwrap()).unwrap()
}

async fn verify(d: &Deps, backup: Uuid) -> Report {
    Verifier::new(d.clone()).verify_now(backup).await.unwrap()
}

async fn verify_status(pool: &PgPool, backup: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Keys of every database of `server` (DBSIZE of each that holds any).
async fn keyspace(server: &RedisServer) -> Vec<(i64, i64)> {
    let info = server.cli(&["INFO", "keyspace"]).await.unwrap();
    info.lines()
        .filter_map(|l| {
            let (db, rest) = l.strip_prefix("db")?.split_once(':')?;
            let keys = rest.strip_prefix("keys=")?.split(',').next()?;
            Some((db.parse().ok()?, keys.parse().ok()?))
        })
        .collect()
}

async fn slot_leases(scratch: &RedisServer) -> Vec<String> {
    let out = scratch
        .cli(&["-n", "0", "KEYS", "backup-worker:verify-slot:*"])
        .await
        .unwrap();
    let mut v: Vec<String> = out.lines().map(str::to_owned).collect();
    v.sort();
    v
}

/// Redis' CRC-64/Jones, bitwise (the RDB trailer).
fn crc64(data: &[u8]) -> u64 {
    let mut crc = 0u64;
    for &b in data {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x95ac_9329_ac4b_c9b5
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The raw RDB of a stored (unencrypted) backup.
async fn stored_rdb(d: &Deps, backup: Uuid) -> Vec<u8> {
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&d.pool)
        .await
        .unwrap();
    let mut gz = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut d.store.get(&key).await.unwrap(), &mut gz)
        .await
        .unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    raw
}

/// Stores `raw` (gzipped) as the object of `backup`, with its row's sha256 and size.
async fn store_rdb(d: &Deps, backup: Uuid, raw: &[u8]) {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(raw).unwrap();
    let gz = enc.finish().unwrap();
    let key = format!("test/{}.rdb.gz", Uuid::new_v4());
    let mut up = d
        .store
        .begin_upload(&key, Default::default())
        .await
        .unwrap();
    up.write(&gz).await.unwrap();
    up.commit(Default::default()).await.unwrap();
    sqlx::query(
        "UPDATE resource_backups SET object_key = $2, sha256 = $3, size_bytes = $4 WHERE id = $1",
    )
    .bind(backup)
    .bind(&key)
    .bind(hex::encode(Sha256::digest(&gz)))
    .bind(gz.len() as i64)
    .execute(&d.pool)
    .await
    .unwrap();
}

/// A succeeded backup row of a new redis resource whose object is `raw`.
async fn backup_of_rdb(d: &Deps, raw: &[u8]) -> Uuid {
    let team = insert_team(&d.pool, "pro").await.unwrap();
    let r = insert_resource(&d.pool, team, "redis", "redis://127.0.0.1:1")
        .await
        .unwrap();
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, kind, status, finished_at, object_key, sha256, size_bytes)
         VALUES ($1, 'manual', 'succeeded', now(), 'placeholder', '00', 1) RETURNING id",
    )
    .bind(r)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    store_rdb(d, id, raw).await;
    id
}

/// A source with every type and encoding, in databases 0, 3 and 5; 514 + 4 + 2 keys.
async fn every_type(src: &RedisServer) {
    src.populate(500).await.unwrap();
    let many = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    };
    let run = |args: Vec<String>| async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        src.cli(&a).await.unwrap()
    };
    let cmd = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    run(cmd("SET int 12345")).await;
    run(vec!["SET".into(), "big".into(), "a".repeat(3000)]).await; // LZF in the RDB
    run(cmd("RPUSH list-small a b c")).await;
    run([cmd("RPUSH list-big"), many("e", 1000)].concat()).await;
    run(cmd("SADD set-int 1 2 3")).await;
    run(cmd("SADD set-str a b c")).await;
    run([cmd("SADD set-big"), many("m", 1000)].concat()).await;
    run(cmd("ZADD zs 1 a 2.5 b")).await;
    let zbig: Vec<String> = (0..300)
        .flat_map(|i| [i.to_string(), format!("z{i}")])
        .collect();
    run([cmd("ZADD zset-big"), zbig].concat()).await;
    run(cmd("HSET h-small f v")).await;
    let hbig: Vec<String> = (0..300)
        .flat_map(|i| [format!("f{i}"), format!("v{i}")])
        .collect();
    run([cmd("HSET h-big"), hbig].concat()).await;
    for _ in 0..3 {
        run(cmd("XADD stream * f v")).await;
    }
    run(cmd("XGROUP CREATE stream g 0")).await;
    run(cmd("SET ttl-far v PX 3600000")).await;
    run(cmd("-n 3 MSET a 1 b 2 c 3")).await;
    run(cmd("-n 3 HSET h f1 v1")).await;
    run(cmd("-n 5 RPUSH q x y")).await;
    run(cmd("-n 5 SADD s 1")).await;
}

#[sqlx::test]
async fn every_type_in_several_databases_restores_into_the_scratch_server(pool: PgPool) {
    let src = RedisServer::start(Some("src-pw")).await.unwrap();
    let scratch = RedisServer::start_with(Some("scratch-pw"), SANITIZE)
        .await
        .unwrap();
    every_type(&src).await;
    // A key whose expiry passes between the backup and the verification.
    src.cli(&["SET", "soon", "v", "PX", "8000"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), Some(&scratch.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let b = back_up(&d, r).await.unwrap();
    assert_eq!(keyspace(&src).await, [(0, 514), (3, 4), (5, 2)]);
    wait_until(
        Duration::from_secs(10),
        "the key `soon` to expire",
        || async { src.cli(&["EXISTS", "soon"]).await.unwrap().trim() == "0" },
    )
    .await
    .unwrap();

    let report = verify(&d, b).await;
    let v = &report.detail;
    assert_eq!(report.status, "verified", "{report:?}");
    assert_eq!(v["level"], "restore");
    assert_eq!(v["method"], "scratch_server", "{v}");
    for (db, n) in [("0", 514), ("3", 4), ("5", 2)] {
        assert_eq!(v["databases"][db], n, "db {db}: {v}");
        assert_eq!(v["counted"][db], n, "db {db}: {v}");
    }
    assert_eq!(v["keys_total"], 520);
    assert_eq!(v["expired"]["0"], 1, "{v}");
    assert_eq!(v["expired"]["3"], 0);
    assert_eq!(v["duplicates"]["0"], 0);
    let version = scratch.cli(&["INFO", "server"]).await.unwrap();
    let version = version
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim();
    assert_eq!(v["redis_server_version"], version);
    assert_eq!(v["sanitize_dump_payload"], "yes");
    assert_eq!(v["scratch_db"], 1);
    assert_eq!(verify_status(&pool, b).await.as_deref(), Some("verified"));
    // Flushed after, lease released: nothing left on the scratch server.
    assert_eq!(keyspace(&scratch).await, []);
    assert!(!format!("{report:?}").contains("scratch-pw"));
}

#[sqlx::test]
async fn a_payload_only_sanitize_rejects_fails_and_blames_the_backup(pool: PgPool) {
    let src = RedisServer::start(None).await.unwrap();
    let scratch = RedisServer::start_with(None, SANITIZE).await.unwrap();
    src.populate(50).await.unwrap();
    src.cli(&["HSET", "corrupt-me", "f1", "v1"]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = deps(&pool, dir.path(), None).await;
    let d = deps(&pool, dir.path(), Some(&scratch.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let b = back_up(&d, r).await.unwrap();

    // The hash's listpack: [16][10]"corrupt-me"[15] then 15 bytes: total (u32), count (u16),
    // entry "f1" = 0x82 'f' '1' backlen 3, entry "v1", 0xff. A wrong backlen is caught only by
    // a deep walk; the stream's CRC64 is recomputed so the file itself is sound.
    let mut rdb = stored_rdb(&d, b).await;
    let n = rdb.len();
    assert_eq!(
        crc64(&rdb[..n - 8]).to_le_bytes(),
        rdb[n - 8..],
        "crc64 helper"
    );
    let pattern = b"\x10\x0acorrupt-me\x0f";
    let at: Vec<usize> = (0..n - pattern.len())
        .filter(|&i| rdb[i..].starts_with(pattern))
        .collect();
    assert_eq!(at.len(), 1, "the hash is one listpack in the RDB");
    let lp = at[0] + pattern.len();
    assert_eq!(&rdb[lp..lp + 10], b"\x0f\x00\x00\x00\x02\x00\x82f1\x03");
    rdb[lp + 9] = 0x04;
    let crc = crc64(&rdb[..n - 8]);
    rdb[n - 8..].copy_from_slice(&crc.to_le_bytes());
    store_rdb(&d, b, &rdb).await;

    // Cutting the keys out (no scratch server) cannot see it: the file is sound.
    let cut = verify(&plain, b).await;
    assert_eq!(cut.status, "verified", "{cut:?}");
    assert_eq!(cut.detail["method"], "rdb_cut");

    let report = verify(&d, b).await;
    assert_eq!(report.status, "failed", "{report:?}");
    assert_eq!(report.failure_reason.as_deref(), Some("integrity"));
    assert_eq!(report.detail["backup_at_fault"], true, "{}", report.detail);
    assert_eq!(report.detail["failed_step"], "restore");
    let why = report.internal_detail.as_deref().unwrap();
    assert!(why.contains("\"corrupt-me\" in db 0"), "{why}");
    assert!(why.to_lowercase().contains("bad data format"), "{why}");
    assert_eq!(verify_status(&pool, b).await.as_deref(), Some("failed"));
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE kind = 'backup.verification_failed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audits, 1);
    // The slot was flushed and released all the same.
    assert_eq!(keyspace(&scratch).await, []);
}

/// `keys0` string keys in db 0 and `keys2` in db 2.
async fn source(keys0: usize, keys2: usize) -> RedisServer {
    let src = RedisServer::start(None).await.unwrap();
    src.populate(keys0).await.unwrap();
    for i in 0..keys2 {
        src.cli(&["-n", "2", "SET", &format!("k{i}"), "v"])
            .await
            .unwrap();
    }
    src
}

#[sqlx::test]
async fn concurrent_verifications_keep_to_their_own_databases(pool: PgPool) {
    // Slots 1-3: slot 1 held by someone else (with their keys), slot 2 left dirty by a verifier
    // that died (no lease): it is flushed by its next holder.
    let scratch = RedisServer::start_with(
        None,
        &["--sanitize-dump-payload", "yes", "--databases", "4"],
    )
    .await
    .unwrap();
    scratch
        .cli(&[
            "-n",
            "0",
            "SET",
            "backup-worker:verify-slot:1",
            "another",
            "PX",
            "600000",
        ])
        .await
        .unwrap();
    scratch
        .cli(&["-n", "1", "MSET", "theirs:a", "1", "theirs:b", "2"])
        .await
        .unwrap();
    scratch
        .cli(&[
            "-n", "2", "MSET", "stale:a", "1", "stale:b", "2", "stale:c", "3",
        ])
        .await
        .unwrap();
    let (a, b) = tokio::join!(source(20_000, 0), source(300, 7));
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), Some(&scratch.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let ra = insert_resource(&pool, team, "redis", &a.url())
        .await
        .unwrap();
    let rb = insert_resource(&pool, team, "redis", &b.url())
        .await
        .unwrap();
    let ba = back_up(&d, ra).await.unwrap();
    let bb = back_up(&d, rb).await.unwrap();

    // Two replicas' verifiers at once.
    let (va, vb) = (Verifier::new(d.clone()), Verifier::new(d.clone()));
    let (ra, rb) = tokio::join!(va.verify_now(ba), vb.verify_now(bb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.status, "verified", "{ra:?}");
    assert_eq!(rb.status, "verified", "{rb:?}");
    assert_eq!(
        ra.detail["databases"],
        serde_json::json!({"0": 20000}),
        "{}",
        ra.detail
    );
    assert_eq!(ra.detail["counted"], serde_json::json!({"0": 20000}));
    assert_eq!(
        rb.detail["databases"],
        serde_json::json!({"0": 300, "2": 7}),
        "{}",
        rb.detail
    );
    assert_eq!(rb.detail["counted"], serde_json::json!({"0": 300, "2": 7}));
    for r in [&ra, &rb] {
        let slot = r.detail["scratch_db"].as_i64().unwrap();
        assert!(
            (2..=3).contains(&slot),
            "slot 1 is someone else's: {}",
            r.detail
        );
    }
    // The other holder's keys and lease are untouched; the stale slot and ours are empty.
    assert_eq!(keyspace(&scratch).await, [(0, 1), (1, 2)]);
    assert_eq!(slot_leases(&scratch).await, ["backup-worker:verify-slot:1"]);
}

#[sqlx::test]
async fn with_one_scratch_database_verifications_take_turns(pool: PgPool) {
    let scratch = RedisServer::start_with(
        None,
        &["--sanitize-dump-payload", "yes", "--databases", "2"],
    )
    .await
    .unwrap();
    let (a, b) = tokio::join!(source(5_000, 3), source(800, 0));
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), Some(&scratch.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let ra = insert_resource(&pool, team, "redis", &a.url())
        .await
        .unwrap();
    let rb = insert_resource(&pool, team, "redis", &b.url())
        .await
        .unwrap();
    let ba = back_up(&d, ra).await.unwrap();
    let bb = back_up(&d, rb).await.unwrap();
    let (va, vb) = (Verifier::new(d.clone()), Verifier::new(d.clone()));
    let (ra, rb) = tokio::join!(va.verify_now(ba), vb.verify_now(bb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.status, "verified", "{ra:?}");
    assert_eq!(rb.status, "verified", "{rb:?}");
    assert_eq!(
        ra.detail["counted"],
        serde_json::json!({"0": 5000, "2": 3}),
        "{}",
        ra.detail
    );
    assert_eq!(
        rb.detail["counted"],
        serde_json::json!({"0": 800}),
        "{}",
        rb.detail
    );
    assert_eq!(keyspace(&scratch).await, []);
}

#[sqlx::test]
async fn a_scratch_server_down_or_refusing_the_login_is_not_the_backups_fault(pool: PgPool) {
    let src = RedisServer::start(None).await.unwrap();
    src.populate(20).await.unwrap();
    let scratch = RedisServer::start_with(Some("right-pw"), SANITIZE)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = deps(&pool, dir.path(), None).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let b = back_up(&setup, r).await.unwrap();
    let down = format!("redis://127.0.0.1:{}", free_port().unwrap());
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", scratch.port);
    for (url, reason) in [(down.as_str(), "unreachable"), (wrong.as_str(), "auth")] {
        let d = deps(&pool, dir.path(), Some(url)).await;
        let report = verify(&d, b).await;
        assert_ne!(report.status, "verified", "{report:?}");
        assert_eq!(report.failure_reason.as_deref(), Some(reason), "{report:?}");
        assert_eq!(report.detail["backup_at_fault"], false, "{}", report.detail);
        assert_eq!(
            verify_status(&pool, b).await,
            None,
            "nothing blamed on the backup"
        );
        assert!(!format!("{report:?}").contains("wrong-pw"));
    }
    let fresh: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups WHERE resource_id = $1 AND id <> $2",
    )
    .bind(r)
    .bind(b)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(fresh, 0, "no fresh backup for the environment's failure");
}

#[sqlx::test]
async fn an_rdb_older_than_version_5_has_no_checksum_and_is_valid(pool: PgPool) {
    // Hand-written RDB 4 (Redis 2.4 era): old encodings, a seconds expiry, two databases, and
    // the EOF opcode as the last byte — no checksum.
    let mut rdb = b"REDIS0004".to_vec();
    rdb.extend_from_slice(&[0xfe, 0]);
    rdb.extend_from_slice(b"\x00\x01s\x05hello");
    rdb.extend_from_slice(b"\x01\x01l\x03\x01a\x01b\x01c");
    rdb.extend_from_slice(b"\x02\x03set\x02\x01x\x01y");
    rdb.extend_from_slice(b"\x03\x01z\x02\x01m\x031.5\x01n\x012");
    rdb.extend_from_slice(b"\x04\x01h\x02\x02f1\x02v1\x02f2\x02v2");
    rdb.push(0xfd);
    rdb.extend_from_slice(&2_000_000_000i32.to_le_bytes());
    rdb.extend_from_slice(b"\x00\x03ttl\x01x");
    rdb.extend_from_slice(&[0xfe, 2]);
    rdb.extend_from_slice(b"\x00\x05other\x011");
    rdb.push(0xff);
    let scratch = RedisServer::start_with(None, SANITIZE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for scratch_url in [Some(scratch.url()), None] {
        let d = deps(&pool, dir.path(), scratch_url.as_deref()).await;
        let b = backup_of_rdb(&d, &rdb).await;
        let report = verify(&d, b).await;
        assert_eq!(report.status, "verified", "{report:?}");
        assert_eq!(
            report.detail["databases"],
            serde_json::json!({"0": 6, "2": 1}),
            "{}",
            report.detail
        );
        if scratch_url.is_some() {
            assert_eq!(
                report.detail["counted"],
                serde_json::json!({"0": 6, "2": 1})
            );
        }
    }
}

#[sqlx::test]
async fn a_scratch_server_older_than_the_backup_is_the_environments_fault(pool: PgPool) {
    // Redis 7.0 payloads (RDB 10) into a Redis 6.2 scratch server (RDB 9): the verifier's to
    // fix (run a newer scratch server), not the backup's.
    let src = RedisServer::start(None).await.unwrap();
    src.populate(10).await.unwrap();
    let old = RedisServer::start_old(None).await.unwrap();
    old.cli(&["CONFIG", "SET", "sanitize-dump-payload", "yes"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), Some(&old.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let b = back_up(&d, r).await.unwrap();
    let report = verify(&d, b).await;
    assert_eq!(report.status, "failed", "{report:?}");
    assert_eq!(report.failure_reason.as_deref(), Some("config"));
    assert_eq!(report.detail["backup_at_fault"], false, "{}", report.detail);
    let why = report.internal_detail.as_deref().unwrap();
    assert!(why.contains("VERIFY_REDIS_URL at least as new"), "{why}");
    assert_eq!(verify_status(&pool, b).await, None);
    assert_eq!(keyspace(&old).await, []);
}

#[sqlx::test]
async fn multi_mib_values_restore_within_the_byte_budget(pool: PgPool) {
    // Incompressible 3 MiB values: a batch under 4 MiB holds budget the reader needs for the
    // next key, so the batch must go out before the verifier waits for it.
    let src = RedisServer::start(None).await.unwrap();
    let scratch = RedisServer::start_with(None, SANITIZE).await.unwrap();
    let mut c = src.admin(0).await.unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..4 {
        let value: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _: () = redis::cmd("SET")
            .arg(format!("big{i}"))
            .arg(value)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let d = deps(&pool, dir.path(), Some(&scratch.url())).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let r = insert_resource(&pool, team, "redis", &src.url())
        .await
        .unwrap();
    let b = back_up(&d, r).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), verify(&d, b))
        .await
        .expect("the verification finishes");
    assert_eq!(report.status, "verified", "{report:?}");
    assert_eq!(report.detail["counted"], serde_json::json!({"0": 4}));
}
