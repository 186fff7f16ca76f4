//! Ranged reads of a stored revision for the client's NBD export: some
//! granules of one block and, when asked, the chaining values of all the
//! block's granules (`backy_common::block_proof`), with which the client
//! checks the granules against the manifest's digest of the whole block.
//! Nothing here trusts the bytes it reads: the client does the checking.
//! From a filesystem store's image file or a pool store's snapshot.

use crate::pool_serve::PoolBackend;
use crate::state::Server;
use backy_common::block_proof::{granule_count, granule_cv, has_granule_tree};
use backy_common::manifest::block_count;
use backy_common::ranges::GRANULE;
use backy_common::revision::RevisionMeta;
use backy_common::{Error, Result, RevisionId, MAX_FRAME_DATA};
use backy_proto::{ReadGranulesReply, ReadGranulesRequest};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Granules per call: the reply's data fits one message.
pub const MAX_GRANULES: u32 = (MAX_FRAME_DATA as u64 / GRANULE) as u32;

/// Answers one request on a filesystem store (on a blocking thread).
pub fn read(server: &Server, req: &ReadGranulesRequest) -> Result<ReadGranulesReply> {
    let job = server.job(&req.job)?;
    let id: RevisionId = req.revision.parse().map_err(|e: Error| e.context("revision"))?;
    let meta = server
        .jobs
        .indexed(&job)?
        .revisions
        .iter()
        .find(|r| r.id == id)
        .cloned()
        .ok_or_else(|| Error::not_found(format!("job {}: revision {id} does not exist", job.name())))?;
    check(&meta, req)?;
    let _reading = server.jobs.activity.start_read(job.name(), meta.id);
    let path = job.image_path(&meta.id);
    let file = File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let reply = answer(&meta, req, |buf, at| {
        file.read_exact_at(buf, at)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))
    })?;
    server.metrics.sent(reply.data.len());
    Ok(reply)
}

/// Answers one request on a Ceph pool store: read from the revision's
/// snapshot through librbd.
pub fn read_pool(
    server: &Server,
    pool: &PoolBackend,
    req: &ReadGranulesRequest,
) -> Result<ReadGranulesReply> {
    let job = server.job(&req.job)?;
    let id: RevisionId = req.revision.parse().map_err(|e: Error| e.context("revision"))?;
    let meta = pool
        .revisions(job.name())?
        .into_iter()
        .find(|r| r.id == id)
        .ok_or_else(|| Error::not_found(format!("job {}: revision {id} does not exist", job.name())))?;
    check(&meta, req)?;
    let reader = pool.store.open_revision(job.name(), &meta.id)?;
    let reply = answer(&meta, req, |buf, at| Ok(reader.read_exact_at(at, buf)?))?;
    server.metrics.sent(reply.data.len());
    Ok(reply)
}

/// The request's block and granules exist in `meta`.
fn check(meta: &RevisionMeta, req: &ReadGranulesRequest) -> Result<()> {
    if req.block >= block_count(meta.size, meta.block_size) {
        return Err(Error::invalid(format!(
            "block {} is beyond the revision's {} bytes",
            req.block, meta.size
        )));
    }
    let block_len = block_len(meta, req.block);
    let count = granule_count(block_len) as u64;
    let (first, n) = (u64::from(req.first_granule), u64::from(req.granules));
    if n == 0 || n > u64::from(MAX_GRANULES) || first + n > count {
        return Err(Error::invalid(format!(
            "granules {first}..{} of a block of {count} (at most {MAX_GRANULES} per call)",
            first + n
        )));
    }
    if req.chaining_values && !has_granule_tree(block_len) {
        return Err(Error::invalid("a block of one granule has no chaining values"));
    }
    Ok(())
}

fn block_len(meta: &RevisionMeta, block: u64) -> u64 {
    let bs = u64::from(meta.block_size);
    bs.min(meta.size - block * bs)
}

/// The reply to a checked request, read with `read_at(buf, offset)`.
fn answer(
    meta: &RevisionMeta,
    req: &ReadGranulesRequest,
    read_at: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<ReadGranulesReply> {
    let offset = req.block * u64::from(meta.block_size);
    let block_len = block_len(meta, req.block);
    let count = granule_count(block_len) as u64;
    let (first, n) = (u64::from(req.first_granule), u64::from(req.granules));
    let start = first * GRANULE;
    let end = ((first + n) * GRANULE).min(block_len);
    let mut data = vec![0u8; (end - start) as usize];
    read_at(&mut data, offset + start)?;
    let mut cvs = Vec::new();
    if req.chaining_values {
        // Granule by granule: memory stays at one granule whatever the
        // block size; the granules just read are not read twice.
        cvs.reserve(count as usize * backy_common::block_proof::CV_LEN);
        let mut buf = vec![0u8; GRANULE as usize];
        for g in 0..count {
            let at = g * GRANULE;
            let len = GRANULE.min(block_len - at) as usize;
            let cv = if (start..end).contains(&at) {
                let rel = (at - start) as usize;
                granule_cv(g as usize, &data[rel..rel + len])
            } else {
                read_at(&mut buf[..len], offset + at)?;
                granule_cv(g as usize, &buf[..len])
            };
            cvs.extend_from_slice(&cv);
        }
    }
    Ok(ReadGranulesReply {
        data,
        chaining_values: cvs,
    })
}
