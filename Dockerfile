# balie-sfu image: multi-stage, slim Debian runtime.
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
