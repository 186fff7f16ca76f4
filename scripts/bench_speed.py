"""The speed step of scripts/bench.py (issue 32): backy against the
hardware itself, with the page cache warm, so what is left is backy's own
cost: a full push against `cp --sparse=always` of the same image onto the
same filesystem, a scanning incremental push against a sequential read of
the source's data (holes skipped, as backy and cp skip them), a restore against the sparse copy, four concurrent full pushes
against four parallel copies, and the CPU seconds per GiB of data of the
client and the server. Every revision pushed is compared byte for byte
with its source (a revision is the raw image), so a fast wrong run fails.
"""

import os
import subprocess
import time

import bench
from bench import GIB, MIB, fmt_bytes, log, make_image, run, timed

CONCURRENT = 4


# Reads a file's data extents in order, holes skipped with SEEK_DATA (as
# backy and `cp --sparse` skip them): the sequential read of a sparse
# image. `cat` would read the holes too, as zeros, and on a large sparse
# image fill the page cache with them, evicting the data.
READ_DATA = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size, off, buf = os.fstat(fd).st_size, 0, bytearray(4 << 20)
while off < size:
    try:
        off = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        break
    end = os.lseek(fd, off, os.SEEK_HOLE)
    while off < end:
        off += os.preadv(fd, [memoryview(buf)[:min(len(buf), end - off)]], off)
"""


def read_data_cmd(path):
    return ["python3", "-c", READ_DATA, path]


def busy_core_s():
    """Core-seconds the whole machine has been busy so far (/proc/stat:
    user, nice, system, irq, softirq): with the kernel's writeback and the
    loop device's workers, which no process's own CPU time shows."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = v
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def warm(*paths):
    """Reads the data of `paths` into the page cache (twice: the second
    read finds it there)."""
    for _ in range(2):
        for p in paths:
            subprocess.run(read_data_cmd(p), check=True)


def stored_image(store, job):
    """The newest revision's image of `job` (the `latest` link)."""
    return os.path.realpath(os.path.join(store, job, "latest"))


def same(a, b):
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def speed_steps(args, server_bin, client_bin, work, mnt, results, servers):
    """Runs the speed step on a server of its own (dedup off: a full push
    is a full push) and returns its summary; removes what it made."""
    size = args.size
    swork = os.path.join(mnt, "speed")
    store = os.path.join(swork, "store")
    os.makedirs(store)
    runs = max(1, args.speed_runs)
    jobs = [f"one{r}" for r in range(runs)] + [f"c{r}x{i}" for r in range(runs) for i in range(CONCURRENT)]
    cfg = os.path.join(work, "speed.yaml")
    with open(cfg, "w") as f:
        f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {store}\ndedup: off\njobs:\n")
        for job in jobs:
            f.write(f"  {job}: {{schedule: none}}\n")
    server = bench.Server(server_bin, cfg, os.path.join(work, "speed-server.log"))
    servers.append(server)
    env = dict(os.environ, BACKY_SERVER=server.url)
    client = [client_bin, "--json"]
    rounds = {}

    def step(name, cmd, data, srv=None):
        os.sync()  # nothing earlier left to write back inside the step
        busy0, t0 = busy_core_s(), time.monotonic()
        r = timed(name, cmd, size, server=srv, env=env, cache="keep")
        # Over the same window as the busy time (the wrapper's start included).
        r["busy_wall_s"] = time.monotonic() - t0
        r["busy_core_s"] = busy_core_s() - busy0
        r.pop("stdout", None)
        r["data_bytes"] = data
        r["data_mb_per_s"] = data / MIB / r["wall_s"] if r["wall_s"] > 0 else None
        for who in ("cpu_s", "server_cpu_s", "busy_core_s"):
            if r.get(who) is not None and data > 0:
                r[who.replace("_s", "_s_per_gib")] = r[who] / (data / GIB)
        rounds.setdefault(name, []).append(r)
        log(f"{name}: {r['wall_s']:.2f} s, {data / MIB / max(r['wall_s'], 1e-9):.0f} MB/s of data")
        return r

    def drop_job(job):
        # Not through backy: only the space is wanted back.
        subprocess.run(["rm", "-rf", os.path.join(store, job)])
        os.sync()
        bench.trim(mnt)

    # ---- one image: full push, scan incremental, restore; each round
    # pushes the image as it is to a new job, then writes a change set in.
    img = os.path.join(swork, "disk.img")
    log(f"speed: generating a {size / GIB:.2f} GiB image, {args.data:.0%} data")
    make_image(img, size, args.data, args.seed + 30)
    data = bench.allocated(img)
    copy = os.path.join(swork, "copy.img")
    restored = os.path.join(swork, "restored.img")
    for r in range(runs):
        job = f"one{r}"
        warm(img)
        step("speed_seq_read", read_data_cmd(img), data)
        step("speed_sparse_copy", f"cp --reflink=never --sparse=always {img} {copy} && sync", data)
        os.remove(copy)
        warm(img)
        step("speed_full", client + ["push", job, "--source", img, "--force"], data, server)
        if not same(img, stored_image(store, job)):
            raise SystemExit("bench: the speed step's full push stored an image that differs from its source")

        writes = bench.make_changes(size, args.change, args.seed + 31 + 2 * r)
        bench.apply_changes(img, writes, args.seed + 32 + 2 * r)
        os.sync()
        warm(img)
        step("speed_seq_read_v2", read_data_cmd(img), data)
        step("speed_incr_scan", client + ["push", job, "--source", img, "--force"], data, server)
        if not same(img, stored_image(store, job)):
            raise SystemExit("bench: the speed step's incremental push stored an image that differs from its source")

        warm(stored_image(store, job))
        step("speed_sparse_copy_rev",
             f"cp --reflink=never --sparse=always {stored_image(store, job)} {copy} && sync", data)
        os.remove(copy)
        step("speed_restore", client + ["restore", job, "-r", "latest", restored], data, server)
        if not same(img, restored):
            raise SystemExit("bench: the speed step's restore differs from the source")
        os.remove(restored)
        drop_job(job)
    os.remove(img)
    bench.trim(mnt)

    summary = {"data_bytes": data, "runs": runs}
    if args.concurrent:
        # ---- four images of a quarter each, pushed at once
        part = size // CONCURRENT // MIB * MIB
        imgs = []
        for i in range(CONCURRENT):
            p = os.path.join(swork, f"c{i}.img")
            make_image(p, part, args.data, args.seed + 40 + i)
            imgs.append(p)
        cdata = sum(bench.allocated(p) for p in imgs)
        summary["concurrent_data_bytes"] = cdata
        for r in range(runs):
            warm(*imgs)
            copies = " ".join(f"cp --reflink=never --sparse=always {p} {p}.copy &" for p in imgs)
            step("speed_4_copies", f"{copies} wait && sync", cdata)
            for p in imgs:
                os.remove(p + ".copy")
            warm(*imgs)
            pushes = " ".join(f"{client_bin} push c{r}x{i} --source {p} --force > /dev/null &"
                              for i, p in enumerate(imgs))
            # `wait` alone forgets exit codes: wait for each and fail on any.
            step("speed_4_pushes", f"{pushes} for j in $(jobs -p); do wait $j || exit 1; done", cdata, server)
            for i, p in enumerate(imgs):
                if not same(p, stored_image(store, f"c{r}x{i}")):
                    raise SystemExit(f"bench: concurrent push c{r}x{i} stored an image that differs from its source")
                drop_job(f"c{r}x{i}")

    server.stop()
    servers.remove(server)
    subprocess.run(["rm", "-rf", swork])
    os.sync()
    bench.trim(mnt)
    # Each step's row is its median round (by wall time); every round's
    # time is kept in the JSON.
    for name, rs in rounds.items():
        rs_sorted = sorted(rs, key=lambda x: x["wall_s"])
        med = dict(rs_sorted[len(rs_sorted) // 2])
        med["rounds_wall_s"] = [x["wall_s"] for x in rs]
        results[name] = med
    one, four = results["speed_full"], results.get("speed_4_pushes")
    if four and four["data_mb_per_s"] and one["data_mb_per_s"]:
        summary["aggregate_vs_one_push"] = four["data_mb_per_s"] / one["data_mb_per_s"]
    log(f"speed: one push {one['data_mb_per_s'] or 0:.0f} MB/s of data"
        + (f", four together {four['data_mb_per_s'] or 0:.0f} MB/s" if four else ""))
    return summary


def checks(results, speed, add):
    """Adds the speed step's checks (issue 32's targets) through
    `add(name, value, target, met)`."""
    t = {k: r["wall_s"] for k, r in results.items()}
    for name, mine, ref, target in (
            ("warm full push / sparse copy", "speed_full", "speed_sparse_copy", 1.15),
            ("warm scan incr / sequential read", "speed_incr_scan", "speed_seq_read_v2", 1.2),
            ("warm restore / sparse copy", "speed_restore", "speed_sparse_copy_rev", 1.15),
            ("4 concurrent pushes / 4 parallel copies", "speed_4_pushes", "speed_4_copies", 1.3)):
        if mine in t and ref in t:
            v = t[mine] / t[ref]
            add(name, v, target, v <= target)
    if speed and "aggregate_vs_one_push" in speed:
        v = speed["aggregate_vs_one_push"]
        add("4 concurrent pushes: aggregate / one push", v, 1.5, v >= 1.5)
    for key, who in (("cpu_s_per_gib", "client"), ("server_cpu_s_per_gib", "server")):
        r = results.get("speed_full", {})
        if key in r:
            add(f"warm full push: {who} CPU s per GiB of data", r[key], None, None)
    # Whether a step is bound by the cores: the whole machine's busy
    # core-seconds per GiB (kernel writeback included) and how many cores
    # that kept busy on average. A push whose busy time over the machine's
    # cores exceeds the copy's wall time cannot match the copy.
    for name, what in (("speed_full", "warm full push"), ("speed_sparse_copy", "sparse copy"),
                       ("speed_4_pushes", "4 concurrent pushes"), ("speed_4_copies", "4 parallel copies")):
        r = results.get(name, {})
        if r.get("busy_core_s_per_gib") is not None and r.get("busy_wall_s"):
            add(f"{what}: machine busy core-s per GiB", r["busy_core_s_per_gib"], None, None)
            add(f"{what}: cores busy on average", r["busy_core_s"] / r["busy_wall_s"], None, None)


def describe(speed):
    if speed:
        four = (f", {fmt_bytes(speed['concurrent_data_bytes'])} in {CONCURRENT} images pushed at once"
                if "concurrent_data_bytes" in speed else "")
        print(f"speed step (page cache warm, median of {speed['runs']} rounds): "
              f"{fmt_bytes(speed['data_bytes'])} of data in one image{four}")
