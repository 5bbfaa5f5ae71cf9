//! balie-bench: load tests of many concurrent small counter calls.
//!
//! This first part reads and checks scenarios (`balie-bench check`); the
//! runner, the adapters (balie-sfu, Janus) and the reports follow
//! (ARCHITECTURE.md, "Load tests").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod impair;
mod media;
mod participant;
mod plot;
mod report;
mod run;
mod scenario;

use scenario::Scenario;

#[derive(Parser)]
#[command(name = "balie-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read a scenario, check it, and print what it will load the server
    /// with; encode each participant's media once and print what it sends.
    Check {
        /// The scenario file (TOML; examples in configs/bench/).
        #[arg(long)]
        scenario: PathBuf,
    },
    /// Run a scenario: start the target on loopback, hold the calls, and
    /// write report.json and report.md into the output folder.
    Run {
        /// The scenario file (TOML; examples in configs/bench/).
        #[arg(long)]
        scenario: PathBuf,
        /// Where the report goes.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// The balie-sfu binary to start (default: next to balie-bench).
        #[arg(long)]
        sfu: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { scenario, out, sfu } => match run(&scenario, &out, sfu) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("balie-bench: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { scenario } => match Scenario::load(&scenario) {
            Ok(s) => {
                print!("{}", plan(&s));
                match encoded(&s) {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("balie-bench: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("balie-bench: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(
    scenario: &std::path::Path,
    out: &std::path::Path,
    sfu: Option<PathBuf>,
) -> Result<(), String> {
    let s = Scenario::load(scenario).map_err(|e| e.to_string())?;
    if s.target.kind != scenario::TargetKind::Balie || s.target.url.is_some() {
        return Err(format!(
            "{}: this build runs scenarios against a balie-sfu it starts itself (target.kind = \"balie\", no target.url); the Janus adapter and external targets are not built yet",
            scenario.display()
        ));
    }
    let sfu = match sfu {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("balie-sfu"),
    };
    print!("{}", plan(&s));
    let outcome = run::run_balie(&s, &sfu)?;
    let r = report::build(&s.name, "balie-sfu", s.participants.len(), &outcome);
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let json = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    std::fs::write(out.join("report.json"), json).map_err(|e| format!("{}: {e}", out.display()))?;
    write_plots(out, &outcome)?;
    let md = report::markdown(&r);
    std::fs::write(out.join("report.md"), &md).map_err(|e| format!("{}: {e}", out.display()))?;
    print!("{md}");
    Ok(())
}

/// calls.svg, cpu.svg, loss.svg over time and latency.svg (a CDF).
fn write_plots(out: &std::path::Path, o: &run::Outcome) -> Result<(), String> {
    let series = |f: &dyn Fn(&run::Sample) -> f64| -> Vec<(f64, f64)> {
        o.timeline.iter().map(|s| (s.t, f(s))).collect()
    };
    let latencies: Vec<f64> = o
        .stats
        .iter()
        .flat_map(|p| p.latencies_ms.iter().map(|v| f64::from(*v)))
        .collect();
    let charts = [
        (
            "calls.svg",
            plot::line_chart(
                "Calls started",
                "seconds",
                "calls",
                &series(&|s| s.calls as f64),
            ),
        ),
        (
            "cpu.svg",
            plot::line_chart(
                "Server CPU",
                "seconds",
                "% of one core",
                &series(&|s| s.server_cpu_pct),
            ),
        ),
        (
            "loss.svg",
            plot::line_chart(
                "Loss seen by receivers (per second)",
                "seconds",
                "%",
                &series(&|s| s.loss_pct),
            ),
        ),
        (
            "latency.svg",
            plot::line_chart(
                "End-to-end video frame latency (CDF)",
                "milliseconds",
                "% of frames",
                &plot::cdf(&latencies),
            ),
        ),
    ];
    for (name, svg) in charts {
        let path = out.join(name);
        std::fs::write(&path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Encode each distinct media profile of the scenario (two seconds) and say
/// what it sends.
fn encoded(s: &Scenario) -> Result<String, media::MediaError> {
    let mut out = String::new();
    let mut seen = Vec::new();
    for p in &s.participants {
        if !p.media.publishes() || seen.contains(&(p.media, p.audio_frame)) {
            continue;
        }
        seen.push((p.media, p.audio_frame));
        let t0 = std::time::Instant::now();
        let clip = media::make_clip(p.media, p.audio_frame, 2)?;
        let kbps = |bytes: usize| bytes as f64 * 8.0 / 2.0 / 1000.0;
        let mut parts: Vec<String> = clip
            .layers
            .iter()
            .map(|l| {
                let bytes = l.frames.iter().map(|f| f.data.len()).sum();
                let key: usize = l.keyframes.iter().map(Vec::len).sum();
                format!(
                    "{} VP8 {}x{} {:.0} kbit/s (target {}; keyframes on request {} bytes on average)",
                    l.rid,
                    l.width,
                    l.height,
                    kbps(bytes),
                    l.bitrate / 1000,
                    key / l.keyframes.len().max(1)
                )
            })
            .collect();
        parts.push(format!(
            "Opus {} frames {:.0} kbit/s",
            humantime::format_duration(clip.audio_frame),
            kbps(clip.audio.iter().map(Vec::len).sum())
        ));
        out += &format!(
            "{:?} media, encoded in {:.1} s: {}\n",
            p.media,
            t0.elapsed().as_secs_f64(),
            parts.join(", ")
        )
        .to_lowercase();
    }
    Ok(out)
}

/// What a scenario asks of the server, in a few lines.
fn plan(s: &Scenario) -> String {
    let (sent, forwarded) = s.packet_rates();
    let roles: Vec<String> = s
        .participants
        .iter()
        .map(|p| format!("{} ({:?})", p.role.as_str(), p.media).to_lowercase())
        .collect();
    let mut out = format!(
        "scenario {}: {} calls of {} ({} peer connections) against {:?}\n",
        s.name,
        s.calls.count,
        roles.join(", "),
        s.peer_connections(),
        s.target.kind
    );
    out += &format!(
        "joins at {} calls/s, held {} once up\n",
        s.calls.join_rate,
        humantime::format_duration(s.calls.duration)
    );
    out += &format!(
        "at full load: {sent:.0} packets/s into the server, {forwarded:.0} packets/s forwarded\n"
    );
    if let Some(r) = &s.ramp {
        out += &format!(
            "ramp: from {} calls, {} more every {}, up to {}, while loss <= {}%, p99 latency <= {} ms, freezes <= {}\n",
            r.start,
            r.step,
            humantime::format_duration(r.every),
            s.calls.count,
            s.quality.max_loss_pct,
            s.quality.max_p99_latency_ms,
            s.quality.max_freezes
        );
    }
    out
}
