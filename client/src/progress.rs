//! How far a long transfer got, for whoever watches: the binary draws a
//! bar for a person at a terminal; agents and tests stay [`Silent`].

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;

/// Where pushes and restores report their progress.
pub trait Progress: Send + Sync {
    /// A transfer of `total` bytes named `label` starts; returns its meter.
    fn start(&self, label: &str, total: u64) -> Arc<dyn Meter>;
}

/// One transfer's progress.
pub trait Meter: Send + Sync {
    /// `done` bytes of the total are through.
    fn set(&self, done: u64);
    /// The transfer ended (done or not).
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) -> Arc<dyn Meter> {
        Arc::new(Silent)
    }
}

impl Meter for Silent {
    fn set(&self, _: u64) {}
    fn finish(&self) {}
}

/// A byte-counting bar on stdout.
pub struct Terminal;

impl Terminal {
    /// A bar when a person watches (stdout is a terminal without
    /// machine-readable output), else silence.
    pub fn if_wanted(json: bool) -> Box<dyn Progress> {
        if !json && std::io::stdout().is_terminal() {
            Box::new(Terminal)
        } else {
            Box::new(Silent)
        }
    }
}

impl Progress for Terminal {
    fn start(&self, label: &str, total: u64) -> Arc<dyn Meter> {
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        Arc::new(
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout())
                .with_style(style)
                .with_message(label.to_string()),
        )
    }
}

impl Meter for ProgressBar {
    fn set(&self, done: u64) {
        self.set_position(done);
    }
    fn finish(&self) {
        self.finish_and_clear();
    }
}
