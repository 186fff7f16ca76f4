#!/usr/bin/env bash
# Builds the Debian packages backy-server and backy-client: the release
# binaries (cargo build is a no-op when they are up to date), their man
# pages and shell completions (target/assets, from the binaries' own
# `generate-assets`), then `cargo deb --no-build --dbgsym` for each
# (stripped binaries; debug info in PKG-dbgsym .ddeb packages); installs
# cargo-deb first when it is missing. Prints the paths of what it wrote.
# Usage: scripts/package.sh [CARGO-DEB OPTIONS]   (e.g. --fast: lighter
# compression, 9 s instead of 40 s a package; scripts/test-packages.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned, so a new cargo-deb release cannot change the packages (or need a
# newer Rust) unannounced.
cargo_deb_version=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
  echo "package.sh: installing cargo-deb $cargo_deb_version (cargo install --locked)" >&2
  cargo install cargo-deb --locked --version "$cargo_deb_version" --quiet
fi

# As scripts/test.sh builds, but without its fault-injection feature: only
# backy-common and the crates above it are rebuilt, and the packaged
# binaries ignore BACKY_FAULT.
cargo build --release --workspace --bins --examples --quiet
target=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# Where the [package.metadata.deb] assets of server/ and client/ look.
rm -rf target/assets
mkdir -p target/assets
for bin in backy-server backy-client; do
  "$target/release/$bin" generate-assets --out target/assets >/dev/null
done

for pkg in backy-server backy-client; do
  # Stripped binaries in the package; their debug info (line tables, for
  # backtraces) in a separate PKG-dbgsym .ddeb beside it. cargo deb prints
  # the paths of what it wrote on stdout.
  debs=$(cargo deb -p "$pkg" --no-build --quiet --dbgsym "$@")
  for deb in $debs; do
    [ -f "$deb" ] || { echo "package.sh: cargo deb -p $pkg wrote no package (got: $debs)" >&2; exit 1; }
    echo "$deb"
  done
  grep -q "/${pkg}_[^/]*\.deb$" <<<"$debs" || { echo "package.sh: no $pkg .deb in: $debs" >&2; exit 1; }
done
