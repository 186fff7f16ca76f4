//! Accepting connections and keeping them within bounds: a connection
//! cap, a deadline for a new connection to make its first request (TLS
//! handshake and HTTP/2 preface included), a cap per identity, an idle
//! timeout for authenticated connections, and back-off on accept errors
//! instead of a spinning loop.
//!
//! A connection is "proven" once a request on it has passed authentication
//! (the interceptor calls [`Connections::prove`]); until then it may be
//! closed to make room. A proven connection is "idle" while it has no
//! request in flight ([`Connections::begin`], counted by
//! [`crate::in_flight`] for every request and its whole response stream).
//! Idle proven connections are closed after `idle-connection-timeout`, are
//! what one more connection of the same identity displaces beyond
//! `connections-per-client`, and, least recently used first, make room at
//! the cap when no unproven connection is left. So neither a flood of
//! silent connections nor one token's idle connections can hold every
//! slot; only requests in flight keep a connection.

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

/// How long an evicted proven connection still writes (reads no more):
/// its last response may still sit in HTTP/2's buffers when its request
/// counts as ended, and must reach the client.
const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// One connection's state, shared with the registry.
#[derive(Debug)]
struct ConnState {
    accepted: Instant,
    proven: AtomicBool,
    /// Who proved it; `None` before, and in open mode (no identities).
    identity: Mutex<Option<String>>,
    /// Requests whose response (stream) has not ended yet.
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection was accepted).
    last_active: Mutex<Instant>,
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn last_active(&self) -> Instant {
        *self.last_active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Proven, idle and not yet closed: may be closed to make room.
    fn evictable_idle(&self) -> bool {
        self.proven.load(Ordering::SeqCst) && !self.evicted.load(Ordering::SeqCst) && self.idle()
    }
}

/// Why a connection's first authenticated request is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "identity {identity} has {cap} connections open, each with a request in flight \
     (limits: connections-per-client)"
)]
pub struct TooManyConnections {
    pub identity: String,
    pub cap: usize,
}

/// Every open connection by peer address.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    all: Mutex<HashMap<SocketAddr, Arc<ConnState>>>,
    /// Refusals by connections-per-client: logged at most once a second,
    /// with the number left unlogged since.
    refusals: Mutex<(Option<Instant>, u64)>,
}

impl Connections {
    /// A request from `peer` passed authentication as `identity` (`None`
    /// in open mode): its connection is no longer displaced as unproven.
    /// Beyond `per_identity` proven connections of that identity, its least
    /// recently used idle one is closed; if all are busy, refused.
    pub fn prove(
        &self,
        peer: SocketAddr,
        identity: Option<&str>,
        per_identity: usize,
    ) -> Result<(), TooManyConnections> {
        let all = self.lock();
        let Some(conn) = all.get(&peer) else {
            return Ok(());
        };
        if conn.proven.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(identity) = identity {
            let same = |c: &ConnState| {
                c.proven.load(Ordering::SeqCst)
                    && !c.evicted.load(Ordering::SeqCst)
                    && c.identity.lock().unwrap_or_else(|p| p.into_inner()).as_deref() == Some(identity)
            };
            let held = all.values().filter(|c| same(c)).count();
            if held >= per_identity {
                let lru = all
                    .values()
                    .filter(|c| same(c) && c.idle())
                    .min_by_key(|c| c.last_active());
                match lru {
                    Some(c) => c.evict(),
                    None => {
                        let e = TooManyConnections {
                            identity: identity.to_string(),
                            cap: per_identity,
                        };
                        self.log_refusal(&e, peer);
                        return Err(e);
                    }
                }
            }
        }
        *conn.identity.lock().unwrap_or_else(|p| p.into_inner()) = identity.map(str::to_string);
        conn.proven.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Logs `e`, at most once a second whatever the rate of refusals.
    fn log_refusal(&self, e: &TooManyConnections, peer: SocketAddr) {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let (last, unlogged) = &mut *r;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            *unlogged += 1;
            return;
        }
        tracing::warn!(%peer, unlogged_since_last = *unlogged, "refused: {e}");
        *last = Some(Instant::now());
        *unlogged = 0;
    }

    /// A request on `peer`'s connection begins; it is in flight until the
    /// returned guard is dropped. `None` for a peer not accepted here.
    pub fn begin(&self, peer: SocketAddr) -> Option<InFlight> {
        let conn = self.lock().get(&peer).cloned()?;
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(InFlight { conn })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes the oldest connection that has not made a request yet, else
    /// the least recently used idle proven one; `false` if there is none.
    fn make_room(&self) -> bool {
        let all = self.lock();
        let live = || all.values().filter(|c| !c.evicted.load(Ordering::SeqCst));
        let victim = live()
            .filter(|c| !c.proven.load(Ordering::SeqCst))
            .min_by_key(|c| c.accepted)
            .or_else(|| {
                live()
                    .filter(|c| c.evictable_idle())
                    .min_by_key(|c| c.last_active())
            });
        match victim {
            Some(c) => {
                c.evict();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<ConnState>>> {
        self.all.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request in flight on a connection (see [`Connections::begin`]).
#[derive(Debug)]
pub struct InFlight {
    conn: Arc<ConnState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.conn.last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.conn.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settings of [`incoming`].
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    pub max_connections: usize,
    /// Time a new connection has to complete its first request.
    pub first_request: Duration,
    /// Time a proven connection may stay with no request in flight.
    pub idle: Duration,
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
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    // Room for it first: only when a connection is really
                    // waiting is another one closed.
                    while connections.open() >= limits.max_connections && !connections.make_room() {
                        // Every connection has a request in flight: this
                        // one waits, and new ones in the kernel's backlog.
                        warn(format!(
                            "{} connections open (the cap), all busy: waiting for one to close",
                            limits.max_connections
                        ));
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    let _ = tcp.set_nodelay(true);
                    let conn = Conn::new(tcp, peer, limits, connections.clone());
                    if tx.send(Ok(conn)).await.is_err() {
                        return; // the server stopped
                    }
                }
                Err(e) if out_of_descriptors(&e) => {
                    // Make room by closing a connection; its descriptor is
                    // free once hyper drops it.
                    let evicted = connections.make_room();
                    warn(format!(
                        "accept: {e} ({} connections open){}",
                        connections.open(),
                        if evicted {
                            "; closed the oldest that made no request or the least recently used idle one"
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
/// once evicted, before its first request past its deadline, or once
/// proven after `idle` with no request in flight.
pub struct Conn {
    io: TcpStream,
    peer: SocketAddr,
    state: Arc<ConnState>,
    /// The first-request deadline, then the next time to look at idleness.
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
    /// Once an evicted proven connection is noticed: the end of its grace.
    closing: Option<Pin<Box<Sleep>>>,
    connections: Arc<Connections>,
}

impl Conn {
    fn new(io: TcpStream, peer: SocketAddr, limits: AcceptLimits, connections: Arc<Connections>) -> Conn {
        let now = Instant::now();
        let state = Arc::new(ConnState {
            accepted: now,
            proven: AtomicBool::new(false),
            identity: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(now),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        connections.open.fetch_add(1, Ordering::SeqCst);
        connections.lock().insert(peer, state.clone());
        Conn {
            io,
            peer,
            state,
            deadline: Box::pin(tokio::time::sleep(limits.first_request)),
            idle: limits.idle,
            closing: None,
            connections,
        }
    }

    /// An error if the connection must close now; `Ok(false)` if it may
    /// not read (evicted, in its grace), `Ok(true)` otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        self.state.waker.register(cx.waker());
        if self.state.evicted.load(Ordering::SeqCst) {
            let closed = || io::Error::new(io::ErrorKind::ConnectionAborted, "closed to make room");
            if !self.state.proven.load(Ordering::SeqCst) {
                return Err(closed());
            }
            let grace = self
                .closing
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(EVICTION_GRACE)));
            if grace.as_mut().poll(cx).is_ready() {
                return Err(closed());
            }
            return Ok(false);
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            if !self.state.proven.load(Ordering::SeqCst) {
                tracing::debug!(peer = %self.peer, "no request in time: closing the connection");
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no request in time"));
            }
            // Keepalive pings are not requests: only a request resets this.
            let now = Instant::now();
            let next = if self.state.idle() {
                let due = self.state.last_active() + self.idle;
                if due <= now {
                    tracing::debug!(peer = %self.peer, "idle: closing the connection");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection"));
                }
                due
            } else {
                now + self.idle
            };
            self.deadline.as_mut().reset(next);
        }
        Ok(true)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::SeqCst);
        let mut all = self.connections.lock();
        if all.get(&self.peer).is_some_and(|c| Arc::ptr_eq(c, &self.state)) {
            all.remove(&self.peer);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.check(cx) {
            Err(e) => return Poll::Ready(Err(e)),
            // Woken when the grace ends.
            Ok(false) => return Poll::Pending,
            Ok(true) => {}
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

    const LIMITS: AcceptLimits = AcceptLimits {
        max_connections: 8,
        first_request: Duration::from_secs(60),
        idle: Duration::from_secs(60),
    };

    /// `n` accepted connections to a fresh listener, a few ms apart, with
    /// their clients.
    async fn accepted(connections: &Arc<Connections>, n: usize) -> (Vec<Conn>, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut conns, mut clients) = (Vec::new(), Vec::new());
        for _ in 0..n {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (tcp, peer) = listener.accept().await.unwrap();
            conns.push(Conn::new(tcp, peer, LIMITS, connections.clone()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (conns, clients)
    }

    fn evicted(c: &Conn) -> bool {
        c.state.evicted.load(Ordering::SeqCst)
    }

    /// A request on `c` that ends now.
    fn request(connections: &Connections, c: &Conn) {
        drop(connections.begin(c.peer).unwrap());
    }

    #[tokio::test]
    async fn room_comes_from_the_oldest_unproven_then_the_least_recently_used_idle() {
        let connections = Arc::new(Connections::default());
        let (conns, _clients) = accepted(&connections, 4).await;
        assert_eq!(connections.open(), 4);
        for c in &conns[..2] {
            connections.prove(c.peer, Some("mon"), 32).unwrap();
        }
        // conns[1] was used after conns[0]; conns[0] again last, but its
        // request is still in flight: busy.
        request(&connections, &conns[1]);
        let busy = connections.begin(conns[0].peer).unwrap();
        assert!(connections.make_room());
        assert!(evicted(&conns[2]), "oldest unproven: evicted first");
        assert!(connections.make_room());
        assert!(evicted(&conns[3]));
        assert!(connections.make_room());
        assert!(evicted(&conns[1]), "then the idle proven one");
        assert!(!connections.make_room(), "conns[0] is busy: nothing to evict");
        drop(busy);
        assert!(connections.make_room(), "idle now");
        assert!(evicted(&conns[0]));
        drop(conns);
        assert_eq!(connections.open(), 0);
    }

    #[tokio::test]
    async fn an_identity_beyond_its_cap_displaces_its_own_idle_connection_or_is_refused() {
        let connections = Arc::new(Connections::default());
        let (conns, _clients) = accepted(&connections, 5).await;
        connections.prove(conns[0].peer, Some("admin"), 2).unwrap();
        connections.prove(conns[1].peer, Some("mon"), 2).unwrap();
        connections.prove(conns[2].peer, Some("mon"), 2).unwrap();
        request(&connections, &conns[2]);
        request(&connections, &conns[1]);
        // mon's third: its least recently used idle one (conns[2]) goes,
        // not admin's.
        let _third = connections.begin(conns[3].peer).unwrap();
        connections.prove(conns[3].peer, Some("mon"), 2).unwrap();
        assert!(evicted(&conns[2]));
        assert!(!evicted(&conns[0]) && !evicted(&conns[1]));
        // A fourth while both of mon's are busy: refused, nothing closed.
        let _second = connections.begin(conns[1].peer).unwrap();
        let e = connections.prove(conns[4].peer, Some("mon"), 2).unwrap_err();
        assert!(e.to_string().contains("connections-per-client"), "{e}");
        assert!(!evicted(&conns[1]) && !evicted(&conns[3]));
        // Proving again on a proven connection changes nothing.
        connections.prove(conns[1].peer, Some("mon"), 2).unwrap();
        // Open mode (no identities): no cap.
        connections.prove(conns[4].peer, None, 1).unwrap();
    }
}
