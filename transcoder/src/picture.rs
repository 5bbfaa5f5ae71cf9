//! Pictures compared with what they should show: the reference
//! downscaling (a box filter: the GPU kernel's arithmetic, and what a
//! layer of the source should look like), the largest difference between
//! a picture and it, and PSNR. With these the tests, the benchmark and the
//! GPU check tell that a layer shows the source, not only that it decodes
//! at the right size.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use balie_offload::{Codec, Size};
use ffmpeg::format::Pixel;
use ffmpeg_next as ffmpeg;

use crate::clip::ClipFrame;
use crate::pipeline::{Decoder, PipelineError};

/// `src` scaled to `size` by a box filter (each output pixel the rounded
/// mean of its source footprint), as I420 planes (Y, U, V) packed tightly:
/// the GPU kernel's arithmetic, and the picture a layer is compared with.
pub fn reference_scale(src: &ffmpeg::frame::Video, size: Size) -> Vec<Vec<u8>> {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let (w, h) = (usize::from(size.width), usize::from(size.height));
    let nv12 = src.format() == Pixel::NV12;
    let plane =
        |pw: usize, ph: usize, spw: usize, sph: usize, read: &dyn Fn(usize, usize) -> u32| {
            let mut out = vec![0u8; pw * ph];
            for r in 0..ph {
                for x in 0..pw {
                    let x0 = x * spw / pw;
                    let x1 = ((x + 1) * spw / pw).max(x0 + 1);
                    let y0 = r * sph / ph;
                    let y1 = ((r + 1) * sph / ph).max(y0 + 1);
                    let mut sum = 0u32;
                    for j in y0..y1 {
                        for i in x0..x1 {
                            sum += read(i, j);
                        }
                    }
                    let count = ((x1 - x0) * (y1 - y0)) as u32;
                    out[r * pw + x] = ((sum + count / 2) / count) as u8;
                }
            }
            out
        };
    let (sy, suv) = (src.stride(0), src.stride(1));
    let y = plane(w, h, sw, sh, &|i, j| u32::from(src.data(0)[j * sy + i]));
    let (u, v) = if nv12 {
        (
            plane(w / 2, h / 2, sw / 2, sh / 2, &|i, j| {
                u32::from(src.data(1)[j * suv + 2 * i])
            }),
            plane(w / 2, h / 2, sw / 2, sh / 2, &|i, j| {
                u32::from(src.data(1)[j * suv + 2 * i + 1])
            }),
        )
    } else {
        let sv = src.stride(2);
        (
            plane(w / 2, h / 2, sw / 2, sh / 2, &|i, j| {
                u32::from(src.data(1)[j * suv + i])
            }),
            plane(w / 2, h / 2, sw / 2, sh / 2, &|i, j| {
                u32::from(src.data(2)[j * sv + i])
            }),
        )
    };
    vec![y, u, v]
}

/// The largest difference between a picture and the reference planes.
pub fn max_difference(pic: &ffmpeg::frame::Video, reference: &[Vec<u8>]) -> u8 {
    let (w, h) = (pic.width() as usize, pic.height() as usize);
    let mut worst = 0u8;
    for (plane, (pw, ph)) in [(w, h), (w / 2, h / 2), (w / 2, h / 2)]
        .into_iter()
        .enumerate()
    {
        let stride = pic.stride(plane);
        for r in 0..ph {
            for x in 0..pw {
                let d = pic.data(plane)[r * stride + x].abs_diff(reference[plane][r * pw + x]);
                worst = worst.max(d);
            }
        }
    }
    worst
}

/// Peak signal-to-noise ratio of a picture against a reference, in dB:
/// of luma alone, and of all three planes together (weighted by their
/// samples, as FFmpeg's `psnr` filter's "average"). [`IDENTICAL_DB`] where
/// they are the same.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Psnr {
    pub y: f64,
    pub all: f64,
}

/// The PSNR given to pictures that do not differ at all.
pub const IDENTICAL_DB: f64 = 100.0;

impl std::fmt::Display for Psnr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Y {:.1} dB, YUV {:.1} dB", self.y, self.all)
    }
}

/// Squared differences summed, and samples compared, of Y and of U+V.
#[derive(Debug, Clone, Copy, Default)]
struct SquaredError {
    y: (f64, u64),
    uv: (f64, u64),
}

impl SquaredError {
    fn of(pic: &ffmpeg::frame::Video, reference: &[Vec<u8>]) -> SquaredError {
        let (w, h) = (pic.width() as usize, pic.height() as usize);
        let mut e = SquaredError::default();
        for (plane, (pw, ph)) in [(w, h), (w / 2, h / 2), (w / 2, h / 2)]
            .into_iter()
            .enumerate()
        {
            let stride = pic.stride(plane);
            let mut sum = 0u64;
            for r in 0..ph {
                let row = &pic.data(plane)[r * stride..r * stride + pw];
                for (a, b) in row.iter().zip(&reference[plane][r * pw..(r + 1) * pw]) {
                    let d = u64::from(a.abs_diff(*b));
                    sum += d * d;
                }
            }
            let into = if plane == 0 { &mut e.y } else { &mut e.uv };
            into.0 += sum as f64;
            into.1 += (pw * ph) as u64;
        }
        e
    }

    fn add(&mut self, o: &SquaredError) {
        self.y.0 += o.y.0;
        self.y.1 += o.y.1;
        self.uv.0 += o.uv.0;
        self.uv.1 += o.uv.1;
    }

    fn psnr(&self) -> Psnr {
        let db = |sum: f64, n: u64| {
            if sum == 0.0 || n == 0 {
                IDENTICAL_DB
            } else {
                (10.0 * (255.0 * 255.0 * n as f64 / sum).log10()).min(IDENTICAL_DB)
            }
        };
        Psnr {
            y: db(self.y.0, self.y.1),
            all: db(self.y.0 + self.uv.0, self.y.1 + self.uv.1),
        }
    }
}

/// PSNR of an I420 picture against reference planes (Y, U, V, packed
/// tightly, as [`reference_scale`] makes them).
pub fn psnr(pic: &ffmpeg::frame::Video, reference: &[Vec<u8>]) -> Psnr {
    SquaredError::of(pic, reference).psnr()
}

/// How one layer's pictures compare with the source's: over the layer
/// frames that decoded, each against the reference scaling of the source
/// picture with the same RTP time.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFidelity {
    pub track: u8,
    /// The size the layer's pictures decoded to (the first one's).
    pub size: Size,
    /// Frames compared.
    pub frames: usize,
    /// Layer frames the decoder refused, or that carried an RTP time the
    /// source does not have, or decoded to another size or format.
    pub bad: usize,
    /// Over all compared frames (from their summed squared error); 0 dB
    /// where none was.
    pub mean: Psnr,
    /// The worst single frame's luma PSNR.
    pub worst_y: f64,
}

impl std::fmt::Display for LayerFidelity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}: {} over {} frames (worst frame Y {:.1} dB){}",
            self.size.width,
            self.size.height,
            self.mean,
            self.frames,
            self.worst_y,
            if self.bad > 0 {
                format!(", {} bad", self.bad)
            } else {
                String::new()
            }
        )
    }
}

/// One encoded layer frame: its track, the RTP time of the source frame it
/// was made from, its bytes.
pub type LayerFrame<'a> = (u8, u32, &'a [u8]);

/// Decode the layers (each track's frames in order) and the source clip,
/// and compare every layer picture with the reference scaling of the
/// source picture of the same RTP time. One result per track, in track
/// order. Works as it goes: a source picture and one picture per track at
/// a time.
pub fn fidelity(
    codec: Codec,
    source: &[ClipFrame],
    layers: &[LayerFrame<'_>],
) -> Result<Vec<LayerFidelity>, PipelineError> {
    struct Track<'a> {
        frames: Vec<(u32, &'a [u8])>,
        next: usize,
        decoder: Decoder,
        size: Option<Size>,
        compared: usize,
        bad: usize,
        error: SquaredError,
        worst_y: f64,
    }
    let mut tracks: BTreeMap<u8, Track<'_>> = BTreeMap::new();
    for &(track, rtp, data) in layers {
        let t = match tracks.entry(track) {
            Entry::Occupied(t) => t.into_mut(),
            Entry::Vacant(v) => v.insert(Track {
                frames: Vec::new(),
                next: 0,
                decoder: Decoder::new(codec)?,
                size: None,
                compared: 0,
                bad: 0,
                error: SquaredError::default(),
                worst_y: IDENTICAL_DB,
            }),
        };
        t.frames.push((rtp, data));
    }
    let source_times: std::collections::HashSet<u32> = source.iter().map(|f| f.rtp_time).collect();
    let mut source_decoder = Decoder::new(codec)?;
    for s in source {
        let picture = source_decoder
            .decode(&s.data, i64::from(s.rtp_time))
            .ok()
            .flatten();
        for t in tracks.values_mut() {
            // Decode the track up to this source time; compare the picture
            // made from it.
            while let Some(&(rtp, data)) = t.frames.get(t.next) {
                if source_times.contains(&rtp) && passed(s.rtp_time, rtp) {
                    break; // made from a later source picture
                }
                t.next += 1;
                let decoded = t.decoder.decode(data, i64::from(rtp));
                let (Ok(Some(pic)), Some(src), true) = (decoded, picture, rtp == s.rtp_time) else {
                    t.bad += 1;
                    continue;
                };
                let size = Size {
                    width: pic.width() as u16,
                    height: pic.height() as u16,
                };
                if pic.format() != Pixel::YUV420P || *t.size.get_or_insert(size) != size {
                    t.bad += 1;
                    continue;
                }
                let e = SquaredError::of(pic, &reference_scale(src, size));
                t.worst_y = t.worst_y.min(e.psnr().y);
                t.error.add(&e);
                t.compared += 1;
            }
        }
    }
    Ok(tracks
        .into_iter()
        .map(|(track, t)| LayerFidelity {
            track,
            size: t.size.unwrap_or(Size {
                width: 0,
                height: 0,
            }),
            frames: t.compared,
            bad: t.bad + t.frames.len() - t.next,
            // Nothing compared is nothing shown, not a perfect picture.
            mean: if t.compared == 0 {
                Psnr { y: 0.0, all: 0.0 }
            } else {
                t.error.psnr()
            },
            worst_y: if t.compared == 0 { 0.0 } else { t.worst_y },
        })
        .collect())
}

/// Whether RTP time `a` lies before `b` (wrapping).
fn passed(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < u32::MAX / 2
}

/// A picture of `format` (I420 or NV12) at `w`x`h`, each byte of each
/// plane's rows, stride padding included, `fill(plane, x, row)`: test
/// pictures.
pub fn filled(
    w: u32,
    h: u32,
    format: Pixel,
    fill: impl Fn(usize, usize, usize) -> u8,
) -> ffmpeg::frame::Video {
    let mut p = ffmpeg::frame::Video::new(format, w, h);
    let planes = if format == Pixel::NV12 { 2 } else { 3 };
    for plane in 0..planes {
        let stride = p.stride(plane);
        let rows = if plane == 0 { h } else { h / 2 } as usize;
        let data = p.data_mut(plane);
        for r in 0..rows {
            for x in 0..stride {
                data[r * stride + x] = fill(plane, x, r);
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_box_filter_averages_each_footprint() {
        crate::pipeline::init().expect("ffmpeg");
        // Luma columns alternate 0 and 200: every 2x-down pixel is 100.
        let p = filled(64, 32, Pixel::YUV420P, |plane, x, _| match plane {
            0 => {
                if x % 2 == 0 {
                    0
                } else {
                    200
                }
            }
            1 => 60,
            _ => 180,
        });
        let half = Size {
            width: 32,
            height: 16,
        };
        let r = reference_scale(&p, half);
        assert!(r[0].iter().all(|v| *v == 100), "{:?}", &r[0][..8]);
        assert!(r[1].iter().all(|v| *v == 60));
        assert!(r[2].iter().all(|v| *v == 180));
        // NV12: U and V interleaved, read apart.
        let p = filled(64, 32, Pixel::NV12, |plane, x, _| match plane {
            0 => 16,
            _ => {
                if x % 2 == 0 {
                    90
                } else {
                    150
                }
            }
        });
        let quarter = Size {
            width: 16,
            height: 8,
        };
        let r = reference_scale(&p, quarter);
        assert!(r[0].iter().all(|v| *v == 16));
        assert!(r[1].iter().all(|v| *v == 90), "{:?}", &r[1][..4]);
        assert!(r[2].iter().all(|v| *v == 150));
        // A picture equal to the reference differs by 0, one pixel off by 7.
        let mut out = ffmpeg::frame::Video::new(Pixel::YUV420P, 16, 8);
        for (plane, values) in r.iter().enumerate() {
            let (pw, ph) = if plane == 0 { (16, 8) } else { (8, 4) };
            let stride = out.stride(plane);
            for row in 0..ph {
                out.data_mut(plane)[row * stride..row * stride + pw]
                    .copy_from_slice(&values[row * pw..(row + 1) * pw]);
            }
        }
        assert_eq!(max_difference(&out, &r), 0);
        assert_eq!(psnr(&out, &r).y, IDENTICAL_DB);
        out.data_mut(0)[0] += 7;
        assert_eq!(max_difference(&out, &r), 7);
        // PSNR: 49 over the 128 luma samples; over all 192, 49 / 192.
        let p = psnr(&out, &r);
        let want = |n: f64| 10.0 * (255.0f64 * 255.0 * n / 49.0).log10();
        assert!((p.y - want(128.0)).abs() < 1e-9, "{p}");
        assert!((p.all - want(192.0)).abs() < 1e-9, "{p}");
    }
}
