"""--device: auto picks CUDA, then Apple's MPS, then the CPU; on a device the ext kernels do not
serve (MPS) every op takes the pure-torch path."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gpt


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert gpt.pick_device("auto") == expected
    if mps:
        assert gpt.pick_device("mps") == "mps"


def test_mps_asked_for_without_one_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(gpt.GPTError, match="no Apple MPS device: use --device cpu"):
        gpt.pick_device("mps")


@pytest.mark.parametrize("device, draws_on", [("mps", "cpu"), ("mps:0", "cpu"), ("cpu", "cpu"), ("cuda", "cuda"),
                                               ("cuda:1", "cuda:1")])
def test_sampling_draws_on_the_cpu_for_mps(device, draws_on):
    """MPS has no float64, which the draw uses: it draws on the CPU (the CPU's tokens for a seed);
    other devices draw where they are, as before."""
    assert gpt.sampling_device(device) == torch.device(draws_on)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _ops_of_a_training_step(device):
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    model = gpt.GPT(config).to(device)
    idx = torch.randint(0, 97, (2, 16)).to(device)
    with _Ops() as ops:
        model(idx, targets=idx).backward()
        model.eval()
        with torch.no_grad():
            model(idx[:, :1])
    return ops.names


def test_every_op_falls_back_off_cpu_and_cuda(ext):
    # no MPS here: the meta device stands in for it (a device type the ext kernels do not serve)
    assert "gpt" in _ops_of_a_training_step("cpu")  # the spy sees the ext kernels where they serve
    assert "gpt" not in _ops_of_a_training_step("meta")
