"""sample_next_token's semantics (top-k with ties, temperature, top-p, greedy, seeds, errors),
checked on crafted logits and against an independent reimplementation, on both kernel backends;
and generate's KV cache against a no-cache loop (greedy and seeded sampling, sliding context,
eos padding)."""
import math

import pytest
import torch

import gpt

BACKENDS = ["torch_backend", "ext"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    request.getfixturevalue(request.param)
    return request.param


def draw(logits_row, n, seed=0, **kw):
    """n draws from one row of logits, batched as n identical rows -> (n,) int64."""
    logits = torch.as_tensor(logits_row, dtype=torch.float32).repeat(n, 1)
    g = torch.Generator().manual_seed(seed)
    out = gpt.sample_next_token(logits, generator=g, **kw)
    assert out.shape == (n, 1) and out.dtype == torch.int64
    return out.squeeze(1)


def support(logits_row, n=20000, **kw):
    return set(draw(logits_row, n, **kw).tolist())


def expected_probs(logits_row, temperature=1.0, top_k=None, top_p=None):
    """The target distribution, written out independently in float64: top-k by value (ties kept),
    / temperature, softmax, top-p over the sorted probabilities (ties at the edge kept)."""
    x = [float(v) for v in logits_row]
    V = len(x)
    keep = [True] * V
    if top_k is not None and top_k < V:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = [v >= kth for v in x]
    m = max(v for v, k in zip(x, keep) if k)
    p = [math.exp((v - m) / temperature) if k else 0.0 for v, k in zip(x, keep)]
    if top_p is not None and top_p < 1.0:
        total = sum(p)
        ordered = sorted(p, reverse=True)
        acc, edge = 0.0, ordered[-1]
        for q in ordered:
            acc += q
            if acc >= top_p * total:
                edge = q
                break
        p = [q if q >= edge else 0.0 for q in p]
    s = sum(p)
    return torch.tensor([q / s for q in p], dtype=torch.float64)


def tv(p, q):
    return 0.5 * float((p - q).abs().sum())


def empirical(ids, V):
    return torch.bincount(ids, minlength=V).double() / ids.numel()


# --- exact sets ---------------------------------------------------------------------------

TIES = [1.0, 5.0, 3.0, 5.0, 3.0, 2.0, 3.0, 0.0]


@pytest.mark.parametrize("top_k,kept", [
    (1, {1, 3}),            # a tie at the maximum: both kept
    (2, {1, 3}),
    (3, {1, 3, 2, 4, 6}),   # the 3rd largest is 3.0, shared by three tokens: all kept
    (5, {1, 3, 2, 4, 6}),
    (6, {1, 3, 2, 4, 6, 5}),
    (7, {0, 1, 2, 3, 4, 5, 6}),
])
def test_top_k_keeps_ties(backend, top_k, kept):
    assert support(TIES, temperature=3.0, top_k=top_k) == kept


# probabilities 0.05, 0.5, 0.1, 0.2, 0.15 at indices 0..4
P5 = [0.05, 0.5, 0.1, 0.2, 0.15]
LOGP5 = [math.log(q) for q in P5]


@pytest.mark.parametrize("top_p,kept", [
    (0.3, {1}),
    (0.6, {1, 3}),          # 0.5 + 0.2 = 0.7 reaches 0.6
    (0.75, {1, 3, 4}),      # 0.7 < 0.75 <= 0.85
    (0.9, {1, 3, 4, 2}),
    (0.99, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_exact_sets(backend, top_p, kept):
    assert support(LOGP5, top_p=top_p) == kept


def test_top_p_keeps_ties_at_the_edge(backend):
    logits = [math.log(q) for q in (0.1, 0.2, 0.4, 0.2, 0.1)]
    logits[3] = logits[1]  # exactly equal
    assert support(logits, top_p=0.5) == {1, 2, 3}  # 0.4 + 0.2 reaches 0.5; the other 0.2 ties


def test_top_p_applies_after_temperature(backend):
    # T=10 flattens P5 to about .225 .205 .199 .192 .179: 0.6 now needs three tokens, not two
    assert support(LOGP5, temperature=10.0, top_p=0.6) == {1, 3, 4}
    assert support(LOGP5, temperature=1.0, top_p=0.6) == {1, 3}


def test_top_p_renormalizes_after_top_k(backend):
    # top-k 3 keeps .5 .2 .15 (mass .85); 0.8 of that is .68, reached by .5 + .2.
    # Measured on the unfiltered distribution, 0.8 would need .15 too.
    assert support(LOGP5, top_k=3, top_p=0.8) == {1, 3}


def test_top_k_on_a_gpt2_sized_vocabulary(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50257, generator=g) * 3
    logits[1, 100:140] = logits[1].max() + 1  # 40 tokens tied at the top
    rows = logits.repeat_interleave(300, dim=0)
    ids = gpt.sample_next_token(rows, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(0))
    top20 = set(torch.topk(logits[0], 20).indices.tolist())
    assert set(ids[:300, 0].tolist()) <= top20
    assert len(set(ids[:300, 0].tolist())) > 1
    assert set(ids[300:, 0].tolist()) <= set(range(100, 140))  # ties beyond k: all 40 eligible
    assert len(set(ids[300:, 0].tolist()) - set(range(100, 120))) > 0


# --- degenerate settings --------------------------------------------------------------------

def test_top_k_at_least_vocab_is_no_top_k(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 37, generator=g)

    def run(**kw):
        return gpt.sample_next_token(logits, generator=torch.Generator().manual_seed(5), **kw)

    none = run(top_k=None)
    assert torch.equal(run(top_k=37), none)
    assert torch.equal(run(top_k=1000), none)
    assert not torch.equal(run(top_k=36), none)  # one token fewer does change draws
    assert torch.equal(run(top_p=1.0), none)
    assert len(set(none[:, 0].tolist())) > 20


def test_temperature_zero_is_argmax_first_index(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0],
                           [4.0, 4.0, 4.0, 4.0],
                           [-1.0, -2.0, -3.0, -0.5],
                           [0.0, 0.0, 7.0, 7.0]])
    for kw in ({}, {"top_k": 2}, {"top_p": 0.3}, {"top_k": 1, "top_p": 0.9}):
        out = gpt.sample_next_token(logits, temperature=0.0, **kw)
        assert out[:, 0].tolist() == [1, 0, 3, 2]
    assert gpt.sample_next_token(logits, temperature=0.0).dtype == torch.int64


def test_tiny_top_p_is_argmax(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2000, 300, generator=g)
    for t in (0.5, 1.0, 5.0):
        out = gpt.sample_next_token(logits, temperature=t, top_p=1e-6, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[:, 0], logits.argmax(-1))


def test_top_k_1_is_argmax(backend):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2000, 300, generator=g)
    out = gpt.sample_next_token(logits, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], logits.argmax(-1))


def test_minus_inf_logits_never_drawn(backend):
    row = [float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]
    assert support(row, n=5000, temperature=5.0) == {1, 3}
    assert support(row, n=5000, temperature=5.0, top_p=0.999) == {1, 3}


# --- seeds ---------------------------------------------------------------------------------

def test_same_seed_same_tokens_different_seed_different(backend):
    logits = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=1.3, top_k=40, top_p=0.95)
    a = gpt.sample_next_token(logits, generator=torch.Generator().manual_seed(123), **kw)
    b = gpt.sample_next_token(logits, generator=torch.Generator().manual_seed(123), **kw)
    c = gpt.sample_next_token(logits, generator=torch.Generator().manual_seed(124), **kw)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


def test_generator_state_advances(backend):
    logits = torch.zeros(500, 50)
    g = torch.Generator().manual_seed(9)
    a = gpt.sample_next_token(logits, generator=g)
    b = gpt.sample_next_token(logits, generator=g)
    assert (a != b).float().mean() > 0.5


def _inverse_cdf_reference(logits, uniform, temperature, top_k, top_p):
    """The documented draw, written independently: per row, the smallest kept index whose running
    (index-order) sum of kept probabilities exceeds uniform * total."""
    out = []
    for row, u in zip(logits.tolist(), uniform.tolist()):
        p = expected_probs(row, temperature, top_k, top_p)
        cdf = torch.cumsum(p, 0)
        i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
        kept = (p > 0).nonzero().flatten()
        out.append(min(i, int(kept[-1])))
    return torch.tensor(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.7, 20, None), (1.5, None, 0.9), (0.8, 50, 0.95), (2.0, 5, 0.5)])
def test_draw_matches_independent_inverse_cdf(backend, temperature, top_k, top_p):
    """Same seed, same tokens on either backend: the uniforms come from the generator (float64,
    one per row) and pick by inverse CDF in index order."""
    logits = torch.randn(64, 200, generator=torch.Generator().manual_seed(11)) * 2
    got = gpt.sample_next_token(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(77))
    uniform = torch.rand(64, generator=torch.Generator().manual_seed(77), dtype=torch.float64)
    expected = _inverse_cdf_reference(logits, uniform, temperature, top_k, top_p)
    assert got[:, 0].tolist() == expected.tolist()


# --- statistics ----------------------------------------------------------------------------

STAT_LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, 1.0, 0.25]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.6, None, None), (2.0, None, None),
    (1.0, 4, None), (1.5, 6, None), (1.0, None, 0.8), (0.8, 7, 0.9)])
def test_empirical_distribution_matches_softmax(backend, temperature, top_k, top_p):
    N, V = 40000, len(STAT_LOGITS)
    target = expected_probs(STAT_LOGITS, temperature, top_k, top_p)
    # The test can fail: the likely mistakes are far from the target (TV > 0.04) ...
    wrong = [expected_probs(STAT_LOGITS, temperature * 1.5, top_k, top_p),
             expected_probs(STAT_LOGITS, temperature / 1.5, top_k, top_p),
             expected_probs(STAT_LOGITS, temperature, None, None)]
    for w in wrong:
        assert tv(w, target) > 0.04 or (top_k is None and top_p is None and w is wrong[2])
    # ... while sampling noise is about sum_i sqrt(p_i / N) / 2 * 0.8 < 0.008 at N = 40000.
    ids = draw(STAT_LOGITS, N, seed=2024, temperature=temperature, top_k=top_k, top_p=top_p)
    freq = empirical(ids, V)
    assert tv(freq, target) < 0.02
    assert freq[target == 0].sum() == 0, "a filtered-out token was drawn"
    # and a chi-square bound (df <= 9; P(chi2_9 > 45) ~ 1e-6)
    kept = target > 0
    counts = freq[kept] * N
    chi2 = float(((counts - N * target[kept]) ** 2 / (N * target[kept])).sum())
    assert chi2 < 45


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(top_k=0), dict(top_k=-3), dict(temperature=-1.0),
                                dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(top_p=1.5), dict(top_p=0.0), dict(top_p=-0.1)])
def test_invalid_arguments(backend, kw):
    with pytest.raises(ValueError):
        gpt.sample_next_token(torch.randn(2, 10), **kw)


@pytest.mark.parametrize("broken", ["nan", "+inf", "all -inf"])
def test_broken_logits(backend, broken):
    logits = torch.randn(3, 1000)
    if broken == "all -inf":
        logits[1] = float("-inf")
    else:
        logits[1, 4] = float(broken)
    for kw in (dict(), dict(temperature=0.0), dict(top_k=50), dict(top_p=0.9), dict(top_k=5, top_p=0.5)):
        with pytest.raises(ValueError, match="NaN or \\+inf, or a row is all -inf"):
            gpt.sample_next_token(logits, **kw)


# --- generate ------------------------------------------------------------------------------

VOCAB = 97


def tiny_model(block_size=16, seed=0):
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64,
                                  qkv_bias=True, tie_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("h."):  # attention and MLP as loud as the embeddings: a cache or
                p.normal_(0, 0.15 if p.dim() == 2 else 0.05)  # position bug changes the tokens
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.normal_(1.0, 0.2)
        model.wte.weight.normal_(0, 1.0)
        model.wpe.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 0.3)  # logits ~ N(0, 2.4^2): diverse samples, argmaxes far from ties
    return model.eval()


@torch.no_grad()
def reference_generate(model, idx, n, sample=None):
    """No cache: every step re-runs the model on the cropped context idx[:, -block_size:],
    on the pure-torch kernels; sample(logits) picks the next token (default argmax)."""
    L = model.config.block_size
    with gpt.backend("torch"):
        margins = []
        for _ in range(n):
            logits = model(idx[:, -L:])[:, -1]
            top2 = logits.topk(2, dim=-1).values
            margins.append(float((top2[:, 0] - top2[:, 1]).min()))
            nxt = logits.argmax(-1, keepdim=True) if sample is None else sample(logits)
            idx = torch.cat([idx, nxt], dim=1)
    return idx, min(margins) if margins else float("inf")


@pytest.mark.parametrize("B,T,n,block_size", [
    (1, 5, 8, 16),      # within the block
    (2, 1, 10, 16),     # a one-token prompt
    (3, 5, 8, 16),
    (1, 10, 30, 16),    # slides past block_size
    (3, 10, 30, 16),
    (2, 20, 12, 16),    # a prompt longer than block_size
    (2, 16, 5, 16),     # a prompt of exactly block_size
])
def test_greedy_kv_cache_equals_no_cache(backend, B, T, n, block_size):
    model = tiny_model(block_size)
    for seed in range(20):  # a prompt whose reference argmaxes are no near-ties (first seeds pass)
        prompt = torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
        expected, margin = reference_generate(model, prompt, n)
        if margin > 1e-3:
            break
    assert margin > 1e-3
    got = gpt.generate(model, prompt, n, temperature=0.0)
    assert got.shape == (B, T + n)
    assert torch.equal(got[:, :T], prompt)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("T,n,length", [(5, 8, 12), (1, 1, 1), (10, 30, 16), (20, 3, 16)])
def test_kv_cache_holds_only_the_positions_generation_reaches(monkeypatch, T, n, length):
    # prompt (cropped to block_size) + n - 1 fed tokens, at most block_size (then it slides)
    model, lengths = tiny_model(16), []
    new_kv_cache = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda B, L=None: lengths.append(L) or new_kv_cache(B, L))
    gpt.generate(model, torch.zeros(2, T, dtype=torch.long), n)
    assert lengths == [length]
    assert model.new_kv_cache(2)[0][0].shape == (2, 4, 16, 16)  # default: block_size


@pytest.mark.parametrize("B,T,n,kw", [
    (1, 6, 25, dict(temperature=1.0)),
    (3, 10, 30, dict(temperature=0.8, top_k=10)),
    (2, 20, 15, dict(temperature=1.2, top_p=0.9)),
    (3, 4, 20, dict(temperature=0.7, top_k=20, top_p=0.95)),
])
def test_sampling_kv_cache_equals_no_cache(backend, B, T, n, kw):
    model = tiny_model(16, seed=1)
    prompt = torch.randint(VOCAB, (B, T), generator=torch.Generator().manual_seed(T))
    g_ref = torch.Generator().manual_seed(42)
    expected, _ = reference_generate(
        model, prompt, n, sample=lambda logits: gpt.sample_next_token(logits, generator=g_ref, **kw))
    got = gpt.generate(model, prompt, n, generator=torch.Generator().manual_seed(42), **kw)
    assert got.tolist() == expected.tolist()
    # and seeded sampling is not secretly greedy
    greedy, _ = reference_generate(model, prompt, n)
    assert got.tolist() != greedy.tolist()


def _eos_setup():
    """A prompt pair and an eos id that row 0's greedy continuation emits (first at step s)
    and row 1's never does."""
    model = tiny_model(16, seed=2)
    n = 20
    for seed in range(50):
        prompt = torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
        ref, margin = reference_generate(model, prompt, n)
        if margin < 1e-3:
            continue
        row0, row1 = ref[0, 6:].tolist(), ref[1, 6:].tolist()
        for s, tok in enumerate(row0):
            if 3 <= s < n - 3 and tok not in row0[:s] and tok not in row1:
                return model, prompt, ref, tok, s, n
    raise AssertionError("no eos setup found")


def test_eos_row_stops_and_is_padded(backend):
    model, prompt, ref, eos, s, n = _eos_setup()
    got = gpt.generate(model, prompt, n, temperature=0.0, eos_id=eos)
    assert got.shape == (2, 6 + n)
    assert got[0, : 6 + s + 1].tolist() == ref[0, : 6 + s + 1].tolist()  # up to and incl. eos
    assert got[0, 6 + s:].tolist() == [eos] * (n - s)                   # then only eos
    assert got[1].tolist() == ref[1].tolist()                            # the other row goes on


def test_eos_all_rows_stop_early(backend):
    model, prompt, ref, eos, s, n = _eos_setup()
    got = gpt.generate(model, prompt[:1], n, temperature=0.0, eos_id=eos)
    assert got.tolist() == [ref[0, : 6 + s + 1].tolist()]  # ends right after eos


def test_on_token_streams_every_column(backend):
    model = tiny_model(16)
    prompt = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    cols = []
    got = gpt.generate(model, prompt, 20, temperature=0.0, on_token=cols.append)
    assert len(cols) == 20 and all(c.shape == (2, 1) for c in cols)
    assert torch.equal(torch.cat([prompt] + cols, dim=1), got)


def test_max_new_tokens_zero_and_negative(backend):
    model = tiny_model(16)
    prompt = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpt.generate(model, prompt, 0), prompt)
    long_prompt = torch.randint(VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpt.generate(model, long_prompt, 0), long_prompt)  # not cropped
    with pytest.raises(ValueError):
        gpt.generate(model, prompt, -1)


def test_generate_leaves_model_mode_and_grad_alone(backend):
    model = tiny_model(16)
    prompt = torch.randint(VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    out = gpt.generate(model, prompt, 3)
    assert not out.requires_grad and not model.training


def test_one_generator_per_row_draws_as_each_row_alone():
    logits = torch.randn(1, 50257, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    rows = gpt.sample_next_token(logits, 0.8, 50, 0.9, [torch.Generator().manual_seed(7 + i) for i in range(3)])
    alone = [gpt.sample_next_token(logits[:1], 0.8, 50, 0.9, torch.Generator().manual_seed(7 + i)) for i in range(3)]
    assert torch.equal(rows, torch.cat(alone)) and len(set(rows.flatten().tolist())) > 1
    with pytest.raises(ValueError, match="one per row"):
        gpt.sample_next_token(logits, 0.8, None, None, [torch.Generator()])
