//! Typed identifiers: a room, a session, a shard, a published track.

use std::fmt;
use std::sync::Arc;

/// A room, as named in the URL and the token's `room` claim.
///
/// Room names are limited to 1-128 characters of `[A-Za-z0-9._-]`, so they are
/// safe in URLs, logs and metrics. Shared, not copied: the shard names the
/// room of every frame it forwards, and a `String` clone there was an
/// allocation and a copy per frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

impl RoomId {
    /// Parse a room name, refusing anything outside `[A-Za-z0-9._-]{1,128}`.
    pub fn parse(s: &str) -> Option<RoomId> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        ok.then(|| RoomId(Arc::from(s)))
    }

    /// The room name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One participant's peer connection. Random 128 bits: the session URL
/// `/v1/sessions/{id}` is a capability, as in WHIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u128);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> SessionId {
        SessionId(rand::random())
    }

    /// Parse the 32-hex-digit form.
    pub fn parse(s: &str) -> Option<SessionId> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(SessionId)
    }

    /// A short form for logs (the first 8 hex digits).
    pub fn short(&self) -> String {
        format!("{:08x}", (self.0 >> 96) as u32)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A shard: one media thread with its own UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A track published in a room, unique within its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_restricted() {
        assert!(RoomId::parse("balie-42_a.b").is_some());
        assert!(RoomId::parse("").is_none());
        assert!(RoomId::parse("a/b").is_none());
        assert!(RoomId::parse("ä").is_none());
        assert!(RoomId::parse(&"x".repeat(129)).is_none());
    }

    #[test]
    fn session_ids_round_trip() {
        let id = SessionId::random();
        assert_eq!(SessionId::parse(&id.to_string()), Some(id));
        assert_eq!(SessionId::parse("xyz"), None);
        assert_eq!(SessionId::parse(&"g".repeat(32)), None);
    }
}
