//! Deduplicating what is already stored (`backy-server dedup`; README,
//! "Deduplication"): walks jobs revision by revision, looks each block
//! that is not zeros up in the digest index, and where another file holds
//! the same digest in extents of its own, asks the kernel to share them
//! (`FIDEDUPERANGE`: it compares the bytes itself, under its locks, so a
//! stale index entry or a concurrent push cannot make it share unequal
//! data). Blocks not in the index are added, so their file becomes the
//! source for later ones. Revisions are immutable once committed; one that
//! expiry deletes meanwhile stays readable through the open file.
//!
//! Resumable: `.dedup/done/<job>` lists the revisions of the job already
//! walked (written after each one), and a later run skips them.

use super::index::{self, job_key, DigestIndex, IndexStats, Location};
use super::reflink::{dedupe_range, DedupeOutcome};
use super::{job_dirs, DIR_DONE};
use crate::storage::space::{range_extents, store_space, Mapped};
use crate::storage::{durable, JobDir};
use backy_common::manifest::{digest, Digest};
use backy_common::revision::{RevisionMeta, StorageMode};
use backy_common::{Error, Result, RevisionId};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How a run goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Walk revisions an earlier run finished, too.
    pub restart: bool,
    /// Rebuild the index from every manifest first (also done when the
    /// index says it needs it).
    pub rebuild_index: bool,
}

/// What a run (or one job of it) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Revisions walked.
    pub revisions: u64,
    /// Revisions skipped: walked by an earlier run.
    pub skipped: u64,
    /// Blocks with data seen.
    pub blocks: u64,
    /// Blocks that now share the extents of an equal block elsewhere.
    pub deduped: u64,
    pub deduped_bytes: u64,
    /// Blocks that already shared them (a clone of its parent, or done).
    pub shared: u64,
    /// Blocks the index named a place for whose bytes differ (a stale
    /// entry, corrected).
    pub differed: u64,
    /// Blocks the filesystem refused to share (an immutable file...).
    pub refused: u64,
    /// Blocks added to the index (first seen here).
    pub indexed: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.revisions += o.revisions;
        self.skipped += o.skipped;
        self.blocks += o.blocks;
        self.deduped += o.deduped;
        self.deduped_bytes += o.deduped_bytes;
        self.shared += o.shared;
        self.differed += o.differed;
        self.refused += o.refused;
        self.indexed += o.indexed;
    }
}

/// What a whole run did, and the store's used bytes around it.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub totals: Totals,
    pub jobs: u64,
    /// The index as rebuilt at the start, when it was.
    pub rebuilt: Option<IndexStats>,
    pub used_before: u64,
    pub used_after: u64,
}

/// The file and geometry of a revision that holds a block.
struct Source {
    file: File,
    block_size: u64,
    size: u64,
}

/// Open holders, by job key and revision; a few at a time (bounded).
struct Sources<'a> {
    jobs: HashMap<u64, &'a JobDir>,
    open: HashMap<(u64, RevisionId), Option<Source>>,
}

const OPEN_SOURCES: usize = 64;

impl Sources<'_> {
    /// The holder of `loc`; `None` if its job, revision or file is gone.
    fn get(&mut self, loc: &Location) -> Option<&Source> {
        let key = (loc.job_key, loc.rev);
        if !self.open.contains_key(&key) {
            if self.open.len() >= OPEN_SOURCES {
                self.open.clear();
            }
            let source = self.jobs.get(&loc.job_key).and_then(|job| {
                let meta = job.meta(&loc.rev).ok()?;
                let file = File::open(job.image_path(&loc.rev)).ok()?;
                Some(Source {
                    file,
                    block_size: meta.block_size as u64,
                    size: meta.size,
                })
            });
            self.open.insert(key, source);
        }
        self.open.get(&key).and_then(Option::as_ref)
    }
}

/// Whether two ranges of equal length already map to the same extents.
fn same_extents(a: &File, a_off: u64, b: &File, b_off: u64, len: u64) -> Result<bool> {
    let (Some(x), Some(y)) = (range_extents(a, a_off, len)?, range_extents(b, b_off, len)?) else {
        return Ok(false);
    };
    let place = |m: &Vec<Mapped>| {
        m.iter()
            .map(|e| (e.logical, e.physical, e.length))
            .collect::<Vec<_>>()
    };
    let covered: u64 = x.iter().map(|e| e.length).sum();
    Ok(covered == len && x.iter().all(|e| e.physical != 0) && place(&x) == place(&y))
}

/// Reads a `.dedup/done/<job>` record: the revisions already walked.
fn done_of(store: &Path, job: &JobDir) -> Result<BTreeSet<RevisionId>> {
    let path = store.join(index::DIR).join(DIR_DONE).join(job.name().as_str());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    // A line that is no id (a damaged record) only costs walking again.
    Ok(text
        .lines()
        .filter_map(|l| RevisionId::from_short(l.trim()).ok())
        .collect())
}

fn write_done(store: &Path, job: &JobDir, done: &BTreeSet<RevisionId>) -> Result<()> {
    let dir = store.join(index::DIR).join(DIR_DONE);
    durable::create_dir(&dir)?;
    let text: String = done.iter().map(|id| format!("{}\n", id.short())).collect();
    durable::write_atomic(&dir.join(job.name().as_str()), text.as_bytes())
}

/// Syncs the store's filesystem (btrfs frees extents that lost their last
/// reference when the transaction commits) and returns its used bytes.
fn used_bytes(store: &Path) -> Result<u64> {
    if let Ok(dir) = File::open(store) {
        let _ = rustix::fs::syncfs(&dir);
    }
    Ok(store_space(store)?.used)
}

/// Holds `.dedup/run.lock`: one run per store at a time.
fn run_lock(store: &Path) -> Result<File> {
    let path = store.join(index::DIR).join("run.lock");
    let file = durable::open_lock_file(&path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::busy(format!(
            "another `backy-server dedup` is running on {}",
            store.display()
        ))),
        Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
}

/// Deduplicates the revisions of `jobs` in `store`; `progress` gets a line
/// per job (and one for a rebuild of the index).
pub fn run(store: &Path, jobs: &[JobDir], opts: Options, progress: &mut dyn FnMut(String)) -> Result<Report> {
    if crate::storage::probe_storage(store)? != StorageMode::Reflink {
        return Err(Error::precondition(format!(
            "the filesystem of {} cannot share extents (no reflinks): nothing to deduplicate",
            store.display()
        )));
    }
    let index = DigestIndex::open(store)?;
    let _running = run_lock(store)?;
    let mut report = Report {
        used_before: used_bytes(store)?,
        ..Report::default()
    };
    if opts.rebuild_index || index.needs_rebuild() {
        let stats = index::rebuild(store)?;
        progress(format!(
            "digest index rebuilt from every manifest: {} blocks",
            stats.live
        ));
        report.rebuilt = Some(stats);
    }
    let all = job_dirs(store)?;
    let mut sources = Sources {
        jobs: all.iter().map(|j| (job_key(j.name().as_str()), j)).collect(),
        open: HashMap::new(),
    };
    let mut buf = Vec::new();
    for job in jobs {
        let mut totals = Totals::default();
        let mut done = if opts.restart {
            BTreeSet::new()
        } else {
            done_of(store, job)?
        };
        let revisions = job.revisions()?;
        // Revisions gone since are forgotten.
        done.retain(|id| revisions.iter().any(|r| r.id == *id));
        for meta in &revisions {
            if done.contains(&meta.id) {
                totals.skipped += 1;
                continue;
            }
            match revision(&index, &mut sources, job, meta, &mut buf) {
                Ok(t) => totals.add(&t),
                Err(e) => {
                    // One unreadable revision does not stop the others;
                    // it is not recorded as done.
                    tracing::warn!(job = %job.name(), "skipping revision {}: {e}", meta.id);
                    continue;
                }
            }
            backy_common::fault::point("dedup.revision-walked");
            done.insert(meta.id);
            write_done(store, job, &done)?;
        }
        progress(format!(
            "{}: {} walked, {} done before; {} of {} blocks shared now ({}), {} shared already{}",
            job.name(),
            backy_common::units::count(totals.revisions, "revision"),
            totals.skipped,
            totals.deduped,
            totals.blocks,
            backy_common::units::format_bytes(totals.deduped_bytes),
            totals.shared,
            if totals.differed + totals.refused > 0 {
                format!(
                    ", {} differed from the index's hint, {} refused by the filesystem",
                    totals.differed, totals.refused
                )
            } else {
                String::new()
            }
        ));
        report.totals.add(&totals);
        report.jobs += 1;
    }
    report.used_after = used_bytes(store)?;
    Ok(report)
}

/// Walks one revision's blocks.
fn revision(
    index: &DigestIndex,
    sources: &mut Sources<'_>,
    job: &JobDir,
    meta: &RevisionMeta,
    buf: &mut Vec<u8>,
) -> Result<Totals> {
    let mut t = Totals {
        revisions: 1,
        ..Totals::default()
    };
    let manifest = job.manifest(meta)?;
    let path = job.image_path(&meta.id);
    // FIDEDUPERANGE wants the destination writable (it changes nothing
    // the file reads).
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let key = job_key(job.name().as_str());
    for (block, want) in manifest.data_blocks() {
        t.blocks += 1;
        let here = Location {
            job_key: key,
            rev: meta.id,
            block,
        };
        let Some(there) = index.lookup(want)? else {
            index.insert(&[(*want, here)])?;
            t.indexed += 1;
            continue;
        };
        if there == here {
            continue;
        }
        let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
        let Some(src) = sources.get(&there) else {
            // Its job or revision is gone: this block holds it now.
            index.replace(want, &there, Some(&here))?;
            continue;
        };
        let src_offset = there.block.saturating_mul(src.block_size);
        if src.size.saturating_sub(src_offset).min(src.block_size) != len {
            index.replace(want, &there, Some(&here))?;
            continue;
        }
        if same_extents(&src.file, src_offset, &image, offset, len)? {
            t.shared += 1;
            continue;
        }
        match dedupe_range(&src.file, src_offset, len, &image, offset)? {
            DedupeOutcome::Deduped(n) => {
                t.deduped += 1;
                t.deduped_bytes += n;
            }
            DedupeOutcome::Differs => {
                t.differed += 1;
                if !holds(&src.file, src_offset, len, want, buf)? {
                    index.replace(want, &there, Some(&here))?;
                }
            }
            DedupeOutcome::Unsupported => t.refused += 1,
        }
    }
    Ok(t)
}

/// Whether `file[offset..+len]` has digest `want` (is the index right?).
fn holds(file: &File, offset: u64, len: u64, want: &Digest, buf: &mut Vec<u8>) -> Result<bool> {
    buf.resize(len as usize, 0);
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(digest(buf) == *want),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io("reading a block the index names", e)),
    }
}
