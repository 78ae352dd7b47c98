//! Point-in-time recovery planning (DESIGN §14), shared by the restores loop, the verifier and the
//! command line: which base backup and which stored WAL reach an instant, the restorable windows
//! of a resource, and the store-backed [`WalFetch`] a private replay server reads from.
//!
//! A base backup's chain is the run of consecutive stored segments from the segment its
//! `backup_label` starts in. It reaches up to the time the stream last confirmed the stored WAL
//! complete (`wal_streams.last_stored_at`) when the run goes on to the newest segment; a run
//! broken by a gap reaches only the gap's `from_time` (the last confirmation before the WAL was
//! lost). A base backup covers from its finish (its consistency point) to its chain's reach.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::FailureReason;
use crate::engines::postgres::replay::WalFetch;
use crate::engines::postgres::wal::segment_name;
use crate::engines::{fail, Failure};
use crate::pipeline::StreamCheck;
use crate::storage::ObjectStore;

/// PITR resources (DESIGN §14: a tier with pitr_rpo_seconds > 0 that keeps backups,
/// Postgres/vector, active, with a replication_url) and their RPO, over the plan arrays bound by
/// [`bind_plans`]: $1 tiers, $2 their pitr seconds, $3 their retention, $4/$5 the default's.
pub const ELIGIBLE_CTE: &str = "eligible AS (
    SELECT r.id AS resource_id, r.team_id, r.replication_url, r.connection_url,
           COALESCE(p.pitr, $4) AS pitr_rpo_seconds
      FROM resources r
      JOIN teams t ON t.id = r.team_id
      LEFT JOIN unnest($1::text[], $2::int[], $3::int[]) AS p(tier, pitr, retention)
             ON p.tier = t.plan_tier
     WHERE r.status = 'active' AND r.resource_type IN ('postgres', 'vector')
       AND r.replication_url IS NOT NULL
       AND COALESCE(p.pitr, $4) > 0 AND COALESCE(p.retention, $5) > 0
)";

/// Binds $1–$5 of [`ELIGIBLE_CTE`].
pub fn bind_plans<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    plans: &crate::plans::Plans,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let a = plans.sql_arrays();
    q.bind(a.tiers)
        .bind(a.pitr_rpo_seconds)
        .bind(a.retention_days)
        .bind(a.default.pitr_rpo_seconds as i32)
        .bind(a.default.backup_retention_days as i32)
}

/// Enqueues a base backup (DESIGN §14) for each PITR resource that has none created within the
/// last day (less 10 minutes, as the dumps' window), or none created since its stream asked for
/// one (a new slot, a gap); never beside a queued or running one. Returns the rows enqueued.
pub async fn enqueue_base_backups(
    tx: &mut sqlx::PgConnection,
    plans: &crate::plans::Plans,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "WITH {ELIGIBLE_CTE},
         due AS (
            SELECT e.resource_id FROM eligible e
              -- no stream row yet (a first `--once` run: the wal pass comes next and creates the
              -- slot before the backups pass takes this row): the daily rule alone
              LEFT JOIN wal_streams w ON w.resource_id = e.resource_id
             WHERE NOT EXISTS (SELECT 1 FROM resource_backups b
                                WHERE b.resource_id = e.resource_id AND b.format = 'base'
                                  AND b.created_at > now() - interval '1430 minutes'
                                  AND b.created_at >= coalesce(w.base_wanted_at, '-infinity'))
               AND NOT EXISTS (SELECT 1 FROM resource_backups b
                                WHERE b.resource_id = e.resource_id AND b.format = 'base'
                                  AND b.status IN ('pending', 'running'))
         )
         INSERT INTO resource_backups (resource_id, kind, status, format, run_after, created_at)
         SELECT resource_id, 'scheduled', 'pending', 'base', now(), now() FROM due
         ON CONFLICT (resource_id, format) WHERE status = 'pending' AND kind = 'scheduled' DO NOTHING"
    );
    Ok(bind_plans(sqlx::query(&sql), plans)
        .execute(tx)
        .await?
        .rows_affected())
}

/// A succeeded base backup of the resource.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Base {
    pub id: Uuid,
    pub finished_at: DateTime<Utc>,
    pub start_lsn: i64,
    pub timeline: i32,
    pub pg_major: i32,
    pub object_key: String,
    pub sha256: String,
    pub size_bytes: Option<i64>,
    pub key_id: Option<Uuid>,
}

/// A stored WAL file (a segment, or a history file when `segno` is null).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredWal {
    pub timeline: i32,
    pub segno: Option<i64>,
    pub object_key: String,
    pub sha256: String,
    pub size_bytes: i64,
    pub partial: bool,
    pub key_id: Option<Uuid>,
    pub stored_at: DateTime<Utc>,
}

/// A span of time a restore can reach through one base backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub base_id: Uuid,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// The last segment number of the base's chain.
    pub end_segno: i64,
}

/// Everything the planning reads of a resource.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub bases: Vec<Base>,
    pub wal: Vec<StoredWal>,
    pub segment_bytes: Option<i64>,
    pub last_stored_at: Option<DateTime<Utc>>,
    /// Gaps: (the last stored segment before it, when the stored WAL was last confirmed).
    pub gaps: Vec<(Option<i64>, DateTime<Utc>)>,
}

pub fn text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl History {
    pub async fn load(pool: &PgPool, resource_id: Uuid) -> Result<Self, sqlx::Error> {
        let bases: Vec<Base> = sqlx::query_as(
            "SELECT id, finished_at, (start_lsn - '0/0'::pg_lsn)::bigint AS start_lsn, timeline,
                    pg_major, object_key, sha256, size_bytes, key_id
               FROM resource_backups
              WHERE resource_id = $1 AND format = 'base' AND status = 'succeeded'
                AND verify_status IS DISTINCT FROM 'failed'
                AND start_lsn IS NOT NULL AND object_key IS NOT NULL AND sha256 IS NOT NULL
              ORDER BY finished_at DESC",
        )
        .bind(resource_id)
        .fetch_all(pool)
        .await?;
        let wal: Vec<StoredWal> = sqlx::query_as(
            "SELECT timeline, segno, object_key, sha256, size_bytes, partial, key_id, stored_at
               FROM wal_segments WHERE resource_id = $1 ORDER BY segno NULLS FIRST, timeline",
        )
        .bind(resource_id)
        .fetch_all(pool)
        .await?;
        let stream: Option<(Option<i64>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT segment_bytes, last_stored_at FROM wal_streams WHERE resource_id = $1",
        )
        .bind(resource_id)
        .fetch_optional(pool)
        .await?;
        type GapRow = (Option<i64>, Option<DateTime<Utc>>, DateTime<Utc>);
        let gaps: Vec<GapRow> = sqlx::query_as(
            "SELECT (from_lsn - '0/0'::pg_lsn)::bigint, from_time, detected_at
               FROM wal_gaps WHERE resource_id = $1",
        )
        .bind(resource_id)
        .fetch_all(pool)
        .await?;
        let (segment_bytes, last_stored_at) = stream.unwrap_or((None, None));
        let gaps = gaps
            .into_iter()
            .map(|(lsn, from, detected)| {
                (
                    lsn.zip(segment_bytes).map(|(l, s)| l / s.max(1)),
                    from.unwrap_or(detected),
                )
            })
            .collect();
        Ok(History {
            bases,
            wal,
            segment_bytes,
            last_stored_at,
            gaps,
        })
    }

    /// The restorable window of each base backup, newest base first.
    pub fn windows(&self) -> Vec<Window> {
        let (Some(seg), Some(current)) = (self.segment_bytes, self.last_stored_at) else {
            return Vec::new();
        };
        let seg = seg.max(1);
        let stored: std::collections::BTreeSet<i64> =
            self.wal.iter().filter_map(|w| w.segno).collect();
        let newest = stored.iter().next_back().copied();
        let mut out = Vec::new();
        for b in &self.bases {
            let start = b.start_lsn / seg;
            if !stored.contains(&start) {
                continue;
            }
            let mut end = start;
            while stored.contains(&(end + 1)) {
                end += 1;
            }
            let until = if Some(end) == newest {
                // A gap after which no new segment arrived yet still ends the chain.
                match self
                    .gaps
                    .iter()
                    .filter(|(at, _)| at.is_none_or(|s| s >= end))
                    .map(|(_, t)| *t)
                    .min()
                {
                    Some(gap) if gap >= b.finished_at => gap.min(current),
                    Some(_) => continue,
                    None => current,
                }
            } else {
                // Broken: the gap that ended the run, else the last segment's store time.
                let last = self
                    .wal
                    .iter()
                    .filter(|w| w.segno == Some(end))
                    .map(|w| w.stored_at)
                    .max();
                let gap = self
                    .gaps
                    .iter()
                    .filter(|(at, _)| at.is_none_or(|s| s >= end))
                    .map(|(_, t)| *t)
                    .min();
                match (gap, last) {
                    (Some(g), _) => g,
                    (None, Some(l)) => l,
                    (None, None) => continue,
                }
            };
            if until >= b.finished_at {
                out.push(Window {
                    base_id: b.id,
                    from: b.finished_at,
                    until,
                    end_segno: end,
                });
            }
        }
        out
    }

    /// The newest base backup whose chain reaches `target`, or `config` naming what is restorable.
    pub fn plan(&self, target: DateTime<Utc>) -> Result<(Base, Window), Failure> {
        let windows = self.windows();
        for w in &windows {
            if w.from <= target && target <= w.until {
                if let Some(b) = self.bases.iter().find(|b| b.id == w.base_id) {
                    return Ok((b.clone(), w.clone()));
                }
            }
        }
        Err(fail(
            FailureReason::Config,
            format!(
                "no restorable point at {}: {}",
                text(target),
                describe(&windows)
            ),
        ))
    }
}

/// "restorable: A – B, C – D" (merged, oldest first), or why nothing is.
pub fn describe(windows: &[Window]) -> String {
    if windows.is_empty() {
        return "nothing is restorable to a point in time yet (no base backup with stored WAL)"
            .into();
    }
    let mut spans: Vec<(DateTime<Utc>, DateTime<Utc>)> =
        windows.iter().map(|w| (w.from, w.until)).collect();
    spans.sort();
    let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let parts: Vec<String> = merged
        .iter()
        .map(|(a, b)| format!("{} – {}", text(*a), text(*b)))
        .collect();
    format!("restorable: {}", parts.join(", "))
}

/// Accepts any raw stream (a WAL file has no framing of its own to check); counts it.
#[derive(Default)]
struct AnyBytes(u64);

impl StreamCheck for AnyBytes {
    fn update(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
    fn finish(self: Box<Self>) -> Result<String, String> {
        Ok(format!("{} bytes", self.0))
    }
}

/// Serves a replay from the store: each file downloaded, sha256 checked against its row,
/// decrypted and decompressed, only when Postgres asks for it.
pub struct StoreWal {
    store: Arc<dyn ObjectStore>,
    files: HashMap<String, StoredWal>,
    identities: Mutex<BTreeMap<Uuid, age::x25519::Identity>>,
    pool: PgPool,
    master: Option<Arc<crate::crypto::MasterKey>>,
    /// The highest segment number served: a replay that ends early is caught.
    pub served_max: AtomicU64,
}

impl StoreWal {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        history: &History,
        pool: PgPool,
        master: Option<Arc<crate::crypto::MasterKey>>,
    ) -> Self {
        let seg = history.segment_bytes.unwrap_or(16 * 1024 * 1024) as u64;
        let files = history
            .wal
            .iter()
            .map(|w| {
                let name = match w.segno {
                    Some(s) => segment_name(w.timeline as u32, s as u64, seg),
                    None => format!("{:08X}.history", w.timeline),
                };
                (name, w.clone())
            })
            .collect();
        Self {
            store,
            files,
            identities: Mutex::new(BTreeMap::new()),
            pool,
            master,
            served_max: AtomicU64::new(0),
        }
    }

    async fn identity(
        &self,
        key_id: Option<Uuid>,
    ) -> Result<Option<age::x25519::Identity>, Failure> {
        let Some(id) = key_id else { return Ok(None) };
        if let Some(i) = self
            .identities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(i.clone()));
        }
        let identity =
            crate::restore::backup_identity(&self.pool, self.master.as_deref(), Some(id)).await?;
        if let Some(i) = &identity {
            self.identities
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, i.clone());
        }
        Ok(identity)
    }
}

#[async_trait]
impl WalFetch for StoreWal {
    async fn fetch(&self, name: &str, into: &Path) -> Result<bool, Failure> {
        let Some(w) = self.files.get(name) else {
            return Ok(false);
        };
        let identity = self.identity(w.key_id).await?;
        let dir = into
            .parent()
            .ok_or_else(|| fail(FailureReason::Dump, "the spool has no directory"))?;
        let fetch_dir = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(dir)
            .map_err(|e| {
                fail(
                    FailureReason::Dump,
                    format!("creating a fetch directory: {e}"),
                )
            })?;
        let file = crate::restore::download_verified(
            self.store.as_ref(),
            &w.object_key,
            &w.sha256,
            u64::try_from(w.size_bytes).ok(),
            Box::new(AnyBytes::default()),
            fetch_dir.path(),
            identity,
        )
        .await?;
        let into = into.to_path_buf();
        let written = tokio::task::spawn_blocking(move || -> Result<(), Failure> {
            let mut raw = file.open_blocking()?;
            let mut out = std::fs::File::create(&into).map_err(|e| {
                fail(
                    FailureReason::Dump,
                    format!("writing {}: {e}", into.display()),
                )
            })?;
            std::io::copy(&mut raw, &mut out)
                .map_err(|e| fail(FailureReason::Integrity, format!("decoding WAL: {e}")))?;
            Ok(())
        })
        .await
        .map_err(|e| fail(FailureReason::Dump, format!("decoding WAL: {e}")))?;
        written?;
        if let Some(s) = w.segno {
            self.served_max.fetch_max(s as u64, Ordering::Relaxed);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 4, 10, 0, 0).unwrap() + chrono::Duration::minutes(min)
    }

    const SEG: i64 = 16 * 1024 * 1024;

    fn base(id: u128, finished: i64, segno: i64) -> Base {
        Base {
            id: Uuid::from_u128(id),
            finished_at: t(finished),
            start_lsn: segno * SEG + 40,
            timeline: 1,
            pg_major: 15,
            object_key: format!("b{id}"),
            sha256: String::new(),
            size_bytes: None,
            key_id: None,
        }
    }

    fn seg(segno: i64, stored: i64) -> StoredWal {
        StoredWal {
            timeline: 1,
            segno: Some(segno),
            object_key: format!("w{segno}"),
            sha256: String::new(),
            size_bytes: 1,
            partial: false,
            key_id: None,
            stored_at: t(stored),
        }
    }

    #[test]
    fn the_newest_base_whose_chain_reaches_the_target_is_chosen() {
        let h = History {
            bases: vec![base(2, 30, 5), base(1, 0, 2)],
            wal: (2..=8).map(|s| seg(s, s * 10)).collect(),
            segment_bytes: Some(SEG),
            last_stored_at: Some(t(90)),
            gaps: vec![],
        };
        assert_eq!(h.plan(t(45)).unwrap().0.id, Uuid::from_u128(2));
        assert_eq!(h.plan(t(10)).unwrap().0.id, Uuid::from_u128(1));
        let err = h.plan(t(91)).unwrap_err();
        assert_eq!(err.reason, FailureReason::Config);
        assert!(
            err.detail
                .contains("restorable: 2026-12-04T10:00:00Z – 2026-12-04T11:30:00Z"),
            "{}",
            err.detail
        );
        assert!(
            h.plan(t(-1)).is_err(),
            "before the first base backup finished"
        );
    }

    #[test]
    fn a_gap_ends_the_chain_and_a_later_base_starts_a_new_one() {
        // Segments 2–4, the slot invalidated (segments 5–9 lost), the stream resumed at 10.
        let mut wal: Vec<StoredWal> = (2..=4).map(|s| seg(s, s * 10)).collect();
        wal.extend((10..=12).map(|s| seg(s, 60 + s)));
        let h = History {
            bases: vec![base(2, 70, 10), base(1, 0, 2)],
            wal,
            segment_bytes: Some(SEG),
            last_stored_at: Some(t(80)),
            gaps: vec![(Some(4), t(45))],
        };
        let w = h.windows();
        assert_eq!(w.len(), 2);
        assert_eq!((w[1].from, w[1].until), (t(0), t(45)));
        assert_eq!((w[0].from, w[0].until), (t(70), t(80)));
        assert!(h.plan(t(50)).is_err(), "inside the gap");
        assert!(
            h.plan(t(69)).is_err(),
            "after the gap, before the new base backup"
        );
        assert_eq!(h.plan(t(40)).unwrap().0.id, Uuid::from_u128(1));
        assert_eq!(h.plan(t(75)).unwrap().0.id, Uuid::from_u128(2));
        assert!(describe(&w).contains(", "));
    }

    #[test]
    fn a_gap_with_nothing_stored_after_it_yet_still_ends_the_chain() {
        let h = History {
            bases: vec![base(1, 0, 2)],
            wal: (2..=4).map(|s| seg(s, s * 10)).collect(),
            segment_bytes: Some(SEG),
            last_stored_at: Some(t(45)),
            gaps: vec![(Some(4), t(41))],
        };
        assert_eq!(h.windows()[0].until, t(41));
    }
}
