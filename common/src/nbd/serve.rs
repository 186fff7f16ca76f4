//! The server's side of NBD, as pure functions over bytes: the greeting,
//! option haggling as a state machine ([`Negotiation`]), request parsing
//! and checking, and reply encoding. The client's export
//! (`client/src/export/`) does the socket work.
//!
//! The peer (QEMU, `nbdinfo`, the kernel, or anything that connects) is not
//! trusted: option data is bounded before it is read, every string is
//! checked, and a request outside the export gets an error reply, never a
//! read or write outside it.

use super::handshake::{
    INFO_BLOCK_SIZE, INFO_EXPORT, OPT_ABORT, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
};
use super::wire::{Descriptor, Request, REQUEST_LEN};
use super::{
    be16, be32, be64, NbdError, Result, CONTEXT_BASE_ALLOCATION, IHAVEOPT, MAX_STRING, NBDMAGIC,
    OPTION_REPLY_MAGIC,
};

/// Handshake flags the export offers: fixed newstyle, no zeroes.
const HANDSHAKE_FLAGS: u16 = 1 | 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_LIST_META_CONTEXT: u32 = 9;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Error values of replies (errno numbers, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload read from a client; longer ones end the
/// connection (the protocol allows a server to).
pub const MAX_OPTION_LEN: u32 = 2 * MAX_STRING as u32 + 1024;
/// Options a client may send before it picks the export.
pub const MAX_OPTIONS: usize = 64;
/// Largest read or write request accepted (advertised as the maximum
/// block size).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Preferred request size advertised: one granule.
pub const PREFERRED_BLOCK: u32 = 64 << 10;
/// Block status descriptors per reply at most.
pub const MAX_DESCRIPTORS: usize = 1 << 14;
/// The only meta context the export serves, with this id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The server's first bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    b
}

/// The client's flags: it must speak fixed newstyle; `no_zeroes` says
/// whether it skips the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub fn parse_client_flags(b: [u8; 4]) -> Result<bool> {
    let flags = u32::from_be_bytes(b);
    if flags & CLIENT_FIXED_NEWSTYLE == 0 || flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::Negotiation(format!(
            "client flags 0x{flags:x}: fixed newstyle is required, no unknown flags"
        )));
    }
    Ok(flags & CLIENT_NO_ZEROES != 0)
}

/// An option's header: its number and how many data bytes follow.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32)> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(NbdError::BadMagic {
            what: "option",
            got: magic,
        });
    }
    let (option, len) = (be32(b, 8), be32(b, 12));
    if len > MAX_OPTION_LEN {
        return Err(NbdError::TooLong {
            what: "option data",
            len: len.into(),
            max: MAX_OPTION_LEN.into(),
        });
    }
    Ok((option, len))
}

/// One option reply, header and data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// What is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The name the export answers to (the empty name, the default, too).
    pub name: String,
    pub description: String,
    pub size: u64,
    pub writable: bool,
}

impl ExportSpec {
    /// Transmission flags for a client that negotiated structured replies
    /// or not.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if self.writable {
            f |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_WRITE_ZEROES;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        f
    }

    fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What to do after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send these bytes and enter transmission.
    Transmit(Vec<u8>),
    /// Send these bytes (possibly none) and close.
    Close(Vec<u8>),
}

/// The state of option haggling with one client.
#[derive(Debug)]
pub struct Negotiation {
    export: ExportSpec,
    no_zeroes: bool,
    options: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
}

/// A string field of option data: u32 length, then bytes.
fn take_string<'a>(data: &'a [u8], at: &mut usize) -> std::result::Result<&'a [u8], ()> {
    let len = data.get(*at..*at + 4).ok_or(())?;
    let len = be32(len, 0) as usize;
    if len > MAX_STRING {
        return Err(());
    }
    let s = data.get(*at + 4..*at + 4 + len).ok_or(())?;
    *at += 4 + len;
    Ok(s)
}

impl Negotiation {
    pub fn new(export: ExportSpec, no_zeroes: bool) -> Self {
        Negotiation {
            export,
            no_zeroes,
            options: 0,
            structured: false,
            base_allocation: false,
        }
    }

    pub fn export(&self) -> &ExportSpec {
        &self.export
    }

    /// Answers one option.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Next {
        self.options += 1;
        if self.options > MAX_OPTIONS {
            return Next::Close(option_reply(option, REP_ERR_POLICY, b"too many options"));
        }
        let error = |reply: u32, msg: &str| Next::Reply(option_reply(option, reply, msg.as_bytes()));
        match option {
            OPT_EXPORT_NAME => {
                if !self.export.answers_to(data) {
                    // The protocol's only answer here is to hang up.
                    return Next::Close(Vec::new());
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&self.export.size.to_be_bytes());
                out.extend_from_slice(&self.export.transmission_flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Next::Transmit(out)
            }
            OPT_ABORT => Next::Close(option_reply(option, REP_ACK, &[])),
            OPT_LIST => {
                if !data.is_empty() {
                    return error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                let mut server = Vec::new();
                server.extend_from_slice(&(self.export.name.len() as u32).to_be_bytes());
                server.extend_from_slice(self.export.name.as_bytes());
                server.extend_from_slice(self.export.description.as_bytes());
                let mut out = option_reply(option, REP_SERVER, &server);
                out.extend(option_reply(option, REP_ACK, &[]));
                Next::Reply(out)
            }
            OPT_STARTTLS => error(REP_ERR_POLICY, "TLS is not offered: the export is a local socket"),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                Next::Reply(option_reply(option, REP_ACK, &[]))
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => error(REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Next {
        let mut at = 0;
        let parsed = (|| {
            let name = take_string(data, &mut at)?;
            let n = be16(data.get(at..at + 2).ok_or(())?, 0) as usize;
            at += 2;
            let requests = data.get(at..at + 2 * n).ok_or(())?;
            if at + 2 * n != data.len() {
                return Err(());
            }
            Ok((
                name,
                requests.chunks_exact(2).map(|c| be16(c, 0)).collect::<Vec<_>>(),
            ))
        })();
        let Ok((name, requests)) = parsed else {
            return Next::Reply(option_reply(
                option,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/GO",
            ));
        };
        if !self.export.answers_to(name) {
            return Next::Reply(option_reply(option, REP_ERR_UNKNOWN, b"no such export"));
        }
        let mut out = Vec::new();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&self.export.size.to_be_bytes());
        export.extend_from_slice(&self.export.transmission_flags(self.structured).to_be_bytes());
        out.extend(option_reply(option, REP_INFO, &export));
        // Block sizes always: a client that ignores them still works.
        let mut sizes = Vec::with_capacity(14);
        sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [1u32, PREFERRED_BLOCK, MAX_REQUEST_LEN] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        out.extend(option_reply(option, REP_INFO, &sizes));
        if requests.contains(&INFO_NAME) {
            let mut b = INFO_NAME.to_be_bytes().to_vec();
            b.extend_from_slice(self.export.name.as_bytes());
            out.extend(option_reply(option, REP_INFO, &b));
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(self.export.description.as_bytes());
            out.extend(option_reply(option, REP_INFO, &b));
        }
        out.extend(option_reply(option, REP_ACK, &[]));
        if option == OPT_GO {
            Next::Transmit(out)
        } else {
            Next::Reply(out)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Next {
        let mut at = 0;
        let parsed = (|| {
            let name = take_string(data, &mut at)?;
            let n = be32(data.get(at..at + 4).ok_or(())?, 0) as usize;
            at += 4;
            if n > 64 {
                return Err(());
            }
            let mut queries = Vec::with_capacity(n);
            for _ in 0..n {
                queries.push(take_string(data, &mut at)?);
            }
            if at != data.len() {
                return Err(());
            }
            Ok((name, queries))
        })();
        let Ok((name, queries)) = parsed else {
            return Next::Reply(option_reply(
                option,
                REP_ERR_INVALID,
                b"malformed meta context option",
            ));
        };
        if !self.structured {
            return Next::Reply(option_reply(
                option,
                REP_ERR_INVALID,
                b"meta contexts need structured replies first",
            ));
        }
        if !self.export.answers_to(name) {
            return Next::Reply(option_reply(option, REP_ERR_UNKNOWN, b"no such export"));
        }
        let base = CONTEXT_BASE_ALLOCATION.as_bytes();
        // LIST with no query lists everything; "base:" names the namespace.
        let matched = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| *q == base || *q == b"base:")
        };
        if option == OPT_SET_META_CONTEXT {
            self.base_allocation = queries.contains(&base);
        }
        let mut out = Vec::new();
        if matched && (option == OPT_LIST_META_CONTEXT || self.base_allocation) {
            let mut ctx = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            ctx.extend_from_slice(base);
            out.extend(option_reply(option, REP_META_CONTEXT, &ctx));
        }
        out.extend(option_reply(option, REP_ACK, &[]));
        Next::Reply(out)
    }
}

/// Parses a request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request> {
    let magic = be32(b, 0);
    if magic != super::REQUEST_MAGIC {
        return Err(NbdError::BadMagic {
            what: "request",
            got: magic.into(),
        });
    }
    Ok(Request {
        flags: be16(b, 4),
        command: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        len: be32(b, 24),
    })
}

/// What a request asks of the export, checked against it. A `Refuse`
/// carries the error value of the reply; for a write its data must still
/// be read off the socket (the caller knows the length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Flush,
    Trim,
    Cache { offset: u64, len: u32 },
    BlockStatus { offset: u64, len: u32, one: bool },
    Disconnect,
    Refuse { errno: u32, reason: &'static str },
}

/// Checks a request against the export.
pub fn command(req: &Request, export: &ExportSpec, structured: bool, base_allocation: bool) -> Command {
    let in_range = |len: u32| {
        req.offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= export.size)
    };
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let refuse = |errno, reason| Command::Refuse { errno, reason };
    if matches!(req.command, CMD_READ | CMD_WRITE | CMD_CACHE) && req.len > MAX_REQUEST_LEN {
        return refuse(EOVERFLOW, "request longer than the maximum block size");
    }
    match req.command {
        CMD_READ if !in_range(req.len) => refuse(EINVAL, "read beyond the end of the export"),
        CMD_READ => Command::Read {
            offset: req.offset,
            len: req.len,
        },
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if !export.writable => {
            refuse(EPERM, "the export is read-only")
        }
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range(req.len) => {
            refuse(ENOSPC, "write beyond the end of the export")
        }
        CMD_WRITE => Command::Write {
            offset: req.offset,
            len: req.len,
            fua,
        },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset: req.offset,
            len: req.len,
            fua,
        },
        CMD_TRIM => Command::Trim,
        CMD_FLUSH => Command::Flush,
        CMD_CACHE if !in_range(req.len) => refuse(EINVAL, "cache beyond the end of the export"),
        CMD_CACHE => Command::Cache {
            offset: req.offset,
            len: req.len,
        },
        CMD_BLOCK_STATUS if !structured || !base_allocation => refuse(
            EINVAL,
            "block status needs structured replies and base:allocation",
        ),
        CMD_BLOCK_STATUS if req.len == 0 || !in_range(req.len) => {
            refuse(EINVAL, "block status outside the export")
        }
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset: req.offset,
            len: req.len,
            one: req.flags & CMD_FLAG_REQ_ONE != 0,
        },
        CMD_DISC => Command::Disconnect,
        _ => refuse(EINVAL, "unknown command"),
    }
}

/// A simple reply.
pub fn simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&super::SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&super::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of an `OFFSET_DATA` chunk (`len` data bytes follow it).
pub fn data_chunk_header(done: bool, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    let flags = if done { super::wire::REPLY_FLAG_DONE } else { 0 };
    b[..20].copy_from_slice(&chunk_header(
        flags,
        super::wire::CHUNK_OFFSET_DATA,
        cookie,
        len + 8,
    ));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// An `OFFSET_HOLE` chunk.
pub fn hole_chunk(done: bool, cookie: u64, offset: u64, len: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    let flags = if done { super::wire::REPLY_FLAG_DONE } else { 0 };
    b[..20].copy_from_slice(&chunk_header(flags, super::wire::CHUNK_OFFSET_HOLE, cookie, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The final `NONE` chunk.
pub fn done_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(super::wire::REPLY_FLAG_DONE, super::wire::CHUNK_NONE, cookie, 0)
}

/// A final `ERROR` chunk.
pub fn error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut out = chunk_header(
        super::wire::REPLY_FLAG_DONE,
        super::wire::CHUNK_ERROR,
        cookie,
        6 + m.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m);
    out
}

/// A final `BLOCK_STATUS` chunk for the base:allocation context.
pub fn block_status_chunk(cookie: u64, descriptors: &[Descriptor]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len() as u32;
    let mut out = chunk_header(
        super::wire::REPLY_FLAG_DONE,
        super::wire::CHUNK_BLOCK_STATUS,
        cookie,
        len,
    )
    .to_vec();
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// Block status descriptors for `offset..offset + len` from extents of
/// `(length, flags)` that start at `offset` and cover at least the range
/// (the last one is cut to it); merged where flags repeat, at most
/// [`MAX_DESCRIPTORS`] (or one with `one`), never zero-length.
pub fn descriptors(len: u32, extents: impl IntoIterator<Item = (u64, u32)>, one: bool) -> Vec<Descriptor> {
    let mut out: Vec<Descriptor> = Vec::new();
    let mut left = u64::from(len);
    for (n, flags) in extents {
        if left == 0 {
            break;
        }
        let n = n.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        match out.last_mut() {
            Some(d) if d.flags == flags => d.len += n as u32,
            _ => {
                if out.len() == if one { 1 } else { MAX_DESCRIPTORS } {
                    break;
                }
                out.push(Descriptor { len: n as u32, flags });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::{self, OptionReply};
    use proptest::prelude::*;

    fn spec(writable: bool) -> ExportSpec {
        ExportSpec {
            name: "vm1".into(),
            description: "vm1 revision x".into(),
            size: 8 << 20,
            writable,
        }
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Splits encoded option replies as the project's own NBD client
    /// reads them.
    fn replies(sent: u32, mut bytes: &[u8]) -> Vec<OptionReply> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let h: [u8; 20] = bytes[..20].try_into().unwrap();
            let h = handshake::parse_option_reply_header(&h, sent).unwrap();
            let end = 20 + h.len as usize;
            out.push(handshake::parse_option_reply(&h, &bytes[20..end]).unwrap());
            bytes = &bytes[end..];
        }
        out
    }

    #[test]
    fn the_greeting_is_one_the_client_side_accepts() {
        let g = handshake::parse_greeting(&greeting()).unwrap();
        assert!(g.no_zeroes);
        assert!(parse_client_flags(handshake::client_flags(g)).unwrap());
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 0, 5]).is_err());
    }

    #[test]
    fn go_answers_with_size_flags_and_block_sizes() {
        let mut n = Negotiation::new(spec(false), true);
        assert!(matches!(n.option(OPT_STRUCTURED_REPLY, &[]), Next::Reply(_)));
        let Next::Transmit(bytes) = n.option(OPT_GO, &go("vm1")) else {
            panic!("GO must enter transmission")
        };
        let mut g = handshake::GoReplies::default();
        let mut info = None;
        for r in replies(OPT_GO, &bytes) {
            if let Some(i) = g.add(r).unwrap() {
                info = Some(i);
            }
        }
        let info = info.expect("an ACK ends GO");
        assert_eq!(info.size, 8 << 20);
        assert!(info.flags & TFLAG_READ_ONLY != 0);
    }

    #[test]
    fn unknown_names_options_and_malformed_data_are_refused_not_fatal() {
        let mut n = Negotiation::new(spec(false), true);
        let Next::Reply(r) = n.option(OPT_GO, &go("other")) else {
            panic!()
        };
        assert_eq!(be32(&r, 12), REP_ERR_UNKNOWN);
        let Next::Reply(r) = n.option(OPT_GO, &[0, 0, 0, 9, 1]) else {
            panic!()
        };
        assert_eq!(be32(&r, 12), REP_ERR_INVALID);
        let Next::Reply(r) = n.option(99, &[]) else {
            panic!()
        };
        assert_eq!(be32(&r, 12), REP_ERR_UNSUP);
        let Next::Reply(r) = n.option(OPT_STARTTLS, &[]) else {
            panic!()
        };
        assert_eq!(be32(&r, 12), REP_ERR_POLICY);
        // Meta contexts before structured replies.
        let set = handshake::set_meta_context("vm1", &[CONTEXT_BASE_ALLOCATION]).unwrap();
        let Next::Reply(r) = n.option(OPT_SET_META_CONTEXT, &set[16..]) else {
            panic!()
        };
        assert_eq!(be32(&r, 12), REP_ERR_INVALID);
        assert!(matches!(n.option(OPT_EXPORT_NAME, b"other"), Next::Close(_)));
        for _ in 0..MAX_OPTIONS {
            let _ = n.option(99, &[]);
        }
        assert!(matches!(n.option(99, &[]), Next::Close(_)));
    }

    #[test]
    fn base_allocation_is_selected_by_name() {
        let mut n = Negotiation::new(spec(false), true);
        n.option(OPT_STRUCTURED_REPLY, &[]);
        let set = handshake::set_meta_context("", &[CONTEXT_BASE_ALLOCATION, "qemu:dirty-bitmap:x"]).unwrap();
        let Next::Reply(r) = n.option(OPT_SET_META_CONTEXT, &set[16..]) else {
            panic!()
        };
        let mut m = handshake::MetaContextReplies::new(&[CONTEXT_BASE_ALLOCATION]);
        let mut got = None;
        for reply in replies(OPT_SET_META_CONTEXT, &r) {
            if let Some(c) = m.add(reply).unwrap() {
                got = Some(c);
            }
        }
        let got = got.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, BASE_ALLOCATION_ID);
        assert!(n.base_allocation);
    }

    #[test]
    fn export_name_sends_size_and_flags() {
        let mut n = Negotiation::new(spec(true), false);
        let Next::Transmit(b) = n.option(OPT_EXPORT_NAME, b"") else {
            panic!()
        };
        assert_eq!(b.len(), 134);
        assert_eq!(be64(&b, 0), 8 << 20);
        assert_eq!(be16(&b, 8) & TFLAG_READ_ONLY, 0);
        assert!(be16(&b, 8) & TFLAG_SEND_FLUSH != 0);
    }

    #[test]
    fn requests_outside_the_export_or_writes_to_a_read_only_one_are_refused() {
        let ro = spec(false);
        let req = |command, offset, len| Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            len,
        };
        let errno = |c: Command| match c {
            Command::Refuse { errno, .. } => errno,
            _ => 0,
        };
        assert_eq!(
            command(&req(CMD_READ, 0, 4096), &ro, true, true),
            Command::Read { offset: 0, len: 4096 }
        );
        assert_eq!(
            errno(command(&req(CMD_READ, (8 << 20) - 1, 2), &ro, true, true)),
            EINVAL
        );
        assert_eq!(
            errno(command(&req(CMD_READ, u64::MAX, 2), &ro, true, true)),
            EINVAL
        );
        assert_eq!(
            errno(command(&req(CMD_READ, 0, MAX_REQUEST_LEN + 1), &ro, true, true)),
            EOVERFLOW
        );
        assert_eq!(errno(command(&req(CMD_WRITE, 0, 512), &ro, true, true)), EPERM);
        assert_eq!(errno(command(&req(CMD_TRIM, 0, 512), &ro, true, true)), EPERM);
        assert_eq!(
            errno(command(&req(CMD_BLOCK_STATUS, 0, 512), &ro, true, false)),
            EINVAL
        );
        assert_eq!(
            errno(command(&req(CMD_WRITE, 8 << 20, 1), &spec(true), true, true)),
            ENOSPC
        );
        assert_eq!(errno(command(&req(42, 0, 1), &ro, true, true)), EINVAL);
        assert_eq!(
            command(
                &Request {
                    flags: CMD_FLAG_REQ_ONE,
                    ..req(CMD_BLOCK_STATUS, 0, 512)
                },
                &ro,
                true,
                true
            ),
            Command::BlockStatus {
                offset: 0,
                len: 512,
                one: true
            }
        );
        let r = Request::encode(&req(CMD_READ, 5, 6));
        assert_eq!(parse_request(&r).unwrap(), req(CMD_READ, 5, 6));
    }

    #[test]
    fn descriptors_merge_cut_and_bound() {
        let d = descriptors(100, [(30, 0), (30, 0), (100, 3)], false);
        assert_eq!(
            d,
            vec![Descriptor { len: 60, flags: 0 }, Descriptor { len: 40, flags: 3 }]
        );
        let d = descriptors(100, [(30, 0), (100, 3)], true);
        assert_eq!(d, vec![Descriptor { len: 30, flags: 0 }]);
        assert!(descriptors(10, [(0, 1)], false).is_empty());
    }

    #[test]
    fn replies_parse_with_the_client_side() {
        use crate::nbd::wire::{parse_chunk, Chunk, Header, ReplyMagic};
        let h = data_chunk_header(true, 9, 4096, 3);
        let header = Header::parse(ReplyMagic::Structured, &h[4..20]).unwrap();
        assert_eq!(header.payload_len(), 11);
        let mut payload = h[20..].to_vec();
        payload.extend_from_slice(b"abc");
        assert_eq!(
            parse_chunk(1, &payload).unwrap(),
            Chunk::Data {
                offset: 4096,
                data: b"abc"
            }
        );
        let e = error_chunk(9, EIO, "bad block");
        assert_eq!(
            parse_chunk(crate::nbd::wire::CHUNK_ERROR, &e[20..]).unwrap(),
            Chunk::Error {
                code: EIO,
                message: "bad block".into(),
                offset: None
            }
        );
    }

    proptest! {
        #[test]
        fn any_option_data_is_answered_without_panic(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut n = Negotiation::new(spec(false), true);
            n.option(OPT_STRUCTURED_REPLY, &[]);
            let _ = n.option(option, &data);
        }
    }
}
