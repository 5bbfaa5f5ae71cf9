//! A synthetic participant: a str0m client with no socket of its own.
//!
//! It publishes synthetic frames whose bytes carry a frame number, the
//! publisher's tag and a checkable filler, so a receiver can tell that every
//! forwarded frame arrived intact and from whom. It answers the server's
//! offers on the `balie` data channel as the web client does. The tests drive
//! it over real UDP or inside [`super::Sim`]; the load generator will reuse it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid, Rid, Simulcast,
    SimulcastLayer,
};
use str0m::net::Transmit;
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig, RtcError};

use crate::shard::core::udp_input;

/// How a peer joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    /// Our API: audio + video out, data channel, receives via renegotiation.
    Api,
    /// As `Api`, with the video in three simulcast layers (rids q, h, f).
    ApiSimulcast,
    /// As `Api`, but without transport-wide congestion control: the peer
    /// reports the bandwidth it receives by REMB only (set `Peer::remb`), as
    /// some older clients do.
    ApiRembOnly,
    /// Our API, audio out only (no video line at all), with the data
    /// channel: an audio-only participant, as in balie-bench's audio scenario.
    ApiAudio,
    /// Our API, receive only (no media of its own), with the data channel.
    ApiViewer,
    /// WHIP: audio + video out, nothing else.
    Whip,
    /// WHEP: one recvonly audio and one recvonly video m-line.
    Whep,
}

impl Join {
    /// Whether this joins through our API (with the data channel), not
    /// WHIP or WHEP.
    pub fn is_api(&self) -> bool {
        !matches!(self, Join::Whip | Join::Whep)
    }

    /// The HTTP path for joining `room` this way.
    pub fn path(&self, room: &str) -> String {
        match self {
            Join::Whip => format!("/whip/{room}"),
            Join::Whep => format!("/whep/{room}"),
            _ => format!("/v1/rooms/{room}/sessions"),
        }
    }
}

/// Frames received on one m-line.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// Audio or video.
    pub kind: Option<MediaKind>,
    /// Frames received.
    pub frames: u64,
    /// Frames whose bytes were not what was sent.
    pub corrupt: u64,
    /// Publisher tags seen.
    pub tags: Vec<u32>,
    /// When the last frame came.
    pub last_at: Option<Instant>,
    /// The tag of the last intact frame (its simulcast layer in the top byte).
    pub last_tag: Option<u32>,
    /// Layer changes seen: (from layer, to layer, the first frame was a keyframe).
    pub switches: Vec<(u32, u32, bool)>,
    /// Video: the decoder has a reference (a keyframe, and no gap since).
    /// After a gap (frames lost for good) frames are not decodable until the
    /// next keyframe, as in a browser, and the peer asks for one (PLI).
    pub decodable: bool,
    /// Video frames dropped as not decodable.
    pub undecodable: u64,
    /// Video frames as received (with [`Peer::keep_video`]): arrival and data.
    pub video: Vec<(Instant, Arc<[u8]>)>,
}

/// Real encoded video for a peer to publish instead of synthetic frames
/// (a test decodes what reaches the other side).
#[derive(Clone)]
pub struct Clip {
    /// The frames in order, (keyframe, data), played in a loop; the first
    /// is a keyframe.
    pub frames: Arc<Vec<(bool, Vec<u8>)>>,
    /// The same pictures each encoded as a keyframe: the frame sent when a
    /// keyframe was asked for.
    pub keys: Arc<Vec<(bool, Vec<u8>)>>,
}

/// A synthetic participant.
pub struct Peer {
    /// A name for messages.
    pub name: String,
    /// The tag stamped into every frame it publishes.
    pub tag: u32,
    /// The client's `Rtc`.
    pub rtc: Rtc,
    /// Its (possibly virtual) address.
    pub addr: SocketAddr,
    /// The `balie` data channel once open.
    pub channel: Option<ChannelId>,
    /// The m-line it publishes audio on.
    pub audio_mid: Option<Mid>,
    /// The m-line it publishes video on.
    pub video_mid: Option<Mid>,
    /// The video codec it publishes.
    pub video_codec: Codec,
    /// Publishes video as simulcast layers q, h, f.
    pub simulcast: bool,
    /// ICE + DTLS connected.
    pub connected: bool,
    /// What arrived, by m-line.
    pub received: HashMap<Mid, Received>,
    /// Data channel messages received.
    pub messages: Vec<Value>,
    /// Server offers answered.
    pub offers_answered: usize,
    /// Keyframe requests received.
    pub keyframe_requests: u64,
    /// The Rtc is no longer alive.
    pub closed: bool,
    /// The server asked to stop sending video (nobody shows it).
    pub video_paused: bool,
    /// Video frames written (all layers of one frame count once).
    pub video_frames_sent: u64,
    pending: Option<SdpPendingOffer>,
    frame_no: u32,
    audio_no: u32,
    /// The length of one Opus frame it sends (20 ms; balie-bench's audio
    /// scenario sends 120 ms frames).
    pub audio_frame: Duration,
    next_video: Instant,
    next_audio: Instant,
    force_keyframe: bool,
    /// Simulcast layers (q, h, f) whose next frame is a keyframe: as a
    /// browser does, a request for one layer makes a keyframe on that layer
    /// only.
    force_layer: [bool; 3],
    /// Mean frame sizes (bytes at 30 frames/s) of q, h and f when it
    /// publishes simulcast.
    pub layer_bytes: [usize; 3],
    /// The simulated time, as of the last input.
    now: Instant,
    /// When a keyframe request was last honoured.
    key_honoured: Option<Instant>,
    /// The bandwidth this peer reports by REMB for the video it receives,
    /// every 250 ms (bit/s; `None`: no REMB).
    pub remb: Option<u64>,
    next_remb: Instant,
    /// Publish this instead of synthetic video (one layer).
    pub clip: Option<Clip>,
    /// Opus packets to publish instead of synthetic audio (see
    /// [`Peer::play`]), and the next one to send.
    audio_clip: Option<Arc<Vec<Vec<u8>>>>,
    audio_at: usize,
    /// Keep every video frame received (`Received::video`).
    pub keep_video: bool,
}

/// Keyframe requests closer than this to the last honoured one are dropped,
/// as Chromium does (one per 300 ms): the SFU must ask again.
const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(300);

impl Peer {
    /// A peer at `addr` and its offer.
    pub fn new(
        name: &str,
        tag: u32,
        join: Join,
        video: Codec,
        addr: SocketAddr,
        now: Instant,
    ) -> (Peer, SdpOffer) {
        let mut cfg = RtcConfig::new().clear_codecs().enable_opus(true, false);
        cfg = match video {
            Codec::H264 => cfg.enable_h264(true),
            _ => cfg.enable_vp8(true),
        };
        if join == Join::ApiRembOnly {
            let mut exts = ExtensionMap::empty();
            for (id, e) in ExtensionMap::standard().iter() {
                if *e != Extension::TransportSequenceNumber {
                    exts.set(id, e.clone());
                }
            }
            cfg = cfg.set_extension_map(exts);
        }
        let mut rtc = cfg.build(now);
        // A host candidate always parses.
        if let Ok(c) = Candidate::host(addr, "udp") {
            rtc.add_local_candidate(c);
        }
        let mut api = rtc.sdp_api();
        let (mut audio_mid, mut video_mid) = (None, None);
        match join {
            Join::Api | Join::ApiSimulcast | Join::ApiRembOnly | Join::Whip => {
                audio_mid =
                    Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
                let simulcast = (join == Join::ApiSimulcast).then(|| {
                    let mut s = Simulcast::new();
                    for rid in LAYERS {
                        s.add_send_layer(SimulcastLayer::new(rid));
                    }
                    s
                });
                video_mid = Some(api.add_media(
                    MediaKind::Video,
                    Direction::SendOnly,
                    None,
                    None,
                    simulcast,
                ));
            }
            Join::ApiAudio => {
                audio_mid =
                    Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
            }
            Join::Whep => {
                api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            }
            Join::ApiViewer => {}
        }
        if join.is_api() {
            api.add_channel("balie".into());
        }
        // There is always a change above (media or channel), so apply() yields an offer.
        let (offer, pending) = api.apply().expect("an offer with at least one change");
        let peer = Peer {
            name: name.into(),
            tag,
            rtc,
            addr,
            channel: None,
            audio_mid,
            video_mid,
            video_codec: video,
            simulcast: join == Join::ApiSimulcast,
            connected: false,
            received: HashMap::new(),
            messages: Vec::new(),
            offers_answered: 0,
            keyframe_requests: 0,
            closed: false,
            video_paused: false,
            video_frames_sent: 0,
            pending: Some(pending),
            frame_no: 0,
            audio_no: 0,
            audio_frame: Duration::from_millis(20),
            next_video: now,
            next_audio: now,
            force_keyframe: true,
            force_layer: [false; 3],
            layer_bytes: LAYER_BYTES,
            now,
            key_honoured: None,
            remb: None,
            next_remb: now,
            clip: None,
            audio_clip: None,
            audio_at: 0,
            keep_video: false,
        };
        (peer, offer)
    }

    /// Apply the server's answer to our first offer.
    pub fn accept_answer(&mut self, answer: SdpAnswer) -> Result<(), RtcError> {
        match self.pending.take() {
            Some(p) => self.rtc.sdp_api().accept_answer(p, answer),
            None => Ok(()),
        }
    }

    /// A datagram arrived.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        self.now = now;
        let Some(input) = udp_input(now, source, self.addr, data) else {
            return;
        };
        let _ = self.rtc.handle_input(input);
    }

    /// Let time pass: timers, and the media due by `now`.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        let _ = self.rtc.handle_input(Input::Timeout(now));
        if let Some(bps) = self.remb.filter(|_| now >= self.next_remb) {
            self.next_remb = now + Duration::from_millis(250);
            let video: Vec<Mid> = self
                .received
                .iter()
                .filter(|(_, r)| r.kind == Some(MediaKind::Video))
                .map(|(mid, _)| *mid)
                .collect();
            let mut api = self.rtc.direct_api();
            for mid in video {
                if let Some(rx) = api.stream_rx_by_mid(mid, None) {
                    rx.request_remb(str0m::bwe::Bitrate::bps(bps));
                }
            }
        }
        if self.connected {
            self.send_media(now);
        }
    }

    /// Drain output: transmits into `out`, events handled here. Returns the
    /// next timeout.
    pub fn poll(&mut self, out: &mut Vec<Transmit>) -> Option<Instant> {
        loop {
            if !self.rtc.is_alive() {
                self.closed = true;
                return None;
            }
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => out.push(t),
                Ok(Output::Timeout(t)) => return Some(t),
                Ok(Output::Event(e)) => self.on_event(e),
                Err(_) => {}
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected => self.connected = true,
            Event::ChannelOpen(id, label) if label == "balie" => self.channel = Some(id),
            Event::ChannelData(d) => {
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else {
                    return;
                };
                if v["type"] == "send-video" {
                    let resume = v["send"] == true;
                    if resume && self.video_paused {
                        self.force_keyframe = true;
                    }
                    self.video_paused = !resume;
                }
                if v["type"] == "offer" {
                    let sdp = v["sdp"].as_str().unwrap_or("");
                    if let Ok(offer) = SdpOffer::from_sdp_string(sdp) {
                        if let Ok(answer) = self.rtc.sdp_api().accept_offer(offer) {
                            let msg = serde_json::json!({"type": "answer", "sdp": answer.to_sdp_string()});
                            self.send_json(&msg);
                            self.offers_answered += 1;
                        }
                    }
                }
                self.messages.push(v);
            }
            Event::MediaAdded(m) => {
                self.received.entry(m.mid).or_default().kind = Some(m.kind);
            }
            Event::MediaData(d) => {
                let kind = self.rtc.media(d.mid).map(|m| m.kind());
                let r = self.received.entry(d.mid).or_default();
                if r.kind.is_none() {
                    r.kind = kind;
                }
                r.last_at = Some(d.network_time);
                if kind == Some(MediaKind::Video) {
                    if d.is_keyframe() {
                        r.decodable = true;
                    } else if !d.contiguous && r.decodable {
                        r.decodable = false;
                        if let Some(mut w) = self.rtc.writer(d.mid) {
                            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
                        }
                    }
                    if !r.decodable {
                        r.undecodable += 1;
                        return;
                    }
                }
                r.frames += 1;
                if self.keep_video && kind == Some(MediaKind::Video) {
                    r.video.push((d.network_time, d.data.clone()));
                }
                match check_frame(&d.data) {
                    Some(tag) => {
                        if !r.tags.contains(&tag) {
                            r.tags.push(tag);
                        }
                        if let Some(last) = r.last_tag {
                            if last != tag && last & 0x00ff_ffff == tag & 0x00ff_ffff {
                                r.switches.push((last >> 24, tag >> 24, d.is_keyframe()));
                            }
                        }
                        r.last_tag = Some(tag);
                    }
                    None => r.corrupt += 1,
                }
            }
            Event::KeyframeRequest(req) => {
                self.keyframe_requests += 1;
                let now = self.now;
                if self
                    .key_honoured
                    .is_none_or(|t| now.saturating_duration_since(t) >= KEYFRAME_REQUEST_GAP)
                {
                    self.key_honoured = Some(now);
                    let layer = req.rid.and_then(|r| LAYERS.iter().position(|l| *l == &*r));
                    match layer {
                        Some(i) if self.simulcast => self.force_layer[i] = true,
                        _ => self.force_keyframe = true,
                    }
                }
            }
            _ => {}
        }
    }

    /// Publish these Opus packets (20 ms each) from now on, once; after the
    /// last, it is sent again and again (end a clip with silence).
    pub fn play(&mut self, packets: Arc<Vec<Vec<u8>>>) {
        self.audio_clip = Some(packets);
        self.audio_at = 0;
    }

    /// Send a JSON message on the data channel.
    pub fn send_json(&mut self, v: &Value) {
        self.send_raw(v.to_string().as_bytes());
    }

    /// Send raw bytes on the data channel.
    pub fn send_raw(&mut self, data: &[u8]) {
        if let Some(mut ch) = self.channel.and_then(|id| self.rtc.channel(id)) {
            let _ = ch.write(false, data);
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
                let _ = w.write(pt, now, rtp, data);
            }
        }
    }

    fn send_media(&mut self, now: Instant) {
        if let Some(mid) = self.audio_mid {
            while self.next_audio <= now {
                self.next_audio += self.audio_frame;
                self.audio_no += 1;
                let data = match &self.audio_clip {
                    Some(clip) if !clip.is_empty() => {
                        let i = self.audio_at.min(clip.len() - 1);
                        self.audio_at += 1;
                        clip[i].clone()
                    }
                    _ => make_frame(self.tag, self.audio_no, 60, None),
                };
                let samples = 48 * self.audio_frame.as_millis() as u64;
                let rtp =
                    MediaTime::new(self.audio_no as u64 * samples, Frequency::FORTY_EIGHT_KHZ);
                self.write(mid, None, Codec::Opus, now, rtp, data);
            }
        }
        if self.video_paused {
            self.next_video = now;
        }
        if let Some(mid) = self.video_mid.filter(|_| !self.video_paused) {
            while self.next_video <= now {
                self.video_frames_sent += 1;
                self.next_video += Duration::from_millis(33);
                self.frame_no += 1;
                let forced = self.force_keyframe;
                let key = forced || self.frame_no % 60 == 1;
                self.force_keyframe = false;
                let size = 800 + (self.frame_no as usize * 397) % 4000;
                let codec = self.video_codec;
                let rtp = MediaTime::new(self.frame_no as u64 * 3000, Frequency::NINETY_KHZ);
                if let Some(clip) = &self.clip {
                    let i = (self.frame_no as usize - 1) % clip.frames.len().max(1);
                    let source = if forced && i != 0 {
                        &clip.keys
                    } else {
                        &clip.frames
                    };
                    if let Some((_, data)) = source.get(i) {
                        let data = data.clone();
                        self.write(mid, None, codec, now, rtp, data);
                    }
                } else if self.simulcast {
                    // Layer i (q, h, f) carries tag | (i + 1) << 24, at
                    // `layer_bytes` a frame (by default about 150 kbit/s,
                    // 500 kbit/s and 1.5 Mbit/s; keyframes 3x).
                    for (i, rid) in LAYERS.iter().enumerate() {
                        let tag = self.tag | ((i as u32 + 1) << 24);
                        let mean = self.layer_bytes[i];
                        let vary = mean * ((self.frame_no as usize * 37) % 40) / 100;
                        let key = key || std::mem::take(&mut self.force_layer[i]);
                        let bytes = if key {
                            mean * 3
                        } else {
                            mean - mean / 5 + vary
                        };
                        let data = make_frame(tag, self.frame_no, bytes, Some((key, codec)));
                        self.write(mid, Some(Rid::from(*rid)), codec, now, rtp, data);
                    }
                } else {
                    let data = make_frame(self.tag, self.frame_no, size, Some((key, codec)));
                    self.write(mid, None, codec, now, rtp, data);
                }
            }
        }
    }

    /// Frames received from the publisher with `tag` (any simulcast layer), by kind.
    pub fn frames_from(&self, tag: u32, kind: MediaKind) -> u64 {
        self.received
            .values()
            .filter(|r| r.kind == Some(kind) && r.tags.iter().any(|t| t & 0x00ff_ffff == tag))
            .map(|r| r.frames)
            .sum()
    }

    /// The simulcast layer of the last video frame from the publisher with `tag`.
    pub fn current_layer(&self, tag: u32) -> Option<&'static str> {
        let last = self
            .received
            .values()
            .filter(|r| r.kind == Some(MediaKind::Video))
            .filter_map(|r| r.last_tag)
            .find(|t| *t & 0x00ff_ffff == tag)?;
        let layer = (last >> 24) as usize;
        layer.checked_sub(1).and_then(|i| LAYERS.get(i)).copied()
    }

    /// Layer switches seen in frames from `tag`: (from, to, first frame was a keyframe).
    pub fn switches_from(&self, tag: u32) -> Vec<(u32, u32, bool)> {
        self.received
            .values()
            .filter(|r| r.tags.iter().any(|t| t & 0x00ff_ffff == tag))
            .flat_map(|r| r.switches.iter().copied())
            .collect()
    }

    /// The simulcast layers (rids) received from the publisher with `tag`.
    pub fn layers_from(&self, tag: u32) -> Vec<&'static str> {
        let mut layers: Vec<&'static str> = self
            .received
            .values()
            .flat_map(|r| r.tags.iter())
            .filter(|t| *t & 0x00ff_ffff == tag && *t >> 24 > 0)
            .filter_map(|t| LAYERS.get((*t >> 24) as usize - 1).copied())
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// Frames that did not arrive intact.
    pub fn corrupt(&self) -> u64 {
        self.received.values().map(|r| r.corrupt).sum()
    }

    /// Video frames dropped as not decodable (after a gap, until a keyframe).
    pub fn undecodable(&self) -> u64 {
        self.received.values().map(|r| r.undecodable).sum()
    }

    /// Data channel messages of one type.
    pub fn messages_of(&self, ty: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == ty).collect()
    }
}

/// The simulcast layers a simulcast peer sends, lowest first.
pub const LAYERS: [&str; 3] = ["q", "h", "f"];

/// Mean frame sizes of the layers at 30 frames/s: 150, 500 and 1,500 kbit/s.
pub const LAYER_BYTES: [usize; 3] = [625, 2083, 6250];

// Frame layout after the codec header: magic, tag u32, frame u32, len u32, filler.
const VP8_KEY: [u8; 10] = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
const VP8_DELTA: [u8; 3] = [0x11, 0x02, 0x00];
const H264_IDR: [u8; 5] = [0, 0, 0, 1, 0x65];
const H264_NON_IDR: [u8; 5] = [0, 0, 0, 1, 0x41];
const MAGIC: [u8; 4] = *b"BLIE";

fn filler(tag: u32, frame: u32, i: usize) -> u8 {
    // Never 0, so H.264 emulation prevention never applies.
    ((tag as usize * 31 + frame as usize * 7 + i * 13) % 250 + 1) as u8
}

/// A synthetic frame of about `size` bytes; `video` gives (keyframe, codec).
pub fn make_frame(tag: u32, frame: u32, size: usize, video: Option<(bool, Codec)>) -> Vec<u8> {
    let mut v = match video {
        Some((true, Codec::H264)) => H264_IDR.to_vec(),
        Some((false, Codec::H264)) => H264_NON_IDR.to_vec(),
        Some((true, _)) => VP8_KEY.to_vec(),
        Some((false, _)) => VP8_DELTA.to_vec(),
        None => Vec::new(),
    };
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&tag.to_be_bytes());
    v.extend_from_slice(&frame.to_be_bytes());
    let body = size.saturating_sub(v.len() + 4);
    v.extend_from_slice(&(body as u32).to_be_bytes());
    v.extend((0..body).map(|i| filler(tag, frame, i)));
    v
}

/// The frame number a synthetic frame carries.
pub fn frame_number(data: &[u8]) -> Option<u32> {
    let at = data.windows(4).position(|w| w == MAGIC)?;
    Some(u32::from_be_bytes(
        data.get(at + 8..at + 12)?.try_into().ok()?,
    ))
}

/// The publisher tag of an intact frame; `None` if any byte is off.
pub fn check_frame(data: &[u8]) -> Option<u32> {
    let at = data.windows(4).position(|w| w == MAGIC)?;
    let rest = &data[at + 4..];
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(rest.get(i..i + 4)?.try_into().ok()?))
    };
    let (tag, frame, body) = (word(0)?, word(4)?, word(8)? as usize);
    let fill = rest.get(12..)?;
    (fill.len() == body
        && fill
            .iter()
            .enumerate()
            .all(|(i, b)| *b == filler(tag, frame, i)))
    .then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_check_and_detect_damage() {
        let f = make_frame(7, 3, 1500, Some((true, Codec::Vp8)));
        assert_eq!(f.len(), 1500);
        assert_eq!(check_frame(&f), Some(7));
        let mut bad = f.clone();
        bad[700] ^= 1;
        assert_eq!(check_frame(&bad), None);
        assert_eq!(check_frame(&f[..1000]), None);
        assert_eq!(check_frame(b"nothing"), None);
    }
}
