//! Prometheus metrics.
//!
//! Hot-path counters carry a `shard` label and each shard holds its own
//! children (resolved once at start-up), so no counter is ever written by two
//! cores: a process-wide atomic bouncing between cores hurt the forwarding tail
//! latency of another str0m-based SFU in production.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::ids::ShardId;

/// All metric families of the process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rooms: IntGaugeVec,
    sessions: IntGaugeVec,
    joins: IntCounterVec,
    join_latency: HistogramVec,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    frames_forwarded: IntCounterVec,
    keyframe_requests: IntCounterVec,
    garbage: IntCounterVec,
    early_checks: IntCounterVec,
    errors: IntCounterVec,
    http_errors: IntCounterVec,
    channel_messages: IntCounterVec,
    layer_switches: IntCounterVec,
    layer_switches_done: IntCounterVec,
    wakeups: IntCounterVec,
    bwe_estimate: HistogramVec,
    loss_caps: IntCounterVec,
    offload_tracks: IntGaugeVec,
    caption_tracks: IntGaugeVec,
    captions: IntCounterVec,
    captions_unavailable: IntCounterVec,
    draining: IntGauge,
}

/// The children of one shard, each written only by that shard's thread.
#[derive(Clone)]
pub struct ShardMetrics {
    /// Rooms pinned to the shard.
    pub rooms: IntGauge,
    /// Sessions on the shard.
    pub sessions: IntGauge,
    /// Sessions that reached DTLS connected.
    pub joins_connected: IntCounter,
    /// Offer received to DTLS connected, seconds.
    pub join_latency: prometheus::Histogram,
    /// UDP datagrams received.
    pub packets_in: IntCounter,
    /// UDP datagrams sent.
    pub packets_out: IntCounter,
    /// Bytes received.
    pub bytes_in: IntCounter,
    /// Bytes sent.
    pub bytes_out: IntCounter,
    /// Media frames written to a subscriber.
    pub frames_forwarded: IntCounter,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: IntCounter,
    /// Datagrams that belong to no session or do not parse.
    pub garbage: IntCounter,
    /// STUN checks that arrived before their session reached the shard,
    /// held and answered once it did.
    pub early_checks: IntCounter,
    /// Sessions closed because str0m panicked inside them.
    pub err_rtc_panic: IntCounter,
    /// Sessions closed because str0m returned an error.
    pub err_rtc: IntCounter,
    /// Socket send errors.
    pub err_send: IntCounter,
    /// Datagrams the kernel dropped at the shard's socket, its receive
    /// buffer full: the shard fell behind what arrived.
    pub err_receive_dropped: IntCounter,
    /// Renegotiation failures.
    pub err_sdp: IntCounter,
    /// Data channel messages received that were refused.
    pub channel_bad: IntCounter,
    /// Data channel messages received and handled.
    pub channel_ok: IntCounter,
    /// Simulcast layer switches carried out (on the new layer's keyframe).
    pub layer_switches_done: IntCounter,
    /// Keyframe requests a layer switch caused.
    pub keyframe_requests_switch: IntCounter,
    /// Bandwidth estimates of subscriber links, bit/s.
    pub bwe_estimate: prometheus::Histogram,
    /// Stats intervals in which a subscriber lost much more than usual of what we
    /// sent (`shard::layers::LossWatch`), so its budget was capped at what got through.
    pub loss_caps: IntCounter,
    /// Keyframe requests sent to a transcoder worker (for one of its layers).
    pub keyframe_requests_worker: IntCounter,
    /// Single-layer video tracks with a worker session open.
    pub offload_opened: IntGauge,
    /// Audio tracks with a caption session open.
    pub caption_tracks: IntGauge,
    /// Caption segments sent to rooms, partial and final.
    pub captions_partial: IntCounter,
    pub captions_final: IntCounter,
    /// Times a room's captions became unavailable (no worker).
    pub captions_unavailable: IntCounter,
    layer_switches: IntCounterVec,
    /// Sessions woken by their own str0m timer, by the timer's reason
    /// (indexed by [`wakeup_index`]).
    pub wakeups: [IntCounter; WAKEUP_REASONS.len()],
    shard: String,
}

/// The labels of `balie_timer_wakeups_total`: what a session's str0m timer
/// was for when the shard woke the session for it.
pub const WAKEUP_REASONS: [&str; 14] = [
    "dtls",
    "ice",
    "sctp",
    "channel",
    "stats",
    "feedback",
    "nack",
    "twcc",
    "pause_check",
    "send_stream",
    "packetize",
    "pacer",
    "bwe",
    "other",
];

/// The index in [`WAKEUP_REASONS`] of a str0m timeout reason.
pub fn wakeup_index(reason: str0m::Reason) -> usize {
    use str0m::Reason as R;
    match reason {
        R::DTLS => 0,
        R::Ice => 1,
        R::Sctp => 2,
        R::Channel => 3,
        R::Stats => 4,
        R::Feedback => 5,
        R::Nack => 6,
        R::Twcc => 7,
        R::PauseCheck => 8,
        R::SendStream => 9,
        R::Packetize | R::ReceiveReorder => 10,
        R::Pacer(_) => 11,
        R::BweDelayControl | R::BweProbeControl | R::BweProbeEstimator => 12,
        _ => 13,
    }
}

impl ShardMetrics {
    /// A layer switch was decided (`direction` up, down or start; `cause`
    /// from `shard::layers::Cause`; `layer` low, mid or high). Rare: resolved on use.
    pub fn layer_switch(&self, direction: &str, cause: &str, layer: &str) {
        self.layer_switches
            .with_label_values(&[self.shard.as_str(), direction, cause, layer])
            .inc();
    }
}

impl Metrics {
    /// The registry (for families registered elsewhere, e.g. offload).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Create and register every family.
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("balie".into()), None).expect("a constant prefix is valid"); // cannot fail: fixed valid prefix
        let shard = &["shard"];
        let m = Metrics {
            rooms: IntGaugeVec::new(Opts::new("rooms", "Open rooms."), shard)
                .expect("valid metric"),
            sessions: IntGaugeVec::new(Opts::new("sessions", "Open sessions."), shard)
                .expect("valid metric"),
            joins: IntCounterVec::new(
                Opts::new("joins_total", "Session requests by result."),
                &["result"],
            )
            .expect("valid metric"),
            join_latency: HistogramVec::new(
                HistogramOpts::new(
                    "join_latency_seconds",
                    "From offer received to DTLS connected.",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                shard,
            )
            .expect("valid metric"),
            packets: IntCounterVec::new(
                Opts::new("udp_packets_total", "UDP datagrams by direction."),
                &["shard", "direction"],
            )
            .expect("valid metric"),
            bytes: IntCounterVec::new(
                Opts::new("udp_bytes_total", "UDP bytes by direction."),
                &["shard", "direction"],
            )
            .expect("valid metric"),
            frames_forwarded: IntCounterVec::new(
                Opts::new(
                    "frames_forwarded_total",
                    "Media frames written to subscribers.",
                ),
                shard,
            )
            .expect("valid metric"),
            keyframe_requests: IntCounterVec::new(
                Opts::new(
                    "keyframe_requests_total",
                    "Keyframe requests sent to publishers, by cause (layer_switch or other), and to transcoder workers (worker).",
                ),
                &["shard", "cause"],
            )
            .expect("valid metric"),
            garbage: IntCounterVec::new(
                Opts::new(
                    "garbage_datagrams_total",
                    "Datagrams dropped: unknown sender or unparseable.",
                ),
                shard,
            )
            .expect("valid metric"),
            early_checks: IntCounterVec::new(
                Opts::new(
                    "early_checks_total",
                    "STUN checks that arrived before their session reached the shard: held, and answered once it did.",
                ),
                shard,
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new("errors_total", "Media plane errors by kind."),
                &["shard", "kind"],
            )
            .expect("valid metric"),
            http_errors: IntCounterVec::new(
                Opts::new("http_errors_total", "Refused HTTP requests by error code."),
                &["code"],
            )
            .expect("valid metric"),
            channel_messages: IntCounterVec::new(
                Opts::new(
                    "channel_messages_total",
                    "In-call data channel messages received, by result.",
                ),
                &["shard", "result"],
            )
            .expect("valid metric"),
            layer_switches: IntCounterVec::new(
                Opts::new(
                    "layer_switch_decisions_total",
                    "Simulcast layer changes decided for subscribers, by direction, cause and the layer chosen.",
                ),
                &["shard", "direction", "cause", "layer"],
            )
            .expect("valid metric"),
            layer_switches_done: IntCounterVec::new(
                Opts::new(
                    "layer_switches_total",
                    "Simulcast layer switches carried out (on the new layer's keyframe).",
                ),
                shard,
            )
            .expect("valid metric"),
            wakeups: IntCounterVec::new(
                Opts::new(
                    "timer_wakeups_total",
                    "Sessions woken by their own str0m timer, by what the timer was for (where a shard's time goes when little media flows).",
                ),
                &["shard", "reason"],
            )
            .expect("valid metric"),
            bwe_estimate: HistogramVec::new(
                HistogramOpts::new(
                    "bwe_estimate_bps",
                    "Bandwidth estimates of subscriber links (bit/s).",
                )
                .buckets(vec![
                    100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6, 3e6, 5e6, 10e6,
                ]),
                &["shard"],
            )
            .expect("valid metric"),
            loss_caps: IntCounterVec::new(
                Opts::new(
                    "loss_caps_total",
                    "Stats intervals in which a subscriber suddenly lost much of what was sent to it, capping its video budget at what got through.",
                ),
                shard,
            )
            .expect("valid metric"),
            offload_tracks: IntGaugeVec::new(
                Opts::new(
                    "offload_tracks",
                    "Single-layer video tracks whose lower layers a transcoder worker is asked to make.",
                ),
                shard,
            )
            .expect("valid metric"),
            caption_tracks: IntGaugeVec::new(
                Opts::new(
                    "caption_tracks",
                    "Audio tracks with a caption session open on a worker (rooms with captions on).",
                ),
                shard,
            )
            .expect("valid metric"),
            captions: IntCounterVec::new(
                Opts::new(
                    "captions_total",
                    "Caption segments sent to rooms, by kind (partial, final).",
                ),
                &["shard", "kind"],
            )
            .expect("valid metric"),
            captions_unavailable: IntCounterVec::new(
                Opts::new(
                    "captions_unavailable_total",
                    "Times a room's captions became unavailable because no worker could make them.",
                ),
                shard,
            )
            .expect("valid metric"),
            draining: IntGauge::new("draining", "1 while the node drains after SIGTERM.")
                .expect("valid metric"),
            registry,
        };
        let r = &m.registry;
        // Registration only fails on duplicate names, which are fixed above.
        for c in [
            Box::new(m.rooms.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.sessions.clone()),
            Box::new(m.joins.clone()),
            Box::new(m.join_latency.clone()),
            Box::new(m.packets.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.frames_forwarded.clone()),
            Box::new(m.keyframe_requests.clone()),
            Box::new(m.garbage.clone()),
            Box::new(m.early_checks.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.http_errors.clone()),
            Box::new(m.channel_messages.clone()),
            Box::new(m.layer_switches.clone()),
            Box::new(m.layer_switches_done.clone()),
            Box::new(m.wakeups.clone()),
            Box::new(m.bwe_estimate.clone()),
            Box::new(m.loss_caps.clone()),
            Box::new(m.offload_tracks.clone()),
            Box::new(m.caption_tracks.clone()),
            Box::new(m.captions.clone()),
            Box::new(m.captions_unavailable.clone()),
            Box::new(m.draining.clone()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        // At 0 from the start, so that the first join is an increase() (the
        // refusals' codes are many and appear when they happen).
        m.joins.with_label_values(&["created"]);
        m
    }

    /// Resolve the children of one shard.
    pub fn shard(&self, id: ShardId) -> ShardMetrics {
        let s = id.to_string();
        let s = s.as_str();
        ShardMetrics {
            rooms: self.rooms.with_label_values(&[s]),
            sessions: self.sessions.with_label_values(&[s]),
            joins_connected: self.joins.with_label_values(&["connected"]),
            join_latency: self.join_latency.with_label_values(&[s]),
            packets_in: self.packets.with_label_values(&[s, "in"]),
            packets_out: self.packets.with_label_values(&[s, "out"]),
            bytes_in: self.bytes.with_label_values(&[s, "in"]),
            bytes_out: self.bytes.with_label_values(&[s, "out"]),
            frames_forwarded: self.frames_forwarded.with_label_values(&[s]),
            keyframe_requests: self.keyframe_requests.with_label_values(&[s, "other"]),
            keyframe_requests_switch: self
                .keyframe_requests
                .with_label_values(&[s, "layer_switch"]),
            garbage: self.garbage.with_label_values(&[s]),
            early_checks: self.early_checks.with_label_values(&[s]),
            err_rtc_panic: self.errors.with_label_values(&[s, "rtc_panic"]),
            err_rtc: self.errors.with_label_values(&[s, "rtc"]),
            err_send: self.errors.with_label_values(&[s, "send"]),
            err_receive_dropped: self.errors.with_label_values(&[s, "receive_dropped"]),
            err_sdp: self.errors.with_label_values(&[s, "renegotiation"]),
            channel_bad: self.channel_messages.with_label_values(&[s, "refused"]),
            channel_ok: self.channel_messages.with_label_values(&[s, "ok"]),
            layer_switches_done: self.layer_switches_done.with_label_values(&[s]),
            bwe_estimate: self.bwe_estimate.with_label_values(&[s]),
            loss_caps: self.loss_caps.with_label_values(&[s]),
            keyframe_requests_worker: self.keyframe_requests.with_label_values(&[s, "worker"]),
            offload_opened: self.offload_tracks.with_label_values(&[s]),
            caption_tracks: self.caption_tracks.with_label_values(&[s]),
            captions_partial: self.captions.with_label_values(&[s, "partial"]),
            captions_final: self.captions.with_label_values(&[s, "final"]),
            captions_unavailable: self.captions_unavailable.with_label_values(&[s]),
            layer_switches: self.layer_switches.clone(),
            wakeups: WAKEUP_REASONS.map(|r| self.wakeups.with_label_values(&[s, r])),
            shard: s.to_string(),
        }
    }

    /// Count a session request by its result (`created` or an error code).
    pub fn join_result(&self, result: &str) {
        self.joins.with_label_values(&[result]).inc();
    }

    /// Count a refused HTTP request.
    pub fn http_error(&self, code: &str) {
        self.http_errors.with_label_values(&[code]).inc();
    }

    /// Mark the node as draining.
    pub fn set_draining(&self) {
        self.draining.set(1);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The sum of a metric family's samples in Prometheus text (what `/metrics`
/// serves) whose labels contain every one of `labels`: for tests and tools
/// that read the metrics back.
pub fn family_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
