//! Log lines on stderr, the same way for both binaries: plain lines with
//! time and level for people; under systemd (stderr is the journal, as
//! `JOURNAL_STREAM` says) lines that start with a syslog priority (`<3>`
//! error … `<7>` debug), so `journalctl -p warning` selects by level, and
//! without a time of their own (the journal stamps each line).

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The levels `-v` and `-q` step through, least verbose first.
const LEVELS: [Level; 5] = [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE];

/// What to log: a binary's default level moved by `-v` (one level more
/// each) and `-q` (one less). `RUST_LOG`, when set, replaces it.
#[derive(Debug, Clone, Copy)]
pub struct Verbosity {
    pub default: Level,
    pub verbose: u8,
    pub quiet: bool,
}

impl Verbosity {
    /// The level of backy's own messages.
    pub fn level(self) -> Level {
        let base = LEVELS.iter().position(|l| *l == self.default).unwrap_or(2);
        let index = (base + usize::from(self.verbose)).saturating_sub(usize::from(self.quiet));
        LEVELS[index.min(LEVELS.len() - 1)]
    }

    /// The filter directives: backy's crates at [`Self::level`], other
    /// crates (HTTP/2, TLS) at warnings unless everything is asked for.
    pub fn directives(self) -> String {
        let level = self.level();
        if level == Level::TRACE {
            return "trace".to_string();
        }
        let ours = level.as_str().to_ascii_lowercase();
        let others = if level < Level::WARN {
            ours.as_str()
        } else {
            "warn"
        };
        format!("{others},backy={ours},backy_common={ours},backy_server={ours},backy_client={ours}")
    }
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd for a unit
/// whose output goes to the journal) names the stream stderr is now. A
/// child whose stderr was redirected inherits the variable, hence the check.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Prefixes each line with its syslog priority.
struct Prioritised<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritised<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the global subscriber writing to stderr.
pub fn init(verbosity: Verbosity) {
    use std::io::IsTerminal;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(verbosity.directives()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref()) {
        let format = tracing_subscriber::fmt::format().without_time().with_ansi(false);
        builder.with_ansi(false).event_format(Prioritised(format)).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(default: Level, verbose: u8, quiet: bool) -> Verbosity {
        Verbosity {
            default,
            verbose,
            quiet,
        }
    }

    #[test]
    fn each_v_is_one_level_more_on_either_default() {
        assert_eq!(v(Level::INFO, 0, false).level(), Level::INFO);
        assert_eq!(v(Level::INFO, 1, false).level(), Level::DEBUG);
        assert_eq!(v(Level::INFO, 2, false).level(), Level::TRACE);
        assert_eq!(v(Level::INFO, 9, false).level(), Level::TRACE);
        assert_eq!(v(Level::WARN, 1, false).level(), Level::INFO);
        assert_eq!(v(Level::WARN, 0, true).level(), Level::ERROR);
        assert_eq!(v(Level::ERROR, 0, true).level(), Level::ERROR);
    }

    #[test]
    fn other_crates_stay_at_warnings_until_trace() {
        assert_eq!(
            v(Level::WARN, 1, false).directives(),
            "warn,backy=info,backy_common=info,backy_server=info,backy_client=info"
        );
        assert_eq!(
            v(Level::WARN, 0, true).directives(),
            "error,backy=error,backy_common=error,backy_server=error,backy_client=error"
        );
        assert_eq!(v(Level::INFO, 2, false).directives(), "trace");
    }

    #[test]
    fn priorities_are_syslogs() {
        let p: Vec<u8> = LEVELS.iter().map(|l| syslog_priority(*l)).collect();
        assert_eq!(p, [3, 4, 6, 7, 7]);
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some("garbage")));
        assert!(!stderr_is_journal(Some("1:2")));
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::File::from(std::io::stderr().as_fd().try_clone_to_owned().unwrap())
            .metadata()
            .unwrap();
        assert!(stderr_is_journal(Some(&format!("{}:{}", m.dev(), m.ino()))));
    }
}
