//! [`RdbCheck`]: the push structural check of a backup stream.

use super::*;

/// What a passing [`RdbCheck`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdbCheckSummary {
    /// The RDB version from the header.
    pub version: u16,
    /// The stream's length in bytes.
    pub total_bytes: u64,
}

/// The structural check of a Redis backup stream, fed as the bytes pass (any chunking, O(1)
/// memory): it keeps the header, the CRC of everything but the last 8 bytes seen so far, those
/// 8 bytes, and the byte before them (which must be the EOF opcode once the stream ends).
#[derive(Debug, Clone)]
pub struct RdbCheck {
    header: [u8; 9],
    total: u64,
    crc: u64,
    tail: [u8; 8],
    tail_len: usize,
    before_tail: Option<u8>,
}

impl Default for RdbCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl RdbCheck {
    pub fn new() -> Self {
        Self {
            header: [0; 9],
            total: 0,
            crc: 0,
            tail: [0; 8],
            tail_len: 0,
            before_tail: None,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, bytes: &[u8]) {
        if self.total < 9 {
            let at = self.total as usize;
            let n = (9 - at).min(bytes.len());
            self.header[at..at + n].copy_from_slice(&bytes[..n]);
        }
        self.total += bytes.len() as u64;
        if bytes.len() >= 8 {
            // Everything pending and all but the chunk's last 8 bytes are now known not to be
            // the trailer.
            if self.tail_len > 0 {
                self.crc = crc64(self.crc, &self.tail[..self.tail_len]);
                self.before_tail = Some(self.tail[self.tail_len - 1]);
            }
            let split = bytes.len() - 8;
            if split > 0 {
                self.crc = crc64(self.crc, &bytes[..split]);
                self.before_tail = Some(bytes[split - 1]);
            }
            self.tail.copy_from_slice(&bytes[split..]);
            self.tail_len = 8;
        } else {
            let overflow = (self.tail_len + bytes.len()).saturating_sub(8);
            if overflow > 0 {
                self.crc = crc64(self.crc, &self.tail[..overflow]);
                self.before_tail = Some(self.tail[overflow - 1]);
                self.tail.copy_within(overflow..self.tail_len, 0);
                self.tail_len -= overflow;
            }
            self.tail[self.tail_len..self.tail_len + bytes.len()].copy_from_slice(bytes);
            self.tail_len += bytes.len();
        }
    }

    /// Judges the complete stream.
    pub fn finish(self) -> Result<RdbCheckSummary, RdbError> {
        let seen = self.total.min(9) as usize;
        let version = parse_header(&self.header[..seen])?;
        if version < 5 {
            // RDB < 5 (Redis < 2.6) carries no checksum: the stream ends at the EOF opcode,
            // which is all there is to check here (DESIGN §11: such files are valid).
            if self.total < 10 || self.tail[..self.tail_len].last() != Some(&OP_EOF) {
                return Err(format_err(format!(
                    "truncated RDB stream: RDB version {version} (no checksum) must end with the \
                     EOF opcode (0xff) after its 9-byte header; {} bytes do not",
                    self.total
                )));
            }
            return Ok(RdbCheckSummary {
                version,
                total_bytes: self.total,
            });
        }
        if self.total < 18 {
            return Err(format_err(format!(
                "truncated RDB stream: {} bytes cannot hold the 9-byte header and the 9-byte \
                 EOF trailer",
                self.total
            )));
        }
        match self.before_tail {
            Some(OP_EOF) => {}
            other => {
                return Err(format_err(format!(
                    "truncated RDB stream: no EOF opcode (0xff) before the 8-byte checksum at \
                     byte offset {} (found {})",
                    self.total - 9,
                    other.map_or_else(|| "nothing".to_string(), |b| format!("{b:#04x}"))
                )))
            }
        }
        let stored = u64::from_le_bytes(self.tail);
        if stored != 0 && stored != self.crc {
            return Err(RdbError::Checksum {
                expected: stored,
                actual: self.crc,
            });
        }
        Ok(RdbCheckSummary {
            version,
            total_bytes: self.total,
        })
    }
}
