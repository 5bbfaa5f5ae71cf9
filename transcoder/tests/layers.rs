//! A session's layers as a subscriber on a weak link gets them: at the rate
//! asked for, without bursts that a link chosen for that rate could not
//! carry, and showing the source.

use balie_offload::Codec;
use balie_transcoder::bench::{encode_session, source, LAYERS};
use balie_transcoder::picture::{self, LayerFrame};
use balie_transcoder::pipeline::{Backend, Encoded, RATE_BUFFER_MS};

/// One session's layers over 5 s of the bench's source (720p, a keyframe
/// every 2 s), every frame encoded.
fn session(codec: Codec) -> (Vec<balie_transcoder::clip::ClipFrame>, Vec<Encoded>) {
    let clip = source(codec, 5).expect("clip");
    let out = encode_session(codec, &clip, &Backend::Cpu).expect("session");
    (clip, out)
}

fn layers_keep_to_their_rate(codec: Codec) {
    let (clip, out) = session(codec);
    let seconds = clip.len() as f64 / 30.0;
    for (i, spec) in LAYERS.iter().enumerate() {
        let track = i as u8 + 1;
        let sizes: Vec<usize> = out
            .iter()
            .filter(|e| e.track == track)
            .map(|e| e.data.len())
            .collect();
        assert_eq!(sizes.len(), clip.len(), "{codec:?} track {track}");
        let target = f64::from(spec.bitrate_kbps);
        let kbps = sizes.iter().sum::<usize>() as f64 * 8.0 / 1000.0 / seconds;
        // The layer's rate is what was asked for: the SFU chose the layer
        // for a link of about that rate.
        assert!(
            (0.8 * target..=1.1 * target).contains(&kbps),
            "{codec:?} track {track}: {kbps:.0} kbit/s for {target}"
        );
        // No 100 ms (3 frames) of the layer, keyframes included, carries
        // more than the encoder's buffer, a second of its rate (before the
        // buffer, a VP8 keyframe alone was more).
        let worst_ms = sizes
            .windows(3)
            .map(|w| w.iter().sum::<usize>() as f64 * 8.0 / target)
            .fold(0.0, f64::max);
        assert!(
            worst_ms <= f64::from(RATE_BUFFER_MS),
            "{codec:?} track {track}: 100 ms of the layer take {worst_ms:.0} ms at {target} kbit/s"
        );
        let largest_key = out
            .iter()
            .filter(|e| e.track == track && e.key)
            .map(|e| e.data.len())
            .max()
            .unwrap_or(0);
        eprintln!(
            "{codec:?} track {track}: {kbps:.0} kbit/s for {target}, the worst 100 ms take \
             {worst_ms:.0} ms, the largest keyframe {largest_key} bytes"
        );
    }
    // And they show the source (the worker test checks it over QUIC with
    // a control; this is the same picture through the pipeline alone).
    let layers: Vec<LayerFrame<'_>> = out
        .iter()
        .map(|e| (e.track, e.rtp_time, &e.data[..]))
        .collect();
    for l in picture::fidelity(codec, &clip, &layers).expect("fidelity") {
        eprintln!("{codec:?} {l}");
        assert!(l.frames == clip.len() && l.bad == 0, "{l}");
        assert!(l.mean.y >= 18.0, "{l}");
    }
}

#[test]
fn vp8_layers_keep_to_their_rate_without_bursts() {
    layers_keep_to_their_rate(Codec::Vp8);
}

#[test]
fn h264_layers_keep_to_their_rate_without_bursts() {
    layers_keep_to_their_rate(Codec::H264);
}
