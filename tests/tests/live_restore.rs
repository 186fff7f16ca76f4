//! `backy-client live-restore`: a running QEMU whose disk node reads an
//! NBD export is moved onto a local target while "guest writes" land. A
//! `qemu-nbd` serving a raw file with a known pattern stands in for the
//! backy export; a QEMU without a guest (`-machine none`) for the VM, with
//! two monitors: one for backy-client, one for the test, whose writes go
//! through `human-monitor-command` "qemu-io drive0" (the guest's block
//! backend, as a device's writes would). A model buffer (the pattern plus
//! every write) is what the target must hold at the end.
//!
//! Covered: writes during the copy (to parts already copied and parts not
//! yet) and after the switch all land in the target; the job, the source
//! nodes and QEMU's NBD connection are gone afterwards, and so are the
//! monitor-owned source nodes of a `-blockdev` setup; a target of another
//! size, one another process has open, and a node that does not exist are
//! refused changing nothing; a copy interrupted (SIGINT) or cancelled by
//! someone else leaves the guest on its source, nothing of the run in QEMU
//! and no created target file.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::*;

const SIZE: u64 = 64 * MIB;
/// Slow enough that the test's writes fall inside the copy (polled, not
/// timed: the test waits for the job to be running and not ready).
const SPEED: &str = "8M";

/// `qemu-nbd` serving `src.raw` writable on a Unix socket, to one client:
/// it exits when that client disconnects.
struct NbdSource {
    child: Child,
    socket: PathBuf,
}

impl NbdSource {
    fn start(dir: &Path, image: &Path) -> NbdSource {
        let socket = dir.join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args(["--format", "raw", "--shared", "1", "--socket"])
            .arg(&socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu-nbd.err")).unwrap())
            .spawn()
            .expect("qemu-nbd (apt install qemu-utils)");
        // Listening, seen without connecting (a probe would be its one client).
        wait_for("qemu-nbd listening", Duration::from_secs(30), || {
            listening(&socket)
        });
        NbdSource { child, socket }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Unix socket listens at `path` (/proc/net/unix: flags 00010000).
fn listening(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = path.to_str().unwrap();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7] == path
    })
}

/// How the disk node is built: by `-drive` (the block backend owns the
/// nodes) or by `-blockdev` (the monitor owns them: they must be deleted).
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Drive,
    Blockdev,
}

/// A QEMU whose node `disk0` (raw over NBD node `nbd0`) reads the
/// qemu-nbd source, with a QMP socket for backy and a monitor for the test.
struct Vm {
    dir: PathBuf,
    child: Child,
    test: (UnixStream, BufReader<UnixStream>),
    qmp: PathBuf,
    layout: Layout,
}

impl Vm {
    /// A QEMU whose disk reads the NBD server on `socket`.
    fn start(dir: &Path, socket: &Path, layout: Layout) -> Vm {
        let qmp = dir.join("backy.qmp");
        let _ = std::fs::remove_file(&qmp);
        // The test's monitor is a socket connected before QEMU starts (see
        // tests/tests/qemu_running.rs for why).
        let (stream, theirs) = UnixStream::pair().unwrap();
        let server = format!("server.type=unix,server.path={}", socket.display());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ]);
        match layout {
            Layout::Drive => {
                let server = server.replace("server.", "file.server.");
                cmd.arg("-drive").arg(format!(
                    "if=none,id=drive0,node-name=disk0,format=raw,file.driver=nbd,file.node-name=nbd0,{server}"
                ));
            }
            Layout::Blockdev => {
                cmd.arg("-blockdev")
                    .arg(format!("driver=nbd,node-name=nbd0,{server}"));
                cmd.arg("-blockdev").arg("driver=raw,node-name=disk0,file=nbd0");
            }
        }
        let child = cmd
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args([
                "-chardev",
                "socket,id=test,fd=0",
                "-mon",
                "chardev=test,mode=control",
            ])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (apt install qemu-system-x86)");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            child,
            test: (stream, reader),
            qmp,
            layout,
        };
        assert!(line.contains("\"QMP\""), "{line}; {:?}", vm.death());
        vm.qmp("qmp_capabilities", json!({}));
        if layout == Layout::Blockdev {
            // The writer: a block backend above disk0, as a guest device
            // would have (an NBD export; the test writes with qemu-io).
            let sock = dir.join("guest.sock");
            vm.qmp(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
            );
            vm.qmp(
                "block-export-add",
                json!({"type": "nbd", "id": "guest", "node-name": "disk0", "name": "guest", "writable": true}),
            );
        }
        let qmp = vm.qmp.clone();
        wait_for("QEMU's QMP socket for backy", Duration::from_secs(30), || {
            qmp_greets(&qmp)
        });
        vm
    }

    fn death(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let err = std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        Some(format!("QEMU exited ({status}): {err}"))
    }

    /// Runs a command on the test's monitor; its `return`.
    fn qmp(&mut self, cmd: &str, args: Value) -> Value {
        match self.try_qmp(cmd, args) {
            Ok(r) => r,
            Err(e) => panic!("{cmd}: {e}; {:?}", self.death()),
        }
    }

    fn try_qmp(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let line = format!("{}\n", json!({"execute": cmd, "arguments": args}));
        self.test.0.write_all(line.as_bytes()).unwrap();
        loop {
            let mut line = String::new();
            self.test.1.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            if v.get("event").is_some() {
                continue;
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(v),
            };
        }
    }

    /// A guest write of `len` bytes of `pattern` at `offset`, flushed,
    /// through the guest's block backend.
    fn write(&mut self, model: &mut [u8], pattern: u8, offset: u64, len: u64) {
        let io = format!("write -P 0x{pattern:02x} {offset} {len}");
        match self.layout {
            Layout::Drive => {
                for io in [io, "flush".into()] {
                    let line = format!("qemu-io drive0 \"{io}\"");
                    let out = self.qmp("human-monitor-command", json!({"command-line": line}));
                    assert!(!out.as_str().unwrap().contains("error"), "{out}");
                }
            }
            Layout::Blockdev => {
                let url = format!(
                    "nbd+unix:///guest?socket={}",
                    self.dir.join("guest.sock").display()
                );
                let out = Command::new("qemu-io")
                    .args(["-f", "raw", "-c", &io, "-c", "flush", &url])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("wrote"), "{text}");
            }
        }
        model[offset as usize..(offset + len) as usize].fill(pattern);
    }

    /// The mirror job as the test's monitor sees it: (offset, len, ready).
    fn job(&mut self) -> Option<(u64, u64, bool)> {
        let jobs = self.qmp("query-block-jobs", json!({}));
        let job = jobs.as_array().unwrap().first()?.clone();
        Some((
            job["offset"].as_u64().unwrap(),
            job["len"].as_u64().unwrap(),
            job["ready"].as_bool().unwrap(),
        ))
    }

    /// Waits until the job runs, has copied more than `past` bytes and is
    /// not ready yet (the copy is under way), bounded.
    fn copying_past(&mut self, past: u64) -> u64 {
        let mut seen = None;
        wait_for(
            &format!("the mirror job past {past} bytes"),
            Duration::from_secs(60),
            || match self.job() {
                Some((offset, _, false)) if offset > past => {
                    seen = Some(offset);
                    true
                }
                Some((_, _, true)) => panic!("the job became ready before the test wrote: too fast"),
                _ => false,
            },
        );
        seen.unwrap()
    }

    /// Node names, block jobs and fd sets: what a live restore may change.
    fn state(&mut self) -> (Vec<String>, Value, Value) {
        let nodes = self.qmp("query-named-block-nodes", json!({"flat": true}));
        let mut names: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        (
            names,
            self.qmp("query-block-jobs", json!({})),
            self.qmp("query-fdsets", json!({})),
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The source image: `SIZE` bytes of a known pattern.
fn source_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let src = dir.join("src.raw");
    let model = pattern(0x11fe, SIZE as usize);
    std::fs::write(&src, &model).unwrap();
    (src, model)
}

fn live_restore(vm: &Vm, target: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("backy-client"));
    cmd.args(["live-restore", "--json", "--qmp"])
        .arg(&vm.qmp)
        .args(["--node", "disk0", "--target"])
        .arg(target)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn finished(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes during the copy and after the switch land in the target; the
/// source is closed; the guest runs on the target.
fn moves_the_guest_while_it_writes(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, mut model) = source_image(d);
    let mut nbd = NbdSource::start(d, &src);
    let mut vm = Vm::start(d, &nbd.socket, layout);
    let target = d.join("restored.raw");

    let child = live_restore(&vm, &target, &["--speed", SPEED]).spawn().unwrap();
    // Into a part already copied, then the last MiB (not copied yet), then
    // across whatever the copy reached by then.
    let at = vm.copying_past(0);
    vm.write(&mut model, 0xa1, 4096, 64 << 10);
    vm.write(&mut model, 0xa2, SIZE - MIB, MIB);
    let at = vm.copying_past(at).min(SIZE - 2 * MIB);
    vm.write(&mut model, 0xa3, at - 3 * MIB / 2, 3 * MIB);
    // Not switched yet: the writes went through the mirror.
    assert!(vm.job().is_some(), "the writes fell inside the copy");

    let out = finished(child);
    assert!(out.status.success(), "live-restore failed: {}", stderr_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let target_node = report["target_node"].as_str().unwrap().to_string();
    assert!(target_node.starts_with("backy-live-"), "{report}");
    assert_eq!(report["node"], "disk0");
    assert_eq!(report["size"], SIZE);
    assert!(report["bytes_copied"].as_u64().unwrap() >= SIZE, "{report}");
    assert_eq!(report["removed_nodes"], json!(["disk0", "nbd0"]));
    assert_eq!(report["left_nodes"], json!([]));
    assert_eq!(report["target"], json!(target.canonicalize().unwrap()));

    // The job is gone; of the nodes only the target is left, and the
    // guest's backend reads it.
    let (names, jobs, fdsets) = vm.state();
    assert_eq!(names, [target_node.as_str()]);
    assert_eq!(jobs, json!([]));
    // The target's descriptor stays with QEMU (it may reopen the node).
    assert_eq!(fdsets.as_array().unwrap().len(), 1, "{fdsets}");
    assert_eq!(fdsets[0]["fds"][0]["opaque"], json!(target_node));
    // QEMU's NBD connection closed: qemu-nbd served its one client and left.
    wait_for("qemu-nbd to see its client go", Duration::from_secs(30), || {
        nbd.exited().is_some()
    });
    assert!(nbd.exited().unwrap().success());

    // The guest now writes into the target.
    if layout == Layout::Drive {
        let blocks = vm.qmp("query-block", json!({}));
        assert_eq!(blocks[0]["inserted"]["node-name"], json!(target_node));
    }
    vm.write(&mut model, 0xa4, 10 * MIB, MIB);
    assert!(
        std::fs::read(&target).unwrap() == model,
        "the target holds the source plus every write"
    );
    // The source image saw the writes made during the copy, not the one after.
    let source = std::fs::read(&src).unwrap();
    assert!(source[10 * MIB as usize] != 0xa4 && source[4096] == 0xa1);
    assert_eq!(vm.death(), None);
}

#[test]
fn a_running_guest_moves_onto_the_target_while_it_writes() {
    moves_the_guest_while_it_writes(Layout::Drive);
}

#[test]
fn monitor_owned_source_nodes_are_deleted() {
    moves_the_guest_while_it_writes(Layout::Blockdev);
}

#[test]
fn wrong_targets_are_refused_changing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, _) = source_image(d);
    let mut nbd = NbdSource::start(d, &src);
    let mut vm = Vm::start(d, &nbd.socket, Layout::Drive);
    let before = vm.state();
    let src_hash = file_hash(&src);

    // Another size.
    let small = d.join("small.raw");
    std::fs::write(&small, pattern(7, (32 * MIB) as usize)).unwrap();
    let small_hash = file_hash(&small);
    let out = live_restore(&vm, &small, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["kind"], "invalid_argument");
    assert_eq!(
        err["error"]["message"],
        format!(
            "{} holds 33554432 bytes, the source node has 67108864: a live restore needs a target of \
             exactly its size (or a path that does not exist yet, created at that size)",
            small.display()
        )
    );
    assert_eq!(file_hash(&small), small_hash);

    // The file qemu-nbd serves: in use.
    let out = live_restore(&vm, &src, &["--force"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["kind"], "busy", "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("is in use"),
        "{err}"
    );

    // Right size with data, no --force.
    let full = d.join("full.raw");
    std::fs::write(&full, pattern(8, SIZE as usize)).unwrap();
    let out = live_restore(&vm, &full, &[]).output().unwrap();
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["kind"], "already_exists", "{err}");

    // A node QEMU does not have: no target file appears.
    let new = d.join("new.raw");
    let out = Command::new(bin("backy-client"))
        .args(["live-restore", "--qmp"])
        .arg(&vm.qmp)
        .args(["--node", "nosuch", "--target"])
        .arg(&new)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("QEMU has no block node or drive \"nosuch\""),
        "{}",
        stderr_of(&out)
    );
    assert!(!new.exists());

    assert_eq!(vm.state(), before, "QEMU is as it was");
    assert_eq!(file_hash(&src), src_hash);
    assert!(nbd.exited().is_none(), "the guest still reads its source");
    assert_eq!(vm.death(), None);
}

/// Interrupted, or its job cancelled by another client: the guest stays
/// on its source (and still writes there), QEMU holds nothing of the run,
/// the target file it created is gone.
#[test]
fn a_stopped_copy_leaves_the_guest_on_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, mut model) = source_image(d);
    let mut nbd = NbdSource::start(d, &src);
    let mut vm = Vm::start(d, &nbd.socket, Layout::Drive);
    let before = vm.state();
    let target = d.join("restored.raw");

    // SIGINT mid-copy.
    let child = live_restore(&vm, &target, &["--speed", SPEED]).spawn().unwrap();
    vm.copying_past(0);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = finished(child);
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(
        err["error"]["message"],
        "interrupted by SIGINT: the guest stays on its source"
    );
    assert_eq!(vm.state(), before);
    assert!(!target.exists(), "the target it created is removed");

    // Cancelled by someone else.
    let child = live_restore(&vm, &target, &["--speed", SPEED]).spawn().unwrap();
    vm.copying_past(0);
    let job = vm.qmp("query-block-jobs", json!({}))[0]["device"].clone();
    vm.qmp("block-job-cancel", json!({"device": job, "force": true}));
    let out = finished(child);
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(
        err["error"]["message"],
        "QEMU's mirror job was cancelled (not by backy); the guest stays on its source"
    );
    assert_eq!(vm.state(), before);
    assert!(!target.exists());

    // The guest still writes to its source.
    vm.write(&mut model, 0x5c, 2 * MIB, 4096);
    assert!(std::fs::read(&src).unwrap() == model);
    assert!(nbd.exited().is_none());
    assert_eq!(vm.death(), None);
}

/// The whole path with backy's own export: a guest boots from a revision
/// (`export --overlay --once`), writes into the overlay, is moved onto a
/// local file while it writes, and the export ends when QEMU lets go. The
/// target is the revision plus every write; the overlay holds the writes
/// made before the switch; the revision on the server is untouched.
#[test]
fn a_guest_booted_from_a_backy_export_moves_onto_its_disk() {
    must_be_root();
    let fs = LoopFs::new("btrfs", 1 << 30);
    let d = fs.mount.join("work");
    std::fs::create_dir_all(&d).unwrap();
    let (src, mut model) = source_image(&d);
    let revision_bytes = model.clone();
    let server = Server::start(&fs.mount.join("base"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let rev = server.short_ids("vm1")[0].clone();

    let socket = d.join("vm1.nbd");
    let overlay = d.join("vm1.overlay");
    let export_cmd = |once: bool| {
        let mut cmd = Command::new(bin("backy-client"));
        cmd.args(["--server", &server.url, "--config"])
            .arg(&server.client_config)
            .args(["--json", "export", "vm1", "-r", &rev, "--socket"])
            .arg(&socket)
            .arg("--overlay")
            .arg(&overlay)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if once {
            cmd.arg("--once");
        }
        cmd
    };
    let mut export = KillOnDrop(export_cmd(true).spawn().unwrap());
    let mut out = BufReader::new(export.0.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    let ready: Value = serde_json::from_str(&ready).unwrap_or_else(|e| panic!("{e}: {ready:?}"));
    assert_eq!(ready["writable"], json!(true), "{ready}");

    let mut vm = Vm::start(&d, &socket, Layout::Drive);
    // Booted from the backup: a write before the restore goes to the overlay.
    vm.write(&mut model, 0xb0, 5 * MIB, 64 << 10);

    let target = d.join("restored.raw");
    let child = live_restore(&vm, &target, &["--speed", SPEED]).spawn().unwrap();
    vm.copying_past(0);
    vm.write(&mut model, 0xb1, 4096, 64 << 10);
    vm.write(&mut model, 0xb2, SIZE - MIB, MIB);
    assert!(vm.job().is_some(), "the writes fell inside the copy");
    let done = finished(child);
    assert!(done.status.success(), "live-restore failed: {}", stderr_of(&done));
    let at_switch = model.clone();
    vm.write(&mut model, 0xb3, 10 * MIB, MIB);
    assert!(
        std::fs::read(&target).unwrap() == model,
        "the target holds the revision plus every write"
    );

    // QEMU let go of the export: it ends by itself and says what it did.
    wait_for(
        "the export to end with its client",
        Duration::from_secs(30),
        || export.0.try_wait().unwrap().is_some(),
    );
    assert!(export.0.wait().unwrap().success());
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut out, &mut summary).unwrap();
    let summary: Value = serde_json::from_str(summary.trim()).unwrap_or_else(|e| panic!("{e}: {summary}"));
    assert_eq!(summary["failed_fetches"], json!(0), "{summary}");
    assert!(
        summary["written_bytes"].as_u64().unwrap() >= MIB + (128 << 10),
        "{summary}"
    );

    // The overlay kept the writes made through the export; reopened, it
    // serves the revision plus those (and not the one after the switch).
    let mut again = KillOnDrop(export_cmd(false).spawn().unwrap());
    let mut out = BufReader::new(again.0.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    let uri = format!("nbd+unix:///vm1?socket={}", socket.display());
    let copy = d.join("overlay-view.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        std::fs::read(&copy).unwrap() == at_switch,
        "the overlay holds the writes up to the switch"
    );

    // Nothing was written to the server: its revision restores as pushed.
    let restored = d.join("revision.raw");
    server.client_ok(&["restore", "vm1", "-r", &rev, restored.to_str().unwrap()]);
    assert!(
        std::fs::read(&restored).unwrap() == revision_bytes,
        "the revision is unchanged"
    );
    drop(vm);
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
