//! [`PoolStore`]: the jobs, records and manifests of a Ceph pool store, and
//! reads of its revisions (docs/DESIGN.md "Ceph pool store", "Pool layout").
//! Every call blocks on the cluster: async callers use `spawn_blocking`.

use super::error::{PoolError, Result};
use super::names::{self, DELETING_KEY, JOBS_OBJECT, RECORD_PREFIX};
use super::parts;
use super::tool::RbdTool;
use crate::ceph::{Cluster, ClusterConfig, DiffExtent, Image, IoCtx, LeaseKeeper, WriteOp};
use backy_common::lease::LeaseTimes;
use backy_common::manifest::Manifest;
use backy_common::revision::RevisionMeta;
use backy_common::{JobName, RevisionId};
use chrono::{DateTime, Utc};
use std::path::PathBuf;
use std::time::Duration;

/// Omap entries read per call.
const OMAP_PAGE: u64 = 512;

/// Where the store lives and as whom it reaches it.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// A ceph.conf naming the monitors.
    pub conf: PathBuf,
    /// The cephx id, without `client.`.
    pub id: String,
    /// A keyring file; `None`: the one ceph.conf names.
    pub keyring: Option<PathBuf>,
    pub pool: String,
    /// A RADOS namespace in the pool (one store per namespace).
    pub namespace: Option<String>,
    /// Bounds every call (librados and the `rbd` tool).
    pub op_timeout: Option<Duration>,
}

/// One connection to a pool store.
#[derive(Debug, Clone)]
pub struct PoolStore {
    config: PoolConfig,
    cluster: Cluster,
    io: IoCtx,
    space: super::space::SpaceCache,
}

impl PoolStore {
    /// Connects as the configured identity and opens the pool (namespace).
    pub fn open(config: PoolConfig) -> Result<PoolStore> {
        let cluster = Cluster::connect(&ClusterConfig {
            conf: &config.conf,
            id: &config.id,
            keyring: config.keyring.as_deref(),
            op_timeout: config.op_timeout,
        })?;
        let io = cluster.ioctx(&config.pool, config.namespace.as_deref())?;
        Ok(PoolStore {
            config,
            cluster,
            io,
            space: Default::default(),
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub(super) fn space_cache(&self) -> &super::space::SpaceCache {
        &self.space
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn io(&self) -> &IoCtx {
        &self.io
    }

    /// `rbd` as the store's identity.
    pub fn rbd_tool(&self) -> RbdTool {
        RbdTool {
            conf: self.config.conf.clone(),
            id: self.config.id.clone(),
            keyring: self.config.keyring.clone(),
            op_timeout: self.config.op_timeout,
        }
    }

    /// `POOL[/NAMESPACE]/IMAGE` of a job's image, as `rbd` names it.
    pub fn image_spec(&self, job: &JobName) -> String {
        match &self.config.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.config.pool, names::image_name(job)),
            None => format!("{}/{}", self.config.pool, names::image_name(job)),
        }
    }

    /// The lease of `job` for server `server` (its name in the lock record).
    pub fn keeper(&self, job: &JobName, server: &str, times: LeaseTimes) -> LeaseKeeper {
        LeaseKeeper::new(self.io.clone(), &names::job_object(job), server, times)
    }

    /// Every job in the pool with when it was first known, by name.
    pub fn jobs(&self) -> Result<Vec<(JobName, Option<DateTime<Utc>>)>> {
        let entries = match self.io.omap_values(JOBS_OBJECT, "", OMAP_PAGE) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut jobs = Vec::new();
        for (key, value) in entries {
            let Ok(job) = JobName::new(&key) else {
                tracing::error!("{JOBS_OBJECT}: {key:?} is not a job name, ignoring it");
                continue;
            };
            let since = std::str::from_utf8(&value)
                .ok()
                .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
                .map(|t| t.with_timezone(&Utc));
            jobs.push((job, since));
        }
        Ok(jobs)
    }

    /// Lists `job` in the pool (from now, unless it is listed already) and
    /// makes its object. Returns when it was first known.
    pub fn add_job(&self, job: &JobName) -> Result<DateTime<Utc>> {
        self.io
            .operate(&names::job_object(job), &WriteOp::new().create(false))?;
        let known = match self.io.omap_get(JOBS_OBJECT, &[job.as_str()]) {
            Ok(k) => k,
            Err(e) if e.is_not_found() => Default::default(),
            Err(e) => return Err(e.into()),
        };
        if let Some(v) = known.get(job.as_str()) {
            if let Some(t) = std::str::from_utf8(v)
                .ok()
                .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
            {
                return Ok(t.with_timezone(&Utc));
            }
        }
        let now = Utc::now();
        let text = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.io.operate(
            JOBS_OBJECT,
            &WriteOp::new()
                .create(false)
                .omap_set(&[(job.as_str(), text.as_bytes())]),
        )?;
        Ok(DateTime::parse_from_rfc3339(&text).map_or(now, |t| t.with_timezone(&Utc)))
    }

    /// The revisions being deleted (the `deleting` entry).
    pub fn deleting(&self, job: &JobName) -> Result<Vec<RevisionId>> {
        let oid = names::job_object(job);
        match self.io.omap_get(&oid, &[DELETING_KEY]) {
            Ok(m) => match m.get(DELETING_KEY) {
                Some(v) => Ok(names::decode_deleting(v, &oid)?),
                None => Ok(Vec::new()),
            },
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every record of the job, being deleted or not, by id.
    pub(crate) fn all_records(&self, job: &JobName) -> Result<Vec<RevisionMeta>> {
        let oid = names::job_object(job);
        let entries = match self.io.omap_values(&oid, RECORD_PREFIX, OMAP_PAGE) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut revs = Vec::new();
        for (key, value) in entries {
            let Some(id) = names::record_id(&key) else {
                tracing::error!(job = %job, "{oid}: omap key {key:?} names no revision, ignoring it");
                continue;
            };
            let what = format!("{oid} {key}");
            let parsed = std::str::from_utf8(&value)
                .map_err(|_| backy_common::Error::data_loss(format!("{what}: not UTF-8")))
                .and_then(|t| RevisionMeta::from_yaml(t, &what));
            match parsed {
                Ok(meta) if meta.id == id => revs.push(meta),
                Ok(meta) => tracing::error!(job = %job, "{what} names id {}, ignoring it", meta.id),
                Err(e) => tracing::error!(job = %job, "{e}"),
            }
        }
        Ok(revs)
    }

    /// Committed revisions, oldest first (as `JobDir::revisions`): those of
    /// an unfinished deletion are not listed; a record that cannot be read
    /// is logged and left out.
    pub fn revisions(&self, job: &JobName) -> Result<Vec<RevisionMeta>> {
        let deleting = self.deleting(job)?;
        let mut revs: Vec<RevisionMeta> = self
            .all_records(job)?
            .into_iter()
            .filter(|m| !deleting.contains(&m.id))
            .collect();
        revs.sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.id.cmp(&b.id)));
        Ok(revs)
    }

    /// One committed revision's record.
    pub fn meta(&self, job: &JobName, id: &RevisionId) -> Result<RevisionMeta> {
        self.revisions(job)?
            .into_iter()
            .find(|m| m.id == *id)
            .ok_or_else(|| PoolError::NoRevision {
                job: job.clone(),
                id: *id,
            })
    }

    /// A revision's manifest, checked against its record.
    pub fn manifest(&self, job: &JobName, meta: &RevisionMeta) -> Result<Manifest> {
        parts::read_manifest(&self.io, job, meta)
    }

    /// Rewrites the records of committed revisions (tags, trust), all in
    /// one write op under the lease.
    pub fn write_records(
        &self,
        keeper: &mut LeaseKeeper,
        job: &JobName,
        metas: &[RevisionMeta],
    ) -> Result<()> {
        let have = self.revisions(job)?;
        let mut entries = Vec::new();
        for m in metas {
            if !have.iter().any(|h| h.id == m.id) {
                return Err(PoolError::NoRevision {
                    job: job.clone(),
                    id: m.id,
                });
            }
            entries.push((names::record_key(&m.id), m.to_yaml()?));
        }
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
        keeper.commit_if_holder(WriteOp::new().omap_set(&refs))?;
        Ok(())
    }

    /// Opens revision `id` of `job` for reading (librbd, read-only at its
    /// snapshot): what restore and verify read.
    pub fn open_revision(&self, job: &JobName, id: &RevisionId) -> Result<RevisionReader> {
        let image = Image::open_read_only(&self.io, names::image_name(job), Some(&names::snapshot_name(id)))
            .map_err(|e| {
                if e.is_not_found() {
                    PoolError::NoRevision {
                        job: job.clone(),
                        id: *id,
                    }
                } else {
                    e.into()
                }
            })?;
        Ok(RevisionReader {
            image,
            what: format!("job {job}: snapshot {id}"),
        })
    }

    /// Reads revision `id` of `job` from `offset` into `buf`; returns the
    /// bytes read (fewer only where the image ends).
    pub fn read(&self, job: &JobName, id: &RevisionId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.open_revision(job, id)?.read_at(offset, buf)
    }

    /// Push step 2 (docs/DESIGN.md "A push writes a revision"): what the
    /// job's image head holds beyond snapshot `parent`, written by a push
    /// that died. The next push must send these ranges too (from its
    /// source) or its snapshot fails the check for foreign writes.
    pub fn head_changes(&self, job: &JobName, parent: &RevisionId) -> Result<Vec<DiffExtent>> {
        let image = match Image::open_read_only(&self.io, names::image_name(job), None) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let size = image.size()?;
        Ok(image.diff_iterate(Some(&names::snapshot_name(parent)), 0, size, false)?)
    }
}

/// One revision opened for reading.
pub struct RevisionReader {
    image: Image,
    /// Names the snapshot in errors.
    what: String,
}

impl RevisionReader {
    pub fn size(&self) -> Result<u64> {
        Ok(self.image.size()?)
    }

    /// Reads from `offset` into `buf`; fewer bytes only at the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        Ok(self.image.read_into(offset, buf)?)
    }

    /// Fills `buf` from `offset`: a snapshot that ends before is DataLoss
    /// (its record said it is longer).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let got = self.read_at(offset, buf)?;
        if got == buf.len() {
            return Ok(());
        }
        Err(PoolError::DataLoss {
            what: self.what.clone(),
            detail: format!(
                "ends at {} within the {} bytes asked from {offset}",
                offset + got as u64,
                buf.len()
            ),
        })
    }

    /// The ranges of the snapshot that hold data, ascending: what is
    /// outside them reads zeros without reading (verify skips them, as
    /// `SEEK_DATA` lets the filesystem store skip holes).
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.image.size()?;
        let mut ranges: Vec<(u64, u64)> = self
            .image
            .diff_iterate(None, 0, size, false)?
            .into_iter()
            .filter(|e| e.exists)
            .map(|e| (e.offset, e.len))
            .collect();
        ranges.sort_unstable();
        Ok(ranges)
    }
}
