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

    /// [`ObjectStore::list_page`], with what it cost. `max_keys` is clamped to 1..=1000 as S3
    /// does, so a page that says more follow is never empty.
    async fn page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool, WalkCost), StorageError> {
        let max = max_keys.clamp(1, 1000);
        let mut walk = Walk::new(&self.root, prefix, start_after, Select::Objects);
        let mut page = Vec::new();
        let mut more = false;
        while let Some((key, meta)) = walk.next().await? {
            if page.len() == max {
                // One more key exists (and was seen to exist): the page is truncated.
                more = true;
                break;
            }
            page.push(object_info(key, &meta));
        }
        Ok((page, more, walk.cost))
    }
}

/// Whether an I/O error means the entry is gone (deleted, renamed away, or a parent directory
/// replaced): a listing skips it, as if it had been listed a moment later.
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// An entry of a directory being listed.
struct Entry {
    /// Where it sorts among its siblings: its name, plus "/" for a directory, because every key
    /// under directory `a` starts with `a/` (so `a-c` < `a/b` < `ab`, as S3 orders them).
    sort_key: String,
    path: PathBuf,
    is_dir: bool,
}

/// A directory whose entries are being visited.
struct Frame {
    /// Its key prefix: "" for the root, else "a/b/".
    dir_key: String,
    /// The entries not visited yet, in key order.
    entries: std::vec::IntoIter<Entry>,
}

/// Which files a [`Walk`] yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Select {
    /// Committed objects whose key starts with the prefix: no sidecars, no partial files.
    Objects,
    /// Partial files in directories the prefix reaches (the caller matches their target keys).
    Partials,
}

/// What a walk has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WalkCost {
    dirs_read: usize,
    files_stated: usize,
}

/// The files under the root in key order (S3's: the key strings' byte order), one at a time.
/// It descends only into directories that can hold a key under `prefix` after `start_after`,
/// reads each once, and stats only the files it yields, so a page costs the page plus the
/// directories on the way to it, not the tree. Entries that vanish meanwhile (a partial file
/// renamed on commit, a concurrent delete, a directory removed) are skipped.
struct Walk<'a> {
    prefix: &'a str,
    start_after: Option<&'a str>,
    select: Select,
    root: &'a Path,
    /// The directories being visited, the deepest last; empty at the end.
    stack: Vec<Frame>,
    started: bool,
    cost: WalkCost,
}

impl<'a> Walk<'a> {
    fn new(root: &'a Path, prefix: &'a str, start_after: Option<&'a str>, select: Select) -> Self {
        Self {
            prefix,
            start_after,
            select,
            root,
            stack: Vec::new(),
            started: false,
            cost: WalkCost::default(),
        }
    }

    /// The next file, as (key, metadata), or `None` at the end.
    async fn next(&mut self) -> Result<Option<(String, std::fs::Metadata)>, StorageError> {
        if !self.started {
            self.started = true;
            if let Some(frame) = self.read(String::new(), self.root).await? {
                self.stack.push(frame);
            }
        }
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(entry) = frame.entries.next() else {
                self.stack.pop();
                continue;
            };
            let key = format!("{}{}", frame.dir_key, entry.sort_key);
            if entry.is_dir {
                if let Some(child) = self.read(key, &entry.path).await? {
                    self.stack.push(child);
                }
                continue;
            }
            self.cost.files_stated += 1;
            if let Some(meta) = stat_file(&entry.path).await? {
                return Ok(Some((key, meta)));
            }
        }
    }

    /// Whether directory `dir_key` ("a/b/") can hold a file this walk yields.
    fn may_hold(&self, dir_key: &str) -> bool {
        let reaches_prefix = dir_key.starts_with(self.prefix) || self.prefix.starts_with(dir_key);
        // Every key under it starts with dir_key: all sort after start_after unless start_after
        // sorts after dir_key without being under it.
        let after_start = self
            .start_after
            .is_none_or(|s| s <= dir_key || s.starts_with(dir_key));
        reaches_prefix && after_start
    }

    /// Whether the file `key` is one this walk yields.
    fn wants(&self, key: &str) -> bool {
        match self.select {
            Select::Objects => {
                key.starts_with(self.prefix)
                    && self.start_after.is_none_or(|s| key > s)
                    && !key.ends_with(META_SUFFIX)
                    && !is_partial(key)
            }
            Select::Partials => is_partial(key),
        }
    }

    /// Reads directory `dir_key` at `path`: the entries the walk wants, in key order. `None` if
    /// the directory is gone.
    async fn read(&mut self, dir_key: String, path: &Path) -> Result<Option<Frame>, StorageError> {
        self.cost.dirs_read += 1;
        let Some(mut entries) = read_dir_entries(path).await? else {
            return Ok(None);
        };
        entries.retain(|e| {
            let key = format!("{dir_key}{}", e.sort_key);
            if e.is_dir {
                self.may_hold(&key)
            } else {
                self.wants(&key)
            }
        });
        entries.sort_unstable_by(|a, b| a.sort_key.cmp(&b.sort_key));
        Ok(Some(Frame {
            dir_key,
            entries: entries.into_iter(),
        }))
    }
}

/// The directories and regular files in `dir` (symlinks and the like are not objects), unsorted;
/// `None` if `dir` is gone.
async fn read_dir_entries(dir: &Path) -> Result<Option<Vec<Entry>>, StorageError> {
    let mut read = match fs::read_dir(dir).await {
        Ok(r) => r,
        Err(e) if is_gone(&e) => {
            tracing::debug!(path = %dir.display(), "directory gone while listing");
            return Ok(None);
        }
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    loop {
        let entry = match read.next_entry().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            // Removed while being read: it holds nothing more.
            Err(e) if is_gone(&e) => break,
            Err(e) => return Err(io_err("list", dir)(e)),
        };
        // The type comes with the directory entry on most filesystems (no stat).
        let file_type = match entry.file_type().await {
            Ok(t) => t,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(io_err("stat", &entry.path())(e)),
        };
        let mut sort_key = entry.file_name().to_string_lossy().into_owned();
        if file_type.is_dir() {
            sort_key.push('/');
        } else if !file_type.is_file() {
            continue;
        }
        out.push(Entry {
            sort_key,
            path: entry.path(),
            is_dir: file_type.is_dir(),
        });
    }
    Ok(Some(out))
}

/// A listed file's metadata (not following symlinks, as the directory listing does); `None` if it
/// is gone or is no longer a regular file.
async fn stat_file(path: &Path) -> Result<Option<std::fs::Metadata>, StorageError> {
    match fs::symlink_metadata(path).await {
        Ok(meta) if meta.is_file() => Ok(Some(meta)),
        Ok(_) => Ok(None),
        Err(e) if is_gone(&e) => {
            tracing::debug!(path = %path.display(), "file gone while listing");
            Ok(None)
        }
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn mtime(meta: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    meta.modified().ok().map(DateTime::<Utc>::from)
}

fn object_info(key: String, meta: &std::fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.len(),
        last_modified: mtime(meta),
    }
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
        let mut walk = Walk::new(&self.root, prefix, None, Select::Objects);
        let mut out = Vec::new();
        while let Some((key, meta)) = walk.next().await? {
            out.push(object_info(key, &meta));
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<ObjectInfo>, bool), StorageError> {
        let (page, more, cost) = self.page(prefix, start_after, max_keys).await?;
        tracing::debug!(
            prefix,
            keys = page.len(),
            more,
            dirs_read = cost.dirs_read,
            files_stated = cost.files_stated,
            "listed a page of the local store"
        );
        Ok((page, more))
    }

    async fn list_incomplete_uploads(
        &self,
        prefix: &str,
    ) -> Result<Vec<IncompleteUpload>, StorageError> {
        let mut walk = Walk::new(&self.root, prefix, None, Select::Partials);
        let mut out = Vec::new();
        while let Some((key, meta)) = walk.next().await? {
            // ".name.partial-<id>" in dir → key "dir/name", upload id "<id>".
            let (dir, file) = key.rsplit_once('/').unwrap_or(("", key.as_str()));
            let Some((name, id)) = file
                .strip_prefix('.')
                .and_then(|f| f.rsplit_once(PARTIAL_MARKER))
            else {
                continue;
            };
            let target = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            if target.starts_with(prefix) {
                out.push(IncompleteUpload {
                    key: target,
                    upload_id: id.to_owned(),
                    initiated: mtime(&meta),
                });
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Creates the file `key` (and its directories) under `root`.
    fn touch(root: &Path, key: &str) {
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    async fn next_key(walk: &mut Walk<'_>) -> Option<String> {
        walk.next().await.unwrap().map(|(key, _)| key)
    }

    #[tokio::test]
    async fn entries_that_vanish_mid_walk_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for k in ["a/1", "a/2", "b/1", "b/2", "c/x/1", "d", "e", "f/1"] {
            touch(root, k);
        }
        let mut walk = Walk::new(root, "", None, Select::Objects);
        assert_eq!(next_key(&mut walk).await.as_deref(), Some("a/1"));
        // The root and `a` have been read; none of these has been stat-ed or read yet.
        std::fs::remove_file(root.join("a/2")).unwrap();
        std::fs::remove_dir_all(root.join("b")).unwrap();
        std::fs::remove_file(root.join("d")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::remove_dir_all(root.join("f")).unwrap();
        std::fs::write(root.join("f"), b"now a file").unwrap();
        let mut rest = Vec::new();
        while let Some(key) = next_key(&mut walk).await {
            rest.push(key);
        }
        assert_eq!(rest, ["c/x/1", "e"]);
        // root, a, b (gone), c, c/x, f (not a directory); a/1, a/2 (gone), c/x/1, d (a directory
        // now), e.
        assert_eq!(
            walk.cost,
            WalkCost {
                dirs_read: 6,
                files_stated: 5
            }
        );
    }

    #[tokio::test]
    async fn a_missing_path_is_gone_and_other_errors_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let missing = dir.path().join("missing");
        assert!(stat_file(&missing).await.unwrap().is_none());
        assert!(stat_file(&file.join("under-a-file"))
            .await
            .unwrap()
            .is_none());
        assert!(
            stat_file(dir.path()).await.unwrap().is_none(),
            "a directory"
        );
        assert!(read_dir_entries(&missing).await.unwrap().is_none());
        assert!(read_dir_entries(&file).await.unwrap().is_none());
        // Any other failure is not taken for a vanished entry.
        let too_long = dir.path().join("n".repeat(300));
        assert!(matches!(
            stat_file(&too_long).await,
            Err(StorageError::Io { op: "stat", .. })
        ));
        assert!(matches!(
            read_dir_entries(&too_long).await,
            Err(StorageError::Io { op: "list", .. })
        ));
    }

    #[tokio::test]
    async fn a_page_reads_only_the_directories_on_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf()).await.unwrap();
        for t in 0..100 {
            for r in 0..100 {
                touch(dir.path(), &format!("t{t:03}/r{r:03}"));
            }
        }
        // Sidecars and a partial file beside the page's objects are skipped by name, unstat-ed.
        for r in 0..100 {
            touch(dir.path(), &format!("t098/r{r:03}.meta.json"));
        }
        touch(dir.path(), &format!("t098/.r055{PARTIAL_MARKER}x"));
        let keys = |page: &[ObjectInfo]| page.iter().map(|o| o.key.clone()).collect::<Vec<_>>();
        let range = |t: u32, rs: std::ops::Range<u32>| {
            rs.map(|r| format!("t{t:03}/r{r:03}")).collect::<Vec<_>>()
        };

        let (page, more, cost) = store.page("", Some("t098/r050"), 10).await.unwrap();
        assert_eq!(keys(&page), range(98, 51..61));
        assert!(more);
        // The root and t098; the page's 10 files and the one that shows more follow.
        let one_dir = WalkCost {
            dirs_read: 2,
            files_stated: 11,
        };
        assert_eq!(cost, one_dir);

        let (page, more, cost) = store.page("", Some("t098/r095"), 10).await.unwrap();
        let mut want = range(98, 96..100);
        want.extend(range(99, 0..6));
        assert_eq!(keys(&page), want);
        assert!(more);
        assert_eq!(
            cost,
            WalkCost {
                dirs_read: 3,
                files_stated: 11
            }
        );

        let (page, more, cost) = store.page("", Some("t099/r095"), 10).await.unwrap();
        assert_eq!(keys(&page), range(99, 96..100));
        assert!(!more);
        assert_eq!(
            cost,
            WalkCost {
                dirs_read: 2,
                files_stated: 4
            }
        );

        let (page, _, cost) = store.page("", None, 10).await.unwrap();
        assert_eq!(keys(&page), range(0, 0..10));
        assert_eq!(cost, one_dir);
        let (page, _, cost) = store.page("t05", None, 10).await.unwrap();
        assert_eq!(keys(&page), range(50, 0..10));
        assert_eq!(cost, one_dir);

        // As on S3, a page holds at least one key and at most 1000.
        let (page, more, _) = store.page("", None, 0).await.unwrap();
        assert_eq!((keys(&page), more), (range(0, 0..1), true));
        let (page, more, _) = store.page("", None, 5000).await.unwrap();
        assert_eq!((page.len(), more), (1000, true));
    }
}
