// CPU kernels of gpt::gelu and gpt::gelu_backward (schemas in csrc/ops.cpp): GPT-2's tanh GELU,
// y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), and its gradient. torch's CPU kernel
// takes 1.5 ms for 512 x 3072 (one layer of a 2 x 256 GPT-124M step, either direction), 5x its
// erf GELU, as its tanh does not vectorize; here 0.5 (1 + tanh(u)) = sigmoid(2u), so
//   y = x s,  dy/dx = s + 2 x s (1 - s) du/dx,  s = 1 / (1 + exp(-2u)),
// with common.h's exp_approx (~1 ulp; no cancellation near u = 0, as 1 - 2 / (exp(2u) + 1) has).
// Tensors contiguous, float32 or bfloat16 (autocast's c_fc output); float32 arithmetic, each
// output rounded once, in the input's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f, kCubic = 0.044715f;

// s = sigmoid(2u); -2u clamped to exp_approx's domain (below it, s is 0 to float precision anyway).
inline __attribute__((always_inline)) float sigmoid_2u(float x) {
  const float minus_2u = -2.0f * kSqrt2OverPi * (x + kCubic * x * x * x);
  return 1.0f / (1.0f + exp_approx(minus_2u < 88.0f ? minus_2u : 88.0f));
}

// out = grad * gelu'(x) on n float32 values (out may be grad).
__attribute__((target_clones("avx512f", "avx2", "default")))
void backward_f32(const float* grad, const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const float v = x[i], s = sigmoid_2u(v), du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * v * v);
    out[i] = grad[i] * (s + 2.0f * v * s * (1.0f - s) * du);
  }
}

// bf16 in chunks through float32 buffers on the stack (GCC leaves the loop scalar when the
// conversions and exp_approx's bit tricks share it: 2.5x slower than torch).
constexpr int64_t kChunk = 1024;

void forward_range(bool bf16, const void* x, void* y, int64_t begin, int64_t end) {
  if (!bf16) return gelu_tanh_f32(static_cast<const float*>(x) + begin, static_cast<float*>(y) + begin, end - begin);
  float buf[kChunk];
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    bf16_to_float_n(static_cast<const uint16_t*>(x) + i, n, buf);
    gelu_tanh_f32(buf, buf, n);
    float_to_bf16_n(buf, n, static_cast<uint16_t*>(y) + i);
  }
}

void backward_range(bool bf16, const void* grad, const void* x, void* out, int64_t begin, int64_t end) {
  if (!bf16)
    return backward_f32(static_cast<const float*>(grad) + begin, static_cast<const float*>(x) + begin,
                        static_cast<float*>(out) + begin, end - begin);
  float g[kChunk], v[kChunk];
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    bf16_to_float_n(static_cast<const uint16_t*>(grad) + i, n, g);
    bf16_to_float_n(static_cast<const uint16_t*>(x) + i, n, v);
    backward_f32(g, v, g, n);
    float_to_bf16_n(g, n, static_cast<uint16_t*>(out) + i);
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "gelu: ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "gelu: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes(), "gelu: ", name, " must match x, got ",
              t.scalar_type(), " ", t.sizes(), " for ", like.scalar_type(), " ", like.sizes());
}

at::Tensor gelu_cpu(const at::Tensor& x) {
  check(x, "x", x);
  at::Tensor y = at::empty_like(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t e) { forward_range(bf16, x.data_ptr(), y.data_ptr(), b, e); });
  return y;
}

at::Tensor gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  check(x, "x", x);
  check(grad, "grad", x);
  at::Tensor out = at::empty_like(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    backward_range(bf16, grad.data_ptr(), x.data_ptr(), out.data_ptr(), b, e);
  });
  return out;
}

}  // namespace

// y = gelu(x) on n float32 values, y may be x (common.h declares it: decode_blocks' MLP uses it too).
__attribute__((target_clones("avx512f", "avx2", "default")))
void gelu_tanh_f32(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * sigmoid_2u(x[i]);
}

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
  m.impl("gelu", &gelu_cpu);
  m.impl("gelu_backward", &gelu_backward_cpu);
}
