// The native backend of rpo_fast's fused preference loss: operator schemas, the CPU kernels, and the CUDA
// registration (kernels in preference_loss_cuda.cu). The same algorithm as the Triton op
// (rpo_fast/kernels/preference_loss.py): one pass over model_pred, target and ref_pred writes five chunk
// partial sums per sample; the pairwise step reduces them in a fixed order and writes the loss, the metrics
// and two gradient coefficients per sample; the backward is one elementwise pass. The math is in
// preference_loss.h, shared with the CUDA kernels.
//
// Three ops, each writing outputs the caller allocates (so tests can poison them); the Python side
// (rpo_fast/kernels/native.py) allocates, registers fake kernels and builds the autograd op on them:
//   native_errors_fwd(p, t, q?, dspo, part!)                              part: (rows, chunks, 5) fp32
//   native_pair_fwd(part, n, obj, scalars, ew?, el?, w?, ts?, loss!, metrics!, ge!, gd!)
//   native_errors_bwd(go, p, t, q?, ge, gd, has_d, out!)
//
// Reductions run in an order fixed by the shapes alone (chunks and lanes, never threads), so the same
// input gives the same bits whatever at::get_num_threads() is.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "preference_loss.h"

#ifdef RPO_FAST_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "preference_loss_cuda.h"
#endif

namespace rpo_fast {
namespace {

constexpr int kLanes = 16;  // independent fp32 accumulators per sum: the inner loop vectorises

void check_rows(const at::Tensor& x, const char* name, int64_t rows, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() >= 2 && x.size(0) == rows && x.numel() == rows * n, name, ": expected ", rows, " rows of ",
              n, " elements, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", x.scalar_type());
  bool dense = x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK(dense, name, ": each row must be a dense block (contiguous or channels_last)");
}

void check_out(const at::Tensor& x, const char* name, int64_t numel, at::ScalarType dtype, const at::Device& dev) {
  TORCH_CHECK(x.numel() == numel && x.is_contiguous() && x.scalar_type() == dtype && x.device() == dev, name,
              ": expected a contiguous ", dtype, " tensor of ", numel, " elements on ", dev, ", got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
}

void check_inputs(const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q, int64_t* rows,
                  int64_t* t_rows, int64_t* n) {
  *rows = p.size(0);
  *n = p.numel() / std::max<int64_t>(*rows, 1);
  *t_rows = t.size(0);
  TORCH_CHECK(*t_rows == *rows || 2 * *t_rows == *rows, "target must have ", *rows, " or ", *rows / 2,
              " rows, got ", *t_rows);
  check_rows(p, "model_pred", *rows, *n, p.scalar_type());
  check_rows(t, "target", *t_rows, *n, p.scalar_type());
  if (q.has_value()) check_rows(*q, "ref_pred", *rows, *n, p.scalar_type());
  bool cl = !p.is_contiguous();
  TORCH_CHECK(cl == !t.is_contiguous() && (!q.has_value() || cl == !q->is_contiguous()),
              "model_pred, target and ref_pred must share one memory format");
}

// The arguments of native_errors_fwd / native_errors_bwd, for the CPU and the CUDA implementations alike.
void check_errors_fwd(const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q,
                      const at::Tensor& part, int64_t* rows, int64_t* t_rows, int64_t* n) {
  check_inputs(p, t, q, rows, t_rows, n);
  TORCH_CHECK(part.dim() == 3 && part.size(0) == *rows && part.size(1) >= 1 && part.size(2) == kParts,
              "part must be (", *rows, ", chunks, ", kParts, "), got ", part.sizes());
  check_out(part, "part", part.numel(), at::kFloat, p.device());
}

void check_errors_bwd(const at::Tensor& grad_loss, const at::Tensor& p, const at::Tensor& t,
                      const c10::optional<at::Tensor>& q, const at::Tensor& ge, const at::Tensor& gd, bool has_d,
                      const at::Tensor& out, int64_t* rows, int64_t* t_rows, int64_t* n) {
  check_inputs(p, t, q, rows, t_rows, n);
  TORCH_CHECK(!has_d || q.has_value(), "native_errors_bwd: has_d needs ref_pred");
  check_out(ge, "ge", *rows, at::kFloat, p.device());
  check_out(gd, "gd", *rows, at::kFloat, p.device());
  check_rows(out, "out", *rows, *n, p.scalar_type());
  TORCH_CHECK(out.is_contiguous() == p.is_contiguous(), "out must have model_pred's memory format");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
}

// ------------------------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------------------------

// The five sums of one row over [lo, hi), in kLanes lanes reduced in lane order. HasRef and Dspo are template
// arguments so that the inner loop has no branch and vectorises.
template <typename T, bool HasRef, bool Dspo>
void row_sums(const T* P, const T* Tg, const T* Q, int64_t lo, int64_t hi, float* out) {
  float m[kLanes] = {}, r[kLanes] = {}, dl[kLanes] = {}, ed[kLanes] = {}, dd[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float q = HasRef ? static_cast<float>(Q[i + l]) : 0.0f;
      accumulate(static_cast<float>(P[i + l]), static_cast<float>(Tg[i + l]), q, HasRef, Dspo, &m[l], &r[l], &dl[l],
                 &ed[l], &dd[l]);
    }
  }
  for (int l = 0; i < hi; ++i, ++l) {
    float q = HasRef ? static_cast<float>(Q[i]) : 0.0f;
    accumulate(static_cast<float>(P[i]), static_cast<float>(Tg[i]), q, HasRef, Dspo, &m[l], &r[l], &dl[l], &ed[l],
               &dd[l]);
  }
  float s[kParts] = {};
  for (int l = 0; l < kLanes; ++l) {
    s[0] += m[l];
    s[1] += r[l];
    s[2] += dl[l];
    s[3] += ed[l];
    s[4] += dd[l];
  }
  for (int k = 0; k < kParts; ++k) out[k] = s[k];
}

template <typename T>
void errors_fwd_cpu_typed(const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q, bool dspo,
                          at::Tensor& part, int64_t rows, int64_t t_rows, int64_t n) {
  const int64_t chunks = part.size(1);
  const int64_t chunk = (n + chunks - 1) / chunks;
  const T* P = p.const_data_ptr<T>();
  const T* Tg = t.const_data_ptr<T>();
  const T* Q = q.has_value() ? q->const_data_ptr<T>() : P;
  float* out = part.mutable_data_ptr<float>();
  const bool has_ref = q.has_value();
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / chunks, c = job % chunks, tr = row % t_rows;
      const int64_t lo = std::min(n, c * chunk), hi = std::min(n, lo + chunk);
      const T *pr = P + row * n, *tg = Tg + tr * n, *qr = Q + row * n;
      float* o = out + job * kParts;
      if (!has_ref) row_sums<T, false, false>(pr, tg, qr, lo, hi, o);
      else if (dspo) row_sums<T, true, true>(pr, tg, qr, lo, hi, o);
      else row_sums<T, true, false>(pr, tg, qr, lo, hi, o);
    }
  });
}

void errors_fwd_cpu(const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q, bool dspo,
                    at::Tensor& part) {
  int64_t rows, t_rows, n;
  check_errors_fwd(p, t, q, part, &rows, &t_rows, &n);
  switch (p.scalar_type()) {
    case at::kFloat: return errors_fwd_cpu_typed<float>(p, t, q, dspo, part, rows, t_rows, n);
    case at::kHalf: return errors_fwd_cpu_typed<c10::Half>(p, t, q, dspo, part, rows, t_rows, n);
    case at::kBFloat16: return errors_fwd_cpu_typed<c10::BFloat16>(p, t, q, dspo, part, rows, t_rows, n);
    default: TORCH_CHECK(false, "native_errors_fwd: dtype ", p.scalar_type(), " is not float32, float16 or bfloat16");
  }
}

// One row's block of the gradient, branch-free for the inner loop (HasD a template argument).
template <typename T, bool HasD>
void grad_block(const T* P, const T* Tg, const T* Q, T* O, int64_t lo, int64_t hi, float ge, float gd, float go) {
  for (int64_t i = lo; i < hi; ++i) {
    float qv = HasD ? static_cast<float>(Q[i]) : 0.0f;
    O[i] = static_cast<T>(grad_element(static_cast<float>(P[i]), static_cast<float>(Tg[i]), qv, ge, gd, go, HasD));
  }
}

template <typename T>
void errors_bwd_cpu_typed(float go, const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q,
                          const float* ge, const float* gd, bool has_d, at::Tensor& out, int64_t rows,
                          int64_t t_rows, int64_t n) {
  const T* P = p.const_data_ptr<T>();
  const T* Tg = t.const_data_ptr<T>();
  const T* Q = q.has_value() ? q->const_data_ptr<T>() : P;
  T* O = out.mutable_data_ptr<T>();
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / blocks, tr = row % t_rows;
      const int64_t lo = (job % blocks) * kBlock, hi = std::min(n, lo + kBlock);
      const T *pr = P + row * n, *tg = Tg + tr * n, *qr = Q + row * n;
      if (has_d) grad_block<T, true>(pr, tg, qr, O + row * n, lo, hi, ge[row], gd[row], go);
      else grad_block<T, false>(pr, tg, qr, O + row * n, lo, hi, ge[row], gd[row], go);
    }
  });
}

void errors_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& p, const at::Tensor& t,
                    const c10::optional<at::Tensor>& q, const at::Tensor& ge, const at::Tensor& gd, bool has_d,
                    at::Tensor& out) {
  int64_t rows, t_rows, n;
  check_errors_bwd(grad_loss, p, t, q, ge, gd, has_d, out, &rows, &t_rows, &n);
  const float go = grad_loss.to(at::kFloat).item<float>();  // CPU: a read, not a device sync
  const float* GE = ge.const_data_ptr<float>();
  const float* GD = gd.const_data_ptr<float>();
  switch (p.scalar_type()) {
    case at::kFloat: return errors_bwd_cpu_typed<float>(go, p, t, q, GE, GD, has_d, out, rows, t_rows, n);
    case at::kHalf: return errors_bwd_cpu_typed<c10::Half>(go, p, t, q, GE, GD, has_d, out, rows, t_rows, n);
    case at::kBFloat16:
      return errors_bwd_cpu_typed<c10::BFloat16>(go, p, t, q, GE, GD, has_d, out, rows, t_rows, n);
    default: TORCH_CHECK(false, "native_errors_bwd: dtype ", p.scalar_type(), " is not float32, float16 or bfloat16");
  }
}

// loss and metrics from the sums v (v[kLoss] ignored: loss is given, already divided as it must be).
void store_metrics(const float* v, float loss, float inv_b, float* LOSS, float* MET) {
  *LOSS = loss;
  MET[kLoss] = loss;
  for (int k = 1; k < kMetrics; ++k) MET[k] = v[k] * inv_b;
}

void pair_cpu(const float* part, const float* W, const int64_t* TS, float* GE, float* GD, float* LOSS, float* MET,
              int64_t b, int64_t n, int64_t chunks, const PairScalars& s) {
  const float inv_n = 1.0f / static_cast<float>(n), two_n = 2.0f / static_cast<float>(n);
  const float inv_b = 1.0f / static_cast<float>(b);
  float w[kParts];
  bool big = false;
  if (s.obj == kDSPO && s.sdxl) {  // DSPO sdxl switches on the batch mean of |d^w|^2 / N
    float acc = 0.0f;
    for (int64_t i = 0; i < b; ++i) {
      sample_stats(part, i, chunks, inv_n, w);
      acc += w[4];
    }
    big = acc * inv_b >= 0.1f;
  }
  float v[kMetrics] = {};
  for (int64_t i = 0; i < b; ++i) pair_sample(part, i, b, chunks, inv_n, two_n * inv_b, s, W, TS, big, GE, GD, v);
  store_metrics(v, v[kLoss] * inv_b, inv_b, LOSS, MET);
}

// RPO: cos_ij of the normalised embeddings (F.normalize's eps of 1e-12), the row softmax, the B x B terms.
void rpo_cpu(const float* part, const float* EW, const float* EL, float* GE, float* GD, float* LOSS, float* MET,
             int64_t b, int64_t d, int64_t n, int64_t chunks, float half_beta, float inv_tau, bool inside) {
  const float inv_n = 1.0f / static_cast<float>(n), inv_b = 1.0f / static_cast<float>(b);
  std::vector<float> inv(2 * b), delta(2 * b), cos(b * b), rmax(b), rsum(b), rloss(b), wdiag(b);
  at::parallel_for(0, 2 * b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const float* e = k < b ? EW + k * d : EL + (k - b) * d;
      float s = 0.0f;
      for (int64_t j = 0; j < d; ++j) s += e[j] * e[j];
      inv[k] = 1.0f / std::max(std::sqrt(s), 1e-12f);
      float st[kParts];
      sample_stats(part, k, chunks, inv_n, st);
      delta[k] = st[2];
    }
  });
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        float dot = 0.0f;
        for (int64_t k = 0; k < d; ++k) dot += EW[i * d + k] * EL[j * d + k];
        cos[i * b + j] = dot * inv[i] * inv[b + j];
      }
      float mx = -INFINITY, sum = 0.0f;
      for (int64_t j = 0; j < b; ++j) mx = std::max(mx, cos[i * b + j] * inv_tau);
      for (int64_t j = 0; j < b; ++j) sum += std::exp(cos[i * b + j] * inv_tau - mx);
      float ls = 0.0f, gs = 0.0f;
      for (int64_t j = 0; j < b; ++j) {
        RpoTerm o = rpo_term(cos[i * b + j], mx, sum, delta[i], delta[b + j], half_beta, inv_tau, inv_b, inside);
        ls += o.loss;
        gs += o.g;
        if (j == i) wdiag[i] = o.w;
      }
      rmax[i] = mx;
      rsum[i] = sum;
      rloss[i] = ls;
      GE[i] = 2.0f * inv_n * -half_beta * gs;
      GD[i] = 0.0f;
    }
  });
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float gs = 0.0f;
      for (int64_t i = 0; i < b; ++i)
        gs += rpo_term(cos[i * b + j], rmax[i], rsum[i], delta[i], delta[b + j], half_beta, inv_tau, inv_b, inside).g;
      GE[b + j] = 2.0f * inv_n * half_beta * gs;
      GD[b + j] = 0.0f;
    }
  });
  float v[kMetrics] = {};
  float loss = 0.0f;
  float w[kParts], l[kParts];
  for (int64_t i = 0; i < b; ++i) {
    sample_stats(part, i, chunks, inv_n, w);
    sample_stats(part, i + b, chunks, inv_n, l);
    PairTerms o;
    o.hw = -half_beta * w[2];
    o.hl = -half_beta * l[2];
    o.u = o.hw - o.hl;
    add_pair_metrics(v, o, w, l);
    v[kWeightDiag] += wdiag[i];
    loss += rloss[i];  // row terms already carry 1/B (outside) or 1/B^2 (inside)
  }
  store_metrics(v, loss, inv_b, LOSS, MET);
}

PairScalars make_scalars(int64_t obj, const std::vector<double>& s) {
  TORCH_CHECK(obj >= kDPO && obj <= kCal, "native_pair_fwd: unknown objective id ", obj);
  TORCH_CHECK(s.size() == 6, "native_pair_fwd: expected 6 scalars (a0, a1, a2, nsteps, ttrain, sdxl), got ",
              s.size());
  PairScalars p;
  p.obj = static_cast<int>(obj);
  p.a0 = static_cast<float>(s[0]);
  p.a1 = static_cast<float>(s[1]);
  p.a2 = static_cast<float>(s[2]);
  p.nsteps = static_cast<int64_t>(s[3]);
  p.ttrain = static_cast<int64_t>(s[4]);
  p.sdxl = s[5] != 0.0;
  TORCH_CHECK(p.ttrain >= 1, "native_pair_fwd: num_train_timesteps must be >= 1");
  return p;
}

struct PairArgs {
  int64_t rows, chunks, b, d = 0;
  const float *W = nullptr, *EW = nullptr, *EL = nullptr;
  const int64_t* TS = nullptr;
};

PairArgs check_pair(const at::Tensor& part, int64_t n, const PairScalars& s, const c10::optional<at::Tensor>& ew,
                    const c10::optional<at::Tensor>& el, const c10::optional<at::Tensor>& w,
                    const c10::optional<at::Tensor>& ts, const at::Tensor& loss, const at::Tensor& met,
                    const at::Tensor& ge, const at::Tensor& gd) {
  PairArgs a;
  TORCH_CHECK(part.dim() == 3 && part.size(2) == kParts && part.is_contiguous() && part.scalar_type() == at::kFloat,
              "part must be a contiguous fp32 (rows, chunks, 5) tensor, got ", part.sizes(), " ", part.scalar_type());
  TORCH_CHECK(n >= 1, "n must be >= 1");
  a.rows = part.size(0);
  a.chunks = part.size(1);
  a.b = s.obj == kSFT ? a.rows : a.rows / 2;
  TORCH_CHECK(a.b >= 1 && (s.obj == kSFT || a.rows % 2 == 0), "part must hold 2B rows (B rows for sft), got ",
              a.rows);
  const auto dev = part.device();
  check_out(loss, "loss", 1, at::kFloat, dev);
  check_out(met, "metrics", kMetrics, at::kFloat, dev);
  check_out(ge, "ge", a.rows, at::kFloat, dev);
  check_out(gd, "gd", a.rows, at::kFloat, dev);
  if (s.obj == kRPO) {
    TORCH_CHECK(ew.has_value() && el.has_value(), "rpo needs embeds_w and embeds_l");
    a.d = ew->size(-1);
    check_out(*ew, "embeds_w", a.b * a.d, at::kFloat, dev);
    check_out(*el, "embeds_l", a.b * a.d, at::kFloat, dev);
    a.EW = ew->const_data_ptr<float>();
    a.EL = el->const_data_ptr<float>();
  }
  if (w.has_value()) {
    check_out(*w, "weights", a.b, at::kFloat, dev);
    a.W = w->const_data_ptr<float>();
  }
  if (s.obj == kDense) {
    TORCH_CHECK(ts.has_value(), "dense-dpo needs timesteps");
    check_out(*ts, "timesteps", a.b, at::kLong, dev);
    a.TS = ts->const_data_ptr<int64_t>();
  }
  return a;
}

void pair_fwd_cpu(const at::Tensor& part, int64_t n, int64_t obj, at::ArrayRef<double> scalars,
                  const c10::optional<at::Tensor>& ew, const c10::optional<at::Tensor>& el,
                  const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& ts, at::Tensor& loss,
                  at::Tensor& met, at::Tensor& ge, at::Tensor& gd) {
  PairScalars s = make_scalars(obj, scalars.vec());
  PairArgs a = check_pair(part, n, s, ew, el, w, ts, loss, met, ge, gd);
  const float* P = part.const_data_ptr<float>();
  float *L = loss.mutable_data_ptr<float>(), *M = met.mutable_data_ptr<float>();
  float *GE = ge.mutable_data_ptr<float>(), *GD = gd.mutable_data_ptr<float>();
  M[kWeightDiag] = 0.0f;
  if (s.obj == kRPO)
    rpo_cpu(P, a.EW, a.EL, GE, GD, L, M, a.b, a.d, n, a.chunks, s.a0, s.a1, s.a2 != 0.0f);
  else
    pair_cpu(P, a.W, a.TS, GE, GD, L, M, a.b, n, a.chunks, s);
}

// ------------------------------------------------------------------------------------------------------------
// CUDA: checks here, kernels in preference_loss_cuda.cu on the current stream
// ------------------------------------------------------------------------------------------------------------
#ifdef RPO_FAST_WITH_CUDA

int cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kFloat32;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default: TORCH_CHECK(false, "the native CUDA kernels take float32, float16 or bfloat16, got ", t);
  }
}

// The current stream of x's device (the tensors' device is made current by a CUDAGuard in each op).
cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.get_device()).stream(); }

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
}

void errors_fwd_cuda(const at::Tensor& p, const at::Tensor& t, const c10::optional<at::Tensor>& q, bool dspo,
                     at::Tensor& part) {
  int64_t rows, t_rows, n;
  check_errors_fwd(p, t, q, part, &rows, &t_rows, &n);
  const c10::cuda::CUDAGuard guard(p.device());
  const void* Q = q.has_value() ? q->const_data_ptr() : p.const_data_ptr();
  check_cuda(cuda::errors_fwd(cuda_dtype(p.scalar_type()), p.const_data_ptr(), t.const_data_ptr(), Q,
                              part.mutable_data_ptr<float>(), rows, t_rows, n, part.size(1), q.has_value(), dspo,
                              stream_of(p)),
             "native_errors_fwd");
}

void errors_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& p, const at::Tensor& t,
                     const c10::optional<at::Tensor>& q, const at::Tensor& ge, const at::Tensor& gd, bool has_d,
                     at::Tensor& out) {
  int64_t rows, t_rows, n;
  check_errors_bwd(grad_loss, p, t, q, ge, gd, has_d, out, &rows, &t_rows, &n);
  check_out(grad_loss, "grad_loss", 1, at::kFloat, p.device());  // the kernel reads it on the device, as fp32
  const c10::cuda::CUDAGuard guard(p.device());
  const void* Q = q.has_value() ? q->const_data_ptr() : p.const_data_ptr();
  check_cuda(cuda::errors_bwd(cuda_dtype(p.scalar_type()), grad_loss.const_data_ptr<float>(), p.const_data_ptr(),
                              t.const_data_ptr(), Q, ge.const_data_ptr<float>(), gd.const_data_ptr<float>(),
                              out.mutable_data_ptr(), rows, t_rows, n, has_d, stream_of(p)),
             "native_errors_bwd");
}

void pair_fwd_cuda(const at::Tensor& part, int64_t n, int64_t obj, at::ArrayRef<double> scalars,
                   const c10::optional<at::Tensor>& ew, const c10::optional<at::Tensor>& el,
                   const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& ts, at::Tensor& loss,
                   at::Tensor& met, at::Tensor& ge, at::Tensor& gd) {
  PairScalars s = make_scalars(obj, scalars.vec());
  PairArgs a = check_pair(part, n, s, ew, el, w, ts, loss, met, ge, gd);
  const c10::cuda::CUDAGuard guard(part.device());
  cudaStream_t stream = stream_of(part);
  float *L = loss.mutable_data_ptr<float>(), *M = met.mutable_data_ptr<float>();
  float *GE = ge.mutable_data_ptr<float>(), *GD = gd.mutable_data_ptr<float>();
  if (s.obj == kRPO) {
    at::Tensor scratch = at::empty({cuda::rpo_scratch_floats(a.b)}, part.options());
    check_cuda(cuda::rpo_fwd(part.const_data_ptr<float>(), a.EW, a.EL, GE, GD, L, M, scratch.mutable_data_ptr<float>(),
                             a.b, a.d, n, a.chunks, s.a0, s.a1, s.a2 != 0.0f, stream),
               "native_pair_fwd (rpo)");
  } else {
    check_cuda(cuda::pair_fwd(part.const_data_ptr<float>(), a.W, a.TS, GE, GD, L, M, a.b, n, a.chunks, s, stream),
               "native_pair_fwd");
  }
}

#endif  // RPO_FAST_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpo_fast, m) {
  m.def("native_errors_fwd(Tensor model_pred, Tensor target, Tensor? ref_pred, bool dspo, Tensor(a!) part) -> ()");
  m.def(
      "native_pair_fwd(Tensor part, int n, int objective, float[] scalars, Tensor? embeds_w, Tensor? embeds_l, "
      "Tensor? weights, Tensor? timesteps, Tensor(a!) loss, Tensor(b!) metrics, Tensor(c!) ge, Tensor(d!) gd) -> ()");
  m.def(
      "native_errors_bwd(Tensor grad_loss, Tensor model_pred, Tensor target, Tensor? ref_pred, Tensor ge, "
      "Tensor gd, bool has_d, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(rpo_fast, CPU, m) {
  m.impl("native_errors_fwd", &errors_fwd_cpu);
  m.impl("native_pair_fwd", &pair_fwd_cpu);
  m.impl("native_errors_bwd", &errors_bwd_cpu);
}

#ifdef RPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rpo_fast, CUDA, m) {
  m.impl("native_errors_fwd", &errors_fwd_cuda);
  m.impl("native_pair_fwd", &pair_fwd_cuda);
  m.impl("native_errors_bwd", &errors_bwd_cuda);
}
#endif

}  // namespace rpo_fast
