//! Audio in and out of the captions pipeline, through FFmpeg: a file (WAV,
//! FLAC, Opus, ... whatever FFmpeg reads) or a live stream of Opus packets
//! becomes 16 kHz mono float samples (libswresample); and 16 kHz samples
//! become Opus packets (libopus), which the tests and the benchmark publish.

use std::path::Path;

use ffmpeg::format::sample::{Sample, Type};
use ffmpeg::software::resampling;
use ffmpeg::ChannelLayout;
use ffmpeg_next as ffmpeg;

use super::mel::SAMPLE_RATE;

/// Decoded frames to 16 kHz mono, the resampler set up from the first.
struct To16k {
    frame: ffmpeg::frame::Audio,
    pcm: ffmpeg::frame::Audio,
    resampler: Option<resampling::Context>,
}

/// Room for the resampler's output per call (a decoded frame is at most
/// 120 ms: 1,920 samples at 16 kHz).
const OUT_ROOM: usize = 8192;

impl To16k {
    fn new() -> To16k {
        let mut pcm =
            ffmpeg::frame::Audio::new(Sample::F32(Type::Packed), OUT_ROOM, ChannelLayout::MONO);
        pcm.set_rate(SAMPLE_RATE as u32);
        To16k {
            frame: ffmpeg::frame::Audio::empty(),
            pcm,
            resampler: None,
        }
    }

    /// Take every frame the decoder has ready, resampled into `out`.
    fn drain(
        &mut self,
        decoder: &mut ffmpeg::decoder::Audio,
        out: &mut Vec<f32>,
    ) -> Result<(), String> {
        while decoder.receive_frame(&mut self.frame).is_ok() {
            let frame = &mut self.frame;
            if frame.channel_layout().is_empty() {
                frame.set_channel_layout(ChannelLayout::default(i32::from(frame.channels())));
            }
            let r = match &mut self.resampler {
                Some(r) => r,
                None => self.resampler.insert(
                    resampling::Context::get(
                        frame.format(),
                        frame.channel_layout(),
                        frame.rate(),
                        Sample::F32(Type::Packed),
                        ChannelLayout::MONO,
                        SAMPLE_RATE as u32,
                    )
                    .map_err(|e| format!("resampler: {e}"))?,
                ),
            };
            // swr_convert_frame writes at most the output frame's sample
            // count and keeps the rest for later; it also sets that count
            // to what it wrote. Without setting the room back each time,
            // the room shrinks to the first output (16 samples short of a
            // packet, for the filter's delay) and 16 samples a packet pile
            // up: a live stream's clock falls 5% behind real time.
            self.pcm.set_samples(OUT_ROOM);
            r.run(frame, &mut self.pcm)
                .map_err(|e| format!("resampling: {e}"))?;
            let n = self.pcm.samples();
            out.extend(self.pcm.plane::<f32>(0).iter().take(n));
        }
        Ok(())
    }

    /// What the resampler still holds.
    fn flush(&mut self, out: &mut Vec<f32>) {
        if let Some(r) = self.resampler.as_mut() {
            loop {
                self.pcm.set_samples(OUT_ROOM);
                if r.flush(&mut self.pcm).is_err() {
                    break;
                }
                let n = self.pcm.samples();
                if n == 0 {
                    break;
                }
                out.extend(self.pcm.plane::<f32>(0).iter().take(n));
            }
        }
    }
}

/// The samples of the first audio stream of `path`, 16 kHz mono.
pub fn read_pcm(path: &Path) -> Result<Vec<f32>, String> {
    crate::pipeline::init().map_err(|e| e.to_string())?;
    let what = |e: ffmpeg::Error| format!("{}: {e}", path.display());
    let mut input = ffmpeg::format::input(path).map_err(what)?;
    let stream = input
        .streams()
        .best(ffmpeg::media::Type::Audio)
        .ok_or_else(|| format!("{}: no audio stream", path.display()))?;
    let index = stream.index();
    let mut decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|c| c.decoder().audio())
        .map_err(what)?;
    let mut to16k = To16k::new();
    let mut out = Vec::new();
    for (s, packet) in input.packets() {
        if s.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(what)?;
        to16k.drain(&mut decoder, &mut out)?;
    }
    decoder.send_eof().map_err(what)?;
    to16k.drain(&mut decoder, &mut out)?;
    to16k.flush(&mut out);
    Ok(out)
}

/// A live Opus stream (RTP payloads, 48 kHz) decoded to 16 kHz mono.
pub struct OpusDecoder {
    decoder: ffmpeg::decoder::Audio,
    to16k: To16k,
}

impl OpusDecoder {
    pub fn new() -> Result<OpusDecoder, String> {
        crate::pipeline::init().map_err(|e| e.to_string())?;
        // FFmpeg's own decoder: without extradata it takes a stream as
        // WebRTC sends it (48 kHz, up to two channels).
        let codec = ffmpeg::decoder::find_by_name("opus")
            .or_else(|| ffmpeg::decoder::find(ffmpeg::codec::Id::OPUS))
            .ok_or("FFmpeg has no Opus decoder")?;
        let decoder = ffmpeg::codec::context::Context::new_with_codec(codec)
            .decoder()
            .open_as(codec)
            .and_then(|d| d.audio())
            .map_err(|e| format!("opening the Opus decoder: {e}"))?;
        Ok(OpusDecoder {
            decoder,
            to16k: To16k::new(),
        })
    }

    /// Decode one packet; its samples are appended to `out`. A packet the
    /// decoder refuses is an error for this packet only: the stream goes on.
    pub fn decode(&mut self, packet: &[u8], out: &mut Vec<f32>) -> Result<(), String> {
        let p = ffmpeg::Packet::copy(packet);
        self.decoder
            .send_packet(&p)
            .map_err(|e| format!("Opus packet: {e}"))?;
        self.to16k.drain(&mut self.decoder, out)
    }
}

/// Samples per Opus packet made by [`encode_opus`] (20 ms at 16 kHz).
pub const OPUS_FRAME: usize = SAMPLE_RATE / 50;

/// Encode 16 kHz mono samples as Opus packets of 20 ms (libopus, `voip`,
/// 32 kbit/s), as a browser sends a microphone.
pub fn encode_opus(pcm: &[f32]) -> Result<Vec<Vec<u8>>, String> {
    crate::pipeline::init().map_err(|e| e.to_string())?;
    let ff = |what: &'static str| move |e: ffmpeg::Error| format!("{what}: {e}");
    let codec = ffmpeg::encoder::find_by_name("libopus").ok_or("FFmpeg has no libopus encoder")?;
    let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .audio()
        .map_err(ff("Opus encoder"))?;
    let format = Sample::I16(Type::Packed);
    enc.set_rate(SAMPLE_RATE as i32);
    enc.set_channel_layout(ChannelLayout::MONO);
    enc.set_format(format);
    enc.set_bit_rate(32_000);
    enc.set_time_base((1, SAMPLE_RATE as i32));
    let mut opts = ffmpeg::Dictionary::new();
    opts.set("application", "voip");
    opts.set("frame_duration", "20");
    let mut enc = enc
        .open_with(opts)
        .map_err(ff("opening the Opus encoder"))?;
    let mut frame = ffmpeg::frame::Audio::new(format, OPUS_FRAME, ChannelLayout::MONO);
    frame.set_rate(SAMPLE_RATE as u32);
    let mut packet = ffmpeg::Packet::empty();
    let mut out = Vec::with_capacity(pcm.len() / OPUS_FRAME + 1);
    for (i, chunk) in pcm.chunks(OPUS_FRAME).enumerate() {
        let plane = frame.plane_mut::<i16>(0);
        for (j, s) in plane.iter_mut().enumerate() {
            let v = chunk.get(j).copied().unwrap_or(0.0);
            *s = (v.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16;
        }
        frame.set_pts(Some((i * OPUS_FRAME) as i64));
        enc.send_frame(&frame).map_err(ff("encoding Opus"))?;
        while enc.receive_packet(&mut packet).is_ok() {
            out.push(packet.data().unwrap_or_default().to_vec());
        }
    }
    enc.send_eof().map_err(ff("ending the Opus stream"))?;
    while enc.receive_packet(&mut packet).is_ok() {
        out.push(packet.data().unwrap_or_default().to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_packets_decode_back_to_the_same_length_and_shape() {
        // One second of a 440 Hz tone, then one of silence.
        let mut pcm: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| 0.3 * (i as f32 * 440.0 * std::f32::consts::TAU / SAMPLE_RATE as f32).sin())
            .collect();
        pcm.extend(std::iter::repeat_n(0.0, SAMPLE_RATE));
        let packets = encode_opus(&pcm).expect("encodes");
        assert!((100..=103).contains(&packets.len()), "{}", packets.len());
        let mut dec = OpusDecoder::new().expect("decoder");
        let mut back = Vec::new();
        for p in &packets {
            dec.decode(p, &mut back).expect("decodes");
        }
        // Packet by packet, nothing piles up in the resampler: what comes
        // out is what went in, less the decoder's pre-skip (6.5 ms) and
        // the resampler's filter delay.
        let n = back.len() as i64;
        assert!((n - 2 * SAMPLE_RATE as i64).abs() <= 400, "{n} samples");
        let rms = |s: &[f32]| (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
        let tone = rms(&back[2_000..14_000]);
        let quiet = rms(&back[back.len() - 12_000..]);
        assert!(tone > 0.1 && quiet < 0.01, "tone {tone}, silence {quiet}");
        // Garbage is an error for that packet, and the stream goes on.
        let before = back.len();
        let _ = dec.decode(&[0xff, 0xff, 0xff], &mut back);
        dec.decode(&packets[10], &mut back)
            .expect("decodes after garbage");
        assert!(back.len() > before);
    }
}
