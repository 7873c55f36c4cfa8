// GPT-2's blocks for one new token per row, with a KV cache: the decode step of generation.
// x (B, C) float32 is the residual stream at position pos; weights are each block's tensors in
// the order of enum Weight below (gpt.py's decode_weights); each layer's cache_k/v (B, H, L, D),
// float32 or bfloat16, hold positions < pos. Per block:
//   h = LN1(x); q, k, v = h Wqkv^T + bqkv; cache[pos] = k, v
//   y = softmax(q K[0..pos]^T / sqrt(D)) V[0..pos]        per head
//   x = x + y Wproj^T + bproj
//   x = x + gelu_tanh(LN2(x) Wfc^T + bfc) Wmlp^T + bmlp
// At batch 1 the block is four matrix-vector products: its time is the time to read the weights
// once. In torch the same block is ~20 small ops, each dispatched, allocated and run with the
// caches cold (every weight matrix streamed through just before evicts them), and a fork/join
// of the threads per product; here all the blocks are one call and one parallel region.
//
// The matrices are stored float32, bfloat16, or int8 with a float16 scale per 32 weights along
// a row (llama.cpp's Q8_0 layout: w[n, k] = q[n, k] * scale[n, k / 32]). float32 and bfloat16
// products read the weights as stored and widen them to float32 in registers, so a bf16 matrix
// costs only its bytes; float32 sums. A bf16 product takes the activations rounded to bf16 (as
// torch's bf16 matmul and llama.cpp do), so that every path computes the same products. An int8
// product quantizes the activations per block of 32 as well and sums each block exactly in
// integers (VNNI where the CPU has it), as llama.cpp does for Q8_0: widening int8 weights costs
// too many instructions to keep up with memory. From 5 rows of x (batch decode, short prompts)
// bf16 and int8 products run on AMX tiles where the CPU has them (bf16: 16 rows of W by 16 of x per
// block of 32 columns; int8: 16 by 8 per pair of blocks): the widening FMAs of 8 rows of x made a
// bf16 product ~1.4x slower than reading its weights. gpt::quantized_linear is the same product
// alone, for the LM head and short prompts. Builds of the products: AMX (AMX-INT8, AMX-BF16),
// AVX-512 (intrinsics, AVX512-VNNI for int8), AVX2 (with FMA and F16C), picked at run time, and a
// generic one; GPT_CPU_ISA=avx512 leaves AMX out, =avx2 AVX-512 too, =generic forces the generic
// one (for tests). All compute the same block sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define GPT_X86 1
#else
#define GPT_X86 0
#endif

namespace {

// The block's tensors, in the order of the weights list (each matrix: stored weight, scale, bias;
// the scale is empty unless the weight is int8, a bias may be empty).
enum Weight {
  LN1_W, LN1_B,
  QKV_W, QKV_S, QKV_B,    // attn.c_attn (3C, C)
  PROJ_W, PROJ_S, PROJ_B,  // attn.c_proj (C, C)
  LN2_W, LN2_B,
  FC_W, FC_S, FC_B,        // mlp.c_fc (4C, C)
  OUT_W, OUT_S, OUT_B,     // mlp.c_proj (C, 4C)
  N_WEIGHTS
};

constexpr int64_t QBLOCK = 32;  // int8 weights per scale

enum class Kind { F32, BF16, I8 };

// A matrix W (N, K) row-major as stored, its scales (N, ceil(K / 32)) for int8, and a bias (N,).
struct Matrix {
  const void* w;
  const at::Half* scale;
  const float* bias;
  Kind kind;
  int64_t N, K;
};

const float* f32_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

Kind kind_of(const at::Tensor& w, const char* what) {
  switch (w.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kBFloat16: return Kind::BF16;
    case at::kChar: return Kind::I8;
    default: TORCH_CHECK(false, what, ": weight must be float32, bfloat16 or int8, got ", w.scalar_type());
  }
}

Matrix matrix(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), what, ": weight must be a contiguous 2-D tensor");
  const int64_t N = w.size(0), K = w.size(1);
  const Kind kind = kind_of(w, what);
  if (kind == Kind::I8) {
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                    scale.sizes() == at::IntArrayRef({N, (K + QBLOCK - 1) / QBLOCK}),
                what, ": an int8 weight (N, K) needs float16 scales (N, ceil(K / 32)), contiguous");
  } else {
    TORCH_CHECK(scale.numel() == 0, what, ": scales belong to int8 weights only");
  }
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N),
              what, ": bias must be empty or a contiguous float32 (N,) tensor");
  return {w.data_ptr(), kind == Kind::I8 ? scale.data_ptr<at::Half>() : nullptr, bias.defined() ? f32_or_null(bias) : nullptr, kind, N, K};
}

// ---------------------------------------------------------------------------------------------
// The product kernels: s[r * NB + b] = W[n + r, :] . x[b, :] for R rows of W and NB rows of x
// (leading dimension K). R rows are read together (their loads in flight at once); each weight
// is loaded once and used for all NB rows of x.
//
// An int8 weight multiplies x quantized the same way (per block of 32 along the row: d = max |x|
// / 127, q = round(x / d); quantize_row, once per product): a block's product is then an exact
// integer sum, times both scales, the blocks summed in float32 -- what llama.cpp computes for
// Q8_0. Dequantizing the weights to float32 in registers instead costs ~9 instructions per 32
// weights, too many to keep up with memory; an integer sum is one VNNI instruction per 64.

// The rows of x a product reads: float32, and for int8 weights quantized (q, with d per block).
struct Rows {
  const float* x;
  const int8_t* q;
  const float* d;
};

// Room for B rows of x (up to K columns) as a product reads them: quantized (q, d) for an int8
// matrix, rounded to bf16 (`rounded`, float32 values) for a bf16 one. With AMX they are also packed
// as tile products read them: int8 in groups of 8 rows of x, per pair of blocks (pack_tile_int8),
// bf16 in groups of 16 rows, per block (pack_tile_bf16). Only the kinds of matrix a call multiplies
// get their (zeroed, per call) room. Rows start on cache lines where K is a multiple of 64.
constexpr int64_t kAmxMinRows = 5;  // rows of x from which a product takes the AMX kernel
constexpr int64_t kAmxRowsInt8 = 8, kAmxRowsBf16 = 16;  // rows of x per tile product

// A std::vector whose storage starts on a cache line: malloc aligns to 16 bytes, and from a buffer
// 16 bytes past a line every other 32-byte load splits across two lines (a bf16 product reading 4
// rows of x from one: ~1.4x slower, Zen 3).
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
};
template <class T>
using LineVector = std::vector<T, LineAligned<T>>;

struct XRows {
  LineVector<int8_t> q;
  LineVector<float> d, rounded;
  LineVector<int8_t> tiles;
  LineVector<float> tile_d;
  LineVector<uint16_t> tiles_bf16;
  XRows(int64_t B, int64_t K, bool int8, bool bf16) : q(B * K), d(B * ((K + QBLOCK - 1) / QBLOCK)) {
    const bool amx = B >= kAmxMinRows;
    const int64_t nblk = (K + QBLOCK - 1) / QBLOCK;
    if (int8 && amx) {
      const int64_t groups = (B + kAmxRowsInt8 - 1) / kAmxRowsInt8;
      tiles.resize(groups * nblk / 2 * 1024);
      tile_d.resize(groups * nblk / 2 * 16);
    }
    if (bf16) {
      rounded.resize(B * K);
      if (amx) tiles_bf16.resize((B + kAmxRowsBf16 - 1) / kAmxRowsBf16 * nblk * 512);
    }
  }
};

// Blocks 2p and 2p+1 of the g-th 8 rows of x (quantized; K a multiple of 64) as the second operand
// of one tile product: 16 rows of 16 4-byte columns, row i holding, in column b, bytes 4i..4i+3
// of the pair of row b of the group: rows 0-7 block 2p in columns 0-7, rows 8-15 block 2p+1 in
// columns 8-15, zero elsewhere (and past B). The product's sums then hold block 2p in their
// columns 0-7 and block 2p+1 in 8-15: two blocks per tile product. tile_d gets the matching scales.
void pack_tile_int8(XRows& x, int64_t B, int64_t K, int64_t g, int64_t p) {
  const int64_t npair = K / (2 * QBLOCK), nblk = 2 * npair;
  int8_t* tile = x.tiles.data() + (g * npair + p) * 1024;
  float* d = x.tile_d.data() + (g * npair + p) * 16;
  for (int64_t b = 0; b < std::min(kAmxRowsInt8, B - g * kAmxRowsInt8); b++) {
    const int64_t row = g * kAmxRowsInt8 + b;
    for (int64_t i = 0; i < 16; i++) std::memcpy(tile + i * 64 + (b + (i < 8 ? 0 : 8)) * 4, x.q.data() + row * K + p * 64 + i * 4, 4);
    d[b] = x.d[row * nblk + 2 * p];
    d[b + 8] = x.d[row * nblk + 2 * p + 1];
  }
}

// Block j of the g-th 16 rows of x (x.rounded, K a multiple of 32) as the second operand of a bf16
// tile product: 16 rows of 64 bytes, row i holding columns 2i, 2i+1 of each of the 16 rows of x as
// bf16 (zero past B).
void pack_tile_bf16(XRows& x, int64_t B, int64_t K, int64_t g, int64_t j) {
  uint16_t* tile = x.tiles_bf16.data() + (g * (K / QBLOCK) + j) * 512;
  for (int64_t b = 0; b < std::min(kAmxRowsBf16, B - g * kAmxRowsBf16); b++) {
    const float* xr = x.rounded.data() + (g * kAmxRowsBf16 + b) * K + j * QBLOCK;
    for (int64_t i = 0; i < QBLOCK; i++) tile[(i / 2) * 32 + b * 2 + i % 2] = float_to_bf16(xr[i]);
  }
}

// A bf16 product's view of x: each value rounded to bf16 (to nearest even), as torch's bf16
// matmul and llama.cpp's bf16 products take it; the sums stay float32.
__attribute__((target_clones("avx512f", "avx2", "default")))
void round_row_bf16(const float* x, int64_t K, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < K; i++) out[i] = bf16_to_float(float_to_bf16(x[i]));
}

// One row x (K) -> q (K), d (one per block of 32).
void quantize_row_generic(const float* x, int64_t K, int8_t* q, float* d) {
  for (int64_t j = 0; j * QBLOCK < K; j++) {
    const float* xb = x + j * QBLOCK;
    const int64_t n = std::min(QBLOCK, K - j * QBLOCK);
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = std::max(amax, std::fabs(xb[i]));
    const float dj = amax / 127.0f, inverse = dj > 0.0f ? 1.0f / dj : 0.0f;
    d[j] = dj;
    for (int64_t i = 0; i < n; i++)  // round half to even, as torch.round
      q[j * QBLOCK + i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(xb[i] * inverse))));
  }
}

float to_float(float v) { return v; }
float to_float(at::BFloat16 v) { return static_cast<float>(v); }
float to_float(uint16_t bf16_bits) { return bf16_to_float(bf16_bits); }  // (the bf16 KV cache)

template <class T, int R, int NB>
void dot_rows_generic(const Matrix& m, int64_t n, const Rows& x, float* s) {
  const int64_t K = m.K;
  const T* w = static_cast<const T*>(m.w) + n * K;
  float acc[R][NB] = {};
  for (int64_t i = 0; i < K; i++)
    for (int r = 0; r < R; r++)
      for (int b = 0; b < NB; b++) acc[r][b] += to_float(w[r * K + i]) * x.x[b * K + i];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) s[r * NB + b] = acc[r][b];
}

template <int R, int NB>
void dot_rows_generic_int8(const Matrix& m, int64_t n, const Rows& x, float* s) {
  const int64_t K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK;
  const int8_t* w = static_cast<const int8_t*>(m.w) + n * K;
  float acc[R][NB] = {};
  for (int64_t j = 0; j < nblk; j++) {
    const int64_t e = std::min((j + 1) * QBLOCK, K);
    for (int r = 0; r < R; r++) {
      const float dw = static_cast<float>(m.scale[(n + r) * nblk + j]);
      for (int b = 0; b < NB; b++) {
        int32_t sum = 0;
        for (int64_t i = j * QBLOCK; i < e; i++) sum += int32_t{w[r * K + i]} * x.q[b * K + i];
        acc[r][b] += static_cast<float>(sum) * (dw * x.d[b * nblk + j]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) s[r * NB + b] = acc[r][b];
}

// The paths a call may take, from the best the CPU has down: no AMX (GPT_CPU_ISA=avx512), no
// AVX-512 (GPT_CPU_ISA=avx2), or the generic ones (GPT_CPU_ISA=generic); the tests run each.
enum Isa { kBest, kNoAmx, kAvx2, kGeneric };

Isa forced_isa() {
  const char* force = std::getenv("GPT_CPU_ISA");
  if (force == nullptr || std::strcmp(force, "amx") == 0) return kBest;
  if (std::strcmp(force, "avx2") == 0) return kAvx2;
  return std::strcmp(force, "generic") == 0 ? kGeneric : kNoAmx;
}

#if GPT_X86
// GCC 12 warns that the intrinsics' own _mm512_undefined_* placeholders are uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define GPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define GPT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
// On the kernels' loops over their R rows of W and NB rows of x: unrolled before GCC decides where
// the accumulators acc[R][NB] live, they stay in registers; otherwise every step also stores them
// all to the stack.
#define GPT_UNROLL _Pragma("GCC unroll 4")
#define GPT_UNROLL8 _Pragma("GCC unroll 8")

// 16 weights from p (lanes outside mask k read as 0), as float32.
GPT_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
GPT_AVX512 inline __m512 load16(const at::BFloat16* p, __mmask16 k) {  // bf16 is float32's top half
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

GPT_AVX512 inline __mmask16 first_lanes(int64_t n) {  // lanes 0..n-1 of 16
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// Asks for the weights `ahead` elements on (the same columns of the next group of rows) now:
// the loads of a decode step stream from memory, and a core busy converting weights keeps too
// few misses in flight for the hardware prefetcher alone to reach the memory's bandwidth.
template <class T>
GPT_AVX512 inline void prefetch_ahead(const T* p, int64_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
}

// float32 or bf16: 32 weights per step (two vectors); masked loads past K read zeros.
template <class T, int R, int NB>
GPT_AVX512 void dot_rows_avx512(const Matrix& m, int64_t n, const Rows& rows, float* s) {
  const int64_t K = m.K;
  const T* w = static_cast<const T*>(m.w) + n * K;
  const float* x = rows.x;
  __m512 acc[R][NB];
  GPT_UNROLL for (int r = 0; r < R; r++)
    GPT_UNROLL for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += QBLOCK) {
    const __mmask16 k0 = first_lanes(K - i), k1 = first_lanes(K - i - 16);
    __m512 x0[NB], x1[NB];
    GPT_UNROLL for (int b = 0; b < NB; b++) {
      x0[b] = _mm512_maskz_loadu_ps(k0, x + b * K + i);
      x1[b] = _mm512_maskz_loadu_ps(k1, x + b * K + i + 16);
    }
    GPT_UNROLL for (int r = 0; r < R; r++) {
      if constexpr (!std::is_same<T, float>::value) prefetch_ahead(w + r * K + i, R * K);  // (float32 streams faster without)
      const __m512 w0 = load16(w + r * K + i, k0), w1 = load16(w + r * K + i + 16, k1);
      GPT_UNROLL for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(w1, x1[b], _mm512_fmadd_ps(w0, x0[b], acc[r][b]));
    }
  }
  GPT_UNROLL for (int r = 0; r < R; r++)
    GPT_UNROLL for (int b = 0; b < NB; b++) s[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
}

// int8 with AVX512-VNNI: 64 weights (two blocks) per step. vpdpbusd multiplies unsigned by signed
// bytes, so it takes |x| and the weights with x's sign moved onto them; its 16 int32 lanes hold
// block j's sum in lanes 0-7 and block j+1's in 8-15, scaled by a vector of the two blocks'
// dw * dx (scales of 16 blocks at a time in a small array, two picked by a permute).
template <int R, int NB>
GPT_VNNI void dot_rows_vnni_int8(const Matrix& m, int64_t n, const Rows& x, float* s) {
  const int64_t K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK;
  const int8_t* w = static_cast<const int8_t*>(m.w) + n * K;
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[R][NB];
  GPT_UNROLL for (int r = 0; r < R; r++)
    GPT_UNROLL for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
  alignas(64) float scales[R][NB][16];
  for (int64_t i = 0; i < K; i += 2 * QBLOCK) {
    const int64_t j = i / QBLOCK;  // the first of the step's two blocks
    if (j % 16 == 0) {  // dw * dx of the next 16 blocks
      const __mmask16 kb = first_lanes(nblk - j);
      GPT_UNROLL for (int r = 0; r < R; r++) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, m.scale + (n + r) * nblk + j));
        GPT_UNROLL for (int b = 0; b < NB; b++)
          _mm512_store_ps(scales[r][b], _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(kb, x.d + b * nblk + j)));
      }
    }
    const int t = static_cast<int>(j % 16);  // lanes 0-7 pick block j's scale, lanes 8-15 block j+1's
    const __m512i pair = _mm512_mask_set1_epi32(_mm512_set1_epi32(t), 0xFF00, t + 1);
    const __mmask64 k = K - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - i)) - 1;
    __m512i xabs[NB];
    __mmask64 xneg[NB];
    GPT_UNROLL for (int b = 0; b < NB; b++) {
      const __m512i xq = _mm512_maskz_loadu_epi8(k, x.q + b * K + i);
      xabs[b] = _mm512_abs_epi8(xq);
      xneg[b] = _mm512_movepi8_mask(xq);
    }
    GPT_UNROLL for (int r = 0; r < R; r++) {
      prefetch_ahead(w + r * K + i, R * K);
      const __m512i wq = _mm512_maskz_loadu_epi8(k, w + r * K + i);
      GPT_UNROLL for (int b = 0; b < NB; b++) {
        const __m512i sums = _mm512_dpbusd_epi32(zero, xabs[b], _mm512_mask_sub_epi8(wq, xneg[b], zero, wq));
        const __m512 scale = _mm512_permutexvar_ps(pair, _mm512_load_ps(scales[r][b]));
        acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r][b]);
      }
    }
  }
  GPT_UNROLL for (int r = 0; r < R; r++)
    GPT_UNROLL for (int b = 0; b < NB; b++) s[r * NB + b] = _mm512_reduce_add_ps(acc[r][b]);
}

// int8 with AMX (Sapphire Rapids and later): one tile product (tdpbssd: signed bytes, exact int32
// sums) multiplies 16 rows of W by 8 rows of x over a pair of blocks (64 columns), each block's sums
// in its own 8 columns of the result (pack_tile_int8); the sums then take their blocks' scales in
// AVX-512, 16 at a time. A weight tile is the matrix as stored (16 rows of 64 bytes, stride K).
// Per 16 x 8 x 64: one tile product and 4 vector instructions per row of W, against ~6 per 64
// weights per row of x with VNNI: the products of several rows of x (batch decode, short prompts)
// cost little more than one row's. (One block per product, 16 rows of x in its columns, did twice
// the tile products and scalings for a batch of 8, half of them on zero rows: 124M's blocks at 8
// rows of x streamed in 8.3 ms against 4.9.)
// Linux grants the tile registers' state only on request (arch_prctl), else the first tile
// instruction is SIGILL.
#define GPT_AMX __attribute__((target("amx-tile,amx-int8,amx-bf16,avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

// Tiles, for int8 and bf16 alike: 0-3 the sums of 4 products (16 x 16 int32 or float32 each), 4
// and 6 weights (16 rows of 64 int8 or 32 bf16), 5 and 7 x (16 rows of 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16];
  uint8_t rows[16];
};
const TileConfig kTiles{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// The tile product of the pair of blocks p into tile c, the weights loaded into tile a, x into
// tile b. (Tile numbers must be literals, not template parameters: the intrinsics paste them into
// the instruction.)
#define GPT_TILE_PAIR(c, a, b, p)                \
  _tile_zero(c);                                 \
  _tile_loadd(a, w + (p) * 2 * QBLOCK, K);       \
  _tile_loadd(b, tiles + (p) * 1024, 64);        \
  _tile_dpbssd(c, a, b)

// Columns c..c+n-1 (bytes) of the next 16 rows of W from w (leading dimension ld bytes) into L2.
// Tile loads that miss stall the tile products: without this, memory and products took turns
// (int8, 124M's blocks at 8 rows of x: 5.0 -> 4.3 ms).
GPT_AMX inline void prefetch_next_unit(const void* w, int64_t ld, int64_t c, int64_t n) {
  const char* next = static_cast<const char*>(w) + 16 * ld + c;
  for (int r = 0; r < 16; r++)
    for (int64_t i = 0; i < n; i += 64) _mm_prefetch(next + r * ld + i, _MM_HINT_T1);
}

// s[b * 16 + n] = rows[n][b] for the first `columns` columns: a unit's products (rows of W by
// rows of x) as the caller writes them out, a row of x at a time.
GPT_AMX inline void store_columns(const float (*rows)[16], int columns, float* s) {
  const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(16));
  for (int b = 0; b < columns; b++)
    _mm512_storeu_ps(s + b * 16, _mm512_i32gather_ps(_mm512_add_epi32(row_starts, _mm512_set1_epi32(b)), rows, 4));
}

// The tile products of pairs p..p+G-1 (G <= 4) into tiles 0..G-1, stored to sums[0..G-1].
template <int G>
GPT_AMX inline void tile_pairs(const int8_t* w, int64_t K, const int8_t* tiles, int64_t p, int32_t (*sums)[16][16]) {
  GPT_TILE_PAIR(0, 4, 5, p);
  if constexpr (G > 1) { GPT_TILE_PAIR(1, 6, 7, p + 1); }
  if constexpr (G > 2) { GPT_TILE_PAIR(2, 4, 5, p + 2); }
  if constexpr (G > 3) { GPT_TILE_PAIR(3, 6, 7, p + 3); }
  _tile_stored(0, sums[0], 64);
  if constexpr (G > 1) _tile_stored(1, sums[1], 64);
  if constexpr (G > 2) _tile_stored(2, sums[2], 64);
  if constexpr (G > 3) _tile_stored(3, sums[3], 64);
}

// acc[n] += the sums of pairs p..p+G-1 times dw * dx of their blocks: lanes 0-7 block 2p's, 8-15
// block 2p+1's. dw[n] holds row n0 + n's scales of the 16 blocks from 16 * (p / 8).
template <int G>
GPT_AMX inline void scale_pairs(const float (*dw)[16], const float* tile_d, int64_t p, const int32_t (*sums)[16][16],
                                __m512* acc) {
  __m512 dx[G];
  __m512i pick[G];  // lanes 0-7 pick block 2p's scale from dw[n], lanes 8-15 block 2p+1's
  GPT_UNROLL for (int g = 0; g < G; g++) {
    dx[g] = _mm512_loadu_ps(tile_d + (p + g) * 16);
    const int t = static_cast<int>(2 * ((p + g) % 8));
    pick[g] = _mm512_mask_set1_epi32(_mm512_set1_epi32(t), 0xFF00, t + 1);
  }
#pragma GCC unroll 16
  for (int n = 0; n < 16; n++) {
    const __m512 dwn = _mm512_load_ps(dw[n]);
    __m512 a = acc[n];
    GPT_UNROLL for (int g = 0; g < G; g++) {
      const __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(pick[g], dwn), dx[g]);
      a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[g][n])), scale, a);
    }
    acc[n] = a;
  }
}

// s[b * 16 + n] = W[n0 + n, :] . x[8 g + b, :] for the 16 rows of W from n0 and the g-th 8 rows of
// x (b < 8), from x's packed tiles; K a multiple of 64; kTiles is loaded. One group of 4 tile
// products is in flight while the previous group takes its scales (a tile product's latency is
// several times its issue interval).
GPT_AMX void dot_unit_amx_int8(const Matrix& m, int64_t n0, const XRows& x, int64_t g, float* s) {
  const int64_t K = m.K, nblk = K / QBLOCK, npair = nblk / 2;
  const int8_t* w = static_cast<const int8_t*>(m.w) + n0 * K;
  const int8_t* tiles = x.tiles.data() + g * npair * 1024;
  const float* tile_d = x.tile_d.data() + g * npair * 16;
  __m512 acc[16];
  GPT_UNROLL for (int n = 0; n < 16; n++) acc[n] = _mm512_setzero_ps();
  alignas(64) int32_t sums[2][4][16][16];  // two groups of 4 products: one being scaled, one in flight
  alignas(64) float dw[16][16];            // [row][block]
  const auto products = [&](int64_t p) {
    switch (std::min<int64_t>(4, npair - p)) {
      case 4: return tile_pairs<4>(w, K, tiles, p, sums[(p / 4) % 2]);
      case 3: return tile_pairs<3>(w, K, tiles, p, sums[(p / 4) % 2]);
      case 2: return tile_pairs<2>(w, K, tiles, p, sums[(p / 4) % 2]);
      default: return tile_pairs<1>(w, K, tiles, p, sums[(p / 4) % 2]);
    }
  };
  products(0);
  for (int64_t p = 0; p < npair; p += 4) {
    prefetch_next_unit(w, K, p * 2 * QBLOCK, std::min<int64_t>(4, npair - p) * 2 * QBLOCK);
    if (p + 4 < npair) products(p + 4);
    if (p % 8 == 0) {  // the scales of the next 16 blocks
      const __mmask16 kb = first_lanes(nblk - 2 * p);
      for (int n = 0; n < 16; n++)
        _mm512_store_ps(dw[n], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, m.scale + (n0 + n) * nblk + 2 * p)));
    }
    switch (std::min<int64_t>(4, npair - p)) {
      case 4: scale_pairs<4>(dw, tile_d, p, sums[(p / 4) % 2], acc); break;
      case 3: scale_pairs<3>(dw, tile_d, p, sums[(p / 4) % 2], acc); break;
      case 2: scale_pairs<2>(dw, tile_d, p, sums[(p / 4) % 2], acc); break;
      default: scale_pairs<1>(dw, tile_d, p, sums[(p / 4) % 2], acc);
    }
  }
  // lanes 0-7 and 8-15 (even and odd blocks) summed: sums[0][n][b] holds row n's product with row b
  float(*rows)[16] = reinterpret_cast<float(*)[16]>(sums[0]);
  GPT_UNROLL for (int n = 0; n < 16; n++)
    _mm512_store_ps(rows[n], _mm512_add_ps(acc[n], _mm512_shuffle_f32x4(acc[n], acc[n], _MM_SHUFFLE(1, 0, 3, 2))));
  store_columns(rows, kAmxRowsInt8, s);
}

// bf16 (AMX-BF16): tdpbf16ps multiplies 16 rows of W by 16 rows of x (rounded to bf16, packed by
// pack_tile_bf16) over a block of 32 columns into float32 sums. No scales: each of tiles 0-3 sums
// every fourth block across the whole row (4 products in flight), and the 4 are added at the end.
// kTiles is loaded; s[b * 16 + n] for the g-th 16 rows of x, as for int8.
#define GPT_TILE_PRODUCT_BF16(c, a, b, j)             \
  _tile_loadd(a, w + (j) * QBLOCK, K * 2);            \
  _tile_loadd(b, tiles + (j) * 512, 64);              \
  _tile_dpbf16ps(c, a, b)

GPT_AMX void dot_unit_amx_bf16(const Matrix& m, int64_t n0, const XRows& x, int64_t g, float* s) {
  const int64_t K = m.K, nblk = K / QBLOCK;
  const uint16_t* w = static_cast<const uint16_t*>(m.w) + n0 * K;
  const uint16_t* tiles = x.tiles_bf16.data() + g * nblk * 512;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t j = 0;
  for (; j + 4 <= nblk; j += 4) {
    prefetch_next_unit(w, 2 * K, 2 * j * QBLOCK, 4 * 2 * QBLOCK);  // (bf16, 8 rows of x: ~3% faster)
    GPT_TILE_PRODUCT_BF16(0, 4, 5, j);
    GPT_TILE_PRODUCT_BF16(1, 6, 7, j + 1);
    GPT_TILE_PRODUCT_BF16(2, 4, 5, j + 2);
    GPT_TILE_PRODUCT_BF16(3, 6, 7, j + 3);
  }
  for (; j < nblk; j++) { GPT_TILE_PRODUCT_BF16(0, 4, 5, j); }
  alignas(64) float sums[4][16][16];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  GPT_UNROLL for (int n = 0; n < 16; n++) {
    const __m512 a = _mm512_add_ps(_mm512_load_ps(sums[0][n]), _mm512_load_ps(sums[1][n]));
    const __m512 b = _mm512_add_ps(_mm512_load_ps(sums[2][n]), _mm512_load_ps(sums[3][n]));
    _mm512_store_ps(sums[0][n], _mm512_add_ps(a, b));
  }
  store_columns(sums[0], kAmxRowsBf16, s);
}

GPT_AMX void load_tile_config() { _tile_loadconfig(&kTiles); }

GPT_AMX void release_tiles() { _tile_release(); }

// quantize_row_generic's rule, 32 values at a time.
GPT_AVX512 inline __m128i quantize16(__m512 v, __m512 inverse) {
  const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(127.0f),
                                                               _mm512_max_ps(_mm512_set1_ps(-127.0f), r))));
}

GPT_AVX512 void quantize_row_avx512(const float* x, int64_t K, int8_t* q, float* d) {
  for (int64_t j = 0; j * QBLOCK < K; j++) {
    const int64_t i = j * QBLOCK;
    const __mmask16 k0 = first_lanes(K - i), k1 = first_lanes(K - i - 16);
    const __m512 x0 = _mm512_maskz_loadu_ps(k0, x + i), x1 = _mm512_maskz_loadu_ps(k1, x + i + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float dj = amax / 127.0f, inverse = dj > 0.0f ? 1.0f / dj : 0.0f;
    d[j] = dj;
    _mm_mask_storeu_epi8(q + i, k0, quantize16(x0, _mm512_set1_ps(inverse)));
    _mm_mask_storeu_epi8(q + i + 16, k1, quantize16(x1, _mm512_set1_ps(inverse)));
  }
}

// AVX2 (with FMA and F16C): the same products 8 lanes wide, for the CPUs without AVX-512 (AMD
// before Zen 4, Intel client cores). 16 ymm registers hold at most 8 accumulators with the loads
// beside them, so R * NB > 8 runs as two halves of R / 2 rows of W (each row still read once).
// There are no masked byte loads: a partial last block or vector goes through a zero-padded copy.
#define GPT_AVX2 __attribute__((target("avx2,fma,f16c")))

GPT_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
GPT_AVX2 inline __m256 load8(const at::BFloat16* p) {  // bf16 is float32's top half
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

GPT_AVX2 inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// float32 or bf16: 16 weights per step (two vectors), the last K % 16 in a zero-padded copy. One row
// of W by one of x (bf16 at batch 1, below) keeps two sums, one per vector: in one sum each step
// waits on the last (two dependent FMAs, 8 cycles, per 16 weights: by count at most ~22 GB/s of bf16
// on two 2.8 GHz cores, no faster than their memory).
template <class T, int R, int NB>
GPT_AVX2 void dot_rows_avx2(const Matrix& m, int64_t n, const Rows& rows, float* s) {
  if constexpr (R * NB > 8) {
    dot_rows_avx2<T, R / 2, NB>(m, n, rows, s);
    dot_rows_avx2<T, R / 2, NB>(m, n + R / 2, rows, s + R / 2 * NB);
  } else {
    const int64_t K = m.K, K16 = K - K % 16;
    const T* w = static_cast<const T*>(m.w) + n * K;
    const float* x = rows.x;
    constexpr int C = R * NB == 1 ? 2 : 1;  // chains of sums per (row of W, row of x)
    __m256 acc[C][R][NB];
    GPT_UNROLL for (int c = 0; c < C; c++)
      GPT_UNROLL for (int r = 0; r < R; r++)
        GPT_UNROLL for (int b = 0; b < NB; b++) acc[c][r][b] = _mm256_setzero_ps();
    const auto step = [&](const T* const* wr, const float* const* xb) GPT_AVX2 {
      __m256 x0[NB], x1[NB];
      GPT_UNROLL for (int b = 0; b < NB; b++) x0[b] = _mm256_loadu_ps(xb[b]), x1[b] = _mm256_loadu_ps(xb[b] + 8);
      GPT_UNROLL for (int r = 0; r < R; r++) {
        const __m256 w0 = load8(wr[r]), w1 = load8(wr[r] + 8);
        GPT_UNROLL for (int b = 0; b < NB; b++) {
          acc[0][r][b] = _mm256_fmadd_ps(w0, x0[b], acc[0][r][b]);
          acc[C - 1][r][b] = _mm256_fmadd_ps(w1, x1[b], acc[C - 1][r][b]);
        }
      }
    };
    for (int64_t i = 0; i < K16; i += 16) {
      const T* wr[R];
      const float* xb[NB];
      GPT_UNROLL for (int r = 0; r < R; r++) {
        wr[r] = w + r * K + i;
        if constexpr (!std::is_same<T, float>::value) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + R * K), _MM_HINT_T0);
      }
      GPT_UNROLL for (int b = 0; b < NB; b++) xb[b] = x + b * K + i;
      step(wr, xb);
    }
    if (K16 < K) {
      T wpad[R][16] = {};
      float xpad[NB][16] = {};
      const T* wr[R];
      const float* xb[NB];
      for (int r = 0; r < R; r++) std::memcpy(wpad[r], w + r * K + K16, (K - K16) * sizeof(T)), wr[r] = wpad[r];
      for (int b = 0; b < NB; b++) std::memcpy(xpad[b], x + b * K + K16, (K - K16) * sizeof(float)), xb[b] = xpad[b];
      step(wr, xb);
    }
    GPT_UNROLL for (int r = 0; r < R; r++)
      GPT_UNROLL for (int b = 0; b < NB; b++)
        s[r * NB + b] = reduce_add8(C == 2 ? _mm256_add_ps(acc[0][r][b], acc[C - 1][r][b]) : acc[0][r][b]);
  }
}

// int8 with AVX2, a block of 32 per step, as llama.cpp's Q8_0 x Q8_0: vpmaddubsw multiplies
// unsigned by signed bytes, so it takes |x| and the weights with x's sign moved onto them (vpsignb),
// summing pairs into 16-bit lanes (at most 2 * 127 * 127: no saturation); vpmaddwd by ones sums
// those into 8 int32 lanes, which take the block's dw * dx. The scales of 8 blocks at a time are
// widened together (vcvtph2ps) into a small array. A step holds R rows of W, one row of x's block
// (and its |x|) at a time, R * NB accumulators, ones and two temporaries in the 16 ymm registers:
// more runs as two halves. (Holding all NB rows of x instead spilled accumulators to the stack and
// a per-block test for the partial block: 1.05-1.28x slower at B = 1..8 on 124M's shapes, Zen 3.)
template <int R, int NB>
GPT_AVX2 void dot_rows_avx2_int8(const Matrix& m, int64_t n, const Rows& x, float* s) {
  if constexpr (R * NB + R + 5 > 16) {
    dot_rows_avx2_int8<R / 2, NB>(m, n, x, s);
    dot_rows_avx2_int8<R / 2, NB>(m, n + R / 2, x, s + R / 2 * NB);
  } else {
    const int64_t K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK, nfull = K / QBLOCK;
    const int8_t* w = static_cast<const int8_t*>(m.w) + n * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R][NB];
    GPT_UNROLL for (int r = 0; r < R; r++)
      GPT_UNROLL for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();
    alignas(32) float scales[R][NB][8];
    const auto step = [&](const int8_t* const* wr, const int8_t* const* xb, int j8) GPT_AVX2 {
      __m256i wq[R];
      GPT_UNROLL for (int r = 0; r < R; r++) wq[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r]));
      GPT_UNROLL for (int b = 0; b < NB; b++) {
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb[b])), xabs = _mm256_sign_epi8(xq, xq);
        GPT_UNROLL for (int r = 0; r < R; r++) {
          const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(xabs, _mm256_sign_epi8(wq[r], xq)), ones);
          acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_broadcast_ss(&scales[r][b][j8]), acc[r][b]);
        }
      }
    };
    for (int64_t j0 = 0; j0 < nblk; j0 += 8) {
      const int64_t nb8 = std::min<int64_t>(8, nblk - j0);
      GPT_UNROLL for (int r = 0; r < R; r++) {  // dw * dx of these 8 blocks (fewer at a row's end: a zero-padded copy)
        const at::Half* dw_at = m.scale + (n + r) * nblk + j0;
        alignas(16) at::Half dw_pad[8] = {};
        if (nb8 < 8) std::copy(dw_at, dw_at + nb8, dw_pad), dw_at = dw_pad;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw_at)));
        GPT_UNROLL for (int b = 0; b < NB; b++) {
          const float* dx_at = x.d + b * nblk + j0;
          alignas(32) float dx_pad[8] = {};
          if (nb8 < 8) std::copy(dx_at, dx_at + nb8, dx_pad), dx_at = dx_pad;
          _mm256_store_ps(scales[r][b], _mm256_mul_ps(dw, _mm256_loadu_ps(dx_at)));
        }
      }
      for (int64_t j = j0; j < std::min(j0 + 8, nfull); j++) {
        const int8_t* wr[R];
        const int8_t* xb[NB];
        GPT_UNROLL for (int r = 0; r < R; r++) {
          wr[r] = w + r * K + j * QBLOCK;
          _mm_prefetch(reinterpret_cast<const char*>(wr[r] + R * K), _MM_HINT_T0);  // (int8 streaming: 11 -> 18 GB/s)
        }
        GPT_UNROLL for (int b = 0; b < NB; b++) xb[b] = x.q + b * K + j * QBLOCK;
        step(wr, xb, static_cast<int>(j - j0));
      }
    }
    if (nfull < nblk) {  // a partial last block: a zero-padded copy (scales still hold its group's)
      const int64_t i = nfull * QBLOCK;
      alignas(32) int8_t pad[R + NB][QBLOCK] = {};
      const int8_t* wr[R];
      const int8_t* xb[NB];
      for (int r = 0; r < R; r++) std::memcpy(pad[r], w + r * K + i, K - i), wr[r] = pad[r];
      for (int b = 0; b < NB; b++) std::memcpy(pad[R + b], x.q + b * K + i, K - i), xb[b] = pad[R + b];
      step(wr, xb, static_cast<int>(nfull % 8));
    }
    GPT_UNROLL for (int r = 0; r < R; r++)
      GPT_UNROLL for (int b = 0; b < NB; b++) s[r * NB + b] = reduce_add8(acc[r][b]);
  }
}

// quantize_row_generic's rule, a block of 32 at a time (a partial last block takes the generic loop).
GPT_AVX2 void quantize_row_avx2(const float* x, int64_t K, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t j = 0;
  for (; (j + 1) * QBLOCK <= K; j++) {
    const int64_t i = j * QBLOCK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    GPT_UNROLL for (int c = 0; c < 4; c++) {
      v[c] = _mm256_loadu_ps(x + i + 8 * c);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[c]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float dj = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.0f;
    const __m256 inverse = _mm256_set1_ps(dj > 0.0f ? 1.0f / dj : 0.0f);
    d[j] = dj;
    __m256i qi[4];
    GPT_UNROLL for (int c = 0; c < 4; c++) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[c], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qi[c] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    }
    // The packs interleave 128-bit lanes: 4-byte groups come out as 0,2,4,6,1,3,5,7 of the 8 wanted.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  if (j * QBLOCK < K) quantize_row_generic(x + j * QBLOCK, K - j * QBLOCK, q + j * QBLOCK, d + j);
}

bool has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

bool has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  return has && has_avx512();
}

bool has_amx() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has && has_vnni();
}

bool has_amx_bf16() {
  static const bool has = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22));  // AMX-BF16
  }();
  return has && has_amx();
}

bool has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

bool use_avx512() { return has_avx512() && forced_isa() < kAvx2; }
#else
bool has_amx() { return false; }
bool has_amx_bf16() { return false; }
bool has_avx512() { return false; }
bool has_vnni() { return false; }
bool has_avx2() { return false; }
bool use_avx512() { return false; }
#endif

using QuantizeRow = void (*)(const float*, int64_t, int8_t*, float*);
using DotRows = void (*)(const Matrix&, int64_t, const Rows&, float*);
using DotUnit = void (*)(const Matrix&, int64_t, const XRows&, int64_t, float*);

template <class T, int R, int NB>
DotRows pick_dot_rows(Isa isa) {
  if constexpr (std::is_same<T, int8_t>::value) {
#if GPT_X86
    if (isa < kAvx2 && has_vnni()) return &dot_rows_vnni_int8<R, NB>;
    if (isa < kGeneric && has_avx2()) return &dot_rows_avx2_int8<R, NB>;
#endif
    return &dot_rows_generic_int8<R, NB>;
  } else {
#if GPT_X86
    if (isa < kAvx2 && has_avx512()) return &dot_rows_avx512<T, R, NB>;
    if (isa < kGeneric && has_avx2()) return &dot_rows_avx2<T, R, NB>;
#endif
    return &dot_rows_generic<T, R, NB>;
  }
}

constexpr int kRows = 4, kBatch = 4;  // 16 accumulators of 16 floats: half the AVX-512 registers

// One ISA's kernels for a kind of matrix: the product for R in {1, 4} rows of W and NB in 1..4
// rows of x, f[R == 4][NB - 1], the quantizer of x's rows (int8 matrices), the AMX product of
// 16 rows of W by a group of rows of x (int8: 8, bf16: 16; on CPUs with AMX, else null), and how
// many rows of W a product takes when x is a single row (batch 1).
struct DotTable {
  DotRows f[2][kBatch];
  QuantizeRow quantize;
  DotUnit amx;
  int rows_for_one_x;
};

// Which rows' kernel dot_table picked: 0 generic, 1 AVX2, 2 AVX-512 (for int8, AVX512-VNNI).
template <class T>
int64_t rows_path(const DotTable& t) {
  const DotRows picked = t.f[1][0];
  if constexpr (std::is_same<T, int8_t>::value) {
#if GPT_X86
    if (picked == &dot_rows_vnni_int8<kRows, 1>) return 2;
    if (picked == &dot_rows_avx2_int8<kRows, 1>) return 1;
#endif
  } else {
#if GPT_X86
    if (picked == &dot_rows_avx512<T, kRows, 1>) return 2;
    if (picked == &dot_rows_avx2<T, kRows, 1>) return 1;
#endif
  }
  return 0;
}

template <class T>
DotTable dot_table(Isa isa) {
#if GPT_X86
  const QuantizeRow quantize = isa < kAvx2 && has_avx512()    ? &quantize_row_avx512
                               : isa < kGeneric && has_avx2() ? &quantize_row_avx2
                                                              : &quantize_row_generic;
  DotUnit amx = nullptr;
  if (isa == kBest && std::is_same<T, int8_t>::value && has_amx()) amx = &dot_unit_amx_int8;
  if (isa == kBest && std::is_same<T, at::BFloat16>::value && has_amx_bf16()) amx = &dot_unit_amx_bf16;
#else
  const QuantizeRow quantize = &quantize_row_generic;
  const DotUnit amx = nullptr;
#endif
  DotTable t{{{pick_dot_rows<T, 1, 1>(isa), pick_dot_rows<T, 1, 2>(isa), pick_dot_rows<T, 1, 3>(isa),
               pick_dot_rows<T, 1, 4>(isa)},
              {pick_dot_rows<T, 4, 1>(isa), pick_dot_rows<T, 4, 2>(isa), pick_dot_rows<T, 4, 3>(isa),
               pick_dot_rows<T, 4, 4>(isa)}},
             quantize, amx, kRows};
  // At batch 1 the AVX2 bf16 and int8 products read W a row at a time: one sequential stream per
  // thread, not 4 rows' streams side by side, each ending every K columns. That streamed 1.1-1.3x
  // faster per token on Zen 3 (124M; float32, whose loop issues no prefetches, was 0.9-1.0x and
  // keeps 4).
  if (!std::is_same<T, float>::value && rows_path<T>(t) == 1) t.rows_for_one_x = 1;
  return t;
}

// The kernels for a kind of matrix, picked once (GPT_CPU_ISA=generic is read per call instead:
// the tests set it between calls).
const DotTable& dot_table(Kind kind, Isa isa) {
  static const DotTable tables[4][3] = {
      {dot_table<float>(kBest), dot_table<at::BFloat16>(kBest), dot_table<int8_t>(kBest)},
      {dot_table<float>(kNoAmx), dot_table<at::BFloat16>(kNoAmx), dot_table<int8_t>(kNoAmx)},
      {dot_table<float>(kAvx2), dot_table<at::BFloat16>(kAvx2), dot_table<int8_t>(kAvx2)},
      {dot_table<float>(kGeneric), dot_table<at::BFloat16>(kGeneric), dot_table<int8_t>(kGeneric)}};
  return tables[isa][static_cast<int>(kind)];
}

// The KV cache holds float32, or bfloat16 (uint16_t bits) for bf16/int8 weights: half the bytes
// a batch's attention reads per step. Read with to_float, written with cache_store.
inline void cache_store(float v, float* p) { *p = v; }
inline void cache_store(float v, uint16_t* p) { *p = float_to_bf16(v); }

// One head's attention for one new token over cache positions 0..n-1: out = softmax(q K^T * scale) V,
// p (n floats) for the weights. Inlined into one function per cache type, cloned per ISA, so all
// three loops vectorize with the CPU's widest vectors (a call per position to a separately cloned
// dot cost as much as the dot).
template <class T>
__attribute__((always_inline)) inline void attend_head_body(const float* q, const T* K, const T* V, int64_t n,
                                                            int64_t D, float scale, float* p, float* out) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; j++) {
    const T* k = K + j * D;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; d++) s += q[d] * to_float(k[d]);
    p[j] = s * scale;
    m = std::max(m, p[j]);
  }
  float l = 0.0f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; j++) l += (p[j] = exp_approx(p[j] - m));
  for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
  for (int64_t j = 0; j < n; j++) {
    const float pj = p[j];
    const T* v = V + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; d++) out[d] += pj * to_float(v[d]);
  }
  const float inv = 1.0f / l;
#pragma omp simd
  for (int64_t d = 0; d < D; d++) out[d] *= inv;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_head_generic(const float* q, const float* K, const float* V, int64_t n, int64_t D, float scale, float* p,
                         float* out) {
  attend_head_body(q, K, V, n, D, scale, p, out);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_head_generic(const float* q, const uint16_t* K, const uint16_t* V, int64_t n, int64_t D, float scale,
                         float* p, float* out) {
  attend_head_body(q, K, V, n, D, scale, p, out);
}

#if GPT_X86
GPT_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 k) {  // the bf16 cache
  return load16(reinterpret_cast<const at::BFloat16*>(p), k);
}

// Lane j of the result: the sum of v[j]'s 16 lanes. A tree of 15 adds (halves, quarters, pairs,
// lanes of the 16 vectors at once) leaves vector j's sum in lane kTreeLane[j] (an involution), and
// one permute puts it back; reducing each vector alone costs ~4 shuffles and 4 adds apiece.
GPT_AVX512 inline __m512 sum_each(const __m512* v) {
  __m512 w[8], x[4], y[2];
  GPT_UNROLL8 for (int i = 0; i < 8; i++)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  GPT_UNROLL for (int i = 0; i < 4; i++)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  GPT_UNROLL for (int i = 0; i < 2; i++) {
    const __m512d a = _mm512_castps_pd(x[i]), b = _mm512_castps_pd(x[i + 2]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i kTreeLane = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(kTreeLane, z);
}

// attend_head_body with AVX-512 for D <= 16 NC: the scores of 16 positions at a time, summed across
// lanes together (sum_each) where the loop above reduced each position's vector alone; q and the
// output stay in registers (two output accumulators, even and odd positions, to overlap the FMAs'
// latency). Batch decode reads B caches per step: at B = 8 the loop above ran at ~11 GB/s.
template <class T, int NC>
GPT_AVX512 void attend_head_avx512(const float* q, const T* K, const T* V, int64_t n, int64_t D, float scale, float* p,
                                   float* out) {
  __mmask16 mask[NC];
  __m512 qv[NC];
  GPT_UNROLL8 for (int c = 0; c < NC; c++) {
    mask[c] = first_lanes(D - 16 * c);
    qv[c] = _mm512_maskz_loadu_ps(mask[c], q + 16 * c);
  }
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {
      const T* key = K + std::min<int64_t>(j0 + k, n - 1) * D;  // (past n: the last again, masked out below)
      __m512 a = _mm512_mul_ps(qv[0], load16(key, mask[0]));
      GPT_UNROLL8 for (int c = 1; c < NC; c++) a = _mm512_fmadd_ps(qv[c], load16(key + 16 * c, mask[c]), a);
      acc[k] = a;
    }
    const __mmask16 valid = first_lanes(n - j0);
    const __m512 s = _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale));
    _mm512_mask_storeu_ps(p + j0, valid, s);
    mx = _mm512_mask_max_ps(mx, valid, mx, s);
  }
  const float m = _mm512_reduce_max_ps(mx);
  float l = 0.0f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; j++) l += (p[j] = exp_approx(p[j] - m));
  __m512 o[2][NC];
  GPT_UNROLL8 for (int c = 0; c < NC; c++) o[0][c] = o[1][c] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    GPT_UNROLL8 for (int c = 0; c < NC; c++) {
      o[0][c] = _mm512_fmadd_ps(p0, load16(V + j * D + 16 * c, mask[c]), o[0][c]);
      o[1][c] = _mm512_fmadd_ps(p1, load16(V + (j + 1) * D + 16 * c, mask[c]), o[1][c]);
    }
  }
  if (j < n) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
    GPT_UNROLL8 for (int c = 0; c < NC; c++) o[0][c] = _mm512_fmadd_ps(p0, load16(V + j * D + 16 * c, mask[c]), o[0][c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  GPT_UNROLL8 for (int c = 0; c < NC; c++)
    _mm512_mask_storeu_ps(out + 16 * c, mask[c], _mm512_mul_ps(_mm512_add_ps(o[0][c], o[1][c]), inv));
}
#endif

// One head's attention (attend_head_body): AVX-512 for heads up to 128 wide where the CPU has it
// (avx512: decided once per decode_blocks call from its Isa, not per head), else the generic loops.
template <class T>
void attend_head(const float* q, const T* K, const T* V, int64_t n, int64_t D, float scale, float* p, float* out,
                 bool avx512) {
#if GPT_X86
  if (avx512) {
    switch ((D + 15) / 16) {
      case 1: return attend_head_avx512<T, 1>(q, K, V, n, D, scale, p, out);
      case 2: return attend_head_avx512<T, 2>(q, K, V, n, D, scale, p, out);
      case 3: return attend_head_avx512<T, 3>(q, K, V, n, D, scale, p, out);
      case 4: return attend_head_avx512<T, 4>(q, K, V, n, D, scale, p, out);
      case 5: return attend_head_avx512<T, 5>(q, K, V, n, D, scale, p, out);
      case 6: return attend_head_avx512<T, 6>(q, K, V, n, D, scale, p, out);
      case 7: return attend_head_avx512<T, 7>(q, K, V, n, D, scale, p, out);
      case 8: return attend_head_avx512<T, 8>(q, K, V, n, D, scale, p, out);
      default: break;
    }
  }
#endif
  attend_head_generic(q, K, V, n, D, scale, p, out);
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

// out[b, n] = bias[n] + W[n, :] . x[b, :] for the matrix m (N, K); then kGelu applies GELU,
// kAddToOut adds it to what out holds (the residual). Called by every thread of a parallel
// region. The rows of W go out in units of 16 under guided scheduling: a thread's first run of
// units is half the matrix, later runs shrink to one unit, so each thread streams long contiguous
// stretches at the hardware prefetchers' pace and the two finish within a unit of each other.
// (Fixed 64-row chunks taken in turn broke each thread's stream every 49-393 KB and could leave
// one thread waiting ~30 us at a matrix's end: guided is 3% (fp32), 11% (bf16) and 7% (int8)
// faster per token at 124M.) Each row of W is read from memory once for all B rows of x (groups
// of 4 rows stay in L1 while up to 4 rows of x at a time pass over them). For an int8 or bf16
// matrix the threads first prepare x's rows in `xr` (quantized or rounded, packed for the tiles;
// the loop's barrier then publishes them).
constexpr int64_t kUnitRows = 16;

template <Epilogue E>
void linear(const float* x, int64_t B, const Matrix& m, const DotTable& dots, XRows& xr, float* out) {
  const int64_t N = m.N, K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK, units = (N + kUnitRows - 1) / kUnitRows;
  const int64_t amx_rows = m.kind == Kind::I8 ? kAmxRowsInt8 : kAmxRowsBf16;  // rows of x per tile product
  const int64_t amx_cols = m.kind == Kind::I8 ? 2 * QBLOCK : QBLOCK;            // columns of W per tile product
  const bool amx = m.kind != Kind::F32 && dots.amx && B >= kAmxMinRows && K % amx_cols == 0;
  const int64_t groups = (B + amx_rows - 1) / amx_rows, steps = K / amx_cols;
  if (m.kind == Kind::I8) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) dots.quantize(x + b * K, K, xr.q.data() + b * K, xr.d.data() + b * nblk);
    if (amx) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < groups * steps; i++) pack_tile_int8(xr, B, K, i / steps, i % steps);
    }
  } else if (m.kind == Kind::BF16) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) round_row_bf16(x + b * K, K, xr.rounded.data() + b * K);
    if (amx) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < groups * steps; i++) pack_tile_bf16(xr, B, K, i / steps, i % steps);
    }
    x = xr.rounded.data();
  }
  const auto emit = [&](int64_t n, int64_t b, float s) {  // out[b, n] from the product s
    const float v = s + (m.bias ? m.bias[n] : 0.0f);
    float& o = out[b * N + n];
    o = E == Epilogue::kAddToOut ? o + v : v;
  };
#if GPT_X86
  if (amx) load_tile_config();
#endif
#pragma omp for schedule(guided)
  for (int64_t u = 0; u < units; u++) {
    const int64_t n0 = u * kUnitRows, n1 = std::min(n0 + kUnitRows, N);
    if (amx && n1 - n0 == kUnitRows) {  // (a last unit of fewer rows takes the VNNI products)
      for (int64_t g = 0; g < groups; g++) {
        float s[kAmxRowsBf16 * kUnitRows];  // [row of x][row of W]
        dots.amx(m, n0, xr, g, s);
        for (int64_t b = g * amx_rows; b < std::min(B, (g + 1) * amx_rows); b++)
          for (int64_t r = 0; r < kUnitRows; r++) emit(n0 + r, b, s[(b - g * amx_rows) * kUnitRows + r]);
      }
    } else {
      for (int64_t n = n0; n < n1;) {
        const int rows = n1 - n < kRows ? 1 : B == 1 ? dots.rows_for_one_x : kRows;  // (last rows one at a time)
        for (int64_t b = 0; b < B; b += kBatch) {
          const int nb = static_cast<int>(std::min<int64_t>(kBatch, B - b));
          float s[kRows * kBatch];
          const Rows rows_b{x + b * K, xr.q.data() + b * K, xr.d.data() + b * nblk};
          dots.f[rows == kRows][nb - 1](m, n, rows_b, s);
          for (int r = 0; r < rows; r++)
            for (int j = 0; j < nb; j++) emit(n + r, b + j, s[r * nb + j]);
        }
        n += rows;
      }
    }
    if (E == Epilogue::kGelu)
      for (int64_t b = 0; b < B; b++) gelu_tanh_f32(out + b * N + n0, out + b * N + n0, n1 - n0);
  }
#if GPT_X86
  if (amx) release_tiles();  // (the OS then need not save them at a context switch)
#endif
}

// y[b, h*D:(h+1)*D] = softmax(q k^T / sqrt(D)) v over cache positions 0..pos, after writing this
// token's k, v (from qkv) at pos. One (row, head) per iteration, shared by the region's threads.
template <class T>
void attend(const float* qkv, int64_t B, int64_t H, int64_t D, T* cache_k, T* cache_v, int64_t L, int64_t pos,
            bool avx512, float* y) {
  const int64_t C = H * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> p(pos + 1);
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * H; task++) {
    const int64_t b = task / H, h = task % H;
    const float* q = qkv + b * 3 * C + h * D;
    T* K = cache_k + (b * H + h) * L * D;
    T* V = cache_v + (b * H + h) * L * D;
    for (int64_t d = 0; d < D; d++) {
      cache_store(q[C + d], K + pos * D + d);
      cache_store(q[2 * C + d], V + pos * D + d);
    }
    attend_head(q, K, V, pos + 1, D, scale, p.data(), y + b * C + h * D, avx512);
  }
}

// One layer's tensors, checked: what a thread of the parallel region reads.
struct Layer {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
  Matrix qkv, proj, fc, out;
  const DotTable *dq, *dp, *df, *dm;
  void *cache_k, *cache_v;
};

Layer layer(const at::Tensor* w, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t B, int64_t C, int64_t pos,
            Isa isa) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
                  cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == cache_v.scalar_type() &&
                  (cache_k.scalar_type() == at::kFloat || cache_k.scalar_type() == at::kBFloat16),
              "decode_blocks: each layer's cache_k, cache_v must be contiguous (B, H, L, D) tensors, both float32 or "
              "both bfloat16");
  for (const Weight i : {LN1_W, LN1_B, LN2_W, LN2_B})
    TORCH_CHECK(w[i].scalar_type() == at::kFloat && w[i].is_contiguous() && w[i].numel() == C,
                "decode_blocks: LayerNorms must be float32 (", C, ",)");
  TORCH_CHECK(cache_k.size(0) == B && cache_k.size(1) * cache_k.size(3) == C, "decode_blocks: cache shape does not match x");
  TORCH_CHECK(0 <= pos && pos < cache_k.size(2), "decode_blocks: pos ", pos, " outside the cache's ", cache_k.size(2),
              " positions");
  Layer l{w[LN1_W].data_ptr<float>(), w[LN1_B].data_ptr<float>(), w[LN2_W].data_ptr<float>(), w[LN2_B].data_ptr<float>(),
          matrix(w[QKV_W], w[QKV_S], w[QKV_B], "decode_blocks: c_attn"),
          matrix(w[PROJ_W], w[PROJ_S], w[PROJ_B], "decode_blocks: attn.c_proj"),
          matrix(w[FC_W], w[FC_S], w[FC_B], "decode_blocks: c_fc"),
          matrix(w[OUT_W], w[OUT_S], w[OUT_B], "decode_blocks: mlp.c_proj"), {}, {}, {}, {},
          cache_k.data_ptr(), cache_v.data_ptr()};
  TORCH_CHECK(l.qkv.N == 3 * C && l.qkv.K == C && l.proj.N == C && l.proj.K == C && l.fc.K == C && l.out.N == C &&
                  l.out.K == l.fc.N,
              "decode_blocks: weight shapes do not match n_embd ", C);
  l.dq = &dot_table(l.qkv.kind, isa), l.dp = &dot_table(l.proj.kind, isa);
  l.df = &dot_table(l.fc.kind, isa), l.dm = &dot_table(l.out.kind, isa);
  return l;
}

// The blocks of a model for one new token: x (B, C) through each layer in turn, in one call and
// one parallel region (a call per block cost ~25 us of dispatch, allocation and fork/join, ~0.3 ms
// a token at 12 layers). weights: 16 per layer (enum Weight), caches: k, v per layer.
at::Tensor decode_blocks_cpu(const at::Tensor& x, at::TensorList w, at::TensorList caches, int64_t pos) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_blocks: x must be a contiguous (B, C) float32 tensor");
  const int64_t n_layer = static_cast<int64_t>(caches.size()) / 2;
  TORCH_CHECK(n_layer >= 1 && static_cast<int64_t>(caches.size()) == 2 * n_layer &&
                  static_cast<int64_t>(w.size()) == N_WEIGHTS * n_layer,
              "decode_blocks: expected ", N_WEIGHTS, " weight tensors and a cache_k, cache_v per layer, got ", w.size(),
              " and ", caches.size());
  const int64_t B = x.size(0), C = x.size(1);
  const Isa isa = forced_isa();
  std::vector<Layer> layers;
  int64_t F = 0;  // the widest MLP
  bool int8 = false, bf16 = false;  // the kinds of matrix the blocks hold
  for (int64_t i = 0; i < n_layer; i++) {
    const at::Tensor &k = caches[2 * i], &v = caches[2 * i + 1];
    TORCH_CHECK(k.sizes() == caches[0].sizes(), "decode_blocks: every layer's cache has one shape");
    TORCH_CHECK(k.scalar_type() == caches[0].scalar_type(), "decode_blocks: the caches are all float32 or all bfloat16");
    layers.push_back(layer(w.data() + N_WEIGHTS * i, k, v, B, C, pos, isa));  // (v checked against k)
    F = std::max(F, layers.back().fc.N);
    for (const Matrix* m : {&layers.back().qkv, &layers.back().proj, &layers.back().fc, &layers.back().out}) {
      int8 |= m->kind == Kind::I8;
      bf16 |= m->kind == Kind::BF16;
    }
  }
  const int64_t H = caches[0].size(1), L = caches[0].size(2), D = caches[0].size(3);
  const bool bf16_cache = caches[0].scalar_type() == at::kBFloat16;
  const bool avx512 = isa < kAvx2 && has_avx512();  // attention's kernel

  at::Tensor out = x.clone();
  at::Tensor h = at::empty({B, C}, x.options()), qkv = at::empty({B, 3 * C}, x.options());
  at::Tensor y = at::empty({B, C}, x.options()), f = at::empty({B, F}, x.options());
  float *o = out.data_ptr<float>(), *hp = h.data_ptr<float>(), *qp = qkv.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *fp = f.data_ptr<float>();
  XRows xr(B, F, int8, bf16);  // (F, the widest input)
  // One parallel region for all the blocks: their phases are separated by barriers (each `omp for`
  // and `omp single` ends with one), ~1 us, where a region per product would cost a fork/join each.
#pragma omp parallel num_threads(at::get_num_threads())
  for (const Layer& l : layers) {
#pragma omp single
    layer_norm(o, B, C, l.ln1_w, l.ln1_b, hp);
    linear<Epilogue::kStore>(hp, B, l.qkv, *l.dq, xr, qp);
    if (bf16_cache)
      attend(qp, B, H, D, static_cast<uint16_t*>(l.cache_k), static_cast<uint16_t*>(l.cache_v), L, pos, avx512, yp);
    else
      attend(qp, B, H, D, static_cast<float*>(l.cache_k), static_cast<float*>(l.cache_v), L, pos, avx512, yp);
    linear<Epilogue::kAddToOut>(yp, B, l.proj, *l.dp, xr, o);
#pragma omp single
    layer_norm(o, B, C, l.ln2_w, l.ln2_b, hp);
    linear<Epilogue::kGelu>(hp, B, l.fc, *l.df, xr, fp);
    linear<Epilogue::kAddToOut>(fp, B, l.out, *l.dm, xr, o);
  }
  return out;
}

// x (M, K) float32 -> x W^T + bias (M, N) float32, for W stored as above: the LM head's product
// (and any linear layer's) at generation's few rows.
at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quantized_linear: x must be a contiguous (M, K) float32 tensor");
  const Matrix m = matrix(weight, scale, bias, "quantized_linear");
  TORCH_CHECK(m.K == x.size(1), "quantized_linear: x has ", x.size(1), " columns, the weight ", m.K);
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, m.N}, x.options());
  const DotTable& dots = dot_table(m.kind, forced_isa());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  XRows xr(M, m.K, m.kind == Kind::I8, m.kind == Kind::BF16);
#pragma omp parallel num_threads(at::get_num_threads())
  linear<Epilogue::kStore>(xp, M, m, dots, xr, op);
  return out;
}

// One block of n <= 32 weights -> q, returning its scale: max |w| / 127 rounded to float16 (NaN
// if a weight is NaN), q = round-half-even(w / scale) as w * (1 / scale).
__attribute__((target_clones("avx512f", "avx2", "default")))
at::Half quantize_block(const float* w, int64_t n, int8_t* q) {
  float amax = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : amax) reduction(+ : nan)
  for (int64_t i = 0; i < n; i++) {
    const float a = std::fabs(w[i]);
    amax = a > amax ? a : amax;
    nan += a != a;
  }
  const at::Half d = static_cast<at::Half>(nan ? NAN : amax / 127.0f);
  const float inv = static_cast<float>(d) > 0.0f ? 1.0f / static_cast<float>(d) : 0.0f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds |v| < 2^22 to an integer, half-even
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    const float v = std::max(-127.0f, std::min(127.0f, w[i] * inv));
    q[i] = static_cast<int8_t>((v + magic) - magic);
  }
  return d;
}

// w (N, K) float32 -> (q int8 (N, K), scale float16 (N, ceil(K / 32))): quantize_block per block
// of 32 along a row, as gpt.quantize_weight computes them, bit for bit; one pass over w.
std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "quantize_int8: w must be a (N, K) float32 tensor");
  const at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), nblk = (K + QBLOCK - 1) / QBLOCK;
  at::Tensor q = at::empty({N, K}, wc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N, nblk}, wc.options().dtype(at::kHalf));
  const float* wp = wc.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  at::Half* sp = scale.data_ptr<at::Half>();
  parallel_rows(N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      for (int64_t j = 0; j < K; j += QBLOCK)
        sp[r * nblk + j / QBLOCK] = quantize_block(wp + r * K + j, std::min(QBLOCK, K - j), qp + r * K + j);
  });
  return {q, scale};
}

// Rows r0..r1 of q * scale as bfloat16, one rounding (float_to_bf16: to nearest even).
void dequantize_rows_generic(const Matrix& m, int64_t r0, int64_t r1, uint16_t* out) {
  const int64_t K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK;
  const int8_t* q = static_cast<const int8_t*>(m.w);
  for (int64_t r = r0; r < r1; r++)
    for (int64_t j = 0; j < K; j += QBLOCK) {
      const float d = static_cast<float>(m.scale[r * nblk + j / QBLOCK]);
      for (int64_t i = j; i < std::min(j + QBLOCK, K); i++)
        out[r * K + i] = float_to_bf16(static_cast<float>(q[r * K + i]) * d);
    }
}

#if GPT_X86
// float_to_bf16 (common.h) for 16 floats: round to nearest even on the bits, a NaN made quiet.
GPT_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
  return _mm512_cvtepi32_epi16(r);
}

// dequantize_rows_generic, 16 weights at a time: the scalar loop ran at ~6 GB/s (1 s of a gpt2-xl
// int8 prompt went to it), and an `omp simd` loop per 32-weight block measured ~1.5x slower than this.
GPT_AVX512 void dequantize_rows_avx512(const Matrix& m, int64_t r0, int64_t r1, uint16_t* out) {
  const int64_t K = m.K, nblk = (K + QBLOCK - 1) / QBLOCK;
  const int8_t* q = static_cast<const int8_t*>(m.w);
  for (int64_t r = r0; r < r1; r++)
    for (int64_t j = 0; j < nblk; j++) {
      const __m512 d = _mm512_set1_ps(static_cast<float>(m.scale[r * nblk + j]));
      for (int64_t i = j * QBLOCK; i < std::min((j + 1) * QBLOCK, K); i += 16) {
        const __mmask16 k = first_lanes(K - i);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, q + r * K + i)));
        _mm256_mask_storeu_epi16(out + r * K + i, k, to_bf16(_mm512_mul_ps(w, d)));
      }
    }
}
#endif

// q (N, K) int8, scale (N, ceil(K / 32)) float16 -> the weight q * scale as bfloat16 (one rounding),
// in one pass: what the prompt's bfloat16 GEMM reads, without float32 copies of the matrix.
at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale) {
  const Matrix m = matrix(q, scale, at::Tensor(), "dequantize_int8");
  TORCH_CHECK(m.kind == Kind::I8, "dequantize_int8: q must be int8");
  at::Tensor out = at::empty({m.N, m.K}, q.options().dtype(at::kBFloat16));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  parallel_rows(m.N, 64, [&](int64_t r0, int64_t r1) {
#if GPT_X86
    if (use_avx512()) return dequantize_rows_avx512(m, r0, r1, op);
#endif
    dequantize_rows_generic(m, r0, r1, op);
  });
  return out;
}

// The products' paths for a kind of matrix (gpt.product_paths): the rows' kernel, plus 4 where it
// has an AMX product.
int64_t product_paths_cpu(const at::Tensor& weight) {
  const Kind kind = kind_of(weight, "product_paths");
  const DotTable& t = dot_table(kind, forced_isa());
  const int64_t rows = kind == Kind::I8     ? rows_path<int8_t>(t)
                       : kind == Kind::BF16 ? rows_path<at::BFloat16>(t)
                                            : rows_path<float>(t);
  return rows | (t.amx ? 4 : 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
  m.impl("product_paths", &product_paths_cpu);
  m.impl("decode_blocks", &decode_blocks_cpu);
  m.impl("quantized_linear", &quantized_linear_cpu);
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}
