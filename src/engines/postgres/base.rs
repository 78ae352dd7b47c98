//! Base backups (DESIGN §14): `pg_basebackup --format=tar --wal-method=none --checkpoint=fast
//! --pgdata=-` of the tenant's cluster, the start of a WAL chain, and the structural check of its
//! tar stream, which also reads where the chain starts (`backup_label`) and the server's major
//! version (`PG_VERSION`) as the stream passes.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::wal::parse_lsn;
use super::{parse_replication, tool_env, ConfigProblem, Dump, DumpPlan, ToolCommand};
use crate::pipeline::StreamCheck;
use crate::secret::Secret;

/// The object key's extension: `….base.tar.gz`.
pub const EXTENSION: &str = "base.tar";

pub(crate) fn dump_command(url: &Secret, temp: &Path) -> Result<Dump, ConfigProblem> {
    let conn = parse_replication(url)?;
    let mut cmd = ToolCommand::new("pg_basebackup", Vec::new()).args([
        "--format=tar",
        "--wal-method=none",
        "--checkpoint=fast",
        "--pgdata=-",
        // The manifest cannot go to stdout beside the tar on every major; the chain is verified
        // by replaying it instead.
        "--no-manifest",
        "--no-password",
    ]);
    cmd.secrets.push(url.expose().to_owned());
    tool_env(&conn, temp, &mut cmd)?;
    Ok(Dump {
        plan: DumpPlan::Tool(cmd),
        extension: EXTENSION,
        mode: None,
        fallback: None,
    })
}

/// Where a base backup's WAL chain starts, read from its `backup_label`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseInfo {
    pub start_lsn: u64,
    pub timeline: u32,
    /// `PG_VERSION`'s major.
    pub pg_major: u32,
}

/// The shared slot a [`TarCheck`] fills in once the stream has passed.
pub type BaseInfoSlot = Arc<Mutex<Option<BaseInfo>>>;

/// A tar stream read header by header: complete when its end-of-archive blocks arrive, and
/// `backup_label`, `PG_VERSION` and `global/pg_control` were in it.
pub struct TarCheck {
    buf: Vec<u8>,
    /// Bytes of the current member's content (padded to 512) still to pass.
    skip: u64,
    /// The member whose content is being collected (small files only).
    collecting: Option<(String, u64)>,
    collected: Vec<u8>,
    label: Option<String>,
    version: Option<String>,
    control: bool,
    ended: bool,
    error: Option<String>,
    out: BaseInfoSlot,
}

impl TarCheck {
    pub fn new(out: BaseInfoSlot) -> Self {
        Self {
            buf: Vec::new(),
            skip: 0,
            collecting: None,
            collected: Vec::new(),
            label: None,
            version: None,
            control: false,
            ended: false,
            error: None,
            out,
        }
    }

    fn header(&mut self, block: &[u8]) {
        if block.iter().all(|&b| b == 0) {
            self.ended = true;
            return;
        }
        let field = |from: usize, len: usize| {
            let f = &block[from..from + len];
            let end = f.iter().position(|&b| b == 0).unwrap_or(len);
            String::from_utf8_lossy(&f[..end]).into_owned()
        };
        let size_text = field(124, 12);
        let Ok(size) = u64::from_str_radix(size_text.trim(), 8) else {
            self.error = Some(format!("a tar header has an unreadable size {size_text:?}"));
            return;
        };
        let stored: u32 = block[148..156]
            .iter()
            .take_while(|&&b| b != 0 && b != b' ')
            .fold(0, |n, &b| n * 8 + u32::from(b.wrapping_sub(b'0')));
        let sum: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if stored != sum {
            self.error = Some("a tar header's checksum does not match".into());
            return;
        }
        let mut name = field(0, 100);
        let prefix = field(345, 155);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let name = name.trim_start_matches("./").to_owned();
        if name == "global/pg_control" {
            self.control = true;
        }
        if (name == "backup_label" || name == "PG_VERSION") && size < 64 * 1024 {
            self.collecting = Some((name, size));
            self.collected.clear();
        }
        self.skip = size.div_ceil(512) * 512;
    }

    fn content(&mut self, bytes: &[u8]) {
        if let Some((name, size)) = &self.collecting {
            let want = (*size as usize).saturating_sub(self.collected.len());
            self.collected
                .extend_from_slice(&bytes[..want.min(bytes.len())]);
            if self.collected.len() == *size as usize {
                let text = String::from_utf8_lossy(&self.collected).into_owned();
                if name == "backup_label" {
                    self.label = Some(text);
                } else {
                    self.version = Some(text);
                }
                self.collecting = None;
            }
        }
    }
}

impl StreamCheck for TarCheck {
    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.error.is_none() && !self.ended {
            if self.skip > 0 {
                let n = (self.skip as usize).min(bytes.len());
                self.content(&bytes[..n]);
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let need = 512 - self.buf.len();
            let n = need.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == 512 {
                let block = std::mem::take(&mut self.buf);
                self.header(&block);
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<String, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.ended {
            return Err("the tar stream ends before its end-of-archive blocks".into());
        }
        let label = self.label.ok_or("the base backup holds no backup_label")?;
        if !self.control {
            return Err("the base backup holds no global/pg_control".into());
        }
        let info = parse_label(&label, self.version.as_deref().unwrap_or(""))?;
        let summary = format!(
            "base backup of Postgres {} from {} on timeline {}",
            info.pg_major,
            super::wal::lsn_text(info.start_lsn),
            info.timeline
        );
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        Ok(summary)
    }
}

/// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` and `START TIMELINE: 1`.
pub fn parse_label(label: &str, pg_version: &str) -> Result<BaseInfo, String> {
    let mut info = BaseInfo::default();
    for line in label.lines() {
        if let Some(rest) = line.strip_prefix("START WAL LOCATION:") {
            let lsn = rest.split_whitespace().next().unwrap_or("");
            info.start_lsn =
                parse_lsn(lsn).ok_or_else(|| format!("backup_label has a bad start {lsn:?}"))?;
        } else if let Some(rest) = line.strip_prefix("START TIMELINE:") {
            info.timeline = rest
                .trim()
                .parse()
                .map_err(|_| format!("backup_label has a bad timeline {:?}", rest.trim()))?;
        }
    }
    if info.start_lsn == 0 || info.timeline == 0 {
        return Err("backup_label names no start location or timeline".into());
    }
    info.pg_major = pg_version
        .trim()
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("PG_VERSION is unreadable ({:?})", pg_version.trim()))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, body: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
        h[124..135].copy_from_slice(format!("{:011o}", body.len()).as_bytes());
        h[156] = b'0';
        h[257..262].copy_from_slice(b"ustar");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = h;
        out.extend_from_slice(body);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn archive(ended: bool) -> Vec<u8> {
        let mut t = member(
            "backup_label",
            b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n",
        );
        t.extend(member("PG_VERSION", b"15\n"));
        t.extend(member("global/pg_control", &[7u8; 8192]));
        if ended {
            t.extend(vec![0u8; 1024]);
        }
        t
    }

    #[test]
    fn reads_the_chain_start_from_the_stream_in_any_chunks() {
        let slot: BaseInfoSlot = Arc::default();
        let mut check = Box::new(TarCheck::new(slot.clone()));
        for chunk in archive(true).chunks(97) {
            check.update(chunk);
        }
        assert!(check.finish().unwrap().contains("Postgres 15"));
        assert_eq!(
            slot.lock().unwrap().clone(),
            Some(BaseInfo {
                start_lsn: 0x2000028,
                timeline: 1,
                pg_major: 15
            })
        );
    }

    #[test]
    fn a_cut_or_altered_stream_fails() {
        let mut check = Box::new(TarCheck::new(Arc::default()));
        check.update(&archive(false));
        assert!(check.finish().unwrap_err().contains("end-of-archive"));
        let mut bad = archive(true);
        bad[3] ^= 1;
        let mut check = Box::new(TarCheck::new(Arc::default()));
        check.update(&bad);
        assert!(check.finish().unwrap_err().contains("checksum"));
    }
}
