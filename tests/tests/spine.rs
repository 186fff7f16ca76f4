//! The spine end to end: push a sparse image, change scattered ranges, push
//! again, restore both revisions, on btrfs and XFS (reflinks) and on a plain ext4
//! directory (the copy fallback). Real server and client processes.

mod support;

use std::path::Path;
use support::*;

/// The client sends zero pieces of changed blocks as zero ranges, in
/// granules of this size.
const GRANULE: u64 = 64 << 10;

/// What a push must send: of the blocks whose content differs between two
/// images, the granules that differ (the granule exchange) and are not all
/// zero in `new` (those travel as zero ranges).
fn changed_data_bytes(old: Option<&Path>, new: &Path) -> u64 {
    let size = std::fs::metadata(new).unwrap().len();
    let read = |p: &Path, off: u64, len: u64| {
        let f = std::fs::File::open(p).unwrap();
        let flen = f.metadata().unwrap().len();
        let mut buf = vec![0u8; len as usize];
        if off < flen {
            let n = len.min(flen - off) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], off).unwrap();
        }
        buf
    };
    let mut total = 0;
    let mut off = 0;
    while off < size {
        let len = BLOCK.min(size - off);
        let n = read(new, off, len);
        let o = old.map(|o| read(o, off, len));
        if o.as_deref() != Some(&n[..]) {
            let g = GRANULE as usize;
            total += n
                .chunks(g)
                .enumerate()
                .filter(|(i, new)| {
                    let old = o.as_ref().map(|o| &o[i * g..i * g + new.len()]);
                    old != Some(*new) && new.iter().any(|&b| b != 0)
                })
                .map(|(_, new)| new.len() as u64)
                .sum::<u64>();
        }
        off += len;
    }
    total
}

struct Flow {
    rev1_sent: u64,
    rev2_sent: u64,
    expected1: u64,
    expected2: u64,
    data_bytes: u64,
}

/// The shared scenario; `base` is where the server stores, `work` holds
/// the source images and restores.
fn push_change_push_restore(base: &Path, work: &Path, size: u64) -> (Server, Flow) {
    let server = Server::start(base, "  vm1: {schedule: none}\n");
    let src = work.join("vm1.img");
    let gib = 1u64 << 30;
    let extents = [
        (0, 8 * MIB),
        (100 * MIB, 64 * MIB),
        (gib + 123, 10 * MIB),
        (2 * gib, 32 * MIB),
        (size - 100_000, 100_000),
    ];
    make_image(&src, size, &extents);
    let data_bytes: u64 = extents.iter().map(|e| e.1).sum();
    let v1 = work.join("v1.img");
    sparse_copy(&src, &v1);

    let out = server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    assert!(out.contains("committed"), "push output: {out}");

    // Scattered changes: unaligned, across a block boundary, in a former
    // hole, a discard of a whole data block, the last bytes of the image.
    write_at(&src, 4 * MIB + 100, &pattern(1, 4096));
    write_at(&src, 130 * MIB, &pattern(2, MIB as usize));
    write_at(&src, 2 * gib - 1000, &pattern(3, 5000));
    punch(&src, 2 * gib + 8 * MIB, BLOCK);
    write_at(&src, size - 10, &pattern(4, 10));
    let v2 = work.join("v2.img");
    sparse_copy(&src, &v2);

    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2, "two revisions: {revs:?}");
    let flow = Flow {
        rev1_sent: revs[0]["bytes_received"].as_u64().unwrap(),
        rev2_sent: revs[1]["bytes_received"].as_u64().unwrap(),
        expected1: changed_data_bytes(None, &v1),
        expected2: changed_data_bytes(Some(&v1), &v2),
        data_bytes,
    };

    // Restores by several spec forms equal the sources byte for byte, and
    // the server's revision files are themselves the images (`dd` restores).
    let short1 = revs[0]["id"].as_str().unwrap().to_string();
    let short2 = revs[1]["id"].as_str().unwrap().to_string();
    for (spec, want, short) in [
        ("1", &v1, &short1),
        ("latest", &v2, &short2),
        (&short1[..8], &v1, &short1),
    ] {
        let target = work.join(format!("restored-{spec}.img"));
        server.client_ok(&["restore", "vm1", "-r", spec, target.to_str().unwrap()]);
        assert_eq!(file_hash(&target), file_hash(want), "restore -r {spec}");
        assert_eq!(std::fs::metadata(&target).unwrap().len(), size);
        // Holes stay holes: the restore allocates about the data, not the size.
        assert!(
            allocated(&target) < data_bytes + 64 * MIB,
            "restore -r {spec} allocated {} for {} data",
            allocated(&target),
            data_bytes
        );
        let stored = base.join("vm1").join(short);
        assert_eq!(
            file_hash(&stored),
            file_hash(want),
            "stored revision file {short}"
        );
        assert!(
            allocated(&stored) < data_bytes + 64 * MIB,
            "stored revision is sparse"
        );
        std::fs::remove_file(&target).unwrap();
    }
    let latest = std::fs::read_link(base.join("vm1/latest")).unwrap();
    assert_eq!(
        latest,
        Path::new(&short2),
        "latest symlink points at the newest revision"
    );
    (server, flow)
}

fn assert_sent(flow: &Flow) {
    // The first push sends exactly the non-zero granules; the second
    // exactly the non-zero granules of the blocks whose content changed.
    assert_eq!(flow.rev1_sent, flow.expected1, "bytes sent by the full push");
    assert_eq!(
        flow.rev2_sent, flow.expected2,
        "bytes sent by the incremental push"
    );
    assert!(flow.expected2 <= 6 * BLOCK, "changes touch at most 6 blocks");
    assert!(flow.rev1_sent >= flow.data_bytes);
}

/// The spine on a fresh loop-mounted filesystem of `kind`: a 3 GiB image
/// (plus an unaligned tail) with the store and the work files on it.
fn spine_on(kind: &str) -> (LoopFs, Server, Flow) {
    let fs = LoopFs::new(kind, 6 << 30);
    let base = fs.mount.join("backy");
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let size = (3u64 << 30) + MIB + 4096 + 17;
    let (server, flow) = push_change_push_restore(&base, &work, size);
    assert_sent(&flow);
    (fs, server, flow)
}

#[test]
fn btrfs_push_change_push_restore_shares_extents() {
    let (fs, server, flow) = spine_on("btrfs");
    let base = fs.mount.join("backy");

    let revs = server.revisions("vm1");
    let rev1 = base.join("vm1").join(revs[0]["id"].as_str().unwrap());
    let rev2 = base.join("vm1").join(revs[1]["id"].as_str().unwrap());
    let (total1, excl1) = btrfs_du(&rev1);
    let (total2, excl2) = btrfs_du(&rev2);
    eprintln!(
        "rev1: total {total1} exclusive {excl1}; rev2: total {total2} exclusive {excl2}; \
         sent {} / {}",
        flow.rev1_sent, flow.rev2_sent
    );
    // The second revision owns only about what the push wrote; the rest of
    // its extents are shared with the first.
    assert!(
        excl2 <= flow.rev2_sent + MIB,
        "rev2 exclusive {excl2} vs written {}",
        flow.rev2_sent
    );
    assert!(
        total2 - excl2 >= flow.data_bytes - flow.rev2_sent - 8 * MIB,
        "rev2 shares its unchanged extents"
    );
    let status = server.status_json("vm1");
    assert_eq!(status["jobs"][0]["storage"], "reflink");
    assert_eq!(server.revisions("vm1")[1]["storage"], "reflink");
}

#[test]
fn plain_directory_falls_back_to_sparse_copies() {
    // ext4 (the root filesystem here) cannot reflink.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("backy");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let size = (2u64 << 30) + 12345 + 200 * MIB;
    let (server, flow) = push_change_push_restore(&base, &work, size);
    assert_sent(&flow);
    let status = server.status_json("vm1");
    assert_eq!(status["jobs"][0]["storage"], "copy");
    let human = server.client_ok(&["status", "vm1"]);
    assert!(
        human.contains("copy, not CoW"),
        "status says the storage is not CoW:\n{human}"
    );
}

/// Bytes of `path` in extents the filesystem reports as shared (FIEMAP
/// through `filefrag -v`).
fn shared_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "filefrag: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let block: u64 = text
        .split(" blocks of ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("filefrag block size");
    text.lines()
        .filter(|l| l.contains("shared"))
        .filter_map(|l| l.split(':').nth(3)?.trim().parse::<u64>().ok())
        .sum::<u64>()
        * block
}

/// The spine on XFS with `reflink=1`, the other filesystem README
/// recommends: the second revision shares its unchanged extents too.
#[test]
fn xfs_push_change_push_restore_shares_extents() {
    let (fs, server, flow) = spine_on("xfs");
    let base = fs.mount.join("backy");
    let revs = server.revisions("vm1");
    let rev2 = base.join("vm1").join(revs[1]["id"].as_str().unwrap());
    let shared = shared_bytes(&rev2);
    eprintln!(
        "xfs rev2: {shared} bytes in shared extents; data {} sent {}",
        flow.data_bytes, flow.rev2_sent
    );
    assert!(
        shared >= flow.data_bytes - flow.rev2_sent - 8 * MIB,
        "rev2 shares its unchanged extents: {shared} of {}",
        flow.data_bytes
    );
    assert_eq!(server.status_json("vm1")["jobs"][0]["storage"], "reflink");
}
