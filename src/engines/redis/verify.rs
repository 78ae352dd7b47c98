//! The verifier's test restore of a Redis backup into a scratch server (`VERIFY_REDIS_URL`,
//! DESIGN §11): every key RESTOREd there, one backup database at a time, then counted.
//!
//! The scratch server is shared by every verification of every replica, so each one leases a
//! logical database of it (a *slot*, databases 1…N-1; N from `CONFIG GET databases`): a
//! `SET backup-worker:verify-slot:<db> <holder> NX PX 30000` in database 0, renewed every 10 s
//! while the verification runs and deleted after (both compare-and-act scripts, so a holder only
//! ever renews or releases its own claim). A verifier that dies leaves a slot whose lease lapses
//! in 30 s; the next holder flushes it before use, as every holder does. A slot is flushed after
//! use only while its lease is still held — a lapsed one may already be someone else's.
//!
//! Keys are RESTOREd without their TTL (`RESTORE key 0 payload`): nothing expires while it is
//! counted, and a key whose expiry passed since the backup is still checked by the server (a real
//! restore drops it; here it is reported as `expired`). No REPLACE: the slot was flushed, so a
//! `BUSYKEY` answer is a key the backup holds twice (a keyspace dump whose SCAN returned it twice),
//! counted as a duplicate. After each database DBSIZE must equal the keys RESTOREd.
//! Memory is the restore's: the reader's byte budget, batches of at most 4 MiB / 1000 keys, a
//! batch sent early whenever nothing more is cut (so the reader never waits for room it holds).
//!
//! Blame: a payload the server refuses as `Bad data format` (`sanitize-dump-payload yes` walks
//! every structure; the CRC64 of the stream was already good) is the backup's fault, `integrity`.
//! Everything else is the verifier's environment: unreachable, wrong password, out of memory, a
//! payload version newer than the scratch server reads (it must be at least as new as the
//! platform's servers; the payload's CRC64 is the reader's own, so "version or checksum" is the
//! version), a key larger than its `proto-max-bulk-len`, a lost lease, a count that does not
//! match (eviction, or someone else writing there).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::Value;
use tokio::sync::mpsc::error::TryRecvError;

use super::classify::client_class;
use super::restore::{CutKeys, Item, BATCH_BYTES, BATCH_KEYS, DEFAULT_PROTO_MAX_BULK_LEN};
use super::{connect, now_ms, parse, redis_failure, RedisConnection};
use crate::domain::FailureReason;
use crate::engines::{fail, problem, BackupFile, ConfigProblem, Failure};
use crate::secret::Secret;

/// The database holding the slot leases; never a slot itself.
const LEASE_DB: i64 = 0;
const SLOT_KEY_PREFIX: &str = "backup-worker:verify-slot:";
const SLOT_LEASE: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// How long a verification waits for a free slot before it gives up (and is retried later).
const SLOT_WAIT: Duration = Duration::from_secs(600);
const SLOT_POLL: Duration = Duration::from_millis(500);
/// Redis' default `databases`, assumed when the server will not say.
const DEFAULT_DATABASES: i64 = 16;

const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                         return redis.call('DEL', KEYS[1]) else return 0 end";

/// The scratch Redis of `VERIFY_REDIS_URL`.
#[derive(Debug, Clone)]
pub struct ScratchRedis {
    conn: RedisConnection,
}

/// What a scratch test restore found, per backup database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbCount {
    /// Keys RESTOREd (each answered OK).
    pub restored: u64,
    /// DBSIZE of the slot afterwards (equal to `restored`, or the verification failed).
    pub counted: u64,
    /// Keys whose expiry had passed at the verification: checked, though a restore drops them.
    pub expired: u64,
    /// Keys the backup holds twice in the database (`BUSYKEY`): the later copy not restored.
    pub duplicates: u64,
}

/// The result of a scratch test restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchReport {
    /// The scratch server's `redis_version`.
    pub server_version: String,
    /// Its `sanitize-dump-payload` setting (`yes` checks every payload deeply), if it says.
    pub sanitize: Option<String>,
    /// The logical database leased for the restore.
    pub slot: i64,
    pub databases: BTreeMap<u64, DbCount>,
    /// Function libraries in the backup: counted, not restored (they are server-wide, and the
    /// scratch server is shared).
    pub functions: u64,
}

/// A failed scratch test restore and whose fault it is.
#[derive(Debug)]
pub struct Rejected {
    pub failure: Failure,
    pub backup_at_fault: bool,
}

fn environment(failure: Failure) -> Rejected {
    Rejected {
        failure,
        backup_at_fault: false,
    }
}

fn backup(failure: Failure) -> Rejected {
    Rejected {
        failure,
        backup_at_fault: true,
    }
}

/// A leased slot.
struct Slot {
    db: i64,
    key: String,
    holder: String,
}

impl ScratchRedis {
    /// Parses `VERIFY_REDIS_URL`: a whole server (the verifier leases its databases).
    pub fn new(url: &Secret) -> Result<Self, ConfigProblem> {
        let conn = parse(url)?;
        if conn.db.is_some() {
            return Err(problem(
                "must name no database: verifications lease the server's logical databases",
            ));
        }
        Ok(Self { conn })
    }

    /// RESTOREs every key of the backup into a leased slot, one backup database at a time,
    /// flushed before and after. `label` names the verification in the lease (for operators).
    pub async fn test_restore(
        &self,
        backup: &BackupFile,
        label: &str,
    ) -> Result<ScratchReport, Rejected> {
        let stage = "connecting to the scratch Redis";
        let mut admin = connect(&self.conn, LEASE_DB, stage)
            .await
            .map_err(environment)?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut admin)
            .await
            .map_err(|e| environment(redis_failure("INFO on the scratch Redis", e)))?;
        let server_version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let sanitize = config_get(&mut admin, "sanitize-dump-payload").await;
        if sanitize.as_deref() != Some("yes") {
            tracing::warn!(sanitize_dump_payload = ?sanitize,
                "the scratch Redis does not run with sanitize-dump-payload yes: payloads are checked shallowly");
        }
        let databases = config_get(&mut admin, "databases")
            .await
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_DATABASES);
        let limit = config_get(&mut admin, "proto-max-bulk-len")
            .await
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_PROTO_MAX_BULK_LEN);
        if databases < 2 {
            return Err(environment(fail(
                FailureReason::Config,
                format!("the scratch Redis has {databases} logical database(s); the verifier needs database 0 for leases and at least one more"),
            )));
        }
        let slot = lease(&mut admin, databases, label)
            .await
            .map_err(environment)?;
        let work = restore_into(&self.conn, &slot, backup, limit);
        let result = tokio::select! {
            r = work => r,
            lost = keep_lease(&self.conn, &slot) => Err(environment(lost)),
        };
        // Flushed after use, unless the lease lapsed (the slot may be someone else's now).
        if matches!(renew(&mut admin, &slot).await, Ok(true)) {
            if let Ok(mut c) = connect(&self.conn, slot.db, stage).await {
                if let Err(e) = redis::cmd("FLUSHDB").query_async::<()>(&mut c).await {
                    tracing::warn!(slot = slot.db, error = %e, "flushing the scratch slot failed; its next holder flushes it");
                }
            }
        }
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&slot.key)
            .arg(&slot.holder)
            .query_async(&mut admin)
            .await;
        let (databases, functions) = result?;
        Ok(ScratchReport {
            server_version,
            sanitize,
            slot: slot.db,
            databases,
            functions,
        })
    }
}

/// A `CONFIG GET` value, `None` when refused or unknown.
async fn config_get(c: &mut MultiplexedConnection, name: &str) -> Option<String> {
    redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async::<Vec<String>>(c)
        .await
        .ok()
        .and_then(|v| v.get(1).cloned())
}

/// Claims the first free slot (1…databases-1), waiting up to [`SLOT_WAIT`] for one.
async fn lease(
    admin: &mut MultiplexedConnection,
    databases: i64,
    label: &str,
) -> Result<Slot, Failure> {
    let holder = format!("{label} {}", uuid::Uuid::new_v4());
    let deadline = Instant::now() + SLOT_WAIT;
    loop {
        for db in 1..databases {
            let key = format!("{SLOT_KEY_PREFIX}{db}");
            let claimed: Value = redis::cmd("SET")
                .arg(&key)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(SLOT_LEASE.as_millis() as u64)
                .query_async(admin)
                .await
                .map_err(|e| redis_failure("leasing a scratch database", e))?;
            if !matches!(claimed, Value::Nil) {
                return Ok(Slot { db, key, holder });
            }
        }
        if Instant::now() >= deadline {
            return Err(fail(
                FailureReason::Unreachable,
                format!(
                    "every logical database of the scratch Redis stayed leased for {SLOT_WAIT:?}: more verifications run at once than it has databases"
                ),
            ));
        }
        tokio::time::sleep(SLOT_POLL).await;
    }
}

/// Extends the lease if it is still ours; `Ok(false)`: it lapsed (and may be someone else's).
async fn renew(c: &mut MultiplexedConnection, slot: &Slot) -> redis::RedisResult<bool> {
    let n: i64 = redis::cmd("EVAL")
        .arg(RENEW)
        .arg(1)
        .arg(&slot.key)
        .arg(&slot.holder)
        .arg(SLOT_LEASE.as_millis() as u64)
        .query_async(c)
        .await?;
    Ok(n == 1)
}

/// Renews the lease every [`RENEW_EVERY`] for as long as it is polled; returns only when the
/// lease is lost (or could not be renewed for a whole lease).
async fn keep_lease(conn: &RedisConnection, slot: &Slot) -> Failure {
    let mut renewed = Instant::now();
    let mut c = None;
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        if c.is_none() {
            c = connect(conn, LEASE_DB, "connecting to the scratch Redis")
                .await
                .ok();
        }
        let answer = match c.as_mut() {
            Some(c) => renew(c, slot).await,
            None => Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "not connected",
            ))),
        };
        match answer {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => return lost(slot),
            Err(e) => {
                c = None;
                if renewed.elapsed() >= SLOT_LEASE {
                    return redis_failure("renewing the scratch database's lease", e);
                }
            }
        }
    }
}

fn lost(slot: &Slot) -> Failure {
    fail(
        FailureReason::Unreachable,
        format!(
            "the lease on scratch database {} lapsed mid-verification (its counts cannot be trusted)",
            slot.db
        ),
    )
}

/// One backup database being RESTOREd into the slot.
struct Segment {
    db: u64,
    count: DbCount,
    pipe: redis::Pipeline,
    keys: Vec<(Vec<u8>, bool)>,
    bytes: usize,
    _permits: Vec<tokio::sync::OwnedSemaphorePermit>,
}

impl Segment {
    fn new(db: u64) -> Self {
        Self {
            db,
            count: DbCount::default(),
            pipe: redis::pipe(),
            keys: Vec::new(),
            bytes: 0,
            _permits: Vec::new(),
        }
    }
}

/// The cut stream RESTOREd into the slot, a backup database at a time.
async fn restore_into(
    conn: &RedisConnection,
    slot: &Slot,
    backup: &BackupFile,
    limit: u64,
) -> Result<(BTreeMap<u64, DbCount>, u64), Rejected> {
    let mut c = connect(conn, slot.db, "connecting to the scratch Redis")
        .await
        .map_err(environment)?;
    let mut lease = connect(conn, LEASE_DB, "connecting to the scratch Redis")
        .await
        .map_err(environment)?;
    flush(&mut c).await?;
    let mut cut = CutKeys::start(backup);
    let mut dbs: BTreeMap<u64, DbCount> = BTreeMap::new();
    let mut functions = 0u64;
    let mut segment: Option<Segment> = None;
    let now = now_ms();
    let read = async {
        loop {
            // Nothing cut yet: send what the segment holds before waiting, so the budget its
            // keys hold is never what the reader waits for.
            let item = match cut.rx.try_recv() {
                Ok(item) => item,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    if let Some(s) = segment.as_mut() {
                        send(&mut c, s).await?;
                    }
                    match cut.rx.recv().await {
                        Some(item) => item,
                        None => break,
                    }
                }
            };
            // The reader's failures (a file that does not read) are the backup's, as without a
            // scratch server; the scratch server's are judged where they happen.
            let item = item.map_err(|failure| Rejected {
                failure,
                backup_at_fault: true,
            })?;
            match item {
                Item::Function(..) => functions += 1,
                Item::Key(e, permit) => {
                    if segment.as_ref().is_some_and(|s| s.db != e.db) {
                        if let Some(done) = segment.take() {
                            let (db, count) =
                                finish_segment(&mut c, &mut lease, slot, done).await?;
                            merge(&mut dbs, db, count);
                        }
                    }
                    if e.payload.len() as u64 > limit {
                        return Err(environment(fail(
                            FailureReason::Config,
                            format!(
                                "key {} is {} bytes, more than the scratch Redis' proto-max-bulk-len ({limit})",
                                super::rdb::show_key(&e.key),
                                e.payload.len()
                            ),
                        )));
                    }
                    let s = segment.get_or_insert_with(|| Segment::new(e.db));
                    if s.keys.len() >= BATCH_KEYS || s.bytes >= BATCH_BYTES {
                        send(&mut c, s).await?;
                    }
                    s.bytes += e.key.len() + e.payload.len();
                    s.keys
                        .push((e.key.clone(), e.expire_at_ms.is_some_and(|at| at <= now)));
                    s._permits.push(permit);
                    s.pipe.cmd("RESTORE").arg(e.key).arg(0).arg(e.payload);
                }
            }
        }
        if let Some(done) = segment.take() {
            let (db, count) = finish_segment(&mut c, &mut lease, slot, done).await?;
            merge(&mut dbs, db, count);
        }
        Ok::<(), Rejected>(())
    };
    match read.await {
        Ok(()) => {
            cut.finish(Ok(())).await.map_err(|failure| Rejected {
                failure,
                backup_at_fault: true,
            })?;
            Ok((dbs, functions))
        }
        Err(r) => {
            cut.stop();
            Err(r)
        }
    }
}

fn merge(dbs: &mut BTreeMap<u64, DbCount>, db: u64, c: DbCount) {
    let d = dbs.entry(db).or_default();
    d.restored += c.restored;
    d.counted += c.counted;
    d.expired += c.expired;
    d.duplicates += c.duplicates;
}

async fn flush(c: &mut MultiplexedConnection) -> Result<(), Rejected> {
    redis::cmd("FLUSHDB")
        .query_async::<()>(c)
        .await
        .map_err(|e| environment(redis_failure("FLUSHDB on the scratch Redis", e)))
}

/// Sends the segment's pending RESTOREs and judges every answer.
async fn send(c: &mut MultiplexedConnection, s: &mut Segment) -> Result<(), Rejected> {
    if s.keys.is_empty() {
        return Ok(());
    }
    let pipe = std::mem::replace(&mut s.pipe, redis::pipe());
    let keys = std::mem::take(&mut s.keys);
    s.bytes = 0;
    s._permits.clear();
    let replies = c
        .req_packed_commands(&pipe, 0, keys.len())
        .await
        .map_err(|e| environment(redis_failure("RESTORE on the scratch Redis", e)))?;
    for ((key, expired), reply) in keys.iter().zip(replies) {
        match reply {
            Value::ServerError(e) if e.code() == "BUSYKEY" => s.count.duplicates += 1,
            Value::ServerError(e) => return Err(judge(e.into(), key, s.db)),
            _ => {
                s.count.restored += 1;
                if *expired {
                    s.count.expired += 1;
                }
            }
        }
    }
    Ok(())
}

/// Whose fault a refused RESTORE is (see the module's documentation).
fn judge(e: redis::RedisError, key: &[u8], db: u64) -> Rejected {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let key = super::rdb::show_key(key);
    if lower.contains("bad data format") {
        backup(fail(
            FailureReason::Integrity,
            format!(
                "the scratch Redis refuses the payload of key {key} in db {db} as corrupt: {text}"
            ),
        ))
    } else if lower.contains("payload version or checksum are wrong") {
        environment(fail(
            FailureReason::Config,
            format!("the scratch Redis cannot read the payload version of key {key} in db {db} ({text}): run a Redis at VERIFY_REDIS_URL at least as new as the servers backed up"),
        ))
    } else if e.code() == Some("OOM") || lower.starts_with("oom") {
        environment(fail(
            FailureReason::Config,
            format!("the scratch Redis is out of memory restoring db {db}: {text}"),
        ))
    } else {
        environment(fail(
            client_class(&e),
            format!("RESTORE of key {key} in db {db} on the scratch Redis: {text}"),
        ))
    }
}

/// The end of one backup database: the last RESTOREs, DBSIZE against them (with the lease still
/// held, so nobody else wrote there), then the slot flushed for the next.
async fn finish_segment(
    c: &mut MultiplexedConnection,
    lease: &mut MultiplexedConnection,
    slot: &Slot,
    mut s: Segment,
) -> Result<(u64, DbCount), Rejected> {
    send(c, &mut s).await?;
    let counted: u64 = redis::cmd("DBSIZE")
        .query_async(c)
        .await
        .map_err(|e| environment(redis_failure("DBSIZE on the scratch Redis", e)))?;
    match renew(lease, slot).await {
        Ok(true) => {}
        Ok(false) => return Err(environment(lost(slot))),
        Err(e) => {
            return Err(environment(redis_failure(
                "renewing the scratch database's lease",
                e,
            )))
        }
    }
    s.count.counted = counted;
    if counted != s.count.restored {
        return Err(environment(fail(
            FailureReason::Config,
            format!(
                "scratch database {} holds {counted} keys after {} RESTOREs of backup db {}: the scratch Redis evicts keys (maxmemory-policy) or something else writes there",
                slot.db, s.count.restored, s.db
            ),
        )));
    }
    flush(c).await?;
    Ok((s.db, s.count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_of_refused_restores() {
        let err = |code: &str, detail: &str| {
            redis::make_extension_error(code.into(), Some(detail.into()))
        };
        let f = judge(
            redis::RedisError::from((
                redis::ErrorKind::ResponseError,
                "An error was signalled by the server",
                "Bad data format".to_string(),
            )),
            b"k",
            3,
        );
        let r = f;
        assert!(r.backup_at_fault);
        assert_eq!(r.failure.reason, FailureReason::Integrity);
        assert!(
            r.failure.detail.contains("\"k\" in db 3"),
            "{}",
            r.failure.detail
        );
        for (e, reason) in [
            (
                redis::RedisError::from((
                    redis::ErrorKind::ResponseError,
                    "An error was signalled by the server",
                    "DUMP payload version or checksum are wrong".to_string(),
                )),
                FailureReason::Config,
            ),
            (
                err("OOM", "command not allowed when used memory > 'maxmemory'."),
                FailureReason::Config,
            ),
            (
                err(
                    "NOPERM",
                    "this user has no permissions to run the 'restore' command",
                ),
                FailureReason::Config,
            ),
        ] {
            let r = judge(e, b"k", 0);
            assert!(!r.backup_at_fault, "{}", r.failure.detail);
            assert_eq!(r.failure.reason, reason, "{}", r.failure.detail);
        }
    }

    #[test]
    fn the_scratch_url_names_no_database() {
        assert!(ScratchRedis::new(&Secret::new("redis://:pw@scratch:6379")).is_ok());
        assert!(ScratchRedis::new(&Secret::new("redis://scratch/2")).is_err());
        assert!(ScratchRedis::new(&Secret::new("http://scratch")).is_err());
    }
}
