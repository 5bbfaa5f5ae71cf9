//! The CPU backend: one session's decode -> scale -> encode, through
//! FFmpeg's libavcodec and libswscale (ffmpeg-next).
//!
//! ffmpeg-next is chosen because one wrapper gives the decoders (VP8,
//! H.264), the scaler and both encoders a browser can receive (libvpx VP8,
//! libx264 H.264) with the options real-time video needs, and the same
//! library opens NVDEC (`*_cuvid`) for the `cuda` backend.
//!
//! Every source frame is decoded (a decoder cannot skip a reference frame),
//! but only frames still before their deadline are scaled and encoded: a
//! late frame is dropped, never queued. Layers keep the source frame's RTP
//! timestamp and are keyframes exactly where the source is one (so a switch
//! between a layer and the source lines up), or where a layer was asked for
//! one.

use std::time::{Duration, Instant};

use balie_offload::{Codec, LayerSpec, Size};
use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

/// Why a session's pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("FFmpeg has no {0} (install Debian's libavcodec59, which has libvpx and libx264)")]
    Missing(&'static str),
    #[error("{what}: {source}")]
    Ffmpeg {
        what: &'static str,
        source: ffmpeg::Error,
    },
    #[error("source picture {0}x{1} is not usable")]
    BadSize(u32, u32),
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Gpu(#[from] crate::gpu::GpuError),
}

fn ff(what: &'static str) -> impl FnOnce(ffmpeg::Error) -> PipelineError {
    move |source| PipelineError::Ffmpeg { what, source }
}

/// Start FFmpeg once per process (idempotent) and quieten its log.
pub fn init() -> Result<(), PipelineError> {
    ffmpeg::init().map_err(ff("initialising FFmpeg"))?;
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    Ok(())
}

/// RTP video clock.
pub const RTP_HZ: i32 = 90_000;

/// Where a session's pipeline runs.
#[derive(Clone, Default)]
pub enum Backend {
    /// FFmpeg on the CPU: decode, libswscale, libvpx/libx264.
    #[default]
    Cpu,
    /// NVDEC decode where the card has it for the codec, GPU scaling,
    /// NVENC for H.264 where the card has it (see [`crate::gpu`]).
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::gpu::Gpu>),
}

/// Where the video pipeline runs when the worker has the GPU
/// (`serve --backend cuda --video-backend auto|cpu|cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VideoPlacement {
    /// With `--backend cuda`, on the GPU only where the card has NVENC:
    /// without it the CPU encodes every layer anyway, and on an H200 the
    /// GPU path (NVDEC, GPU scaling) held 6 real-time sessions where the
    /// CPU path held 32 (docs/offload.md, "The GPU check").
    #[default]
    Auto,
    /// FFmpeg on the CPU.
    Cpu,
    /// NVDEC decode and GPU scaling (needs `--backend cuda`).
    #[value(name = "cuda")]
    Gpu,
}

/// How the GPU backend's NVDEC decoders get their CUDA context, and where
/// they leave the pictures (`serve --nvdec`, `gpu-check` measures all
/// three side by side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Nvdec {
    /// Each decoder makes a CUDA context of its own (FFmpeg's default) and
    /// hands the picture back in host memory; the scaler uploads it. What
    /// ran on an H200: 6 sessions in real time, the CPU mostly idle.
    #[default]
    #[value(name = "own-context")]
    OwnContext,
    /// Every decoder on the card's primary context, shared with each other
    /// and the scaler; pictures in host memory as with `own-context`.
    Shared,
    /// Shared, and the pictures stay in GPU memory: the scaler reads them
    /// where NVDEC's copy left them, so nothing goes up per frame (only the
    /// layers come down for the CPU encoders).
    Resident,
}

impl Nvdec {
    /// In words (logs, the GPU check's rows).
    pub fn describe(self) -> &'static str {
        match self {
            Nvdec::OwnContext => "a CUDA context per decoder",
            Nvdec::Shared => "one shared CUDA context",
            Nvdec::Resident => "one shared CUDA context, pictures kept in GPU memory",
        }
    }
}

/// Whether sessions' video runs on the GPU: `gpu` (the worker opened one,
/// `--backend cuda`), what was asked, and whether the card has NVENC.
pub fn video_on_gpu(gpu: bool, asked: VideoPlacement, nvenc: bool) -> Result<bool, String> {
    match (gpu, asked) {
        (false, VideoPlacement::Gpu) => {
            Err("--video-backend cuda needs the GPU: add --backend cuda".into())
        }
        (false, _) | (true, VideoPlacement::Cpu) => Ok(false),
        (true, VideoPlacement::Gpu) => Ok(true),
        (true, VideoPlacement::Auto) => Ok(nvenc),
    }
}

/// Transcode sessions on the GPU at once by default when video goes on
/// the GPU (`serve --gpu-video-sessions`): the most the GPU check held in
/// real time on an H200 (per-decoder CUDA contexts, CPU encoders); sessions
/// past it run the CPU pipeline, so a worker never holds fewer than its
/// cores could alone.
pub const GPU_VIDEO_SESSIONS: usize = 6;

/// Which backend each new session's pipeline gets: `gpu` for up to `limit`
/// sessions at a time, the CPU for the rest. The default: all on the CPU.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    gpu: Backend,
    limit: usize,
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Set to the sessions on the GPU whenever that changes.
    gauge: Option<prometheus::IntGauge>,
}

/// A session's hold on one of the GPU's places; given back when dropped
/// (the session's pipeline ended).
#[derive(Debug)]
pub struct GpuPlace {
    used: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gauge: Option<prometheus::IntGauge>,
}

impl Drop for GpuPlace {
    fn drop(&mut self) {
        let left = self.used.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) - 1;
        if let Some(g) = &self.gauge {
            g.set(left as i64);
        }
    }
}

impl Placement {
    /// Every session on the CPU.
    pub fn cpu() -> Placement {
        Placement::new(Backend::Cpu, 0)
    }

    /// Up to `limit` sessions at a time on `gpu`, the rest on the CPU.
    pub fn new(gpu: Backend, limit: usize) -> Placement {
        Placement {
            gpu,
            limit,
            used: Default::default(),
            gauge: None,
        }
    }

    /// The same, keeping `gauge` at the number of sessions on the GPU.
    pub fn counted(mut self, gauge: prometheus::IntGauge) -> Placement {
        gauge.set(self.on_gpu() as i64);
        self.gauge = Some(gauge);
        self
    }

    /// The backend for a new session and, on the GPU, its place.
    pub fn take(&self) -> (Backend, Option<GpuPlace>) {
        use std::sync::atomic::Ordering;
        let got = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if let Ok(before) = got {
            if let Some(g) = &self.gauge {
                g.set(before as i64 + 1);
            }
            let place = GpuPlace {
                used: self.used.clone(),
                gauge: self.gauge.clone(),
            };
            (self.gpu.clone(), Some(place))
        } else {
            (Backend::Cpu, None)
        }
    }

    /// Sessions on the GPU now.
    pub fn on_gpu(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `cpu`, or the GPU backend's name with the number of places.
    pub fn describe(&self) -> String {
        if self.limit == 0 {
            "cpu".into()
        } else {
            format!("{} for {} sessions, then cpu", self.gpu.name(), self.limit)
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    /// `cpu` or `cuda` (logs, metrics).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => "cuda",
        }
    }
}

/// A frame the pipeline made.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// 1-based layer index, as on the wire.
    pub track: u8,
    pub rtp_time: u32,
    pub key: bool,
    pub data: Vec<u8>,
}

/// Time spent in each stage on one source frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub decode: Duration,
    /// Zero when the frame was past its deadline (not scaled).
    pub scale: Duration,
    pub encode: Duration,
}

/// What became of one source frame.
#[derive(Debug, Default)]
pub struct Pushed {
    pub timings: Timings,
    /// Decoded, but past its deadline: nothing was encoded.
    pub late: bool,
    /// The source size is new: the sizes of source and layers.
    pub layout: Option<(Size, Vec<Size>)>,
    /// The decoder could not use the frame (a reference is missing):
    /// the SFU should ask the publisher for a keyframe.
    pub need_keyframe: bool,
}

/// A codec context on one thread: sessions run in parallel, one thread
/// each, and frame threading would hold frames back.
fn single_threaded(codec: ffmpeg::Codec) -> ffmpeg::codec::context::Context {
    let mut ctx = ffmpeg::codec::context::Context::new_with_codec(codec);
    ctx.set_threading(ffmpeg::threading::Config {
        kind: ffmpeg::threading::Type::Slice,
        count: 1,
        ..Default::default()
    });
    ctx
}

/// A video decoder for one stream.
pub struct Decoder {
    dec: ffmpeg::decoder::Video,
    frame: ffmpeg::frame::Video,
}

impl Decoder {
    pub fn new(codec: Codec) -> Result<Decoder, PipelineError> {
        let (id, name) = match codec {
            Codec::Vp8 => (ffmpeg::codec::Id::VP8, "VP8 decoder"),
            Codec::H264 => (ffmpeg::codec::Id::H264, "H.264 decoder"),
        };
        let c = ffmpeg::decoder::find(id).ok_or(PipelineError::Missing(name))?;
        let dec = single_threaded(c)
            .decoder()
            .video()
            .map_err(ff("opening the decoder"))?;
        Ok(Decoder {
            dec,
            frame: ffmpeg::frame::Video::empty(),
        })
    }

    /// A decoder by FFmpeg name (`h264_cuvid`, `vp8_cuvid`: NVDEC), with
    /// no display delay (NVDEC holds four frames back by default).
    pub fn named(name: &'static str) -> Result<Decoder, PipelineError> {
        Decoder::named_with(name, |_| Ok(()))
    }

    /// [`Decoder::named`], `prepare` given the codec context before it is
    /// opened (the GPU backend hands NVDEC a shared device there).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn named_with(
        name: &'static str,
        prepare: impl FnOnce(&mut ffmpeg::codec::context::Context) -> Result<(), PipelineError>,
    ) -> Result<Decoder, PipelineError> {
        let c = ffmpeg::decoder::find_by_name(name).ok_or(PipelineError::Missing(name))?;
        let mut ctx = single_threaded(c);
        ctx.set_flags(ffmpeg::codec::Flags::LOW_DELAY);
        prepare(&mut ctx)?;
        let dec = ctx.decoder().video().map_err(ff("opening the decoder"))?;
        Ok(Decoder {
            dec,
            frame: ffmpeg::frame::Video::empty(),
        })
    }

    /// Decode one encoded frame; the picture, if one came out. An error is
    /// a frame the decoder could not use (missing reference, corrupt data).
    pub fn decode(
        &mut self,
        data: &[u8],
        pts: i64,
    ) -> Result<Option<&ffmpeg::frame::Video>, ffmpeg::Error> {
        let mut packet = ffmpeg::Packet::copy(data);
        packet.set_pts(Some(pts));
        self.dec.send_packet(&packet)?;
        match self.dec.receive_frame(&mut self.frame) {
            Ok(()) => Ok(Some(&self.frame)),
            Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// One layer: scaler (the CPU backend's; the GPU scales all layers at
/// once) and encoder for one size.
struct Layer {
    size: Size,
    scaler: Option<ffmpeg::software::scaling::Context>,
    picture: ffmpeg::frame::Video,
    encoder: ffmpeg::encoder::video::Encoder,
    want_key: bool,
}

/// An encoder by FFmpeg name, not yet opened, set up as every layer's:
/// I420 at `size`, 90 kHz time base, 30 fps, `bitrate_kbps` as its ceiling
/// (see [`rate_options`]), keyframes only where the source has one or a
/// subscriber asks.
fn realtime_encoder(
    name: &str,
    label: &'static str,
    size: Size,
    bitrate_kbps: u32,
) -> Result<ffmpeg::codec::encoder::video::Video, PipelineError> {
    let c = ffmpeg::encoder::find_by_name(name).ok_or(PipelineError::Missing(label))?;
    let mut enc = single_threaded(c)
        .encoder()
        .video()
        .map_err(ff("encoder"))?;
    enc.set_width(u32::from(size.width));
    enc.set_height(u32::from(size.height));
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base((1, RTP_HZ));
    enc.set_frame_rate(Some((30, 1)));
    enc.set_bit_rate(bitrate_kbps as usize * 1000);
    enc.set_max_bit_rate(bitrate_kbps as usize * 1000);
    enc.set_gop(u32::MAX / 2);
    Ok(enc)
}

/// How long a layer's rate buffer is: what a layer may send in a burst
/// (a keyframe, a picture that changed) is bounded by this much of its rate.
/// libwebrtc's VP8 encoder, in every browser, has a buffer of 1000 ms.
pub const RATE_BUFFER_MS: u32 = 1000;

/// libvpx's largest keyframe, as a share of a frame's bits (percent):
/// libwebrtc's, 9 frames' worth at 30 fps with its 600 ms optimal buffer.
pub const VP8_MAX_INTRA_PCT: u32 = 900;

/// The rate control every layer's encoder gets, as a browser's, as FFmpeg
/// option names and values (the bench's `ffmpeg` command passes the same):
/// the layer's rate is a ceiling (`maxrate`, set with the encoder), within a
/// buffer of [`RATE_BUFFER_MS`] half full at the start (`bufsize`,
/// `rc_init_occupancy`); for VP8 libvpx's constant bit rate (FFmpeg picks
/// it where the least, most and target rates are one), keyframes capped,
/// and libwebrtc's undershoot and overshoot. Without a buffer FFmpeg's
/// encoders take none: libvpx then overshot a 500 kbit/s layer by 30% and
/// sent 67 KB keyframes (a second of the layer's rate at once, to a
/// subscriber chosen for its weak link), libx264 34 KB ones.
pub fn rate_control(codec: Codec, bitrate_kbps: u32) -> Vec<(&'static str, String)> {
    let bits = u64::from(bitrate_kbps) * 1000;
    let buffer = bits * u64::from(RATE_BUFFER_MS) / 1000;
    let mut opts = vec![
        ("bufsize", buffer.to_string()),
        ("rc_init_occupancy", (buffer / 2).to_string()),
    ];
    if codec == Codec::Vp8 {
        opts.extend([
            ("minrate", bits.to_string()),
            ("max-intra-rate", VP8_MAX_INTRA_PCT.to_string()),
            ("undershoot-pct", "100".to_string()),
            ("overshoot-pct", "15".to_string()),
        ]);
    }
    opts
}

/// [`rate_control`] as the options an encoder is opened with, and the
/// frame's length in the 90 kHz time base. FFmpeg tells libvpx each frame
/// lasts this many ticks; left at 1, libvpx took the first frame for
/// 1/90000 s, gave the first keyframe a 90000th of a second's bits (4.7 KB
/// where the ffmpeg command, at 1/30 s, gave 19.8 KB) and the picture took
/// two seconds to recover. (The `ffmpeg` command reads 30 fps files, its
/// time base is a frame.)
fn rate_options(codec: Codec, bitrate_kbps: u32) -> ffmpeg::Dictionary<'static> {
    let mut opts = ffmpeg::Dictionary::new();
    for (key, value) in rate_control(codec, bitrate_kbps) {
        opts.set(key, &value);
    }
    opts.set("ticks_per_frame", &(RTP_HZ / 30).to_string());
    opts
}

/// The CPU encoder of a layer, set up as a browser's real-time encoder.
pub fn open_encoder(
    codec: Codec,
    size: Size,
    bitrate_kbps: u32,
) -> Result<ffmpeg::encoder::video::Encoder, PipelineError> {
    let (name, label) = match codec {
        Codec::Vp8 => ("libvpx", "libvpx (VP8 encoder)"),
        Codec::H264 => ("libx264", "libx264 (H.264 encoder)"),
    };
    let enc = realtime_encoder(name, label, size, bitrate_kbps)?;
    let mut opts = rate_options(codec, bitrate_kbps);
    match codec {
        Codec::Vp8 => {
            opts.set("deadline", "realtime");
            opts.set("cpu-used", "8");
            opts.set("lag-in-frames", "0");
            opts.set("auto-alt-ref", "0");
            opts.set("error-resilient", "1");
        }
        Codec::H264 => {
            // Constrained baseline (what every WebRTC H.264 decoder takes),
            // no lookahead, SPS/PPS before every IDR, forced keyframes IDR.
            opts.set("preset", "veryfast");
            opts.set("tune", "zerolatency");
            opts.set("profile", "baseline");
            opts.set("forced-idr", "1");
            opts.set("x264-params", "repeat-headers=1:bframes=0:scenecut=0");
        }
    }
    enc.open_with(opts).map_err(ff("opening the encoder"))
}

/// The NVENC H.264 encoder, set up for real time as [`open_encoder`]'s
/// libx264 (constrained baseline, no B-frames, no lookahead, SPS/PPS with
/// every IDR). Fails on a card without NVENC (H100, H200).
#[cfg(feature = "cuda")]
pub fn open_nvenc(
    size: Size,
    bitrate_kbps: u32,
) -> Result<ffmpeg::encoder::video::Encoder, PipelineError> {
    let mut enc = realtime_encoder("h264_nvenc", "h264_nvenc", size, bitrate_kbps)?;
    enc.set_max_b_frames(0);
    let mut opts = rate_options(Codec::H264, bitrate_kbps);
    opts.set("preset", "p1");
    opts.set("tune", "ull");
    opts.set("zerolatency", "1");
    opts.set("profile", "baseline");
    opts.set("rc", "cbr");
    opts.set("forced-idr", "1");
    enc.open_with(opts).map_err(ff("opening h264_nvenc"))
}

/// The CPU backend's scaler of one layer: `format` at `from` to I420 at
/// `to`, bilinear.
pub fn cpu_scaler(
    format: Pixel,
    from: Size,
    to: Size,
) -> Result<ffmpeg::software::scaling::Context, PipelineError> {
    ffmpeg::software::scaling::Context::get(
        format,
        u32::from(from.width),
        u32::from(from.height),
        Pixel::YUV420P,
        u32::from(to.width),
        u32::from(to.height),
        ffmpeg::software::scaling::Flags::BILINEAR,
    )
    .map_err(ff("scaler"))
}

/// Layer size: the source divided by the scale, rounded down to even, at
/// least 16x16.
pub fn layer_size(source: Size, scale_down: u8) -> Size {
    let f = |v: u16| ((v / u16::from(scale_down.max(1))) & !1).max(16);
    Size {
        width: f(source.width),
        height: f(source.height),
    }
}

/// A session's pipeline.
pub struct Pipeline {
    codec: Codec,
    specs: Vec<LayerSpec>,
    backend: Backend,
    decoder: Decoder,
    #[cfg(feature = "cuda")]
    gpu_scaler: Option<crate::gpu::GpuScaler>,
    source: Option<Size>,
    layers: Vec<Layer>,
    /// The RTP time unwrapped to a monotonic 64-bit clock (encoders need
    /// increasing timestamps).
    last_rtp: Option<(u32, i64)>,
    /// Decoding failed: skip frames until a keyframe.
    broken: bool,
    packet: ffmpeg::Packet,
}

impl Pipeline {
    /// A CPU pipeline.
    pub fn new(codec: Codec, layers: Vec<LayerSpec>) -> Result<Pipeline, PipelineError> {
        Pipeline::with_backend(codec, layers, &Backend::Cpu)
    }

    /// A pipeline on `backend`.
    pub fn with_backend(
        codec: Codec,
        layers: Vec<LayerSpec>,
        backend: &Backend,
    ) -> Result<Pipeline, PipelineError> {
        // Fail at open, not at the first frame, when an encoder is missing.
        let probe = Size {
            width: 64,
            height: 64,
        };
        drop(open_encoder(codec, probe, 100)?);
        let decoder = match backend {
            Backend::Cpu => Decoder::new(codec)?,
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => {
                let name = match codec {
                    Codec::Vp8 => "vp8_cuvid",
                    Codec::H264 => "h264_cuvid",
                };
                if gpu.info.nvdec.contains(&name) {
                    gpu.decoder(name)?
                } else {
                    // This card's NVDEC lacks the codec: decode on the CPU,
                    // scale on the GPU all the same.
                    Decoder::new(codec)?
                }
            }
        };
        Ok(Pipeline {
            codec,
            specs: layers,
            #[cfg(feature = "cuda")]
            gpu_scaler: match backend {
                Backend::Cuda(gpu) => Some(gpu.scaler().map_err(PipelineError::Gpu)?),
                Backend::Cpu => None,
            },
            backend: backend.clone(),
            decoder,
            source: None,
            layers: Vec::new(),
            last_rtp: None,
            broken: false,
            packet: ffmpeg::Packet::empty(),
        })
    }

    /// Ask for a keyframe on `track` (1-based) with the next frame.
    pub fn request_keyframe(&mut self, track: u8) {
        if let Some(l) = (track as usize)
            .checked_sub(1)
            .and_then(|i| self.layers.get_mut(i))
        {
            l.want_key = true;
        }
    }

    /// Decode one source frame; when it is not late, scale and encode it
    /// into every layer, appending what the encoders give to `out`.
    pub fn push(
        &mut self,
        rtp_time: u32,
        key: bool,
        data: &[u8],
        deadline: Instant,
        out: &mut Vec<Encoded>,
    ) -> Result<Pushed, PipelineError> {
        let mut pushed = Pushed::default();
        if self.broken && !key {
            pushed.need_keyframe = true;
            return Ok(pushed);
        }
        let Some(pts) = self.unwrap_rtp(rtp_time) else {
            // A repeated or older timestamp: an encoder would refuse it.
            return Ok(pushed);
        };
        let gpu_scales = self.gpu_scales();
        let t0 = Instant::now();
        let decoded = self.decoder.decode(data, pts);
        pushed.timings.decode = t0.elapsed();
        let picture = match decoded {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(pushed),
            Err(_) => {
                self.broken = true;
                pushed.need_keyframe = true;
                return Ok(pushed);
            }
        };
        self.broken = false;
        let size = Size {
            width: u16::try_from(picture.width()).unwrap_or(0),
            height: u16::try_from(picture.height()).unwrap_or(0),
        };
        let format = picture.format();
        if size.width < 16 || size.height < 16 || !scalable(format, gpu_scales) {
            return Err(PipelineError::BadSize(picture.width(), picture.height()));
        }
        if self.source != Some(size) {
            let (codec, backend) = (self.codec, &self.backend);
            self.layers = self
                .specs
                .iter()
                .map(|spec| -> Result<Layer, PipelineError> {
                    let lsize = layer_size(size, spec.scale_down);
                    let scaler = match backend {
                        Backend::Cpu => Some(cpu_scaler(format, size, lsize)?),
                        #[cfg(feature = "cuda")]
                        Backend::Cuda(_) => None,
                    };
                    let encoder = match backend {
                        #[cfg(feature = "cuda")]
                        Backend::Cuda(gpu) if gpu.info.nvenc && codec == Codec::H264 => {
                            open_nvenc(lsize, spec.bitrate_kbps)?
                        }
                        _ => open_encoder(codec, lsize, spec.bitrate_kbps)?,
                    };
                    Ok(Layer {
                        size: lsize,
                        scaler,
                        picture: ffmpeg::frame::Video::new(
                            Pixel::YUV420P,
                            u32::from(lsize.width),
                            u32::from(lsize.height),
                        ),
                        encoder,
                        want_key: true,
                    })
                })
                .collect::<Result<_, _>>()?;
            self.source = Some(size);
            pushed.layout = Some((size, self.layers.iter().map(|l| l.size).collect()));
        }
        if Instant::now() > deadline {
            pushed.late = true;
            return Ok(pushed);
        }
        let source_key = key || picture.is_key();
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.gpu_scaler.as_mut() {
            // Every layer in one launch.
            let t = Instant::now();
            let mut pictures: Vec<&mut ffmpeg::frame::Video> =
                self.layers.iter_mut().map(|l| &mut l.picture).collect();
            gpu.scale(picture, &mut pictures)?;
            pushed.timings.scale += t.elapsed();
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let t = Instant::now();
            if let Some(scaler) = layer.scaler.as_mut() {
                scaler
                    .run(picture, &mut layer.picture)
                    .map_err(ff("scaling"))?;
            }
            pushed.timings.scale += t.elapsed();
            let t = Instant::now();
            layer.picture.set_pts(Some(pts));
            let force = source_key || layer.want_key;
            layer.picture.set_kind(if force {
                ffmpeg::picture::Type::I
            } else {
                ffmpeg::picture::Type::None
            });
            layer.want_key = false;
            layer
                .encoder
                .send_frame(&layer.picture)
                .map_err(ff("encoding"))?;
            while layer.encoder.receive_packet(&mut self.packet).is_ok() {
                out.push(Encoded {
                    track: (i + 1) as u8,
                    rtp_time: self.packet.pts().unwrap_or(pts) as u32,
                    key: self.packet.is_key(),
                    data: self.packet.data().unwrap_or_default().to_vec(),
                });
            }
            pushed.timings.encode += t.elapsed();
        }
        Ok(pushed)
    }

    /// Whether the GPU scales this pipeline's pictures.
    fn gpu_scales(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu_scaler.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    fn unwrap_rtp(&mut self, rtp: u32) -> Option<i64> {
        let ext = match self.last_rtp {
            None => i64::from(rtp),
            Some((last, ext)) => {
                let delta = rtp.wrapping_sub(last) as i32;
                if delta <= 0 {
                    return None;
                }
                ext + i64::from(delta)
            }
        };
        self.last_rtp = Some((rtp, ext));
        Some(ext)
    }
}

/// Whether a decoded picture of `format` can be scaled: NVDEC gives NV12
/// (in GPU memory, `Pixel::CUDA`, for [`Nvdec::Resident`], which only the
/// GPU scaler reads: `gpu_scales`), FFmpeg's own decoders I420.
fn scalable(format: Pixel, gpu_scales: bool) -> bool {
    match format {
        Pixel::YUV420P | Pixel::NV12 => true,
        Pixel::CUDA => gpu_scales,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{video_on_gpu, Backend, Placement, VideoPlacement};

    /// Places are counted whatever the backend behind them (the GPU's is
    /// not built here): taken up to the limit, given back on drop.
    #[test]
    fn sessions_past_the_gpu_places_go_to_the_cpu() {
        let p = Placement::new(Backend::Cpu, 2);
        let a = p.take();
        let b = p.take();
        assert!(a.1.is_some() && b.1.is_some());
        assert_eq!(p.on_gpu(), 2);
        let c = p.take();
        assert!(c.1.is_none(), "the third goes to the CPU");
        assert_eq!(c.0.name(), "cpu");
        drop(a);
        assert_eq!(p.on_gpu(), 1);
        let d = p.take();
        assert!(d.1.is_some(), "a place given back is taken again");
        // The gauge follows takes and drops.
        let g = prometheus::IntGauge::new("g", "g").expect("gauge");
        let p = Placement::new(Backend::Cpu, 3).counted(g.clone());
        let (e, f) = (p.take(), p.take());
        assert_eq!(g.get(), 2);
        drop(e);
        assert_eq!(g.get(), 1);
        drop(f);
        assert_eq!(g.get(), 0);
        assert!(Placement::cpu().take().1.is_none());
        assert_eq!(Placement::cpu().describe(), "cpu");
    }

    #[test]
    fn pictures_in_gpu_memory_are_scaled_only_by_the_gpu() {
        use super::scalable;
        use ffmpeg_next::format::Pixel;
        for gpu in [false, true] {
            assert!(scalable(Pixel::YUV420P, gpu));
            assert!(scalable(Pixel::NV12, gpu));
            assert!(!scalable(Pixel::YUV444P, gpu), "not a WebRTC layout");
        }
        assert!(scalable(Pixel::CUDA, true));
        assert!(!scalable(Pixel::CUDA, false), "libswscale cannot read it");
    }

    #[test]
    fn video_goes_on_the_gpu_where_it_was_asked_or_the_card_has_nvenc() {
        use VideoPlacement::{Auto, Cpu, Gpu};
        // No GPU opened: the CPU, and asking for the GPU is an error.
        assert_eq!(video_on_gpu(false, Auto, false), Ok(false));
        assert_eq!(video_on_gpu(false, Cpu, true), Ok(false));
        let err = video_on_gpu(false, Gpu, true).expect_err("refused");
        assert!(err.contains("--backend cuda"), "{err}");
        // A GPU: auto follows NVENC (an H200 has none), the others as asked.
        assert_eq!(video_on_gpu(true, Auto, false), Ok(false));
        assert_eq!(video_on_gpu(true, Auto, true), Ok(true));
        assert_eq!(video_on_gpu(true, Cpu, true), Ok(false));
        assert_eq!(video_on_gpu(true, Gpu, false), Ok(true));
    }
}
