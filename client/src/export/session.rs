//! One NBD connection to the export: the fixed-newstyle handshake, then
//! requests served concurrently and answered as each completes (the
//! protocol matches replies to requests by cookie). The protocol's bytes
//! are `backy_common::nbd::serve`'s; this is the socket work.

use super::image::Image;
use backy_common::nbd::serve::{
    self, block_status_chunk, data_chunk_header, descriptors, done_chunk, error_chunk, simple_reply, Command,
    ExportSpec, Negotiation, Next, EIO, MAX_REQUEST_LEN,
};
use backy_common::nbd::wire::REQUEST_LEN;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

/// The whole handshake must be over within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests of one connection served at once.
const IN_FLIGHT: usize = 64;
/// Bytes of request and reply data one connection may hold at once, in
/// 64 KiB permits (32 MiB, one largest request): a client that sends
/// requests faster than it reads the replies stalls itself, not the
/// export's other clients, and the export allocates at most this per
/// connection.
pub const BUFFER_PERMITS: usize = 512;
const PERMIT_BYTES: u32 = 64 << 10;

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The client disconnected or aborted (cleanly or not).
    Closed,
    /// The client broke the protocol; the connection was dropped.
    Protocol(String),
}

/// Serves one client until it leaves.
pub async fn serve<S>(stream: S, image: Arc<Image>, spec: ExportSpec) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let mut wr = BufWriter::new(wr);
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, spec)).await;
    let negotiation = match negotiated {
        Err(_) => return End::Protocol("the handshake took too long".into()),
        Ok(Err(end)) => return end,
        Ok(Ok(None)) => return End::Closed,
        Ok(Ok(Some(n))) => n,
    };
    transmission(rd, wr, image, negotiation).await
}

async fn handshake<R, W>(rd: &mut R, wr: &mut W, spec: ExportSpec) -> Result<Option<Negotiation>, End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| End::Protocol(format!("handshake: {e}"));
    wr.write_all(&serve::greeting()).await.map_err(io)?;
    wr.flush().await.map_err(io)?;
    let mut flags = [0u8; 4];
    rd.read_exact(&mut flags).await.map_err(io)?;
    let no_zeroes = serve::parse_client_flags(flags).map_err(|e| End::Protocol(e.to_string()))?;
    let mut negotiation = Negotiation::new(spec, no_zeroes);
    loop {
        let mut header = [0u8; 16];
        if rd.read_exact(&mut header).await.is_err() {
            return Ok(None);
        }
        let (option, len) = serve::parse_option_header(&header).map_err(|e| End::Protocol(e.to_string()))?;
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await.map_err(io)?;
        match negotiation.option(option, &data) {
            Next::Reply(bytes) => {
                wr.write_all(&bytes).await.map_err(io)?;
                wr.flush().await.map_err(io)?;
            }
            Next::Transmit(bytes) => {
                wr.write_all(&bytes).await.map_err(io)?;
                wr.flush().await.map_err(io)?;
                return Ok(Some(negotiation));
            }
            Next::Close(bytes) => {
                let _ = wr.write_all(&bytes).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
        }
    }
}

/// A reply's buffers, written in order; the permits it holds go with it.
struct Reply {
    parts: Vec<Vec<u8>>,
    _permits: Option<tokio::sync::OwnedSemaphorePermit>,
}

fn permits_for(len: u32) -> u32 {
    len.div_ceil(PERMIT_BYTES).max(1)
}

async fn transmission<R, W>(mut rd: R, wr: BufWriter<W>, image: Arc<Image>, n: Negotiation) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(IN_FLIGHT);
    let writer = tokio::spawn(write_replies(wr, rx));
    let requests = Arc::new(Semaphore::new(IN_FLIGHT));
    let buffers = Arc::new(Semaphore::new(BUFFER_PERMITS));
    let structured = n.structured;
    let spec = n.export().clone();
    let end = loop {
        let mut header = [0u8; REQUEST_LEN];
        if rd.read_exact(&mut header).await.is_err() {
            break End::Closed;
        }
        let req = match serve::parse_request(&header) {
            Ok(r) => r,
            Err(e) => break End::Protocol(e.to_string()),
        };
        let cookie = req.cookie;
        let command = serve::command(&req, &spec, structured, n.base_allocation);
        // A write's data follows its header whatever the answer.
        let payload_len = if req.command == serve::CMD_WRITE {
            req.len
        } else {
            0
        };
        if payload_len > MAX_REQUEST_LEN {
            break End::Protocol(format!(
                "a write of {payload_len} bytes (at most {MAX_REQUEST_LEN})"
            ));
        }
        let Ok(request) = requests.clone().acquire_owned().await else {
            break End::Closed;
        };
        let buffer_len = match command {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => payload_len,
        };
        let Ok(permits) = buffers.clone().acquire_many_owned(permits_for(buffer_len)).await else {
            break End::Closed;
        };
        let mut payload = vec![0u8; payload_len as usize];
        if rd.read_exact(&mut payload).await.is_err() {
            break End::Closed;
        }
        if command == Command::Disconnect {
            break End::Closed;
        }
        let (image, tx) = (image.clone(), tx.clone());
        tokio::spawn(async move {
            let _request = request;
            let parts = answer(&image, command, cookie, payload, structured).await;
            let _ = tx
                .send(Reply {
                    parts,
                    _permits: Some(permits),
                })
                .await;
        });
    };
    drop(tx);
    // Requests still being served finish and are answered first.
    let _ = writer.await;
    if image.writable() {
        if let Err(e) = image.flush().await {
            tracing::error!("export: flushing the overlay at disconnect: {e}");
        }
    }
    end
}

async fn answer(
    image: &Image,
    command: Command,
    cookie: u64,
    payload: Vec<u8>,
    structured: bool,
) -> Vec<Vec<u8>> {
    let ok = || {
        if structured {
            vec![done_chunk(cookie).to_vec()]
        } else {
            vec![simple_reply(0, cookie).to_vec()]
        }
    };
    let fail = |errno: u32, message: &str| {
        if structured {
            vec![error_chunk(cookie, errno, message)]
        } else {
            vec![simple_reply(errno, cookie).to_vec()]
        }
    };
    let done = |r: backy_common::Result<()>| match r {
        Ok(()) => ok(),
        Err(e) => {
            tracing::warn!("export: {e}");
            fail(EIO, &e.message)
        }
    };
    match command {
        // Nothing to send (a data chunk must carry at least one byte).
        Command::Read { len: 0, .. } => ok(),
        Command::Read { offset, len } => match image.read(offset, len).await {
            Ok(data) if structured => vec![data_chunk_header(true, cookie, offset, len).to_vec(), data],
            Ok(data) => vec![simple_reply(0, cookie).to_vec(), data],
            Err(e) => {
                tracing::warn!(offset, len, "export: read failed: {e}");
                fail(EIO, &e.message)
            }
        },
        Command::Write { offset, fua, .. } => done(image.write(offset, payload, fua).await),
        Command::WriteZeroes { offset, len, fua } => done(image.write_zeroes(offset, len, fua).await),
        Command::Flush => done(image.flush().await),
        // Trim is advisory: the overlay keeps what it has.
        Command::Trim => ok(),
        Command::Cache { offset, len } => {
            image.prefetch(offset, len);
            ok()
        }
        Command::BlockStatus { offset, len, one } => {
            let d = descriptors(len, image.allocation(offset, len), one);
            vec![block_status_chunk(cookie, &d)]
        }
        Command::Refuse { errno, reason } => fail(errno, reason),
        Command::Disconnect => Vec::new(),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(mut wr: BufWriter<W>, mut rx: mpsc::Receiver<Reply>) {
    while let Some(reply) = rx.recv().await {
        for part in &reply.parts {
            if wr.write_all(part).await.is_err() {
                return;
            }
        }
        drop(reply);
        // Flush when nothing else is ready to go: replies batch under load.
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
}
