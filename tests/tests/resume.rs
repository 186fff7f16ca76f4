//! Resumable pushes on a real btrfs loop filesystem: a push that breaks
//! off (the client killed, so its connection drops; or the server killed
//! after a durable checkpoint) resumes from the checkpoint and sends only
//! the remainder; the result restores byte for byte and verifies.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use support::*;

struct World {
    server: Server,
    src: PathBuf,
    work: PathBuf,
    _fs: LoopFs,
}

impl World {
    fn new(config_extra: &str) -> Self {
        let fs = LoopFs::new("btrfs", 2 << 30);
        let base = fs.mount.join("backy");
        let work = fs.mount.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let src = work.join("vm1.img");
        make_image(&src, 256 * MIB, &[(0, 200 * MIB)]);
        let config =
            format!("listen: 127.0.0.1:0\nbase-dir: BASE\njobs:\n  vm1: {{schedule: none}}\n{config_extra}");
        let server = Server::start_config(&base, &config);
        World {
            server,
            src,
            work,
            _fs: fs,
        }
    }

    fn partial(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.server.base.join("vm1/.partial"))
            .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    fn push(&self, env: &[(&str, &str)]) -> std::process::Output {
        self.server.client_env(
            env,
            &["--json", "push", "vm1", "--source", self.src.to_str().unwrap()],
        )
    }

    /// Pushes without faults; returns the client's JSON result.
    fn push_ok(&self) -> serde_json::Value {
        let out = self.push(&[]);
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The newest revision restores to the source and verifies; nothing is
    /// left in `.partial/`.
    fn check_latest(&self) {
        let target = self.work.join("restored.img");
        self.server.client_ok(&[
            "restore",
            "vm1",
            "-r",
            "latest",
            target.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(
            file_hash(&target),
            file_hash(&self.src),
            "restored equals the source"
        );
        std::fs::remove_file(&target).unwrap();
        self.server.client_ok(&["verify", "vm1", "-r", "all"]);
        assert_eq!(self.partial(), Vec::<String>::new(), "nothing left in .partial");
    }
}

/// Waits until the server has recorded the broken push as failed.
fn settled(w: &World) {
    wait_for(
        "the broken push to fail on the server",
        std::time::Duration::from_secs(30),
        || {
            let job = &w.server.status_json("vm1")["jobs"][0];
            job["running"] == false && job["failures"].as_u64() > Some(0)
        },
    );
}

fn kept_for_resuming(w: &World) -> String {
    let partial = w.partial();
    assert_eq!(partial.len(), 3, "image, digests and record kept: {partial:?}");
    let id = partial[0].clone();
    assert_eq!(
        partial,
        vec![id.clone(), format!("{id}.resume"), format!("{id}.resume.digests")]
    );
    id
}

fn sent(pushed: &serde_json::Value) -> u64 {
    pushed["bytes_sent"].as_u64().unwrap()
}

/// What a push of `data` bytes of whole new blocks sends on a store that
/// offers deduplication (btrfs): each block after its 32-byte digest.
fn with_digests(data: u64) -> u64 {
    data + data.div_ceil(BLOCK) * 32
}

#[test]
fn a_dropped_connection_resumes_and_sends_only_the_remainder() {
    let w = World::new("");
    // The client dies after 120 data frames (1 MiB each) of 200: its
    // connection drops, and the server keeps what arrived.
    let out = w.push(&[("BACKY_FAULT", "client.frame@120")]);
    assert_eq!(
        out.status.signal(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    settled(&w);
    assert!(w.server.revisions("vm1").is_empty(), "nothing committed");
    let id = kept_for_resuming(&w);

    let pushed = w.push_ok();
    let at = pushed["resumed_at"].as_u64().expect("the push was resumed");
    assert_eq!(pushed["revision"]["id"].as_str().unwrap(), id);
    // Frames in flight when the client died (its 16-frame queue and the
    // 32 MiB HTTP/2 window) may or may not have arrived.
    assert!((64 * MIB..=120 * MIB).contains(&at), "resumed at {at}");
    assert_eq!(
        sent(&pushed),
        with_digests(200 * MIB - at),
        "only the remainder is sent"
    );
    w.check_latest();

    // A change after a resumed push is an ordinary incremental push.
    write_at(&w.src, 77 * MIB + 5, &pattern(9, 3 * MIB as usize));
    let pushed = w.push_ok();
    assert!(pushed["resumed_at"].is_null());
    assert!(sent(&pushed) <= 8 * MIB, "incremental sent {}", sent(&pushed));
    w.check_latest();
}

#[test]
fn a_server_crash_resumes_from_the_last_durable_checkpoint() {
    // Checkpoints every 32 MiB received.
    let mut w = World::new("resume: {checkpoint: 32M}\n");
    w.push_ok();
    // 96 MiB changed on top of the parent, from 40 MiB on.
    let parent_bytes = std::fs::read(&w.src).unwrap();
    write_at(&w.src, 40 * MIB, &pattern(3, 96 * MIB as usize));
    // The server dies at its 80th frame: checkpoints were taken after 32
    // and 64 MiB received (at 72 and 104 MiB in the image); the frames
    // after the second one reached the partial image but not its record.
    w.server.restart_with_env(&[("BACKY_FAULT", "push.frame@80")]);
    let out = w.push(&[]);
    assert!(!out.status.success());
    assert!(w.server.wait_exit(), "the server aborted at the fault point");
    w.server.restart();
    let id = kept_for_resuming(&w);
    // Meanwhile the source changed back to the parent between 108 and 116
    // MiB: those blocks are not sent again, so the resumed push must not
    // keep what the crashed session wrote there.
    write_at(
        &w.src,
        108 * MIB,
        &parent_bytes[(108 * MIB) as usize..(116 * MIB) as usize],
    );

    let pushed = w.push_ok();
    assert_eq!(pushed["revision"]["id"].as_str().unwrap(), id);
    assert_eq!(pushed["resumed_at"].as_u64(), Some(104 * MIB));
    // 104..108 and 116..136 MiB, each of those six blocks after its
    // granule digests (64 of 16 bytes) and its own (32 bytes).
    assert_eq!(
        sent(&pushed),
        24 * MIB + 6 * (1024 + 32),
        "only the remainder is sent"
    );
    w.check_latest();
    let revs = w.server.revisions("vm1");
    assert_eq!(revs.len(), 2);
}

#[test]
fn a_fresh_push_discards_what_cannot_be_resumed() {
    // Three ways: resuming off, the source changed size, the window passed.
    // Resuming switched off: a broken push leaves nothing behind.
    let w = World::new("resume: {enabled: false}\n");
    let out = w.push(&[("BACKY_FAULT", "client.frame@50")]);
    assert_eq!(out.status.signal(), Some(6));
    settled(&w);
    assert_eq!(w.partial(), Vec::<String>::new());
    let pushed = w.push_ok();
    assert!(pushed["resumed_at"].is_null());
    assert_eq!(sent(&pushed), with_digests(200 * MIB));
    w.check_latest();

    // Resuming on, but the source changed size meanwhile: the client
    // starts afresh and the server drops the interrupted push.
    let w = World::new("");
    let out = w.push(&[("BACKY_FAULT", "client.frame@50")]);
    assert_eq!(out.status.signal(), Some(6));
    settled(&w);
    kept_for_resuming(&w);
    let f = std::fs::OpenOptions::new().write(true).open(&w.src).unwrap();
    f.set_len(260 * MIB).unwrap();
    let pushed = w.push_ok();
    assert!(pushed["resumed_at"].is_null());
    assert_eq!(sent(&pushed), with_digests(200 * MIB));
    w.check_latest();

    // Resuming on, but the window passed: the interrupted push is
    // discarded and the next one starts afresh under a new id.
    let w = World::new("resume: {window: 1s}\n");
    let out = w.push(&[("BACKY_FAULT", "client.frame@50")]);
    assert_eq!(out.status.signal(), Some(6));
    settled(&w);
    let stale = kept_for_resuming(&w);
    // The behaviour under test is the passing of time itself.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pushed = w.push_ok();
    assert!(pushed["resumed_at"].is_null(), "not resumed after the window");
    assert_ne!(pushed["revision"]["id"].as_str().unwrap(), stale);
    assert_eq!(sent(&pushed), with_digests(200 * MIB));
    w.check_latest();
}
