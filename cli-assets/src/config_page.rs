//! The section-5 man page of a configuration file, rendered from its key
//! reference (`backy_common::config_reference`, which the tests hold to
//! the config structs and the example configs).

use backy_common::config_reference::{ConfigReference, KeyDefault};
use std::fmt::Write;

/// The page as roff, for `man -l`; `version` goes into its footer.
pub fn render(reference: &ConfigReference, version: &str) -> String {
    let mut out = String::new();
    let package = reference.package;
    let _ = writeln!(
        out,
        ".TH {} 5 \"\" \"backy {}\" backy",
        escape(reference.page),
        escape(version)
    );
    // Keys and paths must not break at a hyphenation point.
    out.push_str(".nh\n.ad l\n");
    out.push_str(".SH NAME\n");
    let _ = writeln!(out, "{} \\- {}", escape(reference.page), text(reference.summary));
    out.push_str(".SH SYNOPSIS\n");
    let _ = writeln!(out, "{}", escape(reference.file));
    out.push_str(".SH DESCRIPTION\n");
    for (i, paragraph) in reference.description.iter().enumerate() {
        if i > 0 {
            out.push_str(".PP\n");
        }
        out.push_str(&line(&text(paragraph)));
    }
    out.push_str(".SH KEYS\n");
    out.push_str(&line(&text(
        "Each key by its path from the top of the file: `tls.cert` is `cert:` inside `tls:`. \
         Upper-case parts (JOB, SCHEDULE, TAG, IDENTITY) stand for names you choose.",
    )));
    for key in reference.keys {
        let default = match key.default {
            KeyDefault::Required => "required".to_string(),
            KeyDefault::Unset => "optional".to_string(),
            KeyDefault::Is(v) | KeyDefault::Means(v) => format!("default: {v}"),
        };
        out.push_str(".TP\n");
        out.push_str(&line(&format!(
            "\\fB{}\\fR ({}; {})",
            escape(key.path),
            text(key.kind),
            text(&default)
        )));
        out.push_str(&line(&text(key.doc)));
    }
    out.push_str(".SH FILES\n.TP\n");
    out.push_str(&line(&escape(reference.file)));
    out.push_str("The configuration read by default.\n.TP\n");
    let example_name = reference.file.rsplit('/').next().unwrap_or(reference.file);
    out.push_str(&line(&escape(&format!(
        "/usr/share/doc/{package}/examples/{example_name}"
    ))));
    out.push_str("An example with every key, commented.\n.TP\n");
    out.push_str(&line(&escape(&format!("/usr/share/doc/{package}/README.md"))));
    out.push_str("The manual: setup, security, operation.\n");
    out.push_str(".SH SEE ALSO\n");
    let _ = writeln!(out, "{}(1)", escape(package));
    out
}

/// `text` with its `code` spans in bold, escaped for roff.
fn text(s: &str) -> String {
    s.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("\\fB{}\\fR", escape(part))
            } else {
                escape(part)
            }
        })
        .collect()
}

/// Escapes what roff would take as markup: backslashes, and hyphens (so
/// keys and options render as the ASCII `-` one types).
fn escape(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// One input line; one that would start with a control character (`.`,
/// `'`) is guarded, so "... and" stays text.
fn line(s: &str) -> String {
    if s.starts_with(['.', '\'']) {
        format!("\\&{s}\n")
    } else {
        format!("{s}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::config_reference::{KeyDoc, SERVER};

    #[test]
    fn every_key_is_a_tagged_paragraph_with_its_type_and_default() {
        let page = render(&SERVER, "1.2.3");
        assert!(
            page.starts_with(".TH backy\\-server.yaml 5 \"\" \"backy 1.2.3\" backy\n"),
            "{page}"
        );
        for key in SERVER.keys {
            assert!(
                page.contains(&format!(".TP\n\\fB{}\\fR (", escape(key.path))),
                "{}",
                key.path
            );
        }
        assert!(
            page.contains("\\fBlimits.idle\\-timeout\\fR (interval; default: 120s)\n"),
            "{page}"
        );
        assert!(page.contains("\\fBbase\\-dir\\fR (path; required)\n"), "{page}");
        assert!(
            page.contains("/usr/share/doc/backy\\-server/examples/server.yaml\n"),
            "{page}"
        );
        // No line starts a request by accident.
        for l in page.lines() {
            if let Some(rest) = l.strip_prefix('.') {
                let request = rest.split(' ').next().unwrap_or("");
                assert!(["TH", "SH", "PP", "TP", "nh", "ad"].contains(&request), "{l:?}");
            }
        }
    }

    #[test]
    fn markup_in_the_text_is_escaped() {
        let r = ConfigReference {
            page: "x.yaml",
            file: "/etc/x.yaml",
            package: "x",
            summary: "s",
            description: &["a `b-c` \\d"],
            keys: &[KeyDoc {
                path: "k",
                kind: "k",
                default: KeyDefault::Unset,
                doc: "... and 'so",
            }],
        };
        let page = render(&r, "1");
        assert!(page.contains("a \\fBb\\-c\\fR \\ed\n"), "{page}");
        assert!(page.contains("\n\\&... and 'so\n"), "{page}");
    }
}
