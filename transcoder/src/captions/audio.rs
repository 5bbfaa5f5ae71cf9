//! Read an audio file (WAV, FLAC, Opus, ... whatever FFmpeg reads) as
//! 16 kHz mono float samples, through libswresample.

use std::path::Path;

use ffmpeg::format::sample::{Sample, Type};
use ffmpeg::software::resampling;
use ffmpeg::ChannelLayout;
use ffmpeg_next as ffmpeg;

use super::mel::SAMPLE_RATE;

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
    let mut resampler: Option<resampling::Context> = None;
    let mut out = Vec::new();
    let mut frame = ffmpeg::frame::Audio::empty();
    let mut pcm = ffmpeg::frame::Audio::empty();
    let mut drain = |decoder: &mut ffmpeg::decoder::Audio,
                     resampler: &mut Option<resampling::Context>,
                     out: &mut Vec<f32>|
     -> Result<(), String> {
        while decoder.receive_frame(&mut frame).is_ok() {
            if frame.channel_layout().is_empty() {
                frame.set_channel_layout(ChannelLayout::default(i32::from(frame.channels())));
            }
            let r = match resampler {
                Some(r) => r,
                None => resampler.insert(
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
            r.run(&frame, &mut pcm)
                .map_err(|e| format!("resampling: {e}"))?;
            let n = pcm.samples();
            out.extend(pcm.plane::<f32>(0).iter().take(n));
        }
        Ok(())
    };
    for (s, packet) in input.packets() {
        if s.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(what)?;
        drain(&mut decoder, &mut resampler, &mut out)?;
    }
    decoder.send_eof().map_err(what)?;
    drain(&mut decoder, &mut resampler, &mut out)?;
    if let Some(r) = resampler.as_mut() {
        // What the resampler still holds.
        while let Ok(Some(_)) = r.flush(&mut pcm) {
            let n = pcm.samples();
            if n == 0 {
                break;
            }
            out.extend(pcm.plane::<f32>(0).iter().take(n));
        }
    }
    Ok(out)
}
