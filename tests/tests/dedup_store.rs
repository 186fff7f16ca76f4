//! `backy-server dedup` on stores of existing revisions (issue 31, item
//! 4), on btrfs and XFS: two jobs pushed with identical data store it
//! twice; after the run their images share extents and the store's used
//! bytes dropped by about one image; both restore byte-identical; a second
//! run resumes (walks nothing again) and is quick; runs while a push is
//! going on stay correct; a stale index entry is found out by the kernel's
//! comparison and corrected.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// Blocks of data in each job's image (64 MiB).
const BLOCKS: u64 = 16;
const DATA: u64 = BLOCKS * BLOCK;

/// `backy-server dedup ARGS` against `server`'s config; its stdout.
fn dedup(server: &Server, args: &[&str]) -> String {
    let out = Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&server.config_path)
        .arg("dedup")
        .args(args)
        .output()
        .expect("running backy-server dedup");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "backy-server dedup {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("[dedup {args:?}]\n{stdout}");
    stdout
}

/// The number after `word` in the summary line (`deduplicated N of M`).
fn after(text: &str, word: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with("deduplicated "))
        .unwrap_or_else(|| panic!("no summary in {text:?}"));
    line.split(word)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {line:?}"))
}

/// A file's extents as FIEMAP reports them (filefrag): physical start,
/// length, shared flag.
fn extents(path: &Path) -> Vec<(u64, u64, bool)> {
    let out = Command::new("filefrag")
        .args(["-v", "-b1"])
        .arg(path)
        .output()
        .expect("running filefrag");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()) && l.contains(".."))
        .map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let num = |s: &str| -> u64 {
                s.trim()
                    .trim_end_matches("..")
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{l:?}"))
            };
            let physical = num(f[2].split("..").next().unwrap_or(""));
            (physical, num(f[3]), f[f.len() - 1].contains("shared"))
        })
        .collect()
}

/// Bytes of `a`'s extents that `b`'s extents cover too (same physical
/// bytes).
fn common_bytes(a: &Path, b: &Path) -> u64 {
    let bs = extents(b);
    extents(a)
        .iter()
        .map(|&(p, len, _)| {
            bs.iter()
                .map(|&(q, l, _)| (p + len).min(q + l).saturating_sub(p.max(q)))
                .sum::<u64>()
        })
        .sum()
}

fn used(path: &Path) -> u64 {
    Command::new("sync").arg("-f").arg(path).status().unwrap();
    let st = rustix::fs::statvfs(path).unwrap();
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

/// The image file of each committed revision of `job`.
fn images(server: &Server, job: &str) -> Vec<PathBuf> {
    server
        .short_ids(job)
        .iter()
        .map(|id| server.base.join(job).join(id))
        .collect()
}

fn restores_equal(server: &Server, job: &str, expected: &Path, work: &Path) {
    let out = work.join(format!("restored-{job}.img"));
    let _ = std::fs::remove_file(&out);
    server.client_ok(&["restore", job, out.to_str().unwrap()]);
    assert_eq!(file_hash(&out), file_hash(expected), "{job} restored");
    std::fs::remove_file(&out).unwrap();
}

/// The store of a server from before deduplication: its pushes store
/// equal blocks apart, as `backy-server dedup` finds them.
fn older_server(server: &mut Server) {
    server.restart_with_env(&[("BACKY_FAULT", "mode:no-dedup")]);
}

fn store_is_deduplicated(kind: &str) {
    let fs = LoopFs::new(kind, 4 << 30);
    let base = fs.mount.join("backy");
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("template.img");
    make_image(&src, DATA, &[(0, DATA)]);
    let mut server = Server::start(
        &base,
        "  vm1: {schedule: none}\n  vm2: {schedule: none}\n  vm3: {schedule: none}\n",
    );
    older_server(&mut server);
    for job in ["vm1", "vm2"] {
        server.client_ok(&["push", job, "--source", src.to_str().unwrap()]);
    }
    let (a, b) = (
        images(&server, "vm1")[0].clone(),
        images(&server, "vm2")[0].clone(),
    );
    assert_eq!(common_bytes(&a, &b), 0, "pushes store their data apart");
    let before = used(&fs.mount);

    let out = dedup(&server, &[]);
    assert_eq!(after(&out, "deduplicated"), BLOCKS, "every block of one image");
    assert!(
        out.contains("vm1:") && out.contains("vm2:"),
        "a line per job: {out}"
    );
    assert!(out.contains("store used"), "{out}");
    assert_eq!(common_bytes(&b, &a), DATA, "vm2's image shares vm1's extents");
    assert!(extents(&b).iter().all(|e| e.2), "FIEMAP flags them shared");
    let saved = before.saturating_sub(used(&fs.mount));
    assert!(
        (DATA * 9 / 10..=DATA * 11 / 10).contains(&saved),
        "store use dropped by {saved}, one image is {DATA}"
    );
    restores_equal(&server, "vm1", &src, &work);
    restores_equal(&server, "vm2", &src, &work);

    // Resumed: nothing walked again, and quick.
    let started = Instant::now();
    let again = dedup(&server, &[]);
    assert_eq!(after(&again, "deduplicated"), 0, "{again}");
    assert_eq!(after(&again, "revisions ("), 2, "both skipped: {again}");
    assert_eq!(after(&again, "in "), 3, "every job directory: {again}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // --restart walks again: everything shared already, nothing to do.
    let restarted = dedup(&server, &["--restart", "--rebuild-index"]);
    assert_eq!(after(&restarted, "deduplicated"), 0, "{restarted}");
    assert!(restarted.contains("digest index rebuilt"), "{restarted}");

    // While a push runs (vm3: half the template, half new data, of a
    // larger image), runs keep going; everything restores as pushed.
    let big = work.join("vm3.img");
    // The same seed: its first DATA bytes are the template's.
    make_image(&big, 4 * DATA, &[(0, 4 * DATA)]);
    assert_eq!(
        std::fs::read(&big).unwrap()[..DATA as usize],
        std::fs::read(&src).unwrap()[..]
    );
    let mut push = Command::new(bin("backy-client"))
        .arg("--config")
        .arg(&server.client_config)
        .args([
            "--server",
            &server.url,
            "push",
            "vm3",
            "--source",
            big.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut runs = 0;
    let pushed = loop {
        dedup(&server, &["--restart"]);
        runs += 1;
        if let Some(status) = push.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "push did not finish");
    };
    assert!(pushed.success(), "push during dedup failed");
    eprintln!("{runs} dedup runs during the push");
    // Done by the run that saw its commit, or by this one.
    dedup(&server, &["vm3"]);
    let vm3 = images(&server, "vm3")[0].clone();
    assert!(
        common_bytes(&vm3, &a) >= DATA,
        "vm3 shares the template's extents"
    );
    restores_equal(&server, "vm3", &big, &work);
    restores_equal(&server, "vm1", &src, &work);
    restores_equal(&server, "vm2", &src, &work);

    // A stale hint: the index names vm1's block 0 for vm2's, but vm1's
    // image was changed behind backy's back (a write there is copied on
    // write: vm2 keeps its bytes). The kernel finds the bytes differ,
    // nothing is shared, the entry now names vm2's block.
    write_at(&a, 0, &pattern(99, BLOCK as usize));
    let stale = dedup(&server, &["--restart", "vm2"]);
    assert!(stale.contains("1 differed from the index's hint"), "{stale}");
    assert_eq!(after(&stale, "deduplicated"), 0, "{stale}");
    let fixed = dedup(&server, &["--restart", "vm2"]);
    assert!(!fixed.contains("differed"), "the entry was corrected: {fixed}");
    restores_equal(&server, "vm2", &src, &work);
}

#[test]
fn dedup_shares_equal_blocks_of_stored_jobs_on_btrfs() {
    store_is_deduplicated("btrfs");
}

#[test]
fn dedup_shares_equal_blocks_of_stored_jobs_on_xfs() {
    store_is_deduplicated("xfs");
}

#[test]
fn dedup_refuses_a_store_without_reflinks_and_unknown_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "  vm1: {schedule: none}\n");
    let run = |args: &[&str]| {
        Command::new(bin("backy-server"))
            .arg("--config")
            .arg(&server.config_path)
            .arg("dedup")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["nosuchjob"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job nosuchjob: no directory"), "{err}");
    // The temp dir's filesystem: on one without reflinks (ext4, tmpfs),
    // refused with the reason.
    let kind = rustix::fs::statfs(dir.path()).unwrap().f_type as i64;
    if ![0x9123_683E, 0x5846_5342].contains(&kind) {
        let out = run(&[]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot share extents"), "{err}");
    }
}

/// Run as root on a store the service's user owns, the run acts as that
/// user: every file it makes is one the server (as that user) can open
/// and replace.
#[test]
fn dedup_as_root_makes_files_the_store_owner_can_use() {
    use std::os::unix::fs::MetadataExt;
    let fs = LoopFs::new("btrfs", 1 << 30);
    let base = fs.mount.join("backy");
    let src = fs.mount.join("vm1.img");
    make_image(&src, 2 * BLOCK, &[(0, 2 * BLOCK)]);
    let mut server = Server::start(&base, "  vm1: {schedule: none}\n  vm2: {schedule: none}\n");
    older_server(&mut server);
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    server.client_ok(&["push", "vm2", "--source", src.to_str().unwrap()]);
    let nobody = 65534;
    let chown = Command::new("chown")
        .args(["-R", &format!("{nobody}:{nobody}")])
        .arg(&base)
        .status()
        .unwrap();
    assert!(chown.success());
    let out = dedup(&server, &[]);
    assert_eq!(after(&out, "deduplicated"), 2, "{out}");
    let mut seen = 0;
    let mut dirs = vec![base.join(".dedup")];
    while let Some(dir) = dirs.pop() {
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid()), (nobody, nobody), "{}", dir.display());
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            assert_eq!((m.uid(), m.gid()), (nobody, nobody), "{}", e.path().display());
            if m.is_dir() {
                dirs.push(e.path());
            }
            seen += 1;
        }
    }
    assert!(seen > 64, "the index's shards, lock and records: {seen} files");
}

/// A run killed in a rebuild of the index or between a revision's walk
/// and its record: the next run starts, rebuilds or resumes, and ends with
/// the store deduplicated.
#[test]
fn dedup_killed_midway_resumes() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let base = fs.mount.join("backy");
    let src = fs.mount.join("vm.img");
    make_image(&src, 4 * BLOCK, &[(0, 4 * BLOCK)]);
    let mut server = Server::start(&base, "  vm1: {schedule: none}\n  vm2: {schedule: none}\n");
    older_server(&mut server);
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    server.client_ok(&["push", "vm2", "--source", src.to_str().unwrap()]);
    let killed = |fault: &str, args: &[&str]| {
        let out = Command::new(bin("backy-server"))
            .arg("--config")
            .arg(&server.config_path)
            .arg("dedup")
            .args(args)
            .env("BACKY_FAULT", fault)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{fault}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("BACKY_FAULT: aborting"),
            "{out:?}"
        );
    };
    // In a rebuild (the server made the index complete when it started on
    // the empty store), before its shards replace the index's: the old
    // index holds.
    killed("dedup.rebuild-written", &["--rebuild-index"]);
    // After vm2's revision was deduplicated, before it was recorded.
    killed("dedup.revision-walked@2", &[]);
    let out = dedup(&server, &[]);
    assert!(
        !out.contains("digest index rebuilt"),
        "the second run's rebuild holds: {out}"
    );
    assert!(
        out.contains("1 revision (1 done before)"),
        "vm1 was recorded: {out}"
    );
    assert!(out.contains("vm2: 1 revision walked"), "{out}");
    assert!(out.contains("4 shared already"), "done before the kill: {out}");
    let (a, b) = (
        images(&server, "vm1")[0].clone(),
        images(&server, "vm2")[0].clone(),
    );
    assert_eq!(common_bytes(&b, &a), 4 * BLOCK);
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    restores_equal(&server, "vm2", &src, &work);
}
