//! Rollback (delta restore) onto a file, block device or RBD image of the
//! revision's size: the target is read block by block and compared with
//! the manifest's digests; a block the revision has as zeros is zeroed
//! locally; for the other differing blocks the granule digests go to the
//! server (`RestoreRequest.granules`, in bounded batches) and only the
//! granules that differ come back. Each patched block is checked against
//! the manifest before anything of it is written: the target never gets
//! bytes the revision does not have.

use super::rbd::RbdTarget;
use super::target::open_device;
use crate::connect::{status_error, Client};
use crate::progress::Meter;
use crate::source::process::Running;
use crate::source::rbd::Rbd;
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::{is_all_zero, GRANULE};
use backy_common::rbd_diff::{DiffReader, Record};
use backy_common::rollback::{compare, Batch, Verdict};
use backy_common::source::SourceSpec;
use backy_common::{Error, Result};
use backy_proto::restore_frame::Frame;
use backy_proto::{GranuleDigests, RestoreFrame, RestoreRequest, RevisionInfo};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::process::ChildStdout;
use tokio::sync::mpsc;

/// Bytes of differing blocks a batch holds in memory until their granules
/// come (at least one block).
const HELD_BYTES: u64 = 64 << 20;

/// A target rolled back in place: read in order, written anywhere behind.
pub trait Local: Send {
    /// The first block from `block` on that may differ from the revision:
    /// every block, unless the target knows what changed.
    fn candidate(&mut self, block: u64, manifest: &Manifest) -> Result<Option<u64>> {
        Ok((block < manifest.block_count()).then_some(block))
    }
    /// Reads `buf.len()` bytes at `offset` (a candidate block); offsets
    /// ascend.
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write(&mut self, data: &[u8], offset: u64) -> Result<()>;
    /// Makes a range zero.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes everything durable.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// A file or block device.
pub struct InPlace {
    file: File,
    path: std::path::PathBuf,
    /// A block device (zeroed with ZERO_RANGE) rather than a file (holes).
    device: bool,
}

/// An RBD image: read by `rbd export`, written by `rbd import-diff` (both
/// streams, no kernel mapping).
pub struct RbdLocal {
    export: Option<Running>,
    read: RbdRead,
    /// `None` once committed.
    writer: Option<RbdTarget>,
    spec: String,
}

/// How an RBD image is read.
enum RbdRead {
    /// All of it, in order (`rbd export`).
    Whole {
        reader: BufReader<ChildStdout>,
        position: u64,
    },
    /// Only the objects changed since the revision's own snapshot (`rbd
    /// export-diff --whole-object`): the rest still holds the revision.
    Changed {
        diff: DiffReader<BufReader<ChildStdout>>,
        /// The current record's rest: (offset, length, data or zeros).
        pending: Option<(u64, u64, bool)>,
    },
}

/// What a rollback read, fetched and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub read: u64,
    pub fetched: u64,
    pub written: u64,
}

fn other_size(what: &str, len: u64, size: u64) -> Error {
    Error::invalid(format!(
        "{what} holds {len} bytes, the revision {size}: a rollback needs a target of the same size; give --full to restore the whole revision onto it"
    ))
}

/// Whether a restore of `size` bytes onto `path` is a rollback: the target
/// is an existing non-empty file, a block device or an existing RBD image,
/// `force` was given (as for any restore over data) and `--full` was not.
/// A target of another size is refused then, in one line. `None`: a full
/// restore, whose own checks apply (a file that exists without `--force`
/// is refused there).
/// `snapshot`: the source snapshot the revision was taken from and the
/// block size (an RBD image that still has it is read only where it
/// changed since).
pub fn plan(
    path: &Path,
    size: u64,
    force: bool,
    full: bool,
    snapshot: Option<(&str, u32)>,
) -> Result<Option<Box<dyn Local>>> {
    if full || !force || path.as_os_str() == super::STDOUT {
        return Ok(None);
    }
    if let Some(spec) = path.to_str().and_then(|p| p.strip_prefix("rbd:")) {
        return RbdLocal::plan(spec, size, snapshot);
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("examining {}", path.display()), e)),
    };
    let device = meta.file_type().is_block_device();
    let (file, len) = if device {
        let mut file = open_device(path)?;
        let len = crate::source::block::device_size(&mut file, path)?;
        (file, len)
    } else if meta.is_file() && meta.len() > 0 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        (file, meta.len())
    } else {
        return Ok(None);
    };
    if len != size {
        return Err(other_size(&path.display().to_string(), len, size));
    }
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
    Ok(Some(Box::new(InPlace {
        file,
        path: path.to_path_buf(),
        device,
    })))
}

impl RbdLocal {
    fn plan(spec: &str, size: u64, snapshot: Option<(&str, u32)>) -> Result<Option<Box<dyn Local>>> {
        let rbd = Rbd::from_spec(&SourceSpec::from_cli(&format!("rbd:{spec}"), |_| false)?)?;
        if !rbd.exists()? {
            return Ok(None);
        }
        let image = rbd.image_spec();
        let len = rbd.size(None)?;
        if len != size {
            return Err(other_size(&format!("rbd image {image}"), len, size));
        }
        // The revision's own snapshot, of its size, in objects that hold
        // whole blocks: its diff to now names every block that may differ.
        let from = match snapshot {
            Some((snap, block_size)) if !snap.is_empty() && rbd.snapshots()?.iter().any(|s| s == snap) => {
                (rbd.size(Some(snap))? == size
                    && rbd.objects_hold_whole_blocks(snap, u64::from(block_size))?)
                .then_some(snap)
            }
            _ => None,
        };
        let mut export = match from {
            Some(snap) => rbd.export_diff_to_head(snap)?,
            None => rbd.export()?,
        };
        let stdout = export
            .child
            .stdout
            .take()
            .ok_or_else(|| Error::internal("rbd export has no stdout"))?;
        let reader = BufReader::with_capacity(1 << 20, stdout);
        let read = match from {
            Some(snap) => {
                tracing::info!(image = %image, snapshot = snap, "reading only what changed since the revision's snapshot");
                RbdRead::Changed {
                    diff: DiffReader::new(reader),
                    pending: None,
                }
            }
            None => RbdRead::Whole { reader, position: 0 },
        };
        let writer = RbdTarget::open(spec, size, true)?;
        Ok(Some(Box::new(RbdLocal {
            export: Some(export),
            read,
            writer: Some(writer),
            spec: image,
        })))
    }
}

impl RbdLocal {
    /// A failed read, with what `rbd` said.
    fn failed(&mut self, e: impl std::fmt::Display) -> Error {
        let why = match self.export.take() {
            Some(running) => running
                .finish(std::time::Duration::from_secs(10))
                .err()
                .map_or_else(|| e.to_string(), |f| f.message),
            None => e.to_string(),
        };
        Error::unavailable(format!("reading rbd image {}: {why}", self.spec))
    }

    /// The current data or zero record of the diff (None at its end).
    fn record(&mut self) -> Result<Option<(u64, u64, bool)>> {
        loop {
            let RbdRead::Changed { diff, pending } = &mut self.read else {
                return Ok(None);
            };
            if pending.is_some() {
                return Ok(*pending);
            }
            let record = match diff.next_record() {
                Ok(r) => r,
                Err(e) => return Err(self.failed(e.message)),
            };
            let next = match record {
                Some(Record::Data { offset, len }) if len > 0 => (offset, len, true),
                Some(Record::Zero { offset, len }) if len > 0 => (offset, len, false),
                Some(Record::End) | None => return Ok(None),
                Some(_) => continue,
            };
            *pending = Some(next);
        }
    }
}

impl Local for RbdLocal {
    fn candidate(&mut self, block: u64, manifest: &Manifest) -> Result<Option<u64>> {
        if let RbdRead::Whole { .. } = self.read {
            return Ok((block < manifest.block_count()).then_some(block));
        }
        let bs = u64::from(manifest.block_size());
        Ok(self
            .record()?
            .map(|(offset, _, _)| (offset / bs).max(block))
            .filter(|&b| b < manifest.block_count()))
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let RbdRead::Whole { reader, position } = &mut self.read {
            if offset != *position {
                return Err(Error::internal(format!(
                    "rbd export of {} read out of order (at {position}, asked {offset})",
                    self.spec
                )));
            }
            let read = reader.read_exact(buf);
            *position += buf.len() as u64;
            return read.map_err(|e| self.failed(e));
        }
        // From the diff: its records must cover the block whole (objects
        // changed since the snapshot come whole).
        let mut covered = 0usize;
        while covered < buf.len() {
            let at = offset + covered as u64;
            let Some((start, len, data)) = self.record()? else {
                return Err(self.failed(format!("rbd export-diff ended inside the block at {offset}")));
            };
            if start != at {
                return Err(self.failed(format!(
                    "rbd export-diff did not cover the block at {offset} whole (next range at {start}): restore with --full"
                )));
            }
            let n = len.min((buf.len() - covered) as u64) as usize;
            let RbdRead::Changed { diff, pending } = &mut self.read else {
                return Err(Error::internal("rbd read mode changed"));
            };
            if data {
                let mut got = 0;
                while got < n {
                    match diff.read_data(&mut buf[covered + got..covered + n]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) => return Err(self.failed(e.message)),
                    }
                }
                if got < n {
                    return Err(self.failed("rbd export-diff data record ended early"));
                }
            } else {
                buf[covered..covered + n].fill(0);
            }
            *pending = (len > n as u64).then_some((start + n as u64, len - n as u64, data));
            covered += n;
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.writer()?.write_data(offset, data)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writer()?.write_zero(offset, len)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(mut export) = self.export.take() {
            // What is left of the export is not needed.
            export.kill();
        }
        self.writer
            .take()
            .ok_or_else(|| Error::internal("rbd rollback committed twice"))?
            .commit()
    }
}

impl RbdLocal {
    fn writer(&mut self) -> Result<&mut RbdTarget> {
        self.writer
            .as_mut()
            .ok_or_else(|| Error::internal("rbd rollback already committed"))
    }
}

impl Drop for RbdLocal {
    fn drop(&mut self) {
        if let Some(mut export) = self.export.take() {
            export.kill();
        }
    }
}

/// Rolls `target` back to the revision `info` with `manifest`.
pub async fn run(
    client: &mut Client,
    job: &str,
    info: &RevisionInfo,
    manifest: Manifest,
    mut target: Box<dyn Local>,
    bar: std::sync::Arc<dyn Meter>,
) -> Result<Moved> {
    let manifest = std::sync::Arc::new(manifest);
    let mut moved = Moved::default();
    let mut next = 0;
    while next < manifest.block_count() {
        let (back, scanned) = {
            let (manifest, bar) = (manifest.clone(), bar.clone());
            tokio::task::spawn_blocking(move || {
                let scanned = scan(&mut *target, &manifest, next, &*bar);
                (target, scanned)
            })
            .await
            .map_err(|e| Error::internal(format!("reading the rollback target: {e}")))?
        };
        target = back;
        let scanned = scanned?;
        moved.read += scanned.read;
        moved.written += scanned.written;
        next = scanned.next;
        if !scanned.blocks.is_empty() {
            let (back, fetched, written) = fetch(client, job, info, &manifest, target, scanned).await?;
            target = back;
            moved.fetched += fetched;
            moved.written += written;
        }
    }
    tokio::task::spawn_blocking(move || target.finish())
        .await
        .map_err(|e| Error::internal(format!("finishing the rollback: {e}")))??;
    Ok(moved)
}

/// One batch of the scan.
struct Scan {
    /// Differing blocks with the target's granule digests.
    blocks: Vec<(u64, Vec<u8>)>,
    /// Their bytes on the target, in the same order.
    held: Vec<Vec<u8>>,
    /// The block the next scan starts at.
    next: u64,
    read: u64,
    written: u64,
}

/// Reads the target from block `first` on until a request's worth of
/// differing blocks is collected; zeroes locally what the revision has as
/// zeros. Stops before reading a block that might not fit.
fn scan(target: &mut dyn Local, manifest: &Manifest, first: u64, bar: &dyn Meter) -> Result<Scan> {
    let mut batch = Batch::default();
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut held_bytes = 0;
    let (mut read, mut written) = (0, 0);
    let mut buf = vec![0u8; manifest.block_size() as usize];
    let mut from = first;
    while let Some(block) = target.candidate(from, manifest)? {
        from = block + 1;
        let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
        if !batch.is_empty() && (!batch.fits(len) || held_bytes + len > HELD_BYTES) {
            return Ok(Scan {
                blocks: batch.take(),
                held,
                next: block,
                read,
                written,
            });
        }
        let ours = &mut buf[..len as usize];
        target.read(ours, offset)?;
        match compare(manifest, block, ours) {
            Verdict::Same => {}
            Verdict::Zero => {
                for (i, granule) in ours.chunks(GRANULE as usize).enumerate() {
                    if !is_all_zero(granule) {
                        target.zero(offset + i as u64 * GRANULE, granule.len() as u64)?;
                        written += granule.len() as u64;
                    }
                }
            }
            Verdict::Differs(digests) => {
                batch.push(block, digests);
                held.push(ours.to_vec());
                held_bytes += len;
            }
        }
        read += len;
        bar.set(offset + len);
    }
    Ok(Scan {
        blocks: batch.take(),
        held,
        next: manifest.block_count(),
        read,
        written,
    })
}

/// Asks the server for the differing granules of the scanned blocks and
/// writes them; returns the target and (data bytes fetched, bytes written).
async fn fetch(
    client: &mut Client,
    job: &str,
    info: &RevisionInfo,
    manifest: &std::sync::Arc<Manifest>,
    mut target: Box<dyn Local>,
    scanned: Scan,
) -> Result<(Box<dyn Local>, u64, u64)> {
    let wanted: Vec<u64> = scanned.blocks.iter().map(|(b, _)| *b).collect();
    let request = RestoreRequest {
        job: job.to_string(),
        revision: info.id.clone(),
        granules: scanned
            .blocks
            .into_iter()
            .map(|(block, digests)| GranuleDigests {
                block,
                digests,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut stream = client.restore(request).await.map_err(status_error)?.into_inner();
    match stream.message().await.map_err(status_error)? {
        Some(RestoreFrame {
            frame: Some(Frame::Begin(begin)),
        }) if begin.id == info.id && begin.size == info.size => {}
        Some(_) => {
            return Err(Error::data_loss(
                "rollback stream did not start with the revision",
            ))
        }
        None => return Err(Error::data_loss("rollback stream ended early")),
    }
    let (tx, mut rx) = mpsc::channel::<Frame>(super::FRAMES_IN_FLIGHT);
    let manifest = manifest.clone();
    let held = scanned.held;
    let writer = tokio::task::spawn_blocking(move || {
        let result = (|| {
            let mut patch = Patcher::new(&mut *target, &manifest, wanted, held);
            while let Some(frame) = rx.blocking_recv() {
                patch.frame(frame)?;
            }
            patch.finish()
        })();
        (target, result)
    });
    let received = super::forward(&mut stream, &tx).await;
    drop(tx);
    let (target, written) = writer
        .await
        .map_err(|e| Error::internal(format!("rollback writer failed: {e}")))?;
    received?;
    let (fetched, written) = written?;
    Ok((target, fetched, written))
}

/// How far ahead of the block being compared the kernel is asked to read,
/// so the disk works while the CPU hashes.
const READ_AHEAD: u64 = 16 << 20;

impl Local for InPlace {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading {} at offset {offset}", self.path.display()), e))?;
        let next = offset + buf.len() as u64;
        let _ = rustix::fs::fadvise(
            &self.file,
            next,
            std::num::NonZeroU64::new(READ_AHEAD),
            rustix::fs::Advice::WillNeed,
        );
        Ok(())
    }

    fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {} at offset {offset}", self.path.display()), e))
    }

    /// A hole in a file, zeroed on a device.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::FallocateFlags as F;
        let flags = if self.device {
            F::ZERO_RANGE | F::KEEP_SIZE
        } else {
            F::PUNCH_HOLE | F::KEEP_SIZE
        };
        if rustix::fs::fallocate(&self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        self.write(&vec![0u8; len as usize], offset)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("flushing {}", self.path.display()), e))
    }
}

/// Applies a rollback stream: its ranges must lie in the blocks asked for,
/// in order; each block is patched in memory (over the target's bytes the
/// scan held) and written only when its digest matches the manifest.
struct Patcher<'a> {
    target: &'a mut dyn Local,
    manifest: &'a Manifest,
    /// Blocks asked for, ascending, with the target's bytes of each; `at`
    /// indexes the one being received.
    wanted: Vec<u64>,
    held: Vec<Vec<u8>>,
    at: usize,
    /// Ranges of the current block: (offset, data or None for zeros, length).
    pieces: Vec<(u64, Option<Vec<u8>>, u64)>,
    next: u64,
    fetched: u64,
    written: u64,
    ended: bool,
}

impl<'a> Patcher<'a> {
    fn new(target: &'a mut dyn Local, manifest: &'a Manifest, wanted: Vec<u64>, held: Vec<Vec<u8>>) -> Self {
        Patcher {
            target,
            manifest,
            wanted,
            held,
            at: 0,
            pieces: Vec::new(),
            next: 0,
            fetched: 0,
            written: 0,
            ended: false,
        }
    }

    fn frame(&mut self, frame: Frame) -> Result<()> {
        if self.ended {
            return Err(Error::data_loss("rollback stream goes on after its end"));
        }
        match frame {
            Frame::Data(d) => {
                let len = d.data.len() as u64;
                self.fetched += len;
                self.piece(d.offset, Some(d.data), len)
            }
            Frame::Zero(z) => self.piece(z.offset, None, z.length),
            Frame::End(end) => {
                if end.bytes_sent != self.fetched {
                    return Err(Error::data_loss(format!(
                        "rollback stream says it sent {} data bytes, {} came",
                        end.bytes_sent, self.fetched
                    )));
                }
                self.flush()?;
                self.ended = true;
                Ok(())
            }
            Frame::Begin(_) => Err(Error::data_loss("rollback stream starts twice")),
        }
    }

    /// A range, split at block boundaries (zero ranges may span blocks).
    fn piece(&mut self, offset: u64, mut data: Option<Vec<u8>>, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.manifest.image_size() && offset >= self.next)
            .ok_or_else(|| {
                Error::data_loss(format!(
                    "rollback stream range at offset {offset} ({len} bytes) is out of order or outside the image"
                ))
            })?;
        self.next = end;
        let bs = u64::from(self.manifest.block_size());
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let piece_end = end.min((block + 1) * bs);
            while self.wanted.get(self.at).is_some_and(|&b| b < block) {
                self.flush()?;
                self.at += 1;
            }
            if self.wanted.get(self.at) != Some(&block) {
                return Err(Error::data_loss(format!(
                    "rollback stream sent block {block}, which was not asked for"
                )));
            }
            let piece = data
                .as_mut()
                .map(|d| d.drain(..(piece_end - pos) as usize).collect());
            self.pieces.push((pos, piece, piece_end - pos));
            pos = piece_end;
        }
        Ok(())
    }

    /// Patches the current block with its pieces, checks it and writes
    /// the pieces.
    fn flush(&mut self) -> Result<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        let Some(&block) = self.wanted.get(self.at) else {
            return Err(Error::internal("rollback pieces without a block"));
        };
        let offset = self.manifest.block_offset(block);
        let buf = self
            .held
            .get_mut(self.at)
            .ok_or_else(|| Error::internal("rollback block without its bytes"))?;
        for (at, data, n) in &self.pieces {
            let range = (at - offset) as usize..(at - offset + n) as usize;
            match data {
                Some(d) => buf[range].copy_from_slice(d),
                None => buf[range].fill(0),
            }
        }
        if self.manifest.get(block) != Some(&digest(buf)) {
            return Err(Error::data_loss(format!(
                "block at offset {offset} does not match the revision's manifest after patching: not written (the target is rolled back up to there)"
            )));
        }
        for (at, data, n) in std::mem::take(&mut self.pieces) {
            match data {
                Some(d) => self.target.write(&d, at)?,
                None => self.target.zero(at, n)?,
            }
            self.written += n;
        }
        Ok(())
    }

    fn finish(self) -> Result<(u64, u64)> {
        if !self.ended {
            return Err(Error::data_loss(format!(
                "rollback stream ended early (at offset {})",
                self.next
            )));
        }
        Ok((self.fetched, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_proto::{DataRange, RestoreEnd, ZeroRange};

    const BS: u32 = 4 * GRANULE as u32;
    const B: usize = BS as usize;
    const G: usize = GRANULE as usize;

    fn manifest_of(img: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(img.len() as u64, BS).unwrap();
        for (i, b) in img.chunks(B).enumerate() {
            m.set(i as u64, digest(b)).unwrap();
        }
        m
    }

    fn target(dir: &Path, bytes: &[u8]) -> (std::path::PathBuf, Box<dyn Local>) {
        let path = dir.join("t.img");
        std::fs::write(&path, bytes).unwrap();
        let t = plan(&path, bytes.len() as u64, true, false, None)
            .unwrap()
            .unwrap();
        (path, t)
    }

    fn data(offset: usize, bytes: &[u8]) -> Frame {
        Frame::Data(DataRange {
            offset: offset as u64,
            data: bytes.to_vec(),
        })
    }

    #[test]
    fn patches_checked_blocks_and_refuses_what_was_not_asked() {
        let dir = tempfile::tempdir().unwrap();
        let revision: Vec<u8> = (0..3 * B).map(|i| (i % 253) as u8).collect();
        let m = manifest_of(&revision);
        let mut ours = revision.clone();
        ours[G + 3] ^= 1; // block 0, granule 1
        ours[2 * B + 3 * G] ^= 1; // block 2, granule 3
        let (path, mut t) = target(dir.path(), &ours);
        let held = vec![ours[..B].to_vec(), ours[2 * B..].to_vec()];
        let mut p = Patcher::new(&mut *t, &m, vec![0, 2], held);
        p.frame(data(G, &revision[G..2 * G])).unwrap();
        p.frame(data(2 * B + 3 * G, &revision[2 * B + 3 * G..3 * B]))
            .unwrap();
        p.frame(Frame::End(RestoreEnd {
            bytes_sent: 2 * G as u64,
        }))
        .unwrap();
        assert_eq!(p.finish().unwrap(), (2 * G as u64, 2 * G as u64));
        assert_eq!(std::fs::read(&path).unwrap(), revision);

        // A block not asked for, and a patch that does not give the
        // revision's block: errors, nothing of the block written.
        let (path, mut t) = target(dir.path(), &ours);
        let held = || vec![ours[..B].to_vec()];
        let mut p = Patcher::new(&mut *t, &m, vec![0], held());
        let e = p.frame(data(B, &revision[B..B + G])).unwrap_err();
        assert!(e.message.contains("not asked for"), "{}", e.message);
        let mut p = Patcher::new(&mut *t, &m, vec![0], held());
        p.frame(Frame::Zero(ZeroRange {
            offset: G as u64,
            length: G as u64,
        }))
        .unwrap();
        let e = p.frame(Frame::End(RestoreEnd { bytes_sent: 0 })).unwrap_err();
        assert!(e.message.contains("does not match"), "{}", e.message);
        assert_eq!(std::fs::read(&path).unwrap(), ours);
        // A stream that stops before its end.
        let p = Patcher::new(&mut *t, &m, vec![0], held());
        assert!(p.finish().unwrap_err().message.contains("ended early"));
    }

    #[test]
    fn plan_chooses_rollback_only_for_a_same_size_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        assert!(
            plan(&path, 10, true, false, None).unwrap().is_none(),
            "missing: full"
        );
        std::fs::write(&path, [1u8; 10]).unwrap();
        assert!(
            plan(&path, 10, false, false, None).unwrap().is_none(),
            "no --force"
        );
        assert!(plan(&path, 10, true, true, None).unwrap().is_none(), "--full");
        assert!(plan(&path, 10, true, false, None).unwrap().is_some());
        let e = plan(&path, 11, true, false, None).err().unwrap();
        assert!(
            e.message.contains("holds 10 bytes, the revision 11"),
            "{}",
            e.message
        );
    }
}
