//! The backup data path's middle: raw dump bytes → gzip → [age encryption to the team's key] →
//! sha256 (of the stored bytes) → upload, streamed with fixed buffers, as three overlapping
//! stages:
//!
//! ```text
//!  source ──read──▶ [raw chunks, 1 MiB] ──▶ compressor thread ──▶ [gzip chunks] ──▶ encrypt → sha256 → upload
//!  (async: count, head,   bounded queue      (ISA-L / zlib-rs,      bounded queue   (async: the next part
//!   structural check)                         blocking pool)                         uploads meanwhile)
//! ```
//!
//! The dump's pipe is drained while the previous chunk is compressed, and hashing and uploading
//! happen off the compression thread. Memory is the queues' few chunks plus the store's part
//! buffers, whatever the dump's size; nothing touches disk. The pipeline neither commits nor
//! aborts: the caller decides once the source has finished and the check has spoken.

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::gzip::{Deflate, GzipEncoder};
use crate::storage::{StorageError, Upload};

/// Raw bytes remembered from the start of the stream (for messages).
const HEAD_LEN: usize = 16;
/// Raw bytes handed to the compressor at a time.
const CHUNK: usize = 1024 * 1024;
/// Chunks waiting between stages: enough to ride out a slow part upload or a burst of the dump,
/// small enough that memory stays flat.
const QUEUE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the dump stream failed: {0}")]
    Source(std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("encrypting the backup failed: {0}")]
    Encrypt(std::io::Error),
    #[error("compressing the backup failed: {0}")]
    Compress(std::io::Error),
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

/// What the read stage learned of the raw stream.
struct Raw {
    bytes: u64,
    head: Vec<u8>,
    check: Box<dyn StreamCheck>,
}

/// Stage 1: reads the source into chunks, counting, keeping the head and feeding the check. Ends
/// early (Ok) when the compressor has gone away: the stage that failed reports why.
async fn read_source<R: AsyncRead + Unpin>(
    mut source: R,
    mut check: Box<dyn StreamCheck>,
    to_compressor: mpsc::Sender<Vec<u8>>,
    sink_failed: CancellationToken,
) -> Result<Raw, std::io::Error> {
    let mut raw = 0u64;
    let mut head = Vec::with_capacity(HEAD_LEN);
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            // A failed store ends the read at once, even while the tool is silent (waiting on a
            // lock): its error is recorded now, not at BACKUP_TIMEOUT.
            let n = tokio::select! {
                n = source.read_buf(&mut chunk) => n?,
                _ = sink_failed.cancelled() => return Ok(Raw { bytes: raw, head, check }),
            };
            if n == 0 {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let need = HEAD_LEN.saturating_sub(head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..need]);
        raw += chunk.len() as u64;
        check.update(&chunk);
        let last = chunk.len() < CHUNK;
        if to_compressor.send(chunk).await.is_err() || last {
            break;
        }
    }
    Ok(Raw {
        bytes: raw,
        head,
        check,
    })
}

/// Stage 2 (a blocking thread): compresses chunks as they come; the end of the input channel is
/// the end of the stream. Stops when the next stage has gone away.
fn compress(
    deflate: Deflate,
    mut from_reader: mpsc::Receiver<Vec<u8>>,
    to_sink: mpsc::Sender<Vec<u8>>,
) -> Result<(), std::io::Error> {
    let mut encoder = GzipEncoder::new(deflate);
    while let Some(chunk) = from_reader.blocking_recv() {
        let mut out = Vec::with_capacity(chunk.len() / 2);
        encoder.write(&chunk, &mut out)?;
        if !out.is_empty() && to_sink.blocking_send(out).is_err() {
            return Ok(());
        }
    }
    let mut out = Vec::new();
    encoder.finish(&mut out)?;
    let _ = to_sink.blocking_send(out);
    Ok(())
}

/// Stage 3: encrypts (when asked), hashes and uploads what the compressor produces.
async fn store(
    mut from_compressor: mpsc::Receiver<Vec<u8>>,
    upload: &mut dyn Upload,
    encrypt: Option<crate::crypto::Encrypt>,
    failed: CancellationToken,
) -> Result<(u64, String), PipelineError> {
    // Cancelled unless this stage finishes cleanly (an error return drops the guard).
    let guard = failed.drop_guard();
    let stored = store_all(&mut from_compressor, upload, encrypt).await?;
    guard.disarm();
    Ok(stored)
}

async fn store_all(
    from_compressor: &mut mpsc::Receiver<Vec<u8>>,
    upload: &mut dyn Upload,
    mut encrypt: Option<crate::crypto::Encrypt>,
) -> Result<(u64, String), PipelineError> {
    let mut hasher = Sha256::new();
    let mut stored = 0u64;
    while let Some(gz) = from_compressor.recv().await {
        let sealed;
        let out: &[u8] = match encrypt.as_mut() {
            Some(e) => {
                sealed = e.push(&gz).map_err(PipelineError::Encrypt)?;
                &sealed
            }
            None => &gz,
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
    Ok((stored, hex::encode(hasher.finalize())))
}

/// Streams `source` through gzip (`deflate`), then `encrypt` when given, into `upload`, hashing
/// what is stored. When stages fail, the storage error wins (a store that stops accepting bytes
/// makes the dump tool die of a broken pipe: the store is the cause), then the source's, then
/// the compressor's.
pub async fn gzip_to_upload<R: AsyncRead + Unpin>(
    source: R,
    check: Box<dyn StreamCheck>,
    upload: &mut dyn Upload,
    deflate: Deflate,
    encrypt: Option<crate::crypto::Encrypt>,
) -> Result<Streamed, PipelineError> {
    let (raw_tx, raw_rx) = mpsc::channel(QUEUE);
    let (gz_tx, gz_rx) = mpsc::channel(QUEUE);
    // Dropping this future (timeout, shutdown) drops both channel ends it holds, which ends the
    // compressor thread at its next chunk.
    let compressor = tokio::task::spawn_blocking(move || compress(deflate, raw_rx, gz_tx));
    let sink_failed = CancellationToken::new();
    let (read, stored) = tokio::join!(
        read_source(source, check, raw_tx, sink_failed.clone()),
        store(gz_rx, upload, encrypt, sink_failed)
    );
    let compressed = match compressor.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(format!(
            "the compressor thread failed: {e}"
        ))),
    };
    let stored = match stored {
        Err(e @ PipelineError::Storage(_)) => return Err(e),
        other => other,
    };
    let raw = read.map_err(PipelineError::Source)?;
    compressed.map_err(PipelineError::Compress)?;
    let (stored_bytes, sha256) = stored?;
    Ok(Streamed {
        raw_bytes: raw.bytes,
        stored_bytes,
        sha256,
        head: raw.head,
        check: raw.check.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{LocalStore, Metadata, ObjectStore};
    use std::io::Read;

    #[tokio::test]
    async fn gzip_and_hash_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf()).await.unwrap();
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
        let s = gzip_to_upload(
            &raw[..],
            Box::new(Magic(Vec::new())),
            up.as_mut(),
            Deflate::for_gzip_level(6),
            None,
        )
        .await
        .unwrap();
        assert_eq!(s.check, Ok(String::new()));
        up.commit(Metadata::new()).await.unwrap();
        let stored = std::fs::read(dir.path().join("k")).unwrap();
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
