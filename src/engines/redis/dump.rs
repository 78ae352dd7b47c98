//! The dump in its two modes: `redis-cli --rdb -` (instance) and the worker's own SCAN + DUMP
//! + PTTL writing an RDB stream (keyspace).

use std::path::Path;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::Value;
use tokio::io::AsyncWriteExt;

use super::rdb::{payload_version, RdbError, RdbWriter};
use super::restore::rdb_failure;
use super::{cli_connection, connect, keyspace_dbs, now_ms, parse, redis_failure, RedisConnection};
use crate::domain::FailureReason;
use crate::engines::{base_env, fail, ConfigProblem, Dump, DumpPlan, Failure, ToolCommand};
use crate::secret::Secret;

/// `redis-cli --rdb -`: the instance's RDB on stdout.
pub(crate) fn dump_command(url: &Secret, temp_dir: &Path) -> Result<Dump, ConfigProblem> {
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
pub(crate) async fn prepare_dump(url: &Secret, temp_dir: &Path) -> Result<Dump, Failure> {
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

/// RDB version written when a keyspace dump finds no key to take it from (Redis 6.2's, which
/// every supported server reads).
const EMPTY_KEYSPACE_RDB_VERSION: u16 = 9;
/// Keys per SCAN round trip (and per pipelined group of MEMORY USAGE size estimates).
const SCAN_COUNT: usize = 500;
/// A pipelined DUMP group: at most this many estimated bytes (a key larger than that is a group
/// of its own) and this many keys. The replies of one group are what the dump holds in memory.
const DUMP_GROUP_BYTES: u64 = 4 * 1024 * 1024;
const DUMP_GROUP_KEYS: usize = 128;
/// Bytes of RDB stream gathered before they are handed to the pipeline.
const WRITE_CHUNK: usize = 256 * 1024;

/// The worker's own dump of the keys the resource's user may see (DESIGN §5 keyspace mode).
pub struct KeyspaceDump {
    conn: RedisConnection,
}

/// What `MEMORY USAGE` said of a scanned key, before its DUMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    /// About this many bytes (an estimate: sampled for large collections).
    About(u64),
    /// The server will not say (no MEMORY right, an old server): DUMPed alone.
    Unknown,
    /// Not ours (NOPERM on the key: another tenant's) or gone since the SCAN: skipped.
    Skip,
}

/// The RDB stream being written, and where it goes.
struct Stream {
    out: tokio::io::DuplexStream,
    buf: Vec<u8>,
    writer: Option<RdbWriter>,
    keys: u64,
}

fn pipe_io(e: std::io::Error) -> Failure {
    fail(FailureReason::Dump, format!("writing the RDB stream: {e}"))
}

impl Stream {
    /// Appends one key; a value that would overflow the chunk is written straight from the
    /// reply, never copied into the chunk.
    async fn key(
        &mut self,
        db: Option<u64>,
        key: &[u8],
        expire_at_ms: Option<i64>,
        payload: &[u8],
    ) -> Result<(), Failure> {
        let buf = &mut self.buf;
        // The stream takes the RDB version of the first payload.
        let w = self.writer.get_or_insert_with(|| {
            let version = payload_version(payload).unwrap_or(EMPTY_KEYSPACE_RDB_VERSION);
            let mut w = RdbWriter::new(version);
            w.header(buf);
            w
        });
        if let Some(db) = db {
            w.select_db(db, buf);
        }
        let value = w
            .key_head(key, expire_at_ms, payload, buf)
            .map_err(|e| match e {
                RdbError::Module { .. } => rdb_failure(e),
                e => fail(
                    FailureReason::Dump,
                    format!("a DUMP payload is unusable: {e}"),
                ),
            })?;
        self.keys += 1;
        if buf.len() + value.len() < WRITE_CHUNK {
            buf.extend_from_slice(value);
            return Ok(());
        }
        self.out.write_all(buf).await.map_err(pipe_io)?;
        buf.clear();
        self.out.write_all(value).await.map_err(pipe_io)
    }

    async fn finish(mut self) -> Result<u64, Failure> {
        let w = match self.writer.take() {
            Some(w) => w,
            None => {
                let mut w = RdbWriter::new(EMPTY_KEYSPACE_RDB_VERSION);
                w.header(&mut self.buf);
                w
            }
        };
        w.finish(&mut self.buf);
        self.out.write_all(&self.buf).await.map_err(pipe_io)?;
        self.out.shutdown().await.map_err(pipe_io)?;
        Ok(self.keys)
    }
}

/// Estimates the size of each scanned key with one pipelined round trip of `MEMORY USAGE`
/// (every value when the user may not ask: [`Size::Unknown`]). `memory_refused` remembers a
/// refused command so later pages do not ask again.
async fn sizes(
    c: &mut MultiplexedConnection,
    keys: &[Vec<u8>],
    memory_refused: &mut bool,
) -> Result<Vec<Size>, Failure> {
    if *memory_refused || keys.is_empty() {
        // (An empty pipeline would wait for a reply that never comes.)
        return Ok(vec![Size::Unknown; keys.len()]);
    }
    let mut p = redis::pipe();
    for k in keys {
        p.cmd("MEMORY").arg("USAGE").arg(k);
    }
    let replies = c
        .req_packed_commands(&p, 0, keys.len())
        .await
        .map_err(|e| redis_failure("MEMORY USAGE", e))?;
    Ok(replies
        .into_iter()
        .map(|r| match r {
            Value::Int(n) => Size::About(n.max(0) as u64),
            Value::Nil => Size::Skip,
            // A key pattern refusing this key (the command itself refused says "run").
            Value::ServerError(e)
                if e.code() == "NOPERM" && e.details().is_some_and(|d| d.contains("keys")) =>
            {
                Size::Skip
            }
            _ => {
                *memory_refused = true;
                Size::Unknown
            }
        })
        .collect())
}

/// Splits a SCAN page into DUMP groups of at most [`DUMP_GROUP_BYTES`] estimated bytes and
/// [`DUMP_GROUP_KEYS`] keys; a key of unknown or larger size is a group of its own.
fn groups<'k>(keys: &'k [Vec<u8>], sizes: &[Size]) -> Vec<Vec<&'k [u8]>> {
    let mut groups: Vec<Vec<&[u8]>> = Vec::new();
    let mut current: Vec<&[u8]> = Vec::new();
    let mut bytes = 0u64;
    for (k, size) in keys.iter().zip(sizes) {
        let n = match size {
            Size::Skip => continue,
            Size::About(n) => *n,
            Size::Unknown => u64::MAX,
        };
        let full = current.len() >= DUMP_GROUP_KEYS || bytes.saturating_add(n) > DUMP_GROUP_BYTES;
        if full && !current.is_empty() {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(k);
        bytes = bytes.saturating_add(n);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

impl KeyspaceDump {
    /// Starts writing the RDB stream; the returned reader is the raw dump.
    pub(crate) fn start(
        self,
    ) -> (
        tokio::task::JoinHandle<Result<(), Failure>>,
        tokio::io::DuplexStream,
    ) {
        let (reader, writer) = tokio::io::duplex(WRITE_CHUNK);
        (tokio::spawn(self.write(writer)), reader)
    }

    async fn write(self, out: tokio::io::DuplexStream) -> Result<(), Failure> {
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
        let mut stream = Stream {
            out,
            buf: Vec::with_capacity(WRITE_CHUNK),
            writer: None,
            keys: 0,
        };
        let mut memory_refused = false;
        for db in dbs {
            let mut c = connect(&self.conn, db, "connecting to the resource").await?;
            let mut selected = false;
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| redis_failure("SCAN", e))?;
                let sizes = sizes(&mut c, &page, &mut memory_refused).await?;
                // DUMPs in groups bounded in bytes, the stream written out as it grows: memory
                // is one group's replies, whatever the values' sizes.
                for group in groups(&page, &sizes) {
                    // The expiry exactly (PEXPIRETIME, 7.0+), or from PTTL and our clock (6.2
                    // answers PEXPIRETIME with an error).
                    let mut read = redis::pipe();
                    for k in &group {
                        read.cmd("DUMP").arg(*k);
                        read.cmd("PEXPIRETIME").arg(*k);
                        read.cmd("PTTL").arg(*k);
                    }
                    // Replies one by one: on a shared instance SCAN also returns other
                    // tenants' keys, whose DUMP answers NOPERM — not ours, skipped.
                    let values = c
                        .req_packed_commands(&read, 0, 3 * group.len())
                        .await
                        .map_err(|e| redis_failure("DUMP", e))?;
                    let now = now_ms();
                    for (k, replies) in group.iter().zip(values.chunks(3)) {
                        let Value::BulkString(payload) = &replies[0] else {
                            if let Value::ServerError(e) = &replies[0] {
                                if e.code() != "NOPERM" {
                                    return Err(redis_failure("DUMP", e.clone().into()));
                                }
                            }
                            // Not ours (NOPERM), or it vanished between SCAN and DUMP.
                            continue;
                        };
                        let expire_at_ms = match (&replies[1], &replies[2]) {
                            (Value::Int(-1), _) => None,
                            (Value::Int(at), _) if *at >= 0 => Some(*at),
                            (Value::ServerError(_), Value::Int(-1)) => None,
                            (Value::ServerError(_), Value::Int(t)) if *t >= 0 => Some(now + t),
                            // Gone (-2) since its DUMP.
                            _ => continue,
                        };
                        let select = (!selected).then_some(db as u64);
                        selected = true;
                        stream.key(select, k, expire_at_ms, payload).await?;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let keys = stream.finish().await?;
        tracing::debug!(keys, "keyspace dump written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_groups_are_bounded_in_bytes() {
        let keys: Vec<Vec<u8>> = (0..8).map(|i| vec![b'k', i]).collect();
        let mb = 1024 * 1024;
        let sizes = [
            Size::About(mb),
            Size::About(mb),
            Size::About(10 * mb), // alone
            Size::Skip,
            Size::About(100),
            Size::Unknown, // alone
            Size::About(3 * mb),
            Size::About(2 * mb),
        ];
        let got: Vec<Vec<u8>> = groups(&keys, &sizes)
            .iter()
            .map(|g| g.iter().map(|k| k[1]).collect())
            .collect();
        assert_eq!(
            got,
            [vec![0, 1], vec![2], vec![4], vec![5], vec![6], vec![7]]
        );
        let many: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let small = vec![Size::About(10); many.len()];
        let lens: Vec<usize> = groups(&many, &small).iter().map(Vec::len).collect();
        assert_eq!(lens, [128, 128, 44]);
    }
}
