#!/usr/bin/env bash
# Build balie-transcoder with the `cuda` feature here and gather it with
# every shared library it loads (FFmpeg, libvpx, libx264, glibc and the
# dynamic loader itself) into one folder, so it runs on a GPU node whatever
# that node's distribution: gpu-check.sh starts it through the bundled
# loader. The NVIDIA driver (libcuda, libnvcuvid, libnvidia-encode) and
# NVRTC are the node's own and are not bundled.
#
#   transcoder/gpu-bundle.sh [OUT]     (default: target/gpu-bundle, and OUT.tar.xz)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle}"
cargo build --release --locked -p balie-transcoder --features cuda
rm -rf "$out"
mkdir -p "$out/lib"
strip -o "$out/balie-transcoder" target/release/balie-transcoder
cp transcoder/gpu-check.sh "$out/"
# Libraries FFmpeg opens itself at run time are the driver's; everything
# linked is copied, the loader included.
ldd target/release/balie-transcoder | awk '/=> \//{print $3} /^\s*\/lib.*ld-linux/{print $1}' |
  sort -u | while read -r lib; do cp -L "$lib" "$out/lib/"; done
# One archive, small enough to carry to a GPU machine (about 45 MB).
tar -C "$(dirname "$out")" -cJf "$out.tar.xz" "$(basename "$out")"
echo "bundle: $out.tar.xz ($(du -h "$out.tar.xz" | cut -f1))"
echo "on the GPU node: tar xJf $(basename "$out").tar.xz && ./$(basename "$out")/gpu-check.sh"
