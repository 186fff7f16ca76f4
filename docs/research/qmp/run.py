#!/usr/bin/env python3
"""Pull-backup experiment for backy issue 17: image fleecing + persistent
dirty bitmaps in a running QEMU, driven over QMP (stdlib only).

    python3 /tmp/qmp-experiment/run.py            # QEMU from $PATH
    QEMU=/tmp/q72/usr/bin/qemu-system-x86_64 python3 run.py   # another build

Everything happens in /tmp/qmp-experiment/work-<version>/ (recreated).
Prints every QMP command and reply ("->" sent, "<-" received, "<- event").
"""
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
# qemu-img/qemu-io/nbdinfo used from outside QEMU (the host tools).
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

VERSION = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split()[3]
WORK = f"/tmp/qmp-experiment/work-{VERSION}"
DISK = f"{WORK}/disk.qcow2"
QMP_SOCK = f"{WORK}/qmp.sock"
NBD_SOCK = f"{WORK}/nbd.sock"
EXPORT = "backy"
NBD_URI = f"nbd+unix:///{EXPORT}?socket={NBD_SOCK}"
FAILURES = []


def banner(text):
    print(f"\n{'=' * 8} {text} {'=' * (60 - len(text))}", flush=True)


def check(cond, what):
    print(f"CHECK {'OK  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        FAILURES.append(what)


def sh(*args, ok=True, quiet=False):
    """Runs a host command, prints it and its output."""
    print("$ " + " ".join(args), flush=True)
    r = subprocess.run(args, capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip()
    if out and not quiet:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if ok and r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {args}")
    return r


class Qmp:
    """A minimal QMP client: one command at a time; events are kept."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.events = []
        greeting = json.loads(self.file.readline())
        print("<- " + json.dumps(greeting), flush=True)
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None, expect_error=False, show=True):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        msg["id"] = f"backy-{len(self.events)}-{time.monotonic_ns()}"
        if show:
            print("-> " + json.dumps(msg), flush=True)
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                print("<- event " + json.dumps(r), flush=True)
                self.events.append(r)
                continue
            if r.get("id") != msg["id"]:
                continue
            if show:
                text = json.dumps(r)
                print("<- " + (text if len(text) < 1500 else text[:1500] + " ...[cut]"), flush=True)
            if "error" in r and not expect_error:
                raise SystemExit(f"QMP {name} failed: {r['error']}")
            if expect_error and "error" not in r:
                FAILURES.append(f"{name} was expected to fail")
            return r

    def wait_event(self, name, timeout=10, match=None):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and (match is None or match(e)):
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise SystemExit(f"timeout waiting for event {name}")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                r = self._read()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(None)
            if "event" in r:
                print("<- event " + json.dumps(r), flush=True)
                self.events.append(r)

    def hmp(self, line):
        return self.cmd("human-monitor-command", {"command-line": line})["return"]

    def close(self):
        self.file.close()
        self.sock.close()


def start_qemu():
    for p in (QMP_SOCK,):
        if os.path.exists(p):
            os.unlink(p)
    args = [
        QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-drive", f"if=none,id=drive0,node-name=disk0,file={DISK},format=qcow2,cache=none,aio=threads",
        "-qmp", f"unix:{QMP_SOCK},server=on,wait=off",
    ]
    print("$ " + " ".join(args) + " &", flush=True)
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    atexit.register(lambda: proc.poll() is None and proc.kill())
    for _ in range(200):
        if os.path.exists(QMP_SOCK):
            break
        if proc.poll() is not None:
            raise SystemExit("QEMU exited at start")
        time.sleep(0.05)
    return proc, Qmp(QMP_SOCK)


def bitmaps_of(qmp, show=False):
    """The dirty bitmaps of node disk0. Not from query-block: while the
    backup job runs, drive0's root is the job's copy-before-write filter and
    query-block lists the filter's anonymous internal bitmaps instead."""
    r = qmp.cmd("query-named-block-nodes", {"flat": True}, show=show)["return"]
    node = [n for n in r if n["node-name"] == "disk0"][0]
    bms = node.get("dirty-bitmaps", [])
    if show or any("name" not in b for b in bms):
        print("   (disk0 also carries anonymous bitmaps: " + json.dumps([b for b in bms if "name" not in b]) + ")")
    return {b["name"]: b for b in bms if "name" in b}


def show_bitmaps(qmp, label):
    bms = bitmaps_of(qmp)
    print(f"   [{label}] bitmaps on drive0/disk0: " + json.dumps(list(bms.values())), flush=True)
    return bms


def node_names(qmp):
    r = qmp.cmd("query-named-block-nodes", {"flat": True}, show=False)["return"]
    return sorted(n["node-name"] for n in r)


def nbd_map(context=None):
    args = ["nbdinfo"]
    args.append(f"--map={context}" if context else "--map")
    args.append(NBD_URI)
    r = sh(*args)
    extents = []
    for line in r.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            extents.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3].strip() if len(parts) > 3 else ""))
    return extents


def read_export(pattern, offset, length):
    """True when the export holds `pattern` at offset..+length (qemu-io over NBD)."""
    r = sh(QEMU_IO, "-r", "-f", "raw", "-c", f"read -P {pattern} {offset} {length}", NBD_URI, ok=False)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr


def read_disk_hmp(qmp, pattern, offset, length):
    """True when the live disk (as the guest sees it) holds `pattern`.

    Not via HMP qemu-io: its output goes to QEMU's stdout, the QMP reply is
    "" whatever happened. A temporary read-only NBD export of disk0 instead.
    """
    started = "error" not in qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD_SOCK}}},
                                     expect_error=True)
    if started:
        FAILURES.pop()  # "expected to fail" bookkeeping: starting is fine too
    qmp.cmd("block-export-add", {"type": "nbd", "id": "live", "node-name": "disk0", "name": "live", "writable": False})
    r = sh(QEMU_IO, "-r", "-f", "raw", "-c", f"read -P {pattern} {offset} {length}",
           f"nbd+unix:///live?socket={NBD_SOCK}", ok=False)
    qmp.cmd("block-export-del", {"id": "live"})
    qmp.wait_event("BLOCK_EXPORT_DELETED", match=lambda e: e["data"]["id"] == "live")
    if started:
        qmp.cmd("nbd-server-stop")
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout + r.stderr


def guest_write(qmp, pattern, offset, length):
    # The qemu-io output ("wrote ..." or "write failed: ...") appears on
    # QEMU's stdout (inherited here), not in the QMP reply.
    qmp.hmp(f'qemu-io drive0 "write -P {pattern} {offset} {length}"')


# ---------------------------------------------------------------------------
# The backup session, as backy would drive it.

FLEECE_NODE = "backy-fleece"
FLEECE_FILE_NODE = "backy-fleece-file"
JOB = "backy-fleece-job"
CBW_NODE = "backy-cbw"
EXPORT_ID = "backy-export"
TMP_BITMAP = "backy-export-tmp"


def begin(qmp, new_bitmap, parent_bitmap=None, frozen_parent=True):
    """Fleecing + new bitmap in one transaction, then the NBD export.

    frozen_parent: export a disabled, non-persistent copy of the parent's
    bitmap made in the same transaction (so writes during the backup do
    not show up as dirty), instead of the live parent bitmap.
    """
    fleece_path = f"{WORK}/fleece-{new_bitmap}.qcow2"
    # The temporary overlay: an empty qcow2 of the disk's size, no backing in
    # its header; the backing is given as the live node at blockdev-add.
    size = qmp.cmd("query-block", show=False)["return"][0]["inserted"]["image"]["virtual-size"]
    sh(QEMU_IMG, "create", "-f", "qcow2", fleece_path, str(size))
    qmp.cmd("blockdev-add", {
        "driver": "qcow2",
        "node-name": FLEECE_NODE,
        "file": {"driver": "file", "node-name": FLEECE_FILE_NODE, "filename": fleece_path},
        "backing": "disk0",
    })
    actions = [
        {"type": "blockdev-backup", "data": {
            "job-id": JOB, "device": "disk0", "target": FLEECE_NODE, "sync": "none",
            "filter-node-name": CBW_NODE, "auto-dismiss": True}},
        {"type": "block-dirty-bitmap-add", "data": {
            "node": "disk0", "name": new_bitmap, "persistent": True}},
    ]
    export_bitmap = None
    if parent_bitmap:
        if frozen_parent:
            actions += [
                {"type": "block-dirty-bitmap-add", "data": {
                    "node": "disk0", "name": TMP_BITMAP, "persistent": False, "disabled": True}},
                {"type": "block-dirty-bitmap-merge", "data": {
                    "node": "disk0", "target": TMP_BITMAP, "bitmaps": [parent_bitmap]}},
            ]
            export_bitmap = TMP_BITMAP
        else:
            export_bitmap = parent_bitmap
    qmp.cmd("transaction", {"actions": actions})
    qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD_SOCK}}})
    export = {"type": "nbd", "id": EXPORT_ID, "node-name": FLEECE_NODE, "name": EXPORT,
              "writable": False, "allocation-depth": True}
    if export_bitmap:
        # The bitmap lives on disk0, the export is the fleecing node: name
        # the node explicitly (BlockDirtyBitmap form of BlockDirtyBitmapOrStr).
        export["bitmaps"] = [{"node": "disk0", "name": export_bitmap}]
    qmp.cmd("block-export-add", export)
    return fleece_path, export_bitmap


def end(qmp, fleece_path, remove_bitmaps):
    """Tears the export and fleecing down, then removes bitmaps."""
    qmp.cmd("block-export-del", {"id": EXPORT_ID})
    qmp.wait_event("BLOCK_EXPORT_DELETED", match=lambda e: e["data"]["id"] == EXPORT_ID)
    qmp.cmd("nbd-server-stop")
    jobs = qmp.cmd("query-block-jobs")["return"]
    if any(j["device"] == JOB for j in jobs):
        qmp.cmd("block-job-cancel", {"device": JOB})
        qmp.wait_event("BLOCK_JOB_CANCELLED", match=lambda e: e["data"]["device"] == JOB)
    qmp.cmd("blockdev-del", {"node-name": FLEECE_NODE})
    for name in remove_bitmaps:
        qmp.cmd("block-dirty-bitmap-remove", {"node": "disk0", "name": name})
    os.unlink(fleece_path)
    left = node_names(qmp)
    print("   nodes left: " + ", ".join(left), flush=True)
    check(not any(n.startswith("backy-") for n in left), "no backy-* block node left")
    check(qmp.cmd("query-block-jobs")["return"] == [], "no block job left")
    check(qmp.cmd("query-block-exports")["return"] == [], "no export left")


def dirty_extents(ctx):
    return [(o, l) for (o, l, t, d) in nbd_map(ctx) if t & 1]


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    banner(f"versions")
    sh(QEMU, "--version")
    sh(QEMU_IMG, "--version")

    banner("a. image with data, QEMU without a guest")
    sh(QEMU_IMG, "create", "-f", "qcow2", DISK, "64M")
    sh(QEMU_IO, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 1M", DISK)
    proc, qmp = start_qemu()

    banner("locking: host tools while QEMU holds the image")
    r = sh(QEMU_IMG, "info", DISK, ok=False)
    check(r.returncode != 0, "qemu-img info without -U is refused (lock)")
    r = sh(QEMU_IMG, "info", "-U", "--output=json", DISK, ok=False)
    check(r.returncode == 0, "qemu-img info -U (force-share) works")
    r = sh(QEMU_IMG, "bitmap", "--add", DISK, "x", ok=False)
    check(r.returncode != 0, "qemu-img bitmap --add is refused while QEMU runs")
    r = sh("qemu-nbd", "-r", "--fork", "--pid-file", f"{WORK}/qn.pid", "-k", f"{WORK}/qn.sock", "-f", "qcow2", DISK, ok=False)
    check(r.returncode != 0, "qemu-nbd -r is refused while QEMU runs")
    r = sh("qemu-nbd", "-r", "--fork", "--pid-file", f"{WORK}/qn.pid", "-k", f"{WORK}/qn.sock", "--image-opts",
           f"driver=qcow2,file.driver=file,file.filename={DISK},force-share=on,read-only=on", ok=False)
    print(f"   qemu-nbd with force-share=on,read-only=on: rc={r.returncode}")
    if r.returncode == 0:
        os.kill(int(open(f"{WORK}/qn.pid").read()), signal.SIGTERM)

    banner("b. round 1 (full): transaction fleecing + backy-1")
    show_bitmaps(qmp, "before")
    fleece, _ = begin(qmp, "backy-1")
    print("   nodes: " + ", ".join(node_names(qmp)))
    show_bitmaps(qmp, "after transaction")

    banner("c. guest write after the instant: export keeps old data")
    guest_write(qmp, "0x77", 0, "64k")
    check(read_disk_hmp(qmp, "0x77", 0, "64k"), "disk (drive0) has the new data 0x77 at 0")
    check(read_export("0x11", 0, "64k"), "export (fleecing node) still has the old data 0x11 at 0")
    check(read_export("0x11", "64k", "960k"), "export 64k..1M is old data 0x11")
    check(read_export("0x22", "8M", "1M"), "export 8M..9M is old data 0x22")
    ext = nbd_map()
    # nbdinfo --map on the fleecing export: allocation as seen through the chain
    check(any(t & 1 == 0 and o == 0 for (o, l, t, d) in ext), "export reports data at 0 (base:allocation)")
    sh("nbdinfo", "--list", f"nbd+unix://?socket={NBD_SOCK}")
    bms = show_bitmaps(qmp, "during round 1")
    check(bms["backy-1"]["count"] == 65536, "backy-1 recorded exactly the 64k guest write")
    banner("e. round 1 commit (no parent bitmap to remove)")
    end(qmp, fleece, remove_bitmaps=[])
    bms = show_bitmaps(qmp, "after round 1")
    check(list(bms) == ["backy-1"], "only backy-1 left")

    banner("d. writes between rounds, then round 2 (incremental, parent backy-1)")
    guest_write(qmp, "0x88", "4M", "64k")
    guest_write(qmp, "0x99", "10M", "4k")      # within one 64k granule
    guest_write(qmp, "0xaa", "20M", "130k")    # spans 3 granules
    bms = show_bitmaps(qmp, "before round 2")
    fleece, exp_bm = begin(qmp, "backy-2", parent_bitmap="backy-1", frozen_parent=True)
    show_bitmaps(qmp, "after round-2 transaction")
    ctx = f"qemu:dirty-bitmap:{exp_bm}"
    d1 = dirty_extents(ctx)
    print(f"   dirty extents of {exp_bm} (copy of backy-1): {d1}")
    want = [(0, 65536), (4 << 20, 65536), (10 << 20, 65536), (20 << 20, 3 * 65536)]
    check(d1 == want, f"only the written granules are dirty: {want}")
    # A guest write during the backup: must not show in the frozen copy,
    # does show in the live parent bitmap (and in backy-2).
    guest_write(qmp, "0xbb", "30M", "64k")
    d2 = dirty_extents(ctx)
    check(d2 == want, "a write during the backup does not show in the exported frozen copy")
    check(read_export("0x22", "8M", "1M") and read_export("0x88", "4M", "64k"), "export has round-2 point-in-time data")
    check(read_export("0", "30M", "64k"), "export has old (zero) data at 30M")
    bms = show_bitmaps(qmp, "during round 2")
    check(bms["backy-2"]["count"] == 65536, "backy-2 recorded only the write during the backup")
    check(bms["backy-1"]["count"] == 65536 * 7, "live backy-1 keeps recording (7 granules)")
    check(bms[TMP_BITMAP]["count"] == 65536 * 6 and not bms[TMP_BITMAP]["recording"], "frozen copy: 6 granules, not recording")
    check(bms[TMP_BITMAP].get("busy") is True, "exported bitmap is busy")
    # Removing an exported (busy) bitmap is refused.
    qmp.cmd("block-dirty-bitmap-remove", {"node": "disk0", "name": TMP_BITMAP}, expect_error=True)
    banner("e. round 2 commit: remove parent backy-1 (+ the frozen copy)")
    end(qmp, fleece, remove_bitmaps=["backy-1", TMP_BITMAP])
    bms = show_bitmaps(qmp, "after round 2")
    check(list(bms) == ["backy-2"], "only backy-2 left")

    banner("d'. exporting the LIVE parent bitmap instead (variant)")
    fleece, exp_bm = begin(qmp, "backy-3", parent_bitmap="backy-2", frozen_parent=False)
    d3 = dirty_extents(f"qemu:dirty-bitmap:backy-2")
    guest_write(qmp, "0xcc", "40M", "64k")
    d4 = dirty_extents(f"qemu:dirty-bitmap:backy-2")
    print(f"   live backy-2 before/after a write during backup: {d3} / {d4}")
    check(d4 != d3, "live parent bitmap shows writes made during the backup (harmless over-read, but not exact)")
    banner("e'. round 3 FAILS: remove the new bitmap backy-3, keep backy-2")
    end(qmp, fleece, remove_bitmaps=["backy-3"])
    bms = show_bitmaps(qmp, "after failed round 3")
    check(list(bms) == ["backy-2"] and bms["backy-2"]["count"] == 2 * 65536,
          "backy-2 still covers everything since round 2 (30M and 40M)")

    banner("f. clean quit, restart: persistent bitmap survives")
    sh(QEMU_IMG, "info", "-U", DISK)
    qmp.cmd("quit")
    proc.wait()
    qmp.close()
    sh(QEMU_IMG, "info", DISK)
    proc, qmp = start_qemu()
    bms = show_bitmaps(qmp, "after restart")
    check("backy-2" in bms and bms["backy-2"]["count"] == 2 * 65536 and bms["backy-2"]["recording"],
          "backy-2 survived the restart with its 2 granules, recording")
    guest_write(qmp, "0xdd", "50M", "64k")
    bms = show_bitmaps(qmp, "after a write")
    check(bms["backy-2"]["count"] == 3 * 65536, "backy-2 records writes after the restart")
    qmp.cmd("block-dirty-bitmap-add", {"node": "disk0", "name": "backy-new", "persistent": True})
    r = sh(QEMU_IMG, "info", "-U", "--output=json", DISK)
    on_disk = {b["name"]: b["flags"] for b in
               json.loads(r.stdout)["format-specific"]["data"].get("bitmaps", [])}
    print(f"   on disk while QEMU runs (qemu-img info -U): {on_disk}")
    check(on_disk.get("backy-2") == ["in-use", "auto"], "while QEMU runs, a loaded bitmap is marked in-use on disk")
    check("backy-new" not in on_disk, "a bitmap added over QMP is not on disk until QEMU closes the image")

    banner("f. kill -9, restart: bitmap inconsistent")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    qmp.close()
    r = sh(QEMU_IMG, "info", "--output=json", DISK)
    info = json.loads(r.stdout)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}
    check("in-use" in flags.get("backy-2", []), "qemu-img info shows flag in-use after SIGKILL")
    check("backy-new" not in flags, "after SIGKILL the bitmap added in that QEMU run is gone entirely")
    proc, qmp = start_qemu()
    bms = show_bitmaps(qmp, "after kill -9 + restart")
    check(bms["backy-2"].get("inconsistent") is True, "query-block: inconsistent: true")
    # What can be done with it:
    fleece, _ = begin(qmp, "backy-4")    # a full round is possible
    qmp.cmd("block-export-add", {"type": "nbd", "id": "try-inconsistent", "node-name": "disk0", "name": "x",
                                 "writable": False, "bitmaps": [{"node": "disk0", "name": "backy-2"}]},
            expect_error=True)
    qmp.cmd("block-dirty-bitmap-merge", {"node": "disk0", "target": "backy-4", "bitmaps": ["backy-2"]},
            expect_error=True)
    qmp.cmd("block-dirty-bitmap-clear", {"node": "disk0", "name": "backy-2"}, expect_error=True)
    qmp.cmd("block-dirty-bitmap-disable", {"node": "disk0", "name": "backy-2"}, expect_error=True)
    end(qmp, fleece, remove_bitmaps=["backy-2"])   # remove works: the only way out
    bms = show_bitmaps(qmp, "after removing the inconsistent one")
    check(list(bms) == ["backy-4"], "only backy-4 left")
    qmp.cmd("quit")
    proc.wait()
    qmp.close()
    sh(QEMU_IMG, "info", DISK)

    banner("result")
    if FAILURES:
        print("FAILED checks:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
