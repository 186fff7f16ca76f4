//! Job names: the one piece of a path a peer chooses, so they are strict.

use crate::error::{Error, Result};
use std::fmt;

pub const MAX_JOB_NAME: usize = 64;

/// A validated job name: 1..=64 of `[A-Za-z0-9._-]`, starting with an
/// alphanumeric, so it is never `.`, `..`, hidden, or a path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct JobName(String);

impl JobName {
    pub fn new(name: &str) -> Result<Self> {
        let bad = |why: &str| Err(Error::invalid(format!("invalid job name {name:?}: {why}")));
        if name.is_empty() {
            return bad("empty");
        }
        if name.len() > MAX_JOB_NAME {
            return bad("longer than 64 characters");
        }
        if !name.as_bytes()[0].is_ascii_alphanumeric() {
            return bad("must start with a letter or digit");
        }
        if !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        {
            return bad("only letters, digits, '.', '_' and '-' are allowed");
        }
        Ok(JobName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for JobName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobName::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let long = "a".repeat(65);
        for (name, ok) in [
            ("vm1", true),
            ("vm-1.root_disk", true),
            ("0", true),
            (&"a".repeat(64)[..], true),
            ("", false),
            ("..", false),
            (".hidden", false),
            ("../x", false),
            ("a/b", false),
            ("a\0b", false),
            ("-rf", false),
            ("vm 1", false),
            ("vm1\n", false),
            (&long[..], false),
        ] {
            assert_eq!(JobName::new(name).is_ok(), ok, "{name:?}");
        }
    }
}
