//! Progress bars: push and restore draw one (bytes, throughput, ETA) when
//! stdout is a terminal (a pty from `script`), and print only their
//! one-line result when it is not.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

/// Runs `backy-client ARGS` on a pseudo-terminal; returns what it drew.
fn on_terminal(server: &Server, args: &[&str]) -> String {
    let mut line = format!("{} --server {}", bin("backy-client").display(), server.url);
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .output()
        .expect("running script (util-linux)");
    assert!(
        out.status.success(),
        "{line}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_drew_a_bar(what: &str, out: &str) {
    assert!(
        out.contains("ETA") && out.contains("/s") && out.contains("vm1 ["),
        "{what} on a terminal draws a progress bar: {out:?}"
    );
}

#[test]
fn bars_on_a_terminal_one_line_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    // Enough data that the transfer lasts several redraws.
    make_image(&img, 512 * MIB, &[(0, 400 * MIB)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    let src = img.to_str().unwrap();

    let out = on_terminal(&server, &["push", "vm1", "--source", src]);
    assert_drew_a_bar("push", &out);
    assert!(out.contains("committed"), "{out:?}");

    let target = dir.path().join("restored.img");
    let out = on_terminal(&server, &["restore", "vm1", target.to_str().unwrap()]);
    assert_drew_a_bar("restore", &out);
    assert_eq!(file_hash(&target), file_hash(&img));

    // Not a terminal: the result line alone, no bar.
    write_at(&img, 5 * MIB, &pattern(3, 4096));
    let out = server.client_ok(&["push", "vm1", "--source", src]);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(!out.contains("ETA") && !out.contains('\u{1b}'), "{out:?}");
    let again = dir.path().join("again.img");
    let out = server.client_ok(&["restore", "vm1", again.to_str().unwrap()]);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(!out.contains("ETA"), "{out:?}");
    assert!(Path::new(&again).exists());
}
