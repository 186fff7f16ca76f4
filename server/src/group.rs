//! Group commits (docs/DESIGN.md, "Groups"): the disks of a group push
//! arrive as separate pushes (`PushBegin.hold`), each checked and sealed as
//! any push, then held here unpublished, its job's push slot kept, until
//! the client's `CommitGroup` publishes all of them under one revision
//! time, or none.
//!
//! Crash safety: before the first disk is published, the commit is
//! recorded in `<base-dir>/.groups/<instant>.yaml` (every disk's final
//! `.rev`); start-up finishes a recorded commit before it cleans the jobs'
//! leftovers, so a crash between two disks' publications leaves every disk
//! committed. Without a record, start-up's cleanup removes the sealed
//! files: nothing of the instant was committed.

use crate::job::{PushGuard, Txn};
use crate::state::Server;
use crate::storage::{durable, JobDir, Sealed};
use backy_common::group_commit::{self, Timed};
use backy_common::revision::{GroupInstant, RevisionMeta};
use backy_common::schedule::ExpiryRun;
use backy_common::{fault, Error, Result, RevisionId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the held disks of an instant wait for the commit once no disk
/// of it is being pushed: a client that died between its last push and
/// the commit frees the jobs' push slots after this.
pub const HOLD_GRACE: Duration = Duration::from_secs(10 * 60);

/// The held disks of every group push under way, by instant id.
pub struct HeldGroups {
    instants: Mutex<HashMap<String, HeldInstant>>,
    /// [`HOLD_GRACE`], shorter in tests.
    grace: Duration,
}

impl Default for HeldGroups {
    fn default() -> Self {
        HeldGroups {
            instants: Mutex::default(),
            grace: HOLD_GRACE,
        }
    }
}

struct HeldInstant {
    group: GroupInstant,
    /// The client identity that pushes it: only it may commit or abort.
    identity: String,
    disks: BTreeMap<String, HeldDisk>,
    /// Disks of the instant being pushed now.
    pushing: usize,
    /// When the last push of a disk ended (or the instant began).
    idle_since: Instant,
}

/// One disk's sealed revision and its job's push slot: no other push of
/// the job starts, and its parent is kept, until the commit or the drop.
struct HeldDisk {
    sealed: Sealed,
    slot: PushGuard,
}

impl HeldGroups {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HeldInstant>> {
        self.instants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a push of one disk of `group` by `identity`; the instant
    /// is kept while any of its disks is being pushed.
    pub fn join(self: &Arc<Self>, group: &GroupInstant, identity: &str) -> Result<Joined> {
        self.sweep();
        let mut all = self.lock();
        let held = all.entry(group.instant.clone()).or_insert_with(|| HeldInstant {
            group: group.clone(),
            identity: identity.to_string(),
            disks: BTreeMap::new(),
            pushing: 0,
            idle_since: Instant::now(),
        });
        if held.identity != identity {
            return Err(Error::denied(format!(
                "group instant {} is pushed by another client identity",
                group.instant
            )));
        }
        if held.group != *group {
            return Err(Error::invalid(format!(
                "group instant {} was begun as group {} of {} disks, not {} of {}",
                group.instant, held.group.name, held.group.disks, group.name, group.disks
            )));
        }
        held.pushing += 1;
        Ok(Joined {
            groups: self.clone(),
            instant: group.instant.clone(),
        })
    }

    /// Removes the instant for its commit (`abort` false: none of its
    /// disks may still be being pushed) or its abort (a disk still being
    /// pushed then finds its instant gone and is dropped too), if
    /// `identity` pushed it.
    fn take(&self, req: &CommitRequest, identity: &str) -> Result<HeldInstant> {
        let (instant, abort) = (req.group.instant.as_str(), req.abort);
        self.sweep();
        let mut all = self.lock();
        let held = all.get(instant).ok_or_else(|| {
            Error::precondition(format!(
                "no disk of group instant {instant} is held (none arrived, the server \
                 restarted, or they waited longer than {} min for the commit); nothing \
                 was committed, run the group push again",
                HOLD_GRACE.as_secs() / 60
            ))
        })?;
        if held.identity != identity {
            return Err(Error::denied(format!(
                "group instant {instant} was pushed by another client identity"
            )));
        }
        if held.group != req.group {
            return Err(Error::invalid(format!(
                "group instant {instant} is group {} of {} disks, not {} of {}",
                held.group.name, held.group.disks, req.group.name, req.group.disks
            )));
        }
        if !abort {
            if held.pushing > 0 {
                return Err(Error::busy(format!(
                    "a disk of group instant {instant} is still being pushed"
                )));
            }
            // Checked before the instant is taken: a wrong request changes
            // nothing, and a right one may follow.
            let ids: BTreeMap<String, RevisionId> = held
                .disks
                .iter()
                .map(|(j, d)| (j.clone(), d.sealed.meta().id))
                .collect();
            group_commit::check_members(held.group.disks, &req.members, &ids)?;
        }
        all.remove(instant)
            .ok_or_else(|| Error::internal("a held instant vanished under its lock"))
    }

    /// Drops instants no disk has been pushed for since [`HOLD_GRACE`]:
    /// their sealed files go, their jobs' push slots are free again.
    pub fn sweep(&self) {
        let stale: Vec<HeldInstant> = {
            let mut all = self.lock();
            let ids: Vec<String> = all
                .iter()
                .filter(|(_, h)| h.pushing == 0 && h.idle_since.elapsed() >= self.grace)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| all.remove(id)).collect()
        };
        // Dropped outside the lock: it removes files.
        for held in stale {
            tracing::warn!(
                group = held.group.name,
                instant = held.group.instant,
                disks = held.disks.len(),
                "dropping the held disks of a group push that was never committed"
            );
        }
    }

    /// How many instants are kept (held disks or pushes running).
    pub fn instants(&self) -> usize {
        self.lock().len()
    }
}

/// One disk's push inside a group instant; see [`HeldGroups::join`].
pub struct Joined {
    groups: Arc<HeldGroups>,
    instant: String,
}

impl Joined {
    /// Holds the disk's sealed revision and its job's push slot for the
    /// group's commit.
    pub fn hold(&self, sealed: Sealed, slot: PushGuard) -> Result<()> {
        let mut all = self.groups.lock();
        let held = all.get_mut(&self.instant).ok_or_else(|| {
            Error::precondition(format!(
                "group instant {} was aborted while this disk was pushed; nothing was committed",
                self.instant
            ))
        })?;
        let job = sealed.job().name().to_string();
        if held.disks.len() >= held.group.disks as usize {
            return Err(Error::invalid(format!(
                "group instant {} has {} disks already",
                self.instant, held.group.disks
            )));
        }
        if held.disks.contains_key(&job) {
            return Err(Error::exists(format!(
                "job {job} has a disk of group instant {} already",
                self.instant
            )));
        }
        held.disks.insert(job, HeldDisk { sealed, slot });
        Ok(())
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut all = self.groups.lock();
        if let Some(held) = all.get_mut(&self.instant) {
            held.pushing = held.pushing.saturating_sub(1);
            held.idle_since = Instant::now();
            // Nothing held and nothing pushing (its pushes failed): not kept,
            // so failing pushes under made-up instants leave nothing behind.
            if held.pushing == 0 && held.disks.is_empty() {
                all.remove(&self.instant);
            }
        }
    }
}

/// What the client asks: commit (or abort) the instant with these disks.
pub struct CommitRequest {
    pub group: GroupInstant,
    pub members: Vec<(String, RevisionId)>,
    pub abort: bool,
}

/// Commits every held disk of the instant, or none; returns the
/// committed revisions in the request's order and what expiry removed.
pub fn commit(
    server: &Server,
    req: &CommitRequest,
    identity: &str,
) -> Result<(Vec<RevisionMeta>, Vec<RevisionId>)> {
    req.group.check()?;
    let held = server.groups.take(req, identity)?;
    if req.abort {
        tracing::info!(
            group = req.group.name,
            instant = req.group.instant,
            disks = held.disks.len(),
            "group push aborted by the client: nothing committed"
        );
        return Ok((Vec::new(), Vec::new()));
    }
    // Sorted by job name (the map's order): every group commit takes the
    // jobs' locks in one order.
    let (mut sealed, slots): (Vec<Sealed>, Vec<PushGuard>) =
        held.disks.into_values().map(|d| (d.sealed, d.slot)).unzip();
    let jobs: Vec<JobDir> = sealed.iter().map(|s| s.job().clone()).collect();
    let mut txns = jobs
        .iter()
        .map(|job| Txn::begin(&server.jobs, job))
        .collect::<Result<Vec<_>>>()?;
    let timed: Vec<Timed<'_>> = sealed
        .iter()
        .zip(&txns)
        .map(|(s, txn)| Timed {
            job: s.job().name().as_str(),
            timestamp: s.meta().timestamp,
            parent: s.meta().parent.and_then(|p| txn.get(&p)).map(|p| p.timestamp),
        })
        .collect();
    let time = group_commit::revision_time(&timed)?;
    let config = server.config();
    let mut locks = Vec::new();
    for ((s, txn), job) in sealed.iter_mut().zip(&txns).zip(&jobs) {
        s.date(time);
        let lock = config
            .job(job.name())
            .ok()
            .and_then(|j| config.retention_lock_of(j));
        s.lock_for(lock)?;
        txn.check_publishable(s.meta())
            .map_err(|e| e.context(format!("job {}", job.name())))?;
        locks.push(lock);
    }
    let record = Record {
        group: req.group.name.clone(),
        instant: req.group.instant.clone(),
        disks: sealed
            .iter()
            .map(|s| {
                Ok(RecordedDisk {
                    job: s.job().name().to_string(),
                    revision: s.meta().to_yaml()?,
                })
            })
            .collect::<Result<_>>()?,
    };
    let path = record_path(&config.base_dir, &req.group.instant)?;
    write_record(&path, &record)?;
    fault::point("group.recorded");
    // Every disk is published even if one fails (an I/O error this late):
    // the more of the instant is committed, the less is lost.
    let mut metas = Vec::new();
    let mut failed = Vec::new();
    for (((s, txn), lock), job) in sealed.into_iter().zip(txns.iter_mut()).zip(locks).zip(&jobs) {
        match txn.publish(s, lock) {
            Ok(meta) => metas.push(meta),
            Err(e) => failed.push(format!("job {}: {e}", job.name())),
        }
        fault::point("group.published");
    }
    remove_record(&path)?;
    if !failed.is_empty() {
        tracing::error!(
            group = req.group.name,
            instant = req.group.instant,
            "group commit: {} disks committed, failed: {}",
            metas.len(),
            failed.join("; ")
        );
        return Err(Error::internal(format!(
            "group instant {} is incomplete: {} of {} disks committed; {}",
            req.group.instant,
            metas.len(),
            jobs.len(),
            failed.join("; ")
        )));
    }
    tracing::info!(
        group = req.group.name,
        instant = req.group.instant,
        disks = metas.len(),
        "committed group instant"
    );
    // Published: the parents expire like any others from here on.
    for slot in &slots {
        slot.set_parent(None);
    }
    // One time for every member's expiry: revisions of one time and tags
    // go or stay together.
    let now = chrono::Utc::now();
    let mut expired = Vec::new();
    for ((txn, job), meta) in txns.iter_mut().zip(&jobs).zip(&metas) {
        let schedule = config.job(job.name()).ok().and_then(|j| config.schedule_of(j));
        if let Some(schedule) = schedule {
            let run = ExpiryRun::AfterCommit(meta.id);
            match crate::schedule::expire_at(txn, schedule, run, &server.metrics, now) {
                Ok(ids) => expired.extend(ids),
                Err(e) => {
                    tracing::error!(job = %job.name(), "after the group commit: {e}; expiry retries within a minute")
                }
            }
        }
        txn.point_latest("latest");
    }
    drop(txns);
    drop(slots);
    for job in &jobs {
        server.record_outcome(job.name(), &Ok(()));
    }
    let by_job: HashMap<&str, &RevisionMeta> = jobs.iter().map(|j| j.name().as_str()).zip(&metas).collect();
    let ordered = req
        .members
        .iter()
        .filter_map(|(job, _)| by_job.get(job.as_str()).map(|m| (*m).clone()))
        .collect();
    Ok((ordered, expired))
}

/// A group commit as recorded before its first disk is published.
#[derive(Serialize, Deserialize)]
struct Record {
    group: String,
    instant: String,
    disks: Vec<RecordedDisk>,
}

#[derive(Serialize, Deserialize)]
struct RecordedDisk {
    job: String,
    /// The disk's `.rev` as it is to be written.
    revision: String,
}

const RECORD_DIR: &str = ".groups";

fn record_path(base: &Path, instant: &str) -> Result<PathBuf> {
    // An id's short form: no path separators, checked with the group.
    RevisionId::from_short(instant)?;
    Ok(base.join(RECORD_DIR).join(format!("{instant}.yaml")))
}

fn write_record(path: &Path, record: &Record) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal("a group record without a directory"))?;
    durable::create_dir(dir)?;
    let text = serde_yaml::to_string(record)
        .map_err(|e| Error::internal(format!("writing the group commit record: {e}")))?;
    durable::write_atomic(path, text.as_bytes())
}

fn remove_record(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
    if let Some(dir) = path.parent() {
        durable::fsync_dir(dir)?;
    }
    Ok(())
}

/// Finishes the group commits a crash interrupted (start-up, before any
/// job's leftovers are cleaned): every disk of a recorded commit is
/// installed from its sealed files. Returns how many disks it committed.
pub fn recover(server: &Server) -> Result<usize> {
    let config = server.config();
    let dir = config.base_dir.join(RECORD_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut installed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(".tmp.") {
            // A record never completed: its commit had not begun.
            std::fs::remove_file(&path).map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
            continue;
        }
        if !name.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let record: Record = serde_yaml::from_str(&text)
            .map_err(|e| Error::data_loss(format!("{}: not a group commit record: {e}", path.display())))?;
        for disk in &record.disks {
            // A disk that cannot be finished (its job gone from the config,
            // its files lost) is logged; it never keeps the server down.
            let finished = RevisionMeta::from_yaml_full(&disk.revision, &disk.job).and_then(|meta| {
                let job = server.job(&disk.job)?;
                let mut txn = Txn::begin(&server.jobs, &job)?;
                Ok((txn.install_recorded(&meta)?, meta.id))
            });
            match finished {
                Ok((true, id)) => {
                    installed += 1;
                    tracing::warn!(
                        group = record.group, instant = record.instant, job = disk.job, rev = %id,
                        "finished a group commit interrupted by a crash"
                    );
                }
                Ok((false, _)) => {}
                Err(e) => {
                    tracing::error!(
                    group = record.group, instant = record.instant, job = disk.job,
                    "could not finish a group commit interrupted by a crash: {e}; the instant is incomplete"
                )
                }
            }
        }
        remove_record(&path)?;
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instant(disks: u32) -> GroupInstant {
        GroupInstant {
            name: "vm6".into(),
            instant: RevisionId::new_random().short(),
            disks,
        }
    }

    /// An instant is one identity's and one shape's; one whose pushes all
    /// ended with nothing held is not kept (failing pushes under made-up
    /// instants cannot grow the table).
    /// A disk of `job` received and sealed, as a push seals it.
    fn sealed(job: &JobDir, id: RevisionId) -> Sealed {
        use crate::storage::{NewRevision, NewRevisionSpec, PushEnd};
        use backy_common::checksum::StreamChecksum;
        use backy_common::manifest::{digest, Manifest};
        use backy_common::revision::StorageMode;
        let size = 1 << 20;
        let spec = NewRevisionSpec {
            id,
            size,
            block_size: backy_common::DEFAULT_BLOCK_SIZE,
            tags: ["manual:a".to_string()].into(),
            source: Default::default(),
            key_check: None,
        };
        let gate = crate::work::Gate::new(
            Arc::new(crate::work::WorkPool::new(1)),
            "test",
            Arc::new(|| false),
        );
        let mut rev = NewRevision::create(job, spec, None, StorageMode::Copy, None, gate).expect("created");
        let data = vec![7u8; size as usize];
        rev.data(0, &data).expect("written");
        let mut sum = StreamChecksum::new();
        sum.data(0, &data);
        let mut manifest = Manifest::zeroed(size, backy_common::DEFAULT_BLOCK_SIZE).expect("manifest");
        manifest.set(0, digest(&data)).expect("digest");
        let end = PushEnd {
            stream_checksum: sum.finish().to_vec(),
            manifest_digest: manifest.file_digest().to_vec(),
            audit: None,
        };
        rev.commit(&end).expect("sealed")
    }

    /// A client that never commits: its held disk stays (the job's push
    /// slot with it) until the grace has passed; the sweep then removes
    /// the sealed files and frees the job.
    #[test]
    fn the_held_disks_of_an_abandoned_instant_are_dropped_and_free_their_job() {
        let dir = tempfile::tempdir().expect("dir");
        let server = crate::state::test_server(dir.path(), "  vm1: {schedule: none}\n");
        let job = server.job("vm1").expect("job");
        job.ensure().expect("job dir");
        let activity = &server.jobs.activity;
        for grace in [Duration::from_secs(3600), Duration::ZERO] {
            let groups = Arc::new(HeldGroups {
                grace,
                ..HeldGroups::default()
            });
            let joined = groups.join(&instant(2), "hv01").expect("joined");
            let id = RevisionId::new_random();
            let slot = activity.try_start_push(job.name(), id).expect("slot");
            joined.hold(sealed(&job, id), slot).expect("held");
            drop(joined);
            assert!(job.sealed_digests_path(&id).exists());
            groups.sweep();
            if grace.is_zero() {
                assert_eq!(groups.instants(), 0);
                assert!(!job.partial_image_path(&id).exists(), "the sealed image went");
                assert!(!job.sealed_digests_path(&id).exists(), "the sealed manifest went");
                assert!(activity
                    .try_start_push(job.name(), RevisionId::new_random())
                    .is_ok());
            } else {
                assert_eq!(groups.instants(), 1, "held for its commit within the grace");
                let e = activity
                    .try_start_push(job.name(), RevisionId::new_random())
                    .err();
                assert!(e.is_some(), "the job's push slot stays held");
                drop(groups);
            }
        }
        assert!(
            job.revisions().expect("revisions").is_empty(),
            "nothing committed"
        );
    }

    #[test]
    fn instants_belong_to_their_pusher_and_vanish_when_empty() {
        let groups = Arc::new(HeldGroups::default());
        let g = instant(2);
        let first = groups.join(&g, "hv01").expect("joined");
        let second = groups.join(&g, "hv01").expect("a second disk");
        let e = groups.join(&g, "hv02").err().expect("another identity");
        assert_eq!(e.kind, backy_common::ErrorKind::PermissionDenied, "{}", e.message);
        let other_shape = GroupInstant {
            disks: 3,
            ..g.clone()
        };
        let e = groups
            .join(&other_shape, "hv01")
            .err()
            .expect("another disk count");
        assert_eq!(e.kind, backy_common::ErrorKind::InvalidArgument, "{}", e.message);
        assert_eq!(groups.instants(), 1);
        drop(first);
        assert_eq!(groups.instants(), 1, "a disk is still being pushed");
        drop(second);
        assert_eq!(groups.instants(), 0, "nothing held, nothing pushing: gone");
        for _ in 0..100 {
            drop(groups.join(&instant(1), "hv01").expect("joined"));
        }
        assert_eq!(groups.instants(), 0);
    }
}
