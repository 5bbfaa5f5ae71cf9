//! The worker's Prometheus metrics, served on `/metrics`.

use balie_offload::ErrorCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// All metric families of the worker.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// SFU connections open.
    pub connections: IntGauge,
    /// Transcode sessions open.
    pub sessions: IntGauge,
    /// The most it takes (`--max-sessions`), and the most caption sessions
    /// (`--max-captions`; 0 without `--captions`): with the two above, how
    /// full it is.
    pub max_sessions: IntGauge,
    pub max_captions: IntGauge,
    /// Of those, the ones whose pipeline runs on the GPU.
    pub gpu_video_sessions: IntGauge,
    /// Sessions placed on the GPU whose pipeline the GPU could not open
    /// (they run on the CPU).
    pub gpu_fallbacks: IntCounter,
    /// Sessions opened, by outcome (`opened`, or the refusal's code).
    pub opens: IntCounterVec,
    /// Source frames received.
    pub frames_in: IntCounter,
    /// Layer frames sent.
    pub frames_out: IntCounter,
    /// Source frames dropped, by reason (`deadline`: decoded but too late to
    /// encode; `queue`: the session's queue was full; `broken`: waiting for a
    /// keyframe after a decode error).
    pub dropped: IntCounterVec,
    /// Stage times per source frame, seconds, by stage (decode, scale, encode).
    pub stage_seconds: HistogramVec,
    /// Source frames waiting in session queues.
    pub queue_depth: IntGauge,
    /// Protocol errors from peers, by code (malformed, too_large, ...).
    pub protocol_errors: IntCounterVec,
    /// Connections refused or lost during the handshake (e.g. no valid
    /// client certificate).
    pub handshake_failures: IntCounter,
    /// Caption sessions open.
    pub caption_sessions: IntGauge,
    /// Caption segments sent, by kind (`partial`, `final`).
    pub captions: IntCounterVec,
    /// From the arrival of the end of an utterance's speech to its final
    /// text, seconds.
    pub caption_latency: Histogram,
    /// Whisper's time per second of audio, per run (real-time factor).
    pub caption_rtf: Histogram,
    /// Opus packets of caption sessions, by outcome (`in`; `dropped`: the
    /// session's queue was full; `undecodable`).
    pub caption_audio: IntCounterVec,
    /// 1 while Whisper runs on the GPU; 0 on the CPU (also after the GPU
    /// engine failed and handed its windows to the CPU).
    pub caption_on_gpu: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let ns = |name: &str, help: &str| Opts::new(name, help).namespace("balie_transcoder");
        let connections =
            IntGauge::with_opts(ns("connections", "SFU connections open")).expect("valid metric");
        let sessions =
            IntGauge::with_opts(ns("sessions", "Transcode sessions open")).expect("valid metric");
        let max_sessions = IntGauge::with_opts(ns(
            "max_sessions",
            "The most transcode sessions the worker takes (--max-sessions)",
        ))
        .expect("valid metric");
        let max_captions = IntGauge::with_opts(ns(
            "max_captions",
            "The most caption sessions the worker takes (--max-captions; 0 without --captions)",
        ))
        .expect("valid metric");
        let gpu_video_sessions = IntGauge::with_opts(ns(
            "gpu_video_sessions",
            "Transcode sessions whose pipeline runs on the GPU (the rest run on the CPU)",
        ))
        .expect("valid metric");
        let gpu_fallbacks = IntCounter::with_opts(ns(
            "gpu_fallbacks_total",
            "Sessions placed on the GPU whose pipeline it could not open or that failed there; they go on on the CPU",
        ))
        .expect("valid metric");
        let opens = IntCounterVec::new(
            ns("session_opens_total", "Session open requests by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let frames_in = IntCounter::with_opts(ns("frames_in_total", "Source frames received"))
            .expect("valid metric");
        let frames_out = IntCounter::with_opts(ns("frames_out_total", "Layer frames sent"))
            .expect("valid metric");
        let dropped = IntCounterVec::new(
            ns(
                "frames_dropped_total",
                "Source frames not transcoded, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "stage_seconds",
                "Time per source frame in each stage (decode, scale, encode)",
            )
            .namespace("balie_transcoder")
            .buckets(vec![
                0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.033, 0.066, 0.133,
            ]),
            &["stage"],
        )
        .expect("valid metric");
        let queue_depth =
            IntGauge::with_opts(ns("queue_depth", "Source frames waiting in session queues"))
                .expect("valid metric");
        let protocol_errors = IntCounterVec::new(
            ns(
                "protocol_errors_total",
                "Protocol errors from peers, by code",
            ),
            &["code"],
        )
        .expect("valid metric");
        let handshake_failures = IntCounter::with_opts(ns(
            "handshake_failures_total",
            "Connections that failed the QUIC/TLS handshake (e.g. no valid client certificate)",
        ))
        .expect("valid metric");
        let caption_sessions = IntGauge::with_opts(ns("caption_sessions", "Caption sessions open"))
            .expect("valid metric");
        let caption_on_gpu = IntGauge::with_opts(ns(
            "caption_whisper_on_gpu",
            "1 while Whisper runs on the GPU, 0 on the CPU (also after a GPU failure)",
        ))
        .expect("valid metric");
        let captions = IntCounterVec::new(
            ns("captions_total", "Caption segments sent, by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let caption_latency = Histogram::with_opts(
            HistogramOpts::new(
                "caption_latency_seconds",
                "From the arrival of the end of an utterance's speech to its final text",
            )
            .namespace("balie_transcoder")
            .buckets(vec![0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0]),
        )
        .expect("valid metric");
        let caption_rtf = Histogram::with_opts(
            HistogramOpts::new(
                "caption_real_time_factor",
                "Whisper's time per second of audio, per run",
            )
            .namespace("balie_transcoder")
            .buckets(vec![0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0]),
        )
        .expect("valid metric");
        let caption_audio = IntCounterVec::new(
            ns(
                "caption_audio_packets_total",
                "Opus packets of caption sessions, by outcome (in, dropped, undecodable)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(caption_sessions.clone()),
            Box::new(captions.clone()),
            Box::new(caption_latency.clone()),
            Box::new(caption_rtf.clone()),
            Box::new(caption_audio.clone()),
            Box::new(caption_on_gpu.clone()),
            Box::new(sessions.clone()),
            Box::new(max_sessions.clone()),
            Box::new(max_captions.clone()),
            Box::new(gpu_video_sessions.clone()),
            Box::new(gpu_fallbacks.clone()),
            Box::new(opens.clone()),
            Box::new(frames_in.clone()),
            Box::new(frames_out.clone()),
            Box::new(dropped.clone()),
            Box::new(stage_seconds.clone()),
            Box::new(queue_depth.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(handshake_failures.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Every label value known in advance starts at 0: a series that
        // appears at 1 shows no increase(), so its first event would raise
        // no alert (configs/monitoring).
        for (family, values) in [
            (&dropped, &["deadline", "queue", "broken"][..]),
            (&captions, &["partial", "final"]),
            (&caption_audio, &["in", "dropped", "undecodable"]),
            (&opens, &["opened"]),
        ] {
            for v in values {
                family.with_label_values(&[v]);
            }
        }
        for code in ErrorCode::ERRORS {
            opens.with_label_values(&[code.name()]);
            protocol_errors.with_label_values(&[code.name()]);
        }
        for stage in ["decode", "scale", "encode"] {
            stage_seconds.with_label_values(&[stage]);
        }
        Metrics {
            registry,
            connections,
            sessions,
            max_sessions,
            max_captions,
            gpu_video_sessions,
            gpu_fallbacks,
            opens,
            frames_in,
            frames_out,
            dropped,
            stage_seconds,
            queue_depth,
            protocol_errors,
            handshake_failures,
            caption_sessions,
            captions,
            caption_latency,
            caption_rtf,
            caption_audio,
            caption_on_gpu,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serve `metrics` on `GET /metrics` (`serve --metrics ADDR`), and
/// `GET /healthz` ("ok": the process answers, for a liveness probe), until
/// the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let _ = axum::serve(listener, app).await;
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Sum of fields of /proc/self/stat (after the command name), in seconds
/// (Linux counts them in ticks of 1/100 s).
fn stat_seconds(fields: &[usize]) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// This process's CPU time (utime + stime), seconds.
pub fn cpu_seconds() -> f64 {
    stat_seconds(&[11, 12])
}

/// CPU time of waited-for children (cutime + cstime).
pub fn children_cpu_seconds() -> f64 {
    stat_seconds(&[13, 14])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `GET path` over HTTP/1.0: the whole answer.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_from_0_and_a_health_check() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = Metrics::new();
        m.frames_in.inc();
        tokio::spawn(serve(listener, m));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
        assert!(
            metrics.contains("balie_transcoder_frames_in_total 1"),
            "{metrics}"
        );
        // Known label values are there at 0 before anything happened.
        assert!(
            metrics.contains("balie_transcoder_frames_dropped_total{reason=\"deadline\"} 0"),
            "{metrics}"
        );
        assert!(
            metrics.contains("balie_transcoder_protocol_errors_total{code=\"version\"} 0"),
            "{metrics}"
        );
        let health = get(addr, "/healthz").await;
        assert!(
            health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"),
            "{health}"
        );
        assert!(get(addr, "/nothing").await.starts_with("HTTP/1.0 404"));
    }
}
