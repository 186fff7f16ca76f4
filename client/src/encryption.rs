//! The job's key on the hypervisor: read from its key file, made by
//! `backy-client keygen`, and the offline decryption of a revision file
//! (`backy-client decrypt`). The cipher itself is
//! `backy_common::encryption`; the format is docs/encryption.md.

use backy_common::config::Encryption;
use backy_common::encryption::{Key, KEY_LEN, UNIT};
use backy_common::{Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// The key a job's `encryption:` names, if it has one.
pub fn job_key(encryption: Option<&Encryption>) -> Result<Option<Arc<Key>>> {
    encryption
        .map(|e| read_key(&e.key_file).map(Arc::new))
        .transpose()
}

/// Reads a key file: exactly 64 bytes, readable by nobody but its owner
/// and group (a key others can read is refused, not used).
pub fn read_key(path: &Path) -> Result<Key> {
    let what = || format!("key file {}", path.display());
    let mut file = File::open(path).map_err(|e| Error::io(what(), e))?;
    let meta = file.metadata().map_err(|e| Error::io(what(), e))?;
    if meta.mode() & 0o007 != 0 {
        return Err(Error::precondition(format!(
            "{} is open to other users (mode {:o}): chmod 600 it",
            what(),
            meta.mode() & 0o777
        )));
    }
    let mut bytes = Vec::with_capacity(KEY_LEN + 1);
    Read::by_ref(&mut file)
        .take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(what(), e))?;
    Key::from_bytes(&bytes).map_err(|e| e.context(what()))
}

/// The key to decrypt the revision with: `None` for a revision stored in
/// the clear (a configured key is not needed then); refused when the
/// revision is encrypted and the key is missing or another one.
pub fn revision_key(
    job: &str,
    short: &str,
    key_check: &[u8],
    key: Option<&Arc<Key>>,
) -> Result<Option<Arc<Key>>> {
    let stored = backy_common::encryption::parse_key_check(key_check)
        .map_err(|e| Error::data_loss(format!("revision {short}: {}", e.message)))?;
    match (stored, key) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(Error::precondition(format!(
            "revision {short} of job {job} is encrypted and no key was given: name the key file in \
             client.yaml (jobs: {job}: encryption: key-file:) or give --key-file"
        ))),
        (Some(check), Some(key)) if check == *key.check() => Ok(Some(key.clone())),
        (Some(check), Some(key)) => Err(Error::precondition(format!(
            "revision {short} of job {job} was encrypted with another key (key check {}, this key's {}): \
             nothing was read or written",
            hex::encode(check),
            hex::encode(key.check())
        ))),
    }
}

/// Writes a new key file of 64 random bytes, mode 0600; never replaces a
/// file (that would lose the key of every backup made with it).
pub fn keygen(path: &Path) -> Result<Key> {
    let mut bytes = [0u8; KEY_LEN];
    File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    let key = Key::from_bytes(&bytes)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::exists(format!(
                    "{} exists: not replaced (the backups made with it need it)",
                    path.display()
                ))
            } else {
                Error::io(format!("creating key file {}", path.display()), e)
            }
        })?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("writing key file {}", path.display()), e))?;
    Ok(key)
}

/// Decrypts a stored revision image (a file copied off the storage host)
/// to `out`, with the key alone: unit by unit, all-zero units as zeros.
/// Returns the bytes written.
pub fn decrypt_image(key: &Key, input: &mut dyn Read, out: &mut dyn Write) -> Result<u64> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let n = read_full(input, &mut buf).map_err(|e| Error::io("reading the revision", e))?;
        if n == 0 {
            return Ok(offset);
        }
        if !(n as u64).is_multiple_of(backy_common::encryption::SIZE_ALIGN) {
            return Err(Error::invalid(format!(
                "the revision ends at {}: an encrypted image is a multiple of {} bytes",
                offset + n as u64,
                backy_common::encryption::SIZE_ALIGN
            )));
        }
        key.decrypt(offset, &mut buf[..n])?;
        out.write_all(&buf[..n])
            .map_err(|e| Error::io("writing the plaintext", e))?;
        offset += n as u64;
        debug_assert!(n < CHUNK || offset.is_multiple_of(UNIT));
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.key");
        let key = keygen(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        assert_eq!(read_key(&path).unwrap().check(), key.check());
        let e = keygen(&path).unwrap_err();
        assert!(e.message.contains("not replaced"), "{}", e.message);
        assert_eq!(
            read_key(&path).unwrap().check(),
            key.check(),
            "the key is unchanged"
        );
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let e = read_key(&path).unwrap_err();
        assert!(e.message.contains("open to other users"), "{}", e.message);
    }

    #[test]
    fn decrypts_what_was_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(&dir.path().join("k")).unwrap();
        let g = backy_common::ranges::GRANULE as usize;
        let mut plain = vec![0u8; 3 * (1 << 20) + 512];
        for (i, b) in plain.iter_mut().enumerate().skip(g) {
            *b = (i % 251) as u8;
        }
        let mut stored = plain.clone();
        key.encrypt(0, &mut stored).unwrap();
        assert!(stored[..g].iter().all(|&b| b == 0), "a zero granule stays a hole");
        let mut out = Vec::new();
        assert_eq!(
            decrypt_image(&key, &mut &stored[..], &mut out).unwrap(),
            plain.len() as u64
        );
        assert_eq!(out, plain);
    }
}
