#!/usr/bin/env bash
# The GPU check of balie-transcoder's `cuda` backend, for a node with one
# NVIDIA GPU (made for an H200; under 8 minutes). Run it from the folder
# transcoder/gpu-bundle.sh made:
#
#   ./gpu-check.sh [SECONDS]      (seconds of clip per measurement, default 5)
#
# It prints what the card offers, then a table: NVDEC decode frames per
# second, GPU scaling time per frame, end-to-end layer frames per second,
# and transcode sessions held in real time, each beside the CPU backend in
# the same run, at 1080p and 720p, H.264 and VP8.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
seconds="${1:-5}"
echo "== node"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,encoder.stats.sessionCount --format=csv 2>/dev/null ||
  echo "nvidia-smi not found"
nproc
# NVRTC comes with the CUDA toolkit or its pip wheels; put what is there on
# the search path after the bundle (the driver's libcuda is in the system's).
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         /usr/lib/x86_64-linux-gnu \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && ls "$d"/libnvrtc.so* >/dev/null 2>&1 && extra="$extra:$d"
done
echo "NVRTC from: ${extra#:}"
loader="$(ls "$here"/lib/ld-linux-x86-64.so.* 2>/dev/null | head -1)"
libs="$here/lib$extra"
echo "== gpu-check (a table at the end)"
if [ -n "$loader" ]; then
  # The bundled loader and glibc: whatever the node's distribution.
  timeout 460 "$loader" --library-path "$libs" "$here/balie-transcoder" \
    gpu-check --seconds "$seconds" --max 64
else
  LD_LIBRARY_PATH="$libs" timeout 460 "$here/balie-transcoder" \
    gpu-check --seconds "$seconds" --max 64
fi
echo "rc=$?"
