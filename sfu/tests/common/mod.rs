//! Test harness: an in-process balie-sfu and str0m clients over real loopback UDP.
//!
//! Clients publish synthetic frames whose bytes carry a frame number, the
//! publisher's tag and a checkable filler, so a receiver can tell that every
//! forwarded frame arrived intact and from whom.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use balie_sfu::config::Config;
use balie_sfu::server::install_crypto;
use balie_sfu::token::{sign_hs256, unix_now, Claims, Loa, Role};
use balie_sfu::Server;
use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

pub const SECRET: &str = "balie-test-secret";

/// balie-sfu running on its own tokio runtime.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<Server>,
    pub url: String,
    pub http: reqwest::blocking::Client,
}

impl TestServer {
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        install_crypto();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut config = Config::load(None).expect("embedded config");
        config.http = "127.0.0.1:0".parse().expect("addr");
        config.auth.hs256_secret = SECRET.into();
        config.media.shards = 2;
        config.rooms.empty_grace = Duration::from_millis(200);
        tweak(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt.block_on(Server::start(config)).expect("server starts");
        let url = format!("http://{}", server.http_addr);
        TestServer {
            rt,
            server: Some(server),
            url,
            http: reqwest::blocking::Client::new(),
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    pub fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
    }

    /// Sum of a metric family's samples whose labels contain every `label`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|x| l.contains(x))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

pub fn claims(room: &str, identity: &str, role: Role) -> Claims {
    Claims {
        room: room.into(),
        sub: identity.into(),
        name: Some(format!("Name of {identity}")),
        role,
        can_publish: None,
        can_subscribe: None,
        loa: Some(Loa::Substantieel),
        exp: unix_now() + 3600,
        nbf: None,
    }
}

pub fn token(room: &str, identity: &str, role: Role) -> String {
    sign_hs256(SECRET, &claims(room, identity, role)).expect("signs")
}

/// What a client publishes and how it joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    /// Our API: audio + video out, data channel, receives via renegotiation.
    Api,
    /// Our API, receive only (no media of its own), with the data channel.
    ApiViewer,
    /// WHIP: audio + video out, nothing else.
    Whip,
    /// WHEP: one recvonly audio and one recvonly video m-line.
    Whep,
}

/// Frames received on one m-line.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub kind: Option<MediaKind>,
    pub frames: u64,
    pub corrupt: u64,
    pub tags: Vec<u32>,
    pub last_at: Option<Instant>,
}

pub struct Client {
    pub name: String,
    pub tag: u32,
    pub rtc: Rtc,
    pub socket: UdpSocket,
    pub local: SocketAddr,
    pub location: Option<String>,
    pub channel: Option<ChannelId>,
    pub audio_mid: Option<Mid>,
    pub video_mid: Option<Mid>,
    pub publish_video_codec: Codec,
    pub connected: bool,
    pub received: HashMap<Mid, Received>,
    pub messages: Vec<Value>,
    pub offers_answered: usize,
    pub pending: Option<SdpPendingOffer>,
    pub frame_no: u32,
    pub audio_no: u32,
    pub next_video: Instant,
    pub next_audio: Instant,
    pub force_keyframe: bool,
    pub keyframe_requests: u64,
    pub closed: bool,
    start: Instant,
    buf: Vec<u8>,
}

static NEXT_TAG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl Client {
    /// Build the client's offer without sending it.
    pub fn prepare(name: &str, join: Join, video: Codec) -> (Client, SdpOffer) {
        install_crypto();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let local = socket.local_addr().expect("addr");
        let now = Instant::now();
        let mut cfg = RtcConfig::new().clear_codecs().enable_opus(true, false);
        cfg = match video {
            Codec::H264 => cfg.enable_h264(true),
            _ => cfg.enable_vp8(true),
        };
        let mut rtc = cfg.build(now);
        rtc.add_local_candidate(Candidate::host(local, "udp").expect("candidate"));
        let mut api = rtc.sdp_api();
        let (mut audio_mid, mut video_mid) = (None, None);
        match join {
            Join::Api | Join::Whip => {
                audio_mid =
                    Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
                video_mid =
                    Some(api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None));
            }
            Join::Whep => {
                api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            }
            Join::ApiViewer => {}
        }
        if matches!(join, Join::Api | Join::ApiViewer) {
            api.add_channel("balie".into());
        }
        let (offer, pending) = api.apply().expect("offer");
        let client = Client {
            name: name.into(),
            tag: NEXT_TAG.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rtc,
            socket,
            local,
            location: None,
            channel: None,
            audio_mid,
            video_mid,
            publish_video_codec: video,
            connected: false,
            received: HashMap::new(),
            messages: Vec::new(),
            offers_answered: 0,
            pending: Some(pending),
            frame_no: 0,
            audio_no: 0,
            next_video: now,
            next_audio: now,
            force_keyframe: true,
            keyframe_requests: 0,
            closed: false,
            start: now,
            buf: vec![0; 2048],
        };
        (client, offer)
    }

    /// Join through the HTTP API; panics unless it gets 201.
    pub fn join(srv: &TestServer, room: &str, name: &str, role: Role, join: Join) -> Client {
        Self::join_with(srv, room, name, &token(room, name, role), join, Codec::Vp8)
    }

    pub fn join_with(
        srv: &TestServer,
        room: &str,
        name: &str,
        token: &str,
        join: Join,
        video: Codec,
    ) -> Client {
        Self::join_url(&srv.http, &srv.url, room, name, token, join, video)
    }

    pub fn join_url(
        http: &reqwest::blocking::Client,
        url: &str,
        room: &str,
        name: &str,
        token: &str,
        join: Join,
        video: Codec,
    ) -> Client {
        let (mut c, offer) = Client::prepare(name, join, video);
        let path = match join {
            Join::Api | Join::ApiViewer => format!("/v1/rooms/{room}/sessions"),
            Join::Whip => format!("/whip/{room}"),
            Join::Whep => format!("/whep/{room}"),
        };
        let resp = http
            .post(format!("{url}{path}"))
            .header("Content-Type", "application/sdp")
            .header("Authorization", format!("Bearer {token}"))
            .body(offer.to_sdp_string())
            .send()
            .expect("http");
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().expect("ascii").to_string());
        let body = resp.text().expect("body");
        assert_eq!(status.as_u16(), 201, "join {name}: {body}");
        c.location = location;
        let answer = SdpAnswer::from_sdp_string(&body).expect("answer parses");
        let pending = c.pending.take().expect("pending");
        c.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("answer accepted");
        c
    }

    /// One step: read the socket, drive timers, send media, poll output.
    pub fn step(&mut self) {
        if self.closed {
            return;
        }
        let now = Instant::now();
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) => {
                    let Ok(contents) = self.buf[..n].try_into() else {
                        continue;
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
                    let _ = self.rtc.handle_input(input);
                }
                Err(_) => break,
            }
        }
        let _ = self.rtc.handle_input(Input::Timeout(now));
        if self.connected {
            self.send_media(now);
        }
        self.poll();
    }

    fn poll(&mut self) {
        loop {
            if !self.rtc.is_alive() {
                self.closed = true;
                return;
            }
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Timeout(_)) => return,
                Ok(Output::Event(e)) => self.on_event(e),
                Err(_) => {}
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected => self.connected = true,
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {}
            Event::ChannelOpen(id, label) if label == "balie" => self.channel = Some(id),
            Event::ChannelData(d) => {
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else {
                    return;
                };
                if v["type"] == "offer" {
                    let offer = SdpOffer::from_sdp_string(v["sdp"].as_str().unwrap_or(""))
                        .expect("server offer parses");
                    let answer = self.rtc.sdp_api().accept_offer(offer).expect("accept");
                    let msg = serde_json::json!({"type": "answer", "sdp": answer.to_sdp_string()});
                    self.send_json(&msg);
                    self.offers_answered += 1;
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
                r.frames += 1;
                r.last_at = Some(Instant::now());
                match check_frame(&d.data) {
                    Some(tag) => {
                        if !r.tags.contains(&tag) {
                            r.tags.push(tag);
                        }
                    }
                    None => r.corrupt += 1,
                }
            }
            Event::KeyframeRequest(_) => {
                self.keyframe_requests += 1;
                self.force_keyframe = true;
            }
            _ => {}
        }
    }

    pub fn send_json(&mut self, v: &Value) {
        if let Some(id) = self.channel {
            if let Some(mut ch) = self.rtc.channel(id) {
                let _ = ch.write(false, v.to_string().as_bytes());
            }
        }
    }

    pub fn send_raw(&mut self, data: &[u8]) {
        if let Some(id) = self.channel {
            if let Some(mut ch) = self.rtc.channel(id) {
                let _ = ch.write(false, data);
            }
        }
    }

    fn send_media(&mut self, now: Instant) {
        let elapsed = now - self.start;
        if let Some(mid) = self.audio_mid {
            while self.next_audio <= now {
                self.next_audio += Duration::from_millis(20);
                self.audio_no += 1;
                let data = make_frame(self.tag, self.audio_no, 60, None);
                let rtp = MediaTime::new(
                    self.audio_no as u64 * 960,
                    str0m::media::Frequency::FORTY_EIGHT_KHZ,
                );
                if let Some(w) = self.rtc.writer(mid) {
                    let pt = w
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::Opus)
                        .map(|p| p.pt());
                    if let Some(pt) = pt {
                        let _ = w.write(pt, now, rtp, data);
                    }
                }
            }
        }
        if let Some(mid) = self.video_mid {
            while self.next_video <= now {
                self.next_video += Duration::from_millis(33);
                self.frame_no += 1;
                let key = self.force_keyframe || self.frame_no % 60 == 1;
                self.force_keyframe = false;
                let size = 800 + (self.frame_no as usize * 397) % 4000;
                let data = make_frame(
                    self.tag,
                    self.frame_no,
                    size,
                    Some((key, self.publish_video_codec)),
                );
                let rtp = MediaTime::new(
                    self.frame_no as u64 * 3000,
                    str0m::media::Frequency::NINETY_KHZ,
                );
                let codec = self.publish_video_codec;
                if let Some(w) = self.rtc.writer(mid) {
                    let pt = w
                        .payload_params()
                        .find(|p| p.spec().codec == codec)
                        .map(|p| p.pt());
                    if let Some(pt) = pt {
                        let _ = w.write(pt, now, rtp, data);
                    }
                }
            }
        }
        let _ = elapsed;
    }

    /// Frames received from the publisher with `tag`, by kind.
    pub fn frames_from(&self, tag: u32, kind: MediaKind) -> u64 {
        self.received
            .values()
            .filter(|r| r.kind == Some(kind) && r.tags.contains(&tag))
            .map(|r| r.frames)
            .sum()
    }

    pub fn corrupt(&self) -> u64 {
        self.received.values().map(|r| r.corrupt).sum()
    }

    pub fn messages_of(&self, ty: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == ty).collect()
    }
}

/// Drive clients until `done` holds or `timeout` passes; true if it held.
pub fn run_until(
    clients: &mut [&mut Client],
    timeout: Duration,
    mut done: impl FnMut(&[&mut Client]) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        for c in clients.iter_mut() {
            c.step();
        }
        if done(clients) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Drive clients for a fixed time.
pub fn run_for(clients: &mut [&mut Client], d: Duration) {
    run_until(clients, d, |_| false);
}

// Frame layout after the codec header: tag u32, frame u32, len u32, filler.
const VP8_KEY: [u8; 10] = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
const VP8_DELTA: [u8; 3] = [0x11, 0x02, 0x00];
const H264_IDR: [u8; 5] = [0, 0, 0, 1, 0x65];
const H264_NON_IDR: [u8; 5] = [0, 0, 0, 1, 0x41];
const MAGIC: [u8; 4] = *b"BLIE";

fn filler(tag: u32, frame: u32, i: usize) -> u8 {
    // Never 0, so H.264 emulation prevention never applies.
    ((tag as usize * 31 + frame as usize * 7 + i * 13) % 250 + 1) as u8
}

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
    for i in 0..body {
        v.push(filler(tag, frame, i));
    }
    v
}

/// The publisher tag of an intact frame; None if any byte is off.
pub fn check_frame(data: &[u8]) -> Option<u32> {
    let at = data.windows(4).position(|w| w == MAGIC)?;
    let rest = &data[at + 4..];
    if rest.len() < 12 {
        return None;
    }
    let tag = u32::from_be_bytes(rest[0..4].try_into().ok()?);
    let frame = u32::from_be_bytes(rest[4..8].try_into().ok()?);
    let body = u32::from_be_bytes(rest[8..12].try_into().ok()?) as usize;
    let fill = &rest[12..];
    if fill.len() != body {
        return None;
    }
    fill.iter()
        .enumerate()
        .all(|(i, b)| *b == filler(tag, frame, i))
        .then_some(tag)
}
