#!/usr/bin/env bash
# Scale benchmark of one storage host: N jobs x R revisions (made directly
# by server/examples/scale_fixture.rs), then start-up, status of all jobs,
# status of one job, check, idle CPU with A agents connected, and RSS.
# Prints one table (and --json FILE). See scripts/bench_scale.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bench_scale.py "$@"
