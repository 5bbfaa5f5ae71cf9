//! The `cuda` backend (`cargo test -p balie-transcoder --features cuda`).
//! Without a GPU (CI) it checks that the backend is refused with a clear
//! error and no panic; on a GPU node it checks the scaling kernel against
//! its CPU reference and a whole session's layers by decoding them.
#![cfg(feature = "cuda")]

use balie_offload::{Codec, Size};
use balie_transcoder::clip;
use balie_transcoder::gpu::{Gpu, GpuError, Nvdec};
use balie_transcoder::picture::{max_difference, reference_scale};
use balie_transcoder::pipeline::{self, layer_size, Backend, Decoder, Pipeline};
use ffmpeg_next as ffmpeg;

#[test]
fn without_a_driver_the_gpu_is_refused_and_with_one_it_scales_like_the_reference() {
    pipeline::init().expect("ffmpeg");
    // Every way of running NVDEC is refused alike without a driver.
    for way in [Nvdec::Shared, Nvdec::Resident] {
        if let Err(e) = Gpu::open_nvdec(0, way) {
            assert!(matches!(e, GpuError::NoDriver(_)), "{way:?}: {e}");
        }
    }
    let gpu = match Gpu::open(0) {
        Err(GpuError::NoDriver(what)) => {
            let msg = GpuError::NoDriver(what).to_string();
            assert!(msg.contains("no NVIDIA driver"), "{msg}");
            assert!(msg.contains("--backend cpu"), "{msg}");
            eprintln!("no GPU here: {msg}");
            return;
        }
        Err(e) => panic!("a GPU node that cannot open its GPU: {e}"),
        Ok(gpu) => gpu,
    };
    eprintln!("GPU: {}", gpu.info);
    let hd = Size {
        width: 1280,
        height: 720,
    };
    let frames = clip::make(Codec::H264, hd, 10, 10, 2000).expect("clip");
    // A CPU-decoded picture (I420) through the kernel, against the reference.
    let mut dec = Decoder::new(Codec::H264).expect("decoder");
    let mut picture = None;
    for (i, f) in frames.iter().enumerate() {
        if let Ok(Some(p)) = dec.decode(&f.data, i as i64) {
            picture = Some(p.clone());
        }
    }
    let picture = picture.expect("a picture");
    let sizes = [layer_size(hd, 2), layer_size(hd, 4)];
    let mut outs: Vec<ffmpeg::frame::Video> = sizes
        .iter()
        .map(|s| {
            ffmpeg::frame::Video::new(
                ffmpeg::format::Pixel::YUV420P,
                s.width.into(),
                s.height.into(),
            )
        })
        .collect();
    let mut scaler = gpu.scaler().expect("scaler");
    let mut refs: Vec<&mut ffmpeg::frame::Video> = outs.iter_mut().collect();
    scaler.scale(&picture, &mut refs).expect("scaled");
    for (out, size) in outs.iter().zip(sizes) {
        let d = max_difference(out, &reference_scale(&picture, size));
        assert!(d <= 1, "{size:?}: off by {d}");
    }
    // A whole session on the GPU backend, NVDEC each way: layers that
    // decode at their sizes.
    session_layers_decode(gpu.clone(), &frames);
    for way in [Nvdec::Shared, Nvdec::Resident] {
        eprintln!("NVDEC on {}", way.describe());
        session_layers_decode(Gpu::open_nvdec(0, way).expect("opens"), &frames);
    }
}

fn session_layers_decode(gpu: std::sync::Arc<Gpu>, frames: &[clip::ClipFrame]) {
    let mut p = Pipeline::with_backend(
        Codec::H264,
        balie_transcoder::bench::LAYERS.to_vec(),
        &Backend::Cuda(gpu),
    )
    .expect("pipeline");
    let mut out = Vec::new();
    let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for f in frames {
        p.push(f.rtp_time, f.key, &f.data, far, &mut out)
            .expect("push");
    }
    let mut decoders = [
        Decoder::new(Codec::H264).expect("decoder"),
        Decoder::new(Codec::H264).expect("decoder"),
    ];
    let mut sizes_seen = Vec::new();
    for e in &out {
        let d = &mut decoders[usize::from(e.track) - 1];
        if let Ok(Some(pic)) = d.decode(&e.data, i64::from(e.rtp_time)) {
            sizes_seen.push((e.track, pic.width(), pic.height()));
        }
    }
    assert!(sizes_seen.len() >= 16, "{sizes_seen:?}");
    assert!(sizes_seen
        .iter()
        .all(|s| *s == (1, 640, 360) || *s == (2, 320, 180)));
}

/// Captions on the GPU: refused with the missing library named (and the
/// CPU path still there) without a driver; with one, the GPU's first
/// logits and tokens match the CPU's on the default model.
#[test]
fn captions_without_a_driver_are_refused_and_with_one_match_the_cpu() {
    use balie_transcoder::captions::{models, speech::speak, whisper::Whisper};
    let dir = models::default_dir();
    assert!(
        models::is_provisioned(&dir),
        "the test command provisions it"
    );
    let cpu = Whisper::load(&dir).expect("model loads");
    let mut gpu = Whisper::load(&dir).expect("model loads");
    match gpu.use_gpu(0) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("was not found"), "{msg}");
            assert!(msg.contains("CPU"), "{msg}");
            assert!(!gpu.on_gpu());
            eprintln!("no GPU here: {msg}");
            // The model still works on the CPU after the refusal.
            let pcm = speak("en", "Please bring your passport.").expect("speech");
            let t = gpu.transcribe(&pcm, "en").expect("transcribed");
            assert!(t.text.to_lowercase().contains("passport"), "{}", t.text);
            return;
        }
        Ok(name) => eprintln!("GPU: {name}"),
    }
    assert!(gpu.on_gpu());
    let pcm = speak(
        "en",
        "Please bring your passport to the counter on Monday morning.",
    )
    .expect("speech");
    let a = cpu.first_logits(&pcm, "en").expect("cpu");
    let b = gpu.engine_first_logits(&pcm, "en").expect("gpu");
    let (diff, top) = balie_transcoder::captions::engine::logit_difference(&a, &b);
    assert!(
        diff <= 1e-3 * top.max(1.0),
        "logits differ by {diff} (largest {top})"
    );
    let (tc, tg) = (
        cpu.transcribe(&pcm, "en").expect("cpu"),
        gpu.transcribe(&pcm, "en").expect("gpu"),
    );
    assert_eq!(tc.tokens, tg.tokens, "{:?} against {:?}", tc.text, tg.text);
}
