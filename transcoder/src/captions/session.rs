//! One caption session: a participant's Opus audio in, caption segments
//! out. A thread per session decodes the Opus packets (FFmpeg), resamples
//! them to 16 kHz mono and runs the [`Streamer`] (voice activity, partials,
//! local agreement) on the worker's one shared [`Whisper`].
//!
//! Whisper runs on the session's own thread only (a rayon pool of one for
//! candle's kernels): Whisper base's matrices are too small for candle to
//! gain from more threads, and sessions that each spread over every core
//! only get in each other's way (measured: two streams on two cores held
//! end of speech to final text within 1.2 s this way, not within 2 s the
//! other; `balie-transcoder captions-bench`).
//!
//! Nothing is kept: audio is dropped once transcribed, text once sent. A
//! queue of [`QUEUE`] packets (5 s) absorbs a slow transcription; past it,
//! packets are dropped and counted (the speech in them is lost to the
//! captions, never to the call).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use balie_offload::{Caption, Control, ErrorCode, Frame};
use tokio::sync::{mpsc, oneshot};

use super::audio::OpusDecoder;
use super::mel::SAMPLE_RATE;
use super::stream::Streamer;
use super::whisper::Whisper;
use crate::metrics::Metrics;
use crate::session::Out;

/// Opus packets a session may have waiting (5 s of 20 ms packets).
pub const QUEUE: usize = 250;

/// The connection's handle on a running caption session. Dropping it ends
/// the thread after the transcription under way; queued audio is dropped.
pub struct CaptionSession {
    packets: SyncSender<(Frame, Instant)>,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
}

impl CaptionSession {
    /// Start a session transcribing `language`; fails when the Opus decoder
    /// cannot be opened or the model does not know the language.
    pub async fn start(
        id: u64,
        language: String,
        whisper: Arc<Whisper>,
        out: mpsc::Sender<Out>,
        metrics: Metrics,
    ) -> Result<CaptionSession, (ErrorCode, String)> {
        if let Err(e) = whisper.language_token(&language) {
            return Err((ErrorCode::Unsupported, e.to_string()));
        }
        let (packets, rx) = sync_channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        let (st, m) = (stop.clone(), metrics.clone());
        std::thread::Builder::new()
            .name(format!("captions-{id}"))
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("captions-{id}-whisper"))
                    .build()
                    .map_err(|e| format!("a thread for Whisper: {e}"));
                match (OpusDecoder::new(), pool) {
                    (Ok(decoder), Ok(pool)) => {
                        let _ = ready_tx.send(Ok(()));
                        let streamer = Streamer::new(&language);
                        pool.install(|| {
                            run(id, language, decoder, streamer, &whisper, rx, &st, &out, &m);
                        });
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| (ErrorCode::Internal, format!("starting a thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(CaptionSession {
                packets,
                stop,
                metrics,
            }),
            Ok(Err(why)) => Err((ErrorCode::Unsupported, why)),
            Err(_) => Err((ErrorCode::Internal, "the session thread ended".into())),
        }
    }

    /// Queue an Opus packet; dropped (and counted) when the queue is full.
    pub fn push(&self, frame: Frame, arrived: Instant) {
        self.metrics.caption_audio.with_label_values(&["in"]).inc();
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.packets.try_send((frame, arrived))
        {
            self.metrics
                .caption_audio
                .with_label_values(&["dropped"])
                .inc();
        }
    }
}

impl Drop for CaptionSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Seconds of the session's audio as whole milliseconds.
fn ms(seconds: f64) -> u32 {
    (seconds * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

#[allow(clippy::too_many_arguments)]
fn run(
    id: u64,
    language: String,
    mut decoder: OpusDecoder,
    mut streamer: Streamer,
    whisper: &Whisper,
    packets: Receiver<(Frame, Instant)>,
    stop: &AtomicBool,
    out: &mpsc::Sender<Out>,
    metrics: &Metrics,
) {
    let mut pcm = Vec::new();
    // When the audio up to each position arrived: (samples seen after the
    // packet, its arrival), for the latency from the end of speech.
    let mut arrivals: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut decoded = 0usize;
    while let Ok(first) = packets.recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Everything queued meanwhile goes to the streamer at once: one
        // transcription for a backlog, not one per second of it.
        pcm.clear();
        for (frame, arrived) in std::iter::once(first).chain(packets.try_iter()) {
            if decoder.decode(&frame.data, &mut pcm).is_err() {
                metrics
                    .caption_audio
                    .with_label_values(&["undecodable"])
                    .inc();
                continue;
            }
            arrivals.push_back((decoded + pcm.len(), arrived));
        }
        decoded += pcm.len();
        let captions = match streamer.push(whisper, &pcm) {
            Ok(c) => c,
            Err(e) => {
                let _ = out.blocking_send(Out::Control(Control::Ended {
                    session: id,
                    code: ErrorCode::Media,
                    reason: format!("captions: {e}"),
                }));
                return;
            }
        };
        metrics.caption_on_gpu.set(i64::from(whisper.on_gpu()));
        for (audio, took) in streamer.take_work() {
            if audio > 0.0 {
                metrics.caption_rtf.observe(took.as_secs_f64() / audio);
            }
        }
        let now = Instant::now();
        for c in captions {
            if c.is_final {
                // The end of the speech it covers, and when that arrived.
                let end = (c.end * SAMPLE_RATE as f64) as usize;
                while arrivals.len() > 1 && arrivals[0].0 < end {
                    arrivals.pop_front();
                }
                if let Some((_, at)) = arrivals.front() {
                    metrics
                        .caption_latency
                        .observe(now.saturating_duration_since(*at).as_secs_f64());
                }
            }
            let kind = if c.is_final { "final" } else { "partial" };
            metrics.captions.with_label_values(&[kind]).inc();
            let msg = Control::Caption(Caption {
                session: id,
                text: c.text,
                start_ms: ms(c.start),
                end_ms: ms(c.end).max(ms(c.start)),
                is_final: c.is_final,
                language: language.clone(),
            });
            if out.blocking_send(Out::Control(msg)).is_err() {
                return;
            }
        }
        // Keep only what a final can still end in: the utterance under way.
        let keep_from = streamer.position().saturating_sub(30 * SAMPLE_RATE);
        while arrivals.len() > 1 && arrivals[0].0 < keep_from {
            arrivals.pop_front();
        }
    }
}
