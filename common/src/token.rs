//! Bearer tokens: how they are hashed for the server config and compared.
//!
//! Tokens are machine-generated, 256 random bits (`backy-server hash-token
//! --generate`), not passwords a person picks. For such a secret a slow
//! password hash (argon2) buys nothing — nobody can enumerate 2^256
//! candidates — and would cost tens of milliseconds on every request. So the
//! stored form is BLAKE3 in key-derivation mode with a backy-specific
//! context (domain separation: the hash of a token is useless anywhere
//! else), and tokens shorter than [`MIN_TOKEN_LEN`] are refused so a human
//! cannot put a guessable one in. Comparison is constant-time (`subtle`).

use crate::error::{Error, Result};
use subtle::ConstantTimeEq;

/// Prefix of a stored token hash; names the algorithm so it can change.
pub const HASH_PREFIX: &str = "blake3:";
/// Shortest token accepted (characters).
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted (so a header cannot make us hash megabytes).
pub const MAX_TOKEN_LEN: usize = 256;
/// Metadata key the client sends the token in (`authorization: Bearer T`).
pub const AUTH_HEADER: &str = "authorization";

const CONTEXT: &str = "backy 2026-11 bearer token v1";

/// A token as it arrives (file, header): trimmed and checked for shape.
pub fn check_token(token: &str) -> Result<&str> {
    let t = token.trim();
    if t.len() < MIN_TOKEN_LEN || t.len() > MAX_TOKEN_LEN {
        return Err(Error::unauthenticated(format!(
            "a token must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} characters"
        )));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::unauthenticated(
            "a token must be printable ASCII without spaces",
        ));
    }
    Ok(t)
}

/// The raw 32-byte hash of a token.
fn digest(token: &str) -> [u8; 32] {
    blake3::derive_key(CONTEXT, token.as_bytes())
}

/// The stored form of a token: `blake3:<64 hex digits>`.
pub fn hash_token(token: &str) -> Result<String> {
    let t = check_token(token).map_err(|e| Error::invalid(e.message))?;
    Ok(format!("{HASH_PREFIX}{}", hex::encode(digest(t))))
}

/// A parsed stored hash.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    pub fn parse(text: &str) -> Result<Self> {
        let hexpart = text.strip_prefix(HASH_PREFIX).ok_or_else(|| {
            Error::invalid(format!(
                "token hash must start with {HASH_PREFIX:?} (from `backy-server hash-token`)"
            ))
        })?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut out)
            .map_err(|_| Error::invalid("token hash must be 64 hex digits after 'blake3:'"))?;
        Ok(TokenHash(out))
    }

    /// Whether `token` hashes to this, in constant time.
    pub fn matches(&self, token: &str) -> bool {
        bool::from(digest(token).ct_eq(&self.0))
    }
}

/// A new random token: 64 hex digits (256 bits from the OS generator).
pub fn generate_token() -> String {
    // uuid v4 draws from getrandom; two give 244 random bits, mixed through
    // BLAKE3 with a third for a full 256-bit output.
    let mut h = blake3::Hasher::new();
    for _ in 0..3 {
        h.update(uuid::Uuid::new_v4().as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Fingerprint of a DER certificate, as written in `cert-fingerprint`.
pub fn cert_fingerprint(der: &[u8]) -> String {
    format!("{HASH_PREFIX}{}", blake3::hash(der).to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trip() {
        let t = generate_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, generate_token());
        let h = hash_token(&t).unwrap();
        assert!(h.starts_with("blake3:") && h.len() == 7 + 64, "{h}");
        assert!(!h.contains(&t));
        let parsed = TokenHash::parse(&h).unwrap();
        assert!(parsed.matches(&t));
        assert!(!parsed.matches(&generate_token()));
        // Surrounding whitespace (a newline in a token file) is not part of it.
        assert_eq!(hash_token(&format!("{t}\n")).unwrap(), h);
        assert_eq!(format!("{parsed:?}"), "TokenHash(..)");
    }

    #[test]
    fn refuses_weak_tokens_and_bad_hashes() {
        assert!(hash_token("short").unwrap_err().message.contains("32..=256"));
        assert!(hash_token(&"a b".repeat(20)).is_err());
        assert!(TokenHash::parse("abc").unwrap_err().message.contains("blake3:"));
        assert!(TokenHash::parse("blake3:zz")
            .unwrap_err()
            .message
            .contains("64 hex"));
        assert!(check_token(&"x".repeat(257)).is_err());
    }
}
