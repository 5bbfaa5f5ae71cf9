//! balie-bench: load tests of many concurrent small counter calls.
//!
//! `check` reads a scenario; `run` runs it against a server the bench starts
//! (balie-sfu or Janus) and writes a report; `compare` runs it against
//! several, one after the other, and sets them side by side
//! (ARCHITECTURE.md, "Load tests"; docs/bench.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod compare;
mod impair;
mod janus;
mod media;
mod participant;
mod plot;
mod report;
mod run;
mod scenario;
mod site;
mod workers;

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
    /// write report.json, participants.json and report.md into the output
    /// folder.
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
        /// The balie-transcoder binary, for `target.offload_workers`
        /// (default: next to balie-bench).
        #[arg(long)]
        transcoder: Option<PathBuf>,
    },
    /// Run one scenario against each target in turn (each started by the
    /// bench in a network namespace of its own, with the scenario's
    /// threads), and write compare.json and a side-by-side table.
    Compare {
        /// The scenario file (its target.kind is ignored).
        #[arg(long)]
        scenario: PathBuf,
        /// Comma-separated: balie, janus.
        #[arg(long, default_value = "balie,janus")]
        targets: String,
        /// Where the reports go (one folder per target) and compare.json.
        #[arg(long, default_value = "bench-compare")]
        out: PathBuf,
        /// The balie-sfu binary to start (default: next to balie-bench).
        #[arg(long)]
        sfu: Option<PathBuf>,
        /// The balie-transcoder binary, for `target.offload_workers`
        /// (default: next to balie-bench).
        #[arg(long)]
        transcoder: Option<PathBuf>,
        /// Run the targets in turn this many times (balie, janus, balie,
        /// janus, ...) and pool each target's figures: on a noisy machine one
        /// run's CPU seconds spread by 10-20%.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run {
            scenario,
            out,
            sfu,
            transcoder,
        } => done(run(&scenario, &out, &Binaries::new(sfu, transcoder))),
        Command::Compare {
            scenario,
            targets,
            out,
            sfu,
            transcoder,
            rounds,
        } => done(compare(
            &scenario,
            &targets,
            &out,
            &Binaries::new(sfu, transcoder),
            rounds as usize,
        )),
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

fn done(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balie-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(scenario: &std::path::Path, out: &std::path::Path, bins: &Binaries) -> Result<(), String> {
    let s = load(scenario)?;
    print!("{}", plan(&s));
    // Janus needs a namespace (it sends no media over loopback); balie
    // runs on loopback.
    let r = if let Some(url) = &s.target.url {
        let secret = std::env::var(&s.target.secret_env).map_err(|_| {
            format!(
                "target.url: the server's HS256 token secret goes in the environment variable {} (target.secret_env)",
                s.target.secret_env
            )
        })?;
        let mut target = run::BalieTarget::external(url, secret, s.target.pid)?;
        report_into(&s, &mut target, out)?
    } else {
        let site = match s.target.kind {
            scenario::TargetKind::Balie => site::Site::loopback(),
            scenario::TargetKind::Janus => site::Site::netns(0)?,
        };
        execute(&s, s.target.kind, site, bins, out)?
    };
    print!("{}", report::markdown(&r));
    Ok(())
}

fn compare(
    scenario: &std::path::Path,
    targets: &str,
    out: &std::path::Path,
    bins: &Binaries,
    rounds: usize,
) -> Result<(), String> {
    let s = load(scenario)?;
    if s.target.url.is_some() {
        return Err(format!(
            "{}: target.url: compare starts each target itself; drop target.url",
            scenario.display()
        ));
    }
    let kinds = targets
        .split(',')
        .map(|t| match t.trim() {
            "balie" => Ok(scenario::TargetKind::Balie),
            "janus" => Ok(scenario::TargetKind::Janus),
            other => Err(format!(
                "--targets: unknown target {other:?} (balie, janus)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if kinds.is_empty() {
        return Err("--targets: name at least one target".into());
    }
    print!("{}", plan(&s));
    let mut reports = Vec::new();
    for round in 0..rounds {
        for (i, &kind) in kinds.iter().enumerate() {
            eprintln!(
                "== {} (round {} of {rounds})",
                compare::name(kind),
                round + 1
            );
            // Each target in a namespace of its own: the same network path.
            let site = site::Site::netns(i as u8 + 1)?;
            // One round: DIR/<target>; more: DIR/round-N/<target>.
            let dir = if rounds == 1 {
                out.join(compare::name(kind))
            } else {
                out.join(format!("round-{}", round + 1))
                    .join(compare::name(kind))
            };
            reports.push(execute(&s, kind, site, bins, &dir)?);
        }
    }
    let c = compare::Compare::new(&s.name, reports, kinds.len());
    write(
        &out.join("compare.json"),
        &serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?,
    )?;
    let md = c.markdown();
    write(&out.join("compare.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// A scenario, for `run` and `compare`.
fn load(path: &std::path::Path) -> Result<Scenario, String> {
    Scenario::load(path).map_err(|e| e.to_string())
}

/// The binaries the bench starts: given, or next to balie-bench.
struct Binaries {
    sfu: Option<PathBuf>,
    transcoder: Option<PathBuf>,
}

impl Binaries {
    fn new(sfu: Option<PathBuf>, transcoder: Option<PathBuf>) -> Binaries {
        Binaries { sfu, transcoder }
    }

    fn sfu(&self) -> Result<PathBuf, String> {
        beside(&self.sfu, "balie-sfu")
    }

    fn transcoder(&self) -> Result<PathBuf, String> {
        beside(&self.transcoder, "balie-transcoder")
    }
}

/// `given`, or the binary `name` next to balie-bench.
fn beside(given: &Option<PathBuf>, name: &str) -> Result<PathBuf, String> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name(name)),
    }
}

fn write(path: &std::path::Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Start the target of `kind` in `site`, run `s` against it, and write its
/// report and plots into `out`.
fn execute(
    s: &Scenario,
    kind: scenario::TargetKind,
    site: site::Site,
    bins: &Binaries,
    out: &std::path::Path,
) -> Result<report::Report, String> {
    let threads = s.target.threads;
    let mut target: Box<dyn run::Target> = match kind {
        scenario::TargetKind::Balie => {
            let n = s.target.offload_workers;
            let transcoder = if n > 0 {
                Some(bins.transcoder()?)
            } else {
                None
            };
            let offload = transcoder.as_deref().map(|t| (t, n));
            Box::new(run::BalieTarget::start(
                &bins.sfu()?,
                threads,
                site,
                offload,
            )?)
        }
        scenario::TargetKind::Janus => Box::new(run::JanusTarget::start(threads, site)?),
    };
    report_into(s, target.as_mut(), out)
}

/// Run `s` against `target` and write its report and plots into `out`.
fn report_into(
    s: &Scenario,
    target: &mut dyn run::Target,
    out: &std::path::Path,
) -> Result<report::Report, String> {
    let outcome = run::run(s, target)?;
    let roles: Vec<&str> = s.participants.iter().map(|p| p.role.as_str()).collect();
    let mut r = report::build(&s.name, target.name(), &roles, &outcome);
    r.server_measured = target.pid().is_some();
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write(
        &out.join("report.json"),
        &serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?,
    )?;
    write(
        &out.join("participants.json"),
        &serde_json::to_string_pretty(&r.per_participant).map_err(|e| e.to_string())?,
    )?;
    write_plots(out, &outcome)?;
    write(&out.join("report.md"), &report::markdown(&r))?;
    Ok(r)
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
    if s.target.offload_workers > 0 {
        let n = s.target.offload_workers;
        out += &format!(
            "with {n} balie-transcoder worker{} making lower layers of single-layer video\n",
            if n == 1 { "" } else { "s" }
        );
    }
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
