//! The SFU's side of the offload: a pool of transcoder workers, one QUIC
//! connection per (shard, worker), reached with `balie-offload`.
//!
//! A shard hands the pool commands (open a session for a track, its source
//! frames, keyframe requests, close) and gets back [`PoolEvent`]s (layer
//! frames, layouts, keyframe needs, moves). The pool places each session on
//! the least-loaded worker that is up (by the capacity each worker reports
//! and the sessions placed since), writes the source one group (GOP) per
//! stream, and when a worker is lost (its connection closes, or is silent
//! for [`balie_offload::tls::LOST_AFTER`]) moves its sessions to another
//! worker at once and tells the shard ([`PoolEvent::Moved`]), so the shard
//! can forward the top layer meanwhile and ask the publisher for a keyframe
//! for the new worker. With no worker up, sessions wait ([`PoolEvent::Lost`])
//! and are placed when one comes back; a call never depends on a worker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balie_offload::link::{client_endpoint, GroupSender, Link, LinkEvent};
use balie_offload::tls::{client_config, TlsFiles};
use balie_offload::{
    Capacity, Caption, Codec, Control, ErrorCode, Frame, GroupHeader, LayerSpec, Size,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Deserialize;
use tokio::sync::mpsc;

/// `[offload]` in the SFU's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// Workers as `host:port`. A host name that resolves to several
    /// addresses (a headless service) gives one worker per address. Empty:
    /// no offload (single-layer publishers are forwarded as they are).
    pub workers: Vec<String>,
    /// The name the workers' certificates carry; default: each entry's host.
    pub server_name: Option<String>,
    /// The CA that issued the workers' certificates (PEM).
    pub ca: PathBuf,
    /// The SFU's client certificate (PEM).
    pub cert: PathBuf,
    /// The SFU's private key (PEM).
    pub key: PathBuf,
    /// The layers asked for, lowest first (each the source scaled down).
    pub layers: Vec<LayerConfig>,
    /// How long a source frame stays worth transcoding after it reaches the
    /// worker. Default 150 ms.
    pub deadline_ms: u16,
    /// How often the workers' names are looked up again (seconds, 1 to
    /// 3600; default 10): a worker that appears in DNS is connected, one
    /// that is gone takes no new sessions and is let go once its sessions
    /// have ended. A lookup that fails changes nothing and is tried again
    /// sooner (1, 2, 4 s ...).
    pub dns_refresh_s: u32,
}

/// One layer a worker makes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    pub scale_down: u8,
    pub bitrate_kbps: u32,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            workers: Vec::new(),
            server_name: None,
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            layers: vec![
                LayerConfig {
                    scale_down: 4,
                    bitrate_kbps: 150,
                },
                LayerConfig {
                    scale_down: 2,
                    bitrate_kbps: 500,
                },
            ],
            deadline_ms: 150,
            dns_refresh_s: 10,
        }
    }
}

impl OffloadConfig {
    /// Whether offload is configured.
    pub fn enabled(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Check what can be checked without the network.
    pub fn check(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        for (name, p) in [
            ("offload.ca", &self.ca),
            ("offload.cert", &self.cert),
            ("offload.key", &self.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(format!("{name} must be set when offload.workers is"));
            }
        }
        if self.layers.is_empty() || self.layers.len() > balie_offload::wire::MAX_LAYERS {
            return Err("offload.layers must list 1 to 4 layers".into());
        }
        for l in &self.layers {
            if !(2..=16).contains(&l.scale_down) || !(10..=50_000).contains(&l.bitrate_kbps) {
                return Err("offload.layers: scale_down 2 to 16, bitrate_kbps 10 to 50000".into());
            }
        }
        if !(1..=3600).contains(&self.dns_refresh_s) {
            return Err("offload.dns_refresh_s: 1 to 3600 seconds".into());
        }
        for w in &self.workers {
            if w.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("offload.workers: {w:?} is not host:port"));
            }
        }
        Ok(())
    }

    fn specs(&self) -> Vec<LayerSpec> {
        self.layers
            .iter()
            .map(|l| LayerSpec {
                scale_down: l.scale_down,
                bitrate_kbps: l.bitrate_kbps,
            })
            .collect()
    }
}

/// The offload metrics (shared by all shards' pools).
#[derive(Clone)]
pub struct OffloadMetrics {
    /// Workers connected, per shard.
    pub workers_up: IntGaugeVec,
    /// Offload sessions placed on a worker.
    pub sessions: IntGauge,
    /// Frames to and from workers (`direction` = `to_worker`, `from_worker`).
    pub frames: IntCounterVec,
    /// Sessions moved to another worker after a loss, or left waiting.
    pub moves: IntCounterVec,
    /// Worker round-trip time, microseconds, per worker address.
    pub rtt_us: IntGaugeVec,
    /// Protocol errors and refusals from workers, by code.
    pub errors: IntCounterVec,
    /// Source frames dropped because a worker did not take them in time.
    pub dropped: IntCounter,
    /// Worker addresses found in DNS (`added`), gone from it (`retired`),
    /// and lookups that failed (`failed`).
    pub dns: IntCounterVec,
    /// Connections to workers that ended: `stopped` (the worker closed it
    /// on purpose: SIGTERM, a deploy) or `lost` (silent, or an error).
    pub worker_losses: IntCounterVec,
}

impl OffloadMetrics {
    pub fn new(registry: &Registry) -> OffloadMetrics {
        let m = OffloadMetrics {
            workers_up: IntGaugeVec::new(
                Opts::new("offload_workers_up", "Transcoder workers connected."),
                &["shard"],
            )
            .expect("valid metric"),
            sessions: IntGauge::with_opts(Opts::new(
                "offload_sessions",
                "Offload sessions placed on a worker.",
            ))
            .expect("valid metric"),
            frames: IntCounterVec::new(
                Opts::new("offload_frames_total", "Frames to and from workers."),
                &["direction"],
            )
            .expect("valid metric"),
            moves: IntCounterVec::new(
                Opts::new(
                    "offload_moves_total",
                    "Sessions moved after a worker was lost (moved) or left waiting (waiting).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            rtt_us: IntGaugeVec::new(
                Opts::new("offload_worker_rtt_microseconds", "Worker round-trip time."),
                &["worker"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "offload_errors_total",
                    "Refusals and protocol errors from workers, by code.",
                ),
                &["code"],
            )
            .expect("valid metric"),
            dropped: IntCounter::with_opts(Opts::new(
                "offload_frames_dropped_total",
                "Source frames dropped because a worker's stream did not take them in time.",
            ))
            .expect("valid metric"),
            dns: IntCounterVec::new(
                Opts::new(
                    "offload_dns_total",
                    "Worker addresses added to or retired from the pool by DNS, and failed lookups.",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            worker_losses: IntCounterVec::new(
                Opts::new(
                    "offload_worker_losses_total",
                    "Worker connections that ended: stopped (closed by the worker on purpose) or lost.",
                ),
                &["cause"],
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.workers_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.sessions.clone()),
            Box::new(m.frames.clone()),
            Box::new(m.moves.clone()),
            Box::new(m.rtt_us.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.dns.clone()),
            Box::new(m.worker_losses.clone()),
        ] {
            // Registered once per process; a second registration (tests that
            // build several) is harmless.
            let _ = registry.register(c);
        }
        // Every label value known in advance starts at 0: a series that
        // appears at 1 shows no increase(), so the first lost worker would
        // raise no alert (configs/monitoring).
        for (family, values) in [
            (&m.frames, &["to_worker", "from_worker"][..]),
            (&m.moves, &["moved", "waiting"]),
            (&m.dns, &["added", "retired", "failed"]),
            (&m.worker_losses, &["stopped", "lost"]),
        ] {
            for v in values {
                family.with_label_values(&[v]);
            }
        }
        for code in ErrorCode::ERRORS {
            m.errors.with_label_values(&[code.name()]);
        }
        m
    }
}

/// What a shard asks of its pool.
#[derive(Debug)]
pub enum PoolCommand {
    /// Start transcoding a track; `key` is the shard's name for it.
    Open { key: u64, codec: Codec },
    /// Start making captions of an audio track (Opus) in `language`.
    OpenCaptions { key: u64, language: String },
    /// A source frame of the track (for captions: an Opus packet, `key`
    /// set on the first of each group).
    Frame { key: u64, frame: Frame },
    /// A subscriber wants a keyframe of a layer (1-based track).
    Keyframe { key: u64, track: u8 },
    /// Nobody needs the layers any more.
    Close { key: u64 },
}

/// What the pool tells its shard.
#[derive(Debug)]
pub enum PoolEvent {
    /// A frame of layer `track` (1-based, lowest first as configured).
    Frame { key: u64, track: u8, frame: Frame },
    /// The sizes of the source and of each layer.
    Layout {
        key: u64,
        source: Size,
        layers: Vec<Size>,
    },
    /// The worker needs a keyframe of the source (placed, moved, or its
    /// decoder lost a reference): ask the publisher.
    NeedKeyframe { key: u64 },
    /// The session's worker was lost and the session is now on another one:
    /// its layers stop until the new worker sends them.
    Moved { key: u64 },
    /// No worker can take the session now; it will be placed when one can.
    Lost { key: u64, reason: String },
    /// A caption segment of a caption session.
    Caption { key: u64, caption: Caption },
}

impl PoolEvent {
    /// The session it is about (the shard's key).
    pub fn key(&self) -> u64 {
        match self {
            PoolEvent::Frame { key, .. }
            | PoolEvent::Layout { key, .. }
            | PoolEvent::NeedKeyframe { key }
            | PoolEvent::Moved { key }
            | PoolEvent::Lost { key, .. }
            | PoolEvent::Caption { key, .. } => *key,
        }
    }
}

/// What a shard needs to start its pool.
#[derive(Clone)]
pub struct OffloadSetup {
    /// `[offload]` from the config.
    pub config: OffloadConfig,
    /// How the SFU introduces itself in its hello.
    pub agent: String,
    /// The offload metrics.
    pub metrics: OffloadMetrics,
    /// Where the pool reports its workers (for `/readyz`).
    pub status: PoolStatus,
    /// How worker entries become addresses (DNS; tests give their own).
    pub resolver: Resolver,
}

/// The addresses a lookup found, or why it failed.
pub type Lookup = Result<Vec<SocketAddr>, String>;

/// A lookup under way.
type LookupFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Lookup> + Send>>;

/// How the pool turns a `host:port` entry into addresses: the system's
/// resolver ([`Resolver::default`]), or a function (tests, which cannot
/// change DNS).
#[derive(Clone)]
pub struct Resolver(Arc<dyn Fn(String) -> LookupFuture + Send + Sync>);

impl Resolver {
    /// Resolve with `f`.
    pub fn new<F, Fut>(f: F) -> Resolver
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Lookup> + Send + 'static,
    {
        Resolver(Arc::new(move |entry| Box::pin(f(entry))))
    }

    async fn lookup(&self, entry: &str) -> Lookup {
        (self.0)(entry.to_owned()).await
    }
}

impl Default for Resolver {
    /// The system's resolver (`getaddrinfo`, on tokio's blocking pool).
    fn default() -> Resolver {
        Resolver::new(|entry: String| async move {
            tokio::net::lookup_host(entry.as_str())
                .await
                .map(|a| a.collect())
                .map_err(|e| e.to_string())
        })
    }
}

impl OffloadSetup {
    /// Check that the TLS files load (before any shard starts).
    pub fn check_tls(&self) -> Result<(), String> {
        client_config(&self.tls_files())
            .map(|_| ())
            .map_err(|e| format!("offload: {e}"))
    }

    fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.config.ca.clone(),
            cert: self.config.cert.clone(),
            key: self.config.key.clone(),
        }
    }
}

/// One worker as a pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// The config entry and the address it resolved to.
    pub worker: String,
    /// Connected.
    pub up: bool,
    /// Round-trip time, microseconds (0 while down).
    pub rtt_us: u64,
    /// Sessions and the most it takes, as it last reported.
    pub sessions: u32,
    pub max_sessions: u32,
    /// Caption sessions and the most it takes (0: no captions).
    pub captions: u32,
    pub max_captions: u32,
    /// Its load as it last reported, per mille.
    pub load_permille: u16,
    /// Gone from DNS: takes no new sessions, let go once its sessions end.
    pub retired: bool,
}

/// The workers of one pool, as last seen (shared with the HTTP layer).
#[derive(Clone, Default)]
pub struct PoolStatus(Arc<Mutex<Vec<WorkerStatus>>>);

impl PoolStatus {
    /// The workers now.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// The `/readyz` lines on the workers, over every shard's pool: a worker
/// counts as up on the shards connected to it.
pub fn readiness(pools: &[PoolStatus]) -> String {
    if pools.is_empty() {
        return String::new();
    }
    let mut by_worker: Vec<(String, usize, WorkerStatus)> = Vec::new();
    for w in pools.iter().flat_map(|p| p.snapshot()) {
        match by_worker.iter_mut().find(|(name, _, _)| *name == w.worker) {
            Some((_, up, seen)) => {
                *up += usize::from(w.up);
                seen.retired |= w.retired;
                if w.up {
                    seen.rtt_us = seen.rtt_us.max(w.rtt_us);
                    seen.sessions = w.sessions;
                    seen.max_sessions = w.max_sessions;
                    seen.captions = w.captions;
                    seen.max_captions = w.max_captions;
                    seen.load_permille = w.load_permille;
                }
            }
            None => by_worker.push((w.worker.clone(), usize::from(w.up), w)),
        }
    }
    let shards = pools.len();
    let up = by_worker.iter().filter(|(_, n, _)| *n > 0).count();
    let mut out = format!("offload: {up} of {} workers up\n", by_worker.len());
    if up == 0 {
        out.push_str("offload: no worker up; single-layer video is forwarded as sent\n");
    }
    for (name, n, w) in &by_worker {
        if *n == 0 {
            out.push_str(&format!("worker {name}: down\n"));
        } else {
            let captions = if w.max_captions > 0 {
                format!("captions {}/{}", w.captions, w.max_captions)
            } else {
                "no captions".into()
            };
            out.push_str(&format!(
                "worker {name}: up on {n} of {shards} shards, rtt {:.1} ms, sessions {}/{}, {captions}, load {:.1}%{}\n",
                w.rtt_us as f64 / 1000.0,
                w.sessions,
                w.max_sessions,
                f64::from(w.load_permille) / 10.0,
                if w.retired {
                    ", gone from DNS (no new sessions; let go when its sessions end)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

/// A shard's handle on its pool.
#[derive(Clone)]
pub struct Pool {
    cmds: mpsc::UnboundedSender<PoolCommand>,
}

impl Pool {
    /// Start a pool for shard `shard` on the current tokio runtime.
    pub fn start(
        setup: &OffloadSetup,
        shard: String,
    ) -> Result<(Pool, mpsc::UnboundedReceiver<PoolEvent>), String> {
        let tls = client_config(&setup.tls_files()).map_err(|e| format!("offload: {e}"))?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (events, ev_rx) = mpsc::unbounded_channel();
        // 0 until a worker connects, so that "no worker up" is a series.
        setup.metrics.workers_up.with_label_values(&[&shard]);
        let manager = Manager {
            config: setup.config.clone(),
            specs: setup.config.specs(),
            tls,
            endpoints: HashMap::new(),
            agent: setup.agent.clone(),
            shard,
            metrics: setup.metrics.clone(),
            status: setup.status.clone(),
            workers: Vec::new(),
            sessions: HashMap::new(),
            events,
            failing: Default::default(),
        };
        tokio::spawn(manager.run(cmd_rx, setup.resolver.clone()));
        Ok((Pool { cmds }, ev_rx))
    }

    /// Hand the pool a command; false when the pool is gone.
    pub fn send(&self, cmd: PoolCommand) -> bool {
        self.cmds.send(cmd).is_ok()
    }
}

struct WorkerSlot {
    /// The config entry it came from (`host:port`, as configured).
    source: String,
    /// The entry and the address it resolved to (`/readyz`, metrics).
    entry: String,
    addr: SocketAddr,
    /// Gone from DNS: takes no new sessions, is not connected again, and
    /// its link is closed once no session is on it.
    retired: bool,
    server_name: String,
    link: Option<Link>,
    /// Bumped on every (re)connection; events of older links are ignored.
    generation: u64,
    capacity: Capacity,
    /// Sessions (layers, captions) we placed since its last capacity report.
    placed: u32,
    placed_captions: u32,
    connecting: bool,
    next_try: Instant,
    failures: u32,
}

/// What a worker session makes.
#[derive(Debug, Clone)]
enum Work {
    Layers(Codec),
    Captions(String),
}

impl Work {
    fn captions(&self) -> bool {
        matches!(self, Work::Captions(_))
    }
}

struct SessionState {
    work: Work,
    /// The worker it is on; None while waiting for one.
    worker: Option<usize>,
    writer: Option<mpsc::Sender<Frame>>,
    /// Frames are being dropped (the writer's queue was full) until the
    /// next keyframe.
    skipping: bool,
}

enum Internal {
    Connected {
        idx: usize,
        link: Link,
        events: mpsc::UnboundedReceiver<LinkEvent>,
    },
    Failed {
        idx: usize,
        why: String,
    },
    Link {
        idx: usize,
        generation: u64,
        event: LinkEvent,
    },
    /// A round of lookups: per config entry, the name its certificate
    /// carries and what the lookup found.
    Resolved(Vec<(String, String, Lookup)>),
}

struct Manager {
    config: OffloadConfig,
    specs: Vec<LayerSpec>,
    tls: quinn::ClientConfig,
    /// One client endpoint per address family.
    endpoints: HashMap<bool, quinn::Endpoint>,
    agent: String,
    shard: String,
    metrics: OffloadMetrics,
    status: PoolStatus,
    workers: Vec<WorkerSlot>,
    sessions: HashMap<u64, SessionState>,
    events: mpsc::UnboundedSender<PoolEvent>,
    /// Config entries whose last lookup failed (logged once per failure).
    failing: std::collections::HashSet<String>,
}

/// How often unreachable workers are tried again (and retired ones let go).
const RETRY: Duration = Duration::from_millis(500);

impl Manager {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<PoolCommand>, resolver: Resolver) {
        let (itx, mut irx) = mpsc::unbounded_channel::<Internal>();
        tokio::spawn(resolve(self.config.clone(), resolver, itx.clone()));
        let mut tick = tokio::time::interval(RETRY);
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(msg) = irx.recv() => self.internal(msg, &itx),
                _ = tick.tick() => self.tick(&itx),
            }
        }
        for w in &self.workers {
            if let Some(l) = &w.link {
                l.conn
                    .close((ErrorCode::Closed as u32).into(), b"shard stopped");
            }
        }
    }

    fn command(&mut self, cmd: PoolCommand) {
        match cmd {
            PoolCommand::Open { key, codec } => self.open(key, Work::Layers(codec)),
            PoolCommand::OpenCaptions { key, language } => {
                self.open(key, Work::Captions(language));
            }
            PoolCommand::Frame { key, frame } => {
                let Some(s) = self.sessions.get_mut(&key) else {
                    return;
                };
                let Some(w) = s.writer.as_ref() else { return };
                // A worker that does not take the frames as fast as they
                // come (a stalled stream) must not make the SFU queue
                // them: past WRITE_QUEUE frames, drop to the next keyframe
                // (and ask the publisher for one).
                if s.skipping && !frame.key {
                    self.metrics.dropped.inc();
                    return;
                }
                match w.try_send(frame) {
                    Ok(()) => s.skipping = false,
                    Err(_) => {
                        if !s.skipping {
                            let _ = self.events.send(PoolEvent::NeedKeyframe { key });
                        }
                        s.skipping = true;
                        self.metrics.dropped.inc();
                    }
                }
            }
            PoolCommand::Keyframe { key, track } => {
                if let Some(link) = self.link_of(key) {
                    link.send(Control::Keyframe {
                        session: key,
                        track,
                    });
                }
            }
            PoolCommand::Close { key } => {
                if let Some(link) = self.link_of(key) {
                    link.send(Control::Close { session: key });
                }
                if let Some(s) = self.sessions.remove(&key) {
                    if s.worker.is_some() {
                        self.metrics.sessions.dec();
                    }
                }
            }
        }
    }

    fn open(&mut self, key: u64, work: Work) {
        if self.sessions.contains_key(&key) {
            return;
        }
        let captions = work.captions();
        self.sessions.insert(
            key,
            SessionState {
                work,
                worker: None,
                writer: None,
                skipping: false,
            },
        );
        if !self.place(key) {
            self.metrics.moves.with_label_values(&["waiting"]).inc();
            let reason = if captions {
                "no worker that makes captions is available"
            } else {
                "no transcoder worker available"
            };
            let _ = self.events.send(PoolEvent::Lost {
                key,
                reason: reason.into(),
            });
        }
    }

    /// Report the workers to [`PoolStatus`].
    fn publish(&self) {
        let now: Vec<WorkerStatus> = self
            .workers
            .iter()
            .filter(|w| !w.retired || w.link.is_some())
            .map(|w| WorkerStatus {
                worker: w.entry.clone(),
                up: w.link.is_some(),
                rtt_us: w.link.as_ref().map_or(0, |l| l.rtt().as_micros() as u64),
                sessions: w.capacity.sessions,
                max_sessions: w.capacity.max_sessions,
                captions: w.capacity.captions,
                max_captions: w.capacity.max_captions,
                load_permille: w.capacity.load_permille,
                retired: w.retired,
            })
            .collect();
        if let Ok(mut v) = self.status.0.lock() {
            *v = now;
        }
    }

    fn link_of(&self, key: u64) -> Option<&Link> {
        let idx = self.sessions.get(&key)?.worker?;
        self.workers.get(idx)?.link.as_ref()
    }

    /// The least-loaded worker that is up and has room (for captions: one
    /// that makes them).
    fn pick(&self, captions: bool) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.link.is_some() && !w.retired)
            .filter_map(|(i, w)| {
                let c = &w.capacity;
                let (used, max) = if captions {
                    (c.captions + w.placed_captions, c.max_captions)
                } else {
                    (c.sessions + w.placed, c.max_sessions.max(1))
                };
                (used < max).then(|| {
                    let share = f64::from(used + 1) / f64::from(max);
                    (i, share, w.capacity.load_permille)
                })
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.2.cmp(&b.2)))
            .map(|(i, _, _)| i)
    }

    /// Place a session on a worker: open it there and start its writer.
    fn place(&mut self, key: u64) -> bool {
        let Some(captions) = self.sessions.get(&key).map(|s| s.work.captions()) else {
            return false;
        };
        let Some(idx) = self.pick(captions) else {
            return false;
        };
        let Some(state) = self.sessions.get_mut(&key) else {
            return false;
        };
        let w = &mut self.workers[idx];
        let Some(link) = w.link.as_ref() else {
            return false;
        };
        match &state.work {
            Work::Layers(codec) => {
                link.send(Control::Open {
                    session: key,
                    codec: *codec,
                    layers: self.specs.clone(),
                });
                w.placed += 1;
            }
            Work::Captions(language) => {
                link.send(Control::OpenCaptions {
                    session: key,
                    language: language.clone(),
                });
                w.placed_captions += 1;
            }
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_groups(
            link.conn.clone(),
            key,
            rx,
            self.config.deadline_ms,
            self.metrics.clone(),
            self.events.clone(),
        ));
        if state.worker.is_none() {
            self.metrics.sessions.inc();
        }
        state.worker = Some(idx);
        state.writer = Some(tx);
        state.skipping = false;
        if !captions {
            // The new worker's decoder starts at a keyframe.
            let _ = self.events.send(PoolEvent::NeedKeyframe { key });
        }
        true
    }

    fn internal(&mut self, msg: Internal, itx: &mpsc::UnboundedSender<Internal>) {
        match msg {
            Internal::Resolved(found) => {
                for (source, server_name, lookup) in found {
                    self.resolved(source, server_name, lookup);
                }
                self.publish();
                self.tick(itx);
            }
            Internal::Connected {
                idx,
                link,
                mut events,
            } => {
                let w = &mut self.workers[idx];
                w.connecting = false;
                w.failures = 0;
                w.generation += 1;
                w.capacity = Capacity {
                    max_sessions: link.max_sessions,
                    max_captions: link.max_captions,
                    ..Capacity::default()
                };
                w.placed = 0;
                w.placed_captions = 0;
                tracing::info!(worker = %w.source, agent = %link.agent, "offload worker connected");
                tracing::debug!(worker = %w.entry, "offload worker connected");
                w.link = Some(link);
                self.metrics
                    .workers_up
                    .with_label_values(&[&self.shard])
                    .inc();
                let generation = w.generation;
                self.publish();
                let tx = itx.clone();
                tokio::spawn(async move {
                    while let Some(event) = events.recv().await {
                        let last = matches!(event, LinkEvent::Closed(_));
                        if tx
                            .send(Internal::Link {
                                idx,
                                generation,
                                event,
                            })
                            .is_err()
                            || last
                        {
                            break;
                        }
                    }
                });
                // Sessions that were waiting for a worker.
                let waiting: Vec<u64> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.worker.is_none())
                    .map(|(k, _)| *k)
                    .collect();
                for key in waiting {
                    if self.place(key) {
                        self.metrics.moves.with_label_values(&["moved"]).inc();
                        let _ = self.events.send(PoolEvent::Moved { key });
                    }
                }
            }
            Internal::Failed { idx, why } => {
                let w = &mut self.workers[idx];
                w.connecting = false;
                w.failures += 1;
                // 0.5 s, 1 s, 2 s, then every 4 s.
                w.next_try = Instant::now() + RETRY * (1 << w.failures.min(4)) / 2;
                tracing::debug!(worker = %w.entry, %why, "offload worker unreachable");
            }
            Internal::Link {
                idx,
                generation,
                event,
            } => {
                if self.workers.get(idx).map(|w| w.generation) != Some(generation) {
                    return;
                }
                self.link_event(idx, event);
            }
        }
    }

    fn link_event(&mut self, idx: usize, event: LinkEvent) {
        match event {
            LinkEvent::Frame { header, frame } => {
                if self.sessions.get(&header.session).and_then(|s| s.worker) == Some(idx) {
                    self.metrics
                        .frames
                        .with_label_values(&["from_worker"])
                        .inc();
                    let _ = self.events.send(PoolEvent::Frame {
                        key: header.session,
                        track: header.track,
                        frame,
                    });
                }
            }
            LinkEvent::Control(Control::Capacity(c)) => {
                let w = &mut self.workers[idx];
                w.capacity = c;
                w.placed = 0;
                w.placed_captions = 0;
                if let Some(l) = &w.link {
                    self.metrics
                        .rtt_us
                        .with_label_values(&[&w.entry])
                        .set(l.rtt().as_micros() as i64);
                }
                self.publish();
            }
            LinkEvent::Control(Control::Layout {
                session,
                source,
                layers,
            }) => {
                let _ = self.events.send(PoolEvent::Layout {
                    key: session,
                    source,
                    layers,
                });
            }
            LinkEvent::Control(Control::Keyframe { session, .. }) => {
                let _ = self.events.send(PoolEvent::NeedKeyframe { key: session });
            }
            LinkEvent::Control(Control::Caption(caption)) => {
                if self.sessions.get(&caption.session).and_then(|s| s.worker) == Some(idx) {
                    let _ = self.events.send(PoolEvent::Caption {
                        key: caption.session,
                        caption,
                    });
                }
            }
            LinkEvent::Control(Control::Ended {
                session,
                code,
                reason,
            }) => {
                self.metrics.errors.with_label_values(&[code.name()]).inc();
                tracing::warn!(code = code.name(), %reason, "offload session ended by the worker");
                let Some(s) = self
                    .sessions
                    .get(&session)
                    .filter(|s| s.worker == Some(idx))
                else {
                    return;
                };
                let captions = s.work.captions();
                self.unplace(session);
                if code == ErrorCode::Capacity {
                    let w = &mut self.workers[idx];
                    if captions {
                        w.placed_captions = w.capacity.max_captions;
                    } else {
                        w.placed = w.capacity.max_sessions;
                    }
                }
                if captions && code == ErrorCode::Unsupported {
                    // The model does not take the language: every worker
                    // would say so. Wait for a worker that connects anew.
                    self.metrics.moves.with_label_values(&["waiting"]).inc();
                    let _ = self.events.send(PoolEvent::Lost {
                        key: session,
                        reason,
                    });
                } else {
                    // Try elsewhere (a full worker, or a media error there).
                    self.replace(session, reason);
                }
            }
            LinkEvent::Control(Control::Error { code, reason }) => {
                self.metrics.errors.with_label_values(&[code.name()]).inc();
                tracing::warn!(code = code.name(), %reason, "offload worker reported a protocol error");
            }
            LinkEvent::Control(other) => {
                tracing::debug!(?other, "unexpected control message from a worker");
            }
            LinkEvent::BadStream(why) => {
                self.metrics.errors.with_label_values(&["malformed"]).inc();
                tracing::warn!(%why, "malformed media stream from a worker");
            }
            LinkEvent::Closed(why) => {
                let w = &mut self.workers[idx];
                // A worker that was stopped (a deploy) is no alarm; one
                // that went silent or failed is.
                if w.link.as_ref().is_some_and(Link::stopped_by_peer) {
                    self.metrics
                        .worker_losses
                        .with_label_values(&["stopped"])
                        .inc();
                    tracing::info!(worker = %w.source, "offload worker stopped; its sessions move");
                } else {
                    self.metrics
                        .worker_losses
                        .with_label_values(&["lost"])
                        .inc();
                    tracing::warn!(worker = %w.source, "offload worker lost; its sessions move");
                }
                tracing::debug!(worker = %w.entry, %why, "offload worker gone");
                w.link = None;
                w.generation += 1;
                w.next_try = Instant::now() + RETRY;
                self.metrics
                    .workers_up
                    .with_label_values(&[&self.shard])
                    .dec();
                self.publish();
                let keys: Vec<u64> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.worker == Some(idx))
                    .map(|(k, _)| *k)
                    .collect();
                for key in keys {
                    self.unplace(key);
                    self.replace(key, format!("worker lost: {why}"));
                }
            }
        }
    }

    /// A lookup of config entry `source`: its new addresses become workers
    /// (or workers again), its workers whose address is gone are retired.
    /// A failed lookup changes nothing (a DNS hiccup must not drop workers).
    fn resolved(&mut self, source: String, server_name: String, lookup: Lookup) {
        let addrs = match lookup {
            Ok(addrs) => {
                if self.failing.remove(&source) {
                    tracing::info!(worker = %source, "offload: the workers' name resolves again");
                }
                addrs
            }
            Err(why) => {
                self.metrics.dns.with_label_values(&["failed"]).inc();
                if self.failing.insert(source.clone()) {
                    tracing::warn!(worker = %source, %why, "offload: cannot resolve the workers' name; the workers it had stay as they are");
                }
                return;
            }
        };
        for w in self.workers.iter_mut() {
            if w.source == source && !w.retired && !addrs.contains(&w.addr) {
                w.retired = true;
                self.metrics.dns.with_label_values(&["retired"]).inc();
                tracing::info!(worker = %w.source, "offload worker gone from DNS: no new sessions, let go once its sessions end");
                tracing::debug!(worker = %w.entry, "offload worker retired");
            }
        }
        for addr in addrs {
            if let Some(w) = self.workers.iter_mut().find(|w| w.addr == addr) {
                if w.retired {
                    w.retired = false;
                    w.source = source.clone();
                    w.next_try = Instant::now();
                    self.metrics.dns.with_label_values(&["added"]).inc();
                }
                continue;
            }
            self.metrics.dns.with_label_values(&["added"]).inc();
            tracing::info!(worker = %source, "offload worker found");
            tracing::debug!(worker = %source, %addr, "offload worker found");
            let slot = WorkerSlot {
                source: source.clone(),
                entry: format!("{source} ({addr})"),
                addr,
                retired: false,
                server_name: server_name.clone(),
                link: None,
                generation: 0,
                capacity: Capacity::default(),
                placed: 0,
                placed_captions: 0,
                connecting: false,
                next_try: Instant::now(),
                failures: 0,
            };
            // A retired slot nothing refers to any more is reused (so the
            // list does not grow with every address a service ever had);
            // its generation goes on, so old events stay ignored.
            match self.free_slot() {
                Some(idx) => {
                    let old = &self.workers[idx];
                    let _ = self.metrics.rtt_us.remove_label_values(&[&old.entry]);
                    let generation = old.generation + 1;
                    self.workers[idx] = WorkerSlot { generation, ..slot };
                }
                None => self.workers.push(slot),
            }
        }
    }

    /// Whether a session is on worker `idx`.
    fn has_sessions(&self, idx: usize) -> bool {
        self.sessions.values().any(|s| s.worker == Some(idx))
    }

    /// A retired slot with no link, no connection attempt and no session.
    fn free_slot(&self) -> Option<usize> {
        (0..self.workers.len()).find(|&idx| {
            let w = &self.workers[idx];
            w.retired && w.link.is_none() && !w.connecting && !self.has_sessions(idx)
        })
    }

    /// Close the links of retired workers that no session is on any more.
    fn let_go(&mut self) {
        let mut changed = false;
        for idx in 0..self.workers.len() {
            let w = &self.workers[idx];
            if !w.retired || w.link.is_none() || self.has_sessions(idx) {
                continue;
            }
            let w = &mut self.workers[idx];
            if let Some(link) = w.link.take() {
                link.conn
                    .close((ErrorCode::Closed as u32).into(), b"gone from DNS");
            }
            // Its link's last events are ignored.
            w.generation += 1;
            let _ = self.metrics.rtt_us.remove_label_values(&[&w.entry]);
            tracing::info!(worker = %w.source, "offload worker let go (gone from DNS, no sessions left)");
            self.metrics
                .workers_up
                .with_label_values(&[&self.shard])
                .dec();
            changed = true;
        }
        if changed {
            self.publish();
        }
    }

    fn unplace(&mut self, key: u64) {
        if let Some(s) = self.sessions.get_mut(&key) {
            if s.worker.take().is_some() {
                self.metrics.sessions.dec();
            }
            s.writer = None;
        }
    }

    fn replace(&mut self, key: u64, reason: String) {
        if self.place(key) {
            self.metrics.moves.with_label_values(&["moved"]).inc();
            let _ = self.events.send(PoolEvent::Moved { key });
        } else {
            self.metrics.moves.with_label_values(&["waiting"]).inc();
            let _ = self.events.send(PoolEvent::Lost { key, reason });
        }
    }

    fn tick(&mut self, itx: &mpsc::UnboundedSender<Internal>) {
        self.let_go();
        let now = Instant::now();
        for (idx, w) in self.workers.iter_mut().enumerate() {
            if w.link.is_some() || w.connecting || w.retired || now < w.next_try {
                continue;
            }
            let ep = match self.endpoints.get(&w.addr.is_ipv6()) {
                Some(ep) => ep.clone(),
                None => match client_endpoint(self.tls.clone(), w.addr) {
                    Ok(ep) => {
                        self.endpoints.insert(w.addr.is_ipv6(), ep.clone());
                        ep
                    }
                    Err(e) => {
                        tracing::warn!("offload: no client endpoint: {e}");
                        return;
                    }
                },
            };
            w.connecting = true;
            let (addr, name, agent, tx) = (
                w.addr,
                w.server_name.clone(),
                self.agent.clone(),
                itx.clone(),
            );
            tokio::spawn(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    Link::connect(&ep, addr, &name, &agent),
                )
                .await;
                let _ = tx.send(match r {
                    Ok(Ok((link, events))) => Internal::Connected { idx, link, events },
                    Ok(Err(e)) => Internal::Failed {
                        idx,
                        why: e.to_string(),
                    },
                    Err(_) => Internal::Failed {
                        idx,
                        why: "connection timed out".into(),
                    },
                });
            });
        }
    }
}

/// Look the configured workers up (host names through DNS) and report them
/// to the manager, again every `dns_refresh_s`, sooner after a failure (1,
/// 2, 4 s ... up to it), until the pool ends.
async fn resolve(config: OffloadConfig, resolver: Resolver, tx: mpsc::UnboundedSender<Internal>) {
    let every = Duration::from_secs(u64::from(config.dns_refresh_s.max(1)));
    let mut failures = 0u32;
    loop {
        let mut found = Vec::new();
        let mut failed = false;
        for entry in &config.workers {
            let host = entry
                .rsplit_once(':')
                .map_or(entry.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = config.server_name.clone().unwrap_or_else(|| host.clone());
            let lookup = match resolver.lookup(entry).await {
                Ok(addrs) if addrs.is_empty() => Err("no addresses".to_string()),
                other => other,
            };
            failed |= lookup.is_err();
            found.push((entry.clone(), name, lookup));
        }
        if tx.send(Internal::Resolved(found)).is_err() {
            return;
        }
        failures = if failed { failures + 1 } else { 0 };
        let wait = if failed {
            Duration::from_secs(1 << failures.min(12).saturating_sub(1)).min(every)
        } else {
            every
        };
        tokio::time::sleep(wait).await;
    }
}

/// While frames are dropped waiting for a keyframe, the publisher is asked
/// again this often: a browser drops a request that follows another within
/// 300 ms (Chromium), and the worker must not wait for the next natural
/// keyframe, seconds away.
const KEYFRAME_REASK: Duration = Duration::from_millis(350);

/// Source frames queued for one worker session (about 2 s of video).
const WRITE_QUEUE: usize = 64;

/// Write a session's source frames to its worker, a group (stream) per
/// GOP. Frames before the first keyframe (and after a failed write, until
/// the next keyframe) are dropped: the worker could not decode them; the
/// shard is asked again for a keyframe every [`KEYFRAME_REASK`] meanwhile.
async fn write_groups(
    conn: quinn::Connection,
    key: u64,
    mut frames: mpsc::Receiver<Frame>,
    deadline_ms: u16,
    metrics: OffloadMetrics,
    events: mpsc::UnboundedSender<PoolEvent>,
) {
    let mut group: Option<GroupSender> = None;
    let mut number = 0u32;
    // `place` asked for the first keyframe.
    let mut asked = Instant::now();
    while let Some(mut frame) = frames.recv().await {
        frame.deadline_ms = deadline_ms;
        if frame.key {
            if let Some(g) = group.take() {
                g.finish();
            }
            number = number.wrapping_add(1);
            let header = GroupHeader {
                session: key,
                track: 0,
                group: number,
            };
            match GroupSender::open(&conn, header).await {
                Ok(g) => group = Some(g),
                Err(_) => {
                    if conn.close_reason().is_some() {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(g) = group.as_mut() else {
            if asked.elapsed() >= KEYFRAME_REASK {
                asked = Instant::now();
                let _ = events.send(PoolEvent::NeedKeyframe { key });
            }
            continue;
        };
        if g.frame(frame).await.is_ok() {
            metrics.frames.with_label_values(&["to_worker"]).inc();
        } else {
            group = None;
        }
    }
    if let Some(g) = group {
        g.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(workers: &[(&str, bool, u32)]) -> PoolStatus {
        let p = PoolStatus::default();
        *p.0.lock().expect("lock") = workers
            .iter()
            .map(|(name, up, sessions)| WorkerStatus {
                worker: (*name).into(),
                up: *up,
                rtt_us: if *up { 400 } else { 0 },
                sessions: *sessions,
                max_sessions: 8,
                captions: 0,
                max_captions: if *up { 2 } else { 0 },
                load_permille: 125,
                retired: name.starts_with("old"),
            })
            .collect();
        p
    }

    #[test]
    fn readiness_sums_the_shards_pools_per_worker() {
        assert_eq!(readiness(&[]), "");
        let text = readiness(&[
            pool(&[("a", true, 2), ("b", false, 0)]),
            pool(&[("a", true, 2), ("b", false, 0)]),
        ]);
        assert!(text.contains("offload: 1 of 2 workers up\n"), "{text}");
        assert!(
            text.contains(
                "worker a: up on 2 of 2 shards, rtt 0.4 ms, sessions 2/8, captions 0/2, load 12.5%\n"
            ),
            "{text}"
        );
        assert!(text.contains("worker b: down\n"), "{text}");
        let text = readiness(&[pool(&[("a", false, 0)])]);
        assert!(text.contains("no worker up"), "{text}");
        let text = readiness(&[pool(&[("old", true, 1)])]);
        assert!(
            text.contains(
                "load 12.5%, gone from DNS (no new sessions; let go when its sessions end)\n"
            ),
            "{text}"
        );
        assert!(readiness(&[pool(&[("a", true, 1)])]).contains("load 12.5%\n"));
    }
}
