#!/usr/bin/env bash
# The main job on an embedded default: a local backy-server on a plain
# directory, a sample sparse disk image backed up, changed, backed up
# again, status shown, the newest revision restored and compared.
# Usage: scripts/demo.sh [WORKDIR]   (default: a new temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p backy-server -p backy-client
bin=$PWD/target/release
work=${1:-$(mktemp -d /tmp/backy-demo.XXXXXX)}
mkdir -p "$work"
echo "== demo in $work"

cat > "$work/server.yaml" <<YAML
listen: 127.0.0.1:0
# Plain TCP on loopback only, no clients: open to local users (demo).
insecure-plaintext: true
base-dir: $work/store
schedules:
  default:
    daily:   {interval: 1d, keep: 9}
    weekly:  {interval: 7d, keep: 5}
    monthly: {interval: 30d, keep: 4}
jobs:
  demo-vm:
    schedule: default
YAML

# What the job reads (and any hooks) is the hypervisor's to say, in its
# own client.yaml: the server never sends a path or a command.
cat > "$work/client.yaml" <<YAML
jobs:
  demo-vm:
    source: {type: file, path: $work/disk.img}
YAML

"$bin/backy-server" --config "$work/server.yaml" 2> "$work/server.log" &
server_pid=$!
trap 'kill $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/server.log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log"; echo "server did not start" >&2; exit 1; }
export BACKY_SERVER=http://$addr
echo "== server listening on $addr, storing in $work/store"

echo "== a 1 GiB sparse disk with 96 MiB of data"
truncate -s 1G "$work/disk.img"
dd if=/dev/urandom of="$work/disk.img" bs=1M count=64 seek=10 conv=notrunc status=none
dd if=/dev/urandom of="$work/disk.img" bs=1M count=32 seek=700 conv=notrunc status=none
"$bin/backy-client" --config "$work/client.yaml" push demo-vm --force

echo "== change 3 scattered ranges, back up again"
dd if=/dev/urandom of="$work/disk.img" bs=4k count=3 seek=5000 conv=notrunc status=none
dd if=/dev/urandom of="$work/disk.img" bs=1k count=100 seek=300000 conv=notrunc status=none
dd if=/dev/urandom of="$work/disk.img" bs=1M count=1 seek=1000 conv=notrunc status=none
cp --sparse=always "$work/disk.img" "$work/disk-v2.img"
"$bin/backy-client" --config "$work/client.yaml" push demo-vm --force

echo "== status"
"$bin/backy-client" status demo-vm

echo "== restore the newest revision and compare"
"$bin/backy-client" restore demo-vm -r latest "$work/restored.img"
cmp "$work/disk-v2.img" "$work/restored.img"
echo "restored image is identical to the source ($(du -h "$work/restored.img" | cut -f1) allocated of $(du -h --apparent-size "$work/restored.img" | cut -f1))"
echo "== plain dd works too: dd if=$work/store/demo-vm/latest of=/dev/..."
cmp "$work/store/demo-vm/latest" "$work/disk-v2.img" && echo "store/demo-vm/latest is the image itself"
