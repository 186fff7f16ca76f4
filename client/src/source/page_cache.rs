//! Leaves the host's page cache as the push found it. A backup reads every
//! disk once: what it brings into the cache is dropped once read, so it
//! does not evict what the VMs on this host use. What was cached before the
//! push came is someone's working set (a VM's, or the host's), and is left
//! alone: dropping it would cost them a re-read, and backy a needless
//! eviction.
//!
//! Residency is asked with `cachestat(2)` (Linux 6.5). Where the kernel
//! lacks it, every range read is dropped, as before it was asked.

use backy_common::ranges::Extent;
use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;

/// Ranges remembered between their prefetch and their read; reads ascend,
/// so a few blocks' worth is all that is ever pending.
const REMEMBERED: usize = 64;

/// Per-source record of which ranges were cached before the push read them.
#[derive(Default)]
pub struct PageCache {
    /// Ranges asked about, ascending, each with whether any of its pages
    /// was cached then.
    asked: VecDeque<(Extent, bool)>,
}

impl PageCache {
    /// Before `len` bytes at `offset` are read: notes whether any of them is
    /// cached, and starts reading the rest in the background (beyond the
    /// kernel's readahead window, so several MiB are in flight).
    pub fn will_need(&mut self, file: &File, offset: u64, len: u64) {
        let Some(n) = NonZeroU64::new(len) else { return };
        let cached = cached_bytes(file, offset, len);
        self.remember(Extent { offset, len }, cached.is_some_and(|c| c > 0));
        if cached.is_none_or(|c| c < len) {
            // Advice only.
            let _ = rustix::fs::fadvise(file, offset, Some(n), rustix::fs::Advice::WillNeed);
        }
    }

    /// After `len` bytes at `offset` were read: drops them from the cache
    /// unless some of them were cached before the push asked for them.
    pub fn read_done(&mut self, file: &File, offset: u64, len: u64) {
        let Some(n) = NonZeroU64::new(len) else { return };
        let range = Extent { offset, len };
        while self.asked.front().is_some_and(|(e, _)| e.end() <= offset) {
            self.asked.pop_front();
        }
        let mut overlapping = self
            .asked
            .iter()
            .filter(|(e, _)| e.offset < range.end() && range.offset < e.end())
            .peekable();
        let resident = if overlapping.peek().is_some() {
            overlapping.any(|&(_, resident)| resident)
        } else {
            // Never announced: only the state now is known, and the read
            // itself has just cached every page; assume they were ours.
            false
        };
        if !resident {
            // Advice only; a failure changes nothing about correctness.
            let _ = rustix::fs::fadvise(file, offset, Some(n), rustix::fs::Advice::DontNeed);
        }
    }

    fn remember(&mut self, range: Extent, resident: bool) {
        if self.asked.len() >= REMEMBERED {
            self.asked.pop_front();
        }
        self.asked.push_back((range, resident));
    }
}

/// Bytes of `len` at `offset` in `file` that are in the page cache; `None`
/// when the kernel cannot tell.
pub fn cached_bytes(file: &File, offset: u64, len: u64) -> Option<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The generic syscall table's number (x86_64 and aarch64 alike); libc
    // names it for some targets only.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const SYS_CACHESTAT: libc::c_long = 451;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return None;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let range = Range { off: offset, len };
        let mut stat = Stat::default();
        // SAFETY: both pointers are to live, correctly laid out structs for
        // the duration of the call; the kernel writes only `stat`.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        if r != 0 {
            return None;
        }
        let page = rustix::param::page_size() as u64;
        Some((stat.nr_cache * page).min(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Whether the test machine's kernel has cachestat; without it the
    /// module drops every range, which the other tests do not cover.
    fn kernel_tells(file: &File) -> bool {
        cached_bytes(file, 0, 1).is_some()
    }

    fn file_of(len: usize) -> (tempfile::TempDir, File) {
        // Beside the crate, not in /tmp: a tmpfs keeps every page cached.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        f.sync_all().unwrap();
        (dir, File::open(&path).unwrap())
    }

    fn read(file: &File, offset: u64, len: usize) {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
    }

    #[test]
    fn pages_cached_before_stay_and_pages_brought_in_go() {
        let len = 1 << 20;
        let (_dir, file) = file_of(2 * len);
        if !kernel_tells(&file) {
            eprintln!("skipped: this kernel has no cachestat");
            return;
        }
        // Nothing cached: drop everything of the file, then make the first
        // half resident (someone's working set), without readahead.
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random).unwrap();
        read(&file, 0, len);
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Normal).unwrap();
        assert_eq!(cached_bytes(&file, 0, len as u64), Some(len as u64));
        assert_eq!(cached_bytes(&file, len as u64, len as u64), Some(0));

        let mut cache = PageCache::default();
        for half in [0, len as u64] {
            cache.will_need(&file, half, len as u64);
            read(&file, half, len);
            cache.read_done(&file, half, len as u64);
        }
        assert_eq!(
            cached_bytes(&file, 0, len as u64),
            Some(len as u64),
            "the resident half stays"
        );
        assert_eq!(
            cached_bytes(&file, len as u64, len as u64),
            Some(0),
            "what the push brought in is dropped"
        );
    }

    #[test]
    fn an_unannounced_read_is_dropped() {
        let len = 256 << 10;
        let (_dir, file) = file_of(len);
        if !kernel_tells(&file) {
            eprintln!("skipped: this kernel has no cachestat");
            return;
        }
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let mut cache = PageCache::default();
        read(&file, 0, len);
        cache.read_done(&file, 0, len as u64);
        assert_eq!(cached_bytes(&file, 0, len as u64), Some(0));
    }
}
