// Fused softmax cross-entropy on the CPU (llm.c's fused classifier).
// logits (N, V) float32 or bfloat16 row-major, targets (N,) int64 with -100 = ignored. Row losses
// are float32; the statistics and the gradient are computed in float32 (a bf16 row is widened
// into a per-thread buffer first), the gradient stored in the logits' dtype.
//   loss_i = logsumexp(logits_i) - logits_i[target_i]          (0 for ignored rows)
//   grad_i = grad_scale * (softmax(logits_i) - onehot(target_i))  (0 for ignored rows)
// Per row: one read pass for the sum of exp (online softmax, block by block, each element read
// and exp'd once); the _grad_ op keeps those exponentials in a per-thread row buffer, then
// scales them into the gradient over the row while both are in L2. Nothing N x V is allocated.
// Rows are spread over threads (parallel_rows).
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
// Floats per online-softmax block (8 KiB, in L1 when a block must be redone).
constexpr int64_t kBlock = 2048;

// Exponent headroom of the block sums: a block is summed as exp(x - ref) with ref the running
// reference, which only moves up when a block max exceeds it by more than this (exp(40) * kBlock
// is far from float overflow). So each element is read once, and exp'd once.
constexpr float kHeadroom = 40.0f;

// One block, one read: its max (bm), and sum of e_j = exp(x_j - ref), stored to e when e != null.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void block_exp_sum(const float* x, int64_t n, float ref, float* e, float* bm_out, float* bs_out) {
  float bm = kNegInf, bs = 0.0f;
  if (e != nullptr) {
#pragma omp simd reduction(max : bm) reduction(+ : bs)
    for (int64_t j = 0; j < n; j++) {
      bm = x[j] > bm ? x[j] : bm;
      const float v = exp_approx(x[j] - ref);
      e[j] = v;
      bs += v;
    }
  } else {
#pragma omp simd reduction(max : bm) reduction(+ : bs)
    for (int64_t j = 0; j < n; j++) {
      bm = x[j] > bm ? x[j] : bm;
      bs += exp_approx(x[j] - ref);
    }
  }
  *bm_out = bm;
  *bs_out = bs;
}

// Online softmax statistics of a row, block by block: returns ref and s = sum_j exp(x_j - ref)
// (so logsumexp = ref + log s). When e != null it gets e_j = exp(x_j - ref_b), and refs[b] each
// block's reference ref_b, for the gradient pass (e is a separate buffer, so a block can be redone).
static void row_softmax_stats(const float* x, int64_t V, float* e, float* refs, float* ref_out, double* s_out) {
  float ref = max_ignoring_nan(x, std::min(kBlock, V));  // so that the first block is not redone
  double s = 0.0;
  for (int64_t b = 0, i = 0; b < V; b += kBlock, i++) {
    const int64_t n = std::min(kBlock, V - b);
    float* eb = e != nullptr ? e + b : nullptr;
    float bm, bs;
    block_exp_sum(x + b, n, ref, eb, &bm, &bs);
    if (bm > ref + kHeadroom) {  // the max jumped (or ref was -inf): rebase on this block's max
      s *= std::exp(static_cast<double>(ref) - bm);
      ref = bm;
      block_exp_sum(x + b, n, ref, eb, &bm, &bs);
    } else if (ref == kNegInf) {  // all -inf so far: the block adds 0 (-inf - -inf gave NaN)
      bs = 0.0f;
      if (eb != nullptr) std::fill(eb, eb + n, 0.0f);
    }
    s += bs;
    if (refs != nullptr) refs[i] = ref;
  }
  *ref_out = ref;
  *s_out = s;
}

// g = c * e over a block: the softmax scaled by grad_scale, from the stored exponentials.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void block_scale(const float* e, int64_t n, float c, float* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) g[j] = c * e[j];
}

__attribute__((target_clones("avx512f", "avx2", "default")))
static void block_scale(const float* e, int64_t n, float c, uint16_t* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) g[j] = float_to_bf16(c * e[j]);
}

// Logits of either dtype as float32: bf16 (held as its uint16_t bits) widened into buf.
const float* as_float(const float* row, int64_t, std::vector<float>&) { return row; }
const float* as_float(const uint16_t* row, int64_t V, std::vector<float>& buf) {
  buf.resize(static_cast<size_t>(V));
  bf16_to_float_n(row, V, buf.data());
  return buf.data();
}
float narrow(float x, float*) { return x; }
uint16_t narrow(float x, uint16_t*) { return float_to_bf16(x); }

// Checks shapes and every target before anything is written (the _grad_ op mutates its input).
void check_inputs(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), op, ": expects CPU tensors");
  check_cross_entropy_shapes(logits, targets, op);
  const at::Tensor t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  const int64_t N = logits.size(0), V = logits.size(1);
  for (int64_t i = 0; i < N; i++) {
    TORCH_CHECK(tp[i] == -100 || (tp[i] >= 0 && tp[i] < V), op, ": target ", tp[i], " of row ", i,
                " is outside [0, ", V, ") and is not the ignore index -100");
  }
}

// Rows handed to a thread at a time: about 64K floats of work.
int64_t grain(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// Calls f with the logits' data as float* or (bf16) uint16_t*.
template <class F>
void with_logits(const at::Tensor& logits, F&& f) {
  if (logits.scalar_type() == at::kFloat)
    f(logits.data_ptr<float>());
  else
    f(reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>()));
}

// The frame both ops share: the checks, the (N,) float32 row losses, and the rows split among the
// threads; rows(x, V, targets, losses, begin, end) sees the logits as float* or (bf16) uint16_t*.
template <class Rows>
at::Tensor sweep_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op, Rows&& rows) {
  check_inputs(logits, targets, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  const at::Tensor t = targets.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* lp = loss.data_ptr<float>();
  with_logits(logits, [&](auto* x) {
    parallel_rows(N, grain(V), [&](int64_t begin, int64_t end) { rows(x, V, tp, lp, begin, end); });
  });
  return loss;
}

at::Tensor cross_entropy_loss_cpu(const at::Tensor& logits, const at::Tensor& targets, bool /*check_targets*/) {
  return sweep_rows(logits, targets, "cross_entropy_loss",
                    [](auto* x, int64_t V, const int64_t* tp, float* lp, int64_t begin, int64_t end) {
    static thread_local std::vector<float> wide;  // a bf16 row in float32
    for (int64_t i = begin; i < end; i++) {
      if (tp[i] == -100) {
        lp[i] = 0.0f;
        continue;
      }
      const float* row = as_float(x + i * V, V, wide);
      float ref;
      double s;
      row_softmax_stats(row, V, nullptr, nullptr, &ref, &s);
      lp[i] = static_cast<float>(ref + std::log(s) - row[tp[i]]);
    }
  });
}

at::Tensor cross_entropy_loss_grad_cpu(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                                       bool /*check_targets: always, it costs nothing here*/) {
  return sweep_rows(logits, targets, "cross_entropy_loss_grad_",
                    [grad_scale](auto* x, int64_t V, const int64_t* tp, float* lp, int64_t begin, int64_t end) {
    // Per thread: the row's exponentials (in L2 with the row until the second pass), block refs,
    // and a bf16 row in float32.
    static thread_local std::vector<float> e, refs, wide;
    e.resize(static_cast<size_t>(V));
    refs.resize(static_cast<size_t>((V + kBlock - 1) / kBlock));
    for (int64_t i = begin; i < end; i++) {
      auto* out = x + i * V;  // the gradient overwrites the row
      if (tp[i] == -100) {
        lp[i] = 0.0f;
        std::fill(out, out + V, 0);
        continue;
      }
      const float* row = as_float(out, V, wide);
      const float xt = row[tp[i]];  // read before the row is overwritten
      float ref;
      double s;
      row_softmax_stats(row, V, e.data(), refs.data(), &ref, &s);
      lp[i] = static_cast<float>(ref + std::log(s) - xt);
      // Second pass, over the row still in L2: grad = grad_scale * exp(x - ref_b) * exp(ref_b - ref) / s.
      auto block_factor = [&](int64_t k) {
        return static_cast<float>(grad_scale / s * std::exp(static_cast<double>(refs[k]) - ref));
      };
      for (int64_t b = 0, k = 0; b < V; b += kBlock, k++)
        block_scale(e.data() + b, std::min(kBlock, V - b), block_factor(k), out + b);
      // the target's -grad_scale, applied to the float32 value (one rounding for bf16)
      out[tp[i]] = narrow(block_factor(tp[i] / kBlock) * e[tp[i]] - static_cast<float>(grad_scale), out);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss_cpu);
  m.impl("cross_entropy_loss_grad_", &cross_entropy_loss_grad_cpu);
}
