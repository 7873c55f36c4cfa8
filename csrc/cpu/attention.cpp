// CPU kernels of gpt::attention_forward and gpt::attention_backward (schemas in csrc/ops.cpp):
// causal flash attention, with the counter-hash dropout of gpt.attention_dropout_keep.
// q, k, v (and out, grad_*) are float32 or bfloat16; the arithmetic is float32 either way (a bf16
// head is widened into per-thread float32 buffers as it is read, and results narrowed as written:
// inputs bf16, scores, softmax statistics and accumulators float32, outputs bf16). lse is float32.
//
// Layout: q, k, v, out, grad_* are (B, H, T, D) contiguous, so head bh = b*H + h is the (T, D)
// row-major block at bh*T*D; lse is (B, H, T). Work is cut in TILE x TILE blocks of the
// (query, key) score matrix; only blocks on or below the diagonal are visited, and no T x T
// buffer exists: each thread keeps one TILE x TILE score block (and a few tile-sized buffers).
//
// Every tile matmul goes through one register-blocked micro-kernel (`micro`): C (+)= A B where
// A's elements are broadcast (any strides, so A may be read transposed for free) and B's rows
// are contiguous vectors. The kernels pick their operand layouts so that no matmul needs a
// packed copy, except a transposed copy of one tile (Q's in forward, K's and V's in backward).
//
// The SIMD code is written once with GCC vector extensions, templated on the vector width, and
// compiled three times: AVX-512, AVX2+FMA (function target attributes) and a generic 128-bit
// build; the widest one the CPU supports is picked at run time (GPT_CPU_ISA=avx512|avx2|generic
// forces one, for tests). So the build never assumes the build machine's CPU (no -march).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// Vector arguments of always-inlined helpers never cross a real call, so the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common.h"

#define GPT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define GPT_X86 1
#define GPT_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define GPT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define GPT_X86 0
#endif

namespace {

constexpr int64_t TILE = 64;  // query and key rows per block; a multiple of every vector width
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// The dropout mask (Dropout) is common.h's, over csrc/dropout_hash.h: gpt.dropout_keep_at, bit for bit.

// Elements of q, k, v, out and the gradients: float, or bf16 held as its uint16_t bits.
GPT_INLINE float widen(float x) { return x; }
GPT_INLINE float widen(uint16_t x) { return bf16_to_float(x); }
GPT_INLINE void narrow_to(float* y, float x) { *y = x; }
GPT_INLINE void narrow_to(uint16_t* y, float x) { *y = float_to_bf16(x); }

// ---------------------------------------------------------------------------------------------
// Vector helpers. An Isa fixes the vector width W (floats) and the micro-kernel's register
// block: MR rows of A by NV vectors of B, MR*NV accumulators.

template <int W_, int MR_, int NV_>
struct Isa {
  static constexpr int W = W_, MR = MR_, NV = NV_;
  typedef float vf __attribute__((vector_size(4 * W_)));
  typedef int32_t vi __attribute__((vector_size(4 * W_)));
  typedef uint32_t vu __attribute__((vector_size(4 * W_)));
};
struct Avx512 : Isa<16, 6, 4> {};  // 24 zmm accumulators + 4 B vectors + 1 broadcast of 32
struct Avx2 : Isa<8, 6, 2> {};     // 12 ymm accumulators + 2 + 1 of 16
struct Generic : Isa<4, 6, 2> {};  // SSE (x86-64 baseline) or NEON

template <class I>
GPT_INLINE typename I::vf load(const float* p) {
  typename I::vf v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
template <class I>
GPT_INLINE void store(float* p, typename I::vf v) {
  std::memcpy(p, &v, sizeof v);
}
template <class I>
GPT_INLINE typename I::vf splat(float x) {
  return typename I::vf{} + x;
}
template <class I>
GPT_INLINE typename I::vi iota() {
  typename I::vi r;
  for (int i = 0; i < I::W; ++i) r[i] = i;
  return r;
}
template <class I>
GPT_INLINE typename I::vf vmax(typename I::vf a, typename I::vf b) {
  return a > b ? a : b;
}

// 2^x for x <= 0 (scores minus their max or lse): x = n + f, f in [-1/2, 1/2], 2^f by Cephes'
// exp2f polynomial (~1 ulp), 2^n built in the exponent bits. x is clamped to -127, where the
// 2^n factor is exactly 0, so exp2(-inf) = 0 (masked scores, the first rescale).
template <class I>
GPT_INLINE typename I::vf exp2v(typename I::vf x) {
  using vf = typename I::vf;
  using vi = typename I::vi;
  x = x < -127.0f ? splat<I>(-127.0f) : x;
  x = x > 127.0f ? splat<I>(127.0f) : x;
  const vf n = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const vf f = x - n;
  vf p = 1.535336188319500e-4f * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)e;
}

// Keep-scale (1/(1-p) or 0) of W consecutive hash counters whose low 32 bits are lo (the high
// 32 bits, folded into key, are the same for all of them).
template <class I>
GPT_INLINE typename I::vf keep_scale(typename I::vu lo, uint32_t key, const Dropout& d) {
  const typename I::vu x = mix32(lo ^ key);
  return (x >> 8) >= d.threshold ? splat<I>(d.inv_keep) : splat<I>(0.0f);
}

// ---------------------------------------------------------------------------------------------
// Tile matmul. C[m x n] = (acc ? rs * C : 0) + A[m x k] B[k x n], with A(r, p) = a[r*ars + p*acs]
// (broadcast one element at a time, so A may be any strided view) and B(p, :) = b[p*ldb ...]
// (contiguous rows, read as vectors); C is row-major with stride ldc; rs (optional) scales row r
// of the old C by rs[r] (the online-softmax rescale of O, fused into the load of C).

// One MR x NV*W block of C, accumulated in registers over the whole depth k.
template <class I, int MR, int NV>
GPT_INLINE void micro(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool acc, const float* rs) {
  using vf = typename I::vf;
  vf cr[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const float sc = rs != nullptr ? rs[r] : 1.0f;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) cr[r][v] = acc ? load<I>(c + r * ldc + v * I::W) * sc : vf{};
  }
  for (int64_t p = 0; p < k; ++p) {
    vf bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load<I>(b + p * ldb + v * I::W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float s = a[r * ars + p * acs];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) cr[r][v] += bv[v] * s;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store<I>(c + r * ldc + v * I::W, cr[r][v]);
}

// The last m % MR rows: micro<R> for R = m, dispatched at compile time.
template <class I, int NV, int R>
GPT_INLINE void micro_rows_tail(int64_t m, int64_t k, const float* a, int64_t ars, int64_t acs,
                                const float* b, int64_t ldb, float* c, int64_t ldc, bool acc, const float* rs) {
  if constexpr (R > 0) {
    if (m == R)
      micro<I, R, NV>(k, a, ars, acs, b, ldb, c, ldc, acc, rs);
    else
      micro_rows_tail<I, NV, R - 1>(m, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
  }
}

// All m rows of one NV-vector column strip.
template <class I, int NV>
GPT_INLINE void gemm_strip(int64_t m, int64_t k, const float* a, int64_t ars, int64_t acs,
                           const float* b, int64_t ldb, float* c, int64_t ldc, bool acc, const float* rs) {
  int64_t r = 0;
  for (; r + I::MR <= m; r += I::MR)
    micro<I, I::MR, NV>(k, a + r * ars, ars, acs, b, ldb, c + r * ldc, ldc, acc, rs ? rs + r : rs);
  micro_rows_tail<I, NV, I::MR - 1>(m - r, k, a + r * ars, ars, acs, b, ldb, c + r * ldc, ldc, acc,
                                    rs ? rs + r : rs);
}

// A strip of nv < NV vectors (the right edge when n is not a multiple of NV*W).
template <class I, int NV>
GPT_INLINE void gemm_strip_tail(int64_t nv, int64_t m, int64_t k, const float* a, int64_t ars,
                                int64_t acs, const float* b, int64_t ldb, float* c, int64_t ldc,
                                bool acc, const float* rs) {
  if constexpr (NV > 0) {
    if (nv == NV)
      gemm_strip<I, NV>(m, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
    else
      gemm_strip_tail<I, NV - 1>(nv, m, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
  }
}

template <class I>
GPT_INLINE void gemm_impl(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs,
                          const float* b, int64_t ldb, float* c, int64_t ldc, bool acc, const float* rs) {
  constexpr int64_t NB = I::NV * I::W;
  int64_t j = 0;
  for (; j + NB <= n; j += NB) gemm_strip<I, I::NV>(m, k, a, ars, acs, b + j, ldb, c + j, ldc, acc, rs);
  const int64_t nv = (n - j) / I::W;
  if (nv > 0) {
    gemm_strip_tail<I, I::NV - 1>(nv, m, k, a, ars, acs, b + j, ldb, c + j, ldc, acc, rs);
    j += nv * I::W;
  }
  for (; j < n; ++j)  // columns past the last whole vector (head dims that are not a multiple of W)
    for (int64_t r = 0; r < m; ++r) {
      float s = acc ? c[r * ldc + j] * (rs != nullptr ? rs[r] : 1.0f) : 0.0f;
      for (int64_t p = 0; p < k; ++p) s += a[r * ars + p * acs] * b[p * ldb + j];
      c[r * ldc + j] = s;
    }
}

// One compiled gemm per ISA (the drivers call it once per tile matmul; the call is cheap).
#define GPT_GEMM_ARGS                                                                       \
  int64_t m, int64_t n, int64_t k, const float *a, int64_t ars, int64_t acs, const float *b, \
      int64_t ldb, float *c, int64_t ldc, bool acc, const float *rs = nullptr
#if GPT_X86
GPT_TARGET_AVX512 __attribute__((noinline)) void gemm(Avx512, GPT_GEMM_ARGS) {
  gemm_impl<Avx512>(m, n, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
}
GPT_TARGET_AVX2 __attribute__((noinline)) void gemm(Avx2, GPT_GEMM_ARGS) {
  gemm_impl<Avx2>(m, n, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
}
#endif
__attribute__((noinline)) void gemm(Generic, GPT_GEMM_ARGS) {
  gemm_impl<Generic>(m, n, k, a, ars, acs, b, ldb, c, ldc, acc, rs);
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <class E>
struct FwdArgs {
  const E *q, *k, *v;
  E* out;
  float* lse;
  int64_t T, D;
  float qscale;  // log2(e) / sqrt(D): scores come out in base 2, so exp is a bare exp2
  Dropout drop;
};

// Forward of work units [begin, end), unit = (bh, query tile). For the query tile i0..i0+rows:
//   St[j][i] = log2(e)/sqrt(D) * K_j . Q_i    (TILE x TILE, key-major: the softmax over keys
//                                              runs down columns, so row max/sum are vertical)
//   online softmax per query i: running max m[i], running sum l[i], O[i] rescaled by
//   2^(m_old - m_new); P = 2^(St - m) (times the dropout keep-scale for the PV product only)
//   O[i][:] += sum_j P[j][i] V[j][:]           (A = P read transposed, B = V rows)
// then out = O / l and lse = ln2 * (m + log2 l). Saved for backward: out and lse only.
// bf16 inputs: the head's keys and values up to the tile are widened into float32 buffers, once
// per head and thread (consecutive units share a head, and each tile widens only its new rows).
template <class I, class E>
GPT_INLINE void forward_units_impl(const FwdArgs<E>& p, int64_t begin, int64_t end) {
  using vf = typename I::vf;
  using vu = typename I::vu;
  constexpr int W = I::W, NB = TILE / W;
  const int64_t T = p.T, D = p.D, nt = (T + TILE - 1) / TILE;
  std::vector<float> buf(D * TILE + TILE * TILE + TILE * D + 3 * TILE);
  float* qt = buf.data();     // D x TILE: the query tile transposed and scaled
  float* st = qt + D * TILE;  // TILE x TILE: scores, then probabilities, key-major
  float* o = st + TILE * TILE;  // TILE x D: unnormalized output rows
  float* m = o + TILE * D;    // TILE: running max (base 2)
  float* l = m + TILE;        // TILE: running sum
  float* alpha = l + TILE;    // TILE: rescale factor of this step
  const vu lane_T = (vu)iota<I>() * static_cast<uint32_t>(T);
  constexpr bool wide_inputs = std::is_same_v<E, float>;
  std::vector<float> kv_wide(wide_inputs ? 0 : 2 * T * D);  // bf16: K, V rows [0, widened) of head wide_bh
  int64_t wide_bh = -1, widened = 0;

  for (int64_t u = begin; u < end; ++u) {
    const int64_t bh = u / nt, i0 = (u % nt) * TILE, rows = std::min(TILE, T - i0);
    const E* q = p.q + (bh * T + i0) * D;
    const float *k_head, *v_head;
    if constexpr (wide_inputs) {
      k_head = p.k + bh * T * D, v_head = p.v + bh * T * D;
    } else {
      if (bh != wide_bh) wide_bh = bh, widened = 0;
      const int64_t need = i0 + rows;  // keys 0 .. the last query
      if (need > widened) {
        bf16_to_float_n(p.k + (bh * T + widened) * D, (need - widened) * D, kv_wide.data() + widened * D);
        bf16_to_float_n(p.v + (bh * T + widened) * D, (need - widened) * D, kv_wide.data() + (T + widened) * D);
        widened = need;
      }
      k_head = kv_wide.data(), v_head = kv_wide.data() + T * D;
    }
    if (rows < TILE) std::fill(qt, qt + D * TILE, 0.0f);  // padding queries: finite junk rows
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t d = 0; d < D; ++d) qt[d * TILE + i] = widen(q[i * D + d]) * p.qscale;
    for (int64_t i = 0; i < TILE; ++i) {
      m[i] = -std::numeric_limits<float>::infinity();
      l[i] = 0.0f;
    }
    const int64_t nkt = (i0 + rows - 1) / TILE + 1;  // key tiles that hold keys <= the last query
    for (int64_t jt = 0; jt < nkt; ++jt) {
      const int64_t j0 = jt * TILE, cols = std::min(TILE, T - j0);
      const float* kj = k_head + j0 * D;
      const float* vj = v_head + j0 * D;
      gemm(I{}, cols, TILE, D, kj, D, 1, qt, TILE, st, TILE, false);
      if (j0 + cols - 1 > i0) {  // the diagonal block: key j > query i is -inf
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t b0 = 0; b0 < TILE; b0 += W) {
            const auto masked = iota<I>() + static_cast<int32_t>(b0 + i0 - j0 - j) < 0;
            store<I>(st + j * TILE + b0,
                     masked ? splat<I>(-std::numeric_limits<float>::infinity()) : load<I>(st + j * TILE + b0));
          }
      }
      // Online softmax down the key columns, all TILE queries at once (NB independent vectors,
      // so the max and sum chains overlap).
      vf mx[NB], sum[NB];
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) mx[b] = load<I>(m + b * W), sum[b] = vf{};
      for (int64_t j = 0; j < cols; ++j)
#pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) mx[b] = vmax<I>(mx[b], load<I>(st + j * TILE + b * W));
      for (int64_t j = 0; j < cols; ++j)
#pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) {
          const vf e = exp2v<I>(load<I>(st + j * TILE + b * W) - mx[b]);
          store<I>(st + j * TILE + b * W, e);
          sum[b] += e;
        }
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) {
        const vf al = exp2v<I>(load<I>(m + b * W) - mx[b]);  // 0 on the first step (m = -inf)
        store<I>(l + b * W, load<I>(l + b * W) * al + sum[b]);
        store<I>(m + b * W, mx[b]);
        store<I>(alpha + b * W, al);
      }
      if (p.drop.on) {  // dropout applies to P in the PV product, not to the sum l
        const uint64_t n0 = (static_cast<uint64_t>(bh * T + i0)) * T + j0;
        const uint64_t n1 = (static_cast<uint64_t>(bh * T + i0 + rows - 1)) * T + j0 + cols - 1;
        if ((n0 >> 32) == (n1 >> 32)) {  // one hash key for the whole block (nearly always)
          const uint32_t key = p.drop.key(n0);
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t b0 = 0; b0 < TILE; b0 += W) {
              const vu lo = lane_T + static_cast<uint32_t>(n0 + j + b0 * T);
              store<I>(st + j * TILE + b0, load<I>(st + j * TILE + b0) * keep_scale<I>(lo, key, p.drop));
            }
        } else {
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t i = 0; i < rows; ++i) st[j * TILE + i] *= p.drop.scale(n0 + i * T + j);
        }
      }
      gemm(I{}, rows, D, cols, st, 1, TILE, vj, D, o, D, jt > 0, alpha);  // O = alpha * O + P V
    }
    E* out = p.out + (bh * T + i0) * D;
    for (int64_t i = 0; i < rows; ++i) {
      const float inv = 1.0f / l[i];
      for (int64_t d = 0; d < D; ++d) narrow_to(out + i * D + d, o[i * D + d] * inv);
      p.lse[bh * T + i0 + i] = (m[i] + std::log2(l[i])) * LN2;
    }
  }
}

#if GPT_X86
template <class E>
GPT_TARGET_AVX512 void forward_units(Avx512, const FwdArgs<E>& p, int64_t b, int64_t e) {
  forward_units_impl<Avx512>(p, b, e);
}
template <class E>
GPT_TARGET_AVX2 void forward_units(Avx2, const FwdArgs<E>& p, int64_t b, int64_t e) {
  forward_units_impl<Avx2>(p, b, e);
}
#endif
template <class E>
void forward_units(Generic, const FwdArgs<E>& p, int64_t b, int64_t e) {
  forward_units_impl<Generic>(p, b, e);
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <class E>
struct BwdArgs {
  const E *dout, *q, *k, *v, *out;
  const float* lse;
  E *dq, *dk, *dv;
  int64_t T, D;
  float scale;  // 1/sqrt(D)
  Dropout drop;
};

// Backward of heads [begin, end) (a thread owns whole heads, so dQ needs no reduction), the
// flash-2 order: for each key tile j (dK_j, dV_j accumulate in place), for each query tile
// i >= j, with S[i][j] query-major (TILE x TILE):
//   P  = 2^(log2(e)/sqrt(D) Q_i . K_j - log2(e) lse_i)      (recomputed from lse)
//   dP = dO_i . V_j,  mask = keep-scale of the hash (1/(1-p) or 0), Delta_i = dO_i . O_i
//   dS = P * (dP * mask - Delta_i) / sqrt(D)
//   dV_j += (P * mask)^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j
// The transposed operands (P^T, dS^T) are just strided broadcasts in the micro-kernel; only
// K_j and V_j are copied transposed (once per key tile), to serve as B of the QK^T and dO V^T.
// bf16: the head's q, k, v, dO, O are widened into float32 buffers, dQ, dK, dV accumulate in
// float32 and are narrowed once at the end of the head.
template <class I, class E>
GPT_INLINE void backward_heads_impl(const BwdArgs<E>& p, int64_t begin, int64_t end) {
  using vf = typename I::vf;
  using vu = typename I::vu;
  constexpr int W = I::W;
  const int64_t T = p.T, D = p.D, nt = (T + TILE - 1) / TILE;
  const float kscale = p.scale * LOG2E;
  std::vector<float> buf(2 * D * TILE + 2 * TILE * TILE + 2 * T);
  float* kt = buf.data();      // D x TILE: K_j transposed, scaled by log2(e)/sqrt(D)
  float* vt = kt + D * TILE;   // D x TILE: V_j transposed
  float* s = vt + D * TILE;    // TILE x TILE: scores, then P * mask
  float* ds = s + TILE * TILE;  // TILE x TILE: dP, then dS
  float* lse2 = ds + TILE * TILE;  // T: lse in base 2
  float* delta = lse2 + T;         // T: rowsum(dO * O)
  constexpr bool wide_inputs = std::is_same_v<E, float>;
  std::vector<float> wide(wide_inputs ? 0 : 8 * T * D);  // bf16: q, k, v, dO, O, dQ, dK, dV of a head

  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t off = bh * T * D;
    const float *q, *k, *v, *dout, *out;
    float *dq, *dk, *dv;
    if constexpr (wide_inputs) {
      q = p.q + off, k = p.k + off, v = p.v + off, dout = p.dout + off, out = p.out + off;
      dq = p.dq + off, dk = p.dk + off, dv = p.dv + off;
    } else {
      float* w = wide.data();
      const E* src[5] = {p.q + off, p.k + off, p.v + off, p.dout + off, p.out + off};
      for (int t = 0; t < 5; ++t) bf16_to_float_n(src[t], T * D, w + t * T * D);
      q = w, k = w + T * D, v = w + 2 * T * D, dout = w + 3 * T * D, out = w + 4 * T * D;
      dq = w + 5 * T * D, dk = w + 6 * T * D, dv = w + 7 * T * D;
    }
    for (int64_t i = 0; i < T; ++i) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += dout[i * D + d] * out[i * D + d];
      delta[i] = acc;
      lse2[i] = p.lse[bh * T + i] * LOG2E;
    }
    for (int64_t jt = 0; jt < nt; ++jt) {
      const int64_t j0 = jt * TILE, cols = std::min(TILE, T - j0);
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < cols; ++j) {
          kt[d * TILE + j] = k[(j0 + j) * D + d] * kscale;
          vt[d * TILE + j] = v[(j0 + j) * D + d];
        }
        for (int64_t j = cols; j < TILE; ++j) kt[d * TILE + j] = vt[d * TILE + j] = 0.0f;
      }
      for (int64_t it = jt; it < nt; ++it) {  // query tiles on and below the diagonal
        const int64_t i0 = it * TILE, rows = std::min(TILE, T - i0);
        gemm(I{}, rows, TILE, D, q + i0 * D, D, 1, kt, TILE, s, TILE, false);
        gemm(I{}, rows, TILE, D, dout + i0 * D, D, 1, vt, TILE, ds, TILE, false);
        // Zero P past the diagonal and in the padding columns j >= cols.
        const bool need_mask = it == jt || cols < TILE;
        const uint64_t n0 = static_cast<uint64_t>(bh * T + i0) * T + j0;
        const uint64_t n1 = static_cast<uint64_t>(bh * T + i0 + rows - 1) * T + j0 + cols - 1;
        const bool hash_vec = (n0 >> 32) == (n1 >> 32);  // one hash key for the whole block
        const uint32_t key = p.drop.key(n0);
        for (int64_t i = 0; i < rows; ++i) {
          const float lse_i = lse2[i0 + i], delta_i = delta[i0 + i];
          for (int64_t b0 = 0; b0 < TILE; b0 += W) {
            vf pv = exp2v<I>(load<I>(s + i * TILE + b0) - lse_i);
            if (need_mask) {
              const auto j = iota<I>() + static_cast<int32_t>(b0);
              pv = (j >= static_cast<int32_t>(cols)) | (j + static_cast<int32_t>(j0 - i0 - i) > 0) ? vf{} : pv;
            }
            vf dpv = load<I>(ds + i * TILE + b0);
            vf pm = pv;
            if (p.drop.on) {
              vf ks;
              if (hash_vec) {
                ks = keep_scale<I>((vu)iota<I>() + static_cast<uint32_t>(n0 + i * T + b0),
                                   key, p.drop);
              } else {
                for (int w = 0; w < W; ++w) ks[w] = p.drop.scale(n0 + i * T + b0 + w);
              }
              pm = pv * ks;
              dpv = dpv * ks;
            }
            store<I>(s + i * TILE + b0, pm);
            store<I>(ds + i * TILE + b0, pv * (dpv - delta_i) * p.scale);
          }
        }
        // First visit of dK_j, dV_j (it == jt) and of dQ_i (jt == 0) overwrites: no zeroing.
        gemm(I{}, cols, D, rows, s, 1, TILE, dout + i0 * D, D, dv + j0 * D, D, it > jt);
        gemm(I{}, cols, D, rows, ds, 1, TILE, q + i0 * D, D, dk + j0 * D, D, it > jt);
        gemm(I{}, rows, D, cols, ds, TILE, 1, k + j0 * D, D, dq + i0 * D, D, jt > 0);
      }
    }
    if constexpr (!wide_inputs) {
      float_to_bf16_n(dq, T * D, p.dq + off);
      float_to_bf16_n(dk, T * D, p.dk + off);
      float_to_bf16_n(dv, T * D, p.dv + off);
    }
  }
}

#if GPT_X86
template <class E>
GPT_TARGET_AVX512 void backward_heads(Avx512, const BwdArgs<E>& p, int64_t b, int64_t e) {
  backward_heads_impl<Avx512>(p, b, e);
}
template <class E>
GPT_TARGET_AVX2 void backward_heads(Avx2, const BwdArgs<E>& p, int64_t b, int64_t e) {
  backward_heads_impl<Avx2>(p, b, e);
}
#endif
template <class E>
void backward_heads(Generic, const BwdArgs<E>& p, int64_t b, int64_t e) {
  backward_heads_impl<Generic>(p, b, e);
}

// ---------------------------------------------------------------------------------------------
// Dispatch and the ops.

enum class Level { Generic, Avx2, Avx512 };

Level cpu_level() {
  static const Level best = [] {
#if GPT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Level::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Level::Avx2;
#endif
    return Level::Generic;
  }();
  const char* force = std::getenv("GPT_CPU_ISA");  // tests run every path; never above `best`
  if (force != nullptr) {
    const std::string f(force);
    if (f == "generic") return Level::Generic;
    if (f == "avx2" && best >= Level::Avx2) return Level::Avx2;
  }
  return best;
}

template <class F>
void dispatch(F&& f) {
  switch (cpu_level()) {
#if GPT_X86
    case Level::Avx512: f(Avx512{}); return;
    case Level::Avx2: f(Avx2{}); return;
#endif
    default: f(Generic{}); return;
  }
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "attention: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "attention: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "attention: ", name, " is ", t.scalar_type(), ", q is ",
              like.scalar_type());
  TORCH_CHECK(t.dim() == 4, "attention: ", name, " must be (B, H, T, D), got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes(), "attention: ", name, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.is_contiguous(), "attention: ", name, " must be contiguous");
}

// Calls f(float{}) or f(uint16_t{}) by the dtype of t (bf16 is handled as its bits).
template <class F>
void with_elements(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat)
    f(float{});
  else
    f(uint16_t{});
}
template <class E>
E* elements(const at::Tensor& t) {
  return static_cast<E*>(t.data_ptr());
}

void check_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ", dropout_p);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double dropout_p, int64_t seed) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  check_dropout(dropout_p);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const int64_t units = B * H * ((T + TILE - 1) / TILE);
  with_elements(q, [&](auto e) {
    using E = decltype(e);
    const FwdArgs<E> args{elements<E>(q), elements<E>(k), elements<E>(v), elements<E>(out), lse.data_ptr<float>(),
                          T, D, static_cast<float>(LOG2E / std::sqrt(static_cast<double>(D))), Dropout(dropout_p, seed)};
    dispatch([&](auto isa) {
      at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) { forward_units(isa, args, b, e); });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double dropout_p, int64_t seed) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  check_input(grad_out, "grad_out", q);
  check_input(out, "out", q);
  check_dropout(dropout_p);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({B, H, T}),
              "attention: lse must be a contiguous float32 (B, H, T) CPU tensor, got ", lse.sizes());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv};
  with_elements(q, [&](auto e) {
    using E = decltype(e);
    const BwdArgs<E> args{elements<E>(grad_out), elements<E>(q), elements<E>(k), elements<E>(v), elements<E>(out),
                          lse.data_ptr<float>(), elements<E>(dq), elements<E>(dk), elements<E>(dv), T, D,
                          static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))), Dropout(dropout_p, seed)};
    dispatch([&](auto isa) {
      at::parallel_for(0, B * H, 1, [&](int64_t b, int64_t e) { backward_heads(isa, args, b, e); });
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}
