//! Shared fixtures for the end-to-end tests: real `backy-server` and
//! `backy-client` processes, real loop-mounted filesystems, sample images.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
pub const BLOCK: u64 = 4 * MIB;

/// Path of a freshly built workspace binary (`backy-server`, `backy-client`,
/// or an example as `examples/NAME`).
/// `cargo test` does not build other packages' binaries, so each test
/// process builds them once, with exactly the command `scripts/test.sh`
/// uses first (`--workspace --bins --examples`, with fault injection): the
/// same features, so nothing is rebuilt (building `-p NAME` alone unifies
/// features differently and recompiles shared dependencies every time).
/// Binaries from a build without fault injection (scripts/package.sh's)
/// are replaced, or tests setting `BACKY_FAULT` would see it ignored.
pub fn bin(name: &'static str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--bins", "--examples"]);
        cmd.args(["--features", "backy-common/fault-injection"]);
        // The variables cargo sets for this test process (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, ...) would reach build scripts that watch
        // them (ring's) and make cargo rebuild half the tree.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
                "CARGO_TARGET_TMPDIR",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "OUT_DIR"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the workspace binaries failed");
    });
    dir.join(name)
}

pub fn must_be_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests mount loop filesystems and must run as root (see README: the test command)"
    );
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A filesystem of `kind` ("btrfs" or "xfs") on a loop device, mounted in a
/// temp dir; unmounted and removed on drop.
pub struct LoopFs {
    pub mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(kind: &str, size: u64) -> Self {
        Self::with_options(kind, size, "loop")
    }

    /// Mounted with `options` (`mount -o`, which must include `loop`), e.g.
    /// `loop,compress-force=zstd`.
    pub fn with_options(kind: &str, size: u64, options: &str) -> Self {
        must_be_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mkdir");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("fs image");
        match kind {
            "btrfs" => run_ok(Command::new("mkfs.btrfs").arg("-q").arg(&image)),
            "xfs" => run_ok(
                Command::new("mkfs.xfs")
                    .args(["-q", "-m", "reflink=1"])
                    .arg(&image),
            ),
            other => panic!("unknown filesystem {other}"),
        };
        run_ok(
            Command::new("mount")
                .args(["-o", options])
                .arg(&image)
                .arg(&mount),
        );
        LoopFs { mount, _dir: dir }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// Lines the server logged, shared with the thread that drains its stderr.
pub type ServerLog = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Starts `backy-server` and waits until it listens; returns its URL.
fn spawn_server(config_path: &Path, env: &[(&str, &str)], log: ServerLog) -> (Child, String) {
    spawn_server_wrapped(config_path, env, &[], log)
}

/// Like [`spawn_server`], run through `wrapper` (e.g. `prlimit ... --`).
fn spawn_server_wrapped(
    config_path: &Path,
    env: &[(&str, &str)],
    wrapper: &[&str],
    log: ServerLog,
) -> (Child, String) {
    let server = bin("backy-server");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&server);
            c
        }
        None => Command::new(&server),
    };
    let mut child = cmd
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting backy-server");
    // The server logs "listening on ADDR" once bound; read until then,
    // then keep draining stderr so the server never blocks on it.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if let Some(addr) = line.split("listening on ").nth(1) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
            log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("backy-server did not start listening");
    (child, format!("http://{addr}"))
}

/// A running `backy-server` on an ephemeral loopback port; killed on drop.
pub struct Server {
    child: Child,
    /// Everything every incarnation of this server logged.
    log: ServerLog,
    pub url: String,
    pub base: PathBuf,
    pub config_path: PathBuf,
    /// The hypervisor's config (`jobs:` with their sources), which every
    /// [`Server::client`] call and [`Server::agent`] passes with `--config`.
    pub client_config: PathBuf,
    _dir: tempfile::TempDir,
}

/// Splits a config written the way tests read best (each job with its
/// source) the way backy wants it: the server's part (schedule, client,
/// max-size) and the hypervisor's (`jobs: NAME: source:`), returned as
/// (server.yaml, client.yaml) texts.
pub fn split_config(text: &str) -> (String, String) {
    let mut server: serde_yaml::Mapping = serde_yaml::from_str(text).expect("test config is YAML");
    let mut client_jobs = serde_yaml::Mapping::new();
    if let Some(jobs) = server.get_mut("jobs").and_then(|j| j.as_mapping_mut()) {
        for (name, job) in jobs.iter_mut() {
            if let Some(source) = job.as_mapping_mut().and_then(|j| j.remove("source")) {
                let mut entry = serde_yaml::Mapping::new();
                entry.insert("source".into(), source);
                client_jobs.insert(name.clone(), entry.into());
            }
        }
    }
    let mut client = serde_yaml::Mapping::new();
    client.insert("jobs".into(), client_jobs.into());
    (
        serde_yaml::to_string(&server).expect("YAML"),
        serde_yaml::to_string(&client).expect("YAML"),
    )
}

impl Server {
    /// Starts a server storing under `base` with `jobs` (YAML of the jobs map).
    /// Each job's `source:` goes to the hypervisor's client.yaml (see
    /// [`split_config`]).
    pub fn start(base: &Path, jobs_yaml: &str) -> Self {
        let config = format!("listen: 127.0.0.1:0\nbase-dir: BASE\njobs:\n{jobs_yaml}\n");
        Self::start_config(base, &config)
    }

    fn start_with_config(config_path: PathBuf, base: &Path, dir: tempfile::TempDir) -> Self {
        Self::start_with_config_wrapped(config_path, base, dir, &[])
    }

    fn start_with_config_wrapped(
        config_path: PathBuf,
        base: &Path,
        dir: tempfile::TempDir,
        wrapper: &[&str],
    ) -> Self {
        let log = ServerLog::default();
        let (child, url) = spawn_server_wrapped(&config_path, &[], wrapper, log.clone());
        Server {
            child,
            log,
            url,
            base: base.to_path_buf(),
            client_config: dir.path().join("client.yaml"),
            config_path,
            _dir: dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `backy-client --server URL ARGS...`.
    pub fn client(&self, args: &[&str]) -> Output {
        self.client_env(&[], args)
    }

    /// Runs `backy-client` with extra environment (e.g. `BACKY_FAULT`).
    pub fn client_env(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        Command::new(bin("backy-client"))
            .envs(env.iter().copied())
            .arg("--server")
            .arg(&self.url)
            .arg("--config")
            .arg(&self.client_config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running backy-client")
    }

    /// Like [`Server::client`], asserting success.
    pub fn client_ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "backy-client {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Short ids of a job's committed revisions, oldest first.
    pub fn short_ids(&self, job: &str) -> Vec<String> {
        self.revisions(job)
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// `status --json` for one job, parsed.
    pub fn status_json(&self, job: &str) -> serde_json::Value {
        let text = self.client_ok(&["status", job, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {text}"))
    }

    /// Committed revisions of a job, oldest first, from `status --json`.
    pub fn revisions(&self, job: &str) -> Vec<serde_json::Value> {
        let status = self.status_json(job);
        let jobs = status["jobs"].as_array().expect("jobs array");
        let j = jobs.iter().find(|j| j["job"] == job).expect("job in status");
        j["revisions"].as_array().expect("revisions array").clone()
    }

    /// Every file and directory below the base dir with its size and hash,
    /// to prove a bad request changed nothing.
    /// Leaves out `.dedup/`, the digest index: hints the server keeps (and
    /// rebuilds in the background at start), not stored backups.
    pub fn snapshot_tree(&self) -> Vec<(String, u64, String)> {
        let mut out = Vec::new();
        walk(&self.base, &self.base, &mut out);
        out.retain(|(p, _, _)| !p.starts_with(".dedup/"));
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
        let meta = p.symlink_metadata().expect("stat");
        if meta.is_dir() {
            out.push((rel + "/", 0, String::new()));
            walk(root, &p, out);
        } else if meta.file_type().is_symlink() {
            out.push((
                rel,
                0,
                std::fs::read_link(&p)
                    .map(|l| l.display().to_string())
                    .unwrap_or_default(),
            ));
        } else if rel.ends_with(".lock") {
            out.push((rel, 0, String::new()));
        } else {
            out.push((rel, meta.len(), file_hash(&p)));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// BLAKE3 of a whole file, hex.
pub fn file_hash(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .unwrap_or_else(|e| panic!("hashing {}: {e}", path.display()));
    h.finalize().to_hex().to_string()
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse image: `size` bytes with data written at `(offset, len)`
/// extents (pseudo-random, seeded by offset) and holes elsewhere.
pub fn make_image(path: &Path, size: u64, extents: &[(u64, u64)]) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    for &(offset, len) in extents {
        write_at(path, offset, &pattern(offset ^ 0x5eed, len as usize));
    }
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    f.write_all_at(data, offset).expect("write");
}

/// Zeroes a range by punching a hole (what a discard does).
pub fn punch(path: &Path, offset: u64, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for punch");
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .expect("punch hole");
}

/// Copies a file keeping holes (a frozen copy of a source state).
pub fn sparse_copy(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

/// `btrfs filesystem du --raw` of one file: (total, exclusive); the rest
/// of its extents are shared with other files.
pub fn btrfs_du(path: &Path) -> (u64, u64) {
    let out = run_ok(
        Command::new("btrfs")
            .args(["filesystem", "du", "-s", "--raw"])
            .arg(path),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("btrfs du output: {text}"));
    let nums: Vec<u64> = line
        .split_whitespace()
        .take(2)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    (nums[0], nums[1])
}

pub fn flush(f: &mut impl Write) {
    f.flush().expect("flush");
}

/// Waits for `cond` with a deadline (for process state that has no event
/// to wait on, e.g. a file appearing); panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until process `pid` is stopped (state T): a process
/// that stopped itself at a fault point (`BACKY_FAULT=stop:NAME`).
pub fn wait_stopped(pid: u32) {
    wait_for(
        &format!("process {pid} to stop itself"),
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        },
    );
}

/// A free loopback port (for servers that must come back on the same
/// address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Server {
    /// Starts a server from a complete config text (`BASE` is replaced by
    /// the base dir). A config without a `tls:` section gets
    /// `insecure-plaintext: true` (loopback only) appended, so test configs
    /// need not repeat it.
    /// Each job's `source:` goes to the hypervisor's client.yaml (see
    /// [`split_config`]).
    pub fn start_config(base: &Path, config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("server.yaml");
        let (mut text, client) = split_config(&config.replace("BASE", &base.display().to_string()));
        std::fs::write(dir.path().join("client.yaml"), client).expect("write client config");
        if !text
            .lines()
            .any(|l| l.starts_with("tls:") || l.starts_with("insecure-plaintext:"))
        {
            text.push_str("\ninsecure-plaintext: true\n");
        }
        std::fs::write(&config_path, text).expect("write config");
        // Configs with token hashes must not be world-readable.
        std::fs::set_permissions(&config_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod config");
        Self::start_with_config(config_path, base, dir)
    }

    /// Like [`Server::start_config`], the server run through `wrapper`
    /// (e.g. `prlimit ... --`).
    pub fn start_config_wrapped(base: &Path, config: &str, wrapper: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("server.yaml");
        let (text, client) = split_config(&config.replace("BASE", &base.display().to_string()));
        std::fs::write(dir.path().join("client.yaml"), client).expect("write client config");
        let text = format!("{text}\ninsecure-plaintext: true\n");
        std::fs::write(&config_path, text).expect("write config");
        Self::start_with_config_wrapped(config_path, base, dir, wrapper)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the server again (after [`Server::kill`]) with the same config.
    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// Restarts with extra environment (e.g. `BACKY_FAULT`).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill();
        let (child, url) = spawn_server(&self.config_path, env, self.log.clone());
        self.child = child;
        self.url = url;
    }

    /// Sends SIGHUP (re-read the config).
    pub fn hup(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP to backy-server");
    }

    /// How many lines the server has logged so far (a mark for
    /// [`Server::wait_log`]).
    pub fn log_mark(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The lines logged after `mark`.
    pub fn log_lines(&self, mark: usize) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().skip(mark).cloned().collect()
    }

    /// Waits until a line logged after `mark` contains `needle`; returns it.
    pub fn wait_log(&self, mark: usize, needle: &str) -> String {
        let mut found = None;
        wait_for(
            &format!("the server to log {needle:?}"),
            Duration::from_secs(20),
            || {
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                found = log.iter().skip(mark).find(|l| l.contains(needle)).cloned();
                found.is_some()
            },
        );
        found.unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the server to stop (bounded).
    pub fn terminate(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM to backy-server");
        assert!(
            !self.wait_exit(),
            "backy-server stopped on SIGTERM, not by a signal"
        );
    }

    /// Waits for the server process to end by itself (e.g. at a fault
    /// point); returns whether it was killed by a signal (abort).
    pub fn wait_exit(&mut self) -> bool {
        let mut status = None;
        wait_for("backy-server to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().expect("waiting for backy-server");
            status.is_some()
        });
        status
            .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s))
            .is_some()
    }
}

/// A background `backy-client` process (e.g. an agent); killed on drop.
pub struct Agent {
    child: Child,
    /// Everything it logged so far.
    log: ServerLog,
}

impl Server {
    /// Starts `backy-client ARGS` (e.g. an agent) in the background with
    /// this server and the hypervisor's client.yaml.
    pub fn agent(&self, args: &[&str]) -> Agent {
        let mut all = vec!["--config", self.client_config.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        Agent::start(&self.url, &all)
    }
}

impl Agent {
    pub fn start(url: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin("backy-client"))
            .arg("--server")
            .arg(url)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting backy-client agent");
        let stderr = child.stderr.take().expect("stderr");
        let log = ServerLog::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Agent { child, log }
    }

    /// What it logged so far, one line each.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

impl Agent {
    /// Sends SIGTERM and waits (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("agent pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM to the agent");
        let mut status = None;
        wait_for("the agent to exit", Duration::from_secs(30), || {
            status = self.child.try_wait().expect("waiting for the agent");
            status.is_some()
        });
        status.expect("exit status")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop device over a file (a real block device); detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }

    /// The device path as text (for command lines).
    pub fn path(&self) -> &str {
        self.dev.to_str().expect("loop device paths are ASCII")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The tags of a revision from `status --json`.
pub fn tags_of(r: &serde_json::Value) -> std::collections::BTreeSet<String> {
    r["tags"]
        .as_array()
        .expect("tags array")
        .iter()
        .map(|t| t.as_str().expect("tag").to_string())
        .collect()
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        Ca {
            issuer: rcgen::Issuer::new(p, key),
            pem,
        }
    }

    /// (certificate PEM, key PEM, certificate DER).
    pub fn sign(&self, names: &[&str], client: bool, expired: bool) -> (String, String, Vec<u8>) {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// The manifest digest a push of `writes` must end with (`PushEnd`): the
/// image of `size` bytes is `parent` (its stored image and `.digests`) or
/// zeros, with `writes` applied. Reads only the blocks the writes touch.
pub fn manifest_digest_after(
    parent: Option<(&Path, &Path)>,
    size: u64,
    block_size: u32,
    writes: &[(u64, &[u8])],
) -> Vec<u8> {
    use backy_common::manifest::{digest, Manifest};
    let mut manifest = match parent {
        Some((_, digests)) => {
            let file = std::fs::File::open(digests).unwrap();
            Manifest::read_from(BufReader::new(file), "parent").unwrap().0
        }
        None => Manifest::zeroed(size, block_size).unwrap(),
    };
    assert_eq!(manifest.image_size(), size, "same size as the parent");
    let image = parent.map(|(image, _)| std::fs::File::open(image).unwrap());
    let bs = block_size as u64;
    let mut touched: Vec<u64> = writes
        .iter()
        .filter(|(_, data)| !data.is_empty())
        .flat_map(|(offset, data)| offset / bs..=(offset + data.len() as u64 - 1) / bs)
        .collect();
    touched.sort_unstable();
    touched.dedup();
    for block in touched {
        let (start, len) = (manifest.block_offset(block), manifest.block_len(block));
        let mut buf = vec![0u8; len as usize];
        if let Some(f) = &image {
            let n = f.read_at(&mut buf, start).unwrap();
            assert_eq!(n as u64, len, "a block of the parent image");
        }
        for (offset, data) in writes {
            let (from, to) = (
                (*offset).max(start),
                (offset + data.len() as u64).min(start + len),
            );
            if from < to {
                buf[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
        }
        manifest.set(block, digest(&buf)).unwrap();
    }
    manifest.file_digest().to_vec()
}

/// A plain HTTP/1.1 GET: (status, headers, body).
pub fn http_get_with(addr: &str, path: &str, authorization: Option<&str>) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (status, head.to_string(), body.to_string())
}

/// A client of the QMP socket at `path` is greeted (then leaves); an event
/// (RESUME, at start) may come before the greeting.
pub fn qmp_greets(path: &Path) -> bool {
    let Ok(stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.contains("\"QMP\"") => return true,
            Ok(_) => {}
        }
    }
}
