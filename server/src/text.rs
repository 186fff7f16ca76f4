//! Text helpers every layer may use (a leaf: it imports nothing of the
//! server).

/// At most 1 KiB of peer-supplied text, on one line, for logs and status.
pub fn clip(text: &str) -> String {
    const MAX: usize = 1024;
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn peer_text_is_one_bounded_line() {
        assert_eq!(clip("a\nb\t c"), "a b c");
        let long = "x".repeat(2000);
        assert_eq!(clip(&long).chars().count(), 1025);
    }
}
