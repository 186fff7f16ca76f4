//! The HTTP listener (`http-listen`): the status page (`/`, `/job/NAME`),
//! Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
//! (`/readyz`). HTTP/1.1 through hyper, which tonic already brings (one
//! hyper in the tree); HTTPS with the gRPC side's certificate when `tls:`
//! is configured. Page and metrics follow `status`'s access rules: with
//! client identities configured, a client's token is required (`Bearer`,
//! or as the password of HTTP basic auth, so a browser can ask for it), and
//! a hypervisor sees only its own jobs. Health answers anyone.

use crate::audit;
use crate::auth::{self, Action, Caller};
use crate::state::Server;
use backy_common::config::{Role, ServerConfig};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

/// Why the HTTP listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http-listen: {0:?} is not an address:port")]
    Address(String),
    #[error("http-listen: binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("http-listen: TLS: {0}")]
    Tls(String),
}

/// Connections open at once; a further one displaces the oldest that is
/// not answering a request (crate::http_slots).
const MAX_CONNECTIONS: usize = 64;
/// Time for a TLS handshake and for a request's head (hyper's clock starts
/// when it waits for one, so it also ends silent and idle connections).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection's whole life: pages and scrapes take milliseconds, so this
/// only ends idle keep-alive connections that would hold a slot.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// A bound listener, not yet serving.
pub struct HttpListener {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pub addr: SocketAddr,
}

impl HttpListener {
    /// Binds `http-listen` (port 0: the kernel chooses) with the server's
    /// TLS certificate when it has one. `None` when not configured.
    pub async fn bind(config: &ServerConfig) -> Result<Option<Self>, HttpError> {
        let Some(text) = &config.http_listen else {
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| HttpError::Address(text.clone()))?;
        let tls = match &config.tls {
            Some(t) => Some(acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| HttpError::Bind { addr, source })?;
        Ok(Some(HttpListener { listener, tls, addr }))
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves until the process ends (through shutdown too, so `/readyz`
    /// can say 503 while streams drain).
    pub fn spawn(self, server: Arc<Server>) {
        let app = Arc::new(App {
            host: crate::scrape::registry(&server),
            server,
        });
        let slots = crate::http_slots::Slots::new(MAX_CONNECTIONS);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match self.listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("http: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let slot = slots.take().await;
                let app = app.clone();
                let tls = self.tls.clone();
                tokio::spawn(async move {
                    let busy = slot.busy_flag();
                    let serve = async move {
                        match tls {
                            None => serve_connection(app, stream, peer, busy).await,
                            Some(tls) => {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                                    Ok(Ok(s)) => serve_connection(app, s, peer, busy).await,
                                    Ok(Err(e)) => tracing::debug!(%peer, "http: TLS handshake: {e}"),
                                    Err(_) => tracing::debug!(%peer, "http: TLS handshake timed out"),
                                }
                            }
                        }
                    };
                    tokio::select! {
                        () = serve => {}
                        () = slot.evicted() => {
                            tracing::debug!(%peer, "http: closed, waiting for a request, to make room");
                        }
                    }
                });
            }
        });
    }
}

/// A rustls acceptor for the certificate chain and key PEM files.
fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, HttpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| HttpError::Tls(format!("{}: {e}", cert.display())))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| HttpError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| HttpError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

struct App {
    server: Arc<Server>,
    /// The server-wide metrics, registered once.
    host: prometheus_client::registry::Registry,
}

async fn serve_connection<S>(app: Arc<App>, stream: S, peer: SocketAddr, busy: crate::http_slots::BusyFlag)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        let answering = busy.answering();
        async move {
            let reply = handle(app, req, peer).await;
            drop(answering);
            Ok::<_, std::convert::Infallible>(reply)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_LIFETIME, served).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, "http: {e}"),
        Err(_) => tracing::debug!(%peer, "http: connection closed after {} s", CONNECTION_LIFETIME.as_secs()),
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body.into())
}

async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    let path = req.uri().path().to_string();
    let mut r = match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match not_ready(&app.server) {
            None => text(StatusCode::OK, "ready\n"),
            // The base dir's path and the OS error only for a client with
            // credentials (a probe without them gets the gist).
            Some(why) => {
                let detailed = (app.server.config().clients.is_empty()
                    || req.headers().contains_key(AUTHORIZATION))
                    && caller(&app.server, &req, peer).is_ok();
                let why = if detailed { why.detail() } else { why.gist() };
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"))
            }
        },
        _ => match caller(&app.server, &req, peer) {
            Err(r) => *r,
            Ok(caller) => {
                let app2 = app.clone();
                tokio::task::spawn_blocking(move || route(&app2, &path, &caller))
                    .await
                    .unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
            }
        },
    };
    if head {
        *r.body_mut() = Full::new(Bytes::new());
    }
    r
}

/// Pages and metrics: index reads, off the async workers.
fn route(app: &App, path: &str, caller: &Caller) -> Reply {
    let server = &app.server;
    if path == "/metrics" {
        return match crate::scrape::render(&app.host, server, caller) {
            Ok(body) => reply(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics: {e}\n"),
            ),
        };
    }
    let html = |r: backy_common::Result<String>| match r {
        Ok(body) => reply(StatusCode::OK, "text/html; charset=utf-8", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    if path == "/" {
        return html(crate::page::overview(server, caller));
    }
    if let Some(name) = path.strip_prefix("/job/") {
        let config = server.config();
        // Unknown jobs and others' jobs look alike, as in gRPC.
        let visible = backy_common::JobName::new(name)
            .ok()
            .filter(|n| config.jobs.contains_key(n) && auth::may_see(&config, caller, n, Action::Read));
        return match visible {
            Some(n) => html(crate::page::job(server, &n)),
            None => text(StatusCode::NOT_FOUND, "no such job\n"),
        };
    }
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// Why the server should not get traffic now.
enum NotReady {
    Stopping,
    BaseDir {
        path: std::path::PathBuf,
        error: rustix::io::Errno,
    },
}

impl NotReady {
    /// For anyone: no path, no OS error.
    fn gist(&self) -> String {
        match self {
            NotReady::Stopping => "shutting down".into(),
            NotReady::BaseDir { .. } => "base-dir is not writable".into(),
        }
    }

    /// For a client with credentials.
    fn detail(&self) -> String {
        match self {
            NotReady::Stopping => self.gist(),
            NotReady::BaseDir { path, error } => {
                format!("base-dir {} is not writable: {error}", path.display())
            }
        }
    }
}

/// Why the server should not get traffic now; `None`: ready.
fn not_ready(server: &Server) -> Option<NotReady> {
    if server.stopping.load(Ordering::Relaxed) {
        return Some(NotReady::Stopping);
    }
    let base = server.config().base_dir.clone();
    // A read-only mount answers EROFS even to root.
    match rustix::fs::access(&base, rustix::fs::Access::WRITE_OK) {
        Ok(()) => None,
        Err(error) => Some(NotReady::BaseDir { path: base, error }),
    }
}

/// The caller of an HTTP request, as the gRPC interceptor decides it: with
/// no identities configured (loopback only) everyone is `local`; otherwise
/// a client's token, as `Bearer TOKEN` or the password of basic auth.
fn caller(server: &Server, req: &Request<Incoming>, peer: SocketAddr) -> Result<Caller, Box<Reply>> {
    let config = server.config();
    let config = &*config;
    if config.clients.is_empty() {
        return Ok(Caller {
            name: "local".into(),
            role: Role::Admin,
            limit_key: format!("connection {peer}"),
            peer: peer.to_string(),
        });
    }
    let refuse = |why: &str| {
        let peer = peer.to_string();
        let who = audit::Refused {
            identity: "",
            peer: &peer,
            action: "http authenticate",
            job: "",
        };
        audit::refused(server, who, audit::Refusal::Authentication, &why);
        let mut r = text(StatusCode::UNAUTHORIZED, format!("{why}\n"));
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"backy\", charset=\"UTF-8\""),
        );
        Box::new(r)
    };
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(refuse(
            "a client's token is required (Authorization: Bearer TOKEN)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(token_of)
        .ok_or_else(|| refuse("authorization header must be 'Bearer TOKEN' or basic auth"))?;
    let name = backy_common::token::check_token(&token)
        .ok()
        .and_then(|t| auth::identity_of_token(config, t))
        .ok_or_else(|| refuse("invalid token"))?;
    Ok(Caller {
        name: name.clone(),
        role: config.clients.get(name).map_or(Role::ReadOnly, |c| c.role),
        limit_key: format!("identity {name}"),
        peer: peer.to_string(),
    })
}

/// The token of `Bearer TOKEN` or of basic auth (`USER:TOKEN`, the user
/// ignored).
fn token_of(header: &str) -> Option<String> {
    use base64::Engine;
    if let Some(t) = header.strip_prefix("Bearer ") {
        return Some(t.to_string());
    }
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, t)| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_as_bearer_or_basic_auth() {
        assert_eq!(token_of("Bearer abc").as_deref(), Some("abc"));
        // "prometheus:abc"
        assert_eq!(token_of("Basic cHJvbWV0aGV1czphYmM=").as_deref(), Some("abc"));
        assert_eq!(token_of("Basic !!!"), None);
        assert_eq!(token_of("abc"), None);
    }
}
