//! Progress bars for long transfers, shown only to a person at a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// Whether progress should be drawn: stdout is a terminal and carries no
/// machine-readable output.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stdout().is_terminal()
}

/// A byte-counting bar over `total` bytes, or a hidden one.
pub fn bar(total: u64, label: &str, shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout())
        .with_style(style)
        .with_message(label.to_string())
}
