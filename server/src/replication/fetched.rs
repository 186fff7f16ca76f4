//! The source's side: which revision each replica identity last fetched
//! whole, and when (kept in `<base-dir>/.replicas-fetched.yaml`, shown by
//! `status`), so an operator sees from the source whether its second copy
//! keeps up.

use backy_common::{JobName, RevisionId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    pub revision: RevisionId,
    pub at: DateTime<Utc>,
}

/// Job → replica identity → its last whole fetch.
type Fetches = BTreeMap<JobName, BTreeMap<String, Fetch>>;

pub struct FetchLog {
    path: PathBuf,
    fetches: Mutex<Fetches>,
}

const LOG_FILE: &str = ".replicas-fetched.yaml";

impl FetchLog {
    pub fn load(base_dir: &Path) -> Self {
        let path = base_dir.join(LOG_FILE);
        let fetches = super::load_yaml(&path);
        FetchLog {
            path,
            fetches: Mutex::new(fetches),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fetches> {
        self.fetches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `replica` received the whole of `revision` of `job`. A failure to
    /// save is logged: the record is a report, not a part of any backup.
    pub fn record(&self, job: &JobName, replica: &str, revision: RevisionId) {
        let mut all = self.lock();
        let fetch = Fetch {
            revision,
            at: Utc::now(),
        };
        all.entry(job.clone())
            .or_default()
            .insert(replica.to_string(), fetch);
        if let Err(e) = super::save_yaml(&self.path, &*all) {
            tracing::warn!("recording a replica's fetch in {}: {e}", self.path.display());
        }
    }

    /// What each replica last fetched of `job`, by identity.
    pub fn of(&self, job: &JobName) -> BTreeMap<String, Fetch> {
        self.lock().get(job).cloned().unwrap_or_default()
    }
}
