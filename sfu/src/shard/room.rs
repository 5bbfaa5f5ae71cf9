//! A room inside a shard: its participants and the tracks they publish.
//! Rooms are pinned to one shard, so forwarding inside a call never crosses
//! threads and takes no lock.

use std::time::Instant;

use str0m::media::{MediaKind, Mid, Rid};

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
    /// Last keyframe request sent to the publisher, per layer.
    pub keyframe_asked: Vec<(Option<Rid>, Instant)>,
    /// Nobody shows this video: the publisher was told to stop sending it.
    pub paused: bool,
}

impl Track {
    /// Whether the publisher sends simulcast.
    pub fn simulcast(&self) -> bool {
        self.layer.is_some()
    }
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
