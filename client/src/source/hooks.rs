//! The job's snapshot hooks: `pre-snapshot` (freeze a guest, create an LVM
//! snapshot, ...), `post-snapshot` (thaw) and `cleanup` (remove the LVM
//! snapshot). Once `pre-snapshot` has been started, `post-snapshot` and
//! `cleanup` always run, whatever failed in between: a guest is never left
//! frozen and a snapshot never left behind by backy.

use super::process;
use backy_common::source::Hooks;
use backy_common::Result;
use std::process::{Command, Stdio};
use std::time::Duration;

const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// Hooks of one push, with what has run so far.
pub struct HookRunner {
    hooks: Hooks,
    env: Vec<(String, String)>,
    timeout: Duration,
    pre_ran: bool,
    post_ran: bool,
    cleanup_ran: bool,
}

impl HookRunner {
    /// `env` is passed to every hook (BACKY_JOB, BACKY_REVISION,
    /// BACKY_SNAPSHOT, ...).
    pub fn new(hooks: &Hooks, env: Vec<(String, String)>) -> Self {
        HookRunner {
            hooks: hooks.clone(),
            env,
            timeout: Duration::from_secs(hooks.hook_timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)),
            pre_ran: false,
            post_ran: false,
            cleanup_ran: false,
        }
    }

    /// Runs `pre-snapshot` (call it even when there is none: it starts the
    /// sequence). Even when it fails, `post-snapshot` and
    /// `cleanup` will run: it may have done half its work.
    pub fn pre_snapshot(&mut self) -> Result<()> {
        self.pre_ran = true;
        self.run("pre-snapshot", self.hooks.pre_snapshot.clone())
    }

    /// Runs `post-snapshot` once, if `pre_snapshot` was called.
    pub fn post_snapshot(&mut self) -> Result<()> {
        if self.post_ran || !self.started() {
            return Ok(());
        }
        self.post_ran = true;
        self.run("post-snapshot", self.hooks.post_snapshot.clone())
    }

    /// Runs `post-snapshot` if still due, then `cleanup` once.
    pub fn cleanup(&mut self) -> Result<()> {
        let post = self.post_snapshot();
        if self.cleanup_ran || !self.started() {
            return post;
        }
        self.cleanup_ran = true;
        let cleanup = self.run("cleanup", self.hooks.cleanup.clone());
        post.and(cleanup)
    }

    fn started(&self) -> bool {
        self.pre_ran
    }

    fn run(&self, name: &str, command: Option<String>) -> Result<()> {
        let Some(command) = command else {
            return Ok(());
        };
        tracing::info!(hook = name, %command, "running hook");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&command)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        process::spawn(cmd, format!("{name} hook `{command}`"))?.finish(self.timeout)
    }
}

impl Drop for HookRunner {
    /// A push that ends early (an error, a panic) still thaws and cleans up.
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::error!("{}", e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 29, item 13: the example client.yaml names every variable a
    /// hook gets, for every source kind (it left out QEMU's).
    #[test]
    fn the_example_config_names_every_hook_variable() {
        let example = include_str!("../../../packaging/examples/client.yaml")
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix('#'))
            .collect::<Vec<_>>()
            .join(" ");
        let sources: Vec<&str> = [
            include_str!("mod.rs"),
            include_str!("qemu/mod.rs"),
            include_str!("../push/rbd.rs"),
        ]
        .to_vec();
        for source in sources {
            for var in source.split('"').filter(|w| {
                w.starts_with("BACKY_")
                    && w.len() > 6
                    && w[6..].bytes().all(|c| c.is_ascii_uppercase() || c == b'_')
            }) {
                assert!(
                    example.contains(var),
                    "the example client.yaml does not name {var}"
                );
            }
        }
        assert!(example.contains("qemu: the path"), "{example}");
    }

    fn hooks(dir: &std::path::Path, pre: &str) -> Hooks {
        let log = dir.join("log");
        let log = log.display();
        Hooks {
            pre_snapshot: Some(format!("echo pre $BACKY_JOB >> {log}; {pre}")),
            post_snapshot: Some(format!("echo post >> {log}")),
            cleanup: Some(format!("echo cleanup >> {log}")),
            hook_timeout: Some(1),
        }
    }

    fn log(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    }

    #[test]
    fn post_and_cleanup_run_once_after_pre() {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![("BACKY_JOB".to_string(), "vm1".to_string())];
        let mut r = HookRunner::new(&hooks(dir.path(), "true"), env.clone());
        r.pre_snapshot().unwrap();
        r.post_snapshot().unwrap();
        r.post_snapshot().unwrap();
        drop(r);
        assert_eq!(log(dir.path()), "pre vm1\npost\ncleanup\n");

        // A failing or hanging pre-snapshot still gets post and cleanup.
        for (pre, want) in [("exit 7", "(exit 7)"), ("sleep 20", "did not finish within 1 s")] {
            let dir = tempfile::tempdir().unwrap();
            let mut r = HookRunner::new(&hooks(dir.path(), pre), env.clone());
            let e = r.pre_snapshot().unwrap_err();
            assert!(
                e.message.contains("pre-snapshot hook") && e.message.contains(want),
                "{}",
                e.message
            );
            drop(r);
            assert_eq!(log(dir.path()), "pre vm1\npost\ncleanup\n");
        }

        // Nothing ran, nothing to undo.
        let dir = tempfile::tempdir().unwrap();
        drop(HookRunner::new(&hooks(dir.path(), "true"), env));
        assert_eq!(log(dir.path()), "");
    }
}
