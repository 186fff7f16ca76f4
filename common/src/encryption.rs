//! Client-side encryption of a job's images (docs/encryption.md has the
//! format): AES-256-XTS over 4096-byte data units, the unit's index
//! (byte offset / 4096) as the tweak, a 128-bit little-endian number (as
//! dm-crypt's `aes-xts-plain64` with 4096-byte sectors). Position
//! deterministic, so an unchanged unit encrypts to the same bytes and a
//! revision still costs only its changes; the server stores, digests,
//! verifies and replicates ciphertext without the key.
//!
//! Holes stay holes: a 64 KiB granule ([`GRANULE`], aligned) whose
//! plaintext is all zeros is stored as zeros, never encrypted; decryption
//! gives zeros for every all-zero stored unit (a unit of a granule that
//! was encrypted is all zeros with probability 2^-32768).
//!
//! The key check value (BLAKE3 `derive_key` under [`KEY_CHECK_CONTEXT`],
//! 16 bytes) is what the server records per revision: one way, so it tells
//! two keys apart without revealing either.

use crate::ranges::{is_all_zero, GRANULE};
use crate::{Error, Result};
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

/// Bytes of one data unit (the XTS "sector").
pub const UNIT: u64 = 4096;
/// Bytes of a key file: two AES-256 keys (data key, then tweak key).
pub const KEY_LEN: usize = 64;
/// Bytes of a key check value.
pub const KEY_CHECK_LEN: usize = 16;
/// The context of the key check's key derivation (never change it: stored
/// revisions carry values derived under it).
pub const KEY_CHECK_CONTEXT: &str = "backy 2026 key check";
/// An encrypted image's size must be a multiple of this (the last unit
/// may be short, but whole AES blocks: no ciphertext stealing).
pub const SIZE_ALIGN: u64 = 512;

/// A key check value: 16 bytes derived from a key, or none (plaintext).
pub type KeyCheck = [u8; KEY_CHECK_LEN];

/// The key check value of a key's 64 bytes.
pub fn key_check(key: &[u8]) -> KeyCheck {
    let derived = blake3::derive_key(KEY_CHECK_CONTEXT, key);
    let mut check = [0u8; KEY_CHECK_LEN];
    check.copy_from_slice(&derived[..KEY_CHECK_LEN]);
    check
}

/// Reads a key check value as stored or sent: empty means plaintext.
pub fn parse_key_check(bytes: &[u8]) -> Result<Option<KeyCheck>> {
    match bytes.len() {
        0 => Ok(None),
        KEY_CHECK_LEN => {
            let mut check = [0u8; KEY_CHECK_LEN];
            check.copy_from_slice(bytes);
            Ok(Some(check))
        }
        n => Err(Error::invalid(format!(
            "key check value of {n} bytes: must be {KEY_CHECK_LEN} (or none)"
        ))),
    }
}

/// Reads a key check value as a `.rev` file holds it (hex; absent: plaintext).
pub fn stored_key_check(hex: Option<&str>) -> Result<Option<KeyCheck>> {
    let Some(text) = hex else { return Ok(None) };
    let bytes = hex::decode(text).map_err(|_| Error::data_loss(format!("key_check {text:?} is not hex")))?;
    if bytes.is_empty() {
        return Err(Error::data_loss("an empty key_check"));
    }
    parse_key_check(&bytes)
}

/// How a pushed key check relates to the parent revision's: `None` when
/// they agree (the push may be incremental), else why not, as a sentence
/// for the refusal.
pub fn key_change(parent: Option<&KeyCheck>, pushed: Option<&KeyCheck>) -> Option<&'static str> {
    match (parent, pushed) {
        (None, None) => None,
        (Some(a), Some(b)) if a == b => None,
        (Some(_), Some(_)) => Some("the parent revision was encrypted with another key"),
        (Some(_), None) => Some("the parent revision is encrypted and this push has no key"),
        (None, Some(_)) => Some("the parent revision is not encrypted and this push is"),
    }
}

/// Refuses an image size that cannot be encrypted.
pub fn check_size(size: u64) -> Result<()> {
    if !size.is_multiple_of(SIZE_ALIGN) {
        return Err(Error::invalid(format!(
            "an encrypted job's image must be a multiple of {SIZE_ALIGN} bytes; this one has {size}"
        )));
    }
    Ok(())
}

/// A job's key: the two AES-256 key schedules of XTS and its check value.
#[derive(Clone)]
pub struct Key {
    data: Aes256,
    tweak: Aes256,
    check: KeyCheck,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key(check {})", hex::encode(self.check))
    }
}

type Block = GenericArray<u8, aes::cipher::consts::U16>;

/// AES blocks per full unit.
const UNIT_BLOCKS: usize = (UNIT / 16) as usize;

impl Key {
    /// A key from a key file's bytes: exactly [`KEY_LEN`], halves unequal
    /// (XTS with equal halves is weak, and other implementations refuse it).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key> {
        if bytes.len() != KEY_LEN {
            return Err(Error::invalid(format!(
                "a key file must hold exactly {KEY_LEN} bytes, this one has {}",
                bytes.len()
            )));
        }
        let (a, b) = bytes.split_at(KEY_LEN / 2);
        if a == b {
            return Err(Error::invalid(
                "the key's two halves are equal: not a key from backy-client keygen",
            ));
        }
        Ok(Key {
            data: Aes256::new(GenericArray::from_slice(a)),
            tweak: Aes256::new(GenericArray::from_slice(b)),
            check: key_check(bytes),
        })
    }

    pub fn check(&self) -> &KeyCheck {
        &self.check
    }

    /// Encrypts image bytes at `offset` in place: each all-zero granule
    /// stays zeros, every other is encrypted unit by unit. `offset` must be
    /// granule aligned and `buf` whole granules, except that it may end
    /// at the image's end (a multiple of [`SIZE_ALIGN`]).
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_span(offset, buf.len(), GRANULE)?;
        for (i, granule) in buf.chunks_mut(GRANULE as usize).enumerate() {
            if is_all_zero(granule) {
                continue;
            }
            let start = offset + i as u64 * GRANULE;
            for (j, unit) in granule.chunks_mut(UNIT as usize).enumerate() {
                self.crypt_unit(start / UNIT + j as u64, unit, true);
            }
        }
        Ok(())
    }

    /// Decrypts stored bytes at `offset` in place: all-zero units are
    /// zeros (holes), every other is decrypted. `offset` must be unit
    /// aligned and `buf` whole units, except at the image's end.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_span(offset, buf.len(), UNIT)?;
        for (j, unit) in buf.chunks_mut(UNIT as usize).enumerate() {
            if !is_all_zero(unit) {
                self.crypt_unit(offset / UNIT + j as u64, unit, false);
            }
        }
        Ok(())
    }

    /// XTS of one unit (a whole number of 16-byte blocks, at most
    /// [`UNIT`]): the tweak key encrypts the unit index, each block is
    /// whitened with the running tweak (multiplied by x in GF(2^128) per
    /// block, little endian), and the blocks go through AES together so
    /// AES-NI pipelines them.
    fn crypt_unit(&self, index: u64, unit: &mut [u8], encrypt: bool) {
        let count = unit.len() / 16;
        let mut tweak = Block::from((index as u128).to_le_bytes());
        self.tweak.encrypt_block(&mut tweak);
        let mut t = u128::from_le_bytes(tweak.into());
        let mut tweaks = [0u128; UNIT_BLOCKS];
        let mut blocks = [Block::default(); UNIT_BLOCKS];
        for k in 0..count {
            tweaks[k] = t;
            let p = u128::from_le_bytes(unit[k * 16..k * 16 + 16].try_into().unwrap_or([0; 16]));
            blocks[k] = Block::from((p ^ t).to_le_bytes());
            t = gf_double(t);
        }
        if encrypt {
            self.data.encrypt_blocks(&mut blocks[..count]);
        } else {
            self.data.decrypt_blocks(&mut blocks[..count]);
        }
        for k in 0..count {
            let c = u128::from_le_bytes(blocks[k].into()) ^ tweaks[k];
            unit[k * 16..k * 16 + 16].copy_from_slice(&c.to_le_bytes());
        }
    }
}

/// Multiplication by x in XTS's GF(2^128) (IEEE 1619, little endian).
fn gf_double(t: u128) -> u128 {
    let carry = (t >> 127) as u8;
    (t << 1) ^ (0x87 * carry as u128)
}

fn check_span(offset: u64, len: usize, align: u64) -> Result<()> {
    if !offset.is_multiple_of(align) || !len.is_multiple_of(16) {
        return Err(Error::internal(format!(
            "encryption of {len} bytes at {offset}: must start at a multiple of {align} and be whole AES blocks"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use xts_mode::{get_tweak_default, Xts128};

    fn key_bytes() -> Vec<u8> {
        (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
    }

    /// Another implementation of XTS (the xts-mode crate) agrees unit by unit.
    fn reference(key: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
        let xts = Xts128::<Aes256>::new(
            Aes256::new(GenericArray::from_slice(&key[..32])),
            Aes256::new(GenericArray::from_slice(&key[32..])),
        );
        let mut out = data.to_vec();
        for (j, unit) in out.chunks_mut(UNIT as usize).enumerate() {
            xts.encrypt_sector(unit, get_tweak_default((offset / UNIT + j as u64) as u128));
        }
        out
    }

    #[test]
    fn ieee_1619_vector_10() {
        // IEEE 1619-2007, vector 10: AES-256-XTS, data unit sequence 0xff,
        // 512 bytes of 00 01 .. ff 00 01 ..; first and last ciphertext bytes
        // (the last as OpenSSL computes them).
        let mut key = Vec::new();
        key.extend_from_slice(
            &hex::decode("2718281828459045235360287471352662497757247093699959574966967627").unwrap(),
        );
        key.extend_from_slice(
            &hex::decode("3141592653589793238462643383279502884197169399375105820974944592").unwrap(),
        );
        let k = Key::from_bytes(&key).unwrap();
        let mut unit: Vec<u8> = (0..512).map(|i| i as u8).collect();
        k.crypt_unit(0xff, &mut unit, true);
        assert_eq!(hex::encode(&unit[..16]), "1c3b3a102f770386e4836c99e370cf9b");
        assert_eq!(hex::encode(&unit[496..]), "c4f36ffda9fcea70b9c6e693e148c151");
    }

    #[test]
    fn zero_granules_stay_holes_and_decrypt_to_zeros() {
        let k = Key::from_bytes(&key_bytes()).unwrap();
        let g = GRANULE as usize;
        let mut plain = vec![0u8; 3 * g];
        plain[g + 5] = 1; // granule 1 has data, 0 and 2 are zeros
        let mut buf = plain.clone();
        k.encrypt(GRANULE * 10, &mut buf).unwrap();
        assert!(is_all_zero(&buf[..g]) && is_all_zero(&buf[2 * g..]));
        assert_ne!(&buf[g..2 * g], &plain[g..2 * g]);
        // The zeros of a granule with data are encrypted too.
        assert!(buf[g..2 * g].chunks(UNIT as usize).all(|u| !is_all_zero(u)));
        assert_eq!(
            buf,
            reference(&key_bytes(), GRANULE * 10, &plain)
                .iter()
                .enumerate()
                .map(|(i, &b)| if (g..2 * g).contains(&i) { b } else { 0 })
                .collect::<Vec<_>>()
        );
        k.decrypt(GRANULE * 10, &mut buf).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn check_values_and_key_rules() {
        let a = Key::from_bytes(&key_bytes()).unwrap();
        let mut other = key_bytes();
        other[63] ^= 1;
        let b = Key::from_bytes(&other).unwrap();
        assert_ne!(a.check(), b.check());
        assert_eq!(a.check(), &key_check(&key_bytes()));
        assert!(!format!("{a:?}").contains(&hex::encode(&key_bytes()[..8])));
        assert!(Key::from_bytes(&[7u8; 64])
            .unwrap_err()
            .message
            .contains("halves are equal"));
        assert!(Key::from_bytes(&[7u8; 63])
            .unwrap_err()
            .message
            .contains("exactly 64 bytes"));
        assert_eq!(parse_key_check(&[]).unwrap(), None);
        assert_eq!(parse_key_check(a.check()).unwrap(), Some(*a.check()));
        assert!(parse_key_check(&[1, 2]).is_err());
        assert_eq!(key_change(None, None), None);
        assert_eq!(key_change(Some(a.check()), Some(a.check())), None);
        assert!(key_change(Some(a.check()), Some(b.check()))
            .unwrap()
            .contains("another key"));
        assert!(key_change(Some(a.check()), None).unwrap().contains("no key"));
        assert!(key_change(None, Some(a.check()))
            .unwrap()
            .contains("not encrypted"));
        assert!(check_size(1 << 20).is_ok() && check_size(512 * 3).is_ok());
        assert!(check_size(1000).unwrap_err().message.contains("multiple of 512"));
    }

    #[test]
    fn misaligned_spans_are_refused() {
        let k = Key::from_bytes(&key_bytes()).unwrap();
        assert!(k.encrypt(UNIT, &mut [1u8; 4096]).is_err());
        assert!(k.decrypt(16, &mut [1u8; 4096]).is_err());
        assert!(k.decrypt(0, &mut [1u8; 100]).is_err());
    }

    proptest! {
        #[test]
        fn agrees_with_reference_and_round_trips(
            granule in 0u64..1000,
            len in 1usize..(2 * GRANULE as usize / 512),
            seed in any::<u8>(),
        ) {
            // A short last unit (any multiple of 512) as at an image's end.
            let len = len * 512;
            let plain: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(1)).collect();
            let k = Key::from_bytes(&key_bytes()).unwrap();
            let mut buf = plain.clone();
            k.encrypt(granule * GRANULE, &mut buf).unwrap();
            prop_assert_eq!(&buf, &reference(&key_bytes(), granule * GRANULE, &plain));
            k.decrypt(granule * GRANULE, &mut buf).unwrap();
            prop_assert_eq!(buf, plain);
        }
    }
}
