//! A room inside a shard: its participants and the tracks they publish.
//! Rooms are pinned to one shard, so forwarding inside a call never crosses
//! threads and takes no lock.

use std::time::{Duration, Instant};

use str0m::format::PayloadParams;
use str0m::media::{MediaKind, MediaTime, Mid, Rid};

use super::layers::PublisherLayers;
use crate::ids::{RoomId, SessionId, TrackId};

/// A published track.
#[derive(Debug, Clone)]
pub struct Track {
    /// Unique in the shard.
    pub id: TrackId,
    /// The publishing session.
    pub owner: SessionId,
    /// The m-line in the publisher's session.
    pub mid: Mid,
    /// Audio or video.
    pub kind: MediaKind,
    /// For a simulcast publisher, the configured layer (forwarded when
    /// adaptive layers are off); `None` for a single-layer publisher.
    pub layer: Option<Rid>,
    /// What a simulcast publisher sends right now, layer by layer.
    pub layers: PublisherLayers,
    /// Last keyframe request sent, per layer.
    pub keyframe_asked: Vec<(Option<Rid>, Instant)>,
    /// Last keyframe request sent to the publisher itself, any layer.
    pub publisher_asked: Option<Instant>,
    /// Nobody shows this video: the publisher was told to stop sending it.
    pub paused: bool,
    /// A single-layer video track whose lower layers a transcoder worker
    /// can make (`[offload]` configured): its frames count as layer
    /// [`super::core::SOURCE`] and the worker's as `w1`, `w2`, ...
    pub offload: Option<Offloaded>,
    /// An audio track with a caption session open (see `shard/core/captions.rs`).
    pub captions: Option<CaptionFeed>,
}

/// An audio track's caption session.
#[derive(Debug, Clone, Default)]
pub struct CaptionFeed {
    /// Opus packets sent to the pool (a group starts every
    /// `captions::GROUP` of them).
    pub packets: u64,
    /// The pool has no worker for it now.
    pub lost: bool,
}

/// A room's captions.
#[derive(Debug, Clone, Default)]
pub struct RoomCaptions {
    /// Switched on (by an official, or `captions.on_at_start`).
    pub on: bool,
    /// Who switched them last (participant id), if someone did.
    pub by: Option<SessionId>,
    /// What the room was last told: (on, available).
    pub announced: Option<(bool, bool)>,
}

impl Track {
    /// Whether the publisher sends simulcast.
    pub fn simulcast(&self) -> bool {
        self.layer.is_some()
    }

    /// Whether subscribers choose between layers: simulcast, or a track
    /// that a worker can add layers to.
    pub fn layered(&self) -> bool {
        self.simulcast() || self.offload.is_some()
    }

    /// Whether to send a keyframe request for layer `rid` now; records it
    /// when so. A layer is asked at most once per `interval`. A request
    /// that goes to the publisher (`publisher`; a worker's layers are asked
    /// of the worker) for a layer switch (`switch`) also waits until
    /// [`PUBLISHER_KEYFRAME_GAP`] has passed since the last request to the
    /// publisher: it would drop it, and the switch would wait for the next
    /// ask. The caller asks again on every frame while a switch waits.
    pub fn keyframe_ask(
        &mut self,
        now: Instant,
        rid: Option<Rid>,
        interval: Duration,
        switch: bool,
        publisher: bool,
    ) -> bool {
        let gap = self
            .publisher_asked
            .is_some_and(|at| now.saturating_duration_since(at) < PUBLISHER_KEYFRAME_GAP);
        if switch && publisher && gap {
            return false;
        }
        match self.keyframe_asked.iter_mut().find(|(r, _)| *r == rid) {
            Some((_, last)) if now < *last + interval => return false,
            Some((_, last)) => *last = now,
            None => self.keyframe_asked.push((rid, now)),
        }
        if publisher {
            self.publisher_asked = Some(now);
        }
        true
    }
}

/// A browser publisher takes one keyframe request per 300 ms, for all its
/// simulcast layers together, and drops the others (libwebrtc's
/// `EncoderRtcpFeedback`); 20 ms more for the jitter of the path to it. On
/// the way down from f to q through h, the request for q came about 100 ms
/// after the one for h, was dropped, and q's keyframe came with the next
/// ask (tests/e2e/shaped.test.mjs: 0.46-0.52 s from the decision to the
/// switch, against 0.06 s without the detour).
pub const PUBLISHER_KEYFRAME_GAP: Duration = Duration::from_millis(320);

/// The offload state of a single-layer video track (see `shard/core/transcode.rs`).
#[derive(Debug, Clone, Default)]
pub struct Offloaded {
    /// The source's payload parameters (from its first frame), written
    /// with the worker's layers too: they are in the same codec.
    pub params: Option<PayloadParams>,
    /// The source's codec, when the workers take it (VP8, H.264).
    pub codec: Option<balie_offload::Codec>,
    /// A worker session is open (asked of the pool, placed or waiting).
    pub open: bool,
    /// The source's latest RTP time, to extend the layers' 32-bit times.
    pub last_time: Option<MediaTime>,
    /// Heights from the worker's layout: the source's, and each layer's.
    pub source_height: Option<u32>,
    pub layer_heights: Vec<u32>,
    /// When a subscriber last needed less than the source.
    pub needed_at: Option<Instant>,
    /// When the worker's last layer frame came; `None` once it stalled
    /// (until the next one).
    pub layer_at: Option<Instant>,
}

/// A room.
#[derive(Debug)]
pub struct Room {
    /// Its name.
    pub id: RoomId,
    /// Participants, in join order.
    pub sessions: Vec<SessionId>,
    /// Published tracks.
    pub tracks: Vec<Track>,
    /// Since when the room has been empty.
    pub empty_since: Option<Instant>,
    /// Live captions.
    pub captions: RoomCaptions,
    /// The room's log span; its sessions' spans are its children.
    pub span: tracing::Span,
}

impl Room {
    /// A new, empty room on `shard`.
    pub fn new(id: RoomId, shard: crate::ids::ShardId) -> Room {
        let span = tracing::info_span!("room", room = %id, shard = %shard);
        Room {
            id,
            sessions: Vec::new(),
            tracks: Vec::new(),
            empty_since: None,
            captions: RoomCaptions::default(),
            span,
        }
    }

    /// The track published on `mid` by `owner`.
    pub fn track_by_source(&mut self, owner: SessionId, mid: Mid) -> Option<&mut Track> {
        self.tracks
            .iter_mut()
            .find(|t| t.owner == owner && t.mid == mid)
    }

    /// A track by id.
    pub fn track(&mut self, id: TrackId) -> Option<&mut Track> {
        self.tracks.iter_mut().find(|t| t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track() -> Track {
        Track {
            id: TrackId(1),
            owner: SessionId::random(),
            mid: Mid::from("v"),
            kind: MediaKind::Video,
            layer: Some(Rid::from("f")),
            layers: Default::default(),
            keyframe_asked: Vec::new(),
            publisher_asked: None,
            paused: false,
            offload: None,
            captions: None,
        }
    }

    #[test]
    fn a_switch_waits_for_the_publishers_gap_between_layers() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let every = Duration::from_millis(350);
        let (h, q) = (Some(Rid::from("h")), Some(Rid::from("q")));
        let mut t = track();
        let ask = |t: &mut Track, at, rid, switch| t.keyframe_ask(at, rid, every, switch, true);
        assert!(ask(&mut t, t0, h, true));
        // q 100 ms after h: the publisher would drop it; asked once the gap
        // has passed, on the first frame after it.
        assert!(!ask(&mut t, ms(100), q, true));
        assert!(!ask(&mut t, ms(319), q, true));
        assert!(ask(&mut t, ms(320), q, true));
        // The same layer again only after the interval.
        assert!(!ask(&mut t, ms(500), q, true));
        assert!(ask(&mut t, ms(670), q, true));
        // A request on a subscriber's behalf does not wait for the gap, but
        // starts one.
        assert!(ask(&mut t, ms(700), h, false));
        assert!(!ask(&mut t, ms(1019), q, true));
        // A request asked of a worker neither waits for nor starts one.
        assert!(t.keyframe_ask(ms(1020), Some(Rid::from("w1")), every, true, false));
        assert!(ask(&mut t, ms(1030), q, true));
    }
}
