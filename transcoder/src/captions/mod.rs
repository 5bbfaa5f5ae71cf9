//! Live captions: a participant's speech becomes text on the worker.
//!
//! - [`models`]: `balie-transcoder models fetch` provisions the default
//!   Whisper model without a model hub, through the CTranslate2-to-Hugging
//!   Face converter [`ct2`];
//! - [`mel`] (Whisper's exact log-mel) and [`whisper`] (Whisper on candle,
//!   with a key/value cache); [`engine`]: the same model as device calls,
//!   run by `gpu` (feature `cuda`: cuBLAS and our own kernels through
//!   NVRTC) or, in tests, by [`mirror`] (the kernels' arithmetic on the
//!   CPU); `gpucheck` checks the GPU against the CPU; [`randmodel`]: base's
//!   shapes with random weights, for that check on a node without the real
//!   model;
//! - [`stream`]: voice activity, partials about once a second, finals by
//!   local agreement;
//! - [`audio`]: Opus and files to 16 kHz mono (and Opus out, for tests);
//! - [`session`]: a caption session of the offload protocol, the worker's
//!   end of `Control::OpenCaptions`;
//! - [`speech`]: espeak-ng speech and the word error rate, for tests and
//!   benchmarks; [`bench`]: `balie-transcoder captions-bench`, caption
//!   streams held in real time.

pub mod audio;
pub mod bench;
pub mod ct2;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpucheck;
pub mod kernels;
pub mod mel;
pub mod mirror;
pub mod models;
pub mod randmodel;
pub mod session;
pub mod speech;
pub mod stream;
pub mod whisper;
