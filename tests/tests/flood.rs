//! A flood of connections that never make a request, at the server's
//! descriptor limit: legitimate clients still get answers at once, the
//! server does not spin, and silent connections are closed after
//! `first-request-timeout`.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

/// CPU seconds the process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn silent_connections_do_not_lock_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = "listen: 127.0.0.1:0\nbase-dir: BASE\nlimits: {first-request-timeout: 3s}\n\
                  jobs:\n  vm1: {schedule: none}\n";
    // 256 descriptors: at most 128 connections.
    let server = Server::start_config_wrapped(
        &dir.path().join("store"),
        config,
        &["prlimit", "--nofile=256:256", "--"],
    );
    let addr = server.url.trim_start_matches("http://").to_string();

    let flood: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let before = cpu_secs(server.pid());
    let started = Instant::now();
    let out = server.client(&["status"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("vm1"));
    assert!(
        took < Duration::from_secs(2),
        "status took {took:?} during the flood"
    );
    // Still answering while the flood holds (a second client).
    let out = server.client(&["check", "vm1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The newest silent connection is closed by the server after the
    // first-request timeout (3 s), not kept forever.
    let mut last = flood.last().unwrap().try_clone().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let waited = Instant::now();
    // The server speaks first (its HTTP/2 settings); then the end.
    let mut buf = [0u8; 4096];
    loop {
        match last.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the silent connection is still open: {e}"
                );
                break;
            }
        }
    }
    assert!(waited.elapsed() < Duration::from_secs(15));
    // All that time (the flood held until its connections timed out) the
    // server did not spin on accept errors.
    let busy = cpu_secs(server.pid()) - before;
    let wall = started.elapsed().as_secs_f64();
    assert!(
        busy < 0.25 * wall,
        "server used {busy:.2} s of CPU in {wall:.2} s"
    );
    eprintln!("400 silent connections: status answered in {took:?}; server CPU {busy:.2} s in {wall:.2} s");
    drop(flood);
    server.client_ok(&["status"]);
}

// ---- Proven connections (issue 28, item 5) and the HTTP listener (item 6).

use backy_common::token::{generate_token, hash_token, AUTH_HEADER};
use backy_proto::backy_client::BackyClient;
use std::io::Write;
use tonic::transport::{Channel, Endpoint};

/// How fast a fresh client must be answered while a flood holds.
const ANSWER_WITHIN: Duration = Duration::from_millis(100);

/// A server with identities `mon` and `mon2` (read-only), `admin`, and
/// `limits` as given; returns it with the tokens in that order.
fn server_with_identities(dir: &std::path::Path, extra: &str) -> (Server, [String; 3]) {
    let tokens = [generate_token(), generate_token(), generate_token()];
    let h = |i: usize| hash_token(&tokens[i]).unwrap();
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{extra}\
         clients:\n  mon: {{role: read-only, token-hash: '{}'}}\n  \
         mon2: {{role: read-only, token-hash: '{}'}}\n  admin: {{role: admin, token-hash: '{}'}}\n\
         jobs:\n  vm1: {{schedule: none}}\n",
        h(0),
        h(1),
        h(2)
    );
    (Server::start_config(&dir.join("store"), &config), tokens)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One new HTTP/2 connection to the server.
async fn connect(url: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert(AUTH_HEADER, format!("Bearer {token}").parse().unwrap());
    req
}

/// `status` of all jobs on `channel`: the names it lists.
async fn status(channel: Channel, token: &str) -> Result<Vec<String>, tonic::Status> {
    let reply = BackyClient::new(channel)
        .status(with_token(
            backy_proto::StatusRequest { job: String::new() },
            token,
        ))
        .await?;
    Ok(reply.into_inner().jobs.into_iter().map(|j| j.job).collect())
}

/// A fresh client: connects and asks `status`, timed from before the
/// connect to the reply.
async fn timed_status(url: &str, token: &str) -> Duration {
    let started = Instant::now();
    let channel = connect(url)
        .await
        .expect("a new client connects during the flood");
    let jobs = status(channel, token).await.expect("status during the flood");
    let took = started.elapsed();
    assert_eq!(jobs, ["vm1"]);
    took
}

/// `n` connections, 64 at a time, each proven by one `status` with
/// `token`, held open. Beyond `connections-per-client` requests in flight
/// at once, the server refuses some (RESOURCE_EXHAUSTED, naming the
/// limit): they are counted, and the second value.
async fn flood(url: &str, token: &str, n: usize) -> (Vec<Channel>, usize) {
    let (mut held, mut refused) = (Vec::with_capacity(n), 0);
    for batch in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for _ in batch {
            let (url, token) = (url.to_string(), token.to_string());
            set.spawn(async move {
                let channel = connect(&url).await.expect("flood connection");
                match status(channel.clone(), &token).await {
                    Ok(_) => Some(channel),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        assert!(e.message().contains("connections-per-client"), "{e:?}");
                        None
                    }
                    Err(e) => panic!("flood status: {e:?}"),
                }
            });
        }
        while let Some(c) = set.join_next().await {
            match c.unwrap() {
                Some(channel) => held.push(channel),
                None => refused += 1,
            }
        }
    }
    (held, refused)
}

/// `n` connections, each proven by one `status` with `token`, held open.
async fn idle_connections(url: &str, token: &str, n: usize) -> Vec<Channel> {
    let (held, refused) = flood(url, token, n).await;
    assert_eq!(refused, 0, "{refused} of {n} refused");
    held
}

/// Established TCP connections whose local port is `port` (the server's
/// side of each connection to it), from /proc/net/tcp.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// 4,096 idle connections of one read-only identity (the default
/// `max-connections`) do not lock anyone out: the identity keeps at most
/// `connections-per-client` (default 32), and a new client's `status`
/// answers at once.
#[test]
fn idle_authenticated_connections_do_not_lock_clients_out() {
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let (server, [mon, _, admin]) = server_with_identities(dir.path(), "");
    let rt = runtime();
    let started = Instant::now();
    let (held, refused) = rt.block_on(flood(&server.url, &mon, 4096));
    eprintln!(
        "4096 read-only connections in {:?}: {} proven and held by the client, {refused} refused",
        started.elapsed(),
        held.len()
    );
    let mut took = Vec::new();
    for _ in 0..5 {
        took.push(rt.block_on(timed_status(&server.url, &admin)));
    }
    eprintln!("status during the flood: {took:?}");
    // The flooding identity itself may connect again too.
    rt.block_on(timed_status(&server.url, &mon));
    let port = port_of(&server.url);
    wait_for(
        "the server to hold at most 32 of mon's connections",
        Duration::from_secs(20),
        || established_to(port) <= 32 + 6,
    );
    assert!(
        took.iter().all(|t| *t < ANSWER_WITHIN),
        "status took {took:?} during the flood (want each under {ANSWER_WITHIN:?})"
    );
    drop(held);
    // The CLI too.
    let out = server.client(&["--token-file", &write_token(dir.path(), &admin), "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn write_token(dir: &std::path::Path, token: &str) -> String {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// With every connection slot held by idle proven connections (two
/// identities within their own caps), a new client displaces the least
/// recently used idle one instead of waiting.
#[test]
fn a_full_server_closes_its_least_recently_used_idle_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server, [mon, mon2, admin]) = server_with_identities(dir.path(), "limits: {max-connections: 64}\n");
    let rt = runtime();
    let mut held = rt.block_on(idle_connections(&server.url, &mon, 32));
    held.extend(rt.block_on(idle_connections(&server.url, &mon2, 32)));
    let took = rt.block_on(timed_status(&server.url, &admin));
    eprintln!("64 idle connections at max-connections 64: status took {took:?}");
    assert!(took < ANSWER_WITHIN, "status took {took:?}");
    // The displaced connection closes as the server gets to it.
    let port = port_of(&server.url);
    wait_for(
        "the server to hold at most 64 connections",
        Duration::from_secs(10),
        || established_to(port) <= 64,
    );
}

/// A proven connection with no request for `idle-connection-timeout` is
/// closed; one with a stream open (an agent's) is not. An identity over
/// `connections-per-client` whose connections are all busy is refused.
#[test]
fn idle_proven_connections_are_closed_and_busy_ones_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (server, [mon, _, admin]) = server_with_identities(
        dir.path(),
        "limits: {idle-connection-timeout: 2s, connections-per-client: 2}\n",
    );
    let port = port_of(&server.url);
    let rt = runtime();
    // Two agent streams of admin: both of its connections busy.
    let (mut streams, mut keep) = (Vec::new(), Vec::new());
    for name in ["a1", "a2"] {
        let channel = rt.block_on(connect(&server.url)).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(backy_proto::AgentReport {
            report: Some(backy_proto::agent_report::Report::Hello(
                backy_proto::AgentHello {
                    agent: name.into(),
                    workers: 1,
                    host: String::new(),
                },
            )),
        })
        .unwrap();
        let reply = rt
            .block_on(BackyClient::new(channel).agent(with_token(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &admin,
            )))
            .expect("agent stream");
        streams.push(reply.into_inner());
        keep.push(tx);
    }
    // A third admin connection: refused, naming the limit.
    let e = rt
        .block_on(async { status(connect(&server.url).await.unwrap(), &admin).await })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("connections-per-client"), "{}", e.message());

    let held = rt.block_on(idle_connections(&server.url, &mon, 2));
    assert!(established_to(port) >= 4);
    let idle_since = Instant::now();
    wait_for(
        "the idle connections to be closed",
        Duration::from_secs(15),
        || established_to(port) == 2,
    );
    assert!(idle_since.elapsed() >= Duration::from_millis(1500));
    // The agents' streams are still open.
    for s in &mut streams {
        let next = rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), s.message()).await });
        assert!(next.is_err(), "the agent stream ended: {next:?}");
    }
    drop(held);
}

/// Serves as an attacker would: `n` connections to `addr` that never send
/// a byte, each reopened as soon as the server closes it, until `stop`.
fn silent_flood(
    addr: String,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let open = || {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        };
        let mut conns: Vec<TcpStream> = (0..n).map(|_| open()).collect();
        let mut reopened = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for c in &mut conns {
                let mut buf = [0u8; 64];
                let closed = match c.read(&mut buf) {
                    Ok(_) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                };
                if closed {
                    *c = open();
                    reopened += 1;
                }
            }
            // The attacker's pace, not synchronisation.
            std::thread::sleep(Duration::from_millis(5));
        }
        reopened
    })
}

/// An HTTP GET on a new connection: status code and the time to the
/// whole reply.
fn timed_get(addr: &str, path: &str, authorization: Option<&str>) -> (u16, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, took)
}

/// 64 silent connections to the HTTP listener (its slots), reopened when
/// dropped: `/healthz` still answers each poll at once, and an
/// authenticated `/metrics` scrape too; a connection that sends no
/// request head is closed after the header deadline.
#[test]
fn silent_http_connections_do_not_starve_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let (server, [mon, _, _]) = server_with_identities(dir.path(), "http-listen: 127.0.0.1:0\n");
    let line = server.wait_log(0, "http listener on ");
    let addr = line
        .split("http listener on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = silent_flood(addr.clone(), 64, stop.clone());
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    wait_for(
        "the flood to hold 64 connections",
        Duration::from_secs(10),
        || established_to(port) >= 64,
    );
    let mut polls = Vec::new();
    for _ in 0..12 {
        polls.push(timed_get(&addr, "/healthz", None));
    }
    let metrics = timed_get(&addr, "/metrics", Some(&format!("Bearer {mon}")));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reopened = flood.join().unwrap();
    eprintln!("/healthz under a flood of 64 (reopened {reopened}): {polls:?}; /metrics {metrics:?}");
    assert!(
        polls
            .iter()
            .all(|(code, took)| *code == 200 && *took < ANSWER_WITHIN),
        "/healthz under the flood: {polls:?} (want 200 within {ANSWER_WITHIN:?} each)"
    );
    assert_eq!(metrics.0, 200, "/metrics under the flood: {metrics:?}");
    assert!(
        metrics.1 < Duration::from_secs(2),
        "/metrics took {:?}",
        metrics.1
    );

    // Alone, a silent connection is closed after the header deadline (5 s).
    let mut silent = TcpStream::connect(&addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let since = Instant::now();
    let mut buf = [0u8; 64];
    let _ = silent.read(&mut buf);
    let waited = since.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "a silent HTTP connection stayed open {waited:?}"
    );
}
