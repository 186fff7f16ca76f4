//! backy-server as a library: storage, schedules and the gRPC service, so
//! the binary stays a thin edge and tests can reach the parts.

pub mod access;
pub mod agent;
pub mod audit;
pub mod auth;
pub mod ceph;
pub mod dedup;
pub mod executor;
pub mod granule_read;
pub mod group;
pub mod http;
pub mod http_slots;
pub mod in_flight;
pub mod job;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod page;
pub mod plan;
pub mod pool;
pub mod pool_serve;
pub mod push;
pub mod replica;
pub mod replication;
pub mod restore;
pub mod revisions;
pub mod schedule;
pub mod scrape;
pub mod scrub;
pub mod service;
pub mod state;
pub mod status;
pub mod storage;
pub mod text;
pub mod tls;
pub mod wire;
pub mod work;

use anyhow::Context;
use backy_common::access::Need;
use backy_common::config::ServerConfig;
use backy_common::revision::StorageMode;
use backy_common::MAX_MESSAGE_BYTES;
use backy_proto::backy_server::BackyServer;
use state::Server;
use std::path::PathBuf;
use std::sync::Arc;

/// What start-up establishes before serving: every check `serve` makes on
/// its configuration and files, also run by `check-config`.
pub struct Preflight {
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub mode: StorageMode,
}

/// Checks the secret files' modes, loads and matches the TLS certificate
/// and key, and probes the base directory (created if missing, must be
/// writable; reflink or copy).
pub fn preflight(config: &ServerConfig, config_path: &std::path::Path) -> anyhow::Result<Preflight> {
    let tls = tls::server_tls(config, config_path)?;
    if let Some(t) = &tls {
        // Building the acceptor parses the certificate and key and checks
        // that they belong together.
        tonic::transport::Server::builder()
            .tls_config(t.clone())
            .context("TLS configuration")?;
    }
    let mode = storage::probe_storage(&config.base_dir).map_err(|e| {
        // Start-up runs as the service's user: say what it needs.
        let denied = (e.kind == backy_common::ErrorKind::PermissionDenied)
            .then(|| access::denied("base-dir", &config.base_dir, Need::Store, None))
            .flatten();
        match denied {
            Some(line) => anyhow::anyhow!(line),
            None => anyhow::Error::new(e).context(format!("base-dir {}", config.base_dir.display())),
        }
    })?;
    Ok(Preflight { tls, mode })
}

/// Cleans leftovers of every job, then serves until SIGINT/SIGTERM.
pub async fn serve(config: ServerConfig, preflight: Preflight, config_path: PathBuf) -> anyhow::Result<()> {
    storage::durable::set_modes(config.file_mode, config.dir_mode());
    wire::hide_store_path(&config.base_dir);
    let Preflight { tls, mode } = preflight;
    if mode == StorageMode::Copy {
        tracing::warn!(
            base_dir = %config.base_dir.display(),
            "storage: copy, not CoW: the filesystem cannot share extents (reflink), \
             so every revision costs its full data size; use btrfs, XFS (reflink=1) or ZFS"
        );
    }
    let addr: std::net::SocketAddr = config.listen.parse().context("listen address")?;
    // For the whole life of this process.
    let _store = storage::lock::StoreLock::acquire(&config.base_dir)?;
    let started = std::time::Instant::now();
    let server = Arc::new(Server::new(config, mode));
    dedup::attach(&server);
    let s = server.clone();
    let pool_config = server.config().ceph_store().cloned();
    let jobs = tokio::task::spawn_blocking(move || {
        if let Some(c) = pool_config {
            // Revisions live in the pool; base-dir keeps only local state.
            let pool = pool_serve::PoolBackend::open(&c, &s.config().listen)
                .with_context(|| format!("store: ceph-rbd pool {}", c.pool))?;
            let jobs = pool.store.jobs().context("listing the pool's jobs")?.len();
            let _ = s.pool.set(Arc::new(pool));
            return anyhow::Ok(jobs);
        }
        // Before the jobs' cleanup, which would remove the sealed files.
        let finished = group::recover(&s).context("finishing interrupted group commits")?;
        if finished > 0 {
            tracing::warn!(disks = finished, "finished interrupted group commits");
        }
        open_jobs(&s)
    })
    .await
    .context("opening the jobs")??;
    tracing::info!(
        jobs,
        "indexed the store in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let service = BackyServer::new(service::Service::new(server.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service =
        tonic::service::interceptor::InterceptedService::new(service, service::interceptor(server.clone()));
    // Expire once before serving, so what clients first see is settled
    // (revisions a stopped server should have expired are gone), then on
    // a timer.
    if let Some(pool) = server.pool() {
        // Expiry and scrub run on the jobs whose lease this server holds
        // (none at start).
        pool_serve::spawn_renewal(server.clone(), pool.clone());
        pool_serve::expire::spawn(server.clone(), pool, EXPIRY_EVERY);
        scrub::spawn(server.clone());
    } else {
        let s = server.clone();
        tokio::task::spawn_blocking(move || schedule::expire_all(&s))
            .await
            .context("expiry at start")?;
        spawn_expiry(server.clone());
        scrub::spawn(server.clone());
    }
    spawn_refusal_summaries(server.clone());
    spawn_reload_on_hup(server.clone(), config_path);
    // Health: SERVING from here until shutdown begins.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BackyServer<service::Service>>().await;
    if let Some(http) = http::HttpListener::bind(&server.config()).await? {
        tracing::info!(
            "http listener on {} ({}://{}/ status page, /metrics, /healthz, /readyz)",
            http.addr,
            http.scheme(),
            http.addr
        );
        http.spawn(server.clone());
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    // The bound address: with port 0 in the config, the port the kernel chose.
    let bound = listener.local_addr()?;
    tracing::info!("listening on {bound}");
    if let Some(pool) = server.pool() {
        // Lock records name this server by where clients reach it.
        pool.set_address(bound, tls.is_some());
    }
    let mut builder = tonic::transport::Server::builder()
        // As the client: windows of several 1 MiB frames, large frames.
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20)
        // Bounds per connection; per-identity stream limits are in the service.
        .max_concurrent_streams(Some(64))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)));
    match tls {
        Some(t) => builder = builder.tls_config(t).context("TLS configuration")?,
        None => tracing::warn!(
            "insecure-plaintext: serving WITHOUT TLS on loopback address {bound}; \
             configure tls before clients on other hosts connect"
        ),
    }
    let nofile = listener::raise_nofile_limit();
    let config = server.config();
    let limits = listener::AcceptLimits {
        // Half the descriptors stay for revision files and the like.
        max_connections: (config.limits.max_connections as usize).min((nofile / 2).max(1) as usize),
        first_request: config.limits.first_request_timeout.as_duration(),
        idle: config.limits.idle_connection_timeout.as_duration(),
    };
    tracing::info!(
        max_connections = limits.max_connections,
        first_request_secs = limits.first_request.as_secs(),
        idle_secs = limits.idle.as_secs(),
        per_client = config.limits.connections_per_client,
        "connection limits"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = builder
        .layer(in_flight::CountInFlight::new(server.connections.clone()))
        .add_service(service)
        .add_service(health_service)
        .serve_with_incoming_shutdown(
            listener::incoming(listener, limits, server.connections.clone()),
            async {
                let _ = stopped.await;
            },
        );
    tokio::pin!(serving);
    // Copies start once this server answers for them.
    replica::spawn(server.clone());
    // Bound, configured and about to accept: a Type=notify unit is up now.
    notify::ready(&format!(
        "listening on {bound}, {}",
        backy_common::units::count(jobs as u64, "job")
    ));
    tokio::select! {
        result = &mut serving => result.context("serving")?,
        () = shutdown() => {
            // No new requests; streams in flight get a grace period. Agents
            // never end theirs, so the wait is bounded: what is still open
            // then is closed (an interrupted push stays resumable).
            server.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
            health.set_not_serving::<BackyServer<service::Service>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            tracing::info!("stopping: open streams get {} s to end", SHUTDOWN_GRACE.as_secs());
            notify::stopping(&format!("stopping: open streams get {} s to end", SHUTDOWN_GRACE.as_secs()));
            let _ = stop.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await {
                Ok(result) => result.context("serving")?,
                Err(_) => tracing::warn!(
                    "stopping: streams still open after {} s (agents, pushes) are closed",
                    SHUTDOWN_GRACE.as_secs()
                ),
            }
        }
    }
    if let Some(pool) = server.pool() {
        // Another server may take the jobs at once, not after the lease.
        let _ = tokio::task::spawn_blocking(move || pool.release_all()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Logs how many refusal lines each peer had suppressed, within a second
/// of its interval's end (see `audit::refused`).
fn spawn_refusal_summaries(server: Arc<Server>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            audit::flush_refusals(&server);
        }
    });
}

/// How long open streams may take to end once SIGTERM or SIGINT came.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// At start: each job's directories, leftovers of interrupted pushes, its
/// revisions in the index, and `latest`, on every core (thousands of jobs
/// mean hundreds of thousands of small files). What it makes (a first
/// start makes every job's `.since`, `.partial/` and `latest`) is synced
/// by one sync of the filesystem before anything is served, not by one
/// fsync per file and directory. Returns the number of jobs.
fn open_jobs(server: &Server) -> anyhow::Result<usize> {
    let config = server.config();
    let names: Vec<&backy_common::JobName> = config.jobs.keys().collect();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let chunk = names.len().div_ceil(threads).max(1);
    let config = &config;
    let made = std::thread::scope(|scope| {
        let workers: Vec<_> = names
            .chunks(chunk)
            .map(|part| scope.spawn(move || open_some(server, config, part)))
            .collect();
        workers.into_iter().try_fold(false, |made, w| {
            let part = w
                .join()
                .map_err(|_| anyhow::anyhow!("opening jobs: a worker panicked"))??;
            anyhow::Ok(made || part)
        })
    })?;
    if made {
        storage::durable::sync_filesystem(&config.base_dir)?;
    }
    Ok(names.len())
}

/// Opens `names` (see [`open_jobs`]); `true` when it made or changed a
/// file that is not synced yet.
fn open_some(
    server: &Server,
    config: &ServerConfig,
    names: &[&backy_common::JobName],
) -> anyhow::Result<bool> {
    let mut unsynced = false;
    for &name in names {
        let job = storage::JobDir::new(&config.base_dir, name.clone());
        let (made, since) = job.ensure_at_start()?;
        unsynced |= made;
        let resumable = job.resumable(config.resume.window.as_duration(), chrono::Utc::now());
        if let Some(r) = &resumable {
            tracing::info!(job = %name, rev = %r.id, checkpoint = r.checkpoint, "keeping an interrupted push for resuming");
            // Removed by the periodic round once its window has passed.
            server.jobs.activity.mark_leftovers(name);
        }
        // A transaction completes an interrupted deletion and removes what
        // no revision owns.
        let txn = job::Txn::begin(&server.jobs, &job)?;
        txn.clean_leftovers(resumable.map(|r| r.id))?;
        unsynced |= job.point_latest_unsynced(txn.revisions().last().map(|r| &r.id))?;
        // Revisions dated after the clock are found (and warned about) here.
        server
            .jobs
            .activity
            .dated(name, txn.revisions(), chrono::Utc::now());
        // What the transaction read is the index's entry: nothing reads
        // the store again before serving.
        txn.keep_index(Some(since));
    }
    Ok(unsynced)
}

/// How often expiry (and removal of interrupted pushes whose resume window
/// passed) runs besides after each commit.
const EXPIRY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Periodic expiry for all scheduled jobs after the one at start, on a
/// blocking thread per round.
fn spawn_expiry(server: Arc<Server>) {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now() + EXPIRY_EVERY;
        let mut tick = tokio::time::interval_at(start, EXPIRY_EVERY);
        loop {
            tick.tick().await;
            let s = server.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || schedule::expire_all(&s)).await {
                tracing::error!("expiry round failed: {e}");
            }
        }
    });
}

/// SIGHUP re-reads the configuration; running pushes keep the config they
/// started with. A bad file, or one changing what is fixed at start, is
/// refused with a log line and the old configuration stays.
fn spawn_reload_on_hup(server: Arc<Server>, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before the caller logs "listening": a SIGHUP right after
    // start reloads instead of killing the process (its default action).
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot handle SIGHUP: reloads are not possible");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            notify::reloading();
            let status = match reload(&server, &path) {
                Ok(jobs) => {
                    tracing::info!(jobs, "reloaded {}", path.display());
                    format!(
                        "reloaded {}: {}",
                        path.display(),
                        backy_common::units::count(jobs as u64, "job")
                    )
                }
                Err(why) => {
                    tracing::error!("reload: {why}; keeping the old configuration");
                    format!("reload refused, old configuration kept: {why}")
                }
            };
            // Whatever the outcome, the server serves: systemd's reload ends.
            notify::ready(&status);
        }
    });
}

/// Reads `path` and, unless it is refused (the reason returned), makes it
/// the running configuration; returns its number of jobs.
fn reload(server: &Server, path: &std::path::Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let new = ServerConfig::from_yaml(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    if let Some(why) = reload_refusal(&server.config(), &new, path) {
        return Err(why);
    }
    let copies = server.replication.copied(&new);
    for name in new.jobs.keys().chain(&copies) {
        if let Err(e) = storage::JobDir::new(&new.base_dir, name.clone()).ensure() {
            tracing::error!(job = %name, "reload: {e}");
        }
    }
    server.replace_config(new);
    // A replica looks at its source again at once.
    server.replication.wake.notify_one();
    Ok(server.config().jobs.len())
}

/// Why `new` (read from `path`) cannot replace the running `old`; the same
/// file checks as at start.
fn reload_refusal(old: &ServerConfig, new: &ServerConfig, path: &std::path::Path) -> Option<String> {
    if let Some(why) = old.reload_refusal(new) {
        return Some(why);
    }
    if new.clients.values().any(|c| c.token_hash.is_some()) {
        if let Err(e) = tls::check_secret_mode(
            path,
            "config file with token hashes",
            new.secrets_group.as_deref(),
        ) {
            return Some(format!("{e:#}"));
        }
    }
    None
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::tests::daily_revisions;

    /// Issue 32: the first start on a store makes each job's `.since`,
    /// `.partial/` and `latest`, removes what no revision owns, and leaves
    /// the index holding what is on disk (nothing read twice); its
    /// allocation, counted when asked for, is the job's.
    #[test]
    fn the_first_start_makes_each_jobs_files_and_indexes_it() {
        let dir = tempfile::tempdir().unwrap();
        let server = state::test_server(dir.path(), "  vm1: {schedule: daily}\n  vm2: {schedule: daily}\n");
        let vm1 = server.job("vm1").unwrap();
        let ids = daily_revisions(&vm1, 3);
        // As a store without the server's own files (made by another tool,
        // or restored from elsewhere).
        for f in [".since", ".partial", "latest", ".lock"] {
            let p = vm1.path().join(f);
            if p.is_dir() {
                std::fs::remove_dir(&p).unwrap();
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
        let orphan = vm1.path().join(format!(
            "{}.digests",
            backy_common::RevisionId::new_random().short()
        ));
        std::fs::write(&orphan, b"x").unwrap();
        std::fs::write(vm1.image_path(&ids[0]), vec![1u8; 8192]).unwrap();

        assert_eq!(open_jobs(&server).unwrap(), 2);
        for job in [&vm1, &server.job("vm2").unwrap()] {
            assert!(job.partial_dir().is_dir(), "{}: .partial/", job.name());
            assert!(job.since().is_some(), "{}: .since", job.name());
        }
        assert_eq!(
            std::fs::read_link(vm1.path().join("latest")).unwrap(),
            std::path::Path::new(&ids[2].short())
        );
        assert!(!orphan.exists(), "a manifest without a .rev is removed");
        let entry = server.jobs.indexed(&vm1).unwrap();
        assert_eq!(entry.revisions, vm1.revisions().unwrap());
        assert_eq!(entry.since, vm1.since());
        assert!(entry.allocated_bytes(&vm1) >= 8192);
        assert_eq!(entry.allocated_bytes(&vm1), vm1.allocated_bytes());

        // A later start keeps the first-seen time; an unreadable one (a
        // crash before the first start's sync) is written again.
        let since = vm1.since().unwrap();
        std::fs::write(server.job("vm2").unwrap().path().join(".since"), b"").unwrap();
        server.jobs.index.clear();
        open_jobs(&server).unwrap();
        assert_eq!(vm1.since(), Some(since));
        assert!(server.job("vm2").unwrap().since().is_some());
        assert_eq!(
            server.jobs.indexed(&vm1).unwrap().revisions,
            vm1.revisions().unwrap()
        );
    }
}
