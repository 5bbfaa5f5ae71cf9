//! The GPU engine's CUDA C kernels (`captions/kernels.rs`) run on the CPU
//! and checked against the engine's CPU mirror (`captions/mirror.rs`),
//! which the engine test checks against candle: so the kernels' own code
//! (indexing, grid-stride bounds, shared-memory reductions, the causal
//! limit) is tested without a GPU.
//!
//! How: the kernel source is compiled by the host's C++ compiler (C++20)
//! with a small stand-in for CUDA's execution model: each block runs as
//! `blockDim.x` OS threads meeting at a `std::barrier` for
//! `__syncthreads()`, `__shared__` arrays are shared by the block's
//! threads, blocks run one after another. A driver launches one kernel on
//! inputs the test writes, with the grid `captions/gpu.rs` uses, and
//! writes the output back.

use std::path::{Path, PathBuf};
use std::process::Command;

use balie_transcoder::captions::engine::Lane;
use balie_transcoder::captions::kernels::KERNELS;
use balie_transcoder::captions::mirror::MirrorLane;

const SHIM: &str = r#"
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>
using std::max;
using std::min;
struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static thread_local std::barrier<>* block_barrier;
#define __global__
#define __device__
#define __shared__ static
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// One launch: blocks one after another, each as its threads.
template <class F> void launch3(dim3 grid, dim3 block, F f) {
    blockDim = block;
    gridDim = grid;
    unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
        std::barrier<> bar(n);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; t++)
            ts.emplace_back([&, t, bx, by, bz] {
                threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                blockIdx = {bx, by, bz};
                block_barrier = &bar;
                f();
            });
        for (auto& t : ts) t.join();
    }
}
template <class F> void launch(unsigned grid, unsigned block, F f) {
    launch3({grid, 1, 1}, {block, 1, 1}, f);
}
"#;

const DRIVER: &str = r#"
static std::vector<float> rd(const char* name) {
    FILE* f = std::fopen(name, "rb");
    if (!f) { std::perror(name); std::exit(2); }
    std::vector<float> v;
    float x;
    while (std::fread(&x, 4, 1, f) == 1) v.push_back(x);
    std::fclose(f);
    return v;
}
static void wr(const std::vector<float>& v) {
    FILE* f = std::fopen("out.bin", "wb");
    std::fwrite(v.data(), 4, v.size(), f);
    std::fclose(f);
}
static std::vector<unsigned char> rd8(const char* name) {
    std::vector<float> v = rd(name);
    return std::vector<unsigned char>(v.begin(), v.end());
}
static unsigned blocks(size_t n) { return (unsigned)std::max<size_t>(1, (n + 255) / 256); }
int main(int argc, char** argv) {
    std::string k = argv[1];
    std::vector<int> a;
    for (int i = 2; i < argc; i++) a.push_back(std::atoi(argv[i]));
    if (k == "im2col") {
        auto x = rd("x.bin");
        std::vector<float> cols((size_t)a[5] * a[2] * 3, -1.0f);
        launch(blocks(cols.size()), 256, [&] { im2col3(x.data(), a[0], a[1], a[2], a[3], a[4], a[5], cols.data()); });
        wr(cols);
    } else if (k == "bias_act") {
        auto y = rd("y.bin"); auto b = rd("b.bin");
        launch(blocks((size_t)a[0] * a[1]), 256, [&] { bias_act(y.data(), b.data(), a[0], a[1], a[2]); });
        wr(y);
    } else if (k == "add") {
        auto y = rd("y.bin"); auto x = rd("x.bin");
        launch(blocks(a[0]), 256, [&] { add_into(y.data(), x.data(), a[0]); });
        wr(y);
    } else if (k == "layer_norm") {
        auto x = rd("x.bin"); auto g = rd("g.bin"); auto b = rd("b.bin");
        std::vector<float> y((size_t)a[0] * a[1]);
        launch(a[0], 256, [&] { layer_norm(x.data(), g.data(), b.data(), y.data(), a[1]); });
        wr(y);
    } else if (k == "softmax") {
        auto s = rd("s.bin");
        launch(a[0], 256, [&] { softmax_rows(s.data(), a[1], a[2], a[3], a[4]); });
        wr(s);
    } else if (k == "embed") {
        auto tf = rd("tok.bin"); auto table = rd("table.bin"); auto pos = rd("pos.bin");
        std::vector<unsigned> tok(tf.begin(), tf.end());
        std::vector<float> x((size_t)a[1] * a[2]);
        launch(blocks(x.size()), 256, [&] { embed_tokens(tok.data(), table.data(), pos.data(), a[0], a[1], a[2], x.data()); });
        wr(x);
    } else if (k == "argmax") {
        auto l = rd("l.bin"); auto m = rd("m.bin");
        int out = -1;
        launch(1, 256, [&] { argmax_masked(l.data(), m.data(), a[0], &out); });
        wr(std::vector<float>{(float)out});
#ifdef SCALER
    } else if (k == "scale") {
        // sy suv cstep sw sh n out_len grid.x grid.y
        auto y = rd8("y.bin"); auto u = rd8("u.bin"); auto v = rd8("v.bin");
        auto lf = rd("layers.bin");
        std::vector<int> layers(lf.begin(), lf.end());
        std::vector<unsigned char> out(a[6], 0);
        const unsigned char* vp = a[2] == 2 ? u.data() + 1 : v.data();
        launch3({(unsigned)a[7], (unsigned)a[8], (unsigned)a[5]}, {16, 16, 1}, [&] {
            scale_layers(y.data(), a[0], u.data(), vp, a[1], a[2], a[3], a[4], layers.data(), a[5], out.data());
        });
        wr(std::vector<float>(out.begin(), out.end()));
#endif
    } else {
        return 3;
    }
    return 0;
}
"#;

/// The kernels compiled for the CPU, once per test binary (with the
/// `cuda` feature, issue 6's scaling kernel too).
fn driver() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // Under cargo's target folder, not the system's temp folder: the
        // static is never dropped, so nothing would remove it.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("balie-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let src = dir.join("kernels.cpp");
        #[cfg(feature = "cuda")]
        let scaler = format!("#define SCALER 1\n{}", balie_transcoder::gpu::KERNEL);
        #[cfg(not(feature = "cuda"))]
        let scaler = String::new();
        std::fs::write(&src, format!("{SHIM}\n{KERNELS}\n{scaler}\n{DRIVER}")).expect("source");
        let bin = dir.join("kernels");
        let out = Command::new("c++")
            .args(["-std=c++20", "-O1", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("a C++ compiler (the test command installs g++)");
        assert!(
            out.status.success(),
            "the kernels do not compile as C++: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

/// Run one kernel in a fresh folder with these input files.
fn run(kernel: &str, args: &[i64], inputs: &[(&str, &[f32])]) -> Vec<f32> {
    let dir = tempdir(kernel);
    for (name, data) in inputs {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}.bin")), bytes).expect("input");
    }
    let out = Command::new(driver())
        .arg(kernel)
        .args(args.iter().map(|a| a.to_string()))
        .current_dir(&dir)
        .output()
        .expect("the driver runs");
    assert!(out.status.success(), "{kernel}: {out:?}");
    let bytes = std::fs::read(dir.join("out.bin")).expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tempdir(kernel: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("balie-kernel-{kernel}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761);
            (h % 20_001) as f32 / 5_000.0 - 2.0
        })
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: at {i}, the kernel gives {g}, the mirror {w}"
        );
    }
}

#[test]
fn im2col_bias_gelu_and_add_compute_what_the_mirror_does() {
    let lane = MirrorLane;
    // The mel layout (channel-major, stride 1) and the conv1 output's
    // (time-major, stride 2), 300+ elements so several blocks run.
    for dims in [[40usize, 1, 5, 40, 1, 40], [1, 7, 7, 31, 2, 16]] {
        let [sc, st, cin, tin, _, tout] = dims;
        let x = values((cin - 1) * sc + (tin - 1) * st + 1, 1);
        let got = run("im2col", &dims.map(|d| d as i64), &[("x", &x)]);
        let mut want = vec![0f32; tout * cin * 3];
        lane.im2col(&x, dims, &mut want).expect("mirror");
        close("im2col", &got, &want, 0.0);
    }
    let (rows, cols) = (7, 93);
    let (y, b) = (values(rows * cols, 2), values(cols, 3));
    for gelu in [false, true] {
        let got = run(
            "bias_act",
            &[rows as i64, cols as i64, i64::from(gelu)],
            &[("y", &y), ("b", &b)],
        );
        let mut want = y.clone();
        lane.bias_act((&mut want, 0), &b, rows, cols, gelu)
            .expect("mirror");
        close("bias_act", &got, &want, 1e-6);
    }
    let (y, x) = (values(700, 4), values(700, 5));
    let got = run("add", &[700], &[("y", &y), ("x", &x)]);
    let mut want = y.clone();
    lane.add(&mut want, (&x, 0), 700).expect("mirror");
    close("add", &got, &want, 0.0);
}

#[test]
fn layer_norm_and_softmax_reduce_across_the_block_as_the_mirror_does() {
    let lane = MirrorLane;
    // d over and under the block of 256 threads.
    for (rows, d) in [(3usize, 300usize), (2, 100)] {
        let (x, g, b) = (values(rows * d, 6), values(d, 7), values(d, 8));
        let got = run(
            "layer_norm",
            &[rows as i64, d as i64],
            &[("x", &x), ("g", &g), ("b", &b)],
        );
        let mut want = vec![0f32; rows * d];
        lane.layer_norm((&x, 0), (&g, &b), &mut want, rows, d)
            .expect("mirror");
        close("layer_norm", &got, &want, 1e-5);
    }
    // Two heads of 3 new rows over 9 columns, causal from position 6; and
    // plain rows longer than the block.
    for (rows, cols, tq, causal) in [(6usize, 9usize, 3usize, Some(6usize)), (2, 300, 2, None)] {
        let s = values(rows * cols, 9);
        let got = run(
            "softmax",
            &[
                rows as i64,
                cols as i64,
                tq as i64,
                causal.unwrap_or(0) as i64,
                i64::from(causal.is_some()),
            ],
            &[("s", &s)],
        );
        let mut want = s.clone();
        lane.softmax(&mut want, rows, cols, tq, causal)
            .expect("mirror");
        close("softmax", &got, &want, 1e-6);
    }
}

#[test]
fn embedding_and_the_masked_argmax_pick_what_the_mirror_picks() {
    let lane = MirrorLane;
    let (vocab, positions, d) = (50usize, 12usize, 20usize);
    let (table, pos) = (values(vocab * d, 10), values(positions * d, 11));
    let tokens = [3u32, 49, 0, 17];
    let tf: Vec<f32> = tokens.iter().map(|t| *t as f32).collect();
    let got = run(
        "embed",
        &[5, tokens.len() as i64, d as i64],
        &[("tok", &tf), ("table", &table), ("pos", &pos)],
    );
    let mut want = vec![0f32; tokens.len() * d];
    lane.embed(&tokens, (&table, &pos), 5, d, &mut want)
        .expect("mirror");
    close("embed", &got, &want, 0.0);
    // The largest entry masked off: the next largest wins, on both.
    let n = 1_000;
    let logits = values(n, 12);
    let top = (0..n)
        .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
        .expect("an entry");
    let mut mask = vec![0f32; n];
    mask[top] = f32::NEG_INFINITY;
    let got = run("argmax", &[n as i64], &[("l", &logits), ("m", &mask)]);
    let want = lane.argmax(&logits, &mask, n).expect("mirror");
    assert_eq!(got, vec![want as f32]);
    assert_ne!(want as usize, top);
}

/// Issue 6's scaling kernel (feature `cuda`): every layer of an I420 and of
/// an NV12 picture, from one launch with `gpu.rs`'s grid and parameters,
/// equals the CPU reference of its box filter, byte for byte.
#[cfg(feature = "cuda")]
#[test]
fn the_scaling_kernel_makes_every_layer_as_the_reference_does() {
    use balie_offload::Size;
    use balie_transcoder::gpu::{layer_params, scale_grid};
    use balie_transcoder::picture::{filled, reference_scale};
    use ffmpeg_next::format::Pixel;
    balie_transcoder::pipeline::init().expect("ffmpeg");
    let sizes = [
        Size {
            width: 48,
            height: 24,
        },
        Size {
            width: 24,
            height: 12,
        },
    ];
    // 80 wide: rows padded past the width (FFmpeg aligns its strides), as
    // NVDEC's pitched frames in GPU memory are (`--nvdec resident`).
    let mut pitched = 0;
    for (format, (w, h)) in [Pixel::YUV420P, Pixel::NV12]
        .into_iter()
        .flat_map(|f| [(f, (96u32, 48u32)), (f, (80, 48))])
    {
        let p = filled(w, h, format, |plane, x, r| {
            ((x * 7 + r * 13 + plane * 50) % 251) as u8
        });
        if p.stride(0) > w as usize {
            pitched += 1;
        }
        let (params, offsets, len) = layer_params(&sizes);
        let (grid, _) = scale_grid(&sizes);
        let nv12 = format == Pixel::NV12;
        let bytes =
            |plane: usize| -> Vec<f32> { p.data(plane).iter().map(|b| f32::from(*b)).collect() };
        let v = if nv12 { vec![0f32] } else { bytes(2) };
        let layers: Vec<f32> = params.iter().map(|x| *x as f32).collect();
        let out = run(
            "scale",
            &[
                p.stride(0) as i64,
                p.stride(1) as i64,
                if nv12 { 2 } else { 1 },
                i64::from(w),
                i64::from(h),
                sizes.len() as i64,
                len as i64,
                i64::from(grid.0),
                i64::from(grid.1),
            ],
            &[
                ("y", &bytes(0)),
                ("u", &bytes(1)),
                ("v", &v),
                ("layers", &layers),
            ],
        );
        for (size, offs) in sizes.iter().zip(&offsets) {
            let reference = reference_scale(&p, *size);
            let (lw, lh) = (usize::from(size.width), usize::from(size.height));
            for (plane, n) in [lw * lh, lw * lh / 4, lw * lh / 4].into_iter().enumerate() {
                let got: Vec<u8> = out[offs[plane]..offs[plane] + n]
                    .iter()
                    .map(|x| *x as u8)
                    .collect();
                assert_eq!(
                    got, reference[plane],
                    "{format:?} {w}x{h} {size:?} plane {plane}"
                );
            }
        }
    }
    assert!(pitched >= 2, "no picture with rows past its width");
}
