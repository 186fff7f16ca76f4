//! A small NBD client on tokio: reads an export and its block status
//! (`base:allocation`, QEMU dirty bitmaps) from a server such as
//! `qemu-nbd`. Only the socket work is here; every byte from the server is
//! checked by the pure functions in `backy_common::nbd` before it is used,
//! so a hostile or broken server gets an error, never a panic or an
//! allocation it chose.
//!
//! Structured replies are required (every NBD server backy reads from,
//! i.e. QEMU's, has them since 2.11): they are what makes holes, block
//! status and per-request errors possible.

use backy_common::nbd::handshake::{self as hs, ExportInfo, MetaContext, OptionReply};
use backy_common::nbd::reply::{Completed, InFlight, StatusExtent, StatusWalk};
use backy_common::nbd::wire::{self, Header, Request};
use backy_common::nbd::NbdError;
use backy_common::ranges::Extent;
use std::collections::VecDeque;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

/// Longest read request sent (further capped by the server's maximum).
pub const READ_LEN: u32 = 1 << 20;
/// Longest block status query: larger ones only make the server work
/// longer before the first byte of its answer.
pub const STATUS_LEN: u32 = 1 << 30;
/// Reads kept in flight by [`NbdClient::read_extents`].
pub const READ_DEPTH: usize = 8;

/// What went wrong on an NBD connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("nbd: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] NbdError),
    #[error("nbd: the connection is unusable after an earlier error")]
    Broken,
}

impl From<NbdClientError> for backy_common::Error {
    fn from(e: NbdClientError) -> Self {
        match e {
            NbdClientError::Protocol(p) => p.into(),
            NbdClientError::Io { context, source } => {
                backy_common::Error::unavailable(format!("nbd: {context}: {source}"))
            }
            NbdClientError::Broken => backy_common::Error::unavailable(e.to_string()),
        }
    }
}

pub type Result<T, E = NbdClientError> = std::result::Result<T, E>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NbdClientError {
    let context = context.into();
    move |source| NbdClientError::Io { context, source }
}

/// One connection to one export, in the transmission phase.
pub struct NbdClient<S> {
    io: BufStream<S>,
    export: ExportInfo,
    contexts: Vec<MetaContext>,
    inflight: InFlight,
    /// Payload buffer, reused; its size is bounded by `InFlight::payload_len`.
    scratch: Vec<u8>,
    /// Set at the first I/O or protocol error: the stream is out of step.
    broken: bool,
}

impl NbdClient<tokio::net::UnixStream> {
    /// Connects to a server's Unix socket and negotiates `export` with the
    /// metadata `contexts` (e.g. `base:allocation`).
    pub async fn connect_unix(path: &Path, export: &str, contexts: &[&str]) -> Result<Self> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(io(format!("connecting to {}", path.display())))?;
        Self::handshake(stream, export, contexts).await
    }
}

impl NbdClient<tokio::net::TcpStream> {
    /// Connects over TCP (no TLS: for a local or otherwise secured link).
    pub async fn connect_tcp(addr: &str, export: &str, contexts: &[&str]) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(io(format!("connecting to {addr}")))?;
        let _ = stream.set_nodelay(true);
        Self::handshake(stream, export, contexts).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// The fixed-newstyle handshake on `stream`: structured replies, the
    /// metadata contexts (all must be granted), then `NBD_OPT_GO`.
    pub async fn handshake(stream: S, export: &str, contexts: &[&str]) -> Result<Self> {
        let mut io = BufStream::new(stream);
        let mut greeting = [0u8; hs::GREETING_LEN];
        io.read_exact(&mut greeting)
            .await
            .map_err(io_ctx("reading the greeting"))?;
        let greeting = hs::parse_greeting(&greeting)?;
        io.write_all(&hs::client_flags(greeting))
            .await
            .map_err(io_ctx("sending flags"))?;

        match negotiate(&mut io, export, contexts).await {
            Ok((info, granted)) => Ok(NbdClient {
                io,
                export: info,
                contexts: granted,
                inflight: InFlight::new(),
                scratch: Vec::new(),
                broken: false,
            }),
            Err(e) => {
                // A refused option leaves the server waiting for the next:
                // end politely (a soft disconnect), best effort.
                if matches!(
                    e,
                    NbdClientError::Protocol(NbdError::OptionRefused { .. } | NbdError::Negotiation(_))
                ) {
                    let _ = send_option(&mut io, &hs::encode_option(hs::OPT_ABORT, &[])).await;
                }
                Err(e)
            }
        }
    }

    /// The export's size, flags and block size constraints.
    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    /// The metadata contexts granted, in the order asked for.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    /// Longest read this client sends in one request.
    fn read_len(&self) -> u32 {
        let max = self.export.max_block.min(READ_LEN);
        // A multiple of the minimum block size (a power of two, checked).
        (max / self.export.min_block * self.export.min_block).max(self.export.min_block)
    }

    fn check(&self) -> Result<()> {
        if self.broken {
            return Err(NbdClientError::Broken);
        }
        Ok(())
    }

    /// Runs `f`; an error other than one the server reported for a
    /// request leaves the connection marked unusable.
    fn mark<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !matches!(e, NbdClientError::Protocol(NbdError::Server { .. })) {
                self.broken = true;
            }
        }
        r
    }

    async fn send(&mut self, req: Request) -> Result<()> {
        self.io
            .write_all(&req.encode())
            .await
            .map_err(io_ctx("sending a request"))
    }

    async fn flush(&mut self) -> Result<()> {
        self.io.flush().await.map_err(io_ctx("sending requests"))
    }

    /// Reads reply messages until one completes a request.
    async fn next_completion(&mut self) -> Result<(u64, Result<Completed, NbdError>)> {
        loop {
            let mut magic = [0u8; 4];
            self.io
                .read_exact(&mut magic)
                .await
                .map_err(io_ctx("reading a reply"))?;
            let magic = wire::reply_magic(&magic)?;
            let mut rest = [0u8; wire::CHUNK_REST_LEN];
            let rest = &mut rest[..magic.rest_len()];
            self.io
                .read_exact(rest)
                .await
                .map_err(io_ctx("reading a reply"))?;
            let header = Header::parse(magic, rest)?;
            // Checked against the request before reading: no allocation
            // the server chose beyond what that request may need.
            let n = self.inflight.payload_len(&header)?;
            self.scratch.resize(n, 0);
            self.io
                .read_exact(&mut self.scratch[..n])
                .await
                .map_err(io_ctx("reading a reply payload"))?;
            if let Some(done) = self.inflight.on_message(&header, &self.scratch[..n])? {
                if self.scratch.capacity() > 2 * READ_LEN as usize {
                    self.scratch = Vec::new();
                }
                return Ok(done);
            }
        }
    }

    /// Waits for every request in flight, dropping their results (after an
    /// error, so the connection stays usable for the next call).
    async fn drain(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            let _dropped = self.next_completion().await?;
        }
        Ok(())
    }

    /// Block status for `len` bytes at `offset`: per granted context, the
    /// extents from `offset` on (possibly covering less than `len`).
    pub async fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<Vec<StatusExtent>>> {
        self.check()?;
        let r = self.block_status_inner(offset, len).await;
        self.mark(r)
    }

    async fn block_status_inner(&mut self, offset: u64, len: u32) -> Result<Vec<Vec<StatusExtent>>> {
        let ids: Vec<u32> = self.contexts.iter().map(|c| c.id).collect();
        let req = self.inflight.block_status(offset, len, self.export.size, &ids)?;
        self.send(req).await?;
        self.flush().await?;
        let (cookie, done) = self.next_completion().await?;
        match done? {
            Completed::Status { extents, .. } if cookie == req.cookie => Ok(extents),
            _ => Err(
                NbdError::InvalidRequest("a reply completed a request not sent by this call".into()).into(),
            ),
        }
    }

    /// Block status of the whole export, per granted context, in queries
    /// of at most `max_len` bytes ([`STATUS_LEN`] is a good default).
    pub async fn block_status_all(&mut self, max_len: u32) -> Result<Vec<Vec<StatusExtent>>> {
        self.check()?;
        let mut walk = StatusWalk::new(
            self.export.size,
            self.contexts.len(),
            max_len,
            self.export.min_block,
        );
        while let Some((offset, len)) = walk.next_request() {
            let extents = self.block_status(offset, len).await?;
            let r = walk.add(offset, extents).map_err(NbdClientError::from);
            self.mark(r)?;
        }
        Ok(walk.finish())
    }

    /// Reads `len` bytes at `offset` (one request: at most the read size).
    pub async fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_extents(
            &[Extent {
                offset,
                len: len.into(),
            }],
            1,
            |_, data| {
                out = data;
                Ok::<_, NbdClientError>(())
            },
        )
        .await?;
        Ok(out)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (the sources' random
    /// reads), with up to [`READ_DEPTH`] requests in flight.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> backy_common::Result<()> {
        let want = Extent {
            offset,
            len: buf.len() as u64,
        };
        self.read_extents(&[want], READ_DEPTH, |at, data| {
            let start = (at - offset) as usize;
            match buf.get_mut(start..start + data.len()) {
                Some(dst) => {
                    dst.copy_from_slice(&data);
                    Ok(())
                }
                None => Err(backy_common::Error::internal("NBD read outside the buffer")),
            }
        })
        .await
    }

    /// Reads `extents`, split into requests of at most the read size with
    /// up to `depth` of them in flight, calling `sink(offset, data)` for
    /// each piece as it completes (not necessarily in order). Offsets and
    /// lengths must respect the export's minimum block size (QEMU's is
    /// 1 or 512; dirty bitmap granules always do).
    pub async fn read_extents<F, E>(&mut self, extents: &[Extent], depth: usize, mut sink: F) -> Result<(), E>
    where
        F: FnMut(u64, Vec<u8>) -> Result<(), E>,
        E: From<NbdClientError>,
    {
        self.check()?;
        let mut pieces = self.split(extents)?;
        let depth = depth.clamp(1, READ_DEPTH * 8);
        let mut failed: Option<E> = None;
        while failed.is_none() && (!pieces.is_empty() || !self.inflight.is_empty()) {
            let mut sent = false;
            while self.inflight.len() < depth {
                let Some((offset, len)) = pieces.pop_front() else {
                    break;
                };
                let req = self
                    .inflight
                    .read(offset, len, self.export.size)
                    .map_err(NbdClientError::from);
                let req = self.mark(req)?;
                let r = self.send(req).await;
                self.mark(r)?;
                sent = true;
            }
            if sent {
                let r = self.flush().await;
                self.mark(r)?;
            }
            let r = self.next_completion().await;
            let (_, done) = self.mark(r)?;
            match done {
                Ok(Completed::Read { offset, data }) => {
                    if let Err(e) = sink(offset, data) {
                        failed = Some(e);
                    }
                }
                Ok(Completed::Status { .. }) => {
                    let e = NbdClientError::from(NbdError::InvalidRequest(
                        "block status completed during reads".into(),
                    ));
                    failed = Some(e.into());
                }
                Err(e) => failed = Some(NbdClientError::from(e).into()),
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                let r = self.drain().await;
                self.mark(r)?;
                Err(e)
            }
        }
    }

    /// Splits extents into read requests, checking them against the
    /// export's size and minimum block size.
    fn split(&self, extents: &[Extent]) -> Result<VecDeque<(u64, u32)>> {
        let size = self.export.size;
        let align = u64::from(self.export.min_block);
        let step = u64::from(self.read_len());
        let mut out = VecDeque::new();
        for e in extents {
            let end = e.offset.checked_add(e.len).filter(|&end| end <= size);
            let aligned = |x: u64| x.is_multiple_of(align) || x == size;
            let Some(end) = end.filter(|&end| aligned(e.offset) && aligned(end)) else {
                return Err(NbdError::InvalidRequest(format!(
                    "read of {} bytes at {} is outside the export of {size} bytes or not aligned to {align}",
                    e.len, e.offset
                ))
                .into());
            };
            let mut at = e.offset;
            while at < end {
                let len = (end - at).min(step);
                out.push_back((at, len as u32));
                at += len;
            }
        }
        Ok(out)
    }

    /// Ends the session cleanly: waits for requests in flight, then sends
    /// `NBD_CMD_DISC` (which has no reply) and closes.
    pub async fn disconnect(mut self) -> Result<()> {
        self.check()?;
        self.drain().await?;
        let disc = Request {
            flags: 0,
            command: wire::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        self.send(disc).await?;
        self.flush().await?;
        self.io.shutdown().await.map_err(io_ctx("closing"))
    }
}

/// Options after the flags: structured replies, the metadata contexts (all
/// must be granted), then `NBD_OPT_GO`.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufStream<S>,
    export: &str,
    contexts: &[&str],
) -> Result<(ExportInfo, Vec<MetaContext>)> {
    send_option(io, &hs::encode_option(hs::OPT_STRUCTURED_REPLY, &[])).await?;
    match option_reply(io, hs::OPT_STRUCTURED_REPLY).await? {
        OptionReply::Ack => {}
        other => {
            return Err(
                NbdError::Negotiation(format!("NBD_OPT_STRUCTURED_REPLY answered with {other:?}")).into(),
            )
        }
    }

    let mut granted = Vec::new();
    if !contexts.is_empty() {
        send_option(io, &hs::set_meta_context(export, contexts)?).await?;
        let mut replies = hs::MetaContextReplies::new(contexts);
        granted = loop {
            let reply = option_reply(io, hs::OPT_SET_META_CONTEXT).await?;
            if let Some(done) = replies.add(reply)? {
                break done;
            }
        };
    }

    send_option(io, &hs::go(export)?).await?;
    let mut replies = hs::GoReplies::default();
    let info = loop {
        let reply = option_reply(io, hs::OPT_GO).await?;
        if let Some(info) = replies.add(reply)? {
            break info;
        }
    };
    Ok((info, granted))
}

fn io_ctx(context: &'static str) -> impl FnOnce(std::io::Error) -> NbdClientError {
    io(context)
}

async fn send_option<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufStream<S>, option: &[u8]) -> Result<()> {
    io.write_all(option).await.map_err(io_ctx("sending an option"))?;
    io.flush().await.map_err(io_ctx("sending an option"))
}

async fn option_reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufStream<S>,
    sent: u32,
) -> Result<OptionReply> {
    let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
    io.read_exact(&mut h)
        .await
        .map_err(io_ctx("reading an option reply"))?;
    let header = hs::parse_option_reply_header(&h, sent)?;
    // At most MAX_OPTION_REPLY bytes (checked above).
    let mut payload = vec![0u8; header.len as usize];
    io.read_exact(&mut payload)
        .await
        .map_err(io_ctx("reading an option reply"))?;
    Ok(hs::parse_option_reply(&header, &payload)?)
}
