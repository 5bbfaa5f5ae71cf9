//! The node's room registry: which shard each room is pinned to, and how many
//! participants it holds. The HTTP layer consults it to admit a session (room
//! full?) and to pick the shard; shards report back when sessions and rooms
//! close. It is off the packet path (touched once per join and leave).
//!
//! Across nodes this is where a shared registry (Redis, as LiveKit does) plugs
//! in; within a node a mutex-protected map is enough.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::{RoomId, SessionId, ShardId};
use crate::token::{Claims, Loa, Role};

#[derive(Debug)]
struct RoomEntry {
    shard: ShardId,
    participants: usize,
    /// The lowest DigiD level citizens need in this room.
    min_loa: Option<Loa>,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<RoomId, RoomEntry>,
    sessions: HashMap<SessionId, (RoomId, ShardId)>,
    /// Sessions per shard, for least-loaded pinning.
    load: Vec<usize>,
}

/// Why a session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    /// The room has `max_participants` already.
    RoomFull,
    /// A citizen below the room's DigiD level.
    LoaTooLow {
        /// What the room needs.
        required: Loa,
        /// What the token says.
        has: Option<Loa>,
    },
}

/// The room registry.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    max_participants: usize,
    default_min_loa: Option<Loa>,
}

impl Registry {
    /// A registry for `shards` shards; rooms start with `default_min_loa`.
    pub fn new(shards: usize, max_participants: usize, default_min_loa: Option<Loa>) -> Registry {
        Registry {
            inner: Mutex::new(Inner {
                load: vec![0; shards.max(1)],
                ..Inner::default()
            }),
            max_participants,
            default_min_loa,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain counters behind; carry on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve a place in `room` for `session` with these token claims: the
    /// room's shard, pinning a new room to the least-loaded shard. An
    /// official's `min_loa` claim sets the room's policy; a citizen below it
    /// is refused before any media flows.
    pub fn admit(
        &self,
        room: &RoomId,
        session: SessionId,
        claims: &Claims,
    ) -> Result<ShardId, AdmitError> {
        let mut inner = self.lock();
        let (shard, mut min_loa) = match inner.rooms.get(room) {
            Some(e) if e.participants >= self.max_participants => return Err(AdmitError::RoomFull),
            Some(e) => (e.shard, e.min_loa),
            None => (least_loaded(&inner.load), self.default_min_loa),
        };
        if claims.role == Role::Official && claims.min_loa.is_some() {
            min_loa = claims.min_loa;
        }
        if let Some(required) = min_loa {
            if claims.role == Role::Citizen && claims.loa.is_none_or(|l| l < required) {
                return Err(AdmitError::LoaTooLow {
                    required,
                    has: claims.loa,
                });
            }
        }
        let entry = inner.rooms.entry(room.clone()).or_insert(RoomEntry {
            shard,
            participants: 0,
            min_loa,
        });
        entry.participants += 1;
        entry.min_loa = min_loa;
        inner.load[shard.0] += 1;
        inner.sessions.insert(session, (room.clone(), shard));
        Ok(shard)
    }

    /// The shard and room of a session.
    pub fn session(&self, session: SessionId) -> Option<(RoomId, ShardId)> {
        self.lock().sessions.get(&session).cloned()
    }

    /// A session ended (or was never started).
    pub fn release(&self, session: SessionId) {
        let mut inner = self.lock();
        let Some((room, shard)) = inner.sessions.remove(&session) else {
            return;
        };
        inner.load[shard.0] = inner.load[shard.0].saturating_sub(1);
        if let Some(e) = inner.rooms.get_mut(&room) {
            e.participants = e.participants.saturating_sub(1);
        }
    }

    /// The shard closed an empty room. The pin is dropped only if nobody was
    /// admitted meanwhile, so a room is never split over two shards.
    pub fn room_closed(&self, room: &RoomId) {
        let mut inner = self.lock();
        if inner.rooms.get(room).is_some_and(|e| e.participants == 0) {
            inner.rooms.remove(room);
        }
    }

    /// Sessions on the node.
    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Rooms pinned on the node.
    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }
}

fn least_loaded(load: &[usize]) -> ShardId {
    let i = load
        .iter()
        .enumerate()
        .min_by_key(|(_, n)| **n)
        .map(|(i, _)| i)
        .unwrap_or(0);
    ShardId(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).expect("valid room")
    }

    fn who(role: Role, loa: Option<Loa>) -> Claims {
        Claims {
            loa,
            ..Claims::new("x", "s", role)
        }
    }

    #[test]
    fn citizens_below_the_rooms_digid_level_are_refused() {
        let r = Registry::new(1, 8, Some(Loa::Midden));
        let low = who(Role::Citizen, Some(Loa::Basis));
        let none = who(Role::Citizen, None);
        let ok = who(Role::Citizen, Some(Loa::Substantieel));
        assert_eq!(
            r.admit(&room("a"), SessionId::random(), &low),
            Err(AdmitError::LoaTooLow {
                required: Loa::Midden,
                has: Some(Loa::Basis)
            })
        );
        assert!(r.admit(&room("a"), SessionId::random(), &none).is_err());
        assert_eq!(r.room_count(), 0, "a refusal pins no room");
        assert!(r.admit(&room("a"), SessionId::random(), &ok).is_ok());
        // Officials are never checked against it; their token may raise it.
        let mut official = who(Role::Official, None);
        official.min_loa = Some(Loa::Hoog);
        assert!(r.admit(&room("a"), SessionId::random(), &official).is_ok());
        assert!(r.admit(&room("a"), SessionId::random(), &ok).is_err());
        assert!(r
            .admit(
                &room("a"),
                SessionId::random(),
                &who(Role::Citizen, Some(Loa::Hoog))
            )
            .is_ok());
        // Another room keeps the config's default.
        assert!(r.admit(&room("b"), SessionId::random(), &ok).is_ok());
    }

    #[test]
    fn rooms_pin_to_the_least_loaded_shard_and_stay() {
        let r = Registry::new(3, 8, None);
        let a = r
            .admit(
                &room("a"),
                SessionId::random(),
                &who(Role::Interpreter, None),
            )
            .expect("admitted");
        let a2 = r
            .admit(
                &room("a"),
                SessionId::random(),
                &who(Role::Interpreter, None),
            )
            .expect("admitted");
        assert_eq!(a, a2, "one room, one shard");
        let b = r
            .admit(
                &room("b"),
                SessionId::random(),
                &who(Role::Interpreter, None),
            )
            .expect("admitted");
        let c = r
            .admit(
                &room("c"),
                SessionId::random(),
                &who(Role::Interpreter, None),
            )
            .expect("admitted");
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_ne!(a, c);
        // Shard of b and c have one session each, a's has two: d goes to b's or c's.
        let d = r
            .admit(
                &room("d"),
                SessionId::random(),
                &who(Role::Interpreter, None),
            )
            .expect("admitted");
        assert_ne!(d, a);
    }

    #[test]
    fn full_rooms_refuse_and_release_frees_a_place() {
        let r = Registry::new(1, 2, None);
        let s1 = SessionId::random();
        r.admit(&room("x"), s1, &who(Role::Interpreter, None))
            .expect("admitted");
        r.admit(
            &room("x"),
            SessionId::random(),
            &who(Role::Interpreter, None),
        )
        .expect("admitted");
        assert_eq!(
            r.admit(
                &room("x"),
                SessionId::random(),
                &who(Role::Interpreter, None)
            ),
            Err(AdmitError::RoomFull)
        );
        r.release(s1);
        assert!(r
            .admit(
                &room("x"),
                SessionId::random(),
                &who(Role::Interpreter, None)
            )
            .is_ok());
    }

    #[test]
    fn a_room_closed_while_someone_joins_keeps_its_pin() {
        let r = Registry::new(2, 8, None);
        let s = SessionId::random();
        let shard = r
            .admit(&room("x"), s, &who(Role::Interpreter, None))
            .expect("admitted");
        r.release(s);
        let s2 = SessionId::random();
        r.admit(&room("x"), s2, &who(Role::Interpreter, None))
            .expect("admitted");
        r.room_closed(&room("x")); // the shard's close raced the new join
        assert_eq!(r.session(s2).map(|(_, sh)| sh), Some(shard));
        assert_eq!(r.room_count(), 1);
        r.release(s2);
        r.room_closed(&room("x"));
        assert_eq!(r.room_count(), 0);
    }
}
