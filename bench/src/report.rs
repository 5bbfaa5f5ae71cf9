//! The report of a run: aggregated over participants (p50/p95/p99), written
//! as `report.json` (schema in docs/bench.md) and as a Markdown table.

use serde::Serialize;

use crate::participant::{Stats, LATE_SEND};
use crate::run::Outcome;

/// Percentiles of a distribution.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    /// How many values.
    pub n: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (all zero when empty).
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Percentiles {
            p50: at(50.0),
            p95: at(95.0),
            p99: at(99.0),
            n: values.len(),
        }
    }
}

/// One step of a ramp.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Calls started by the end of the step.
    pub calls: usize,
    /// Participants connected.
    pub connected: usize,
    /// Over the step's window.
    pub loss_pct: f64,
    pub p99_latency_ms: f64,
    pub freezes: u64,
}

/// The ramp's result.
#[derive(Debug, Clone, Serialize)]
pub struct Ramp {
    /// The most calls held while quality held (0: not even the first step).
    pub calls_held_at_quality: usize,
    /// Each step, with `ok` when its quality held.
    pub steps: Vec<StepResult>,
}

/// A step and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    #[serde(flatten)]
    pub step: Step,
    pub ok: bool,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    /// Calls in which every participant connected and received media.
    pub calls_held: usize,
    pub calls: usize,
    pub participants: usize,
    /// Participants whose join failed (HTTP or SDP), with the reasons.
    pub join_errors: Vec<String>,
    pub join_ms: Percentiles,
    /// Offer sent to the answer received: the signalling part of `join_ms`.
    pub answer_ms: Percentiles,
    /// Offer sent to ICE connected: `join_ms` less the DTLS handshake.
    pub ice_ms: Percentiles,
    pub first_frame_ms: Percentiles,
    pub e2e_latency_ms: Percentiles,
    /// Packets lost over packets expected by the receivers, percent: audio
    /// end to end (gaps in the Opus timestamps), video on the server's leg.
    pub loss_pct: f64,
    /// Audio interarrival jitter per participant (RFC 3550, the mean of its
    /// estimate over the packets received), milliseconds.
    pub jitter_ms: Percentiles,
    /// Gaps over 500 ms in a received video track, a track that stopped
    /// before the end counting as one until the end.
    pub freezes: u64,
    /// How long those gaps lasted, in all, seconds.
    pub frozen_s: f64,
    /// Simulcast layer switches each participant saw (a received video
    /// track's keyframes changed size).
    pub layer_switches: Percentiles,
    pub layer_switches_total: u64,
    pub frames_sent: u64,
    pub audio_packets_sent: u64,
    /// Media payload bytes the participants wrote (every layer).
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub audio_packets_received: u64,
    pub bytes_received: u64,
    /// Whether the server's CPU and memory were measured (an external
    /// server without `target.pid`: no, and those figures are 0).
    pub server_measured: bool,
    pub server_cpu_seconds: f64,
    pub server_rss_bytes: u64,
    /// UDP datagrams the server sent while the calls were held: its own
    /// count where it has one (balie's
    /// `balie_udp_packets_total{direction="out"}`), else what the
    /// participants received (`packets_forwarded_source`).
    pub packets_forwarded: f64,
    /// `"server"` or `"receivers"`.
    pub packets_forwarded_source: &'static str,
    pub packets_per_server_cpu_second: f64,
    /// UDP datagrams the participants received from the server while the
    /// calls were held; counted the same way for every target, so this is
    /// what `compare` sets side by side.
    pub packets_received: f64,
    pub received_per_server_cpu_second: f64,
    /// Media RTP packets among `packets_received` (str0m's receiver
    /// statistics: the padding a bandwidth probe sends is not counted, so
    /// this compares servers that probe with servers that do not).
    pub media_packets_received: f64,
    pub media_packets_per_server_cpu_second: f64,
    /// Datagrams the kernel dropped at the server's sockets over the run,
    /// their receive buffers full (the server fell behind): balie's
    /// `balie_errors_total{kind="receive_dropped"}`; absent for a server
    /// that does not count them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_receive_dropped: Option<f64>,
    /// The load generator's own CPU over the hold, the same window as
    /// `server_cpu_seconds` (so the two compare).
    pub bench_cpu_seconds: f64,
    /// The same over the whole run, joins included.
    pub bench_cpu_seconds_run: f64,
    /// `bench_cpu_seconds` over the cores it had during the hold, percent:
    /// above 80 the load generator may have been the bottleneck.
    pub bench_cpu_pct: f64,
    /// Server and load generator together over the hold, percent of this
    /// machine's cores; absent when the server runs on another machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cpu_pct: Option<f64>,
    /// Media sends (audio packets, video frames) the generator made over
    /// [`LATE_SEND`] behind their schedule, percent of all: whether the
    /// generator, which shares the cores with the server, kept time.
    pub bench_late_sends_pct: f64,
    /// The most any media send was behind its schedule, milliseconds.
    pub bench_max_send_lag_ms: f64,
    /// The generator may have held the figures back: it used over 80% of
    /// the cores, or it shares them with the server and the two used over
    /// 90% together (then neither got all it asked for, and packets wait in
    /// queues on both sides), or over 1% of its media sends were late.
    pub bench_saturated: bool,
    pub wall_seconds: f64,
    /// Ramp mode only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// The scenario's participants one by one (the same place in every
    /// call): a weak link's freezes are not lost among the good ones.
    pub by_member: Vec<MemberSummary>,
    /// The balie-transcoder workers the bench started, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<crate::workers::WorkersReport>,
    /// Every participant's figures, written apart (`participants.json`).
    #[serde(skip)]
    pub per_participant: Vec<ParticipantRow>,
}

/// Above this share of the cores the load generator itself is the limit.
const GENERATOR_FULL_PCT: f64 = 80.0;
/// Above this share server and generator together have filled the machine.
const MACHINE_FULL_PCT: f64 = 90.0;

/// Above this share of late media sends the generator did not keep time.
const LATE_SENDS_PCT: f64 = 1.0;

/// Whether the load generator may have held a run's figures back (see
/// [`Report::bench_saturated`]).
pub fn saturated(bench_cpu_pct: f64, machine_cpu_pct: Option<f64>, late_sends_pct: f64) -> bool {
    bench_cpu_pct > GENERATOR_FULL_PCT
        || machine_cpu_pct.is_some_and(|m| m > MACHINE_FULL_PCT)
        || late_sends_pct > LATE_SENDS_PCT
}

/// Aggregate a run; `roles` are the scenario's participants in order.
pub fn build(scenario: &str, target: &str, roles: &[&str], o: &Outcome) -> Report {
    let per_call = roles.len();
    let (packets_forwarded, packets_forwarded_source) = match o.packets_sent {
        Some(n) => (n, "server"),
        None => (o.packets_received, "receivers"),
    };
    let merged = participants(&o.stats);
    let s = &merged;
    let sum = |f: &dyn Fn(&Stats) -> u64| s.iter().map(f).sum::<u64>();
    let lost = sum(&|x| x.lost);
    let expected = sum(&|x| x.expected);
    let mut by_call: std::collections::HashMap<usize, Vec<&Stats>> = Default::default();
    for p in s {
        by_call.entry(p.call).or_default().push(p);
    }
    let held = by_call
        .values()
        .filter(|call| {
            call.len() == per_call
                && call.iter().all(|p| {
                    p.join.is_some() && (p.frames_received > 0 || p.audio_packets_received > 0)
                })
        })
        .count();
    let cores = crate::run::cores() as f64;
    let bench_cpu_pct = 100.0 * o.bench_cpu_seconds / (o.hold_seconds * cores).max(1e-9);
    let sends = sum(&|x| x.audio_packets_sent + x.frames_sent);
    let bench_late_sends_pct = 100.0 * sum(&|x| x.late_sends) as f64 / sends.max(1) as f64;
    Report {
        scenario: scenario.into(),
        target: target.into(),
        calls_held: held,
        calls: o.calls,
        participants: s.len(),
        join_errors: o.join_errors.clone(),
        join_ms: Percentiles::of(s.iter().filter_map(|p| ms(p.join)).collect()),
        answer_ms: Percentiles::of(s.iter().filter_map(|p| ms(p.answer)).collect()),
        ice_ms: Percentiles::of(s.iter().filter_map(|p| ms(p.ice)).collect()),
        first_frame_ms: Percentiles::of(s.iter().filter_map(|p| ms(p.first_frame)).collect()),
        e2e_latency_ms: Percentiles::of(
            s.iter()
                .flat_map(|p| p.latencies_ms.iter().map(|v| f64::from(*v)))
                .collect(),
        ),
        loss_pct: loss_pct(lost, expected),
        jitter_ms: Percentiles::of(s.iter().filter_map(jitter_ms).collect()),
        freezes: sum(&|x| x.freezes),
        frozen_s: s.iter().map(|p| p.frozen.as_secs_f64()).sum(),
        layer_switches: Percentiles::of(s.iter().map(|p| p.layer_switches as f64).collect()),
        layer_switches_total: sum(&|x| x.layer_switches),
        frames_sent: sum(&|x| x.frames_sent),
        audio_packets_sent: sum(&|x| x.audio_packets_sent),
        bytes_sent: sum(&|x| x.bytes_sent),
        frames_received: sum(&|x| x.frames_received),
        audio_packets_received: sum(&|x| x.audio_packets_received),
        bytes_received: sum(&|x| x.bytes_received),
        server_measured: true,
        server_cpu_seconds: o.server_cpu_seconds,
        server_rss_bytes: o.server_rss_bytes,
        packets_forwarded,
        packets_forwarded_source,
        packets_per_server_cpu_second: packets_forwarded / o.server_cpu_seconds.max(1e-9),
        packets_received: o.packets_received,
        received_per_server_cpu_second: o.packets_received / o.server_cpu_seconds.max(1e-9),
        media_packets_received: o.media_packets_received,
        media_packets_per_server_cpu_second: o.media_packets_received
            / o.server_cpu_seconds.max(1e-9),
        server_receive_dropped: o.server_receive_dropped,
        bench_cpu_seconds: o.bench_cpu_seconds,
        bench_cpu_seconds_run: o.bench_cpu_seconds_run,
        bench_cpu_pct,
        machine_cpu_pct: o.machine_cpu_pct,
        bench_late_sends_pct,
        bench_max_send_lag_ms: s
            .iter()
            .map(|p| p.max_send_lag.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        bench_saturated: saturated(bench_cpu_pct, o.machine_cpu_pct, bench_late_sends_pct),
        wall_seconds: o.wall.as_secs_f64(),
        ramp: (!o.steps.is_empty()).then(|| Ramp {
            calls_held_at_quality: o
                .steps
                .iter()
                .take_while(|(_, ok)| *ok)
                .last()
                .map_or(0, |(s, _)| s.calls),
            steps: o
                .steps
                .iter()
                .map(|(step, ok)| StepResult {
                    step: step.clone(),
                    ok: *ok,
                })
                .collect(),
        }),
        per_participant: participant_rows(s),
        by_member: roles
            .iter()
            .enumerate()
            .map(|(member, role)| {
                let of = || s.iter().filter(|p| p.member == member);
                MemberSummary {
                    member,
                    role: role.to_string(),
                    freezes: of().map(|p| p.freezes).sum(),
                    frozen_s: of().map(|p| p.frozen.as_secs_f64()).sum(),
                    frames_received: of().map(|p| p.frames_received).sum(),
                    loss_pct: loss_pct(of().map(|p| p.lost).sum(), of().map(|p| p.expected).sum()),
                    layer_switches: of().map(|p| p.layer_switches).sum(),
                    keyframes_by_height: of().fold(Default::default(), |mut all, p| {
                        for (h, n) in &p.keyframes_by_height {
                            *all.entry(*h).or_default() += n;
                        }
                        all
                    }),
                }
            })
            .collect(),
        workers: o.workers.clone(),
    }
}

/// One place of the scenario's calls (participant N of every call).
#[derive(Debug, Clone, Serialize)]
pub struct MemberSummary {
    pub member: usize,
    pub role: String,
    pub freezes: u64,
    pub frozen_s: f64,
    pub frames_received: u64,
    pub loss_pct: f64,
    /// Layer switches it saw, over all calls.
    pub layer_switches: u64,
    /// Video keyframes it received by height in lines, over all calls.
    pub keyframes_by_height: std::collections::BTreeMap<u16, u64>,
}

/// One participant's figures, a row of `participants.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantRow {
    pub call: usize,
    pub member: usize,
    pub join_ms: Option<f64>,
    pub first_frame_ms: Option<f64>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub audio_packets_sent: u64,
    pub audio_packets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub loss_pct: f64,
    pub jitter_ms: Option<f64>,
    pub freezes: u64,
    pub frozen_s: f64,
    pub layer_switches: u64,
    pub e2e_latency_ms: Percentiles,
}

/// Packets lost over packets expected, percent (0 when none expected).
fn loss_pct(lost: u64, expected: u64) -> f64 {
    100.0 * crate::compare::ratio(lost as f64, expected as f64)
}

/// A participant's mean audio jitter, milliseconds (`None` without audio).
fn jitter_ms(p: &Stats) -> Option<f64> {
    (p.jitter_n > 0).then(|| 1000.0 * p.jitter_sum / p.jitter_n as f64)
}

/// A duration in milliseconds.
fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

/// Every participant's figures (`participants.json`), in call order.
fn participant_rows(merged: &[Stats]) -> Vec<ParticipantRow> {
    merged
        .iter()
        .map(|p| ParticipantRow {
            call: p.call,
            member: p.member,
            join_ms: ms(p.join),
            first_frame_ms: ms(p.first_frame),
            frames_sent: p.frames_sent,
            frames_received: p.frames_received,
            audio_packets_sent: p.audio_packets_sent,
            audio_packets_received: p.audio_packets_received,
            bytes_sent: p.bytes_sent,
            bytes_received: p.bytes_received,
            loss_pct: loss_pct(p.lost, p.expected),
            jitter_ms: jitter_ms(p),
            freezes: p.freezes,
            frozen_s: p.frozen.as_secs_f64(),
            layer_switches: p.layer_switches,
            e2e_latency_ms: Percentiles::of(p.latencies_ms.iter().map(|v| f64::from(*v)).collect()),
        })
        .collect()
}

/// One entry per participant: a participant's connections (Janus gives
/// each a publishing and a receiving one) merged.
fn participants(stats: &[Stats]) -> Vec<Stats> {
    let mut by: std::collections::BTreeMap<(usize, usize), Stats> = Default::default();
    for s in stats {
        match by.entry((s.call, s.member)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(s.clone());
            }
            std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().merge(s.clone()),
        }
    }
    by.into_values().collect()
}

/// The report as a Markdown table.
pub fn markdown(r: &Report) -> String {
    let p = |x: &Percentiles| format!("{:.0} / {:.0} / {:.0}", x.p50, x.p95, x.p99);
    let rows = [
        ("target", r.target.clone()),
        ("calls held", format!("{} of {}", r.calls_held, r.calls)),
        ("participants", r.participants.to_string()),
        ("join failures", r.join_errors.len().to_string()),
        ("join ms (p50 / p95 / p99)", p(&r.join_ms)),
        ("of which answer ms (p50 / p95 / p99)", p(&r.answer_ms)),
        (
            "of which to ICE connected ms (p50 / p95 / p99)",
            p(&r.ice_ms),
        ),
        ("first frame ms (p50 / p95 / p99)", p(&r.first_frame_ms)),
        (
            "end-to-end latency ms (p50 / p95 / p99)",
            p(&r.e2e_latency_ms),
        ),
        ("loss", format!("{:.2}%", r.loss_pct)),
        (
            "audio jitter ms (p50 / p95 / p99)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                r.jitter_ms.p50, r.jitter_ms.p95, r.jitter_ms.p99
            ),
        ),
        (
            "freezes (> 500 ms; time frozen)",
            format!("{}; {:.1} s", r.freezes, r.frozen_s),
        ),
        (
            "layer switches per participant (p50 / p95 / p99; all)",
            format!("{}; {}", p(&r.layer_switches), r.layer_switches_total),
        ),
        (
            "video frames sent / received",
            format!("{} / {}", r.frames_sent, r.frames_received),
        ),
        (
            "media bytes sent / received",
            format!("{} / {}", r.bytes_sent, r.bytes_received),
        ),
        (
            "server CPU seconds",
            if r.server_measured {
                format!("{:.2}", r.server_cpu_seconds)
            } else {
                "not measured (an external server without target.pid)".into()
            },
        ),
        (
            "server RSS",
            format!("{:.1} MiB", r.server_rss_bytes as f64 / 1048576.0),
        ),
        (
            "packets forwarded",
            format!(
                "{:.0} ({})",
                r.packets_forwarded,
                if r.packets_forwarded_source == "server" {
                    "the server's count"
                } else {
                    "received by the participants"
                }
            ),
        ),
        (
            "packets per server CPU second",
            format!("{:.0}", r.packets_per_server_cpu_second),
        ),
        (
            "packets received per server CPU second",
            format!("{:.0}", r.received_per_server_cpu_second),
        ),
        (
            "media packets received per server CPU second",
            format!("{:.0}", r.media_packets_per_server_cpu_second),
        ),
        (
            "datagrams dropped at the server's sockets (buffers full)",
            r.server_receive_dropped
                .map_or("not counted".into(), |d| format!("{d:.0}")),
        ),
        (
            "load generator CPU",
            format!(
                "{:.1}% ({:.1} CPU s over the hold, {:.1} over the run){}",
                r.bench_cpu_pct,
                r.bench_cpu_seconds,
                r.bench_cpu_seconds_run,
                match (r.bench_saturated, r.machine_cpu_pct) {
                    (false, _) => String::new(),
                    (true, Some(m)) if r.bench_cpu_pct <= GENERATOR_FULL_PCT => format!(
                        " (saturated: server and generator used {m:.0}% of the machine \
                         over the hold; figures are a lower bound)"
                    ),
                    (true, _) => " (saturated: figures are a lower bound)".into(),
                }
            ),
        ),
        (
            "load generator's media sends late",
            format!(
                "{:.2}% over {} ms (the latest {:.0} ms behind)",
                r.bench_late_sends_pct,
                LATE_SEND.as_millis(),
                r.bench_max_send_lag_ms
            ),
        ),
    ];
    let mut out = format!("| {} | |\n| --- | --- |\n", r.scenario);
    for (k, v) in rows {
        out += &format!("| {k} | {v} |\n");
    }
    if let Some(w) = &r.workers {
        out += &format!(
            "| transcoder workers | {}: {:.2} CPU s over the hold ({:.2} cores), {:.1} MiB; \
             {:.0} sessions opened, {:.0} frames in, {:.0} out, {:.0} dropped |\n",
            w.count,
            w.cpu_seconds,
            w.cpu_cores,
            w.rss_bytes as f64 / 1048576.0,
            w.counts.sessions_opened,
            w.counts.frames_in,
            w.counts.frames_out,
            w.counts.frames_dropped
        );
    }
    if r.by_member.len() > 1 {
        out += "\n| participant | freezes (time frozen) | video frames received | loss | layer switches | keyframes by height |\n| --- | --- | --- | --- | --- | --- |\n";
        for m in &r.by_member {
            let heights: Vec<String> = m
                .keyframes_by_height
                .iter()
                .rev()
                .map(|(h, n)| format!("{h}p: {n}"))
                .collect();
            out += &format!(
                "| {} ({}) | {} ({:.1} s) | {} | {:.2}% | {} | {} |\n",
                m.member,
                m.role,
                m.freezes,
                m.frozen_s,
                m.frames_received,
                m.loss_pct,
                m.layer_switches,
                heights.join(", ")
            );
        }
    }
    if let Some(ramp) = &r.ramp {
        out += &format!(
            "\nRamp: {} calls held at quality.\n\n| calls | connected | loss | p99 latency ms | freezes | quality |\n| --- | --- | --- | --- | --- | --- |\n",
            ramp.calls_held_at_quality
        );
        for s in &ramp.steps {
            out += &format!(
                "| {} | {} | {:.2}% | {:.0} | {} | {} |\n",
                s.step.calls,
                s.step.connected,
                s.step.loss_pct,
                s.step.p99_latency_ms,
                s.step.freezes,
                if s.ok { "held" } else { "failed" }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.n), (50.0, 95.0, 99.0, 100));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }

    /// The 2,000-call audio run on two cores: the generator used 48% of
    /// them and the server the rest; that is a full machine, not headroom.
    #[test]
    fn a_generator_starved_by_the_server_beside_it_counts_as_saturated() {
        assert!(!saturated(48.0, Some(60.0), 0.0));
        assert!(saturated(48.0, Some(100.5), 0.0));
        assert!(saturated(85.0, None, 0.0));
        assert!(!saturated(48.0, None, 0.5));
        assert!(saturated(48.0, None, 1.5));
    }
}
