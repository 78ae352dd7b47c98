//! The object-storage seam: one narrow trait, with S3 (any S3-compatible store) and local-directory
//! implementations (an in-memory one for tests lives in the dev-only testkit crate). Keys are bucket-relative and include the configured prefix.
//!
//! Uploads are streamed: [`ObjectStore::begin_upload`] returns an [`Upload`] that buffers at most a
//! few parts, and nothing is visible under the key until [`Upload::commit`]. An upload that is
//! aborted, fails, or is dropped uncommitted leaves nothing behind (no object, no multipart parts).

mod local;
mod s3;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use local::LocalStore;

/// `list_page` for stores that list everything at once (the in-memory test store).
pub async fn page_of_list(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
    max_keys: usize,
) -> Result<(Vec<ObjectInfo>, bool), StorageError> {
    let mut all = store.list(prefix).await?;
    all.sort_by(|a, b| a.key.cmp(&b.key));
    let mut page: Vec<ObjectInfo> = all
        .into_iter()
        .filter(|o| start_after.is_none_or(|after| o.key.as_str() > after))
        .take(max_keys.saturating_add(1))
        .collect();
    let more = page.len() > max_keys;
    page.truncate(max_keys);
    Ok((page, more))
}

/// `delete_many` for stores without a batch call: one delete per key.
pub async fn delete_each(store: &dyn ObjectStore, keys: &[String]) -> Vec<DeleteFailure> {
    let mut failed = Vec::new();
    for key in keys {
        if let Err(e) = store.delete(key).await {
            failed.push(DeleteFailure {
                key: key.clone(),
                error: e.to_string(),
            });
        }
    }
    failed
}
pub use s3::{S3Settings, S3Store, S3_MIN_PART_SIZE};

/// Options for S3-compatible stores (R2, Spaces, MinIO); credentials come from the AWS chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
}

/// User metadata stored with an object (x-amz-meta-* on S3).
pub type Metadata = BTreeMap<String, String>;

pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("object storage {op} failed: {detail}")]
    Request { op: &'static str, detail: String },
    #[error("local storage {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("upload already failed and was aborted")]
    Poisoned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<DateTime<Utc>>,
}

/// A key [`ObjectStore::delete_many`] could not delete, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteFailure {
    pub key: String,
    pub error: String,
}

/// Most keys one S3 DeleteObjects request may carry.
pub const DELETE_MANY_MAX_KEYS: usize = 1000;

/// An upload started but neither committed nor aborted (a multipart upload on S3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Starts a streamed upload to `key` with the metadata known up front.
    async fn begin_upload(
        &self,
        key: &str,
        metadata: Metadata,
    ) -> Result<Box<dyn Upload>, StorageError>;

    /// Streams an object's bytes.
    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError>;

    /// Size and metadata of an object.
    async fn head(&self, key: &str) -> Result<(ObjectInfo, Metadata), StorageError>;

    /// Deletes an object; deleting one that is already gone is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Deletes many objects, in requests of at most [`DELETE_MANY_MAX_KEYS`] keys (S3
    /// DeleteObjects). A key already gone is deleted; the keys that could not be deleted are
    /// returned with why (a request that failed as a whole reports every key it carried).
    async fn delete_many(&self, keys: &[String]) -> Vec<DeleteFailure>;

    /// Every committed object whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    /// One page of [`ObjectStore::list`] in key order: up to `max_keys` (at most 1000) committed
    /// objects under `prefix` whose key sorts after `start_after`, and whether more follow. A
    /// listing of millions of keys is walked a page at a time, in bounded memory.
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StorageError>;

    /// Uploads under `prefix` that were started but never committed or aborted.
    async fn list_incomplete_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError>;

    /// Discards an incomplete upload found by [`ObjectStore::list_incomplete_uploads`].
    async fn abort_incomplete_upload(&self, upload: &IncompleteUpload) -> Result<(), StorageError>;

    /// Whether the store keeps objects immutable on request (S3 Object Lock enabled on the
    /// bucket). Stores without the notion say no.
    async fn object_lock_enabled(&self) -> Result<bool, StorageError> {
        Ok(false)
    }

    /// Makes a committed object undeletable until `until` (S3 Object Lock retention): not even
    /// the credentials that wrote it may delete its data before then (governance: unless
    /// they may bypass governance retention).
    async fn lock(
        &self,
        key: &str,
        _mode: LockMode,
        _until: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        Err(StorageError::Request {
            op: "lock",
            detail: format!("{key}: this store has no Object Lock (an s3:// store needs it)"),
        })
    }
}

/// S3 Object Lock retention modes (OBJECT_LOCK_MODE, COPY_OBJECT_LOCK_MODE; DESIGN §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Deletable before retain-until only with s3:BypassGovernanceRetention.
    Governance,
    /// Deletable by nobody, root included, before retain-until.
    Compliance,
}

impl LockMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "governance" => Some(Self::Governance),
            "compliance" => Some(Self::Compliance),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Governance => "governance",
            Self::Compliance => "compliance",
        }
    }
}

#[async_trait]
pub trait Upload: Send {
    /// Appends bytes. Memory stays bounded: full parts are sent as they fill.
    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError>;

    /// Makes the object visible under its key, adding `metadata` (known only at the end, such as a
    /// checksum). Returns the stored size. On error the upload is aborted.
    async fn commit(self: Box<Self>, metadata: Metadata) -> Result<u64, StorageError>;

    /// Discards everything written; nothing remains in the store.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// STORAGE_URL: `s3://bucket/prefix` or `file:///path` (relative `file://./dir` allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    S3 { bucket: String, prefix: String },
    File { root: PathBuf },
}

impl StorageUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(rest) = raw.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid_bucket {
                return Err(format!(
                    "s3:// needs a bucket name of 3-63 lowercase letters, digits, '-' or '.', got {raw:?}"
                ));
            }
            let prefix = prefix.trim_start_matches('/');
            let prefix = if prefix.is_empty() || prefix.ends_with('/') {
                prefix.to_owned()
            } else {
                format!("{prefix}/")
            };
            validate_key(&prefix).map_err(|e| e.to_string())?;
            Ok(StorageUrl::S3 {
                bucket: bucket.to_owned(),
                prefix,
            })
        } else if let Some(path) = raw.strip_prefix("file://") {
            if path.is_empty() {
                return Err("file:// needs a directory, e.g. file:///var/backups".into());
            }
            Ok(StorageUrl::File {
                root: PathBuf::from(path),
            })
        } else {
            Err(format!(
                "expected s3://bucket/prefix or file:///path, got {raw:?}"
            ))
        }
    }

    /// The key prefix every object of this deployment starts with.
    pub fn prefix(&self) -> &str {
        match self {
            StorageUrl::S3 { prefix, .. } => prefix,
            StorageUrl::File { .. } => "",
        }
    }
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StorageUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

/// Opens the store a STORAGE_URL names. S3 credentials come from the standard AWS chain.
pub async fn open(url: &StorageUrl, s3: &S3Options) -> Result<Arc<dyn ObjectStore>, StorageError> {
    match url {
        StorageUrl::File { root } => Ok(Arc::new(LocalStore::new(root.clone()).await?)),
        StorageUrl::S3 { bucket, .. } => {
            let settings = S3Settings {
                bucket: bucket.clone(),
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                force_path_style: s3.force_path_style,
                static_credentials: None,
                profile: None,
                part_size: s3::DEFAULT_PART_SIZE,
                parts_in_flight: s3::DEFAULT_PARTS_IN_FLIGHT,
            };
            Ok(Arc::new(S3Store::new(settings).await))
        }
    }
}

/// Opens a copy destination (DESIGN §13) with its own endpoint, region and credentials only.
pub async fn open_copy(
    dest: &crate::config::CopyDestination,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    use crate::config::CopyCredentials;
    match &dest.url {
        StorageUrl::File { root } => Ok(Arc::new(LocalStore::new(root.clone()).await?)),
        StorageUrl::S3 { bucket, .. } => {
            let (static_credentials, profile) = match &dest.credentials {
                CopyCredentials::Static {
                    access_key_id,
                    secret_access_key,
                } => (
                    Some((access_key_id.clone(), secret_access_key.expose().to_owned())),
                    None,
                ),
                CopyCredentials::Profile(p) => (None, Some(p.clone())),
                CopyCredentials::None => (None, None),
            };
            // Explicit region and endpoint: the environment's AWS_REGION and AWS_ENDPOINT_URL
            // are the primary's.
            let region = dest
                .s3
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_owned());
            let endpoint = dest
                .s3
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
            let settings = S3Settings {
                bucket: bucket.clone(),
                endpoint: Some(endpoint),
                region: Some(region),
                force_path_style: dest.s3.force_path_style,
                static_credentials,
                profile,
                part_size: s3::DEFAULT_PART_SIZE,
                parts_in_flight: s3::DEFAULT_PARTS_IN_FLIGHT,
            };
            Ok(Arc::new(S3Store::new(settings).await))
        }
    }
}

/// Keys are relative, '/'-separated, without empty, '.' or '..' segments: safe as S3 keys and as
/// paths under a local root.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let invalid = |reason| StorageError::InvalidKey {
        key: key.to_owned(),
        reason,
    };
    if key.starts_with('/') || key.contains('\\') || key.contains('\0') {
        return Err(invalid("must be relative, with '/' separators"));
    }
    let trimmed = key.strip_suffix('/').unwrap_or(key);
    if !trimmed.is_empty()
        && trimmed
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid("must not contain empty, '.' or '..' segments"));
    }
    Ok(())
}

/// Copies `reader` into a new object through the streaming upload; aborts on any error.
pub async fn put_reader(
    store: &dyn ObjectStore,
    key: &str,
    mut reader: impl AsyncRead + Unpin + Send,
    metadata: Metadata,
) -> Result<u64, StorageError> {
    let mut upload = store.begin_upload(key, metadata).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(source) => {
                let _ = upload.abort().await;
                return Err(StorageError::Io {
                    op: "read source for",
                    path: key.to_owned(),
                    source,
                });
            }
        };
        if let Err(e) = upload.write(&buf[..n]).await {
            let _ = upload.abort().await;
            return Err(e);
        }
    }
    upload.commit(Metadata::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls() {
        assert_eq!(
            StorageUrl::parse("s3://my-bucket/backups").unwrap(),
            StorageUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "backups/".into()
            }
        );
        assert_eq!(StorageUrl::parse("s3://my-bucket").unwrap().prefix(), "");
        assert_eq!(
            StorageUrl::parse("file://./var/backups").unwrap(),
            StorageUrl::File {
                root: "./var/backups".into()
            }
        );
        assert_eq!(
            StorageUrl::parse("file:///srv/b").unwrap(),
            StorageUrl::File {
                root: "/srv/b".into()
            }
        );
        assert!(StorageUrl::parse("s3://B").is_err());
        assert!(StorageUrl::parse("s3://bucket/a/../b").is_err());
        assert!(StorageUrl::parse("gs://bucket").is_err());
        assert!(StorageUrl::parse("file://").is_err());
    }

    #[test]
    fn keys() {
        assert!(validate_key("p/team/res/2026-x.pgdump.gz").is_ok());
        assert!(validate_key("p/").is_ok());
        assert!(validate_key("").is_ok());
        assert!(validate_key("/abs").is_err());
        assert!(validate_key("a//b").is_err());
        assert!(validate_key("a/../b").is_err());
    }
}
