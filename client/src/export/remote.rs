//! The revision an export serves, read from the server in runs of 64 KiB
//! granules over the authenticated gRPC connection (`ReadGranules`). Every
//! run is checked against the manifest before a byte of it is served: a
//! block's first run brings the chaining values of all its granules, which
//! the run's own bytes must merge with into the manifest's digest of the
//! whole block (`backy_common::block_proof`); later runs of that block are
//! checked against those proven values. Zero blocks are never fetched.
//!
//! Runs live in a cache bounded in bytes (oldest out first). Requests that
//! look sequential fetch whole 1 MiB units and read ahead; random ones
//! fetch only the granules they touch. A run being fetched is shared by
//! every request that needs it, and fetched on a task of its own, so a
//! client that hangs up does not waste it.

use crate::connect::{status_error, Client};
use backy_common::block_proof::{self, ChainingValue};
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::GRANULE;
use backy_common::{Error, Result};
use backy_proto::ReadGranulesRequest;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Granules per fetch at most (1 MiB: one gRPC message).
pub const UNIT_GRANULES: u64 = 16;
/// How far ahead of a sequential reader runs are fetched.
pub const READ_AHEAD: u64 = 16 << 20;
/// A request this close to where the last one ended is near it (readers
/// such as `qemu-img convert` keep several requests in flight, which arrive
/// slightly out of order); two near ones in a row make a sequential reader.
const NEAR: u64 = 8 << 20;
/// One fetch may take this long before it fails (the reader gets EIO, the
/// next read tries again).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Blocks whose proven chaining values are kept (32 bytes per granule:
/// 2 KiB per 4 MiB block).
const PROVEN_BLOCKS: usize = 16 << 10;

/// A fetched and checked run of granules of one block.
struct Run {
    /// Offset of the run's first byte in the image.
    offset: u64,
    data: Vec<u8>,
}

type Fetch = Shared<BoxFuture<'static, std::result::Result<Arc<Run>, Error>>>;

enum Slot {
    Ready(Arc<Run>),
    Pending(Fetch),
}

/// Granules by (block, granule), fetched or being fetched.
struct Cache {
    slots: HashMap<(u64, u64), Slot>,
    /// Ready granules, oldest first.
    order: VecDeque<(u64, u64)>,
    budget: usize,
}

impl Cache {
    fn ready_bytes(&self) -> usize {
        self.order.len() * GRANULE as usize
    }

    fn evict(&mut self) {
        while self.ready_bytes() > self.budget {
            let Some(key) = self.order.pop_front() else { break };
            if matches!(self.slots.get(&key), Some(Slot::Ready(_))) {
                self.slots.remove(&key);
            }
        }
    }
}

/// What an export has moved so far.
#[derive(Debug, Default)]
pub struct Counters {
    pub fetched_bytes: AtomicU64,
    pub fetches: AtomicU64,
    pub failed_fetches: AtomicU64,
}

/// One revision, readable at any offset.
pub struct RemoteRevision {
    client: Client,
    job: String,
    id: String,
    manifest: Manifest,
    cache: Mutex<Cache>,
    proven: Mutex<ProvenCvs>,
    last_end: AtomicU64,
    /// Requests in a row that began near the previous one's end.
    near_streak: AtomicU64,
    pub counters: Counters,
}

/// Chaining values per block: being fetched (the cell) or proven.
#[derive(Default)]
struct ProvenCvs {
    cells: HashMap<u64, Arc<OnceCell<Arc<Vec<ChainingValue>>>>>,
    order: VecDeque<u64>,
}

impl RemoteRevision {
    pub fn new(client: Client, job: &str, id: &str, manifest: Manifest, cache_bytes: usize) -> Arc<Self> {
        Arc::new(RemoteRevision {
            client,
            job: job.to_string(),
            id: id.to_string(),
            manifest,
            cache: Mutex::new(Cache {
                slots: HashMap::new(),
                order: VecDeque::new(),
                budget: cache_bytes.max(READ_AHEAD as usize),
            }),
            proven: Mutex::new(ProvenCvs::default()),
            last_end: AtomicU64::new(u64::MAX),
            near_streak: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.manifest.image_size()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether `block` holds only zeros (per the manifest).
    pub fn is_zero_block(&self, block: u64) -> bool {
        self.manifest.is_zero(block)
    }

    /// The bytes at `offset..offset + len` (within the image), each one
    /// checked against the manifest.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset + len as u64;
        let near = self.last_end.swap(end, Ordering::Relaxed).abs_diff(offset) <= NEAR;
        let sequential = if near {
            self.near_streak.fetch_add(1, Ordering::Relaxed) >= 1
        } else {
            self.near_streak.store(0, Ordering::Relaxed);
            false
        };
        let mut out = vec![0u8; len];
        let mut waits = Vec::new();
        for (key, fetch) in self.granules(offset..end, sequential) {
            waits.push(async move { (key, fetch.await) });
        }
        for (key, run) in futures::future::join_all(waits).await {
            let run = run?;
            // The part of granule `key` that the request covers.
            let g_start = self.manifest.block_offset(key.0) + key.1 * GRANULE;
            let g_end =
                (g_start + GRANULE).min(self.manifest.block_offset(key.0) + self.manifest.block_len(key.0));
            let (from, to) = (g_start.max(offset), g_end.min(end));
            let src = &run.data[(from - run.offset) as usize..(to - run.offset) as usize];
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        if sequential {
            self.read_ahead(end);
        }
        Ok(out)
    }

    /// Makes sure the granules of `range` are fetched or being fetched
    /// (a `CACHE` request, read-ahead).
    pub fn prefetch(self: &Arc<Self>, range: Range<u64>) {
        drop(self.granules(range, true));
    }

    fn read_ahead(self: &Arc<Self>, from: u64) {
        let end = (from + READ_AHEAD).min(self.size());
        if from < end {
            self.prefetch(from..end);
        }
    }

    /// The fetch of every data granule of `range`, starting the fetches of
    /// those neither cached nor on their way: exactly the granules touched
    /// (random access) or whole 1 MiB units (`sequential`).
    fn granules(self: &Arc<Self>, range: Range<u64>, sequential: bool) -> Vec<((u64, u64), Fetch)> {
        let mut out = Vec::new();
        if range.is_empty() {
            return out;
        }
        let bs = u64::from(self.manifest.block_size());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for block in range.start / bs..range.end.div_ceil(bs) {
            if self.manifest.is_zero(block) {
                continue;
            }
            let base = block * bs;
            let block_len = self.manifest.block_len(block);
            let count = block_proof::granule_count(block_len) as u64;
            let first = (range.start.max(base) - base) / GRANULE;
            let last = (range.end.min(base + block_len) - base).div_ceil(GRANULE);
            let mut g = first;
            while g < last {
                if let Some(slot) = cache.slots.get(&(block, g)) {
                    let fetch = match slot {
                        Slot::Ready(run) => futures::future::ready(Ok(run.clone())).boxed().shared(),
                        Slot::Pending(f) => f.clone(),
                    };
                    out.push(((block, g), fetch));
                    g += 1;
                    continue;
                }
                // A new run: from here to the first granule already known,
                // within the unit (sequential: the whole unit).
                let unit_end = ((g / UNIT_GRANULES + 1) * UNIT_GRANULES).min(count);
                let (start, stop) = if sequential && g == 0 {
                    // A sequential reader at a block's start gets the whole
                    // block, checked by its digest: no chaining values needed.
                    (g, count)
                } else if sequential {
                    (g, unit_end)
                } else {
                    (g, last.min(unit_end))
                };
                let mut stop_at = start + 1;
                while stop_at < stop && !cache.slots.contains_key(&(block, stop_at)) {
                    stop_at += 1;
                }
                if (start, stop_at) != (0, count) {
                    // Not the whole block after all (part of it is known):
                    // one call's worth, checked with chaining values.
                    stop_at = stop_at.min(unit_end);
                }
                let fetch = self.start_fetch(block, start..stop_at);
                for k in start..stop_at {
                    cache.slots.insert((block, k), Slot::Pending(fetch.clone()));
                    if k < last {
                        out.push(((block, k), fetch.clone()));
                    }
                }
                g = stop_at;
            }
        }
        out
    }

    /// Fetches granules `granules` of `block` on a task of its own; when
    /// done, they become ready in the cache (or are forgotten on error, so
    /// the next read asks again).
    fn start_fetch(self: &Arc<Self>, block: u64, granules: Range<u64>) -> Fetch {
        let this = self.clone();
        let range = granules.clone();
        let task = tokio::spawn(async move {
            let result = this.fetch(block, range.clone()).await.map(Arc::new);
            let mut cache = this.cache.lock().unwrap_or_else(|p| p.into_inner());
            for g in range {
                match &result {
                    Ok(run) => {
                        cache.slots.insert((block, g), Slot::Ready(run.clone()));
                        cache.order.push_back((block, g));
                    }
                    Err(_) => {
                        cache.slots.remove(&(block, g));
                    }
                }
            }
            cache.evict();
            result
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(Error::internal(format!("fetch task failed: {e}"))))
        }
        .boxed()
        .shared()
    }

    async fn fetch(&self, block: u64, granules: Range<u64>) -> Result<Run> {
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_checked(block, granules.clone()).await;
        match &result {
            Ok(run) => {
                self.counters
                    .fetched_bytes
                    .fetch_add(run.data.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.failed_fetches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %self.job, block, "export: fetch failed: {e}");
            }
        }
        result
    }

    async fn fetch_checked(&self, block: u64, granules: Range<u64>) -> Result<Run> {
        let block_len = self.manifest.block_len(block);
        let offset = self.manifest.block_offset(block) + granules.start * GRANULE;
        let want = ((granules.end * GRANULE).min(block_len) - granules.start * GRANULE) as usize;
        let expected = *self
            .manifest
            .get(block)
            .ok_or_else(|| Error::internal(format!("block {block} outside the manifest")))?;
        let mismatch = || {
            Error::data_loss(format!(
                "block {block} (offset {}) does not match the manifest: the stored revision is damaged there",
                self.manifest.block_offset(block)
            ))
        };
        if !block_proof::has_granule_tree(block_len) {
            let (data, _) = self.call(block, granules, false, want).await?;
            if digest(&data) != expected {
                return Err(mismatch());
            }
            return Ok(Run { offset, data });
        }
        let count = block_proof::granule_count(block_len) as u64;
        if granules == (0..count) {
            return self.fetch_whole(block, block_len, &expected).await.map_err(|e| {
                if e.kind == backy_common::ErrorKind::DataLoss {
                    mismatch()
                } else {
                    e
                }
            });
        }
        let first = granules.start as usize;
        if let Some(cvs) = self.proven(block) {
            if let Some(cvs) = cvs.get() {
                let (data, _) = self.call(block, granules, false, want).await?;
                block_proof::check_against(cvs, first, &data).map_err(|_| mismatch())?;
                return Ok(Run { offset, data });
            }
        }
        // The block's chaining values, proven by the first run that brings
        // them; concurrent runs of the block wait for that one.
        let cell = self.proven_cell(block);
        let mut own = None;
        let cvs = cell
            .get_or_try_init(|| async {
                let (data, cvs) = self.call(block, granules.clone(), true, want).await?;
                let mut cvs = block_proof::parse_cvs(&cvs, block_len)?;
                block_proof::check_granules(&expected, block_len, &mut cvs, first, &data)
                    .map_err(|_| mismatch())?;
                own = Some(data);
                Ok::<_, Error>(Arc::new(cvs))
            })
            .await?
            .clone();
        let data = match own {
            Some(data) => data,
            None => {
                let (data, _) = self.call(block, granules, false, want).await?;
                block_proof::check_against(&cvs, first, &data).map_err(|_| mismatch())?;
                data
            }
        };
        Ok(Run { offset, data })
    }

    /// A whole block in calls of at most [`UNIT_GRANULES`] at once, checked
    /// by one pass that yields its granules' chaining values, whose root
    /// must be the manifest's digest; they are kept as proven.
    async fn fetch_whole(
        &self,
        block: u64,
        block_len: u64,
        expected: &backy_common::manifest::Digest,
    ) -> Result<Run> {
        let count = block_proof::granule_count(block_len) as u64;
        let calls = (0..count).step_by(UNIT_GRANULES as usize).map(|first| {
            let end = (first + UNIT_GRANULES).min(count);
            let want = ((end * GRANULE).min(block_len) - first * GRANULE) as usize;
            self.call(block, first..end, false, want)
        });
        let mut data = Vec::with_capacity(block_len as usize);
        for part in futures::future::try_join_all(calls).await? {
            data.extend_from_slice(&part.0);
        }
        let cvs = block_proof::parse_cvs(&block_proof::chaining_values(&data), block_len)?;
        if &block_proof::root(&cvs, block_len) != expected {
            return Err(Error::data_loss("the block does not match the manifest"));
        }
        let cell = self.proven_cell(block);
        let _ = cell.set(Arc::new(cvs));
        Ok(Run {
            offset: self.manifest.block_offset(block),
            data,
        })
    }

    fn proven(&self, block: u64) -> Option<Arc<OnceCell<Arc<Vec<ChainingValue>>>>> {
        let proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        proven.cells.get(&block).cloned()
    }

    fn proven_cell(&self, block: u64) -> Arc<OnceCell<Arc<Vec<ChainingValue>>>> {
        let mut proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cell) = proven.cells.get(&block) {
            return cell.clone();
        }
        while proven.order.len() >= PROVEN_BLOCKS {
            if let Some(old) = proven.order.pop_front() {
                proven.cells.remove(&old);
            }
        }
        let cell = Arc::new(OnceCell::new());
        proven.cells.insert(block, cell.clone());
        proven.order.push_back(block);
        cell
    }

    /// One `ReadGranules` call; the reply must carry exactly `want` bytes.
    async fn call(
        &self,
        block: u64,
        granules: Range<u64>,
        cvs: bool,
        want: usize,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut request = tonic::Request::new(ReadGranulesRequest {
            job: self.job.clone(),
            revision: self.id.clone(),
            block,
            first_granule: granules.start as u32,
            granules: (granules.end - granules.start) as u32,
            chaining_values: cvs,
        });
        request.set_timeout(FETCH_TIMEOUT);
        let mut client = self.client.clone();
        let reply = tokio::time::timeout(FETCH_TIMEOUT, client.read_granules(request))
            .await
            .map_err(|_| {
                Error::unavailable(format!(
                    "the server did not answer a read within {} s",
                    FETCH_TIMEOUT.as_secs()
                ))
            })?
            .map_err(status_error)?
            .into_inner();
        if reply.data.len() != want {
            return Err(Error::data_loss(format!(
                "the server sent {} bytes of block {block} for {want} asked",
                reply.data.len()
            )));
        }
        Ok((reply.data, reply.chaining_values))
    }
}
