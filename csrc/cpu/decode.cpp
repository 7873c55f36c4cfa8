// One GPT-2 block for one new token per row, with a KV cache: the decode step of generation.
// x (B, C) float32 is the residual stream at position pos; weights are the block's tensors in
// Python's order (see gpt.py's decode_block); cache_k/v (B, H, L, D) hold positions < pos.
//   h = LN1(x); q, k, v = h Wqkv^T + bqkv; cache[pos] = k, v
//   y = softmax(q K[0..pos]^T / sqrt(D)) V[0..pos]        per head
//   x = x + y Wproj^T + bproj
//   x = x + gelu_tanh(LN2(x) Wfc^T + bfc) Wmlp^T + bmlp
// At batch 1 the block is four matrix-vector products: its time is the time to read the weights
// once. In torch the same block is ~20 small ops, each dispatched, allocated and run with the
// caches cold (every weight matrix streamed through just before evicts them), and a fork/join
// of the threads per product; here it is one call and one parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

// a . b over n floats.
__attribute__((target_clones("avx512f", "avx2", "default")))
float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

// s[r] = W[r, :] . x for the 4 rows of W starting at w (row stride K): four independent sums,
// so the loads of four rows are in flight at once.
__attribute__((target_clones("avx512f", "avx2", "default")))
void dot4(const float* w, int64_t K, const float* x, float* s) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < K; i++) {
    const float xi = x[i];
    s0 += w[i] * xi;
    s1 += w[K + i] * xi;
    s2 += w[2 * K + i] * xi;
    s3 += w[3 * K + i] * xi;
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

// tanh-GELU in place; tanh(u) = 1 - 2 / (exp(2u) + 1), u clamped to +-10 (tanh = +-1 in float).
__attribute__((target_clones("avx512f", "avx2", "default")))
void gelu_tanh_(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const float v = x[i];
    float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    u = u > 10.0f ? 10.0f : (u < -10.0f ? -10.0f : u);
    x[i] = 0.5f * v * (2.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f));
  }
}

// out[b, :] = LayerNorm(x[b, :]) * w + b_, eps 1e-5 (torch's default), statistics in double.
void layer_norm(const float* x, int64_t B, int64_t C, const float* w, const float* bias, float* out) {
  for (int64_t r = 0; r < B; r++) {
    const float* xr = x + r * C;
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < C; i++) sum += xr[i];
    const double mean = sum / C;
    for (int64_t i = 0; i < C; i++) sq += (xr[i] - mean) * (xr[i] - mean);
    const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(sq / C + 1e-5));
    for (int64_t i = 0; i < C; i++) out[r * C + i] = (xr[i] - m) * rstd * w[i] + bias[i];
  }
}

enum class Epilogue { kStore, kGelu, kAddToOut };

// out[b, n] = bias[n] + W[n, :] . x[b, :] for W (N, K) row-major (bias may be null); then kGelu
// applies GELU, kAddToOut adds it to what out holds (the residual). Called by every thread of
// the block's parallel region: chunks of 64 rows are handed out dynamically (a thread slowed
// by a neighbour does not hold the other up); each row is read once for every b.
template <Epilogue E>
void linear(const float* x, int64_t B, int64_t K, const float* W, const float* bias, int64_t N, float* out) {
  const int64_t chunks = (N + 63) / 64;
#pragma omp for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; c++) {
    const int64_t n0 = c * 64, n1 = std::min(n0 + 64, N);
    for (int64_t n = n0; n < n1; n += 4) {
      const int64_t rows = std::min<int64_t>(4, n1 - n);
      for (int64_t b = 0; b < B; b++) {
        float s[4];
        if (rows == 4) {
          dot4(W + n * K, K, x + b * K, s);
        } else {
          for (int64_t r = 0; r < rows; r++) s[r] = dot(W + (n + r) * K, x + b * K, K);
        }
        for (int64_t r = 0; r < rows; r++) {
          const float v = s[r] + (bias ? bias[n + r] : 0.0f);
          float& o = out[b * N + n + r];
          o = E == Epilogue::kAddToOut ? o + v : v;
        }
      }
    }
    if (E == Epilogue::kGelu)
      for (int64_t b = 0; b < B; b++) gelu_tanh_(out + b * N + n0, n1 - n0);
  }
}

// y[b, h*D:(h+1)*D] = softmax(q k^T / sqrt(D)) v over cache positions 0..pos, after writing this
// token's k, v (from qkv) at pos. One (row, head) per iteration, shared by the region's threads.
void attend(const float* qkv, int64_t B, int64_t H, int64_t D, float* cache_k, float* cache_v, int64_t L,
            int64_t pos, float* y) {
  const int64_t C = H * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> p(pos + 1);
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * H; task++) {
    const int64_t b = task / H, h = task % H;
    const float* q = qkv + b * 3 * C + h * D;
    float* K = cache_k + (b * H + h) * L * D;
    float* V = cache_v + (b * H + h) * L * D;
    for (int64_t d = 0; d < D; d++) {
      K[pos * D + d] = q[C + d];
      V[pos * D + d] = q[2 * C + d];
    }
    float m = -INFINITY;
    for (int64_t j = 0; j <= pos; j++) {
      p[j] = dot(q, K + j * D, D) * scale;
      m = std::max(m, p[j]);
    }
    float l = 0.0f;
    for (int64_t j = 0; j <= pos; j++) l += (p[j] = exp_approx(p[j] - m));
    float* out = y + b * C + h * D;
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t j = 0; j <= pos; j++) {
      const float pj = p[j] / l;
      const float* v = V + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; d++) out[d] += pj * v[d];
    }
  }
}

at::Tensor decode_block_cpu(const at::Tensor& x, at::TensorList w, at::Tensor& cache_k, at::Tensor& cache_v,
                            int64_t pos) {
  TORCH_CHECK(w.size() == 12, "decode_block: expected 12 weight tensors, got ", w.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_block: x must be a contiguous (B, C) float32 tensor");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
                  cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == at::kFloat,
              "decode_block: cache_k, cache_v must be contiguous (B, H, L, D) float32 tensors");
  for (const auto& t : w)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "decode_block: weights must be contiguous float32");
  const int64_t B = x.size(0), C = x.size(1), H = cache_k.size(1), L = cache_k.size(2), D = cache_k.size(3);
  TORCH_CHECK(cache_k.size(0) == B && H * D == C, "decode_block: cache shape does not match x");
  TORCH_CHECK(0 <= pos && pos < L, "decode_block: pos ", pos, " outside the cache's ", L, " positions");
  const int64_t F = w[8].size(0);  // MLP width (4C)
  TORCH_CHECK(w[2].sizes() == at::IntArrayRef({3 * C, C}) && w[4].sizes() == at::IntArrayRef({C, C}) &&
                  w[8].sizes() == at::IntArrayRef({F, C}) && w[10].sizes() == at::IntArrayRef({C, F}),
              "decode_block: weight shapes do not match n_embd ", C);
  auto f32 = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };

  at::Tensor out = x.clone();
  at::Tensor h = at::empty({B, C}, x.options()), qkv = at::empty({B, 3 * C}, x.options());
  at::Tensor y = at::empty({B, C}, x.options()), f = at::empty({B, F}, x.options());
  float *o = out.data_ptr<float>(), *hp = h.data_ptr<float>(), *qp = qkv.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *fp = f.data_ptr<float>();
  // One parallel region for the whole block: its phases are separated by barriers (each `omp for`
  // and `omp single` ends with one), ~1 us, where a region per product would cost a fork/join each.
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp single
    layer_norm(o, B, C, f32(w[0]), f32(w[1]), hp);
    linear<Epilogue::kStore>(hp, B, C, f32(w[2]), f32(w[3]), 3 * C, qp);
    attend(qp, B, H, D, cache_k.data_ptr<float>(), cache_v.data_ptr<float>(), L, pos, yp);
    linear<Epilogue::kAddToOut>(yp, B, C, f32(w[4]), f32(w[5]), C, o);
#pragma omp single
    layer_norm(o, B, C, f32(w[6]), f32(w[7]), hp);
    linear<Epilogue::kGelu>(hp, B, C, f32(w[8]), f32(w[9]), F, fp);
    linear<Epilogue::kAddToOut>(fp, B, F, f32(w[10]), f32(w[11]), C, o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) { m.impl("decode_block", &decode_block_cpu); }
