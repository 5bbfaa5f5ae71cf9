//! Whisper on candle, loaded from the Hugging Face layout
//! (`model.safetensors`, `config.json`, `tokenizer.json`), any size.
//!
//! The encoder follows the original. The decoder is our own, with a
//! key/value cache: self-attention keys and values of the tokens already
//! decoded are kept per layer and only the new token is computed at each
//! step (candle-transformers' decoder recomputes the whole prefix every
//! step, about 3.5x slower), and the cross-attention keys and values of the
//! audio are computed once per window.
//!
//! Decoding is greedy with the room's language forced (no language
//! detection: it called espeak's Dutch "Thai"), without timestamps,
//! special tokens suppressed, the number of tokens capped by the audio's
//! length, and a repetition guard.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv1d, Conv1dConfig, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::mel::{Mel, HOP, SAMPLE_RATE};

/// Why the model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum WhisperError {
    #[error("{path}: {why}")]
    Load { path: String, why: String },
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the tokenizer has no {0} token")]
    Token(String),
    #[error("GPU: {0}")]
    Gpu(String),
}

/// One model run over one window of audio: the encoder once, then decoder
/// steps. The CPU (candle) and the GPU (`captions::gpu`, feature `cuda`)
/// each implement it; [`Whisper::transcribe_after`] drives either the same
/// way (prompt, token cap, repetition guard).
pub(crate) trait Forward {
    /// Encode a log-mel spectrogram (`num_mel_bins` rows of `frames`).
    fn encode(&mut self, mel: &[f32], frames: usize) -> Result<(), WhisperError>;
    /// Feed `tokens` at position `offset` (after those fed before); the
    /// most likely next token, special tokens suppressed.
    fn next_token(&mut self, tokens: &[u32], offset: usize) -> Result<u32, WhisperError>;
}

/// [`Forward`] on the CPU: candle, with the key/value [`Cache`].
struct CpuForward<'a> {
    w: &'a Whisper,
    cache: Option<Cache>,
}

impl Forward for CpuForward<'_> {
    fn encode(&mut self, mel: &[f32], frames: usize) -> Result<(), WhisperError> {
        self.cache = Some(self.w.window_cache(mel, frames)?);
        Ok(())
    }

    fn next_token(&mut self, tokens: &[u32], offset: usize) -> Result<u32, WhisperError> {
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| WhisperError::Gpu("decoding before encoding".into()))?;
        let logits = self.w.decode_step(tokens, offset, cache)?;
        Ok(logits
            .broadcast_add(&self.w.suppress)?
            .argmax(0)?
            .to_scalar::<u32>()?)
    }
}

/// The fields of `config.json` the model needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub d_model: usize,
    pub num_mel_bins: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub vocab_size: usize,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    #[serde(default)]
    pub suppress_tokens: Vec<i64>,
}

fn linear(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    candle_nn::linear(i, o, vb)
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Attention> {
        Ok(Attention {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: candle_nn::linear_no_bias(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads,
        })
    }

    /// [batch, time, d] -> [batch, heads, time, d / heads]
    fn split(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Attention of `q` (split) over keys and values (split), with an
    /// optional additive mask.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dh = q.dim(D::Minus1)?;
        let scale = (dh as f64).powf(-0.5);
        let mut w = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let o = w.matmul(v)?;
        let (b, h, t, dh) = o.dims4()?;
        self.out
            .forward(&o.transpose(1, 2)?.reshape((b, t, h * dh))?)
    }
}

struct EncoderLayer {
    attn: Attention,
    attn_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ln: LayerNorm,
}

struct DecoderLayer {
    attn: Attention,
    attn_ln: LayerNorm,
    cross: Attention,
    cross_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ln: LayerNorm,
}

/// Keys and values of one attention, split into heads.
type KeyValue = (Tensor, Tensor);

/// Per layer: self-attention keys and values so far, and the audio's
/// cross-attention keys and values.
struct Cache {
    layers: Vec<(Option<KeyValue>, KeyValue)>,
}

/// A loaded model and tokenizer.
pub struct Whisper {
    pub config: Config,
    conv1: Conv1d,
    conv2: Conv1d,
    enc_pos: Tensor,
    encoder: Vec<EncoderLayer>,
    enc_ln: LayerNorm,
    embed: Embedding,
    dec_pos: Tensor,
    decoder: Vec<DecoderLayer>,
    dec_ln: LayerNorm,
    tokenizer: tokenizers::Tokenizer,
    mel: Mel,
    device: Device,
    suppress: Tensor,
    eot: u32,
    sot: u32,
    transcribe: u32,
    no_timestamps: u32,
    /// The folder it was loaded from (an engine loads the same weights).
    dir: std::path::PathBuf,
    /// Set by [`Whisper::use_gpu`] (or [`Whisper::use_mirror`]): every
    /// window then runs there.
    engine: Option<Box<dyn super::engine::Windows>>,
    /// The engine failed once: windows run here from then on.
    engine_failed: std::sync::atomic::AtomicBool,
    /// Load checks on random weights only ([`Whisper::set_decode_floor`]).
    decode_floor: Option<f64>,
}

/// The text of one window and what it cost.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub text: String,
    pub tokens: Vec<u32>,
    pub encode: std::time::Duration,
    pub decode: std::time::Duration,
}

fn ln(d: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    candle_nn::layer_norm(d, 1e-5, vb)
}

impl Whisper {
    /// Load from a folder in the Hugging Face layout, on the CPU.
    pub fn load(dir: &Path) -> Result<Whisper, WhisperError> {
        let device = Device::Cpu;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| WhisperError::Load {
                path: path.display().to_string(),
                why: e.to_string(),
            })
        };
        let config: Config =
            serde_json::from_slice(&read("config.json")?).map_err(|e| WhisperError::Load {
                path: dir.join("config.json").display().to_string(),
                why: e.to_string(),
            })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| WhisperError::Tokenizer(e.to_string()))?;
        let vb =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &device)?;
        let c = &config;
        let d = c.d_model;
        let vb = vb.pp("model");
        let (e, dv) = (vb.pp("encoder"), vb.pp("decoder"));
        let conv = |i, o, stride, vb| {
            candle_nn::conv1d(
                i,
                o,
                3,
                Conv1dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                },
                vb,
            )
        };
        let ffn = |vb: &VarBuilder, name: &str| -> candle_core::Result<usize> {
            vb.pp(name).get_unchecked("weight")?.dim(0)
        };
        let ffn_dim = ffn(&e.pp("layers.0"), "fc1")?;
        let encoder = (0..c.encoder_layers)
            .map(|i| {
                let l = e.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    attn: Attention::load(d, c.encoder_attention_heads, l.pp("self_attn"))?,
                    attn_ln: ln(d, l.pp("self_attn_layer_norm"))?,
                    fc1: linear(d, ffn_dim, l.pp("fc1"))?,
                    fc2: linear(ffn_dim, d, l.pp("fc2"))?,
                    ln: ln(d, l.pp("final_layer_norm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let decoder = (0..c.decoder_layers)
            .map(|i| {
                let l = dv.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    attn: Attention::load(d, c.decoder_attention_heads, l.pp("self_attn"))?,
                    attn_ln: ln(d, l.pp("self_attn_layer_norm"))?,
                    cross: Attention::load(d, c.decoder_attention_heads, l.pp("encoder_attn"))?,
                    cross_ln: ln(d, l.pp("encoder_attn_layer_norm"))?,
                    fc1: linear(d, ffn_dim, l.pp("fc1"))?,
                    fc2: linear(ffn_dim, d, l.pp("fc2"))?,
                    ln: ln(d, l.pp("final_layer_norm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let token = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| WhisperError::Token(t.into()))
        };
        let eot = token("<|endoftext|>")?;
        // Everything past end-of-text is a special token (languages, tasks,
        // timestamps): never text. Plus the config's non-speech symbols.
        let mut mask = vec![0f32; c.vocab_size];
        for (i, m) in mask.iter_mut().enumerate() {
            if i as u32 > eot {
                *m = f32::NEG_INFINITY;
            }
        }
        for t in &c.suppress_tokens {
            if let Some(m) = usize::try_from(*t).ok().and_then(|t| mask.get_mut(t)) {
                *m = f32::NEG_INFINITY;
            }
        }
        Ok(Whisper {
            conv1: conv(c.num_mel_bins, d, 1, e.pp("conv1"))?,
            conv2: conv(d, d, 2, e.pp("conv2"))?,
            enc_pos: e.get((c.max_source_positions, d), "embed_positions.weight")?,
            encoder,
            enc_ln: ln(d, e.pp("layer_norm"))?,
            embed: candle_nn::embedding(c.vocab_size, d, dv.pp("embed_tokens"))?,
            dec_pos: dv.get((c.max_target_positions, d), "embed_positions.weight")?,
            decoder,
            dec_ln: ln(d, dv.pp("layer_norm"))?,
            mel: Mel::new(c.num_mel_bins),
            suppress: Tensor::from_vec(mask, c.vocab_size, &device)?,
            eot,
            sot: token("<|startoftranscript|>")?,
            transcribe: token("<|transcribe|>")?,
            no_timestamps: token("<|notimestamps|>")?,
            tokenizer,
            device,
            config: config.clone(),
            dir: dir.to_path_buf(),
            engine: None,
            engine_failed: Default::default(),
            decode_floor: None,
        })
    }

    /// Run every window on GPU `ordinal` from now on (the same weights,
    /// uploaded; the tokenizer, log-mel and decoding policy stay here).
    /// Returns what the card is.
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, ordinal: usize) -> Result<String, WhisperError> {
        let suppress = self.suppress.to_vec1::<f32>()?;
        let e = super::gpu::load(&self.dir, &self.config, &suppress, ordinal)?;
        let name = e.name();
        self.engine = Some(Box::new(e));
        Ok(name)
    }

    /// Run every window through the GPU engine on its CPU mirror
    /// ([`super::mirror`]): the engine's calls, each kernel's arithmetic in
    /// Rust. Slow; for tests of the engine where there is no GPU.
    pub fn use_mirror(&mut self) -> Result<(), WhisperError> {
        let suppress = self.suppress.to_vec1::<f32>()?;
        let e =
            super::engine::Engine::load(&self.dir, &self.config, &suppress, super::mirror::Mirror)?;
        self.engine = Some(Box::new(e));
        Ok(())
    }

    /// Whether windows run on a GPU (and it has not failed).
    pub fn on_gpu(&self) -> bool {
        self.engine.as_ref().is_some_and(|e| e.on_gpu())
            && !self
                .engine_failed
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The decoder's first logits for `pcm` on the CPU (for comparing the
    /// GPU's arithmetic with candle's): the prompt of `language`, no prefix.
    pub fn first_logits(&self, pcm: &[f32], language: &str) -> Result<Vec<f32>, WhisperError> {
        let (mel, frames) = self.window_mel(pcm);
        let mut cache = self.window_cache(&mel, frames)?;
        let prompt = self.prompt(language, &[])?;
        Ok(self.decode_step(&prompt, 0, &mut cache)?.to_vec1::<f32>()?)
    }

    /// A window encoded: the decoder's cache holding the audio's
    /// cross-attention keys and values, no tokens yet.
    fn window_cache(&self, mel: &[f32], frames: usize) -> Result<Cache, WhisperError> {
        let audio_features = self.encode(mel, frames)?;
        let layers = self
            .decoder
            .iter()
            .map(|l| {
                let k = l.cross.split(&l.cross.k.forward(&audio_features)?)?;
                let v = l.cross.split(&l.cross.v.forward(&audio_features)?)?;
                Ok((None, (k, v)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Cache { layers })
    }

    /// [`Whisper::first_logits`] through the engine windows run on (after
    /// [`Whisper::use_gpu`] or [`Whisper::use_mirror`]).
    pub fn engine_first_logits(
        &self,
        pcm: &[f32],
        language: &str,
    ) -> Result<Vec<f32>, WhisperError> {
        let e = self
            .engine
            .as_ref()
            .ok_or_else(|| WhisperError::Gpu("no engine (use_gpu first)".into()))?;
        let (mel, frames) = self.window_mel(pcm);
        let prompt = self.prompt(language, &[])?;
        e.first_logits(&mel, frames, &prompt)
    }

    /// The prompt: start of transcript, the language, transcribe, no
    /// timestamps, then `prefix`.
    fn prompt(&self, language: &str, prefix: &[u32]) -> Result<Vec<u32>, WhisperError> {
        let lang = self.language_token(language)?;
        let mut prompt = vec![self.sot, lang, self.transcribe, self.no_timestamps];
        prompt.extend_from_slice(prefix);
        Ok(prompt)
    }

    /// The log-mel of a window: up to 30 s of `pcm` and a second of
    /// silence, an even number of frames. Returns (mel, frames).
    pub(crate) fn window_mel(&self, pcm: &[f32]) -> (Vec<f32>, usize) {
        let max_samples = self.config.max_source_positions * 2 * HOP;
        let mut audio: Vec<f32> = pcm[..pcm.len().min(max_samples)].to_vec();
        let padded = (audio.len() + SAMPLE_RATE).min(max_samples);
        audio.resize(padded, 0.0);
        let (mel, mut frames) = self.mel.log_mel(&audio);
        frames -= frames % 2;
        let mel = if frames * self.config.num_mel_bins == mel.len() {
            mel
        } else {
            // Drop an odd last frame of every row.
            let all = mel.len() / self.config.num_mel_bins;
            mel.chunks(all).flat_map(|r| r[..frames].to_vec()).collect()
        };
        (mel, frames)
    }

    /// Whether `token` begins a word (its text starts with a space; in the
    /// byte-level BPE, `Ġ`), so a cut before it splits no word.
    pub fn starts_word(&self, token: u32) -> bool {
        self.tokenizer
            .id_to_token(token)
            .is_some_and(|t| t.starts_with('Ġ'))
    }

    /// The text of `tokens` (a run of text tokens), trimmed.
    pub fn text(&self, tokens: &[u32]) -> Result<String, WhisperError> {
        let text = self
            .tokenizer
            .decode(tokens, true)
            .map_err(|e| WhisperError::Tokenizer(e.to_string()))?;
        Ok(text.trim().to_string())
    }

    /// The token of a language (`nl`, `en`, ...).
    pub fn language_token(&self, lang: &str) -> Result<u32, WhisperError> {
        self.tokenizer
            .token_to_id(&format!("<|{lang}|>"))
            .ok_or_else(|| WhisperError::Token(format!("<|{lang}|>")))
    }

    /// The encoder's output for a log-mel spectrogram of `frames` frames.
    fn encode(&self, mel: &[f32], frames: usize) -> candle_core::Result<Tensor> {
        let x = Tensor::from_slice(mel, (1, self.config.num_mel_bins, frames), &self.device)?;
        let x = self.conv1.forward(&x)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?;
        let x = x.transpose(1, 2)?; // [1, t, d]
        let t = x.dim(1)?;
        let mut x = x.broadcast_add(&self.enc_pos.narrow(0, 0, t)?)?;
        for l in &self.encoder {
            let h = l.attn_ln.forward(&x)?;
            let (q, k, v) = (
                l.attn.split(&l.attn.q.forward(&h)?)?,
                l.attn.split(&l.attn.k.forward(&h)?)?,
                l.attn.split(&l.attn.v.forward(&h)?)?,
            );
            x = (x + l.attn.attend(&q, &k, &v, None)?)?;
            let h = l.ln.forward(&x)?;
            x = (&x + l.fc2.forward(&l.fc1.forward(&h)?.gelu_erf()?)?)?;
        }
        self.enc_ln.forward(&x)
    }

    /// Run the decoder on `tokens` at position `offset`; returns the
    /// logits of the last one.
    fn decode_step(
        &self,
        tokens: &[u32],
        offset: usize,
        cache: &mut Cache,
    ) -> candle_core::Result<Tensor> {
        let n = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self
            .embed
            .forward(&ids)?
            .broadcast_add(&self.dec_pos.narrow(0, offset, n)?)?;
        // Causal within the new tokens; every cached one is visible.
        let mask = if n > 1 {
            let m: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..offset + n).map(move |j| {
                        if j > offset + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            Some(Tensor::from_vec(m, (n, offset + n), &self.device)?)
        } else {
            None
        };
        for (l, (selfkv, (ck, cv))) in self.decoder.iter().zip(cache.layers.iter_mut()) {
            let h = l.attn_ln.forward(&x)?;
            let q = l.attn.split(&l.attn.q.forward(&h)?)?;
            let mut k = l.attn.split(&l.attn.k.forward(&h)?)?;
            let mut v = l.attn.split(&l.attn.v.forward(&h)?)?;
            if let Some((pk, pv)) = selfkv.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            x = (x + l.attn.attend(&q, &k, &v, mask.as_ref())?)?;
            *selfkv = Some((k, v));
            let h = l.cross_ln.forward(&x)?;
            let q = l.cross.split(&l.cross.q.forward(&h)?)?;
            x = (x + l.cross.attend(&q, ck, cv, None)?)?;
            let h = l.ln.forward(&x)?;
            x = (&x + l.fc2.forward(&l.fc1.forward(&h)?.gelu_erf()?)?)?;
        }
        let x = self.dec_ln.forward(&x.narrow(1, n - 1, 1)?)?;
        let logits = x.matmul(&self.embed.embeddings().t()?.unsqueeze(0)?)?;
        logits.squeeze(0)?.squeeze(0)
    }

    /// For load checks on random weights (`gpu-check-captions`): decode at
    /// least `tokens_per_second` tokens per second of audio, as a real
    /// model does on speech (about 3 in English, more in Dutch), where
    /// random weights end after a token or two. Below the floor the end of
    /// text and the repetition guard do not stop the decoding, and an end
    /// of text is replaced by an ordinary token: the text is meaningless,
    /// the device's work per token is a real window's.
    pub fn set_decode_floor(&mut self, tokens_per_second: f64) {
        self.decode_floor = Some(tokens_per_second);
    }

    /// Transcribe up to 30 s of 16 kHz mono audio in `language`. Only the
    /// audio's length (plus a second) is encoded, not a padded 30 s.
    pub fn transcribe(&self, pcm: &[f32], language: &str) -> Result<Transcript, WhisperError> {
        self.transcribe_after(pcm, language, &[])
    }

    /// [`Whisper::transcribe`], the text forced to begin with `prefix`
    /// (tokens already final): they are read in one decoder pass, and only
    /// the words after them are decoded one token at a time. The
    /// transcript's tokens begin with `prefix`.
    pub fn transcribe_after(
        &self,
        pcm: &[f32],
        language: &str,
        prefix: &[u32],
    ) -> Result<Transcript, WhisperError> {
        use std::sync::atomic::Ordering;
        if let Some(e) = &self.engine {
            if !self.engine_failed.load(Ordering::Relaxed) {
                match e.transcribe(self, pcm, language, prefix) {
                    Ok(t) => return Ok(t),
                    // A failing GPU (a driver fault, memory) does not stop
                    // captions: this window and every later one run here.
                    Err(err) => {
                        if !self.engine_failed.swap(true, Ordering::Relaxed) {
                            tracing::error!(%err, "Whisper's GPU engine failed; captions go on on the CPU");
                        }
                    }
                }
            }
        }
        let mut f = CpuForward {
            w: self,
            cache: None,
        };
        self.run(&mut f, pcm, language, prefix)
    }

    /// [`Whisper::transcribe_after`] through `f`.
    pub(crate) fn run(
        &self,
        f: &mut dyn Forward,
        pcm: &[f32],
        language: &str,
        prefix: &[u32],
    ) -> Result<Transcript, WhisperError> {
        // A prefix longer than half the decoder's positions (it cannot be,
        // for what the cap let through before) is cut.
        let half = self.config.max_target_positions / 2;
        let prefix = &prefix[..prefix.len().min(half)];
        let prompt = self.prompt(language, prefix)?;
        let t0 = std::time::Instant::now();
        let (mel, frames) = self.window_mel(pcm);
        f.encode(&mel, frames)?;
        let encode = t0.elapsed();
        let t1 = std::time::Instant::now();
        // About 3 tokens a second of speech; cap at 6, plus a little.
        let seconds = pcm.len() as f64 / SAMPLE_RATE as f64;
        let cap = ((seconds * 6.0) as usize + 8).min(half);
        let floor = self
            .decode_floor
            .map_or(0, |rate| ((seconds * rate) as usize).min(cap));
        let mut out: Vec<u32> = prefix.to_vec();
        let mut next = f.next_token(&prompt, 0)?;
        for step in 0..cap.saturating_sub(prefix.len()).max(8) {
            if out.len() < floor {
                if next == self.eot {
                    // An ordinary (text) token in its place.
                    next = (out.len() as u32 * 7919) % self.eot;
                }
            } else {
                if next == self.eot {
                    break;
                }
                if let Some(cut) = repeats(&out, next) {
                    // A loop: keep one copy of the repeated words (never
                    // fewer than the floor's).
                    out.truncate(cut.max(floor));
                    break;
                }
            }
            out.push(next);
            next = f.next_token(&[next], prompt.len() + step)?;
        }
        Ok(Transcript {
            text: self.text(&out)?,
            tokens: out,
            encode,
            decode: t1.elapsed(),
        })
    }
}

/// Whether adding `next` makes the tail a loop, and where the text should
/// end then: the same token five times running (keep one), or the last 4-24
/// tokens repeating the 4-24 before them (keep the first copy). Whisper
/// loops like this on audio cut mid-word (partials) and on synthetic voices.
fn repeats(out: &[u32], next: u32) -> Option<usize> {
    let mut all = out.to_vec();
    all.push(next);
    let n = all.len();
    if n >= 5 && all[n - 5..].iter().all(|t| *t == next) {
        return Some(n - 4);
    }
    (4..=24)
        .find(|len| n >= 2 * len && all[n - len..] == all[n - 2 * len..n - len])
        .map(|len| n - len)
}

#[cfg(test)]
mod tests {
    use super::repeats;

    /// An engine that always fails.
    struct Broken;

    impl super::super::engine::Windows for Broken {
        fn on_gpu(&self) -> bool {
            true
        }

        fn transcribe(
            &self,
            _: &super::Whisper,
            _: &[f32],
            _: &str,
            _: &[u32],
        ) -> Result<super::Transcript, super::WhisperError> {
            Err(super::WhisperError::Gpu("an Xid error".into()))
        }

        fn first_logits(
            &self,
            _: &[f32],
            _: usize,
            _: &[u32],
        ) -> Result<Vec<f32>, super::WhisperError> {
            Err(super::WhisperError::Gpu("an Xid error".into()))
        }
    }

    #[test]
    fn a_failing_engine_hands_every_window_to_the_cpu() {
        let dir = super::super::models::default_dir();
        assert!(
            super::super::models::is_provisioned(&dir),
            "the test command provisions it"
        );
        let mut w = super::Whisper::load(&dir).expect("model loads");
        w.engine = Some(Box::new(Broken));
        assert!(w.on_gpu());
        let pcm = super::super::speech::speak("en", "Please bring your passport.").expect("speech");
        let t = w.transcribe(&pcm, "en").expect("the CPU takes over");
        assert!(t.text.to_lowercase().contains("passport"), "{}", t.text);
        assert!(!w.on_gpu(), "no longer on the GPU");
    }

    #[test]
    fn loops_are_caught_and_speech_is_not() {
        assert_eq!(repeats(&[1, 2, 3, 4], 5), None);
        assert_eq!(repeats(&[7, 7, 7, 7], 7), Some(1));
        // "a b c d a b c d": the second copy goes.
        assert_eq!(repeats(&[1, 2, 3, 4, 1, 2, 3], 4), Some(4));
        assert_eq!(
            repeats(&[1, 2, 3, 1, 2], 3),
            None,
            "short phrases may repeat"
        );
        // "the cat and the dog and the bird": no loop.
        assert_eq!(repeats(&[5, 9, 4, 5, 8, 4, 5], 11), None);
    }
}
