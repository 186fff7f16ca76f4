//! `backy-server`: stores revisions of VM disks sent by `backy-client`.

use anyhow::Context;
use backy_common::config::{ServerConfig, DEFAULT_SERVER_CONFIG};
use backy_common::units::count;
use backy_common::JobName;
use backy_server::{preflight, serve};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "backy-server",
    version,
    about = "Stores block-level backups of VM disks as reflinked revisions",
    after_help = "Examples:\n  backy-server --config /etc/backy/server.yaml\n  backy-server --config server.yaml check-config"
)]
struct Cli {
    /// Server configuration (YAML; every key in man 5 backy-server.yaml).
    #[arg(
        long,
        short,
        env = "BACKY_SERVER_CONFIG",
        default_value = DEFAULT_SERVER_CONFIG,
        global = true
    )]
    config: PathBuf,
    /// Log more: one level per v (info, then debug, then trace); RUST_LOG overrides.
    #[arg(long, short, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Run every check start-up runs (config, TLS files and their modes,
    /// base-dir writable) and exit; as root, also whether the service's
    /// user can open every file the server will (config, TLS files, the
    /// replica's token, CA and key, base-dir).
    #[command(
        after_help = "Examples:\n  backy-server check-config\n  backy-server check-config --as-user backy"
    )]
    CheckConfig {
        /// Check the files as this user [default: as root, the User= of the
        /// installed backy-server.service; else the user running this]
        #[arg(long, value_name = "USER")]
        as_user: Option<String>,
    },
    /// Show what expiry would delete, and why, without changing anything:
    /// the next periodic run, and the run after each job's next backup.
    #[command(
        after_help = "Examples:\n  backy-server expire --dry-run\n  backy-server expire --dry-run vm1"
    )]
    Expire {
        /// Required: expiry itself runs inside the server.
        #[arg(long, required = true)]
        dry_run: bool,
        /// Only this job [default: every scheduled job]
        #[arg(value_name = "JOB", value_parser = parse_job)]
        job: Option<JobName>,
    },
    /// Make equal blocks stored apart share one copy on disk.
    ///
    /// Where blocks of revisions (of any job) are equal but stored apart,
    /// shares their extents (reflinks; the kernel compares the bytes
    /// first). Safe while the server runs and pushes arrive. Resumable:
    /// revisions walked by an earlier run are skipped. Says what it saved
    /// at the end.
    #[command(
        after_help = "Examples:\n  backy-server dedup\n  backy-server dedup vm1 vm2\n  backy-server dedup --restart --rebuild-index"
    )]
    Dedup {
        /// Only these jobs [default: every job directory in base-dir]
        #[arg(value_name = "JOB", value_parser = parse_job)]
        jobs: Vec<JobName>,
        /// Walk every revision again, also those an earlier run finished.
        #[arg(long)]
        restart: bool,
        /// Rebuild the digest index from every manifest first (done anyway
        /// when the index is missing or damaged).
        #[arg(long)]
        rebuild_index: bool,
    },
    /// Print the hash of a client token for `clients: NAME: token-hash:`.
    /// Reads the token from stdin (so it stays out of shell history and
    /// `ps`), or makes a new one with --generate.
    #[command(
        after_help = "Examples:\n  backy-server hash-token --generate /etc/backy/hv01.token\n  backy-server hash-token < /etc/backy/hv01.token"
    )]
    HashToken {
        /// Make a new random token: writes it to FILE (mode 0600) and
        /// prints its hash.
        #[arg(long, value_name = "FILE")]
        generate: Option<PathBuf>,
    },
    /// Print the `client.yaml` part for jobs whose `source:`/`hooks:` are
    /// still in this server config (from older versions; the server no
    /// longer starts with them): one fragment per client identity, to put
    /// on that hypervisor; then remove them here.
    #[command(
        after_help = "Examples:\n  backy-server migrate-sources\n  backy-server migrate-sources vm1 vm2"
    )]
    MigrateSources {
        /// Only these jobs [default: every job with a source]
        #[arg(value_name = "JOB")]
        jobs: Vec<String>,
    },
    /// Hand jobs to another server in front of the same Ceph pool.
    ///
    /// Records a request in the pool (as the store's identity): the
    /// job's lease holder stops taking new work on it, lets a push still
    /// running there finish, releases the lease, and the target server
    /// takes it at its next lease round; meanwhile every server sends the
    /// job's clients to the target. The job stays reserved for the target
    /// until --reserve has passed, after which any server may take it
    /// again (a target that never comes strands no job). Waits up to
    /// --wait, then prints one line per job. Exit status: 0 when the target
    /// holds each job (or the job is free and reserved for it), 3 when a
    /// holder has not released a job within --wait (the request stands),
    /// 1 on an error (nothing recorded for bad arguments). Only on a
    /// ceph-rbd store.
    #[command(
        after_help = "Examples:\n  backy-server hand-over vm1 --to https://backup02:6023\n  backy-server hand-over vm1 vm2 vm3 --to https://backup02:6023 --wait 2m --reserve 1h"
    )]
    HandOver {
        /// The jobs to move (names from server.yaml).
        #[arg(value_name = "JOB", required = true)]
        jobs: Vec<String>,
        /// The target server's URL, as it names itself in lock records and
        /// its log ("this server's name in lock records and hand-overs").
        #[arg(long, value_name = "URL")]
        to: String,
        /// How long to wait for the target to hold each job [default: 3
        /// lease-renewal intervals]
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
        /// How long the jobs stay reserved for the target [default: 4
        /// lease durations]; give a running push time to end
        #[arg(long, value_name = "DURATION")]
        reserve: Option<String>,
    },
    /// Print the fingerprint of a client certificate (PEM) for
    /// `clients: NAME: cert-fingerprint:` (mutual TLS).
    CertFingerprint {
        #[arg(value_name = "CERT.pem")]
        cert: PathBuf,
    },
    /// `completions SHELL`, and the hidden `generate-assets` (packaging).
    #[command(flatten)]
    Assets(backy_cli_assets::AssetsCommand),
}

fn hash_token(generate: Option<&PathBuf>) -> anyhow::Result<()> {
    use backy_common::token;
    let text = match generate {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let t = token::generate_token();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating token file {}", path.display()))?;
            writeln!(f, "{t}").with_context(|| format!("writing {}", path.display()))?;
            t
        }
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_line(&mut t)
                .context("reading the token from stdin")?;
            t
        }
    };
    print_out(&format!("{}\n", token::hash_token(&text)?))
}

fn cert_fingerprint(path: &PathBuf) -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
    print_out(&format!("{}\n", backy_common::token::cert_fingerprint(&der)))
}

fn parse_job(s: &str) -> Result<JobName, String> {
    JobName::new(s).map_err(|e| e.message)
}

/// Prints the expiry preview of `job` or of every job.
fn expire_dry_run(config: &ServerConfig, job: Option<&JobName>) -> anyhow::Result<()> {
    let names: Vec<JobName> = match job {
        Some(j) => {
            config.job(j)?;
            vec![j.clone()]
        }
        None => config.jobs.keys().cloned().collect(),
    };
    let now = chrono::Utc::now();
    let mut out = String::new();
    for name in names {
        let dir = backy_server::storage::JobDir::new(&config.base_dir, name.clone());
        let preview = backy_server::schedule::preview(config, &dir, now)?;
        out.push_str(&backy_server::schedule::format_preview(&name, preview.as_ref()));
    }
    print_out(&out)
}

/// Deduplicates `jobs` (or every job directory) of the store.
fn dedup(config: &ServerConfig, jobs: &[JobName], restart: bool, rebuild_index: bool) -> anyhow::Result<()> {
    use backy_common::units::format_bytes;
    use backy_server::dedup;
    let base = &config.base_dir;
    become_store_owner(base)?;
    backy_server::storage::durable::set_modes(config.file_mode, config.dir_mode());
    let dirs = if jobs.is_empty() {
        dedup::job_dirs(base)?
    } else {
        let mut dirs = Vec::new();
        for name in jobs {
            let dir = backy_server::storage::JobDir::new(base, name.clone());
            if !dir.path().is_dir() {
                anyhow::bail!("job {name}: no directory {} in base-dir", dir.path().display());
            }
            dirs.push(dir);
        }
        dirs
    };
    let opts = dedup::store::Options {
        restart,
        rebuild_index,
    };
    let report = dedup::store::run(base, &dirs, opts, &mut |line| {
        let _ = print_out(&format!("{line}\n"));
    })?;
    let t = report.totals;
    let (before, after) = (report.used_before, report.used_after);
    let change = if after <= before {
        format!("{} less", format_bytes(before - after))
    } else {
        format!("{} more: other writes meanwhile", format_bytes(after - before))
    };
    print_out(&format!(
        "deduplicated {} of {} blocks ({}) in {}, {} ({} done before); \
         store used {} before, {} after ({change})\n",
        t.deduped,
        t.blocks,
        format_bytes(t.deduped_bytes),
        count(report.jobs, "job"),
        count(t.revisions, "revision"),
        t.skipped,
        format_bytes(before),
        format_bytes(after),
    ))
}

/// Run as root on a store the service's user owns: becomes that user, so
/// every file the run makes (the digest index, its records) is the
/// server's to open and replace, as if the server had made it.
fn become_store_owner(base: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(base).with_context(|| format!("reading base-dir {}", base.display()))?;
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } != 0 || owner.uid() == 0 {
        return Ok(());
    }
    // SAFETY: plain system calls on ids; each result is checked.
    let failed = unsafe {
        libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(owner.gid()) != 0
            || libc::setuid(owner.uid()) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("becoming uid {}, the owner of {}", owner.uid(), base.display()));
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn load(path: &PathBuf) -> anyhow::Result<ServerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(ServerConfig::from_yaml(&text, &path.display().to_string())?)
}

/// Whether the server's user can open every file it needs (issue 29,
/// item 4: root reads everything, the service does not), and, run as root
/// checking as the installed unit's user, whether its sandbox lets it. Returns the
/// user checked as, or `None` when only root checked (no unit, no
/// `--as-user`).
fn check_access(
    config: &ServerConfig,
    path: &std::path::Path,
    as_user: Option<&str>,
) -> anyhow::Result<Option<String>> {
    use backy_server::access::{problems, wanted, Account, Unit};
    // SAFETY: no arguments, cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let me = Account::current();
    let unit = Unit::installed();
    let unit_user = unit.as_ref().and_then(Unit::user);
    let name = match (as_user, root) {
        (Some(u), _) => Some(u.to_string()),
        (None, true) => unit_user.clone(),
        (None, false) => None,
    };
    let account = match &name {
        Some(n) if *n == me.who.name => None,
        Some(n) if !root => anyhow::bail!("checking as user {n} needs root (run check-config as root)"),
        Some(n) => Some(
            Account::named(n)?
                .ok_or_else(|| anyhow::anyhow!("no user {n} on this host (check-config --as-user USER)"))?,
        ),
        None if root => return Ok(None),
        None => None,
    };
    let files = wanted(config, path);
    let mut found = problems(account.as_ref(), &files, config.secrets_group.as_deref())?;
    let checked = account.map_or(me.who.name, |a| a.who.name);
    // Root asks for the service; its user running this by hand asks for
    // itself, outside the unit (as the package test does).
    if let Some(unit) = unit.filter(|_| root && unit_user.as_ref() == Some(&checked)) {
        found.extend(unit.sandbox_problems(&files));
    }
    if !found.is_empty() {
        anyhow::bail!("{}", found.join("; "));
    }
    Ok(Some(checked))
}

/// The hand-over's requests stand, but a holder has not released a job
/// within --wait: exit status 3 (the lines said so already).
#[derive(Debug)]
struct NotReleased;

impl std::fmt::Display for NotReleased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a holder has not released its job yet")
    }
}

impl std::error::Error for NotReleased {}

/// `backy-server hand-over`: every argument checked before the cluster is
/// contacted, so bad input records nothing.
fn hand_over(
    config: &ServerConfig,
    path: &std::path::Path,
    jobs: &[String],
    to: &str,
    wait: Option<&str>,
    reserve: Option<&str>,
) -> anyhow::Result<()> {
    use backy_common::units::Interval;
    use backy_server::pool_serve::handover_command::{run, Options};
    let Some(store) = config.ceph_store() else {
        anyhow::bail!(
            "backy-server hand-over moves jobs between servers in front of one ceph-rbd pool; {} \
             names a filesystem store (its jobs move to another host by replication)",
            path.display()
        );
    };
    let to = backy_common::handover::check_target(to)?;
    let mut names = Vec::new();
    for job in jobs {
        let name = JobName::new(job).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        config
            .job(&name)
            .map_err(|e| anyhow::anyhow!("{} in {}", e.message, path.display()))?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let times = store.lease_times()?;
    let interval =
        |flag: &str, given: Option<&str>, default_ms: u64| -> anyhow::Result<std::time::Duration> {
            match given {
                Some(text) => Ok(Interval::parse(text)
                    .map_err(|e| anyhow::anyhow!("--{flag}: {}", e.message))?
                    .as_duration()),
                None => Ok(std::time::Duration::from_millis(default_ms)),
            }
        };
    let wait = interval("wait", wait, 3 * times.renew_after)?;
    let reserve = interval("reserve", reserve, 4 * times.duration)?;
    let shortest = std::time::Duration::from_millis(2 * times.renew_after);
    if reserve < shortest {
        anyhow::bail!(
            "--reserve {} s is shorter than two lease renewals ({} s, store: lease-renewal): the \
             holder and the target might not see the request in time",
            reserve.as_secs(),
            shortest.as_secs()
        );
    }
    let pool = backy_server::pool::PoolStore::open(backy_server::pool::PoolConfig {
        conf: store.conf.clone(),
        id: store.id.clone(),
        keyring: store.keyring.clone(),
        pool: store.pool.clone(),
        namespace: store.namespace.clone(),
        op_timeout: Some(store.op_timeout.as_duration()),
    })
    .with_context(|| format!("store: ceph-rbd pool {}", store.pool))?;
    let by = format!(
        "{}@{}",
        backy_server::access::Account::current().who.name,
        backy_server::pool_serve::host_name()
    );
    let outcomes = run(
        &pool,
        &names,
        &Options {
            to,
            wait,
            reserve,
            by,
        },
    )?;
    let text: String = outcomes.iter().map(|o| format!("{}\n", o.line)).collect();
    print_out(&text)?;
    if outcomes.iter().all(|o| o.done) {
        Ok(())
    } else {
        Err(NotReleased.into())
    }
}

fn main() -> std::process::ExitCode {
    backy_common::allocator::keep_buffers_on_heap();
    // Usage errors exit 2 (clap's convention, as for backy-client); --help
    // and --version exit 0.
    let cli = Cli::parse();
    backy_common::logging::init(backy_common::logging::Verbosity {
        default: tracing::Level::INFO,
        verbose: cli.verbose,
        quiet: false,
    });
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<NotReleased>() => std::process::ExitCode::from(3),
        Err(e) => {
            eprintln!("backy-server: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::HashToken { generate }) => return hash_token(generate.as_ref()),
        Some(Command::CertFingerprint { cert }) => return cert_fingerprint(cert),
        Some(Command::Assets(a)) => {
            return Ok(a.run(
                <Cli as clap::CommandFactory>::command(),
                &backy_common::config_reference::SERVER,
            )?)
        }
        Some(Command::MigrateSources { jobs }) => {
            let text = std::fs::read_to_string(&cli.config)
                .with_context(|| format!("reading {}", cli.config.display()))?;
            let out = backy_common::config::migrate_sources(&text, &cli.config.display().to_string(), jobs)?;
            if out.is_empty() {
                eprintln!("{}: no job has a source: nothing to move", cli.config.display());
            }
            return print_out(&out);
        }
        _ => {}
    }
    let config = load(&cli.config)?;
    if let Some(Command::HandOver {
        jobs,
        to,
        wait,
        reserve,
    }) = &cli.command
    {
        return hand_over(
            &config,
            &cli.config,
            jobs,
            to,
            wait.as_deref(),
            reserve.as_deref(),
        );
    }
    if config.ceph_store().is_some() {
        // They read and rewrite the filesystem store under base-dir.
        let refused = match &cli.command {
            Some(Command::Expire { .. }) => Some("backy-server expire"),
            Some(Command::Dedup { .. }) => Some("backy-server dedup"),
            _ => None,
        };
        if let Some(what) = refused {
            anyhow::bail!("{}", backy_server::pool_serve::unsupported(what).message);
        }
    }
    if let Some(Command::Expire { dry_run: _, job }) = &cli.command {
        return expire_dry_run(&config, job.as_ref());
    }
    if let Some(Command::Dedup {
        jobs,
        restart,
        rebuild_index,
    }) = &cli.command
    {
        return dedup(&config, jobs, *restart, *rebuild_index);
    }
    let preflight = preflight(&config, &cli.config)?;
    if let Some(Command::CheckConfig { as_user }) = &cli.command {
        let checked_as = check_access(&config, &cli.config, as_user.as_deref())?;
        // Warnings, not errors: the revisions stay usable by id.
        let misread = backy_server::revisions::misread_tags(&config).context("reading the store")?;
        for line in &misread {
            eprintln!("warning: {line}; rename it: `backy-client tags JOB -r ID add NEW`, then `remove TAG`");
        }
        // The cluster is not contacted here: start-up does that.
        let storage = match config.ceph_store() {
            Some(c) => format!("ceph-rbd pool {} (not contacted)", c.pool),
            None => preflight.mode.as_str().to_string(),
        };
        return print_out(&format!(
            "{}: OK ({}, {}, storage {}{})\n",
            cli.config.display(),
            count(config.jobs.len() as u64, "job"),
            count(config.schedules.len() as u64, "schedule"),
            storage,
            checked_as
                .map(|u| format!("; files readable by {u}"))
                .unwrap_or_default()
        ));
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(serve(config, preflight, cli.config));
    // Connections still open are dropped here; blocking work sees its
    // caller gone and stops (a push keeps what it has for resuming).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}
