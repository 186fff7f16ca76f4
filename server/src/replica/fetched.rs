//! The source's side: which revision each replica identity last fetched
//! whole, and when (kept in `<base-dir>/.replicas-fetched.yaml`, shown by
//! `status`), so an operator sees from the source whether its second copy
//! keeps up.

use crate::storage::durable;
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
        let fetches = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| {
                serde_yaml::from_str(&t)
                    .map_err(|e| tracing::warn!("{}: {e}; starting afresh", path.display()))
                    .ok()
            })
            .unwrap_or_default();
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
        let text = {
            let mut all = self.lock();
            all.entry(job.clone()).or_default().insert(
                replica.to_string(),
                Fetch {
                    revision,
                    at: Utc::now(),
                },
            );
            serde_yaml::to_string(&*all)
        };
        let saved = text
            .map_err(|e| e.to_string())
            .and_then(|t| durable::write_atomic(&self.path, t.as_bytes()).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            tracing::warn!("recording a replica's fetch in {}: {e}", self.path.display());
        }
    }

    /// What each replica last fetched of `job`, by identity.
    pub fn of(&self, job: &JobName) -> BTreeMap<String, Fetch> {
        self.lock().get(job).cloned().unwrap_or_default()
    }
}
