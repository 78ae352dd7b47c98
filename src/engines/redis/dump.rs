//! The dump in its two modes: `redis-cli --rdb -` (instance) and the worker's own SCAN + DUMP
//! + PTTL writing an RDB stream (keyspace).

use std::path::Path;

use redis::aio::ConnectionLike;
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
    pub(crate) fn start(
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
