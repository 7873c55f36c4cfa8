// Input checks an op's CPU and CUDA kernels share (each kernel file checks its own device).
#pragma once
#include <ATen/ATen.h>

// cross_entropy_loss and cross_entropy_loss_grad_: logits (N, V) float32 or bfloat16 contiguous,
// targets (N,) int64.
inline void check_cross_entropy_shapes(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  const bool dtype_ok = logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16;
  TORCH_CHECK(logits.dim() == 2 && dtype_ok && logits.is_contiguous(), op,
              ": logits must be a contiguous (N, V) float32 or bfloat16 tensor, got ", logits.sizes(), " ",
              logits.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.size(0) == logits.size(0), op,
              ": targets must be an int64 (N,) tensor with N = ", logits.size(0), ", got ", targets.sizes(), " ",
              targets.scalar_type());
}

// sample: logits (B, V) float32 contiguous with V >= 1 (unless B = 0), uniform (B,) float64, temperature >= 0.
inline void check_sample_inputs(const at::Tensor& logits, const at::Tensor& uniform, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "sample: logits must be a contiguous (B, V) float32 tensor, got ", logits.sizes(), " ",
              logits.scalar_type());
  TORCH_CHECK(uniform.dim() == 1 && uniform.scalar_type() == at::kDouble && uniform.size(0) == logits.size(0),
              "sample: uniform must be a float64 (B,) tensor with B = ", logits.size(0), ", got ", uniform.sizes(),
              " ", uniform.scalar_type());
  TORCH_CHECK(temperature >= 0.0, "sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK(logits.size(1) >= 1 || logits.size(0) == 0, "sample: empty vocabulary");
}
