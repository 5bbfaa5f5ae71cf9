//! Whisper as a sequence of device calls: the engine the GPU runs
//! (`captions/gpu.rs`, feature `cuda`), written once over a [`Device`]:
//! matrix products in cuBLAS's terms ([`Gemm`]) and seven small kernels
//! (im2col, bias and GELU, add, layer norm, softmax, token embedding,
//! masked argmax). [`super::mirror`] is the same device on the CPU (every
//! kernel's arithmetic in Rust, sgemm by its definition), so the whole
//! engine (buffers, offsets, strides, the decoder's cache and masks) is
//! tested here against candle on the real model; on a GPU only the kernels
//! and cuBLAS themselves are new.
//!
//! The weights are uploaded once and shared; each window runs on a
//! [`Scratch`] of its own (a device lane, for CUDA a stream and a cuBLAS
//! handle, and every activation buffer sized for a 30 s window), taken from
//! a pool and given back, so concurrent caption sessions overlap. Every
//! call's extent is checked here against its buffers before the device is
//! asked: a lane may trust what it gets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use candle_core::{DType, Device as CandleDevice, Tensor};

use super::whisper::{Config, Forward, Transcript, Whisper, WhisperError};

pub type R<T> = Result<T, WhisperError>;

pub(crate) fn fail(msg: impl Into<String>) -> WhisperError {
    WhisperError::Gpu(msg.into())
}

/// One (batched) matrix product in cuBLAS's terms, column-major: for each
/// batch b, `C_b = alpha op(A_b) op(B_b)` (beta 0), `op(A)` m x k, `op(B)`
/// k x n, `C` m x n; `ta`/`tb`: the stored matrix is transposed; batch b's
/// matrices start `b * sa`, `b * sb`, `b * sc` elements on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub sa: usize,
    pub sb: usize,
    pub sc: usize,
}

impl Gemm {
    /// How many elements of A, B and C it touches, from each one's start.
    pub fn extents(&self) -> (usize, usize, usize) {
        let span = |t: bool, rows: usize, cols: usize, ld: usize| {
            if t {
                (cols - 1) + (rows - 1) * ld
            } else {
                (rows - 1) + (cols - 1) * ld
            }
        };
        let b = self.batch - 1;
        (
            b * self.sa + span(self.ta, self.m, self.k, self.lda) + 1,
            b * self.sb + span(self.tb, self.k, self.n, self.ldb) + 1,
            b * self.sc + span(false, self.m, self.n, self.ldc) + 1,
        )
    }
}

/// `Y = X W^T` with X row-major `[n, inp]` and W PyTorch's `[out, inp]`.
/// Column-major a row-major `[r, c]` matrix is its `c x r` transpose, so
/// this is `Y^T (out x n) = op(W) . X^T`, W's storage read transposed.
pub fn linear_cfg(out: usize, inp: usize, n: usize) -> Gemm {
    Gemm {
        ta: true,
        tb: false,
        m: out,
        n,
        k: inp,
        alpha: 1.0,
        lda: inp,
        ldb: inp,
        ldc: out,
        batch: 1,
        sa: 0,
        sb: 0,
        sc: 0,
    }
}

/// Per head h: `S_h = Q_h K_h^T / sqrt(dh)` (row-major `[tq, tk]`, heads one
/// after another), Q and K row-major `[t, d]` with head h in columns
/// `h*dh..`. Column-major: `S_h^T (tk x tq) = op(K_h) . Q_h^T`.
pub fn scores_cfg(heads: usize, d: usize, tq: usize, tk: usize) -> Gemm {
    let dh = d / heads;
    Gemm {
        ta: true,
        tb: false,
        m: tk,
        n: tq,
        k: dh,
        alpha: (dh as f32).powf(-0.5),
        lda: d,
        ldb: d,
        ldc: tk,
        batch: heads,
        sa: dh,
        sb: dh,
        sc: tq * tk,
    }
}

/// Per head h: `O_h = P_h V_h` into columns `h*dh..` of the row-major
/// `[tq, d]` output. Column-major: `O_h^T (dh x tq) = V_h^T . P_h^T`.
pub fn values_cfg(heads: usize, d: usize, tq: usize, tk: usize) -> Gemm {
    let dh = d / heads;
    Gemm {
        ta: false,
        tb: false,
        m: dh,
        n: tq,
        k: tk,
        alpha: 1.0,
        lda: d,
        ldb: tk,
        ldc: d,
        batch: heads,
        sa: dh,
        sb: tq * tk,
        sc: dh,
    }
}

/// One window's stream of work on a device. Buffers are f32; a `(buffer,
/// offset)` pair starts at that element. The engine checks every extent
/// before a call.
pub trait Lane {
    type Buf;
    fn zeros(&self, n: usize) -> R<Self::Buf>;
    fn len(buf: &Self::Buf) -> usize;
    /// `to[..data.len()] = data`
    fn write(&self, data: &[f32], to: &mut Self::Buf) -> R<()>;
    /// `from[..n]`, after everything queued before.
    fn read(&self, from: &Self::Buf, n: usize) -> R<Vec<f32>>;
    fn gemm(
        &self,
        g: &Gemm,
        a: (&Self::Buf, usize),
        b: (&Self::Buf, usize),
        c: (&mut Self::Buf, usize),
    ) -> R<()>;
    /// `cols[t, c*3 + k] = x[c*sc + (t*stride + k - 1)*st]` (0 outside);
    /// `dims`: sc, st, channels, steps in, stride, steps out.
    fn im2col(&self, x: &Self::Buf, dims: [usize; 6], cols: &mut Self::Buf) -> R<()>;
    /// `y[r, j] += b[j]` over `rows x cols`, then GELU (erf) if `gelu`.
    fn bias_act(
        &self,
        y: (&mut Self::Buf, usize),
        b: &Self::Buf,
        rows: usize,
        cols: usize,
        gelu: bool,
    ) -> R<()>;
    /// `y[..n] += x[off..off + n]`
    fn add(&self, y: &mut Self::Buf, x: (&Self::Buf, usize), n: usize) -> R<()>;
    /// Per row of `d`: `(x - mean) / sqrt(var + 1e-5) * g + b`.
    fn layer_norm(
        &self,
        x: (&Self::Buf, usize),
        norm: (&Self::Buf, &Self::Buf),
        y: &mut Self::Buf,
        rows: usize,
        d: usize,
    ) -> R<()>;
    /// Softmax of each row of `cols`; `causal`: row r (of `tq` per head)
    /// sees columns up to that position plus `r % tq`, the rest are 0.
    fn softmax(
        &self,
        s: &mut Self::Buf,
        rows: usize,
        cols: usize,
        tq: usize,
        causal: Option<usize>,
    ) -> R<()>;
    /// `x[r, j] = table[tokens[r], j] + pos[offset + r, j]`
    fn embed(
        &self,
        tokens: &[u32],
        table_pos: (&Self::Buf, &Self::Buf),
        offset: usize,
        d: usize,
        x: &mut Self::Buf,
    ) -> R<()>;
    /// The index of the largest `logits[j] + mask[j]`, j < n (the first on ties).
    fn argmax(&self, logits: &Self::Buf, mask: &Self::Buf, n: usize) -> R<u32>;
    /// Wait for everything queued.
    fn sync(&self) -> R<()>;
}

/// Where the weights live and lanes come from.
pub trait Device: Send + Sync {
    type Buf: Send + Sync;
    type Lane: Lane<Buf = Self::Buf> + Send;
    /// What it is, for logs.
    fn name(&self) -> String;
    /// A GPU (not the CPU mirror).
    fn is_gpu(&self) -> bool;
    fn lane(&self) -> R<Self::Lane>;
    fn upload(&self, v: &[f32]) -> R<Self::Buf>;
    /// The uploads are done (before any lane reads them).
    fn uploaded(&self) -> R<()>;
    /// Memory free for scratches, where the device has a bound.
    fn free_bytes(&self) -> Option<usize>;
}

/// `y = x W^T + b`, W row-major `[out, inp]` (a convolution's kernel
/// flattened to `[out, in * 3]`).
pub struct Lin<B> {
    w: B,
    b: B,
    out: usize,
    inp: usize,
}

pub struct Norm<B> {
    g: B,
    b: B,
}

pub struct Attn<B> {
    q: Lin<B>,
    k: Lin<B>,
    v: Lin<B>,
    o: Lin<B>,
    heads: usize,
}

/// The feed-forward block: `x += fc2(GELU(fc1(LN(x))))`.
pub struct Ffn<B> {
    ln: Norm<B>,
    fc1: Lin<B>,
    fc2: Lin<B>,
}

pub struct EncLayer<B> {
    attn: Attn<B>,
    attn_ln: Norm<B>,
    ffn: Ffn<B>,
}

pub struct DecLayer<B> {
    attn: Attn<B>,
    attn_ln: Norm<B>,
    cross: Attn<B>,
    cross_ln: Norm<B>,
    ffn: Ffn<B>,
}

/// Whisper's weights on a device, shared by every window.
pub struct Engine<D: Device> {
    dev: D,
    d: usize,
    n_mels: usize,
    ffn: usize,
    vocab: usize,
    max_src: usize,
    max_tgt: usize,
    conv1: Lin<D::Buf>,
    conv2: Lin<D::Buf>,
    enc_pos: D::Buf,
    enc: Vec<EncLayer<D::Buf>>,
    enc_ln: Norm<D::Buf>,
    embed: D::Buf,
    dec_pos: D::Buf,
    dec: Vec<DecLayer<D::Buf>>,
    dec_ln: Norm<D::Buf>,
    suppress: D::Buf,
    pool: Mutex<Pool<D::Lane>>,
    /// Signalled when a scratch is given back.
    returned: Condvar,
}

/// The scratches: those free, how many exist, and how many may (each
/// takes device memory: about 150 MB for base; beyond what the device
/// has, a window waits for one to come back rather than fail).
struct Pool<L: Lane> {
    free: Vec<Scratch<L>>,
    made: usize,
    most: usize,
}

/// The lengths of a [`Scratch`]'s buffers ([`Engine::sizes`]).
struct Sizes {
    mel: usize,
    cols: usize,
    x1: usize,
    /// x, h, q, o: rows of the encoder or decoder.
    rows: usize,
    /// kk, vv and each layer's cross-attention K and V: the audio's rows.
    audio: usize,
    ff: usize,
    scores: usize,
    /// Each decoder layer's self-attention K and V.
    cache: usize,
    layers: usize,
    logits: usize,
}

/// One window's working memory and lane.
pub struct Scratch<L: Lane> {
    lane: L,
    mel: L::Buf,
    cols: L::Buf,
    x1: L::Buf,
    x: L::Buf,
    h: L::Buf,
    q: L::Buf,
    kk: L::Buf,
    vv: L::Buf,
    o: L::Buf,
    ff: L::Buf,
    scores: L::Buf,
    self_k: Vec<L::Buf>,
    self_v: Vec<L::Buf>,
    cross_k: Vec<L::Buf>,
    cross_v: Vec<L::Buf>,
    logits: L::Buf,
    /// Audio positions of the window encoded last (0: none yet).
    t_audio: usize,
}

/// Weights from the safetensors file to a device, as f32.
struct Upload<'a, D: Device> {
    tensors: HashMap<String, Tensor>,
    dev: &'a D,
}

impl<D: Device> Upload<'_, D> {
    fn tensor(&self, name: &str) -> R<&Tensor> {
        self.tensors.get(name).ok_or_else(|| WhisperError::Load {
            path: "model.safetensors".into(),
            why: format!("no tensor {name}"),
        })
    }

    fn dims(&self, name: &str) -> R<Vec<usize>> {
        Ok(self.tensor(name)?.dims().to_vec())
    }

    fn get(&self, name: &str) -> R<D::Buf> {
        let v = self
            .tensor(name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.dev.upload(&v)
    }

    /// A linear layer (or a convolution); no bias (Whisper's key
    /// projections) is zeros.
    fn lin(&self, prefix: &str) -> R<Lin<D::Buf>> {
        let wname = format!("{prefix}.weight");
        let dims = self.dims(&wname)?;
        let out = dims.first().copied().unwrap_or(0);
        let inp: usize = dims.iter().skip(1).product();
        let bname = format!("{prefix}.bias");
        let b = if self.tensors.contains_key(&bname) {
            self.get(&bname)?
        } else {
            self.dev.upload(&vec![0f32; out])?
        };
        Ok(Lin {
            w: self.get(&wname)?,
            b,
            out,
            inp,
        })
    }

    fn norm(&self, prefix: &str) -> R<Norm<D::Buf>> {
        Ok(Norm {
            g: self.get(&format!("{prefix}.weight"))?,
            b: self.get(&format!("{prefix}.bias"))?,
        })
    }

    fn ffn(&self, layer: &str) -> R<Ffn<D::Buf>> {
        Ok(Ffn {
            ln: self.norm(&format!("{layer}.final_layer_norm"))?,
            fc1: self.lin(&format!("{layer}.fc1"))?,
            fc2: self.lin(&format!("{layer}.fc2"))?,
        })
    }

    fn attn(&self, prefix: &str, heads: usize) -> R<Attn<D::Buf>> {
        Ok(Attn {
            q: self.lin(&format!("{prefix}.q_proj"))?,
            k: self.lin(&format!("{prefix}.k_proj"))?,
            v: self.lin(&format!("{prefix}.v_proj"))?,
            o: self.lin(&format!("{prefix}.out_proj"))?,
            heads,
        })
    }
}

impl<D: Device> Engine<D> {
    /// Upload the model in `dir` (the Hugging Face layout, its `config`)
    /// to `dev`. `suppress`: the additive mask of tokens never emitted.
    pub fn load(dir: &Path, config: &Config, suppress: &[f32], dev: D) -> R<Engine<D>> {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| WhisperError::Load {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &CandleDevice::Cpu)?;
        drop(bytes);
        let up = Upload { tensors, dev: &dev };
        let d = config.d_model;
        let ffn = up
            .dims("model.encoder.layers.0.fc1.weight")?
            .first()
            .copied()
            .unwrap_or(0);
        let enc = (0..config.encoder_layers)
            .map(|i| {
                let p = format!("model.encoder.layers.{i}");
                Ok(EncLayer {
                    attn: up.attn(&format!("{p}.self_attn"), config.encoder_attention_heads)?,
                    attn_ln: up.norm(&format!("{p}.self_attn_layer_norm"))?,
                    ffn: up.ffn(&p)?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let dec = (0..config.decoder_layers)
            .map(|i| {
                let p = format!("model.decoder.layers.{i}");
                let heads = config.decoder_attention_heads;
                Ok(DecLayer {
                    attn: up.attn(&format!("{p}.self_attn"), heads)?,
                    attn_ln: up.norm(&format!("{p}.self_attn_layer_norm"))?,
                    cross: up.attn(&format!("{p}.encoder_attn"), heads)?,
                    cross_ln: up.norm(&format!("{p}.encoder_attn_layer_norm"))?,
                    ffn: up.ffn(&p)?,
                })
            })
            .collect::<R<Vec<_>>>()?;
        let (conv1, conv2) = (
            up.lin("model.encoder.conv1")?,
            up.lin("model.encoder.conv2")?,
        );
        let enc_pos = up.get("model.encoder.embed_positions.weight")?;
        let enc_ln = up.norm("model.encoder.layer_norm")?;
        let embed = up.get("model.decoder.embed_tokens.weight")?;
        let dec_pos = up.get("model.decoder.embed_positions.weight")?;
        let dec_ln = up.norm("model.decoder.layer_norm")?;
        let suppress = dev.upload(suppress)?;
        dev.uploaded()?;
        let e = Engine {
            d,
            n_mels: config.num_mel_bins,
            ffn,
            vocab: config.vocab_size,
            max_src: config.max_source_positions,
            max_tgt: config.max_target_positions,
            conv1,
            conv2,
            enc_pos,
            enc,
            enc_ln,
            embed,
            dec_pos,
            dec,
            dec_ln,
            suppress,
            pool: Mutex::new(Pool {
                free: Vec::new(),
                made: 0,
                most: usize::MAX,
            }),
            returned: Condvar::new(),
            dev,
        };
        e.check_sizes()?;
        // As many scratches as three quarters of the device's free memory
        // holds (at least one).
        if let Some(free) = e.dev.free_bytes() {
            e.limit_scratches((free / 4 * 3 / e.scratch_bytes()).max(1));
        }
        Ok(e)
    }

    /// Every weight has the size the configuration says.
    fn check_sizes(&self) -> R<()> {
        let len = |b: &D::Buf| <D::Lane as Lane>::len(b);
        let d = self.d;
        let lin_ok = |l: &Lin<D::Buf>, out: usize, inp: usize| {
            l.out == out && l.inp == inp && len(&l.w) == out * inp && len(&l.b) == out
        };
        let norm_ok = |n: &Norm<D::Buf>| len(&n.g) == d && len(&n.b) == d;
        let attn_ok = |a: &Attn<D::Buf>| {
            a.heads > 0
                && d.is_multiple_of(a.heads)
                && [&a.q, &a.k, &a.v, &a.o].iter().all(|l| lin_ok(l, d, d))
        };
        let ffn_ok = |f: &Ffn<D::Buf>| {
            norm_ok(&f.ln) && lin_ok(&f.fc1, self.ffn, d) && lin_ok(&f.fc2, d, self.ffn)
        };
        let ok = d > 0
            && self.ffn > 0
            && lin_ok(&self.conv1, d, self.n_mels * 3)
            && lin_ok(&self.conv2, d, d * 3)
            && len(&self.enc_pos) == self.max_src * d
            && len(&self.embed) == self.vocab * d
            && len(&self.dec_pos) == self.max_tgt * d
            && len(&self.suppress) == self.vocab
            && norm_ok(&self.enc_ln)
            && norm_ok(&self.dec_ln)
            && self
                .enc
                .iter()
                .all(|l| attn_ok(&l.attn) && norm_ok(&l.attn_ln) && ffn_ok(&l.ffn))
            && self.dec.iter().all(|l| {
                attn_ok(&l.attn)
                    && attn_ok(&l.cross)
                    && norm_ok(&l.attn_ln)
                    && norm_ok(&l.cross_ln)
                    && ffn_ok(&l.ffn)
            });
        if ok {
            Ok(())
        } else {
            Err(fail(
                "the model's weights do not have the sizes its config.json gives",
            ))
        }
    }

    /// What runs the windows.
    pub fn name(&self) -> String {
        self.dev.name()
    }

    /// At most `most` scratches (windows beyond wait for one).
    pub fn limit_scratches(&self, most: usize) {
        if let Ok(mut p) = self.pool.lock() {
            p.most = most.max(1);
        }
    }

    /// Scratches made so far.
    pub fn scratches(&self) -> usize {
        self.pool.lock().map_or(0, |p| p.made)
    }

    /// The length of each of a scratch's buffers: sized for the longest
    /// window and decoder run the model takes.
    fn sizes(&self) -> Sizes {
        let (d, src, tgt) = (self.d, self.max_src, self.max_tgt);
        let heads = self
            .enc
            .iter()
            .map(|l| l.attn.heads)
            .chain(self.dec.iter().map(|l| l.attn.heads))
            .max()
            .unwrap_or(1);
        let top = src.max(tgt);
        Sizes {
            mel: self.n_mels * 2 * src,
            cols: (2 * src * self.n_mels * 3).max(src * d * 3),
            x1: 2 * src * d,
            rows: top * d,
            audio: src * d,
            ff: top * self.ffn,
            scores: heads * top * top,
            cache: tgt * d,
            layers: self.dec.len(),
            logits: self.vocab,
        }
    }

    /// Device memory one scratch takes.
    fn scratch_bytes(&self) -> usize {
        let z = self.sizes();
        // x, h, q, o; kk, vv; per decoder layer self K, V and cross K, V.
        let floats = z.mel
            + z.cols
            + z.x1
            + 4 * z.rows
            + 2 * z.audio
            + z.ff
            + z.scores
            + z.layers * 2 * (z.cache + z.audio)
            + z.logits;
        floats * 4
    }

    /// A window's forward pass: a free [`Scratch`], a new one while fewer
    /// than the most exist, else wait for one to come back. A device that
    /// cannot make another (out of memory) while others exist lowers the
    /// most to what it has and the window waits.
    fn forward(&self) -> R<EngineForward<'_, D>> {
        let poisoned = || fail("the scratch pool is poisoned");
        let mut pool = self.pool.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(s) = pool.free.pop() {
                return Ok(EngineForward { e: self, s });
            }
            if pool.made < pool.most {
                pool.made += 1;
                drop(pool);
                let made = self.scratch();
                pool = self.pool.lock().map_err(|_| poisoned())?;
                match made {
                    Ok(s) => return Ok(EngineForward { e: self, s }),
                    Err(e) => {
                        pool.made -= 1;
                        if pool.made == 0 {
                            return Err(e);
                        }
                        pool.most = pool.made;
                        tracing::warn!(scratches = pool.made, error = %e, "no room for another Whisper scratch on the device: windows wait for one");
                    }
                }
                continue;
            }
            pool = self.returned.wait(pool).map_err(|_| poisoned())?;
        }
    }

    fn give_back(&self, f: EngineForward<'_, D>) {
        if let Ok(mut p) = self.pool.lock() {
            p.free.push(f.s);
        }
        self.returned.notify_one();
    }

    fn scratch(&self) -> R<Scratch<D::Lane>> {
        let lane = self.dev.lane()?;
        let z = self.sizes();
        let many = |n: usize| -> R<Vec<_>> { (0..z.layers).map(|_| lane.zeros(n)).collect() };
        Ok(Scratch {
            mel: lane.zeros(z.mel)?,
            cols: lane.zeros(z.cols)?,
            x1: lane.zeros(z.x1)?,
            x: lane.zeros(z.rows)?,
            h: lane.zeros(z.rows)?,
            q: lane.zeros(z.rows)?,
            kk: lane.zeros(z.audio)?,
            vv: lane.zeros(z.audio)?,
            o: lane.zeros(z.rows)?,
            ff: lane.zeros(z.ff)?,
            scores: lane.zeros(z.scores)?,
            self_k: many(z.cache)?,
            self_v: many(z.cache)?,
            cross_k: many(z.audio)?,
            cross_v: many(z.audio)?,
            logits: lane.zeros(z.logits)?,
            t_audio: 0,
            lane,
        })
    }

    /// Transcribe through this engine ([`Whisper`]'s decoding policy).
    pub(crate) fn transcribe(
        &self,
        w: &Whisper,
        pcm: &[f32],
        language: &str,
        prefix: &[u32],
    ) -> R<Transcript> {
        let mut f = self.forward()?;
        let t = w.run(&mut f, pcm, language, prefix);
        self.give_back(f);
        t
    }

    /// The first decode step's logits for a window (to compare with candle).
    pub(crate) fn first_logits(&self, mel: &[f32], frames: usize, prompt: &[u32]) -> R<Vec<f32>> {
        let mut f = self.forward()?;
        let r = (|| {
            f.encode(mel, frames)?;
            f.next_token(prompt, 0)?;
            f.s.lane.read(&f.s.logits, self.vocab)
        })();
        self.give_back(f);
        r
    }
}

/// How far two logit vectors are apart: (the largest difference, the
/// largest magnitude in `a`), finite values only. What the tests and the
/// GPU check compare an engine with candle by.
pub fn logit_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .filter(|d| d.is_finite())
        .fold(0f32, f32::max);
    let top = a
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |m, x| m.max(x.abs()));
    (diff, top)
}

/// The extents a product reads and writes fit its buffers.
fn fits(g: &Gemm, a: (usize, usize), b: (usize, usize), c: (usize, usize)) -> R<()> {
    let (ea, eb, ec) = g.extents();
    if a.1 + ea > a.0 || b.1 + eb > b.0 || c.1 + ec > c.0 {
        return Err(fail(format!(
            "a product's buffers are too small ({g:?}: {ea}, {eb}, {ec} from {}, {}, {} of {}, {}, {})",
            a.1, b.1, c.1, a.0, b.0, c.0
        )));
    }
    Ok(())
}

/// `y[yo..] = x[xo..] W^T + b` over `n` rows, GELU if `gelu`.
fn linear<L: Lane>(
    l: &L,
    lin: &Lin<L::Buf>,
    (x, xo): (&L::Buf, usize),
    n: usize,
    (y, yo): (&mut L::Buf, usize),
    gelu: bool,
) -> R<()> {
    let g = linear_cfg(lin.out, lin.inp, n);
    fits(&g, (L::len(&lin.w), 0), (L::len(x), xo), (L::len(y), yo))?;
    l.gemm(&g, (&lin.w, 0), (x, xo), (&mut *y, yo))?;
    l.bias_act((y, yo), &lin.b, n, lin.out, gelu)
}

/// Multi-head attention of `q[..tq * d]` over `keys`/`values` (`tk` rows
/// of `d` from their offsets) into `out[..tq * d]`.
#[allow(clippy::too_many_arguments)]
fn attention<L: Lane>(
    l: &L,
    heads: usize,
    d: usize,
    q: &L::Buf,
    keys: (&L::Buf, usize),
    values: (&L::Buf, usize),
    (tq, tk): (usize, usize),
    causal: Option<usize>,
    scores: &mut L::Buf,
    out: &mut L::Buf,
) -> R<()> {
    let s = scores_cfg(heads, d, tq, tk);
    fits(
        &s,
        (L::len(keys.0), keys.1),
        (L::len(q), 0),
        (L::len(scores), 0),
    )?;
    l.gemm(&s, keys, (q, 0), (&mut *scores, 0))?;
    l.softmax(scores, heads * tq, tk, tq, causal)?;
    let o = values_cfg(heads, d, tq, tk);
    fits(
        &o,
        (L::len(values.0), values.1),
        (L::len(scores), 0),
        (L::len(out), 0),
    )?;
    l.gemm(&o, values, (scores, 0), (out, 0))
}

/// Where [`Scratch::project_h`] writes: the query, key and value buffers,
/// a decoder layer's self-attention cache from a position on, or its
/// cross-attention keys and values.
#[derive(Clone, Copy)]
enum To {
    Q,
    K,
    V,
    SelfK(usize, usize),
    SelfV(usize, usize),
    CrossK(usize),
    CrossV(usize),
}

/// The keys and values [`Scratch::attend`] reads: the encoder's own, a
/// decoder layer's self-attention cache, or its cross-attention's.
#[derive(Clone, Copy)]
enum Kv {
    Own,
    SelfCache(usize),
    Cross(usize),
}

impl<L: Lane> Scratch<L> {
    /// `h = LN(x)` over `n` rows (x from row `from`).
    fn norm_x(&mut self, norm: &Norm<L::Buf>, from: usize, n: usize, d: usize) -> R<()> {
        if (from + n) * d > L::len(&self.x) || n * d > L::len(&self.h) {
            return Err(fail("a layer norm's buffers are too small"));
        }
        self.lane
            .layer_norm((&self.x, from * d), (&norm.g, &norm.b), &mut self.h, n, d)
    }

    /// `to = h W^T + b` over `n` rows.
    fn project_h(&mut self, lin: &Lin<L::Buf>, n: usize, to: To) -> R<()> {
        let Scratch {
            lane,
            h,
            q,
            kk,
            vv,
            self_k,
            self_v,
            cross_k,
            cross_v,
            ..
        } = self;
        let y: (&mut L::Buf, usize) = match to {
            To::Q => (q, 0),
            To::K => (kk, 0),
            To::V => (vv, 0),
            To::SelfK(j, at) => (layer(self_k, j)?, at * lin.out),
            To::SelfV(j, at) => (layer(self_v, j)?, at * lin.out),
            To::CrossK(j) => (layer(cross_k, j)?, 0),
            To::CrossV(j) => (layer(cross_v, j)?, 0),
        };
        linear(lane, lin, (h, 0), n, y, false)
    }

    /// `o = attention(q, keys, values)` for `tq` queries over `tk` keys.
    fn attend(
        &mut self,
        heads: usize,
        d: usize,
        (tq, tk): (usize, usize),
        causal: Option<usize>,
        kv: Kv,
    ) -> R<()> {
        let Scratch {
            lane,
            q,
            kk,
            vv,
            self_k,
            self_v,
            cross_k,
            cross_v,
            scores,
            o,
            ..
        } = self;
        let (keys, values) = match kv {
            Kv::Own => (&*kk, &*vv),
            Kv::SelfCache(j) => (&*layer(self_k, j)?, &*layer(self_v, j)?),
            Kv::Cross(j) => (&*layer(cross_k, j)?, &*layer(cross_v, j)?),
        };
        attention(
            lane,
            heads,
            d,
            q,
            (keys, 0),
            (values, 0),
            (tq, tk),
            causal,
            scores,
            o,
        )
    }

    /// `x[..n*d] += y[..n*d]` for `y` = h.
    fn add_h(&mut self, n: usize, d: usize) -> R<()> {
        if n * d > L::len(&self.x) || n * d > L::len(&self.h) {
            return Err(fail("an add's buffers are too small"));
        }
        self.lane.add(&mut self.x, (&self.h, 0), n * d)
    }

    /// `x += o W^T + b`: an attention's output projection into the residual.
    fn out_add(&mut self, lin: &Lin<L::Buf>, n: usize, d: usize) -> R<()> {
        linear(&self.lane, lin, (&self.o, 0), n, (&mut self.h, 0), false)?;
        self.add_h(n, d)
    }

    /// `x += fc2(GELU(fc1(LN(x))))`: the feed-forward block.
    fn mlp(&mut self, f: &Ffn<L::Buf>, n: usize, d: usize) -> R<()> {
        self.norm_x(&f.ln, 0, n, d)?;
        linear(&self.lane, &f.fc1, (&self.h, 0), n, (&mut self.ff, 0), true)?;
        linear(
            &self.lane,
            &f.fc2,
            (&self.ff, 0),
            n,
            (&mut self.h, 0),
            false,
        )?;
        self.add_h(n, d)
    }
}

/// A decoder layer's buffer.
fn layer<B>(v: &mut [B], j: usize) -> R<&mut B> {
    v.get_mut(j).ok_or_else(|| fail("no such decoder layer"))
}

/// A window's run: [`Forward`] on the engine's device.
struct EngineForward<'a, D: Device> {
    e: &'a Engine<D>,
    s: Scratch<D::Lane>,
}

impl<D: Device> Forward for EngineForward<'_, D> {
    fn encode(&mut self, mel: &[f32], frames: usize) -> R<()> {
        let (e, s) = (self.e, &mut self.s);
        let d = e.d;
        let t = frames / 2;
        if !frames.is_multiple_of(2) || t == 0 || t > e.max_src || mel.len() != e.n_mels * frames {
            return Err(fail(format!(
                "a window of {frames} mel frames cannot be encoded"
            )));
        }
        s.lane.write(mel, &mut s.mel)?;
        // conv1 (stride 1) and conv2 (stride 2), each one product.
        let len = <D::Lane as Lane>::len;
        if frames * e.n_mels * 3 > len(&s.cols) || t * d * 3 > len(&s.cols) {
            return Err(fail("im2col's buffer is too small"));
        }
        s.lane.im2col(
            &s.mel,
            [frames, 1, e.n_mels, frames, 1, frames],
            &mut s.cols,
        )?;
        linear(
            &s.lane,
            &e.conv1,
            (&s.cols, 0),
            frames,
            (&mut s.x1, 0),
            true,
        )?;
        s.lane.im2col(&s.x1, [1, d, d, frames, 2, t], &mut s.cols)?;
        linear(&s.lane, &e.conv2, (&s.cols, 0), t, (&mut s.x, 0), true)?;
        s.lane.add(&mut s.x, (&e.enc_pos, 0), t * d)?;
        for l in &e.enc {
            let a = &l.attn;
            s.norm_x(&l.attn_ln, 0, t, d)?;
            s.project_h(&a.q, t, To::Q)?;
            s.project_h(&a.k, t, To::K)?;
            s.project_h(&a.v, t, To::V)?;
            s.attend(a.heads, d, (t, t), None, Kv::Own)?;
            s.out_add(&a.o, t, d)?;
            s.mlp(&l.ffn, t, d)?;
        }
        s.norm_x(&e.enc_ln, 0, t, d)?;
        // The audio's keys and values for every decoder layer's cross-attention.
        for (j, l) in e.dec.iter().enumerate() {
            s.project_h(&l.cross.k, t, To::CrossK(j))?;
            s.project_h(&l.cross.v, t, To::CrossV(j))?;
        }
        s.t_audio = t;
        // Wait: the window's timing then measures the device's work.
        s.lane.sync()
    }

    fn next_token(&mut self, tokens: &[u32], offset: usize) -> R<u32> {
        let (e, s) = (self.e, &mut self.s);
        let (d, n, t) = (e.d, tokens.len(), s.t_audio);
        if t == 0 {
            return Err(fail("decoding before encoding"));
        }
        if n == 0 || offset + n > e.max_tgt || tokens.iter().any(|tok| *tok as usize >= e.vocab) {
            return Err(fail(format!(
                "{n} tokens at position {offset} cannot be decoded"
            )));
        }
        s.lane
            .embed(tokens, (&e.embed, &e.dec_pos), offset, d, &mut s.x)?;
        let total = offset + n;
        for (j, l) in e.dec.iter().enumerate() {
            let (a, c) = (&l.attn, &l.cross);
            s.norm_x(&l.attn_ln, 0, n, d)?;
            s.project_h(&a.q, n, To::Q)?;
            s.project_h(&a.k, n, To::SelfK(j, offset))?;
            s.project_h(&a.v, n, To::SelfV(j, offset))?;
            s.attend(a.heads, d, (n, total), Some(offset), Kv::SelfCache(j))?;
            s.out_add(&a.o, n, d)?;
            s.norm_x(&l.cross_ln, 0, n, d)?;
            s.project_h(&c.q, n, To::Q)?;
            s.attend(c.heads, d, (n, t), None, Kv::Cross(j))?;
            s.out_add(&c.o, n, d)?;
            s.mlp(&l.ffn, n, d)?;
        }
        // The last token's logits against the token embedding (a linear
        // layer without bias), then the masked argmax: one int comes back.
        s.norm_x(&e.dec_ln, n - 1, 1, d)?;
        let g = linear_cfg(e.vocab, d, 1);
        let len = <D::Lane as Lane>::len;
        fits(&g, (len(&e.embed), 0), (len(&s.h), 0), (len(&s.logits), 0))?;
        s.lane
            .gemm(&g, (&e.embed, 0), (&s.h, 0), (&mut s.logits, 0))?;
        s.lane.argmax(&s.logits, &e.suppress, e.vocab)
    }
}

/// A model's windows on an engine, whatever its device (what [`Whisper`]
/// holds).
pub(crate) trait Windows: Send + Sync {
    fn on_gpu(&self) -> bool;
    fn transcribe(&self, w: &Whisper, pcm: &[f32], language: &str, prefix: &[u32])
        -> R<Transcript>;
    fn first_logits(&self, mel: &[f32], frames: usize, prompt: &[u32]) -> R<Vec<f32>>;
}

impl<D: Device> Windows for Engine<D> {
    fn on_gpu(&self) -> bool {
        self.dev.is_gpu()
    }

    fn transcribe(
        &self,
        w: &Whisper,
        pcm: &[f32],
        language: &str,
        prefix: &[u32],
    ) -> R<Transcript> {
        Engine::transcribe(self, w, pcm, language, prefix)
    }

    fn first_logits(&self, mel: &[f32], frames: usize, prompt: &[u32]) -> R<Vec<f32>> {
        Engine::first_logits(self, mel, frames, prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{mirror::Mirror, models, whisper::Whisper};
    use super::Engine;

    #[test]
    fn windows_beyond_the_most_scratches_wait_for_one() {
        let dir = models::default_dir();
        assert!(
            models::is_provisioned(&dir),
            "the test command provisions it"
        );
        let w = Whisper::load(&dir).expect("model loads");
        let mask = vec![0f32; w.config.vocab_size];
        let e = Engine::load(&dir, &w.config, &mask, Mirror).expect("engine");
        e.limit_scratches(1);
        // Half a second of a tone, then a second of silence (the window's).
        let pcm: Vec<f32> = (0..8_000).map(|i| 0.2 * (i as f32 * 0.17).sin()).collect();
        let texts: Vec<String> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..3)
                .map(|_| s.spawn(|| e.transcribe(&w, &pcm, "en", &[])))
                .collect();
            runs.into_iter()
                .map(|r| r.join().expect("no panic").expect("transcribed").text)
                .collect()
        });
        assert_eq!(e.scratches(), 1, "one scratch, shared in turn");
        assert!(texts.windows(2).all(|t| t[0] == t[1]), "{texts:?}");
    }
}
