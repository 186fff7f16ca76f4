#!/usr/bin/env bash
# Installs and checks the Debian packages the tests, the package test and
# the bench smoke need (as root). On every run, whatever the machine has:
#
# 1. apt's lists are refreshed into a private state directory
#    (/var/lib/backy-test/apt), from the machine's own sources plus the
#    release's backports suite at the same archive address (read from the
#    machine's apt configuration; /etc/apt is never changed);
# 2. each package line's whole install set is resolved with
#    `apt-get install -s` against an empty dpkg status, as on a machine
#    that has none of it, so a broken dependency chain fails here on every
#    machine, with the line's packages and apt's reason;
# 3. what is missing is installed.
#
# A dpkg run that was interrupted is finished first (dpkg --configure -a),
# and apt waits up to 5 minutes for another apt or dpkg to release its lock.
#
# QEMU: qemu-utils, qemu-system-x86 and what they need from their own
# release (seabios, qemu-system-common/-data) all come from backports
# (10.0 on Debian 12); bookworm's qemu-system-x86 7.2 cannot sit beside
# backports' qemu-utils, and seabios from bookworm is too old for
# backports' QEMU.
#
# Usage: scripts/test-deps.sh [LINE...]   (lines: tests qemu packages bench;
# default all)
set -euo pipefail

fail() {
  echo "test-deps.sh: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root to install and check packages (apt-get)"

declare -A line_packages=(
  [tests]="btrfs-progs btrfs-compsize xfsprogs mount util-linux e2fsprogs bsdutils curl libnbd-bin ceph-mon ceph-osd ceph-common python3 python3-prometheus-client python3-cryptography chromium fonts-dejavu-core"
  [qemu]="qemu-utils qemu-block-extra qemu-system-x86 qemu-system-common qemu-system-data seabios"
  [packages]="man-db systemd adduser binutils"
  [bench]="rsync restic borgbackup"
)
lines=("$@")
((${#lines[@]})) || lines=(tests qemu packages bench)
for l in "${lines[@]}"; do
  [ -n "${line_packages[$l]:-}" ] || fail "no package line '$l' (lines: ${!line_packages[*]})"
done

# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || fail "/etc/os-release names no VERSION_CODENAME"
backports="$codename-backports"

# The archive that serves "$codename" on this machine, from its own apt
# configuration: deb822 stanzas (*.sources) or one-line entries.
archive_uri=
archive_key=
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  read -r archive_uri archive_key < <(awk -v suite="$codename" '
    function flush() {
      if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "")
        { split(uris, u, " "); print u[1], key; found = 1; exit }
      types = suites = uris = key = ""
    }
    /^[ \t]*$/ { flush(); next }
    /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
    /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
    /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
    /^Signed-By:/ { sub(/^Signed-By:[ \t]*/, ""); key = $0 }
    END { if (!found) flush() }' "$f") || true
  [ -n "$archive_uri" ] && break
done
if [ -z "$archive_uri" ]; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    archive_uri=$(awk -v suite="$codename" '
      $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit } }' "$f")
    [ -n "$archive_uri" ] && break
  done
fi
[ -n "$archive_uri" ] || fail "no apt source on this machine serves '$codename' (looked in /etc/apt/sources.list and sources.list.d)"

state=/var/lib/backy-test/apt
rm -rf "$state/parts"
mkdir -p "$state/parts" "$state/lists/partial"
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && cp "$f" "$state/parts/"
done
{
  echo "Types: deb"
  echo "URIs: $archive_uri"
  echo "Suites: $backports"
  echo "Components: main"
  [ -z "$archive_key" ] || echo "Signed-By: $archive_key"
} >"$state/parts/backy-test-backports.sources"
apt_opts=(-o "Dir::Etc::sourceparts=$state/parts" -o "Dir::State::lists=$state/lists"
  -o "Dir::Cache::pkgcache=$state/pkgcache.bin" -o "Dir::Cache::srcpkgcache=$state/srcpkgcache.bin" -o APT::Sandbox::User=root
  -o DPkg::Lock::Timeout=300)
export DEBIAN_FRONTEND=noninteractive

started=$SECONDS
# A dpkg run that was cut short (a killed install, a machine image taken in
# the middle of one) leaves its journal in /var/lib/dpkg/updates and
# packages half-configured, and apt then refuses every install until it is
# finished. Finish it first, as apt's message asks.
if compgen -G '/var/lib/dpkg/updates/[0-9]*' >/dev/null || [ -n "$(dpkg --audit 2>/dev/null)" ]; then
  echo "test-deps.sh: an interrupted dpkg run left packages unconfigured; finishing it (dpkg --configure -a)"
  # dpkg has no lock timeout of its own: another apt or dpkg holding the
  # lock is waited for up to 5 minutes, as apt does below.
  waited=0
  until out=$(dpkg --force-confdef --force-confold --configure -a 2>&1); do
    if ! grep -qi 'lock' <<<"$out" || ((waited >= 300)); then
      fail "dpkg --configure -a failed:
$(tail -n 20 <<<"$out")"
    fi
    sleep 2
    waited=$((waited + 2))
  done
  audit=$(dpkg --audit 2>&1) || true
  [ -z "$audit" ] || fail "packages still not configured after dpkg --configure -a:
$audit"
fi
if ! out=$(apt-get "${apt_opts[@]}" update -qq 2>&1) || grep -q '^[EW]:' <<<"$out"; then
  fail "apt-get update failed:
$out"
fi

# Package names of a line as apt is given them (QEMU's pinned to backports).
args_of() {
  local p
  for p in ${line_packages[$1]}; do
    if [ "$1" = qemu ]; then echo "$p/$backports"; else echo "$p"; fi
  done
}

for l in "${lines[@]}"; do
  mapfile -t args < <(args_of "$l")
  if ! out=$(apt-get "${apt_opts[@]}" -o Dir::State::status=/dev/null install -s \
    --no-install-recommends "${args[@]}" 2>&1); then
    fail "package line '$l' does not resolve on this machine's archives (${args[*]}):
$(grep -E '^(E:| )|Depends|Conflicts|Breaks' <<<"$out")"
  fi
done
echo "test-deps.sh: install sets resolve (${lines[*]}; $((SECONDS - started)) s)"

for l in "${lines[@]}"; do
  mapfile -t args < <(args_of "$l")
  missing=()
  if [ "$l" = qemu ]; then
    # Installed, and at the backports version: apt would change nothing.
    # Read whole: grep -q leaving early could SIGPIPE apt-get under pipefail.
    plan=$(apt-get "${apt_opts[@]}" install -s --no-install-recommends --allow-downgrades \
      "${args[@]}" 2>/dev/null) || true
    if grep -q '^Inst ' <<<"$plan"; then
      missing=("${args[@]}")
    fi
  else
    for p in "${args[@]}"; do
      [ "$(dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
    done
  fi
  ((${#missing[@]})) || continue
  echo "test-deps.sh: installing ${missing[*]}"
  if ! out=$(apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends --no-remove \
    --allow-downgrades "${missing[@]}" 2>&1); then
    fail "installing ${missing[*]} failed:
$(tail -n 20 <<<"$out")"
  fi
done
if [[ " ${lines[*]} " == *" qemu "* ]]; then
  qemu-system-x86_64 --version | head -n 1
  qemu-img --version | head -n 1
fi
echo "test-deps.sh: ready ($((SECONDS - started)) s)"
