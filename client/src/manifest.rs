//! Fetching a revision's block manifest from the server and checking it
//! against the digest its metadata records.

use crate::connect::{status_error, Client};
use backy_common::manifest::{Header, Manifest, DIGEST_LEN, HEADER_LEN};
use backy_common::{Error, Result};
use backy_proto::{ManifestChunk, ManifestRequest, RevisionInfo};

/// A revision's metadata and its verified manifest.
pub async fn fetch(client: &mut Client, job: &str, revision: &str) -> Result<(RevisionInfo, Manifest)> {
    request(
        client,
        ManifestRequest {
            job: job.to_string(),
            revision: revision.to_string(),
            resume: false,
        },
    )
    .await
}

/// The manifest of the partial image of the interrupted push `id`.
pub async fn fetch_resume(client: &mut Client, job: &str, id: &str) -> Result<(RevisionInfo, Manifest)> {
    request(
        client,
        ManifestRequest {
            job: job.to_string(),
            revision: id.to_string(),
            resume: true,
        },
    )
    .await
}

async fn request(client: &mut Client, request: ManifestRequest) -> Result<(RevisionInfo, Manifest)> {
    let mut stream = client.manifest(request).await.map_err(status_error)?.into_inner();
    let mut assembler = Assembler::default();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        assembler.push(chunk)?;
    }
    assembler.finish()
}

/// Collects manifest chunks, bounded by the size the header announces.
#[derive(Default)]
pub struct Assembler {
    info: Option<RevisionInfo>,
    bytes: Vec<u8>,
    /// Known once the header is in.
    expected_len: Option<usize>,
    chunks: usize,
}

impl Assembler {
    pub fn push(&mut self, chunk: ManifestChunk) -> Result<()> {
        match (chunk.revision, self.chunks) {
            (Some(info), 0) => self.info = Some(info),
            (None, 0) => {
                return Err(Error::data_loss(
                    "manifest stream did not start with the revision",
                ))
            }
            (Some(_), _) => return Err(Error::data_loss("manifest stream names its revision twice")),
            (None, _) => {}
        }
        self.chunks += 1;
        self.bytes.extend_from_slice(&chunk.data);
        if self.expected_len.is_none() && self.bytes.len() >= HEADER_LEN {
            let header = Header::parse(&self.bytes, &self.what())?;
            let len = usize::try_from(header.block_count)
                .ok()
                .and_then(|n| n.checked_mul(DIGEST_LEN))
                .and_then(|n| n.checked_add(HEADER_LEN))
                .ok_or_else(|| Error::data_loss(format!("{}: too large", self.what())))?;
            self.expected_len = Some(len);
        }
        if let Some(len) = self.expected_len {
            if self.bytes.len() > len {
                return Err(Error::data_loss(format!(
                    "{}: more than the {len} bytes its header announces",
                    self.what()
                )));
            }
        }
        Ok(())
    }

    /// The revision and its manifest, once the digest and sizes check out.
    pub fn finish(self) -> Result<(RevisionInfo, Manifest)> {
        let what = self.what();
        let info = self
            .info
            .ok_or_else(|| Error::data_loss("manifest stream was empty"))?;
        let digest = blake3::hash(&self.bytes);
        if !digest.to_hex().eq_ignore_ascii_case(info.manifest_digest.trim()) {
            return Err(Error::data_loss(format!(
                "{what} does not match its recorded digest"
            )));
        }
        let manifest = Manifest::decode(&self.bytes, &what)?;
        if manifest.image_size() != info.size || manifest.block_size() != info.block_size {
            return Err(Error::data_loss(format!(
                "{what} describes {} bytes in blocks of {}, the revision {} bytes in blocks of {}",
                manifest.image_size(),
                manifest.block_size(),
                info.size,
                info.block_size
            )));
        }
        Ok((info, manifest))
    }

    fn what(&self) -> String {
        match &self.info {
            Some(info) if !info.short_id.is_empty() => format!("manifest of revision {}", info.short_id),
            Some(info) => format!("manifest of revision {}", info.id),
            None => "manifest".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::digest;

    const BS: u32 = 64 << 10;

    fn sample() -> (RevisionInfo, Vec<u8>) {
        let mut m = Manifest::zeroed(5 * BS as u64 + 7, BS).unwrap();
        m.set(2, digest(b"x")).unwrap();
        let bytes = m.encode();
        let info = RevisionInfo {
            id: "id".into(),
            short_id: "short".into(),
            size: m.image_size(),
            block_size: BS,
            manifest_digest: blake3::hash(&bytes).to_hex().to_string(),
            ..RevisionInfo::default()
        };
        (info, bytes)
    }

    fn assemble(info: &RevisionInfo, bytes: &[u8], piece: usize) -> Result<(RevisionInfo, Manifest)> {
        let mut a = Assembler::default();
        for (i, data) in bytes.chunks(piece).enumerate() {
            a.push(ManifestChunk {
                revision: (i == 0).then(|| info.clone()),
                data: data.to_vec(),
            })?;
        }
        a.finish()
    }

    #[test]
    fn assembles_and_checks() {
        let (info, bytes) = sample();
        for piece in [1, 10, 64, 1000] {
            let (got, m) = assemble(&info, &bytes, piece).unwrap();
            assert_eq!(got, info);
            assert_eq!(m.encode(), bytes);
        }
    }

    #[test]
    fn refuses_damage() {
        let (info, bytes) = sample();
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 3] ^= 1;
        let e = assemble(&info, &bad, 50).unwrap_err();
        assert_eq!(e.kind, backy_common::ErrorKind::DataLoss);
        assert!(
            e.message.contains("revision short does not match"),
            "{}",
            e.message
        );

        let mut longer = bytes.clone();
        longer.push(0);
        let e = assemble(&info, &longer, 50).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);

        let mut other = info.clone();
        other.size += 1;
        let e = assemble(&other, &bytes, 50).unwrap_err();
        assert!(e.message.contains("describes"), "{}", e.message);

        let e = Assembler::default().finish().unwrap_err();
        assert!(e.message.contains("empty"), "{}", e.message);
        let mut a = Assembler::default();
        let e = a.push(ManifestChunk::default()).unwrap_err();
        assert!(e.message.contains("did not start"), "{}", e.message);
    }
}
