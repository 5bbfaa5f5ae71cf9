//! The captions model end to end on audio files: `balie-transcoder
//! transcribe`'s pipeline (FFmpeg decode and resampling, Whisper's log-mel,
//! Whisper on candle with our cached decoder, greedy, language forced).
//! Needs the default model (the test command provisions it), espeak-ng and
//! Debian's pocketsphinx-testdata (installed by the test command).

use std::path::{Path, PathBuf};
use std::process::Command;

use balie_transcoder::captions::{audio, models, whisper::Whisper};

fn model() -> Whisper {
    let dir = models::default_dir();
    assert!(
        models::is_provisioned(&dir),
        "run `cargo run -p balie-transcoder -- models fetch` (the test command does)"
    );
    Whisper::load(&dir).expect("model loads")
}

fn speak(voice: &str, text: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{voice}.wav"));
    let ok = Command::new("espeak-ng")
        .args(["-v", voice, "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .expect("espeak-ng (apt-get install espeak-ng)");
    assert!(ok.success());
    path
}

/// Lower case, letters and digits only, "mr" spelt out.
fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w == "mr" {
                "mister".into()
            } else {
                w.to_string()
            }
        })
        .collect()
}

/// Word error rate: word-level edit distance over the reference's length.
fn wer(reference: &[String], hypothesis: &[String]) -> f64 {
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if r == h {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[hypothesis.len()] as f64 / reference.len().max(1) as f64
}

#[test]
fn english_and_dutch_speech_become_the_words_spoken() {
    let w = model();
    let dir = tempfile::tempdir().expect("tempdir");
    let en = speak(
        "en",
        "The quick brown fox jumps over the lazy dog. Please bring your passport to the counter.",
        dir.path(),
    );
    let r = w
        .transcribe(&audio::read_pcm(&en).expect("audio"), "en")
        .expect("transcribed");
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
        dir.path(),
    );
    let r = w
        .transcribe(&audio::read_pcm(&nl).expect("audio"), "nl")
        .expect("transcribed");
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
fn the_word_error_rate_counts_edits() {
    let w = |s: &str| words(s);
    assert_eq!(wer(&w("a b c d"), &w("a b c d")), 0.0);
    assert_eq!(wer(&w("a b c d"), &w("a x c d")), 0.25);
    assert_eq!(wer(&w("a b c d"), &w("a c d")), 0.25);
    assert_eq!(wer(&w("a b"), &w("a b c d")), 1.0);
    assert_eq!(words("Mr. Dashwood, then"), ["mister", "dashwood", "then"]);
}
