//! The RDB check, reader and writer against server-made fixtures and synthetic streams.

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
fn pre_checksum_versions_read_and_pass_the_check() {
    // RDB < 5 (Redis < 2.6) ends at the EOF opcode: no checksum to read or verify (DESIGN §11).
    let mut rdb = b"REDIS0004".to_vec();
    rdb.extend_from_slice(&[OP_SELECTDB, 0, T_STRING, 1, b'k', 1, b'v', OP_EOF]);
    let (v, items) = read_all(rdb.as_slice()).unwrap();
    assert_eq!(v, 4);
    let RdbItem::Key(e) = &items[1] else {
        panic!("{items:?}");
    };
    assert_eq!(payload_version(&e.payload), Some(4));
    for chunk in [1, 4, 64] {
        let s = check_all(&rdb, chunk).unwrap();
        assert_eq!((s.version, s.total_bytes), (4, rdb.len() as u64));
    }
    // Cut short (no EOF opcode at the end), or nothing after the header: still refused.
    for cut in [&rdb[..rdb.len() - 1], &rdb[..9]] {
        let err = check_all(cut, 3).unwrap_err();
        assert!(err.to_string().contains("EOF opcode"), "{err}");
    }
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
