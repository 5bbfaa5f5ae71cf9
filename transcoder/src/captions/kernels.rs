//! The GPU engine's seven kernels, CUDA C (f32), compiled at start with
//! NVRTC by `captions/gpu.rs` (feature `cuda`). Kept apart from the CUDA
//! code so that the tests here compile them both with NVRTC and, through
//! a small C++ stand-in for CUDA's threads and barriers, with the host's
//! C++ compiler, and check what they compute against the CPU mirror
//! (`tests/kernels.rs`).

/// The kernels, f32. Reductions use blocks of exactly 256 threads (`BLOCK`).
pub const KERNELS: &str = r#"
#define BLOCK 256

// cols[t, c*3 + k] = x[c, t*stride + k - 1] (0 outside): a kernel-3,
// padding-1 convolution as one matrix product. x's element (c, t) is at
// x[c*sc + t*st].
extern "C" __global__ void im2col3(const float* x, int sc, int st, int cin, int tin,
                                   int stride, int tout, float* cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t w = (size_t)cin * 3;
    if (i >= (size_t)tout * w) return;
    int t = (int)(i / w);
    int r = (int)(i % w);
    int c = r / 3, k = r % 3;
    int s = t * stride + k - 1;
    cols[i] = (s >= 0 && s < tin) ? x[(size_t)c * sc + (size_t)s * st] : 0.0f;
}

// y[r, j] += b[j], then GELU (erf form) if gelu.
extern "C" __global__ void bias_act(float* y, const float* b, int rows, int cols, int gelu) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    float v = y[i] + b[i % cols];
    if (gelu) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    y[i] = v;
}

extern "C" __global__ void add_into(float* y, const float* x, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) y[i] += x[i];
}

__device__ float block_sum(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] += red[tid + o];
        __syncthreads();
    }
    float s = red[0];
    __syncthreads();
    return s;
}

__device__ float block_max(float v, float* red) {
    int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
        __syncthreads();
    }
    float s = red[0];
    __syncthreads();
    return s;
}

// One block per row of d: y = (x - mean) / sqrt(var + 1e-5) * g + b.
extern "C" __global__ void layer_norm(const float* x, const float* g, const float* b,
                                      float* y, int d) {
    __shared__ float red[BLOCK];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) s += xr[j];
    float mean = block_sum(s, red) / d;
    float v = 0.0f;
    for (int j = threadIdx.x; j < d; j += BLOCK) { float t = xr[j] - mean; v += t * t; }
    float inv = rsqrtf(block_sum(v, red) / d + 1e-5f);
    for (int j = threadIdx.x; j < d; j += BLOCK) yr[j] = (xr[j] - mean) * inv * g[j] + b[j];
}

// One block per row of cols (rows = heads * tq). Causal: row i of a head
// (i = row % tq) sees columns up to offset + i.
extern "C" __global__ void softmax_rows(float* s, int cols, int tq, int offset, int causal) {
    __shared__ float red[BLOCK];
    float* r = s + (size_t)blockIdx.x * cols;
    int lim = cols;
    if (causal) lim = min(cols, offset + (int)(blockIdx.x % tq) + 1);
    float m = -3.0e38f;
    for (int j = threadIdx.x; j < lim; j += BLOCK) m = fmaxf(m, r[j]);
    m = block_max(m, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < lim; j += BLOCK) { float e = expf(r[j] - m); r[j] = e; sum += e; }
    float inv = 1.0f / block_sum(sum, red);
    for (int j = threadIdx.x; j < cols; j += BLOCK) r[j] = j < lim ? r[j] * inv : 0.0f;
}

// x[r, j] = table[tok[r], j] + pos[offset + r, j]
extern "C" __global__ void embed_tokens(const unsigned int* tok, const float* table,
                                        const float* pos, int offset, int n, int d, float* x) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * d) return;
    int r = (int)(i / d), j = (int)(i % d);
    x[i] = table[(size_t)tok[r] * d + j] + pos[(size_t)(offset + r) * d + j];
}

// One block: the index of the largest logits[j] + mask[j] (the first on ties).
extern "C" __global__ void argmax_masked(const float* l, const float* mask, int n, int* out) {
    __shared__ float bv[BLOCK];
    __shared__ int bi[BLOCK];
    int tid = threadIdx.x;
    float best = -3.4e38f;
    int idx = 0x7fffffff;
    for (int j = tid; j < n; j += BLOCK) {
        float v = l[j] + mask[j];
        if (v > best) { best = v; idx = j; }
    }
    bv[tid] = best; bi[tid] = idx;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (tid < o) {
            float v2 = bv[tid + o]; int i2 = bi[tid + o];
            if (v2 > bv[tid] || (v2 == bv[tid] && i2 < bi[tid])) { bv[tid] = v2; bi[tid] = i2; }
        }
        __syncthreads();
    }
    if (tid == 0) out[0] = bi[0] == 0x7fffffff ? 0 : bi[0];
}
"#;
