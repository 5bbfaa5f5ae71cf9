//! The SFU's worker pool against real balie-transcoder workers on loopback:
//! placement on the least-loaded worker, layers that decode, and a session
//! moved within 2 s when its worker dies without a word.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use balie_offload::tls::{make_dev_certs, TlsFiles};
use balie_offload::{Codec, Frame, Size};
use balie_sfu::offload::{
    Lookup, OffloadConfig, OffloadMetrics, OffloadSetup, Pool, PoolCommand, PoolEvent, PoolStatus,
    Resolver,
};
use balie_transcoder::clip::{self, ClipFrame};
use balie_transcoder::metrics::Metrics as WorkerMetrics;
use balie_transcoder::pipeline::Decoder;
use balie_transcoder::server::{Worker, WorkerConfig};
use common::worker::{offload_config, TestWorker};

fn setup(config: &OffloadConfig, registry: &prometheus::Registry) -> OffloadSetup {
    OffloadSetup {
        config: config.clone(),
        agent: "test-sfu".into(),
        metrics: OffloadMetrics::new(registry),
        status: PoolStatus::default(),
        resolver: Default::default(),
    }
}

/// A source as a publisher sends it: the clip, and on request the same
/// picture as a keyframe (from an all-keyframe encoding).
struct Source {
    clip: Vec<ClipFrame>,
    keys: Vec<ClipFrame>,
    next: usize,
    want_key: bool,
}

impl Source {
    fn new() -> Source {
        static CLIPS: std::sync::OnceLock<(Vec<ClipFrame>, Vec<ClipFrame>)> =
            std::sync::OnceLock::new();
        let (clip, keys) = CLIPS.get_or_init(|| {
            let hd = Size {
                width: 1280,
                height: 720,
            };
            (
                clip::make(Codec::Vp8, hd, 150, 150, 1500).expect("clip"),
                clip::make(Codec::Vp8, hd, 150, 1, 1500).expect("key clip"),
            )
        });
        Source {
            clip: clip.clone(),
            keys: keys.clone(),
            next: 0,
            want_key: false,
        }
    }

    fn frame(&mut self) -> Frame {
        let i = self.next % self.clip.len();
        self.next += 1;
        let f = if std::mem::take(&mut self.want_key) {
            &self.keys[i]
        } else {
            &self.clip[i]
        };
        Frame {
            rtp_time: (self.next as u32) * 3000,
            deadline_ms: 0,
            key: f.key,
            data: f.data.clone().into(),
        }
    }
}

#[derive(Default)]
struct Seen {
    frames: HashMap<(u64, u8), Vec<(Instant, Frame)>>,
    moved: Vec<(u64, Instant)>,
    layouts: Vec<(u64, Vec<Size>)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_workers_and_move_within_2_s_when_one_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let mut a = TestWorker::start(dir.path());
    let b = TestWorker::start(dir.path());
    let cfg = offload_config(dir.path(), &[&a, &b]);
    cfg.check().expect("valid config");
    let registry = prometheus::Registry::new();
    let (pool, mut events) = Pool::start(&setup(&cfg, &registry), "0".into()).expect("pool");
    // Let both connections come up.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut sources: HashMap<u64, Source> = [(1, Source::new()), (2, Source::new())].into();
    for key in [1, 2] {
        assert!(pool.send(PoolCommand::Open {
            key,
            codec: Codec::Vp8
        }));
    }
    let mut seen = Seen::default();
    let start = Instant::now();
    let mut killed_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(33));
    while start.elapsed() < Duration::from_secs(7) {
        tokio::select! {
            _ = tick.tick() => {
                for (key, src) in sources.iter_mut() {
                    pool.send(PoolCommand::Frame { key: *key, frame: src.frame() });
                }
            }
            Some(ev) = events.recv() => match ev {
                PoolEvent::Frame { key, track, frame } => {
                    seen.frames.entry((key, track)).or_default().push((Instant::now(), frame));
                }
                PoolEvent::NeedKeyframe { key } => {
                    if let Some(s) = sources.get_mut(&key) { s.want_key = true; }
                }
                PoolEvent::Moved { key } => seen.moved.push((key, Instant::now())),
                PoolEvent::Layout { key, layers, .. } => seen.layouts.push((key, layers)),
                PoolEvent::Lost { key, reason } => panic!("session {key} lost: {reason}"),
                PoolEvent::Caption { key, .. } => panic!("a caption for video session {key}"),
            }
        }
        if killed_at.is_none() && start.elapsed() >= Duration::from_secs(3) {
            // One session on each worker: the least loaded was chosen.
            assert_eq!((a.sessions(), b.sessions()), (1, 1));
            a.kill();
            killed_at = Some(Instant::now());
        }
    }
    let killed_at = killed_at.expect("killed");

    // Both sessions had both layers, decoding at the configured sizes
    // (lowest first: a quarter, then half of 1280x720).
    for key in [1, 2] {
        for (track, size) in [(1u8, (320, 180)), (2, (640, 360))] {
            let frames = &seen.frames[&(key, track)];
            let before: Vec<_> = frames.iter().filter(|(t, _)| *t < killed_at).collect();
            assert!(
                before.len() >= 60,
                "session {key} track {track}: {}",
                before.len()
            );
            let mut dec = Decoder::new(Codec::Vp8).expect("decoder");
            let mut sizes = Vec::new();
            for (_, f) in &before {
                if let Ok(Some(p)) = dec.decode(&f.data, i64::from(f.rtp_time)) {
                    sizes.push((p.width(), p.height()));
                }
            }
            assert!(
                sizes.len() >= 60 && sizes.iter().all(|s| *s == size),
                "{sizes:?}"
            );
        }
    }
    // The session on the dead worker moved, and its low layer came back
    // within 2 s of the kill; the other session never stopped.
    assert_eq!(seen.moved.len(), 1, "{:?}", seen.moved);
    let (moved_key, moved_at) = seen.moved[0];
    let back = seen.frames[&(moved_key, 1)]
        .iter()
        .find(|(t, _)| *t > moved_at)
        .map(|(t, _)| *t)
        .expect("layer frames after the move");
    let gap = back.duration_since(killed_at);
    eprintln!(
        "worker killed: moved after {:?}, low layer back after {gap:?}",
        moved_at.duration_since(killed_at)
    );
    assert!(
        gap <= Duration::from_secs(2),
        "low layer back after {gap:?}"
    );
    assert_eq!(b.sessions(), 2);
    assert_eq!(
        (losses(&registry, "lost"), losses(&registry, "stopped")),
        (1.0, 0.0)
    );
    let other = 3 - moved_key;
    let after = seen.frames[&(other, 1)]
        .iter()
        .filter(|(t, _)| *t > killed_at)
        .count();
    assert!(
        after >= 90,
        "the other session got {after} frames after the kill"
    );
    assert!(seen.layouts.iter().all(|(_, l)| l
        == &[
            Size {
                width: 320,
                height: 180
            },
            Size {
                width: 640,
                height: 360
            }
        ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_worker_a_session_waits_and_is_placed_when_one_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    // A port with no worker yet.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let mut cfg = offload_config(dir.path(), &[]);
    cfg.workers = vec![addr.to_string()];
    let (pool, mut events) =
        Pool::start(&setup(&cfg, &prometheus::Registry::new()), "0".into()).expect("pool");
    pool.send(PoolCommand::Open {
        key: 5,
        codec: Codec::Vp8,
    });
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .expect("an event")
        .expect("open");
    assert!(matches!(ev, PoolEvent::Lost { key: 5, .. }), "{ev:?}");
    // A worker comes up on that port: the session is placed.
    let metrics = WorkerMetrics::new();
    let worker = Worker::bind(
        &WorkerConfig {
            listen: addr,
            tls: TlsFiles::dev_worker(dir.path()),
            max_sessions: 2,
            placement: Default::default(),
            captions: None,
        },
        metrics.clone(),
    )
    .expect("bind");
    tokio::spawn(worker.run());
    let moved = tokio::time::timeout(Duration::from_secs(6), async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, PoolEvent::Moved { key: 5 }) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(moved, Ok(true));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metrics.sessions.get(), 1);
}

/// A counter's value in `registry`: `series` is its name and label, as
/// `offload_dns_total{outcome="added"}`.
fn counter(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The pool's `offload_dns_total{outcome}` in `registry`.
fn dns_count(registry: &prometheus::Registry, outcome: &str) -> f64 {
    counter(
        registry,
        &format!("offload_dns_total{{outcome=\"{outcome}\"}}"),
    )
}

/// The pool's `offload_worker_losses_total{cause}` in `registry`.
fn losses(registry: &prometheus::Registry, cause: &str) -> f64 {
    counter(
        registry,
        &format!("offload_worker_losses_total{{cause=\"{cause}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_s_sessions_move_at_once_and_count_as_stopped_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let (a, b) = (TestWorker::start(dir.path()), TestWorker::start(dir.path()));
    let cfg = offload_config(dir.path(), &[&a, &b]);
    let registry = prometheus::Registry::new();
    let s = setup(&cfg, &registry);
    let status = s.status.clone();
    let (pool, mut events) = Pool::start(&s, "0".into()).expect("pool");
    assert!(eventually(Duration::from_secs(4), || workers_up(&status) == 2).await);
    assert!(pool.send(PoolCommand::Open {
        key: 1,
        codec: Codec::Vp8
    }));
    assert!(eventually(Duration::from_secs(2), || a.sessions() + b.sessions() == 1).await);
    let (on, other) = if a.sessions() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let stopped = Instant::now();
    on.stop();
    let moved = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(ev) = events.recv().await {
            if matches!(ev, PoolEvent::Moved { key: 1 }) {
                return Instant::now();
            }
        }
        panic!("the pool ended");
    })
    .await
    .expect("moved");
    let after = moved.duration_since(stopped);
    eprintln!("session moved {after:?} after its worker stopped");
    // A close frame, not a second of silence.
    assert!(after < Duration::from_millis(500), "{after:?}");
    assert!(eventually(Duration::from_secs(2), || other.sessions() == 1).await);
    assert_eq!(
        (losses(&registry, "stopped"), losses(&registry, "lost")),
        (1.0, 0.0)
    );
}

/// Workers a pool has connected.
fn workers_up(status: &PoolStatus) -> usize {
    status.snapshot().iter().filter(|w| w.up).count()
}

/// Wait up to `within` for `ok`, polling.
async fn eventually(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_follow_dns_new_ones_used_gone_ones_let_go_once_their_sessions_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let (a, b) = (TestWorker::start(dir.path()), TestWorker::start(dir.path()));
    // What the name resolves to now: the test plays DNS (a headless
    // service whose pods come and go), starting with a name that does not
    // resolve yet.
    let dns: std::sync::Arc<std::sync::Mutex<Lookup>> =
        std::sync::Arc::new(std::sync::Mutex::new(Err("NXDOMAIN".into())));
    let set = |addrs: Lookup| *dns.lock().expect("dns") = addrs;
    let mut cfg = offload_config(dir.path(), &[]);
    cfg.workers = vec!["transcoders.test:4470".into()];
    cfg.dns_refresh_s = 1;
    cfg.check().expect("valid config");
    let registry = prometheus::Registry::new();
    let mut s = setup(&cfg, &registry);
    let table = dns.clone();
    s.resolver = Resolver::new(move |entry: String| {
        assert_eq!(entry, "transcoders.test:4470");
        let now = table.lock().expect("dns").clone();
        async move { now }
    });
    let status = s.status.clone();
    let (pool, mut events) = Pool::start(&s, "0".into()).expect("pool");
    let open = |key| {
        assert!(pool.send(PoolCommand::Open {
            key,
            codec: Codec::Vp8
        }))
    };
    let mut next_event = async || {
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event in time")
            .expect("pool alive")
    };

    // Not resolvable: the session waits.
    open(1);
    let ev = next_event().await;
    assert!(matches!(ev, PoolEvent::Lost { key: 1, .. }), "{ev:?}");
    // The name resolves to worker a (tried again within a second or two):
    // the waiting session goes there.
    assert!(
        eventually(Duration::from_secs(3), || dns_count(&registry, "failed")
            >= 1.0)
        .await
    );
    set(Ok(vec![a.addr]));
    loop {
        match next_event().await {
            PoolEvent::Moved { key: 1 } => break,
            PoolEvent::NeedKeyframe { key: 1 } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(eventually(Duration::from_secs(2), || a.sessions() == 1).await);

    // Worker b appears: the next session goes to it, the less loaded.
    set(Ok(vec![a.addr, b.addr]));
    assert!(
        eventually(Duration::from_secs(4), || workers_up(&status) == 2).await,
        "{:?}",
        status.snapshot()
    );
    open(2);
    assert!(eventually(Duration::from_secs(2), || b.sessions() == 1).await);

    // Worker a is gone from DNS: it keeps session 1 but takes no new one,
    // though it is as loaded as b.
    set(Ok(vec![b.addr]));
    assert!(
        eventually(Duration::from_secs(5), || dns_count(&registry, "retired")
            == 1.0)
        .await
    );
    open(3);
    assert!(eventually(Duration::from_secs(2), || b.sessions() == 2).await);
    assert_eq!(a.sessions(), 1, "session 1 stays where it is");
    assert_eq!(a.metrics.connections.get(), 1);
    let now = status.snapshot();
    assert!(
        now.iter()
            .any(|w| w.worker.contains(&a.addr.to_string()) && w.up && w.retired),
        "/readyz says a is gone from DNS: {now:?}"
    );
    // Session 1 ends: a is let go (its connection closed), and /readyz no
    // longer lists it.
    assert!(pool.send(PoolCommand::Close { key: 1 }));
    assert!(
        eventually(Duration::from_secs(3), || a.metrics.connections.get() == 0).await,
        "a still connected"
    );
    let now = status.snapshot();
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(
        now[0].worker.contains(&b.addr.to_string()) && now[0].up,
        "{now:?}"
    );

    // A failed lookup changes nothing: b stays and takes sessions.
    let failed = dns_count(&registry, "failed");
    set(Err("SERVFAIL".into()));
    assert!(
        eventually(Duration::from_secs(5), || dns_count(&registry, "failed")
            > failed)
        .await
    );
    open(4);
    assert!(eventually(Duration::from_secs(2), || b.sessions() == 3).await);
    assert_eq!(
        (
            dns_count(&registry, "added"),
            dns_count(&registry, "retired")
        ),
        (2.0, 1.0)
    );
    assert!(dns_count(&registry, "failed") >= 2.0);
    drop(b);
}

#[test]
fn offload_config_errors_name_the_field() {
    let base = "[auth]\nhs256_secret = \"x\"\n[media]\nudp_bind = \"127.0.0.1\"\n";
    for (extra, words) in [
        ("[offload]\nworkers = [\"w:4470\"]\n", "offload.ca"),
        (
            "[offload]\nworkers = [\"w\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            "not host:port",
        ),
        (
            "[offload]\nworkers = [\"w:1\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nlayers = [{ scale_down = 1, bitrate_kbps = 100 }]\n",
            "scale_down",
        ),
        (
            "[offload]\nworkers = [\"w:1\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\ndns_refresh_s = 0\n",
            "offload.dns_refresh_s",
        ),
        ("[offload]\nworkerz = []\n", "unknown field"),
    ] {
        let err = balie_sfu::Config::parse(&format!("{base}{extra}"), "test")
            .expect_err("invalid")
            .to_string();
        assert!(err.contains(words), "{err} lacks {words}");
    }
}

/// A worker that says hello and takes sessions but never reads their
/// media, with small flow-control windows: its streams block at once.
async fn stalled_worker(dir: &Path) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use balie_offload::io::{read_control, write_control};
    use balie_offload::{Capacity, Control};
    let mut cfg = balie_offload::tls::server_config(&TlsFiles::dev_worker(dir)).expect("config");
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(16_000u32.into());
    t.receive_window(64_000u32.into());
    t.max_concurrent_uni_streams(4u32.into());
    cfg.transport_config(std::sync::Arc::new(t));
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let addr = ep.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let Some(incoming) = ep.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let _ = read_control(&mut recv).await;
        let hello = Control::Hello {
            version: balie_offload::wire::VERSION,
            agent: "stalled".into(),
            max_sessions: 4,
            max_captions: 0,
        };
        let _ = write_control(&mut send, &hello).await;
        let cap = Control::Capacity(Capacity {
            sessions: 0,
            max_sessions: 4,
            queue_depth: 0,
            load_permille: 0,
            ..Capacity::default()
        });
        let _ = write_control(&mut send, &cap).await;
        // Read control messages (the open) forever; never a media stream.
        while let Ok(Some(_)) = read_control(&mut recv).await {}
        drop(ep);
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_reading_costs_dropped_frames_not_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let (addr, _task) = stalled_worker(dir.path()).await;
    let mut cfg = offload_config(dir.path(), &[]);
    cfg.workers = vec![addr.to_string()];
    let registry = prometheus::Registry::new();
    let s = setup(&cfg, &registry);
    let (pool, mut events) = Pool::start(&s, "0".into()).expect("pool");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pool.send(PoolCommand::Open {
        key: 9,
        codec: Codec::Vp8,
    });
    // 20 s of video as fast as it comes.
    let mut src = Source::new();
    for _ in 0..600 {
        pool.send(PoolCommand::Frame {
            key: 9,
            frame: src.frame(),
        });
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dropped = s.metrics.dropped.get();
    let mut asked = 0;
    while let Ok(ev) = events.try_recv() {
        if matches!(ev, PoolEvent::NeedKeyframe { key: 9 }) {
            asked += 1;
        }
    }
    eprintln!("dropped {dropped} of 600 frames, {asked} keyframe requests");
    // Every frame past what the blocked stream and the queue hold is dropped.
    assert!(dropped >= 400, "dropped {dropped}");
    assert!(
        asked >= 2,
        "the publisher is asked for a keyframe to resume on"
    );
}
