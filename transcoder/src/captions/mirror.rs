//! The GPU engine's device on the CPU: every kernel of `captions/gpu.rs`
//! written again in Rust with the same arithmetic, and sgemm as cuBLAS
//! defines it (column-major, the same [`Gemm`] the GPU gets). Slow (plain
//! loops) and not for production: it exists so that the engine
//! ([`super::engine`]: its buffers, offsets, strides, the decoder's cache
//! and masks) runs in the tests here, against candle on the real model,
//! before it runs on a GPU. `Whisper::use_mirror` switches a model to it.

use super::engine::{Device, Gemm, Lane, R};

/// The CPU "device".
pub struct Mirror;

/// A lane of the mirror: buffers are vectors, calls run at once.
pub struct MirrorLane;

impl Device for Mirror {
    type Buf = Vec<f32>;
    type Lane = MirrorLane;

    fn name(&self) -> String {
        "the GPU engine's CPU mirror (tests only)".into()
    }

    fn is_gpu(&self) -> bool {
        false
    }

    fn lane(&self) -> R<MirrorLane> {
        Ok(MirrorLane)
    }

    fn upload(&self, v: &[f32]) -> R<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn uploaded(&self) -> R<()> {
        Ok(())
    }

    fn free_bytes(&self) -> Option<usize> {
        None
    }
}

/// GELU, erf form, as `bias_act` computes it (erf by Abramowitz and
/// Stegun 7.1.26 would be too coarse: this uses libm's through f64).
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(f64::from(v) * std::f64::consts::FRAC_1_SQRT_2) as f32)
}

/// erf to about 1e-12 (a continued series; f64).
fn erf(x: f64) -> f64 {
    // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)) for |x| < 3,
    // else 1 - erfc(x) by its continued fraction.
    let a = x.abs();
    let r = if a < 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

impl Lane for MirrorLane {
    type Buf = Vec<f32>;

    fn zeros(&self, n: usize) -> R<Vec<f32>> {
        Ok(vec![0.0; n.max(1)])
    }

    fn len(buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn write(&self, data: &[f32], to: &mut Vec<f32>) -> R<()> {
        to[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, from: &Vec<f32>, n: usize) -> R<Vec<f32>> {
        Ok(from[..n].to_vec())
    }

    fn gemm(
        &self,
        g: &Gemm,
        (a, oa): (&Vec<f32>, usize),
        (b, ob): (&Vec<f32>, usize),
        (c, oc): (&mut Vec<f32>, usize),
    ) -> R<()> {
        sgemm(g, &a[oa..], &b[ob..], &mut c[oc..]);
        Ok(())
    }

    fn im2col(&self, x: &Vec<f32>, dims: [usize; 6], cols: &mut Vec<f32>) -> R<()> {
        let [sc, st, cin, tin, stride, tout] = dims;
        let w = cin * 3;
        for (i, out) in cols[..tout * w].iter_mut().enumerate() {
            let (t, r) = (i / w, i % w);
            let (c, k) = (r / 3, r % 3);
            let s = (t * stride + k) as isize - 1;
            *out = if s >= 0 && (s as usize) < tin {
                x[c * sc + s as usize * st]
            } else {
                0.0
            };
        }
        Ok(())
    }

    fn bias_act(
        &self,
        (y, off): (&mut Vec<f32>, usize),
        b: &Vec<f32>,
        rows: usize,
        cols: usize,
        act: bool,
    ) -> R<()> {
        for (i, v) in y[off..off + rows * cols].iter_mut().enumerate() {
            let x = *v + b[i % cols];
            *v = if act { gelu(x) } else { x };
        }
        Ok(())
    }

    fn add(&self, y: &mut Vec<f32>, (x, off): (&Vec<f32>, usize), n: usize) -> R<()> {
        for (a, b) in y[..n].iter_mut().zip(&x[off..off + n]) {
            *a += b;
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        (x, off): (&Vec<f32>, usize),
        (g, b): (&Vec<f32>, &Vec<f32>),
        y: &mut Vec<f32>,
        rows: usize,
        d: usize,
    ) -> R<()> {
        for r in 0..rows {
            let xr = &x[off + r * d..off + (r + 1) * d];
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for j in 0..d {
                y[r * d + j] = (xr[j] - mean) * inv * g[j] + b[j];
            }
        }
        Ok(())
    }

    fn softmax(
        &self,
        s: &mut Vec<f32>,
        rows: usize,
        cols: usize,
        tq: usize,
        causal: Option<usize>,
    ) -> R<()> {
        for (row, r) in s[..rows * cols].chunks_mut(cols).enumerate() {
            let lim = causal.map_or(cols, |off| cols.min(off + row % tq + 1));
            let m = r[..lim].iter().copied().fold(-3.0e38f32, f32::max);
            let mut sum = 0.0;
            for v in &mut r[..lim] {
                *v = (*v - m).exp();
                sum += *v;
            }
            for (j, v) in r.iter_mut().enumerate() {
                *v = if j < lim { *v / sum } else { 0.0 };
            }
        }
        Ok(())
    }

    fn embed(
        &self,
        tokens: &[u32],
        (table, pos): (&Vec<f32>, &Vec<f32>),
        offset: usize,
        d: usize,
        x: &mut Vec<f32>,
    ) -> R<()> {
        for (r, tok) in tokens.iter().enumerate() {
            for j in 0..d {
                x[r * d + j] = table[*tok as usize * d + j] + pos[(offset + r) * d + j];
            }
        }
        Ok(())
    }

    fn argmax(&self, logits: &Vec<f32>, mask: &Vec<f32>, n: usize) -> R<u32> {
        let mut best = (f32::NEG_INFINITY, 0usize);
        for j in 0..n {
            let v = logits[j] + mask[j];
            if v > best.0 {
                best = (v, j);
            }
        }
        Ok(best.1 as u32)
    }

    fn sync(&self) -> R<()> {
        Ok(())
    }
}

/// A dot product in eight lanes (the compiler keeps a float sum in order,
/// so one accumulator would not vectorise).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// cuBLAS's strided batched sgemm as its documentation defines it:
/// element (i, p) of op(A) is `A[i*ai + p*ap]`, (p, j) of op(B) is
/// `B[p*bp + j*bj]`, (i, j) of C is `C[i + j*ldc]`.
pub fn sgemm(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (ai, ap) = if g.ta { (g.lda, 1) } else { (1, g.lda) };
    let (bp, bj) = if g.tb { (g.ldb, 1) } else { (1, g.ldb) };
    for batch in 0..g.batch {
        let (oa, ob, oc) = (batch * g.sa, batch * g.sb, batch * g.sc);
        for j in 0..g.n {
            let col = &mut c[oc + j * g.ldc..oc + j * g.ldc + g.m];
            if ai == 1 {
                // A's columns contiguous (not transposed): C's column j as a
                // sum of A's columns, each scaled by one element of B.
                col.fill(0.0);
                for p in 0..g.k {
                    let bv = b[ob + p * bp + j * bj];
                    let ac = &a[oa + p * ap..oa + p * ap + g.m];
                    for (x, y) in col.iter_mut().zip(ac) {
                        *x += y * bv;
                    }
                }
                col.iter_mut().for_each(|x| *x *= g.alpha);
                continue;
            }
            for (i, out) in col.iter_mut().enumerate() {
                let (ia, ib) = (oa + i * ai, ob + j * bj);
                let sum: f32 = if bp == 1 {
                    // Both contiguous along p (A transposed, B not): a dot product.
                    dot(&a[ia..ia + g.k], &b[ib..ib + g.k])
                } else {
                    (0..g.k).map(|p| a[ia + p] * b[ib + p * bp]).sum()
                };
                *out = g.alpha * sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::engine::{linear_cfg, scores_cfg, values_cfg};
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4, "at {i}: {x} against {y}");
        }
    }

    #[test]
    fn erf_and_gelu_match_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {}", erf(x));
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }

    #[test]
    fn the_linear_layout_is_x_times_w_transposed() {
        let (out, inp, n) = (5, 7, 3);
        let (w, x) = (values(out * inp, 1), values(n * inp, 2));
        let g = linear_cfg(out, inp, n);
        assert_eq!(g.extents(), (out * inp, n * inp, n * out));
        let mut y = vec![0f32; n * out];
        sgemm(&g, &w, &x, &mut y);
        let want: Vec<f32> = (0..n)
            .flat_map(|r| {
                let (w, x) = (&w, &x);
                (0..out).map(move |o| (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum())
            })
            .collect();
        close(&y, &want);
    }

    #[test]
    fn the_attention_layouts_give_each_heads_softmax_of_q_k_times_v() {
        let (heads, d, tq, tk) = (3, 12, 4, 6);
        let dh = d / heads;
        let (q, k, v) = (values(tq * d, 3), values(tk * d, 4), values(tk * d, 5));
        let lane = Mirror.lane().expect("lane");
        let mut s = vec![0f32; heads * tq * tk];
        let sc = scores_cfg(heads, d, tq, tk);
        assert_eq!(sc.extents(), (tk * d, tq * d, heads * tq * tk));
        sgemm(&sc, &k, &q, &mut s);
        // Causal from position tk - tq, as the decoder's new tokens.
        let offset = tk - tq;
        lane.softmax(&mut s, heads * tq, tk, tq, Some(offset))
            .expect("softmax");
        let mut o = vec![0f32; tq * d];
        sgemm(&values_cfg(heads, d, tq, tk), &v, &s, &mut o);
        // Row-major, head by head, as candle computes it.
        let mut want = vec![0f32; tq * d];
        for h in 0..heads {
            for i in 0..tq {
                let lim = tk.min(offset + i + 1);
                let w: Vec<f32> = (0..lim)
                    .map(|t| {
                        (0..dh)
                            .map(|j| q[i * d + h * dh + j] * k[t * d + h * dh + j])
                            .sum::<f32>()
                            / (dh as f32).sqrt()
                    })
                    .collect();
                let m = w.iter().copied().fold(f32::MIN, f32::max);
                let sum: f32 = w.iter().map(|x| (x - m).exp()).sum();
                for j in 0..dh {
                    want[i * d + h * dh + j] = (0..lim)
                        .map(|t| (w[t] - m).exp() / sum * v[t * d + h * dh + j])
                        .sum();
                }
            }
        }
        close(&o, &want);
    }
}
