//! The digest index's files (`<store>/.dedup/`): which stored block has
//! which BLAKE3 digest, across jobs, as a hint for sharing extents. The
//! format and table logic are `backy_common::dedup_index`; this reads and
//! writes single buckets with pread/pwrite (nothing proportional to the
//! entries is held in memory: the page cache caches), and locks.
//!
//! ```text
//! <store>/.dedup/
//!   index.00 .. index.3f   64 shards, each a hash table (chosen by the
//!                          digest's first byte), so growing one rewrites
//!                          1/64 of the index
//!   lock                   OFD byte-range locks: byte n guards shard n
//!                          (shared: lookups; exclusive: changes, growth);
//!                          the whole file: a rebuild replacing every shard
//! ```
//!
//! Several processes use one index (the server and `backy-server dedup`).
//! A shard grows by being rewritten to a temp file renamed over it; every
//! operation compares, under the lock, the inode of its open shard with
//! the path's and reopens when they differ. Nothing here is trusted: a
//! crash loses hints or leaves stale ones (every user compares the bytes),
//! and a missing, torn or foreign shard is started empty, never an error at
//! start; [`DigestIndex::needs_rebuild`] then says so until [`rebuild`].

use crate::dedup::job_dirs;
use crate::storage::durable;
use backy_common::dedup_index::{self as fmt, Bucket, BucketIo, Header, Inserted, BUCKET_LEN, HEADER_LEN};
use backy_common::manifest::Digest;
use backy_common::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use backy_common::dedup_index::{job_key, Location};

/// The index's directory below the store.
pub const DIR: &str = ".dedup";
const LOCK_FILE: &str = "lock";
/// Shards per index; a power of two, at most 256 (chosen by one byte).
pub const SHARDS: usize = 64;
/// Buckets of a new shard (log2): 4 KiB, 64 entries.
const NEW_LOG2: u8 = 0;
/// Age after which a temp file in the index's directory is a crash's.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

fn shard_of(digest: &Digest) -> usize {
    digest[0] as usize & (SHARDS - 1)
}

fn shard_name(n: usize) -> String {
    format!("index.{n:02x}")
}

/// What the index holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Digests held.
    pub live: u64,
    /// Tombstones (removed entries not yet dropped by a growth step).
    pub dead: u64,
    /// Entries the shards have room for.
    pub slots: u64,
    /// The shard files' bytes.
    pub bytes: u64,
}

/// The digest index of one store. `Send + Sync`: one per process, shared.
pub struct DigestIndex {
    dir: PathBuf,
    /// This handle's open file description of `lock`: its byte-range locks
    /// conflict with every other handle's, in this process or another.
    lock: File,
    shards: Vec<Mutex<Shard>>,
}

// One handle serves every thread of a process.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<DigestIndex>();
};

/// One shard as this handle has it open.
struct Shard {
    path: PathBuf,
    /// The open file and its inode; `None` until opened.
    open: Option<(File, u64)>,
}

/// A shard under its lock, ready to use.
struct Open<'a> {
    /// The open file and its inode; `None` only under a shared lock for a
    /// missing or damaged shard, which then reads as empty.
    file: &'a mut Option<(File, u64)>,
    header: Header,
    /// Whether it was missing or damaged (and, under an exclusive lock,
    /// has been started anew).
    damaged: bool,
}

impl Open<'_> {
    fn file(&self) -> Option<&File> {
        self.file.as_ref().map(|o| &o.0)
    }
}

/// A shard file's buckets.
struct FileBuckets<'a>(&'a File);

impl BucketIo for FileBuckets<'_> {
    fn read_bucket(&mut self, i: u64, into: &mut Bucket) -> std::io::Result<()> {
        let at = Header::bucket_offset(i);
        let mut got = 0;
        // A shard shorter than its header says (cut by a crash, or a
        // sparse tail) reads as empty slots.
        while got < BUCKET_LEN {
            match self.0.read_at(&mut into.0[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        into.0[got..].fill(0);
        Ok(())
    }

    fn write_bucket(&mut self, i: u64, bucket: &Bucket) -> std::io::Result<()> {
        self.0.write_all_at(&bucket.0, Header::bucket_offset(i))
    }
}

/// An OFD byte-range lock, released on drop.
struct RangeLock<'a> {
    file: &'a File,
    start: u64,
    len: u64,
}

impl<'a> RangeLock<'a> {
    /// Waits for the lock on `start..start+len` (`len` 0: to the end).
    fn take(file: &'a File, start: u64, len: u64, exclusive: bool) -> std::io::Result<Self> {
        let kind = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK };
        loop {
            match fcntl_lock(file, kind, start, len, libc::F_OFD_SETLKW) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other.map(|()| RangeLock { file, start, len }),
            }
        }
    }
}

impl Drop for RangeLock<'_> {
    fn drop(&mut self) {
        // Closing the file would release it too; failing to unlock an open
        // one is not something to recover from here.
        let _ = fcntl_lock(self.file, libc::F_UNLCK, self.start, self.len, libc::F_OFD_SETLK);
    }
}

fn fcntl_lock(file: &File, kind: libc::c_int, start: u64, len: u64, cmd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `struct flock` is plain data; zero is valid for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = start as _;
    fl.l_len = len as _;
    // l_pid stays 0, as OFD locks require.
    // SAFETY: `fl` is a valid `struct flock`; `file` is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn random_salt() -> [u8; 32] {
    let mut salt = [0u8; 32];
    salt[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    salt[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    salt
}

/// The shard's header, if it is one and the file is as long as it says
/// (a shorter one was cut by a crash; a header of a huge table over a
/// small file would make growth walk buckets that were never written).
fn read_header(file: &File) -> std::result::Result<Header, String> {
    let mut bytes = [0u8; HEADER_LEN];
    file.read_exact_at(&mut bytes, 0).map_err(|e| e.to_string())?;
    let header = Header::parse(&bytes)?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != header.file_len() {
        return Err(format!("{len} bytes, its header says {}", header.file_len()));
    }
    Ok(header)
}

fn write_header(file: &File, header: &Header, path: &Path) -> Result<()> {
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Writes an empty shard of `header` as a new file at `tmp`, synced.
fn create_shard(tmp: &Path, header: &Header) -> Result<File> {
    let file = durable::create_new(tmp)?;
    let r = file
        .set_len(header.file_len())
        .and_then(|()| file.write_all_at(&header.encode(), 0));
    r.map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    Ok(file)
}

fn temp_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!(".tmp.{what}.{}", uuid::Uuid::new_v4().simple()))
}

/// Syncs `tmp` and renames it over `path`, durably.
fn replace_file(file: &File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
    std::fs::rename(tmp, path)
        .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
    durable::fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Rewrites the shard at `path` (open as `file`, `header`) into a table
/// sized for its live entries, renamed over it; returns the new file.
fn grow(dir: &Path, path: &Path, file: &File, header: &Header) -> Result<(File, Header)> {
    let mut grown = Header::new(header.grown_log2(), random_salt());
    grown.complete = header.complete;
    let tmp = temp_path(dir, "grow");
    let result = (|| {
        let new = create_shard(&tmp, &grown)?;
        fmt::rehash(&mut FileBuckets(file), header, &mut FileBuckets(&new), &mut grown)
            .map_err(|e| Error::io(format!("growing {}", path.display()), e))?;
        write_header(&new, &grown, &tmp)?;
        replace_file(&new, &tmp, path)?;
        Ok((new, grown))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Inserts into a shard, growing it first when full: whether the digest
/// was added, and whether `file` was replaced (grown) meanwhile.
fn insert_growing(
    dir: &Path,
    path: &Path,
    file: &mut File,
    header: &mut Header,
    digest: &Digest,
    loc: &Location,
) -> Result<(bool, bool)> {
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut grown = false;
    for attempt in 0..2 {
        if header.should_grow() || attempt > 0 {
            (*file, *header) = grow(dir, path, file, header)?;
            grown = true;
        }
        match fmt::insert(&mut FileBuckets(file), header, digest, loc).map_err(io)? {
            Inserted::Added => return Ok((true, grown)),
            Inserted::Present => return Ok((false, grown)),
            Inserted::Full => {}
        }
    }
    Err(Error::internal(format!(
        "{}: no free slot after growing",
        path.display()
    )))
}

/// Flocks a rebuild's temp file, so no opener takes it for a crash's.
fn hold(file: &File) -> std::io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(Into::into)
}

fn inode(file: &File, path: &Path) -> Result<u64> {
    Ok(file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .ino())
}

impl DigestIndex {
    /// Opens the index of `store` (`<store>/.dedup/`, created if missing).
    /// A missing, torn or foreign-version shard is not an error: it is
    /// started empty and [`DigestIndex::needs_rebuild`] says so.
    pub fn open(store: &Path) -> Result<Self> {
        let dir = store.join(DIR);
        durable::create_dir(&dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = durable::open_lock_file(&lock_path)?;
        let index = DigestIndex {
            shards: (0..SHARDS)
                .map(|n| {
                    Mutex::new(Shard {
                        path: dir.join(shard_name(n)),
                        open: None,
                    })
                })
                .collect(),
            dir,
            lock,
        };
        for n in 0..SHARDS {
            // Starts missing and damaged shards anew, once, here.
            index.with_shard(n, true, |_| Ok(()))?;
        }
        index.remove_stale_temps();
        Ok(index)
    }

    /// Removes temp files a crash left (a growth or rebuild that never
    /// renamed them): those untouched for [`STALE_TEMP`] (a growth takes
    /// far less) and not flocked (a running rebuild holds its own).
    fn remove_stale_temps(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let stale = e.file_name().to_string_lossy().starts_with(".tmp.")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMP))
                && File::open(e.path()).is_ok_and(|f| hold(&f).is_ok());
            if stale {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!(
                        "removed {}, left by an interrupted index change",
                        e.path().display()
                    ),
                    Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
                }
            }
        }
    }

    /// Runs `f` on shard `n` under its lock (exclusive or shared), opened
    /// afresh if another process replaced it. Under an exclusive lock a
    /// missing or damaged shard is started empty; under a shared one it
    /// reads as empty.
    fn with_shard<T>(
        &self,
        n: usize,
        exclusive: bool,
        f: impl FnOnce(&mut Open<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut shard = self.shards[n].lock().unwrap_or_else(|p| p.into_inner());
        let _held = RangeLock::take(&self.lock, n as u64, 1, exclusive)
            .map_err(|e| Error::io(format!("locking {}", self.dir.join(LOCK_FILE).display()), e))?;
        let path = shard.path.clone();
        let on_disk = match std::fs::metadata(&path) {
            Ok(m) => Some(m.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        if on_disk.is_none() || shard.open.as_ref().map(|o| o.1) != on_disk {
            shard.open = None;
            if on_disk.is_some() {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let ino = inode(&file, &path)?;
                shard.open = Some((file, ino));
            }
        }
        let checked = match &shard.open {
            None => Err("missing".to_string()),
            Some((file, _)) => read_header(file),
        };
        let (header, damaged) = match checked {
            Ok(h) => (h, false),
            Err(why) if exclusive => {
                if on_disk.is_some() {
                    tracing::warn!(
                        "digest index shard {} is damaged ({why}): starting it empty; \
                         `backy-server dedup --rebuild-index` refills it",
                        path.display()
                    );
                }
                let header = Header::new(NEW_LOG2, random_salt());
                let tmp = temp_path(&self.dir, "new");
                let made = create_shard(&tmp, &header).and_then(|file| {
                    replace_file(&file, &tmp, &path)?;
                    let ino = inode(&file, &path)?;
                    Ok((file, ino))
                });
                match made {
                    Ok(open) => shard.open = Some(open),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
                (header, true)
            }
            // Read as empty; the next change starts it anew.
            Err(_) => {
                shard.open = None;
                (Header::new(NEW_LOG2, [0; 32]), true)
            }
        };
        f(&mut Open {
            file: &mut shard.open,
            header,
            damaged,
        })
    }

    /// Where a block with `digest` was stored, if the index knows a place.
    /// A hint: the caller compares the bytes before relying on it.
    pub fn lookup(&self, digest: &Digest) -> Result<Option<Location>> {
        let n = shard_of(digest);
        self.with_shard(n, false, |open| {
            let Some(file) = open.file() else { return Ok(None) };
            fmt::lookup(&mut FileBuckets(file), &open.header, digest)
                .map(|found| found.map(|f| f.2))
                .map_err(|e| Error::io(format!("reading {}", self.dir.join(shard_name(n)).display()), e))
        })
    }

    /// Adds each digest not already held (first holder wins; entries are
    /// hints).
    pub fn insert(&self, entries: &[(Digest, Location)]) -> Result<()> {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| shard_of(&entries[i].0));
        for group in order.chunk_by(|&a, &b| shard_of(&entries[a].0) == shard_of(&entries[b].0)) {
            let n = shard_of(&entries[group[0]].0);
            let path = self.dir.join(shard_name(n));
            self.with_shard(n, true, |open| {
                let before = open.header;
                let mut header = open.header;
                let (file, ino) = open
                    .file
                    .as_mut()
                    .ok_or_else(|| Error::internal("digest index shard not open under its lock"))?;
                for &i in group {
                    let (digest, loc) = &entries[i];
                    if insert_growing(&self.dir, &path, file, &mut header, digest, loc)?.1 {
                        *ino = inode(file, &path)?;
                    }
                }
                if header != before {
                    write_header(file, &header, &path)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Where the entry for `digest` is `old`: points it at `new`, or
    /// removes it (`None`). Otherwise changes nothing.
    pub fn replace(&self, digest: &Digest, old: &Location, new: Option<&Location>) -> Result<()> {
        let n = shard_of(digest);
        let path = self.dir.join(shard_name(n));
        self.with_shard(n, true, |open| {
            let mut header = open.header;
            let file = open
                .file()
                .ok_or_else(|| Error::internal("digest index shard not open under its lock"))?;
            let changed = fmt::replace(&mut FileBuckets(file), &mut header, digest, old, new)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            if changed && header != open.header {
                write_header(file, &header, &path)?;
            }
            Ok(())
        })
    }

    /// Whether the index may miss blocks that are stored: some shard was
    /// started empty (new, damaged, another version) since the last
    /// [`rebuild`].
    pub fn needs_rebuild(&self) -> bool {
        (0..SHARDS).any(|n| {
            self.with_shard(n, false, |open| Ok(open.damaged || !open.header.complete))
                .unwrap_or(true)
        })
    }

    /// Entries live and dead, room, and the files' bytes.
    pub fn stats(&self) -> Result<IndexStats> {
        let mut stats = IndexStats::default();
        for n in 0..SHARDS {
            self.with_shard(n, false, |open| {
                if !open.damaged {
                    stats.live += open.header.live;
                    stats.dead += open.header.dead;
                    stats.slots += open.header.slots();
                    stats.bytes += open.header.file_len();
                }
                Ok(())
            })?;
        }
        Ok(stats)
    }
}

/// Rebuilds the index of `store` from the manifests of every committed
/// revision of every job directory; zero blocks are never indexed. The
/// shards are written beside the index and renamed over it together (under
/// the whole lock file's exclusive lock), so users see the old index or the
/// new one; hints inserted meanwhile are lost (they are hints). A manifest
/// that cannot be read is logged and skipped.
pub fn rebuild(store: &Path) -> Result<IndexStats> {
    let dir = store.join(DIR);
    durable::create_dir(&dir)?;
    let mut shards: Vec<(PathBuf, File, Header)> = Vec::with_capacity(SHARDS);
    let result = (|| {
        for _ in 0..SHARDS {
            let header = Header::new(NEW_LOG2, random_salt());
            let tmp = temp_path(&dir, "rebuild");
            let file = create_shard(&tmp, &header)?;
            hold(&file).map_err(|e| Error::io(format!("locking {}", tmp.display()), e))?;
            shards.push((tmp, file, header));
        }
        for job in job_dirs(store)? {
            let key = job_key(job.name().as_str());
            for meta in job.revisions()? {
                let manifest = match job.manifest(&meta) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(job = %job.name(), "digest index rebuild skips revision {}: {e}", meta.id);
                        continue;
                    }
                };
                for (block, digest) in manifest.data_blocks() {
                    let (tmp, file, header) = &mut shards[shard_of(digest)];
                    let loc = Location {
                        job_key: key,
                        rev: meta.id,
                        block,
                    };
                    if insert_growing(&dir, tmp, file, header, digest, &loc)?.1 {
                        hold(file).map_err(|e| Error::io(format!("locking {}", tmp.display()), e))?;
                    }
                }
            }
        }
        let mut stats = IndexStats::default();
        for (tmp, file, header) in &mut shards {
            header.complete = true;
            write_header(file, header, tmp)?;
            file.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
            stats.live += header.live;
            stats.slots += header.slots();
            stats.bytes += header.file_len();
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = durable::open_lock_file(&lock_path)?;
        backy_common::fault::point("dedup.rebuild-written");
        let _all = RangeLock::take(&lock, 0, 0, true)
            .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
        for (n, (tmp, _, _)) in shards.iter().enumerate() {
            std::fs::rename(tmp, dir.join(shard_name(n)))
                .map_err(|e| Error::io(format!("renaming {} into the digest index", tmp.display()), e))?;
        }
        durable::fsync_dir(&dir)?;
        Ok(stats)
    })();
    if result.is_err() {
        for (tmp, _, _) in &shards {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::RevisionId;
    use std::collections::HashMap;

    fn digest_of(n: u64) -> Digest {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    fn loc(job: u64, block: u64) -> Location {
        Location {
            job_key: job,
            rev: RevisionId::from(uuid::Uuid::from_u128(job as u128)),
            block,
        }
    }

    fn entries(range: std::ops::Range<u64>, job: u64) -> Vec<(Digest, Location)> {
        range.map(|n| (digest_of(n), loc(job, n))).collect()
    }

    #[test]
    fn insert_lookup_replace_and_growth_survive_reopening() {
        let store = tempfile::tempdir().unwrap();
        let index = DigestIndex::open(store.path()).unwrap();
        assert!(index.needs_rebuild(), "a new index was never built");
        assert_eq!(index.lookup(&digest_of(1)).unwrap(), None);
        let first = index.stats().unwrap();
        assert_eq!((first.live, first.slots), (0, (SHARDS * 64) as u64));
        // Enough for every shard to grow a few times.
        index.insert(&entries(0..20_000, 1)).unwrap();
        index.insert(&entries(0..10, 2)).unwrap();
        assert_eq!(
            index.lookup(&digest_of(5)).unwrap(),
            Some(loc(1, 5)),
            "first holder wins"
        );
        index.replace(&digest_of(6), &loc(2, 6), None).unwrap();
        assert_eq!(
            index.lookup(&digest_of(6)).unwrap(),
            Some(loc(1, 6)),
            "not the holder: kept"
        );
        index
            .replace(&digest_of(6), &loc(1, 6), Some(&loc(3, 60)))
            .unwrap();
        index.replace(&digest_of(7), &loc(1, 7), None).unwrap();
        let stats = index.stats().unwrap();
        assert_eq!((stats.live, stats.dead), (19_999, 1));
        assert!(stats.slots >= 20_000 * 4 / 3, "{stats:?}");
        assert_eq!(
            stats.bytes,
            std::fs::read_dir(store.path().join(DIR))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("index."))
                .map(|e| e.metadata().unwrap().len())
                .sum::<u64>()
        );
        drop(index);
        let index = DigestIndex::open(store.path()).unwrap();
        assert_eq!(index.lookup(&digest_of(6)).unwrap(), Some(loc(3, 60)));
        assert_eq!(index.lookup(&digest_of(7)).unwrap(), None);
        for n in (0..20_000).filter(|n| ![6, 7].contains(n)) {
            assert_eq!(index.lookup(&digest_of(n)).unwrap(), Some(loc(1, n)), "{n}");
        }
        assert_eq!(index.stats().unwrap(), stats);
        let names: Vec<String> = std::fs::read_dir(store.path().join(DIR))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "temp files left: {names:?}");
    }

    #[test]
    fn a_torn_or_foreign_shard_starts_empty_and_asks_for_a_rebuild() {
        let store = tempfile::tempdir().unwrap();
        std::fs::create_dir(store.path().join("vm1")).unwrap();
        rebuild(store.path()).unwrap();
        let index = DigestIndex::open(store.path()).unwrap();
        assert!(!index.needs_rebuild());
        index.insert(&entries(0..1000, 1)).unwrap();
        drop(index);
        let d = digest_of(3);
        let shard = store.path().join(DIR).join(shard_name(shard_of(&d)));
        let other = store
            .path()
            .join(DIR)
            .join(shard_name((shard_of(&d) + 1) % SHARDS));
        // A torn header, and a shard of a later version.
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&shard, &bytes).unwrap();
        let mut v2 = std::fs::read(&other).unwrap();
        v2[8] = 2;
        std::fs::write(&other, &v2).unwrap();
        let index = DigestIndex::open(store.path()).unwrap();
        assert!(index.needs_rebuild());
        assert_eq!(index.lookup(&d).unwrap(), None, "its entries are gone");
        let intact = (0..1000u64)
            .find(|n| ![shard_of(&d), (shard_of(&d) + 1) % SHARDS].contains(&shard_of(&digest_of(*n))))
            .unwrap();
        assert_eq!(index.lookup(&digest_of(intact)).unwrap(), Some(loc(1, intact)));
        index.insert(&[(d, loc(9, 9))]).unwrap();
        assert_eq!(index.lookup(&d).unwrap(), Some(loc(9, 9)));
        // A shard file that is gone or cut short is no error either.
        drop(index);
        std::fs::remove_file(&other).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
        f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
        let index = DigestIndex::open(store.path()).unwrap();
        assert!(index.needs_rebuild());
        assert_eq!(index.lookup(&d).unwrap(), None);
    }

    #[test]
    fn temp_files_a_crash_left_go_and_fresh_ones_stay() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(DIR);
        std::fs::create_dir(&dir).unwrap();
        let (old, fresh) = (dir.join(".tmp.grow.old"), dir.join(".tmp.rebuild.fresh"));
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&fresh, b"x").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * STALE_TEMP;
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        DigestIndex::open(store.path()).unwrap();
        assert!(!old.exists(), "left by a crash: removed");
        assert!(fresh.exists(), "maybe being written: kept");
        // An old one a rebuild holds stays.
        std::fs::write(&old, b"x").unwrap();
        let held = std::fs::File::options().write(true).open(&old).unwrap();
        held.set_modified(long_ago).unwrap();
        hold(&held).unwrap();
        DigestIndex::open(store.path()).unwrap();
        assert!(old.exists(), "held by a rebuild: kept");
    }

    #[test]
    fn two_handles_see_each_others_changes_across_growth() {
        let store = tempfile::tempdir().unwrap();
        let a = DigestIndex::open(store.path()).unwrap();
        let b = DigestIndex::open(store.path()).unwrap();
        a.insert(&entries(0..10, 1)).unwrap();
        assert_eq!(b.lookup(&digest_of(3)).unwrap(), Some(loc(1, 3)));
        // b grows every shard; a's open files are the old ones.
        b.insert(&entries(10..10_000, 2)).unwrap();
        assert_eq!(a.lookup(&digest_of(9_999)).unwrap(), Some(loc(2, 9_999)));
        assert_eq!(a.lookup(&digest_of(3)).unwrap(), Some(loc(1, 3)));
        a.replace(&digest_of(5000), &loc(2, 5000), None).unwrap();
        assert_eq!(b.lookup(&digest_of(5000)).unwrap(), None);
        // Both at once, from threads: nothing lost.
        std::thread::scope(|s| {
            s.spawn(|| a.insert(&entries(20_000..25_000, 3)).unwrap());
            s.spawn(|| b.insert(&entries(30_000..35_000, 4)).unwrap());
        });
        for n in (20_000..25_000).step_by(7) {
            assert_eq!(b.lookup(&digest_of(n)).unwrap(), Some(loc(3, n)));
            assert_eq!(
                a.lookup(&digest_of(n + 10_000)).unwrap(),
                Some(loc(4, n + 10_000))
            );
        }
        assert_eq!(a.stats().unwrap().live, 10 + 9_990 - 1 + 10_000);
    }

    #[test]
    fn rebuild_indexes_committed_data_blocks_only() {
        use crate::storage::JobDir;
        use backy_common::manifest::{digest, Manifest};
        use backy_common::JobName;
        let store = tempfile::tempdir().unwrap();
        let bs = 64 << 10;
        let mut ids = Vec::new();
        for (job, byte) in [("vm1", 1u8), ("vm2", 2)] {
            let dir = JobDir::new(store.path(), JobName::new(job).unwrap());
            dir.ensure().unwrap();
            let mut m = Manifest::zeroed(4 * bs as u64, bs).unwrap();
            m.set(1, digest(&[byte])).unwrap();
            m.set(2, digest(b"shared")).unwrap();
            let id = RevisionId::new_random();
            let md = durable::write_manifest(&dir.digests_path(&id), &m).unwrap();
            let meta = backy_common::revision::RevisionMeta {
                id,
                timestamp: chrono::Utc::now(),
                parent: None,
                size: 4 * bs as u64,
                block_size: bs,
                tags: Default::default(),
                trust: Default::default(),
                verified_at: None,
                source: Default::default(),
                stats: Default::default(),
                manifest_digest: hex::encode(md),
                storage: Default::default(),
                locked_until: None,
                key_check: None,
            };
            durable::write_atomic(&dir.rev_path(&id), meta.to_yaml().unwrap().as_bytes()).unwrap();
            ids.push(id);
        }
        let index = DigestIndex::open(store.path()).unwrap();
        index.insert(&[(digest_of(1), loc(1, 1))]).unwrap();
        let stats = rebuild(store.path()).unwrap();
        assert_eq!(stats.live, 3);
        assert!(!index.needs_rebuild());
        assert_eq!(
            index.lookup(&digest_of(1)).unwrap(),
            None,
            "the old index is replaced"
        );
        let vm1 = |block| Location {
            job_key: job_key("vm1"),
            rev: ids[0],
            block,
        };
        assert_eq!(index.lookup(&digest(&[1])).unwrap(), Some(vm1(1)));
        assert_eq!(
            index.lookup(&digest(b"shared")).unwrap(),
            Some(vm1(2)),
            "vm1 comes first"
        );
        assert_eq!(
            index.lookup(&digest(&[2])).unwrap().map(|l| (l.job_key, l.rev)),
            Some((job_key("vm2"), ids[1]))
        );
        assert_eq!(
            index
                .lookup(&backy_common::manifest::zero_digest(bs as u64))
                .unwrap(),
            None
        );
    }

    /// The index behaves like a map of first holders, across handles.
    #[test]
    fn behaves_like_a_map() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 16,
            ..Default::default()
        });
        let ops = proptest::collection::vec((0u8..3, 0u64..3000, 1u64..4, any::<bool>()), 0..400);
        runner
            .run(&ops, |ops| {
                let store = tempfile::tempdir().unwrap();
                let handles = [
                    DigestIndex::open(store.path()).unwrap(),
                    DigestIndex::open(store.path()).unwrap(),
                ];
                let mut model: HashMap<Digest, Location> = HashMap::new();
                for (op, n, job, which) in ops {
                    let h = &handles[which as usize];
                    let d = digest_of(n);
                    match op {
                        0 => {
                            // A batch, so shards grow within one call too.
                            let batch: Vec<_> = (n..n + 50).map(|m| (digest_of(m), loc(job, m))).collect();
                            h.insert(&batch).unwrap();
                            for (d, l) in batch {
                                model.entry(d).or_insert(l);
                            }
                        }
                        1 => {
                            let old = loc(job, n);
                            h.replace(&d, &old, None).unwrap();
                            if model.get(&d) == Some(&old) {
                                model.remove(&d);
                            }
                        }
                        _ => prop_assert_eq!(h.lookup(&d).unwrap(), model.get(&d).copied()),
                    }
                }
                prop_assert_eq!(handles[0].stats().unwrap().live, model.len() as u64);
                for (d, l) in &model {
                    prop_assert_eq!(handles[1].lookup(d).unwrap(), Some(*l));
                }
                Ok(())
            })
            .unwrap();
    }
}
