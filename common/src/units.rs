//! Human units: byte sizes and intervals (`90s`, `15m`, `6h`, `1d`, `2w`).

use crate::error::{Error, Result};
use std::fmt;
use std::time::Duration;

/// Formats bytes with binary units, e.g. `20.00 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A count with its noun: `1 job`, `2 jobs`, `0 jobs`, `2 failed
/// pushes`. `noun` is the singular; the plural adds `es` after a hissing
/// end, else `s` (enough for the nouns backy counts).
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else if ["s", "sh", "ch", "x", "z"].iter().any(|end| noun.ends_with(end)) {
        format!("{n} {noun}es")
    } else {
        format!("{n} {noun}s")
    }
}

/// A count of blocks with its verb agreeing: `1 block does not match`,
/// `3 blocks do not match`.
pub fn blocks_not_matching(n: u64) -> String {
    if n == 1 {
        "1 block does not match".to_string()
    } else {
        format!("{n} blocks do not match")
    }
}

/// Parses a size like `4G`, `512M`, `1048576`, `4GiB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("bad size {s:?}")))?;
    let mult: u64 = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        _ => return Err(Error::invalid(format!("bad size unit in {s:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::invalid(format!("size {s:?} too large")))
}

/// A schedule interval, kept as whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval(u64);

impl Interval {
    pub fn from_secs(s: u64) -> Self {
        Interval(s)
    }

    pub fn secs(self) -> u64 {
        self.0
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }

    /// Parses `<n><unit>` with unit s, m, h, d or w (a bare number is seconds).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || {
            Error::invalid(format!(
                "bad interval {s:?}: use a number with s, m, h, d or w (e.g. 1d)"
            ))
        };
        let (num, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let mult = match c {
                    's' => 1,
                    'm' => 60,
                    'h' => 3600,
                    'd' => 86400,
                    'w' => 7 * 86400,
                    _ => return Err(bad()),
                };
                (&t[..i], mult)
            }
            Some(_) => (t, 1),
            None => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let secs = n.checked_mul(mult).ok_or_else(bad)?;
        if secs == 0 {
            return Err(Error::invalid(format!("interval {s:?} must be longer than zero")));
        }
        Ok(Interval(secs))
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        for (unit, len) in [("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)] {
            if s.is_multiple_of(len) {
                return write!(f, "{}{unit}", s / len);
            }
        }
        write!(f, "{s}s")
    }
}

impl serde::Serialize for Interval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Err(serde::de::Error::custom("interval must be longer than zero")),
            Raw::N(n) => Ok(Interval(n)),
            Raw::S(s) => Interval::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_number() {
        assert_eq!(count(0, "job"), "0 jobs");
        assert_eq!(count(1, "job"), "1 job");
        assert_eq!(count(2, "revision"), "2 revisions");
        assert_eq!(count(3, "failed push"), "3 failed pushes");
        assert_eq!(blocks_not_matching(1), "1 block does not match");
        assert_eq!(blocks_not_matching(0), "0 blocks do not match");
    }

    #[test]
    fn intervals() {
        for (s, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("6h", 21600),
            ("1d", 86400),
            ("2w", 1209600),
            ("45", 45),
        ] {
            let i = Interval::parse(s).unwrap();
            assert_eq!(i.secs(), secs, "{s}");
            assert_eq!(Interval::parse(&i.to_string()).unwrap(), i);
        }
        for bad in ["", "0d", "d", "1y", "-1d", "1.5d", "99999999999999999999w"] {
            assert!(Interval::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4G").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("1 PiB").unwrap(), 1 << 50);
        assert!(parse_bytes("1X").is_err());
        assert_eq!(format_bytes(20 * (1 << 30)), "20.00 GiB");
        assert_eq!(format_bytes(512), "512 B");
    }
}
