//! The server's use of the schedule logic in `backy_common::schedule`.

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::revision::RevisionMeta;
use backy_common::Result;

/// Whether a scheduled job is due now: (due, tags, reason).
pub fn due_now(
    _server: &Server,
    _job: &JobDir,
    _revs: &[RevisionMeta],
    tags: &[String],
) -> Result<(bool, Vec<String>, String)> {
    Ok((true, tags.to_vec(), "scheduling not wired yet".into()))
}
