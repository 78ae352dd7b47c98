//! [`RdbReader`]: the pull parser that cuts DUMP payloads out of an RDB stream.

use super::*;

/// One key of an RDB stream, ready for `RESTORE key ttl payload ABSTTL REPLACE` in `db`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub db: u64,
    pub key: Vec<u8>,
    /// Absolute expiry in Unix milliseconds (`EXPIRETIME` seconds are converted).
    pub expire_at_ms: Option<i64>,
    /// The `TYPE` name: string, list, set, zset, hash or stream.
    pub type_name: &'static str,
    /// Exactly what `DUMP key` returned on the writing server: type byte, the value's bytes,
    /// the file's RDB version (u16 LE) and the CRC64 (LE).
    pub payload: Vec<u8>,
}

/// What [`RdbReader::next_item`] yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdbItem {
    /// An AUX field (`redis-ver`, `ctime`, …), decoded.
    Aux {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The database of the keys that follow.
    SelectDb(u64),
    /// The size hints of the current database.
    ResizeDb {
        size: u64,
        expires: u64,
    },
    Key(Entry),
    /// One function library as a `FUNCTION RESTORE` payload (FUNCTION2 opcode + code string +
    /// RDB version + CRC64, as `FUNCTION DUMP` builds it).
    Function {
        payload: Vec<u8>,
    },
}

enum ReaderState {
    Items,
    Done,
    Failed,
}

/// A pull parser over an RDB stream (fed by a gzip decoder on a blocking thread). Memory: a
/// 64 KiB read buffer plus the one key being cut, whatever the stream's size.
pub struct RdbReader<R: Read> {
    src: Src<R>,
    version: u16,
    db: u64,
    /// An expiry opcode's value, waiting for its key (Redis keeps it across other opcodes).
    pending_expire: Option<i64>,
    state: ReaderState,
}

impl<R: Read> RdbReader<R> {
    /// Reads and checks the `REDIS` + 4-digit header.
    pub fn new(r: R) -> Result<Self, RdbError> {
        let mut src = Src::new(r, READ_CHUNK, true);
        let mut header = Vec::with_capacity(9);
        while header.len() < 9 {
            if !src.fill()? {
                break;
            }
            header.push(src.byte()?);
        }
        let version = parse_header(&header)?;
        Ok(Self {
            src,
            version,
            db: 0,
            pending_expire: None,
            state: ReaderState::Items,
        })
    }

    /// The RDB version from the header; every payload's footer carries it.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The next item, or `None` once the EOF opcode and a matching (or all-zero) checksum have
    /// been read and nothing follows them. After an error every call fails.
    pub fn next_item(&mut self) -> Result<Option<RdbItem>, RdbError> {
        match self.state {
            ReaderState::Done => return Ok(None),
            ReaderState::Failed => {
                return Err(format_err(
                    "the RDB reader already failed and cannot continue".to_string(),
                ))
            }
            ReaderState::Items => {}
        }
        let item = self.step();
        match &item {
            Err(_) => self.state = ReaderState::Failed,
            Ok(None) => self.state = ReaderState::Done,
            Ok(Some(_)) => {}
        }
        item
    }

    fn step(&mut self) -> Result<Option<RdbItem>, RdbError> {
        let mut skip = Discard(0);
        loop {
            let at = self.src.offset();
            let op = self.src.byte()?;
            match op {
                OP_EXPIRETIME_MS => {
                    self.pending_expire = Some(i64::from_le_bytes(self.src.array()?));
                }
                OP_EXPIRETIME => {
                    let secs = i32::from_le_bytes(self.src.array()?);
                    self.pending_expire = Some(i64::from(secs) * 1000);
                }
                OP_FREQ => {
                    self.src.byte()?;
                }
                OP_IDLE => {
                    self.src.len_value_to(&mut skip)?;
                }
                OP_SLOT_INFO => {
                    // slot id, slot size, expires slot size (7.4+, cluster mode).
                    for _ in 0..3 {
                        self.src.len_value_to(&mut skip)?;
                    }
                }
                OP_SELECTDB => {
                    self.db = self.src.len_value_to(&mut skip)?;
                    return Ok(Some(RdbItem::SelectDb(self.db)));
                }
                OP_RESIZEDB => {
                    let size = self.src.len_value_to(&mut skip)?;
                    let expires = self.src.len_value_to(&mut skip)?;
                    return Ok(Some(RdbItem::ResizeDb { size, expires }));
                }
                OP_AUX => {
                    let key = self.src.string_decoded()?;
                    let value = self.src.string_decoded()?;
                    return Ok(Some(RdbItem::Aux { key, value }));
                }
                OP_MODULE_AUX => {
                    let id = self.src.len_value_to(&mut skip)?;
                    return Err(RdbError::Module {
                        name: module_name(id),
                    });
                }
                OP_FUNCTION_PRE_GA => {
                    return Err(format_err(format!(
                        "unsupported RDB stream: pre-GA function data (Redis 7.0 rc1/rc2) at \
                         byte offset {at}"
                    )));
                }
                OP_FUNCTION2 => {
                    let mut payload = vec![OP_FUNCTION2];
                    self.src.string_to(&mut payload)?;
                    seal_payload(&mut payload, self.version);
                    return Ok(Some(RdbItem::Function { payload }));
                }
                OP_EOF => {
                    self.finish_stream()?;
                    return Ok(None);
                }
                t => {
                    let Some(type_name) = type_name(t) else {
                        if t == T_MODULE_PRE_GA || t == T_MODULE_2 {
                            // Name the module even though its key is never returned.
                            self.src.string_decoded()?;
                            let id = self.src.len_value_to(&mut skip)?;
                            return Err(RdbError::Module {
                                name: module_name(id),
                            });
                        }
                        return Err(format_err(format!(
                            "corrupt RDB stream: unknown opcode or value type {t} at byte \
                             offset {at}"
                        )));
                    };
                    let key = self.src.string_decoded()?;
                    let mut payload = vec![t];
                    let cut = cut_value(&mut self.src, t, &mut payload).map_err(|e| match e {
                        RdbError::Format(msg) => format_err(format!(
                            "{msg} (in the {type_name} value of key {} in db {})",
                            show_key(&key),
                            self.db
                        )),
                        other => other,
                    })?;
                    let expire_at_ms = self.pending_expire.take();
                    // Redis drops empty collections on load (#8453); so do we.
                    if let Cut::Value = cut {
                        seal_payload(&mut payload, self.version);
                        return Ok(Some(RdbItem::Key(Entry {
                            db: self.db,
                            key,
                            expire_at_ms,
                            type_name,
                            payload,
                        })));
                    }
                }
            }
        }
    }

    /// After the EOF opcode: the checksum (RDB ≥ 5) must match or be zero, and nothing may
    /// follow it.
    fn finish_stream(&mut self) -> Result<(), RdbError> {
        if self.version >= 5 {
            let actual = self.src.crc_now();
            let expected = u64::from_le_bytes(self.src.array()?);
            if expected != 0 && expected != actual {
                return Err(RdbError::Checksum { expected, actual });
            }
        }
        if self.src.fill()? {
            return Err(format_err(format!(
                "corrupt RDB stream: data follows the EOF trailer at byte offset {}",
                self.src.offset()
            )));
        }
        Ok(())
    }
}
