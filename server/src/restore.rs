//! Reading revisions back out: spec resolution, manifest and image streams.

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::revision::RevisionMeta;
use backy_common::spec::Spec;
use backy_common::{Error, Result, MAX_FRAME_DATA};
use backy_proto::restore_frame::Frame;
use backy_proto::{DataRange, RestoreEnd, RestoreFrame, RevisionInfo, ZeroRange};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The one revision `spec` names.
pub fn resolve(job: &JobDir, spec: &str) -> Result<RevisionMeta> {
    let spec = Spec::parse(if spec.is_empty() { "latest" } else { spec })?;
    let mut revs = job.revisions()?;
    let i = spec
        .resolve_one(&revs)
        .map_err(|e| e.context(format!("job {}", job.name())))?;
    Ok(revs.swap_remove(i))
}

/// Streams the image of `meta`: zero blocks (per the manifest) as zero
/// ranges, others as data frames of at most [`MAX_FRAME_DATA`]. Runs on a
/// blocking thread; stops early when the receiver goes away.
pub fn stream_image(
    server: Arc<Server>,
    job: JobDir,
    meta: RevisionMeta,
    tx: mpsc::Sender<std::result::Result<RestoreFrame, tonic::Status>>,
) {
    let _reading = server.start_read(job.name(), meta.id);
    let send = |frame: Frame| tx.blocking_send(Ok(RestoreFrame { frame: Some(frame) })).is_ok();
    let result = (|| -> Result<bool> {
        let manifest = job.manifest(&meta)?;
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
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        let mut sent = 0u64;
        let mut zero_run: Option<(u64, u64)> = None;
        for block in 0..manifest.block_count() {
            let offset = manifest.block_offset(block);
            let len = manifest.block_len(block);
            if manifest.is_zero(block) {
                zero_run = Some(match zero_run {
                    Some((start, l)) => (start, l + len),
                    None => (offset, len),
                });
                continue;
            }
            if let Some((start, l)) = zero_run.take() {
                if !send(Frame::Zero(ZeroRange {
                    offset: start,
                    length: l,
                })) {
                    return Ok(false);
                }
            }
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(MAX_FRAME_DATA as u64) as usize;
                // A buffer per frame: it moves into the message uncopied.
                let mut data = vec![0u8; n];
                file.read_exact_at(&mut data, pos)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                if !send(Frame::Data(DataRange { offset: pos, data })) {
                    return Ok(false);
                }
                sent += n as u64;
                pos += n as u64;
            }
        }
        if let Some((start, l)) = zero_run {
            if !send(Frame::Zero(ZeroRange {
                offset: start,
                length: l,
            })) {
                return Ok(false);
            }
        }
        Ok(send(Frame::End(RestoreEnd { bytes_sent: sent })))
    })();
    if let Err(e) = result {
        tracing::error!(job = %job.name(), rev = %meta.id, "restore failed: {e}");
        let _ = tx.blocking_send(Err(crate::wire::to_status(e)));
    }
}
