//! balie-transcoder: the worker that makes simulcast layers for publishers
//! that send one layer only, reached by balie-sfu over QUIC
//! (`balie-offload`). See ARCHITECTURE.md, "Offload".
//!
//! - [`server`]: the QUIC server (mutual TLS), control stream, groups in
//!   and out.
//! - [`session`]: one thread per transcode session, a short queue in front.
//! - [`pipeline`]: decode, scale, encode through FFmpeg; the CPU backend,
//!   and with the `cuda` feature the GPU one ([`Backend`](pipeline::Backend)).
//! - `gpu` (feature `cuda`): the card, NVDEC/NVENC probing, the scaling
//!   kernel; `gpucheck`: `balie-transcoder gpu-check`.
//! - [`captions`]: live captions (so far: provisioning the Whisper model).
//! - [`picture`]: layers compared with the source (reference scaling,
//!   PSNR).
//! - [`clip`]: generated test clips (VP8, H.264) for tests and the benchmark.
//! - [`bench`]: sessions held in real time, beside the `ffmpeg` command line.

pub mod bench;
pub mod captions;
pub mod clip;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpucheck;
pub mod metrics;
pub mod picture;
pub mod pipeline;
pub mod server;
pub mod session;
