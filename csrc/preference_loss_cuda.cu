// CUDA kernels of the native preference loss: the algorithm of the Triton op with the math of
// preference_loss.h. fp32 accumulation; every reduction is a fixed tree (warp shuffles, then one warp over
// the warps' results), so the same input gives the same bits. No torch header: nvcc compiles this alone.
//
// Launches: forward = errors_fwd + pair (per-pair objectives) or errors_fwd + 5 small RPO launches (norms and
// deltas, the cosine matrix, rows, columns, the scalar reductions); backward = errors_bwd.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "preference_loss_cuda.h"

namespace rpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // every kernel but the cosine tile
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 16;  // cosine matrix tile (16 x 16 threads)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces v[0..K) over the block (kThreads) in a fixed tree; the result is valid in thread 0.
template <int K, typename Op>
__device__ __forceinline__ void block_reduce(float (&v)[K], float* smem /* kWarps * K */, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] = op(v[k], __shfl_down_sync(0xffffffffu, v[k], off));
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float x = lane < kWarps ? smem[lane * K + k] : v[k];
      // lanes past the warps carry their own value, never combined (the mask below)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        float y = __shfl_down_sync(0xffffffffu, x, off);
        x = (lane + off < kWarps) ? op(x, y) : x;
      }
      v[k] = x;
    }
  }
  __syncthreads();
}

// Grid (t_rows, chunks): the five sums of one chunk of a row (both rows of a pair when the target is shared).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    errors_fwd_kernel(const T* __restrict__ P, const T* __restrict__ Tg, const T* __restrict__ Q, float* part,
                      int64_t n, int64_t chunk, int64_t t_rows, int64_t chunks, bool has_ref, bool dspo, bool shared) {
  __shared__ float smem[kWarps * 2 * kParts];
  const int64_t tr = blockIdx.x, c = blockIdx.y;
  const int64_t lo = min(n, c * chunk), hi = min(n, lo + chunk);
  float a[2 * kParts] = {};
  const T* p0 = P + tr * n;
  const T* q0 = Q + tr * n;
  const T* p1 = P + (tr + t_rows) * n;
  const T* q1 = Q + (tr + t_rows) * n;
  const T* tt = Tg + tr * n;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float t = to_float(tt[i]);
    accumulate(to_float(p0[i]), t, has_ref ? to_float(q0[i]) : 0.0f, has_ref, dspo, &a[0], &a[1], &a[2], &a[3],
               &a[4]);
    if (shared)
      accumulate(to_float(p1[i]), t, has_ref ? to_float(q1[i]) : 0.0f, has_ref, dspo, &a[5], &a[6], &a[7], &a[8],
                 &a[9]);
  }
  block_reduce(a, smem, Sum());
  if (threadIdx.x == 0) {
    float* o0 = part + (tr * chunks + c) * kParts;
    float* o1 = part + ((tr + t_rows) * chunks + c) * kParts;
    for (int k = 0; k < kParts; ++k) {
      o0[k] = a[k];
      if (shared) o1[k] = a[kParts + k];
    }
  }
}

// Grid (t_rows, blocks of kThreads * 4 elements): dL/dp = go (ge (p - t) + gd (p - q)).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    errors_bwd_kernel(const float* __restrict__ GO, const T* __restrict__ P, const T* __restrict__ Tg,
                      const T* __restrict__ Q, const float* __restrict__ GE, const float* __restrict__ GD, T* OUT,
                      int64_t n, int64_t t_rows, bool has_d, bool shared) {
  const int64_t tr = blockIdx.x;
  const float go = *GO;
  const int rows_here = shared ? 2 : 1;
  for (int64_t k = 0; k < 4; ++k) {
    const int64_t i = (static_cast<int64_t>(blockIdx.y) * 4 + k) * kThreads + threadIdx.x;
    if (i >= n) return;
    const float t = to_float(Tg[tr * n + i]);
    for (int r = 0; r < rows_here; ++r) {
      const int64_t row = tr + r * t_rows, at = row * n + i;
      const float q = has_d ? to_float(Q[at]) : 0.0f;
      OUT[at] = from_float<T>(grad_element(to_float(P[at]), t, q, GE[row], GD[row], go, has_d));
    }
  }
}

// One block: every pair's terms, gradient coefficients and the metrics' sums.
__global__ void __launch_bounds__(kThreads)
    pair_kernel(const float* __restrict__ part, const float* __restrict__ W, const int64_t* __restrict__ TS,
                float* GE, float* GD, float* LOSS, float* MET, int64_t b, int64_t n, int64_t chunks, PairScalars s) {
  __shared__ float smem[kWarps * kMetrics];
  __shared__ bool big_s;
  const float inv_n = 1.0f / static_cast<float>(n), two_n = 2.0f / static_cast<float>(n);
  const float inv_b = 1.0f / static_cast<float>(b);
  float w[kParts];
  if (threadIdx.x == 0) big_s = false;
  if (s.obj == kDSPO && s.sdxl) {  // the batch mean of |d^w|^2 / N
    float acc[1] = {0.0f};
    for (int64_t i = threadIdx.x; i < b; i += kThreads) {
      sample_stats(part, i, chunks, inv_n, w);
      acc[0] += w[4];
    }
    block_reduce(acc, smem, Sum());
    if (threadIdx.x == 0) big_s = acc[0] * inv_b >= 0.1f;
  }
  __syncthreads();
  const bool big = big_s;
  float v[kMetrics] = {};  // v[kLoss]: the loss sum
  for (int64_t i = threadIdx.x; i < b; i += kThreads)
    pair_sample(part, i, b, chunks, inv_n, two_n * inv_b, s, W, TS, big, GE, GD, v);
  block_reduce(v, smem, Sum());
  if (threadIdx.x == 0) {
    *LOSS = v[kLoss] * inv_b;
    MET[kLoss] = v[kLoss] * inv_b;
    for (int k = 1; k < kWeightDiag; ++k) MET[k] = v[k] * inv_b;
    MET[kWeightDiag] = 0.0f;
  }
}

// RPO scratch: inv[2B] (1/|e|), delta[2B], row[4B] (softmax max, sum, loss part, w_ii), cos[B*B].
__global__ void __launch_bounds__(kThreads)
    rpo_prepare_kernel(const float* __restrict__ part, const float* __restrict__ EW, const float* __restrict__ EL,
                       float* inv, float* delta, int64_t b, int64_t d, int64_t n, int64_t chunks) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= 2 * b) return;
  const float* e = k < b ? EW + k * d : EL + (k - b) * d;
  float s = 0.0f;
  for (int64_t j = 0; j < d; ++j) s += e[j] * e[j];
  inv[k] = 1.0f / fmaxf(sqrtf(s), 1e-12f);
  float st[kParts];
  sample_stats(part, k, chunks, 1.0f / static_cast<float>(n), st);
  delta[k] = st[2];
}

// Grid (ceil(B/16), ceil(B/16)), block 16 x 16: cos_ij = <e^w_i, e^l_j> / (|e^w_i| |e^l_j|), summed over D in order.
__global__ void __launch_bounds__(kTile* kTile)
    rpo_cos_kernel(const float* __restrict__ EW, const float* __restrict__ EL, const float* __restrict__ inv,
                   float* cos, int64_t b, int64_t d) {
  __shared__ float a[kTile][kTile + 1], c[kTile][kTile + 1];
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t jl = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;  // the column this thread loads
  float dot = 0.0f;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + threadIdx.x;
    a[threadIdx.y][threadIdx.x] = (i < b && k < d) ? EW[i * d + k] : 0.0f;
    c[threadIdx.y][threadIdx.x] = (jl < b && k < d) ? EL[jl * d + k] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) dot += a[threadIdx.y][kk] * c[threadIdx.x][kk];
    __syncthreads();
  }
  if (i < b && j < b) cos[i * b + j] = dot * inv[i] * inv[b + j];
}

// One block per row i: the softmax over j, the row's loss and the row sum of dL/dD (g^w_i).
__global__ void __launch_bounds__(kThreads)
    rpo_row_kernel(const float* __restrict__ cos, const float* __restrict__ delta, float* row, float* GE, float* GD,
                   int64_t b, int64_t n, float half_beta, float inv_tau, bool inside) {
  __shared__ float smem[kWarps * 3];
  __shared__ float stat[2];
  const int64_t i = blockIdx.x;
  const float inv_b = 1.0f / static_cast<float>(b), inv_n = 1.0f / static_cast<float>(n);
  const float* ci = cos + i * b;
  float mx[1] = {-INFINITY};
  for (int64_t j = threadIdx.x; j < b; j += kThreads) mx[0] = fmaxf(mx[0], ci[j] * inv_tau);
  block_reduce(mx, smem, Max());
  if (threadIdx.x == 0) stat[0] = mx[0];
  __syncthreads();
  const float rmax = stat[0];
  float sum[1] = {0.0f};
  for (int64_t j = threadIdx.x; j < b; j += kThreads) sum[0] += expf(ci[j] * inv_tau - rmax);
  block_reduce(sum, smem, Sum());
  if (threadIdx.x == 0) stat[1] = sum[0];
  __syncthreads();
  const float rsum = stat[1];
  float acc[3] = {0.0f, 0.0f, 0.0f};  // loss, g, w_ii
  for (int64_t j = threadIdx.x; j < b; j += kThreads) {
    RpoTerm o = rpo_term(ci[j], rmax, rsum, delta[i], delta[b + j], half_beta, inv_tau, inv_b, inside);
    acc[0] += o.loss;
    acc[1] += o.g;
    if (j == i) acc[2] += o.w;
  }
  block_reduce(acc, smem, Sum());
  if (threadIdx.x == 0) {
    row[i * 4 + 0] = rmax;
    row[i * 4 + 1] = rsum;
    row[i * 4 + 2] = acc[0];
    row[i * 4 + 3] = acc[2];
    GE[i] = 2.0f * inv_n * -half_beta * acc[1];
    GD[i] = 0.0f;
  }
}

// One block per column j: the column sum of dL/dD (g^l_j), a second launch instead of atomics.
__global__ void __launch_bounds__(kThreads)
    rpo_col_kernel(const float* __restrict__ cos, const float* __restrict__ delta, const float* __restrict__ row,
                   float* GE, float* GD, int64_t b, int64_t n, float half_beta, float inv_tau, bool inside) {
  __shared__ float smem[kWarps];
  const int64_t j = blockIdx.x;
  const float inv_b = 1.0f / static_cast<float>(b), inv_n = 1.0f / static_cast<float>(n);
  float g[1] = {0.0f};
  for (int64_t i = threadIdx.x; i < b; i += kThreads)
    g[0] += rpo_term(cos[i * b + j], row[i * 4 + 0], row[i * 4 + 1], delta[i], delta[b + j], half_beta, inv_tau,
                     inv_b, inside)
                .g;
  block_reduce(g, smem, Sum());
  if (threadIdx.x == 0) {
    GE[b + j] = 2.0f * inv_n * half_beta * g[0];
    GD[b + j] = 0.0f;
  }
}

// One block: the loss (row parts already carry 1/B or 1/B^2) and the metrics.
__global__ void __launch_bounds__(kThreads)
    rpo_final_kernel(const float* __restrict__ part, const float* __restrict__ row, float* LOSS, float* MET, int64_t b,
                     int64_t n, int64_t chunks, float half_beta) {
  __shared__ float smem[kWarps * kMetrics];
  const float inv_n = 1.0f / static_cast<float>(n), inv_b = 1.0f / static_cast<float>(b);
  float v[kMetrics] = {};
  float w[kParts], l[kParts];
  for (int64_t i = threadIdx.x; i < b; i += kThreads) {
    sample_stats(part, i, chunks, inv_n, w);
    sample_stats(part, i + b, chunks, inv_n, l);
    PairTerms o;
    o.hw = -half_beta * w[2];
    o.hl = -half_beta * l[2];
    o.u = o.hw - o.hl;
    add_pair_metrics(v, o, w, l);
    v[kLoss] += row[i * 4 + 2];
    v[kWeightDiag] += row[i * 4 + 3];
  }
  block_reduce(v, smem, Sum());
  if (threadIdx.x == 0) {
    *LOSS = v[kLoss];
    MET[kLoss] = v[kLoss];
    for (int k = 1; k < kMetrics; ++k) MET[k] = v[k] * inv_b;
  }
}

template <typename T>
void launch_fwd(const void* p, const void* t, const void* q, float* part, int64_t rows, int64_t t_rows, int64_t n,
                int64_t chunks, bool has_ref, bool dspo, cudaStream_t stream) {
  const int64_t chunk = (n + chunks - 1) / chunks;
  errors_fwd_kernel<T><<<dim3(static_cast<unsigned>(t_rows), static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
      static_cast<const T*>(p), static_cast<const T*>(t), static_cast<const T*>(q), part, n, chunk, t_rows, chunks,
      has_ref, dspo, t_rows != rows);
}

template <typename T>
void launch_bwd(const float* go, const void* p, const void* t, const void* q, const float* ge, const float* gd,
                void* out, int64_t rows, int64_t t_rows, int64_t n, bool has_d, cudaStream_t stream) {
  const int64_t per_block = 4 * kThreads;
  const unsigned blocks = static_cast<unsigned>((n + per_block - 1) / per_block);
  errors_bwd_kernel<T><<<dim3(static_cast<unsigned>(t_rows), blocks), kThreads, 0, stream>>>(
      go, static_cast<const T*>(p), static_cast<const T*>(t), static_cast<const T*>(q), ge, gd, static_cast<T*>(out),
      n, t_rows, has_d, t_rows != rows);
}

}  // namespace

cudaError_t errors_fwd(int dtype, const void* p, const void* t, const void* q, float* part, int64_t rows,
                       int64_t t_rows, int64_t n, int64_t chunks, bool has_ref, bool dspo, cudaStream_t stream) {
  if (chunks > 65535) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: launch_fwd<float>(p, t, q, part, rows, t_rows, n, chunks, has_ref, dspo, stream); break;
    case kFloat16: launch_fwd<__half>(p, t, q, part, rows, t_rows, n, chunks, has_ref, dspo, stream); break;
    case kBFloat16: launch_fwd<__nv_bfloat16>(p, t, q, part, rows, t_rows, n, chunks, has_ref, dspo, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t errors_bwd(int dtype, const float* go, const void* p, const void* t, const void* q, const float* ge,
                       const float* gd, void* out, int64_t rows, int64_t t_rows, int64_t n, bool has_d,
                       cudaStream_t stream) {
  if ((n + 4 * kThreads - 1) / (4 * kThreads) > 65535) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: launch_bwd<float>(go, p, t, q, ge, gd, out, rows, t_rows, n, has_d, stream); break;
    case kFloat16: launch_bwd<__half>(go, p, t, q, ge, gd, out, rows, t_rows, n, has_d, stream); break;
    case kBFloat16: launch_bwd<__nv_bfloat16>(go, p, t, q, ge, gd, out, rows, t_rows, n, has_d, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t pair_fwd(const float* part, const float* weights, const int64_t* timesteps, float* ge, float* gd,
                     float* loss, float* metrics, int64_t b, int64_t n, int64_t chunks, PairScalars s,
                     cudaStream_t stream) {
  pair_kernel<<<1, kThreads, 0, stream>>>(part, weights, timesteps, ge, gd, loss, metrics, b, n, chunks, s);
  return cudaGetLastError();
}

cudaError_t rpo_fwd(const float* part, const float* embeds_w, const float* embeds_l, float* ge, float* gd,
                    float* loss, float* metrics, float* scratch, int64_t b, int64_t d, int64_t n, int64_t chunks,
                    float half_beta, float inv_tau, bool inside, cudaStream_t stream) {
  float* inv = scratch;
  float* delta = inv + 2 * b;
  float* row = delta + 2 * b;
  float* cos = row + 4 * b;
  const unsigned rows = static_cast<unsigned>(b);
  rpo_prepare_kernel<<<static_cast<unsigned>((2 * b + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      part, embeds_w, embeds_l, inv, delta, b, d, n, chunks);
  const unsigned tiles = static_cast<unsigned>((b + kTile - 1) / kTile);
  rpo_cos_kernel<<<dim3(tiles, tiles), dim3(kTile, kTile), 0, stream>>>(embeds_w, embeds_l, inv, cos, b, d);
  rpo_row_kernel<<<rows, kThreads, 0, stream>>>(cos, delta, row, ge, gd, b, n, half_beta, inv_tau, inside);
  rpo_col_kernel<<<rows, kThreads, 0, stream>>>(cos, delta, row, ge, gd, b, n, half_beta, inv_tau, inside);
  rpo_final_kernel<<<1, kThreads, 0, stream>>>(part, row, loss, metrics, b, n, chunks, half_beta);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rpo_fast
