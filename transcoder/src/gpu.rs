//! The `cuda` backend's GPU side (feature `cuda`): find the card, say what
//! it offers, and scale a decoded frame into every layer in one kernel
//! launch.
//!
//! - **Decode**: FFmpeg's NVDEC decoders (`h264_cuvid`, `vp8_cuvid`) through
//!   ffmpeg-next, in one of three ways ([`Nvdec`]): a CUDA context per
//!   decoder and the picture in host memory (NV12; FFmpeg's default, and
//!   one upload per frame, 1.4 MB at 720p), the same on one shared context,
//!   or on the shared context with the picture left in GPU memory (FFmpeg's
//!   hardware frames, reached through its C API: ffmpeg-next does not wrap
//!   them), where the kernel reads it with no upload at all.
//! - **Scale**: our own kernel ([`KERNEL`], compiled at start with NVRTC
//!   through cudarc): one launch makes every layer (grid z = layer), each
//!   output pixel the average of its source footprint (a box filter: at
//!   2x and 4x down it is what a good downscaler does, without aliasing).
//!   It reads NV12 or I420, so a frame the CPU decoded (a codec the card's
//!   NVDEC lacks) is scaled on the GPU too.
//! - **Encode**: `h264_nvenc` where the card has NVENC (H100 and H200 have
//!   none), else libvpx/libx264 on the CPU, as the CPU backend.
//!
//! cudarc loads libcuda and libnvrtc at run time (`dynamic-loading`), so the
//! binary builds and starts without CUDA; [`Gpu::open`] checks that the
//! driver is there before touching it (cudarc would panic otherwise) and
//! returns [`GpuError::NoDriver`].
//!
//! `unsafe` is allowed in this module only: a kernel launch is unsafe in
//! cudarc (it cannot check the arguments against the kernel's signature).
//! The one launch below passes exactly the kernel's parameters, in order,
//! and every buffer is sized for the grid it covers.
#![allow(unsafe_code)]

use std::sync::Arc;

use balie_offload::Size;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use ffmpeg::ffi::AVPixelFormat;
use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

pub use crate::pipeline::Nvdec;

/// Why the GPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no NVIDIA driver: {0} was not found (run on a GPU node with the driver and, in a container, NVIDIA_DRIVER_CAPABILITIES=compute,video,utility; or use --backend cpu)")]
    NoDriver(&'static str),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("compiling the scaling kernel with NVRTC: {0}")]
    Compile(String),
    #[error("picture format {0:?} cannot be scaled on the GPU")]
    Format(Pixel),
}

fn driver(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// What the card offers.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    /// Compute capability (major, minor).
    pub compute: (i32, i32),
    pub memory_mib: u64,
    /// FFmpeg NVDEC decoders that opened on this card.
    pub nvdec: Vec<&'static str>,
    /// `h264_nvenc` opened: the card has NVENC.
    pub nvenc: bool,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (compute {}.{}, {} MiB), NVDEC: {}, NVENC: {}",
            self.name,
            self.compute.0,
            self.compute.1,
            self.memory_mib,
            if self.nvdec.is_empty() {
                "none".to_string()
            } else {
                self.nvdec.join(", ")
            },
            if self.nvenc {
                "h264_nvenc"
            } else {
                "none (encoding on the CPU)"
            }
        )
    }
}

/// The scaling kernel. `layers` holds five ints per layer: width, height,
/// and the offsets of its Y, U and V planes in `out` (I420, tightly packed).
/// Chroma is read at `u[x * cstep]` and `v[x * cstep]`: NV12 passes the
/// interleaved plane twice (v one byte on) with step 2, I420 its two planes
/// with step 1.
pub const KERNEL: &str = r#"
extern "C" __global__ void scale_layers(
    const unsigned char* y, int sy,
    const unsigned char* u, const unsigned char* v, int suv, int cstep,
    int sw, int sh,
    const int* layers, int n,
    unsigned char* out)
{
    int l = blockIdx.z;
    if (l >= n) return;
    const int* p = layers + l * 5;
    int w = p[0], h = p[1];
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= w || r >= h) return;

    // Luma: the average of the source pixels this one covers.
    int x0 = x * sw / w, x1 = max(x0 + 1, (x + 1) * sw / w);
    int y0 = r * sh / h, y1 = max(y0 + 1, (r + 1) * sh / h);
    unsigned int sum = 0;
    for (int j = y0; j < y1; j++)
        for (int i = x0; i < x1; i++)
            sum += y[j * sy + i];
    int count = (x1 - x0) * (y1 - y0);
    out[p[2] + r * w + x] = (unsigned char)((sum + count / 2) / count);

    // Chroma: one sample per 2x2 luma block, from the half-size planes.
    if ((x & 1) || (r & 1)) return;
    int cw = w / 2, ch = h / 2, csw = sw / 2, csh = sh / 2;
    int cx = x / 2, cy = r / 2;
    if (cx >= cw || cy >= ch) return;
    int cx0 = cx * csw / cw, cx1 = max(cx0 + 1, (cx + 1) * csw / cw);
    int cy0 = cy * csh / ch, cy1 = max(cy0 + 1, (cy + 1) * csh / ch);
    unsigned int su = 0, sv = 0;
    for (int j = cy0; j < cy1; j++)
        for (int i = cx0; i < cx1; i++) {
            su += u[j * suv + i * cstep];
            sv += v[j * suv + i * cstep];
        }
    int cc = (cx1 - cx0) * (cy1 - cy0);
    out[p[3] + cy * cw + cx] = (unsigned char)((su + cc / 2) / cc);
    out[p[4] + cy * cw + cx] = (unsigned char)((sv + cc / 2) / cc);
}
"#;

/// The card, its context and the compiled kernel (shared by sessions).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    scale: CudaFunction,
    pub info: GpuInfo,
    /// How decoders get their context and where they leave pictures.
    pub nvdec: Nvdec,
    /// The device decoders share ([`Nvdec::Shared`], [`Nvdec::Resident`]).
    shared: Option<SharedDevice>,
}

/// FFmpeg's CUDA device on the card's primary context, the one cudarc's
/// [`CudaContext`] uses. A cuvid decoder given no device makes a CUDA
/// context of its own, and contexts on one card take turns (time slices):
/// on an H200, sessions with a context each held 6 in real time, with the
/// CPU mostly idle. Given this device, every decoder and the scaler share
/// one context. Not yet measured on a GPU: `gpu-check` sets the three
/// [`Nvdec`] ways side by side.
struct SharedDevice(*mut ffmpeg::ffi::AVBufferRef);

// SAFETY: the pointer is FFmpeg's reference-counted buffer (its count is
// atomic); the device behind it is not changed after it is made, and
// decoders take references of their own (`av_buffer_ref`).
unsafe impl Send for SharedDevice {}
// SAFETY: as for Send: `&SharedDevice` only takes new references.
unsafe impl Sync for SharedDevice {}

impl Drop for SharedDevice {
    fn drop(&mut self) {
        // SAFETY: our own reference, made by av_hwdevice_ctx_create.
        unsafe { ffmpeg::ffi::av_buffer_unref(&mut self.0) }
    }
}

impl SharedDevice {
    fn make(ordinal: usize) -> Result<SharedDevice, GpuError> {
        /// `AV_CUDA_USE_PRIMARY_CONTEXT` (libavutil/hwcontext_cuda.h, FFmpeg
        /// 4.3 and later; not in ffmpeg-sys's bindings).
        const USE_PRIMARY_CONTEXT: i32 = 1;
        let device = std::ffi::CString::new(ordinal.to_string())
            .map_err(|e| GpuError::Driver(e.to_string()))?;
        let mut buf = std::ptr::null_mut();
        // SAFETY: `buf` is an out-pointer FFmpeg fills on success; the
        // device string outlives the call; no options dictionary.
        let r = unsafe {
            ffmpeg::ffi::av_hwdevice_ctx_create(
                &mut buf,
                ffmpeg::ffi::AVHWDeviceType::AV_HWDEVICE_TYPE_CUDA,
                device.as_ptr(),
                std::ptr::null_mut(),
                USE_PRIMARY_CONTEXT,
            )
        };
        if r < 0 || buf.is_null() {
            return Err(GpuError::Driver(format!(
                "FFmpeg's CUDA device on the primary context: {}",
                ffmpeg::Error::from(r)
            )));
        }
        Ok(SharedDevice(buf))
    }
}

/// Set the card's primary context to block a waiting thread
/// (`CU_CTX_SCHED_BLOCKING_SYNC`) rather than spin on a core, whether it is
/// active yet or not (CUDA 11 and later allow both). FFmpeg's CUDA device
/// on the primary context refuses a context already active with any other
/// scheduling flag ("Primary context already active with incompatible
/// flags"), and cudarc makes it active with none: so the shared modes set
/// it before either opens it. It holds for the whole process (one primary
/// context per card), so the GPU check opens the shared modes first and
/// all of its rows run with it. A thread that waits for the GPU then
/// sleeps instead of spinning on a core the CPU encoders need.
fn blocking_sync(ordinal: usize) -> Result<(), GpuError> {
    use cudarc::driver::{result, sys};
    result::init().map_err(driver)?;
    let dev = result::device::get(ordinal as i32).map_err(driver)?;
    let flag = sys::CUctx_flags::CU_CTX_SCHED_BLOCKING_SYNC as u32;
    let (mut flags, mut active) = (0u32, 0i32);
    // SAFETY: plain driver calls on a device the driver handed out, with
    // out-pointers to locals.
    let r = unsafe { sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active) };
    if r == sys::CUresult::CUDA_SUCCESS && flags == flag {
        // Already so (another shared mode opened it): nothing to change
        // on an active context.
        return Ok(());
    }
    // SAFETY: as above.
    let r = unsafe { sys::cuDevicePrimaryCtxSetFlags_v2(dev, flag) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(GpuError::Driver(format!(
            "setting the primary context to block while waiting: {r:?}"
        )));
    }
    Ok(())
}

/// `want` if FFmpeg's list of `formats` (ended by NONE) has it, else NONE
/// (and FFmpeg fails the decoder's open).
///
/// # Safety
/// `formats` is null or a list ended by `AV_PIX_FMT_NONE`.
unsafe fn offered(mut formats: *const AVPixelFormat, want: AVPixelFormat) -> AVPixelFormat {
    // SAFETY: as the caller promises, every element read is before NONE.
    unsafe {
        while !formats.is_null() && *formats != AVPixelFormat::AV_PIX_FMT_NONE {
            if *formats == want {
                return want;
            }
            formats = formats.add(1);
        }
    }
    AVPixelFormat::AV_PIX_FMT_NONE
}

/// cuvid's `get_format` for [`Nvdec::Shared`]: NV12 in host memory, as a
/// decoder without a device gives (given a device, FFmpeg would pick
/// frames in GPU memory).
unsafe extern "C" fn host_nv12(
    _ctx: *mut ffmpeg::ffi::AVCodecContext,
    formats: *const AVPixelFormat,
) -> AVPixelFormat {
    // SAFETY: FFmpeg passes a list ended by AV_PIX_FMT_NONE.
    unsafe { offered(formats, AVPixelFormat::AV_PIX_FMT_NV12) }
}

/// cuvid's `get_format` for [`Nvdec::Resident`]: frames in GPU memory
/// (`AV_PIX_FMT_CUDA`, NV12 behind it), from a pool on the shared device.
unsafe extern "C" fn gpu_frames(
    _ctx: *mut ffmpeg::ffi::AVCodecContext,
    formats: *const AVPixelFormat,
) -> AVPixelFormat {
    // SAFETY: FFmpeg passes a list ended by AV_PIX_FMT_NONE.
    unsafe { offered(formats, AVPixelFormat::AV_PIX_FMT_CUDA) }
}

/// Where the kernel reads a source picture: device addresses of its planes
/// and their strides (the kernel's first six parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourcePlanes {
    y: u64,
    sy: i32,
    u: u64,
    v: u64,
    suv: i32,
    /// 2 where U and V are interleaved (NV12), 1 for I420.
    cstep: i32,
}

/// The planes of a picture NVDEC left in GPU memory (`AV_PIX_FMT_CUDA`):
/// the frame's data pointers are device addresses, its frames context says
/// what lies behind them. Only NV12 (8-bit 4:2:0, all WebRTC sends) is
/// taken; anything else is [`GpuError::Format`].
fn device_planes(src: &ffmpeg::frame::Video) -> Result<SourcePlanes, GpuError> {
    // SAFETY: `src` is a live AVFrame; its hw_frames_ctx, when set, is a
    // reference to an AVHWFramesContext (FFmpeg's contract for hardware
    // frames), read only.
    unsafe {
        let f = src.as_ptr();
        let frames = (*f).hw_frames_ctx;
        if (*f).format != AVPixelFormat::AV_PIX_FMT_CUDA as i32
            || frames.is_null()
            || (*frames).data.is_null()
        {
            return Err(GpuError::Format(src.format()));
        }
        let ctx = (*frames).data as *const ffmpeg::ffi::AVHWFramesContext;
        let sw = (*ctx).sw_format;
        if sw != AVPixelFormat::AV_PIX_FMT_NV12 {
            return Err(GpuError::Format(Pixel::from(sw)));
        }
        let (y, uv) = ((*f).data[0] as u64, (*f).data[1] as u64);
        if y == 0 || uv == 0 {
            return Err(GpuError::Format(Pixel::CUDA));
        }
        Ok(SourcePlanes {
            y,
            sy: (*f).linesize[0],
            u: uv,
            v: uv + 1,
            suv: (*f).linesize[1],
            cstep: 2,
        })
    }
}

impl Gpu {
    /// Open device `ordinal`: check the driver, compile the kernel, probe
    /// NVDEC and NVENC through FFmpeg. Each NVDEC decoder makes a CUDA
    /// context of its own ([`Nvdec::OwnContext`], what ran on an H200).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        Gpu::open_nvdec(ordinal, Nvdec::OwnContext)
    }

    /// [`Gpu::open`], NVDEC decoders as `nvdec` says: on the card's primary
    /// context, shared with each other and the scaler ([`SharedDevice`]),
    /// for [`Nvdec::Shared`] and [`Nvdec::Resident`].
    pub fn open_nvdec(ordinal: usize, nvdec: Nvdec) -> Result<Arc<Gpu>, GpuError> {
        // SAFETY: these only try to load the libraries (dlopen); cudarc
        // panics on first use of a library that is missing, so we ask first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver("libcuda.so"));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoDriver(
                "libnvrtc.so (NVRTC, in the CUDA runtime libraries)",
            ));
        }
        let sharing = nvdec != Nvdec::OwnContext;
        if sharing {
            blocking_sync(ordinal)?;
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let name = ctx.name().map_err(driver)?;
        let attr = |a| ctx.attribute(a).map_err(driver);
        use cudarc::driver::sys::CUdevice_attribute as A;
        let compute = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let memory_mib = ctx.total_mem().map_err(driver)? as u64 / (1 << 20);
        let ptx =
            cudarc::nvrtc::compile_ptx(KERNEL).map_err(|e| GpuError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let scale = module.load_function("scale_layers").map_err(driver)?;
        let info = GpuInfo {
            name,
            compute,
            memory_mib,
            nvdec: probe_nvdec(),
            nvenc: probe_nvenc(),
        };
        let shared = if sharing {
            Some(SharedDevice::make(ordinal)?)
        } else {
            None
        };
        Ok(Arc::new(Gpu {
            ctx,
            scale,
            info,
            nvdec,
            shared,
        }))
    }

    /// An NVDEC decoder by FFmpeg name (`h264_cuvid`, `vp8_cuvid`), on the
    /// shared context where this handle has one, its pictures in GPU memory
    /// for [`Nvdec::Resident`].
    pub fn decoder(
        &self,
        name: &'static str,
    ) -> Result<crate::pipeline::Decoder, crate::pipeline::PipelineError> {
        let Some(device) = &self.shared else {
            return crate::pipeline::Decoder::named(name);
        };
        let get_format = match self.nvdec {
            Nvdec::Resident => gpu_frames,
            Nvdec::OwnContext | Nvdec::Shared => host_nv12,
        };
        crate::pipeline::Decoder::named_with(name, |ctx| {
            // SAFETY: the context is not open yet; it takes a reference of
            // its own to the device (freed with the context) and a
            // get_format that only reads the list FFmpeg passes.
            unsafe {
                let raw = ctx.as_mut_ptr();
                let r = ffmpeg::ffi::av_buffer_ref(device.0);
                if r.is_null() {
                    return Err(GpuError::Driver("av_buffer_ref: out of memory".into()).into());
                }
                (*raw).hw_device_ctx = r;
                (*raw).get_format = Some(get_format);
            }
            Ok(())
        })
    }

    /// A scaler for one session (its own stream, so sessions overlap).
    pub fn scaler(self: &Arc<Gpu>) -> Result<GpuScaler, GpuError> {
        let stream = self.ctx.new_stream().map_err(driver)?;
        Ok(GpuScaler {
            gpu: self.clone(),
            stream,
            legacy: self.ctx.default_stream(),
            decoded: self.ctx.new_event(None).map_err(driver)?,
            buffers: None,
            host_out: Vec::new(),
        })
    }
}

/// The NVDEC decoders FFmpeg can open on this card.
fn probe_nvdec() -> Vec<&'static str> {
    ["h264_cuvid", "vp8_cuvid"]
        .into_iter()
        .filter(|name| crate::pipeline::Decoder::named(name).is_ok())
        .collect()
}

/// Whether `h264_nvenc` opens (the card has NVENC).
fn probe_nvenc() -> bool {
    let size = Size {
        width: 256,
        height: 144,
    };
    crate::pipeline::open_nvenc(size, 200).is_ok()
}

/// Where a picture in host memory goes up: its planes as they are, strides
/// included (V is unused for NV12).
struct Upload {
    y: CudaSlice<u8>,
    u: CudaSlice<u8>,
    v: CudaSlice<u8>,
}

struct Buffers {
    source: (u32, u32, Pixel),
    layers: Vec<Size>,
    /// None for pictures already in GPU memory.
    upload: Option<Upload>,
    params: CudaSlice<i32>,
    out: CudaSlice<u8>,
    /// Offsets of each layer's planes in `out`.
    offsets: Vec<[usize; 3]>,
}

/// One session's GPU scaling: the source planes go up (or are read where
/// NVDEC left them in GPU memory), one launch makes every layer, the layers
/// come down into the encoders' pictures.
pub struct GpuScaler {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    /// The context's legacy default stream, where FFmpeg queues NVDEC's
    /// copy into a picture it leaves in GPU memory.
    legacy: Arc<CudaStream>,
    /// Recorded on `legacy` after a decode, waited for by `stream`.
    decoded: CudaEvent,
    buffers: Option<Buffers>,
    host_out: Vec<u8>,
}

impl GpuScaler {
    /// Scale `src` into `layers` (I420 pictures of the layers' sizes).
    /// `src` is NV12 or I420 in host memory, or NV12 in GPU memory
    /// (`Pixel::CUDA`, from a [`Nvdec::Resident`] decoder).
    pub fn scale(
        &mut self,
        src: &ffmpeg::frame::Video,
        layers: &mut [&mut ffmpeg::frame::Video],
    ) -> Result<(), GpuError> {
        let (sw, sh, fmt) = (src.width(), src.height(), src.format());
        if !matches!(fmt, Pixel::NV12 | Pixel::YUV420P | Pixel::CUDA) {
            return Err(GpuError::Format(fmt));
        }
        let sizes: Vec<Size> = layers
            .iter()
            .map(|p| Size {
                width: p.width() as u16,
                height: p.height() as u16,
            })
            .collect();
        let fresh = self
            .buffers
            .as_ref()
            .is_none_or(|b| b.source != (sw, sh, fmt) || b.layers != sizes);
        if fresh {
            self.buffers = Some(self.allocate(src, &sizes)?);
        }
        let b = self.buffers.as_mut().ok_or(GpuError::Format(fmt))?;
        let stream = &self.stream;
        // Up (a picture in host memory), or wait for NVDEC's copy.
        let mut reads = Vec::new();
        let planes = match b.upload.as_mut() {
            None => {
                let planes = device_planes(src)?;
                // FFmpeg queued the copy into this picture on the legacy
                // default stream, which ours (non-blocking) does not wait
                // for by itself.
                self.decoded.record(&self.legacy).map_err(driver)?;
                stream.wait(&self.decoded).map_err(driver)?;
                planes
            }
            Some(up) => {
                let nv12 = fmt == Pixel::NV12;
                stream.memcpy_htod(src.data(0), &mut up.y).map_err(driver)?;
                stream.memcpy_htod(src.data(1), &mut up.u).map_err(driver)?;
                if !nv12 {
                    stream.memcpy_htod(src.data(2), &mut up.v).map_err(driver)?;
                }
                let (y, ry) = up.y.device_ptr(stream);
                let (u, ru) = up.u.device_ptr(stream);
                let (v, rv) = up.v.device_ptr(stream);
                reads.extend([ry, ru, rv]);
                SourcePlanes {
                    y,
                    sy: src.stride(0) as i32,
                    u,
                    // For NV12, V is the interleaved plane one byte on.
                    v: if nv12 { u + 1 } else { v },
                    suv: src.stride(1) as i32,
                    cstep: if nv12 { 2 } else { 1 },
                }
            }
        };
        let n = sizes.len() as i32;
        let (grid_dim, block_dim) = scale_grid(&sizes);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let (sw_i, sh_i) = (sw as i32, sh as i32);
        let mut launch = stream.launch_builder(&self.gpu.scale);
        launch
            .arg(&planes.y)
            .arg(&planes.sy)
            .arg(&planes.u)
            .arg(&planes.v)
            .arg(&planes.suv)
            .arg(&planes.cstep)
            .arg(&sw_i)
            .arg(&sh_i)
            .arg(&b.params)
            .arg(&n)
            .arg(&mut b.out);
        // SAFETY: the arguments are the kernel's, in its order and types
        // (device addresses of u8 planes, of i32 parameters and of the u8
        // output, and ints); the source planes hold `sh` rows of their
        // strides (uploaded whole, or FFmpeg's frame of the picture's
        // size, alive until the synchronize below); `out` holds every
        // layer's planes at the offsets in `params`, and the kernel writes
        // only inside each layer's width and height.
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        drop(reads);
        // Down, then into each picture row by row (its stride).
        self.host_out.resize(b.out.len(), 0);
        self.stream
            .memcpy_dtoh(&b.out, &mut self.host_out)
            .map_err(driver)?;
        self.stream.synchronize().map_err(driver)?;
        for ((pic, size), offs) in layers.iter_mut().zip(&sizes).zip(&b.offsets) {
            let (w, h) = (usize::from(size.width), usize::from(size.height));
            for (plane, (pw, ph)) in [(w, h), (w / 2, h / 2), (w / 2, h / 2)]
                .into_iter()
                .enumerate()
            {
                let stride = pic.stride(plane);
                let data = pic.data_mut(plane);
                for row in 0..ph {
                    let from = offs[plane] + row * pw;
                    data[row * stride..row * stride + pw]
                        .copy_from_slice(&self.host_out[from..from + pw]);
                }
            }
        }
        Ok(())
    }

    fn allocate(&self, src: &ffmpeg::frame::Video, sizes: &[Size]) -> Result<Buffers, GpuError> {
        let s = &self.stream;
        let upload = match src.format() {
            // Already on the card: nothing to upload into.
            Pixel::CUDA => None,
            format => Some(Upload {
                y: s.alloc_zeros::<u8>(src.data(0).len()).map_err(driver)?,
                u: s.alloc_zeros::<u8>(src.data(1).len()).map_err(driver)?,
                v: s.alloc_zeros::<u8>(if format == Pixel::NV12 {
                    1
                } else {
                    src.data(2).len()
                })
                .map_err(driver)?,
            }),
        };
        let (params, offsets, at) = layer_params(sizes);
        Ok(Buffers {
            source: (src.width(), src.height(), src.format()),
            layers: sizes.to_vec(),
            upload,
            params: s.clone_htod(&params).map_err(driver)?,
            out: s.alloc_zeros::<u8>(at.max(1)).map_err(driver)?,
            offsets,
        })
    }
}

/// The kernel's `layers` parameter for these layer sizes (five ints per
/// layer: width, height, and the offsets of its Y, U and V planes in the
/// output, I420 packed tightly one layer after another), those offsets, and
/// the output's length.
pub fn layer_params(sizes: &[Size]) -> (Vec<i32>, Vec<[usize; 3]>, usize) {
    let mut offsets = Vec::new();
    let mut params = Vec::new();
    let mut at = 0usize;
    for l in sizes {
        let (w, h) = (usize::from(l.width), usize::from(l.height));
        let c = (w / 2) * (h / 2);
        offsets.push([at, at + w * h, at + w * h + c]);
        params.extend_from_slice(&[
            w as i32,
            h as i32,
            at as i32,
            (at + w * h) as i32,
            (at + w * h + c) as i32,
        ]);
        at += w * h + 2 * c;
    }
    (params, offsets, at)
}

/// The launch grid of the scaling kernel: 16 x 16 threads per block over
/// the largest layer, one grid layer (z) per output layer.
pub fn scale_grid(sizes: &[Size]) -> ((u32, u32, u32), (u32, u32, u32)) {
    let (w, h) = sizes.iter().fold((0u32, 0u32), |(w, h), s| {
        (w.max(s.width.into()), h.max(s.height.into()))
    });
    (
        (w.div_ceil(16), h.div_ceil(16), sizes.len() as u32),
        (16, 16, 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_decoders_ask_ffmpeg_for_host_nv12_or_frames_on_the_card() {
        use AVPixelFormat::{AV_PIX_FMT_CUDA, AV_PIX_FMT_NONE, AV_PIX_FMT_NV12, AV_PIX_FMT_P010LE};
        // What cuvid offers: frames in GPU memory first, then host NV12.
        let offered = [AV_PIX_FMT_CUDA, AV_PIX_FMT_NV12, AV_PIX_FMT_NONE];
        // SAFETY: a list ended by NONE, as FFmpeg passes it.
        let (host, card) = unsafe {
            (
                host_nv12(std::ptr::null_mut(), offered.as_ptr()),
                gpu_frames(std::ptr::null_mut(), offered.as_ptr()),
            )
        };
        assert_eq!((host, card), (AV_PIX_FMT_NV12, AV_PIX_FMT_CUDA));
        // No NV12 (a 10-bit stream): none, and FFmpeg fails the open.
        let offered = [AV_PIX_FMT_CUDA, AV_PIX_FMT_P010LE, AV_PIX_FMT_NONE];
        // SAFETY: as above.
        let got = unsafe { host_nv12(std::ptr::null_mut(), offered.as_ptr()) };
        assert_eq!(got, AV_PIX_FMT_NONE);
        // A decoder offering only host formats: none for frames on the card.
        let offered = [AV_PIX_FMT_NV12, AV_PIX_FMT_NONE];
        // SAFETY: as above.
        let got = unsafe { gpu_frames(std::ptr::null_mut(), offered.as_ptr()) };
        assert_eq!(got, AV_PIX_FMT_NONE);
        // SAFETY: a null list is no list.
        let got = unsafe { offered_none() };
        assert_eq!(got, AV_PIX_FMT_NONE);
    }

    /// `offered` given no list at all.
    unsafe fn offered_none() -> AVPixelFormat {
        // SAFETY: null is allowed.
        unsafe { offered(std::ptr::null(), AVPixelFormat::AV_PIX_FMT_NV12) }
    }

    /// A frame as NVDEC leaves one in GPU memory: format CUDA, device
    /// addresses in data[0] and data[1], a frames context saying what lies
    /// behind them (here a zeroed AVHWFramesContext with only `sw_format`
    /// set: what `device_planes` reads). Nothing is dereferenced at the
    /// addresses, so they need not be real.
    fn card_frame(sw_format: Option<AVPixelFormat>) -> ffmpeg::frame::Video {
        let mut f = ffmpeg::frame::Video::empty();
        // SAFETY: a fresh AVFrame we own; the frames context is a buffer
        // of FFmpeg's (freed with the frame by av_frame_unref); data
        // pointers are not owned by the frame (no buf[] set), so freeing
        // it never touches them.
        unsafe {
            let raw = f.as_mut_ptr();
            (*raw).format = AVPixelFormat::AV_PIX_FMT_CUDA as i32;
            (*raw).width = 1280;
            (*raw).height = 720;
            (*raw).data[0] = 0x7f00_0000_0000usize as *mut u8;
            (*raw).data[1] = 0x7f00_0010_0000usize as *mut u8;
            (*raw).linesize[0] = 1536;
            (*raw).linesize[1] = 1536;
            if let Some(sw) = sw_format {
                let buf = ffmpeg::ffi::av_buffer_allocz(std::mem::size_of::<
                    ffmpeg::ffi::AVHWFramesContext,
                >());
                assert!(!buf.is_null());
                (*((*buf).data as *mut ffmpeg::ffi::AVHWFramesContext)).sw_format = sw;
                (*raw).hw_frames_ctx = buf;
            }
        }
        f
    }

    #[test]
    fn a_picture_on_the_card_is_read_where_nvdec_left_it_and_only_nv12() {
        let planes = device_planes(&card_frame(Some(AVPixelFormat::AV_PIX_FMT_NV12)))
            .expect("NV12 on the card");
        assert_eq!(
            planes,
            SourcePlanes {
                y: 0x7f00_0000_0000,
                sy: 1536,
                u: 0x7f00_0010_0000,
                v: 0x7f00_0010_0001,
                suv: 1536,
                cstep: 2,
            }
        );
        // 10-bit behind the frame: refused by name, not scaled as 8-bit.
        let e =
            device_planes(&card_frame(Some(AVPixelFormat::AV_PIX_FMT_P010LE))).expect_err("P010");
        assert!(matches!(e, GpuError::Format(Pixel::P010LE)), "{e}");
        // No frames context: nothing says what the addresses hold.
        assert!(device_planes(&card_frame(None)).is_err());
        // A picture in host memory is not read as one on the card.
        let host = ffmpeg::frame::Video::new(Pixel::NV12, 64, 32);
        assert!(matches!(
            device_planes(&host),
            Err(GpuError::Format(Pixel::NV12))
        ));
    }

    #[test]
    fn ffmpegs_shared_cuda_device_without_a_driver_is_an_error_not_a_crash() {
        crate::pipeline::init().expect("ffmpeg");
        // SAFETY: only asks whether libcuda loads.
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        match SharedDevice::make(0) {
            Ok(device) => {
                assert!(driver, "a CUDA device without libcuda");
                drop(device);
            }
            Err(e) => {
                assert!(!driver, "a GPU node where the device failed: {e}");
                assert!(e.to_string().contains("primary context"), "{e}");
            }
        }
    }
}
