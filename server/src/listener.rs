//! Accepting connections before anyone has authenticated: a connection
//! cap, a deadline for a new connection to make its first request (TLS
//! handshake and HTTP/2 preface included), eviction of the oldest unproven
//! connection when the cap or the descriptor limit is reached, and back-off
//! on accept errors instead of a spinning loop.
//!
//! A connection is "proven" once a request on it has passed authentication
//! (the interceptor calls [`Connections::prove`]); until then it may be
//! closed to make room. So a flood of silent or slow connections costs the
//! server at most the cap in descriptors, and a legitimate client that
//! connects during the flood displaces the oldest of them at once.

use atomic_waker::AtomicWaker;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long after an accept error (descriptors exhausted, ...) accepting
/// resumes when no connection could be evicted.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One connection's state, shared with the registry.
#[derive(Debug)]
struct ConnState {
    accepted: Instant,
    proven: AtomicBool,
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Open connections, and those not yet proven by a request.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    unproven: Mutex<HashMap<SocketAddr, Arc<ConnState>>>,
}

impl Connections {
    /// A request from `peer` passed authentication: its connection stays.
    pub fn prove(&self, peer: SocketAddr) {
        if let Some(c) = self.lock().remove(&peer) {
            c.proven.store(true, Ordering::SeqCst);
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes the oldest connection that has not made a request yet;
    /// `false` if there is none.
    fn evict_oldest_unproven(&self) -> bool {
        let mut unproven = self.lock();
        let oldest = unproven
            .iter()
            .min_by_key(|(_, c)| c.accepted)
            .map(|(addr, _)| *addr);
        match oldest.and_then(|addr| unproven.remove(&addr)) {
            Some(c) => {
                c.evict();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ConnState>>> {
        self.unproven.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Settings of [`incoming`].
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    pub max_connections: usize,
    /// Time a new connection has to complete its first request.
    pub first_request: Duration,
}

/// Accepts connections on `listener` under `limits`, forever, as a stream
/// for `tonic`'s `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    limits: AcceptLimits,
    connections: Arc<Connections>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut last_warning: Option<Instant> = None;
        let mut warn = |what: String| {
            // At most one line a second, however fast the errors come.
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!("{what}");
                last_warning = Some(Instant::now());
            }
        };
        loop {
            if connections.open() >= limits.max_connections && !connections.evict_oldest_unproven() {
                // Every connection is in use by an authenticated client:
                // new ones wait in the kernel's backlog.
                warn(format!(
                    "{} connections open (the cap): waiting for one to close",
                    limits.max_connections
                ));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let conn = Conn::new(tcp, peer, limits.first_request, connections.clone());
                    if tx.send(Ok(conn)).await.is_err() {
                        return; // the server stopped
                    }
                }
                Err(e) if out_of_descriptors(&e) => {
                    // Make room by closing the oldest unproven connection;
                    // its descriptor is free once hyper drops it.
                    let evicted = connections.evict_oldest_unproven();
                    warn(format!(
                        "accept: {e} ({} connections open){}",
                        connections.open(),
                        if evicted {
                            "; closed the oldest that made no request"
                        } else {
                            ""
                        }
                    ));
                    tokio::time::sleep(if evicted {
                        Duration::from_millis(5)
                    } else {
                        ACCEPT_BACKOFF
                    })
                    .await;
                }
                Err(e) => {
                    warn(format!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}

/// An accepted connection: the TCP stream, failing its reads and writes
/// once evicted or, before its first request, past its deadline.
pub struct Conn {
    io: TcpStream,
    peer: SocketAddr,
    state: Arc<ConnState>,
    deadline: Pin<Box<Sleep>>,
    connections: Arc<Connections>,
}

impl Conn {
    fn new(io: TcpStream, peer: SocketAddr, first_request: Duration, connections: Arc<Connections>) -> Conn {
        let state = Arc::new(ConnState {
            accepted: Instant::now(),
            proven: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        connections.open.fetch_add(1, Ordering::SeqCst);
        connections.lock().insert(peer, state.clone());
        Conn {
            io,
            peer,
            state,
            deadline: Box::pin(tokio::time::sleep(first_request)),
            connections,
        }
    }

    /// An error if the connection must close now.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.state.waker.register(cx.waker());
        if self.state.evicted.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room: no request yet",
            ));
        }
        if !self.state.proven.load(Ordering::SeqCst) && self.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(peer = %self.peer, "no request in time: closing the connection");
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no request in time"));
        }
        Ok(())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::SeqCst);
        let mut unproven = self.connections.lock();
        if unproven
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.state))
        {
            unproven.remove(&self.peer);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.io.local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

/// Raises this process's soft descriptor limit to its hard limit (what a
/// server with many clients and files wants) and returns the soft limit now.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the descriptor limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_unproven_connection_is_evicted_first() {
        let connections = Arc::new(Connections::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (tcp, peer) = listener.accept().await.unwrap();
            conns.push(Conn::new(tcp, peer, Duration::from_secs(60), connections.clone()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(connections.open(), 3);
        connections.prove(conns[0].peer);
        assert!(connections.evict_oldest_unproven());
        assert!(!conns[0].state.evicted.load(Ordering::SeqCst), "proven: kept");
        assert!(
            conns[1].state.evicted.load(Ordering::SeqCst),
            "oldest unproven: evicted"
        );
        assert!(!conns[2].state.evicted.load(Ordering::SeqCst));
        assert!(connections.evict_oldest_unproven());
        assert!(!connections.evict_oldest_unproven(), "none left to evict");
        drop(conns);
        assert_eq!(connections.open(), 0);
    }
}
