//! The pool store's errors: by kind, so callers branch on the variant and
//! the model's [`ErrorKind`] (what the server's edge maps to a status),
//! never on message text.

use crate::ceph::{CephError, KeeperError};
use backy_common::{Error, ErrorKind, JobName, Reason, RevisionId};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Ceph(#[from] CephError),
    /// The lease refused a write: lost, expired, not held.
    #[error(transparent)]
    Lease(#[from] KeeperError),
    /// From the model's codecs and checks (records, manifests, names).
    #[error(transparent)]
    Model(#[from] Error),
    /// Stored data is not what its record says (a manifest piece missing
    /// or altered, a record that names another id).
    #[error("{what}: {detail}")]
    DataLoss { what: String, detail: String },
    /// A protected snapshot (the retention lock) cannot be removed.
    #[error("job {job}: revision {id} is protected (rbd snap protect); nothing was deleted")]
    Protected { job: JobName, id: RevisionId },
    #[error("job {job}: no revision {id}")]
    NoRevision { job: JobName, id: RevisionId },
    /// The pool's state does not allow it now (a parent that is not the
    /// newest snapshot, a revision id in use).
    #[error("{0}")]
    Precondition(String),
    /// The data received does not match the client's stream checksum.
    #[error("end-to-end check failed: the data received does not match the client's stream checksum")]
    StreamChecksum,
    /// The manifest of what was received differs from the client's.
    #[error("end-to-end check failed: the stored image's manifest differs from the client's")]
    ManifestMismatch,
    /// The new snapshot holds writes the push did not make (a stale writer,
    /// head writes of a push that died that this one did not send again).
    #[error("job {job}: snapshot {id} holds writes this push did not make ({detail}); it was removed")]
    ForeignWrites {
        job: JobName,
        id: RevisionId,
        detail: String,
    },
    /// The `rbd` tool failed (its own message in `detail`).
    #[error("{command}: {detail}")]
    Tool { command: String, detail: String },
    /// Frames out of order or outside the image: the caller's bug or a
    /// peer's bad request.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = PoolError> = std::result::Result<T, E>;

impl PoolError {
    /// The model's kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PoolError::Ceph(e) if e.is_not_found() => ErrorKind::NotFound,
            PoolError::Ceph(e) if e.is_denied() => ErrorKind::PermissionDenied,
            PoolError::Ceph(e) if e.is_busy() => ErrorKind::Busy,
            PoolError::Ceph(_) | PoolError::Tool { .. } => ErrorKind::Unavailable,
            PoolError::Lease(e) if e.is_busy() => ErrorKind::Busy,
            PoolError::Lease(_) => ErrorKind::FailedPrecondition,
            PoolError::Model(e) => e.kind,
            PoolError::DataLoss { .. }
            | PoolError::StreamChecksum
            | PoolError::ManifestMismatch
            | PoolError::ForeignWrites { .. } => ErrorKind::DataLoss,
            PoolError::Protected { .. } | PoolError::Precondition(_) => ErrorKind::FailedPrecondition,
            PoolError::NoRevision { .. } => ErrorKind::NotFound,
            PoolError::Invalid(_) => ErrorKind::InvalidArgument,
        }
    }

    pub fn is_data_loss(&self) -> bool {
        self.kind() == ErrorKind::DataLoss
    }
}

impl From<PoolError> for Error {
    fn from(e: PoolError) -> Error {
        let reason = match &e {
            PoolError::StreamChecksum => Reason::StreamChecksumMismatch,
            PoolError::ManifestMismatch => Reason::ManifestMismatch,
            PoolError::Model(m) => m.reason,
            _ => Reason::Unspecified,
        };
        // Refused for another server's lease: the holder's cookie is the
        // URL clients reach it at.
        let redirect = match &e {
            PoolError::Lease(k) => k.holder_url().map(str::to_string),
            _ => None,
        };
        Error {
            kind: e.kind(),
            message: e.to_string(),
            reason,
            redirect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_reasons_cross_into_the_model() {
        let e: Error = PoolError::StreamChecksum.into();
        assert_eq!(
            (e.kind, e.reason),
            (ErrorKind::DataLoss, Reason::StreamChecksumMismatch)
        );
        let e: Error = PoolError::ManifestMismatch.into();
        assert_eq!(e.reason, Reason::ManifestMismatch);
        let job = JobName::new("vm1").unwrap();
        let id = RevisionId::new_random();
        let p = PoolError::Protected { job, id };
        assert_eq!(p.kind(), ErrorKind::FailedPrecondition);
        assert!(p.to_string().contains("is protected"), "{p}");
        let m: Error = PoolError::Model(Error::exists("x")).into();
        assert_eq!(m.kind, ErrorKind::AlreadyExists);
    }
}
