//! What a replica knows of its copies: which jobs it copies, how each
//! stood at the last round, and when the source was last read whole for
//! it (kept in `<base-dir>/.replication.yaml`, so the lag stays honest
//! across restarts).

use backy_common::config::ServerConfig;
use backy_common::replicate::{listed_by, JobPattern, Lag};
use backy_common::{JobName, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One job's copy as the last round left it.
#[derive(Clone, Debug, Default)]
pub struct JobState {
    /// Source revisions owed and not copied yet.
    pub missing: u32,
    /// The timestamp of the oldest of them.
    pub oldest_missing: Option<DateTime<Utc>>,
    /// When the source's list of this job was last read.
    pub last_round: Option<DateTime<Utc>>,
    /// Why the last round failed for this job; empty when it did not.
    pub last_error: String,
    /// The identity the source last named as the job's client: it may
    /// read and restore the copies here (see [`owner_of`]).
    pub owner: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Saved {
    #[serde(default)]
    jobs: BTreeMap<JobName, SavedJob>,
    /// The copies' directories carry [`COPY_MARKER`]; false in files of
    /// versions before it, whose copies are marked once at load.
    #[serde(default)]
    marked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SavedJob {
    #[serde(default)]
    last_round: Option<DateTime<Utc>>,
    /// Absent in files of versions before it, and for jobs without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

pub struct Replication {
    path: PathBuf,
    /// Per copied job (every job seen in a round, and those saved).
    jobs: Mutex<BTreeMap<JobName, JobState>>,
    /// What the configuration makes of its `jobs:` list now: the copies,
    /// and the listed names refused as jobs of this server's own (why).
    current: Mutex<Current>,
    /// Since when this process runs: the lag of a job never read counts
    /// from here.
    started: DateTime<Utc>,
    /// Wakes the worker before its interval is over (a reload).
    pub wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Current {
    copies: BTreeSet<JobName>,
    refused: BTreeMap<JobName, String>,
}

const STATE_FILE: &str = ".replication.yaml";

/// Marks a job directory as a copy of another server's (written before
/// the first copy lands): a job with revisions and without it is one of
/// this server's own, which no source may take over.
const COPY_MARKER: &str = ".copy";

/// Why `job` cannot be a copy: it is a job of this server's own (it has a
/// client, or revisions that were not copied here). `None`: it may be.
pub fn own_job(config: &ServerConfig, job: &JobName) -> Option<String> {
    let own =
        || format!("job {job} is a job of this server's own: not copied (remove it from replicate: jobs:)");
    if config.jobs.get(job).is_some_and(|j| j.client.is_some()) {
        return Some(own());
    }
    let dir = config.base_dir.join(job.as_str());
    if dir.join(COPY_MARKER).exists() {
        return None;
    }
    let has_revisions = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".rev")))
        })
        .unwrap_or(false);
    has_revisions.then(own)
}

/// The owner a source names for its job (`JobStatus.client`), if it is
/// one: a name an identity could have here (like a job name, bounded);
/// anything else names nobody. Empty: none.
pub fn owner_of(client: &str) -> Option<String> {
    if client.is_empty() {
        return None;
    }
    match JobName::new(client) {
        Ok(_) => Some(client.to_string()),
        Err(_) => {
            tracing::warn!(
                "replication: the source names {:?} as a job's client, which is no identity name: no owner",
                crate::text::clip(client)
            );
            None
        }
    }
}

/// Marks `dir` (a job's directory) as a copy (see [`COPY_MARKER`]).
pub fn mark_copy(dir: &Path, source: &str) -> Result<()> {
    let marker = dir.join(COPY_MARKER);
    if marker.exists() {
        return Ok(());
    }
    crate::storage::durable::write_atomic(&marker, format!("{source}\n").as_bytes())
}

impl Replication {
    /// Loads what earlier runs saved under `base_dir` (nothing if absent
    /// or unreadable: a lost file costs only the lag's history).
    pub fn load(base_dir: &Path) -> Self {
        let path = base_dir.join(STATE_FILE);
        let saved: Saved = super::load_yaml(&path);
        if !saved.marked {
            for name in saved.jobs.keys() {
                let dir = base_dir.join(name.as_str());
                if dir.is_dir() {
                    if let Err(e) = mark_copy(&dir, "(copied before copy markers)") {
                        tracing::warn!(job = %name, "marking an earlier copy: {e}");
                    }
                }
            }
        }
        let jobs = saved
            .jobs
            .into_iter()
            .map(|(name, s)| {
                let state = JobState {
                    last_round: s.last_round,
                    owner: s.owner.and_then(|o| owner_of(&o)),
                    ..Default::default()
                };
                (name, state)
            })
            .collect();
        Replication {
            path,
            jobs: Mutex::new(jobs),
            current: Mutex::default(),
            started: Utc::now(),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobName, JobState>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides again which jobs `config` copies: the names its `jobs:`
    /// lists and the jobs found on the source that its list still matches,
    /// less the jobs of this server's own (refused, with the reason).
    fn refresh(&self, config: &ServerConfig) {
        let mut now = Current::default();
        if let Some(r) = &config.replicate {
            let patterns = r.patterns().unwrap_or_default();
            let known: BTreeSet<JobName> = self.lock().keys().cloned().collect();
            let named = patterns.iter().filter_map(|p| match p {
                JobPattern::Name(n) => Some(n.clone()),
                JobPattern::Prefix(_) => None,
            });
            let found = known.iter().filter(|n| listed_by(&patterns, n)).cloned();
            for name in named.chain(found).collect::<BTreeSet<_>>() {
                match own_job(config, &name) {
                    Some(why) => {
                        now.refused.insert(name, why);
                    }
                    None => {
                        now.copies.insert(name);
                    }
                }
            }
        }
        *self.current() = now;
    }

    /// The jobs `config` copies (see [`Replication::refresh`]).
    pub fn copied(&self, config: &ServerConfig) -> BTreeSet<JobName> {
        if config.replicate.is_none() {
            return BTreeSet::new();
        }
        self.current().copies.clone()
    }

    /// Whether `config` copies `job` (asked per job on hosts of thousands).
    pub fn copies(&self, config: &ServerConfig, job: &JobName) -> bool {
        config.replicate.is_some() && self.current().copies.contains(job)
    }

    /// Why a job the replica lists is not copied (a job of its own).
    pub fn refused(&self, config: &ServerConfig, job: &JobName) -> Option<String> {
        // Without replication nothing is refused (a stale record aside).
        config.replicate.as_ref()?;
        self.current().refused.get(job).cloned()
    }

    /// `config` with every copied job it does not list added as a job of
    /// its own: no schedule (the source's expiry is mirrored), no client;
    /// each copy with the owner its source named (`copy_owner`).
    pub fn effective(&self, mut config: ServerConfig) -> ServerConfig {
        self.refresh(&config);
        for job in config.jobs.values_mut() {
            job.copy_owner = None;
        }
        let copied = self.copied(&config);
        let jobs = self.lock();
        for name in copied {
            let owner = jobs.get(&name).and_then(|s| s.owner.clone());
            config.jobs.entry(name).or_default().copy_owner = owner;
        }
        config
    }

    /// Records the owner the source names for `job` now; true if it
    /// changed (the configuration then follows, see [`Self::effective`]).
    pub fn owned(&self, job: &JobName, owner: Option<String>) -> bool {
        let mut jobs = self.lock();
        let state = jobs.entry(job.clone()).or_default();
        let changed = state.owner != owner;
        state.owner = owner;
        changed
    }

    /// Records jobs found on the source; true if any was new.
    pub fn found(&self, names: &[JobName]) -> bool {
        let mut jobs = self.lock();
        let mut new = false;
        for n in names {
            if !jobs.contains_key(n) {
                jobs.insert(n.clone(), JobState::default());
                new = true;
            }
        }
        new
    }

    /// Forgets a job found on the source that it no longer lists and of
    /// which nothing was copied: it is no longer listed here.
    pub fn forget(&self, job: &JobName) {
        self.lock().remove(job);
    }

    /// The jobs found on the source so far.
    pub fn known(&self) -> BTreeSet<JobName> {
        self.lock().keys().cloned().collect()
    }

    pub fn update(&self, job: &JobName, f: impl FnOnce(&mut JobState)) {
        f(self.lock().entry(job.clone()).or_default());
    }

    /// The source's list of `job` was read at `at`: `lag` is what it owes.
    pub fn listed(&self, job: &JobName, at: DateTime<Utc>, lag: &Lag) {
        self.update(job, |s| {
            s.last_round = Some(at);
            s.missing = u32::try_from(lag.missing).unwrap_or(u32::MAX);
            s.oldest_missing =
                (lag.missing > 0).then(|| at - chrono::Duration::from_std(lag.behind).unwrap_or_default());
        });
    }

    pub fn get(&self, job: &JobName) -> JobState {
        self.lock().get(job).cloned().unwrap_or_default()
    }

    /// How far behind `job`'s copy is at `now`, at least: the age of the
    /// oldest revision owed, or the time since the source's list was last
    /// read (since start if never), whichever is more.
    pub fn lag(&self, job: &JobName, now: DateTime<Utc>) -> std::time::Duration {
        let s = self.get(job);
        let since_read = now - s.last_round.unwrap_or(self.started);
        let owed = s.oldest_missing.map(|t| now - t).unwrap_or_default();
        since_read.max(owed).to_std().unwrap_or_default()
    }

    /// Saves the time of each job's last read.
    pub fn save(&self) -> Result<()> {
        let saved = Saved {
            jobs: self
                .lock()
                .iter()
                .map(|(n, s)| {
                    (
                        n.clone(),
                        SavedJob {
                            last_round: s.last_round,
                            owner: s.owner.clone(),
                        },
                    )
                })
                .collect(),
            marked: true,
        };
        super::save_yaml(&self.path, &saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base: &Path, jobs: &str) -> ServerConfig {
        let text = format!(
            "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\n\
             clients:\n  hv01: {{token-hash: 'blake3:{}'}}\n  rep: {{role: replica, token-hash: 'blake3:{}'}}\n\
             jobs:\n{jobs}\nreplicate: {{source: 'http://127.0.0.1:1', jobs: [mine, fresh, 'web-*']}}\n",
            base.display(),
            "0".repeat(64),
            "1".repeat(64),
        );
        ServerConfig::from_yaml(&text, "server.yaml").unwrap()
    }

    /// Issue 29, item 5: the owner a source names is kept per copy across
    /// a restart (a file of an older version has none), set on the copy as
    /// `copy_owner` (never `client`), and a name no identity could have
    /// names nobody.
    #[test]
    fn a_copy_keeps_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let n = |s: &str| JobName::new(s).unwrap();
        std::fs::write(
            base.join(STATE_FILE),
            "jobs:\n  fresh: {last-round: 2026-12-01T00:00:00Z}\nmarked: true\n",
        )
        .unwrap();
        let r = Replication::load(base);
        assert_eq!(r.get(&n("fresh")).owner, None, "an older file");
        assert!(r.owned(&n("fresh"), owner_of("hv01")));
        assert!(!r.owned(&n("fresh"), owner_of("hv01")), "unchanged");
        r.save().unwrap();
        let r = Replication::load(base);
        let cfg = r.effective(config(base, "  mine: {schedule: none, client: hv01}"));
        let fresh = cfg.jobs.get(&n("fresh")).unwrap();
        assert_eq!(
            (fresh.copy_owner.as_deref(), fresh.client.as_deref()),
            (Some("hv01"), None)
        );
        assert_eq!(cfg.jobs.get(&n("mine")).unwrap().copy_owner, None);
        assert_eq!(owner_of("../etc"), None);
        assert_eq!(owner_of(&"x".repeat(10_000)), None);
        assert_eq!(owner_of(""), None);
    }

    /// Issue 28, item 2: a listed job of the replica's own (a client, or
    /// revisions not copied here) is refused, never a copy; a marked copy
    /// and a job with nothing yet are copies.
    #[test]
    fn own_jobs_are_refused_copies_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let cfg = config(
            base,
            "  mine: {schedule: none, client: hv01}\n  web-1: {schedule: none}",
        );
        let n = |s: &str| JobName::new(s).unwrap();
        std::fs::create_dir_all(base.join("web-1")).unwrap();
        std::fs::write(base.join("web-1/AAAAAAAAAAAAAAAAAAAAAA.rev"), "x").unwrap();
        let r = Replication::load(base);
        r.found(&[n("web-1"), n("web-2")]);
        let cfg = r.effective(cfg);
        assert!(r
            .refused(&cfg, &n("mine"))
            .unwrap()
            .contains("is a job of this server's own"));
        assert!(
            r.refused(&cfg, &n("web-1")).is_some(),
            "revisions without the marker"
        );
        assert!(!r.copies(&cfg, &n("mine")) && !r.copies(&cfg, &n("web-1")));
        assert!(r.copies(&cfg, &n("fresh")) && r.copies(&cfg, &n("web-2")));
        mark_copy(&base.join("web-1"), "http://127.0.0.1:1").unwrap();
        let cfg = r.effective(cfg);
        assert!(r.copies(&cfg, &n("web-1")), "a marked copy");
        // A job the list no longer matches is no copy.
        let mut other = cfg.clone();
        if let Some(rc) = other.replicate.as_mut() {
            rc.jobs = vec!["fresh".into()];
        }
        let other = r.effective(other);
        assert!(!r.copies(&other, &n("web-2")));
    }
}
