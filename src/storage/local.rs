//! A local directory as object store (`file://`): the embedded default, for a laptop or a volume.
//! Writes go to a hidden `.name.partial-<id>` file beside the target and are renamed on commit, so
//! readers never see half an object. Metadata lives in a `<key>.meta.json` sidecar.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::fs;
use tokio::io::{AsyncWriteExt, BufWriter};

use super::{
    validate_key, IncompleteUpload, Metadata, ObjectInfo, ObjectReader, ObjectStore, StorageError,
    Upload,
};

const META_SUFFIX: &str = ".meta.json";
const PARTIAL_MARKER: &str = ".partial-";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn meta_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(META_SUFFIX);
    PathBuf::from(s)
}

impl LocalStore {
    pub async fn new(root: PathBuf) -> Result<Self, StorageError> {
        fs::create_dir_all(&root)
            .await
            .map_err(io_err("create", &root))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        if key.is_empty() || key.ends_with('/') {
            return Err(StorageError::InvalidKey {
                key: key.to_owned(),
                reason: "an object key names a file",
            });
        }
        Ok(self.root.join(key))
    }

    /// Every regular file under the root, as (key, path, metadata).
    async fn walk(&self) -> Result<Vec<(String, PathBuf, std::fs::Metadata)>, StorageError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let mut entries = match fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", &dir)(e)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io_err("list", &dir))? {
                let path = entry.path();
                let meta = entry.metadata().await.map_err(io_err("stat", &path))?;
                if meta.is_dir() {
                    stack.push(path);
                } else if meta.is_file() {
                    let key = path
                        .strip_prefix(&self.root)
                        .unwrap_or(&path)
                        .to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    out.push((key, path, meta));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn mtime(meta: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    meta.modified().ok().map(DateTime::<Utc>::from)
}

fn is_partial(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with('.') && name.contains(PARTIAL_MARKER))
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn begin_upload(
        &self,
        key: &str,
        metadata: Metadata,
    ) -> Result<Box<dyn Upload>, StorageError> {
        let path = self.path_of(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir)
            .await
            .map_err(io_err("create", &dir))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partial = dir.join(format!(".{name}{PARTIAL_MARKER}{}", uuid::Uuid::new_v4()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .await
            .map_err(io_err("create", &partial))?;
        Ok(Box::new(LocalUpload {
            file: Some(BufWriter::with_capacity(256 * 1024, file)),
            partial,
            target: path,
            metadata,
            size: 0,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let path = self.path_of(key)?;
        match fs::File::open(&path).await {
            Ok(f) => Ok(Box::pin(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::NotFound {
                key: key.to_owned(),
            }),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    async fn head(&self, key: &str) -> Result<(ObjectInfo, Metadata), StorageError> {
        let path = self.path_of(key)?;
        let meta = match fs::metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound {
                    key: key.to_owned(),
                })
            }
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        let sidecar = meta_path(&path);
        let user_meta = match fs::read(&sidecar).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Metadata::new(),
        };
        Ok((
            ObjectInfo {
                key: key.to_owned(),
                size: meta.len(),
                last_modified: mtime(&meta),
            },
            user_meta,
        ))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        for p in [path.clone(), meta_path(&path)] {
            match fs::remove_file(&p).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete", &p)(e)),
            }
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        Ok(self
            .walk()
            .await?
            .into_iter()
            .filter(|(key, _, _)| {
                key.starts_with(prefix) && !key.ends_with(META_SUFFIX) && !is_partial(key)
            })
            .map(|(key, _, meta)| ObjectInfo {
                key,
                size: meta.len(),
                last_modified: mtime(&meta),
            })
            .collect())
    }

    async fn list_incomplete_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError> {
        Ok(self
            .walk()
            .await?
            .into_iter()
            .filter(|(key, _, _)| is_partial(key))
            .filter_map(|(key, _, meta)| {
                // ".name.partial-<id>" in dir → key "dir/name", upload id "<id>".
                let (dir, file) = key.rsplit_once('/').unwrap_or(("", key.as_str()));
                let (name, id) = file.strip_prefix('.')?.rsplit_once(PARTIAL_MARKER)?;
                let target = if dir.is_empty() {
                    name.to_owned()
                } else {
                    format!("{dir}/{name}")
                };
                target.starts_with(prefix).then(|| IncompleteUpload {
                    key: target,
                    upload_id: id.to_owned(),
                    initiated: mtime(&meta),
                })
            })
            .collect())
    }

    async fn abort_incomplete_upload(&self, upload: &IncompleteUpload) -> Result<(), StorageError> {
        let target = self.path_of(&upload.key)?;
        let dir = target.parent().unwrap_or(&self.root);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partial = dir.join(format!(".{name}{PARTIAL_MARKER}{}", upload.upload_id));
        match fs::remove_file(&partial).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &partial)(e)),
        }
    }
}

struct LocalUpload {
    /// `None` once committed or aborted.
    file: Option<BufWriter<fs::File>>,
    partial: PathBuf,
    target: PathBuf,
    metadata: Metadata,
    size: u64,
}

impl LocalUpload {
    async fn commit_inner(&mut self, extra: Metadata) -> Result<u64, StorageError> {
        let mut file = self.file.take().ok_or(StorageError::Poisoned)?;
        file.flush().await.map_err(io_err("write", &self.partial))?;
        file.get_mut()
            .sync_all()
            .await
            .map_err(io_err("sync", &self.partial))?;
        drop(file);
        let mut metadata = std::mem::take(&mut self.metadata);
        metadata.extend(extra);
        let sidecar = meta_path(&self.target);
        let sidecar_tmp = meta_path(&self.partial);
        let json = serde_json::to_vec(&metadata).map_err(|e| StorageError::Io {
            op: "encode metadata for",
            path: sidecar.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&sidecar_tmp, json)
            .await
            .map_err(io_err("write", &sidecar_tmp))?;
        fs::rename(&sidecar_tmp, &sidecar)
            .await
            .map_err(io_err("rename", &sidecar))?;
        fs::rename(&self.partial, &self.target)
            .await
            .map_err(io_err("rename", &self.target))?;
        Ok(self.size)
    }
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let file = self.file.as_mut().ok_or(StorageError::Poisoned)?;
        if let Err(e) = file.write_all(data).await {
            self.file = None;
            let _ = fs::remove_file(&self.partial).await;
            return Err(io_err("write", &self.partial)(e));
        }
        self.size += data.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, metadata: Metadata) -> Result<u64, StorageError> {
        let result = self.commit_inner(metadata).await;
        if result.is_err() {
            let _ = fs::remove_file(&self.partial).await;
            let _ = fs::remove_file(meta_path(&self.partial)).await;
        }
        result
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.file = None;
        match fs::remove_file(&self.partial).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", &self.partial)(e)),
        }
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Dropped uncommitted (task cancelled): leave no partial file behind.
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}
