"""CUDA gist attention kernels (csrc/cuda/attention_*.cu) against the dense
float64 reference. Every test needs a GPU and a CUDA build (see conftest.py)."""

import math

import pytest
import torch

import unigist
from unigist import GistConfig, gist_attention
from unigist.reference import gist_attention_reference

from conftest import rel_err

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]
# ||kernel - fp64 reference|| / ||reference|| bounds. bf16 has an 8-bit mantissa
# (rounding 2^-9 = 2e-3 per element, P and dS are rounded to it too).
FWD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
BWD_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}

# (q_len, k_len, q_offset, ratio, window, num_sink): odd lengths, N shorter than
# the window, sinks 0 / tile-aligned / not aligned, every ratio, query chunks.
CASES = [
    (1, 1, 0, 4, 16, 0),
    (77, 77, 0, 1, 8, 3),
    (77, 77, 0, 2, 1024, 0),  # N < window
    (1000, 1000, 0, 4, 64, 5),
    (1000, 1000, 0, 8, 200, 64),
    (2053, 2053, 0, 4, 256, 128),
    (2053, 2053, 0, 8, 100, 77),
    (700, 700, 0, 1, 2, 0),  # smallest window (> ratio): gists + diagonal + one
    (130, 1030, 900, 4, 128, 9),  # chunk of queries over a longer key sequence
    (1, 1500, 1499, 2, 300, 40),  # a decode step
    (100, 1200, 1000, 4, 64, 16),  # keys past the last query
]


# Layouts that cut the wgmma dK/dV kernel's 128-key blocks (two consumers of 64
# keys) in every way: sinks ending inside a consumer's keys (200, 77) or on a
# block edge (128), windows not a multiple of the 64-row query tile, every
# ratio, query chunks (q_offset) with keys before the first query's window and
# past the last query, odd lengths.
DKDV_CASES = [
    # (q_len, k_len, q_offset, ratio, window, num_sink)
    (1500, 1500, 0, 4, 100, 200),
    (1337, 1337, 0, 1, 65, 77),
    (1100, 1100, 0, 8, 1024, 128),
    (900, 900, 0, 2, 3, 0),
    (333, 2500, 1900, 4, 130, 3),
    (200, 2000, 1500, 3, 64, 0),
    (2049, 2049, 0, 4, 2000, 200),
]


def _case_id(c):
    return "nq{}_nk{}_off{}_r{}_w{}_s{}".format(*c)


def _inputs(b, hq, hkv, nq, nk, d, dtype, grad=False):
    dev = "cuda"
    q = torch.randn(b, hq, nq, d, device=dev, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hkv, nk, d, device=dev, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, hkv, nk, d, device=dev, dtype=dtype, requires_grad=grad)
    return q, k, v


def _fwd_op(q, k, v, cfg, off, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.unigist.gist_attention_fwd(q, k, v, cfg.ratio, cfg.window, cfg.num_sink, scale, off)


def _reference_grads(q, k, v, dout, cfg, off):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = gist_attention_reference(q64, k64, v64, cfg, q_offset=off, return_lse=True)
    out.backward(dout.double())
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def _check_fwd(q, k, v, cfg, off, tol):
    out, lse = _fwd_op(q, k, v, cfg, off)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, ref_lse = gist_attention_reference(q, k, v, cfg, q_offset=off, return_lse=True)
    err = rel_err(out, ref)
    assert err < tol, err
    lse_err = (lse.double() - ref_lse.double()).abs().max().item()
    assert lse_err < 1e-3, lse_err
    return out, lse


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "gqa4"])
def test_forward_matches_reference(seed, case, d, dtype, heads):
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    q, k, v = _inputs(2, heads[0], heads[1], nq, nk, d, dtype)
    _check_fwd(q, k, v, cfg, off, FWD_TOL[dtype])


# With a single visible key dq and dk are exactly zero, so a relative error is
# meaningless there; test_backward_single_key covers that case.
@pytest.mark.parametrize("case", CASES[1:], ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "gqa4"])
def test_backward_matches_reference(seed, case, d, dtype, heads):
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    q, k, v = _inputs(1, heads[0], heads[1], nq, nk, d, dtype)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    out, lse = _fwd_op(q, k, v, cfg, off)
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
        dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, off
    )
    torch.cuda.synchronize()
    _, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, off)
    for name, got, ref, like in (("dq", dq, rq, q), ("dk", dk, rk, k), ("dv", dv, rv, v)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), name
        err = rel_err(got, ref)
        assert err < BWD_TOL[dtype], (name, err)


@pytest.mark.parametrize("d", [64, 128])
def test_backward_single_key(seed, d):
    """One query over one key: P = 1, so dv = dout and dq = dk = 0 up to the rounding of out."""
    cfg = GistConfig(ratio=4, window=16, num_sink=0)
    q, k, v = _inputs(2, 4, 2, 1, 1, d, torch.bfloat16)
    dout = torch.randn_like(q)
    out, lse = _fwd_op(q, k, v, cfg, 0)
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
        dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, 1 / math.sqrt(d), 0
    )
    assert rel_err(out, v.repeat_interleave(2, dim=1)) < 1e-2
    assert rel_err(dv, dout.float().view(2, 2, 2, 1, d).sum(2)) < 1e-2
    # |dS| = |dout . (v - out)| with out = bf16(v): far below |dout| |k| |v|.
    assert dq.abs().max().item() < 0.05 * dout.abs().max().item() * k.abs().max().item()
    assert dk.abs().max().item() < 0.05 * dout.abs().max().item() * q.abs().max().item() * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_through_gist_attention(seed, dtype):
    cfg = GistConfig(ratio=4, window=96, num_sink=10)
    q, k, v = _inputs(2, 8, 2, 333, 333, 128, dtype, grad=True)
    out = gist_attention(q, k, v, cfg)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, 0)
    assert rel_err(out, ref) < FWD_TOL[dtype]
    for got, want in ((q.grad, rq), (k.grad, rk), (v.grad, rv)):
        assert rel_err(got, want) < BWD_TOL[dtype]


def test_default_config_long(seed):
    """The default layout (r=4, window 1024, 128 sinks) over several tiles of gists."""
    cfg = GistConfig()
    q, k, v = _inputs(1, 2, 1, 4100, 4100, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    out, lse = _check_fwd(q, k, v, cfg, 0, FWD_TOL[torch.bfloat16])
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
        dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, 1 / math.sqrt(128), 0
    )
    _, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, 0)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert rel_err(got, want) < BWD_TOL[torch.bfloat16]


def test_two_calls_different_inputs(seed):
    """A second call on new inputs must not see state of the first (every output element rewritten)."""
    cfg = GistConfig(ratio=2, window=50, num_sink=7)
    outs = []
    for _ in range(2):
        q, k, v = _inputs(1, 4, 2, 515, 515, 64, torch.bfloat16)
        out, lse = _check_fwd(q, k, v, cfg, 0, FWD_TOL[torch.bfloat16])
        outs.append(out)
        del out, lse  # returned to the caching allocator: the next call may reuse it
    assert not torch.equal(outs[0], outs[1])


def test_output_memory_reused_from_nan_buffers(seed):
    """Fill the caching allocator's blocks with NaN, free them, then run: any
    element the kernels fail to write would show up as NaN."""
    cfg = GistConfig(ratio=4, window=64, num_sink=3)
    q, k, v = _inputs(1, 4, 4, 333, 333, 128, torch.float16)
    dout = torch.randn_like(q)
    for _ in range(3):
        junk = [torch.full_like(q, float("nan")) for _ in range(8)]
        junk += [torch.full((1, 4, 333), float("nan"), device="cuda") for _ in range(4)]
        junk += [torch.full((1, 4, 333, 128), float("nan"), device="cuda") for _ in range(4)]
        del junk
        out, lse = _fwd_op(q, k, v, cfg, 0)
        dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
            dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, 1 / math.sqrt(128), 0
        )
        for t in (out, lse, dq, dk, dv):
            assert not torch.isnan(t).any()
    ref = gist_attention_reference(q, k, v, cfg)
    assert rel_err(out, ref) < FWD_TOL[torch.float16]


def test_non_contiguous_inputs(seed):
    cfg = GistConfig(ratio=4, window=40, num_sink=4)
    base = torch.randn(1, 200, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))  # [1, 4, 200, 64], strided
    assert not q.is_contiguous()
    _check_fwd(q, k, v, cfg, 0, FWD_TOL[torch.bfloat16])


def test_misaligned_storage_offset(seed):
    """Contiguous views that start 2 bytes into their storage (not 16-byte aligned)."""
    cfg = GistConfig(ratio=4, window=40, num_sink=4)
    shape = (1, 2, 150, 64)
    n = math.prod(shape)
    q, k, v = (torch.randn(n + 1, device="cuda", dtype=torch.bfloat16)[1:].view(shape) for _ in range(3))
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    out, lse = _check_fwd(q, k, v, cfg, 0, FWD_TOL[torch.bfloat16])
    dout = torch.randn(n + 1, device="cuda", dtype=torch.bfloat16)[1:].view(shape)
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
        dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, 1 / math.sqrt(64), 0
    )
    _, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, 0)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert rel_err(got, want) < BWD_TOL[torch.bfloat16]


def test_cuda_matches_cpu_kernel(seed):
    cfg = GistConfig(ratio=2, window=30, num_sink=5)
    q, k, v = _inputs(1, 4, 2, 150, 150, 64, torch.bfloat16)
    out = _fwd_op(q, k, v, cfg, 0)[0]
    cpu = _fwd_op(q.cpu().float(), k.cpu().float(), v.cpu().float(), cfg, 0)[0]
    assert rel_err(out.cpu(), cpu) < FWD_TOL[torch.bfloat16]


def _bad(fn):
    # TORCH_CHECK raises RuntimeError; TORCH_CHECK_VALUE (ratio, window, q_offset, scale) ValueError.
    with pytest.raises((RuntimeError, ValueError)):
        fn()
    torch.cuda.synchronize()


def test_bad_inputs_raise():
    cfg = GistConfig()
    q, k, v = _inputs(1, 4, 2, 10, 10, 64, torch.bfloat16)
    _bad(lambda: _fwd_op(q.float(), k.float(), v.float(), cfg, 0))  # float32 on CUDA
    q96, k96, v96 = _inputs(1, 4, 2, 10, 10, 96, torch.bfloat16)
    _bad(lambda: _fwd_op(q96, k96, v96, cfg, 0))  # head dim 96
    _bad(lambda: _fwd_op(q, k.cpu(), v, cfg, 0))  # device mix
    q3, _, _ = _inputs(1, 3, 2, 10, 10, 64, torch.bfloat16)
    _bad(lambda: _fwd_op(q3, k, v, cfg, 0))  # 3 q heads over 2 kv heads
    _bad(lambda: _fwd_op(q, k, v, cfg, 5))  # keys do not cover q_offset + q_len
    _bad(lambda: _fwd_op(q[0], k[0], v[0], cfg, 0))  # rank 3
    _bad(lambda: _fwd_op(q, k.half(), v, cfg, 0))  # dtype mix
    _bad(lambda: torch.ops.unigist.gist_attention_fwd(q, k, v, 0, 16, 0, 0.125, 0))  # ratio 0
    out, lse = _fwd_op(q, k, v, cfg, 0)
    _bad(
        lambda: torch.ops.unigist.gist_attention_bwd(
            q, q, k, v, out, lse[:, :, :5], cfg.ratio, cfg.window, cfg.num_sink, 0.125, 0
        )
    )  # lse shape
    _bad(
        lambda: torch.ops.unigist.gist_attention_bwd(
            q, q, k, v, out, lse.double(), cfg.ratio, cfg.window, cfg.num_sink, 0.125, 0
        )
    )  # lse dtype


# ---- both forward kernels: wgmma (sm_90a) and mma.sync -------------------
# gist_attention_fwd runs the wgmma kernel on a compute-capability 9.0 GPU
# unless UNIGIST_FORCE_SM80=1 (read on every call); the tests above run
# whichever is the default, these run each explicitly. The wgmma kernel has two
# tile shapes at D=64 (UNIGIST_SM90_FWD_CONSUMERS: 2 consumer warpgroups x 64
# rows, or 3), and so has the wgmma dQ kernel (UNIGIST_SM90_DQ_CONSUMERS);
# "sm90x2" and "sm90x3" run each (at D=128 they are the same).


def _select_path(path, monkeypatch):
    monkeypatch.setenv("UNIGIST_FORCE_SM80", "1" if path == "sm80" else "0")
    for var in ("UNIGIST_SM90_FWD_CONSUMERS", "UNIGIST_SM90_DQ_CONSUMERS"):
        monkeypatch.setenv(var, "3" if path == "sm90x3" else "2")
    arch = torch.ops.unigist.gist_attention_fwd_arch(torch.empty(1, device="cuda"))
    if path == "sm80":
        assert arch == 80
    elif torch.cuda.get_device_capability() != (9, 0):
        assert arch == 80
        pytest.skip("the wgmma forward needs a compute-capability 9.0 GPU")
    else:
        assert arch == 90, "cc 9.0 GPU but no sm_90a kernel in this build (TORCH_CUDA_ARCH_LIST without 9.0a?)"
    return path


@pytest.fixture(params=["sm90x2", "sm90x3", "sm80"])
def fwd_path(request, monkeypatch):
    return _select_path(request.param, monkeypatch)


@pytest.fixture(params=["sm90x2", "sm90x3", "sm80"])
def bwd_path(request, monkeypatch):
    return _select_path(request.param, monkeypatch)


def _poison_allocator(*shapes, dtype):
    """Fill the caching allocator's free blocks with NaN so that an output
    element a kernel fails to write shows up."""
    junk = [torch.full(s, float("nan"), device="cuda", dtype=dtype) for s in shapes for _ in range(3)]
    junk += [torch.full(s[:3], float("nan"), device="cuda") for s in shapes for _ in range(3)]
    del junk


def _ops_per_setting(monkeypatch, var, modes, q, k, v, dout, cfg, scale, off):
    """{mode: (out, lse, dq, dk, dv)} of the forward and backward ops with environment
    variable `var` (a kernel-choice switch) set to each mode, each on a NaN-poisoned
    allocator."""
    got = {}
    for mode in modes:
        monkeypatch.setenv(var, mode)
        _poison_allocator(q.shape, k.shape, dtype=q.dtype)
        out, lse = torch.ops.unigist.gist_attention_fwd(q, k, v, cfg.ratio, cfg.window, cfg.num_sink, scale, off)
        grads = torch.ops.unigist.gist_attention_bwd(
            dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, off
        )
        got[mode] = (out, lse, *grads)
    torch.cuda.synchronize()
    return got


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_paths_match_reference(seed, fwd_path, case, d, dtype):
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    q, k, v = _inputs(2, 4, 2, nq, nk, d, dtype)  # GQA group 2
    _poison_allocator(q.shape, dtype=dtype)
    _check_fwd(q, k, v, cfg, off, FWD_TOL[dtype])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_paths_long(seed, fwd_path, d, dtype):
    """Default layout over many key blocks of every kind (sinks, packed gists,
    window), a query chunk with q_offset, odd lengths, GQA 4."""
    cfg = GistConfig()
    q, k, v = _inputs(1, 4, 1, 1531, 5003, d, dtype)
    _poison_allocator(q.shape, dtype=dtype)
    _check_fwd(q, k, v, cfg, 5003 - 1531, FWD_TOL[dtype])


@pytest.mark.parametrize("scale", [0.3, 0.05])
@pytest.mark.parametrize("d", [64, 128])
def test_forward_paths_custom_scale(seed, fwd_path, scale, d):
    """A softmax_scale other than 1/sqrt(D) is folded into the exponent."""
    cfg = GistConfig(ratio=4, window=64, num_sink=8)
    q, k, v = _inputs(1, 2, 2, 300, 300, d, torch.bfloat16)
    _poison_allocator(q.shape, dtype=q.dtype)
    out, lse = _fwd_op(q, k, v, cfg, 0, scale=scale)
    ref, ref_lse = gist_attention_reference(q, k, v, cfg, softmax_scale=scale, return_lse=True)
    assert rel_err(out, ref) < FWD_TOL[torch.bfloat16]
    assert (lse - ref_lse).abs().max().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_paths_growing_scores(seed, fwd_path, dtype):
    """Key norms growing 60x along the sequence: a row's running max grows by
    many units of 2^8 over its key blocks, so every online-softmax rescale path
    (including the wgmma forward's lazy max) is taken."""
    cfg = GistConfig(ratio=4, window=256, num_sink=16)
    q, k, v = _inputs(1, 4, 2, 1500, 1500, 128, dtype)
    ramp = torch.linspace(0.1, 6.0, k.shape[2], device=k.device, dtype=torch.float32)
    k = (k.float() * ramp[:, None]).to(dtype)
    _poison_allocator(q.shape, dtype=dtype)
    _check_fwd(q, k, v, cfg, 0, FWD_TOL[dtype])


def test_forward_paths_agree(seed, monkeypatch):
    """The two kernels on the same inputs: equal up to bf16 rounding of P."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute-capability 9.0 GPU")
    cfg = GistConfig(ratio=4, window=256, num_sink=64)
    q, k, v = _inputs(1, 8, 2, 3001, 3001, 128, torch.bfloat16)
    monkeypatch.setenv("UNIGIST_FORCE_SM80", "1")
    out80, lse80 = _fwd_op(q, k, v, cfg, 0)
    monkeypatch.setenv("UNIGIST_FORCE_SM80", "0")
    out90, lse90 = _fwd_op(q, k, v, cfg, 0)
    assert rel_err(out90, out80) < 5e-3
    assert (lse90 - lse80).abs().max().item() < 1e-3


# ---- both backward paths: wgmma (sm_90a) and mma.sync ---------------------
# gist_attention_bwd takes the wgmma dQ and dK/dV kernels on the forward's
# condition (UNIGIST_FORCE_SM80, read on every call); delta and the group
# reduction are shared. These tests run every backward case on each path.


def _check_bwd(q, k, v, cfg, off, tol, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn_like(q)
    out, lse = _fwd_op(q, k, v, cfg, off, scale=scale)
    _poison_allocator(q.shape, k.shape, dtype=q.dtype)
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(
        dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, off
    )
    torch.cuda.synchronize()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = gist_attention_reference(q64, k64, v64, cfg, q_offset=off, softmax_scale=scale)
    ref.backward(dout.double())
    for name, got, want, like in (("dq", dq, q64.grad, q), ("dk", dk, k64.grad, k), ("dv", dv, v64.grad, v)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), name
        if want.abs().max().item() == 0:  # softmax_scale 0 gives dq = dk = 0 exactly
            assert got.abs().max().item() == 0, name
        else:
            err = rel_err(got, want)
            assert err < tol, (name, err)


# Group 1 (one query head per key head) and GQA take different epilogues: the
# dense dK/dV pass writes the input dtype directly, or fp32 per query head
# summed by reduce_group_kernel.
@pytest.mark.parametrize("hkv", [4, 2], ids=["group1", "group2"])
@pytest.mark.parametrize("case", CASES[1:] + DKDV_CASES, ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_paths_match_reference(seed, bwd_path, case, d, dtype, hkv):
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    q, k, v = _inputs(1, 4, hkv, nq, nk, d, dtype)
    _check_bwd(q, k, v, cfg, off, BWD_TOL[dtype])


@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["group1", "group4"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_paths_long(seed, bwd_path, d, dtype, heads):
    """Default layout over many key blocks of every kind, a query chunk with
    q_offset, odd lengths; group 1 and GQA 4."""
    q, k, v = _inputs(1, *heads, 1531, 5003, d, dtype)
    _check_bwd(q, k, v, GistConfig(), 5003 - 1531, BWD_TOL[dtype])


@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0, float("nan"), float("inf")])
def test_raw_ops_refuse_non_positive_scale(scale):
    """The raw ops, like the CPU ones, take only a finite positive softmax_scale."""
    cfg = GistConfig(ratio=4, window=64, num_sink=8)
    q, k, v = _inputs(1, 2, 2, 64, 64, 64, torch.bfloat16)
    out, lse = _fwd_op(q, k, v, cfg, 0, scale=0.125)
    if scale > 0 and math.isfinite(scale):
        _fwd_op(q, k, v, cfg, 0, scale=scale)
        return
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive"):
        _fwd_op(q, k, v, cfg, 0, scale=scale)
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive"):
        torch.ops.unigist.gist_attention_bwd(out, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, 0)


@pytest.mark.parametrize("scale", [0.3, 0.05])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_paths_custom_scale(seed, bwd_path, scale, d):
    q, k, v = _inputs(1, 2, 2, 300, 300, d, torch.bfloat16)
    _check_bwd(q, k, v, GistConfig(ratio=4, window=64, num_sink=8), 0, BWD_TOL[torch.bfloat16], scale=scale)


def _bwd_both_paths(q, k, v, cfg, off, monkeypatch, scale=None):
    """gist_attention_bwd on the same inputs (same out and lse) on both paths."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn_like(q)
    out, lse = _fwd_op(q, k, v, cfg, off, scale=scale)
    grads = {}
    for path in ("1", "0"):
        monkeypatch.setenv("UNIGIST_FORCE_SM80", path)
        _poison_allocator(q.shape, k.shape, dtype=q.dtype)
        grads[path] = torch.ops.unigist.gist_attention_bwd(
            dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, off
        )
    torch.cuda.synchronize()
    return grads["1"], grads["0"]


def test_backward_paths_agree(seed, monkeypatch):
    """The two backward paths on the same inputs: dq, dk, dv equal up to
    rounding (fp32 sums in another order, then fp16)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute-capability 9.0 GPU")
    cfg = GistConfig(ratio=4, window=256, num_sink=64)
    q, k, v = _inputs(1, 8, 2, 3001, 3001, 128, torch.float16)
    (dq80, dk80, dv80), (dq90, dk90, dv90) = _bwd_both_paths(q, k, v, cfg, 0, monkeypatch)
    assert rel_err(dq90, dq80) < 2e-3
    assert rel_err(dk90, dk80) < 2e-3 and rel_err(dv90, dv80) < 2e-3


@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["group1", "group4"])
@pytest.mark.parametrize("case", DKDV_CASES, ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
def test_dkdv_paths_agree(seed, monkeypatch, case, d, heads):
    """wgmma vs mma.sync dQ, dK and dV on the same inputs, fp16 (rounding 5e-4):
    a pair counted twice or left out by one partition shows as a large
    difference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute-capability 9.0 GPU")
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    q, k, v = _inputs(2, *heads, nq, nk, d, torch.float16)  # batch 2
    (dq80, dk80, dv80), (dq90, dk90, dv90) = _bwd_both_paths(q, k, v, cfg, off, monkeypatch)
    for name, a, b in (("dq", dq90, dq80), ("dk", dk90, dk80), ("dv", dv90, dv80)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-3, (name, rel_err(a, b))
        # row by row: a single key's error would vanish in the norm of the whole
        row = (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-3)
        assert row.max().item() < 2e-2, (name, row.max().item(), row.argmax().item())


@pytest.mark.parametrize("scale", [0.3, 0.05])
def test_dkdv_paths_agree_scale(seed, monkeypatch, scale):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute-capability 9.0 GPU")
    cfg = GistConfig(ratio=4, window=96, num_sink=40)
    q, k, v = _inputs(1, 2, 2, 700, 700, 128, torch.float16)
    (_, dk80, dv80), (_, dk90, dv90) = _bwd_both_paths(q, k, v, cfg, 0, monkeypatch, scale=scale)
    assert rel_err(dv90, dv80) < 2e-3
    assert rel_err(dk90, dk80) < 2e-3


# By default q, k, v and dout are read in place through their strides;
# UNIGIST_CUDA_STRIDED=0 copies them to contiguous tensors first. Same kernels
# and the same values, so the outputs must be bitwise equal.
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["hf", "buffer", "misaligned"])
def test_strided_inputs_read_in_place(seed, fwd_path, monkeypatch, d, dtype, layout):
    cfg = GistConfig(ratio=4, window=100, num_sink=16)
    b, hq, hkv, n, off = 2, 4, 2, 333, 0
    dev = "cuda"
    if layout == "hf":  # HF's [B, N, H, D] projections transposed to [B, H, N, D]
        q = torch.randn(b, n, hq, d, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, n, hkv, d, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, n, hkv, d, device=dev, dtype=dtype).transpose(1, 2)
        dout = torch.randn(b, n, hq, d, device=dev, dtype=dtype).transpose(1, 2)
    elif layout == "buffer":  # keys: the first n rows of a [B, H, capacity, D] buffer
        q = torch.randn(b, hq, n, d, device=dev, dtype=dtype)
        k = torch.randn(b, hkv, n + 40, d, device=dev, dtype=dtype)[:, :, :n]
        v = torch.randn(b, hkv, n + 40, d, device=dev, dtype=dtype)[:, :, :n]
        dout = torch.randn(b, hq, n, d + 8, device=dev, dtype=dtype)[..., :d]
    else:  # rows not 16-byte aligned: copied either way
        q = torch.randn(b, n, hq, d + 1, device=dev, dtype=dtype)[..., 1:].transpose(1, 2)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
        v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
        dout = torch.randn(b, hq, n, d, device=dev, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    got = _ops_per_setting(monkeypatch, "UNIGIST_CUDA_STRIDED", ("0", "1"), q, k, v, dout, cfg, scale, off)
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), got["0"], got["1"]):
        assert torch.equal(a, c), name
    # As the fake kernel's outputs: out and lse contiguous, the gradients laid
    # out like q, k, v (transposed for "hf").
    assert got["1"][0].is_contiguous() and got["1"][1].is_contiguous()
    for name, g, like in zip(("dq", "dk", "dv"), got["1"][2:], (q, k, v)):
        assert g.stride() == torch.empty_like(like).stride(), name
        if layout == "hf":
            assert not g.is_contiguous(), name
    ref = gist_attention_reference(q, k, v, cfg)
    assert rel_err(got["1"][0], ref) < FWD_TOL[dtype]


# UNIGIST_SM90_TMA=1 loads the K/V blocks of the wgmma forward and dQ kernels,
# and the Q/dO steps of the dK/dV kernel, through tensor maps instead of
# cp.async gathers. Every key a row sees reaches shared memory with the same
# value; rows past a block's end are real keys (or zeros past the tensor)
# instead of zeros, and masked. So the outputs must be bitwise equal. In
# "buffer" q, k, v and dout are the first rows of longer buffers whose other
# rows are NaN: a load past the last row would show.
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("layout", ["bhnd", "hf", "buffer"])
@pytest.mark.parametrize("path", ["sm90x2", "sm90x3"])
def test_tma_loads_equal_cp_async(seed, monkeypatch, capfd, case, d, layout, path):
    _select_path(path, monkeypatch)
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    b, hq, hkv, dtype, dev = 2, 4, 2, torch.bfloat16, "cuda"
    if layout == "hf":
        q = torch.randn(b, nq, hq, d, device=dev, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(b, nk, hkv, d, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2))
        dout = torch.randn(b, nq, hq, d, device=dev, dtype=dtype).transpose(1, 2)
    else:
        q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype)
        dout = torch.randn(b, hq, nq, d, device=dev, dtype=dtype)
        if layout == "buffer":
            def narrowed(t):
                buf = torch.full((*t.shape[:2], t.shape[2] + 300, d), float("nan"), device=dev, dtype=dtype)
                buf[:, :, : t.shape[2]] = t
                return buf[:, :, : t.shape[2]]

            q, k, v, dout = (narrowed(t) for t in (q, k, v, dout))
    scale = 1.0 / math.sqrt(d)
    got = _ops_per_setting(monkeypatch, "UNIGIST_SM90_TMA", ("0", "1"), q, k, v, dout, cfg, scale, off)
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), got["0"], got["1"]):
        assert torch.equal(a, c), name
    assert "cuTensorMapEncodeTiled failed" not in capfd.readouterr().err
    ref = gist_attention_reference(q, k, v, cfg, q_offset=off)
    assert rel_err(got["1"][0], ref) < FWD_TOL[dtype]
    for g in got["1"][2:]:
        assert torch.isfinite(g).all()


# The wgmma dK/dV kernel's dense pass runs persistent by default (and its gist
# pass too with UNIGIST_SM90_PERSISTENT=dense+gist): a grid of CTAs takes the
# pass's key blocks in order from a counter, each CTA looping over many, with
# the next block's K/V loaded while the last one finishes. Every block computes
# what a CTA of its own computes, so the gradients must be bitwise those of
# UNIGIST_SM90_PERSISTENT=0 with the blocks in their former order (every head's
# block b, then b + 1: UNIGIST_SM90_DKDV_ORDER=heads). Grids of 1 and 3 CTAs
# make every CTA loop over many blocks of both passes (and of several heads)
# even on these small inputs; "sms" is the default grid, one CTA per SM, which
# the 3001-row case (192 dense-pass blocks) fills.
@pytest.mark.parametrize("case", CASES + [(3001, 3001, 0, 4, 256, 16)], ids=_case_id)
@pytest.mark.parametrize("hkv", [4, 2], ids=["group1", "group2"])
@pytest.mark.parametrize("grid", ["1", "3", "sms"])
@pytest.mark.parametrize("tma", ["0", "1"])
def test_persistent_dkdv_equals_one_cta_per_block(seed, monkeypatch, case, hkv, grid, tma):
    _select_path("sm90x2", monkeypatch)
    monkeypatch.setenv("UNIGIST_SM90_TMA", tma)
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    b, hq, d, dtype = 2, 4, 128, torch.bfloat16
    if grid == "sms":
        monkeypatch.delenv("UNIGIST_SM90_PERSISTENT_GRID", raising=False)
    else:
        monkeypatch.setenv("UNIGIST_SM90_PERSISTENT_GRID", grid)
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.unigist.gist_attention_fwd(q, k, v, cfg.ratio, cfg.window, cfg.num_sink, scale, off)
    got = {}
    modes = ("0", "1", "dense+gist")  # none; the default (dense pass); both passes
    for mode in modes:
        monkeypatch.setenv("UNIGIST_SM90_PERSISTENT", mode)
        monkeypatch.setenv("UNIGIST_SM90_DKDV_ORDER", "heads" if mode == "0" else "blocks")
        _poison_allocator(q.shape, k.shape, dtype=dtype)
        got[mode] = torch.ops.unigist.gist_attention_bwd(
            dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink, scale, off
        )
    torch.cuda.synchronize()
    for mode in modes[1:]:
        for name, a, c in zip(("dq", "dk", "dv"), got["0"], got[mode]):
            assert torch.equal(a, c), (mode, name)
    if 1 < nk and nq * nk <= 1500 * 1500:  # one key: dq = dk = 0, no relative error
        _, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, off)
        for name, g, want in zip(("dq", "dk", "dv"), got["1"], (rq, rk, rv)):
            assert rel_err(g, want) < BWD_TOL[dtype], name


# UNIGIST_SM90_PINGPONG=fwd+dq: the wgmma forward's and dQ kernel's consumer
# warpgroups take turns issuing their GEMMs (sm90::ConsumerTurns, named
# barriers). Only the order in which the consumers issue changes, not what each
# computes, so out, lse and the gradients must be bitwise those of free-running
# consumers (a turn taken twice or never would hang or race instead).
@pytest.mark.parametrize("case", CASES + [(3001, 3001, 0, 4, 256, 16)], ids=_case_id)
@pytest.mark.parametrize("path_d", [("sm90x2", 64), ("sm90x2", 128), ("sm90x3", 64)], ids=lambda x: f"{x[0]}-d{x[1]}")
def test_consumer_turns_equal_free_drift(seed, monkeypatch, case, path_d):
    path, d = path_d
    _select_path(path, monkeypatch)
    nq, nk, off, r, w, s = case
    cfg = GistConfig(ratio=r, window=w, num_sink=s)
    b, hq, hkv, dtype = 2, 4, 2, torch.bfloat16
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dtype)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(d)
    got = _ops_per_setting(monkeypatch, "UNIGIST_SM90_PINGPONG", ("0", "fwd+dq"), q, k, v, dout, cfg, scale, off)
    for name, a, c in zip(("out", "lse", "dq", "dk", "dv"), got["0"], got["fwd+dq"]):
        assert torch.equal(a, c), name
    if nq * nk <= 1500 * 1500:
        ref, _, rq, _, _ = _reference_grads(q, k, v, dout, cfg, off)
        assert rel_err(got["fwd+dq"][0], ref) < FWD_TOL[dtype]
        if 1 < nk:  # one key: dq = 0, no relative error
            assert rel_err(got["fwd+dq"][2], rq) < BWD_TOL[dtype]


@pytest.mark.parametrize("hkv", [4, 2], ids=["group1", "group2"])
def test_hf_layout_backward_copies_nothing(seed, hkv):
    """HF hands attention transposed views of [B, N, H, D] projections. The
    gradients come back laid out like them, so autograd passes them through the
    views to the [B, N, H, D] leaves without a copy (as SDPA's backward), and
    the leaves' grads are the reference's."""
    cfg = GistConfig(ratio=4, window=100, num_sink=16)
    b, hq, n, d = 2, 4, 333, 64
    leaves = [
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv)
    ]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    dout = torch.randn(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    out = gist_attention(q, k, v, cfg)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(dout)
        torch.cuda.synchronize()
    copies = {e.name for e in prof.events()} & {"aten::contiguous", "aten::clone", "aten::copy_"}
    assert not copies, f"the backward copied: {copies}"
    _, _, rq, rk, rv = _reference_grads(q.detach(), k.detach(), v.detach(), dout, cfg, 0)
    for leaf, want in zip(leaves, (rq, rk, rv)):
        assert leaf.grad.is_contiguous()  # the leaf's own layout, [B, N, H, D]
        assert rel_err(leaf.grad.transpose(1, 2), want) < BWD_TOL[torch.bfloat16]


@pytest.mark.parametrize("hkv", [4, 1], ids=["group1", "group4"])
@pytest.mark.parametrize("d", [64, 128])
def test_concurrent_dq_equals_sequential(seed, monkeypatch, hkv, d):
    """UNIGIST_CUDA_CONCURRENT_DQ=1 runs the dQ kernel on a second stream beside
    dK/dV: the same kernels on the same inputs, so bitwise the same gradients;
    and the fork / join is captured by a CUDA graph whose replays give them
    again for new inputs written into its static tensors."""
    cfg = GistConfig(ratio=4, window=100, num_sink=16)
    b, hq, n = 2, 4, 777
    q = torch.randn(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    dout = torch.randn_like(q)
    scale = 1 / math.sqrt(d)
    out, lse = _fwd_op(q, k, v, cfg, 0, scale=scale)

    def bwd():
        return torch.ops.unigist.gist_attention_bwd(dout, q, k, v, out, lse, cfg.ratio, cfg.window, cfg.num_sink,
                                                    scale, 0)

    monkeypatch.setenv("UNIGIST_CUDA_CONCURRENT_DQ", "0")
    want = bwd()
    monkeypatch.setenv("UNIGIST_CUDA_CONCURRENT_DQ", "1")
    _poison_allocator(q.shape, k.shape, dtype=q.dtype)
    got = bwd()
    torch.cuda.synchronize()
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert a.stride() == w.stride() and torch.equal(a, w), name

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bwd()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = bwd()
    for t in (q, k, v, dout):
        t.copy_(torch.randn_like(t))
    new_out, new_lse = _fwd_op(q, k, v, cfg, 0, scale=scale)
    out.copy_(new_out)
    lse.copy_(new_lse)
    graph.replay()
    monkeypatch.setenv("UNIGIST_CUDA_CONCURRENT_DQ", "0")
    fresh = bwd()
    torch.cuda.synchronize()
    for name, a, w in zip(("dq", "dk", "dv"), captured, fresh):
        assert torch.equal(a, w), name
    _, _, rq, rk, rv = _reference_grads(q, k, v, dout, cfg, 0)
    for name, a, w in zip(("dq", "dk", "dv"), captured, (rq, rk, rv)):
        assert rel_err(a, w) < BWD_TOL[torch.bfloat16], name
