#!/usr/bin/env bash
# The Debian packages as an operator gets them. Builds them
# (scripts/package.sh), installs both with dpkg (twice: the upgrade path of
# the maintainer scripts too), checks the user, /etc/backy, the installed
# units (systemd-analyze verify), the docs, man pages (man -l; section 5
# for the config files) and completions, then
# runs the INSTALLED binaries from the shipped example configs, adjusted:
# paths into a temp dir, a free loopback port with plaintext (as the
# example allows), a fresh token for hv01. The server runs as user backy
# reading its config 0640 root:backy, as the unit does; a sample image is
# pushed, restored and compared; SIGTERM must end the server with exit 0.
# Purges the packages at the end (and the user, if it made it).
# Needs root. Usage: scripts/test-packages.sh   (scripts/test.sh runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "test-packages.sh: FAILED: $*" >&2
  exit 1
}
step() { echo "== packages: $*"; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i, a server running as user backy)"
# Written before the install, removed after the purge: packages found
# installed while it exists are this test's own, left by a run that was
# killed (or a machine image taken in the middle of one), and are purged.
marker=/var/lib/backy-test/packages-installed
if [ -e "$marker" ]; then
  echo "test-packages.sh: purging the packages a killed run of this test left installed"
  if [[ "$(dpkg-query -W -f '${Status}' backy-server backy-client 2>/dev/null)" == *installed* ]]; then
    dpkg --purge backy-client backy-server >/dev/null || fail "purging the leftover packages failed"
  fi
  # shellcheck disable=SC1090
  . "$marker"
  if [ "${had_user:-true}" = false ] && getent passwd backy >/dev/null; then
    deluser --system --quiet backy >/dev/null 2>&1 || true
    delgroup --system --quiet backy >/dev/null 2>&1 || true
  fi
  rm -f "$marker"
fi
# Installed without the marker (runs before it existed): purged only when
# that loses nothing, no configuration in /etc/backy and no store in
# /var/lib/backy; anything else may be an operator's and is refused.
holds_nothing() {
  [ -z "$(ls -A /etc/backy 2>/dev/null)" ] && [ -z "$(ls -A /var/lib/backy 2>/dev/null)" ]
}
for p in backy-server backy-client; do
  if [[ "$(dpkg-query -W -f '${Status}' "$p" 2>/dev/null)" == *installed* ]]; then
    holds_nothing || fail "$p is installed on this machine with configuration or data (/etc/backy, /var/lib/backy); this test installs and purges it, so remove it first"
    echo "test-packages.sh: purging $p, installed here without configuration or data"
    dpkg --purge "$p" >/dev/null || fail "purging $p failed"
  fi
done

command -v man >/dev/null && command -v systemd-analyze >/dev/null && command -v adduser >/dev/null &&
  command -v strip >/dev/null || scripts/test-deps.sh packages

step "building (scripts/package.sh --fast)"
started=$SECONDS
# Lighter compression: these packages are only installed here.
debs=$(scripts/package.sh --fast)
server_deb=$(grep '/backy-server_[^/]*\.deb$' <<<"$debs") || fail "no backy-server .deb in: $debs"
client_deb=$(grep '/backy-client_[^/]*\.deb$' <<<"$debs") || fail "no backy-client .deb in: $debs"
echo "$server_deb"
echo "$client_deb"
echo "built in $((SECONDS - started)) s"

had_user=false
getent passwd backy >/dev/null && had_user=true
had_etc=false
[ -e /etc/backy ] && had_etc=true
tmp=$(mktemp -d /tmp/backy-pkgtest.XXXXXX)
server_pid=
cleanup() {
  local status=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  if [[ "$(dpkg-query -W -f '${Status}' backy-server backy-client 2>/dev/null)" == *installed* ]]; then
    dpkg --purge backy-client backy-server >/dev/null || echo "test-packages.sh: purging the packages failed" >&2
  fi
  if ! $had_user && getent passwd backy >/dev/null; then
    deluser --system --quiet backy >/dev/null 2>&1 || true
    delgroup --system --quiet backy >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  if [[ "$(dpkg-query -W -f '${Status}' backy-server backy-client 2>/dev/null)" != *installed* ]]; then
    rm -f "$marker"
  fi
  exit "$status"
}
trap cleanup EXIT

step "stripped binaries, debug info in -dbgsym packages"
for pkg in backy-server backy-client; do
  dbg=$(grep "/${pkg}-dbgsym_[^/]*\.ddeb$" <<<"$debs") || fail "no $pkg-dbgsym package in: $debs"
  # The listing is read whole: with pipefail, grep -q leaving early would
  # kill dpkg-deb's tar with SIGPIPE and fail a good package.
  listing=$(dpkg-deb -c "$dbg") || fail "dpkg-deb cannot list $dbg"
  grep -q '/usr/lib/debug/' <<<"$listing" || fail "$dbg holds no debug file"
done
ls -l $debs | awk '{ printf "%10d  %s\n", $5, $NF }'

mkdir -p "$(dirname "$marker")"
echo "had_user=$had_user" >"$marker"
sync "$marker"
step "dpkg -i (twice: install, then the upgrade path)"
# Some container images exclude man pages from installation; these are
# under test.
include=(--path-include='/usr/share/man/man1/backy-*' --path-include='/usr/share/man/man5/backy-*'
  --path-include='/usr/share/doc/backy-*')
dpkg "${include[@]}" -i "$server_deb" "$client_deb" >/dev/null
dpkg "${include[@]}" -i "$server_deb" "$client_deb" >/dev/null

for bin in /usr/bin/backy-server /usr/bin/backy-client; do
  # .debug_gdb_scripts is a loaded section rustc always emits, not debug info.
  sections=$(readelf -S --wide "$bin" | grep -cE ' \.debug_(info|line|str|abbrev|ranges|rnglists|loc|loclists|aranges|frame)' || true)
  [ "$sections" = 0 ] || fail "$bin carries $sections debug sections: not stripped"
  echo "$bin: $(stat -c %s "$bin") bytes, stripped"
done

step "user backy and /etc/backy"
getent passwd backy >/dev/null || fail "no user backy after installing backy-server"
uid=$(id -u backy)
[ "$uid" -lt 1000 ] || fail "user backy is not a system user (uid $uid)"
shell=$(getent passwd backy | cut -d: -f7)
[ "$shell" = /usr/sbin/nologin ] || fail "user backy has the shell $shell"
etc_mode=$(stat -c '%a %U:%G' /etc/backy)
[ "$etc_mode" = "750 root:backy" ] || fail "/etc/backy is $etc_mode, want 750 root:backy"

step "files"
for f in /usr/bin/backy-server /usr/bin/backy-client \
  /usr/share/doc/backy-server/examples/server.yaml /usr/share/doc/backy-client/examples/client.yaml \
  /usr/share/doc/backy-server/README.md /usr/share/doc/backy-client/README.md \
  /usr/share/doc/backy-server/docs/json.md /usr/share/doc/backy-client/docs/json.md \
  /usr/share/doc/backy-server/docs/DESIGN.md /usr/share/doc/backy-client/docs/DESIGN.md \
  /usr/share/zsh/vendor-completions/_backy-server /usr/share/zsh/vendor-completions/_backy-client \
  /usr/share/fish/vendor_completions.d/backy-server.fish /usr/share/fish/vendor_completions.d/backy-client.fish; do
  [ -s "$f" ] || fail "$f is missing or empty"
done
# What --help points at is installed there; README's links to docs/ resolve.
json=$(/usr/bin/backy-client --help | grep -o '/usr/share/doc/[^ ,;)]*json.md') ||
  fail "backy-client --help names no installed json.md"
[ -s "$json" ] || fail "backy-client --help points at $json, which is not installed"
for pkg in backy-server backy-client; do
  for link in $(grep -o '](docs/[^)]*)' "/usr/share/doc/$pkg/README.md" | sed 's/^](\(.*\))$/\1/' | sort -u); do
    [ -s "/usr/share/doc/$pkg/$link" ] || fail "$pkg's README links $link, which is not installed"
  done
done

step "systemd-analyze verify on the installed units"
units=(backy-server.service backy-agent.service backy-push@.service backy-push@.timer)
for u in "${units[@]}"; do
  path=/usr/lib/systemd/system/$u
  [ -f "$path" ] || fail "$path is not installed"
  # Any output is a finding (an unknown directive is only a warning).
  if ! out=$(systemd-analyze verify --man=no "$path" 2>&1) || [ -n "$out" ]; then
    fail "systemd-analyze verify $path: $out"
  fi
done
echo "${units[*]}: verified"

step "man pages"
pages=(/usr/share/man/man1/backy-server*.1.gz /usr/share/man/man1/backy-client*.1.gz)
[ "${#pages[@]}" -ge 10 ] || fail "only ${#pages[@]} man pages installed: ${pages[*]}"
for page in "${pages[@]}"; do
  name=$(basename "$page" .1.gz)
  text=$(MANWIDTH=80 man -l "$page" 2>"$tmp/man.err") || fail "man -l $page: $(cat "$tmp/man.err")"
  [ ! -s "$tmp/man.err" ] || fail "man -l $page warned: $(cat "$tmp/man.err")"
  grep -q "^NAME" <<<"$text" || fail "man -l $page has no NAME section"
  # Found by name as well, as `man backy-client-push` would.
  [ "$(man -w "$name")" = "$page" ] || fail "man -w $name does not find $page"
done
echo "${#pages[@]} pages render"
# The configuration files' pages, from the key reference the examples are
# checked against (common/tests/examples.rs): each key an example gives a
# plain value (not a mapping: those are names chosen) is on the page.
for pkg in backy-server backy-client; do
  page=/usr/share/man/man5/$pkg.yaml.5.gz
  [ -s "$page" ] || fail "$page is not installed"
  text=$(MANWIDTH=200 man --warnings -l "$page" 2>"$tmp/man.err") || fail "man -l $page: $(cat "$tmp/man.err")"
  [ ! -s "$tmp/man.err" ] || fail "man -l $page warned: $(cat "$tmp/man.err")"
  grep -q "^KEYS" <<<"$text" || fail "man -l $page has no KEYS section"
  [ "$(man -w 5 "$pkg.yaml")" = "$page" ] || fail "man -w 5 $pkg.yaml does not find $page"
  example=/usr/share/doc/$pkg/examples/${pkg#backy-}.yaml
  keys=$(sed -n 's/^ *\([a-z][a-z-]*\): *[^ {#].*/\1/p' "$example" | sort -u)
  [ "$(wc -l <<<"$keys")" -ge 10 ] || fail "only these keys found in $example: $keys"
  for k in $keys; do
    grep -qE "(^|[ .])$k \(" <<<"$text" || fail "man 5 $pkg.yaml lacks the example's key $k"
  done
done
echo "backy-server.yaml(5) and backy-client.yaml(5) render and name every key of the examples"

step "shell completions"
for bin in backy-server backy-client; do
  out=$(bash -c "source /usr/share/bash-completion/completions/$bin && complete -p $bin") ||
    fail "bash: sourcing the completion of $bin"
  fn=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$out")
  [ -n "$fn" ] || fail "bash: no completion function for $bin: $out"
  # The function offers subcommands: `backy-server che<TAB>`, `backy-client pu<TAB>`.
  case $bin in backy-server) word=che want=check-config ;; *) word=pu want=push ;; esac
  offered=$(bash -c "source /usr/share/bash-completion/completions/$bin
    COMP_WORDS=($bin $word); COMP_CWORD=1; $fn $bin $word $bin; echo \"\${COMPREPLY[*]}\"")
  [ "$offered" = "$want" ] || fail "bash: $bin $word<TAB> offers '$offered', not $want"
done
command -v zsh >/dev/null && for bin in backy-server backy-client; do
  zsh -n "/usr/share/zsh/vendor-completions/_$bin" || fail "zsh -n _$bin"
done
command -v fish >/dev/null && for bin in backy-server backy-client; do
  fish --no-execute "/usr/share/fish/vendor_completions.d/$bin.fish" || fail "fish -n $bin.fish"
done
echo "bash completes; zsh and fish checked where installed"

step "the installed server from the example config, as user backy"
chmod 0755 "$tmp"
etc=$tmp/etc
install -d -m 0750 -o root -g backy "$etc"
install -d -m 0750 -o backy -g backy "$tmp/store"
hash=$(/usr/bin/backy-server hash-token --generate "$etc/hv01.token")
# The example as an operator adapts it for one host: loopback plaintext
# instead of tls (and so no certificate identity, nor its job), hv01's real
# token hash, a store and port of this test. The rest is as shipped.
sed -e "s|^listen: .*|listen: 127.0.0.1:0|" \
  -e "s|^base-dir: .*|base-dir: $tmp/store|" \
  -e "s|^# insecure-plaintext: true$|insecure-plaintext: true|" \
  -e "s|blake3:1\{64\}|$hash|" \
  -e "/cert-fingerprint:/d" -e "/client: hv02/d" \
  /usr/share/doc/backy-server/examples/server.yaml |
  awk '/^tls:/ { skip = 1; next } skip && /^ / { next } { skip = 0; print }' >"$etc/server.yaml"
grep -q "$hash" "$etc/server.yaml" || fail "hv01's placeholder hash is no longer in the example"
grep -q "^insecure-plaintext: true" "$etc/server.yaml" || fail "the example no longer offers insecure-plaintext"
# As README says: readable by the server through secrets-group backy.
chown root:backy "$etc/server.yaml"
chmod 0640 "$etc/server.yaml"
as_backy=(setpriv --reuid=backy --regid=backy --init-groups)
"${as_backy[@]}" /usr/bin/backy-server --config "$etc/server.yaml" check-config ||
  fail "check-config of the adapted example: $(cat "$etc/server.yaml")"
# setpriv execs: $! is the server. Packaged binaries have no fault
# injection: a test build would announce protocol 0 here, and every client
# command below would fail.
BACKY_FAULT=mode:protocol-0 "${as_backy[@]}" /usr/bin/backy-server --config "$etc/server.yaml" 2>"$tmp/server.log" &
server_pid=$!
addr=
for _ in $(seq 300); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$tmp/server.log")
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited: $(cat "$tmp/server.log")"
  sleep 0.1
done
[ -n "$addr" ] || fail "the server did not listen within 30 s: $(cat "$tmp/server.log")"
echo "listening on $addr"

step "push, restore, compare with the installed client"
sed -e "s|^server: .*|server: http://$addr|" \
  -e "s|^token-file: .*|token-file: $etc/hv01.token|" \
  -e "/^ca:/d" -e "/^tls-server-name:/d" -e "/^cert:/d" -e "/^key:/d" \
  -e "s|/var/lib/libvirt/images/vm2.raw|$tmp/vm2.raw|" \
  -e "s|/etc/backy/keys/vm2.key|$tmp/vm2.key|" \
  /usr/share/doc/backy-client/examples/client.yaml >"$etc/client.yaml"
grep -q "$tmp/vm2.raw" "$etc/client.yaml" || fail "the client example no longer has job vm2's image file"
# The example encrypts vm2: its key is made as an operator would.
grep -q "key-file: $tmp/vm2.key" "$etc/client.yaml" || fail "the client example no longer encrypts job vm2"
/usr/bin/backy-client keygen "$tmp/vm2.key" >/dev/null || fail "keygen"
chmod 0600 "$etc/client.yaml"
truncate -s 64M "$tmp/vm2.raw"
dd if=/dev/urandom of="$tmp/vm2.raw" bs=1M count=3 seek=5 conv=notrunc status=none
dd if=/dev/urandom of="$tmp/vm2.raw" bs=4k count=5 seek=10000 conv=notrunc status=none
client=(/usr/bin/backy-client --config "$etc/client.yaml")
# A test build would abort at this crash point once the server replied.
BACKY_FAULT=client.replied "${client[@]}" push vm2 --force || fail "push vm2: $(tail -20 "$tmp/server.log")"
! grep -q BACKY_FAULT "$tmp/server.log" || fail "the installed server acted on BACKY_FAULT: $(grep BACKY_FAULT "$tmp/server.log")"
"${client[@]}" status vm2
"${client[@]}" restore vm2 "$tmp/restored.raw" || fail "restore vm2: $(tail -20 "$tmp/server.log")"
cmp "$tmp/vm2.raw" "$tmp/restored.raw" || fail "the restored image differs from the source"
stored=$(readlink -f "$tmp/store/vm2/latest")
owner=$(stat -c '%a %U' "$stored")
[ "$owner" = "600 backy" ] || fail "the stored revision is $owner, want 600 backy"
! cmp -s "$tmp/vm2.raw" "$stored" || fail "the encrypted job's revision is stored in the clear"
/usr/bin/backy-client decrypt --key-file "$tmp/vm2.key" "$stored" "$tmp/decrypted.raw" || fail "decrypt"
cmp "$tmp/vm2.raw" "$tmp/decrypted.raw" || fail "the decrypted revision differs from the source"
echo "restored image is identical; the revision is stored 0600 by backy, encrypted, and decrypts offline"

step "SIGTERM"
kill -TERM "$server_pid"
for _ in $(seq 300); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$server_pid" 2>/dev/null && fail "the server still runs 30 s after SIGTERM"
rc=0
wait "$server_pid" || rc=$?
server_pid=
[ "$rc" = 0 ] || fail "the server exited $rc on SIGTERM: $(tail -20 "$tmp/server.log")"
grep -q "stopped" "$tmp/server.log" || fail "the server did not log stopped"
echo "exit 0"

step "dpkg --purge"
dpkg --purge backy-client backy-server >/dev/null
for f in /usr/bin/backy-server /usr/bin/backy-client /usr/lib/systemd/system/backy-server.service; do
  [ ! -e "$f" ] || fail "$f is still there after purging"
done
if ! $had_etc && [ -e /etc/backy ]; then
  fail "/etc/backy is still there after purging (it was empty)"
fi
echo "test-packages.sh: OK ($((SECONDS - started)) s)"
