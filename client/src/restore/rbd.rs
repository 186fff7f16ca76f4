//! Restoring into a Ceph RBD image (`rbd:POOL/IMAGE`): the revision is fed
//! to `rbd import-diff` as a diff stream, so nothing is mapped in the
//! kernel. A fresh image is created at the revision's size and only data is
//! written (zeros stay unallocated); an existing image is overwritten only
//! with `--force`, and then zero ranges are discarded in it too.

use crate::source::process::Running;
use crate::source::rbd::Rbd;
use backy_common::ranges::is_all_zero;
use backy_common::source::SourceSpec;
use backy_common::{Error, Result};
use std::io::{BufWriter, Write};
use std::process::ChildStdin;
use std::time::Duration;

/// How long `rbd import-diff` may take to finish once its input ended.
const FINISH_TIMEOUT: Duration = Duration::from_secs(600);

pub struct RbdTarget {
    rbd: Rbd,
    running: Option<Running>,
    input: Option<BufWriter<ChildStdin>>,
    /// We created the image: an unfinished restore removes it again.
    created: bool,
}

impl RbdTarget {
    /// `spec` is what follows `rbd:`.
    pub fn open(spec: &str, size: u64, force: bool) -> Result<RbdTarget> {
        let rbd = Rbd::from_spec(&SourceSpec::from_cli(&format!("rbd:{spec}"), |_| false)?)?;
        let created = if rbd.exists()? {
            if !force {
                return Err(Error::exists(format!(
                    "rbd image {} exists: give --force to overwrite it",
                    rbd.image_spec()
                )));
            }
            false
        } else {
            rbd.create(size)?;
            true
        };
        let mut target = RbdTarget {
            rbd,
            running: None,
            input: None,
            created,
        };
        let mut running = target.rbd.import_diff()?;
        let stdin = running.child.stdin.take();
        target.running = Some(running);
        let stdin = stdin.ok_or_else(|| Error::internal("rbd import-diff has no stdin"))?;
        target.input = Some(BufWriter::with_capacity(1 << 20, stdin));
        // The size record resizes an existing image to the revision's.
        target.write(&[b"rbd diff v1\n".as_slice(), b"s", &size.to_le_bytes()])?;
        Ok(target)
    }

    fn write(&mut self, parts: &[&[u8]]) -> Result<()> {
        let input = self
            .input
            .as_mut()
            .ok_or_else(|| Error::internal("rbd import-diff input already closed"))?;
        for p in parts {
            if let Err(e) = input.write_all(p) {
                return Err(self.failed(format!("writing to rbd import-diff: {e}")));
            }
        }
        Ok(())
    }

    /// The error of a dead `rbd import-diff`, with its own message.
    fn failed(&mut self, context: String) -> Error {
        self.input = None;
        match self.running.take() {
            Some(running) => match running.finish(Duration::from_secs(10)) {
                Err(e) => Error::unavailable(format!("{}; {context}", e.message)),
                Ok(()) => Error::unavailable(context),
            },
            None => Error::unavailable(context),
        }
    }

    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if self.created && is_all_zero(data) {
            return Ok(());
        }
        let len = data.len() as u64;
        self.write(&[b"w", &offset.to_le_bytes(), &len.to_le_bytes(), data])
    }

    pub fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.created || len == 0 {
            return Ok(());
        }
        self.write(&[b"z", &offset.to_le_bytes(), &len.to_le_bytes()])
    }

    /// Ends the stream and waits for `rbd import-diff` to apply it all.
    pub fn commit(mut self) -> Result<()> {
        self.write(&[b"e"])?;
        let mut input = self
            .input
            .take()
            .ok_or_else(|| Error::internal("rbd import-diff input already closed"))?;
        if let Err(e) = input.flush() {
            return Err(self.failed(format!("writing to rbd import-diff: {e}")));
        }
        drop(input);
        let running = self
            .running
            .take()
            .ok_or_else(|| Error::internal("rbd import-diff is not running"))?;
        running.finish(FINISH_TIMEOUT)?;
        self.created = false;
        Ok(())
    }
}

impl Drop for RbdTarget {
    /// An unfinished restore: stop the import; an image made for it goes.
    fn drop(&mut self) {
        self.input = None;
        if let Some(mut running) = self.running.take() {
            running.kill();
        }
        if self.created {
            if let Err(e) = self.rbd.remove() {
                tracing::warn!("removing the unfinished restore target: {}", e.message);
            }
        }
    }
}
