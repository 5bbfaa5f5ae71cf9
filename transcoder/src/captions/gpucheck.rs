//! `balie-transcoder gpu-check-captions` (feature `cuda`): Whisper on the
//! GPU beside the CPU in the same run. Run by `transcoder/gpu-check.sh`.
//!
//! 1. **Arithmetic**: the same model on both (the real one with `--model`,
//!    else base's shapes with seeded random weights, [`super::randmodel`]),
//!    windows of 5, 15 and 30 s: the largest difference between the GPU's
//!    and the CPU's first logits, and whether the greedy tokens agree.
//! 2. **Speed**: a window's encoder and per-token decoder time on each.
//! 3. **Streams**: `captions-bench`'s steps on the GPU (live caption
//!    sessions fed speech as Opus in real time; end of speech to final text
//!    within 1.5 s at the 95th percentile, nothing dropped).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::audio::read_pcm;
use super::bench;
use super::mel::SAMPLE_RATE;
use super::whisper::Whisper;

/// Tokens per second of audio the streams decode at least (see
/// [`Whisper::set_decode_floor`]).
const DECODE_FLOOR: f64 = 5.0;

/// Run the check: `tokenizer` (Whisper's tokenizer.json) for the random
/// model unless `model` names a real one; `audio` the speech streamed.
pub fn run(
    tokenizer: Option<PathBuf>,
    model: Option<PathBuf>,
    audio: Option<PathBuf>,
    max: usize,
) -> Result<(), String> {
    let mut made = None;
    let dir = match (model, tokenizer) {
        (Some(m), _) => m,
        (None, Some(tok)) => {
            let dir =
                std::env::temp_dir().join(format!("balie-random-whisper-{}", std::process::id()));
            made = Some(Remove(dir.clone()));
            let t = Instant::now();
            super::randmodel::write(&dir, &tok, 7)?;
            println!(
                "model: Whisper base's shapes, seeded random weights ({:.1} s to make)",
                t.elapsed().as_secs_f64()
            );
            dir
        }
        (None, None) => return Err("give --model DIR or --tokenizer FILE".into()),
    };
    let cpu = Whisper::load(&dir).map_err(|e| e.to_string())?;
    let mut gpu = Whisper::load(&dir).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let name = gpu.use_gpu(0).map_err(|e| e.to_string())?;
    // Loaded on both (the GPU reads the weights file again): the random
    // model's files can go (on an early return too).
    drop(made);
    println!(
        "GPU: {name}; weights up and kernels compiled in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let speech = match &audio {
        Some(path) => read_pcm(path)?,
        None => bench::default_speech()?,
    };
    if speech.is_empty() {
        return Err("no audio to stream".into());
    }
    let lang = "en";
    println!("| window | max abs logit difference (largest logit) | tokens agreeing | CPU encode / per token | GPU encode / per token |");
    println!("| --- | --- | --- | --- | --- |");
    let mut worst = 0f32;
    for secs in [5usize, 15, 30] {
        let pcm = looped(&speech, secs);
        // A window that fails is a row saying why; the streams still run.
        match window(&cpu, &gpu, &pcm, secs, lang) {
            Ok((row, relative)) => {
                println!("{row}");
                worst = worst.max(relative);
            }
            Err(e) => println!("| {secs} s | failed: {e} | - | - | - |"),
        }
    }
    println!("largest logit difference relative to the largest logit: {worst:.2e}");
    drop(cpu);
    // Random weights end the text after a token or two: from here on the
    // GPU decodes as many tokens as speech gives (Dutch, the default
    // language, takes more tokens per word than English).
    gpu.set_decode_floor(DECODE_FLOOR);
    println!("\nfrom here on at least {DECODE_FLOOR} tokens per second of audio are decoded:");
    for secs in [5usize, 15, 30] {
        let pcm = looped(&speech, secs);
        match gpu.transcribe(&pcm, lang) {
            Ok(r) => println!(
                "GPU, {secs} s window: encode {:.1} ms, {} tokens in {:.1} ms ({:.2} ms per token)",
                r.encode.as_secs_f64() * 1000.0,
                r.tokens.len(),
                r.decode.as_secs_f64() * 1000.0,
                r.decode.as_secs_f64() * 1000.0 / r.tokens.len().max(1) as f64
            ),
            Err(e) => println!("GPU, {secs} s window: failed: {e}"),
        }
    }
    let gpu = Arc::new(gpu);
    println!(
        "\nlive caption streams on the GPU ({:.1} s of speech per stream):",
        speech.len() as f64 / SAMPLE_RATE as f64
    );
    // From 16 streams, doubling (each step takes about twice the speech's
    // length: the streams start 0.7 s apart).
    let counts = [16, 32, 64, 128, 256]
        .into_iter()
        .filter(|n| *n <= max.max(16));
    let best = bench::steps(&gpu, &speech, lang, counts)?;
    println!("caption streams held in real time on the GPU: {best}");
    Ok(())
}

/// `secs` seconds of `speech`, looped.
fn looped(speech: &[f32], secs: usize) -> Vec<f32> {
    speech
        .iter()
        .copied()
        .cycle()
        .take(secs * SAMPLE_RATE)
        .collect()
}

/// One window on both: its table row and the largest logit difference
/// relative to the largest logit.
fn window(
    cpu: &Whisper,
    gpu: &Whisper,
    pcm: &[f32],
    secs: usize,
    lang: &str,
) -> Result<(String, f32), String> {
    let a = cpu.first_logits(pcm, lang).map_err(|e| e.to_string())?;
    let b = gpu
        .engine_first_logits(pcm, lang)
        .map_err(|e| e.to_string())?;
    let (diff, top) = super::engine::logit_difference(&a, &b);
    let per = |r: &super::whisper::Transcript| {
        r.decode.as_secs_f64() * 1000.0 / (r.tokens.len().max(1)) as f64
    };
    let rg = gpu.transcribe(pcm, lang).map_err(|e| e.to_string())?;
    // The CPU decodes the random model's 30 s window (188 tokens) in
    // about 16 s on one core: compared by its logits only, to keep the
    // check within its time.
    let cpu_side = if secs <= 15 {
        let rc = cpu.transcribe(pcm, lang).map_err(|e| e.to_string())?;
        let agree = rc
            .tokens
            .iter()
            .zip(&rg.tokens)
            .take_while(|(x, y)| x == y)
            .count();
        (
            format!("{agree} of {} (GPU {})", rc.tokens.len(), rg.tokens.len()),
            format!(
                "{:.0} ms / {:.1} ms",
                rc.encode.as_secs_f64() * 1000.0,
                per(&rc)
            ),
        )
    } else {
        (format!("- (GPU {})", rg.tokens.len()), "-".to_string())
    };
    let row = format!(
        "| {secs} s | {diff:.2e} ({top:.2}) | {} | {} | {:.1} ms / {:.2} ms |",
        cpu_side.0,
        cpu_side.1,
        rg.encode.as_secs_f64() * 1000.0,
        per(&rg),
    );
    Ok((row, diff / top.max(1e-6)))
}

/// Removes a folder when dropped.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
