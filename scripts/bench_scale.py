#!/usr/bin/env python3
"""Scale benchmark of one storage host (see scripts/bench-scale.sh).

Builds N jobs x R revisions with server/examples/scale_fixture.rs (real
.rev/.digests files, tiny sparse images), starts backy-server on them and
measures: start-up until listening, `status` of all jobs (one line per job),
`status JOB`, `check` of all jobs, server CPU while A agents are connected
and nothing is due, and server RSS; then the deduplication index of the
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--revisions", type=int, default=20)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    ap.add_argument("--interval", default="3650d",
                    help="the schedule's interval; long by default so that no job's slot falls "
                         "within the run (on a daily schedule a few of 10,000 jobs come due per "
                         "minute); what status and check cost does not depend on it")
    ap.add_argument("--json", default=os.path.join(TARGET, "bench-scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--workspace", "--bins", "--examples"],
        cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="backy-scale.")
    base = os.path.join(work, "store")
    server = None
    agents = []
    try:
        start = time.monotonic()
        subprocess.run([os.path.join(BIN, "examples", "scale_fixture"), base, str(args.jobs),
                        str(args.revisions), "--data"], check=True)
        fixture_secs = time.monotonic() - start

        config = os.path.join(work, "server.yaml")
        with open(config, "w") as f:
            f.write(f"listen: 127.0.0.1:0\ninsecure-plaintext: true\nbase-dir: {base}\n")
            f.write("scrub: {enabled: false}\n")
            f.write(f"schedules:\n  bench: {{daily: {{interval: {args.interval}, keep: {args.revisions}}}}}\njobs:\n")
            for j in range(args.jobs):
                f.write(f"  job{j:05}: {{schedule: bench, client: hv{j % max(args.agents, 1):03}}}\n")

        log_path = os.path.join(work, "server.log")
        log = open(log_path, "w")
        start = time.monotonic()
        server = subprocess.Popen([os.path.join(BIN, "backy-server"), "--config", config],
                                  stdout=subprocess.DEVNULL, stderr=log)
        url = None
        while url is None:
            if server.poll() is not None:
                sys.exit(f"backy-server exited:\n{open(log_path).read()[-2000:]}")
            if time.monotonic() - start > 600:
                sys.exit("backy-server did not start within 10 minutes")
            m = re.search(r"listening on (\S+)", open(log_path).read())
            if m:
                url = "http://" + m.group(1)
            else:
                time.sleep(0.05)
        startup_secs = time.monotonic() - start
        m = re.search(r"indexed the store in (\S+) s", open(log_path).read())
        index_secs = float(m.group(1)) if m else float("nan")
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
        status_one, out = timed(client + ["status", "job00000"], runs=5)
        if sum(line.endswith("trusted") for line in out.stdout.splitlines()) != args.revisions:
            sys.exit(f"status JOB did not list {args.revisions} revisions: {out.stdout[:500]}")
        check_all, out = timed(client + ["check"])
        if not out.stdout.startswith(f"BACKY OK: {args.jobs} jobs"):
            sys.exit(f"check: {out.stdout}")

        for a in range(args.agents):
            agents.append(subprocess.Popen(client + ["agent", "--name", f"hv{a:03}"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 120
        while open(log_path).read().count("agent connected") < args.agents:
            if time.monotonic() > deadline:
                sys.exit("the agents did not all connect within 2 minutes")
            time.sleep(0.1)
        time.sleep(2)  # let the first planning round of every agent pass
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
        orders = open(log_path).read().count("ordering push")
        rss_end = rss_mib(server.pid)

        rows = [
            ("jobs x revisions", f"{args.jobs} x {args.revisions}", ""),
            ("fixture written", f"{fixture_secs:.1f} s", "(not the server)"),
            ("start-up until listening", f"{startup_secs:.2f} s", "target < 10 s at 10,000 jobs"),
            ("  of which indexing the store", f"{index_secs:.2f} s", "(then expiry, then listen)"),
            ("status, all jobs (one line each)", f"{status_all:.3f} s", "target < 2 s"),
            ("status --json, all jobs", f"{status_json:.3f} s", ""),
            ("status JOB", f"{status_one:.3f} s", "target < 0.1 s"),
            ("check, all jobs", f"{check_all:.3f} s", "target < 2 s"),
            (f"idle CPU, {args.agents} agents", f"{idle_cpu * 100:.2f} % of a core", "target < 2 %"),
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
            json.dump({"jobs": args.jobs, "revisions": args.revisions, "agents": args.agents,
                       "startup_secs": startup_secs, "index_secs": index_secs, "status_all_secs": status_all,
                       "status_json_secs": status_json, "status_job_secs": status_one,
                       "check_all_secs": check_all, "idle_cpu_fraction": idle_cpu, "orders": orders,
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
