// CUDA kernels of gpt::attention_forward and gpt::attention_backward (schemas in csrc/ops.cpp):
// causal flash attention in fp32 with the counter-hash dropout of gpt.attention_dropout_keep.
// Same math as csrc/cpu/attention.cpp, written for clarity over speed (fp32 FMAs, no tensor
// cores): one thread owns one row (a query in forward and dQ, a key in dK/dV) and keeps its
// accumulator in registers; the other side streams through shared memory in tiles of BC rows.
//
// Layout: q, k, v, out, grad_* are (B, H, T, D) contiguous, head bh = b*H + h at bh*T*D; lse and
// the backward's Delta are (B, H, T). Scores are kept in base 2 (log2(e)/sqrt(D) folded into q
// or k), so every exponential is an exp2f. Nothing T x T is ever stored.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "../dropout_hash.h"

namespace {

constexpr int BR = 32;  // rows owned by a block, one thread each (one warp)
constexpr int BC = 16;  // rows of the streamed side per shared-memory tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// The dropout mask: the hash of csrc/dropout_hash.h (gpt.attention_dropout_keep, bit for bit).
struct Dropout : DropoutHash {
  bool on;
  float inv_keep;
  Dropout(double p, int64_t seed)
      : DropoutHash(p, seed), on(p > 0), inv_keep(p > 0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f) {}
  // 1/(1-p) where score (bh, i, j) is kept, else 0 (1 without dropout)
  __device__ __forceinline__ float scale(int64_t bh, int64_t T, int64_t i, int64_t j) const {
    if (!on) return 1.0f;
    return keep((static_cast<uint64_t>(bh) * T + i) * T + j) ? inv_keep : 0.0f;
  }
};

// Copies rows [r0, r0 + rows) of a (T, D) head into shared memory with row stride ld, times
// `mul`, zero past T. All threads of the block take part (coalesced over the flat index).
__device__ __forceinline__ void load_rows(float* dst, int ld, const float* __restrict__ src, int64_t r0,
                                          int rows, int64_t T, int D, float mul) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    dst[r * ld + c] = r0 + r < T ? src[(r0 + r) * D + c] * mul : 0.0f;
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

// Forward. Block (bh, query tile of BR), thread = query i. CPU reference: forward_units_impl.
//   per key tile j (up to the block's last query), in shared memory: s_j = q_i . k_j (base 2),
//   m' = max(m, s_j), o = o * 2^(m - m') + sum_j 2^(s_j - m') * keep_ij * v_j, l likewise (no keep);
// then out_i = o / l, lse_i = ln2 * (m + log2 l). Saved for backward: out and lse.
// Shared: qs BR x (D+1) (padded: thread t reads row t, conflict-free), ks, vs BC x D, ps BR x (BC+1).
template <int DMAX>
__global__ void __launch_bounds__(BR) attention_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                                               const float* __restrict__ v, float* __restrict__ out,
                                                               float* __restrict__ lse, int64_t T, int D, float qscale,
                                                               Dropout drop) {
  extern __shared__ float smem[];
  const int ldq = D + 1;
  float* qs = smem;
  float* ks = qs + BR * ldq;
  float* vs = ks + BC * D;
  float* ps = vs + BC * D;
  const int64_t bh = blockIdx.x, i0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int t = threadIdx.x;
  const int64_t i = i0 + t;
  const float* qh = q + bh * T * D;
  const float* kh = k + bh * T * D;
  const float* vh = v + bh * T * D;
  load_rows(qs, ldq, qh, i0, BR, T, D, qscale);

  float o[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) o[d] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int64_t last = min(i0 + BR, T) - 1;  // the block's last query
  for (int64_t j0 = 0; j0 <= last; j0 += BC) {
    __syncthreads();  // the previous tile is consumed (and qs is loaded)
    load_rows(ks, D, kh, j0, BC, T, D, 1.0f);
    load_rows(vs, D, vh, j0, BC, T, D, 1.0f);
    __syncthreads();
    if (i >= T || j0 > i) continue;  // no key of this tile is visible to query i
    float mx = m;
    for (int jj = 0; jj < BC; ++jj) {
      const float s = j0 + jj <= i ? dot(qs + t * ldq, ks + jj * D, D) : -INFINITY;
      ps[t * (BC + 1) + jj] = s;
      mx = fmaxf(mx, s);
    }
    const float alpha = exp2f(m - mx);  // 0 on the first tile (m = -inf)
    float sum = 0.0f;
    for (int jj = 0; jj < BC; ++jj) {
      const float p = exp2f(ps[t * (BC + 1) + jj] - mx);  // 0 for masked keys
      sum += p;
      ps[t * (BC + 1) + jj] = p * drop.scale(bh, T, i, j0 + jj);
    }
    l = l * alpha + sum;
    m = mx;
#pragma unroll
    for (int d = 0; d < DMAX; ++d) o[d] *= alpha;
    for (int jj = 0; jj < BC; ++jj) {
      const float p = ps[t * (BC + 1) + jj];
#pragma unroll
      for (int d = 0; d < DMAX; ++d)
        if (d < D) o[d] = fmaf(p, vs[jj * D + d], o[d]);
    }
  }
  if (i < T) {
    const float inv = 1.0f / l;
#pragma unroll
    for (int d = 0; d < DMAX; ++d)
      if (d < D) out[(bh * T + i) * D + d] = o[d] * inv;
    lse[bh * T + i] = (m + log2f(l)) * LN2;
  }
}

// Delta_i = rowsum(dO_i * O_i) and lse in base 2, one thread per row of every head.
__global__ void attention_delta_kernel(const float* __restrict__ dout, const float* __restrict__ out,
                                       const float* __restrict__ lse, float* __restrict__ delta,
                                       float* __restrict__ lse2, int64_t rows, int D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  delta[r] = dot(dout + r * D, out + r * D, D);
  lse2[r] = lse[r] * LOG2E;
}

// dQ. Block (bh, query tile of BR), thread = query i, dq_i in registers. CPU reference: the dQ
// part of backward_heads_impl. Per key j <= i (K, V tiles in shared memory):
//   p = 2^(q_i . k_j * log2(e)/sqrt(D) - lse2_i), dp = (dO_i . v_j) * keep_ij,
//   ds = p * (dp - Delta_i) / sqrt(D),  dq_i += ds * k_j.
// Shared: qs, dos BR x (D+1) (q scaled by log2(e)/sqrt(D)), ks, vs BC x D.
template <int DMAX>
__global__ void __launch_bounds__(BR) attention_dq_kernel(const float* __restrict__ dout, const float* __restrict__ q,
                                                          const float* __restrict__ k, const float* __restrict__ v,
                                                          const float* __restrict__ lse2,
                                                          const float* __restrict__ delta, float* __restrict__ dq,
                                                          int64_t T, int D, float scale, Dropout drop) {
  extern __shared__ float smem[];
  const int ldq = D + 1;
  float* qs = smem;
  float* dos = qs + BR * ldq;
  float* ks = dos + BR * ldq;
  float* vs = ks + BC * D;
  const int64_t bh = blockIdx.x, i0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int t = threadIdx.x;
  const int64_t i = i0 + t;
  const int64_t off = bh * T * D;
  load_rows(qs, ldq, q + off, i0, BR, T, D, scale * LOG2E);
  load_rows(dos, ldq, dout + off, i0, BR, T, D, 1.0f);
  const float lse_i = i < T ? lse2[bh * T + i] : 0.0f;
  const float delta_i = i < T ? delta[bh * T + i] : 0.0f;

  float acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) acc[d] = 0.0f;
  const int64_t last = min(i0 + BR, T) - 1;
  for (int64_t j0 = 0; j0 <= last; j0 += BC) {
    __syncthreads();
    load_rows(ks, D, k + off, j0, BC, T, D, 1.0f);
    load_rows(vs, D, v + off, j0, BC, T, D, 1.0f);
    __syncthreads();
    if (i >= T) continue;
    for (int jj = 0; jj < BC && j0 + jj <= i; ++jj) {
      const float p = exp2f(dot(qs + t * ldq, ks + jj * D, D) - lse_i);
      const float dp = dot(dos + t * ldq, vs + jj * D, D) * drop.scale(bh, T, i, j0 + jj);
      const float ds = p * (dp - delta_i) * scale;
#pragma unroll
      for (int d = 0; d < DMAX; ++d)
        if (d < D) acc[d] = fmaf(ds, ks[jj * D + d], acc[d]);
    }
  }
  if (i < T) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d)
      if (d < D) dq[off + i * D + d] = acc[d];
  }
}

// dK, dV. Block (bh, key tile of BR), thread = key j, dk_j in registers and dv_j in its own
// shared-memory row. CPU reference: the dK/dV part of backward_heads_impl. Per query i >= j
// (Q, dO tiles in shared memory):
//   p = 2^(k_j . q_i * log2(e)/sqrt(D) - lse2_i), keep = keep_ij, dp = dO_i . v_j,
//   dv_j += p * keep * dO_i,  ds = p * (dp * keep - Delta_i) / sqrt(D),  dk_j += ds * q_i.
// Shared: kss, vss, dvs BR x (D+1) (k scaled by log2(e)/sqrt(D)), qs, dos BC x D, lse2, Delta BC.
template <int DMAX>
__global__ void __launch_bounds__(BR) attention_dkdv_kernel(const float* __restrict__ dout, const float* __restrict__ q,
                                                            const float* __restrict__ k, const float* __restrict__ v,
                                                            const float* __restrict__ lse2,
                                                            const float* __restrict__ delta, float* __restrict__ dk,
                                                            float* __restrict__ dv, int64_t T, int D, float scale,
                                                            Dropout drop) {
  extern __shared__ float smem[];
  const int ldk = D + 1;
  float* kss = smem;
  float* vss = kss + BR * ldk;
  float* dvs = vss + BR * ldk;
  float* qs = dvs + BR * ldk;
  float* dos = qs + BC * D;
  float* lse_s = dos + BC * D;
  float* delta_s = lse_s + BC;
  const int64_t bh = blockIdx.x, j0 = static_cast<int64_t>(blockIdx.y) * BR;
  const int t = threadIdx.x;
  const int64_t j = j0 + t;
  const int64_t off = bh * T * D;
  load_rows(kss, ldk, k + off, j0, BR, T, D, scale * LOG2E);
  load_rows(vss, ldk, v + off, j0, BR, T, D, 1.0f);
  for (int d = 0; d < D; ++d) dvs[t * ldk + d] = 0.0f;

  float acc[DMAX];  // dk_j
#pragma unroll
  for (int d = 0; d < DMAX; ++d) acc[d] = 0.0f;
  for (int64_t i0 = j0; i0 < T; i0 += BC) {  // queries from the block's first key on
    __syncthreads();
    load_rows(qs, D, q + off, i0, BC, T, D, 1.0f);
    load_rows(dos, D, dout + off, i0, BC, T, D, 1.0f);
    if (t < BC) {
      lse_s[t] = i0 + t < T ? lse2[bh * T + i0 + t] : 0.0f;
      delta_s[t] = i0 + t < T ? delta[bh * T + i0 + t] : 0.0f;
    }
    __syncthreads();
    if (j >= T) continue;
    for (int ii = 0; ii < BC && i0 + ii < T; ++ii) {
      const int64_t i = i0 + ii;
      if (i < j) continue;
      const float p = exp2f(dot(kss + t * ldk, qs + ii * D, D) - lse_s[ii]);
      const float keep = drop.scale(bh, T, i, j);
      const float dp = dot(vss + t * ldk, dos + ii * D, D) * keep;
      const float pk = p * keep;
      for (int d = 0; d < D; ++d) dvs[t * ldk + d] = fmaf(pk, dos[ii * D + d], dvs[t * ldk + d]);
      const float ds = p * (dp - delta_s[ii]) * scale;
#pragma unroll
      for (int d = 0; d < DMAX; ++d)
        if (d < D) acc[d] = fmaf(ds, qs[ii * D + d], acc[d]);
    }
  }
  if (j < T) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d)
      if (d < D) dk[off + j * D + d] = acc[d];
    for (int d = 0; d < D; ++d) dv[off + j * D + d] = dvs[t * ldk + d];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

void check_input(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "attention: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "attention: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "attention: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, "attention: ", name, " must be (B, H, T, D), got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes(), "attention: ", name, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.is_contiguous(), "attention: ", name, " must be contiguous");
}

void check_common(const at::Tensor& q, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(q.size(3) <= 256, "attention: the CUDA kernels support head dims up to 256, got ", q.size(3));
  TORCH_CHECK(q.size(0) * q.size(1) <= 0x7fffffff && (q.size(2) + BR - 1) / BR <= 65535,
              "attention: too many heads or too long a sequence for the CUDA grid");
}

// Launches kernel<DMAX> for the smallest DMAX >= D in {32, 64, 128, 256}, with `smem` bytes of
// dynamic shared memory (raising the 48 KB default when needed).
template <template <int> class Launch, class... Args>
void with_dmax(int D, Args&&... args) {
  if (D <= 32) Launch<32>::run(args...);
  else if (D <= 64) Launch<64>::run(args...);
  else if (D <= 128) Launch<128>::run(args...);
  else Launch<256>::run(args...);
}

// A kernel's shared memory must fit the device's per-block limit (99 KB on sm_86/89, 163 KB on
// sm_80, 227 KB on sm_90); dK/dV needs 512 (D + 1) bytes, over 99 KB for head sizes above 197.
void check_smem(size_t bytes, const char* kernel, int D, int device) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "attention: the CUDA ", kernel, " kernel needs ", bytes / 1024,
              " KB of shared memory per block for head size ", D, ", over this GPU's ", limit / 1024,
              " KB: use a smaller head size (n_embd / n_head) or --backend torch");
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DMAX>
struct LaunchForward {
  static void run(dim3 grid, size_t smem, cudaStream_t stream, const float* q, const float* k, const float* v,
                  float* out, float* lse, int64_t T, int D, float qscale, Dropout drop) {
    set_smem(attention_forward_kernel<DMAX>, smem);
    attention_forward_kernel<DMAX><<<grid, BR, smem, stream>>>(q, k, v, out, lse, T, D, qscale, drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <int DMAX>
struct LaunchBackward {
  static void run(dim3 grid, size_t smem_dq, size_t smem_dkdv, cudaStream_t stream, const float* dout,
                  const float* q, const float* k, const float* v, const float* lse2, const float* delta, float* dq,
                  float* dk, float* dv, int64_t T, int D, float scale, Dropout drop) {
    set_smem(attention_dq_kernel<DMAX>, smem_dq);
    attention_dq_kernel<DMAX><<<grid, BR, smem_dq, stream>>>(dout, q, k, v, lse2, delta, dq, T, D, scale, drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    set_smem(attention_dkdv_kernel<DMAX>, smem_dkdv);
    attention_dkdv_kernel<DMAX><<<grid, BR, smem_dkdv, stream>>>(dout, q, k, v, lse2, delta, dk, dv, T, D, scale,
                                                                 drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double dropout_p, int64_t seed) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  check_common(q, dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const int D = static_cast<int>(q.size(3));
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options());
  if (out.numel() == 0) return {out, lse};
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((T + BR - 1) / BR));
  const size_t smem = sizeof(float) * (BR * (D + 1) + 2 * BC * D + BR * (BC + 1));
  check_smem(smem, "forward", D, q.get_device());
  with_dmax<LaunchForward>(D, grid, smem, c10::cuda::getCurrentCUDAStream(), q.data_ptr<float>(), k.data_ptr<float>(),
                           v.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), T, D,
                           static_cast<float>(LOG2E / std::sqrt(static_cast<double>(D))), Dropout(dropout_p, seed));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double dropout_p, int64_t seed) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  check_input(grad_out, "grad_out", q);
  check_input(out, "out", q);
  check_common(q, dropout_p);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const int D = static_cast<int>(q.size(3));
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({B, H, T}),
              "attention: lse must be a contiguous float32 (B, H, T) tensor on q's device, got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv};
  auto delta = at::empty({B, H, T}, q.options());
  auto lse2 = at::empty({B, H, T}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = B * H * T;
  attention_delta_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(
      grad_out.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
      lse2.data_ptr<float>(), rows, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((T + BR - 1) / BR));
  const size_t smem_dq = sizeof(float) * (2 * BR * (D + 1) + 2 * BC * D);
  const size_t smem_dkdv = sizeof(float) * (3 * BR * (D + 1) + 2 * BC * D + 2 * BC);
  check_smem(smem_dq, "dQ", D, q.get_device());
  check_smem(smem_dkdv, "dK/dV", D, q.get_device());
  with_dmax<LaunchBackward>(D, grid, smem_dq, smem_dkdv, stream, grad_out.data_ptr<float>(), q.data_ptr<float>(),
                            k.data_ptr<float>(), v.data_ptr<float>(), lse2.data_ptr<float>(), delta.data_ptr<float>(),
                            dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), T, D,
                            static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))), Dropout(dropout_p, seed));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}
