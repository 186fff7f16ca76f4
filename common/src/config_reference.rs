//! Every key of `server.yaml` and `client.yaml`: its type, default and
//! meaning. The packages' section-5 man pages (`backy-server.yaml(5)`,
//! `backy-client.yaml(5)`) are rendered from these tables, and
//! `common/tests/examples.rs` holds them to the config structs and the
//! example configs: every key the structs serialize is here and nothing
//! else, every key of the examples is here, and every checked default
//! parses to what the structs default to. So neither can drift.

/// One key. `path` is dotted from the top of the file; an upper-case
/// segment stands for a name the operator chooses (`jobs.JOB.schedule`).
#[derive(Clone, Copy, Debug)]
pub struct KeyDoc {
    pub path: &'static str,
    /// What the value is: `path`, `interval`, `size`, `mapping`, ...
    pub kind: &'static str,
    pub default: KeyDefault,
    /// One paragraph; a person's words, not a struct's.
    pub doc: &'static str,
}

/// What a key is when it is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyDefault {
    /// It must be given (where its parent is).
    Required,
    /// Unset; `doc` says what that means.
    Unset,
    /// This value, written as the file would: the test parses it and
    /// compares with the struct's default.
    Is(&'static str),
    /// What leaving it out amounts to, where no value written in the file
    /// is the same (the code applies it later).
    Means(&'static str),
}

/// One configuration file's reference page.
#[derive(Clone, Copy, Debug)]
pub struct ConfigReference {
    /// The page's name, `backy-server.yaml` (section 5).
    pub page: &'static str,
    /// Where the binary reads it by default.
    pub file: &'static str,
    /// The package whose binary reads it (`/usr/share/doc/PACKAGE/...`).
    pub package: &'static str,
    /// The NAME line's description.
    pub summary: &'static str,
    /// The DESCRIPTION section's paragraphs.
    pub description: &'static [&'static str],
    pub keys: &'static [KeyDoc],
}

const fn key(path: &'static str, kind: &'static str, default: KeyDefault, doc: &'static str) -> KeyDoc {
    KeyDoc {
        path,
        kind,
        default,
        doc,
    }
}

use KeyDefault::{Is, Means, Required, Unset};

pub const SERVER: ConfigReference = ConfigReference {
    page: "backy-server.yaml",
    file: crate::config::DEFAULT_SERVER_CONFIG,
    package: "backy-server",
    summary: "configuration of backy-server",
    description: &[
        "backy-server reads this YAML file at start (--config, default /etc/backy/server.yaml) \
         and again on SIGHUP (systemctl reload backy-server): jobs, schedules, clients, limits, \
         scrub and resume are taken at once; listen, base-dir, store, tls, insecure-plaintext and \
         file-mode need a restart (a reload changing them is refused and logged). \
         Unknown keys are errors. `backy-server check-config` checks a file.",
        "Sizes are bytes, or a number with K, M, G or T (powers of 1024). Intervals are a \
         number with s, m, h, d or w.",
        "The file holds token hashes: it must be mode 0600, or 0640 owned by the secrets-group.",
    ],
    keys: &[
        key("listen", "address", Is("127.0.0.1:6023"), "Address of the gRPC listener; [::]:6023 for IPv6 too. Any address other than loopback needs tls."),
        key("base-dir", "path", Required, "Where revisions live: BASE/JOB/REVISION. On btrfs, XFS with reflink=1 or ZFS 2.2 or later a revision costs only its changes; elsewhere each is a full copy. Owned by backy:backy, mode 0750; the packaged unit may write only to /srv/backy."),
        key("store", "mapping", Means("the filesystem under base-dir"), "Revisions in a Ceph pool instead (in progress: README, Revisions in a Ceph pool): one RBD image per job, one snapshot per revision, every record in the pool; base-dir then holds only this server's local state. Needs a restart to change."),
        key("store.type", "ceph-rbd", Required, "The kind of store; ceph-rbd is the only one besides the default."),
        key("store.conf", "path", Required, "A ceph.conf naming the monitors."),
        key("store.id", "string", Required, "The cephx id the server connects as, without client. (least privilege: mon 'profile rbd' osd 'profile rbd pool=POOL')."),
        key("store.keyring", "path", Means("the keyring the conf names"), "The identity's keyring."),
        key("store.pool", "string", Required, "The pool of the backups; not the pool of the VMs' disks."),
        key("store.namespace", "string", Means("none"), "A RADOS namespace in the pool: one store per namespace."),
        key("store.lease", "interval", Is("30s"), "How long a job's lease lasts without a renewal: one server writes a job at a time, and after its holder dies another server in front of the pool takes the job this long after the last renewal (fencing the old holder). Keep it at 60s or less."),
        key("store.lease-renewal", "interval", Is("10s"), "How often the holder renews its leases; less than lease less lease-margin."),
        key("store.lease-margin", "interval", Is("5s"), "The holder stops writing a job this long before its lease could expire, so it never writes after another server may have taken it; longer than zero."),
        key("store.op-timeout", "interval", Is("30s"), "Bounds every call to the cluster: a call not answered in time fails."),
        key("tls", "mapping", Unset, "TLS on every connection; required unless insecure-plaintext."),
        key("tls.cert", "path", Required, "The server's certificate chain (PEM)."),
        key("tls.key", "path", Required, "Its private key (PEM): 0600 owned by the server's user, or 0640 of the secrets-group."),
        key("tls.client-ca", "path", Unset, "Mutual TLS: every client must present a certificate signed by this CA, and may prove an identity by it (clients.IDENTITY.cert-fingerprint)."),
        key("insecure-plaintext", "boolean", Is("false"), "Plain TCP instead of tls, refused unless listen is a loopback address (one host, tests). Without clients, every local caller may then do everything."),
        key("http-listen", "address", Unset, "Address of the HTTP listener for the status page (/), /metrics, /healthz and /readyz; none when unset. HTTPS with the tls certificate when tls is set; without tls a loopback address only. Reading needs a client's token when clients are configured. Needs a restart to change."),
        key("secrets-group", "group name", Unset, "The group that may read this file and the TLS key besides their owner: they must then be 0600, or 0640 owned by this group. Unset: 0600 only."),
        key("clients", "mapping", Unset, "Who may connect: identity name to its credentials and role. Unset (plaintext loopback only): everyone may do everything."),
        key("clients.IDENTITY", "mapping", Required, "One identity: a bearer token (token-hash), a client certificate (cert-fingerprint), or both (then they must name the same identity). Each credential belongs to one identity."),
        key("clients.IDENTITY.role", "role", Is("hypervisor"), "hypervisor: push, restore, verify and add tags on the jobs whose client it is, run an agent under its name; read-only: status and check of every job; operator: everything on its jobs, removing included, no agent; admin: everything; replica: status, manifests and revision data of its jobs, for a server keeping a copy."),
        key("clients.IDENTITY.token-hash", "string", Unset, "blake3:HEX of its bearer token, from `backy-server hash-token --generate FILE`."),
        key("clients.IDENTITY.cert-fingerprint", "string", Unset, "blake3:HEX of its client certificate (DER), from `backy-server cert-fingerprint FILE`; needs tls.client-ca."),
        key("clients.IDENTITY.jobs", "list of job names", Means("every job"), "For an operator: the jobs it looks after; for a replica: the jobs it may copy."),
        key("clients.IDENTITY.may-remove", "boolean", Is("false"), "For a hypervisor: may also forget, distrust, retag and push --allow-unscheduled on its jobs. Off, a stolen hypervisor token cannot wipe its history."),
        key("schedules", "mapping", Unset, "Schedule name to its tags. `none` is no schedule name."),
        key("schedules.SCHEDULE", "mapping", Required, "A schedule: tag name to how often and how many to keep. Tags must not start with manual: (given by hand, never expire)."),
        key("schedules.SCHEDULE.TAG", "mapping", Required, "One tag: a push carries it every interval; each tag keeps its newest keep revisions and all younger than keep times interval."),
        key("schedules.SCHEDULE.TAG.interval", "interval", Required, "How often the tag falls due, on a grid with a fixed offset per job."),
        key("schedules.SCHEDULE.TAG.keep", "integer", Required, "How many revisions carrying the tag to keep at least."),
        key("schedules.SCHEDULE.retention-lock", "interval", Unset, "Not a tag: no revision of the schedule's jobs younger than this is deleted by anything (forget, expiry, a replica's mirrored expiry, any identity). Written into each revision when it commits, so shortening it later unlocks nothing already stored."),
        key("jobs", "mapping", Unset, "The jobs, one disk each. What a job reads (its source) and runs (hooks) is in the hypervisor's client.yaml, never here."),
        key("jobs.JOB", "mapping", Required, "One job; its name is also its directory under base-dir."),
        key("jobs.JOB.schedule", "schedule name", Required, "A name from schedules, or none: never ordered by the agent, every push runs, nothing expires, no SLA."),
        key("jobs.JOB.client", "identity name", Unset, "The identity (from clients) that may back the job up and restore it."),
        key("jobs.JOB.max-size", "size", Means("16T"), "The largest image accepted for this job."),
        key("jobs.JOB.retention-lock", "interval", Means("the schedule's"), "Replaces the schedule's retention-lock for this job."),
        key("replicate", "mapping", Unset, "Makes this server a replica: it copies another server's revisions here (pull). On that source, give this server an identity with role replica. Copies keep the source's ids, timestamps and tags; a copied job takes no pushes here."),
        key("replicate.source", "URL", Required, "The source server, https://HOST:PORT (http:// only to a loopback address)."),
        key("replicate.ca", "path", Means("the system trust store"), "The CA the source's certificate must chain to."),
        key("replicate.token-file", "path", Unset, "The token of this server's replica identity on the source (0600)."),
        key("replicate.cert", "path", Unset, "Client certificate for a source with mutual TLS; with replicate.key."),
        key("replicate.key", "path", Unset, "Its private key."),
        key("replicate.tls-server-name", "string", Unset, "The name the source's certificate carries, if not the URL's host."),
        key("replicate.jobs", "list of job names and prefixes", Required, "The jobs to copy: names, or prefixes written web-* (\"*\" alone: every job the source shows this identity, up to max-jobs). A source can make this server copy nothing it does not list. Jobs not listed under jobs here mirror the source's expiry; list one with its own schedule to keep it longer."),
        key("replicate.max-jobs", "integer", Is("1000"), "The most jobs the list may bring in, names included; what a source lists beyond it is not copied, and reported."),
        key("replicate.interval", "interval", Is("5m"), "How often to look for new revisions (at least 10s); a reload looks at once."),
        key("replicate.lag-warning", "interval", Is("6h"), "`check` warns when the oldest revision not yet copied is older."),
        key("replicate.lag-critical", "interval", Is("1d"), "... and is critical from this age on; longer than lag-warning."),
        key("replicate.bwlimit", "size per second", Unset, "Bytes a second the copies from the source may take (10M: 10 MiB/s), held over the whole transfer; unset: no limit."),
        key("resume", "mapping", Unset, "Interrupted pushes (client killed, network gone, server crash) resume under the same revision, sending only what is missing."),
        key("resume.enabled", "boolean", Is("true"), "Keep an interrupted push's partial revision; false discards it."),
        key("resume.window", "interval", Is("6h"), "How long after its last checkpoint an interrupted push may resume."),
        key("resume.checkpoint", "size", Is("1G"), "Bytes received between durable checkpoints (at least 1M): a server crash loses at most this much."),
        key("scrub", "mapping", Unset, "Background re-verification of stored revisions against their manifests."),
        key("scrub.enabled", "boolean", Is("true"), "Whether the scrub runs."),
        key("scrub.interval", "interval", Is("30d"), "Every revision is re-read at least once per interval ..."),
        key("scrub.rate", "size", Is("50M"), "... at most this many bytes per second; 0: unlimited."),
        key("limits", "mapping", Unset, "What one client may hold open, and what a connection has before it proves itself."),
        key("limits.streams-per-client", "integer", Is("16"), "Streams (push, restore, verify, manifest, agent, status) one identity may have open at once; more are refused with RESOURCE_EXHAUSTED. Each agent takes one."),
        key("limits.idle-timeout", "interval", Is("120s"), "A push stream with no frame for this long is dropped (clients send keepalives while scanning unchanged data)."),
        key("limits.max-connections", "integer", Is("4096"), "Connections open at once, and at most half the descriptor limit (the unit sets LimitNOFILE). At the cap a new connection displaces the oldest that made no request yet, else the least recently used idle one."),
        key("limits.connections-per-client", "integer", Is("32"), "Authenticated connections one identity may hold: one more closes its least recently used idle one, or is refused with RESOURCE_EXHAUSTED when each has a request in flight. Not applied without identities (loopback)."),
        key("limits.idle-connection-timeout", "interval", Is("5m"), "An authenticated connection with no request in flight for this long is closed (clients reconnect when they next need one)."),
        key("limits.first-request-timeout", "interval", Is("10s"), "Time a new connection has for its TLS handshake and first authenticated request."),
        key("limits.max-streams", "integer", Is("256"), "Long streams (push, restore, verify, manifest, status listings) the server runs at once, all callers together; more are refused with RESOURCE_EXHAUSTED (clients retry). Short calls (plan, status, tags) never wait for them."),
        key("dedup", "client, host or off", Is("client"), "Whose stored blocks spare a push sending them (the server clones a block it holds instead of receiving it): client, those of jobs of the same client identity; host, of any job here (a client then learns whether a block exists on the host); off, none, and written blocks are not shared either. Otherwise written blocks are shared store-wide: a client learns nothing from those."),
        key("file-mode", "mode", Is("\"0600\""), "Mode of revision files: \"0600\" (directories 0700) or \"0640\" to let the server's group read them (directories 0750)."),
    ],
};

pub const CLIENT: ConfigReference = ConfigReference {
    page: "backy-client.yaml",
    file: crate::config::DEFAULT_CLIENT_CONFIG,
    package: "backy-client",
    summary: "configuration of backy-client on a hypervisor",
    description: &[
        "backy-client reads this YAML file (--config, default /etc/backy/client.yaml when present) \
         for every command; the agent reads it again for each order, so changes to jobs need no \
         restart. Command-line flags and BACKY_* variables override the connection settings. \
         Unknown keys are errors. Keep it 0600.",
        "Hooks run with sh -c and the variables BACKY_JOB, BACKY_REVISION and BACKY_SNAPSHOT \
         (ceph-rbd) or BACKY_SOURCE (file, block, qemu: the path, or the QMP socket of a running \
         guest, with BACKY_NODE); once pre-snapshot started, post-snapshot and cleanup always run.",
    ],
    keys: &[
        key("server", "URL or list of URLs", Means("http://127.0.0.1:6023"), "The server; https:// for anything but the same host. A list names several servers in front of one Ceph pool, tried in order when a connection fails (the agent uses the first); a push refused because another of them holds the job's lease is sent once to that holder, which the refusal names."),
        key("token-file", "path", Unset, "This hypervisor's bearer token: the file `backy-server hash-token --generate` wrote (0600)."),
        key("ca", "path", Means("the system trust store"), "The CA the server's certificate must chain to (PEM)."),
        key("tls-server-name", "string", Unset, "The name the server's certificate carries, when the URL names the server otherwise (by address, say)."),
        key("cert", "path", Unset, "A client certificate (PEM), for a server with mutual TLS; with key."),
        key("key", "path", Unset, "Its private key (PEM, 0600)."),
        key("bwlimit", "size per second", Unset, "Bytes a second this client's pushes may send (10M: 10 MiB/s), all of a process's pushes together: the agent's concurrent pushes share it. push --bwlimit replaces it for one push. Unset: no limit."),
        key("audit-sample", "percentage", Means("0.5%"), "Share of the blocks a change tracker (a --changed-ranges file, a QEMU dirty bitmap, Ceph's rbd diff: read through qemu-nbd with the rbd driver, package qemu-block-extra) calls unchanged that each incremental push reads again and compares with the parent revision (at least one block); a mismatch makes the push read the whole source and check warn. 0 turns the audit off; push --audit-sample replaces it for one push."),
        key("jobs", "mapping", Unset, "What this hypervisor backs up, and how: the server decides when and what is kept, never what is read or run here. The agent runs only the jobs listed here."),
        key("jobs.JOB", "mapping", Required, "One job, named as on the server."),
        key("jobs.JOB.source", "mapping", Required, "What to back up, with the hooks around its snapshot."),
        key("jobs.JOB.audit-sample", "percentage", Means("audit-sample"), "Replaces the global audit-sample for this job."),
        key("jobs.JOB.source.type", "file | block | ceph-rbd | qemu", Required, "file: a raw image file, read whole (holes skipped); block: a block device, read whole; ceph-rbd: an RBD image, snapshotted as POOL/IMAGE@backy-REVISION, sending only what Ceph reports changed (needs the rbd tool); qemu: a qcow2 image of a stopped guest (image) or a disk of a running guest (qmp and node), reading only what persistent dirty bitmaps mark."),
        key("jobs.JOB.source.path", "path", Required, "For file and block: the image file or device."),
        key("jobs.JOB.source.pool", "string", Required, "For ceph-rbd: the pool."),
        key("jobs.JOB.source.image", "string or path", Unset, "For ceph-rbd: the RBD image. For qemu: the qcow2 file of a stopped guest (no QEMU may have it open), read through qemu-nbd; or give qmp and node."),
        key("jobs.JOB.source.namespace", "string", Unset, "For ceph-rbd: the RBD namespace."),
        key("jobs.JOB.source.conf", "path", Means("Ceph's default"), "For ceph-rbd: the cluster's ceph.conf."),
        key("jobs.JOB.source.id", "string", Means("Ceph's default"), "For ceph-rbd: the Ceph client id, without client. (rbd --id)."),
        key("jobs.JOB.source.keyring", "path", Means("Ceph's default"), "For ceph-rbd: the keyring of that id."),
        key("jobs.JOB.source.qmp", "path", Unset, "For qemu: the QMP socket of a running guest, one of its own for backy (-qmp unix:PATH,server=on,wait=off). Each push freezes a point-in-time view (image fleecing). The disk must be a qcow2 for the bitmaps to persist."),
        key("jobs.JOB.source.node", "string", Unset, "For qemu with qmp (required there): the disk's block node name, drive id or guest device."),
        key("jobs.JOB.source.scratch-dir", "path", Means("/var/tmp"), "For qemu with qmp: where the fleecing overlay lives; it holds what the guest overwrites during the backup."),
        key("jobs.JOB.source.hooks", "mapping", Unset, "Commands run around the snapshot (sh -c)."),
        key("jobs.JOB.source.hooks.pre-snapshot", "command", Unset, "Run before the snapshot (a guest freeze, lvcreate --snapshot); a failure aborts the push."),
        key("jobs.JOB.source.hooks.post-snapshot", "command", Unset, "Run right after the snapshot whenever pre-snapshot ran (a thaw)."),
        key("jobs.JOB.source.hooks.cleanup", "command", Unset, "Run once the source has been read, whether the push succeeded or not, whenever pre-snapshot ran (lvremove of its snapshot)."),
        key("jobs.JOB.source.hooks.hook-timeout", "integer (seconds)", Means("60"), "Seconds each hook may take."),
        key("groups", "mapping", Unset, "Jobs backed up as one unit by push GROUP: the disks of one VM, all taken at one instant. Each member stays its own job on the server; each revision records the group and the instant. status, check, restore and verify given the group's name act on its instants across the members; the agent pushes the whole group when the server orders a member."),
        key("groups.GROUP", "mapping", Unset, "One group, by the name push takes (not also a job's name)."),
        key("groups.GROUP.jobs", "list of job names", Required, "The member jobs, each listed under jobs and in one group at most, all of one kind: running QEMU disks (qmp) on one QMP socket, taken in one QMP transaction, or Ceph RBD images, snapshotted inside the one window of the group's hooks (which then needs a pre-snapshot hook)."),
        key("groups.GROUP.hooks", "mapping", Unset, "Run once around the group's instant (BACKY_JOB is the group, BACKY_REVISION the instant); the members' own hooks do not run in a group push."),
        key("groups.GROUP.hooks.pre-snapshot", "command", Unset, "Run before the instant (a guest freeze); a failure aborts the group push."),
        key("groups.GROUP.hooks.post-snapshot", "command", Unset, "Run right after the instant whenever pre-snapshot ran (a thaw)."),
        key("groups.GROUP.hooks.cleanup", "command", Unset, "Run once every disk has been read, whenever pre-snapshot ran."),
        key("groups.GROUP.hooks.hook-timeout", "integer (seconds)", Means("60"), "Seconds each hook may take."),
        key("jobs.JOB.encryption", "mapping", Means("stored in the clear"), "Encrypts the job's images on this hypervisor before they leave it (AES-256-XTS, docs/encryption.md); the server never sees the key. Losing the key loses the backups."),
        key("jobs.JOB.encryption.key-file", "path", Required, "The job's key: 64 random bytes written by backy-client keygen, mode 0600. Another key makes the next push refused until it is given --new-key (a full push)."),
    ],
};
