//! Text a peer wrote, made safe for a log line or a terminal: control
//! characters (newlines, ANSI escape sequences, ...), Unicode format
//! characters (bidi overrides and isolates, zero-width characters) and line
//! separators are written as escapes, so peer text can neither start a
//! line of its own, nor move the cursor, recolour or clear the screen, nor
//! reorder what a reader sees.
//!
//! Both forms escape the backslash too, so distinct texts stay distinct
//! ([`unescape`] and [`unquote`] invert them): a peer cannot write `\n`
//! and have it read as an escaped newline of someone else's.

use std::fmt::Write;

/// Unicode's format characters (general category Cf) and the line and
/// paragraph separators (Zl, Zp, U+2028, U+2029). Cf is what reorders text
/// (U+202A..U+202E, U+2066..U+2069) or hides it (zero-width U+200B..U+200D,
/// U+2060, U+FEFF, tag characters U+E0020..). Unicode 15.
const FORMAT: &[(u32, u32)] = &[
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` must not reach a log or a terminal as itself: a control
/// character (C0, DEL, C1) or one of [`FORMAT`].
pub fn is_hidden(c: char) -> bool {
    let n = u32::from(c);
    c.is_control()
        || FORMAT
            .binary_search_by(|&(lo, hi)| {
                if hi < n {
                    std::cmp::Ordering::Less
                } else if lo > n {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

fn push_escaped(out: &mut String, c: char, quote: bool) {
    match c {
        '\\' => out.push_str("\\\\"),
        '"' if quote => out.push_str("\\\""),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if is_hidden(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// `text` with backslashes doubled and hidden characters as `\n`, `\r`,
/// `\t` or `\u{HEX}`: for a terminal (peer text in `backy-client`'s output).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped(&mut out, c, false);
    }
    out
}

/// `text` in double quotes, escaped as [`escape`] does and `"` as `\"`: a
/// log field's value, which no peer text can end early, so it cannot add a
/// `key=value` pair of its own.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        push_escaped(&mut out, c, true);
    }
    out.push('"');
    out
}

/// The text [`escape`] was given; `None` for text it cannot have made.
pub fn unescape(escaped: &str) -> Option<String> {
    unescape_body(escaped, false)
}

/// The text [`quote`] was given; `None` for text it cannot have made.
pub fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    unescape_body(inner, true)
}

fn unescape_body(escaped: &str, quoted: bool) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if is_hidden(c) || (quoted && c == '"') {
                return None;
            }
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            '"' if quoted => '"',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                if chars.next()? != '{' {
                    return None;
                }
                let hex: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let c = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)?;
                // The one spelling escape writes: lower-case hex, no zeros
                // in front, and the short forms for \n, \r, \t.
                if !is_hidden(c) || matches!(c, '\n' | '\r' | '\t') || hex != format!("{:x}", u32::from(c)) {
                    return None;
                }
                c
            }
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn terminal_and_log_controls_are_escaped() {
        assert_eq!(
            escape("a\nb\r\tc\x1b[2J\x07\u{7f}\u{9b}"),
            "a\\nb\\r\\tc\\u{1b}[2J\\u{7}\\u{7f}\\u{9b}"
        );
        assert_eq!(
            escape("x\u{202e}y\u{2066}z\u{200b}\u{feff}"),
            "x\\u{202e}y\\u{2066}z\\u{200b}\\u{feff}"
        );
        assert_eq!(escape("\u{2028}\u{2029}"), "\\u{2028}\\u{2029}");
        assert_eq!(escape(r"C:\x"), r"C:\\x");
        // Printable text of any script, quotes and combining marks stay.
        assert_eq!(escape("café \"ok\" 日本 é"), "café \"ok\" 日本 é");
    }

    #[test]
    fn a_quoted_value_cannot_be_ended_by_its_text() {
        let forged = "x\" identity=\"admin\" outcome=\"ok";
        assert_eq!(quote(forged), r#""x\" identity=\"admin\" outcome=\"ok""#);
        assert_eq!(quote(""), "\"\"");
        assert_eq!(unquote(&quote(forged)).as_deref(), Some(forged));
    }

    #[test]
    fn only_what_escape_makes_unescapes() {
        for bad in [
            "\\",
            "\\q",
            "\\\"",
            "\\u{1B}",
            "\\u{01b}",
            "\\u{41}",
            "\\u{zz}",
            "\\u1b",
            "a\u{1b}",
            "\\u{d800}",
            "\\u{a}",
        ] {
            assert_eq!(unescape(bad), None, "{bad:?}");
        }
        for bad in ["", "\"", "x\"", "\"a\"b\"", "\"a\\\""] {
            assert_eq!(unquote(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn format_table_is_sorted_and_disjoint() {
        for w in FORMAT.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:?}");
        }
    }

    /// Text with the characters that matter more often than chance gives.
    fn hostile_text() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            any::<char>(),
            prop::sample::select(vec![
                '\\', '"', '\n', '\r', '\t', '\x1b', '\u{202e}', '\u{2069}', 'u', '{', '}', '='
            ]),
        ];
        prop::collection::vec(c, 0..64).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_hidden_character_and_round_trips(text in hostile_text()) {
            let e = escape(&text);
            prop_assert!(!e.chars().any(is_hidden), "{:?}", e);
            prop_assert_eq!(unescape(&e), Some(text.clone()));
            let q = quote(&text);
            prop_assert!(!q.chars().any(is_hidden), "{:?}", q);
            prop_assert_eq!(unquote(&q), Some(text));
        }

        #[test]
        fn a_quoted_value_ends_only_at_its_last_quote(text in hostile_text()) {
            // Reading the value the way a log parser does: up to the first
            // quote not escaped by a backslash.
            let q = quote(&text);
            let inner = &q[1..];
            let mut escaped = false;
            let mut end = None;
            for (i, c) in inner.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    end = Some(i);
                    break;
                }
            }
            prop_assert_eq!(end, Some(inner.len() - 1));
        }

        #[test]
        fn distinct_texts_escape_differently(a in hostile_text(), b in hostile_text()) {
            prop_assume!(a != b);
            prop_assert_ne!(escape(&a), escape(&b));
            prop_assert_ne!(quote(&a), quote(&b));
        }
    }
}
