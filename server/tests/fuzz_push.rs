//! Fuzz harness for the gRPC push frame handler (the server's push stream
//! state machine): random frame sequences — begin frames with odd sizes,
//! data and zero ranges anywhere, wrong checksums, keepalives, empty
//! frames, frames out of order — sent over a real socket to the real
//! service. Every sequence must be answered (no hang), with OK or a precise
//! code (never INTERNAL/UNKNOWN), leave no partial revision behind, and
//! leave the server serving. `cargo test` runs a fixed list of seeds;
//! `BACKY_FUZZ_SECS=600` runs longer from a random seed it prints
//! (`backy_common::fuzz_plan`); failing seeds are saved under
//! `tests/fuzz-regressions/` and replayed first.

use ::backy_server::{service, service::Service, state::Server, storage::JobDir};
use backy_common::checksum::StreamChecksum;
use backy_common::config::ServerConfig;
use backy_common::fuzz_plan::FuzzPlan;
use backy_common::revision::StorageMode;
use backy_proto::backy_client::BackyClient;
use backy_proto::backy_server::BackyServer;
use backy_proto::push_frame::Frame;
use backy_proto::{
    DataRange, PushBegin, PushEnd, PushFrame, PushKeepalive, SourceKind, StatusRequest, ZeroRange,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

#[derive(Debug, Clone)]
enum F {
    Begin {
        job: u8,
        size: u64,
        block_ok: bool,
        parent: bool,
    },
    Data {
        offset: u64,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    End {
        good: bool,
    },
    Keepalive,
    Empty,
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..10_000,
        Just(4 << 20),
        Just(9 << 20),
        Just((1 << 50) + 1),
        Just(u64::MAX)
    ]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..(10 << 20), Just(u64::MAX - 3), any::<u64>()]
}

fn frame() -> impl Strategy<Value = F> {
    prop_oneof![
        1 => (0u8..4, size(), proptest::bool::weighted(0.9), proptest::bool::weighted(0.1))
            .prop_map(|(job, size, block_ok, parent)| F::Begin { job, size, block_ok, parent }),
        4 => (offset(), prop_oneof![0usize..5000, Just(1 << 20), Just((1 << 20) + 1)])
            .prop_map(|(offset, len)| F::Data { offset, len }),
        2 => (offset(), prop_oneof![0u64..(8 << 20), any::<u64>()]).prop_map(|(offset, len)| F::Zero { offset, len }),
        2 => proptest::bool::weighted(0.8).prop_map(|good| F::End { good }),
        1 => Just(F::Keepalive),
        1 => Just(F::Empty),
    ]
}

/// A sequence that usually starts with a begin frame and ends with an end
/// frame (to reach deep states), and sometimes not.
fn sequence() -> impl Strategy<Value = Vec<F>> {
    (
        proptest::bool::weighted(0.85),
        (0u8..2, size()),
        proptest::collection::vec(frame(), 0..10),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(lead, (job, size), mut body, end)| {
            if lead {
                body.insert(
                    0,
                    F::Begin {
                        job,
                        size,
                        block_ok: true,
                        parent: false,
                    },
                );
            }
            if end {
                body.push(F::End { good: true });
            }
            body
        })
}

/// A range written since the last begin frame: data (0x5a) or zeros.
struct Written {
    offset: u64,
    len: u64,
    data: bool,
}

/// The manifest digest of an image of `size` bytes that was zeros before
/// `written`, so that sequences the server accepts commit (a wrong one
/// where no manifest of that size exists: refused anyway).
fn manifest_digest(size: u64, written: &[Written]) -> Vec<u8> {
    use backy_common::manifest::{digest, Manifest};
    let Ok(mut m) = Manifest::zeroed(size, 4 << 20) else {
        return vec![1; 32];
    };
    let bs = 4u64 << 20;
    let end_of = |w: &Written| w.offset.saturating_add(w.len).min(size);
    // Blocks inside a zero range and untouched by data stay zeros.
    let mut blocks: Vec<u64> = written
        .iter()
        .filter(|w| w.offset < size && w.len > 0)
        .flat_map(|w| {
            let (first, last) = (w.offset / bs, (end_of(w) - 1) / bs);
            if w.data {
                (first..=last).collect::<Vec<_>>()
            } else {
                vec![first, last]
            }
        })
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    for b in blocks {
        let (start, len) = (m.block_offset(b), m.block_len(b));
        let mut buf = vec![0u8; len as usize];
        for w in written.iter().filter(|w| w.offset < size) {
            let (from, to) = (w.offset.max(start), end_of(w).min(start + len));
            if from < to {
                buf[(from - start) as usize..(to - start) as usize].fill(if w.data { 0x5a } else { 0 });
            }
        }
        m.set(b, digest(&buf)).unwrap();
    }
    m.file_digest().to_vec()
}

fn encode(frames: &[F]) -> Vec<PushFrame> {
    let mut sum = StreamChecksum::new();
    let mut image_size = 0;
    let mut written = Vec::new();
    let jobs = ["vm1", "vm2", "../vm1", "nope"];
    frames
        .iter()
        .map(|f| PushFrame {
            frame: match f {
                F::Begin {
                    job,
                    size,
                    block_ok,
                    parent,
                } => Some(Frame::Begin({
                    image_size = *size;
                    written.clear();
                    PushBegin {
                        job: jobs[*job as usize % jobs.len()].into(),
                        rev_id: uuid::Uuid::new_v4().to_string(),
                        parent_id: if *parent {
                            uuid::Uuid::new_v4().to_string()
                        } else {
                            String::new()
                        },
                        size: *size,
                        block_size: if *block_ok { 4 << 20 } else { 4096 },
                        tags: vec![],
                        source_kind: SourceKind::File as i32,
                        source_snapshot: String::new(),
                        force: true,
                        ..PushBegin::default()
                    }
                })),
                F::Data { offset, len } => {
                    let data = vec![0x5a; *len];
                    sum.data(*offset, &data);
                    written.push(Written {
                        offset: *offset,
                        len: *len as u64,
                        data: true,
                    });
                    Some(Frame::Data(DataRange {
                        offset: *offset,
                        data,
                    }))
                }
                F::Zero { offset, len } => {
                    sum.zero(*offset, *len);
                    written.push(Written {
                        offset: *offset,
                        len: *len,
                        data: false,
                    });
                    Some(Frame::Zero(ZeroRange {
                        offset: *offset,
                        length: *len,
                    }))
                }
                F::End { good } => {
                    let mut c = sum.clone().finish().to_vec();
                    if !good {
                        c[0] ^= 1;
                    }
                    Some(Frame::End(PushEnd {
                        stream_checksum: c,
                        manifest_digest: manifest_digest(image_size, &written),
                        audit: None,
                    }))
                }
                F::Keepalive => Some(Frame::Keepalive(PushKeepalive {})),
                F::Empty => None,
            },
        })
        .collect()
}

#[test]
fn fuzz_push_frame_handler() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    std::fs::create_dir(&base).unwrap();
    let text = format!(
        "listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {}\njobs:\n  vm1: {{schedule: none, max-size: 8M}}\n  vm2: {{schedule: none}}\n",
        base.display()
    );
    let config = ServerConfig::from_yaml(&text, "fuzz.yaml").unwrap();
    for name in config.jobs.keys() {
        JobDir::new(&base, name.clone()).ensure().unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(Server::new(config, StorageMode::Copy));
    let client: BackyClient<Channel> = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = BackyServer::new(Service::new(server.clone()))
            .max_decoding_message_size(backy_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(backy_common::MAX_MESSAGE_BYTES);
        let svc =
            tonic::service::interceptor::InterceptedService::new(svc, service::interceptor(server.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        BackyClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_encoding_message_size(4 << 20)
    });

    let executions = AtomicU64::new(0);
    let committed = AtomicU64::new(0);
    let codes = std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new());
    let check = &|frames: Vec<F>| -> Result<(), TestCaseError> {
        executions.fetch_add(1, Ordering::Relaxed);
        let mut c = client.clone();
        let stream = tokio_stream::iter(encode(&frames));
        let answer =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), c.push(stream)).await });
        let Ok(answer) = answer else {
            return Err(TestCaseError::fail("push not answered within 20 s (hang)"));
        };
        let code = match &answer {
            Ok(_) => {
                committed.fetch_add(1, Ordering::Relaxed);
                Code::Ok
            }
            Err(e) => e.code(),
        };
        *codes.lock().unwrap().entry(format!("{code:?}")).or_default() += 1;
        prop_assert!(
            !matches!(code, Code::Internal | Code::Unknown),
            "imprecise answer {answer:?}"
        );
        for job in ["vm1", "vm2"] {
            let partial = base.join(job).join(".partial");
            let left = std::fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0);
            prop_assert_eq!(left, 0, "partial revision left in {}", partial.display());
        }
        Ok(())
    };
    let start = Instant::now();
    let plan = FuzzPlan::from_env();
    eprintln!(
        "fuzz push: seeds from {} (BACKY_FUZZ_SEED={0} repeats this run)",
        plan.first
    );
    let mut round = 0;
    while plan.runs(round, start.elapsed()) {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &plan.seed_bytes(round));
        let config = Config {
            cases: 64,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fuzz-regressions/push.txt"
            )))),
            ..Config::default()
        };
        if let Err(e) = TestRunner::new_with_rng(config, rng).run(&sequence(), check) {
            panic!("fuzz push: {e} (round seed {})", plan.first.wrapping_add(round));
        }
        round += 1;
    }
    // Still serving.
    let mut c = client.clone();
    rt.block_on(c.status(StatusRequest { job: "vm1".into() }))
        .unwrap();
    eprintln!(
        "fuzz push: {} executions ({} committed) in {:.1}s; codes {:?}",
        executions.load(Ordering::Relaxed),
        committed.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        codes.lock().unwrap()
    );
}
