"""The speed step of scripts/bench.py (issue 32): backy against the
hardware itself, with the page cache warm, so what is left is backy's own
cost: a full push against `cp --sparse=always` of the same image onto the
same filesystem, a scanning incremental push against a sequential read of
the source, a restore against the sparse copy, four concurrent full pushes
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


def warm(*paths):
    """Reads `paths` into the page cache (twice: the second read checks
    the first stayed)."""
    for _ in range(2):
        for p in paths:
            subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)


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
    jobs = ["one"] + [f"c{i}" for i in range(CONCURRENT)]
    cfg = os.path.join(work, "speed.yaml")
    with open(cfg, "w") as f:
        f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {store}\ndedup: off\njobs:\n")
        for job in jobs:
            f.write(f"  {job}: {{schedule: none}}\n")
    server = bench.Server(server_bin, cfg, os.path.join(work, "speed-server.log"))
    servers.append(server)
    env = dict(os.environ, BACKY_SERVER=server.url)
    client = [client_bin, "--json"]

    def step(name, cmd, data, srv=None):
        os.sync()  # nothing earlier left to write back inside the step
        r = timed(name, cmd, size, server=srv, env=env, cache="keep")
        r.pop("stdout", None)
        r["data_bytes"] = data
        r["data_mb_per_s"] = data / MIB / r["wall_s"]
        for who in ("cpu_s", "server_cpu_s"):
            if r.get(who) is not None:
                r[who.replace("_s", "_s_per_gib")] = r[who] / (data / GIB)
        results[name] = r
        log(f"{name}: {r['wall_s']:.2f} s, {r['data_mb_per_s']:.0f} MB/s of data")
        return r

    # ---- one image: full push, scan incremental, restore
    img = os.path.join(swork, "disk.img")
    log(f"speed: generating a {size / GIB:.2f} GiB image, {args.data:.0%} data")
    make_image(img, size, args.data, args.seed + 30)
    data = bench.allocated(img)
    copy = os.path.join(swork, "copy.img")
    warm(img)
    step("speed_seq_read", f"cat {img} > /dev/null", data)
    step("speed_sparse_copy", f"cp --reflink=never --sparse=always {img} {copy} && sync", data)
    os.remove(copy)
    warm(img)
    step("speed_full", client + ["push", "one", "--source", img, "--force"], data, server)
    if not same(img, stored_image(store, "one")):
        raise SystemExit("bench: the speed step's full push stored an image that differs from its source")

    writes = bench.make_changes(size, args.change, args.seed + 31)
    bench.apply_changes(img, writes, args.seed + 32)
    os.sync()
    warm(img)
    step("speed_seq_read_v2", f"cat {img} > /dev/null", data)
    step("speed_incr_scan", client + ["push", "one", "--source", img, "--force"], data, server)
    if not same(img, stored_image(store, "one")):
        raise SystemExit("bench: the speed step's incremental push stored an image that differs from its source")

    restored = os.path.join(swork, "restored.img")
    warm(stored_image(store, "one"))
    step("speed_sparse_copy_rev", f"cp --reflink=never --sparse=always {stored_image(store, 'one')} {copy} && sync",
         data)
    os.remove(copy)
    step("speed_restore", client + ["restore", "one", "-r", "latest", restored], data, server)
    if not same(img, restored):
        raise SystemExit("bench: the speed step's restore differs from the source")
    os.remove(restored)
    os.remove(img)
    subprocess.run(["rm", "-rf", os.path.join(store, "one")])  # not through backy: space for what follows
    os.sync()
    bench.trim(mnt)

    # ---- four images of a quarter each, pushed at once
    part = size // CONCURRENT // MIB * MIB
    imgs = []
    for i in range(CONCURRENT):
        p = os.path.join(swork, f"c{i}.img")
        make_image(p, part, args.data, args.seed + 40 + i)
        imgs.append(p)
    cdata = sum(bench.allocated(p) for p in imgs)
    warm(*imgs)
    copies = " ".join(f"cp --reflink=never --sparse=always {p} {p}.copy &" for p in imgs)
    step("speed_4_copies", f"{copies} wait && sync", cdata)
    for p in imgs:
        os.remove(p + ".copy")
    warm(*imgs)
    pushes = " ".join(f"{client_bin} push c{i} --source {p} --force > /dev/null &" for i, p in enumerate(imgs))
    # `wait` alone forgets exit codes: wait for each and fail on any.
    step("speed_4_pushes", f"{pushes} for j in $(jobs -p); do wait $j || exit 1; done", cdata, server)
    for i, p in enumerate(imgs):
        if not same(p, stored_image(store, f"c{i}")):
            raise SystemExit(f"bench: concurrent push c{i} stored an image that differs from its source")

    server.stop()
    servers.remove(server)
    subprocess.run(["rm", "-rf", swork])
    os.sync()
    bench.trim(mnt)
    one = results["speed_full"]
    four = results["speed_4_pushes"]
    summary = {
        "data_bytes": data, "concurrent_data_bytes": cdata,
        "aggregate_vs_one_push": four["data_mb_per_s"] / one["data_mb_per_s"],
    }
    log(f"speed: one push {one['data_mb_per_s']:.0f} MB/s of data, four together {four['data_mb_per_s']:.0f} MB/s")
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
    if speed:
        v = speed["aggregate_vs_one_push"]
        add("4 concurrent pushes: aggregate / one push", v, 1.5, v >= 1.5)
    for key, who in (("cpu_s_per_gib", "client"), ("server_cpu_s_per_gib", "server")):
        r = results.get("speed_full", {})
        if key in r:
            add(f"warm full push: {who} CPU s per GiB of data", r[key], None, None)


def describe(speed):
    if speed:
        print(f"speed step (page cache warm): {fmt_bytes(speed['data_bytes'])} of data in one image, "
              f"{fmt_bytes(speed['concurrent_data_bytes'])} in {CONCURRENT} images pushed at once")
