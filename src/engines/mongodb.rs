//! MongoDB: `mongodump --archive` (uncompressed; we gzip), the URI — credentials included — in a
//! 0600 `--config` YAML file, never in argv.

use std::path::Path;

use super::{
    base_env, credential_file, percent_decode, problem, split_url, ConfigProblem, ToolCommand,
};
use crate::secret::Secret;

/// mongodump archive magic number (0x8199e26d, little-endian).
pub const MAGIC: &[u8] = &[0x6d, 0xe2, 0x99, 0x81];

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
    Ok(ToolCommand {
        program: program.into(),
        args,
        env: base_env(temp_dir),
        secrets,
        credential_files: vec![config],
        magic: MAGIC,
        extension: "archive",
    })
}

pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<ToolCommand, ConfigProblem> {
    mongo_database(url)?;
    tool_command("mongodump", vec!["--archive".into()], url, temp_dir)
}

/// `mongorestore --archive --drop --nsInclude=<db>.*` reading the archive on stdin; the URI in a
/// 0600 config file. Only the URI's database is touched (never admin): a URI without one is a
/// configuration problem.
pub(crate) fn restore_command(url: &Secret, temp_dir: &Path) -> Result<ToolCommand, ConfigProblem> {
    let db = mongo_database(url)?;
    if db.is_empty() || db == "admin" || db.contains(['*', '.', '$', '/', '\\', ' ', '"']) {
        return Err(problem(
            "mongodb connection URL must name the tenant database to restore (not admin)",
        ));
    }
    let args = vec![
        "--archive".into(),
        "--drop".into(),
        format!("--nsInclude={db}.*").into(),
    ];
    tool_command("mongorestore", args, url, temp_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_goes_to_a_0600_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new("mongodb+srv://app:s3cr%3At@cluster0.example.net/shop?authSource=admin&retryWrites=true");
        let cmd = dump_command(&url, dir.path()).unwrap();
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
