#!/usr/bin/env python3
"""backy benchmark: backy against the tools an operator would use instead,
and against the physical reference points, on one btrfs loop filesystem.

Run through scripts/bench.sh (which installs the tools and builds backy).
Every measurement starts with a dropped page cache. Prints one table and
writes the results as JSON.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 4 * MIB


def parse_size(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4G, 512M")
    mult = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    """Runs a setup command (not measured); fails loudly."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"cannot drop caches ({e}): page-cache state not controlled")


def allocated(path):
    return os.stat(path).st_blocks * 512


def btrfs_du(path):
    """`btrfs filesystem du -s` of `path` (a file or a directory tree):
    total, exclusive and set-shared bytes."""
    out = run(["btrfs", "filesystem", "du", "-s", "--raw", path])
    total, excl, shared = out.splitlines()[1].split()[:3]
    return {"total_bytes": int(total), "exclusive_bytes": int(excl), "shared_bytes": int(shared)}


def exclusive(path):
    """Bytes of `path` in extents no other file shares, from `btrfs
    filesystem du`: what keeping it costs."""
    return btrfs_du(path)["exclusive_bytes"]


def trim(path):
    """Hands the free space of the loop filesystem at `path` back to the
    file holding it (deleted files' blocks stay allocated there otherwise,
    and the disk under it may be small). Best effort, not measured."""
    subprocess.run(["fstrim", path], capture_output=True)


def fs_used(path):
    """Bytes in use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tree_allocated(path):
    """Bytes allocated by the files under `path` (a peer's repository)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += allocated(os.path.join(root, name))
    return total


# ---------------------------------------------------------------- workload


def make_image(path, size, data_fraction, seed):
    """A sparse image: data runs of 1-64 MiB (64 KiB aligned) between holes,
    `data_fraction` of it data. Returns the data extents."""
    rng = random.Random(seed)
    gen = random.Random(seed + 1)
    extents = []
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            run_len = rng.randrange(16, 1025) * 64 * 1024
            is_data = rng.random() < data_fraction
            end = min(size, pos + run_len)
            if is_data:
                f.seek(pos)
                at = pos
                while at < end:
                    n = min(8 * MIB, end - at)
                    f.write(gen.randbytes(n))
                    at += n
                extents.append((pos, end - pos))
            pos = end
    return extents


def make_changes(size, change_fraction, seed):
    """Scattered writes: one 4-64 KiB write (4 KiB aligned) into
    `change_fraction` of the 4 MiB blocks, plus a few unaligned writes."""
    rng = random.Random(seed)
    blocks = (size + BLOCK - 1) // BLOCK
    picked = rng.sample(range(blocks), max(1, round(blocks * change_fraction)))
    writes = []
    for b in sorted(picked):
        blen = min(BLOCK, size - b * BLOCK)
        length = min(blen, rng.randrange(1, 17) * 4096)
        off = b * BLOCK + rng.randrange(0, (blen - length) // 4096 + 1) * 4096
        writes.append((off, length))
    for _ in range(5):
        length = rng.randrange(1, 20000)
        off = rng.randrange(0, size - length)
        writes.append((off, length))
    writes.sort()
    return writes


def apply_changes(path, writes, seed):
    gen = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, length in writes:
            os.pwrite(fd, gen.randbytes(length), off)
    finally:
        os.close(fd)


def write_ranges_file(path, writes):
    with open(path, "w") as f:
        f.write("# offset length (bytes) of every range written since the parent\n")
        for off, length in writes:
            f.write(f"{off} {length}\n")


# ---------------------------------------------------------------- measuring


def proc_cpu(pid):
    """User + system CPU seconds a running process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A backy-server process whose RSS peak and CPU time are read per phase."""

    def __init__(self, binary, config, logfile):
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen([binary, "--config", config], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with open(logfile) as f:
                m = re.search(r"listening on (\S+)", f.read())
            if m:
                self.url = "http://" + re.sub(r"\x1b\[[0-9;]*m", "", m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        with open(logfile) as f:
            tail = f.read()[-2000:]
        raise SystemExit(f"bench: backy-server did not start:\n{tail}")

    def reset(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM
        self.cpu0 = self.cpu()

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def peak_rss(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def measure(name, cmd, source_size, server=None, env=None, shell=False, cache="drop"):
    """Runs one measured command with a dropped page cache; returns a
    result dict (wall time, throughput over the source size, CPU, RSS)."""
    if cache == "drop":
        drop_caches()
    if server:
        server.reset()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench: {name} failed ({proc.returncode}):\n{out}{err}")
    r = {
        "name": name,
        "wall_s": wall,
        "mb_per_s": source_size / MIB / wall if wall > 0 else None,
        "stdout": out,
    }
    if server:
        r["server_cpu_s"] = server.cpu() - server.cpu0
        r["server_peak_rss"] = server.peak_rss()
    return r


def timed(name, cmd, source_size, **kw):
    """measure() plus client CPU time and peak RSS, via a wrapper that
    reports the child's rusage and wall time (so peaks of earlier commands
    do not mask it, and the wrapper's own start is not timed)."""
    wrapped = [sys.executable, os.path.abspath(__file__), "--rusage-of", "--"] + (
        ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd))
    r = measure(name, wrapped, source_size, **kw)
    lines = r["stdout"].rstrip("\n").split("\n")
    usage = json.loads(lines[-1])
    r["stdout"] = "\n".join(lines[:-1])
    r["cpu_s"] = usage["cpu_s"]
    r["peak_rss"] = usage["peak_rss"]
    # The command's own time, without the wrapper's start.
    r["wall_s"] = usage["wall_s"]
    r["mb_per_s"] = source_size / MIB / r["wall_s"] if r["wall_s"] > 0 else None
    return r


def rusage_of(argv):
    """--rusage-of: run argv, forward its output, print its rusage as JSON."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    sys.stdout.flush()
    print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss": ru.ru_maxrss * 1024, "wall_s": wall}))
    sys.exit(code)


def log_text(path):
    with open(path) as f:
        return re.sub(r"\x1b\[[0-9;]*m", "", f.read())


def wait_round(logfile, mark, timeout=1200):
    """Waits for a replication round logged after character `mark`;
    returns the log text after the mark."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_text(logfile)[mark:]
        if "replication round done" in text:
            return text
        time.sleep(0.02)
    raise SystemExit(f"bench: no replication round in {logfile}")


def replica_round(name, replica, logfile, store, size, results):
    """One replication round (SIGHUP to the replica), timed until it logs
    its end: wall time, what it received, what its copy added."""
    mark = len(log_text(logfile))
    drop_caches()
    replica.reset()
    t0 = time.monotonic()
    os.kill(replica.proc.pid, signal.SIGHUP)
    text = wait_round(logfile, mark)
    wall = time.monotonic() - t0
    copied = re.findall(r"copied revision .*?rev=(\S+) .*?received=(\d+)", text)
    if not copied or "failed=0" not in text:
        raise SystemExit(f"bench: {name} copied nothing:\n{text[-2000:]}")
    os.sync()
    results[name] = {
        "name": name, "wall_s": wall, "mb_per_s": size / MIB / wall if wall > 0 else None,
        "server_cpu_s": replica.cpu() - replica.cpu0, "server_peak_rss": replica.peak_rss(),
        "bytes_sent": sum(int(n) for _, n in copied),
        "bytes_added": exclusive(os.path.join(store, "bench", copied[-1][0])),
    }
    log(f"{name}: {wall:.2f} s")


# ---------------------------------------------------------------- NBD export


class Nbd:
    """A minimal NBD client (standard library only): fixed-newstyle
    handshake, NBD_OPT_GO without structured replies, then one
    NBD_CMD_READ at a time with simple replies."""

    NBDMAGIC = 0x4E42444D41474943
    IHAVEOPT = 0x49484156454F5054
    OPT_REPLY_MAGIC = 0x0003E889045565A9
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
    CMD_READ, CMD_DISC = 0, 2

    def __init__(self, socket_path, name):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(socket_path)
        self.cookie = 0
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        if magic != self.NBDMAGIC or opt != self.IHAVEOPT or not flags & 1:
            raise SystemExit(f"bench: not a fixed-newstyle NBD server ({magic:#x} {opt:#x} {flags:#x})")
        no_zeroes = flags & 2
        self.sock.sendall(struct.pack(">I", 1 | no_zeroes))
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", self.IHAVEOPT, self.OPT_GO, len(data)) + data)
        self.size = None
        while True:
            magic, _, rtype, rlen = struct.unpack(">QIII", self.recv(20))
            body = self.recv(rlen)
            if magic != self.OPT_REPLY_MAGIC:
                raise SystemExit(f"bench: bad NBD option reply magic {magic:#x}")
            if rtype & (1 << 31):
                raise SystemExit(f"bench: NBD_OPT_GO refused ({rtype:#x}): {body!r}")
            if rtype == self.REP_INFO and struct.unpack(">H", body[:2])[0] == self.INFO_EXPORT:
                self.size = struct.unpack(">Q", body[2:10])[0]
            elif rtype == self.REP_ACK:
                break

    def recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise SystemExit("bench: the NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def read(self, offset, length):
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, self.CMD_READ, self.cookie, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        if magic != self.SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise SystemExit(f"bench: bad NBD reply ({magic:#x}, cookie {cookie})")
        if error:
            raise SystemExit(f"bench: NBD read at {offset} failed with error {error}")
        return self.recv(length)

    def close(self):
        self.sock.sendall(struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, self.CMD_DISC, 0, 0, 0))
        self.sock.close()


class Export:
    """A running `backy-client --json export`, timed from its spawn to the
    ready line (printed once the socket accepts)."""

    def __init__(self, cmd, env, logfile):
        self.log = open(logfile, "a")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True)
        line = self.proc.stdout.readline()
        self.ready_s = time.monotonic() - self.t0
        if not line.strip():
            self.proc.wait()
            self.log.close()
            raise SystemExit(f"bench: backy-client export did not start:\n{log_text(logfile)[-2000:]}")
        self.ready = json.loads(line)
        self.uri = self.ready["uri"]
        self.socket = self.uri.split("socket=", 1)[1]

    def cpu(self):
        return proc_cpu(self.proc.pid)

    def peak_rss(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        """SIGTERM; returns the summary the export printed."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        self.log.close()
        if self.proc.returncode != 0:
            raise SystemExit(f"bench: backy-client export exited {self.proc.returncode}: {out}")
        return json.loads(out)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def data_extents(path):
    """The file's data extents (SEEK_DATA/SEEK_HOLE), as (offset, length)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


def read_offsets(extents, size, n, rng):
    """`n` random 4 KiB-aligned offsets of 4 KiB reads inside `extents`."""
    starts = [(off + 4095) // 4096 * 4096 for off, _ in extents]
    slots = [max(0, (min(off + length, size) - s) // 4096) for (off, length), s in zip(extents, starts)]
    total = sum(slots)
    if total == 0:
        return []
    out = []
    for _ in range(n):
        k = rng.randrange(total)
        for s, c in zip(starts, slots):
            if k < c:
                out.append(s + k * 4096)
                break
            k -= c
    return out


def hole_blocks(extents, size):
    """The 4 MiB blocks holding no data: the manifest's zero blocks."""
    busy = set()
    for off, length in extents:
        busy.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
    return [(b * BLOCK, BLOCK) for b in range(size // BLOCK) if b not in busy]


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def export_steps(client, env, work, mnt, img, size, server, results, smoke, seed, exports):
    """backy-client export of the newest revision (the one backy_restore
    restored): spawn to ready and to the first 4 KiB read served,
    `qemu-img convert` from it, and random 4 KiB reads over a fresh one."""
    cmd = client + ["export", "bench", "-r", "latest", "--socket"]
    logfile = os.path.join(work, "export.log")
    extents = data_extents(img)
    data_bytes = sum(length for _, length in extents)
    rng = random.Random(seed)
    expected = {}

    def start(n):
        ex = Export(cmd + [os.path.join(work, f"export-{n}.sock")], env, logfile)
        exports.append(ex)
        return ex

    def stopped(ex):
        summary = ex.stop()
        exports.remove(ex)
        if summary.get("failed_fetches"):
            raise SystemExit(f"bench: the export failed {summary['failed_fetches']} fetches")
        return summary

    # ---- 1: spawn -> ready line, spawn -> first 4 KiB of data served
    first_off = read_offsets(extents, size, 1, rng)[0]
    drop_caches()
    ex = start(1)
    nbd = Nbd(ex.socket, "bench")
    got = nbd.read(first_off, 4096)
    first_s = time.monotonic() - ex.t0
    nbd.close()
    expected[first_off] = got
    stopped(ex)
    results["export_ready"] = {"name": "export_ready", "wall_s": ex.ready_s, "mb_per_s": None}
    results["export_first_read"] = {"name": "export_first_read", "wall_s": first_s, "mb_per_s": None}
    log(f"export: ready after {ex.ready_s:.3f} s, first 4 KiB read after {first_s:.3f} s")

    # ---- 2: qemu-img convert from the export, beside the plain restore
    if shutil.which("qemu-img"):
        ex = start(2)
        out = os.path.join(mnt, "exported.img")
        cpu0 = ex.cpu()
        r = timed("export_convert", ["bash", "-c", 'qemu-img convert -f raw -O raw "$1" "$2" && sync',
                                     "bash", ex.uri, out], size, server=server)
        r["export_cpu_s"] = ex.cpu() - cpu0
        r["export_peak_rss"] = ex.peak_rss()
        summary = stopped(ex)
        r["bytes_sent"] = summary["fetched_bytes"]
        r["bytes_written"] = allocated(out)
        r["data_mb_per_s"] = data_bytes / MIB / r["wall_s"]
        r.pop("stdout", None)
        results["export_convert"] = r
        # QEMU's block layer counts in 512-byte sectors: an image whose
        # size is not a multiple of 512 (the smoke's) comes out rounded up,
        # zeros at the end.
        diff = subprocess.run(["cmp", "-n", str(size), img, out], capture_output=True, text=True)
        with open(out, "rb") as f:
            f.seek(size)
            tail = f.read()
        if diff.returncode != 0 or len(tail) >= 512 or tail.strip(b"\0"):
            raise SystemExit(f"bench: qemu-img convert from the export differs from the image "
                             f"({os.path.getsize(img)} and {os.path.getsize(out)} bytes): {diff.stdout}{diff.stderr}")
        os.remove(out)
        if smoke:
            # qemu-img skips the holes the export reports (zero 4 MiB
            # blocks) and reads the rest once.
            busy = size - len(hole_blocks(extents, size)) * BLOCK
            assert data_bytes <= r["bytes_sent"] <= busy, (r["bytes_sent"], data_bytes, busy)
        log(f"export_convert: {r['wall_s']:.2f} s")
    else:
        log("export_convert skipped: qemu-img not installed")

    # ---- 3: random 4 KiB reads over a fresh export (empty cache), data
    # then holes (4 MiB blocks without data: served without a fetch)
    n_data, n_holes = (40, 10) if smoke else (300, 30)
    data_offs = read_offsets(extents, size, n_data, rng)
    holes = hole_blocks(extents, size)
    hole_kind = "zero 4 MiB blocks"
    if not holes:
        holes = [(off + length, nxt - off - length) for (off, length), (nxt, _)
                 in zip(extents, extents[1:] + [(size, 0)]) if nxt > off + length]
        hole_kind = "holes inside data blocks"
    hole_offs = read_offsets(holes, size, n_holes, rng)
    drop_caches()
    ex = start(3)
    nbd = Nbd(ex.socket, "bench")
    if nbd.size != size:
        raise SystemExit(f"bench: the export says {nbd.size} bytes, the image has {size}")
    server.reset()
    cpu0 = ex.cpu()
    for kind, offs in (("data", data_offs), ("holes", hole_offs)):
        lat = []
        t_all = time.monotonic()
        for off in offs:
            t0 = time.monotonic()
            expected[off] = nbd.read(off, 4096)
            lat.append(time.monotonic() - t0)
        wall = time.monotonic() - t_all
        if not lat:
            continue
        name = f"export_rand_{kind}"
        results[name] = {
            "name": name, "wall_s": wall, "mb_per_s": None, "reads": len(lat),
            "median_ms": percentile(lat, 50) * 1000, "p90_ms": percentile(lat, 90) * 1000,
            "max_ms": max(lat) * 1000,
            "server_cpu_s": server.cpu() - server.cpu0, "cpu_s": ex.cpu() - cpu0,
        }
        if kind == "holes":
            results[name]["holes"] = hole_kind
        server.reset()
        cpu0 = ex.cpu()
        log(f"{name}: {len(lat)} reads, median {results[name]['median_ms']:.2f} ms, "
            f"p90 {results[name]['p90_ms']:.2f} ms")
    nbd.close()
    summary = stopped(ex)
    if "export_rand_data" in results:
        results["export_rand_data"]["bytes_sent"] = summary["fetched_bytes"]
    if smoke:
        assert results["export_rand_data"]["reads"] == n_data
    with open(img, "rb") as f:
        for off, got in expected.items():
            f.seek(off)
            if f.read(4096) != got:
                raise SystemExit(f"bench: the export served other bytes at {off} than the image holds")
    return data_bytes


# ---------------------------------------------------------------- dedup


def rewrite_blocks(path, size, fraction, seed):
    """Rewrites `fraction` of the whole 4 MiB blocks of `path` (at least
    one) with data of its own; returns the bytes rewritten."""
    rng = random.Random(seed)
    gen = random.Random(seed + 1)
    blocks = size // BLOCK  # whole ones: each change is 4 MiB of new data
    changed = 0
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in sorted(rng.sample(range(blocks), max(1, round(blocks * fraction)))):
            os.pwrite(fd, gen.randbytes(BLOCK), b * BLOCK)
            changed += BLOCK
    finally:
        os.close(fd)
    return changed


def dedup_steps(args, server_bin, client_bin, work, mnt, results, servers):
    """Jobs cloned from one template (issue 31), on a server of their own:
    the template pushed as job t1, then `--dedup-jobs` jobs, each a reflink
    copy of it with its own `--dedup-change` of the 4 MiB blocks rewritten,
    each a first push (no parent); then job `clone`, an exact copy, all of
    whose blocks the store holds. All jobs are of one client identity with
    `dedup: client`: the case where a push is spared sending what another
    job stores. Measures the store's growth, what each push sent, the
    held-blocks push against the template's, restores every revision and
    compares backy's space figures with `btrfs filesystem du`. Removes what
    it made, so the steps after it have the filesystem to themselves."""
    size = args.size
    dwork = os.path.join(mnt, "dedup")
    dstore = os.path.join(dwork, "store")
    os.makedirs(dstore)
    template = os.path.join(dwork, "template.img")
    log(f"dedup: generating a {size / GIB:.2f} GiB template, {args.data:.0%} data")
    make_image(template, size, args.data, args.seed + 10)
    template_data = allocated(template)

    token = os.path.join(work, "dedup.token")
    token_hash = run([server_bin, "hash-token", "--generate", token]).strip()
    jobs = ["t1"] + [f"j{i:02}" for i in range(1, args.dedup_jobs + 1)]
    cfg = os.path.join(work, "dedup.yaml")
    with open(cfg, "w") as f:
        f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {dstore}\ndedup: client\n"
                f"clients:\n  tenant: {{role: hypervisor, token-hash: '{token_hash}'}}\njobs:\n")
        for job in jobs + ["clone"]:
            f.write(f"  {job}: {{schedule: none, client: tenant}}\n")
    os.chmod(cfg, 0o600)  # token hashes: the server refuses a readable config
    dserver = Server(server_bin, cfg, os.path.join(work, "dedup-server.log"))
    servers.append(dserver)
    denv = dict(os.environ, BACKY_SERVER=dserver.url)
    client = [client_bin, "--token-file", token, "--json"]

    # Each job's disk: a reflink copy of the template (as a clone from a
    # template image is), its own blocks rewritten.
    sources = {"t1": template}
    changes = {}
    for i, job in enumerate(jobs[1:]):
        src = os.path.join(dwork, f"{job}.img")
        run(["cp", "--reflink=always", template, src])
        changes[job] = rewrite_blocks(src, size, args.dedup_change, args.seed + 20 + 2 * i)
        sources[job] = src
    sources["clone"] = os.path.join(dwork, "clone.img")
    run(["cp", "--reflink=always", template, sources["clone"]])

    def push(name, job):
        r = timed(name, client + ["push", job, "--source", sources[job]], size, server=dserver, env=denv)
        out = json.loads(r.pop("stdout"))
        rev = out["revision"]
        r.update(job=job, revision=rev["id"], bytes_sent=out["bytes_sent"], bytes_read=out["bytes_read"],
                 bytes_written=rev["bytes_written"], bytes_received=rev["bytes_received"],
                 bytes_deduplicated=rev.get("bytes_deduplicated", 0))
        log(f"{name}: {r['wall_s']:.2f} s, sent {fmt_bytes(r['bytes_sent'])}, "
            f"deduplicated {fmt_bytes(r['bytes_deduplicated'])}")
        return r

    # What each push added is what the filesystem grew by (a revision's
    # exclusive bytes say nothing once other jobs share its blocks).
    os.sync()
    used = [fs_used(mnt)]
    first = push("dedup_template_full", "t1")
    os.sync()
    used.append(fs_used(mnt))
    pushed = [push(f"dedup_{job}", job) for job in jobs[1:]]
    os.sync()
    used.append(fs_used(mnt))
    growth = used[2] - used[0]
    du_store = btrfs_du(dstore)
    held = push("dedup_clone_full", "clone")
    os.sync()
    used.append(fs_used(mnt))
    first["bytes_added"] = used[1] - used[0]
    held["bytes_added"] = used[3] - used[2]

    # backy's space figures for each job beside btrfs du of its directory.
    space = {}
    for job in jobs + ["clone"]:
        out = json.loads(run(client + ["status", job], env=denv))
        mine = out["jobs"][0]["space"] or {}
        du = btrfs_du(os.path.join(dstore, job))
        space[job] = {"backy": {k: mine.get(k) for k in du}, "btrfs_du": du}
    space_diff = max(abs((s["backy"][k] or 0) - s["btrfs_du"][k]) for s in space.values() for k in s["btrfs_du"])

    # Every revision restored whole into a new file and compared; with
    # --dedup-restores N the template, the exact clone and N-2 of the jobs
    # spread over them.
    rest = jobs[1:]
    n = len(rest) + 2 if args.dedup_restores is None else max(0, min(args.dedup_restores, len(rest) + 2))
    k = max(0, n - 2)
    restore_jobs = (["t1", "clone"] + [rest[round(i * (len(rest) - 1) / max(1, k - 1))] for i in range(k)])[:n]
    restored = os.path.join(dwork, "restored.img")
    restore_s = 0.0
    identical = 0
    for job in restore_jobs:
        t0 = time.monotonic()
        run(client + ["restore", job, "-r", "latest", restored], env=denv)
        if subprocess.run(["cmp", "-s", sources[job], restored]).returncode != 0:
            raise SystemExit(f"bench: dedup job {job} restored differs from its source")
        identical += 1
        os.remove(restored)
        restore_s += time.monotonic() - t0
        trim(mnt)
    log(f"dedup: {identical} revisions restored byte-identical in {restore_s:.1f} s")

    total_changes = sum(changes.values())
    limit = template_data + 2 * total_changes
    per_job = []
    for r in pushed:
        per_job.append({k: r[k] for k in ("job", "revision", "wall_s", "bytes_sent", "bytes_written",
                                          "bytes_received", "bytes_deduplicated")}
                       | {"changed_bytes": changes[r["job"]],
                          "sent_per_2x_changes": r["bytes_sent"] / (2 * changes[r["job"]])})
    # One table row for the ten pushes together.
    wall = sum(r["wall_s"] for r in pushed)
    results["dedup_template_full"] = first
    results[f"dedup_{len(pushed)}_jobs"] = {
        "name": f"dedup_{len(pushed)}_jobs", "wall_s": wall,
        "mb_per_s": len(pushed) * size / MIB / wall if wall > 0 else None,
        "cpu_s": sum(r["cpu_s"] for r in pushed), "peak_rss": max(r["peak_rss"] for r in pushed),
        "server_cpu_s": sum(r["server_cpu_s"] for r in pushed),
        "server_peak_rss": max(r["server_peak_rss"] for r in pushed),
        "bytes_sent": sum(r["bytes_sent"] for r in pushed),
        "bytes_written": sum(r["bytes_written"] for r in pushed),
        "bytes_added": used[2] - used[1],
    }
    results["dedup_clone_full"] = held
    dedup = {
        "jobs": len(pushed), "template_data_bytes": template_data, "change_fraction": args.dedup_change,
        "changed_bytes": total_changes, "target_bytes": limit,
        "fs_growth_bytes": growth, "fs_used_bytes": used, "store_btrfs_du": du_store,
        "store_physical_bytes": du_store["exclusive_bytes"] + du_store["shared_bytes"],
        "pushes": per_job, "space": space, "space_max_diff_bytes": space_diff,
        "restored": restore_jobs, "restored_identical": identical, "restore_s": restore_s,
        "template_push_s": first["wall_s"], "held_push_s": held["wall_s"],
    }
    dserver.stop()
    servers.remove(dserver)
    shutil.rmtree(dwork)
    os.sync()
    trim(mnt)

    if args.smoke:
        for j in per_job:
            assert j["bytes_sent"] <= 2 * j["changed_bytes"], j
            assert j["bytes_deduplicated"] > 0, j
        assert growth <= limit, (growth, limit)
        assert dedup["store_physical_bytes"] <= limit, (du_store, limit)
        assert held["bytes_sent"] < BLOCK, held
        assert identical == len(jobs) + 1
        assert space_diff == 0, space
    return dedup


# ---------------------------------------------------------------- the run


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--rusage-of":
        rusage_of(sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=4 * GIB, help="image size (default 4G)")
    ap.add_argument("--data", type=float, default=0.5, help="fraction of the image that is data (default 0.5)")
    ap.add_argument("--change", type=float, default=0.01, help="fraction of 4 MiB blocks changed (default 0.01)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--peers", default="rsync,restic,borg", help="comma-separated peers to run ('' for none)")
    ap.add_argument("--json", default="target/bench.json", help="where to write the results")
    ap.add_argument("--bin", default="target/release", help="directory of backy-server and backy-client")
    ap.add_argument("--workdir", default=None, help="where the loop filesystem lives (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny image, every step, seconds; checks results")
    ap.add_argument("--no-dedup", dest="dedup", action="store_false",
                    help="skip the dedup step (jobs cloned from one template image)")
    ap.add_argument("--dedup-jobs", type=int, default=10, help="jobs cloned from the template (default 10)")
    ap.add_argument("--dedup-change", type=float, default=0.01,
                    help="fraction of 4 MiB blocks each clone rewrites (default 0.01)")
    ap.add_argument("--dedup-restores", type=int, default=None,
                    help="restore only this many of the dedup step's revisions (default: all)")
    ap.add_argument("--no-speed", dest="speed", action="store_false",
                    help="skip the speed step (warm page cache: full push, scan, restore, 4 concurrent pushes "
                         "against cp and a sequential read)")
    ap.add_argument("--no-concurrent", dest="concurrent", action="store_false",
                    help="skip the speed step's four concurrent pushes (they need the data twice more on disk)")
    ap.add_argument("--speed-runs", type=int, default=3,
                    help="rounds of the speed step; each row is the median round (default 3)")
    ap.add_argument("--speed-only", action="store_true",
                    help="run only the speed step (e.g. --size 64G --data 0.125 for the large image)")
    ap.add_argument("--no-pool", dest="pool", action="store_false",
                    help="skip the pool step (backy on a Ceph pool store against rbd import/export, on a "
                         "one-node cluster of its own or BACKY_BENCH_CEPH_CONF's)")
    ap.add_argument("--pool-only", action="store_true", help="run only the pool step")
    args = ap.parse_args()
    if args.smoke:
        # Not a multiple of 4 KiB (short last block, page and XTS unit),
        # but of 512, as an encrypted job needs.
        args.size = 64 * MIB + 12800
        args.change = 0.1
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (loop mount, dropping caches)")
    peers = [p for p in args.peers.split(",") if p]
    bin_dir = os.path.abspath(args.bin)
    client_bin = os.path.join(bin_dir, "backy-client")
    server_bin = os.path.join(bin_dir, "backy-server")

    work = tempfile.mkdtemp(prefix="backy-bench.", dir=args.workdir)
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    fs_img = os.path.join(work, "fs.img")
    data_bytes = int(args.size * args.data)
    # Image, sparse copy, restore, backy store, the qcow2 copy and its
    # store, the copy from the export, rsync target, restic and borg repos
    # each hold up to the data once; metadata and slack on top.
    fs_size = max(512 * MIB, int(data_bytes * (7 + len(peers)) * 1.3) + GIB)
    if args.speed_only or args.pool_only:
        # The image, its copy or the restore, and a job's two revisions.
        fs_size = int(data_bytes * 4 * 1.3) + GIB
    elif args.dedup:
        # The dedup step runs first and removes what it made: the template,
        # its store (one template, or one per job where nothing is shared)
        # and a restore, beside the clones' changes.
        fs_size = max(fs_size, int(data_bytes * (args.dedup_jobs + 5) * 1.3) + GIB)
    with open(fs_img, "wb") as f:
        f.truncate(fs_size)
    run(["mkfs.btrfs", "-q", fs_img])
    run(["mount", "-o", "loop", fs_img, mnt])
    server = None
    replica = None
    exports = []
    servers = []
    results = {}
    dedup = None
    speed = None
    pool = None
    with open("/proc/loadavg") as f:
        load_at_start = f.read().split()[:3]
    try:
        if (args.speed or args.speed_only) and not args.pool_only:
            import bench_speed
            speed = bench_speed.speed_steps(args, server_bin, client_bin, work, mnt, results, servers)
        if (args.pool or args.pool_only) and not args.speed_only:
            import bench_pool
            pool = bench_pool.pool_steps(args, server_bin, client_bin, work, mnt, results, servers)
        if args.speed_only or args.pool_only:
            return report(args, results, 0, [], load_at_start, None, speed, pool)
        if args.dedup:
            dedup = dedup_steps(args, server_bin, client_bin, work, mnt, results, servers)
        img = os.path.join(mnt, "disk.img")
        log(f"generating a {args.size / GIB:.2f} GiB image, {args.data:.0%} data")
        make_image(img, args.size, args.data, args.seed)
        writes = make_changes(args.size, args.change, args.seed + 2)
        ranges_file = os.path.join(work, "changed-ranges")
        write_ranges_file(ranges_file, writes)
        changed_bytes = sum(length for _, length in writes)
        src_alloc = allocated(img)

        store = os.path.join(mnt, "store")
        os.mkdir(store)
        cfg = os.path.join(work, "server.yaml")
        with open(cfg, "w") as f:
            # Loopback only, so plain TCP (TLS would cost both sides CPU
            # that none of the peers pays either). No deduplication: bench
            # and benchq hold the same data, and the qcow2 push would clone
            # the raw job's blocks instead of measuring a full push (the
            # dedup step measures deduplication on its own store).
            f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {store}\ndedup: off\n"
                    "schedules:\n  default:\n    daily: {interval: 1d, keep: 9}\n"
                    "jobs:\n  bench:\n    schedule: default\n  benchq:\n    schedule: default\n"
                    "  benche:\n    schedule: default\n")
        server = Server(server_bin, cfg, os.path.join(work, "server.log"))
        benv = dict(os.environ, BACKY_SERVER=server.url)
        # A second server copying the bench job (pull replication), on the
        # same filesystem; each of its rounds runs on SIGHUP.
        rstore = os.path.join(mnt, "replica")
        os.mkdir(rstore)
        rcfg = os.path.join(work, "replica.yaml")
        with open(rcfg, "w") as f:
            f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {rstore}\n"
                    f"replicate: {{source: '{server.url}', jobs: [bench], interval: 1h}}\n")
        rlog = os.path.join(work, "replica.log")
        replica = Server(server_bin, rcfg, rlog)
        wait_round(rlog, 0)
        client = [client_bin, "--json"]
        size = args.size
        # benche: the same image, encrypted on the client (docs/encryption.md),
        # side by side with bench in the same run.
        if size % 512:
            raise SystemExit("bench: --size must be a multiple of 512 (the encrypted job needs it)")
        enc_key = os.path.join(work, "benche.key")
        run([client_bin, "keygen", enc_key])
        enc_cfg = os.path.join(work, "client-enc.yaml")
        with open(enc_cfg, "w") as f:
            f.write(f"jobs:\n  benche:\n    source: {{type: file, path: {img}}}\n"
                    f"    encryption: {{key-file: {enc_key}}}\n")
        enc = ["--config", enc_cfg]

        def backy(name, cmd):
            r = timed(name, client + cmd, size, server=server, env=benv)
            if r["stdout"].strip().startswith("{"):
                out = json.loads(r["stdout"])
                r["bytes_sent"] = out.get("bytes_sent")
                r["bytes_read"] = out.get("bytes_read")
                rev = out.get("revision") or {}
                r["bytes_written"] = rev.get("bytes_written")
                if out.get("audit"):
                    r["audit"] = out["audit"]
                if "fetched_bytes" in out:
                    # A restore: what it read locally, fetched and wrote.
                    r["bytes_sent"] = out["fetched_bytes"]
                    r["bytes_read"] = out["read_bytes"]
                    r["bytes_written"] = out["written_bytes"]
                    r["mode"] = out.get("mode")
                image = os.path.join(store, out.get("job", "bench"), rev.get("id", ""))
                if "fetched_bytes" not in out and rev.get("id") and os.path.isfile(image):
                    os.sync()
                    r["bytes_added"] = exclusive(image)
            results[name] = r
            log(f"{name}: {r['wall_s']:.2f} s")
            return r

        # ---- full (version 1 of the image)
        results["seq_read"] = timed("seq_read", f"cat {img} > /dev/null", size)
        results["sparse_copy"] = timed("sparse_copy", f"cp --reflink=never --sparse=always {img} {mnt}/copy.img && sync", size)
        results["sparse_copy"]["bytes_written"] = allocated(f"{mnt}/copy.img")
        backy("backy_full", ["push", "bench", "--source", img, "--force"])
        backy("backy_enc_full", enc + ["push", "benche", "--source", img, "--force"])
        replica_round("replica_full", replica, rlog, rstore, size, results)

        peer_full = {}
        if "rsync" in peers:
            os.makedirs(f"{mnt}/rsync-snaps")
            run(["btrfs", "subvolume", "create", f"{mnt}/rsync"])
            peer_full["rsync"] = timed(
                "rsync_full",
                f"rsync --inplace --no-whole-file --sparse {img} {mnt}/rsync/disk.img && "
                f"btrfs -q subvolume snapshot -r {mnt}/rsync {mnt}/rsync-snaps/1 && sync", size)
        restic_env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=f"{mnt}/restic",
                          RESTIC_CACHE_DIR=f"{work}/restic-cache")
        if "restic" in peers:
            run(["restic", "init", "-q"], env=restic_env)
            peer_full["restic"] = timed("restic_full", f"restic backup -q {img} && sync", size, env=restic_env)
        borg_env = dict(os.environ, BORG_REPO=f"{mnt}/borg", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_BASE_DIR=f"{work}/borg-base")
        if "borg" in peers:
            run(["borg", "init", "-e", "none"], env=borg_env)
            peer_full["borg"] = timed("borg_full", f"borg create --chunker-params fixed,4194304 ::v1 {img} && sync",
                                      size, env=borg_env)
        for name, r in peer_full.items():
            results[f"{name}_full"] = r

        # ---- incremental (version 2: the change set written in)
        log(f"changing {len(writes)} ranges, {changed_bytes} bytes")
        apply_changes(img, writes, args.seed + 3)
        os.sync()
        results["seq_read_v2"] = timed("seq_read_v2", f"cat {img} > /dev/null", size)
        # Reflink the first version and write just the changed bytes in.
        apply_script = (
            "import os,sys\n"
            "src=os.open(sys.argv[1],os.O_RDONLY); dst=os.open(sys.argv[2],os.O_WRONLY)\n"
            "for line in open(sys.argv[3]):\n"
            "  if line.startswith('#'): continue\n"
            "  o,l=map(int,line.split()); os.pwrite(dst, os.pread(src,l,o), o)\n"
            "os.fsync(dst)\n")
        results["reflink_changes"] = timed(
            "reflink_changes",
            ["bash", "-c", f"cp --reflink=always {mnt}/copy.img {mnt}/copy2.img && "
                           f"{sys.executable} -c \"$1\" {img} {mnt}/copy2.img {ranges_file} && sync",
             "bash", apply_script], size)
        results["reflink_changes"]["bytes_added"] = exclusive(f"{mnt}/copy2.img")
        backy("backy_incr_scan", ["push", "bench", "--source", img, "--force"])
        backy("backy_enc_incr_scan", enc + ["push", "benche", "--source", img, "--force"])
        # The same change again, as the known-ranges push of it.
        run(client + ["forget", "bench", "-r", "latest"], env=benv)
        backy("backy_incr_ranges", ["push", "bench", "--source", img, "--force", "--changed-ranges", ranges_file])
        # Again with the change tracker's audit off (issue 34): what the
        # default sample (0.5 % of the unchanged blocks re-read) costs.
        run(client + ["forget", "bench", "-r", "latest"], env=benv)
        backy("backy_incr_ranges_noaudit", ["push", "bench", "--source", img, "--force", "--changed-ranges",
                                            ranges_file, "--audit-sample", "0"])
        replica_round("replica_incr", replica, rlog, rstore, size, results)

        if "rsync" in peers:
            os.sync()
            before = fs_used(mnt)
            results["rsync_incr"] = timed(
                "rsync_incr",
                f"rsync --inplace --no-whole-file {img} {mnt}/rsync/disk.img && "
                f"btrfs -q subvolume snapshot -r {mnt}/rsync {mnt}/rsync-snaps/2 && sync", size)
            # Extents stay whole while any snapshot refers to a part of
            # them, so no file's exclusive bytes tell: the filesystem's
            # growth does (metadata included).
            results["rsync_incr"]["bytes_added"] = fs_used(mnt) - before
        if "restic" in peers:
            before = tree_allocated(f"{mnt}/restic")
            results["restic_incr"] = timed("restic_incr", f"restic backup -q {img} && sync", size, env=restic_env)
            results["restic_incr"]["bytes_added"] = tree_allocated(f"{mnt}/restic") - before
        if "borg" in peers:
            before = tree_allocated(f"{mnt}/borg")
            results["borg_incr"] = timed("borg_incr",
                                         f"borg create --chunker-params fixed,4194304 ::v2 {img} && sync",
                                         size, env=borg_env)
            results["borg_incr"]["bytes_added"] = tree_allocated(f"{mnt}/borg") - before

        # ---- restore of the newest revision
        restored = f"{mnt}/restored.img"
        backy("backy_restore", ["restore", "bench", "-r", "latest", restored])
        results["backy_restore"]["bytes_written"] = allocated(restored)
        same = subprocess.run(["cmp", "-s", img, restored]).returncode == 0
        results["backy_restore"]["identical"] = same
        results["backy_restore"]["holes_kept"] = allocated(restored) <= src_alloc + 64 * MIB
        if not same:
            raise SystemExit("bench: the restored image differs from the source")
        restored_enc = f"{mnt}/restored-enc.img"
        backy("backy_enc_restore", enc + ["restore", "benche", "-r", "latest", restored_enc])
        results["backy_enc_restore"]["bytes_written"] = allocated(restored_enc)
        if subprocess.run(["cmp", "-s", img, restored_enc]).returncode != 0:
            raise SystemExit("bench: the encrypted job's restore differs from the source")
        os.unlink(restored_enc)

        # ---- rollback: the restored image (version 2) back to version 1
        # (the revision before the change), beside a sequential read of it
        results["seq_read_target"] = timed("seq_read_target", f"cat {restored} > /dev/null", size)
        backy("backy_rollback", ["restore", "bench", "-r", "1", restored, "--force"])
        if results["backy_rollback"].get("mode") != "rollback":
            raise SystemExit("bench: the restore onto the same-size image was not a rollback")
        if subprocess.run(["cmp", "-s", f"{mnt}/copy.img", restored]).returncode != 0:
            raise SystemExit("bench: the rolled-back image differs from version 1")
        if args.smoke:
            granule = 64 << 10
            granules = {off // granule + i for off, length in writes
                        for i in range((off + length - 1) // granule - off // granule + 1)}
            fetched = results["backy_rollback"]["bytes_sent"]
            assert fetched <= 2 * len(granules) * granule, (fetched, len(granules))
            assert results["backy_rollback"]["bytes_read"] == size
        if args.smoke:
            scan = results["backy_incr_scan"]
            ranged = results["backy_incr_ranges"]
            # Known ranges send only their 64 KiB granules of the changed
            # blocks; a scan sends the changed blocks' non-zero granules.
            granule = 64 << 10
            granules = {off // granule + i for off, length in writes
                        for i in range((off + length - 1) // granule - off // granule + 1)}
            assert ranged["bytes_sent"] <= min(scan["bytes_sent"], len(granules) * granule), \
                (scan["bytes_sent"], ranged["bytes_sent"], len(granules))
            assert ranged["bytes_read"] <= scan["bytes_read"]
            # The exchange sends the changed granules and their blocks'
            # digests; the revision adds about what the known ranges add.
            assert scan["bytes_sent"] <= len(granules) * granule + 1024 * len(granules), scan["bytes_sent"]
            assert scan["bytes_added"] <= 2 * ranged["bytes_added"] + 2 * granule, \
                (scan["bytes_added"], ranged["bytes_added"])
            # The replica fetches the changed granules, relative to the
            # revision it has, and adds what the push added.
            rep = results["replica_incr"]
            assert rep["bytes_sent"] <= len(granules) * granule, (rep["bytes_sent"], len(granules))
            assert rep["bytes_added"] <= 2 * ranged["bytes_added"] + 2 * granule, \
                (rep["bytes_added"], ranged["bytes_added"])

        # ---- export: the newest revision over NBD (the one restored above)
        data_v2 = export_steps(client, benv, work, mnt, img, size, server, results, args.smoke,
                               args.seed + 4, exports)
        results["backy_restore"]["data_mb_per_s"] = data_v2 / MIB / results["backy_restore"]["wall_s"]

        # ---- qemu: the same change set in a qcow2, found by its dirty
        # bitmap, then (bitmap gone) by a full scan against the same parent
        if shutil.which("qemu-img") and shutil.which("qemu-io"):
            qcow2 = f"{mnt}/disk.qcow2"
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, qcow2])
            qsrc = ["--source", f"qemu:{qcow2}", "--force"]
            backy("qemu_full", ["push", "benchq"] + qsrc)
            ios = []
            for i, (off, length) in enumerate(writes):
                ios += ["-c", f"write -P {0x40 + i % 64} {off} {length}"]
            run(["qemu-io", "-f", "qcow2"] + ios + [qcow2])
            os.sync()
            backy("qemu_incr_bitmap", ["push", "benchq"] + qsrc)
            run(client + ["forget", "benchq", "-r", "latest"], env=benv)
            scan = backy("qemu_incr_scan", ["push", "benchq"] + qsrc)
            if "read whole" not in scan["stdout"] and "full_read" not in scan["stdout"]:
                raise SystemExit("bench: the qemu scan push used a bitmap")
            if args.smoke:
                q, qs = results["qemu_incr_bitmap"], results["qemu_incr_scan"]
                granule = 64 << 10
                granules = {off // granule + i for off, length in writes
                            for i in range((off + length - 1) // granule - off // granule + 1)}
                assert q["bytes_sent"] == len(granules) * granule, (q["bytes_sent"], len(granules))
                assert q["bytes_read"] < qs["bytes_read"], (q["bytes_read"], qs["bytes_read"])
        else:
            log("qemu rows skipped: qemu-img/qemu-io not installed")
    finally:
        for ex in exports:
            ex.kill()
        for srv in servers:
            srv.stop()
        if replica:
            replica.stop()
        if server:
            server.stop()
        subprocess.run(["umount", mnt])
        shutil.rmtree(work, ignore_errors=True)

    report(args, results, changed_bytes, writes, load_at_start, dedup, speed, pool)


def machine(load_at_start):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "loadavg_at_start": load_at_start, "loadavg_at_end": load, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def print_dedup(args, d, results):
    """The dedup step's figures, under the table."""
    n = d["jobs"]
    print(f"\ndedup ({n} jobs and the template of one client identity, dedup: client; each job a reflink copy "
          f"of the template with {d['change_fraction']:.0%} of its 4 MiB blocks rewritten, pushed first):")
    print(f"  template {fmt_bytes(d['template_data_bytes'])} of data; the jobs' changes "
          f"{fmt_bytes(d['changed_bytes'])} together; target: store growth <= template + 2 x changes "
          f"= {fmt_bytes(d['target_bytes'])} (without sharing: {n + 1} templates, "
          f"{fmt_bytes((n + 1) * d['template_data_bytes'])})")
    du = d["store_btrfs_du"]
    print(f"  store growth: filesystem used +{fmt_bytes(d['fs_growth_bytes'])}; btrfs du of the store "
          f"{fmt_bytes(d['store_physical_bytes'])} (exclusive {fmt_bytes(du['exclusive_bytes'])}, "
          f"set shared {fmt_bytes(du['shared_bytes'])}, total {fmt_bytes(du['total_bytes'])})")
    print(f"  {'job':<6}{'changes':>11}{'sent':>11}{'dedup':>11}{'written':>11}{'sent/2xchg':>12}{'wall s':>8}")
    for j in d["pushes"]:
        print(f"  {j['job']:<6}{fmt_bytes(j['changed_bytes']):>11}{fmt_bytes(j['bytes_sent']):>11}"
              f"{fmt_bytes(j['bytes_deduplicated']):>11}{fmt_bytes(j['bytes_written']):>11}"
              f"{j['sent_per_2x_changes']:>12.2f}{j['wall_s']:>8.2f}")
    t, h = results["dedup_template_full"], results["dedup_clone_full"]
    print(f"  full push of an exact copy (every block held): {h['wall_s']:.2f} s, {h['mb_per_s']:.0f} MB/s, "
          f"sent {fmt_bytes(h['bytes_sent'])}; the template's first full push {t['wall_s']:.2f} s, "
          f"{t['mb_per_s']:.0f} MB/s: {t['wall_s'] / h['wall_s']:.2f}x its throughput")
    if "backy_full" in results:
        b = results["backy_full"]
        print(f"  (backy_full, the other server's first push of an image of the same size and data: "
              f"{b['wall_s']:.2f} s, {b['mb_per_s']:.0f} MB/s: {b['wall_s'] / h['wall_s']:.2f}x)")
    which = "every revision" if len(d["restored"]) == n + 2 else f"{len(d['restored'])} of {n + 2} revisions ({', '.join(d['restored'])})"
    print(f"  restored {which}: {d['restored_identical']} byte-identical ({d['restore_s']:.1f} s)")
    print(f"  backy's job space vs btrfs du -s of the job's directory: largest difference "
          f"{d['space_max_diff_bytes']} bytes over {len(d['space'])} jobs")


def report(args, results, changed_bytes, writes, load_at_start, dedup=None, speed=None, pool=None):
    n_writes = len(writes)
    # The dedup step runs first (on the fresh filesystem) but reads best
    # after the rest.
    results = {k: results[k] for k in sorted(results, key=lambda k: k.startswith("dedup_"))}
    for r in results.values():
        r.pop("stdout", None)
    t = {k: r["wall_s"] for k, r in results.items()}
    checks = []

    def ratio(name, num, den, target, higher_is_better=True):
        if num in t and den in t:
            v = t[den] / t[num] if higher_is_better else t[num] / t[den]
            checks.append({"check": name, "ratio": v, "target": target,
                           "met": v >= target if target is not None else None})

    # Throughput ratios: reference time / backy time (1.0 = as fast).
    ratio("full push vs sparse copy", "backy_full", "sparse_copy", 0.70)
    ratio("incremental scan vs sequential read", "backy_incr_scan", "seq_read_v2", 0.60)
    ratio("restore vs sparse copy", "backy_restore", "sparse_copy", 0.70)
    if "backy_rollback" in t and "seq_read_target" in t:
        v = t["backy_rollback"] / t["seq_read_target"]
        checks.append({"check": "rollback time / sequential read of target", "ratio": v,
                       "target": 1.5, "met": v <= 1.5})
        granule = 64 << 10
        granules = {off // granule + i for off, length in writes
                    for i in range((off + length - 1) // granule - off // granule + 1)}
        fetched = results["backy_rollback"].get("bytes_sent") or 0
        v = fetched / (len(granules) * granule)
        checks.append({"check": "rollback bytes fetched / changed granules", "ratio": v,
                       "target": 2.0, "met": v <= 2.0})
    # Encryption (issue 33): at most 1.25x the time of the same step
    # unencrypted, and an incremental adds what the unencrypted one adds.
    for step in ("full", "incr_scan", "restore"):
        plain, enc = f"backy_{step}", f"backy_enc_{step}"
        if plain in t and enc in t:
            v = t[enc] / t[plain]
            checks.append({"check": f"encrypted {step.replace('_', ' ')} time / unencrypted", "ratio": v,
                           "target": 1.25, "met": v <= 1.25})
    if results.get("backy_enc_incr_scan", {}).get("bytes_added") is not None \
            and results.get("backy_incr_scan", {}).get("bytes_added"):
        v = results["backy_enc_incr_scan"]["bytes_added"] / results["backy_incr_scan"]["bytes_added"]
        checks.append({"check": "encrypted incr bytes added / unencrypted", "ratio": v,
                       "target": 1.0, "met": v <= 1.0})
    ratio("incremental ranges vs reflink+changes", "backy_incr_ranges", "reflink_changes", None)
    if "backy_incr_ranges" in t and "backy_incr_ranges_noaudit" in t:
        # Informational: the audit's extra reads, in seconds.
        checks.append({"check": "known-ranges push: audit at 0.5 % minus audit off (s)",
                       "ratio": t["backy_incr_ranges"] - t["backy_incr_ranges_noaudit"],
                       "target": None, "met": None})
    if "backy_incr_ranges" in t and "backy_full" in t:
        limit = 0.05 * t["backy_full"] + 0.5
        checks.append({"check": "known-ranges push <= 5% of full + 0.5 s", "ratio": t["backy_incr_ranges"],
                       "target": limit, "met": t["backy_incr_ranges"] <= limit})
    added = {k: r.get("bytes_added") for k, r in results.items()}
    if added.get("backy_incr_scan") is not None and added.get("backy_incr_ranges"):
        v = added["backy_incr_scan"] / added["backy_incr_ranges"]
        checks.append({"check": "scan incr bytes added / known-ranges added", "ratio": v,
                       "target": 2.0, "met": v <= 2.0})
    if "backy_incr_scan" in results:
        # The changed bytes rounded out to granules, doubled, plus the
        # granule digests (1 KiB per changed 4 MiB block).
        granule = 64 << 10
        granules = {off // granule + i for off, length in writes
                    for i in range((off + length - 1) // granule - off // granule + 1)}
        blocks = {g * granule // BLOCK for g in granules}
        limit = 2 * len(granules) * granule + len(blocks) * (BLOCK // granule) * 16
        sent = results["backy_incr_scan"].get("bytes_sent") or 0
        checks.append({"check": "scan incr bytes sent / (2 x changed granules + digests)",
                       "ratio": sent / limit, "target": 1.0, "met": sent <= limit})
    if "replica_incr" in results:
        granule = 64 << 10
        granules = {off // granule + i for off, length in writes
                    for i in range((off + length - 1) // granule - off // granule + 1)}
        sent = results["replica_incr"].get("bytes_sent") or 0
        checks.append({"check": "replication incr bytes / changed granules", "ratio": sent / (len(granules) * granule),
                       "target": 1.0, "met": sent <= len(granules) * granule})
    for peer in ("rsync", "restic", "borg"):
        for phase, mine in (("full", "backy_full"), ("incr", "backy_incr_scan")):
            key = f"{peer}_{phase}"
            if key in t:
                v = t[key] / t[mine]
                checks.append({"check": f"{peer} {phase} time / backy {phase} time", "ratio": v,
                               "target": 1.0 if phase == "incr" else None,
                               "met": v > 1.0 if phase == "incr" else None})
    for key, what in (("export_ready", "export: spawn -> ready line, s"),
                      ("export_first_read", "export: spawn -> first 4 KiB read, s")):
        if key in t:
            checks.append({"check": what, "ratio": t[key], "target": 1.0, "met": t[key] < 1.0})
    ratio("export qemu-img convert vs restore", "export_convert", "backy_restore", 0.80)
    for key, what, target in (("export_rand_data", "export random 4 KiB data reads", 5.0),
                              ("export_rand_holes", "export random 4 KiB hole reads", None)):
        if key in results:
            r = results[key]
            checks.append({"check": f"{what}: median ms", "ratio": r["median_ms"], "target": target,
                           "met": r["median_ms"] < target if target is not None else None})
            checks.append({"check": f"{what}: p90 ms", "ratio": r["p90_ms"], "target": None, "met": None})
    if dedup:
        checks.append({"check": "dedup: store growth / (template + 2 x changes)",
                       "ratio": dedup["fs_growth_bytes"] / dedup["target_bytes"], "target": 1.0,
                       "met": dedup["fs_growth_bytes"] <= dedup["target_bytes"]})
        checks.append({"check": "dedup: store btrfs du / (template + 2 x changes)",
                       "ratio": dedup["store_physical_bytes"] / dedup["target_bytes"], "target": 1.0,
                       "met": dedup["store_physical_bytes"] <= dedup["target_bytes"]})
        worst = max(j["sent_per_2x_changes"] for j in dedup["pushes"])
        checks.append({"check": "dedup: first push sent / 2 x own changes, worst", "ratio": worst,
                       "target": 1.0, "met": worst <= 1.0})
        checks.append({"check": "dedup: revisions restored byte-identical", "ratio": dedup["restored_identical"],
                       "target": len(dedup["restored"]), "met": dedup["restored_identical"] == len(dedup["restored"])})
        checks.append({"check": "dedup: backy space - btrfs du, max MiB", "ratio": dedup["space_max_diff_bytes"] / MIB,
                       "target": 0.0, "met": dedup["space_max_diff_bytes"] == 0})
        v = dedup["template_push_s"] / dedup["held_push_s"]
        checks.append({"check": "dedup: push of held blocks vs template push", "ratio": v,
                       "target": 1.0, "met": v >= 1.0})
    if speed:
        import bench_speed
        bench_speed.checks(results, speed, lambda name, v, target, met: checks.append(
            {"check": name, "ratio": v, "target": target, "met": met}))
    if pool:
        import bench_pool
        bench_pool.checks(results, pool, lambda name, v, target, met: checks.append(
            {"check": name, "ratio": v, "target": target, "met": met}))
    rss = [r.get(k) for r in results.values() for k in ("peak_rss", "server_peak_rss")
           if k in r and r["name"].startswith(("backy", "dedup", "speed", "pool_full", "pool_incr", "pool_restore"))]
    if rss:
        checks.append({"check": "backy peak RSS (client and server) < 200 MiB", "ratio": max(rss) / MIB,
                       "target": 200, "met": max(rss) < 200 * MIB})

    print(f"\nbacky bench: {fmt_bytes(args.size)} image, {args.data:.0%} data, "
          f"{n_writes} changed ranges ({fmt_bytes(changed_bytes)}), btrfs loop fs, caches dropped before each step")
    m = machine(load_at_start)
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, kernel {m['kernel']}, "
          f"load {' '.join(m['loadavg_at_start'])} at start, {' '.join(m['loadavg_at_end'])} at end, {m['date']}")
    head = f"{'step':<22}{'wall s':>8}{'MB/s':>9}{'CPU s':>8}{'RSS MiB':>9}{'srv CPU':>9}{'srv RSS':>9}" \
           f"{'sent':>11}{'written':>11}{'added':>11}"
    print(head)
    print("-" * len(head))
    for k, r in results.items():
        def num(key, div=1, f="{:.2f}"):
            v = r.get(key)
            return "-" if v is None else f.format(v / div)
        print(f"{k:<22}{r['wall_s']:>8.2f}{num('mb_per_s', 1, '{:.0f}'):>9}{num('cpu_s'):>8}"
              f"{num('peak_rss', MIB, '{:.0f}'):>9}{num('server_cpu_s'):>9}{num('server_peak_rss', MIB, '{:.0f}'):>9}"
              f"{fmt_bytes(r.get('bytes_sent')):>11}{fmt_bytes(r.get('bytes_written')):>11}"
              f"{fmt_bytes(r.get('bytes_added')):>11}")
    if "export_ready" in results:
        print("\nexport (backy-client export of the newest revision, NBD on a Unix socket, one connection):")
        conv, rest = results.get("export_convert"), results.get("backy_restore")
        if conv and rest:
            print(f"  qemu-img convert {conv['mb_per_s']:.0f} MB/s of the image, {conv['data_mb_per_s']:.0f} MB/s "
                  f"of its data (export CPU {conv['export_cpu_s']:.2f} s, peak RSS {conv['export_peak_rss'] / MIB:.0f} MiB); plain restore {rest['mb_per_s']:.0f} "
                  f"and {rest['data_mb_per_s']:.0f} MB/s")
        for key, what in (("export_rand_data", "in data extents"), ("export_rand_holes", "in holes")):
            r = results.get(key)
            if r:
                where = f" ({r['holes']})" if "holes" in r else ""
                print(f"  {r['reads']} random 4 KiB reads {what}{where}, one at a time on a fresh export: "
                      f"median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, max {r['max_ms']:.1f} ms")
    if dedup:
        print_dedup(args, dedup, results)
    if speed:
        import bench_speed
        bench_speed.describe(speed)
    if pool:
        import bench_pool
        bench_pool.describe(pool)
    print()
    for c in checks:
        met = {True: "met", False: "MISSED", None: ""}[c["met"]]
        target = "" if c["target"] is None else f"(target {c['target']:.2f})"
        print(f"{c['check']:<48}{c['ratio']:>8.2f} {target:<16}{met}")
    out = {"size": args.size, "data_fraction": args.data, "change_fraction": args.change,
           "changed_ranges": n_writes, "changed_bytes": changed_bytes, "machine": m,
           "results": results, "dedup": dedup, "speed": speed, "pool": pool, "checks": checks}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
