//! A fast reader of `.rev` files in exactly the form this server writes
//! them ([`RevisionMeta::to_yaml`]): start-up reads 200,000 of them at
//! 10,000 jobs × 20 revisions, and the YAML parser was a quarter of it.
//!
//! It never decides alone: what it reads is accepted only if writing it
//! back gives the very same text, byte for byte. Whatever it does not
//! recognise (another field order, comments, quoting, flow style, files
//! of the original backy tool) goes to the full parser, so both always
//! agree: for a text `t` it accepts, `t == to_yaml(m)`, and the full parser
//! reads `to_yaml(m)` back as `m` (the round trip every `.rev` relies on).
//!
//! Writing it back with serde_yaml costs two thirds of parsing it, so
//! [`emit`] writes it as serde_yaml does, from the same pieces: integers
//! in decimal, floats by `ryu` (serde_yaml's own), ids and times by their
//! `Display`/chrono's RFC 3339 (what their `Serialize` writes), and strings
//! only where serde_yaml itself says they stay plain (a hex digest with a
//! letter no YAML number has; anything else asked of serde_yaml once and
//! remembered). When a string is not known plain, it declines. The tests
//! check `emit(m) == to_yaml(m)` wherever it answers.

use crate::id::RevisionId;
use crate::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};

/// `text` read the fast way, `None` when it is not in the written form.
pub(crate) fn parse(text: &str) -> Option<RevisionMeta> {
    let meta = read(text)?;
    // The check that makes this safe (see the module's comment).
    (emit(&meta)? == text).then_some(meta)
}

/// `meta` as [`RevisionMeta::to_yaml`] writes it; `None` where that is not
/// known here (a string serde_yaml would quote, a float that is not finite).
fn emit(meta: &RevisionMeta) -> Option<String> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(640);
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let _ = writeln!(out, "id: {}", meta.id.uuid());
    let _ = writeln!(out, "timestamp: {}", time(&meta.timestamp));
    match &meta.parent {
        Some(p) => writeln!(out, "parent: {}", p.uuid()),
        None => writeln!(out, "parent: null"),
    }
    .ok()?;
    let _ = writeln!(out, "size: {}", meta.size);
    let _ = writeln!(out, "block_size: {}", meta.block_size);
    if meta.tags.is_empty() {
        out.push_str("tags: []\n");
    } else {
        out.push_str("tags:\n");
        for tag in &meta.tags {
            let _ = writeln!(out, "- {}", plain(tag)?);
        }
    }
    let _ = writeln!(out, "trust: {}", meta.trust.as_str());
    match &meta.verified_at {
        Some(t) => writeln!(out, "verified_at: {}", time(t)),
        None => writeln!(out, "verified_at: null"),
    }
    .ok()?;
    let _ = writeln!(out, "source:\n  type: {}", plain(&meta.source.kind)?);
    let _ = writeln!(out, "  snapshot: {}", plain(&meta.source.snapshot)?);
    let s = &meta.stats;
    if !s.duration.is_finite() {
        return None;
    }
    let _ = writeln!(
        out,
        "stats:\n  bytes_received: {}\n  bytes_written: {}\n  changed_blocks: {}\n  duration: {}",
        s.bytes_received,
        s.bytes_written,
        s.changed_blocks,
        ryu::Buffer::new().format_finite(s.duration)
    );
    if s.bytes_deduplicated != 0 {
        let _ = writeln!(out, "  bytes_deduplicated: {}", s.bytes_deduplicated);
    }
    if let Some(a) = &s.audit {
        let _ = writeln!(
            out,
            "  audit:\n    tracker: {}\n    sampled: {}\n    mismatched: {}",
            plain(&a.tracker)?,
            a.sampled,
            a.mismatched
        );
    }
    let _ = writeln!(out, "manifest_digest: {}", plain(&meta.manifest_digest)?);
    let _ = writeln!(out, "storage: {}", meta.storage.as_str());
    if let Some(t) = &meta.locked_until {
        let _ = writeln!(out, "locked_until: {}", time(t));
    }
    if let Some(k) = &meta.key_check {
        let _ = writeln!(out, "key_check: {}", plain(k)?);
    }
    Some(out)
}

/// `s` as serde_yaml writes a string value, if it is one it writes plain
/// (or the empty string, `''`); `None` for the others.
fn plain(s: &str) -> Option<&str> {
    if s.is_empty() {
        return Some("''");
    }
    // A manifest digest: hex with a letter outside every YAML number,
    // bool and null (`e` floats, `b` binary, digits): plain.
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| matches!(b, b'a' | b'c' | b'd' | b'f'))
    {
        return Some(s);
    }
    known_plain(s).then_some(s)
}

/// Whether serde_yaml writes `s` plain, asked of serde_yaml once per
/// string (tags, source types: a handful across a store) and remembered.
fn known_plain(s: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// Enough for every tag and source type of a store; snapshot names
    /// are often one per revision, and are asked again past this.
    const REMEMBERED: usize = 4096;
    static KNOWN: Mutex<Option<HashMap<String, bool>>> = Mutex::new(None);
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    let map = known.get_or_insert_with(HashMap::new);
    if let Some(&plain) = map.get(s) {
        return plain;
    }
    // As a value of a block mapping, like every string of a `.rev`.
    let written = serde_yaml::to_string(&BTreeMap::from([("k", s)]));
    let plain = written.is_ok_and(|w| w.strip_prefix("k: ").and_then(|w| w.strip_suffix('\n')) == Some(s));
    if map.len() < REMEMBERED {
        map.insert(s.to_string(), plain);
    }
    plain
}

/// The lines of `text` as `key: value` pairs, read in the written order.
struct Lines<'a> {
    lines: std::iter::Peekable<std::str::Lines<'a>>,
}

impl<'a> Lines<'a> {
    /// The value of the next line, which must be `key: value`.
    fn value(&mut self, key: &str) -> Option<&'a str> {
        let line = self.lines.next()?;
        line.strip_prefix(key)?.strip_prefix(": ")
    }

    /// The next line, which must be exactly `line`.
    fn exactly(&mut self, line: &str) -> Option<()> {
        (self.lines.next()? == line).then_some(())
    }

    /// The value of the next line if it is `key: value`, consuming it.
    fn optional(&mut self, key: &str) -> Option<&'a str> {
        let line = *self.lines.peek()?;
        let value = line.strip_prefix(key)?.strip_prefix(": ")?;
        self.lines.next();
        Some(value)
    }
}

fn read(text: &str) -> Option<RevisionMeta> {
    let mut l = Lines {
        lines: text.lines().peekable(),
    };
    let id = rev_id(l.value("id")?)?;
    let timestamp = time(l.value("timestamp")?)?;
    let parent = match l.value("parent")? {
        "null" => None,
        v => Some(rev_id(v)?),
    };
    let size = l.value("size")?.parse().ok()?;
    let block_size = l.value("block_size")?.parse().ok()?;
    let mut tags = BTreeSet::new();
    match l.lines.next()? {
        "tags: []" => {}
        "tags:" => {
            while let Some(tag) = l.lines.peek().and_then(|t| t.strip_prefix("- ")) {
                tags.insert(string(tag)?);
                l.lines.next();
            }
        }
        _ => return None,
    }
    let trust = Trust::parse(l.value("trust")?).ok()?;
    let verified_at = match l.value("verified_at")? {
        "null" => None,
        v => Some(time(v)?),
    };
    l.exactly("source:")?;
    let source = SourceInfo {
        kind: string(l.value("  type")?)?,
        snapshot: string(l.value("  snapshot")?)?,
        // A revision of a group push has more under `source:`: the full
        // parser reads it (the next line is then not `stats:`).
        group: None,
    };
    l.exactly("stats:")?;
    let stats = Stats {
        bytes_received: l.value("  bytes_received")?.parse().ok()?,
        bytes_written: l.value("  bytes_written")?.parse().ok()?,
        changed_blocks: l.value("  changed_blocks")?.parse().ok()?,
        duration: l.value("  duration")?.parse().ok()?,
        bytes_deduplicated: match l.optional("  bytes_deduplicated") {
            Some(v) => v.parse().ok()?,
            None => 0,
        },
        audit: match l.lines.peek() {
            Some(&"  audit:") => {
                l.lines.next();
                Some(crate::tracker_audit::AuditOutcome {
                    tracker: string(l.value("    tracker")?)?,
                    sampled: l.value("    sampled")?.parse().ok()?,
                    mismatched: l.value("    mismatched")?.parse().ok()?,
                })
            }
            _ => None,
        },
    };
    let manifest_digest = string(l.value("manifest_digest")?)?;
    let storage = match l.value("storage")? {
        "reflink" => StorageMode::Reflink,
        "copy" => StorageMode::Copy,
        _ => return None,
    };
    let locked_until = match l.optional("locked_until") {
        Some(v) => Some(time(v)?),
        None => None,
    };
    let key_check = match l.optional("key_check") {
        Some(v) => Some(string(v)?),
        None => None,
    };
    if l.lines.next().is_some() {
        return None;
    }
    Some(RevisionMeta {
        id,
        timestamp,
        parent,
        size,
        block_size,
        tags,
        trust,
        verified_at,
        source,
        stats,
        manifest_digest,
        storage,
        locked_until,
        key_check,
    })
}

fn rev_id(v: &str) -> Option<RevisionId> {
    v.parse().ok()
}

fn time(v: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A plain scalar, or `''` (the empty string); anything quoted otherwise
/// is the full parser's.
fn string(v: &str) -> Option<String> {
    match v {
        "''" => Some(String::new()),
        _ if v.starts_with(['\'', '"']) => None,
        _ => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Both readers on `text`: the same revision, or both refuse it.
    fn agree(text: &str) -> Option<RevisionMeta> {
        let full = RevisionMeta::from_yaml_full(text, "x.rev");
        let fast = parse(text);
        if let Some(m) = &fast {
            assert_eq!(full.as_ref().ok(), Some(m), "the fast reader differs on:\n{text}");
        }
        let chosen = RevisionMeta::from_yaml(text, "x.rev");
        assert_eq!(
            chosen.as_ref().map_err(|e| &e.message),
            full.as_ref().map_err(|e| &e.message),
            "from_yaml differs from the YAML parser on:\n{text}"
        );
        fast
    }

    fn golden(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    /// The shapes the server writes (and the fixtures: scale_fixture,
    /// tests' commits) are read the fast way.
    #[test]
    fn the_written_shapes_are_read_fast() {
        for name in ["v1.rev", "v1-locked.rev"] {
            assert!(agree(&golden(name)).is_some(), "{name}");
        }
        let base = RevisionMeta::from_yaml_full(&golden("v1.rev"), "v1.rev").unwrap();
        let shapes = [
            // A first revision, no tags, nothing verified, no snapshot.
            RevisionMeta {
                parent: None,
                tags: BTreeSet::new(),
                trust: Trust::Trusted,
                verified_at: None,
                source: SourceInfo {
                    kind: "file".into(),
                    snapshot: String::new(),
                    group: None,
                },
                ..base.clone()
            },
            // Deduplicated bytes, a copy, distrusted, nanoseconds.
            RevisionMeta {
                trust: Trust::Distrusted,
                storage: StorageMode::Copy,
                timestamp: "2026-12-07T05:12:00.123456789Z".parse().unwrap(),
                stats: Stats {
                    bytes_deduplicated: 4 << 20,
                    duration: 0.1,
                    ..base.stats.clone()
                },
                ..base.clone()
            },
            // A push that audited its change tracker.
            RevisionMeta {
                stats: Stats {
                    audit: Some(crate::tracker_audit::AuditOutcome {
                        tracker: "qemu-bitmap".into(),
                        sampled: 82,
                        mismatched: 1,
                    }),
                    ..base.stats.clone()
                },
                ..base.clone()
            },
        ];
        for m in shapes {
            let text = m.to_yaml().unwrap();
            assert_eq!(agree(&text), Some(m), "{text}");
        }
    }

    /// What is not in the written form goes to the YAML parser: other
    /// orders, comments, quoting, flow style, unknown fields, bad values.
    #[test]
    fn anything_else_goes_to_the_yaml_parser() {
        let v1 = golden("v1.rev");
        let variants = [
            v1.replacen(
                "size: 196708\nblock_size: 65536\n",
                "block_size: 65536\nsize: 196708\n",
                1,
            ),
            format!("# written by hand\n{v1}"),
            v1.replace("trust: verified", "trust: 'verified'"),
            v1.replace(
                "tags:\n- daily\n- manual:keep\n",
                "tags: [daily, 'manual:keep']\n",
            ),
            v1.replace("  type: ceph-rbd", "  type: \"ceph-rbd\""),
            format!("{v1}extra: 1\n"),
            v1.replace("parent: 1f0e2d3c-4b5a-4978-8695-a4b3c2d1e0f9\n", ""),
            v1.replace("parent: 1f0e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", "parent: ~"),
            v1.replace("size: 196708", "size: 0x30064"),
            v1.replace("size: 196708", "size: -1"),
            v1.replace("duration: 1.5", "duration: 1.50"),
            v1.replace(
                "timestamp: 2026-12-01T10:00:00Z",
                "timestamp: 2026-12-01T11:00:00+01:00",
            ),
            v1.replace("storage: reflink\n", "storage: reflink"),
            v1.replace('\n', "\r\n"),
            v1.replace("tags:\n- daily", "tags:\n- 'null'"),
            v1.replace("tags:\n- daily", "tags:\n- null"),
            v1.replace(
                "  snapshot: backy-8e1cd8a4-5c1c-4b6e-9a43-0b2f6f1d3c7e",
                "  snapshot: ''''",
            ),
            v1.replace("trust: verified", "trust: unknown"),
            "id: [".to_string(),
            String::new(),
        ];
        for text in variants {
            assert!(parse(&text).is_none(), "read the fast way:\n{text}");
            agree(&text);
        }
    }

    fn text_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("null".to_string()),
            Just("~".to_string()),
            Just("true".to_string()),
            Just("1".to_string()),
            Just("1.5".to_string()),
            Just("0x10".to_string()),
            Just("'".to_string()),
            Just("a: b".to_string()),
            Just("#x".to_string()),
            Just("- x".to_string()),
            Just(" lead".to_string()),
            Just("trail ".to_string()),
            Just("yes".to_string()),
            Just("off".to_string()),
            Just("1e5".to_string()),
            Just(".inf".to_string()),
            Just("0b101".to_string()),
            Just("-".to_string()),
            Just("a:".to_string()),
            "[0-9a-f]{64}",
            "[0-9be]{64}",
            "[a-z0-9:@/._-]{1,12}",
            "[ -~]{0,16}",
            "\\PC{0,8}",
        ]
    }

    fn time_value() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..4_000_000_000, prop_oneof![Just(0u32), 0u32..1_000_000_000])
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap())
    }

    fn meta() -> impl Strategy<Value = RevisionMeta> {
        (
            (
                any::<u128>(),
                time_value(),
                proptest::option::of(any::<u128>()),
                any::<u64>(),
                any::<u32>(),
            ),
            proptest::collection::btree_set(text_value(), 0..4),
            (
                0..3u8,
                proptest::option::of(time_value()),
                text_value(),
                text_value(),
            ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                prop_oneof![
                    Just(0.0),
                    Just(0.1),
                    proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO
                ],
                prop_oneof![Just(0u64), any::<u64>()],
            ),
            (text_value(), any::<bool>(), proptest::option::of(time_value())),
        )
            .prop_map(
                |(
                    (id, timestamp, parent, size, block_size),
                    tags,
                    (trust, verified_at, kind, snapshot),
                    (received, written, changed, duration, dedup),
                    (manifest_digest, copy, locked_until),
                )| RevisionMeta {
                    id: uuid::Uuid::from_u128(id).into(),
                    timestamp,
                    parent: parent.map(|p| uuid::Uuid::from_u128(p).into()),
                    size,
                    block_size,
                    tags,
                    trust: [Trust::Trusted, Trust::Distrusted, Trust::Verified][trust as usize],
                    verified_at,
                    source: SourceInfo {
                        kind,
                        snapshot,
                        group: None,
                    },
                    stats: Stats {
                        bytes_received: received,
                        bytes_written: written,
                        changed_blocks: changed,
                        duration,
                        bytes_deduplicated: dedup,
                        audit: None,
                    },
                    manifest_digest,
                    storage: if copy {
                        StorageMode::Copy
                    } else {
                        StorageMode::Reflink
                    },
                    // Hex with letters, and all digits (which YAML quotes).
                    key_check: match (copy, locked_until.is_some()) {
                        (true, true) => Some("00112233445566778899aabbccddeeff".into()),
                        (false, true) => Some("00112233445566778899001122334455".into()),
                        _ => None,
                    },
                    locked_until,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Where the hand-written writer answers, it writes what serde_yaml
        /// writes: what makes the fast reader's check exact.
        #[test]
        fn the_writer_writes_what_serde_yaml_writes(m in meta()) {
            if let Some(text) = emit(&m) {
                prop_assert_eq!(text, m.to_yaml().unwrap());
            }
        }

        /// A tag or source string of any characters: plain only where
        /// serde_yaml writes it plain.
        #[test]
        fn strings_are_plain_only_where_serde_yaml_writes_them_plain(s in text_value()) {
            let m = RevisionMeta {
                tags: [s.clone()].into(),
                source: SourceInfo { kind: s.clone(), snapshot: s.clone(), group: None },
                manifest_digest: s.clone(),
                ..RevisionMeta::from_yaml_full(&golden("v1.rev"), "v1.rev").unwrap()
            };
            if let Some(text) = emit(&m) {
                prop_assert_eq!(text, m.to_yaml().unwrap());
            }
        }

        /// Whatever a revision holds, the written text is read the same by
        /// both (the fast reader may decline, never differ).
        #[test]
        fn both_readers_agree_on_every_written_revision(m in meta()) {
            let text = m.to_yaml().unwrap();
            if let Some(f) = agree(&text) {
                prop_assert_eq!(f, m);
            }
        }
    }
}

/// What the fast reader saves (`cargo test --release -p backy-common --lib
/// revision_fast -- --ignored --nocapture`).
#[cfg(test)]
#[test]
#[ignore = "a measurement, not a check"]
fn measure_the_fast_reader() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/v1.rev");
    let text = std::fs::read_to_string(path).unwrap();
    let n = 20_000;
    let time = |f: &dyn Fn() -> RevisionMeta| {
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(f());
        }
        start.elapsed().as_secs_f64() / f64::from(n) * 1e6
    };
    let full = time(&|| RevisionMeta::from_yaml_full(&text, "x").unwrap());
    let fast = time(&|| parse(&text).unwrap());
    let read_only = time(&|| read(&text).unwrap());
    let by_serde = time(&|| {
        let m = read(&text).unwrap();
        assert_eq!(m.to_yaml().unwrap(), text);
        m
    });
    eprintln!(
        "per .rev: YAML parser {full:.1} us, fast reader {fast:.1} us (reading {read_only:.1} us, \
         the rest its check; checked by serde_yaml instead: {by_serde:.1} us)"
    );
}
