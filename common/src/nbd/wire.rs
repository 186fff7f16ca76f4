//! Transmission-phase messages: requests, simple replies and structured
//! reply chunks.
//!
//! ```text
//! request: u32 0x25609513, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
//! simple:  u32 0x67446698, u32 error, u64 cookie
//! chunk:   u32 0x668e33ef, u16 flags, u16 type, u64 cookie, u32 length, payload
//!   OFFSET_DATA (1)       u64 offset, data (length - 8 bytes)
//!   OFFSET_HOLE (2)       u64 offset, u32 hole size
//!   BLOCK_STATUS (5)      u32 context id, then (u32 length, u32 flags) descriptors
//!   ERROR (32769)         u32 error, u16 message length, message
//!   ERROR_OFFSET (32770)  u32 error, u16 message length, message, u64 offset
//! ```
//!
//! A reader takes the 4 magic bytes first ([`reply_magic`]), then the rest
//! of that header, then (chunks only) the payload.

use super::{be16, be32, be64, peer_string, NbdError, Result, MAX_STRING};

pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply after its magic.
pub const SIMPLE_REST_LEN: usize = 12;
/// Bytes of a chunk header after its magic.
pub const CHUNK_REST_LEN: usize = 16;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;
const CHUNK_ERROR_BIT: u16 = 1 << 15;

/// A request (no `NBD_CMD_WRITE`: backy only reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&super::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Which kind of reply message a magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMagic {
    Simple,
    Structured,
}

impl ReplyMagic {
    /// Bytes of the header that follow the magic.
    pub fn rest_len(self) -> usize {
        match self {
            ReplyMagic::Simple => SIMPLE_REST_LEN,
            ReplyMagic::Structured => CHUNK_REST_LEN,
        }
    }
}

pub fn reply_magic(b: &[u8; 4]) -> Result<ReplyMagic> {
    match u32::from_be_bytes(*b) {
        super::SIMPLE_REPLY_MAGIC => Ok(ReplyMagic::Simple),
        super::STRUCTURED_REPLY_MAGIC => Ok(ReplyMagic::Structured),
        other => Err(NbdError::BadMagic {
            what: "reply",
            got: other.into(),
        }),
    }
}

/// A reply message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A simple reply: complete in itself.
    Simple { error: u32, cookie: u64 },
    /// A structured reply chunk: `len` payload bytes follow.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

impl Header {
    pub fn cookie(&self) -> u64 {
        match *self {
            Header::Simple { cookie, .. } | Header::Chunk { cookie, .. } => cookie,
        }
    }

    /// Payload bytes following the header.
    pub fn payload_len(&self) -> u32 {
        match *self {
            Header::Simple { .. } => 0,
            Header::Chunk { len, .. } => len,
        }
    }

    /// Whether this message ends its request's reply.
    pub fn is_done(&self) -> bool {
        match *self {
            Header::Simple { .. } => true,
            Header::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }

    /// Parses the bytes after the magic (`magic.rest_len()` of them).
    pub fn parse(magic: ReplyMagic, rest: &[u8]) -> Result<Header> {
        if rest.len() != magic.rest_len() {
            return Err(NbdError::BadLength {
                what: "reply header",
                expected: magic.rest_len().to_string(),
                got: rest.len() as u64,
            });
        }
        Ok(match magic {
            ReplyMagic::Simple => Header::Simple {
                error: be32(rest, 0),
                cookie: be64(rest, 4),
            },
            ReplyMagic::Structured => Header::Chunk {
                flags: be16(rest, 0),
                kind: be16(rest, 2),
                cookie: be64(rest, 4),
                len: be32(rest, 12),
            },
        })
    }
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    pub flags: u32,
}

/// A parsed reply chunk; data borrows the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    Data {
        offset: u64,
        data: &'a [u8],
    },
    Hole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context: u32,
        descriptors: Vec<Descriptor>,
    },
    /// `ERROR`, `ERROR_OFFSET`, or an unknown type in the error category
    /// (bit 15 set), which the protocol says must fail the request.
    Error {
        code: u32,
        message: String,
        offset: Option<u64>,
    },
}

fn too_short(what: &'static str, min: usize, got: usize) -> NbdError {
    NbdError::BadLength {
        what,
        expected: format!("at least {min}"),
        got: got as u64,
    }
}

/// Parses a chunk's payload. Length bounds are the caller's (see
/// [`super::reply::Pending::payload_limit`]); this checks the payload is
/// consistent in itself.
pub fn parse_chunk(kind: u16, payload: &[u8]) -> Result<Chunk<'_>> {
    let n = payload.len();
    match kind {
        CHUNK_NONE => {
            if n != 0 {
                return Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_NONE",
                    expected: "0".into(),
                    got: n as u64,
                });
            }
            Ok(Chunk::None)
        }
        CHUNK_OFFSET_DATA => {
            // At least one byte of data: every content chunk describes some.
            if n < 9 {
                return Err(too_short("NBD_REPLY_TYPE_OFFSET_DATA", 9, n));
            }
            Ok(Chunk::Data {
                offset: be64(payload, 0),
                data: &payload[8..],
            })
        }
        CHUNK_OFFSET_HOLE => {
            if n != 12 {
                return Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_OFFSET_HOLE",
                    expected: "12".into(),
                    got: n as u64,
                });
            }
            let len = be32(payload, 8);
            if len == 0 {
                return Err(NbdError::BadLength {
                    what: "hole",
                    expected: "at least 1".into(),
                    got: 0,
                });
            }
            Ok(Chunk::Hole {
                offset: be64(payload, 0),
                len,
            })
        }
        CHUNK_BLOCK_STATUS => {
            if n < 12 || !(n - 4).is_multiple_of(8) {
                return Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                    expected: "4 + 8 per descriptor, at least one".into(),
                    got: n as u64,
                });
            }
            let descriptors = payload[4..]
                .chunks_exact(8)
                .map(|d| Descriptor {
                    len: be32(d, 0),
                    flags: be32(d, 4),
                })
                .collect();
            Ok(Chunk::BlockStatus {
                context: be32(payload, 0),
                descriptors,
            })
        }
        k if k & CHUNK_ERROR_BIT != 0 => {
            if n < 6 {
                return Err(too_short("error chunk", 6, n));
            }
            let code = be32(payload, 0);
            let msg_len = usize::from(be16(payload, 4));
            let tail = if k == CHUNK_ERROR_OFFSET { 8 } else { 0 };
            // Unknown error types may carry more after the message.
            let fits = if k == CHUNK_ERROR || k == CHUNK_ERROR_OFFSET {
                6 + msg_len + tail == n
            } else {
                6 + msg_len <= n
            };
            if !fits || msg_len > MAX_STRING {
                return Err(NbdError::BadLength {
                    what: "error chunk",
                    expected: format!("6 + message length {msg_len} + {tail}"),
                    got: n as u64,
                });
            }
            if code == 0 {
                return Err(NbdError::Malformed("error chunk with error value 0".into()));
            }
            let message = peer_string(&payload[6..6 + msg_len]);
            let offset = (k == CHUNK_ERROR_OFFSET).then(|| be64(payload, 6 + msg_len));
            Ok(Chunk::Error {
                code,
                message,
                offset,
            })
        }
        other => Err(NbdError::UnexpectedChunk {
            kind: other,
            command: "any request (unknown chunk type)",
        }),
    }
}

/// The chunk type of `chunk`, for encoding.
fn chunk_kind(chunk: &Chunk<'_>) -> u16 {
    match chunk {
        Chunk::None => CHUNK_NONE,
        Chunk::Data { .. } => CHUNK_OFFSET_DATA,
        Chunk::Hole { .. } => CHUNK_OFFSET_HOLE,
        Chunk::BlockStatus { .. } => CHUNK_BLOCK_STATUS,
        Chunk::Error { offset: None, .. } => CHUNK_ERROR,
        Chunk::Error { offset: Some(_), .. } => CHUNK_ERROR_OFFSET,
    }
}

/// Encodes a whole chunk, header included: the server's side, for tests
/// and fuzzing. Messages longer than the protocol allows are cut.
pub fn encode_chunk(flags: u16, cookie: u64, chunk: &Chunk<'_>) -> Vec<u8> {
    let mut p = Vec::new();
    match chunk {
        Chunk::None => {}
        Chunk::Data { offset, data } => {
            p.extend_from_slice(&offset.to_be_bytes());
            p.extend_from_slice(data);
        }
        Chunk::Hole { offset, len } => {
            p.extend_from_slice(&offset.to_be_bytes());
            p.extend_from_slice(&len.to_be_bytes());
        }
        Chunk::BlockStatus { context, descriptors } => {
            p.extend_from_slice(&context.to_be_bytes());
            for d in descriptors {
                p.extend_from_slice(&d.len.to_be_bytes());
                p.extend_from_slice(&d.flags.to_be_bytes());
            }
        }
        Chunk::Error {
            code,
            message,
            offset,
        } => {
            let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m);
            if let Some(o) = offset {
                p.extend_from_slice(&o.to_be_bytes());
            }
        }
    }
    let mut out = Vec::with_capacity(20 + p.len());
    out.extend_from_slice(&super::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_kind(chunk).to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(p.len() as u32).to_be_bytes());
    out.extend(p);
    out
}

/// Encodes a simple reply (server side, for tests).
pub fn encode_simple(error: u32, cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&super::SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Splits an encoded message into header and chunk, as a reader does.
    fn decode(bytes: &[u8]) -> Result<(Header, Chunk<'_>)> {
        let magic = reply_magic(bytes[..4].try_into().unwrap())?;
        let rest = magic.rest_len();
        let header = Header::parse(magic, &bytes[4..4 + rest])?;
        let payload = &bytes[4 + rest..];
        assert_eq!(payload.len() as u32, header.payload_len());
        match header {
            Header::Chunk { kind, .. } => Ok((header, parse_chunk(kind, payload)?)),
            Header::Simple { .. } => Ok((header, Chunk::None)),
        }
    }

    #[test]
    fn request_layout() {
        let r = Request {
            flags: 4,
            command: CMD_READ,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 32,
            len: 65536,
        };
        let b = r.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0,
                0
            ]
        );
    }

    #[test]
    fn chunk_table() {
        let cases: Vec<(&str, Vec<u8>, u16, Result<Chunk<'static>>)> = vec![
            ("none", vec![], CHUNK_NONE, Ok(Chunk::None)),
            (
                "none with payload",
                vec![0],
                CHUNK_NONE,
                Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_NONE",
                    expected: "0".into(),
                    got: 1,
                }),
            ),
            (
                "data",
                vec![0, 0, 0, 0, 0, 0, 2, 0, 0xaa],
                CHUNK_OFFSET_DATA,
                Ok(Chunk::Data {
                    offset: 512,
                    data: &[0xaa],
                }),
            ),
            (
                "data without bytes",
                vec![0; 8],
                CHUNK_OFFSET_DATA,
                Err(too_short("NBD_REPLY_TYPE_OFFSET_DATA", 9, 8)),
            ),
            (
                "hole",
                vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
                CHUNK_OFFSET_HOLE,
                Ok(Chunk::Hole {
                    offset: 0,
                    len: 65536,
                }),
            ),
            (
                "empty hole",
                vec![0; 12],
                CHUNK_OFFSET_HOLE,
                Err(NbdError::BadLength {
                    what: "hole",
                    expected: "at least 1".into(),
                    got: 0,
                }),
            ),
            (
                "hole too long",
                vec![0; 13],
                CHUNK_OFFSET_HOLE,
                Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_OFFSET_HOLE",
                    expected: "12".into(),
                    got: 13,
                }),
            ),
            (
                "status",
                vec![0, 0, 0, 9, 0, 0, 2, 0, 0, 0, 0, 3],
                CHUNK_BLOCK_STATUS,
                Ok(Chunk::BlockStatus {
                    context: 9,
                    descriptors: vec![Descriptor { len: 512, flags: 3 }],
                }),
            ),
            (
                "status without descriptors",
                vec![0, 0, 0, 9],
                CHUNK_BLOCK_STATUS,
                Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                    expected: "4 + 8 per descriptor, at least one".into(),
                    got: 4,
                }),
            ),
            (
                "status with a partial descriptor",
                vec![0; 15],
                CHUNK_BLOCK_STATUS,
                Err(NbdError::BadLength {
                    what: "NBD_REPLY_TYPE_BLOCK_STATUS",
                    expected: "4 + 8 per descriptor, at least one".into(),
                    got: 15,
                }),
            ),
            (
                "error",
                vec![0, 0, 0, 5, 0, 2, b'n', b'o'],
                CHUNK_ERROR,
                Ok(Chunk::Error {
                    code: 5,
                    message: "no".into(),
                    offset: None,
                }),
            ),
            (
                "error, message overruns",
                vec![0, 0, 0, 5, 0, 3, b'n', b'o'],
                CHUNK_ERROR,
                Err(NbdError::BadLength {
                    what: "error chunk",
                    expected: "6 + message length 3 + 0".into(),
                    got: 8,
                }),
            ),
            (
                "error 0",
                vec![0, 0, 0, 0, 0, 0],
                CHUNK_ERROR,
                Err(NbdError::Malformed("error chunk with error value 0".into())),
            ),
            (
                "error offset",
                vec![0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                CHUNK_ERROR_OFFSET,
                Ok(Chunk::Error {
                    code: 22,
                    message: String::new(),
                    offset: Some(256),
                }),
            ),
            (
                "error offset without offset",
                vec![0, 0, 0, 22, 0, 0],
                CHUNK_ERROR_OFFSET,
                Err(NbdError::BadLength {
                    what: "error chunk",
                    expected: "6 + message length 0 + 8".into(),
                    got: 6,
                }),
            ),
            (
                "unknown error type",
                vec![0, 0, 0, 5, 0, 0, 1, 2, 3],
                0x8077,
                Ok(Chunk::Error {
                    code: 5,
                    message: String::new(),
                    offset: None,
                }),
            ),
            (
                "unknown type",
                vec![],
                3,
                Err(NbdError::UnexpectedChunk {
                    kind: 3,
                    command: "any request (unknown chunk type)",
                }),
            ),
        ];
        for (name, payload, kind, want) in cases {
            assert_eq!(parse_chunk(kind, &payload), want, "{name}");
        }
    }

    #[test]
    fn headers() {
        assert!(matches!(reply_magic(b"HTTP"), Err(NbdError::BadMagic { .. })));
        let b = encode_simple(5, 77);
        let (h, _) = decode(&b).unwrap();
        assert_eq!(h, Header::Simple { error: 5, cookie: 77 });
        assert!(h.is_done());
        let b = encode_chunk(REPLY_FLAG_DONE, 9, &Chunk::None);
        let (h, c) = decode(&b).unwrap();
        assert!(h.is_done() && h.cookie() == 9 && c == Chunk::None);
        assert!(Header::parse(ReplyMagic::Simple, &[0; 16]).is_err());
    }

    fn chunk() -> impl Strategy<Value = (Chunk<'static>, Vec<u8>)> {
        prop_oneof![
            Just((Chunk::None, vec![])),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(offset, data)| { (Chunk::Data { offset, data: &[] }, data) }),
            (any::<u64>(), 1u32..).prop_map(|(offset, len)| (Chunk::Hole { offset, len }, vec![])),
            (
                any::<u32>(),
                proptest::collection::vec((any::<u32>(), any::<u32>()), 1..20)
            )
                .prop_map(|(context, d)| {
                    let descriptors = d
                        .into_iter()
                        .map(|(len, flags)| Descriptor { len, flags })
                        .collect();
                    (Chunk::BlockStatus { context, descriptors }, vec![])
                }),
            (1u32.., "[a-z ]{0,40}", proptest::option::of(any::<u64>())).prop_map(
                |(code, message, offset)| (
                    Chunk::Error {
                        code,
                        message,
                        offset
                    },
                    vec![]
                )
            ),
        ]
    }

    proptest! {
        #[test]
        fn chunks_round_trip(flags in any::<u16>(), cookie in any::<u64>(), (c, data) in chunk()) {
            let c = match c {
                Chunk::Data { offset, .. } => Chunk::Data { offset, data: &data },
                c => c,
            };
            let bytes = encode_chunk(flags, cookie, &c);
            let (h, back) = decode(&bytes).unwrap();
            prop_assert_eq!(h.cookie(), cookie);
            prop_assert_eq!(h.is_done(), flags & REPLY_FLAG_DONE != 0);
            prop_assert_eq!(back, c);
        }

        #[test]
        fn any_payload_parses_or_fails_cleanly(kind in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            // No panic; whatever parses re-encodes to the same payload
            // (unknown error types may carry extra bytes, which are dropped).
            if let Ok(c) = parse_chunk(kind, &payload) {
                let known = [CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS, CHUNK_ERROR, CHUNK_ERROR_OFFSET];
                if known.contains(&kind) {
                    let again = encode_chunk(0, 0, &c);
                    prop_assert_eq!(&again[20..], &payload[..]);
                }
            }
        }
    }
}
