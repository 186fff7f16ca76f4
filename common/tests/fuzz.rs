//! Fuzz harnesses (proptest-driven) for the parsers that read bytes from
//! outside: the rbd diff stream parser, the NBD reply parser, the digest
//! manifest reader and config loading. `cargo test` runs each over a fixed list of seeds
//! (`backy_common::fuzz_plan`); `BACKY_FUZZ_SECS=600 cargo test --release
//! -p backy-common --test fuzz -- --nocapture` runs longer from a random
//! seed it prints (`BACKY_FUZZ_SEED=N` repeats a run). Failing cases are
//! saved under `tests/fuzz-regressions/` and replayed first by every
//! later run. Every input must give a
//! result or an error: no panic, no hang (step bounds), and no allocation
//! over [`ALLOC_CAP`] (a counting global allocator).

use backy_common::config::{ClientConfig, ServerConfig};
use backy_common::fuzz_plan::FuzzPlan;
use backy_common::manifest::{Manifest, HEADER_LEN, MAGIC};
use backy_common::nbd::reply::{Completed, InFlight};
use backy_common::nbd::wire::{self, Header};
use backy_common::rbd_diff::{DiffReader, Record};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngAlgorithm, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest single allocation any input may cause.
const ALLOC_CAP: usize = 64 << 20;

struct Capped;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut(); // aborts the test: a bug
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// Runs `check` on inputs from `strategy`, one round of cases per seed of
/// the plan; a failing input is shrunk, reported and its seed saved.
/// Prints the first seed and the execution count.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    const ROUND: u32 = 256;
    let start = Instant::now();
    let executions = std::sync::atomic::AtomicU64::new(0);
    let counted = &|v| {
        executions.fetch_add(1, Ordering::Relaxed);
        check(v)
    };
    let plan = FuzzPlan::from_env();
    eprintln!(
        "fuzz {name}: seeds from {} (BACKY_FUZZ_SEED={0} repeats this run)",
        plan.first
    );
    let regressions: &'static str = Box::leak(
        format!("{}/tests/fuzz-regressions/{name}.txt", env!("CARGO_MANIFEST_DIR")).into_boxed_str(),
    );
    let mut round = 0;
    while plan.runs(round, start.elapsed()) {
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &plan.seed_bytes(round));
        let config = Config {
            cases: ROUND,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            ..Config::default()
        };
        if let Err(e) = TestRunner::new_with_rng(config, rng).run(&strategy, counted) {
            panic!("fuzz {name}: {e} (round seed {})", plan.first.wrapping_add(round));
        }
        round += 1;
    }
    let executions = executions.load(Ordering::Relaxed);
    eprintln!(
        "fuzz {name}: {executions} executions in {:.1}s, largest allocation {} bytes",
        start.elapsed().as_secs_f64(),
        LARGEST.load(Ordering::Relaxed)
    );
}

/// Bytes that look like an rbd diff: a banner, then records with tags
/// and lengths from the format (including huge ones), then noise.
fn diff_like() -> impl Strategy<Value = Vec<u8>> {
    let banner = prop_oneof![
        Just(b"rbd diff v1\n".to_vec()),
        Just(b"rbd diff v2\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..14),
    ];
    let num = prop_oneof![
        0u64..5000,
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1u64 << 40),
        any::<u64>()
    ];
    let record = (
        proptest::sample::select(vec![b'f', b't', b'p', b's', b'w', b'z', b'e', b'x', 0u8]),
        num.clone(),
        num,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(tag, a, b, tail)| {
            let mut r = vec![tag];
            r.extend_from_slice(&a.to_le_bytes());
            r.extend_from_slice(&b.to_le_bytes());
            r.extend_from_slice(&tail);
            r
        });
    (
        banner,
        proptest::collection::vec(record, 0..12),
        proptest::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(mut out, records, noise)| {
            for r in records {
                out.extend(r);
            }
            out.extend(noise);
            out
        })
}

#[test]
fn fuzz_rbd_diff_parser() {
    fuzz("rbd_diff", diff_like(), |bytes| {
        let len = bytes.len() as u64;
        let mut r = DiffReader::new(&bytes[..]);
        let mut buf = [0u8; 4096];
        // Every step consumes input or ends: bounded by the input length.
        for _ in 0..(bytes.len() * 2 + 16) {
            match r.next_record() {
                Ok(Some(Record::Data { .. })) => {
                    if r.skip_data().is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(Record::End)) | Ok(None) | Err(_) => {
                    prop_assert!(r.stream_position() <= len);
                    return Ok(());
                }
                Ok(Some(_)) => {}
            }
            let _ = r.read_data(&mut buf);
        }
        prop_assert!(false, "the parser did not finish within its step bound");
        Ok(())
    });
}

/// Bytes that look like a stream of NBD replies to the requests
/// [`fuzz_nbd_reply_parser`] has in flight: chunk headers with likely
/// types, cookies, flags and lengths (including huge ones), payloads of
/// plausible offsets and lengths, simple replies, and noise.
const SIZE: u64 = 1 << 20;
/// What the harness has in flight, by cookie: two reads, then a block
/// status query (for two contexts).
const REQUESTS: [(u64, u64); 3] = [(0, 4096), (SIZE - 512, 512), (4096, 65536)];

fn nbd_replies_like() -> impl Strategy<Value = Vec<u8>> {
    let num32 = prop_oneof![0u32..5000, Just(u32::MAX), Just(1u32 << 31), any::<u32>()];
    let magic = prop_oneof![
        4 => Just(0x668e_33efu32),
        1 => Just(0x6744_6698u32),
        1 => any::<u32>(),
    ];
    let kind = proptest::sample::select(vec![0u16, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003, 3, 0xffff]);
    let payload = proptest::collection::vec(
        prop_oneof![
            Just(0u8),
            Just(1u8),
            Just(2u8),
            Just(0x10u8),
            Just(0xffu8),
            any::<u8>()
        ],
        0..80,
    );
    let message = (magic, any::<u16>(), kind, 0u64..4, num32, any::<bool>(), payload).prop_map(
        |(magic, flags, kind, cookie, len, honest_len, payload)| {
            let mut m = magic.to_be_bytes().to_vec();
            if magic == 0x6744_6698 {
                m.extend_from_slice(&u32::from(flags % 3).to_be_bytes());
                m.extend_from_slice(&cookie.to_be_bytes());
                return m;
            }
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            let len = if honest_len { payload.len() as u32 } else { len };
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(payload);
            m
        },
    );
    // Well-formed chunks near the requests' ranges, so that replies also
    // complete (and get checked) rather than failing at the first field.
    // Well-formed chunks aimed at one request's range (cookie 0 and 1:
    // reads, 2: the block status query), so that replies also complete,
    // and get checked, rather than failing at the first field.
    let part = proptest::sample::select(vec![
        (0u64, 1u64),
        (0, 1),
        (0, 2),
        (1, 2),
        (0, 4),
        (3, 4),
        (1, 1),
        (0, 0),
    ]);
    let chunk = (any::<u16>(), 0u64..4, 0u8..5, part, any::<u32>()).prop_map(
        |(flags, cookie, kind, (num, den), x)| {
            let (req_offset, req_len) = REQUESTS.get(cookie as usize).copied().unwrap_or((0, 4096));
            // (_, 0): a random length.
            let len = req_len.checked_div(den).unwrap_or(1 + u64::from(x % 8192));
            let offset = req_offset + req_len * num / den.max(1);
            let data = vec![0x5a; len.clamp(1, 65536) as usize];
            let chunk = match kind {
                0 => wire::Chunk::Data { offset, data: &data },
                1 => wire::Chunk::Hole {
                    offset,
                    len: len.max(1) as u32,
                },
                2 => wire::Chunk::BlockStatus {
                    context: x % 3 % 2,
                    descriptors: vec![
                        wire::Descriptor {
                            len: len.max(1) as u32,
                            flags: x
                        };
                        (x % 3 + 1) as usize
                    ],
                },
                3 => wire::Chunk::Error {
                    code: x | 1,
                    message: "e".into(),
                    offset: Some(offset),
                },
                _ => wire::Chunk::None,
            };
            wire::encode_chunk(flags % 2, cookie, &chunk)
        },
    );
    let message = prop_oneof![1 => message, 6 => chunk];
    (
        proptest::collection::vec(message, 0..6),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(messages, noise)| {
            let mut out: Vec<u8> = messages.concat();
            out.extend(noise);
            out
        })
}

#[test]
fn fuzz_nbd_reply_parser() {
    let completed = AtomicUsize::new(0);
    fuzz("nbd_reply", nbd_replies_like(), |bytes| {
        let mut inflight = InFlight::new();
        for &(offset, len) in &REQUESTS[..2] {
            inflight.read(offset, len as u32, SIZE).expect("valid read");
        }
        let (offset, len) = REQUESTS[2];
        inflight
            .block_status(offset, len as u32, SIZE, &[0, 1])
            .expect("valid query");
        // As the transport does: magic, header, bounded payload, message.
        let mut at = 0usize;
        while at + 4 <= bytes.len() {
            let Ok(magic) = wire::reply_magic(&[bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            else {
                return Ok(());
            };
            let rest = magic.rest_len();
            let Some(head) = bytes.get(at + 4..at + 4 + rest) else {
                return Ok(());
            };
            let Ok(header) = Header::parse(magic, head) else {
                return Ok(());
            };
            at += 4 + rest;
            let Ok(n) = inflight.payload_len(&header) else {
                return Ok(());
            };
            // Bounded before anything is read: no chunk may claim more.
            prop_assert!(n <= 4 + 8 * (1 << 17));
            let Some(payload) = bytes.get(at..at + n) else {
                return Ok(());
            };
            at += n;
            match inflight.on_message(&header, payload) {
                Err(_) => return Ok(()),
                Ok(Some((cookie, Ok(Completed::Read { offset, data })))) => {
                    completed.fetch_add(1, Ordering::Relaxed);
                    let (o, l) = REQUESTS[cookie as usize];
                    prop_assert_eq!((offset, data.len()), (o, l as usize));
                }
                Ok(Some((_, Ok(Completed::Status { offset, extents })))) => {
                    completed.fetch_add(1, Ordering::Relaxed);
                    prop_assert_eq!(offset, 4096);
                    for e in extents.iter().flatten() {
                        prop_assert!(e.len > 0 && e.offset >= 4096 && e.end() <= 4096 + 65536);
                    }
                }
                Ok(_) => {}
            }
        }
        Ok(())
    });
    eprintln!(
        "fuzz nbd_reply: {} requests completed successfully",
        completed.load(Ordering::Relaxed)
    );
}

#[test]
fn fuzz_manifest_reader() {
    // Valid manifests with bytes flipped, and headers with random fields.
    let valid = (1u64..64 << 20, 0usize..200, any::<u8>(), 0usize..300).prop_map(|(size, at, x, cut)| {
        let mut m = Manifest::zeroed(size, 1 << 20).expect("valid manifest").encode();
        let i = at % m.len();
        m[i] ^= x;
        m.truncate(m.len().saturating_sub(cut % 3 * cut));
        m
    });
    let forged = (
        any::<[u8; HEADER_LEN - 8]>(),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(rest, body)| {
            let mut m = MAGIC.to_vec();
            m.extend_from_slice(&rest);
            m[8] = 1; // version
            m.extend(body);
            m
        });
    let noise = proptest::collection::vec(any::<u8>(), 0..200);
    fuzz("manifest", prop_oneof![valid, forged, noise], |bytes| {
        if let Ok(m) = Manifest::decode(&bytes, "fuzz.digests") {
            // What decodes re-encodes to the same size and decodes to the
            // same manifest (reserved header bytes are not kept).
            let again = m.encode();
            prop_assert_eq!(again.len(), bytes.len());
            prop_assert_eq!(&again[HEADER_LEN..], &bytes[HEADER_LEN..]);
            prop_assert_eq!(Manifest::decode(&again, "again").ok(), Some(m));
        }
        Ok(())
    });
}

const GOOD: &str = "listen: 127.0.0.1:7000
insecure-plaintext: true
base-dir: /srv/backy
schedules:
  default:
    daily: {interval: 1d, keep: 9}
jobs:
  vm1: {schedule: default, client: hv01, max-size: 100G, source: {type: ceph-rbd, pool: rbd, image: vm1}}
clients:
  hv01: {token-hash: 'blake3:0000000000000000000000000000000000000000000000000000000000000000'}
limits: {streams-per-client: 4, idle-timeout: 30s}
file-mode: 0640
";

#[test]
fn fuzz_config_loading() {
    let mutated = (
        0usize..GOOD.len(),
        proptest::collection::vec(any::<u8>(), 0..8),
        0usize..20,
    )
        .prop_map(|(at, insert, delete)| {
            let mut b = GOOD.as_bytes().to_vec();
            let end = (at + delete).min(b.len());
            b.splice(at..end, insert);
            String::from_utf8_lossy(&b).into_owned()
        });
    let tokens = proptest::collection::vec(
        proptest::sample::select(vec![
            "jobs:",
            "clients:",
            "tls:",
            "\n",
            "  ",
            "- ",
            "{",
            "}",
            "[",
            "]",
            "&a ",
            "*a",
            "!!binary ",
            "~",
            "1e999",
            "-1",
            "99999999999999999999",
            "'",
            "\"",
            ":",
            ",",
            "vm1",
            "keep: 0",
            "interval: 0s",
        ]),
        0..40,
    )
    .prop_map(|v| v.concat());
    fuzz("config", prop_oneof![mutated, tokens, ".*"], |text| {
        let _ = ServerConfig::from_yaml(&text, "fuzz.yaml");
        let _ = ClientConfig::from_yaml(&text, "fuzz.yaml");
        Ok(())
    });
}

#[test]
fn config_alias_bombs_are_refused_quickly() {
    // "Billion laughs": nested aliases that would expand exponentially.
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        text.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
    }
    text.push_str("listen: 127.0.0.1:1\nbase-dir: /x\n");
    let start = Instant::now();
    assert!(ServerConfig::from_yaml(&text, "bomb.yaml").is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(ServerConfig::from_yaml(&deep, "deep.yaml").is_err());
}
