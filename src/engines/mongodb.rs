//! MongoDB: the dump (`mongodump --archive`, uncompressed; we gzip), the restore
//! (`mongorestore --archive --drop`, scoped to the target's database, renamed for a clone), and
//! the Go driver's error dialect. The URI — credentials included — travels in a 0600 `--config`
//! YAML file, never in argv.

use std::path::Path;

use tokio::io::AsyncReadExt;

use super::mongodb_archive::{ArchiveReader, ArchiveSummary};
use super::{
    base_env, credential_file, fail, percent_decode, problem, run_failure, split_url, BackupFile,
    ConfigProblem, Dump, DumpPlan, Failure, RestoreTarget, ToolCommand,
};
use crate::classify::Dialect;
use crate::domain::FailureReason;
use crate::process;
use crate::secret::Secret;

/// mongodump/mongorestore (the Go driver's messages).
const DIALECT: Dialect = Dialect {
    auth: &[
        "auth error",
        "unable to authenticate",
        "sasl conversation error",
        "authentication failed",
        "not authorized on",
        "requires authentication",
    ],
    unreachable: &[
        "could not connect to server",
        "server selection error",
        "server selection timeout",
        "no reachable servers",
        "socket was unexpectedly closed",
        "error connecting to",
        "connection pool",
    ],
};

/// The failure class of a MongoDB tool's non-zero exit.
pub fn classify(stderr: &str) -> FailureReason {
    crate::classify::classify(stderr, &DIALECT)
}

/// The archive's header, every collection's metadata, the metadata terminator, and one
/// namespace-EOF per namespace ([`mongodb_archive`](super::mongodb_archive)).
#[derive(Default)]
pub(crate) struct ArchiveCheck {
    reader: ArchiveReader,
    error: Option<String>,
}

impl crate::pipeline::StreamCheck for ArchiveCheck {
    fn update(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.reader.feed(bytes) {
                self.error = Some(e.to_string());
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<String, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let s = self.reader.finish().map_err(|e| e.to_string())?;
        Ok(format!(
            "mongodump archive: {} namespaces, {} documents",
            s.namespaces.len(),
            s.total_documents
        ))
    }
}

/// Validates a MongoDB URI and returns its database (empty when it names none).
pub fn mongo_database(url: &Secret) -> Result<String, ConfigProblem> {
    let parts = split_url(url.expose())?;
    if parts.scheme != "mongodb" && parts.scheme != "mongodb+srv" {
        return Err(problem(
            "mongodb connection URL must start with mongodb:// or mongodb+srv://",
        ));
    }
    if parts.hosts.is_empty() {
        return Err(problem("mongodb connection URL names no host"));
    }
    if parts.scheme == "mongodb+srv" && parts.hosts.contains(',') {
        return Err(problem("mongodb+srv URLs take exactly one host"));
    }
    if let Some(u) = parts.user {
        percent_decode(u)?;
    }
    if let Some(p) = parts.password {
        percent_decode(p)?;
    }
    percent_decode(parts.path)
}

/// The `--config` file: YAML with the URI (serialised, so quoting is always right).
pub(crate) fn config_file(
    url: &Secret,
    temp_dir: &Path,
) -> Result<tempfile::NamedTempFile, ConfigProblem> {
    let yaml = serde_yaml::to_string(&std::collections::BTreeMap::from([("uri", url.expose())]))
        .map_err(|e| problem(format!("cannot encode the mongodb config file: {e}")))?;
    credential_file(temp_dir, "mongo-", &yaml)
}

/// A MongoDB tool with `args` followed by `--config=<0600 file holding the URI>`; the URI and its
/// decoded password are registered as secrets for stderr redaction.
fn tool_command(
    program: &str,
    mut args: Vec<std::ffi::OsString>,
    url: &Secret,
    temp_dir: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    let config = config_file(url, temp_dir)?;
    let mut config_arg = std::ffi::OsString::from("--config=");
    config_arg.push(config.path());
    args.push(config_arg);
    let mut secrets = vec![url.expose().to_owned()];
    if let Some(pw) = split_url(url.expose())?.password {
        secrets.push(percent_decode(pw)?);
    }
    let mut cmd = ToolCommand::new(program, base_env(temp_dir));
    cmd.args = args;
    cmd.secrets = secrets;
    cmd.credential_files.push(config);
    Ok(cmd)
}

pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<Dump, ConfigProblem> {
    mongo_database(url)?;
    Ok(Dump {
        plan: DumpPlan::Tool(tool_command(
            "mongodump",
            vec!["--archive".into()],
            url,
            temp_dir,
        )?),
        extension: "archive",
        mode: None,
        fallback: None,
    })
}

/// A database name we may hand to `--nsInclude`/`--nsTo` (never admin, no pattern characters).
fn tenant_database(db: &str) -> bool {
    !(db.is_empty() || db == "admin" || db.contains(['*', '.', '$', '/', '\\', ' ', '"']))
}

/// `mongorestore --archive --drop` reading the archive on stdin, touching only the target's
/// database: `--nsInclude=<db>.*` when the backup's database is the target's, and for a clone
/// into another database `--nsInclude=<src>.* --nsFrom=<src>.* --nsTo=<db>.*`. A target URI
/// without a database is a configuration problem.
pub(crate) fn restore_command(
    url: &Secret,
    source_db: &str,
    temp_dir: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    let db = mongo_database(url)?;
    if !tenant_database(&db) {
        return Err(problem(
            "mongodb connection URL must name the tenant database to restore (not admin)",
        ));
    }
    let mut args = vec!["--archive".into(), "--drop".into()];
    if source_db == db {
        args.push(format!("--nsInclude={db}.*").into());
    } else {
        if !tenant_database(source_db) {
            return Err(problem(
                "the backup's mongodb connection URL names no tenant database to clone from",
            ));
        }
        args.extend([
            format!("--nsInclude={source_db}.*").into(),
            format!("--nsFrom={source_db}.*").into(),
            format!("--nsTo={db}.*").into(),
        ]);
    }
    tool_command("mongorestore", args, url, temp_dir)
}

/// Reads the whole archive, counting documents per namespace; a stream that is not a complete
/// mongodump archive is refused before anything is touched.
pub(crate) async fn read_archive(backup: &BackupFile) -> Result<ArchiveSummary, Failure> {
    let mut source = backup.open().await?;
    let mut reader = ArchiveReader::new();
    let mut buf = vec![0u8; 256 * 1024];
    let invalid = |e: &dyn std::fmt::Display| {
        fail(
            FailureReason::Integrity,
            format!("the backup is not a complete mongodump archive: {e}"),
        )
    };
    loop {
        let n = source
            .read(&mut buf)
            .await
            .map_err(|e| fail(FailureReason::Integrity, format!("reading the backup: {e}")))?;
        if n == 0 {
            break;
        }
        reader.feed(&buf[..n]).map_err(|e| invalid(&e))?;
    }
    reader.finish().map_err(|e| invalid(&e))
}

/// What mongorestore reports in its last line,
/// `N document(s) restored successfully. M document(s) failed to restore.`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestoreCounts {
    pub restored: u64,
    /// Documents the server rejected (duplicate keys, validators): without `--stopOnError`
    /// mongorestore goes on and still exits 0.
    pub failed: u64,
}

/// The counts of mongorestore's last summary line; `None` when it printed none.
pub(crate) fn restore_counts(stderr: &str) -> Option<RestoreCounts> {
    let number_before = |text: &str, at: usize| -> Option<u64> {
        text[..at]
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let at = stderr.rfind(" document(s) restored successfully")?;
    let restored = number_before(stderr, at)?;
    let rest = &stderr[at..];
    let line = rest.split('\n').next().unwrap_or(rest);
    let failed = match line.find(" document(s) failed to restore") {
        Some(f) => number_before(line, f)?,
        None => 0,
    };
    Some(RestoreCounts { restored, failed })
}

/// The first per-document error mongorestore went on through (`continuing through error: …`).
fn first_rejection(stderr: &str) -> Option<&str> {
    const MARK: &str = "continuing through error: ";
    stderr
        .lines()
        .find_map(|l| l.find(MARK).map(|i| l[i + MARK.len()..].trim()))
}

/// The source database of a restore: the database named by the URL of the resource the backup
/// was taken of. A URL naming none dumped the whole deployment, which no tenant restore is
/// scoped to: refused (`config`) before anything is touched, and such a backup fails
/// verification (DESIGN §6, §11).
fn source_database(source_url: &Secret) -> Result<String, Failure> {
    let db = mongo_database(source_url)?;
    if !tenant_database(&db) {
        return Err(fail(
            FailureReason::Config,
            "the backup's mongodb connection URL names no tenant database (it dumped the whole \
             deployment); such a backup is restored by hand, never into a tenant database",
        ));
    }
    Ok(db)
}

/// The test restore (DESIGN §11): the whole archive read and its documents counted per
/// namespace; a backup of a resource whose URL names no database fails `config` (its restore
/// would be refused).
pub(crate) async fn census(
    source_url: &Secret,
    backup: &BackupFile,
) -> Result<std::collections::BTreeMap<String, u64>, Failure> {
    source_database(source_url)?;
    let summary = read_archive(backup).await?;
    let mut counts = std::collections::BTreeMap::new();
    for ns in summary.namespaces {
        *counts
            .entry(format!("{}.{}", ns.db, ns.collection))
            .or_default() += ns.documents;
    }
    Ok(counts)
}

/// Restores the archive into the target's database (renaming it for a clone) and checks that the
/// documents the archive holds for it were restored: a restore that restores nothing from a
/// non-empty archive fails, and one in which the server rejected any document fails
/// `incomplete` (the target is partly restored; both counts are in the detail).
pub(crate) async fn restore(t: &RestoreTarget<'_>, backup: &BackupFile) -> Result<(), Failure> {
    let target_db = mongo_database(t.url)?;
    let source_db = source_database(t.source_url)?;
    let cmd = restore_command(t.url, &source_db, t.temp)?;
    let summary = read_archive(backup).await?;
    let expected: u64 = summary
        .namespaces
        .iter()
        .filter(|ns| ns.db == source_db)
        .map(|ns| ns.documents)
        .sum();
    let (finished, _) = process::run_one(t.tools, &cmd, Some(backup.open().await?), 0)
        .await
        .map_err(|e| run_failure(e, classify, "restoring"))?;
    let counts = restore_counts(&finished.stderr);
    tracing::info!(source_db = %source_db, target_db = %target_db, expected, counts = ?counts,
        "mongorestore finished");
    match counts {
        Some(RestoreCounts { restored, failed }) if failed > 0 => Err(fail(
            FailureReason::Incomplete,
            format!(
                "mongorestore rejected {failed} of the documents (it goes on without \
                 --stopOnError and exits 0): {target_db} is partly restored; \
                 documents_restored={restored} documents_failed={failed} \
                 (the archive holds {expected} for {source_db}); first error: {}",
                first_rejection(&finished.stderr).unwrap_or("(none printed)")
            ),
        )),
        Some(RestoreCounts { restored: 0, .. }) if expected > 0 => Err(fail(
            FailureReason::Dump,
            format!(
                "mongorestore restored 0 of the archive's {expected} documents for {source_db}: {}",
                finished.stderr
            ),
        )),
        None if expected > 0 => Err(fail(
            FailureReason::Dump,
            format!(
                "mongorestore did not report the documents it restored: {}",
                finished.stderr
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mongorestore_counts() {
        let c = |restored, failed| Some(RestoreCounts { restored, failed });
        let tail = "2026-11-22T10:00:00.000+0000\tfinished restoring shop.orders (2000 documents, 0 failures)\n\
                    2026-11-22T10:00:00.000+0000\t2010 document(s) restored successfully. 0 document(s) failed to restore.";
        assert_eq!(restore_counts(tail), c(2010, 0));
        assert_eq!(
            restore_counts("0 document(s) restored successfully. 5 document(s) failed to restore."),
            c(0, 5)
        );
        let rejected = "2026-12-04T10:00:00.000+0000\tcontinuing through error: E11000 duplicate key error collection: shop.orders index: _id_ dup key: { _id: 1 }\n\
                        2026-12-04T10:00:00.000+0000\tfinished restoring shop.orders (1500 documents, 500 failures)\n\
                        2026-12-04T10:00:00.000+0000\t1500 document(s) restored successfully. 500 document(s) failed to restore.\n";
        assert_eq!(restore_counts(rejected), c(1500, 500));
        assert_eq!(
            first_rejection(rejected),
            Some("E11000 duplicate key error collection: shop.orders index: _id_ dup key: { _id: 1 }")
        );
        // Older tools print no failure count: none failed.
        assert_eq!(
            restore_counts("12 document(s) restored successfully.\n"),
            c(12, 0)
        );
        assert_eq!(restore_counts("Failed: connection refused"), None);
    }

    #[test]
    fn a_backup_of_a_whole_deployment_is_no_tenant_restore() {
        for url in [
            "mongodb://u:p@h:27017/",
            "mongodb://h",
            "mongodb://h/admin?x=1",
        ] {
            let e = source_database(&Secret::new(url)).unwrap_err();
            assert_eq!(e.reason, FailureReason::Config, "{url}");
            assert!(!e.detail.contains("u:p"), "{}", e.detail);
        }
        assert_eq!(
            source_database(&Secret::new("mongodb://u:p@h/shop?authSource=admin")).unwrap(),
            "shop"
        );
    }

    #[test]
    fn clones_rename_and_same_name_restores_include() {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new("mongodb://u:p@h:27017/shop_copy");
        let argv = |cmd: ToolCommand| -> Vec<String> {
            cmd.args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .filter(|a| !a.starts_with("--config="))
                .collect()
        };
        assert_eq!(
            argv(restore_command(&url, "shop", dir.path()).unwrap()),
            [
                "--archive",
                "--drop",
                "--nsInclude=shop.*",
                "--nsFrom=shop.*",
                "--nsTo=shop_copy.*"
            ]
        );
        assert_eq!(
            argv(restore_command(&url, "shop_copy", dir.path()).unwrap()),
            ["--archive", "--drop", "--nsInclude=shop_copy.*"]
        );
        assert!(restore_command(&url, "admin", dir.path()).is_err());
        assert!(restore_command(&Secret::new("mongodb://h/admin"), "admin", dir.path()).is_err());
    }

    #[test]
    fn uri_goes_to_a_0600_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new("mongodb+srv://app:s3cr%3At@cluster0.example.net/shop?authSource=admin&retryWrites=true");
        let cmd = dump_command(&url, dir.path()).unwrap().command();
        assert_eq!(cmd.program, "mongodump");
        let argv: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv[0], "--archive");
        assert!(argv
            .iter()
            .all(|a| !a.contains("s3cr") && !a.contains("mongodb")));
        let path = argv[1].strip_prefix("--config=").unwrap().to_owned();
        let yaml: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(yaml["uri"], url.expose());
        assert!(cmd.secrets.iter().any(|s| s == "s3cr:t"));
        drop(cmd);
        assert!(!std::path::Path::new(&path).exists());
    }

    #[test]
    fn database_from_the_uri() {
        assert_eq!(
            mongo_database(&Secret::new(
                "mongodb://u:p@h1:27017,h2:27017/app?replicaSet=rs0"
            ))
            .unwrap(),
            "app"
        );
        assert_eq!(mongo_database(&Secret::new("mongodb://h")).unwrap(), "");
        assert!(mongo_database(&Secret::new("postgres://h/db")).is_err());
        assert!(mongo_database(&Secret::new("mongodb+srv://a,b/db")).is_err());
        assert!(mongo_database(&Secret::new("mongodb:///db")).is_err());
    }
}
