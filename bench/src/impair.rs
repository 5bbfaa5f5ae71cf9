//! Link impairments a participant applies to its own packets, each
//! direction on its own: random loss, latency, jitter and a rate limit with
//! a drop-tail queue, as `tc netem` and `tbf` would. In-process, so a load
//! test on loopback needs no root and no namespaces.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::scenario::Link;

/// The longest a packet may wait for the rate limit before it is dropped
/// (a mobile link's buffer).
pub const QUEUE_LIMIT: Duration = Duration::from_millis(200);

/// One direction of an impaired link.
#[derive(Debug)]
pub struct Impair {
    link: Link,
    rng: u64,
    /// When the rate limit lets the next packet start.
    next_free: Option<Instant>,
    queue: VecDeque<(Instant, SocketAddr, Vec<u8>)>,
    /// Packets dropped by loss or by the full queue.
    pub dropped: u64,
}

impl Impair {
    /// An impairment for `link`, with a seed of its own.
    pub fn new(link: &Link, seed: u64) -> Impair {
        Impair {
            link: link.clone(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            next_free: None,
            queue: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Whether this link changes anything.
    pub fn is_none(&self) -> bool {
        self.link == Link::default()
    }

    /// A uniform number in [0, 1) (xorshift64*).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A packet enters the link at `now`.
    pub fn push(&mut self, now: Instant, to: SocketAddr, data: Vec<u8>) {
        if self.link.loss_pct > 0.0 && self.uniform() * 100.0 < self.link.loss_pct {
            self.dropped += 1;
            return;
        }
        let mut start = now;
        if let Some(kbps) = self.link.rate_kbps {
            let free = self.next_free.unwrap_or(now).max(now);
            if free.saturating_duration_since(now) > QUEUE_LIMIT {
                self.dropped += 1;
                return;
            }
            let wire = Duration::from_secs_f64(data.len() as f64 * 8.0 / (kbps as f64 * 1000.0));
            self.next_free = Some(free + wire);
            start = free + wire;
        }
        let jitter = self.link.jitter.mul_f64(self.uniform());
        let due = start + self.link.latency + jitter;
        // Keep the queue ordered by due time (jitter reorders, as netem does).
        let at = self.queue.partition_point(|(d, _, _)| *d <= due);
        self.queue.insert(at, (due, to, data));
    }

    /// The next packet due by `now`, if any.
    pub fn pop(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.queue.front().is_some_and(|(d, _, _)| *d <= now) {
            self.queue.pop_front().map(|(_, to, data)| (to, data))
        } else {
            None
        }
    }

    /// When the next packet is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(d, _, _)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().expect("addr")
    }

    #[test]
    fn loss_is_about_what_was_asked() {
        let link = Link {
            loss_pct: 10.0,
            ..Link::default()
        };
        let mut i = Impair::new(&link, 7);
        let now = Instant::now();
        for _ in 0..10_000 {
            i.push(now, addr(), vec![0; 100]);
        }
        assert!((900..1100).contains(&i.dropped), "{}", i.dropped);
        let mut out = 0;
        while i.pop(now).is_some() {
            out += 1;
        }
        assert_eq!(out + i.dropped, 10_000);
    }

    #[test]
    fn latency_jitter_and_rate() {
        let link = Link {
            latency: Duration::from_millis(40),
            jitter: Duration::from_millis(20),
            rate_kbps: Some(800),
            ..Link::default()
        };
        let mut i = Impair::new(&link, 3);
        let t0 = Instant::now();
        // 1,000-byte packets take 10 ms each at 800 kbit/s: 20 fit in the
        // 200 ms queue, the rest are dropped.
        for _ in 0..40 {
            i.push(t0, addr(), vec![0; 1000]);
        }
        assert!((18..=22).contains(&(40 - i.dropped)), "{}", i.dropped);
        assert!(
            i.pop(t0 + Duration::from_millis(49)).is_none(),
            "not before rate + latency"
        );
        let first = i.next_due().expect("queued");
        let d = first - t0;
        assert!(
            d >= Duration::from_millis(50) && d <= Duration::from_millis(70),
            "{d:?}"
        );
        // Nothing untouched comes through a link without impairments.
        let mut clean = Impair::new(&Link::default(), 1);
        assert!(clean.is_none());
        clean.push(t0, addr(), vec![1]);
        assert_eq!(clean.pop(t0), Some((addr(), vec![1])));
    }
}
