//! Scenarios: what a load test runs, read from TOML (examples in
//! `configs/bench/`). Every field is checked when the file is read, so a
//! mistake is reported before any call starts, with the file and the field.
//!
//! ```toml
//! name = "smoke"
//! [target]
//! kind = "balie"            # or "janus"
//! threads = 2               # the server's shards / Janus' event loops
//! # offload_workers = 1            # balie-transcoder workers beside balie-sfu
//! # url = "http://10.0.0.5:8080"   # an external balie (secret from $BALIE_BENCH_SECRET)
//! # pid = 12345                    # its process, if on this machine
//! [calls]
//! count = 10                # concurrent calls
//! join_rate = 20.0          # calls started per second
//! duration = "10s"          # how long all calls are held once up
//! [[participant]]
//! role = "citizen"
//! media = "simulcast"       # audio | simulcast | single | none
//! link = { loss_pct = 1.0, jitter = "20ms", rate_kbps = 800 }
//! [[participant]]
//! role = "official"
//! media = "simulcast"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema.
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// The values parse but make no sense together.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// One load test.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name, used in reports.
    pub name: String,
    /// What the scenario shows, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// The server under test.
    pub target: Target,
    /// How many calls, how fast they join, how long they last.
    pub calls: Calls,
    /// The participants of every call, in join order.
    #[serde(rename = "participant")]
    pub participants: Vec<Participant>,
    /// Ramp mode: add calls until quality fails.
    #[serde(default)]
    pub ramp: Option<Ramp>,
    /// What counts as good enough (ramp mode stops when it is not).
    #[serde(default)]
    pub quality: Quality,
}

/// Which SFU is tested and where it runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The kind of server; it decides how participants join.
    pub kind: TargetKind,
    /// An already running server (`http://host:port`; balie only). Without
    /// it the bench starts the server itself with a generated config.
    #[serde(default)]
    pub url: Option<String>,
    /// With `url`: the environment variable holding the server's HS256
    /// token secret (never the secret itself in a file). Default
    /// `BALIE_BENCH_SECRET`.
    #[serde(default = "default_secret_env")]
    pub secret_env: String,
    /// With `url`: the server's process id when it runs on this machine, so
    /// that its CPU and memory are measured (else they are not).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Worker threads the server gets when the bench starts it (balie's
    /// shards, Janus' event loops). Default 2.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// balie-transcoder workers the bench starts beside the balie-sfu it
    /// starts (each `balie-transcoder serve` with development
    /// certificates, in the same place), named in the SFU's `[offload]`:
    /// single-layer video then gets lower layers for subscribers who need
    /// less. Default 0: no offload.
    #[serde(default)]
    pub offload_workers: usize,
}

/// The most workers a scenario may start.
pub const MAX_OFFLOAD_WORKERS: usize = 16;

fn default_threads() -> usize {
    2
}

fn default_secret_env() -> String {
    "BALIE_BENCH_SECRET".into()
}

/// The servers balie-bench has an adapter for.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// balie-sfu: its own API (`POST /v1/rooms/{room}/sessions`).
    Balie,
    /// Janus 1.1 with the VideoRoom plugin, over its HTTP API.
    Janus,
}

/// The calls of a scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calls {
    /// Concurrent calls (in ramp mode: the most it will try).
    pub count: usize,
    /// Calls started per second.
    pub join_rate: f64,
    /// How long the calls are held once all are up.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

/// A role in a counter call, as the token carries it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Citizen,
    Official,
    Interpreter,
    Observer,
}

impl Role {
    /// The role's name in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Citizen => "citizen",
            Role::Official => "official",
            Role::Interpreter => "interpreter",
            Role::Observer => "observer",
        }
    }
}

/// What a participant sends. Video is VP8 and audio Opus, encoded from a
/// generated clip before the calls start.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    /// Opus only, 20 ms frames (50 packets/s, about 32 kbit/s).
    Audio,
    /// Opus and VP8 simulcast: 320x180 at 150 kbit/s, 640x360 at 500
    /// kbit/s, 1280x720 at 1.5 Mbit/s, 30 frames/s.
    Simulcast,
    /// Opus and one VP8 layer, 1280x720 at 1.5 Mbit/s, 30 frames/s.
    Single,
    /// Nothing: it only receives.
    None,
}

impl Media {
    /// Video RTP packets per second this profile sends: 30 frames/s, each
    /// at least one packet of at most 1,200 bytes of payload; `top_only`
    /// counts the top layer alone (what an SFU forwards of simulcast).
    pub fn video_packets_per_second(self, top_only: bool) -> f64 {
        let video = |bps: u64| (bps as f64 / 8.0 / 1200.0).max(30.0);
        match self {
            Media::Simulcast if top_only => video(1_500_000),
            Media::Simulcast => video(150_000) + video(500_000) + video(1_500_000),
            Media::Single => video(1_500_000),
            Media::Audio | Media::None => 0.0,
        }
    }

    /// Whether the profile sends anything.
    pub fn publishes(self) -> bool {
        self != Media::None
    }
}

/// One participant of every call.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    /// Its role in the call.
    pub role: Role,
    /// What it sends.
    pub media: Media,
    /// Opus frame length: one audio packet per frame (10 to 120 ms; 20 ms
    /// as browsers send). Longer frames make a lower packet rate.
    #[serde(default = "default_audio_frame", with = "humantime_serde")]
    pub audio_frame: Duration,
    /// Impairments of its link (both directions), applied by the bench.
    #[serde(default)]
    pub link: Link,
}

fn default_audio_frame() -> Duration {
    Duration::from_millis(20)
}

impl Participant {
    /// RTP packets per second it sends; `top_only`: of simulcast video only
    /// the top layer (what one subscriber gets forwarded at most).
    pub fn packets_per_second(&self, top_only: bool) -> f64 {
        let audio = if self.media.publishes() {
            1.0 / self.audio_frame.as_secs_f64()
        } else {
            0.0
        };
        audio + self.media.video_packets_per_second(top_only)
    }
}

/// Link impairments, applied by the bench to the participant's packets.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Random loss, percent of packets.
    #[serde(default)]
    pub loss_pct: f64,
    /// One-way delay added to every packet.
    #[serde(default, with = "humantime_serde")]
    pub latency: Duration,
    /// Extra delay, uniform between 0 and this.
    #[serde(default, with = "humantime_serde")]
    pub jitter: Duration,
    /// Rate limit, kbit/s (no limit when absent).
    #[serde(default)]
    pub rate_kbps: Option<u64>,
}

/// Ramp mode: start with `start` calls, add `step` every `every`, up to
/// `calls.count`, and report the most calls held while quality held.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    /// Calls up before the first check.
    pub start: usize,
    /// Calls added per step.
    pub step: usize,
    /// How long each step is held before quality is judged.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
}

/// Quality thresholds: a run (or a ramp step) fails when any is crossed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// Packet loss seen by receivers, percent.
    #[serde(default = "default_max_loss")]
    pub max_loss_pct: f64,
    /// 99th percentile of end-to-end frame latency, milliseconds.
    #[serde(default = "default_max_latency")]
    pub max_p99_latency_ms: f64,
    /// Freezes (over 500 ms without a frame) allowed.
    #[serde(default)]
    pub max_freezes: u64,
}

fn default_max_loss() -> f64 {
    1.0
}

fn default_max_latency() -> f64 {
    100.0
}

impl Default for Quality {
    fn default() -> Self {
        Quality {
            max_loss_pct: default_max_loss(),
            max_p99_latency_ms: default_max_latency(),
            max_freezes: 0,
        }
    }
}

/// The most participants a counter call may have here (citizen, official,
/// interpreter and a few observers); more is not a counter call.
pub const MAX_PER_CALL: usize = 8;

impl Scenario {
    /// Read and check a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    /// Parse and check a scenario; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        s.check().map_err(|message| ScenarioError::Invalid {
            origin: origin.into(),
            message,
        })?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if self.target.threads == 0 {
            return Err("target.threads: at least 1".into());
        }
        if let Some(url) = &self.target.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("target.url: {url:?} is not an http(s) URL"));
            }
            if self.target.kind != TargetKind::Balie {
                return Err(
                    "target.url: only a balie target can be external; the bench starts Janus itself"
                        .into(),
                );
            }
        }
        if self.target.offload_workers > 0 {
            if self.target.kind != TargetKind::Balie {
                return Err("target.offload_workers: only balie has transcoder workers".into());
            }
            if self.target.url.is_some() {
                return Err(
                    "target.offload_workers: the bench starts workers for a balie-sfu it starts; give an external one its own [offload]"
                        .into(),
                );
            }
            if self.target.offload_workers > MAX_OFFLOAD_WORKERS {
                return Err(format!(
                    "target.offload_workers: at most {MAX_OFFLOAD_WORKERS}, not {}",
                    self.target.offload_workers
                ));
            }
        }
        if self.calls.count == 0 {
            return Err("calls.count: at least 1".into());
        }
        if !(self.calls.join_rate.is_finite() && self.calls.join_rate > 0.0) {
            return Err("calls.join_rate: a positive number of calls per second".into());
        }
        if self.calls.duration.is_zero() {
            return Err("calls.duration: longer than 0".into());
        }
        let n = self.participants.len();
        if n == 0 || n > MAX_PER_CALL {
            return Err(format!(
                "participant: a call needs 1 to {MAX_PER_CALL} participants, this one has {n}"
            ));
        }
        if !self.participants.iter().any(|p| p.media.publishes()) {
            return Err("participant: nobody in the call sends media".into());
        }
        if self.participants.len() > 1 && !self.participants.iter().any(|p| p.role != Role::Citizen)
        {
            return Err(
                "participant: citizens wait until an official admits them; add an official or an interpreter"
                    .into(),
            );
        }
        for (i, p) in self.participants.iter().enumerate() {
            let l = &p.link;
            if !(0.0..=100.0).contains(&l.loss_pct) {
                return Err(format!("participant[{i}].link.loss_pct: 0 to 100"));
            }
            let frame_ms = p.audio_frame.as_millis();
            if p.audio_frame.subsec_nanos() % 1_000_000 != 0
                || !(10..=120).contains(&frame_ms)
                || frame_ms % 10 != 0
            {
                return Err(format!(
                    "participant[{i}].audio_frame: 10 to 120 ms in steps of 10 ms (Opus), not {}",
                    humantime::format_duration(p.audio_frame)
                ));
            }
            if l.rate_kbps == Some(0) {
                return Err(format!(
                    "participant[{i}].link.rate_kbps: at least 1 (leave it out for no limit)"
                ));
            }
        }
        if let Some(r) = &self.ramp {
            if r.start == 0 || r.step == 0 || r.every.is_zero() {
                return Err("ramp: start, step and every must be above 0".into());
            }
            if r.start > self.calls.count {
                return Err(format!(
                    "ramp.start ({}) is above calls.count ({}), the most the ramp tries",
                    r.start, self.calls.count
                ));
            }
        }
        let q = &self.quality;
        if !(q.max_loss_pct >= 0.0 && q.max_p99_latency_ms > 0.0) {
            return Err("quality: max_loss_pct at least 0, max_p99_latency_ms above 0".into());
        }
        Ok(())
    }

    /// Peer connections at full load (one per participant).
    pub fn peer_connections(&self) -> usize {
        self.calls.count * self.participants.len()
    }

    /// Media packets per second the participants send at full load, and
    /// the packets per second an SFU forwards for them (each publisher's
    /// audio and one video layer to every other participant).
    pub fn packet_rates(&self) -> (f64, f64) {
        let mut sent = 0.0;
        let mut forwarded = 0.0;
        for p in &self.participants {
            sent += p.packets_per_second(false);
            forwarded += p.packets_per_second(true) * (self.participants.len() - 1) as f64;
        }
        let calls = self.calls.count as f64;
        (sent * calls, forwarded * calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bench");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("configs/bench exists")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn every_example_scenario_loads() {
        let files = examples();
        assert!(files.len() >= 3, "{files:?}");
        for f in files {
            let s = Scenario::load(&f).unwrap_or_else(|e| panic!("{e}"));
            assert!(s.peer_connections() > 0, "{}", f.display());
        }
    }

    const GOOD: &str = r#"
        name = "t"
        [target]
        kind = "balie"
        [calls]
        count = 2
        join_rate = 5.0
        duration = "3s"
        [[participant]]
        role = "citizen"
        media = "simulcast"
        link = { loss_pct = 2.0, jitter = "30ms" }
        [[participant]]
        role = "official"
        media = "audio"
    "#;

    #[test]
    fn a_scenario_reads_with_defaults() {
        let s = Scenario::parse(GOOD, "t").expect("valid");
        assert_eq!(s.target.threads, 2);
        assert_eq!(s.target.offload_workers, 0);
        assert_eq!(s.calls.duration, Duration::from_secs(3));
        assert_eq!(s.participants[0].link.jitter, Duration::from_millis(30));
        assert_eq!(s.quality, Quality::default());
        assert_eq!(s.peer_connections(), 4);
        let (sent, fwd) = s.packet_rates();
        // Per call: simulcast 50 + 30 + 52 + 156 = 288, audio 50.
        assert!((sent - 2.0 * 338.25).abs() < 1.0, "{sent}");
        // Per call: the citizen's audio and top layer to one, the official's audio to one.
        assert!((fwd - 2.0 * (50.0 + 156.25 + 50.0)).abs() < 1.0, "{fwd}");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (GOOD.replace("count = 2", "count = 0"), "calls.count"),
            (
                GOOD.replace("join_rate = 5.0", "join_rate = -1.0"),
                "join_rate",
            ),
            (GOOD.replace("\"3s\"", "\"0s\""), "calls.duration"),
            (
                GOOD.replace("loss_pct = 2.0", "loss_pct = 200.0"),
                "participant[0].link.loss_pct",
            ),
            (
                GOOD.replace("kind = \"balie\"", "kind = \"mediasoup\""),
                "unknown variant",
            ),
            (
                GOOD.replace("kind = \"balie\"", "kind = \"balie\"\nurl = \"ftp://x\""),
                "not an http(s) URL",
            ),
            (
                GOOD.replace("kind = \"balie\"", "kind = \"janus\"\nurl = \"http://x:1\""),
                "only a balie target can be external",
            ),
            (
                GOOD.replace("media = \"audio\"", "media = \"audio\"\nvolume = 3"),
                "unknown field",
            ),
            (
                GOOD.replace("role = \"official\"", "role = \"citizen\""),
                "admits",
            ),
            (
                GOOD.replace("media = \"simulcast\"", "media = \"none\"")
                    .replace("media = \"audio\"", "media = \"none\""),
                "nobody",
            ),
            (
                format!("{GOOD}\n[ramp]\nstart = 5\nstep = 1\nevery = \"1s\""),
                "ramp.start",
            ),
            (GOOD.replace("\"3s\"", "\"three seconds\""), "duration"),
            (
                GOOD.replace(
                    "media = \"audio\"",
                    "media = \"audio\"\naudio_frame = \"15ms\"",
                ),
                "participant[1].audio_frame",
            ),
            (
                GOOD.replace("kind = \"balie\"", "kind = \"janus\"\noffload_workers = 1"),
                "only balie has transcoder workers",
            ),
            (
                GOOD.replace(
                    "kind = \"balie\"",
                    "kind = \"balie\"\nurl = \"http://x:1\"\noffload_workers = 1",
                ),
                "its own [offload]",
            ),
            (
                GOOD.replace("kind = \"balie\"", "kind = \"balie\"\noffload_workers = 17"),
                "at most 16",
            ),
        ];
        for (text, needle) in cases {
            let e = Scenario::parse(&text, "case")
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(e.starts_with("case"), "{e}");
        }
    }
}
