//! One-shot commands for people: enqueue a manual backup or a restore, list a resource's
//! backups, register a team or a resource, print queue status and a verification's result.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::ResourceType;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("resource {0} not found")]
    ResourceNotFound(Uuid),
    #[error("resource {id} is {status}, not active")]
    ResourceInactive { id: Uuid, status: String },
    #[error("resource {id} has type {resource_type:?}, which backup-worker does not back up")]
    UnsupportedType { id: Uuid, resource_type: String },
    #[error("backup {0} not found")]
    BackupNotFound(Uuid),
    #[error("team {0} not found (create one with: backup-worker teams add --tier pro)")]
    TeamNotFound(Uuid),
    #[error("unsupported resource type {0:?}: expected postgres, vector, mongodb or redis")]
    UnknownType(String),
    #[error("invalid connection URL: {0}")]
    BadUrl(String),
    #[error("invalid tier {0:?}: lowercase letters, digits and _ (e.g. pro, hobby, team)")]
    BadTier(String),
    #[error("backup {0} is not flagged as an anomaly: nothing to accept")]
    NotAnomalous(Uuid),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Inserts a `manual` pending backup for an active resource of a supported type.
pub async fn enqueue_backup(pool: &PgPool, resource_id: Uuid) -> Result<Uuid, CommandError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT resource_type, status FROM resources WHERE id = $1")
            .bind(resource_id)
            .fetch_optional(pool)
            .await?;
    let (resource_type, status) = row.ok_or(CommandError::ResourceNotFound(resource_id))?;
    if status != "active" {
        return Err(CommandError::ResourceInactive {
            id: resource_id,
            status,
        });
    }
    if ResourceType::parse(&resource_type).is_none() {
        return Err(CommandError::UnsupportedType {
            id: resource_id,
            resource_type,
        });
    }
    let id = sqlx::query_scalar(
        "INSERT INTO resource_backups (resource_id, kind) VALUES ($1, 'manual') RETURNING id",
    )
    .bind(resource_id)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// Inserts a pending restore of `backup_id` into `into` (default: the backup's own resource).
/// The restore loop checks team, type and the object before touching anything.
pub async fn enqueue_restore(
    pool: &PgPool,
    backup_id: Uuid,
    into: Option<Uuid>,
) -> Result<Uuid, CommandError> {
    let source: Option<Uuid> =
        sqlx::query_scalar("SELECT resource_id FROM resource_backups WHERE id = $1")
            .bind(backup_id)
            .fetch_optional(pool)
            .await?;
    let source = source.ok_or(CommandError::BackupNotFound(backup_id))?;
    let target = into.unwrap_or(source);
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM resources WHERE id = $1)")
        .bind(target)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(CommandError::ResourceNotFound(target));
    }
    let id = sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, backup_id) VALUES ($1, $2) RETURNING id",
    )
    .bind(target)
    .bind(backup_id)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// A restore of `resource_id` to the instant `target` (DESIGN §14); the worker chooses the base
/// backup. Refused here only when the resource does not exist: the restorable window is the
/// worker's to judge when the row runs (it fails `config` naming the window).
pub async fn enqueue_restore_to_time(
    pool: &PgPool,
    resource_id: Uuid,
    target: chrono::DateTime<chrono::Utc>,
) -> Result<Uuid, CommandError> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM resources WHERE id = $1)")
        .bind(resource_id)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(CommandError::ResourceNotFound(resource_id));
    }
    Ok(sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2) RETURNING id",
    )
    .bind(resource_id)
    .bind(target)
    .fetch_one(pool)
    .await?)
}

type FailureRow = (
    String,
    Uuid,
    Uuid,
    Option<String>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// Queue depths per table and status, and the most recent failures.
pub async fn status(pool: &PgPool) -> Result<String, CommandError> {
    use std::fmt::Write as _;
    let depths: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT 'backups', status, count(*) FROM resource_backups GROUP BY status
         UNION ALL
         SELECT 'restores', status, count(*) FROM resource_restores GROUP BY status
         UNION ALL
         SELECT 'verifications', status, count(*) FROM backup_verifications GROUP BY status
         UNION ALL
         SELECT 'copies', status, count(*) FROM backup_copies GROUP BY status
         UNION ALL
         SELECT 'wal streams', CASE WHEN status = 'streaming'
                                         AND (leased_by IS NULL OR lease_expires_at < now())
                                    THEN 'stopped' ELSE status END, count(*)
           FROM wal_streams WHERE slot_dropped_at IS NULL GROUP BY 2
         UNION ALL
         SELECT 'wal gaps (7 days)', 'detected', count(*) FROM wal_gaps
          WHERE detected_at > now() - interval '7 days' HAVING count(*) > 0
         UNION ALL
         SELECT 'propagations',
                CASE WHEN applied_at IS NOT NULL THEN 'applied'
                     WHEN failed_at IS NOT NULL AND last_error LIKE 'superseded by %' THEN 'superseded'
                     WHEN failed_at IS NOT NULL THEN 'dead_lettered'
                     WHEN lease_token IS NOT NULL THEN 'leased'
                     ELSE 'pending' END,
                count(*)
           FROM pending_propagations GROUP BY 2
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let failures: Vec<FailureRow> = sqlx::query_as(
        "(SELECT 'backup', id, resource_id, failure_reason, error_summary, finished_at
                FROM resource_backups WHERE status = 'failed'
               ORDER BY finished_at DESC NULLS LAST LIMIT 10)
             UNION ALL
             (SELECT 'restore', id, resource_id, failure_reason, error_summary, finished_at
                FROM resource_restores WHERE status = 'failed'
               ORDER BY finished_at DESC NULLS LAST LIMIT 10)
             UNION ALL
             (SELECT 'verify', backup_id, resource_id, failure_reason,
                     replace(left(internal_detail, 200), E'\n', ' '), finished_at
                FROM backup_verifications WHERE status = 'failed'
               ORDER BY finished_at DESC NULLS LAST LIMIT 10)
             UNION ALL
             (SELECT 'copy', backup_id, resource_id, failure_reason,
                     replace(left(internal_detail, 200), E'\n', ' '), finished_at
                FROM backup_copies WHERE status = 'failed'
               ORDER BY finished_at DESC NULLS LAST LIMIT 10)
             ORDER BY 6 DESC NULLS LAST LIMIT 10",
    )
    .fetch_all(pool)
    .await?;

    let mut out = String::from("queue depths:\n");
    if depths.is_empty() {
        out.push_str("  (empty)\n");
    }
    for (table, status, n) in depths {
        let _ = writeln!(out, "  {table:<13} {status:<14} {n}");
    }
    let (verified, failed, never): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM backup_verifications
                  WHERE status = 'verified' AND finished_at > now() - interval '1 day'),
                (SELECT count(*) FROM backup_verifications
                  WHERE status = 'failed' AND finished_at > now() - interval '1 day'),
                (SELECT count(*) FROM resource_backups WHERE status = 'succeeded' AND verify_status IS NULL)",
    )
    .fetch_one(pool)
    .await?;
    let _ = writeln!(
        out,
        "verifications (last 24 h): {verified} verified, {failed} failed; {never} succeeded backups never verified"
    );
    let (copied, unprotected): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM backup_copies WHERE status = 'succeeded'),
                (SELECT count(*) FROM resource_backups b
                  WHERE b.status = 'succeeded' AND b.copy_status IS DISTINCT FROM 'succeeded'
                    AND b.finished_at < now() - interval '1 hour'
                    AND EXISTS (SELECT 1 FROM backup_copies))",
    )
    .fetch_one(pool)
    .await?;
    let _ = writeln!(
        out,
        "copies: {copied} held by the copy destination; {unprotected} succeeded backups over an hour old not yet copied"
    );
    out.push_str("recent failures:\n");
    if failures.is_empty() {
        out.push_str("  (none)\n");
    }
    for (what, id, resource, reason, summary, at) in failures {
        let _ = writeln!(
            out,
            "  {} {what:<7} {id} resource={resource} reason={} {}",
            at.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into()),
            reason.as_deref().unwrap_or("-"),
            summary.as_deref().unwrap_or(""),
        );
    }
    Ok(out)
}

/// `backup-worker verify`'s output: the verdict, how long each step took, and the counts.
pub fn format_verification(r: &crate::loops::verifier::Report) -> String {
    use std::fmt::Write as _;
    let d = &r.detail;
    let secs = |k: &str| d[k].as_f64().map(|s| format!("{s:.2} s"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "backup {} ({}, resource {})",
        r.backup_id, r.resource_type, r.resource_id
    );
    let mut timing = secs("seconds").unwrap_or_else(|| "-".into());
    let mut steps: Vec<String> = [
        ("download", "download_seconds"),
        ("restore", "restore_seconds"),
    ]
    .iter()
    .filter_map(|(name, k)| secs(k).map(|s| format!("{name} {s}")))
    .collect();
    // Postgres: the customer's rewind, twice (into the empty scratch database, then over it).
    let rewinds: Vec<String> = d["rewind_seconds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_f64().map(|s| format!("{s:.2} s")))
        .collect();
    if rewinds.len() == 2 {
        steps.push(format!("rewinds {}", rewinds.join(" + ")));
    }
    if !steps.is_empty() {
        let _ = write!(timing, " ({})", steps.join(", "));
    }
    match r.status.as_str() {
        "verified" => {
            let level = d["level"].as_str().unwrap_or("?");
            let how = match level {
                "integrity" => "integrity only: checksum, full decode and structural check (no VERIFY_DATABASE_URL for a test restore)",
                _ => "test restore",
            };
            let _ = writeln!(out, "result: VERIFIED in {timing} — {how}");
        }
        status => {
            let reason = r.failure_reason.as_deref().unwrap_or("?");
            let whose = if d["backup_at_fault"].as_bool() == Some(true) {
                "the backup does not restore"
            } else {
                "the verifier's environment failed, not the backup"
            };
            let again = if status == "pending" {
                "; the verifier retries it"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "result: FAILED ({reason}) in {timing} at step {} — {whose}{again}",
                d["failed_step"].as_str().unwrap_or("?")
            );
            if let Some(why) = &r.internal_detail {
                let _ = writeln!(out, "  {}", why.trim().replace('\n', "\n  "));
            }
        }
    }
    let counts = [
        ("tables", "rows", "rows_total"),
        ("namespaces", "documents", "documents_total"),
        ("databases", "keys", "keys_total"),
    ];
    for (field, unit, total) in counts {
        let Some(map) = d[field].as_object() else {
            continue;
        };
        let _ = writeln!(out, "{unit} per {}:", field.trim_end_matches('s'));
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0).max(5);
        for (name, n) in map {
            let label = if field == "databases" {
                format!("db {name}")
            } else {
                name.clone()
            };
            let n = n.as_u64().map_or_else(|| n.to_string(), |n| n.to_string());
            let _ = writeln!(out, "  {label:<width$}  {n:>12}", width = width + 3);
        }
        let _ = writeln!(
            out,
            "  {:<width$}  {:>12}",
            "total",
            d[total].as_u64().unwrap_or(0),
            width = width + 3
        );
    }
    if let Some(f) = d["functions"].as_u64().filter(|f| *f > 0) {
        let _ = writeln!(out, "function libraries: {f}");
    }
    let _ = writeln!(out, "verification {}", r.verification_id);
    out
}

/// Inserts a team on `tier` and returns its id.
pub async fn add_team(pool: &PgPool, tier: &str) -> Result<Uuid, CommandError> {
    let valid = tier.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && tier
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(CommandError::BadTier(tier.to_owned()));
    }
    Ok(
        sqlx::query_scalar("INSERT INTO teams (plan_tier) VALUES ($1) RETURNING id")
            .bind(tier)
            .fetch_one(pool)
            .await?,
    )
}

/// Registers a resource of `team`; the URL (a secret) is checked for its type's shape, never
/// printed.
pub async fn add_resource(
    pool: &PgPool,
    team: Uuid,
    resource_type: &str,
    url: &crate::secret::Secret,
) -> Result<Uuid, CommandError> {
    let ty = ResourceType::parse(resource_type)
        .ok_or_else(|| CommandError::UnknownType(resource_type.to_owned()))?;
    crate::engines::validate_url(ty, url).map_err(|e| CommandError::BadUrl(e.to_string()))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM teams WHERE id = $1)")
        .bind(team)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(CommandError::TeamNotFound(team));
    }
    Ok(sqlx::query_scalar(
        "INSERT INTO resources (team_id, resource_type, connection_url) VALUES ($1, $2, $3)
         RETURNING id",
    )
    .bind(team)
    .bind(ty.as_str())
    .bind(url.expose())
    .fetch_one(pool)
    .await?)
}

type BackupListRow = (
    Uuid,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    Option<i64>,
    Option<String>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<String>,
    f64,
    Option<f64>,
    Option<String>,
    Option<String>,
);

/// Seconds as a short age: `42s`, `5m`, `3h`, `2d`.
fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn size(bytes: i64) -> String {
    let b = bytes as f64;
    match bytes {
        i64::MIN..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}

/// A resource's backups, newest first: id, status, kind, age, stored size, verification.
pub async fn list_backups(pool: &PgPool, resource_id: Uuid) -> Result<String, CommandError> {
    use std::fmt::Write as _;
    let resource: Option<(String, String, Uuid)> =
        sqlx::query_as("SELECT resource_type, status, team_id FROM resources WHERE id = $1")
            .bind(resource_id)
            .fetch_optional(pool)
            .await?;
    let (ty, status, team) = resource.ok_or(CommandError::ResourceNotFound(resource_id))?;
    let rows: Vec<BackupListRow> = sqlx::query_as(
        "SELECT id, status, CASE WHEN format = 'base' THEN kind || '/base' ELSE kind END,
                created_at, size_bytes, verify_status, verified_at,
                failure_reason,
                extract(epoch FROM now() - created_at)::float8,
                extract(epoch FROM now() - verified_at)::float8,
                (SELECT c.status || coalesce(' (' || c.failure_reason || ')', '')
                   FROM backup_copies c WHERE c.backup_id = resource_backups.id
                  ORDER BY c.created_at DESC LIMIT 1),
                CASE WHEN anomaly IS NOT NULL
                     THEN (SELECT string_agg(k, ',' ORDER BY k) FROM jsonb_object_keys(anomaly) k)
                     WHEN anomaly_accepted_at IS NOT NULL THEN 'accepted' END
           FROM resource_backups WHERE resource_id = $1
          ORDER BY created_at DESC LIMIT 200",
    )
    .bind(resource_id)
    .fetch_all(pool)
    .await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "resource {resource_id} ({ty}, {status}, team {team}): {} backup{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    let pitr = crate::pitr::History::load(pool, resource_id).await?;
    if !pitr.bases.is_empty() || pitr.segment_bytes.is_some() {
        let _ = writeln!(
            out,
            "point-in-time recovery: {} (restore with: backup-worker restore --to-time <RFC 3339> {resource_id})",
            crate::pitr::describe(&pitr.windows())
        );
    }
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "  none yet — enqueue one with: backup-worker backup {resource_id}"
        );
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "{:<36}  {:<9}  {:<9}  {:>5}  {:>10}  {:<20}  {:<10}  ANOMALY",
        "ID", "STATUS", "KIND", "AGE", "SIZE", "VERIFICATION", "COPY"
    );
    let mut flagged = 0;
    for (
        id,
        status,
        kind,
        _,
        size_bytes,
        verify,
        _,
        reason,
        created_secs,
        verified_secs,
        copy,
        anomaly,
    ) in rows
    {
        if anomaly.as_deref().is_some_and(|a| a != "accepted") {
            flagged += 1;
        }
        let status = match (&*status, reason) {
            ("failed", Some(r)) => format!("failed ({r})"),
            ("pending", Some(r)) => format!("pending (retry after {r})"),
            _ => status,
        };
        let verification = match (verify.as_deref(), verified_secs) {
            (Some(v), Some(s)) => format!("{v} {} ago", age(s)),
            (Some(v), None) => v.to_owned(),
            (None, _) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{id}  {status:<9}  {kind:<9}  {:>5}  {:>10}  {verification:<20}  {:<10}  {}",
            age(created_secs),
            size_bytes.map(size).unwrap_or_else(|| "-".into()),
            copy.as_deref().unwrap_or("-"),
            anomaly.as_deref().unwrap_or("-"),
        );
    }
    if flagged > 0 {
        let _ = writeln!(
            out,
            "{flagged} backup{} flagged as an anomaly (content collapsed against the previous \
             backup): retention does not count {} as good backups. Check, then clear with: \
             backup-worker backups --accept <id>",
            if flagged == 1 { "" } else { "s" },
            if flagged == 1 { "it" } else { "them" },
        );
    }
    Ok(out)
}

/// Clears a backup's anomaly flag (DESIGN §15) after an operator checked it: retention counts it
/// as a good backup again and it is not flagged again. Audited `backup.anomaly_accepted` with
/// what was flagged. Returns a line for the terminal.
pub async fn accept_anomaly(pool: &PgPool, backup_id: Uuid) -> Result<String, CommandError> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Uuid, Option<Value>)> = sqlx::query_as(
        "SELECT r.team_id, b.resource_id, b.anomaly FROM resource_backups b
           JOIN resources r ON r.id = b.resource_id
          WHERE b.id = $1 FOR NO KEY UPDATE OF b",
    )
    .bind(backup_id)
    .fetch_optional(&mut *tx)
    .await?;
    let (team, resource, anomaly) = row.ok_or(CommandError::BackupNotFound(backup_id))?;
    let anomaly = anomaly.ok_or(CommandError::NotAnomalous(backup_id))?;
    sqlx::query(
        "UPDATE resource_backups SET anomaly = NULL, anomaly_accepted_at = now() WHERE id = $1",
    )
    .bind(backup_id)
    .execute(&mut *tx)
    .await?;
    let by = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    crate::db::audit(
        &mut *tx,
        "backup.anomaly_accepted",
        Some(team),
        Some(resource),
        Some(backup_id),
        serde_json::json!({ "backup_id": backup_id, "anomaly": anomaly, "accepted_by": by }),
    )
    .await?;
    tx.commit().await?;
    Ok(format!(
        "backup {backup_id}: anomaly accepted; retention counts it as a good backup again"
    ))
}
