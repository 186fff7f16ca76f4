#!/usr/bin/env bash
# The whole test suite: installs what the tests need when it is missing
# (as root; scripts/test-deps.sh, which also checks on every run that the
# install sets still resolve), then runs every unit, property and
# end-to-end test, the lints, the package test and the bench smokes.
# Usage: scripts/test.sh [extra cargo test args]
#        scripts/test.sh --install-only   (install and check, then exit)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the end-to-end tests mount loop filesystems and install what they need: run as root" >&2
  exit 1
fi
# Every run: resolve every package line against the archives (a broken
# dependency chain fails here on any machine), then install what is missing.
scripts/test-deps.sh
if [ "${1:-}" = --install-only ]; then
  exit 0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "== ceph test cluster"
# A throw-away one-node cluster for tests/tests/ceph.rs and ceph_pool*.rs, stopped on exit
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
# The job transaction's stress test (server/src/job/txn.rs) runs a minute here.
export BACKY_STRESS_SECS=${BACKY_STRESS_SECS:-60}
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
python3 scripts/bench.py --smoke --json target/bench-smoke.json

echo "== bench-scale smoke (scripts/bench-scale.sh at a small size: every step checked, no timing asserts)"
scripts/bench-scale.sh --jobs 200 --revisions 5 --agents 0,10 --idle 2 --json target/bench-scale-smoke.json
