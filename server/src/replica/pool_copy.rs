//! One transfer into a Ceph pool store (docs/DESIGN.md "A pool as a
//! replica"): the source's revision, relative to a base both hold when the
//! base is the image's newest snapshot and the head is clean, else whole,
//! written as a pool push under the job's lease and committed only if its
//! manifest is the source's.

use super::copy::{check_listing, receive, Copied, Received};
use crate::pool::PoolPush;
use crate::pool_serve::{lock, PoolBackend};
use crate::state::Server;
use crate::storage::NewRevisionSpec;
use backy_common::replicate::Transfer;
use backy_common::revision::RevisionMeta;
use backy_common::{Error, JobName, Result};
use backy_proto::connect::Client;
use backy_proto::{RestoreRequest, RevisionInfo};
use std::sync::Arc;

/// Copies `info` (the source's listing of `transfer.id`) into `job` of the
/// pool. Runs on a blocking thread; the stream is read through `handle`.
pub fn copy(
    server: &Arc<Server>,
    pool: &PoolBackend,
    client: Client,
    handle: &tokio::runtime::Handle,
    job: &JobName,
    transfer: Transfer,
    info: &RevisionInfo,
) -> Result<Copied> {
    let config = server.config();
    let target = RevisionMeta::try_from(info)?;
    check_listing(&config, job, &target)?;
    if let Some(audit) = &target.stats.audit {
        audit.check()?;
    }
    if transfer.replace {
        return Err(crate::pool_serve::unsupported("replacing a distrusted copy"));
    }
    let expected = hex::decode(&info.manifest_digest)
        .map_err(|_| Error::invalid(format!("revision {}: bad manifest digest", target.id)))?;
    let _running = server.jobs.activity.try_start_push(job, target.id)?;
    let keeper = pool.prepare_write(job)?;
    let held = pool.revisions(job)?;
    if held.iter().any(|r| r.id == target.id) {
        return Err(Error::exists(format!("revision {} is here already", target.id)));
    }
    // Relative to the base only where a push could be: the base is the
    // image's newest revision and the head holds nothing beyond it.
    let base = match transfer.base {
        None => None,
        Some(id) => {
            let meta = held.iter().find(|r| r.id == id).cloned().ok_or_else(|| {
                Error::precondition(format!(
                    "base revision {id} is no longer here; the next round plans again"
                ))
            })?;
            let newest = held.last().map(|r| r.id);
            (newest == Some(id) && !pool.head_dirty(job, &meta)?).then_some(meta)
        }
    };
    let parent = match &base {
        Some(meta) => Some((meta, pool.store.manifest(job, meta)?)),
        None => None,
    };
    let spec = NewRevisionSpec::copy_of(&target);
    let mut rev = PoolPush::begin(&pool.store, &lock(&keeper), job, spec, parent)?;
    let request = RestoreRequest {
        job: job.to_string(),
        revision: target.id.to_string(),
        base: base.as_ref().map(|b| b.id.to_string()).unwrap_or_default(),
        from: 0,
        granules: Vec::new(),
    };
    let mut received = 0u64;
    // A failure drops the push: no snapshot, no record (the pool keeps
    // no partial copy to resume; the next round copies it again).
    receive(server, &client, handle, request, info, |frame| match frame {
        Received::Data(offset, data) => {
            received += data.len() as u64;
            Ok(rev.data(offset, &data)?)
        }
        Received::Zero(offset, len) => Ok(rev.zero(offset, len)?),
    })?;
    let sealed = rev.seal_copy(&expected, target.timestamp, target.stats.audit.clone())?;
    let meta = sealed.publish(&mut lock(&keeper))?;
    server.metrics.received(received as usize);
    Ok(Copied {
        meta,
        received,
        resumed_at: 0,
    })
}
