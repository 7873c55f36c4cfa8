import os
import sys

# Transparent huge pages for torch's CPU allocations, as `python gpt.py` runs (it sets this before
# importing torch; torch reads it once, at import). Every candidate shares the setting, and
# THP_MEM_ALLOC_ENABLE=0 benchmarks without.
THP = os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

torch.set_num_threads(min(2, gpt.usable_cpus()))


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def extra_peak_bytes(fn):
    """Peak resident memory that fn() adds over what is resident before it (Linux: resets the
    high-water mark through /proc/self/clear_refs). Torch's CPU allocator returns large blocks
    to the OS, so this counts the buffers fn allocates, freed or not."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - before


@pytest.fixture(scope="session")
def ext():
    why = gpt.load_extension()
    if why is not None:
        pytest.fail(f"gpt_ext did not load: {why}")
    return True


@pytest.fixture(autouse=True)
def _thp_note(benchmark):
    # Whether torch's CPU allocator used transparent huge pages (THP_MEM_ALLOC_ENABLE=1) in this run.
    benchmark.extra_info["thp"] = THP
