//! Results survive a control-database blip, and a restore is applied at most once (DESIGN §6,
//! §11): the worker's own Postgres refuses connections (a relay cut on cue) just after a real
//! rewind committed into a private Postgres, for less or for longer than the lease.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backup_worker::deps::Deps;
use backup_worker::loops::restores::Restores;
use backup_worker::loops::verifier::Verifier;
use backup_worker::loops::Loop;
use backup_worker::process::Tools;
use backup_worker::storage::ObjectStore;
use backup_worker_testkit::{
    back_up, database_url, insert_resource, insert_team, pass_ctx, test_config, test_deps,
    wait_until, Blackout, PgServer,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// A psql that runs the real one and, after a rewind (psql reading its script from stdin, not a
/// `--command` probe) succeeded, says so in `<dir>/done` and waits for `<dir>/go`: the moment
/// just after the rewind committed, held open for the test.
fn gated_psql(dir: &Path) -> PathBuf {
    let real = which("psql");
    let script = dir.join("psql");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
"{real}" "$@"
rc=$?
case " $* " in *" --command "*) exit $rc ;; esac
if [ $rc -eq 0 ]; then
  : > "{dir}/done"
  i=0
  while [ ! -e "{dir}/go" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
fi
exit $rc
"#,
            real = real.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn which(tool: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{tool} not on PATH"))
}

/// The control database through a relay the test can cut, and deps over it.
async fn relayed_deps(
    pool: &PgPool,
    store_dir: &Path,
    env: &[(&str, &str)],
    tools: Tools,
) -> (Blackout, Deps) {
    let url = database_url(pool);
    let parsed = url::Url::parse(&url).unwrap();
    let upstream = format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port().unwrap_or(5432)
    )
    .parse()
    .unwrap();
    let relay = Blackout::start(upstream).await.unwrap();
    let relayed = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&relay.relayed_url(&url).unwrap())
        .await
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(
        backup_worker::storage::LocalStore::new(store_dir.to_path_buf())
            .await
            .unwrap(),
    );
    let mut d = test_deps(relayed, store, test_config(env).unwrap()).unwrap();
    d.tools = tools;
    (relay, d)
}

/// A tenant database owned by a non-superuser role, with 100 rows in `items`.
async fn tenant(pg: &PgServer) -> String {
    pg.tenant_database(
        "shop",
        "shop",
        "shop-pw",
        "CREATE TABLE items (id int PRIMARY KEY, note text);
         INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 100) AS i;",
    )
    .await
    .unwrap()
}

async fn count(url: &str, sql: &str) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
}

async fn audit_kinds(pool: &PgPool, subject: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM audit_log WHERE subject_id = $1 ORDER BY id")
        .bind(subject)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Backs the tenant up, damages it, starts its restore in the background and waits until the
/// rewind has committed (psql held at its exit). Returns the restore id and the running pass.
async fn restore_until_committed(
    pool: &PgPool,
    d: &Deps,
    url: &str,
    gate: &Path,
) -> (Uuid, tokio::task::JoinHandle<()>) {
    let team = insert_team(pool, "pro").await.unwrap();
    let res = insert_resource(pool, team, "postgres", url).await.unwrap();
    let backup = back_up(d, res).await.unwrap();
    let mut c = PgConnection::connect(url).await.unwrap();
    c.execute("DELETE FROM items WHERE id > 50").await.unwrap();
    let restore = backup_worker::commands::enqueue_restore(pool, backup, None)
        .await
        .unwrap();
    let restores = Restores::new(d.clone());
    // A pass that meets the blackout after its job may end in a database error: that is fine.
    let pass = tokio::spawn(async move {
        let _ = restores.pass(&pass_ctx()).await;
    });
    wait_until(Duration::from_secs(60), "the rewind to commit", || async {
        gate.join("done").exists()
    })
    .await
    .unwrap();
    // The rewind is in: the rows are the backup's.
    assert_eq!(count(url, "SELECT count(*) FROM items").await, 100);
    (restore, pass)
}

/// The control database goes dark, the held psql exits 0, and the customer writes a row
/// (id 1000) right after the restore.
async fn black_out_after_the_rewind(relay: &Blackout, gate: &Path, url: &str) {
    relay.cut();
    std::fs::write(gate.join("go"), "").unwrap();
    let mut c = PgConnection::connect(url).await.unwrap();
    c.execute("INSERT INTO items VALUES (1000, 'written after the restore')")
        .await
        .unwrap();
}

/// The control database refuses connections for longer than the lease just after the rewind
/// committed: the result cannot be recorded, the lease lapses — and the recovery must not run
/// the rewind again (it would wipe what the customer wrote since). The row ends failed, reason
/// timeout, "outcome unknown", audit restore.outcome_unknown; the customer's new row survives.
#[sqlx::test]
async fn a_restore_whose_lease_lapses_after_its_rewind_is_never_run_again(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let url = tenant(&pg).await;
    let gate = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let tools = Tools::default().with_override("psql", gated_psql(gate.path()));
    let (relay, d) = relayed_deps(&pool, store.path(), &[("LEASE_SECONDS", "3")], tools).await;
    let (restore, pass) = restore_until_committed(&pool, &d, &url, gate.path()).await;

    black_out_after_the_rewind(&relay, gate.path(), &url).await;
    // The job gives up once its lease may have run out (it cannot renew it).
    tokio::time::timeout(Duration::from_secs(30), pass)
        .await
        .expect("the restore job outlived its lease")
        .unwrap();
    let still: String = sqlx::query_scalar("SELECT status FROM resource_restores WHERE id = $1")
        .bind(restore)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        still, "running",
        "nothing could be recorded during the blackout"
    );
    relay.restore();

    // The recovery (any replica's next pass) meets the lapsed lease.
    wait_until(
        Duration::from_secs(30),
        "the restore to be recovered",
        || async {
            Restores::new(d.clone()).pass(&pass_ctx()).await.unwrap();
            let status: String =
                sqlx::query_scalar("SELECT status FROM resource_restores WHERE id = $1")
                    .bind(restore)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            status != "running"
        },
    )
    .await
    .unwrap();
    let (status, reason, summary, attempts, detail): (
        String,
        Option<String>,
        Option<String>,
        i32,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT status, failure_reason, error_summary, attempts, internal_detail
           FROM resource_restores WHERE id = $1",
    )
    .bind(restore)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref(), attempts),
        ("failed", Some("timeout"), 1)
    );
    let summary = summary.unwrap();
    assert!(
        summary.contains("can't tell whether it finished"),
        "{summary}"
    );
    assert!(!summary.contains("retry"), "{summary}");
    assert!(
        detail.unwrap().contains("outcome is unknown"),
        "internal_detail says why"
    );
    assert_eq!(
        audit_kinds(&pool, restore).await,
        ["restore.outcome_unknown"]
    );
    // Never re-run: the row written after the rewind is still there.
    assert_eq!(
        count(&url, "SELECT count(*) FROM items WHERE id = 1000").await,
        1
    );
    let metrics = d.metrics.render();
    assert!(
        metrics.contains("backup_worker_restore_outcome_unknown_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "instant_customer_restore_by_type_total{resource_type=\"postgres\",result=\"timeout\"} 1"
    ));
}

/// A blip shorter than the lease just after the rewind committed: the result is recorded once
/// the database is back (the lease kept renewed meanwhile), succeeded on the first attempt, one
/// audit row, and the rewind ran once.
#[sqlx::test]
async fn a_restore_result_is_recorded_across_a_blip_shorter_than_the_lease(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let url = tenant(&pg).await;
    let gate = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let tools = Tools::default().with_override("psql", gated_psql(gate.path()));
    let (relay, d) = relayed_deps(&pool, store.path(), &[("LEASE_SECONDS", "20")], tools).await;
    let (restore, pass) = restore_until_committed(&pool, &d, &url, gate.path()).await;

    black_out_after_the_rewind(&relay, gate.path(), &url).await;
    // The blip: 3 s down, well inside the 20 s lease; the worker's tries meanwhile fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.restore();
    tokio::time::timeout(Duration::from_secs(60), pass)
        .await
        .expect("the restore was not recorded after the blip")
        .unwrap();
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM resource_restores WHERE id = $1")
            .bind(restore)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("succeeded", 1));
    assert_eq!(audit_kinds(&pool, restore).await, ["restore.succeeded"]);
    assert_eq!(
        count(&url, "SELECT count(*) FROM items WHERE id = 1000").await,
        1
    );
}

/// The verifier's verdict survives the same blip: recorded `verified` on its first attempt once
/// the control database is back, not thrown away with its lease.
#[sqlx::test]
async fn a_verification_result_is_recorded_across_a_blip(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let url = tenant(&pg).await;
    let gate = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let tools = Tools::default().with_override("psql", gated_psql(gate.path()));
    let verify_url = pg.url("postgres");
    let (relay, d) = relayed_deps(
        &pool,
        store.path(),
        &[
            ("LEASE_SECONDS", "20"),
            ("VERIFY_DATABASE_URL", &verify_url),
        ],
        tools,
    )
    .await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();
    let verifier = Verifier::new(d.clone());
    let pass = tokio::spawn(async move {
        verifier.pass(&pass_ctx()).await.unwrap();
    });
    wait_until(Duration::from_secs(60), "the test restore", || async {
        gate.path().join("done").exists()
    })
    .await
    .unwrap();
    relay.cut();
    std::fs::write(gate.path().join("go"), "").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.restore();
    tokio::time::timeout(Duration::from_secs(60), pass)
        .await
        .expect("the verification was not recorded after the blip")
        .unwrap();
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM backup_verifications WHERE backup_id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("verified", 1));
    let verdict: Option<String> =
        sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verdict.as_deref(), Some("verified"));
}
