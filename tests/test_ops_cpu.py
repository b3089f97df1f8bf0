"""CPU ops against the dense-mask reference (the CI path)."""

import math
import random

import pytest
import torch

import unigist
from unigist import GistConfig, gist_attention
from unigist.reference import gist_attention_reference

from conftest import rel_err

# (q_len, k_len, q_offset): full sequences, N shorter/longer than the window,
# and chunks of queries over a longer key sequence.
SHAPES = [(1, 1, 0), (7, 7, 0), (37, 37, 0), (130, 130, 0), (16, 50, 34), (1, 90, 89), (25, 70, 40)]
CONFIGS = [
    GistConfig(ratio=1, window=2, num_sink=0),
    GistConfig(ratio=2, window=8, num_sink=3),
    GistConfig(ratio=4, window=16, num_sink=5),
    GistConfig(ratio=8, window=200, num_sink=0),
    GistConfig(ratio=4, window=5, num_sink=40),
]
HEADS = [(4, 4), (4, 2), (6, 1)]


def _inputs(b, hq, hkv, nq, nk, d, dtype, requires_grad=False):
    q = torch.randn(b, hq, nq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
def test_forward_matches_reference(seed, shape, cfg):
    nq, nk, off = shape
    hq, hkv = random.Random(seed).choice(HEADS)
    q, k, v = _inputs(2, hq, hkv, nq, nk, 32, torch.float32)
    out, lse = gist_attention(q, k, v, cfg, q_offset=off, return_lse=True)
    ref, ref_lse = gist_attention_reference(q, k, v, cfg, q_offset=off, return_lse=True)
    assert rel_err(out, ref) < 1e-5, seed
    assert torch.allclose(lse, ref_lse, atol=1e-4), seed


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_forward_head_dims_and_dtypes(seed, d, dtype, tol):
    cfg = GistConfig(ratio=4, window=24, num_sink=4)
    q, k, v = _inputs(1, 4, 2, 75, 75, d, dtype)
    out = gist_attention(q, k, v, cfg)
    assert out.dtype == dtype and out.shape == q.shape
    ref = gist_attention_reference(q.double(), k.double(), v.double(), cfg)
    assert rel_err(out, ref) < tol, seed


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
def test_backward_matches_reference(seed, shape, cfg):
    nq, nk, off = shape
    hq, hkv = random.Random(seed).choice(HEADS)
    q, k, v = _inputs(2, hq, hkv, nq, nk, 16, torch.float32, requires_grad=True)
    dout = torch.randn(2, hq, nq, 16)
    grads = torch.autograd.grad(gist_attention(q, k, v, cfg, q_offset=off), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = gist_attention_reference(q64, k64, v64, cfg, q_offset=off)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape
        assert rel_err(g, rg) < 1e-5, (name, seed)


def test_backward_bf16(seed):
    cfg = GistConfig(ratio=2, window=10, num_sink=2)
    q, k, v = _inputs(1, 4, 2, 50, 50, 64, torch.bfloat16, requires_grad=True)
    dout = torch.randn(1, 4, 50, 64, dtype=torch.bfloat16)
    grads = torch.autograd.grad(gist_attention(q, k, v, cfg), (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(gist_attention_reference(q64, k64, v64, cfg), (q64, k64, v64), dout.double())
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, rg) < 2e-2, seed


def test_gradcheck_float64(seed):
    cfg = GistConfig(ratio=2, window=3, num_sink=1)
    q, k, v = _inputs(1, 2, 1, 9, 9, 4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gist_attention(a, b, c, cfg), (q, k, v))
    q2 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gist_attention(a, b, c, cfg, q_offset=5), (q2, k, v))


def test_softmax_scale(seed):
    cfg = GistConfig(ratio=3, window=5, num_sink=2)
    q, k, v = _inputs(1, 2, 2, 20, 20, 8, torch.float32)
    out = gist_attention(q, k, v, cfg, softmax_scale=0.3)
    assert rel_err(out, gist_attention_reference(q, k, v, cfg, softmax_scale=0.3)) < 1e-5
    assert rel_err(out, gist_attention_reference(q, k, v, cfg)) > 1e-3


def test_cost_follows_mask_nonzeros():
    """The CPU kernel visits only the mask's non-zeros: with ~12% of the causal
    pairs visible it must run far faster than with all of them visible."""
    import time

    n = 3072
    sparse = GistConfig(ratio=8, window=32, num_sink=4)
    causal = GistConfig(ratio=8, window=n, num_sink=4)  # the window covers everything: plain causal
    density = unigist.layout.mask_nnz(n, n, sparse) / unigist.layout.mask_nnz(n, n, causal)
    assert density < 0.15
    q, k, v = _inputs(1, 1, 1, n, n, 32, torch.float32)
    best = {"sparse": math.inf, "causal": math.inf}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the time follows the work, not barrier waits on a busy machine
    try:
        for _ in range(6):  # interleaved, so a busy machine slows both alike; the best of each
            for name, cfg in (("sparse", sparse), ("causal", causal)):
                t = time.perf_counter()
                gist_attention(q, k, v, cfg)
                best[name] = min(best[name], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert best["sparse"] < 0.5 * best["causal"], (best, density)


def test_opcheck(seed):
    cfg = GistConfig(ratio=2, window=4, num_sink=1)
    q, k, v = _inputs(1, 4, 2, 12, 12, 8, torch.float32, requires_grad=True)
    args = (q, k, v, cfg.ratio, cfg.window, cfg.num_sink, 8**-0.5, 0)
    torch.library.opcheck(torch.ops.unigist.gist_attention_fwd.default, args)
    q2 = torch.randn(1, 4, 5, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.unigist.gist_attention_fwd.default, (q2, k, v, 2, 4, 1, 0.25, 7))
    out, lse = torch.ops.unigist.gist_attention_fwd(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, 2, 4, 1, 8**-0.5, 0)
    torch.library.opcheck(torch.ops.unigist.gist_attention_bwd.default, bwd_args)


def test_torch_compile_traces(seed):
    cfg = GistConfig(ratio=2, window=6, num_sink=2)

    def f(q, k, v):
        return gist_attention(q, k, v, cfg).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k, v = _inputs(1, 2, 2, 20, 20, 8, torch.float32, requires_grad=True)
    loss = compiled(q, k, v)
    loss.backward()
    assert torch.allclose(loss, f(q, k, v), rtol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_bad_inputs():
    cfg = GistConfig(ratio=2, window=4, num_sink=1)
    q, k, v = _inputs(1, 4, 2, 6, 6, 8, torch.float32)
    cases = [
        ((q[0], k, v), {}, ValueError, "4-D"),
        ((q, k.double(), v), {}, ValueError, "dtype"),
        ((q, k, v[:, :1]), {}, ValueError, "shapes differ"),
        ((q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), {}, ValueError, "batch"),
        ((q[:, :3], k, v), {}, ValueError, "multiple of key/value heads"),
        ((q, k[..., :4], v[..., :4]), {}, ValueError, "head dims"),
        ((q, k, v), {"q_offset": 3}, ValueError, "cover every query"),
        ((q, k, v), {"q_offset": -1}, ValueError, "q_offset"),
        ((q.int(), k.int(), v.int()), {}, ValueError, "float32"),
        ((q, k, v), {"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            gist_attention(*args, cfg, **kwargs)
    with pytest.raises(TypeError, match="GistConfig"):
        gist_attention(q, k, v, {"ratio": 2})
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError)):
            gist_attention(q.to("meta"), k, v, cfg)


def test_raw_op_rejects_bad_input_with_clear_message():
    """The C++ checks hold even when the Python wrapper is bypassed."""
    q, k, v = (torch.randn(1, 3, 5, 8) for _ in range(3))
    op = torch.ops.unigist.gist_attention_fwd
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        op(q, k[:, :2], v[:, :2], 2, 4, 1, 0.3, 0)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        op(q, k, v, 0, 4, 1, 0.3, 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        op(q, k, v, 2, 0, 1, 0.3, 0)
    with pytest.raises(RuntimeError, match="4-D"):
        op(q[0], k, v, 2, 4, 1, 0.3, 0)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        out, lse = op(q, k, v, 2, 4, 1, 0.3, 0)
        torch.ops.unigist.gist_attention_bwd(out, q, k, v, out, lse.double(), 2, 4, 1, 0.3, 0)


def test_fwd_arch_op_on_cpu():
    """gist_attention_fwd_arch names the CUDA forward kernel in use; 0 for CPU tensors."""
    assert torch.ops.unigist.gist_attention_fwd_arch(torch.empty(1)) == 0
