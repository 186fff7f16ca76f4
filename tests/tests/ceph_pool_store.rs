//! The pool store's backend (`backy_server::pool`, issue 36, docs/DESIGN.md
//! "Ceph pool store") on the real one-node test cluster
//! (BACKY_TEST_CEPH_CONF), as a cephx identity confined to one RADOS
//! namespace:
//!
//! - a full and an incremental push from a model image: `rbd export` of each
//!   snapshot and the store's reads equal the model at that revision, the
//!   manifests equal the model's, and a second store (a fresh client
//!   instance) lists the job and both revisions with identical records;
//! - a push dropped mid-way, one whose stream checksum is wrong and one
//!   whose manifest digest is wrong leave no snapshot and no record; the head's stray writes are reported (step 2),
//!   a push that does not send them again is refused for foreign writes,
//!   one that does gives the right revision; a parent that is not the
//!   newest snapshot is refused; a full push onto the image is only what it
//!   sent; the image grows and shrinks with the source;
//! - a commit after another server took the lease is refused with nothing
//!   recorded, and the new holder's `clean_orphans` removes its snapshot
//!   and manifest;
//! - deletion removes snapshot, manifest and record, refuses a protected
//!   snapshot, and an interrupted deletion is finished by the next call;
//! - a manifest in several objects reads back; an altered or missing piece
//!   is data loss.

mod confined;

use backy_common::checksum::StreamChecksum;
use backy_common::lease::LeaseTimes;
use backy_common::manifest::{digest, Manifest};
use backy_common::revision::{RevisionMeta, SourceInfo};
use backy_common::{JobName, RevisionId, MAX_FRAME_DATA};
use backy_server::ceph::{LeaseKeeper, LEASE_LOCK};
use backy_server::pool::{names, part_count, PoolConfig, PoolError, PoolPush, PoolStore};
use backy_server::storage::{NewRevisionSpec, PushEnd};
use confined::{ceph_conf, ok, Confined};
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const BS: u32 = 4 << 20;

fn open(conf: &Path, pool: &Confined) -> PoolStore {
    PoolStore::open(PoolConfig {
        conf: conf.to_path_buf(),
        id: pool.id.clone(),
        keyring: Some(pool.keyring.clone()),
        pool: "rbd".into(),
        namespace: Some(pool.namespace.clone()),
        op_timeout: Some(Duration::from_secs(30)),
    })
    .expect("open the pool store as the confined identity")
}

fn times() -> LeaseTimes {
    LeaseTimes::new(60_000, 20_000, 5_000).unwrap()
}

fn taken(store: &PoolStore, job: &JobName, server: &str) -> LeaseKeeper {
    let mut k = store.keeper(job, server, times());
    k.take().expect("take the free lease");
    k
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn manifest_of(image: &[u8], bs: u32) -> Manifest {
    let mut m = Manifest::zeroed(image.len() as u64, bs).unwrap();
    for (b, chunk) in image.chunks(bs as usize).enumerate() {
        m.set(b as u64, digest(chunk)).unwrap();
    }
    m
}

/// What a push sends, in ascending order.
enum Change {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn spec(id: RevisionId, size: u64, bs: u32) -> NewRevisionSpec {
    NewRevisionSpec {
        id,
        size,
        block_size: bs,
        tags: ["daily".to_string()].into(),
        source: SourceInfo {
            kind: "file".into(),
            ..Default::default()
        },
        key_check: None,
    }
}

/// Applies `changes` to `model` (resized to `size`) and sends them through
/// `push` in frames as a client does; returns the stream checksum.
fn send(push: &mut PoolPush, model: &mut Vec<u8>, size: u64, changes: &[Change]) -> StreamChecksum {
    model.resize(size as usize, 0);
    let mut sum = StreamChecksum::new();
    for c in changes {
        match c {
            Change::Data(off, data) => {
                for (i, frame) in data.chunks(MAX_FRAME_DATA).enumerate() {
                    let at = off + (i * MAX_FRAME_DATA) as u64;
                    push.data(at, frame).unwrap();
                    sum.data(at, frame);
                }
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            Change::Zero(off, len) => {
                push.zero(*off, *len).unwrap();
                sum.zero(*off, *len);
                model[*off as usize..(*off + *len) as usize].fill(0);
            }
        }
    }
    sum
}

fn end(sum: &StreamChecksum, model: &[u8], bs: u32) -> PushEnd {
    PushEnd {
        stream_checksum: sum.finish().to_vec(),
        manifest_digest: manifest_of(model, bs).file_digest().to_vec(),
        audit: None,
    }
}

/// One whole push: begin, send, seal and publish.
#[allow(clippy::too_many_arguments)]
fn push(
    store: &PoolStore,
    keeper: &mut LeaseKeeper,
    job: &JobName,
    parent: Option<&RevisionMeta>,
    model: &mut Vec<u8>,
    size: u64,
    bs: u32,
    changes: &[Change],
) -> RevisionMeta {
    let parent = parent.map(|p| (p, store.manifest(job, p).unwrap()));
    let mut p = PoolPush::begin(
        store,
        keeper,
        job,
        spec(RevisionId::new_random(), size, bs),
        parent,
    )
    .unwrap();
    let sum = send(&mut p, model, size, changes);
    p.finish(&end(&sum, model, bs), keeper).unwrap()
}

/// The whole revision through the store's reads, in pieces that cross
/// object boundaries.
fn read_all(store: &PoolStore, job: &JobName, id: &RevisionId, size: u64) -> Vec<u8> {
    let reader = store.open_revision(job, id).unwrap();
    assert_eq!(reader.size().unwrap(), size);
    let mut out = vec![0u8; size as usize];
    let step = 3 * MIB as usize + 4097;
    for (i, chunk) in out.chunks_mut(step).enumerate() {
        let got = reader.read_at((i * step) as u64, chunk).unwrap();
        assert_eq!(got, chunk.len());
    }
    let mut tail = [0u8; 10];
    assert_eq!(
        reader.read_at(size - 4, &mut tail).unwrap(),
        4,
        "short at the end"
    );
    out
}

fn objects(pool: &Confined) -> Vec<String> {
    let out = ok(pool.rados(&["ls"]), "rados ls");
    let mut v: Vec<String> = String::from_utf8_lossy(&out).lines().map(String::from).collect();
    v.sort();
    v
}

fn digests_objects(pool: &Confined, job: &JobName, id: &RevisionId) -> Vec<String> {
    let prefix = format!("backy.job.{job}@{}.digests.", id.short());
    objects(pool)
        .into_iter()
        .filter(|o| o.starts_with(&prefix))
        .collect()
}

fn snaps(pool: &Confined, job: &JobName) -> Vec<String> {
    pool.snapshots(job.as_str())
}

#[test]
fn a_full_and_an_incremental_push_equal_the_model_and_a_fresh_store_sees_them() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "store");
    let store = open(&conf, &pool);
    let job = JobName::new("vm1").unwrap();
    store.add_job(&job).unwrap();
    let mut keeper = taken(&store, &job, "server-a");

    // Full: unaligned writes, one across an object boundary, one at the end.
    let size = 3 * BS as u64 + 12_345;
    let mut model = Vec::new();
    let r1 = push(
        &store,
        &mut keeper,
        &job,
        None,
        &mut model,
        size,
        BS,
        &[
            Change::Data(0, pattern(1, 100_000)),
            Change::Data(BS as u64 - 1000, pattern(2, 5000)),
            Change::Data(size - 3000, pattern(3, 3000)),
        ],
    );
    let model1 = model.clone();
    assert_eq!(r1.parent, None);
    assert_eq!(r1.stats.bytes_received, 108_000);
    assert_eq!(snaps(&pool, &job), [r1.id.short()]);
    assert_eq!(
        pool.export(job.as_str(), Some(&r1.id.short())),
        model1,
        "rbd export of r1"
    );
    assert_eq!(read_all(&store, &job, &r1.id, size), model1, "read() of r1");
    assert_eq!(store.manifest(&job, &r1).unwrap(), manifest_of(&model1, BS));

    // Incremental, growing: a part of block 0 (completed from r1), a zeroed
    // range, block 2 whole, a new tail.
    let grown = 4 * BS as u64 + 512;
    let r2 = push(
        &store,
        &mut keeper,
        &job,
        Some(&r1),
        &mut model,
        grown,
        BS,
        &[
            Change::Data(50_000, pattern(4, 10_000)),
            Change::Zero(200_000, 8192),
            Change::Data(2 * BS as u64, pattern(5, BS as usize)),
            Change::Data(grown - 512, pattern(6, 512)),
        ],
    );
    assert_eq!(r2.parent, Some(r1.id));
    assert_eq!(snaps(&pool, &job), [r1.id.short(), r2.id.short()]);
    assert_eq!(
        pool.export(job.as_str(), Some(&r2.id.short())),
        model,
        "rbd export of r2"
    );
    assert_eq!(
        pool.export(job.as_str(), Some(&r1.id.short())),
        model1,
        "r1 unchanged"
    );
    assert_eq!(read_all(&store, &job, &r2.id, grown), model, "read() of r2");
    assert_eq!(store.manifest(&job, &r2).unwrap(), manifest_of(&model, BS));
    // Blocks 0, 2, 3 (the old last block, now longer) and 4 (new) changed.
    assert_eq!(r2.stats.changed_blocks, 4);

    // Shrinking: the new last block is r2's, cut (completed from r2).
    let model2 = model.clone();
    let shrunk = 2 * BS as u64 + 100;
    let r3 = push(
        &store,
        &mut keeper,
        &job,
        Some(&r2),
        &mut model,
        shrunk,
        BS,
        &[Change::Data(7, pattern(7, 7))],
    );
    assert_eq!(
        pool.export(job.as_str(), Some(&r3.id.short())),
        model,
        "rbd export of r3"
    );
    assert_eq!(store.manifest(&job, &r3).unwrap(), manifest_of(&model, BS));
    assert_eq!(
        pool.export(job.as_str(), Some(&r2.id.short())),
        model2,
        "r2 unchanged"
    );
    store.delete(&mut keeper, &job, &[r3.id]).unwrap();

    // A fresh client instance sees the job and the same records.
    let other = open(&conf, &pool);
    let jobs = other.jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].0, job);
    assert!(jobs[0].1.is_some(), "the job's first-seen time");
    assert_eq!(other.revisions(&job).unwrap(), [r1.clone(), r2.clone()]);
    assert_eq!(other.meta(&job, &r2.id).unwrap(), r2);
    let mut piece = vec![0u8; 1000];
    assert_eq!(
        other.read(&job, &r2.id, BS as u64 - 500, &mut piece).unwrap(),
        1000
    );
    assert_eq!(piece, model2[BS as usize - 500..BS as usize + 500]);
    assert_eq!(other.manifest(&job, &r2).unwrap(), manifest_of(&model2, BS));
    // The record is the `.rev` YAML, byte for byte.
    let raw = other
        .io()
        .omap_get(&names::job_object(&job), &[&names::record_key(&r2.id)])
        .unwrap();
    assert_eq!(
        raw[&names::record_key(&r2.id)],
        r2.to_yaml().unwrap().into_bytes()
    );
    // Adding the job again keeps its first-seen time.
    assert_eq!(Some(other.add_job(&job).unwrap()), jobs[0].1);

    // Records are rewritten under the lease (a tag change).
    let mut tagged = r1.clone();
    tagged.tags.insert("keep".into());
    store.write_records(&mut keeper, &job, &[tagged.clone()]).unwrap();
    assert_eq!(other.revisions(&job).unwrap(), [tagged, r2]);
}

#[test]
fn pushes_that_die_leave_nothing_and_the_next_push_rewrites_their_head_writes() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "store-cut");
    let store = open(&conf, &pool);
    let job = JobName::new("vm2").unwrap();
    store.add_job(&job).unwrap();
    let mut keeper = taken(&store, &job, "server-a");
    let size = 2 * BS as u64;
    let mut model = Vec::new();
    let r1 = push(
        &store,
        &mut keeper,
        &job,
        None,
        &mut model,
        size,
        BS,
        &[Change::Data(0, pattern(1, 3 * MIB as usize))],
    );
    let model1 = model.clone();
    let manifest1 = store.manifest(&job, &r1).unwrap();
    let only_r1 = |store: &PoolStore| {
        assert_eq!(snaps(&pool, &job), [r1.id.short()], "no snapshot but r1");
        assert_eq!(
            store.revisions(&job).unwrap(),
            std::slice::from_ref(&r1),
            "no record but r1"
        );
    };

    // Dropped mid-way: its writes reach the head, its end record never comes.
    let dirty = BS as u64 + 4096;
    let mut p = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, manifest1.clone())),
    )
    .unwrap();
    p.data(dirty, &pattern(9, 4096)).unwrap();
    p.data(dirty + 65_536, &pattern(8, 1000)).unwrap();
    drop(p);
    only_r1(&store);

    // A wrong stream checksum: refused before the end record.
    let mut p = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, manifest1.clone())),
    )
    .unwrap();
    let mut scratch = model1.clone();
    let sum = send(&mut p, &mut scratch, size, &[Change::Data(10, pattern(7, 100))]);
    let mut bad = end(&sum, &scratch, BS);
    bad.stream_checksum[0] ^= 1;
    let err = p.seal(&bad).unwrap_err();
    assert!(matches!(err, PoolError::StreamChecksum), "{err}");
    let model_err: backy_common::Error = err.into();
    assert_eq!(model_err.kind, backy_common::ErrorKind::DataLoss);
    assert_eq!(model_err.reason, backy_common::Reason::StreamChecksumMismatch);
    only_r1(&store);

    // A manifest digest that is not the data's: refused the same way.
    let mut p = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, manifest1.clone())),
    )
    .unwrap();
    let mut scratch = model1.clone();
    let sum = send(&mut p, &mut scratch, size, &[Change::Data(10, pattern(7, 100))]);
    let mut bad = end(&sum, &scratch, BS);
    bad.manifest_digest[0] ^= 1;
    let err = p.finish(&bad, &mut keeper).unwrap_err();
    assert!(matches!(err, PoolError::ManifestMismatch), "{err}");
    only_r1(&store);

    // Step 2: the head holds the dropped push's writes beyond r1 (and the
    // checksum-failed push's).
    let strays = store.head_changes(&job, &r1.id).unwrap();
    for (at, len) in [(dirty, 4096), (dirty + 65_536, 1000), (10, 100)] {
        assert!(
            strays
                .iter()
                .any(|e| e.offset <= at && at + len <= e.offset + e.len),
            "{at}+{len} not among the head's changes {strays:?}"
        );
    }

    // A push that does not send them again: its snapshot would hold them,
    // so it is refused and removed.
    let mut p = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, manifest1.clone())),
    )
    .unwrap();
    let mut scratch = model1.clone();
    let sum = send(
        &mut p,
        &mut scratch,
        size,
        &[Change::Data(5 * MIB, pattern(5, 100))],
    );
    let err = p.finish(&end(&sum, &scratch, BS), &mut keeper).unwrap_err();
    assert!(matches!(err, PoolError::ForeignWrites { .. }), "{err}");
    assert!(err.is_data_loss());
    only_r1(&store);

    // The next push sends the head's changed ranges from its source too
    // (here the model: r1's bytes) with its own change: right revision.
    let mut source = model1.clone();
    source[dirty as usize + 100..dirty as usize + 200].copy_from_slice(&pattern(3, 100));
    let mut ranges: Vec<(u64, u64)> = store
        .head_changes(&job, &r1.id)
        .unwrap()
        .iter()
        .map(|e| (e.offset, e.offset + e.len))
        .collect();
    ranges.push((dirty + 100, dirty + 200));
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let changes: Vec<Change> = merged
        .iter()
        .map(|&(a, b)| Change::Data(a, source[a as usize..b as usize].to_vec()))
        .collect();
    let r2 = push(
        &store,
        &mut keeper,
        &job,
        Some(&r1),
        &mut model,
        size,
        BS,
        &changes,
    );
    assert_eq!(model, source);
    assert_eq!(
        pool.export(job.as_str(), Some(&r2.id.short())),
        source,
        "r2 equals the source"
    );
    assert_eq!(store.manifest(&job, &r2).unwrap(), manifest_of(&source, BS));
    assert!(
        store.head_changes(&job, &r2.id).unwrap().is_empty(),
        "nothing stray past r2"
    );

    // Step 1: a parent that is not the newest snapshot is refused.
    let err = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, manifest1)),
    )
    .err()
    .expect("r1 is not the newest");
    assert!(
        err.to_string().contains("is not the image's newest snapshot"),
        "{err}"
    );

    // A full push onto the image: what it does not send reads zeros.
    let mut full = Vec::new();
    let r3 = push(
        &store,
        &mut keeper,
        &job,
        None,
        &mut full,
        size,
        BS,
        &[Change::Data(BS as u64 + 10, pattern(4, 100))],
    );
    assert_eq!(r3.parent, None);
    assert_eq!(
        pool.export(job.as_str(), Some(&r3.id.short())),
        full,
        "r3 is only what it sent"
    );
    assert_eq!(store.manifest(&job, &r3).unwrap(), manifest_of(&full, BS));
    assert_eq!(
        pool.export(job.as_str(), Some(&r2.id.short())),
        source,
        "r2 unchanged"
    );
}

#[test]
fn a_commit_after_the_lease_moved_records_nothing_and_the_new_holder_removes_the_orphan() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "store-fence");
    let (a, b) = (open(&conf, &pool), open(&conf, &pool));
    let job = JobName::new("vm3").unwrap();
    a.add_job(&job).unwrap();
    let mut ka = taken(&a, &job, "server-a");
    assert_eq!(ka.epoch(), Some(1));
    let size = BS as u64;
    let mut model = Vec::new();
    let r1 = push(
        &a,
        &mut ka,
        &job,
        None,
        &mut model,
        size,
        BS,
        &[Change::Data(0, pattern(1, 5000))],
    );

    // A's next push is sealed (snapshot and manifest in the pool)...
    let mut p = PoolPush::begin(
        &a,
        &ka,
        &job,
        spec(RevisionId::new_random(), size, BS),
        Some((&r1, a.manifest(&job, &r1).unwrap())),
    )
    .unwrap();
    let sum = send(&mut p, &mut model, size, &[Change::Data(MIB, pattern(2, 5000))]);
    let sealed = p.seal(&end(&sum, &model, BS)).unwrap();
    let r2 = sealed.meta().id;
    assert_eq!(snaps(&pool, &job), [r1.id.short(), r2.short()]);
    assert_eq!(digests_objects(&pool, &job, &r2).len(), 1);

    // ...when B takes the job over (breaking A's lock: a take-over).
    let oid = names::job_object(&job);
    let holder = ka.holder().unwrap().expect("A holds the lease");
    b.io()
        .break_lock(&oid, LEASE_LOCK, &holder.client, &holder.cookie)
        .unwrap();
    let mut kb = b.keeper(&job, "server-b", times());
    assert_eq!(kb.take().unwrap(), 2);

    // A's commit is refused by the epoch, nothing recorded.
    let err = sealed.publish(&mut ka).unwrap_err();
    match &err {
        PoolError::Lease(e) => assert!(e.is_lost(), "{e}"),
        other => panic!("not a lease refusal: {other}"),
    }
    assert!(err.to_string().contains("lease epoch 1 was lost"), "{err}");
    assert_eq!(b.revisions(&job).unwrap(), std::slice::from_ref(&r1));
    // A no longer holds the job: it cannot clean up either.
    assert!(matches!(
        a.clean_orphans(&mut ka, &job, &[]),
        Err(PoolError::Lease(_))
    ));

    // B removes the orphaned snapshot and its manifest.
    assert_eq!(b.clean_orphans(&mut kb, &job, &[]).unwrap(), [r2]);
    assert_eq!(snaps(&pool, &job), [r1.id.short()]);
    assert!(digests_objects(&pool, &job, &r2).is_empty());
    assert_eq!(
        digests_objects(&pool, &job, &r1.id).len(),
        1,
        "r1's manifest stays"
    );
    assert!(b.clean_orphans(&mut kb, &job, &[]).unwrap().is_empty());
    assert_eq!(b.revisions(&job).unwrap(), [r1]);
}

#[test]
fn deletion_removes_snapshot_manifest_and_record_and_refuses_a_protected_snapshot() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "store-delete");
    let store = open(&conf, &pool);
    let job = JobName::new("vm4").unwrap();
    store.add_job(&job).unwrap();
    let mut keeper = taken(&store, &job, "server-a");
    let size = BS as u64 + 100;
    let mut model = Vec::new();
    let r1 = push(
        &store,
        &mut keeper,
        &job,
        None,
        &mut model,
        size,
        BS,
        &[Change::Data(0, pattern(1, 100))],
    );
    let r2 = push(
        &store,
        &mut keeper,
        &job,
        Some(&r1),
        &mut model,
        size,
        BS,
        &[Change::Data(200, pattern(2, 100))],
    );
    let r3 = push(
        &store,
        &mut keeper,
        &job,
        Some(&r2),
        &mut model,
        size,
        BS,
        &[Change::Data(400, pattern(3, 100))],
    );
    let r2_model = pool.export(job.as_str(), Some(&r2.id.short()));
    let spec_of = |id: &RevisionId| format!("{}@{}", pool.spec(job.as_str()), id.short());

    // A protected snapshot (the retention lock) refuses, nothing changes.
    ok(
        pool.tool("rbd", &["snap", "protect", &spec_of(&r2.id)], b""),
        "rbd snap protect",
    );
    let err = store.delete(&mut keeper, &job, &[r1.id, r2.id]).unwrap_err();
    assert!(
        matches!(err, PoolError::Protected { id, .. } if id == r2.id),
        "{err}"
    );
    assert_eq!(store.revisions(&job).unwrap().len(), 3);
    assert!(store.deleting(&job).unwrap().is_empty());
    assert_eq!(snaps(&pool, &job).len(), 3);

    // Deleting r1: its snapshot, manifest and record go; r2 still reads.
    store.delete(&mut keeper, &job, &[r1.id]).unwrap();
    assert_eq!(store.revisions(&job).unwrap(), [r2.clone(), r3.clone()]);
    assert_eq!(snaps(&pool, &job), [r2.id.short(), r3.id.short()]);
    assert!(digests_objects(&pool, &job, &r1.id).is_empty());
    let keys = ok(
        pool.rados(&["listomapkeys", &names::job_object(&job)]),
        "listomapkeys",
    );
    let keys = String::from_utf8_lossy(&keys);
    assert!(!keys.contains(&r1.id.short()), "{keys}");
    assert!(!keys.contains("deleting"), "{keys}");
    assert_eq!(pool.export(job.as_str(), Some(&r2.id.short())), r2_model);

    // Interrupted after its journal: r3 is no longer listed, its snapshot
    // is still there; the next call (another instance) finishes it.
    store.journal_deletions(&mut keeper, &job, &[r3.id]).unwrap();
    assert_eq!(store.revisions(&job).unwrap(), std::slice::from_ref(&r2));
    assert_eq!(snaps(&pool, &job).len(), 2);
    assert!(
        store.clean_orphans(&mut keeper, &job, &[]).unwrap().is_empty(),
        "a journaled deletion is no orphan"
    );
    let other = open(&conf, &pool);
    keeper.release().unwrap();
    let mut k2 = taken(&other, &job, "server-b");
    other.finish_deletions(&mut k2, &job).unwrap();
    assert_eq!(snaps(&pool, &job), [r2.id.short()]);
    assert!(digests_objects(&pool, &job, &r3.id).is_empty());
    assert!(other.deleting(&job).unwrap().is_empty());
    assert_eq!(other.revisions(&job).unwrap(), std::slice::from_ref(&r2));

    // Unprotected, r2 goes too; an unknown id is refused.
    ok(
        pool.tool("rbd", &["snap", "unprotect", &spec_of(&r2.id)], b""),
        "rbd snap unprotect",
    );
    let unknown = RevisionId::new_random();
    assert!(matches!(
        other.delete(&mut k2, &job, &[unknown]),
        Err(PoolError::NoRevision { .. })
    ));
    other.delete(&mut k2, &job, &[r2.id]).unwrap();
    assert!(other.revisions(&job).unwrap().is_empty());
    assert!(snaps(&pool, &job).is_empty());
}

#[test]
fn a_manifest_in_several_objects_reads_back_and_an_altered_piece_is_data_loss() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "store-digests");
    let store = open(&conf, &pool);
    let job = JobName::new("vm5").unwrap();
    store.add_job(&job).unwrap();
    let mut keeper = taken(&store, &job, "server-a");
    // 10 GiB in blocks of 64 KiB: 163,840 digests, two objects. Thin: only
    // what is written is stored.
    let bs = 64 << 10;
    let size = 10u64 << 30;
    assert_eq!(part_count(size, bs), 2);
    let parent = None;
    let mut p = PoolPush::begin(
        &store,
        &keeper,
        &job,
        spec(RevisionId::new_random(), size, bs),
        parent,
    )
    .unwrap();
    let mut sum = StreamChecksum::new();
    let mut manifest = Manifest::zeroed(size, bs).unwrap();
    for (at, seed) in [(0u64, 1u8), (size / 2 + 12_345, 2), (size - 70_000, 3)] {
        let data = pattern(seed, 70_000);
        p.data(at, &data).unwrap();
        sum.data(at, &data);
        // The model's digests of the touched blocks.
        let first = at / bs as u64;
        let last = (at + data.len() as u64 - 1) / bs as u64;
        for b in first..=last {
            let start = b * bs as u64;
            let mut block = vec![0u8; (size - start).min(bs as u64) as usize];
            for (i, byte) in block.iter_mut().enumerate() {
                let pos = start + i as u64;
                if pos >= at && pos < at + data.len() as u64 {
                    *byte = data[(pos - at) as usize];
                }
            }
            manifest.set(b, digest(&block)).unwrap();
        }
    }
    let end = PushEnd {
        stream_checksum: sum.finish().to_vec(),
        manifest_digest: manifest.file_digest().to_vec(),
        audit: None,
    };
    let r1 = p.finish(&end, &mut keeper).unwrap();
    let pieces = digests_objects(&pool, &job, &r1.id);
    assert_eq!(pieces.len(), 2, "{pieces:?}");
    assert_eq!(store.manifest(&job, &r1).unwrap(), manifest);

    // One byte of the second piece altered: data loss, named.
    let piece = names::digests_object(&job, &r1.id, 1);
    let mut bytes = store.io().read(&piece).unwrap();
    let original = bytes.clone();
    bytes[100] ^= 0xff;
    store.io().write_full(&piece, &bytes).unwrap();
    let err = store.manifest(&job, &r1).unwrap_err();
    assert!(err.is_data_loss(), "{err}");
    assert!(err.to_string().contains("does not match the record's"), "{err}");
    // A piece gone: data loss too.
    store.io().remove(&piece).unwrap();
    let err = store.manifest(&job, &r1).unwrap_err();
    assert!(matches!(err, PoolError::DataLoss { .. }), "{err}");
    assert!(err.to_string().contains("a piece is missing"), "{err}");
    store.io().write_full(&piece, &original).unwrap();
    assert_eq!(store.manifest(&job, &r1).unwrap(), manifest);
}
