//! Live restore over QMP (pure: the client's `live_restore` module does
//! the I/O): a running guest whose disk node reads a backup (an NBD client
//! node serving a revision) is copied into a local target while it runs,
//! then moved onto it.
//!
//! 1. the target, opened by backy and handed over as a descriptor
//!    (`add-fd`), becomes a protocol node ([`target_args`]);
//! 2. `blockdev-mirror` ([`mirror_args`]) copies the source node into it,
//!    `sync: full`, `copy-mode: write-blocking`: a guest write completes
//!    only once it is on both, so the job converges however fast the guest
//!    writes;
//! 3. when the job is ready ([`JobState::ready`]), `job-complete` makes
//!    QEMU replace the source node by the target in every parent (the
//!    guest's device); `BLOCK_JOB_COMPLETED` says how it ended
//!    ([`completion_error`]);
//! 4. the source node and the nodes only it used ([`owned_subtree`]) are
//!    deleted, which closes QEMU's NBD connection.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Prefix of the names of one live restore's target node, job and fd set
/// (`backy-live-` and 8 hex digits: node names may have 31 characters).
pub const PREFIX: &str = "backy-live-";

/// The name of one live restore's target node, job and fd set `opaque`;
/// unique per run, since the target node stays the guest's disk.
pub fn run_name(seed: u64) -> String {
    format!("{PREFIX}{:08x}", seed & 0xffff_ffff)
}

/// The protocol driver for the target: QEMU checks that `host_device`
/// opens a block device and `file` anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetDriver {
    File,
    HostDevice,
}

impl TargetDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetDriver::File => "file",
            TargetDriver::HostDevice => "host_device",
        }
    }
}

/// `blockdev-add` of the target: the descriptor in `fdset`, raw (a raw
/// image has no backing, so nothing below it can show through).
pub fn target_args(node_name: &str, fdset: u64, driver: TargetDriver) -> Value {
    json!({
        "driver": driver.as_str(),
        "node-name": node_name,
        "filename": format!("/dev/fdset/{fdset}"),
    })
}

/// `blockdev-mirror` of `source` into `target`, `speed` bytes/s at most
/// for the background copy (guest writes are never throttled).
pub fn mirror_args(job: &str, source: &str, target: &str, speed: Option<u64>) -> Value {
    let mut args = json!({
        "job-id": job,
        "device": source,
        "target": target,
        "sync": "full",
        "copy-mode": "write-blocking",
        "auto-finalize": true,
        "auto-dismiss": true,
    });
    if let Some(speed) = speed {
        args["speed"] = json!(speed);
    }
    args
}

/// A mirror job as `query-block-jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    /// Bytes copied so far.
    pub offset: u64,
    /// Bytes to copy so far: the image, plus what guest writes dirtied.
    pub len: u64,
    /// Source and target are in sync: `job-complete` may pivot.
    pub ready: bool,
    pub status: String,
}

/// Job `id` in a `query-block-jobs` reply; `None` when it is gone.
pub fn find_job(jobs: &Value, id: &str) -> Result<Option<JobState>> {
    let list = jobs
        .as_array()
        .ok_or_else(|| Error::unavailable(format!("unexpected query-block-jobs reply: {}", clip(jobs))))?;
    let Some(job) = list.iter().find(|j| j["device"] == id) else {
        return Ok(None);
    };
    let number = |key: &str| {
        job[key].as_u64().ok_or_else(|| {
            Error::unavailable(format!("query-block-jobs: job {id} has no {key}: {}", clip(job)))
        })
    };
    Ok(Some(JobState {
        offset: number("offset")?,
        len: number("len")?,
        ready: job["ready"].as_bool().unwrap_or(false),
        status: job["status"].as_str().unwrap_or_default().to_string(),
    }))
}

/// The failure a `BLOCK_JOB_COMPLETED` event reports, if any (QEMU sets
/// `error` when the job failed; the target is then incomplete and the
/// guest still on its source).
pub fn completion_error(data: &Value) -> Option<String> {
    data.get("error").map(|e| match e.as_str() {
        Some(s) => s.to_string(),
        None => e.to_string(),
    })
}

/// The nodes to delete once `node` is replaced: `node` and every node
/// below it that nothing outside that subtree uses, parents before their
/// children, from an `x-debug-query-block-graph` reply taken before the
/// mirror started (it adds a filter above `node`, not below).
pub fn owned_subtree(graph: &Value, node: &str) -> Result<Vec<String>> {
    let bad = || {
        Error::unavailable(format!(
            "unexpected x-debug-query-block-graph reply: {}",
            clip(graph)
        ))
    };
    let mut names: BTreeMap<u64, &str> = BTreeMap::new();
    for n in graph["nodes"].as_array().ok_or_else(bad)? {
        let id = n["id"].as_u64().ok_or_else(bad)?;
        // Block backends (a guest's device, a temporary user) are parents only.
        if n["type"] == "block-driver" {
            names.insert(id, n["name"].as_str().unwrap_or_default());
        }
    }
    let mut edges: Vec<(u64, u64)> = Vec::new();
    for e in graph["edges"].as_array().ok_or_else(bad)? {
        edges.push((
            e["parent"].as_u64().ok_or_else(bad)?,
            e["child"].as_u64().ok_or_else(bad)?,
        ));
    }
    let Some(root) = names.iter().find(|(_, name)| **name == node).map(|(id, _)| *id) else {
        return Err(Error::not_found(format!(
            "node {node} is not in QEMU's block graph"
        )));
    };
    // Breadth first from the root; a child joins once all its parents have.
    let mut order = vec![root];
    let mut inside: BTreeSet<u64> = BTreeSet::from([root]);
    let mut i = 0;
    while i < order.len() {
        let parent = order[i];
        i += 1;
        for &(_, child) in edges.iter().filter(|(p, _)| *p == parent) {
            if inside.contains(&child) || !names.contains_key(&child) {
                continue;
            }
            if edges
                .iter()
                .filter(|(_, c)| *c == child)
                .all(|(p, _)| inside.contains(p))
            {
                inside.insert(child);
                order.push(child);
            }
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|id| names.get(&id))
        .filter(|name| !name.is_empty())
        .map(|name| name.to_string())
        .collect())
}

fn clip(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_arguments() {
        assert_eq!(run_name(0x1_2345_6789), "backy-live-23456789");
        assert!(run_name(u64::MAX).len() <= 31);
        let t = target_args("backy-live-1", 3, TargetDriver::HostDevice);
        assert_eq!(
            t,
            json!({"driver": "host_device", "node-name": "backy-live-1", "filename": "/dev/fdset/3"})
        );
        let m = mirror_args("j", "disk0", "t", None);
        assert_eq!(
            (&m["sync"], &m["copy-mode"], &m["device"], &m["target"]),
            (
                &json!("full"),
                &json!("write-blocking"),
                &json!("disk0"),
                &json!("t")
            )
        );
        assert!(m.get("speed").is_none());
        assert_eq!(mirror_args("j", "d", "t", Some(1 << 20))["speed"], 1 << 20);
    }

    #[test]
    fn jobs_and_their_end() {
        // Trimmed from QEMU 10.0.
        let jobs = json!([
            {"device": "other", "offset": 1, "len": 2, "ready": true, "status": "ready"},
            {"auto-finalize": true, "io-status": "ok", "device": "j", "busy": false,
             "len": 16842752, "offset": 16777216, "status": "running", "paused": false,
             "speed": 4194304, "ready": false, "type": "mirror", "actively-synced": false}
        ]);
        assert_eq!(
            find_job(&jobs, "j").unwrap(),
            Some(JobState {
                offset: 16777216,
                len: 16842752,
                ready: false,
                status: "running".into()
            })
        );
        assert_eq!(find_job(&jobs, "gone").unwrap(), None);
        assert!(find_job(&json!({}), "j").is_err());
        assert!(find_job(&json!([{"device": "j"}]), "j")
            .unwrap_err()
            .message
            .contains("has no offset"));
        let ok = json!({"device": "j", "len": 5, "offset": 5, "speed": 0, "type": "mirror"});
        assert_eq!(completion_error(&ok), None);
        let failed = json!({"device": "j", "len": 5, "offset": 2, "type": "mirror",
                            "error": "No space left on device"});
        assert_eq!(
            completion_error(&failed).as_deref(),
            Some("No space left on device")
        );
    }

    #[test]
    fn subtree_to_delete() {
        // drive0 -> disk0 (raw) -> nbd0; fmt1 -> shared <- other; the
        // filter a running job added above disk0 is not below it.
        let graph = json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": "drive0"},
                {"id": 2, "type": "block-driver", "name": "disk0"},
                {"id": 3, "type": "block-driver", "name": "nbd0"},
                {"id": 4, "type": "block-driver", "name": "fmt1"},
                {"id": 5, "type": "block-driver", "name": "shared"},
                {"id": 6, "type": "block-driver", "name": "other"},
                {"id": 7, "type": "block-driver", "name": "backing"},
                {"id": 8, "type": "block-job", "name": "j"}
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root"},
                {"parent": 2, "child": 3, "name": "file"},
                {"parent": 4, "child": 5, "name": "file"},
                {"parent": 6, "child": 5, "name": "file"},
                {"parent": 4, "child": 7, "name": "backing"},
                {"parent": 8, "child": 2, "name": "main node"}
            ]
        });
        assert_eq!(owned_subtree(&graph, "disk0").unwrap(), ["disk0", "nbd0"]);
        assert_eq!(owned_subtree(&graph, "fmt1").unwrap(), ["fmt1", "backing"]);
        assert_eq!(owned_subtree(&graph, "nbd0").unwrap(), ["nbd0"]);
        let e = owned_subtree(&graph, "drive0").unwrap_err();
        assert_eq!(e.message, "node drive0 is not in QEMU's block graph");
        assert!(owned_subtree(&json!([]), "disk0").is_err());
    }
}
