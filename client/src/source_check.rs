//! `verify --source`: compares a stored revision with the source it was
//! taken from, block digest by block digest, for all blocks or a random
//! sample. Only meaningful while the source still holds that state (a
//! snapshot, or a disk not written since): a difference is reported, the
//! revision's trust is left alone.

use crate::connect::Client;
use crate::source;
use crate::view::short_id;
use backy_common::encryption::Key;
use backy_common::manifest::{digest, Manifest};
use backy_common::source::SourceSpec;
use backy_common::units::format_bytes;
use backy_common::{Error, JobName, Result};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// The outcome of one comparison.
#[derive(Debug, Serialize)]
pub struct SourceCompared {
    pub job: String,
    pub revision: String,
    pub blocks_total: u64,
    pub blocks_compared: u64,
    pub bytes_read: u64,
    /// Offsets of compared blocks whose digest differs.
    pub differing: Vec<u64>,
}

impl SourceCompared {
    pub fn equal(&self) -> bool {
        self.differing.is_empty()
    }
}

impl fmt::Display for SourceCompared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let of = if self.blocks_compared == self.blocks_total {
            format!("all {}", backy_common::units::count(self.blocks_total, "block"))
        } else {
            format!(
                "{} of {} (sampled)",
                self.blocks_compared,
                backy_common::units::count(self.blocks_total, "block")
            )
        };
        if self.equal() {
            write!(
                f,
                "{}: revision {}: {of}, {} read, equal the source",
                self.job,
                self.revision,
                format_bytes(self.bytes_read)
            )
        } else {
            write!(
                f,
                "{}: revision {}: {} of {of} differ from the source at offsets {:?}",
                self.job,
                self.revision,
                self.differing.len(),
                self.differing
            )
        }
    }
}

/// Which of `count` blocks a `percent` sample compares: each block with
/// probability `percent`/100, decided by a hash of `seed` and the index,
/// and at least one block when `percent` > 0.
pub fn sample(count: u64, percent: f64, seed: u64) -> Vec<u64> {
    if percent >= 100.0 {
        return (0..count).collect();
    }
    if percent <= 0.0 || count == 0 {
        return Vec::new();
    }
    let threshold = (percent / 100.0 * u64::MAX as f64) as u64;
    let mut out: Vec<u64> = (0..count)
        .filter(|&i| splitmix(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) < threshold)
        .collect();
    if out.is_empty() {
        out.push(splitmix(seed) % count);
    }
    out
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fetches the manifest of the revision `spec` names and compares the
/// sampled blocks of `source` with it.
pub async fn compare(
    client: &mut Client,
    job: &JobName,
    spec: &str,
    source: SourceSpec,
    percent: f64,
    key: Option<Arc<Key>>,
) -> Result<SourceCompared> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(Error::invalid(format!(
            "sample {percent}%: give a percentage in (0, 100]"
        )));
    }
    let (info, manifest) = crate::manifest::fetch(client, job.as_str(), spec).await?;
    let revision = short_id(&info).to_string();
    // An encrypted revision's digests are of ciphertext: the source is
    // encrypted with its key before it is digested.
    let key = crate::encryption::revision_key(job.as_str(), &revision, &info.key_check, key.as_ref())?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let blocks = sample(manifest.block_count(), percent, seed);
    let job_name = job.to_string();
    let rev_id = info.id.clone();
    tokio::task::spawn_blocking(move || {
        if let SourceSpec::CephRbd { .. } = source {
            return compare_rbd_snapshot(&source, job_name, revision, &manifest, key);
        }
        let mut src = source::open(&source, &job_name, &rev_id)?;
        if src.size() != manifest.image_size() {
            return Err(Error::precondition(format!(
                "the source has {} bytes, revision {revision} {}: it is not the state this revision was taken from",
                src.size(),
                manifest.image_size()
            )));
        }
        let (bytes_read, differing) = compare_blocks(&mut *src, &manifest, &blocks, key.as_deref())?;
        Ok(SourceCompared {
            job: job_name,
            revision,
            blocks_total: manifest.block_count(),
            blocks_compared: blocks.len() as u64,
            bytes_read,
            differing,
        })
    })
    .await
    .map_err(|e| Error::internal(format!("source reader failed: {e}")))?
}

/// A Ceph RBD source is compared through the revision's own snapshot
/// (`backy-<id>`, kept for the newest revision as the next parent): all of
/// it is read with `rbd export-diff` and every block whose digest differs
/// from the manifest is reported.
fn compare_rbd_snapshot(
    source: &SourceSpec,
    job: String,
    revision: String,
    manifest: &Manifest,
    key: Option<Arc<Key>>,
) -> Result<SourceCompared> {
    use crate::source::rbd::{Rbd, SNAP_PREFIX};
    use backy_proto::push_frame::Frame;
    let rbd = Rbd::from_spec(source)?;
    let snap = format!("{SNAP_PREFIX}{revision}");
    if !rbd.snapshots()?.contains(&snap) {
        return Err(Error::not_found(format!(
            "snapshot {} is gone: only a revision whose snapshot is kept (the newest) can be compared",
            rbd.snap_spec(&snap)
        )));
    }
    let size = rbd.size(Some(&snap))?;
    if size != manifest.image_size() {
        return Err(Error::data_loss(format!(
            "snapshot {} has {size} bytes, revision {revision} {}",
            rbd.snap_spec(&snap),
            manifest.image_size()
        )));
    }
    let bs = u64::from(manifest.block_size());
    let mut differing: Vec<u64> = Vec::new();
    let mut note = |offset: u64, len: u64| {
        let mut b = offset / bs * bs;
        while b < offset + len {
            if differing.last() != Some(&b) {
                differing.push(b);
            }
            b += bs;
        }
    };
    // A full export compared with the manifest emits frames exactly for
    // the blocks that differ from it.
    let streamed = crate::push::rbd::export(
        &rbd,
        &crate::push::rbd::Diff::Full { known: None },
        &snap,
        manifest.clone(),
        None,
        key,
        None,
        |frame| {
            match frame {
                Frame::Data(d) => note(d.offset, d.data.len() as u64),
                Frame::Zero(z) => note(z.offset, z.length),
                _ => {}
            }
            Ok(())
        },
        |_| {},
    )?;
    Ok(SourceCompared {
        job,
        revision,
        blocks_total: manifest.block_count(),
        blocks_compared: manifest.block_count(),
        bytes_read: streamed.bytes_read,
        differing,
    })
}

/// Reads `blocks` of `src` and returns the bytes read and the offsets of
/// the blocks whose digest differs from `manifest`.
pub fn compare_blocks(
    src: &mut dyn source::Source,
    manifest: &Manifest,
    blocks: &[u64],
    key: Option<&Key>,
) -> Result<(u64, Vec<u64>)> {
    let mut buf = vec![0u8; manifest.block_size() as usize];
    let mut read = 0u64;
    let mut differing = Vec::new();
    for &b in blocks {
        let len = manifest.block_len(b) as usize;
        let off = manifest.block_offset(b);
        src.read_at(off, &mut buf[..len])?;
        read += len as u64;
        if let Some(key) = key {
            key.encrypt(off, &mut buf[..len])?;
        }
        if Some(&digest(&buf[..len])) != manifest.get(b) {
            differing.push(off);
        }
    }
    Ok((read, differing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemSource;

    #[test]
    fn samples_about_the_asked_share() {
        assert_eq!(sample(5, 100.0, 1), vec![0, 1, 2, 3, 4]);
        assert!(sample(5, 0.0, 1).is_empty());
        assert!(sample(0, 50.0, 1).is_empty());
        assert_eq!(sample(10, 0.001, 7).len(), 1, "at least one block");
        for seed in [1u64, 2, 3] {
            let n = sample(10_000, 10.0, seed).len();
            assert!((800..1200).contains(&n), "10% of 10000 sampled {n}");
        }
        assert_ne!(
            sample(1000, 10.0, 1),
            sample(1000, 10.0, 2),
            "seeds pick different blocks"
        );
        assert_eq!(sample(1000, 10.0, 5), sample(1000, 10.0, 5));
    }

    #[test]
    fn finds_the_differing_blocks() {
        let bs = 64 << 10;
        let mut data = vec![7u8; 3 * bs as usize + 100];
        let mut manifest = Manifest::zeroed(data.len() as u64, bs).unwrap();
        for b in 0..manifest.block_count() {
            let off = manifest.block_offset(b) as usize;
            let len = manifest.block_len(b) as usize;
            manifest.set(b, digest(&data[off..off + len])).unwrap();
        }
        data[2 * bs as usize + 5] ^= 1;
        data[3 * bs as usize + 99] ^= 1;
        let mut src = MemSource::new(data);
        let (read, diff) = compare_blocks(&mut src, &manifest, &[0, 1, 2, 3], None).unwrap();
        assert_eq!(read, 3 * bs as u64 + 100);
        assert_eq!(diff, vec![2 * bs as u64, 3 * bs as u64]);
        let (_, diff) = compare_blocks(&mut src, &manifest, &[0, 1], None).unwrap();
        assert!(diff.is_empty());
    }
}
