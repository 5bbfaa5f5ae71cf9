#!/usr/bin/env bash
# Checks that vendor/str0m/src is str0m 0.25.0 as published on crates.io with
# balie.patch applied, and nothing else: fetches the crate (kept in
# ~/.cache/balie), checks its SHA-256 (the one Cargo.lock held before the
# patch), applies the patch and compares every file. Run by scripts/test.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

VERSION=0.25.0
SHA256=357c7e453c033c8bb59e912312f9f9ff07c2a9ce7268bcb94f0c828a5b47e58f
cache="${XDG_CACHE_HOME:-$HOME/.cache}/balie"
crate="$cache/str0m-$VERSION.crate"

if [ ! -e "$crate" ]; then
  mkdir -p "$cache"
  python3 - "$crate.part" <<EOF
import sys, urllib.request
urllib.request.urlretrieve("https://static.crates.io/crates/str0m/str0m-$VERSION.crate", sys.argv[1])
EOF
  mv "$crate.part" "$crate"
fi
echo "$SHA256  $crate" | sha256sum --check --quiet || {
  echo "vendor/str0m: $crate is not str0m $VERSION as published (SHA-256 differs); remove it to fetch it again" >&2
  exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -xzf "$crate" -C "$work"
upstream="$work/str0m-$VERSION"
(cd "$upstream" && patch -s -p1 --no-backup-if-mismatch < "$here/balie.patch")
if ! diff -r "$upstream/src" "$here/src" >"$work/diff"; then
  echo "vendor/str0m/src is not str0m $VERSION with balie.patch applied:" >&2
  head -50 "$work/diff" >&2
  echo "(after an intended change, regenerate balie.patch: see PATCH.md)" >&2
  exit 1
fi
cmp -s "$upstream/LICENSE-MIT.txt" "$here/LICENSE-MIT.txt" || {
  echo "vendor/str0m/LICENSE-MIT.txt differs from str0m $VERSION's" >&2
  exit 1
}
echo "vendor/str0m: str0m $VERSION + balie.patch, every file as expected"
