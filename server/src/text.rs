//! Text helpers every layer may use (a leaf: it imports nothing of the
//! server).

/// How much of one peer-supplied text is kept for a log line or status.
const MAX: usize = 1024;

/// At most 1 KiB of peer-supplied text, on one line, for status (stored
/// as the peer wrote it otherwise: whoever shows it escapes it).
pub fn clip(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    bounded(&line)
}

fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// At most 1 KiB of peer-supplied text as a log field's value: quoted and
/// escaped (newlines, ANSI escapes, bidi controls as `\n`, `\u{1b}`,
/// `\u{202e}`), so it stays inside its one line and its one value.
pub fn quoted(text: &str) -> String {
    backy_common::escape::quote(&bounded(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_one_bounded_line() {
        assert_eq!(clip("a\nb\t c"), "a b c");
        let long = "x".repeat(2000);
        assert_eq!(clip(&long).chars().count(), 1025);
    }

    #[test]
    fn logged_peer_text_is_one_quoted_value() {
        assert_eq!(
            quoted("a\nb=\"c\"\x1b[2J\u{202e}"),
            r#""a\nb=\"c\"\u{1b}[2J\u{202e}""#
        );
        assert_eq!(quoted(&"x".repeat(2000)).chars().count(), 1027);
    }
}
