//! A deterministic simulator: the sans-IO shard core and N synthetic peers on
//! one virtual clock, joined by in-memory links with latency and seeded loss.
//! No sockets and no sleeps: a minute of call runs in about a second.
//!
//! Addresses are plain values here (loopback numbers); nothing touches the
//! network. This is the home of protocol tests; link models (jitter, bursts,
//! rate limits) grow here.

pub mod fake_pool;
pub mod peer;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use str0m::format::Codec;
use str0m::net::Transmit;

pub use fake_pool::FakePool;
pub use peer::{check_frame, make_frame, Join, Peer, Received};

use crate::ids::{RoomId, SessionId, ShardId};
use crate::metrics::{Metrics, ShardMetrics};
use crate::shard::session::{answer_offer, SessionSetup};
use crate::shard::{
    Command, LeaveReason, NewSession, SessionKind, ShardConfig, ShardCore, ShardEvent, ShardInput,
    ShardOutput,
};
use crate::token::{Claims, Loa, Role};

/// One direction of a peer's link to the SFU: a netem-like model.
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay, uniform in `0..jitter`, per datagram (datagrams may reorder).
    pub jitter: Duration,
    /// Probability that a datagram is lost (independently).
    pub loss: f64,
    /// Bursty loss (Gilbert-Elliott): in a burst every datagram is lost.
    pub burst: Option<Burst>,
    /// Bottleneck rate in bits per second; datagrams queue behind it.
    pub rate: Option<u64>,
    /// The bottleneck's queue, as delay: a datagram that would wait longer is
    /// dropped (drop-tail). Zero means 200 ms.
    pub queue: Duration,
    /// Bytes the bottleneck lets through at once after a quiet spell, as tc's
    /// token bucket filter (`tbf ... burst`) does: a short burst (a probe)
    /// arrives as fast as it was sent. Zero: a plain queue.
    pub bucket: usize,
    /// Cut: nothing passes.
    pub down: bool,
}

/// Gilbert-Elliott bursty loss: per datagram, the chance to enter a burst
/// and, inside one, the chance to leave it. Mean burst length is `1 / leave`
/// datagrams; the long-run loss rate is `enter / (enter + leave)`.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    /// Chance per datagram to start a burst.
    pub enter: f64,
    /// Chance per datagram to end a burst.
    pub leave: f64,
}

impl Burst {
    /// A burst model with the given long-run loss rate and mean burst length
    /// (in datagrams).
    pub fn new(loss: f64, mean_len: f64) -> Burst {
        let leave = 1.0 / mean_len.max(1.0);
        let enter = loss * leave / (1.0 - loss).max(1e-9);
        Burst { enter, leave }
    }
}

/// What a link remembers between datagrams.
#[derive(Debug, Clone, Copy, Default)]
struct LinkState {
    /// When the bottleneck is free again.
    busy_until: Option<Instant>,
    in_burst: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// The simulator.
pub struct Sim {
    /// Virtual now.
    pub now: Instant,
    /// The shard under test.
    pub shard: ShardCore,
    /// The shard's (virtual) address.
    pub shard_addr: SocketAddr,
    /// The peers, in join order.
    pub peers: Vec<Peer>,
    /// Each peer's session id.
    pub sessions: Vec<SessionId>,
    /// Each peer's uplink (peer to SFU) and downlink.
    pub links: Vec<(Link, Link)>,
    link_state: Vec<(LinkState, LinkState)>,
    /// Events the shard reported.
    pub events: Vec<ShardEvent>,
    /// Metrics of the shard.
    pub metrics: Metrics,
    /// Wall time spent inside the shard core (single-threaded: its CPU time).
    pub shard_busy: Duration,
    /// Datagrams the shard core sent.
    pub shard_sent: u64,
    /// Of those, the ones the shard handed out as urgent (sessions still
    /// connecting), as the driver takes them after each batch it reads.
    pub shard_urgent: u64,
    setup: SessionSetup,
    net: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    rng: StdRng,
    step: Duration,
    /// The transcoder pool, when the shard config has offload.
    pub pool: Option<FakePool>,
    /// Sessions handed to the shard later (`join_late`).
    late: Vec<(Instant, NewSession)>,
}

impl Sim {
    /// A simulator with one shard, seeded randomness and the given shard config.
    pub fn new(seed: u64, config: ShardConfig) -> Sim {
        crate::server::install_crypto();
        let metrics = Metrics::new();
        let shard_metrics: ShardMetrics = metrics.shard(ShardId(0));
        // Cannot fail with the built-in aws-lc-rs provider.
        let setup = SessionSetup::new(400, config.adaptive_layers)
            .expect("aws-lc-rs generates certificates");
        let config_offload = config.offload_layers > 0 || config.captions.is_some();
        Sim {
            now: Instant::now(),
            shard: ShardCore::new(ShardId(0), config, shard_metrics),
            shard_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 5000),
            peers: Vec::new(),
            sessions: Vec::new(),
            links: Vec::new(),
            link_state: Vec::new(),
            events: Vec::new(),
            metrics,
            shard_busy: Duration::ZERO,
            shard_sent: 0,
            shard_urgent: 0,
            setup,
            net: BinaryHeap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            step: Duration::from_millis(1),
            pool: config_offload.then(FakePool::default),
            late: Vec::new(),
        }
    }

    /// Claims for a simulated participant.
    pub fn claims(room: &str, sub: &str, role: Role) -> Claims {
        Claims {
            name: Some(sub.into()),
            loa: Some(Loa::Midden),
            ..Claims::new(room, sub, role)
        }
    }

    /// Add a peer to `room`; returns its index. Links start at 10 ms, no loss.
    pub fn join(&mut self, room: &str, claims: Claims, join: Join) -> usize {
        self.join_late(room, claims, join, Duration::ZERO)
    }

    /// Add a peer whose session reaches the shard `late` after the peer has
    /// its answer (as when the shard is busy reading when the HTTP handler
    /// hands the session over).
    pub fn join_late(&mut self, room: &str, claims: Claims, join: Join, late: Duration) -> usize {
        let i = self.peers.len();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8 + 1)), 6000);
        let (mut peer, offer) =
            Peer::new(&claims.sub, i as u32 + 1, join, Codec::Vp8, addr, self.now);
        let (rtc, answer, ufrag) = answer_offer(&self.setup, &[self.shard_addr], offer, self.now)
            .expect("the simulator's offers are valid");
        peer.accept_answer(answer).expect("the answer applies");
        let id = SessionId::random();
        let kind = match join {
            Join::Whip => SessionKind::Whip,
            Join::Whep => SessionKind::Whep,
            _ => SessionKind::Api,
        };
        let new = NewSession {
            id,
            room: RoomId::parse(room).expect("valid room name"),
            kind,
            claims,
            rtc,
            ufrag,
            remote_ufrag: None,
            offer_received: self.now,
        };
        if late.is_zero() {
            self.shard
                .handle_input(ShardInput::Command(self.now, Command::Add(Box::new(new))));
        } else {
            self.late.push((self.now + late, new));
        }
        self.peers.push(peer);
        self.sessions.push(id);
        let link = Link {
            latency: Duration::from_millis(10),
            ..Link::default()
        };
        self.links.push((link, link));
        self.link_state.push(Default::default());
        self.collect();
        i
    }

    /// End a peer's session from the server side.
    pub fn remove(&mut self, peer: usize, reason: LeaveReason) {
        let session = self.sessions[peer];
        self.shard.handle_input(ShardInput::Command(
            self.now,
            Command::Remove { session, reason },
        ));
        self.collect();
    }

    /// Put a datagram on peer `i`'s link, `up` (to the SFU) or down.
    fn send(&mut self, i: usize, up: bool, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let (link, state) = if up {
            (self.links[i].0, &mut self.link_state[i].0)
        } else {
            (self.links[i].1, &mut self.link_state[i].1)
        };
        if link.down {
            return;
        }
        if let Some(b) = link.burst {
            let flip = if state.in_burst { b.leave } else { b.enter };
            if self.rng.random_bool(flip.clamp(0.0, 1.0)) {
                state.in_burst = !state.in_burst;
            }
            if state.in_burst {
                return;
            }
        }
        if link.loss > 0.0 && self.rng.random_bool(link.loss.min(1.0)) {
            return;
        }
        let mut depart = self.now;
        if let Some(rate) = link.rate {
            let rate = rate.max(1) as f64;
            // A token bucket is a queue whose clock may lag `allow` behind.
            let allow = Duration::from_secs_f64(link.bucket as f64 * 8.0 / rate);
            let floor = self.now.checked_sub(allow).unwrap_or(self.now);
            let start = state.busy_until.map_or(floor, |b| b.max(floor));
            let queue = if link.queue.is_zero() {
                Duration::from_millis(200)
            } else {
                link.queue
            };
            if start > self.now + queue + allow {
                return; // drop-tail
            }
            let wire = Duration::from_secs_f64((data.len() as f64 + 28.0) * 8.0 / rate);
            state.busy_until = Some(start + wire);
            depart = (start + wire)
                .checked_sub(allow)
                .map_or(self.now, |d| d.max(self.now));
        }
        let jitter = if link.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.rng.random_range(Duration::ZERO..link.jitter)
        };
        self.seq += 1;
        self.net.push(Reverse(InFlight {
            at: depart + link.latency + jitter,
            seq: self.seq,
            from,
            to,
            data,
        }));
    }

    fn peer_index(&self, addr: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.addr == addr)
    }

    /// A datagram the shard sent, onto its peer's downlink.
    fn deliver(&mut self, t: Transmit) {
        self.shard_sent += 1;
        if let Some(i) = self.peer_index(t.destination) {
            self.send(i, false, t.source, t.destination, t.contents.to_vec());
        }
    }

    /// Move every output of the shard and the peers onto the links.
    fn collect(&mut self) {
        while let Some(t) = self.shard.poll_urgent() {
            self.shard_urgent += 1;
            self.deliver(t);
        }
        loop {
            let t0 = Instant::now();
            let output = self.shard.poll_output();
            self.shard_busy += t0.elapsed();
            match output {
                ShardOutput::Transmit(t) => self.deliver(t),
                ShardOutput::Event(e) => self.events.push(e),
                ShardOutput::Offload(cmd) => {
                    if let Some(p) = self.pool.as_mut() {
                        p.command(cmd);
                    }
                }
                ShardOutput::Timeout(_) => {
                    // The pool answers at once; its answers make more output.
                    let answers = self.pool.as_mut().map(FakePool::drain).unwrap_or_default();
                    if answers.is_empty() {
                        break;
                    }
                    for ev in answers {
                        self.shard.handle_input(ShardInput::Offload(self.now, ev));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for i in 0..self.peers.len() {
            self.peers[i].poll(&mut out);
            for t in out.drain(..) {
                self.send(i, true, t.source, t.destination, t.contents.to_vec());
            }
        }
    }

    /// A datagram to the shard from an address that is no peer's.
    pub fn from_stranger(&mut self, source: SocketAddr, data: &[u8]) {
        let now = self.now;
        self.shard.handle_input(ShardInput::Datagram {
            now,
            source,
            destination: self.shard_addr,
            data,
        });
        self.collect();
    }

    /// Advance virtual time by one step (1 ms).
    pub fn tick(&mut self) {
        self.now += self.step;
        let now = self.now;
        while let Some(i) = self.late.iter().position(|(at, _)| *at <= now) {
            let (_, new) = self.late.swap_remove(i);
            self.shard
                .handle_input(ShardInput::Command(now, Command::Add(Box::new(new))));
        }
        while self.net.peek().is_some_and(|Reverse(p)| p.at <= now) {
            let Some(Reverse(p)) = self.net.pop() else {
                break;
            };
            if p.to == self.shard_addr {
                let t0 = Instant::now();
                self.shard.handle_input(ShardInput::Datagram {
                    now,
                    source: p.from,
                    destination: p.to,
                    data: &p.data,
                });
                self.shard_busy += t0.elapsed();
            } else if let Some(i) = self.peer_index(p.to) {
                self.peers[i].handle_datagram(now, p.from, &p.data);
            }
        }
        let t0 = Instant::now();
        self.shard.handle_input(ShardInput::Timeout(now));
        self.shard_busy += t0.elapsed();
        for p in &mut self.peers {
            p.tick(now);
        }
        self.collect();
    }

    /// Run until `done` holds or `limit` of virtual time passes; true if it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            self.tick();
            if done(self) {
                return true;
            }
        }
        false
    }

    /// Run for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::media::MediaKind;

    fn sim() -> Sim {
        Sim::new(7, ShardConfig::default())
    }

    #[test]
    fn routing_one_to_one_in_virtual_time() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        let (ta, tb) = (s.peers[a].tag, s.peers[b].tag);
        // The issue asks for f within 10 s: the SFU forwards f after
        // 3.4-11.5 s in the six runs of layer_sweep. This run's trajectory
        // (backoffs after the failed stay on f) reaches h after about 9.5 s
        // and stays there, so this checks the way up, not f (open problem,
        // docs/benchmarks.md).
        let ok = s.run_until(Duration::from_secs(15), |s| {
            s.peers[a].frames_from(tb, MediaKind::Video) >= 60
                && s.peers[b].frames_from(ta, MediaKind::Video) >= 60
                && s.peers[a].frames_from(tb, MediaKind::Audio) >= 100
        });
        assert!(ok);
        assert_eq!(s.peers[a].corrupt() + s.peers[b].corrupt(), 0);
        // Nobody receives their own media.
        assert_eq!(s.peers[a].frames_from(ta, MediaKind::Video), 0);
        assert!(s
            .events
            .iter()
            .any(|e| matches!(e, ShardEvent::SessionConnected { .. })));
    }

    /// A frame written into a subscriber's session leaves in the same poll:
    /// it needs no str0m timer of its own to be packetised, and its packets
    /// need none each to leave str0m's pacer (vendor/str0m/PATCH.md). Without
    /// that patch every forwarded frame costs a `packetize` wake-up and every
    /// packet a `pacer` wake-up, each a whole `Rtc::handle_timeout`.
    #[test]
    fn a_forwarded_frame_leaves_without_timer_wakeups_of_its_own() {
        use crate::metrics::family_sum;
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        s.run_for(Duration::from_secs(10));
        let (ta, tb) = (s.peers[a].tag, s.peers[b].tag);
        assert!(s.peers[a].frames_from(tb, MediaKind::Video) > 100);
        assert!(s.peers[b].frames_from(ta, MediaKind::Audio) > 200);
        let text = s.metrics.render();
        let frames = family_sum(&text, "balie_frames_forwarded_total", &[]);
        let packetize = family_sum(
            &text,
            "balie_timer_wakeups_total",
            &["reason=\"packetize\""],
        );
        let pacer = family_sum(&text, "balie_timer_wakeups_total", &["reason=\"pacer\""]);
        eprintln!(
            "frames forwarded {frames}, packetize wake-ups {packetize}, pacer wake-ups {pacer}"
        );
        assert!(frames > 1000.0, "{text}");
        assert!(
            packetize < frames / 100.0,
            "{packetize} packetize wake-ups for {frames} frames"
        );
        // What is left of the pacer's wake-ups is its own schedule: padding
        // and probes for the estimate.
        assert!(
            pacer < frames / 4.0,
            "{pacer} pacer wake-ups for {frames} frames"
        );
    }

    /// An audio-only call at a low packet rate (120 ms Opus frames, as in
    /// balie-bench's 2,000-call scenario): with no video, nothing but the
    /// audio, its reports and the connection's keep-alives should wake a
    /// session. At 8 packets a second each way, a session's cost is its
    /// timer wake-ups, not its packets. Measured: 0.7 wake-ups per session
    /// and second (stats, TWCC feedback every 250 ms); 5.8 with the delay
    /// controller's clamp (`BWE_DELAY_TICK`) at 100 ms once that feedback
    /// no longer followed every packet; 8.7 while the clamp applied only
    /// after its own wake-up (each received packet set its timer a round
    /// trip ahead again), 33 with the clamp at 25 ms.
    /// `scripts/shard-instructions` counts this call's instructions.
    #[test]
    fn an_audio_only_call_wakes_its_sessions_rarely() {
        use crate::metrics::{family_sum, WAKEUP_REASONS};
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Official), Join::ApiAudio);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::ApiAudio);
        for p in [a, b] {
            s.peers[p].audio_frame = Duration::from_millis(120);
        }
        s.run_for(Duration::from_secs(5));
        let text = s.metrics.render();
        let before = family_sum(&text, "balie_timer_wakeups_total", &[]);
        let received = s.peers[a].frames_from(s.peers[b].tag, MediaKind::Audio);
        let secs = 20;
        s.run_for(Duration::from_secs(secs));
        let gained = s.peers[a].frames_from(s.peers[b].tag, MediaKind::Audio) - received;
        // 8.3 frames a second.
        assert!(gained >= 8 * secs, "{gained} audio frames in {secs} s");
        let text = s.metrics.render();
        let wakeups = family_sum(&text, "balie_timer_wakeups_total", &[]) - before;
        let per_session_second = wakeups / 2.0 / secs as f64;
        let by_reason: Vec<String> = WAKEUP_REASONS
            .iter()
            .map(|r| {
                let label = format!("reason=\"{r}\"");
                format!(
                    "{r} {}",
                    family_sum(&text, "balie_timer_wakeups_total", &[&label])
                )
            })
            .collect();
        eprintln!(
            "{per_session_second:.1} timer wake-ups per session and second ({})",
            by_reason.join(", ")
        );
        assert!(
            per_session_second < 2.0,
            "{per_session_second:.1} timer wake-ups per session and second"
        );
    }

    /// What the shard sends a peer still connecting (STUN answers, DTLS
    /// flights) is handed out as urgent, for the driver to send before it
    /// has read its socket empty; nothing of a connected call is.
    #[test]
    fn connecting_peers_are_answered_first() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Official), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Interpreter), Join::Api);
        assert!(s.run_until(Duration::from_secs(5), |s| {
            s.peers[a].frames_from(s.peers[b].tag, MediaKind::Audio) > 0
                && s.peers[b].frames_from(s.peers[a].tag, MediaKind::Audio) > 0
        }));
        let urgent = s.shard_urgent;
        assert!(urgent >= 4, "ICE and DTLS answers to two peers: {urgent}");
        let sent = s.shard_sent;
        s.run_for(Duration::from_secs(3));
        assert!(s.shard_sent > sent + 100, "the call goes on");
        assert_eq!(s.shard_urgent, urgent, "a connected call is not urgent");
    }

    /// A client checks as soon as it has the answer, and the session can
    /// reach the shard after that check: the check is held and answered
    /// then, not dropped for the client to retransmit 250 ms later.
    #[test]
    fn a_check_before_its_session_is_answered_when_the_session_comes() {
        let mut s = sim();
        let late = Duration::from_millis(40);
        s.join_late("r", Sim::claims("r", "a", Role::Official), Join::Api, late);
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(3), |s| {
            s.events
                .iter()
                .any(|e| matches!(e, ShardEvent::SessionConnected { .. }))
        }));
        let took = s.now - t0;
        let m = s.metrics.render();
        assert!(m.contains("balie_early_checks_total{shard=\"0\"} 1"), "{m}");
        assert!(
            m.contains("balie_garbage_datagrams_total{shard=\"0\"} 0"),
            "{m}"
        );
        assert!(
            took < late + Duration::from_millis(150),
            "connected {took:?} after the answer"
        );
    }

    /// A STUN binding request from `username` (its integrity made with a
    /// password no session has).
    fn stun_request(username: &str) -> Vec<u8> {
        use str0m::ice::{StunMessage, TransId};
        let msg = StunMessage::binding_request(username, TransId::new(), true, 1, 1, false);
        let mut buf = vec![0u8; 1500];
        let n = msg
            .to_bytes(Some(b"password"), &mut buf, |_, _| [0; 20])
            .expect("a STUN request fits");
        buf.truncate(n);
        buf
    }

    /// Checks naming no session are held a while and then counted as
    /// garbage; a spray of them holds at most `EARLY_MAX`, and the calls
    /// on the shard go on.
    #[test]
    fn checks_for_no_session_are_held_briefly_then_counted_as_garbage() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Official), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Interpreter), Join::Api);
        s.run_for(Duration::from_secs(2));
        let garbage = |s: &Sim| {
            crate::metrics::family_sum(&s.metrics.render(), "balie_garbage_datagrams_total", &[])
        };
        let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 9, 9)), 7000);
        let check = stun_request("nobody00:peer0000");
        assert!(str0m::ice::StunMessage::parse(&check).is_ok_and(|m| m.is_binding_request()));
        s.from_stranger(stranger, &check);
        assert_eq!(garbage(&s), 0.0, "held, not yet garbage");
        s.run_for(Duration::from_millis(2500));
        assert_eq!(garbage(&s), 1.0, "garbage once its session did not come");
        for i in 0..1000u32 {
            s.from_stranger(stranger, &stun_request(&format!("x{i:07}:peer0000")));
        }
        assert_eq!(garbage(&s), 1.0 + 1000.0 - 256.0, "at most 256 held");
        let before = s.peers[a].frames_from(s.peers[b].tag, MediaKind::Audio);
        s.run_for(Duration::from_secs(3));
        assert_eq!(garbage(&s), 1001.0, "all counted in the end");
        assert!(s.peers[a].frames_from(s.peers[b].tag, MediaKind::Audio) > before + 100);
        assert!(!s
            .metrics
            .render()
            .contains("balie_early_checks_total{shard=\"0\"} 1"));
    }

    #[test]
    fn rooms_are_isolated() {
        let mut s = sim();
        let a = s.join("r1", Sim::claims("r1", "a", Role::Interpreter), Join::Api);
        let b = s.join("r1", Sim::claims("r1", "b", Role::Official), Join::Api);
        let c = s.join("r2", Sim::claims("r2", "c", Role::Interpreter), Join::Api);
        let d = s.join("r2", Sim::claims("r2", "d", Role::Official), Join::Api);
        s.run_for(Duration::from_secs(5));
        let tags: Vec<u32> = s.peers.iter().map(|p| p.tag).collect();
        assert!(s.peers[a].frames_from(tags[b], MediaKind::Video) > 50);
        assert!(s.peers[c].frames_from(tags[d], MediaKind::Video) > 50);
        for (x, y) in [(a, c), (a, d), (b, c), (c, a), (d, b)] {
            assert_eq!(s.peers[x].frames_from(tags[y], MediaKind::Video), 0);
            assert_eq!(s.peers[x].frames_from(tags[y], MediaKind::Audio), 0);
        }
        assert_eq!(s.shard.room_count(), 2);
    }

    #[test]
    fn a_new_subscriber_triggers_a_keyframe_request_to_the_publisher() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        s.run_for(Duration::from_secs(2));
        let before = s.peers[a].keyframe_requests;
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        let ta = s.peers[a].tag;
        assert!(s.run_until(Duration::from_secs(5), |s| {
            s.peers[b].frames_from(ta, MediaKind::Video) > 0
        }));
        assert!(s.peers[a].keyframe_requests > before);
    }

    #[test]
    fn a_simulcast_publisher_is_forwarded_on_the_configured_layer_only() {
        for (layer, want) in [("h", vec!["h"]), ("q", vec!["q"]), ("x", vec!["q"])] {
            let config = ShardConfig {
                simulcast_layer: layer.into(),
                adaptive_layers: false,
                ..ShardConfig::default()
            };
            let mut s = Sim::new(5, config);
            let a = s.join(
                "r",
                Sim::claims("r", "a", Role::Interpreter),
                Join::ApiSimulcast,
            );
            let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
            let ta = s.peers[a].tag;
            s.run_for(Duration::from_secs(5));
            assert!(
                s.peers[b].frames_from(ta, MediaKind::Video) > 100,
                "layer {layer}"
            );
            // A missing layer ("x") falls back to the first the publisher offers.
            assert_eq!(s.peers[b].layers_from(ta), want, "configured {layer}");
            assert_eq!(s.peers[b].corrupt(), 0);
        }
    }

    /// Frames `to` got from `from`, audio and video together.
    fn got(s: &Sim, to: usize, from: usize) -> u64 {
        let tag = s.peers[from].tag;
        s.peers[to].frames_from(tag, MediaKind::Video)
            + s.peers[to].frames_from(tag, MediaKind::Audio)
    }

    #[test]
    fn the_waiting_room_admit_hold_and_remove() {
        let mut s = sim();
        let c = s.join("r", Sim::claims("r", "c", Role::Citizen), Join::Api);
        let o = s.join("r", Sim::claims("r", "o", Role::Official), Join::Api);
        let i = s.join("r", Sim::claims("r", "i", Role::Interpreter), Join::Api);
        s.run_for(Duration::from_secs(3));
        // Nothing flows to or from the waiting citizen; the others talk.
        assert_eq!(
            got(&s, c, o) + got(&s, o, c) + got(&s, i, c) + got(&s, c, i),
            0
        );
        assert!(got(&s, o, i) > 100 && got(&s, i, o) > 100);
        let cid = s.sessions[c].to_string();

        // Only officials may admit: the interpreter and the citizen are refused.
        s.peers[i].send_json(&serde_json::json!({"type": "admit", "id": cid}));
        s.peers[c].send_json(&serde_json::json!({"type": "admit", "id": cid}));
        s.peers[o].send_json(&serde_json::json!({"type": "admit", "id": "0".repeat(32)}));
        s.run_for(Duration::from_secs(1));
        assert_eq!(s.peers[i].messages_of("error")[0]["code"], "not_allowed");
        assert_eq!(s.peers[c].messages_of("error")[0]["code"], "not_allowed");
        assert_eq!(s.peers[o].messages_of("error")[0]["code"], "not_found");
        assert_eq!(got(&s, c, o) + got(&s, o, c), 0);

        // Admitted: media flows both ways within 2 s.
        s.peers[o].send_json(&serde_json::json!({"type": "admit", "id": cid}));
        assert!(s.run_until(Duration::from_secs(2), |s| got(s, c, o) > 0
            && got(s, o, c) > 0
            && got(s, i, c) > 0));
        s.run_for(Duration::from_secs(1));
        let updates = s.peers[c].messages_of("participant-updated");
        assert_eq!(
            updates.last().map(|m| m["participant"]["state"].clone()),
            Some("admitted".into())
        );

        // Held: it stops both ways (after frames in flight).
        s.peers[o].send_json(&serde_json::json!({"type": "hold", "id": cid}));
        s.run_for(Duration::from_millis(500));
        let (to_c, from_c) = (got(&s, c, o), got(&s, o, c));
        s.run_for(Duration::from_secs(2));
        assert_eq!(
            (got(&s, c, o), got(&s, o, c)),
            (to_c, from_c),
            "nothing flows after hold"
        );
        assert_eq!(
            s.peers[o]
                .messages_of("participant-updated")
                .last()
                .map(|m| m["participant"]["state"].clone()),
            Some("waiting".into())
        );

        // A request to unmute reaches the citizen; then the official removes them.
        s.peers[o].send_json(&serde_json::json!({"type": "request-unmute", "id": cid}));
        s.run_for(Duration::from_millis(300));
        assert_eq!(s.peers[c].messages_of("unmute-requested").len(), 1);
        s.peers[o].send_json(&serde_json::json!({"type": "remove", "id": cid}));
        assert!(s.run_until(Duration::from_secs(2), |s| s.events.iter().any(
            |e| matches!(
                e,
                ShardEvent::SessionClosed {
                    reason: LeaveReason::Removed,
                    ..
                }
            )
        )));
        s.run_for(Duration::from_millis(200));
        assert_eq!(s.peers[c].messages_of("bye")[0]["reason"], "removed");
        assert_eq!(s.shard.session_count(), 2);
    }

    #[test]
    fn a_whep_viewer_never_sees_a_waiting_citizen() {
        let mut s = sim();
        let c = s.join("r", Sim::claims("r", "c", Role::Citizen), Join::Api);
        let v = s.join("r", Sim::claims("r", "v", Role::Observer), Join::Whep);
        s.run_for(Duration::from_secs(3));
        assert_eq!(got(&s, v, c), 0);
        // An official who publishes nothing (so the viewer's slots stay free).
        let o = s.join("r", Sim::claims("r", "o", Role::Official), Join::ApiViewer);
        s.run_for(Duration::from_secs(1));
        let cid = s.sessions[c].to_string();
        s.peers[o].send_json(&serde_json::json!({"type": "admit", "id": cid}));
        assert!(s.run_until(Duration::from_secs(3), |s| got(s, v, c) > 0));
    }

    /// A simulcast publisher and a subscriber; runs until the subscriber is
    /// on `f`.
    pub(super) fn simulcast_pair(seed: u64) -> (Sim, usize, u32) {
        simulcast_pair_at(seed, peer::LAYER_BYTES)
    }

    /// [`simulcast_pair`] with the publisher's layers at `layer_bytes` per frame.
    pub(super) fn simulcast_pair_at(seed: u64, layer_bytes: [usize; 3]) -> (Sim, usize, u32) {
        let mut s = Sim::new(seed, ShardConfig::default());
        let p = s.join(
            "r",
            Sim::claims("r", "p", Role::Interpreter),
            Join::ApiSimulcast,
        );
        s.peers[p].layer_bytes = layer_bytes;
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        let tp = s.peers[p].tag;
        let up = s.run_until(Duration::from_secs(30), |s| {
            s.peers[b].current_layer(tp) == Some("f")
        });
        assert!(
            up,
            "reaches f uncapped; on {:?}",
            s.peers[b].current_layer(tp)
        );
        (s, b, tp)
    }

    #[test]
    fn a_finished_layer_switch_asks_for_no_more_keyframes() {
        // On f, with nothing changing, the publisher is asked for nothing: a
        // switch asks again (SWITCH_REASK) only until its keyframe came.
        // (The request of a finished switch was repeated every 350 ms for the
        // whole call, and a browser sent a keyframe on f about 3 times a
        // second for it.)
        let (mut s, b, tp) = simulcast_pair(12);
        s.run_for(Duration::from_secs(2));
        let p = 0;
        let before = s.peers[p].keyframe_requests;
        s.run_for(Duration::from_secs(10));
        assert_eq!(s.peers[b].current_layer(tp), Some("f"));
        assert_eq!(
            s.peers[p].keyframe_requests - before,
            0,
            "keyframe requests in 10 s on one layer"
        );
    }

    #[test]
    fn the_layer_follows_the_subscribers_link() {
        let (mut s, b, tp) = simulcast_pair(11);
        let on = |s: &Sim, layer: &str| s.peers[b].current_layer(tp) == Some(layer);
        let t0 = s.now;
        s.links[b].1.rate = Some(300_000);
        // Within 1 s of the drop the SFU stops forwarding f and waits for a
        // keyframe of q; q flows within 1.5 s. It reacts to the loss the
        // subscriber reports (TWCC) before the delay-based estimate falls.
        let (sb, sp) = (s.sessions[b], s.sessions[0]);
        let mut seen = Vec::new();
        assert!(
            s.run_until(Duration::from_secs(1), |s| {
                let w = s.shard.wanted_layer(sb, sp);
                if seen.last().map(|(_, l)| l) != Some(&w) {
                    seen.push((s.now - t0, w.clone()));
                }
                w.as_deref() == Some("q")
            }),
            "the SFU goes for q within 1 s of the drop: {seen:?}"
        );
        let sfu_decided = s.now - t0;
        assert!(
            s.run_until(Duration::from_millis(500), |s| {
                s.shard.forwarded_layer(sb, sp).as_deref() == Some("q")
            }),
            "the SFU forwards q within 1.5 s of the drop"
        );
        let sfu_down = s.now - t0;
        // The issue asks for the subscriber to have q within 2 s. str0m's
        // receiver (this test's peer) waits for retransmissions of the frames
        // the cap cut (five NACK rounds and three round trips on a link with a
        // 200 ms queue) before it delivers the new layer's keyframe; a browser
        // decodes a complete keyframe at once (docs/benchmarks.md).
        assert!(
            s.run_until(Duration::from_secs(4), |s| on(s, "q")),
            "300 kbit/s: q"
        );
        let down = s.now - t0;
        s.run_for(Duration::from_secs(3));
        assert!(on(&s, "q"), "stays on q");
        // Lifted: q climbs by a probe (the estimator's own climb stops at 1.5
        // times the acked rate, and q is sent without padding), then a step
        // to h and one to f, each after a 2 s hold with padding for it. That
        // is 9.2 s here (11.0 s while the drop itself started a probe and
        // peers made keyframes on every layer for any request); it was 6.5 s
        // while every finished layer switch kept asking for keyframes, which
        // more than doubled the rate of q and let the estimator climb by
        // itself.
        s.links[b].1.rate = None;
        let t1 = s.now;
        let mut lift = Vec::new();
        let ok = s.run_until(Duration::from_secs(12), |s| {
            if s.now.duration_since(t1).as_millis() % 500 == 0 {
                lift.push((
                    s.shard.estimate(s.sessions[b]),
                    s.peers[b].current_layer(tp),
                ));
            }
            on(s, "f")
        });
        assert!(ok, "uncapped: back on f within 12 s; {lift:?}");
        let up = s.now - t1;
        // At 900 kbit/s h (about 560 kbit/s measured) fits with headroom;
        // the loss of the step down from f sends it to q first, and the way
        // back to h waits for str0m to probe again (it only probes while it
        // is not loss-limited), so this allows 30 s. Over 60 s at 900 kbit/s
        // h is forwarded 42-99% of the time (layer_sweep, docs/benchmarks.md).
        s.links[b].1.rate = Some(900_000);
        let mut trace = Vec::new();
        let reached = s.run_until(Duration::from_secs(30), |s| {
            if s.now.duration_since(t1).as_millis() % 500 == 0 {
                trace.push((
                    s.shard.estimate(s.sessions[b]),
                    s.peers[b].current_layer(tp),
                ));
            }
            on(s, "h")
        });
        assert!(reached, "900 kbit/s: h; {trace:?}");
        // Every switch the decoder saw started on a keyframe (frames after a
        // loss that no retransmission repaired are dropped until the next
        // keyframe, as a browser does), and every frame arrived intact.
        let switches = s.peers[b].switches_from(tp);
        assert!(switches.len() >= 3, "{switches:?}");
        assert!(switches.iter().all(|(_, _, key)| *key), "{switches:?}");
        assert_eq!(s.peers[b].corrupt(), 0);
        // The metrics saw it: decisions by direction and layer, switches, estimates.
        let text = s.metrics.render();
        let has = |needle: &str| {
            text.lines()
                .any(|l| l.contains(needle) && !l.starts_with('#') && !l.ends_with(" 0"))
        };
        assert!(has("direction=\"down\"") && has("layer=\"low\""), "{text}");
        assert!(has("balie_layer_switches_total") && has("balie_bwe_estimate_bps_count"));
        // Timer wake-ups by what they were for: a video call paces and estimates.
        assert!(
            has("balie_timer_wakeups_total{reason=\"pacer\"")
                && has("balie_timer_wakeups_total{reason=\"bwe\""),
            "{text}"
        );
        assert!(
            has("cause=\"layer_switch\""),
            "switch keyframe requests counted"
        );
        eprintln!(
            "SFU decided down in {sfu_decided:?}, forwards q after {sfu_down:?}, seen down in {down:?}, up in {up:?}, switches {switches:?}"
        );
    }

    /// Behind a token-bucket shaper (tc's `tbf`, 6 KB burst, as the
    /// browser test on a shaped link uses) a probe passes at its own rate
    /// and the estimate reads 2-4 times the link. The subscriber still
    /// settles on h, the layer the link carries, and stays there: padding
    /// tests the link at the rate of the step it is for, and a fall of the
    /// estimate that the padding caused does not take the current layer
    /// (layers::PAD_GRACE). Before, it went up to f or down to q and back,
    /// on h 8-82% of these 20 s.
    #[test]
    fn the_middle_layer_holds_behind_a_token_bucket() {
        for (seed, cap) in [(1, 1_100_000), (1, 1_250_000), (3, 1_250_000)] {
            let (mut s, b, _) = simulcast_pair(seed);
            s.run_for(Duration::from_millis(seed * 1317));
            let (sb, sp) = (s.sessions[b], s.sessions[0]);
            let layer = |s: &Sim| s.shard.forwarded_layer(sb, sp);
            s.links[b].1.rate = Some(cap);
            s.links[b].1.bucket = 6000;
            // The step down from f passes h on its way to q; h counts from 3 s.
            let t0 = s.now;
            let reached = s.run_until(Duration::from_secs(30), |s| {
                s.now - t0 > Duration::from_secs(3) && layer(s).as_deref() == Some("h")
            });
            assert!(reached, "seed {seed}, {cap} bit/s: h within 30 s");
            let mut seen = Vec::new();
            for _ in 0..200 {
                s.run_for(Duration::from_millis(100));
                seen.push(layer(&s));
            }
            let on_h = seen.iter().filter(|l| l.as_deref() == Some("h")).count();
            assert!(
                on_h >= 180,
                "seed {seed}, {cap} bit/s: on h {on_h} of 200 tenths: {seen:?}"
            );
        }
    }

    #[test]
    fn a_subscriber_that_only_sends_remb_gets_the_layer_its_remb_allows() {
        let mut s = Sim::new(5, ShardConfig::default());
        let p = s.join(
            "r",
            Sim::claims("r", "p", Role::Interpreter),
            Join::ApiSimulcast,
        );
        let b = s.join(
            "r",
            Sim::claims("r", "b", Role::Official),
            Join::ApiRembOnly,
        );
        s.peers[b].remb = Some(5_000_000);
        let tp = s.peers[p].tag;
        let (sb, sp) = (s.sessions[b], s.sessions[0]);
        let on = |s: &Sim, layer: &str| s.peers[b].current_layer(tp) == Some(layer);
        assert!(
            s.run_until(Duration::from_secs(20), |s| on(s, "f")),
            "REMB 5 Mbit/s: f; on {:?}",
            s.peers[b].current_layer(tp)
        );
        assert_eq!(
            s.shard.estimate(sb),
            Some(5_000_000),
            "the REMB is the estimate"
        );
        s.peers[b].remb = Some(300_000);
        assert!(
            s.run_until(Duration::from_secs(2), |s| {
                s.shard.forwarded_layer(sb, sp).as_deref() == Some("q")
            }),
            "REMB 300 kbit/s: q forwarded within 2 s"
        );
        s.peers[b].remb = Some(900_000);
        assert!(
            s.run_until(Duration::from_secs(10), |s| on(s, "h")),
            "REMB 900 kbit/s: h"
        );
        s.run_for(Duration::from_secs(10));
        assert!(on(&s, "h"), "stays on h");
    }

    #[test]
    fn a_publisher_nobody_watches_is_told_to_stop_and_to_resume() {
        let mut s = sim();
        let p = s.join(
            "r",
            Sim::claims("r", "p", Role::Interpreter),
            Join::ApiSimulcast,
        );
        // Alone in the room: nobody shows its video.
        s.run_for(Duration::from_secs(2));
        assert!(s.peers[p].video_paused, "alone: paused");
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        let tp = s.peers[p].tag;
        assert!(s.run_until(Duration::from_secs(3), |s| !s.peers[p].video_paused));
        assert!(s.run_until(Duration::from_secs(3), |s| s.peers[b]
            .frames_from(tp, MediaKind::Video)
            > 10));
        // b hides it: p stops sending.
        let mid = video_mid(&s, b);
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": mid, "width": 0, "height": 0}),
        );
        assert!(s.run_until(Duration::from_secs(1), |s| s.peers[p].video_paused));
        let sent = s.peers[p].video_frames_sent;
        s.run_for(Duration::from_secs(2));
        assert_eq!(
            s.peers[p].video_frames_sent, sent,
            "nothing sent while nobody watches"
        );
        // b shows it again: p resumes and b has video within 1 s.
        let got = s.peers[b].frames_from(tp, MediaKind::Video);
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": mid, "width": 640, "height": 360}),
        );
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(1), |s| s.peers[b]
            .frames_from(tp, MediaKind::Video)
            > got));
        eprintln!("video back {:?} after resume", s.now - t0);
    }

    #[test]
    fn no_flapping_on_a_lossy_jittery_link() {
        let (mut s, b, tp) = simulcast_pair(17);
        s.links[b].1.burst = Some(Burst::new(0.05, 4.0));
        s.links[b].1.jitter = Duration::from_millis(150);
        let before = s.peers[b].switches_from(tp).len();
        let mut layers = Vec::new();
        for _ in 0..60 {
            s.run_for(Duration::from_millis(500));
            layers.push(s.peers[b].current_layer(tp));
        }
        let switches = s.peers[b].switches_from(tp)[before..].to_vec();
        // The bound: at most 3 switches in 30 s. Settling from f to what the
        // lossy link carries takes up to two steps down, plus one change
        // allowed; a choice that flapped with the 2 s hold would switch 10 or
        // more times in 30 s.
        assert!(switches.len() <= 3, "flapping: {switches:?}; {layers:?}");
        assert!(
            switches.iter().all(|(_, _, key)| *key),
            "{switches:?}; {layers:?}"
        );
        // And the picture keeps moving.
        let frames = s.peers[b].frames_from(tp, MediaKind::Video);
        s.run_for(Duration::from_secs(5));
        assert!(
            s.peers[b].frames_from(tp, MediaKind::Video) > frames + 100,
            "video flows"
        );
        eprintln!("switches in 30 s: {} {switches:?}", switches.len());
    }

    /// The mid on which peer `i` receives video (from the server's offers).
    fn video_mid(s: &Sim, i: usize) -> String {
        s.peers[i]
            .messages
            .iter()
            .flat_map(|m| m["tracks"].as_array().cloned().unwrap_or_default())
            .find(|t| t["kind"] == "video")
            .and_then(|t| t["mid"].as_str().map(str::to_string))
            .expect("a video track was announced")
    }

    #[test]
    fn hidden_video_is_not_sent_and_small_video_gets_a_small_layer() {
        let (mut s, b, tp) = simulcast_pair(13);
        let mid = video_mid(&s, b);
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": mid, "width": 0, "height": 0}),
        );
        s.run_for(Duration::from_millis(300));
        let frozen = s.peers[b].frames_from(tp, MediaKind::Video);
        s.run_for(Duration::from_secs(3));
        assert_eq!(
            s.peers[b].frames_from(tp, MediaKind::Video),
            frozen,
            "hidden: nothing"
        );
        assert!(
            s.peers[b].frames_from(tp, MediaKind::Audio) > 0,
            "audio goes on"
        );

        // Shown small (a 320x180 tile): video within 1 s, from a keyframe, on q.
        let switches = s.peers[b].switches_from(tp).len();
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": mid, "width": 320, "height": 180}),
        );
        let t0 = s.now;
        assert!(s.run_until(Duration::from_secs(1), |s| s.peers[b]
            .frames_from(tp, MediaKind::Video)
            > frozen));
        let back = s.now - t0;
        s.run_for(Duration::from_secs(3));
        assert_eq!(s.peers[b].current_layer(tp), Some("q"), "small tile: q");
        assert!(s.peers[b].switches_from(tp)[switches..]
            .iter()
            .all(|(_, _, key)| *key));
        // Larger (640x360): h, never f.
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": mid, "width": 640, "height": 360}),
        );
        assert!(
            s.run_until(Duration::from_secs(8), |s| s.peers[b].current_layer(tp)
                == Some("h"))
        );
        s.run_for(Duration::from_secs(5));
        assert_eq!(
            s.peers[b].current_layer(tp),
            Some("h"),
            "360 lines: h, not f"
        );
        eprintln!("video back {back:?} after being shown again");
        // A size for an m-line that carries no video is refused.
        s.peers[b].send_json(
            &serde_json::json!({"type": "video-size", "track": "nope", "width": 1, "height": 1}),
        );
        s.run_for(Duration::from_millis(200));
        assert_eq!(
            s.peers[b]
                .messages_of("error")
                .last()
                .map(|m| m["code"].clone()),
            Some("not_found".into())
        );
    }

    #[test]
    fn observers_receive_but_never_publish() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Official), Join::Api);
        // An observer whose client sends media anyway.
        let o = s.join("r", Sim::claims("r", "o", Role::Observer), Join::Api);
        let (ta, to) = (s.peers[a].tag, s.peers[o].tag);
        s.run_for(Duration::from_secs(4));
        assert!(s.peers[o].frames_from(ta, MediaKind::Video) > 50);
        assert_eq!(s.peers[a].frames_from(to, MediaKind::Video), 0);
        assert_eq!(s.peers[a].frames_from(to, MediaKind::Audio), 0);
    }

    #[test]
    fn a_lost_peer_is_closed_after_the_reconnect_grace_and_the_room_after_its_own() {
        let config = ShardConfig {
            reconnect_grace: Duration::from_secs(5),
            empty_grace: Duration::from_secs(2),
            ..ShardConfig::default()
        };
        let mut s = Sim::new(3, config);
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        s.run_for(Duration::from_secs(2));
        s.links[b].0.down = true;
        s.links[b].1.down = true;
        let closed = s.run_until(Duration::from_secs(30), |s| {
            s.events.iter().any(|e| {
                matches!(
                    e,
                    ShardEvent::SessionClosed {
                        reason: LeaveReason::Disconnected,
                        ..
                    }
                )
            })
        });
        assert!(closed, "events: {:?}", s.events);
        assert_eq!(s.shard.session_count(), 1);
        assert!(s.run_until(Duration::from_secs(5), |s| !s.peers[a]
            .messages_of("participant-left")
            .is_empty()));
        s.remove(a, LeaveReason::Removed);
        assert_eq!(s.shard.session_count(), 0);
        assert!(s.run_until(Duration::from_secs(3), |s| s.shard.room_count() == 0));
        assert!(s
            .events
            .iter()
            .any(|e| matches!(e, ShardEvent::RoomClosed { .. })));
    }

    #[test]
    fn the_link_model_limits_rate_and_loses_in_bursts() {
        // A peer whose downlink is 200 kbit/s receives at most about that.
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        s.run_for(Duration::from_secs(2));
        s.links[b].1.rate = Some(200_000);
        let ta = s.peers[a].tag;
        let before = s.peers[b].frames_from(ta, MediaKind::Video);
        s.run_for(Duration::from_secs(5));
        let got = s.peers[b].frames_from(ta, MediaKind::Video) - before;
        // The publisher sends about 30 frames/s of ~2.8 kB (~700 kbit/s): at
        // 200 kbit/s well under half of them can arrive.
        assert!(got < 75, "frames through a 200 kbit/s link in 5 s: {got}");

        // Gilbert-Elliott: the long-run loss matches, in bursts.
        let mut rng = StdRng::seed_from_u64(9);
        let model = Burst::new(0.05, 4.0);
        let (mut lost, mut bursts, mut in_burst) = (0u32, 0u32, false);
        for _ in 0..100_000 {
            let flip = if in_burst { model.leave } else { model.enter };
            if rng.random_bool(flip) {
                in_burst = !in_burst;
                if in_burst {
                    bursts += 1;
                }
            }
            lost += in_burst as u32;
        }
        let rate = lost as f64 / 100_000.0;
        let mean = lost as f64 / bursts as f64;
        assert!((0.04..0.06).contains(&rate), "loss rate {rate}");
        assert!((3.0..5.0).contains(&mean), "mean burst {mean}");
    }

    #[test]
    fn media_survives_five_percent_loss() {
        let mut s = sim();
        let a = s.join("r", Sim::claims("r", "a", Role::Interpreter), Join::Api);
        let b = s.join("r", Sim::claims("r", "b", Role::Official), Join::Api);
        s.run_for(Duration::from_secs(1));
        s.links[a].0.loss = 0.05;
        s.links[b].1.loss = 0.05;
        let ta = s.peers[a].tag;
        s.run_for(Duration::from_secs(10));
        // NACK/RTX repairs most losses: well over 80% of 300 frames arrive intact.
        let got = s.peers[b].frames_from(ta, MediaKind::Video);
        assert!(got > 280, "video frames through 5% loss each way: {got}");
        assert_eq!(s.peers[b].corrupt(), 0);
    }

    /// Chromium's layer rates with its fake camera: about 150, 360 and
    /// 720 kbit/s (the browser test on a shaped link measures them).
    pub(super) const CHROMIUM_LAYERS: [usize; 3] = [625, 1500, 3000];

    /// One round of [`cap_and_lift`].
    pub(super) struct Round {
        /// From the cap to q.
        pub down: Duration,
        /// From the lift to f; `None`: not within 30 s.
        pub up: Option<Duration>,
        /// The estimate (kbit/s) and layer once a second of a way back that
        /// did not reach f.
        pub trace: Vec<(Option<u64>, Option<String>)>,
    }

    /// Rounds of the browser test on a shaped link (tests/e2e/shaped.test.mjs)
    /// from a subscriber on f at Chromium's layer rates: 6 s on f, a
    /// 300 kbit/s token-bucket cap until q (at most 10 s) and 5 s more, then
    /// the cap lifted until f (at most 30 s). Stops at a round that did not
    /// get back to f.
    pub(super) fn cap_and_lift(seed: u64, rounds: usize) -> Vec<Round> {
        let (mut s, b, _tp) = simulcast_pair_at(seed, CHROMIUM_LAYERS);
        s.run_for(Duration::from_millis(seed * 1317));
        let (sb, sp) = (s.sessions[b], s.sessions[0]);
        let layer = |s: &Sim| s.shard.forwarded_layer(sb, sp);
        let mut out = Vec::new();
        for _ in 0..rounds {
            s.run_for(Duration::from_secs(6));
            s.links[b].1.rate = Some(300_000);
            s.links[b].1.bucket = 6000;
            let t0 = s.now;
            s.run_until(Duration::from_secs(10), |s| {
                layer(s).as_deref() == Some("q")
            });
            let down = s.now - t0;
            s.run_for(Duration::from_secs(5));
            s.links[b].1.rate = None;
            let t1 = s.now;
            let mut trace = Vec::new();
            let up = s
                .run_until(Duration::from_secs(30), |s| {
                    if s.now.duration_since(t1).as_millis() % 1000 == 0 {
                        trace.push((s.shard.estimate(sb).map(|e| e / 1000), layer(s)));
                    }
                    layer(s).as_deref() == Some("f")
                })
                .then(|| s.now - t1);
            if up.is_some() {
                trace.clear();
            }
            out.push(Round { down, up, trace });
            if up.is_none() {
                break;
            }
        }
        out
    }

    /// After a cap is lifted the subscriber gets back to f even where
    /// str0m's loss-based estimator holds the estimate still with no loss
    /// (layers::ESTIMATE_STUCK). These three moments are the ones of 40
    /// whose way back sat on h for 30 s without the restart for a stuck
    /// estimate (seeds 17 and 36 in their third round, 23 in its second).
    #[test]
    fn the_way_back_to_f_survives_an_estimate_that_sticks() {
        for seed in [17, 23, 36] {
            let rounds = cap_and_lift(seed, 3);
            for (i, Round { down, up, trace }) in rounds.iter().enumerate() {
                assert!(
                    *down <= Duration::from_secs(2),
                    "seed {seed} round {i}: q after {down:?}"
                );
                assert!(
                    up.is_some_and(|t| t <= Duration::from_secs(20)),
                    "seed {seed} round {i}: f after {up:?}; estimate and layer each second: {trace:?}"
                );
            }
            assert_eq!(rounds.len(), 3);
        }
    }
}
/// A sweep for docs/benchmarks.md, not a check: the 300 kbit/s cap, its
/// lifting and a 900 kbit/s cap at six moments of the call (the simulator is
/// deterministic, so the moment is what varies). Run with
/// `cargo test --release -p balie-sfu --lib layer_sweep -- --ignored --nocapture`.
#[cfg(test)]
mod sweep {
    use super::*;

    /// [`tests::cap_and_lift`] at 40 moments, for docs/benchmarks.md. Run with
    /// `cargo test --release -p balie-sfu --lib cap_and_lift_sweep -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement for docs/benchmarks.md; takes about 10 s"]
    fn cap_and_lift_sweep() {
        let mut ups = Vec::new();
        let mut stuck = 0;
        for seed in 1..41u64 {
            for (i, r) in tests::cap_and_lift(seed, 3).into_iter().enumerate() {
                eprintln!(
                    "seed {seed} round {i}: q after {:?}, f after {:?}",
                    r.down, r.up
                );
                match r.up {
                    Some(t) => ups.push(t),
                    None => {
                        stuck += 1;
                        eprintln!("  estimate and layer each second: {:?}", r.trace);
                    }
                }
            }
        }
        ups.sort();
        let at = |q: f64| ups[((ups.len() - 1) as f64 * q) as usize];
        eprintln!(
            "{} rounds reached f: p50 {:?}, p90 {:?}, max {:?}; {stuck} never did in 30 s",
            ups.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }

    #[test]
    #[ignore = "a measurement for docs/benchmarks.md; takes about 20 s"]
    fn layer_sweep() {
        for k in 1..7u64 {
            let (mut s, b, _tp) = tests::simulcast_pair(k);
            s.run_for(Duration::from_millis(k * 1317));
            let (sb, sp) = (s.sessions[b], s.sessions[0]);
            let layer = |s: &Sim| s.shard.forwarded_layer(sb, sp);
            let t0 = s.now;
            s.links[b].1.rate = Some(300_000);
            s.run_until(Duration::from_secs(5), |s| layer(s).as_deref() == Some("q"));
            let down = s.now - t0;
            s.run_for(Duration::from_secs(3));
            s.links[b].1.rate = None;
            let t1 = s.now;
            let up = s
                .run_until(Duration::from_secs(20), |s| {
                    layer(s).as_deref() == Some("f")
                })
                .then(|| s.now - t1);
            s.links[b].1.rate = Some(900_000);
            let mut time_on = std::collections::BTreeMap::new();
            for _ in 0..600 {
                s.run_for(Duration::from_millis(100));
                *time_on.entry(layer(&s)).or_insert(0u32) += 1;
            }
            eprintln!(
                "moment {k}: forwards q {down:?} after the 300 kbit/s cap; f {up:?} after lifting; \
                 60 s at 900 kbit/s in tenths of a second per layer {time_on:?}"
            );
        }
    }
}
