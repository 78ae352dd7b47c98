//! S3 and S3-compatible stores (R2, Spaces, MinIO). Request checksums are computed only when an
//! operation requires them: several compatible stores reject the SDK's default trailing checksums.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, MetadataDirective, ObjectIdentifier,
};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio::task::JoinSet;

use super::{
    validate_key, DeleteFailure, IncompleteUpload, Metadata, ObjectInfo, ObjectReader, ObjectStore,
    StorageError, Upload,
};

/// S3's minimum size for every part but the last.
pub const S3_MIN_PART_SIZE: usize = 5 * 1024 * 1024;
pub(super) const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading while the next one fills: memory is about (1 + this) × part size.
pub(super) const DEFAULT_PARTS_IN_FLIGHT: usize = 2;
const MAX_PARTS: i32 = 10_000;
/// Part sizes double every this many parts, so 10,000 parts reach far past any dump we take.
const PARTS_PER_SIZE_STEP: i32 = 1_000;
/// CopyObject (used to attach end-of-stream metadata to multipart objects) is limited to 5 GiB.
const MAX_COPY_SIZE: u64 = 5 * 1024 * 1024 * 1024;

#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    /// (access key id, secret); `None` uses the standard AWS credential chain.
    pub static_credentials: Option<(String, String)>,
    /// A named profile of the shared AWS files, alone (not the environment's keys): a copy
    /// destination's credentials never come from the primary's chain.
    pub profile: Option<String>,
    pub part_size: usize,
    pub parts_in_flight: usize,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field(
                "static_credentials",
                &self.static_credentials.as_ref().map(|_| "***"),
            )
            .field("part_size", &self.part_size)
            .finish()
    }
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    part_size: usize,
    parts_in_flight: usize,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Store(s3://{})", self.bucket)
    }
}

fn request_error<E>(op: &'static str, err: E) -> StorageError
where
    E: std::error::Error + 'static,
{
    StorageError::Request {
        op,
        detail: DisplayErrorContext(err).to_string(),
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// Percent-encodes a key for x-amz-copy-source, keeping '/' separators.
fn encode_copy_source(bucket: &str, key: &str) -> String {
    let mut out = format!("{bucket}/");
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl S3Store {
    pub async fn new(s: S3Settings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &s.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &s.profile {
            loader = loader.profile_name(profile).credentials_provider(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .profile_name(profile)
                    .build(),
            );
        }
        if let Some((id, secret)) = &s.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "backup-worker-static",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if shared.region().is_none() {
            // Compatible stores ignore the region but the SDK's signer needs one.
            builder = builder.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &s.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        S3Store {
            client: Client::from_conf(builder.build()),
            bucket: s.bucket,
            part_size: s.part_size.max(S3_MIN_PART_SIZE),
            parts_in_flight: s.parts_in_flight.max(1),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn begin_upload(
        &self,
        key: &str,
        metadata: Metadata,
    ) -> Result<Box<dyn Upload>, StorageError> {
        validate_key(key)?;
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            metadata,
            base_part_size: self.part_size,
            parts_in_flight: self.parts_in_flight,
            buf: BytesMut::new(),
            upload_id: None,
            next_part: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            spare: Vec::new(),
            size: 0,
            finished: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_no_such_key() => StorageError::NotFound {
                    key: key.to_owned(),
                },
                _ => request_error("GetObject", e),
            })?;
        Ok(Box::pin(out.body.into_async_read()))
    }

    async fn head(&self, key: &str) -> Result<(ObjectInfo, Metadata), StorageError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_not_found() => StorageError::NotFound {
                    key: key.to_owned(),
                },
                _ => request_error("HeadObject", e),
            })?;
        let info = ObjectInfo {
            key: key.to_owned(),
            size: out.content_length.unwrap_or(0).max(0) as u64,
            last_modified: out.last_modified.as_ref().and_then(to_chrono),
        };
        let meta = out.metadata.unwrap_or_default().into_iter().collect();
        Ok((info, meta))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| request_error("DeleteObject", e))?;
        Ok(())
    }

    /// DeleteObjects, 1000 keys a request, quiet (only failures come back). The operation
    /// requires a body checksum; with `RequestChecksumCalculation::WhenRequired` the SDK still
    /// computes one for it (and only for such operations), so S3 and compatible stores accept it.
    async fn delete_many(&self, keys: &[String]) -> Vec<DeleteFailure> {
        let mut failed = Vec::new();
        for chunk in keys.chunks(super::DELETE_MANY_MAX_KEYS) {
            let whole = |error: String| {
                chunk
                    .iter()
                    .map(|k| DeleteFailure {
                        key: k.clone(),
                        error: error.clone(),
                    })
                    .collect::<Vec<_>>()
            };
            let mut objects = Vec::with_capacity(chunk.len());
            for key in chunk {
                match ObjectIdentifier::builder().key(key).build() {
                    Ok(o) => objects.push(o),
                    Err(e) => failed.push(DeleteFailure {
                        key: key.clone(),
                        error: e.to_string(),
                    }),
                }
            }
            if objects.is_empty() {
                continue;
            }
            let delete = match Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
            {
                Ok(d) => d,
                Err(e) => {
                    failed.extend(whole(e.to_string()));
                    continue;
                }
            };
            match self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
            {
                Ok(out) => {
                    for e in out.errors.unwrap_or_default() {
                        // A key already gone is what we wanted.
                        if e.code.as_deref() == Some("NoSuchKey") {
                            continue;
                        }
                        failed.push(DeleteFailure {
                            key: e.key.unwrap_or_default(),
                            error: format!(
                                "{}: {}",
                                e.code.as_deref().unwrap_or("error"),
                                e.message.as_deref().unwrap_or("")
                            ),
                        });
                    }
                }
                Err(e) => failed.extend(whole(request_error("DeleteObjects", e).to_string())),
            }
        }
        failed
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| request_error("ListObjectsV2", e))?;
            for o in page.contents.unwrap_or_default() {
                out.push(ObjectInfo {
                    key: o.key.unwrap_or_default(),
                    size: o.size.unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified.as_ref().and_then(to_chrono),
                });
            }
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StorageError> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(start_after.map(str::to_owned))
            .max_keys(max_keys.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| request_error("ListObjectsV2", e))?;
        let objects = page
            .contents
            .unwrap_or_default()
            .into_iter()
            .map(|o| ObjectInfo {
                key: o.key.unwrap_or_default(),
                size: o.size.unwrap_or(0).max(0) as u64,
                last_modified: o.last_modified.as_ref().and_then(to_chrono),
            })
            .collect();
        Ok((objects, page.is_truncated == Some(true)))
    }

    async fn list_incomplete_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| request_error("ListMultipartUploads", e))?;
            for u in page.uploads.unwrap_or_default() {
                out.push(IncompleteUpload {
                    key: u.key.unwrap_or_default(),
                    upload_id: u.upload_id.unwrap_or_default(),
                    initiated: u.initiated.as_ref().and_then(to_chrono),
                });
            }
            if page.is_truncated != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker;
            id_marker = page.next_upload_id_marker;
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }

    async fn abort_incomplete_upload(&self, upload: &IncompleteUpload) -> Result<(), StorageError> {
        abort_multipart(&self.client, &self.bucket, &upload.key, &upload.upload_id).await
    }

    async fn object_lock_enabled(&self) -> Result<bool, StorageError> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                == Some(&aws_sdk_s3::types::ObjectLockEnabled::Enabled)),
            Err(e) if e.code() == Some("ObjectLockConfigurationNotFoundError") => Ok(false),
            Err(e) => Err(StorageError::Request {
                op: "get object lock configuration",
                detail: DisplayErrorContext(e).to_string(),
            }),
        }
    }

    async fn lock(
        &self,
        key: &str,
        mode: super::LockMode,
        until: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};
        validate_key(key)?;
        let mode = match mode {
            super::LockMode::Governance => ObjectLockRetentionMode::Governance,
            super::LockMode::Compliance => ObjectLockRetentionMode::Compliance,
        };
        let retention = ObjectLockRetention::builder()
            .mode(mode)
            .retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                until.timestamp(),
            ))
            .build();
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(key)
            .retention(retention)
            .send()
            .await
            .map(drop)
            .map_err(|e| StorageError::Request {
                op: "put object retention",
                detail: DisplayErrorContext(e).to_string(),
            })
    }
}

async fn abort_multipart(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), StorageError> {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // Already gone (aborted or completed by someone else): nothing is left behind.
        Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
        Err(e) => Err(request_error("AbortMultipartUpload", e)),
    }
}

struct S3Upload {
    client: Client,
    bucket: String,
    key: String,
    metadata: Metadata,
    base_part_size: usize,
    parts_in_flight: usize,
    buf: BytesMut,
    upload_id: Option<String>,
    next_part: i32,
    in_flight: JoinSet<Result<(CompletedPart, Option<BytesMut>), StorageError>>,
    done: Vec<CompletedPart>,
    /// Buffers of finished parts, reused so memory stays flat however many parts an object has.
    spare: Vec<BytesMut>,
    size: u64,
    /// Committed or aborted: Drop has nothing to clean up.
    finished: bool,
}

impl S3Upload {
    fn current_part_size(&self) -> usize {
        let step = ((self.next_part - 1) / PARTS_PER_SIZE_STEP).min(10) as u32;
        self.base_part_size.saturating_mul(1usize << step)
    }

    async fn ensure_multipart(&mut self) -> Result<String, StorageError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/octet-stream")
            .set_metadata(Some(self.metadata.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| request_error("CreateMultipartUpload", e))?;
        let id = out.upload_id.ok_or_else(|| StorageError::Request {
            op: "CreateMultipartUpload",
            detail: "response carried no upload id".into(),
        })?;
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    async fn reap_one(&mut self) -> Result<(), StorageError> {
        match self.in_flight.join_next().await {
            None => Ok(()),
            Some(Ok(Ok((part, buffer)))) => {
                self.done.push(part);
                if let Some(mut b) = buffer {
                    b.clear();
                    self.spare.push(b);
                }
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(StorageError::Request {
                op: "UploadPart",
                detail: format!("part task ended abnormally: {join}"),
            }),
        }
    }

    async fn send_part(&mut self, body: Bytes) -> Result<(), StorageError> {
        if self.next_part > MAX_PARTS {
            return Err(StorageError::Request {
                op: "UploadPart",
                detail: format!("object exceeds {MAX_PARTS} parts"),
            });
        }
        let upload_id = self.ensure_multipart().await?;
        while self.in_flight.len() >= self.parts_in_flight {
            self.reap_one().await?;
        }
        let part_number = self.next_part;
        self.next_part += 1;
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body.clone()));
        self.in_flight.spawn(async move {
            let out = req
                .send()
                .await
                .map_err(|e| request_error("UploadPart", e))?;
            let part = CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag)
                .build();
            // The request is gone: if nothing else holds the part, its buffer can be reused.
            Ok((part, body.try_into_mut().ok()))
        });
        Ok(())
    }

    async fn write_inner(&mut self, mut data: &[u8]) -> Result<(), StorageError> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let part_size = self.current_part_size();
            if self.buf.capacity() == 0 {
                // A recycled buffer, else one exact-size allocation: a sent part pins nothing
                // but itself, and steady state allocates nothing.
                self.buf = match self.spare.pop() {
                    Some(b) if b.capacity() >= part_size => b,
                    _ => BytesMut::with_capacity(part_size),
                };
            }
            let take = (part_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == part_size {
                let part = std::mem::take(&mut self.buf).freeze();
                self.send_part(part).await?;
            }
        }
        Ok(())
    }

    async fn commit_inner(&mut self, extra: Metadata) -> Result<u64, StorageError> {
        let mut metadata = self.metadata.clone();
        metadata.extend(extra.clone());
        if self.upload_id.is_none() {
            // Small object: one PutObject carries all the metadata.
            let body = std::mem::take(&mut self.buf).freeze();
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .content_type("application/octet-stream")
                .content_length(body.len() as i64)
                .set_metadata(Some(metadata.into_iter().collect()))
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| request_error("PutObject", e))?;
            return Ok(self.size);
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf).freeze();
            self.send_part(last).await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        let mut parts = std::mem::take(&mut self.done);
        parts.sort_by_key(|p| p.part_number);
        let upload_id = self.upload_id.clone().unwrap_or_default();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| request_error("CompleteMultipartUpload", e))?;
        self.upload_id = None;
        if !extra.is_empty() {
            // Metadata known only at the end (the checksum) is attached by an in-place copy.
            if self.size > MAX_COPY_SIZE {
                tracing::warn!(key = %self.key, size = self.size,
                    "object over 5 GiB: end-of-stream metadata kept only in the database");
            } else if let Err(e) = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .copy_source(encode_copy_source(&self.bucket, &self.key))
                .metadata_directive(MetadataDirective::Replace)
                .content_type("application/octet-stream")
                .set_metadata(Some(metadata.into_iter().collect()))
                .send()
                .await
            {
                let err = request_error("CopyObject", e);
                // All or nothing: do not leave an object the caller was told failed.
                let _ = self
                    .client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await;
                return Err(err);
            }
        }
        Ok(self.size)
    }

    async fn abort_inner(&mut self) -> Result<(), StorageError> {
        self.finished = true;
        self.buf = BytesMut::new();
        // Stop part uploads first so none lands after the abort.
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        match self.upload_id.take() {
            Some(id) => abort_multipart(&self.client, &self.bucket, &self.key, &id).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        if self.finished {
            return Err(StorageError::Poisoned);
        }
        if let Err(e) = self.write_inner(data).await {
            if let Err(abort) = self.abort_inner().await {
                tracing::warn!(key = %self.key, error = %abort, "abort after failed write failed");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, metadata: Metadata) -> Result<u64, StorageError> {
        if self.finished {
            return Err(StorageError::Poisoned);
        }
        match self.commit_inner(metadata).await {
            Ok(size) => {
                self.finished = true;
                Ok(size)
            }
            Err(e) => {
                if let Err(abort) = self.abort_inner().await {
                    tracing::warn!(key = %self.key, error = %abort, "abort after failed commit failed");
                }
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        if self.finished {
            return Ok(());
        }
        self.abort_inner().await
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.in_flight.abort_all();
        // Dropped mid-stream (task cancelled): abort in the background so no parts are left.
        if let (Some(id), Ok(rt)) = (self.upload_id.take(), tokio::runtime::Handle::try_current()) {
            let (client, bucket, key) =
                (self.client.clone(), self.bucket.clone(), self.key.clone());
            rt.spawn(async move {
                if let Err(e) = abort_multipart(&client, &bucket, &key, &id).await {
                    tracing::warn!(%key, error = %e, "abort of dropped upload failed; the orphan sweep will retry");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_is_encoded() {
        assert_eq!(encode_copy_source("b", "p/a b+c.gz"), "b/p/a%20b%2Bc.gz");
    }
}
