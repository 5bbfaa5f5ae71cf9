//! `compare`: one scenario's reports against several targets, side by side
//! (`compare.json`, schema in docs/bench.md, and a Markdown table).

use serde::Serialize;

use crate::report::{Percentiles, Report};
use crate::scenario::TargetKind;

/// A target's name in reports and folder names.
pub fn name(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::Balie => "balie-sfu",
        TargetKind::Janus => "janus",
    }
}

/// How a row of the table reads a report.
type Cell = Box<dyn Fn(&Report) -> String>;

/// `compare.json`.
#[derive(Debug, Serialize)]
pub struct Compare {
    pub scenario: String,
    /// The machine both ran on.
    pub machine: Machine,
    /// How many times the targets ran in turn (`--rounds`).
    pub rounds: usize,
    /// Each run's full report, in the order they ran (round by round).
    pub reports: Vec<Report>,
    /// Each run's figures over those of the first target in the same round
    /// (the first is 1.0): above 1 means more for that target.
    pub ratios: Vec<Ratios>,
    /// Each target's runs taken together, in the order of the first round.
    pub pooled: Vec<Pooled>,
}

/// One target's figures over all rounds: sums, and the figure from the sums.
#[derive(Debug, Serialize)]
pub struct Pooled {
    pub target: String,
    pub runs: usize,
    pub server_cpu_seconds: f64,
    pub media_packets_received: f64,
    pub media_packets_per_server_cpu_second: f64,
    /// `media_packets_per_server_cpu_second` over the first target's pooled one.
    pub over_first: f64,
    /// The least and the most of the rounds' own ratios over the first target.
    pub over_first_min: f64,
    pub over_first_max: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
}

/// One target's figures relative to the first target's.
#[derive(Debug, Serialize)]
pub struct Ratios {
    pub target: String,
    /// The round this run belongs to, from 1.
    pub round: usize,
    /// Datagrams the participants received per server CPU second (the same
    /// count for every target).
    pub received_per_server_cpu_second: f64,
    /// Media RTP packets the participants received per server CPU second
    /// (no padding): the figure to compare servers by.
    pub media_packets_per_server_cpu_second: f64,
    pub server_cpu_seconds: f64,
    pub server_rss_bytes: f64,
    pub join_ms_p50: f64,
    pub first_frame_ms_p50: f64,
    pub e2e_latency_ms_p99: f64,
}

/// `a / b`, 0 when `b` is.
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

impl Compare {
    /// `reports` round by round, `per_round` targets in each.
    pub fn new(scenario: &str, reports: Vec<Report>, per_round: usize) -> Compare {
        let per_round = per_round.max(1);
        let ratios: Vec<Ratios> = reports
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let base = &reports[k - k % per_round];
                Ratios {
                    target: r.target.clone(),
                    round: k / per_round + 1,
                    received_per_server_cpu_second: ratio(
                        r.received_per_server_cpu_second,
                        base.received_per_server_cpu_second,
                    ),
                    media_packets_per_server_cpu_second: ratio(
                        r.media_packets_per_server_cpu_second,
                        base.media_packets_per_server_cpu_second,
                    ),
                    server_cpu_seconds: ratio(r.server_cpu_seconds, base.server_cpu_seconds),
                    server_rss_bytes: ratio(
                        r.server_rss_bytes as f64,
                        base.server_rss_bytes as f64,
                    ),
                    join_ms_p50: ratio(r.join_ms.p50, base.join_ms.p50),
                    first_frame_ms_p50: ratio(r.first_frame_ms.p50, base.first_frame_ms.p50),
                    e2e_latency_ms_p99: ratio(r.e2e_latency_ms.p99, base.e2e_latency_ms.p99),
                }
            })
            .collect();
        let pooled = pool(&reports, &ratios, per_round);
        Compare {
            scenario: scenario.into(),
            machine: Machine {
                cores: crate::run::cores(),
                cpu: cpu_model(),
            },
            rounds: reports.len().div_ceil(per_round),
            reports,
            ratios,
            pooled,
        }
    }

    /// The side-by-side table: a row per figure, a column per target.
    pub fn markdown(&self) -> String {
        let p = |x: &Percentiles| format!("{:.0} / {:.0} / {:.0}", x.p50, x.p95, x.p99);
        let rows: Vec<(&str, Cell)> = vec![
            (
                "calls held",
                Box::new(|r: &Report| format!("{} of {}", r.calls_held, r.calls)),
            ),
            (
                "join failures",
                Box::new(|r: &Report| r.join_errors.len().to_string()),
            ),
            (
                "join ms (p50 / p95 / p99)",
                Box::new(move |r| p(&r.join_ms)),
            ),
            (
                "first frame ms (p50 / p95 / p99)",
                Box::new(move |r| p(&r.first_frame_ms)),
            ),
            (
                "end-to-end latency ms (p50 / p95 / p99)",
                Box::new(move |r| p(&r.e2e_latency_ms)),
            ),
            ("loss", Box::new(|r| format!("{:.2}%", r.loss_pct))),
            (
                "audio jitter ms (p50 / p99)",
                Box::new(|r| format!("{:.1} / {:.1}", r.jitter_ms.p50, r.jitter_ms.p99)),
            ),
            (
                "freezes (> 500 ms; time frozen)",
                Box::new(|r| format!("{}; {:.1} s", r.freezes, r.frozen_s)),
            ),
            (
                "layer switches (all)",
                Box::new(|r| r.layer_switches_total.to_string()),
            ),
            (
                "video frames received",
                Box::new(|r| r.frames_received.to_string()),
            ),
            (
                "server CPU seconds (hold)",
                Box::new(|r| format!("{:.2}", r.server_cpu_seconds)),
            ),
            (
                "transcoder workers' CPU seconds (hold)",
                Box::new(|r| {
                    r.workers.as_ref().map_or("no workers".into(), |w| {
                        let s = if w.count == 1 { "" } else { "s" };
                        format!("{:.2} ({} worker{s})", w.cpu_seconds, w.count)
                    })
                }),
            ),
            (
                "server RSS",
                Box::new(|r| format!("{:.1} MiB", r.server_rss_bytes as f64 / 1048576.0)),
            ),
            (
                "datagrams received by participants (hold)",
                Box::new(|r| format!("{:.0}", r.packets_received)),
            ),
            (
                "received per server CPU second",
                Box::new(|r| format!("{:.0}", r.received_per_server_cpu_second)),
            ),
            (
                "media packets received (hold)",
                Box::new(|r| format!("{:.0}", r.media_packets_received)),
            ),
            (
                "media packets per server CPU second",
                Box::new(|r| format!("{:.0}", r.media_packets_per_server_cpu_second)),
            ),
            (
                "load generator CPU",
                Box::new(|r| {
                    format!(
                        "{:.1}%{}",
                        r.bench_cpu_pct,
                        if r.bench_saturated {
                            " (saturated)"
                        } else {
                            ""
                        }
                    )
                }),
            ),
        ];
        let mut out = format!("| {} |", self.scenario);
        for (r, q) in self.reports.iter().zip(&self.ratios) {
            if self.rounds > 1 {
                out += &format!(" {} ({}) |", r.target, q.round);
            } else {
                out += &format!(" {} |", r.target);
            }
        }
        out += "\n| --- |";
        out += &" --- |".repeat(self.reports.len());
        out += "\n";
        for (label, f) in &rows {
            out += &format!("| {label} |");
            for r in &self.reports {
                out += &format!(" {} |", f(r));
            }
            out += "\n";
        }
        if let Some(first) = self.reports.first() {
            out += &format!(
                "| media packets per server CPU second, over {} |",
                first.target
            );
            for r in &self.ratios {
                out += &format!(" {:.2}x |", r.media_packets_per_server_cpu_second);
            }
            out += "\n";
        }
        if self.rounds > 1 {
            out += &format!(
                "\n| pooled over {} rounds | server CPU seconds | media packets received | per server CPU second | over {} (rounds) |\n| --- | --- | --- | --- | --- |\n",
                self.rounds,
                self.pooled.first().map_or("", |p| p.target.as_str())
            );
            for p in &self.pooled {
                out += &format!(
                    "| {} | {:.2} | {:.0} | {:.0} | {:.2}x ({:.2}-{:.2}x) |\n",
                    p.target,
                    p.server_cpu_seconds,
                    p.media_packets_received,
                    p.media_packets_per_server_cpu_second,
                    p.over_first,
                    p.over_first_min,
                    p.over_first_max
                );
            }
        }
        out
    }
}

/// Each target's runs summed, in the order of the first round.
fn pool(reports: &[Report], ratios: &[Ratios], per_round: usize) -> Vec<Pooled> {
    let mut pooled: Vec<Pooled> = (0..per_round.min(reports.len()))
        .map(|j| {
            let runs: Vec<usize> = (j..reports.len()).step_by(per_round).collect();
            let cpu: f64 = runs.iter().map(|&k| reports[k].server_cpu_seconds).sum();
            let media: f64 = runs
                .iter()
                .map(|&k| reports[k].media_packets_received)
                .sum();
            let own = runs
                .iter()
                .map(|&k| ratios[k].media_packets_per_server_cpu_second);
            Pooled {
                target: reports[j].target.clone(),
                runs: runs.len(),
                server_cpu_seconds: cpu,
                media_packets_received: media,
                media_packets_per_server_cpu_second: ratio(media, cpu),
                over_first: 0.0,
                over_first_min: own.clone().fold(f64::INFINITY, f64::min),
                over_first_max: own.fold(0.0, f64::max),
            }
        })
        .collect();
    let first = pooled
        .first()
        .map_or(0.0, |p| p.media_packets_per_server_cpu_second);
    for p in &mut pooled {
        p.over_first = ratio(p.media_packets_per_server_cpu_second, first);
    }
    pooled
}

/// The CPU's model name, from /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "unknown".into(), |m| m.trim().to_string())
}
