"""gpt: pretrain GPT-2 on unlabeled text and sample from it, in one file.

The file follows chapter 5 of "Build a Large Language Model From Scratch": tokenizer, data,
fused kernels, model, loss, training loop, sampling, GPT-2 weights, command line.

    python gpt.py train                       # Shakespeare, a small model, a few minutes on a CPU
    python gpt.py sample --temperature 0.8 --top_k 50
    python gpt.py eval
"""
import math
import os

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------
# Fused kernels: each op's pure-torch reference (the fallback) sits above the registration of
# its gpt_ext custom op (csrc/), and a dispatcher picks one by BACKEND.

BACKEND = "torch"  # "ext" (gpt_ext, C++/CUDA kernels) or "torch"; chosen by use_backend()
_ext_registered = False


def load_extension():
    """Loads gpt_ext (prebuilt by setup.py, else JIT-built from csrc/ and cached); returns None or why not."""
    global _ext_registered
    if _ext_registered:
        return None
    try:
        import gpt_ext  # noqa: F401  (importing registers the ops)
    except ImportError:
        try:
            import importlib.util

            from torch.utils.cpp_extension import load

            spec = importlib.util.spec_from_file_location("gpt_setup", os.path.join(ROOT, "setup.py"))
            setup_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(setup_module)
            load(name="gpt_ext", is_python_module=False, **setup_module.ext_kwargs(setup_module.cuda_wanted()))
        except Exception as e:  # a missing compiler, a failed build: fall back, and say why
            return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    _register_attention()
    _register_cross_entropy()
    _register_sample()
    _ext_registered = True
    return None


def use_backend(name=None):
    """Selects the kernels: 'ext', 'torch' or 'auto' (ext if it loads, else torch, said once on stderr).
    The default comes from the GPT_BACKEND environment variable, else 'auto'. Returns the backend."""
    global BACKEND
    name = name or os.environ.get("GPT_BACKEND", "auto")
    if name not in ("auto", "ext", "torch"):
        raise ValueError(f"unknown backend {name!r}: use auto, ext or torch")
    if name == "torch":
        BACKEND = "torch"
        return BACKEND
    why = load_extension()
    if why is None:
        BACKEND = "ext"
    elif name == "ext":
        raise RuntimeError(f"the gpt_ext kernels cannot load ({why}); build them with "
                           "`pip install --no-build-isolation -e .` or use --backend torch")
    else:
        import sys

        print(f"gpt: fused kernels unavailable ({why}); using the pure-torch fallback", file=sys.stderr)
        BACKEND = "torch"
    return BACKEND


def _ext_device_ok(*tensors):
    return BACKEND == "ext" and all(t.device.type in ("cpu", "cuda") for t in tensors)


# --- causal attention --------------------------------------------------------

def _mix32(x):
    """lowbias32 hash of uint32 values held in int64 (mix32 in csrc/): the low 32 bits of the
    wrapped int64 products are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def attention_dropout_keep(seed, B, H, T, dropout_p, device=None):
    """Keep-mask (B, H, T, T) of attention dropout: a counter-based hash of (seed, position), so
    the kernels regenerate it in backward instead of storing it. Position n = ((b*H + h)*T + i)*T + j;
    key = mix32(hi32(n) + lo32(seed) * 0x9E3779B9); keep iff mix32(lo32(n) ^ key) >> 8 >= p * 2^24."""
    n = torch.arange(B * H * T * T, device=device, dtype=torch.int64).view(B, H, T, T)
    key = _mix32(((n >> 32) + (seed & 0xFFFFFFFF) * 0x9E3779B9) & 0xFFFFFFFF)
    h = _mix32((n & 0xFFFFFFFF) ^ key)
    return (h >> 8) >= int(dropout_p * 16777216)


def causal_attention_reference(q, k, v, dropout_p=0.0, seed=0):
    """softmax(q k^T / sqrt(D), causal) with dropout, times v: the book's masked attention.
    Returns (out, lse), lse the row log-sum-exp of the scaled, masked scores."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    att = torch.exp(scores - lse.unsqueeze(-1))
    if dropout_p > 0:
        keep = attention_dropout_keep(seed, *q.shape[:3], dropout_p, q.device)
        att = att * keep / (1.0 - dropout_p)
    return att @ v, lse


def _register_attention():
    @torch.library.register_fake("gpt::attention_forward")
    def _(q, k, v, dropout_p, seed):
        return torch.empty_like(q), q.new_empty(q.shape[:-1])

    @torch.library.register_fake("gpt::attention_backward")
    def _(grad_out, q, k, v, out, lse, dropout_p, seed):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, ctx.dropout_p, ctx.seed = inputs
        ctx.save_for_backward(q, k, v, *output)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.gpt.attention_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.dropout_p, ctx.seed)
        return *grads, None, None

    torch.library.register_autograd("gpt::attention_forward", backward, setup_context=setup_context)


def causal_attention(q, k, v, dropout_p=0.0, seed=0):
    """Causal self-attention of q, k, v (B, H, T, D) with attention dropout (mask drawn from seed)."""
    if _ext_device_ok(q):
        dtype = q.dtype
        out, _ = torch.ops.gpt.attention_forward(q.float().contiguous(), k.float().contiguous(),
                                                 v.float().contiguous(), dropout_p, seed)
        return out.to(dtype)
    if dropout_p == 0:  # same math, PyTorch's flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return causal_attention_reference(q, k, v, dropout_p, seed)[0]


# --- cross-entropy -------------------------------------------------------------

def cross_entropy_reference(logits, targets):
    """Row losses (N,) of logits (N, V) against targets (N,); target -100 is ignored (loss 0)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


def _register_cross_entropy():
    @torch.library.register_fake("gpt::cross_entropy_loss")
    def _(logits, targets):
        return logits.new_empty(logits.shape[:1])

    @torch.library.register_fake("gpt::cross_entropy_loss_grad_")
    def _(logits, targets, grad_scale):
        return logits.new_empty(logits.shape[:1])


class _FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient the forward pass computes in the same sweep over the
    logits (into a copy, or over the logits themselves when inplace). A torch.autograd.Function,
    not register_autograd, because the kernel writes into its input."""

    @staticmethod
    def forward(ctx, logits, targets, inplace):
        n_valid = (targets != -100).sum().clamp(min=1)
        grad = logits if inplace else logits.clone()
        rows = torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, 1.0 / n_valid.item())
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(targets)
        return rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss), None, None


def cross_entropy(logits, targets, inplace=False):
    """Mean cross-entropy over targets that are not -100. With inplace=True (ext backend) the
    gradient overwrites logits, which the caller must not use afterwards."""
    logits2d, targets1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if not _ext_device_ok(logits):
        return F.cross_entropy(logits2d.float(), targets1d, ignore_index=-100)
    logits2d = logits2d.float().contiguous()
    if torch.is_grad_enabled() and logits2d.requires_grad:
        return _FusedCrossEntropy.apply(logits2d, targets1d, inplace and logits2d.data_ptr() == logits.data_ptr())
    n_valid = (targets1d != -100).sum().clamp(min=1)
    return torch.ops.gpt.cross_entropy_loss(logits2d, targets1d).sum() / n_valid


# --- sampling --------------------------------------------------------------------

def sample_reference(logits, uniform, temperature, top_k, top_p):
    """Next token per row of logits (B, V), as (B,) int64, the semantics the kernel matches:
    1. temperature 0: the first index of the row's maximum (greedy).
    2. top-k (0 < top_k < V): keep every logit >= the k-th largest (ties kept).
    3. p_i = exp((x_i - max) / temperature) over the kept logits.
    4. top-p (top_p < 1): sort kept p descending; m = the fewest tokens whose mass reaches
       top_p * sum(p); keep every p_i >= the m-th largest (ties kept).
    5. draw: the smallest kept index i whose running sum of p (in index order, float64) exceeds
       uniform * sum(kept p); the last kept index if rounding leaves none."""
    x = logits.float()
    if temperature == 0:
        return x.argmax(dim=-1)
    V = x.size(-1)
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.exp((x - x.max(dim=-1, keepdim=True).values) / temperature)
    if top_p < 1.0:
        sorted_p = torch.sort(p, dim=-1, descending=True).values
        mass = torch.cumsum(sorted_p.double(), dim=-1)
        m = torch.searchsorted(mass, top_p * mass[:, -1:]).clamp(max=V - 1)
        p = p.masked_fill(p < sorted_p.gather(-1, m), 0.0)
    cdf = torch.cumsum(p.double(), dim=-1)
    ids = torch.searchsorted(cdf, uniform.double().unsqueeze(-1) * cdf[:, -1:], right=True).squeeze(-1)
    last_kept = V - 1 - torch.argmax((p.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(ids, last_kept)


def _register_sample():
    @torch.library.register_fake("gpt::sample")
    def _(logits, uniform, temperature, top_k, top_p):
        return logits.new_empty(logits.shape[:1], dtype=torch.int64)


def _sample(logits, uniform, temperature, top_k, top_p):
    """Dispatches sample_reference / gpt::sample; top_k 0 means no top-k, top_p 1.0 no top-p."""
    if _ext_device_ok(logits):
        return torch.ops.gpt.sample(logits.float().contiguous(), uniform.double().contiguous(),
                                    float(temperature), int(top_k), float(top_p))
    return sample_reference(logits, uniform, temperature, top_k, top_p)
