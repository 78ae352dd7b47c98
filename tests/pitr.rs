//! Point-in-time recovery (DESIGN §14) on real parts: a private tenant Postgres initdb'd by the
//! test (wal_level replica, a REPLICATION role), the real wal, scheduler, backups and restores
//! loops, pg_receivewal, pg_basebackup, a private replay server of the same major, pg_dump and
//! the §6 rewind through the tenant's own role.

use backup_worker::loops::backups::Backups;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::scheduler::Scheduler;
use backup_worker::loops::wal::Wal;
use backup_worker::loops::Loop;
use backup_worker_testkit::jobs::{job_row, local_deps};
use backup_worker_testkit::{insert_team, pass_ctx, PgServer, TestError};
use sqlx::{Connection, Executor, PgPool};
use uuid::Uuid;

/// A tenant as the platform makes one, plus a REPLICATION role: (tenant URL, replication URL).
async fn pitr_tenant(server: &PgServer) -> Result<(String, String), TestError> {
    sqlx::PgConnection::connect(&server.url("postgres"))
        .await?
        .execute("CREATE ROLE shop_app")
        .await?;
    let url = server
        .tenant_database(
            "shop",
            "shop_owner",
            "owner-pw",
            "CREATE TABLE orders (id int PRIMARY KEY, note text);
             GRANT SELECT, INSERT ON orders TO shop_app;",
        )
        .await?;
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres")).await?;
    admin
        .execute("CREATE ROLE shop_repl LOGIN REPLICATION PASSWORD 'repl-pw'")
        .await?;
    let repl = format!(
        "postgres://shop_repl:repl-pw@127.0.0.1:{}/postgres",
        server.port
    );
    Ok((url, repl))
}

async fn pitr_resource(
    pool: &PgPool,
    tier: &str,
    url: &str,
    repl: &str,
) -> Result<Uuid, TestError> {
    let team = insert_team(pool, tier).await?;
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url, replication_url)
         VALUES ($1, 'postgres', $2, $3) RETURNING id",
    )
    .bind(team)
    .bind(url)
    .bind(repl)
    .fetch_one(pool)
    .await?)
}

async fn ids(url: &str) -> Result<Vec<i32>, TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(&mut c)
        .await?)
}

async fn insert(url: &str, from: i32, to: i32) -> Result<(), TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    sqlx::query("INSERT INTO orders SELECT g, 'order ' || g FROM generate_series($1, $2) g")
        .bind(from)
        .bind(to)
        .execute(&mut c)
        .await?;
    Ok(())
}

/// A PITR tenant as the loops leave it after its first `--once` passes: its stream started (the
/// slot created, the row released), the scheduler's base backup taken.
struct Pitr {
    tenant: PgServer,
    url: String,
    resource: Uuid,
    deps: backup_worker::deps::Deps,
    wal: std::sync::Arc<Wal>,
    scheduler: Scheduler,
    store: tempfile::TempDir,
}

impl Pitr {
    async fn with_base(
        pool: &PgPool,
        tier: &str,
        overrides: &[(&str, &str)],
    ) -> Result<Self, TestError> {
        let tenant = PgServer::start().await?;
        let (url, repl) = pitr_tenant(&tenant).await?;
        let resource = pitr_resource(pool, tier, &url, &repl).await?;
        let store = tempfile::tempdir()?;
        let store_url = format!("file://{}", store.path().display());
        let mut env = vec![("STORAGE_URL", store_url.as_str())];
        env.extend_from_slice(overrides);
        let objects: std::sync::Arc<dyn backup_worker::storage::ObjectStore> = std::sync::Arc::new(
            backup_worker::storage::LocalStore::new(store.path().to_path_buf()).await?,
        );
        let deps = backup_worker_testkit::test_deps(
            pool.clone(),
            objects,
            backup_worker_testkit::test_config(&env)?,
        )?;
        let wal = Wal::new(deps.clone(), true);
        let scheduler = Scheduler::new(
            pool.clone(),
            deps.plans.clone(),
            deps.metrics.clone(),
            std::time::Duration::from_secs(60),
        );
        wal.pass(&pass_ctx()).await?;
        let (status, slot): (String, String) =
            sqlx::query_as("SELECT status, slot_name FROM wal_streams WHERE resource_id = $1")
                .bind(resource)
                .fetch_one(pool)
                .await?;
        assert_eq!(status, "stopped", "a --once pass releases its stream");
        assert_eq!(slot, format!("backup_worker_{}", resource.simple()));
        let report = scheduler.tick_now().await?;
        assert_eq!(report.base_backups, 1, "{report:?}");
        Backups::new(deps.clone()).pass(&pass_ctx()).await?;
        let (bstatus, key, detail): (String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT status, object_key, internal_detail FROM resource_backups
              WHERE resource_id = $1 AND format = 'base'",
        )
        .bind(resource)
        .fetch_one(pool)
        .await?;
        assert_eq!(bstatus, "succeeded", "{detail:?}");
        assert!(key.unwrap_or_default().contains(".base.tar.gz"));
        Ok(Self {
            tenant,
            url,
            resource,
            deps,
            wal,
            scheduler,
            store,
        })
    }
}

/// A restore of `resource` to `t` through one restores pass; its row.
async fn restore_to(
    deps: &backup_worker::deps::Deps,
    resource: Uuid,
    t: chrono::DateTime<chrono::Utc>,
) -> Result<backup_worker_testkit::jobs::JobRow, TestError> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2) RETURNING id",
    )
    .bind(resource)
    .bind(t)
    .fetch_one(&deps.pool)
    .await?;
    Restores::new(deps.clone()).pass(&pass_ctx()).await?;
    job_row(&deps.pool, "resource_restores", id).await
}

/// The tenant server's clock now.
async fn now_on(url: &str) -> Result<chrono::DateTime<chrono::Utc>, TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut c)
        .await?)
}

#[sqlx::test(migrations = "./migrations")]
async fn a_restore_to_an_instant_brings_back_exactly_its_rows(
    pool: PgPool,
) -> Result<(), TestError> {
    let Pitr {
        url,
        resource,
        deps,
        wal,
        store: _store,
        tenant: _tenant,
        ..
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    insert(&url, 1, 100).await?;
    let t = now_on(&url).await?;
    insert(&url, 101, 150).await?;
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        c.execute("DELETE FROM orders WHERE id <= 50").await?;
    }
    wal.pass(&pass_ctx()).await?;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM wal_segments WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert!(stored >= 1);

    let row = restore_to(&deps, resource, t).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(
        ids(&url).await?,
        (1..=100).collect::<Vec<_>>(),
        "the rows of T and nothing after"
    );
    let chosen: Option<Uuid> =
        sqlx::query_scalar("SELECT backup_id FROM resource_restores WHERE id = $1")
            .bind(row.id)
            .fetch_one(&pool)
            .await?;
    assert!(chosen.is_some(), "the base backup chosen is recorded");

    // The verifier replays the base backup with its WAL to the end of the chain (after the DELETE:
    // rows 51–150) and counts its rows.
    let base_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM resource_backups WHERE resource_id = $1 AND format = 'base'",
    )
    .bind(resource)
    .fetch_one(&pool)
    .await?;
    let report = backup_worker::loops::verifier::Verifier::new(deps.clone())
        .verify_now(base_id)
        .await?;
    assert_eq!(report.status, "verified", "{report:?}");

    // The command line: the window, and a restore to an instant enqueued by hand.
    let cli = |args: Vec<String>| {
        let db = backup_worker_testkit::database_url(&pool);
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
                .args(&args)
                .env("DATABASE_URL", db)
                .output()
                .await
        }
    };
    let out = cli(vec!["backups".into(), resource.to_string()]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("point-in-time recovery: restorable: "),
        "{text}"
    );
    assert!(text.contains("scheduled/base"), "{text}");
    let out = cli(vec![
        "restore".into(),
        "--to-time".into(),
        "2026-12-04T10:58:00Z".into(),
        resource.to_string(),
    ])
    .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: Uuid = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT target_time FROM resource_restores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        at.map(|t| t.to_rfc3339()),
        Some("2026-12-04T10:58:00+00:00".into())
    );
    // Long before the first base backup: refused, naming the window, nothing touched.
    Restores::new(deps.clone()).pass(&pass_ctx()).await?;
    let row = job_row(&pool, "resource_restores", id).await?;
    assert_eq!(row.failure_reason.as_deref(), Some("config"), "{row:?}");
    assert!(row
        .internal_detail
        .unwrap_or_default()
        .contains("restorable: "));
    let out = cli(vec![
        "restore".into(),
        "--to-time".into(),
        "yesterday".into(),
        resource.to_string(),
    ])
    .await?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a time that does not parse is a usage error"
    );
    assert_eq!(report.detail["level"], "replay", "{report:?}");
    assert_eq!(report.detail["tables"]["public.orders"], 100, "{report:?}");
    let leftovers = std::fs::read_dir(std::env::temp_dir())?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("backup-worker-pitr-")
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("owner"))
                .ok()
                .as_deref()
                == Some(&std::process::id().to_string())
        })
        .count();
    assert_eq!(leftovers, 0, "the private server's directory is removed");
    Ok(())
}

/// A replica of the real binary streaming the resource's WAL.
fn replica(
    pool: &PgPool,
    store: &std::path::Path,
    worker: &str,
) -> Result<tokio::process::Child, TestError> {
    Ok(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
            .args(["run", "--only", "wal"])
            .env("DATABASE_URL", backup_worker_testkit::database_url(pool))
            .env("STORAGE_URL", format!("file://{}", store.display()))
            .env("WORKER_ID", worker)
            .env("LEASE_SECONDS", "3")
            .env(
                "METRICS_ADDR",
                format!("127.0.0.1:{}", backup_worker_testkit::free_port()?),
            )
            .env("LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    )
}

/// Complete segments stored for the resource, in order.
async fn complete_segments(pool: &PgPool, resource: Uuid) -> Result<Vec<i64>, TestError> {
    Ok(sqlx::query_scalar(
        "SELECT segno FROM wal_segments WHERE resource_id = $1 AND segno IS NOT NULL AND NOT partial
          ORDER BY segno",
    )
    .bind(resource)
    .fetch_all(pool)
    .await?)
}

/// Writes a row and switches to a new segment (the superuser's `pg_switch_wal`); the segment
/// number of the one just completed.
async fn write_and_switch(server: &PgServer, url: &str, id: i32) -> Result<i64, TestError> {
    insert(url, id, id).await?;
    let mut admin = sqlx::PgConnection::connect(&server.url("postgres")).await?;
    let lsn: String = sqlx::query_scalar("SELECT pg_switch_wal()::text")
        .fetch_one(&mut admin)
        .await?;
    let seg: i64 = sqlx::query_scalar(
        "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
    )
    .fetch_one(&mut admin)
    .await?;
    let (hi, lo) = lsn.split_once('/').ok_or("lsn")?;
    let lsn = (i64::from_str_radix(hi, 16)? << 32) | i64::from_str_radix(lo, 16)?;
    Ok(lsn / seg)
}

#[sqlx::test(migrations = "./migrations")]
async fn a_stream_killed_with_kill_9_is_resumed_by_another_replica_without_losing_a_segment(
    pool: PgPool,
) -> Result<(), TestError> {
    use backup_worker_testkit::wait_until;
    use std::time::Duration;
    let tenant = PgServer::start().await?;
    let (url, repl) = pitr_tenant(&tenant).await?;
    let resource = pitr_resource(&pool, "growth", &url, &repl).await?;
    let store = tempfile::tempdir()?;
    let holder = |pool: PgPool| async move {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT leased_by FROM wal_streams WHERE resource_id = $1 AND lease_expires_at > now()",
        )
        .bind(resource)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
        .flatten()
    };
    let mut a = replica(&pool, store.path(), "replica-a")?;
    wait_until(
        Duration::from_secs(60),
        "replica-a to hold the stream",
        || {
            let p = pool.clone();
            async move { holder(p).await.as_deref() == Some("replica-a") }
        },
    )
    .await?;
    // The slot exists once the stream runs: WAL written from here on is held for us.
    wait_until(Duration::from_secs(60), "the slot to be active", || {
        let url = url.clone();
        async move {
            let Ok(mut c) = sqlx::PgConnection::connect(&url).await else {
                return false;
            };
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots",
            )
            .fetch_one(&mut c)
            .await
            .unwrap_or(false)
        }
    })
    .await?;
    let mut last = 0;
    for i in 1..=3 {
        last = write_and_switch(&tenant, &url, i).await?;
    }
    wait_until(
        Duration::from_secs(60),
        "replica-a to store the completed segments",
        || {
            let p = pool.clone();
            async move {
                complete_segments(&p, resource)
                    .await
                    .map(|s| s.last() == Some(&last))
                    .unwrap_or(false)
            }
        },
    )
    .await?;
    a.start_kill()?;
    a.wait().await?;
    // Nobody streams: the permanent slot holds what is written now.
    for i in 4..=6 {
        last = write_and_switch(&tenant, &url, i).await?;
    }
    let mut b = replica(&pool, store.path(), "replica-b")?;
    wait_until(
        Duration::from_secs(90),
        "replica-b to take over and store every segment",
        || {
            let p = pool.clone();
            async move {
                complete_segments(&p, resource)
                    .await
                    .map(|s| s.last() >= Some(&last))
                    .unwrap_or(false)
            }
        },
    )
    .await?;
    assert_eq!(holder(pool.clone()).await.as_deref(), Some("replica-b"));
    // SIGTERM: the stream stores what it has and releases its row before the process exits.
    let pid = rustix::process::Pid::from_raw(b.id().ok_or("no pid")? as i32).ok_or("pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    let exited = tokio::time::timeout(Duration::from_secs(30), b.wait()).await??;
    assert!(exited.success(), "{exited}");
    let (status, leased_by): (String, Option<String>) =
        sqlx::query_as("SELECT status, leased_by FROM wal_streams WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        (status.as_str(), leased_by),
        ("stopped", None),
        "released on SIGTERM"
    );
    let segs = complete_segments(&pool, resource).await?;
    let first = segs[0];
    assert_eq!(
        segs,
        (first..=segs[segs.len() - 1]).collect::<Vec<_>>(),
        "no segment lost in the takeover"
    );
    let gaps: i64 = sqlx::query_scalar("SELECT count(*) FROM wal_gaps")
        .fetch_one(&pool)
        .await?;
    assert_eq!(gaps, 0);
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn the_private_server_is_gone_after_its_worker_is_killed_mid_replay(
    pool: PgPool,
) -> Result<(), TestError> {
    use backup_worker_testkit::wait_until;
    use std::time::Duration;
    let Pitr {
        tenant,
        url,
        resource,
        wal,
        store,
        ..
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    let store_url = format!("file://{}", store.path().display());
    // Many segments to replay: the replay lasts long enough to be caught.
    for i in 1..=12 {
        write_and_switch(&tenant, &url, i).await?;
    }
    let t = now_on(&url).await?;
    insert(&url, 1000, 1000).await?;
    wal.pass(&pass_ctx()).await?;
    sqlx::query("INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2)")
        .bind(resource)
        .bind(t)
        .execute(&pool)
        .await?;

    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
        .args(["run", "--only", "restores"])
        .env("DATABASE_URL", backup_worker_testkit::database_url(&pool))
        .env("STORAGE_URL", &store_url)
        .env("WORKER_ID", "doomed")
        .env(
            "METRICS_ADDR",
            format!("127.0.0.1:{}", backup_worker_testkit::free_port()?),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let worker_pid = worker.id().ok_or("no pid")?.to_string();
    let mine = move || -> Option<std::path::PathBuf> {
        std::fs::read_dir(std::env::temp_dir())
            .ok()?
            .flatten()
            .find_map(|e| {
                let p = e.path();
                (e.file_name()
                    .to_string_lossy()
                    .starts_with("backup-worker-pitr-")
                    && std::fs::read_to_string(p.join("owner")).ok()?.trim() == worker_pid)
                    .then_some(p)
            })
    };
    let found = std::sync::Arc::new(std::sync::Mutex::new(None::<(std::path::PathBuf, i32)>));
    wait_until(
        Duration::from_secs(60),
        "the private server to start replaying",
        || {
            let found = found.clone();
            let mine = mine.clone();
            async move {
                let Some(dir) = mine() else { return false };
                let Some(pid) = std::fs::read_to_string(dir.join("data/postmaster.pid"))
                    .ok()
                    .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
                else {
                    return false;
                };
                *found.lock().unwrap() = Some((dir, pid));
                true
            }
        },
    )
    .await?;
    let (dir, postmaster) = found.lock().unwrap().clone().ok_or("not found")?;
    worker.start_kill()?;
    worker.wait().await?;
    wait_until(
        Duration::from_secs(30),
        "the private postmaster to die with its worker",
        || {
            let alive = std::path::Path::new(&format!("/proc/{postmaster}")).exists()
                && !std::fs::read_to_string(format!("/proc/{postmaster}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            async move { !alive }
        },
    )
    .await?;
    // Any later worker's restores loop sweeps the dead worker's directory.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
        .args(["run", "--only", "restores", "--once"])
        .env("DATABASE_URL", backup_worker_testkit::database_url(&pool))
        .env("STORAGE_URL", &store_url)
        .env("WORKER_ID", "sweeper")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await?;
    assert!(status.success());
    assert!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

/// A wal loop of its own over `plans` (tier `fast`: pitr_rpo_seconds 10).
fn fast_plans() -> Result<backup_worker::plans::Plans, TestError> {
    Ok(backup_worker::plans::Plans::from_yaml(
        concat!(
            "tiers:\n",
            "  fast: { rpo_minutes: 60, backup_retention_days: 7, backup_keep_last: 2, pitr_rpo_seconds: 10,\n",
            "          limits: { connections: 10, memory_mb: 256, storage_mb: 1024 } }\n",
            "default: { rpo_minutes: 1440, backup_retention_days: 7, backup_keep_last: 2,\n",
            "           limits: { connections: 10, memory_mb: 256, storage_mb: 1024 } }\n",
        ),
        "test",
    )?)
}

async fn current_lsn(url: &str) -> Result<String, TestError> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut c)
        .await?)
}

/// Whether a stored segment of the resource reaches `lsn` (a partial's end included).
async fn stored_through(pool: &PgPool, resource: Uuid, lsn: &str) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT coalesce(max(end_lsn) >= $2::text::pg_lsn, false) FROM wal_segments WHERE resource_id = $1",
    )
    .bind(resource)
    .bind(lsn)
    .fetch_one(pool)
    .await
    .unwrap_or(false)
}

#[sqlx::test(migrations = "./migrations")]
async fn a_quiet_database_meets_its_rpo_through_partial_segments(
    pool: PgPool,
) -> Result<(), TestError> {
    use backup_worker_testkit::wait_until;
    use std::time::Duration;
    let tenant = PgServer::start().await?;
    let (url, repl) = pitr_tenant(&tenant).await?;
    let resource = pitr_resource(&pool, "fast", &url, &repl).await?;
    let (_store, mut deps) = local_deps(&pool).await?;
    deps.plans = std::sync::Arc::new(fast_plans()?);
    let wal = Wal::new(deps.clone(), false);
    let ctx = pass_ctx();
    wal.pass(&ctx).await?;
    assert_eq!(wal.held(), 1);
    wait_until(
        Duration::from_secs(30),
        "the stream to store its first partial",
        || {
            let p = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM wal_segments WHERE resource_id = $1 AND partial",
                )
                .bind(resource)
                .fetch_one(&p)
                .await
                .unwrap_or(0)
                    > 0
            }
        },
    )
    .await?;
    // One small write on a quiet database: no segment completes, the partial carries it.
    insert(&url, 1, 1).await?;
    let lsn = current_lsn(&url).await?;
    wait_until(
        Duration::from_secs(40),
        "the write's WAL to be stored",
        || {
            let (p, lsn) = (pool.clone(), lsn.clone());
            async move { stored_through(&p, resource, &lsn).await }
        },
    )
    .await?;
    let complete: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM wal_segments WHERE resource_id = $1 AND segno IS NOT NULL AND NOT partial",
    )
    .bind(resource)
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        complete, 0,
        "nothing completed a segment: the partial met the RPO"
    );
    wal.refresh_gauges().await?;
    assert_eq!(deps.metrics.pitr_rpo_breached.get(), 0);
    assert_eq!(
        deps.metrics
            .wal_streams
            .with_label_values(&["streaming"])
            .get(),
        1
    );
    assert!(deps.metrics.wal_bytes.get() > 0);
    // Shutdown: the stream stores what it has and releases its row.
    ctx.shutdown.cancel();
    wal.pass(&ctx).await?;
    let (status, holder): (String, Option<String>) =
        sqlx::query_as("SELECT status, leased_by FROM wal_streams WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert_eq!((status.as_str(), holder), ("stopped", None));
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn a_promoted_tenant_keeps_streaming_on_its_new_timeline(
    pool: PgPool,
) -> Result<(), TestError> {
    let Pitr {
        mut tenant,
        url,
        resource,
        deps,
        wal,
        store: _store,
        ..
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    insert(&url, 1, 10).await?;
    wal.pass(&pass_ctx()).await?;

    tenant.promote_to_new_timeline().await?;
    insert(&url, 11, 20).await?;
    let t = now_on(&url).await?;
    insert(&url, 21, 30).await?;
    wal.pass(&pass_ctx()).await?;
    let timelines: Vec<(i32, Option<i64>)> = sqlx::query_as(
        "SELECT timeline, segno FROM wal_segments WHERE resource_id = $1 ORDER BY timeline, segno NULLS FIRST",
    )
    .bind(resource)
    .fetch_all(&pool)
    .await?;
    assert!(
        timelines.contains(&(2, None)),
        "the new timeline's history file is stored: {timelines:?}"
    );
    assert!(
        timelines.iter().any(|(tl, s)| *tl == 2 && s.is_some()),
        "WAL of timeline 2 is stored: {timelines:?}"
    );
    let tl: Option<i32> =
        sqlx::query_scalar("SELECT timeline FROM wal_streams WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert_eq!(tl, Some(2));

    // A restore across the switch: the base backup of timeline 1, WAL of both.
    let row = restore_to(&deps, resource, t).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(ids(&url).await?, (1..=20).collect::<Vec<_>>());
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn a_slot_the_server_invalidated_is_a_gap_recorded_and_refused(
    pool: PgPool,
) -> Result<(), TestError> {
    let Pitr {
        tenant,
        url,
        resource,
        deps,
        wal,
        scheduler,
        store: _store,
        ..
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    insert(&url, 1, 10).await?;
    let before_gap = now_on(&url).await?;
    wal.pass(&pass_ctx()).await?;

    // Nobody streams; the server may keep 1 MB for slots: switching segments and a checkpoint
    // invalidate ours.
    {
        let mut admin = sqlx::PgConnection::connect(&tenant.url("postgres")).await?;
        admin
            .execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            .await?;
        admin.execute("SELECT pg_reload_conf()").await?;
    }
    for i in 11..=15 {
        write_and_switch(&tenant, &url, i).await?;
    }
    {
        let mut admin = sqlx::PgConnection::connect(&tenant.url("postgres")).await?;
        admin.execute("CHECKPOINT").await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots")
                .fetch_one(&mut admin)
                .await?;
        assert_eq!(
            status.as_deref(),
            Some("lost"),
            "the server invalidated the slot"
        );
    }
    let in_gap: chrono::DateTime<chrono::Utc> = chrono::Utc::now();
    wal.pass(&pass_ctx()).await?;
    assert_eq!(deps.metrics.pitr_gaps.get(), 1);
    let gaps: i64 = sqlx::query_scalar("SELECT count(*) FROM wal_gaps WHERE resource_id = $1")
        .bind(resource)
        .fetch_one(&pool)
        .await?;
    assert_eq!(gaps, 1);
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE kind = 'wal.gap'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(audited, 1);

    // The next pass streams through a fresh slot, and a base backup is wanted at once.
    wal.pass(&pass_ctx()).await?;
    let report = scheduler.tick_now().await?;
    assert_eq!(report.base_backups, 1, "a fresh base backup after the gap");

    // A target inside the gap is refused before anything is touched, naming what is restorable.
    let row = restore_to(&deps, resource, in_gap).await?;
    assert_eq!(row.status, "failed");
    assert_eq!(row.failure_reason.as_deref(), Some("config"));
    let detail = row.internal_detail.unwrap_or_default();
    assert!(
        detail.contains("no restorable point") && detail.contains("restorable: "),
        "{detail}"
    );
    assert_eq!(ids(&url).await?, (1..=15).collect::<Vec<_>>(), "untouched");
    // Before the gap stays restorable.
    let history = backup_worker::pitr::History::load(&pool, resource).await?;
    assert!(
        history.plan(before_gap).is_ok(),
        "{before_gap} {:?}",
        history.windows()
    );
    assert!(history.plan(in_gap).is_err());
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn a_resource_leaving_pitr_gets_its_slot_dropped(pool: PgPool) -> Result<(), TestError> {
    let tenant = PgServer::start().await?;
    let (url, repl) = pitr_tenant(&tenant).await?;
    let resource = pitr_resource(&pool, "growth", &url, &repl).await?;
    let (_store, deps) = local_deps(&pool).await?;
    let wal = Wal::new(deps.clone(), true);
    wal.pass(&pass_ctx()).await?;
    let slots = |url: String| async move {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        Ok::<i64, TestError>(
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
                .fetch_one(&mut c)
                .await?,
        )
    };
    assert_eq!(slots(url.clone()).await?, 1);
    // A downgrade to a plan without PITR: the slot would hold the tenant's WAL forever.
    sqlx::query("UPDATE teams SET plan_tier = 'hobby' WHERE id = (SELECT team_id FROM resources WHERE id = $1)")
        .bind(resource)
        .execute(&pool)
        .await?;
    wal.pass(&pass_ctx()).await?;
    assert_eq!(
        slots(url.clone()).await?,
        0,
        "the slot is dropped on the tenant's server"
    );
    let dropped: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT slot_dropped_at FROM wal_streams WHERE resource_id = $1")
            .bind(resource)
            .fetch_one(&pool)
            .await?;
    assert!(dropped.is_some());
    wal.refresh_gauges().await?;
    assert_eq!(
        deps.metrics
            .wal_streams
            .with_label_values(&["stopped"])
            .get(),
        0,
        "not a stream that is down"
    );
    // Back on a PITR plan: a fresh slot, and a base backup wanted at once.
    sqlx::query("UPDATE teams SET plan_tier = 'team' WHERE id = (SELECT team_id FROM resources WHERE id = $1)")
        .bind(resource)
        .execute(&pool)
        .await?;
    wal.pass(&pass_ctx()).await?;
    assert_eq!(slots(url.clone()).await?, 1);
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn encrypted_wal_and_base_backups_restore_to_an_instant(
    pool: PgPool,
) -> Result<(), TestError> {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("master.key");
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
    )?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let pitr = Pitr::with_base(
        &pool,
        "team",
        &[("ENCRYPTION_KEY_FILE", key.to_str().ok_or("path")?)],
    )
    .await?;
    let (url, resource, wal, deps) = (
        pitr.url.clone(),
        pitr.resource,
        pitr.wal.clone(),
        pitr.deps.clone(),
    );
    insert(&url, 1, 40).await?;
    let t = now_on(&url).await?;
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        c.execute("TRUNCATE orders").await?;
    }
    wal.pass(&pass_ctx()).await?;
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT object_key FROM wal_segments WHERE resource_id = $1
         UNION ALL SELECT object_key FROM resource_backups WHERE resource_id = $1 AND format = 'base'",
    )
    .bind(resource)
    .fetch_all(&pool)
    .await?;
    assert!(
        keys.len() >= 2 && keys.iter().all(|k| k.ends_with(".gz.age")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with(".base.tar.gz.age")),
        "{keys:?}"
    );
    let row = restore_to(&deps, resource, t).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(ids(&url).await?, (1..=40).collect::<Vec<_>>());
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn base_backups_are_verified_even_when_dumps_are_newer(
    pool: PgPool,
) -> Result<(), TestError> {
    let Pitr {
        resource,
        deps,
        wal,
        tenant: _tenant,
        store: _store,
        ..
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    // Its chain stored past its end; the hour's dump is now the newest backup.
    wal.pass(&pass_ctx()).await?;
    backup_worker_testkit::back_up(&deps, resource).await?;
    let verifier = backup_worker::loops::verifier::Verifier::new(deps.clone());
    for _ in 0..2 {
        verifier.pass(&pass_ctx()).await?;
    }
    let verified: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT b.format, v.status || coalesce(' ' || v.failure_reason, ''), v.detail->>'level'
           FROM backup_verifications v
           JOIN resource_backups b ON b.id = v.backup_id
          WHERE v.resource_id = $1 ORDER BY b.format",
    )
    .bind(resource)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        verified,
        vec![
            ("base".into(), "verified".into(), Some("replay".into())),
            (
                "logical".into(),
                "verified".into(),
                Some("integrity".into())
            ),
        ]
    );
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn wal_older_than_the_oldest_retained_base_backup_is_deleted(
    pool: PgPool,
) -> Result<(), TestError> {
    let Pitr {
        tenant,
        url,
        resource,
        deps,
        wal,
        scheduler,
        store: _store,
    } = Pitr::with_base(&pool, "growth", &[]).await?;
    for i in 1..=3 {
        write_and_switch(&tenant, &url, i).await?;
    }
    wal.pass(&pass_ctx()).await?;
    // A second base backup (the day after); the first expires by retention.
    sqlx::query("UPDATE wal_streams SET base_wanted_at = now() WHERE resource_id = $1")
        .bind(resource)
        .execute(&pool)
        .await?;
    assert_eq!(scheduler.tick_now().await?.base_backups, 1);
    Backups::new(deps.clone()).pass(&pass_ctx()).await?;
    let (second_start,): (i64,) = sqlx::query_as(
        "SELECT ((start_lsn - '0/0'::pg_lsn) / (SELECT segment_bytes FROM wal_streams WHERE resource_id = $1))::bigint
           FROM resource_backups WHERE resource_id = $1 AND format = 'base' ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(resource)
    .fetch_one(&pool)
    .await?;
    let before = complete_segments(&pool, resource).await?;
    assert!(
        before.iter().any(|&s| s < second_start),
        "{before:?} {second_start}"
    );
    sqlx::query(
        "UPDATE resource_backups SET status = 'expired'
          WHERE id = (SELECT id FROM resource_backups WHERE resource_id = $1 AND format = 'base'
                       ORDER BY finished_at LIMIT 1)",
    )
    .bind(resource)
    .execute(&pool)
    .await?;
    let expired = wal.expire_wal().await?;
    let after = complete_segments(&pool, resource).await?;
    assert!(expired > 0);
    assert!(
        after.iter().all(|&s| s >= second_start),
        "{after:?} {second_start}"
    );
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pending_object_deletions WHERE reason = 'wal retention'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        queued as u64, expired,
        "their objects go through the pending deletions"
    );
    Ok(())
}

#[sqlx::test(migrations = "./migrations")]
async fn run_once_as_the_platform_runs_it_streams_backs_up_and_restores_to_an_instant(
    pool: PgPool,
) -> Result<(), TestError> {
    let tenant = PgServer::start().await?;
    let (url, repl) = pitr_tenant(&tenant).await?;
    let resource = pitr_resource(&pool, "growth", &url, &repl).await?;
    let store = tempfile::tempdir()?;
    let once = || {
        let (db, store) = (
            backup_worker_testkit::database_url(&pool),
            store.path().to_path_buf(),
        );
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backup-worker"))
                .args(["run", "--once"])
                .env("DATABASE_URL", db)
                .env("STORAGE_URL", format!("file://{}", store.display()))
                .output()
                .await?;
            if !out.status.success() {
                return Err::<(), TestError>(
                    String::from_utf8_lossy(&out.stderr).into_owned().into(),
                );
            }
            Ok(())
        }
    };
    // The first run: the stream's slot, the day's base backup and the hour's dump.
    once().await?;
    let formats: Vec<(String, String)> = sqlx::query_as(
        "SELECT format, status FROM resource_backups WHERE resource_id = $1 ORDER BY format",
    )
    .bind(resource)
    .fetch_all(&pool)
    .await?;
    assert_eq!(
        formats,
        vec![
            ("base".into(), "succeeded".into()),
            ("logical".into(), "succeeded".into())
        ]
    );
    insert(&url, 1, 25).await?;
    let t = now_on(&url).await?;
    {
        let mut c = sqlx::PgConnection::connect(&url).await?;
        c.execute("DROP TABLE orders").await?;
    }
    once().await?;
    sqlx::query("INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2)")
        .bind(resource)
        .bind(t)
        .execute(&pool)
        .await?;
    once().await?;
    let (status, detail): (String, Option<String>) = sqlx::query_as(
        "SELECT status, internal_detail FROM resource_restores WHERE resource_id = $1",
    )
    .bind(resource)
    .fetch_one(&pool)
    .await?;
    assert_eq!(status, "succeeded", "{detail:?}");
    assert_eq!(
        ids(&url).await?,
        (1..=25).collect::<Vec<_>>(),
        "the dropped table is back as it was at T"
    );
    Ok(())
}
