//! One standard gzip stream (DESIGN §5), written and read fast.
//!
//! Writing: `GZIP_LEVEL` picks a deflate implementation ([`Deflate::for_gzip_level`]): Intel's
//! ISA-L (igzip, SIMD deflate, ~20× gzip -6's speed at its size) for 1–7, zlib-rs for 8–9 where
//! a user asks for the smallest object whatever it costs. Either way the object is one gzip member
//! that `gunzip` reads. Reading: ISA-L's inflate, which decodes any writer's gzip (objects written
//! by the worker's earlier zlib-rs pipeline included), checking the CRC and length of every member.
//!
//! Both ISA-L state structs are kept boxed: their addresses never change between calls, and the
//! raw pointers handed to the library are set before each call and cleared after it.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;

use isal_sys::igzip_lib as isal;

/// The deflate implementation and level behind one `GZIP_LEVEL` (measured in
/// `examples/deflate_bench.rs`; figures in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// ISA-L igzip at its level 0–3.
    Isal(u32),
    /// zlib-rs (through flate2) at a zlib level 1–9.
    Zlib(u32),
}

impl Deflate {
    /// `GZIP_LEVEL` 1–9 onto an implementation, chosen by measurement (`backup_bench --levels`,
    /// figures in the README): ISA-L's level 2 is, on pg_dump streams, both its fastest and its
    /// smallest level (its levels 1 and 3 measured slower *and* larger), at about 20× gzip -6's
    /// speed and 1–2 % under gzip -6's size — so 1–7 all take it; 8–9 take zlib-rs level 8, the
    /// smallest stream measured (~5 % under gzip -6) at about gzip -6's speed (zlib-rs level 9
    /// measured larger than its 8).
    pub fn for_gzip_level(level: u32) -> Self {
        match level {
            0..=7 => Deflate::Isal(2),
            _ => Deflate::Zlib(8),
        }
    }
}

impl std::fmt::Display for Deflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deflate::Isal(l) => write!(f, "isa-l igzip level {l}"),
            Deflate::Zlib(l) => write!(f, "zlib-rs level {l}"),
        }
    }
}

fn isal_error(op: &str, code: i32) -> io::Error {
    let what = match code {
        isal::ISAL_INVALID_BLOCK => "invalid deflate block",
        isal::ISAL_INVALID_SYMBOL => "invalid deflate symbol",
        isal::ISAL_INVALID_LOOKBACK => "invalid lookback distance",
        isal::ISAL_INVALID_WRAPPER => "not a gzip stream (invalid header or trailer)",
        isal::ISAL_UNSUPPORTED_METHOD => "unsupported compression method",
        isal::ISAL_INCORRECT_CHECKSUM => "CRC or length mismatch",
        _ => "error",
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{op}: {what} (isa-l code {code})"),
    )
}

/// Streaming gzip compression into caller-owned buffers (no writer inside: the pipeline moves
/// output between threads).
pub struct GzipEncoder {
    inner: Encoder,
}

enum Encoder {
    Isal(IsalDeflate),
    Zlib(Box<flate2::write::GzEncoder<Vec<u8>>>),
}

impl GzipEncoder {
    pub fn new(deflate: Deflate) -> Self {
        let inner = match deflate {
            Deflate::Isal(level) => Encoder::Isal(IsalDeflate::new(level.min(3))),
            Deflate::Zlib(level) => Encoder::Zlib(Box::new(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.clamp(1, 9)),
            ))),
        };
        Self { inner }
    }

    /// Compresses `input`, appending the output that is ready to `out`.
    pub fn write(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        match &mut self.inner {
            Encoder::Isal(d) => d.run(input, out, false),
            Encoder::Zlib(z) => {
                z.write_all(input)?;
                out.append(z.get_mut());
                Ok(())
            }
        }
    }

    /// Ends the stream: the last blocks and the gzip trailer (CRC-32, length) go to `out`.
    pub fn finish(self, out: &mut Vec<u8>) -> io::Result<()> {
        match self.inner {
            Encoder::Isal(mut d) => d.run(&[], out, true),
            Encoder::Zlib(z) => {
                let mut rest = z.finish()?;
                out.append(&mut rest);
                Ok(())
            }
        }
    }
}

/// Output reserved per `isal_deflate` call.
const OUT_STEP: usize = 256 * 1024;
/// Input handed to one `isal_deflate` call (its counters are u32).
const IN_STEP: usize = 1 << 30;

struct IsalDeflate {
    stream: Box<isal::isal_zstream>,
    /// The level's working memory; `stream.level_buf` points into it.
    _level_buf: Vec<u8>,
}

// SAFETY: the raw pointers in the stream point into `_level_buf` (owned, moved with it) or at
// ISA-L's static tables, or are null between calls.
unsafe impl Send for IsalDeflate {}

impl IsalDeflate {
    fn new(level: u32) -> Self {
        // Zeroed first: isal_deflate_init sets the fields the library reads before writing, not
        // its buffers, and an all-zero struct is a valid value of every field.
        let mut stream: Box<MaybeUninit<isal::isal_zstream>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: zeroed memory is a valid isal_zstream (integers and null pointers), then
        // initialised by the library.
        let mut stream = unsafe {
            isal::isal_deflate_init(stream.as_mut_ptr());
            stream.assume_init()
        };
        let size = match level {
            0 => isal::ISAL_DEF_LVL0_DEFAULT,
            1 => isal::ISAL_DEF_LVL1_DEFAULT,
            2 => isal::ISAL_DEF_LVL2_DEFAULT,
            _ => isal::ISAL_DEF_LVL3_DEFAULT,
        } as usize;
        let mut level_buf = vec![0u8; size];
        stream.level = level;
        stream.level_buf = if size == 0 {
            std::ptr::null_mut()
        } else {
            level_buf.as_mut_ptr()
        };
        stream.level_buf_size = size as u32;
        stream.gzip_flag = isal::IGZIP_GZIP as u16;
        stream.flush = isal::NO_FLUSH as u16;
        stream.end_of_stream = 0;
        Self {
            stream,
            _level_buf: level_buf,
        }
    }

    fn run(&mut self, input: &[u8], out: &mut Vec<u8>, end: bool) -> io::Result<()> {
        let mut pieces = input.chunks(IN_STEP).peekable();
        let mut piece: &[u8] = pieces.next().unwrap_or(&[]);
        loop {
            let last = pieces.peek().is_none();
            let s = &mut *self.stream;
            s.next_in = piece.as_ptr() as *mut u8;
            s.avail_in = piece.len() as u32;
            s.end_of_stream = u16::from(end && last);
            loop {
                out.reserve(OUT_STEP);
                let spare = out.spare_capacity_mut();
                let room = spare.len().min(u32::MAX as usize);
                s.next_out = spare.as_mut_ptr().cast::<u8>();
                s.avail_out = room as u32;
                // SAFETY: next_in/avail_in describe `piece` and next_out/avail_out the spare
                // capacity of `out`, both live for the call; level_buf is owned by self.
                let rc = unsafe { isal::isal_deflate(s) };
                let written = room - s.avail_out as usize;
                // SAFETY: isal_deflate initialised `written` bytes of the spare capacity.
                unsafe { out.set_len(out.len() + written) };
                if rc != isal::COMP_OK as i32 {
                    s.next_in = std::ptr::null_mut();
                    s.next_out = std::ptr::null_mut();
                    return Err(isal_error("gzip compression", rc));
                }
                let done = if end && last {
                    s.internal_state.state == isal::isal_zstate_state_ZSTATE_END
                } else {
                    s.avail_in == 0
                };
                if done {
                    break;
                }
            }
            s.next_in = std::ptr::null_mut();
            s.next_out = std::ptr::null_mut();
            match pieces.next() {
                Some(p) => piece = p,
                None => return Ok(()),
            }
        }
    }
}

/// Input read from the compressed source at a time.
const IN_BUF: usize = 256 * 1024;

/// Decompresses a gzip stream (one member or several, as `gunzip` does) read from `inner`. A
/// stream that ends early, fails its CRC/length check, or is not gzip is an `InvalidData` (or
/// `UnexpectedEof`) error, never a short clean read.
pub struct GzipDecoder<R> {
    state: Box<isal::inflate_state>,
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    input_ended: bool,
    /// Compressed bytes consumed so far (the stored size, once the stream has ended).
    consumed: u64,
}

// SAFETY: the state's raw pointers are null between calls; its buffers are inline.
unsafe impl<R: Send> Send for GzipDecoder<R> {}

impl<R: Read> GzipDecoder<R> {
    pub fn new(inner: R) -> Self {
        let mut state: Box<MaybeUninit<isal::inflate_state>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: zeroed memory is a valid inflate_state (integers, arrays and null pointers),
        // then initialised by the library.
        let mut state = unsafe {
            isal::isal_inflate_init(state.as_mut_ptr());
            state.assume_init()
        };
        state.crc_flag = isal::ISAL_GZIP;
        Self {
            state,
            inner,
            buf: vec![0u8; IN_BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            input_ended: false,
            consumed: 0,
        }
    }

    pub fn compressed_bytes(&self) -> u64 {
        self.consumed
    }

    /// Reads more compressed input behind what is left unconsumed.
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            return Ok(());
        }
        loop {
            match self.inner.read(&mut self.buf[self.len..]) {
                Ok(0) => {
                    self.input_ended = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.len += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn finished_member(&self) -> bool {
        self.state.block_state == isal::isal_block_state_ISAL_BLOCK_FINISH
    }
}

impl<R: Read> Read for GzipDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut started = self.consumed > 0 || self.pos < self.len;
        loop {
            if self.pos == self.len && !self.input_ended {
                self.fill()?;
            }
            if self.finished_member() {
                if self.pos == self.len && self.input_ended {
                    return Ok(0);
                }
                // Another member follows (gunzip reads concatenated members too).
                // SAFETY: the state was initialised by isal_inflate_init.
                unsafe { isal::isal_inflate_reset(&mut *self.state) };
                self.state.crc_flag = isal::ISAL_GZIP;
            }
            if self.pos == self.len && self.input_ended {
                return Err(if started {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the gzip stream ends before its last block and trailer",
                    )
                } else {
                    io::Error::new(io::ErrorKind::InvalidData, "empty input: not a gzip stream")
                });
            }
            started = true;
            let available = self.len - self.pos;
            let room = out.len().min(u32::MAX as usize);
            let s = &mut *self.state;
            s.next_in = self.buf[self.pos..].as_ptr() as *mut u8;
            s.avail_in = available as u32;
            s.next_out = out.as_mut_ptr();
            s.avail_out = room as u32;
            // SAFETY: next_in/avail_in describe the unconsumed part of `buf`, next_out/avail_out
            // the caller's buffer; both outlive the call.
            let rc = unsafe { isal::isal_inflate(s) };
            let used = available - s.avail_in as usize;
            let produced = room - s.avail_out as usize;
            s.next_in = std::ptr::null_mut();
            s.next_out = std::ptr::null_mut();
            self.pos += used;
            self.consumed += used as u64;
            if rc < 0 {
                return Err(isal_error("gzip stream", rc));
            }
            if rc == isal::ISAL_NEED_DICT as i32 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "gzip stream: needs a preset dictionary",
                ));
            }
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 && !self.finished_member() {
                // Nothing moved: the library wants more input than is buffered.
                if self.input_ended {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the gzip stream ends before its last block and trailer",
                    ));
                }
                self.fill()?;
            }
        }
    }
}

/// Decompressed bytes handed from the decoding thread at a time.
const OUT_CHUNK: usize = 256 * 1024;

/// A local gzip file decompressed on a blocking thread, read asynchronously (restores stream it
/// into a tool's stdin). Dropping the reader ends the thread at its next chunk.
pub struct GunzipReader {
    /// Chunks, then `None` at the clean end of the stream.
    rx: tokio::sync::mpsc::Receiver<io::Result<Option<Vec<u8>>>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

/// Opens `path` and starts decompressing it.
pub fn gunzip_file(path: &std::path::Path) -> io::Result<GunzipReader> {
    Ok(gunzip_reader(std::fs::File::open(path)?))
}

/// Decompresses a blocking reader of gzip bytes (a file, or a file being decrypted as it is read)
/// on a blocking thread, for async readers.
pub fn gunzip_reader<R: Read + Send + 'static>(input: R) -> GunzipReader {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut decoder = GzipDecoder::new(input);
        loop {
            let mut chunk = vec![0u8; OUT_CHUNK];
            let mut filled = 0;
            let end = loop {
                match decoder.read(&mut chunk[filled..]) {
                    Ok(0) => break Ok(true),
                    Ok(n) => {
                        filled += n;
                        if filled == chunk.len() {
                            break Ok(false);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            chunk.truncate(filled);
            if !chunk.is_empty() && tx.blocking_send(Ok(Some(chunk))).is_err() {
                return;
            }
            match end {
                Ok(false) => {}
                Ok(true) => {
                    // The end, said explicitly: a thread that died says nothing.
                    let _ = tx.blocking_send(Ok(None));
                    return;
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    GunzipReader {
        rx,
        current: Vec::new(),
        pos: 0,
        ended: false,
    }
}

impl tokio::io::AsyncRead for GunzipReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        loop {
            if self.pos < self.current.len() {
                let n = (self.current.len() - self.pos).min(buf.remaining());
                let from = self.pos;
                buf.put_slice(&self.current[from..from + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(Some(chunk)))) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Poll::Ready(Some(Ok(None))) => {
                    self.ended = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // The decoding thread went away without saying the stream ended: a truncated
                // stream must never look complete to the tool reading it.
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the gzip decoder stopped before the end of the stream",
                    )))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Text-like and compressible, with an incompressible stretch.
        let mut v = Vec::with_capacity(len);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (v.len() / 65536) % 3 == 2 {
                v.extend_from_slice(&x.to_le_bytes());
            } else {
                v.extend_from_slice(format!("row {} token {:x}\n", v.len(), x % 1000).as_bytes());
            }
        }
        v.truncate(len);
        v
    }

    fn compress(deflate: Deflate, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = GzipEncoder::new(deflate);
        let mut out = Vec::new();
        for c in data.chunks(chunk.max(1)) {
            enc.write(c, &mut out).unwrap();
        }
        enc.finish(&mut out).unwrap();
        out
    }

    #[test]
    fn every_level_round_trips_through_flate2_and_isal() {
        let data = sample(3 << 20);
        for level in 1..=9 {
            let gz = compress(Deflate::for_gzip_level(level), &data, 1 << 20);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "flate2 decode of level {level}");
            let mut back = Vec::new();
            GzipDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
            assert!(back == data, "isal decode of level {level}");
            assert!(gz.len() < data.len(), "level {level} compresses");
        }
    }

    #[test]
    fn empty_input_is_a_valid_gzip_stream() {
        for deflate in [Deflate::Isal(2), Deflate::Zlib(9)] {
            let gz = compress(deflate, &[], 1);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back.is_empty());
            GzipDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
            assert!(back.is_empty());
        }
    }

    #[test]
    fn decodes_zlib_written_and_concatenated_members() {
        let data = sample(700_000);
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        z.write_all(&data).unwrap();
        let mut gz = z.finish().unwrap();
        gz.extend_from_slice(&compress(Deflate::Isal(1), b"tail", 1));
        let mut back = Vec::new();
        // Small reads exercise every state boundary.
        let mut d = GzipDecoder::new(&gz[..]);
        let mut buf = [0u8; 777];
        loop {
            let n = d.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(back.len(), data.len() + 4);
        assert!(back[..data.len()] == data[..] && &back[data.len()..] == b"tail");
        assert_eq!(d.compressed_bytes(), gz.len() as u64);
    }

    #[test]
    fn truncated_flipped_and_foreign_streams_are_errors() {
        let data = sample(1 << 20);
        let gz = compress(Deflate::Isal(2), &data, 100_000);
        let read_all = |bytes: &[u8]| {
            let mut v = Vec::new();
            GzipDecoder::new(bytes).read_to_end(&mut v)
        };
        for cut in [1, 10, gz.len() / 2, gz.len() - 8, gz.len() - 1] {
            assert!(read_all(&gz[..cut]).is_err(), "truncated at {cut}");
        }
        let mut flipped = gz.clone();
        let at = flipped.len() - 6; // inside the CRC-32 / length trailer
        flipped[at] ^= 0x40;
        assert!(read_all(&flipped).is_err(), "trailer flip");
        let mut flipped = gz.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x01;
        assert!(read_all(&flipped).is_err(), "body flip");
        assert!(read_all(b"PGDMP not gzip at all").is_err());
        assert!(read_all(b"").is_err());
        let mut garbage = gz.clone();
        garbage.extend_from_slice(b"junk after the end");
        assert!(read_all(&garbage).is_err(), "trailing garbage");
    }

    #[tokio::test]
    async fn gunzip_file_streams_and_reports_corruption() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let data = sample(2_500_000);
        let gz = compress(Deflate::Isal(2), &data, 1 << 20);
        let path = dir.path().join("ok.gz");
        std::fs::write(&path, &gz).unwrap();
        let mut back = Vec::new();
        gunzip_file(&path)
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert!(back == data);
        let cut = dir.path().join("cut.gz");
        std::fs::write(&cut, &gz[..gz.len() - 3]).unwrap();
        let mut back = Vec::new();
        assert!(gunzip_file(&cut)
            .unwrap()
            .read_to_end(&mut back)
            .await
            .is_err());
    }
}
