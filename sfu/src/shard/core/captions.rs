//! Live captions inside the shard core.
//!
//! Captions are per room. While they are on (an official switched them on,
//! or `captions.on_at_start`), every admitted participant's audio track has
//! a caption session on a worker, opened through the shard's pool: its Opus
//! packets go there as they arrive (a new group every [`GROUP`] packets),
//! and the segments that come back go to every admitted participant of the
//! room as `caption` messages with the speaker's display name. Nothing is
//! kept: a segment is passed on and forgotten.
//!
//! The room is told the state (`captions-state`) when it changes: switched
//! on or off, or unavailable while the pool has no worker for one of the
//! sessions (the call goes on; the pool places the session again when a
//! worker comes back, and the room is told captions are back).

use std::time::Instant;

use balie_offload::Caption;
use str0m::media::MediaKind;

use super::transcode::pool_frame;
use super::{Fanout, ShardCore};
use crate::ids::{RoomId, SessionId, TrackId};
use crate::offload::{PoolCommand, PoolEvent};
use crate::shard::room::CaptionFeed;
use crate::signal::channel::{captions_notice, ServerMessage};
use crate::token::Role;

/// Opus packets per group sent to the worker (a second of 20 ms packets).
pub const GROUP: u64 = 50;

impl ShardCore {
    /// Whether this shard's captions are set up (`[captions] enabled`).
    pub(super) fn captions_enabled(&self) -> bool {
        self.config.captions.is_some()
    }

    /// A room's captions now: (on, available: no session without a worker).
    fn captions_status(&self, room_id: &RoomId) -> Option<(bool, bool)> {
        self.config.captions.as_ref()?;
        let room = self.rooms.get(room_id)?;
        let available = !room
            .tracks
            .iter()
            .any(|t| t.captions.as_ref().is_some_and(|c| c.lost));
        Some((room.captions.on, available))
    }

    /// The captions state message for a room now.
    pub(super) fn captions_state(&self, room_id: &RoomId) -> Option<ServerMessage> {
        let cfg = self.config.captions.as_ref()?;
        let (on, available) = self.captions_status(room_id)?;
        let by = self.rooms.get(room_id)?.captions.by;
        Some(ServerMessage::CaptionsState {
            on,
            available,
            language: cfg.language.clone(),
            by: by.map(|s| s.to_string()),
            notice: captions_notice(&cfg.language, on, available),
        })
    }

    /// A new room starts with captions on when the config says so.
    pub(super) fn captions_new_room(&mut self, room_id: &RoomId) {
        let on = self.config.captions.as_ref().is_some_and(|c| c.on_at_start);
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.captions.on = on;
        }
    }

    /// An official switches the room's captions.
    pub(super) fn on_captions_switch(&mut self, now: Instant, sid: SessionId, on: bool) {
        let Some(sess) = self.sessions.get(&sid) else {
            return;
        };
        if sess.claims.role != Role::Official {
            return self.reply_error(
                sid,
                "not_allowed",
                "only an official may switch captions".into(),
            );
        }
        if !self.captions_enabled() {
            return self.reply_error(
                sid,
                "captions_unavailable",
                "captions are not set up on this server".into(),
            );
        }
        let room_id = sess.room.clone();
        let span = sess.span.clone();
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.captions.on = on;
            room.captions.by = Some(sid);
            // Say it even if nothing changed: the official asked.
            room.captions.announced = None;
        }
        tracing::info!(parent: &span, on, "captions switched");
        self.captions_sync(now, &room_id);
    }

    /// Open a caption session for every admitted participant's audio track
    /// while the room's captions are on, close the others; then tell the
    /// room if its captions state changed.
    pub(super) fn captions_sync(&mut self, now: Instant, room_id: &RoomId) {
        let Some(cfg) = self.config.captions.as_ref() else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        for t in room
            .tracks
            .iter_mut()
            .filter(|t| t.kind == MediaKind::Audio)
        {
            let admitted = self.sessions.get(&t.owner).is_some_and(|s| s.admitted);
            let want = room.captions.on && admitted;
            let key = t.id.0;
            if want && t.captions.is_none() {
                t.captions = Some(CaptionFeed::default());
                self.pool_out.push_back(PoolCommand::OpenCaptions {
                    key,
                    language: cfg.language.clone(),
                });
                self.caption_rooms.insert(key, room_id.clone());
                self.metrics.caption_tracks.inc();
            } else if !want && t.captions.take().is_some() {
                self.pool_out.push_back(PoolCommand::Close { key });
                self.caption_rooms.remove(&key);
                self.metrics.caption_tracks.dec();
            }
        }
        self.captions_announce(now, room_id);
    }

    /// A published track is going away: its caption session with it.
    pub(super) fn captions_drop(&mut self, track: TrackId) {
        if self.caption_rooms.remove(&track.0).is_some() {
            self.pool_out.push_back(PoolCommand::Close { key: track.0 });
            self.metrics.caption_tracks.dec();
        }
    }

    /// Tell the room its captions state if it differs from what it was told.
    fn captions_announce(&mut self, now: Instant, room_id: &RoomId) {
        // Compared first; the message (with its notice) only built to send.
        let Some((on, available)) = self.captions_status(room_id) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let was = room.captions.announced.replace((on, available));
        if was == Some((on, available)) {
            return;
        }
        if on && !available && was.is_some_and(|(o, a)| o && a) {
            self.metrics.captions_unavailable.inc();
        }
        tracing::info!(parent: &room.span, on, available, "captions state");
        if let Some(msg) = self.captions_state(room_id) {
            self.broadcast(now, room_id, None, &msg);
        }
    }

    /// An Opus packet of `track`: to its caption session, if one is open.
    pub(super) fn captions_audio(&mut self, room_id: &RoomId, track_id: TrackId, frame: &Fanout) {
        let Some(feed) = self.caption_feed(room_id, track_id) else {
            return;
        };
        let starts_group = feed.packets % GROUP == 0;
        feed.packets += 1;
        self.pool_out
            .push_back(pool_frame(track_id, frame, starts_group));
    }

    /// Whether a pool event is about a caption session.
    pub(super) fn is_caption_event(&self, event: &PoolEvent) -> bool {
        self.caption_rooms.contains_key(&event.key())
    }

    /// News from the pool about a caption session.
    pub(super) fn on_caption_event(&mut self, now: Instant, event: PoolEvent) {
        match event {
            PoolEvent::Caption { key, caption } => self.caption(now, key, caption),
            PoolEvent::Lost { key, reason } => {
                let Some(room_id) = self.caption_rooms.get(&key).cloned() else {
                    return;
                };
                if let Some(feed) = self.caption_feed(&room_id, TrackId(key)) {
                    feed.lost = true;
                }
                if let Some(room) = self.rooms.get(&room_id) {
                    tracing::warn!(parent: &room.span, track = key, %reason, "captions unavailable");
                }
                self.captions_announce(now, &room_id);
            }
            PoolEvent::Moved { key } => {
                let Some(room_id) = self.caption_rooms.get(&key).cloned() else {
                    return;
                };
                if let Some(feed) = self.caption_feed(&room_id, TrackId(key)) {
                    feed.lost = false;
                    // The new worker's writer waits for a group's start:
                    // the next packet begins one, so no audio is lost.
                    feed.packets = 0;
                }
                self.captions_announce(now, &room_id);
            }
            // Audio needs no keyframes, and makes no layers.
            PoolEvent::NeedKeyframe { .. } | PoolEvent::Frame { .. } | PoolEvent::Layout { .. } => {
            }
        }
    }

    /// The caption session of a track, if it has one.
    fn caption_feed(&mut self, room_id: &RoomId, track: TrackId) -> Option<&mut CaptionFeed> {
        self.rooms.get_mut(room_id)?.track(track)?.captions.as_mut()
    }

    /// A caption segment: to every admitted participant of the room, with
    /// the speaker's name.
    fn caption(&mut self, now: Instant, key: u64, c: Caption) {
        let Some(room_id) = self.caption_rooms.get(&key).cloned() else {
            return;
        };
        let Some(track) = self
            .rooms
            .get_mut(&room_id)
            .and_then(|r| r.track(TrackId(key)))
        else {
            return;
        };
        let owner = track.owner;
        // A segment means the session is placed and working.
        if let Some(feed) = track.captions.as_mut().filter(|f| f.lost) {
            feed.lost = false;
            self.captions_announce(now, &room_id);
        }
        let Some(speaker) = self.sessions.get(&owner) else {
            return;
        };
        if c.is_final {
            self.metrics.captions_final.inc();
        } else {
            self.metrics.captions_partial.inc();
        }
        let msg = ServerMessage::Caption {
            participant: owner.to_string(),
            name: speaker.claims.name.clone(),
            text: c.text,
            is_final: c.is_final,
            start_ms: c.start_ms,
            end_ms: c.end_ms,
        };
        self.broadcast_where(now, &room_id, |_, s| s.admitted, &msg);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{json, Value};
    use str0m::media::MediaKind;

    use crate::config::CaptionsConfig;
    use crate::shard::session::LeaveReason;
    use crate::shard::ShardConfig;
    use crate::sim::{FakePool, Join, Sim};
    use crate::token::Role;

    fn sim(on_at_start: bool) -> Sim {
        Sim::new(
            7,
            ShardConfig {
                captions: Some(CaptionsConfig {
                    enabled: true,
                    language: "nl".into(),
                    on_at_start,
                }),
                ..ShardConfig::default()
            },
        )
    }

    fn pool(s: &Sim) -> &FakePool {
        s.pool.as_ref().expect("captions make a pool")
    }

    fn pool_mut(s: &mut Sim) -> &mut FakePool {
        s.pool.as_mut().expect("captions make a pool")
    }

    fn states(s: &Sim, p: usize) -> Vec<(bool, bool)> {
        s.peers[p]
            .messages_of("captions-state")
            .iter()
            .map(|m| (m["on"] == true, m["available"] == true))
            .collect()
    }

    fn captions_from<'a>(s: &'a Sim, p: usize, name: &str) -> Vec<&'a Value> {
        s.peers[p]
            .messages_of("caption")
            .into_iter()
            .filter(|m| m["name"] == name)
            .collect()
    }

    #[test]
    fn an_official_switches_captions_and_admitted_speakers_are_captioned_by_name() {
        let mut s = sim(false);
        let o = s.join("r", Sim::claims("r", "Olga", Role::Official), Join::Api);
        let c = s.join("r", Sim::claims("r", "Cor", Role::Citizen), Join::Api);
        s.run_for(Duration::from_secs(2));
        // Told at the start that captions are off; nothing opened.
        assert_eq!(states(&s, o), [(false, true)]);
        assert_eq!(states(&s, c), [(false, true)]);
        assert!(pool(&s).captions.is_empty());

        // Only an official may switch them.
        s.peers[c].send_json(&json!({"type": "captions", "on": true}));
        s.run_for(Duration::from_millis(300));
        assert_eq!(s.peers[c].messages_of("error")[0]["code"], "not_allowed");
        assert!(pool(&s).captions.is_empty());

        s.peers[o].send_json(&json!({"type": "captions", "on": true}));
        s.run_for(Duration::from_millis(300));
        for p in [o, c] {
            assert_eq!(states(&s, p).last(), Some(&(true, true)));
            let last = s.peers[p].messages_of("captions-state");
            let notice = last.last().expect("a state")["notice"].as_str();
            assert!(notice.is_some_and(|n| n.contains("niets opgenomen")));
        }
        // The waiting citizen is not captioned (nothing of theirs reaches
        // the call); the official is, and the citizen sees nothing of it.
        assert_eq!(pool(&s).captions.len(), 1);
        s.run_for(Duration::from_secs(3));
        assert!(captions_from(&s, o, "Olga").len() >= 2);
        assert!(captions_from(&s, c, "Olga").is_empty());

        let cid = s.sessions[c].to_string();
        s.peers[o].send_json(&json!({"type": "admit", "id": cid}));
        s.run_for(Duration::from_secs(3));
        assert_eq!(pool(&s).captions.len(), 2);
        let from_cor = captions_from(&s, o, "Cor");
        assert!(from_cor.len() >= 2, "{from_cor:?}");
        assert_eq!(from_cor[0]["participant"], cid.as_str());
        assert_eq!(from_cor[0]["final"], true);
        assert!(from_cor[0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("packets")));
        assert!(!captions_from(&s, c, "Olga").is_empty());

        // Off: both sessions closed, the room told.
        s.peers[o].send_json(&json!({"type": "captions", "on": false}));
        s.run_for(Duration::from_millis(300));
        assert!(pool(&s).captions.is_empty());
        assert_eq!(pool(&s).closed, 2);
        assert_eq!(states(&s, c).last(), Some(&(false, true)));
        let seen = s.peers[o].messages_of("caption").len();
        s.run_for(Duration::from_secs(2));
        assert_eq!(s.peers[o].messages_of("caption").len(), seen);
    }

    #[test]
    fn without_a_worker_the_room_is_told_and_the_call_goes_on_then_captions_return() {
        let mut s = sim(true);
        let a = s.join("r", Sim::claims("r", "Ann", Role::Official), Join::Api);
        let b = s.join("r", Sim::claims("r", "Bob", Role::Interpreter), Join::Api);
        assert!(
            s.run_until(Duration::from_secs(4), |s| !captions_from(s, a, "Bob")
                .is_empty())
        );
        assert_eq!(states(&s, b).last(), Some(&(true, true)));

        pool_mut(&mut s).captions_lost();
        s.run_for(Duration::from_millis(200));
        for p in [a, b] {
            assert_eq!(states(&s, p).last(), Some(&(true, false)));
            let st = s.peers[p].messages_of("captions-state");
            let notice = st.last().expect("a state")["notice"].as_str();
            assert!(notice.is_some_and(|n| n.contains("gaat gewoon door")));
        }
        let tag = s.peers[b].tag;
        let before = s.peers[a].frames_from(tag, MediaKind::Audio);
        let captions = s.peers[a].messages_of("caption").len();
        s.run_for(Duration::from_secs(2));
        assert!(s.peers[a].frames_from(tag, MediaKind::Audio) >= before + 90);
        assert_eq!(s.peers[a].messages_of("caption").len(), captions);

        pool_mut(&mut s).captions_back();
        s.run_for(Duration::from_millis(200));
        assert_eq!(states(&s, a).last(), Some(&(true, true)));
        let back = s.peers[a].messages_of("caption").len();
        assert!(s.run_until(Duration::from_secs(3), |s| s.peers[a]
            .messages_of("caption")
            .len()
            > back));

        // A speaker who leaves takes their caption session along.
        let open = pool(&s).captions.len();
        s.remove(b, LeaveReason::Left);
        s.run_for(Duration::from_millis(500));
        assert_eq!(pool(&s).captions.len(), open - 1);
    }
}
