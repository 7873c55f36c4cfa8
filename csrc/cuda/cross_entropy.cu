// Fused softmax cross-entropy on CUDA (llm.c's fused classifier), one block per row.
// logits (N, V) float32 or bfloat16 row-major (read and written in their dtype, the softmax
// statistics and the gradient computed in float32), targets (N,) int64 with -100 = ignored.
//   loss_i = logsumexp(logits_i) - logits_i[target_i]             (0 for ignored rows)
//   grad_i = grad_scale * (softmax(logits_i) - onehot(target_i))  (0 for ignored rows)
// Pass 1: each thread keeps an online (max, sum of exp) over its strided elements, merged across
// the block. Pass 2 (the _grad_ op): each thread overwrites its elements with the gradient.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "../checks.h"

namespace {

constexpr int kThreads = 512;

// Online softmax state: running max m and s = sum of exp(x - m).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};  // both empty (or all -inf): avoid -inf - -inf
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// Merges every thread's state; all threads get the result.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum warp_states[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1)
    v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  if (lane == 0) warp_states[warp] = v;
  __syncthreads();
  v = lane < nwarps ? warp_states[lane] : MaxSum{-INFINITY, 0.0f};
  for (int o = 16; o > 0; o >>= 1)
    v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  return v;
}

// One block per row: loss[row], and when write_grad the row's gradient over its logits.
template <class scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(scalar_t* logits, const int64_t* targets, float* loss, int64_t V, float grad_scale,
                         bool write_grad) {
  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * V;
  const int64_t t = targets[row];
  if (t != -100 && (t < 0 || t >= V)) {  // unchecked by the host (check_targets false): never a silent read
    CUDA_KERNEL_ASSERT(false && "cross_entropy: a target is outside [0, V) and is not -100");
    if (threadIdx.x == 0) loss[row] = NAN;
    return;
  }
  if (t == -100) {  // the whole block takes this branch
    if (write_grad)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) x[j] = scalar_t(0.0f);
    if (threadIdx.x == 0) loss[row] = 0.0f;
    return;
  }
  const float xt = static_cast<float>(x[t]);  // read before any thread overwrites the row
  MaxSum st{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = static_cast<float>(x[j]);
    if (v > st.m) {
      st.s = st.s * __expf(st.m - v) + 1.0f;
      st.m = v;
    } else if (v != -INFINITY) {
      st.s += __expf(v - st.m);
    }
  }
  st = block_merge(st);
  if (threadIdx.x == 0) loss[row] = st.m + logf(st.s) - xt;
  if (!write_grad) return;
  const float c = grad_scale / st.s;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float g = c * __expf(static_cast<float>(x[j]) - st.m);
    x[j] = static_cast<scalar_t>(j == t ? g - grad_scale : g);
  }
}

// first = the smallest row whose target is neither in [0, V) nor -100 (first starts at N).
__global__ void first_bad_target_kernel(const int64_t* targets, int64_t N, int64_t V, unsigned long long* first) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = targets[i];
    if (t != -100 && (t < 0 || t >= V)) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, bool check_targets, const char* op) {
  TORCH_CHECK(logits.is_cuda() && targets.is_cuda() && logits.device() == targets.device(), op,
              ": expects CUDA tensors on one device");
  check_cross_entropy_shapes(logits, targets, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0 || !check_targets) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  // Two small launches and one read of 8 bytes: the price of a clear error, before anything is
  // written, instead of a device assert that poisons the CUDA context.
  const at::Tensor t = targets.contiguous();
  at::Tensor first = at::full({1}, N, targets.options());
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((N + 255) / 256, 1024));
  first_bad_target_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<int64_t>(), N, V, reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t i = first.item<int64_t>();
  TORCH_CHECK(i == N, op, ": target ", t[i].item<int64_t>(), " of row ", i, " is outside [0, ", V,
              ") and is not the ignore index -100");
}

at::Tensor launch(at::Tensor& logits, const at::Tensor& targets, double grad_scale, bool write_grad,
                  bool check_targets, const char* op) {
  check_inputs(logits, targets, check_targets, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  if (N == 0) return loss;
  const at::Tensor t = targets.contiguous();
  auto run = [&](auto* x) {  // x: the logits as float* or at::BFloat16*
    cross_entropy_kernel<<<static_cast<unsigned>(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x, t.data_ptr<int64_t>(), loss.data_ptr<float>(), V, static_cast<float>(grad_scale), write_grad);
  };
  if (logits.scalar_type() == at::kFloat)
    run(logits.data_ptr<float>());
  else
    run(logits.data_ptr<at::BFloat16>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor cross_entropy_loss_cuda(const at::Tensor& logits, const at::Tensor& targets, bool check_targets) {
  at::Tensor x = logits;  // read only: write_grad is false
  return launch(x, targets, 1.0, false, check_targets, "cross_entropy_loss");
}

at::Tensor cross_entropy_loss_grad_cuda(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                                        bool check_targets) {
  return launch(logits, targets, grad_scale, true, check_targets, "cross_entropy_loss_grad_");
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CUDA, m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss_cuda);
  m.impl("cross_entropy_loss_grad_", &cross_entropy_loss_grad_cuda);
}
