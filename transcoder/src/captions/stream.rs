//! Streaming captions for one speaker: voice activity detection, partial
//! hypotheses about once a second, final text once it is stable.
//!
//! - **Voice activity**: 30 ms frames; a frame is speech when its level is
//!   12 dB over the noise floor (tracked from quiet frames) and above
//!   -55 dBFS. An utterance starts at speech (with 300 ms of audio before
//!   it) and ends after [`END_SILENCE`] without speech. Silence is never
//!   sent to Whisper: it costs nothing and cannot be "heard" as words.
//! - **Partials**: while an utterance goes on, every [`STEP`] of new audio
//!   the utterance so far is transcribed and sent as a partial; and as soon
//!   as speech has paused for [`PAUSE`] (with at least [`EAGER`] of new
//!   audio since the last partial), so that
//!   when the silence turns out to end the utterance, the hypothesis that
//!   heard all of it is already there and becomes final without running
//!   Whisper again. At most one partial per [`Streamer::push`]: a caller
//!   that fell behind hands over everything queued at once and gets one
//!   partial for it, not one per second of backlog.
//! - **Finals** (local agreement, as Whisper-Streaming's LocalAgreement-2):
//!   the words two consecutive hypotheses agree on, beyond those already
//!   final, become final at once; the rest of the utterance's words become
//!   final when it ends. An utterance longer than [`MAX_UTTERANCE`] is
//!   ended there.
//! - **Cost**: every hypothesis after the first is forced to begin with
//!   the utterance's final words ([`Whisper::transcribe_after`]): they are
//!   read in one decoder pass instead of decoded again token by token, so a
//!   partial costs the encoder and the new words only.

use super::mel::SAMPLE_RATE;
use super::whisper::{Whisper, WhisperError};

/// New audio between two partial hypotheses.
pub const STEP: f64 = 1.0;
/// Silence that ends an utterance.
pub const END_SILENCE: f64 = 0.5;
/// New audio that earns a partial when speech pauses.
pub const EAGER: f64 = 0.3;
/// A pause this long (longer than the gaps between words) earns a partial.
pub const PAUSE: f64 = 0.15;
/// The longest utterance transcribed as one.
pub const MAX_UTTERANCE: f64 = 25.0;
const FRAME: usize = SAMPLE_RATE * 30 / 1000;
const PRE_ROLL: usize = SAMPLE_RATE * 3 / 10;

/// One caption segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    /// Seconds from the start of the stream.
    pub start: f64,
    pub end: f64,
    /// Final: it will not change. A partial is replaced by the next
    /// partial or final of the same utterance.
    pub is_final: bool,
}

/// Energy-based voice activity with an adaptive noise floor.
#[derive(Debug, Clone)]
pub struct Vad {
    floor_db: f32,
}

impl Default for Vad {
    fn default() -> Self {
        Vad { floor_db: -70.0 }
    }
}

impl Vad {
    /// Whether a frame is speech; quiet frames move the noise floor.
    pub fn speech(&mut self, frame: &[f32]) -> bool {
        let power = frame.iter().map(|s| s * s).sum::<f32>() / frame.len().max(1) as f32;
        let db = 10.0 * power.max(1e-12).log10();
        let speech = db > self.floor_db + 12.0 && db > -55.0;
        if !speech {
            // Follow the floor down quickly, up slowly.
            let k = if db < self.floor_db { 0.3 } else { 0.02 };
            self.floor_db += k * (db - self.floor_db);
        }
        speech
    }
}

/// One speaker's stream.
pub struct Streamer {
    language: String,
    vad: Vad,
    /// Samples seen so far (the stream's clock).
    seen: usize,
    /// The last samples before an utterance (pre-roll).
    recent: Vec<f32>,
    pending: Vec<f32>,
    /// The utterance being transcribed, if one is under way.
    utterance: Option<Utterance>,
    /// Whisper runs since the last [`Streamer::take_work`]: seconds of
    /// audio, and the time each took.
    work: Vec<(f64, std::time::Duration)>,
}

struct Utterance {
    start: usize,
    audio: Vec<f32>,
    silent: usize,
    since_partial: usize,
    /// The last hypothesis's tokens, and how much of the audio it heard.
    previous: Vec<u32>,
    heard: usize,
    /// The tokens already final (a prefix of every later hypothesis).
    committed: Vec<u32>,
}

impl Streamer {
    pub fn new(language: &str) -> Streamer {
        Streamer {
            language: language.into(),
            vad: Vad::default(),
            seen: 0,
            recent: Vec::new(),
            pending: Vec::new(),
            utterance: None,
            work: Vec::new(),
        }
    }

    /// The Whisper runs since the last call: (seconds of audio, time
    /// taken); their ratio is the real-time factor.
    pub fn take_work(&mut self) -> Vec<(f64, std::time::Duration)> {
        std::mem::take(&mut self.work)
    }

    /// Samples seen so far: the stream's clock.
    pub fn position(&self) -> usize {
        self.seen
    }

    fn seconds(samples: usize) -> f64 {
        samples as f64 / SAMPLE_RATE as f64
    }

    /// Feed 16 kHz mono audio; returns the captions it completes.
    pub fn push(&mut self, w: &Whisper, pcm: &[f32]) -> Result<Vec<Caption>, WhisperError> {
        let mut out = Vec::new();
        self.pending.extend_from_slice(pcm);
        let whole = self.pending.len() / FRAME * FRAME;
        let frames: Vec<f32> = self.pending.drain(..whole).collect();
        let mut due = false;
        for frame in frames.chunks(FRAME) {
            let speech = self.vad.speech(frame);
            let at = self.seen;
            self.seen += frame.len();
            match self.utterance.as_mut() {
                None if speech => {
                    let mut audio = std::mem::take(&mut self.recent);
                    audio.extend_from_slice(frame);
                    self.utterance = Some(Utterance {
                        start: at + frame.len() - audio.len(),
                        audio,
                        silent: 0,
                        since_partial: 0,
                        previous: Vec::new(),
                        heard: 0,
                        committed: Vec::new(),
                    });
                }
                None => {
                    self.recent.extend_from_slice(frame);
                    let extra = self.recent.len().saturating_sub(PRE_ROLL);
                    self.recent.drain(..extra);
                }
                Some(u) => {
                    u.audio.extend_from_slice(frame);
                    u.since_partial += frame.len();
                    let before = Self::seconds(u.silent);
                    u.silent = if speech { 0 } else { u.silent + frame.len() };
                    let paused = before < PAUSE && Self::seconds(u.silent) >= PAUSE;
                    let ended = Self::seconds(u.silent) >= END_SILENCE
                        || Self::seconds(u.audio.len()) >= MAX_UTTERANCE;
                    if ended {
                        due = false;
                        out.extend(self.finish(w)?);
                    } else if Self::seconds(u.since_partial) >= STEP
                        || (paused && Self::seconds(u.since_partial) >= EAGER)
                    {
                        due = true;
                    }
                }
            }
        }
        if due {
            out.extend(self.partial(w)?);
        }
        Ok(out)
    }

    /// The stream ended: finish the utterance under way.
    pub fn flush(&mut self, w: &Whisper) -> Result<Vec<Caption>, WhisperError> {
        self.finish(w)
    }

    fn partial(&mut self, w: &Whisper) -> Result<Vec<Caption>, WhisperError> {
        let Some(u) = self.utterance.as_mut() else {
            return Ok(Vec::new());
        };
        u.since_partial = 0;
        let hyp = timed(w, &u.audio, &self.language, &u.committed, &mut self.work)?;
        let mut out = Vec::new();
        // Local agreement: what this and the last hypothesis agree on is
        // final, up to the last whole word.
        let done = u.committed.len();
        let agreed = hyp
            .iter()
            .zip(&u.previous)
            .take_while(|(a, b)| a == b)
            .count();
        let mut cut = agreed;
        while cut > done && cut < hyp.len() && !w.starts_word(hyp[cut]) {
            cut -= 1;
        }
        let (start, end) = (
            Self::seconds(u.start),
            Self::seconds(u.start + u.audio.len()),
        );
        if cut > done {
            out.push(Caption {
                text: w.text(&hyp[done..cut])?,
                start,
                end,
                is_final: true,
            });
            u.committed = hyp[..cut].to_vec();
        }
        let rest = w.text(&hyp[u.committed.len()..])?;
        if !rest.is_empty() {
            out.push(Caption {
                text: rest,
                start,
                end,
                is_final: false,
            });
        }
        u.previous = hyp;
        u.heard = u.audio.len();
        Ok(out)
    }

    fn finish(&mut self, w: &Whisper) -> Result<Vec<Caption>, WhisperError> {
        let Some(u) = self.utterance.take() else {
            return Ok(Vec::new());
        };
        // The last hypothesis heard all the speech (only silence came
        // since): it is the final text, no need to run Whisper again.
        let speech_end = u.audio.len() - u.silent;
        let hyp = if u.heard > 0 && u.heard >= speech_end {
            u.previous
        } else {
            timed(w, &u.audio, &self.language, &u.committed, &mut self.work)?
        };
        // Words already final stay as they were; the rest follows them.
        let rest = w.text(&hyp[u.committed.len().min(hyp.len())..])?;
        if rest.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![Caption {
            text: rest,
            start: Self::seconds(u.start),
            end: Self::seconds(u.start + u.audio.len() - u.silent),
            is_final: true,
        }])
    }
}

/// Transcribe `audio` after the final tokens `prefix`, noting the run in
/// `work`; the hypothesis's tokens (beginning with `prefix`).
fn timed(
    w: &Whisper,
    audio: &[f32],
    language: &str,
    prefix: &[u32],
    work: &mut Vec<(f64, std::time::Duration)>,
) -> Result<Vec<u32>, WhisperError> {
    let t0 = std::time::Instant::now();
    let tokens = w.transcribe_after(audio, language, prefix)?.tokens;
    work.push((Streamer::seconds(audio.len()), t0.elapsed()));
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vad_tells_speech_from_silence_and_steady_noise() {
        let mut v = Vad::default();
        let silence = vec![0f32; FRAME];
        let noise: Vec<f32> = (0..FRAME)
            .map(|i| ((i * 7919) % 13) as f32 * 1e-4)
            .collect();
        let tone: Vec<f32> = (0..FRAME).map(|i| (i as f32 * 0.3).sin() * 0.2).collect();
        for _ in 0..50 {
            assert!(!v.speech(&silence));
            assert!(!v.speech(&noise));
        }
        assert!(v.speech(&tone));
    }
}
