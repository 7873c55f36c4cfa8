"""torch.compile over the model with the ext custom ops (register_fake makes them traceable)."""
import contextlib

import torch

import gpt


def train_eager_and_compiled(config, autocast_dtype=None, steps=4):
    """Losses of `steps` AdamW steps of one model, eagerly and under torch.compile, from the same weights."""
    torch.manual_seed(0)
    eager = gpt.GPT(config)
    compiled_model = gpt.GPT(config)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    x, y = torch.randint(0, 50257, (2, 4, 32))
    losses = {}
    for name, model, module in (("eager", eager, eager), ("compiled", compiled, compiled_model)):
        opt = module.configure_optimizer(1e-2, 0.0, (0.9, 0.95), "cpu")
        torch.manual_seed(1)
        losses[name] = []
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                loss = model(x, y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    return losses


def test_model_trains_under_torch_compile_with_ext_ops(ext):
    losses = train_eager_and_compiled(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    assert losses["compiled"][-1] < losses["compiled"][0] - 0.5
    assert all(abs(a - b) < 1e-3 for a, b in zip(losses["eager"], losses["compiled"])), losses


def test_bfloat16_autocast_matches_float32(ext):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).eval()
    x, y = torch.randint(0, 50257, (2, 4, 32))
    with torch.no_grad():
        full = model(x, y).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, y).item()
    assert abs(full - half) < 0.05 * full


def test_bfloat16_training_with_dropout_under_torch_compile(ext):
    """bf16 autocast and dropout: the bf16 attention and cross-entropy kernels and the fused residual
    dropout trace under torch.compile and train. The first losses agree (same seeds for the hashed
    attention and residual masks); later steps drift apart, as the embedding's nn.Dropout draws its mask
    from inductor's RNG when compiled, not eager's."""
    config = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.1)
    losses = train_eager_and_compiled(config, torch.bfloat16)
    assert losses["compiled"][-1] < losses["compiled"][0] - 0.5
    assert abs(losses["eager"][0] - losses["compiled"][0]) < 0.02, losses
