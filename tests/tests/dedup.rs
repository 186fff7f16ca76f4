//! Deduplication across jobs (issue 31, items 2 and 3), on real btrfs and
//! XFS loop filesystems: a push of a block another job of the same client
//! stores sends only the block's digest and the server clones the stored
//! copy; another client's push sends its data (it may not learn what
//! others store) but the server shares the extents once written; with
//! `dedup: host` every job's blocks spare sending. A candidate whose bytes
//! changed, or whose revision was deleted, is never used: the data is sent
//! and written. Every revision restores byte-identical, and the space
//! figures are the filesystem's.

mod support;

use backy_common::token::{generate_token, hash_token};
use std::path::{Path, PathBuf};
use support::*;

/// Blocks of data in the template image (the rest of it is a hole).
const DATA_BLOCKS: u64 = 8;
const DATA: u64 = DATA_BLOCKS * BLOCK;

/// A store on `kind` with jobs a1, a2 of hypervisor hv01, b1 of hv02, an
/// admin, and a template image.
struct World {
    server: Server,
    tokens: Vec<(String, PathBuf)>,
    template: PathBuf,
    work: PathBuf,
    _fs: LoopFs,
}

impl World {
    fn new(kind: &str, extra: &str) -> Self {
        let fs = LoopFs::new(kind, 1 << 30);
        let base = fs.mount.join("backy");
        let work = fs.mount.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let mut clients = String::new();
        let mut tokens = Vec::new();
        for (name, role) in [("hv01", "hypervisor"), ("hv02", "hypervisor"), ("admin", "admin")] {
            let token = generate_token();
            clients.push_str(&format!(
                "  {name}: {{role: {role}, token-hash: '{}'}}\n",
                hash_token(&token).unwrap()
            ));
            let file = work.join(format!("{name}.token"));
            std::fs::write(&file, &token).unwrap();
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            tokens.push((name.to_string(), file));
        }
        let server = Server::start_config(
            &base,
            &format!(
                "listen: 127.0.0.1:0\nbase-dir: BASE\n{extra}clients:\n{clients}jobs:\n  \
                 a1: {{schedule: none, client: hv01}}\n  a2: {{schedule: none, client: hv01}}\n  \
                 a3: {{schedule: none, client: hv01}}\n  b1: {{schedule: none, client: hv02}}\n"
            ),
        );
        let template = work.join("template.img");
        make_image(&template, DATA + 4 * BLOCK, &[(0, DATA)]);
        World {
            server,
            tokens,
            template,
            work,
            _fs: fs,
        }
    }

    fn token(&self, who: &str) -> &str {
        let (_, path) = self.tokens.iter().find(|(n, _)| n == who).unwrap();
        path.to_str().unwrap()
    }

    /// `backy-client --json push JOB` of `source` as `who`: its summary.
    fn push(&self, who: &str, job: &str, source: &Path) -> serde_json::Value {
        let out = self.server.client(&[
            "--token-file",
            self.token(who),
            "--json",
            "push",
            job,
            "--source",
            source.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "push {job}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A copy of the template as job `job`'s disk, with `changed` blocks of
    /// its own.
    fn clone_of_template(&self, job: &str, changed: &[u64]) -> PathBuf {
        let path = self.work.join(format!("{job}.img"));
        sparse_copy(&self.template, &path);
        for &b in changed {
            write_at(&path, b * BLOCK, &pattern(1000 + b, BLOCK as usize));
        }
        path
    }

    /// Restores the newest revision of `job` and compares it with `source`.
    fn restores_to(&self, job: &str, source: &Path) {
        let out = self.work.join(format!("restored-{job}.img"));
        let _ = std::fs::remove_file(&out);
        self.server.client_ok(&[
            "--token-file",
            self.token("admin"),
            "restore",
            job,
            out.to_str().unwrap(),
        ]);
        assert_eq!(file_hash(&out), file_hash(source), "job {job} restored");
    }

    /// The newest revision of `job` in `status --json`.
    fn newest(&self, job: &str) -> serde_json::Value {
        let out = self
            .server
            .client(&["--token-file", self.token("admin"), "--json", "status", job]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["jobs"][0]["revisions"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone()
    }

    /// The image file of the newest revision of `job`.
    fn image(&self, job: &str) -> PathBuf {
        let id = self.newest(job)["id"].as_str().unwrap().to_string();
        self.server.base.join(job).join(id)
    }
}

fn sent(pushed: &serde_json::Value) -> u64 {
    pushed["bytes_sent"].as_u64().unwrap()
}

fn deduplicated(pushed: &serde_json::Value) -> u64 {
    pushed["revision"]["bytes_deduplicated"].as_u64().unwrap()
}

/// Bytes of a revision's image that no other file shares, by backy's
/// status (FIEMAP's shared flag).
fn exclusive(rev: &serde_json::Value) -> u64 {
    rev["space"]["exclusive_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no space in {rev}"))
}

/// Jobs of one client share blocks in transfer and on disk; another
/// client's job sends its data, which is then shared on disk all the same.
fn one_client_transfer_and_store_wide_writes(kind: &str) {
    let w = World::new(kind, "");
    // XFS allocates a few filesystem blocks past the data (8 KiB seen).
    let slack = if kind == "xfs" { 64 << 10 } else { 0 };
    let a1 = w.clone_of_template("a1", &[]);
    let first = w.push("hv01", "a1", &a1);
    assert!(sent(&first) >= DATA, "the first copy is sent: {first}");
    assert_eq!(deduplicated(&first), 0, "{first}");

    // The second job of hv01: a clone of the template with one block of
    // its own sends that block and the digests of the others.
    let a2 = w.clone_of_template("a2", &[3]);
    let second = w.push("hv01", "a2", &a2);
    assert!(
        sent(&second) >= BLOCK && sent(&second) < BLOCK + MIB,
        "a2 sends its own block only: {second}"
    );
    assert_eq!(deduplicated(&second), DATA - BLOCK, "{second}");
    w.restores_to("a2", &a2);
    let rev = w.newest("a2");
    assert!(
        exclusive(&rev) <= BLOCK + slack,
        "a2's revision shares the template's blocks: {rev}"
    );

    // hv02 may not learn what hv01 stores: it sends everything, and the
    // server shares the extents after writing them.
    let b1 = w.clone_of_template("b1", &[]);
    let third = w.push("hv02", "b1", &b1);
    assert!(
        sent(&third) >= DATA,
        "another client's push sends its data: {third}"
    );
    assert_eq!(deduplicated(&third), DATA, "written, then shared: {third}");
    w.restores_to("b1", &b1);
    let rev = w.newest("b1");
    assert!(
        exclusive(&rev) <= slack,
        "b1's revision shares every block: {rev}"
    );
    if kind == "btrfs" {
        // backy's figures are the filesystem's.
        let (total, excl) = btrfs_du(&w.image("b1"));
        assert_eq!((total, excl), (DATA, 0), "btrfs du of b1's image");
        assert_eq!(rev["space"]["total_bytes"].as_u64(), Some(DATA), "{rev}");
    }
}

#[test]
fn btrfs_jobs_of_one_client_share_in_transfer_all_share_on_disk() {
    one_client_transfer_and_store_wide_writes("btrfs");
}

#[test]
fn xfs_jobs_of_one_client_share_in_transfer_all_share_on_disk() {
    one_client_transfer_and_store_wide_writes("xfs");
}

#[test]
fn dedup_host_spares_every_client_sending_what_the_host_holds() {
    let w = World::new("btrfs", "dedup: host\n");
    let a1 = w.clone_of_template("a1", &[]);
    w.push("hv01", "a1", &a1);
    let b1 = w.clone_of_template("b1", &[]);
    let pushed = w.push("hv02", "b1", &b1);
    assert!(
        sent(&pushed) < MIB,
        "host-wide: hv02 sends digests only: {pushed}"
    );
    assert_eq!(deduplicated(&pushed), DATA, "{pushed}");
    w.restores_to("b1", &b1);
}

#[test]
fn dedup_off_sends_and_writes_everything() {
    let w = World::new("btrfs", "dedup: off\n");
    let a1 = w.clone_of_template("a1", &[]);
    w.push("hv01", "a1", &a1);
    let a2 = w.clone_of_template("a2", &[]);
    let pushed = w.push("hv01", "a2", &a2);
    assert!(sent(&pushed) >= DATA, "{pushed}");
    assert_eq!(deduplicated(&pushed), 0, "{pushed}");
    w.restores_to("a2", &a2);
    let rev = w.newest("a2");
    assert_eq!(exclusive(&rev), DATA, "nothing shared: {rev}");
}

#[test]
fn a_changed_or_deleted_candidate_is_never_used() {
    let w = World::new("btrfs", "");
    let a1 = w.clone_of_template("a1", &[]);
    w.push("hv01", "a1", &a1);
    // Block 2 of a1's stored image rots (as root, behind backy's back): the
    // index still names it for the template's block 2.
    let stored = w.image("a1");
    write_at(&stored, 2 * BLOCK + 12345, b"rot");
    let a2 = w.clone_of_template("a2", &[]);
    let pushed = w.push("hv01", "a2", &a2);
    assert_eq!(
        deduplicated(&pushed),
        DATA - BLOCK,
        "all but the rotten block are cloned: {pushed}"
    );
    assert!(sent(&pushed) >= BLOCK, "the rotten block is sent: {pushed}");
    w.restores_to("a2", &a2);

    // a1's revision is deleted: the index's entries naming it go, and a
    // push of the template again is complete and correct.
    let id = w.newest("a1")["id"].as_str().unwrap().to_string();
    w.server
        .client_ok(&["--token-file", w.token("admin"), "forget", "a1", "-r", &id]);
    let a3 = w.clone_of_template("a3", &[]);
    w.push("hv01", "a3", &a3);
    w.restores_to("a3", &a3);
    w.server
        .client_ok(&["--token-file", w.token("admin"), "verify", "a3"]);
}

/// A store without an index (an upgrade, or the index removed) gets one
/// rebuilt from its manifests at start, and pushes use it.
#[test]
fn a_missing_index_is_rebuilt_from_the_manifests_at_start() {
    let mut w = World::new("btrfs", "");
    let a1 = w.clone_of_template("a1", &[]);
    w.push("hv01", "a1", &a1);
    w.server.kill();
    std::fs::remove_dir_all(w.server.base.join(".dedup")).unwrap();
    let mark = w.server.log_mark();
    w.server.restart();
    w.server.wait_log(mark, "digest index rebuilt");
    let a2 = w.clone_of_template("a2", &[]);
    let pushed = w.push("hv01", "a2", &a2);
    assert_eq!(deduplicated(&pushed), DATA, "{pushed}");
    assert!(sent(&pushed) < MIB, "{pushed}");
    w.restores_to("a2", &a2);
}
