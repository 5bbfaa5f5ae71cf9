//! Whisper's log-mel spectrogram, computed exactly as Whisper does
//! (`whisper/audio.py`): 16 kHz mono, a 400-point STFT with a periodic
//! Hann window and a 160-sample hop, centred (the signal reflect-padded by
//! 200 on both sides), the last frame dropped, power spectrum through
//! librosa's Slaney-normalised mel filter bank (80 or 128 bins, 0-8 kHz),
//! `log10` clamped at 1e-10, floored at 8 below the maximum, then
//! `(x + 4) / 4`. candle's own `pcm_to_mel` skips the centred padding and
//! changes borderline output, so we do not use it.

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// Samples per second Whisper takes.
pub const SAMPLE_RATE: usize = 16_000;
/// STFT size and hop.
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;

/// Hz to mel on the Slaney scale (librosa's default, `htk=False`).
fn hz_to_mel(f: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel) = (200.0 / 3.0, 1000.0, 15.0);
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

/// librosa.filters.mel(sr=16000, n_fft=400, n_mels) with Slaney norm:
/// `n_mels` rows of `N_FFT / 2 + 1` weights.
pub fn mel_filters(n_mels: usize) -> Vec<Vec<f32>> {
    let bins = N_FFT / 2 + 1;
    let fft_freqs: Vec<f64> = (0..bins)
        .map(|i| i as f64 * SAMPLE_RATE as f64 / N_FFT as f64)
        .collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE as f64 / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    (0..n_mels)
        .map(|m| {
            let enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
            fft_freqs
                .iter()
                .map(|f| {
                    let lower = (f - mel_f[m]) / (mel_f[m + 1] - mel_f[m]);
                    let upper = (mel_f[m + 2] - f) / (mel_f[m + 2] - mel_f[m + 1]);
                    (lower.min(upper).max(0.0) * enorm) as f32
                })
                .collect()
        })
        .collect()
}

/// Computes log-mel spectrograms; holds the FFT plan and the filters.
pub struct Mel {
    n_mels: usize,
    filters: Vec<Vec<f32>>,
    window: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
}

impl Mel {
    pub fn new(n_mels: usize) -> Mel {
        let window = (0..N_FFT)
            .map(|i| {
                let x = std::f64::consts::TAU * i as f64 / N_FFT as f64;
                (0.5 - 0.5 * x.cos()) as f32
            })
            .collect();
        Mel {
            n_mels,
            filters: mel_filters(n_mels),
            window,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// The log-mel spectrogram of `pcm` (16 kHz mono), `n_mels` rows of
    /// `pcm.len() / HOP` frames, row-major.
    pub fn log_mel(&self, pcm: &[f32]) -> (Vec<f32>, usize) {
        let pad = N_FFT / 2;
        let n = pcm.len();
        // Reflect padding (numpy "reflect": the edge sample not repeated).
        let at = |i: isize| -> f32 {
            if n == 0 {
                return 0.0;
            }
            let len = n as isize;
            let mut j = i;
            // Reflect until inside (a signal shorter than the pad bounces).
            for _ in 0..8 {
                if j < 0 {
                    j = -j;
                } else if j >= len {
                    j = 2 * (len - 1) - j;
                } else {
                    break;
                }
            }
            pcm[j.clamp(0, len - 1) as usize]
        };
        let frames = n / HOP; // torch.stft gives n / HOP + 1; the last is dropped
        let bins = N_FFT / 2 + 1;
        let mut power = vec![0f32; frames * bins];
        let mut buf = vec![Complex32::new(0.0, 0.0); N_FFT];
        for t in 0..frames {
            let start = (t * HOP) as isize - pad as isize;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = Complex32::new(at(start + k as isize) * self.window[k], 0.0);
            }
            self.fft.process(&mut buf);
            for (k, c) in buf.iter().take(bins).enumerate() {
                power[t * bins + k] = c.norm_sqr();
            }
        }
        let mut out = vec![0f32; self.n_mels * frames];
        let mut max = f32::NEG_INFINITY;
        for (m, filter) in self.filters.iter().enumerate() {
            for t in 0..frames {
                let p = &power[t * bins..(t + 1) * bins];
                let v: f32 = filter.iter().zip(p).map(|(w, x)| w * x).sum();
                let v = v.max(1e-10).log10();
                max = max.max(v);
                out[m * frames + t] = v;
            }
        }
        for v in &mut out {
            *v = (v.max(max - 8.0) + 4.0) / 4.0;
        }
        (out, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_bank_matches_librosa() {
        // Reference values: librosa.filters.mel(sr=16000, n_fft=400,
        // n_mels=80) (what Whisper ships in mel_filters.npz): the first
        // filter peaks at bin 1, the filters tile 0-8 kHz.
        let f = mel_filters(80);
        assert_eq!(f.len(), 80);
        assert_eq!(f[0].len(), 201);
        assert!((f[0][1] - 0.024_862).abs() < 1e-4, "{}", f[0][1]);
        assert_eq!(f[0][0], 0.0);
        assert_eq!(f[0][3], 0.0);
        // The last filter reaches the top bins, nothing past 8 kHz.
        assert!(f[79]
            .iter()
            .rposition(|w| *w > 0.0)
            .is_some_and(|i| i >= 195));
    }

    #[test]
    fn a_tone_lights_the_mel_bins_around_its_frequency() {
        let mel = Mel::new(80);
        let pcm: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| (std::f32::consts::TAU * 1000.0 * i as f32 / SAMPLE_RATE as f32).sin() * 0.5)
            .collect();
        let (m, frames) = mel.log_mel(&pcm);
        assert_eq!(frames, 100);
        // The loudest bin of a middle frame: 1 kHz is mel bin 26-27 of 80.
        let t = 50;
        let loudest = (0..80)
            .max_by(|a, b| m[a * frames + t].total_cmp(&m[b * frames + t]))
            .expect("bins");
        assert!((25..=28).contains(&loudest), "bin {loudest}");
        // Normalised: the maximum is (max + 4) / 4 and nothing is below 8 under it.
        let max = m.iter().copied().fold(f32::MIN, f32::max);
        let min = m.iter().copied().fold(f32::MAX, f32::min);
        assert!(max - min <= 2.0 + 1e-4, "{max} {min}");
    }
}
