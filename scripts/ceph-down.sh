#!/usr/bin/env bash
# Stops the cluster ceph-up.sh started in DIR (only the daemons whose pids
# it recorded, and only while they still run with DIR's ceph.conf), then
# removes DIR.
set -uo pipefail
dir=${1:?usage: ceph-down.sh DIR}

ours() { [ -r "/proc/$1/cmdline" ] && [[ "$(tr '\0' ' ' <"/proc/$1/cmdline")" == *"-c $dir/ceph.conf"* ]]; }

# OSD first, monitor last; SIGKILL after 10 s.
for name in osd.0 mon.a; do
  pidfile=$dir/pids/$name
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do ours "$pid" || break; sleep 0.1; done
    ours "$pid" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
done
rm -rf "$dir"
