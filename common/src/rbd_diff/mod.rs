//! Ceph's `rbd export-diff` stream (formats v1 and v2): the parser here,
//! the writer (v1, what `rbd import-diff` reads) in [`writer`].
//!
//! The format is specified in Ceph's `doc/dev/rbd-diff.rst`. A stream is a
//! 12-byte banner, `"rbd diff v1\n"` or `"rbd diff v2\n"`, then records, each
//! starting with a one-byte tag. All integers are little endian.
//!
//! ```text
//! tag  v1 payload                       v2 payload (after the tag: le64 record length L)
//! 'f'  le32 n, n bytes from-snap name   L = 4 + n, then the same
//! 't'  le32 n, n bytes to-snap name     L = 4 + n, then the same
//! 's'  le64 image size (at the end)     L = 8, then the same
//! 'p'  (v2 only)                        L = 1 (Ceph < 17: 8), u8 to-snap protected (0/1)
//! 'w'  le64 offset, le64 len, len bytes L = 16 + len, then the same
//! 'z'  le64 offset, le64 len            L = 16, then the same
//! 'e'  end, nothing follows             no record length either
//! ```
//!
//! Metadata records (`f`, `t`, `p`, `s`) come before all data records (`w`,
//! `z`), in any order. `rbd export-diff` always writes v1; v2 streams only
//! occur embedded in `rbd export --export-format 2` output (one per
//! snapshot), which is why [`DiffReader::embedded`] exists.
//!
//! [`DiffReader`] reads any [`std::io::Read`] (wrap pipes in a `BufReader`:
//! the parser issues small reads) with memory bounded by the caller's data
//! buffer, whatever the lengths in the stream say:
//!
//! ```no_run
//! # use backy_common::rbd_diff::{DiffReader, Record};
//! # fn write(_offset: u64, _data: &[u8]) {}
//! # fn zero(_offset: u64, _len: u64) {}
//! # fn commit() {}
//! # fn f(stdout: impl std::io::Read) -> backy_common::Result<()> {
//! let mut diff = DiffReader::new(std::io::BufReader::new(stdout));
//! let mut buf = vec![0u8; 1 << 20];
//! while let Some(record) = diff.next_record()? {
//!     match record {
//!         Record::Data { offset, .. } => {
//!             let mut at = offset;
//!             loop {
//!                 let n = diff.read_data(&mut buf)?;
//!                 if n == 0 {
//!                     break;
//!                 }
//!                 write(at, &buf[..n]);
//!                 at += n as u64;
//!             }
//!         }
//!         Record::Zero { offset, len } => zero(offset, len),
//!         Record::End => commit(),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `next_record` returns [`Record::End`] only once the whole stream has been
//! validated (for [`DiffReader::new`]: including that nothing follows the end
//! marker), so a caller must not commit anything before it sees `End`. A
//! truncated or malformed stream is an error of kind
//! [`DataLoss`](crate::ErrorKind::DataLoss); after any stream error every
//! further call returns that same error.
//!
//! Not guaranteed by the format, hence not enforced: extents in increasing
//! offset order, extents not overlapping, non-zero extent lengths. (With
//! fancy striping Ceph reports extents object by object, not in image
//! order.) An image that shrank shows only as a smaller `Size`; no zero
//! records cover the cut-off tail.

use std::io::{self, Read};

use crate::error::{Error, Result};

pub mod writer;
pub use writer::{DiffHeader, DiffWriteError, DiffWriter};

/// Longest snapshot name accepted (the limit `rbd import-diff` uses).
pub const MAX_SNAP_NAME_LEN: u32 = 4096;

const BANNER_LEN: usize = 12;
const BANNER_V1: &[u8; BANNER_LEN] = b"rbd diff v1\n";
const BANNER_V2: &[u8; BANNER_LEN] = b"rbd diff v2\n";

const TAG_FROM_SNAP: u8 = b'f';
const TAG_TO_SNAP: u8 = b't';
const TAG_SIZE: u8 = b's';
const TAG_PROTECTED: u8 = b'p';
const TAG_WRITE: u8 = b'w';
const TAG_ZERO: u8 = b'z';
const TAG_END: u8 = b'e';

/// Size of the scratch buffer [`DiffReader::skip_data`] reads through.
const SKIP_CHUNK: usize = 64 << 10;

/// Format version of a diff stream, from its banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// `"rbd diff v1\n"`: what `rbd export-diff` writes.
    V1,
    /// `"rbd diff v2\n"`: every record but the end carries its length.
    V2,
}

/// One record of a diff stream, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The banner; always the first record.
    Header { version: Version },
    /// The snapshot the diff starts from (absent: from the image's creation).
    FromSnap(String),
    /// The snapshot the diff leads to (absent: the image's head).
    ToSnap(String),
    /// v2 only: whether the to-snapshot is protected.
    SnapProtected(bool),
    /// The image's size at the end of the diff.
    Size(u64),
    /// `len` bytes of image data at `offset` follow; read them with
    /// [`DiffReader::read_data`] (or drop them with
    /// [`DiffReader::skip_data`]) before the next `next_record`.
    Data { offset: u64, len: u64 },
    /// The range reads as zeros (discarded or zeroed).
    Zero { offset: u64, len: u64 },
    /// The end marker; the stream was complete and valid.
    End,
}

enum State {
    /// Nothing read yet.
    Banner,
    /// Between records.
    Records,
    /// Inside the payload of a data record.
    Data { next: u64, remaining: u64 },
    /// `End` has been returned.
    Done,
    /// A stream error happened; it is returned again on every call.
    Failed(Error),
}

/// Streaming reader of one diff stream; see the module documentation.
pub struct DiffReader<R> {
    inner: R,
    /// Whether the stream is embedded in a larger one: no EOF check after 'e'.
    embedded: bool,
    state: State,
    version: Option<Version>,
    /// Bytes consumed from `inner`.
    pos: u64,
    seen_from: bool,
    seen_to: bool,
    seen_protected: bool,
    size: Option<u64>,
    in_data_section: bool,
}

impl<R: Read> DiffReader<R> {
    /// A reader for a whole stream, e.g. `rbd export-diff ... -` output:
    /// anything after the end marker is an error.
    pub fn new(inner: R) -> Self {
        Self::with_mode(inner, false)
    }

    /// A reader for a diff stream embedded in a larger one (the diffs of
    /// `rbd export --export-format 2`): it reads nothing past the end marker,
    /// so that [`into_inner`](Self::into_inner) returns `inner` positioned
    /// right after it.
    pub fn embedded(inner: R) -> Self {
        Self::with_mode(inner, true)
    }

    fn with_mode(inner: R, embedded: bool) -> Self {
        DiffReader {
            inner,
            embedded,
            state: State::Banner,
            version: None,
            pos: 0,
            seen_from: false,
            seen_to: false,
            seen_protected: false,
            size: None,
            in_data_section: false,
        }
    }

    /// The stream's version, once the header has been read.
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// The image size from the size record, once it has been read.
    pub fn image_size(&self) -> Option<u64> {
        self.size
    }

    /// Bytes consumed from the underlying reader so far.
    pub fn stream_position(&self) -> u64 {
        self.pos
    }

    /// Inside a data record: the image offset of the next unread byte and
    /// how many bytes of the record are left.
    pub fn pending_data(&self) -> Option<(u64, u64)> {
        match self.state {
            State::Data { next, remaining } if remaining > 0 => Some((next, remaining)),
            _ => None,
        }
    }

    /// Gives back the underlying reader, wherever it stands.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next record: `Some(Header)` first, ..., `Some(End)` exactly once
    /// for a valid stream, then `None` forever. After a [`Record::Data`] all
    /// its bytes must have been read or skipped first; calling this earlier
    /// is a caller bug, reported as an [`Internal`](crate::ErrorKind::Internal)
    /// error that leaves the reader usable.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        match &self.state {
            State::Failed(e) => return Err(e.clone()),
            State::Done => return Ok(None),
            State::Data { next, remaining } if *remaining > 0 => {
                return Err(Error::internal(format!(
                    "rbd diff: next record requested with {remaining} unread bytes of data at image \
                     offset {next}; read them with read_data or skip_data first"
                )));
            }
            _ => {}
        }
        let result = if matches!(self.state, State::Banner) {
            self.read_banner()
        } else {
            self.read_record()
        };
        match result {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// Reads data of the current data record into `buf`: exactly
    /// `min(buf.len(), bytes left in the record)` bytes, so 0 means the
    /// record is done (or there is no current data record). An empty `buf`
    /// while bytes are pending is an [`Internal`](crate::ErrorKind::Internal)
    /// error.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize> {
        let (next, remaining) = match &self.state {
            State::Failed(e) => return Err(e.clone()),
            State::Data { next, remaining } => (*next, *remaining),
            _ => return Ok(0),
        };
        if remaining == 0 {
            return Ok(0);
        }
        if buf.is_empty() {
            return Err(Error::internal("rbd diff: read_data called with an empty buffer"));
        }
        let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let got = match self.read_full(&mut buf[..want]) {
            Ok(got) => got,
            Err(e) => {
                self.state = State::Failed(e.clone());
                return Err(e);
            }
        };
        if got < want {
            let missing = remaining - got as u64;
            let e = Error::data_loss(format!(
                "rbd diff: truncated data record at image offset {}: stream ended {missing} bytes \
                 short (at byte {})",
                next + got as u64,
                self.pos
            ));
            self.state = State::Failed(e.clone());
            return Err(e);
        }
        // `got <= remaining`, and `next + remaining` was checked not to overflow.
        self.state = State::Data {
            next: next + got as u64,
            remaining: remaining - got as u64,
        };
        Ok(got)
    }

    /// Reads and drops the rest of the current data record; returns how many
    /// bytes that was. Memory stays bounded by a small scratch buffer.
    pub fn skip_data(&mut self) -> Result<u64> {
        let mut scratch = [0u8; SKIP_CHUNK];
        let mut skipped = 0u64;
        loop {
            let n = self.read_data(&mut scratch)?;
            if n == 0 {
                return Ok(skipped);
            }
            skipped += n as u64;
        }
    }

    /// Reads until `buf` is full or EOF; returns the number of bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                // `min` guards against a `Read` impl claiming more than it got.
                Ok(n) => {
                    let n = n.min(buf.len() - filled);
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("rbd diff: reading the stream", e)),
            }
        }
        Ok(filled)
    }

    /// Fills `buf` completely or fails with "truncated `what`".
    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let got = self.read_full(buf)?;
        if got < buf.len() {
            return Err(Error::data_loss(format!(
                "rbd diff: truncated {what}: stream ended at byte {}",
                self.pos
            )));
        }
        Ok(())
    }

    fn read_u8(&mut self, what: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    fn read_u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_banner(&mut self) -> Result<Record> {
        let mut b = [0u8; BANNER_LEN];
        let got = self.read_full(&mut b)?;
        let seen = &b[..got];
        let version = if seen == BANNER_V1 {
            Version::V1
        } else if seen == BANNER_V2 {
            Version::V2
        } else if got == 0 {
            return Err(Error::data_loss(
                "rbd diff: empty stream (expected the header \"rbd diff v1\" or \"rbd diff v2\")",
            ));
        } else if got < BANNER_LEN && (BANNER_V1.starts_with(seen) || BANNER_V2.starts_with(seen)) {
            return Err(Error::data_loss(format!(
                "rbd diff: truncated header \"{}\"",
                seen.escape_ascii()
            )));
        } else if seen.starts_with(b"rbd image ") {
            return Err(Error::data_loss(
                "rbd diff: bad header: this is an `rbd export` image stream, not an `rbd export-diff` \
                 diff stream",
            ));
        } else {
            return Err(Error::data_loss(format!(
                "rbd diff: bad header \"{}\" (expected \"rbd diff v1\" or \"rbd diff v2\")",
                seen.escape_ascii()
            )));
        };
        self.version = Some(version);
        self.state = State::Records;
        Ok(Record::Header { version })
    }

    fn read_record(&mut self) -> Result<Record> {
        self.state = State::Records;
        let start = self.pos;
        let mut tag = [0u8; 1];
        if self.read_full(&mut tag)? == 0 {
            return Err(Error::data_loss(format!(
                "rbd diff: stream ended without end marker (at byte {start})"
            )));
        }
        let tag = tag[0];
        let v2 = self.version == Some(Version::V2);
        if tag == TAG_END {
            if !self.embedded {
                let mut extra = [0u8; 1];
                if self.read_full(&mut extra)? != 0 {
                    return Err(Error::data_loss(format!(
                        "rbd diff: trailing data after the end marker (at byte {})",
                        start + 1
                    )));
                }
            }
            self.state = State::Done;
            return Ok(Record::End);
        }
        let name = tag_name(tag, v2).ok_or_else(|| {
            Error::data_loss(format!(
                "rbd diff: unknown record tag 0x{tag:02x} ('{}') at byte {start}",
                [tag].escape_ascii()
            ))
        })?;
        let record_len = if v2 {
            Some(self.read_u64(&format!("length of the {name} record at byte {start}"))?)
        } else {
            None
        };
        let what = |field: &str| format!("{field} of the {name} record at byte {start}");
        let bad_len = |len: u64, expected: &str| {
            Error::data_loss(format!(
                "rbd diff: {name} record at byte {start} has record length {len}, expected {expected}"
            ))
        };
        let is_metadata = matches!(tag, TAG_FROM_SNAP | TAG_TO_SNAP | TAG_PROTECTED | TAG_SIZE);
        if is_metadata {
            if self.in_data_section {
                return Err(Error::data_loss(format!(
                    "rbd diff: {name} record at byte {start} after data records"
                )));
            }
            let duplicate = match tag {
                TAG_FROM_SNAP => std::mem::replace(&mut self.seen_from, true),
                TAG_TO_SNAP => std::mem::replace(&mut self.seen_to, true),
                TAG_PROTECTED => std::mem::replace(&mut self.seen_protected, true),
                _ => self.size.is_some(),
            };
            if duplicate {
                return Err(Error::data_loss(format!(
                    "rbd diff: duplicate {name} record at byte {start}"
                )));
            }
        }
        match tag {
            TAG_FROM_SNAP | TAG_TO_SNAP => {
                let n = self.read_u32(&what("name length"))?;
                if n > MAX_SNAP_NAME_LEN {
                    return Err(Error::data_loss(format!(
                        "rbd diff: {name} record at byte {start}: snapshot name length {n} exceeds \
                         {MAX_SNAP_NAME_LEN}"
                    )));
                }
                if let Some(len) = record_len {
                    if len != 4 + u64::from(n) {
                        return Err(bad_len(len, &format!("4 + name length {n}")));
                    }
                }
                // `n` is at most MAX_SNAP_NAME_LEN: a bounded allocation.
                let mut raw = vec![0u8; n as usize];
                self.read_exact(&mut raw, &what("snapshot name"))?;
                let snap = String::from_utf8(raw).map_err(|e| {
                    Error::data_loss(format!(
                        "rbd diff: {name} record at byte {start}: snapshot name \"{}\" is not UTF-8",
                        e.as_bytes().escape_ascii()
                    ))
                })?;
                Ok(if tag == TAG_FROM_SNAP {
                    Record::FromSnap(snap)
                } else {
                    Record::ToSnap(snap)
                })
            }
            TAG_PROTECTED => {
                // Ceph before 17 (tracker 53243) wrote length 8 for this
                // 1-byte payload; Ceph's own importer reads 1 byte regardless.
                if let Some(len) = record_len {
                    if len != 1 && len != 8 {
                        return Err(bad_len(len, "1"));
                    }
                }
                match self.read_u8(&what("flag"))? {
                    0 => Ok(Record::SnapProtected(false)),
                    1 => Ok(Record::SnapProtected(true)),
                    b => Err(Error::data_loss(format!(
                        "rbd diff: {name} record at byte {start}: flag {b} is neither 0 nor 1"
                    ))),
                }
            }
            TAG_SIZE => {
                if let Some(len) = record_len {
                    if len != 8 {
                        return Err(bad_len(len, "8"));
                    }
                }
                let size = self.read_u64(&what("size"))?;
                self.size = Some(size);
                Ok(Record::Size(size))
            }
            TAG_WRITE | TAG_ZERO => {
                self.in_data_section = true;
                let offset = self.read_u64(&what("offset"))?;
                let len = self.read_u64(&what("length"))?;
                if let Some(record_len) = record_len {
                    let expected = if tag == TAG_WRITE {
                        16u64.checked_add(len)
                    } else {
                        Some(16)
                    };
                    if expected != Some(record_len) {
                        let expected = if tag == TAG_WRITE {
                            format!("16 + data length {len}")
                        } else {
                            "16".into()
                        };
                        return Err(bad_len(record_len, &expected));
                    }
                }
                let end = offset.checked_add(len).ok_or_else(|| {
                    Error::data_loss(format!(
                        "rbd diff: {name} record at byte {start}: extent {offset}+{len} overflows"
                    ))
                })?;
                if let Some(size) = self.size {
                    if end > size {
                        return Err(Error::data_loss(format!(
                            "rbd diff: {name} record at byte {start}: extent {offset}+{len} ends \
                             beyond the image size {size}"
                        )));
                    }
                }
                if tag == TAG_WRITE {
                    self.state = State::Data {
                        next: offset,
                        remaining: len,
                    };
                    Ok(Record::Data { offset, len })
                } else {
                    Ok(Record::Zero { offset, len })
                }
            }
            _ => Err(Error::internal(format!("rbd diff: unhandled tag 0x{tag:02x}"))),
        }
    }
}

/// Name of a known record tag (in messages), `None` for tags the version
/// does not have.
fn tag_name(tag: u8, v2: bool) -> Option<&'static str> {
    Some(match tag {
        TAG_FROM_SNAP => "from-snap",
        TAG_TO_SNAP => "to-snap",
        TAG_SIZE => "size",
        TAG_PROTECTED if v2 => "snap-protection",
        TAG_WRITE => "data",
        TAG_ZERO => "zero",
        TAG_END => "end",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    /// A parsed record with the data of a `Data` record (empty otherwise).
    type Parsed = Vec<(Record, Vec<u8>)>;

    /// Parses a whole stream, reading data in chunks of `chunk` bytes.
    fn parse_with<R: Read>(r: &mut DiffReader<R>, chunk: usize) -> Result<Parsed> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        while let Some(rec) = r.next_record()? {
            let mut data = Vec::new();
            if let Record::Data { len, .. } = rec {
                loop {
                    let left = r.pending_data().map_or(0, |(_, left)| left);
                    let n = r.read_data(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    assert_eq!(n as u64, left.min(chunk as u64), "read_data fills the buffer");
                    data.extend_from_slice(&buf[..n]);
                }
                assert_eq!(data.len() as u64, len);
            }
            out.push((rec, data));
        }
        // None is sticky.
        assert_eq!(r.next_record().unwrap(), None);
        Ok(out)
    }

    fn parse(bytes: &[u8]) -> Result<Parsed> {
        parse_with(&mut DiffReader::new(bytes), 7)
    }

    /// Test-only encoder: the inverse of the parser. `p_len` is the record
    /// length written for a v2 protection record (1, or 8 like Ceph < 17).
    fn encode(records: &Parsed, p_len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut v2 = false;
        for (rec, data) in records {
            let mut payload = Vec::new();
            let tag = match rec {
                Record::Header { version } => {
                    v2 = *version == Version::V2;
                    out.extend_from_slice(if v2 { BANNER_V2 } else { BANNER_V1 });
                    continue;
                }
                Record::End => {
                    out.push(TAG_END);
                    continue;
                }
                Record::FromSnap(s) | Record::ToSnap(s) => {
                    payload.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    payload.extend_from_slice(s.as_bytes());
                    if matches!(rec, Record::FromSnap(_)) {
                        TAG_FROM_SNAP
                    } else {
                        TAG_TO_SNAP
                    }
                }
                Record::SnapProtected(p) => {
                    payload.push(u8::from(*p));
                    TAG_PROTECTED
                }
                Record::Size(s) => {
                    payload.extend_from_slice(&s.to_le_bytes());
                    TAG_SIZE
                }
                Record::Data { offset, len } => {
                    payload.extend_from_slice(&offset.to_le_bytes());
                    payload.extend_from_slice(&len.to_le_bytes());
                    payload.extend_from_slice(data);
                    TAG_WRITE
                }
                Record::Zero { offset, len } => {
                    payload.extend_from_slice(&offset.to_le_bytes());
                    payload.extend_from_slice(&len.to_le_bytes());
                    TAG_ZERO
                }
            };
            out.push(tag);
            if v2 {
                let len = if tag == TAG_PROTECTED {
                    p_len
                } else {
                    payload.len() as u64
                };
                out.extend_from_slice(&len.to_le_bytes());
            }
            out.extend_from_slice(&payload);
        }
        out
    }

    /// Byte builder for hand-made (often malformed) streams.
    struct B(Vec<u8>);
    impl B {
        fn v1() -> Self {
            B(BANNER_V1.to_vec())
        }
        fn v2() -> Self {
            B(BANNER_V2.to_vec())
        }
        fn tag(mut self, t: u8) -> Self {
            self.0.push(t);
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn end(self) -> Vec<u8> {
            self.tag(TAG_END).0
        }
        fn done(self) -> Vec<u8> {
            self.0
        }
    }

    fn rec(r: Record) -> (Record, Vec<u8>) {
        (r, Vec::new())
    }

    fn sample(version: Version) -> Parsed {
        let mut v = vec![
            rec(Record::Header { version }),
            rec(Record::FromSnap("backy-a".into())),
            rec(Record::ToSnap("backy-b".into())),
        ];
        if version == Version::V2 {
            v.push(rec(Record::SnapProtected(true)));
        }
        v.extend([
            rec(Record::Size(1 << 20)),
            (Record::Data { offset: 4096, len: 5 }, b"hello".to_vec()),
            rec(Record::Zero {
                offset: 8192,
                len: 4096,
            }),
            (Record::Data { offset: 0, len: 0 }, Vec::new()),
            (
                Record::Data {
                    offset: (1 << 20) - 3,
                    len: 3,
                },
                b"end".to_vec(),
            ),
            rec(Record::End),
        ]);
        v
    }

    #[test]
    fn round_trip_v1_and_v2() {
        for version in [Version::V1, Version::V2] {
            let records = sample(version);
            let bytes = encode(&records, 1);
            for chunk in [1, 2, 3, 4096] {
                assert_eq!(
                    parse_with(&mut DiffReader::new(&bytes[..]), chunk).unwrap(),
                    records
                );
            }
        }
    }

    #[test]
    fn v1_layout_is_as_documented() {
        let bytes = encode(&sample(Version::V1), 1);
        let expected = B::v1()
            .tag(b'f')
            .u32(7)
            .raw(b"backy-a")
            .tag(b't')
            .u32(7)
            .raw(b"backy-b")
            .tag(b's')
            .u64(1 << 20)
            .tag(b'w')
            .u64(4096)
            .u64(5)
            .raw(b"hello")
            .tag(b'z')
            .u64(8192)
            .u64(4096)
            .tag(b'w')
            .u64(0)
            .u64(0)
            .tag(b'w')
            .u64((1 << 20) - 3)
            .u64(3)
            .raw(b"end")
            .end();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn v2_layout_is_as_documented() {
        let records = vec![
            rec(Record::Header { version: Version::V2 }),
            rec(Record::FromSnap("a".into())),
            rec(Record::ToSnap("bc".into())),
            rec(Record::SnapProtected(false)),
            rec(Record::Size(100)),
            (Record::Data { offset: 10, len: 2 }, b"xy".to_vec()),
            rec(Record::Zero { offset: 20, len: 30 }),
            rec(Record::End),
        ];
        let expected = B::v2()
            .tag(b'f')
            .u64(5)
            .u32(1)
            .raw(b"a")
            .tag(b't')
            .u64(6)
            .u32(2)
            .raw(b"bc")
            .tag(b'p')
            .u64(1)
            .raw(&[0])
            .tag(b's')
            .u64(8)
            .u64(100)
            .tag(b'w')
            .u64(18)
            .u64(10)
            .u64(2)
            .raw(b"xy")
            .tag(b'z')
            .u64(16)
            .u64(20)
            .u64(30)
            .end();
        assert_eq!(encode(&records, 1), expected);
        assert_eq!(parse(&expected).unwrap(), records);
    }

    #[test]
    fn v2_protection_record_with_ceph_16_length_8() {
        let bytes = B::v2().tag(b'p').u64(8).raw(&[1]).tag(b's').u64(8).u64(7).end();
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed[1].0, Record::SnapProtected(true));
        assert_eq!(parsed[2].0, Record::Size(7));
    }

    #[test]
    fn minimal_streams_and_accessors() {
        assert_eq!(
            parse(&B::v1().end()).unwrap(),
            vec![rec(Record::Header { version: Version::V1 }), rec(Record::End)]
        );
        let bytes = B::v2().tag(b's').u64(8).u64(42).end();
        let mut r = DiffReader::new(&bytes[..]);
        assert_eq!(r.version(), None);
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Header { version: Version::V2 })
        );
        assert_eq!(r.version(), Some(Version::V2));
        assert_eq!(r.next_record().unwrap(), Some(Record::Size(42)));
        assert_eq!(r.image_size(), Some(42));
        assert_eq!(r.read_data(&mut [0u8; 4]).unwrap(), 0, "no data record pending");
        assert_eq!(r.next_record().unwrap(), Some(Record::End));
        assert_eq!(r.stream_position(), bytes.len() as u64);
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.next_record().unwrap(), None);
    }

    #[test]
    fn without_size_record_extents_are_only_checked_for_overflow() {
        // What /work/shared/ceph/mkdiff.py-style writers may emit.
        let bytes = B::v1().tag(b'z').u64(u64::MAX - 10).u64(10).end();
        assert_eq!(
            parse(&bytes).unwrap()[1].0,
            Record::Zero {
                offset: u64::MAX - 10,
                len: 10
            }
        );
    }

    #[test]
    fn metadata_order_is_free_before_data() {
        let bytes = B::v1()
            .tag(b's')
            .u64(10)
            .tag(b't')
            .u32(1)
            .raw(b"b")
            .tag(b'f')
            .u32(0)
            .end();
        let recs: Vec<Record> = parse(&bytes).unwrap().into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            recs,
            vec![
                Record::Header { version: Version::V1 },
                Record::Size(10),
                Record::ToSnap("b".into()),
                Record::FromSnap(String::new()),
                Record::End
            ]
        );
    }

    #[test]
    fn misuse_next_record_with_unread_data() {
        let bytes = B::v1().tag(b'w').u64(0).u64(10).raw(b"0123456789").end();
        let mut r = DiffReader::new(&bytes[..]);
        r.next_record().unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Data { offset: 0, len: 10 })
        );
        let mut b = [0u8; 4];
        assert_eq!(r.read_data(&mut b).unwrap(), 4);
        assert_eq!(&b, b"0123");
        assert_eq!(r.pending_data(), Some((4, 6)));
        let e = r.next_record().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("6 unread bytes"), "{}", e.message);
        assert_eq!(r.read_data(&mut []).unwrap_err().kind, ErrorKind::Internal);
        // Not poisoned: the caller can still skip and go on.
        assert_eq!(r.skip_data().unwrap(), 6);
        assert_eq!(r.pending_data(), None);
        assert_eq!(r.next_record().unwrap(), Some(Record::End));
    }

    #[test]
    fn embedded_reader_stops_right_after_the_end_marker() {
        let mut bytes = encode(&sample(Version::V2), 1);
        let n = bytes.len();
        bytes.extend_from_slice(b"NEXT");
        let mut cursor = io::Cursor::new(&bytes[..]);
        let parsed = parse_with(&mut DiffReader::embedded(&mut cursor), 3).unwrap();
        assert_eq!(parsed, sample(Version::V2));
        assert_eq!(cursor.position(), n as u64);
        // The plain reader refuses the same bytes.
        let e = parse(&bytes).unwrap_err();
        assert!(e.message.contains("trailing data"), "{}", e.message);
    }

    #[test]
    fn errors_are_sticky_and_do_not_advance() {
        let bytes = B::v1().tag(b'x').raw(&[0; 100]).done();
        let mut r = DiffReader::new(&bytes[..]);
        r.next_record().unwrap();
        let e1 = r.next_record().unwrap_err();
        let pos = r.stream_position();
        for _ in 0..3 {
            assert_eq!(r.next_record().unwrap_err(), e1);
            assert_eq!(r.read_data(&mut [0u8; 8]).unwrap_err(), e1);
        }
        assert_eq!(r.stream_position(), pos);
    }

    #[test]
    fn io_errors_are_reported_with_context() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("pipe broke"))
            }
        }
        let e = DiffReader::new(Failing).next_record().unwrap_err();
        assert!(e.message.contains("pipe broke"), "{}", e.message);
    }

    /// A reader returning at most a few bytes per call, and `Interrupted`
    /// now and then.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.step += 1;
            if self.step % 5 == 4 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = (self.step % 4 + 1).min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_reads_and_interrupts() {
        let records = sample(Version::V2);
        let bytes = encode(&records, 1);
        let parsed = parse_with(
            &mut DiffReader::new(Trickle {
                data: &bytes,
                step: 0,
            }),
            2,
        )
        .unwrap();
        assert_eq!(parsed, records);
    }

    /// Generates a header, one data record of `len` bytes (byte i = i % 251),
    /// and the end marker, without holding them in memory.
    struct Generated {
        head: Vec<u8>,
        pos: u64,
        len: u64,
    }
    impl Read for Generated {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let head = self.head.len() as u64;
            let total = head + self.len + 1;
            let mut n = 0;
            while n < buf.len() && self.pos < total {
                buf[n] = if self.pos < head {
                    self.head[self.pos as usize]
                } else if self.pos < head + self.len {
                    ((self.pos - head) % 251) as u8
                } else {
                    TAG_END
                };
                n += 1;
                self.pos += 1;
            }
            Ok(n)
        }
    }

    #[test]
    fn large_data_record_streams_in_bounded_chunks() {
        let len = 64u64 << 20;
        let head = B::v2()
            .tag(b's')
            .u64(8)
            .u64(1 << 40)
            .tag(b'w')
            .u64(16 + len)
            .u64(1 << 30)
            .u64(len)
            .done();
        let mut r = DiffReader::new(io::BufReader::new(Generated { head, pos: 0, len }));
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Data { offset: 1 << 30, len })
        );
        let mut buf = vec![0u8; 1 << 20];
        let mut seen = 0u64;
        loop {
            let n = r.read_data(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert_eq!(n, buf.len());
            assert_eq!(buf[0], (seen % 251) as u8);
            seen += n as u64;
        }
        assert_eq!(seen, len);
        assert_eq!(r.next_record().unwrap(), Some(Record::End));
    }

    #[test]
    fn huge_length_fields_do_not_allocate() {
        // A 4 EiB data record that is cut off: reported as truncated, with
        // memory bounded by the caller's buffer.
        let bytes = B::v1().tag(b'w').u64(0).u64(1 << 62).raw(b"abc").done();
        let mut r = DiffReader::new(&bytes[..]);
        r.next_record().unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::Data {
                offset: 0,
                len: 1 << 62
            })
        );
        let mut buf = [0u8; 16];
        let e = r.read_data(&mut buf).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DataLoss);
        assert!(
            e.message.contains("truncated data record at image offset 3"),
            "{}",
            e.message
        );
        let e = DiffReader::new(&bytes[..]).skip_data().map(|_| ());
        assert!(e.is_ok(), "skip_data without a data record is a no-op");
        // A huge snapshot name length is refused before any allocation.
        let bytes = B::v2().tag(b'f').u64(u64::MAX).u32(u32::MAX).done();
        let e = parse(&bytes).unwrap_err();
        assert!(e.message.contains("exceeds 4096"), "{}", e.message);
    }

    #[test]
    fn malformed_streams_are_data_loss() {
        let w = |b: B| b.tag(b'w').u64(0).u64(2).raw(b"ab");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "empty stream"),
            (
                "bad header",
                b"rbd diff v3\ne".to_vec(),
                "bad header \"rbd diff v3\\n\"",
            ),
            (
                "garbage header",
                b"hello, world, this is not".to_vec(),
                "bad header",
            ),
            ("truncated header", b"rbd di".to_vec(), "truncated header"),
            (
                "export image",
                b"rbd image v2\n".to_vec(),
                "`rbd export` image stream",
            ),
            (
                "header only",
                B::v1().done(),
                "stream ended without end marker (at byte 12)",
            ),
            (
                "no end marker",
                B::v1().tag(b's').u64(9).done(),
                "without end marker (at byte 21)",
            ),
            (
                "unknown tag v1",
                B::v1().tag(b'x').end(),
                "unknown record tag 0x78 ('x') at byte 12",
            ),
            (
                "unknown tag v2",
                B::v2().tag(b'x').u64(0).end(),
                "unknown record tag 0x78",
            ),
            (
                "protection in v1",
                B::v1().tag(b'p').raw(&[0]).end(),
                "unknown record tag 0x70",
            ),
            (
                "end tag twice",
                B::v1().tag(b'e').end(),
                "trailing data after the end marker (at byte 13)",
            ),
            (
                "trailing garbage",
                B::v1().end().into_iter().chain(*b"xyz").collect(),
                "trailing data",
            ),
            (
                "name too long",
                B::v1().tag(b'f').u32(4097).done(),
                "name length 4097 exceeds 4096",
            ),
            (
                "name not utf-8",
                B::v1().tag(b't').u32(2).raw(&[0xff, 0xfe]).end(),
                "is not UTF-8",
            ),
            (
                "truncated name",
                B::v1().tag(b't').u32(5).raw(b"ab").done(),
                "truncated snapshot name",
            ),
            (
                "truncated name length",
                B::v1().tag(b'f').raw(&[1, 0]).done(),
                "truncated name length",
            ),
            (
                "truncated size",
                B::v1().tag(b's').raw(&[1, 2, 3]).done(),
                "truncated size of the size",
            ),
            (
                "truncated offset",
                B::v1().tag(b'w').raw(&[1]).done(),
                "truncated offset of the data",
            ),
            (
                "truncated length",
                B::v1().tag(b'z').u64(0).raw(&[1]).done(),
                "truncated length of the zero",
            ),
            (
                "truncated data",
                B::v1().tag(b'w').u64(0).u64(4).raw(b"ab").done(),
                "truncated data record",
            ),
            (
                "truncated v2 length",
                B::v2().tag(b's').raw(&[8, 0]).done(),
                "truncated length of the size",
            ),
            (
                "v2 snap length",
                B::v2().tag(b'f').u64(5).u32(2).raw(b"ab").end(),
                "expected 4 + name length 2",
            ),
            (
                "v2 size length",
                B::v2().tag(b's').u64(9).u64(1).raw(&[0]).end(),
                "record length 9, expected 8",
            ),
            (
                "v2 data length",
                B::v2().tag(b'w').u64(19).u64(0).u64(2).raw(b"abc").end(),
                "16 + data length 2",
            ),
            (
                "v2 data length overflow",
                B::v2().tag(b'w').u64(7).u64(0).u64(u64::MAX - 8).end(),
                "16 + data length",
            ),
            (
                "v2 zero length",
                B::v2().tag(b'z').u64(8).u64(0).u64(1).end(),
                "record length 8, expected 16",
            ),
            (
                "v2 protection length",
                B::v2().tag(b'p').u64(2).raw(&[0, 0]).end(),
                "record length 2, expected 1",
            ),
            (
                "v2 protection value",
                B::v2().tag(b'p').u64(1).raw(&[2]).end(),
                "flag 2 is neither 0 nor 1",
            ),
            (
                "data beyond size",
                w(B::v1().tag(b's').u64(1)).end(),
                "extent 0+2 ends beyond the image size 1",
            ),
            (
                "zero beyond size",
                B::v1().tag(b's').u64(100).tag(b'z').u64(99).u64(2).end(),
                "extent 99+2 ends beyond the image size 100",
            ),
            (
                "extent overflow",
                B::v1().tag(b'z').u64(u64::MAX).u64(1).end(),
                "overflows",
            ),
            (
                "size after data",
                w(B::v1()).tag(b's').u64(10).end(),
                "size record at byte 31 after data",
            ),
            (
                "snap after data",
                B::v1().tag(b'z').u64(0).u64(1).tag(b'f').u32(0).end(),
                "after data records",
            ),
            (
                "duplicate size",
                B::v1().tag(b's').u64(1).tag(b's').u64(1).end(),
                "duplicate size record",
            ),
            (
                "duplicate to-snap",
                B::v1().tag(b't').u32(0).tag(b't').u32(0).end(),
                "duplicate to-snap",
            ),
            (
                "duplicate from-snap",
                B::v1().tag(b'f').u32(0).tag(b'f').u32(0).end(),
                "duplicate from-snap",
            ),
            (
                "duplicate protection",
                B::v2()
                    .tag(b'p')
                    .u64(1)
                    .raw(&[0])
                    .tag(b'p')
                    .u64(1)
                    .raw(&[0])
                    .end(),
                "duplicate snap-protection",
            ),
        ];
        for (name, bytes, expected) in cases {
            let e = match parse(&bytes) {
                Ok(parsed) => panic!("{name}: parsed as {parsed:?}"),
                Err(e) => e,
            };
            assert_eq!(e.kind, ErrorKind::DataLoss, "{name}: {}", e.message);
            assert!(e.message.starts_with("rbd diff: "), "{name}: {}", e.message);
            assert!(
                e.message.contains(expected),
                "{name}: {:?} lacks {expected:?}",
                e.message
            );
        }
    }

    // Real streams from Ceph 16.2.15 (see common/tests/data): an image of
    // 64 MiB, s1 = writes at 0+1024, 5000+300, 4 MiB+2048; s2 = writes at
    // 512+1024, 8 MiB+100 and a discard of 4 MiB+512; then a shrink to
    // 32 MiB and s3 (s2 protected).
    const FULL_S1: &[u8] = include_bytes!("../../tests/data/rbd-full-s1.diff1");
    const S1_S2: &[u8] = include_bytes!("../../tests/data/rbd-s1-s2.diff1");
    const S2_S3: &[u8] = include_bytes!("../../tests/data/rbd-s2-s3-shrink.diff1");
    const EXPORT_V2: &[u8] = include_bytes!("../../tests/data/rbd-export-v2.rbdexport");

    fn records_of(p: &Parsed) -> Vec<Record> {
        p.iter().map(|(r, _)| r.clone()).collect()
    }

    #[test]
    fn real_v1_streams() {
        let v1 = Record::Header { version: Version::V1 };
        let full = parse(FULL_S1).unwrap();
        assert_eq!(
            records_of(&full),
            vec![
                v1.clone(),
                Record::ToSnap("s1".into()),
                Record::Size(64 << 20),
                Record::Data { offset: 0, len: 5300 },
                Record::Data {
                    offset: 4 << 20,
                    len: 2048
                },
                Record::End,
            ]
        );
        // Bytes 1024..5000 were never written: zeros inside the extent.
        assert!(full[3].1[1024..5000].iter().all(|&b| b == 0));
        assert!(full[3].1[..1024].iter().any(|&b| b != 0));

        let inc = parse(S1_S2).unwrap();
        assert_eq!(
            records_of(&inc),
            vec![
                v1.clone(),
                Record::FromSnap("s1".into()),
                Record::ToSnap("s2".into()),
                Record::Size(64 << 20),
                Record::Data {
                    offset: 512,
                    len: 1024
                },
                Record::Zero {
                    offset: 4 << 20,
                    len: 512
                },
                Record::Data {
                    offset: 8 << 20,
                    len: 100
                },
                Record::End,
            ]
        );
        let shrink = parse(S2_S3).unwrap();
        assert_eq!(
            records_of(&shrink),
            vec![
                v1,
                Record::FromSnap("s2".into()),
                Record::ToSnap("s3".into()),
                Record::Size(32 << 20),
                Record::End,
            ]
        );
        // Every strict prefix of a real stream is an error.
        for cut in 0..S1_S2.len() {
            assert_eq!(
                parse(&S1_S2[..cut]).unwrap_err().kind,
                ErrorKind::DataLoss,
                "cut at {cut}"
            );
        }
    }

    /// Splits `rbd export --export-format 2` output (Ceph doc/dev/rbd-export.rst)
    /// into its embedded diff streams, each parsed with `DiffReader::embedded`
    /// and returned with its raw bytes.
    fn diffs_of_export_v2(mut bytes: &[u8]) -> Vec<(Parsed, &[u8])> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
            let (head, rest) = b.split_at(n);
            *b = rest;
            head
        }
        let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
        assert_eq!(take(&mut bytes, 13), b"rbd image v2\n");
        loop {
            let tag = take(&mut bytes, 1)[0];
            if tag == b'E' {
                break;
            }
            let len = le64(take(&mut bytes, 8));
            take(&mut bytes, len as usize);
        }
        assert_eq!(take(&mut bytes, 19), b"rbd image diffs v2\n");
        let count = le64(take(&mut bytes, 8));
        let mut diffs = Vec::new();
        for _ in 0..count {
            let mut r = DiffReader::embedded(bytes);
            let parsed = parse_with(&mut r, 1000).unwrap();
            let raw = take(&mut bytes, r.stream_position() as usize);
            assert_eq!(
                r.into_inner(),
                bytes,
                "the embedded reader stopped right after 'e'"
            );
            diffs.push((parsed, raw));
        }
        assert!(bytes.is_empty());
        diffs
    }

    #[test]
    fn real_v2_streams_match_the_v1_ones() {
        let diffs = diffs_of_export_v2(EXPORT_V2);
        assert_eq!(diffs.len(), 4, "s1, s2, s3 and the head");
        // v2 = v1 plus a protection record after the to-snap record.
        for (i, v1, protected) in [(0, FULL_S1, false), (1, S1_S2, true), (2, S2_S3, false)] {
            let mut expected = parse(v1).unwrap();
            expected[0].0 = Record::Header { version: Version::V2 };
            let to = expected
                .iter()
                .position(|(r, _)| matches!(r, Record::ToSnap(_)))
                .unwrap();
            expected.insert(to + 1, rec(Record::SnapProtected(protected)));
            assert_eq!(diffs[i].0, expected);
        }
        assert_eq!(
            records_of(&diffs[3].0),
            vec![
                Record::Header { version: Version::V2 },
                Record::FromSnap("s3".into()),
                Record::Size(32 << 20),
                Record::End
            ]
        );
        // Byte for byte, with Ceph 16's length 8 in protection records.
        for (parsed, raw) in &diffs {
            assert_eq!(&encode(parsed, 8)[..], *raw);
        }
    }

    // ---- fuzzing ----

    fn snap_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._é-]{0,12}"
    }

    /// Arbitrary valid streams, metadata in any order.
    fn valid_stream() -> impl Strategy<Value = Parsed> {
        let size = prop_oneof![Just(None), (0u64..1 << 20).prop_map(Some), Just(Some(u64::MAX))];
        let extent = (
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..40),
            0u64..1 << 16,
        );
        (
            any::<bool>(),
            proptest::option::of(snap_name()),
            proptest::option::of(snap_name()),
            proptest::option::of(any::<bool>()),
            size,
            proptest::collection::vec(extent, 0..6),
        )
            .prop_flat_map(|(v2, from, to, protected, size, extents)| {
                let mut meta = Vec::new();
                meta.extend(from.map(|s| rec(Record::FromSnap(s))));
                meta.extend(to.map(|s| rec(Record::ToSnap(s))));
                meta.extend(protected.filter(|_| v2).map(|p| rec(Record::SnapProtected(p))));
                meta.extend(size.map(|s| rec(Record::Size(s))));
                let limit = size.unwrap_or(u64::MAX);
                let data: Vec<_> = extents
                    .into_iter()
                    .filter_map(|(zero, raw_off, bytes, zlen)| {
                        let len = if zero { zlen } else { bytes.len() as u64 };
                        let room = limit.checked_sub(len)?;
                        let offset = if room == u64::MAX {
                            raw_off
                        } else {
                            raw_off % (room + 1)
                        };
                        Some(if zero {
                            rec(Record::Zero { offset, len })
                        } else {
                            (Record::Data { offset, len }, bytes)
                        })
                    })
                    .collect();
                let version = if v2 { Version::V2 } else { Version::V1 };
                (Just(meta).prop_shuffle(), Just(data)).prop_map(move |(meta, data)| {
                    let mut all = vec![rec(Record::Header { version })];
                    all.extend(meta);
                    all.extend(data);
                    all.push(rec(Record::End));
                    all
                })
            })
    }

    /// Parses `bytes` with a bound on calls, so a parser that fails to make
    /// progress fails the test instead of hanging it.
    fn parse_bounded(bytes: &[u8]) -> Result<Parsed> {
        let mut r = DiffReader::new(bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 13];
        for _ in 0..=bytes.len() + 2 {
            let Some(rec) = r.next_record()? else {
                return Ok(out);
            };
            let mut data = Vec::new();
            loop {
                let n = r.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((rec, data));
        }
        panic!("parser made no progress");
    }

    proptest! {
        #[test]
        fn round_trips(records in valid_stream(), chunk in 1usize..50, p_len in prop_oneof![Just(1u64), Just(8)]) {
            let bytes = encode(&records, p_len);
            prop_assert_eq!(&parse_with(&mut DiffReader::new(&bytes[..]), chunk).unwrap(), &records);
            let mut trickle = DiffReader::new(Trickle { data: &bytes, step: chunk });
            prop_assert_eq!(&parse_with(&mut trickle, chunk).unwrap(), &records);
        }

        #[test]
        fn arbitrary_bytes_after_a_header_never_panic(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2 { BANNER_V2.to_vec() } else { BANNER_V1.to_vec() };
            bytes.extend_from_slice(&tail);
            if let Err(e) = parse_bounded(&bytes) {
                prop_assert_eq!(e.kind, ErrorKind::DataLoss);
            }
        }

        #[test]
        fn arbitrary_bytes_with_likely_tags_never_panic(
            v2 in any::<bool>(),
            tail in proptest::collection::vec(
                prop_oneof![Just(b'f'), Just(b't'), Just(b's'), Just(b'p'), Just(b'w'), Just(b'z'), Just(b'e'),
                            Just(0u8), Just(1u8), Just(16u8), any::<u8>()],
                0..300),
        ) {
            let mut bytes = if v2 { BANNER_V2.to_vec() } else { BANNER_V1.to_vec() };
            bytes.extend_from_slice(&tail);
            if let Err(e) = parse_bounded(&bytes) {
                prop_assert_eq!(e.kind, ErrorKind::DataLoss);
            }
        }

        #[test]
        fn every_truncation_is_an_error(records in valid_stream()) {
            let bytes = encode(&records, 1);
            for cut in 0..bytes.len() {
                let e = parse_bounded(&bytes[..cut]).unwrap_err();
                prop_assert_eq!(e.kind, ErrorKind::DataLoss, "cut at {}", cut);
            }
        }

        #[test]
        fn flipped_bytes_parse_canonically_or_fail(
            records in valid_stream(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut bytes = encode(&records, 1);
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
            match parse_bounded(&bytes) {
                // Whatever parses is exactly the encoding of what it parsed to.
                Ok(parsed) => prop_assert!(encode(&parsed, 1) == bytes || encode(&parsed, 8) == bytes),
                Err(e) => prop_assert_eq!(e.kind, ErrorKind::DataLoss),
            }
        }

        #[test]
        fn appended_bytes_are_an_error(records in valid_stream(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut bytes = encode(&records, 1);
            bytes.extend_from_slice(&extra);
            prop_assert!(parse_bounded(&bytes).is_err());
        }
    }
}
