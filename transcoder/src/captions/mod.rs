//! Live captions (issue 7). Built so far: provisioning the default Whisper
//! model without a model hub ([`models`]: `balie-transcoder models fetch`)
//! and the CTranslate2-to-Hugging-Face converter it uses ([`ct2`]); the
//! speech-to-text runtime: Whisper's exact log-mel ([`mel`]) and Whisper on
//! candle with a key/value cache ([`whisper`]), behind `balie-transcoder
//! transcribe FILE`. Streaming (partials, local agreement), voice activity
//! detection, the audio sessions of the offload protocol and the SFU side
//! are not built yet.

pub mod audio;
pub mod ct2;
pub mod mel;
pub mod models;
pub mod stream;
pub mod whisper;
