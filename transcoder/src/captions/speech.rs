//! Speech for tests and benchmarks: sentences spoken by `espeak-ng`
//! (deterministic, in English and Dutch), and the word error rate to judge
//! captions against what was said.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// `text` spoken by espeak-ng's `voice` (`en`, `nl`), as 16 kHz mono.
pub fn speak(voice: &str, text: &str) -> Result<Vec<f32>, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "balie-speech-{}-{}.wav",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let status = Command::new("espeak-ng")
        .args(["-v", voice, "-w"])
        .arg(&path)
        .arg(text)
        .status()
        .map_err(|e| format!("espeak-ng (apt-get install espeak-ng): {e}"))?;
    let pcm = if status.success() {
        super::audio::read_pcm(&path)
    } else {
        Err(format!("espeak-ng failed: {status}"))
    };
    let _ = std::fs::remove_file(&path);
    pcm
}

/// Lower case, letters and digits only, "mr" spelt out.
pub fn words(s: &str) -> Vec<String> {
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
pub fn wer(reference: &[String], hypothesis: &[String]) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_error_rate_counts_edits() {
        let w = |s: &str| words(s);
        assert_eq!(wer(&w("a b c d"), &w("a b c d")), 0.0);
        assert_eq!(wer(&w("a b c d"), &w("a x c d")), 0.25);
        assert_eq!(wer(&w("a b c d"), &w("a c d")), 0.25);
        assert_eq!(wer(&w("a b"), &w("a b c d")), 1.0);
        assert_eq!(words("Mr. Dashwood, then"), ["mister", "dashwood", "then"]);
    }
}
