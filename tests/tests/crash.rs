//! Crash safety: the server and, separately, the client are killed (abort,
//! as `kill -9`) at named points of a push — while cloning, mid-stream,
//! during commit, during expiry — on a real btrfs loop filesystem. After
//! each: only complete revisions are listed, every one verifies and equals
//! the source state it was taken from, `.partial/` holds at most a push
//! kept for resuming, the next push works (resuming it) and leaves
//! `.partial/` empty.

mod support;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;
use support::*;

const CONFIG: &str = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: s}
";

const SERVER_POINTS: &[&str] = &[
    "push.locked",
    "push.cloned",
    "push.frame@1",
    "push.frame@2",
    "push.frame@3",
    "push.frame@4",
    "push.frame@5",
    "push.frame@7",
    "push.frame@9",
    // Answering the granule exchange (before the answer goes out).
    "push.granules@1",
    "push.granules@3",
    "commit.digested",
    "commit.synced",
    "commit.digests-written",
    "commit.image-moved",
    "commit.digests-moved",
    "commit.rev-written",
    "push.committed",
    "expiry.retagged",
    // The deletion journaled, no file removed yet: the deletion completes
    // at the restart.
    "delete.journaled",
    "delete.rev-removed",
    "delete.image-removed",
    "expiry.deleted",
];

const CLIENT_POINTS: &[&str] = &[
    "client.planned",
    "client.manifest",
    "client.frame@1",
    "client.frame@2",
    "client.frame@3",
    "client.frame@4",
    "client.frame@5",
    "client.frame@6",
    "client.frame@7",
    "client.frame@8",
    "client.frame@10",
    "client.frame@12",
    "client.frame@13",
    "client.frame@16",
    "client.frame@20",
    "client.frame@25",
    "client.frame@30",
    "client.frame@35",
    "client.frame@40",
    "client.before-end",
    "client.replied",
];

struct World {
    server: Server,
    src: std::path::PathBuf,
    work: std::path::PathBuf,
    /// Hashes of every source state a push was attempted from.
    states: BTreeSet<String>,
    step: u64,
}

impl World {
    fn new(fs: &LoopFs) -> Self {
        let base = fs.mount.join("backy");
        let work = fs.mount.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let src = work.join("vm1.img");
        make_image(&src, 96 * MIB + 4096, &[(0, 20 * MIB), (60 * MIB, 30 * MIB)]);
        let server = Server::start_config(&base, CONFIG);
        let mut w = World {
            server,
            src,
            work,
            states: BTreeSet::new(),
            step: 0,
        };
        for _ in 0..2 {
            w.change(MIB);
            w.push_ok();
        }
        w
    }

    fn base(&self) -> &Path {
        &self.server.base
    }

    /// Writes `len` new bytes somewhere and records the new state.
    fn change(&mut self, len: u64) {
        self.step += 1;
        let offset = (self.step * 7 * MIB + self.step * 4099) % (90 * MIB);
        write_at(&self.src, offset, &pattern(self.step, len as usize));
        self.states.insert(file_hash(&self.src));
    }

    fn push_ok(&self) {
        self.server
            .client_ok(&["push", "vm1", "--force", "--source", self.src.to_str().unwrap()]);
    }

    /// Makes the next expiry retag the newest revision and delete the
    /// oldest, so expiry crash points are reached.
    fn prepare_expiry(&self) {
        let unscheduled = "--allow-unscheduled";
        self.server
            .client_ok(&["tags", "vm1", "-r", "latest", "add", "obsolete", unscheduled]);
        let n = self.server.revisions("vm1").len();
        self.server.client_ok(&[
            "tags",
            "vm1",
            "-r",
            &(n - 1).to_string(),
            "set",
            "obsolete",
            unscheduled,
        ]);
    }

    fn newest(&self) -> Option<String> {
        self.server
            .revisions("vm1")
            .last()
            .map(|r| r["id"].as_str().unwrap().to_string())
    }

    fn assert_partial_empty(&self, point: &str) {
        let left = std::fs::read_dir(self.base().join("vm1/.partial"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "after a good push following {point}, .partial is empty");
    }

    /// Everything listed is complete, verifies, restores to a pushed source
    /// state; nothing else is on disk.
    fn check(&self, what: &str) {
        let job = self.base().join("vm1");
        wait_for(
            &format!("{what}: the server done with the push"),
            Duration::from_secs(20),
            || self.server.status_json("vm1")["jobs"][0]["running"] == false,
        );
        // `.partial/` holds nothing, or one interrupted push kept for
        // resuming: its image, digests and record.
        let mut partial: Vec<String> = std::fs::read_dir(job.join(".partial"))
            .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        partial.sort();
        if let Some(id) = partial.first().cloned() {
            assert_eq!(
                partial,
                vec![id.clone(), format!("{id}.resume"), format!("{id}.resume.digests")],
                "{what}: only a resumable push is left in .partial"
            );
        }
        let revs = self.server.revisions("vm1");
        assert!(!revs.is_empty(), "{what}: committed revisions are never lost");
        let mut want = BTreeSet::new();
        for r in &revs {
            let id = r["id"].as_str().unwrap().to_string();
            let stored = job.join(&id);
            assert!(
                self.states.contains(&file_hash(&stored)),
                "{what}: revision {id} equals a pushed source state"
            );
            want.insert(format!("{id}.digests"));
            want.insert(format!("{id}.rev"));
            want.insert(id);
        }
        let have: BTreeSet<String> = std::fs::read_dir(&job)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.') && n != "latest")
            .collect();
        assert_eq!(have, want, "{what}: no files of invisible revisions");
        let out = self.server.client(&["verify", "vm1", "-r", "all"]);
        assert!(
            out.status.success(),
            "{what}: verify all: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let target = self.work.join("restored.img");
        self.server.client_ok(&[
            "restore",
            "vm1",
            "-r",
            "latest",
            target.to_str().unwrap(),
            "--force",
        ]);
        let newest = job.join(revs.last().unwrap()["id"].as_str().unwrap());
        assert_eq!(
            file_hash(&target),
            file_hash(&newest),
            "{what}: restore equals the stored revision"
        );
        std::fs::remove_file(&target).unwrap();
    }
}

#[test]
fn server_killed_at_every_point_loses_nothing() {
    let fs = LoopFs::new("btrfs", 3 << 30);
    let mut w = World::new(&fs);
    for point in SERVER_POINTS {
        // Enough changed blocks that the push has 10+ frames.
        w.change(24 * MIB);
        w.server.restart_with_env(&[("BACKY_FAULT", point)]);
        // Work for the expiry after the push's commit (the faulty server's
        // expiry at start is over: it listens), so the expiry points are
        // reached there; a restart before the commit does it at start.
        w.prepare_expiry();
        let out = w
            .server
            .client(&["push", "vm1", "--force", "--source", w.src.to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "{point}: the push cannot succeed when the server dies"
        );
        assert!(
            w.server.wait_exit(),
            "{point}: the server must have aborted at the fault point"
        );
        w.server.restart();
        w.check(&format!("server killed at {point}"));
        w.push_ok();
        w.check(&format!("push after server killed at {point}"));
        w.assert_partial_empty(point);
    }
    eprintln!("server kill points survived: {}", SERVER_POINTS.len());
}

#[test]
fn client_killed_at_every_point_loses_nothing() {
    let fs = LoopFs::new("btrfs", 3 << 30);
    let mut w = World::new(&fs);
    for point in CLIENT_POINTS {
        // Enough changed blocks that the push has 40+ frames.
        w.change(48 * MIB);
        let newest_before = w.newest();
        let out = w.server.client_env(
            &[("BACKY_FAULT", point)],
            &["push", "vm1", "--force", "--source", w.src.to_str().unwrap()],
        );
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{point}: the client must have aborted there: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Once the push reached the server, wait until the server is done
        // with it: failed (the stream broke) or committed.
        if !matches!(*point, "client.planned" | "client.manifest") {
            wait_for(
                &format!("{point}: the server ends the push"),
                Duration::from_secs(30),
                || {
                    w.server.status_json("vm1")["jobs"][0]["failures"].as_u64() > Some(0)
                        || w.newest() != newest_before
                },
            );
        }
        w.check(&format!("client killed at {point}"));
        w.push_ok();
        w.check(&format!("push after client killed at {point}"));
        w.assert_partial_empty(point);
    }
    eprintln!("client kill points survived: {}", CLIENT_POINTS.len());
}
