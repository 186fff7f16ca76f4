//! A revision's manifest (the `.digests` bytes, `common/src/manifest.rs`)
//! in RADOS objects of at most [`DIGESTS_PART_BYTES`]: one is 8 MiB per
//! TiB of image, and RADOS objects are limited (128 MiB by default). Read
//! back, it is checked against the record's manifest digest.

use super::error::{PoolError, Result};
use super::names::{digests_object, DIGESTS_PART_BYTES};
use crate::ceph::IoCtx;
use backy_common::manifest::{block_count, Digest, Manifest, DIGEST_LEN, HEADER_LEN};
use backy_common::revision::RevisionMeta;
use backy_common::{JobName, RevisionId};
use std::io::{self, Read, Write};

/// How many pieces the manifest of an image of `size` bytes in blocks of
/// `block_size` takes.
pub fn part_count(size: u64, block_size: u32) -> u64 {
    let bytes = HEADER_LEN as u64 + DIGEST_LEN as u64 * block_count(size, block_size);
    bytes.div_ceil(DIGESTS_PART_BYTES as u64)
}

/// A `Write` that hands its bytes on in pieces of `limit` bytes (the last
/// may be shorter): `put(part, bytes)`.
pub struct PartWriter<F> {
    put: F,
    buf: Vec<u8>,
    part: u64,
    limit: usize,
}

impl<F: FnMut(u64, &[u8]) -> io::Result<()>> PartWriter<F> {
    pub fn new(limit: usize, put: F) -> Self {
        PartWriter {
            put,
            buf: Vec::new(),
            part: 0,
            limit: limit.max(1),
        }
    }

    /// Hands on the last piece; returns how many pieces there were.
    pub fn finish(mut self) -> io::Result<u64> {
        if !self.buf.is_empty() || self.part == 0 {
            (self.put)(self.part, &self.buf)?;
            self.part += 1;
        }
        Ok(self.part)
    }
}

impl<F: FnMut(u64, &[u8]) -> io::Result<()>> Write for PartWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.limit - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.limit {
            (self.put)(self.part, &self.buf)?;
            self.part += 1;
            self.buf.clear();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Read` over pieces `0..count`, each fetched when reached.
pub struct PartReader<F> {
    get: F,
    count: u64,
    next: u64,
    piece: Vec<u8>,
    at: usize,
}

impl<F: FnMut(u64) -> io::Result<Vec<u8>>> PartReader<F> {
    pub fn new(count: u64, get: F) -> Self {
        PartReader {
            get,
            count,
            next: 0,
            piece: Vec::new(),
            at: 0,
        }
    }
}

impl<F: FnMut(u64) -> io::Result<Vec<u8>>> Read for PartReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            if self.next == self.count {
                return Ok(0);
            }
            self.piece = (self.get)(self.next)?;
            self.next += 1;
            self.at = 0;
        }
        let n = out.len().min(self.piece.len() - self.at);
        out[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Writes `manifest` as revision `id`'s pieces; returns its digest.
pub fn write_manifest(io: &IoCtx, job: &JobName, id: &RevisionId, manifest: &Manifest) -> Result<Digest> {
    let mut w = PartWriter::new(DIGESTS_PART_BYTES, |part, bytes| {
        io.write_full(&digests_object(job, id, part), bytes)
            .map_err(|e| io::Error::other(e.to_string()))
    });
    let digest = manifest.write_to(&mut w).map_err(|e| PoolError::Tool {
        command: format!("writing the manifest of {job}@{id}"),
        detail: e.to_string(),
    })?;
    w.finish().map_err(|e| PoolError::Tool {
        command: format!("writing the manifest of {job}@{id}"),
        detail: e.to_string(),
    })?;
    Ok(digest)
}

/// Revision `meta`'s manifest, read piece by piece and checked against its
/// record (digest, size, block size): any difference, or a missing piece,
/// is [`PoolError::DataLoss`].
pub fn read_manifest(io: &IoCtx, job: &JobName, meta: &RevisionMeta) -> Result<Manifest> {
    let what = format!("job {job}: manifest of revision {}", meta.id);
    let count = part_count(meta.size, meta.block_size);
    let mut missing: Option<crate::ceph::CephError> = None;
    let reader = PartReader::new(count, |part| {
        io.read(&digests_object(job, &meta.id, part)).map_err(|e| {
            let kind = if e.is_not_found() {
                io::ErrorKind::NotFound
            } else {
                io::ErrorKind::Other
            };
            let text = e.to_string();
            missing = Some(e);
            io::Error::new(kind, text)
        })
    });
    let read = Manifest::read_from(reader, &what);
    if let Some(e) = missing {
        if !e.is_not_found() {
            return Err(e.into());
        }
        return Err(PoolError::DataLoss {
            what,
            detail: format!("a piece is missing ({e})"),
        });
    }
    let (m, digest) = read.map_err(|e| PoolError::DataLoss {
        what: what.clone(),
        detail: e.message,
    })?;
    let got = hex::encode(digest);
    if got != meta.manifest_digest {
        return Err(PoolError::DataLoss {
            what,
            detail: format!(
                "digest {got} does not match the record's {}",
                meta.manifest_digest
            ),
        });
    }
    if m.image_size() != meta.size || m.block_size() != meta.block_size {
        return Err(PoolError::DataLoss {
            what,
            detail: "its size or block size differs from the record's".into(),
        });
    }
    Ok(m)
}

/// Removes revision `id`'s manifest pieces (from the first, until one is
/// missing); returns how many went.
pub fn remove_manifest(io: &IoCtx, job: &JobName, id: &RevisionId) -> Result<u64> {
    let mut part = 0;
    loop {
        match io.remove(&digests_object(job, id, part)) {
            Ok(()) => part += 1,
            Err(e) if e.is_not_found() => return Ok(part),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::digest;

    fn pieces_of(bytes: &[u8], limit: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut w = PartWriter::new(limit, |part, b| {
            assert_eq!(part as usize, out.len());
            out.push(b.to_vec());
            Ok(())
        });
        w.write_all(bytes).unwrap();
        let n = w.finish().unwrap();
        assert_eq!(n as usize, out.len());
        out
    }

    #[test]
    fn pieces_are_full_but_the_last_and_join_back() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for limit in [1, 7, 100, 999, 1000, 1001, 4096] {
            let pieces = pieces_of(&bytes, limit);
            assert_eq!(pieces.len(), bytes.len().div_ceil(limit), "limit {limit}");
            assert!(pieces[..pieces.len() - 1].iter().all(|p| p.len() == limit));
            let mut joined = Vec::new();
            PartReader::new(pieces.len() as u64, |i| Ok(pieces[i as usize].clone()))
                .read_to_end(&mut joined)
                .unwrap();
            assert_eq!(joined, bytes, "limit {limit}");
        }
        // Nothing written is still one (empty) piece: a manifest is never empty.
        assert_eq!(pieces_of(&[], 8), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn part_count_is_what_the_writer_makes() {
        let bs = 64 << 10;
        for size in [0u64, 1, 64 << 10, 10 << 30, (1 << 40) + 1] {
            let m = Manifest::zeroed(size, bs).unwrap();
            let mut n = 0;
            let mut w = PartWriter::new(DIGESTS_PART_BYTES, |_, _| {
                n += 1;
                Ok(())
            });
            m.write_to(&mut w).unwrap();
            w.finish().unwrap();
            assert_eq!(part_count(size, bs), n, "size {size}");
        }
    }

    #[test]
    fn a_manifest_read_from_pieces_is_the_one_written() {
        let bs = 64 << 10;
        let mut m = Manifest::zeroed(300 * bs as u64 + 5, bs).unwrap();
        m.set(3, digest(b"three")).unwrap();
        m.set(300, digest(b"tail")).unwrap();
        let pieces = pieces_of(&m.encode(), 1000);
        let (back, d) = Manifest::read_from(
            PartReader::new(pieces.len() as u64, |i| Ok(pieces[i as usize].clone())),
            "t",
        )
        .unwrap();
        assert_eq!(back, m);
        assert_eq!(d, m.file_digest());
    }
}
