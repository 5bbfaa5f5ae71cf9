//! One participant's peer connection inside a shard: the str0m `Rtc` and what
//! balie knows about it (who, which tracks it publishes, which it receives on
//! which m-line, the negotiation in flight).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::config::DtlsCert;
use str0m::media::{MediaKind, MediaTime, Mid};
use str0m::net::Transmit;
use str0m::{Candidate, Event, IceCreds, Input, Output, Rtc, RtcConfig};

use super::layers::LayerChoice;
use crate::ids::{RoomId, SessionId, TrackId};
use crate::signal::channel::{ParticipantState, RosterEntry, ServerMessage};
use crate::token::Claims;

/// How the session was created, which decides what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// balie's own API: publish and subscribe, in-call signalling on the data channel.
    Api,
    /// WHIP (RFC 9725): publish only.
    Whip,
    /// WHEP: receive only, on the m-lines the client offered.
    Whep,
}

impl SessionKind {
    /// Name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionKind::Api => "api",
            SessionKind::Whip => "whip",
            SessionKind::Whep => "whep",
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// The client said `leave`, sent DELETE, or closed DTLS.
    Left,
    /// ICE was lost and not restored within the reconnect grace.
    Disconnected,
    /// An operator or official removed it.
    Removed,
    /// str0m failed or panicked inside it.
    Failed,
    /// The node is shutting down.
    Drain,
}

impl LeaveReason {
    /// Name for messages and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            LeaveReason::Left => "left",
            LeaveReason::Disconnected => "disconnected",
            LeaveReason::Removed => "removed",
            LeaveReason::Failed => "failed",
            LeaveReason::Drain => "drain",
        }
    }
}

/// Where an outgoing track stands in this session's SDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// Needs an m-line: waits for the next server offer.
    ToOpen,
    /// Offered on this mid, answer pending.
    Negotiating(Mid),
    /// Flowing on this mid.
    Open(Mid),
}

/// A track of another participant that this session receives.
#[derive(Debug, Clone)]
pub struct TrackOut {
    /// The published track.
    pub track: TrackId,
    /// Its publisher.
    pub owner: SessionId,
    /// Audio or video.
    pub kind: MediaKind,
    /// Negotiation state.
    pub state: OutState,
    /// True when it rides on an m-line the client offered (WHEP style);
    /// false when the server added the m-line.
    pub on_slot: bool,
    /// For a simulcast track: which layer this subscriber gets.
    pub choice: LayerChoice,
    /// When the layer was last decided.
    pub decided_at: Option<Instant>,
    /// Added to the publisher's RTP time, so a layer switch does not jump.
    pub ts_offset: i64,
    /// The last RTP time written, and when.
    pub last_out: Option<(i64, Instant)>,
    /// How tall the subscriber shows this video (pixels): `None` unknown,
    /// `Some(0)` hidden (nothing is forwarded).
    pub display_height: Option<u32>,
    /// What this track asks of the bandwidth estimator (bit/s): the rate to
    /// sustain (the next layer up while going up is allowed) and the rate to
    /// probe for (the top layer). Summed over the session's tracks.
    pub bwe_want: (u64, u64),
    /// Whether str0m was told to send this (video) stream unpaced; see
    /// `Core::forward`.
    pub unpaced: bool,
    /// Since when this subscriber has needed less than a single-layer
    /// source sends (offload; see `shard/core/transcode.rs`).
    pub need_since: Option<Instant>,
}

impl TrackOut {
    /// A track out in `state`.
    pub fn new(
        track: TrackId,
        owner: SessionId,
        kind: MediaKind,
        state: OutState,
        on_slot: bool,
    ) -> TrackOut {
        TrackOut {
            track,
            owner,
            kind,
            state,
            on_slot,
            choice: LayerChoice::default(),
            bwe_want: (0, 0),
            unpaced: false,
            need_since: None,
            decided_at: None,
            ts_offset: 0,
            last_out: None,
            display_height: None,
        }
    }

    /// The RTP time to write for a frame of the publisher's `time` at `wall`.
    /// After a layer switch (`rebase`), the offset is chosen so the output
    /// continues where it was, advanced by the wall-clock time in between.
    pub fn map_time(&mut self, time: MediaTime, wall: Instant, rebase: bool) -> MediaTime {
        let hz = time.frequency().get() as f64;
        let input = time.numer() as i64;
        if rebase {
            if let Some((last, at)) = self.last_out {
                let expected =
                    last + (wall.saturating_duration_since(at).as_secs_f64() * hz) as i64;
                self.ts_offset = expected - input;
            }
        }
        let out = (input + self.ts_offset).max(0);
        self.last_out = Some((out, wall));
        MediaTime::new(out as u64, time.frequency())
    }
}

/// A session inside a shard.
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// Its room.
    pub room: RoomId,
    /// API, WHIP or WHEP.
    pub kind: SessionKind,
    /// The verified token claims.
    pub claims: Claims,
    /// The WebRTC state machine.
    pub rtc: Rtc,
    /// Our ICE ufrag, by which new peers are demultiplexed.
    pub ufrag: String,
    /// The client's ICE ufrag (changes on an ICE restart).
    pub remote_ufrag: Option<String>,
    /// Remote addresses seen for this session.
    pub addrs: Vec<SocketAddr>,
    /// When the HTTP offer arrived (join latency).
    pub offer_received: Instant,
    /// DTLS connected.
    pub connected: bool,
    /// The `balie` data channel, once open.
    pub channel: Option<ChannelId>,
    /// Tracks this session publishes: (mid, track id).
    pub tracks_in: Vec<(Mid, TrackId)>,
    /// Tracks this session receives.
    pub tracks_out: Vec<TrackOut>,
    /// m-lines the client offered for receiving that carry nothing yet.
    pub free_slots: Vec<(Mid, MediaKind)>,
    /// m-lines the server added whose track is gone: to stop at the next offer.
    pub to_stop: Vec<Mid>,
    /// m-lines being stopped by the offer in flight.
    pub stopping: Vec<Mid>,
    /// The server's offer in flight.
    pub pending: Option<SdpPendingOffer>,
    /// When str0m next wants this session woken.
    pub deadline: Option<Instant>,
    /// The earliest entry this session has in the shard's timer queue (at
    /// or before `deadline`): a deadline that moves later, as it does after
    /// most datagrams, costs no new entry; the entry, when it comes up,
    /// moves on to the deadline.
    pub scheduled: Option<Instant>,
    /// Since when ICE has been disconnected.
    pub disconnected_since: Option<Instant>,
    /// Messages waiting for room in the data channel.
    pub outbox: VecDeque<String>,
    /// The latest bandwidth estimate for what we send to this peer (bit/s).
    pub estimate: Option<u64>,
    /// When [`Session::estimate`] last changed.
    pub estimate_since: Instant,
    /// The loss the peer reports, capping the budget when the link
    /// suddenly carries much less than is sent.
    pub loss: super::layers::LossWatch,
    /// The desired rate last asked of the estimator (bit/s).
    pub asked_desired: u64,
    /// The minimum rate last asked of the estimator (bit/s), and since when
    /// it was last raised.
    pub asked_minimum: (u64, Instant),
    /// The estimate comes from TWCC (else REMB reports stand in).
    pub twcc: bool,
    /// Let into the call. Citizens start in the waiting room (`false`) until
    /// an official admits them; nothing flows to or from them until then.
    pub admitted: bool,
    /// The session's log span (a child of its room's).
    pub span: tracing::Span,
}

/// What driving a session's `Rtc` produced.
pub enum Drive {
    /// It reached its next timeout.
    Timeout(Instant),
    /// It is no longer alive (closed by the peer or by an error).
    Dead,
    /// str0m panicked inside it.
    Panicked,
}

/// After this many `poll_output` errors in one drive the session is closed,
/// so a session that keeps failing cannot spin the shard.
const MAX_POLL_ERRORS: usize = 32;

impl Session {
    /// The roster entry others see for this participant.
    pub fn roster_entry(&self) -> RosterEntry {
        RosterEntry {
            id: self.id.to_string(),
            name: self.claims.name.clone(),
            role: self.claims.role,
            loa: self.claims.loa,
            publisher: self.claims.may_publish() && self.kind != SessionKind::Whep,
            state: if self.admitted {
                ParticipantState::Admitted
            } else {
                ParticipantState::Waiting
            },
        }
    }

    /// Whether this session may receive others' media.
    pub fn subscribes(&self) -> bool {
        self.kind != SessionKind::Whip && self.claims.may_subscribe()
    }

    /// Whether this session's media may reach others.
    pub fn publishes(&self) -> bool {
        self.kind != SessionKind::Whep && self.claims.may_publish()
    }

    /// Feed one input to the `Rtc`, isolating panics. Returns false if str0m
    /// panicked; an error from str0m is left for the next drive to notice.
    pub fn handle_input(&mut self, input: Input) -> Result<(), Panicked> {
        match catch_unwind(AssertUnwindSafe(|| self.rtc.handle_input(input))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(parent: &self.span, "rtc input error: {e}");
                Ok(())
            }
            Err(_) => Err(Panicked),
        }
    }

    /// Poll the `Rtc` until it reports its next timeout: transmits go to
    /// `transmits`, events to `events`.
    pub fn drive(&mut self, transmits: &mut VecDeque<Transmit>, events: &mut Vec<Event>) -> Drive {
        let mut errors = 0;
        loop {
            if !self.rtc.is_alive() {
                return Drive::Dead;
            }
            match catch_unwind(AssertUnwindSafe(|| self.rtc.poll_output())) {
                Ok(Ok(Output::Transmit(t))) => transmits.push_back(t),
                Ok(Ok(Output::Timeout(t))) => return Drive::Timeout(t),
                Ok(Ok(Output::Event(e))) => events.push(e),
                Ok(Err(e)) => {
                    // Not every error is fatal (e.g. NoSenderSource after writing
                    // rid-less media into a simulcast m-line); a run of them is.
                    tracing::debug!(parent: &self.span, "rtc poll error: {e}");
                    errors += 1;
                    if errors >= MAX_POLL_ERRORS {
                        self.rtc.disconnect();
                        return Drive::Dead;
                    }
                }
                Err(_) => return Drive::Panicked,
            }
        }
    }

    /// Queue a message for the data channel and write whatever can be written.
    pub fn send(&mut self, msg: &ServerMessage) {
        self.outbox.push_back(msg.to_json());
        self.flush_outbox();
    }

    /// Write queued messages to the data channel if it is open.
    pub fn flush_outbox(&mut self) {
        let Some(id) = self.channel else { return };
        while let Some(msg) = self.outbox.front() {
            let written = catch_unwind(AssertUnwindSafe(|| {
                self.rtc
                    .channel(id)
                    .map(|mut ch| ch.write(false, msg.as_bytes()))
            }));
            match written {
                Ok(Some(Ok(_))) => {
                    self.outbox.pop_front();
                }
                // Channel gone or its buffer full: keep the message for later.
                _ => return,
            }
        }
    }

    /// Bandwidth for each video track this session receives (bit/s): its
    /// estimate (600 kbit/s until there is one) less audio, shared equally.
    pub fn video_budget(&self, now: Instant) -> u64 {
        let mut estimate = self.estimate.unwrap_or(INITIAL_ESTIMATE_KBPS * 1000);
        if let Some(cap) = self.loss.cap(now) {
            estimate = estimate.min(cap);
        }
        let audio = self
            .tracks_out
            .iter()
            .filter(|t| t.kind == MediaKind::Audio)
            .count() as u64;
        let video = self
            .tracks_out
            .iter()
            .filter(|t| t.kind == MediaKind::Video)
            .count()
            .max(1) as u64;
        estimate.saturating_sub(audio * super::core::AUDIO_BUDGET) / video
    }

    /// Whether the link carried the minimum rate asked of the estimator
    /// (padding included) over the last [`CARRIED_OVER`] with little loss:
    /// what a step up waits for. Without TWCC (a peer that reports REMB
    /// only) str0m neither estimates nor pads: nothing to wait for.
    ///
    /// [`CARRIED_OVER`]: super::layers::CARRIED_OVER
    pub fn carried(&self, now: Instant) -> bool {
        use super::layers::{CARRIED_OVER, CARRIED_SHARE, KEEP_LOSS};
        let (asked, since) = self.asked_minimum;
        if !self.twcc {
            return true;
        }
        now.saturating_duration_since(since) >= CARRIED_OVER
            && self.loss.window_loss() <= KEEP_LOSS
            && self
                .loss
                .sent_rate()
                .is_some_and(|r| r as f64 >= CARRIED_SHARE * asked as f64)
    }

    /// A new bandwidth estimate (bit/s) for what we send to this peer.
    pub fn set_estimate(&mut self, now: Instant, bps: u64) {
        if self.estimate != Some(bps) {
            self.estimate = Some(bps);
            self.estimate_since = now;
        }
    }

    /// Tell the bandwidth estimator what this session's video asks for: the
    /// sum over its tracks of [`TrackOut::bwe_want`], plus audio. Sustaining
    /// with padding the rate of the layer a step up goes to keeps the acked
    /// bitrate near it, so one probe that overshoots does not drop the
    /// estimate to a fraction of what the link carries (the estimator falls
    /// back to the acked rate on overuse).
    pub fn apply_bwe_want(&mut self, now: Instant) {
        let (mut minimum, mut desired) = (0u64, 0u64);
        for t in &self.tracks_out {
            match t.kind {
                MediaKind::Audio => {
                    minimum += super::core::AUDIO_BUDGET;
                    desired += super::core::AUDIO_BUDGET;
                }
                MediaKind::Video => {
                    minimum += t.bwe_want.0;
                    desired += t.bwe_want.1;
                }
            }
        }
        let desired = desired.max(minimum);
        // A probe starts (the desired rate jumps) while the estimate is stuck
        // well below it and the link loses nothing now: restart the
        // estimator from its estimate, so it sends its initial probes (3x and
        // 6x). str0m probes for a raised desired rate only while it is
        // delay-limited; after a loss event it can stay loss-limited, and the
        // estimate then creeps up by a few kbit/s a second (measured: no way
        // back to f within 20 s in 2 of 6 runs of layer_sweep without this;
        // in Chromium on a shaped link the estimate sat at 560 kbit/s for
        // 25 s below an f of 1 Mbit/s while the restart waited for 2x).
        // Also when the gap is small but the estimate has not moved for
        // ESTIMATE_STUCK: str0m's loss-based estimator can hold it with no
        // loss at all, and blocks its own probes meanwhile. Only with TWCC:
        // a peer that reports REMB alone has no estimator of ours to restart.
        let est = self.estimate.unwrap_or(0);
        let stuck =
            now.saturating_duration_since(self.estimate_since) >= super::layers::ESTIMATE_STUCK;
        let restart = self.twcc
            && desired > self.asked_desired.saturating_mul(5) / 4
            && est > 0
            && (desired > est.saturating_mul(3) / 2 || (stuck && desired > est))
            && self.loss.cap(now).is_none()
            && self.loss.window_loss() < 0.02;
        if restart {
            self.rtc.bwe().reset(str0m::bwe::Bitrate::bps(est));
        }
        tracing::debug!(parent: &self.span, minimum, desired, estimate = est, stuck, restart, "bwe want");
        self.asked_desired = desired;
        // A higher minimum must be carried for a while before it counts; a
        // lower one is carried by what carried the higher.
        if minimum > self.asked_minimum.0 {
            self.asked_minimum = (minimum, now);
        } else {
            self.asked_minimum.0 = minimum;
        }
        self.rtc.bwe().set_bitrate(
            str0m::bwe::Bitrate::bps(minimum),
            str0m::bwe::Bitrate::bps(desired),
        );
    }

    /// The mid on which this session receives `track`, if it flows.
    pub fn open_mid_for(&self, track: TrackId) -> Option<Mid> {
        self.tracks_out.iter().find_map(|t| match t.state {
            OutState::Open(m) if t.track == track => Some(m),
            _ => None,
        })
    }

    /// The published track behind one of our send m-lines.
    pub fn track_on_mid(&self, mid: Mid) -> Option<TrackId> {
        self.tracks_out.iter().find_map(|t| match t.state {
            OutState::Open(m) | OutState::Negotiating(m) if m == mid => Some(t.track),
            _ => None,
        })
    }
}

/// Why a session could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupError {
    /// The offer cannot be answered (the reason from str0m).
    Offer(String),
    /// A host candidate address is unusable.
    Candidate(String),
    /// No DTLS certificate could be generated.
    Certificate,
}

/// What every session of a node is built with.
#[derive(Clone)]
pub struct SessionSetup {
    /// The DTLS certificate shared by every session (generating one per
    /// session would cost more than the rest of the setup).
    pub cert: DtlsCert,
    /// Packets of outgoing video kept for retransmission (str0m's default is 1000).
    pub send_buffer_video: usize,
    /// Estimate the bandwidth towards each peer (TWCC), for adaptive layers.
    pub bwe: bool,
}

impl SessionSetup {
    /// A fresh certificate, the given buffer size, and bandwidth estimation on or off.
    pub fn new(send_buffer_video: usize, bwe: bool) -> Result<SessionSetup, SetupError> {
        let cert = str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
            .ok_or(SetupError::Certificate)?;
        Ok(SessionSetup {
            cert,
            send_buffer_video,
            bwe,
        })
    }
}

/// How often str0m reports a session's statistics; the TWCC loss over the
/// last second comes with them.
pub const STATS_INTERVAL: Duration = Duration::from_millis(100);
/// The bandwidth estimate a session starts from.
pub const INITIAL_ESTIMATE_KBPS: u64 = 600;

/// Build a session's `Rtc` (ICE lite, the shared DTLS certificate, Opus, VP8
/// and H.264 only) with host candidates at `candidates`, and answer the offer.
/// Returns the `Rtc`, the answer and our ICE ufrag. This costs milliseconds of
/// CPU, so callers run it off the shard threads.
pub fn answer_offer(
    setup: &SessionSetup,
    candidates: &[SocketAddr],
    offer: SdpOffer,
    now: Instant,
) -> Result<(Rtc, SdpAnswer, String), SetupError> {
    let creds = IceCreds::new();
    let ufrag = creds.ufrag.clone();
    let mut config = RtcConfig::new();
    if setup.bwe {
        config = config
            .enable_bwe(Some(str0m::bwe::Bitrate::kbps(INITIAL_ESTIMATE_KBPS)))
            .set_stats_interval(Some(STATS_INTERVAL));
    }
    let mut rtc = config
        .set_ice_lite(true)
        .set_dtls_cert(setup.cert.clone())
        // DTLS configured once per process, not per session (balie-dtls).
        .set_crypto_provider(balie_dtls::provider())
        .set_send_buffer_video(setup.send_buffer_video.max(64))
        .set_local_ice_credentials(creds)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .enable_h264(true)
        .build(now);
    for addr in candidates {
        let c = Candidate::host(*addr, "udp").map_err(|e| SetupError::Candidate(e.to_string()))?;
        rtc.add_local_candidate(c);
    }
    let answer = catch_unwind(AssertUnwindSafe(|| rtc.sdp_api().accept_offer(offer)))
        .map_err(|_| SetupError::Offer("the offer made the WebRTC stack fail".into()))?
        .map_err(|e| SetupError::Offer(e.to_string()))?;
    Ok((rtc, answer, ufrag))
}

/// str0m panicked inside a session.
#[derive(Debug)]
pub struct Panicked;
