//! Server and client configuration files (YAML), validated at load.

use crate::error::{Error, Result};
use crate::job::JobName;
use crate::source::SourceSpec;
use crate::units::Interval;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6023";
pub const DEFAULT_SERVER_CONFIG: &str = "/etc/backy/server.yaml";
pub const DEFAULT_CLIENT_CONFIG: &str = "/etc/backy/client.yaml";

/// One tag of a schedule: how often, and how many to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRule {
    pub interval: Interval,
    pub keep: u32,
}

/// A schedule: tag name → rule.
pub type Schedule = BTreeMap<String, TagRule>;

/// One job as the server knows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobConfig {
    /// Name of a schedule; none: pushes are always due and nothing expires.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Client identity that may push and restore this job.
    #[serde(default)]
    pub client: Option<String>,
    /// What to back up (handed to the client in the plan).
    #[serde(default)]
    pub source: Option<SourceSpec>,
    /// Largest image accepted for this job (bytes, or with K/M/G/T).
    #[serde(default, with = "opt_size")]
    pub max_size: Option<u64>,
}

/// `backy-server`'s configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    pub base_dir: PathBuf,
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub schedules: BTreeMap<String, Schedule>,
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub jobs: BTreeMap<JobName, JobConfig>,
    /// Resuming interrupted pushes.
    #[serde(default)]
    pub resume: ResumeConfig,
    /// Periodic re-verification of stored revisions.
    #[serde(default)]
    pub scrub: ScrubConfig,
}

/// The background scrub: every revision re-read and checked against its
/// manifest at least once per `interval`, at most `rate` bytes/s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScrubConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_scrub_interval")]
    pub interval: Interval,
    /// Read rate limit in bytes per second (with K/M/G); 0: unlimited.
    #[serde(default = "default_scrub_rate", with = "size")]
    pub rate: u64,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            enabled: true,
            interval: default_scrub_interval(),
            rate: default_scrub_rate(),
        }
    }
}

fn default_scrub_interval() -> Interval {
    Interval::from_secs(30 * 86400)
}

fn default_scrub_rate() -> u64 {
    50 << 20
}

/// How interrupted pushes are kept for resuming.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResumeConfig {
    /// Keep an interrupted push's partial revision; off: discard it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long after its last checkpoint an interrupted push may resume.
    #[serde(default = "default_resume_window")]
    pub window: Interval,
    /// Received bytes between durable checkpoints during a push (a broken
    /// connection always checkpoints at once; a crash loses at most this).
    #[serde(default = "default_checkpoint", with = "size")]
    pub checkpoint: u64,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig {
            enabled: true,
            window: default_resume_window(),
            checkpoint: default_checkpoint(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_resume_window() -> Interval {
    Interval::from_secs(6 * 3600)
}

fn default_checkpoint() -> u64 {
    1 << 30
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

impl ServerConfig {
    /// Parses and validates; `what` names the file in errors.
    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        let cfg: ServerConfig =
            serde_yaml::from_str(text).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        cfg.validate().map_err(|e| e.context(what))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| Error::invalid(format!("listen: {:?} is not an address:port", self.listen)))?;
        if !self.base_dir.is_absolute() {
            return Err(Error::invalid(format!(
                "base-dir {:?} must be an absolute path",
                self.base_dir
            )));
        }
        for (name, schedule) in &self.schedules {
            if schedule.is_empty() {
                return Err(Error::invalid(format!("schedule {name:?} has no tags")));
            }
            for (tag, rule) in schedule {
                crate::revision::check_tag(tag).map_err(|e| e.context(format!("schedule {name:?}")))?;
                if crate::revision::is_manual_tag(tag) {
                    return Err(Error::invalid(format!(
                        "schedule {name:?}: tag {tag:?} must not start with 'manual:'"
                    )));
                }
                if rule.keep == 0 {
                    return Err(Error::invalid(format!(
                        "schedule {name:?}, tag {tag:?}: keep must be at least 1"
                    )));
                }
            }
        }
        if self.resume.checkpoint < crate::MAX_FRAME_DATA as u64 {
            return Err(Error::invalid(format!(
                "resume checkpoint {} is below the minimum of 1M",
                self.resume.checkpoint
            )));
        }
        for (job, cfg) in &self.jobs {
            if let Some(s) = &cfg.schedule {
                if !self.schedules.contains_key(s) {
                    return Err(Error::invalid(format!("job {job}: unknown schedule {s:?}")));
                }
            }
        }
        Ok(())
    }

    pub fn job(&self, name: &JobName) -> Result<&JobConfig> {
        self.jobs
            .get(name)
            .ok_or_else(|| Error::not_found(format!("unknown job {name}")))
    }

    /// The schedule of a job, if it has one.
    pub fn schedule_of(&self, job: &JobConfig) -> Option<&Schedule> {
        job.schedule.as_ref().and_then(|s| self.schedules.get(s))
    }
}

/// `backy-client`'s configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientConfig {
    /// Server URL, e.g. `http://127.0.0.1:6023`.
    #[serde(default)]
    pub server: Option<String>,
}

impl ClientConfig {
    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| Error::invalid(format!("{what}: {e}")))
    }
}

/// YAML maps where a repeated key is an error, not "last one wins".
mod unique_keys {
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + fmt::Display,
        V: Deserialize<'de>,
    {
        struct V2<K, V>(PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for V2<K, V>
        where
            K: Deserialize<'de> + Ord + fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = BTreeMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map with unique names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<K, V>()? {
                    let name = k.to_string();
                    if out.insert(k, v).is_some() {
                        return Err(serde::de::Error::custom(format!("duplicate name {name:?}")));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V2(PhantomData))
    }
}

mod size {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        super::opt_size::deserialize(d)?.ok_or_else(|| serde::de::Error::custom("a size is required"))
    }
}

mod opt_size {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::N(n)) => Ok(Some(n)),
            Some(Raw::S(s)) => crate::units::parse_bytes(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:7000
base-dir: /srv/backy
schedules:
  default:
    daily:   {interval: 1d, keep: 9}
    weekly:  {interval: 7d, keep: 5}
jobs:
  vm1:
    schedule: default
    client: hv01
    source: {type: ceph-rbd, pool: rbd, image: vm1.root}
    max-size: 100G
  vm2: {}
"#;

    #[test]
    fn loads_good_config() {
        let cfg = ServerConfig::from_yaml(GOOD, "server.yaml").unwrap();
        let vm1 = cfg.job(&JobName::new("vm1").unwrap()).unwrap();
        assert_eq!(vm1.max_size, Some(100 << 30));
        assert_eq!(cfg.schedule_of(vm1).unwrap()["weekly"].interval.secs(), 7 * 86400);
        assert!(cfg.job(&JobName::new("vm3").unwrap()).is_err());
    }

    #[test]
    fn refuses_bad_configs() {
        let cases = [
            (
                GOOD.replace("schedule: default", "schedule: nope"),
                "unknown schedule",
            ),
            (GOOD.replace("keep: 9", "keep: 0"), "keep must be at least 1"),
            (GOOD.replace("interval: 1d", "interval: 0d"), "longer than zero"),
            (GOOD.replace("vm2: {}", "../x: {}"), "invalid job name"),
            (GOOD.replace("vm2: {}", "vm1: {}"), "duplicate"),
            (GOOD.replace("base-dir: /srv/backy", "base-dir: rel"), "absolute"),
            (
                GOOD.replace("listen: 127.0.0.1:7000", "listen: nowhere"),
                "listen",
            ),
            (GOOD.replace("client: hv01", "clinet: hv01"), "unknown field"),
        ];
        for (text, want) in cases {
            let e = ServerConfig::from_yaml(&text, "server.yaml").unwrap_err();
            assert!(e.message.contains(want), "want {want:?} in {:?}", e.message);
            assert!(e.message.starts_with("server.yaml"), "{}", e.message);
        }
    }
}
