// Helpers shared by the CPU kernels: exp_approx, max_ignoring_nan, parallel_rows, bf16 conversions,
// the dropout keep-scale, the tanh GELU.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../dropout_hash.h"

// exp(x) for x <= 88 (callers pass x - max <= 0), Cephes expf: x = n ln2 + r with |r| <= ln2/2,
// exp(r) by a degree-7 polynomial, 2^n through the exponent bits. About 1 ulp; 0 below -87.3
// (no denormals); NaN stays NaN. Branch-free so `omp simd` loops vectorize it (glibc's expf
// does not, without -ffast-math).
static inline float exp_approx(float x) {
  const float lo = -87.3365478515625f;  // exp(lo) = FLT_MIN: 2^n stays a normal float
  const float xc = x < lo ? lo : x;
  // n = round(x / ln2) by adding 1.5 * 2^23 (+ 127, the exponent bias, which lands in t's low bits)
  const float shifter = 12582912.0f + 127.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;  // (n + 127) << 23: the float 2^n (the shifter's own bits shift out)
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : y * scale;
}

// Max of x[0..n), NaN ignored (-inf for an empty or all-NaN range).
__attribute__((target_clones("avx512f", "avx2", "default"), unused))
static float max_ignoring_nan(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
  return m;
}

// Runs body(begin, end) over rows [0, n) on torch's threads, `chunk` rows at a time taken from a
// shared counter: a thread slowed by anything else on the machine does not hold the others up.
template <typename F>
void parallel_rows(int64_t n, int64_t chunk, const F& body) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(chunk)) < n;) body(b, std::min(b + chunk, n));
  });
}

// bfloat16 <-> float32 by their bits (bf16 is float32's top half): widening is exact; narrowing
// rounds to nearest even, and a NaN stays a (quiet) NaN. Plain integer code, so `omp simd` loops
// vectorize it.
static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

static inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffU) > 0x7f800000U) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffU + ((bits >> 16) & 1U)) >> 16);
}

__attribute__((target_clones("avx512f", "avx2", "default"), unused))
static void bf16_to_float_n(const uint16_t* x, int64_t n, float* y) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) y[j] = bf16_to_float(x[j]);
}

__attribute__((target_clones("avx512f", "avx2", "default"), unused))
static void float_to_bf16_n(const float* x, int64_t n, uint16_t* y) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) y[j] = float_to_bf16(x[j]);
}

// Dropout: the counter hash of csrc/dropout_hash.h (gpt.dropout_keep_at, bit for bit) over a flat
// index n (attention: ((b*H + h)*T + i)*T + j; the residual dropout: the element's index), and the
// scale a kept value takes. No mask is stored: the backward pass regenerates it.
struct Dropout : DropoutHash {
  bool on;
  float inv_keep;  // kept values are scaled by 1 / (1 - p)
  Dropout(double p, int64_t seed)
      : DropoutHash(p, seed), on(p > 0), inv_keep(p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f) {}
  float scale(uint64_t n) const { return keep(n) ? inv_keep : 0.0f; }
};

// GPT-2's tanh GELU on n float32 values, y may be x (csrc/cpu/gelu.cpp): gpt::gelu's kernel and
// decode_blocks' MLP.
void gelu_tanh_f32(const float* x, float* y, int64_t n);
