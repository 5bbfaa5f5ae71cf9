//! Whisper on the GPU (feature `cuda`): the same model, weights and
//! arithmetic as the CPU path ([`super::whisper`]), run with cuBLAS for the
//! matrix products and seven small kernels of our own ([`KERNELS`],
//! compiled at start with NVRTC) for the rest: im2col for the two
//! convolutions, bias and GELU, residual adds, layer norm, softmax (with the
//! decoder's causal mask), token embedding and a masked argmax. Everything
//! stays in f32, so a window's tokens match the CPU's (`gpu-check` compares
//! the two on the same weights).
//!
//! Why not candle's own `cuda` feature: it compiles its kernels with nvcc
//! at build time (about 20 minutes on 2 cores, and a CUDA toolkit on every
//! build machine) and links libcuda and cuBLAS dynamically, so a binary
//! built with it does not even start without a driver. cudarc loads libcuda,
//! NVRTC and cuBLAS at run time (`dynamic-loading`): the `cuda` build runs
//! everywhere, and [`GpuWhisper::load`] says what is missing.
//!
//! Sessions share one upload of the weights; each window runs on a
//! [`Scratch`] of its own (a CUDA stream, a cuBLAS handle and every
//! activation buffer, sized for a 30 s window), taken from a pool and given
//! back, so concurrent caption sessions overlap on the card.
//!
//! `unsafe` is allowed in this module only, for kernel launches and cuBLAS
//! calls (cudarc cannot check their arguments): every launch passes exactly
//! its kernel's parameters in order, and every buffer is checked against
//! the sizes a call reads or writes before the call ([`Scratch`] is sized
//! for the model's largest window and decoder length, and
//! [`GpuForward::encode`] and [`GpuForward::next_token`] refuse anything
//! larger).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig,
    PushKernelArg,
};

use super::whisper::{Config, Forward, WhisperError};

fn gpu(e: impl std::fmt::Debug) -> WhisperError {
    WhisperError::Gpu(format!("{e:?}"))
}

/// The kernels, f32. Reductions use blocks of exactly [`BLOCK`] threads.
pub const KERNELS: &str = r#"
#define BLOCK 256

// cols[t, c*3 + k] = x[c, t*stride + k - 1] (0 outside): a kernel-3,
// padding-1 convolution as one matrix product. x's element (c, t) is at
// x[c*sc + t*st].
extern "C" __global__ void im2col3(const float* x, int sc, int st, int cin, int tin,
                                   int stride, int tout, float* cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t w = (size_t)cin * 3;
    if (i >= (size_t)tout * w) return;
    int t = (int)(i / w);
    int r = (int)(i % w);
    int c = r / 3, k = r % 3;
    int s = t * stride + k - 1;
    cols[i] = (s >= 0 && s < tin) ? x[(size_t)c * sc + (size_t)s * st] : 0.0f;
}

// y[r, j] += b[j], then GELU (erf form) if gelu.
extern "C" __global__ void bias_act(float* y, const float* b, int rows, int cols, int gelu) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    float v = y[i] + b[i % cols];
    if (gelu) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    y[i] = v;
}

extern "C" __global__ void add_into(float* y, const float* x, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) y[i] += x[i];
}

__device__ float block_sum(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] += red[tid + o];
        __syncthreads();
    }
    float s = red[0];
    __syncthreads();
    return s;
}

__device__ float block_max(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
        __syncthreads();
    }
    float s = red[0];
    __syncthreads();
    return s;
}

// One block per row of d: y = (x - mean) / sqrt(var + 1e-5) * g + b.
extern "C" __global__ void layer_norm(const float* x, const float* g, const float* b,
                                      float* y, int d) {
    __shared__ float red[BLOCK];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) s += xr[j];
    float mean = block_sum(s, red) / d;
    float v = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) { float t = xr[j] - mean; v += t * t; }
    float inv = rsqrtf(block_sum(v, red) / d + 1e-5f);
    for (int j = threadIdx.x; j < d; j += BLOCK) yr[j] = (xr[j] - mean) * inv * g[j] + b[j];
}

// One block per row of cols (rows = heads * tq). Causal: row i of a head
// (i = row % tq) sees columns up to offset + i.
extern "C" __global__ void softmax_rows(float* s, int cols, int tq, int offset, int causal) {
    __shared__ float red[BLOCK];
    float* r = s + (size_t)blockIdx.x * cols;
    int lim = cols;
    if (causal) lim = min(cols, offset + (int)(blockIdx.x % tq) + 1);
    float m = -3.0e38f;
    for (int j = threadIdx.x; j < lim; j += BLOCK) m = fmaxf(m, r[j]);
    m = block_max(m, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < lim; j += BLOCK) { float e = expf(r[j] - m); r[j] = e; sum += e; }
    float inv = 1.0f / block_sum(sum, red);
    for (int j = threadIdx.x; j < cols; j += BLOCK) r[j] = j < lim ? r[j] * inv : 0.0f;
}

// x[r, j] = table[tok[r], j] + pos[offset + r, j]
extern "C" __global__ void embed_tokens(const unsigned int* tok, const float* table,
                                        const float* pos, int offset, int n, int d, float* x) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * d) return;
    int r = (int)(i / d), j = (int)(i % d);
    x[i] = table[(size_t)tok[r] * d + j] + pos[(size_t)(offset + r) * d + j];
}

// One block: the index of the largest logits[j] + mask[j] (the first on ties).
extern "C" __global__ void argmax_masked(const float* l, const float* mask, int n, int* out) {
    __shared__ float bv[BLOCK];
    __shared__ int bi[BLOCK];
    int tid = threadIdx.x;
    float best = -3.4e38f;
    int idx = 0x7fffffff;
    for (int j = tid; j < n; j += BLOCK) {
        float v = l[j] + mask[j];
        if (v > best) { best = v; idx = j; }
    }
    bv[tid] = best; bi[tid] = idx;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) {
            float v2 = bv[tid + o]; int i2 = bi[tid + o];
            if (v2 > bv[tid] || (v2 == bv[tid] && i2 < bi[tid])) { bv[tid] = v2; bi[tid] = i2; }
        }
        __syncthreads();
    }
    if (tid == 0) out[0] = bi[0] == 0x7fffffff ? 0 : bi[0];
}
"#;

/// Threads per block of every kernel (the reductions assume it).
const BLOCK: u32 = 256;

struct Kernels {
    im2col: CudaFunction,
    bias_act: CudaFunction,
    add: CudaFunction,
    layer_norm: CudaFunction,
    softmax: CudaFunction,
    embed: CudaFunction,
    argmax: CudaFunction,
}

/// `y = x W^T + b`, W row-major `[out, inp]` (PyTorch's layout).
struct Lin {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    out: usize,
    inp: usize,
}

struct Norm {
    g: CudaSlice<f32>,
    b: CudaSlice<f32>,
}

struct Attn {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    heads: usize,
}

struct EncLayer {
    attn: Attn,
    attn_ln: Norm,
    fc1: Lin,
    fc2: Lin,
    ln: Norm,
}

struct DecLayer {
    attn: Attn,
    attn_ln: Norm,
    cross: Attn,
    cross_ln: Norm,
    fc1: Lin,
    fc2: Lin,
    ln: Norm,
}

/// Whisper's weights on the card, shared by every session.
pub struct GpuWhisper {
    /// The card, as the driver names it.
    pub name: String,
    ctx: Arc<CudaContext>,
    k: Kernels,
    d: usize,
    n_mels: usize,
    ffn: usize,
    vocab: usize,
    max_src: usize,
    max_tgt: usize,
    conv1: Lin,
    conv2: Lin,
    enc_pos: CudaSlice<f32>,
    enc: Vec<EncLayer>,
    enc_ln: Norm,
    embed: CudaSlice<f32>,
    dec_pos: CudaSlice<f32>,
    dec: Vec<DecLayer>,
    dec_ln: Norm,
    suppress: CudaSlice<f32>,
    spare: Mutex<Vec<Scratch>>,
}

/// One window's working memory and stream.
pub struct Scratch {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    mel: CudaSlice<f32>,
    cols: CudaSlice<f32>,
    x1: CudaSlice<f32>,
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    q: CudaSlice<f32>,
    kk: CudaSlice<f32>,
    vv: CudaSlice<f32>,
    o: CudaSlice<f32>,
    ff: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    self_k: Vec<CudaSlice<f32>>,
    self_v: Vec<CudaSlice<f32>>,
    cross_k: Vec<CudaSlice<f32>>,
    cross_v: Vec<CudaSlice<f32>>,
    tokens: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    best: CudaSlice<i32>,
    /// Audio positions of the window encoded last (0: none yet).
    t_audio: usize,
}

/// Check that the libraries cudarc loads are there (it panics on first
/// use of one that is missing).
fn libraries_present() -> Result<(), WhisperError> {
    // SAFETY: these only try to load the libraries (dlopen).
    let missing = if !unsafe { cudarc::driver::sys::is_culib_present() } {
        Some("libcuda.so (the NVIDIA driver)")
    } else if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Some("libnvrtc.so (NVRTC, in the CUDA runtime libraries)")
    } else if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        Some("libcublas.so (cuBLAS, in the CUDA runtime libraries)")
    } else {
        None
    };
    match missing {
        Some(lib) => Err(WhisperError::Gpu(format!(
            "{lib} was not found (run on a GPU node with the driver and the CUDA runtime \
             libraries, in a container with NVIDIA_DRIVER_CAPABILITIES=compute,utility; \
             or leave captions on the CPU)"
        ))),
        None => Ok(()),
    }
}

impl GpuWhisper {
    /// Upload the model in `dir` (the Hugging Face layout the CPU path
    /// loaded, with its `config`) to GPU `ordinal`. `suppress` is the
    /// additive mask of tokens never emitted (0 or -inf per vocabulary entry).
    pub fn load(
        dir: &Path,
        config: &Config,
        suppress: &Tensor,
        ordinal: usize,
    ) -> Result<GpuWhisper, WhisperError> {
        libraries_present()?;
        let ctx = CudaContext::new(ordinal).map_err(gpu)?;
        let name = ctx.name().map_err(gpu)?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
            .map_err(|e| WhisperError::Gpu(format!("compiling the Whisper kernels: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(gpu)?;
        let f = |n: &str| module.load_function(n).map_err(gpu);
        let k = Kernels {
            im2col: f("im2col3")?,
            bias_act: f("bias_act")?,
            add: f("add_into")?,
            layer_norm: f("layer_norm")?,
            softmax: f("softmax_rows")?,
            embed: f("embed_tokens")?,
            argmax: f("argmax_masked")?,
        };
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| WhisperError::Load {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        drop(bytes);
        let up = Upload {
            tensors,
            stream: ctx.default_stream(),
        };
        let d = config.d_model;
        let ffn = up.dims("model.encoder.layers.0.fc1.weight")?[0];
        let attn = |p: &str, heads: usize| -> Result<Attn, WhisperError> {
            Ok(Attn {
                q: up.lin(&format!("{p}.q_proj"))?,
                k: up.lin(&format!("{p}.k_proj"))?,
                v: up.lin(&format!("{p}.v_proj"))?,
                o: up.lin(&format!("{p}.out_proj"))?,
                heads,
            })
        };
        let enc = (0..config.encoder_layers)
            .map(|i| {
                let p = format!("model.encoder.layers.{i}");
                Ok(EncLayer {
                    attn: attn(&format!("{p}.self_attn"), config.encoder_attention_heads)?,
                    attn_ln: up.norm(&format!("{p}.self_attn_layer_norm"))?,
                    fc1: up.lin(&format!("{p}.fc1"))?,
                    fc2: up.lin(&format!("{p}.fc2"))?,
                    ln: up.norm(&format!("{p}.final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>, WhisperError>>()?;
        let dec = (0..config.decoder_layers)
            .map(|i| {
                let p = format!("model.decoder.layers.{i}");
                let heads = config.decoder_attention_heads;
                Ok(DecLayer {
                    attn: attn(&format!("{p}.self_attn"), heads)?,
                    attn_ln: up.norm(&format!("{p}.self_attn_layer_norm"))?,
                    cross: attn(&format!("{p}.encoder_attn"), heads)?,
                    cross_ln: up.norm(&format!("{p}.encoder_attn_layer_norm"))?,
                    fc1: up.lin(&format!("{p}.fc1"))?,
                    fc2: up.lin(&format!("{p}.fc2"))?,
                    ln: up.norm(&format!("{p}.final_layer_norm"))?,
                })
            })
            .collect::<Result<Vec<_>, WhisperError>>()?;
        let g = GpuWhisper {
            name,
            k,
            d,
            n_mels: config.num_mel_bins,
            ffn,
            vocab: config.vocab_size,
            max_src: config.max_source_positions,
            max_tgt: config.max_target_positions,
            conv1: up.lin("model.encoder.conv1")?,
            conv2: up.lin("model.encoder.conv2")?,
            enc_pos: up.get("model.encoder.embed_positions.weight")?,
            enc,
            enc_ln: up.norm("model.encoder.layer_norm")?,
            embed: up.get("model.decoder.embed_tokens.weight")?,
            dec_pos: up.get("model.decoder.embed_positions.weight")?,
            dec,
            dec_ln: up.norm("model.decoder.layer_norm")?,
            suppress: up.upload(&suppress.to_vec1::<f32>()?)?,
            spare: Mutex::new(Vec::new()),
            ctx,
        };
        // The uploads are done before any session's stream reads them.
        up.stream.synchronize().map_err(gpu)?;
        let heads_divide = g
            .enc
            .iter()
            .map(|l| l.attn.heads)
            .chain(g.dec.iter().map(|l| l.attn.heads))
            .all(|h| h > 0 && d.is_multiple_of(h));
        if !heads_divide
            || g.conv1.inp != g.n_mels * 3
            || g.conv2.inp != d * 3
            || g.embed.len() != g.vocab * d
        {
            return Err(WhisperError::Gpu(
                "the model's heads, convolutions or embedding do not fit its configured sizes"
                    .into(),
            ));
        }
        Ok(g)
    }

    /// A window's forward pass (a pooled [`Scratch`], or a new one).
    pub(crate) fn forward(&self) -> Result<GpuForward<'_>, WhisperError> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.pop());
        let s = match spare {
            Some(s) => s,
            None => self.scratch()?,
        };
        Ok(GpuForward { g: self, s })
    }

    /// Return a forward pass's scratch to the pool.
    pub(crate) fn give_back(&self, f: GpuForward<'_>) {
        if let Ok(mut s) = self.spare.lock() {
            s.push(f.s);
        }
    }

    fn scratch(&self) -> Result<Scratch, WhisperError> {
        let stream = self.ctx.new_stream().map_err(gpu)?;
        let blas = CudaBlas::new(stream.clone()).map_err(gpu)?;
        let (d, src, tgt) = (self.d, self.max_src, self.max_tgt);
        let heads = self
            .enc
            .iter()
            .map(|l| l.attn.heads)
            .chain(self.dec.iter().map(|l| l.attn.heads))
            .max()
            .unwrap_or(1);
        let z = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(gpu);
        let per_layer = |n: usize, count: usize| -> Result<Vec<CudaSlice<f32>>, WhisperError> {
            (0..count).map(|_| z(n)).collect()
        };
        let layers = self.dec.len();
        Ok(Scratch {
            mel: z(self.n_mels * 2 * src)?,
            cols: z((2 * src * self.n_mels * 3).max(src * d * 3))?,
            x1: z(2 * src * d)?,
            x: z(src.max(tgt) * d)?,
            h: z(src.max(tgt) * d)?,
            q: z(src.max(tgt) * d)?,
            kk: z(src * d)?,
            vv: z(src * d)?,
            o: z(src.max(tgt) * d)?,
            ff: z(src.max(tgt) * self.ffn)?,
            scores: z(heads * src.max(tgt) * src.max(tgt))?,
            self_k: per_layer(tgt * d, layers)?,
            self_v: per_layer(tgt * d, layers)?,
            cross_k: per_layer(src * d, layers)?,
            cross_v: per_layer(src * d, layers)?,
            tokens: stream.alloc_zeros::<u32>(tgt).map_err(gpu)?,
            logits: z(self.vocab)?,
            best: stream.alloc_zeros::<i32>(1).map_err(gpu)?,
            t_audio: 0,
            blas,
            stream,
        })
    }
}

/// Weights from the safetensors file to the card, as f32.
struct Upload {
    tensors: HashMap<String, Tensor>,
    stream: Arc<CudaStream>,
}

impl Upload {
    fn tensor(&self, name: &str) -> Result<&Tensor, WhisperError> {
        self.tensors.get(name).ok_or_else(|| WhisperError::Load {
            path: "model.safetensors".into(),
            why: format!("no tensor {name}"),
        })
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>, WhisperError> {
        Ok(self.tensor(name)?.dims().to_vec())
    }

    fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>, WhisperError> {
        self.stream.clone_htod(v).map_err(gpu)
    }

    fn get(&self, name: &str) -> Result<CudaSlice<f32>, WhisperError> {
        let v = self
            .tensor(name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.upload(&v)
    }

    /// A linear layer (or a convolution, its kernel flattened to
    /// `[out, in * 3]`); no bias (Whisper's key projections) is zeros.
    fn lin(&self, prefix: &str) -> Result<Lin, WhisperError> {
        let wname = format!("{prefix}.weight");
        let dims = self.dims(&wname)?;
        let out = dims[0];
        let inp: usize = dims[1..].iter().product();
        let bname = format!("{prefix}.bias");
        let b = if self.tensors.contains_key(&bname) {
            self.get(&bname)?
        } else {
            self.upload(&vec![0f32; out])?
        };
        Ok(Lin {
            w: self.get(&wname)?,
            b,
            out,
            inp,
        })
    }

    fn norm(&self, prefix: &str) -> Result<Norm, WhisperError> {
        Ok(Norm {
            g: self.get(&format!("{prefix}.weight"))?,
            b: self.get(&format!("{prefix}.bias"))?,
        })
    }
}

/// A window's run: [`Forward`] on the card.
pub(crate) struct GpuForward<'a> {
    g: &'a GpuWhisper,
    s: Scratch,
}

fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i(n: usize) -> i32 {
    n as i32
}

/// cuBLAS is column-major: a row-major `[r, c]` matrix is its `c x r`
/// transpose there. `Y = X W^T` (row-major `[n, out]`) is, column-major,
/// `Y^T (out x n) = op(W) . X^T` with W's storage read transposed.
fn linear_cfg(out: usize, inp: usize, n: usize) -> GemmConfig<f32> {
    GemmConfig {
        transa: Op::CUBLAS_OP_T,
        transb: Op::CUBLAS_OP_N,
        m: i(out),
        n: i(n),
        k: i(inp),
        alpha: 1.0f32,
        lda: i(inp),
        ldb: i(inp),
        beta: 0.0f32,
        ldc: i(out),
    }
}

/// Per head h: `S_h = Q_h K_h^T / sqrt(dh)` (row-major `[tq, tk]`, heads
/// one after another), Q and K row-major `[t, d]` with head h in columns
/// `h*dh..`. Column-major: `S_h^T (tk x tq) = op(K_h) . Q_h^T`.
fn scores_cfg(heads: usize, d: usize, tq: usize, tk: usize) -> StridedBatchedConfig<f32> {
    let dh = d / heads;
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: Op::CUBLAS_OP_T,
            transb: Op::CUBLAS_OP_N,
            m: i(tk),
            n: i(tq),
            k: i(dh),
            alpha: (dh as f32).powf(-0.5),
            lda: i(d),
            ldb: i(d),
            beta: 0.0f32,
            ldc: i(tk),
        },
        batch_size: i(heads),
        stride_a: dh as i64,
        stride_b: dh as i64,
        stride_c: (tq * tk) as i64,
    }
}

/// Per head h: `O_h = P_h V_h` into columns `h*dh..` of the row-major
/// `[tq, d]` output. Column-major: `O_h^T (dh x tq) = V_h^T . P_h^T`.
fn values_cfg(heads: usize, d: usize, tq: usize, tk: usize) -> StridedBatchedConfig<f32> {
    let dh = d / heads;
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: Op::CUBLAS_OP_N,
            transb: Op::CUBLAS_OP_N,
            m: i(dh),
            n: i(tq),
            k: i(tk),
            alpha: 1.0f32,
            lda: i(d),
            ldb: i(tk),
            beta: 0.0f32,
            ldc: i(d),
        },
        batch_size: i(heads),
        stride_a: dh as i64,
        stride_b: (tq * tk) as i64,
        stride_c: dh as i64,
    }
}

/// `y[..rows * lin.out] = x[..rows * lin.inp] W^T + b`, GELU if `gelu`.
#[allow(clippy::too_many_arguments)]
fn linear(
    k: &Kernels,
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    lin: &Lin,
    x: &CudaView<f32>,
    n: usize,
    y: &mut CudaViewMut<f32>,
    gelu: bool,
) -> Result<(), WhisperError> {
    if x.len() < n * lin.inp || y.len() < n * lin.out {
        return Err(WhisperError::Gpu(
            "a linear layer's buffers are too small".into(),
        ));
    }
    let cfg = linear_cfg(lin.out, lin.inp, n);
    // SAFETY: W holds out x inp, x at least n x inp, y at least n x out
    // (checked above), with the leading dimensions given.
    unsafe { blas.gemm(cfg, &lin.w, x, y) }.map_err(gpu)?;
    let (rows_, cols, act) = (i(n), i(lin.out), i32::from(gelu));
    let mut l = stream.launch_builder(&k.bias_act);
    l.arg(y).arg(&lin.b).arg(&rows_).arg(&cols).arg(&act);
    // SAFETY: bias_act(float* y, const float* b, int rows, int cols, int gelu);
    // y holds rows x cols, b cols.
    unsafe { l.launch(blocks(n * lin.out)) }.map_err(gpu)?;
    Ok(())
}

fn layer_norm(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    norm: &Norm,
    x: &CudaView<f32>,
    n: usize,
    d: usize,
    y: &mut CudaViewMut<f32>,
) -> Result<(), WhisperError> {
    if x.len() < n * d || y.len() < n * d || norm.g.len() != d {
        return Err(WhisperError::Gpu(
            "a layer norm's buffers are too small".into(),
        ));
    }
    let dd = i(d);
    let mut l = stream.launch_builder(&k.layer_norm);
    l.arg(x).arg(&norm.g).arg(&norm.b).arg(y).arg(&dd);
    // SAFETY: layer_norm(const float* x, const float* g, const float* b,
    // float* y, int d), one block per row; x and y hold n rows of d.
    unsafe { l.launch(rows(n)) }.map_err(gpu)?;
    Ok(())
}

fn add_into(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    y: &mut CudaSlice<f32>,
    x: &CudaView<f32>,
    n: usize,
) -> Result<(), WhisperError> {
    if y.len() < n || x.len() < n {
        return Err(WhisperError::Gpu("an add's buffers are too small".into()));
    }
    let nn = i(n);
    let mut l = stream.launch_builder(&k.add);
    l.arg(y).arg(x).arg(&nn);
    // SAFETY: add_into(float* y, const float* x, int n); both hold n.
    unsafe { l.launch(blocks(n)) }.map_err(gpu)?;
    Ok(())
}

/// Multi-head attention: `q` `[tq, d]`, `kk` and `vv` `[tk, d]` (heads side
/// by side in each row); `out[tq, d]`. `causal`: the decoder's mask, the
/// new rows starting at that position.
#[allow(clippy::too_many_arguments)]
fn attention(
    k: &Kernels,
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    heads: usize,
    d: usize,
    q: &CudaView<f32>,
    kk: &CudaView<f32>,
    vv: &CudaView<f32>,
    (tq, tk): (usize, usize),
    causal: Option<usize>,
    scores: &mut CudaSlice<f32>,
    out: &mut CudaViewMut<f32>,
) -> Result<(), WhisperError> {
    if q.len() < tq * d
        || kk.len() < tk * d
        || vv.len() < tk * d
        || out.len() < tq * d
        || scores.len() < heads * tq * tk
    {
        return Err(WhisperError::Gpu(
            "attention's buffers are too small".into(),
        ));
    }
    let s = scores_cfg(heads, d, tq, tk);
    // SAFETY: head h reads kk[h*dh + j + t*d] (t < tk, j < dh) and
    // q[h*dh + j + r*d] (r < tq), writes scores[h*tq*tk ..][tq*tk]: inside
    // the sizes checked above.
    unsafe { blas.gemm_strided_batched(s, kk, q, scores) }.map_err(gpu)?;
    let (cols, tq_, off, c) = (
        i(tk),
        i(tq),
        i(causal.unwrap_or(0)),
        i32::from(causal.is_some()),
    );
    let mut l = stream.launch_builder(&k.softmax);
    l.arg(&mut *scores).arg(&cols).arg(&tq_).arg(&off).arg(&c);
    // SAFETY: softmax_rows(float* s, int cols, int tq, int offset, int causal),
    // one block per row of heads * tq rows of tk.
    unsafe { l.launch(rows(heads * tq)) }.map_err(gpu)?;
    let o = values_cfg(heads, d, tq, tk);
    // SAFETY: head h reads vv[h*dh + j + t*d], scores[h*tq*tk + t + r*tk],
    // writes out[h*dh + j + r*d] (j < dh, t < tk, r < tq): checked above.
    unsafe { blas.gemm_strided_batched(o, vv, &*scores, out) }.map_err(gpu)?;
    Ok(())
}

/// `cols[t, c*3 + k] = x[c, t*stride + k - 1]`: a kernel-3, padding-1
/// convolution's input as rows for one product. `dims`: x's strides per
/// channel and per time step, channels, time steps in, stride, out.
fn im2col(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    x: &CudaView<f32>,
    dims: [usize; 6],
    cols: &mut CudaSlice<f32>,
) -> Result<(), WhisperError> {
    let [sc, st, cin, tin, _, tout] = dims;
    let last = (cin - 1) * sc + (tin - 1) * st;
    if cols.len() < tout * cin * 3 || x.len() <= last {
        return Err(WhisperError::Gpu("im2col's buffers are too small".into()));
    }
    let a = dims.map(i);
    let mut l = stream.launch_builder(&k.im2col);
    l.arg(x)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2])
        .arg(&a[3])
        .arg(&a[4])
        .arg(&a[5])
        .arg(cols);
    // SAFETY: im2col3(const float* x, int sc, int st, int cin, int tin,
    // int stride, int tout, float* cols); x holds every (c, t) it reads
    // (the last checked), cols tout x cin*3 (checked).
    unsafe { l.launch(blocks(tout * cin * 3)) }.map_err(gpu)?;
    Ok(())
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

impl Scratch {
    /// `h = LN(x)` over `n` rows.
    fn norm_x(&mut self, k: &Kernels, norm: &Norm, n: usize, d: usize) -> Result<(), WhisperError> {
        layer_norm(
            k,
            &self.stream,
            norm,
            &self.x.slice(..),
            n,
            d,
            &mut self.h.slice_mut(..),
        )
    }

    /// `to = h W^T + b` over `n` rows.
    fn project_h(&mut self, k: &Kernels, lin: &Lin, n: usize, to: To) -> Result<(), WhisperError> {
        let Scratch {
            blas,
            stream,
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
        let rows = |from: usize| from * lin.out..(from + n) * lin.out;
        let mut y = match to {
            To::Q => q.slice_mut(..),
            To::K => kk.slice_mut(..),
            To::V => vv.slice_mut(..),
            To::SelfK(j, at) => self_k[j].slice_mut(rows(at)),
            To::SelfV(j, at) => self_v[j].slice_mut(rows(at)),
            To::CrossK(j) => cross_k[j].slice_mut(..),
            To::CrossV(j) => cross_v[j].slice_mut(..),
        };
        linear(k, blas, stream, lin, &h.slice(..), n, &mut y, false)
    }

    /// `o = attention(q, keys, values)` for `tq` queries over `tk` keys.
    fn attend(
        &mut self,
        k: &Kernels,
        heads: usize,
        d: usize,
        (tq, tk): (usize, usize),
        causal: Option<usize>,
        kv: Kv,
    ) -> Result<(), WhisperError> {
        let Scratch {
            blas,
            stream,
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
            Kv::Own => (kk.slice(..), vv.slice(..)),
            Kv::SelfCache(j) => (self_k[j].slice(..tk * d), self_v[j].slice(..tk * d)),
            Kv::Cross(j) => (cross_k[j].slice(..tk * d), cross_v[j].slice(..tk * d)),
        };
        attention(
            k,
            blas,
            stream,
            heads,
            d,
            &q.slice(..),
            &keys,
            &values,
            (tq, tk),
            causal,
            scores,
            &mut o.slice_mut(..),
        )
    }

    /// `x += o W^T + b`: an attention's output projection into the residual.
    fn out_add(&mut self, k: &Kernels, lin: &Lin, n: usize, d: usize) -> Result<(), WhisperError> {
        linear(
            k,
            &self.blas,
            &self.stream,
            lin,
            &self.o.slice(..),
            n,
            &mut self.h.slice_mut(..),
            false,
        )?;
        add_into(k, &self.stream, &mut self.x, &self.h.slice(..), n * d)
    }

    /// `x += fc2(GELU(fc1(LN(x))))`: the feed-forward block.
    fn mlp(
        &mut self,
        k: &Kernels,
        (norm, fc1, fc2): (&Norm, &Lin, &Lin),
        n: usize,
        d: usize,
    ) -> Result<(), WhisperError> {
        self.norm_x(k, norm, n, d)?;
        linear(
            k,
            &self.blas,
            &self.stream,
            fc1,
            &self.h.slice(..),
            n,
            &mut self.ff.slice_mut(..),
            true,
        )?;
        linear(
            k,
            &self.blas,
            &self.stream,
            fc2,
            &self.ff.slice(..),
            n,
            &mut self.h.slice_mut(..),
            false,
        )?;
        add_into(k, &self.stream, &mut self.x, &self.h.slice(..), n * d)
    }
}

impl GpuForward<'_> {
    /// Wait for the stream (timings then measure the GPU's work).
    fn sync(&self) -> Result<(), WhisperError> {
        self.s.stream.synchronize().map_err(gpu)
    }
}

impl Forward for GpuForward<'_> {
    fn encode(&mut self, mel: &[f32], frames: usize) -> Result<(), WhisperError> {
        let g = self.g;
        let s = &mut self.s;
        let (d, k) = (g.d, &g.k);
        let t = frames / 2;
        if !frames.is_multiple_of(2) || t == 0 || t > g.max_src || mel.len() != g.n_mels * frames {
            return Err(WhisperError::Gpu(format!(
                "a window of {frames} mel frames cannot be encoded"
            )));
        }
        s.stream
            .memcpy_htod(mel, &mut s.mel.slice_mut(..mel.len()))
            .map_err(gpu)?;
        // conv1 (stride 1) and conv2 (stride 2), each one product.
        im2col(
            k,
            &s.stream,
            &s.mel.slice(..mel.len()),
            [frames, 1, g.n_mels, frames, 1, frames],
            &mut s.cols,
        )?;
        linear(
            k,
            &s.blas,
            &s.stream,
            &g.conv1,
            &s.cols.slice(..),
            frames,
            &mut s.x1.slice_mut(..),
            true,
        )?;
        im2col(
            k,
            &s.stream,
            &s.x1.slice(..),
            [1, d, d, frames, 2, t],
            &mut s.cols,
        )?;
        linear(
            k,
            &s.blas,
            &s.stream,
            &g.conv2,
            &s.cols.slice(..),
            t,
            &mut s.x.slice_mut(..),
            true,
        )?;
        add_into(k, &s.stream, &mut s.x, &g.enc_pos.slice(..t * d), t * d)?;
        for l in &g.enc {
            let a = &l.attn;
            s.norm_x(k, &l.attn_ln, t, d)?;
            s.project_h(k, &a.q, t, To::Q)?;
            s.project_h(k, &a.k, t, To::K)?;
            s.project_h(k, &a.v, t, To::V)?;
            s.attend(k, a.heads, d, (t, t), None, Kv::Own)?;
            s.out_add(k, &a.o, t, d)?;
            s.mlp(k, (&l.ln, &l.fc1, &l.fc2), t, d)?;
        }
        layer_norm(
            k,
            &s.stream,
            &g.enc_ln,
            &s.x.slice(..),
            t,
            d,
            &mut s.h.slice_mut(..),
        )?;
        // The audio's keys and values for every decoder layer's cross-attention.
        for (j, l) in g.dec.iter().enumerate() {
            s.project_h(k, &l.cross.k, t, To::CrossK(j))?;
            s.project_h(k, &l.cross.v, t, To::CrossV(j))?;
        }
        s.t_audio = t;
        self.sync()
    }

    fn next_token(&mut self, tokens: &[u32], offset: usize) -> Result<u32, WhisperError> {
        let g = self.g;
        let s = &mut self.s;
        let (d, k, n, t) = (g.d, &g.k, tokens.len(), s.t_audio);
        if t == 0 {
            return Err(WhisperError::Gpu("decoding before encoding".into()));
        }
        if n == 0 || offset + n > g.max_tgt || tokens.iter().any(|tok| *tok as usize >= g.vocab) {
            return Err(WhisperError::Gpu(format!(
                "{n} tokens at position {offset} cannot be decoded"
            )));
        }
        s.stream
            .memcpy_htod(tokens, &mut s.tokens.slice_mut(..n))
            .map_err(gpu)?;
        let (off, nn, dd) = (i(offset), i(n), i(d));
        let mut l = s.stream.launch_builder(&k.embed);
        l.arg(&s.tokens)
            .arg(&g.embed)
            .arg(&g.dec_pos)
            .arg(&off)
            .arg(&nn)
            .arg(&dd)
            .arg(&mut s.x);
        // SAFETY: embed_tokens(const unsigned int* tok, const float* table,
        // const float* pos, int offset, int n, int d, float* x): tokens < vocab
        // and offset + n <= max_tgt (checked), x holds n x d.
        unsafe { l.launch(blocks(n * d)) }.map_err(gpu)?;
        let total = offset + n;
        for (j, l) in g.dec.iter().enumerate() {
            let (a, c) = (&l.attn, &l.cross);
            s.norm_x(k, &l.attn_ln, n, d)?;
            s.project_h(k, &a.q, n, To::Q)?;
            s.project_h(k, &a.k, n, To::SelfK(j, offset))?;
            s.project_h(k, &a.v, n, To::SelfV(j, offset))?;
            s.attend(k, a.heads, d, (n, total), Some(offset), Kv::SelfCache(j))?;
            s.out_add(k, &a.o, n, d)?;
            s.norm_x(k, &l.cross_ln, n, d)?;
            s.project_h(k, &c.q, n, To::Q)?;
            s.attend(k, c.heads, d, (n, t), None, Kv::Cross(j))?;
            s.out_add(k, &c.o, n, d)?;
            s.mlp(k, (&l.ln, &l.fc1, &l.fc2), n, d)?;
        }
        // The last token's logits against the token embedding, then the
        // masked argmax on the card: one int comes back.
        layer_norm(
            k,
            &s.stream,
            &g.dec_ln,
            &s.x.slice((n - 1) * d..n * d),
            1,
            d,
            &mut s.h.slice_mut(..d),
        )?;
        // Logits = h E^T: a linear layer of the embedding, no bias.
        let cfg = linear_cfg(g.vocab, d, 1);
        // SAFETY: the embedding holds vocab x d (checked at load), h at
        // least d, logits vocab.
        unsafe { s.blas.gemm(cfg, &g.embed, &s.h.slice(..d), &mut s.logits) }.map_err(gpu)?;
        let vocab = i(g.vocab);
        let mut l = s.stream.launch_builder(&k.argmax);
        l.arg(&s.logits)
            .arg(&g.suppress)
            .arg(&vocab)
            .arg(&mut s.best);
        // SAFETY: argmax_masked(const float* l, const float* mask, int n,
        // int* out), one block; logits and mask hold vocab, out 1.
        unsafe { l.launch(rows(1)) }.map_err(gpu)?;
        let mut best = [0i32; 1];
        s.stream.memcpy_dtoh(&s.best, &mut best).map_err(gpu)?;
        s.stream.synchronize().map_err(gpu)?;
        u32::try_from(best[0]).map_err(|_| WhisperError::Gpu("a negative token".into()))
    }
}

impl GpuForward<'_> {
    /// The first decode step's logits (for comparing with the CPU):
    /// encodes `mel`, feeds `prompt` and copies the logits back.
    pub(crate) fn first_logits(
        &mut self,
        mel: &[f32],
        frames: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, WhisperError> {
        self.encode(mel, frames)?;
        self.next_token(prompt, 0)?;
        let mut out = vec![0f32; self.g.vocab];
        self.s
            .stream
            .memcpy_dtoh(&self.s.logits, &mut out)
            .map_err(gpu)?;
        self.sync()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's strided batched sgemm, column-major, as its documentation
    /// defines it: the reference the configurations are checked against.
    fn sgemm(c: &StridedBatchedConfig<f32>, a: &[f32], b: &[f32], out: &mut [f32]) {
        let g = &c.gemm;
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        for batch in 0..c.batch_size as usize {
            let (oa, ob, oc) = (
                batch * c.stride_a as usize,
                batch * c.stride_b as usize,
                batch * c.stride_c as usize,
            );
            for i in 0..m {
                for j in 0..n {
                    let mut sum = 0f32;
                    for p in 0..k {
                        let x = match g.transa {
                            Op::CUBLAS_OP_N => a[oa + i + p * lda],
                            _ => a[oa + p + i * lda],
                        };
                        let y = match g.transb {
                            Op::CUBLAS_OP_N => b[ob + p + j * ldb],
                            _ => b[ob + j + p * ldb],
                        };
                        sum += x * y;
                    }
                    let o = &mut out[oc + i + j * ldc];
                    *o = g.alpha * sum + g.beta * *o;
                }
            }
        }
    }

    fn one(g: GemmConfig<f32>) -> StridedBatchedConfig<f32> {
        StridedBatchedConfig {
            gemm: g,
            batch_size: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4, "at {i}: {x} against {y}");
        }
    }

    #[test]
    fn the_linear_layout_is_x_times_w_transposed() {
        let (out, inp, n) = (5, 7, 3);
        let (w, x) = (values(out * inp, 1), values(n * inp, 2));
        let mut y = vec![0f32; n * out];
        sgemm(&one(linear_cfg(out, inp, n)), &w, &x, &mut y);
        let want: Vec<f32> = (0..n)
            .flat_map(|r| {
                let (w, x) = (&w, &x);
                (0..out).map(move |o| (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum())
            })
            .collect();
        close(&y, &want);
    }

    #[test]
    fn the_attention_layouts_give_each_heads_softmax_of_q_k_times_v() {
        let (heads, d, tq, tk) = (3, 12, 4, 6);
        let dh = d / heads;
        let (q, k, v) = (values(tq * d, 3), values(tk * d, 4), values(tk * d, 5));
        let mut s = vec![0f32; heads * tq * tk];
        sgemm(&scores_cfg(heads, d, tq, tk), &k, &q, &mut s);
        // The softmax kernel's arithmetic, causal from position tk - tq.
        let offset = tk - tq;
        for (row, r) in s.chunks_mut(tk).enumerate() {
            let lim = tk.min(offset + row % tq + 1);
            let m = r[..lim].iter().copied().fold(f32::MIN, f32::max);
            let sum: f32 = r[..lim].iter().map(|x| (x - m).exp()).sum();
            for (j, x) in r.iter_mut().enumerate() {
                *x = if j < lim { (*x - m).exp() / sum } else { 0.0 };
            }
        }
        let mut o = vec![0f32; tq * d];
        sgemm(&values_cfg(heads, d, tq, tk), &v, &s, &mut o);
        // Row-major, head by head, as candle computes it.
        let mut want = vec![0f32; tq * d];
        for h in 0..heads {
            for i in 0..tq {
                let lim = tk.min(offset + i + 1);
                let w: Vec<f32> = (0..lim)
                    .map(|t| {
                        (0..dh)
                            .map(|j| q[i * d + h * dh + j] * k[t * d + h * dh + j])
                            .sum::<f32>()
                            / (dh as f32).sqrt()
                    })
                    .collect();
                let m = w.iter().copied().fold(f32::MIN, f32::max);
                let sum: f32 = w.iter().map(|x| (x - m).exp()).sum();
                for j in 0..dh {
                    want[i * d + h * dh + j] = (0..lim)
                        .map(|t| (w[t] - m).exp() / sum * v[t * d + h * dh + j])
                        .sum();
                }
            }
        }
        close(&o, &want);
    }
    /// NVRTC needs no GPU: where its library is (the test command puts
    /// NVIDIA's wheel on the library path and sets BALIE_REQUIRE_NVRTC),
    /// both kernel sources must compile.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("BALIE_REQUIRE_NVRTC").is_none(),
                "BALIE_REQUIRE_NVRTC is set but libnvrtc.so was not found"
            );
            eprintln!("no NVRTC here: the kernels were not compiled");
            return;
        }
        for (name, src) in [("Whisper", super::KERNELS), ("scaling", crate::gpu::KERNEL)] {
            let ptx = cudarc::nvrtc::compile_ptx(src)
                .unwrap_or_else(|e| panic!("the {name} kernels: {e:?}"));
            assert!(!ptx.to_src().is_empty(), "{name}: empty PTX");
        }
    }
}
