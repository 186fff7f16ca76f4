//! The load-bearing claims of the Ceph pool store's design (issue 36,
//! docs/DESIGN.md "Ceph pool store"), proven on the real one-node test
//! cluster (scripts/test.sh exports BACKY_TEST_CEPH_CONF) before the store
//! is built on them. Everything runs as a least-privilege cephx identity
//! confined to one RADOS namespace, the way a store's server would.
//!
//! - a stream from `backy_common::rbd_diff::DiffWriter` piped into
//!   `rbd import-diff` gives the image exactly the model's bytes and creates
//!   the end snapshot;
//! - a stream cut before its end record leaves no snapshot, and
//!   `rbd diff --from-snap` names the head ranges the cut push dirtied;
//! - `rados lock` with a duration is exclusive and free once it expired,
//!   and a second process cannot renew it (renewal needs one long-lived
//!   client);
//! - a writer of the image, found by its watch, is fenced by a blocklist
//!   entry the identity may add: the rest of its stream lands nowhere and
//!   makes no snapshot;
//! - through librados (`librados/mod.rs`), one client instance renews its
//!   lock past the first duration; a write conditioned on the epoch xattr
//!   is refused once a taker bumped the epoch; blocklisting the address in
//!   the lock record fences the old holder's instance;
//! - the identity cannot read or write outside its namespace.

mod confined;
mod librados;

use backy_common::rbd_diff::{DiffHeader, DiffWriter};
use confined::{ceph_conf, ok, Confined, Unblock};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The image a sequence of streams must produce.
struct Model(Vec<u8>);

/// What a push sends: writes and zeroed ranges, then the size.
enum Change {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// One stream from the writer, and the model after it.
fn stream(model: &mut Model, from: Option<&str>, to: &str, size: u64, changes: &[Change]) -> Vec<u8> {
    let header = DiffHeader {
        from_snap: from.map(String::from),
        to_snap: Some(to.to_string()),
        size,
    };
    let mut w = DiffWriter::start(Vec::new(), &header).unwrap();
    model.0.resize(size as usize, 0);
    for c in changes {
        match c {
            Change::Data(off, data) => {
                w.data(*off, data).unwrap();
                model.0[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            Change::Zero(off, len) => {
                w.zero(*off, *len).unwrap();
                model.0[*off as usize..(*off + *len) as usize].fill(0);
            }
        }
    }
    w.finish().unwrap()
}

const MIB: u64 = 1 << 20;
const OBJECT: u64 = 4 * MIB;

#[test]
fn import_diff_of_a_written_stream_gives_the_model_and_its_end_snapshot() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "import");
    let image = "job-vm1";
    let size = 3 * OBJECT + 4096;
    ok(
        pool.tool(
            "rbd",
            &["create", "--size", &format!("{size}B"), &pool.spec(image)],
            b"",
        ),
        "rbd create",
    );
    let mut model = Model(Vec::new());

    // The first revision: unaligned writes, one across an object boundary,
    // one at the very end of the image.
    let r1 = stream(
        &mut model,
        None,
        "r1",
        size,
        &[
            Change::Data(0, pattern(1, 100_000)),
            Change::Data(OBJECT - 1000, pattern(2, 5000)),
            Change::Data(size - 3000, pattern(3, 3000)),
        ],
    );
    ok(pool.import_diff(image, &r1), "import-diff r1");
    assert_eq!(pool.snapshots(image), ["r1"]);
    let after_r1 = model.0.clone();
    assert_eq!(pool.export(image, Some("r1")), after_r1, "r1 equals the model");

    // The next one from r1: overwrites, a zeroed range inside written data,
    // and the image grows.
    let grown = size + OBJECT + 512;
    let r2 = stream(
        &mut model,
        Some("r1"),
        "r2",
        grown,
        &[
            Change::Data(50_000, pattern(4, 10_000)),
            Change::Zero(20_000, 8192),
            Change::Data(grown - 512, pattern(5, 512)),
        ],
    );
    ok(pool.import_diff(image, &r2), "import-diff r2");
    assert_eq!(pool.snapshots(image), ["r1", "r2"]);
    assert_eq!(pool.export(image, Some("r2")), model.0, "r2 equals the model");
    assert_eq!(pool.export(image, Some("r1")), after_r1, "r1 is unchanged");

    // The same stream again is refused before it writes: the end snapshot
    // exists. (A store's retried commit is therefore harmless.)
    let again = pool.import_diff(image, &r2);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("end snapshot 'r2' already exists"), "{stderr}");
    // A stream from a snapshot the image lacks is refused.
    let mut scratch = Model(model.0.clone());
    let orphan = stream(
        &mut scratch,
        Some("gone"),
        "r3",
        grown,
        &[Change::Data(0, vec![7; 10])],
    );
    let refused = pool.import_diff(image, &orphan);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("start snapshot 'gone' does not exist"),
        "{stderr}"
    );
    assert_eq!(pool.snapshots(image), ["r1", "r2"]);
    assert_eq!(pool.export(image, None), model.0, "the head is untouched");

    // But the from-snapshot is only checked to exist, not to be the newest:
    // a stream from r1 applies onto a head that is at r2. The store must
    // check that its parent is the image's newest snapshot itself.
    let mut stale = Model(model.0.clone());
    let from_r1 = stream(
        &mut stale,
        Some("r1"),
        "r3",
        grown,
        &[Change::Data(0, vec![7; 10])],
    );
    ok(
        pool.import_diff(image, &from_r1),
        "import-diff from an older snapshot",
    );
    assert_eq!(pool.snapshots(image), ["r1", "r2", "r3"]);
    assert_eq!(
        pool.export(image, Some("r3")),
        stale.0,
        "r2's bytes plus the stream"
    );
}

#[test]
fn a_stream_cut_before_its_end_leaves_no_snapshot() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "cut");
    let image = "job-vm2";
    let size = 2 * OBJECT;
    ok(
        pool.tool(
            "rbd",
            &["create", "--size", &format!("{size}B"), &pool.spec(image)],
            b"",
        ),
        "rbd create",
    );
    let mut model = Model(Vec::new());
    let r1 = stream(&mut model, None, "r1", size, &[Change::Data(0, pattern(1, 8192))]);
    ok(pool.import_diff(image, &r1), "import-diff r1");
    let after_r1 = model.0.clone();

    // A push that dies: the writer is dropped before `finish`, straight
    // into the pipe of a running `rbd import-diff`.
    let dirty_at = OBJECT + 4096;
    let mut child = Command::new("rbd")
        .args(["--conf", conf.to_str().unwrap(), "--id", &pool.id])
        .args(["--keyring", pool.keyring.to_str().unwrap()])
        .args(["import-diff", "--no-progress", "-", &pool.spec(image)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let header = DiffHeader {
            from_snap: Some("r1".into()),
            to_snap: Some("r2".into()),
            size,
        };
        let mut w = DiffWriter::start(child.stdin.take().unwrap(), &header).unwrap();
        w.data(dirty_at, &pattern(9, 4096)).unwrap();
        w.data(dirty_at + 65536, &pattern(8, 1000)).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a cut stream must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed to decode tag"), "{stderr}");
    assert_eq!(pool.snapshots(image), ["r1"], "no r2 snapshot");
    assert_eq!(pool.export(image, Some("r1")), after_r1, "r1 unchanged");

    // The head took the cut push's writes; `rbd diff --from-snap` names
    // (a superset of) them: what the next push must rewrite.
    let head = pool.export(image, None);
    assert_eq!(
        head[dirty_at as usize..dirty_at as usize + 4096],
        pattern(9, 4096)[..]
    );
    let diff = ok(
        pool.tool(
            "rbd",
            &["diff", "--format", "json", "--from-snap", "r1", &pool.spec(image)],
            b"",
        ),
        "rbd diff",
    );
    let extents: Vec<(u64, u64)> = serde_json::from_slice::<serde_json::Value>(&diff)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    for (at, len) in [(dirty_at, 4096), (dirty_at + 65536, 1000)] {
        assert!(
            extents.iter().any(|&(o, l)| o <= at && at + len <= o + l),
            "{at}+{len} not in the head's diff {extents:?}"
        );
    }
    assert!(
        extents.iter().all(|&(o, l)| o >= OBJECT && o + l <= 2 * OBJECT),
        "only the dirtied object: {extents:?}"
    );

    // The next push rewrites those ranges from the source (here: the
    // model's r1 bytes plus its own change) and completes.
    let mut changes: Vec<Change> = extents
        .iter()
        .map(|&(o, l)| Change::Data(o, after_r1[o as usize..(o + l) as usize].to_vec()))
        .collect();
    changes.push(Change::Data(100, pattern(6, 300)));
    let r2 = stream(&mut model, Some("r1"), "r2", size, &changes);
    ok(pool.import_diff(image, &r2), "import-diff r2");
    assert_eq!(pool.snapshots(image), ["r1", "r2"]);
    assert_eq!(pool.export(image, Some("r2")), model.0, "r2 equals the model");
}

/// `rados lock get` as the confined identity: whether it was granted, and
/// what `rados` said when not.
fn lock(pool: &Confined, cookie: &str, seconds: u32) -> Result<(), String> {
    let out = pool.rados(&[
        "lock",
        "get",
        "job-vm3.lease",
        "lease",
        "--lock-cookie",
        cookie,
        "--lock-duration",
        &seconds.to_string(),
    ]);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn lock_holder_cookie(pool: &Confined) -> String {
    let out = ok(
        pool.rados(&["lock", "info", "job-vm3.lease", "lease"]),
        "rados lock info",
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let lockers = v["lockers"].as_array().unwrap();
    assert_eq!(lockers.len(), 1, "one exclusive holder: {v}");
    assert_eq!(v["type"], "exclusive");
    lockers[0]["cookie"].as_str().unwrap().to_string()
}

#[test]
fn rados_lock_with_a_duration_is_exclusive_until_it_expires() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "lease");
    let duration = 3;
    let taken = Instant::now();
    lock(&pool, "server-a", duration).expect("the free lock is granted");
    assert_eq!(lock_holder_cookie(&pool), "server-a");

    // Another locker is refused while it lasts; so is the same cookie from
    // another process (another client instance): renewing needs the one
    // long-lived client that took it.
    let busy = lock(&pool, "server-b", duration).unwrap_err();
    assert!(busy.contains("Device or resource busy"), "{busy}");
    let renew = lock(&pool, "server-a", duration).unwrap_err();
    assert!(renew.contains("Device or resource busy"), "{renew}");

    // B polls with a deadline; it gets the lock only once A's expired.
    let deadline = taken + Duration::from_secs(u64::from(duration) + 20);
    loop {
        match lock(&pool, "server-b", duration) {
            Ok(()) => break,
            Err(e) => {
                assert!(e.contains("Device or resource busy"), "{e}");
                assert!(Instant::now() < deadline, "the lock never expired");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert!(
        taken.elapsed() >= Duration::from_secs(u64::from(duration)) - Duration::from_millis(500),
        "B got the lock after {:?}, before A's {duration} s were over",
        taken.elapsed()
    );
    assert_eq!(lock_holder_cookie(&pool), "server-b");
    let busy = lock(&pool, "server-a", duration).unwrap_err();
    assert!(busy.contains("Device or resource busy"), "{busy}");
}

#[test]
fn the_store_identity_cannot_touch_the_vms_images() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "caps");
    // A VM's image in the pool's default namespace, made by the admin.
    let vm = format!("backy-pool-{}-vm", std::process::id());
    ok(
        pool.admin("rbd", &["create", "--size", "4M", &format!("rbd/{vm}")]),
        "rbd create",
    );
    let denied = [
        pool.tool("rbd", &["ls", "rbd"], b""),
        pool.tool(
            "rbd",
            &["export", "--no-progress", &format!("rbd/{vm}"), "-"],
            b"",
        ),
        pool.tool(
            "rbd",
            &["snap", "create", "--no-progress", &format!("rbd/{vm}@x")],
            b"",
        ),
        pool.tool("rados", &["-p", "rbd", "put", "backy-probe", "/dev/null"], b""),
    ];
    let _ = pool.admin("rbd", &["rm", "--no-progress", &format!("rbd/{vm}")]);
    for (i, out) in denied.iter().enumerate() {
        assert!(!out.status.success(), "command {i} was allowed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Operation not permitted"),
            "command {i}: {stderr}"
        );
    }
    // Inside its namespace: images, snapshots, omap and locks all work.
    ok(
        pool.tool("rbd", &["create", "--size", "4M", &pool.spec("j")], b""),
        "create",
    );
    ok(
        pool.tool(
            "rbd",
            &[
                "snap",
                "create",
                "--no-progress",
                &format!("{}@s", pool.spec("j")),
            ],
            b"",
        ),
        "snap create",
    );
    ok(pool.rados(&["setomapval", "backy.jobs", "j", "1"]), "setomapval");
    ok(
        pool.rados(&["lock", "get", "j.lease", "lease", "--lock-duration", "1"]),
        "lock get",
    );
}

#[test]
fn a_writer_blocklisted_by_its_watch_cannot_finish_its_revision() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "fence");
    let image = "job-vm4";
    let size = 2 * OBJECT;
    ok(
        pool.tool(
            "rbd",
            &["create", "--size", &format!("{size}B"), &pool.spec(image)],
            b"",
        ),
        "rbd create",
    );
    // A stale holder's `rbd import-diff`, mid-stream.
    let mut child = Command::new("rbd")
        .args(["--conf", conf.to_str().unwrap(), "--id", &pool.id])
        .args(["--keyring", pool.keyring.to_str().unwrap()])
        .args(["import-diff", "--no-progress", "-", &pool.spec(image)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let header = DiffHeader {
        from_snap: None,
        to_snap: Some("stale".into()),
        size,
    };
    let mut w = DiffWriter::start(child.stdin.take().unwrap(), &header).unwrap();
    w.data(0, &pattern(1, 4096)).unwrap();

    // The taker finds every writer of the image by its watch and fences it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let address = loop {
        let status = ok(
            pool.tool("rbd", &["status", "--format", "json", &pool.spec(image)], b""),
            "rbd status",
        );
        let v: serde_json::Value = serde_json::from_slice(&status).unwrap();
        if let Some(a) = v["watchers"][0]["address"].as_str() {
            break a.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the writer never opened the image: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _unblock = Unblock(&pool, address.clone());
    ok(
        pool.tool("ceph", &["osd", "blocklist", "add", &address, "120"], b""),
        "ceph osd blocklist add (as the confined identity)",
    );

    // The rest of the stream reaches a fenced client: nothing more lands.
    let late = OBJECT + 8192;
    let rest = w
        .data(late, &pattern(2, 4096))
        .and_then(|()| w.finish().map(drop));
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a fenced writer must fail (stream: {rest:?})"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Cannot send after transport endpoint shutdown"),
        "{stderr}"
    );
    assert!(
        pool.snapshots(image).is_empty(),
        "no snapshot from a fenced writer"
    );
    let head = pool.export(image, None);
    assert!(
        head[late as usize..late as usize + 4096].iter().all(|&b| b == 0),
        "a write after the fence landed"
    );
    // Only the admin lifts a fence.
    let lift = pool.tool("ceph", &["osd", "blocklist", "rm", &address], b"");
    assert!(!lift.status.success(), "the confined identity lifted a fence");
    let stderr = String::from_utf8_lossy(&lift.stderr);
    assert!(stderr.contains("access denied"), "{stderr}");
}

const EBUSY: i32 = -16;
const EEXIST: i32 = -17;
const ESHUTDOWN: i32 = -108;
const ECANCELED: i32 = -125;

/// The omap keys of a job object, as the `rados` tool lists them.
fn omap_keys(pool: &Confined, oid: &str) -> Vec<String> {
    let out = ok(pool.rados(&["listomapkeys", oid]), "rados listomapkeys");
    String::from_utf8_lossy(&out).lines().map(String::from).collect()
}

#[test]
fn librados_renews_in_one_instance_and_the_epoch_fences_a_lost_holder() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "librados");
    let connect = || librados::Cluster::connect(&conf, &pool.id, &pool.keyring).expect("connect");
    let (a, b) = (connect(), connect());
    let (io_a, io_b) = (
        a.ioctx("rbd", &pool.namespace).unwrap(),
        b.ioctx("rbd", &pool.namespace).unwrap(),
    );
    let job = "backy.job.vm5";
    let lease = Duration::from_secs(2);

    // A takes the lease and sets the epoch.
    io_a.lock_exclusive(job, "lease", "a", lease, false)
        .expect("A takes the free lease");
    io_a.write_if(job, "epoch", None, Some("1"), &[]).unwrap();
    assert_eq!(io_a.lock_exclusive(job, "lease", "a", lease, false), Err(EEXIST));

    // The lock record names A's instance: what a taker blocklists.
    let info = ok(pool.rados(&["lock", "info", job, "lease"]), "rados lock info");
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    let recorded = info["lockers"][0]["addr"].as_str().unwrap().to_string();
    let own = a.address().unwrap();
    assert!(own.contains(&recorded), "A is {own}, the record says {recorded}");

    // A renews every half second, past twice the duration: B never gets it.
    let taken = Instant::now();
    while taken.elapsed() < 2 * lease {
        io_a.lock_exclusive(job, "lease", "a", lease, true)
            .expect("A renews");
        assert_eq!(io_b.lock_exclusive(job, "lease", "b", lease, false), Err(EBUSY));
        std::thread::sleep(Duration::from_millis(500));
    }

    // A stops renewing (it stalled); B polls with a deadline and takes it.
    let stalled = Instant::now();
    let deadline = stalled + lease + Duration::from_secs(20);
    loop {
        match io_b.lock_exclusive(job, "lease", "b", lease, false) {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e, EBUSY);
                assert!(Instant::now() < deadline, "A's lease never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(
        stalled.elapsed() >= lease - Duration::from_millis(600),
        "taken early"
    );
    io_b.write_if(job, "epoch", Some("1"), Some("2"), &[])
        .expect("B bumps the epoch");

    // A comes back: its commit with epoch 1 is refused, nothing of it lands.
    assert_eq!(
        io_a.write_if(job, "epoch", Some("1"), None, &[("rev.a", "from A")]),
        Err(ECANCELED)
    );
    io_b.write_if(job, "epoch", Some("2"), None, &[("rev.b", "from B")])
        .expect("B commits");
    assert_eq!(omap_keys(&pool, job), ["rev.b"]);

    // B fences A's instance by the address from the lock record: once the
    // OSDs have the new map, every op of A's fails, and stays failing.
    let _unblock = Unblock(&pool, recorded.clone());
    ok(
        pool.tool("ceph", &["osd", "blocklist", "add", &recorded, "120"], b""),
        "ceph osd blocklist add",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match io_a.write_if(job, "probe", None, Some("A"), &[]) {
            Err(ESHUTDOWN) => break,
            other => {
                assert!(Instant::now() < deadline, "A was never fenced: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(io_a.write_if(job, "probe", None, Some("A"), &[]), Err(ESHUTDOWN));
    io_b.write_if(job, "epoch", Some("2"), None, &[("rev.c", "from B")])
        .expect("B goes on");
    assert_eq!(omap_keys(&pool, job), ["rev.b", "rev.c"]);
}
