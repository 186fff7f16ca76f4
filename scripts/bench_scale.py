#!/usr/bin/env python3
"""Scale benchmark of one storage host (see scripts/bench-scale.sh).

Builds N jobs x R revisions with server/examples/scale_fixture.rs (real
.rev/.digests files, tiny sparse images), starts backy-server on them and
measures: the first start on the store (each job's `.since`, `.partial/`
and `latest` created then) and a later start, each until listening;
`status` of all jobs (one line per job), `status JOB`, `check` of all
jobs; server CPU in one idle window each with 0, 20 and 100 agents
connected (a daily schedule, the jobs named so that nothing comes due
during the run: the bench fails if a push is ordered); and server RSS; then the deduplication index of the
same store rebuilt from its manifests (server/examples/index_scale.rs: its
entries, bytes on disk, rebuild time, lookup time and peak RSS). Every step's output is checked, so a
broken run fails instead of printing fast numbers.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def timed(cmd, expect_code=0, runs=3):
    """Median wall time of `cmd` over `runs`, and its last output."""
    times, out = [], None
    for _ in range(runs):
        start = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.monotonic() - start)
        if out.returncode != expect_code:
            sys.exit(f"{' '.join(cmd)} exited {out.returncode}: {out.stdout[-500:]}{out.stderr[-500:]}")
    times.sort()
    return times[len(times) // 2], out


def start_server(config, log_path):
    """Starts backy-server; returns it, its address and the seconds until it
    listened."""
    log = open(log_path, "w")
    start = time.monotonic()
    server = subprocess.Popen([os.path.join(BIN, "backy-server"), "--config", config],
                              stdout=subprocess.DEVNULL, stderr=log)
    while True:
        if server.poll() is not None:
            sys.exit(f"backy-server exited:\n{open(log_path).read()[-2000:]}")
        if time.monotonic() - start > 600:
            sys.exit("backy-server did not start within 10 minutes")
        m = re.search(r"listening on (\S+)", open(log_path).read())
        if m:
            return server, "http://" + m.group(1), time.monotonic() - start
        time.sleep(0.05)


def indexing_secs(log_path):
    m = re.search(r"indexed the store in (\S+) s", open(log_path).read())
    return float(m.group(1)) if m else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--revisions", type=int, default=20)
    ap.add_argument("--agents", default="0,20,100",
                    help="agents connected in each idle window, ascending (comma-separated); the "
                         "jobs belong to as many clients as the largest number")
    ap.add_argument("--idle", type=float, default=120.0, help="seconds of each idle CPU window")
    ap.add_argument("--quiet-hours", type=int, default=2,
                    help="the jobs are named so that none is due within this many hours "
                         "(on the daily schedule, 10,000 jobs come due at ~7 a minute otherwise)")
    ap.add_argument("--json", default=os.path.join(TARGET, "bench-scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    windows = [int(a) for a in args.agents.split(",")]
    if windows != sorted(windows) or windows[0] < 0:
        sys.exit("--agents: ascending numbers, e.g. 0,20,100")
    clients = max(max(windows), 1)

    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--workspace", "--bins", "--examples"],
        cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="backy-scale.")
    base = os.path.join(work, "store")
    names_file = os.path.join(work, "jobs.txt")
    server = None
    agents = []
    try:
        start = time.monotonic()
        subprocess.run([os.path.join(BIN, "examples", "scale_fixture"), base, str(args.jobs),
                        str(args.revisions), "--data", "--first-start",
                        "--quiet-hours", str(args.quiet_hours), "--names", names_file], check=True)
        fixture_secs = time.monotonic() - start
        # The fixture's own writes reach the disk before the first start
        # (as a store's files have), not within its sync of what it made.
        os.sync()
        names = open(names_file).read().split()
        if len(names) != args.jobs:
            sys.exit(f"the fixture named {len(names)} jobs, not {args.jobs}")
        for n in names[:10]:
            if any(os.path.lexists(os.path.join(base, n, f)) for f in (".since", ".partial", "latest")):
                sys.exit(f"the fixture made {n} as if the server had run on it")

        config = os.path.join(work, "server.yaml")
        with open(config, "w") as f:
            f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {base}\n")
            f.write("scrub: {enabled: false}\n")
            f.write(f"schedules:\n  bench: {{daily: {{interval: 1d, keep: {args.revisions}}}}}\njobs:\n")
            for j, name in enumerate(names):
                f.write(f"  {name}: {{schedule: bench, client: hv{j % clients:03}}}\n")

        # The first start creates each job's .since, .partial/ and latest.
        first_log = os.path.join(work, "server-first.log")
        server, url, first_secs = start_server(config, first_log)
        first_index_secs = indexing_secs(first_log)
        for n in names:
            d = os.path.join(base, n)
            if not (os.path.isfile(os.path.join(d, ".since")) and os.path.isdir(os.path.join(d, ".partial"))
                    and os.path.islink(os.path.join(d, "latest"))):
                sys.exit(f"the first start did not make {n}'s .since, .partial/ and latest")
        server.terminate()
        if server.wait(timeout=60) != 0:
            sys.exit(f"backy-server stopped with {server.returncode}: {open(first_log).read()[-2000:]}")
        server = None

        log_path = os.path.join(work, "server.log")
        server, url, startup_secs = start_server(config, log_path)
        index_secs = indexing_secs(log_path)
        rss_start = rss_mib(server.pid)
        client = [os.path.join(BIN, "backy-client"), "--server", url]

        status_all, out = timed(client + ["status"])
        lines = out.stdout.splitlines()
        # A header, a line per job, the summary, the store's use.
        if (len(lines) != args.jobs + 3 or "past their SLA" not in lines[-2]
                or not lines[-1].startswith("store: ")):
            sys.exit(f"status of all jobs printed {len(lines)} lines: {out.stdout[-500:]}")
        status_json, out = timed(client + ["status", "--json"])
        if len(json.loads(out.stdout)["jobs"]) != args.jobs:
            sys.exit("status --json did not list every job")
        status_one, out = timed(client + ["status", names[0]], runs=5)
        if sum(line.endswith("trusted") for line in out.stdout.splitlines()) != args.revisions:
            sys.exit(f"status JOB did not list {args.revisions} revisions: {out.stdout[:500]}")
        check_all, out = timed(client + ["check"])
        if not out.stdout.startswith(f"BACKY OK: {args.jobs} jobs"):
            sys.exit(f"check: {out.stdout}")

        # Idle windows, right after the status and check calls above (what
        # they leave running counts): 0 agents, then more connect.
        idle = {}
        for n in windows:
            for a in range(len(agents), n):
                agents.append(subprocess.Popen(client + ["agent", "--name", f"hv{a:03}"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 120
            while open(log_path).read().count("agent connected") < n:
                if time.monotonic() > deadline:
                    sys.exit("the agents did not all connect within 2 minutes")
                time.sleep(0.1)
            if n:
                time.sleep(2)  # let the first planning round of every new agent pass
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(args.idle)
            idle[n] = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        orders = open(log_path).read().count("ordering push")
        rss_end = rss_mib(server.pid)

        rows = [
            ("jobs x revisions", f"{args.jobs} x {args.revisions}", ""),
            ("fixture written", f"{fixture_secs:.1f} s", "(not the server)"),
            ("first start until listening", f"{first_secs:.2f} s", "target < 5 s at 10,000 jobs"),
            ("  of which indexing the store", f"{first_index_secs:.2f} s", "(then expiry, then listen)"),
            ("later start until listening", f"{startup_secs:.2f} s", "target < 5 s at 10,000 jobs"),
            ("  of which indexing the store", f"{index_secs:.2f} s", ""),
            ("status, all jobs (one line each)", f"{status_all:.3f} s", "target < 2 s"),
            ("status --json, all jobs", f"{status_json:.3f} s", ""),
            ("status JOB", f"{status_one:.3f} s", "target < 0.1 s"),
            ("check, all jobs", f"{check_all:.3f} s", "target < 2 s"),
            *[(f"idle CPU, {n} agents, {args.idle:.0f} s", f"{idle[n] * 100:.2f} % of a core",
               "target < 1 %") for n in windows],
            ("pushes ordered meanwhile", f"{orders}", "0 expected: nothing is due"),
            ("server RSS after start / at end", f"{rss_start:.0f} / {rss_end:.0f} MiB", "target < 300 MiB"),
        ]
        width = max(len(r[0]) for r in rows)
        print("== bench-scale (client times include process start)")
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:<22} {note}")
        server.kill()
        server.wait()
        server = None
        if orders:
            sys.exit(f"{orders} pushes were ordered: something came due, the idle figures are void")
        # The digest index of this store: every revision's data blocks.
        out = subprocess.run([os.path.join(BIN, "examples", "index_scale"), base],
                             capture_output=True, text=True, check=True)
        index = json.loads(out.stdout)
        expected = args.jobs * (4 + args.revisions - 1)
        if index["entries"] != expected:
            sys.exit(f"the index holds {index['entries']} digests, expected {expected}: {out.stdout}")
        index_rows = [
            ("dedup index: digests", f"{index['entries']}", "every revision's data blocks"),
            ("dedup index: files", f"{index['bytes'] / 2**20:.1f} MiB", "on disk, read a bucket at a time"),
            ("dedup index: rebuild", f"{index['rebuild_secs']:.1f} s", "from every manifest"),
            ("dedup index: lookup", f"{index['lookup_us']:.1f} us", "median, warm page cache"),
            ("dedup index: peak RSS", f"{index['peak_rss_mib']:.0f} MiB", "of the process rebuilding and looking up"),
        ]
        for name, value, note in index_rows:
            print(f"{name:<{width}}  {value:<22} {note}")
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"jobs": args.jobs, "revisions": args.revisions, "agents": windows,
                       "first_start_secs": first_secs, "first_index_secs": first_index_secs,
                       "startup_secs": startup_secs, "index_secs": index_secs, "status_all_secs": status_all,
                       "status_json_secs": status_json, "status_job_secs": status_one,
                       "check_all_secs": check_all, "idle_secs": args.idle,
                       "idle_cpu_fraction": {str(n): f for n, f in idle.items()}, "orders": orders,
                       "rss_start_mib": rss_start, "rss_end_mib": rss_end, "dedup_index": index}, f, indent=2)
    finally:
        for a in agents:
            a.kill()
            a.wait()
        if server is not None:
            server.kill()
            server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
