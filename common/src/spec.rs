//! Revision specs (docs/DESIGN.md, "Revision specs"): how operators name revisions.

use crate::error::{Error, Result};
use crate::id::RevisionId;
use crate::revision::RevisionMeta;
use uuid::Uuid;

/// A parsed revision spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// Every revision (only where several may be given).
    All,
    /// The newest revision.
    Latest,
    /// The N-th newest (0 = newest).
    Nth(usize),
    /// An exact id.
    Id(RevisionId),
    /// A tag name or a unique id prefix: decided against the revisions.
    Word(String),
}

impl Spec {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::invalid("empty revision spec"));
        }
        if s.len() > 128 {
            return Err(Error::invalid("revision spec longer than 128 characters"));
        }
        if s == "all" {
            return Ok(Spec::All);
        }
        if s == "latest" || s == "last" {
            return Ok(Spec::Latest);
        }
        if s.bytes().all(|c| c.is_ascii_digit()) && s.len() <= 9 {
            return s
                .parse()
                .map(Spec::Nth)
                .map_err(|_| Error::invalid(format!("bad revision number {s:?}")));
        }
        if let Ok(u) = Uuid::parse_str(s) {
            if s.len() == 36 {
                return Ok(Spec::Id(u.into()));
            }
        }
        Ok(Spec::Word(s.to_owned()))
    }

    /// Resolves to indexes into `revs` (which must be ordered oldest first),
    /// newest first. A single-revision spec yields exactly one or an error.
    pub fn resolve(&self, revs: &[RevisionMeta]) -> Result<Vec<usize>> {
        let newest_first = || (0..revs.len()).rev();
        match self {
            Spec::All => Ok(newest_first().collect()),
            Spec::Latest => newest_first()
                .next()
                .map(|i| vec![i])
                .ok_or_else(|| Error::not_found("no revisions")),
            Spec::Nth(n) => newest_first().nth(*n).map(|i| vec![i]).ok_or_else(|| {
                Error::not_found(format!(
                    "no revision number {n}: there {}",
                    match revs.len() {
                        1 => "is 1 revision".to_string(),
                        n => format!("are {n} revisions"),
                    }
                ))
            }),
            Spec::Id(id) => revs
                .iter()
                .position(|r| r.id == *id)
                .map(|i| vec![i])
                .ok_or_else(|| Error::not_found(format!("no revision {id}"))),
            Spec::Word(w) => {
                let by_tag = newest_first().find(|&i| revs[i].tags.contains(w));
                let by_prefix: Vec<usize> = if RevisionId::is_short_prefix(w) {
                    newest_first()
                        .filter(|&i| revs[i].id.short().starts_with(w.as_str()))
                        .collect()
                } else {
                    Vec::new()
                };
                match (by_tag, by_prefix.as_slice()) {
                    (Some(_), [_, ..]) => Err(Error::precondition(format!(
                        "revision spec {w:?} is ambiguous: both a tag and an id prefix"
                    ))),
                    (Some(i), []) => Ok(vec![i]),
                    (None, [i]) => Ok(vec![*i]),
                    (None, []) => Err(Error::not_found(format!("no revision matches {w:?}"))),
                    (None, many) => Err(Error::precondition(format!(
                        "revision spec {w:?} is ambiguous: {} ids start with it",
                        many.len()
                    ))),
                }
            }
        }
    }

    /// Resolves a spec that must name exactly one revision.
    pub fn resolve_one(&self, revs: &[RevisionMeta]) -> Result<usize> {
        if *self == Spec::All {
            return Err(Error::invalid("'all' is not allowed here: name one revision"));
        }
        let found = self.resolve(revs)?;
        found
            .first()
            .copied()
            .ok_or_else(|| Error::not_found("no revisions"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::revision::*;

    fn rev(n: u128, tags: &[&str]) -> RevisionMeta {
        RevisionMeta {
            id: Uuid::from_u128(n).into(),
            timestamp: chrono::DateTime::from_timestamp(n as i64 * 1000, 0).unwrap(),
            parent: None,
            size: 0,
            block_size: 4 << 20,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            trust: Trust::Trusted,
            verified_at: None,
            source: SourceInfo::default(),
            stats: Stats::default(),
            manifest_digest: String::new(),
            storage: StorageMode::Reflink,
            locked_until: None,
            key_check: None,
        }
    }

    #[test]
    fn table() {
        // Ids 1..=3 have short forms "111...112" .. "111...114".
        let revs = vec![rev(1, &["daily"]), rev(2, &["weekly", "daily"]), rev(3, &[])];
        let short2 = revs[1].id.short();
        let uuid2 = revs[1].id.uuid().to_string();
        let cases: Vec<(&str, Result<Vec<usize>, ErrorKind>)> = vec![
            ("all", Ok(vec![2, 1, 0])),
            ("latest", Ok(vec![2])),
            ("0", Ok(vec![2])),
            ("2", Ok(vec![0])),
            ("3", Err(ErrorKind::NotFound)),
            ("daily", Ok(vec![1])),
            ("weekly", Ok(vec![1])),
            ("monthly", Err(ErrorKind::NotFound)),
            (&short2, Ok(vec![1])),
            (&uuid2, Ok(vec![1])),
            ("1111111111111111111", Err(ErrorKind::FailedPrecondition)),
            ("1111111111111111111114", Ok(vec![2])),
        ];
        for (spec, want) in cases {
            let got = Spec::parse(spec)
                .and_then(|s| s.resolve(&revs))
                .map_err(|e| e.kind);
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn tag_and_prefix_clash_is_ambiguous() {
        let revs = vec![rev(1, &["1111"])];
        let e = Spec::parse("1111a").unwrap().resolve(&revs).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let revs = vec![rev(1, &["111111111111x"])];
        assert!(Spec::parse("111111111111x").unwrap().resolve(&revs).is_ok());
        let revs = vec![rev(1, &["11111111111"])];
        let e = Spec::parse("11111111111").unwrap().resolve(&revs).unwrap_err();
        assert!(e.message.contains("ambiguous"), "{}", e.message);
    }

    #[test]
    fn one_refuses_all_and_empty() {
        assert_eq!(
            Spec::All.resolve_one(&[]).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            Spec::Latest.resolve_one(&[]).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(Spec::parse("").unwrap_err().kind, ErrorKind::InvalidArgument);
    }

    proptest::proptest! {
        /// Issue 27, item 9: every tag `check_tag` accepts is read by
        /// `Spec::parse` as a word (a tag), and every one it refuses for
        /// that reason is not.
        #[test]
        fn accepted_tags_are_read_as_tags(tag in "([0-9]{1,12}|all|latest|last|[ -~]{1,70}|[0-9a-f-]{36})") {
            let word = matches!(Spec::parse(&tag), Ok(Spec::Word(w)) if w == tag);
            let format_ok = check_tag_format(&tag).is_ok();
            proptest::prop_assert_eq!(check_tag(&tag).is_ok(), format_ok && word, "{:?}", tag);
        }
    }
}
