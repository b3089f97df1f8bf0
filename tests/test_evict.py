"""unigist::evict_kv (in-place KV eviction) against a pure-PyTorch reference of
layout::keep_for_future, on CPU and (marked `cuda`) on the GPU."""

import random

import pytest
import torch

import unigist  # noqa: F401
from unigist import GistConfig
from unigist.cache import GistCache, evict_kv

CONFIGS = [
    GistConfig(ratio=1, window=2, num_sink=0),
    GistConfig(ratio=2, window=5, num_sink=3),
    GistConfig(ratio=4, window=16, num_sink=4),
    GistConfig(ratio=3, window=100, num_sink=0),
    GistConfig(ratio=8, window=9, num_sink=50),
]


def keep_reference(positions: torch.Tensor, next_query: int, cfg: GistConfig) -> torch.Tensor:
    """Pure-PyTorch keep_for_future (written out here, independent of unigist.layout)."""
    p = positions.long()
    return (p < cfg.num_sink) | (p % (cfg.ratio + 1) == cfg.ratio) | (next_query - p < cfg.window)


def make_case(b, h, cap, d, length, dtype, device, sorted_positions=True):
    key = torch.randn(b, h, cap, d, dtype=torch.float32).to(dtype).to(device)
    value = torch.randn(b, h, cap, d, dtype=torch.float32).to(dtype).to(device)
    if sorted_positions:  # like a real cache: increasing, with holes
        pos = torch.randperm(4 * cap)[:cap].sort().values
    else:
        pos = torch.randint(0, 4 * cap, (cap,))
    positions = pos.to(device)
    # Rows past `length` are garbage: poison them so a kernel reading them shows.
    if length < cap:
        key[:, :, length:] = float("nan")
        value[:, :, length:] = float("nan")
        positions[length:] = -12345
    return key, value, positions


def check_against_reference(key, value, positions, length, next_query, cfg):
    k0, v0, p0 = key.clone(), value.clone(), positions.clone()
    keep = keep_reference(p0[:length].cpu(), next_query, cfg).nonzero().flatten().to(key.device)
    kept = evict_kv(key, value, positions, length, next_query, cfg)
    assert isinstance(kept, int)
    assert kept == keep.numel()
    assert torch.equal(positions[:kept], p0[keep])
    assert torch.equal(key[:, :, :kept], k0[:, :, keep])
    assert torch.equal(value[:, :, :kept], v0[:, :, keep])
    return kept


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evict_cpu_matches_reference(cfg, dtype, seed):
    rng = random.Random(seed)
    for _ in range(4):
        cap = rng.randint(1, 90)
        length = rng.randint(0, cap)
        key, value, positions = make_case(
            rng.randint(1, 2), rng.randint(1, 3), cap, rng.choice([1, 8, 16]), length, dtype, "cpu",
            sorted_positions=rng.random() < 0.7,
        )
        next_query = rng.randint(0, 4 * cap + cfg.window)
        check_against_reference(key, value, positions, length, next_query, cfg)


def test_evict_cpu_noncontiguous(seed):
    cfg = GistConfig(ratio=2, window=4, num_sink=2)
    base = torch.randn(2, 40, 3, 8)  # [B, C, H, D] storage, viewed as [B, H, C, D]
    key = base.transpose(1, 2)
    value = torch.randn(2, 3, 8, 40)[..., :].transpose(2, 3)  # strided last dim
    positions = torch.arange(0, 80, 2)
    check_against_reference(key, value, positions, 35, 60, cfg)


def test_evict_nothing_and_everything():
    cfg = GistConfig(ratio=4, window=8, num_sink=2)
    key, value = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    positions = torch.arange(20)
    assert evict_kv(key, value, positions, 20, 9, cfg) == 20  # 9 - p < 8 for every non-sink p
    assert torch.equal(positions, torch.arange(20))
    assert evict_kv(key, value, positions, 0, 1000, cfg) == 0
    kept = check_against_reference(key, value, positions, 20, 1000, cfg)
    assert kept == 2 + 4  # sinks 0,1 and gists 4,9,14,19


def test_evict_matches_gist_cache_arithmetic():
    """Streamed like generation does: the op's count equals the layout arithmetic."""
    cfg = GistConfig(ratio=3, window=7, num_sink=3)
    cache = GistCache(cfg, num_layers=1, eviction="strict", explicit_layout=True)  # no model: no attention
    seen = 0
    for n in [5, 1, 1, 9, 2, 1, 30, 1, 1, 1]:
        cache.update(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4), 0)
        seen += n
        layer = cache.layers[0]
        expected = keep_reference(torch.arange(seen - n), seen - n, cfg).sum().item() + n
        assert layer.length == expected
        pos = layer.positions.tolist()
        want = [p for p in range(seen - n) if keep_reference(torch.tensor([p]), seen - n, cfg)] + list(
            range(seen - n, seen)
        )
        assert pos == want


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(key=a["key"][0]), "4-D"),
        (lambda a: a.update(positions=a["positions"].int()), "int64"),
        (lambda a: a.update(positions=a["positions"][:-1]), "capacity"),
        (lambda a: a.update(positions=a["positions"][None]), "1-D"),
        (lambda a: a.update(value=a["value"][:, :, :-1]), "shapes differ"),
        (lambda a: a.update(value=a["value"].double()), "dtype"),
        (lambda a: a.update(length=11), "length"),
        (lambda a: a.update(length=-1), "length"),
        (lambda a: a.update(next_query=-1), "next_query"),
    ],
)
def test_evict_bad_inputs(mutate, message):
    args = dict(
        key=torch.randn(1, 2, 10, 4), value=torch.randn(1, 2, 10, 4), positions=torch.arange(10), length=10,
        next_query=10,
    )
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        evict_kv(args["key"], args["value"], args["positions"], args["length"], args["next_query"],
                 GistConfig(ratio=2, window=3, num_sink=1))


def test_evict_bad_layout_args():
    k, v, p = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), torch.arange(4)
    with pytest.raises(ValueError, match="ratio"):
        torch.ops.unigist.evict_kv(k, v, p, 4, 0, 3, 1, 4)
    with pytest.raises(ValueError, match="window"):
        torch.ops.unigist.evict_kv(k, v, p, 4, 2, 0, 1, 4)
    with pytest.raises(TypeError):
        evict_kv(k, v, p, 4, 4, config=None)


def test_evict_fake_returns_dynamic_size():
    """With a `-> SymInt` schema the fake kernel hands tracing an unbacked size
    (the real kernel would return a concrete 10 on these inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    entry = torch._library.simple_registry.singleton.find("unigist::evict_kv")
    assert entry.fake_impl.kernel is not None
    with FakeTensorMode(shape_env=ShapeEnv()):
        k, v = torch.empty(1, 2, 10, 4), torch.empty(1, 2, 10, 4)
        p = torch.empty(10, dtype=torch.long)
        n = torch.ops.unigist.evict_kv(k, v, p, 10, 2, 3, 1, 10)
    assert isinstance(n, torch.SymInt)


def test_evict_opcheck_schema():
    args = (torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.arange(10), 10, 2, 3, 1, 10)
    torch.library.opcheck(torch.ops.unigist.evict_kv.default, args, test_utils=("test_schema",))


# ----------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_evict_cuda_matches_reference(cfg, dtype, seed):
    rng = random.Random(seed)
    for _ in range(4):
        cap = rng.randint(1, 3000)
        length = rng.randint(0, cap)
        key, value, positions = make_case(
            rng.randint(1, 2), rng.randint(1, 4), cap, rng.choice([1, 3, 64, 128]), length, dtype, "cuda",
            sorted_positions=rng.random() < 0.7,
        )
        next_query = rng.randint(0, 4 * cap + cfg.window)
        check_against_reference(key, value, positions, length, next_query, cfg)


@pytest.mark.cuda
def test_evict_cuda_equals_cpu_large(seed):
    cfg = GistConfig(ratio=4, window=1024, num_sink=128)
    cap = 40000
    key, value, positions = make_case(1, 8, cap, 128, 39000, torch.bfloat16, "cuda")
    kc, vc, pc = key.cpu(), value.cpu(), positions.cpu()
    nq = int(positions[38999]) + 1
    n_gpu = evict_kv(key, value, positions, 39000, nq, cfg)
    n_cpu = evict_kv(kc, vc, pc, 39000, nq, cfg)
    assert n_gpu == n_cpu
    assert torch.equal(positions[:n_gpu].cpu(), pc[:n_cpu])
    assert torch.equal(key[:, :, :n_gpu].cpu(), kc[:, :, :n_cpu])
    assert torch.equal(value[:, :, :n_gpu].cpu(), vc[:, :, :n_cpu])


@pytest.mark.cuda
def test_evict_cuda_noncontiguous_and_side_stream(seed):
    cfg = GistConfig(ratio=2, window=4, num_sink=2)
    key = torch.randn(2, 300, 3, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    value = torch.randn(2, 3, 64, 300, device="cuda", dtype=torch.bfloat16).transpose(2, 3)
    positions = torch.arange(0, 600, 2, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        check_against_reference(key, value, positions, 290, 500, cfg)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_evict_cuda_device_mismatch():
    cfg = GistConfig(ratio=2, window=3, num_sink=1)
    k, v = torch.randn(1, 2, 10, 4, device="cuda"), torch.randn(1, 2, 10, 4, device="cuda")
    with pytest.raises(RuntimeError, match="one device"):
        evict_kv(k, v, torch.arange(10), 10, 10, cfg)
