//! Running a scenario against a target the bench starts (balie-sfu, or
//! Janus): join the calls at the scenario's rate through the target's own
//! API (balie: real tokens), drive the participants on worker threads, and
//! gather what they measured and what the server used.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::janus::Janus;
use crate::media::{make_clip, Clip};
use crate::participant::{ClipIndex, Clocks, Dialect, FrameIndex, Participant, Seat, Stats};
use crate::scenario::Scenario;
use crate::site::Site;
use crate::workers::Workers;

/// Seconds of clip each profile loops.
const CLIP_SECONDS: u32 = 4;

/// balie-sfu, started by the bench (or already running: `external`).
pub struct Balie {
    child: Option<Child>,
    pid: Option<u32>,
    pub url: String,
    secret: String,
    dir: Option<PathBuf>,
}

impl Balie {
    /// Start `binary` in `site` with `threads` shards; `extra` goes at the
    /// end of its config (`[offload]` for workers).
    pub fn start(binary: &Path, threads: usize, site: &Site, extra: &str) -> Result<Balie, String> {
        let dir = std::env::temp_dir().join(format!("balie-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let secret = format!("bench-{}-{nanos}", std::process::id());
        let config = dir.join("sfu.toml");
        std::fs::write(
            &config,
            format!(
                "http = \"{ip}:0\"\n[media]\nudp_bind = \"{ip}\"\nshards = {threads}\n\
                 [auth]\nhs256_secret = \"{secret}\"\n[drain]\ntimeout = \"1s\"\n{extra}",
                ip = site.server_ip
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut child = site
            .command(binary)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving on ").nth(1) {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| format!("{} did not start within 20 s", binary.display()))?;
        Ok(Balie {
            pid: Some(child.id()),
            child: Some(child),
            url,
            secret,
            dir: Some(dir),
        })
    }

    /// A balie-sfu someone else runs at `url`, whose tokens take `secret`;
    /// `pid` when it runs on this machine.
    pub fn external(url: &str, secret: String, pid: Option<u32>) -> Balie {
        Balie {
            child: None,
            pid,
            url: url.trim_end_matches('/').to_string(),
            secret,
            dir: None,
        }
    }

    /// A token as the municipality's portal would issue it.
    pub fn token(&self, room: &str, sub: &str, role: &str) -> Result<String, String> {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs()
            + 3600;
        let claims = serde_json::json!({
            "room": room, "sub": sub, "name": sub, "role": role, "loa": "substantieel", "exp": exp,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .map_err(|e| e.to_string())
    }

    /// The server's process id, when known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

impl Drop for Balie {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; index 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// The cores this machine offers the bench (and, on loopback, the server).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// What a run measured, before aggregation.
pub struct Outcome {
    pub stats: Vec<Stats>,
    pub calls: usize,
    pub server_cpu_seconds: f64,
    /// Server and bench CPU over the hold, percent of this machine's cores
    /// (None when the server runs elsewhere).
    pub machine_cpu_pct: Option<f64>,
    pub server_rss_bytes: u64,
    /// The bench's own CPU over the hold: the window of `server_cpu_seconds`.
    pub bench_cpu_seconds: f64,
    /// How long the hold (the window of both CPU figures) lasted.
    pub hold_seconds: f64,
    /// The bench's own CPU over the whole run, joins included.
    pub bench_cpu_seconds_run: f64,
    pub wall: Duration,
    pub join_errors: Vec<String>,
    /// UDP datagrams the server says it sent while the calls were held
    /// (balie's metrics; Janus does not say).
    pub packets_sent: Option<f64>,
    /// UDP datagrams the participants received from the server meanwhile.
    pub packets_received: f64,
    /// Datagrams the kernel dropped at the server's sockets over the whole
    /// run, joins included (balie's metrics).
    pub server_receive_dropped: Option<f64>,
    /// Media RTP packets among them (padding and empty packets not
    /// counted).
    pub media_packets_received: f64,
    /// Ramp mode: each step and whether its quality held.
    pub steps: Vec<(crate::report::Step, bool)>,
    /// The run over time, once a second.
    pub timeline: Vec<Sample>,
    /// The transcoder workers, when the bench started some.
    pub workers: Option<crate::workers::WorkersReport>,
}

/// Sum of a Prometheus metric's series whose line starts with `prefix`.
fn metric(http: &reqwest::blocking::Client, url: &str, prefix: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    sum_metric(&text, prefix)
}

/// Sum of the samples in Prometheus `text` whose line starts with `prefix`.
pub fn sum_metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const OUT: &str = "balie_udp_packets_total{direction=\"out\"";
const DROPPED: &str = "balie_errors_total{kind=\"receive_dropped\"";

/// What a participant is made from, shared by the calls of a run.
pub struct Shared {
    pub clips: Vec<Arc<Clip>>,
    pub index: ClipIndex,
    pub clocks: Clocks,
    /// Where participants bind (port 0).
    pub bind: SocketAddr,
}

impl Shared {
    /// Participant `i` of call `call`; `salt` tells its connections apart.
    pub fn seat<'a>(&self, scenario: &'a Scenario, call: usize, i: usize, salt: u64) -> Seat<'a> {
        Seat {
            spec: &scenario.participants[i],
            clip: self.clips[i].clone(),
            index: self.index.clone(),
            clocks: self.clocks.clone(),
            seed: (call * 16 + i) as u64 ^ salt,
            bind: self.bind,
            call,
            member: i,
        }
    }
}

/// A server the bench runs calls against.
pub trait Target {
    /// Its name in reports.
    fn name(&self) -> &'static str;
    /// Its process, for CPU and memory.
    fn pid(&self) -> Option<u32>;
    /// Where participants bind to reach it.
    fn client_ip(&self) -> IpAddr;
    /// Join call number `call`: each connection, once answered, goes to
    /// `hand`; returns what failed.
    fn join(
        &mut self,
        call: usize,
        scenario: &Scenario,
        shared: &Shared,
        hand: &mut dyn FnMut(Participant),
    ) -> Vec<String>;
    /// UDP datagrams the server says it has sent so far, when it says.
    fn packets_out(&self) -> Option<f64>;
    /// Datagrams the kernel dropped at the server's sockets so far (their
    /// receive buffers full), when the server says.
    fn receive_dropped(&self) -> Option<f64> {
        None
    }
    /// balie-transcoder workers beside the server, when the bench started
    /// some (`target.offload_workers`).
    fn workers(&self) -> Option<&Workers> {
        None
    }
}

/// balie-sfu, joined through `POST /v1/rooms/{room}/sessions` with tokens.
pub struct BalieTarget {
    // Fields drop in order: the server goes before its workers, and both
    // before their namespace.
    server: Balie,
    workers: Option<Workers>,
    http: reqwest::blocking::Client,
    site: Site,
}

impl BalieTarget {
    /// Start `binary` with `threads` shards in `site`, and with `offload` =
    /// (the balie-transcoder binary, how many, at least 1) workers beside it.
    pub fn start(
        binary: &Path,
        threads: usize,
        site: Site,
        offload: Option<(&Path, usize)>,
    ) -> Result<BalieTarget, String> {
        let workers = offload
            .map(|(transcoder, n)| Workers::start(transcoder, n, &site))
            .transpose()?;
        let extra = workers.as_ref().map_or("", |w| w.config.as_str());
        let target = BalieTarget {
            server: Balie::start(binary, threads, &site, extra)?,
            workers,
            http: reqwest::blocking::Client::new(),
            site,
        };
        if let Some(w) = &target.workers {
            // Every shard connects to every worker before the calls start.
            let want = (w.len() * threads) as f64;
            let start = Instant::now();
            while metric(&target.http, &target.server.url, "balie_offload_workers_up") < want {
                if start.elapsed() > Duration::from_secs(20) {
                    return Err(format!(
                        "balie-sfu did not connect to its {} transcoder workers within 20 s",
                        w.len()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(target)
    }

    /// A balie-sfu already running at `url` (the participants bind to the
    /// address this machine reaches it from).
    pub fn external(url: &str, secret: String, pid: Option<u32>) -> Result<BalieTarget, String> {
        Ok(BalieTarget {
            server: Balie::external(url, secret, pid),
            workers: None,
            http: reqwest::blocking::Client::new(),
            site: Site::towards(url)?,
        })
    }
}

impl Target for BalieTarget {
    fn name(&self) -> &'static str {
        "balie-sfu"
    }

    fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    fn client_ip(&self) -> IpAddr {
        self.site.client_ip
    }

    fn join(
        &mut self,
        call: usize,
        scenario: &Scenario,
        shared: &Shared,
        hand: &mut dyn FnMut(Participant),
    ) -> Vec<String> {
        let room = format!("bench-{call}");
        let mut errors = Vec::new();
        for (i, spec) in scenario.participants.iter().enumerate() {
            let made = Participant::new(
                shared.seat(scenario, call, i, 0),
                Dialect::Balie,
                Instant::now(),
            );
            let (mut p, offer) = match made {
                Ok(m) => m,
                Err(e) => {
                    errors.push(format!("a participant's socket: {e}"));
                    continue;
                }
            };
            let answer = self
                .server
                .token(&room, &format!("p{call}-{i}"), spec.role.as_str())
                .and_then(|token| {
                    self.http
                        .post(format!("{}/v1/rooms/{room}/sessions", self.server.url))
                        .bearer_auth(token)
                        .header("content-type", "application/sdp")
                        .body(offer)
                        .send()
                        .and_then(|r| r.error_for_status())
                        .and_then(|r| r.text())
                        .map_err(|e| e.to_string())
                });
            match answer.and_then(|a| p.accept_answer(&a)) {
                Ok(()) => hand(p),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    fn packets_out(&self) -> Option<f64> {
        Some(metric(&self.http, &self.server.url, OUT))
    }

    fn receive_dropped(&self) -> Option<f64> {
        Some(metric(&self.http, &self.server.url, DROPPED))
    }

    fn workers(&self) -> Option<&Workers> {
        self.workers.as_ref()
    }
}

/// Janus' VideoRoom: a room per call; each participant publishes on one
/// connection and receives the others on a second one.
pub struct JanusTarget {
    janus: Janus,
    site: Site,
}

impl JanusTarget {
    pub fn start(threads: usize, site: Site) -> Result<JanusTarget, String> {
        Ok(JanusTarget {
            janus: Janus::start(&site, threads)?,
            site,
        })
    }

    /// One call, or the first thing that failed.
    fn join_call(
        &mut self,
        call: usize,
        scenario: &Scenario,
        shared: &Shared,
        hand: &mut dyn FnMut(Participant),
    ) -> Result<(), String> {
        let room = call as u64 + 1;
        self.janus.create_room(room, scenario.participants.len())?;
        // Publish: each participant's offer, Janus' answer.
        let mut members = Vec::new();
        for (i, spec) in scenario.participants.iter().enumerate() {
            let mut session = self.janus.session()?;
            let start = Instant::now();
            if !spec.media.publishes() {
                members.push((session, None, start));
                continue;
            }
            let handle = session.attach()?;
            let (mut p, offer) =
                Participant::new(shared.seat(scenario, call, i, 0), Dialect::Janus, start)
                    .map_err(|e| format!("a participant's socket: {e}"))?;
            let (data, jsep) = session.request(
                handle,
                serde_json::json!({
                    "request": "joinandconfigure", "room": room, "ptype": "publisher",
                    "display": format!("p{call}-{i}"),
                }),
                Some(serde_json::json!({"type": "offer", "sdp": offer, "trickle": false})),
            )?;
            let feed = data["id"]
                .as_u64()
                .ok_or_else(|| format!("janus joined without an id: {data}"))?;
            let answer = jsep
                .and_then(|j| j["sdp"].as_str().map(String::from))
                .ok_or("janus joined without an answer")?;
            p.accept_answer(&answer)?;
            p.id = Some(feed.to_string());
            hand(p);
            members.push((session, Some((handle, feed)), start));
        }
        // Subscribing before a publisher's `webrtcup` is refused (428).
        for (session, publisher, _) in &mut members {
            if let Some((handle, _)) = publisher {
                let h = *handle;
                session.wait(Duration::from_secs(10), |e| {
                    e["janus"] == "webrtcup" && e["sender"].as_u64() == Some(h)
                })?;
            }
        }
        let feeds: Vec<(usize, u64)> = members
            .iter()
            .enumerate()
            .filter_map(|(i, (_, p, _))| p.map(|(_, feed)| (i, feed)))
            .collect();
        for (i, (session, _, start)) in members.iter_mut().enumerate() {
            let streams: Vec<serde_json::Value> = feeds
                .iter()
                .filter(|(j, _)| *j != i)
                .map(|(_, feed)| serde_json::json!({"feed": feed}))
                .collect();
            if streams.is_empty() {
                continue;
            }
            let handle = session.attach()?;
            let (data, jsep) = session.request(
                handle,
                serde_json::json!({
                    "request": "join", "room": room, "ptype": "subscriber", "streams": streams,
                }),
                None,
            )?;
            let offer = jsep
                .and_then(|j| j["sdp"].as_str().map(String::from))
                .ok_or("janus attached a subscriber without an offer")?;
            let (p, answer) = Participant::answering(
                shared.seat(scenario, call, i, 0xabc),
                *start,
                &offer,
                &crate::janus::tracks(&data["streams"]),
            )?;
            session.request(
                handle,
                serde_json::json!({"request": "start"}),
                Some(serde_json::json!({"type": "answer", "sdp": answer})),
            )?;
            hand(p);
        }
        Ok(())
    }
}

impl Target for JanusTarget {
    fn name(&self) -> &'static str {
        "janus"
    }

    fn pid(&self) -> Option<u32> {
        Some(self.janus.pid())
    }

    fn client_ip(&self) -> IpAddr {
        self.site.client_ip
    }

    fn join(
        &mut self,
        call: usize,
        scenario: &Scenario,
        shared: &Shared,
        hand: &mut dyn FnMut(Participant),
    ) -> Vec<String> {
        match self.join_call(call, scenario, shared, hand) {
            Ok(()) => Vec::new(),
            Err(e) => vec![e],
        }
    }

    fn packets_out(&self) -> Option<f64> {
        None
    }
}

/// Run `scenario` against `target`.
pub fn run(scenario: &Scenario, target: &mut dyn Target) -> Result<Outcome, String> {
    let mut clips: Vec<Arc<Clip>> = Vec::new();
    let mut index = FrameIndex::default();
    for p in &scenario.participants {
        let clip = make_clip(p.media, p.audio_frame, CLIP_SECONDS).map_err(|e| e.to_string())?;
        index.add(&clip);
        clips.push(Arc::new(clip));
    }
    let index: ClipIndex = Arc::new(index);
    let clocks: Clocks = Arc::new(Mutex::new(Default::default()));
    let shared = Shared {
        clips,
        index,
        clocks,
        bind: SocketAddr::new(target.client_ip(), 0),
    };
    let workers = cores();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel::<Participant>();
        let stop = stop.clone();
        senders.push(tx);
        let progress = progress.clone();
        handles.push(std::thread::spawn(move || drive(rx, &stop, &progress)));
    }
    let bench0 = cpu_seconds(Some(std::process::id()));
    let t0 = Instant::now();
    let mut join_errors = Vec::new();
    let gap = Duration::from_secs_f64(1.0 / scenario.calls.join_rate);
    let mut n = 0;
    let pid = target.pid();
    let mut line = Line::new(&progress, pid, scenario.calls.count);
    let (mut goal, step) = match &scenario.ramp {
        Some(r) => (r.start, r.step),
        None => (scenario.calls.count, 0),
    };
    let mut started = 0;
    let mut steps = Vec::new();
    let mut ramp_cpu = None;
    loop {
        let step_t0 = Instant::now();
        let first = started;
        while started < goal {
            let call = started;
            let due = step_t0 + gap * (call - first) as u32;
            line.tick(call);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let errors = target.join(call, scenario, &shared, &mut |p| {
                let _ = senders[n % workers].send(p);
                n += 1;
            });
            join_errors.extend(errors);
            started += 1;
        }
        let Some(r) = &scenario.ramp else { break };
        // Judge the step over `every`, once its calls are up.
        let (used, before, after) = hold(&*target, &progress, &mut line, started, r.every);
        ramp_cpu = Some(used);
        let q = &scenario.quality;
        let lost = after.lost.saturating_sub(before.lost);
        let expected = after.expected.saturating_sub(before.expected).max(1);
        let result = crate::report::Step {
            calls: started,
            connected: after.connected as usize,
            loss_pct: 100.0 * lost as f64 / expected as f64,
            p99_latency_ms: crate::report::Percentiles::of(progress.take_latencies()).p99,
            freezes: after.freezes.saturating_sub(before.freezes),
        };
        let ok = result.connected >= n
            && join_errors.is_empty()
            && result.loss_pct <= q.max_loss_pct
            && result.p99_latency_ms <= q.max_p99_latency_ms
            && result.freezes <= q.max_freezes;
        steps.push((result, ok));
        if !ok || started >= scenario.calls.count {
            break;
        }
        goal = (started + step).min(scenario.calls.count);
    }
    let calls = started;
    // CPU and packets are counted over the hold, once all calls are up (in
    // ramp mode: over the last step).
    let used = match ramp_cpu {
        Some(m) => m,
        None => {
            hold(
                &*target,
                &progress,
                &mut line,
                calls,
                scenario.calls.duration,
            )
            .0
        }
    };
    line.done();
    let timeline = std::mem::take(&mut line.samples);
    let server_rss_bytes = rss_bytes(pid);
    let server_receive_dropped = target.receive_dropped();
    let workers = target.workers().map(|w| crate::workers::WorkersReport {
        count: w.len(),
        cpu_seconds: used.workers_cpu,
        cpu_cores: used.workers_cpu / used.seconds.max(1e-9),
        rss_bytes: w.pids().into_iter().map(|p| rss_bytes(Some(p))).sum(),
        counts: w.counts(),
    });
    stop.store(true, Ordering::Relaxed);
    drop(senders);
    let mut stats = Vec::new();
    for h in handles {
        stats.extend(h.join().map_err(|_| "a worker thread panicked")?);
    }
    Ok(Outcome {
        stats,
        calls,
        steps,
        timeline,
        server_cpu_seconds: used.cpu,
        // Server and generator together over the hold, when both run here.
        machine_cpu_pct: pid.map(|_| {
            100.0 * (used.cpu + used.bench_cpu) / (used.seconds * cores() as f64).max(1e-9)
        }),
        server_rss_bytes,
        bench_cpu_seconds: used.bench_cpu,
        hold_seconds: used.seconds,
        bench_cpu_seconds_run: cpu_seconds(Some(std::process::id())) - bench0,
        wall: t0.elapsed(),
        join_errors,
        packets_sent: used.sent,
        server_receive_dropped,
        packets_received: used.received,
        media_packets_received: used.media,
        workers,
    })
}

/// What the server used over the hold (or the last ramp step).
struct Used {
    cpu: f64,
    /// The transcoder workers' CPU over the same window.
    workers_cpu: f64,
    /// The bench's own CPU over the same window.
    bench_cpu: f64,
    /// How long the window was.
    seconds: f64,
    /// Datagrams it says it sent, when it says.
    sent: Option<f64>,
    /// Datagrams the participants received from it.
    received: f64,
    /// Media RTP packets among them.
    media: f64,
}

/// Hold `calls` for `window` with the progress line going: what the server
/// used meanwhile, and the progress counters at both ends.
fn hold(
    target: &dyn Target,
    progress: &Progress,
    line: &mut Line,
    calls: usize,
    window: Duration,
) -> (Used, Snapshot, Snapshot) {
    let pid = target.pid();
    let before = progress.snapshot();
    let cpu0 = cpu_seconds(pid);
    let worker_pids = target.workers().map(Workers::pids).unwrap_or_default();
    let workers_cpu = || -> f64 { worker_pids.iter().map(|p| cpu_seconds(Some(*p))).sum() };
    let workers0 = workers_cpu();
    let bench0 = cpu_seconds(Some(std::process::id()));
    let out0 = target.packets_out();
    let t0 = Instant::now();
    let end = t0 + window;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(Duration::from_millis(250)));
        line.tick(calls);
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let workers_cpu = workers_cpu() - workers0;
    let bench_cpu = cpu_seconds(Some(std::process::id())) - bench0;
    let seconds = t0.elapsed().as_secs_f64();
    let sent = match (target.packets_out(), out0) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    // The workers publish their counts every 500 ms.
    std::thread::sleep(Duration::from_millis(600));
    let after = progress.snapshot();
    let used = Used {
        cpu,
        workers_cpu,
        bench_cpu,
        seconds,
        sent,
        received: after.datagrams.saturating_sub(before.datagrams) as f64,
        media: after.media_packets.saturating_sub(before.media_packets) as f64,
    };
    (used, before, after)
}

/// Totals the workers publish for the live progress line.
#[derive(Default)]
struct Progress {
    connected: AtomicU64,
    lost: AtomicU64,
    expected: AtomicU64,
    freezes: AtomicU64,
    datagrams: AtomicU64,
    media_packets: AtomicU64,
    /// End-to-end latencies (ms) not yet taken by a ramp step.
    latencies: Mutex<Vec<f64>>,
}

/// The progress counters at one moment.
struct Snapshot {
    connected: u64,
    lost: u64,
    expected: u64,
    freezes: u64,
    datagrams: u64,
    media_packets: u64,
}

impl Progress {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            expected: self.expected.load(Ordering::Relaxed),
            freezes: self.freezes.load(Ordering::Relaxed),
            datagrams: self.datagrams.load(Ordering::Relaxed),
            media_packets: self.media_packets.load(Ordering::Relaxed),
        }
    }

    fn take_latencies(&self) -> Vec<f64> {
        self.latencies
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// The live progress line on stderr, once a second: calls started,
/// participants connected, calls started per second, loss, the server's CPU.
struct Line<'a> {
    progress: &'a Progress,
    pid: Option<u32>,
    calls: usize,
    t0: Instant,
    last: Instant,
    last_started: usize,
    last_cpu: f64,
    last_loss: (u64, u64),
    /// One sample per line written: the run over time, for the plots.
    samples: Vec<Sample>,
}

/// The run at one moment (once a second).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the first call started.
    pub t: f64,
    pub calls: usize,
    pub connected: u64,
    /// The server's CPU over the last second, percent of one core.
    pub server_cpu_pct: f64,
    /// Loss the receivers saw over the last second, percent.
    pub loss_pct: f64,
}

impl<'a> Line<'a> {
    fn new(progress: &'a Progress, pid: Option<u32>, calls: usize) -> Line<'a> {
        Line {
            progress,
            pid,
            calls,
            t0: Instant::now(),
            last: Instant::now(),
            last_started: 0,
            last_cpu: cpu_seconds(pid),
            last_loss: (0, 0),
            samples: Vec::new(),
        }
    }

    fn tick(&mut self, started: usize) {
        let dt = self.last.elapsed().as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let cpu = cpu_seconds(self.pid);
        let lost = self.progress.lost.load(Ordering::Relaxed);
        let expected = self.progress.expected.load(Ordering::Relaxed);
        let window = (
            lost.saturating_sub(self.last_loss.0),
            expected.saturating_sub(self.last_loss.1),
        );
        self.last_loss = (lost, expected);
        let sample = Sample {
            t: self.t0.elapsed().as_secs_f64(),
            calls: started,
            connected: self.progress.connected.load(Ordering::Relaxed),
            server_cpu_pct: 100.0 * (cpu - self.last_cpu) / dt,
            loss_pct: 100.0 * window.0 as f64 / window.1.max(1) as f64,
        };
        self.samples.push(sample);
        eprint!(
            "\rcalls {:>5}/{} | connections up {:>6} | calls/s {:>5.0} | loss {:>5.2}% | server CPU {:>4.0}%   ",
            started,
            self.calls,
            sample.connected,
            (started - self.last_started) as f64 / dt,
            sample.loss_pct,
            sample.server_cpu_pct,
        );
        self.last = Instant::now();
        self.last_started = started;
        self.last_cpu = cpu;
    }

    fn done(&self) {
        eprintln!();
    }
}

/// A worker: drives its participants until told to stop, then returns what
/// each measured.
fn drive(rx: mpsc::Receiver<Participant>, stop: &AtomicBool, progress: &Progress) -> Vec<Stats> {
    let mut ps: Vec<Participant> = Vec::new();
    // Participants are driven when a datagram arrives (epoll through mio)
    // or when they are due (str0m's timers, the next media frame), not all
    // of them every round: thousands per thread stay cheap.
    let mut poll = mio::Poll::new();
    let mut events = mio::Events::with_capacity(1024);
    let mut due: Vec<Instant> = Vec::new();
    let mut registered: Vec<bool> = Vec::new();
    let mut reported = Instant::now();
    // What this worker last added to the shared progress counters, and how
    // many latencies of each participant it passed on.
    let mut mine = [0u64; 6];
    let mut passed: Vec<usize> = Vec::new();
    loop {
        if reported.elapsed() >= Duration::from_millis(500) {
            reported = Instant::now();
            let now = [
                ps.iter().filter(|p| p.stats.join.is_some()).count() as u64,
                ps.iter().map(|p| p.stats.lost).sum(),
                ps.iter().map(|p| p.stats.expected).sum(),
                ps.iter().map(|p| p.stats.freezes).sum(),
                ps.iter().map(|p| p.stats.datagrams_received).sum(),
                ps.iter().map(|p| p.stats.media_packets_received).sum(),
            ];
            let counters = [
                &progress.connected,
                &progress.lost,
                &progress.expected,
                &progress.freezes,
                &progress.datagrams,
                &progress.media_packets,
            ];
            for (i, counter) in counters.into_iter().enumerate() {
                counter.fetch_add(now[i].wrapping_sub(mine[i]), Ordering::Relaxed);
            }
            mine = now;
            passed.resize(ps.len(), 0);
            if let Ok(mut all) = progress.latencies.lock() {
                for (p, done) in ps.iter().zip(passed.iter_mut()) {
                    let l = &p.stats.latencies_ms;
                    all.extend(l[*done..].iter().map(|v| f64::from(*v)));
                    *done = l.len();
                }
            }
        }
        while let Ok(mut p) = rx.try_recv() {
            // Unregistered, it is still driven every 5 ms.
            let ok = poll
                .as_ref()
                .is_ok_and(|poll| p.register(poll.registry(), mio::Token(ps.len())).is_ok());
            registered.push(ok);
            due.push(Instant::now());
            ps.push(p);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        // With no participant yet, wait the longest (not spin).
        let next = due
            .iter()
            .min()
            .copied()
            .unwrap_or(now + Duration::from_millis(5));
        let wait = next
            .saturating_duration_since(now)
            .min(Duration::from_millis(5));
        match poll.as_mut() {
            Ok(poll) => {
                let _ = poll.poll(&mut events, Some(wait));
            }
            Err(_) => std::thread::sleep(wait),
        }
        let now = Instant::now();
        for e in events.iter() {
            if let Some(d) = due.get_mut(e.token().0) {
                *d = now;
            }
        }
        for (i, p) in ps.iter_mut().enumerate() {
            if due[i] <= now {
                let next = p.drive(now);
                due[i] = if registered[i] {
                    next
                } else {
                    next.min(now + Duration::from_millis(5))
                };
            }
        }
    }
    ps.iter_mut()
        .map(|p| {
            p.leave();
            std::mem::take(&mut p.stats)
        })
        .collect()
}
