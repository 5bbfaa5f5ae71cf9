//! The media synthetic participants send: a generated clip, encoded once
//! when the bench starts (VP8 through libvpx and Opus through libopus, both
//! by FFmpeg's libavcodec through ffmpeg-next), then sent in a loop paced in
//! real time. Never random bytes: an SFU and a receiver see real frames,
//! keyframes where an encoder puts them, and real frame sizes.
//!
//! ffmpeg-next is the wrapper the transcoder uses as well; one dependency
//! gives VP8, H.264 and Opus with the encoder options a browser uses
//! (realtime deadline, no lookahead).
//!
//! A keyframe request (PLI/FIR) is answered from a second encoding of the
//! same clip in which every frame is a keyframe: the publisher sends that
//! frame's keyframe version and goes on with the clip. The frames after it
//! were encoded against the clip's own previous frame, so a decoder's picture
//! drifts slightly until the clip's next keyframe (every two seconds); the
//! bitstream stays valid, and load tests do not look at pixels.

use std::time::Duration;

use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

use crate::scenario::Media;

/// Frames per second of the generated video.
pub const FPS: u32 = 30;
/// Keyframe interval of the clip, in frames (two seconds).
pub const GOP: u32 = 60;
/// Audio sample rate (Opus).
const RATE: u32 = 48_000;

/// Why the clip could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("FFmpeg has no {0} encoder (install Debian's libavcodec59 with libvpx and libopus)")]
    NoEncoder(&'static str),
    #[error("{what}: {source}")]
    Ffmpeg {
        what: &'static str,
        source: ffmpeg::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn ff(what: &'static str) -> impl FnOnce(ffmpeg::Error) -> MediaError {
    move |source| MediaError::Ffmpeg { what, source }
}

/// One encoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The codec's bitstream of the frame.
    pub data: Vec<u8>,
    /// A keyframe (decodable on its own).
    pub key: bool,
}

/// One simulcast layer (or the only video layer).
#[derive(Debug, Clone)]
pub struct Layer {
    /// The rid a browser would give it (q, h, f).
    pub rid: &'static str,
    pub width: u32,
    pub height: u32,
    /// Target bitrate, bit/s.
    pub bitrate: u64,
    /// The clip, frame by frame.
    pub frames: Vec<Frame>,
    /// The same frames, each encoded as a keyframe: answers to keyframe requests.
    pub keyframes: Vec<Vec<u8>>,
}

/// A participant's media, encoded.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Video layers, lowest first (empty for audio only).
    pub layers: Vec<Layer>,
    /// Opus packets, one per `audio_frame`.
    pub audio: Vec<Vec<u8>>,
    /// Length of one Opus packet.
    pub audio_frame: Duration,
}

/// The video layers of a media profile: (rid, width, height, bitrate).
pub fn layers_of(media: Media) -> &'static [(&'static str, u32, u32, u64)] {
    match media {
        Media::Simulcast => &[
            ("q", 320, 180, 150_000),
            ("h", 640, 360, 500_000),
            ("f", 1280, 720, 1_500_000),
        ],
        Media::Single => &[("f", 1280, 720, 1_500_000)],
        Media::Audio | Media::None => &[],
    }
}

/// Encode `seconds` of generated media for `media`, with Opus packets of
/// `audio_frame`.
pub fn make_clip(media: Media, audio_frame: Duration, seconds: u32) -> Result<Clip, MediaError> {
    ffmpeg::init().map_err(ff("initialising FFmpeg"))?;
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
    let frames = seconds * FPS;
    let mut layers = Vec::new();
    for &(rid, width, height, bitrate) in layers_of(media) {
        let clip = encode_video(width, height, bitrate, frames, GOP)?;
        let keyframes = encode_video(width, height, bitrate, frames, 1)?
            .into_iter()
            .map(|f| f.data)
            .collect();
        layers.push(Layer {
            rid,
            width,
            height,
            bitrate,
            frames: clip,
            keyframes,
        });
    }
    let audio = if media.publishes() {
        encode_audio(audio_frame, seconds)?
    } else {
        Vec::new()
    };
    Ok(Clip {
        layers,
        audio,
        audio_frame,
    })
}

/// The generated picture: a gradient that drifts, and a box that crosses
/// the frame once a second, so every frame differs from the last as a
/// camera's would. Fills an I420 frame.
fn draw(frame: &mut ffmpeg::frame::Video, n: u32) {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let stride = frame.stride(0);
    let bx = (n % FPS) as usize * w / FPS as usize;
    let by = h / 3;
    let side = (h / 4).max(2);
    let y = frame.data_mut(0);
    for row in 0..h {
        for col in 0..w {
            let inside = col >= bx && col < bx + side && row >= by && row < by + side;
            y[row * stride + col] = if inside {
                235
            } else {
                ((col * 160 / w + row * 60 / h + n as usize * 2) % 200 + 16) as u8
            };
        }
    }
    for plane in 1..3 {
        let stride = frame.stride(plane);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let data = frame.data_mut(plane);
        for row in 0..ch {
            for col in 0..cw {
                data[row * stride + col] =
                    (128 + ((col + row + n as usize + plane * 40) % 64) as i32 - 32) as u8;
            }
        }
    }
}

fn encode_video(
    width: u32,
    height: u32,
    bitrate: u64,
    count: u32,
    gop: u32,
) -> Result<Vec<Frame>, MediaError> {
    let codec =
        ffmpeg::encoder::find_by_name("libvpx").ok_or(MediaError::NoEncoder("libvpx (VP8)"))?;
    let ctx = ffmpeg::codec::context::Context::new_with_codec(codec);
    let mut enc = ctx.encoder().video().map_err(ff("VP8 encoder"))?;
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base((1, FPS as i32));
    enc.set_frame_rate(Some((FPS as i32, 1)));
    enc.set_bit_rate(bitrate as usize);
    enc.set_gop(gop);
    let mut opts = ffmpeg::Dictionary::new();
    // As a browser encodes: realtime, no lookahead, one packet per frame.
    opts.set("deadline", "realtime");
    opts.set("cpu-used", "8");
    opts.set("lag-in-frames", "0");
    opts.set("auto-alt-ref", "0");
    let mut enc = enc.open_with(opts).map_err(ff("opening the VP8 encoder"))?;
    let mut out = Vec::with_capacity(count as usize);
    let mut frame = ffmpeg::frame::Video::new(Pixel::YUV420P, width, height);
    let mut packet = ffmpeg::Packet::empty();
    for n in 0..count {
        draw(&mut frame, n);
        frame.set_pts(Some(i64::from(n)));
        enc.send_frame(&frame).map_err(ff("encoding VP8"))?;
        drain_vp8(&mut enc, &mut packet, &mut out);
    }
    enc.send_eof().map_err(ff("finishing VP8"))?;
    drain_vp8(&mut enc, &mut packet, &mut out);
    if out.len() != count as usize || !out.first().is_some_and(|f| f.key) {
        return Err(MediaError::Other(format!(
            "VP8 {width}x{height}: {} packets for {count} frames",
            out.len()
        )));
    }
    Ok(out)
}

/// Move the frames the VP8 encoder has ready into `out`.
fn drain_vp8(
    enc: &mut ffmpeg::encoder::video::Encoder,
    packet: &mut ffmpeg::Packet,
    out: &mut Vec<Frame>,
) {
    while enc.receive_packet(packet).is_ok() {
        out.push(Frame {
            data: packet.data().unwrap_or_default().to_vec(),
            key: packet.is_key(),
        });
    }
}

/// Speech-like audio: a voiced tone whose pitch wanders, in syllables of
/// about 200 ms with pauses between words.
fn voice(sample: u32) -> f32 {
    let t = sample as f32 / RATE as f32;
    let syllable = (t * 5.0 * std::f32::consts::TAU).sin().max(0.0);
    let word = if (t % 1.5) < 1.1 { 1.0 } else { 0.0 };
    let pitch = 140.0 + 30.0 * (t * 0.7 * std::f32::consts::TAU).sin();
    let phase = t * pitch * std::f32::consts::TAU;
    let tone = phase.sin() + 0.5 * (2.0 * phase).sin() + 0.25 * (3.0 * phase).sin();
    0.25 * tone * syllable * word
}

fn encode_audio(frame_len: Duration, seconds: u32) -> Result<Vec<Vec<u8>>, MediaError> {
    let codec = ffmpeg::encoder::find_by_name("libopus").ok_or(MediaError::NoEncoder("libopus"))?;
    let ctx = ffmpeg::codec::context::Context::new_with_codec(codec);
    let mut enc = ctx.encoder().audio().map_err(ff("Opus encoder"))?;
    let samples = (RATE as u128 * frame_len.as_micros() / 1_000_000) as usize;
    enc.set_rate(RATE as i32);
    enc.set_channel_layout(ffmpeg::ChannelLayout::MONO);
    enc.set_format(ffmpeg::format::Sample::I16(
        ffmpeg::format::sample::Type::Packed,
    ));
    enc.set_bit_rate(32_000);
    enc.set_time_base((1, RATE as i32));
    let mut opts = ffmpeg::Dictionary::new();
    opts.set("application", "voip");
    opts.set("frame_duration", &frame_len.as_millis().to_string());
    let mut enc = enc
        .open_with(opts)
        .map_err(ff("opening the Opus encoder"))?;
    let count = (u128::from(seconds) * 1000 / frame_len.as_millis().max(1)) as u32;
    let mut out = Vec::with_capacity(count as usize);
    let mut frame = ffmpeg::frame::Audio::new(
        ffmpeg::format::Sample::I16(ffmpeg::format::sample::Type::Packed),
        samples,
        ffmpeg::ChannelLayout::MONO,
    );
    frame.set_rate(RATE);
    let mut packet = ffmpeg::Packet::empty();
    let mut at = 0u32;
    for _ in 0..count {
        {
            let pcm = frame.plane_mut::<i16>(0);
            for s in pcm.iter_mut() {
                *s = (voice(at) * i16::MAX as f32) as i16;
                at += 1;
            }
        }
        frame.set_pts(Some(i64::from(at)));
        enc.send_frame(&frame).map_err(ff("encoding Opus"))?;
        while enc.receive_packet(&mut packet).is_ok() {
            out.push(packet.data().unwrap_or_default().to_vec());
        }
    }
    if out.len() + 4 < count as usize {
        return Err(MediaError::Other(format!(
            "Opus: {} packets for {count} frames",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulcast_clip_has_real_vp8_and_opus() {
        let clip = make_clip(Media::Simulcast, Duration::from_millis(20), 2).expect("encodes");
        assert_eq!(clip.layers.len(), 3);
        for (layer, &(rid, w, h, bitrate)) in clip.layers.iter().zip(layers_of(Media::Simulcast)) {
            assert_eq!((layer.rid, layer.width, layer.height), (rid, w, h));
            assert_eq!(layer.frames.len(), 60);
            assert_eq!(layer.keyframes.len(), 60);
            // A VP8 keyframe starts with a frame tag whose low bit is 0 and
            // carries the start code 9d 01 2a and the size (RFC 6386 9.1).
            let k = &layer.frames[0].data;
            assert_eq!(k[0] & 1, 0, "{rid}: keyframe tag");
            assert_eq!(&k[3..6], &[0x9d, 0x01, 0x2a], "{rid}: start code");
            assert_eq!(u16::from_le_bytes([k[6], k[7]]) & 0x3fff, w as u16);
            assert_eq!(u16::from_le_bytes([k[8], k[9]]) & 0x3fff, h as u16);
            assert!(layer.frames[1..30]
                .iter()
                .all(|f| !f.key && f.data[0] & 1 == 1));
            assert!(layer
                .keyframes
                .iter()
                .all(|k| k[0] & 1 == 0 && k[3..6] == [0x9d, 0x01, 0x2a]));
            // About the target bitrate (the encoder needs a second to settle).
            let bits: usize = layer.frames.iter().map(|f| f.data.len() * 8).sum();
            let rate = bits as f64 / 2.0;
            assert!(
                rate > bitrate as f64 * 0.3 && rate < bitrate as f64 * 2.5,
                "{rid}: {rate}"
            );
        }
        // Opus: 50 packets a second; a TOC byte of config 8-11 (SILK
        // wideband) or higher, and speech-sized packets.
        assert!(
            (96..=100).contains(&clip.audio.len()),
            "{}",
            clip.audio.len()
        );
        let mean = clip.audio.iter().map(Vec::len).sum::<usize>() / clip.audio.len();
        assert!((20..=200).contains(&mean), "{mean}");
    }

    #[test]
    fn long_opus_frames_give_fewer_packets() {
        let clip = make_clip(Media::Audio, Duration::from_millis(120), 3).expect("encodes");
        assert!(clip.layers.is_empty());
        assert!(
            (23..=25).contains(&clip.audio.len()),
            "{}",
            clip.audio.len()
        );
    }
}
