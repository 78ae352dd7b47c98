//! WAL streams (DESIGN §14), the seventh loop: one `pg_receivewal` per PITR resource, held by one
//! replica under a lease on its `wal_streams` row, every completed segment (and the growing
//! partial one every `pitr_rpo_seconds`, and timeline history files) stored through the §5
//! pipeline with a `wal_segments` row.
//!
//! A pass makes sure every PITR resource has its row, reaps finished streams, claims what this
//! replica has room for (`WAL_STREAMS_PER_REPLICA`) and refreshes the gauges. Each claimed stream
//! runs in its own task until shutdown or a lost lease; with `--once` it streams to the server's
//! position at its start, stores everything and releases the row.
//!
//! Takeover: the job directory is private, so a new holder seeds it with an empty file named
//! after the newest stored complete segment — `pg_receivewal` then asks the slot for the next
//! one, which the permanent slot still holds. WAL the server already dropped is a gap.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Loop, LoopError, LoopName, PassContext};
use crate::deps::Deps;
use crate::domain::FailureReason;
use crate::engines::postgres::wal::{
    self as walfmt, classify_stream, segment_name, StreamFailure, WalFile, WrittenCheck,
};
use crate::gzip::Deflate;
use crate::pipeline::{gzip_to_upload, StreamCheck};
use crate::secret::Secret;
use crate::storage::Metadata;

/// How often a stream looks at its directory.
const TICK: Duration = Duration::from_millis(500);
/// Restart backoff of a stream whose tool exited (1 s … capped).
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// How often the fleet-wide gauges and the WAL retention run per replica.
const GAUGES_EVERY: Duration = Duration::from_secs(15);
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// How long a daemon pass lasts: new streams are claimed (and a lapsed holder's taken over) at
/// most this long after they become claimable.
const PASS_HOLD: Duration = Duration::from_secs(5);

/// A claimed stream.
#[derive(Debug, Clone)]
struct Claimed {
    resource_id: Uuid,
    team_id: Uuid,
    slot: String,
    replication_url: Secret,
    connection_url: Secret,
    rpo: Duration,
}

/// How one stream's session ended.
enum Ended {
    /// `--once`: streamed to the target position and stored it all.
    Done,
    Cancelled,
    LeaseLost,
    Gap(String),
    Refused(String),
    Transient(String),
}

pub struct Wal {
    deps: Deps,
    once: bool,
    streams: Mutex<JoinSet<()>>,
    /// The streams this replica holds, each with its own stop.
    held: Arc<Mutex<HashMap<Uuid, CancellationToken>>>,
    /// Cancelled when the loop's pass sees shutdown: streams store what they have and release.
    stop: CancellationToken,
    last_gauges: Mutex<Option<Instant>>,
    last_retention: Mutex<Option<Instant>>,
}

impl Wal {
    pub fn new(deps: Deps, once: bool) -> Arc<Self> {
        Arc::new(Self {
            deps,
            once,
            streams: Mutex::new(JoinSet::new()),
            held: Arc::default(),
            stop: CancellationToken::new(),
            last_gauges: Mutex::new(None),
            last_retention: Mutex::new(None),
        })
    }

    fn pool(&self) -> &PgPool {
        &self.deps.pool
    }

    /// Streams held by this replica now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn plan_binds<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        crate::pitr::bind_plans(q, &self.deps.plans)
    }

    /// Gives every PITR resource its row; a row whose resource left PITR is stopped (its slot is
    /// dropped by its last holder's replica when it can reach the server, see the runbook).
    pub async fn ensure_rows(&self) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "WITH {} INSERT INTO wal_streams (resource_id, slot_name)
             SELECT e.resource_id, 'backup_worker_' || replace(e.resource_id::text, '-', '')
               FROM eligible e
             ON CONFLICT (resource_id) DO NOTHING",
            crate::pitr::ELIGIBLE_CTE
        );
        let added = self
            .plan_binds(sqlx::query(&sql))
            .execute(self.pool())
            .await?;
        Ok(added.rows_affected())
    }

    /// Claims up to `n` streams nobody holds (or whose holder's lease lapsed).
    async fn claim(&self, n: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH {},
             picked AS (
                SELECT w.resource_id FROM wal_streams w
                  JOIN eligible e ON e.resource_id = w.resource_id
                 WHERE (w.leased_by IS NULL OR w.lease_expires_at < now()) AND w.run_after <= now()
                 ORDER BY w.run_after
                 LIMIT $6
                 FOR UPDATE OF w SKIP LOCKED
             )
             UPDATE wal_streams w
                SET leased_by = $7, lease_expires_at = now() + make_interval(secs => $8),
                    status = 'streaming', attempts = w.attempts + 1, updated_at = now()
               FROM picked p, eligible e
              WHERE w.resource_id = p.resource_id AND e.resource_id = p.resource_id
             RETURNING w.resource_id, e.team_id, w.slot_name, e.replication_url, e.connection_url,
                       e.pitr_rpo_seconds",
            crate::pitr::ELIGIBLE_CTE
        );
        let rows = self
            .plan_binds(sqlx::query(&sql))
            .bind(n as i64)
            .bind(&self.deps.config.worker_id)
            .bind(self.deps.config.lease.as_secs_f64())
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|r| {
                use sqlx::Row;
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                ))
            })
            .collect::<Result<Vec<(Uuid, Uuid, String, String, String, i32)>, sqlx::Error>>()?;
        Ok(rows
            .into_iter()
            .map(|(resource_id, team_id, slot, repl, conn, rpo)| Claimed {
                resource_id,
                team_id,
                // The row names the slot the worker made; the name is the contract's either way.
                slot: if slot.is_empty() {
                    walfmt::slot_name(resource_id)
                } else {
                    slot
                },
                replication_url: Secret::new(repl),
                connection_url: Secret::new(conn),
                rpo: Duration::from_secs(rpo.max(1) as u64),
            })
            .collect())
    }

    /// Fleet-wide gauges: streams by state, PITR resources past their RPO (+ 60 s).
    pub async fn refresh_gauges(&self) -> Result<(), sqlx::Error> {
        let sql = format!(
            "WITH {} SELECT CASE WHEN w.status = 'streaming'
                                  AND (w.leased_by IS NULL OR w.lease_expires_at < now())
                             THEN 'stopped' ELSE w.status END, count(*)
               FROM wal_streams w JOIN eligible e ON e.resource_id = w.resource_id GROUP BY 1",
            crate::pitr::ELIGIBLE_CTE
        );
        let states: Vec<(String, i64)> = self
            .plan_binds(sqlx::query(&sql))
            .fetch_all(self.pool())
            .await?
            .iter()
            .filter_map(|r| {
                Some((
                    sqlx::Row::try_get(r, 0).ok()?,
                    sqlx::Row::try_get(r, 1).ok()?,
                ))
            })
            .collect();
        for state in crate::metrics::WAL_STREAM_STATES {
            let n = states
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            self.deps
                .metrics
                .wal_streams
                .with_label_values(&[state])
                .set(n);
        }
        let sql = format!(
            "WITH {} SELECT count(*) FROM eligible e
               LEFT JOIN wal_streams w ON w.resource_id = e.resource_id
              WHERE COALESCE(w.last_stored_at, w.created_at, now())
                    < now() - make_interval(secs => e.pitr_rpo_seconds + 60)",
            crate::pitr::ELIGIBLE_CTE
        );
        let breached: i64 = self
            .plan_binds(sqlx::query(&sql))
            .fetch_one(self.pool())
            .await
            .and_then(|r| sqlx::Row::try_get(&r, 0))?;
        self.deps.metrics.pitr_rpo_breached.set(breached);
        Ok(())
    }

    fn due(&self, at: &Mutex<Option<Instant>>, every: Duration) -> bool {
        let mut last = at.lock().unwrap_or_else(|p| p.into_inner());
        if self.once || last.is_none_or(|t| t.elapsed() >= every) {
            *last = Some(Instant::now());
            return true;
        }
        false
    }

    /// WAL older than the oldest retained base backup's start is deleted (DESIGN §14): its rows
    /// go, and its objects through the pending deletions the retention loop drains.
    pub async fn expire_wal(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "WITH oldest AS (
                SELECT b.resource_id, min(b.start_lsn) AS start_lsn
                  FROM resource_backups b
                 WHERE b.format = 'base' AND b.status = 'succeeded' AND b.start_lsn IS NOT NULL
                 GROUP BY b.resource_id
             ),
             old AS (
                DELETE FROM wal_segments s
                 USING oldest o, wal_streams w
                 WHERE s.resource_id = o.resource_id AND w.resource_id = o.resource_id
                   AND w.segment_bytes IS NOT NULL AND s.segno IS NOT NULL
                   AND s.segno < ((o.start_lsn - '0/0'::pg_lsn) / w.segment_bytes)::bigint
                RETURNING s.object_key
             )
             INSERT INTO pending_object_deletions (object_key, reason)
             SELECT object_key, 'wal retention' FROM old
             ON CONFLICT (object_key) DO NOTHING",
        )
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Held streams whose resource left PITR (its plan, status, type or replication_url) stop
    /// and release their rows; [`Self::drop_retired_slots`] then drops their slots.
    async fn stop_ineligible(&self) -> Result<(), sqlx::Error> {
        let held: Vec<Uuid> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "WITH {} SELECT id FROM unnest($6::uuid[]) AS h(id)
              WHERE id NOT IN (SELECT resource_id FROM eligible)",
            crate::pitr::ELIGIBLE_CTE
        );
        let gone: Vec<Uuid> = self
            .plan_binds(sqlx::query(&sql))
            .bind(&held)
            .fetch_all(self.pool())
            .await?
            .iter()
            .filter_map(|r| sqlx::Row::try_get(r, 0).ok())
            .collect();
        let map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for id in gone {
            if let Some(stop) = map.get(&id) {
                tracing::info!(resource_id = %id, "the resource left PITR: stopping its WAL stream");
                stop.cancel();
            }
        }
        Ok(())
    }

    /// The slot of a resource that left PITR is dropped (a permanent slot nobody reads makes the
    /// tenant's server keep its WAL until its disk fills). Its stored WAL stays until retention.
    pub async fn drop_retired_slots(&self) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "WITH {} SELECT w.resource_id, w.slot_name, r.replication_url
               FROM wal_streams w JOIN resources r ON r.id = w.resource_id
              WHERE w.slot_dropped_at IS NULL
                AND (w.leased_by IS NULL OR w.lease_expires_at < now())
                AND w.resource_id NOT IN (SELECT resource_id FROM eligible)
              LIMIT 50",
            crate::pitr::ELIGIBLE_CTE
        );
        let rows = self
            .plan_binds(sqlx::query(&sql))
            .fetch_all(self.pool())
            .await?;
        let mut dropped = 0;
        for r in rows {
            let (id, slot, url): (Uuid, String, Option<String>) = (
                sqlx::Row::try_get(&r, 0)?,
                sqlx::Row::try_get(&r, 1)?,
                sqlx::Row::try_get(&r, 2)?,
            );
            let Some(url) = url.map(Secret::new) else {
                sqlx::query(
                    "UPDATE wal_streams SET internal_detail = 'the resource has no replication_url:                      its slot cannot be dropped by the worker (see the runbook)', updated_at = now()
                      WHERE resource_id = $1",
                )
                .bind(id)
                .execute(self.pool())
                .await?;
                continue;
            };
            let Ok(temp) = crate::process::private_tempdir() else {
                continue;
            };
            let Ok(cmd) = walfmt::drop_slot_command(&url, &slot, temp.path()) else {
                continue;
            };
            let outcome =
                crate::process::run_one::<tokio::io::Empty>(&self.deps.tools, &cmd, None, 0).await;
            let ok = match &outcome {
                Ok((f, _)) => {
                    f.status.success() || classify_stream(&f.stderr) == StreamFailure::NoSlot
                }
                Err(_) => false,
            };
            if ok {
                sqlx::query(
                    "UPDATE wal_streams SET slot_dropped_at = now(), status = 'stopped', updated_at = now()
                      WHERE resource_id = $1",
                )
                .bind(id)
                .execute(self.pool())
                .await?;
                tracing::info!(resource_id = %id, slot = %slot, "dropped the slot of a resource that left PITR");
                dropped += 1;
            } else if let Ok((f, _)) = outcome {
                let detail = crate::secret::redact_known(&f.describe(), &[url.expose()]);
                tracing::warn!(resource_id = %id, slot = %slot, detail = %detail, "dropping a retired slot failed; retried");
            }
        }
        Ok(dropped)
    }

    fn reap(&self) {
        let mut set = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(done) = set.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a WAL stream task panicked");
            }
        }
    }

    async fn wait_all(&self) {
        let mut set = std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner()));
        while set.join_next().await.is_some() {}
    }
}

#[async_trait]
impl Loop for Arc<Wal> {
    fn name(&self) -> LoopName {
        LoopName::Wal
    }

    fn interval(&self) -> Duration {
        // A pass holds PASS_HOLD itself (see `pass`).
        Duration::from_millis(100)
    }

    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError> {
        self.reap();
        if ctx.shutdown.is_cancelled() {
            self.stop.cancel();
            self.wait_all().await;
            return Ok(());
        }
        self.ensure_rows().await?;
        let room = self
            .deps
            .config
            .wal_streams_per_replica
            .saturating_sub(self.held());
        self.stop_ineligible().await?;
        for claimed in self.claim(room).await? {
            let stop = self.stop.child_token();
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(claimed.resource_id, stop.clone());
            let this = Arc::clone(self);
            let abort = ctx.abort.clone();
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .spawn(async move {
                    let id = claimed.resource_id;
                    let stream = Stream::new(this.clone(), claimed, stop);
                    stream.run(abort).await;
                    this.held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                });
        }
        if self.due(&self.last_retention, RETENTION_EVERY) {
            if let Err(e) = self.drop_retired_slots().await {
                tracing::warn!(error = %e, "dropping the slots of resources that left PITR failed");
            }
            match self.expire_wal().await {
                Ok(n) if n > 0 => tracing::info!(
                    segments = n,
                    "expired WAL older than the oldest base backup"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "WAL retention failed"),
            }
        }
        if self.due(&self.last_gauges, GAUGES_EVERY) {
            self.refresh_gauges().await?;
        }
        if self.once {
            self.wait_all().await;
        } else {
            // The pass holds until the next one is due, watching for shutdown: the supervisor's
            // drain then waits for every stream to store what it has and release its row (the
            // shutdown grace bounds it; past it `abort` stops them at once).
            tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    self.stop.cancel();
                    self.wait_all().await;
                }
                _ = tokio::time::sleep(PASS_HOLD) => {}
            }
        }
        ctx.heartbeat.progress();
        Ok(())
    }
}

/// One held stream: its directory, tool, and what it has stored.
struct Stream {
    wal: Arc<Wal>,
    c: Claimed,
    /// Shutdown, or the resource left PITR.
    stop: CancellationToken,
    segment_bytes: u64,
    /// Names already stored (the seed among them).
    stored: HashSet<String>,
    last_partial: Option<Instant>,
    partial_mtime: Option<SystemTime>,
    /// End LSN of everything stored so far.
    stored_end: u64,
    recipient: Option<(Uuid, age::x25519::Recipient)>,
}

impl Stream {
    fn new(wal: Arc<Wal>, c: Claimed, stop: CancellationToken) -> Self {
        Self {
            wal,
            c,
            stop,
            segment_bytes: 16 * 1024 * 1024,
            stored: HashSet::new(),
            last_partial: None,
            partial_mtime: None,
            stored_end: 0,
            recipient: None,
        }
    }

    fn pool(&self) -> &PgPool {
        &self.wal.deps.pool
    }

    async fn run(mut self, abort: CancellationToken) {
        let id = self.c.resource_id;
        tracing::info!(resource_id = %id, slot = %self.c.slot, "WAL stream claimed");
        let mut failures = 0u32;
        let temp = match crate::process::private_tempdir() {
            Ok(t) => t,
            Err(e) => {
                self.release(
                    "failed",
                    Some(&format!("cannot create a temporary directory: {e}")),
                    Duration::from_secs(60),
                )
                .await;
                return;
            }
        };
        let dir = temp.path().join("wal");
        if let Err(e) = std::fs::create_dir(&dir) {
            self.release(
                "failed",
                Some(&format!("cannot create the WAL directory: {e}")),
                Duration::from_secs(60),
            )
            .await;
            return;
        }
        loop {
            let ended = self.session(&dir, temp.path(), &abort).await;
            match ended {
                Ended::Done => {
                    self.release("stopped", None, Duration::ZERO).await;
                    return;
                }
                Ended::Cancelled => {
                    self.release("stopped", None, Duration::ZERO).await;
                    tracing::info!(resource_id = %id, "WAL stream released (shutdown)");
                    return;
                }
                Ended::LeaseLost => {
                    tracing::warn!(resource_id = %id, "WAL stream lease lost: stopped");
                    return;
                }
                Ended::Gap(detail) => {
                    self.record_gap(&detail, temp.path()).await;
                    self.release("stopped", Some(&detail), Duration::ZERO).await;
                    return;
                }
                Ended::Refused(detail) => {
                    let backoff = Duration::from_secs(60 * u64::from(failures.min(10) + 1));
                    self.release("failed", Some(&detail), backoff).await;
                    tracing::warn!(resource_id = %id, detail = %detail, "WAL stream refused by the server; retried later");
                    return;
                }
                Ended::Transient(detail) => {
                    failures += 1;
                    if self.wal.once {
                        self.release("stopped", Some(&detail), Duration::ZERO).await;
                        return;
                    }
                    let wait =
                        Duration::from_secs(1u64 << failures.min(6)).min(MAX_RESTART_BACKOFF);
                    tracing::warn!(resource_id = %id, detail = %detail, retry_in = wait.as_secs(), "pg_receivewal stopped; restarting");
                    let _ = self.note_error(&detail).await;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => { self.release("stopped", None, Duration::ZERO).await; return; }
                        _ = abort.cancelled() => { self.release("stopped", None, Duration::ZERO).await; return; }
                    }
                }
            }
        }
    }

    /// A connection to the tenant's database (its own role: position and slot state).
    async fn tenant(&self) -> Result<sqlx::PgConnection, String> {
        let opts = PgConnectOptions::from_str(self.c.connection_url.expose())
            .map_err(|_| "the resource's connection URL does not parse".to_owned())?
            .disable_statement_logging();
        tokio::time::timeout(Duration::from_secs(15), opts.connect())
            .await
            .map_err(|_| "connecting to the tenant timed out".to_owned())?
            .map_err(|e| crate::secret::redact_credentials(&e.to_string()))
    }

    /// One `pg_receivewal` run, with its directory watched and stored as it grows.
    async fn session(&mut self, dir: &Path, temp: &Path, abort: &CancellationToken) -> Ended {
        let mut tenant = match self.tenant().await {
            Ok(c) => c,
            Err(e) => return Ended::Transient(e),
        };
        match sqlx::query_scalar::<_, i64>(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
        )
        .fetch_one(&mut tenant)
        .await
        {
            Ok(n) if n > 0 => self.segment_bytes = n as u64,
            Ok(_) => {}
            Err(e) => return Ended::Transient(e.to_string()),
        }
        let lost: Option<Option<String>> =
            sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&self.c.slot)
                .fetch_optional(&mut tenant)
                .await
                .unwrap_or(None);
        if let Some(Some(status)) = &lost {
            if status == "lost" {
                return Ended::Gap(format!(
                    "the server invalidated replication slot {} (wal_status lost: max_slot_wal_keep_size exceeded)",
                    self.c.slot
                ));
            }
        }
        let wal = Arc::clone(&self.wal);
        let tools = &wal.deps.tools;
        // The slot first: a missing one is created (a new stream, or a failover).
        let create = match walfmt::create_slot_command(&self.c.replication_url, &self.c.slot, temp)
        {
            Ok(c) => c,
            Err(p) => return Ended::Refused(p.0),
        };
        let created = lost.is_none();
        match crate::process::run_one::<tokio::io::Empty>(tools, &create, None, 0).await {
            Ok((finished, _)) if finished.status.success() => {}
            Ok((finished, _)) => {
                return match classify_stream(&finished.stderr) {
                    StreamFailure::Refused => Ended::Refused(finished.describe()),
                    _ => Ended::Transient(finished.describe()),
                }
            }
            Err(e) => return Ended::Refused(format!("{e:?}")),
        }
        if created {
            tracing::info!(resource_id = %self.c.resource_id, slot = %self.c.slot, "replication slot created");
            let _ =
                sqlx::query("UPDATE wal_streams SET base_wanted_at = now(), slot_dropped_at = NULL WHERE resource_id = $1")
                    .bind(self.c.resource_id)
                    .execute(self.pool())
                    .await;
        }
        if let Err(e) = self.seed(dir).await {
            return Ended::Transient(format!("seeding the WAL directory: {e}"));
        }
        // `--once`: to the server's position now, and that instant is what it confirms.
        let end_probe = if self.wal.once {
            match probe(&mut tenant).await {
                Ok(p) => Some(p),
                Err(e) => return Ended::Transient(e),
            }
        } else {
            None
        };
        let end = end_probe.map(|(lsn, _)| lsn);
        if let Some(p) = end_probe {
            if self.stored_end >= p.0 && self.stored_end > 0 {
                let _ = self.confirm(p).await;
                return Ended::Done;
            }
        }
        let cmd =
            match walfmt::receive_command(&self.c.replication_url, &self.c.slot, dir, end, temp) {
                Ok(c) => c,
                Err(p) => return Ended::Refused(p.0),
            };
        let tool = match crate::process::spawn(tools, &cmd, false) {
            Ok(t) => t.keep(cmd),
            Err(e) => return Ended::Refused(e.to_string()),
        };
        let exited = tool.exit_watch();
        tokio::pin!(exited);
        let renew_every = self.wal.deps.config.lease / 3;
        let mut last_renew = Instant::now();
        let mut tool = Some(tool);
        loop {
            let exited_now = tokio::select! {
                _ = &mut exited => true,
                _ = tokio::time::sleep(TICK) => false,
                _ = self.stop.cancelled() => {
                    if let Some(t) = tool.take() { t.kill().await; }
                    let _ = self.scan(dir, true, &mut tenant).await;
                    return Ended::Cancelled;
                }
                _ = abort.cancelled() => {
                    if let Some(t) = tool.take() { t.kill().await; }
                    return Ended::Cancelled;
                }
            };
            if let Err(e) = self.scan(dir, exited_now, &mut tenant).await {
                tracing::warn!(resource_id = %self.c.resource_id, error = %e, "storing WAL failed; retried");
            }
            if last_renew.elapsed() >= renew_every || exited_now {
                match self.renew(&mut tenant).await {
                    Ok(true) => last_renew = Instant::now(),
                    Ok(false) => {
                        if let Some(t) = tool.take() {
                            t.kill().await;
                        }
                        return Ended::LeaseLost;
                    }
                    Err(e) => {
                        tracing::warn!(resource_id = %self.c.resource_id, error = %e, "renewing the WAL stream's lease failed");
                        if last_renew.elapsed() >= self.wal.deps.config.lease {
                            if let Some(t) = tool.take() {
                                t.kill().await;
                            }
                            return Ended::LeaseLost;
                        }
                        if let Ok(c) = self.tenant().await {
                            tenant = c;
                        }
                    }
                }
            }
            if exited_now {
                let Some(t) = tool.take() else {
                    return Ended::Transient("the tool is gone".into());
                };
                let finished = t.wait().await;
                if finished.status.success() {
                    match end_probe {
                        Some(p) => {
                            let _ = self.confirm(p).await;
                        }
                        None => {
                            let _ = self.confirm_current(&mut tenant).await;
                        }
                    }
                    return if self.wal.once {
                        Ended::Done
                    } else {
                        Ended::Transient("pg_receivewal exited".into())
                    };
                }
                return match classify_stream(&finished.stderr) {
                    StreamFailure::Gap => Ended::Gap(finished.describe()),
                    StreamFailure::Refused => Ended::Refused(finished.describe()),
                    StreamFailure::NoSlot | StreamFailure::Transient => {
                        Ended::Transient(finished.describe())
                    }
                };
            }
        }
    }

    /// An empty file of segment size named after the newest stored complete segment, so the tool
    /// resumes after it; stored names are remembered.
    async fn seed(&mut self, dir: &Path) -> Result<(), String> {
        let newest: Option<(i32, i64)> = sqlx::query_as(
            "SELECT timeline, segno FROM wal_segments
              WHERE resource_id = $1 AND segno IS NOT NULL AND NOT partial
              ORDER BY segno DESC, timeline DESC LIMIT 1",
        )
        .bind(self.c.resource_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| e.to_string())?;
        let histories: Vec<i32> = sqlx::query_scalar(
            "SELECT timeline FROM wal_segments WHERE resource_id = $1 AND segno IS NULL",
        )
        .bind(self.c.resource_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| e.to_string())?;
        for t in histories {
            self.stored.insert(format!("{t:08X}.history"));
        }
        let Some((tli, segno)) = newest else {
            return Ok(());
        };
        let name = segment_name(tli as u32, segno as u64, self.segment_bytes);
        self.stored_end = self.stored_end.max((segno as u64 + 1) * self.segment_bytes);
        if self.stored.contains(&name) {
            return Ok(());
        }
        let has_newer = std::fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .flatten()
            .any(|e| matches!(WalFile::parse(&e.file_name().to_string_lossy(), self.segment_bytes),
                Some(WalFile::Segment { segno: s, .. } | WalFile::Partial { segno: s, .. }) if s as i64 >= segno));
        if !has_newer {
            let f = std::fs::File::create(dir.join(&name)).map_err(|e| e.to_string())?;
            f.set_len(self.segment_bytes).map_err(|e| e.to_string())?;
        }
        self.stored.insert(name);
        Ok(())
    }

    /// Stores what is new in the directory: complete segments and history files at once, the
    /// partial segment when `pitr_rpo_seconds` passed since its last store and it grew (or
    /// `flush`: the tool stopped). Keeps the newest complete segment on disk (the tool resumes
    /// after it), removes older ones.
    async fn scan(
        &mut self,
        dir: &Path,
        flush: bool,
        tenant: &mut sqlx::PgConnection,
    ) -> Result<(), String> {
        let mut files: Vec<(WalFile, PathBuf, String)> = std::fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                WalFile::parse(&name, self.segment_bytes).map(|f| (f, e.path(), name))
            })
            .collect();
        files.sort_by_key(|(f, _, _)| match f {
            WalFile::History { timeline } => (0, u64::from(*timeline), 0),
            WalFile::Segment { timeline, segno } => (1, *segno, *timeline),
            WalFile::Partial { timeline, segno } => (2, *segno, *timeline),
        });
        let newest_complete = files
            .iter()
            .filter_map(|(f, _, n)| matches!(f, WalFile::Segment { .. }).then_some(n.clone()))
            .next_back();
        for (file, path, name) in &files {
            match *file {
                WalFile::History { timeline } => {
                    if !self.stored.contains(name) {
                        self.store(path, name, timeline, None, false).await?;
                        self.stored.insert(name.clone());
                    }
                }
                WalFile::Segment { timeline, segno } => {
                    if !self.stored.contains(name) {
                        self.store(path, name, timeline, Some(segno), false).await?;
                        self.stored.insert(name.clone());
                        self.partial_mtime = None;
                    }
                    if Some(name) != newest_complete.as_ref() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                WalFile::Partial { timeline, segno } => {
                    let due = flush
                        || self.last_partial.is_none_or(|t| t.elapsed() >= self.c.rpo)
                        || self.wal.once;
                    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                    if due && mtime != self.partial_mtime {
                        // The server's position before the file is read: once the stored
                        // partial reaches it, the WAL of every commit before that instant is
                        // stored, however busy the database is since.
                        let before = probe(tenant).await.ok();
                        if before.is_some() && !flush {
                            tokio::time::sleep(PROBE_SETTLE).await;
                        }
                        self.store(path, name, timeline, Some(segno), true).await?;
                        self.last_partial = Some(Instant::now());
                        self.partial_mtime = mtime;
                        if let Some(p) = before {
                            self.confirm(p).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn recipient(&mut self) -> Result<Option<age::x25519::Recipient>, String> {
        let Some(master) = &self.wal.deps.config.master_key else {
            return Ok(None);
        };
        if self.recipient.is_none() {
            let k = crate::crypto::team_recipient(self.pool(), master, self.c.team_id)
                .await
                .map_err(|e| format!("the team's backup key: {e}"))?;
            self.recipient = Some(k);
        }
        Ok(self.recipient.as_ref().map(|(_, r)| r.clone()))
    }

    /// One file through the §5 pipeline, then its row.
    async fn store(
        &mut self,
        path: &Path,
        name: &str,
        timeline: u32,
        segno: Option<u64>,
        partial: bool,
    ) -> Result<(), String> {
        let wal = Arc::clone(&self.wal);
        let cfg = &wal.deps.config;
        let base = name.trim_end_matches(".partial");
        let mut key = format!(
            "{}{}/{}/wal/{base}{}.gz",
            cfg.storage_url.prefix(),
            self.c.team_id,
            self.c.resource_id,
            if partial { ".partial" } else { "" }
        );
        let recipient = self.recipient().await?;
        let encrypt = match &recipient {
            Some(r) => {
                key.push_str(".age");
                Some(crate::crypto::Encrypt::new(r).map_err(|e| format!("encryption: {e}"))?)
            }
            None => None,
        };
        let seg_start = segno.map_or(0, |s| s * self.segment_bytes);
        if partial {
            let complete: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM wal_segments WHERE resource_id = $1 AND timeline = $2
                                   AND segno = $3 AND NOT partial)",
            )
            .bind(self.c.resource_id)
            .bind(timeline as i32)
            .bind(segno.map(|s| s as i64))
            .fetch_one(self.pool())
            .await
            .map_err(|e| e.to_string())?;
            if complete {
                return Ok(());
            }
        }
        // Streamed from the file (16 MiB a segment: never held whole); the check counts the
        // pages that hold WAL as they pass.
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("reading {name}: {e}"))?;
        let pages = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let check: Box<dyn StreamCheck> = match segno {
            Some(_) => Box::new(WrittenCheck::new(seg_start, pages.clone())),
            None => Box::new(Pass),
        };
        let metadata = Metadata::from([
            ("resource-id".to_owned(), self.c.resource_id.to_string()),
            ("wal-file".to_owned(), name.to_owned()),
        ]);
        let store = &wal.deps.store;
        let mut upload = store
            .begin_upload(&key, metadata)
            .await
            .map_err(|e| e.to_string())?;
        let streamed = gzip_to_upload(
            file,
            check,
            upload.as_mut(),
            Deflate::for_gzip_level(cfg.gzip_level),
            encrypt,
        )
        .await;
        let streamed = match streamed {
            Ok(s) => s,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(e.to_string());
            }
        };
        let written = match segno {
            Some(_) => pages.load(std::sync::atomic::Ordering::Relaxed),
            None => streamed.raw_bytes,
        };
        if segno.is_some() && written == 0 {
            // Nothing of ours in it yet (a partial just created, a file of another segment size).
            let _ = upload.abort().await;
            return Ok(());
        }
        upload
            .commit(Metadata::from([(
                "sha256".to_owned(),
                streamed.sha256.clone(),
            )]))
            .await
            .map_err(|e| e.to_string())?;
        let end = seg_start + if partial { written } else { self.segment_bytes };
        let key_id = self.recipient.as_ref().map(|(id, _)| *id);
        let previous: Option<(String, i64, bool)> = sqlx::query_as(
            "SELECT object_key, raw_bytes, partial FROM wal_segments
              WHERE resource_id = $1 AND timeline = $2 AND segno IS NOT DISTINCT FROM $3",
        )
        .bind(self.c.resource_id)
        .bind(timeline as i32)
        .bind(segno.map(|s| s as i64))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| e.to_string())?;
        let mut tx = self.pool().begin().await.map_err(|e| e.to_string())?;
        let conflict = if segno.is_some() {
            "(resource_id, timeline, segno) WHERE segno IS NOT NULL"
        } else {
            "(resource_id, timeline) WHERE segno IS NULL"
        };
        sqlx::query(&format!(
            "INSERT INTO wal_segments (resource_id, timeline, segno, object_key, sha256, size_bytes,
                                       raw_bytes, start_lsn, end_lsn, partial, key_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::pg_lsn, $9::text::pg_lsn, $10, $11)
             ON CONFLICT {conflict} DO UPDATE
                SET object_key = EXCLUDED.object_key, sha256 = EXCLUDED.sha256,
                    size_bytes = EXCLUDED.size_bytes, raw_bytes = EXCLUDED.raw_bytes,
                    end_lsn = EXCLUDED.end_lsn, partial = EXCLUDED.partial,
                    key_id = EXCLUDED.key_id, stored_at = now()
              WHERE wal_segments.partial OR wal_segments.segno IS NULL"
        ))
        .bind(self.c.resource_id)
        .bind(timeline as i32)
        .bind(segno.map(|s| s as i64))
        .bind(&key)
        .bind(&streamed.sha256)
        .bind(streamed.stored_bytes as i64)
        .bind(written as i64)
        .bind(segno.map(|_| walfmt::lsn_text(seg_start)))
        .bind(segno.map(|_| walfmt::lsn_text(end)))
        .bind(partial)
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        // The partial's object is replaced: deleted through the pending deletions.
        if let Some((old_key, _, true)) = &previous {
            if *old_key != key {
                sqlx::query(
                    "INSERT INTO pending_object_deletions (object_key, reason) VALUES ($1, 'wal partial replaced')
                     ON CONFLICT (object_key) DO NOTHING",
                )
                .bind(old_key)
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            }
        }
        if segno.is_some() {
            sqlx::query(
                "UPDATE wal_streams SET timeline = greatest(coalesce(timeline, 0), $2),
                        last_lsn = greatest(coalesce(last_lsn, '0/0'::pg_lsn), $3::text::pg_lsn),
                        segment_bytes = $4, updated_at = now()
                  WHERE resource_id = $1",
            )
            .bind(self.c.resource_id)
            .bind(timeline as i32)
            .bind(walfmt::lsn_text(end))
            .bind(self.segment_bytes as i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        let before = match previous {
            Some((_, raw, true)) => raw as u64,
            _ => 0,
        };
        self.wal
            .deps
            .metrics
            .wal_bytes
            .inc_by(written.saturating_sub(before));
        self.stored_end = self.stored_end.max(end);
        tracing::debug!(resource_id = %self.c.resource_id, file = %name, partial, bytes = written, "WAL stored");
        Ok(())
    }

    /// The RPO's clock: when everything the server has written is stored, `last_stored_at` is
    /// now (a quiet database stays current without uploads).
    async fn confirm_current(&self, tenant: &mut sqlx::PgConnection) -> Result<(), String> {
        let p = probe(tenant).await?;
        self.confirm(p).await
    }

    /// `last_stored_at` moves to the probe's instant when the stored WAL reaches its position.
    async fn confirm(&self, (lsn, at): Probe) -> Result<(), String> {
        if self.stored_end < lsn {
            return Ok(());
        }
        sqlx::query(
            "UPDATE wal_streams
                SET last_stored_at = greatest(coalesce(last_stored_at, $3), $3), updated_at = now()
              WHERE resource_id = $1 AND leased_by = $2",
        )
        .bind(self.c.resource_id)
        .bind(&self.wal.deps.config.worker_id)
        .bind(at)
        .execute(self.pool())
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Extends the lease (fenced on the holder) and confirms currency; false when not ours.
    async fn renew(&self, tenant: &mut sqlx::PgConnection) -> Result<bool, String> {
        let done = sqlx::query(
            "UPDATE wal_streams SET lease_expires_at = now() + make_interval(secs => $3),
                    status = 'streaming', error_summary = NULL, updated_at = now()
              WHERE resource_id = $1 AND leased_by = $2",
        )
        .bind(self.c.resource_id)
        .bind(&self.wal.deps.config.worker_id)
        .bind(self.wal.deps.config.lease.as_secs_f64())
        .execute(self.pool())
        .await
        .map_err(|e| e.to_string())?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.confirm_current(tenant).await?;
        Ok(true)
    }

    async fn note_error(&self, detail: &str) -> Result<(), sqlx::Error> {
        let detail = self.redact(detail);
        sqlx::query(
            "UPDATE wal_streams SET internal_detail = $3, updated_at = now()
              WHERE resource_id = $1 AND leased_by = $2",
        )
        .bind(self.c.resource_id)
        .bind(&self.wal.deps.config.worker_id)
        .bind(detail)
        .execute(self.pool())
        .await
        .map(drop)
    }

    fn redact(&self, detail: &str) -> String {
        let d = crate::secret::redact_known(
            detail,
            &[
                self.c.replication_url.expose(),
                self.c.connection_url.expose(),
            ],
        );
        crate::secret::redact_credentials(&d)
            .chars()
            .take(8192)
            .collect()
    }

    /// Gives the row back: `status`, runnable after `after`.
    async fn release(&self, status: &str, detail: Option<&str>, after: Duration) {
        let summary = match status {
            "failed" => Some(FailureReason::Config.final_summary()),
            _ => None,
        };
        let done = sqlx::query(
            "UPDATE wal_streams SET status = $3, leased_by = NULL, lease_expires_at = NULL,
                    run_after = now() + make_interval(secs => $4),
                    error_summary = $5, internal_detail = coalesce($6, internal_detail),
                    updated_at = now()
              WHERE resource_id = $1 AND leased_by = $2",
        )
        .bind(self.c.resource_id)
        .bind(&self.wal.deps.config.worker_id)
        .bind(status)
        .bind(after.as_secs_f64())
        .bind(summary)
        .bind(detail.map(|d| self.redact(d)))
        .execute(self.pool())
        .await;
        if let Err(e) = done {
            tracing::warn!(resource_id = %self.c.resource_id, error = %e, "releasing the WAL stream failed; its lease will lapse");
        }
    }

    /// A gap: recorded, counted, the slot dropped (an invalidated slot cannot stream again; the
    /// next holder creates a fresh one) and a base backup wanted at once.
    async fn record_gap(&self, detail: &str, temp: &Path) {
        let detail = self.redact(detail);
        tracing::error!(resource_id = %self.c.resource_id, detail = %detail, "WAL gap: the server dropped WAL before it was stored");
        self.wal.deps.metrics.pitr_gaps.inc();
        let recorded = sqlx::query(
            "WITH gap AS (
                INSERT INTO wal_gaps (resource_id, timeline, from_lsn, from_time, detail)
                SELECT resource_id, timeline, last_lsn, last_stored_at, $2
                  FROM wal_streams WHERE resource_id = $1
                RETURNING resource_id
             )
             UPDATE wal_streams SET base_wanted_at = now() WHERE resource_id IN (SELECT resource_id FROM gap)",
        )
        .bind(self.c.resource_id)
        .bind(&detail)
        .execute(self.pool())
        .await;
        if let Err(e) = recorded {
            tracing::error!(resource_id = %self.c.resource_id, error = %e, "recording a WAL gap failed");
        }
        let _ = crate::db::audit(
            self.pool(),
            "wal.gap",
            Some(self.c.team_id),
            Some(self.c.resource_id),
            None,
            serde_json::json!({ "slot": self.c.slot, "detail": detail }),
        )
        .await;
        if let Ok(cmd) = walfmt::drop_slot_command(&self.c.replication_url, &self.c.slot, temp) {
            let _ =
                crate::process::run_one::<tokio::io::Empty>(&self.wal.deps.tools, &cmd, None, 0)
                    .await;
        }
    }
}

/// The tenant server's WAL position and its clock at that moment.
type Probe = (u64, chrono::DateTime<chrono::Utc>);

/// How long a partial's store waits after the probe: WAL the server wrote before it is then on
/// our disk (streaming lags by milliseconds).
const PROBE_SETTLE: Duration = Duration::from_millis(200);

async fn probe(tenant: &mut sqlx::PgConnection) -> Result<Probe, String> {
    let (lsn, at): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT pg_current_wal_lsn()::text, clock_timestamp()")
            .fetch_one(&mut *tenant)
            .await
            .map_err(|e| e.to_string())?;
    Ok((walfmt::parse_lsn(&lsn).unwrap_or(u64::MAX), at))
}

/// WAL has no framing of its own the stream could be checked against.
struct Pass;

impl StreamCheck for Pass {
    fn update(&mut self, _bytes: &[u8]) {}
    fn finish(self: Box<Self>) -> Result<String, String> {
        Ok(String::new())
    }
}
