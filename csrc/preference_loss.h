// The per-element and per-pair math of the fused preference loss, shared by the C++ CPU kernels
// (preference_loss.cpp) and the CUDA kernels (preference_loss_cuda.cu): every function here is
// __host__ __device__, so the CPU tests exercise exactly what the GPU runs. It is the math of
// rpo_fast/kernels/preference_loss.py (the Triton op), in fp32. With N = C*H*W, e = p - t, d = p - q:
//
//   m = sum(e^2)/N, r = sum((q - t)^2)/N, delta = sum(d (p + q - 2t))/N, ed = sum(e d)/N, dd = sum(d^2)/N
//   dL/dp_k = ge * (p_k - t_k) + gd * (p_k - q_k)            (gd = 0 except for DSPO's winners)
//
// No torch header is included: this file and the .cu compile with nvcc alone.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RPO_HD __host__ __device__ __forceinline__
#else
#define RPO_HD inline
#endif

namespace rpo_fast {

// Partial sums per sample and chunk: m, r, delta, <e,d>, |d|^2 (the layout of the `part` tensor).
constexpr int kParts = 5;
// Objectives, numbered as the Triton kernels number them (OBJ).
enum Objective : int { kDPO = 0, kSFT = 1, kRPO = 2, kDSPO = 3, kDense = 4, kCal = 5 };
// The metrics vector, in rpo_fast.kernels.shared.METRIC_NAMES order.
enum Metric : int {
  kLoss = 0, kAcc, kMargin, kRewardW, kRewardL, kMseW, kMseL, kRefMseW, kRefMseL, kWeightDiag, kMetrics
};

// log(1 + exp(x)), stable for any x (log1p written out for small arguments, as the Triton op does).
RPO_HD float softplus(float x) {
  float z = expf(-fabsf(x));
  return fmaxf(x, 0.0f) + (z < 1e-4f ? z - 0.5f * z * z : logf(1.0f + z));
}

RPO_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// One element into the five running sums: m += e^2; r += (q - t)^2; dl += (p - q)(p + q - 2t);
// ed += e (p - q); dd += (p - q)^2.
RPO_HD void accumulate(float p, float t, float q, bool has_ref, bool dspo, float* m, float* r, float* dl,
                       float* ed, float* dd) {
  float e = p - t;
  *m += e * e;
  if (has_ref) {
    float f = q - t;
    *r += f * f;
    float d = p - q;
    *dl += d * (p + q - 2.0f * t);
    if (dspo) {
      *ed += e * d;
      *dd += d * d;
    }
  }
}

// dL/dp_k = go * (ge (p - t) + gd (p - q)).
RPO_HD float grad_element(float p, float t, float q, float ge, float gd, float go, bool has_d) {
  float g = ge * (p - t);
  if (has_d) g += gd * (p - q);
  return go * g;
}

// A sample's m, r, delta, ed, dd: its chunk partials summed in chunk order, divided by N.
RPO_HD void sample_stats(const float* part, int64_t row, int64_t chunks, float inv_n, float* s) {
  float a[kParts] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const float* base = part + row * chunks * kParts;
  for (int64_t c = 0; c < chunks; ++c)
    for (int k = 0; k < kParts; ++k) a[k] += base[c * kParts + k];
  for (int k = 0; k < kParts; ++k) s[k] = a[k] * inv_n;
}

// The scalars of the pairwise step, from the objective's float parameters (pair_scalars in
// rpo_fast/kernels/shared.py): a0 = beta/2 (dpo, dense, cal; rpo), lam_in (dspo); a1 = log2(gamma) (dense),
// 1/(2 beta_cal) (cal), lam_out (dspo), 1/tau (rpo); a2 = lam_cal (cal), 1 if inside (rpo).
struct PairScalars {
  int obj;
  float a0, a1, a2;
  int64_t nsteps, ttrain;  // dense: num_inference_steps, num_train_timesteps
  bool sdxl;               // dspo: the sdxl form
};

// One pair's loss and gradient coefficients (before the common factor 2 / (N B)).
struct PairTerms {
  float loss;  // the pair's term of the mean
  float ge_w;  // coefficient of (p - t), winner
  float gd_w;  // coefficient of (p - q), winner
  float ge_l;  // coefficient of (p - t), loser
  float u, hw, hl;  // implicit reward margin and rewards (metrics)
};

// Per-pair objectives (dpo, dense-dpo, cal-dpo, dspo): w = winner stats, l = loser stats, both as
// sample_stats writes them; sw the pair weight (1 without weights); t the timestep (dense-dpo);
// big: DSPO-sdxl's switch on the batch mean of |d^w|^2 / N.
//   h = -scale delta, u = sw (h^w - h^l); dpo: L = -log sigmoid(u); cal-dpo adds
//   lam ((h^w - c)^2 + (h^l + c)^2); dense-dpo: scale = beta/2 gamma^(((T - 1 - t) N_steps) // T).
RPO_HD PairTerms pair_terms(const PairScalars& s, const float* w, const float* l, float sw, int64_t t, bool big) {
  PairTerms o;
  float scale = s.a0;
  if (s.obj == kDense) {
    int64_t k = ((s.ttrain - 1 - t) * s.nsteps) / s.ttrain;
    scale = scale * exp2f(static_cast<float>(k) * s.a1);
  }
  const float mw = w[0], dw = w[2], edw = w[3], ddw = w[4], dl = l[2];
  o.hw = -scale * dw;
  o.hl = -scale * dl;
  o.u = sw * (o.hw - o.hl);
  o.ge_w = 0.0f;
  o.gd_w = 0.0f;
  float gdw, gdl;  // dL/d delta (times B)
  if (s.obj == kDSPO) {
    float sg = sigmoid(-o.u);
    float dsg_du = -sg * (1.0f - sg);
    float dli_du;
    if (s.sdxl) {
      o.loss = big ? sg * sg * ddw : sg * sg;
      dli_du = (big ? 2.0f * sg * ddw : 2.0f * sg) * dsg_du;
      o.gd_w = big ? sg * sg : 0.0f;
    } else {
      float a = s.a1 * sg;
      o.loss = mw - 2.0f * a * edw + a * a * ddw;
      dli_du = (-2.0f * edw + 2.0f * a * ddw) * s.a1 * dsg_du;
      o.ge_w = 1.0f - a;
      o.gd_w = a * a - a;
    }
    gdw = dli_du * -scale;
    gdl = dli_du * scale;
  } else {
    o.loss = softplus(-o.u);
    float d0 = -sigmoid(-o.u) * sw;  // d/d(h^w - h^l) of -log sigmoid(sw u)
    float ghw = d0, ghl = -d0;
    if (s.obj == kCal) {
      o.loss += s.a2 * ((o.hw - s.a1) * (o.hw - s.a1) + (o.hl + s.a1) * (o.hl + s.a1));
      ghw += 2.0f * s.a2 * (o.hw - s.a1);
      ghl += 2.0f * s.a2 * (o.hl + s.a1);
    }
    gdw = ghw * -scale;
    gdl = ghl * -scale;
  }
  o.ge_w += gdw;
  o.ge_l = gdl;
  return o;
}

// RPO, one entry of the B x B matrix: D_ij = -(beta/2)(delta^w_i - delta^l_j), w_ij = softmax_j(cos_ij / tau)
// (rmax, rsum: row i's softmax max and sum). inside: L = mean_ij -log sigmoid(w D) (divided by B^2 here);
// outside: L = mean_i sum_j w (-log sigmoid(D)) (divided by B). g = dL/dD_ij.
struct RpoTerm {
  float w, loss, g;
};

RPO_HD RpoTerm rpo_term(float cos, float rmax, float rsum, float dw, float dl, float half_beta, float inv_tau,
                        float inv_b, bool inside) {
  RpoTerm o;
  o.w = expf(cos * inv_tau - rmax) / rsum;
  float dd = -half_beta * (dw - dl);
  if (inside) {
    float x = o.w * dd;
    o.loss = softplus(-x) * inv_b * inv_b;
    o.g = -sigmoid(-x) * o.w * inv_b * inv_b;
  } else {
    o.loss = o.w * softplus(-dd) * inv_b;
    o.g = -sigmoid(-dd) * o.w * inv_b;
  }
  return o;
}

// Implicit accuracy of one pair: 1 if u > 0, 1/2 on a tie, else 0.
RPO_HD float implicit_acc(float u) { return u > 0.0f ? 1.0f : (u == 0.0f ? 0.5f : 0.0f); }

// A pair's metric sums (METRIC_NAMES from implicit_acc to ref_mse_l) into v[kMetrics].
RPO_HD void add_pair_metrics(float* v, const PairTerms& o, const float* w, const float* l) {
  v[kAcc] += implicit_acc(o.u);
  v[kMargin] += o.u;
  v[kRewardW] += o.hw;
  v[kRewardL] += o.hl;
  v[kMseW] += w[0];
  v[kMseL] += l[0];
  v[kRefMseW] += w[1];
  v[kRefMseL] += l[1];
}

// Pair i of a per-pair objective (or winner i of SFT): its gradient coefficients into GE/GD (rows i and i + b),
// scaled by scale = 2 / (N B); its loss term into v[kLoss] and its metrics into v. SFT: L = mean m^w,
// dL/dp = (2 / N B)(p - t). big: DSPO sdxl's switch (the batch mean of |d^w|^2 / N >= 0.1).
RPO_HD void pair_sample(const float* part, int64_t i, int64_t b, int64_t chunks, float inv_n, float scale,
                        const PairScalars& s, const float* W, const int64_t* TS, bool big, float* GE, float* GD,
                        float* v) {
  float w[kParts], l[kParts];
  sample_stats(part, i, chunks, inv_n, w);
  if (s.obj == kSFT) {
    v[kLoss] += w[0];
    v[kMseW] += w[0];
    GE[i] = scale;
    GD[i] = 0.0f;
    return;
  }
  sample_stats(part, i + b, chunks, inv_n, l);
  PairTerms o = pair_terms(s, w, l, W ? W[i] : 1.0f, TS ? TS[i] : 0, big);
  GE[i] = scale * o.ge_w;
  GD[i] = scale * o.gd_w;
  GE[i + b] = scale * o.ge_l;
  GD[i + b] = 0.0f;
  v[kLoss] += o.loss;
  add_pair_metrics(v, o, w, l);
}

}  // namespace rpo_fast
