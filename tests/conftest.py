import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

torch.set_num_threads(min(2, gpt.usable_cpus()))


@pytest.fixture
def ext():
    """Runs a test on the gpt_ext kernels; fails (never skips) when they do not load."""
    why = gpt.load_extension()
    if why is not None:
        pytest.fail(f"gpt_ext did not load: {why}")
    with gpt.backend("ext"):
        yield


@pytest.fixture
def torch_backend():
    with gpt.backend("torch"):
        yield


@pytest.fixture(params=["best", "avx512", "avx2", "generic"])
def product_isa(request, monkeypatch):
    """Which products the decode kernels run (GPT_CPU_ISA): the CPU's best (AMX tiles where present),
    AVX-512 without AMX, AVX2, generic (a path the CPU lacks runs the best one it has below it)."""
    if request.param != "best":
        monkeypatch.setenv("GPT_CPU_ISA", request.param)
    return request.param


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    # tokenized corpora go to a per-session folder (subprocesses inherit it), not ~/.cache
    os.environ["GPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def shakespeare_text():
    """~40 KB of the shipped corpus, for short training runs."""
    return gpt.shakespeare_documents()[0][1][:40_000]


@pytest.fixture
def text_file(tmp_path, shakespeare_text):
    path = tmp_path / "play.txt"
    path.write_text(shakespeare_text, encoding="utf-8")
    return str(path)
