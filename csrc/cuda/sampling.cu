// Next-token sampling on CUDA, one block per row of logits (B, V) float32 row-major, uniform (B,)
// float64; returns (B,) int64, -1 for a row that cannot be sampled (a NaN or +inf in it, or all
// -inf), with gpt.sample_reference's semantics:
//   temperature 0 -> first index of the max; top-k keeps every logit >= the k-th largest (ties
//   kept); p_i = exp((x_i - max) / T) over the kept; top-p keeps the fewest most probable whose
//   mass reaches top_p * sum, plus ties of the last; draw = smallest kept index whose running
//   sum (index order) exceeds uniform * sum(kept p).
// No sort: the k-th largest logit and the nucleus threshold of p are each found by a radix
// select (4 passes of 8 bits over the row, shared-memory histograms); p is recomputed on the
// fly; the draw is a block-wide prefix sum over contiguous per-thread chunks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../checks.h"

namespace {

constexpr int kThreads = 1024;

// Order-preserving key of a float: larger float, larger unsigned key.
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Block-wide reductions; every thread gets the result. `scratch` holds 32 values.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < nwarps; w++) r = op(r, scratch[w]);
  return r;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Exclusive prefix sum of one double per thread, in thread order.
__device__ double block_exclusive_scan(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  double inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += up;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  double before = 0.0;
  for (int w = 0; w < warp && w < nwarps; w++) before += scratch[w];
  return before + inc - v;
}

// p of logit v: exp((v - m) / T) when v is kept by top-k (v >= kth), else 0.
__device__ __forceinline__ float prob(float v, float m, float T, float kth) {
  return v >= kth ? expf((v - m) / T) : 0.0f;  // accurate: a subnormal p still counts as kept
}

// The k-th largest logit of the row (k >= 1): 4 passes of 8 bits, most significant first; each
// pass counts, among values whose key matches the bits chosen so far, how many fall in each of
// 256 bins, and picks the bin holding the k-th from the top.
__device__ float kth_largest(const float* x, int V, int k, int* hist, int* chosen) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const uint32_t key = float_key(x[j]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, b = 255;
      for (; b > 0; b--) {
        if (above + hist[b] >= k) break;
        above += hist[b];
      }
      chosen[0] = b;
      chosen[1] = k - above;  // rank of the k-th within the chosen bin
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen[0]) << shift;
    mask |= 255u << shift;
    k = chosen[1];
    __syncthreads();  // chosen is rewritten by the next pass
  }
  return key_float(prefix);
}

// The nucleus threshold: the largest p value t with sum_{p_i >= t} p_i >= target (the m-th
// largest p of the reference). Radix select on the bits of p (non-negative floats order like
// their bits), with the mass of each bin in double.
__device__ float nucleus_threshold(const float* x, int V, float m, float T, float kth, double target, double* mass,
                                   int* count, int* chosen, double* above_s) {
  uint32_t prefix = 0, mask = 0;
  double above = 0.0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      mass[b] = 0.0;
      count[b] = 0;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float p = prob(x[j], m, T, kth);
      const uint32_t bits = __float_as_uint(p);
      if (p > 0.0f && (bits & mask) == prefix) {
        atomicAdd(&mass[(bits >> shift) & 255u], static_cast<double>(p));
        atomicAdd(&count[(bits >> shift) & 255u], 1);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1, lowest = 0;
      for (int b = 255; b >= 0; b--) {
        if (count[b] == 0) continue;
        lowest = b;
        if (above + mass[b] >= target) {
          sel = b;
          break;
        }
        above += mass[b];
      }
      if (sel < 0) {  // rounding left the target unreached: keep everything
        sel = lowest;
        above -= mass[sel];
      }
      chosen[0] = sel;
      *above_s = above;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(chosen[0]) << shift;
    mask |= 255u << shift;
    above = *above_s;
    __syncthreads();
  }
  return __uint_as_float(prefix);
}

// Whether the block's row can be sampled: no thread saw a NaN, and its max m (NaN skipped) is
// finite. Every thread of the block calls it and gets the same answer.
__device__ bool can_be_sampled(int nan, float m) {
  return !__syncthreads_or(nan) && m > -INFINITY && m < INFINITY;
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, const double* uniform, int64_t* out, int V, float T, int top_k, double top_p) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ int hist[256];
  __shared__ double mass[256];
  __shared__ int chosen[2];
  __shared__ double above_s;
  __shared__ int found, last_kept;
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;

  if (T == 0.0f) {  // greedy: first index of the max, as torch.argmax
    float bv = -INFINITY;
    int bi = V, nan = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float v = x[j];
      nan |= v != v;
      if (v > bv || (v == bv && j < bi)) {
        bv = v;
        bi = j;
      }
    }
    const float m = block_reduce(bv, MaxOp(), fscratch);
    if (!can_be_sampled(nan, m)) {
      if (threadIdx.x == 0) out[row] = -1;
      return;
    }
    if (threadIdx.x == 0) found = V;
    __syncthreads();
    if (bv == m) atomicMin(&found, bi);
    __syncthreads();
    if (threadIdx.x == 0) out[row] = found < V ? found : 0;
    return;
  }

  float m = -INFINITY;
  int nan = 0;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    m = fmaxf(m, x[j]);  // (fmaxf skips NaN)
    nan |= x[j] != x[j];
  }
  m = block_reduce(m, MaxOp(), fscratch);
  if (!can_be_sampled(nan, m)) {
    if (threadIdx.x == 0) out[row] = -1;
    return;
  }
  const float kth = (top_k > 0 && top_k < V) ? kth_largest(x, V, top_k, hist, chosen) : -INFINITY;

  float t = 0.0f;  // keep p >= t
  if (top_p < 1.0) {
    double s = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += prob(x[j], m, T, kth);
    s = block_reduce(s, SumOp(), dscratch);
    t = nucleus_threshold(x, V, m, T, kth, top_p * s, mass, hist, chosen, &above_s);
  }

  // Draw: thread i owns the contiguous chunk [lo, hi). A thread whose chunk ends past u * total
  // runs its sum from its exclusive prefix to the first index that exceeds it; the smallest such
  // index wins (so a rounding difference between the scan and the running sum cannot lose it).
  const int chunk = (V + blockDim.x - 1) / blockDim.x;
  const int lo = min(V, static_cast<int>(threadIdx.x) * chunk), hi = min(V, lo + chunk);
  double local = 0.0;
  int my_last = -1;
  for (int j = lo; j < hi; j++) {
    const float p = prob(x[j], m, T, kth);
    if (p >= t && p > 0.0f) {
      local += p;
      my_last = j;
    }
  }
  const double before = block_exclusive_scan(local, dscratch);
  const double total = block_reduce(local, SumOp(), dscratch);
  const double target = uniform[row] * total;
  if (threadIdx.x == 0) {
    found = V;
    last_kept = -1;
  }
  __syncthreads();
  if (my_last >= 0) atomicMax(&last_kept, my_last);
  if (before + local > target) {
    double run = before;
    for (int j = lo; j < hi; j++) {
      const float p = prob(x[j], m, T, kth);
      if (p >= t && p > 0.0f) {
        run += p;
        if (run > target) {
          atomicMin(&found, j);
          break;
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) out[row] = found < V ? found : (last_kept >= 0 ? last_kept : V - 1);
}

at::Tensor sample_cuda(const at::Tensor& logits, const at::Tensor& uniform, double temperature, int64_t top_k,
                       double top_p) {
  TORCH_CHECK(logits.is_cuda() && uniform.is_cuda() && logits.device() == uniform.device(),
              "sample: expects CUDA tensors on one device");
  check_sample_inputs(logits, uniform, temperature);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V < (int64_t{1} << 30), "sample: vocabulary too large");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  if (B == 0) return out;
  const at::Tensor u = uniform.contiguous();
  const int k = static_cast<int>(std::min<int64_t>(std::max<int64_t>(top_k, 0), V));  // k >= V: no top-k
  sample_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), u.data_ptr<double>(), out.data_ptr<int64_t>(), static_cast<int>(V),
      static_cast<float>(temperature), k, top_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CUDA, m) { m.impl("sample", &sample_cuda); }
