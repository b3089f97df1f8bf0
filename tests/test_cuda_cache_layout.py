"""The CUDA compressed-cache forward (gist_attention(..., key_layout=),
csrc/cuda/cache_fwd_sm80.cu) against the float32 dense reference on the
keys' positions: random eviction histories, GQA, prefill chunks and decode steps,
split-KV, strided (in place) and copied inputs, poisoned output memory."""

import random

import pytest
import torch

from unigist import GistCache, GistConfig, gist_attention
from unigist.layout import KeyLayout, keep_for_future, key_positions, num_gists
from unigist.reference import gist_attention_reference

from conftest import rel_err
from test_ops_cache_layout import random_cache as cpu_random_cache

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]
# ||kernel - reference|| / ||reference||: P is rounded to the input dtype before P V.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

CONFIGS = [
    GistConfig(ratio=1, window=2, num_sink=0),
    GistConfig(ratio=2, window=37, num_sink=3),
    GistConfig(ratio=4, window=256, num_sink=128),
    GistConfig(ratio=8, window=100, num_sink=77),
    GistConfig(ratio=3, window=1024, num_sink=5),
]


def _poison_allocator(nbytes: int = 64 << 20) -> None:
    """Leave NaN in the caching allocator's free blocks, so an output the kernel
    forgets to write shows up as NaN rather than as a lucky zero."""
    torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").fill_(float("nan"))


def random_cache(cfg: GistConfig, rng: random.Random, max_seen: int, chunk: int):
    """(KeyLayout, key rows, q_offset) of a random eviction history with `chunk` new positions."""
    kl, nk, q_offset, _ = cpu_random_cache(cfg, rng, max_seen=max_seen, chunk=chunk)
    return kl, nk, q_offset


def _check(q, k, v, cfg, kl, q_offset, tol, what):
    _poison_allocator()
    out, lse = gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl, return_lse=True)
    torch.cuda.synchronize()
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    kpos = key_positions(kl, k.shape[2], cfg, device=q.device)
    ref, ref_lse = gist_attention_reference(q, k, v, cfg, q_offset=q_offset, k_positions=kpos, return_lse=True,
                                            dtype=torch.float32)
    assert torch.isfinite(out).all(), what
    err = rel_err(out, ref)
    assert err < tol, (what, err)
    assert torch.allclose(lse, ref_lse, atol=2e-3, rtol=1e-4), (what, (lse - ref_lse).abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
def test_cache_forward_matches_reference(seed, cfg, d, dtype):
    rng = random.Random(seed)
    for _ in range(4):
        # Prefill chunks of every size (tiles cut anywhere), and decode steps.
        nq = rng.choice([1, 2, 3, rng.randint(1, 64), rng.randint(65, 700)])
        kl, nk, q_offset = random_cache(cfg, rng, max_seen=3000, chunk=nq)
        b = rng.choice([1, 2])
        hq, hkv = rng.choice([(4, 4), (8, 2), (6, 1), (2, 1)])
        q = torch.randn(b, hq, nq, d, dtype=dtype, device="cuda")
        k = torch.randn(b, hkv, nk, d, dtype=dtype, device="cuda")
        v = torch.randn(b, hkv, nk, d, dtype=dtype, device="cuda")
        _check(q, k, v, cfg, kl, q_offset, TOL[dtype], (kl, nk, q_offset, nq, hq, hkv, seed))


@pytest.mark.parametrize("path", ["sm90x2", "sm90x3", "sm90x2-turns", "sm90x3-turns", "sm80"])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_chunks_filling_the_gpu(seed, monkeypatch, path, d):
    """Chunks with enough (query tile, head) pairs to fill the GPU (2 x 32 heads x >= 3
    tiles of up to 192 queries >= 132 SMs): on sm_90a the wgmma forward over the cache's
    key blocks (at D=64 with 2 or 3 consumer warpgroups; "-turns": consumers taking
    turns, UNIGIST_SM90_PINGPONG), else (and with UNIGIST_FORCE_SM80=1) mma.sync."""
    monkeypatch.setenv("UNIGIST_FORCE_SM80", "1" if path == "sm80" else "0")
    monkeypatch.setenv("UNIGIST_SM90_FWD_CONSUMERS", "3" if path.startswith("sm90x3") else "2")
    monkeypatch.setenv("UNIGIST_SM90_PINGPONG", "fwd" if path.endswith("-turns") else "0")
    rng = random.Random(seed)
    for cfg in (CONFIGS[2], CONFIGS[3], CONFIGS[1]):
        nq = rng.randint(400, 700)
        kl, nk, q_offset = random_cache(cfg, rng, max_seen=3000, chunk=nq)
        dtype = rng.choice(DTYPES)
        q = torch.randn(2, 32, nq, d, dtype=dtype, device="cuda")
        k = torch.randn(2, 8, nk, d, dtype=dtype, device="cuda")
        v = torch.randn(2, 8, nk, d, dtype=dtype, device="cuda")
        _check(q, k, v, cfg, kl, q_offset, TOL[dtype], (path, kl, nk, q_offset, nq, seed))


@pytest.mark.parametrize("splits", ["1", "3", "64"])
@pytest.mark.parametrize("nq", [1, 2, 17])
def test_split_kv_decode(seed, monkeypatch, splits, nq):
    """Decode over a long cache: split-KV (forced counts, and the heuristic)."""
    monkeypatch.setenv("UNIGIST_CACHE_SPLITS", splits)
    cfg = GistConfig(ratio=4, window=1024, num_sink=128)
    rng = random.Random(seed)
    seen = rng.randint(6000, 9000)
    tail_start = seen - 1024 + 1
    while keep_for_future(torch.tensor([tail_start - 1]), seen, cfg).item():
        tail_start -= 1
    first_gist = num_gists(128, cfg)
    kl = KeyLayout(128, num_gists(tail_start, cfg) - first_gist, first_gist, tail_start)
    nk = 128 + kl.cache_gists + (seen - tail_start) + nq
    q = torch.randn(1, 32, nq, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 8, nk, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(1, 8, nk, 128, dtype=torch.bfloat16, device="cuda")
    _check(q, k, v, cfg, kl, seen, TOL[torch.bfloat16], (splits, nq, seed))
    monkeypatch.delenv("UNIGIST_CACHE_SPLITS")
    _check(q, k, v, cfg, kl, seen, TOL[torch.bfloat16], ("heuristic", nq, seed))


def test_strided_and_unaligned_inputs(seed):
    """HF's transposed q, a cache buffer narrowed to its length (read in place),
    and views the kernel cannot read in place (copied): same results."""
    cfg = GistConfig(ratio=4, window=64, num_sink=8)
    rng = random.Random(seed)
    nq = 40
    kl, nk, q_offset = random_cache(cfg, rng, max_seen=900, chunk=nq)
    q = torch.randn(2, nq, 8, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    kbuf = torch.randn(2, 2, nk + 50, 64, dtype=torch.bfloat16, device="cuda")
    vbuf = torch.randn(2, 2, nk + 50, 64, dtype=torch.bfloat16, device="cuda")
    k, v = kbuf[:, :, :nk], vbuf[:, :, :nk]
    _check(q, k, v, cfg, kl, q_offset, TOL[torch.bfloat16], "strided")
    ref = gist_attention(q.contiguous(), k.contiguous(), v.contiguous(), cfg, q_offset=q_offset, key_layout=kl)
    assert torch.equal(gist_attention(q, k, v, cfg, q_offset=q_offset, key_layout=kl), ref)
    # Rows not 16-byte aligned (odd storage offset) and a non-unit head-dim stride: copied.
    flat = torch.randn(2 * 2 * nk * 64 + 1, dtype=torch.bfloat16, device="cuda")
    k_odd = flat[1:].view(2, 2, nk, 64)
    v_t = torch.randn(2, 2, 64, nk, dtype=torch.bfloat16, device="cuda").transpose(2, 3)
    _check(q, k_odd, v_t, cfg, kl, q_offset, TOL[torch.bfloat16], "copied")


@pytest.mark.parametrize("eviction", ["lazy", "strict"])
def test_gist_cache_history(seed, eviction):
    """A GistCache fed chunks of random sizes (the CUDA eviction kernel moves its rows):
    every chunk's attention over the cache matches the reference on its positions."""
    cfg = GistConfig(ratio=4, window=96, num_sink=16)
    rng = random.Random(seed)
    cache = GistCache(cfg, num_layers=1, eviction=eviction, explicit_layout=True)
    hq, hkv, d = 8, 2, 64
    for _ in range(12):
        n = rng.choice([1, 1, 2, rng.randint(3, 200)])
        k_new = torch.randn(1, hkv, n, d, dtype=torch.float16, device="cuda")
        v_new = torch.randn(1, hkv, n, d, dtype=torch.float16, device="cuda")
        keys, values = cache.update(k_new, v_new, 0)
        kl, q_offset = cache.attention_args(0, keys.shape[2], n)
        layer = cache.layers[0]
        assert torch.equal(key_positions(kl, keys.shape[2], cfg, device="cuda"), layer.positions)
        q = torch.randn(1, hq, n, d, dtype=torch.float16, device="cuda")
        _check(q, keys, values, cfg, kl, q_offset, TOL[torch.float16], (kl, n, q_offset, seed))


def test_backward_raises_not_implemented():
    cfg = GistConfig(ratio=2, window=8, num_sink=2)
    kl = KeyLayout(2, 3, 1, 20)
    nk = 2 + 3 + 10
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k = torch.randn(1, 2, nk, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    v = torch.randn(1, 2, nk, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = gist_attention(q, k, v, cfg, q_offset=26, key_layout=kl)
    with pytest.raises(NotImplementedError, match="compressed-cache"):
        out.sum().backward()


def test_bad_inputs_raise():
    cfg = GistConfig(ratio=2, window=8, num_sink=2)
    kl = KeyLayout(2, 3, 1, 20)
    k = torch.randn(1, 2, 15, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="inside the tail"):
        gist_attention(q, k, k, cfg, q_offset=10, key_layout=kl)
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        gist_attention(q[..., :32], k[..., :32], k[..., :32], cfg, q_offset=26, key_layout=kl)
    # The op itself (no Python checks in front) raises too.
    with pytest.raises(ValueError, match="inside the tail"):
        torch.ops.unigist.gist_attention_cache_fwd(q, k, k, 2, 8, 2, 0.125, 10, *kl)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.unigist.gist_attention_cache_fwd(q, k.cpu(), k, 2, 8, 2, 0.125, 26, *kl)


@pytest.mark.parametrize("nq", [1, 2])
def test_cache_step_layout_in_device_memory(seed, nq):
    """gist_attention_cache_step on CUDA: the layout is read from device memory (rewritten between
    calls, as between CUDA-graph replays), keys are the leading rows of a NaN-filled buffer."""
    cfg = GistConfig(ratio=4, window=256, num_sink=64)
    rng = random.Random(seed)
    capacity = 4096
    k = torch.full((1, 4, capacity, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    v = torch.full((1, 4, capacity, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    layout = torch.zeros(6, dtype=torch.long, device="cuda")
    for _ in range(4):
        kl, nk, q_offset = random_cache(cfg, rng, max_seen=rng.choice([300, 3000]), chunk=nq)
        k[:, :, :nk].normal_()
        v[:, :, :nk].normal_()
        layout.copy_(torch.tensor([q_offset, *kl, nk]))
        q = torch.randn(1, 32, nq, 64, dtype=torch.bfloat16, device="cuda")
        _poison_allocator()
        out, lse = torch.ops.unigist.gist_attention_cache_step(q, k, v, layout, cfg.ratio, cfg.window,
                                                              cfg.num_sink, 0.125)
        torch.cuda.synchronize()
        kpos = key_positions(kl, nk, cfg, device="cuda")
        ref, ref_lse = gist_attention_reference(q, k[:, :, :nk], v[:, :, :nk], cfg, q_offset=q_offset,
                                                k_positions=kpos, return_lse=True, dtype=torch.float32,
                                                softmax_scale=0.125)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[torch.bfloat16], (kl, nk, q_offset)
        assert torch.allclose(lse, ref_lse, atol=2e-3, rtol=1e-4)
        k[:, :, :nk] = float("nan")
        v[:, :, :nk] = float("nan")
    # A layout that would read past the buffer attends to nothing (no out-of-bounds read).
    layout.copy_(torch.tensor([5000, 64, 10, 16, 5000, capacity + 1]))
    out, lse = torch.ops.unigist.gist_attention_cache_step(q, k, v, layout, cfg.ratio, cfg.window, cfg.num_sink, 0.1)
    torch.cuda.synchronize()
    assert torch.isneginf(lse).all()
