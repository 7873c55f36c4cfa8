// CPU kernels of gpt::dropout_add and gpt::dropout_backward (schemas in csrc/ops.cpp): the residual
// add with dropout on the branch, out = x + y * keep(n) / (1 - p), and the gradient of y,
// grad * keep(n) / (1 - p). keep(n) is csrc/dropout_hash.h's counter hash (gpt.dropout_keep_at) of
// the element's flat index n, so no mask is drawn, stored or read back: one pass over the elements
// each way.
// Tensors are contiguous and float32 or bfloat16 (under autocast the residual stream x is float32,
// the branch y bf16); the arithmetic is float32, each output rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace {

inline __attribute__((always_inline)) float load(const float* p, int64_t i) { return p[i]; }
inline __attribute__((always_inline)) float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline __attribute__((always_inline)) void store(float* p, int64_t i, float v) { p[i] = v; }
inline __attribute__((always_inline)) void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// out[i] = x[i] + y[i] * keep-scale(i) for i in [begin, end); no x (nullptr type): the scaled y alone.
// The hash's key depends on hi32(i) alone, so it is taken once per 2^32 elements and the loop runs
// on 32-bit lanes (the key per element, on 64-bit indices, left the loop scalar: 10x slower than
// x + y at 2 x 256 x 768).
template <class X, class Y, class O>
inline __attribute__((always_inline)) void scale_add(const X* x, const Y* y, O* out, int64_t begin, int64_t end,
                                                     const Dropout& d) {
  for (int64_t start = begin; start < end;) {
    const int64_t stop = std::min(end, ((start >> 32) + 1) << 32);
    const uint32_t key = d.key(static_cast<uint64_t>(start)), low = static_cast<uint32_t>(start);
    const uint32_t count = static_cast<uint32_t>(stop - start), threshold = d.threshold;
    const float inv_keep = d.inv_keep;
    const Y* ys = y + start;
    O* outs = out + start;
#pragma omp simd
    for (uint32_t j = 0; j < count; j++) {
      const float scaled = load(ys, j) * ((mix32((low + j) ^ key) >> 8) >= threshold ? inv_keep : 0.0f);
      if constexpr (std::is_same_v<X, std::nullptr_t>)
        store(outs, j, scaled);
      else
        store(outs, j, load(x + start, j) + scaled);
    }
    start = stop;
  }
}

// The dtype combinations that occur: (x, y, out) float32 everywhere, or x float32 and y bf16
// (autocast), or all bf16; no x: y float32 -> out float32 or bf16, or bf16 -> bf16. Compiled per
// ISA (the hash's 32-bit multiplies want AVX2 or AVX-512), picked at run time.
enum class Kind { FFF, FBF, BBB, F_F, F_B, B_B };

__attribute__((target_clones("avx512f", "avx2", "default")))
void dropout_range(Kind k, const void* x, const void* y, void* out, int64_t begin, int64_t end, const Dropout& d) {
  using F = float;
  using B = uint16_t;
  switch (k) {
    case Kind::FFF: return scale_add(static_cast<const F*>(x), static_cast<const F*>(y), static_cast<F*>(out), begin, end, d);
    case Kind::FBF: return scale_add(static_cast<const F*>(x), static_cast<const B*>(y), static_cast<F*>(out), begin, end, d);
    case Kind::BBB: return scale_add(static_cast<const B*>(x), static_cast<const B*>(y), static_cast<B*>(out), begin, end, d);
    case Kind::F_F: return scale_add<std::nullptr_t>(nullptr, static_cast<const F*>(y), static_cast<F*>(out), begin, end, d);
    case Kind::F_B: return scale_add<std::nullptr_t>(nullptr, static_cast<const F*>(y), static_cast<B*>(out), begin, end, d);
    case Kind::B_B: return scale_add<std::nullptr_t>(nullptr, static_cast<const B*>(y), static_cast<B*>(out), begin, end, d);
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "dropout_add: ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "dropout_add: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "dropout_add: ", name, " has shape ", t.sizes(), ", expected ", like.sizes());
}

void run(Kind k, const void* x, const void* y, void* out, int64_t n, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_add: p must be in [0, 1), got ", p);
  const Dropout d(p, seed);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) { dropout_range(k, x, y, out, b, e, d); });
}

at::Tensor dropout_add_cpu(const at::Tensor& x, const at::Tensor& y, double p, int64_t seed) {
  check(x, "x", x);
  check(y, "y", x);
  const bool xb = x.scalar_type() == at::kBFloat16, yb = y.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!(xb && !yb), "dropout_add: a bfloat16 x takes a bfloat16 y, got ", y.scalar_type());
  at::Tensor out = at::empty_like(x);
  run(xb ? Kind::BBB : yb ? Kind::FBF : Kind::FFF, x.data_ptr(), y.data_ptr(), out.data_ptr(), x.numel(), p, seed);
  return out;
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad, double p, int64_t seed, at::ScalarType dtype) {
  check(grad, "grad", grad);
  const bool gb = grad.scalar_type() == at::kBFloat16, ob = dtype == at::kBFloat16;
  TORCH_CHECK(dtype == at::kFloat || ob, "dropout_backward: dtype must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(!(gb && !ob), "dropout_backward: a bfloat16 grad gives a bfloat16 result");
  at::Tensor out = at::empty_like(grad, grad.options().dtype(dtype));
  run(gb ? Kind::B_B : ob ? Kind::F_B : Kind::F_F, nullptr, grad.data_ptr(), out.data_ptr(), grad.numel(), p, seed);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
  m.impl("dropout_add", &dropout_add_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}
