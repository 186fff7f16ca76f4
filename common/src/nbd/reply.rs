//! Requests in flight and the replies that complete them.
//!
//! [`InFlight`] hands out cookies, remembers what each request asked for,
//! and checks every reply message against it before using a byte of it:
//! the cookie must be in flight, the payload length within what such a
//! chunk can need, read data inside the request and not overlapping
//! earlier chunks, block status descriptors consecutive from the request's
//! offset, one chunk per negotiated context. A request completes at the
//! message flagged `NBD_REPLY_FLAG_DONE` (or a simple reply).
//!
//! Two kinds of failure: the outer `Err` of [`InFlight::on_message`] is a
//! protocol violation (drop the connection); an error the server reported
//! for one request (an error chunk) completes only that request, with
//! `Err(NbdError::Server)`, and the connection stays usable.

use std::collections::BTreeMap;

use super::wire::{
    self, Chunk, Header, Request, CHUNK_BLOCK_STATUS, CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE,
    CMD_BLOCK_STATUS, CMD_READ,
};
use super::{NbdError, Result, MAX_STRING};
use crate::ranges::Extent;

/// Most requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Longest read request (each holds a buffer this size until it completes).
pub const MAX_READ_LEN: u32 = 32 << 20;
/// Most descriptors accepted in one block status chunk (QEMU sends at most
/// 2^17, i.e. 1 MiB of them).
pub const MAX_STATUS_DESCRIPTORS: u32 = 1 << 17;
/// Most separate pieces a read reply may arrive in.
pub const MAX_READ_PIECES: usize = 1 << 16;
/// Largest error chunk payload: code, message length, message, offset, and
/// some room for error types not defined yet.
const MAX_ERROR_PAYLOAD: u32 = 6 + MAX_STRING as u32 + 64;

/// A run of the export with one status, in one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

impl StatusExtent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Appends `e` to `out`, joining it to the last extent when they touch and
/// share flags.
pub fn push_merged(out: &mut Vec<StatusExtent>, e: StatusExtent) {
    match out.last_mut() {
        Some(last) if last.end() == e.offset && last.flags == e.flags => last.len += e.len,
        _ => out.push(e),
    }
}

/// The ranges whose flags satisfy `pick`, merged (e.g. the dirty ranges of a
/// bitmap context: `|f| f & STATE_DIRTY != 0`).
pub fn select(extents: &[StatusExtent], pick: impl Fn(u32) -> bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in extents.iter().filter(|e| pick(e.flags)) {
        match out.last_mut() {
            Some(last) if last.end() == e.offset => last.len += e.len,
            _ => out.push(Extent {
                offset: e.offset,
                len: e.len,
            }),
        }
    }
    out
}

/// A completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    Read {
        offset: u64,
        data: Vec<u8>,
    },
    /// Per context, in the order given to [`InFlight::block_status`]: the
    /// extents from the request's offset on; each context's may cover less
    /// than was asked, and contexts may cover different lengths.
    Status {
        offset: u64,
        extents: Vec<Vec<StatusExtent>>,
    },
}

#[derive(Debug)]
struct ReadReply {
    offset: u64,
    buf: Vec<u8>,
    /// Received pieces, relative to `offset`: sorted, disjoint, merged.
    pieces: Vec<(u64, u64)>,
    covered: u64,
}

impl ReadReply {
    /// Records `len` bytes at image offset `at`; returns their index in `buf`.
    fn place(&mut self, what: &'static str, at: u64, len: u64) -> Result<usize> {
        let req_len = self.buf.len() as u64;
        let out_of_range = || NbdError::OutOfRange {
            what,
            offset: at,
            len,
            req_offset: self.offset,
            req_len,
        };
        let start = at.checked_sub(self.offset).ok_or_else(out_of_range)?;
        let end = start.checked_add(len).ok_or_else(out_of_range)?;
        if end > req_len || len == 0 {
            return Err(out_of_range());
        }
        // The first piece ending after `start` must begin at or after `end`.
        let i = self.pieces.partition_point(|&(_, e)| e <= start);
        if self.pieces.get(i).is_some_and(|&(s, _)| s < end) {
            return Err(NbdError::Overlap { offset: at, len });
        }
        let joins_left = i > 0 && self.pieces[i - 1].1 == start;
        let joins_right = self.pieces.get(i).is_some_and(|&(s, _)| s == end);
        match (joins_left, joins_right) {
            (true, true) => {
                self.pieces[i - 1].1 = self.pieces[i].1;
                self.pieces.remove(i);
            }
            (true, false) => self.pieces[i - 1].1 = end,
            (false, true) => self.pieces[i].0 = start,
            (false, false) => {
                if self.pieces.len() >= MAX_READ_PIECES {
                    return Err(NbdError::TooLong {
                        what: "read reply (separate pieces)",
                        len: self.pieces.len() as u64 + 1,
                        max: MAX_READ_PIECES as u64,
                    });
                }
                self.pieces.insert(i, (start, end));
            }
        }
        self.covered += len;
        // `end <= buf.len()`, so both fit in usize.
        Ok(start as usize)
    }

    fn on_chunk(&mut self, chunk: Chunk<'_>) -> Result<()> {
        match chunk {
            Chunk::Data { offset, data } => {
                let at = self.place("read data", offset, data.len() as u64)?;
                self.buf[at..at + data.len()].copy_from_slice(data);
            }
            // The buffer starts zeroed and no other chunk may cover a hole.
            Chunk::Hole { offset, len } => {
                self.place("read hole", offset, len.into())?;
            }
            Chunk::BlockStatus { .. } => {
                return Err(NbdError::UnexpectedChunk {
                    kind: CHUNK_BLOCK_STATUS,
                    command: "NBD_CMD_READ",
                })
            }
            Chunk::None | Chunk::Error { .. } => {}
        }
        Ok(())
    }

    fn finish(self) -> Result<Completed> {
        let len = self.buf.len() as u64;
        if self.covered != len {
            return Err(NbdError::Incomplete {
                offset: self.offset,
                len,
                covered: self.covered,
            });
        }
        Ok(Completed::Read {
            offset: self.offset,
            data: self.buf,
        })
    }
}

#[derive(Debug)]
struct StatusReply {
    offset: u64,
    len: u32,
    /// Context ids asked for, and what came for each.
    contexts: Vec<(u32, Option<Vec<StatusExtent>>)>,
}

impl StatusReply {
    fn on_chunk(&mut self, chunk: Chunk<'_>) -> Result<()> {
        let (context, descriptors) = match chunk {
            Chunk::BlockStatus { context, descriptors } => (context, descriptors),
            Chunk::Data { .. } | Chunk::Hole { .. } => {
                return Err(NbdError::UnexpectedChunk {
                    kind: if matches!(chunk, Chunk::Data { .. }) {
                        CHUNK_OFFSET_DATA
                    } else {
                        CHUNK_OFFSET_HOLE
                    },
                    command: "NBD_CMD_BLOCK_STATUS",
                })
            }
            Chunk::None | Chunk::Error { .. } => return Ok(()),
        };
        let slot = self
            .contexts
            .iter_mut()
            .find(|(id, _)| *id == context)
            .ok_or_else(|| {
                NbdError::Malformed(format!(
                    "block status for context id {context}, which was not asked for"
                ))
            })?;
        if slot.1.is_some() {
            return Err(NbdError::Malformed(format!(
                "block status for context id {context} sent twice"
            )));
        }
        let end = self.offset + u64::from(self.len);
        let mut at = self.offset;
        let mut extents = Vec::new();
        for d in descriptors {
            if d.len == 0 {
                return Err(NbdError::Malformed("block status descriptor of length 0".into()));
            }
            if at >= end {
                return Err(NbdError::OutOfRange {
                    what: "block status descriptor",
                    offset: at,
                    len: d.len.into(),
                    req_offset: self.offset,
                    req_len: self.len.into(),
                });
            }
            // A final descriptor running past the request is cut to it
            // (newer servers may do that; nothing beyond was asked).
            let len = u64::from(d.len).min(end - at);
            push_merged(
                &mut extents,
                StatusExtent {
                    offset: at,
                    len,
                    flags: d.flags,
                },
            );
            at += len;
        }
        slot.1 = Some(extents);
        Ok(())
    }

    fn finish(self) -> Result<Completed> {
        let mut extents = Vec::with_capacity(self.contexts.len());
        for (id, got) in self.contexts {
            extents.push(got.ok_or_else(|| {
                NbdError::Malformed(format!("block status reply without a chunk for context id {id}"))
            })?);
        }
        Ok(Completed::Status {
            offset: self.offset,
            extents,
        })
    }
}

#[derive(Debug)]
enum Kind {
    Read(ReadReply),
    Status(StatusReply),
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// The first error the server reported for this request.
    error: Option<NbdError>,
}

impl Pending {
    fn command(&self) -> &'static str {
        match self.kind {
            Kind::Read(_) => "NBD_CMD_READ",
            Kind::Status(_) => "NBD_CMD_BLOCK_STATUS",
        }
    }

    /// The most payload a chunk of type `kind` can need for this request.
    fn payload_limit(&self, kind: u16) -> Result<u32> {
        let unexpected = || NbdError::UnexpectedChunk {
            kind,
            command: self.command(),
        };
        match (kind, &self.kind) {
            (CHUNK_NONE, _) => Ok(0),
            (CHUNK_OFFSET_DATA, Kind::Read(r)) => Ok(8 + r.buf.len() as u32),
            (CHUNK_OFFSET_HOLE, Kind::Read(_)) => Ok(12),
            (CHUNK_BLOCK_STATUS, Kind::Status(_)) => Ok(4 + 8 * MAX_STATUS_DESCRIPTORS),
            (k, _) if k & (1 << 15) != 0 => Ok(MAX_ERROR_PAYLOAD),
            _ => Err(unexpected()),
        }
    }

    fn finish(self) -> Result<Result<Completed>> {
        let done = match self.kind {
            Kind::Read(r) => r.finish(),
            Kind::Status(s) => s.finish(),
        };
        Ok(match (self.error, done) {
            (Some(e), _) => Err(e),
            (None, Ok(c)) => Ok(c),
            // Claiming success without the data is a protocol violation.
            (None, Err(e)) => return Err(e),
        })
    }
}

/// Requests in flight on one connection (structured replies negotiated).
#[derive(Debug, Default)]
pub struct InFlight {
    pending: BTreeMap<u64, Pending>,
    next_cookie: u64,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn add(&mut self, kind: Kind) -> Result<u64> {
        if self.pending.len() >= MAX_IN_FLIGHT {
            return Err(NbdError::InvalidRequest(format!(
                "more than {MAX_IN_FLIGHT} requests in flight"
            )));
        }
        // Cookies count up; one still in flight after 2^64 others is skipped.
        while self.pending.contains_key(&self.next_cookie) {
            self.next_cookie = self.next_cookie.wrapping_add(1);
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        self.pending.insert(cookie, Pending { kind, error: None });
        Ok(cookie)
    }

    fn check_range(offset: u64, len: u32, size: u64) -> Result<()> {
        if len == 0 || offset.checked_add(len.into()).is_none_or(|end| end > size) {
            return Err(NbdError::InvalidRequest(format!(
                "{len} bytes at {offset} are not inside the export of {size} bytes"
            )));
        }
        Ok(())
    }

    /// A read of `len` bytes at `offset` of an export of `size` bytes.
    pub fn read(&mut self, offset: u64, len: u32, size: u64) -> Result<Request> {
        Self::check_range(offset, len, size)?;
        if len > MAX_READ_LEN {
            return Err(NbdError::InvalidRequest(format!(
                "reads are at most {MAX_READ_LEN} bytes"
            )));
        }
        let cookie = self.add(Kind::Read(ReadReply {
            offset,
            buf: vec![0; len as usize],
            pieces: Vec::new(),
            covered: 0,
        }))?;
        Ok(Request {
            flags: 0,
            command: CMD_READ,
            cookie,
            offset,
            len,
        })
    }

    /// A block status query for `len` bytes at `offset`, answered for each
    /// of the negotiated context ids `contexts`.
    pub fn block_status(&mut self, offset: u64, len: u32, size: u64, contexts: &[u32]) -> Result<Request> {
        Self::check_range(offset, len, size)?;
        if contexts.is_empty() {
            return Err(NbdError::InvalidRequest(
                "block status without metadata contexts".into(),
            ));
        }
        let cookie = self.add(Kind::Status(StatusReply {
            offset,
            len,
            contexts: contexts.iter().map(|&id| (id, None)).collect(),
        }))?;
        Ok(Request {
            flags: 0,
            command: CMD_BLOCK_STATUS,
            cookie,
            offset,
            len,
        })
    }

    /// How many payload bytes follow `header`: checked against what its
    /// request can need, before the caller reads (or allocates for) them.
    pub fn payload_len(&self, header: &Header) -> Result<usize> {
        let cookie = header.cookie();
        let pending = self.pending.get(&cookie).ok_or(NbdError::UnknownCookie(cookie))?;
        match *header {
            Header::Simple { .. } => Ok(0),
            Header::Chunk { kind, len, .. } => {
                let max = pending.payload_limit(kind)?;
                if len > max {
                    return Err(NbdError::TooLong {
                        what: "reply chunk",
                        len: len.into(),
                        max: max.into(),
                    });
                }
                Ok(len as usize)
            }
        }
    }

    /// Takes one reply message (its header and exactly the payload
    /// [`payload_len`](Self::payload_len) allowed). Returns the request it
    /// completed, if it did, with its outcome.
    pub fn on_message(
        &mut self,
        header: &Header,
        payload: &[u8],
    ) -> Result<Option<(u64, Result<Completed>)>> {
        let cookie = header.cookie();
        let want = self.payload_len(header)?;
        if payload.len() != want {
            return Err(NbdError::BadLength {
                what: "reply payload",
                expected: want.to_string(),
                got: payload.len() as u64,
            });
        }
        let pending = self
            .pending
            .get_mut(&cookie)
            .ok_or(NbdError::UnknownCookie(cookie))?;
        match *header {
            Header::Simple { error, .. } => {
                // With structured replies a simple one can only carry an
                // error: a successful one would have no data or status.
                if error == 0 {
                    return Err(NbdError::UnexpectedChunk {
                        kind: 0,
                        command: "a simple reply of success (structured replies were negotiated)",
                    });
                }
                pending.error.get_or_insert(NbdError::Server {
                    code: error,
                    message: String::new(),
                    offset: None,
                });
            }
            Header::Chunk { kind, flags, .. } => {
                let chunk = wire::parse_chunk(kind, payload)?;
                if chunk == Chunk::None && flags & wire::REPLY_FLAG_DONE == 0 {
                    return Err(NbdError::Malformed(
                        "NBD_REPLY_TYPE_NONE without the done flag".into(),
                    ));
                }
                if let Chunk::Error {
                    code,
                    message,
                    offset,
                } = &chunk
                {
                    if let (Some(o), Kind::Read(r)) = (offset, &pending.kind) {
                        if *o < r.offset || *o - r.offset >= r.buf.len() as u64 {
                            return Err(NbdError::OutOfRange {
                                what: "error offset",
                                offset: *o,
                                len: 0,
                                req_offset: r.offset,
                                req_len: r.buf.len() as u64,
                            });
                        }
                    }
                    pending.error.get_or_insert(NbdError::Server {
                        code: *code,
                        message: message.clone(),
                        offset: *offset,
                    });
                }
                match &mut pending.kind {
                    Kind::Read(r) => r.on_chunk(chunk)?,
                    Kind::Status(s) => s.on_chunk(chunk)?,
                }
            }
        }
        if !header.is_done() {
            return Ok(None);
        }
        let pending = self
            .pending
            .remove(&cookie)
            .ok_or(NbdError::UnknownCookie(cookie))?;
        Ok(Some((cookie, pending.finish()?)))
    }
}

/// Walks a whole export with block status queries of at most `max_len`
/// bytes, joining the replies per context. Replies may cover less than
/// asked, and contexts different lengths: each step advances to where the
/// shortest context's answer ends, cutting the others there (the next
/// query asks again from that point).
#[derive(Debug)]
pub struct StatusWalk {
    size: u64,
    next: u64,
    max_len: u32,
    extents: Vec<Vec<StatusExtent>>,
}

impl StatusWalk {
    /// `max_len` must be positive; it is rounded down to `align` (the
    /// export's minimum block size) when that leaves something.
    pub fn new(size: u64, contexts: usize, max_len: u32, align: u32) -> Self {
        let align = align.max(1);
        let rounded = max_len / align * align;
        StatusWalk {
            size,
            next: 0,
            max_len: if rounded > 0 { rounded } else { max_len.max(1) },
            extents: vec![Vec::new(); contexts],
        }
    }

    /// The next query, `None` when the export is covered.
    pub fn next_request(&self) -> Option<(u64, u32)> {
        let left = self.size - self.next;
        (left > 0).then(|| (self.next, left.min(u64::from(self.max_len)) as u32))
    }

    /// Takes the reply to the query at `offset` (from [`Completed::Status`]).
    pub fn add(&mut self, offset: u64, replies: Vec<Vec<StatusExtent>>) -> Result<()> {
        if offset != self.next || replies.len() != self.extents.len() {
            return Err(NbdError::InvalidRequest(format!(
                "block status walk: reply at {offset} for {} contexts, expected {} at {}",
                replies.len(),
                self.extents.len(),
                self.next
            )));
        }
        let reach = replies
            .iter()
            .map(|r| r.last().map_or(offset, StatusExtent::end))
            .min()
            .unwrap_or(offset);
        if reach <= offset {
            return Err(NbdError::Malformed(format!(
                "block status at {offset} made no progress"
            )));
        }
        for (out, reply) in self.extents.iter_mut().zip(replies) {
            for e in reply {
                if e.offset >= reach {
                    break;
                }
                let len = e.len.min(reach - e.offset);
                push_merged(out, StatusExtent { len, ..e });
            }
        }
        self.next = reach;
        Ok(())
    }

    /// Per context, extents covering the whole export in order.
    pub fn finish(self) -> Vec<Vec<StatusExtent>> {
        self.extents
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{encode_chunk, encode_simple, reply_magic, Descriptor, REPLY_FLAG_DONE};
    use proptest::prelude::*;

    type Outcome = Option<(u64, Result<Completed>)>;

    /// Feeds encoded messages as a transport would.
    fn feed(f: &mut InFlight, bytes: &[u8]) -> Result<Vec<Outcome>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let magic = reply_magic(bytes[at..at + 4].try_into().unwrap())?;
            let rest = magic.rest_len();
            let header = Header::parse(magic, &bytes[at + 4..at + 4 + rest])?;
            at += 4 + rest;
            let n = f.payload_len(&header)?;
            out.push(f.on_message(&header, &bytes[at..at + n])?);
            at += n;
        }
        Ok(out)
    }

    fn data(offset: u64, data: &[u8]) -> Chunk<'_> {
        Chunk::Data { offset, data }
    }

    #[test]
    fn read_in_pieces_in_any_order() {
        let mut f = InFlight::new();
        let r = f.read(1024, 1024, 4096).unwrap();
        let mut bytes = encode_chunk(0, r.cookie, &data(1536, &[2; 512]));
        bytes.extend(encode_chunk(
            0,
            r.cookie,
            &Chunk::Hole {
                offset: 1280,
                len: 256,
            },
        ));
        bytes.extend(encode_chunk(REPLY_FLAG_DONE, r.cookie, &data(1024, &[1; 256])));
        let out = feed(&mut f, &bytes).unwrap();
        let mut want = vec![1; 256];
        want.extend([0; 256]);
        want.extend([2; 512]);
        assert_eq!(
            out[2],
            Some((
                r.cookie,
                Ok(Completed::Read {
                    offset: 1024,
                    data: want
                })
            ))
        );
        assert!(out[..2].iter().all(Option::is_none) && f.is_empty());
    }

    #[test]
    fn malformed_read_replies() {
        let done = REPLY_FLAG_DONE;
        type Case = (&'static str, Vec<(u16, Chunk<'static>)>);
        let cases: Vec<Case> = vec![
            ("before the request", vec![(done, data(1023, &[0; 2]))]),
            ("after the request", vec![(done, data(2047, &[0; 2]))]),
            (
                "offset wraps",
                vec![(
                    done,
                    Chunk::Hole {
                        offset: u64::MAX,
                        len: 2,
                    },
                )],
            ),
            (
                "overlap",
                vec![(0, data(1024, &[0; 512])), (done, data(1535, &[0; 513]))],
            ),
            (
                "same hole twice",
                vec![
                    (
                        0,
                        Chunk::Hole {
                            offset: 1024,
                            len: 512,
                        },
                    ),
                    (
                        done,
                        Chunk::Hole {
                            offset: 1024,
                            len: 512,
                        },
                    ),
                ],
            ),
            (
                "incomplete",
                vec![(0, data(1024, &[0; 512])), (done, Chunk::None)],
            ),
            ("nothing", vec![(done, Chunk::None)]),
            (
                "status for a read",
                vec![(
                    done,
                    Chunk::BlockStatus {
                        context: 1,
                        descriptors: vec![Descriptor { len: 1024, flags: 0 }],
                    },
                )],
            ),
            ("none without done", vec![(0, Chunk::None)]),
            (
                "error offset outside",
                vec![(
                    done,
                    Chunk::Error {
                        code: 5,
                        message: String::new(),
                        offset: Some(0),
                    },
                )],
            ),
        ];
        for (name, chunks) in cases {
            let mut f = InFlight::new();
            let r = f.read(1024, 1024, 4096).unwrap();
            let bytes: Vec<u8> = chunks
                .iter()
                .flat_map(|(fl, c)| encode_chunk(*fl, r.cookie, c))
                .collect();
            assert!(feed(&mut f, &bytes).is_err(), "{name}");
        }
    }

    #[test]
    fn unknown_cookies_and_oversized_payloads_are_refused_before_reading() {
        let mut f = InFlight::new();
        let r = f.read(0, 512, 512).unwrap();
        let h = Header::Chunk {
            flags: 1,
            kind: CHUNK_OFFSET_DATA,
            cookie: r.cookie + 1,
            len: 520,
        };
        assert_eq!(f.payload_len(&h), Err(NbdError::UnknownCookie(r.cookie + 1)));
        let h = Header::Chunk {
            flags: 1,
            kind: CHUNK_OFFSET_DATA,
            cookie: r.cookie,
            len: 521,
        };
        assert!(matches!(f.payload_len(&h), Err(NbdError::TooLong { .. })));
        let h = Header::Chunk {
            flags: 1,
            kind: 0x8001,
            cookie: r.cookie,
            len: u32::MAX,
        };
        assert!(matches!(f.payload_len(&h), Err(NbdError::TooLong { .. })));
        let h = Header::Chunk {
            flags: 1,
            kind: 42,
            cookie: r.cookie,
            len: 0,
        };
        assert!(matches!(f.payload_len(&h), Err(NbdError::UnexpectedChunk { .. })));
        // Requests the client must not make.
        assert!(f.read(0, 513, 512).is_err());
        assert!(f.read(u64::MAX, 1, u64::MAX).is_err());
        assert!(f.read(0, 0, 512).is_err());
        assert!(f.read(0, MAX_READ_LEN + 1, u64::MAX).is_err());
        for _ in 1..MAX_IN_FLIGHT {
            f.read(0, 1, 512).unwrap();
        }
        assert!(f.read(0, 1, 512).is_err());
    }

    #[test]
    fn server_errors_complete_only_their_request() {
        let mut f = InFlight::new();
        let a = f.read(0, 512, 4096).unwrap();
        let b = f.read(512, 512, 4096).unwrap();
        let mut bytes = encode_chunk(
            0,
            a.cookie,
            &Chunk::Error {
                code: 5,
                message: "bad sector".into(),
                offset: Some(100),
            },
        );
        bytes.extend(encode_chunk(REPLY_FLAG_DONE, b.cookie, &data(512, &[7; 512])));
        bytes.extend(encode_chunk(REPLY_FLAG_DONE, a.cookie, &Chunk::None));
        let out = feed(&mut f, &bytes).unwrap();
        assert!(matches!(&out[1], Some((c, Ok(Completed::Read { .. }))) if *c == b.cookie));
        let (c, res) = out[2].clone().unwrap();
        assert_eq!(c, a.cookie);
        let e = res.unwrap_err();
        assert_eq!(
            e,
            NbdError::Server {
                code: 5,
                message: "bad sector".into(),
                offset: Some(100)
            }
        );
        assert!(e.to_string().contains("EIO"));
        // A simple reply can carry an error, never success.
        let r = f.read(0, 512, 4096).unwrap();
        let out = feed(&mut f, &encode_simple(22, r.cookie)).unwrap();
        assert!(matches!(
            &out[0],
            Some((_, Err(NbdError::Server { code: 22, .. })))
        ));
        let r = f.read(0, 512, 4096).unwrap();
        assert!(feed(&mut f, &encode_simple(0, r.cookie)).is_err());
    }

    fn status(context: u32, lens: &[(u32, u32)]) -> Chunk<'static> {
        Chunk::BlockStatus {
            context,
            descriptors: lens
                .iter()
                .map(|&(len, flags)| Descriptor { len, flags })
                .collect(),
        }
    }

    #[test]
    fn block_status_table() {
        let ext = |offset, len, flags| StatusExtent { offset, len, flags };
        type Case = (
            &'static str,
            Vec<(u16, Chunk<'static>)>,
            Option<Vec<Vec<StatusExtent>>>,
        );
        let done = REPLY_FLAG_DONE;
        let cases: Vec<Case> = vec![
            (
                "two contexts, merged runs",
                vec![
                    (0, status(2, &[(512, 1), (512, 1), (1024, 0)])),
                    (done, status(1, &[(4096, 3)])),
                ],
                Some(vec![
                    vec![ext(4096, 4096, 3)],
                    vec![ext(4096, 1024, 1), ext(5120, 1024, 0)],
                ]),
            ),
            (
                "final descriptor past the request is cut",
                vec![
                    (0, status(1, &[(8192, 0)])),
                    (0, status(2, &[(512, 1)])),
                    (done, Chunk::None),
                ],
                Some(vec![vec![ext(4096, 4096, 0)], vec![ext(4096, 512, 1)]]),
            ),
            (
                "descriptor after the end",
                vec![(0, status(1, &[(4096, 0), (1, 0)])), (done, status(2, &[(1, 0)]))],
                None,
            ),
            (
                "zero length",
                vec![(0, status(1, &[(0, 0)])), (done, status(2, &[(1, 0)]))],
                None,
            ),
            ("unknown context", vec![(done, status(3, &[(1, 0)]))], None),
            (
                "context twice",
                vec![(0, status(1, &[(1, 0)])), (done, status(1, &[(1, 0)]))],
                None,
            ),
            ("context missing", vec![(done, status(1, &[(1, 0)]))], None),
            ("data for status", vec![(done, data(4096, &[0]))], None),
        ];
        for (name, chunks, want) in cases {
            let mut f = InFlight::new();
            let r = f.block_status(4096, 4096, 1 << 20, &[1, 2]).unwrap();
            let bytes: Vec<u8> = chunks
                .iter()
                .flat_map(|(fl, c)| encode_chunk(*fl, r.cookie, c))
                .collect();
            match (feed(&mut f, &bytes), want) {
                (Ok(out), Some(want)) => assert_eq!(
                    out.last().cloned().flatten(),
                    Some((
                        r.cookie,
                        Ok(Completed::Status {
                            offset: 4096,
                            extents: want
                        })
                    )),
                    "{name}"
                ),
                (Err(_), None) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn status_walk_advances_to_the_shortest_answer() {
        let ext = |offset, len, flags| StatusExtent { offset, len, flags };
        let mut w = StatusWalk::new(10_000, 2, 4096 + 100, 512);
        assert_eq!(w.next_request(), Some((0, 4096)));
        w.add(0, vec![vec![ext(0, 4096, 0)], vec![ext(0, 1024, 1)]])
            .unwrap();
        assert_eq!(w.next_request(), Some((1024, 4096)));
        assert!(w.add(0, vec![vec![], vec![]]).is_err());
        assert!(w.add(1024, vec![vec![], vec![ext(1024, 1, 0)]]).is_err());
        w.add(1024, vec![vec![ext(1024, 4096, 0)], vec![ext(1024, 4096, 1)]])
            .unwrap();
        w.add(5120, vec![vec![ext(5120, 4880, 2)], vec![ext(5120, 4880, 0)]])
            .unwrap();
        assert_eq!(w.next_request(), None);
        assert_eq!(
            w.finish(),
            vec![
                vec![ext(0, 5120, 0), ext(5120, 4880, 2)],
                vec![ext(0, 5120, 1), ext(5120, 4880, 0)]
            ]
        );
        let dirty = [ext(0, 10, 1), ext(10, 5, 1), ext(15, 5, 0), ext(20, 1, 1)];
        assert_eq!(
            select(&dirty, |f| f & 1 != 0),
            vec![Extent { offset: 0, len: 15 }, Extent { offset: 20, len: 1 }]
        );
    }

    proptest! {
        /// Any split of a read into data and hole chunks, sent in any order,
        /// reassembles to the right bytes; duplicating a chunk is refused.
        #[test]
        fn reads_reassemble(
            cuts in proptest::collection::btree_set(1u32..4096, 0..20),
            holes in any::<u32>(),
            order in any::<prop::sample::Index>(),
            dup in any::<Option<prop::sample::Index>>(),
        ) {
            let base = 8192u64;
            let image: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
            let mut bounds = vec![0u32];
            bounds.extend(cuts.iter().copied());
            bounds.push(4096);
            let mut want = image.clone();
            let mut chunks: Vec<Chunk<'_>> = Vec::new();
            for (i, w) in bounds.windows(2).enumerate() {
                let (s, e) = (w[0], w[1]);
                if holes >> (i % 32) & 1 == 1 {
                    want[s as usize..e as usize].fill(0);
                    chunks.push(Chunk::Hole { offset: base + u64::from(s), len: e - s });
                } else {
                    chunks.push(Chunk::Data { offset: base + u64::from(s), data: &image[s as usize..e as usize] });
                }
            }
            let n = chunks.len();
            chunks.rotate_left(order.index(n));
            if let Some(d) = dup {
                let c = chunks[d.index(n)].clone();
                chunks.push(c);
            }
            let mut f = InFlight::new();
            let r = f.read(base, 4096, 1 << 20).unwrap();
            let total = chunks.len();
            let bytes: Vec<u8> = chunks.iter().enumerate()
                .flat_map(|(i, c)| encode_chunk(if i + 1 == total { REPLY_FLAG_DONE } else { 0 }, r.cookie, c))
                .collect();
            match feed(&mut f, &bytes) {
                Ok(out) => {
                    prop_assert!(dup.is_none());
                    prop_assert_eq!(out.last().cloned().flatten(), Some((r.cookie, Ok(Completed::Read { offset: base, data: want }))));
                }
                Err(e) => {
                    prop_assert!(dup.is_some());
                    prop_assert!(matches!(e, NbdError::Overlap { .. }), "{:?}", e);
                }
            }
        }

        /// Random headers and payloads never panic, and whatever completes
        /// stays inside what was asked.
        #[test]
        fn random_messages_never_panic(
            msgs in proptest::collection::vec((any::<bool>(), any::<u16>(), 0u16..8, 0u64..3, proptest::collection::vec(any::<u8>(), 0..64)), 0..12),
        ) {
            let mut f = InFlight::new();
            f.read(100, 40, 1000).unwrap();
            f.block_status(0, 1000, 1000, &[0, 1]).unwrap();
            for (simple, flags, kind, cookie, payload) in msgs {
                let header = if simple {
                    Header::Simple { error: u32::from(flags), cookie }
                } else {
                    let kind = if kind >= 6 { 0x8000 | kind } else { kind };
                    Header::Chunk { flags, kind, cookie, len: payload.len() as u32 }
                };
                if f.payload_len(&header).is_err() {
                    continue;
                }
                match f.on_message(&header, &payload) {
                    Ok(Some((_, Ok(Completed::Read { offset, data })))) => {
                        prop_assert_eq!((offset, data.len()), (100, 40));
                    }
                    Ok(Some((_, Ok(Completed::Status { extents, .. })))) => {
                        for e in extents.iter().flatten() {
                            prop_assert!(e.end() <= 1000 && e.len > 0);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
