//! Storage seam benchmark: streams N bytes of generated, incompressible data through a streaming
//! upload and reports throughput and peak RSS. Memory must stay flat as N grows.
//!
//!   cargo run --release --example storage_bench -- <s3|file> <bytes, e.g. 100M or 1G>
//!
//! `s3` starts moto on loopback (scripts/test installs it); `file` writes to a temporary directory.

use std::time::Instant;

use backup_worker::storage::{LocalStore, Metadata, ObjectStore};
use backup_worker_testkit::S3Server;

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let (kind, size) = match (args.get(1), args.get(2).and_then(|s| parse_size(s))) {
        (Some(k), Some(n)) => (k.clone(), n),
        _ => return Err("usage: storage_bench <s3|file> <size, e.g. 100M>".into()),
    };
    let _server;
    let _dir;
    let store: Box<dyn ObjectStore> = match kind.as_str() {
        "s3" => {
            let server = S3Server::start().await?;
            let store = server.store("bench").await?;
            _server = server;
            Box::new(store)
        }
        "file" => {
            let dir = tempfile::tempdir()?;
            let store = LocalStore::new(dir.path().to_path_buf()).await?;
            _dir = dir;
            Box::new(store)
        }
        other => return Err(format!("unknown store {other}").into()),
    };

    let baseline_kib = status_kib("VmRSS:");
    let started = Instant::now();
    let mut up = store
        .begin_upload("bench/object.bin", Metadata::new())
        .await?;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sent = 0u64;
    while sent < size {
        let n = chunk.len().min((size - sent) as usize);
        for b in chunk[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        up.write(&chunk[..n]).await?;
        sent += n as u64;
    }
    let stored = up.commit(Metadata::new()).await?;
    let secs = started.elapsed().as_secs_f64();
    let peak_kib = status_kib("VmHWM:");
    println!(
        "store={kind} bytes={stored} seconds={secs:.2} MiB/s={:.1} baseline_rss_MiB={:.1} peak_rss_MiB={:.1}",
        stored as f64 / (1 << 20) as f64 / secs,
        baseline_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
    );
    store.delete("bench/object.bin").await?;
    Ok(())
}
