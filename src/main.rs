//! `backup-worker`: parses the command line and the environment, wires signals, and hands over to
//! the library. Everything testable lives in the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use backup_worker::app::{self, Deps, RunOptions};
use backup_worker::config::Config;
use backup_worker::loops::LoopName;
use backup_worker::metrics::Metrics;
use backup_worker::plans::Plans;
use backup_worker::{commands, db, logging, storage};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ENVIRONMENT: &str = "\
Environment (every command but --help reads it):
  DATABASE_URL         required: the control database holding the queue tables,
                       e.g. postgres://backup_worker:PASSWORD@127.0.0.1:5432/backup_worker
                       (scripts/quickstart writes one to var/quickstart/env: `. var/quickstart/env`)
  STORAGE_URL          where backups are stored: file:///path or s3://bucket/prefix
                       (default file://./var/backups)
  VERIFY_DATABASE_URL  a Postgres server for test restores (optional)
  VERIFY_REDIS_URL     a scratch Redis for Redis test restores (optional)
  LOG_FORMAT           json (default) or pretty; RUST_LOG filters
Every variable is listed in README.md (Configuration).";

#[derive(Parser)]
#[command(
    name = "backup-worker",
    version,
    about = "Backups, restores, verification and plan propagation for the database platform",
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (all loops, HTTP on METRICS_ADDR).
    Run {
        /// Comma-separated loops to run: scheduler,backups,restores,verifier,propagations.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<LoopName>>,
        /// One pass of each selected loop (claiming until nothing is due), no HTTP, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Apply the embedded database migrations (a no-op when current).
    Migrate,
    /// Enqueue a manual backup of a resource and print its id.
    Backup {
        /// The resource to back up (see `resources add`).
        resource_id: Uuid,
    },
    /// List a resource's backups, newest first: id, status, kind, age, size, verification, copy,
    /// anomaly; or, with --accept, clear a backup's anomaly flag after checking it.
    Backups {
        /// The resource whose backups to list.
        #[arg(required_unless_present = "accept", conflicts_with = "accept")]
        resource_id: Option<Uuid>,
        /// Clear this backup's anomaly flag (audited): retention counts it as good again.
        #[arg(long, value_name = "BACKUP_ID")]
        accept: Option<Uuid>,
    },
    /// Enqueue a restore of a backup and print its id.
    Restore {
        /// The backup to restore (see `backups <resource_id>`); with --to-time, the resource.
        #[arg(value_name = "BACKUP_ID | RESOURCE_ID")]
        backup_id: Uuid,
        /// Restore into another resource of the same team and type (a clone).
        #[arg(long, conflicts_with = "to_time")]
        into: Option<Uuid>,
        /// Rewind the resource to this instant (RFC 3339, e.g. 2026-12-04T10:58:00Z) from its
        /// base backups and WAL (point-in-time recovery).
        #[arg(long, value_parser = parse_instant)]
        to_time: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Print queue depths, verification figures and recent failures.
    Status,
    /// Verify one backup now (download, checksum, test restore) and print what it holds;
    /// exits non-zero unless it verified.
    Verify {
        /// The backup to verify (see `backups <resource_id>`).
        backup_id: Uuid,
    },
    /// Register teams (a plan tier each).
    #[command(subcommand)]
    Teams(TeamsCommand),
    /// Register resources (databases to back up).
    #[command(subcommand)]
    Resources(ResourcesCommand),
    /// Encryption keys (ENCRYPTION_KEY_FILE): rotate the master key, crypto-shred a team's
    /// backups, export a team's identity to decrypt one backup by hand.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-wrap every team key under a new master key, in one transaction (no object is touched);
    /// then point ENCRYPTION_KEY_FILE at the new file and restart the workers.
    RotateMaster {
        /// The new master key: 32 bytes in base64, mode 0600 or 0400.
        #[arg(long)]
        new_key_file: std::path::PathBuf,
    },
    /// Destroy a team's backup key: every backup of the team becomes unreadable at once, is
    /// marked expired, and its object is deleted in the background.
    Destroy {
        /// The team whose backups to crypto-shred.
        team_id: Uuid,
    },
    /// Print a team's age identity (AGE-SECRET-KEY-1…), only to a terminal or a 0600 file:
    /// `(umask 077; backup-worker keys export-identity T > team.key)`, then
    /// `age -d -i team.key < object.gz.age | gunzip | pg_restore -l`.
    ExportIdentity {
        /// The team whose identity to print.
        team_id: Uuid,
    },
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Create a team on a plan tier and print its id.
    Add {
        /// Plan tier from plans.yaml: pro, team, growth, hobby, hobby_plus, free, …
        #[arg(long)]
        tier: String,
    },
}

#[derive(Subcommand)]
enum ResourcesCommand {
    /// Register a resource and print its id. The connection URL is a secret, so it is never an
    /// argument: it is read from the environment variable RESOURCE_URL, or else from the first
    /// line of standard input (e.g. `read -rs url; printf '%s\n' "$url" | backup-worker resources add …`).
    Add {
        /// The team that owns it (see `teams add`).
        #[arg(long)]
        team: Uuid,
        /// postgres, vector, mongodb or redis.
        #[arg(long = "type", value_name = "TYPE")]
        resource_type: String,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    // Errors can carry a connection string from a driver message: never print it.
    let msg = backup_worker::secret::redact_credentials(&msg.to_string());
    eprintln!("backup-worker: {msg}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    backup_worker::alloc::tune();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("backup-worker: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format);

    match cli.command {
        Command::Run { only, once } => {
            let options = RunOptions {
                only: only.unwrap_or_else(|| LoopName::ALL.to_vec()),
                once,
            };
            run(config, options).await
        }
        Command::Migrate => match connect(&config, 2).await {
            Ok(pool) => match db::migrate(&pool).await {
                Ok(()) => {
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            Err(code) => code,
        },
        Command::Backup { resource_id } => match connect(&config, 2).await {
            Ok(pool) => print_result(commands::enqueue_backup(&pool, resource_id).await),
            Err(code) => code,
        },
        Command::Restore {
            backup_id,
            into,
            to_time,
        } => match connect(&config, 2).await {
            Ok(pool) => print_result(match to_time {
                Some(t) => commands::enqueue_restore_to_time(&pool, backup_id, t).await,
                None => commands::enqueue_restore(&pool, backup_id, into).await,
            }),
            Err(code) => code,
        },
        Command::Verify { backup_id } => verify(config, backup_id).await,
        Command::Keys(cmd) => keys(config, cmd).await,
        Command::Backups {
            resource_id,
            accept,
        } => match connect(&config, 2).await {
            Ok(pool) => {
                let text = match (accept, resource_id) {
                    (Some(backup), _) => commands::accept_anomaly(&pool, backup)
                        .await
                        .map(|line| format!("{line}\n")),
                    (None, Some(resource)) => commands::list_backups(&pool, resource).await,
                    // clap requires one of the two.
                    (None, None) => Ok(String::new()),
                };
                match text {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                }
            }
            Err(code) => code,
        },
        Command::Teams(TeamsCommand::Add { tier }) => match connect(&config, 2).await {
            Ok(pool) => print_result(commands::add_team(&pool, &tier).await),
            Err(code) => code,
        },
        Command::Resources(ResourcesCommand::Add {
            team,
            resource_type,
        }) => {
            let url = match resource_url() {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("backup-worker: {e}");
                    return ExitCode::from(2);
                }
            };
            match connect(&config, 2).await {
                Ok(pool) => {
                    print_result(commands::add_resource(&pool, team, &resource_type, &url).await)
                }
                Err(code) => code,
            }
        }
        Command::Status => match connect(&config, 2).await {
            Ok(pool) => match commands::status(&pool).await {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            },
            Err(code) => code,
        },
    }
}

/// The connection URL of `resources add`: RESOURCE_URL, else the first line of stdin.
fn resource_url() -> Result<backup_worker::secret::Secret, String> {
    if let Some(url) = std::env::var("RESOURCE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        return Ok(backup_worker::secret::Secret::new(url.trim().to_owned()));
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("connection URL, then Enter:");
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("reading the connection URL from stdin: {e}"))?;
    let url = line.trim();
    if url.is_empty() {
        return Err(
            "no connection URL: set RESOURCE_URL or pipe the URL on stdin (never as an argument)"
                .into(),
        );
    }
    Ok(backup_worker::secret::Secret::new(url.to_owned()))
}

fn print_result(r: Result<Uuid, commands::CommandError>) -> ExitCode {
    match r {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn connect(config: &Config, max: u32) -> Result<sqlx::PgPool, ExitCode> {
    db::connect(&config.database_url, max).await.map_err(fail)
}

/// Everything the loops share, from the configuration.
async fn deps(config: Config, pool_size: u32) -> Result<Deps, ExitCode> {
    let plans = match Plans::load(config.plans_path.as_deref()) {
        Ok(p) => p,
        Err(e) => return Err(fail(format!("invalid configuration: PLANS_PATH: {e}"))),
    };
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => return Err(fail(format!("metrics registry: {e}"))),
    };
    let store = match storage::open(&config.storage_url, &config.s3).await {
        Ok(s) => s,
        Err(e) => return Err(fail(format!("STORAGE_URL: {e}"))),
    };
    let copy_store = match &config.copy {
        None => None,
        Some(dest) => match storage::open_copy(dest).await {
            Ok(s) => Some(s),
            Err(e) => return Err(fail(format!("COPY_STORAGE_URL: {e}"))),
        },
    };
    check_object_lock(
        store.as_ref(),
        config.object_lock,
        "OBJECT_LOCK_MODE",
        "STORAGE_URL",
    )
    .await?;
    if let (Some(copy), Some(dest)) = (&copy_store, &config.copy) {
        check_object_lock(
            copy.as_ref(),
            dest.object_lock,
            "COPY_OBJECT_LOCK_MODE",
            "COPY_STORAGE_URL",
        )
        .await?;
    }
    let pool = connect(&config, pool_size).await?;
    let provisioner: Option<Arc<dyn backup_worker::provisioner::Provisioner>> =
        match config.provisioner_addr.as_deref() {
            None => None,
            Some(addr) => match backup_worker::provisioner::GrpcProvisioner::new(
                addr,
                backup_worker::provisioner::CALL_DEADLINE,
            ) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    return Err(fail(format!(
                        "invalid configuration: PROVISIONER_ADDR: {e}"
                    )))
                }
            },
        };
    Ok(Deps {
        config: Arc::new(config),
        pool,
        store,
        copy_store,
        plans: Arc::new(plans),
        metrics,
        tools: backup_worker::process::Tools::default(),
        provisioner,
    })
}

/// With a lock mode configured, the bucket must have S3 Object Lock enabled (DESIGN §13).
async fn check_object_lock(
    store: &dyn backup_worker::storage::ObjectStore,
    mode: Option<backup_worker::storage::LockMode>,
    var: &str,
    url_var: &str,
) -> Result<(), ExitCode> {
    if mode.is_none() {
        return Ok(());
    }
    match store.object_lock_enabled().await {
        Ok(true) => Ok(()),
        Ok(false) => Err(fail(format!(
            "invalid configuration: {var}: the bucket of {url_var} does not have S3 Object Lock enabled (enable it on the bucket, or unset {var})"
        ))),
        Err(e) => Err(fail(format!(
            "invalid configuration: {var}: cannot read the Object Lock configuration of {url_var}'s bucket: {e}"
        ))),
    }
}

async fn run(config: Config, options: RunOptions) -> ExitCode {
    let pool_size =
        (config.backup_concurrency + config.restore_concurrency + config.verify_concurrency + 4)
            as u32;
    let listener = if options.once {
        None
    } else {
        let addr: SocketAddr = config.metrics_addr;
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("METRICS_ADDR: cannot listen on {addr}: {e}")),
        }
    };
    let deps = match deps(config, pool_size).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    match &deps.config.master_key {
        None => tracing::info!(
            "encryption at rest: off (ENCRYPTION_KEY_FILE is not set); backups are stored as gzip"
        ),
        Some(master) => match backup_worker::crypto::check_master(&deps.pool, master).await {
            Ok(check) => {
                if let Some(why) = check.refusal() {
                    eprintln!("backup-worker: invalid configuration: ENCRYPTION_KEY_FILE: {why}");
                    return ExitCode::from(2);
                }
                if let Some(warning) = check.warning() {
                    tracing::warn!(master_fingerprint = %check.fingerprint, "{warning}");
                }
                tracing::info!(master_fingerprint = %check.fingerprint, team_keys = check.keys,
                    fingerprints_recorded = check.recorded, "encryption at rest: on (age, one key per team)");
            }
            Err(backup_worker::crypto::KeyError::Db(e)) => return fail(e),
            Err(e) => {
                eprintln!("backup-worker: invalid configuration: ENCRYPTION_KEY_FILE: {e}");
                return ExitCode::from(2);
            }
        },
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    match app::run(deps, options, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// `keys …`: rotate the master key, destroy a team's key, export a team's identity.
async fn keys(config: Config, cmd: KeysCommand) -> ExitCode {
    use backup_worker::crypto;
    let pool = match connect(&config, 2).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let master = config.master_key.clone();
    let need_master = || {
        eprintln!("backup-worker: invalid configuration: ENCRYPTION_KEY_FILE: required for this command (the current master key)");
        ExitCode::from(2)
    };
    match cmd {
        KeysCommand::RotateMaster { new_key_file } => {
            let Some(old) = master else {
                return need_master();
            };
            let new = match crypto::MasterKey::load(&new_key_file) {
                Ok(k) => k,
                Err(why) => {
                    eprintln!("backup-worker: --new-key-file: {why}");
                    return ExitCode::from(2);
                }
            };
            let (old_fp, new_fp) = (old.fingerprint(), new.fingerprint());
            if old_fp == new_fp {
                eprintln!("backup-worker: --new-key-file: it holds the current master key (fingerprint {old_fp}); nothing to rotate");
                return ExitCode::from(2);
            }
            match crypto::rotate_master(&pool, &old, &new).await {
                Ok(r) => {
                    println!(
                        "re-wrapped {} team key(s) from master key {old_fp} to {new_fp}. Point ENCRYPTION_KEY_FILE at {} and restart every replica, then run this command again (it moves what replicas still on the old key wrapped meanwhile); retire the old key only after that run",
                        r.rewrapped,
                        new_key_file.display()
                    );
                    if r.remaining.is_empty() {
                        return ExitCode::SUCCESS;
                    }
                    let groups: Vec<String> = r.remaining.iter().map(ToString::to_string).collect();
                    eprintln!(
                        "backup-worker: {} team key(s) are under neither key and were not re-wrapped: {}",
                        r.remaining.iter().map(|g| g.keys).sum::<u64>(),
                        groups.join("; ")
                    );
                    ExitCode::FAILURE
                }
                Err(e) => fail(e),
            }
        }
        KeysCommand::Destroy { team_id } => match crypto::destroy(&pool, team_id).await {
            Ok(d) => {
                println!(
                    "destroyed {} key(s) of team {team_id}; {} backup(s) expired, their objects are deleted in the background",
                    d.keys, d.backups_expired
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        KeysCommand::ExportIdentity { team_id } => {
            let Some(master) = master else {
                return need_master();
            };
            if !private_stdout() {
                eprintln!("backup-worker: refusing to print a secret key to a pipe or to a file others may read; write it to a 0600 file: (umask 077; backup-worker keys export-identity {team_id} > team.key)");
                return ExitCode::from(2);
            }
            match crypto::export_identity(&pool, &master, team_id).await {
                Ok(identity) => {
                    println!("{}", identity.as_str());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Stdout is a terminal, or a regular file only its owner may read.
fn private_stdout() -> bool {
    use std::os::unix::fs::PermissionsExt;
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return true;
    }
    std::fs::metadata("/proc/self/fd/1")
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o077 == 0)
}

/// `verify <backup_id>`: prints the result; exit 0 only when the backup verified.
async fn verify(config: Config, backup_id: Uuid) -> ExitCode {
    let deps = match deps(config, 3).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let verifier = backup_worker::loops::verifier::Verifier::new(deps);
    match verifier.verify_now(backup_id).await {
        Ok(report) => {
            print!("{}", commands::format_verification(&report));
            if report.status == "verified" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}

/// SIGTERM (Kubernetes) or SIGINT (a terminal) starts a graceful shutdown.
async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "cannot install signal handlers; only the process kill will stop the daemon"
        );
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    shutdown.cancel();
}

/// An RFC 3339 instant for `restore --to-time`.
fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-12-04T10:58:00Z: {e}"))
}
