//! Block devices (LVM snapshots, loop devices, ...): read whole; a device
//! has no holes to skip.

use super::page_cache::PageCache;
use super::{pread_exact, Source};
use backy_common::{Error, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct BlockSource {
    file: File,
    path: PathBuf,
    size: u64,
    cache: PageCache,
}

impl BlockSource {
    pub fn new(mut file: File, path: &Path) -> Result<Self> {
        let size = device_size(&mut file, path)?;
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        Ok(BlockSource {
            file,
            path: path.to_path_buf(),
            size,
            cache: PageCache::default(),
        })
    }
}

/// A block device's size: `stat` says 0, seeking to its end tells.
pub fn device_size(file: &mut File, path: &Path) -> Result<u64> {
    file.seek(SeekFrom::End(0))
        .map_err(|e| Error::io(format!("finding the size of {}", path.display()), e))
}

impl Source for BlockSource {
    fn kind(&self) -> &'static str {
        "block"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        pread_exact(&self.file, &self.path, offset, buf)?;
        self.cache.read_done(&self.file, offset, buf.len() as u64);
        Ok(())
    }

    fn will_need(&mut self, offset: u64, len: u64) {
        self.cache.will_need(&self.file, offset, len);
    }
}
