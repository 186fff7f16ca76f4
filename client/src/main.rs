//! `backy-client`: the command line. Parses arguments, sets up logging and
//! the runtime, runs one command, and turns its outcome into output and an
//! exit status: 0 success, 1 error with a one-line reason on stderr (a JSON
//! document with --json), 2 bad arguments; `check` exits with Nagios
//! states (3 UNKNOWN for bad arguments or a server it cannot ask).

use backy_client::output::{self, Failure};
use backy_client::{
    agent, check, connect, export, group, live_restore, progress, push, restore, revisions, settings,
    source_check, status, summary,
};

use anyhow::Context;
use backy_common::tracker_audit::SamplePercent;
use backy_common::JobName;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  backy-client push vm1
  backy-client push vm1 --source /dev/vg/vm1-snap --force --tags manual:pre-upgrade
  backy-client restore vm1 -r daily /var/tmp/vm1.img
  backy-client status
  backy-client status vm1 --json
  BACKY_SERVER=http://backup01:6023 backy-client status";

#[derive(Parser, Debug)]
#[command(
    name = "backy-client",
    version,
    about = "Back up VM disks to a backy server, restore them, and show their state",
    after_help = EXAMPLES
)]
struct Cli {
    /// Server URL [default: from the config file, else http://127.0.0.1:6023]
    #[arg(
        long,
        env = "BACKY_SERVER",
        value_name = "URL",
        global = true,
        help_heading = "Global options"
    )]
    server: Option<String>,

    /// Client config file (every key in man 5 backy-client.yaml)
    /// [default: /etc/backy/client.yaml when present]
    #[arg(long, value_name = "FILE", global = true, help_heading = "Global options")]
    config: Option<PathBuf>,

    /// File with this client's bearer token [default: token-file in the config]
    #[arg(
        long,
        env = "BACKY_TOKEN_FILE",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    token_file: Option<PathBuf>,

    /// Name the server's certificate must carry, when it is not the URL's host (https://)
    #[arg(long, value_name = "NAME", global = true, help_heading = "Global options")]
    tls_server_name: Option<String>,

    /// CA certificate (PEM) the server's certificate must chain to (https://)
    /// [default: ca in the config, else the system's trust store]
    #[arg(
        long,
        env = "BACKY_CA",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS
    #[arg(
        long,
        env = "BACKY_CERT",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    cert: Option<PathBuf>,

    /// Key (PEM) of the client certificate
    #[arg(
        long,
        env = "BACKY_KEY",
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    key: Option<PathBuf>,

    /// Print results as JSON (/usr/share/doc/backy-client/docs/json.md, docs/json.md
    /// in the source; failures as JSON on stderr)
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,

    /// Print nothing on success, warnings neither: only errors, on stderr
    /// (for cron, which mails any output)
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    quiet: bool,

    /// Seconds to wait for the server to answer when connecting
    #[arg(
        long,
        value_name = "SECS",
        global = true,
        default_value_t = connect::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=3600),
        help_heading = "Global options"
    )]
    timeout: u64,

    /// Log more to stderr, one level per v (warnings, then info, debug,
    /// trace; the agent starts at info); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Global options")]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Push(PushCmd),
    Restore(RestoreCmd),
    Export(ExportCmd),
    LiveRestore(LiveRestoreCmd),
    Status(StatusCmd),
    Verify(VerifyCmd),
    /// Mark revisions distrusted by hand: never a parent again (the next
    /// push is a full one) until a clean verify restores trust
    #[command(after_help = "\
Examples:
  backy-client distrust vm1 -r latest     never use it as a parent again
  backy-client distrust vm1 -r all --dry-run
                                          what would be marked
  backy-client verify vm1 -r latest       a clean verify trusts it again")]
    Distrust(RevisionsCmd),
    Tags(TagsCmd),
    /// Remove revisions and all their files from the server
    #[command(after_help = "\
Examples:
  backy-client forget vm1 -r 3xKq9v --dry-run
                                          what would be deleted
  backy-client forget vm1 -r 3xKq9v       delete it from the server")]
    Forget(RevisionsCmd),
    Check(CheckCmd),
    Agent(AgentCmd),
    Keygen(KeygenCmd),
    Decrypt(DecryptCmd),
    /// `completions SHELL`, and the hidden `generate-assets` (packaging).
    #[command(flatten)]
    Assets(backy_cli_assets::AssetsCommand),
}

/// Write a new encryption key file (64 random bytes, mode 0600) for a
/// job's `encryption: key-file:`; never replaces an existing file
#[derive(Args, Debug)]
#[command(after_help = "\
Keep a copy of the key away from the hypervisor: without it the job's
backups cannot be read by anyone, backy included (docs/encryption.md).

Examples:
  backy-client keygen /etc/backy/keys/vm1.key")]
struct KeygenCmd {
    /// The key file to create
    #[arg(value_name = "FILE")]
    path: PathBuf,
}

/// Decrypt a revision image file copied off the storage host, with the
/// key alone (no server, no config)
#[derive(Args, Debug)]
#[command(after_help = "\
The input is the revision's raw image as the server stores it
(<base-dir>/<job>/<revision-id>); the output is the disk image. With - the
image goes to standard output.

Examples:
  backy-client decrypt --key-file /etc/backy/keys/vm1.key /mnt/copy/vm1/3f2c... vm1.img
  backy-client decrypt --key-file vm1.key REV - | dd of=/dev/vg/vm1 bs=4M")]
struct DecryptCmd {
    /// The job's key file
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,

    /// The stored revision image
    #[arg(value_name = "REV")]
    input: PathBuf,

    /// Where the plaintext goes (a new file), or - for standard output
    #[arg(value_name = "OUT")]
    output: PathBuf,
}

/// Re-read stored revisions on the server and compare every block with
/// the manifest; marks them verified or distrusted. Exit 1 if any is damaged.
/// With --source, compare one revision with the source it was taken from
/// instead (reported only; trust is left alone).
#[derive(Args, Debug)]
#[command(after_help = "\
For a group (client.yaml groups:), -r names instants: latest (default) the
newest complete one, all, or an instant id (or a unique prefix of one);
every member's revision of each is verified, and an incomplete instant
fails the verify too (exit 1).

Examples:
  backy-client verify vm1                 the newest revision
  backy-client verify vm1 -r all          every revision
  backy-client verify vm1 --source /dev/vg/vm1-snap --sample 5
                                          5% of the blocks against the source
  backy-client verify db-vm               every disk of the group's newest complete instant")]
struct VerifyCmd {
    /// Job name, or a group's (client.yaml groups:)
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Revisions to verify (a spec, or all; one revision with --source);
    /// for a group, instants
    #[arg(short, long, value_name = "SPEC", default_value = "latest")]
    revision: String,

    /// Compare with the source (a path, rbd:POOL/IMAGE@SNAP; without a
    /// value the job's source in this client config)
    #[arg(long, value_name = "SOURCE", num_args = 0..=1, default_missing_value = "")]
    source: Option<String>,

    /// With --source: the share of blocks to compare, in percent
    #[arg(long, value_name = "PCT", default_value_t = 100.0, requires = "source")]
    sample: f64,
}

/// Name revisions of a job (distrust, forget).
#[derive(Args, Debug)]
struct RevisionsCmd {
    /// Job name
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Revisions (a spec, or all)
    #[arg(short, long, value_name = "SPEC")]
    revision: String,

    /// Show what would change; change nothing
    #[arg(long)]
    dry_run: bool,
}

/// Change the tags of revisions. Tags starting with manual: never expire.
/// On a scheduled job, tags must be in its schedule or manual:, and no
/// revision may be left without tags (use forget to delete one).
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  backy-client tags vm1 -r latest add manual:before-upgrade
  backy-client tags vm1 -r 2 set daily,weekly --dry-run
  backy-client tags vm1 -r all remove manual:before-upgrade")]
struct TagsCmd {
    /// Job name
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Revisions (a spec, or all)
    #[arg(short, long, value_name = "SPEC")]
    revision: String,

    /// What to do
    #[arg(value_enum)]
    action: revisions::TagAction,

    /// Comma-separated tags
    #[arg(value_name = "TAGS", value_delimiter = ',')]
    tags: Vec<String>,

    /// Accept tags outside the job's schedule: the expiry after the next
    /// backup removes them (and deletes a revision left without tags)
    #[arg(long)]
    allow_unscheduled: bool,

    /// Show the revisions as they would be; change nothing
    #[arg(long)]
    dry_run: bool,
}

/// Monitoring probe: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (Nagios).
#[derive(Args, Debug)]
#[command(after_help = "\
CRITICAL when a job's newest trusted revision is older than 1.5 x its
shortest interval, or when a job never backed up is past that window since
the server first knew it; WARNING for distrusted revisions, failing pushes
(wherever they failed) and a job without schedule that has no revision;
UNKNOWN when the server cannot be asked. Jobs with schedule: none have no
SLA and are counted apart. Bad arguments are UNKNOWN too.

The line ends in performance data: for one job `age` (of its newest trusted
revision, with the SLA window as critical threshold), `revisions` and
`failures`; for several, counts by state and `oldest_age`. --json prints the
verdict per job instead (/usr/share/doc/backy-client/docs/json.md, docs/json.md
in the source).

Examples:
  backy-client check
  backy-client check vm1
  backy-client check --json")]
struct CheckCmd {
    /// Job name, or a group's (client.yaml groups:: WARNING when its newest
    /// instant is incomplete) [default: all jobs]
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: Option<JobName>,
}

/// Run on a hypervisor: receive orders from the server when this client's
/// jobs are due and run the pushes; reconnects when the server goes away.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  backy-client agent --name hv01 --workers 2")]
struct AgentCmd {
    /// The client identity whose jobs this agent runs [default: the identity the
    /// credentials prove; the host name for an admin or without identities]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Pushes run at the same time
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
}

/// Back up a job's disk if a backup is due; exits silently when none is.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  backy-client push vm1                                  source from this client config (jobs:)
  backy-client push vm1 --source /var/lib/vms/vm1.img    an image file (stop the VM first)
  backy-client push vm1 --source rbd:rbd/vm1.root        a Ceph RBD image (snapshotted by backy)
  backy-client push vm1 --source /dev/vg/vm1-snap --force --tags manual:pre-upgrade
  backy-client push vm1 --source /dev/vg/vm1-snap --changed-ranges /run/vm1.dirty")]
struct PushCmd {
    /// Job name, or a group's (client.yaml groups:): its disks from one instant
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Image file, block device, rbd:POOL/IMAGE or qemu:IMAGE.qcow2 to read [default: the job's source in this client config]
    #[arg(long, value_name = "PATH")]
    source: Option<String>,

    /// Back up even if nothing is due
    #[arg(long)]
    force: bool,

    /// Tags of the new revision instead of the due ones (with --force);
    /// each in the job's schedule or manual:NAME
    #[arg(long, value_name = "TAGS", value_delimiter = ',', requires = "force")]
    tags: Vec<String>,

    /// Accept --tags outside the job's schedule: the expiry after the next
    /// backup removes them (and deletes the revision if none are left)
    #[arg(long, requires = "tags")]
    allow_unscheduled: bool,

    /// Accept a source smaller than the last revision (refused otherwise:
    /// a shrunken disk is more often the wrong disk or a failed snapshot)
    #[arg(long)]
    allow_shrink: bool,

    /// Read only these byte ranges, changed since the parent revision: one
    /// `OFFSET LENGTH` per line, decimal (from a dirty-block tracker)
    #[arg(long, value_name = "FILE")]
    changed_ranges: Option<PathBuf>,

    /// Push in full, not relative to the parent revision: needed once
    /// after the job's key changed (or encryption was turned on or off)
    #[arg(long)]
    new_key: bool,

    /// Bytes a second this push may send (10M: 10 MiB/s) [default: bwlimit
    /// in the client config, else no limit]
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    bwlimit: Option<u64>,

    /// Share of the blocks a change tracker (--changed-ranges, a QEMU
    /// bitmap) calls unchanged to read again and compare with the parent,
    /// like 0.5% (0: off) [default: audit-sample in the client config, else
    /// 0.5%]
    #[arg(long, value_name = "PERCENT", value_parser = parse_audit_sample)]
    audit_sample: Option<SamplePercent>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    backy_common::bwlimit::parse_rate(s).map_err(|e| e.message)
}

fn parse_audit_sample(s: &str) -> Result<SamplePercent, String> {
    SamplePercent::parse(s).map_err(|e| e.message)
}

/// Restore a revision to a file, block device, RBD image or standard
/// output, verified as it streams.
#[derive(Args, Debug)]
#[command(after_help = "\
A file target is written sparse under a temporary name and renamed when
complete; an existing non-empty file is replaced only with --force. A block
device is written in place (every byte, zeros too), opened exclusively (a
mounted or otherwise used device is refused), and overwritten only with
--force when it holds data. With --force, an existing file or block
device of the revision's size is rolled back: read locally, compared with
the revision's digests, and only the granules that differ are fetched and
written in place (--full restores everything; a target of another size
needs --full). A path under /dev that does not exist is an
error, never a new file. A replaced file keeps its owner, group and mode.
With - the image goes to standard output, every byte in order (never to a
terminal); the result line goes to stderr. A failure there leaves the
output short and exits 1: check the exit status (set -o pipefail).

Revision specs: latest (default), N (0 = newest), a tag (newest with it),
a revision id or a unique prefix of one.

A group (client.yaml groups:) restores every disk of one instant, each to
its own target: --to DIR writes DIR/JOB for each member, --target JOB=PATH
names one member's target (a file, block device or rbd:POOL/IMAGE);
every member needs one. -r names the instant: latest (default) the newest
complete one, or an instant id (or a unique prefix of one), as status
GROUP lists them. Every disk is checked first (the instant complete, each
revision, key and target as a single restore checks them): a refusal of
any writes nothing.

Examples:
  backy-client restore vm1 /var/tmp/vm1.img
  backy-client restore vm1 -r 1 /var/tmp/vm1-yesterday.img
  backy-client restore vm1 -r weekly /dev/vg/vm1 --force
  backy-client restore vm1 - | ssh hv02 'dd of=/var/lib/vms/vm1.img bs=4M'
  backy-client restore vm1 - | qemu-img convert -O qcow2 /dev/stdin vm1.qcow2
  backy-client restore db-vm --to /var/tmp/db-vm
  backy-client restore db-vm -r 5Hq --target db-vm-root=/dev/vg/root --target db-vm-data=/dev/vg/data")]
struct RestoreCmd {
    /// Job name, or a group's (client.yaml groups:)
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Revision to restore (for a group: its instant)
    #[arg(short, long, value_name = "SPEC", default_value = "latest")]
    revision: String,

    /// File, block device, rbd:POOL/IMAGE, or - for standard output
    #[arg(value_name = "TARGET", required_unless_present_any = ["to", "member_targets"])]
    target: Option<PathBuf>,

    /// A group: each member's disk to DIR/JOB (DIR must exist)
    #[arg(long, value_name = "DIR", conflicts_with = "target")]
    to: Option<PathBuf>,

    /// A group: this member's target (repeat for each; overrides --to)
    #[arg(long = "target", value_name = "JOB=PATH", value_parser = parse_member_target, conflicts_with = "target")]
    member_targets: Vec<(JobName, PathBuf)>,

    /// Replace an existing non-empty file or RBD image, or overwrite a
    /// block device that holds data
    #[arg(long)]
    force: bool,

    /// Restore every block even onto a file or block device of the
    /// revision's size (which is otherwise rolled back: only what differs
    /// is fetched and written); a target of another size needs it
    #[arg(long)]
    full: bool,

    /// The key of an encrypted revision [default: the job's
    /// encryption: key-file: in this client config]
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

/// Serve a revision over NBD on this host, checked block by block against
/// its manifest: read-only, or writable through a local overlay (boot a VM
/// from a backup now). Nothing is ever written to the server.
#[derive(Args, Debug)]
#[command(after_help = "\
Prints the NBD URI once it accepts connections, then serves until SIGINT or
SIGTERM (or, with --once, until the last client has gone). Data comes from
the server in 64 KiB granules, each checked against the manifest's digest
of its block before it is served: a damaged block is an I/O error, never
wrong bytes. Holes of the revision are reported as holes (base:allocation).
The Unix socket is mode 0600 and takes connections from this user and root
only; a TCP port listens on loopback only (any local user may connect).
With --overlay FILE, writes go to FILE (sparse, the image's size) and its
map FILE.map; reopening the same overlay for the same revision carries on.

Examples:
  backy-client export vm1 --socket /run/backy/vm1.nbd
  nbdinfo --map 'nbd+unix:///vm1?socket=/run/backy/vm1.nbd'
  qemu-img convert -O raw 'nbd+unix:///vm1?socket=/run/backy/vm1.nbd' vm1.img
  backy-client export vm1 -r daily --socket /run/vm1.nbd --overlay /var/tmp/vm1.overlay
  qemu-system-x86_64 -m 2G -drive \\
    file=nbd+unix:///vm1?socket=/run/vm1.nbd,format=raw,if=virtio")]
struct ExportCmd {
    /// Job name
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: JobName,

    /// Revision to serve
    #[arg(short, long, value_name = "SPEC", default_value = "latest")]
    revision: String,

    /// Listen on this Unix socket
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    socket: Option<PathBuf>,

    /// Listen on this loopback address instead (e.g. 127.0.0.1:10809)
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,

    /// Writable: writes go to this local overlay file (and FILE.map)
    #[arg(long, value_name = "FILE")]
    overlay: Option<PathBuf>,

    /// Fetched data kept in memory, in MiB
    #[arg(long, value_name = "MIB", default_value_t = (export::DEFAULT_CACHE >> 20) as u64, value_parser = clap::value_parser!(u64).range(16..=65536))]
    cache_mib: u64,

    /// End when the last client has disconnected
    #[arg(long)]
    once: bool,
}

/// Move a running guest off a backup onto a local disk: QEMU copies the
/// node the guest reads (served from a backup) into TARGET while the guest
/// runs, then switches the guest to it and closes the source node.
#[derive(Args, Debug)]
#[command(after_help = "\
The source node is what the guest's device reads: an NBD client node (or a
raw node over one) that reads a backy export of the revision. Guest writes
during the copy go to both sides, so the copy converges however busy the
guest is. TARGET is a block device or a file of exactly the node's size, or
a path that does not exist yet (created at that size); one holding data
needs --force; one another process has open (locked) is refused. backy
opens TARGET and hands QEMU the descriptor. On failure or interruption the
guest stays on its source and nothing of the run is left in QEMU.

Examples:
  backy-client live-restore --qmp /run/vm1.qmp --node backup0 --target /dev/vg/vm1
  backy-client live-restore --qmp /run/vm1.qmp --node backup0 --target /var/lib/vms/vm1.img --speed 200M")]
struct LiveRestoreCmd {
    /// QEMU's QMP socket (no other client may be connected to it)
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,

    /// The block node (or drive) the guest reads, served from the backup
    #[arg(long, value_name = "NODE")]
    node: String,

    /// Block device or raw image file to restore into
    #[arg(long, value_name = "PATH")]
    target: PathBuf,

    /// Bytes per second for the background copy (K, M, G suffixes;
    /// guest writes are not limited) [default: no limit]
    #[arg(long, value_name = "BYTES", value_parser = parse_speed)]
    speed: Option<u64>,

    /// Overwrite a target that holds data
    #[arg(long)]
    force: bool,
}

fn parse_speed(s: &str) -> Result<u64, String> {
    match backy_common::units::parse_bytes(s) {
        Ok(0) => Err("must be more than 0".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.message),
    }
}

/// Show the revisions and health of one job, or one line per job.
#[derive(Args, Debug)]
#[command(after_help = "\
Without JOB, one summary line per job the caller may see (streamed: any
number of jobs); with JOB, its revisions.

Examples:
  backy-client status
  backy-client status vm1 --json")]
struct StatusCmd {
    /// Job name, or a group's (client.yaml groups:: its instants across its
    /// members) [default: all jobs]
    #[arg(value_name = "JOB", value_parser = parse_job)]
    job: Option<JobName>,
}

fn parse_job(s: &str) -> Result<JobName, String> {
    JobName::new(s).map_err(|e| e.message)
}

fn parse_member_target(s: &str) -> Result<(JobName, PathBuf), String> {
    let (job, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s}: expected JOB=PATH"))?;
    if path.is_empty() {
        return Err(format!("{s}: no PATH after ="));
    }
    Ok((parse_job(job)?, PathBuf::from(path)))
}

fn main() -> ExitCode {
    backy_common::allocator::keep_buffers_on_heap();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    backy_common::logging::init(backy_common::logging::Verbosity {
        // The agent is a service: what it does is worth a line each.
        default: if matches!(cli.command, Command::Agent(_)) {
            tracing::Level::INFO
        } else {
            tracing::Level::WARN
        },
        verbose: cli.verbose,
        quiet: cli.quiet,
    });
    let (is_check, json) = (matches!(cli.command, Command::Check(_)), cli.json);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let message = output::one_line(&format!("{e:#}"));
            let error = e.chain().find_map(|c| c.downcast_ref::<backy_common::Error>());
            if is_check {
                // A monitoring probe that cannot ask is UNKNOWN, not an error.
                let report = check::unknown(&message);
                let _ = if json {
                    print_json(&report)
                } else {
                    print_out(&format!("BACKY UNKNOWN: {message}\n"))
                };
                return ExitCode::from(check::State::Unknown as u8);
            }
            if json {
                eprintln!("{}", Failure::new(error, message).to_json());
            } else {
                eprintln!("backy-client: error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Bad arguments: clap's message (or a JSON failure with --json) and exit
/// 2, or 3 (UNKNOWN) for `check`, whose callers read exit codes as states.
/// --help and --version are not errors.
fn usage_error(e: &clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--json") {
        // clap's reason comes first (sometimes over several lines), then a
        // blank line, usage and hints.
        let text = e.to_string();
        let reason: Vec<&str> = text
            .lines()
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
            .collect();
        let message = output::one_line(reason.join(" ").trim_start_matches("error: "));
        eprintln!("{}", Failure::usage(message).to_json());
    } else {
        let _ = e.print();
    }
    if subcommand_of(&args).as_deref() == Some("check") {
        ExitCode::from(check::State::Unknown as u8)
    } else {
        ExitCode::from(2)
    }
}

/// The subcommand named on a command line that did not parse: the first
/// word that is neither an option nor the value of a global option.
fn subcommand_of(args: &[String]) -> Option<String> {
    use clap::CommandFactory;
    let command = Cli::command();
    let takes_value = |name: &str| {
        command.get_arguments().any(|a| {
            a.get_action().takes_values()
                && (a.get_long() == Some(name) || name.len() == 1 && a.get_short() == name.chars().next())
        })
    };
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if let Some(long) = word.strip_prefix("--") {
            if !long.contains('=') && takes_value(long) {
                words.next();
            }
        } else if let Some(short) = word.strip_prefix('-').filter(|s| s.len() == 1) {
            if takes_value(short) {
                words.next();
            }
        } else if !word.starts_with('-') {
            return Some(word.clone());
        }
    }
    None
}

/// `decrypt`: a stored revision file to plaintext, written whole (a file
/// target under a temporary name, renamed when complete).
fn run_decrypt(cmd: &DecryptCmd) -> anyhow::Result<()> {
    let key = backy_client::encryption::read_key(&cmd.key_file)?;
    let mut input =
        std::fs::File::open(&cmd.input).with_context(|| format!("opening {}", cmd.input.display()))?;
    if cmd.output.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        backy_client::encryption::decrypt_image(&key, &mut input, &mut out)?;
        out.flush().context("writing standard output")?;
        return Ok(());
    }
    if cmd.output.exists() {
        anyhow::bail!("{} exists: not replaced", cmd.output.display());
    }
    let dir = match cmd.output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    backy_client::encryption::decrypt_image(
        &key,
        &mut input,
        &mut std::io::BufWriter::new(tmp.as_file_mut()),
    )?;
    tmp.as_file().sync_all().context("syncing the output")?;
    tmp.persist_noclobber(&cmd.output)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", cmd.output.display(), e.error))?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    // Needs no config and no server.
    if let Command::Assets(a) = &cli.command {
        a.run(
            <Cli as clap::CommandFactory>::command(),
            &backy_common::config_reference::CLIENT,
        )?;
        return Ok(0);
    }
    // The key alone.
    match &cli.command {
        Command::Keygen(cmd) => {
            let key = backy_client::encryption::keygen(&cmd.path)?;
            if !cli.quiet {
                println!(
                    "wrote {} (key check {}); keep a copy away from this host",
                    cmd.path.display(),
                    hex::encode(key.check())
                );
            }
            return Ok(0);
        }
        Command::Decrypt(cmd) => {
            run_decrypt(cmd)?;
            return Ok(0);
        }
        _ => {}
    }
    // Talks to QEMU only (what serves the source node is the caller's).
    if let Command::LiveRestore(cmd) = &cli.command {
        return run_live_restore(&cli, cmd);
    }
    let config = settings::load(cli.config.as_deref())?;
    let urls = settings::server_urls(cli.server.as_deref(), &config);
    for url in &urls {
        connect::check_url(url)?;
    }
    let creds = connect::Credentials::load(&connect::CredentialFiles {
        token_file: cli.token_file.as_deref().or(config.token_file.as_deref()),
        ca: cli.ca.as_deref().or(config.ca.as_deref()),
        cert: cli.cert.as_deref().or(config.cert.as_deref()),
        key: cli.key.as_deref().or(config.key.as_deref()),
        tls_server_name: cli
            .tls_server_name
            .as_deref()
            .or(config.tls_server_name.as_deref()),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        // An export stops on a signal by itself, and says what it served.
        let exporting = matches!(cli.command, Command::Export(_));
        tokio::select! {
            result = dispatch(&cli, &urls, &creds, &config) => result,
            // Stopping is how an agent ends (systemd, ^C): not an error.
            signal = interrupted(), if !exporting => if matches!(cli.command, Command::Agent(_)) {
                tracing::info!("agent stopping on {signal}");
                Ok(0)
            } else {
                Err(anyhow::anyhow!("interrupted by {signal}"))
            },
        }
    });
    // Dropping the runtime waits for the reader/writer threads to stop, so an
    // interrupted restore has removed its temporary file before we exit.
    drop(runtime);
    result
}

/// Connects to the first of `urls` that answers, in order (servers in
/// front of one pool); the last error when none does.
async fn connect_first(
    urls: &[String],
    creds: &connect::Credentials,
    timeout: std::time::Duration,
) -> backy_common::Result<connect::Client> {
    let mut last = None;
    for url in urls {
        match connect::connect_within(url, creds, timeout).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                if urls.len() > 1 {
                    tracing::warn!("{url}: {e}; trying the next server");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| backy_common::Error::invalid("no server to connect to")))
}

/// Runs the command; returns the exit status.
async fn dispatch(
    cli: &Cli,
    urls: &[String],
    creds: &connect::Credentials,
    config: &backy_common::config::ClientConfig,
) -> anyhow::Result<u8> {
    let config_name = settings::config_name(cli.config.as_deref());
    if let Command::Agent(cmd) = &cli.command {
        // The agent connects (and reconnects) by itself: the server may be
        // down when it starts.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let jobs = agent::JobsConfig::new(cli.config.clone(), config.clone(), config_name);
        let options = agent::AgentOptions {
            name: cmd.name.clone(),
            host,
            workers: cmd.workers,
            connect_timeout: std::time::Duration::from_secs(cli.timeout),
        };
        // A session with every listed server (each reconnects by itself).
        agent::run(urls, creds, &options, jobs).await?;
        return Ok(0);
    }
    if let Command::Push(cmd) = &cli.command {
        if config.groups.contains_key(&cmd.job) {
            if cmd.source.is_some() || cmd.changed_ranges.is_some() {
                anyhow::bail!(
                    "{} is a group in {config_name} (groups:): --source and --changed-ranges name one disk; \
                     push a member job for that",
                    cmd.job
                );
            }
        } else {
            push::check_listed(&cmd.job, cmd.source.as_deref(), config, &config_name)?;
        }
    }
    let progress = progress::Terminal::if_wanted(cli.json || cli.quiet);
    let timeout = std::time::Duration::from_secs(cli.timeout);
    let mut client = connect_first(urls, creds, timeout).await?;
    // A command's result, unless --quiet.
    let result = |value: &dyn Reported| if cli.quiet { Ok(()) } else { value.print(cli.json) };
    match &cli.command {
        Command::Push(cmd) if config.groups.contains_key(&cmd.job) => {
            let options = group::PushOptions {
                force: cmd.force,
                tags: cmd.tags.clone(),
                allow_unscheduled: cmd.allow_unscheduled,
                allow_shrink: cmd.allow_shrink,
                audit_sample: cmd.audit_sample,
                bwlimit: cmd
                    .bwlimit
                    .or(config.bwlimit)
                    .map(|rate| backy_client::bwlimit::Limiter::new(Some(rate))),
                new_key: cmd.new_key,
            };
            let args = group::push_args(config, &cmd.job, &config_name, options)?;
            match push::push_group(&mut client, &args, &*progress).await? {
                Some(pushed) => {
                    result(&pushed)?;
                    if !pushed.complete {
                        return Ok(1);
                    }
                }
                None if !cli.quiet && !cli.json && std::io::stdout().is_terminal() => {
                    print_out(&format!("group {}: none of its jobs is due\n", cmd.job))?;
                }
                None => {}
            }
        }
        Command::Push(cmd) => {
            let args = push::PushArgs {
                job: cmd.job.clone(),
                source: cmd.source.clone(),
                configured: config.source_of(&cmd.job).cloned(),
                config_name,
                force: cmd.force,
                tags: cmd.tags.clone(),
                allow_unscheduled: cmd.allow_unscheduled,
                allow_shrink: cmd.allow_shrink,
                changed_ranges: cmd.changed_ranges.clone(),
                key: backy_client::encryption::job_key(config.encryption_of(&cmd.job))?,
                new_key: cmd.new_key,
                audit_sample: cmd
                    .audit_sample
                    .unwrap_or_else(|| config.audit_sample_of(&cmd.job)),
                bwlimit: cmd
                    .bwlimit
                    .or(config.bwlimit)
                    .map(|rate| backy_client::bwlimit::Limiter::new(Some(rate))),
                group: None,
            };
            let pushed = match push::push(&mut client, &args, &*progress).await {
                // Another server in front of the same pool holds the job:
                // the push runs again there, once (a second refusal stands).
                Err(e) if e.redirect.is_some() => {
                    let holder = e.redirect.clone().unwrap_or_default();
                    let refused = e.to_string();
                    let following = || format!("{refused}; following it to {holder}");
                    connect::check_url(&holder).with_context(following)?;
                    tracing::info!(job = %cmd.job, "{refused}: pushing through {holder}");
                    let mut there = connect::connect_within(&holder, creds, timeout)
                        .await
                        .with_context(following)?;
                    // A holder that stopped answering (frozen, partitioned)
                    // is no place to send a push to: it must answer first.
                    tokio::time::timeout(timeout, connect::server_protocol(&mut there))
                        .await
                        .map_err(|_| {
                            backy_common::Error::unavailable(format!(
                                "no answer within {} s",
                                timeout.as_secs()
                            ))
                        })
                        .and_then(|answered| answered)
                        .with_context(following)?;
                    push::push(&mut there, &args, &*progress).await?
                }
                other => other?,
            };
            if let Some(pushed) = pushed {
                result(&pushed)?;
            } else if !cli.quiet && (cli.verbose > 0 || (!cli.json && std::io::stdout().is_terminal())) {
                // Not due: silent for cron and timers; a person is told
                // when, on stdout (stderr under --json, which keeps stdout
                // for documents).
                let status = status::fetch(&mut client, &cmd.job).await.ok();
                let status = status.as_ref().and_then(|s| s.jobs.first());
                let line = push::not_due_line(cmd.job.as_str(), status, chrono::Utc::now());
                if cli.json {
                    eprintln!("{line}");
                } else {
                    print_out(&format!("{line}\n"))?;
                }
            }
        }
        Command::Export(cmd) => {
            let args = export::ExportArgs {
                job: cmd.job.clone(),
                revision: cmd.revision.clone(),
                listen: match (&cmd.socket, cmd.listen) {
                    (Some(path), _) => export::Listen::Unix(path.clone()),
                    (None, Some(addr)) => export::Listen::Tcp(addr),
                    (None, None) => anyhow::bail!("--socket or --listen is required"),
                },
                overlay: cmd.overlay.clone(),
                cache_bytes: (cmd.cache_mib << 20) as usize,
                once: cmd.once,
            };
            let exported = export::Export::open(&mut client, &args).await?;
            // Said even under --quiet, on one line (JSON too): it is how a
            // script learns the URI and that the socket accepts.
            if cli.json {
                print_out(&output::line(&exported.ready).context("encoding JSON")?)?;
            } else {
                exported.ready.print(false)?;
            }
            let served = exported
                .serve(async {
                    let signal = interrupted().await;
                    tracing::info!("export stopping on {signal}");
                })
                .await?;
            result(&served)?;
        }
        Command::Restore(cmd) if config.groups.contains_key(&cmd.job) => {
            if cmd.target.is_some() || cmd.key_file.is_some() {
                anyhow::bail!(
                    "{} is a group in {config_name} (groups:): each disk goes to its own target (--to DIR or \
                     --target JOB=PATH) and each member's key comes from its job's encryption:",
                    cmd.job
                );
            }
            let members = group::Members::fetch(&mut client, &cmd.job, &config.groups[&cmd.job]).await?;
            let mut keys = std::collections::BTreeMap::new();
            for job in &members.jobs {
                if let Some(key) = backy_client::encryption::job_key(config.encryption_of(job))? {
                    keys.insert(job.clone(), key);
                }
            }
            let args = group::restore::GroupRestoreArgs {
                instant: cmd.revision.clone(),
                targets: group::restore::targets(
                    &members.jobs,
                    &cmd.job,
                    cmd.to.as_deref(),
                    &cmd.member_targets,
                )?,
                force: cmd.force,
                full: cmd.full,
                quiet: cli.quiet || cli.json,
                keys,
            };
            let restored = group::restore::restore(&mut client, &members, &args, &*progress).await?;
            result(&restored)?;
        }
        Command::Restore(cmd) => {
            let target = match (&cmd.target, cmd.to.is_some() || !cmd.member_targets.is_empty()) {
                (Some(target), false) => target.clone(),
                _ => anyhow::bail!(
                    "{} is a job, not a group in {config_name} (groups:): give one TARGET, not --to or --target",
                    cmd.job
                ),
            };
            let args = restore::RestoreArgs {
                job: cmd.job.clone(),
                revision: cmd.revision.clone(),
                target,
                force: cmd.force,
                full: cmd.full,
                quiet: cli.quiet || cli.json,
                key: match &cmd.key_file {
                    Some(path) => Some(std::sync::Arc::new(backy_client::encryption::read_key(path)?)),
                    None => backy_client::encryption::job_key(config.encryption_of(&cmd.job))?,
                },
            };
            let restored = restore::restore(&mut client, &args, &*progress).await?;
            if args.target.as_os_str() == restore::STDOUT {
                // Stdout carries the image: the report goes to stderr.
                if !cli.quiet {
                    let text = if cli.json {
                        output::document(&restored).context("encoding JSON")?
                    } else {
                        format!("{restored}\n")
                    };
                    eprint!("{text}");
                }
            } else {
                result(&restored)?;
            }
        }
        Command::Status(StatusCmd { job: Some(name) }) if config.groups.contains_key(name) => {
            let members = group::Members::fetch(&mut client, name, &config.groups[name]).await?;
            if cli.json {
                print_json(&group::status::GroupStatusView::from(&members))?;
            } else {
                print_out(&group::status::format(&members, chrono::Utc::now()))?;
            }
        }
        Command::Status(StatusCmd { job: Some(job) }) => {
            let reply = status::fetch(&mut client, job).await?;
            if cli.json {
                print_json(&status::StatusView::from(&reply))?;
            } else {
                print_out(&status::format_status(&reply, chrono::Utc::now()))?;
            }
        }
        Command::Status(StatusCmd { job: None }) => {
            let jobs = summary::fetch_all(&mut client).await?;
            if cli.json {
                print_json(&summary::SummariesView::from(&jobs[..]))?;
            } else {
                print_out(&summary::format_summaries(&jobs, chrono::Utc::now()))?;
            }
        }
        Command::Verify(VerifyCmd {
            job,
            revision,
            source: Some(source),
            sample,
        }) => {
            if config.groups.contains_key(job) {
                anyhow::bail!("{job} is a group in {config_name} (groups:): --source compares one disk; name a member job");
            }
            let cli_source = (!source.is_empty()).then_some(source.as_str());
            let spec = push::source_spec(job.as_str(), cli_source, config.source_of(job), &config_name)?;
            let compared = source_check::compare(
                &mut client,
                job,
                revision,
                spec,
                *sample,
                backy_client::encryption::job_key(config.encryption_of(job))?,
            )
            .await?;
            result(&compared)?;
            if !compared.equal() {
                return Ok(1);
            }
        }
        Command::Verify(cmd) if config.groups.contains_key(&cmd.job) => {
            let members = group::Members::fetch(&mut client, &cmd.job, &config.groups[&cmd.job]).await?;
            let verified = group::verify::verify(&mut client, &members, &cmd.revision).await?;
            result(&verified)?;
            if !verified.all_ok() {
                return Ok(1);
            }
        }
        Command::Verify(cmd) => {
            let verified = revisions::verify(&mut client, &cmd.job, &cmd.revision).await?;
            result(&verified)?;
            if !verified.all_ok() {
                return Ok(1);
            }
        }
        Command::Distrust(cmd) => {
            let changed = revisions::distrust(&mut client, &cmd.job, &cmd.revision, cmd.dry_run).await?;
            result(&changed)?;
        }
        Command::Forget(cmd) => {
            let changed = revisions::forget(&mut client, &cmd.job, &cmd.revision, cmd.dry_run).await?;
            result(&changed)?;
        }
        Command::Tags(cmd) => {
            let options = revisions::ChangeOptions {
                dry_run: cmd.dry_run,
                allow_unscheduled: cmd.allow_unscheduled,
            };
            let changed = revisions::tags(
                &mut client,
                &cmd.job,
                &cmd.revision,
                cmd.action,
                &cmd.tags,
                options,
            )
            .await?;
            result(&changed)?;
        }
        Command::Check(CheckCmd { job: Some(name) }) if config.groups.contains_key(name) => {
            let members = group::Members::fetch(&mut client, name, &config.groups[name]).await?;
            return print_check(cli.json, &group::status::evaluate(&members, chrono::Utc::now()));
        }
        Command::Check(CheckCmd { job: Some(job) }) => {
            let reply = status::fetch(&mut client, job).await?;
            let health: Vec<check::JobHealth> = reply.jobs.iter().map(check::JobHealth::from).collect();
            return print_check(cli.json, &check::evaluate(&health, chrono::Utc::now()));
        }
        Command::Check(CheckCmd { job: None }) => {
            let jobs = summary::fetch_all(&mut client).await?;
            let health: Vec<check::JobHealth> = jobs.iter().map(check::JobHealth::from).collect();
            return print_check(cli.json, &check::evaluate_host(&health, chrono::Utc::now()));
        }
        Command::Agent(_) => anyhow::bail!("internal error: the agent is not run over a shared connection"),
        Command::LiveRestore(_) => anyhow::bail!("internal error: a live restore needs no server connection"),
        Command::Assets(_) => anyhow::bail!("internal error: assets are written before connecting"),
        Command::Keygen(_) | Command::Decrypt(_) => {
            anyhow::bail!("internal error: keygen and decrypt need no server connection")
        }
    }
    Ok(0)
}

/// `live-restore`: the copy runs on a blocking thread; a signal stops it,
/// and the guest stays on its source (the thread undoes its steps first).
fn run_live_restore(cli: &Cli, cmd: &LiveRestoreCmd) -> anyhow::Result<u8> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let opts = live_restore::MirrorOptions {
        speed: cmd.speed,
        force: cmd.force,
        stop: Some(stop.clone()),
        ..Default::default()
    };
    let (qmp_path, node, target) = (cmd.qmp.clone(), cmd.node.clone(), cmd.target.clone());
    let progress = progress::Terminal::if_wanted(cli.json || cli.quiet);
    let copy = move || -> backy_common::Result<live_restore::MirrorReport> {
        let mut qmp = backy_client::qmp::Qmp::connect(&qmp_path, LIVE_RESTORE_QMP_TIMEOUT)?;
        let mut meter: Option<std::sync::Arc<dyn progress::Meter>> = None;
        let report = live_restore::mirror_into(&mut qmp, &node, &target, &opts, |done, total| {
            let meter = meter.get_or_insert_with(|| progress.start("live restore", total));
            meter.set(done.min(total));
        });
        if let Some(meter) = meter {
            meter.finish();
        }
        report
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        let mut task = tokio::task::spawn_blocking(copy);
        tokio::select! {
            joined = &mut task => joined,
            signal = interrupted() => {
                stop.store(true, Ordering::Relaxed);
                let _ = task.await;
                return Err(anyhow::anyhow!("interrupted by {signal}: the guest stays on its source"));
            }
        }
        .context("the live restore thread failed")?
        .map_err(anyhow::Error::from)
    })?;
    if !cli.quiet {
        report.print(cli.json)?;
    }
    Ok(0)
}

/// Bound on each QMP reply during a live restore.
const LIVE_RESTORE_QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A command's result: one line (or a few) for people, a JSON document
/// for programs.
trait Reported {
    fn print(&self, json: bool) -> anyhow::Result<()>;
}

impl<T: Serialize + std::fmt::Display> Reported for T {
    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            print_json(self)
        } else {
            print_out(&format!("{self}\n"))
        }
    }
}

/// The check's line or document; its state is the exit status.
fn print_check(json: bool, report: &check::Report) -> anyhow::Result<u8> {
    if json {
        print_json(report)?;
    } else {
        print_out(&format!("{}\n", report.line()))?;
    }
    Ok(report.exit_code)
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    print_out(&output::document(value).context("encoding JSON")?)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli =
            Cli::try_parse_from(["backy-client", "push", "vm1", "--force", "--tags", "a,manual:b"]).unwrap();
        let Command::Push(p) = cli.command else { panic!() };
        assert_eq!(p.tags, ["a", "manual:b"]);
        assert!(Cli::try_parse_from(["backy-client", "push", "vm1", "--tags", "a"]).is_err());
        assert!(Cli::try_parse_from(["backy-client", "push", "../x"]).is_err());

        let cli = Cli::try_parse_from(["backy-client", "restore", "vm1", "/tmp/x", "-v", "--json"]).unwrap();
        assert!(cli.json && cli.verbose == 1);
        let Command::Restore(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.revision, "latest");
        assert_eq!(r.target, Some(PathBuf::from("/tmp/x")));
        assert!(
            Cli::try_parse_from(["backy-client", "restore", "vm1"]).is_err(),
            "a target is required"
        );
        let cli = Cli::try_parse_from([
            "backy-client",
            "restore",
            "g",
            "--to",
            "/r",
            "--target",
            "a=/dev/x",
            "--target",
            "b=rbd:p/i",
        ])
        .unwrap();
        let Command::Restore(r) = cli.command else {
            panic!()
        };
        assert_eq!((r.target, r.to), (None, Some(PathBuf::from("/r"))));
        assert_eq!(
            r.member_targets[1],
            (JobName::new("b").unwrap(), PathBuf::from("rbd:p/i"))
        );
        assert!(Cli::try_parse_from(["backy-client", "restore", "g", "--target", "a"]).is_err());
        assert!(Cli::try_parse_from(["backy-client", "restore", "g", "/x", "--to", "/r"]).is_err());

        let cli = Cli::try_parse_from([
            "backy-client",
            "live-restore",
            "--qmp",
            "/run/vm1.qmp",
            "--node",
            "backup0",
            "--target",
            "/dev/vg/vm1",
            "--speed",
            "8M",
        ])
        .unwrap();
        let Command::LiveRestore(l) = cli.command else {
            panic!()
        };
        assert_eq!(
            (l.node.as_str(), l.speed, l.force),
            ("backup0", Some(8 << 20), false)
        );
        let live = [
            "backy-client",
            "live-restore",
            "--qmp",
            "q",
            "--node",
            "n",
            "--target",
            "t",
        ];
        assert!(Cli::try_parse_from(live.iter().chain(&["--speed", "0"])).is_err());
        assert!(Cli::try_parse_from(&live[..6]).is_err(), "--target is required");

        let cli = Cli::try_parse_from(["backy-client", "status", "--server", "http://h:1"]).unwrap();
        assert_eq!(cli.server.as_deref(), Some("http://h:1"));
        assert!(matches!(cli.command, Command::Status(StatusCmd { job: None })));
    }
}
