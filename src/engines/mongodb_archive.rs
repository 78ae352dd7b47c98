//! A push parser for the archive `mongodump --archive` writes (uncompressed), used as the
//! structural check of a MongoDB backup (DESIGN §5) and to count documents per namespace for the
//! verifier and the restore (§6, §7). Std only; bytes are fed in chunks of any size, and memory
//! stays bounded: small header documents are buffered (one at a time, capped), collection
//! documents are only streamed through a checksum.
//!
//! The format, as mongo-tools writes and reads it (`common/archive`: `archive.go`, `prelude.go`,
//! `parser.go`, `multiplexer.go`, `demultiplexer.go`, `spec.md`):
//!
//! ```text
//! magic        6d e2 99 81                 (0x8199e26d, little-endian)
//! prelude      header document             {concurrent_collections, version "0.1", server_version, tool_version}
//!              collection metadata docs    {db, collection, metadata (extended JSON text), size, type}, one per namespace
//!              ff ff ff ff                 terminator
//! body         segments until end of stream, each:
//!                namespace header document {db, collection, EOF: bool, CRC: int64}
//!                zero or more BSON documents of that namespace (none after an EOF header)
//!                ff ff ff ff
//! ```
//!
//! Namespaces interleave in the body; each one ends with a header whose `EOF` is true and whose
//! `CRC` is the CRC-64 (Go's `crc64.ECMA`: reflected polynomial, inverted before and after, i.e.
//! CRC-64/XZ) of all its documents' bytes, in order, across its segments. An empty collection (a
//! view, too) still gets a segment with no documents and its EOF header. A timeseries collection's
//! documents are written under `system.buckets.<name>` by sources older than 8.3.

use std::collections::HashMap;
use std::fmt;

/// The archive's magic number, as it appears on the wire (`0x8199e26d` little-endian).
const MAGIC: [u8; 4] = [0x6d, 0xe2, 0x99, 0x81];
/// Ends the prelude and every body segment; never a valid BSON length.
const TERMINATOR: u32 = 0xffff_ffff;
/// The smallest BSON document: a length and the trailing NUL.
const MIN_DOCUMENT: u32 = 5;
/// mongo-tools refuses documents above 16 MiB; the server's own internal limit adds 16 KiB, so a
/// genuine document never exceeds this and a corrupt length prefix cannot make us buffer more.
const MAX_DOCUMENT: u32 = 16 * 1024 * 1024 + 16 * 1024;
/// Namespaces held in memory at once; far beyond any real deployment, it keeps a hostile stream
/// of tiny metadata documents from growing the reader without bound.
const MAX_NAMESPACES: usize = 1_000_000;
/// Timeseries data lives in this collection on sources older than MongoDB 8.3.
const BUCKETS_PREFIX: &str = "system.buckets.";

/// Why a stream is not a complete mongodump archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveError {
    /// The stream does not start with the archive magic (the bytes found, up to four).
    BadMagic(Vec<u8>),
    /// The stream ended before the archive was complete.
    Truncated(String),
    /// The bytes at `offset` are not what the format allows there.
    Corrupt { offset: u64, detail: String },
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(found) => {
                write!(f, "not a mongodump archive: magic ")?;
                if found.is_empty() {
                    write!(f, "(none)")?;
                }
                for b in found {
                    write!(f, "{b:02x}")?;
                }
                write!(f, ", want 6de29981")
            }
            Self::Truncated(detail) => write!(f, "archive is truncated: {detail}"),
            Self::Corrupt { offset, detail } => {
                write!(f, "archive is corrupt at byte {offset}: {detail}")
            }
        }
    }
}

impl std::error::Error for ArchiveError {}

/// Documents counted in one namespace of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceCount {
    pub db: String,
    pub collection: String,
    pub documents: u64,
}

/// What a complete archive holds: its namespaces in metadata order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub namespaces: Vec<NamespaceCount>,
    pub total_documents: u64,
}

/// Where the parser is in the archive's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Magic,
    Header,
    Metadata,
    /// Between segments: a namespace header, or the end of the stream.
    SegmentStart,
    /// Inside a segment of namespace `ns`: documents, or the terminator.
    Segment {
        ns: usize,
    },
    /// After an EOF header of `ns`: only the terminator may follow.
    AfterEof {
        ns: usize,
    },
}

/// What the bytes being received form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    /// A 4-byte word: the magic, a document length, or a terminator.
    Word,
    /// A prelude or namespace header document, buffered whole (`len` bytes in all).
    Buffered { len: usize },
    /// A collection document, streamed: `remaining` bytes still to come.
    Streamed { remaining: u32 },
}

#[derive(Debug)]
struct Namespace {
    db: String,
    collection: String,
    /// Listed in the prelude (otherwise only seen in the body, which mongorestore refuses).
    in_metadata: bool,
    documents: u64,
    crc: u64,
    finished: bool,
}

impl Namespace {
    fn name(&self) -> String {
        format!("{}.{}", self.db, self.collection)
    }
}

/// Incremental reader of a mongodump archive: [`feed`](Self::feed) it the stream in chunks of any
/// size, then [`finish`](Self::finish) checks that it was complete and returns the counts. After
/// an error, every later call returns the same error.
#[derive(Debug)]
pub struct ArchiveReader {
    phase: Phase,
    item: Item,
    /// Bytes of the stream consumed so far (for error offsets).
    offset: u64,
    /// Offset at which the current item started.
    item_start: u64,
    word: [u8; 4],
    word_len: usize,
    /// The document being buffered (header phases only).
    doc: Vec<u8>,
    /// Last byte of the collection document being streamed (must be its trailing NUL).
    last_byte: u8,
    namespaces: Vec<Namespace>,
    /// `(db, collection)` → index into `namespaces`, by metadata or by first appearance.
    by_name: HashMap<(String, String), usize>,
    /// `(db, system.buckets.<c>)` → index of timeseries collection `c`.
    buckets: HashMap<(String, String), usize>,
    failed: Option<ArchiveError>,
}

impl Default for ArchiveReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ArchiveReader {
    pub fn new() -> Self {
        Self {
            phase: Phase::Magic,
            item: Item::Word,
            offset: 0,
            item_start: 0,
            word: [0; 4],
            word_len: 0,
            doc: Vec::new(),
            last_byte: 0,
            namespaces: Vec::new(),
            by_name: HashMap::new(),
            buckets: HashMap::new(),
            failed: None,
        }
    }

    /// Consumes the next bytes of the stream. Fails as soon as the bytes cannot be part of an
    /// archive; the reader then stays failed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.consume(bytes);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            // Nothing more will be parsed: release the buffer now.
            self.doc = Vec::new();
        }
        result
    }

    /// Ends the stream: the archive must be complete — magic, header, every collection's
    /// metadata and the prelude terminator, and every namespace's EOF header — and the body may
    /// not hold namespaces the prelude does not list (mongorestore refuses those).
    pub fn finish(self) -> Result<ArchiveSummary, ArchiveError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.phase == Phase::Magic {
            let seen = &self.word[..self.word_len];
            if seen.is_empty() {
                return Err(ArchiveError::Truncated("the stream is empty".into()));
            }
            if MAGIC.starts_with(seen) {
                return Err(ArchiveError::Truncated(format!(
                    "the stream ended after {} byte(s), inside the magic number",
                    seen.len()
                )));
            }
            return Err(ArchiveError::BadMagic(seen.to_vec()));
        }
        let mid_item = match self.item {
            Item::Word => self.word_len > 0,
            Item::Buffered { .. } | Item::Streamed { .. } => true,
        };
        let ended = |what: String| format!("the stream ended at byte {} {what}", self.offset);
        // Where in the body the stream stopped, when it was not between two segments.
        let context = match self.phase {
            Phase::Magic | Phase::Header => {
                return Err(ArchiveError::Truncated(ended(
                    "before the end of the archive header".into(),
                )))
            }
            Phase::Metadata => {
                return Err(ArchiveError::Truncated(ended(
                    "inside the collection metadata (no prelude terminator)".into(),
                )))
            }
            Phase::Segment { ns } => {
                Some(ended(format!("inside a segment of {}", self.ns_name(ns))))
            }
            Phase::AfterEof { ns } => Some(ended(format!(
                "before the terminator after the end of {}",
                self.ns_name(ns)
            ))),
            Phase::SegmentStart if mid_item => Some(ended("inside a namespace header".into())),
            Phase::SegmentStart => None,
        };
        let unfinished: Vec<String> = self
            .namespaces
            .iter()
            .filter(|ns| ns.in_metadata && !ns.finished)
            .map(Namespace::name)
            .collect();
        if !unfinished.is_empty() {
            let (noun, verb) = if unfinished.len() == 1 {
                ("namespace", "never reached its end")
            } else {
                ("namespaces", "never reached their end")
            };
            let context = context.map(|c| format!(" ({c})")).unwrap_or_default();
            return Err(ArchiveError::Truncated(format!(
                "{noun} {} {verb}{context}",
                name_list(&unfinished)
            )));
        }
        if let Some(context) = context {
            return Err(ArchiveError::Truncated(context));
        }
        let unlisted: Vec<String> = self
            .namespaces
            .iter()
            .filter(|ns| !ns.in_metadata)
            .map(Namespace::name)
            .collect();
        if !unlisted.is_empty() {
            return Err(ArchiveError::Corrupt {
                offset: self.offset,
                detail: format!(
                    "the body holds namespace(s) the prelude does not list: {}",
                    name_list(&unlisted)
                ),
            });
        }
        let namespaces: Vec<NamespaceCount> = self
            .namespaces
            .into_iter()
            .map(|ns| NamespaceCount {
                db: ns.db,
                collection: ns.collection,
                documents: ns.documents,
            })
            .collect();
        let total_documents = namespaces.iter().map(|ns| ns.documents).sum();
        Ok(ArchiveSummary {
            namespaces,
            total_documents,
        })
    }

    fn consume(&mut self, mut input: &[u8]) -> Result<(), ArchiveError> {
        while !input.is_empty() {
            match self.item {
                Item::Word => {
                    if self.word_len == 0 {
                        self.item_start = self.offset;
                    }
                    let take = (4 - self.word_len).min(input.len());
                    let (head, rest) = input.split_at(take);
                    self.word[self.word_len..self.word_len + take].copy_from_slice(head);
                    self.word_len += take;
                    self.offset += take as u64;
                    input = rest;
                    if self.word_len == 4 {
                        self.word_len = 0;
                        self.on_word()?;
                    }
                }
                Item::Buffered { len } => {
                    let take = (len - self.doc.len()).min(input.len());
                    let (head, rest) = input.split_at(take);
                    self.doc.extend_from_slice(head);
                    self.offset += take as u64;
                    input = rest;
                    if self.doc.len() == len {
                        self.item = Item::Word;
                        let doc = std::mem::take(&mut self.doc);
                        self.on_document(&doc)?;
                        // Keep the allocation for the next header, unless it was a large one.
                        if doc.capacity() <= 64 * 1024 {
                            self.doc = doc;
                            self.doc.clear();
                        }
                    }
                }
                Item::Streamed { remaining } => {
                    let take = remaining.min(u32::try_from(input.len()).unwrap_or(u32::MAX));
                    let (head, rest) = input.split_at(take as usize);
                    let Phase::Segment { ns } = self.phase else {
                        return Err(self.corrupt("internal: document outside a segment".into()));
                    };
                    if let (Some(n), Some(&last)) = (self.namespaces.get_mut(ns), head.last()) {
                        n.crc = crc64_update(n.crc, head);
                        self.last_byte = last;
                    }
                    self.offset += u64::from(take);
                    input = rest;
                    let remaining = remaining - take;
                    self.item = Item::Streamed { remaining };
                    if remaining == 0 {
                        self.item = Item::Word;
                        if self.last_byte != 0 {
                            return Err(self.corrupt(format!(
                                "a document of {} does not end with a NUL byte",
                                self.ns_name(ns)
                            )));
                        }
                        if let Some(n) = self.namespaces.get_mut(ns) {
                            n.documents += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete 4-byte word arrived: the magic, a terminator, or a document's length.
    fn on_word(&mut self) -> Result<(), ArchiveError> {
        let word = self.word;
        if self.phase == Phase::Magic {
            if word != MAGIC {
                return Err(ArchiveError::BadMagic(word.to_vec()));
            }
            self.phase = Phase::Header;
            return Ok(());
        }
        let value = u32::from_le_bytes(word);
        if value == TERMINATOR {
            return match self.phase {
                // The prelude's end, or a segment's.
                Phase::Metadata | Phase::Segment { .. } | Phase::AfterEof { .. } => {
                    self.phase = Phase::SegmentStart;
                    Ok(())
                }
                Phase::Header => {
                    Err(self
                        .corrupt("a terminator where the archive header document belongs".into()))
                }
                Phase::SegmentStart => Err(self.corrupt(
                    "a terminator where a namespace header belongs (headerless block)".into(),
                )),
                Phase::Magic => Err(self.corrupt("internal: terminator before magic".into())),
            };
        }
        if !(MIN_DOCUMENT..=MAX_DOCUMENT).contains(&value) {
            return Err(self.corrupt(format!(
                "{value} is neither a valid BSON document length nor the archive terminator"
            )));
        }
        match self.phase {
            Phase::Segment { ns } => {
                if let Some(n) = self.namespaces.get_mut(ns) {
                    n.crc = crc64_update(n.crc, &word);
                }
                self.item = Item::Streamed {
                    remaining: value - 4,
                };
            }
            Phase::AfterEof { ns } => {
                return Err(self.corrupt(format!(
                    "a document after the EOF header of {}",
                    self.ns_name(ns)
                )));
            }
            Phase::Header | Phase::Metadata | Phase::SegmentStart | Phase::Magic => {
                self.doc.clear();
                self.doc.extend_from_slice(&word);
                self.item = Item::Buffered {
                    len: value as usize,
                };
            }
        }
        Ok(())
    }

    /// A buffered document is complete: the archive header, a collection's metadata, or a
    /// namespace header.
    fn on_document(&mut self, doc: &[u8]) -> Result<(), ArchiveError> {
        let fields = parse_document(doc).map_err(|e| self.corrupt(e))?;
        match self.phase {
            Phase::Header => {
                // mongorestore reads these fields but checks none of them; a header that is a
                // well-formed document is all the format requires.
                self.phase = Phase::Metadata;
                Ok(())
            }
            Phase::Metadata => self.on_metadata(&fields),
            Phase::SegmentStart => self.on_namespace_header(&fields),
            Phase::Magic | Phase::Segment { .. } | Phase::AfterEof { .. } => {
                Err(self.corrupt("internal: buffered document in a body phase".into()))
            }
        }
    }

    fn on_metadata(&mut self, fields: &[(&str, Value<'_>)]) -> Result<(), ArchiveError> {
        let mut db = None;
        let mut collection = None;
        let mut kind = None;
        for (key, value) in fields {
            match *key {
                "db" => db = Some(self.string_field("collection metadata", key, value)?),
                "collection" => {
                    collection = Some(self.string_field("collection metadata", key, value)?)
                }
                "type" => kind = Some(self.string_field("collection metadata", key, value)?),
                _ => {}
            }
        }
        let (Some(db), Some(collection)) = (db, collection) else {
            return Err(self.corrupt("collection metadata without db and collection".into()));
        };
        if collection.is_empty() {
            return Err(self.corrupt("collection metadata with an empty collection name".into()));
        }
        let key = (db.to_owned(), collection.to_owned());
        if self.by_name.contains_key(&key) {
            return Err(self.corrupt(format!(
                "the prelude lists namespace {db}.{collection} twice"
            )));
        }
        let index = self.add_namespace(db, collection, true)?;
        self.by_name.insert(key, index);
        if kind == Some("timeseries") {
            self.buckets.insert(
                (db.to_owned(), format!("{BUCKETS_PREFIX}{collection}")),
                index,
            );
        }
        Ok(())
    }

    fn on_namespace_header(&mut self, fields: &[(&str, Value<'_>)]) -> Result<(), ArchiveError> {
        // Mirrors NamespaceHeader.UnmarshalBSON: these four fields, these types, nothing else.
        let mut db = "";
        let mut collection = "";
        let mut eof = false;
        let mut crc = 0u64;
        for (key, value) in fields {
            match (*key, value) {
                ("db", _) => db = self.string_field("namespace header", key, value)?,
                ("collection", _) => {
                    collection = self.string_field("namespace header", key, value)?
                }
                ("EOF", Value::Bool(b)) => eof = *b,
                ("CRC", Value::Int64(v)) => crc = u64::from_le_bytes(v.to_le_bytes()),
                ("EOF" | "CRC", _) => {
                    return Err(self.corrupt(format!(
                        "namespace header field {key} has the wrong BSON type"
                    )))
                }
                _ => return Err(self.corrupt(format!("unknown namespace header field {key:?}"))),
            }
        }
        if collection.is_empty() {
            return Err(self.corrupt("namespace header without a collection".into()));
        }
        let key = (db.to_owned(), collection.to_owned());
        let index = match self.by_name.get(&key).or_else(|| self.buckets.get(&key)) {
            Some(&i) => i,
            None => {
                let i = self.add_namespace(db, collection, false)?;
                self.by_name.insert(key, i);
                i
            }
        };
        let Some(ns) = self.namespaces.get_mut(index) else {
            return Err(self.corrupt("internal: namespace index out of range".into()));
        };
        if ns.finished {
            let name = ns.name();
            return Err(self.corrupt(format!(
                "a namespace header for {name} after its EOF header"
            )));
        }
        if eof {
            if ns.crc != crc {
                let (want, got, name) = (crc, ns.crc, ns.name());
                return Err(self.corrupt(format!(
                    "checksum mismatch for {name}: the archive says {want:016x}, its documents give {got:016x}"
                )));
            }
            ns.finished = true;
            self.phase = Phase::AfterEof { ns: index };
        } else {
            self.phase = Phase::Segment { ns: index };
        }
        Ok(())
    }

    fn add_namespace(
        &mut self,
        db: &str,
        collection: &str,
        in_metadata: bool,
    ) -> Result<usize, ArchiveError> {
        if self.namespaces.len() >= MAX_NAMESPACES {
            return Err(self.corrupt(format!("more than {MAX_NAMESPACES} namespaces")));
        }
        self.namespaces.push(Namespace {
            db: db.to_owned(),
            collection: collection.to_owned(),
            in_metadata,
            documents: 0,
            crc: 0,
            finished: false,
        });
        Ok(self.namespaces.len() - 1)
    }

    fn string_field<'a>(
        &self,
        what: &str,
        key: &str,
        value: &Value<'a>,
    ) -> Result<&'a str, ArchiveError> {
        match value {
            Value::String(bytes) => std::str::from_utf8(bytes)
                .map_err(|_| self.corrupt(format!("{what} field {key} is not valid UTF-8"))),
            _ => Err(self.corrupt(format!("{what} field {key} is not a string"))),
        }
    }

    fn ns_name(&self, ns: usize) -> String {
        self.namespaces
            .get(ns)
            .map(Namespace::name)
            .unwrap_or_default()
    }

    /// An error about the item that started at `item_start`.
    fn corrupt(&self, detail: String) -> ArchiveError {
        ArchiveError::Corrupt {
            offset: self.item_start,
            detail,
        }
    }
}

/// Names for an error message: all of a few, or the first ones and a count.
fn name_list(names: &[String]) -> String {
    const SHOWN: usize = 5;
    if names.len() <= SHOWN {
        return names.join(", ");
    }
    format!(
        "{} and {} more",
        names[..SHOWN].join(", "),
        names.len() - SHOWN
    )
}

/// The top-level value types the prelude and namespace headers use; anything else is only
/// skipped over (after its bounds are checked).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value<'a> {
    String(&'a [u8]),
    Bool(bool),
    Int32(i32),
    Int64(i64),
    Other(u8),
}

/// Walks the top-level elements of a whole BSON document, checking every length against the
/// document's bounds. Nested documents are checked for length and trailing NUL, not descended.
fn parse_document(doc: &[u8]) -> Result<Vec<(&str, Value<'_>)>, String> {
    let declared = read_i32(doc, 0).ok_or("a document shorter than its length prefix")?;
    if usize::try_from(declared).ok() != Some(doc.len()) || doc.len() < MIN_DOCUMENT as usize {
        return Err("a document whose length prefix does not match its size".into());
    }
    if doc.last() != Some(&0) {
        return Err("a document that does not end with a NUL byte".into());
    }
    let end = doc.len() - 1;
    let mut pos = 4;
    let mut fields = Vec::new();
    while pos < end {
        let kind = doc[pos];
        pos += 1;
        let key_end = doc[pos..end]
            .iter()
            .position(|&b| b == 0)
            .map(|i| pos + i)
            .ok_or("an element name without its NUL")?;
        let key = std::str::from_utf8(&doc[pos..key_end])
            .map_err(|_| "an element name that is not UTF-8".to_string())?;
        pos = key_end + 1;
        let (value, len) = element(&doc[..end], pos, kind)
            .ok_or_else(|| format!("element {key:?} (type 0x{kind:02x}) is malformed"))?;
        pos = pos
            .checked_add(len)
            .filter(|&p| p <= end)
            .ok_or_else(|| format!("element {key:?} runs past the end of its document"))?;
        fields.push((key, value));
    }
    Ok(fields)
}

/// The value of an element of type `kind` starting at `pos`, and its length in bytes; `None`
/// when it is malformed or does not fit in `body` (the document without its trailing NUL).
fn element(body: &[u8], pos: usize, kind: u8) -> Option<(Value<'_>, usize)> {
    let fixed = |n: usize| (pos.checked_add(n)? <= body.len()).then_some((Value::Other(kind), n));
    match kind {
        0x01 | 0x09 | 0x11 => fixed(8),        // double, datetime, timestamp
        0x06 | 0x0A | 0x7F | 0xFF => fixed(0), // undefined, null, maxkey, minkey
        0x07 => fixed(12),                     // ObjectId
        0x13 => fixed(16),                     // decimal128
        0x02 => {
            let (bytes, len) = string_at(body, pos)?;
            Some((Value::String(bytes), len))
        }
        0x0D | 0x0E => string_at(body, pos).map(|(_, len)| (Value::Other(kind), len)), // code, symbol
        0x0C => {
            // DBPointer: a string and an ObjectId.
            let (_, len) = string_at(body, pos)?;
            let total = len.checked_add(12)?;
            (pos.checked_add(total)? <= body.len()).then_some((Value::Other(kind), total))
        }
        0x03 | 0x04 => {
            let len = usize::try_from(read_i32(body, pos)?).ok()?;
            let end = pos.checked_add(len)?;
            (len >= MIN_DOCUMENT as usize && end <= body.len() && body[end - 1] == 0)
                .then_some((Value::Other(kind), len))
        }
        0x05 => {
            // Binary: length, subtype byte, bytes.
            let len = usize::try_from(read_i32(body, pos)?).ok()?;
            let total = len.checked_add(5)?;
            (pos.checked_add(total)? <= body.len()).then_some((Value::Other(kind), total))
        }
        0x08 => match body.get(pos)? {
            0 => Some((Value::Bool(false), 1)),
            1 => Some((Value::Bool(true), 1)),
            _ => None,
        },
        0x0B => {
            // Regex: pattern and options, two C strings.
            let first = body.get(pos..)?.iter().position(|&b| b == 0)?;
            let second = body.get(pos + first + 1..)?.iter().position(|&b| b == 0)?;
            Some((Value::Other(kind), first + 1 + second + 1))
        }
        0x0F => {
            // Code with scope: a total length covering itself, a string and a document.
            let len = usize::try_from(read_i32(body, pos)?).ok()?;
            (len >= 14 && pos.checked_add(len)? <= body.len()).then_some((Value::Other(kind), len))
        }
        0x10 => Some((Value::Int32(read_i32(body, pos)?), 4)),
        0x12 => {
            let bytes: [u8; 8] = body.get(pos..pos.checked_add(8)?)?.try_into().ok()?;
            Some((Value::Int64(i64::from_le_bytes(bytes)), 8))
        }
        _ => None,
    }
}

/// A BSON string at `pos`: its bytes without the NUL, and the element's length.
fn string_at(body: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let len = usize::try_from(read_i32(body, pos)?).ok()?;
    let start = pos.checked_add(4)?;
    let end = start.checked_add(len)?;
    if len == 0 || end > body.len() || body[end - 1] != 0 {
        return None;
    }
    Some((&body[start..end - 1], len + 4))
}

fn read_i32(bytes: &[u8], pos: usize) -> Option<i32> {
    let b: [u8; 4] = bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
    Some(i32::from_le_bytes(b))
}

/// The table of Go's `crc64.MakeTable(crc64.ECMA)`: the ECMA-182 polynomial, reflected.
const CRC64_TABLE: [u64; 256] = {
    const POLY: u64 = 0xC96C_5795_D787_0F42;
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Continues a CRC-64 the way Go's `hash/crc64` digest does (inverted in and out), so feeding
/// the documents in pieces gives the value mongodump wrote.
fn crc64_update(crc: u64, bytes: &[u8]) -> u64 {
    let mut crc = !crc;
    for &b in bytes {
        crc = CRC64_TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- a tiny BSON encoder, for building archives ----

    enum B<'a> {
        Str(&'a str),
        I32(i32),
        I64(i64),
        Bool(bool),
        Doc(Vec<u8>),
        F64(f64),
        Null,
        Oid([u8; 12]),
        Bin(&'a [u8]),
        Regex(&'a str, &'a str),
    }

    fn bson(fields: &[(&str, B<'_>)]) -> Vec<u8> {
        let mut out = vec![0, 0, 0, 0];
        for (key, value) in fields {
            let kind = match value {
                B::F64(_) => 0x01,
                B::Str(_) => 0x02,
                B::Doc(_) => 0x03,
                B::Bin(_) => 0x05,
                B::Oid(_) => 0x07,
                B::Bool(_) => 0x08,
                B::Null => 0x0A,
                B::Regex(..) => 0x0B,
                B::I32(_) => 0x10,
                B::I64(_) => 0x12,
            };
            out.push(kind);
            out.extend_from_slice(key.as_bytes());
            out.push(0);
            match value {
                B::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
                B::Str(s) => {
                    out.extend_from_slice(&(s.len() as i32 + 1).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                    out.push(0);
                }
                B::Doc(d) => out.extend_from_slice(d),
                B::Bin(b) => {
                    out.extend_from_slice(&(b.len() as i32).to_le_bytes());
                    out.push(0);
                    out.extend_from_slice(b);
                }
                B::Oid(o) => out.extend_from_slice(o),
                B::Bool(b) => out.push(u8::from(*b)),
                B::Null => {}
                B::Regex(p, o) => {
                    for s in [p, o] {
                        out.extend_from_slice(s.as_bytes());
                        out.push(0);
                    }
                }
                B::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
                B::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            }
        }
        out.push(0);
        let len = out.len() as i32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out
    }

    const TERM: [u8; 4] = [0xff; 4];

    fn order(i: i32) -> Vec<u8> {
        bson(&[
            ("_id", B::I32(i)),
            ("item", B::Str("widget")),
            ("qty", B::I32(i % 7)),
            ("price", B::F64(9.5)),
            ("meta", B::Doc(bson(&[("a", B::Null)]))),
            ("oid", B::Oid([7; 12])),
            ("bin", B::Bin(b"xyz")),
            ("re", B::Regex("^a", "i")),
        ])
    }

    fn ns_header(db: &str, c: &str, eof: bool, crc: u64) -> Vec<u8> {
        bson(&[
            ("db", B::Str(db)),
            ("collection", B::Str(c)),
            ("EOF", B::Bool(eof)),
            ("CRC", B::I64(crc as i64)),
        ])
    }

    fn prelude(namespaces: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(bson(&[
            ("concurrent_collections", B::I32(4)),
            ("version", B::Str("0.1")),
            ("server_version", B::Str("7.0.12")),
            ("tool_version", B::Str("100.10.0")),
        ]));
        for (db, c, kind) in namespaces {
            out.extend(bson(&[
                ("db", B::Str(db)),
                ("collection", B::Str(c)),
                (
                    "metadata",
                    B::Str(r#"{"indexes":[{"v":2,"key":{"_id":1},"name":"_id_"}]}"#),
                ),
                ("size", B::I32(0)),
                ("type", B::Str(kind)),
            ]));
        }
        out.extend(TERM);
        out
    }

    /// shop.orders (5 docs, in two segments) interleaved with shop.customers (2 docs), and an
    /// empty shop.v (a view): the shapes mongodump's multiplexer writes.
    fn sample() -> Vec<u8> {
        let orders: Vec<Vec<u8>> = (0..5).map(order).collect();
        let customers: Vec<Vec<u8>> = (0..2)
            .map(|i| bson(&[("_id", B::I32(i)), ("name", B::Str("ann"))]))
            .collect();
        let crc = |docs: &[Vec<u8>]| docs.iter().fold(0, |c, d| crc64_update(c, d));
        let mut out = prelude(&[
            ("shop", "orders", "collection"),
            ("shop", "customers", "collection"),
            ("shop", "v", "view"),
        ]);
        out.extend(ns_header("shop", "orders", false, 0));
        out.extend(orders[..3].concat());
        out.extend(TERM);
        out.extend(ns_header("shop", "customers", false, 0));
        out.extend(customers.concat());
        out.extend(TERM);
        out.extend(ns_header("shop", "v", false, 0));
        out.extend(TERM);
        out.extend(ns_header("shop", "orders", false, 0));
        out.extend(orders[3..].concat());
        out.extend(TERM);
        out.extend(ns_header("shop", "customers", true, crc(&customers)));
        out.extend(TERM);
        out.extend(ns_header("shop", "v", true, 0));
        out.extend(TERM);
        out.extend(ns_header("shop", "orders", true, crc(&orders)));
        out.extend(TERM);
        out
    }

    fn parse(bytes: &[u8]) -> Result<ArchiveSummary, ArchiveError> {
        let mut r = ArchiveReader::new();
        r.feed(bytes)?;
        r.finish()
    }

    fn counts(s: &ArchiveSummary) -> Vec<(String, u64)> {
        s.namespaces
            .iter()
            .map(|n| (format!("{}.{}", n.db, n.collection), n.documents))
            .collect()
    }

    #[test]
    fn crc64_is_gos_ecma() {
        // The CRC-64/XZ check value: Go's crc64.Checksum([]byte("123456789"), ECMA table).
        assert_eq!(crc64_update(0, b"123456789"), 0x995D_C9BB_DF19_39FA);
        let split = crc64_update(crc64_update(0, b"1234"), b"56789");
        assert_eq!(split, 0x995D_C9BB_DF19_39FA);
    }

    #[test]
    fn counts_in_metadata_order_at_every_split() {
        let bytes = sample();
        let want = vec![
            ("shop.orders".to_string(), 5),
            ("shop.customers".to_string(), 2),
            ("shop.v".to_string(), 0),
        ];
        let whole = parse(&bytes).unwrap();
        assert_eq!(counts(&whole), want);
        assert_eq!(whole.total_documents, 7);
        for cut in 0..=bytes.len() {
            let mut r = ArchiveReader::new();
            r.feed(&bytes[..cut]).unwrap();
            r.feed(&bytes[cut..]).unwrap();
            assert_eq!(r.finish().unwrap(), whole, "split at {cut}");
        }
        let mut r = ArchiveReader::new();
        for b in &bytes {
            r.feed(std::slice::from_ref(b)).unwrap();
        }
        r.feed(&[]).unwrap();
        assert_eq!(r.finish().unwrap(), whole, "byte by byte");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let mut r = ArchiveReader::new();
            let e = match r.feed(&bytes[..cut]) {
                Ok(()) => r.finish().unwrap_err(),
                Err(e) => e,
            };
            assert!(matches!(e, ArchiveError::Truncated(_)), "cut {cut}: {e}");
        }
        // Cut right after the first orders segment: orders and the rest never end.
        let e = parse(&bytes[..bytes.len() - 4 - ns_header("shop", "orders", true, 0).len()])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "archive is truncated: namespace shop.orders never reached its end"
        );
    }

    #[test]
    fn wrong_magic() {
        let mut bytes = sample();
        bytes[..4].copy_from_slice(&[0x00, 0x11, 0x22, 0x33]);
        let mut r = ArchiveReader::new();
        let e = r.feed(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a mongodump archive: magic 00112233, want 6de29981"
        );
        assert_eq!(r.feed(b"more").unwrap_err(), e, "stays failed");
        assert_eq!(r.finish().unwrap_err(), e);
        // Short and wrong: still bad magic; short and right: truncated.
        assert!(matches!(parse(b"PG"), Err(ArchiveError::BadMagic(_))));
        assert!(matches!(
            parse(&MAGIC[..2]),
            Err(ArchiveError::Truncated(_))
        ));
        assert!(matches!(parse(b""), Err(ArchiveError::Truncated(_))));
        // A pg_dump or an RDB is not an archive.
        assert!(matches!(
            parse(b"PGDMP\x01\x0e"),
            Err(ArchiveError::BadMagic(_))
        ));
    }

    #[test]
    fn missing_prelude_terminator() {
        let mut bytes = prelude(&[("shop", "orders", "collection")]);
        bytes.truncate(bytes.len() - 4);
        let e = parse(&bytes).unwrap_err();
        assert!(e.to_string().contains("no prelude terminator"), "{e}");
        // The body starting without the terminator: a namespace header read as metadata, then
        // a body document where a metadata document belongs.
        bytes.extend(ns_header("shop", "orders", false, 0));
        bytes.extend(order(1));
        bytes.extend(TERM);
        bytes.extend(ns_header(
            "shop",
            "orders",
            true,
            crc64_update(0, &order(1)),
        ));
        bytes.extend(TERM);
        assert!(parse(&bytes).is_err());
    }

    #[test]
    fn a_namespace_without_eof() {
        let mut bytes = prelude(&[
            ("shop", "orders", "collection"),
            ("shop", "b", "collection"),
        ]);
        bytes.extend(ns_header("shop", "orders", false, 0));
        bytes.extend(order(1));
        bytes.extend(TERM);
        bytes.extend(ns_header("shop", "b", false, 0));
        bytes.extend(TERM);
        let e = parse(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "archive is truncated: namespaces shop.orders, shop.b never reached their end"
        );
        // A namespace listed in the prelude and never seen in the body at all.
        let e = parse(&prelude(&[("shop", "orders", "collection")])).unwrap_err();
        assert!(
            e.to_string().contains("shop.orders never reached its end"),
            "{e}"
        );
    }

    #[test]
    fn body_namespaces_without_metadata_are_reported() {
        let mut bytes = prelude(&[]);
        bytes.extend(ns_header("shop", "ghost", false, 0));
        bytes.extend(order(1));
        bytes.extend(TERM);
        bytes.extend(ns_header("shop", "ghost", true, crc64_update(0, &order(1))));
        bytes.extend(TERM);
        let e = parse(&bytes).unwrap_err();
        assert!(matches!(e, ArchiveError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("does not list: shop.ghost"), "{e}");
    }

    #[test]
    fn timeseries_data_under_system_buckets() {
        let doc = order(1);
        let mut bytes = prelude(&[("shop", "weather", "timeseries")]);
        bytes.extend(ns_header("shop", "system.buckets.weather", false, 0));
        bytes.extend(&doc);
        bytes.extend(TERM);
        bytes.extend(ns_header(
            "shop",
            "system.buckets.weather",
            true,
            crc64_update(0, &doc),
        ));
        bytes.extend(TERM);
        let s = parse(&bytes).unwrap();
        assert_eq!(counts(&s), vec![("shop.weather".to_string(), 1)]);
    }

    #[test]
    fn grammar_violations() {
        let base = prelude(&[("shop", "orders", "collection")]);
        let doc = order(1);
        let empty_eof = ns_header("shop", "orders", true, 0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("headerless block", [base.clone(), TERM.to_vec()].concat()),
            (
                "after its EOF header",
                [
                    base.clone(),
                    empty_eof.clone(),
                    TERM.to_vec(),
                    ns_header("shop", "orders", false, 0),
                ]
                .concat(),
            ),
            (
                "a document after the EOF header",
                [base.clone(), empty_eof.clone(), doc.clone()].concat(),
            ),
            (
                "checksum mismatch for shop.orders",
                [
                    base.clone(),
                    ns_header("shop", "orders", false, 0),
                    doc.clone(),
                    TERM.to_vec(),
                    ns_header("shop", "orders", true, 12345),
                ]
                .concat(),
            ),
            (
                "unknown namespace header field",
                [
                    base.clone(),
                    bson(&[
                        ("db", B::Str("shop")),
                        ("collection", B::Str("orders")),
                        ("x", B::I32(1)),
                    ]),
                ]
                .concat(),
            ),
            (
                "wrong BSON type",
                [
                    base.clone(),
                    bson(&[
                        ("db", B::Str("shop")),
                        ("collection", B::Str("orders")),
                        ("EOF", B::I32(1)),
                    ]),
                ]
                .concat(),
            ),
            (
                "without a collection",
                [base.clone(), bson(&[("db", B::Str("shop"))])].concat(),
            ),
            (
                "a terminator where the archive header",
                [MAGIC.to_vec(), TERM.to_vec()].concat(),
            ),
            (
                "twice",
                prelude(&[
                    ("shop", "orders", "collection"),
                    ("shop", "orders", "collection"),
                ]),
            ),
            (
                "does not end with a NUL",
                [base.clone(), ns_header("shop", "orders", false, 0), {
                    let mut d = doc.clone();
                    *d.last_mut().unwrap() = 1;
                    d
                }]
                .concat(),
            ),
        ];
        for (want, bytes) in cases {
            let e = parse(&bytes).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn absurd_lengths_are_refused_without_buffering() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(0x7fff_fff0u32.to_le_bytes());
        let mut r = ArchiveReader::new();
        let e = r.feed(&bytes).unwrap_err();
        assert!(
            e.to_string()
                .contains("neither a valid BSON document length"),
            "{e}"
        );
        assert_eq!(r.doc.capacity(), 0);
        for len in [0u32, 4, MAX_DOCUMENT + 1] {
            let mut bytes = prelude(&[("shop", "orders", "collection")]);
            bytes.extend(ns_header("shop", "orders", false, 0));
            bytes.extend(len.to_le_bytes());
            assert!(parse(&bytes).is_err(), "{len}");
        }
    }

    #[test]
    fn bit_flips_in_length_prefixes_are_errors_and_nothing_panics() {
        let bytes = sample();
        // Collect the offsets of every length prefix and terminator by walking the archive.
        let mut words = Vec::new();
        let mut pos = 4;
        while pos < bytes.len() {
            words.push(pos);
            let v = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
            pos += if v == TERMINATOR { 4 } else { v as usize };
        }
        assert_eq!(pos, bytes.len());
        for &w in &words {
            for bit in 0..32 {
                let mut b = bytes.clone();
                b[w + bit / 8] ^= 1 << (bit % 8);
                assert!(parse(&b).is_err(), "flip of bit {bit} of the word at {w}");
            }
        }
        // Anywhere else: never a panic; inside a collection document, the checksum catches it.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = parse(&b);
            }
        }
        let first_doc = prelude(&[
            ("shop", "orders", "collection"),
            ("shop", "customers", "collection"),
            ("shop", "v", "view"),
        ])
        .len()
            + ns_header("shop", "orders", false, 0).len();
        let mut b = bytes.clone();
        b[first_doc + 20] ^= 0x10;
        let e = parse(&b).unwrap_err();
        assert!(
            e.to_string().contains("checksum mismatch for shop.orders"),
            "{e}"
        );
    }

    /// `mongorestore/testdata/test.bar.archive` from mongodb/mongo-tools (Apache-2.0): written by
    /// mongodump r3.4.3, so its checksums are the real tool's.
    const REAL_ARCHIVE_HEX: &str = concat!(
        "6de299816500000010636f6e63757272656e745f636f6c6c656374696f6e7300040000000276657273696f6e00040000",
        "00302e3100027365727665725f76657273696f6e0006000000332e342e330002746f6f6c5f76657273696f6e00070000",
        "0072332e342e3300008f0000000264620005000000746573740002636f6c6c656374696f6e000400000062617200026d",
        "6574616461746100510000007b226f7074696f6e73223a7b7d2c22696e6465786573223a5b7b2276223a322c226b6579",
        "223a7b225f6964223a317d2c226e616d65223a225f69645f222c226e73223a22746573742e626172227d5d7d00107369",
        "7a650000000000001a010000026462000600000061646d696e0002636f6c6c656374696f6e000f00000073797374656d",
        "2e76657273696f6e00026d6574616461746100d00000007b226f7074696f6e73223a7b7d2c22696e6465786573223a5b",
        "7b2276223a312c226b6579223a7b225f6964223a317d2c226e616d65223a225f69645f222c226e73223a2261646d696e",
        "2e73797374656d2e76657273696f6e227d2c7b2276223a7b22246e756d626572446563696d616c223a2232227d2c226b",
        "6579223a7b2276657273696f6e223a317d2c226e616d65223a22696e636f6d70617469626c655f776974685f76657273",
        "696f6e5f3332222c226e73223a2261646d696e2e73797374656d2e76657273696f6e227d5d7d001073697a6500000000",
        "0000ffffffff45000000026462000600000061646d696e0002636f6c6c656374696f6e000f00000073797374656d2e76",
        "657273696f6e0008454f46000012435243000000000000000000003b000000025f6964001c0000006665617475726543",
        "6f6d7061746962696c69747956657273696f6e000276657273696f6e0004000000332e340000ffffffff450000000264",
        "62000600000061646d696e0002636f6c6c656374696f6e000f00000073797374656d2e76657273696f6e0008454f4600",
        "0112435243003e262ad02f8185f600ffffffff390000000264620005000000746573740002636f6c6c656374696f6e00",
        "040000006261720008454f460000124352430000000000000000000023000000075f69640058ffb124b721bc6c323433",
        "3c02666f6f00040000006261720000ffffffff390000000264620005000000746573740002636f6c6c656374696f6e00",
        "040000006261720008454f4600011243524300d950ec5bf3f0699300ffffffff",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_real_mongodump_archive() {
        let bytes = unhex(REAL_ARCHIVE_HEX);
        assert_eq!(bytes.len(), 896);
        let s = parse(&bytes).unwrap();
        assert_eq!(
            counts(&s),
            vec![
                ("test.bar".to_string(), 1),
                ("admin.system.version".to_string(), 1)
            ]
        );
        // Its checksums are verified: change one byte of test.bar's document and it fails.
        // (0x328 is inside the ObjectId of test.bar's only document.)
        let mut b = bytes.clone();
        b[0x328] ^= 1;
        let e = parse(&b).unwrap_err();
        assert!(
            e.to_string().contains("checksum mismatch for test.bar"),
            "{e}"
        );
    }

    fn unique_dir(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "mongodb-archive-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs the fake mongodump (copied into a private directory, so its call log and knobs are
    /// this test's own) and returns its stdout.
    fn fake_dump(knobs: &[(&str, &str)]) -> Vec<u8> {
        use std::os::unix::fs::PermissionsExt;
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-mongodump");
        let dir = unique_dir("fake-dump");
        let tool = dir.join("fake-mongodump");
        std::fs::copy(fixture, &tool).unwrap();
        for (name, content) in knobs {
            std::fs::write(dir.join(name), content).unwrap();
        }
        let config = dir.join("config.yaml");
        std::fs::write(&config, "uri: mongodb://u:p@h:27017/shop\n").unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new(&tool)
            .arg("--archive")
            .arg(format!("--config={}", config.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("\twriting shop.orders to archive on stdout"),
            "{stderr}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        out.stdout
    }

    #[test]
    fn parses_the_fake_mongodump() {
        let bytes = fake_dump(&[]);
        assert!(bytes.len() > 64 * 1024, "{}", bytes.len());
        let s = parse(&bytes).unwrap();
        assert_eq!(
            counts(&s),
            vec![
                ("shop.orders".to_string(), 2000),
                ("shop.customers".to_string(), 10)
            ]
        );
        assert_eq!(s.total_documents, 2010);
        // In 4 KiB chunks, as a pipe would deliver it.
        let mut r = ArchiveReader::new();
        for chunk in bytes.chunks(4096) {
            r.feed(chunk).unwrap();
        }
        assert_eq!(r.finish().unwrap(), s);

        let empty = parse(&fake_dump(&[("mode", "empty\n")])).unwrap();
        assert_eq!(empty.total_documents, 0);
        assert_eq!(empty.namespaces.len(), 2);

        let e = parse(&fake_dump(&[("mode", "truncate\n")])).unwrap_err();
        assert!(matches!(e, ArchiveError::Truncated(_)), "{e}");

        let few = parse(&fake_dump(&[("docs", "3\n")])).unwrap();
        assert_eq!(few.total_documents, 13);
    }
}
