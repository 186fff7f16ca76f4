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
/// `drive0`), and further disks as `disk1`, ... (`drive1`, ...), with a QMP
/// socket for backy and a monitor for the test.
struct Vm {
    dir: PathBuf,
    /// The disk files' names and formats.
    disks: Vec<(&'static str, &'static str)>,
    child: Option<Child>,
    test: Option<(UnixStream, BufReader<UnixStream>)>,
}

impl Vm {
    fn start(dir: &Path) -> Vm {
        Vm::start_with(dir, ("disk.qcow2", "qcow2"))
    }

    fn start_with(dir: &Path, disk: (&'static str, &'static str)) -> Vm {
        Vm::start_disks(dir, vec![disk])
    }

    fn start_disks(dir: &Path, disks: Vec<(&'static str, &'static str)>) -> Vm {
        let backy = dir.join("backy.qmp");
        let _ = std::fs::remove_file(&backy);
        // The test's monitor is a socket connected before QEMU starts (its
        // stdin). A client connecting while QEMU sets its monitors up races
        // QEMU's monitor I/O thread: under load, QEMU 10.0 greeted such a
        // client twice, the second greeting resetting the capabilities
        // negotiation (upstream: "monitor/qmp: cleanup SocketChardev
        // listener sources early to avoid fd handling race", 2025-11).
        let (stream, theirs) = UnixStream::pair().unwrap();
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ]);
        for (i, disk) in disks.iter().enumerate() {
            qemu.arg("-drive").arg(format!(
                "if=none,id=drive{i},node-name=disk{i},format={},file={}",
                disk.1,
                dir.join(disk.0).display()
            ));
        }
        let child = qemu
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", backy.display()))
            .args([
                "-chardev",
                "socket,id=test,fd=0",
                "-mon",
                "chardev=test,mode=control",
            ])
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            // What HMP's qemu-io says of each guest write ("wrote ..." or
            // "write failed: ...") goes there, not into the QMP reply.
            .stdout(std::fs::File::create(dir.join("qemu.out")).unwrap())
            // Kept for the failure message should QEMU die.
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (apt install qemu-system-x86)");
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            disks,
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
        self.write_on(0, model, pattern, offset, len)
    }

    /// A guest write to drive `drive`.
    fn write_on(&mut self, drive: usize, model: &mut [u8], pattern: u8, offset: u64, len: u64) {
        for io in [format!("write -P 0x{pattern:02x} {offset} {len}"), "flush".into()] {
            let line = format!("qemu-io drive{drive} \"{io}\"");
            self.qmp("human-monitor-command", json!({"command-line": line}));
        }
        model[offset as usize..(offset + len) as usize].fill(pattern);
    }

    /// The disk node's bitmaps by name, and whether anything of a push
    /// (overlay, job, export, fd set) is left in QEMU.
    fn state(&mut self) -> (Vec<String>, Vec<String>) {
        self.state_of("disk0")
    }

    fn state_of(&mut self, node: &str) -> (Vec<String>, Vec<String>) {
        let nodes = self.qmp("query-named-block-nodes", json!({"flat": true}));
        let disk = nodes
            .as_array()
            .unwrap_or_else(|| panic!("query-named-block-nodes: {nodes}"))
            .iter()
            .find(|n| n["node-name"] == node)
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
        let mut vm = Vm::start_disks(&self.dir, self.disks.clone());
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
    check_restore_of(server, dir, "vm1", id, model)
}

fn check_restore_of(server: &Server, dir: &Path, job: &str, id: &str, model: &[u8]) {
    let out = dir.join(format!("restored-{id}"));
    server.client_ok(&["restore", job, "-r", id, out.to_str().unwrap()]);
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

/// A tmpfs of `size` at `path`, unmounted when dropped: a scratch-dir
/// that fills up.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let size = format!("size={size}");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", path.to_str().unwrap()],
        );
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// What HMP's qemu-io said of the guest's writes so far: how many were
/// written, and the lines of those that failed.
fn guest_writes(dir: &Path) -> (usize, Vec<String>) {
    let out = std::fs::read_to_string(dir.join("qemu.out")).unwrap_or_default();
    let wrote = out.lines().filter(|l| l.starts_with("wrote ")).count();
    let failed = out
        .lines()
        .filter(|l| l.contains("failed"))
        .map(str::to_string)
        .collect();
    (wrote, failed)
}

/// The disk image, read with qemu-img once QEMU has quit, is `model`.
fn check_image(dir: &Path, image: &str, model: &[u8]) {
    let raw = dir.join(format!("{image}.raw"));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            dir.join(image).to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "{image} holds every guest write"
    );
}

/// A `post-snapshot` hook that, while `pause` exists, marks the instant
/// (`at`) and waits there until the test removes `at`.
fn pausing_hook(pause: &Path, at: &Path) -> String {
    format!(
        "if [ -e {p} ]; then touch {a}; while [ -e {a} ]; do sleep 0.05; done; fi",
        p = pause.display(),
        a = at.display()
    )
}

/// Runs `push` with the instant held by [`pausing_hook`]; `during` runs
/// while it is held (the guest writing after the instant).
fn push_holding_the_instant<T: Send>(
    pause: &Path,
    at: &Path,
    push: impl FnOnce() -> T + Send,
    during: impl FnOnce(),
) -> T {
    std::fs::write(pause, "").unwrap();
    std::thread::scope(|s| {
        let client = s.spawn(push);
        wait_for("the push's backup instant", Duration::from_secs(60), || {
            at.exists() || client.is_finished()
        });
        assert!(at.exists(), "the push ended before its instant");
        during();
        std::fs::remove_file(pause).unwrap();
        std::fs::remove_file(at).unwrap();
        client.join().unwrap()
    })
}

/// Issue 34, item 3: the old data of what the guest overwrites during a
/// push goes to the fleecing scratch; when that is full, the push fails
/// with a clear message and commits nothing, and the guest's writes all
/// succeed (before, they failed with ENOSPC). QEMU stays clean, and the
/// next push with room works.
#[test]
fn a_full_fleecing_scratch_fails_the_push_and_never_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    let scratch = Tmpfs::mount(&d.join("scratch"), "16M");
    let mut model = vec![0u8; SIZE as usize];
    let mut vm = Vm::start(d);
    // Data the guest will overwrite: its old bytes must go to the scratch.
    vm.write(&mut model, 0x11, 0, 48 * MIB);
    let (pause, at) = (d.join("pause"), d.join("at-instant"));
    let jobs = format!(
        "  vm1:\n    schedule: none\n    source:\n      type: qemu\n      qmp: {}\n      node: drive0\n      \
         scratch-dir: {}\n      hooks:\n        post-snapshot: '{}'\n        hook-timeout: 120\n",
        d.join("backy.qmp").display(),
        scratch.0.display(),
        pausing_hook(&pause, &at)
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start(&base, &jobs);

    // 32 MiB rewritten while the push holds its instant: twice the scratch.
    let out = push_holding_the_instant(
        &pause,
        &at,
        || server.client(&["push", "vm1", "--force"]),
        || {
            for i in 0..32 {
                vm.write(&mut model, 0x22, i * MIB, MIB);
            }
        },
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("node disk0: the fleecing scratch could not take")
            && stderr.contains("(No space left on device)")
            && stderr.contains("the guest's writes went on unharmed"),
        "{stderr}"
    );
    assert!(server.revisions("vm1").is_empty(), "no revision committed");
    let status = server.status_json("vm1");
    let last_error = status["jobs"][0]["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("fleecing scratch"),
        "the server counted the failure: {status}"
    );
    alive(&mut vm);
    let (wrote, failed) = guest_writes(d);
    assert_eq!(wrote, 33, "every guest write was written");
    assert!(failed.is_empty(), "no guest write failed: {failed:?}");
    assert_eq!(
        vm.state(),
        (vec![], vec![]),
        "the failed push left nothing in QEMU (its new bitmap removed)"
    );

    // The scratch is empty again (the overlay was unlinked, QEMU let go):
    // a push with no writes during it fits.
    let pushed = pushed(server.client(&["--json", "push", "vm1", "--force"]));
    alive(&mut vm);
    let id = newest_id(&server);
    assert_eq!(pushed["revision"]["id"].as_str(), Some(id.as_str()));
    check_restore(&server, d, &id, &model);
    vm.quit();
    check_image(d, "disk.qcow2", &model);
}

/// Issue 34, item 1: a group of two jobs, the two disks of one guest,
/// pushed by `push GROUP` from one instant (one QMP transaction, the
/// group's hooks once around it). Guest writes straddle each instant; a
/// model per disk records them and where the instant fell, and each
/// revision restores to its disk's model at that point. Every revision
/// records the group, the instant and the disk count, and both share one
/// revision time. A disk that fails (its scratch full) commits none of
/// the instant (exit 1): the other disk's revision, pushed and held, is
/// dropped, and both disks keep their parents' bitmaps, so the next group
/// push is still incremental and right.
#[test]
fn a_group_takes_every_disk_of_a_guest_at_one_instant() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for disk in ["disk0.qcow2", "disk1.qcow2"] {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                d.join(disk).to_str().unwrap(),
                "64M",
            ],
        );
    }
    let scratch1 = Tmpfs::mount(&d.join("scratch1"), "16M");
    let mut vm = Vm::start_disks(d, vec![("disk0.qcow2", "qcow2"), ("disk1.qcow2", "qcow2")]);
    let mut m0 = vec![0u8; SIZE as usize];
    let mut m1 = vec![0u8; SIZE as usize];
    vm.write_on(0, &mut m0, 0x11, 0, 4 * MIB);
    vm.write_on(1, &mut m1, 0x21, 0, 32 * MIB);

    let (log, pause, at) = (d.join("hooks.log"), d.join("pause"), d.join("at-instant"));
    let qmp = d.join("backy.qmp");
    let jobs = format!(
        "  vm1-a: {{schedule: none, source: {{type: qemu, qmp: {q}, node: drive0, scratch-dir: {d}, \
         hooks: {{pre-snapshot: 'echo member >> {l}'}}}}}}\n  \
         vm1-b: {{schedule: none, source: {{type: qemu, qmp: {q}, node: drive1, scratch-dir: {s}}}}}\n",
        q = qmp.display(),
        d = d.display(),
        s = scratch1.0.display(),
        l = log.display()
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start(&base, &jobs);
    let mut client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    client_yaml.push_str(&format!(
        "groups:\n  vm1:\n    jobs: [vm1-a, vm1-b]\n    hooks:\n      \
         pre-snapshot: 'echo pre $BACKY_JOB $BACKY_NODE >> {l}'\n      post-snapshot: '{post}; echo post >> {l}'\n      \
         cleanup: 'echo cleanup >> {l}'\n      hook-timeout: 120\n",
        l = log.display(),
        post = pausing_hook(&pause, &at)
    ));
    std::fs::write(&server.client_config, client_yaml).unwrap();
    let push = || server.client(&["--json", "push", "vm1"]);
    let newest = |job: &str| {
        let revs = server.revisions(job);
        revs.last().unwrap().clone()
    };
    // The group's document, the instant it names, and checks common to
    // every complete push: both revisions carry the instant.
    let complete = |out: std::process::Output| -> (Value, String) {
        let doc = pushed(out);
        assert_eq!(doc["complete"], true, "{doc}");
        let instant = doc["instant"].as_str().unwrap().to_string();
        for (i, job) in ["vm1-a", "vm1-b"].iter().enumerate() {
            let disk = &doc["disks"][i];
            assert_eq!(disk["job"], *job, "{doc}");
            let group = &disk["pushed"]["revision"]["group"];
            assert_eq!(
                *group,
                json!({"name": "vm1", "instant": instant, "disks": 2}),
                "{doc}"
            );
            let stored = newest(job);
            assert_eq!(stored["group"], *group, "{job} keeps the instant: {stored}");
            assert_eq!(stored["id"], disk["pushed"]["revision"]["id"]);
            assert_eq!(
                stored["timestamp"], disk["pushed"]["revision"]["timestamp"],
                "{job}: the push reports the group's revision time"
            );
        }
        assert_eq!(
            newest("vm1-a")["timestamp"],
            newest("vm1-b")["timestamp"],
            "one revision time for the instant"
        );
        (doc, instant)
    };
    let id = |doc: &Value, i: usize| {
        doc["disks"][i]["pushed"]["revision"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sent = |doc: &Value, i: usize| doc["disks"][i]["pushed"]["bytes_sent"].as_u64().unwrap();

    // 1. Full. While the instant is held, both disks are written (disk1
    // first): neither write is in the instant, on either disk.
    let mut at_instant = (Vec::new(), Vec::new());
    let out = push_holding_the_instant(&pause, &at, push, || {
        at_instant = (m0.clone(), m1.clone());
        vm.write_on(1, &mut m1, 0x31, 20 * MIB, G);
        vm.write_on(0, &mut m0, 0x32, 50 * MIB, G);
    });
    let (first, instant1) = complete(out);
    alive(&mut vm);
    assert_eq!(sent(&first, 0), 4 * MIB, "{first}");
    assert_eq!(sent(&first, 1), 32 * MIB, "{first}");
    check_restore_of(&server, d, "vm1-a", &id(&first, 0), &at_instant.0);
    check_restore_of(&server, d, "vm1-b", &id(&first, 1), &at_instant.1);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre vm1 drive0 drive1\npost\ncleanup\n",
        "the group's hooks once around the one instant, the members' not at all"
    );
    assert_eq!(
        vm.state_of("disk0"),
        (vec![format!("backy-{}", id(&first, 0))], vec![])
    );
    assert_eq!(
        vm.state_of("disk1"),
        (vec![format!("backy-{}", id(&first, 1))], vec![])
    );

    // 2. Incremental: writes before the instant on both disks, and again
    // after it. Each disk sends the granules its bitmap marks: those
    // written during push 1 and before this instant.
    vm.write_on(0, &mut m0, 0x41, 3 * MIB + 100, 10);
    vm.write_on(1, &mut m1, 0x42, 41 * MIB - 1, 2);
    let out = push_holding_the_instant(&pause, &at, push, || {
        at_instant = (m0.clone(), m1.clone());
        vm.write_on(0, &mut m0, 0x51, 60 * MIB, G);
        vm.write_on(1, &mut m1, 0x52, 0, G);
    });
    let (second, instant2) = complete(out);
    alive(&mut vm);
    assert_ne!(instant1, instant2);
    assert_eq!(sent(&second, 0), 2 * G, "{second}");
    assert_eq!(sent(&second, 1), 3 * G, "{second}");
    check_restore_of(&server, d, "vm1-a", &id(&second, 0), &at_instant.0);
    check_restore_of(&server, d, "vm1-b", &id(&second, 1), &at_instant.1);
    let parent_b = id(&second, 1);

    let parent_a = id(&second, 0);

    // 3. disk1's scratch (16 MiB) cannot take 24 MiB of old data: its
    // push fails; disk0's, pushed first and held, is dropped with it.
    let out = push_holding_the_instant(&pause, &at, push, || {
        vm.write_on(0, &mut m0, 0x61, 10 * MIB, G);
        for i in 0..24 {
            vm.write_on(1, &mut m1, 0x62, i * MIB, MIB);
        }
    });
    assert_eq!(out.status.code(), Some(1), "a failed disk fails the group push");
    let third: Value = serde_json::from_slice(&out.stdout).unwrap();
    alive(&mut vm);
    assert_eq!(third["complete"], false, "{third}");
    let error = third["disks"][1]["error"].as_str().unwrap();
    assert!(
        error.contains("node disk1: the fleecing scratch could not take"),
        "{error}"
    );
    assert_eq!(
        third["disks"][0]["error"], "not committed: vm1-b of the group failed",
        "{third}"
    );
    for i in 0..2 {
        assert!(third["disks"][i].get("pushed").is_none(), "{third}");
    }
    assert_eq!(server.revisions("vm1-a").len(), 2, "nothing committed for disk0");
    assert_eq!(server.revisions("vm1-b").len(), 2, "nothing committed for disk1");
    // The held disk's files went with the abort, before its reply.
    let partial = base.join("vm1-a").join(".partial");
    let left: Vec<_> = std::fs::read_dir(&partial)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the dropped disk's files are gone: {left:?}");
    for job in ["vm1-a", "vm1-b"] {
        let status = server.status_json(job);
        assert_eq!(
            status["jobs"][0]["failures"], 1,
            "{job}: the failure is counted: {status}"
        );
    }
    let (_, failed) = guest_writes(d);
    assert!(failed.is_empty(), "no guest write failed: {failed:?}");
    assert_eq!(
        vm.state_of("disk0"),
        (vec![format!("backy-{parent_a}")], vec![]),
        "disk0 keeps its parent's bitmap"
    );
    assert_eq!(
        vm.state_of("disk1"),
        (vec![format!("backy-{parent_b}")], vec![]),
        "disk1 keeps its parent's bitmap, which covers every write since"
    );

    // 4. The next group push: both incremental from their parents (disk0:
    // the granules written during pushes 2 and 3; disk1: the 24 MiB and
    // the granule written during push 2), both right.
    let (fourth, _) = complete(push());
    alive(&mut vm);
    assert_eq!(sent(&fourth, 0), 2 * G, "{fourth}");
    assert_eq!(sent(&fourth, 1), 24 * MIB, "{fourth}");
    assert_eq!(newest("vm1-a")["parent_id"].as_str(), Some(parent_a.as_str()));
    assert_eq!(newest("vm1-b")["parent_id"].as_str(), Some(parent_b.as_str()));
    check_restore_of(&server, d, "vm1-a", &id(&fourth, 0), &m0);
    check_restore_of(&server, d, "vm1-b", &id(&fourth, 1), &m1);
    // `status` names the group instant beside each revision.
    let text = server.client_ok(&["status", "vm1-b"]);
    assert!(
        text.contains(&format!("trusted (group vm1, instant {instant1}, 2 disks)")),
        "{text}"
    );
    vm.quit();
    check_image(d, "disk0.qcow2", &m0);
    check_image(d, "disk1.qcow2", &m1);
}

/// Issue 34: a group's commit is one step even across a crash. The server
/// dies (fault point) after publishing the first disk of a two-disk
/// instant; at its next start it finishes the recorded commit before it
/// cleans leftovers, so both disks are committed under one revision time
/// and restore to the disks at the instant, and no record is left. The
/// client saw the commit fail and dropped its new bitmaps; the next group
/// push notices the missing bitmaps, reads both disks whole, and is right.
#[test]
fn a_crash_inside_a_group_commit_is_finished_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for disk in ["disk0.qcow2", "disk1.qcow2"] {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                d.join(disk).to_str().unwrap(),
                "64M",
            ],
        );
    }
    let mut vm = Vm::start_disks(d, vec![("disk0.qcow2", "qcow2"), ("disk1.qcow2", "qcow2")]);
    let mut m0 = vec![0u8; SIZE as usize];
    let mut m1 = vec![0u8; SIZE as usize];
    vm.write_on(0, &mut m0, 0x13, MIB, 3 * MIB);
    vm.write_on(1, &mut m1, 0x23, 7 * MIB, 2 * MIB);
    let qmp = d.join("backy.qmp");
    let jobs = format!(
        "  vm1-a: {{schedule: none, source: {{type: qemu, qmp: {q}, node: drive0, scratch-dir: {d}}}}}\n  \
         vm1-b: {{schedule: none, source: {{type: qemu, qmp: {q}, node: drive1, scratch-dir: {d}}}}}\n",
        q = qmp.display(),
        d = d.display(),
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let mut server = Server::start(&base, &jobs);
    let mut client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    client_yaml.push_str("groups:\n  vm1:\n    jobs: [vm1-a, vm1-b]\n");
    std::fs::write(&server.client_config, client_yaml).unwrap();

    server.restart_with_env(&[("BACKY_FAULT", "group.published@1")]);
    let out = server.client(&["--json", "push", "vm1"]);
    assert_eq!(out.status.code(), Some(1), "the commit's reply never came");
    assert!(server.wait_exit(), "the server aborted at the fault point");
    let record_dir = base.join(".groups");
    let records = std::fs::read_dir(&record_dir).unwrap().count();
    assert_eq!(
        records, 1,
        "the commit was recorded before the first disk was published"
    );
    let mark = server.log_mark();
    server.restart();
    server.wait_log(mark, "finished a group commit interrupted by a crash");
    let (a, b) = (server.revisions("vm1-a"), server.revisions("vm1-b"));
    assert_eq!((a.len(), b.len()), (1, 1), "both disks committed: {a:?} {b:?}");
    assert_eq!(a[0]["timestamp"], b[0]["timestamp"], "one revision time");
    assert_eq!(a[0]["group"]["instant"], b[0]["group"]["instant"]);
    assert_eq!(
        std::fs::read_dir(&record_dir).unwrap().count(),
        0,
        "the record is gone"
    );
    check_restore_of(&server, d, "vm1-a", a[0]["id"].as_str().unwrap(), &m0);
    check_restore_of(&server, d, "vm1-b", b[0]["id"].as_str().unwrap(), &m1);

    vm.write_on(0, &mut m0, 0x33, 30 * MIB, G);
    let doc = pushed(server.client(&["--json", "push", "vm1"]));
    assert_eq!(doc["complete"], true, "{doc}");
    for (i, (job, model)) in [("vm1-a", &m0), ("vm1-b", &m1)].into_iter().enumerate() {
        let disk = &doc["disks"][i]["pushed"];
        assert!(
            disk["full_read"].as_str().is_some_and(|r| !r.is_empty()),
            "{job}: its bitmap went with the failed commit, so it is read whole: {doc}"
        );
        check_restore_of(&server, d, job, disk["revision"]["id"].as_str().unwrap(), model);
    }
    alive(&mut vm);
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

/// Two qcow2 disks in a `-machine none` QEMU, jobs `vm1-a` (drive0) and
/// `vm1-b` (drive1) with `schedule` (a name, or `none`) for client hv01,
/// group `vm1` of both in client.yaml; with `key`, vm1-b is encrypted
/// with that key file (made here). Returns the server (storing under
/// `d/backy`) and the guest.
fn two_disk_group(d: &Path, schedule: &str, key: Option<&Path>) -> (Server, Vm) {
    for disk in ["disk0.qcow2", "disk1.qcow2"] {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                d.join(disk).to_str().unwrap(),
                "64M",
            ],
        );
    }
    let vm = Vm::start_disks(d, vec![("disk0.qcow2", "qcow2"), ("disk1.qcow2", "qcow2")]);
    let qmp = d.join("backy.qmp");
    let job = |name: &str, node: &str| {
        format!(
            "  {name}: {{schedule: {schedule}, client: hv01, source: {{type: qemu, qmp: {q}, node: {node}, \
             scratch-dir: {d}}}}}\n",
            q = qmp.display(),
            d = d.display()
        )
    };
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\njobs:\n{}{}",
        job("vm1-a", "drive0"),
        job("vm1-b", "drive1")
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start_config(&base, &config);
    let mut client_yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&server.client_config).unwrap()).unwrap();
    if let Some(key) = key {
        server.client_ok(&["keygen", key.to_str().unwrap()]);
        client_yaml["jobs"]["vm1-b"]["encryption"] =
            serde_yaml::from_str(&format!("{{key-file: {}}}", key.display())).unwrap();
    }
    client_yaml["groups"] = serde_yaml::from_str("{vm1: {jobs: [vm1-a, vm1-b]}}").unwrap();
    std::fs::write(
        &server.client_config,
        serde_yaml::to_string(&client_yaml).unwrap(),
    )
    .unwrap();
    (server, vm)
}

/// The files in `dir`, by name.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Issue 34, item 1, on the client: what the hypervisor's client.yaml
/// calls a group is treated as one unit. `status GROUP` lists its
/// instants across the members (complete or not, each member's
/// revision); `check GROUP` warns when the newest is incomplete;
/// `restore GROUP` writes every disk of one instant, each to its own
/// target, byte for byte the disk at the instant, and refuses (writing
/// nothing) an incomplete instant or a target a single restore refuses;
/// `verify GROUP` verifies every member's revision of the instant. A disk
/// that fails mid-way (its target's filesystem full) is named, with the
/// disks restored before it. vm1-b is encrypted: its job's key decrypts it.
#[test]
fn a_group_is_listed_restored_and_verified_as_one_instant() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // vm1-b encrypted: the group restore decrypts it with its job's key.
    let (server, mut vm) = two_disk_group(d, "none", Some(&d.join("vm1-b.key")));
    let (mut m0, mut m1) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
    vm.write_on(0, &mut m0, 0x11, 0, 4 * MIB);
    vm.write_on(1, &mut m1, 0x21, 8 * MIB, 2 * MIB);
    let push = || {
        let doc = pushed(server.client(&["--json", "push", "vm1"]));
        assert_eq!(doc["complete"], true, "{doc}");
        let id = |i: usize| {
            doc["disks"][i]["pushed"]["revision"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        (doc["instant"].as_str().unwrap().to_string(), id(0), id(1))
    };
    let (instant1, a1, b1) = push();
    let at1 = (m0.clone(), m1.clone());
    vm.write_on(0, &mut m0, 0x12, 30 * MIB, G);
    vm.write_on(1, &mut m1, 0x22, 0, 3 * G);
    let (instant2, a2, b2) = push();
    alive(&mut vm);

    // status: both instants, newest first, complete, with both revisions.
    let status: Value = serde_json::from_str(&server.client_ok(&["--json", "status", "vm1"])).unwrap();
    assert_eq!(status["group"], "vm1", "{status}");
    assert_eq!(status["jobs"], json!(["vm1-a", "vm1-b"]), "{status}");
    let instants = status["instants"].as_array().unwrap();
    assert_eq!(instants.len(), 2, "{status}");
    for (i, (instant, a, b)) in [(&instant2, &a2, &b2), (&instant1, &a1, &b1)].iter().enumerate() {
        assert_eq!(instants[i]["instant"], **instant, "{status}");
        assert_eq!(instants[i]["complete"], true, "{status}");
        assert_eq!(
            instants[i]["revisions"],
            json!({"vm1-a": a, "vm1-b": b}),
            "{status}"
        );
        assert_eq!(instants[i]["disks"], json!([2]), "{status}");
    }
    assert_eq!(status["members"][0]["job"], "vm1-a", "{status}");
    assert_eq!(status["members"][1]["newest"], *b2, "{status}");
    let text = server.client_ok(&["status", "vm1"]);
    assert!(text.starts_with("== group vm1 (vm1-a, vm1-b)\n"), "{text}");
    for (instant, a, b) in [(&instant2, &a2, &b2), (&instant1, &a1, &b1)] {
        assert!(
            text.lines().any(|l| l.contains(instant.as_str())
                && l.contains("complete")
                && l.contains(a.as_str())
                && l.contains(b.as_str())),
            "{text}"
        );
    }
    assert!(text.contains("vm1-a: 2 revisions"), "{text}");
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{line}");
    assert!(
        line.contains(&format!("group vm1: newest instant {instant2} complete")),
        "{line}"
    );

    // restore: an older instant into a directory (DIR/JOB), the newest
    // (the default) to named targets; each disk as it was at its instant.
    let to = d.join("restored1");
    std::fs::create_dir(&to).unwrap();
    let out = server.client_ok(&[
        "restore",
        "vm1",
        "-r",
        &instant1[..8],
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!("group vm1: restored instant {instant1} (2 disks)")),
        "{out}"
    );
    assert!(
        std::fs::read(to.join("vm1-a")).unwrap() == at1.0,
        "vm1-a at instant 1"
    );
    assert!(
        std::fs::read(to.join("vm1-b")).unwrap() == at1.1,
        "vm1-b at instant 1"
    );
    let (ta, tb) = (d.join("a.img"), d.join("b.img"));
    let restored: Value = serde_json::from_str(&server.client_ok(&[
        "--json",
        "restore",
        "vm1",
        "--target",
        &format!("vm1-a={}", ta.display()),
        "--target",
        &format!("vm1-b={}", tb.display()),
    ]))
    .unwrap();
    assert_eq!(restored["instant"], *instant2, "{restored}");
    assert_eq!(restored["disks"][1]["revision"]["id"], *b2, "{restored}");
    assert!(std::fs::read(&ta).unwrap() == m0, "vm1-a at instant 2");
    assert!(
        std::fs::read(&tb).unwrap() == m1,
        "vm1-b at instant 2 (decrypted)"
    );
    assert!(
        server.revisions("vm1-b")[1]["key_check"].is_string()
            && server.revisions("vm1-a")[1]["key_check"].is_null(),
        "vm1-b is stored encrypted, vm1-a in the clear"
    );

    // vm1-b's target fills up mid-way (2 MiB of data, 1 MiB of room):
    // the error names it and vm1-a, restored before it; no temporary left.
    let full = Tmpfs::mount(&d.join("full"), "1M");
    let tc = d.join("c.img");
    let out = server.client(&[
        "restore",
        "vm1",
        "-r",
        &instant1,
        "--target",
        &format!("vm1-a={}", tc.display()),
        "--target",
        &format!("vm1-b={}/vm1-b", full.0.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "group vm1: restoring vm1-b (revision {b1}) failed; restored before it: vm1-a to {}",
            tc.display()
        )) && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(std::fs::read(&tc).unwrap() == at1.0, "vm1-a was restored");
    assert!(
        listing(&full.0).is_empty(),
        "no temporary left: {:?}",
        listing(&full.0)
    );
    drop(full);

    // A target a single restore refuses (vm1-b's file exists, no
    // --force): refused before anything is written, vm1-a's new file too.
    let refused = d.join("refused");
    std::fs::create_dir(&refused).unwrap();
    std::fs::write(refused.join("vm1-b"), b"keep me").unwrap();
    let out = server.client(&["restore", "vm1", "--to", refused.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("group vm1: vm1-b (revision")
            && stderr.contains("nothing restored")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        listing(&refused),
        ["vm1-b"],
        "no file for vm1-a, no temporary left"
    );
    assert_eq!(std::fs::read(refused.join("vm1-b")).unwrap(), b"keep me");
    // A member without a target: a usage error naming it.
    let out = server.client(&["restore", "vm1", "--target", &format!("vm1-a={}", ta.display())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no target for vm1-b"));

    // verify: the newest complete instant, then all.
    let out = server.client(&["verify", "vm1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("vm1-a: {a2}: OK")) && text.contains(&format!("vm1-b: {b2}: OK")),
        "{text}"
    );
    assert!(
        text.contains(&format!("group vm1: instant {instant2} OK")),
        "{text}"
    );
    let all: Value =
        serde_json::from_str(&server.client_ok(&["--json", "verify", "vm1", "-r", "all"])).unwrap();
    assert_eq!(all["instants"].as_array().unwrap().len(), 2, "{all}");

    // Incomplete: vm1-b's revision of the newest instant forgotten.
    server.client_ok(&["forget", "vm1-b", "-r", &b2]);
    let status: Value = serde_json::from_str(&server.client_ok(&["--json", "status", "vm1"])).unwrap();
    assert_eq!(status["instants"][0]["instant"], *instant2, "{status}");
    assert_eq!(status["instants"][0]["complete"], false, "{status}");
    assert_eq!(status["instants"][0]["missing"], json!(["vm1-b"]), "{status}");
    assert_eq!(
        status["instants"][0]["revisions"],
        json!({"vm1-a": a2}),
        "{status}"
    );
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with(&format!(
            "BACKY WARNING: group vm1: newest instant {instant2} incomplete (vm1-b has no revision of it)"
        )),
        "{line}"
    );
    let none = d.join("incomplete");
    std::fs::create_dir(&none).unwrap();
    let out = server.client(&["restore", "vm1", "-r", &instant2, "--to", none.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "instant {instant2} is incomplete (vm1-b has no revision of it): nothing restored"
        )),
        "{stderr}"
    );
    assert!(listing(&none).is_empty(), "nothing written");
    let out = server.client(&["verify", "vm1", "-r", &instant2]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "instant {instant2} INCOMPLETE: vm1-b has no revision of it"
        )),
        "{text}"
    );
    // The default is the newest complete instant: instant 1 now.
    let out = server.client_ok(&["restore", "vm1", "--to", none.to_str().unwrap()]);
    assert!(out.contains(&format!("restored instant {instant1}")), "{out}");
    assert!(std::fs::read(none.join("vm1-b")).unwrap() == at1.1);

    // A damaged revision of the instant: verify GROUP exits 1.
    let stored = d.join("backy").join("vm1-a").join(&a1);
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&stored).unwrap(), &mut byte, 7).unwrap();
    write_at(&stored, 7, &[byte[0] ^ 0xff]);
    let out = server.client(&["verify", "vm1", "-r", &instant1]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("vm1-a: {a1}: DAMAGED")), "{text}");
    assert!(
        text.contains(&format!("group vm1: instant {instant1} DAMAGED")),
        "{text}"
    );
    vm.quit();
}

/// Issue 34, item 1, in the agent: an order for a member of a group runs
/// the group's push (every disk at one instant), once when both members
/// are ordered in one round; when only one member is due, the other is
/// taken along, so both revisions carry one instant.
#[test]
fn the_agent_pushes_a_whole_group_for_an_ordered_member() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (server, mut vm) = two_disk_group(d, "s", None);
    let (mut m0, mut m1) = (vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]);
    vm.write_on(0, &mut m0, 0x11, 0, 2 * MIB);
    vm.write_on(1, &mut m1, 0x21, 0, 2 * MIB);
    let group_of = |r: &Value| r["group"]["instant"].as_str().map(str::to_string);
    let mark = server.log_mark();
    let mut agent = server.agent(&["agent", "--name", "hv01", "--workers", "2"]);

    // 1. Both due: both ordered in one round, one group push.
    wait_for("both members' revisions", Duration::from_secs(90), || {
        server.revisions("vm1-a").len() == 1 && server.revisions("vm1-b").len() == 1
    });
    let (a, b) = (server.revisions("vm1-a"), server.revisions("vm1-b"));
    let instant = group_of(&a[0]).expect("vm1-a's revision is of a group push");
    assert_eq!(
        group_of(&b[0]).as_deref(),
        Some(instant.as_str()),
        "one instant: {a:?} {b:?}"
    );
    wait_for("both outcomes", Duration::from_secs(30), || {
        server
            .log_lines(mark)
            .iter()
            .filter(|l| l.contains("agent outcome"))
            .count()
            == 2
    });
    let log = server.log_lines(mark);
    for job in ["vm1-a", "vm1-b"] {
        assert!(
            log.iter()
                .any(|l| l.contains("ordering push") && l.contains(&format!("job={job}"))),
            "{job} ordered: {log:?}"
        );
        assert!(
            log.iter().any(|l| l.contains("agent outcome")
                && l.contains(&format!("job={job}"))
                && l.contains("ok=true")),
            "{job}'s outcome reported ok: {log:?}"
        );
    }
    let agent_log = agent.log();
    assert_eq!(agent_log.matches("pushing its group").count(), 1, "{agent_log}");
    assert_eq!(
        agent_log.matches("joining its group's running push").count(),
        1,
        "{agent_log}"
    );

    // 2. Only vm1-a due (its revision forgotten): vm1-b taken along.
    vm.write_on(0, &mut m0, 0x12, 10 * MIB, G);
    vm.write_on(1, &mut m1, 0x22, 20 * MIB, G);
    let mark = server.log_mark();
    server.client_ok(&["forget", "vm1-a", "-r", "all"]);
    wait_for("the group pushed again", Duration::from_secs(120), || {
        server.revisions("vm1-a").len() == 1 && server.revisions("vm1-b").len() == 2
    });
    let (a, b) = (server.revisions("vm1-a"), server.revisions("vm1-b"));
    let second = group_of(&a[0]).expect("a group push");
    assert_ne!(second, instant);
    assert_eq!(
        group_of(&b[1]).as_deref(),
        Some(second.as_str()),
        "vm1-b taken along at the instant"
    );
    let log = server.log_lines(mark);
    assert!(
        !log.iter()
            .any(|l| l.contains("ordering push") && l.contains("job=vm1-b")),
        "vm1-b was not ordered: {log:?}"
    );
    agent.terminate();
    alive(&mut vm);
    // Both revisions of the second instant are the disks as they were.
    check_restore_of(&server, d, "vm1-a", a[0]["id"].as_str().unwrap(), &m0);
    check_restore_of(&server, d, "vm1-b", b[1]["id"].as_str().unwrap(), &m1);
    vm.quit();
}
