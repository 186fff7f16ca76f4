//! `push --changed-ranges FILE`: callers that track dirty blocks themselves
//! (a hypervisor's write log, a storage array's changed-block tracking) name
//! the byte ranges written since the parent revision, and the push reads and
//! sends only the blocks they touch instead of scanning the whole source.
//!
//! The file holds one range per line, `OFFSET LENGTH` in decimal bytes;
//! blank lines and lines starting with `#` are ignored. Every line is
//! checked: a range that is malformed, empty or beyond the source's end
//! refuses the push, since trusting a bad range list silently loses data.
//! Ranges may come in any order and overlap. They are kept as a set of
//! [`GRANULE`] ranges, merged as they come, so memory follows the distinct
//! ranges, not their number or the source's size.

use crate::source::Source;
use backy_common::blockset::BlockSet;
use backy_common::ranges::Extent;
use backy_common::{Error, Result};
use std::io::BufRead;
use std::path::Path;

/// Resolution of the kept ranges.
const GRANULE: u64 = backy_common::ranges::GRANULE;

/// Longest line accepted; real lines are two numbers.
const MAX_LINE: usize = 256;

/// Reads and validates a range file for a source of `size` bytes.
pub fn read(path: &Path, size: u64) -> Result<Vec<Extent>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening changed-ranges file {}", path.display()), e))?;
    parse(std::io::BufReader::new(file), &path.display().to_string(), size)
}

/// Parses range lines into coalesced, granule-aligned extents within `size`.
pub fn parse(input: impl BufRead, name: &str, size: u64) -> Result<Vec<Extent>> {
    let mut granules = BlockSet::new();
    let mut line = String::new();
    let mut input = input.take(u64::MAX);
    let mut number = 0u64;
    loop {
        line.clear();
        number += 1;
        let bad = |why: String| Error::invalid(format!("{name} line {number}: {why}"));
        input.set_limit(MAX_LINE as u64 + 1);
        let n = input
            .read_line(&mut line)
            .map_err(|e| Error::io(format!("reading changed-ranges file {name}"), e))?;
        if n == 0 {
            break;
        }
        if n > MAX_LINE && !line.ends_with('\n') {
            return Err(bad(format!("longer than {MAX_LINE} characters")));
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let mut fields = text.split_ascii_whitespace();
        let (Some(offset), Some(len), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(format!("expected `OFFSET LENGTH`, got {text:?}")));
        };
        let number_of = |field: &str, what: &str| {
            if !field.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!("{what} {field:?} is not a decimal byte count")));
            }
            field
                .parse::<u64>()
                .map_err(|_| bad(format!("{what} {field} is too large")))
        };
        let offset = number_of(offset, "offset")?;
        let len = number_of(len, "length")?;
        if len == 0 {
            return Err(bad("empty range (length 0)".into()));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                bad(format!(
                    "range {offset}+{len} ends beyond the source's {size} bytes"
                ))
            })?;
        granules.insert(offset / GRANULE..end.div_ceil(GRANULE));
    }
    Ok(extents_of(&granules, size))
}

/// The set granules as coalesced extents, the last one cut at `size`.
fn extents_of(granules: &BlockSet, size: u64) -> Vec<Extent> {
    granules
        .ranges()
        .map(|r| {
            let offset = r.start * GRANULE;
            Extent {
                offset,
                len: (r.end * GRANULE).min(size) - offset,
            }
        })
        .collect()
}

/// A source whose changes since the parent are known from a range file.
pub struct KnownChanges {
    inner: Box<dyn Source>,
    changed: Option<Vec<Extent>>,
}

impl KnownChanges {
    pub fn new(inner: Box<dyn Source>, changed: Vec<Extent>) -> Self {
        KnownChanges {
            inner,
            changed: Some(changed),
        }
    }
}

impl Source for KnownChanges {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn snapshot(&self) -> &str {
        self.inner.snapshot()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
        self.inner.next_data(offset)
    }

    fn reads_data_only(&self) -> bool {
        self.inner.reads_data_only()
    }

    fn will_need(&mut self, offset: u64, len: u64) {
        self.inner.will_need(offset, len)
    }

    fn changed_extents(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(self.changed.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::ErrorKind;

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    fn parse_str(text: &str, size: u64) -> Result<Vec<Extent>> {
        parse(text.as_bytes(), "r.txt", size)
    }

    #[test]
    fn ranges_round_to_granules_and_coalesce() {
        let g = GRANULE;
        let size = 10 * g + 7;
        let text = format!(
            "# dirty ranges\n\n{} 10\n  {} {}\n{} 1\n3 1\n{} 7\n",
            5 * g + 3,
            g - 1,
            2,
            4 * g,
            10 * g
        );
        let got = parse_str(&text, size).unwrap();
        assert_eq!(got, [ext(0, 2 * g), ext(4 * g, 2 * g), ext(10 * g, 7)]);
        assert_eq!(parse_str("", size).unwrap(), []);
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let size = 1 << 30;
        let cases = [
            (
                "0 1\nx 1\n",
                "r.txt line 2: offset \"x\" is not a decimal byte count",
            ),
            (
                "-1 5\n",
                "r.txt line 1: offset \"-1\" is not a decimal byte count",
            ),
            ("5\n", "r.txt line 1: expected `OFFSET LENGTH`, got \"5\""),
            ("5 6 7\n", "r.txt line 1: expected `OFFSET LENGTH`, got \"5 6 7\""),
            ("0 0\n", "r.txt line 1: empty range (length 0)"),
            (
                "0x10 5\n",
                "r.txt line 1: offset \"0x10\" is not a decimal byte count",
            ),
            (
                "1073741823 2\n",
                "r.txt line 1: range 1073741823+2 ends beyond the source's 1073741824 bytes",
            ),
            (
                "18446744073709551615 1\n",
                "r.txt line 1: range 18446744073709551615+1 ends beyond the source's 1073741824 bytes",
            ),
            (
                "99999999999999999999 1\n",
                "r.txt line 1: offset 99999999999999999999 is too large",
            ),
        ];
        for (text, want) in cases {
            let e = parse_str(text, size).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{text:?}");
            assert_eq!(e.message, want, "{text:?}");
        }
        let long = format!("0 {}\n", "1".repeat(400));
        let e = parse_str(&long, size).unwrap_err();
        assert_eq!(e.message, "r.txt line 1: longer than 256 characters");
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = read(Path::new("/nonexistent/ranges"), 10).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("/nonexistent/ranges"), "{}", e.message);
    }
}
