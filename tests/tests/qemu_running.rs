//! `type: qemu` with `qmp:`: a disk of a running QEMU pushed by real
//! server and client processes. A QEMU without a guest (`-machine none`)
//! stands in for the VM; "guest writes" go through its second QMP monitor
//! (`human-monitor-command` with `qemu-io`), each followed by a flush as a
//! guest's would be. A model of the disk, updated with every write, is
//! what each revision must restore to, byte for byte.
//!
//! Covered: full then incremental pushes (bytes sent = dirty granules);
//! writes made during a push (from its `post-snapshot` hook, right after
//! the backup instant) absent from its revision and in the next; QEMU
//! quit and restarted (bitmap persisted: still incremental); QEMU killed
//! (bitmap lost, or inconsistent: full read that says why); a failed push
//! and a client killed mid-push leave nothing behind in QEMU and the
//! parent's bitmap in place. A raw disk: its bitmap lives in QEMU's
//! memory, incremental while QEMU runs, a full read (saying why) after a
//! restart. QEMU is alive after every push.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

const G: u64 = 64 << 10;
const SIZE: u64 = 64 * MIB;

/// A QEMU holding `disk.qcow2` (or a raw disk) as node `disk0` (drive
/// `drive0`), with a QMP socket for backy and a monitor for the test.
struct Vm {
    dir: PathBuf,
    /// The disk file's name and format.
    disk: (&'static str, &'static str),
    child: Option<Child>,
    test: Option<(UnixStream, BufReader<UnixStream>)>,
}

impl Vm {
    fn start(dir: &Path) -> Vm {
        Vm::start_with(dir, ("disk.qcow2", "qcow2"))
    }

    fn start_with(dir: &Path, disk: (&'static str, &'static str)) -> Vm {
        let img = dir.join(disk.0);
        let backy = dir.join("backy.qmp");
        let _ = std::fs::remove_file(&backy);
        // The test's monitor is a socket connected before QEMU starts (its
        // stdin). A client connecting while QEMU sets its monitors up races
        // QEMU's monitor I/O thread: under load, QEMU 10.0 greeted such a
        // client twice, the second greeting resetting the capabilities
        // negotiation (upstream: "monitor/qmp: cleanup SocketChardev
        // listener sources early to avoid fd handling race", 2025-11).
        let (stream, theirs) = UnixStream::pair().unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-accel",
                "tcg",
            ])
            .arg("-drive")
            .arg(format!(
                "if=none,id=drive0,node-name=disk0,format={},file={}",
                disk.1,
                img.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", backy.display()))
            .args([
                "-chardev",
                "socket,id=test,fd=0",
                "-mon",
                "chardev=test,mode=control",
            ])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            // Kept for the failure message should QEMU die.
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (apt install qemu-system-x86)");
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            disk,
            child: Some(child),
            test: None,
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"QMP\""), "{line}; {:?}", vm.death());
        vm.test = Some((stream, reader));
        vm.qmp("qmp_capabilities", json!({}));
        // backy's monitor set up before backy connects: it has greeted a
        // client of ours (the same race; the socket file appears at bind(),
        // before QEMU listens on it).
        wait_for("QEMU's QMP socket for backy", Duration::from_secs(30), || {
            qmp_greets(&backy)
        });
        vm
    }

    /// Why QEMU is gone, if it is: its exit status and stderr.
    fn death(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        let err = std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        Some(format!("QEMU exited ({status}): {err}"))
    }

    /// Runs a command on the test's socket; its `return`.
    fn qmp(&mut self, cmd: &str, args: Value) -> Value {
        let (stream, _) = self.test.as_mut().unwrap();
        // One write of the whole line: `writeln!` with a `Value` sends each
        // JSON token on its own, QEMU runs a command as soon as its object
        // is complete, and after a `quit` it may be gone before the newline
        // (a broken pipe that looked like QEMU dying).
        let line = format!("{}\n", json!({"execute": cmd, "arguments": args}));
        let sent = stream.write_all(line.as_bytes());
        if let Err(e) = sent {
            // A QEMU on its way out may not have exited yet.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.death().is_none() && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            let mut rest = String::new();
            let (_, reader) = self.test.as_mut().unwrap();
            let _ = std::io::Read::read_to_string(reader, &mut rest);
            panic!("QMP {cmd}: {e}; {:?}; unread: {rest}", self.death());
        }
        let (_, reader) = self.test.as_mut().unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            match v.get("return") {
                Some(r) => return r.clone(),
                None => panic!("{cmd}: {v}"),
            }
        }
    }

    /// A guest write of `len` bytes of `pattern` at `offset`, flushed.
    fn write(&mut self, model: &mut [u8], pattern: u8, offset: u64, len: u64) {
        for io in [format!("write -P 0x{pattern:02x} {offset} {len}"), "flush".into()] {
            let line = format!("qemu-io drive0 \"{io}\"");
            self.qmp("human-monitor-command", json!({"command-line": line}));
        }
        model[offset as usize..(offset + len) as usize].fill(pattern);
    }

    /// The disk node's bitmaps by name, and whether anything of a push
    /// (overlay, job, export, fd set) is left in QEMU.
    fn state(&mut self) -> (Vec<String>, Vec<String>) {
        let nodes = self.qmp("query-named-block-nodes", json!({"flat": true}));
        let disk = nodes
            .as_array()
            .unwrap_or_else(|| panic!("query-named-block-nodes: {nodes}"))
            .iter()
            .find(|n| n["node-name"] == "disk0")
            .unwrap()
            .clone();
        // No key at all without bitmaps.
        let bitmaps = disk["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["name"].as_str().map(str::to_string))
            .collect();
        let mut left: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.starts_with("backy"))
            .map(|n| format!("node {n}"))
            .collect();
        for (what, key) in [("query-block-jobs", "device"), ("query-block-exports", "id")] {
            for item in self.qmp(what, json!({})).as_array().unwrap() {
                left.push(format!("{what} {}", item[key]));
            }
        }
        for set in self.qmp("query-fdsets", json!({})).as_array().unwrap() {
            left.push(format!("fdset {set}"));
        }
        (bitmaps, left)
    }

    fn quit(&mut self) {
        self.qmp("quit", json!({}));
        self.test = None;
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "QEMU quit: {status}");
    }

    fn kill(&mut self) {
        self.test = None;
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn restart(&mut self) {
        let mut vm = Vm::start_with(&self.dir, self.disk);
        self.child = vm.child.take();
        self.test = vm.test.take();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pushed(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// QEMU survived what backy did to it.
fn alive(vm: &mut Vm) {
    assert_eq!(vm.death(), None, "the guest's QEMU must survive a push");
}

fn newest_id(server: &Server) -> String {
    let revs = server.revisions("vm1");
    revs.last().unwrap()["id"].as_str().unwrap().to_string()
}

/// The revision restores to exactly `model`.
fn check_restore(server: &Server, dir: &Path, id: &str, model: &[u8]) {
    let out = dir.join(format!("restored-{id}"));
    server.client_ok(&["restore", "vm1", "-r", id, out.to_str().unwrap()]);
    let restored = std::fs::read(&out).unwrap();
    assert!(
        restored == model,
        "revision {id} restores to the disk at its instant"
    );
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_running_guest_is_backed_up_from_one_instant_with_persistent_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    let mut model = vec![0u8; SIZE as usize];
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    let mut vm = Vm::start(d);
    vm.write(&mut model, 0x11, 0, 8 * MIB);
    vm.write(&mut model, 0x22, 40 * MIB, 4 * MIB);

    // The post-snapshot hook runs right after the backup instant; with
    // `pause` present it waits there for the test (guest writes "during
    // the backup").
    let (log, pause, at) = (d.join("hooks.log"), d.join("pause"), d.join("at-instant"));
    let post = format!(
        "if [ -e {p} ]; then touch {a}; while [ -e {a} ]; do sleep 0.05; done; fi; echo post $BACKY_NODE >> {l}",
        p = pause.display(),
        a = at.display(),
        l = log.display()
    );
    let jobs = format!(
        "  vm1:\n    schedule: none\n    source:\n      type: qemu\n      qmp: {}\n      node: drive0\n      \
         scratch-dir: {}\n      hooks:\n        pre-snapshot: echo pre >> {l}\n        post-snapshot: '{post}'\n        \
         cleanup: echo cleanup >> {l}\n        hook-timeout: 60\n",
        d.join("backy.qmp").display(),
        d.display(),
        l = log.display()
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start(&base, &jobs);
    let push = |env: &[(&str, &str)]| server.client_env(env, &["--json", "push", "vm1", "--force"]);

    // 1. Full: the allocated data, read from the fleecing view.
    let first = pushed(push(&[]));
    alive(&mut vm);
    eprintln!(
        "full push: read {} sent {}",
        first["bytes_read"], first["bytes_sent"]
    );
    assert_eq!(first["bytes_sent"].as_u64(), Some(12 * MIB));
    assert!(first.get("full_read").is_none(), "{first}");
    let id1 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id1}")], vec![]));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost drive0\ncleanup\n"
    );
    check_restore(&server, d, &id1, &model);

    // 2. Five granules written; then two more while the push reads.
    vm.write(&mut model, 0x55, 3 * MIB + 100, 10);
    vm.write(&mut model, 0x66, 41 * MIB - 1, 2);
    vm.write(&mut model, 0x77, 60 * MIB, 2 * G);
    let at_instant = model.clone();
    std::fs::write(&pause, "").unwrap();
    let second = std::thread::scope(|s| {
        let client = s.spawn(|| push(&[]));
        wait_for("the push's backup instant", Duration::from_secs(60), || {
            at.exists()
        });
        // Over a granule the push sends, and elsewhere.
        vm.write(&mut model, 0x99, 60 * MIB, G);
        vm.write(&mut model, 0x9a, 30 * MIB, 100);
        std::fs::remove_file(&pause).unwrap();
        std::fs::remove_file(&at).unwrap();
        pushed(client.join().unwrap())
    });
    alive(&mut vm);
    eprintln!(
        "incremental push: read {} sent {}",
        second["bytes_read"], second["bytes_sent"]
    );
    assert_eq!(second["bytes_sent"].as_u64(), Some(5 * G));
    assert_eq!(second["bytes_read"].as_u64(), Some(3 * BLOCK));
    let id2 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id2}")], vec![]));
    check_restore(&server, d, &id2, &at_instant);

    // 3. QEMU quits and starts again: the bitmap was saved in the qcow2,
    // and holds the two writes made during push 2.
    vm.quit();
    vm.restart();
    let third = pushed(push(&[]));
    alive(&mut vm);
    assert!(third.get("full_read").is_none(), "{third}");
    assert_eq!(third["bytes_sent"].as_u64(), Some(2 * G));
    let id3 = newest_id(&server);
    check_restore(&server, d, &id3, &model);

    // 4. A push failing mid-read, and one whose client is killed
    // mid-push: nothing of theirs stays in QEMU, the parent's bitmap does.
    vm.write(&mut model, 0x88, 20 * MIB, G);
    let out = push(&[("BACKY_FAULT", "error:client.qemu-read")]);
    assert!(!out.status.success());
    assert_eq!(vm.state(), (vec![format!("backy-{id3}")], vec![]));
    let out = push(&[("BACKY_FAULT", "client.frame")]);
    assert!(!out.status.success());
    let (bitmaps, left) = vm.state();
    assert!(!left.is_empty(), "a killed client leaves its export: {bitmaps:?}");
    let fourth = pushed(push(&[]));
    alive(&mut vm);
    assert!(fourth.get("full_read").is_none(), "{fourth}");
    assert_eq!(fourth["bytes_sent"].as_u64(), Some(G));
    let id4 = newest_id(&server);
    assert_eq!(
        vm.state(),
        (vec![format!("backy-{id4}")], vec![]),
        "the next push cleared what the killed one left"
    );
    check_restore(&server, d, &id4, &model);
    assert_eq!(server.revisions("vm1").len(), 4);

    // 5. QEMU killed: the bitmap added in this run was never saved, the
    // one loaded at start is left inconsistent. A full read, compared with
    // the parent's digests; the stale bitmap goes.
    vm.write(&mut model, 0x44, 50 * MIB, G);
    vm.kill();
    vm.restart();
    let fifth = pushed(push(&[]));
    alive(&mut vm);
    let why = fifth["full_read"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("has no bitmap backy-{id4}")), "{fifth}");
    // Without known ranges the changed block goes through the granule
    // exchange: its granule digests, then the changed granule (README: How
    // it works).
    assert_eq!(fifth["bytes_sent"].as_u64(), Some(G + 1024), "{fifth}");
    assert!(fifth["bytes_read"].as_u64().unwrap() >= 12 * MIB, "{fifth}");
    let id5 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id5}")], vec![]));
    check_restore(&server, d, &id5, &model);

    // 6. A bitmap saved, loaded at the next start, then QEMU killed: left
    // inconsistent, unusable, removed by the next commit.
    vm.quit();
    vm.restart();
    vm.write(&mut model, 0x45, 51 * MIB, G);
    vm.kill();
    vm.restart();
    let sixth = pushed(push(&[]));
    alive(&mut vm);
    let why = sixth["full_read"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("bitmap backy-{id5} is inconsistent")),
        "{sixth}"
    );
    let id6 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id6}")], vec![]));
    check_restore(&server, d, &id6, &model);
    vm.quit();
}

#[test]
fn a_running_guest_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            d.join("disk.qcow2").to_str().unwrap(),
            "8M",
        ],
    );
    let mut vm = Vm::start(d);
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let jobs = format!(
        "  vm1: {{schedule: none, source: {{type: qemu, qmp: {q}, node: disk9}}}}\n  \
         vm2: {{schedule: none, source: {{type: qemu, qmp: {d}/none.qmp, node: disk0}}}}\n  \
         vm3: {{schedule: none, source: {{type: qemu, qmp: {q}, node: disk0}}}}\n",
        q = d.join("backy.qmp").display(),
        d = d.display()
    );
    let server = Server::start(&base, &jobs);
    for (job, want) in [
        (
            "vm1",
            "QEMU has no block node or drive \"disk9\" (it has: disk0, drive0)",
        ),
        ("vm2", "none.qmp: No such file or directory"),
    ] {
        let out = server.client(&["push", job]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{job}: {err}");
        assert!(server.revisions(job).is_empty());
    }
    assert_eq!(vm.state(), (vec![], vec![]));

    // Issue 29, item 2: another client holds backy's QMP socket (QEMU
    // serves one at a time and greets the next only when it leaves). The
    // push gives up within its bound and says why, instead of waiting
    // forever; `timeout` ends the client should it hang (exit 124).
    let held = UnixStream::connect(d.join("backy.qmp")).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = String::new();
    BufReader::new(held.try_clone().unwrap())
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("backy-client"))
        .args(["--server", &server.url, "--config"])
        .arg(&server.client_config)
        .args(["push", "vm3", "--force"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("busy (another client is connected)") && err.lines().count() == 1,
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    assert!(server.revisions("vm3").is_empty());
    drop(held);
    vm.quit();
}

#[test]
fn a_raw_disk_is_incremental_while_qemu_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut model = vec![0u8; 16 * MIB as usize];
    let img = d.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(model.len() as u64)
        .unwrap();
    let mut vm = Vm::start_with(d, ("disk.raw", "raw"));
    vm.write(&mut model, 0x11, 0, 2 * MIB);
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let jobs = format!(
        "  vm1: {{schedule: none, source: {{type: qemu, qmp: {}, node: disk0, scratch-dir: {}}}}}\n",
        d.join("backy.qmp").display(),
        d.display()
    );
    let server = Server::start(&base, &jobs);
    let push = || pushed(server.client(&["--json", "push", "vm1", "--force"]));
    let show = |what: &str, v: &Value| {
        eprintln!(
            "raw, {what}: read {} sent {} full_read {}",
            v["bytes_read"], v["bytes_sent"], v["full_read"]
        )
    };

    // 1. Full: the written 2 MiB (the rest of the file is a hole).
    let first = push();
    alive(&mut vm);
    show("full", &first);
    assert!(first.get("full_read").is_none(), "{first}");
    assert_eq!(first["bytes_sent"].as_u64(), Some(2 * MIB), "{first}");
    assert_eq!(first["bytes_read"].as_u64(), Some(BLOCK), "{first}");
    let id1 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id1}")], vec![]));
    check_restore(&server, d, &id1, &model);

    // 2. The bitmap lives in QEMU's memory: incremental while it runs.
    // Four granules in two blocks.
    vm.write(&mut model, 0x22, 5 * MIB, 100);
    vm.write(&mut model, 0x23, 6 * MIB - 1, 2);
    vm.write(&mut model, 0x24, 13 * MIB, 10);
    let second = push();
    alive(&mut vm);
    show("incremental", &second);
    assert!(second.get("full_read").is_none(), "{second}");
    assert_eq!(second["bytes_sent"].as_u64(), Some(4 * G), "{second}");
    assert_eq!(second["bytes_read"].as_u64(), Some(2 * BLOCK), "{second}");
    let id2 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id2}")], vec![]));
    check_restore(&server, d, &id2, &model);

    // 3. Gone with a restart: a full read compared with the parent's
    // digests, which says why; only the changed granule is sent (after
    // its block's granule digests).
    vm.quit();
    vm.restart();
    assert_eq!(vm.state(), (vec![], vec![]));
    vm.write(&mut model, 0x33, 9 * MIB, 100);
    let third = push();
    alive(&mut vm);
    show("after a restart", &third);
    let why = third["full_read"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("has no bitmap backy-{id2}")), "{third}");
    assert_eq!(third["bytes_sent"].as_u64(), Some(G + 1024), "{third}");
    // Every block holding data: by now all four.
    assert_eq!(third["bytes_read"].as_u64(), Some(model.len() as u64), "{third}");
    let id3 = newest_id(&server);
    assert_eq!(vm.state(), (vec![format!("backy-{id3}")], vec![]));
    check_restore(&server, d, &id3, &model);

    // 4. The new bitmap serves the next push again.
    vm.write(&mut model, 0x44, 15 * MIB, G);
    let fourth = push();
    alive(&mut vm);
    show("incremental again", &fourth);
    assert!(fourth.get("full_read").is_none(), "{fourth}");
    assert_eq!(fourth["bytes_sent"].as_u64(), Some(G), "{fourth}");
    assert_eq!(fourth["bytes_read"].as_u64(), Some(BLOCK), "{fourth}");
    check_restore(&server, d, &newest_id(&server), &model);
    assert_eq!(server.revisions("vm1").len(), 4);
    vm.quit();
}

/// Issue 34: a dirty bitmap that lies. A write is made, the parent's
/// bitmap is cleared by hand, another write follows: the bitmap names only
/// the second. With the audit at 100 % the push re-reads every block the
/// bitmap calls unchanged, finds the first write, reads the whole disk,
/// and the revision restores to the disk byte for byte; `check` warns. An
/// honest bitmap at the default sample then audits clean.
#[test]
fn the_audit_catches_a_bitmap_cleared_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    let mut model = vec![0u8; SIZE as usize];
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    let mut vm = Vm::start(d);
    vm.write(&mut model, 0x11, 0, 8 * MIB);
    let jobs = format!(
        "  vm1:\n    schedule: none\n    source:\n      type: qemu\n      qmp: {}\n      node: drive0\n      \
         scratch-dir: {}\n",
        d.join("backy.qmp").display(),
        d.display(),
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start(&base, &jobs);
    let push = |extra: &[&str]| {
        let mut args = vec!["--json", "push", "vm1", "--force"];
        args.extend_from_slice(extra);
        pushed(server.client(&args))
    };
    push(&[]);
    let id1 = newest_id(&server);

    // Missed: block 5 (20 MiB), written before the clear. Named: block 10.
    vm.write(&mut model, 0x33, 20 * MIB + 4096, G);
    vm.qmp(
        "block-dirty-bitmap-clear",
        json!({"node": "disk0", "name": format!("backy-{id1}")}),
    );
    vm.write(&mut model, 0x44, 40 * MIB, G);
    let second = push(&["--audit-sample", "100%"]);
    alive(&mut vm);
    // 16 blocks of 4 MiB, 1 named: 15 re-read, block 5 differs.
    assert_eq!(second["audit"]["tracker"], "qemu-bitmap", "{second}");
    assert_eq!(second["audit"]["sampled"].as_u64(), Some(15), "{second}");
    assert_eq!(second["audit"]["mismatched"].as_u64(), Some(1), "{second}");
    // The whole disk's data was read then (8 MiB first written, and the
    // two blocks written since).
    assert!(second["bytes_read"].as_u64().unwrap() >= 10 * MIB, "{second}");
    let id2 = newest_id(&server);
    check_restore(&server, d, &id2, &model);
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(
        line.contains(
            "vm1: change tracker QEMU dirty bitmap missed writes: 1 of 15 sampled unchanged blocks differ"
        ),
        "{line}"
    );
    assert_eq!(vm.state(), (vec![format!("backy-{id2}")], vec![]));

    // An honest bitmap at the default sample (0.5 %: one block).
    vm.write(&mut model, 0x55, 50 * MIB, G);
    let third = push(&[]);
    alive(&mut vm);
    assert_eq!(third["audit"]["sampled"].as_u64(), Some(1), "{third}");
    assert_eq!(third["audit"]["mismatched"].as_u64(), Some(0), "{third}");
    assert_eq!(third["bytes_read"].as_u64(), Some(BLOCK), "{third}");
    let id3 = newest_id(&server);
    check_restore(&server, d, &id3, &model);
    let check = server.client(&["check", "vm1"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    vm.quit();
}
