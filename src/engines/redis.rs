//! Redis: the dump in its two modes, the restore, and the error dialect (DESIGN §5, §6).
//!
//! - **Instance mode**: `redis-cli --rdb -` streams the server's point-in-time RDB of the whole
//!   instance, when the resource's user may run SYNC (asked up front: `MULTI`, `SYNC`, `DISCARD`
//!   — a refused SYNC answers `NOPERM` at queue time and nothing is ever synced).
//! - **Keyspace mode**: for pooled tenants whose ACL user may not SYNC, and for one-database
//!   resources (`redis://…/N`), the worker SCANs the keys it may see, DUMPs each with its PTTL and
//!   writes an RDB stream itself ([`rdb::RdbWriter`](super::rdb::RdbWriter)): one stored format.
//! - **Restore**: the RDB is read as a stream ([`rdb::RdbReader`](super::rdb::RdbReader)) and
//!   every key's value is cut out as a DUMP payload and `RESTORE … ABSTTL REPLACE`d, pipelined in
//!   batches bounded in bytes. No private server, no decompressed copy on disk; memory is bounded
//!   by one batch, whatever the dataset's size.
//!
//! The password travels in REDISCLI_AUTH (or the client's AUTH), the (non-secret) ACL user in
//! `--user`, `--tls` for rediss://.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use redis::aio::ConnectionLike;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::rdb::{payload_version, Entry, RdbError, RdbItem, RdbReader, RdbWriter};
use super::{
    base_env, fail, host_port, percent_decode, problem, split_url, BackupFile, ConfigProblem, Dump,
    DumpPlan, Failure, RestoreTarget, ToolCommand,
};
use crate::classify::Dialect;
use crate::domain::FailureReason;
use crate::secret::Secret;

/// redis-cli and the server's replies.
const DIALECT: Dialect = Dialect {
    auth: &[
        "wrongpass",
        "noauth",
        "invalid username-password pair",
        "auth failed",
        "invalid password",
    ],
    unreachable: &["could not connect to redis", "loading redis is loading"],
};

/// The failure class of a Redis tool's non-zero exit (or a server's error reply).
pub fn classify(stderr: &str) -> FailureReason {
    crate::classify::classify(stderr, &DIALECT)
}

/// `REDIS` + version, the EOF opcode, and the CRC64 of the whole stream ([`rdb`](super::rdb)).
#[derive(Default)]
pub(crate) struct RdbStreamCheck {
    check: super::rdb::RdbCheck,
    mark: EofMark,
}

impl crate::pipeline::StreamCheck for RdbStreamCheck {
    fn update(&mut self, bytes: &[u8]) {
        let mut out = Vec::with_capacity(bytes.len() + EOF_MARK_LEN);
        self.mark.push(bytes, &mut out);
        self.check.update(&out);
    }

    fn finish(mut self: Box<Self>) -> Result<String, String> {
        let tail = std::mem::take(&mut self.mark).finish();
        self.check.update(&tail);
        let s = self.check.finish().map_err(|e| e.to_string())?;
        Ok(format!(
            "RDB version {}, {} bytes",
            s.version, s.total_bytes
        ))
    }
}

/// Length of the EOF mark of a diskless replication transfer.
const EOF_MARK_LEN: usize = 40;

/// Drops the 40-hex-character EOF mark a diskless SYNC ends with. `redis-cli --rdb -` cannot
/// truncate stdout as it truncates a file, so its stream is the RDB followed by that mark (Redis
/// 7 replicates diskless by default). A real RDB ends with a binary CRC64, which is never 40 hex
/// characters in a row. Holds back the last 40 bytes until the end.
#[derive(Default)]
pub(crate) struct EofMark {
    tail: Vec<u8>,
}

impl EofMark {
    /// Appends to `out` everything but the last 40 bytes seen so far.
    pub(crate) fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.tail.extend_from_slice(input);
        if self.tail.len() > EOF_MARK_LEN {
            let cut = self.tail.len() - EOF_MARK_LEN;
            out.extend_from_slice(&self.tail[..cut]);
            self.tail.drain(..cut);
        }
    }

    /// The held-back bytes, unless they are the mark.
    pub(crate) fn finish(self) -> Vec<u8> {
        let is_mark = self.tail.len() == EOF_MARK_LEN
            && self
                .tail
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if is_mark {
            Vec::new()
        } else {
            self.tail
        }
    }
}

/// [`EofMark`] over an async stream (the backup's raw stream from redis-cli).
pub(crate) struct StripEofMark<R> {
    inner: R,
    mark: Option<EofMark>,
    ready: Vec<u8>,
    at: usize,
}

impl<R> StripEofMark<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            mark: Some(EofMark::default()),
            ready: Vec::new(),
            at: 0,
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StripEofMark<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                return Poll::Ready(Ok(()));
            }
            let Some(mark) = this.mark.as_mut() else {
                return Poll::Ready(Ok(())); // EOF
            };
            let mut chunk = [0u8; 64 * 1024];
            let mut rb = tokio::io::ReadBuf::new(&mut chunk);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    this.ready.clear();
                    this.at = 0;
                    if rb.filled().is_empty() {
                        if let Some(m) = this.mark.take() {
                            this.ready = m.finish();
                        }
                    } else {
                        mark.push(rb.filled(), &mut this.ready);
                    }
                }
            }
        }
    }
}

/// [`EofMark`] over a blocking reader (the restore's second look at backups taken before the
/// mark was stripped).
struct StripEofMarkSync<R> {
    inner: R,
    mark: Option<EofMark>,
    ready: Vec<u8>,
    at: usize,
}

impl<R: std::io::Read> std::io::Read for StripEofMarkSync<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.at < self.ready.len() {
                let n = buf.len().min(self.ready.len() - self.at);
                buf[..n].copy_from_slice(&self.ready[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            let Some(mark) = self.mark.as_mut() else {
                return Ok(0);
            };
            let mut chunk = [0u8; 64 * 1024];
            let n = self.inner.read(&mut chunk)?;
            self.ready.clear();
            self.at = 0;
            if n == 0 {
                if let Some(m) = self.mark.take() {
                    self.ready = m.finish();
                }
            } else {
                mark.push(&chunk[..n], &mut self.ready);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisConnection {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: bool,
    /// The one logical database the resource is (`redis://…/N`); `None`: the whole instance.
    pub db: Option<u32>,
}

pub(crate) fn parse(url: &Secret) -> Result<RedisConnection, ConfigProblem> {
    let parts = split_url(url.expose())?;
    let tls = match parts.scheme {
        "redis" => false,
        "rediss" => true,
        _ => {
            return Err(problem(
                "redis connection URL must start with redis:// or rediss://",
            ))
        }
    };
    if parts.hosts.is_empty() || parts.hosts.contains(',') {
        return Err(problem("redis connection URL must name exactly one host"));
    }
    if let Some((k, _)) = parts.query.first() {
        return Err(problem(format!(
            "redis connection URL has an unsupported parameter {k:?}"
        )));
    }
    let (host, port) = host_port(parts.hosts, 6379)?;
    let db = match parts.path {
        "" => None,
        p => Some(
            p.parse::<u32>()
                .map_err(|_| problem("redis connection URL database must be a number"))?,
        ),
    };
    Ok(RedisConnection {
        host: percent_decode(&host)?,
        port,
        user: parts.user.map(percent_decode).transpose()?,
        password: parts
            .password
            .map(percent_decode)
            .transpose()?
            .filter(|p| !p.is_empty()),
        tls,
        db,
    })
}

/// Connection arguments (no secrets) and the environment for redis-cli.
pub(crate) fn cli_connection(conn: &RedisConnection, cmd: &mut ToolCommand) {
    cmd.args.extend([
        "-h".into(),
        conn.host.clone().into(),
        "-p".into(),
        conn.port.to_string().into(),
    ]);
    if conn.tls {
        cmd.args.push("--tls".into());
    }
    if let Some(user) = &conn.user {
        cmd.args.extend(["--user".into(), user.into()]);
    }
    if let Some(pw) = &conn.password {
        cmd.env.push(("REDISCLI_AUTH".into(), pw.into()));
        cmd.secrets.push(pw.clone());
    }
    cmd.args.push("--no-auth-warning".into());
}

/// `redis-cli --rdb -`: the instance's RDB on stdout.
pub(super) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<Dump, ConfigProblem> {
    let conn = parse(url)?;
    let mut cmd = ToolCommand::new("redis-cli", base_env(temp_dir));
    cmd.secrets.push(url.expose().to_owned());
    cli_connection(&conn, &mut cmd);
    cmd.args.extend(["--rdb".into(), "-".into()]);
    Ok(Dump {
        plan: DumpPlan::Tool(cmd),
        extension: "rdb",
        mode: Some("instance"),
        fallback: None,
    })
}

/// Instance mode when the resource is the whole instance; keyspace mode for one database, and
/// for a user the server refuses SYNC. That refusal is seen on the first attempt: `NOPERM` before
/// redis-cli writes a byte (no cheaper probe exists for users without ACL rights: 7.x checks
/// SYNC's no-MULTI flag before its ACL, and `ACL DRYRUN` is itself an admin command).
pub(super) async fn prepare_dump(url: &Secret, temp_dir: &Path) -> Result<Dump, Failure> {
    let conn = parse(url)?;
    if conn.db.is_some() {
        return Ok(Dump {
            plan: DumpPlan::Keyspace(KeyspaceDump { conn }),
            extension: "rdb",
            mode: Some("keyspace"),
            fallback: None,
        });
    }
    let mut dump = dump_command(url, temp_dir)?;
    dump.fallback = Some(KeyspaceDump { conn });
    Ok(dump)
}

fn is_noperm(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("NOPERM")
}

/// RDB version written when a keyspace dump finds no key to take it from (Redis 6.2's, which
/// every supported server reads).
const EMPTY_KEYSPACE_RDB_VERSION: u16 = 9;
/// Keys per SCAN round trip, and per pipelined DUMP group.
const SCAN_COUNT: usize = 500;
const DUMP_GROUP: usize = 32;
/// Bytes of RDB stream gathered before they are handed to the pipeline.
const WRITE_CHUNK: usize = 256 * 1024;

/// The worker's own dump of the keys the resource's user may see (DESIGN §5 keyspace mode).
pub struct KeyspaceDump {
    conn: RedisConnection,
}

impl KeyspaceDump {
    /// Starts writing the RDB stream; the returned reader is the raw dump.
    pub(super) fn start(
        self,
    ) -> (
        tokio::task::JoinHandle<Result<(), Failure>>,
        tokio::io::DuplexStream,
    ) {
        let (reader, writer) = tokio::io::duplex(WRITE_CHUNK);
        (tokio::spawn(self.write(writer)), reader)
    }

    async fn write(self, mut out: tokio::io::DuplexStream) -> Result<(), Failure> {
        let dbs = match self.conn.db {
            Some(db) => vec![i64::from(db)],
            None => {
                let mut c = connect(&self.conn, 0, "connecting to the resource").await?;
                let info: redis::RedisResult<String> =
                    redis::cmd("INFO").arg("keyspace").query_async(&mut c).await;
                // A user without INFO rights sees its default database.
                info.map(|i| keyspace_dbs(&i)).unwrap_or_else(|_| vec![0])
            }
        };
        let pipe_io =
            |e: std::io::Error| fail(FailureReason::Dump, format!("writing the RDB stream: {e}"));
        let mut buf = Vec::with_capacity(2 * WRITE_CHUNK);
        let mut writer: Option<RdbWriter> = None;
        let mut keys = 0u64;
        for db in dbs {
            let mut c = connect(&self.conn, db, "connecting to the resource").await?;
            let mut selected = false;
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| redis_failure("SCAN", e))?;
                // DUMPs in small groups, the stream written out as it grows: memory is a few
                // values, not a SCAN batch of them.
                for group in batch.chunks(DUMP_GROUP) {
                    let mut read = redis::pipe();
                    for k in group {
                        read.cmd("DUMP").arg(k).cmd("PTTL").arg(k);
                    }
                    // Replies one by one: on a shared instance SCAN also returns other
                    // tenants' keys, whose DUMP answers NOPERM — not ours, skipped.
                    let values = c
                        .req_packed_commands(&read, 0, 2 * group.len())
                        .await
                        .map_err(|e| redis_failure("DUMP", e))?;
                    let now = now_ms();
                    for (k, pair) in group.iter().zip(values.chunks(2)) {
                        let (redis::Value::BulkString(payload), redis::Value::Int(pttl)) =
                            (&pair[0], &pair[1])
                        else {
                            if let redis::Value::ServerError(e) = &pair[0] {
                                if e.code() != "NOPERM" {
                                    return Err(fail(
                                        FailureReason::Dump,
                                        format!("DUMP: {} {}", e.code(), e.details().unwrap_or("")),
                                    ));
                                }
                            }
                            // Not ours (NOPERM), or it vanished between SCAN and DUMP.
                            continue;
                        };
                        let expire_at_ms = match *pttl {
                            -1 => None,
                            t if t >= 0 => Some(now + t),
                            _ => continue,
                        };
                        let w = writer.get_or_insert_with(|| {
                            let version =
                                payload_version(payload).unwrap_or(EMPTY_KEYSPACE_RDB_VERSION);
                            let mut w = RdbWriter::new(version);
                            w.header(&mut buf);
                            w
                        });
                        if !selected {
                            w.select_db(db as u64, &mut buf);
                            selected = true;
                        }
                        w.key(k, expire_at_ms, payload, &mut buf)
                            .map_err(|e| match e {
                                RdbError::Module { .. } => rdb_failure(e),
                                e => fail(
                                    FailureReason::Dump,
                                    format!("a DUMP payload is unusable: {e}"),
                                ),
                            })?;
                        keys += 1;
                        if buf.len() >= WRITE_CHUNK {
                            out.write_all(&buf).await.map_err(pipe_io)?;
                            buf.clear();
                        }
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let w = match writer {
            Some(w) => w,
            None => {
                let mut w = RdbWriter::new(EMPTY_KEYSPACE_RDB_VERSION);
                w.header(&mut buf);
                w
            }
        };
        w.finish(&mut buf);
        out.write_all(&buf).await.map_err(pipe_io)?;
        out.shutdown().await.map_err(pipe_io)?;
        tracing::debug!(keys, "keyspace dump written");
        Ok(())
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

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

fn rdb_failure(e: RdbError) -> Failure {
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
    let stripped = StripEofMarkSync {
        inner: gz,
        mark: Some(EofMark::default()),
        ready: Vec::new(),
        at: 0,
    };
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

fn target_info(t: &RedisConnection, db: i64) -> redis::ConnectionInfo {
    let addr = if t.tls {
        redis::ConnectionAddr::TcpTls {
            host: t.host.clone(),
            port: t.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(t.host.clone(), t.port)
    };
    let info = redis::RedisConnectionInfo {
        db,
        username: t.user.clone(),
        password: t.password.clone(),
        ..Default::default()
    };
    redis::ConnectionInfo { addr, redis: info }
}

fn redis_failure(stage: &str, e: redis::RedisError) -> Failure {
    let text = e.to_string();
    let reason = if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        FailureReason::Unreachable
    } else {
        match classify(&text) {
            FailureReason::Auth => FailureReason::Auth,
            _ => FailureReason::Dump,
        }
    };
    fail(reason, format!("{stage}: {text}"))
}

async fn connect(
    t: &RedisConnection,
    db: i64,
    stage: &str,
) -> Result<redis::aio::MultiplexedConnection, Failure> {
    let client = redis::Client::open(target_info(t, db)).map_err(|e| redis_failure(stage, e))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| redis_failure(stage, e))
}

/// The logical databases that hold keys, from `INFO keyspace` ("db3:keys=2,expires=1,…").
fn keyspace_dbs(info: &str) -> Vec<i64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_diskless_eof_mark_is_stripped_and_nothing_else() {
        use tokio::io::AsyncReadExt;
        let rdb: Vec<u8> = b"REDIS0010"
            .iter()
            .copied()
            .chain((0..100_000u32).map(|i| (i % 251) as u8))
            .collect();
        let mark = b"aefe34ff85e53b35359a8e69cc2ed6a9b0dc7944";
        let mut with_mark = rdb.clone();
        with_mark.extend_from_slice(mark);
        for (input, want) in [(&with_mark, &rdb), (&rdb, &rdb)] {
            let mut out = Vec::new();
            StripEofMark::new(&input[..])
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert_eq!(&out, want);
            let mut sync_out = Vec::new();
            std::io::Read::read_to_end(
                &mut StripEofMarkSync {
                    inner: &input[..],
                    mark: Some(EofMark::default()),
                    ready: Vec::new(),
                    at: 0,
                },
                &mut sync_out,
            )
            .unwrap();
            assert_eq!(&sync_out, want);
        }
        // A stream shorter than a mark passes through whole.
        let mut out = Vec::new();
        StripEofMark::new(&b"REDIS"[..])
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"REDIS");
    }

    #[test]
    fn parses_users_tls_ipv6_and_db() {
        let c = parse(&Secret::new("rediss://admin:p%40ss@[::1]:6380/3")).unwrap();
        assert_eq!(
            c,
            RedisConnection {
                host: "::1".into(),
                port: 6380,
                user: Some("admin".into()),
                password: Some("p@ss".into()),
                tls: true,
                db: Some(3)
            }
        );
        let c = parse(&Secret::new("redis://:pw@cache")).unwrap();
        assert_eq!((c.user, c.port, c.db), (None, 6379, None));
        assert!(parse(&Secret::new("redis://h/x")).is_err());
        assert!(parse(&Secret::new("redis://h?ssl=true")).is_err());
        assert!(parse(&Secret::new("memcached://h")).is_err());
    }

    #[test]
    fn password_only_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = dump_command(&Secret::new("rediss://u:topsecret@h:1/0"), dir.path())
            .unwrap()
            .command();
        let argv: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "-h",
                "h",
                "-p",
                "1",
                "--tls",
                "--user",
                "u",
                "--no-auth-warning",
                "--rdb",
                "-"
            ]
        );
        assert!(cmd
            .env
            .iter()
            .any(|(k, v)| k == "REDISCLI_AUTH" && v == "topsecret"));
    }
}
