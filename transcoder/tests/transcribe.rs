//! The captions model end to end on audio files: `balie-transcoder
//! transcribe`'s pipeline (FFmpeg decode and resampling, Whisper's log-mel,
//! Whisper on candle with our cached decoder, greedy, language forced).
//! Needs the default model (the test command provisions it), espeak-ng and
//! Debian's pocketsphinx-testdata (installed by the test command).

use std::path::Path;

use balie_transcoder::captions::speech::{speak, wer, words};
use balie_transcoder::captions::{audio, models, whisper::Whisper};

fn model() -> Whisper {
    let dir = models::default_dir();
    assert!(
        models::is_provisioned(&dir),
        "run `cargo run -p balie-transcoder -- models fetch` (the test command does)"
    );
    Whisper::load(&dir).expect("model loads")
}

#[test]
fn english_and_dutch_speech_become_the_words_spoken() {
    let w = model();
    let en = speak(
        "en",
        "The quick brown fox jumps over the lazy dog. Please bring your passport to the counter.",
    )
    .expect("speech");
    let r = w.transcribe(&en, "en").expect("transcribed");
    eprintln!(
        "en: {:?} ({:?} encode, {:?} decode)",
        r.text, r.encode, r.decode
    );
    let got = words(&r.text);
    for word in [
        "quick", "brown", "fox", "lazy", "dog", "passport", "counter",
    ] {
        assert!(got.iter().any(|w| w == word), "{word} in {got:?}");
    }
    // espeak's Dutch is hard for Whisper base (the original model mishears
    // it too); with the language forced these words come out every time
    // (the pipeline is deterministic).
    let nl = speak(
        "nl",
        "Goedemorgen, ik wil graag een nieuw paspoort aanvragen bij de gemeente.",
    )
    .expect("speech");
    let r = w.transcribe(&nl, "nl").expect("transcribed");
    eprintln!("nl: {:?}", r.text);
    let got = words(&r.text);
    for word in ["ik", "nieuw", "aanvragen"] {
        assert!(got.iter().any(|w| w == word), "{word} in {got:?}");
    }
}

#[test]
fn a_librivox_reading_is_transcribed_with_under_15_percent_word_errors() {
    let w = model();
    let data = Path::new("/usr/share/pocketsphinx/test/data/librivox");
    let listing = std::fs::read_to_string(data.join("transcription"))
        .expect("pocketsphinx-testdata (apt-get install pocketsphinx-testdata)");
    let (mut reference, mut hypothesis) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let Some((text, id)) = line.rsplit_once(" (") else {
            continue;
        };
        let id = id.trim_end_matches(')');
        let text = text.replace("<s>", "").replace("</s>", "");
        let pcm = audio::read_pcm(&data.join(format!("{id}.wav"))).expect("audio");
        let r = w.transcribe(&pcm, "en").expect("transcribed");
        eprintln!("{id}: {:?}", r.text);
        reference.extend(words(&text));
        hypothesis.extend(words(&r.text));
    }
    assert!(reference.len() > 50, "{reference:?}");
    let e = wer(&reference, &hypothesis);
    eprintln!("WER {:.1}% over {} words", e * 100.0, reference.len());
    assert!(e < 0.15, "WER {e}");
}

#[test]
fn streamed_speech_gives_partials_then_finals_and_silence_gives_nothing() {
    use balie_transcoder::captions::mel::SAMPLE_RATE;
    use balie_transcoder::captions::stream::Streamer;
    let w = model();
    let data = Path::new("/usr/share/pocketsphinx/test/data/librivox");
    // Two readings with silence around and between them, as a call would
    // carry them, fed in 20 ms packets.
    let mut pcm = vec![0f32; 2 * SAMPLE_RATE];
    for id in ["0870", "0920"] {
        let clip = data.join(format!("sense_and_sensibility_01_austen_64kb-{id}.wav"));
        pcm.extend(audio::read_pcm(&clip).expect("audio"));
        pcm.extend(vec![0f32; 2 * SAMPLE_RATE]);
    }
    let mut s = Streamer::new("en");
    let mut captions = Vec::new();
    // Finals that came out of a packet without a Whisper run: the
    // hypothesis made when speech paused heard the whole utterance.
    let mut finals_without_a_run = 0;
    for packet in pcm.chunks(SAMPLE_RATE / 50) {
        let out = s.push(&w, packet).expect("stream");
        if s.take_work().is_empty() && out.iter().any(|c| c.is_final) {
            finals_without_a_run += 1;
        }
        captions.extend(out);
    }
    assert!(
        finals_without_a_run >= 1,
        "an utterance's end is final without running Whisper again"
    );
    captions.extend(s.flush(&w).expect("flush"));
    for c in &captions {
        eprintln!(
            "{:5.2}-{:5.2} {} {}",
            c.start,
            c.end,
            if c.is_final { "final  " } else { "partial" },
            c.text
        );
    }
    let finals: Vec<String> = captions
        .iter()
        .filter(|c| c.is_final)
        .flat_map(|c| words(&c.text))
        .collect();
    let reference = words(
        "and mister john dashwood had then leisure to consider how much there might be prudently \
         in his power to do for them had he married a more amiable woman he might have been made \
         still more respectable than he was",
    );
    let e = wer(&reference, &finals);
    eprintln!("streamed WER {:.1}%", e * 100.0);
    assert!(e < 0.15, "WER {e}: {finals:?}");
    assert!(captions.iter().any(|c| !c.is_final), "partials come first");
    // Two utterances, each starting after its silence: none before 2 s.
    assert!(captions.iter().all(|c| c.start >= 1.6), "{captions:?}");

    // Silence and faint noise: no captions, and Whisper never runs.
    let mut s = Streamer::new("en");
    let quiet: Vec<f32> = (0..5 * SAMPLE_RATE)
        .map(|i| ((i * 7919) % 13) as f32 * 1e-4)
        .collect();
    let t = std::time::Instant::now();
    let none = s.push(&w, &quiet).expect("stream");
    assert!(none.is_empty(), "{none:?}");
    assert!(s.flush(&w).expect("flush").is_empty());
    assert!(
        t.elapsed() < std::time::Duration::from_millis(500),
        "no decoding: {:?}",
        t.elapsed()
    );
}

/// The GPU check's stand-in model (base's shapes, seeded random weights,
/// the real tokenizer) loads and runs through the same pipeline here; the
/// first logits `first_logits` gives (what the GPU check compares) are
/// the ones the greedy decoder picks its first token from.
#[test]
fn the_random_stand_in_model_loads_and_decodes_like_the_real_one() {
    use balie_transcoder::captions::randmodel;
    let real = models::default_dir();
    assert!(
        models::is_provisioned(&real),
        "the test command provisions it"
    );
    let dir = std::env::temp_dir().join(format!("balie-random-test-{}", std::process::id()));
    randmodel::write(&dir, &real.join("tokenizer.json"), 7).expect("written");
    let mut w = Whisper::load(&dir).expect("loads");
    std::fs::remove_dir_all(&dir).expect("removed");
    assert_eq!(w.config.d_model, 512);
    assert_eq!(w.config.encoder_layers, 6);
    // Two seconds of a tone.
    let pcm: Vec<f32> = (0..32_000)
        .map(|i| 0.3 * (i as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin())
        .collect();
    let logits = w.first_logits(&pcm, "en").expect("logits");
    assert_eq!(logits.len(), w.config.vocab_size);
    assert!(logits.iter().all(|x| x.is_finite()));
    let spread = logits.iter().copied().fold(f32::MIN, f32::max)
        - logits.iter().copied().fold(f32::MAX, f32::min);
    assert!(
        spread > 1.0,
        "random weights give distinct logits: {spread}"
    );
    let t = w.transcribe(&pcm, "en").expect("decoded");
    // Text tokens only: the first is the largest logit up to end-of-text.
    let eot = 50_257;
    let best = (0..=eot)
        .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
        .expect("a token") as u32;
    if best == eot as u32 {
        assert!(t.tokens.is_empty(), "{:?}", t.tokens);
    } else {
        assert_eq!(t.tokens.first(), Some(&best), "{:?}", t.tokens);
    }
    // A random model rarely stops: it decodes up to the cap (2 s: 20).
    assert!(t.tokens.len() <= 20, "{}", t.tokens.len());
    // The GPU check's load floor: at least 5 tokens a second of audio,
    // whatever the random weights pick, and never past the cap.
    w.set_decode_floor(5.0);
    let floored = w.transcribe(&pcm, "en").expect("decoded");
    assert!(
        (10..=20).contains(&floored.tokens.len()),
        "{} tokens",
        floored.tokens.len()
    );
    assert!(floored.tokens.iter().all(|t| *t < eot as u32));
}

/// The GPU engine (`captions/engine.rs`: every buffer, offset, stride,
/// mask and cache position the GPU uses) run on its CPU mirror (each
/// kernel's arithmetic in Rust, sgemm by cuBLAS's definition): the same
/// first logits as candle and the same tokens, on the real model.
#[test]
fn the_gpu_engine_on_its_cpu_mirror_transcribes_like_candle() {
    let cpu = model();
    let mut mirror = model();
    mirror.use_mirror().expect("the engine loads on the mirror");
    assert!(!mirror.on_gpu());
    let pcm = speak("en", "Please bring your passport to the counter.").expect("speech");
    let a = cpu.first_logits(&pcm, "en").expect("candle");
    let b = mirror.engine_first_logits(&pcm, "en").expect("engine");
    assert_eq!(a.len(), b.len());
    let (diff, top) = balie_transcoder::captions::engine::logit_difference(&a, &b);
    eprintln!("first logits: largest difference {diff:e} (largest logit {top})");
    assert!(diff <= 1e-3 * top.max(1.0), "logits differ by {diff}");
    let t = std::time::Instant::now();
    let (tc, tm) = (
        cpu.transcribe(&pcm, "en").expect("candle"),
        mirror.transcribe(&pcm, "en").expect("engine"),
    );
    eprintln!("{:?} / {:?} ({:?})", tc.text, tm.text, t.elapsed());
    assert!(tm.text.to_lowercase().contains("passport"), "{}", tm.text);
    assert_eq!(tc.tokens, tm.tokens);
    // A forced prefix (how finals are decoded) through the engine too.
    let half = &tc.tokens[..tc.tokens.len() / 2];
    let (pc, pm) = (
        cpu.transcribe_after(&pcm, "en", half).expect("candle"),
        mirror.transcribe_after(&pcm, "en", half).expect("engine"),
    );
    assert_eq!(pc.tokens, pm.tokens);
}

/// The engine at its largest window (30 s: every encoder position, the
/// biggest attention), on its CPU mirror: candle's tokens.
#[test]
fn the_gpu_engine_on_its_cpu_mirror_takes_a_whole_30_s_window() {
    use balie_transcoder::captions::mel::SAMPLE_RATE;
    let cpu = model();
    let mut mirror = model();
    mirror.use_mirror().expect("the engine loads on the mirror");
    let data = Path::new("/usr/share/pocketsphinx/test/data/librivox");
    let mut pcm = Vec::new();
    for id in ["0870", "0920"].iter().cycle().take(6) {
        let path = data.join(format!("sense_and_sensibility_01_austen_64kb-{id}.wav"));
        pcm.extend(audio::read_pcm(&path).expect("audio"));
    }
    // 29 s and the second of silence the window adds: 3,000 mel frames,
    // 1,500 encoder positions, the model's most.
    pcm.truncate(29 * SAMPLE_RATE);
    assert_eq!(pcm.len(), 29 * SAMPLE_RATE, "the readings are long enough");
    let t = std::time::Instant::now();
    let (tc, tm) = (
        cpu.transcribe(&pcm, "en").expect("candle"),
        mirror.transcribe(&pcm, "en").expect("engine"),
    );
    eprintln!(
        "{} tokens ({:?}): {:?}",
        tm.tokens.len(),
        t.elapsed(),
        tm.text
    );
    assert!(tm.tokens.len() > 40, "{}", tm.text);
    assert_eq!(tc.tokens, tm.tokens);
}
