//! Restores (DESIGN §6) on real parts: a private Postgres (password auth, a non-superuser owner
//! role), real pg_dump/pg_restore/psql, real redis-servers, the S3-protocol server; a fake
//! mongorestore for MongoDB.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use backup_worker::app::Deps;
use backup_worker::health::Heartbeat;
use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::{Loop, PassContext};
use backup_worker::process::Tools;
use backup_worker::storage::{put_reader, Metadata, ObjectStore};
use backup_worker_testkit::{test_config, test_deps, PgServer, RedisServer, S3Server};
use sqlx::{Connection, Executor, PgConnection, PgPool, Row as _};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn ctx() -> PassContext {
    PassContext {
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        heartbeat: Heartbeat::detached("test"),
    }
}

fn deps(pool: &PgPool, store: Arc<dyn ObjectStore>, tools: Tools) -> Deps {
    let mut d = test_deps(pool.clone(), store, test_config(&[]).unwrap()).unwrap();
    d.tools = tools;
    d
}

/// Deps over a local-directory store in a fresh temporary directory (kept alive by the caller).
async fn local_deps(pool: &PgPool, tools: Tools) -> (tempfile::TempDir, Deps) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    (dir, deps(pool, store, tools))
}

async fn team(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn resource(pool: &PgPool, team: Uuid, ty: &str, url: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3) RETURNING id")
        .bind(team)
        .bind(ty)
        .bind(url)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Backs `resource` up through the real backups loop and returns the succeeded backup's id.
async fn back_up(d: &Deps, resource: Uuid) -> Uuid {
    let id = backup_worker::commands::enqueue_backup(&d.pool, resource)
        .await
        .unwrap();
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_backups WHERE id = $1")
            .bind(id)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    id
}

async fn restore(
    d: &Deps,
    backup: Uuid,
    into: Uuid,
) -> (Uuid, String, Option<String>, Option<String>) {
    let id = backup_worker::commands::enqueue_restore(&d.pool, backup, Some(into))
        .await
        .unwrap();
    Restores::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, reason, detail): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM resource_restores WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    (id, status, reason, detail)
}

/// A database owned by a non-superuser role, as the platform provisions them.
async fn owned_database(pg: &PgServer, db: &str, role: &str, password: &str) -> String {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let _ = admin
        .execute(format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'").as_str())
        .await;
    admin
        .execute(format!("CREATE DATABASE {db} OWNER {role}").as_str())
        .await
        .unwrap();
    format!("postgres://{role}:{password}@127.0.0.1:{}/{db}", pg.port)
}

const RICH_SCHEMA: &str = r#"
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE people (id serial PRIMARY KEY, name text NOT NULL, mood mood, photo bytea, bio text);
    CREATE INDEX people_name_idx ON people (name);
    INSERT INTO people (name, mood, photo, bio)
         SELECT 'person ' || i, (ARRAY['sad', 'ok', 'happy'])[1 + i % 3]::mood,
                decode(md5(i::text), 'hex'), 'ünïcødé ✓ 日本語 — ' || i
           FROM generate_series(1, 500) AS i;
    CREATE TABLE events (id bigint, at date, payload text) PARTITION BY RANGE (at);
    CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    INSERT INTO events SELECT i, date '2025-06-01' + (i % 400), 'event ' || i FROM generate_series(1, 1000) AS i;
    CREATE VIEW happy_people AS SELECT id, name FROM people WHERE mood = 'happy';
    CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT upper(t) || '!' $$;
    CREATE SEQUENCE invoice_seq START 1000;
    SELECT setval('invoice_seq', 1234);
    CREATE TABLE docs (name text PRIMARY KEY, blob oid);
    INSERT INTO docs VALUES ('manual', lo_from_bytea(0, '\x00010203deadbeef'::bytea || convert_to('large object ✓', 'UTF8')));
"#;

/// Everything a rewind must bring back, as comparable text.
async fn fingerprint(url: &str) -> BTreeMap<String, String> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = BTreeMap::new();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'S', 'i') ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    out.insert("relations".into(), tables.join(","));
    for t in ["people", "events", "events_2025", "docs"] {
        let q = format!(
            "SELECT coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-') FROM {t} x"
        );
        let v: String = sqlx::query_scalar(&q)
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| format!("error: {e}"));
        out.insert(format!("table {t}"), v);
    }
    for (name, q) in [
        ("view", "SELECT count(*)::text FROM happy_people"),
        ("function", "SELECT shout('hi')"),
        ("sequence", "SELECT last_value::text FROM invoice_seq"),
        (
            "large object",
            "SELECT encode(lo_get(blob), 'hex') FROM docs WHERE name = 'manual'",
        ),
        (
            "enum",
            "SELECT string_agg(e::text, ',') FROM unnest(enum_range(NULL::mood)) e",
        ),
    ] {
        let v = match sqlx::query(q).fetch_one(&mut c).await {
            Ok(row) => row.try_get::<String, _>(0).unwrap_or_default(),
            Err(e) => format!("error: {e}"),
        };
        out.insert(name.into(), v);
    }
    out
}

async fn damage(url: &str) {
    let mut c = PgConnection::connect(url).await.unwrap();
    c.execute(
        r"DELETE FROM people WHERE id < 100;
         UPDATE events SET payload = 'overwritten' WHERE id % 7 = 0;
         DROP VIEW happy_people;
         CREATE TABLE intruder (x int); INSERT INTO intruder VALUES (1);
         SELECT setval('invoice_seq', 5000);
         SELECT lo_put(blob, 0, '\xffff'::bytea) FROM docs;",
    )
    .await
    .unwrap();
}

#[sqlx::test]
async fn postgres_round_trip_rewinds_a_rich_database(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(s3.store("backups").await.unwrap());
    let d = deps(&pool, store.clone(), Tools::default());
    let url = owned_database(&pg, "shop", "app", "app-pw-31").await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(RICH_SCHEMA)
        .await
        .unwrap();
    let before = fingerprint(&url).await;
    assert!(
        !before.values().any(|v| v.starts_with("error")),
        "{before:?}"
    );

    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    damage(&url).await;
    assert_ne!(fingerprint(&url).await, before);

    let (id, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    let after = fingerprint(&url).await;
    assert_eq!(after, before, "the database is the backup's again");
    assert!(
        !after["relations"].contains("intruder"),
        "objects created since are gone"
    );
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1")
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["restore.succeeded"]);
    assert!(d.metrics.render().contains(
        "instant_customer_restore_by_type_total{resource_type=\"postgres\",result=\"ok\"} 1"
    ));

    // Clone: the same backup into another (empty) database of the same team.
    let clone_url = owned_database(&pg, "shop_clone", "app", "app-pw-31").await;
    let clone = resource(&pool, t, "postgres", &clone_url).await;
    let (_, status, reason, detail) = restore(&d, backup, clone).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(fingerprint(&clone_url).await, before);

    // Another team's resource can never be restored from this backup.
    let other_team = team(&pool).await;
    let other_url = owned_database(&pg, "theirs", "app", "app-pw-31").await;
    let other = resource(&pool, other_team, "postgres", &other_url).await;
    let untouched = fingerprint(&other_url).await;
    let (_, status, reason, _) = restore(&d, backup, other).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config"))
    );
    assert_eq!(fingerprint(&other_url).await, untouched);
}

/// What a superuser's rewind must also bring back: schemas, `public`'s owner and grants,
/// extensions and the data that depends on them.
async fn superuser_extras(url: &str) -> Vec<String> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = Vec::new();
    for q in [
        "SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace
          WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'",
        "SELECT nspowner::regrole::text || ' ' || coalesce(nspacl::text, '-')
           FROM pg_namespace WHERE nspname = 'public'",
        "SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension",
        "SELECT count(*)::text FROM tags WHERE name = 'RUST'",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM sales.orders",
    ] {
        out.push(
            match sqlx::query_scalar::<_, String>(q).fetch_one(&mut c).await {
                Ok(v) => v,
                Err(e) => format!("error: {e}"),
            },
        );
    }
    out
}

#[sqlx::test]
async fn postgres_rewind_through_a_superuser_connection(pool: PgPool) {
    // A superuser owns the catalogs: the rewind drops the user schemas instead and recreates
    // `public` with its owner and initial grants (the dump's privileges are differences from
    // those), so `=U/pg_database_owner` must survive.
    let pg = PgServer::start().await.unwrap();
    let url = pg.create_database("shop").await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    c.execute(RICH_SCHEMA).await.unwrap();
    c.execute(
        "CREATE EXTENSION citext;
         CREATE TABLE tags (name citext PRIMARY KEY); INSERT INTO tags VALUES ('Rust');
         CREATE SCHEMA sales; CREATE TABLE sales.orders (id int); INSERT INTO sales.orders VALUES (1), (2);",
    )
    .await
    .unwrap();
    let before = (fingerprint(&url).await, superuser_extras(&url).await);
    assert!(
        !before.1.iter().any(|v| v.starts_with("error")),
        "{before:?}"
    );

    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    damage(&url).await;
    c.execute(
        "DELETE FROM sales.orders WHERE id = 1; CREATE SCHEMA newer; CREATE TABLE newer.t (x int);
         CREATE EXTENSION hstore;",
    )
    .await
    .unwrap();
    assert_ne!(
        (fingerprint(&url).await, superuser_extras(&url).await),
        before
    );

    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert!(
        !detail.unwrap_or_default().contains(&pg.password),
        "no secret in the row"
    );
    assert_eq!(
        (fingerprint(&url).await, superuser_extras(&url).await),
        before,
        "schemas, grants, extensions, objects and rows are the backup's"
    );
}

#[sqlx::test]
async fn a_restore_that_fails_midway_leaves_the_database_unchanged(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let url = owned_database(&pg, "shop", "app", "app-pw-32").await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(RICH_SCHEMA)
        .await
        .unwrap();
    // A schema owned by someone else that `app` can read (so pg_dump includes it) but cannot
    // create: replaying the dump as `app` fails partway, after the clearing already ran.
    let mut admin = PgConnection::connect(&pg.url("shop")).await.unwrap();
    admin
        .execute(
            "CREATE ROLE auditor; CREATE SCHEMA reports AUTHORIZATION auditor;
             CREATE TABLE reports.daily (d date); INSERT INTO reports.daily VALUES ('2026-11-01');
             ALTER TABLE reports.daily OWNER TO auditor;
             GRANT USAGE ON SCHEMA reports TO app; GRANT SELECT ON reports.daily TO app;
             REVOKE CREATE ON DATABASE shop FROM PUBLIC, app;",
        )
        .await
        .unwrap();
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    damage(&url).await;
    let damaged = fingerprint(&url).await;

    // The target rejects a statement deterministically: conflict (not retried), naming the
    // object being restored.
    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("conflict")),
        "{detail:?}"
    );
    let text = detail.as_deref().unwrap_or_default();
    assert!(text.contains("rolled back"), "{detail:?}");
    assert!(text.contains("(in SCHEMA reports)"), "{detail:?}");
    assert!(!detail.unwrap_or_default().contains("app-pw-32"));
    assert_eq!(
        fingerprint(&url).await,
        damaged,
        "nothing changed: not even DROP OWNED survived"
    );
}

#[sqlx::test]
async fn a_corrupt_object_is_refused_before_anything_is_touched(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(s3.store("backups").await.unwrap());
    let d = deps(&pool, store.clone(), Tools::default());
    let url = owned_database(&pg, "shop", "app", "app-pw-33").await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(RICH_SCHEMA)
        .await
        .unwrap();
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    damage(&url).await;
    let damaged = fingerprint(&url).await;

    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut bytes = Vec::new();
    store
        .get(&key)
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4] {
        *b ^= 0xff;
    }
    put_reader(store.as_ref(), &key, &bytes[..], Metadata::new())
        .await
        .unwrap();

    let (id, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("integrity")),
        "{detail:?}"
    );
    assert!(detail.unwrap().contains("sha256"));
    assert_eq!(fingerprint(&url).await, damaged, "target untouched");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1")
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["restore.failed"]);
}

/// Every key of the given databases: type, encoding, value and TTL presence. Values are read per
/// type and sorted where Redis keeps no order: a hashtable's DUMP order depends on the per-process
/// hash seed, so raw DUMP bytes differ between two servers holding the same set.
async fn redis_snapshot_of(
    r: &RedisServer,
    dbs: &[&str],
) -> BTreeMap<String, (String, String, bool)> {
    let mut out = BTreeMap::new();
    for db in dbs {
        let keys = r.cli(&["-n", db, "--scan"]).await.unwrap();
        for key in keys.lines().filter(|k| !k.is_empty()) {
            let ty = cli_in(r, db, &["TYPE", key]).await;
            let encoding = cli_in(r, db, &["OBJECT", "ENCODING", key]).await;
            let value = match ty.as_str() {
                "string" => {
                    let len: usize = cli_in(r, db, &["STRLEN", key])
                        .await
                        .trim_start_matches("(integer) ")
                        .parse()
                        .unwrap();
                    if len > 1 << 20 {
                        // Big values: length and both ends (redis-cli prints them whole otherwise).
                        let head = cli_in(r, db, &["GETRANGE", key, "0", "63"]).await;
                        let from = (len - 64).to_string();
                        let tail = cli_in(r, db, &["GETRANGE", key, &from, "-1"]).await;
                        format!("len {len} {head} … {tail}")
                    } else {
                        cli_in(r, db, &["GET", key]).await
                    }
                }
                "list" => cli_in(r, db, &["LRANGE", key, "0", "-1"]).await,
                "zset" => cli_in(r, db, &["ZRANGE", key, "0", "-1", "WITHSCORES"]).await,
                "stream" => {
                    let groups = cli_in(r, db, &["XINFO", "GROUPS", key]).await;
                    let mut pending = String::new();
                    for g in groups.lines().filter(|l| l.contains("group-")) {
                        let name = g.rsplit(' ').next().unwrap().trim_matches('"');
                        pending.push_str(
                            &cli_in(r, db, &["XPENDING", key, name, "-", "+", "100"]).await,
                        );
                    }
                    // Delivery times are not compared (XPENDING's idle time moves on).
                    let pending: String = pending
                        .lines()
                        .filter(|l| !l.contains(") (integer)") || l.contains("4)"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    format!(
                        "{}\n{}\n{pending}",
                        cli_in(r, db, &["XRANGE", key, "-", "+"]).await,
                        groups
                            .lines()
                            .filter(|l| !l.contains("lag") && !l.contains("entries-read"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                }
                "hash" => sorted_lines(cli_in(r, db, &["HGETALL", key]).await, 2),
                "set" => sorted_lines(cli_in(r, db, &["SMEMBERS", key]).await, 1),
                other => panic!("unexpected type {other}"),
            };
            let ttl: i64 = cli_in(r, db, &["PTTL", key])
                .await
                .trim_start_matches("(integer) ")
                .parse()
                .unwrap();
            out.insert(
                format!("{db}/{key}"),
                (format!("{ty}/{encoding}"), value, ttl > 0),
            );
        }
    }
    out
}

async fn redis_snapshot(r: &RedisServer) -> BTreeMap<String, (String, String, bool)> {
    redis_snapshot_of(r, &["0", "2", "3", "5"]).await
}

async fn cli_in(r: &RedisServer, db: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", db, "--no-raw"];
    full.extend(args);
    r.cli(&full).await.unwrap().trim().to_owned()
}

/// Sorts redis-cli's numbered reply lines in groups of `group` (field/value pairs stay together),
/// dropping the "1) " numbering.
fn sorted_lines(reply: String, group: usize) -> String {
    let items: Vec<String> = reply
        .lines()
        .map(|l| l.split_once(") ").map_or(l, |(_, v)| v).to_owned())
        .collect();
    let mut groups: Vec<String> = items.chunks(group).map(|c| c.join("=")).collect();
    groups.sort();
    groups.join("\n")
}

/// Every type and encoding a Redis of this version writes, in three databases, with TTLs, big
/// values and a stream with consumer groups and pending entries.
async fn populate_every_type(redis: &RedisServer) {
    redis.populate(50).await.unwrap();
    let big_list: Vec<String> = (0..5000).map(|i| format!("item-{i}")).collect();
    let big_hash: Vec<String> = (0..1000)
        .flat_map(|i| {
            [
                format!("field-{i}"),
                format!("value {i} {}", "x".repeat(40)),
            ]
        })
        .collect();
    let big_set: Vec<String> = (0..1000).map(|i| format!("member-{i}")).collect();
    let int_set: Vec<String> = (0..100).map(|i| (i * 7).to_string()).collect();
    let big_zset: Vec<String> = (0..1000)
        .flat_map(|i| [format!("{}.5", i), format!("z-{i}")])
        .collect();
    let mut cmds: Vec<Vec<String>> = vec![
        vec![
            "RPUSH".into(),
            "list".into(),
            "a".into(),
            "b".into(),
            "c".into(),
        ],
        vec![
            "HSET".into(),
            "hash".into(),
            "f1".into(),
            "v1".into(),
            "f2".into(),
            "v2".into(),
        ],
        vec![
            "SADD".into(),
            "set".into(),
            "x".into(),
            "y".into(),
            "z".into(),
        ],
        vec![
            "ZADD".into(),
            "zset".into(),
            "1".into(),
            "one".into(),
            "2.5".into(),
            "two".into(),
        ],
        vec!["SET".into(), "int".into(), "12345".into()],
        vec!["SET".into(), "negative".into(), "-9000000000".into()],
        vec!["SET".into(), "compressible".into(), "abc".repeat(30_000)],
        vec![
            "SET".into(),
            "ttl-key".into(),
            "expires".into(),
            "EX".into(),
            "3600".into(),
        ],
        vec!["SET".into(), "unicode".into(), "ünïcødé ✓".into()],
        // 50 MB: far beyond a pipe buffer and a batch.
        vec![
            "SETRANGE".into(),
            "huge".into(),
            "52428799".into(),
            "!".into(),
        ],
        vec![
            "-n".into(),
            "3".into(),
            "SET".into(),
            "db3-key".into(),
            "in db 3".into(),
        ],
        vec![
            "-n".into(),
            "3".into(),
            "HSET".into(),
            "db3-hash".into(),
            "a".into(),
            "1".into(),
        ],
        vec![
            "-n".into(),
            "3".into(),
            "EXPIRE".into(),
            "db3-hash".into(),
            "7200".into(),
        ],
        vec![
            "-n".into(),
            "2".into(),
            "SADD".into(),
            "db2-set".into(),
            "1".into(),
            "2".into(),
        ],
        vec![
            "XADD".into(),
            "stream".into(),
            "1-1".into(),
            "field".into(),
            "value".into(),
        ],
        vec![
            "XADD".into(),
            "stream".into(),
            "2-1".into(),
            "field".into(),
            "second".into(),
        ],
        vec![
            "XADD".into(),
            "stream".into(),
            "3-1".into(),
            "field".into(),
            "third".into(),
        ],
        vec![
            "XGROUP".into(),
            "CREATE".into(),
            "stream".into(),
            "group-a".into(),
            "0".into(),
        ],
        vec![
            "XGROUP".into(),
            "CREATE".into(),
            "stream".into(),
            "group-b".into(),
            "$".into(),
        ],
        vec![
            "XREADGROUP".into(),
            "GROUP".into(),
            "group-a".into(),
            "alice".into(),
            "COUNT".into(),
            "2".into(),
            "STREAMS".into(),
            "stream".into(),
            ">".into(),
        ],
        vec![
            "XREADGROUP".into(),
            "GROUP".into(),
            "group-a".into(),
            "bob".into(),
            "COUNT".into(),
            "1".into(),
            "STREAMS".into(),
            "stream".into(),
            ">".into(),
        ],
        vec![
            "XACK".into(),
            "stream".into(),
            "group-a".into(),
            "1-1".into(),
        ],
    ];
    let mut push = |name: &str, mut items: Vec<String>| {
        let mut c = vec![name.to_owned()];
        c.append(&mut items);
        cmds.push(c);
    };
    let mut l = vec!["big-list".to_owned()];
    l.extend(big_list);
    push("RPUSH", l);
    let mut h = vec!["big-hash".to_owned()];
    h.extend(big_hash);
    push("HSET", h);
    let mut st = vec!["big-set".to_owned()];
    st.extend(big_set);
    push("SADD", st);
    let mut is = vec!["int-set".to_owned()];
    is.extend(int_set);
    push("SADD", is);
    let mut z = vec!["big-zset".to_owned()];
    z.extend(big_zset);
    push("ZADD", z);
    for c in &cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        redis.cli(&args).await.unwrap();
    }
}

/// Backup → damage → restore of a Redis of the given kind, compared per type.
async fn redis_round_trip(pool: &PgPool, redis: &RedisServer, also_damage: &[&str]) {
    populate_every_type(redis).await;
    let before = redis_snapshot(redis).await;
    assert!(before.len() > 60);
    assert!(before["0/ttl-key"].2 && before["3/db3-hash"].2);
    for (key, enc) in [
        ("0/big-list", "quicklist"),
        ("0/big-hash", "hashtable"),
        ("0/big-set", "hashtable"),
        ("0/int-set", "intset"),
        ("0/big-zset", "skiplist"),
        ("0/int", "int"),
    ] {
        assert!(before[key].0.contains(enc), "{key}: {:?}", before[key].0);
    }

    let (_dir, d) = local_deps(pool, Tools::default()).await;
    let t = team(pool).await;
    let res = resource(pool, t, "redis", &redis.url()).await;
    let backup = back_up(&d, res).await;
    let mode: Option<String> =
        sqlx::query_scalar("SELECT dump_mode FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(mode.as_deref(), Some("instance"));

    for cmd in [
        vec!["DEL", "list", "key:1", "huge"],
        vec!["SET", "unicode", "changed"],
        vec!["PERSIST", "ttl-key"],
        vec!["SET", "added-after", "1"],
        vec!["LPOP", "big-list"],
        vec!["XACK", "stream", "group-a", "2-1"],
        vec!["-n", "3", "SET", "db3-added", "1"],
        vec!["-n", "3", "DEL", "db3-key"],
        vec![
            "-n",
            "5",
            "SET",
            "db5-added",
            "a database the backup has no keys in",
        ],
    ] {
        redis.cli(&cmd).await.unwrap();
    }
    if !also_damage.is_empty() {
        redis.cli(also_damage).await.unwrap();
    }
    assert_ne!(redis_snapshot(redis).await, before);

    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(
        redis_snapshot(redis).await,
        before,
        "same keys, types, encodings, values, consumer groups and TTLs"
    );
}

#[sqlx::test]
async fn redis_round_trip_keeps_every_type_value_and_ttl(pool: PgPool) {
    let redis = RedisServer::start(Some("redis-restore-pw")).await.unwrap();
    // A function library (Redis 7): restored with FUNCTION RESTORE into instance resources.
    redis
        .cli(&[
            "FUNCTION",
            "LOAD",
            "#!lua name=mylib\nredis.register_function('myfunc', function(keys, args) return 'from backup' end)",
        ])
        .await
        .unwrap();
    redis_round_trip(&pool, &redis, &["FUNCTION", "DELETE", "mylib"]).await;
    assert_eq!(
        redis.cli(&["FCALL", "myfunc", "0"]).await.unwrap().trim(),
        "from backup",
        "the function library is back"
    );
}

#[sqlx::test]
async fn a_key_larger_than_the_targets_proto_max_bulk_len_fails_config_before_flushing(
    pool: PgPool,
) {
    let source = RedisServer::start(None).await.unwrap();
    source.populate(10).await.unwrap();
    // 3 MB that LZF cannot shrink (the payload, not the value, is what travels).
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..30 {
        let mut chunk = String::with_capacity(100_000);
        while chunk.len() < 100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.push_str(&format!("{state:016x}"));
        }
        source.cli(&["APPEND", "too-big", &chunk]).await.unwrap();
    }
    let target = RedisServer::start(None).await.unwrap();
    target
        .cli(&["CONFIG", "SET", "proto-max-bulk-len", "1mb"])
        .await
        .unwrap();
    target
        .cli(&["SET", "precious", "still here"])
        .await
        .unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let from = resource(&pool, t, "redis", &source.url()).await;
    let into = resource(&pool, t, "redis", &target.url()).await;
    let backup = back_up(&d, from).await;
    let (_, status, reason, detail) = restore(&d, backup, into).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail:?}"
    );
    let detail = detail.unwrap();
    assert!(
        detail.contains("too-big") && detail.contains("proto-max-bulk-len"),
        "{detail}"
    );
    assert_eq!(
        target.cli(&["GET", "precious"]).await.unwrap().trim(),
        "still here"
    );
}

#[sqlx::test]
async fn redis_6_2_round_trip_keeps_every_type_value_and_ttl(pool: PgPool) {
    let redis = RedisServer::start_old(Some("redis-62-pw")).await.unwrap();
    assert!(redis
        .cli(&["INFO", "server"])
        .await
        .unwrap()
        .contains("redis_version:6.2"));
    redis_round_trip(&pool, &redis, &[]).await;
}

#[sqlx::test]
async fn a_one_database_resource_is_that_database_only(pool: PgPool) {
    let redis = RedisServer::start(Some("one-db-pw")).await.unwrap();
    for (db, key) in [("0", "zero"), ("3", "three"), ("5", "five")] {
        redis.cli(&["-n", db, "SET", key, "before"]).await.unwrap();
        redis
            .cli(&["-n", db, "HSET", &format!("{key}-h"), "f", "v"])
            .await
            .unwrap();
    }
    redis
        .cli(&["-n", "3", "EXPIRE", "three-h", "900"])
        .await
        .unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "redis", &redis.url_db(3)).await;
    let backup = back_up(&d, res).await;
    let mode: Option<String> =
        sqlx::query_scalar("SELECT dump_mode FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        mode.as_deref(),
        Some("keyspace"),
        "one database: the worker's own dump"
    );
    let db3_at_backup = redis_snapshot_of(&redis, &["3"]).await;

    for db in ["0", "3", "5"] {
        redis
            .cli(&["-n", db, "SET", "added", "after"])
            .await
            .unwrap();
        redis
            .cli(&[
                "-n",
                db,
                "DEL",
                &format!(
                    "{}-h",
                    match db {
                        "0" => "zero",
                        "3" => "three",
                        _ => "five",
                    }
                ),
            ])
            .await
            .unwrap();
    }
    let others = redis_snapshot_of(&redis, &["0", "5"]).await;

    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(redis_snapshot_of(&redis, &["3"]).await, db3_at_backup);
    assert_eq!(
        redis_snapshot_of(&redis, &["0", "5"]).await,
        others,
        "databases 0 and 5 exactly as they were"
    );
}

#[sqlx::test]
async fn a_pooled_tenant_without_sync_backs_up_and_restores_only_its_keys(pool: PgPool) {
    let redis = RedisServer::start(Some("admin-pw")).await.unwrap();
    // A pooled tenant: its own key pattern, no SYNC, no FLUSHDB, no INFO/CONFIG (admin and
    // dangerous commands), but DUMP/RESTORE on its keys.
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "tenant1",
            "on",
            ">tenant1-pw",
            "~tenant1:*",
            "+@all",
            "-@admin",
            "-@dangerous",
            "+restore",
        ])
        .await
        .unwrap();
    for i in 0..300 {
        redis
            .cli(&["SET", &format!("tenant1:k{i}"), &format!("mine {i}")])
            .await
            .unwrap();
    }
    redis.cli(&["HSET", "tenant1:h", "a", "1"]).await.unwrap();
    redis.cli(&["EXPIRE", "tenant1:h", "3600"]).await.unwrap();
    redis
        .cli(&["SET", "tenant2:secret", "not yours"])
        .await
        .unwrap();
    redis
        .cli(&["-n", "1", "SET", "tenant2:elsewhere", "not yours either"])
        .await
        .unwrap();
    let url = format!("redis://tenant1:tenant1-pw@127.0.0.1:{}", redis.port);

    let (dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "redis", &url).await;
    let backup = back_up(&d, res).await;
    let (mode, key): (Option<String>, String) =
        sqlx::query_as("SELECT dump_mode, object_key FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        mode.as_deref(),
        Some("keyspace"),
        "SYNC refused: keyspace mode"
    );
    let audit: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE subject_id = $1 AND kind = 'backup.succeeded'",
    )
    .bind(backup)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audit["dump_mode"], "keyspace");
    // The stored RDB holds the tenant's keys and nothing else.
    let mut raw = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(dir.path().join(&key)).unwrap()),
        &mut raw,
    )
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with(b"REDIS") && text.contains("tenant1:k299"));
    assert!(!text.contains("tenant2") && !text.contains("not yours"));

    redis.cli(&["DEL", "tenant1:k7"]).await.unwrap();
    redis.cli(&["SET", "tenant1:added", "after"]).await.unwrap();
    redis
        .cli(&["SET", "tenant2:secret", "changed by tenant 2"])
        .await
        .unwrap();
    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(
        redis.cli(&["GET", "tenant1:k7"]).await.unwrap().trim(),
        "mine 7"
    );
    assert_eq!(
        redis
            .cli(&["EXISTS", "tenant1:added"])
            .await
            .unwrap()
            .trim(),
        "0"
    );
    assert_ne!(
        redis.cli(&["PTTL", "tenant1:h"]).await.unwrap().trim(),
        "-1"
    );
    assert_eq!(
        redis.cli(&["GET", "tenant2:secret"]).await.unwrap().trim(),
        "changed by tenant 2",
        "another tenant's keys are untouched"
    );
    assert_eq!(
        redis
            .cli(&["-n", "1", "GET", "tenant2:elsewhere"])
            .await
            .unwrap()
            .trim(),
        "not yours either"
    );
}

#[sqlx::test]
async fn empty_redis_and_empty_postgres_back_up_and_restore(pool: PgPool) {
    let redis = RedisServer::start(None).await.unwrap();
    let pg = PgServer::start().await.unwrap();
    let pg_url = owned_database(&pg, "empty", "app", "app-pw-51").await;
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    for (ty, url) in [
        ("redis", redis.url()),
        ("redis", redis.url_db(4)),
        ("postgres", pg_url.clone()),
    ] {
        let res = resource(&pool, t, ty, &url).await;
        let backup = back_up(&d, res).await;
        let raw: i64 = sqlx::query_scalar("SELECT raw_bytes FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(raw < 1024, "{ty}: a tiny but complete dump ({raw} bytes)");
        let (_, status, reason, detail) = restore(&d, backup, res).await;
        assert_eq!(status, "succeeded", "{ty} {url}: {reason:?} {detail:?}");
    }
}

/// Rewrites a stored backup's raw stream with `edit` and records the new object's sha256, as if
/// the object had been written that way (a bug or a bad disk) and verified by its row.
async fn tamper(d: &Deps, backup: Uuid, edit: impl Fn(&mut Vec<u8>)) {
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&d.pool)
        .await
        .unwrap();
    let mut gz = Vec::new();
    d.store
        .get(&key)
        .await
        .unwrap()
        .read_to_end(&mut gz)
        .await
        .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    edit(&mut raw);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &raw).unwrap();
    let gz = enc.finish().unwrap();
    put_reader(d.store.as_ref(), &key, &gz[..], Metadata::new())
        .await
        .unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&gz))
    };
    sqlx::query("UPDATE resource_backups SET sha256 = $2 WHERE id = $1")
        .bind(backup)
        .bind(sha)
        .execute(&d.pool)
        .await
        .unwrap();
}

#[sqlx::test]
async fn truncated_or_bit_flipped_rdbs_fail_their_structural_check_before_the_target_is_touched(
    pool: PgPool,
) {
    let redis = RedisServer::start(None).await.unwrap();
    redis.populate(500).await.unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "redis", &redis.url()).await;
    type Edit = fn(&mut Vec<u8>);
    let edits: [(&str, Edit); 3] = [
        ("truncated", |raw| raw.truncate(raw.len() - 100)),
        ("bit-flipped", |raw| {
            let mid = raw.len() / 2;
            raw[mid] ^= 0x10;
        }),
        ("no checksum byte", |raw| {
            raw.pop();
        }),
    ];
    for (what, edit) in edits {
        let backup = back_up(&d, res).await;
        tamper(&d, backup, edit).await;
        redis.cli(&["SET", "after-backup", what]).await.unwrap();
        let (_, status, reason, detail) = restore(&d, backup, res).await;
        assert_eq!(
            (status.as_str(), reason.as_deref()),
            ("failed", Some("integrity")),
            "{what}: {detail:?}"
        );
        assert_eq!(
            redis.cli(&["GET", "after-backup"]).await.unwrap().trim(),
            what,
            "{what}: target untouched"
        );
    }

    // On the backup side: a redis-cli whose stream is cut short fails `sanity`, nothing stored.
    let fx = tempfile::tempdir().unwrap();
    let cut = fx.path().join("redis-cli");
    std::fs::write(
        &cut,
        "#!/usr/bin/env bash\n# A tool that lies: exits 0 with its RDB cut short.\nredis-cli \"$@\" | head -c 3000\n",
    )
    .unwrap();
    std::fs::set_permissions(&cut, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (store_dir, d) = local_deps(&pool, Tools::default().with_override("redis-cli", &cut)).await;
    let id = backup_worker::commands::enqueue_backup(&d.pool, res)
        .await
        .unwrap();
    Backups::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, reason, detail): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM resource_backups WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("sanity")),
        "{detail:?}"
    );
    let stored: Vec<_> = walk(store_dir.path());
    assert!(stored.is_empty(), "nothing committed: {stored:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
    out
}

#[sqlx::test]
async fn redis_backup_an_older_target_cannot_accept_fails_before_flushing(pool: PgPool) {
    // Backed up from the machine's Redis (7.x, RDB version 10)…
    let source = RedisServer::start(None).await.unwrap();
    source.populate(50).await.unwrap();
    // …restored into a real Redis 6.2, whose RESTORE refuses RDB version 10 payloads.
    let target = RedisServer::start_old(Some("old-target-pw")).await.unwrap();
    assert!(target
        .cli(&["INFO", "server"])
        .await
        .unwrap()
        .contains("redis_version:6.2"));
    target
        .cli(&["SET", "precious", "still here"])
        .await
        .unwrap();
    target
        .cli(&["-n", "2", "SET", "other-db", "also here"])
        .await
        .unwrap();
    let before = redis_snapshot(&target).await;

    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let from = resource(&pool, t, "redis", &source.url()).await;
    let into = resource(&pool, t, "redis", &target.url()).await;
    let backup = back_up(&d, from).await;

    let (id, status, reason, detail) = restore(&d, backup, into).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail:?}"
    );
    let detail = detail.unwrap();
    assert!(detail.contains("cannot accept this backup"), "{detail}");
    assert!(!detail.contains("old-target-pw"), "{detail}");
    assert_eq!(redis_snapshot(&target).await, before, "target untouched");
    let summary: String =
        sqlx::query_scalar("SELECT error_summary FROM resource_restores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        !summary.is_empty() && !summary.contains("DUMP payload"),
        "{summary}"
    );
}

/// Deps whose mongodump and mongorestore are the fakes, copied into `fx` (their calls.log too).
async fn fake_mongo_deps(pool: &PgPool) -> (tempfile::TempDir, tempfile::TempDir, Deps) {
    let fx = tempfile::tempdir().unwrap();
    let tools = Tools::default()
        .with_override("mongodump", fixture("fake-mongodump", fx.path()))
        .with_override("mongorestore", fixture("fake-mongorestore", fx.path()));
    let (dir, d) = local_deps(pool, tools).await;
    (fx, dir, d)
}

fn fixture(name: &str, dir: &Path) -> std::path::PathBuf {
    let dest = dir.join(name);
    std::fs::copy(Path::new(FIXTURES).join(name), &dest).unwrap();
    dest
}

#[sqlx::test]
async fn mongodb_restores_through_the_fake_mongorestore(pool: PgPool) {
    let (fx, _dir, d) = fake_mongo_deps(&pool).await;
    let t = team(&pool).await;
    let res = resource(
        &pool,
        t,
        "mongodb",
        "mongodb+srv://app:mongo-restore-pw@cluster0.example.net/shop?authSource=admin",
    )
    .await;
    let backup = back_up(&d, res).await;
    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");

    let bad = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-restore-pw@auth-fail:27017/shop",
    )
    .await;
    let (_, status, reason, _) = restore(&d, backup, bad).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("auth"))
    );

    let no_db = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-restore-pw@h:27017/",
    )
    .await;
    let (_, status, reason, _) = restore(&d, backup, no_db).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "never restore without a tenant db"
    );

    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap();
    let restores: Vec<&str> = calls.lines().filter(|l| l.contains("drop=")).collect();
    assert_eq!(restores.len(), 2, "{calls}");
    for line in &restores {
        assert!(
            line.contains("mode=600") && line.contains("archive=1") && line.contains("drop=1"),
            "{line}"
        );
        assert!(line.contains("ns=shop.*"), "{line}");
        assert!(!line.contains("mongo-restore-pw"), "{line}");
        let path = line
            .split_whitespace()
            .next()
            .unwrap()
            .strip_prefix("config=")
            .unwrap();
        assert!(!Path::new(path).exists(), "config file removed");
    }
    assert!(
        calls.contains("restored ns=shop.*"),
        "the archive reached mongorestore intact: {calls}"
    );
    assert!(!calls.contains("ARGV-LEAK"));
}

/// A tools directory whose pg_restore and psql record their pids (then exec the real tools).
struct RecordedTools {
    dir: tempfile::TempDir,
}

impl RecordedTools {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["pg_restore", "psql"] {
            std::fs::copy(
                Path::new(FIXTURES).join("record-pid"),
                dir.path().join(name),
            )
            .unwrap();
        }
        Self { dir }
    }
    fn tools(&self) -> Tools {
        Tools::default()
            .with_override("pg_restore", self.dir.path().join("pg_restore"))
            .with_override("psql", self.dir.path().join("psql"))
    }
    /// (tool, pid) of every run.
    fn runs(&self) -> Vec<(String, u32)> {
        std::fs::read_to_string(self.dir.path().join("pids.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (name, pid) = l.split_once(' ')?;
                Some((name.to_owned(), pid.parse().ok()?))
            })
            .collect()
    }
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// What a rewind through the tenant's role must keep or bring back in a database where the
/// platform's superuser created the extensions: rows, the trigram index, the extensions and
/// their owner and comment.
async fn extension_fingerprint(url: &str) -> Vec<String> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = Vec::new();
    for q in [
        "SELECT string_agg(extname || ' ' || extowner::regrole::text || ' ' ||
                coalesce(obj_description(oid, 'pg_extension'), '-'), ',' ORDER BY extname)
           FROM pg_extension",
        "SELECT coalesce(md5(string_agg(name::text || body, '|' ORDER BY name)), '-') FROM notes",
        "SELECT string_agg(indexname || ' ' || indexdef, ',' ORDER BY indexname) FROM pg_indexes
          WHERE schemaname = 'public'",
        "SELECT string_agg(relname::text, ',' ORDER BY relname) FROM pg_class
          WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'",
        // The types still work: citext compares case-insensitively, pg_trgm finds by similarity.
        "SELECT count(*)::text FROM notes WHERE name = 'NOTE 7'",
        "SELECT count(*)::text FROM notes WHERE body % 'body of note 42'",
    ] {
        out.push(
            match sqlx::query_scalar::<_, String>(q).fetch_one(&mut c).await {
                Ok(v) => v,
                Err(e) => format!("error: {e}"),
            },
        );
    }
    out
}

/// A tenant database as the platform provisions it: owned by `app`, with extensions the
/// superuser created, and a table using them (citext column, GIN trigram index).
async fn database_with_platform_extensions(pg: &PgServer, db: &str, pw: &str) -> String {
    let url = owned_database(pg, db, "app", pw).await;
    PgConnection::connect(&pg.url(db))
        .await
        .unwrap()
        .execute("CREATE EXTENSION citext; CREATE EXTENSION pg_trgm;")
        .await
        .unwrap();
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(
            "CREATE TABLE notes (name citext PRIMARY KEY, body text NOT NULL);
             CREATE INDEX notes_body_trgm ON notes USING gin (body gin_trgm_ops);
             INSERT INTO notes SELECT 'note ' || i, 'body of note ' || i FROM generate_series(1, 2000) i;",
        )
        .await
        .unwrap();
    url
}

#[sqlx::test]
async fn postgres_rewind_through_the_tenant_role_with_superuser_owned_extensions(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let url = database_with_platform_extensions(&pg, "tenant", "app-pw-41").await;
    let before = extension_fingerprint(&url).await;
    assert!(
        before[0].contains("citext postgres") && before[0].contains("pg_trgm postgres"),
        "{before:?}"
    );
    assert_eq!(before[4], "1", "{before:?}");
    assert!(!before.iter().any(|v| v.starts_with("error")), "{before:?}");

    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "vector", &url).await;
    let backup = back_up(&d, res).await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(
            "DELETE FROM notes WHERE name < 'note 5'; DROP INDEX notes_body_trgm;
             CREATE TABLE added_since (x int);",
        )
        .await
        .unwrap();
    assert_ne!(extension_fingerprint(&url).await, before);

    let (_, status, reason, detail) = restore(&d, backup, res).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    assert_eq!(
        extension_fingerprint(&url).await,
        before,
        "rows, index and extensions (owner, comment) as at backup time; the added table is gone"
    );

    // The same backup through the platform's superuser connection to the same database.
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute("DELETE FROM notes; CREATE TABLE added_again (x int);")
        .await
        .unwrap();
    let as_superuser = resource(&pool, t, "vector", &pg.url("tenant")).await;
    let (_, status, reason, detail) = restore(&d, backup, as_superuser).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    // (Restored objects belong to the connecting role, here the superuser: read as it.)
    assert_eq!(extension_fingerprint(&pg.url("tenant")).await, before);
}

#[sqlx::test]
async fn a_needed_extension_the_role_cannot_create_fails_config_before_anything_is_touched(
    pool: PgPool,
) {
    let pg = PgServer::start().await.unwrap();
    let url = database_with_platform_extensions(&pg, "tenant", "app-pw-42").await;
    // pg_buffercache is not a trusted extension: only a superuser can create it.
    PgConnection::connect(&pg.url("tenant"))
        .await
        .unwrap()
        .execute("CREATE EXTENSION pg_buffercache;")
        .await
        .unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;

    // A clone into a fresh database of the team, where the extensions are not installed.
    let clone_url = owned_database(&pg, "clone", "app", "app-pw-42").await;
    PgConnection::connect(&clone_url)
        .await
        .unwrap()
        .execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (42);")
        .await
        .unwrap();
    let clone = resource(&pool, t, "postgres", &clone_url).await;
    let (_, status, reason, detail) = restore(&d, backup, clone).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail:?}"
    );
    let detail = detail.unwrap();
    assert!(
        detail.contains("pg_buffercache"),
        "names the extension: {detail}"
    );
    assert!(!detail.contains("app-pw-42"), "{detail}");
    let kept: i32 = sqlx::query_scalar("SELECT x FROM precious")
        .fetch_one(&mut PgConnection::connect(&clone_url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(kept, 42, "the target was not touched");

    // Once the platform installs it, the clone restores; citext and pg_trgm are trusted, so the
    // role creates them itself.
    PgConnection::connect(&pg.url("clone"))
        .await
        .unwrap()
        .execute("CREATE EXTENSION pg_buffercache;")
        .await
        .unwrap();
    let (_, status, reason, detail) = restore(&d, backup, clone).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    let mut after = extension_fingerprint(&clone_url).await;
    let mut want = extension_fingerprint(&url).await;
    // The role created citext and pg_trgm in the clone: their owner differs, nothing else.
    after.remove(0);
    want.remove(0);
    assert_eq!(after, want);
}

/// A database whose dump is far larger than a pipe buffer (≈ 64 MB raw).
async fn large_database(pg: &PgServer, db: &str, pw: &str) -> String {
    let url = owned_database(pg, db, "app", pw).await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(
            "CREATE TABLE early (x int); INSERT INTO early VALUES (1);
             CREATE TABLE big (id int PRIMARY KEY, payload text);
             INSERT INTO big SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, 240000) i;",
        )
        .await
        .unwrap();
    url
}

#[sqlx::test]
async fn a_psql_that_fails_on_a_large_dump_ends_the_restore_at_once_classified_by_psql(
    pool: PgPool,
) {
    let pg = PgServer::start().await.unwrap();
    let url = large_database(&pg, "big", "app-pw-43").await;
    let recorded = RecordedTools::new();
    let (_dir, d) = local_deps(&pool, recorded.tools()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    let raw: i64 = sqlx::query_scalar("SELECT raw_bytes FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(raw > 50_000_000, "the dump is {raw} bytes");
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute("DELETE FROM early")
        .await
        .unwrap();

    // The password is rotated between the probe and the rewind: psql is refused while
    // pg_restore has ~64 MB to write into the pipe nobody reads any more.
    std::fs::write(recorded.dir.path().join("psql-password"), "rotated-away").unwrap();
    let (id, status, reason, detail) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        restore(&d, backup, res),
    )
    .await
    .expect("the restore must end, not hang on a full pipe");
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("auth")),
        "psql's error is what is classified: {detail:?}"
    );
    let detail = detail.unwrap();
    assert!(
        detail.contains("password authentication failed"),
        "{detail}"
    );
    assert!(
        !detail.contains("app-pw-43") && !detail.contains("rotated-away"),
        "{detail}"
    );
    let runs = recorded.runs();
    assert!(runs.iter().any(|(n, _)| n == "pg_restore") && runs.iter().any(|(n, _)| n == "psql"));
    for (name, pid) in &runs {
        assert!(!running(*pid), "{name} ({pid}) is still running");
    }
    let summary: String =
        sqlx::query_scalar("SELECT error_summary FROM resource_restores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!summary.contains("password"), "{summary}");
    // A restore text (DESIGN §6), never the backup's "couldn't read your database".
    assert_eq!(
        summary,
        "We couldn't restore your database: it rejected our credentials. Your database was not changed; our team is alerted."
    );

    // An early failing statement in the middle of the same big stream: no hang either.
    std::fs::remove_file(recorded.dir.path().join("psql-password")).unwrap();
    PgConnection::connect(&pg.url("big"))
        .await
        .unwrap()
        .execute("REVOKE CREATE ON SCHEMA public FROM app; ALTER SCHEMA public OWNER TO postgres;")
        .await
        .unwrap();
    let (_, status, reason, detail) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        restore(&d, backup, res),
    )
    .await
    .expect("the restore must end");
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("conflict")),
        "{detail:?}"
    );
    let detail = detail.unwrap();
    assert!(detail.contains("permission denied"), "{detail}");
    assert!(detail.contains("(in TABLE public.big)"), "{detail}");
    for (name, pid) in &recorded.runs() {
        assert!(!running(*pid), "{name} ({pid}) is still running");
    }
    let early: i64 = sqlx::query_scalar("SELECT count(*) FROM early")
        .fetch_one(&mut PgConnection::connect(&url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(early, 0, "rolled back: the database is as it was");
}

#[sqlx::test]
async fn a_customer_lock_makes_the_rewind_fail_unreachable_within_lock_timeout(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let url = owned_database(&pg, "shop", "app", "app-pw-44").await;
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(RICH_SCHEMA)
        .await
        .unwrap();
    let t = team(&pool).await;
    let res = resource(&pool, t, "postgres", &url).await;
    let backup = back_up(&d, res).await;
    damage(&url).await;
    let damaged = fingerprint(&url).await;

    // A customer transaction holding a lock on a table the rewind must drop.
    let mut customer = PgConnection::connect(&url).await.unwrap();
    customer
        .execute("BEGIN; LOCK TABLE people IN ACCESS SHARE MODE;")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (_, status, reason, detail) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        restore(&d, backup, res),
    )
    .await
    .expect("the rewind gives up on the lock");
    let took = started.elapsed();
    println!("rewind gave up after {took:?}");
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("pending", Some("unreachable")),
        "retried later: {detail:?}"
    );
    assert!(detail.unwrap().contains("lock timeout"));
    assert!(
        took < std::time::Duration::from_secs(30 + 20),
        "within lock_timeout (30 s) and a few seconds: {took:?}"
    );
    customer.execute("COMMIT").await.unwrap();
    assert_eq!(fingerprint(&url).await, damaged, "rolled back, unchanged");
}

#[sqlx::test]
async fn mongodb_clones_across_database_names_and_refuses_a_restore_of_nothing(pool: PgPool) {
    let (fx, _dir, d) = fake_mongo_deps(&pool).await;
    let t = team(&pool).await;
    let shop = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-45@db1:27017/shop",
    )
    .await;
    let backup = back_up(&d, shop).await;

    let copy = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-45@db2:27017/shop_copy?authSource=admin",
    )
    .await;
    let (_, status, reason, detail) = restore(&d, backup, copy).await;
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap();
    let clone_call = calls
        .lines()
        .find(|l| l.contains("drop=1"))
        .expect("mongorestore ran");
    assert!(
        clone_call.contains("ns=shop.*")
            && clone_call.contains("from=shop.*")
            && clone_call.contains("to=shop_copy.*"),
        "{clone_call}"
    );
    assert!(!clone_call.contains("mongo-pw-45"), "{clone_call}");
    let restored = calls
        .lines()
        .find(|l| l.starts_with("restored "))
        .expect("documents restored");
    assert!(restored.contains("docs=2010"), "{restored}");

    // mongorestore exits 0 yet every insert failed: not a success (and the collections were
    // dropped: the target is partly restored).
    let nothing = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-45@restore-nothing:27017/shop",
    )
    .await;
    let (_, status, reason, detail) = restore(&d, backup, nothing).await;
    assert_ne!(status, "succeeded");
    assert_eq!(reason.as_deref(), Some("incomplete"), "{detail:?}");
    assert!(
        detail
            .unwrap()
            .contains("documents_restored=0 documents_failed=2010"),
        "every document failed"
    );
}

#[sqlx::test]
async fn a_mongodb_restore_with_rejected_documents_fails_incomplete_and_is_not_retried(
    pool: PgPool,
) {
    use backup_worker::domain::FailureReason;
    let (fx, _dir, d) = fake_mongo_deps(&pool).await;
    let t = team(&pool).await;
    let shop = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-46@db1:27017/shop",
    )
    .await;
    let backup = back_up(&d, shop).await;

    // The customer's live traffic inserted 500 of the archive's _ids meanwhile: mongorestore,
    // without --stopOnError, restores the other 1510 documents and exits 0.
    for (host, restored, failed, error) in [
        (
            "reject-500",
            1510,
            500,
            "E11000 duplicate key error collection: shop.orders",
        ),
        ("invalid-3", 2007, 3, "Document failed validation"),
    ] {
        let into = resource(
            &pool,
            t,
            "mongodb",
            &format!("mongodb://app:mongo-pw-46@{host}:27017/shop"),
        )
        .await;
        let (id, status, reason, detail) = restore(&d, backup, into).await;
        let detail = detail.unwrap_or_default();
        assert_eq!(
            (status.as_str(), reason.as_deref()),
            ("failed", Some("incomplete")),
            "{host}: {detail}"
        );
        assert!(
            detail.contains(&format!(
                "documents_restored={restored} documents_failed={failed}"
            )),
            "{host}: {detail}"
        );
        assert!(detail.contains("partly restored"), "{detail}");
        assert!(detail.contains(error), "{host}: {detail}");
        assert!(!detail.contains("mongo-pw-46"), "{detail}");
        let (summary, attempts): (String, i32) =
            sqlx::query_as("SELECT error_summary, attempts FROM resource_restores WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            summary,
            FailureReason::Incomplete.customer_summary(),
            "the customer is told it is partly restored"
        );
        assert_eq!(attempts, 1, "not retried: a re-run drops what was restored");
        let audit: serde_json::Value = sqlx::query_scalar(
            "SELECT detail FROM audit_log WHERE kind = 'restore.failed' AND subject_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(audit["failure_reason"], "incomplete", "{audit}");
        assert_eq!(
            (
                audit["documents_restored"].as_u64(),
                audit["documents_failed"].as_u64()
            ),
            (Some(restored), Some(failed)),
            "{audit}"
        );
    }
    // Another pass runs nothing again.
    Restores::new(d.clone()).pass(&ctx()).await.unwrap();
    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap();
    assert_eq!(
        calls.lines().filter(|l| l.starts_with("restored ")).count(),
        2,
        "{calls}"
    );
}

#[sqlx::test]
async fn a_mongodb_backup_of_a_url_without_a_database_is_neither_restored_nor_verified(
    pool: PgPool,
) {
    let (fx, _dir, d) = fake_mongo_deps(&pool).await;
    let t = team(&pool).await;
    // mongodump of a URL naming no database dumps the whole deployment.
    let whole = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-47@db1:27017/?authSource=admin",
    )
    .await;
    let backup = back_up(&d, whole).await;
    let shop = resource(
        &pool,
        t,
        "mongodb",
        "mongodb://app:mongo-pw-47@db2:27017/shop",
    )
    .await;
    let (_, status, reason, detail) = restore(&d, backup, shop).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail:?}"
    );
    assert!(detail.unwrap().contains("names no tenant database"));
    let calls = std::fs::read_to_string(fx.path().join("calls.log")).unwrap();
    assert!(
        !calls.lines().any(|l| l.contains("drop=")),
        "mongorestore never ran: {calls}"
    );

    // The verifier does not call it restorable: it fails, and the backup is marked failed.
    let report = backup_worker::loops::verifier::Verifier::new(d.clone())
        .verify_now(backup)
        .await
        .unwrap();
    assert_eq!(
        (report.status.as_str(), report.failure_reason.as_deref()),
        ("failed", Some("config")),
        "{report:?}"
    );
    let verify_status: Option<String> =
        sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verify_status.as_deref(), Some("failed"));
}

#[sqlx::test]
async fn a_restore_into_the_workers_own_control_database_is_refused(pool: PgPool) {
    let control = backup_worker_testkit::database_url(&pool);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(dir.path().to_path_buf())
            .await
            .unwrap(),
    );
    let d = test_deps(
        pool.clone(),
        store,
        test_config(&[("DATABASE_URL", &control)]).unwrap(),
    )
    .unwrap();
    let pg = PgServer::start().await.unwrap();
    let src = owned_database(&pg, "shop", "app", "app-pw").await;
    let mut c = PgConnection::connect(&src).await.unwrap();
    c.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let t = team(&pool).await;
    let source = resource(&pool, t, "postgres", &src).await;
    let backup = back_up(&d, source).await;
    // The same database as DATABASE_URL, under another loopback name.
    let own = resource(
        &pool,
        t,
        "postgres",
        &control.replacen("127.0.0.1", "localhost", 1),
    )
    .await;
    let before: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM resource_backups ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let (_, status, reason, detail) = restore(&d, backup, own).await;
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("config")),
        "{detail:?}"
    );
    assert!(
        detail.as_deref().unwrap_or("").contains("control database"),
        "{detail:?}"
    );
    let after: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM resource_backups ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before, after, "the queue is untouched");
    let t_exists: bool = sqlx::query_scalar("SELECT to_regclass('public.t') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !t_exists,
        "nothing of the backup landed in the control database"
    );
}

#[sqlx::test]
async fn a_restore_whose_worker_died_is_recovered_and_counted(pool: PgPool) {
    let (_dir, d) = local_deps(&pool, Tools::default()).await;
    let t = team(&pool).await;
    let res = resource(&pool, t, "redis", "redis://127.0.0.1:1").await;
    let backup: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, status) VALUES ($1, 'failed') RETURNING id",
    )
    .bind(res)
    .fetch_one(&pool)
    .await
    .unwrap();
    let restore: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, backup_id, status, attempts, leased_by, lease_expires_at)
         VALUES ($1, $2, 'running', 3, 'dead-pod', now() - interval '1 minute') RETURNING id",
    )
    .bind(res)
    .bind(backup)
    .fetch_one(&pool)
    .await
    .unwrap();
    Restores::new(d.clone()).pass(&ctx()).await.unwrap();
    let (status, reason, summary): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, error_summary FROM resource_restores WHERE id = $1",
    )
    .bind(restore)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("failed", Some("timeout"))
    );
    let summary = summary.unwrap_or_default();
    assert!(!summary.contains("retry"), "{summary}");
    assert!(
        summary.starts_with("We couldn't restore your database"),
        "{summary}"
    );
    assert!(d
        .metrics
        .render()
        .contains("instant_customer_restore_stuck_recovered_total 1"));
}
