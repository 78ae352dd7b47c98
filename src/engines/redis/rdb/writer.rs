//! [`RdbWriter`]: an RDB stream from DUMP payloads (keyspace mode).

use super::*;

/// Writes an RDB stream from `DUMP` payloads and absolute expiries, for the keyspace-mode dump
/// (SCAN + DUMP + PTTL with the tenant's own rights). Every byte appended goes through the
/// running CRC64, so [`finish`](Self::finish) seals the stream like a server would.
#[derive(Debug, Clone)]
pub struct RdbWriter {
    version: u16,
    crc: u64,
}

impl RdbWriter {
    /// A writer for RDB `version`: use [`payload_version`] of the first DUMP (payloads with a
    /// newer footer are refused, as a server would refuse to load them).
    pub fn new(version: u16) -> Self {
        Self { version, crc: 0 }
    }

    pub(super) fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.crc = crc64(self.crc, bytes);
        out.extend_from_slice(bytes);
    }

    pub(super) fn emit_len(&mut self, n: u64, out: &mut Vec<u8>) {
        // rdbSaveLen
        if n < 1 << 6 {
            self.emit(&[n as u8], out);
        } else if n < 1 << 14 {
            self.emit(&[0x40 | (n >> 8) as u8, n as u8], out);
        } else if let Ok(n32) = u32::try_from(n) {
            self.emit(&[0x80], out);
            self.emit(&n32.to_be_bytes(), out);
        } else {
            self.emit(&[0x81], out);
            self.emit(&n.to_be_bytes(), out);
        }
    }

    pub(super) fn emit_string(&mut self, s: &[u8], out: &mut Vec<u8>) {
        self.emit_len(s.len() as u64, out);
        self.emit(s, out);
    }

    /// `REDIS%04d` and an AUX field recording that the stream was written in keyspace mode.
    pub fn header(&mut self, out: &mut Vec<u8>) {
        let magic = format!("REDIS{:04}", self.version);
        self.emit(magic.as_bytes(), out);
        self.aux(b"backup-worker-mode", b"keyspace", out);
    }

    /// An AUX field (loaders skip the ones they do not know).
    pub fn aux(&mut self, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
        self.emit(&[OP_AUX], out);
        self.emit_string(key, out);
        self.emit_string(value, out);
    }

    /// Switches the database of the keys that follow.
    pub fn select_db(&mut self, db: u64, out: &mut Vec<u8>) {
        self.emit(&[OP_SELECTDB], out);
        self.emit_len(db, out);
    }

    /// One key from its `DUMP` payload: the payload's CRC64 and footer version (≤ the writer's)
    /// are verified and its value walked to the byte, then
    /// `[EXPIRETIME_MS ms] type key value` is appended. Nothing is appended on error.
    #[cfg(test)]
    pub fn key(
        &mut self,
        key: &[u8],
        expire_at_ms: Option<i64>,
        dump_payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RdbError> {
        let value = self.key_head(key, expire_at_ms, dump_payload, out)?;
        out.extend_from_slice(value);
        Ok(())
    }

    /// [`key`](Self::key) without copying the value: appends `[EXPIRETIME_MS ms] type key` and
    /// returns the value's bytes (a slice of `dump_payload`, already in the stream's CRC64),
    /// which the caller writes right after `out` — a large value is written once, never gathered.
    pub fn key_head<'p>(
        &mut self,
        key: &[u8],
        expire_at_ms: Option<i64>,
        dump_payload: &'p [u8],
        out: &mut Vec<u8>,
    ) -> Result<&'p [u8], RdbError> {
        let version = verify_payload(dump_payload)?;
        if version > self.version {
            return Err(format_err(format!(
                "DUMP payload of key {} has RDB version {version}, newer than the stream's {}",
                show_key(key),
                self.version
            )));
        }
        let value = &dump_payload[..dump_payload.len() - 10];
        let Some((&t, body)) = value.split_first() else {
            return Err(format_err(format!(
                "DUMP payload of key {} has no value",
                show_key(key)
            )));
        };
        // Walk the value so a stream we write always reads back: exactly `body`, nothing more.
        let mut src = Src::new(body, 4096, false);
        cut_value(&mut src, t, &mut Discard(0)).map_err(|e| match e {
            RdbError::Format(msg) => format_err(format!(
                "DUMP payload of key {} is malformed: {msg}",
                show_key(key)
            )),
            other => other,
        })?;
        if src.offset() != body.len() as u64 {
            return Err(format_err(format!(
                "DUMP payload of key {} is malformed: its value ends at byte {} of {}",
                show_key(key),
                src.offset(),
                body.len()
            )));
        }
        if let Some(ms) = expire_at_ms {
            self.emit(&[OP_EXPIRETIME_MS], out);
            self.emit(&ms.to_le_bytes(), out);
        }
        self.emit(&[t], out);
        self.emit_string(key, out);
        self.crc = crc64(self.crc, body);
        Ok(body)
    }

    /// The EOF opcode and the CRC64 (LE) of the whole stream.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.emit(&[OP_EOF], out);
        out.extend_from_slice(&self.crc.to_le_bytes());
    }
}
