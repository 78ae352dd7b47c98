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

mod check;
mod reader;
mod writer;

pub use check::RdbCheck;
#[cfg(test)]
use check::RdbCheckSummary;
pub use reader::{Entry, RdbItem, RdbReader};
pub use writer::RdbWriter;

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
pub(crate) fn show_key(key: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned();
    if key.len() > 64 {
        format!("{shown:?}…")
    } else {
        format!("{shown:?}")
    }
}

#[cfg(test)]
mod tests;
