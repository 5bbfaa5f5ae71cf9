//! `balie-transcoder gpu-check` (feature `cuda`): what the GPU backend does
//! on this node, beside the CPU backend in the same run, on generated 1080p
//! and 720p clips. Run by `transcoder/gpu-check.sh` on a GPU node; it prints
//! a Markdown table.
//!
//! - decode: frames per second through NVDEC (the CPU decoder beside it);
//! - scale: time per frame to make both layers (one GPU launch with its
//!   upload and download, or libswscale per layer);
//! - end to end: layers per second of a whole pipeline (decode, scale,
//!   encode) fed as fast as it takes frames;
//! - sessions held in real time at 720p (as `bench`), both backends, each
//!   session's first second left out (NVDEC makes a CUDA context per
//!   decoder; judged from the start, two sessions had 8 of 240 frames late
//!   on an H200).
//!
//! The GPU side runs each of the three [`Nvdec`] ways where it matters:
//! decode rate, end-to-end rate and sessions held, each with a CUDA context
//! per decoder (the first H200 runs: 6 sessions), on one shared context,
//! and on one shared context with the pictures kept in GPU memory (checked
//! against the CPU reference through the whole path: NVDEC, the kernel
//! reading FFmpeg's frame, the download).

use std::sync::Arc;
use std::time::{Duration, Instant};

use balie_offload::{Codec, Size};
use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

use crate::bench;
use crate::clip::{self, ClipFrame, FPS};
use crate::gpu::{Gpu, Nvdec};
use crate::pipeline::{cpu_scaler, layer_size, Backend, Decoder, Pipeline, GPU_VIDEO_SESSIONS};

/// The GPU opened each way decoders can run beside the default's, or why
/// it could not be.
type Variants = Vec<(Nvdec, Result<Arc<Gpu>, String>)>;

/// One measurement row.
struct Row {
    what: String,
    cpu: String,
    gpu: String,
}

/// The rows so far: each is printed as it is measured too, so a check cut
/// short by its time limit still says what it found.
#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn push(&mut self, what: String, cpu: String, gpu: String) {
        println!("| {what} | {cpu} | {gpu} |");
        self.0.push(Row { what, cpu, gpu });
    }

    /// Run one measurement; what fails (an error or a panic in a library
    /// never run on this card) becomes a row and the check goes on.
    fn guarded(&mut self, what: &str, f: impl FnOnce(&mut Table) -> Result<(), String>) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(panic) => format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            ),
        };
        self.push(format!("{what}: failed"), "-".into(), why);
    }
}

/// A measurement's cell: its figure, or why there is none.
fn cell<T>(r: Result<T, String>, show: impl FnOnce(T) -> String) -> String {
    r.map_or_else(|e| format!("failed: {e}"), show)
}

/// Run the check; `seconds` of clip per measurement, `max` sessions at most.
pub fn run(seconds: u32, max: usize) -> Result<(), String> {
    crate::pipeline::init().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    // The same card with NVDEC decoders on one shared context (the likely
    // cure for the first H200 run's 6 sessions), pictures in host memory
    // or kept on the card: side by side. Opened first: they set the
    // primary context's scheduling flag, which FFmpeg needs set before the
    // context is active (`gpu::blocking_sync`).
    let variants: Variants = [Nvdec::Shared, Nvdec::Resident]
        .into_iter()
        .map(|way| (way, Gpu::open_nvdec(0, way).map_err(|e| e.to_string())))
        .collect();
    for (way, gpu) in &variants {
        if let Err(e) = gpu {
            println!("decoders on {}: {e}", way.describe());
        }
    }
    let t1 = Instant::now();
    let gpu = Gpu::open(0).map_err(|e| e.to_string())?;
    println!("GPU: {}", gpu.info);
    println!(
        "opened in {:.2} s (NVRTC compile included)",
        t1.elapsed().as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU cores: {cores}");
    println!("| measurement | cpu | cuda |");
    println!("| --- | ---: | ---: |");
    let mut rows = Table::default();
    let mut held: Vec<Held> = Vec::new();
    // Sessions in real time (720p30 in, 360p and 180p out), as `bench`:
    // first, being what decides where sessions run (a check cut short by
    // its limit has them), the CPU then the newest GPU way first.
    for codec in [Codec::H264, Codec::Vp8] {
        rows.guarded(&format!("{} sessions", codec.name()), |rows| {
            let clip = bench::source(codec, seconds)?;
            let mut backends = vec![("cpu".to_string(), Backend::Cpu)];
            for (way, gpu) in variants.iter().rev() {
                if let Ok(gpu) = gpu {
                    backends.push((format!("cuda, {}", way.describe()), Backend::Cuda(gpu.clone())));
                }
            }
            backends.push((
                format!("cuda, {}", gpu.nvdec.describe()),
                Backend::Cuda(gpu.clone()),
            ));
            // The CPU's search from 8; the shared ways' from the CPU's count
            // (the question is how far they are from it); own-context's
            // from what the H200 runs held (each of its sessions makes a
            // CUDA context: a step of 50 would take long for nothing).
            let mut guess = 8;
            for (label, backend) in &backends {
                let start = match backend {
                    Backend::Cuda(g) if g.nvdec == Nvdec::OwnContext => GPU_VIDEO_SESSIONS,
                    _ => guess,
                };
                let mut cores_at = std::collections::HashMap::new();
                let most = most_held(max, start, |n| {
                    let step =
                        bench::ours_judged(codec, &clip, n, backend, bench::Criterion::Steady);
                    cores_at.insert(n, step.cores);
                    eprintln!(
                        "[{:.0} s, {} UTC] {} {label}: {n} sessions, {} of {} frames late, {:.2} cores, decode / scale / encode {} ms a frame",
                        t0.elapsed().as_secs_f64(),
                        utc_clock(std::time::SystemTime::now()),
                        codec.name(),
                        step.late,
                        step.frames,
                        step.cores,
                        step.stage_ms
                    );
                    step.held
                });
                held.push(Held {
                    codec,
                    way: match backend {
                        Backend::Cpu => None,
                        Backend::Cuda(g) => Some(g.nvdec),
                    },
                    sessions: most,
                    cores: cores_at.get(&most).map_or(0.0, |c| c / most.max(1) as f64),
                });
                // A row as soon as each is known: a check cut short keeps it.
                let (cpu, gpu) = match backend {
                    Backend::Cpu => {
                        guess = most.max(1);
                        (most.to_string(), "-".to_string())
                    }
                    Backend::Cuda(_) => ("-".to_string(), most.to_string()),
                };
                rows.push(
                    format!(
                        "{} sessions held in real time (720p -> 360p+180p; from each one's second second), {label}",
                        codec.name()
                    ),
                    cpu,
                    gpu,
                );
            }
            for (way, gpu) in &variants {
                if let Err(e) = gpu {
                    rows.push(
                        format!("{} sessions held, NVDEC on {}", codec.name(), way.describe()),
                        "-".into(),
                        format!("failed: {e}"),
                    );
                }
            }
            Ok(())
        });
    }
    let advice = advice(&held, max);
    print_advice(&advice);
    // Then each stage, at 720p (the sessions' size) and 1080p.
    for (label, size) in [
        (
            "720p",
            Size {
                width: 1280,
                height: 720,
            },
        ),
        (
            "1080p",
            Size {
                width: 1920,
                height: 1080,
            },
        ),
    ] {
        for codec in [Codec::H264, Codec::Vp8] {
            rows.guarded(&format!("{label} {}", codec.name()), |rows| {
                let clip = clip::make(codec, size, seconds * FPS, 2 * FPS, 3000)
                    .map_err(|e| e.to_string())?;
                measure(&gpu, &variants, label, codec, &clip, rows)
            });
        }
    }
    println!();
    println!("| measurement | cpu | cuda |");
    println!("| --- | ---: | ---: |");
    for r in &rows.0 {
        println!("| {} | {} | {} |", r.what, r.cpu, r.gpu);
    }
    print_advice(&advice);
    println!();
    println!("total {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// What a session search found for one codec and one backend: the most
/// sessions held, and the CPU cores each used at that count.
#[derive(Debug, Clone, Copy)]
struct Held {
    codec: Codec,
    /// None for the CPU backend.
    way: Option<Nvdec>,
    sessions: usize,
    cores: f64,
}

fn print_advice(lines: &[String]) {
    println!();
    println!("what this run says for `serve --backend cuda`:");
    for l in lines {
        println!("- {l}");
    }
}

/// What the session counts say for `serve`: which NVDEC way, how many
/// sessions on the GPU, and whether video should go there at all on this
/// card (`--video-backend auto` keeps it on the CPU without NVENC).
///
/// Sessions past `--gpu-video-sessions` run on the CPU, so a worker with
/// `n` sessions on the GPU, each using `g` cores where a CPU session uses
/// `c`, holds about `cpu + n * (1 - g / c)` sessions against the CPU's
/// `cpu` alone: the GPU pays only where its sessions use less CPU, and
/// the way to pick is the one with the largest gain for both codecs (an
/// estimate from separate runs: mixed load is not measured). A way
/// measured for one codec only is left out.
fn advice(held: &[Held], max: usize) -> Vec<String> {
    const CODECS: [Codec; 2] = [Codec::H264, Codec::Vp8];
    let find = |codec: Codec, way: Option<Nvdec>| {
        held.iter()
            .find(|h| h.codec == codec && h.way == way)
            .copied()
    };
    let mut lines = Vec::new();
    for codec in CODECS {
        let mut parts = Vec::new();
        for way in [
            None,
            Some(Nvdec::Resident),
            Some(Nvdec::Shared),
            Some(Nvdec::OwnContext),
        ] {
            if let Some(h) = find(codec, way) {
                let at_least = if h.sessions >= max {
                    " (the check's most: at least)"
                } else {
                    ""
                };
                parts.push(format!(
                    "{} {}{at_least} at {:.2} cores each",
                    way.map_or_else(|| "CPU".to_string(), arg_name),
                    h.sessions,
                    h.cores
                ));
            }
        }
        if !parts.is_empty() {
            lines.push(format!(
                "{} sessions held: {}",
                codec.name(),
                parts.join("; ")
            ));
        }
    }
    // Each way's gain over the CPU alone, per codec; the smaller decides.
    let mut best: Option<(Nvdec, usize, f64, Vec<f64>)> = None;
    for way in [Nvdec::Resident, Nvdec::Shared, Nvdec::OwnContext] {
        let per_codec: Option<Vec<(usize, f64)>> = CODECS
            .iter()
            .map(|&codec| {
                let gpu = find(codec, Some(way))?;
                let cpu = find(codec, None)?;
                let gain = if gpu.sessions == 0 || cpu.cores <= 0.0 {
                    0.0
                } else {
                    gpu.sessions as f64 * (1.0 - gpu.cores / cpu.cores)
                };
                Some((gpu.sessions, gain))
            })
            .collect();
        let Some(per_codec) = per_codec else { continue };
        let sessions = per_codec.iter().map(|p| p.0).min().unwrap_or(0);
        let gains: Vec<f64> = per_codec.iter().map(|p| p.1).collect();
        let gain = gains.iter().copied().fold(f64::INFINITY, f64::min);
        if best.as_ref().is_none_or(|b| gain > b.2) {
            best = Some((way, sessions, gain, gains));
        }
    }
    match best {
        None => lines.push("no NVDEC way was measured for both codecs beside the CPU: nothing to change".into()),
        Some((way, sessions, gain, gains)) if gain >= 1.0 => {
            let each = CODECS
                .iter()
                .zip(&gains)
                .map(|(c, g)| format!("{} +{g:.1}", c.name()))
                .collect::<Vec<_>>()
                .join(", ");
            lines.push(format!(
                "video on the GPU: `--video-backend cuda --nvdec {} --gpu-video-sessions {sessions}`, about {each} sessions per worker over the CPU alone",
                arg_name(way)
            ));
        }
        Some((way, _, gain, _)) => lines.push(format!(
            "keep video on the CPU (`--video-backend auto`): the best way, {}, would gain {gain:.1} sessions per worker over the CPU alone",
            arg_name(way)
        )),
    }
    lines
}

/// The `--nvdec` value naming `way`.
fn arg_name(way: Nvdec) -> String {
    clap::ValueEnum::to_possible_value(&way).map_or_else(String::new, |v| v.get_name().to_string())
}

fn measure(
    gpu: &Arc<Gpu>,
    variants: &Variants,
    label: &str,
    codec: Codec,
    clip: &[ClipFrame],
    rows: &mut Table,
) -> Result<(), String> {
    let name = codec.name();
    let cuvid = match codec {
        Codec::Vp8 => "vp8_cuvid",
        Codec::H264 => "h264_cuvid",
    };
    // Decode: as fast as it goes, pictures counted.
    let cpu_fps = decode_fps(Decoder::new(codec).map_err(|e| e.to_string())?, clip);
    let gpu_fps = if gpu.info.nvdec.contains(&cuvid) {
        cell(
            Decoder::named(cuvid)
                .map_err(|e| e.to_string())
                .map(|d| decode_fps(d, clip)),
            |fps| format!("{fps:.0}"),
        )
    } else {
        "no NVDEC for this codec".into()
    };
    rows.push(
        format!("{label} {name} decode, frames/s"),
        format!("{cpu_fps:.0}"),
        gpu_fps,
    );
    for (way, other) in variants {
        let Ok(other) = other else { continue };
        if !other.info.nvdec.contains(&cuvid) {
            continue;
        }
        rows.push(
            format!(
                "{label} {name} decode, NVDEC on {}, frames/s",
                way.describe()
            ),
            "-".into(),
            cell(
                other
                    .decoder(cuvid)
                    .map_err(|e| e.to_string())
                    .map(|d| decode_fps(d, clip)),
                |fps| format!("{fps:.0}"),
            ),
        );
        let same = match way {
            // Pictures in host memory: NVDEC's against the CPU decoder's.
            Nvdec::OwnContext | Nvdec::Shared => other
                .decoder(cuvid)
                .and_then(|a| Ok((a, Decoder::new(codec)?)))
                .map_err(|e| e.to_string())
                .and_then(|(a, b)| last_luma_difference(a, b, clip)),
            // Pictures on the card: the layers the kernel made from them
            // against the reference scaling of the CPU decoder's.
            Nvdec::Resident => resident_difference(other, cuvid, codec, clip),
        };
        let what = match way {
            Nvdec::Resident => "layers scaled from NVDEC's pictures in GPU memory against the CPU reference: largest difference, last picture",
            _ => "NVDEC against the CPU decoder: largest luma difference, last picture",
        };
        rows.push(
            format!("{label} {name} {what} ({})", way.describe()),
            "-".into(),
            cell(same, |d| d.to_string()),
        );
    }

    // Scale: both layers of every decoded picture.
    let mut dec = Decoder::new(codec).map_err(|e| e.to_string())?;
    let mut pictures = Vec::new();
    for (i, f) in clip.iter().enumerate().take(60) {
        if let Ok(Some(p)) = dec.decode(&f.data, i as i64) {
            pictures.push(p.clone());
        }
    }
    let source = pictures.first().map_or(
        Size {
            width: 0,
            height: 0,
        },
        size_of,
    );
    let (sizes, mut outs) = layer_pictures(source);
    let mut scalers: Vec<_> = sizes
        .iter()
        .map(|s| cpu_scaler(Pixel::YUV420P, source, *s))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    for p in &pictures {
        for (s, o) in scalers.iter_mut().zip(outs.iter_mut()) {
            s.run(p, o).map_err(|e| e.to_string())?;
        }
    }
    let cpu_scale = per_frame_ms(t.elapsed(), pictures.len());
    let gpu_scale = (|| {
        let mut scaler = gpu.scaler().map_err(|e| e.to_string())?;
        // One warm-up launch (module load, allocations).
        if let Some(p) = pictures.first() {
            let mut refs: Vec<&mut ffmpeg::frame::Video> = outs.iter_mut().collect();
            scaler.scale(p, &mut refs).map_err(|e| e.to_string())?;
        }
        let t = Instant::now();
        for p in &pictures {
            let mut refs: Vec<&mut ffmpeg::frame::Video> = outs.iter_mut().collect();
            scaler.scale(p, &mut refs).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(per_frame_ms(t.elapsed(), pictures.len()))
    })();
    let worst = match (&gpu_scale, pictures.last()) {
        (Ok(_), Some(p)) => worst_difference(&outs, p).to_string(),
        (Ok(_), None) => "no pictures".into(),
        (Err(_), _) => "-".into(),
    };
    rows.push(
        format!("{label} {name} GPU scaling: largest difference from the CPU reference (of 255)"),
        "-".into(),
        worst,
    );
    rows.push(
        format!(
            "{label} {name} scale to both layers, ms/frame (GPU: upload, one launch, download)"
        ),
        format!("{cpu_scale:.2}"),
        cell(gpu_scale, |ms| format!("{ms:.2}")),
    );

    // End to end: layers made per second, one pipeline fed flat out.
    let cpu_lps = layers_per_second(codec, clip, &Backend::Cpu)?;
    let gpu_lps = layers_per_second(codec, clip, &Backend::Cuda(gpu.clone()));
    rows.push(
        format!("{label} {name} end to end, layer frames/s (one session, flat out)"),
        format!("{cpu_lps:.0}"),
        cell(gpu_lps, |lps| format!("{lps:.0}")),
    );
    // The layers' picture: the GPU's box filter against the CPU's bilinear
    // scaler, both against the source scaled by the box filter.
    let psnr = |b: &Backend| {
        bench::session_quality(codec, clip, b).map(|layers| {
            layers
                .iter()
                .map(|l| format!("{:.1}", l.fidelity.mean.y))
                .collect::<Vec<_>>()
                .join(" / ")
        })
    };
    rows.push(
        format!("{label} {name} layers' picture, Y PSNR against the source, dB (360p / 180p)"),
        cell(psnr(&Backend::Cpu), |s| s),
        cell(psnr(&Backend::Cuda(gpu.clone())), |s| s),
    );
    for (way, other) in variants {
        rows.push(
            format!("{label} {name} end to end, NVDEC on {}", way.describe()),
            "-".into(),
            cell(
                other
                    .clone()
                    .and_then(|g| layers_per_second(codec, clip, &Backend::Cuda(g))),
                |lps| format!("{lps:.0}"),
            ),
        );
    }
    Ok(())
}

/// Decode the clip with a [`Nvdec::Resident`] decoder and scale each
/// picture where it lies in GPU memory, beside the CPU decoder; the largest
/// difference between the layers of the GPU's last picture and the
/// reference scaling of the CPU's picture with the same timestamp (0
/// expected: both decoders follow the codec's spec, the kernel the
/// reference's arithmetic).
fn resident_difference(
    gpu: &Arc<Gpu>,
    cuvid: &'static str,
    codec: Codec,
    clip: &[ClipFrame],
) -> Result<u8, String> {
    let mut dec = gpu.decoder(cuvid).map_err(|e| e.to_string())?;
    let mut cpu = Decoder::new(codec).map_err(|e| e.to_string())?;
    let mut scaler = gpu.scaler().map_err(|e| e.to_string())?;
    let mut outs: Vec<ffmpeg::frame::Video> = Vec::new();
    let mut last_gpu = None;
    // The CPU's last few pictures: NVDEC may hand a picture back later.
    let mut recent: std::collections::VecDeque<ffmpeg::frame::Video> = Default::default();
    for (i, f) in clip.iter().enumerate() {
        if let Ok(Some(p)) = dec.decode(&f.data, i as i64) {
            if p.format() != Pixel::CUDA {
                return Err(format!(
                    "NVDEC gave {:?}, not frames in GPU memory",
                    p.format()
                ));
            }
            if outs.is_empty() {
                outs = layer_pictures(size_of(p)).1;
            }
            let mut refs: Vec<&mut ffmpeg::frame::Video> = outs.iter_mut().collect();
            scaler.scale(p, &mut refs).map_err(|e| e.to_string())?;
            last_gpu = p.pts();
        }
        if let Ok(Some(p)) = cpu.decode(&f.data, i as i64) {
            if recent.len() == 8 {
                recent.pop_front();
            }
            recent.push_back(p.clone());
        }
    }
    let pts = last_gpu.ok_or("NVDEC gave no picture")?;
    let reference = recent
        .iter()
        .find(|p| p.pts() == Some(pts))
        .ok_or_else(|| format!("no CPU picture with the GPU's last timestamp {pts}"))?;
    Ok(worst_difference(&outs, reference))
}

fn size_of(p: &ffmpeg::frame::Video) -> Size {
    Size {
        width: p.width() as u16,
        height: p.height() as u16,
    }
}

/// The layers' sizes for a source of `source`'s size, as a session makes
/// them, and an I420 picture of each to scale into.
fn layer_pictures(source: Size) -> (Vec<Size>, Vec<ffmpeg::frame::Video>) {
    let sizes: Vec<Size> = bench::LAYERS
        .iter()
        .map(|l| layer_size(source, l.scale_down))
        .collect();
    let pictures = sizes
        .iter()
        .map(|s| ffmpeg::frame::Video::new(Pixel::YUV420P, s.width.into(), s.height.into()))
        .collect();
    (sizes, pictures)
}

/// The largest difference of scaled `layers` from the reference scaling of
/// `source` to their sizes (0 expected: the kernel does the reference's
/// arithmetic).
fn worst_difference(layers: &[ffmpeg::frame::Video], source: &ffmpeg::frame::Video) -> u8 {
    layers
        .iter()
        .map(|o| {
            crate::picture::max_difference(o, &crate::picture::reference_scale(source, size_of(o)))
        })
        .max()
        .unwrap_or(0)
}

/// The most sessions (up to `max`) for which `holds` is true, assuming it
/// holds up to some count and fails above. From `start` (a guess: another
/// backend's count), doubling up or halving down until the edge is passed,
/// then bisecting: an edge near the guess takes a few steps, one anywhere
/// in 1..=64 at most about a dozen (each step is seconds of real time).
fn most_held(max: usize, start: usize, mut holds: impl FnMut(usize) -> bool) -> usize {
    // good holds (0 trivially), bad fails (max + 1 by assumption).
    let (mut good, mut bad) = (0usize, max + 1);
    let mut n = start.clamp(1, max.max(1));
    if max == 0 {
        return 0;
    }
    if holds(n) {
        good = n;
        while good < max {
            n = (good * 2).min(max);
            if holds(n) {
                good = n;
            } else {
                bad = n;
                break;
            }
        }
    } else {
        bad = n;
        while bad > 1 {
            n = bad / 2;
            if holds(n) {
                good = n;
                break;
            }
            bad = n;
        }
    }
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if holds(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

/// `HH:MM:SS` of `t` in UTC: the step lines carry it so that they line up
/// with `nvidia-smi dmon -o T`'s samples (the node's clock, UTC on GPU
/// nodes here) and say which engine was busy during which step.
fn utc_clock(t: std::time::SystemTime) -> String {
    let s = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn per_frame_ms(d: Duration, frames: usize) -> f64 {
    d.as_secs_f64() * 1000.0 / frames.max(1) as f64
}

fn decode_fps(mut dec: Decoder, clip: &[ClipFrame]) -> f64 {
    let t = Instant::now();
    let mut pictures = 0u64;
    for (i, f) in clip.iter().enumerate() {
        if let Ok(Some(_)) = dec.decode(&f.data, i as i64) {
            pictures += 1;
        }
    }
    pictures as f64 / t.elapsed().as_secs_f64()
}

/// Decode the clip on both; the largest difference between the last
/// pictures' luma (both decoders follow the codec's spec: 0 expected).
fn last_luma_difference(mut a: Decoder, mut b: Decoder, clip: &[ClipFrame]) -> Result<u8, String> {
    let last = |d: &mut Decoder| {
        let mut pic = None;
        for (i, f) in clip.iter().enumerate() {
            if let Ok(Some(p)) = d.decode(&f.data, i as i64) {
                pic = Some(p.clone());
            }
        }
        pic.ok_or_else(|| "no picture decoded".to_string())
    };
    let (pa, pb) = (last(&mut a)?, last(&mut b)?);
    if (pa.width(), pa.height()) != (pb.width(), pb.height()) {
        return Err(format!(
            "{}x{} against {}x{}",
            pa.width(),
            pa.height(),
            pb.width(),
            pb.height()
        ));
    }
    let (w, h) = (pa.width() as usize, pa.height() as usize);
    let (sa, sb) = (pa.stride(0), pb.stride(0));
    let (da, db) = (pa.data(0), pb.data(0));
    Ok((0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| da[y * sa + x].abs_diff(db[y * sb + x]))
        .max()
        .unwrap_or(0))
}

fn layers_per_second(codec: Codec, clip: &[ClipFrame], backend: &Backend) -> Result<f64, String> {
    let mut p = Pipeline::with_backend(codec, bench::LAYERS.to_vec(), backend)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let far = Instant::now() + Duration::from_secs(3600);
    let t = Instant::now();
    let mut made = 0usize;
    for f in clip {
        p.push(f.rtp_time, f.key, &f.data, far, &mut out)
            .map_err(|e| e.to_string())?;
        made += out.len();
        out.clear();
    }
    Ok(made as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::{advice, most_held, utc_clock, Held};
    use crate::gpu::Nvdec;
    use balie_offload::Codec;

    fn held(codec: Codec, way: Option<Nvdec>, sessions: usize, cores: f64) -> Held {
        Held {
            codec,
            way,
            sessions,
            cores,
        }
    }

    /// The CPU's rows, both codecs: 32 sessions (the check's most) at 0.23
    /// and 0.35 cores each, as on the H200.
    fn cpu() -> Vec<Held> {
        vec![
            held(Codec::H264, None, 32, 0.23),
            held(Codec::Vp8, None, 32, 0.35),
        ]
    }

    #[test]
    fn the_way_that_saves_most_cpu_on_both_codecs_is_advised() {
        let mut h = cpu();
        // Own-context as on the H200: 6 sessions, no CPU saved.
        h.push(held(Codec::H264, Some(Nvdec::OwnContext), 6, 0.22));
        h.push(held(Codec::Vp8, Some(Nvdec::OwnContext), 6, 0.38));
        // Shared: many sessions, but VP8's save little.
        h.push(held(Codec::H264, Some(Nvdec::Shared), 30, 0.15));
        h.push(held(Codec::Vp8, Some(Nvdec::Shared), 30, 0.34));
        // Resident: fewer, each much cheaper on both.
        h.push(held(Codec::H264, Some(Nvdec::Resident), 20, 0.12));
        h.push(held(Codec::Vp8, Some(Nvdec::Resident), 20, 0.20));
        let lines = advice(&h, 32);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("h264 sessions held: CPU 32 (the check's most: at least) at 0.23 cores each; resident 20 at 0.12"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("own-context 6 at 0.38"), "{}", lines[1]);
        // H.264: 20 * (1 - 0.12 / 0.23) = 9.6; VP8: 20 * (1 - 0.20 / 0.35) = 8.6.
        assert_eq!(
            lines[2],
            "video on the GPU: `--video-backend cuda --nvdec resident --gpu-video-sessions 20`, \
             about h264 +9.6, vp8 +8.6 sessions per worker over the CPU alone"
        );
    }

    #[test]
    fn video_stays_on_the_cpu_where_no_way_saves_a_session() {
        let mut h = cpu();
        h.push(held(Codec::H264, Some(Nvdec::OwnContext), 6, 0.22));
        h.push(held(Codec::Vp8, Some(Nvdec::OwnContext), 6, 0.38));
        // Measured for H.264 only (the VP8 search was cut short): left out.
        h.push(held(Codec::H264, Some(Nvdec::Resident), 30, 0.05));
        let lines = advice(&h, 64);
        assert!(lines[0].contains("CPU 32 at 0.23"), "{}", lines[0]);
        assert_eq!(
            lines.last().expect("advice"),
            "keep video on the CPU (`--video-backend auto`): the best way, own-context, \
             would gain -0.5 sessions per worker over the CPU alone"
        );
    }

    #[test]
    fn without_a_gpu_way_nothing_changes() {
        let lines = advice(&cpu(), 32);
        assert_eq!(
            lines.last().expect("advice"),
            "no NVDEC way was measured for both codecs beside the CPU: nothing to change"
        );
        assert!(advice(&[], 32)[0].starts_with("no NVDEC way"));
    }

    #[test]
    fn step_lines_carry_the_utc_clock() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000 + 3723);
        // 1_796_000_000 s is 2026-11-30 00:53:20 UTC; 3723 s on: 01:55:23
        // (`date -u -d @1796003723`).
        assert_eq!(utc_clock(t), "01:55:23");
        assert_eq!(utc_clock(std::time::UNIX_EPOCH), "00:00:00");
    }

    #[test]
    fn most_held_finds_the_edge_in_few_steps_from_any_guess() {
        for max in [0usize, 1, 32, 64] {
            for start in [1usize, 6, 8, 32, 50, 64, 100] {
                for edge in 0..=70usize {
                    let mut steps = 0;
                    let got = most_held(max, start, |n| {
                        assert!((1..=max).contains(&n), "asked {n} of max {max}");
                        steps += 1;
                        n <= edge
                    });
                    assert_eq!(got, edge.min(max), "max {max} start {start} edge {edge}");
                    assert!(
                        steps <= 13,
                        "max {max} start {start} edge {edge}: {steps} steps"
                    );
                }
            }
        }
        // Near the guess, few steps: what the GPU check counts on to fit
        // four backends and two codecs in its time.
        let mut steps = 0;
        let got = most_held(64, 50, |n| {
            steps += 1;
            n <= 48
        });
        assert_eq!(got, 48);
        assert!(steps <= 7, "{steps} steps");
    }
}
