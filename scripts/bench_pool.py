"""The pool step of scripts/bench.py (issue 36): backy on a Ceph pool store
(`store: {type: ceph-rbd}`) against Ceph's own tools on the same cluster,
in one run: a full push against `rbd import` of the same image into the
same pool, a scanning incremental push against the same push into the
filesystem store, a restore against `rbd export` of the snapshot, and four
concurrent full pushes through one server and through two servers in
front of the pool (against four `rbd import`s at once), and the take-over
of a job after kill -9 of its lease holder. Every revision is compared
byte for byte with its source.

The cluster: the one BACKY_BENCH_CEPH_CONF names (its admin keyring), or
else a one-node cluster of its own, started with scripts/ceph-up.sh on
bluestore on a sparse file under the bench's work directory and stopped at
the end (memstore for --smoke, or the test cluster of BACKY_TEST_CEPH_CONF
when the test suite runs the smoke). Everything lives in a RADOS namespace
of pool `rbd` made for the run and removed after it.
"""

import os
import shutil
import subprocess
import time
import uuid

import bench
from bench import GIB, MIB, fmt_bytes, log, make_image, run, timed
from bench_speed import busy_core_s, same, stored_image, warm

CONCURRENT = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A free msgr2 port (and the v1 port after it) for a cluster of our own."""
    import socket
    for port in range(3700, 3798, 2):
        busy = False
        for p in (port, port + 1):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    busy = True
        if not busy:
            return port
    raise SystemExit("bench: no free port in 3700-3798 for the pool step's cluster")


class Cluster:
    """The Ceph cluster the step runs on, and a namespace of pool `rbd` in it."""

    def __init__(self, args, work):
        self.own = None
        conf = os.environ.get("BACKY_BENCH_CEPH_CONF")
        if not conf and args.smoke:
            conf = os.environ.get("BACKY_TEST_CEPH_CONF")
        if not conf:
            self.own = os.path.join(work, "ceph")
            objectstore = "memstore" if args.smoke else "bluestore"
            # Room for the image's data about eight times over (revisions,
            # the references, the concurrent images), at least 4 GiB.
            capacity = max(4 * GIB, int(args.size * args.data * 8) + 2 * GIB)
            env = dict(os.environ, BACKY_CEPH_OBJECTSTORE=objectstore,
                       BACKY_CEPH_STORE_BYTES=str(capacity // GIB) + "G")
            log(f"pool: starting a one-node cluster ({objectstore}, {capacity // GIB} GiB)")
            out = subprocess.run([os.path.join(REPO, "scripts", "ceph-up.sh"), self.own, str(free_port())],
                                 env=env, stdout=subprocess.PIPE, text=True)
            if out.returncode != 0:
                raise SystemExit("bench: the pool step's Ceph cluster did not start (scripts/ceph-up.sh)")
            conf = out.stdout.strip().splitlines()[-1]
            self.objectstore = objectstore
        else:
            self.objectstore = "given"
        self.conf = conf
        self.env = dict(os.environ, CEPH_CONF=conf)
        self.pool = "rbd"
        self.namespace = "bench" + uuid.uuid4().hex[:8]
        self.rbd("namespace", "create", f"{self.pool}/{self.namespace}")

    def spec(self, image, snap=None):
        s = f"{self.pool}/{self.namespace}/{image}"
        return f"{s}@{snap}" if snap else s

    def rbd(self, *argv):
        run(["rbd", *argv], env=self.env)

    def remove_image(self, image):
        subprocess.run(["rbd", "snap", "purge", self.spec(image)], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rbd", "rm", "--no-progress", self.spec(image)], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def store_yaml(self):
        return (f"store:\n  type: ceph-rbd\n  conf: {self.conf}\n  id: admin\n"
                f"  pool: {self.pool}\n  namespace: {self.namespace}\n")

    def snapshots(self, image):
        out = subprocess.run(["rbd", "snap", "ls", "--format", "json", self.spec(image)], env=self.env,
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        import json
        return [s["name"] for s in json.loads(out)]

    def equal(self, image, snap, path):
        """`rbd export` of the snapshot equals the file, byte for byte."""
        p = subprocess.run(f"rbd export --no-progress {self.spec(image, snap)} - | cmp -s - {path}",
                           shell=True, env=self.env)
        return p.returncode == 0

    def close(self):
        # Every image of the namespace, then the namespace's objects
        # (records, manifests) and the namespace itself.
        out = subprocess.run(["rbd", "ls", f"{self.pool}/{self.namespace}"], env=self.env,
                             stdout=subprocess.PIPE, text=True).stdout.split()
        for image in out:
            self.remove_image(image)
        objs = subprocess.run(["rados", "-p", self.pool, "-N", self.namespace, "ls"], env=self.env,
                              stdout=subprocess.PIPE, text=True).stdout.split()
        for o in objs:
            subprocess.run(["rados", "-p", self.pool, "-N", self.namespace, "rm", o], env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rbd", "namespace", "remove", f"{self.pool}/{self.namespace}"], env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.own:
            subprocess.run([os.path.join(REPO, "scripts", "ceph-down.sh"), self.own],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(self.own, ignore_errors=True)


def pool_steps(args, server_bin, client_bin, work, mnt, results, servers):
    """Runs the pool step and returns its summary; removes what it made."""
    size = args.size
    runs = max(1, args.speed_runs)
    pwork = os.path.join(mnt, "pool")
    os.makedirs(pwork)
    cluster = Cluster(args, work)
    made = []
    try:
        return _steps(args, server_bin, client_bin, work, pwork, results, servers, cluster, runs, size, made)
    finally:
        for s in made:
            if s in servers:
                s.stop()
                servers.remove(s)
        cluster.close()
        subprocess.run(["rm", "-rf", pwork])
        os.sync()
        bench.trim(mnt)


def _steps(args, server_bin, client_bin, work, pwork, results, servers, cluster, runs, size, made):
    jobs = [f"p{r}" for r in range(runs)] + [f"{k}{r}x{i}" for k in "ot" for r in range(runs)
                                             for i in range(CONCURRENT)] + ["k0"]

    def server(name, yaml):
        base = os.path.join(pwork, name)
        os.makedirs(base)
        cfg = os.path.join(work, f"pool-{name}.yaml")
        with open(cfg, "w") as f:
            f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {base}\ndedup: off\n{yaml}jobs:\n")
            for job in jobs:
                f.write(f"  {job}: {{schedule: none}}\n")
        s = bench.Server(server_bin, cfg, os.path.join(work, f"pool-{name}.log"))
        servers.append(s)
        made.append(s)
        return s

    a = server("a", cluster.store_yaml())
    b = server("b", cluster.store_yaml())
    fs = server("fs", "")
    fs_store = os.path.join(pwork, "fs")
    client = [client_bin, "--json"]
    rounds = {}

    def step(name, cmd, data, srv=None):
        os.sync()
        busy0, t0 = busy_core_s(), time.monotonic()
        env = dict(cluster.env, BACKY_SERVER=(srv or a).url)
        r = timed(name, cmd, size, server=srv, env=env, cache="keep")
        r["busy_wall_s"] = time.monotonic() - t0
        r["busy_core_s"] = busy_core_s() - busy0
        r.pop("stdout", None)
        r["data_bytes"] = data
        r["data_mb_per_s"] = data / MIB / r["wall_s"] if r["wall_s"] > 0 else None
        for who in ("cpu_s", "server_cpu_s"):
            if r.get(who) is not None and data > 0:
                r[who.replace("_s", "_s_per_gib")] = r[who] / (data / GIB)
        rounds.setdefault(name, []).append(r)
        log(f"{name}: {r['wall_s']:.2f} s, {data / MIB / max(r['wall_s'], 1e-9):.0f} MB/s of data")
        return r

    def newest(image):
        snaps = cluster.snapshots(image)
        if not snaps:
            raise SystemExit(f"bench: pool job {image} has no snapshot after its push")
        return snaps[-1]

    img = os.path.join(pwork, "disk.img")
    restored = os.path.join(pwork, "restored.img")
    log(f"pool: generating a {size / GIB:.2f} GiB image, {args.data:.0%} data")
    make_image(img, size, args.data, args.seed + 50)
    data = bench.allocated(img)
    for r in range(runs):
        job, ref = f"p{r}", f"ref{r}"
        warm(img)
        step("pool_rbd_import", ["rbd", "import", "--no-progress", img, cluster.spec(ref)], data)
        cluster.remove_image(ref)
        warm(img)
        step("pool_full", client + ["push", job, "--source", img, "--force"], data, a)
        if not cluster.equal(job, newest(job), img):
            raise SystemExit("bench: the pool's full push made a snapshot that differs from its source")
        # The same image into the filesystem store, as the incremental's reference.
        run(client + ["push", job, "--source", img, "--force"], env=dict(os.environ, BACKY_SERVER=fs.url))

        writes = bench.make_changes(size, args.change, args.seed + 51 + 2 * r)
        bench.apply_changes(img, writes, args.seed + 52 + 2 * r)
        os.sync()
        warm(img)
        step("pool_incr_scan", client + ["push", job, "--source", img, "--force"], data, a)
        snap = newest(job)
        if not cluster.equal(job, snap, img):
            raise SystemExit("bench: the pool's incremental push made a snapshot that differs from its source")
        warm(img)
        step("pool_fs_incr_scan", client + ["push", job, "--source", img, "--force"], data, fs)
        if not same(img, stored_image(fs_store, job)):
            raise SystemExit("bench: the filesystem store's incremental push differs from its source")
        subprocess.run(["rm", "-rf", os.path.join(fs_store, job)])

        step("pool_rbd_export", ["rbd", "export", "--no-progress", cluster.spec(job, snap), restored], data)
        os.remove(restored)
        step("pool_restore", client + ["restore", job, "-r", "latest", restored], data, a)
        if not same(img, restored):
            raise SystemExit("bench: the restore from the pool differs from the source")
        os.remove(restored)
        cluster.remove_image(job)
    os.remove(img)

    summary = {"data_bytes": data, "runs": runs, "objectstore": cluster.objectstore}
    if args.concurrent:
        part = size // CONCURRENT // MIB * MIB
        imgs = []
        for i in range(CONCURRENT):
            p = os.path.join(pwork, f"c{i}.img")
            make_image(p, part, args.data, args.seed + 60 + i)
            imgs.append(p)
        cdata = sum(bench.allocated(p) for p in imgs)
        summary["concurrent_data_bytes"] = cdata
        wait_all = "for j in $(jobs -p); do wait $j || exit 1; done"
        for r in range(runs):
            warm(*imgs)
            imports = " ".join(f"rbd import --no-progress {p} {cluster.spec(f'i{r}x{i}')} &"
                               for i, p in enumerate(imgs))
            step("pool_4_rbd_imports", f"{imports} {wait_all}", cdata)
            for i in range(CONCURRENT):
                cluster.remove_image(f"i{r}x{i}")
            warm(*imgs)
            pushes = " ".join(f"BACKY_SERVER={a.url} {client_bin} push o{r}x{i} --source {p} --force > /dev/null &"
                              for i, p in enumerate(imgs))
            step("pool_4_push_1srv", f"{pushes} {wait_all}", cdata, a)
            warm(*imgs)
            # Half the jobs through each server: each takes its jobs' leases.
            pushes = " ".join(
                f"BACKY_SERVER={(a if i % 2 == 0 else b).url} {client_bin} push t{r}x{i} --source {p} --force"
                " > /dev/null &" for i, p in enumerate(imgs))
            step("pool_4_push_2srv", f"{pushes} {wait_all}", cdata)
            for prefix in ("o", "t"):
                for i, p in enumerate(imgs):
                    image = f"{prefix}{r}x{i}"
                    if not cluster.equal(image, newest(image), p):
                        raise SystemExit(f"bench: concurrent pool push {image} differs from its source")
                    cluster.remove_image(image)

    take_over(args, cluster, server, client_bin, pwork, servers, summary)

    for name, rs in rounds.items():
        rs_sorted = sorted(rs, key=lambda x: x["wall_s"])
        med = dict(rs_sorted[len(rs_sorted) // 2])
        med["rounds_wall_s"] = [x["wall_s"] for x in rs]
        results[name] = med
    return summary


def take_over(args, cluster, server, client_bin, pwork, servers, summary):
    """Kill -9 of a job's lease holder: how long until another server in
    front of the pool takes the job, measured from the kill to the start of
    the first push through the other server that lands (tried every 0.2 s;
    until then the push is refused, or sent to the dead holder). The store's
    default lease (30 s), or 6 s for the smoke."""
    seconds = 6 if args.smoke else 30
    lease = "  lease: 6s\n  lease-renewal: 2s\n  lease-margin: 1s\n" if args.smoke else ""
    holder = server("k1", cluster.store_yaml() + lease)
    taker = server("k2", cluster.store_yaml() + lease)
    img = os.path.join(pwork, "k0.img")
    make_image(img, 64 * MIB, args.data, args.seed + 70)
    push = [client_bin, "--timeout", "2", "push", "k0", "--source", img, "--force"]
    run(push, env=dict(os.environ, BACKY_SERVER=holder.url))
    holder.proc.kill()
    killed = time.monotonic()
    holder.proc.wait()
    servers.remove(holder)
    while True:
        tried = time.monotonic()
        r = subprocess.run(push, env=dict(os.environ, BACKY_SERVER=taker.url),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode == 0:
            break
        if tried - killed > 3 * seconds + 30:
            raise SystemExit(f"bench: no take-over {tried - killed:.0f} s after the holder's kill: {r.stderr}")
        time.sleep(0.2)
    if not cluster.equal("k0", cluster.snapshots("k0")[-1], img):
        raise SystemExit("bench: the push after the take-over made a snapshot that differs from its source")
    cluster.remove_image("k0")
    os.remove(img)
    summary["takeover_s"] = tried - killed
    summary["takeover_lease_s"] = seconds
    log(f"pool: take-over {tried - killed:.1f} s after kill -9 of the holder (lease {seconds} s)")


def checks(results, pool, add):
    """Adds the pool step's checks (issue 36's targets) through
    `add(name, value, target, met)`."""
    t = {k: r["wall_s"] for k, r in results.items()}
    for name, mine, ref, target in (
            ("pool: full push / rbd import", "pool_full", "pool_rbd_import", 1.3),
            ("pool: scan incr / same push to the fs store", "pool_incr_scan", "pool_fs_incr_scan", 1.3),
            ("pool: restore / rbd export", "pool_restore", "pool_rbd_export", 1.3),
            ("pool: 4 pushes, one server / 4 rbd imports", "pool_4_push_1srv", "pool_4_rbd_imports", None),
            ("pool: 4 pushes, two servers / 4 rbd imports", "pool_4_push_2srv", "pool_4_rbd_imports",
             None)):
        if mine in t and ref in t:
            v = t[mine] / t[ref]
            add(name, v, target, None if target is None else v <= target)
    if pool and "takeover_s" in pool:
        # Within the lease (issue 36: at most 60 s by default), plus the
        # retry's 0.2 s and a client's start.
        lease = pool["takeover_lease_s"]
        add(f"pool: take-over after kill -9 of the holder, s (lease {lease} s)", pool["takeover_s"],
            lease + 1, pool["takeover_s"] <= lease + 1)
    for name, what in (("pool_4_push_1srv", "one server"), ("pool_4_push_2srv", "two servers")):
        r = results.get(name)
        if r and r.get("data_mb_per_s"):
            add(f"pool: 4 pushes, {what}: MB/s of data", r["data_mb_per_s"], None, None)


def describe(pool):
    if pool:
        four = (f", {fmt_bytes(pool['concurrent_data_bytes'])} in {CONCURRENT} images pushed at once"
                if "concurrent_data_bytes" in pool else "")
        print(f"pool step (Ceph {pool['objectstore']}, one node, page cache of the sources warm, median of "
              f"{pool['runs']} rounds): {fmt_bytes(pool['data_bytes'])} of data in one image{four}")
