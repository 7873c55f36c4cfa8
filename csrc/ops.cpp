// Schemas of the fused ops, one place for all of them. Each op has a CPU kernel in
// csrc/cpu/<op>.cpp and (but decode_blocks) a CUDA kernel in csrc/cuda/<op>.cu registered
// under the same name; gpt.KERNELS lists each op with its devices (load, CI and tests read it).
// gpt.py holds the pure-torch reference of each, with its fake (shape) function and autograd
// formula beside it.
#include <Python.h>
#include <torch/library.h>

// Importing the built module as `gpt_ext` loads this library, which registers the ops.
extern "C" PyObject* PyInit_gpt_ext(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "gpt_ext", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(gpt, m) {
  // Causal softmax attention, flash-style. q, k, v: (B, H, T, D) contiguous, float32 (or, on
  // the CPU, bfloat16: out and the gradients then bf16, the arithmetic float32).
  // out = dropout(softmax(q k^T / sqrt(D) + causal mask)) v; lse: (B, H, T) float32 row
  // log-sum-exp of the scaled scores (before dropout). The dropout mask is a hash of (seed, position),
  // regenerated in backward, never stored.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  // Cross-entropy per row of logits (N, V) float32 (or, on the CPU, bfloat16) with int64
  // targets (N,); rows whose target is -100 are ignored (loss 0). Returns the (N,) float32
  // row losses; the statistics are float32 for either dtype. check_targets: every
  // target is checked first, for a clear error (on CUDA at the cost of a host read); false (gpt's
  // own calls, whose targets are token ids), on CUDA a bad target trips a device-side assert, as
  // in F.cross_entropy (the CPU kernels check always: it costs nothing there).
  m.def("cross_entropy_loss(Tensor logits, Tensor targets, bool check_targets=True) -> Tensor");
  // Same, and in the same pass overwrites logits with grad_scale * (softmax - onehot)
  // (zero rows for ignored targets), as llm.c's fused classifier does.
  m.def("cross_entropy_loss_grad_(Tensor(a!) logits, Tensor targets, float grad_scale, bool check_targets=True) "
        "-> Tensor");
  // The residual add with dropout on the branch (CPU): out = x + y * keep / (1 - p), keep the
  // counter hash of (seed, flat index) as attention's; the gradient of y is dropout_backward's
  // grad * keep / (1 - p) in y's dtype. float32 or bfloat16 tensors, float32 arithmetic.
  m.def("dropout_add(Tensor x, Tensor y, float p, int seed) -> Tensor");
  m.def("dropout_backward(Tensor grad, float p, int seed, ScalarType dtype) -> Tensor");
  // GPT-2's tanh GELU (CPU) and its gradient grad * gelu'(x), float32 or bfloat16 in and out,
  // float32 arithmetic.
  m.def("gelu(Tensor x) -> Tensor");
  m.def("gelu_backward(Tensor grad, Tensor x) -> Tensor");
  // One next token per row of logits (B, V) float32: top-k, temperature, top-p, then an
  // inverse-CDF draw with uniform (B,) float64. Returns (B,) int64.
  m.def("sample(Tensor logits, Tensor uniform, float temperature, int top_k, float top_p) -> Tensor");
  // GPT-2's blocks for one new token per row (generation's decode step, CPU only): x (B, C)
  // float32 at position pos -> the last block's output (B, C); writes this token's keys and
  // values into each layer's cache_k, cache_v (B, H, L, D), float32 or bfloat16, at pos.
  // weights, 16 per layer (gpt.py's decode_weights): ln_1 w, b; then per matrix (attn.c_attn,
  // attn.c_proj, mlp.c_fc, mlp.c_proj; nn.Linear's (out, in) layout) its weight (float32,
  // bfloat16 or int8), scale (int8: float16 (out, ceil(in / 32)), one per 32 weights of a row;
  // else empty) and bias (empty: none), with ln_2 w, b after c_proj. caches: k, v per layer.
  m.def("decode_blocks(Tensor x, Tensor[] weights, Tensor(a!)[] caches, int pos) -> Tensor");
  // x (M, K) float32 @ weight^T + bias -> (M, N) float32, weight (N, K) stored as in
  // decode_blocks (float32, bfloat16, or int8 with scale); bias may be empty. CPU only, for few rows.
  m.def("quantized_linear(Tensor x, Tensor weight, Tensor scale, Tensor bias) -> Tensor");
  // w (N, K) float32 -> int8 q (N, K) and float16 scale (N, ceil(K / 32)), w ~= q * scale per
  // block of 32 along a row (gpt.quantize_weight's rule, bit for bit). CPU only.
  m.def("quantize_int8(Tensor w) -> (Tensor, Tensor)");
  // The inverse, rounded once to bfloat16: q (N, K) int8, scale as above -> (N, K) bfloat16. CPU only.
  m.def("dequantize_int8(Tensor q, Tensor scale) -> Tensor");
  // The paths decode_blocks' and quantized_linear's products take for weights of weight's dtype
  // on this CPU (GPT_CPU_ISA honoured): bit 0 AVX-512 rows (int8: AVX512-VNNI), bit 1 AMX tiles
  // (from 5 rows of x); 0 the generic loops. CPU only.
  m.def("product_paths(Tensor weight) -> int");
}
