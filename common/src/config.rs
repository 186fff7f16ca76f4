//! Server and client configuration files (YAML), validated at load.

use crate::error::{Error, Result};
use crate::job::JobName;
use crate::source::SourceSpec;
use crate::tracker_audit::SamplePercent;
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

/// The key of a schedule (or job) that is not a tag: how long each
/// revision is kept from any deletion after it was taken (docs/DESIGN.md,
/// "Retention lock").
pub const RETENTION_LOCK: &str = "retention-lock";

/// A schedule as `schedules:` writes it: its tags, and optionally
/// `retention-lock: DURATION` for the revisions of its jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub tags: Schedule,
    pub retention_lock: Option<Interval>,
}

impl Serialize for ScheduleConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (tag, rule) in &self.tags {
            map.serialize_entry(tag, rule)?;
        }
        if let Some(lock) = &self.retention_lock {
            map.serialize_entry(RETENTION_LOCK, lock)?;
        }
        map.end()
    }
}

/// Each key is a tag, but `retention-lock`. Keys are read as the text they
/// are (`7:` is the tag "7", which validation then refuses by name).
impl<'de> Deserialize<'de> for ScheduleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let raw = BTreeMap::<String, serde_yaml::Value>::deserialize(d)?;
        let mut out = ScheduleConfig::default();
        for (key, value) in raw {
            if key == RETENTION_LOCK {
                let lock = serde_yaml::from_value(value)
                    .map_err(|e| D::Error::custom(format!("{RETENTION_LOCK}: {e}")))?;
                out.retention_lock = Some(lock);
            } else {
                let rule = serde_yaml::from_value(value)
                    .map_err(|e| D::Error::custom(format!("tag {key:?}: {e}")))?;
                out.tags.insert(key, rule);
            }
        }
        Ok(out)
    }
}

/// One job as the server knows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobConfig {
    /// Name of a schedule (required). `none` (`None` here): no schedule:
    /// the agent never orders a push, a push run by hand always runs,
    /// nothing expires, and there is no SLA.
    #[serde(with = "schedule_name")]
    pub schedule: Option<String>,
    /// Client identity that may push and restore this job.
    #[serde(default)]
    pub client: Option<String>,
    /// Refused: what a job reads and runs (its source and hooks) is the
    /// hypervisor's to decide, in its `client.yaml`. Kept only to say so
    /// and for `backy-server migrate-sources`.
    #[serde(default, rename = "source", skip_serializing)]
    pub moved_source: Option<serde_yaml::Value>,
    /// Refused like `source` (hooks belong with the source).
    #[serde(default, rename = "hooks", skip_serializing)]
    pub moved_hooks: Option<serde_yaml::Value>,
    /// Largest image accepted for this job (bytes, or with K/M/G/T).
    #[serde(default, with = "opt_size")]
    pub max_size: Option<u64>,
    /// Replaces the schedule's `retention-lock` for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_lock: Option<Interval>,
    /// On a replica, of a copied job: the identity the source named as its
    /// client, which may read and restore the copies here (never push).
    /// Not configuration: set from the replication records, and not a
    /// `client` (that would make the job one of the replica's own).
    #[serde(skip)]
    pub copy_owner: Option<String>,
}

/// `backy-server`'s configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the HTTP listener for the status page, `/metrics`,
    /// `/healthz` and `/readyz`; unset: none. HTTPS with the `tls:`
    /// certificate when that is configured, which any address other than
    /// loopback requires (as `listen` does).
    #[serde(default)]
    pub http_listen: Option<String>,
    pub base_dir: PathBuf,
    /// Where revisions live: unset, the filesystem under `base-dir`; or a
    /// Ceph pool (issue 36, in progress: docs/DESIGN.md "Ceph pool store").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreConfig>,
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub schedules: BTreeMap<String, ScheduleConfig>,
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub jobs: BTreeMap<JobName, JobConfig>,
    /// Resuming interrupted pushes.
    #[serde(default)]
    pub resume: ResumeConfig,
    /// Periodic re-verification of stored revisions.
    #[serde(default)]
    pub scrub: ScrubConfig,
    /// TLS for every connection (required unless `insecure-plaintext`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plain TCP: only on a loopback `listen` address (tests, demo).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Client identities; none (plaintext loopback only): everyone may do
    /// everything, as on a single host.
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub clients: BTreeMap<String, ClientIdentity>,
    #[serde(default)]
    pub limits: Limits,
    /// Which stored blocks may spare a push sending a block (docs/DESIGN.md,
    /// "Deduplication").
    #[serde(default)]
    pub dedup: DedupScope,
    /// Mode of revision files: 0600 (default) or 0640 (directories follow:
    /// 0700 or 0750).
    #[serde(default = "default_file_mode", with = "file_mode")]
    pub file_mode: u32,
    /// The group that may read the secrets (this config when it holds
    /// token hashes, the TLS key): such files must be 0600, or 0640 owned
    /// by this group. Unset: 0600 only.
    #[serde(default)]
    pub secrets_group: Option<String>,
    /// Copy another server's revisions here (this server is then its
    /// replica for those jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicate: Option<ReplicateConfig>,
}

/// The store of revisions other than the filesystem under `base-dir`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum StoreConfig {
    /// One RBD image per job in a Ceph pool, one snapshot per revision.
    CephRbd(CephStoreConfig),
}

/// `store: {type: ceph-rbd, ...}`: the cluster, the identity and the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CephStoreConfig {
    /// A ceph.conf naming the monitors.
    pub conf: PathBuf,
    /// The cephx id, without `client.`.
    pub id: String,
    /// Its keyring; unset: the one the conf names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    pub pool: String,
    /// A RADOS namespace in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// How long a job's lease lasts without a renewal: after a holder
    /// dies, another server takes its jobs this long after its last
    /// renewal.
    #[serde(default = "default_lease")]
    pub lease: Interval,
    /// How often a holder renews its leases.
    #[serde(default = "default_lease_renewal")]
    pub lease_renewal: Interval,
    /// A holder stops writing this long before its lease could expire
    /// (clock rate differences, a slow reply).
    #[serde(default = "default_lease_margin")]
    pub lease_margin: Interval,
    /// Bounds every call to the cluster.
    #[serde(default = "default_op_timeout")]
    pub op_timeout: Interval,
}

fn default_lease() -> Interval {
    Interval::from_secs(30)
}

fn default_lease_renewal() -> Interval {
    Interval::from_secs(10)
}

fn default_lease_margin() -> Interval {
    Interval::from_secs(5)
}

fn default_op_timeout() -> Interval {
    Interval::from_secs(30)
}

/// Whose stored blocks a push may be told about. Unless `off`, written
/// blocks are deduplicated across the whole store: the client never learns
/// of those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DedupScope {
    /// No deduplication: every changed block is sent and written.
    Off,
    /// Blocks held by jobs of the same client identity (the pushing one
    /// may reach them anyway): nobody learns what another client stores.
    #[default]
    Client,
    /// Blocks held by any job of this server: more saved, but a client
    /// learns whether a block it names exists somewhere on the host.
    Host,
}

/// Pull replication from a source server (docs/DESIGN.md, "Replication").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplicateConfig {
    /// The source server's URL (`https://host:port`; `http://` only to a
    /// loopback address).
    pub source: String,
    /// CA certificate the source's certificate must chain to (default:
    /// the system's trust store).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The token of this server's `replica` identity on the source.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Client certificate and key for a source that uses mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the source's certificate carries, if not the URL's host.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// The jobs to copy (required): names, or prefixes written `web-*`
    /// (`*` alone: every job the source shows this identity). A source can
    /// make this server copy nothing it does not list (issue 28).
    #[serde(default)]
    pub jobs: Vec<String>,
    /// The most jobs the prefixes may bring in, names included; what a
    /// source lists beyond it is not copied, and reported.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// How often to look for new revisions.
    #[serde(default = "default_replicate_interval")]
    pub interval: Interval,
    /// `check` warns when the oldest revision not yet copied is older.
    #[serde(default = "default_lag_warning")]
    pub lag_warning: Interval,
    /// ... and is critical from this age on.
    #[serde(default = "default_lag_critical")]
    pub lag_critical: Interval,
    /// Bytes a second the copies from the source may take (issue 34);
    /// unset: no limit.
    #[serde(default, with = "opt_rate", skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
}

fn default_max_jobs() -> usize {
    1000
}

fn default_replicate_interval() -> Interval {
    Interval::from_secs(300)
}

fn default_lag_warning() -> Interval {
    Interval::from_secs(6 * 3600)
}

fn default_lag_critical() -> Interval {
    Interval::from_secs(86400)
}

impl ReplicateConfig {
    fn validate(&self) -> Result<()> {
        let bad = |why: String| Error::invalid(format!("replicate: {why}"));
        let not_url = || {
            bad(format!(
                "source {:?} is not a URL like https://backup01:6023",
                self.source
            ))
        };
        let (scheme, authority) = self.source.split_once("://").ok_or_else(not_url)?;
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        if authority.is_empty() || authority.contains(['/', '?', '@', ' ']) {
            return Err(not_url());
        }
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => h,
            _ if authority.starts_with('[') || !authority.contains(':') => authority,
            _ => return Err(not_url()),
        };
        match Some(scheme) {
            Some("https") => {}
            Some("http") if is_loopback_host(host) => {
                if self.ca.is_some() || self.cert.is_some() || self.tls_server_name.is_some() {
                    return Err(bad(format!(
                        "TLS settings given for the plaintext source {}",
                        self.source
                    )));
                }
            }
            Some("http") => {
                return Err(bad(format!(
                    "source {} is plaintext: only a loopback source may be; use https://",
                    self.source
                )))
            }
            _ => {
                return Err(bad(format!(
                    "source {:?} is not a URL like https://backup01:6023",
                    self.source
                )))
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(bad("give both cert and key for a client certificate".into()));
        }
        if self.interval.secs() < 10 {
            return Err(bad(format!(
                "interval {} is below the minimum of 10s",
                self.interval
            )));
        }
        if self.lag_warning >= self.lag_critical {
            return Err(bad(format!(
                "lag-warning {} must be shorter than lag-critical {}",
                self.lag_warning, self.lag_critical
            )));
        }
        if self.jobs.is_empty() {
            return Err(bad(
                "jobs: is missing or empty: list the jobs to copy (names, or a prefix like web-*; \
                 \"*\" copies every job the source shows, up to max-jobs)"
                    .into(),
            ));
        }
        let patterns = self.patterns()?;
        let names = patterns
            .iter()
            .filter(|p| matches!(p, crate::replicate::JobPattern::Name(_)))
            .count();
        if self.max_jobs == 0 || names > self.max_jobs {
            return Err(bad(format!(
                "max-jobs {} is below the {names} job names listed",
                self.max_jobs
            )));
        }
        Ok(())
    }

    /// The `jobs:` list, parsed.
    pub fn patterns(&self) -> Result<Vec<crate::replicate::JobPattern>> {
        self.jobs
            .iter()
            .map(|j| {
                crate::replicate::JobPattern::parse(j)
                    .map_err(|e| Error::invalid(format!("replicate: jobs: {}", e.message)))
            })
            .collect()
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Server certificate and key (PEM files); `client-ca` turns on mutual TLS:
/// every client must present a certificate signed by it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// What an identity may do (README, "Security", has the table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Adds backups, never removes them: plan, push, restore, verify, add
    /// tags and see the status of the jobs whose `client` it is; run an
    /// agent under its name. Removing revisions or tags (forget, distrust,
    /// tags set/remove, `--allow-unscheduled`) only with `may-remove: true`,
    /// so a stolen hypervisor token cannot wipe its history.
    #[default]
    Hypervisor,
    /// Status and check of every job; nothing else.
    ReadOnly,
    /// Everything on every job, agents under any name.
    Admin,
    /// A second server copying revisions: status, manifests and revision
    /// data of its `jobs` (all when unset); it changes nothing.
    Replica,
    /// A person looking after backups: everything on its `jobs` (every
    /// job when unset), removing included; runs no agent.
    Operator,
}

impl Role {
    /// The name `role:` takes in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Hypervisor => "hypervisor",
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
            Role::Replica => "replica",
            Role::Operator => "operator",
        }
    }
}

/// One client identity: a bearer token (stored hashed), a client
/// certificate (mutual TLS), or both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientIdentity {
    #[serde(default)]
    pub role: Role,
    /// `blake3:<hex>` from `backy-server hash-token`.
    #[serde(default)]
    pub token_hash: Option<String>,
    /// `blake3:<hex>` of the client certificate (DER), from
    /// `backy-server cert-fingerprint FILE`.
    #[serde(default)]
    pub cert_fingerprint: Option<String>,
    /// For a `replica`: the jobs it may copy; for an `operator`: the jobs
    /// it looks after (default: every job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<JobName>>,
    /// For a `hypervisor`: may also remove revisions and tags of its jobs
    /// (the rights every hypervisor had before roles were split).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_remove: bool,
}

/// Bounds on what one client may hold open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Push, restore, verify and manifest streams one identity may have
    /// open at once; more are refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_streams")]
    pub streams_per_client: u32,
    /// A push stream with no frame for this long is dropped (clients send
    /// keepalive frames while scanning unchanged data).
    #[serde(default = "default_idle")]
    pub idle_timeout: Interval,
    /// Connections open at once (a further one first displaces a
    /// connection that has made no request yet, else the least recently
    /// used idle one, else waits). Also at most half the server's
    /// descriptor limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Authenticated connections one identity may hold: one more closes its
    /// least recently used idle one, or is refused with RESOURCE_EXHAUSTED
    /// when all are busy. Not applied without identities (loopback).
    #[serde(default = "default_connections_per_client")]
    pub connections_per_client: u32,
    /// An authenticated connection with no request in flight for this long
    /// is closed (clients reconnect when they next need one).
    #[serde(default = "default_idle_connection")]
    pub idle_connection_timeout: Interval,
    /// Time a new connection has to complete its TLS handshake, HTTP/2
    /// preface and first authenticated request; closed otherwise.
    #[serde(default = "default_first_request")]
    pub first_request_timeout: Interval,
    /// Push, restore, verify, manifest and listing streams the server runs
    /// at once, all callers together: each holds a thread of the stream
    /// executor (never one of the threads unary calls use); more are
    /// refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
}

fn default_max_streams() -> u32 {
    256
}

fn default_max_connections() -> u32 {
    4096
}

fn default_connections_per_client() -> u32 {
    32
}

fn default_idle_connection() -> Interval {
    Interval::from_secs(300)
}

fn default_first_request() -> Interval {
    Interval::from_secs(10)
}

fn default_streams() -> u32 {
    16
}

fn default_idle() -> Interval {
    Interval::from_secs(120)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            streams_per_client: default_streams(),
            idle_timeout: default_idle(),
            max_connections: default_max_connections(),
            connections_per_client: default_connections_per_client(),
            idle_connection_timeout: default_idle_connection(),
            first_request_timeout: default_first_request(),
            max_streams: default_max_streams(),
        }
    }
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

fn default_file_mode() -> u32 {
    DEFAULT_FILE_MODE
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

impl CephStoreConfig {
    fn validate(&self) -> Result<()> {
        for (key, path) in [("conf", Some(&self.conf)), ("keyring", self.keyring.as_ref())] {
            if let Some(p) = path.filter(|p| !p.is_absolute()) {
                return Err(Error::invalid(format!(
                    "store: {key} {p:?} must be an absolute path"
                )));
            }
        }
        if self.id.is_empty() || self.id.starts_with("client.") {
            return Err(Error::invalid(format!(
                "store: id {:?}: give the cephx id without `client.`",
                self.id
            )));
        }
        if self.pool.is_empty() {
            return Err(Error::invalid("store: pool is empty"));
        }
        if self.namespace.as_deref() == Some("") {
            return Err(Error::invalid(
                "store: namespace is empty (leave it out for none)",
            ));
        }
        // Intervals are never zero (the parser refuses "0s").
        self.lease_times()?;
        Ok(())
    }

    /// The lease's timing from `lease`, `lease-renewal` and `lease-margin`:
    /// a holder renews before it must stop writing, and stops before
    /// another server can take the job.
    pub fn lease_times(&self) -> Result<crate::lease::LeaseTimes> {
        let ms = |i: Interval| i.secs().saturating_mul(1000);
        crate::lease::LeaseTimes::new(ms(self.lease), ms(self.lease_renewal), ms(self.lease_margin)).map_err(
            |_| {
                Error::invalid(format!(
                    "store: lease-renewal {} must be more than 0 and less than lease {} less \
                     lease-margin {}",
                    self.lease_renewal, self.lease, self.lease_margin
                ))
            },
        )
    }
}

impl ServerConfig {
    /// The Ceph pool store, when revisions live in one.
    pub fn ceph_store(&self) -> Option<&CephStoreConfig> {
        match &self.store {
            Some(StoreConfig::CephRbd(c)) => Some(c),
            None => None,
        }
    }

    /// Parses and validates; `what` names the file in errors.
    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        let cfg: ServerConfig = serde_yaml::from_str(text).map_err(|e| {
            let mut msg = format!("{what}: {e}");
            if msg.contains("missing field `schedule`") {
                msg.push_str(&format!(
                    " (every job names its schedule, or says `schedule: {NO_SCHEDULE}` for manual pushes only)"
                ));
            }
            Error::invalid(msg)
        })?;
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
            if name == NO_SCHEDULE {
                return Err(Error::invalid(format!(
                    "schedules: {NO_SCHEDULE:?} is reserved (a job's `schedule: {NO_SCHEDULE}` means no schedule)"
                )));
            }
            if schedule.tags.is_empty() {
                return Err(Error::invalid(format!("schedule {name:?} has no tags")));
            }
            for (tag, rule) in &schedule.tags {
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
            if cfg.moved_source.is_some() || cfg.moved_hooks.is_some() {
                return Err(Error::invalid(format!(
                    "job {job}: `source:` and `hooks:` moved to the hypervisor's client.yaml \
                     (jobs: {job}: source: ...); `backy-server migrate-sources` prints that part"
                )));
            }
            if let Some(s) = &cfg.schedule {
                if !self.schedules.contains_key(s) {
                    return Err(Error::invalid(format!("job {job}: unknown schedule {s:?}")));
                }
            }
            if let Some(c) = &cfg.client {
                if !self.clients.is_empty() && !self.clients.contains_key(c) {
                    return Err(Error::invalid(format!(
                        "job {job}: client {c:?} is not listed under clients"
                    )));
                }
            }
        }
        if let Some(r) = &self.replicate {
            r.validate()?;
        }
        if let Some(StoreConfig::CephRbd(c)) = &self.store {
            c.validate()?;
        }
        self.validate_security()
    }

    /// Why `new` cannot replace this running configuration on a reload
    /// (SIGHUP): the listener, the storage root, the transport and file
    /// modes are fixed at start, and a reload that pretended to change them
    /// would, say, list TLS identities while still serving plaintext.
    /// `None`: `new` may take over.
    pub fn reload_refusal(&self, new: &ServerConfig) -> Option<String> {
        let fixed: [(&str, bool); 7] = [
            ("store", self.store != new.store),
            ("listen", self.listen != new.listen),
            ("http-listen", self.http_listen != new.http_listen),
            ("base-dir", self.base_dir != new.base_dir),
            ("tls", self.tls != new.tls),
            (
                "insecure-plaintext",
                self.insecure_plaintext != new.insecure_plaintext,
            ),
            ("file-mode", self.file_mode != new.file_mode),
        ];
        let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(n, _)| *n).collect();
        (!changed.is_empty()).then(|| format!("{} cannot change without a restart", changed.join(", ")))
    }

    /// TLS or explicit loopback plaintext; well-formed identities.
    fn validate_security(&self) -> Result<()> {
        let addr: std::net::SocketAddr = self
            .listen
            .parse()
            .map_err(|_| Error::invalid(format!("listen: {:?} is not an address:port", self.listen)))?;
        match (&self.tls, self.insecure_plaintext) {
            (Some(_), true) => {
                return Err(Error::invalid(
                    "both tls and insecure-plaintext are set: choose one",
                ))
            }
            (None, false) => {
                return Err(Error::invalid(
                    "no tls section: give tls: {cert: FILE, key: FILE}, or set \
                     insecure-plaintext: true (loopback listen addresses only)",
                ))
            }
            (None, true) if !addr.ip().is_loopback() => {
                return Err(Error::invalid(format!(
                    "insecure-plaintext is allowed only on a loopback listen address, \
                     not {}: configure tls",
                    self.listen
                )))
            }
            (Some(_), false) if self.clients.is_empty() => {
                return Err(Error::invalid(
                    "tls without clients: list client identities (clients:) so requests can be authorised",
                ))
            }
            _ => {}
        }
        if let Some(http) = &self.http_listen {
            let addr: std::net::SocketAddr = http
                .parse()
                .map_err(|_| Error::invalid(format!("http-listen: {http:?} is not an address:port")))?;
            // As for `listen`: status and metrics leave the host only over
            // TLS, and then (tls needs clients) only to a client's token.
            if self.tls.is_none() && !addr.ip().is_loopback() {
                return Err(Error::invalid(format!(
                    "http-listen is allowed without tls only on a loopback address, not {http}: \
                     configure tls (the HTTP listener then serves HTTPS with its certificate \
                     and asks for a client's token)"
                )));
            }
        }
        let mtls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        for (name, id) in &self.clients {
            let what = || format!("clients: {name}");
            JobName::new(name).map_err(|_| {
                Error::invalid(format!(
                    "clients: {name:?} is not a valid identity name (like a job name)"
                ))
            })?;
            if let Some(h) = &id.token_hash {
                crate::token::TokenHash::parse(h).map_err(|e| e.context(what()))?;
            }
            if let Some(f) = &id.cert_fingerprint {
                crate::token::TokenHash::parse(f).map_err(|_| {
                    Error::invalid(format!("{}: cert-fingerprint must be blake3:<64 hex>", what()))
                })?;
                if !mtls {
                    return Err(Error::invalid(format!(
                        "{}: cert-fingerprint needs tls.client-ca (mutual TLS)",
                        what()
                    )));
                }
            }
            if id.token_hash.is_none() && id.cert_fingerprint.is_none() {
                return Err(Error::invalid(format!(
                    "{}: give token-hash or cert-fingerprint",
                    what()
                )));
            }
            if id.jobs.is_some() && !matches!(id.role, Role::Replica | Role::Operator) {
                return Err(Error::invalid(format!(
                    "{}: jobs: is for a replica or operator identity; a hypervisor's jobs name it as their client",
                    what()
                )));
            }
            if id.may_remove && id.role != Role::Hypervisor {
                return Err(Error::invalid(format!(
                    "{}: may-remove: is for a hypervisor identity (role {} {})",
                    what(),
                    id.role.as_str(),
                    if matches!(id.role, Role::Admin | Role::Operator) {
                        "may remove anyway"
                    } else {
                        "never removes"
                    }
                )));
            }
        }
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (name, id) in &self.clients {
            let credentials = [
                ("token-hash", &id.token_hash),
                ("cert-fingerprint", &id.cert_fingerprint),
            ];
            for (kind, value) in credentials {
                let Some(value) = value else { continue };
                let key = format!("{kind} {}", value.to_ascii_lowercase());
                if let Some(other) = seen.insert(key, name) {
                    return Err(Error::invalid(format!(
                        "clients: {other} and {name} have the same {kind}: \
                         each identity needs its own (one of them would get the other's rights)"
                    )));
                }
            }
        }
        if self.limits.streams_per_client == 0 {
            return Err(Error::invalid("limits: streams-per-client must be at least 1"));
        }
        if self.limits.max_connections == 0 {
            return Err(Error::invalid("limits: max-connections must be at least 1"));
        }
        if self.limits.connections_per_client == 0 {
            return Err(Error::invalid(
                "limits: connections-per-client must be at least 1",
            ));
        }
        if self.limits.max_streams == 0 {
            return Err(Error::invalid("limits: max-streams must be at least 1"));
        }
        Ok(())
    }

    /// Mode for directories that go with [`ServerConfig::file_mode`].
    pub fn dir_mode(&self) -> u32 {
        if self.file_mode & 0o040 != 0 {
            0o750
        } else {
            0o700
        }
    }

    pub fn job(&self, name: &JobName) -> Result<&JobConfig> {
        self.jobs
            .get(name)
            .ok_or_else(|| Error::not_found(format!("unknown job {name}")))
    }

    /// The schedule of a job, if it has one.
    pub fn schedule_of(&self, job: &JobConfig) -> Option<&Schedule> {
        job.schedule
            .as_ref()
            .and_then(|s| self.schedules.get(s))
            .map(|s| &s.tags)
    }

    /// The retention lock a revision of `job` committed now gets: the
    /// job's own, else its schedule's.
    pub fn retention_lock_of(&self, job: &JobConfig) -> Option<Interval> {
        job.retention_lock.or_else(|| {
            job.schedule
                .as_ref()
                .and_then(|s| self.schedules.get(s))
                .and_then(|s| s.retention_lock)
        })
    }
}

/// `server:` of client.yaml: one URL, or several (a list) tried in order
/// when a connection fails: servers in front of one Ceph pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Servers(Vec<String>);

impl Servers {
    /// The URLs in the order to try them; never empty.
    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl From<&str> for Servers {
    fn from(url: &str) -> Self {
        Servers(vec![url.to_string()])
    }
}

impl Serialize for Servers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Servers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let urls = match OneOrMany::deserialize(d)? {
            OneOrMany::One(url) => vec![url],
            OneOrMany::Many(urls) => urls,
        };
        if urls.is_empty() {
            return Err(serde::de::Error::custom(
                "server: give a URL or a list of at least one",
            ));
        }
        Ok(Servers(urls))
    }
}

/// `backy-client`'s configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientConfig {
    /// Server URL, e.g. `https://backup01:6023`, or a list of them tried
    /// in order when a connection fails (servers in front of one pool).
    #[serde(default)]
    pub server: Option<Servers>,
    /// File holding this client's bearer token (mode 0600).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) the server's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry, when it differs from the
    /// URL's host (e.g. connecting by address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// The jobs this hypervisor backs up: what each reads and runs. Only
    /// these are ever pushed here; the server decides when, not what.
    #[serde(default, deserialize_with = "unique_keys::deserialize")]
    pub jobs: BTreeMap<JobName, ClientJob>,
    /// Bytes a second this client's pushes may send together (one limit
    /// per process: the agent's concurrent pushes share it); unset: no
    /// limit.
    #[serde(default, with = "opt_rate", skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
    /// Share of the blocks a change tracker calls unchanged that each
    /// incremental push reads again (default 0.5 %; 0 turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_sample: Option<SamplePercent>,
    /// Jobs backed up as one unit (docs/DESIGN.md, "Groups"): the disks of
    /// one VM, taken at one instant by `push GROUP`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys::deserialize"
    )]
    pub groups: BTreeMap<JobName, ClientGroup>,
}

/// A group of jobs whose sources are taken at one instant: each stays its
/// own job on the server, each revision records the instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientGroup {
    /// The member jobs (each listed under `jobs:`, in one group at most):
    /// disks of one running QEMU (`qmp:` on the same socket).
    pub jobs: Vec<JobName>,
    /// Run once around the group's instant; the members' own hooks do not
    /// run in a group push.
    #[serde(default)]
    pub hooks: crate::source::Hooks,
}

/// One job as the hypervisor knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientJob {
    /// What to back up, with the hooks around its snapshot.
    pub source: SourceSpec,
    /// Replaces the global `audit-sample` for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_sample: Option<SamplePercent>,
    /// Client-side encryption of the job's images (docs/encryption.md);
    /// absent: stored in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// A job's encryption: the key stays on the hypervisor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Encryption {
    /// File of 64 random bytes (`backy-client keygen`), mode 0600.
    pub key_file: PathBuf,
}

impl ClientConfig {
    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        let config: ClientConfig =
            serde_yaml::from_str(text).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        config
            .check_groups()
            .map_err(|e| Error::invalid(format!("{what}: {}", e.message)))?;
        Ok(config)
    }

    /// A group names listed jobs, each in one group at most, not its own
    /// name (`push NAME` must mean one thing), and disks that can share
    /// one instant: running QEMU disks on one QMP socket (one transaction).
    fn check_groups(&self) -> Result<()> {
        let mut seen: BTreeMap<&JobName, &JobName> = BTreeMap::new();
        for (name, group) in &self.groups {
            let bad = |why: String| Err(Error::invalid(format!("group {name}: {why}")));
            if self.jobs.contains_key(name) {
                return bad("a job has this name too; `push NAME` must mean one of them".into());
            }
            if group.jobs.is_empty() {
                return bad("no jobs".into());
            }
            if group.jobs.len() > crate::revision::MAX_GROUP_DISKS as usize {
                return bad(format!("more than {} jobs", crate::revision::MAX_GROUP_DISKS));
            }
            let mut socket = None;
            let mut rbd = 0;
            for job in &group.jobs {
                if let Some(other) = seen.insert(job, name) {
                    return bad(format!("job {job} is in group {other} already"));
                }
                let Some(listed) = self.jobs.get(job) else {
                    return bad(format!("job {job} is not listed under jobs:"));
                };
                let qmp = match &listed.source {
                    SourceSpec::Qemu(q) => match &q.disk {
                        crate::source::QemuDisk::Running { qmp, .. } => Some(qmp),
                        crate::source::QemuDisk::Image(_) => None,
                    },
                    SourceSpec::CephRbd { .. } => {
                        rbd += 1;
                        continue;
                    }
                    _ => None,
                };
                let Some(qmp) = qmp else {
                    return bad(format!(
                        "job {job} is neither a running QEMU disk (type: qemu with qmp:) nor a Ceph RBD image: \
                         a group takes only those"
                    ));
                };
                match socket {
                    None => socket = Some(qmp),
                    Some(first) if first != qmp => {
                        return bad(format!(
                            "job {job} is on QMP socket {}, the group's first disk on {}: one instant needs one QEMU",
                            qmp.display(),
                            first.display()
                        ))
                    }
                    Some(_) => {}
                }
            }
            if rbd > 0 && socket.is_some() {
                return bad("mixes Ceph RBD images and QEMU disks: one instant needs one kind".into());
            }
            if rbd > 0 && group.hooks.pre_snapshot.is_none() {
                return bad(
                    "Ceph RBD images are snapshotted one after another: the group needs a pre-snapshot hook \
                     that stops the guest's writes (e.g. virsh domfsfreeze) for one instant"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The configured source of `job`, if this hypervisor lists it.
    pub fn source_of(&self, job: &JobName) -> Option<&SourceSpec> {
        self.jobs.get(job).map(|j| &j.source)
    }

    /// The audit sample of `job`: its own, else the global one, else the
    /// default.
    pub fn audit_sample_of(&self, job: &JobName) -> SamplePercent {
        self.jobs
            .get(job)
            .and_then(|j| j.audit_sample)
            .or(self.audit_sample)
            .unwrap_or_default()
    }

    /// The configured encryption of `job`, if this hypervisor lists it
    /// with a key.
    pub fn encryption_of(&self, job: &JobName) -> Option<&Encryption> {
        self.jobs.get(job).and_then(|j| j.encryption.as_ref())
    }
}

/// The `client.yaml` fragments that carry the `source:`/`hooks:` a server
/// config still holds (`jobs` empty: every job), one per client identity,
/// for `backy-server migrate-sources`. Reads the raw YAML: such a config
/// no longer loads.
pub fn migrate_sources(text: &str, what: &str, jobs: &[String]) -> Result<String> {
    let raw: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    let all = raw
        .get("jobs")
        .and_then(|j| j.as_mapping())
        .ok_or_else(|| Error::invalid(format!("{what}: no jobs")))?;
    for want in jobs {
        if all.get(want.as_str()).is_none() {
            return Err(Error::not_found(format!("{what}: no job {want}")));
        }
    }
    // client identity -> job -> its client.yaml entry
    let mut by_client: BTreeMap<String, serde_yaml::Mapping> = BTreeMap::new();
    for (name, job) in all {
        let Some(name) = name.as_str() else { continue };
        if !jobs.is_empty() && !jobs.iter().any(|j| j == name) {
            continue;
        }
        let Some(mut source) = job.get("source").cloned() else {
            continue;
        };
        if let (Some(hooks), Some(map)) = (job.get("hooks"), source.as_mapping_mut()) {
            map.insert("hooks".into(), hooks.clone());
        }
        // Checked like the client will check it.
        serde_yaml::from_value::<SourceSpec>(source.clone())
            .map_err(|e| Error::invalid(format!("{what}: job {name}: source: {e}")))?;
        let client = job
            .get("client")
            .and_then(|c| c.as_str())
            .unwrap_or("(no client: any hypervisor)")
            .to_string();
        let mut entry = serde_yaml::Mapping::new();
        entry.insert("source".into(), source);
        by_client
            .entry(client)
            .or_default()
            .insert(name.into(), serde_yaml::Value::Mapping(entry));
    }
    let mut out = String::new();
    for (client, jobs) in by_client {
        let mut doc = serde_yaml::Mapping::new();
        doc.insert("jobs".into(), serde_yaml::Value::Mapping(jobs));
        let yaml = serde_yaml::to_string(&doc).map_err(|e| Error::internal(format!("writing YAML: {e}")))?;
        out.push_str(&format!(
            "# /etc/backy/client.yaml on the hypervisor of {client}\n{yaml}\n"
        ));
    }
    Ok(out)
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

/// `file-mode`: "0600" or "0640" (quoted or not).
mod file_mode {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        // Unquoted 0640 reads as the decimal number 640 in YAML 1.2.
        let text = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        match text.trim_start_matches('0') {
            "600" => Ok(0o600),
            "640" => Ok(0o640),
            _ => Err(serde::de::Error::custom(format!(
                "file-mode {text:?}: use 0600 or 0640"
            ))),
        }
    }
}

/// A job's `schedule:` value that means "no schedule".
pub const NO_SCHEDULE: &str = "none";

/// A job's `schedule:`: required; `none` deserializes to `None`.
mod schedule_name {
    use super::NO_SCHEDULE;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or(NO_SCHEDULE))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let name = String::deserialize(d)?;
        Ok((name != NO_SCHEDULE).then_some(name))
    }
}

/// Mode of revision files when the config does not say.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

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

/// A bandwidth limit: bytes a second, written as a size (`10M`, `10M/s`).
mod opt_rate {
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
        let rate = match Option::<Raw>::deserialize(d)? {
            None => return Ok(None),
            Some(Raw::N(n)) => crate::bwlimit::parse_rate(&n.to_string()),
            Some(Raw::S(s)) => crate::bwlimit::parse_rate(&s),
        };
        rate.map(Some).map_err(|e| serde::de::Error::custom(e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:7000
insecure-plaintext: true
base-dir: /srv/backy
schedules:
  default:
    daily:   {interval: 1d, keep: 9}
    weekly:  {interval: 7d, keep: 5}
jobs:
  vm1:
    schedule: default
    client: hv01
    max-size: 100G
  vm2: {schedule: none}
"#;

    #[test]
    fn retention_lock_of_a_schedule_or_its_job() {
        let text = GOOD
            .replace(
                "    weekly:  {interval: 7d, keep: 5}\n",
                "    weekly:  {interval: 7d, keep: 5}\n    retention-lock: 14d\n",
            )
            .replace(
                "    max-size: 100G\n",
                "    max-size: 100G\n  vm3: {schedule: default, retention-lock: 2h}\n",
            );
        let cfg = ServerConfig::from_yaml(&text, "server.yaml").unwrap();
        let job = |n: &str| cfg.job(&JobName::new(n).unwrap()).unwrap();
        let lock = |n: &str| cfg.retention_lock_of(job(n)).map(Interval::secs);
        assert_eq!(lock("vm1"), Some(14 * 86400), "the schedule's");
        assert_eq!(lock("vm3"), Some(2 * 3600), "the job's replaces it");
        assert_eq!(lock("vm2"), None);
        // Not a tag of the schedule.
        assert_eq!(cfg.schedule_of(job("vm1")).unwrap().len(), 2);
        // Written back as it was read.
        let again = ServerConfig::from_yaml(&serde_yaml::to_string(&cfg).unwrap(), "again").unwrap();
        assert_eq!(again, cfg);
        for (bad, why) in [
            ("    retention-lock: 0s\n", "retention-lock: interval"),
            ("    retention-lock: soon\n", "retention-lock: bad interval"),
            // A tag's own mistakes still name it.
            (
                "    hourly: {interval: 1h}\n",
                "tag \"hourly\": missing field `keep`",
            ),
        ] {
            let text = GOOD.replace(
                "    weekly:  {interval: 7d, keep: 5}\n",
                &format!("    weekly:  {{interval: 7d, keep: 5}}\n{bad}"),
            );
            let e = ServerConfig::from_yaml(&text, "server.yaml").unwrap_err();
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn loads_good_config() {
        let cfg = ServerConfig::from_yaml(GOOD, "server.yaml").unwrap();
        let vm1 = cfg.job(&JobName::new("vm1").unwrap()).unwrap();
        assert_eq!(vm1.max_size, Some(100 << 30));
        assert_eq!(cfg.schedule_of(vm1).unwrap()["weekly"].interval.secs(), 7 * 86400);
        assert!(cfg.job(&JobName::new("vm3").unwrap()).is_err());
        let vm2 = cfg.job(&JobName::new("vm2").unwrap()).unwrap();
        assert_eq!((vm2.schedule.as_deref(), cfg.schedule_of(vm2)), (None, None));
    }

    /// Issue 27, item 9: a schedule tag a revision spec reads as
    /// something else is refused at load.
    #[test]
    fn schedule_tags_that_specs_misread_are_refused() {
        for (tag, read_as) in [
            ("all", "every revision"),
            ("'7'", "revision number 7"),
            ("7", "revision number 7"),
            ("last", "the newest revision"),
        ] {
            let text = GOOD.replace("weekly:  {", &format!("{tag}:  {{"));
            let e = ServerConfig::from_yaml(&text, "server.yaml").unwrap_err();
            assert!(
                e.message
                    .contains(&format!("revision specs read it as {read_as}")),
                "{tag}: {}",
                e.message
            );
            assert!(e.message.contains("schedule \"default\""), "{tag}: {}", e.message);
        }
    }

    #[test]
    fn reload_takes_jobs_and_schedules_but_not_what_is_fixed_at_start() {
        let old = ServerConfig::from_yaml(GOOD, "old").unwrap();
        let more_jobs = GOOD.replace(
            "  vm2: {schedule: none}",
            "  vm2: {schedule: none}\n  vm3: {schedule: default}",
        );
        let new = ServerConfig::from_yaml(&more_jobs, "new").unwrap();
        assert_eq!(old.reload_refusal(&new), None);
        for (from, to, named) in [
            ("127.0.0.1:7000", "127.0.0.1:7001", "listen"),
            ("/srv/backy", "/srv/other", "base-dir"),
        ] {
            let new = ServerConfig::from_yaml(&GOOD.replace(from, to), "new").unwrap();
            let why = old.reload_refusal(&new).expect("refused");
            assert_eq!(why, format!("{named} cannot change without a restart"));
        }
        let new = ServerConfig::from_yaml(&format!("{GOOD}file-mode: \"0640\"\n"), "new").unwrap();
        assert_eq!(
            old.reload_refusal(&new).as_deref(),
            Some("file-mode cannot change without a restart")
        );
    }

    const POOL: &str =
        "store:\n  type: ceph-rbd\n  conf: /etc/ceph/ceph.conf\n  id: backy-server\n  pool: backups\n";

    #[test]
    fn a_ceph_store_parses_with_its_optional_keys_and_is_fixed_at_start() {
        let plain = ServerConfig::from_yaml(GOOD, "t").unwrap();
        assert_eq!(plain.ceph_store(), None, "no store: the filesystem");
        let cfg = ServerConfig::from_yaml(&format!("{GOOD}{POOL}"), "t").unwrap();
        let c = cfg.ceph_store().expect("a ceph-rbd store");
        assert_eq!(
            (
                c.conf.to_str(),
                c.id.as_str(),
                c.keyring.as_ref(),
                c.pool.as_str(),
                c.namespace.as_ref()
            ),
            (Some("/etc/ceph/ceph.conf"), "backy-server", None, "backups", None)
        );
        let full = format!("{GOOD}{POOL}  keyring: /k\n  namespace: backy\n");
        let c = ServerConfig::from_yaml(&full, "t").unwrap();
        let c = c.ceph_store().unwrap();
        assert_eq!(c.keyring.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(c.namespace.as_deref(), Some("backy"));
        let times = c.lease_times().unwrap();
        assert_eq!(
            (
                times.duration,
                times.renew_after,
                times.margin,
                c.op_timeout.secs()
            ),
            (30_000, 10_000, 5_000, 30),
            "the defaults"
        );
        let quick =
            format!("{GOOD}{POOL}  lease: 6s\n  lease-renewal: 2s\n  lease-margin: 1s\n  op-timeout: 5s\n");
        let q = ServerConfig::from_yaml(&quick, "t").unwrap();
        let q = q.ceph_store().unwrap();
        let times = q.lease_times().unwrap();
        assert_eq!(
            (
                times.duration,
                times.renew_after,
                times.margin,
                q.op_timeout.secs()
            ),
            (6_000, 2_000, 1_000, 5)
        );
        assert_eq!(
            plain.reload_refusal(&cfg).as_deref(),
            Some("store cannot change without a restart")
        );
    }

    #[test]
    fn a_bad_ceph_store_is_one_line() {
        for (text, says) in [
            (POOL.replace("ceph-rbd", "s3"), "unknown variant"),
            (
                POOL.replace("conf: /etc", "conf: etc"),
                "store: conf \"etc/ceph/ceph.conf\" must be an absolute path",
            ),
            (
                POOL.replace("id: backy-server", "id: client.backy"),
                "without `client.`",
            ),
            (
                POOL.replace("pool: backups", "pool: \"\""),
                "store: pool is empty",
            ),
            (format!("{POOL}  namespace: \"\"\n"), "namespace is empty"),
            (format!("{POOL}  user: x\n"), "unknown field"),
            (
                format!("{POOL}  lease: 10s\n  lease-renewal: 8s\n  lease-margin: 2s\n"),
                "store: lease-renewal 8s must be more than 0 and less than lease 10s less lease-margin 2s",
            ),
            (
                format!("{POOL}  lease-renewal: 0s\n"),
                "interval \"0s\" must be longer than zero",
            ),
            (
                format!("{POOL}  lease: 5s\n  lease-renewal: 1s\n  lease-margin: 5s\n"),
                "less than lease 5s less lease-margin 5s",
            ),
            (
                format!("{POOL}  lease: 30s\n  lease-renewal: 30s\n"),
                "less than lease 30s",
            ),
            (format!("{POOL}  lease: soon\n"), "bad interval"),
            (POOL.replace("  pool: backups\n", ""), "missing field `pool`"),
        ] {
            let e = ServerConfig::from_yaml(&format!("{GOOD}{text}"), "t").unwrap_err();
            assert!(e.message.contains(says), "{text}: {}", e.message);
            assert!(!e.message.contains('\n'), "one line: {}", e.message);
        }
    }

    const HASH: &str = "blake3:0000000000000000000000000000000000000000000000000000000000000000";
    const HASH2: &str = "blake3:2222222222222222222222222222222222222222222222222222222222222222";
    const HASH3: &str = "blake3:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn replicate_takes_a_source_and_refuses_what_cannot_work() {
        let with = |r: &str| ServerConfig::from_yaml(&format!("{GOOD}replicate: {r}\n"), "server.yaml");
        let cfg = with("{source: 'https://backup01:6023', token-file: /t, jobs: [vm1, 'web-*']}").unwrap();
        let r = cfg.replicate.unwrap();
        assert_eq!(
            (
                r.interval.secs(),
                r.lag_warning.secs(),
                r.lag_critical.secs(),
                r.max_jobs
            ),
            (300, 6 * 3600, 86400, 1000)
        );
        assert_eq!(r.jobs, ["vm1", "web-*"]);
        with("{source: 'http://127.0.0.1:6023', jobs: ['*'], max-jobs: 10}").unwrap();
        with("{source: 'http://[::1]:6023/', jobs: [vm1]}").unwrap();
        with("{source: 'https://backup01', jobs: [vm1]}").unwrap();
        for (bad, why) in [
            (
                "{source: 'http://backup01:6023'}",
                "plaintext: only a loopback source may be",
            ),
            ("{source: 'backup01:6023'}", "is not a URL like https://"),
            (
                "{source: 'https://backup01:6023/path'}",
                "is not a URL like https://",
            ),
            ("{source: 'https://user@backup01'}", "is not a URL like https://"),
            ("{source: 'ftp://backup01'}", "is not a URL like https://"),
            ("{source: 'https://backup01:port'}", "is not a URL like https://"),
            (
                "{source: 'http://127.0.0.1:1', ca: /ca}",
                "TLS settings given for the plaintext source",
            ),
            ("{source: 'https://b', cert: /c}", "give both cert and key"),
            (
                "{source: 'https://b', interval: 5s}",
                "interval 5s is below the minimum of 10s",
            ),
            (
                "{source: 'https://b', lag-warning: 2d}",
                "lag-warning 2d must be shorter than lag-critical 1d",
            ),
            ("{source: 'https://b', jobs: []}", "jobs: is missing or empty"),
            // Issue 28, item 2: no all-jobs default.
            (
                "{source: 'https://b'}",
                "jobs: is missing or empty: list the jobs to copy",
            ),
            ("{source: 'https://b', jobs: [../x]}", "replicate: jobs:"),
            ("{source: 'https://b', jobs: ['a*b']}", "replicate: jobs:"),
            (
                "{source: 'https://b', jobs: ['*'], max-jobs: 0}",
                "max-jobs 0 is below",
            ),
            (
                "{source: 'https://b', jobs: [a, b], max-jobs: 1}",
                "max-jobs 1 is below the 2 job names",
            ),
            ("{source: 'https://b', sources: []}", "unknown field `sources`"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn http_listen_leaves_loopback_only_with_tls_and_is_fixed_at_start() {
        let old = ServerConfig::from_yaml(GOOD, "old").unwrap();
        assert_eq!(old.http_listen, None, "off unless configured");
        let local = ServerConfig::from_yaml(&format!("{GOOD}http-listen: 127.0.0.1:9623\n"), "new").unwrap();
        assert_eq!(local.http_listen.as_deref(), Some("127.0.0.1:9623"));
        assert_eq!(
            old.reload_refusal(&local).as_deref(),
            Some("http-listen cannot change without a restart")
        );
        let e = ServerConfig::from_yaml(&format!("{GOOD}http-listen: 0.0.0.0:9623\n"), "t").unwrap_err();
        assert!(e.message.contains("only on a loopback address"), "{}", e.message);
        let e = ServerConfig::from_yaml(&format!("{GOOD}http-listen: localhost\n"), "t").unwrap_err();
        assert!(e.message.contains("not an address:port"), "{}", e.message);
        let tls = GOOD.replace("insecure-plaintext: true", "tls: {cert: /c.pem, key: /k.pem}")
            + &format!("clients:\n  hv01: {{token-hash: {HASH}}}\nhttp-listen: '[::]:9623'\n");
        ServerConfig::from_yaml(&tls, "t").unwrap();
    }

    #[test]
    fn loads_security_settings() {
        let text = GOOD.replace(
            "insecure-plaintext: true",
            "tls: {cert: /etc/backy/cert.pem, key: /etc/backy/key.pem, client-ca: /etc/backy/ca.pem}",
        ) + &format!(
            "clients:\n  hv01: {{token-hash: {HASH}}}\n  mon: {{role: read-only, cert-fingerprint: {HASH}}}\n  \
             ops: {{role: operator, jobs: [vm1], token-hash: {HASH2}}}\n  hv02: {{may-remove: true, token-hash: {HASH3}}}\n\
             file-mode: 0640\nlimits: {{streams-per-client: 3, idle-timeout: 30s, connections-per-client: 4, \
             idle-connection-timeout: 10m}}\n"
        );
        let cfg = ServerConfig::from_yaml(&text, "server.yaml").unwrap();
        assert_eq!(cfg.clients["hv01"].role, Role::Hypervisor);
        assert!(!cfg.clients["hv01"].may_remove, "hypervisors only add by default");
        assert_eq!(cfg.clients["mon"].role, Role::ReadOnly);
        assert_eq!(cfg.clients["ops"].role, Role::Operator);
        assert_eq!(cfg.clients["ops"].jobs.as_ref().map(Vec::len), Some(1));
        assert!(cfg.clients["hv02"].may_remove);
        assert_eq!((cfg.file_mode, cfg.dir_mode()), (0o640, 0o750));
        assert_eq!(cfg.limits.streams_per_client, 3);
        assert_eq!(cfg.limits.idle_timeout.secs(), 30);
        assert_eq!(cfg.limits.connections_per_client, 4);
        assert_eq!(cfg.limits.idle_connection_timeout.secs(), 600);
        let plain = ServerConfig::from_yaml(GOOD, "server.yaml").unwrap();
        assert_eq!((plain.file_mode, plain.dir_mode()), (0o600, 0o700));
        assert_eq!(plain.limits, Limits::default());
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
            (
                GOOD.replace("vm2: {schedule", "../x: {schedule"),
                "invalid job name",
            ),
            (GOOD.replace("vm2: {schedule", "vm1: {schedule"), "duplicate"),
            (
                GOOD.replace("vm2: {schedule: none}", "vm2: {}"),
                "schedule: none` for manual pushes only",
            ),
            (
                GOOD.replace("  default:\n", "  none:\n")
                    .replace("schedule: default", "schedule: none"),
                "\"none\" is reserved",
            ),
            (GOOD.replace("base-dir: /srv/backy", "base-dir: rel"), "absolute"),
            (
                GOOD.replace("listen: 127.0.0.1:7000", "listen: nowhere"),
                "listen",
            ),
            (GOOD.replace("client: hv01", "clinet: hv01"), "unknown field"),
            (GOOD.replace("insecure-plaintext: true\n", ""), "no tls section"),
            (
                GOOD.replace("listen: 127.0.0.1:7000", "listen: 0.0.0.0:7000"),
                "only on a loopback",
            ),
            (
                GOOD.replace(
                    "insecure-plaintext: true",
                    "insecure-plaintext: true\ntls: {cert: /c, key: /k}",
                ),
                "choose one",
            ),
            (
                GOOD.replace("insecure-plaintext: true", "tls: {cert: /c, key: /k}"),
                "tls without clients",
            ),
            (
                format!("{GOOD}clients:\n  hv02: {{token-hash: {HASH}}}\n"),
                "client \"hv01\" is not listed",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: abc}}\n"),
                "clients: hv01: token hash must start",
            ),
            (format!("{GOOD}clients:\n  hv01: {{}}\n"), "give token-hash"),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}, jobs: [vm1]}}\n"),
                "clients: hv01: jobs: is for a replica or operator identity",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}}}\n  ops: {{role: admin, may-remove: true, token-hash: {HASH}}}\n"),
                "clients: ops: may-remove: is for a hypervisor identity (role admin may remove anyway)",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}}}\n  mon: {{role: read-only, may-remove: true, token-hash: {HASH}}}\n"),
                "(role read-only never removes)",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}}}\n  r: {{role: replica, token-hash: {HASH}, jobs: [../x]}}\n"),
                "clients",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{cert-fingerprint: {HASH}}}\n"),
                "needs tls.client-ca",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}}}\n  ../x: {{token-hash: {HASH}}}\n"),
                "identity name",
            ),
            (format!("{GOOD}file-mode: 0644\n"), "use 0600 or 0640"),
            (format!("{GOOD}limits: {{streams-per-client: 0}}\n"), "at least 1"),
            (
                format!("{GOOD}limits: {{connections-per-client: 0}}\n"),
                "connections-per-client must be at least 1",
            ),
            (
                format!("{GOOD}limits: {{idle-connection-timeout: 0s}}\n"),
                "must be longer than zero",
            ),
            (
                GOOD.replace("max-size: 100G", "max-size: 100G\n    source: {type: file, path: /etc/shadow}"),
                "job vm1: `source:` and `hooks:` moved to the hypervisor's client.yaml",
            ),
            (
                GOOD.replace("vm2: {schedule: none}", "vm2: {schedule: none, hooks: {pre-snapshot: 'curl x|sh'}}"),
                "migrate-sources",
            ),
            (
                format!("{GOOD}clients:\n  hv01: {{token-hash: {HASH}}}\n  ops: {{role: admin, token-hash: {HASH}}}\n"),
                "clients: hv01 and ops have the same token-hash",
            ),
        ];
        for (text, want) in cases {
            let e = ServerConfig::from_yaml(&text, "server.yaml").unwrap_err();
            assert!(e.message.contains(want), "want {want:?} in {:?}", e.message);
            assert!(e.message.starts_with("server.yaml"), "{}", e.message);
        }
    }

    #[test]
    fn client_config_lists_its_jobs() {
        let text = "server: https://backup01:6023\ntls-server-name: backup01.example\njobs:\n  \
                    vm1:\n    source: {type: file, path: /var/lib/vm1.img, hooks: {pre-snapshot: 'sync'}}\n  \
                    vm2:\n    source: {type: ceph-rbd, pool: rbd, image: vm2}\n";
        let cfg = ClientConfig::from_yaml(text, "client.yaml").unwrap();
        let vm1 = cfg.source_of(&JobName::new("vm1").unwrap()).unwrap();
        assert_eq!(vm1.kind(), "file");
        assert_eq!(vm1.hooks().pre_snapshot.as_deref(), Some("sync"));
        assert!(cfg.source_of(&JobName::new("vm3").unwrap()).is_none());
        assert_eq!(cfg.tls_server_name.as_deref(), Some("backup01.example"));
        for (bad, want) in [
            (text.replace("  vm2:", "  vm1:"), "duplicate"),
            (text.replace("type: file", "type: nfs"), "unknown variant"),
            (format!("{text}    schedule: daily\n"), "unknown field"),
        ] {
            let e = ClientConfig::from_yaml(&bad, "client.yaml").unwrap_err();
            assert!(e.message.contains(want), "want {want:?} in {}", e.message);
        }
    }

    #[test]
    fn client_groups_name_running_disks_of_one_qemu() {
        let jobs = "jobs:\n  \
                    a: {source: {type: qemu, qmp: /run/vm1.qmp, node: disk0}}\n  \
                    b: {source: {type: qemu, qmp: /run/vm1.qmp, node: disk1}}\n  \
                    c: {source: {type: qemu, qmp: /run/vm2.qmp, node: disk0}}\n  \
                    d: {source: {type: ceph-rbd, pool: rbd, image: d}}\n";
        let good = format!("{jobs}groups:\n  vm1: {{jobs: [a, b], hooks: {{pre-snapshot: 'true'}}}}\n");
        let cfg = ClientConfig::from_yaml(&good, "client.yaml").unwrap();
        let vm1 = &cfg.groups[&JobName::new("vm1").unwrap()];
        assert_eq!(vm1.jobs.len(), 2);
        let ceph = format!("{jobs}groups:\n  db: {{jobs: [d], hooks: {{pre-snapshot: 'fsfreeze'}}}}\n");
        assert!(ClientConfig::from_yaml(&ceph, "client.yaml").is_ok());
        assert_eq!(vm1.hooks.pre_snapshot.as_deref(), Some("true"));
        for (groups, want) in [
            (
                "  vm1: {jobs: [a, x]}\n",
                "group vm1: job x is not listed under jobs:",
            ),
            (
                "  vm1: {jobs: [a]}\n  vm2: {jobs: [a]}\n",
                "group vm2: job a is in group vm1 already",
            ),
            ("  a: {jobs: [b]}\n", "group a: a job has this name too"),
            (
                "  vm1: {jobs: [a, c]}\n",
                "job c is on QMP socket /run/vm2.qmp, the group's first disk on /run/vm1.qmp",
            ),
            ("  vm1: {jobs: [d]}\n", "the group needs a pre-snapshot hook"),
            (
                "  vm1: {jobs: [a, d], hooks: {pre-snapshot: f}}\n",
                "mixes Ceph RBD images and QEMU disks",
            ),
            ("  vm1: {jobs: []}\n", "group vm1: no jobs"),
            ("  vm1: {jobs: [a], schedule: daily}\n", "unknown field"),
        ] {
            let e = ClientConfig::from_yaml(&format!("{jobs}groups:\n{groups}"), "client.yaml").unwrap_err();
            assert!(e.message.contains(want), "want {want:?} in {}", e.message);
            assert!(e.message.starts_with("client.yaml: "), "{}", e.message);
        }
    }

    #[test]
    fn migrate_sources_prints_a_client_fragment_per_identity() {
        let old = GOOD
            .replace(
                "max-size: 100G",
                "max-size: 100G\n    source: {type: ceph-rbd, pool: rbd, image: vm1.root}\n    \
             hooks: {pre-snapshot: 'virsh domfsfreeze vm1'}",
            )
            .replace(
                "vm2: {schedule: none}",
                "vm2: {schedule: none, source: {type: file, path: /img/vm2}}",
            );
        assert!(ServerConfig::from_yaml(&old, "server.yaml").is_err());
        let out = migrate_sources(&old, "server.yaml", &[]).unwrap();
        let hv01 = out.find("of hv01").unwrap();
        let any = out.find("(no client").unwrap();
        assert!(any < hv01, "sorted by identity: {out}");
        let body = hv01 + out[hv01..].find('\n').unwrap();
        let fragment: ClientConfig = ClientConfig::from_yaml(&out[body..], "fragment").unwrap();
        let vm1 = fragment.source_of(&JobName::new("vm1").unwrap()).unwrap();
        assert_eq!(vm1.hooks().pre_snapshot.as_deref(), Some("virsh domfsfreeze vm1"));
        assert!(fragment.source_of(&JobName::new("vm2").unwrap()).is_none());
        let only = migrate_sources(&old, "server.yaml", &["vm2".into()]).unwrap();
        assert!(only.contains("/img/vm2") && !only.contains("vm1"), "{only}");
        assert!(migrate_sources(&old, "server.yaml", &["vm9".into()]).is_err());
    }
}
