//! The shard's timer queue: only sessions (and empty rooms) that are due get a
//! timeout, instead of every `Rtc` being polled on every wake-up.
//!
//! A binary heap with lazy deletion: an entry is valid only while it equals the
//! deadline its owner currently holds, so moving a deadline is one push and
//! stale entries fall out when they reach the top.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::ids::{RoomId, SessionId};

/// What a timer belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A session's str0m timeout (or its reconnect grace).
    Session(SessionId),
    /// An empty room's grace period.
    Room(RoomId),
}

/// A min-heap of `(deadline, key)`.
#[derive(Debug, Default)]
pub struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl TimerQueue {
    /// Add an entry. The caller remembers `at` as its owner's current deadline.
    pub fn schedule(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry's deadline, valid or stale.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Take the earliest entry if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let a = SessionId::random();
        let b = SessionId::random();
        let mut q = TimerQueue::default();
        q.schedule(t0 + Duration::from_millis(30), TimerKey::Session(a));
        q.schedule(t0 + Duration::from_millis(10), TimerKey::Session(b));
        q.schedule(
            t0 + Duration::from_millis(20),
            TimerKey::Room(RoomId::parse("r").expect("valid")),
        );
        assert_eq!(q.next(), Some(t0 + Duration::from_millis(10)));
        assert!(q.pop_due(t0).is_none());
        let due: Vec<_> = std::iter::from_fn(|| q.pop_due(t0 + Duration::from_millis(25)))
            .map(|(_, k)| k)
            .collect();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0], TimerKey::Session(b));
        assert!(matches!(due[1], TimerKey::Room(_)));
        assert_eq!(q.len(), 1);
    }
}
