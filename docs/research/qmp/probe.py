#!/usr/bin/env python3
"""Small probes: bitmap given by name only (string form) on the fleecing
export; teardown in the wrong order; block-dirty-bitmap-remove in a
transaction."""
import os
import run
from run import sh, check

run.shutil.rmtree(run.WORK, ignore_errors=True); os.makedirs(run.WORK)
sh(run.QEMU_IMG, "create", "-f", "qcow2", run.DISK, "64M")
proc, q = run.start_qemu()
q.cmd("block-dirty-bitmap-add", {"node": "disk0", "name": "backy-p", "persistent": True})
run.guest_write(q, "0x44", "1M", "64k")
fleece, _ = run.begin(q, "backy-q")
# string form: bitmap name only, looked up from the exported fleecing node
r = q.cmd("block-export-add", {"type": "nbd", "id": "strform", "node-name": run.FLEECE_NODE, "name": "strform",
                               "writable": False, "bitmaps": ["backy-p"]}, expect_error=True)
if "error" not in r:
    run.FAILURES.pop()
    sh("nbdinfo", "--map=qemu:dirty-bitmap:backy-p", f"nbd+unix:///strform?socket={run.NBD_SOCK}")
    q.cmd("block-export-del", {"id": "strform"}); q.wait_event("BLOCK_EXPORT_DELETED")
# wrong order: blockdev-del while exported / while the job runs
q.cmd("blockdev-del", {"node-name": run.FLEECE_NODE}, expect_error=True)
q.cmd("block-export-del", {"id": run.EXPORT_ID}); q.wait_event("BLOCK_EXPORT_DELETED")
q.cmd("blockdev-del", {"node-name": run.FLEECE_NODE}, expect_error=True)
q.cmd("nbd-server-stop")
q.cmd("block-job-cancel", {"device": run.JOB}); q.wait_event("BLOCK_JOB_CANCELLED")
q.cmd("blockdev-del", {"node-name": run.FLEECE_NODE})
os.unlink(fleece)
# commit: both removals atomically
q.cmd("transaction", {"actions": [
    {"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "backy-p"}}]})
run.show_bitmaps(q, "end")
q.cmd("quit"); proc.wait()
print("FAILED: " + str(run.FAILURES) if run.FAILURES else "probe done")
