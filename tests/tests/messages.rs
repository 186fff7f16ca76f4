//! Messages that say what to do (issue 29, items 4 and 7), with real
//! processes: `check-config` checks every file as the service's user, an
//! unreadable TLS key names the group and mode it needs, `--ca` mistakes
//! are named, a push of a job this hypervisor does not list names the
//! ones it does, and a locked qcow2 points at `qmp:`.

mod support;

use backy_common::token::{generate_token, hash_token};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::*;

/// `nobody`/`nogroup`: present on every Debian system, and no file of the
/// tests belongs to them unless a test says so.
const USER: &str = "nobody";
const GROUP: &str = "nogroup";
const UID: u32 = 65534;
const GID: u32 = 65534;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Failed with exit 1; returns its last stderr line (the error).
fn failed(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "must fail with 1: {err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    err.lines().last().unwrap_or_default().to_string()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>) {
    std::os::unix::fs::chown(path, uid, gid).unwrap();
}

/// A temp dir others may enter, as /etc is.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    dir
}

fn server_cmd(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("backy-server"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running backy-server")
}

fn check_as_user(config: &Path) -> Output {
    server_cmd(config, &["check-config", "--as-user", USER])
}

/// A store directory the service's user owns.
fn store(dir: &Path) -> PathBuf {
    let base = dir.join("store");
    std::fs::create_dir(&base).unwrap();
    chown(&base, Some(UID), Some(GID));
    base
}

/// Item 4: as root every file is readable, so `check-config` checks as
/// the user the service runs as, each file the server opens: here the
/// replica's token file, then a directory on its way, then the store.
#[test]
fn check_config_reads_every_file_as_the_service_user() {
    must_be_root();
    let dir = open_dir();
    let d = dir.path();
    let base = store(d);
    let token = d.join("replica.token");
    std::fs::write(&token, format!("{}\n", generate_token())).unwrap();
    chmod(&token, 0o600);
    let config = d.join("server.yaml");
    let write_config = |token: &Path| {
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\n\
                 replicate: {{source: 'http://127.0.0.1:1', token-file: {}, jobs: [vm1]}}\njobs: {{}}\n",
                base.display(),
                token.display()
            ),
        )
        .unwrap();
        chmod(&config, 0o644);
    };
    write_config(&token);

    let line = failed(&check_as_user(&config));
    let t = token.display();
    assert!(
        line.contains(&format!("replica token file {t}: user {USER} cannot read it"))
            && line.contains("root:root 0600")
            && line.contains(&format!("chgrp {GROUP} {t}; chmod 640 {t}")),
        "{line}"
    );

    // Done as told: OK, and it says as whom it checked.
    chown(&token, None, Some(GID));
    chmod(&token, 0o640);
    let out = check_as_user(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("files readable by {USER}")), "{stdout}");

    // A directory on the way that the user may not enter.
    let private = d.join("private");
    std::fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let moved = private.join("replica.token");
    std::fs::rename(&token, &moved).unwrap();
    write_config(&moved);
    let line = failed(&check_as_user(&config));
    let p = private.display();
    assert!(
        line.contains(&format!(
            "replica token file {}: user {USER} cannot enter {p}",
            moved.display()
        )) && line.contains(&format!("chmod o+x {p}")),
        "{line}"
    );
    chmod(&private, 0o755);

    // A store the user cannot write.
    chown(&base, Some(0), Some(0));
    let line = failed(&check_as_user(&config));
    let b = base.display();
    assert!(
        line.contains(&format!("base-dir {b}: user {USER} cannot write it"))
            && line.contains(&format!("chown {USER}:{GROUP} {b}")),
        "{line}"
    );
    // Nothing else was wrong.
    chown(&base, Some(UID), Some(GID));
    assert!(check_as_user(&config).status.success());
}

/// TLS files for a server of `secrets-group: nogroup`.
struct Tls {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    key: PathBuf,
    token: PathBuf,
    config: String,
}

impl Tls {
    fn new() -> Self {
        let dir = open_dir();
        let d = dir.path();
        let ca = Ca::new("backy messages CA");
        let ca_file = d.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let (cert, key_pem, _) = ca.sign(&["127.0.0.1", "localhost"], false, false);
        std::fs::write(d.join("server.pem"), cert).unwrap();
        let key = d.join("server.key");
        std::fs::write(&key, key_pem).unwrap();
        chmod(&key, 0o600);
        let t = generate_token();
        let token = d.join("hv01.token");
        std::fs::write(&token, format!("{t}\n")).unwrap();
        chmod(&token, 0o600);
        let config = format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\nsecrets-group: {GROUP}\n\
             tls: {{cert: {d}/server.pem, key: {}}}\n\
             clients:\n  hv01: {{token-hash: '{}'}}\n  hv02: {{token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none, client: hv01}}\n",
            key.display(),
            hash_token(&t).unwrap(),
            hash_token(&generate_token()).unwrap(),
            d = d.display()
        );
        Tls {
            dir,
            ca,
            ca_file,
            key,
            token,
            config,
        }
    }
}

/// A copy of `backy-server` in `dir` (one of [`open_dir`]'s), which
/// `nobody` may run wherever the build lives (a checkout under /root).
fn server_bin_for_user(dir: &Path) -> PathBuf {
    let to = dir.join("backy-server");
    if !to.exists() {
        // Copied by another process: a write descriptor of ours, inherited
        // by a child another test thread forks meanwhile, would make this
        // exec fail with ETXTBSY ("Text file busy").
        let out = Command::new("install")
            .args(["-m", "0755"])
            .arg(bin("backy-server"))
            .arg(&to)
            .output()
            .expect("running install");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    to
}

/// `backy-server --config CONFIG` as `nobody`, which must refuse to start.
fn serve_as_user(config: &Path) -> Output {
    let mut child = Command::new(server_bin_for_user(config.parent().unwrap()))
        .arg("--config")
        .arg(config)
        .uid(UID)
        .gid(GID)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = false;
    wait_for("backy-server to refuse", Duration::from_secs(20), || {
        exited = child.try_wait().unwrap().is_some();
        exited
    });
    child.wait_with_output().unwrap()
}

/// Item 7: the service's user cannot read the TLS key: start-up (run as
/// that user) and `check-config --as-user` say which file, which user,
/// and the group and mode that fix it.
#[test]
fn an_unreadable_tls_key_names_the_group_and_mode_it_needs() {
    must_be_root();
    let tls = Tls::new();
    let d = tls.dir.path();
    let base = store(d);
    let config = d.join("server.yaml");
    std::fs::write(&config, tls.config.replace("BASE", base.to_str().unwrap())).unwrap();
    chown(&config, None, Some(GID));
    chmod(&config, 0o640);

    let out = serve_as_user(&config);
    let k = tls.key.display();
    let names_the_fix = |line: String| {
        assert!(
            line.contains(&format!("TLS key {k}: user {USER} cannot read it"))
                && line.contains("root:root 0600")
                && line.contains(&format!("chgrp {GROUP} {k}; chmod 640 {k}")),
            "{line}"
        );
    };
    names_the_fix(failed(&out));
    names_the_fix(failed(&check_as_user(&config)));

    // Done as told; now a store the service's user may not write.
    chown(&tls.key, None, Some(GID));
    chmod(&tls.key, 0o640);
    chown(&base, Some(0), Some(0));
    let line = failed(&serve_as_user(&config));
    let b = base.display();
    assert!(
        line.contains(&format!(
            "base-dir {b}: user {USER} cannot write it (root:root 0755)"
        )) && line.contains(&format!("chown {USER}:{GROUP} {b}")),
        "{line}"
    );
}

/// Item 7: `--ca` with a file that holds no certificate is named before
/// connecting; a CA that did not sign the server's certificate gets a
/// hint beside rustls's `UnknownIssuer`.
#[test]
fn ca_mistakes_are_named() {
    let tls = Tls::new();
    let d = tls.dir.path();
    let server = Server::start_config(&d.join("store"), &tls.config);
    let https = server.url.replace("http://", "https://");
    let client = |ca: &Path| {
        Command::new(bin("backy-client"))
            .arg("--server")
            .arg(&https)
            .arg("--ca")
            .arg(ca)
            .arg("--token-file")
            .arg(&tls.token)
            .arg("status")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The right CA works.
    let out = client(&tls.ca_file);
    assert!(out.status.success(), "{}", stderr(&out));

    // The key instead of the certificate.
    let line = failed(&client(&tls.key));
    assert_eq!(
        line,
        format!(
            "backy-client: error: --ca/ca: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            tls.key.display()
        )
    );

    // Another CA's certificate.
    let other = d.join("other-ca.pem");
    std::fs::write(&other, Ca::new("another CA").pem).unwrap();
    let line = failed(&client(&other));
    assert!(
        line.contains("UnknownIssuer")
            && line.contains(&format!(
                "the server's certificate is not signed by the CA in {}",
                other.display()
            )),
        "{line}"
    );
    let _ = &tls.ca;
}

/// Item 7: a mistyped job on `push` is checked against this hypervisor's
/// client.yaml before asking the server (which would refuse another
/// client's job with PERMISSION_DENIED), and the message lists its jobs.
#[test]
fn push_of_a_job_client_yaml_lacks_lists_the_jobs_it_has() {
    let tls = Tls::new();
    let d = tls.dir.path();
    let server = Server::start_config(
        &d.join("store"),
        &tls.config.replace(
            "jobs:\n",
            "jobs:\n  vm2: {schedule: none, client: hv01}\n  vm22: {schedule: none, client: hv02}\n",
        ),
    );
    let client_yaml = d.join("client.yaml");
    std::fs::write(
        &client_yaml,
        "jobs:\n  vm1: {source: {type: file, path: /nonexistent/vm1.img}}\n  \
         vm2: {source: {type: file, path: /nonexistent/vm2.img}}\n",
    )
    .unwrap();
    let out = Command::new(bin("backy-client"))
        .arg("--server")
        .arg(server.url.replace("http://", "https://"))
        .arg("--ca")
        .arg(&tls.ca_file)
        .arg("--token-file")
        .arg(&tls.token)
        .arg("--config")
        .arg(&client_yaml)
        .args(["push", "vm22", "--force"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let line = failed(&out);
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert_eq!(
        line,
        format!(
            "backy-client: error: no job vm22 in {}; jobs: vm1, vm2 (or give --source)",
            client_yaml.display()
        )
    );
}

/// Item 7: `qemu:` on an image another process holds (a running guest, or
/// here a writable qemu-nbd) gives qemu-img's lock error and the `qmp:` hint.
#[test]
fn a_locked_qcow2_points_at_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm5.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let sock = d.join("nbd.sock");
    let mut holder = Command::new("qemu-nbd")
        .arg(format!("--socket={}", sock.display()))
        .args(["-f", "qcow2"])
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("qemu-nbd to hold the image", Duration::from_secs(20), || {
        sock.exists()
    });
    let server = Server::start(&d.join("store"), "  vm5: {schedule: none}\n");
    let source = format!("qemu:{}", img.display());
    let out = server.client(&["push", "vm5", "--force", "--source", &source]);
    let _ = holder.kill();
    let _ = holder.wait();
    let line = failed(&out);
    assert!(
        line.contains("Failed to get shared \"write\" lock")
            && line.contains("if the guest is running, back it up through QMP: qmp: SOCKET and node: NODE"),
        "{line}"
    );
}

/// Runs `backy-server --config CONFIG check-config` as root in a mount
/// namespace of its own where `/etc/systemd/system` holds the packaged
/// unit with `User=nobody` and `dropin` (nothing outside the namespace
/// sees them).
fn check_with_unit(config: &Path, dropin: &str) -> Output {
    check_with_unit_as(config, dropin, &[])
}

/// [`check_with_unit`], `check-config` run through `wrapper` (e.g.
/// `setpriv` to become the unit's user).
fn check_with_unit_as(config: &Path, dropin: &str, wrapper: &[&str]) -> Output {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/backy-server.service"),
    )
    .unwrap()
    .replace("User=backy", &format!("User={USER}"))
    .replace("Group=backy", &format!("Group={GROUP}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("unit"), unit).unwrap();
    std::fs::write(dir.path().join("dropin"), dropin).unwrap();
    let script = "mount -t tmpfs none /etc/systemd/system && \
                  C=$2 && cp \"$1/unit\" /etc/systemd/system/backy-server.service && \
                  mkdir /etc/systemd/system/backy-server.service.d && \
                  cp \"$1/dropin\" /etc/systemd/system/backy-server.service.d/test.conf && \
                  shift 3 && exec \"$@\" --config \"$C\" check-config";
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(dir.path())
        .arg(config)
        .arg("-")
        .args(wrapper)
        .arg(server_bin_for_user(config.parent().unwrap()))
        .stdin(Stdio::null())
        .output()
        .expect("running unshare")
}

/// A replica's config under `d` (0644) whose token file is root's, 0600:
/// (store, token file, config file).
fn replica_with_a_root_token(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = store(d);
    let token = d.join("replica.token");
    std::fs::write(&token, format!("{}\n", generate_token())).unwrap();
    chmod(&token, 0o600);
    let config = d.join("server.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\n\
             replicate: {{source: 'http://127.0.0.1:1', token-file: {}, jobs: [vm1]}}\njobs: {{}}\n",
            base.display(),
            token.display()
        ),
    )
    .unwrap();
    chmod(&config, 0o644);
    (base, token, config)
}

/// Item 4: as root without `--as-user`, `check-config` checks as the
/// installed unit's `User=` (with its drop-ins), and names what the
/// unit's sandbox keeps from the server (here `PrivateTmp=yes` hiding
/// /tmp, `ProtectSystem=strict` with the store outside `ReadWritePaths=`).
#[test]
fn check_config_as_root_checks_as_the_installed_units_user_and_sandbox() {
    must_be_root();
    let dir = open_dir();
    let d = dir.path();
    let (base, token, config) = replica_with_a_root_token(d);
    // The test's files are under /tmp: a drop-in lets the unit see them.
    let lifted = format!("[Service]\nPrivateTmp=no\nReadWritePaths={}\n", base.display());
    let line = failed(&check_with_unit(&config, &lifted));
    let t = token.display();
    assert!(
        line.contains(&format!("replica token file {t}: user {USER} cannot read it"))
            && line.contains(&format!("chgrp {GROUP} {t}; chmod 640 {t}")),
        "{line}"
    );
    chown(&token, None, Some(GID));
    chmod(&token, 0o640);
    let out = check_with_unit(&config, &lifted);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("files readable by {USER}")));

    // The packaged sandbox as it is: /tmp is the unit's own.
    let line = failed(&check_with_unit(&config, "[Service]\n"));
    assert!(
        line.contains(&format!(
            "base-dir {}: the unit gives the server a /tmp of its own (PrivateTmp=yes)",
            base.display()
        )),
        "{line}"
    );
    // The unit's user running it by hand asks for itself, outside the
    // unit (as scripts/test-packages.sh does): no sandbox verdict.
    let by_hand = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
    let out = check_with_unit_as(&config, "[Service]\n", &by_hand);
    assert!(out.status.success(), "{}", stderr(&out));
    // The store outside ReadWritePaths=.
    let line = failed(&check_with_unit(&config, "[Service]\nPrivateTmp=no\n"));
    let b = base.display();
    assert!(
        line.contains(&format!(
            "base-dir {b}: the unit lets the server write only in /srv/backy (ProtectSystem=strict): \
             run `systemctl edit backy-server` and add ReadWritePaths={b}"
        )),
        "{line}"
    );
}

/// Item 4: a replica started as the service's user that cannot read its
/// token file logs (and shows in status and check) which file, which
/// user, and what to run, not a bare "Permission denied".
#[test]
fn a_replica_that_cannot_read_its_token_says_what_to_run() {
    must_be_root();
    let dir = open_dir();
    let d = dir.path();
    let (_store, token, config) = replica_with_a_root_token(d);
    let mut child = Command::new(server_bin_for_user(d))
        .arg("--config")
        .arg(&config)
        .uid(UID)
        .gid(GID)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while found.is_none() && std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("replication:") => found = Some(line),
            _ => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = found.expect("a replication error logged within 30 s");
    let t = token.display();
    assert!(
        line.contains(&format!(
            "replica token file {t}: user {USER} cannot read it (root:root 0600)"
        )) && line.contains(&format!("chgrp {GROUP} {t}; chmod 640 {t}")),
        "{line}"
    );
}
