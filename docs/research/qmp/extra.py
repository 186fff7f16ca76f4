#!/usr/bin/env python3
"""Side experiments (run after run.py; same QEMU selection via $QEMU):

A. the newer copy-before-write filter + snapshot-access scheme, inserted
   into the graph of an already running QEMU whose drive was set up with
   -drive (no filter in the guest's path);
B. block-export-del while an NBD client is still connected (safe/hard);
C. backy "crashes" (QMP connection dropped) mid-backup: what QEMU keeps,
   and cleaning up from a new QMP connection;
D. the fleecing overlay runs out of space (tiny tmpfs): what the guest's
   write sees.
"""
import os
import subprocess
import time

import run
from run import banner, check, sh, guest_write, read_export, read_disk_hmp
import json

QMP_SOCK = run.QMP_SOCK


def fresh():
    run.shutil.rmtree(run.WORK, ignore_errors=True)
    os.makedirs(run.WORK)
    sh(run.QEMU_IMG, "create", "-f", "qcow2", run.DISK, "64M")
    sh(run.QEMU_IO, "-c", "write -P 0x11 0 1M", run.DISK)
    return run.start_qemu()


def part_a(qmp):
    banner("A. copy-before-write + snapshot-access added after start")
    tmp = f"{run.WORK}/cbw-target.qcow2"
    sh(run.QEMU_IMG, "create", "-f", "qcow2", tmp, "64M")
    qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "fl-target",
                             "file": {"driver": "file", "filename": tmp}})
    r = qmp.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                                 "file": "disk0", "target": "fl-target",
                                 "on-cbw-error": "break-snapshot", "cbw-timeout": 30},
                expect_error=True)
    if "error" in r:
        print("   -> cbw filter cannot be put over a node the guest device uses")
        qmp.cmd("blockdev-del", {"node-name": "fl-target"})
        return
    run.FAILURES.pop()  # it worked: not a failure of the expectation
    qmp.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-snap", "file": "fl-cbw"})
    qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": run.NBD_SOCK}}})
    qmp.cmd("block-export-add", {"type": "nbd", "id": "fl-exp", "node-name": "fl-snap",
                                 "name": run.EXPORT, "writable": False})
    guest_write(qmp, "0x77", 0, "64k")       # through drive0 -> disk0, NOT via fl-cbw
    check(not read_disk_hmp(qmp, "0x77", 0, "64k"),
          "the write through drive0 was refused: cbw unshares 'write' on disk0 (permission conflict)")
    check(read_export("0x11", 0, "64k"), "snapshot unchanged at 0")
    # writing through the filter node itself is copied before write:
    out = qmp.hmp('qemu-io fl-cbw "write -P 0x55 128k 64k"')
    print("   " + out.strip())
    check(read_export("0x11", "128k", "64k"), "a write through the cbw node keeps the old data in the snapshot")
    qmp.cmd("block-export-del", {"id": "fl-exp"})
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.cmd("nbd-server-stop")
    for n in ("fl-snap", "fl-cbw", "fl-target"):
        qmp.cmd("blockdev-del", {"node-name": n})


def part_b(qmp):
    banner("B. block-export-del with a connected client")
    fleece, _ = run.begin(qmp, "backy-b")
    client = subprocess.Popen([run.QEMU_IO, "-r", "-f", "raw", run.NBD_URI],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    r = qmp.cmd("block-export-del", {"id": run.EXPORT_ID}, expect_error=True)
    if "error" not in r:
        run.FAILURES.pop()
        print("   (safe mode did not refuse)")
    else:
        qmp.cmd("block-export-del", {"id": run.EXPORT_ID, "mode": "hard"})
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    client.stdin.close()
    client.wait()
    # the rest of the teardown (export already gone)
    qmp.cmd("nbd-server-stop")
    qmp.cmd("block-job-cancel", {"device": run.JOB})
    qmp.wait_event("BLOCK_JOB_CANCELLED")
    qmp.cmd("blockdev-del", {"node-name": run.FLEECE_NODE})
    qmp.cmd("block-dirty-bitmap-remove", {"node": "disk0", "name": "backy-b"})
    os.unlink(fleece)


def part_c(proc, qmp):
    banner("C. backy dies mid-backup: QMP connection dropped")
    fleece, _ = run.begin(qmp, "backy-c")
    qmp.close()   # backy is gone; QEMU keeps running
    qmp = run.Qmp(QMP_SOCK)
    qmp.cmd("query-block-exports")
    qmp.cmd("query-block-jobs")
    print("   nodes: " + ", ".join(run.node_names(qmp)))
    run.show_bitmaps(qmp, "left behind")
    check(len(qmp.cmd("query-block-exports", show=False)["return"]) == 1, "export survives the QMP disconnect")
    # cleanup by the well-known names, as a restarted backy would do
    qmp.cmd("block-export-del", {"id": run.EXPORT_ID, "mode": "hard"})
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.cmd("nbd-server-stop")
    qmp.cmd("block-job-cancel", {"device": run.JOB})
    qmp.wait_event("BLOCK_JOB_CANCELLED")
    qmp.cmd("blockdev-del", {"node-name": run.FLEECE_NODE})
    qmp.cmd("block-dirty-bitmap-remove", {"node": "disk0", "name": "backy-c"})
    os.unlink(fleece)
    # a second nbd-server-stop when none runs:
    qmp.cmd("nbd-server-stop", expect_error=True)
    return qmp


def part_d(qmp):
    banner("D. fleecing overlay out of space")
    tiny = f"{run.WORK}/tiny"
    os.makedirs(tiny, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", tiny)
    try:
        path = f"{tiny}/fleece.qcow2"
        sh(run.QEMU_IMG, "create", "-f", "qcow2", path, "64M")
        qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": run.FLEECE_NODE,
                                 "file": {"driver": "file", "filename": path}, "backing": "disk0"})
        qmp.cmd("transaction", {"actions": [{"type": "blockdev-backup", "data": {
            "job-id": run.JOB, "device": "disk0", "target": run.FLEECE_NODE, "sync": "none"}}]})
        guest_write(qmp, "0x66", 0, "4M")   # QEMU prints the result on its stdout
        qmp.cmd("query-block-jobs")
        qmp.cmd("query-status")
        check(not read_disk_hmp(qmp, "0x66", 0, "4M"),
              "the GUEST write failed (ENOSPC): blockdev-backup's cbw breaks guest writes when the overlay is full")
        jobs = qmp.cmd("query-block-jobs")["return"]
        if jobs:
            qmp.cmd("block-job-cancel", {"device": run.JOB, "force": True})
            qmp.wait_event("BLOCK_JOB_CANCELLED")
        qmp.cmd("blockdev-del", {"node-name": run.FLEECE_NODE})
    finally:
        time.sleep(0.2)
        sh("umount", tiny, ok=False)


def part_a2():
    banner("A2. same with a real guest device (-machine pc -S, virtio-blk)")
    run.shutil.rmtree(run.WORK, ignore_errors=True)
    os.makedirs(run.WORK)
    sh(run.QEMU_IMG, "create", "-f", "qcow2", run.DISK, "64M")
    args = [run.QEMU, "-machine", "pc", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64",
            "-drive", f"if=none,id=drive0,node-name=disk0,file={run.DISK},format=qcow2",
            "-device", "virtio-blk-pci,drive=drive0,id=vda",
            "-qmp", f"unix:{QMP_SOCK},server=on,wait=off"]
    if os.environ.get("QEMU_DATADIR"):   # e.g. an unpacked .deb: -L its share/qemu
        for d in os.environ["QEMU_DATADIR"].split(":"):
            args += ["-L", d]
    print("$ " + " ".join(args) + " &")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    run.atexit.register(lambda: proc.poll() is None and proc.kill())
    for _ in range(200):
        if os.path.exists(QMP_SOCK):
            break
        time.sleep(0.05)
    qmp = run.Qmp(QMP_SOCK)
    sh(run.QEMU_IMG, "create", "-f", "qcow2", f"{run.WORK}/t.qcow2", "64M")
    qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "fl-target",
                             "file": {"driver": "file", "filename": f"{run.WORK}/t.qcow2"}})
    sh(run.QEMU_IO, "-c", "write -P 0x11 0 64k", "-U", run.DISK, ok=False, quiet=True)  # no-op if locked
    qmp.cmd("cont")
    r = qmp.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                                 "file": "disk0", "target": "fl-target"}, expect_error=True)
    if "error" in r:
        print("   cbw over a node with a guest device: refused")
    else:
        run.FAILURES.pop()
        print("   cbw over a node with a guest device: accepted (it unshares 'write' only once a reader needs it)")
        r = qmp.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-snap", "file": "fl-cbw"},
                    expect_error=True)
        check("error" in r and "Permission conflict" in r["error"]["desc"],
              "snapshot-access over it is refused: the device's BlockBackend needs 'write' on disk0")
        qmp.cmd("blockdev-del", {"node-name": "fl-cbw"})
    qmp.cmd("blockdev-del", {"node-name": "fl-target"})
    # the backup-job scheme works with the device attached:
    run.begin(qmp, "backy-a2")
    check(len(qmp.cmd("query-block-jobs", show=False)["return"]) == 1, "blockdev-backup fleecing works with a guest device")
    qmp.cmd("quit")
    proc.wait()


def main():
    part_a2()
    proc, qmp = fresh()
    part_a(qmp)
    part_b(qmp)
    qmp = part_c(proc, qmp)
    part_d(qmp)
    qmp.cmd("quit")
    proc.wait()
    banner("result")
    print("FAILED checks:\n  " + "\n  ".join(run.FAILURES) if run.FAILURES else "all checks passed")


if __name__ == "__main__":
    main()
