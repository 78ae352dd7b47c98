//! What every restore shares (DESIGN §6), whatever the engine: the backup object is downloaded
//! and verified — sha256 against the row, the whole gzip stream decoded, the raw stream's first
//! bytes — before the engine's first destructive step. The rewinds themselves live in their
//! engine's room (`engines::postgres`, `engines::mongodb`, `engines::redis`).

use std::path::Path;

use async_compression::tokio::bufread::GzipDecoder;
use sha2::{Digest, Sha256};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use crate::domain::FailureReason;
use crate::engines::{fail, BackupFile, Failure};
use crate::pipeline::StreamCheck;
use crate::storage::{ObjectStore, StorageError};

/// Downloads `key` into `dir` while hashing it; refuses (integrity) unless the sha256 matches
/// the row, the whole gzip stream decodes (its CRC checks out) and the raw dump passes its
/// engine's structural `check`.
pub async fn download_verified(
    store: &dyn ObjectStore,
    key: &str,
    expected_sha256: &str,
    mut check: Box<dyn StreamCheck>,
    dir: &Path,
) -> Result<BackupFile, Failure> {
    let path = dir.join("backup.gz");
    let mut reader = match store.get(key).await {
        Ok(r) => r,
        Err(StorageError::NotFound { .. }) => {
            return Err(fail(
                FailureReason::Integrity,
                format!("backup object {key} is missing"),
            ))
        }
        Err(e) => return Err(fail(FailureReason::Upload, e.to_string())),
    };
    let io = |e: std::io::Error| fail(FailureReason::Upload, format!("downloading {key}: {e}"));
    let mut file = File::create(&path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(fail(
            FailureReason::Integrity,
            format!("sha256 of {key} is {actual}, the backup row says {expected_sha256}"),
        ));
    }
    // Decode it all once before anything destructive: a truncated or corrupt stream fails here.
    let file = File::open(&path).await.map_err(io)?;
    let mut decoder = GzipDecoder::new(BufReader::with_capacity(128 * 1024, file));
    loop {
        let n = decoder.read(&mut buf).await.map_err(|e| {
            fail(
                FailureReason::Integrity,
                format!("{key} does not decompress: {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
    }
    if let Err(why) = check.finish() {
        return Err(fail(
            FailureReason::Integrity,
            format!("{key} fails its structural check: {why}"),
        ));
    }
    Ok(BackupFile { path })
}
