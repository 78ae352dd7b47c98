//! What every restore shares (DESIGN §6), whatever the engine: the backup object is downloaded
//! and verified — sha256 against the row, the whole gzip stream decoded, the raw stream's first
//! bytes — before the engine's first destructive step. The rewinds themselves live in their
//! engine's room (`engines::postgres`, `engines::mongodb`, `engines::redis`).

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::domain::FailureReason;
use crate::engines::{fail, BackupFile, Failure};
use crate::pipeline::StreamCheck;
use crate::storage::{ObjectStore, StorageError};

/// The identity that opens a backup encrypted to `key_id` (DESIGN §12), or `None` for a plain
/// one. A destroyed team key, or an encrypted backup without a master key, fails `config`.
pub async fn backup_identity(
    pool: &sqlx::PgPool,
    master: Option<&crate::crypto::MasterKey>,
    key_id: Option<uuid::Uuid>,
) -> Result<Option<age::x25519::Identity>, Failure> {
    use crate::crypto::KeyError;
    let Some(key_id) = key_id else {
        return Ok(None);
    };
    let Some(master) = master else {
        return Err(fail(
            FailureReason::Config,
            "the backup is encrypted and ENCRYPTION_KEY_FILE is not set",
        ));
    };
    match crate::crypto::identity(pool, master, key_id).await {
        Ok(id) => Ok(Some(id)),
        Err(KeyError::Db(e)) => Err(fail(
            FailureReason::Upload,
            format!("reading the team's backup key: {e}"),
        )),
        Err(e) => Err(fail(FailureReason::Config, e.to_string())),
    }
}

/// Downloads `key` into `dir` while hashing it; refuses (integrity) unless the sha256 matches
/// the row, the object decrypts with `identity` (an encrypted backup), the whole gzip stream
/// decodes (its CRC checks out) and the raw dump passes its engine's structural `check`.
pub async fn download_verified(
    store: &dyn ObjectStore,
    key: &str,
    expected_sha256: &str,
    mut check: Box<dyn StreamCheck>,
    dir: &Path,
    identity: Option<age::x25519::Identity>,
) -> Result<BackupFile, Failure> {
    let path = dir.join("backup.gz");
    let stored_path = if identity.is_some() {
        dir.join("backup.gz.age")
    } else {
        path.clone()
    };
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
    let mut file = File::create(&stored_path).await.map_err(io)?;
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
    if let Some(identity) = identity {
        let (from, to) = (stored_path.clone(), path.clone());
        let decrypted =
            tokio::task::spawn_blocking(move || crate::crypto::decrypt_file(&identity, &from, &to))
                .await
                .map_err(|e| fail(FailureReason::Integrity, format!("decrypting {key}: {e}")))?;
        let _ = tokio::fs::remove_file(&stored_path).await;
        decrypted.map_err(|why| {
            fail(
                FailureReason::Integrity,
                format!("{key} does not decrypt: {why}"),
            )
        })?;
    }
    // Decode it all once before anything destructive: a truncated or corrupt stream fails here.
    // ISA-L's inflate and the engine's check run on a blocking thread, off the runtime.
    // Dropping this future (a timeout, shutdown, a lost lease) stops the thread at its next
    // chunk rather than letting it decode gigabytes nobody waits for.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop_on_drop = StopOnDrop(stop.clone());
    let decode_path = path.clone();
    let decoded = tokio::task::spawn_blocking(move || -> Result<Box<dyn StreamCheck>, String> {
        let file = std::fs::File::open(&decode_path).map_err(|e| e.to_string())?;
        let mut decoder = crate::gzip::GzipDecoder::new(file);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("stopped".into());
            }
            match std::io::Read::read(&mut decoder, &mut buf) {
                Ok(0) => return Ok(check),
                Ok(n) => check.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    // The thread failing (a panic) is ours, not the backup's.
    .map_err(|e| fail(FailureReason::Upload, format!("decoding {key}: {e}")))?;
    let check = decoded.map_err(|e| {
        fail(
            FailureReason::Integrity,
            format!("{key} does not decompress: {e}"),
        )
    })?;
    if let Err(why) = check.finish() {
        return Err(fail(
            FailureReason::Integrity,
            format!("{key} fails its structural check: {why}"),
        ));
    }
    Ok(BackupFile { path })
}
