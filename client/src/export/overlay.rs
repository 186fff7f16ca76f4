//! The writable mode of an export: a local overlay that takes every write,
//! so a VM can run from a revision at once while nothing is written to the
//! server. The overlay is a sparse file of the image's size plus a map of
//! the 4 KiB pages written to it (`FILE.map`). A flush makes the data
//! durable first, then the map (written to a temporary file, synced,
//! renamed, directory synced), so after a crash the map never names a page
//! whose data did not reach the disk. Reopening the same overlay for the
//! same revision carries on where it stopped; for another revision it is
//! refused.

use backy_common::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes per page of the map.
pub const PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"BACKYOVL";
const VERSION: u32 = 1;
/// Magic, version, page size, image size, revision id (36 bytes).
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 36;

/// Pages written to the overlay.
struct Map {
    bits: Vec<u64>,
    dirty: bool,
}

impl Map {
    fn get(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, pages: std::ops::Range<u64>) {
        for p in pages {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.dirty = true;
    }
}

pub struct Overlay {
    file: File,
    path: PathBuf,
    map_path: PathBuf,
    size: u64,
    revision: String,
    map: Mutex<Map>,
    flushing: Mutex<()>,
}

/// One run of a read: from the overlay or from the revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Overlay { offset: u64, len: u64 },
    Base { offset: u64, len: u64 },
}

impl Overlay {
    /// Opens the overlay at `path` for revision `revision` of `size` bytes,
    /// creating it when neither it nor its map exists.
    pub fn open(path: &Path, revision: &str, size: u64) -> Result<Overlay> {
        let map_path = PathBuf::from(format!("{}.map", path.display()));
        let pages = size.div_ceil(PAGE);
        let words = pages.div_ceil(64) as usize;
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |e| Error::io(what, e)
        };
        let (file, map) = match (path.exists(), map_path.exists()) {
            (false, false) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(io("creating the overlay"))?;
                file.set_len(size).map_err(io("sizing the overlay"))?;
                (
                    file,
                    Map {
                        bits: vec![0; words],
                        dirty: true,
                    },
                )
            }
            (true, true) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io("opening the overlay"))?;
                let bytes = std::fs::read(&map_path).map_err(io("reading the map of the overlay"))?;
                let bits = parse_map(&bytes, revision, size, words)
                    .map_err(|e| e.context(format!("overlay {}", path.display())))?;
                let len = file.metadata().map_err(io("reading the overlay"))?.len();
                if len != size {
                    return Err(Error::invalid(format!(
                        "overlay {}: {len} bytes, the revision has {size}",
                        path.display()
                    )));
                }
                (file, Map { bits, dirty: false })
            }
            (true, false) => {
                return Err(Error::invalid(format!(
                    "{} exists without its map {}: not an overlay of this export (choose a new path)",
                    path.display(),
                    map_path.display()
                )))
            }
            (false, true) => {
                return Err(Error::invalid(format!(
                    "{} is missing but its map {} exists (remove the map to start afresh)",
                    path.display(),
                    map_path.display()
                )))
            }
        };
        let overlay = Overlay {
            file,
            path: path.to_path_buf(),
            map_path,
            size,
            revision: revision.to_string(),
            map: Mutex::new(map),
            flushing: Mutex::new(()),
        };
        overlay.flush()?;
        Ok(overlay)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written to the overlay so far (in whole pages).
    pub fn written_bytes(&self) -> u64 {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * PAGE
    }

    /// Whether any page of `range` was written.
    pub fn touches(&self, range: std::ops::Range<u64>) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        (range.start / PAGE..range.end.div_ceil(PAGE)).any(|p| map.get(p))
    }

    /// How to read `offset..offset + len`: runs from the overlay and from
    /// the revision, in order.
    pub fn parts(&self, offset: u64, len: u64) -> Vec<Part> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Part> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let stop = ((page + 1) * PAGE).min(end);
            let ours = map.get(page);
            match out.last_mut() {
                Some(Part::Overlay { len, .. }) if ours => *len += stop - pos,
                Some(Part::Base { len, .. }) if !ours => *len += stop - pos,
                _ => out.push(if ours {
                    Part::Overlay {
                        offset: pos,
                        len: stop - pos,
                    }
                } else {
                    Part::Base {
                        offset: pos,
                        len: stop - pos,
                    }
                }),
            }
            pos = stop;
        }
        out
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading the overlay {}", self.path.display()), e))
    }

    /// The pages of `offset..offset + len` that are neither written in
    /// the overlay nor wholly covered: their revision bytes must be merged
    /// in before a write (first and last page at most).
    pub fn partial_pages(&self, offset: u64, len: u64) -> Vec<u64> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + len;
        let mut pages = Vec::new();
        for page in [offset / PAGE, (end - 1) / PAGE] {
            let (start, stop) = (page * PAGE, ((page + 1) * PAGE).min(self.size));
            let covered = offset <= start && end >= stop;
            if !covered && !map.get(page) && !pages.contains(&page) {
                pages.push(page);
            }
        }
        pages
    }

    /// Writes `data` at `offset`. `pages` holds the revision's bytes of
    /// each page [`Overlay::partial_pages`] named, written first so the
    /// page is whole in the overlay. The caller serializes writes.
    pub fn write(&self, offset: u64, data: &[u8], pages: &[(u64, Vec<u8>)]) -> Result<()> {
        let err = |e| Error::io(format!("writing the overlay {}", self.path.display()), e);
        for (page, bytes) in pages {
            self.file.write_all_at(bytes, page * PAGE).map_err(err)?;
        }
        self.file.write_all_at(data, offset).map_err(err)?;
        let end = offset + data.len() as u64;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.set(offset / PAGE..end.div_ceil(PAGE));
        Ok(())
    }

    /// Makes every completed write durable: the data, then the map. The map
    /// is taken before the data is synced, so it never names a page whose
    /// data the sync did not cover; flushes run one at a time, so an older
    /// map never replaces a newer one.
    pub fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = map
                .dirty
                .then(|| encode_map(&self.revision, self.size, &map.bits));
            map.dirty = false;
            bytes
        };
        let synced = self
            .file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing the overlay {}", self.path.display()), e));
        let result = synced.and_then(|()| match &bytes {
            Some(bytes) => write_durably(&self.map_path, bytes),
            None => Ok(()),
        });
        if result.is_err() && bytes.is_some() {
            self.map.lock().unwrap_or_else(|p| p.into_inner()).dirty = true;
        }
        result
    }
}

fn encode_map(revision: &str, size: u64, bits: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + bits.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(PAGE as u32).to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    let mut id = [b' '; 36];
    let n = revision.len().min(36);
    id[..n].copy_from_slice(&revision.as_bytes()[..n]);
    out.extend_from_slice(&id);
    for w in bits {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

fn parse_map(bytes: &[u8], revision: &str, size: u64, words: usize) -> Result<Vec<u64>> {
    if bytes.len() != HEADER_LEN + words * 8 || &bytes[..8] != MAGIC {
        return Err(Error::invalid("its map is not an overlay map of this image size"));
    }
    let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&bytes[16..24]);
    if u32_at(8) != VERSION || u64::from(u32_at(12)) != PAGE || u64::from_le_bytes(s) != size {
        return Err(Error::invalid(
            "its map is of another version, page or image size",
        ));
    }
    let id = String::from_utf8_lossy(&bytes[24..60]).trim_end().to_string();
    if id != revision {
        return Err(Error::invalid(format!(
            "it belongs to revision {id}, not {revision} (choose a new path)"
        )));
    }
    Ok(bytes[HEADER_LEN..]
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect())
}

/// Temporary file, sync, rename, sync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let err = |what: &'static str| move |e| Error::io(format!("{what} {}", path.display()), e);
    let mut f = File::create(&tmp).map_err(err("writing"))?;
    f.write_all(bytes).map_err(err("writing"))?;
    f.sync_all().map_err(err("syncing"))?;
    std::fs::rename(&tmp, path).map_err(err("renaming onto"))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("syncing the directory of"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b5a7c9e-1234-4abc-8def-0123456789ab";

    #[test]
    fn writes_reopen_and_another_revision_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.img");
        let o = Overlay::open(&path, ID, 3 * PAGE + 100).unwrap();
        assert_eq!(o.partial_pages(10, 20), vec![0]);
        assert_eq!(o.partial_pages(PAGE, PAGE), Vec::<u64>::new());
        assert_eq!(o.partial_pages(PAGE - 1, 2), vec![0, 1]);
        // The short last page is whole when written to its end.
        assert_eq!(o.partial_pages(3 * PAGE, 100), Vec::<u64>::new());
        o.write(PAGE, &[7u8; PAGE as usize], &[]).unwrap();
        o.write(10, &[9u8; 20], &[(0, vec![1u8; PAGE as usize])]).unwrap();
        assert_eq!(
            o.parts(0, 3 * PAGE),
            vec![
                Part::Overlay {
                    offset: 0,
                    len: 2 * PAGE
                },
                Part::Base {
                    offset: 2 * PAGE,
                    len: PAGE
                }
            ]
        );
        assert!(o.touches(PAGE..PAGE + 1));
        assert!(!o.touches(2 * PAGE..3 * PAGE));
        o.flush().unwrap();
        drop(o);
        let o = Overlay::open(&path, ID, 3 * PAGE + 100).unwrap();
        let mut b = vec![0u8; 40];
        o.read(0, &mut b).unwrap();
        assert_eq!(&b[..10], &[1u8; 10]);
        assert_eq!(&b[10..30], &[9u8; 20]);
        assert_eq!(o.written_bytes(), 2 * PAGE);
        drop(o);
        let other = "1b5a7c9e-1234-4abc-8def-0123456789ab";
        let e = Overlay::open(&path, other, 3 * PAGE + 100).err().unwrap();
        assert!(e.message.contains("belongs to revision"), "{e}");
        let e = Overlay::open(&path, ID, 4 * PAGE).err().unwrap();
        assert!(e.message.contains("image size"), "{e}");
        std::fs::remove_file(dir.path().join("o.img.map")).unwrap();
        assert!(Overlay::open(&path, ID, 3 * PAGE + 100).is_err());
    }
}
