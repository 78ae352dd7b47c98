//! WAL streaming (DESIGN §14), the Postgres side: the slot's name, `pg_receivewal`'s commands and
//! error dialect, WAL file names, and how much of a growing partial segment holds WAL.
//!
//! `pg_receivewal` writes each segment as `<name>.partial` (zero-filled to the segment size at
//! creation) and renames it to `<name>` once complete; timeline switches bring `<tli>.history`
//! files. The loop (`loops::wal`) stores what appears.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use super::{parse_replication, tool_env, ConfigProblem, ToolCommand};
use crate::pipeline::StreamCheck;
use crate::secret::Secret;

/// WAL page size (XLOG_BLCKSZ): every build the platform runs uses the default.
pub const WAL_PAGE: usize = 8192;

/// `backup_worker_<resource id, hex>`: one permanent physical slot per resource.
pub fn slot_name(resource_id: Uuid) -> String {
    format!("backup_worker_{}", resource_id.simple())
}

/// A file `pg_receivewal` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WalFile {
    /// A complete segment.
    Segment { timeline: u32, segno: u64 },
    /// The segment being written.
    Partial { timeline: u32, segno: u64 },
    /// `<tli>.history`: how the timeline branched from its parent.
    History { timeline: u32 },
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

/// Segments per "xlogid" (the middle 8 hex digits of a name) at a segment size.
fn segments_per_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

impl WalFile {
    /// Parses a file name of `pg_receivewal`'s directory (anything else: `None`).
    pub fn parse(name: &str, segment_size: u64) -> Option<WalFile> {
        if let Some(tli) = name.strip_suffix(".history") {
            return Some(WalFile::History {
                timeline: hex8(tli)?,
            });
        }
        let (base, partial) = match name.strip_suffix(".partial") {
            Some(b) => (b, true),
            None => (name, false),
        };
        if base.len() != 24 {
            return None;
        }
        let timeline = hex8(&base[..8])?;
        let hi = u64::from(hex8(&base[8..16])?);
        let lo = u64::from(hex8(&base[16..])?);
        let per = segments_per_id(segment_size);
        if lo >= per {
            return None;
        }
        let segno = hi * per + lo;
        Some(if partial {
            WalFile::Partial { timeline, segno }
        } else {
            WalFile::Segment { timeline, segno }
        })
    }
}

/// The 24-hex-digit name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per = segments_per_id(segment_size);
    format!("{timeline:08X}{:08X}{:08X}", segno / per, segno % per)
}

/// `X/Y` text of an LSN.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `X/Y`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Counts, as a segment file streams past, how many of its leading bytes hold WAL pages: a page
/// counts when its header names its own address (`xlp_pageaddr`), which the zero-filled rest of
/// a growing `.partial` never does. Whole pages, so the end is rounded up to the page holding the
/// last record. Reads nothing twice and holds no more than a page header.
pub struct WrittenCheck {
    segment_start: u64,
    offset: u64,
    header: Vec<u8>,
    ended: bool,
    written: Arc<AtomicU64>,
}

impl WrittenCheck {
    /// The count lands in `written` as the stream passes.
    pub fn new(segment_start: u64, written: Arc<AtomicU64>) -> Self {
        Self {
            segment_start,
            offset: 0,
            header: Vec::with_capacity(16),
            ended: false,
            written,
        }
    }
}

impl StreamCheck for WrittenCheck {
    fn update(&mut self, mut bytes: &[u8]) {
        let page = WAL_PAGE as u64;
        while !bytes.is_empty() && !self.ended {
            let in_page = (self.offset % page) as usize;
            let take = if in_page < 16 {
                16 - in_page
            } else {
                WAL_PAGE - in_page
            }
            .min(bytes.len());
            if in_page < 16 {
                self.header.extend_from_slice(&bytes[..take]);
            }
            self.offset += take as u64;
            bytes = &bytes[take..];
            if self.header.len() == 16 {
                let index = (self.offset - 16) / page;
                let mut addr = [0u8; 8];
                addr.copy_from_slice(&self.header[8..16]);
                self.header.clear();
                if u64::from_le_bytes(addr) != self.segment_start + index * page {
                    self.ended = true;
                } else {
                    self.written.store((index + 1) * page, Ordering::Relaxed);
                }
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<String, String> {
        Ok(format!(
            "{} bytes of WAL",
            self.written.load(Ordering::Relaxed)
        ))
    }
}

fn replication_tool(
    program: &str,
    url: &Secret,
    temp: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    let conn = parse_replication(url)?;
    let mut cmd = ToolCommand::new(program, Vec::new());
    cmd.secrets.push(url.expose().to_owned());
    tool_env(&conn, temp, &mut cmd)?;
    Ok(cmd)
}

/// Creates the slot unless it exists (a permanent physical slot: it holds the tenant's WAL while
/// no stream reads it, so a takeover loses nothing).
pub fn create_slot_command(
    url: &Secret,
    slot: &str,
    temp: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    Ok(replication_tool("pg_receivewal", url, temp)?.args([
        "--create-slot".to_owned(),
        "--if-not-exists".to_owned(),
        format!("--slot={slot}"),
        "--no-password".to_owned(),
    ]))
}

/// Drops the slot (a gap: an invalidated slot cannot stream again; a resource that left PITR).
pub fn drop_slot_command(
    url: &Secret,
    slot: &str,
    temp: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    Ok(replication_tool("pg_receivewal", url, temp)?.args([
        "--drop-slot".to_owned(),
        format!("--slot={slot}"),
        "--no-password".to_owned(),
    ]))
}

/// Streams into `dir` through `slot` until the connection ends (`--no-loop`: the loop restarts it
/// with backoff) or, with `end`, until that LSN (a `--once` pass).
pub fn receive_command(
    url: &Secret,
    slot: &str,
    dir: &Path,
    end: Option<u64>,
    temp: &Path,
) -> Result<ToolCommand, ConfigProblem> {
    let mut cmd = replication_tool("pg_receivewal", url, temp)?.args([
        "--directory".into(),
        dir.as_os_str().to_owned(),
        format!("--slot={slot}").into(),
        "--no-loop".into(),
        "--no-password".into(),
        // Feedback every 5 s: the slot follows what is on our disk, the server sees us alive.
        "--status-interval=5".into(),
    ]);
    if let Some(end) = end {
        cmd = cmd.args([format!("--endpos={}", lsn_text(end))]);
    }
    Ok(cmd)
}

/// What a `pg_receivewal` failure means for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailure {
    /// The server no longer has WAL the stream needs (an invalidated slot): a gap.
    Gap,
    /// The slot is missing (a failover to a server without it, dropped by hand): create it again.
    NoSlot,
    /// Credentials rejected, no REPLICATION, wal_level too low: no retry will help soon.
    Refused,
    /// Anything else (a restart, a network cut): restart with backoff.
    Transient,
}

/// Classifies `pg_receivewal`'s (or the server's) complaint.
pub fn classify_stream(stderr: &str) -> StreamFailure {
    let s = stderr.to_ascii_lowercase();
    if s.contains("has already been removed")
        || s.contains("this slot has been invalidated")
        || s.contains("can no longer get changes from replication slot")
        || s.contains("cannot read from logical replication slot")
        || (s.contains("replication slot") && s.contains("invalidated"))
    {
        return StreamFailure::Gap;
    }
    if s.contains("replication slot") && s.contains("does not exist") {
        return StreamFailure::NoSlot;
    }
    if matches!(super::classify(stderr), crate::domain::FailureReason::Auth)
        || s.contains("must be superuser or replication role")
        || s.contains("permission denied to start wal sender")
        || s.contains("wal_level")
        || s.contains("max_wal_senders")
        || s.contains("max_replication_slots")
    {
        return StreamFailure::Refused;
    }
    StreamFailure::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 * 1024 * 1024;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            segment_name(1, 0x1_00 + 3, SEG),
            "000000010000000100000003",
            "256 segments of 16 MiB per xlogid"
        );
        assert_eq!(
            WalFile::parse("000000010000000100000003", SEG),
            Some(WalFile::Segment {
                timeline: 1,
                segno: 259
            })
        );
        assert_eq!(
            WalFile::parse("0000000200000000000000A1.partial", SEG),
            Some(WalFile::Partial {
                timeline: 2,
                segno: 0xA1
            })
        );
        assert_eq!(
            WalFile::parse("00000002.history", SEG),
            Some(WalFile::History { timeline: 2 })
        );
        for junk in [
            "000000010000000100000003.gz",
            "00000001000000010000000",
            "0000000100000001000001FF",
            "pg_receivewal.lock",
            "x0000002.history",
        ] {
            assert_eq!(WalFile::parse(junk, SEG), None, "{junk}");
        }
        assert_eq!(lsn_text(0x1_0000_0028), "1/28");
        assert_eq!(parse_lsn("1/28"), Some(0x1_0000_0028));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(
            slot_name(Uuid::nil()),
            format!("backup_worker_{}", "0".repeat(32))
        );
    }

    fn written(bytes: &[u8], start: u64, chunk: usize) -> u64 {
        let n = Arc::new(AtomicU64::new(0));
        let mut check = WrittenCheck::new(start, n.clone());
        for c in bytes.chunks(chunk) {
            check.update(c);
        }
        n.load(Ordering::Relaxed)
    }

    #[test]
    fn written_length_stops_at_the_first_page_that_is_not_its_own() {
        let start = 5 * SEG;
        let mut seg = vec![0u8; 4 * WAL_PAGE];
        for i in 0..2u64 {
            let at = i as usize * WAL_PAGE;
            seg[at + 8..at + 16].copy_from_slice(&(start + i * WAL_PAGE as u64).to_le_bytes());
        }
        // A later page that looks like ours after a foreign one does not count.
        seg[3 * WAL_PAGE + 8..3 * WAL_PAGE + 16]
            .copy_from_slice(&(start + 3 * WAL_PAGE as u64).to_le_bytes());
        for chunk in [1, 7, 13, 4096, 1 << 20] {
            assert_eq!(
                written(&seg, start, chunk),
                2 * WAL_PAGE as u64,
                "chunks of {chunk}"
            );
        }
        assert_eq!(
            written(&seg, start + SEG, 4096),
            0,
            "another segment's pages"
        );
        assert_eq!(written(&vec![0u8; 3 * WAL_PAGE], start, 4096), 0);
    }

    #[test]
    fn stream_failures_in_the_servers_words() {
        for gap in [
            "pg_receivewal: error: could not send replication command \"START_REPLICATION\": ERROR:  requested WAL segment 000000010000000000000003 has already been removed",
            "ERROR:  can no longer get changes from replication slot \"backup_worker_x\"\nDETAIL:  This slot has been invalidated because it exceeded the maximum reserved size.",
        ] {
            assert_eq!(classify_stream(gap), StreamFailure::Gap, "{gap}");
        }
        assert_eq!(
            classify_stream("pg_receivewal: error: could not send replication command \"START_REPLICATION\": ERROR:  replication slot \"backup_worker_x\" does not exist"),
            StreamFailure::NoSlot
        );
        assert_eq!(
            classify_stream("pg_receivewal: error: connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"repl\""),
            StreamFailure::Refused
        );
        assert_eq!(
            classify_stream("FATAL:  must be superuser or replication role to start walsender"),
            StreamFailure::Refused
        );
        assert_eq!(
            classify_stream("pg_receivewal: error: unexpected termination of replication stream: server closed the connection unexpectedly"),
            StreamFailure::Transient
        );
    }
}
