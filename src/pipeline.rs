//! The backup data path's middle: raw dump bytes → gzip → [age encryption to the team's key] →
//! sha256 (of the stored bytes) → upload,
//! streamed with fixed buffers. The raw stream passes through its engine's structural check on the
//! way (no second read); the pipeline neither commits nor aborts: the caller decides once the
//! source has finished and the check has spoken.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::GzipEncoder;
use async_compression::Level;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};

use crate::storage::{StorageError, Upload};

/// Raw bytes remembered from the start of the stream (for messages).
const HEAD_LEN: usize = 16;
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the dump stream failed: {0}")]
    Source(std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("encrypting the backup failed: {0}")]
    Encrypt(std::io::Error),
}

/// An engine's structural check of a raw dump stream (DESIGN §5 `sanity`), fed as it passes.
pub trait StreamCheck: Send {
    fn update(&mut self, bytes: &[u8]);
    /// The stream ended: complete (a one-line summary) or not (why, as a sentence).
    fn finish(self: Box<Self>) -> Result<String, String>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Hex sha256 of the stored (gzip) bytes.
    pub sha256: String,
    pub head: Vec<u8>,
    /// The structural check's verdict on the raw stream.
    pub check: Result<String, String>,
}

/// Counts raw bytes, keeps the first few and feeds the structural check.
struct Inspect<R> {
    inner: R,
    raw_bytes: u64,
    head: Vec<u8>,
    check: Box<dyn StreamCheck>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Inspect<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            let need = HEAD_LEN.saturating_sub(this.head.len()).min(new.len());
            this.head.extend_from_slice(&new[..need]);
            this.raw_bytes += new.len() as u64;
            this.check.update(new);
        }
        r
    }
}

/// Streams `source` through gzip at `level` (then `encrypt`, when given) into `upload`, hashing
/// what is stored.
pub async fn gzip_to_upload<R: AsyncRead + Unpin>(
    source: R,
    check: Box<dyn StreamCheck>,
    upload: &mut dyn Upload,
    level: u32,
    mut encrypt: Option<crate::crypto::Encrypt>,
) -> Result<Streamed, PipelineError> {
    let inspect = Inspect {
        inner: source,
        raw_bytes: 0,
        head: Vec::with_capacity(HEAD_LEN),
        check,
    };
    let mut gz = GzipEncoder::with_quality(
        BufReader::with_capacity(CHUNK, inspect),
        Level::Precise(level as i32),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut stored = 0u64;
    loop {
        let n = gz.read(&mut buf).await.map_err(PipelineError::Source)?;
        if n == 0 {
            break;
        }
        let sealed;
        let out: &[u8] = match encrypt.as_mut() {
            Some(e) => {
                sealed = e.push(&buf[..n]).map_err(PipelineError::Encrypt)?;
                &sealed
            }
            None => &buf[..n],
        };
        if !out.is_empty() {
            hasher.update(out);
            upload.write(out).await?;
            stored += out.len() as u64;
        }
    }
    if let Some(e) = encrypt {
        let last = e.finish().map_err(PipelineError::Encrypt)?;
        hasher.update(&last);
        upload.write(&last).await?;
        stored += last.len() as u64;
    }
    let inspect = gz.into_inner().into_inner();
    Ok(Streamed {
        raw_bytes: inspect.raw_bytes,
        stored_bytes: stored,
        sha256: hex::encode(hasher.finalize()),
        head: inspect.head,
        check: inspect.check.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStore, Metadata, ObjectStore};
    use std::io::Read;

    #[tokio::test]
    async fn gzip_and_hash_what_is_stored() {
        let store = MemoryStore::new();
        let raw: Vec<u8> = b"PGDMP"
            .iter()
            .copied()
            .chain((0..300_000u32).flat_map(|i| i.to_le_bytes()))
            .collect();
        let mut up = store.begin_upload("k", Metadata::new()).await.unwrap();
        struct Magic(Vec<u8>);
        impl StreamCheck for Magic {
            fn update(&mut self, bytes: &[u8]) {
                if self.0.len() < 5 {
                    self.0
                        .extend_from_slice(&bytes[..bytes.len().min(5 - self.0.len())]);
                }
            }
            fn finish(self: Box<Self>) -> Result<String, String> {
                (self.0 == b"PGDMP")
                    .then(String::new)
                    .ok_or_else(String::new)
            }
        }
        let s = gzip_to_upload(&raw[..], Box::new(Magic(Vec::new())), up.as_mut(), 6, None)
            .await
            .unwrap();
        assert_eq!(s.check, Ok(String::new()));
        up.commit(Metadata::new()).await.unwrap();
        let stored = store.bytes("k").unwrap();
        assert_eq!(s.raw_bytes, raw.len() as u64);
        assert_eq!(s.stored_bytes, stored.len() as u64);
        assert_eq!(s.sha256, hex::encode(Sha256::digest(&stored)));
        assert_eq!(&s.head[..5], b"PGDMP");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&stored[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, raw);
    }
}
