//! `export`: serve a revision over NBD on the hypervisor, so that QEMU,
//! `qemu-img`, `nbdinfo`, `nbdfuse` or `nbdcopy` read it without a
//! restore: read-only, or writable through a local overlay (boot a VM from
//! a backup now; nothing is written to the server).
//!
//! The data comes from the server in granule runs, each checked against
//! the manifest before it is served ([`remote`]); NBD is spoken by
//! [`session`], one task per connection.

pub mod image;
pub mod overlay;
pub mod remote;
pub mod session;

use crate::connect::Client;
use crate::view::{short_id, RevisionView};
use backy_common::nbd::serve::ExportSpec;
use backy_common::spec::Spec;
use backy_common::units::format_bytes;
use backy_common::{Error, JobName, Result};
use image::Image;
use overlay::Overlay;
use remote::RemoteRevision;
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, UnixListener};

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 16;
/// Default bytes of fetched data kept.
pub const DEFAULT_CACHE: usize = 64 << 20;

/// Where the export listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A Unix socket (mode 0600; only this user and root may connect).
    Unix(PathBuf),
    /// A loopback TCP address (any local user may connect).
    Tcp(SocketAddr),
}

#[derive(Debug, Clone)]
pub struct ExportArgs {
    pub job: JobName,
    /// Revision spec.
    pub revision: String,
    pub listen: Listen,
    /// Writable through this overlay file.
    pub overlay: Option<PathBuf>,
    pub cache_bytes: usize,
    /// End when the last client has gone (after at least one came).
    pub once: bool,
}

/// An export ready to serve: the revision's manifest fetched, the overlay
/// open, the socket bound.
pub struct Export {
    image: Arc<Image>,
    spec: ExportSpec,
    listener: Listener,
    pub ready: Ready,
    once: bool,
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// What is served where, said once the socket accepts.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    pub job: String,
    pub revision: RevisionView,
    /// The NBD URI clients use (`qemu-img`, `nbdinfo`, QEMU's `-drive`).
    pub uri: String,
    pub writable: bool,
    pub overlay: Option<PathBuf>,
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: serving revision {} ({}) {} at {}",
            self.job,
            self.revision.id,
            format_bytes(self.revision.size),
            if self.writable { "writable" } else { "read-only" },
            self.uri
        )?;
        if let Some(o) = &self.overlay {
            write!(f, " (writes go to {})", o.display())?;
        }
        Ok(())
    }
}

/// What an export did, when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    pub job: String,
    pub revision: RevisionView,
    pub connections: u64,
    pub served_bytes: u64,
    pub fetched_bytes: u64,
    pub failed_fetches: u64,
    pub written_bytes: u64,
    pub duration_secs: f64,
}

impl fmt::Display for Served {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: export of revision {} ended: served {} to {} connection{}, fetched {}",
            self.job,
            self.revision.id,
            format_bytes(self.served_bytes),
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            format_bytes(self.fetched_bytes),
        )?;
        if self.written_bytes > 0 {
            write!(f, ", {} written to the overlay", format_bytes(self.written_bytes))?;
        }
        if self.failed_fetches > 0 {
            write!(
                f,
                ", {} failed reads (damaged blocks or the server unreachable)",
                self.failed_fetches
            )?;
        }
        write!(f, " in {:.1} s", self.duration_secs)
    }
}

impl Export {
    /// Fetches the revision's manifest, opens the overlay and binds.
    pub async fn open(client: &mut Client, args: &ExportArgs) -> Result<Export> {
        let job = args.job.as_str();
        if Spec::parse(&args.revision)? == Spec::All {
            return Err(Error::invalid("'all' is not allowed here: name one revision"));
        }
        if crate::connect::server_protocol(client).await? < backy_proto::EXPORT_PROTOCOL {
            return Err(Error::precondition(format!(
                "the server speaks protocol {} and cannot serve ranges; an export needs {} (upgrade the server)",
                crate::connect::server_protocol(client).await?,
                backy_proto::EXPORT_PROTOCOL
            )));
        }
        let (info, manifest) = crate::manifest::fetch(client, job, &args.revision).await?;
        if !info.key_check.is_empty() {
            // Not built: the export serves stored bytes as they are, and an
            // encrypted revision's are ciphertext (docs/encryption.md).
            return Err(Error::precondition(format!(
                "revision {} of job {job} is encrypted: the export cannot serve it; restore it instead",
                info.short_id
            )));
        }
        let overlay = match &args.overlay {
            None => None,
            Some(path) => {
                let (path, id, size) = (path.clone(), info.id.clone(), info.size);
                Some(
                    tokio::task::spawn_blocking(move || Overlay::open(&path, &id, size))
                        .await
                        .map_err(|e| Error::internal(format!("opening the overlay: {e}")))??,
                )
            }
        };
        let remote = RemoteRevision::new(client.clone(), job, &info.id, manifest, args.cache_bytes);
        let image = Arc::new(Image::new(remote, overlay));
        let spec = ExportSpec {
            name: job.to_string(),
            description: format!("backy {job} revision {}", short_id(&info)),
            size: info.size,
            writable: args.overlay.is_some(),
        };
        let (listener, uri) = bind(&args.listen, job).await?;
        Ok(Export {
            image,
            spec,
            listener,
            ready: Ready {
                job: job.to_string(),
                revision: RevisionView::from(&info),
                uri,
                writable: args.overlay.is_some(),
                overlay: args.overlay.clone(),
            },
            once: args.once,
        })
    }

    /// Serves until `stop` resolves (or, with `once`, until the last
    /// client has gone), then flushes the overlay.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<Served> {
        let started = Instant::now();
        let mut sessions = tokio::task::JoinSet::new();
        let mut connections = 0u64;
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => break,
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {
                    if self.once && sessions.is_empty() {
                        break;
                    }
                    continue;
                }
                accepted = accept(&self.listener) => accepted,
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("export: {e}");
                    continue;
                }
            };
            if sessions.len() >= MAX_CONNECTIONS {
                tracing::warn!("export: {MAX_CONNECTIONS} connections are open: refusing another");
                continue;
            }
            connections += 1;
            let (image, spec) = (self.image.clone(), self.spec.clone());
            sessions.spawn(async move {
                let end = match stream {
                    Stream::Unix(s) => session::serve(s, image, spec).await,
                    Stream::Tcp(s) => session::serve(s, image, spec).await,
                };
                match end {
                    session::End::Closed => tracing::info!("export: a client disconnected"),
                    session::End::Protocol(why) => tracing::warn!("export: dropped a client: {why}"),
                }
            });
        }
        sessions.shutdown().await;
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
        self.image.flush().await?;
        let counters = &self.image.remote.counters;
        Ok(Served {
            job: self.ready.job.clone(),
            revision: self.ready.revision.clone(),
            connections,
            served_bytes: self.image.served_bytes.load(Ordering::Relaxed),
            fetched_bytes: counters.fetched_bytes.load(Ordering::Relaxed),
            failed_fetches: counters.failed_fetches.load(Ordering::Relaxed),
            written_bytes: self.image.written_bytes.load(Ordering::Relaxed),
            duration_secs: started.elapsed().as_secs_f64(),
        })
    }
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> Result<Stream> {
    match listener {
        Listener::Unix(l, _) => {
            let (s, _) = l
                .accept()
                .await
                .map_err(|e| Error::io("accepting on the export socket", e))?;
            // The socket's mode keeps others out; the peer's identity says
            // so again (a socket in a shared directory, a changed mode).
            let me = rustix::process::geteuid().as_raw();
            match s.peer_cred() {
                Ok(c) if c.uid() == me || c.uid() == 0 => Ok(Stream::Unix(s)),
                Ok(c) => Err(Error::denied(format!(
                    "refused a connection from uid {} (only uid {me} and root may connect)",
                    c.uid()
                ))),
                Err(e) => Err(Error::io("reading the peer's credentials", e)),
            }
        }
        Listener::Tcp(l) => {
            let (s, _) = l
                .accept()
                .await
                .map_err(|e| Error::io("accepting on the export port", e))?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
    }
}

async fn bind(listen: &Listen, job: &str) -> Result<(Listener, String)> {
    match listen {
        Listen::Unix(path) => {
            clear_stale_socket(path).await?;
            let l = UnixListener::bind(path)
                .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
            let uri = format!("nbd+unix:///{job}?socket={}", path.display());
            Ok((Listener::Unix(l, path.clone()), uri))
        }
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                return Err(Error::invalid(format!(
                    "{addr}: an export listens on loopback only (it has no authentication); use a Unix socket or 127.0.0.1"
                )));
            }
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
            let local = l
                .local_addr()
                .map_err(|e| Error::io("reading the export's address", e))?;
            let host = match local.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            Ok((Listener::Tcp(l), format!("nbd://{host}:{}/{job}", local.port())))
        }
    }
}

/// A socket left by an export that died may be replaced; a live one, or
/// anything that is not a socket, is not.
async fn clear_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::exists(format!(
            "{} exists and is not a socket: choose another path",
            path.display()
        )));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(Error::exists(format!(
            "{} is in use by a running export",
            path.display()
        )));
    }
    std::fs::remove_file(path)
        .map_err(|e| Error::io(format!("removing the stale socket {}", path.display()), e))
}
