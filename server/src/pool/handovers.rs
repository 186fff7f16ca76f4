//! The operator's requests to hand a job to another server
//! (docs/DESIGN.md "Handing a job over"): one omap entry per job in one
//! object, `backy.handovers`, so a server reads every request with one call
//! per lease round however many leases it holds. The decisions are
//! `backy_common::handover`'s; this is the I/O.

use super::error::Result;
use super::names::{self, HANDOVERS_OBJECT};
use super::store::PoolStore;
use crate::ceph::{Locker, WriteOp, LEASE_LOCK};
use backy_common::handover::Request;
use backy_common::JobName;
use std::collections::BTreeMap;

/// Omap entries read per call.
const PAGE: u64 = 512;

/// A request as stored: decoded, and its raw value (to remove exactly it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub request: Request,
    pub raw: Vec<u8>,
}

impl PoolStore {
    /// Every standing or lapsed request, by job. One that cannot be read is
    /// logged and left out (no server acts on it).
    pub fn handovers(&self) -> Result<BTreeMap<JobName, Stored>> {
        let entries = match self.io().omap_values(HANDOVERS_OBJECT, "", PAGE) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(entries
            .into_iter()
            .filter_map(|(key, raw)| decode(&key, raw))
            .collect())
    }

    /// The request of `job`, if any.
    pub fn handover(&self, job: &JobName) -> Result<Option<Stored>> {
        let entries = match self.io().omap_get(HANDOVERS_OBJECT, &[job.as_str()]) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(entries
            .into_iter()
            .find(|(k, _)| k == job.as_str())
            .and_then(|(k, raw)| decode(&k, raw))
            .map(|(_, s)| s))
    }

    /// Records `requests` (replacing any of the same jobs), in one op.
    pub fn request_handovers(&self, requests: &[(JobName, Request)]) -> Result<()> {
        let encoded: Vec<(&str, String)> = requests.iter().map(|(j, r)| (j.as_str(), r.encode())).collect();
        let entries: Vec<(&str, &[u8])> = encoded.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.io()
            .operate(HANDOVERS_OBJECT, &WriteOp::new().create(false).omap_set(&entries))?;
        Ok(())
    }

    /// Removes `job`'s request if it is still exactly `stored` (a request
    /// recorded since stays). Returns whether it was removed.
    pub fn withdraw_handover(&self, job: &JobName, stored: &Stored) -> Result<bool> {
        let op = WriteOp::new()
            .omap_cmp_eq(job.as_str(), &stored.raw)
            .omap_rm_keys(&[job.as_str()]);
        match self.io().operate(HANDOVERS_OBJECT, &op) {
            Ok(()) => Ok(true),
            Err(e) if e.is_compare_failed() || e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Who holds `job`'s lease now, as its lock record says (the OSD lists
    /// no expired locker).
    pub fn lease_holder(&self, job: &JobName) -> Result<Option<Locker>> {
        match self.io().list_lockers(&names::job_object(job), LEASE_LOCK) {
            Ok(info) => Ok(info.lockers.into_iter().next()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn decode(key: &str, raw: Vec<u8>) -> Option<(JobName, Stored)> {
    let Ok(job) = JobName::new(key) else {
        tracing::error!("{HANDOVERS_OBJECT}: {key:?} is not a job name, ignoring it");
        return None;
    };
    match Request::decode(key, &raw) {
        Ok(request) => Some((job, Stored { request, raw })),
        Err(e) => {
            tracing::error!("{HANDOVERS_OBJECT}: {e}; ignoring it");
            None
        }
    }
}
