//! The structural check of a pg_dump custom-format archive (`pg_dump --format=custom
//! --compress=0` written to a pipe), verified as the bytes pass (DESIGN §5 `sanity`): the header,
//! every table-of-contents entry, then every data block to a clean end exactly at EOF, with each
//! entry that has data having had its block. Memory: one TOC entry at a time.
//!
//! Layout (PostgreSQL's pg_backup_archiver.c WriteHead/WriteToc and pg_backup_custom.c):
//! - `PGDMP`, version major/minor/rev bytes, intSize, offSize, format (1 = custom); compression
//!   (an int level before 1.15, one algorithm byte from 1.15); 7 timestamp ints; dbname, server
//!   version and pg_dump version strings;
//! - an int entry count, then per entry: dumpId, hadDumper, tableoid, oid, tag, desc, section,
//!   defn, dropStmt, copyStmt, namespace, tablespace, tableam (1.14+), relkind int (1.16+),
//!   owner, "false" (withOids), dependency strings ended by a NULL string, and the custom
//!   format's data offset: a flag byte (1 = data not yet positioned, 2 = positioned, 3 = no
//!   data) and offSize bytes;
//! - data blocks: a type byte (1 = table data, 3 = large objects), the dumpId int, then chunks
//!   (int length + bytes) ending with a zero length; large-object blocks repeat (oid int +
//!   chunks) until an oid of 0.
//!
//! An int is a sign byte and intSize bytes, least significant first; a string is an int length
//! (−1: NULL) and its bytes.

use std::collections::BTreeSet;
use std::fmt;

/// Archive versions pg_dump 12–18 write: 1.12 (separate large-object entries) … 1.16.
const MIN_VERSION: (u8, u8) = (1, 12);
const MAX_VERSION: (u8, u8) = (1, 16);
/// No string in a TOC entry is larger than this (a function body, a view definition: Postgres'
/// own limit on a value is 1 GiB); the buffer only grows to what the stream really holds.
const MAX_STRING: usize = 1024 * 1024 * 1024;
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
const OFFSET_NO_DATA: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDumpError(String);

impl fmt::Display for PgDumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgDumpError {}

fn err(msg: impl Into<String>) -> PgDumpError {
    PgDumpError(msg.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDumpSummary {
    pub archive_version: (u8, u8, u8),
    pub toc_entries: u64,
    pub data_entries: u64,
    pub blocks: u64,
    pub dbname: String,
}

/// Where the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    TocCount,
    Toc {
        index: u64,
        of: u64,
    },
    /// Between data blocks: the only place the stream may end.
    BlockStart,
    /// Reading the length of the next chunk (or the 0 that ends the block or large object).
    ChunkLen {
        blobs: bool,
    },
    /// Skipping a chunk's bytes.
    Chunk {
        remaining: u64,
        blobs: bool,
    },
    /// Reading the next large object's oid (0 ends the block).
    BlobOid,
    Failed,
}

/// Not enough bytes yet: how many the buffer must hold before trying again.
struct Need(usize);

/// A cursor over the buffered bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    int_size: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Need> {
        let end = self.at.checked_add(n).ok_or(Need(usize::MAX))?;
        if end > self.buf.len() {
            return Err(Need(end));
        }
        let buf: &'a [u8] = self.buf;
        self.at = end;
        Ok(&buf[end - n..end])
    }

    fn byte(&mut self) -> Result<u8, Need> {
        Ok(self.bytes(1)?[0])
    }

    fn int(&mut self) -> Result<i64, Need> {
        let size = self.int_size;
        let b = self.bytes(1 + size)?;
        let mut v: i64 = 0;
        for (i, byte) in b[1..].iter().enumerate().take(8) {
            v |= i64::from(*byte) << (8 * i);
        }
        Ok(if b[0] != 0 { -v } else { v })
    }

    /// A string's bytes (None for NULL); an absurd length is reported as `Err(Ok(len))`.
    fn string(&mut self) -> Result<Option<&'a [u8]>, Result<i64, Need>> {
        let len = self.int().map_err(Err)?;
        if len < 0 {
            return Ok(None);
        }
        if len as u64 > MAX_STRING as u64 {
            return Err(Ok(len));
        }
        self.bytes(len as usize).map(Some).map_err(Err)
    }
}

pub struct PgDumpCheck {
    state: State,
    /// Bytes not yet consumed by a parse step.
    buf: Vec<u8>,
    /// Don't retry the current step before the buffer holds this many bytes.
    need: usize,
    offset: u64,
    int_size: usize,
    off_size: usize,
    version: (u8, u8, u8),
    dbname: String,
    toc_entries: u64,
    /// dumpIds of entries whose data must follow.
    pending_data: BTreeSet<i64>,
    data_entries: u64,
    blocks: u64,
    current_block: i64,
    error: Option<PgDumpError>,
}

impl Default for PgDumpCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl PgDumpCheck {
    pub fn new() -> Self {
        Self {
            state: State::Header,
            buf: Vec::new(),
            need: 0,
            offset: 0,
            int_size: 4,
            off_size: 8,
            version: (0, 0, 0),
            dbname: String::new(),
            toc_entries: 0,
            pending_data: BTreeSet::new(),
            data_entries: 0,
            blocks: 0,
            current_block: 0,
            error: None,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) -> Result<(), PgDumpError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() < self.need {
            return Ok(());
        }
        // Parse from a moved-out buffer (the steps update our other fields), compacting once.
        let buf = std::mem::take(&mut self.buf);
        let mut pos = 0;
        let r = self.steps(&buf, &mut pos);
        self.offset += pos as u64;
        self.buf = buf;
        self.buf.drain(..pos);
        if let Err(e) = r {
            self.state = State::Failed;
            self.error = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// Runs parse steps over `buf[*pos..]` until one needs more bytes.
    fn steps(&mut self, buf: &[u8], pos: &mut usize) -> Result<(), PgDumpError> {
        loop {
            match self.state {
                // A chunk's payload is skipped, never kept.
                State::Chunk { remaining, blobs } => {
                    let take = remaining.min((buf.len() - *pos) as u64);
                    *pos += take as usize;
                    let left = remaining - take;
                    if left > 0 {
                        self.state = State::Chunk {
                            remaining: left,
                            blobs,
                        };
                        self.need = 0;
                        return Ok(());
                    }
                    self.state = State::ChunkLen { blobs };
                    continue;
                }
                State::Failed => return Ok(()),
                _ => {}
            }
            if *pos == buf.len() {
                self.need = 0;
                return Ok(());
            }
            let mut cur = Cursor {
                buf: &buf[*pos..],
                at: 0,
                int_size: self.int_size,
            };
            let outcome = match self.state {
                State::Header => self.header(&mut cur),
                State::TocCount => self.toc_count(&mut cur),
                State::Toc { index, of } => self.toc_entry(&mut cur, index, of),
                State::BlockStart => self.block_start(&mut cur),
                State::ChunkLen { blobs } => self.chunk_len(&mut cur, blobs),
                State::BlobOid => self.blob_oid(&mut cur),
                State::Chunk { .. } | State::Failed => return Ok(()),
            };
            match outcome {
                Ok(next) => {
                    *pos += cur.at;
                    self.state = next;
                }
                Err(Step::Need(n)) => {
                    // Relative to the unconsumed bytes, which become the buffer's start.
                    self.need = n;
                    return Ok(());
                }
                Err(Step::Bad(e)) => return Err(e),
            }
        }
    }

    fn header(&mut self, c: &mut Cursor<'_>) -> Result<State, Step> {
        let magic = c.bytes(5)?;
        if magic != b"PGDMP" {
            return Err(Step::Bad(err(format!(
                "not a pg_dump custom-format archive: starts with {}",
                hex(magic)
            ))));
        }
        let (major, minor, rev) = (c.byte()?, c.byte()?, c.byte()?);
        self.version = (major, minor, rev);
        if (major, minor) < MIN_VERSION || (major, minor) > MAX_VERSION {
            return Err(Step::Bad(err(format!(
                "pg_dump archive version {major}.{minor} is not supported (1.12–1.16: pg_dump 12–18)"
            ))));
        }
        let (int_size, off_size, format) = (c.byte()? as usize, c.byte()? as usize, c.byte()?);
        if !(1..=8).contains(&int_size) || !(1..=8).contains(&off_size) {
            return Err(Step::Bad(err(format!(
                "pg_dump archive header is corrupt: int size {int_size}, offset size {off_size}"
            ))));
        }
        if format != 1 {
            return Err(Step::Bad(err(format!(
                "pg_dump archive is format {format}, not custom (1)"
            ))));
        }
        self.int_size = int_size;
        c.int_size = int_size;
        self.off_size = off_size;
        let compression = if (major, minor) >= (1, 15) {
            i64::from(c.byte()?)
        } else {
            c.int()?
        };
        if compression != 0 {
            return Err(Step::Bad(err(format!(
                "pg_dump archive is compressed (setting {compression}); the worker always dumps with --compress=0"
            ))));
        }
        for _ in 0..7 {
            c.int()?;
        }
        let dbname = string(c, "the archive header")?.unwrap_or_default();
        string(c, "the archive header")?;
        string(c, "the archive header")?;
        self.dbname = String::from_utf8_lossy(dbname).into_owned();
        Ok(State::TocCount)
    }

    fn toc_count(&mut self, c: &mut Cursor<'_>) -> Result<State, Step> {
        let n = c.int()?;
        if n < 0 {
            return Err(Step::Bad(err(format!(
                "the table of contents has a negative entry count ({n})"
            ))));
        }
        Ok(if n == 0 {
            State::BlockStart
        } else {
            State::Toc {
                index: 0,
                of: n as u64,
            }
        })
    }

    fn toc_entry(&mut self, c: &mut Cursor<'_>, index: u64, of: u64) -> Result<State, Step> {
        let what = format!("table-of-contents entry {} of {of}", index + 1);
        let dump_id = c.int()?;
        let _had_dumper = c.int()?;
        string(c, &what)?; // tableoid
        string(c, &what)?; // oid
        string(c, &what)?; // tag
        let desc = string(c, &what)?;
        if desc.is_none() {
            return Err(Step::Bad(err(format!("{what} has no kind"))));
        }
        c.int()?; // section
        for _ in 0..5 {
            string(c, &what)?; // defn, dropStmt, copyStmt, namespace, tablespace
        }
        if (self.version.0, self.version.1) >= (1, 14) {
            string(c, &what)?; // tableam
        }
        if (self.version.0, self.version.1) >= (1, 16) {
            c.int()?; // relkind
        }
        string(c, &what)?; // owner
        string(c, &what)?; // withOids
        let mut deps = 0;
        while string(c, &what)?.is_some() {
            deps += 1;
            if deps > 1_000_000 {
                return Err(Step::Bad(err(format!(
                    "{what} has an endless dependency list"
                ))));
            }
        }
        let flag = c.byte()?;
        c.bytes(self.off_size)?;
        if !(1..=3).contains(&flag) {
            return Err(Step::Bad(err(format!(
                "{what} has a corrupt data offset flag ({flag})"
            ))));
        }
        self.toc_entries += 1;
        if flag != OFFSET_NO_DATA {
            self.pending_data.insert(dump_id);
            self.data_entries += 1;
        }
        Ok(if index + 1 == of {
            State::BlockStart
        } else {
            State::Toc {
                index: index + 1,
                of,
            }
        })
    }

    fn block_start(&mut self, c: &mut Cursor<'_>) -> Result<State, Step> {
        let kind = c.byte()?;
        let id = c.int()?;
        if kind != BLK_DATA && kind != BLK_BLOBS {
            return Err(Step::Bad(err(format!(
                "a data block has an unknown type {kind} at byte {}",
                self.offset
            ))));
        }
        if !self.pending_data.remove(&id) {
            return Err(Step::Bad(err(format!(
                "a data block names entry {id}, which has no data pending"
            ))));
        }
        self.blocks += 1;
        self.current_block = id;
        Ok(if kind == BLK_BLOBS {
            State::BlobOid
        } else {
            State::ChunkLen { blobs: false }
        })
    }

    fn chunk_len(&mut self, c: &mut Cursor<'_>, blobs: bool) -> Result<State, Step> {
        let len = c.int()?;
        if len < 0 {
            return Err(Step::Bad(err(format!(
                "the data of entry {} has a negative chunk length",
                self.current_block
            ))));
        }
        Ok(match (len, blobs) {
            (0, false) => State::BlockStart,
            (0, true) => State::BlobOid,
            (n, blobs) => State::Chunk {
                remaining: n as u64,
                blobs,
            },
        })
    }

    fn blob_oid(&mut self, c: &mut Cursor<'_>) -> Result<State, Step> {
        let oid = c.int()?;
        Ok(if oid == 0 {
            State::BlockStart
        } else {
            State::ChunkLen { blobs: true }
        })
    }

    /// The stream ended here.
    pub fn finish(self) -> Result<PgDumpSummary, PgDumpError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.state {
            State::BlockStart if self.buf.is_empty() => {}
            State::Header => {
                return Err(err(
                    if self.buf.len() >= 5 && !self.buf.starts_with(b"PGDMP") {
                        format!(
                            "not a pg_dump custom-format archive: starts with {}",
                            hex(&self.buf[..5])
                        )
                    } else {
                        format!("the archive header is truncated ({} bytes)", self.buf.len())
                    },
                ))
            }
            State::TocCount => return Err(err("the table of contents is truncated (no count)")),
            State::Toc { index, of } => {
                return Err(err(format!(
                    "the table of contents is truncated (entry {} of {of})",
                    index + 1
                )))
            }
            _ => {
                return Err(err(format!(
                    "the data of entry {} is truncated (the stream ended at byte {})",
                    self.current_block,
                    self.offset + self.buf.len() as u64
                )))
            }
        }
        if !self.pending_data.is_empty() {
            let ids: Vec<String> = self
                .pending_data
                .iter()
                .take(10)
                .map(i64::to_string)
                .collect();
            return Err(err(format!(
                "entries {} have data that never appeared in the stream",
                ids.join(", ")
            )));
        }
        Ok(PgDumpSummary {
            archive_version: self.version,
            toc_entries: self.toc_entries,
            data_entries: self.data_entries,
            blocks: self.blocks,
            dbname: self.dbname,
        })
    }
}

/// A parse step's failure: more bytes needed, or a bad archive.
enum Step {
    Need(usize),
    Bad(PgDumpError),
}

impl From<Need> for Step {
    fn from(n: Need) -> Self {
        Step::Need(n.0)
    }
}

fn string<'a>(c: &mut Cursor<'a>, what: &str) -> Result<Option<&'a [u8]>, Step> {
    c.string().map_err(|e| match e {
        Err(need) => Step::Need(need.0),
        Ok(len) => Step::Bad(err(format!("{what} has a string of {len} bytes: corrupt"))),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One table-of-contents entry, as the rewind needs it (DESIGN §6): exact names (a listing line
/// is ambiguous once a name holds a space), the owner, its dependencies, and the SQL of the
/// entries whose statements the rewind applies itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TocEntry {
    pub id: i64,
    pub desc: String,
    pub tag: String,
    pub namespace: String,
    pub owner: String,
    /// The entry's SQL: kept for ACL, DEFAULT ACL, EXTENSION and POLICY entries only.
    pub defn: String,
    /// The DROP statement: kept whole for the kinds whose ALTER … OWNER is spelled from it
    /// (functions, aggregates, operators …); for the others only whether there is one.
    pub drop_stmt: String,
    pub has_drop: bool,
    pub deps: Vec<i64>,
}

/// Kinds whose `ALTER … OWNER TO` names the object as its DROP statement does.
pub const OWNER_FROM_DROP: &[&str] = &[
    "AGGREGATE",
    "FUNCTION",
    "OPERATOR",
    "OPERATOR CLASS",
    "OPERATOR FAMILY",
    "PROCEDURE",
];

/// Reads the archive's header and table of contents from a blocking reader (the data blocks
/// after it are not read).
pub fn read_toc(r: &mut dyn std::io::Read) -> Result<Vec<TocEntry>, PgDumpError> {
    let mut t = TocReader {
        r,
        int_size: 4,
        buf: Vec::new(),
        last_len: 0,
    };
    let magic = t.bytes(5)?.to_vec();
    if magic != b"PGDMP" {
        return Err(err("not a pg_dump custom-format archive"));
    }
    let v = t.bytes(3)?.to_vec();
    let version = (v[0], v[1]);
    if version < MIN_VERSION || version > MAX_VERSION {
        return Err(err(format!(
            "pg_dump archive version {}.{} is not supported",
            v[0], v[1]
        )));
    }
    let h = t.bytes(3)?.to_vec();
    let (int_size, off_size) = (h[0] as usize, h[1] as usize);
    if !(1..=8).contains(&int_size) || !(1..=8).contains(&off_size) || h[2] != 1 {
        return Err(err("pg_dump archive header is corrupt"));
    }
    t.int_size = int_size;
    if version >= (1, 15) {
        t.bytes(1)?;
    } else {
        t.int()?;
    }
    for _ in 0..7 {
        t.int()?;
    }
    for _ in 0..3 {
        t.string(true)?;
    }
    let n = t.int()?;
    if n < 0 {
        return Err(err("the table of contents has a negative entry count"));
    }
    let mut entries = Vec::new();
    for _ in 0..n {
        let id = t.int()?;
        t.int()?; // hadDumper
        t.string(false)?; // tableoid
        t.string(false)?; // oid
        let tag = t.text()?;
        let desc = t.text()?;
        t.int()?; // section
                  // ACLs are applied statement by statement; an extension's names its schema; a
                  // policy's names its roles.
        let keep_defn = matches!(
            desc.as_str(),
            "ACL" | "DEFAULT ACL" | "EXTENSION" | "POLICY"
        );
        let defn = t.string(keep_defn)?.unwrap_or_default();
        let keep_drop = OWNER_FROM_DROP.contains(&desc.as_str());
        let drop = t.string(keep_drop)?;
        let has_drop = t.last_len > 0;
        let drop_stmt = drop.unwrap_or_default();
        t.string(false)?; // copyStmt
        let namespace = t.text()?;
        t.string(false)?; // tablespace
        if version >= (1, 14) {
            t.string(false)?; // tableam
        }
        if version >= (1, 16) {
            t.int()?; // relkind
        }
        let owner = t.text()?;
        t.string(false)?; // withOids
        let mut deps = Vec::new();
        while let Some(d) = t.string(true)? {
            if let Ok(d) = d.trim().parse() {
                deps.push(d);
            }
            if deps.len() > 1_000_000 {
                return Err(err(
                    "a table-of-contents entry has an endless dependency list",
                ));
            }
        }
        t.bytes(1 + off_size)?; // data offset flag and offset
        entries.push(TocEntry {
            id,
            desc,
            tag,
            namespace,
            owner,
            defn,
            drop_stmt,
            has_drop,
            deps,
        });
    }
    Ok(entries)
}

struct TocReader<'a> {
    r: &'a mut dyn std::io::Read,
    int_size: usize,
    buf: Vec<u8>,
    /// The length of the last string read (also when it was skipped).
    last_len: usize,
}

impl TocReader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], PgDumpError> {
        self.buf.resize(n, 0);
        self.r
            .read_exact(&mut self.buf)
            .map_err(|e| err(format!("the table of contents is unreadable: {e}")))?;
        Ok(&self.buf)
    }

    fn int(&mut self) -> Result<i64, PgDumpError> {
        let size = self.int_size;
        let b = self.bytes(1 + size)?;
        let mut v: i64 = 0;
        for (i, byte) in b[1..].iter().enumerate().take(8) {
            v |= i64::from(*byte) << (8 * i);
        }
        Ok(if b[0] != 0 { -v } else { v })
    }

    /// A string, kept or skipped; None for NULL (and for a skipped one).
    fn string(&mut self, keep: bool) -> Result<Option<String>, PgDumpError> {
        let len = self.int()?;
        self.last_len = 0;
        if len < 0 {
            return Ok(None);
        }
        if len as u64 > MAX_STRING as u64 {
            return Err(err(format!(
                "the table of contents has a string of {len} bytes: corrupt"
            )));
        }
        self.last_len = len as usize;
        if !keep {
            let copied = std::io::copy(
                &mut std::io::Read::take(&mut *self.r, len as u64),
                &mut std::io::sink(),
            )
            .map_err(|e| err(format!("the table of contents is unreadable: {e}")))?;
            if copied != len as u64 {
                return Err(err("the table of contents is truncated"));
            }
            return Ok(None);
        }
        let b = self.bytes(len as usize)?;
        Ok(Some(String::from_utf8_lossy(b).into_owned()))
    }

    fn text(&mut self) -> Result<String, PgDumpError> {
        Ok(self.string(true)?.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fake-pg_dump.pgdump"
    ));

    fn check(bytes: &[u8], chunk: usize) -> Result<PgDumpSummary, PgDumpError> {
        let mut c = PgDumpCheck::new();
        for part in bytes.chunks(chunk.max(1)) {
            c.update(part)?;
        }
        c.finish()
    }

    #[test]
    fn a_real_dump_passes_in_any_chunking() {
        let whole = check(FIXTURE, FIXTURE.len()).unwrap();
        assert_eq!(whole.dbname, "bw_fixture");
        assert_eq!((whole.archive_version.0, whole.archive_version.1), (1, 14));
        // pg_restore --list: 2 tables, 2 TABLE DATA, 1 constraint, and the header entries.
        assert_eq!(whole.data_entries, 2);
        assert_eq!(whole.blocks, 2);
        for chunk in [1, 7, 4096, 65536] {
            assert_eq!(check(FIXTURE, chunk).unwrap(), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn the_table_of_contents_reads_with_exact_names() {
        let entries = read_toc(&mut &FIXTURE[..]).unwrap();
        let tables: Vec<(&str, &str, &str)> = entries
            .iter()
            .filter(|e| e.desc == "TABLE")
            .map(|e| (e.namespace.as_str(), e.tag.as_str(), e.owner.as_str()))
            .collect();
        assert_eq!(tables.len(), 2, "{entries:?}");
        assert!(entries.iter().all(|e| e.id > 0));
        let data = entries.iter().find(|e| e.desc == "TABLE DATA").unwrap();
        let table = entries
            .iter()
            .find(|e| e.desc == "TABLE" && e.tag == data.tag)
            .unwrap();
        assert!(data.deps.contains(&table.id), "{data:?}");
        assert!(table.has_drop && table.drop_stmt.is_empty());
        for cut in [3, 20, 100] {
            assert!(read_toc(&mut &FIXTURE[..cut]).is_err());
        }
    }

    #[test]
    fn every_truncation_fails() {
        let step = (FIXTURE.len() / 300).max(1);
        for cut in (0..FIXTURE.len()).step_by(step).chain([FIXTURE.len() - 1]) {
            assert!(
                check(&FIXTURE[..cut], 4096).is_err(),
                "a cut at {cut} of {} passed",
                FIXTURE.len()
            );
        }
    }

    #[test]
    fn wrong_magic_version_and_compression_are_refused() {
        let mut b = FIXTURE.to_vec();
        b[0] = b'X';
        assert!(check(&b, 4096).unwrap_err().0.contains("not a pg_dump"));
        let mut b = FIXTURE.to_vec();
        b[6] = 9; // minor version 1.9
        assert!(check(&b, 4096).unwrap_err().0.contains("not supported"));
        let mut b = FIXTURE.to_vec();
        b[12] = 6; // compression level int's low byte (1.14: sign byte at 11)
        assert!(check(&b, 4096).unwrap_err().0.contains("compressed"));
        assert!(check(b"", 1).is_err());
    }

    #[test]
    fn bit_flips_never_panic() {
        let step = (FIXTURE.len() / 500).max(1);
        for at in (0..FIXTURE.len()).step_by(step) {
            for bit in [0x01u8, 0x80] {
                let mut b = FIXTURE.to_vec();
                b[at] ^= bit;
                let _ = check(&b, 4096);
            }
        }
    }
}
