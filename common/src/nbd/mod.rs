//! The NBD protocol's wire format, client side, as pure functions over
//! bytes: the fixed-newstyle handshake and the options backy needs
//! ([`handshake`]), requests and reply messages ([`wire`]), and the checks
//! that every reply chunk belongs to a request in flight and stays inside
//! it ([`reply`]). The transport (sockets, tokio) is the client's
//! (`client/src/nbd.rs`); it reads fixed-size headers, asks these functions
//! how many payload bytes may follow, and hands them back.
//!
//! The peer is not trusted: every length is checked against a bound before
//! anything is allocated for it, nothing here panics on any input, and a
//! reply that does not fit what was asked (unknown cookie, bytes outside
//! the request, overlapping chunks, missing data) is an [`NbdError`].
//!
//! References: the NBD project's `doc/proto.md` (the protocol) and QEMU's
//! `docs/interop/nbd.txt` (the `qemu:dirty-bitmap:NAME` context: status bit
//! 0 set means dirty).

pub mod handshake;
pub mod reply;
pub mod serve;
pub mod wire;

/// `NBDMAGIC`: first 8 bytes of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting; prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest string the protocol allows (export names, messages, contexts).
pub const MAX_STRING: usize = 4096;

/// The `base:allocation` metadata context: holes and zeros.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty bitmap contexts: `qemu:dirty-bitmap:NAME`.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `base:allocation` status bit: the range is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status bit: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:` status bit: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// What went wrong talking to an NBD server. Everything but
/// [`NbdError::Server`] means the peer broke the protocol (or is not an
/// NBD server): the connection is unusable afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    #[error("nbd: bad magic in {what}: 0x{got:x} (not an NBD server, or out of step)")]
    BadMagic { what: &'static str, got: u64 },
    #[error("nbd: the server does not speak fixed-newstyle negotiation")]
    NotFixedNewstyle,
    #[error("nbd: {what} must be {expected} bytes, the server sent {got}")]
    BadLength {
        what: &'static str,
        expected: String,
        got: u64,
    },
    #[error("nbd: {what} of {len} bytes is over the limit of {max}")]
    TooLong { what: &'static str, len: u64, max: u64 },
    #[error("nbd: reply to option {got} while waiting for option {sent}")]
    OptionMismatch { sent: u32, got: u32 },
    #[error("nbd: the server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        option: &'static str,
        reply: String,
        message: String,
    },
    #[error("nbd: unexpected reply type {reply} to {option}")]
    UnexpectedOptionReply { option: &'static str, reply: u32 },
    #[error("nbd: {0}")]
    Negotiation(String),
    #[error("nbd: reply for cookie {0}, which no request in flight has")]
    UnknownCookie(u64),
    #[error("nbd: reply chunk type {kind} is not valid for {command}")]
    UnexpectedChunk { kind: u16, command: &'static str },
    #[error("nbd: {what} at {offset}+{len} lies outside the request {req_offset}+{req_len}")]
    OutOfRange {
        what: &'static str,
        offset: u64,
        len: u64,
        req_offset: u64,
        req_len: u64,
    },
    #[error("nbd: read reply chunk at {offset}+{len} overlaps an earlier one")]
    Overlap { offset: u64, len: u64 },
    #[error("nbd: read reply ended with {covered} of {len} bytes at {offset} sent")]
    Incomplete { offset: u64, len: u64, covered: u64 },
    #[error("nbd: {0}")]
    Malformed(String),
    #[error("nbd: the server failed the request: {} ({code}){}{}",
        errno_name(*code),
        offset.map(|o| format!(" at offset {o}")).unwrap_or_default(),
        if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server {
        code: u32,
        message: String,
        offset: Option<u64>,
    },
    #[error("nbd: invalid request: {0}")]
    InvalidRequest(String),
}

pub type Result<T, E = NbdError> = std::result::Result<T, E>;

/// The protocol's name for an error value (they are errno values).
pub fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

impl From<NbdError> for crate::Error {
    fn from(e: NbdError) -> Self {
        match e {
            NbdError::Server { .. } => crate::Error::unavailable(e.to_string()),
            NbdError::InvalidRequest(_) => crate::Error::internal(e.to_string()),
            _ => crate::Error::data_loss(e.to_string()),
        }
    }
}

/// Big-endian readers over a slice whose length the caller checked.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(x)
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A peer's string: lossy UTF-8 (it only ends up in messages).
pub(crate) fn peer_string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
