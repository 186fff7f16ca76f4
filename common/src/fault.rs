//! Fault points for fault-injection tests. `BACKY_FAULT=name` aborts the
//! process (as `kill -9` would: no unwinding, no cleanup) the first time it
//! reaches the crash point `name`; `BACKY_FAULT=name@N` on the N-th time.
//! `BACKY_FAULT=error:name[@N]` makes the error point `name` fail instead
//! (an I/O error that late in an operation). `BACKY_FAULT=stop:name[@N]`
//! stops the process with SIGSTOP at the crash point `name` instead (a
//! process frozen there: the test then sends SIGKILL or SIGCONT). Unset,
//! each point costs one relaxed atomic load.
//!
//! Only with the cargo feature `fault-injection` (the test build of
//! scripts/test.sh turns it on): without it every point is empty and the
//! environment is never read, so a packaged binary ignores `BACKY_FAULT`.

#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "fault-injection")]
use std::sync::OnceLock;

#[cfg(feature = "fault-injection")]
struct Fault {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

#[cfg(feature = "fault-injection")]
fn configured() -> Option<&'static Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var("BACKY_FAULT").ok()?;
            let (point, nth) = match spec.split_once('@') {
                Some((p, n)) => (p.to_string(), n.parse().ok()?),
                None => (spec, 1),
            };
            Some(Fault {
                point,
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// A named error point: `Err` when `BACKY_FAULT=error:name` selects it.
#[cfg(feature = "fault-injection")]
pub fn fail(name: &str) -> crate::Result<()> {
    if let Some(f) = configured() {
        if f.point.strip_prefix("error:") == Some(name) && f.hits.fetch_add(1, Ordering::SeqCst) + 1 == f.nth
        {
            eprintln!("BACKY_FAULT: failing at {name}@{}", f.nth);
            return Err(crate::Error::internal(format!("injected fault at {name}")));
        }
    }
    Ok(())
}

/// A behaviour tests switch on with `BACKY_FAULT=mode:name`.
#[cfg(feature = "fault-injection")]
pub fn mode(name: &str) -> bool {
    configured().is_some_and(|f| f.point.strip_prefix("mode:") == Some(name))
}

/// A named crash point (or stop point, `stop:name`).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if let Some(f) = configured() {
        let stop = f.point.strip_prefix("stop:") == Some(name);
        if (stop || f.point == name) && f.hits.fetch_add(1, Ordering::SeqCst) + 1 == f.nth {
            if stop {
                eprintln!("BACKY_FAULT: stopping at {name}@{}", f.nth);
                // SAFETY: raise has no memory-safety preconditions.
                unsafe { libc::raise(libc::SIGSTOP) };
                eprintln!("BACKY_FAULT: continued at {name}@{}", f.nth);
                return;
            }
            eprintln!("BACKY_FAULT: aborting at {name}@{}", f.nth);
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fail(_name: &str) -> crate::Result<()> {
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn mode(_name: &str) -> bool {
    false
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
