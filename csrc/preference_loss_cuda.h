// Launchers of the CUDA kernels (preference_loss_cuda.cu), called by preference_loss.cpp with raw pointers
// and the current stream: the .cu includes no torch header, so it compiles with nvcc alone.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "preference_loss.h"

namespace rpo_fast {
namespace cuda {

// Element types of model_pred / target / ref_pred (all three the same; the Python side makes them so).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// part (rows, chunks, 5): chunk partial sums of m, r, delta, <e,d>, |d|^2 (not divided by N).
// t_rows == rows / 2: the target is shared by rows i and i + t_rows.
cudaError_t errors_fwd(int dtype, const void* p, const void* t, const void* q, float* part, int64_t rows,
                       int64_t t_rows, int64_t n, int64_t chunks, bool has_ref, bool dspo, cudaStream_t stream);

// out = go * (ge (p - t) + gd (p - q)), in the inputs' dtype.
cudaError_t errors_bwd(int dtype, const float* go, const void* p, const void* t, const void* q, const float* ge,
                       const float* gd, void* out, int64_t rows, int64_t t_rows, int64_t n, bool has_d,
                       cudaStream_t stream);

// Per-pair objectives (and sft): loss, metrics (kMetrics), ge, gd (rows). weights, timesteps: may be null.
cudaError_t pair_fwd(const float* part, const float* weights, const int64_t* timesteps, float* ge, float* gd,
                     float* loss, float* metrics, int64_t b, int64_t n, int64_t chunks, PairScalars s,
                     cudaStream_t stream);

// Floats of scratch rpo_fwd needs: the B x B cosine matrix and per-sample vectors.
inline int64_t rpo_scratch_floats(int64_t b) { return b * b + 8 * b; }

// RPO (the B x B matrix): embeds (B, D) fp32, scratch of rpo_scratch_floats(b) floats.
cudaError_t rpo_fwd(const float* part, const float* embeds_w, const float* embeds_l, float* ge, float* gd,
                    float* loss, float* metrics, float* scratch, int64_t b, int64_t d, int64_t n, int64_t chunks,
                    float half_beta, float inv_tau, bool inside, cudaStream_t stream);

}  // namespace cuda
}  // namespace rpo_fast
