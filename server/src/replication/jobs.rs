//! What a replica knows of its copies: which jobs it copies, how each
//! stood at the last round, and when the source was last read whole for
//! it (kept in `<base-dir>/.replication.yaml`, so the lag stays honest
//! across restarts).

use backy_common::config::{ReplicateConfig, ServerConfig};
use backy_common::replicate::Lag;
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
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Saved {
    #[serde(default)]
    jobs: BTreeMap<JobName, SavedJob>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SavedJob {
    #[serde(default)]
    last_round: Option<DateTime<Utc>>,
}

pub struct Replication {
    path: PathBuf,
    /// Per copied job (every job seen in a round, and those saved).
    jobs: Mutex<BTreeMap<JobName, JobState>>,
    /// Since when this process runs: the lag of a job never read counts
    /// from here.
    started: DateTime<Utc>,
    /// Wakes the worker before its interval is over (a reload).
    pub wake: tokio::sync::Notify,
}

const STATE_FILE: &str = ".replication.yaml";

impl Replication {
    /// Loads what earlier runs saved under `base_dir` (nothing if absent
    /// or unreadable: a lost file costs only the lag's history).
    pub fn load(base_dir: &Path) -> Self {
        let path = base_dir.join(STATE_FILE);
        let saved: Saved = super::load_yaml(&path);
        let jobs = saved
            .jobs
            .into_iter()
            .map(|(name, s)| {
                let state = JobState {
                    last_round: s.last_round,
                    ..Default::default()
                };
                (name, state)
            })
            .collect();
        Replication {
            path,
            jobs: Mutex::new(jobs),
            started: Utc::now(),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobName, JobState>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The jobs `config` copies: its `replicate.jobs`, or every job a
    /// round has found on the source.
    pub fn copied(&self, config: &ServerConfig) -> BTreeSet<JobName> {
        match &config.replicate {
            None => BTreeSet::new(),
            Some(ReplicateConfig { jobs: Some(list), .. }) => list.iter().cloned().collect(),
            Some(_) => self.lock().keys().cloned().collect(),
        }
    }

    /// Whether `config` copies `job` (what [`Replication::copied`] holds,
    /// without building the set: asked per job on hosts of thousands).
    pub fn copies(&self, config: &ServerConfig, job: &JobName) -> bool {
        match &config.replicate {
            None => false,
            Some(ReplicateConfig { jobs: Some(list), .. }) => list.contains(job),
            Some(_) => self.lock().contains_key(job),
        }
    }

    /// `config` with every copied job it does not list added as a job of
    /// its own: no schedule (the source's expiry is mirrored), no client.
    pub fn effective(&self, mut config: ServerConfig) -> ServerConfig {
        for name in self.copied(&config) {
            config.jobs.entry(name).or_default();
        }
        config
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
                        },
                    )
                })
                .collect(),
        };
        super::save_yaml(&self.path, &saved)
    }
}
