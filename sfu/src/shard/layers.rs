//! Simulcast layer choice, per subscriber and published video track.
//!
//! Pure state machines (no str0m, no clock of their own), so they are tested
//! on their own:
//!
//! - [`PublisherLayers`] measures what a simulcast publisher sends right now:
//!   each layer's bitrate over the last second, and which layers are paused.
//! - [`LayerChoice`] decides which layer one subscriber should get from its
//!   bandwidth budget: down at once when the budget drops below [`KEEP`] of
//!   the current layer's bitrate (to the highest layer that fits whole), up
//!   one layer at a time (when the next fits with [`HEADROOM`]) only after
//!   the budget has held for [`UP_HOLD`], and
//!   after a failed attempt to go up (down again within [`UP_FAIL`]) the next
//!   attempt waits twice as long, up to [`MAX_BACKOFF`].
//! - The switch itself waits for a keyframe on the target layer (the caller
//!   asks the publisher for one), so the subscriber's decoder never sees a
//!   frame it cannot decode.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use str0m::media::Rid;

/// A layer not seen for this long counts as paused.
pub const PAUSED_AFTER: Duration = Duration::from_millis(1000);
/// The budget must exceed the next layer's bitrate for this long before going up.
pub const UP_HOLD: Duration = Duration::from_secs(2);
/// Going down this soon after going up counts as a failed attempt.
pub const UP_FAIL: Duration = Duration::from_secs(5);
/// The longest wait before trying to go up again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Headroom: a layer fits when its bitrate times this is within the budget.
pub const HEADROOM: f64 = 1.15;
/// A layer being forwarded is kept while the budget is at least this share
/// of its bitrate. On overuse str0m's estimator falls to 0.85 times the acked
/// rate, and the acked rate is the layer plus audio and gaps: with the layer
/// kept only while it fits the budget whole, each backoff of the estimator
/// moved the subscriber a layer down, and climbing back took 5-10 s (in
/// Chromium on a link shaped between h and f, the browser test failed three
/// of six runs). A link that truly carries less than this share shows
/// it as loss: the share applies only while the peer lost at most
/// [`KEEP_LOSS`] over the last second.
pub const KEEP: f64 = 0.7;
/// The most loss (TWCC, over the last second) at which [`KEEP`] applies:
/// above it a layer is kept only while it fits the budget whole. (On a link
/// that carries 5% less than is sent the estimate settles near the link's
/// rate, above `KEEP` of the layer, and only the loss says it does not fit.)
pub const KEEP_LOSS: f32 = 0.05;
/// After padding up to the rate of the layer a step up would go to, how
/// long a fall of the
/// estimate below the current layer is blamed on the padding rather than the
/// link: the layer is kept, and the attempt counts as a failed step up.
/// A probe that passes a token-bucket shaper's burst (tc's `tbf burst`, a
/// cellular policer) at its own rate reports several times what the link
/// carries; padding up to a higher layer on that estimate overshoots the
/// link, and the estimator, on the delay and loss it caused, falls to a
/// fraction of the link a second or two after the padding stopped (in
/// Chromium behind a 691 kbit/s tbf: 1,135 kbit/s after a probe, 262
/// kbit/s 2 s after the padding, h (384 kbit/s) dropped to q). A link that
/// truly fell at that moment keeps a layer too high for at most this long.
pub const PAD_GRACE: Duration = Duration::from_secs(3);
/// A step up waits until the link carried the padding for it: over this
/// long, at least [`CARRIED_SHARE`] of the rate asked was sent (str0m sends
/// no padding while its delay detector reports overuse) and the peer lost at
/// most [`KEEP_LOSS`]. The estimate alone is not enough: behind a token
/// bucket a probe reads several times the link, and padding on a link that
/// cannot carry it was throttled by str0m while the estimate stayed up (in
/// Chromium behind a 683 kbit/s `tbf`: 820 kbit/s of padding asked, the
/// estimate above 1 Mbit/s for the whole 2 s hold, then f, 19% loss, q).
pub const CARRIED_OVER: Duration = Duration::from_secs(1);
/// See [`CARRIED_OVER`].
pub const CARRIED_SHARE: f64 = 0.85;
/// How long a probe for the top layer's rate is asked for.
pub const PROBE_FOR: Duration = Duration::from_millis(1000);
/// How long after a switch down for lack of bandwidth its layer's keyframe
/// is still asked for (every `SWITCH_REASK`, 350 ms). Asked for only until
/// the switch took its keyframe, the subscriber behind a link just capped to
/// 300 kbit/s showed q after 3.1 and 3.2 s in one browser run of six (the
/// others 0.8-1.8 s).
pub const SWITCH_SETTLE: Duration = Duration::from_millis(1000);
/// The longest wait between two probes (see [`LayerChoice::bwe_want`]):
/// the failure backoff spaces the steps up, not the probes. Without padding
/// a lower layer's estimate climbs only to 1.5 times its acked rate, so the
/// way up after a link recovers starts with a probe (in the simulator, after
/// a 300 kbit/s cap was lifted, the probe came 4-5 s later with the backoff
/// at 4 s, and f after over 10 s).
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// An estimate that has not moved for this long while a probe asks for
/// more than it is stuck: the next probe restarts the estimator (see
/// `Session::apply_bwe_want`). str0m's loss-based estimator can enter its
/// decreasing state on a clean link (its estimate a little under the
/// delay-based one) and hold there, up to 60 s, while it blocks every probe:
/// in the simulator with Chromium's layer rates, 3 of 119 lifted caps left
/// the subscriber on h at 714-743 kbit/s for 30 s (CI's shaped-link test
/// once sat at 815 kbit/s for 25 s below an f that needed 870).
pub const ESTIMATE_STUCK: Duration = Duration::from_secs(4);
/// A layer's bitrate with [`HEADROOM`].
pub fn with_headroom(bitrate: u64) -> u64 {
    (bitrate as f64 * HEADROOM) as u64
}

/// Where in `active` (lowest first) the highest layer that fits `budget`
/// with [`HEADROOM`] stands: where a start goes.
fn highest_with_headroom(active: &[(Rid, u64)], budget: u64) -> Option<usize> {
    active
        .iter()
        .rposition(|(_, b)| with_headroom(*b) <= budget)
}

/// Where a step up from `cur` goes when `budget` allows one: the next layer,
/// never two at once. Behind a token bucket a probe reads several times the
/// link, and two steps on that reading (padding for f from q) overshot the
/// link every time: the estimate fell below h and the subscriber stayed on
/// q for good (Chromium behind a 675 kbit/s `tbf`, CI, 30 s without h). One
/// step is padded and tested at a time, as LiveKit's allocator probes for
/// the next layer; on an open link q to f takes two holds.
fn step_up(active: &[(Rid, u64)], budget: u64, cur: usize) -> Option<usize> {
    highest_with_headroom(active, budget)
        .filter(|i| *i > cur)
        .map(|_| cur + 1)
}

/// Measurement window of layer bitrates.
const WINDOW: Duration = Duration::from_millis(500);
/// How long layers are seen before [`PublisherLayers::first_guess`].
const FIRST_GUESS: Duration = Duration::from_millis(100);

/// One layer of a publisher, as measured.
#[derive(Debug, Clone)]
struct Layer {
    rid: Rid,
    bytes: u64,
    window_start: Instant,
    /// Bits per second over the last complete window (smoothed).
    bitrate: u64,
    last_seen: Instant,
    /// Left out of [`PublisherLayers::active`] until its next frame (its
    /// source stopped: a transcoder worker was lost); the bitrate is kept,
    /// so the layer counts again from its first frame.
    suspended: bool,
}

/// What a simulcast publisher sends right now.
#[derive(Debug, Clone, Default)]
pub struct PublisherLayers {
    layers: Vec<Layer>,
}

impl PublisherLayers {
    /// A frame of `len` bytes arrived on layer `rid`.
    pub fn on_frame(&mut self, rid: Rid, len: usize, now: Instant) {
        let layer = match self.layers.iter_mut().position(|l| l.rid == rid) {
            Some(i) => &mut self.layers[i],
            None => {
                self.layers.push(Layer {
                    rid,
                    bytes: 0,
                    window_start: now,
                    bitrate: 0,
                    last_seen: now,
                    suspended: false,
                });
                // Just pushed.
                let last = self.layers.len() - 1;
                &mut self.layers[last]
            }
        };
        layer.bytes += len as u64;
        layer.last_seen = now;
        layer.suspended = false;
        let elapsed = now.saturating_duration_since(layer.window_start);
        if elapsed >= WINDOW {
            let rate = (layer.bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            // Smoothed over about four windows: a keyframe (a switch asks
            // for one) lifts one window by half, which must not read as the
            // layer getting dearer and send a subscriber straight back down.
            layer.bitrate = if layer.bitrate == 0 {
                rate
            } else {
                (layer.bitrate * 3 + rate) / 4
            };
            layer.bytes = 0;
            layer.window_start = now;
        }
    }

    /// Before any layer is measured: the layer that has brought the fewest
    /// bytes so far (likely the lowest), once it has been seen for
    /// [`FIRST_GUESS`]; a new subscriber starts on it rather than waiting
    /// a whole window for its first picture.
    pub fn first_guess(&self, now: Instant) -> Option<Rid> {
        if self.layers.iter().any(|l| l.bitrate > 0) {
            return None;
        }
        self.layers
            .iter()
            .filter(|l| now.saturating_duration_since(l.window_start) >= FIRST_GUESS)
            .min_by_key(|l| l.bytes)
            .map(|l| l.rid)
    }

    /// Leave layer `rid` out of [`PublisherLayers::active`] until its next
    /// frame.
    pub fn suspend(&mut self, rid: Rid) {
        if let Some(l) = self.layers.iter_mut().find(|l| l.rid == rid) {
            l.suspended = true;
        }
    }

    /// Forget layer `rid` (it will not come back, or starts afresh).
    pub fn forget(&mut self, rid: Rid) {
        self.layers.retain(|l| l.rid != rid);
    }

    /// Active layers (seen within [`PAUSED_AFTER`], measured and not
    /// suspended), lowest bitrate first, with their bitrates.
    pub fn active(&self, now: Instant) -> Vec<(Rid, u64)> {
        let mut v: Vec<(Rid, u64)> = self
            .layers
            .iter()
            .filter(|l| {
                !l.suspended
                    && now.saturating_duration_since(l.last_seen) < PAUSED_AFTER
                    && l.bitrate > 0
            })
            .map(|l| (l.rid, l.bitrate))
            .collect();
        v.sort_by_key(|(_, b)| *b);
        v
    }
}

/// The layers worth sending to a display `height` pixels tall (`None`:
/// unknown, all of them). Frame mode does not see resolutions, so the top
/// layer is taken as 720 lines and each lower one as half the next (the
/// browsers' default simulcast ladder); layers up to the first one at least
/// as tall as the display are kept.
pub fn cap_for_display(active: &[(Rid, u64)], height: Option<u32>) -> &[(Rid, u64)] {
    let n = active.len();
    cap_for_display_by(active, height, |i, _| 720u32 >> (n - 1 - i).min(31))
}

/// As [`cap_for_display`], with each layer's height given by `lines(index,
/// rid)` (known for the layers a transcoder worker makes).
pub fn cap_for_display_by(
    active: &[(Rid, u64)],
    height: Option<u32>,
    lines: impl Fn(usize, Rid) -> u32,
) -> &[(Rid, u64)] {
    let Some(h) = height else { return active };
    for (i, (rid, _)) in active.iter().enumerate() {
        if lines(i, *rid) >= h {
            return &active[..=i];
        }
    }
    active
}

/// Whether a track's request to the bandwidth estimator changed enough to
/// pass on: by a quarter or more, or to or from nothing. Measured layer
/// bitrates wobble from frame to frame; passing every wobble on would raise
/// the desired rate over and over, and each raise above the estimate asks
/// str0m for a probe, even while the link is congested.
pub fn want_changed(old: (u64, u64), new: (u64, u64)) -> bool {
    let far =
        |a: u64, b: u64| (a == 0) != (b == 0) || a.abs_diff(b) as f64 > 0.25 * a.max(b) as f64;
    far(old.0, new.0) || far(old.1, new.1)
}

/// Loss in the one-second window above this (GCC's threshold for
/// decreasing) makes the watch look at the newest loss.
pub const LOSS_WINDOW_DOWN: f32 = 0.10;
/// Loss in the newest stats interval above this caps the budget at what got
/// through.
pub const LOSS_RECENT_DOWN: f32 = 0.25;
/// How long one loss measurement caps the budget.
pub const LOSS_CAP_FOR: Duration = Duration::from_millis(1000);

/// Watches the loss a subscriber reports (TWCC, over the last second, with
/// each stats event) and caps its budget at what got through when the link
/// suddenly carries much less than is sent. The delay-based estimate falls
/// too, but on a deep queue it takes seconds (its acked-rate estimator
/// adapts slowly); loss shows within a few hundred milliseconds.
///
/// The one-second window lags: 200 ms after a link drops to a fifth, it
/// shows 16% loss while the newest 100 ms lost 80%. The loss of the newest
/// interval is estimated from how much the window's loss grew since the last
/// event (scaled by window / interval). Both must be high: the window above
/// [`LOSS_WINDOW_DOWN`] and the newest interval above [`LOSS_RECENT_DOWN`],
/// so one burst of random loss on a mobile link does not cap it.
#[derive(Debug, Clone, Default)]
pub struct LossWatch {
    last: Option<(u64, f32, Instant)>,
    cap: Option<(u64, Instant)>,
    /// Bytes sent so far at each stats event of the last [`CARRIED_OVER`]
    /// and a little more, oldest first.
    sent: VecDeque<(Instant, u64)>,
}

impl LossWatch {
    /// A stats event: `sent` bytes sent to the peer so far, `loss` the TWCC
    /// loss over the last second. Returns whether this capped the budget.
    pub fn on_stats(&mut self, now: Instant, sent: u64, loss: Option<f32>) -> bool {
        self.sent.push_back((now, sent));
        while self.sent.len() > 2 && self.sent[1].0 + CARRIED_OVER <= now {
            self.sent.pop_front();
        }
        let last = self.last.replace((sent, loss.unwrap_or(0.0), now));
        let (Some(loss), Some((sent0, loss0, at))) = (loss, last) else {
            return false;
        };
        let secs = now.saturating_duration_since(at).as_secs_f64();
        if secs < 0.02 || loss <= LOSS_WINDOW_DOWN {
            return false;
        }
        let rate = sent.saturating_sub(sent0) as f64 * 8.0 / secs;
        let recent = (f64::from(loss - loss0) / secs.min(1.0))
            .max(f64::from(loss))
            .min(1.0);
        if recent <= f64::from(LOSS_RECENT_DOWN) {
            return false;
        }
        self.cap = Some(((rate * (1.0 - recent)) as u64, now));
        true
    }

    /// The loss over the last second, as last reported (0 before any report).
    pub fn window_loss(&self) -> f32 {
        self.last.map_or(0.0, |(_, loss, _)| loss)
    }

    /// What was sent to the peer (bit/s, media and padding) over the last
    /// [`CARRIED_OVER`] of stats events; None before that long was seen.
    pub fn sent_rate(&self) -> Option<u64> {
        let (&(t0, b0), &(t1, b1)) = (self.sent.front()?, self.sent.back()?);
        let secs = t1.saturating_duration_since(t0);
        (secs >= CARRIED_OVER)
            .then(|| (b1.saturating_sub(b0) as f64 * 8.0 / secs.as_secs_f64()) as u64)
    }

    /// The cap on the budget now, if a recent measurement set one.
    pub fn cap(&self, now: Instant) -> Option<u64> {
        self.cap
            .filter(|(_, at)| now.saturating_duration_since(*at) < LOSS_CAP_FOR)
            .map(|(c, _)| c)
    }
}

/// Why a subscriber's layer changes (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The bandwidth estimate.
    Bandwidth,
    /// The current layer stopped (the publisher paused it).
    Paused,
    /// The first layer of a new subscription.
    Start,
}

impl Cause {
    /// Label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Bandwidth => "bandwidth",
            Cause::Paused => "paused",
            Cause::Start => "start",
        }
    }
}

/// One subscriber's layer state for one published video track.
#[derive(Debug, Clone)]
pub struct LayerChoice {
    /// The layer being forwarded.
    pub current: Option<Rid>,
    /// The layer wanted; forwarded from its next keyframe on.
    pub target: Option<Rid>,
    /// Why the target was chosen.
    pub cause: Cause,
    above_since: Option<Instant>,
    up_blocked_until: Option<Instant>,
    backoff: Duration,
    last_up: Option<Instant>,
    /// While probing: until when the top layer's rate is asked for.
    probe_until: Option<Instant>,
    /// When to probe next.
    next_probe: Option<Instant>,
    /// Going down for lack of bandwidth: the current layer is no longer
    /// forwarded while waiting for the lower layer's keyframe (a short
    /// freeze beats queueing a layer the link cannot carry).
    draining: bool,
    /// Started on a first guess before any layer was measured: the first
    /// real decision is a start, not a step.
    provisional: bool,
    /// Padding above the current layer was last asked for: until this
    /// instant ([`PAD_GRACE`] later) a fall of the estimate is the padding's.
    padded_until: Option<Instant>,
    /// The last switch went down for lack of bandwidth (see
    /// [`Self::settle_after_switch`]).
    switched_down: bool,
    /// Until then a switch down that is done still asks for keyframes.
    settle_until: Option<Instant>,
    /// The last switch down for lack of bandwidth: for [`PROBE_EVERY`]
    /// after it the link is not tested (no probe, no padding above the
    /// layer).
    fell_at: Option<Instant>,
}

impl Default for LayerChoice {
    fn default() -> Self {
        LayerChoice {
            current: None,
            target: None,
            cause: Cause::Start,
            above_since: None,
            up_blocked_until: None,
            backoff: UP_HOLD,
            last_up: None,
            probe_until: None,
            next_probe: None,
            draining: false,
            provisional: false,
            padded_until: None,
            switched_down: false,
            settle_until: None,
            fell_at: None,
        }
    }
}

impl LayerChoice {
    /// Decide the target layer from `budget` (bits/s for this track) and the
    /// publisher's `active` layers (lowest first). Returns the new target when
    /// it changed: the caller asks the publisher for a keyframe on it.
    pub fn decide(&mut self, now: Instant, budget: u64, active: &[(Rid, u64)]) -> Option<Rid> {
        self.decide_with_loss(now, budget, 0.0, true, active)
    }

    /// [`Self::decide`], given the loss the subscriber reported over the
    /// last second (above [`KEEP_LOSS`] a layer is kept only while it fits)
    /// and whether the link `carried` the padding asked for (a step up waits
    /// for it; see [`CARRIED_OVER`]).
    pub fn decide_with_loss(
        &mut self,
        now: Instant,
        budget: u64,
        loss: f32,
        carried: bool,
        active: &[(Rid, u64)],
    ) -> Option<Rid> {
        if active.is_empty() {
            return None;
        }
        let provisional = std::mem::take(&mut self.provisional);
        // Hysteresis: a layer is kept while KEEP of it fits the budget, the
        // way down goes to the highest layer that fits whole, and the next
        // one up is only taken with HEADROOM to spare.
        let fit = active.iter().rposition(|(_, b)| *b <= budget).unwrap_or(0);
        let keep = if loss <= KEEP_LOSS { KEEP } else { 1.0 };
        let holds = |i: usize| active[i].1 as f64 * keep <= budget as f64;
        let start = highest_with_headroom(active, budget).unwrap_or(0);
        let wanted = self.target.or(self.current);
        let cur = if provisional {
            None
        } else {
            self.wanted_index(active)
        };
        let next = match cur {
            // Start (or the current layer paused): whatever fits now.
            None => {
                self.cause = if wanted.is_some() && !provisional {
                    Cause::Paused
                } else {
                    Cause::Start
                };
                self.above_since = None;
                start
            }
            Some(c) if fit < c && !holds(c) && self.padded_until.is_some_and(|t| now < t) => {
                // Our own padding overshot the link: keep the layer, and
                // count a failed step up (no padding until the backoff ends).
                if self.up_blocked_until.is_none_or(|t| t <= now) {
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.up_blocked_until = Some(now + self.backoff);
                }
                self.above_since = None;
                c
            }
            Some(c) if fit < c && !holds(c) => {
                // Down at once. Going down soon after going up: the step
                // failed, back off. A link that drops just after a step up
                // looks the same from here, and backing off is right then
                // too (counting only drops back to where it came from let
                // it flap between h and f on a link between the two).
                if self
                    .last_up
                    .is_some_and(|t| now.saturating_duration_since(t) < UP_FAIL)
                {
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.up_blocked_until = Some(now + self.backoff);
                }
                self.last_up = None;
                self.above_since = None;
                self.cause = Cause::Bandwidth;
                self.draining = true;
                // No probe into a link that just fell short: the next one
                // waits as after a probe. (Coming down from the top layer,
                // where nothing is probed, one was due at once: its burst
                // went into the queue that was already losing, with the
                // lower layer's keyframe behind it.) No padding either,
                // see `bwe_want`.
                self.probe_until = None;
                self.next_probe = Some(now + self.backoff.min(PROBE_EVERY));
                self.fell_at = Some(now);
                fit
            }
            Some(c) if step_up(active, budget, c).is_some() => {
                // Up one step, once the budget has held and no backoff runs.
                let since = *self.above_since.get_or_insert(now);
                let blocked = self.up_blocked_until.is_some_and(|t| now < t);
                if now.saturating_duration_since(since) >= UP_HOLD && !blocked && carried {
                    self.above_since = None;
                    self.last_up = Some(now);
                    // From here the link carries the step itself: a fall is
                    // the link's, and down goes at once again.
                    self.padded_until = None;
                    self.cause = Cause::Bandwidth;
                    c + 1
                } else {
                    c
                }
            }
            Some(c) => {
                self.above_since = None;
                // A layer that held for a while resets the backoff.
                if self
                    .last_up
                    .is_some_and(|t| now.saturating_duration_since(t) > MAX_BACKOFF)
                {
                    self.backoff = UP_HOLD;
                }
                c
            }
        };
        let rid = active[next].0;
        if Some(rid) == wanted {
            return None;
        }
        if next >= cur.unwrap_or(0) {
            self.draining = false;
        }
        self.target = Some(rid);
        Some(rid)
    }

    /// Start on `rid` before anything is measured (see
    /// [`PublisherLayers::first_guess`]); the first decision on measured
    /// layers then starts afresh. Returns whether it started.
    pub fn start_on_guess(&mut self, rid: Rid) -> bool {
        if self.target.is_some() || self.current.is_some() {
            return false;
        }
        self.target = Some(rid);
        self.cause = Cause::Start;
        self.provisional = true;
        true
    }

    /// Whether to ask the publisher for a keyframe of the target again: a
    /// switch waits for it (the target stays set once it is reached), or a
    /// switch down finished less than [`SWITCH_SETTLE`] ago.
    pub fn switching(&self, now: Instant) -> bool {
        (self.target.is_some() && self.target != self.current)
            || self.settle_until.is_some_and(|t| now < t)
    }

    /// A switch just took its keyframe (`admit_frame` said so): a switch
    /// down for lack of bandwidth goes on asking for keyframes for
    /// [`SWITCH_SETTLE`]. It happens on a link that is losing: its keyframe
    /// goes into a full queue, and when it is lost the subscriber shows
    /// nothing new until another comes.
    pub fn settle_after_switch(&mut self, now: Instant) {
        self.settle_until = self.switched_down.then_some(now + SWITCH_SETTLE);
    }

    /// A frame on `rid` arrived; `keyframe` if it is one. Returns whether to
    /// forward it, and whether this frame switched layers.
    pub fn admit_frame(&mut self, rid: Rid, keyframe: bool) -> (bool, bool) {
        if self.target == Some(rid) && self.current != Some(rid) {
            if keyframe {
                self.current = Some(rid);
                self.switched_down = self.draining;
                self.draining = false;
                return (true, true);
            }
            return (false, false);
        }
        // Until the target's keyframe the current layer goes on, unless the
        // link cannot carry it.
        let pass = self.current == Some(rid) && !(self.draining && self.target != self.current);
        (pass, false)
    }

    /// Where the layer being switched to, else the one forwarded, stands in
    /// `active`.
    fn wanted_index(&self, active: &[(Rid, u64)]) -> Option<usize> {
        let wanted = self.target.or(self.current)?;
        active.iter().position(|(rid, _)| *rid == wanted)
    }

    /// What to ask of the bandwidth estimator for this track (bit/s): the
    /// rate to sustain (str0m pads up to it, never above its estimate) and
    /// the rate to probe for. Sustaining keeps the acked bitrate up: on
    /// overuse the estimator falls to 0.85 times the acked rate, so a
    /// subscriber whose keyframes and quiet frames left gaps would fall below
    /// its own layer after one probe that overshot. While the budget already
    /// allows a step up (the hold before it) the rate of the layer the step
    /// goes to is sustained, and [`PAD_GRACE`] starts; otherwise the layer
    /// forwarded now, except on the top layer, where no probe runs and
    /// nothing is sustained (str0m padded every gap between frames up to the
    /// layer's rate: in balie-bench a fifth of the datagrams a subscriber
    /// got). The rate to probe for is the top layer's for [`PROBE_FOR`]
    /// every backoff period, at most [`PROBE_EVERY`] apart, else the current
    /// layer's.
    pub fn bwe_want(&mut self, now: Instant, budget: u64, active: &[(Rid, u64)]) -> (u64, u64) {
        let Some(cur) = self.wanted_index(active) else {
            return (0, 0);
        };
        let current = active[cur].1;
        let blocked = self.up_blocked_until.is_some_and(|t| now < t);
        let Some(&(_, next)) = active.get(cur + 1) else {
            // On the top layer: nothing to probe for, and no padding: what
            // the sustained rate guards against is a probe that overshoots.
            return (0, with_headroom(current));
        };
        // The layer a step up would go to (the next one, see [`step_up`]):
        // the padding sustains its rate, so the hold before the step tests
        // the link at what the step will send.
        let step = step_up(active, budget, cur);
        // Just after a switch down the budget can read room for a step for
        // a moment (a loss cap ran out while the delay-based estimate had
        // not fallen yet): padding then went into the losing queue too.
        let fell = self.fell_at.is_some_and(|t| now < t + PROBE_EVERY);
        let sustain = match step {
            Some(i) if !blocked && !fell => {
                self.padded_until = Some(now + PAD_GRACE);
                with_headroom(active[i].1)
            }
            _ => current,
        };
        // Probe: ask for the top layer's rate for PROBE_FOR, every backoff
        // period, at most PROBE_EVERY apart. Raising the desired rate above
        // the estimate is what makes str0m send a probe; a link that is busy
        // with the current layer (not application limited) gets no other
        // probe for 15 s.
        if self.probe_until.is_some_and(|t| now >= t) {
            self.probe_until = None;
            self.next_probe = Some(now + self.backoff.min(PROBE_EVERY));
        }
        if !blocked && self.probe_until.is_none() && self.next_probe.is_none_or(|t| now >= t) {
            self.probe_until = Some(now + PROBE_FOR);
        }
        let desired = if self.probe_until.is_some() {
            active.last().map_or(next, |(_, b)| *b)
        } else {
            current
        };
        (sustain, with_headroom(desired).max(sustain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A choice that started on q (a budget of 200 kbit/s at `t0`).
    fn on_q(t0: Instant, l: &[(Rid, u64)]) -> LayerChoice {
        let mut c = LayerChoice::default();
        c.decide(t0, 200_000, l);
        c.admit_frame(Rid::from("q"), true);
        c
    }

    fn layers() -> Vec<(Rid, u64)> {
        vec![
            (Rid::from("q"), 150_000),
            (Rid::from("h"), 500_000),
            (Rid::from("f"), 1_500_000),
        ]
    }

    /// A choice started at `t0` on a `budget` and forwarding `rid`.
    fn forwarding(t0: Instant, budget: u64, rid: &str) -> LayerChoice {
        let mut c = LayerChoice::default();
        c.decide(t0, budget, &layers());
        c.admit_frame(Rid::from(rid), true);
        assert_eq!(c.current, Some(Rid::from(rid)));
        c
    }

    #[test]
    fn starts_on_what_fits_and_goes_down_at_once() {
        let t0 = Instant::now();
        let mut c = LayerChoice::default();
        assert_eq!(c.decide(t0, 2_000_000, &layers()), Some(Rid::from("f")));
        assert_eq!(c.cause, Cause::Start);
        // Not forwarded until a keyframe on the target.
        assert_eq!(c.admit_frame(Rid::from("f"), false), (false, false));
        assert_eq!(c.admit_frame(Rid::from("f"), true), (true, true));
        assert_eq!(c.admit_frame(Rid::from("q"), true), (false, false));
        // The budget drops: down immediately.
        assert_eq!(
            c.decide(t0 + Duration::from_millis(100), 300_000, &layers()),
            Some(Rid::from("q"))
        );
        // Going down for bandwidth: f stops at once; q starts at its keyframe.
        assert_eq!(c.admit_frame(Rid::from("f"), false), (false, false));
        assert_eq!(c.admit_frame(Rid::from("q"), true), (true, true));
    }

    /// One backoff of the estimator (0.85 of the acked rate: the layer plus
    /// audio) leaves the layer where it is, unless the peer is losing; a
    /// budget under KEEP of it goes down to the highest layer that fits
    /// whole, not to one that only holds.
    #[test]
    fn one_backoff_of_the_estimator_keeps_the_layer() {
        let t0 = Instant::now();
        let mut c = forwarding(t0, 700_000, "h");
        let audio = crate::shard::core::AUDIO_BUDGET;
        let backoff = (0.85 * (500_000 + audio) as f64) as u64 - audio;
        assert!(backoff < 500_000);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(c.decide(t1, backoff, &layers()), None);
        assert_eq!(c.current, Some(Rid::from("h")));
        // The same budget with the peer losing 6%: h does not fit, down.
        let mut lossy = c.clone();
        assert_eq!(
            lossy.decide_with_loss(t1, backoff, 0.06, true, &layers()),
            Some(Rid::from("q"))
        );
        // Below KEEP of h (350 kbit/s): down, to q, which fits whole.
        assert_eq!(
            c.decide(t1 + Duration::from_millis(100), 340_000, &layers()),
            Some(Rid::from("q"))
        );
        // From f, a budget that h fits whole goes to h, one that holds h
        // but does not fit it goes to q.
        let mut c = forwarding(t0, 2_000_000, "f");
        assert_eq!(c.decide(t1, 1_000_000, &layers()), Some(Rid::from("h")));
        let mut c = forwarding(t0, 2_000_000, "f");
        assert_eq!(c.decide(t1, 400_000, &layers()), Some(Rid::from("q")));
    }

    #[test]
    fn goes_up_after_the_hold_and_backs_off_after_a_failure() {
        let t0 = Instant::now();
        let mut c = forwarding(t0, 200_000, "q");
        // Budget for h: nothing for UP_HOLD, then h.
        assert_eq!(
            c.decide(t0 + Duration::from_secs(1), 1_000_000, &layers()),
            None
        );
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(c.decide(t1, 1_000_000, &layers()), Some(Rid::from("h")));
        c.admit_frame(Rid::from("h"), true);
        // It fails within UP_FAIL: down, and the next attempt waits longer.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(c.decide(t2, 300_000, &layers()), Some(Rid::from("q")));
        c.admit_frame(Rid::from("q"), true);
        assert_eq!(
            c.decide(t2 + Duration::from_millis(10), 5_000_000, &layers()),
            None
        );
        // The hold alone (2 s) is not enough now: the backoff (4 s) rules.
        assert_eq!(
            c.decide(t2 + Duration::from_millis(2500), 5_000_000, &layers()),
            None
        );
        assert_eq!(
            c.decide(t2 + Duration::from_millis(4100), 5_000_000, &layers()),
            Some(Rid::from("h"))
        );
    }

    /// A probe that reads room for two steps still gives one: the next
    /// layer, held and padded on its own before the one above it.
    #[test]
    fn after_a_probe_it_goes_up_one_step_at_a_time() {
        let t0 = Instant::now();
        let l = layers();
        let mut c = on_q(t0, &l);
        assert_eq!(c.decide(t0 + Duration::from_secs(1), 5_000_000, &l), None);
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(c.decide(t1, 5_000_000, &l), Some(Rid::from("h")));
        c.admit_frame(Rid::from("h"), true);
        // On h the next hold and padding are for f.
        assert_eq!(
            c.bwe_want(t1, 5_000_000, &l).0,
            (1_500_000_f64 * HEADROOM) as u64
        );
        assert_eq!(
            c.decide(t1 + Duration::from_millis(100), 5_000_000, &l),
            None
        );
        assert_eq!(
            c.decide(t1 + Duration::from_millis(100) + UP_HOLD, 5_000_000, &l),
            Some(Rid::from("f"))
        );
    }

    #[test]
    fn asks_the_estimator_for_the_next_layer_and_probes_for_the_top() {
        let t0 = Instant::now();
        let l = layers();
        let mut c = on_q(t0, &l);
        // Budget below h: sustain q; the first call probes for f.
        let (sustain, desired) = c.bwe_want(t0, 200_000, &l);
        assert_eq!(sustain, 150_000);
        assert_eq!(desired, (1_500_000_f64 * HEADROOM) as u64);
        // After PROBE_FOR, no probe until the backoff period has passed.
        let t1 = t0 + PROBE_FOR;
        assert_eq!(
            c.bwe_want(t1, 200_000, &l).1,
            (150_000_f64 * HEADROOM) as u64
        );
        let t2 = t1 + UP_HOLD;
        assert_eq!(
            c.bwe_want(t2, 200_000, &l).1,
            (1_500_000_f64 * HEADROOM) as u64
        );
        // Budget for h: h is sustained while the hold runs.
        assert_eq!(
            c.bwe_want(t2, 700_000, &l).0,
            (500_000_f64 * HEADROOM) as u64
        );
        // On the top layer nothing is sustained and nothing probed for.
        let mut top = LayerChoice::default();
        top.decide(t0, 5_000_000, &l);
        top.admit_frame(Rid::from("f"), true);
        assert_eq!(
            top.bwe_want(t0, 5_000_000, &l),
            (0, (1_500_000_f64 * HEADROOM) as u64)
        );
        // Small changes are not passed on; big ones and to or from nothing are.
        assert!(!want_changed((100, 1000), (110, 1100)));
        assert!(want_changed((100, 1000), (100, 1500)));
        assert!(want_changed((0, 1000), (1, 1000)));
    }

    /// A switch asks for keyframes until it took one; a switch down for lack
    /// of bandwidth goes on for SWITCH_SETTLE after that, and no switch
    /// asks after.
    #[test]
    fn keyframes_are_asked_for_until_the_switch_settles() {
        let t0 = Instant::now();
        let l = layers();
        let mut c = LayerChoice::default();
        assert_eq!(c.decide(t0, 5_000_000, &l), Some(Rid::from("f")));
        assert!(c.switching(t0), "waiting for f's keyframe");
        assert_eq!(c.admit_frame(Rid::from("f"), true), (true, true));
        c.settle_after_switch(t0);
        assert!(!c.switching(t0), "a start is done with its keyframe");
        // Down for lack of bandwidth.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(c.decide(t1, 200_000, &l), Some(Rid::from("q")));
        assert!(c.switching(t1));
        assert_eq!(c.admit_frame(Rid::from("q"), true), (true, true));
        c.settle_after_switch(t1);
        assert!(c.switching(t1 + SWITCH_SETTLE - Duration::from_millis(1)));
        assert!(!c.switching(t1 + SWITCH_SETTLE));
        // Up again: done with its keyframe.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(c.decide(t2, 700_000, &l), None, "the hold first");
        assert_eq!(c.decide(t2 + UP_HOLD, 700_000, &l), Some(Rid::from("h")));
        assert_eq!(c.admit_frame(Rid::from("h"), true), (true, true));
        c.settle_after_switch(t2 + UP_HOLD);
        assert!(!c.switching(t2 + UP_HOLD));
    }

    /// Failed steps up space the next step up, doubling up to MAX_BACKOFF,
    /// but the probes go on every PROBE_FOR + PROBE_EVERY: they are how a
    /// lower layer finds out that the link recovered.
    #[test]
    fn probes_stay_frequent_while_steps_up_back_off() {
        let t0 = Instant::now();
        let l = layers();
        let mut c = on_q(t0, &l);
        c.backoff = MAX_BACKOFF;
        let probing = |c: &mut LayerChoice, t| c.bwe_want(t, 200_000, &l).1 > 1_000_000;
        assert!(probing(&mut c, t0));
        let mut t = t0;
        for _ in 0..3 {
            t += PROBE_FOR;
            assert!(!probing(&mut c, t), "a probe lasts PROBE_FOR");
            t += PROBE_EVERY - Duration::from_millis(1);
            assert!(!probing(&mut c, t));
            t += Duration::from_millis(1);
            assert!(probing(&mut c, t), "the next probe PROBE_EVERY later");
        }
    }

    /// A switch down for lack of bandwidth asks for no probe and no padding
    /// for PROBE_EVERY, and a probe that was running stops.
    #[test]
    fn no_probe_right_after_a_switch_down() {
        let t0 = Instant::now();
        let l = layers();
        let probing = |c: &mut LayerChoice, t, budget| c.bwe_want(t, budget, &l).1 > 1_000_000;
        // From the top layer (nothing probed there) down to q.
        let mut c = forwarding(t0, 2_000_000, "f");
        c.bwe_want(t0, 2_000_000, &l);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(c.decide(t1, 200_000, &l), Some(Rid::from("q")));
        assert!(!probing(&mut c, t1, 200_000));
        // Nor padding for h, though the budget reads room for it.
        let just_before = t1 + PROBE_EVERY - Duration::from_millis(1);
        assert_eq!(c.bwe_want(just_before, 700_000, &l).0, 150_000);
        assert!(!probing(&mut c, just_before, 200_000));
        assert!(probing(&mut c, t1 + PROBE_EVERY, 200_000));
        assert_eq!(
            c.bwe_want(t1 + PROBE_EVERY, 700_000, &l).0,
            with_headroom(500_000)
        );
        // From h while a probe runs: it stops.
        let mut c = forwarding(t0, 700_000, "h");
        assert!(probing(&mut c, t0, 700_000));
        let t2 = t0 + Duration::from_millis(300);
        assert_eq!(c.decide(t2, 200_000, &l), Some(Rid::from("q")));
        assert!(!probing(&mut c, t2, 200_000));
    }

    /// Padding tests the link at the rate of the step it is for: the next
    /// layer, even when the budget reads room for two. A fall of the budget
    /// while, or up to PAD_GRACE after, padding keeps the current layer and
    /// counts a failed step up; after the grace, or after the step itself,
    /// down goes at once.
    #[test]
    fn a_fall_that_the_padding_caused_keeps_the_layer() {
        let t0 = Instant::now();
        let l = layers();
        // On q, a probe read 5 Mbit/s: the padding is for h, the next
        // step, not f.
        let mut c = forwarding(t0, 200_000, "q");
        assert_eq!(
            c.bwe_want(t0, 5_000_000, &l).0,
            (500_000_f64 * HEADROOM) as u64
        );
        // On h the same; the padding overshoots and the estimate falls below
        // h: h is kept, and the next padding waits out a doubled backoff.
        let mut c = forwarding(t0, 700_000, "h");
        assert_eq!(
            c.bwe_want(t0, 5_000_000, &l).0,
            (1_500_000_f64 * HEADROOM) as u64
        );
        assert_eq!(c.decide(t0, 5_000_000, &l), None);
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(c.decide(t1, 200_000, &l), None);
        assert_eq!(c.current, Some(Rid::from("h")));
        assert_eq!(c.bwe_want(t1, 5_000_000, &l).0, 500_000);
        let t2 = t1 + Duration::from_millis(3500);
        assert_eq!(c.bwe_want(t2, 5_000_000, &l).0, 500_000, "blocked");
        // Once the backoff (4 s) is over: padding for f, then f.
        let t3 = t1 + Duration::from_millis(4100);
        assert_eq!(
            c.bwe_want(t3, 2_000_000, &l).0,
            (1_500_000_f64 * HEADROOM) as u64
        );
        assert_eq!(c.decide(t3, 2_000_000, &l), None);
        let t4 = t3 + UP_HOLD;
        assert_eq!(c.decide(t4, 2_000_000, &l), Some(Rid::from("f")));
        c.admit_frame(Rid::from("f"), true);
        // On f the link carries the step: a fall now is the link's.
        assert_eq!(
            c.decide(t4 + Duration::from_millis(100), 200_000, &l),
            Some(Rid::from("q"))
        );
        // PAD_GRACE after the last padding, a fall goes down at once too.
        let mut c = forwarding(t0, 700_000, "h");
        c.bwe_want(t0, 2_000_000, &l);
        let late = t0 + PAD_GRACE + Duration::from_millis(10);
        assert_eq!(c.decide(late, 200_000, &l), Some(Rid::from("q")));
    }

    /// A step up waits until the link carried the padding for it; the
    /// rate sent is measured over the stats events of the last second.
    #[test]
    fn a_step_up_waits_for_the_link_to_carry_the_padding() {
        let t0 = Instant::now();
        let l = layers();
        let mut c = forwarding(t0, 700_000, "h");
        assert_eq!(c.decide_with_loss(t0, 2_000_000, 0.0, false, &l), None);
        let t1 = t0 + UP_HOLD;
        assert_eq!(c.decide_with_loss(t1, 2_000_000, 0.0, false, &l), None);
        assert_eq!(
            c.decide_with_loss(t1 + Duration::from_millis(100), 2_000_000, 0.0, true, &l),
            Some(Rid::from("f"))
        );
        // 100 kB a second, in stats events every 100 ms.
        let mut w = LossWatch::default();
        assert_eq!(w.sent_rate(), None);
        for i in 0..=10u64 {
            w.on_stats(t0 + Duration::from_millis(100 * i), 10_000 * i, Some(0.0));
        }
        assert_eq!(w.sent_rate(), Some(800_000));
        // Only the last second counts: the rate halves, so does the measure.
        for i in 11..=20u64 {
            w.on_stats(
                t0 + Duration::from_millis(100 * i),
                100_000 + 5_000 * (i - 10),
                Some(0.0),
            );
        }
        assert_eq!(w.sent_rate(), Some(400_000));
    }

    #[test]
    fn a_sudden_loss_caps_the_budget_and_random_loss_does_not() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 2 Mbit/s sent (25,000 bytes per 100 ms); the link drops to a fifth.
        let mut w = LossWatch::default();
        assert!(!w.on_stats(ms(0), 0, Some(0.0)));
        assert!(!w.on_stats(ms(100), 25_000, Some(0.0)));
        assert!(!w.on_stats(ms(200), 50_000, Some(0.08)), "8% in the window");
        assert!(
            w.on_stats(ms(300), 75_000, Some(0.16)),
            "16%, rising by 8% per 100 ms"
        );
        let cap = w.cap(ms(300)).expect("capped");
        assert!((200_000..500_000).contains(&cap), "cap {cap}");
        assert_eq!(
            w.cap(ms(300) + LOSS_CAP_FOR),
            None,
            "a cap lasts LOSS_CAP_FOR"
        );
        // Steady 12% loss in the window that does not grow: random, no cap.
        let mut w = LossWatch::default();
        for i in 0..20u64 {
            assert!(!w.on_stats(ms(i * 100), i * 25_000, Some(0.12)));
        }
        // No TWCC loss figure: nothing.
        assert!(!LossWatch::default().on_stats(ms(0), 0, None));
    }

    #[test]
    fn the_display_size_caps_the_layer() {
        let l = layers();
        assert_eq!(cap_for_display(&l, None).len(), 3);
        assert_eq!(cap_for_display(&l, Some(120)).len(), 1);
        assert_eq!(cap_for_display(&l, Some(180)).len(), 1);
        assert_eq!(cap_for_display(&l, Some(181)).len(), 2);
        assert_eq!(cap_for_display(&l, Some(360)).len(), 2);
        assert_eq!(cap_for_display(&l, Some(1080)).len(), 3);
        assert_eq!(
            cap_for_display(&l[..2], Some(300)).len(),
            1,
            "two layers: 360 and 720"
        );
    }

    #[test]
    fn known_layer_heights_cap_the_layer() {
        let l = layers();
        // A 360-line source with its 180 and 90 line layers.
        let heights = |i: usize, _| [90, 180, 360][i];
        assert_eq!(cap_for_display_by(&l, Some(100), heights).len(), 2);
        assert_eq!(cap_for_display_by(&l, Some(90), heights).len(), 1);
        assert_eq!(cap_for_display_by(&l, Some(720), heights).len(), 3);
        assert_eq!(cap_for_display_by(&l, None, heights).len(), 3);
    }

    #[test]
    fn a_suspended_layer_counts_again_from_its_next_frame() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut p = PublisherLayers::default();
        for i in 0..30u64 {
            p.on_frame(Rid::from("q"), 600, ms(i * 33));
            p.on_frame(Rid::from("f"), 6000, ms(i * 33));
        }
        assert_eq!(p.active(ms(1000)).len(), 2);
        p.suspend(Rid::from("q"));
        let active = p.active(ms(1000));
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].0, Rid::from("f"));
        // One frame brings it back with the bitrate it had.
        p.on_frame(Rid::from("q"), 600, ms(1010));
        let active = p.active(ms(1010));
        assert_eq!(active.len(), 2);
        assert!(active[0].1 > 100_000, "{active:?}");
        p.forget(Rid::from("q"));
        assert_eq!(p.active(ms(1010)).len(), 1);
    }

    #[test]
    fn a_paused_layer_is_replaced_and_bitrates_are_measured() {
        let t0 = Instant::now();
        let mut p = PublisherLayers::default();
        for i in 0..40u64 {
            let now = t0 + Duration::from_millis(i * 33);
            p.on_frame(Rid::from("q"), 600, now);
            if i < 10 {
                p.on_frame(Rid::from("f"), 6000, now);
            }
        }
        let now = t0 + Duration::from_millis(40 * 33);
        let active = p.active(now);
        // f stopped 1 s ago: paused.
        assert_eq!(active.len(), 1, "{active:?}");
        let (rid, bitrate) = active[0];
        assert_eq!(rid, Rid::from("q"));
        assert!(
            (120_000..170_000).contains(&bitrate),
            "q at {bitrate} bit/s"
        );
        let mut c = LayerChoice {
            current: Some(Rid::from("f")),
            ..LayerChoice::default()
        };
        assert_eq!(c.decide(now, 5_000_000, &active), Some(Rid::from("q")));
        assert_eq!(c.cause, Cause::Paused);
    }

    #[test]
    fn a_first_guess_starts_the_picture_and_the_first_decision_starts_afresh() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut p = PublisherLayers::default();
        for i in 0..4u64 {
            p.on_frame(Rid::from("f"), 6000, ms(i * 33));
            p.on_frame(Rid::from("q"), 600, ms(i * 33));
        }
        assert_eq!(p.first_guess(ms(70)), None, "too early");
        assert_eq!(p.first_guess(ms(110)), Some(Rid::from("q")));
        let mut c = LayerChoice::default();
        assert!(c.start_on_guess(Rid::from("q")));
        assert!(!c.start_on_guess(Rid::from("f")), "only once");
        assert_eq!(c.admit_frame(Rid::from("q"), true), (true, true));
        // Measured: the budget carries f, and the first decision takes it
        // at once (a start), not after a hold.
        let active = layers();
        assert_eq!(c.decide(ms(600), 2_000_000, &active), Some(Rid::from("f")));
        assert_eq!(c.cause, Cause::Start);
        for i in 20..40u64 {
            p.on_frame(Rid::from("f"), 6000, ms(i * 33));
        }
        assert_eq!(p.first_guess(ms(1400)), None, "measured now");
    }
}
