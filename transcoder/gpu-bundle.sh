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
# The captions check: Whisper's tokenizer (the check makes a model of base's
# shapes with random weights there: the real weights, 145 MB, do not fit the
# bundle) and speech to stream (two LibriVox readings, Debian's
# pocketsphinx-testdata, one after the other).
target/release/balie-transcoder models fetch >/dev/null
cp "${BALIE_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/balie/models}/whisper-base/tokenizer.json" "$out/"
librivox=/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb
ffmpeg -loglevel error -y -i "$librivox-0870.wav" -i "$librivox-0920.wav" \
  -filter_complex '[0:a]apad=pad_dur=2[a];[a][1:a]concat=n=2:v=0:a=1,apad=pad_dur=2' \
  -ar 16000 -ac 1 "$out/speech.wav"
# Libraries FFmpeg opens itself at run time are the driver's; everything
# linked is copied, the loader included.
ldd target/release/balie-transcoder | awk '/=> \//{print $3} /^[[:space:]]*\/lib.*ld-linux/{print $1}' |
  sort -u | while read -r lib; do cp -L "$lib" "$out/lib/"; done
# One archive, small enough to carry to a GPU machine (about 56 MB; 64 MiB may go).
tar -C "$(dirname "$out")" -cJf "$out.tar.xz" "$(basename "$out")"
echo "bundle: $out.tar.xz ($(du -h "$out.tar.xz" | cut -f1))"
echo "on the GPU node: tar xJf $(basename "$out").tar.xz && ./$(basename "$out")/gpu-check.sh"
