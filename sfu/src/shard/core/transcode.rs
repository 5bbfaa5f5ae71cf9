//! Offload inside the shard core: lower layers for single-layer video.
//!
//! A single-layer video track with `[offload]` configured is handled as a
//! layered track. The publisher's frames are layer [`SOURCE`]; while some
//! subscriber needs less than the source (its display is at most two
//! thirds of the source's height for [`OPEN_AFTER_DISPLAY`], or its
//! bandwidth budget is below the source's bitrate for
//! [`OPEN_AFTER_BUDGET`], or for [`OPEN_AFTER_DISPLAY`] when the loss it
//! sees caps that budget), the shard opens a session on a transcoder worker
//! through its pool and sends it the source frames. The worker's layers
//! come back as layers `w1`, `w2`, ... (lowest first), measured and chosen
//! by the same [`super::super::layers::LayerChoice`] as a simulcast
//! publisher's, keyframe requests for them go to the worker. When nobody
//! has needed less for [`CLOSE_AFTER`], the session is closed.
//!
//! A lost worker never stops the picture: when its layers stop for
//! [`STALL_AFTER`] while the source goes on, or the pool reports the
//! worker lost, the layers are suspended (left out of the choice until
//! their next frame), so every subscriber goes back to the source at its
//! next keyframe, and takes a layer again when the pool has moved the
//! session and the new worker's frames come.

use std::sync::Arc;
use std::time::{Duration, Instant};

use balie_offload::{Codec, Frame};
use bytes::Bytes;
use str0m::media::{KeyframeRequestKind, MediaTime, Rid};

use super::{Fanout, ShardCore};
use crate::ids::{RoomId, TrackId};
use crate::offload::{PoolCommand, PoolEvent};
use crate::shard::layers::{cap_for_display_by, with_headroom};
use crate::shard::room::Offloaded;
use crate::shard::session::TrackOut;

/// The layer name of an offloaded track's source (the publisher's frames).
pub const SOURCE: Rid = Rid::from_array(*b"src     ");

/// The layer names of a worker's layers, lowest first (protocol tracks 1-4).
const WORKER: [Rid; 4] = [
    Rid::from_array(*b"w1      "),
    Rid::from_array(*b"w2      "),
    Rid::from_array(*b"w3      "),
    Rid::from_array(*b"w4      "),
];

/// A subscriber whose display is this much smaller than the source needs a
/// lower layer after this long.
pub const OPEN_AFTER_DISPLAY: Duration = Duration::from_secs(1);
/// A subscriber whose budget is below the source needs a lower layer after
/// this long. Longer than for the display: a new subscriber's estimate
/// starts at 600 kbit/s and climbs over the first seconds of a call. A
/// subscriber whose budget the loss it sees has capped
/// ([`crate::shard::layers::LossWatch`]) is not still climbing: its link
/// cannot carry the source, and it waits only [`OPEN_AFTER_DISPLAY`] (on an
/// 800 kbit/s link in balie-bench's `configs/bench/offload.toml` this
/// halved what the subscriber lost in its first seconds; docs/benchmarks.md,
/// 2026-12-01).
pub const OPEN_AFTER_BUDGET: Duration = Duration::from_secs(3);
/// A worker session nobody has needed for this long is closed.
pub const CLOSE_AFTER: Duration = Duration::from_secs(10);
/// Layers that stop for this long while the source goes on are taken as
/// stalled: subscribers go back to the source at once, without waiting
/// for the pool to find the worker lost (a second of silence).
pub const STALL_AFTER: Duration = Duration::from_millis(400);
/// The source's height taken before the worker reports it.
const DEFAULT_SOURCE_LINES: u32 = 720;

/// The layer name of worker track `track` (1-based).
fn worker_rid(track: u8) -> Option<Rid> {
    WORKER.get(usize::from(track).checked_sub(1)?).copied()
}

/// The worker track (1-based) a layer name stands for.
pub(super) fn worker_track(rid: Rid) -> Option<u8> {
    WORKER.iter().position(|r| *r == rid).map(|i| i as u8 + 1)
}

/// The codecs a worker takes.
fn offload_codec(params: &str0m::format::PayloadParams) -> Option<Codec> {
    match params.spec().codec {
        str0m::format::Codec::Vp8 => Some(Codec::Vp8),
        str0m::format::Codec::H264 => Some(Codec::H264),
        _ => None,
    }
}

/// The layers worth sending to a display `height` tall, with the heights
/// the worker reported (before it has: the source as 720 lines and each
/// worker layer as half the next).
pub(super) fn cap_for_display<'a>(
    o: &Offloaded,
    active: &'a [(Rid, u64)],
    height: Option<u32>,
) -> &'a [(Rid, u64)] {
    let n = active.len();
    cap_for_display_by(active, height, |i, rid| {
        let known = if rid == SOURCE {
            o.source_height
        } else {
            worker_track(rid).and_then(|t| o.layer_heights.get(usize::from(t) - 1).copied())
        };
        known.unwrap_or(DEFAULT_SOURCE_LINES >> (n - 1 - i).min(31))
    })
}

/// Note whether subscriber `out` needs less than the source (see the
/// module's doc); `measured` are the track's active layers, `losing`
/// whether the loss the subscriber sees caps its budget now.
pub(super) fn note_need(
    o: &mut Offloaded,
    out: &mut TrackOut,
    now: Instant,
    (budget, losing): (u64, bool),
    measured: &[(Rid, u64)],
) {
    let wanted = out.choice.target.or(out.choice.current);
    let on_layer = wanted.is_some_and(|r| worker_track(r).is_some());
    let source = measured.iter().find(|(r, _)| *r == SOURCE).map(|(_, b)| *b);
    let by_budget = source.is_some_and(|b| with_headroom(b) > budget);
    let lines = o.source_height.unwrap_or(DEFAULT_SOURCE_LINES);
    let by_display = out
        .display_height
        .is_some_and(|h| h > 0 && u64::from(h) * 3 <= u64::from(lines) * 2);
    if !(on_layer || by_budget || by_display) {
        out.need_since = None;
        return;
    }
    let since = *out.need_since.get_or_insert(now);
    let wait = if by_display || losing {
        OPEN_AFTER_DISPLAY
    } else {
        OPEN_AFTER_BUDGET
    };
    if on_layer || o.open || now.saturating_duration_since(since) >= wait {
        o.needed_at = Some(now);
    }
}

/// Extend a worker frame's 32-bit RTP time to the source's 64-bit one
/// (the nearest value with those low bits).
fn extend_time(last: MediaTime, rtp: u32) -> MediaTime {
    let last_n = last.numer();
    let base = last_n & !0xffff_ffff;
    let candidates = [
        base.wrapping_sub(1 << 32) | u64::from(rtp),
        base | u64::from(rtp),
        base.wrapping_add(1 << 32) | u64::from(rtp),
    ];
    let best = candidates
        .into_iter()
        .filter(|c| *c <= last_n.saturating_add(1 << 31))
        .min_by_key(|c| c.abs_diff(last_n))
        .unwrap_or(base | u64::from(rtp));
    MediaTime::new(best, last.frequency())
}

/// A frame of `track` for its worker session; `key` starts a group.
pub(super) fn pool_frame(track: TrackId, frame: &Fanout, key: bool) -> PoolCommand {
    PoolCommand::Frame {
        key: track.0,
        frame: Frame {
            rtp_time: frame.time.numer() as u32,
            deadline_ms: 0,
            key,
            data: Bytes::copy_from_slice(&frame.data),
        },
    }
}

impl ShardCore {
    /// A source frame of an offloaded track: remember its parameters and
    /// time, and pass it to the worker while a session is open.
    pub(super) fn offload_source(&mut self, room_id: &RoomId, track_id: TrackId, frame: &Fanout) {
        let codec = offload_codec(&frame.params);
        let changed = self
            .rooms
            .get_mut(room_id)
            .and_then(|r| r.track(track_id))
            .and_then(|t| t.offload.as_ref())
            .is_some_and(|o| o.open && o.codec != codec);
        if changed {
            // The publisher changed codec (a renegotiation): start afresh.
            self.offload_close(room_id, track_id);
        }
        let Some(o) = self
            .rooms
            .get_mut(room_id)
            .and_then(|r| r.track(track_id))
            .and_then(|t| t.offload.as_mut())
        else {
            return;
        };
        o.codec = codec;
        o.params = Some(frame.params);
        o.last_time = Some(frame.time);
        if o.open {
            self.pool_out
                .push_back(pool_frame(track_id, frame, frame.keyframe));
        }
    }

    /// After a source frame's decisions: open a worker session when a
    /// subscriber has come to need one, close it when none has for
    /// [`CLOSE_AFTER`].
    pub(super) fn offload_maintain(&mut self, now: Instant, room_id: &RoomId, track_id: TrackId) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let span = room.span.clone();
        let Some(o) = room.track(track_id).and_then(|t| t.offload.as_mut()) else {
            return;
        };
        if o.open
            && o.layer_at
                .is_some_and(|t| now.saturating_duration_since(t) >= STALL_AFTER)
        {
            o.layer_at = None;
            tracing::debug!(parent: &span, track = track_id.0, "worker layers stalled: forwarding the source");
            self.offload_fall_back(room_id, track_id);
            return;
        }
        let since = o.needed_at.map(|t| now.saturating_duration_since(t));
        if !o.open && since.is_some_and(|d| d < Duration::from_millis(500)) {
            let Some(codec) = o.codec else { return };
            o.open = true;
            self.pool_out.push_back(PoolCommand::Open {
                key: track_id.0,
                codec,
            });
            self.offload_rooms.insert(track_id.0, room_id.clone());
            self.metrics.offload_opened.inc();
            tracing::info!(parent: &span, track = track_id.0, ?codec, "lower layers asked of a transcoder worker");
        } else if o.open && since.is_none_or(|d| d >= CLOSE_AFTER) {
            self.offload_close_unneeded(room_id, track_id);
        }
    }

    /// Close a worker session nobody needs (idle, or the video is shown
    /// by nobody and its publisher was told to stop sending it).
    pub(super) fn offload_close_unneeded(&mut self, room_id: &RoomId, track_id: TrackId) {
        let Some(span) = self.rooms.get(room_id).map(|r| r.span.clone()) else {
            return;
        };
        if self.offload_close(room_id, track_id) {
            tracing::info!(parent: &span, track = track_id.0, "transcoder worker session closed: nobody needs it");
        }
    }

    /// The worker's layers stopped: leave them out of the choice until
    /// their next frame, and have every subscriber decide again at the next
    /// source frame (back to the source, on its keyframe).
    fn offload_fall_back(&mut self, room_id: &RoomId, track_id: TrackId) {
        if let Some(t) = self.rooms.get_mut(room_id).and_then(|r| r.track(track_id)) {
            for rid in WORKER {
                t.layers.suspend(rid);
            }
        }
        self.redecide(room_id, track_id);
    }

    /// Have every subscriber of a track decide its layer at the track's next frame.
    fn redecide(&mut self, room_id: &RoomId, track_id: TrackId) {
        let Some(room) = self.rooms.get(room_id) else {
            return;
        };
        for m in &room.sessions {
            if let Some(out) = self
                .sessions
                .get_mut(m)
                .and_then(|s| s.tracks_out.iter_mut().find(|o| o.track == track_id))
            {
                out.decided_at = None;
            }
        }
    }

    /// Close an offloaded track's worker session and forget its layers;
    /// false if none was open.
    pub(super) fn offload_close(&mut self, room_id: &RoomId, track_id: TrackId) -> bool {
        let Some(t) = self.rooms.get_mut(room_id).and_then(|r| r.track(track_id)) else {
            return false;
        };
        let Some(o) = t.offload.as_mut() else {
            return false;
        };
        if !o.open {
            return false;
        }
        o.open = false;
        o.needed_at = None;
        o.layer_at = None;
        o.source_height = None;
        o.layer_heights.clear();
        for rid in WORKER {
            t.layers.forget(rid);
        }
        self.pool_out
            .push_back(PoolCommand::Close { key: track_id.0 });
        self.offload_rooms.remove(&track_id.0);
        self.metrics.offload_opened.dec();
        true
    }

    /// News from the pool.
    pub(super) fn on_pool_event(&mut self, now: Instant, event: PoolEvent) {
        let key = event.key();
        let Some(room_id) = self.offload_rooms.get(&key).cloned() else {
            return; // closed since
        };
        let track_id = TrackId(key);
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let span = room.span.clone();
        let Some(t) = room.track(track_id) else {
            return;
        };
        let Some(o) = t.offload.as_mut().filter(|o| o.open) else {
            return;
        };
        match event {
            PoolEvent::Frame { track, frame, .. } => {
                let Some(rid) = worker_rid(track) else { return };
                let (Some(params), Some(last)) = (o.params, o.last_time) else {
                    return;
                };
                if o.layer_at.replace(now).is_none() {
                    tracing::debug!(parent: &span, track = key, layer = track, key = frame.key, "worker layers flowing");
                    // Subscribers that need less take them at once.
                    self.redecide(&room_id, track_id);
                }
                let data = Fanout {
                    rid: Some(rid),
                    time: extend_time(last, frame.rtp_time),
                    network_time: now,
                    params,
                    keyframe: frame.key,
                    contiguous: true,
                    data: Arc::from(&frame.data[..]),
                };
                self.fan_out(now, &room_id, track_id, data);
            }
            PoolEvent::Layout { source, layers, .. } => {
                o.source_height = Some(u32::from(source.height));
                o.layer_heights = layers.iter().map(|s| u32::from(s.height)).collect();
            }
            PoolEvent::NeedKeyframe { .. } => {
                tracing::debug!(parent: &span, track = key, "the worker needs a keyframe of the source");
                // The worker's decoder starts at a keyframe: ask the
                // publisher now, whatever was asked just before.
                t.keyframe_asked.retain(|(r, _)| *r != Some(SOURCE));
                self.request_keyframe(
                    now,
                    &room_id,
                    track_id,
                    Some(SOURCE),
                    KeyframeRequestKind::Fir,
                    false,
                );
            }
            PoolEvent::Caption { .. } => {}
            PoolEvent::Moved { .. } | PoolEvent::Lost { .. } => {
                o.layer_at = None;
                self.offload_fall_back(&room_id, track_id);
                match event {
                    PoolEvent::Lost { reason, .. } => {
                        tracing::warn!(parent: &span, track = key, %reason, "no transcoder worker: forwarding the source only");
                    }
                    _ => {
                        tracing::info!(parent: &span, track = key, "transcoder worker lost: session moved to another");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::media::Frequency;

    #[test]
    fn worker_layer_names_round_trip() {
        for t in 1..=4u8 {
            let rid = worker_rid(t).expect("a name");
            assert_eq!(worker_track(rid), Some(t));
        }
        assert_eq!(worker_rid(0), None);
        assert_eq!(worker_rid(5), None);
        assert_eq!(worker_track(SOURCE), None);
        assert_eq!(worker_track(Rid::from("q")), None);
        assert_eq!(&*SOURCE, "src");
    }

    #[test]
    fn a_worker_time_is_extended_next_to_the_source() {
        let at = |n: u64| MediaTime::new(n, Frequency::NINETY_KHZ);
        assert_eq!(extend_time(at(3000), 3000).numer(), 3000);
        // The layer lags the source a little.
        assert_eq!(extend_time(at(9000), 6000).numer(), 6000);
        // Across a wrap of the low 32 bits, both ways.
        let big = (5u64 << 32) + 100;
        assert_eq!(
            extend_time(at(big), u32::MAX - 50).numer(),
            (5u64 << 32) - 51
        );
        let before = (5u64 << 32) - 10;
        assert_eq!(extend_time(at(before), 20).numer(), (5u64 << 32) + 20);
    }

    #[test]
    fn a_layer_is_needed_after_1_s_for_a_small_display_or_loss_3_s_for_a_low_budget() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut o = Offloaded::default();
        let measured = [(SOURCE, 1_500_000)];
        let mut out = TrackOut::new(
            TrackId(1),
            crate::ids::SessionId::random(),
            str0m::media::MediaKind::Video,
            crate::shard::session::OutState::ToOpen,
            false,
        );
        out.display_height = Some(360);
        note_need(&mut o, &mut out, ms(0), (10_000_000, false), &measured);
        assert_eq!(o.needed_at, None);
        note_need(&mut o, &mut out, ms(1000), (10_000_000, false), &measured);
        assert_eq!(o.needed_at, Some(ms(1000)));
        // Shown large on a fast link: no need.
        let mut o = Offloaded::default();
        out.display_height = Some(720);
        out.need_since = None;
        for t in [0, 2000, 4000] {
            note_need(&mut o, &mut out, ms(t), (10_000_000, false), &measured);
        }
        assert_eq!(o.needed_at, None);
        // A slow link: after OPEN_AFTER_BUDGET.
        note_need(&mut o, &mut out, ms(5000), (800_000, false), &measured);
        note_need(&mut o, &mut out, ms(7000), (800_000, false), &measured);
        assert_eq!(o.needed_at, None);
        note_need(&mut o, &mut out, ms(8000), (800_000, false), &measured);
        assert_eq!(o.needed_at, Some(ms(8000)));
        // A slow link that loses much of what it is sent: after a second.
        let mut o = Offloaded::default();
        out.need_since = None;
        note_need(&mut o, &mut out, ms(0), (500_000, true), &measured);
        note_need(&mut o, &mut out, ms(900), (500_000, true), &measured);
        assert_eq!(o.needed_at, None);
        note_need(&mut o, &mut out, ms(1000), (500_000, true), &measured);
        assert_eq!(o.needed_at, Some(ms(1000)));
        // A 360-line source shown at 360: no need, whatever the default.
        let mut o = Offloaded {
            source_height: Some(360),
            ..Offloaded::default()
        };
        out.display_height = Some(360);
        out.need_since = None;
        for t in [0, 2000, 4000] {
            note_need(&mut o, &mut out, ms(t), (10_000_000, false), &measured);
        }
        assert_eq!(o.needed_at, None);
    }
}
