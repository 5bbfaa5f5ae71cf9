//! A stand-in for the transcoder pool in the simulation: it answers the
//! shard's offload commands at once, with no QUIC and no codec. Each layer
//! of a source frame is a synthetic frame with the publisher's tag and the
//! layer in the tag's top byte (1 for `w1`, 2 for `w2`), a sixth and a third
//! of the source's size, so a subscriber can tell which layer it gets and
//! the bandwidth estimate sees realistic rates. It can stall (stop
//! answering, as a worker whose process hangs) and be lost.
//!
//! Caption sessions get a final caption `"packets N to M"` for every
//! [`CAPTION_EVERY`] Opus packets, so a test can see which speaker's audio
//! reached the worker and whether captions flow.

use std::collections::HashSet;

use balie_offload::{Caption, Frame, Size};
use bytes::Bytes;
use str0m::format::Codec;

use super::peer::{check_frame, frame_number, make_frame};
use crate::offload::{PoolCommand, PoolEvent};

/// The fake pool's state, open for tests to read and steer.
#[derive(Debug, Default)]
pub struct FakePool {
    /// Sessions open, by key.
    pub open: Vec<u64>,
    /// Opens and closes seen.
    pub opened: u64,
    pub closed: u64,
    /// Keyframe requests for a layer: (key, track).
    pub keyframes: Vec<(u64, u8)>,
    /// Source frames received.
    pub frames_in: u64,
    /// Not answering: source frames are taken and nothing comes back.
    pub stalled: bool,
    want_key: HashSet<(u64, u8)>,
    /// Sessions waiting for a source keyframe.
    need_key: HashSet<u64>,
    /// Caption sessions open: (key, packets received).
    pub captions: Vec<(u64, u64)>,
    /// No worker makes captions: caption sessions are lost until
    /// [`FakePool::captions_back`].
    pub captions_down: bool,
    pending: Vec<PoolEvent>,
}

/// Opus packets per fake caption.
pub const CAPTION_EVERY: u64 = 50;

/// The layers it makes, lowest first: (divisor of the source's size, height).
const LAYERS: [(usize, u16); 2] = [(6, 180), (3, 360)];

impl FakePool {
    /// Handle one command of the shard.
    pub fn command(&mut self, cmd: PoolCommand) {
        match cmd {
            PoolCommand::Open { key, .. } => {
                if self.open.contains(&key) {
                    return;
                }
                self.open.push(key);
                self.opened += 1;
                self.need_key.insert(key);
                self.pending.push(PoolEvent::Layout {
                    key,
                    source: Size {
                        width: 1280,
                        height: 720,
                    },
                    layers: LAYERS
                        .iter()
                        .map(|(_, h)| Size {
                            width: h * 16 / 9,
                            height: *h,
                        })
                        .collect(),
                });
                self.pending.push(PoolEvent::NeedKeyframe { key });
            }
            PoolCommand::OpenCaptions { key, .. } => {
                if self.captions.iter().any(|(k, _)| *k == key) {
                    return;
                }
                self.captions.push((key, 0));
                self.opened += 1;
                if self.captions_down {
                    self.pending.push(PoolEvent::Lost {
                        key,
                        reason: "no worker that makes captions".into(),
                    });
                }
            }
            PoolCommand::Close { key } => {
                let before = self.captions.len();
                self.captions.retain(|(k, _)| *k != key);
                if self.captions.len() < before {
                    self.closed += 1;
                }
                if self.open.contains(&key) {
                    self.open.retain(|k| *k != key);
                    self.closed += 1;
                }
            }
            PoolCommand::Keyframe { key, track } => {
                self.keyframes.push((key, track));
                self.want_key.insert((key, track));
            }
            PoolCommand::Frame { key, frame } => self.frame(key, frame),
        }
    }

    fn frame(&mut self, key: u64, frame: Frame) {
        if let Some((_, n)) = self.captions.iter_mut().find(|(k, _)| *k == key) {
            if self.captions_down {
                return;
            }
            *n += 1;
            if *n % CAPTION_EVERY == 0 {
                let ms = |p: u64| (p * 20) as u32;
                self.pending.push(PoolEvent::Caption {
                    key,
                    caption: Caption {
                        session: key,
                        text: format!("packets {} to {}", *n - CAPTION_EVERY + 1, *n),
                        start_ms: ms(*n - CAPTION_EVERY),
                        end_ms: ms(*n),
                        is_final: true,
                        language: "nl".into(),
                    },
                });
            }
            return;
        }
        if !self.open.contains(&key) || self.stalled {
            return;
        }
        self.frames_in += 1;
        if self.need_key.contains(&key) && !frame.key {
            return; // a decoder starts at a keyframe
        }
        self.need_key.remove(&key);
        let (Some(tag), Some(number)) = (check_frame(&frame.data), frame_number(&frame.data))
        else {
            return;
        };
        for (i, (div, _)) in LAYERS.iter().enumerate() {
            let track = i as u8 + 1;
            let keyframe = frame.key || self.want_key.remove(&(key, track));
            let size = (frame.data.len() / div).max(100);
            let data = make_frame(
                tag | (u32::from(track) << 24),
                number,
                size,
                Some((keyframe, Codec::Vp8)),
            );
            self.pending.push(PoolEvent::Frame {
                key,
                track,
                frame: Frame {
                    rtp_time: frame.rtp_time,
                    deadline_ms: 0,
                    key: keyframe,
                    data: Bytes::from(data),
                },
            });
        }
    }

    /// The worker dies: the pool moves its sessions to another (a fresh
    /// worker that needs a keyframe first).
    pub fn move_all(&mut self) {
        for key in self.open.clone() {
            self.need_key.insert(key);
            self.pending.push(PoolEvent::NeedKeyframe { key });
            self.pending.push(PoolEvent::Moved { key });
        }
    }

    /// Every worker that makes captions is lost: caption sessions wait.
    pub fn captions_lost(&mut self) {
        self.captions_down = true;
        for (key, _) in &self.captions {
            self.pending.push(PoolEvent::Lost {
                key: *key,
                reason: "worker lost".into(),
            });
        }
    }

    /// A worker that makes captions is back: the waiting sessions move there.
    pub fn captions_back(&mut self) {
        self.captions_down = false;
        for (key, _) in &self.captions {
            self.pending.push(PoolEvent::Moved { key: *key });
        }
    }

    /// Events for the shard, in order.
    pub fn drain(&mut self) -> Vec<PoolEvent> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use str0m::media::MediaKind;

    use crate::shard::ShardConfig;
    use crate::sim::{Join, Sim};
    use crate::token::Role;

    /// A single-layer publisher and a viewer, offload on; runs until the
    /// viewer gets the source. Returns the viewer, the publisher's tag and
    /// the viewer's video mid.
    fn offload_pair(seed: u64) -> (Sim, usize, u32, String) {
        let mut s = Sim::new(
            seed,
            ShardConfig {
                offload_layers: 2,
                ..ShardConfig::default()
            },
        );
        let p = s.join("r", Sim::claims("r", "p", Role::Official), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::ApiViewer);
        let tp = s.peers[p].tag;
        assert!(s.run_until(Duration::from_secs(10), |s| s.peers[b]
            .frames_from(tp, MediaKind::Video)
            > 30));
        let mid = s.peers[b]
            .messages
            .iter()
            .flat_map(|m| m["tracks"].as_array().cloned().unwrap_or_default())
            .find(|t| t["kind"] == "video")
            .and_then(|t| t["mid"].as_str().map(str::to_string))
            .expect("a video track was announced");
        (s, b, tp, mid)
    }

    /// The layer of the last video frame `b` got from `tp`: 0 the source,
    /// 1 `w1`, 2 `w2`.
    fn layer(s: &Sim, b: usize, tp: u32) -> Option<u32> {
        s.peers[b]
            .received
            .values()
            .filter(|r| r.kind == Some(MediaKind::Video))
            .filter_map(|r| r.last_tag)
            .find(|t| t & 0x00ff_ffff == tp)
            .map(|t| t >> 24)
    }

    fn show(s: &mut Sim, b: usize, mid: &str, height: u32) {
        s.peers[b].send_json(&serde_json::json!({
            "type": "video-size", "track": mid, "width": height * 16 / 9, "height": height
        }));
    }

    fn pool(s: &Sim) -> &super::FakePool {
        s.pool.as_ref().expect("offload is on")
    }

    #[test]
    fn a_small_display_opens_a_worker_session_and_it_closes_when_unneeded() {
        let (mut s, b, tp, mid) = offload_pair(21);
        // Unknown size on a fast link: the source, no worker session.
        s.run_for(Duration::from_secs(6));
        assert_eq!(pool(&s).opened, 0, "nobody needs less");
        assert_eq!(layer(&s, b, tp), Some(0));

        show(&mut s, b, &mid, 180);
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(5), |s| layer(s, b, tp) == Some(1)));
        let on_layer = s.now - t0;
        eprintln!("small display: on w1 after {on_layer:?}");
        assert_eq!(pool(&s).opened, 1);
        assert!(
            // 1 s of need, then the layers' first half-second measurement.
            on_layer >= Duration::from_secs(1) && on_layer < Duration::from_millis(2500),
            "on w1 after {on_layer:?}"
        );
        s.run_for(Duration::from_secs(3));
        assert_eq!(layer(&s, b, tp), Some(1), "a 180-line tile stays on w1");

        // Shown large: back to the source, and the session is closed once
        // nobody has needed it for 10 s.
        show(&mut s, b, &mid, 720);
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(8), |s| layer(s, b, tp) == Some(0)));
        assert!(s.run_until(Duration::from_secs(20), |s| pool(s).closed == 1));
        let closed = s.now - t0;
        assert!(closed >= Duration::from_secs(10), "closed after {closed:?}");
        assert!(pool(&s).open.is_empty());
        // Every layer switch began on a keyframe, nothing was undecodable.
        let switches = s.peers[b].switches_from(tp);
        assert!(switches.len() >= 2, "{switches:?}");
        assert!(switches.iter().all(|(_, _, key)| *key), "{switches:?}");
        assert_eq!(s.peers[b].undecodable(), 0);
        assert_eq!(s.peers[b].corrupt(), 0);
    }

    #[test]
    fn stalled_or_lost_worker_layers_fall_back_to_the_source_at_once() {
        let (mut s, b, tp, mid) = offload_pair(22);
        show(&mut s, b, &mid, 180);
        assert!(s.run_until(Duration::from_secs(5), |s| layer(s, b, tp) == Some(1)));
        s.run_for(Duration::from_secs(2));

        // The worker stops answering: the source within half a second.
        s.pool.as_mut().expect("pool").stalled = true;
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(2), |s| layer(s, b, tp) == Some(0)));
        let fallback = s.now - t0;
        assert!(
            fallback < Duration::from_millis(600),
            "source after {fallback:?}"
        );
        // It answers again: back on the layer.
        s.pool.as_mut().expect("pool").stalled = false;
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(2), |s| layer(s, b, tp) == Some(1)));
        let back = s.now - t0;
        assert!(back < Duration::from_secs(1), "layer back after {back:?}");

        // The worker is lost and the session moved: the source at once, the
        // layer again from the new worker's first frames.
        s.run_for(Duration::from_secs(1));
        s.pool.as_mut().expect("pool").move_all();
        let t0 = s.now;
        // Read from the switches the peer saw, not from its last frame: the
        // source's keyframe and the new worker's first can land in the same
        // tick of the simulator.
        let seen = s.peers[b].switches_from(tp).len();
        let switched_to = |s: &Sim, to: u32| {
            s.peers[b].switches_from(tp)[seen..]
                .iter()
                .any(|(_, t, _)| *t == to)
        };
        assert!(s.run_until(Duration::from_secs(2), |s| switched_to(s, 0)));
        let source = s.now - t0;
        assert!(s.run_until(Duration::from_secs(3), |s| layer(s, b, tp) == Some(1)));
        let layer_back = s.now - t0;
        eprintln!(
            "stall: source after {fallback:?}, layer back {back:?}; move: source after {source:?}, layer after {layer_back:?}"
        );
        assert!(source < Duration::from_millis(300), "{source:?}");
        assert!(layer_back < Duration::from_secs(1), "{layer_back:?}");
        assert!(s.peers[b].switches_from(tp).iter().all(|(_, _, key)| *key));
        assert_eq!(s.peers[b].undecodable(), 0);
        assert_eq!(pool(&s).opened, 1, "one session throughout");
    }

    #[test]
    fn a_slow_link_that_loses_gets_a_worker_layer_after_a_second_of_it() {
        let (mut s, b, tp, _) = offload_pair(23);
        // The source is about 670 kbit/s; the viewer's link carries 450
        // and drops the rest: the loss caps the viewer's budget, so the
        // session opens after OPEN_AFTER_DISPLAY, before OPEN_AFTER_BUDGET
        // (a budget below the source without loss: transcode's unit test).
        s.links[b].1.rate = Some(450_000);
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(10), |s| pool(s).opened == 1));
        let opened = s.now - t0;
        assert!(
            opened >= crate::shard::core::transcode::OPEN_AFTER_DISPLAY
                && opened < crate::shard::core::transcode::OPEN_AFTER_BUDGET,
            "opened after {opened:?}"
        );
        assert!(s.run_until(Duration::from_secs(5), |s| matches!(
            layer(s, b, tp),
            Some(1 | 2)
        )));
        s.run_for(Duration::from_secs(5));
        let on = layer(&s, b, tp);
        eprintln!("slow link: worker session after {opened:?}, on layer {on:?}");
        assert!(matches!(on, Some(1 | 2)), "on {on:?}");
    }
}
