//! The rewind: the RDB read as a stream, every key cut out as a DUMP payload and RESTOREd.
//!
//! Who may be flushed: only a target whose user may SYNC (it may read the whole instance, so
//! the instance is its own), and only for a backup of the whole instance. A keyspace-mode backup,
//! or a user that may not SYNC (a pooled tenant — whose key patterns do not stop FLUSHDB, a
//! command without keys), gets exactly its own keys removed instead: SCAN, one UNLINK per key,
//! other tenants' keys answering `NOPERM` and staying.
//!
//! Memory is bounded in bytes whatever the values' sizes: the blocking reader cuts one key at a
//! time and waits for room in a byte budget ([`QUEUE_BYTES`]) shared by the keys queued for the
//! network and the batch being built; a batch is sent once it holds [`BATCH_BYTES`] (a value
//! larger than that is a batch of its own) or nothing more is queued (so the reader never waits
//! for room a batch holds while the batch waits for the reader).

use std::collections::BTreeMap;
use std::io::BufReader;
use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::check::StripEofMarkSync;
use super::classify::client_class;
use super::rdb::{Entry, RdbError, RdbItem, RdbReader};
use super::{connect, is_noperm, keyspace_dbs, now_ms, parse, redis_failure, RedisConnection};
use crate::domain::FailureReason;
use crate::engines::{fail, BackupFile, Failure, RestoreTarget};

/// Keys per SCAN round trip (and per pipelined group of UNLINKs).
const SCAN_COUNT: usize = 500;
/// Bytes of cut keys (payload + name + [`ENTRY_OVERHEAD`]) the reader may hold ahead of the
/// network, the batch being built included. A key larger than the whole budget takes all of it.
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of RESTORE commands sent per pipelined batch (and a cap on keys per batch).
pub(super) const BATCH_BYTES: usize = 4 * 1024 * 1024;
pub(super) const BATCH_KEYS: usize = 1000;
/// What a queued key costs besides its bytes (the entry, the channel slot, the command's args).
const ENTRY_OVERHEAD: usize = 64;
/// Redis' default `proto-max-bulk-len`, assumed when the target will not say.
pub(super) const DEFAULT_PROTO_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
/// The AUX field the worker's keyspace-mode writer puts in the header ([`super::rdb::RdbWriter`]).
const MODE_AUX: &[u8] = b"backup-worker-mode";

/// What the first read of a backup's RDB found, before anything is touched.
#[derive(Debug, Default)]
struct RdbPlan {
    version: u16,
    /// Keys per logical database.
    keys: BTreeMap<u64, u64>,
    /// The key with the smallest payload (it probes the target; kept small, as it is held for
    /// the whole restore).
    probe: Option<Entry>,
    /// The largest payload: (key, bytes).
    largest: Option<(Vec<u8>, usize)>,
    functions: u64,
    /// Written by the worker's keyspace-mode dump (its header's AUX field), not by a server.
    keyspace: bool,
}

pub(super) fn rdb_failure(e: RdbError) -> Failure {
    match e {
        RdbError::Module { name } => fail(
            FailureReason::Config,
            format!("the backup holds keys of the Redis module {name:?}, which the worker cannot restore"),
        ),
        e => fail(
            FailureReason::Integrity,
            format!("the backup is not a readable RDB stream: {e}"),
        ),
    }
}

/// Opens the backup's RDB for a blocking reader (the gzip file decompressed as it is read).
fn open_rdb(backup: &BackupFile) -> Result<RdbReader<impl std::io::Read>, Failure> {
    let gz = backup.open_blocking()?;
    let stripped = StripEofMarkSync::new(gz);
    RdbReader::new(BufReader::with_capacity(128 * 1024, stripped)).map_err(rdb_failure)
}

/// Reads the whole RDB once: databases, key counts, module types, the probe key, the largest key.
async fn plan(backup: &BackupFile) -> Result<RdbPlan, Failure> {
    let backup = backup.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = open_rdb(&backup)?;
        let mut plan = RdbPlan {
            version: reader.version(),
            ..RdbPlan::default()
        };
        while let Some(item) = reader.next_item().map_err(rdb_failure)? {
            match item {
                RdbItem::Key(e) => {
                    *plan.keys.entry(e.db).or_default() += 1;
                    if plan
                        .largest
                        .as_ref()
                        .is_none_or(|(_, n)| e.payload.len() > *n)
                    {
                        plan.largest = Some((e.key.clone(), e.payload.len()));
                    }
                    if plan
                        .probe
                        .as_ref()
                        .is_none_or(|p| e.payload.len() < p.payload.len())
                    {
                        plan.probe = Some(e);
                    }
                }
                RdbItem::Function { .. } => plan.functions += 1,
                RdbItem::Aux { key, value } if key == MODE_AUX => {
                    plan.keyspace = value == b"keyspace";
                }
                _ => {}
            }
        }
        Ok(plan)
    })
    .await
    .map_err(|e| {
        fail(
            FailureReason::Dump,
            format!("reading the backup stopped: {e}"),
        )
    })?
}

/// The verifier's test restore of a Redis backup (DESIGN §11): every key cut out as a DUMP
/// payload, exactly as a restore would, without a server. Keys per logical database, and the
/// function libraries the RDB carries.
pub(crate) async fn count_keys(backup: &BackupFile) -> Result<(BTreeMap<u64, u64>, u64), Failure> {
    let plan = plan(backup).await?;
    Ok((plan.keys, plan.functions))
}

/// Rewinds the target to the backup. Per logical database of the resource (one named database,
/// or every database of the instance): after a probe RESTORE shows the target accepts the
/// backup's payloads, the resource's keys are removed — FLUSHDB for an instance backup into a
/// target whose user may SYNC, otherwise UNLINK of exactly the keys its user may delete — then
/// `RESTORE key <expire> payload ABSTTL REPLACE` for every key.
pub(crate) async fn restore(t: &RestoreTarget<'_>, backup: &BackupFile) -> Result<(), Failure> {
    let target = parse(t.url)?;
    let plan = plan(backup).await?;
    // Which backup database goes where: a one-database resource takes the backup's only
    // database (or its namesake); an instance takes every database as numbered.
    let mapping: BTreeMap<u64, i64> = match target.db {
        Some(n) => {
            let from = if plan.keys.len() <= 1 {
                plan.keys.keys().next().copied().unwrap_or(u64::from(n))
            } else if plan.keys.contains_key(&u64::from(n)) {
                u64::from(n)
            } else {
                return Err(fail(
                    FailureReason::Config,
                    format!(
                        "the backup holds databases {:?} of an instance; the target is database {n} only",
                        plan.keys.keys().collect::<Vec<_>>()
                    ),
                ));
            };
            BTreeMap::from([(from, i64::from(n))])
        }
        None => plan.keys.keys().map(|d| (*d, *d as i64)).collect(),
    };
    let home = i64::from(target.db.unwrap_or(0));
    let mut admin = connect(&target, home, "connecting to the target").await?;

    // Checks before anything is removed: payload size, payload version.
    let limit: u64 = redis::cmd("CONFIG")
        .arg("GET")
        .arg("proto-max-bulk-len")
        .query_async::<Vec<String>>(&mut admin)
        .await
        .ok()
        .and_then(|v| v.get(1)?.parse().ok())
        .unwrap_or(DEFAULT_PROTO_MAX_BULK_LEN);
    if let Some((key, size)) = &plan.largest {
        if *size as u64 > limit {
            return Err(fail(
                FailureReason::Config,
                format!(
                    "key {:?} is {size} bytes, more than the target's proto-max-bulk-len ({limit})",
                    String::from_utf8_lossy(key)
                ),
            ));
        }
    }
    if plan.functions > 0 && target.db.is_some() {
        tracing::info!(
            "function libraries in the backup are not restored into a one-database resource"
        );
    }
    if let Some(first) = plan.probe.as_ref().filter(|f| mapping.contains_key(&f.db)) {
        probe(&target, mapping[&first.db], first, plan.version).await?;
    }
    // A keyspace-mode backup is some tenant's keys, never a whole instance: it is never flushed,
    // whoever the target's user is.
    let flush = !plan.keyspace && may_sync(&target, home).await?;

    // The rewind: empty the resource's databases, then stream every key in.
    let dbs: Vec<i64> = match target.db {
        Some(n) => vec![i64::from(n)],
        None => {
            // Databases holding keys now but none in the backup are emptied too.
            let info: String = redis::cmd("INFO")
                .arg("keyspace")
                .query_async(&mut admin)
                .await
                .unwrap_or_default();
            let mut dbs: Vec<i64> = keyspace_dbs(&info);
            dbs.extend(mapping.values());
            // Without INFO rights (a pooled tenant) the keyspace is unknown: its default
            // database is still the resource's.
            dbs.push(home);
            dbs.sort_unstable();
            dbs.dedup();
            dbs
        }
    };
    drop(admin);
    for db in dbs {
        let mut c = connect(&target, db, "connecting to the target").await?;
        if flush {
            flush_db(&mut c).await?;
        } else {
            unlink_visible(&mut c).await?;
        }
    }
    stream_keys(&target, backup, &mapping, target.db.is_none()).await
}

/// RESTOREs the probe key under a throwaway name (beside it, so a tenant's key pattern allows
/// it): a target that refuses the backup's RDB version fails here, untouched.
async fn probe(
    target: &RedisConnection,
    db: i64,
    first: &Entry,
    version: u16,
) -> Result<(), Failure> {
    let mut c = connect(target, db, "connecting to the target").await?;
    let mut key = first.key.clone();
    key.extend_from_slice(format!(".backup-worker-probe-{}", uuid::Uuid::new_v4()).as_bytes());
    let r: redis::RedisResult<()> = redis::cmd("RESTORE")
        .arg(&key)
        .arg(10_000)
        .arg(first.payload.as_slice())
        .query_async(&mut c)
        .await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&key).query_async(&mut c).await;
    match r {
        Ok(()) => Ok(()),
        // Credentials, reachability, a refused RESTORE: the table's classes.
        Err(e) if client_class(&e) != FailureReason::Dump => {
            Err(redis_failure("probing the target", e))
        }
        Err(e) => Err(fail(
            FailureReason::Config,
            format!(
                "the target Redis cannot accept this backup (RDB version {version}; is it older than the source?): {e}"
            ),
        )),
    }
}

/// Whether the target's user may SYNC — may read the whole instance, which is then its own to
/// flush. Asked without side effects: `ACL DRYRUN <user> SYNC` (Redis 7: `OK`, or the reason it
/// may not), else `MULTI`, then `SYNC` + `DISCARD` (6.2 checks ACLs when queueing: `QUEUED` or
/// `NOPERM`, and nothing runs). Any other answer — no right to ask, 7.x refusing SYNC inside a
/// transaction, MULTI refused — is a no: the UNLINK path then removes the same keys, only slower.
async fn may_sync(target: &RedisConnection, db: i64) -> Result<bool, Failure> {
    let stage = "asking whether the target's user may SYNC";
    let mut c = connect(target, db, "connecting to the target").await?;
    let user = target.user.as_deref().unwrap_or("default");
    match redis::cmd("ACL")
        .arg("DRYRUN")
        .arg(user)
        .arg("SYNC")
        .query_async::<Value>(&mut c)
        .await
    {
        Ok(Value::Okay) => return Ok(true),
        Ok(Value::SimpleString(s)) if s == "OK" => return Ok(true),
        Ok(_) => return Ok(false),
        Err(e)
            if matches!(
                client_class(&e),
                FailureReason::Auth | FailureReason::Unreachable
            ) =>
        {
            return Err(redis_failure(stage, e))
        }
        Err(_) => {}
    }
    // Never SYNC outside a transaction: only once MULTI is accepted.
    match redis::cmd("MULTI").query_async::<Value>(&mut c).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                client_class(&e),
                FailureReason::Auth | FailureReason::Unreachable
            ) =>
        {
            return Err(redis_failure(stage, e))
        }
        Err(_) => return Ok(false),
    }
    let mut p = redis::pipe();
    p.cmd("SYNC").cmd("DISCARD");
    let replies = c
        .req_packed_commands(&p, 0, 2)
        .await
        .map_err(|e| redis_failure(stage, e))?;
    Ok(matches!(replies.first(), Some(Value::SimpleString(s)) if s == "QUEUED"))
}

/// FLUSHDB (a user that may SYNC, an instance backup); a refusal falls back to UNLINK.
async fn flush_db(c: &mut MultiplexedConnection) -> Result<(), Failure> {
    match redis::cmd("FLUSHDB").query_async::<()>(c).await {
        Ok(()) => Ok(()),
        Err(e) if is_noperm(&e) => unlink_visible(c).await.map(drop),
        Err(e) => Err(redis_failure("FLUSHDB on the target", e)),
    }
}

/// Removes the keys of the connection's database that its user may delete, and no other:
/// SCAN returns every key whatever the user's key patterns, so each is UNLINKed on its own
/// (pipelined per SCAN page) and a key answering NOPERM — another tenant's, or one this user may
/// only read — stays. Returns how many keys were removed.
async fn unlink_visible(c: &mut MultiplexedConnection) -> Result<u64, Failure> {
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(c)
            .await
            .map_err(|e| redis_failure("SCAN on the target", e))?;
        if !keys.is_empty() {
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("UNLINK").arg(k);
            }
            let replies = c
                .req_packed_commands(&p, 0, keys.len())
                .await
                .map_err(|e| redis_failure("UNLINK on the target", e))?;
            for r in replies {
                match r {
                    Value::Int(n) => removed += n as u64,
                    Value::ServerError(e) if e.code() == "NOPERM" => {}
                    Value::ServerError(e) => {
                        return Err(redis_failure("UNLINK on the target", e.into()))
                    }
                    _ => {}
                }
            }
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// One pipelined batch of RESTOREs for one database, with the budget its keys hold.
struct Batch {
    db: i64,
    pipe: redis::Pipeline,
    bytes: usize,
    keys: usize,
    _permits: Vec<OwnedSemaphorePermit>,
}

async fn send(
    target: &RedisConnection,
    conns: &mut BTreeMap<i64, MultiplexedConnection>,
    batch: Batch,
) -> Result<(), Failure> {
    if batch.keys == 0 {
        return Ok(());
    }
    let c = match conns.entry(batch.db) {
        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(connect(target, batch.db, "connecting to the target").await?)
        }
    };
    batch
        .pipe
        .query_async::<()>(c)
        .await
        .map_err(|e| redis_failure("RESTORE on the target", e))
}

/// A cut item on its way to the network, holding its share of the byte budget.
pub(super) enum Item {
    Key(Entry, OwnedSemaphorePermit),
    Function(Vec<u8>, OwnedSemaphorePermit),
}

/// Waits (on the blocking reader's thread) for `bytes` of the budget; `None` once the restore
/// stopped and closed it.
fn reserve(budget: &Arc<Semaphore>, bytes: usize) -> Option<OwnedSemaphorePermit> {
    let n = bytes.clamp(1, QUEUE_BYTES) as u32;
    futures::executor::block_on(budget.clone().acquire_many_owned(n)).ok()
}

/// The RDB read as a stream on a blocking thread, every key cut out and queued within the byte
/// budget ([`QUEUE_BYTES`]): the restore's and the scratch verification's common source.
pub(super) struct CutKeys {
    budget: Arc<Semaphore>,
    pub(super) rx: mpsc::UnboundedReceiver<Result<Item, Failure>>,
    reader: tokio::task::JoinHandle<Result<(), ()>>,
}

impl CutKeys {
    pub(super) fn start(backup: &BackupFile) -> Self {
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        // The budget bounds the bytes; the channel needs no bound of its own.
        let (tx, rx) = mpsc::unbounded_channel::<Result<Item, Failure>>();
        let backup = backup.clone();
        let reader_budget = budget.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut reader = match open_rdb(&backup) {
                Ok(r) => r,
                Err(f) => return tx.send(Err(f)).map_err(drop),
            };
            loop {
                let item = match reader.next_item() {
                    Ok(Some(RdbItem::Key(e))) => {
                        let cost = e.key.len() + e.payload.len() + ENTRY_OVERHEAD;
                        let Some(permit) = reserve(&reader_budget, cost) else {
                            return Err(());
                        };
                        Item::Key(e, permit)
                    }
                    Ok(Some(RdbItem::Function { payload })) => {
                        let Some(permit) = reserve(&reader_budget, payload.len() + ENTRY_OVERHEAD)
                        else {
                            return Err(());
                        };
                        Item::Function(payload, permit)
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(e) => return tx.send(Err(rdb_failure(e))).map_err(drop),
                };
                // The receiver gone means the consumer stopped: stop reading.
                tx.send(Ok(item)).map_err(drop)?;
            }
        });
        Self { budget, rx, reader }
    }

    /// Stops the read early (the consumer failed): a reader waiting for room is released, so it
    /// ends.
    pub(super) fn stop(self) {
        self.budget.close();
    }

    /// Ends the read with the consumer's result: stopped early (a failure), a reader waiting for
    /// room is released so it ends.
    pub(super) async fn finish<T>(self, result: Result<T, Failure>) -> Result<T, Failure> {
        self.budget.close();
        drop(self.rx);
        let value = result?;
        match self.reader.await {
            Ok(_) => Ok(value),
            Err(e) => Err(fail(
                FailureReason::Dump,
                format!("reading the backup stopped: {e}"),
            )),
        }
    }
}

/// Streams the RDB a second time (a blocking reader feeding the byte budget) and RESTOREs every
/// key of a mapped database, in batches bounded in bytes.
async fn stream_keys(
    target: &RedisConnection,
    backup: &BackupFile,
    mapping: &BTreeMap<u64, i64>,
    functions: bool,
) -> Result<(), Failure> {
    let mut cut = CutKeys::start(backup);
    let result = restore_items(target, mapping, functions, &mut cut.rx).await;
    cut.finish(result).await
}

async fn restore_items(
    target: &RedisConnection,
    mapping: &BTreeMap<u64, i64>,
    functions: bool,
    rx: &mut mpsc::UnboundedReceiver<Result<Item, Failure>>,
) -> Result<(), Failure> {
    let mut conns = BTreeMap::new();
    let mut batch: Option<Batch> = None;
    let now = now_ms();
    loop {
        // Nothing cut yet: send what the batch holds before waiting, so the budget its keys
        // hold is never what the reader waits for.
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if let Some(b) = batch.take() {
                    send(target, &mut conns, b).await?;
                }
                match rx.recv().await {
                    Some(item) => item,
                    None => break,
                }
            }
        };
        match item? {
            Item::Function(payload, _permit) if functions => {
                let mut c = connect(target, 0, "connecting to the target").await?;
                let _: () = redis::cmd("FUNCTION")
                    .arg("RESTORE")
                    .arg(payload)
                    .arg("REPLACE")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| redis_failure("FUNCTION RESTORE on the target", e))?;
            }
            Item::Function(..) => {}
            Item::Key(e, permit) => {
                let Some(&db) = mapping.get(&e.db) else {
                    continue;
                };
                let expire = match e.expire_at_ms {
                    Some(at) if at <= now => continue, // expired since the backup
                    Some(at) => at,
                    None => 0,
                };
                if batch
                    .as_ref()
                    .is_some_and(|b| b.db != db || b.bytes >= BATCH_BYTES || b.keys >= BATCH_KEYS)
                {
                    if let Some(full) = batch.take() {
                        send(target, &mut conns, full).await?;
                    }
                }
                let b = batch.get_or_insert_with(|| Batch {
                    db,
                    pipe: redis::pipe(),
                    bytes: 0,
                    keys: 0,
                    _permits: Vec::new(),
                });
                b.bytes += e.key.len() + e.payload.len();
                b.keys += 1;
                b._permits.push(permit);
                b.pipe
                    .cmd("RESTORE")
                    .arg(e.key)
                    .arg(expire)
                    .arg(e.payload)
                    .arg("ABSTTL")
                    .arg("REPLACE")
                    .ignore();
            }
        }
    }
    if let Some(last) = batch.take() {
        send(target, &mut conns, last).await?;
    }
    Ok(())
}
