//! An in-memory store for tests of code that uses the object-storage seam. Uploads become visible only on
//! commit; uncommitted ones are listed as incomplete until aborted or dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use backup_worker::storage::{
    validate_key, DeleteFailure, IncompleteUpload, Metadata, ObjectInfo, ObjectReader, ObjectStore,
    StorageError, Upload,
};

#[derive(Debug, Default)]
struct Inner {
    objects: BTreeMap<String, (Vec<u8>, Metadata, DateTime<Utc>)>,
    uploads: BTreeMap<String, String>,
    /// A store that corrupts: the first byte of every object it commits is flipped.
    corrupting: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated: every update is one
        // insert or remove, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A store that silently corrupts what it is given (a fault to inject).
    pub fn corrupting() -> Self {
        let s = Self::default();
        s.lock().corrupting = true;
        s
    }

    /// The committed bytes of an object (test helper).
    pub fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().objects.get(key).map(|(b, _, _)| b.clone())
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn begin_upload(
        &self,
        key: &str,
        metadata: Metadata,
    ) -> Result<Box<dyn Upload>, StorageError> {
        validate_key(key)?;
        let id = uuid::Uuid::new_v4().to_string();
        self.lock().uploads.insert(id.clone(), key.to_owned());
        Ok(Box::new(MemoryUpload {
            store: self.clone(),
            id,
            key: key.to_owned(),
            metadata,
            data: Vec::new(),
            finished: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let bytes = self.bytes(key).ok_or_else(|| StorageError::NotFound {
            key: key.to_owned(),
        })?;
        Ok(Box::pin(std::io::Cursor::new(bytes)))
    }

    async fn head(&self, key: &str) -> Result<(ObjectInfo, Metadata), StorageError> {
        let inner = self.lock();
        let (bytes, meta, at) = inner
            .objects
            .get(key)
            .ok_or_else(|| StorageError::NotFound {
                key: key.to_owned(),
            })?;
        Ok((
            ObjectInfo {
                key: key.to_owned(),
                size: bytes.len() as u64,
                last_modified: Some(*at),
            },
            meta.clone(),
        ))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.lock().objects.remove(key);
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> Vec<DeleteFailure> {
        backup_worker::storage::delete_each(self, keys).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        Ok(self
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, _, at))| ObjectInfo {
                key: k.clone(),
                size: b.len() as u64,
                last_modified: Some(*at),
            })
            .collect())
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StorageError> {
        backup_worker::storage::page_of_list(self, prefix, start_after, max_keys).await
    }

    async fn list_incomplete_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError> {
        Ok(self
            .lock()
            .uploads
            .iter()
            .filter(|(_, k)| k.starts_with(prefix))
            .map(|(id, k)| IncompleteUpload {
                key: k.clone(),
                upload_id: id.clone(),
                initiated: None,
            })
            .collect())
    }

    async fn abort_incomplete_upload(&self, upload: &IncompleteUpload) -> Result<(), StorageError> {
        self.lock().uploads.remove(&upload.upload_id);
        Ok(())
    }
}

struct MemoryUpload {
    store: MemoryStore,
    id: String,
    key: String,
    metadata: Metadata,
    data: Vec<u8>,
    finished: bool,
}

#[async_trait]
impl Upload for MemoryUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        self.data.extend_from_slice(data);
        Ok(())
    }

    async fn commit(mut self: Box<Self>, metadata: Metadata) -> Result<u64, StorageError> {
        self.finished = true;
        let mut meta = std::mem::take(&mut self.metadata);
        meta.extend(metadata);
        let mut data = std::mem::take(&mut self.data);
        let size = data.len() as u64;
        let mut inner = self.store.lock();
        if inner.corrupting {
            if let Some(b) = data.first_mut() {
                *b ^= 0xff;
            }
        }
        inner.uploads.remove(&self.id);
        inner
            .objects
            .insert(self.key.clone(), (data, meta, Utc::now()));
        Ok(size)
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.finished = true;
        self.store.lock().uploads.remove(&self.id);
        Ok(())
    }
}

impl Drop for MemoryUpload {
    fn drop(&mut self) {
        if !self.finished {
            self.store.lock().uploads.remove(&self.id);
        }
    }
}
