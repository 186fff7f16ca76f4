#!/usr/bin/env bash
# Benchmark backy against rsync, restic and borg and the physical reference
# points (sequential read, sparse copy, reflink + changed bytes), and serves
# the newest revision over NBD (backy-client export), on a btrfs loop
# filesystem it creates; and backy on a Ceph pool store against
# `rbd import`/`rbd export` (a one-node cluster it starts, bluestore on a
# sparse file). Installs the peers and Ceph when missing (as root), builds
# backy, then runs scripts/bench.py, which prints one table and writes JSON
# (default target/bench.json).
# Usage: scripts/bench.sh [--size 4G] [--data 0.5] [--change 0.01] [--peers rsync,restic,borg]
#                         [--no-dedup] [--dedup-jobs 10] [--dedup-change 0.01] [--dedup-restores N]
#                         [--no-speed] [--speed-runs 3] [--speed-only] [--no-concurrent] [--no-pool] [--pool-only]
#                         [--json FILE] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench.sh: needs root (loop mounts, dropping the page cache)" >&2
  exit 1
fi
need=()
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v losetup >/dev/null || need+=(mount)
command -v python3 >/dev/null || need+=(python3)
command -v rsync >/dev/null || need+=(rsync)
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v qemu-img >/dev/null || need+=(qemu-utils)
# The pool step's one-node cluster.
command -v ceph-osd >/dev/null || need+=(ceph-mon ceph-osd ceph-common)
if ((${#need[@]})); then
  echo "bench.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet -p backy-server -p backy-client
exec python3 scripts/bench.py "$@"
