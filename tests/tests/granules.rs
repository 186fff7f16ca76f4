//! The granule exchange end to end on btrfs: a scanning push of scattered
//! small writes sends and stores only the 64 KiB granules that changed
//! (asserted on the client's byte count and on `btrfs filesystem du`
//! exclusive bytes), whole-block pushes of older clients and to older
//! servers still store only changed granules, an exchange broken off in
//! the middle resumes, and every revision restores byte for byte.

mod support;

use std::path::PathBuf;
use support::*;

/// The granule: the unit of the exchange and of the server's writes.
const G: u64 = 64 << 10;
/// What a changed 4 MiB block sends before its data: 64 granule digests
/// of 16 bytes, and the block's own 32-byte digest (protocol 5: the server,
/// on btrfs, offers deduplicated transfer).
const DIGESTS: u64 = (BLOCK / G) * 16 + 32;
/// Blocks of the image that hold data.
const DATA_BLOCKS: u64 = 60;

struct World {
    server: Server,
    src: PathBuf,
    work: PathBuf,
    /// The source's hash at each revision, oldest first.
    states: Vec<String>,
    _fs: LoopFs,
}

impl World {
    fn new() -> Self {
        let fs = LoopFs::new("btrfs", 2 << 30);
        let base = fs.mount.join("backy");
        let work = fs.mount.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let src = work.join("vm1.img");
        make_image(&src, 64 * BLOCK, &[(0, DATA_BLOCKS * BLOCK)]);
        let server = Server::start(&base, "  vm1: {schedule: none}\n");
        World {
            server,
            src,
            work,
            states: Vec::new(),
            _fs: fs,
        }
    }

    /// Pushes (with extra client environment and arguments); returns the
    /// client's JSON and records the source's state for [`World::check`].
    fn push(&mut self, env: &[(&str, &str)], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "push", "vm1", "--source", self.src.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.server.client_env(env, &args);
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.states.push(file_hash(&self.src));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Forgets the newest revision (to push the same change another way).
    fn forget_latest(&mut self) {
        self.server.client_ok(&["forget", "vm1", "-r", "latest"]);
        self.states.pop();
    }

    /// (total, exclusive) bytes of the newest revision's image.
    fn latest_du(&self) -> (u64, u64) {
        let revs = self.server.revisions("vm1");
        let id = revs.last().unwrap()["id"].as_str().unwrap();
        btrfs_du(&self.server.base.join("vm1").join(id))
    }

    /// Every revision restores to the source as it was when pushed.
    fn check(&self) {
        let revs = self.server.revisions("vm1");
        assert_eq!(revs.len(), self.states.len());
        let target = self.work.join("restored.img");
        for (rev, want) in revs.iter().zip(&self.states) {
            let id = rev["id"].as_str().unwrap();
            self.server
                .client_ok(&["restore", "vm1", "-r", id, target.to_str().unwrap(), "--force"]);
            assert_eq!(&file_hash(&target), want, "revision {id} restores to its source");
            std::fs::remove_file(&target).unwrap();
        }
        self.server.client_ok(&["verify", "vm1", "-r", "all"]);
    }
}

fn sent(pushed: &serde_json::Value) -> u64 {
    pushed["bytes_sent"].as_u64().unwrap()
}

/// One aligned 4 KiB write into each of `blocks` data blocks, each inside
/// one granule; returns the (offset, length) written.
fn scatter(world: &World, blocks: u64, seed: u64) -> Vec<(u64, u64)> {
    (0..blocks)
        .map(|b| {
            let offset = b * BLOCK + (b * 7 % 64) * G + (b % 15) * 4096;
            write_at(&world.src, offset, &pattern(seed + b, 4096));
            (offset, 4096)
        })
        .collect()
}

#[test]
fn scattered_writes_cost_their_granules_in_space_and_network() {
    must_be_root();
    let mut w = World::new();
    w.push(&[], &[]);
    let writes = scatter(&w, 50, 100);
    let granules = 50 * G;

    // The known-ranges push of the change: the reference for space.
    let list = w.work.join("ranges");
    let text: String = writes.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    std::fs::write(&list, text).unwrap();
    let ranged = w.push(&[], &["--changed-ranges", list.to_str().unwrap()]);
    assert_eq!(sent(&ranged), granules);
    let (_, ranged_excl) = w.latest_du();
    w.forget_latest();

    // An old client's whole-block push to this server: every changed block
    // travels whole, the server still writes only the changed granules.
    let whole = w.push(&[("BACKY_FAULT", "mode:whole-blocks")], &[]);
    assert_eq!(sent(&whole), 50 * BLOCK);
    let (_, whole_excl) = w.latest_du();
    assert!(
        whole_excl <= 2 * ranged_excl,
        "whole-block push added {whole_excl}, ranges {ranged_excl}"
    );
    w.forget_latest();

    // The scan with the exchange: the changed granules and the digests of
    // the changed blocks travel, and the revision adds about as much as
    // the known-ranges push.
    let scanned = w.push(&[], &[]);
    assert_eq!(sent(&scanned), granules + 50 * DIGESTS);
    assert_eq!(scanned["bytes_read"].as_u64(), Some(DATA_BLOCKS * BLOCK));
    let (total, excl) = w.latest_du();
    assert!(
        excl >= granules / 16 && excl <= 2 * ranged_excl && excl <= 2 * granules,
        "scan push added {excl} bytes (total {total}); known ranges {ranged_excl}, granules {granules}"
    );
    w.check();
}

#[test]
fn granules_changed_back_changed_throughout_and_pushed_to_an_old_server() {
    must_be_root();
    let mut w = World::new();
    w.push(&[], &[]);
    let original = std::fs::read(&w.src).unwrap();
    let at = |b: u64, g: u64| b * BLOCK + g * G;
    let granule = |b: u64, g: u64| original[at(b, g) as usize..at(b, g + 1) as usize].to_vec();

    // Block 3: granule 0 changed, granule 5 rewritten with what it held;
    // block 7 changed in every granule.
    write_at(&w.src, at(3, 0) + 100, &pattern(1, 5000));
    write_at(&w.src, at(3, 5), &granule(3, 5));
    write_at(&w.src, at(7, 0), &pattern(2, BLOCK as usize));
    let pushed = w.push(&[], &[]);
    assert_eq!(sent(&pushed), G + BLOCK + 2 * DIGESTS);
    let (_, excl) = w.latest_du();
    assert!((BLOCK..=2 * (G + BLOCK)).contains(&excl), "added {excl}");

    // Granule 0 of block 3 back to the first revision's bytes: the block
    // differs from the parent's but is the first revision's again, which
    // the server holds (protocol 5): it clones it from there after checking
    // its digest, and only the block's digests travel.
    write_at(&w.src, at(3, 0), &granule(3, 0));
    let pushed = w.push(&[], &[]);
    assert_eq!(sent(&pushed), DIGESTS);
    assert_eq!(pushed["revision"]["bytes_deduplicated"].as_u64(), Some(BLOCK));
    let (_, excl) = w.latest_du();
    assert!(excl <= 2 * G, "added {excl}");

    // A server of protocol 1: the client pushes whole blocks, which the
    // server stores granule by granule.
    w.server.restart_with_env(&[("BACKY_FAULT", "mode:protocol-1")]);
    write_at(&w.src, at(10, 9) + 4096, &pattern(3, 4096));
    let pushed = w.push(&[], &[]);
    assert_eq!(sent(&pushed), BLOCK);
    let (_, excl) = w.latest_du();
    assert!(excl <= 2 * G, "added {excl}");
    w.check();
}

#[test]
fn an_exchange_broken_off_midway_resumes() {
    must_be_root();
    let mut w = World::new();
    w.push(&[], &[]);
    scatter(&w, 50, 200);
    // Frames go digests of eight blocks ahead, then one block's granule
    // and the next block's digests by turns: the 60th frame is the data
    // of about the 26th block, sent once the server had answered (so
    // written) those before. The client dies there.
    let args = ["--json", "push", "vm1", "--source", w.src.to_str().unwrap()];
    let out = w.server.client_env(&[("BACKY_FAULT", "client.frame@60")], &args);
    assert!(!out.status.success());
    wait_for(
        "the broken push to fail on the server",
        std::time::Duration::from_secs(30),
        || {
            let job = &w.server.status_json("vm1")["jobs"][0];
            job["running"] == false && job["failures"].as_u64() > Some(0)
        },
    );
    let pushed = w.push(&[], &[]);
    let resumed = pushed["resumed_at"].as_u64().expect("resumed");
    assert!(resumed >= 8 * BLOCK, "resumed at {resumed}");
    let left = 50 - resumed / BLOCK;
    assert_eq!(
        sent(&pushed),
        left * (G + DIGESTS),
        "only the blocks past the checkpoint"
    );
    let (_, excl) = w.latest_du();
    assert!(excl <= 2 * 50 * G, "added {excl}");
    w.check();
}
