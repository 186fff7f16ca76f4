//! Bad input to a real server over a real socket: each request is refused
//! with a precise gRPC status and changes nothing stored.

mod support;

use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use support::*;
use tonic::Code;

const SIZE: u64 = 64 << 20;

fn begin(job: &str, size: u64) -> Frame {
    Frame::Begin(PushBegin {
        job: job.into(),
        rev_id: uuid::Uuid::new_v4().to_string(),
        parent_id: String::new(),
        size,
        block_size: 4 << 20,
        tags: vec![],
        source_kind: SourceKind::File as i32,
        source_snapshot: String::new(),
        force: false,
        resume: false,
        resumable: false,
        ..Default::default()
    })
}

/// A begin frame naming `snapshot` as its source's snapshot.
fn begin_snapshot(snapshot: &str) -> Frame {
    match begin("vm1", SIZE) {
        Frame::Begin(b) => Frame::Begin(PushBegin {
            source_snapshot: snapshot.into(),
            ..b
        }),
        other => other,
    }
}

fn data(offset: u64, len: usize) -> Frame {
    Frame::Data(DataRange {
        offset,
        data: vec![7u8; len],
    })
}

fn end(checksum: [u8; 32], manifest_digest: Vec<u8>) -> Frame {
    Frame::End(PushEnd {
        stream_checksum: checksum.to_vec(),
        manifest_digest,
        audit: None,
    })
}

/// Checksum of frames as a well-behaved client computes it.
fn checksum_of(frames: &[Frame]) -> [u8; 32] {
    let mut c = backy_common::checksum::StreamChecksum::new();
    for f in frames {
        match f {
            Frame::Data(d) => c.data(d.offset, &d.data),
            Frame::Zero(z) => c.zero(z.offset, z.length),
            _ => {}
        }
    }
    c.finish()
}

async fn push(url: &str, frames: Vec<Frame>) -> Result<PushReply, tonic::Status> {
    let mut client = BackyClient::connect(url.to_string())
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let stream = tokio_stream::iter(frames.into_iter().map(|f| PushFrame { frame: Some(f) }));
    client.push(stream).await.map(|r| r.into_inner())
}

fn granules(block: u64, len: usize) -> Frame {
    Frame::Granules(GranuleDigests {
        block,
        digests: vec![1u8; len],
        block_digest: Vec::new(),
    })
}

/// Asks whether the server holds block `block` with a block digest of
/// `len` bytes and no granule digests (protocol 5).
fn held_ask(block: u64, len: usize) -> Frame {
    Frame::Granules(GranuleDigests {
        block,
        digests: Vec::new(),
        block_digest: vec![7u8; len],
    })
}

/// A `PushExchange` of `frames` sent without waiting for answers; its
/// final reply or error.
async fn push_exchange(url: &str, frames: Vec<Frame>) -> Result<PushReply, tonic::Status> {
    let mut client = BackyClient::connect(url.to_string()).await.expect("connect");
    let stream = tokio_stream::iter(frames.into_iter().map(|f| PushFrame { frame: Some(f) }));
    let mut events = client.push_exchange(stream).await?.into_inner();
    while let Some(event) = events.message().await? {
        if let Some(push_event::Event::Done(reply)) = event.event {
            return Ok(reply);
        }
    }
    Err(tonic::Status::unknown("the exchange ended without a reply"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_pushes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let server = tokio::task::spawn_blocking({
        let base = base.clone();
        move || Server::start(&base, "  vm1: {schedule: none, max-size: 1G}\n")
    })
    .await
    .unwrap();
    let url = server.url.clone();

    // One good revision first, so "nothing changed" covers committed data.
    let good = vec![data(0, 1 << 20)];
    let good_manifest = manifest_digest_after(None, SIZE, 4 << 20, &[(0, &vec![7u8; 1 << 20][..])]);
    let mut frames = vec![begin("vm1", SIZE)];
    frames.extend(good.clone());
    frames.push(end(checksum_of(&good), good_manifest));
    push(&url, frames).await.expect("a well-formed push succeeds");
    let before = server.snapshot_tree();

    // Refused before the commit: any manifest digest will do.
    let ok_end = |fs: &[Frame]| end(checksum_of(fs), vec![1; 32]);
    let cases: Vec<(&str, Vec<Frame>, Code, &str)> = vec![
        (
            "job escaping base-dir",
            vec![begin("../x", SIZE), ok_end(&[])],
            Code::InvalidArgument,
            "invalid job name",
        ),
        (
            "job with slash",
            vec![begin("a/b", SIZE), ok_end(&[])],
            Code::InvalidArgument,
            "invalid job name",
        ),
        (
            "empty job",
            vec![begin("", SIZE), ok_end(&[])],
            Code::InvalidArgument,
            "invalid job name",
        ),
        (
            "overlong job",
            vec![begin(&"a".repeat(65), SIZE), ok_end(&[])],
            Code::InvalidArgument,
            "longer than 64",
        ),
        (
            "unknown job",
            vec![begin("vm9", SIZE), ok_end(&[])],
            Code::NotFound,
            "unknown job vm9",
        ),
        (
            "size over the job limit",
            vec![begin("vm1", 2 << 30), ok_end(&[])],
            Code::ResourceExhausted,
            "limit",
        ),
        (
            "extent beyond the size",
            vec![begin("vm1", SIZE), data(SIZE - 10, 20), ok_end(&[])],
            Code::InvalidArgument,
            "beyond the announced image size",
        ),
        (
            "offset overflow",
            vec![
                begin("vm1", SIZE),
                Frame::Zero(ZeroRange {
                    offset: u64::MAX - 1,
                    length: 10,
                }),
                ok_end(&[]),
            ],
            Code::InvalidArgument,
            "beyond the announced image size",
        ),
        // Issue 28, item 8: every peer string the server stores is bounded.
        (
            "source snapshot over 1 KiB",
            vec![begin_snapshot(&"s".repeat(1025)), ok_end(&[])],
            Code::InvalidArgument,
            "source snapshot name longer than 1024 bytes",
        ),
        (
            "source snapshot with a control character",
            vec![begin_snapshot("snap\n[backy] audit forged=1"), ok_end(&[])],
            Code::InvalidArgument,
            "source snapshot name with a control character",
        ),
        (
            "data frame larger than 1 MiB",
            vec![begin("vm1", SIZE), data(0, (1 << 20) + 1), ok_end(&[])],
            Code::InvalidArgument,
            "must be 1..=",
        ),
        (
            "data before begin",
            vec![data(0, 10), begin("vm1", SIZE)],
            Code::InvalidArgument,
            "out of order",
        ),
        (
            "second begin",
            vec![begin("vm1", SIZE), data(0, 10), begin("vm1", SIZE)],
            Code::InvalidArgument,
            "second begin",
        ),
        (
            "frames after end",
            vec![begin("vm1", SIZE), ok_end(&[]), data(0, 10)],
            Code::InvalidArgument,
            "after the end frame",
        ),
        (
            "no end frame",
            vec![begin("vm1", SIZE), data(0, 10)],
            Code::Unavailable,
            "before its end frame",
        ),
        (
            "wrong end-to-end checksum",
            vec![begin("vm1", SIZE), data(0, 10), ok_end(&[data(0, 11)])],
            Code::DataLoss,
            "end-to-end check failed",
        ),
        (
            "bad block size",
            vec![
                Frame::Begin(PushBegin {
                    block_size: 4096,
                    ..begin_fields("vm1")
                }),
                ok_end(&[]),
            ],
            Code::InvalidArgument,
            "block size",
        ),
        (
            "parent that does not exist",
            vec![
                Frame::Begin(PushBegin {
                    parent_id: uuid::Uuid::new_v4().to_string(),
                    ..begin_fields("vm1")
                }),
                ok_end(&[]),
            ],
            Code::FailedPrecondition,
            "no longer exists",
        ),
        (
            "granule digests outside the exchange",
            vec![begin("vm1", SIZE), granules(0, 1024), ok_end(&[])],
            Code::InvalidArgument,
            "belong in PushExchange",
        ),
        (
            "keepalive before begin",
            vec![Frame::Keepalive(PushKeepalive {}), begin("vm1", SIZE)],
            Code::InvalidArgument,
            "out of order",
        ),
        (
            "empty data frame",
            vec![begin("vm1", SIZE), data(0, 0), ok_end(&[])],
            Code::InvalidArgument,
            "must be 1..=",
        ),
        (
            "zero range past the end",
            vec![
                begin("vm1", SIZE),
                Frame::Zero(ZeroRange {
                    offset: SIZE - 1,
                    length: 2,
                }),
                ok_end(&[]),
            ],
            Code::InvalidArgument,
            "beyond the announced image size",
        ),
        (
            "image size over the server maximum",
            vec![begin("vm1", u64::MAX), ok_end(&[])],
            Code::ResourceExhausted,
            "limit",
        ),
        (
            "bad tag",
            vec![
                Frame::Begin(PushBegin {
                    tags: vec!["a b".into()],
                    ..begin_fields("vm1")
                }),
                ok_end(&[]),
            ],
            Code::InvalidArgument,
            "invalid tag",
        ),
    ];
    for (what, frames, code, msg) in cases {
        let err = push(&url, frames).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(msg),
            "{what}: message {:?} lacks {msg:?}",
            err.message()
        );
        assert_eq!(server.snapshot_tree(), before, "{what}: stored state changed");
    }

    // Issue 27 item 11: a push whose end frame lacks the manifest digest
    // (no end-to-end check possible) commits nothing.
    let mut frames = vec![begin("vm1", SIZE)];
    frames.extend(good.clone());
    frames.push(end(checksum_of(&good), vec![]));
    let err = push(&url, frames).await.expect_err("no manifest digest");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        "the push's end frame has no manifest digest: the server commits only what it can check end to end (upgrade backy-client)"
    );
    assert_eq!(
        server.snapshot_tree(),
        before,
        "no manifest digest: stored state changed"
    );

    // The granule exchange: digests the server cannot answer for are
    // refused before it reads anything.
    let exchange_cases: Vec<(&str, Vec<Frame>, &str)> = vec![
        (
            "block beyond the image",
            vec![granules(SIZE / (4 << 20), 1024)],
            "beyond the image",
        ),
        (
            "digests of the wrong length",
            vec![granules(0, 100)],
            "granule digests of 100 bytes",
        ),
        (
            "a block asked twice",
            vec![granules(1, 1024), granules(1, 1024)],
            "out of order",
        ),
        (
            "a block below the ranges sent",
            vec![data(8 << 20, 10), granules(1, 1024)],
            "out of order",
        ),
        // Protocol 5: asking whether the server holds a block.
        (
            "a block digest of the wrong length",
            vec![held_ask(0, 31)],
            "block digest of 31 bytes: must be 32",
        ),
        (
            "a held-block ask beyond the image",
            vec![held_ask(SIZE / (4 << 20), 32)],
            "beyond the image",
        ),
        (
            "a held-block ask below the ranges sent",
            vec![data(8 << 20, 10), held_ask(1, 32)],
            "out of order",
        ),
        (
            "neither granule nor block digests",
            vec![held_ask(0, 0)],
            "granule digests of 0 bytes",
        ),
    ];
    for (what, middle, msg) in exchange_cases {
        let mut frames = vec![begin("vm1", SIZE)];
        frames.extend(middle);
        frames.push(ok_end(&[]));
        let err = push_exchange(&url, frames).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains(msg),
            "{what}: {:?} lacks {msg:?}",
            err.message()
        );
        assert_eq!(server.snapshot_tree(), before, "{what}: stored state changed");
    }

    // A message over the size cap is refused by the transport.
    let huge = vec![begin("vm1", SIZE), data(0, 3 << 20)];
    let err = push(&url, huge).await.expect_err("oversized message");
    assert!(
        [Code::OutOfRange, Code::ResourceExhausted, Code::InvalidArgument].contains(&err.code()),
        "oversized message: {err:?}"
    );
    eprintln!(
        "oversized message answered with {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(
        server.snapshot_tree(),
        before,
        "oversized message: stored state changed"
    );

    // Restores and manifests of unknown things.
    let mut client = BackyClient::connect(url.clone()).await.unwrap();
    let e = client
        .restore(RestoreRequest {
            job: "../etc".into(),
            revision: "latest".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .restore(RestoreRequest {
            job: "vm1".into(),
            revision: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .manifest(ManifestRequest {
            job: "vm1".into(),
            revision: "all".into(),
            resume: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = client
        .status(StatusRequest { job: "vm9".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(server.snapshot_tree(), before);
    drop(server);
}

fn begin_fields(job: &str) -> PushBegin {
    match begin(job, SIZE) {
        Frame::Begin(b) => b,
        _ => unreachable!(),
    }
}
