# balie images, multi-stage:
#   target sfu (always name the target: the last stage is the worker's):
#     docker build --target sfu -t balie-sfu .
#   target transcoder: the offload worker on an NVIDIA CUDA runtime base
#     docker build --target transcoder -t balie-transcoder .
#     docker run --gpus all -e NVIDIA_DRIVER_CAPABILITIES=compute,video,utility \
#       -p 4470:4470/udp -v /etc/balie/offload:/etc/balie/offload balie-transcoder
#   live captions too (the default model is in the image; with the image's
#   BALIE_TRANSCODER_BACKEND=cuda Whisper runs on the GPU, with =cpu on the
#   CPU cores given to the container): add -e BALIE_TRANSCODER_CAPTIONS=true
#   Transcode sessions use the GPU only where the card has NVENC
#   (BALIE_TRANSCODER_VIDEO_BACKEND=auto; H100/H200 have none, and there the
#   CPU pipeline holds more sessions: docs/offload.md); where they do,
#   BALIE_TRANSCODER_NVDEC says how NVDEC runs (own-context, shared, resident).
#
# balie-sfu: slim Debian runtime.
# The build runs the same command as CI's release build: cargo build --release --locked.
#
#   docker build -t balie-sfu .
#   docker run --network host -v /etc/balie:/etc/balie balie-sfu --config /etc/balie/sfu.toml
#
# Media uses UDP ports media.udp_port_base .. +shards-1: publish them, or use host networking.

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p balie-sfu \
 && install -D target/release/balie-sfu /out/balie-sfu

FROM debian:bookworm-slim AS sfu
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home balie
COPY --from=build /out/balie-sfu /usr/local/bin/balie-sfu
COPY configs/production.toml /etc/balie/sfu.toml.example
USER balie
EXPOSE 8080/tcp
ENTRYPOINT ["/usr/local/bin/balie-sfu"]
CMD ["--config", "/etc/balie/sfu.toml"]

# balie-transcoder. Built on Ubuntu 24.04, the distribution of the CUDA
# runtime image below, so that it links the FFmpeg libraries (6.1) that the
# runtime stage installs. FFmpeg loads NVDEC (libnvcuvid) and libcuda at run
# time from the driver, which the NVIDIA container toolkit mounts when
# NVIDIA_DRIVER_CAPABILITIES includes `video` and `compute`. Built with the
# `cuda` feature: cudarc loads libcuda, NVRTC and cuBLAS (both in this
# runtime image; cuBLAS for Whisper's matrix products when captions are on)
# at run time; without a GPU, `serve` stops with a clear error (set
# BALIE_TRANSCODER_BACKEND=cpu to run it on CPUs).
FROM ubuntu:24.04 AS build-transcoder
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates curl gcc libc6-dev pkg-config clang libclang-dev \
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev \
      libavfilter-dev libavdevice-dev \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p balie-transcoder --features cuda \
 && install -D target/release/balie-transcoder /out/balie-transcoder \
 && /out/balie-transcoder models fetch --dir /out/models/whisper-base

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS transcoder
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libavcodec60 libavformat60 libavutil58 libswscale7 libswresample4 \
      libavfilter9 libavdevice60 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home balie
ENV NVIDIA_DRIVER_CAPABILITIES=compute,video,utility \
    BALIE_TRANSCODER_BACKEND=cuda \
    BALIE_TRANSCODER_LISTEN=0.0.0.0:4470 \
    BALIE_TRANSCODER_METRICS=0.0.0.0:9471 \
    BALIE_TRANSCODER_CA=/etc/balie/offload/ca.pem \
    BALIE_TRANSCODER_CERT=/etc/balie/offload/worker.pem \
    BALIE_TRANSCODER_KEY=/etc/balie/offload/worker.key \
    BALIE_TRANSCODER_CAPTIONS_MODEL=/usr/share/balie/models/whisper-base
COPY --from=build-transcoder /out/balie-transcoder /usr/local/bin/balie-transcoder
COPY --from=build-transcoder /out/models/whisper-base /usr/share/balie/models/whisper-base
USER balie
EXPOSE 4470/udp 9471/tcp
ENTRYPOINT ["/usr/local/bin/balie-transcoder"]
CMD ["serve"]
