//! A local directory as object store (`file://`): the embedded default, for a laptop or a volume.
//! Writes go to a hidden `.name.partial-<id>` file beside the target and are renamed on commit, so
//! readers never see half an object. Metadata lives in a `<key>.meta.json` sidecar.
//!
//! Backups are customer data: every file is created 0600 and every directory the store creates
//! 0700, whatever the process umask (the mode is set explicitly after creation).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::fs;
use tokio::io::{AsyncWriteExt, BufWriter};

use super::{
    validate_key, DeleteFailure, IncompleteUpload, Metadata, ObjectInfo, ObjectReader, ObjectStore,
    StorageError, Upload,
};

const META_SUFFIX: &str = ".meta.json";
const PARTIAL_MARKER: &str = ".partial-";
/// Objects and sidecars: readable by the worker's user only.
const FILE_MODE: u32 = 0o600;
/// Directories the store creates.
const DIR_MODE: u32 = 0o700;

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

/// Creates `dir` and any missing parents, each new one 0700 whatever the umask. Directories that
/// already exist are left as they are (the root may be a volume someone else owns).
async fn create_private_dirs(dir: &Path) -> Result<(), StorageError> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        match fs::metadata(d).await {
            Ok(m) if m.is_dir() => break,
            Ok(_) => break, // not a directory: create_dir below reports it
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(d.to_path_buf());
                cur = d.parent().filter(|p| !p.as_os_str().is_empty());
            }
            Err(e) => return Err(io_err("stat", d)(e)),
        }
    }
    for d in missing.into_iter().rev() {
        let mut builder = fs::DirBuilder::new();
        builder.mode(DIR_MODE);
        match builder.create(&d).await {
            Ok(()) => {}
            // Another upload created it meanwhile: it is ours all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create", &d)(e)),
        }
        set_mode(&d, DIR_MODE).await?;
    }
    Ok(())
}

async fn set_mode(path: &Path, mode: u32) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(io_err("chmod", path))
}

/// Creates a new file 0600 (whatever the umask) for writing; fails if it exists.
async fn create_private_file(path: &Path) -> Result<fs::File, StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .await
        .map_err(io_err("create", path))?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .await
        .map_err(io_err("chmod", path))?;
    Ok(file)
}

impl LocalStore {
    pub async fn new(root: PathBuf) -> Result<Self, StorageError> {
        create_private_dirs(&root).await?;
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
        create_private_dirs(&dir).await?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let partial = dir.join(format!(".{name}{PARTIAL_MARKER}{}", uuid::Uuid::new_v4()));
        let file = create_private_file(&partial).await?;
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

    async fn delete_many(&self, keys: &[String]) -> Vec<DeleteFailure> {
        super::delete_each(self, keys).await
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

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StorageError> {
        super::page_of_list(self, prefix, start_after, max_keys).await
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
        let _ = fs::remove_file(&sidecar_tmp).await;
        let mut meta_file = create_private_file(&sidecar_tmp).await?;
        meta_file
            .write_all(&json)
            .await
            .map_err(io_err("write", &sidecar_tmp))?;
        meta_file
            .flush()
            .await
            .map_err(io_err("write", &sidecar_tmp))?;
        drop(meta_file);
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
