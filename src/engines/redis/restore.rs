//! The rewind: the RDB read as a stream, every key cut out as a DUMP payload and RESTOREd.

use std::collections::BTreeMap;
use std::io::BufReader;

use tokio::sync::mpsc;

use super::check::StripEofMarkSync;
use super::classify::classify;
use super::rdb::{Entry, RdbError, RdbItem, RdbReader};
use super::{connect, is_noperm, keyspace_dbs, now_ms, parse, redis_failure, RedisConnection};
use crate::domain::FailureReason;
use crate::engines::{fail, BackupFile, Failure, RestoreTarget};

/// Keys per SCAN round trip.
const SCAN_COUNT: usize = 500;

/// What the first read of a backup's RDB found, before anything is touched.
#[derive(Debug, Default)]
struct RdbPlan {
    version: u16,
    /// Keys per logical database.
    keys: BTreeMap<u64, u64>,
    /// The first key (its payload probes the target).
    first: Option<Entry>,
    /// The largest payload: (key, bytes).
    largest: Option<(Vec<u8>, usize)>,
    functions: u64,
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
                    if plan.first.is_none() {
                        plan.first = Some(e);
                    }
                }
                RdbItem::Function { .. } => plan.functions += 1,
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

/// Bytes of RESTORE commands sent per pipelined batch (and a cap on keys per batch).
const BATCH_BYTES: usize = 8 * 1024 * 1024;
const BATCH_KEYS: usize = 1000;
/// Redis' default `proto-max-bulk-len`, assumed when the target will not say.
const DEFAULT_PROTO_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;

/// Rewinds the target to the backup. Per logical database of the resource (one named database,
/// or every database of the instance): after a probe RESTORE shows the target accepts the
/// backup's payloads, FLUSHDB, then `RESTORE key <expire> payload ABSTTL REPLACE` for every key.
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

    // Checks before anything is flushed: payload size, payload version.
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
    if let Some(first) = plan.first.as_ref().filter(|f| mapping.contains_key(&f.db)) {
        probe(&target, mapping[&first.db], first, plan.version).await?;
    }

    // The rewind: flush the resource's databases, then stream every key in.
    let flush: Vec<i64> = match target.db {
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
    for db in flush {
        let mut c = connect(&target, db, "connecting to the target").await?;
        flush_db(&mut c).await?;
    }
    stream_keys(&target, backup, &mapping, target.db.is_none()).await
}

/// RESTOREs the first key under a throwaway name (beside it, so a tenant's key pattern allows
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
        Err(e) if e.is_io_error() || is_noperm(&e) || classify(&e.to_string()) == FailureReason::Auth => {
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

/// FLUSHDB, or for a user that may not (a pooled tenant on a shared instance) UNLINK of every key
/// it may touch: other tenants' keys in the same database answer NOPERM and stay.
async fn flush_db(c: &mut redis::aio::MultiplexedConnection) -> Result<(), Failure> {
    match redis::cmd("FLUSHDB").query_async::<()>(c).await {
        Ok(()) => return Ok(()),
        Err(e) if is_noperm(&e) => {}
        Err(e) => return Err(redis_failure("FLUSHDB on the target", e)),
    }
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(c)
            .await
            .map_err(|e| redis_failure("SCAN on the target", e))?;
        for k in keys {
            match redis::cmd("UNLINK").arg(&k).query_async::<i64>(c).await {
                Ok(_) => {}
                Err(e) if is_noperm(&e) => {}
                Err(e) => return Err(redis_failure("UNLINK on the target", e)),
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// One pipelined batch of RESTOREs for one database.
struct Batch {
    db: i64,
    pipe: redis::Pipeline,
    bytes: usize,
    keys: usize,
}

async fn send(
    target: &RedisConnection,
    conns: &mut BTreeMap<i64, redis::aio::MultiplexedConnection>,
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

/// Streams the RDB a second time (a blocking reader feeding a bounded channel) and RESTOREs every
/// key of a mapped database, in batches bounded in bytes.
async fn stream_keys(
    target: &RedisConnection,
    backup: &BackupFile,
    mapping: &BTreeMap<u64, i64>,
    functions: bool,
) -> Result<(), Failure> {
    enum Item {
        Key(Entry),
        Function(Vec<u8>),
    }
    let (tx, mut rx) = mpsc::channel::<Result<Item, Failure>>(64);
    let backup = backup.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut reader = match open_rdb(&backup) {
            Ok(r) => r,
            Err(f) => return tx.blocking_send(Err(f)).map_err(drop),
        };
        loop {
            let item = match reader.next_item() {
                Ok(Some(RdbItem::Key(e))) => Item::Key(e),
                Ok(Some(RdbItem::Function { payload })) => Item::Function(payload),
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return tx.blocking_send(Err(rdb_failure(e))).map_err(drop),
            };
            // The receiver gone means the restore stopped: stop reading.
            tx.blocking_send(Ok(item)).map_err(drop)?;
        }
    });
    let mut conns = BTreeMap::new();
    let mut batch: Option<Batch> = None;
    let now = now_ms();
    while let Some(item) = rx.recv().await {
        match item? {
            Item::Function(payload) if functions => {
                let mut c = connect(target, 0, "connecting to the target").await?;
                let _: () = redis::cmd("FUNCTION")
                    .arg("RESTORE")
                    .arg(payload)
                    .arg("REPLACE")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| redis_failure("FUNCTION RESTORE on the target", e))?;
            }
            Item::Function(_) => {}
            Item::Key(e) => {
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
                });
                b.bytes += e.key.len() + e.payload.len();
                b.keys += 1;
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
    match reader.await {
        Ok(_) => Ok(()),
        Err(e) => Err(fail(
            FailureReason::Dump,
            format!("reading the backup stopped: {e}"),
        )),
    }
}
