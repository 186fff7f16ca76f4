//! A push leaves the hypervisor's page cache as it found it: blocks of the
//! source that were cached before (a VM's working set) stay cached, blocks
//! the push itself read in are dropped once read. Real server and client
//! processes, a source file on the machine's own filesystem, residency from
//! the kernel (`cachestat`).

mod support;

use backy_client::source::page_cache::cached_bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use support::*;

fn drop_cached(file: &File) {
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

fn read(file: &File, offset: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).unwrap();
}

#[test]
fn a_push_keeps_what_was_cached_and_drops_what_it_read_in() {
    // Not in /tmp, which may be a tmpfs (whose pages are never dropped).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = dir.path().join("disk.img");
    let size = 8 * BLOCK;
    make_image(&img, size, &[(0, size)]);
    let file = File::open(&img).unwrap();
    file.sync_all().unwrap();
    if cached_bytes(&file, 0, size).is_none() {
        eprintln!("skipped: this kernel has no cachestat (every block read is dropped)");
        return;
    }
    drop_cached(&file);
    assert_eq!(
        cached_bytes(&file, 0, size),
        Some(0),
        "the filesystem keeps no pages cached"
    );
    // The "VM" uses blocks 2 and 3 (read without readahead, which would
    // cache the next block too).
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random).unwrap();
    read(&file, 2 * BLOCK, 2 * BLOCK);
    assert_eq!(cached_bytes(&file, 2 * BLOCK, 2 * BLOCK), Some(2 * BLOCK));

    let server = Server::start(&dir.path().join("backy"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap(), "--force"]);

    assert_eq!(
        cached_bytes(&file, 2 * BLOCK, 2 * BLOCK),
        Some(2 * BLOCK),
        "the blocks cached before the push are still cached"
    );
    for block in [0, 1, 4, 5, 6, 7] {
        assert_eq!(
            cached_bytes(&file, block * BLOCK, BLOCK),
            Some(0),
            "block {block}, read in by the push, is dropped"
        );
    }
    // And what was stored is the image.
    let rev = server.revisions("vm1")[0]["id"].as_str().unwrap().to_string();
    let stored = dir.path().join("backy").join("vm1").join(rev);
    assert_eq!(file_hash(&stored), file_hash(&img));
}
