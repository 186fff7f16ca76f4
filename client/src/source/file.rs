//! Raw image files: read with positioned reads, holes found with
//! `SEEK_DATA`/`SEEK_HOLE` so sparse images cost only their data.

use super::page_cache::PageCache;
use super::{pread_exact, Source};
use backy_common::ranges::Extent;
use backy_common::{Error, Result};
use rustix::fs::SeekFrom;
use rustix::io::Errno;
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    cache: PageCache,
    /// Cleared when the filesystem does not support `SEEK_DATA`.
    seek_data: bool,
}

impl FileSource {
    pub fn new(file: File, path: &Path, size: u64) -> Self {
        // Sequential advice doubles the kernel's readahead.
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        FileSource {
            file,
            path: path.to_path_buf(),
            size,
            cache: PageCache::default(),
            seek_data: true,
        }
    }
}

impl Source for FileSource {
    fn kind(&self) -> &'static str {
        "file"
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

    /// Where `SEEK_DATA` works: a hole read costs a page of zeros per
    /// 4 KiB, filled, cached and copied; zeroing the buffer costs less.
    fn reads_data_only(&self) -> bool {
        self.seek_data
    }

    fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
        if offset >= self.size {
            return Ok(None);
        }
        let all_data = Some(Extent {
            offset,
            len: self.size - offset,
        });
        if !self.seek_data {
            return Ok(all_data);
        }
        let start = match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // No data at or after offset (the file may also have shrunk:
            // the reads will tell).
            Err(Errno::NXIO) => return Ok(None),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                self.seek_data = false;
                return Ok(all_data);
            }
            Err(e) => {
                return Err(Error::io(
                    format!("finding data in {}", self.path.display()),
                    e.into(),
                ))
            }
        };
        let end = match rustix::fs::seek(&self.file, SeekFrom::Hole(start)) {
            Ok(end) => end,
            Err(Errno::NXIO) => self.size,
            Err(e) => {
                return Err(Error::io(
                    format!("finding holes in {}", self.path.display()),
                    e.into(),
                ))
            }
        };
        // The file may have grown since we took its size: the image ends there.
        let end = end.min(self.size);
        if start >= end {
            return Ok(None);
        }
        Ok(Some(Extent {
            offset: start,
            len: end - start,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    const MIB: u64 = 1 << 20;

    /// A sparse 8 MiB file with data in [2 MiB, 3 MiB) and in the last byte.
    fn sparse_file(dir: &Path) -> (PathBuf, File) {
        let path = dir.join("disk.img");
        let mut f = File::create(&path).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.seek(std::io::SeekFrom::Start(2 * MIB)).unwrap();
        f.write_all(&vec![7u8; MIB as usize]).unwrap();
        f.seek(std::io::SeekFrom::Start(8 * MIB - 1)).unwrap();
        f.write_all(&[1]).unwrap();
        f.sync_all().unwrap();
        (path.clone(), File::open(&path).unwrap())
    }

    #[test]
    fn finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = sparse_file(dir.path());
        let mut src = FileSource::new(file, &path, 8 * MIB);
        let first = src.next_data(0).unwrap().unwrap();
        if first.offset == 0 {
            // A filesystem without hole reporting (all data) is fine too.
            assert_eq!(first.end(), 8 * MIB);
            return;
        }
        assert!(first.offset <= 2 * MIB && first.end() >= 3 * MIB, "{first:?}");
        let last = src.next_data(first.end()).unwrap().unwrap();
        assert!(last.offset < 8 * MIB && last.end() == 8 * MIB, "{last:?}");
        assert_eq!(src.next_data(8 * MIB).unwrap(), None);

        let mut buf = vec![0u8; 4];
        src.read_at(2 * MIB, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
        let e = src.read_at(8 * MIB - 2, &mut buf).unwrap_err();
        assert!(e.message.contains("shrink"), "{}", e.message);
    }
}
