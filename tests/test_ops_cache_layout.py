"""The compressed-cache form of the op (keys [sinks | gists | contiguous tail],
unigist.layout.KeyLayout) against the dense reference on the keys' positions."""

import random

import pytest
import torch

from unigist import GistConfig, gist_attention
from unigist.layout import KeyLayout, key_positions, keep_for_future, num_gists
from unigist.reference import gist_attention_reference

from conftest import rel_err


def random_cache(cfg: GistConfig, rng: random.Random, max_seen: int = 160, max_chunk: int = 40, chunk=None):
    """A cache as GistCache leaves it: positions 0..seen-1 seen, evicted (lazily or
    strictly) for a query at evicted_at <= seen, then a chunk of n new positions
    appended (n = chunk, or drawn from 1..max_chunk); returns (KeyLayout, number of
    key rows, q_offset, n). tests/test_cuda_cache_layout.py uses it too."""
    seen = rng.randint(0, max_seen)
    evicted_at = rng.choice([seen, rng.randint(0, seen)])  # strict, or lazy (older holes only)
    pos = torch.arange(seen)
    keep = keep_for_future(pos, evicted_at, cfg) if seen else torch.zeros(0, dtype=torch.bool)
    holes = (~keep).nonzero().flatten()
    tail_start = int(holes[-1]) + 1 if holes.numel() else 0
    sinks = min(cfg.num_sink, tail_start)
    first_gist = num_gists(sinks, cfg)
    gists = max(0, num_gists(tail_start, cfg) - first_gist)
    n = rng.randint(1, max_chunk) if chunk is None else chunk
    kl = KeyLayout(sinks, gists, first_gist, tail_start)
    nk = sinks + gists + (seen - tail_start) + n
    # The layout describes exactly the kept rows, then the chunk.
    expected = torch.cat([pos[keep], torch.arange(seen, seen + n)])
    assert torch.equal(key_positions(kl, nk, cfg), expected)
    return kl, nk, seen, n


CONFIGS = [
    GistConfig(ratio=1, window=2, num_sink=0),
    GistConfig(ratio=2, window=5, num_sink=3),
    GistConfig(ratio=4, window=16, num_sink=5),
    GistConfig(ratio=9, window=40, num_sink=0),
    GistConfig(ratio=3, window=7, num_sink=30),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_layout_forward_backward_match_reference(seed, cfg, dtype):
    rng = random.Random(seed)
    for _ in range(6):
        kl, nk, q_offset, nq = random_cache(cfg, rng)
        hq, hkv = rng.choice([(2, 2), (4, 2), (3, 1)])
        d = rng.choice([8, 16, 64])
        q = torch.randn(2, hq, nq, d, dtype=dtype, requires_grad=True)
        k = torch.randn(2, hkv, nk, d, dtype=dtype, requires_grad=True)
        v = torch.randn(2, hkv, nk, d, dtype=dtype, requires_grad=True)
        dout = torch.randn(2, hq, nq, d, dtype=dtype)
        out, lse = gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        kpos = key_positions(kl, nk, cfg)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = gist_attention_reference(q64, k64, v64, cfg, q_offset=q_offset, k_positions=kpos,
                                                return_lse=True)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert rel_err(out, ref) < tol, (kl, nk, q_offset, nq, seed)
        assert torch.allclose(lse.double(), ref_lse.double(), atol=tol * 10)
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert rel_err(g, rg) < tol, (name, kl, nk, q_offset, nq, seed)


def test_cache_layout_bf16_and_transposed(seed):
    cfg = GistConfig(ratio=4, window=24, num_sink=4)
    rng = random.Random(seed)
    kl, nk, q_offset, nq = random_cache(cfg, rng, max_seen=300)
    # HF hands over [B, H, N, D] views of [B, N, H, D] tensors.
    q = torch.randn(1, nq, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, nk, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, nk, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    out = gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl)
    ref = gist_attention_reference(q, k, v, cfg, q_offset=q_offset, k_positions=key_positions(kl, nk, cfg))
    assert rel_err(out, ref) < 1e-2


def test_interleaved_key_layout_is_the_plain_op(seed):
    cfg = GistConfig(ratio=2, window=6, num_sink=2)
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    a = gist_attention(q, k, v, cfg, q_offset=21)
    b = gist_attention(q, k, v, cfg, q_offset=21, key_layout=KeyLayout())
    assert torch.equal(a, b)


def test_cache_layout_opcheck(seed):
    cfg = GistConfig(ratio=3, window=6, num_sink=2)
    kl, nk, q_offset, nq = random_cache(cfg, random.Random(seed), max_seen=60, max_chunk=8)
    q, k, v = torch.randn(1, 2, nq, 8), torch.randn(1, 1, nk, 8), torch.randn(1, 1, nk, 8)
    args = (q, k, v, cfg.ratio, cfg.window, cfg.num_sink, 0.3, q_offset, *kl)
    torch.library.opcheck(torch.ops.unigist.gist_attention_cache_fwd.default, args)


@pytest.mark.parametrize(
    "kl, q_offset, message",
    [
        (KeyLayout(3, 0, 0, 3), 2, "inside the tail"),  # query before the tail
        (KeyLayout(3, 0, 0, 3), 30, "inside the tail"),  # query past the keys
        (KeyLayout(5, 0, 0, 5), 5, "num_sink"),  # more cached sinks than num_sink
        (KeyLayout(3, 2, 0, 20), 20, "cached gists"),  # gist 0 (position 2) inside the cached sinks
        (KeyLayout(2, 4, 1, 10), 10, "cached gists"),  # gist 4 at position 14 >= tail_start
        (KeyLayout(-1, 0, 0, 0), 0, ">= 0"),
        (KeyLayout(2, 30, 1, 200), 200, "exceed"),
    ],
)
def test_cache_layout_refused(kl, q_offset, message):
    cfg = GistConfig(ratio=2, window=4, num_sink=3)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    with pytest.raises(ValueError, match=message):
        gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl)
    with pytest.raises(ValueError, match=message):
        torch.ops.unigist.gist_attention_cache_fwd(q, k, v, cfg.ratio, cfg.window, cfg.num_sink, 0.3, q_offset, *kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cfg", [GistConfig(ratio=1, window=300, num_sink=20), GistConfig(ratio=4, window=70, num_sink=3)],
                         ids=["r1", "r4"])
def test_few_query_decode_matches_reference(seed, cfg, dtype):
    """Decoding shapes (1-3 queries per head over caches of a few thousand rows, several
    key blocks, GQA): the few-query form of the forward (S^T = K Q^T over K in place,
    all query heads of a kv head together), and the blocked form it replaces (one kv
    head in total, so it is not taken) give the dense reference's output."""
    rng = random.Random(seed)
    for _ in range(4):
        kl, nk, q_offset, nq = random_cache(cfg, rng, max_seen=3000, max_chunk=3)
        hq, hkv = rng.choice([(8, 4), (8, 2), (4, 4), (6, 1)])
        b = 2 if hkv == 1 else 1
        d = rng.choice([16, 64])
        q = torch.randn(b, hq, nq, d).to(dtype)
        k = torch.randn(b, hkv, nk, d).to(dtype)
        v = torch.randn(b, hkv, nk, d).to(dtype)
        out, lse = gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl, return_lse=True)
        kpos = key_positions(kl, nk, cfg)
        ref, ref_lse = gist_attention_reference(q.double(), k.double(), v.double(), cfg, q_offset=q_offset,
                                                k_positions=kpos, return_lse=True)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}[dtype]
        assert out.dtype == dtype and out.is_contiguous()
        assert rel_err(out, ref) < tol, (kl, nk, q_offset, nq, hq, hkv, seed)
        assert torch.allclose(lse.double(), ref_lse, atol=max(tol, 1e-6) * 10)
        # the blocked form: one batch row and one kv head at a time
        blocked = torch.cat([
            gist_attention(q[i : i + 1, h * (hq // hkv) : (h + 1) * (hq // hkv)], k[i : i + 1, h : h + 1],
                           v[i : i + 1, h : h + 1], cfg, q_offset=q_offset, key_layout=kl)
            for i in range(b) for h in range(hkv)
        ], dim=1).reshape(b, hq, nq, d)
        assert rel_err(blocked, ref) < tol


def _step_layout(kl: KeyLayout, q_offset: int, nk: int, device="cpu") -> torch.Tensor:
    return torch.tensor([q_offset, *kl, nk], dtype=torch.long, device=device)


@pytest.mark.parametrize("cfg", CONFIGS[1:3], ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
def test_cache_step_reads_its_layout_from_a_tensor(seed, cfg):
    """gist_attention_cache_step (what a CUDA-graph decode step calls): keys are the first
    num_keys rows of a larger buffer whose other rows hold NaN; the layout comes in a tensor."""
    rng = random.Random(seed)
    for _ in range(4):
        kl, nk, q_offset, nq = random_cache(cfg, rng, max_chunk=3)
        capacity = nk + rng.randint(0, 40)
        q = torch.randn(1, 4, nq, 16)
        k = torch.full((1, 2, capacity, 16), float("nan"))
        v = torch.full((1, 2, capacity, 16), float("nan"))
        k[:, :, :nk].normal_()
        v[:, :, :nk].normal_()
        out, lse = torch.ops.unigist.gist_attention_cache_step(
            q, k, v, _step_layout(kl, q_offset, nk), cfg.ratio, cfg.window, cfg.num_sink, 0.25
        )
        kpos = key_positions(kl, nk, cfg)
        ref, ref_lse = gist_attention_reference(q.double(), k[:, :, :nk].double(), v[:, :, :nk].double(), cfg,
                                                q_offset=q_offset, k_positions=kpos, return_lse=True,
                                                softmax_scale=0.25)
        assert rel_err(out, ref) < 1e-5, (kl, nk, q_offset, nq)
        assert torch.allclose(lse.double(), ref_lse, atol=1e-4)


def test_cache_step_opcheck_and_refusals(seed):
    cfg = GistConfig(ratio=3, window=6, num_sink=2)
    kl, nk, q_offset, nq = random_cache(cfg, random.Random(seed), max_seen=60, max_chunk=2)
    q, k, v = torch.randn(1, 2, nq, 8), torch.randn(1, 1, nk + 5, 8), torch.randn(1, 1, nk + 5, 8)
    layout = _step_layout(kl, q_offset, nk)
    torch.library.opcheck(torch.ops.unigist.gist_attention_cache_step.default,
                          (q, k, v, layout, cfg.ratio, cfg.window, cfg.num_sink, 0.3))
    step = torch.ops.unigist.gist_attention_cache_step
    with pytest.raises(ValueError, match="6 values"):
        step(q, k, v, layout[:5], cfg.ratio, cfg.window, cfg.num_sink, 0.3)
    with pytest.raises(ValueError, match="6 values"):
        step(q, k, v, layout.int(), cfg.ratio, cfg.window, cfg.num_sink, 0.3)
    with pytest.raises(ValueError, match="key buffer holds"):
        step(q, k, v, _step_layout(kl, q_offset, nk + 6), cfg.ratio, cfg.window, cfg.num_sink, 0.3)
    with pytest.raises(ValueError, match="inside the tail"):
        step(q, k, v, _step_layout(kl, q_offset + 50, nk), cfg.ratio, cfg.window, cfg.num_sink, 0.3)
