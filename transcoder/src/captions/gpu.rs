//! Whisper on the GPU (feature `cuda`): the engine of
//! [`super::engine`] on a CUDA device. Matrix products are cuBLAS sgemm
//! (strided-batched over the heads for attention); the rest are seven
//! small f32 kernels of our own (`captions/kernels.rs`, compiled at start with NVRTC):
//! im2col for the two convolutions, bias and GELU, residual adds, layer
//! norm, softmax (with the decoder's causal mask), token embedding and a
//! masked argmax, so one int per token comes back.
//!
//! Why not candle's own `cuda` feature: it compiles its kernels with nvcc
//! at build time (about 20 minutes on 2 cores, and a CUDA toolkit on every
//! build machine) and links libcuda and cuBLAS dynamically, so a binary
//! built with it does not even start without a driver. cudarc loads libcuda,
//! NVRTC and cuBLAS at run time (`dynamic-loading`): the `cuda` build runs
//! everywhere, and [`load`] says what is missing.
//!
//! Each lane is a CUDA stream with its own cuBLAS handle (windows of
//! concurrent caption sessions overlap on the card); the weights are
//! uploaded once on the default stream and shared.
//!
//! `unsafe` is allowed in this module only, for kernel launches and cuBLAS
//! calls (cudarc cannot check their arguments): every launch passes exactly
//! its kernel's parameters in order, and the engine checks every call's
//! extent against its buffers before the lane is asked (`engine::fits` and
//! the checks beside each call there).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{CudaBlas, Gemm as _, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::engine::{Device, Engine, Gemm, Lane, R};
use super::kernels::KERNELS;
use super::whisper::{Config, WhisperError};

fn gpu(e: impl std::fmt::Debug) -> WhisperError {
    WhisperError::Gpu(format!("{e:?}"))
}

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

/// The card: its context and the compiled kernels.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    k: Arc<Kernels>,
    name: String,
}

/// One window's CUDA stream and cuBLAS handle, and the few ints it moves.
pub struct CudaLane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Arc<Kernels>,
    tokens: RefCell<CudaSlice<u32>>,
    best: RefCell<CudaSlice<i32>>,
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

/// Open GPU `ordinal`, compile the kernels and upload the model in `dir`.
pub fn load(
    dir: &Path,
    config: &Config,
    suppress: &[f32],
    ordinal: usize,
) -> Result<Engine<Cuda>, WhisperError> {
    libraries_present()?;
    let ctx = CudaContext::new(ordinal).map_err(gpu)?;
    let name = ctx.name().map_err(gpu)?;
    let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
        .map_err(|e| WhisperError::Gpu(format!("compiling the Whisper kernels: {e:?}")))?;
    let module = ctx.load_module(ptx).map_err(gpu)?;
    let f = |n: &str| module.load_function(n).map_err(gpu);
    let k = Arc::new(Kernels {
        im2col: f("im2col3")?,
        bias_act: f("bias_act")?,
        add: f("add_into")?,
        layer_norm: f("layer_norm")?,
        softmax: f("softmax_rows")?,
        embed: f("embed_tokens")?,
        argmax: f("argmax_masked")?,
    });
    Engine::load(dir, config, suppress, Cuda { ctx, k, name })
}

impl Device for Cuda {
    type Buf = CudaSlice<f32>;
    type Lane = CudaLane;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn lane(&self) -> R<CudaLane> {
        let stream = self.ctx.new_stream().map_err(gpu)?;
        let blas = CudaBlas::new(stream.clone()).map_err(gpu)?;
        Ok(CudaLane {
            tokens: RefCell::new(stream.alloc_zeros::<u32>(4096).map_err(gpu)?),
            best: RefCell::new(stream.alloc_zeros::<i32>(1).map_err(gpu)?),
            k: self.k.clone(),
            blas,
            stream,
        })
    }

    fn upload(&self, v: &[f32]) -> R<CudaSlice<f32>> {
        self.ctx.default_stream().clone_htod(v).map_err(gpu)
    }

    fn uploaded(&self) -> R<()> {
        self.ctx.default_stream().synchronize().map_err(gpu)
    }

    fn free_bytes(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free)
    }
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

/// Our [`Gemm`] as cudarc's configuration.
fn cublas_cfg(g: &Gemm) -> StridedBatchedConfig<f32> {
    let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op(g.ta),
            transb: op(g.tb),
            m: i(g.m),
            n: i(g.n),
            k: i(g.k),
            alpha: g.alpha,
            lda: i(g.lda),
            ldb: i(g.ldb),
            beta: 0.0f32,
            ldc: i(g.ldc),
        },
        batch_size: i(g.batch),
        stride_a: g.sa as i64,
        stride_b: g.sb as i64,
        stride_c: g.sc as i64,
    }
}

/// `buf[off..]`, or an error instead of cudarc's panic.
fn from(buf: &CudaSlice<f32>, off: usize) -> R<cudarc::driver::CudaView<'_, f32>> {
    buf.try_slice(off..)
        .ok_or_else(|| WhisperError::Gpu("an offset past a buffer".into()))
}

fn from_mut(buf: &mut CudaSlice<f32>, off: usize) -> R<cudarc::driver::CudaViewMut<'_, f32>> {
    buf.try_slice_mut(off..)
        .ok_or_else(|| WhisperError::Gpu("an offset past a buffer".into()))
}

impl Lane for CudaLane {
    type Buf = CudaSlice<f32>;

    fn zeros(&self, n: usize) -> R<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(gpu)
    }

    fn len(buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn write(&self, data: &[f32], to: &mut CudaSlice<f32>) -> R<()> {
        let mut view = to
            .try_slice_mut(..data.len())
            .ok_or_else(|| WhisperError::Gpu("writing past a buffer".into()))?;
        self.stream.memcpy_htod(data, &mut view).map_err(gpu)
    }

    fn read(&self, from_buf: &CudaSlice<f32>, n: usize) -> R<Vec<f32>> {
        let view = from_buf
            .try_slice(..n)
            .ok_or_else(|| WhisperError::Gpu("reading past a buffer".into()))?;
        let mut out = vec![0f32; n];
        self.stream.memcpy_dtoh(&view, &mut out).map_err(gpu)?;
        self.sync()?;
        Ok(out)
    }

    fn gemm(
        &self,
        g: &Gemm,
        (a, oa): (&CudaSlice<f32>, usize),
        (b, ob): (&CudaSlice<f32>, usize),
        (c, oc): (&mut CudaSlice<f32>, usize),
    ) -> R<()> {
        let (a, b, mut c) = (from(a, oa)?, from(b, ob)?, from_mut(c, oc)?);
        let cfg = cublas_cfg(g);
        // SAFETY: the engine checked that A, B and C hold the extents this
        // product reads and writes from these offsets (`engine::fits`).
        if g.batch == 1 {
            unsafe { self.blas.gemm(cfg.gemm, &a, &b, &mut c) }.map_err(gpu)
        } else {
            unsafe { self.blas.gemm_strided_batched(cfg, &a, &b, &mut c) }.map_err(gpu)
        }
    }

    fn im2col(&self, x: &CudaSlice<f32>, dims: [usize; 6], cols: &mut CudaSlice<f32>) -> R<()> {
        let [_, _, cin, _, _, tout] = dims;
        let a = dims.map(i);
        let mut l = self.stream.launch_builder(&self.k.im2col);
        l.arg(x)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2])
            .arg(&a[3])
            .arg(&a[4])
            .arg(&a[5])
            .arg(cols);
        // SAFETY: im2col3(const float* x, int sc, int st, int cin, int tin,
        // int stride, int tout, float* cols); the engine checked x holds
        // cin x tin at those strides and cols tout x cin*3.
        unsafe { l.launch(blocks(tout * cin * 3)) }.map_err(gpu)?;
        Ok(())
    }

    fn bias_act(
        &self,
        (y, off): (&mut CudaSlice<f32>, usize),
        b: &CudaSlice<f32>,
        rows_: usize,
        cols: usize,
        gelu: bool,
    ) -> R<()> {
        let mut y = from_mut(y, off)?;
        let (r, c, act) = (i(rows_), i(cols), i32::from(gelu));
        let mut l = self.stream.launch_builder(&self.k.bias_act);
        l.arg(&mut y).arg(b).arg(&r).arg(&c).arg(&act);
        // SAFETY: bias_act(float* y, const float* b, int rows, int cols, int
        // gelu); y holds rows x cols from the offset (the product before it
        // wrote them), b cols.
        unsafe { l.launch(blocks(rows_ * cols)) }.map_err(gpu)?;
        Ok(())
    }

    fn add(&self, y: &mut CudaSlice<f32>, (x, off): (&CudaSlice<f32>, usize), n: usize) -> R<()> {
        let x = from(x, off)?;
        let nn = i(n);
        let mut l = self.stream.launch_builder(&self.k.add);
        l.arg(y).arg(&x).arg(&nn);
        // SAFETY: add_into(float* y, const float* x, int n); both hold n
        // (checked by the engine).
        unsafe { l.launch(blocks(n)) }.map_err(gpu)?;
        Ok(())
    }

    fn layer_norm(
        &self,
        (x, off): (&CudaSlice<f32>, usize),
        (g, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        y: &mut CudaSlice<f32>,
        rows_: usize,
        d: usize,
    ) -> R<()> {
        let x = from(x, off)?;
        let dd = i(d);
        let mut l = self.stream.launch_builder(&self.k.layer_norm);
        l.arg(&x).arg(g).arg(b).arg(y).arg(&dd);
        // SAFETY: layer_norm(const float* x, const float* g, const float* b,
        // float* y, int d), one block per row; x and y hold rows x d
        // (checked by the engine), g and b d.
        unsafe { l.launch(rows(rows_)) }.map_err(gpu)?;
        Ok(())
    }

    fn softmax(
        &self,
        s: &mut CudaSlice<f32>,
        rows_: usize,
        cols: usize,
        tq: usize,
        causal: Option<usize>,
    ) -> R<()> {
        let (c, t, off, on) = (
            i(cols),
            i(tq),
            i(causal.unwrap_or(0)),
            i32::from(causal.is_some()),
        );
        let mut l = self.stream.launch_builder(&self.k.softmax);
        l.arg(s).arg(&c).arg(&t).arg(&off).arg(&on);
        // SAFETY: softmax_rows(float* s, int cols, int tq, int offset, int
        // causal), one block per row; s holds rows x cols (the product
        // before it wrote them).
        unsafe { l.launch(rows(rows_)) }.map_err(gpu)?;
        Ok(())
    }

    fn embed(
        &self,
        tokens: &[u32],
        (table, pos): (&CudaSlice<f32>, &CudaSlice<f32>),
        offset: usize,
        d: usize,
        x: &mut CudaSlice<f32>,
    ) -> R<()> {
        let n = tokens.len();
        let mut tok = self.tokens.borrow_mut();
        {
            let mut dst = tok
                .try_slice_mut(..n)
                .ok_or_else(|| WhisperError::Gpu("too many tokens".into()))?;
            self.stream.memcpy_htod(tokens, &mut dst).map_err(gpu)?;
        }
        let (o, nn, dd) = (i(offset), i(n), i(d));
        let mut l = self.stream.launch_builder(&self.k.embed);
        l.arg(&*tok)
            .arg(table)
            .arg(pos)
            .arg(&o)
            .arg(&nn)
            .arg(&dd)
            .arg(x);
        // SAFETY: embed_tokens(const unsigned int* tok, const float* table,
        // const float* pos, int offset, int n, int d, float* x): the engine
        // checked tokens < vocab, offset + n <= the positions, x n x d.
        unsafe { l.launch(blocks(n * d)) }.map_err(gpu)?;
        Ok(())
    }

    fn argmax(&self, logits: &CudaSlice<f32>, mask: &CudaSlice<f32>, n: usize) -> R<u32> {
        let nn = i(n);
        let mut best_buf = self.best.borrow_mut();
        let mut l = self.stream.launch_builder(&self.k.argmax);
        l.arg(logits).arg(mask).arg(&nn).arg(&mut *best_buf);
        // SAFETY: argmax_masked(const float* l, const float* mask, int n,
        // int* out), one block; logits and mask hold n, out 1.
        unsafe { l.launch(rows(1)) }.map_err(gpu)?;
        let mut best = [0i32; 1];
        self.stream
            .memcpy_dtoh(&*best_buf, &mut best)
            .map_err(gpu)?;
        self.sync()?;
        u32::try_from(best[0]).map_err(|_| WhisperError::Gpu("a negative token".into()))
    }

    fn sync(&self) -> R<()> {
        self.stream.synchronize().map_err(gpu)
    }
}

#[cfg(test)]
mod tests {
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
