// The dropout mask, one definition for the CPU and CUDA kernels (gpt.dropout_keep_at is its Python
// twin, bit for bit). Element n of a flat index space: for attention, score (b, h, i, j) of a
// (B, H, T, T) head stack is n = ((b*H + h)*T + i)*T + j; for the residual dropout (gpt::dropout_add),
// the element's index in the tensor. key = mix32(hi32(n) + lo32(seed) * 0x9E3779B9); element n is kept
// iff mix32(lo32(n) ^ key) >> 8 >= p * 2^24. A counter-based hash: backward regenerates the mask.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define GPT_HASH_INLINE __host__ __device__ __forceinline__
#else
#define GPT_HASH_INLINE inline __attribute__((always_inline))
#endif

// lowbias32 (C. Wellons), on uint32_t or a GCC vector of uint32_t (lane by lane).
template <class U>
GPT_HASH_INLINE U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutHash {
  uint32_t threshold;  // p * 2^24: keep iff the hash's top 24 bits are >= it
  uint32_t seed_term;  // lo32(seed) * 0x9E3779B9, wrapping

  DropoutHash(double p, int64_t seed)
      : threshold(static_cast<uint32_t>(p * 16777216.0)), seed_term(static_cast<uint32_t>(seed) * 0x9E3779B9U) {}
  // The key shared by every position with the same hi32(n).
  GPT_HASH_INLINE uint32_t key(uint64_t n) const { return mix32(static_cast<uint32_t>(n >> 32) + seed_term); }
  GPT_HASH_INLINE bool keep(uint64_t n) const {
    return (mix32(static_cast<uint32_t>(n) ^ key(n)) >> 8) >= threshold;
  }
};
