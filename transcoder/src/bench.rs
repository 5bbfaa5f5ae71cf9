//! `balie-transcoder bench`: how many transcode sessions this machine holds
//! in real time, the CPU backend beside the `ffmpeg` command line doing the
//! same job (720p30 in, 360p and 180p out, in the source's codec) in the
//! same run.
//!
//! A step runs `n` sessions at once for a fixed time. Our sessions are the
//! worker's own pipelines (no QUIC: the network is not what is measured),
//! each on its own thread, fed a frame every 33 ms; a frame not encoded by
//! 100 ms after it was due is late (the worker would drop it). A step holds
//! when under 1% of frames are late. An `ffmpeg` step runs `n` processes,
//! each reading the same clip at its native rate (`-re`) and encoding both
//! layers with the same settings (one thread per codec context, bilinear
//! scaling, the same encoder options, keyframes where the source has them);
//! it holds when every process finished
//! within 3% (plus 0.5 s of start-up) of the clip's length.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use balie_offload::{Codec, LayerSpec, Size};
use ffmpeg_next as ffmpeg;

use crate::clip::{self, ClipFrame, FPS};
use crate::metrics::{children_cpu_seconds, cpu_seconds};
use crate::picture::{self, LayerFidelity, LayerFrame};
use crate::pipeline::{rate_control, Backend, Encoded, Pipeline, PipelineError};

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub sessions: usize,
    pub frames: u64,
    pub late: u64,
    pub held: bool,
    /// CPU seconds used per second of wall time (cores busy).
    pub cores: f64,
    /// How long the slowest session or process took over the clip, from
    /// its start (its first frame was due, or the process was spawned).
    pub slowest: Duration,
    /// Our sessions: mean time per judged frame in decode, and in scale
    /// and encode over the frames that were not past their deadline (ms);
    /// zero for the `ffmpeg` side.
    pub stage_ms: StageMs,
}

/// Mean milliseconds per frame in each stage of our pipeline; shown as
/// `decode / scale / encode`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageMs {
    pub decode: f64,
    pub scale: f64,
    pub encode: f64,
}

impl std::fmt::Display for StageMs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} / {:.2} / {:.2}",
            self.decode, self.scale, self.encode
        )
    }
}

/// Stage times summed over frames, for [`StageMs`].
#[derive(Debug, Clone, Copy, Default)]
struct StageSums {
    decoded: u64,
    decode: Duration,
    scaled: u64,
    scale: Duration,
    encode: Duration,
}

impl StageSums {
    fn add(&mut self, t: &crate::pipeline::Timings) {
        self.decoded += 1;
        self.decode += t.decode;
        if !t.scale.is_zero() {
            self.scaled += 1;
            self.scale += t.scale;
            self.encode += t.encode;
        }
    }

    fn merge(&mut self, o: &StageSums) {
        self.decoded += o.decoded;
        self.decode += o.decode;
        self.scaled += o.scaled;
        self.scale += o.scale;
        self.encode += o.encode;
    }

    fn mean(&self) -> StageMs {
        let ms = |d: Duration, n: u64| d.as_secs_f64() * 1e3 / n.max(1) as f64;
        StageMs {
            decode: ms(self.decode, self.decoded),
            scale: ms(self.scale, self.scaled),
            encode: ms(self.encode, self.scaled),
        }
    }
}

pub const LAYERS: [LayerSpec; 2] = [
    LayerSpec {
        scale_down: 2,
        bitrate_kbps: 500,
    },
    LayerSpec {
        scale_down: 4,
        bitrate_kbps: 150,
    },
];

/// The 720p source clip of `seconds` seconds, a keyframe every 2 s.
pub fn source(codec: Codec, seconds: u32) -> Result<Vec<ClipFrame>, String> {
    let hd = Size {
        width: 1280,
        height: 720,
    };
    clip::make(codec, hd, seconds * FPS, 2 * FPS, 1500).map_err(|e| e.to_string())
}

/// How a step of our sessions is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// Every frame encoded within 100 ms of when it was due (under 1%
    /// late): what the worker must do, it drops later frames.
    PerFrame,
    /// Each session finished the clip within 3% (plus 0.5 s) of its length,
    /// nothing dropped: the criterion the `ffmpeg` side is judged by.
    KeepsUp,
    /// [`Criterion::PerFrame`] from each session's second second on: its
    /// start (opening NVDEC, which makes a CUDA context of its own per
    /// decoder) is left out, its steady pace judged (the GPU check).
    Steady,
}

/// Frames at a session's start that [`Criterion::Steady`] does not judge.
const STEADY_AFTER: usize = FPS as usize;

/// The time a run of `seconds` may take and still keep up (ffmpeg's
/// criterion, used for both sides).
pub fn keeps_up_limit(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds * 1.03 + 0.5)
}

/// Run `n` of our CPU sessions over the clip in real time.
pub fn ours(codec: Codec, clip: &[ClipFrame], n: usize) -> Step {
    ours_on(codec, clip, n, &Backend::Cpu)
}

/// Run `n` of our sessions on `backend` over the clip in real time, judged
/// per frame.
pub fn ours_on(codec: Codec, clip: &[ClipFrame], n: usize, backend: &Backend) -> Step {
    ours_judged(codec, clip, n, backend, Criterion::PerFrame)
}

/// Run `n` of our sessions on `backend` over the clip in real time.
pub fn ours_judged(
    codec: Codec,
    clip: &[ClipFrame],
    n: usize,
    backend: &Backend,
    criterion: Criterion,
) -> Step {
    let cpu0 = cpu_seconds();
    let wall = Instant::now();
    let start = Instant::now() + Duration::from_millis(100);
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let clip = clip.to_vec();
            let backend = backend.clone();
            std::thread::spawn(move || {
                let mut p = Pipeline::with_backend(codec, LAYERS.to_vec(), &backend)
                    .map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                let (mut frames, mut late) = (0u64, 0u64);
                let mut stages = StageSums::default();
                // Sessions start a little apart, as calls do.
                let offset = Duration::from_millis(33 * i as u64 / n.max(1) as u64);
                for (k, f) in clip.iter().enumerate() {
                    let due = start + offset + Duration::from_micros(33_333 * k as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let deadline = match criterion {
                        Criterion::PerFrame | Criterion::Steady => due + Duration::from_millis(100),
                        Criterion::KeepsUp => due + Duration::from_secs(3600),
                    };
                    let r = p
                        .push(f.rtp_time, f.key, &f.data, deadline, &mut out)
                        .map_err(|e| e.to_string())?;
                    let judged = criterion != Criterion::Steady || k >= STEADY_AFTER;
                    if judged {
                        stages.add(&r.timings);
                        frames += 1;
                        if r.late || Instant::now() > deadline {
                            late += 1;
                        }
                    }
                    out.clear();
                }
                let took = Instant::now().saturating_duration_since(start + offset);
                if criterion == Criterion::KeepsUp {
                    let length = clip.len() as f64 / f64::from(FPS);
                    if took > keeps_up_limit(length) {
                        late = frames;
                    }
                }
                Ok::<_, String>((frames, late, took, stages))
            })
        })
        .collect();
    let (mut frames, mut late, mut slowest) = (0, 0, Duration::ZERO);
    let mut stages = StageSums::default();
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok((f, l, took, s))) => {
                frames += f;
                late += l;
                slowest = slowest.max(took);
                stages.merge(&s);
            }
            // A session that failed made no frames (the step does not
            // hold); say why once.
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(_) => failed = failed.or(Some("a session's thread panicked".into())),
        }
    }
    if let Some(why) = failed {
        eprintln!(
            "{} {}: a session failed: {why}",
            codec.name(),
            backend.name()
        );
    }
    let cores = (cpu_seconds() - cpu0) / wall.elapsed().as_secs_f64();
    Step {
        sessions: n,
        frames,
        late,
        held: frames > 0 && (late as f64) < 0.01 * frames as f64,
        cores,
        slowest,
        stage_ms: stages.mean(),
    }
}

/// Write the clip as a file `ffmpeg` reads: IVF for VP8, Annex B for H.264.
pub fn write_clip(codec: Codec, clip: &[ClipFrame], path: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    match codec {
        Codec::Vp8 => {
            buf.extend_from_slice(b"DKIF");
            buf.extend_from_slice(&0u16.to_le_bytes());
            buf.extend_from_slice(&32u16.to_le_bytes());
            buf.extend_from_slice(b"VP80");
            buf.extend_from_slice(&1280u16.to_le_bytes());
            buf.extend_from_slice(&720u16.to_le_bytes());
            buf.extend_from_slice(&FPS.to_le_bytes());
            buf.extend_from_slice(&1u32.to_le_bytes());
            buf.extend_from_slice(&(clip.len() as u32).to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            for (i, f) in clip.iter().enumerate() {
                buf.extend_from_slice(&(f.data.len() as u32).to_le_bytes());
                buf.extend_from_slice(&(i as u64).to_le_bytes());
                buf.extend_from_slice(&f.data);
            }
        }
        Codec::H264 => {
            for f in clip {
                buf.extend_from_slice(&f.data);
            }
        }
    }
    std::fs::write(path, buf)
}

/// The `ffmpeg` command of one step's process: the clip `file` read at
/// its native rate (`-re`), both layers encoded to nowhere (`-f null`), or,
/// with `outputs`, each to its file in the codec's raw format (IVF, Annex
/// B: the test of its keyframes).
pub fn ffmpeg_command(codec: Codec, file: &Path, outputs: Option<[&Path; 2]>) -> Command {
    let (input_fmt, encoder, raw, extra): (&[&str], &str, &str, &[&str]) = match codec {
        Codec::Vp8 => (
            &["-f", "ivf"],
            "libvpx",
            "ivf",
            &[
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-lag-in-frames",
                "0",
                "-auto-alt-ref",
                "0",
                "-error-resilient",
                "1",
            ],
        ),
        Codec::H264 => (
            &["-f", "h264", "-r", "30"],
            "libx264",
            "h264",
            &[
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
                "-profile:v",
                "baseline",
                "-forced-idr",
                "1",
                "-x264-params",
                "bframes=0:scenecut=0:repeat-headers=1",
            ],
        ),
    };
    let mut cmd = Command::new("ffmpeg");
    // The same job as ours: one thread per codec context, bilinear
    // scaling, the same encoder settings.
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-threads", "1"])
        .args(input_fmt)
        .arg("-i")
        .arg(file)
        .args([
            "-filter_complex_threads",
            "1",
            "-filter_complex",
            "[0:v]split=2[a][b];[a]scale=640:360:flags=bilinear[h];\
             [b]scale=320:180:flags=bilinear[q]",
        ]);
    // Keyframes where the source has them and nowhere else, as our
    // encoders make them (left to itself, ffmpeg makes fewer: libvpx one
    // every 128 frames, libx264 one every 250, where the clip has one every
    // 60), and the same rate control (`pipeline::rate_control`).
    for (i, (label, spec)) in ["[h]", "[q]"].into_iter().zip(LAYERS).enumerate() {
        let bits = (u64::from(spec.bitrate_kbps) * 1000).to_string();
        cmd.args(["-map", label, "-c:v", encoder, "-threads", "1"])
            .args(["-b:v", &bits, "-maxrate", &bits])
            .args(["-force_key_frames", "source", "-g", "100000"])
            .args(extra);
        for (key, value) in rate_control(codec, spec.bitrate_kbps) {
            cmd.arg(format!("-{key}")).arg(value);
        }
        match outputs {
            None => cmd.args(["-f", "null", "-"]),
            Some(paths) => cmd.args(["-y", "-f", raw]).arg(paths[i]),
        };
    }
    cmd
}

/// Run `n` `ffmpeg` processes over the clip file.
pub fn ffmpeg(codec: Codec, file: &Path, seconds: u32, n: usize) -> Result<Step, String> {
    let cpu0 = children_cpu_seconds();
    let wall = Instant::now();
    let mut procs = Vec::new();
    for _ in 0..n {
        let mut cmd = ffmpeg_command(codec, file, None);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("running ffmpeg (apt-get install ffmpeg): {e}"))?;
        procs.push((started, child));
    }
    let limit = keeps_up_limit(f64::from(seconds));
    let mut held = true;
    let mut slowest = Duration::ZERO;
    for (started, mut child) in procs {
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("ffmpeg failed: {status}"));
        }
        let took = started.elapsed();
        slowest = slowest.max(took);
        held &= took <= limit;
    }
    let cores = (children_cpu_seconds() - cpu0) / wall.elapsed().as_secs_f64();
    Ok(Step {
        sessions: n,
        frames: u64::from(seconds * FPS) * n as u64,
        late: 0,
        held,
        cores,
        slowest,
        stage_ms: StageMs::default(),
    })
}

/// A layer as one side of the benchmark made it: its rate and how it
/// compares with the source.
#[derive(Debug, Clone)]
pub struct LayerQuality {
    pub kbps: f64,
    pub fidelity: LayerFidelity,
}

/// What each layer of one session looks like (no timing: every frame is
/// encoded): ours from the pipeline, and with `ffmpeg_file` (the clip as
/// [`write_clip`] wrote it) the `ffmpeg` command's, read back from the
/// files it wrote into `dir`. Both against the same source pictures, so
/// that "the same job" is seen to give the same picture at the same rate.
pub fn layer_quality(
    codec: Codec,
    clip: &[ClipFrame],
    ffmpeg_file: Option<&Path>,
    dir: &Path,
) -> Result<(Vec<LayerQuality>, Option<Vec<LayerQuality>>), String> {
    let ours = session_quality(codec, clip, &Backend::Cpu)?;
    let Some(file) = ffmpeg_file else {
        return Ok((ours, None));
    };
    let paths = [dir.join("layer-1"), dir.join("layer-2")];
    let status = ffmpeg_command(codec, file, Some([&paths[0], &paths[1]]))
        .status()
        .map_err(|e| format!("running ffmpeg (apt-get install ffmpeg): {e}"))?;
    if !status.success() {
        return Err(format!("ffmpeg failed: {status}"));
    }
    let mut packets = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let read = read_packets(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if read.len() != clip.len() {
            return Err(format!(
                "ffmpeg wrote {} frames of layer {} for the clip's {}",
                read.len(),
                i + 1,
                clip.len()
            ));
        }
        packets.push(read);
    }
    let theirs: Vec<LayerFrame<'_>> = packets
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| {
            layer
                .iter()
                .zip(clip)
                .map(move |(data, f)| (i as u8 + 1, f.rtp_time, &data[..]))
        })
        .collect();
    Ok((ours, Some(quality(codec, clip, &theirs)?)))
}

/// The layers one session on `backend` makes of the clip, every frame
/// encoded (no deadline).
pub fn encode_session(
    codec: Codec,
    clip: &[ClipFrame],
    backend: &Backend,
) -> Result<Vec<Encoded>, String> {
    let mut p =
        Pipeline::with_backend(codec, LAYERS.to_vec(), backend).map_err(|e| e.to_string())?;
    let far = Instant::now() + Duration::from_secs(3600);
    let mut out = Vec::new();
    for f in clip {
        p.push(f.rtp_time, f.key, &f.data, far, &mut out)
            .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// What each layer of one session on `backend` looks like, every frame
/// encoded.
pub fn session_quality(
    codec: Codec,
    clip: &[ClipFrame],
    backend: &Backend,
) -> Result<Vec<LayerQuality>, String> {
    let out = encode_session(codec, clip, backend)?;
    let frames: Vec<LayerFrame<'_>> = out
        .iter()
        .map(|e| (e.track, e.rtp_time, &e.data[..]))
        .collect();
    quality(codec, clip, &frames)
}

/// Rate and fidelity of each layer in `frames`.
fn quality(
    codec: Codec,
    clip: &[ClipFrame],
    frames: &[LayerFrame<'_>],
) -> Result<Vec<LayerQuality>, String> {
    let seconds = clip.len() as f64 / f64::from(FPS);
    Ok(picture::fidelity(codec, clip, frames)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|fidelity| {
            let bytes: usize = frames
                .iter()
                .filter(|f| f.0 == fidelity.track)
                .map(|f| f.2.len())
                .sum();
            LayerQuality {
                kbps: bytes as f64 * 8.0 / 1000.0 / seconds,
                fidelity,
            }
        })
        .collect())
}

/// The packets of a file FFmpeg demuxes (IVF, raw H.264), in order.
fn read_packets(path: &Path) -> Result<Vec<Vec<u8>>, PipelineError> {
    let mut input = ffmpeg::format::input(path).map_err(|source| PipelineError::Ffmpeg {
        what: "reading ffmpeg's output",
        source,
    })?;
    Ok(input
        .packets()
        .filter_map(|(_, p)| p.data().map(<[u8]>::to_vec))
        .collect())
}
