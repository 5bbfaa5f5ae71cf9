#!/usr/bin/env bash
# The GPU check of balie-transcoder's `cuda` backend, for a node with one
# NVIDIA GPU (made for an H200; under 8 minutes). Run it from the folder
# transcoder/gpu-bundle.sh made:
#
#   ./gpu-check.sh [SECONDS] [WHICH]   (seconds of clip per measurement,
#                                      default 4; WHICH: transcoding,
#                                      captions or all, the default)
#   DMON_DIR=DIR ./gpu-check.sh        (the card's utilisation logs go to DIR)
#
# It prints what the card offers, then a table: NVDEC decode frames per
# second, GPU scaling time per frame, end-to-end layer frames per second,
# and transcode sessions held in real time, each beside the CPU backend in
# the same run, at 1080p and 720p, H.264 and VP8, with NVDEC run each of
# the three ways (a context per decoder, one shared context, one shared
# context with pictures kept in GPU memory). Then the captions check:
# Whisper on the GPU against the CPU on the same weights (base's shapes,
# random weights: logits, tokens, timings) and live caption streams held
# on the GPU (end of speech to final within 1.5 s at p95).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The card's utilisation while a check runs (nvidia-smi dmon, once a
# second): SM, NVDEC and NVENC busy, in %. Each sample is kept in
# $DMON_DIR/dmon-<check>.log (default: this folder); a summary follows the
# check: which engine ran out first where sessions stopped keeping up.
# `gpu-check.sh --dmon-summary FILE` prints the summary of a kept log, and
# `gpu-check.sh --step-summary STEPS DMON SECONDS` each session-search
# step's share (the steps' lines are kept in $DMON_DIR/steps-<check>.log).
dmon_dir="${DMON_DIR:-$here}"
mkdir -p "$dmon_dir"
watch() {
  dmon_log="$dmon_dir/dmon-$1.log"
  dmon_pid=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    # UTC, as the check's step lines.
    TZ=UTC nvidia-smi dmon -s u -o T >"$dmon_log" 2>&1 &
    dmon_pid=$!
  fi
}
watched() {
  [ -n "$dmon_pid" ] || { echo "utilisation: nvidia-smi not found"; return; }
  kill "$dmon_pid" 2>/dev/null
  wait "$dmon_pid" 2>/dev/null
  dmon_summary "$dmon_log"
}
# Mean and peak of each utilisation column over the samples of one log.
dmon_summary() {
  awk '
    /^#/ && !names { h = $0; sub(/^#/, "", h); names = split(h, col, " "); next }
    /^#/ { next }
    names && NF == names {
      n++
      for (i = 1; i <= NF; i++) {
        c = col[i]
        if ((c == "sm" || c == "enc" || c == "dec") && $i ~ /^[0-9]+$/) {
          sum[c] += $i; if ($i > max[c]) max[c] = $i; seen[c] = 1
        }
      }
    }
    END {
      if (!n) { print "utilisation: no samples"; exit }
      line = "utilisation over " n " s (mean / peak %):"
      split("sm dec enc", order, " ")
      for (k = 1; k <= 3; k++) {
        c = order[k]
        line = line " " c " " (seen[c] ? sprintf("%.0f / %d", sum[c] / n, max[c]) : "-")
      }
      print line
    }' "$1"
}
# Each session-search step's utilisation: the step lines of the check
# ("[12 s, 19:02:04 UTC] H.264 cuda, ...: 6 sessions, ...") against the
# dmon samples of the step's last SECONDS seconds (the step ran for about
# that long and its line came at its end). One line a step: its clock,
# backend and sessions, then mean SM, NVDEC and NVENC busy, in %.
step_summary() {
  awk -v secs="$3" '
    function tosec(hms,   p) { split(hms, p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    FNR == NR {
      if ($0 ~ /^#/) {
        if (!names) {
          h = $0; sub(/^#/, "", h); names = split(h, col, " ")
          for (i = 1; i <= names; i++) if (col[i] == "Time") tcol = i
        }
        next
      }
      if (names && tcol && NF == names) {
        t = tosec($tcol)
        for (i = 1; i <= NF; i++) {
          c = col[i]
          if ((c == "sm" || c == "dec" || c == "enc") && $i ~ /^[0-9]+$/) { v[t, c] += $i; n[t, c]++ }
        }
      }
      next
    }
    match($0, /^\[[0-9]+ s, [0-9:]+ UTC\] /) {
      stamp = substr($0, 2, RLENGTH - 3); sub(/^[0-9]+ s, /, "", stamp); sub(/ UTC$/, "", stamp)
      what = substr($0, RLENGTH + 1); sub(/ sessions,.*/, " sessions", what)
      end = tosec(stamp)
      line = stamp " " what ":"
      split("sm dec enc", order, " ")
      for (k = 1; k <= 3; k++) {
        c = order[k]; sum = 0; cnt = 0
        for (t = end - secs + 1; t <= end; t++) if (n[t, c]) { sum += v[t, c] / n[t, c]; cnt++ }
        line = line " " c " " (cnt ? sprintf("%.0f", sum / cnt) : "-")
      }
      print line
    }' "$2" "$1"
}
if [ "${1:-}" = "--step-summary" ]; then
  step_summary "${2:?usage: gpu-check.sh --step-summary STEPS DMON SECONDS}" "${3:?DMON log}" "${4:?SECONDS}"
  exit
fi
if [ "${1:-}" = "--dmon-summary" ]; then
  dmon_summary "${2:?usage: gpu-check.sh --dmon-summary DMON_LOG}"
  exit
fi
seconds="${1:-4}"
which="${2:-all}"
case "$which" in
  transcoding|captions|all) ;;
  *) echo "usage: gpu-check.sh [SECONDS] [transcoding|captions|all]" >&2; exit 2 ;;
esac
echo "== node"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,encoder.stats.sessionCount --format=csv 2>/dev/null ||
  echo "nvidia-smi not found"
nproc
# NVRTC and cuBLAS come with the CUDA toolkit or its pip wheels (PyTorch
# brings them); put what is there on the search path after the bundle (the
# driver's libcuda is in the system's).
extra=""
# The driver's own folder: the bundled loader ignores LD_LIBRARY_PATH
# (--library-path replaces it), so the node's is added here.
node_path="${LD_LIBRARY_PATH:-}"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib ${node_path//:/ }; do
  [ -e "$d/libcuda.so.1" ] && extra="$extra:$d"
done
echo "driver libraries: $(ls ${extra//:/ } 2>/dev/null | grep -E '^lib(cuda|nvcuvid|nvidia-encode)\.so' | tr '\n' ' ')"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         /usr/lib/x86_64-linux-gnu \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && { ls "$d"/libnvrtc.so* || ls "$d"/libcublas.so*; } >/dev/null 2>&1 && extra="$extra:$d"
done
echo "NVRTC and cuBLAS from: ${extra#:}"
# cudarc (built against CUDA 12) opens libnvrtc.so, libcublas.so or their
# .12 names; a CUDA 13 node's wheels hold only .13: unversioned links to
# whatever was found.
links="$here/cuda-links"
mkdir -p "$links"
for d in ${extra//:/ }; do
  for f in "$d"/libnvrtc.so.* "$d"/libcublas.so.* "$d"/libcublasLt.so.*; do
    [ -e "$f" ] || continue
    name="$(basename "$f" | sed 's/\.so\..*/.so/')"
    [ -e "$links/$name" ] || ln -s "$f" "$links/$name"
  done
done
loader="$(ls "$here"/lib/ld-linux-x86-64.so.* 2>/dev/null | head -1)"
libs="$here/lib:$links$extra"
run() {
  local limit="$1"; shift
  if [ -n "$loader" ]; then
    # The bundled loader and glibc: whatever the node's distribution.
    timeout "$limit" "$loader" --library-path "$libs" "$here/balie-transcoder" "$@"
  else
    timeout "$limit" env LD_LIBRARY_PATH="$libs" "$here/balie-transcoder" "$@"
  fi
  echo "rc=$?"
}
if [ "$which" != captions ]; then
  echo "== gpu-check: transcoding (a table at the end)"
  watch transcoding
  run 450 gpu-check --seconds "$seconds" --max 64 2>&1 | tee "$dmon_dir/steps-transcoding.log"
  watched
  if [ -n "$dmon_pid" ]; then
    echo "utilisation per session-search step (mean %):"
    step_summary "$dmon_dir/steps-transcoding.log" "$dmon_log" "$seconds"
  fi
fi
if [ "$which" != transcoding ]; then
  echo "== gpu-check-captions: Whisper on the GPU (tables at the end)"
  watch captions
  run 190 gpu-check-captions --tokenizer "$here/tokenizer.json" --audio "$here/speech.wav" --max 128
  watched
fi
