//! QMP, QEMU's machine protocol, as the running-guest mode of the `qemu`
//! source speaks it: the messages, what `query-named-block-nodes` says
//! about a disk's dirty bitmaps, and the commands of one backup (pure: the
//! client's `qmp` module does the socket I/O).
//!
//! One backup of a running disk node `N` (docs/DESIGN.md, "Push"):
//!
//! 1. a qcow2 overlay [`FLEECE_NODE`] backed by `N` (image fleecing);
//! 2. one `transaction` ([`begin_transaction`]): `blockdev-backup
//!    sync=none` from `N` into the overlay (a copy-before-write filter
//!    copies old data there before each guest write, so the overlay reads
//!    as `N` at this instant), the bitmap `backy-<new id>` (persistent
//!    on qcow2, in QEMU's memory only on raw) recording writes from this
//!    instant on, and [`FROZEN_BITMAP`], a disabled copy of the parent's
//!    bitmap: the changes up to this instant;
//! 3. an NBD export of the overlay carrying the frozen bitmap;
//! 4. teardown (export, NBD server, job, overlay), then on commit the
//!    parent's bitmap goes ([`commit_transaction`]), on failure the new one
//!    ([`abort_transaction`]): the parent's keeps recording and covers
//!    every write since the parent.

pub mod mirror;

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// The fleecing overlay: a qcow2 node backed by the disk node.
pub const FLEECE_NODE: &str = "backy-fleece";
/// The overlay's protocol (file) node.
pub const FLEECE_FILE_NODE: &str = "backy-fleece-file";
/// The guard between the overlay and its file: a `quorum` of the file and
/// a `null-co` node that needs one success, so a write the scratch cannot
/// take (full, failing) still succeeds and the guest's write goes on; the
/// failure comes as a `QUORUM_REPORT_BAD` event naming the file node,
/// which fails the push ([`scratch_failure`]).
pub const FLEECE_GUARD_NODE: &str = "backy-fleece-guard";
/// The guard's second child, which takes every write and holds nothing.
pub const FLEECE_NULL_NODE: &str = "backy-fleece-null";
/// The event that says a write into the scratch failed.
pub const SCRATCH_FAILURE_EVENT: &str = "QUORUM_REPORT_BAD";
/// The copy-before-write filter `blockdev-backup` inserts above the disk.
pub const FILTER_NODE: &str = "backy-cbw";
/// The `blockdev-backup` job that keeps the overlay point-in-time.
pub const JOB_ID: &str = "backy-fleece";
/// The block export's id and its NBD export name.
pub const EXPORT_ID: &str = "backy-export";
pub const EXPORT_NAME: &str = "backy";
/// The disabled, non-persistent copy of the parent's bitmap the export
/// carries: unlike the parent's, it does not grow while the push reads.
pub const FROZEN_BITMAP: &str = "backy-frozen";
/// `opaque` tag of the fd sets holding fleecing overlays, to find those
/// a dead push left among the sets of others (libvirt uses them too).
pub const FDSET_OPAQUE: &str = "backy-fleece";
/// `getfd` name of the listening socket handed to `nbd-server-start`.
pub const NBD_LISTENER_FD: &str = "backy-nbd";
/// The oldest QEMU this mode was run against (everything it uses exists
/// there: bitmaps named by node in `block-export-add`, fleecing).
pub const MIN_QEMU: (u64, u64) = (7, 2);

/// The names of one disk's objects in a push: the `index`th disk of a
/// group push (docs/DESIGN.md, "Groups"), 0 for a single disk, which has
/// the plain names of the constants above (what older versions left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub index: usize,
    pub fleece: String,
    pub fleece_file: String,
    pub guard: String,
    pub null: String,
    pub filter: String,
    pub job: String,
    pub export_id: String,
    pub export_name: String,
}

impl Names {
    pub fn of(index: usize) -> Names {
        let n = |base: &str| match index {
            0 => base.to_string(),
            i => format!("{base}-{i}"),
        };
        Names {
            index,
            fleece: n(FLEECE_NODE),
            fleece_file: n(FLEECE_FILE_NODE),
            guard: n(FLEECE_GUARD_NODE),
            null: n(FLEECE_NULL_NODE),
            filter: n(FILTER_NODE),
            job: n(JOB_ID),
            export_id: n(EXPORT_ID),
            export_name: n(EXPORT_NAME),
        }
    }
}

/// Whether `id` is `base` or `base-N`: one of ours, of some disk.
fn numbered(id: &str, base: &str) -> bool {
    id == base
        || id
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The first line: `{"QMP": {"version": ...}}`.
    Greeting { version: (u64, u64, u64) },
    /// A command's result.
    Return { id: Option<u64>, value: Value },
    /// A command's failure.
    Failure {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    /// An asynchronous event.
    Event { name: String, data: Value },
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(rename = "QMP")]
    qmp: Option<Value>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<RawError>,
    event: Option<String>,
    #[serde(default)]
    data: Value,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// Parses one line QEMU sent.
pub fn parse_message(line: &str) -> Result<Message> {
    let bad = |why: String| Error::unavailable(format!("unexpected QMP message ({why}): {}", clip(line)));
    let raw: RawMessage = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
    let id = raw.id.as_ref().and_then(Value::as_u64);
    if let Some(greeting) = raw.qmp {
        let v = &greeting["version"]["qemu"];
        let part = |k: &str| v[k].as_u64().unwrap_or(0);
        return Ok(Message::Greeting {
            version: (part("major"), part("minor"), part("micro")),
        });
    }
    if let Some(value) = raw.ret {
        return Ok(Message::Return { id, value });
    }
    if let Some(e) = raw.error {
        return Ok(Message::Failure {
            id,
            class: e.class,
            desc: e.desc,
        });
    }
    if let Some(name) = raw.event {
        return Ok(Message::Event { name, data: raw.data });
    }
    Err(bad("neither a return, an error nor an event".into()))
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A command as one line, with `id` to match its reply.
pub fn command_line(id: u64, execute: &str, arguments: Option<&Value>) -> String {
    let mut cmd = json!({ "execute": execute, "id": id });
    if let Some(args) = arguments {
        cmd["arguments"] = args.clone();
    }
    format!("{cmd}\n")
}

/// A node as `query-named-block-nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockNode {
    #[serde(rename = "node-name")]
    pub node_name: String,
    #[serde(default)]
    pub drv: String,
    pub image: NodeImage,
    #[serde(rename = "dirty-bitmaps", default)]
    pub bitmaps: Vec<LiveBitmap>,
    /// The node below a filter or format node, by name; set for the
    /// fleecing overlay's backing.
    #[serde(rename = "backing_file", default)]
    pub backing_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeImage {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(default)]
    pub format: String,
}

/// A dirty bitmap of a node in a running QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LiveBitmap {
    /// QEMU's own internal bitmaps (a backup job's) have none.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub persistent: bool,
    /// Left by a QEMU that did not close the image (a crash): unusable.
    #[serde(default)]
    pub inconsistent: bool,
    /// In use by an export or a job.
    #[serde(default)]
    pub busy: bool,
    pub granularity: u64,
    #[serde(default)]
    pub count: u64,
}

impl LiveBitmap {
    pub fn named(&self, name: &str) -> bool {
        self.name.as_deref() == Some(name)
    }
}

/// A device as `query-block` lists it, to find a node by drive id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockDevice {
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub qdev: String,
    #[serde(default)]
    pub inserted: Option<Inserted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Inserted {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
}

/// Parses a `query-named-block-nodes` (flat) return.
pub fn parse_nodes(value: &Value) -> Result<Vec<BlockNode>> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::unavailable(format!("unexpected query-named-block-nodes reply: {e}")))
}

/// Parses a `query-block` return.
pub fn parse_devices(value: &Value) -> Result<Vec<BlockDevice>> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::unavailable(format!("unexpected query-block reply: {e}")))
}

/// The node a job's `node:` names: a node name, else a drive id or guest
/// device (qdev) whose medium is a node. Libvirt names its nodes
/// `libvirt-N-format` and its drives `drive-virtio-disk0` (older) or
/// none, so both spellings are accepted.
pub fn resolve_node<'a>(
    nodes: &'a [BlockNode],
    devices: &[BlockDevice],
    name: &str,
) -> Result<&'a BlockNode> {
    let by_name = |n: &str| nodes.iter().find(|node| node.node_name == n);
    if let Some(node) = by_name(name) {
        return Ok(node);
    }
    // A guest device shows as its id, or as the QOM path of its backend
    // (`/machine/peripheral/virtio-disk0/virtio-backend`).
    let peripheral = format!("/machine/peripheral/{name}");
    let is_device = |qdev: &str| {
        qdev == name
            || qdev == peripheral
            || qdev
                .strip_prefix(peripheral.as_str())
                .is_some_and(|r| r.starts_with('/'))
    };
    let via_device = devices
        .iter()
        .filter(|d| d.device == name || is_device(&d.qdev))
        .find_map(|d| d.inserted.as_ref())
        .and_then(|i| by_name(&i.node_name));
    via_device.ok_or_else(|| {
        let mut known: Vec<&str> = nodes
            .iter()
            .map(|n| n.node_name.as_str())
            .filter(|n| !n.is_empty() && !n.starts_with('#'))
            .chain(
                devices
                    .iter()
                    .map(|d| d.device.as_str())
                    .filter(|d| !d.is_empty()),
            )
            .collect();
        known.sort_unstable();
        known.dedup();
        Error::not_found(format!(
            "QEMU has no block node or drive {name:?} (it has: {})",
            known.join(", ")
        ))
    })
}

/// The parent revision's bitmap on `node` when an incremental push can
/// trust it, else why not (the push then reads everything and compares).
/// A non-persistent one (a raw disk's) is as good while it exists: it has
/// recorded since the parent's instant in this same QEMU run.
pub fn parent_bitmap<'a>(
    node: &'a BlockNode,
    parent_id: &str,
) -> std::result::Result<&'a LiveBitmap, String> {
    if parent_id.is_empty() {
        return Err("no parent revision".into());
    }
    let name = crate::qemu::bitmap_name(parent_id);
    let on = &node.node_name;
    match node.bitmaps.iter().find(|b| b.named(&name)) {
        None => Err(format!(
            "node {on} has no bitmap {name} (QEMU stopped without saving it, or it was removed)"
        )),
        Some(b) if b.inconsistent => Err(format!(
            "bitmap {name} is inconsistent (QEMU did not close the image cleanly)"
        )),
        Some(b) if !b.recording => Err(format!("bitmap {name} is disabled")),
        Some(b) if b.busy => Err(format!("bitmap {name} is in use by another operation")),
        Some(b) => Ok(b),
    }
}

/// What a backy process that died mid-push left in QEMU: named objects
/// of this module's, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub exports: Vec<String>,
    pub jobs: Vec<String>,
    pub nodes: Vec<String>,
    /// (node, bitmap): the frozen copies (never persistent).
    pub bitmaps: Vec<(String, String)>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        *self == Leftovers::default()
    }

    /// Finds them in the replies of `query-block-exports`,
    /// `query-block-jobs` and `query-named-block-nodes`.
    pub fn find(exports: &Value, jobs: &Value, nodes: &[BlockNode]) -> Leftovers {
        let ids = |v: &Value, key: &str| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e[key].as_str())
                .filter(|id| numbered(id, EXPORT_ID) || numbered(id, JOB_ID))
                .map(str::to_string)
                .collect()
        };
        Leftovers {
            exports: ids(exports, "id"),
            jobs: ids(jobs, "device"),
            // The overlay only: its file node and the filter go with it.
            nodes: nodes
                .iter()
                .filter(|n| numbered(&n.node_name, FLEECE_NODE))
                .map(|n| n.node_name.clone())
                .collect(),
            bitmaps: nodes
                .iter()
                .flat_map(|n| {
                    n.bitmaps
                        .iter()
                        .filter(|b| b.named(FROZEN_BITMAP))
                        .map(|_| (n.node_name.clone(), FROZEN_BITMAP.to_string()))
                })
                .collect(),
        }
    }
}

/// `blockdev-add` of the fleecing overlay: the qcow2 in `fdset` (whose
/// file has `file_size` bytes now), backed by the disk node, over the
/// guard ([`FLEECE_GUARD_NODE`]). QEMU's `blockdev-backup` hands an error
/// writing the old data to the guest's write (before QEMU 10.1 nothing
/// else can be asked for, and from 10.1 `break-snapshot` would leave this
/// overlay reading the disk's new data without a word): the guard keeps
/// the guest's writes going and reports the failure.
pub fn overlay_args(names: &Names, fdset: u64, disk_node: &str, file_size: u64) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": names.fleece,
        "file": {
            "driver": "quorum",
            "node-name": names.guard,
            "vote-threshold": 1,
            // Reads from the file only (the null node holds nothing).
            "read-pattern": "fifo",
            "children": [
                {
                    "driver": "file",
                    "node-name": names.fleece_file,
                    "filename": format!("/dev/fdset/{fdset}"),
                },
                // quorum wants children of one length at open.
                {"driver": "null-co", "node-name": names.null, "size": file_size, "read-zeroes": true},
            ],
        },
        "backing": disk_node,
    })
}

/// Why the fleecing view is broken, from a [`SCRATCH_FAILURE_EVENT`]'s
/// data: `None` for an event about another node (someone else's quorum).
pub fn scratch_failure(names: &Names, data: &Value) -> Option<String> {
    if data["node-name"] != names.fleece_file.as_str() || data["type"] == "read" {
        return None;
    }
    let why = data["error"].as_str().unwrap_or("write failed");
    let sectors = data["sectors-count"].as_u64().unwrap_or(0);
    Some(format!(
        "the fleecing scratch could not take {} of old data the guest overwrote during the backup ({why}): \
         this push no longer has one instant and is abandoned; the guest's writes went on unharmed \
         (give scratch-dir more room, or push when the guest writes less)",
        crate::units::format_bytes(sectors * 512)
    ))
}

/// One disk at the backup instant.
#[derive(Debug, Clone)]
pub struct InstantDisk<'a> {
    pub names: &'a Names,
    pub node: &'a str,
    pub new_bitmap: &'a str,
    /// The parent revision's bitmap, when usable.
    pub parent_bitmap: Option<&'a str>,
    /// Whether the node's format can keep the bitmap across a restart of
    /// QEMU (qcow2 only); otherwise it lives in QEMU's memory.
    pub persistent: bool,
}

/// The backup instant of every disk at once (a group's disks share it):
/// fleecing starts, the new bitmaps start recording, and (with a usable
/// parent bitmap) their frozen copies are taken, atomically.
pub fn begin_transaction(disks: &[InstantDisk<'_>]) -> Value {
    let mut actions = Vec::new();
    for d in disks {
        actions.push(json!({"type": "blockdev-backup", "data": {
            "job-id": d.names.job, "device": d.node, "target": d.names.fleece,
            "sync": "none", "filter-node-name": d.names.filter, "auto-dismiss": true}}));
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": d.node, "name": d.new_bitmap, "persistent": d.persistent}}));
        if let Some(parent) = d.parent_bitmap {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": d.node, "name": FROZEN_BITMAP, "persistent": false, "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                "node": d.node, "target": FROZEN_BITMAP, "bitmaps": [parent]}}));
        }
    }
    json!({ "actions": actions })
}

/// `block-export-add` of the overlay, read-only, with the frozen bitmap
/// (named with its node: it lives on the disk node, not the overlay).
pub fn export_args(names: &Names, disk_node: &str, with_bitmap: bool) -> Value {
    let mut args = json!({
        "type": "nbd", "id": names.export_id, "node-name": names.fleece,
        "name": names.export_name, "writable": false,
    });
    if with_bitmap {
        args["bitmaps"] = json!([{ "node": disk_node, "name": FROZEN_BITMAP }]);
    }
    args
}

fn remove_bitmaps(disk_node: &str, names: &[&str]) -> Value {
    let actions: Vec<Value> = names
        .iter()
        .map(|name| json!({"type": "block-dirty-bitmap-remove", "data": {"node": disk_node, "name": name}}))
        .collect();
    json!({ "actions": actions })
}

/// Committed: the parent's bitmap (when there was a usable one) and the
/// frozen copy go; the new one records on.
pub fn commit_transaction(disk_node: &str, parent_bitmap: Option<&str>) -> Value {
    match parent_bitmap {
        Some(parent) => remove_bitmaps(disk_node, &[parent, FROZEN_BITMAP]),
        None => remove_bitmaps(disk_node, &[]),
    }
}

/// Failed: the new bitmap marks an instant no revision has; it and the
/// frozen copy go, the parent's keeps covering everything since the parent.
pub fn abort_transaction(disk_node: &str, new_bitmap: &str, frozen: bool) -> Value {
    if frozen {
        remove_bitmaps(disk_node, &[new_bitmap, FROZEN_BITMAP])
    } else {
        remove_bitmaps(disk_node, &[new_bitmap])
    }
}

/// The `backy-*` bitmaps on the node other than `keep`: left by
/// crashed pushes or a crashed QEMU (inconsistent); never needed again.
pub fn stray_bitmaps<'a>(node: &'a BlockNode, keep: &'a str) -> impl Iterator<Item = &'a str> {
    node.bitmaps
        .iter()
        .filter_map(|b| b.name.as_deref())
        .filter(move |n| n.starts_with("backy-") && *n != keep && *n != FROZEN_BITMAP)
}

/// The ids of fd sets holding our overlays, from `query-fdsets`.
pub fn our_fdsets(sets: &Value) -> Vec<u64> {
    sets.as_array()
        .into_iter()
        .flatten()
        .filter(|set| {
            set["fds"]
                .as_array()
                .is_some_and(|fds| fds.iter().any(|fd| fd["opaque"] == FDSET_OPAQUE))
        })
        .filter_map(|set| set["fdset-id"].as_u64())
        .collect()
}

/// Whether a `qemu` version can back up a running guest.
pub fn check_version(version: (u64, u64, u64)) -> Result<()> {
    let (major, minor, micro) = version;
    if (major, minor) < MIN_QEMU {
        return Err(Error::precondition(format!(
            "QEMU {major}.{minor}.{micro} is too old to back up a running guest (needs {}.{} or later)",
            MIN_QEMU.0, MIN_QEMU.1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from QEMU 10.0's `query-named-block-nodes` during a backup
    /// (7.2 also lists an unnamed internal bitmap on the disk node).
    const NODES: &str = r##"[
      {"node-name": "backy-fleece", "drv": "qcow2", "backing_file": "disk0",
       "image": {"virtual-size": 67108864, "format": "qcow2"}, "dirty-bitmaps": []},
      {"node-name": "disk0", "drv": "qcow2",
       "image": {"virtual-size": 67108864, "format": "qcow2"},
       "dirty-bitmaps": [
         {"granularity": 65536, "recording": true, "busy": false, "persistent": false, "count": 0},
         {"name": "backy-frozen", "granularity": 65536, "recording": false, "busy": true, "persistent": false, "count": 65536},
         {"name": "backy-AAAAAAAAAAAAAAAAAAAAAA", "granularity": 65536, "recording": true, "busy": false, "persistent": true, "count": 131072},
         {"name": "backy-BBBBBBBBBBBBBBBBBBBBBB", "granularity": 65536, "recording": false, "busy": false, "persistent": true, "count": 0, "inconsistent": true},
         {"name": "backy-CCCCCCCCCCCCCCCCCCCCCC", "granularity": 65536, "recording": false, "busy": false, "persistent": true, "count": 0},
         {"name": "other", "granularity": 65536, "recording": true, "busy": false, "persistent": true, "count": 0}
       ]},
      {"node-name": "#block123", "drv": "file", "image": {"virtual-size": 200704, "format": "file"}}
    ]"##;

    fn nodes() -> Vec<BlockNode> {
        parse_nodes(&serde_json::from_str(NODES).unwrap()).unwrap()
    }

    #[test]
    fn messages() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert_eq!(
            parse_message(greeting).unwrap(),
            Message::Greeting { version: (10, 0, 2) }
        );
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(3),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(r#"{"id": 4, "error": {"class": "GenericError", "desc": "Node 'x' not found"}}"#)
                .unwrap(),
            Message::Failure {
                id: Some(4),
                class: "GenericError".into(),
                desc: "Node 'x' not found".into()
            }
        );
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "backy-export"}}"#;
        assert_eq!(
            parse_message(event).unwrap(),
            Message::Event {
                name: "BLOCK_EXPORT_DELETED".into(),
                data: json!({"id": "backy-export"})
            }
        );
        for bad in ["", "[]", "{}", "{\"foo\": 1}", &"x".repeat(1000)] {
            let e = parse_message(bad).unwrap_err();
            assert!(e.message.starts_with("unexpected QMP message"), "{}", e.message);
            assert!(e.message.len() < 400, "clipped");
        }
        let line = command_line(7, "query-block", None);
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"execute": "query-block", "id": 7})
        );
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        assert!(check_version((7, 2, 0)).is_ok() && check_version((10, 0, 2)).is_ok());
        assert!(check_version((7, 1, 9))
            .unwrap_err()
            .message
            .contains("needs 7.2"));
    }

    #[test]
    fn parent_bitmap_and_strays() {
        let nodes = nodes();
        let disk = resolve_node(&nodes, &[], "disk0").unwrap();
        assert_eq!(disk.image.virtual_size, 64 << 20);
        let id = |c: char| c.to_string().repeat(22);
        assert_eq!(parent_bitmap(disk, &id('A')).unwrap().count, 131072);
        assert!(parent_bitmap(disk, &id('B'))
            .unwrap_err()
            .contains("inconsistent"));
        assert!(parent_bitmap(disk, &id('C')).unwrap_err().contains("disabled"));
        assert!(parent_bitmap(disk, &id('D'))
            .unwrap_err()
            .contains("has no bitmap backy-DDD"));
        assert_eq!(parent_bitmap(disk, "").unwrap_err(), "no parent revision");
        let keep = format!("backy-{}", id('A'));
        let strays: Vec<&str> = stray_bitmaps(disk, &keep).collect();
        assert_eq!(
            strays,
            [format!("backy-{}", id('B')), format!("backy-{}", id('C'))]
        );
    }

    #[test]
    fn nodes_by_name_drive_or_device() {
        let nodes = nodes();
        let devices = parse_devices(&json!([
            {"device": "drive0", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"node-name": "disk0"}},
            {"device": "", "qdev": "virtio-disk1", "inserted": {"node-name": "backy-fleece"}},
            {"device": "cd0"}
        ]))
        .unwrap();
        assert_eq!(
            resolve_node(&nodes, &devices, "drive0").unwrap().node_name,
            "disk0"
        );
        assert_eq!(
            resolve_node(&nodes, &devices, "virtio-disk0").unwrap().node_name,
            "disk0"
        );
        assert!(resolve_node(&nodes, &devices, "virtio-disk").is_err());
        assert_eq!(
            resolve_node(&nodes, &devices, "virtio-disk1").unwrap().node_name,
            "backy-fleece"
        );
        let e = resolve_node(&nodes, &devices, "drive9").unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::NotFound);
        assert_eq!(
            e.message,
            "QEMU has no block node or drive \"drive9\" (it has: backy-fleece, cd0, disk0, drive0)"
        );
        assert!(parse_nodes(&json!({"not": "a list"})).is_err());
    }

    #[test]
    fn leftovers_of_a_dead_push() {
        let nodes = nodes();
        let left = Leftovers::find(
            &json!([{"id": "backy-export", "node-name": "backy-fleece"}, {"id": "theirs"},
                     {"id": "backy-export-1"}, {"id": "backy-export-x"}]),
            &json!([{"device": "backy-fleece", "type": "backup"}, {"device": "mirror0"},
                     {"device": "backy-fleece-2"}, {"device": "backy-fleece-file"}]),
            &nodes,
        );
        assert_eq!(left.exports, ["backy-export", "backy-export-1"]);
        assert_eq!(left.jobs, ["backy-fleece", "backy-fleece-2"]);
        assert_eq!(left.nodes, ["backy-fleece"]);
        assert_eq!(left.bitmaps, [("disk0".to_string(), FROZEN_BITMAP.to_string())]);
        assert!(Leftovers::find(&json!([]), &json!([]), &[]).is_empty());
        let sets = json!([
            {"fdset-id": 0, "fds": [{"fd": 30, "opaque": "libvirt"}]},
            {"fdset-id": 4, "fds": [{"fd": 31, "opaque": "backy-fleece"}]},
            {"fdset-id": 5, "fds": [{"fd": 32}]}
        ]);
        assert_eq!(our_fdsets(&sets), [4]);
    }

    #[test]
    fn backup_commands() {
        let n0 = Names::of(0);
        let one = |parent: Option<&'static str>, persistent: bool| {
            begin_transaction(&[InstantDisk {
                names: &n0,
                node: "disk0",
                new_bitmap: "backy-N",
                parent_bitmap: parent,
                persistent,
            }])
        };
        let begin = one(Some("backy-P"), true);
        let actions = begin["actions"].as_array().unwrap();
        let types: Vec<&str> = actions.iter().map(|a| a["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "blockdev-backup",
                "block-dirty-bitmap-add",
                "block-dirty-bitmap-add",
                "block-dirty-bitmap-merge"
            ]
        );
        assert_eq!(actions[0]["data"]["sync"], "none");
        assert_eq!(actions[1]["data"]["persistent"], true);
        assert_eq!(actions[2]["data"]["disabled"], true);
        assert_eq!(actions[3]["data"]["bitmaps"], json!(["backy-P"]));
        assert_eq!(one(None, true)["actions"].as_array().unwrap().len(), 2);
        // A raw node's bitmap lives in QEMU's memory.
        assert_eq!(one(None, false)["actions"][1]["data"]["persistent"], false);
        assert_eq!(
            export_args(&n0, "disk0", true)["bitmaps"],
            json!([{"node": "disk0", "name": FROZEN_BITMAP}])
        );
        assert!(export_args(&n0, "disk0", false).get("bitmaps").is_none());
        // Two disks: one transaction, each with its own job, filter and overlay.
        let n1 = Names::of(1);
        let both = begin_transaction(&[
            InstantDisk {
                names: &n0,
                node: "disk0",
                new_bitmap: "backy-N",
                parent_bitmap: None,
                persistent: true,
            },
            InstantDisk {
                names: &n1,
                node: "disk1",
                new_bitmap: "backy-M",
                parent_bitmap: Some("backy-Q"),
                persistent: true,
            },
        ]);
        let actions = both["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 6);
        assert_eq!(actions[2]["data"]["job-id"], "backy-fleece-1");
        assert_eq!(actions[2]["data"]["target"], "backy-fleece-1");
        assert_eq!(actions[2]["data"]["filter-node-name"], "backy-cbw-1");
        assert_eq!(actions[5]["data"]["node"], "disk1");
        assert_eq!(export_args(&n1, "disk1", false)["name"], "backy-1");
        let overlay = overlay_args(&n0, 3, "disk0", 196_608);
        let guard = &overlay["file"];
        assert_eq!(guard["driver"], "quorum");
        assert_eq!(guard["vote-threshold"], 1);
        assert_eq!(guard["children"][0]["filename"], "/dev/fdset/3");
        assert_eq!(guard["children"][1]["size"], 196_608);
        // Trimmed from QEMU 10.0 with the overlay on a full tmpfs.
        let full = json!({"node-name": "backy-fleece-file", "sectors-count": 2048, "sector-num": 4736,
                          "type": "write", "error": "No space left on device"});
        let why = scratch_failure(&n0, &full).unwrap();
        assert_eq!(scratch_failure(&n1, &full), None);
        assert!(
            why.starts_with("the fleecing scratch could not take 1.00 MiB of old data"),
            "{why}"
        );
        assert!(why.contains("(No space left on device)"), "{why}");
        assert_eq!(
            scratch_failure(&n0, &json!({"node-name": "theirs", "type": "write"})),
            None
        );
        let names = |v: Value| -> Vec<String> {
            v["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["data"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            names(commit_transaction("disk0", Some("backy-P"))),
            ["backy-P", FROZEN_BITMAP]
        );
        assert!(names(commit_transaction("disk0", None)).is_empty());
        assert_eq!(
            names(abort_transaction("disk0", "backy-N", true)),
            ["backy-N", FROZEN_BITMAP]
        );
        assert_eq!(names(abort_transaction("disk0", "backy-N", false)), ["backy-N"]);
    }
}
