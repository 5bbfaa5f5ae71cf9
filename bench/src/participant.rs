//! One synthetic participant: a str0m client on its own UDP socket that
//! publishes the encoded clip in real time and receives the others.
//!
//! It speaks balie's in-call protocol on the data channel `balie`: it answers
//! the server's offers, obeys `send-video`, and, as an official, admits
//! waiting citizens as a real official would.

use std::collections::HashMap;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::impair::Impair;
use crate::media::{Clip, FPS};
use crate::scenario::{self, Media, Role};

/// A frame gap longer than this is a freeze.
pub const FREEZE: Duration = Duration::from_millis(500);

/// When each publisher (by the id the server gave it) started its clip: a
/// receiver knows from a frame's bytes which frame of the clip it is, and so
/// when it was sent. All participants share this process's clock.
pub type Clocks = Arc<Mutex<HashMap<String, Instant>>>;

/// What one participant measured.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Which call of the run.
    pub call: usize,
    /// Which participant of the call (a participant may have more than
    /// one connection: Janus' publisher and subscriber).
    pub member: usize,
    /// Offer sent to ICE and DTLS connected.
    pub join: Option<Duration>,
    /// Offer sent to the server's answer received (signalling alone).
    pub answer: Option<Duration>,
    /// Offer sent to ICE connected (a pair checked both ways; DTLS follows).
    pub ice: Option<Duration>,
    /// Offer sent to the first video frame received.
    pub first_frame: Option<Duration>,
    pub frames_received: u64,
    pub audio_packets_received: u64,
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub audio_packets_sent: u64,
    /// Media payload bytes written (Opus packets, VP8 frames, every layer).
    pub bytes_sent: u64,
    /// Audio interarrival jitter (RFC 3550, 6.4.1, from the RTP timestamps
    /// and arrival times of the Opus packets received), summed over the
    /// packets it was updated on, in seconds, and how many: the mean is
    /// the participant's jitter.
    pub jitter_sum: f64,
    pub jitter_n: u64,
    /// Changes of the resolution of a received video track (the size in a
    /// VP8 keyframe differs from the one before): the simulcast layer
    /// switches this participant saw.
    pub layer_switches: u64,
    /// Video keyframes received, by their height in lines (the VP8 frame
    /// header): which layers reached this participant.
    pub keyframes_by_height: std::collections::BTreeMap<u16, u64>,
    /// Media sends (audio packets, video frames) that left over
    /// [`LATE_SEND`] behind their schedule: the generator fell behind.
    pub late_sends: u64,
    /// The most any media send was behind its schedule.
    pub max_send_lag: Duration,
    /// Gaps over [`FREEZE`] between video frames of one track, and at the
    /// end of the run since a track's last frame (a track that stopped
    /// for good is one freeze, as long as it lasted).
    pub freezes: u64,
    /// The time those gaps lasted, in all.
    pub frozen: Duration,
    /// End-to-end video frame latency, milliseconds.
    pub latencies_ms: Vec<f32>,
    /// Packets lost and expected: video from str0m's receiver statistics
    /// (each second: the packets received and the fraction lost, on the
    /// server-to-receiver leg), audio end to end from the gaps in its RTP
    /// timestamps (`audio_gap`).
    pub lost: u64,
    pub expected: u64,
    /// UDP datagrams that came from the server (before downlink
    /// impairments).
    pub datagrams_received: u64,
    /// Media RTP packets received: datagrams carrying a media codec's
    /// payload type (VP8, Opus), without padding; retransmissions and
    /// probes (RTX), padding and RTCP are not counted.
    pub media_packets_received: u64,
}

/// When two connections both reached a point (the later one), or `None`.
fn both_done(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    Some(a?.max(b?))
}

/// A media send later than this behind its schedule counts as late
/// ([`Stats::late_sends`]).
pub const LATE_SEND: Duration = Duration::from_millis(20);

impl Stats {
    /// A gap between video frames of one track: a freeze over [`FREEZE`].
    fn gap(&mut self, gap: Duration) {
        if gap > FREEZE {
            self.freezes += 1;
            self.frozen += gap;
        }
    }

    fn send_lag(&mut self, lag: Duration) {
        if lag > LATE_SEND {
            self.late_sends += 1;
        }
        self.max_send_lag = self.max_send_lag.max(lag);
    }

    /// One participant's connections as one: joined when the last one
    /// connected (all count from the participant's start), first frame on
    /// the first one's; the rest adds up.
    pub fn merge(&mut self, o: Stats) {
        self.join = both_done(self.join, o.join);
        self.answer = self.answer.or(o.answer);
        self.ice = both_done(self.ice, o.ice);
        self.first_frame = match (self.first_frame, o.first_frame) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.frames_received += o.frames_received;
        self.audio_packets_received += o.audio_packets_received;
        self.bytes_received += o.bytes_received;
        self.frames_sent += o.frames_sent;
        self.audio_packets_sent += o.audio_packets_sent;
        self.bytes_sent += o.bytes_sent;
        self.jitter_sum += o.jitter_sum;
        self.jitter_n += o.jitter_n;
        self.layer_switches += o.layer_switches;
        for (h, n) in o.keyframes_by_height {
            *self.keyframes_by_height.entry(h).or_default() += n;
        }
        self.late_sends += o.late_sends;
        self.max_send_lag = self.max_send_lag.max(o.max_send_lag);
        self.freezes += o.freezes;
        self.frozen += o.frozen;
        self.latencies_ms.extend(o.latencies_ms);
        self.lost += o.lost;
        self.expected += o.expected;
        self.datagrams_received += o.datagrams_received;
        self.media_packets_received += o.media_packets_received;
    }
}

/// Who a new connection is for, and what it is made with.
pub struct Seat<'a> {
    pub spec: &'a scenario::Participant,
    pub clip: Arc<Clip>,
    pub index: ClipIndex,
    pub clocks: Clocks,
    /// Drives its link impairments.
    pub seed: u64,
    /// Where its socket binds (port 0: any).
    pub bind: SocketAddr,
    pub call: usize,
    pub member: usize,
}

/// What the server expects of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// balie: the `balie` data channel carries the in-call protocol.
    Balie,
    /// Janus' VideoRoom: no data channel; simulcast layers listed from the
    /// highest down, the order Janus takes them in (its subscribers then get
    /// the top layer by default).
    Janus,
}

/// The payload types that carry media (not RTX, RED, FEC or comfort
/// noise), as the SDPs of a connection name them.
#[derive(Debug, Clone)]
pub struct MediaPts([bool; 128]);

impl Default for MediaPts {
    fn default() -> Self {
        MediaPts([false; 128])
    }
}

impl MediaPts {
    /// Note the media payload types of `sdp` (`a=rtpmap:PT VP8/90000`).
    pub fn note(&mut self, sdp: &str) {
        for line in sdp.lines() {
            let Some(rest) = line.trim().strip_prefix("a=rtpmap:") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let (Some(pt), Some(codec)) = (parts.next(), parts.next()) else {
                continue;
            };
            let name = codec.split('/').next().unwrap_or("").to_ascii_lowercase();
            if matches!(name.as_str(), "vp8" | "vp9" | "h264" | "av1" | "opus") {
                if let Some(slot) = pt.parse::<usize>().ok().and_then(|i| self.0.get_mut(i)) {
                    *slot = true;
                }
            }
        }
    }

    /// Whether `datagram` is an SRTP packet of a media payload type without
    /// padding (the RTP header is not encrypted).
    pub fn is_media(&self, datagram: &[u8]) -> bool {
        let [b0, b1, ..] = datagram else { return false };
        // RTP version 2; RTCP's packet types 200-207 read as 72-79 here.
        let pt = usize::from(b1 & 0x7f);
        (128..192).contains(b0) && b0 & 0x20 == 0 && !(72..80).contains(&pt) && self.0[pt]
    }
}

/// Received video on one m-line.
#[derive(Debug, Default)]
struct Track {
    publisher: Option<String>,
    /// When that publisher started its clip, once it is known.
    started: Option<Instant>,
    last_frame: Option<Instant>,
    /// Audio: the RTP timestamp (48 kHz) the next packet should carry.
    next_audio: Option<u64>,
    /// Audio: the last packet's arrival and RTP timestamp (48 kHz), and the
    /// jitter estimate (seconds).
    jitter: Option<(Instant, u64, f64)>,
    /// Video: the size in the last keyframe.
    size: Option<(u16, u16)>,
}

/// RFC 3550's interarrival jitter `j` (seconds) after a packet with RTP
/// timestamp `ts` (48 kHz) arrived at `at`, the one before at `last`
/// with `last_ts`.
fn next_jitter(j: f64, last: Instant, last_ts: u64, at: Instant, ts: u64) -> f64 {
    let arrival = if at >= last {
        (at - last).as_secs_f64()
    } else {
        -(last - at).as_secs_f64()
    };
    let d = arrival - (ts as f64 - last_ts as f64) / 48_000.0;
    j + (d.abs() - j) / 16.0
}

/// Width and height of a VP8 keyframe (RFC 6386, 9.1), `None` for any
/// other frame.
fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((w, h))
}

/// The duration of an Opus packet in 48 kHz samples, from its TOC byte and,
/// for code 3, its frame count (RFC 6716, 3.1); `None` when it cannot be an
/// Opus packet.
fn opus_samples(packet: &[u8]) -> Option<u64> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // 2.5, 5, 10, 20, 40 and 60 ms at 48 kHz.
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u64::from(*packet.get(1)? & 0x3f),
    };
    (frames > 0).then_some(frame * frames)
}

/// Audio packets a receiver should have had up to one that arrived at RTP
/// timestamp `ts` lasting `samples`, from the one before (`next`: where it
/// ended): `(expected, lost)` to add, or `None` for a packet that came after
/// a later one (it was counted lost, and is not). Every audio packet a
/// publisher sends is forwarded with its timestamp, so a gap is a packet lost
/// on either leg; balie re-sequences what it forwards, so the RTP loss a
/// receiver sees covers only the server's leg.
fn audio_gap(next: &mut Option<u64>, ts: u64, samples: u64) -> Option<(u64, u64)> {
    let samples = samples.max(1);
    let counted = match *next {
        None => (1, 0),
        Some(n) if ts >= n => {
            let missing = ((ts - n) + samples / 2) / samples;
            (missing + 1, missing)
        }
        Some(_) => return None,
    };
    *next = Some(ts + samples);
    Some(counted)
}

pub struct Participant {
    pub role: Role,
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    clip: Arc<Clip>,
    /// Frame bytes (hashed) to their index in the clip.
    index: ClipIndex,
    clocks: Clocks,
    /// Whether our clip's start is in `clocks`.
    clock_shared: bool,
    media: Media,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    channel: Option<ChannelId>,
    pending: Option<SdpPendingOffer>,
    /// The id the server gave us (from `welcome`).
    pub id: Option<String>,
    started: Option<Instant>,
    offer_at: Instant,
    next_video: Instant,
    next_audio: Instant,
    frame_no: usize,
    audio_no: usize,
    key_wanted: Vec<bool>,
    video_paused: bool,
    tracks: HashMap<Mid, Track>,
    /// Packets received per incoming stream, as of str0m's last report.
    ingress: HashMap<(Mid, Option<Rid>), u64>,
    pub stats: Stats,
    pub closed: bool,
    buf: Vec<u8>,
    /// Payload types of media codecs, from the SDPs seen.
    media_pts: MediaPts,
    /// Impairments of the uplink (what it sends) and the downlink.
    up: Impair,
    down: Impair,
}

/// Every publisher's frames (hashed) to their index in the clip, over all
/// the clips of a run (a receiver may get video of another profile than it
/// sends, or send none), and the clip's length in frames.
#[derive(Debug, Default)]
pub struct FrameIndex {
    by_hash: HashMap<u64, usize>,
    frames: usize,
}

pub type ClipIndex = Arc<FrameIndex>;

/// A stable hash of a frame's bytes.
pub fn frame_hash(data: &[u8]) -> u64 {
    // FNV-1a: fast, and frames differ early (the VP8 header carries sizes
    // and the first partition differs from frame to frame).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.iter().take(256) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ data.len() as u64
}

impl FrameIndex {
    /// Add every frame of `clip` (and its keyframe versions).
    pub fn add(&mut self, clip: &Clip) {
        for layer in &clip.layers {
            self.frames = self.frames.max(layer.frames.len());
            for (i, f) in layer.frames.iter().enumerate() {
                self.by_hash.insert(frame_hash(&f.data), i);
            }
            for (i, k) in layer.keyframes.iter().enumerate() {
                self.by_hash.insert(frame_hash(k), i);
            }
        }
    }
}

impl Participant {
    /// A participant as its seat describes it; `dialect` shapes the offer
    /// for the server. Returns it and its offer.
    pub fn new(
        seat: Seat,
        dialect: Dialect,
        now: Instant,
    ) -> std::io::Result<(Participant, String)> {
        let mut p = Participant::blank(seat, now)?;
        let clip = p.clip.clone();
        let mut api = p.rtc.sdp_api();
        if p.media.publishes() {
            p.audio_mid =
                Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
            if !clip.layers.is_empty() {
                let simulcast = (clip.layers.len() > 1).then(|| {
                    let mut s = Simulcast::new();
                    let mut layers: Vec<_> = clip.layers.iter().collect();
                    if dialect == Dialect::Janus {
                        layers.reverse();
                    }
                    for l in layers {
                        s.add_send_layer(SimulcastLayer::new(l.rid));
                    }
                    s
                });
                p.video_mid = Some(api.add_media(
                    MediaKind::Video,
                    Direction::SendOnly,
                    None,
                    None,
                    simulcast,
                ));
            }
        }
        if dialect == Dialect::Balie {
            api.add_channel("balie".into());
        }
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| std::io::Error::other("str0m made no offer"))?;
        p.pending = Some(pending);
        let offer = offer.to_sdp_string();
        p.media_pts.note(&offer);
        Ok((p, offer))
    }

    /// A receiving connection that answers the server's `offer` (Janus'
    /// subscriber connection), whose `tracks` say which publisher each mid
    /// carries; its join and first frame count from `joined_at`. Returns it
    /// and its answer.
    pub fn answering(
        seat: Seat,
        joined_at: Instant,
        offer: &str,
        tracks: &Value,
    ) -> Result<(Participant, String), String> {
        let now = Instant::now();
        let mut p =
            Participant::blank(seat, now).map_err(|e| format!("a participant's socket: {e}"))?;
        // It sends nothing of its own.
        p.media = Media::None;
        p.offer_at = joined_at;
        p.media_pts.note(offer);
        let offer = SdpOffer::from_sdp_string(offer).map_err(|e| format!("offer: {e}"))?;
        let answer = p
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| format!("offer: {e}"))?;
        p.map_tracks(tracks);
        Ok((p, answer.to_sdp_string()))
    }

    /// Socket, str0m instance and counters; no media lines yet.
    fn blank(seat: Seat, now: Instant) -> std::io::Result<Participant> {
        let Seat {
            spec,
            clip,
            index,
            clocks,
            seed,
            bind,
            call,
            member,
        } = seat;
        let socket = UdpSocket::bind(bind)?;
        let local = socket.local_addr()?;
        let mut rtc = RtcConfig::new()
            .set_crypto_provider(balie_dtls::provider())
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .set_stats_interval(Some(Duration::from_secs(1)))
            .build(now);
        if let Ok(c) = Candidate::host(local, "udp") {
            rtc.add_local_candidate(c);
        }
        let layers = clip.layers.len();
        Ok(Participant {
            role: spec.role,
            rtc,
            socket,
            local,
            clip,
            index,
            clocks,
            clock_shared: false,
            media: spec.media,
            audio_mid: None,
            video_mid: None,
            channel: None,
            pending: None,
            id: None,
            started: None,
            offer_at: now,
            next_video: now,
            next_audio: now,
            frame_no: 0,
            audio_no: 0,
            key_wanted: vec![false; layers],
            video_paused: false,
            tracks: HashMap::new(),
            ingress: HashMap::new(),
            stats: Stats {
                call,
                member,
                ..Stats::default()
            },
            closed: false,
            buf: vec![0; 2000],
            media_pts: MediaPts::default(),
            up: Impair::new(&spec.link, seed),
            down: Impair::new(&spec.link, seed ^ 0x5555),
        })
    }

    /// Have `registry` wake the worker when a datagram arrives.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> std::io::Result<()> {
        registry.register(&mut self.socket, token, mio::Interest::READABLE)
    }

    /// Apply the server's answer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), String> {
        self.stats.answer = Some(self.offer_at.elapsed());
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| format!("answer: {e}"))?;
        let pending = self.pending.take().ok_or("no offer pending")?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| format!("answer: {e}"))
    }

    /// Receive what arrived, send what is due; returns when to come back.
    pub fn drive(&mut self, now: Instant) -> Instant {
        if self.closed {
            return now + Duration::from_secs(1);
        }
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) if self.down.is_none() => {
                    self.count(n);
                    let data = std::mem::take(&mut self.buf);
                    self.input(now, source, &data[..n]);
                    self.buf = data;
                }
                Ok((n, source)) => {
                    self.count(n);
                    self.down.push(now, source, self.buf[..n].to_vec());
                }
                Err(_) => break,
            }
        }
        while let Some((source, data)) = self.down.pop(now) {
            self.input(now, source, &data);
        }
        if self.closed {
            return now;
        }
        let _ = self.rtc.handle_input(Input::Timeout(now));
        if self.rtc.is_connected() {
            self.send_media(now);
        }
        let mut next = self.poll(now);
        while let Some((to, data)) = self.up.pop(now) {
            let _ = self.socket.send_to(&data, to);
        }
        for due in [self.up.next_due(), self.down.next_due()]
            .into_iter()
            .flatten()
        {
            next = next.min(due);
        }
        let media = if self.media.publishes() {
            self.next_audio.min(if self.video_mid.is_some() {
                self.next_video
            } else {
                self.next_audio
            })
        } else {
            next
        };
        next.min(media)
    }

    /// Count a datagram of `n` bytes that arrived in `buf`.
    fn count(&mut self, n: usize) {
        self.stats.datagrams_received += 1;
        if self.media_pts.is_media(&self.buf[..n]) {
            self.stats.media_packets_received += 1;
        }
    }

    /// A datagram from the network (after the downlink's impairments).
    fn input(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        let Ok(contents) = data.try_into() else {
            return;
        };
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination: self.local,
                contents,
            },
        );
        if self.rtc.handle_input(input).is_err() {
            self.closed = true;
            return;
        }
        // Events of this datagram are handled at once.
        self.poll(now);
    }

    fn poll(&mut self, now: Instant) -> Instant {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return t,
                Ok(Output::Transmit(t)) if self.up.is_none() => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Transmit(t)) => self.up.push(now, t.destination, t.contents.to_vec()),
                Ok(Output::Event(e)) => self.on_event(now, e),
                Err(_) => {
                    self.closed = true;
                    return now + Duration::from_secs(1);
                }
            }
        }
    }

    fn send_json(&mut self, v: &Value) {
        if let Some(id) = self.channel {
            if let Some(mut ch) = self.rtc.channel(id) {
                let _ = ch.write(false, v.to_string().as_bytes());
            }
        }
    }

    fn on_event(&mut self, now: Instant, e: Event) {
        match e {
            Event::Connected => {
                self.stats.join = Some(now - self.offer_at);
                self.started = Some(now);
                self.next_audio = now;
                self.next_video = now;
            }
            Event::IceConnectionStateChange(
                IceConnectionState::Connected | IceConnectionState::Completed,
            ) => {
                self.stats.ice = self.stats.ice.or(Some(now - self.offer_at));
            }
            Event::ChannelOpen(id, label) if label == "balie" => self.channel = Some(id),
            Event::ChannelData(d) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&d.data) {
                    self.on_message(&v);
                }
            }
            Event::KeyframeRequest(r) => {
                let i = r
                    .rid
                    .and_then(|rid| {
                        self.clip
                            .layers
                            .iter()
                            .position(|l| Rid::from(l.rid) == rid)
                    })
                    .unwrap_or(0);
                if let Some(k) = self.key_wanted.get_mut(i) {
                    *k = true;
                }
            }
            Event::MediaData(d) => {
                let kind = self.rtc.media(d.mid).map(|m| m.kind());
                if kind == Some(MediaKind::Audio) {
                    self.stats.audio_packets_received += 1;
                    self.stats.bytes_received += d.data.len() as u64;
                    let ts = d.time.rebase(Frequency::FORTY_EIGHT_KHZ).numer();
                    let samples = opus_samples(&d.data).unwrap_or(960);
                    let track = self.tracks.entry(d.mid).or_default();
                    // Jitter over packets in order only (a late one is a
                    // gap and then a loss undone, below).
                    match track.jitter {
                        Some((last, last_ts, j)) if ts > last_ts => {
                            let j = next_jitter(j, last, last_ts, d.network_time, ts);
                            track.jitter = Some((d.network_time, ts, j));
                            self.stats.jitter_sum += j;
                            self.stats.jitter_n += 1;
                        }
                        Some(_) => {}
                        None => track.jitter = Some((d.network_time, ts, 0.0)),
                    }
                    match audio_gap(&mut track.next_audio, ts, samples) {
                        Some((expected, lost)) => {
                            self.stats.expected += expected;
                            self.stats.lost += lost;
                        }
                        None => self.stats.lost = self.stats.lost.saturating_sub(1),
                    }
                    return;
                }
                self.stats.frames_received += 1;
                self.stats.bytes_received += d.data.len() as u64;
                if self.stats.first_frame.is_none() {
                    self.stats.first_frame = Some(now - self.offer_at);
                }
                let track = self.tracks.entry(d.mid).or_default();
                if let Some(size) = vp8_keyframe_size(&d.data) {
                    if track.size.is_some_and(|s| s != size) {
                        self.stats.layer_switches += 1;
                    }
                    *self.stats.keyframes_by_height.entry(size.1).or_default() += 1;
                    track.size = Some(size);
                }
                if let Some(last) = track.last_frame {
                    self.stats.gap(now.saturating_duration_since(last));
                }
                track.last_frame = Some(now);
                // Which frame of the clip, sent when?
                if track.started.is_none() {
                    track.started = track
                        .publisher
                        .as_ref()
                        .and_then(|p| self.clocks.lock().ok().and_then(|c| c.get(p).copied()));
                }
                let started = track.started;
                let found = self.index.by_hash.get(&frame_hash(&d.data));
                if let (Some(start), Some(&i)) = (started, found) {
                    // The clock now, not the worker's `now`: that was read
                    // when the worker woke, before it drove the participants
                    // ahead of this one, and the publisher on another
                    // thread may have sent this frame since. A frame seen
                    // to arrive before it was sent counted as sent a whole
                    // clip earlier: 1-5% of frames at about 4 s (p99 3,998
                    // ms at 100 simulcast calls).
                    let now = Instant::now();
                    let period = Duration::from_secs_f64(self.index.frames as f64 / f64::from(FPS));
                    let offset = Duration::from_secs_f64(i as f64 / f64::from(FPS));
                    let elapsed = now.saturating_duration_since(start);
                    // The latest loop in which frame i was sent before now.
                    let loops =
                        (elapsed.saturating_sub(offset)).as_secs_f64() / period.as_secs_f64();
                    let sent = start + offset + period.mul_f64(loops.floor());
                    self.stats
                        .latencies_ms
                        .push(now.saturating_duration_since(sent).as_secs_f32() * 1000.0);
                }
            }
            Event::MediaIngressStats(s)
                if self.rtc.media(s.mid).map(|m| m.kind()) != Some(MediaKind::Audio) =>
            {
                // Video: packets since the last report, and str0m's loss
                // fraction over that period: the packets that did not come
                // (on the server's leg; audio counts its gaps end to end).
                let last = self.ingress.insert((s.mid, s.rid), s.packets).unwrap_or(0);
                let got = s.packets.saturating_sub(last);
                let loss = f64::from(s.loss.unwrap_or(0.0)).clamp(0.0, 0.99);
                let lost = (got as f64 * loss / (1.0 - loss)).round() as u64;
                self.stats.lost += lost;
                self.stats.expected += got + lost;
            }
            Event::Closed => self.closed = true,
            _ => {}
        }
    }

    fn on_message(&mut self, v: &Value) {
        match v["type"].as_str() {
            Some("welcome") => {
                self.id = v["you"]["id"].as_str().map(String::from);
                self.admit_all(&v["participants"]);
            }
            Some("participant-joined") | Some("participant-updated") => {
                self.admit_all(&Value::Array(vec![v["participant"].clone()]));
            }
            Some("offer") => {
                self.map_tracks(&v["tracks"]);
                let sdp = v["sdp"].as_str().unwrap_or("");
                self.media_pts.note(sdp);
                if let Ok(offer) = SdpOffer::from_sdp_string(sdp) {
                    if let Ok(answer) = self.rtc.sdp_api().accept_offer(offer) {
                        let msg =
                            serde_json::json!({"type": "answer", "sdp": answer.to_sdp_string()});
                        self.send_json(&msg);
                    }
                }
            }
            Some("tracks") => self.map_tracks(&v["tracks"]),
            Some("send-video") => {
                let send = v["send"] == true;
                if send && self.video_paused {
                    self.key_wanted.iter_mut().for_each(|k| *k = true);
                }
                self.video_paused = !send;
            }
            Some("bye") => self.closed = true,
            _ => {}
        }
    }

    /// Officials admit everyone waiting, as the counter's official would.
    fn admit_all(&mut self, participants: &Value) {
        if self.role != Role::Official {
            return;
        }
        let waiting: Vec<String> = participants
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "waiting")
            .filter_map(|p| p["id"].as_str().map(String::from))
            .collect();
        for id in waiting {
            self.send_json(&serde_json::json!({"type": "admit", "id": id}));
        }
    }

    /// Which publisher each mid carries (`[{mid, participant}]`).
    pub fn map_tracks(&mut self, tracks: &Value) {
        for t in tracks.as_array().into_iter().flatten() {
            let (Some(mid), Some(p)) = (t["mid"].as_str(), t["participant"].as_str()) else {
                continue;
            };
            self.tracks.entry(Mid::from(mid)).or_default().publisher = Some(p.to_string());
        }
    }

    fn send_media(&mut self, now: Instant) {
        if !self.clock_shared {
            if let (Some(id), Some(start)) = (&self.id, self.started) {
                if let Ok(mut c) = self.clocks.lock() {
                    c.insert(id.clone(), start);
                    self.clock_shared = true;
                }
            }
        }
        let Some(start) = self.started else { return };
        // How late each send is, by the clock (`now` is when the worker woke).
        let wall = Instant::now();
        if let Some(mid) = self.audio_mid {
            let step = self.clip.audio_frame;
            while self.next_audio <= now && !self.clip.audio.is_empty() {
                self.stats
                    .send_lag(wall.saturating_duration_since(self.next_audio));
                let i = self.audio_no % self.clip.audio.len();
                let samples = (48_000u128 * step.as_micros() / 1_000_000) as u64;
                let rtp =
                    MediaTime::new(self.audio_no as u64 * samples, Frequency::FORTY_EIGHT_KHZ);
                let data = self.clip.audio[i].clone();
                self.write(mid, None, Codec::Opus, now, rtp, data);
                self.stats.audio_packets_sent += 1;
                self.audio_no += 1;
                self.next_audio += step;
            }
        }
        let Some(mid) = self.video_mid else { return };
        let period = Duration::from_secs(1) / FPS;
        if self.video_paused {
            // Keep the clock: frames not sent are skipped, not queued.
            while self.next_video <= now {
                self.next_video += period;
                self.frame_no += 1;
            }
            return;
        }
        while self.next_video <= now {
            self.stats
                .send_lag(wall.saturating_duration_since(self.next_video));
            let n = self.clip.layers[0].frames.len();
            let i = self.frame_no % n;
            // The clip's frame i goes out at start + frame_no / FPS.
            let rtp = MediaTime::new(self.frame_no as u64 * 3000, Frequency::NINETY_KHZ);
            for l in 0..self.clip.layers.len() {
                let layer = &self.clip.layers[l];
                let data = if std::mem::take(&mut self.key_wanted[l]) {
                    layer.keyframes[i].clone()
                } else {
                    layer.frames[i].data.clone()
                };
                let rid = (self.clip.layers.len() > 1).then(|| Rid::from(layer.rid));
                self.write(mid, rid, Codec::Vp8, now, rtp, data);
            }
            self.stats.frames_sent += 1;
            self.frame_no += 1;
            self.next_video = start + period * self.frame_no as u32;
        }
    }

    fn write(
        &mut self,
        mid: Mid,
        rid: Option<Rid>,
        codec: Codec,
        now: Instant,
        rtp: MediaTime,
        data: Vec<u8>,
    ) {
        if let Some(mut w) = self.rtc.writer(mid) {
            if let Some(rid) = rid {
                w = w.rid(rid);
            }
            let pt = w
                .payload_params()
                .find(|p| p.spec().codec == codec)
                .map(|p| p.pt());
            if let Some(pt) = pt {
                let len = data.len() as u64;
                if w.write(pt, now, rtp, data).is_ok() {
                    self.stats.bytes_sent += len;
                }
            }
        }
    }

    /// Leave the call.
    pub fn leave(&mut self) {
        let now = Instant::now();
        // A track whose frames stopped before the end froze until it.
        for t in self.tracks.values() {
            if let Some(last) = t.last_frame {
                self.stats.gap(now.saturating_duration_since(last));
            }
        }
        self.send_json(&serde_json::json!({"type": "leave"}));
        self.poll(now);
        self.rtc.disconnect();
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_packets_tell_their_duration() {
        // CELT 20 ms, one frame (config 31, code 0).
        assert_eq!(opus_samples(&[31 << 3]), Some(960));
        // SILK 60 ms, two frames (code 1): 120 ms.
        assert_eq!(opus_samples(&[(3 << 3) | 1]), Some(5760));
        // Hybrid 10 ms, code 3 with six frames.
        assert_eq!(opus_samples(&[(12 << 3) | 3, 6]), Some(2880));
        // Code 3 without its count, and nothing at all.
        assert_eq!(opus_samples(&[(12 << 3) | 3]), None);
        assert_eq!(opus_samples(&[]), None);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        let t0 = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        // On time (20 ms apart, 960 samples apart): none.
        assert_eq!(next_jitter(0.0, t0, 0, t0 + ms(20), 960), 0.0);
        // 16 ms late: a sixteenth of it.
        let j = next_jitter(0.0, t0, 0, t0 + ms(36), 960);
        assert!((j - 0.001).abs() < 1e-9, "{j}");
        // Early counts as much as late, and the estimate decays.
        let j2 = next_jitter(j, t0 + ms(36), 960, t0 + ms(40), 1920);
        assert!((j2 - (j + (0.016 - j) / 16.0)).abs() < 1e-9, "{j2}");
    }

    #[test]
    fn a_vp8_keyframe_tells_its_size() {
        let mut key = vec![0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a];
        key.extend_from_slice(&640u16.to_le_bytes());
        key.extend_from_slice(&(360u16 | 0x4000).to_le_bytes()); // a scale bit
        assert_eq!(vp8_keyframe_size(&key), Some((640, 360)));
        let mut delta = key.clone();
        delta[0] |= 1;
        assert_eq!(vp8_keyframe_size(&delta), None);
        assert_eq!(vp8_keyframe_size(&key[..9]), None);
    }

    #[test]
    fn a_gap_over_half_a_second_is_a_freeze_as_long_as_it_lasted() {
        let mut s = Stats::default();
        s.gap(Duration::from_millis(480));
        assert_eq!((s.freezes, s.frozen), (0, Duration::ZERO));
        s.gap(Duration::from_millis(800));
        // A track that stopped 9 s before the end of the run.
        s.gap(Duration::from_secs(9));
        assert_eq!((s.freezes, s.frozen), (2, Duration::from_millis(9800)));
        let mut all = Stats::default();
        all.merge(s.clone());
        all.merge(s);
        assert_eq!((all.freezes, all.frozen), (4, Duration::from_millis(19600)));
    }

    #[test]
    fn gaps_in_audio_timestamps_are_lost_packets() {
        let mut next = None;
        assert_eq!(audio_gap(&mut next, 1000, 960), Some((1, 0)));
        assert_eq!(audio_gap(&mut next, 1960, 960), Some((1, 0)));
        // Two packets missing.
        assert_eq!(audio_gap(&mut next, 1960 + 3 * 960, 960), Some((3, 2)));
        // One of them comes late: not lost after all.
        assert_eq!(audio_gap(&mut next, 1960 + 960, 960), None);
        assert_eq!(audio_gap(&mut next, 1960 + 4 * 960, 960), Some((1, 0)));
    }

    #[test]
    fn media_packets_are_told_from_rtx_padding_and_rtcp() {
        let mut pts = MediaPts::default();
        pts.note("v=0\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=rtpmap:111 opus/48000/2\r\n");
        let rtp = |b0: u8, pt: u8| [b0, pt, 0, 1, 0, 0, 0, 0];
        assert!(pts.is_media(&rtp(0x80, 96)));
        assert!(pts.is_media(&rtp(0x80, 96 | 0x80)), "marker bit set");
        assert!(pts.is_media(&rtp(0x90, 111)), "with extensions");
        assert!(!pts.is_media(&rtp(0x80, 97)), "rtx");
        assert!(!pts.is_media(&rtp(0xa0, 96)), "padding");
        assert!(!pts.is_media(&rtp(0x80, 200)), "an RTCP sender report");
        assert!(!pts.is_media(&[0x00, 0x01, 0, 0]), "STUN");
        assert!(!pts.is_media(&[23, 0xfe, 0xfd]), "DTLS");
        assert!(!pts.is_media(&[0x80]));
    }
}
