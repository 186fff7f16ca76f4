//! Revision ids: random UUIDs, shown and stored as 22 base-58 characters.

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
/// Length of the short form: 58^22 > 2^128.
pub const SHORT_LEN: usize = 22;

/// A revision's identity. `Display` gives the short form, which also names
/// the revision's files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevisionId(Uuid);

impl RevisionId {
    pub fn new_random() -> Self {
        RevisionId(Uuid::new_v4())
    }

    pub fn uuid(&self) -> Uuid {
        self.0
    }

    /// The 22-character base-58 form (fixed width, leading '1's pad).
    pub fn short(&self) -> String {
        let mut n = self.0.as_u128();
        let mut out = [ALPHABET[0]; SHORT_LEN];
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(n % 58) as usize];
            n /= 58;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Parses a short form (exactly 22 characters).
    pub fn from_short(s: &str) -> Result<Self> {
        if s.len() != SHORT_LEN {
            return Err(Error::invalid(format!("not a revision id: {s:?}")));
        }
        let mut n: u128 = 0;
        for c in s.bytes() {
            let digit = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| Error::invalid(format!("not a revision id: {s:?}")))?;
            n = n
                .checked_mul(58)
                .and_then(|n| n.checked_add(digit as u128))
                .ok_or_else(|| Error::invalid(format!("not a revision id: {s:?}")))?;
        }
        Ok(RevisionId(Uuid::from_u128(n)))
    }

    /// Whether `s` could be (a prefix of) a short id.
    pub fn is_short_prefix(s: &str) -> bool {
        !s.is_empty() && s.len() <= SHORT_LEN && s.bytes().all(|c| ALPHABET.contains(&c))
    }
}

impl From<Uuid> for RevisionId {
    fn from(u: Uuid) -> Self {
        RevisionId(u)
    }
}

impl FromStr for RevisionId {
    type Err = Error;
    /// Accepts the short form or a full UUID.
    fn from_str(s: &str) -> Result<Self> {
        if s.len() == SHORT_LEN {
            return Self::from_short(s);
        }
        Uuid::parse_str(s)
            .map(RevisionId)
            .map_err(|_| Error::invalid(format!("not a revision id: {s:?}")))
    }
}

impl fmt::Display for RevisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for RevisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevisionId({})", self.short())
    }
}

impl serde::Serialize for RevisionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for RevisionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extremes_round_trip() {
        for n in [0u128, 1, u128::MAX] {
            let id = RevisionId(Uuid::from_u128(n));
            assert_eq!(id.short().len(), SHORT_LEN);
            assert_eq!(RevisionId::from_short(&id.short()).unwrap(), id);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(RevisionId::from_short("0000000000000000000000").is_err()); // '0' not in alphabet
        assert!(RevisionId::from_short("zzzzzzzzzzzzzzzzzzzzzz").is_err()); // overflows u128
        assert!("../etc".parse::<RevisionId>().is_err());
    }

    proptest! {
        #[test]
        fn short_and_full_round_trip(n: u128) {
            let id = RevisionId(Uuid::from_u128(n));
            prop_assert_eq!(id.short().parse::<RevisionId>().unwrap(), id);
            prop_assert_eq!(id.uuid().to_string().parse::<RevisionId>().unwrap(), id);
        }
    }
}
