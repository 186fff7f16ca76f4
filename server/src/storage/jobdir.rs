//! One job's directory: committed revisions (`<id>`, `<id>.digests`,
//! `<id>.rev`), the `latest` symlink, `.partial/` and `.lock`.

use super::durable;
use super::lock::JobLock;
use backy_common::manifest::Manifest;
use backy_common::revision::RevisionMeta;
use backy_common::{fault, Error, JobName, Result, RevisionId};
use std::path::{Path, PathBuf};

pub const PARTIAL_DIR: &str = ".partial";
/// Revisions being deleted (one id a line): written durably before any of
/// their files goes, so a deletion of several is all or none, crash or not.
pub const DELETIONS_FILE: &str = ".deleting";
pub const LOCK_FILE: &str = ".lock";
pub const LATEST_LINK: &str = "latest";
/// When the server first knew the job (RFC 3339): a job that never had a
/// backup gets one SLA window from then.
pub const SINCE_FILE: &str = ".since";
/// How long a request waits for the job lock held by short maintenance.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// One write of a `.rev` file (see [`JobDir::rev_version`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordVersion(u64, i64, i64);

/// Paths and committed state of one job.
#[derive(Clone, Debug)]
pub struct JobDir {
    name: JobName,
    dir: PathBuf,
}

impl JobDir {
    /// The directory of `name` below `base`; a validated [`JobName`] never
    /// escapes `base`.
    pub fn new(base: &Path, name: JobName) -> Self {
        let dir = base.join(name.as_str());
        JobDir { name, dir }
    }

    pub fn name(&self) -> &JobName {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn image_path(&self, id: &RevisionId) -> PathBuf {
        self.dir.join(id.short())
    }

    pub fn digests_path(&self, id: &RevisionId) -> PathBuf {
        self.dir.join(format!("{}.digests", id.short()))
    }

    pub fn rev_path(&self, id: &RevisionId) -> PathBuf {
        self.dir.join(format!("{}.rev", id.short()))
    }

    pub fn partial_dir(&self) -> PathBuf {
        self.dir.join(PARTIAL_DIR)
    }

    /// Creates the job's directories if missing, and records when the job
    /// was first seen.
    pub fn ensure(&self) -> Result<()> {
        durable::create_dir(&self.partial_dir())?;
        let since = self.dir.join(SINCE_FILE);
        if !since.exists() {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            durable::write_atomic(&since, format!("{now}\n").as_bytes())?;
        }
        Ok(())
    }

    /// [`JobDir::ensure`] at start-up, for a store of thousands of jobs:
    /// nothing is synced here (the caller syncs the filesystem once when
    /// this returns `true`: something was made). Also rewrites a `.since`
    /// that is there but unreadable (a crash before that sync). Returns
    /// the job's first-seen time too.
    pub fn ensure_at_start(&self) -> Result<(bool, chrono::DateTime<chrono::Utc>)> {
        let mut made = false;
        if !self.dir.is_dir() {
            // A configured job without a directory yet: rare, so the
            // ordinary durable path.
            durable::create_dir(&self.dir)?;
        }
        let partial = self.partial_dir();
        if !partial.is_dir() {
            durable::create_dir_unsynced(&partial)?;
            made = true;
        }
        let since = match self.since() {
            Some(t) => t,
            None => {
                let now = chrono::Utc::now();
                let text = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                durable::write_unsynced(&self.dir.join(SINCE_FILE), format!("{text}\n").as_bytes())?;
                made = true;
                // As read back later: whole seconds.
                chrono::DateTime::parse_from_rfc3339(&text).map_or(now, |t| t.with_timezone(&chrono::Utc))
            }
        };
        Ok((made, since))
    }

    /// When the server first knew the job; `None` if unrecorded or unreadable.
    pub fn since(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let text = std::fs::read_to_string(self.dir.join(SINCE_FILE)).ok()?;
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }

    /// Takes the job's lock, waiting a little for short maintenance (expiry,
    /// tag changes) to finish. Callers refuse at once when a push is running.
    pub fn lock(&self) -> Result<JobLock> {
        self.ensure()?;
        JobLock::acquire(&self.dir.join(LOCK_FILE), self.name.as_str(), LOCK_PATIENCE)
    }

    /// Takes the job's lock only if it is free now (background work).
    pub fn try_lock(&self) -> Result<JobLock> {
        self.ensure()?;
        JobLock::try_acquire(&self.dir.join(LOCK_FILE), self.name.as_str())
    }

    /// Committed revisions, oldest first. A `.rev` that cannot be read is
    /// logged and left out rather than hiding every other revision.
    pub fn revisions(&self) -> Result<Vec<RevisionMeta>> {
        let deleting = self.deleting()?;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        let mut revs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".rev")) else {
                continue;
            };
            match RevisionId::from_short(stem) {
                Ok(id) if !deleting.contains(&id) => {}
                _ => continue,
            }
            match self.read_meta(&entry.path()) {
                Ok(meta) if meta.id.short() == stem => revs.push(meta),
                Ok(meta) => tracing::error!(job = %self.name, file = %entry.path().display(),
                    "revision metadata names id {}, ignoring it", meta.id),
                Err(e) => tracing::error!(job = %self.name, "{e}"),
            }
        }
        revs.sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.id.cmp(&b.id)));
        Ok(revs)
    }

    fn read_meta(&self, path: &Path) -> Result<RevisionMeta> {
        use std::io::Read as _;
        // Not `fs::read_to_string`: its stat for the size is one more
        // system call per `.rev`, 200,000 of them at start-up; a `.rev`
        // is a few hundred bytes.
        let mut text = String::with_capacity(1024);
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        RevisionMeta::from_yaml(&text, &path.display().to_string())
    }

    /// Which write of a revision's `.rev` is on disk: every write makes a
    /// new file (see [`durable::write_atomic`]), so inode and change time
    /// tell one write from the next.
    pub fn rev_version(&self, id: &RevisionId) -> Result<RecordVersion> {
        use std::os::unix::fs::MetadataExt;
        let path = self.rev_path(id);
        let m = std::fs::metadata(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(RecordVersion(m.ino(), m.ctime(), m.ctime_nsec()))
    }

    /// One committed revision's metadata.
    pub fn meta(&self, id: &RevisionId) -> Result<RevisionMeta> {
        let path = self.rev_path(id);
        if !path.exists() {
            return Err(Error::not_found(format!("job {}: no revision {id}", self.name)));
        }
        self.read_meta(&path)
    }

    /// A revision's manifest, read piece by piece and checked against its
    /// `.rev` (digest, size, block size).
    pub fn manifest(&self, meta: &RevisionMeta) -> Result<Manifest> {
        let path = self.digests_path(&meta.id);
        let file =
            std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (m, digest) = Manifest::read_from(
            std::io::BufReader::with_capacity(1 << 20, file),
            &path.display().to_string(),
        )?;
        let got = hex::encode(digest);
        if got != meta.manifest_digest {
            return Err(Error::data_loss(format!(
                "{}: manifest digest {got} does not match the revision's {}",
                path.display(),
                meta.manifest_digest
            )));
        }
        if m.image_size() != meta.size || m.block_size() != meta.block_size {
            return Err(Error::data_loss(format!(
                "job {}: manifest of {} does not match its size or block size",
                self.name, meta.id
            )));
        }
        Ok(m)
    }

    /// Removes what no committed revision owns: everything in `.partial/`
    /// except the files of the pushes `keep` (running or resumable), temp
    /// files, and image/manifest files without a `.rev`, except those of a
    /// journaled deletion ([`JobDir::finish_deletions`] retries them; one
    /// that cannot go fails no push).
    pub fn clean_leftovers(&self, _held: &JobLock, keep: &[RevisionId]) -> Result<Vec<PathBuf>> {
        let deleting = self.deleting()?;
        let mut removed = Vec::new();
        let partial = self.partial_dir();
        let kept: Vec<PathBuf> = keep
            .iter()
            .flat_map(|id| {
                [
                    self.partial_image_path(id),
                    self.resume_record_path(id),
                    self.resume_digests_path(id),
                    // Sealed, its commit pending (a group's disk waits
                    // for the group's commit).
                    self.sealed_digests_path(id),
                ]
            })
            .collect();
        if let Ok(entries) = std::fs::read_dir(&partial) {
            for e in entries.flatten() {
                if kept.contains(&e.path()) {
                    continue;
                }
                remove_path(&e.path())?;
                removed.push(e.path());
            }
        }
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::io(format!("listing {}", self.dir.display()), e)),
        };
        // One listing tells which `.rev` files exist (not a stat per file:
        // start-up runs this for every job). The caller holds the lock, so
        // no `.rev` comes or goes meanwhile.
        let names: Vec<std::ffi::OsString> = entries.flatten().map(|e| e.file_name()).collect();
        let revs: std::collections::HashSet<&str> = names
            .iter()
            .filter_map(|n| n.to_str()?.strip_suffix(".rev"))
            .collect();
        for name in &names {
            let Some(name) = name.to_str() else { continue };
            let orphan = if name.starts_with(".tmp.") {
                true
            } else {
                let stem = name.strip_suffix(".digests").unwrap_or(name);
                RevisionId::from_short(stem).is_ok_and(|id| !revs.contains(stem) && !deleting.contains(&id))
            };
            if orphan {
                let path = self.dir.join(name);
                remove_path(&path)?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            durable::fsync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Whether anything lies in `.partial/` or an unfinished deletion waits
    /// (cheap: one directory read).
    pub fn has_leftovers(&self) -> bool {
        self.dir.join(DELETIONS_FILE).exists()
            || std::fs::read_dir(self.partial_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    /// Finishes the commit of a sealed revision whose group commit was
    /// recorded before a crash (see `crate::group`): moves what is still
    /// in `.partial/` into place and writes the `.rev` as recorded.
    /// `false`: it was committed already.
    pub fn install_recorded(&self, _held: &JobLock, meta: &RevisionMeta) -> Result<bool> {
        let id = meta.id;
        if self.rev_path(&id).exists() {
            return Ok(false);
        }
        for (from, to) in [
            (self.partial_image_path(&id), self.image_path(&id)),
            (self.sealed_digests_path(&id), self.digests_path(&id)),
        ] {
            if from.exists() {
                std::fs::rename(&from, &to)
                    .map_err(|e| Error::io(format!("moving {} to {}", from.display(), to.display()), e))?;
            } else if !to.exists() {
                return Err(Error::data_loss(format!(
                    "job {}: revision {id} of a recorded group commit has no {}",
                    self.name,
                    to.display()
                )));
            }
        }
        durable::fsync_dir(&self.dir)?;
        durable::fsync_dir(&self.partial_dir())?;
        durable::write_atomic(&self.rev_path(&id), meta.to_yaml()?.as_bytes())?;
        Ok(true)
    }

    /// Removes the image and manifest of `id` if no `.rev` owns them.
    pub fn remove_orphan(&self, _held: &JobLock, id: &RevisionId) -> Result<()> {
        if self.rev_path(id).exists() {
            return Ok(());
        }
        remove_path(&self.image_path(id))?;
        remove_path(&self.digests_path(id))
    }

    /// The revisions of an unfinished deletion (see [`DELETIONS_FILE`]):
    /// not listed, whatever files of theirs are left.
    pub fn deleting(&self) -> Result<Vec<RevisionId>> {
        let path = self.dir.join(DELETIONS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim()
                    .parse()
                    .map_err(|e: Error| e.context(format!("{}", path.display())))
            })
            .collect()
    }

    /// Records `ids` as deleted: the commit point of a deletion. From here
    /// on they are not listed; [`JobDir::finish_deletions`] removes their
    /// files (now, or after a crash at the next change or start-up). An
    /// unfinished deletion is completed first if it can be; what it cannot
    /// remove yet stays journaled together with `ids`, never dropped.
    pub fn journal_deletions(&self, held: &JobLock, ids: &[RevisionId]) -> Result<()> {
        if let Err(e) = self.finish_deletions(held) {
            tracing::error!(job = %self.name, "{e}");
        }
        let mut all = self.deleting()?;
        for id in ids {
            if !all.contains(id) {
                all.push(*id);
            }
        }
        self.write_deletions(&all)
    }

    fn write_deletions(&self, ids: &[RevisionId]) -> Result<()> {
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        durable::write_atomic(&self.dir.join(DELETIONS_FILE), text.as_bytes())
    }

    /// Removes the files of journaled deletions, `.rev` first (durably),
    /// then the journal. A file that cannot be removed (a read-only or
    /// immutable file, an I/O error) does not stop the others: the journal
    /// then keeps exactly the revisions with a file left (they stay
    /// unlisted), and the first error is returned.
    pub fn finish_deletions(&self, _held: &JobLock) -> Result<()> {
        let ids = self.deleting()?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut first: Option<Error> = None;
        for id in &ids {
            if let Err(e) = remove_path(&self.rev_path(id)) {
                first.get_or_insert(e);
            }
        }
        durable::fsync_dir(&self.dir)?;
        fault::point("delete.rev-removed");
        for id in &ids {
            if let Err(e) = remove_path(&self.image_path(id)) {
                first.get_or_insert(e);
            }
            fault::point("delete.image-removed");
            if let Err(e) = remove_path(&self.digests_path(id)) {
                first.get_or_insert(e);
            }
        }
        durable::fsync_dir(&self.dir)?;
        let left: Vec<RevisionId> = if first.is_none() {
            Vec::new()
        } else {
            ids.iter()
                .filter(|id| {
                    [self.rev_path(id), self.image_path(id), self.digests_path(id)]
                        .iter()
                        .any(|p| p.symlink_metadata().is_ok())
                })
                .copied()
                .collect()
        };
        let first = match first {
            Some(e) if !left.is_empty() => e,
            _ => {
                remove_path(&self.dir.join(DELETIONS_FILE))?;
                return durable::fsync_dir(&self.dir);
            }
        };
        if left.len() < ids.len() {
            self.write_deletions(&left)?;
        }
        let short: Vec<String> = left.iter().map(|id| id.short()).collect();
        Err(first.context(format!(
            "job {}: deleted revisions {} keep files and stay in {DELETIONS_FILE} until they can be removed",
            self.name,
            short.join(", ")
        )))
    }

    /// Points `latest` at the newest committed revision (or removes it).
    /// For people only: the code derives "latest" from metadata.
    pub fn update_latest(&self) -> Result<()> {
        self.point_latest(self.revisions()?.last().map(|r| &r.id))
    }

    /// Points `latest` at `newest` (or removes it), unless it already does:
    /// a store of thousands of jobs is not rewritten and synced for nothing.
    pub fn point_latest(&self, newest: Option<&RevisionId>) -> Result<()> {
        if self.point_latest_unsynced(newest)? {
            durable::fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// [`JobDir::point_latest`] without syncing: `true` when it changed the
    /// link (start-up syncs the filesystem once then).
    pub fn point_latest_unsynced(&self, newest: Option<&RevisionId>) -> Result<bool> {
        let link = self.dir.join(LATEST_LINK);
        let now = std::fs::read_link(&link).ok();
        match newest {
            Some(id) if now.as_deref() == Some(Path::new(&id.short())) => Ok(false),
            // None yet (a first start): made in place, which is atomic too.
            Some(id) if now.is_none() && link.symlink_metadata().is_err() => {
                std::os::unix::fs::symlink(id.short(), &link)
                    .map_err(|e| Error::io(format!("creating symlink {}", link.display()), e))?;
                Ok(true)
            }
            Some(id) => durable::replace_symlink_unsynced(&link, &id.short()).map(|()| true),
            None if now.is_none() => Ok(false),
            None => remove_path(&link).map(|()| true),
        }
    }

    /// Bytes allocated on disk by the job's files.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.path().symlink_metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }
}

fn remove_path(path: &Path) -> Result<()> {
    let r = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| Error::io(format!("removing {}", path.display()), e))
}
