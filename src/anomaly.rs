//! Anomalies (DESIGN §15): a succeeded backup whose content collapsed against its resource's
//! previous one — a mass `DELETE`, ransomware, a dump of the wrong database — is flagged before a
//! customer notices. Two checks, from what the worker already measures:
//! - `size`, when the backup succeeds: its raw size fell below half of the previous succeeded
//!   backup's (only when that one held at least [`SIZE_FLOOR`] bytes: a near-empty resource
//!   shrinking is no signal);
//! - `content`, when the verifier has counted it: a table / namespace / logical database that held
//!   at least [`CONTENT_FLOOR`] rows / documents / keys in the resource's previous counted backup
//!   lost more than half of them, or vanished.
//!
//! A flagged backup writes `resource_backups.anomaly`, audit `backup.anomaly` and
//! `backup_worker_backup_anomalies_total{resource_type, kind}`; retention counts it for nothing
//! (like a failed verification) until `backup-worker backups --accept <id>` clears it.

use serde_json::{json, Map, Value};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::db::audit;

/// Below this previous raw size a shrink is not an anomaly (an empty Postgres database dumps to
/// ~870 bytes, a small Redis to ~200: halving a few kilobytes says nothing).
pub const SIZE_FLOOR: i64 = 1024 * 1024;
/// Tables (namespaces, databases) smaller than this in the previous backup are never flagged.
pub const CONTENT_FLOOR: i64 = 1000;

/// The `size` finding: `to` below half of `from`, when `from` is at least [`SIZE_FLOOR`].
pub fn size(previous: Uuid, from: i64, to: i64) -> Option<Value> {
    (from >= SIZE_FLOOR && to.saturating_mul(2) < from).then(
        || json!({ "previous_backup_id": previous, "from_raw_bytes": from, "to_raw_bytes": to }),
    )
}

/// The per-name counts a verification recorded (tables, namespaces or databases), by the
/// census's key in `detail`.
fn counts(detail: &Value) -> Option<(&'static str, &Map<String, Value>)> {
    ["tables", "namespaces", "databases"]
        .into_iter()
        .find_map(|k| detail.get(k).and_then(Value::as_object).map(|m| (k, m)))
}

/// The `content` finding between two verifications' details: every name that held at least
/// [`CONTENT_FLOOR`] and lost more than half, or vanished. None when nothing did, or when the two
/// did not count the same kind of thing (a verification at integrity level counts nothing).
pub fn content(previous: Uuid, before: &Value, after: &Value) -> Option<Value> {
    let (kind, old) = counts(before)?;
    let (kind_after, new) = counts(after)?;
    if kind != kind_after {
        return None;
    }
    let mut changes = Vec::new();
    for (name, from) in old {
        let Some(from) = from.as_i64().filter(|n| *n >= CONTENT_FLOOR) else {
            continue;
        };
        match new.get(name).and_then(Value::as_i64) {
            None => {
                changes.push(json!({ "name": name, "from": from, "to": 0, "change": "vanished" }))
            }
            Some(to) if to.saturating_mul(2) < from => {
                changes.push(json!({ "name": name, "from": from, "to": to, "change": "shrank" }))
            }
            Some(_) => {}
        }
    }
    (!changes.is_empty())
        .then(|| json!({ "previous_backup_id": previous, "counted": kind, "changes": changes }))
}

/// Flags `backup` with a finding of `kind` (`size` or `content`), in `tx`: merged into its
/// `anomaly`, audited `backup.anomaly`. Nothing when the backup's anomaly was accepted or it is no
/// longer succeeded. True when flagged (the caller counts the metric after commit).
pub async fn flag(
    tx: &mut Transaction<'_, Postgres>,
    backup: Uuid,
    kind: &str,
    finding: &Value,
) -> Result<bool, sqlx::Error> {
    let row: Option<(Uuid, Uuid, String)> = sqlx::query_as(
        "UPDATE resource_backups b
            SET anomaly = coalesce(b.anomaly, '{}'::jsonb) || jsonb_build_object($2::text, $3::jsonb)
           FROM resources r
          WHERE b.id = $1 AND r.id = b.resource_id AND b.status = 'succeeded'
            AND b.anomaly_accepted_at IS NULL
         RETURNING r.team_id, r.id, r.resource_type",
    )
    .bind(backup)
    .bind(kind)
    .bind(finding)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((team, resource, resource_type)) = row else {
        return Ok(false);
    };
    let mut detail = json!({ "resource_type": resource_type, "kind": kind, "backup_id": backup });
    if let (Some(d), Some(f)) = (detail.as_object_mut(), finding.as_object()) {
        d.extend(f.clone());
    }
    audit(
        &mut **tx,
        "backup.anomaly",
        Some(team),
        Some(resource),
        Some(backup),
        detail,
    )
    .await?;
    tracing::warn!(backup_id = %backup, resource_id = %resource, kind, finding = %finding,
        "backup flagged as an anomaly");
    Ok(true)
}

/// The size check for `backup` (just succeeded, in `tx`): against the resource's previous
/// succeeded backup. True when flagged.
pub async fn check_size(
    tx: &mut Transaction<'_, Postgres>,
    backup: Uuid,
) -> Result<bool, sqlx::Error> {
    let previous: Option<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT p.id, p.raw_bytes, b.raw_bytes
           FROM resource_backups b
           JOIN LATERAL (
                 SELECT p.id, p.raw_bytes FROM resource_backups p
                  WHERE p.resource_id = b.resource_id AND p.id <> b.id
                    AND p.status IN ('succeeded', 'expired') AND p.raw_bytes IS NOT NULL
                    AND p.finished_at <= b.finished_at
                  ORDER BY p.finished_at DESC LIMIT 1) p ON true
          WHERE b.id = $1 AND b.raw_bytes IS NOT NULL",
    )
    .bind(backup)
    .fetch_optional(&mut **tx)
    .await?;
    match previous.and_then(|(p, from, to)| size(p, from, to)) {
        Some(finding) => flag(tx, backup, "size", &finding).await,
        None => Ok(false),
    }
}

/// The content check for `backup`, just verified with `detail` (in `tx`): against the counts of
/// the resource's newest earlier backup with a passing verification. True when flagged.
pub async fn check_content(
    tx: &mut Transaction<'_, Postgres>,
    backup: Uuid,
    detail: &Value,
) -> Result<bool, sqlx::Error> {
    if counts(detail).is_none() {
        return Ok(false);
    }
    let previous: Option<(Uuid, Value)> = sqlx::query_as(
        "SELECT p.id, v.detail
           FROM resource_backups b
           JOIN resource_backups p ON p.resource_id = b.resource_id AND p.id <> b.id
                                  AND p.finished_at <= b.finished_at
           JOIN backup_verifications v ON v.backup_id = p.id AND v.status = 'verified'
          WHERE b.id = $1
          ORDER BY p.finished_at DESC, v.started_at DESC LIMIT 1",
    )
    .bind(backup)
    .fetch_optional(&mut **tx)
    .await?;
    match previous.and_then(|(p, before)| content(p, &before, detail)) {
        Some(finding) => flag(tx, backup, "content", &finding).await,
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_needs_a_real_drop_from_a_real_size() {
        let p = Uuid::nil();
        assert!(size(p, 10 * SIZE_FLOOR, 4 * SIZE_FLOOR).is_some());
        assert!(
            size(p, 10 * SIZE_FLOOR, 5 * SIZE_FLOOR).is_none(),
            "exactly half is not below half"
        );
        assert!(size(p, 10 * SIZE_FLOOR, 20 * SIZE_FLOOR).is_none());
        // An empty resource or a tiny one: no alarm, whatever the ratio.
        assert!(size(p, 870, 870).is_none());
        assert!(size(p, SIZE_FLOOR - 1, 10).is_none());
    }

    #[test]
    fn content_flags_big_tables_that_shrank_or_vanished() {
        let p = Uuid::nil();
        let before = json!({ "tables": { "public.orders": 5000, "public.users": 1200, "public.tiny": 999, "public.flags": 3 } });
        let after =
            json!({ "tables": { "public.orders": 2400, "public.users": 700, "public.flags": 0 } });
        let f = content(p, &before, &after).unwrap();
        let changes = f["changes"].as_array().unwrap();
        assert_eq!(changes.len(), 1, "{f}");
        assert_eq!(changes[0]["name"], "public.orders");
        assert_eq!(changes[0]["change"], "shrank");
        assert_eq!(
            (changes[0]["from"].as_i64(), changes[0]["to"].as_i64()),
            (Some(5000), Some(2400))
        );
        let vanished = json!({ "tables": { "public.users": 1200 } });
        let f = content(p, &before, &vanished).unwrap();
        assert_eq!(f["changes"][0]["change"], "vanished");
        assert_eq!(f["counted"], "tables");
        // Small tables, an empty resource, growth, another census: nothing.
        assert!(content(
            p,
            &json!({ "tables": { "a": 999 } }),
            &json!({ "tables": {} })
        )
        .is_none());
        assert!(content(p, &json!({ "tables": {} }), &json!({ "tables": {} })).is_none());
        assert!(content(p, &before, &before).is_none());
        assert!(content(p, &before, &json!({ "level": "integrity" })).is_none());
        assert!(content(
            p,
            &json!({ "databases": { "0": 5000 } }),
            &json!({ "tables": {} })
        )
        .is_none());
        let keys = content(
            p,
            &json!({ "databases": { "0": 5000, "3": 10 } }),
            &json!({ "databases": { "3": 10 } }),
        );
        assert_eq!(keys.unwrap()["changes"][0]["name"], "0");
    }
}
