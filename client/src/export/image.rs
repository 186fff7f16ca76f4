//! What an export serves: the revision, with the overlay's pages on top
//! in writable mode.

use super::overlay::{Overlay, Part, PAGE};
use super::remote::RemoteRevision;
use backy_common::nbd::{STATE_HOLE, STATE_ZERO};
use backy_common::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Zeros written per step of a `WRITE_ZEROES`.
const ZERO_STEP: u64 = 1 << 20;

pub struct Image {
    pub remote: Arc<RemoteRevision>,
    overlay: Option<Arc<Overlay>>,
    /// Writes one at a time: a write that merges revision bytes into a
    /// partly written page must not race another write of that page.
    writing: tokio::sync::Mutex<()>,
    pub served_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("overlay worker failed: {e}")))?
}

impl Image {
    pub fn new(remote: Arc<RemoteRevision>, overlay: Option<Overlay>) -> Image {
        Image {
            remote,
            overlay: overlay.map(Arc::new),
            writing: tokio::sync::Mutex::new(()),
            served_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        }
    }

    pub fn size(&self) -> u64 {
        self.remote.size()
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_deref()
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let data = match &self.overlay {
            None => self.remote.read(offset, len as usize).await?,
            Some(o) => {
                let mut out = vec![0u8; len as usize];
                for part in o.parts(offset, u64::from(len)) {
                    match part {
                        Part::Base { offset: at, len } => {
                            let bytes = self.remote.read(at, len as usize).await?;
                            let from = (at - offset) as usize;
                            out[from..from + len as usize].copy_from_slice(&bytes);
                        }
                        Part::Overlay { offset: at, len } => {
                            let o = o.clone();
                            let bytes = blocking(move || {
                                let mut b = vec![0u8; len as usize];
                                o.read(at, &mut b).map(|_| b)
                            })
                            .await?;
                            let from = (at - offset) as usize;
                            out[from..from + len as usize].copy_from_slice(&bytes);
                        }
                    }
                }
                out
            }
        };
        self.served_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Starts fetching `offset..offset + len` (an NBD `CACHE` request).
    pub fn prefetch(&self, offset: u64, len: u32) {
        self.remote.prefetch(offset..offset + u64::from(len));
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        let Some(o) = &self.overlay else {
            return Err(Error::invalid("the export is read-only"));
        };
        if data.is_empty() {
            return Ok(());
        }
        let _one = self.writing.lock().await;
        let mut pages = Vec::new();
        for page in o.partial_pages(offset, data.len() as u64) {
            let at = page * PAGE;
            let len = PAGE.min(self.size() - at);
            pages.push((page, self.remote.read(at, len as usize).await?));
        }
        let len = data.len() as u64;
        let o = o.clone();
        blocking(move || {
            o.write(offset, &data, &pages)?;
            if fua {
                o.flush()?;
            }
            Ok(())
        })
        .await?;
        self.written_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<()> {
        let end = offset + u64::from(len);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_STEP);
            self.write(at, vec![0u8; n as usize], false).await?;
            at += n;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<()> {
        match &self.overlay {
            None => Ok(()),
            Some(o) => {
                let o = o.clone();
                blocking(move || o.flush()).await
            }
        }
    }

    /// `base:allocation` of `offset..offset + len` as (length, flags) from
    /// `offset`: zero blocks of the revision not written in the overlay are
    /// holes that read as zeros; everything else is data.
    pub fn allocation(&self, offset: u64, len: u32) -> Vec<(u64, u32)> {
        let manifest = self.remote.manifest();
        let bs = u64::from(manifest.block_size());
        let end = offset + u64::from(len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let stop = ((block + 1) * bs).min(end);
            let hole = self.remote.is_zero_block(block)
                && !self.overlay.as_ref().is_some_and(|o| o.touches(at..stop));
            out.push((stop - at, if hole { STATE_HOLE | STATE_ZERO } else { 0 }));
            at = stop;
        }
        out
    }
}
