//! Keeps the large, short-lived buffers of the data path (1 MiB frames,
//! 4 MiB blocks, allocated and freed by the thousand per GiB) on the heap.
//!
//! glibc serves allocations above its mmap threshold (128 KiB at start,
//! raised only as such chunks are freed) with fresh mappings, and trims the
//! heap's free top back to the kernel above 128 KiB: either way a freed
//! buffer's pages go back, and the next buffer faults in and zeroes new
//! ones. Measured on a restore of 1.7 GiB: a third of the client's CPU,
//! in page faults and in copies into not yet faulted pages. With both
//! limits raised the same pages are reused; what is kept beyond the live
//! buffers is bounded by the trim threshold.

/// Allocations at least this large still get their own mapping (glibc's
/// largest allowed threshold on 64-bit targets).
pub const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the heap's top kept for reuse before it is returned.
pub const TRIM_THRESHOLD: i32 = 16 << 20;

/// Returns the free memory of every arena to the kernel: for a server
/// whose data streams have all ended, so what they used does not stay
/// resident while it idles (the raised limits keep it otherwise).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; safe at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets glibc's limits (see the module); elsewhere, nothing. Called first
/// thing in each binary's `main`, before any thread starts.
pub fn keep_buffers_on_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists, so nothing allocates concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
