//! Process-wide allocator tuning, called once at startup.
//!
//! glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to
//! 32 MiB), so after the first multi-MiB value every later one comes from a heap arena that keeps
//! the freed memory; with one arena per thread (the blocking reader, the runtime's workers), a
//! stream of 8 MiB Redis values held ~110 MiB where ~58 MiB are in use (README, Benchmarks). A
//! fixed threshold keeps blocks of 4 MiB and more in their own mappings, returned to the kernel
//! on free; smaller blocks (the 1 MiB pipeline chunks) stay on the heap as before.

/// Blocks of at least this many bytes are mapped on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;

/// Fixes glibc's mmap threshold, unless the operator set `MALLOC_MMAP_THRESHOLD_` (glibc reads
/// it itself, and the operator's choice wins). Elsewhere (musl, macOS) nothing to do.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's malloc.h: int mallopt(int param, int value); M_MMAP_THRESHOLD is -3.
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt sets one malloc parameter under malloc's own lock; no memory is touched.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
        }
    }
}
