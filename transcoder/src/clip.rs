//! Generated clips, encoded as a single-layer publisher would send them:
//! for tests, the benchmark and the GPU check. Never random bytes.

use balie_offload::{Codec, Size};
use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

use crate::pipeline::{open_encoder, PipelineError, RTP_HZ};

/// One encoded frame of a clip.
#[derive(Debug, Clone)]
pub struct ClipFrame {
    pub rtp_time: u32,
    pub key: bool,
    pub data: Vec<u8>,
}

/// Frames per second of generated clips.
pub const FPS: u32 = 30;

/// `frames` frames of a moving picture at `size`, a keyframe every `gop`
/// frames, encoded at `bitrate_kbps` in `codec`, with 90 kHz RTP times.
pub fn make(
    codec: Codec,
    size: Size,
    frames: u32,
    gop: u32,
    bitrate_kbps: u32,
) -> Result<Vec<ClipFrame>, PipelineError> {
    crate::pipeline::init()?;
    let mut enc = open_encoder(codec, size, bitrate_kbps)?;
    let (w, h) = (u32::from(size.width), u32::from(size.height));
    let mut picture = ffmpeg::frame::Video::new(Pixel::YUV420P, w, h);
    let mut packet = ffmpeg::Packet::empty();
    let mut out = Vec::with_capacity(frames as usize);
    let step = RTP_HZ as u32 / FPS;
    for n in 0..frames {
        paint(&mut picture, n);
        picture.set_pts(Some(i64::from(n * step)));
        picture.set_kind(if n % gop.max(1) == 0 {
            ffmpeg::picture::Type::I
        } else {
            ffmpeg::picture::Type::None
        });
        enc.send_frame(&picture)
            .map_err(|source| PipelineError::Ffmpeg {
                what: "encoding the clip",
                source,
            })?;
        while enc.receive_packet(&mut packet).is_ok() {
            out.push(ClipFrame {
                rtp_time: packet.pts().unwrap_or_default() as u32,
                key: packet.is_key(),
                data: packet.data().unwrap_or_default().to_vec(),
            });
        }
    }
    Ok(out)
}

/// Diagonal bands that move, and a bright square crossing once a second.
fn paint(frame: &mut ffmpeg::frame::Video, n: u32) {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let n = n as usize;
    let (sq, sx, sy) = (h / 5, (n % FPS as usize) * w / FPS as usize, h / 2);
    let stride = frame.stride(0);
    let luma = frame.data_mut(0);
    for y in 0..h {
        for x in 0..w {
            let in_square = (sx..sx + sq).contains(&x) && (sy..sy + sq).contains(&y);
            luma[y * stride + x] = if in_square {
                240
            } else {
                (((x + y + 3 * n) / 8) % 2 * 120 + 40) as u8
            };
        }
    }
    for plane in [1, 2] {
        let stride = frame.stride(plane);
        let data = frame.data_mut(plane);
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                data[y * stride + x] = (96 + plane * 32 + (x + n) % 32) as u8;
            }
        }
    }
}
