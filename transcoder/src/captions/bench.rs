//! `balie-transcoder captions-bench`: how many caption streams this machine
//! holds in real time on one shared model.
//!
//! A step runs `n` of the worker's own caption sessions ([`CaptionSession`]:
//! Opus decode, voice activity, streaming Whisper; no QUIC: the network is
//! not what is measured). Each is fed the same speech as 20 ms Opus packets
//! in real time, the streams started 0.7 s apart (wrapping round within the
//! speech's length) so their utterances do not line up. For every final caption, the latency is the time from when the
//! end of the speech it covers was fed to when the text came out; the last
//! final of an utterance covers the end of speech itself. A step holds when
//! the 95th percentile of the end-of-utterance latency is within the goal
//! (1.5 s) and no audio was dropped. The latency of every final (words made
//! final by agreement while the speaker goes on, too) is reported beside.

use std::sync::Arc;
use std::time::{Duration, Instant};

use balie_offload::{Control, Frame};
use tokio::sync::mpsc;

use super::audio::{encode_opus, read_pcm};
use super::mel::SAMPLE_RATE;
use super::session::CaptionSession;
use super::whisper::Whisper;
use crate::metrics::{cpu_seconds, Metrics};
use crate::session::Out;

/// A step's p95 end-of-speech-to-final latency must be within this.
pub const GOAL: Duration = Duration::from_millis(1500);

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub streams: usize,
    /// End of an utterance's speech to its last final text (p50, p95).
    pub end_p50: Duration,
    pub end_p95: Duration,
    pub utterances: usize,
    /// The end of the speech each final covers to the final (p50, p95).
    pub p50: Duration,
    pub p95: Duration,
    pub finals: usize,
    /// Whisper's time per second of audio, mean over runs.
    pub rtf: f64,
    /// Opus packets dropped (a session's queue was full).
    pub dropped: u64,
    /// CPU seconds per wall second (cores busy).
    pub cores: f64,
    pub held: bool,
}

/// Run `streams` caption sessions of `pcm` (16 kHz mono) at once.
pub fn step(
    whisper: &Arc<Whisper>,
    pcm: &[f32],
    language: &str,
    streams: usize,
) -> Result<Step, String> {
    let packets = Arc::new(encode_opus(pcm)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    let metrics = Metrics::new();
    let cpu0 = cpu_seconds();
    let wall0 = Instant::now();
    let finals = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..streams {
            let (tx, rx) = mpsc::channel::<Out>(1024);
            let session = CaptionSession::start(
                i as u64,
                language.to_string(),
                whisper.clone(),
                tx,
                metrics.clone(),
            )
            .await
            .map_err(|(_, why)| why)?;
            let packets = packets.clone();
            // 0.7 s apart, wrapping round within the speech's length (a
            // hundred streams do not wait a minute for the last to start).
            let length_ms = (pcm.len() * 1000 / SAMPLE_RATE).max(1) as u64;
            let offset = Duration::from_millis((700 * i as u64) % length_ms);
            tasks.push(tokio::spawn(run_stream(i, session, packets, offset, rx)));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(all)
    })?;
    let wall = wall0.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu0) / wall;
    // The last final of each utterance (finals of one utterance share its
    // start) covers the end of its speech.
    let mut ends: Vec<Duration> = Vec::new();
    for (i, f) in finals.iter().enumerate() {
        let next = finals.get(i + 1);
        if next.is_none_or(|n| n.stream != f.stream || n.start_ms != f.start_ms) {
            ends.push(f.latency);
        }
    }
    let mut all: Vec<Duration> = finals.iter().map(|f| f.latency).collect();
    let (p50, p95) = percentiles(&mut all);
    let (end_p50, end_p95) = percentiles(&mut ends);
    let rtf = {
        let (sum, count) = (
            metrics.caption_rtf.get_sample_sum(),
            metrics.caption_rtf.get_sample_count(),
        );
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    };
    let dropped = metrics.caption_audio.with_label_values(&["dropped"]).get();
    Ok(Step {
        streams,
        end_p50,
        end_p95,
        utterances: ends.len(),
        p50,
        p95,
        finals: all.len(),
        rtf,
        dropped,
        cores,
        held: !ends.is_empty() && end_p95 <= GOAL && dropped == 0,
    })
}

/// The 50th and 95th percentiles (nearest rank).
fn percentiles(l: &mut [Duration]) -> (Duration, Duration) {
    l.sort();
    let pick = |q: f64| {
        l.get(((l.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(Duration::MAX)
    };
    (pick(0.5), pick(0.95))
}

/// A final caption of a stream, and how long after its speech it came.
struct Final {
    stream: usize,
    start_ms: u32,
    latency: Duration,
}

/// Feed one stream in real time after `offset`; its finals, in order.
async fn run_stream(
    stream: usize,
    session: CaptionSession,
    packets: Arc<Vec<Vec<u8>>>,
    offset: Duration,
    mut rx: mpsc::Receiver<Out>,
) -> Vec<Final> {
    tokio::time::sleep(offset).await;
    let start = Instant::now();
    let feed = async {
        for (i, p) in packets.iter().enumerate() {
            tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
            session.push(
                Frame {
                    rtp_time: (i * 960) as u32,
                    deadline_ms: 0,
                    key: i % 50 == 0,
                    data: p.clone().into(),
                },
                Instant::now(),
            );
        }
        // Three seconds for the last finals, then the session ends.
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    let mut latencies = Vec::new();
    let collect = async {
        while let Some(out) = rx.recv().await {
            if let Out::Control(Control::Caption(c)) = out {
                if c.is_final {
                    // The audio at end_ms was fed at start + end_ms.
                    let fed = start + Duration::from_millis(u64::from(c.end_ms));
                    latencies.push(Final {
                        stream,
                        start_ms: c.start_ms,
                        latency: Instant::now().saturating_duration_since(fed),
                    });
                }
            }
        }
    };
    tokio::select! {
        _ = feed => {}
        _ = collect => {}
    }
    drop(session);
    // Packets decode to slightly fewer samples than fed (the decoder's
    // pre-skip, the resampler's delay): the session's clock runs a few
    // milliseconds behind the feed, so these latencies err on the long side.
    latencies
}

/// The default speech: two LibriVox readings from Debian's
/// pocketsphinx-testdata (7.1 s and 6.0 s), with 2 s of silence around
/// each, 19.1 s in all.
pub fn default_speech() -> Result<Vec<f32>, String> {
    let dir = std::path::Path::new("/usr/share/pocketsphinx/test/data/librivox");
    let silence = vec![0f32; 2 * SAMPLE_RATE];
    let mut pcm = silence.clone();
    for id in ["0870", "0920"] {
        let path = dir.join(format!("sense_and_sensibility_01_austen_64kb-{id}.wav"));
        pcm.extend(read_pcm(&path).map_err(|e| {
            format!("{e} (apt-get install pocketsphinx-testdata, or pass --audio FILE)")
        })?);
        pcm.extend_from_slice(&silence);
    }
    Ok(pcm)
}

/// Run [`step`] for each count in turn, printing a Markdown table row per
/// step, until one does not hold; the most streams held.
pub fn steps(
    whisper: &Arc<Whisper>,
    pcm: &[f32],
    language: &str,
    counts: impl IntoIterator<Item = usize>,
) -> Result<usize, String> {
    println!(
        "| streams | utterances | end of speech to final, p50 / p95 s | finals | any final, p50 / p95 s | real-time factor | audio dropped | cores busy | held |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut best = 0;
    for n in counts {
        let s = step(whisper, pcm, language, n)?;
        println!(
            "| {} | {} | {:.2} / {:.2} | {} | {:.2} / {:.2} | {:.3} | {} | {:.2} | {} |",
            s.streams,
            s.utterances,
            s.end_p50.as_secs_f64(),
            s.end_p95.as_secs_f64(),
            s.finals,
            s.p50.as_secs_f64(),
            s.p95.as_secs_f64(),
            s.rtf,
            s.dropped,
            s.cores,
            if s.held { "yes" } else { "no" }
        );
        if !s.held {
            break;
        }
        best = n;
    }
    Ok(best)
}

/// The stream counts tried, in order, up to `max`.
pub fn counts(max: usize) -> Vec<usize> {
    let mut n = vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256];
    n.retain(|c| *c <= max);
    n
}
