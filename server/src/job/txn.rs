//! The one way to change a job: a transaction ([`Txn`]) that only the
//! job's lock gives, and that reads the job's revisions from disk when it
//! begins. Commits, tag and trust changes, forget, expiry, the replica's
//! copies and mirrored deletions, and leftover cleanup all go through one.
//!
//! Locking: the job's lock (`<job>/.lock`, flock) is held only for the
//! length of a transaction (renames, `.rev` writes, deletions: short); a
//! push or a copy holds the job's push slot (see
//! [`super::Activity::try_start_push`]) while data streams in and
//! takes a transaction only to begin and to commit. The in-memory index is
//! a read cache, invalidated when a transaction ends; nothing is decided
//! from it.

use super::Jobs;
use crate::storage::jobdir::RecordVersion;
use crate::storage::lock::JobLock;
use crate::storage::{durable, JobDir, Sealed};
use backy_common::revision::{RevisionMeta, Trust};
use backy_common::spec::Spec;
use backy_common::units::Interval;
use backy_common::{fault, Error, JobName, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// A change to one job, under its lock; the index entry of the job is
/// dropped when it ends, whatever happened.
pub struct Txn<'a> {
    jobs: &'a Jobs,
    job: &'a JobDir,
    lock: JobLock,
    revisions: Vec<RevisionMeta>,
    /// Whether this transaction changed (or began to change) a revision.
    changed: bool,
    /// Set by [`Txn::keep_index`]: the index holds what was read.
    indexed: bool,
}

impl<'a> Txn<'a> {
    /// Takes the job's lock, waiting a little for another transaction to
    /// end, and reads the job from disk (completing an interrupted forget
    /// if it can: a file that cannot be removed yet is logged, its revision
    /// stays unlisted and journaled, and the change goes on).
    pub fn begin(jobs: &'a Jobs, job: &'a JobDir) -> Result<Self> {
        let lock = job.lock()?;
        Self::read(jobs, job, lock)
    }

    /// Like [`Txn::begin`], but fails with `Busy` at once when the lock is
    /// held (background work comes back later).
    pub fn try_begin(jobs: &'a Jobs, job: &'a JobDir) -> Result<Self> {
        let lock = job.try_lock()?;
        Self::read(jobs, job, lock)
    }

    fn read(jobs: &'a Jobs, job: &'a JobDir, lock: JobLock) -> Result<Self> {
        if let Err(e) = job.finish_deletions(&lock) {
            jobs.activity.mark_leftovers(job.name());
            tracing::error!(job = %job.name(), "completing a deletion: {e}; retried by every change of the job");
        }
        let revisions = job.revisions()?;
        Ok(Txn {
            jobs,
            job,
            lock,
            revisions,
            changed: false,
            indexed: false,
        })
    }

    pub fn job(&self) -> &JobDir {
        self.job
    }

    /// The job's lock, for the storage calls that require it.
    pub fn lock(&self) -> &JobLock {
        &self.lock
    }

    /// The committed revisions as on disk, oldest first.
    pub fn revisions(&self) -> &[RevisionMeta] {
        &self.revisions
    }

    pub fn get(&self, id: &RevisionId) -> Option<&RevisionMeta> {
        self.revisions.iter().find(|r| r.id == *id)
    }

    /// The revisions `spec` names (newest first); `all` allowed.
    pub fn select(&self, spec: &str) -> Result<Vec<RevisionMeta>> {
        let spec = Spec::parse(spec)?;
        let idx = spec
            .resolve(&self.revisions)
            .map_err(|e| e.context(format!("job {}", self.job.name())))?;
        Ok(idx.into_iter().map(|i| self.revisions[i].clone()).collect())
    }

    /// Revisions in use now (the base of a running push, revisions being
    /// read). Registrations happen under this lock too, so the answer holds
    /// until the transaction ends.
    pub fn protected(&self) -> BTreeSet<RevisionId> {
        self.jobs.activity.protected(self.job.name())
    }

    /// Writes the `.rev` records of `metas` together (all or none). Each
    /// must be a revision this transaction read: a revision deleted
    /// meanwhile is never written back.
    pub fn write(&mut self, metas: &[RevisionMeta]) -> Result<()> {
        self.changed = true;
        for m in metas {
            if self.get(&m.id).is_none() {
                return Err(Error::not_found(format!(
                    "job {}: no revision {}",
                    self.job.name(),
                    m.id
                )));
            }
        }
        let texts: Vec<(PathBuf, String)> = metas
            .iter()
            .map(|m| Ok((self.job.rev_path(&m.id), m.to_yaml()?)))
            .collect::<Result<_>>()?;
        let files: Vec<(&std::path::Path, &[u8])> =
            texts.iter().map(|(p, t)| (p.as_path(), t.as_bytes())).collect();
        durable::write_atomic_all(&files)?;
        for m in metas {
            if let Some(r) = self.revisions.iter_mut().find(|r| r.id == m.id) {
                *r = m.clone();
            }
        }
        Ok(())
    }

    /// Changes one revision's record as read from disk now.
    pub fn update(&mut self, id: &RevisionId, f: impl FnOnce(&mut RevisionMeta)) -> Result<RevisionMeta> {
        let mut meta = self
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("job {}: no revision {id}", self.job.name())))?;
        f(&mut meta);
        self.write(std::slice::from_ref(&meta))?;
        Ok(meta)
    }

    /// Moves a revision's trust to `to` (with `verified_at`), only if its
    /// record is still the version the caller read (`seen`, see
    /// [`JobDir::rev_version`]): a verify that started before a distrust,
    /// or before any other change of the record, cannot mark the revision
    /// verified. Distrusting always applies (it only ever makes a revision
    /// safer). Returns the record as it stands afterwards and whether it
    /// changed.
    pub fn move_trust(
        &mut self,
        id: &RevisionId,
        seen: RecordVersion,
        to: Trust,
        verified_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<(RevisionMeta, bool)> {
        let now = self
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("job {}: no revision {id}", self.job.name())))?;
        if to != Trust::Distrusted && self.job.rev_version(id)? != seen {
            return Ok((now, false));
        }
        let meta = self.update(id, |m| {
            m.trust = to;
            if verified_at.is_some() {
                m.verified_at = verified_at;
            }
        })?;
        Ok((meta, true))
    }

    /// Deletes revisions, all or none: their ids are first written to the
    /// job's deletion journal (the commit point: from then on they are not
    /// listed, and a crash or an error later is completed by the next
    /// transaction or start-up), then their files go. Revisions in use, and
    /// revisions under their retention lock (every deletion passes here,
    /// whoever asked: docs/DESIGN.md, "Retention lock"), are refused.
    pub fn delete(&mut self, ids: &[RevisionId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let protected = self.protected();
        if let Some(busy) = ids.iter().find(|id| protected.contains(id)) {
            return Err(Error::precondition(format!(
                "revision {busy} is in use by a restore or a push; try again later"
            )));
        }
        let now = chrono::Utc::now();
        for id in ids {
            let meta = self
                .get(id)
                .ok_or_else(|| Error::not_found(format!("job {}: no revision {id}", self.job.name())))?;
            if let Some(until) = meta.locked_at(now) {
                return Err(locked(self.job.name(), id, until));
            }
        }
        let deleted: Vec<RevisionMeta> = self
            .revisions
            .iter()
            .filter(|r| ids.contains(&r.id))
            .cloned()
            .collect();
        self.changed = true;
        self.job.journal_deletions(&self.lock, ids)?;
        self.revisions.retain(|r| !ids.contains(&r.id));
        // Before the files go: the index's entries naming them move on.
        self.jobs.hints.deleting(self.job, &deleted, &self.revisions);
        fault::point("delete.journaled");
        // `forget.applied`: tests fail the removal after the commit point.
        let removed = fault::fail("forget.applied").and_then(|()| self.job.finish_deletions(&self.lock));
        if let Err(e) = removed {
            self.jobs.activity.mark_leftovers(self.job.name());
            tracing::error!(job = %self.job.name(), "removing deleted revisions' files: {e}; completed by the next change or start-up");
        }
        Ok(())
    }

    /// Leftover cleanup at the start of this job's own push or copy (which
    /// holds the push slot): keeps only `resumable`, so stale files under
    /// the id of this push are removed too.
    pub fn clean_leftovers_for_push(&self, resumable: Option<RevisionId>) -> Result<Vec<PathBuf>> {
        let keep: Vec<RevisionId> = resumable.into_iter().collect();
        let removed = self.job.clean_leftovers(&self.lock, &keep)?;
        for p in &removed {
            tracing::info!(job = %self.job.name(), "removed leftover {}", p.display());
        }
        Ok(removed)
    }

    /// Removes what no committed revision owns (see
    /// [`JobDir::clean_leftovers`]), keeping the files of a running push
    /// and of the resumable one, `resumable`.
    pub fn clean_leftovers(&self, resumable: Option<RevisionId>) -> Result<Vec<PathBuf>> {
        let mut keep: Vec<RevisionId> = resumable.into_iter().collect();
        keep.extend(
            self.jobs
                .activity
                .job_runtime(self.job.name())
                .push
                .map(|(id, _)| id),
        );
        let removed = self.job.clean_leftovers(&self.lock, &keep)?;
        for p in &removed {
            tracing::info!(job = %self.job.name(), "removed leftover {}", p.display());
        }
        Ok(removed)
    }

    /// Publishes a sealed revision: checks, as on disk now, that its id is
    /// new and that its parent still exists and may still be built on (a
    /// distrust or a forget during the push wins), then installs it, under
    /// `retention_lock` (this server's config for the job: for a copy, never
    /// the source's) from its timestamp on.
    pub fn publish(&mut self, mut sealed: Sealed, retention_lock: Option<Interval>) -> Result<RevisionMeta> {
        sealed.lock_for(retention_lock)?;
        self.check_publishable(sealed.meta())?;
        let new_blocks = sealed.new_blocks();
        self.changed = true;
        let meta = sealed.install(&self.lock)?;
        self.jobs.hints.published(self.job, meta.id, &new_blocks);
        self.add(meta.clone());
        Ok(meta)
    }

    /// The checks of [`Txn::publish`], for a group commit that checks every
    /// disk before it publishes any.
    pub fn check_publishable(&self, meta: &RevisionMeta) -> Result<()> {
        let id = meta.id;
        if self.get(&id).is_some() {
            return Err(Error::exists(format!(
                "job {}: revision {id} exists already",
                self.job.name()
            )));
        }
        // One still journaled as deleted would be hidden by the journal,
        // and its files removed with the deletion's.
        if self.job.deleting()?.contains(&id) {
            return Err(Error::precondition(format!(
                "job {}: revision {id} is still being deleted; nothing was committed",
                self.job.name()
            )));
        }
        if let Some(pid) = meta.parent {
            match self.get(&pid) {
                None => {
                    return Err(Error::precondition(format!(
                        "parent revision {pid} was removed during the push; nothing was committed, \
                         run the push again"
                    )))
                }
                Some(p) if !p.trust.usable_as_parent() => {
                    return Err(Error::precondition(format!(
                        "parent revision {pid} was distrusted during the push; nothing was committed, \
                         run the push again for a full backup"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Completes a group commit recorded before a crash (see
    /// `crate::group::recover`): the sealed revision's files are moved into
    /// place and its `.rev` written as recorded. `false`: it was committed.
    pub fn install_recorded(&mut self, meta: &RevisionMeta) -> Result<bool> {
        if self.get(&meta.id).is_some() {
            return Ok(false);
        }
        let installed = self.job.install_recorded(&self.lock, meta)?;
        if installed {
            self.changed = true;
            self.add(meta.clone());
        }
        Ok(installed)
    }

    fn add(&mut self, meta: RevisionMeta) {
        self.revisions.push(meta);
        self.revisions
            .sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.id.cmp(&b.id)));
    }

    /// Points `latest` at the newest revision (people read it, never the
    /// code); its failure is logged, never the change's (the caller would
    /// retry a change that happened). `point` names the error point tests
    /// use to force such a late failure.
    pub fn point_latest(&self, point: &str) {
        let newest = self.revisions.last().map(|r| &r.id);
        if let Err(e) = fault::fail(point).and_then(|()| self.job.point_latest(newest)) {
            tracing::error!(job = %self.job.name(), "updating latest: {e}; fixed by the next change");
        }
    }

    /// Ends a transaction that changed no revision, leaving in the index
    /// what it read from disk (with `since`, the job's first-seen time)
    /// instead of dropping the job's entry: the next reader does not read
    /// the disk again and nobody is woken (start-up indexes every job this
    /// way). A transaction that changed something ends as always.
    pub fn keep_index(mut self, since: Option<DateTime<Utc>>) {
        if !self.changed {
            let revisions = std::mem::take(&mut self.revisions);
            // Under the job's lock still: no change can come between.
            self.jobs
                .index
                .put(self.job.name(), super::JobEntry::new(revisions, since));
            self.indexed = true;
        }
    }
}

/// The refusal to delete a revision under its retention lock: one line
/// naming the revision and until when.
pub fn locked(job: &JobName, id: &RevisionId, until: DateTime<Utc>) -> Error {
    Error::precondition(format!(
        "job {job}: revision {id} is locked until {} (retention-lock); nothing was deleted",
        until.format("%Y-%m-%d %H:%M:%S UTC")
    ))
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if !self.indexed {
            self.jobs.index.invalidate(self.job.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revisions::{self, Apply, TagAction};
    use crate::state::{test_server, Server};
    use crate::storage::{NewRevision, NewRevisionSpec, PushEnd};
    use crate::work::{Gate, WorkPool};
    use backy_common::checksum::StreamChecksum;
    use backy_common::manifest::{digest, Manifest};
    use backy_common::revision::{SourceInfo, StorageMode};
    use backy_common::{ErrorKind, DEFAULT_BLOCK_SIZE};
    use std::sync::Arc;

    const SIZE: u64 = 1 << 20;

    struct Fixture {
        _dir: tempfile::TempDir,
        server: Arc<Server>,
        job: JobDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let server = test_server(dir.path(), "  vm1: {schedule: none}\n");
        let job = server.job("vm1").unwrap();
        job.ensure().unwrap();
        Fixture {
            _dir: dir,
            server,
            job,
        }
    }

    fn gate() -> Gate {
        Gate::new(Arc::new(WorkPool::new(1)), "test", Arc::new(|| false))
    }

    /// Commits a revision of `SIZE` bytes of `byte`, as a push does.
    fn commit(f: &Fixture, byte: u8, tags: &[&str]) -> RevisionMeta {
        commit_with(f, byte, tags, None)
    }

    /// [`commit`] under a retention lock.
    fn commit_with(f: &Fixture, byte: u8, tags: &[&str], lock: Option<Interval>) -> RevisionMeta {
        let sealed = seal(f, RevisionId::new_random(), byte, tags);
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        txn.publish(sealed, lock).unwrap()
    }

    /// A revision `id` of `SIZE` bytes of `byte`, received and sealed, not
    /// yet published.
    fn seal(f: &Fixture, id: RevisionId, byte: u8, tags: &[&str]) -> Sealed {
        let spec = NewRevisionSpec {
            id,
            size: SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            source: SourceInfo::default(),
            key_check: None,
        };
        let mut rev = NewRevision::create(&f.job, spec, None, StorageMode::Copy, None, gate()).unwrap();
        let data = vec![byte; SIZE as usize];
        let mut sum = StreamChecksum::new();
        rev.data(0, &data).unwrap();
        sum.data(0, &data);
        let mut manifest = Manifest::zeroed(SIZE, DEFAULT_BLOCK_SIZE).unwrap();
        manifest.set(0, digest(&data)).unwrap();
        let end = PushEnd {
            stream_checksum: sum.finish().to_vec(),
            manifest_digest: manifest.file_digest().to_vec(),
            audit: None,
        };
        rev.commit(&end).unwrap()
    }

    fn on_disk(f: &Fixture, id: &RevisionId) -> RevisionMeta {
        f.job.meta(id).unwrap()
    }

    /// Writes a revision's record behind the server's back: what another
    /// change did between an old-style read of the index and its write.
    fn write_behind(f: &Fixture, meta: &RevisionMeta) {
        durable::write_atomic(&f.job.rev_path(&meta.id), meta.to_yaml().unwrap().as_bytes()).unwrap();
    }

    /// Issue 27, item 1: a distrust while a verify (or scrub) of the same
    /// revision runs is not overwritten by the verify's clean result.
    #[test]
    fn a_verify_that_started_before_a_distrust_does_not_mark_it_verified() {
        let f = fixture();
        let meta = commit(&f, 7, &["manual:a"]);
        let mut distrusted = false;
        let verified = revisions::verify(&f.server, &f.job, &meta, &gate(), |_| {
            if !distrusted {
                revisions::distrust(&f.server, &f.job, &meta.id.to_string(), Apply::Yes).unwrap();
                distrusted = true;
            }
            true
        })
        .unwrap();
        assert!(distrusted);
        assert!(verified.bad_blocks.is_empty());
        assert_eq!(on_disk(&f, &meta.id).trust, Trust::Distrusted);
        assert_eq!(verified.meta.trust, Trust::Distrusted);
        // A verify that starts after the distrust may trust it again.
        revisions::verify(&f.server, &f.job, &meta, &gate(), |_| true).unwrap();
        assert_eq!(on_disk(&f, &meta.id).trust, Trust::Verified);
    }

    /// Issue 27, item 2: `tags` and `distrust` change only their field of
    /// the record as on disk, not a copy the index held.
    #[test]
    fn tags_and_distrust_keep_what_another_change_wrote() {
        let f = fixture();
        let meta = commit(&f, 7, &["manual:a"]);
        f.server.jobs.indexed(&f.job).unwrap();
        write_behind(
            &f,
            &RevisionMeta {
                trust: Trust::Distrusted,
                ..meta.clone()
            },
        );
        revisions::tags(
            &f.server,
            &f.job,
            "0",
            TagAction::Add,
            &["manual:b".into()],
            false,
            Apply::Yes,
        )
        .unwrap();
        let now = on_disk(&f, &meta.id);
        assert_eq!(now.trust, Trust::Distrusted, "tags wrote back a stale trust");
        assert_eq!(
            Vec::from_iter(now.tags.iter().map(String::as_str)),
            ["manual:a", "manual:b"]
        );

        let other = commit(&f, 8, &["manual:c"]);
        f.server.jobs.indexed(&f.job).unwrap();
        write_behind(
            &f,
            &RevisionMeta {
                tags: ["manual:d".to_string()].into(),
                ..other.clone()
            },
        );
        revisions::distrust(&f.server, &f.job, &other.id.to_string(), Apply::Yes).unwrap();
        let now = on_disk(&f, &other.id);
        assert_eq!(now.trust, Trust::Distrusted);
        assert_eq!(
            Vec::from_iter(now.tags.iter().map(String::as_str)),
            ["manual:d"],
            "distrust wrote back stale tags"
        );
    }

    /// Issue 27, item 3: a distrust of a revision that a forget (or
    /// expiry) deleted meanwhile does not bring its `.rev` back.
    #[test]
    fn a_distrust_after_a_forget_does_not_bring_the_revision_back() {
        let f = fixture();
        let meta = commit(&f, 7, &["manual:a"]);
        f.server.jobs.indexed(&f.job).unwrap();
        // What a forget between the old distrust's read and write did.
        for p in [
            f.job.rev_path(&meta.id),
            f.job.image_path(&meta.id),
            f.job.digests_path(&meta.id),
        ] {
            std::fs::remove_file(p).unwrap();
        }
        let e = revisions::distrust(&f.server, &f.job, &meta.id.to_string(), Apply::Yes).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
        assert!(
            !f.job.rev_path(&meta.id).exists(),
            "a revision without data is listed again"
        );
    }

    /// Issue 27, item 5: a deletion of several is journaled first: once
    /// the journal is written, none of them is listed, and what a failure
    /// left is completed by the next transaction.
    #[test]
    fn a_deletion_of_several_is_all_or_none() {
        let f = fixture();
        let revs: Vec<RevisionMeta> = (0..3).map(|i| commit(&f, i, &["manual:a"])).collect();
        let ids: Vec<RevisionId> = revs.iter().map(|m| m.id).collect();
        {
            let txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
            // Journaled, but the files not yet removed (a crash or an error
            // right after the commit point).
            f.job.journal_deletions(txn.lock(), &ids).unwrap();
        }
        assert!(
            f.job.revisions().unwrap().is_empty(),
            "journaled revisions are listed"
        );
        assert!(f.job.rev_path(&ids[1]).exists());
        let txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        assert!(txn.revisions().is_empty());
        for id in &ids {
            assert!(!f.job.rev_path(id).exists() && !f.job.image_path(id).exists());
        }
        assert!(!f.job.has_leftovers());
    }

    /// A file made immutable (`chattr +i`) until dropped, also when the
    /// test panics: a removal of it fails for real (`EPERM`), as an
    /// operator's flag or a failing disk makes it fail.
    struct Immutable(PathBuf);

    impl Immutable {
        /// `None`, with the reason printed, where `chattr +i` cannot work
        /// (not root, no `chattr`, a filesystem without the flag).
        fn set(path: &std::path::Path) -> Option<Immutable> {
            if !rustix::process::geteuid().is_root() {
                println!("SKIPPED: not root (chattr +i needs CAP_LINUX_IMMUTABLE)");
                return None;
            }
            match std::process::Command::new("chattr").arg("+i").arg(path).output() {
                Ok(out) if out.status.success() => Some(Immutable(path.to_owned())),
                Ok(out) => {
                    println!(
                        "SKIPPED: chattr +i {} failed: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    None
                }
                Err(e) => {
                    println!("SKIPPED: cannot run chattr: {e}");
                    None
                }
            }
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            let ok = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("chattr -i {} failed: remove it by hand", self.0.display());
            }
        }
    }

    /// Issue 27, item 5, with a real failure: the second of three
    /// forgotten revisions cannot be removed (its `.rev` is immutable).
    /// The forget is all or none (none of the three is listed after it);
    /// the job's other changes go on meanwhile (a commit, tags, another
    /// forget, which joins the journal); a revision under the stuck id is
    /// not published; once the file may go, the next transaction removes
    /// everything. Skipped, saying why, where `chattr +i` is unavailable.
    #[test]
    fn a_forget_whose_removal_fails_is_all_or_none_and_blocks_no_other_change() {
        let f = fixture();
        let ids: Vec<RevisionId> = (1..=3).map(|b| commit(&f, b, &["manual:a"]).id).collect();
        let files = |id: &RevisionId| [f.job.rev_path(id), f.job.image_path(id), f.job.digests_path(id)];
        let Some(stuck) = Immutable::set(&f.job.rev_path(&ids[1])) else {
            return;
        };

        let result = revisions::forget(&f.server, &f.job, "all", Apply::Yes);
        let listed: Vec<RevisionId> = f.job.revisions().unwrap().iter().map(|m| m.id).collect();
        let kept = ids.iter().filter(|id| listed.contains(id)).count();
        assert!(
            kept == 0 || kept == 3,
            "a forget of three left {kept} of them listed: {result:?}"
        );
        // The journal is the commit point: the forget happened, and says so.
        assert_eq!(result.unwrap().len(), 3);
        assert!(listed.is_empty(), "journaled revisions are listed");
        assert!(f.server.jobs.indexed(&f.job).unwrap().revisions.is_empty());
        // What could go went; the stuck revision stays journaled.
        for id in [ids[0], ids[2]] {
            for p in files(&id) {
                assert!(!p.exists(), "{} was left", p.display());
            }
        }
        assert!(f.job.rev_path(&ids[1]).exists());
        assert_eq!(f.job.deleting().unwrap(), [ids[1]]);
        assert!(f.job.has_leftovers());

        // The job's other changes go on while the file stays.
        let other = commit(&f, 4, &["manual:a"]);
        revisions::tags(
            &f.server,
            &f.job,
            &other.id.to_string(),
            TagAction::Add,
            &["manual:b".into()],
            false,
            Apply::Yes,
        )
        .unwrap();
        let another = commit(&f, 5, &["manual:a"]);
        revisions::forget(&f.server, &f.job, &another.id.to_string(), Apply::Yes).unwrap();
        for p in files(&another.id) {
            assert!(!p.exists(), "{} was left", p.display());
        }
        assert_eq!(
            f.job.deleting().unwrap(),
            [ids[1]],
            "the unfinished deletion was lost"
        );
        let listed = f.job.revisions().unwrap();
        assert_eq!(Vec::from_iter(listed.iter().map(|m| m.id)), [other.id]);
        assert_eq!(
            Vec::from_iter(listed[0].tags.iter().map(String::as_str)),
            ["manual:a", "manual:b"]
        );
        // A revision under the stuck id (a replica's copy of it) would be
        // hidden and removed by the journal: refused.
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let e = txn.publish(seal(&f, ids[1], 6, &["manual:a"]), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
        drop(txn);

        drop(stuck);
        drop(Txn::begin(&f.server.jobs, &f.job).unwrap());
        for id in &ids {
            for p in files(id) {
                assert!(!p.exists(), "{} was left", p.display());
            }
        }
        assert!(f.job.deleting().unwrap().is_empty());
        assert!(!f.job.has_leftovers());
        let disk = f.job.revisions().unwrap();
        assert_eq!(Vec::from_iter(disk.iter().map(|m| m.id)), [other.id]);
        assert_eq!(f.server.jobs.indexed(&f.job).unwrap().revisions, disk);
    }

    /// The periodic leftover cleanup keeps every file of the job's running
    /// push, its sealed manifest included: a revision sealed and waiting
    /// for its commit (a group's disk waits minutes) must still commit.
    #[test]
    fn the_periodic_cleanup_keeps_a_sealed_revision_waiting_for_its_commit() {
        let f = fixture();
        let id = RevisionId::new_random();
        let slot = f.server.jobs.activity.try_start_push(f.job.name(), id).unwrap();
        let sealed = seal(&f, id, 7, &["manual:a"]);
        assert!(f.job.sealed_digests_path(&id).exists());
        let txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let removed = txn.clean_leftovers(None).unwrap();
        assert!(
            removed.is_empty(),
            "the sealed revision's files were removed: {removed:?}"
        );
        drop(txn);
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let meta = txn.publish(sealed, None).unwrap();
        drop(txn);
        drop(slot);
        assert_eq!(on_disk(&f, &id), meta);
        assert!(f.job.manifest(&meta).is_ok());
    }

    /// A group commit recorded before a crash is finished from the sealed
    /// files as recorded; finishing it again changes nothing; without its
    /// files it fails with DataLoss instead of writing a `.rev`.
    #[test]
    fn a_recorded_commit_is_installed_from_its_sealed_files() {
        let f = fixture();
        let id = RevisionId::new_random();
        let mut sealed = seal(&f, id, 9, &["manual:a"]);
        sealed.lock_for(None).unwrap();
        let meta = sealed.meta().clone();
        // The crash: the sealed files stay, the process state is gone.
        std::mem::forget(sealed);
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        assert!(txn.install_recorded(&meta).unwrap());
        assert!(!txn.install_recorded(&meta).unwrap(), "installed once");
        drop(txn);
        assert_eq!(on_disk(&f, &id), meta);
        assert_eq!(f.job.revisions().unwrap(), std::slice::from_ref(&meta));
        assert!(f.job.manifest(&meta).is_ok());
        assert!(!f.job.partial_image_path(&id).exists());

        let lost = RevisionMeta {
            id: RevisionId::new_random(),
            ..meta
        };
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let e = txn.install_recorded(&lost).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DataLoss, "{}", e.message);
        assert!(!f.job.rev_path(&lost.id).exists());
    }

    /// As above with a forgotten revision's image stuck: the leftover
    /// cleanup that begins every push leaves a journaled deletion's files
    /// to it and fails no push.
    #[test]
    fn a_deleted_image_that_cannot_go_fails_no_push() {
        let f = fixture();
        let gone = commit(&f, 1, &["manual:a"]);
        let Some(stuck) = Immutable::set(&f.job.image_path(&gone.id)) else {
            return;
        };
        revisions::forget(&f.server, &f.job, &gone.id.to_string(), Apply::Yes).unwrap();
        assert!(f.job.revisions().unwrap().is_empty());
        assert_eq!(f.job.deleting().unwrap(), [gone.id]);
        let txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        txn.clean_leftovers_for_push(None).unwrap();
        txn.clean_leftovers(None).unwrap();
        drop(txn);
        let pushed = commit(&f, 2, &["manual:a"]);

        drop(stuck);
        drop(Txn::begin(&f.server.jobs, &f.job).unwrap());
        assert!(!f.job.image_path(&gone.id).exists());
        assert!(!f.job.has_leftovers());
        let disk = f.job.revisions().unwrap();
        assert_eq!(Vec::from_iter(disk.iter().map(|m| m.id)), [pushed.id]);
    }

    /// A revision in use is refused by a deletion, which then changes
    /// nothing.
    #[test]
    fn a_deletion_refuses_revisions_in_use_and_changes_nothing() {
        let f = fixture();
        let a = commit(&f, 1, &["manual:a"]);
        let b = commit(&f, 2, &["manual:a"]);
        let _reading = f.server.jobs.activity.start_read(f.job.name(), b.id);
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let e = txn.delete(&[a.id, b.id]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
        drop(txn);
        assert_eq!(f.job.revisions().unwrap().len(), 2);
    }

    /// Issue 28: a revision is locked from its timestamp for the lock it
    /// was published with; a deletion that names it is refused whoever
    /// asks (forget, dry run included), naming it and until when, and
    /// changes nothing; once the lock has passed it goes like any other.
    #[test]
    fn a_deletion_refuses_locked_revisions_and_changes_nothing() {
        let f = fixture();
        let a = commit(&f, 1, &["manual:a"]);
        let b = commit_with(&f, 2, &["manual:a"], Some(Interval::from_secs(3600)));
        assert_eq!(a.locked_until, None);
        let until = b.locked_until.unwrap();
        // The timestamp plus the lock, rounded up to a whole second.
        let exact = b.timestamp + chrono::TimeDelta::seconds(3600);
        assert!(
            until >= exact && until - exact < chrono::TimeDelta::seconds(1),
            "{until} {exact}"
        );
        assert_eq!(until.timestamp_subsec_nanos(), 0);
        assert_eq!(on_disk(&f, &b.id).locked_until, Some(until));
        let before = f.job.revisions().unwrap();
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let e = txn.delete(&[a.id, b.id]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
        let want = format!(
            "job vm1: revision {} is locked until {} (retention-lock); nothing was deleted",
            b.id,
            until.format("%Y-%m-%d %H:%M:%S UTC")
        );
        assert_eq!(e.message, want);
        drop(txn);
        for apply in [Apply::DryRun, Apply::Yes] {
            let e = revisions::forget(&f.server, &f.job, "all", apply).unwrap_err();
            assert_eq!(
                (e.kind, e.message.as_str()),
                (ErrorKind::FailedPrecondition, want.as_str())
            );
        }
        assert_eq!(f.job.revisions().unwrap(), before, "nothing deleted");
        assert!(f.job.image_path(&a.id).exists() && f.job.image_path(&b.id).exists());

        // The lock has passed (as the clock sees it): it holds nothing.
        write_behind(
            &f,
            &RevisionMeta {
                locked_until: Some(chrono::Utc::now() - chrono::TimeDelta::seconds(1)),
                ..b.clone()
            },
        );
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        txn.delete(&[a.id, b.id]).unwrap();
        drop(txn);
        assert!(f.job.revisions().unwrap().is_empty());
    }

    /// A commit never replaces a revision of the same id, and a push whose
    /// parent was distrusted meanwhile commits nothing.
    #[test]
    fn a_commit_checks_its_id_and_parent_on_disk() {
        let f = fixture();
        let parent = commit(&f, 1, &["manual:a"]);
        let manifest = f.job.manifest(&parent).unwrap();
        let spec = NewRevisionSpec {
            id: RevisionId::new_random(),
            size: SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
            tags: ["manual:a".to_string()].into(),
            source: SourceInfo::default(),
            key_check: None,
        };
        let rev = NewRevision::create(
            &f.job,
            spec,
            Some((&parent, manifest)),
            StorageMode::Copy,
            None,
            gate(),
        )
        .unwrap();
        let end = PushEnd {
            stream_checksum: StreamChecksum::new().finish().to_vec(),
            manifest_digest: f.job.manifest(&parent).unwrap().file_digest().to_vec(),
            audit: None,
        };
        let sealed = rev.commit(&end).unwrap();
        revisions::distrust(&f.server, &f.job, &parent.id.to_string(), Apply::Yes).unwrap();
        let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
        let e = txn.publish(sealed, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
        assert!(e.message.contains("distrusted during the push"), "{}", e.message);
        drop(txn);
        assert_eq!(f.job.revisions().unwrap().len(), 1);
        assert!(!f.job.has_leftovers(), "an unpublished revision left files");
    }

    /// One change to the job, for the model test.
    #[derive(Clone, Debug)]
    enum Op {
        Commit(u8),
        Tag(usize, u8),
        Distrust(usize),
        /// A verify of revision k; `true`: a distrust of it lands while
        /// the verify runs.
        Verify(usize, bool),
        Forget(Vec<usize>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => any::<u8>().prop_map(Op::Commit),
            2 => (0..8usize, 0..4u8).prop_map(|(k, t)| Op::Tag(k, t)),
            1 => (0..8usize).prop_map(Op::Distrust),
            2 => (0..8usize, any::<bool>()).prop_map(|(k, d)| Op::Verify(k, d)),
            1 => proptest::collection::vec(0..8usize, 1..4).prop_map(Op::Forget),
        ]
    }

    /// What the job should hold: (id, tags, trust), oldest first.
    type Model = Vec<(RevisionId, BTreeSet<String>, Trust)>;

    fn pick(model: &Model, k: usize) -> Option<RevisionId> {
        (!model.is_empty()).then(|| model[k % model.len()].0)
    }

    fn apply(f: &Fixture, model: &mut Model, op: &Op) {
        let spec_of = |id: &RevisionId| id.to_string();
        match op {
            Op::Commit(b) => {
                // Never all zeros: a hole is not read by a verify, and the
                // interleaved distrust rides on its reads.
                let m = commit(f, (*b).max(1), &["manual:a"]);
                model.push((m.id, m.tags, Trust::Trusted));
            }
            Op::Tag(k, t) => {
                let Some(id) = pick(model, *k) else { return };
                let tag = format!("manual:t{t}");
                revisions::tags(
                    &f.server,
                    &f.job,
                    &spec_of(&id),
                    TagAction::Add,
                    std::slice::from_ref(&tag),
                    false,
                    Apply::Yes,
                )
                .unwrap();
                model.iter_mut().find(|r| r.0 == id).unwrap().1.insert(tag);
            }
            Op::Distrust(k) => {
                let Some(id) = pick(model, *k) else { return };
                revisions::distrust(&f.server, &f.job, &spec_of(&id), Apply::Yes).unwrap();
                model.iter_mut().find(|r| r.0 == id).unwrap().2 = Trust::Distrusted;
            }
            Op::Verify(k, interleave) => {
                let Some(id) = pick(model, *k) else { return };
                let meta = f.job.meta(&id).unwrap();
                let mut pending = *interleave;
                revisions::verify(&f.server, &f.job, &meta, &gate(), |_| {
                    if std::mem::take(&mut pending) {
                        revisions::distrust(&f.server, &f.job, &spec_of(&id), Apply::Yes).unwrap();
                    }
                    true
                })
                .unwrap();
                let r = model.iter_mut().find(|r| r.0 == id).unwrap();
                // Clean data: verified, unless a distrust landed meanwhile.
                r.2 = if *interleave {
                    Trust::Distrusted
                } else {
                    Trust::Verified
                };
            }
            Op::Forget(ks) => {
                let ids: BTreeSet<RevisionId> = ks.iter().filter_map(|k| pick(model, *k)).collect();
                if ids.is_empty() {
                    return;
                }
                let mut txn = Txn::begin(&f.server.jobs, &f.job).unwrap();
                txn.delete(&ids.iter().copied().collect::<Vec<_>>()).unwrap();
                model.retain(|r| !ids.contains(&r.0));
            }
        }
    }

    fn check(f: &Fixture, model: &Model) {
        let disk = f.job.revisions().unwrap();
        let got: Model = disk.iter().map(|m| (m.id, m.tags.clone(), m.trust)).collect();
        let mut want = model.clone();
        want.sort_by_key(|r| disk.iter().position(|m| m.id == r.0));
        assert_eq!(got, want, "disk differs from the model");
        let indexed = f.server.jobs.indexed(&f.job).unwrap();
        assert_eq!(indexed.revisions, disk, "the index differs from the disk");
        for m in &disk {
            assert!(
                f.job.image_path(&m.id).exists() && f.job.manifest(m).is_ok(),
                "{} lost its data",
                m.id
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
        /// The job's transactions against a plain in-memory model: after
        /// every change the disk holds what the model says, the index
        /// equals the disk, and every listed revision has its data.
        #[test]
        fn transactions_agree_with_a_model(ops in proptest::collection::vec(op(), 1..24)) {
            let f = fixture();
            let mut model = Model::new();
            for op in &ops {
                apply(&f, &mut model, op);
                check(&f, &model);
            }
        }
    }

    /// A tiny deterministic generator for the stress threads.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    /// Issue 27: threads on one job push (full and incremental), copy,
    /// tag, distrust, verify, forget and expire at random for
    /// `BACKY_STRESS_SECS` (default 20). Afterwards every listed revision
    /// has its data and verifies, no revision stands verified by a verify
    /// that started before its last distrust, the index equals the disk.
    #[test]
    fn concurrent_changes_to_one_job_keep_it_consistent() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Mutex;
        let secs: u64 = std::env::var("BACKY_STRESS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let dir = tempfile::tempdir().unwrap();
        let server = test_server(dir.path(), "  vm1: {schedule: daily}\n");
        let job = server.job("vm1").unwrap();
        job.ensure().unwrap();
        let f = Fixture {
            _dir: dir,
            server: server.clone(),
            job: job.clone(),
        };
        let seq = AtomicU64::new(0);
        // Per revision: when its last distrust began; verifies that wrote
        // `verified`, with when they began.
        let distrusts: Mutex<std::collections::HashMap<RevisionId, u64>> = Default::default();
        let verified: Mutex<Vec<(RevisionId, u64)>> = Default::default();
        let counts: Mutex<std::collections::BTreeMap<&'static str, (u64, u64)>> = Default::default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let daily = ["daily"];
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (f, seq, distrusts, verified, counts) = (&f, &seq, &distrusts, &verified, &counts);
                scope.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                    while std::time::Instant::now() < deadline {
                        let listed = f.job.revisions().unwrap();
                        let some = (!listed.is_empty()).then(|| listed[rng.below(listed.len())].clone());
                        let (name, result): (&str, Result<()>) = match rng.below(9) {
                            0 | 1 => ("push", stress_push(f, &mut rng, false, &daily)),
                            2 => ("copy", stress_push(f, &mut rng, true, &daily)),
                            3 => match &some {
                                Some(m) => ("tags", {
                                    let tag = format!("manual:t{}", rng.below(3));
                                    let action = if rng.below(2) == 0 {
                                        TagAction::Add
                                    } else {
                                        TagAction::Remove
                                    };
                                    revisions::tags(
                                        &f.server,
                                        &f.job,
                                        &m.id.to_string(),
                                        action,
                                        &[tag],
                                        false,
                                        Apply::Yes,
                                    )
                                    .map(|_| ())
                                }),
                                None => continue,
                            },
                            4 => match &some {
                                Some(m) => ("distrust", {
                                    let began = seq.fetch_add(1, Ordering::SeqCst);
                                    let r =
                                        revisions::distrust(&f.server, &f.job, &m.id.to_string(), Apply::Yes);
                                    if r.is_ok() {
                                        distrusts.lock().unwrap().insert(m.id, began);
                                    }
                                    r.map(|_| ())
                                }),
                                None => continue,
                            },
                            5 | 6 => match &some {
                                Some(m) => ("verify", {
                                    let began = seq.fetch_add(1, Ordering::SeqCst);
                                    revisions::verify(&f.server, &f.job, m, &gate(), |_| true).map(|v| {
                                        if v.meta.trust == Trust::Verified && v.bad_blocks.is_empty() {
                                            verified.lock().unwrap().push((m.id, began));
                                        }
                                    })
                                }),
                                None => continue,
                            },
                            7 => match &some {
                                Some(m) => (
                                    "forget",
                                    revisions::forget(&f.server, &f.job, &m.id.to_string(), Apply::Yes)
                                        .map(|_| ()),
                                ),
                                None => continue,
                            },
                            _ => ("expiry", {
                                crate::schedule::expire_all(&f.server);
                                Ok(())
                            }),
                        };
                        let mut c = counts.lock().unwrap();
                        let e = c.entry(name).or_default();
                        match result {
                            Ok(()) => e.0 += 1,
                            // What concurrency may answer: the slot or the
                            // revision was taken meanwhile.
                            Err(err)
                                if matches!(
                                    err.kind,
                                    ErrorKind::Busy | ErrorKind::NotFound | ErrorKind::FailedPrecondition
                                ) =>
                            {
                                e.1 += 1
                            }
                            Err(err) => panic!("{name}: {err:?}"),
                        }
                    }
                });
            }
        });
        eprintln!(
            "stress ({secs} s): op: (done, refused) {:?}",
            counts.lock().unwrap()
        );
        let disk = f.job.revisions().unwrap();
        assert_eq!(
            f.server.jobs.indexed(&f.job).unwrap().revisions,
            disk,
            "index differs from disk"
        );
        let distrusts = distrusts.lock().unwrap();
        let verified = verified.lock().unwrap();
        for m in &disk {
            if m.trust == Trust::Verified {
                if let Some(d) = distrusts.get(&m.id) {
                    assert!(
                        verified.iter().any(|(id, began)| *id == m.id && began > d),
                        "{} stands verified though no verify began after its distrust",
                        m.id
                    );
                }
            }
            let v = revisions::verify(&f.server, &f.job, m, &gate(), |_| true).unwrap();
            assert!(v.bad_blocks.is_empty(), "{} does not verify", m.id);
        }
        assert!(!f.job.has_leftovers() || f.server.jobs.activity.job_runtime(f.job.name()).push.is_none());
        let total: u64 = counts.lock().unwrap().values().map(|c| c.0).sum();
        assert!(total > 20, "the stress did almost nothing: {total} changes");
    }

    /// A push (or a replica's copy) of one block, full or on the newest
    /// usable revision, through the slot and the two transactions.
    fn stress_push(f: &Fixture, rng: &mut Rng, copy: bool, tags: &[&str]) -> Result<()> {
        let id = RevisionId::new_random();
        let running = f.server.jobs.activity.try_start_push(f.job.name(), id)?;
        let txn = Txn::begin(&f.server.jobs, &f.job)?;
        txn.clean_leftovers_for_push(None)?;
        let parent = if rng.below(3) == 0 {
            None
        } else {
            crate::plan::choose_parent(txn.revisions()).cloned()
        };
        running.set_parent(parent.as_ref().map(|p| p.id));
        drop(txn);
        let parent = match &parent {
            Some(m) => Some((m, f.job.manifest(m)?)),
            None => None,
        };
        let spec = NewRevisionSpec {
            id,
            size: SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            source: SourceInfo::default(),
            key_check: None,
        };
        let mut rev = NewRevision::create(&f.job, spec, parent, StorageMode::Copy, None, gate())?;
        let data = vec![1 + rng.below(255) as u8; SIZE as usize];
        let mut sum = StreamChecksum::new();
        rev.data(0, &data)?;
        sum.data(0, &data);
        let mut manifest = Manifest::zeroed(SIZE, DEFAULT_BLOCK_SIZE)?;
        manifest.set(0, digest(&data))?;
        let sealed = if copy {
            rev.commit_copy(chrono::Utc::now(), &manifest.file_digest(), None)?
        } else {
            rev.commit(&PushEnd {
                stream_checksum: sum.finish().to_vec(),
                manifest_digest: manifest.file_digest().to_vec(),
                audit: None,
            })?
        };
        crate::push::publish_and_expire(&f.server, &f.job, sealed, &running, "stress.after-commit")?;
        drop(running);
        Ok(())
    }
}
