//! The real binary, driven the way the platform and an operator use it: environment
//! configuration, subcommands, the HTTP endpoints, JSON logs and SIGTERM.

use std::process::Stdio;
use std::time::{Duration, Instant};

use backup_worker::config::ENV_VARS;
use backup_worker_testkit::{free_port, http_get, wait_until};
use sqlx::PgPool;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_backup-worker");
const PASSWORD: &str = "pw-never-logged-7f3a";

/// The per-test database's URL, with a password (trust auth ignores it; it must never be shown).
fn db_url(pool: &PgPool) -> String {
    let mut url = url::Url::parse(&backup_worker_testkit::database_url(pool)).unwrap();
    let _ = url.set_password(Some(PASSWORD));
    url.to_string()
}

fn cmd(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    for v in ENV_VARS {
        c.env_remove(v);
    }
    c.env("LOG_FORMAT", "json").env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).kill_on_drop(true);
    c
}

async fn output(mut c: Command, args: &[&str]) -> (i32, String, String) {
    let out = c.args(args).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_configuration_fails_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("GZIP_LEVEL", "12"),
        ("SCHEDULER_INTERVAL", "often"),
        ("STORAGE_URL", "ftp://x/y"),
        ("METRICS_ADDR", "everywhere"),
        ("LEASE_SECONDS", "0"),
    ] {
        let (code, stdout, stderr) = output(
            cmd(&[
                ("DATABASE_URL", "postgres://u:p@127.0.0.1/db"),
                (var, value),
            ]),
            &["run", "--once"],
        )
        .await;
        assert_eq!(code, 2, "{var}: {stderr}");
        assert!(stdout.is_empty());
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with(&format!("backup-worker: invalid configuration: {var}: ")),
            "{stderr}"
        );
    }
    let (code, _, stderr) = output(cmd(&[]), &["status"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

#[sqlx::test]
async fn a_bad_plans_file_stops_the_start_naming_the_field(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.yaml");
    let text = backup_worker::plans::EMBEDDED_PLANS.replace(
        "pro:\n    { rpo_minutes: 60,",
        "pro:\n    { rpo_minutes: -60,",
    );
    assert_ne!(
        text,
        backup_worker::plans::EMBEDDED_PLANS,
        "fixture edit must apply"
    );
    std::fs::write(&path, text).unwrap();
    let url = db_url(&pool);
    let (code, _, stderr) = output(
        cmd(&[
            ("DATABASE_URL", &url),
            ("PLANS_PATH", path.to_str().unwrap()),
        ]),
        &["run", "--once"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("PLANS_PATH") && stderr.contains("tiers.pro.rpo_minutes"),
        "{stderr}"
    );
}

#[sqlx::test(migrations = false)]
async fn migrate_is_idempotent(pool: PgPool) {
    let url = db_url(&pool);
    for _ in 0..2 {
        let (code, stdout, stderr) = output(cmd(&[("DATABASE_URL", &url)]), &["migrate"]).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("migrations applied"));
        assert!(!stderr.contains(PASSWORD) && !stdout.contains(PASSWORD));
    }
    assert!(backup_worker::db::migrations_current(&pool).await.unwrap());
}

#[sqlx::test]
async fn enqueue_commands_print_ids_and_status_reports(pool: PgPool) {
    let team: Uuid =
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ('pro') RETURNING id")
            .fetch_one(&pool)
            .await
            .unwrap();
    let resource: Uuid = sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url)
         VALUES ($1, 'redis', 'redis://:x@h:6379/0') RETURNING id",
    )
    .bind(team)
    .fetch_one(&pool)
    .await
    .unwrap();
    let url = db_url(&pool);

    let (code, stdout, stderr) = output(
        cmd(&[("DATABASE_URL", &url)]),
        &["backup", &resource.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let backup: Uuid = stdout.trim().parse().unwrap();
    let (kind, status): (String, String) =
        sqlx::query_as("SELECT kind, status FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((kind.as_str(), status.as_str()), ("manual", "pending"));

    let (code, stdout, stderr) = output(
        cmd(&[("DATABASE_URL", &url)]),
        &["restore", &backup.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let restore: Uuid = stdout.trim().parse().unwrap();
    let (target, of): (Uuid, Uuid) =
        sqlx::query_as("SELECT resource_id, backup_id FROM resource_restores WHERE id = $1")
            .bind(restore)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((target, of), (resource, backup));

    let (code, _, stderr) = output(
        cmd(&[("DATABASE_URL", &url)]),
        &["backup", &Uuid::new_v4().to_string()],
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("not found"), "{stderr}");

    let (code, stdout, _) = output(cmd(&[("DATABASE_URL", &url)]), &["status"]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("backups") && stdout.contains("pending"),
        "{stdout}"
    );
    assert!(stdout.contains("restores"), "{stdout}");
}

#[sqlx::test]
async fn once_exits_zero_without_serving_http(pool: PgPool) {
    let url = db_url(&pool);
    let port = free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", dir.path().display());
    let (code, _, stderr) = output(
        cmd(&[
            ("DATABASE_URL", &url),
            ("METRICS_ADDR", &metrics_addr),
            ("STORAGE_URL", &storage),
        ]),
        &["run", "--once", "--only", "scheduler,backups"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(http_get(metrics_addr.parse().unwrap(), "/metrics")
        .await
        .is_err());
    let (code, _, stderr) = output(
        cmd(&[("DATABASE_URL", &url)]),
        &["run", "--once", "--only", "backup"],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown loop"), "{stderr}");
}

/// The daemon as Kubernetes runs it: serves /metrics that promtool accepts, answers probes,
/// logs JSON without secrets, and exits 0 within SHUTDOWN_GRACE + 1 s of SIGTERM.
#[sqlx::test]
async fn daemon_serves_probes_and_stops_on_sigterm(pool: PgPool) {
    let url = db_url(&pool);
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", dir.path().display());
    let grace = Duration::from_secs(2);
    let mut child = cmd(&[
        ("DATABASE_URL", &url),
        ("METRICS_ADDR", &addr),
        ("STORAGE_URL", &storage),
        ("SHUTDOWN_GRACE", "2"),
        ("WORKER_ID", "cli-test-pod"),
    ])
    .arg("run")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let sock = addr.parse().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the daemon to answer /healthz",
        || async move { matches!(http_get(sock, "/healthz").await, Ok((200, _))) },
    )
    .await
    .unwrap();
    assert_eq!(http_get(sock, "/readyz").await.unwrap().0, 200);
    let (code, metrics) = http_get(sock, "/metrics").await.unwrap();
    assert_eq!(code, 200);

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/test");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let pid = child.id().unwrap().to_string();
    let sent = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(grace + Duration::from_secs(1), child.wait())
        .await
        .expect("exit within SHUTDOWN_GRACE + 1 s")
        .unwrap();
    assert!(status.success(), "{status:?} after {:?}", sent.elapsed());

    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(!logs.contains(PASSWORD), "{logs}");
    let mut messages = Vec::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "backup-worker started"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "backup-worker stopped"),
        "{messages:?}"
    );
}
