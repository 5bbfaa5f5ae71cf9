//! One transcode session: a thread that owns the session's [`Pipeline`]
//! (FFmpeg contexts stay on one thread), fed through a short bounded queue.
//!
//! A queue that is full means the session cannot keep up: the frame is
//! dropped, and so is every frame until the next keyframe (the decoder
//! would only produce garbage without the dropped reference), and the SFU is
//! asked for a keyframe. A frame that waited past its deadline is decoded
//! but not encoded ([`Pipeline::push`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balie_offload::{Codec, Control, ErrorCode, Frame, LayerSpec};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::metrics::Metrics;
use crate::pipeline::{Backend, Encoded, GpuPlace, Pipeline, PipelineError};

/// Source frames a session may have waiting (about a second at 30 fps).
pub const QUEUE: usize = 32;

enum Job {
    Frame { frame: Frame, arrived: Instant },
    Keyframe(u8),
}

/// What a session sends towards the SFU.
#[derive(Debug)]
pub enum Out {
    /// A layer frame, for the media writer.
    Media { session: u64, frame: Encoded },
    /// A control message.
    Control(Control),
    /// The session was closed: finish its layers' streams.
    Closed { session: u64 },
}

/// The connection's handle on a running session. Dropping it stops the
/// session's thread after the frame it is working on; frames still queued
/// are dropped, not transcoded for nobody.
pub struct Session {
    jobs: SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Dropping frames until the next keyframe.
    skipping: bool,
    metrics: Metrics,
}

impl Session {
    /// Start a session's thread and its pipeline on `backend` (holding its
    /// place on the GPU, if it has one, until the pipeline ends). Fails
    /// (with the code to tell the SFU) when the pipeline cannot be built.
    pub async fn start(
        id: u64,
        codec: Codec,
        layers: Vec<LayerSpec>,
        (backend, place): (Backend, Option<GpuPlace>),
        out: mpsc::Sender<Out>,
        metrics: Metrics,
    ) -> Result<Session, (ErrorCode, String)> {
        let (jobs, rx) = sync_channel(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (q, st) = (queued.clone(), stop.clone());
        let m = metrics.clone();
        std::thread::Builder::new()
            .name(format!("session-{id}"))
            .spawn(move || {
                let cpu = {
                    let layers = layers.clone();
                    move || Pipeline::with_backend(codec, layers.clone(), &Backend::Cpu)
                };
                let (opened, place) = open_placed(
                    place,
                    || Pipeline::with_backend(codec, layers.clone(), &backend),
                    &cpu,
                    |e| {
                        m.gpu_fallbacks.inc();
                        warn!(session = id, error = %e, "the GPU could not open a pipeline; this session runs on the CPU");
                    },
                );
                match opened {
                    Ok(pipeline) => {
                        let _ = ready_tx.send(Ok(()));
                        let placed = Placed {
                            pipeline,
                            place,
                            cpu: Box::new(cpu),
                        };
                        run(id, placed, rx, q, st, out, m);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| (ErrorCode::Internal, format!("starting a thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Session {
                jobs,
                queued,
                stop,
                skipping: false,
                metrics,
            }),
            Ok(Err(why)) => Err((ErrorCode::Unsupported, why)),
            Err(_) => Err((ErrorCode::Internal, "the session thread ended".into())),
        }
    }

    /// Queue a source frame. Returns true when the SFU should be asked for a
    /// keyframe (a frame had to be dropped).
    pub fn push(&mut self, frame: Frame, arrived: Instant) -> bool {
        self.metrics.frames_in.inc();
        if self.skipping && !frame.key {
            self.metrics.dropped.with_label_values(&["queue"]).inc();
            return false;
        }
        self.skipping = false;
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.metrics.queue_depth.inc();
        match self.jobs.try_send(Job::Frame { frame, arrived }) {
            Ok(()) => false,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.metrics.queue_depth.dec();
                self.metrics.dropped.with_label_values(&["queue"]).inc();
                self.skipping = true;
                true
            }
        }
    }

    /// Ask for a keyframe on a layer (1-based track).
    pub fn keyframe(&self, track: u8) {
        let _ = self.jobs.try_send(Job::Keyframe(track));
    }

    /// Frames waiting.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Open a session's pipeline where it was placed: on its GPU place with
/// `gpu`, else with `cpu`. A pipeline the GPU could not open (its decoders
/// or memory exhausted, a driver error) is opened on the CPU instead, the
/// place given back and `fell_back` told why: the session is served, only
/// slower. Returns the pipeline and the place it holds.
fn open_placed<T, E>(
    mut place: Option<GpuPlace>,
    gpu: impl FnOnce() -> Result<T, E>,
    cpu: impl FnOnce() -> Result<T, E>,
    fell_back: impl FnOnce(&E),
) -> (Result<T, E>, Option<GpuPlace>) {
    if place.is_none() {
        return (cpu(), None);
    }
    let opened = gpu().or_else(|e| recover(&mut place, e, cpu, fell_back));
    (opened, place)
}

/// After the pipeline failed with `err`: where it held a GPU place, give the
/// place back, tell `fell_back` why and open the session on the CPU (a
/// driver error, the GPU's memory gone, a stream the GPU path does not
/// take: the session goes on, only slower, and its new decoder asks for a
/// keyframe); on the CPU already, the error stands and the session ends.
fn recover<T, E>(
    place: &mut Option<GpuPlace>,
    err: E,
    cpu: impl FnOnce() -> Result<T, E>,
    fell_back: impl FnOnce(&E),
) -> Result<T, E> {
    match place.take() {
        None => Err(err),
        Some(gpu) => {
            fell_back(&err);
            drop(gpu);
            cpu()
        }
    }
}

/// A session's pipeline, the GPU place it holds (given back when the
/// session ends or leaves the GPU), and how to open it on the CPU instead.
struct Placed {
    pipeline: Pipeline,
    place: Option<GpuPlace>,
    cpu: Box<dyn Fn() -> Result<Pipeline, PipelineError> + Send>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let left = self.queued.swap(0, Ordering::Relaxed);
        self.metrics.queue_depth.sub(left as i64);
    }
}

fn run(
    id: u64,
    mut placed: Placed,
    jobs: Receiver<Job>,
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    out: mpsc::Sender<Out>,
    metrics: Metrics,
) {
    let mut encoded = Vec::new();
    let stage = |name: &str| metrics.stage_seconds.with_label_values(&[name]);
    let (decode_h, scale_h, encode_h) = (stage("decode"), stage("scale"), stage("encode"));
    // While the decoder waits for a keyframe, ask the SFU again every
    // second (a publisher may drop a request that follows another closely).
    let mut asked_key: Option<Instant> = None;
    // A receiver still yields queued jobs after its sender is gone: the
    // stop flag ends the session at once.
    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (frame, arrived) = match job {
            Job::Keyframe(track) => {
                placed.pipeline.request_keyframe(track);
                continue;
            }
            Job::Frame { frame, arrived } => (frame, arrived),
        };
        // The session's handle may have been dropped and reset the count.
        if queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
        {
            metrics.queue_depth.dec();
        }
        let deadline = arrived + Duration::from_millis(u64::from(frame.deadline_ms));
        let pushed = match placed.pipeline.push(
            frame.rtp_time,
            frame.key,
            &frame.data,
            deadline,
            &mut encoded,
        ) {
            Ok(p) => p,
            Err(e) => {
                let on_cpu = recover(&mut placed.place, e, &placed.cpu, |e| {
                    metrics.gpu_fallbacks.inc();
                    warn!(session = id, error = %e, "the session's GPU pipeline failed; it goes on on the CPU");
                });
                match on_cpu {
                    Ok(p) => {
                        // This frame is lost; the next one finds the new
                        // decoder without its references and asks for a
                        // keyframe.
                        encoded.clear();
                        placed.pipeline = p;
                        continue;
                    }
                    Err(e) => {
                        let _ = out.blocking_send(Out::Control(Control::Ended {
                            session: id,
                            code: ErrorCode::Media,
                            reason: e.to_string(),
                        }));
                        return;
                    }
                }
            }
        };
        decode_h.observe(pushed.timings.decode.as_secs_f64());
        if pushed.late {
            metrics.dropped.with_label_values(&["deadline"]).inc();
        } else if !pushed.timings.scale.is_zero() {
            scale_h.observe(pushed.timings.scale.as_secs_f64());
            encode_h.observe(pushed.timings.encode.as_secs_f64());
        }
        if pushed.need_keyframe {
            metrics.dropped.with_label_values(&["broken"]).inc();
            if asked_key.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                asked_key = Some(Instant::now());
                let _ = out.blocking_send(Out::Control(Control::Keyframe {
                    session: id,
                    track: 0,
                }));
            }
        } else {
            asked_key = None;
        }
        if let Some((source, layers)) = pushed.layout {
            let msg = Control::Layout {
                session: id,
                source,
                layers,
            };
            if out.blocking_send(Out::Control(msg)).is_err() {
                return;
            }
        }
        for frame in encoded.drain(..) {
            if out
                .blocking_send(Out::Media { session: id, frame })
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{open_placed, recover};
    use crate::pipeline::{Backend, Placement};

    #[test]
    fn a_pipeline_the_gpu_cannot_open_runs_on_the_cpu_and_gives_its_place_back() {
        let placement = Placement::new(Backend::Cpu, 1);
        // The GPU opens it: the place is kept, the CPU never tried.
        let (opened, place) = open_placed(
            placement.take().1,
            || Ok::<_, String>("gpu"),
            || panic!("not the CPU"),
            |_| panic!("no fallback"),
        );
        assert_eq!(opened, Ok("gpu"));
        assert!(place.is_some());
        assert_eq!(placement.on_gpu(), 1);
        drop(place);
        // It cannot: the CPU does, told why, and the place is free again.
        let mut why = None;
        let (opened, place) = open_placed(
            placement.take().1,
            || Err("NVDEC: out of decoders".to_string()),
            || Ok("cpu"),
            |e| why = Some(e.clone()),
        );
        assert_eq!(opened, Ok("cpu"));
        assert!(place.is_none());
        assert_eq!(why.as_deref(), Some("NVDEC: out of decoders"));
        assert_eq!(placement.on_gpu(), 0);
        // No place: straight to the CPU, and a CPU failure is the answer.
        let (opened, place) = open_placed(
            None,
            || panic!("not the GPU"),
            || Err::<&str, _>("no encoder".to_string()),
            |_| panic!("no fallback"),
        );
        assert_eq!(opened, Err("no encoder".to_string()));
        assert!(place.is_none());
    }

    #[test]
    fn a_gpu_pipeline_that_fails_mid_session_goes_on_on_the_cpu_once() {
        let placement = Placement::new(Backend::Cpu, 1);
        let mut place = placement.take().1;
        assert_eq!(placement.on_gpu(), 1);
        // On the GPU: the CPU takes over, told why, and the place is free.
        let mut why = None;
        let got = recover(
            &mut place,
            "CUDA_ERROR_LAUNCH_FAILED".to_string(),
            || Ok::<_, String>("cpu"),
            |e| why = Some(e.clone()),
        );
        assert_eq!(got, Ok("cpu"));
        assert_eq!(why.as_deref(), Some("CUDA_ERROR_LAUNCH_FAILED"));
        assert!(place.is_none());
        assert_eq!(placement.on_gpu(), 0);
        // On the CPU already: the error stands (the session ends).
        let got = recover(
            &mut place,
            "no encoder".to_string(),
            || -> Result<&str, String> { panic!("not reopened") },
            |_| panic!("no fallback"),
        );
        assert_eq!(got, Err("no encoder".to_string()));
        // The CPU cannot open it either: that error is the answer.
        let mut place = placement.take().1;
        let got = recover(
            &mut place,
            "gpu".to_string(),
            || Err::<&str, _>("cpu too".to_string()),
            |_| {},
        );
        assert_eq!(got, Err("cpu too".to_string()));
        assert_eq!(placement.on_gpu(), 0);
    }
}
