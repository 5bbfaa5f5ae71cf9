//! Live captions (issue 7). Built so far: provisioning the default Whisper
//! model without a model hub ([`models`]: `balie-transcoder models fetch`)
//! and the CTranslate2-to-Hugging-Face converter it uses ([`ct2`]). The
//! speech-to-text runtime, the audio sessions and the SFU side are not
//! built yet.

pub mod ct2;
pub mod models;
