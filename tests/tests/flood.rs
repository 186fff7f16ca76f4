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
