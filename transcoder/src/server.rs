//! The worker's QUIC server: accepts SFU connections (mutual TLS), runs the
//! control stream, feeds source groups to sessions and writes their layers
//! back, one group (GOP) per stream.
//!
//! Per connection: the control loop (this task), a control writer, a media
//! writer, an acceptor for the SFU's source streams (one task per stream)
//! and a capacity reporter. Bad input from a peer is counted and answered
//! with a protocol error on the stream it came on (a malformed control
//! message closes the connection with [`Control::Error`] first; a malformed
//! source stream is stopped); it never ends the process or another
//! connection's sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balie_offload::io::{read_control, read_media, write_control, write_media, ReadError};
use balie_offload::tls::{server_config, TlsError, TlsFiles};
use balie_offload::{Capacity, Control, ErrorCode, Frame, GroupHeader, Media, VERSION};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::captions::session::CaptionSession;
use crate::captions::whisper::Whisper;
use crate::metrics::Metrics;
use crate::pipeline::Placement;
use crate::session::{Out, Session};

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// Sessions held at most, over all connections.
    pub max_sessions: u32,
    /// Which sessions run on the CPU and which on the GPU (feature `cuda`).
    pub placement: Placement,
    /// Caption sessions, when the worker makes captions.
    pub captions: Option<CaptionsSetup>,
}

/// What a worker that makes captions needs.
#[derive(Clone)]
pub struct CaptionsSetup {
    /// The model, shared by every caption session.
    pub whisper: Arc<Whisper>,
    /// Caption sessions held at most, over all connections.
    pub max_sessions: u32,
}

impl std::fmt::Debug for CaptionsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionsSetup")
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Media(#[from] crate::pipeline::PipelineError),
}

struct Shared {
    metrics: Metrics,
    max_sessions: u32,
    placement: Placement,
    open: AtomicU32,
    captions: Option<CaptionsSetup>,
    open_captions: AtomicU32,
    agent: String,
    load: Mutex<CpuLoad>,
}

/// A bound worker; [`Worker::run`] serves until the endpoint closes.
pub struct Worker {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

/// Stop the worker of `endpoint` on purpose: a close frame on every SFU
/// connection ([`ErrorCode::Closed`]), so each SFU moves the worker's
/// sessions at once, where a worker that died is noticed after a second of
/// silence, and counts it as stopped, not lost.
pub fn stop(endpoint: &quinn::Endpoint) {
    endpoint.close((ErrorCode::Closed as u32).into(), b"shutdown");
}

impl Worker {
    pub fn bind(config: &WorkerConfig, metrics: Metrics) -> Result<Worker, StartError> {
        crate::pipeline::init()?;
        let server = server_config(&config.tls)?;
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let placement = config
            .placement
            .clone()
            .counted(metrics.gpu_video_sessions.clone());
        metrics.max_sessions.set(i64::from(config.max_sessions));
        metrics.max_captions.set(
            config
                .captions
                .as_ref()
                .map_or(0, |c| i64::from(c.max_sessions)),
        );
        Ok(Worker {
            endpoint,
            shared: Arc::new(Shared {
                metrics,
                max_sessions: config.max_sessions,
                placement,
                open: AtomicU32::new(0),
                captions: config.captions.clone(),
                open_captions: AtomicU32::new(0),
                agent: format!(
                    "balie-transcoder {} {}",
                    env!("CARGO_PKG_VERSION"),
                    config.placement.describe()
                ),
                load: Mutex::new(CpuLoad::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A handle to close the worker (every connection) from elsewhere
    /// ([`stop`]).
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    pub async fn run(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            tokio::spawn(connection(incoming, self.shared.clone()));
        }
    }
}

/// A session with its place in the worker's session count.
struct Entry {
    work: Work,
    /// The newest source group seen; older groups are stale.
    group: u32,
    _slot: Slot,
}

/// What a session does with its source.
enum Work {
    /// Transcode video into layers.
    Layers(Session),
    /// Make captions of audio.
    Captions(CaptionSession),
}

/// A place in the worker's count of sessions (video or captions), given
/// back when dropped.
struct Slot {
    shared: Arc<Shared>,
    captions: bool,
}

impl Slot {
    /// Take a place if one is free.
    fn take(shared: &Arc<Shared>, captions: bool) -> Option<Slot> {
        let (count, max, gauge) = if captions {
            let max = shared.captions.as_ref().map_or(0, |c| c.max_sessions);
            (&shared.open_captions, max, &shared.metrics.caption_sessions)
        } else {
            (&shared.open, shared.max_sessions, &shared.metrics.sessions)
        };
        count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        gauge.inc();
        Some(Slot {
            shared: shared.clone(),
            captions,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.captions {
            self.shared.open_captions.fetch_sub(1, Ordering::Relaxed);
            self.shared.metrics.caption_sessions.dec();
        } else {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            self.shared.metrics.sessions.dec();
        }
    }
}

type Sessions = Arc<Mutex<HashMap<u64, Entry>>>;

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
    // A panic while holding the map cannot leave it inconsistent (every
    // update is a single insert or remove), so a poisoned lock is usable.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a source group waits for its session's open to be read.
const OPEN_WAIT: Duration = Duration::from_secs(1);

async fn connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let metrics = shared.metrics.clone();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            metrics.handshake_failures.inc();
            debug!(error = %e, "offload handshake failed");
            return;
        }
    };
    metrics.connections.inc();
    let id = conn.stable_id();
    info!(conn = id, "SFU connected");
    let why = serve(&conn, &shared).await;
    info!(conn = id, reason = %why, "SFU connection ended");
    metrics.connections.dec();
}

/// Close the connection for a protocol error of the peer, telling it why.
async fn protocol_error(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    metrics: &Metrics,
    code: ErrorCode,
    reason: String,
) -> String {
    count_protocol_error(metrics, code, &reason);
    let msg = Control::Error {
        code,
        reason: reason.clone(),
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), write_control(&mut send, &msg)).await;
    flush_and_close(conn, Some(send), code, &reason).await;
    format!("protocol error: {reason}")
}

fn count_protocol_error(metrics: &Metrics, code: ErrorCode, reason: &str) {
    metrics
        .protocol_errors
        .with_label_values(&[code.name()])
        .inc();
    warn!(code = code.name(), %reason, "protocol error from SFU");
}

/// Finish the control stream, give the peer up to half a second to read
/// it (closing at once would discard the error message), then close.
async fn flush_and_close(
    conn: &quinn::Connection,
    send: Option<quinn::SendStream>,
    code: ErrorCode,
    reason: &str,
) {
    if let Some(mut send) = send {
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    conn.close((code as u32).into(), reason.as_bytes());
}

async fn serve(conn: &quinn::Connection, shared: &Arc<Shared>) -> String {
    let metrics = &shared.metrics;
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => {
            conn.close((ErrorCode::Unexpected as u32).into(), b"no control stream");
            return "no control stream".into();
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, read_control(&mut recv)).await {
        Err(_) => {
            let r = "no hello within 3 s".to_owned();
            return protocol_error(conn, send, metrics, ErrorCode::Unexpected, r).await;
        }
        Ok(Ok(Some(Control::Hello { version, .. }))) if version == VERSION => {}
        Ok(Ok(Some(Control::Hello { version, .. }))) => {
            let r = format!("protocol version {version} is not spoken here (only {VERSION})");
            return protocol_error(conn, send, metrics, ErrorCode::Version, r).await;
        }
        Ok(Ok(Some(other))) => {
            let r = format!("expected a hello, got {}", kind(&other));
            return protocol_error(conn, send, metrics, ErrorCode::Unexpected, r).await;
        }
        Ok(Ok(None)) => return "control stream ended before hello".into(),
        Ok(Err(ReadError::Wire(e))) => {
            return protocol_error(conn, send, metrics, e.code(), e.to_string()).await;
        }
        Ok(Err(e)) => return e.to_string(),
    }
    let hello = Control::Hello {
        version: VERSION,
        agent: shared.agent.clone(),
        max_sessions: shared.max_sessions,
        max_captions: shared.captions.as_ref().map_or(0, |c| c.max_sessions),
    };
    if let Err(e) = write_control(&mut send, &hello).await {
        return e.to_string();
    }

    let sessions: Sessions = Arc::default();
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(256);
    let (out_tx, out_rx) = mpsc::channel::<Out>(256);
    let _ = ctl_tx.try_send(Control::Capacity(capacity(shared, &sessions)));
    let writer = tokio::spawn(control_writer(send, ctl_rx));
    let media = tokio::spawn(media_writer(
        conn.clone(),
        out_rx,
        ctl_tx.clone(),
        metrics.clone(),
    ));
    let sources = tokio::spawn(accept_sources(
        conn.clone(),
        sessions.clone(),
        ctl_tx.clone(),
        metrics.clone(),
    ));
    let reporter = tokio::spawn(report_capacity(
        shared.clone(),
        sessions.clone(),
        ctl_tx.clone(),
    ));

    let ending = loop {
        let msg = match read_control(&mut recv).await {
            Ok(Some(m)) => m,
            Ok(None) => break None,
            Err(ReadError::Wire(e)) => break Some((e.code(), e.to_string())),
            Err(e) => break Some((ErrorCode::Closed, e.to_string())),
        };
        match msg {
            Control::Open {
                session,
                codec,
                layers,
            } => {
                let Some(slot) = admit(shared, &sessions, &ctl_tx, session, false).await else {
                    continue;
                };
                let started = Session::start(
                    session,
                    codec,
                    layers,
                    shared.placement.take(),
                    out_tx.clone(),
                    metrics.clone(),
                )
                .await;
                debug!(session, codec = codec.name(), ok = started.is_ok(), "open");
                opened(
                    shared,
                    &sessions,
                    &ctl_tx,
                    session,
                    slot,
                    started.map(Work::Layers),
                )
                .await;
            }
            Control::OpenCaptions { session, language } => {
                let Some(slot) = admit(shared, &sessions, &ctl_tx, session, true).await else {
                    continue;
                };
                // admit() refuses captions without a model.
                let Some(setup) = shared.captions.as_ref() else {
                    continue;
                };
                let started = CaptionSession::start(
                    session,
                    language,
                    setup.whisper.clone(),
                    out_tx.clone(),
                    metrics.clone(),
                )
                .await;
                debug!(session, ok = started.is_ok(), "caption session open");
                opened(
                    shared,
                    &sessions,
                    &ctl_tx,
                    session,
                    slot,
                    started.map(Work::Captions),
                )
                .await;
            }
            Control::Close { session } => {
                if lock(&sessions).remove(&session).is_some() {
                    debug!(session, "session closed");
                    let _ = out_tx.send(Out::Closed { session }).await;
                    let _ = ctl_tx.try_send(Control::Capacity(capacity(shared, &sessions)));
                }
            }
            Control::Keyframe { session, track } => {
                if let Some(Work::Layers(s)) = lock(&sessions).get(&session).map(|e| &e.work) {
                    s.keyframe(track);
                }
            }
            Control::Error { code, reason } => {
                warn!(code = code.name(), %reason, "the SFU reported a protocol error");
                break Some((
                    ErrorCode::Closed,
                    format!("SFU reported an error: {reason}"),
                ));
            }
            other => {
                let r = format!("{} is not sent by an SFU", kind(&other));
                break Some((ErrorCode::Unexpected, r));
            }
        }
    };
    lock(&sessions).clear();
    for task in [reporter, sources, media] {
        task.abort();
        let _ = task.await;
    }
    match ending {
        None => {
            drop(ctl_tx);
            let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
            "control stream ended".into()
        }
        // The connection is gone (lost, or the SFU reported an error).
        Some((ErrorCode::Closed, why)) => why,
        Some((code, reason)) => {
            count_protocol_error(metrics, code, &reason);
            let _ = ctl_tx
                .send(Control::Error {
                    code,
                    reason: reason.clone(),
                })
                .await;
            drop(ctl_tx);
            let send = tokio::time::timeout(Duration::from_millis(200), writer)
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten();
            flush_and_close(conn, send, code, &reason).await;
            format!("protocol error: {reason}")
        }
    }
}

/// Take a place for a new session, or tell the SFU why not.
async fn admit(
    shared: &Arc<Shared>,
    sessions: &Sessions,
    ctl: &mpsc::Sender<Control>,
    session: u64,
    captions: bool,
) -> Option<Slot> {
    let refusal = if lock(sessions).contains_key(&session) {
        Some((
            ErrorCode::UnknownSession,
            "session id already open".to_owned(),
        ))
    } else if captions && shared.captions.is_none() {
        let r = "this worker makes no captions (start it with --captions)".to_owned();
        Some((ErrorCode::Unsupported, r))
    } else {
        None
    };
    let refusal = match refusal {
        Some(r) => r,
        None => match Slot::take(shared, captions) {
            Some(slot) => return Some(slot),
            None if captions => {
                let max = shared.captions.as_ref().map_or(0, |c| c.max_sessions);
                (
                    ErrorCode::Capacity,
                    format!("worker full ({max} caption sessions)"),
                )
            }
            None => (
                ErrorCode::Capacity,
                format!("worker full ({} sessions)", shared.max_sessions),
            ),
        },
    };
    refuse(&shared.metrics, ctl, session, refusal).await;
    None
}

async fn refuse(
    metrics: &Metrics,
    ctl: &mpsc::Sender<Control>,
    session: u64,
    (code, reason): (ErrorCode, String),
) {
    metrics.opens.with_label_values(&[code.name()]).inc();
    let _ = ctl
        .send(Control::Ended {
            session,
            code,
            reason,
        })
        .await;
}

/// A session started (or failed to): hold it, or tell the SFU why not.
async fn opened(
    shared: &Arc<Shared>,
    sessions: &Sessions,
    ctl: &mpsc::Sender<Control>,
    session: u64,
    slot: Slot,
    started: Result<Work, (ErrorCode, String)>,
) {
    match started {
        Ok(work) => {
            shared.metrics.opens.with_label_values(&["opened"]).inc();
            lock(sessions).insert(
                session,
                Entry {
                    work,
                    group: 0,
                    _slot: slot,
                },
            );
            let _ = ctl.try_send(Control::Capacity(capacity(shared, sessions)));
        }
        Err(refusal) => {
            drop(slot);
            refuse(&shared.metrics, ctl, session, refusal).await;
        }
    }
}

fn kind(msg: &Control) -> &'static str {
    match msg {
        Control::Hello { .. } => "hello",
        Control::Capacity(_) => "capacity",
        Control::Open { .. } => "open",
        Control::Close { .. } => "close",
        Control::Keyframe { .. } => "keyframe",
        Control::Layout { .. } => "layout",
        Control::Ended { .. } => "ended",
        Control::Error { .. } => "error",
        Control::OpenCaptions { .. } => "open captions",
        Control::Caption(_) => "caption",
    }
}

/// Writes control messages until every sender is gone; hands the stream
/// back (None when writing failed).
async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Control>,
) -> Option<quinn::SendStream> {
    while let Some(msg) = rx.recv().await {
        write_control(&mut send, &msg).await.ok()?;
    }
    Some(send)
}

/// Writes each session's layers, one stream per group: a keyframe of a
/// layer starts a new group.
async fn media_writer(
    conn: quinn::Connection,
    mut rx: mpsc::Receiver<Out>,
    ctl: mpsc::Sender<Control>,
    metrics: Metrics,
) {
    let mut groups: HashMap<(u64, u8), (u32, Option<quinn::SendStream>)> = HashMap::new();
    while let Some(out) = rx.recv().await {
        let (session, frame) = match out {
            Out::Control(msg) => {
                let _ = ctl.send(msg).await;
                continue;
            }
            Out::Closed { session } => {
                groups.retain(|(s, _), (_, stream)| {
                    if *s == session {
                        if let Some(st) = stream {
                            let _ = st.finish();
                        }
                    }
                    *s != session
                });
                continue;
            }
            Out::Media { session, frame } => (session, frame),
        };
        let (number, stream) = groups.entry((session, frame.track)).or_insert((0, None));
        if frame.key {
            if let Some(mut old) = stream.take() {
                let _ = old.finish();
            }
            *number = number.wrapping_add(1);
            let header = GroupHeader {
                session,
                track: frame.track,
                group: *number,
            };
            let Ok(mut s) = conn.open_uni().await else {
                return;
            };
            if write_media(&mut s, &Media::Group(header)).await.is_err() {
                continue;
            }
            *stream = Some(s);
        }
        // Without an open group (the SFU stopped it), wait for a keyframe.
        let Some(s) = stream.as_mut() else {
            continue;
        };
        let msg = Media::Frame(Frame {
            rtp_time: frame.rtp_time,
            deadline_ms: 0,
            key: frame.key,
            data: frame.data.into(),
        });
        if write_media(s, &msg).await.is_ok() {
            metrics.frames_out.inc();
        } else {
            *stream = None;
        }
    }
}

async fn accept_sources(
    conn: quinn::Connection,
    sessions: Sessions,
    ctl: mpsc::Sender<Control>,
    metrics: Metrics,
) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(read_source(
            recv,
            sessions.clone(),
            ctl.clone(),
            metrics.clone(),
        ));
    }
}

fn stream_error(recv: &mut quinn::RecvStream, metrics: &Metrics, code: ErrorCode) {
    metrics
        .protocol_errors
        .with_label_values(&[code.name()])
        .inc();
    let _ = recv.stop((code as u32).into());
}

/// One source group: a header, then frames into the session's queue.
async fn read_source(
    mut recv: quinn::RecvStream,
    sessions: Sessions,
    ctl: mpsc::Sender<Control>,
    metrics: Metrics,
) {
    let header = match read_media(&mut recv).await {
        Ok(Some(Media::Group(h))) if h.track == 0 => h,
        Ok(Some(_)) => return stream_error(&mut recv, &metrics, ErrorCode::Unexpected),
        Ok(None) | Err(ReadError::Stream(_)) => return,
        Err(ReadError::Truncated) => {
            return stream_error(&mut recv, &metrics, ErrorCode::Malformed)
        }
        Err(ReadError::Wire(e)) => return stream_error(&mut recv, &metrics, e.code()),
    };
    // QUIC keeps no order between streams: a group may be read before the
    // open on the control stream. Its frames wait in the stream meanwhile.
    let waiting = Instant::now();
    while !lock(&sessions).contains_key(&header.session) {
        if waiting.elapsed() >= OPEN_WAIT {
            return stream_error(&mut recv, &metrics, ErrorCode::UnknownSession);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    {
        let mut map = lock(&sessions);
        match map.get_mut(&header.session) {
            None => {
                drop(map);
                return stream_error(&mut recv, &metrics, ErrorCode::UnknownSession);
            }
            Some(e) if header.group < e.group => {
                // Stale: a newer group already started.
                drop(map);
                let _ = recv.stop((ErrorCode::Closed as u32).into());
                return;
            }
            Some(e) => e.group = header.group,
        }
    }
    loop {
        let frame = match read_media(&mut recv).await {
            Ok(Some(Media::Frame(f))) => f,
            Ok(Some(Media::Group(_))) => {
                return stream_error(&mut recv, &metrics, ErrorCode::Unexpected)
            }
            Ok(None) | Err(ReadError::Stream(_)) => return,
            Err(ReadError::Truncated) => {
                return stream_error(&mut recv, &metrics, ErrorCode::Malformed)
            }
            Err(ReadError::Wire(e)) => return stream_error(&mut recv, &metrics, e.code()),
        };
        let ask_key = {
            let mut map = lock(&sessions);
            match map.get_mut(&header.session) {
                Some(e) if e.group == header.group => match &mut e.work {
                    Work::Layers(s) => s.push(frame, Instant::now()),
                    Work::Captions(c) => {
                        c.push(frame, Instant::now());
                        false
                    }
                },
                // Closed, or a newer group started: this one is stale.
                _ => {
                    drop(map);
                    let _ = recv.stop((ErrorCode::Closed as u32).into());
                    return;
                }
            }
        };
        if ask_key {
            let _ = ctl.try_send(Control::Keyframe {
                session: header.session,
                track: 0,
            });
        }
    }
}

fn capacity(shared: &Shared, sessions: &Sessions) -> Capacity {
    let queue: usize = lock(sessions)
        .values()
        .map(|e| match &e.work {
            Work::Layers(s) => s.queued(),
            Work::Captions(_) => 0,
        })
        .sum();
    let load = shared
        .load
        .lock()
        .map(|mut l| l.permille())
        .unwrap_or_default();
    Capacity {
        sessions: shared.open.load(Ordering::Relaxed),
        max_sessions: shared.max_sessions,
        queue_depth: queue as u32,
        load_permille: load,
        captions: shared.open_captions.load(Ordering::Relaxed),
        max_captions: shared.captions.as_ref().map_or(0, |c| c.max_sessions),
    }
}

async fn report_capacity(shared: Arc<Shared>, sessions: Sessions, ctl: mpsc::Sender<Control>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        if ctl
            .send(Control::Capacity(capacity(&shared, &sessions)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The process's CPU use since the last reading, in thousandths of all
/// cores.
struct CpuLoad {
    last: Option<(Instant, f64)>,
    value: u16,
}

impl CpuLoad {
    fn new() -> CpuLoad {
        CpuLoad {
            last: None,
            value: 0,
        }
    }

    fn permille(&mut self) -> u16 {
        let now = Instant::now();
        let cpu = crate::metrics::cpu_seconds();
        match self.last {
            Some((t, before)) => {
                let wall = now.duration_since(t).as_secs_f64();
                if wall >= 0.5 {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                    let busy = (cpu - before).max(0.0);
                    self.value = ((busy / wall / cores) * 1000.0).clamp(0.0, 1000.0) as u16;
                    self.last = Some((now, cpu));
                }
            }
            None => self.last = Some((now, cpu)),
        }
        self.value
    }
}
