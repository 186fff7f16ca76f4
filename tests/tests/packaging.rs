//! What the Debian packages and their systemd units rely on. Under a
//! `Type=notify` unit the server says `READY=1` only once it accepts
//! connections, `RELOADING=1` … `READY=1` around a SIGHUP reload (also one
//! it refuses), and `STOPPING=1` on SIGTERM, then exits 0; a notify socket
//! that is gone does not stop it serving. The hidden `generate-assets`
//! writes the man pages and completions the packages ship, without a
//! config or a server.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// A `backy-server` started with `NOTIFY_SOCKET` (and its stderr echoed);
/// killed on drop.
struct Notified {
    child: Child,
    port: u16,
    config: std::path::PathBuf,
    base: std::path::PathBuf,
}

impl Notified {
    fn start(dir: &Path, notify_socket: &str) -> Notified {
        let port = free_port();
        let base = dir.join("store");
        let config = dir.join("server.yaml");
        std::fs::write(&config, config_text(port, &base, "  vm1: {schedule: none}\n")).unwrap();
        let mut child = Command::new(bin("backy-server"))
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", notify_socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting backy-server");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
            }
        });
        Notified {
            child,
            port,
            config,
            base,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signalling backy-server");
    }

    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut status = None;
        wait_for("backy-server to exit", within, || {
            status = self.child.try_wait().expect("waiting for backy-server");
            status.is_some()
        });
        status.expect("exit status")
    }

    fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("backy-client"))
            .arg("--server")
            .arg(self.url())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running backy-client")
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_text(port: u16, base: &Path, jobs: &str) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nbase-dir: {}\ninsecure-plaintext: true\njobs:\n{jobs}",
        base.display()
    )
}

/// The next datagram, waiting at most 30 s.
fn next_message(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification from backy-server within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The server's first notification is READY=1 with its pid, and at that
/// moment its port takes connections and answers requests.
fn expect_ready(server: &Notified, socket: &UnixDatagram) {
    let ready = next_message(socket);
    // Checked before anything else, so nothing had time to come up later.
    let connected = std::net::TcpStream::connect(("127.0.0.1", server.port));
    assert!(ready.starts_with("READY=1\n"), "first notification: {ready:?}");
    assert!(
        ready.contains(&format!("MAINPID={}\n", server.child.id())),
        "{ready:?}"
    );
    assert!(ready.contains("STATUS=listening on 127.0.0.1:"), "{ready:?}");
    connected.expect("the port accepts a connection once READY=1 is sent");
    let out = server.client(&["status", "vm1"]);
    assert!(
        out.status.success(),
        "status right after READY=1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ready_once_listening_reloading_then_ready_on_sighup_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut server = Notified::start(dir.path(), socket_path.to_str().unwrap());
    expect_ready(&server, &socket);

    // A reload taken: RELOADING=1 (with the time systemd matches it by),
    // then READY=1 saying so.
    let two_jobs = config_text(
        server.port,
        &server.base,
        "  vm1: {schedule: none}\n  vm2: {schedule: none}\n",
    );
    std::fs::write(&server.config, two_jobs).unwrap();
    server.signal(rustix::process::Signal::HUP);
    let reloading = next_message(&socket);
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(usec.is_some_and(|u| u > 0), "{reloading:?}");
    let ready = next_message(&socket);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains("STATUS=reloaded ") && ready.contains("2 jobs"),
        "{ready:?}"
    );
    let out = server.client(&["status", "vm2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A reload refused still ends the reload: the old config serves.
    std::fs::write(&server.config, "listen: [not yaml").unwrap();
    server.signal(rustix::process::Signal::HUP);
    assert!(next_message(&socket).starts_with("RELOADING=1\n"));
    let ready = next_message(&socket);
    assert!(
        ready.starts_with("READY=1\n") && ready.contains("STATUS=reload refused, old configuration kept: "),
        "{ready:?}"
    );

    let started = Instant::now();
    server.signal(rustix::process::Signal::TERM);
    let stopping = next_message(&socket);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    let status = server.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "SIGTERM: exit 0, {status:?}");
    // No agent holds a stream: no grace period to wait out.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_abstract_notify_socket_works_too() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("backy-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    let mut server = Notified::start(dir.path(), &format!("@{name}"));
    expect_ready(&server, &socket);
    server.signal(rustix::process::Signal::TERM);
    assert!(next_message(&socket).starts_with("STOPPING=1\n"));
    assert_eq!(server.wait(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_notify_socket_that_is_gone_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.sock");
    let mut server = Notified::start(dir.path(), gone.to_str().unwrap());
    // No READY=1 can arrive: ask until it answers.
    wait_for("the server to answer", Duration::from_secs(30), || {
        server.client(&["status", "vm1"]).status.success()
    });
    server.signal(rustix::process::Signal::TERM);
    assert_eq!(server.wait(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn generate_assets_writes_man_pages_and_completions_without_config_or_server() {
    let dir = tempfile::tempdir().unwrap();
    for binary in ["backy-server", "backy-client"] {
        let out = Command::new(bin(binary))
            // Neither is read: nothing here needs a config or a server.
            .args(["--config", "/nonexistent/backy.yaml", "generate-assets", "--out"])
            .arg(dir.path())
            .env("BACKY_SERVER", "http://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{binary} generate-assets: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = Command::new(bin(binary)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(!help.contains("generate-assets"), "hidden from --help: {help}");
        assert!(help.contains("completions"), "{help}");

        let bash = Command::new(bin(binary))
            .args(["completions", "bash"])
            .output()
            .unwrap();
        assert!(bash.status.success());
        let shipped = std::fs::read_to_string(dir.path().join("completions/bash").join(binary)).unwrap();
        assert!(
            String::from_utf8_lossy(&bash.stdout) == shipped,
            "completions bash prints what is shipped"
        );
        for file in [format!("zsh/_{binary}"), format!("fish/{binary}.fish")] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(&file)).unwrap();
            assert!(text.contains(binary), "{file}");
        }
    }
    let man = dir.path().join("man");
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for want in [
        "backy-client.1",
        "backy-client-push.1",
        "backy-client-restore.1",
        "backy-client-agent.1",
        "backy-client-check.1",
        "backy-server.1",
        "backy-server-check-config.1",
        "backy-server-hash-token.1",
        "backy-server-hand-over.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want} in {pages:?}");
    }
    assert!(
        !pages
            .iter()
            .any(|p| p.contains("generate-assets") || p.contains("-help")),
        "{pages:?}"
    );
    let push = std::fs::read_to_string(man.join("backy-client-push.1")).unwrap();
    assert!(push.contains(".TH backy-client-push 1"), "{push}");
    assert!(
        push.contains("\\-\\-changed\\-ranges"),
        "options are documented: {push}"
    );
}

/// The packages ship `backy-server.yaml(5)` and `backy-client.yaml(5)`,
/// generated from the key reference the example configs are checked
/// against; they render without a warning (where man is installed) and
/// name every key of the examples. `--help` points at the JSON reference
/// where the package installs it, not only at the source tree.
#[test]
fn config_man_pages_render_and_help_points_at_the_installed_docs() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, page, example, keys) in [
        (
            "backy-server",
            "backy-server.yaml.5",
            "server.yaml",
            &[
                "listen",
                "base-dir",
                "tls.client-ca",
                "limits.first-request-timeout",
                "replicate.lag-critical",
            ][..],
        ),
        (
            "backy-client",
            "backy-client.yaml.5",
            "client.yaml",
            &[
                "token-file",
                "jobs.JOB.source.scratch-dir",
                "jobs.JOB.source.hooks.hook-timeout",
            ][..],
        ),
    ] {
        let out = Command::new(bin(binary))
            .args(["generate-assets", "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = dir.path().join("man").join(page);
        let roff = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            roff.contains(&format!(
                ".TH {} 5 ",
                page.trim_end_matches(".5").replace('-', "\\-")
            )),
            "{roff}"
        );
        for key in keys {
            assert!(
                roff.contains(&format!("\\fB{}\\fR (", key.replace('-', "\\-"))),
                "{page} lacks {key}"
            );
        }
        assert!(roff.contains(&format!("/usr/share/doc/{binary}/examples/{example}").replace('-', "\\-")));
        let man = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .output();
        match man {
            Ok(man) => {
                let text = String::from_utf8_lossy(&man.stdout);
                assert!(
                    man.status.success(),
                    "man -l {page}: {}",
                    String::from_utf8_lossy(&man.stderr)
                );
                assert!(
                    man.stderr.is_empty(),
                    "man -l {page} warns: {}",
                    String::from_utf8_lossy(&man.stderr)
                );
                assert!(text.contains("KEYS") && text.contains(keys[1]), "{text}");
            }
            Err(e) => eprintln!("man not run ({e}): the roff checks above stand"),
        }
    }
    let help = Command::new(bin("backy-client")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("/usr/share/doc/backy-client/docs/json.md"),
        "{help}"
    );
    let check = Command::new(bin("backy-client"))
        .args(["check", "--help"])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains("/usr/share/doc/backy-client/docs/json.md"),
        "{check}"
    );
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"["../docs/*.md", "usr/share/doc/backy-client/docs/", "644"]"#),
        "the client package ships json.md where --help says"
    );
}
