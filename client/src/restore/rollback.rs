//! Rollback (delta restore) onto a file or block device of the revision's
//! size: the target is read block by block and compared with the
//! manifest's digests; a block the revision has as zeros is zeroed locally;
//! for the other differing blocks the granule digests go to the server
//! (`RestoreRequest.granules`, in bounded batches) and only the granules
//! that differ come back. Each patched block is checked against the
//! manifest before anything of it is written: the target never gets bytes
//! the revision does not have.

use super::target::open_device;
use crate::connect::{status_error, Client};
use crate::progress::Meter;
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::{is_all_zero, GRANULE};
use backy_common::rollback::{compare, Batch, Verdict};
use backy_common::{Error, Result};
use backy_proto::restore_frame::Frame;
use backy_proto::{GranuleDigests, RestoreFrame, RestoreRequest, RevisionInfo};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A target rolled back in place.
pub struct InPlace {
    file: Arc<File>,
    path: PathBuf,
    /// A block device (zeroed with ZERO_RANGE) rather than a file (holes).
    device: bool,
}

/// What a rollback read, fetched and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub read: u64,
    pub fetched: u64,
    pub written: u64,
}

/// Whether a restore of `size` bytes onto `path` is a rollback: the target
/// is an existing non-empty file or a block device, `force` was given (as
/// for any restore over data) and `--full` was not. A target of another
/// size is refused then, in one line. `None`: a full restore, whose own
/// checks apply (a file that exists without `--force` is refused there).
pub fn plan(path: &Path, size: u64, force: bool, full: bool) -> Result<Option<InPlace>> {
    if full || !force || path.as_os_str() == super::STDOUT || path.to_string_lossy().starts_with("rbd:") {
        return Ok(None);
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
        return Err(Error::invalid(format!(
            "{} holds {len} bytes, the revision {size}: a rollback needs a target of the same size; give --full to restore the whole revision onto it",
            path.display()
        )));
    }
    Ok(Some(InPlace {
        file: Arc::new(file),
        path: path.to_path_buf(),
        device,
    }))
}

/// Rolls `target` back to the revision `info` with `manifest`.
pub async fn run(
    client: &mut Client,
    job: &str,
    info: &RevisionInfo,
    manifest: Manifest,
    target: InPlace,
    bar: Arc<dyn Meter>,
) -> Result<Moved> {
    let manifest = Arc::new(manifest);
    let target = Arc::new(target);
    let mut moved = Moved::default();
    let mut next = 0;
    while next < manifest.block_count() {
        let scan = {
            let (manifest, target, bar) = (manifest.clone(), target.clone(), bar.clone());
            tokio::task::spawn_blocking(move || scan(&target, &manifest, next, &*bar))
                .await
                .map_err(|e| Error::internal(format!("reading the rollback target: {e}")))??
        };
        moved.read += scan.read;
        moved.written += scan.written;
        next = scan.next;
        if !scan.blocks.is_empty() {
            let (fetched, written) = fetch(client, job, info, &manifest, &target, scan.blocks).await?;
            moved.fetched += fetched;
            moved.written += written;
        }
    }
    let target = target.clone();
    tokio::task::spawn_blocking(move || {
        target
            .file
            .sync_all()
            .map_err(|e| Error::io(format!("flushing {}", target.path.display()), e))
    })
    .await
    .map_err(|e| Error::internal(format!("flushing the rollback target: {e}")))??;
    Ok(moved)
}

/// One batch of the scan.
struct Scan {
    /// Differing blocks with the target's granule digests.
    blocks: Vec<(u64, Vec<u8>)>,
    /// The block the next scan starts at.
    next: u64,
    read: u64,
    written: u64,
}

/// Reads the target from block `first` on until a request's worth of
/// differing blocks is collected; zeroes locally what the revision has as
/// zeros.
fn scan(target: &InPlace, manifest: &Manifest, first: u64, bar: &dyn Meter) -> Result<Scan> {
    let mut batch = Batch::default();
    let (mut read, mut written) = (0, 0);
    let mut buf = vec![0u8; manifest.block_size() as usize];
    let _ = rustix::fs::fadvise(&*target.file, 0, None, rustix::fs::Advice::Sequential);
    for block in first..manifest.block_count() {
        let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
        let ours = &mut buf[..len as usize];
        target.read(ours, offset)?;
        match compare(manifest, block, ours) {
            Verdict::Same => {}
            Verdict::Zero => {
                for (i, granule) in ours.chunks(GRANULE as usize).enumerate() {
                    if !is_all_zero(granule) {
                        let at = offset + i as u64 * GRANULE;
                        target.zero(at, granule.len() as u64)?;
                        written += granule.len() as u64;
                    }
                }
            }
            Verdict::Differs(digests) => {
                if !batch.fits(&digests) {
                    return Ok(Scan {
                        blocks: batch.take(),
                        next: block,
                        read,
                        written,
                    });
                }
                batch.push(block, digests);
            }
        }
        read += len;
        bar.set(offset + len);
    }
    Ok(Scan {
        blocks: batch.take(),
        next: manifest.block_count(),
        read,
        written,
    })
}

/// Asks the server for the differing granules of `blocks` and writes them;
/// returns (data bytes fetched, bytes written).
async fn fetch(
    client: &mut Client,
    job: &str,
    info: &RevisionInfo,
    manifest: &Arc<Manifest>,
    target: &Arc<InPlace>,
    blocks: Vec<(u64, Vec<u8>)>,
) -> Result<(u64, u64)> {
    let wanted: Vec<u64> = blocks.iter().map(|(b, _)| *b).collect();
    let request = RestoreRequest {
        job: job.to_string(),
        revision: info.id.clone(),
        granules: blocks
            .into_iter()
            .map(|(block, digests)| GranuleDigests { block, digests })
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
    let (manifest, target) = (manifest.clone(), target.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut patch = Patcher::new(&target, &manifest, wanted);
        while let Some(frame) = rx.blocking_recv() {
            patch.frame(frame)?;
        }
        patch.finish()
    });
    let received = super::forward(&mut stream, &tx).await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::internal(format!("rollback writer failed: {e}")))?;
    received?;
    written
}

impl InPlace {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading {} at offset {offset}", self.path.display()), e))
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {} at offset {offset}", self.path.display()), e))
    }

    /// Makes a range zero: a hole in a file, zeroed on a device.
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::FallocateFlags as F;
        let flags = if self.device {
            F::ZERO_RANGE | F::KEEP_SIZE
        } else {
            F::PUNCH_HOLE | F::KEEP_SIZE
        };
        if rustix::fs::fallocate(&*self.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        self.write(&vec![0u8; len as usize], offset)
    }
}

/// Applies a rollback stream: its ranges must lie in the blocks asked for,
/// in order; each block is patched in memory and written only when its
/// digest matches the manifest.
struct Patcher<'a> {
    target: &'a InPlace,
    manifest: &'a Manifest,
    /// Blocks asked for, ascending; `at` indexes the one being received.
    wanted: Vec<u64>,
    at: usize,
    /// Ranges of the current block: (offset, data or None for zeros, length).
    pieces: Vec<(u64, Option<Vec<u8>>, u64)>,
    next: u64,
    fetched: u64,
    written: u64,
    ended: bool,
    buf: Vec<u8>,
}

impl<'a> Patcher<'a> {
    fn new(target: &'a InPlace, manifest: &'a Manifest, wanted: Vec<u64>) -> Self {
        Patcher {
            target,
            manifest,
            wanted,
            at: 0,
            pieces: Vec::new(),
            next: 0,
            fetched: 0,
            written: 0,
            ended: false,
            buf: Vec::new(),
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
        let (offset, len) = (self.manifest.block_offset(block), self.manifest.block_len(block));
        self.buf.resize(len as usize, 0);
        self.target.read(&mut self.buf, offset)?;
        for (at, data, n) in &self.pieces {
            let range = (at - offset) as usize..(at - offset + n) as usize;
            match data {
                Some(d) => self.buf[range].copy_from_slice(d),
                None => self.buf[range].fill(0),
            }
        }
        if self.manifest.get(block) != Some(&digest(&self.buf)) {
            return Err(Error::data_loss(format!(
                "block at offset {offset} does not match the revision's manifest after patching: not written ({} is rolled back up to there)",
                self.target.path.display()
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

    fn target(dir: &Path, bytes: &[u8]) -> InPlace {
        let path = dir.join("t.img");
        std::fs::write(&path, bytes).unwrap();
        plan(&path, bytes.len() as u64, true, false).unwrap().unwrap()
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
        let t = target(dir.path(), &ours);
        let mut p = Patcher::new(&t, &m, vec![0, 2]);
        p.frame(data(G, &revision[G..2 * G])).unwrap();
        p.frame(data(2 * B + 3 * G, &revision[2 * B + 3 * G..3 * B]))
            .unwrap();
        p.frame(Frame::End(RestoreEnd {
            bytes_sent: 2 * G as u64,
        }))
        .unwrap();
        assert_eq!(p.finish().unwrap(), (2 * G as u64, 2 * G as u64));
        assert_eq!(std::fs::read(&t.path).unwrap(), revision);

        // A block not asked for, and a patch that does not give the
        // revision's block: errors, nothing of the block written.
        let t = target(dir.path(), &ours);
        let mut p = Patcher::new(&t, &m, vec![0]);
        let e = p.frame(data(B, &revision[B..B + G])).unwrap_err();
        assert!(e.message.contains("not asked for"), "{}", e.message);
        let mut p = Patcher::new(&t, &m, vec![0]);
        p.frame(Frame::Zero(ZeroRange {
            offset: G as u64,
            length: G as u64,
        }))
        .unwrap();
        let e = p.frame(Frame::End(RestoreEnd { bytes_sent: 0 })).unwrap_err();
        assert!(e.message.contains("does not match"), "{}", e.message);
        assert_eq!(std::fs::read(&t.path).unwrap(), ours);
        // A stream that stops before its end.
        let p = Patcher::new(&t, &m, vec![0]);
        assert!(p.finish().unwrap_err().message.contains("ended early"));
    }

    #[test]
    fn plan_chooses_rollback_only_for_a_same_size_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        assert!(plan(&path, 10, true, false).unwrap().is_none(), "missing: full");
        std::fs::write(&path, [1u8; 10]).unwrap();
        assert!(plan(&path, 10, false, false).unwrap().is_none(), "no --force");
        assert!(plan(&path, 10, true, true).unwrap().is_none(), "--full");
        assert!(plan(&path, 10, true, false).unwrap().is_some());
        let e = plan(&path, 11, true, false).err().unwrap();
        assert!(
            e.message.contains("holds 10 bytes, the revision 11"),
            "{}",
            e.message
        );
        assert!(plan(Path::new("rbd:pool/img"), 10, true, false)
            .unwrap()
            .is_none());
    }
}
