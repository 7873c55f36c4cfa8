// Next-token sampling on the CPU: one token per row of logits (B, V) float32 row-major, with
// uniform (B,) float64 in [0, 1); returns (B,) int64, -1 for a row that cannot be sampled (a NaN
// or +inf in it, or all -inf). The semantics are gpt.sample_reference's:
//   temperature 0 -> first index of the max; top-k keeps every logit >= the k-th largest (ties
//   kept); p_i = exp((x_i - max) / T) over the kept; top-p keeps the fewest most probable whose
//   mass reaches top_p * sum, plus ties of the last; draw = smallest kept index whose running
//   sum (index order, double) exceeds uniform * sum(kept p).
// No sort of the row: top-k is one streaming pass that keeps a small buffer of candidates (the
// values >= the k-th largest seen so far); top-p alone is a vectorized exp over the row and a
// radix select of the nucleus threshold on the float bits of p. Rows go to threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Floats per block of the streaming scans: one vectorized test per block, scalar work only in
// the rare blocks that hold a candidate.
constexpr int64_t kScanBlock = 64;
constexpr int64_t kSumBlock = 512;  // floats per partial sum of the draw

static inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Whether a row can be sampled: no NaN, no +inf, not all -inf. The screen runs here, on the
// calling thread, because a torch reduction over the row (torch.isfinite(logits.amax(-1))) wakes
// the other threads after the decode step: ~95 us of an int8 124M token's 5.4 ms.
__attribute__((target_clones("avx512f", "avx2", "default")))
static bool row_can_be_sampled(const float* x, int64_t V) {
  float m = kNegInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < V; j++) {
    m = x[j] > m ? x[j] : m;
    nan |= x[j] != x[j];
  }
  return !nan && m > kNegInf && m < std::numeric_limits<float>::infinity();
}

// First index of the row max (torch.argmax): block maxima in one pass, remembering the first
// block where the max grew, then a scalar search of that block.
__attribute__((target_clones("avx512f", "avx2", "default")))
static int64_t row_argmax(const float* x, int64_t V) {
  float m = kNegInf;
  int64_t at = 0;
  for (int64_t b = 0; b < V; b += kScanBlock) {
    const int64_t n = std::min(kScanBlock, V - b);
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; j++) bm = x[b + j] > bm ? x[b + j] : bm;
    if (bm > m) {
      m = bm;
      at = b;
    }
  }
  for (int64_t j = at; j < V; j++)
    if (x[j] == m) return j;
  return 0;  // (unreached: sample_row screens NaN rows first)
}

// Top-k candidates, in index order: one streaming pass keeps (index, value) of the x_j >= thr,
// raising thr to the k-th largest kept whenever the buffer fills, and ends with those >= the
// k-th largest kept. That is the row's top-k with all its ties when the start thr is at most the
// row's k-th largest, i.e. whenever at least k come out. A block is looked at element by element
// only when its max reaches thr.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void topk_scan(const float* x, int64_t V, int64_t k, float thr, std::vector<int32_t>& ci,
                      std::vector<float>& cv, std::vector<float>& tmp) {
  ci.clear();
  cv.clear();
  size_t cap = static_cast<size_t>(std::max<int64_t>(8 * k, 512));
  // Keeps the candidates >= the k-th largest among them (order kept); returns that value.
  auto compact = [&]() {
    float kth = kNegInf;
    if (cv.size() >= static_cast<size_t>(k)) {
      tmp.assign(cv.begin(), cv.end());
      std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<float>());
      kth = tmp[k - 1];
    }
    size_t w = 0;
    for (size_t r = 0; r < cv.size(); r++) {
      if (cv[r] >= kth) {
        cv[w] = cv[r];
        ci[w] = ci[r];
        w++;
      }
    }
    cv.resize(w);
    ci.resize(w);
    return kth;
  };
  for (int64_t b = 0; b < V; b += kScanBlock) {
    const int64_t n = std::min(kScanBlock, V - b);
    const float* xb = x + b;
    float bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; j++) bm = xb[j] > bm ? xb[j] : bm;
    if (!(bm >= thr)) continue;
    for (int64_t j = 0; j < n; j++) {
      if (xb[j] >= thr) {
        cv.push_back(xb[j]);
        ci.push_back(static_cast<int32_t>(b + j));
        if (cv.size() >= cap) {
          thr = std::max(thr, compact());
          if (cv.size() > cap / 2) cap *= 2;  // many ties at thr: let the buffer grow
        }
      }
    }
  }
  compact();
}

// Starting threshold of the top-k scan: the r-th largest of every kStride-th logit, r chosen so
// that ~4k logits of the row lie above it (fewer than k for ~0.2% of random rows, which are
// redone). Without it the scan takes in thousands of candidates before its threshold catches up.
static float topk_start(const float* x, int64_t V, int64_t k, std::vector<float>& tmp) {
  constexpr int64_t kStride = 32;
  const int64_t r = std::max<int64_t>(2, (4 * k + kStride - 1) / kStride), n = V / kStride;
  if (n < 4 * r) return kNegInf;  // small rows: no sample
  tmp.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) tmp[i] = x[i * kStride];
  std::nth_element(tmp.begin(), tmp.begin() + (r - 1), tmp.end(), std::greater<float>());
  return tmp[r - 1];
}

static void topk_candidates(const float* x, int64_t V, int64_t k, std::vector<int32_t>& ci, std::vector<float>& cv,
                            std::vector<float>& tmp) {
  const float thr = topk_start(x, V, k, tmp);
  topk_scan(x, V, k, thr, ci, cv, tmp);
  // The sample's threshold was above the row's k-th largest (rare): fewer than k candidates. Redo.
  if (thr != kNegInf && cv.size() < static_cast<size_t>(k)) topk_scan(x, V, k, kNegInf, ci, cv, tmp);
}

// Nucleus threshold: the largest value t among p[0..n) (non-negative floats) whose mass
// sum_{p_i >= t} p_i reaches target, i.e. the m-th largest p of the reference. A radix select
// on the float bits (non-negative floats order like their bits), 11 + 11 + 9 bits, with the
// mass of each bucket in double; after the first level only the chosen bucket is kept.
static float nucleus_threshold(const float* p, int64_t n, double target, std::vector<float>& sub) {
  static constexpr int kShift[3] = {20, 9, 0};
  static constexpr int kWidth[3] = {11, 11, 9};
  double mass[2048];
  int32_t count[2048];
  double above = 0.0;  // mass of the buckets above the current one
  uint32_t prefix = 0;
  const float* cur = p;
  int64_t cn = n;
  for (int level = 0; level < 3; level++) {
    const int nb = 1 << kWidth[level], shift = kShift[level];
    std::fill(mass, mass + nb, 0.0);
    std::fill(count, count + nb, 0);
    for (int64_t i = 0; i < cn; i++) {
      const uint32_t bkt = (float_bits(cur[i]) >> shift) & (nb - 1);
      mass[bkt] += cur[i];
      count[bkt]++;
    }
    int sel = -1, lowest = 0;
    for (int bkt = nb - 1; bkt >= 0; bkt--) {
      if (count[bkt] == 0) continue;
      lowest = bkt;
      if (above + mass[bkt] >= target) {
        sel = bkt;
        break;
      }
      above += mass[bkt];
    }
    if (sel < 0) {  // rounding left the target unreached: keep everything, as the reference's clamp
      sel = lowest;
      above -= mass[sel];
    }
    prefix = (prefix << kWidth[level]) | static_cast<uint32_t>(sel);
    if (level == 2) break;
    // Keep the chosen bucket's values for the next level (in place after the first level).
    if (level == 0) sub.resize(static_cast<size_t>(cn));
    int64_t w = 0;
    for (int64_t i = 0; i < cn; i++)
      if (((float_bits(cur[i]) >> shift) & (nb - 1)) == static_cast<uint32_t>(sel)) sub[w++] = cur[i];
    cur = sub.data();
    cn = w;
  }
  float t;
  std::memcpy(&t, &prefix, sizeof(t));
  return t;
}

// p_j = exp((x_j - m) / T) over a row.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void row_probs(const float* x, int64_t V, float m, float T, float* p) {
#pragma omp simd
  for (int64_t j = 0; j < V; j++) p[j] = exp_approx((x[j] - m) / T);  // a division, as the reference
}

// Sum in double of p[0..n). (Kept apart from any float compare: GCC 12 then vectorizes it.)
__attribute__((target_clones("avx512f", "avx2", "default")))
static double sum_double(const float* p, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; j++) s += p[j];
  return s;
}

// p_j <- 0 where p_j < t: what top-p drops.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void zero_below(float* p, int64_t V, float t) {
#pragma omp simd
  for (int64_t j = 0; j < V; j++) p[j] = p[j] >= t ? p[j] : 0.0f;
}

// Inverse-CDF draw over a whole row of p: block sums (double) skip whole blocks, then the sum runs
// element by element in the block where it crosses u * total.
static int64_t draw_row(const float* p, int64_t V, double u, std::vector<double>& sums) {
  sums.resize(static_cast<size_t>((V + kSumBlock - 1) / kSumBlock));
  double total = 0.0;
  for (int64_t b = 0, i = 0; b < V; b += kSumBlock, i++) {
    sums[i] = sum_double(p + b, std::min(kSumBlock, V - b));
    total += sums[i];
  }
  const double target = u * total;
  double run = 0.0;
  for (int64_t b = 0, i = 0; b < V; b += kSumBlock, i++) {
    if (run + sums[i] <= target) {
      run += sums[i];
      continue;
    }
    for (int64_t j = b; j < std::min(b + kSumBlock, V); j++) {
      run += p[j];
      if (p[j] > 0.0f && run > target) return j;
    }
  }
  for (int64_t j = V - 1; j >= 0; j--)  // rounding left none: the last kept index
    if (p[j] > 0.0f) return j;
  return V - 1;
}

// Top-p over a few candidate p's with the reference's arithmetic: sorted descending, mass in
// double in that order; returns the m-th largest p, m the first whose mass reaches top_p * sum.
static float sorted_nucleus_threshold(const std::vector<float>& p, double top_p, std::vector<float>& tmp) {
  tmp.assign(p.begin(), p.end());
  std::sort(tmp.begin(), tmp.end(), std::greater<float>());
  double total = 0.0;
  for (float v : tmp) total += v;
  const double target = top_p * total;
  double mass = 0.0;
  for (float v : tmp) {
    mass += v;
    if (mass >= target) return v;
  }
  return tmp.back();  // rounding left the target unreached: keep all
}

// Inverse-CDF draw over candidates (index order) keeping p >= t: the first whose running sum
// exceeds u * total, else the last kept.
static int64_t draw_candidates(const std::vector<int32_t>& idx, const std::vector<float>& p, float t, double u,
                               int64_t fallback) {
  double total = 0.0;
  for (size_t j = 0; j < p.size(); j++)
    if (p[j] >= t) total += p[j];
  const double target = u * total;
  double run = 0.0;
  int64_t last = fallback;
  for (size_t j = 0; j < p.size(); j++) {
    if (p[j] >= t && p[j] > 0.0f) {
      run += p[j];
      last = idx[j];
      if (run > target) return idx[j];
    }
  }
  return last;
}

struct Scratch {
  std::vector<int32_t> ci;
  std::vector<float> cv, cp, tmp, p, sub;
  std::vector<double> sums;
};

int64_t sample_row(const float* x, int64_t V, double u, float T, int64_t top_k, double top_p, Scratch& s) {
  if (!row_can_be_sampled(x, V)) return -1;
  if (T == 0.0f) return row_argmax(x, V);
  if (top_k > 0 && top_k < V) {
    // Few candidates: the reference's arithmetic on them exactly (p by expf, sorted-order mass).
    topk_candidates(x, V, top_k, s.ci, s.cv, s.tmp);
    if (s.cv.empty()) return 0;  // (unreached: sample_row screens NaN rows first)
    const float m = *std::max_element(s.cv.begin(), s.cv.end());
    s.cp.resize(s.cv.size());
    for (size_t j = 0; j < s.cv.size(); j++) s.cp[j] = std::exp((s.cv[j] - m) / T);
    const float t = top_p < 1.0 ? sorted_nucleus_threshold(s.cp, top_p, s.tmp) : 0.0f;
    return draw_candidates(s.ci, s.cp, t, u, V - 1);
  }
  // No top-k: p over the whole row, the nucleus threshold by radix select, then the draw.
  s.p.resize(static_cast<size_t>(V));
  row_probs(x, V, max_ignoring_nan(x, V), T, s.p.data());
  if (top_p < 1.0) {
    const double total = sum_double(s.p.data(), V);
    zero_below(s.p.data(), V, nucleus_threshold(s.p.data(), V, top_p * total, s.sub));
  }
  return draw_row(s.p.data(), V, u, s.sums);
}

at::Tensor sample_cpu(const at::Tensor& logits, const at::Tensor& uniform, double temperature, int64_t top_k,
                      double top_p) {
  TORCH_CHECK(logits.device().is_cpu() && uniform.device().is_cpu(), "sample: expects CPU tensors");
  check_sample_inputs(logits, uniform, temperature);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V <= std::numeric_limits<int32_t>::max(), "sample: vocabulary too large");
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const at::Tensor u = uniform.contiguous();
  const float* x = logits.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  const float T = static_cast<float>(temperature);  // the reference divides float32 by float32(T)
  parallel_rows(B, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch s;  // buffers kept from call to call
    for (int64_t r = begin; r < end; r++) op[r] = sample_row(x + r * V, V, up[r], T, top_k, top_p, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) { m.impl("sample", &sample_cpu); }
