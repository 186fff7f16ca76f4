//! The names of the store's RADOS objects and omap keys (docs/DESIGN.md
//! "Ceph pool store", "Pool layout"), and the `deleting` entry's form.
//! Pure: unit-tested here, used by every other file of the store.

use backy_common::{Error, JobName, Result, RevisionId};

/// The job list: omap `<job>` → when the pool first knew it (RFC 3339).
pub const JOBS_OBJECT: &str = "backy.jobs";
/// Hand-over requests: omap `<job>` → the request
/// (`backy_common::handover::Request`), read once per lease round by every
/// server for all its jobs.
pub const HANDOVERS_OBJECT: &str = "backy.handovers";
/// The omap key of a job's unfinished deletion: the ids, one a line.
pub const DELETING_KEY: &str = "deleting";
/// The prefix of a job's revision records in its object's omap.
pub const RECORD_PREFIX: &str = "rev.";
/// The largest piece of a manifest in one object.
pub const DIGESTS_PART_BYTES: usize = 4 << 20;

/// The object holding a job's records, epoch and lease lock.
pub fn job_object(job: &JobName) -> String {
    format!("backy.job.{job}")
}

/// Piece `part` of revision `id`'s manifest. `@` is in no job name and no
/// id, so no job's object can be another's manifest piece (a job may be
/// called `vm1.<id>.digests.0`).
pub fn digests_object(job: &JobName, id: &RevisionId, part: u64) -> String {
    format!("backy.job.{job}@{}.digests.{part}", id.short())
}

/// The omap key of revision `id`'s record.
pub fn record_key(id: &RevisionId) -> String {
    format!("{RECORD_PREFIX}{}", id.short())
}

/// The revision a record key names, if it is one.
pub fn record_id(key: &str) -> Option<RevisionId> {
    RevisionId::from_short(key.strip_prefix(RECORD_PREFIX)?).ok()
}

/// The image of a job: its name, as `rbd` shows it.
pub fn image_name(job: &JobName) -> &str {
    job.as_str()
}

/// The snapshot of revision `id`.
pub fn snapshot_name(id: &RevisionId) -> String {
    id.short()
}

/// The `deleting` entry's value.
pub fn encode_deleting(ids: &[RevisionId]) -> Vec<u8> {
    ids.iter()
        .map(|id| format!("{id}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Reads a `deleting` entry; `what` names it in errors.
pub fn decode_deleting(value: &[u8], what: &str) -> Result<Vec<RevisionId>> {
    let text = std::str::from_utf8(value)
        .map_err(|_| Error::data_loss(format!("{what}: the deletion journal is not UTF-8")))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            RevisionId::from_short(l)
                .map_err(|e| Error::data_loss(format!("{what}: the deletion journal names {l:?}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed id: the one whose short form encodes `n`.
    fn id(n: u128) -> RevisionId {
        let mut s = String::new();
        let alphabet = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        let mut v = n;
        for _ in 0..22 {
            s.insert(0, alphabet[(v % 58) as usize] as char);
            v /= 58;
        }
        RevisionId::from_short(&s).unwrap()
    }

    #[test]
    fn objects_and_keys_follow_the_layout() {
        let job = JobName::new("vm1").unwrap();
        let r = id(1);
        assert_eq!(job_object(&job), "backy.job.vm1");
        assert_eq!(
            digests_object(&job, &r, 3),
            "backy.job.vm1@1111111111111111111112.digests.3"
        );
        assert_eq!(record_key(&r), "rev.1111111111111111111112");
        assert_eq!(record_id("rev.1111111111111111111112"), Some(r));
        assert_eq!(record_id("deleting"), None);
        assert_eq!(record_id("rev.not-an-id"), None);
        assert_eq!(snapshot_name(&r), r.short());
        assert_eq!(image_name(&job), "vm1");
    }

    #[test]
    fn no_job_object_is_another_jobs_manifest_piece() {
        let r = id(77);
        let tricky = JobName::new(&format!("vm1.{}.digests.0", r.short())).unwrap();
        let vm1 = JobName::new("vm1").unwrap();
        assert_ne!(job_object(&tricky), digests_object(&vm1, &r, 0));
        assert!(JobName::new("vm1@x").is_err(), "'@' is no job name's");
        assert_ne!(job_object(&JobName::new("s").unwrap()), JOBS_OBJECT);
        assert_ne!(job_object(&JobName::new("s").unwrap()), HANDOVERS_OBJECT);
    }

    #[test]
    fn the_deletion_journal_round_trips_and_refuses_garbage() {
        let ids = [id(5), id(6)];
        let v = encode_deleting(&ids);
        assert_eq!(decode_deleting(&v, "j").unwrap(), ids);
        assert_eq!(decode_deleting(b"", "j").unwrap(), []);
        let err = decode_deleting(b"nope\n", "backy.job.vm1").unwrap_err();
        assert_eq!(err.kind, backy_common::ErrorKind::DataLoss);
        assert!(err.message.starts_with("backy.job.vm1: "), "{err}");
    }
}
