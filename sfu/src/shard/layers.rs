//! Simulcast layer choice, per subscriber and published video track.
//!
//! Pure state machines (no str0m, no clock of their own), so they are tested
//! on their own:
//!
//! - [`PublisherLayers`] measures what a simulcast publisher sends right now:
//!   each layer's bitrate over the last second, and which layers are paused.
//! - [`LayerChoice`] decides which layer one subscriber should get from its
//!   bandwidth budget: down at once when the budget drops below the current
//!   layer, up one step only after the budget has held for [`UP_HOLD`], and
//!   after a failed attempt to go up (down again within [`UP_FAIL`]) the next
//!   attempt waits twice as long, up to [`MAX_BACKOFF`].
//! - The switch itself waits for a keyframe on the target layer (the caller
//!   asks the publisher for one), so the subscriber's decoder never sees a
//!   frame it cannot decode.

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
/// Measurement window of layer bitrates.
const WINDOW: Duration = Duration::from_millis(500);

/// One layer of a publisher, as measured.
#[derive(Debug, Clone)]
struct Layer {
    rid: Rid,
    bytes: u64,
    window_start: Instant,
    /// Bits per second over the last complete window (smoothed).
    bitrate: u64,
    last_seen: Instant,
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
                });
                // Just pushed.
                let last = self.layers.len() - 1;
                &mut self.layers[last]
            }
        };
        layer.bytes += len as u64;
        layer.last_seen = now;
        let elapsed = now.saturating_duration_since(layer.window_start);
        if elapsed >= WINDOW {
            let rate = (layer.bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            layer.bitrate = if layer.bitrate == 0 {
                rate
            } else {
                (layer.bitrate + rate) / 2
            };
            layer.bytes = 0;
            layer.window_start = now;
        }
    }

    /// Active layers (seen within [`PAUSED_AFTER`] and measured), lowest
    /// bitrate first, with their bitrates.
    pub fn active(&self, now: Instant) -> Vec<(Rid, u64)> {
        let mut v: Vec<(Rid, u64)> = self
            .layers
            .iter()
            .filter(|l| now.saturating_duration_since(l.last_seen) < PAUSED_AFTER && l.bitrate > 0)
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
    let Some(h) = height else { return active };
    let n = active.len();
    for i in 0..n {
        let lines = 720u32 >> (n - 1 - i).min(31);
        if lines >= h {
            return &active[..=i];
        }
    }
    active
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
    /// Going down for lack of bandwidth: the current layer is no longer
    /// forwarded while waiting for the lower layer's keyframe (a short
    /// freeze beats queueing a layer the link cannot carry).
    draining: bool,
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
            draining: false,
        }
    }
}

impl LayerChoice {
    /// Decide the target layer from `budget` (bits/s for this track) and the
    /// publisher's `active` layers (lowest first). Returns the new target when
    /// it changed: the caller asks the publisher for a keyframe on it.
    pub fn decide(&mut self, now: Instant, budget: u64, active: &[(Rid, u64)]) -> Option<Rid> {
        if active.is_empty() {
            return None;
        }
        // Hysteresis: a layer is kept while it fits the budget, and the next
        // one up is only taken with HEADROOM to spare.
        let keep = active.iter().rposition(|(_, b)| *b <= budget).unwrap_or(0);
        let up = active
            .iter()
            .rposition(|(_, b)| (*b as f64 * HEADROOM) as u64 <= budget)
            .unwrap_or(0);
        let wanted = self.target.or(self.current);
        let cur = wanted.and_then(|r| active.iter().position(|(rid, _)| *rid == r));
        let next = match cur {
            // Start (or the current layer paused): whatever fits now.
            None => {
                self.cause = if wanted.is_some() {
                    Cause::Paused
                } else {
                    Cause::Start
                };
                self.above_since = None;
                up
            }
            Some(c) if keep < c => {
                // Down at once. Going down soon after going up: back off.
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
                keep
            }
            Some(c) if up > c => {
                // Up one step, once the budget has held and no backoff runs.
                let since = *self.above_since.get_or_insert(now);
                let blocked = self.up_blocked_until.is_some_and(|t| now < t);
                if now.saturating_duration_since(since) >= UP_HOLD && !blocked {
                    self.above_since = None;
                    self.last_up = Some(now);
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

    /// A frame on `rid` arrived; `keyframe` if it is one. Returns whether to
    /// forward it, and whether this frame switched layers.
    pub fn admit_frame(&mut self, rid: Rid, keyframe: bool) -> (bool, bool) {
        if self.target == Some(rid) && self.current != Some(rid) {
            if keyframe {
                self.current = Some(rid);
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

    /// The bitrate the subscriber should be able to take next (for probing).
    pub fn next_up(&self, active: &[(Rid, u64)]) -> Option<u64> {
        let cur = self
            .current
            .and_then(|r| active.iter().position(|(rid, _)| *rid == r))?;
        active.get(cur + 1).map(|(_, b)| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<(Rid, u64)> {
        vec![
            (Rid::from("q"), 150_000),
            (Rid::from("h"), 500_000),
            (Rid::from("f"), 1_500_000),
        ]
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

    #[test]
    fn goes_up_one_step_after_the_hold_and_backs_off_after_a_failure() {
        let t0 = Instant::now();
        let mut c = LayerChoice::default();
        c.decide(t0, 200_000, &layers());
        c.admit_frame(Rid::from("q"), true);
        // Plenty of budget: nothing for UP_HOLD, then one step.
        assert_eq!(
            c.decide(t0 + Duration::from_secs(1), 5_000_000, &layers()),
            None
        );
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(c.decide(t1, 5_000_000, &layers()), Some(Rid::from("h")));
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
}
