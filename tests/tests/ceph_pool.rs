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
//! - through the server's binding (`backy_server::ceph`), one client
//!   instance renews its lock past the first duration; a write conditioned
//!   on the epoch xattr is refused once a taker bumped the epoch;
//!   blocklisting the address in the lock record fences the old holder's
//!   instance;
//! - the binding's omap reads page through more entries than one page; a
//!   write op whose comparison fails applies nothing;
//! - two lease keepers on one job: the second is refused while the first
//!   renews, takes after it stops, and the first's commit is then refused
//!   with nothing applied; its blocklisted instance fails every op;
//! - librbd reads a snapshot `rbd import-diff` made byte for byte; a
//!   protected snapshot cannot be removed until unprotected;
//! - the identity cannot read or write outside its namespace.

mod confined;

use backy_common::lease::LeaseTimes;
use backy_common::rbd_diff::{DiffHeader, DiffWriter};
use backy_server::ceph::{
    Cluster, ClusterConfig, Image, IoCtx, LeaseKeeper, LockRequest, WriteOp, XattrCmp, JOB_IMAGE_FEATURES,
};
use confined::{ceph_conf, ok, Confined, Unblock};
use std::path::Path;
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

/// A client instance of the confined identity and its context in the
/// namespace. Calls fail after 30 s instead of hanging.
fn connect(conf: &Path, pool: &Confined) -> (Cluster, IoCtx) {
    let cluster = Cluster::connect(&ClusterConfig {
        conf,
        id: &pool.id,
        keyring: Some(&pool.keyring),
        op_timeout: Some(Duration::from_secs(30)),
    })
    .expect("connect as the confined identity");
    let io = cluster.ioctx("rbd", Some(&pool.namespace)).expect("ioctx");
    (cluster, io)
}

fn lease_lock<'a>(cookie: &'a str, duration: Duration, may_renew: bool) -> LockRequest<'a> {
    LockRequest {
        name: "lease",
        cookie,
        description: "",
        duration: Some(duration),
        may_renew,
    }
}

/// The omap keys of a job object, as the `rados` tool lists them.
fn omap_keys(pool: &Confined, oid: &str) -> Vec<String> {
    let out = ok(pool.rados(&["listomapkeys", oid]), "rados listomapkeys");
    String::from_utf8_lossy(&out).lines().map(String::from).collect()
}

/// A write of the omap entries, with the epoch compared when `expect`.
fn commit(epoch: Option<&str>, entries: &[(&str, &str)]) -> WriteOp {
    let mut op = WriteOp::new();
    if let Some(e) = epoch {
        op = op.cmpxattr("epoch", XattrCmp::Eq, e.as_bytes());
    }
    let entries: Vec<(&str, &[u8])> = entries.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    op.omap_set(&entries)
}

#[test]
fn librados_renews_in_one_instance_and_the_epoch_fences_a_lost_holder() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "librados");
    let ((a, io_a), (b, io_b)) = (connect(&conf, &pool), connect(&conf, &pool));
    let job = "backy.job.vm5";
    let lease = Duration::from_secs(2);

    // A takes the lease and sets the epoch.
    io_a.lock_exclusive(job, &lease_lock("a", lease, false))
        .expect("A takes the free lease");
    io_a.operate(job, &WriteOp::new().setxattr("epoch", b"1"))
        .unwrap();
    let again = io_a
        .lock_exclusive(job, &lease_lock("a", lease, false))
        .unwrap_err();
    assert!(again.is_exists(), "{again}");

    // The lock record names A's instance: what a taker blocklists. The
    // binding reads the same record the tool shows.
    let info = ok(pool.rados(&["lock", "info", job, "lease"]), "rados lock info");
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    let recorded = info["lockers"][0]["addr"].as_str().unwrap().to_string();
    let own = a.instance_addr().unwrap();
    assert!(own.contains(&recorded), "A is {own}, the record says {recorded}");
    let listed = io_b.list_lockers(job, "lease").unwrap();
    assert!(listed.exclusive);
    assert_eq!(listed.lockers.len(), 1, "{listed:?}");
    assert_eq!(listed.lockers[0].cookie, "a");
    assert!(
        listed.lockers[0].address.ends_with(&recorded),
        "{listed:?} vs {recorded}"
    );
    assert_eq!(listed.lockers[0].client, a.client_name());

    // A renews every half second, past twice the duration: B never gets it.
    let taken = Instant::now();
    while taken.elapsed() < 2 * lease {
        io_a.lock_exclusive(job, &lease_lock("a", lease, true))
            .expect("A renews");
        let busy = io_b
            .lock_exclusive(job, &lease_lock("b", lease, false))
            .unwrap_err();
        assert!(busy.is_busy(), "{busy}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // A stops renewing (it stalled); B polls with a deadline and takes it.
    let stalled = Instant::now();
    let deadline = stalled + lease + Duration::from_secs(20);
    loop {
        match io_b.lock_exclusive(job, &lease_lock("b", lease, false)) {
            Ok(()) => break,
            Err(e) => {
                assert!(e.is_busy(), "{e}");
                assert!(Instant::now() < deadline, "A's lease never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(
        stalled.elapsed() >= lease - Duration::from_millis(600),
        "taken early"
    );
    io_b.operate(
        job,
        &WriteOp::new()
            .cmpxattr("epoch", XattrCmp::Eq, b"1")
            .setxattr("epoch", b"2"),
    )
    .expect("B bumps the epoch");

    // A comes back: its commit with epoch 1 is refused, nothing of it lands.
    let refused = io_a
        .operate(job, &commit(Some("1"), &[("rev.a", "from A")]))
        .unwrap_err();
    assert!(refused.is_compare_failed(), "{refused}");
    io_b.operate(job, &commit(Some("2"), &[("rev.b", "from B")]))
        .expect("B commits");
    assert_eq!(omap_keys(&pool, job), ["rev.b"]);

    // B fences A's instance by the address from the lock record (a monitor
    // command through the binding, as the confined identity): once the OSDs
    // have the new map, every op of A's fails, and stays failing.
    let _unblock = Unblock(&pool, recorded.clone());
    b.blocklist_add(&recorded, Some(Duration::from_secs(120)))
        .expect("osd blocklist add");
    let probe = || io_a.operate(job, &WriteOp::new().setxattr("probe", b"A"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe() {
            Err(e) if e.is_blocklisted() => break,
            other => {
                assert!(Instant::now() < deadline, "A was never fenced: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(probe().unwrap_err().is_blocklisted());
    io_b.operate(job, &commit(Some("2"), &[("rev.c", "from B")]))
        .expect("B goes on");
    assert_eq!(omap_keys(&pool, job), ["rev.b", "rev.c"]);
}

#[test]
fn objects_xattrs_and_omap_pages_through_the_binding() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "omap");
    let (_cluster, io) = connect(&conf, &pool);
    let oid = "backy.job.vm6";

    // Missing things are kinds, not text.
    assert!(io.stat(oid).unwrap_err().is_not_found());
    assert!(io.read(oid).unwrap_err().is_not_found());
    assert!(io.getxattr(oid, "epoch").unwrap_err().is_not_found());

    // Data: whole, ranged (short at the end), stat, remove.
    let data = pattern(7, 100_000);
    io.write_full(oid, &data).unwrap();
    assert_eq!(io.read(oid).unwrap(), data);
    assert_eq!(io.read_range(oid, 99_000, 5000).unwrap(), data[99_000..]);
    assert_eq!(io.stat(oid).unwrap().size, data.len() as u64);
    assert!(io.getxattr(oid, "epoch").unwrap_err().is_no_data());

    // 700 entries in three batches of one write op each, plus entries
    // under another prefix; values hold NUL bytes.
    let value = |i: usize| format!("record {i}\0with a NUL").into_bytes();
    let keys: Vec<String> = (0..700).map(|i| format!("rev.{i:04}")).collect();
    for batch in keys.chunks(250) {
        let values: Vec<Vec<u8>> = batch.iter().map(|k| value(k[4..].parse().unwrap())).collect();
        let entries: Vec<(&str, &[u8])> = batch
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(Vec::as_slice))
            .collect();
        io.operate(oid, &WriteOp::new().omap_set(&entries)).unwrap();
    }
    io.operate(
        oid,
        &WriteOp::new().omap_set(&[("deleting", b"x"), ("schedule.daily", b"y")]),
    )
    .unwrap();

    // One page: 64 entries and more to come.
    let first = io.omap_page(oid, "rev.", "", 64).unwrap();
    assert_eq!(first.entries.len(), 64);
    assert!(first.more);
    assert_eq!(first.entries[0], (keys[0].clone(), value(0)));
    let second = io.omap_page(oid, "rev.", &first.entries[63].0, 64).unwrap();
    assert_eq!(second.entries[0].0, keys[64]);

    // All of them, paged: in order, exactly the prefix's.
    let all = io.omap_values(oid, "rev.", 64).unwrap();
    assert_eq!(all.len(), 700);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!((k, v), (&keys[i], &value(i)), "entry {i}");
    }
    assert_eq!(io.omap_values(oid, "", 100).unwrap().len(), 702);
    let last = io.omap_page(oid, "rev.", "rev.0650", 1000).unwrap();
    assert_eq!(last.entries.len(), 49);
    assert!(!last.more);

    // By keys: present ones only.
    let got = io.omap_get(oid, &["rev.0003", "rev.9999", "deleting"]).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got["rev.0003"], value(3));
    assert_eq!(got["deleting"], b"x");

    // Removing keys, then the object.
    io.operate(oid, &WriteOp::new().omap_rm_keys(&["deleting", "rev.0000"]))
        .unwrap();
    assert_eq!(io.omap_values(oid, "", 1000).unwrap().len(), 700);
    io.remove(oid).unwrap();
    assert!(io.remove(oid).unwrap_err().is_not_found());
}

#[test]
fn a_write_op_whose_comparison_fails_applies_nothing() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "writeop");
    let (_cluster, io) = connect(&conf, &pool);
    let oid = "backy.job.vm7";

    // A comparison needs the object; a missing xattr compares as empty:
    // how the first take of a lease (whose lock made the object) finds
    // epoch 0.
    let first = WriteOp::new()
        .cmpxattr("epoch", XattrCmp::Eq, b"")
        .setxattr("epoch", b"1");
    assert!(io.operate(oid, &first).unwrap_err().is_not_found());
    io.operate(oid, &WriteOp::new().create(true)).unwrap();
    io.operate(
        oid,
        &WriteOp::new()
            .cmpxattr("epoch", XattrCmp::Eq, b"")
            .setxattr("epoch", b"3")
            .write_full(b"old")
            .omap_set(&[("k1", b"v1")]),
    )
    .expect("the first write");

    let state = |io: &IoCtx| {
        (
            io.getxattr(oid, "epoch").unwrap(),
            io.read(oid).unwrap(),
            io.omap_values(oid, "", 100).unwrap(),
        )
    };
    let before = state(&io);
    assert_eq!(before.0, b"3");

    let everything = |epoch: &[u8]| {
        WriteOp::new()
            .cmpxattr("epoch", XattrCmp::Eq, epoch)
            .setxattr("epoch", b"4")
            .omap_set(&[("k2", b"v2")])
            .omap_rm_keys(&["k1"])
            .write_full(b"new")
    };
    let refused = io.operate(oid, &everything(b"2")).unwrap_err();
    assert!(refused.is_compare_failed(), "{refused}");
    assert_eq!(refused.errno(), Some(ECANCELED));
    assert_eq!(state(&io), before, "nothing of the refused op applied");

    // An exclusive create of an existing object fails the same way.
    let exists = io
        .operate(oid, &WriteOp::new().setxattr("epoch", b"9").create(true))
        .unwrap_err();
    assert!(exists.is_exists(), "{exists}");
    assert_eq!(state(&io), before);

    io.operate(oid, &everything(b"3")).expect("the matching op");
    assert_eq!(io.getxattr(oid, "epoch").unwrap(), b"4");
    assert_eq!(io.read(oid).unwrap(), b"new");
    assert_eq!(
        io.omap_values(oid, "", 100).unwrap(),
        [("k2".to_string(), b"v2".to_vec())]
    );
}

const ECANCELED: i32 = 125;

#[test]
fn two_lease_keepers_on_one_job_fence_the_one_that_lost() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "keeper");
    let ((a, io_a), (b, io_b)) = (connect(&conf, &pool), connect(&conf, &pool));
    let job = "backy.job.vm8";
    // A 2 s lease, renewed every 0.5 s, writing stops 0.3 s before it ends.
    let times = LeaseTimes::new(2000, 500, 300).unwrap();
    let lease = Duration::from_millis(times.duration);
    let mut ka = LeaseKeeper::new(io_a.clone(), job, "server-a", times);
    let mut kb = LeaseKeeper::new(io_b.clone(), job, "server-b", times);

    assert_eq!(ka.take().expect("A takes the free lease"), 1);
    ka.commit_if_holder(commit(None, &[("rev.1", "from A")]))
        .expect("A commits at epoch 1");
    let holder = kb.holder().unwrap().expect("A holds it");
    assert_eq!(holder.cookie, "server-a");
    assert_eq!(holder.client, a.client_name());
    let a_addr = holder.address.clone();

    // A renews past twice the duration; B is refused all along, told who
    // holds it.
    let taken = Instant::now();
    while taken.elapsed() < 2 * lease {
        ka.renew().expect("A renews");
        let busy = kb.take().unwrap_err();
        assert!(busy.is_busy(), "{busy}");
        assert!(busy.to_string().contains("held by server server-a"), "{busy}");
        std::thread::sleep(Duration::from_millis(times.renew_after));
    }
    assert_eq!(ka.epoch(), Some(1));

    // A stops renewing. B takes only once A's duration has passed.
    let last_renewal = Instant::now();
    ka.renew().unwrap();
    let deadline = last_renewal + lease + Duration::from_secs(20);
    let epoch = loop {
        match kb.take() {
            Ok(epoch) => break epoch,
            Err(e) => {
                assert!(e.is_busy(), "{e}");
                assert!(Instant::now() < deadline, "A's lease never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(
        last_renewal.elapsed() >= lease - Duration::from_millis(600),
        "B took it {:?} after A's last renewal",
        last_renewal.elapsed()
    );
    assert_eq!(epoch, 2);
    assert_eq!(io_b.getxattr(job, "epoch").unwrap(), b"2");

    // A, by its own clock, has stopped writing: refused without a write.
    let late = ka
        .commit_if_holder(commit(None, &[("rev.late", "from A")]))
        .unwrap_err();
    assert!(late.is_expired(), "{late}");
    // A process frozen after its deadline check (its `now` is from before
    // the deadline) reaches the pool: the epoch comparison refuses it,
    // nothing of its op applied.
    let frozen = ka
        .commit_if_holder_at(commit(None, &[("rev.a", "from A")]), last_renewal)
        .unwrap_err();
    assert!(frozen.is_lost(), "{frozen}");
    assert!(
        frozen
            .to_string()
            .contains("lease epoch 1 was lost: the lease is at epoch 2"),
        "{frozen}"
    );
    assert_eq!(ka.epoch(), None, "A knows it lost the lease");
    kb.commit_if_holder(commit(None, &[("rev.2", "from B")]))
        .expect("B commits at epoch 2");
    assert_eq!(omap_keys(&pool, job), ["rev.1", "rev.2"]);

    // B fences A's instance by the address the lock record had: every op
    // of A's fails from then on.
    let _unblock = Unblock(&pool, a_addr.clone());
    b.blocklist_add(&a_addr, Some(Duration::from_secs(120)))
        .expect("osd blocklist add");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match io_a.getxattr(job, "epoch") {
            Err(e) if e.is_blocklisted() => break,
            other => {
                assert!(Instant::now() < deadline, "A was never fenced: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let take = ka.take().unwrap_err();
    assert!(take.ceph().is_some_and(|e| e.is_blocklisted()), "{take}");
    assert!(io_a.read(job).unwrap_err().is_blocklisted());
    assert!(io_a
        .operate(job, &commit(Some("2"), &[("rev.x", "from A")]))
        .unwrap_err()
        .is_blocklisted());
    assert!(io_a.omap_values(job, "", 10).unwrap_err().is_blocklisted());
    // B renews, commits and releases; the lease is then free at once.
    kb.renew().unwrap();
    kb.commit_if_holder(commit(None, &[("rev.3", "from B")])).unwrap();
    kb.release().unwrap();
    assert_eq!(kb.holder().unwrap(), None);
    assert_eq!(omap_keys(&pool, job), ["rev.1", "rev.2", "rev.3"]);
    let mut kc = LeaseKeeper::new(io_b.clone(), job, "server-c", times);
    assert_eq!(kc.take().expect("a released lease is free"), 3);
}

#[test]
fn librbd_reads_the_snapshot_import_diff_wrote_and_protect_blocks_removal() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "librbd");
    let (cluster, io) = connect(&conf, &pool);
    let image = "job-vm9";
    let size = 2 * OBJECT + 8192;
    io.rbd_create(image, size, JOB_IMAGE_FEATURES).unwrap();
    assert!(io
        .rbd_create(image, size, JOB_IMAGE_FEATURES)
        .unwrap_err()
        .is_exists());
    let info = ok(
        pool.tool("rbd", &["info", "--format", "json", &pool.spec(image)], b""),
        "rbd info",
    );
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(
        info["features"],
        serde_json::json!(["layering", "exclusive-lock", "object-map", "fast-diff"])
    );

    let mut model = Model(Vec::new());
    let r1 = stream(
        &mut model,
        None,
        "r1",
        size,
        &[
            Change::Data(4096, pattern(1, 50_000)),
            Change::Data(OBJECT - 700, pattern(2, 9000)),
            Change::Data(size - 100, pattern(3, 100)),
        ],
    );
    ok(pool.import_diff(image, &r1), "import-diff r1");

    // The snapshot through librbd: its size, whole and in ranges.
    let snap = Image::open_read_only(&io, image, Some("r1")).unwrap();
    assert_eq!(snap.size().unwrap(), size);
    assert_eq!(snap.read(0, size as usize).unwrap(), model.0);
    let (at, len) = (OBJECT - 1000, 3000);
    assert_eq!(
        snap.read(at, len).unwrap(),
        model.0[at as usize..at as usize + len]
    );
    assert_eq!(
        snap.read(size - 50, 4096).unwrap(),
        model.0[size as usize - 50..],
        "short at the end"
    );
    // A read-only snapshot handle registers no watch.
    assert_eq!(snap.watchers().unwrap(), []);
    drop(snap);
    assert!(Image::open_read_only(&io, image, Some("nope"))
        .unwrap_err()
        .is_not_found());

    // Snapshots through the head: list, create, protect.
    let head = Image::open(&io, image).unwrap();
    assert_eq!(head.features().unwrap(), JOB_IMAGE_FEATURES);
    // An open head watches the image: what a taker finds and fences.
    let own = cluster.instance_addr().unwrap();
    let watchers = head.watchers().unwrap();
    assert_eq!(watchers.len(), 1, "{watchers:?}");
    assert!(
        own.contains(watchers[0].address.trim_start_matches("v1:")),
        "{own} is not {watchers:?}"
    );
    assert_eq!(format!("client.{}", watchers[0].id), cluster.client_name());
    head.snap_create("r2").unwrap();
    assert!(head.snap_create("r2").unwrap_err().is_exists());
    let names: Vec<(String, u64)> = head
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.size))
        .collect();
    assert_eq!(names, [("r1".to_string(), size), ("r2".to_string(), size)]);
    head.snap_protect("r1").unwrap();
    assert!(head.snap_is_protected("r1").unwrap());
    assert!(!head.snap_is_protected("r2").unwrap());

    // A protected snapshot cannot be removed, by the tool or the binding.
    let rm = pool.tool(
        "rbd",
        &["snap", "rm", "--no-progress", &format!("{}@r1", pool.spec(image))],
        b"",
    );
    assert!(!rm.status.success(), "a protected snapshot was removed");
    let stderr = String::from_utf8_lossy(&rm.stderr);
    assert!(stderr.contains("is protected from removal"), "{stderr}");
    assert!(head.snap_remove("r1").unwrap_err().is_busy());
    head.snap_unprotect("r1").unwrap();
    assert!(!head.snap_is_protected("r1").unwrap());
    ok(
        pool.tool(
            "rbd",
            &["snap", "rm", "--no-progress", &format!("{}@r1", pool.spec(image))],
            b"",
        ),
        "rbd snap rm once unprotected",
    );
    assert_eq!(pool.snapshots(image), ["r2"]);

    // The head grows; an image with snapshots is not removed.
    head.resize(size + OBJECT).unwrap();
    assert_eq!(head.size().unwrap(), size + OBJECT);
    head.snap_remove("r2").unwrap();
    drop(head);
    io.rbd_remove(image).unwrap();
    assert!(Image::open_read_only(&io, image, None)
        .unwrap_err()
        .is_not_found());
}

#[test]
fn a_lock_without_duration_is_freed_by_unlock_or_broken_by_another() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "breaklock");
    let ((a, io_a), (_b, io_b)) = (connect(&conf, &pool), connect(&conf, &pool));
    let job = "backy.job.vm10";
    let held = |cookie| LockRequest {
        name: "lease",
        cookie,
        description: "held until unlocked",
        duration: None,
        may_renew: false,
    };
    assert!(
        io_b.list_lockers(job, "lease").unwrap_err().is_not_found(),
        "no object yet"
    );

    io_a.lock_exclusive(job, &held("a")).unwrap();
    assert!(io_b.lock_exclusive(job, &held("b")).unwrap_err().is_busy());
    // Only the owner (instance and cookie) unlocks.
    assert!(io_b.unlock(job, "lease", "a").unwrap_err().is_not_found());
    assert!(io_a.unlock(job, "lease", "other").unwrap_err().is_not_found());
    io_a.unlock(job, "lease", "a").unwrap();
    assert_eq!(io_b.list_lockers(job, "lease").unwrap().lockers, []);

    // Another instance breaks a held lock by the record's client and
    // cookie, and takes it.
    io_a.lock_exclusive(job, &held("a")).unwrap();
    let locker = io_b.list_lockers(job, "lease").unwrap().lockers.remove(0);
    assert_eq!(
        (locker.client.as_str(), locker.cookie.as_str()),
        (a.client_name().as_str(), "a")
    );
    io_b.break_lock(job, "lease", &locker.client, &locker.cookie)
        .unwrap();
    assert!(io_b
        .break_lock(job, "lease", &locker.client, &locker.cookie)
        .unwrap_err()
        .is_not_found());
    io_b.lock_exclusive(job, &held("b")).unwrap();
    assert_eq!(io_a.list_lockers(job, "lease").unwrap().lockers[0].cookie, "b");
    assert!(
        io_a.unlock(job, "lease", "a").unwrap_err().is_not_found(),
        "A's lock is gone"
    );
}
