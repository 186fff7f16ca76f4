//! Reading revisions back out: spec resolution, manifest and image streams.

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::framer::{Framer, RangeSink};
use backy_common::manifest::Manifest;
use backy_common::replicate::{differing_granules, same_block};
use backy_common::revision::RevisionMeta;
use backy_common::rollback;
use backy_common::spec::Spec;
use backy_common::{Error, Result, MAX_FRAME_DATA};
use backy_proto::restore_frame::Frame;
use backy_proto::{
    DataRange, GranuleDigests, ManifestChunk, RestoreEnd, RestoreFrame, RevisionInfo, ZeroRange,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The one revision `spec` names.
pub fn resolve(server: &Server, job: &JobDir, spec: &str) -> Result<RevisionMeta> {
    let spec = Spec::parse(if spec.is_empty() { "latest" } else { spec })?;
    let entry = server.jobs.indexed(job)?;
    let i = spec
        .resolve_one(&entry.revisions)
        .map_err(|e| e.context(format!("job {}", job.name())))?;
    entry
        .revisions
        .get(i)
        .cloned()
        .ok_or_else(|| Error::internal("spec resolved outside the revision list"))
}

/// Bytes of a manifest per message.
pub const MANIFEST_CHUNK: usize = 256 << 10;

/// Streams the stored manifest of `meta` from disk, chunk by chunk (memory
/// stays at one chunk however large the image); a manifest that does not
/// match the revision's digest ends the stream with `DATA_LOSS`.
pub fn stream_manifest(
    server: &Arc<Server>,
    job: &JobDir,
    meta: &RevisionMeta,
    tx: &mpsc::Sender<std::result::Result<ManifestChunk, tonic::Status>>,
) {
    use std::io::Read;
    let _reading = server.jobs.activity.start_read(job.name(), meta.id);
    let path = job.digests_path(&meta.id);
    let fail = |e: Error| {
        let _ = tx.blocking_send(Err(crate::wire::to_status(e)));
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => return fail(Error::io(format!("opening the manifest of {}", meta.id), e)),
    };
    let mut hasher = blake3::Hasher::new();
    let mut revision = Some(RevisionInfo::from(meta));
    let mut buf = vec![0u8; MANIFEST_CHUNK];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return fail(Error::io(format!("reading the manifest of {}", meta.id), e)),
            }
        }
        if filled == 0 {
            break;
        }
        hasher.update(&buf[..filled]);
        let chunk = ManifestChunk {
            revision: revision.take(),
            data: buf[..filled].to_vec(),
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return; // the caller went away
        }
    }
    if hasher.finalize().to_hex().as_str() != meta.manifest_digest {
        fail(Error::data_loss(format!(
            "the stored manifest of revision {} does not match its digest",
            meta.id
        )));
    }
}

/// Streams a manifest computed in memory (a partial revision's) in
/// [`MANIFEST_CHUNK`] messages, encoding as it goes; `info` rides on the
/// first. Stops when the receiver goes away.
pub fn send_manifest(
    info: RevisionInfo,
    manifest: &Manifest,
    tx: &mpsc::Sender<std::result::Result<ManifestChunk, tonic::Status>>,
) {
    struct Sender<'a> {
        tx: &'a mpsc::Sender<std::result::Result<ManifestChunk, tonic::Status>>,
        revision: Option<RevisionInfo>,
    }
    impl std::io::Write for Sender<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let chunk = ManifestChunk {
                revision: self.revision.take(),
                data: buf.to_vec(),
            };
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the caller went away"))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sender = Sender {
        tx,
        revision: Some(info),
    };
    let mut w = std::io::BufWriter::with_capacity(MANIFEST_CHUNK, sender);
    // A failed send means the caller left: nothing more to do.
    let _ = manifest
        .write_to(&mut w)
        .and_then(|_| std::io::Write::flush(&mut w));
}

/// Streams the image of `meta`: zero blocks (per the manifest) as zero
/// ranges, others as data frames of at most [`MAX_FRAME_DATA`]. Runs on a
/// blocking thread; stops early when the receiver goes away. Returns
/// whether the whole image went out (false: the receiver left); an error
/// has been sent to the receiver too.
/// With `base` (a revision of the same job the receiver holds), blocks
/// whose digest equals the base's are skipped: the receiver starts from
/// its copy of the base.
/// Of a block that differs, only the granules that differ from the base's
/// bytes go. From `from` (a multiple of the block size: a copy resuming)
/// on, blocks below it are not sent.
/// With `granules` (a rollback: the receiver's digests of its differing
/// blocks), only those blocks go, and of each only the granules whose
/// digests differ from the revision's.
pub fn stream_image(
    server: Arc<Server>,
    job: JobDir,
    meta: RevisionMeta,
    base: Option<RevisionMeta>,
    from: u64,
    granules: Vec<GranuleDigests>,
    tx: mpsc::Sender<std::result::Result<RestoreFrame, tonic::Status>>,
) -> Result<bool> {
    let _reading = server.jobs.activity.start_read(job.name(), meta.id);
    let send = |frame: Frame| {
        let data = match &frame {
            Frame::Data(d) => d.data.len(),
            _ => 0,
        };
        let sent = tx.blocking_send(Ok(RestoreFrame { frame: Some(frame) })).is_ok();
        if sent {
            server.metrics.sent(data);
        }
        sent
    };
    let result = (|| -> Result<bool> {
        let manifest = job.manifest(&meta)?;
        let mut base = match &base {
            Some(b) => Some(Base::open(&job, b)?),
            None => None,
        };
        if !from.is_multiple_of(u64::from(meta.block_size)) || from > meta.size {
            return Err(Error::invalid(format!(
                "resume offset {from}: must be a multiple of the block size {} within the image's {} bytes",
                meta.block_size, meta.size
            )));
        }
        if !granules.is_empty() {
            if base.is_some() || from != 0 {
                return Err(Error::invalid(
                    "a rollback (granules) cannot be combined with base or from",
                ));
            }
            rollback::check_request(
                &manifest,
                granules.iter().map(|g| (g.block, g.digests.as_slice())),
            )?;
        }
        let path = job.image_path(&meta.id);
        let file = File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        if len != meta.size {
            return Err(Error::data_loss(format!(
                "{}: {len} bytes, the revision says {}",
                path.display(),
                meta.size
            )));
        }
        if !send(Frame::Begin(RevisionInfo::from(&meta))) {
            return Ok(false);
        }
        if !granules.is_empty() {
            let read_at = |buf: &mut [u8], at: u64| {
                file.read_exact_at(buf, at)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))
            };
            return send_granules(read_at, &manifest, &granules, Frames::new(send));
        }
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        let mut out = Frames::new(send);
        let first = from / u64::from(meta.block_size);
        for block in first..manifest.block_count() {
            let offset = manifest.block_offset(block);
            let len = manifest.block_len(block);
            if base
                .as_ref()
                .is_some_and(|b| same_block(&b.manifest, &manifest, block))
            {
                continue;
            }
            if manifest.is_zero(block) {
                if !out.zero(offset, len) {
                    return Ok(false);
                }
                continue;
            }
            let runs = match &mut base {
                Some(b) => b.differing(&file, &manifest, block)?,
                None => std::iter::once(0..len as usize).collect(),
            };
            for run in runs {
                let mut pos = offset + run.start as u64;
                let end = offset + run.end as u64;
                while pos < end {
                    let n = (end - pos).min(MAX_FRAME_DATA as u64) as usize;
                    // A buffer per frame: it moves into the message uncopied.
                    let mut data = vec![0u8; n];
                    file.read_exact_at(&mut data, pos)
                        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                    if !out.data(pos, data) {
                        return Ok(false);
                    }
                    backy_common::fault::point("restore.data-sent");
                    pos += n as u64;
                }
            }
        }
        Ok(out.end())
    })();
    if let Err(e) = &result {
        tracing::error!(job = %job.name(), rev = %meta.id, "restore failed: {e}");
        let _ = tx.blocking_send(Err(crate::wire::to_status(e.clone())));
    }
    result
}

/// The rest of a rollback's stream: of each block the receiver named, the
/// granules where the revision differs from the receiver's digests.
pub(crate) fn send_granules<S: FnMut(Frame) -> bool>(
    mut read_at: impl FnMut(&mut [u8], u64) -> Result<()>,
    manifest: &Manifest,
    granules: &[GranuleDigests],
    mut out: Frames<S>,
) -> Result<bool> {
    let mut block_bytes = Vec::new();
    for wanted in granules {
        let (offset, len) = (
            manifest.block_offset(wanted.block),
            manifest.block_len(wanted.block),
        );
        block_bytes.resize(len as usize, 0);
        if manifest.is_zero(wanted.block) {
            block_bytes.fill(0);
        } else {
            read_at(&mut block_bytes, offset)?;
        }
        for run in rollback::ranges_to_send(&wanted.digests, &block_bytes)? {
            let mut pos = run.start;
            while pos < run.end {
                let n = (run.end - pos).min(MAX_FRAME_DATA);
                if !out.data(offset + pos as u64, block_bytes[pos..pos + n].to_vec()) {
                    return Ok(false);
                }
                pos += n;
            }
        }
    }
    Ok(out.end())
}

/// The revision a receiver holds, which a stream is relative to.
struct Base {
    manifest: Manifest,
    file: File,
    /// Scratch for a block of the base and of the revision.
    bytes: (Vec<u8>, Vec<u8>),
}

impl Base {
    fn open(job: &JobDir, meta: &RevisionMeta) -> Result<Self> {
        let path = job.image_path(&meta.id);
        Ok(Base {
            manifest: job.manifest(meta)?,
            file: File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
            bytes: Default::default(),
        })
    }

    /// The byte ranges of `block` (within it) whose granules differ from
    /// the base's: the whole block when the base has nothing to compare.
    fn differing(
        &mut self,
        file: &File,
        manifest: &Manifest,
        block: u64,
    ) -> Result<Vec<std::ops::Range<usize>>> {
        let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
        let comparable = self.manifest.block_size() == manifest.block_size()
            && offset < self.manifest.image_size()
            && self.manifest.block_len(block) == len
            && !self.manifest.is_zero(block);
        if !comparable {
            return Ok(std::iter::once(0..len as usize).collect());
        }
        let (ours, theirs) = &mut self.bytes;
        ours.resize(len as usize, 0);
        theirs.resize(len as usize, 0);
        self.file
            .read_exact_at(ours, offset)
            .map_err(|e| Error::io("reading the base revision", e))?;
        file.read_exact_at(theirs, offset)
            .map_err(|e| Error::io("reading the revision", e))?;
        Ok(differing_granules(ours, theirs))
    }
}

/// Smallest all-zero piece of a data block sent as a zero range: the
/// client writes nothing for it (a hole) and it costs no bandwidth.
const ZERO_GRANULE: u64 = backy_common::ranges::GRANULE;

/// The frames of a restore stream, through the shared framer (neighbouring
/// zero ranges merged, all-zero granules as zeros). Each method returns
/// whether the receiver is still there.
pub(crate) struct Frames<S>(Framer<Sender<S>>);

/// Restore frames out of the framer's ranges; `send` answers whether the
/// receiver took the frame.
pub(crate) struct Sender<S>(S);

impl<S: FnMut(Frame) -> bool> RangeSink for Sender<S> {
    fn data(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.send(Frame::Data(DataRange { offset, data }))
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        self.send(Frame::Zero(ZeroRange { offset, length }))
    }
}

impl<S: FnMut(Frame) -> bool> Sender<S> {
    fn send(&mut self, frame: Frame) -> Result<()> {
        if (self.0)(frame) {
            Ok(())
        } else {
            Err(Error::unavailable("the restore's receiver went away"))
        }
    }
}

impl<S: FnMut(Frame) -> bool> Frames<S> {
    pub(crate) fn new(send: S) -> Self {
        Frames(Framer::new(Sender(send)))
    }

    pub(crate) fn zero(&mut self, offset: u64, len: u64) -> bool {
        self.0.zero(offset, len).is_ok()
    }

    /// Data read at `offset`; its all-zero granules go as zero ranges.
    pub(crate) fn data(&mut self, offset: u64, data: Vec<u8>) -> bool {
        self.0.data_owned(offset, data, ZERO_GRANULE).is_ok()
    }

    pub(crate) fn end(self) -> bool {
        match self.0.finish() {
            Ok(mut done) => done
                .sink
                .send(Frame::End(RestoreEnd {
                    bytes_sent: done.data_bytes,
                }))
                .is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(chunks: &[(u64, Vec<u8>)], zeros: &[(u64, u64)]) -> Vec<(char, u64, u64)> {
        let mut got = Vec::new();
        let mut out = Frames::new(|f: Frame| {
            got.push(match f {
                Frame::Data(d) => ('D', d.offset, d.data.len() as u64),
                Frame::Zero(z) => ('Z', z.offset, z.length),
                Frame::End(e) => ('E', 0, e.bytes_sent),
                Frame::Begin(_) => ('B', 0, 0),
            });
            true
        });
        for (offset, len) in zeros {
            assert!(out.zero(*offset, *len));
        }
        for (offset, data) in chunks {
            assert!(out.data(*offset, data.clone()));
        }
        assert!(out.end());
        got
    }

    #[test]
    fn zero_granules_of_data_merge_with_zero_blocks() {
        let g = ZERO_GRANULE;
        // A zero block, then a block whose first two granules are zero and
        // whose third holds data, then zeros to its end.
        let mut data = vec![0u8; 4 * g as usize];
        data[2 * g as usize + 1] = 7;
        let got = frames_of(&[(8 * g, data)], &[(0, 8 * g)]);
        assert_eq!(
            got,
            [('Z', 0, 10 * g), ('D', 10 * g, g), ('Z', 11 * g, g), ('E', 0, g)]
        );
        // All data: one frame, the buffer as it is.
        let got = frames_of(&[(0, vec![1; 100])], &[]);
        assert_eq!(got, [('D', 0, 100), ('E', 0, 100)]);
    }

    #[test]
    fn a_receiver_gone_stops_the_stream() {
        let mut calls = 0;
        {
            let mut out = Frames::new(|_| {
                calls += 1;
                false
            });
            assert!(out.zero(0, 10));
            assert!(!out.data(10, vec![1; 10]), "the zero range could not be sent");
        }
        assert_eq!(calls, 1, "nothing sent after the refusal");
    }
}
