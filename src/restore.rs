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
/// decodes (its CRC checks out) and the raw dump passes its engine's structural `check`. Only the
/// stored bytes are kept on disk (one copy, the object's size): decryption and decompression are
/// streamed from that file, here and whenever the engine reads it. A temporary directory without
/// room for the object fails `config` (the worker's environment, not the backup) before or while
/// downloading, saying how many bytes are needed.
/// Which destination a verified download was read from (DESIGN §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Primary,
    Copy,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Primary => "primary",
            Source::Copy => "copy",
        }
    }
}

/// [`download_verified`] from the primary, and — when the primary's object is missing,
/// unreadable or fails its sha256 or its decode — from the copy destination, with a fresh check.
/// A failure of the worker's own environment (a full temporary directory) is not retried
/// elsewhere. When both fail, the primary's failure is returned with the copy's appended.
#[allow(clippy::too_many_arguments)]
pub async fn download_from_any(
    primary: &dyn ObjectStore,
    copy: Option<(&dyn ObjectStore, &str)>,
    key: &str,
    expected_sha256: &str,
    expected_size: Option<u64>,
    check: impl Fn() -> Box<dyn StreamCheck>,
    dir: &Path,
    identity: Option<age::x25519::Identity>,
) -> Result<(BackupFile, Source), Failure> {
    let first = download_verified(
        primary,
        key,
        expected_sha256,
        expected_size,
        check(),
        dir,
        identity.clone(),
    )
    .await;
    let (primary_failure, (copy, copy_key)) = match (first, copy) {
        (Ok(file), _) => return Ok((file, Source::Primary)),
        (Err(f), Some(copy))
            if matches!(f.reason, FailureReason::Integrity | FailureReason::Upload) =>
        {
            (f, copy)
        }
        (Err(f), _) => return Err(f),
    };
    tracing::warn!(object_key = %key, reason = primary_failure.reason.as_str(), detail = %primary_failure.detail,
        "the primary object does not serve; reading the copy");
    match download_verified(
        copy,
        copy_key,
        expected_sha256,
        expected_size,
        check(),
        dir,
        identity,
    )
    .await
    {
        Ok(file) => Ok((file, Source::Copy)),
        Err(c) => Err(fail(
            primary_failure.reason,
            format!(
                "{}; the copy does not serve either: {}",
                primary_failure.detail, c.detail
            ),
        )),
    }
}

pub async fn download_verified(
    store: &dyn ObjectStore,
    key: &str,
    expected_sha256: &str,
    expected_size: Option<u64>,
    mut check: Box<dyn StreamCheck>,
    dir: &Path,
    identity: Option<age::x25519::Identity>,
) -> Result<BackupFile, Failure> {
    let path = dir.join(if identity.is_some() {
        "backup.gz.age"
    } else {
        "backup.gz"
    });
    if let Some(needed) = expected_size {
        if let Some(free) = free_bytes(dir) {
            if free < needed {
                return Err(disk_full(needed, Some(free)));
            }
        }
    }
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
    let needed = expected_size.unwrap_or(0);
    let write_err = |e: std::io::Error| {
        if is_disk_full(&e) {
            disk_full(needed, free_bytes(dir))
        } else {
            fail(FailureReason::Upload, format!("downloading {key}: {e}"))
        }
    };
    let read_err =
        |e: std::io::Error| fail(FailureReason::Upload, format!("downloading {key}: {e}"));
    let mut file = File::create(&path).await.map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(write_err)?;
    }
    file.flush().await.map_err(write_err)?;
    file.sync_all().await.map_err(write_err)?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(fail(
            FailureReason::Integrity,
            format!("sha256 of {key} is {actual}, the backup row says {expected_sha256}"),
        ));
    }
    let backup = BackupFile { path, identity };
    // Decode it all once before anything destructive: a truncated, corrupt or tampered stream
    // fails here. Decryption, ISA-L's inflate and the engine's check run on a blocking thread,
    // off the runtime. Dropping this future (a timeout, shutdown, a lost lease) stops the thread
    // at its next chunk rather than letting it decode gigabytes nobody waits for.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop_on_drop = StopOnDrop(stop.clone());
    let reading = backup.clone();
    let decoded =
        tokio::task::spawn_blocking(move || -> Result<Box<dyn StreamCheck>, std::io::Error> {
            let gz = reading.open_gzip()?;
            let mut decoder = crate::gzip::GzipDecoder::new(gz);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(std::io::Error::other("stopped"));
                }
                match std::io::Read::read(&mut decoder, &mut buf) {
                    Ok(0) => return Ok(check),
                    Ok(n) => check.update(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        // The thread failing (a panic) is ours, not the backup's.
        .map_err(|e| fail(FailureReason::Upload, format!("decoding {key}: {e}")))?;
    let check = decoded.map_err(|e| {
        if crate::crypto::is_decrypt_error(&e) {
            fail(
                FailureReason::Integrity,
                format!("{key} does not decrypt: {e}"),
            )
        } else {
            fail(
                FailureReason::Integrity,
                format!("{key} does not decompress: {e}"),
            )
        }
    })?;
    if let Err(why) = check.finish() {
        return Err(fail(
            FailureReason::Integrity,
            format!("{key} fails its structural check: {why}"),
        ));
    }
    Ok(backup)
}

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// ENOSPC or EDQUOT: the worker's disk, not the store.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

fn disk_full(needed: u64, free: Option<u64>) -> Failure {
    let free = free.map(|f| format!(", {f} available")).unwrap_or_default();
    fail(
        FailureReason::Config,
        format!(
            "the worker's temporary directory is full: {needed} bytes needed{free} \
             (size the pod's temporary volume for the largest backup per concurrent restore or \
             verification)"
        ),
    )
}
