#!/usr/bin/env bash
# The whole test suite: installs what the tests need when it is missing
# (as root), then runs every unit, property and end-to-end test and the
# lints. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v rbd >/dev/null || need+=(ceph-common)
# tests/tests/monitoring.rs: /metrics through the official Prometheus parser,
# the status page rendered by headless Chromium.
/usr/bin/python3 -c 'import prometheus_client.parser' 2>/dev/null || need+=(python3-prometheus-client)
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: missing packages ${need[*]} and not root to install them" >&2
    exit 1
  fi
  echo "test.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# tests/tests/qemu_running.rs: a QEMU without a guest stands in for a VM.
# Its version must match qemu-utils': Debian 12's qemu-system-x86 (7.2)
# conflicts with bookworm-backports' qemu-utils (10.0) and apt would
# remove the latter, so it comes from where qemu-utils came from (a
# private sources list, /etc/apt untouched; --no-remove either way).
if ! command -v qemu-system-x86_64 >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "test.sh: qemu-system-x86 missing and not root to install it" >&2; exit 1; }
  qver=$(dpkg-query -W -f '${Version}' qemu-utils)
  echo "test.sh: installing qemu-system-x86 $qver"
  export DEBIAN_FRONTEND=noninteractive
  apt_dir=$(mktemp -d /tmp/backy-apt.XXXXXX)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  cat > "$apt_dir/sources.list" <<'SOURCES'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
SOURCES
  apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
            -o "Dir::State::lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives"
            -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  if [[ $qver == *bpo* ]]; then
    apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends --no-remove \
      "qemu-system-x86/bookworm-backports" "qemu-system-common/bookworm-backports" \
      "qemu-system-data/bookworm-backports" >/dev/null
  else
    apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends --no-remove qemu-system-x86 >/dev/null
  fi
  rm -rf "$apt_dir"
  qemu-system-x86_64 --version | head -1
fi
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the end-to-end tests mount loop filesystems and need root" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "== ceph test cluster"
# A throw-away one-node cluster for tests/tests/ceph.rs, stopped on exit
# (only the daemons it started). A free mon port, in case another cluster
# runs on this machine.
ceph_dir=$(mktemp -d /tmp/backy-ceph.XXXXXX)
trap 'scripts/ceph-down.sh "$ceph_dir"' EXIT
for port in $(seq 3400 2 3498); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null || break
done
BACKY_TEST_CEPH_CONF=$(scripts/ceph-up.sh "$ceph_dir" "$port")
export BACKY_TEST_CEPH_CONF
echo "ceph cluster up: $BACKY_TEST_CEPH_CONF"
echo "== cargo test"
# Release builds: the end-to-end tests move GiB-sized sparse images. With
# fault injection (BACKY_FAULT), which packaged builds lack: both commands
# name it, or cargo test would rebuild the binaries without it.
features=(--features backy-common/fault-injection)
cargo build --release --workspace --bins --examples --quiet "${features[@]}"
set +e
cargo test --release --workspace --no-fail-fast "${features[@]}" "$@" 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e
grep -E "^test result:" target/test-output.txt | awk '
  { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
  END { printf "all tests: %d passed, %d failed, %d skipped\n", p, f, s }'
if [ "$status" != 0 ]; then
  grep -E "^test .* FAILED$" target/test-output.txt >&2 || true
  exit "$status"
fi

echo "== Debian packages (scripts/test-packages.sh: build, install, run the installed binaries, purge)"
scripts/test-packages.sh

echo "== bench smoke (scripts/bench.sh --smoke: every step on a tiny image, no timing asserts)"
command -v rsync >/dev/null && command -v restic >/dev/null && command -v borg >/dev/null ||
  { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq --no-install-recommends rsync restic borgbackup >/dev/null; }
python3 scripts/bench.py --smoke --json target/bench-smoke.json

echo "== bench-scale smoke (scripts/bench-scale.sh at a small size: every step checked, no timing asserts)"
scripts/bench-scale.sh --jobs 200 --revisions 5 --agents 10 --idle 2 --json target/bench-scale-smoke.json
