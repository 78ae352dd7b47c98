//! The Redis RDB format, as far as backups and restores need it (DESIGN §5, §6). std only.
//!
//! - [`crc64`]: Redis' CRC-64/Jones (reflected, init 0, no final xor), slicing-by-8.
//! - [`RdbCheck`]: the push structural check of a backup stream: `REDIS` + 4 digits up front,
//!   the EOF opcode and the CRC64 of everything before the last 8 bytes at the end.
//! - [`RdbReader`]: a pull parser that cuts every key's value out of an RDB stream as the exact
//!   `DUMP` payload the writing server would have produced (type byte + value bytes copied
//!   verbatim + the file's RDB version + CRC64), so a restore is `RESTORE … ABSTTL REPLACE` with
//!   no private server and at most one key buffered.
//! - [`RdbWriter`]: the reverse for keyspace mode: an RDB stream from `DUMP` payloads.
//!
//! Layout, as in redis/redis `src/rdb.h` / `src/rdb.c` (6.2 → RDB 9, 7.0 → 10, 7.2 → 11,
//! 7.4 → 12): `REDIS%04d`, then opcodes (AUX, SELECTDB, RESIZEDB, SLOT_INFO, FUNCTION2,
//! MODULE_AUX, expiry/IDLE/FREQ prefixes) and `type key value` records, then `0xFF` and the
//! little-endian CRC64 (all zero when the server runs with `rdbchecksum no`). Values are walked,
//! not decoded: only their length prefixes are read.

use std::fmt;
use std::io::{self, Read};

// Opcodes (rdb.h).
const OP_SLOT_INFO: u8 = 244;
const OP_FUNCTION2: u8 = 245;
const OP_FUNCTION_PRE_GA: u8 = 246;
const OP_MODULE_AUX: u8 = 247;
const OP_IDLE: u8 = 248;
const OP_FREQ: u8 = 249;
const OP_AUX: u8 = 250;
const OP_RESIZEDB: u8 = 251;
const OP_EXPIRETIME_MS: u8 = 252;
const OP_EXPIRETIME: u8 = 253;
const OP_SELECTDB: u8 = 254;
const OP_EOF: u8 = 255;

// Value types (rdb.h `RDB_TYPE_*`).
const T_STRING: u8 = 0;
const T_LIST: u8 = 1;
const T_SET: u8 = 2;
const T_ZSET: u8 = 3;
const T_HASH: u8 = 4;
const T_ZSET_2: u8 = 5;
const T_MODULE_PRE_GA: u8 = 6;
const T_MODULE_2: u8 = 7;
const T_HASH_ZIPMAP: u8 = 9;
const T_LIST_ZIPLIST: u8 = 10;
const T_SET_INTSET: u8 = 11;
const T_ZSET_ZIPLIST: u8 = 12;
const T_HASH_ZIPLIST: u8 = 13;
const T_LIST_QUICKLIST: u8 = 14;
const T_STREAM_LISTPACKS: u8 = 15;
const T_HASH_LISTPACK: u8 = 16;
const T_ZSET_LISTPACK: u8 = 17;
const T_LIST_QUICKLIST_2: u8 = 18;
const T_STREAM_LISTPACKS_2: u8 = 19;
const T_SET_LISTPACK: u8 = 20;
const T_STREAM_LISTPACKS_3: u8 = 21;
const T_HASH_METADATA_PRE_GA: u8 = 22;
const T_HASH_LISTPACK_EX_PRE_GA: u8 = 23;
const T_HASH_METADATA: u8 = 24;
const T_HASH_LISTPACK_EX: u8 = 25;

// String encodings after a `11xxxxxx` length byte (rdb.h `RDB_ENC_*`).
const ENC_INT8: u8 = 0;
const ENC_INT16: u8 = 1;
const ENC_INT32: u8 = 2;
const ENC_LZF: u8 = 3;

// quicklist.h node containers (RDB_TYPE_LIST_QUICKLIST_2).
const QUICKLIST_PLAIN: u64 = 1;
const QUICKLIST_PACKED: u64 = 2;

/// The longest string the reader accepts: Redis' `proto-max-bulk-len` default (512 MiB) plus
/// 1 MiB for the listpack/ziplist framing around a maximal element. Anything longer is a corrupt
/// length prefix, refused before any allocation.
pub const MAX_STRING_LEN: u64 = 513 << 20;

/// The largest DUMP payload the reader builds for one key (1 GiB). A value cannot be RESTOREd
/// in one argument beyond `proto-max-bulk-len` anyway; this bounds memory on corrupt counts.
pub const MAX_PAYLOAD_LEN: usize = 1 << 30;

/// Bytes the reader pulls from its source at a time.
const READ_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// CRC64
// ---------------------------------------------------------------------------------------------

/// Redis' polynomial (`crc64.c` POLY, Jones), bit-reflected for the LSB-first table algorithm.
const POLY_REFLECTED: u64 = 0xad93_d235_94c9_35a9_u64.reverse_bits();

/// Slicing-by-8 tables, built at compile time: table 0 is the byte-at-a-time table, table k
/// advances a byte's contribution by k further zero bytes.
static CRC_TABLES: [[u64; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u64; 256]; 8] {
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ POLY_REFLECTED
            } else {
                c >> 1
            };
            bit += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

/// Continues Redis' CRC-64 (`crc64(crc, p, len)` in `crc64.c`: Jones polynomial, reflected,
/// init 0, no final xor) over `bytes`; `crc64(crc64(0, a), b) == crc64(0, a ++ b)`. It runs over
/// every byte of every backup, hence slicing-by-8.
pub fn crc64(crc: u64, bytes: &[u8]) -> u64 {
    let t = &CRC_TABLES;
    let mut crc = crc;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = crc ^ u64::from_le_bytes(word);
        crc = t[7][(v & 0xff) as usize]
            ^ t[6][((v >> 8) & 0xff) as usize]
            ^ t[5][((v >> 16) & 0xff) as usize]
            ^ t[4][((v >> 24) & 0xff) as usize]
            ^ t[3][((v >> 32) & 0xff) as usize]
            ^ t[2][((v >> 40) & 0xff) as usize]
            ^ t[1][((v >> 48) & 0xff) as usize]
            ^ t[0][(v >> 56) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why an RDB stream (or a DUMP payload) cannot be used.
#[derive(Debug)]
pub enum RdbError {
    /// Not an RDB, corrupt, or truncated; the message is a sentence with the byte offset.
    Format(String),
    /// The underlying reader failed.
    Io(io::Error),
    /// Data of a Redis module type (the 9-character type name from its 64-bit id): it cannot be
    /// cut without the module, so a restore refuses it before touching the target.
    Module { name: String },
    /// The CRC64 trailer does not match: `expected` is what the stream (or payload) carries,
    /// `actual` what its content hashes to.
    Checksum { expected: u64, actual: u64 },
}

impl fmt::Display for RdbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RdbError::Format(msg) => f.write_str(msg),
            RdbError::Io(e) => write!(f, "reading the RDB stream failed: {e}"),
            RdbError::Module { name } => write!(
                f,
                "the RDB holds data of the Redis module type '{name}', which cannot be restored \
                 without that module"
            ),
            RdbError::Checksum { expected, actual } => write!(
                f,
                "RDB checksum mismatch: the stream carries {expected:#018x} but its content \
                 hashes to {actual:#018x}"
            ),
        }
    }
}

impl std::error::Error for RdbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RdbError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for RdbError {
    fn from(e: io::Error) -> Self {
        RdbError::Io(e)
    }
}

fn format_err(msg: String) -> RdbError {
    RdbError::Format(msg)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `REDIS` + 4 ASCII digits (RDB versions 1..=99 are sane; Redis 7.4 writes 12).
fn parse_header(h: &[u8]) -> Result<u16, RdbError> {
    if h.len() < 5 || &h[..5] != b"REDIS" {
        return Err(format_err(format!(
            "not an RDB stream: it starts with [{}] instead of \"REDIS\"",
            hex(&h[..h.len().min(9)])
        )));
    }
    if h.len() < 9 {
        return Err(format_err(format!(
            "truncated RDB stream: it ends after {} bytes, inside the 9-byte header",
            h.len()
        )));
    }
    let digits = &h[5..9];
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(format_err(format!(
            "not an RDB stream: the version after \"REDIS\" is [{}], not 4 ASCII digits",
            hex(digits)
        )));
    }
    let version = digits
        .iter()
        .fold(0u16, |v, d| v * 10 + u16::from(d - b'0'));
    if !(1..=99).contains(&version) {
        return Err(format_err(format!(
            "not an RDB stream: RDB version {version} is outside 1..=99"
        )));
    }
    Ok(version)
}

// ---------------------------------------------------------------------------------------------
// RdbCheck: push check of a backup stream
// ---------------------------------------------------------------------------------------------

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
            return Err(format_err(format!(
                "RDB version {version} predates the checksum trailer (Redis < 2.6): its \
                 completeness cannot be verified"
            )));
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

// ---------------------------------------------------------------------------------------------
// Byte source and sinks shared by the reader and the writer's payload validation
// ---------------------------------------------------------------------------------------------

/// Where walked value bytes go: the payload being built, or nowhere (validation, skipped opcodes).
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn size(&self) -> usize;
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn size(&self) -> usize {
        self.len()
    }
}

/// Counts bytes without keeping them.
struct Discard(usize);

impl Sink for Discard {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn size(&self) -> usize {
        self.0
    }
}

/// A length prefix: a plain length, or the `11xxxxxx` special string encoding that follows.
enum Len {
    Plain(u64),
    Encoded(u8),
}

/// A buffered reader that knows its byte offset and keeps the CRC64 of everything consumed.
struct Src<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Bytes of `buf[..crc_mark]` already folded into `crc`.
    crc_mark: usize,
    crc: u64,
    track_crc: bool,
    /// Stream offset of `buf[0]`.
    base: u64,
}

impl<R: Read> Src<R> {
    fn new(inner: R, chunk: usize, track_crc: bool) -> Self {
        Self {
            inner,
            buf: vec![0; chunk],
            pos: 0,
            end: 0,
            crc_mark: 0,
            crc: 0,
            track_crc,
            base: 0,
        }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Refills an exhausted buffer; false at the end of the input.
    fn fill(&mut self) -> Result<bool, RdbError> {
        if self.pos < self.end {
            return Ok(true);
        }
        if self.track_crc {
            self.crc = crc64(self.crc, &self.buf[self.crc_mark..self.end]);
        }
        self.base += self.end as u64;
        self.pos = 0;
        self.end = 0;
        self.crc_mark = 0;
        loop {
            match self.inner.read(&mut self.buf) {
                Ok(n) => {
                    self.end = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RdbError::Io(e)),
            }
        }
    }

    fn truncated(&self) -> RdbError {
        format_err(format!(
            "truncated RDB stream: it ends at byte offset {}",
            self.offset()
        ))
    }

    /// The CRC64 of everything consumed so far.
    fn crc_now(&mut self) -> u64 {
        if self.track_crc {
            self.crc = crc64(self.crc, &self.buf[self.crc_mark..self.pos]);
            self.crc_mark = self.pos;
        }
        self.crc
    }

    fn byte(&mut self) -> Result<u8, RdbError> {
        if !self.fill()? {
            return Err(self.truncated());
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }

    fn byte_to<S: Sink>(&mut self, out: &mut S) -> Result<u8, RdbError> {
        let b = self.byte()?;
        out.put(&[b]);
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RdbError> {
        let mut a = [0u8; N];
        let mut got = 0;
        while got < N {
            if !self.fill()? {
                return Err(self.truncated());
            }
            let n = (N - got).min(self.end - self.pos);
            a[got..got + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            got += n;
        }
        Ok(a)
    }

    fn array_to<const N: usize, S: Sink>(&mut self, out: &mut S) -> Result<[u8; N], RdbError> {
        let a = self.array::<N>()?;
        out.put(&a);
        Ok(a)
    }

    /// Copies `n` bytes into `out`, refusing to grow a payload past [`MAX_PAYLOAD_LEN`]. Memory
    /// grows only as bytes actually arrive, so a corrupt length cannot force an allocation.
    fn copy_to<S: Sink>(&mut self, n: u64, out: &mut S) -> Result<(), RdbError> {
        if n.saturating_add(out.size() as u64) > MAX_PAYLOAD_LEN as u64 {
            return Err(format_err(format!(
                "corrupt RDB stream: a value at byte offset {} would exceed {} bytes",
                self.offset(),
                MAX_PAYLOAD_LEN
            )));
        }
        let mut left = n;
        while left > 0 {
            if !self.fill()? {
                return Err(self.truncated());
            }
            let take = (self.end - self.pos).min(usize::try_from(left).unwrap_or(usize::MAX));
            out.put(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            left -= take as u64;
        }
        Ok(())
    }

    /// `rdbLoadLenByRef`: 6-bit, 14-bit, 32-bit BE, 64-bit BE lengths, or a string encoding.
    fn len_to<S: Sink>(&mut self, out: &mut S) -> Result<Len, RdbError> {
        let at = self.offset();
        let b = self.byte_to(out)?;
        Ok(match b >> 6 {
            0 => Len::Plain(u64::from(b & 0x3f)),
            1 => Len::Plain(u64::from(b & 0x3f) << 8 | u64::from(self.byte_to(out)?)),
            3 => Len::Encoded(b & 0x3f),
            _ if b == 0x80 => Len::Plain(u64::from(u32::from_be_bytes(self.array_to(out)?))),
            _ if b == 0x81 => Len::Plain(u64::from_be_bytes(self.array_to(out)?)),
            _ => {
                return Err(format_err(format!(
                    "corrupt RDB stream: unknown length encoding {b:#04x} at byte offset {at}"
                )))
            }
        })
    }

    /// `rdbLoadLen(rdb, NULL)`: like Redis, a special-encoding marker reads as its 6-bit value.
    fn len_value_to<S: Sink>(&mut self, out: &mut S) -> Result<u64, RdbError> {
        Ok(match self.len_to(out)? {
            Len::Plain(n) => n,
            Len::Encoded(n) => u64::from(n),
        })
    }

    /// An element count: every element takes at least a byte, so a count beyond the payload
    /// bound is corruption, refused before looping over it.
    fn count_to<S: Sink>(&mut self, out: &mut S) -> Result<u64, RdbError> {
        let at = self.offset();
        let n = self.len_value_to(out)?;
        if n > MAX_PAYLOAD_LEN as u64 {
            return Err(format_err(format!(
                "corrupt RDB stream: a count of {n} elements at byte offset {at} cannot fit in a \
                 value"
            )));
        }
        Ok(n)
    }

    fn check_string_len(n: u64, at: u64) -> Result<(), RdbError> {
        if n > MAX_STRING_LEN {
            return Err(format_err(format!(
                "corrupt RDB stream: a string of {n} bytes at byte offset {at} is longer than \
                 any Redis string"
            )));
        }
        Ok(())
    }

    /// Copies one RDB string verbatim (raw, int-encoded, or LZF: compressed length, original
    /// length, compressed bytes), without decoding it.
    fn string_to<S: Sink>(&mut self, out: &mut S) -> Result<(), RdbError> {
        let at = self.offset();
        match self.len_to(out)? {
            Len::Plain(n) => {
                Self::check_string_len(n, at)?;
                self.copy_to(n, out)
            }
            Len::Encoded(ENC_INT8) => self.copy_to(1, out),
            Len::Encoded(ENC_INT16) => self.copy_to(2, out),
            Len::Encoded(ENC_INT32) => self.copy_to(4, out),
            Len::Encoded(ENC_LZF) => {
                let clen = self.len_value_to(out)?;
                let ulen = self.len_value_to(out)?;
                Self::check_string_len(clen, at)?;
                Self::check_string_len(ulen, at)?;
                self.copy_to(clen, out)
            }
            Len::Encoded(e) => Err(format_err(format!(
                "corrupt RDB stream: unknown string encoding {e} at byte offset {at}"
            ))),
        }
    }

    /// Reads one RDB string decoded to its bytes (keys, AUX fields): integers as decimal text,
    /// LZF decompressed.
    fn string_decoded(&mut self) -> Result<Vec<u8>, RdbError> {
        let at = self.offset();
        let mut skip = Discard(0);
        match self.len_to(&mut skip)? {
            Len::Plain(n) => {
                Self::check_string_len(n, at)?;
                let mut v = Vec::new();
                self.copy_to(n, &mut v)?;
                Ok(v)
            }
            Len::Encoded(ENC_INT8) => Ok(i8::from_le_bytes(self.array()?).to_string().into_bytes()),
            Len::Encoded(ENC_INT16) => {
                Ok(i16::from_le_bytes(self.array()?).to_string().into_bytes())
            }
            Len::Encoded(ENC_INT32) => {
                Ok(i32::from_le_bytes(self.array()?).to_string().into_bytes())
            }
            Len::Encoded(ENC_LZF) => {
                let clen = self.len_value_to(&mut skip)?;
                let ulen = self.len_value_to(&mut skip)?;
                Self::check_string_len(clen, at)?;
                Self::check_string_len(ulen, at)?;
                let mut compressed = Vec::new();
                self.copy_to(clen, &mut compressed)?;
                let ulen = usize::try_from(ulen).unwrap_or(usize::MAX);
                lzf_decompress(&compressed, ulen).ok_or_else(|| {
                    format_err(format!(
                        "corrupt RDB stream: invalid LZF string at byte offset {at}"
                    ))
                })
            }
            Len::Encoded(e) => Err(format_err(format!(
                "corrupt RDB stream: unknown string encoding {e} at byte offset {at}"
            ))),
        }
    }

    /// `rdbLoadDoubleValue` (RDB_TYPE_ZSET): a length byte, 253/254/255 for nan/+inf/-inf.
    fn string_double_to<S: Sink>(&mut self, out: &mut S) -> Result<(), RdbError> {
        let len = self.byte_to(out)?;
        if len < 253 {
            self.copy_to(u64::from(len), out)?;
        }
        Ok(())
    }
}

/// liblzf's decompressor (`lzf_d.c`), for keys and AUX fields only: values stay compressed.
/// `None` when the data is corrupt or does not inflate to exactly `ulen` bytes.
fn lzf_decompress(input: &[u8], ulen: usize) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(ulen.min(input.len().saturating_mul(64)));
    let mut ip = 0;
    while ip < input.len() {
        let ctrl = usize::from(input[ip]);
        ip += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            let lit = input.get(ip..ip + run)?;
            if out.len() + run > ulen {
                return None;
            }
            out.extend_from_slice(lit);
            ip += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(ip)?);
                ip += 1;
            }
            let back = ((ctrl & 0x1f) << 8) + usize::from(*input.get(ip)?) + 1;
            ip += 1;
            len += 2;
            if back > out.len() || out.len() + len > ulen {
                return None;
            }
            let start = out.len() - back;
            for i in 0..len {
                let b = out[start + i];
                out.push(b);
            }
        }
    }
    (out.len() == ulen).then_some(out)
}

/// The `TYPE` name of an RDB value type; `None` for module and unknown types.
fn type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        T_STRING => "string",
        T_LIST | T_LIST_ZIPLIST | T_LIST_QUICKLIST | T_LIST_QUICKLIST_2 => "list",
        T_SET | T_SET_INTSET | T_SET_LISTPACK => "set",
        T_ZSET | T_ZSET_2 | T_ZSET_ZIPLIST | T_ZSET_LISTPACK => "zset",
        T_HASH
        | T_HASH_ZIPMAP
        | T_HASH_ZIPLIST
        | T_HASH_LISTPACK
        | T_HASH_METADATA_PRE_GA
        | T_HASH_LISTPACK_EX_PRE_GA
        | T_HASH_METADATA
        | T_HASH_LISTPACK_EX => "hash",
        T_STREAM_LISTPACKS | T_STREAM_LISTPACKS_2 | T_STREAM_LISTPACKS_3 => "stream",
        _ => return None,
    })
}

/// `moduleTypeNameByID` (module.c): 9 characters of 6 bits each above a 10-bit encoding version.
fn module_name(id: u64) -> String {
    const CHARSET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut name = [0u8; 9];
    let mut id = id >> 10;
    for c in name.iter_mut().rev() {
        *c = CHARSET[(id & 63) as usize];
        id >>= 6;
    }
    name.iter().map(|&c| char::from(c)).collect()
}

/// Whether a walked value is a key to keep, or one Redis itself drops on load (`emptykey`).
enum Cut {
    Value,
    Empty,
}

/// Walks one value of RDB type `t` (the type byte already consumed), copying its bytes into
/// `out` exactly as `rdbLoadObject` (redis 6.2–7.4) reads them.
fn cut_value<R: Read, S: Sink>(src: &mut Src<R>, t: u8, out: &mut S) -> Result<Cut, RdbError> {
    match t {
        T_STRING => src.string_to(out)?,
        T_LIST | T_SET | T_LIST_QUICKLIST => {
            let n = src.count_to(out)?;
            if n == 0 {
                return Ok(Cut::Empty);
            }
            for _ in 0..n {
                src.string_to(out)?;
            }
        }
        T_ZSET | T_ZSET_2 => {
            let n = src.count_to(out)?;
            if n == 0 {
                return Ok(Cut::Empty);
            }
            for _ in 0..n {
                src.string_to(out)?;
                if t == T_ZSET_2 {
                    src.array_to::<8, _>(out)?;
                } else {
                    src.string_double_to(out)?;
                }
            }
        }
        T_HASH => {
            let n = src.count_to(out)?;
            if n == 0 {
                return Ok(Cut::Empty);
            }
            for _ in 0..n {
                src.string_to(out)?;
                src.string_to(out)?;
            }
        }
        T_HASH_METADATA | T_HASH_METADATA_PRE_GA => {
            // 7.4: [minExpire: 8-byte LE ms, GA only] count, then [ttl len][field][value];
            // the GA ttl is relative to minExpire (+1), the pre-GA one absolute.
            if t == T_HASH_METADATA {
                src.array_to::<8, _>(out)?;
            }
            let n = src.count_to(out)?;
            if n == 0 {
                return Ok(Cut::Empty);
            }
            for _ in 0..n {
                src.len_value_to(out)?;
                src.string_to(out)?;
                src.string_to(out)?;
            }
        }
        T_LIST_QUICKLIST_2 => {
            let n = src.count_to(out)?;
            if n == 0 {
                return Ok(Cut::Empty);
            }
            for _ in 0..n {
                let at = src.offset();
                let container = src.len_value_to(out)?;
                if container != QUICKLIST_PLAIN && container != QUICKLIST_PACKED {
                    return Err(format_err(format!(
                        "corrupt RDB stream: quicklist node container {container} at byte \
                         offset {at}"
                    )));
                }
                src.string_to(out)?;
            }
        }
        T_HASH_ZIPMAP
        | T_LIST_ZIPLIST
        | T_SET_INTSET
        | T_ZSET_ZIPLIST
        | T_HASH_ZIPLIST
        | T_HASH_LISTPACK
        | T_ZSET_LISTPACK
        | T_SET_LISTPACK
        | T_HASH_LISTPACK_EX_PRE_GA => {
            src.string_to(out)?;
        }
        T_HASH_LISTPACK_EX => {
            // 7.4 GA: minExpire (8-byte LE ms) before the listpack of [field, value, ttl].
            src.array_to::<8, _>(out)?;
            src.string_to(out)?;
        }
        T_STREAM_LISTPACKS | T_STREAM_LISTPACKS_2 | T_STREAM_LISTPACKS_3 => {
            cut_stream(src, t, out)?;
        }
        T_MODULE_PRE_GA | T_MODULE_2 => {
            let id = src.len_value_to(&mut Discard(0))?;
            return Err(RdbError::Module {
                name: module_name(id),
            });
        }
        other => {
            return Err(format_err(format!(
                "corrupt RDB stream: unknown value type {other} at byte offset {}",
                src.offset().saturating_sub(1)
            )))
        }
    }
    Ok(Cut::Value)
}

/// Streams (types 15, 19, 21): listpacks, metadata, consumer groups with their PELs and
/// consumers; v2 adds first/max-deleted IDs, entries-added and group offsets, v3 consumers'
/// active time.
fn cut_stream<R: Read, S: Sink>(src: &mut Src<R>, t: u8, out: &mut S) -> Result<(), RdbError> {
    let listpacks = src.count_to(out)?;
    for _ in 0..listpacks {
        src.string_to(out)?; // master ID (16 bytes)
        src.string_to(out)?; // listpack
    }
    // length, last_id.ms, last_id.seq
    for _ in 0..3 {
        src.len_value_to(out)?;
    }
    if t >= T_STREAM_LISTPACKS_2 {
        // first_id, max_deleted_entry_id, entries_added
        for _ in 0..5 {
            src.len_value_to(out)?;
        }
    }
    let groups = src.count_to(out)?;
    for _ in 0..groups {
        src.string_to(out)?; // name
        src.len_value_to(out)?; // last_id.ms
        src.len_value_to(out)?; // last_id.seq
        if t >= T_STREAM_LISTPACKS_2 {
            src.len_value_to(out)?; // entries_read offset
        }
        let pel = src.count_to(out)?;
        for _ in 0..pel {
            src.array_to::<16, _>(out)?; // raw stream ID
            src.array_to::<8, _>(out)?; // delivery time, ms LE
            src.len_value_to(out)?; // delivery count
        }
        let consumers = src.count_to(out)?;
        for _ in 0..consumers {
            src.string_to(out)?; // name
            src.array_to::<8, _>(out)?; // seen time
            if t >= T_STREAM_LISTPACKS_3 {
                src.array_to::<8, _>(out)?; // active time
            }
            let own = src.count_to(out)?;
            for _ in 0..own {
                src.array_to::<16, _>(out)?; // raw stream ID, resolved in the group PEL
            }
        }
    }
    Ok(())
}

/// Appends the DUMP footer: RDB version (u16 LE) and the CRC64 (LE) of everything before it.
fn seal_payload(payload: &mut Vec<u8>, version: u16) {
    payload.extend_from_slice(&version.to_le_bytes());
    let crc = crc64(0, payload);
    payload.extend_from_slice(&crc.to_le_bytes());
}

/// Verifies a DUMP payload's footer (`verifyDumpPayload`): at least 10 bytes, CRC64 of all but
/// the last 8 bytes. Returns the footer's RDB version.
fn verify_payload(payload: &[u8]) -> Result<u16, RdbError> {
    let Some(version) = payload_version(payload) else {
        return Err(format_err(format!(
            "not a DUMP payload: {} bytes cannot hold the 10-byte footer",
            payload.len()
        )));
    };
    let body = payload.len() - 8;
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&payload[body..]);
    let expected = u64::from_le_bytes(stored);
    let actual = crc64(0, &payload[..body]);
    if expected != actual {
        return Err(RdbError::Checksum { expected, actual });
    }
    Ok(version)
}

/// The RDB version in a DUMP payload's footer (the 2 bytes before its CRC64), to pick the
/// [`RdbWriter`]'s version from the first DUMP; `None` if it is too short to have a footer.
pub fn payload_version(payload: &[u8]) -> Option<u16> {
    let at = payload.len().checked_sub(10)?;
    Some(u16::from_le_bytes([payload[at], payload[at + 1]]))
}

/// Renders a key for error messages (lossy, at most 64 bytes).
fn show_key(key: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned();
    if key.len() > 64 {
        format!("{shown:?}…")
    } else {
        format!("{shown:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// RdbReader: pull parser cutting DUMP payloads
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// RdbWriter: an RDB stream from DUMP payloads (keyspace mode)
// ---------------------------------------------------------------------------------------------

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

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.crc = crc64(self.crc, bytes);
        out.extend_from_slice(bytes);
    }

    fn emit_len(&mut self, n: u64, out: &mut Vec<u8>) {
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

    fn emit_string(&mut self, s: &[u8], out: &mut Vec<u8>) {
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
    pub fn key(
        &mut self,
        key: &[u8],
        expire_at_ms: Option<i64>,
        dump_payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RdbError> {
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
        self.emit(body, out);
        Ok(())
    }

    /// The EOF opcode and the CRC64 (LE) of the whole stream.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.emit(&[OP_EOF], out);
        out.extend_from_slice(&self.crc.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const RDB_70: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rdb/redis-7.0.rdb"
    ));
    const DUMPS_70: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rdb/redis-7.0.dumps"
    ));
    const RDB_62: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rdb/redis-6.2.rdb"
    ));
    const DUMPS_62: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rdb/redis-6.2.dumps"
    ));

    /// The fixed absolute expiries make-fixtures.py sets with PEXPIREAT.
    const EXP_A: i64 = 4_102_444_800_000;
    const EXP_B: i64 = 4_102_444_800_123;

    #[derive(Debug)]
    struct Dump {
        db: u32,
        key: Vec<u8>,
        expire_at_ms: i64,
        payload: Vec<u8>,
    }

    fn parse_dumps(mut b: &[u8]) -> Vec<Dump> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
            let (h, t) = b.split_at(n);
            *b = t;
            h
        }
        fn u32le(b: &mut &[u8]) -> u32 {
            u32::from_le_bytes(take(b, 4).try_into().unwrap())
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let db = u32le(&mut b);
            let kl = u32le(&mut b) as usize;
            let key = take(&mut b, kl).to_vec();
            let expire_at_ms = i64::from_le_bytes(take(&mut b, 8).try_into().unwrap());
            let pl = u32le(&mut b) as usize;
            let payload = take(&mut b, pl).to_vec();
            out.push(Dump {
                db,
                key,
                expire_at_ms,
                payload,
            });
        }
        out
    }

    fn read_all<R: Read>(r: R) -> Result<(u16, Vec<RdbItem>), RdbError> {
        let mut reader = RdbReader::new(r)?;
        let mut items = Vec::new();
        while let Some(item) = reader.next_item()? {
            items.push(item);
        }
        // Done is sticky.
        assert!(reader.next_item()?.is_none());
        Ok((reader.version(), items))
    }

    fn check_all(bytes: &[u8], chunk: usize) -> Result<RdbCheckSummary, RdbError> {
        let mut c = RdbCheck::new();
        for part in bytes.chunks(chunk.max(1)) {
            c.update(part);
        }
        c.finish()
    }

    /// Returns one byte per read: the reader must not depend on chunking.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }

    fn bitwise_crc64(bytes: &[u8]) -> u64 {
        // crc64.c's generated _crc64: MSB-first on the plain polynomial, reflected input bits,
        // reflected output.
        let poly = 0xad93_d235_94c9_35a9_u64;
        let mut crc = 0u64;
        for &c in bytes {
            let mut i = 1u8;
            while i != 0 {
                let mut bit = crc & 0x8000_0000_0000_0000 != 0;
                if c & i != 0 {
                    bit = !bit;
                }
                crc <<= 1;
                if bit {
                    crc ^= poly;
                }
                i = i.wrapping_shl(1);
            }
        }
        crc.reverse_bits()
    }

    #[test]
    fn crc64_matches_redis_test_vector_and_reference() {
        assert_eq!(crc64(0, b"123456789"), 0xe9c6_d914_c4b8_d9ca);
        assert_eq!(bitwise_crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 999, 1000] {
            assert_eq!(
                crc64(0, &data[..len]),
                bitwise_crc64(&data[..len]),
                "len {len}"
            );
        }
        for split in [0, 1, 5, 8, 13, 500, 1000] {
            let (a, b) = data.split_at(split);
            assert_eq!(crc64(crc64(0, a), b), crc64(0, &data));
        }
        // Redis' own crc64 test: "This is a test of the emergency broadcast system." etc.
        assert_eq!(
            crc64(0, b"This is a test of the emergency broadcast system."),
            bitwise_crc64(b"This is a test of the emergency broadcast system.")
        );
    }

    #[test]
    fn crc64_throughput() {
        let data = vec![0x5au8; 64 << 20];
        let start = std::time::Instant::now();
        let crc = crc64(0, &data);
        let secs = start.elapsed().as_secs_f64();
        println!(
            "crc64 over 64 MiB: {:.0} MB/s (crc {crc:#x}; unoptimized builds are far slower)",
            64.0 * 1.048_576 / secs
        );
    }

    fn fixture_roundtrip(rdb: &[u8], dumps: &[u8], version: u16, functions: usize) {
        let dumps = parse_dumps(dumps);
        let (v, items) = read_all(rdb).unwrap();
        assert_eq!(v, version);
        // The same items whatever the reader's chunking.
        assert_eq!(read_all(Trickle(rdb)).unwrap().1, items);

        let mut keys: BTreeMap<(u64, Vec<u8>), Entry> = BTreeMap::new();
        let mut fns = Vec::new();
        let mut dbs = Vec::new();
        let mut aux = BTreeMap::new();
        for item in items {
            match item {
                RdbItem::Key(e) => {
                    assert!(keys.insert((e.db, e.key.clone()), e).is_none());
                }
                RdbItem::Function { payload } => fns.push(payload),
                RdbItem::SelectDb(db) => dbs.push(db),
                RdbItem::Aux { key, value } => {
                    aux.insert(key, value);
                }
                RdbItem::ResizeDb { .. } => {}
            }
        }
        assert_eq!(dbs, vec![0, 2, 3]);
        assert!(aux.contains_key(&b"redis-ver"[..]));
        assert_eq!(
            aux.get(&b"redis-bits"[..]).map(Vec::as_slice),
            Some(&b"64"[..])
        );

        let mut key_dumps = 0;
        for d in &dumps {
            if d.db == u32::MAX {
                assert_eq!(fns, vec![d.payload.clone()], "FUNCTION DUMP payload");
                continue;
            }
            key_dumps += 1;
            let name = String::from_utf8_lossy(&d.key).into_owned();
            let e = keys
                .get(&(u64::from(d.db), d.key.clone()))
                .unwrap_or_else(|| panic!("key {name} in db {} not cut", d.db));
            assert_eq!(e.payload, d.payload, "payload of {name} differs from DUMP");
            assert_eq!(payload_version(&e.payload), Some(version));
            match (d.expire_at_ms, e.expire_at_ms) {
                (-1, None) => {}
                (want, Some(got)) if want == EXP_A || want == EXP_B => assert_eq!(got, want),
                (want, Some(got)) if want > 0 => {
                    assert!((got - want).abs() < 5_000, "{name}: {got} vs {want}")
                }
                (want, got) => panic!("{name}: expiry {got:?}, DUMP side {want}"),
            }
        }
        assert_eq!(keys.len(), key_dumps);
        assert_eq!(fns.len(), functions);
        // Encodings the fixtures must exercise.
        let ty = |db: u64, k: &str| keys[&(db, k.as_bytes().to_vec())].payload[0];
        if version >= 10 {
            assert_eq!(ty(0, "list:big"), T_LIST_QUICKLIST_2);
            assert_eq!(ty(0, "hash:small"), T_HASH_LISTPACK);
            assert_eq!(ty(0, "zset:small"), T_ZSET_LISTPACK);
            assert_eq!(ty(0, "stream"), T_STREAM_LISTPACKS_2);
        } else {
            assert_eq!(ty(0, "list:big"), T_LIST_QUICKLIST);
            assert_eq!(ty(0, "hash:small"), T_HASH_ZIPLIST);
            assert_eq!(ty(0, "zset:small"), T_ZSET_ZIPLIST);
            assert_eq!(ty(0, "stream"), T_STREAM_LISTPACKS);
        }
        assert_eq!(ty(0, "set:ints"), T_SET_INTSET);
        assert_eq!(ty(0, "set:big"), T_SET);
        assert_eq!(ty(0, "hash:big"), T_HASH);
        assert_eq!(ty(0, "zset:big"), T_ZSET_2);
        let lzf = &keys[&(0, b"str:lzf".to_vec())].payload;
        assert_eq!(lzf[1], 0xc0 | ENC_LZF, "str:lzf is LZF-compressed");
        assert_eq!(
            keys[&(0, b"str:int32".to_vec())].payload[1],
            0xc0 | ENC_INT32
        );
        assert_eq!(keys[&(0, b"stream".to_vec())].type_name, "stream");
    }

    #[test]
    fn redis_70_fixture_cuts_into_server_dumps() {
        fixture_roundtrip(RDB_70, DUMPS_70, 10, 1);
    }

    #[test]
    fn redis_62_fixture_cuts_into_server_dumps() {
        fixture_roundtrip(RDB_62, DUMPS_62, 9, 0);
    }

    #[test]
    fn check_accepts_fixtures_in_any_chunking() {
        for (rdb, version) in [(RDB_70, 10), (RDB_62, 9)] {
            for chunk in [1, 3, 7, 8, 9, 4096, rdb.len()] {
                let s = check_all(rdb, chunk).unwrap();
                assert_eq!(s.version, version);
                assert_eq!(s.total_bytes, rdb.len() as u64);
            }
        }
    }

    /// Cut points: the start, a stride through the body, everything near the end (inside the
    /// checksum and just before the EOF opcode).
    fn cut_points(len: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..20).collect();
        v.extend((20..len).step_by(211));
        v.extend(len.saturating_sub(24)..len);
        v
    }

    #[test]
    fn truncations_are_rejected() {
        for rdb in [RDB_70, RDB_62] {
            for cut in cut_points(rdb.len()) {
                let part = &rdb[..cut];
                assert!(
                    check_all(part, 4096).is_err(),
                    "check accepted a cut at {cut}"
                );
                let err = read_all(part).expect_err("reader accepted a truncation");
                assert!(
                    matches!(err, RdbError::Format(_)),
                    "cut at {cut}: unexpected {err}"
                );
            }
        }
        let err = check_all(&RDB_70[..RDB_70.len() - 3], 100).unwrap_err();
        assert!(err.to_string().contains("no EOF opcode"), "{err}");
    }

    #[test]
    fn bit_flips_are_rejected() {
        for rdb in [RDB_70, RDB_62] {
            let mut positions: Vec<usize> = (0..rdb.len()).step_by(97).collect();
            positions.extend(rdb.len() - 12..rdb.len());
            for pos in positions {
                for bit in [0, 3, 6, 7] {
                    let mut bad = rdb.to_vec();
                    bad[pos] ^= 1 << bit;
                    assert!(check_all(&bad, 1000).is_err(), "check: flip {pos}.{bit}");
                    assert!(
                        read_all(bad.as_slice()).is_err(),
                        "reader: flip {pos}.{bit}"
                    );
                }
            }
        }
    }

    #[test]
    fn flipped_length_prefixes_fail_cleanly() {
        // The byte after each key name is its value's first length prefix (for strings) or
        // count; turning it into 32/64-bit lengths or huge counts must fail without allocating
        // what it claims.
        for rdb in [RDB_70, RDB_62] {
            for key in [
                "str:rand", "str:lzf", "list:big", "set:big", "hash:big", "stream",
            ] {
                let at = rdb
                    .windows(key.len() + 1)
                    .position(|w| w[0] == key.len() as u8 && &w[1..] == key.as_bytes())
                    .unwrap_or_else(|| panic!("{key} not found"))
                    + key.len()
                    + 1;
                for (mask, set) in [(0x40, None), (0x80, None), (0, Some(0x81)), (0, Some(0x80))] {
                    let mut bad = rdb.to_vec();
                    match set {
                        Some(b) => {
                            bad[at] = b;
                            bad[at + 1] = 0x7f;
                        }
                        None => bad[at] ^= mask,
                    }
                    let err = read_all(bad.as_slice()).expect_err("corrupt length accepted");
                    assert!(!matches!(err, RdbError::Io(_)), "{key}: {err}");
                    assert!(check_all(&bad, 512).is_err());
                }
            }
        }
    }

    #[test]
    fn wrong_magic_and_missing_eof() {
        let mut bad = RDB_70.to_vec();
        bad[..5].copy_from_slice(b"PGDMP");
        let err = check_all(&bad, 64).unwrap_err();
        assert!(err.to_string().contains("50 47 44 4d 50"), "{err}");
        assert!(read_all(bad.as_slice()).is_err());

        let mut bad = RDB_70.to_vec();
        bad[7] = b'x';
        assert!(check_all(&bad, 64)
            .unwrap_err()
            .to_string()
            .contains("4 ASCII digits"));

        assert!(check_all(b"", 1)
            .unwrap_err()
            .to_string()
            .contains("instead of"));
        assert!(check_all(b"REDIS00", 1)
            .unwrap_err()
            .to_string()
            .contains("truncated"));

        // Without the EOF opcode: the body, another byte instead of 0xff, and a valid CRC.
        // (The body itself may end in 0xff: listpacks do.)
        let mut no_eof = RDB_70[..RDB_70.len() - 9].to_vec();
        no_eof.push(0);
        let crc = crc64(0, &no_eof);
        no_eof.extend_from_slice(&crc.to_le_bytes());
        let err = check_all(&no_eof, 100).unwrap_err();
        assert!(err.to_string().contains("no EOF opcode"), "{err}");
        assert!(read_all(no_eof.as_slice()).is_err());

        // Data after the trailer.
        let mut trailing = RDB_70.to_vec();
        trailing.push(0);
        assert!(check_all(&trailing, 100).is_err());
        assert!(read_all(trailing.as_slice()).is_err());
    }

    #[test]
    fn checksum_mismatch_reports_both_values_and_zero_is_accepted() {
        let mut bad = RDB_62.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 0x10;
        let stored = u64::from_le_bytes(bad[n - 8..].try_into().unwrap());
        let real = crc64(0, &RDB_62[..n - 8]);
        match check_all(&bad, 333).unwrap_err() {
            RdbError::Checksum { expected, actual } => {
                assert_eq!((expected, actual), (stored, real));
            }
            e => panic!("{e}"),
        }
        match read_all(bad.as_slice()).unwrap_err() {
            RdbError::Checksum { expected, actual } => {
                assert_eq!((expected, actual), (stored, real));
            }
            e => panic!("{e}"),
        }

        let mut zero = RDB_70.to_vec();
        let n = zero.len();
        zero[n - 8..].fill(0);
        assert_eq!(check_all(&zero, 5).unwrap().total_bytes, n as u64);
        assert_eq!(
            read_all(zero.as_slice()).unwrap().1,
            read_all(RDB_70).unwrap().1
        );
    }

    /// Builds a synthetic stream with [`RdbWriter`]'s primitives (raw value bytes).
    struct Build {
        w: RdbWriter,
        out: Vec<u8>,
    }

    impl Build {
        fn new(version: u16) -> Self {
            let mut w = RdbWriter::new(version);
            let mut out = Vec::new();
            w.emit(format!("REDIS{version:04}").as_bytes(), &mut out);
            Build { w, out }
        }
        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.w.emit(b, &mut self.out);
            self
        }
        fn len(&mut self, n: u64) -> &mut Self {
            self.w.emit_len(n, &mut self.out);
            self
        }
        fn string(&mut self, s: &[u8]) -> &mut Self {
            self.w.emit_string(s, &mut self.out);
            self
        }
        fn finish(self) -> Vec<u8> {
            let mut out = self.out;
            self.w.finish(&mut out);
            out
        }
    }

    /// Raw value encodings for the types the fixtures cannot produce (7.2/7.4 types, pre-7.0
    /// types older servers wrote), built exactly as rdb.c reads them.
    fn synthetic_values() -> Vec<(&'static str, u8, Vec<u8>)> {
        fn enc(f: impl FnOnce(&mut Build)) -> Vec<u8> {
            let mut b = Build::new(12);
            let start = b.out.len();
            f(&mut b);
            b.out[start..].to_vec()
        }
        let lp = b"\x0f\x00\x00\x00\x02\x00\x81a\x02\x81b\x02\xff".to_vec();
        vec![
            (
                "list-linked",
                T_LIST,
                enc(|b| {
                    b.len(3)
                        .string(b"a")
                        .raw(&[0xc0, 7])
                        .raw(&[0xc1, 0x34, 0x12]);
                }),
            ),
            (
                "set-ht",
                T_SET,
                enc(|b| {
                    b.len(2).string(b"x").raw(&[0xc2, 1, 2, 3, 4]);
                }),
            ),
            (
                "zset-v1",
                T_ZSET,
                enc(|b| {
                    b.len(4)
                        .string(b"a")
                        .raw(b"\x031.5")
                        .string(b"b")
                        .raw(&[253]);
                    b.string(b"c").raw(&[254]).string(b"d").raw(&[255]);
                }),
            ),
            (
                "hash-ht",
                T_HASH,
                enc(|b| {
                    b.len(2)
                        .string(b"f")
                        .string(b"v")
                        .string(b"g")
                        .raw(&[0xc0, 1]);
                }),
            ),
            (
                "zipmap",
                T_HASH_ZIPMAP,
                enc(|b| {
                    b.string(b"\x02\x01a\x01\x00b\xff");
                }),
            ),
            (
                "list-ziplist",
                T_LIST_ZIPLIST,
                enc(|b| {
                    b.string(&[0u8; 13]);
                }),
            ),
            (
                "zset-ziplist",
                T_ZSET_ZIPLIST,
                enc(|b| {
                    b.string(&[1u8; 20]);
                }),
            ),
            (
                "hash-ziplist",
                T_HASH_ZIPLIST,
                enc(|b| {
                    b.string(&[2u8; 20]);
                }),
            ),
            (
                "quicklist-v1",
                T_LIST_QUICKLIST,
                enc(|b| {
                    // one raw ziplist node, one LZF-compressed node (clen, ulen, data)
                    b.len(2)
                        .string(&[3u8; 30])
                        .raw(&[0xc3])
                        .len(4)
                        .len(40)
                        .raw(&[9, 9, 9, 9]);
                }),
            ),
            (
                "quicklist-plain",
                T_LIST_QUICKLIST_2,
                enc(|b| {
                    b.len(2)
                        .len(QUICKLIST_PACKED)
                        .string(&lp)
                        .len(QUICKLIST_PLAIN);
                    b.string(&[b'z'; 300]);
                }),
            ),
            (
                "set-listpack",
                T_SET_LISTPACK,
                enc(|b| {
                    b.string(&lp);
                }),
            ),
            (
                "hash-listpack-ex-pre-ga",
                T_HASH_LISTPACK_EX_PRE_GA,
                enc(|b| {
                    b.string(&lp);
                }),
            ),
            (
                "hash-listpack-ex",
                T_HASH_LISTPACK_EX,
                enc(|b| {
                    b.raw(&EXP_A.to_le_bytes()).string(&lp);
                }),
            ),
            (
                "hash-metadata",
                T_HASH_METADATA,
                enc(|b| {
                    b.raw(&EXP_A.to_le_bytes()).len(3);
                    b.len(0).string(b"nottl").string(b"v");
                    b.len(1).string(b"ttl-min").string(b"v");
                    b.len(70_000).string(b"ttl-later").raw(&[0xc0, 5]);
                }),
            ),
            (
                "hash-metadata-pre-ga",
                T_HASH_METADATA_PRE_GA,
                enc(|b| {
                    b.len(2).len(EXP_A as u64).string(b"f").string(b"v");
                    b.len(0).string(b"g").string(b"w");
                }),
            ),
            (
                "stream-v3",
                T_STREAM_LISTPACKS_3,
                enc(|b| {
                    let id = |ms: u64, seq: u64| [ms.to_be_bytes(), seq.to_be_bytes()].concat();
                    b.len(1).string(&id(1_700_000_000_000, 0)).string(&lp);
                    b.len(3).len(1_700_000_000_005).len(0); // length, last id
                    b.len(1_700_000_000_000).len(0).len(0).len(0).len(3); // first, max-del, added
                    b.len(2); // groups
                    b.string(b"grp").len(1_700_000_000_005).len(0).len(3); // name, last id, offset
                    b.len(2); // PEL
                    for seq in [1u64, 2] {
                        b.raw(&id(1_700_000_000_000, seq))
                            .raw(&EXP_A.to_le_bytes())
                            .len(seq);
                    }
                    b.len(2); // consumers
                    b.string(b"alice")
                        .raw(&EXP_A.to_le_bytes())
                        .raw(&EXP_B.to_le_bytes());
                    b.len(1).raw(&id(1_700_000_000_000, 1));
                    b.string(b"bob")
                        .raw(&EXP_A.to_le_bytes())
                        .raw(&EXP_B.to_le_bytes());
                    b.len(1).raw(&id(1_700_000_000_000, 2));
                    b.string(b"empty").len(0).len(0).len(0).len(0).len(0); // no PEL, no consumers
                }),
            ),
        ]
    }

    #[test]
    fn synthetic_types_and_opcodes_cut_exactly() {
        let values = synthetic_values();
        let mut b = Build::new(12);
        b.raw(&[OP_AUX]).string(b"redis-ver").string(b"7.4.1");
        b.raw(&[OP_AUX]).string(b"aof-base").raw(&[0xc0, 0]);
        b.raw(&[OP_SELECTDB])
            .len(5)
            .raw(&[OP_RESIZEDB])
            .len(20)
            .len(1);
        b.raw(&[OP_SLOT_INFO]).len(1234).len(20).len(1);
        // An empty list, which Redis drops on load, with an expiry that must not leak.
        b.raw(&[OP_EXPIRETIME_MS]).raw(&EXP_A.to_le_bytes());
        b.raw(&[T_LIST_QUICKLIST_2]).string(b"empty").len(0);
        b.raw(&[T_STRING]).string(b"after-empty").string(b"no ttl");
        for (i, (name, t, value)) in values.iter().enumerate() {
            match i % 4 {
                0 => b.raw(&[OP_EXPIRETIME_MS]).raw(&EXP_B.to_le_bytes()),
                1 => b.raw(&[OP_EXPIRETIME]).raw(&2_000_000_000i32.to_le_bytes()),
                2 => b.raw(&[OP_IDLE]).len(100_000).raw(&[OP_FREQ, 5]),
                _ => b.raw(&[OP_FREQ, 1]),
            };
            b.raw(&[*t]).string(name.as_bytes()).raw(value);
        }
        b.raw(&[OP_FUNCTION2]).string(b"#!lua name=l\nreturn 1");
        let rdb = b.finish();
        assert_eq!(check_all(&rdb, 17).unwrap().version, 12);

        let (_, items) = read_all(Trickle(&rdb)).unwrap();
        assert_eq!(
            items[0],
            RdbItem::Aux {
                key: b"redis-ver".to_vec(),
                value: b"7.4.1".to_vec()
            }
        );
        assert_eq!(
            items[1],
            RdbItem::Aux {
                key: b"aof-base".to_vec(),
                value: b"0".to_vec()
            }
        );
        assert_eq!(items[2], RdbItem::SelectDb(5));
        assert_eq!(
            items[3],
            RdbItem::ResizeDb {
                size: 20,
                expires: 1
            }
        );
        let mut entries: Vec<&Entry> = items
            .iter()
            .filter_map(|i| match i {
                RdbItem::Key(e) => Some(e),
                _ => None,
            })
            .collect();
        let after_empty = entries.remove(0);
        assert_eq!(after_empty.key, b"after-empty");
        assert_eq!(
            after_empty.expire_at_ms, None,
            "the empty key's expiry leaked"
        );
        assert_eq!(entries.len(), values.len());
        for (i, (e, (name, t, value))) in entries.iter().zip(&values).enumerate() {
            assert_eq!(e.key, name.as_bytes());
            assert_eq!(e.db, 5);
            let mut want = vec![*t];
            want.extend_from_slice(value);
            seal_payload(&mut want, 12);
            assert_eq!(e.payload, want, "{name}");
            assert!(verify_payload(&e.payload).is_ok());
            let exp = match i % 4 {
                0 => Some(EXP_B),
                1 => Some(2_000_000_000_000),
                _ => None,
            };
            assert_eq!(e.expire_at_ms, exp, "{name}");
            assert_eq!(Some(e.type_name), type_name(*t));
        }
        let Some(RdbItem::Function { payload }) = items.last() else {
            panic!("no function item");
        };
        assert_eq!(payload[0], OP_FUNCTION2);
        assert!(verify_payload(payload).is_ok());

        // Each synthetic value also passes the writer's payload walk.
        let mut w = RdbWriter::new(12);
        let mut out = Vec::new();
        for e in entries {
            w.key(&e.key, e.expire_at_ms, &e.payload, &mut out).unwrap();
        }
    }

    fn module_id(name: &str, encver: u64) -> u64 {
        const CHARSET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let id = name.bytes().fold(0u64, |id, c| {
            (id << 6) | CHARSET.iter().position(|&x| x == c).unwrap() as u64
        });
        (id << 10) | encver
    }

    #[test]
    fn module_values_and_aux_name_the_module() {
        for (t, name) in [(T_MODULE_2, "ReJSON-RL"), (T_MODULE_PRE_GA, "MBbloom--")] {
            let mut b = Build::new(10);
            b.raw(&[OP_SELECTDB]).len(0);
            b.raw(&[T_STRING]).string(b"before").string(b"v");
            b.raw(&[t])
                .string(b"doc")
                .len(module_id(name, 3))
                .raw(&[2, 0x0a, 0]);
            b.raw(&[T_STRING]).string(b"after").string(b"v");
            let rdb = b.finish();
            let mut r = RdbReader::new(rdb.as_slice()).unwrap();
            assert_eq!(r.next_item().unwrap(), Some(RdbItem::SelectDb(0)));
            assert!(matches!(r.next_item().unwrap(), Some(RdbItem::Key(e)) if e.key == b"before"));
            match r.next_item() {
                Err(RdbError::Module { name: got }) => assert_eq!(got, name),
                other => panic!("{other:?}"),
            }
            assert!(r.next_item().is_err(), "no item after the module error");
        }
        let mut b = Build::new(10);
        b.raw(&[OP_MODULE_AUX])
            .len(module_id("scripting", 1))
            .len(2)
            .len(2);
        let rdb = b.finish();
        let mut r = RdbReader::new(rdb.as_slice()).unwrap();
        match r.next_item() {
            Err(e @ RdbError::Module { .. }) => {
                assert!(e.to_string().contains("'scripting'"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // A module DUMP payload is refused by the writer too.
        let mut payload = vec![T_MODULE_2];
        payload.extend([0x81]);
        payload.extend(module_id("ReJSON-RL", 3).to_be_bytes());
        payload.push(0);
        seal_payload(&mut payload, 10);
        let err = RdbWriter::new(10)
            .key(b"k", None, &payload, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, RdbError::Module { name } if name == "ReJSON-RL"));
    }

    #[test]
    fn writer_round_trips_server_dumps() {
        for (dumps, version) in [(DUMPS_70, 10), (DUMPS_62, 9)] {
            let dumps = parse_dumps(dumps);
            let keys: Vec<&Dump> = dumps.iter().filter(|d| d.db != u32::MAX).collect();
            let v = payload_version(&keys[0].payload).unwrap();
            assert_eq!(v, version);
            let mut w = RdbWriter::new(v);
            let mut out = Vec::new();
            w.header(&mut out);
            let mut db = None;
            for d in &keys {
                if db != Some(d.db) {
                    w.select_db(u64::from(d.db), &mut out);
                    db = Some(d.db);
                }
                let exp = (d.expire_at_ms >= 0).then_some(d.expire_at_ms);
                w.key(&d.key, exp, &d.payload, &mut out).unwrap();
            }
            w.finish(&mut out);

            let s = check_all(&out, 1000).unwrap();
            assert_eq!((s.version, s.total_bytes), (version, out.len() as u64));
            let (_, items) = read_all(out.as_slice()).unwrap();
            assert_eq!(
                items[0],
                RdbItem::Aux {
                    key: b"backup-worker-mode".to_vec(),
                    value: b"keyspace".to_vec()
                }
            );
            let entries: Vec<Entry> = items
                .into_iter()
                .filter_map(|i| match i {
                    RdbItem::Key(e) => Some(e),
                    _ => None,
                })
                .collect();
            assert_eq!(entries.len(), keys.len());
            for (e, d) in entries.iter().zip(&keys) {
                assert_eq!(
                    (e.db, &e.key, &e.payload),
                    (u64::from(d.db), &d.key, &d.payload)
                );
                assert_eq!(
                    e.expire_at_ms,
                    (d.expire_at_ms >= 0).then_some(d.expire_at_ms)
                );
            }
        }
    }

    #[test]
    fn writer_refuses_bad_payloads() {
        let dumps = parse_dumps(DUMPS_70);
        let good = &dumps[0].payload;
        let mut out = Vec::new();

        let mut w = RdbWriter::new(10);
        let mut flipped = good.clone();
        flipped[1] ^= 1;
        assert!(matches!(
            w.key(b"k", None, &flipped, &mut out),
            Err(RdbError::Checksum { .. })
        ));
        assert!(w.key(b"k", None, &good[..5], &mut out).is_err());

        let mut w9 = RdbWriter::new(9);
        let err = w9.key(b"k", None, good, &mut out).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");

        // A well-sealed payload whose value is short of, or longer than, its structure.
        let mut short = vec![T_STRING, 10, b'a'];
        seal_payload(&mut short, 10);
        assert!(w.key(b"k", None, &short, &mut out).is_err());
        let mut long = vec![T_STRING, 1, b'a', b'b'];
        seal_payload(&mut long, 10);
        assert!(w.key(b"k", None, &long, &mut out).is_err());
        assert!(out.is_empty(), "nothing appended on error");
        assert_eq!(payload_version(&[1, 2, 3]), None);
    }

    #[test]
    fn pre_checksum_versions_read_but_fail_the_check() {
        // RDB < 5 (Redis < 2.6) ends at the EOF opcode: no checksum to read or verify.
        let mut rdb = b"REDIS0004".to_vec();
        rdb.extend_from_slice(&[OP_SELECTDB, 0, T_STRING, 1, b'k', 1, b'v', OP_EOF]);
        let (v, items) = read_all(rdb.as_slice()).unwrap();
        assert_eq!(v, 4);
        let RdbItem::Key(e) = &items[1] else {
            panic!("{items:?}");
        };
        assert_eq!(payload_version(&e.payload), Some(4));
        let err = check_all(&rdb, 4).unwrap_err();
        assert!(err.to_string().contains("predates"), "{err}");
    }

    #[test]
    fn lzf_decompress_handles_backrefs_and_rejects_garbage() {
        // literal "ab", then a back-reference of length 2+2 to offset 2: "abab" + "ab"
        let data = [1, b'a', b'b', (2 << 5), 1];
        assert_eq!(lzf_decompress(&data, 6).unwrap(), b"ababab");
        assert!(lzf_decompress(&data, 7).is_none());
        assert!(lzf_decompress(&[0x20, 0x10], 4).is_none()); // reference before the start
        assert!(lzf_decompress(&[5, b'a'], 6).is_none()); // literal past the end
    }

    #[test]
    fn io_errors_surface_as_io() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 >= RDB_70.len() / 2 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(1000).min(RDB_70.len() / 2 - self.0);
                buf[..n].copy_from_slice(&RDB_70[self.0..self.0 + n]);
                self.0 += n;
                Ok(n)
            }
        }
        let err = read_all(Broken(0)).unwrap_err();
        assert!(matches!(err, RdbError::Io(_)), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
