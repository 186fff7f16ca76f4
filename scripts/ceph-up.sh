#!/usr/bin/env bash
# Starts a throw-away one-node Ceph cluster for the tests: one mon, one
# OSD (memstore, or bluestore on a sparse file), pool "rbd", everything
# under DIR, listening on 127.0.0.1 only. Prints the ceph.conf path on success. Stop it with ceph-down.sh DIR.
#
# Usage: scripts/ceph-up.sh DIR [MON_PORT]   (MON_PORT: msgr2 port, v1 = +1)
# Env: BACKY_CEPH_OBJECTSTORE (memstore, the default, or bluestore: on a
#      sparse file DIR/osd.0/block, as the benchmark measures the pool),
#      BACKY_CEPH_STORE_BYTES (the store's capacity, default 4G),
#      BACKY_CEPH_TIMEOUT (seconds for the whole start, default 90).
set -euo pipefail
trap 'fail "line $LINENO failed: $BASH_COMMAND"' ERR

dir=${1:?usage: ceph-up.sh DIR [MON_PORT]}
port=${2:-3300}
v1port=$((port + 1))
store_bytes=${BACKY_CEPH_STORE_BYTES:-4G}
objectstore=${BACKY_CEPH_OBJECTSTORE:-memstore}
case $objectstore in
  memstore) store_conf="memstore device bytes = $store_bytes" ;;
  # The block file is created sparse by mkfs; the small RocksDB cache
  # keeps the OSD within the test machine's memory.
  bluestore) store_conf="bluestore block create = true
bluestore block size = $(numfmt --from=iec "$store_bytes")
bluestore cache autotune = false
bluestore cache size = 536870912" ;;
  *) echo "ceph-up: BACKY_CEPH_OBJECTSTORE must be memstore or bluestore, not '$objectstore'" >&2; exit 1 ;;
esac
deadline=$(($(date +%s) + ${BACKY_CEPH_TIMEOUT:-90}))
conf=$dir/ceph.conf
export CEPH_CONF=$conf

fail() {
  echo "ceph-up: $*" >&2
  for f in "$dir"/log/*.log "$dir"/log/*.out; do
    [ -s "$f" ] && { echo "--- $f" >&2; tail -n 10 "$f" >&2; }
  done
  "$(dirname "$0")/ceph-down.sh" "$dir" >/dev/null 2>&1 || true
  exit 1
}

# Retries a command until it succeeds, a daemon dies or time runs out.
retry() {
  local what=$1; shift
  until timeout 10 "$@" >/dev/null 2>&1; do
    for pidfile in "$dir"/pids/*; do
      [ -d "/proc/$(cat "$pidfile")" ] || fail "$(basename "$pidfile") died while waiting for $what"
    done
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for $what"
    sleep 0.2
  done
}

for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install ceph-mon ceph-osd ceph-common)"
done
for p in "$port" "$v1port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then fail "127.0.0.1:$p is in use"; fi
done
# `ceph-mon --mkfs` silently does nothing in a non-empty directory.
[ ! -e "$dir" ] || [ -z "$(ls -A "$dir")" ] || fail "$dir exists and is not empty"
mkdir -p "$dir"/{log,run,pids,mon.a,osd.0}

fsid=$(cat /proc/sys/kernel/random/uuid)
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$v1port]
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/\$name.keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = false
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.05
paxos min wait = 0.01
osd objectstore = $objectstore
$store_conf
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2
mon data = $dir/mon.\$id
osd data = $dir/osd.\$id
CONF

ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$v1port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.a.keyring" \
  >"$dir/log/mkfs.out" 2>&1 || fail "ceph-mon --mkfs failed"

# Daemons run in the foreground of their own session; their pids are the
# only thing ceph-down.sh stops.
setsid ceph-mon -f -c "$conf" -i a >"$dir/log/mon.out" 2>&1 </dev/null &
echo $! >"$dir/pids/mon.a"
retry "the monitor" ceph --connect-timeout 5 mon stat

osd_uuid=$(cat /proc/sys/kernel/random/uuid)
osd_key=$(ceph-authtool --gen-print-key)
printf '{"cephx_secret": "%s"}' "$osd_key" >"$dir/osd.0/new.json"
osd_id=$(timeout 30 ceph --connect-timeout 10 osd new "$osd_uuid" -i "$dir/osd.0/new.json")
rm -f "$dir/osd.0/new.json"
[ "$osd_id" = 0 ] || fail "expected osd id 0, got $osd_id"
# `ceph-osd --mkfs --key` does not write the keyring itself.
printf '[osd.0]\n\tkey = %s\n' "$osd_key" >"$dir/osd.0.keyring"
timeout 60 ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/mkfs.out" 2>&1 \
  || fail "ceph-osd --mkfs failed"
setsid ceph-osd -f -c "$conf" -i 0 >"$dir/log/osd.out" 2>&1 </dev/null &
echo $! >"$dir/pids/osd.0"
retry "the OSD" sh -c 'ceph --connect-timeout 5 osd stat -f json | grep -q "\"num_up_osds\":1,"'

timeout 30 ceph --connect-timeout 10 osd pool create rbd 8 8 >/dev/null 2>&1 || fail "pool create failed"
retry "pool rbd" rbd pool init rbd
echo "$conf"
