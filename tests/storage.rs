//! The object-storage seam against a real S3-protocol server (moto, on loopback) and a real local
//! directory: streamed multipart round trips, metadata, listing, deletes, and aborts that leave
//! nothing behind.

use std::sync::Arc;
use std::time::Duration;

use backup_worker::storage::{
    put_reader, LocalStore, Metadata, ObjectStore, StorageError, S3_MIN_PART_SIZE,
};
use backup_worker_testkit::MemoryStore;
use backup_worker_testkit::{wait_until, S3Server};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Deterministic, incompressible-looking bytes (xorshift), so sizes mean what they say.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn read_all(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let mut r = store.get(key).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The behaviour every store must have.
async fn store_contract(store: &dyn ObjectStore) {
    // A stream of several parts (plus a ragged tail), written in odd-sized chunks.
    let data = pattern(4 * S3_MIN_PART_SIZE + 123_457, 7);
    let key = "pfx/team-a/res-1/20261122T101500Z-id.pgdump.gz";
    let mut up = store
        .begin_upload(key, meta(&[("resource-type", "postgres")]))
        .await
        .unwrap();
    // Nothing is visible before commit.
    assert!(matches!(
        store.get(key).await,
        Err(StorageError::NotFound { .. })
    ));
    for chunk in data.chunks(300_007) {
        up.write(chunk).await.unwrap();
    }
    let size = up
        .commit(meta(&[("sha256", "abc123"), ("raw-bytes", "42")]))
        .await
        .unwrap();
    assert_eq!(size, data.len() as u64);

    let got = read_all(store, key).await;
    assert_eq!(got.len(), data.len());
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));

    let (info, m) = store.head(key).await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(m.get("resource-type").map(String::as_str), Some("postgres"));
    assert_eq!(m.get("sha256").map(String::as_str), Some("abc123"));
    assert_eq!(m.get("raw-bytes").map(String::as_str), Some("42"));

    // A small object takes the single-request path and keeps its metadata too.
    let small_key = "pfx/team-a/res-2/small.rdb.gz";
    let n = put_reader(
        store,
        small_key,
        &b"REDIS0011-small"[..],
        meta(&[("a", "b")]),
    )
    .await
    .unwrap();
    assert_eq!(n, 15);
    assert_eq!(read_all(store, small_key).await, b"REDIS0011-small");
    assert_eq!(
        store
            .head(small_key)
            .await
            .unwrap()
            .1
            .get("a")
            .map(String::as_str),
        Some("b")
    );

    // Listing by prefix.
    let all: Vec<_> = store
        .list("pfx/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(all, [key, small_key]);
    let one: Vec<_> = store
        .list("pfx/team-a/res-2/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(one, [small_key]);
    assert!(store.list("other/").await.unwrap().is_empty());

    // Delete, and delete again.
    store.delete(key).await.unwrap();
    store.delete(key).await.unwrap();
    assert!(matches!(
        store.get(key).await,
        Err(StorageError::NotFound { .. })
    ));
    assert!(matches!(
        store.head(key).await,
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(store.list("pfx/").await.unwrap().len(), 1);

    // Abort after several parts: no object, no incomplete upload.
    let aborted = "pfx/team-a/res-3/aborted.archive.gz";
    let mut up = store.begin_upload(aborted, Metadata::new()).await.unwrap();
    for chunk in pattern(3 * S3_MIN_PART_SIZE, 9).chunks(1 << 20) {
        up.write(chunk).await.unwrap();
    }
    assert_eq!(
        store.list_incomplete_uploads("pfx/").await.unwrap().len(),
        1
    );
    up.abort().await.unwrap();
    assert!(store
        .list_incomplete_uploads("pfx/")
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        store.get(aborted).await,
        Err(StorageError::NotFound { .. })
    ));

    // Dropped mid-stream (a cancelled task): cleaned up without an explicit abort.
    let dropped = "pfx/team-a/res-4/dropped.pgdump.gz";
    let mut up = store.begin_upload(dropped, Metadata::new()).await.unwrap();
    for chunk in pattern(2 * S3_MIN_PART_SIZE + 10, 11).chunks(1 << 20) {
        up.write(chunk).await.unwrap();
    }
    drop(up);
    wait_until(
        Duration::from_secs(10),
        "the dropped upload to be aborted",
        || async {
            store
                .list_incomplete_uploads("pfx/")
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        store.get(dropped).await,
        Err(StorageError::NotFound { .. })
    ));

    // The incomplete-upload sweep API: find and abort one left behind.
    let mut orphan = store
        .begin_upload("pfx/orphan.gz", Metadata::new())
        .await
        .unwrap();
    orphan
        .write(&pattern(S3_MIN_PART_SIZE + 1, 3))
        .await
        .unwrap();
    let found = store.list_incomplete_uploads("pfx/").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "pfx/orphan.gz");
    store.abort_incomplete_upload(&found[0]).await.unwrap();
    assert!(store
        .list_incomplete_uploads("pfx/")
        .await
        .unwrap()
        .is_empty());
    let _ = orphan.abort().await;

    // Keys that could escape a prefix or a directory are refused.
    assert!(matches!(
        store
            .begin_upload("pfx/../etc/passwd", Metadata::new())
            .await,
        Err(StorageError::InvalidKey { .. })
    ));
}

#[tokio::test]
async fn s3_store_contract() {
    let server = S3Server::start().await.unwrap();
    let store = server.store("backups").await.unwrap();
    store_contract(&store).await;

    // Cross-check with the raw API: nothing multipart is left in the bucket.
    let uploads = store
        .client()
        .list_multipart_uploads()
        .bucket("backups")
        .send()
        .await
        .unwrap();
    assert!(uploads.uploads.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn s3_failures_surface_and_leave_nothing() {
    let server = S3Server::start().await.unwrap();
    let store = server.store("backups").await.unwrap();
    // A bucket that does not exist: the first part fails, the error names the operation.
    let missing = backup_worker::storage::S3Store::new(server.settings("no-such-bucket")).await;
    let mut up = missing.begin_upload("k", Metadata::new()).await.unwrap();
    let mut failed = None;
    for chunk in pattern(2 * S3_MIN_PART_SIZE, 5).chunks(1 << 20) {
        if let Err(e) = up.write(chunk).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("writing to a missing bucket must fail");
    assert!(err.to_string().contains("CreateMultipartUpload"), "{err}");
    // A poisoned upload refuses further use; abort is still safe.
    assert!(matches!(up.write(b"x").await, Err(StorageError::Poisoned)));
    up.abort().await.unwrap();
    assert!(store.list_incomplete_uploads("").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().join("objects")).await.unwrap();
    store_contract(&store).await;
    // Nothing but committed objects and their metadata sidecars remains on disk.
    let mut leftovers = Vec::new();
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                leftovers.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    leftovers.sort();
    assert_eq!(leftovers, ["small.rdb.gz", "small.rdb.gz.meta.json"]);
}

#[tokio::test]
async fn memory_store_contract() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    store_contract(store.as_ref()).await;
}

/// `delete_many` on any store: more keys than one DeleteObjects request carries, some of them
/// never written; every object goes, other objects stay, nothing is reported failed.
async fn delete_many_contract(store: &dyn ObjectStore, n: usize) {
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("dm/res/{i:05}.pgdump.gz");
        put_reader(store, &key, &b"x"[..], Metadata::new())
            .await
            .unwrap();
        keys.push(key);
    }
    put_reader(store, "dm/keep/other.gz", &b"y"[..], Metadata::new())
        .await
        .unwrap();
    // Missing keys (never written) inside each request's range.
    keys.insert(3, "dm/res/missing-a.gz".into());
    keys.push("dm/res/missing-b.gz".into());
    let failed = store.delete_many(&keys).await;
    assert!(failed.is_empty(), "{failed:?}");
    let left: Vec<String> = store
        .list("dm/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, ["dm/keep/other.gz"]);
    // Deleting them again (all gone) is no failure either, and an empty list does nothing.
    assert!(store.delete_many(&keys[..10]).await.is_empty());
    assert!(store.delete_many(&[]).await.is_empty());
}

/// `list_page` on any store: key order, `start_after`, `more` until the last page, the prefix.
async fn list_page_contract(store: &dyn ObjectStore) {
    for k in ["lp/e", "lp/a", "lp/c", "lp/b", "lp/d", "lq/x"] {
        put_reader(store, k, &b"x"[..], Metadata::new())
            .await
            .unwrap();
    }
    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let (page, more) = store.list_page("lp/", after.as_deref(), 2).await.unwrap();
        let keys: Vec<String> = page.into_iter().map(|o| o.key).collect();
        after = keys.last().cloned();
        pages.push(keys);
        if !more {
            break;
        }
        assert!(pages.len() < 10, "{pages:?}");
    }
    assert_eq!(
        pages,
        [
            vec!["lp/a".to_owned(), "lp/b".into()],
            vec!["lp/c".into(), "lp/d".into()],
            vec!["lp/e".into()]
        ]
    );
    let (rest, more) = store.list_page("lp/", Some("lp/e"), 2).await.unwrap();
    assert!(rest.is_empty() && !more);
}

#[tokio::test]
async fn s3_lists_a_page_at_a_time() {
    let server = S3Server::start().await.unwrap();
    list_page_contract(&server.store("backups").await.unwrap()).await;
}

#[tokio::test]
async fn local_and_memory_list_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    list_page_contract(&LocalStore::new(dir.path().to_path_buf()).await.unwrap()).await;
    list_page_contract(&MemoryStore::new()).await;
}

/// Keys whose directories a naive walk puts out of order: `lo/a-c` < `lo/a.d/e` < `lo/a/b` <
/// `lo/ab` in byte order, though directory `a` is named before `a-c` and `ab`.
const ORDER_KEYS: &[&str] = &[
    "lo/a/b",
    "lo/a-c",
    "lo/a.d/e",
    "lo/ab",
    "lo/a/c/d",
    "lo/a/b0",
    "lo/a/b-x/y",
    "lo/a/b.z",
    "lo/a/a/z/z",
    "lo/a0",
    "lo/b",
    "lo/z/\u{e9}",
    "lo/z/e",
    "lo/z/~",
    "lo/deep/1/2/3/4/k",
    "lo/deep/1/2/3/4-k",
    "lo/deep/1/2/3k",
    "lo-x",
    "lp/q",
];

/// Every page of `list_page(prefix, start_after, size)` until the last, concatenated; each page
/// holds 1..=size keys (only a first and last page may be empty).
async fn all_pages(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
    size: usize,
) -> Vec<String> {
    let mut after = start_after.map(str::to_owned);
    let mut keys = Vec::new();
    loop {
        let (page, more) = store
            .list_page(prefix, after.as_deref(), size)
            .await
            .unwrap();
        assert!(page.len() <= size, "{prefix:?} {after:?} {size}: {page:?}");
        assert!(
            !more || !page.is_empty(),
            "{prefix:?} {after:?}: empty, more"
        );
        keys.extend(page.into_iter().map(|o| o.key));
        if !more {
            return keys;
        }
        after = keys.last().cloned();
        assert!(keys.len() <= ORDER_KEYS.len(), "{keys:?}");
    }
}

/// `list_page` in the key strings' byte order, whatever the directories (on a local store):
/// pages concatenate to the sorted keys after any `start_after`, under any prefix.
async fn list_order_contract(store: &dyn ObjectStore) {
    for k in ORDER_KEYS {
        put_reader(store, k, &b"x"[..], Metadata::new())
            .await
            .unwrap();
    }
    // An upload in flight is not listed (a partial file, on a local store).
    let mut pending = store
        .begin_upload("lo/a/b1", Metadata::new())
        .await
        .unwrap();
    pending.write(b"half").await.unwrap();
    let mut sorted: Vec<String> = ORDER_KEYS.iter().map(|k| k.to_string()).collect();
    sorted.sort();
    let under = |prefix: &str| -> Vec<String> {
        sorted
            .iter()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    };
    let mut listed: Vec<String> = store
        .list("lo/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    listed.sort();
    assert_eq!(listed, under("lo/"));

    // start_after at every key, every prefix of one (between keys, and directory names), and
    // around the ends.
    let mut starts: Vec<String> = ["", "lo", "lo/", "lo/\u{10ffff}", "lo0", "a", "zzz"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for k in &sorted {
        starts.extend(k.char_indices().map(|(i, _)| k[..i].to_owned()));
        starts.push(k.clone());
        // Right after the key (printable: S3 echoes StartAfter into XML, which has no \x01).
        starts.push(format!("{k}!"));
    }
    starts.sort();
    starts.dedup();
    for size in [1, 2, 3, 1000] {
        assert_eq!(
            all_pages(store, "lo/", None, size).await,
            under("lo/"),
            "{size}"
        );
        for start in &starts {
            let want: Vec<String> = under("lo/").into_iter().filter(|k| k > start).collect();
            assert_eq!(
                all_pages(store, "lo/", Some(start), size).await,
                want,
                "after {start:?}, pages of {size}"
            );
        }
    }
    for prefix in [
        "",
        "l",
        "lo",
        "lo/a",
        "lo/a/",
        "lo/a/b",
        "lo/a.",
        "lo/deep/1/2/3",
        "lo/z/",
        "lo/no",
    ] {
        for size in [1, 2, 1000] {
            assert_eq!(all_pages(store, prefix, None, size).await, under(prefix));
            for start in &sorted {
                let want: Vec<String> = under(prefix).into_iter().filter(|k| k > start).collect();
                assert_eq!(
                    all_pages(store, prefix, Some(start), size).await,
                    want,
                    "{prefix:?} after {start:?}, pages of {size}"
                );
            }
        }
    }
    pending.abort().await.unwrap();
}

#[tokio::test]
async fn s3_lists_pages_in_key_order() {
    let server = S3Server::start().await.unwrap();
    list_order_contract(&server.store("backups").await.unwrap()).await;
}

#[tokio::test]
async fn local_and_memory_list_pages_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    list_order_contract(&LocalStore::new(dir.path().to_path_buf()).await.unwrap()).await;
    list_order_contract(&MemoryStore::new()).await;
}

/// Objects and whole directories removed between two pages (the previous page's last key among
/// them) are not listed, and the listing does not fail.
#[tokio::test]
async fn local_listing_continues_past_what_was_deleted_between_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().to_path_buf()).await.unwrap();
    for k in ["t/a/1", "t/a/2", "t/b/1", "t/b/2", "t/c/1", "t/c/2", "t/d"] {
        put_reader(&store, k, &b"x"[..], Metadata::new())
            .await
            .unwrap();
    }
    let keys = |page: Vec<backup_worker::storage::ObjectInfo>| -> Vec<String> {
        page.into_iter().map(|o| o.key).collect()
    };
    let (page, more) = store.list_page("t/", None, 2).await.unwrap();
    assert_eq!(
        (keys(page), more),
        (vec!["t/a/1".into(), "t/a/2".into()], true)
    );
    store.delete("t/a/2").await.unwrap();
    std::fs::remove_dir_all(dir.path().join("t/a")).unwrap();
    std::fs::remove_dir_all(dir.path().join("t/b")).unwrap();
    store.delete("t/c/2").await.unwrap();
    let (page, more) = store.list_page("t/", Some("t/a/2"), 2).await.unwrap();
    assert_eq!(
        (keys(page), more),
        (vec!["t/c/1".into(), "t/d".into()], false)
    );
    let all = keys(store.list("").await.unwrap());
    assert_eq!(all, ["t/c/1", "t/d"]);
}

#[tokio::test]
async fn s3_delete_many_batches_over_1000_keys_and_reports_failures() {
    let server = S3Server::start().await.unwrap();
    let store = server.store("backups").await.unwrap();
    // 1,203 keys + 2 missing: two DeleteObjects requests, each with the checksum S3 requires.
    delete_many_contract(&store, 1203).await;

    // A request that fails as a whole reports every key it carried, each once.
    let missing = backup_worker::storage::S3Store::new(server.settings("no-such-bucket")).await;
    let keys: Vec<String> = (0..1001).map(|i| format!("k/{i}")).collect();
    let failed = missing.delete_many(&keys).await;
    assert_eq!(failed.len(), keys.len());
    assert_eq!(failed[1000].key, "k/1000");
    assert!(
        failed[0].error.contains("DeleteObjects"),
        "{}",
        failed[0].error
    );
}

#[tokio::test]
async fn local_and_memory_delete_many() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::new(dir.path().join("objects")).await.unwrap();
    delete_many_contract(&local, 1005).await;
    // Sidecars went with their objects.
    let sidecars = std::fs::read_dir(dir.path().join("objects/dm/res"))
        .unwrap()
        .count();
    assert_eq!(sidecars, 0);
    delete_many_contract(&MemoryStore::new(), 1005).await;

    // A key the local store cannot delete is reported, the others still go.
    put_reader(&local, "dm/a.gz", &b"x"[..], Metadata::new())
        .await
        .unwrap();
    let failed = local
        .delete_many(&["../escape".to_owned(), "dm/a.gz".to_owned()])
        .await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].key, "../escape");
    assert!(local.list("dm/a").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_objects_are_private_files_in_private_directories() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a/objects");
    let store = LocalStore::new(root.clone()).await.unwrap();
    let key = "p/team/res/20261122T101500Z-id.pgdump.gz";
    let mut up = store.begin_upload(key, Metadata::new()).await.unwrap();
    up.write(b"secret rows").await.unwrap();
    // The partial file is private from its first byte.
    let partial = std::fs::read_dir(root.join("p/team/res"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(".partial-"))
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&partial), 0o600);
    up.commit(meta(&[("sha256", "x")])).await.unwrap();
    assert_eq!(mode(&root.join(key)), 0o600, "object");
    assert_eq!(
        mode(&root.join(format!("{key}.meta.json"))),
        0o600,
        "sidecar"
    );
    for d in [
        "a",
        "a/objects",
        "a/objects/p",
        "a/objects/p/team",
        "a/objects/p/team/res",
    ] {
        assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
    }
    // A directory that existed before is left as it was (the root may be a shared volume).
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s2 = LocalStore::new(shared.clone()).await.unwrap();
    put_reader(&s2, "t/r/o.gz", &b"x"[..], Metadata::new())
        .await
        .unwrap();
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&shared.join("t")), 0o700);
    assert_eq!(mode(&shared.join("t/r/o.gz")), 0o600);
}
