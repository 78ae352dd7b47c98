//! The newcomer's path, as the README walks it: `scripts/quickstart` against a Postgres with
//! Debian's default authentication (peer on the socket, passwords on TCP — loopback not trusted),
//! then the walkthrough: see the backup, damage the demo, restore it, verify. Needs root (as CI
//! runs), like Debian's own `runuser -u postgres`.

use std::collections::HashMap;
use std::path::Path;

use backup_worker_testkit::PgServer;
use sqlx::{Connection, Executor, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");
const QUICKSTART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/quickstart");

async fn quickstart(pg: &PgServer, var: &Path) -> std::process::Output {
    tokio::process::Command::new("bash")
        .arg(QUICKSTART)
        .env_remove("DATABASE_URL")
        .env_remove("STORAGE_URL")
        .env_remove("VERIFY_DATABASE_URL")
        .env("QUICKSTART_ONCE", "1")
        .env("BACKUP_WORKER_BIN", BIN)
        .env("QUICKSTART_VAR", var)
        .env("QUICKSTART_PG_PORT", pg.port.to_string())
        .env("PGHOST", pg.socket_dir())
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .unwrap()
}

/// `export K='V'` lines of var/quickstart/env.
fn env_file(var: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(var.join("quickstart/env")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

async fn cli(env: &HashMap<String, String>, args: &[&str]) -> (bool, String) {
    let mut c = tokio::process::Command::new(BIN);
    c.args(args);
    for k in ["DATABASE_URL", "STORAGE_URL", "VERIFY_DATABASE_URL"] {
        c.env(k, &env[k]);
    }
    let out = c.env("LOG_FORMAT", "json").output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn count(c: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(c).await.unwrap()
}

#[tokio::test]
async fn quickstart_on_debian_authentication_then_the_walkthrough_restores_the_demo() {
    let pg = PgServer::start_debian().await.unwrap();
    let trusted = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    assert!(
        PgConnection::connect(&trusted).await.is_err(),
        "loopback must not be trusted in this test"
    );
    let var = tempfile::tempdir().unwrap();
    let out = quickstart(&pg, var.path()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("creating (or updating) roles"), "{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    let env = env_file(var.path());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(var.path().join("quickstart/env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for secret in [&env["DATABASE_URL"], &env["DEMO_URL"]] {
        let password = secret.split(':').nth(2).unwrap().split('@').next().unwrap();
        assert!(!stderr.contains(password) && !stdout.contains(password));
    }

    // Step 2: the backup is there, and verified with the demo's row counts.
    let mut control = PgConnection::connect(&env["DATABASE_URL"]).await.unwrap();
    let (backup, status, verify): (uuid::Uuid, String, Option<String>) = sqlx::query_as(
        "SELECT id, status, verify_status FROM resource_backups WHERE resource_id = $1::uuid",
    )
    .bind(&env["DEMO_RESOURCE"])
    .fetch_one(&mut control)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), verify.as_deref()),
        ("succeeded", Some("verified"))
    );
    let orders: i64 = sqlx::query_scalar(
        "SELECT (detail -> 'tables' ->> 'public.orders')::bigint FROM backup_verifications
          WHERE backup_id = $1",
    )
    .bind(backup)
    .fetch_one(&mut control)
    .await
    .unwrap();
    assert_eq!(orders, 5000);
    let (ok, listing) = cli(&env, &["backups", &env["DEMO_RESOURCE"]]).await;
    assert!(ok && listing.contains(&backup.to_string()), "{listing}");

    // Step 3: damage the demo.
    let mut demo = PgConnection::connect(&env["DEMO_URL"]).await.unwrap();
    demo.execute("DELETE FROM orders; DROP TABLE products CASCADE; CREATE TABLE oops (x int);")
        .await
        .unwrap();

    // Step 4: restore it.
    let (ok, text) = cli(&env, &["restore", &backup.to_string()]).await;
    assert!(ok, "{text}");
    let (ok, text) = cli(&env, &["run", "--once", "--only", "restores"]).await;
    assert!(ok, "{text}");
    let mut demo = PgConnection::connect(&env["DEMO_URL"]).await.unwrap();
    assert_eq!(count(&mut demo, "SELECT count(*) FROM orders").await, 5000);
    assert_eq!(count(&mut demo, "SELECT count(*) FROM products").await, 40);
    assert_eq!(
        count(
            &mut demo,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'oops'"
        )
        .await,
        0
    );

    // Step 5: verify by hand.
    let (ok, text) = cli(&env, &["verify", &backup.to_string()]).await;
    assert!(
        ok && text.contains("VERIFIED") && text.contains("public.orders"),
        "{text}"
    );

    // Running the quickstart again is harmless: same passwords, one more backup.
    let again = quickstart(&pg, var.path()).await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(env_file(var.path())["DATABASE_URL"], env["DATABASE_URL"]);
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM resource_backups WHERE status = 'succeeded'")
            .fetch_one(&mut control)
            .await
            .unwrap();
    assert_eq!(n, 2);
}
