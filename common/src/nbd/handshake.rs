//! Fixed-newstyle handshake: the greeting, option requests and their
//! replies, for the options a backup reader needs:
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_GO`.
//!
//! ```text
//! S: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags
//! C: u32 client flags
//! C: u64 IHAVEOPT, u32 option, u32 length, data          (each option)
//! S: u64 reply magic, u32 option, u32 reply type, u32 length, data
//! ```

use super::{be16, be32, be64, peer_string, NbdError, Result, IHAVEOPT, MAX_STRING, NBDMAGIC};

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option reply's header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option reply payload accepted: a string plus a little framing
/// (no reply to the options sent here carries more).
pub const MAX_OPTION_REPLY: u32 = MAX_STRING as u32 + 64;
/// Most replies accepted for one option (meta contexts and infos).
pub const MAX_OPTION_REPLIES: usize = 64;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;

/// An option's name, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

fn reply_error_name(reply: u32) -> String {
    let name = match reply {
        0x8000_0001 => "NBD_REP_ERR_UNSUP",
        0x8000_0002 => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD",
        0x8000_0006 => "NBD_REP_ERR_UNKNOWN (no such export)",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return format!("error 0x{reply:08x}"),
    };
    name.to_string()
}

/// What the greeting says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// The server skips the 124 zero bytes of old-style export replies.
    pub no_zeroes: bool,
}

/// Checks the greeting; only fixed-newstyle servers are accepted.
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<Greeting> {
    let magic = be64(b, 0);
    if magic != NBDMAGIC {
        return Err(NbdError::BadMagic {
            what: "greeting",
            got: magic,
        });
    }
    let opt = be64(b, 8);
    if opt != IHAVEOPT {
        // Also what an old-style server (size and flags right away) sends.
        return Err(NbdError::BadMagic {
            what: "greeting (oldstyle servers are not supported)",
            got: opt,
        });
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle);
    }
    Ok(Greeting {
        no_zeroes: flags & FLAG_NO_ZEROES != 0,
    })
}

/// The client flags answering `greeting`.
pub fn client_flags(greeting: Greeting) -> [u8; 4] {
    let mut flags = u32::from(FLAG_FIXED_NEWSTYLE);
    if greeting.no_zeroes {
        flags |= u32::from(FLAG_NO_ZEROES);
    }
    flags.to_be_bytes()
}

fn check_string(what: &'static str, s: &str) -> Result<()> {
    if s.len() > MAX_STRING || s.contains('\0') {
        return Err(NbdError::InvalidRequest(format!(
            "{what} must be at most {MAX_STRING} bytes without NUL"
        )));
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An option request with its data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_OPT_SET_META_CONTEXT` for `export`, asking for `queries`.
pub fn set_meta_context(export: &str, queries: &[&str]) -> Result<Vec<u8>> {
    check_string("export name", export)?;
    if queries.len() > MAX_OPTION_REPLIES {
        return Err(NbdError::InvalidRequest(format!(
            "at most {MAX_OPTION_REPLIES} metadata contexts"
        )));
    }
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        check_string("metadata context", q)?;
        put_string(&mut data, q);
    }
    Ok(encode_option(OPT_SET_META_CONTEXT, &data))
}

/// `NBD_OPT_GO` for `export`, asking for its block size constraints too
/// (which the client then obeys).
pub fn go(export: &str) -> Result<Vec<u8>> {
    check_string("export name", export)?;
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    Ok(encode_option(OPT_GO, &data))
}

/// An option reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    /// Payload bytes that follow; at most [`MAX_OPTION_REPLY`].
    pub len: u32,
}

/// Checks an option reply's header against the option that was `sent`.
pub fn parse_option_reply_header(b: &[u8; OPTION_REPLY_HEADER_LEN], sent: u32) -> Result<OptionReplyHeader> {
    let magic = be64(b, 0);
    if magic != super::OPTION_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            what: "option reply",
            got: magic,
        });
    }
    let option = be32(b, 8);
    if option != sent {
        return Err(NbdError::OptionMismatch { sent, got: option });
    }
    let len = be32(b, 16);
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::TooLong {
            what: "option reply",
            len: len.into(),
            max: MAX_OPTION_REPLY.into(),
        });
    }
    Ok(OptionReplyHeader {
        option,
        reply: be32(b, 12),
        len,
    })
}

/// Information about the export, from `NBD_REP_INFO` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export { size: u64, flags: u16 },
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// Something not asked for; ignored.
    Other(u16),
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Info(Info),
    MetaContext { id: u32, name: String },
}

/// Parses an option reply's payload (exactly `header.len` bytes). Error
/// replies become [`NbdError::OptionRefused`].
pub fn parse_option_reply(header: &OptionReplyHeader, payload: &[u8]) -> Result<OptionReply> {
    let option = option_name(header.option);
    if payload.len() as u64 != u64::from(header.len) {
        return Err(NbdError::BadLength {
            what: "option reply payload",
            expected: header.len.to_string(),
            got: payload.len() as u64,
        });
    }
    let exact = |n: usize, what: &'static str| {
        if payload.len() == n {
            Ok(())
        } else {
            Err(NbdError::BadLength {
                what,
                expected: n.to_string(),
                got: payload.len() as u64,
            })
        }
    };
    if header.reply & REP_ERROR_BIT != 0 {
        return Err(NbdError::OptionRefused {
            option,
            reply: reply_error_name(header.reply),
            message: peer_string(payload),
        });
    }
    match header.reply {
        REP_ACK => {
            exact(0, "NBD_REP_ACK")?;
            Ok(OptionReply::Ack)
        }
        REP_INFO if header.option == OPT_GO => {
            if payload.len() < 2 {
                return Err(NbdError::BadLength {
                    what: "NBD_REP_INFO",
                    expected: "at least 2".into(),
                    got: payload.len() as u64,
                });
            }
            let info = match be16(payload, 0) {
                INFO_EXPORT => {
                    exact(12, "NBD_INFO_EXPORT")?;
                    Info::Export {
                        size: be64(payload, 2),
                        flags: be16(payload, 10),
                    }
                }
                INFO_BLOCK_SIZE => {
                    exact(14, "NBD_INFO_BLOCK_SIZE")?;
                    Info::BlockSize {
                        min: be32(payload, 2),
                        preferred: be32(payload, 6),
                        max: be32(payload, 10),
                    }
                }
                other => Info::Other(other),
            };
            Ok(OptionReply::Info(info))
        }
        REP_META_CONTEXT if header.option == OPT_SET_META_CONTEXT => {
            if payload.len() < 5 {
                return Err(NbdError::BadLength {
                    what: "NBD_REP_META_CONTEXT",
                    expected: "at least 5".into(),
                    got: payload.len() as u64,
                });
            }
            Ok(OptionReply::MetaContext {
                id: be32(payload, 0),
                name: peer_string(&payload[4..]),
            })
        }
        reply => Err(NbdError::UnexpectedOptionReply { option, reply }),
    }
}

/// What `NBD_OPT_GO` established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Minimum, preferred and maximum block size; the protocol's defaults
    /// (1, 4096, 32 MiB) when the server sent none.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// Collects the replies to `NBD_OPT_GO` until its `NBD_REP_ACK`.
#[derive(Debug, Default)]
pub struct GoReplies {
    export: Option<(u64, u16)>,
    block: Option<(u32, u32, u32)>,
    replies: usize,
}

impl GoReplies {
    /// Takes one reply; `Some` once the negotiation is complete.
    pub fn add(&mut self, reply: OptionReply) -> Result<Option<ExportInfo>> {
        self.replies += 1;
        if self.replies > MAX_OPTION_REPLIES {
            return Err(NbdError::Negotiation("too many replies to NBD_OPT_GO".into()));
        }
        match reply {
            OptionReply::Info(Info::Export { size, flags }) => self.export = Some((size, flags)),
            OptionReply::Info(Info::BlockSize { min, preferred, max }) => {
                let pow2 = |x: u32| x.is_power_of_two();
                if !(pow2(min)
                    && pow2(preferred)
                    && min <= 65536
                    && min <= preferred
                    && min <= max
                    && max.is_multiple_of(min))
                {
                    return Err(NbdError::Negotiation(format!(
                        "inconsistent block sizes: min {min}, preferred {preferred}, max {max}"
                    )));
                }
                self.block = Some((min, preferred, max));
            }
            OptionReply::Info(Info::Other(_)) => {}
            OptionReply::MetaContext { .. } => {
                return Err(NbdError::UnexpectedOptionReply {
                    option: "NBD_OPT_GO",
                    reply: REP_META_CONTEXT,
                })
            }
            OptionReply::Ack => {
                let (size, flags) = self.export.ok_or_else(|| {
                    NbdError::Negotiation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
                })?;
                let (min_block, preferred_block, max_block) = self.block.unwrap_or((1, 4096, 32 << 20));
                return Ok(Some(ExportInfo {
                    size,
                    flags,
                    min_block,
                    preferred_block,
                    max_block,
                }));
            }
        }
        Ok(None)
    }
}

/// A metadata context the server agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// Collects the replies to `NBD_OPT_SET_META_CONTEXT` for `queries` until
/// its `NBD_REP_ACK`.
#[derive(Debug)]
pub struct MetaContextReplies {
    queries: Vec<String>,
    got: Vec<MetaContext>,
    replies: usize,
}

impl MetaContextReplies {
    pub fn new(queries: &[&str]) -> Self {
        MetaContextReplies {
            queries: queries.iter().map(|q| q.to_string()).collect(),
            got: Vec::new(),
            replies: 0,
        }
    }

    /// Takes one reply; `Some` (the contexts in query order) once complete.
    /// Every query must have been granted: a backup that silently lacks
    /// its dirty bitmap would be a full one under a wrong name.
    pub fn add(&mut self, reply: OptionReply) -> Result<Option<Vec<MetaContext>>> {
        self.replies += 1;
        if self.replies > MAX_OPTION_REPLIES {
            return Err(NbdError::Negotiation(
                "too many replies to NBD_OPT_SET_META_CONTEXT".into(),
            ));
        }
        match reply {
            OptionReply::MetaContext { id, name } => {
                if !self.queries.contains(&name) {
                    return Err(NbdError::Negotiation(format!(
                        "the server granted metadata context {name:?}, which was not asked for"
                    )));
                }
                if self.got.iter().any(|c| c.id == id || c.name == name) {
                    return Err(NbdError::Negotiation(format!(
                        "metadata context {name:?} (id {id}) granted twice"
                    )));
                }
                self.got.push(MetaContext { id, name });
                Ok(None)
            }
            OptionReply::Ack => {
                let mut out = Vec::with_capacity(self.queries.len());
                for q in &self.queries {
                    let c = self.got.iter().find(|c| &c.name == q).ok_or_else(|| {
                        NbdError::Negotiation(format!(
                            "the server does not offer metadata context {q:?} (no such dirty bitmap?)"
                        ))
                    })?;
                    out.push(c.clone());
                }
                Ok(Some(out))
            }
            OptionReply::Info(_) => Err(NbdError::UnexpectedOptionReply {
                option: "NBD_OPT_SET_META_CONTEXT",
                reply: REP_INFO,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(flags: u16) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..].copy_from_slice(&flags.to_be_bytes());
        b
    }

    fn header(option: u32, reply: u32, len: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[..8].copy_from_slice(&super::super::OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&reply.to_be_bytes());
        b[16..].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(&greeting(3)), Ok(Greeting { no_zeroes: true }));
        assert_eq!(client_flags(Greeting { no_zeroes: true }), [0, 0, 0, 3]);
        assert_eq!(parse_greeting(&greeting(1)), Ok(Greeting { no_zeroes: false }));
        assert_eq!(client_flags(Greeting { no_zeroes: false }), [0, 0, 0, 1]);
        assert_eq!(parse_greeting(&greeting(0)), Err(NbdError::NotFixedNewstyle));
        let mut old = greeting(1);
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(parse_greeting(&old), Err(NbdError::BadMagic { .. })));
        let mut http = greeting(1);
        http[..8].copy_from_slice(b"HTTP/1.1");
        assert!(matches!(parse_greeting(&http), Err(NbdError::BadMagic { .. })));
    }

    #[test]
    fn option_encodings() {
        let g = go("").unwrap();
        assert_eq!(&g[..8], &IHAVEOPT.to_be_bytes());
        assert_eq!(&g[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&g[12..16], &8u32.to_be_bytes());
        assert_eq!(&g[16..], &[0, 0, 0, 0, 0, 1, 0, 3]);
        let meta = set_meta_context("e", &["base:allocation"]).unwrap();
        let mut want = vec![0, 0, 0, 1, b'e', 0, 0, 0, 1, 0, 0, 0, 15];
        want.extend_from_slice(b"base:allocation");
        assert_eq!(&meta[16..], &want[..]);
        assert_eq!(&meta[12..16], &(want.len() as u32).to_be_bytes());
        assert!(go(&"x".repeat(MAX_STRING + 1)).is_err());
        assert!(set_meta_context("", &["a\0b"]).is_err());
    }

    #[test]
    fn option_reply_table() {
        let h = parse_option_reply_header(&header(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
        let mut p = vec![0, 0];
        p.extend_from_slice(&(1u64 << 30).to_be_bytes());
        p.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            parse_option_reply(&h, &p),
            Ok(OptionReply::Info(Info::Export {
                size: 1 << 30,
                flags: 3
            }))
        );
        // Wrong length for its type, or for the header.
        assert!(parse_option_reply(&h, &p[..11]).is_err());
        let h11 = OptionReplyHeader { len: 11, ..h };
        assert!(matches!(
            parse_option_reply(&h11, &p[..11]),
            Err(NbdError::BadLength { .. })
        ));
        let h = OptionReplyHeader {
            option: OPT_SET_META_CONTEXT,
            reply: REP_META_CONTEXT,
            len: 19,
        };
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_option_reply(&h, &p),
            Ok(OptionReply::MetaContext {
                id: 7,
                name: "base:allocation".into()
            })
        );
        let err = OptionReplyHeader {
            option: OPT_GO,
            reply: 0x8000_0006,
            len: 4,
        };
        let e = parse_option_reply(&err, b"nope").unwrap_err();
        assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN") && e.to_string().contains("nope"));
        // Info replies to the wrong option, unknown reply types.
        let odd = OptionReplyHeader {
            option: OPT_STRUCTURED_REPLY,
            reply: REP_INFO,
            len: 0,
        };
        assert!(matches!(
            parse_option_reply(&odd, &[]),
            Err(NbdError::UnexpectedOptionReply { .. })
        ));
        // Header checks: magic, option, length bound.
        assert!(matches!(
            parse_option_reply_header(&header(OPT_GO, REP_ACK, 0), OPT_STRUCTURED_REPLY),
            Err(NbdError::OptionMismatch { .. })
        ));
        assert!(matches!(
            parse_option_reply_header(&header(OPT_GO, REP_ACK, u32::MAX), OPT_GO),
            Err(NbdError::TooLong { .. })
        ));
        let mut bad = header(OPT_GO, REP_ACK, 0);
        bad[0] ^= 1;
        assert!(matches!(
            parse_option_reply_header(&bad, OPT_GO),
            Err(NbdError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_needs_the_export_info() {
        let mut g = GoReplies::default();
        assert!(g.add(OptionReply::Ack).is_err());
        let mut g = GoReplies::default();
        assert_eq!(
            g.add(OptionReply::Info(Info::Export { size: 5, flags: 1 })),
            Ok(None)
        );
        let info = g.add(OptionReply::Ack).unwrap().unwrap();
        assert_eq!((info.size, info.min_block, info.max_block), (5, 1, 32 << 20));
        let mut g = GoReplies::default();
        let bad = Info::BlockSize {
            min: 3,
            preferred: 4096,
            max: 1 << 20,
        };
        assert!(g.add(OptionReply::Info(bad)).is_err());
    }

    #[test]
    fn meta_contexts_must_all_be_granted_once() {
        let mc = |id, name: &str| OptionReply::MetaContext {
            id,
            name: name.into(),
        };
        let mut m = MetaContextReplies::new(&["base:allocation", "qemu:dirty-bitmap:b"]);
        assert_eq!(m.add(mc(2, "qemu:dirty-bitmap:b")), Ok(None));
        assert_eq!(m.add(mc(1, "base:allocation")), Ok(None));
        let got = m.add(OptionReply::Ack).unwrap().unwrap();
        assert_eq!((got[0].id, got[1].id), (1, 2));
        let mut m = MetaContextReplies::new(&["base:allocation", "qemu:dirty-bitmap:b"]);
        m.add(mc(1, "base:allocation")).unwrap();
        assert!(m
            .add(OptionReply::Ack)
            .unwrap_err()
            .to_string()
            .contains("dirty-bitmap:b"));
        let mut m = MetaContextReplies::new(&["base:allocation"]);
        assert!(m.add(mc(1, "qemu:dirty-bitmap:x")).is_err());
        let mut m = MetaContextReplies::new(&["base:allocation"]);
        m.add(mc(1, "base:allocation")).unwrap();
        assert!(m.add(mc(1, "base:allocation")).is_err());
    }
}
