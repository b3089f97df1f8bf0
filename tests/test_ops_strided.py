"""The gist attention ops with strided (Hugging Face style) inputs, their fake
kernels, float64 precision, double backward, input checks and torch.compile.

The contract tested here: ``gist_attention_fwd`` reads q/k/v of any strides in
place and returns a contiguous ``out`` in q's dtype and a contiguous ``lse``
(float64 for float64 inputs, else float32); ``gist_attention_bwd`` takes
dout/out of any strides and returns dq/dk/dv laid out like q/k/v
(``torch.empty_like``: an HF-style transposed view's gradient has its strides,
so it flows back through the view with no copy); the fake kernels return
exactly that and validate like the real ones.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import unigist
from unigist import GistConfig, gist_attention
from unigist.ops import DOUBLE_BACKWARD_MESSAGE, lse_dtype_for
from unigist.reference import gist_attention_reference

from conftest import rel_err

FWD = torch.ops.unigist.gist_attention_fwd
BWD = torch.ops.unigist.gist_attention_bwd
CFG = GistConfig(ratio=4, window=16, num_sink=3)
COPY_EVENTS = {"aten::contiguous", "aten::clone", "aten::copy_"}


def _hf(b, n, h, d, dtype=torch.float32, scale=1.0):
    """[B, H, N, D] view of a [B, N, H, D] tensor, as HF hands q/k/v to attention."""
    t = torch.randn(b, n, h, d, dtype=dtype) * scale
    return t.transpose(1, 2)


def _layout(layout, b, h, n, d, dtype=torch.float32, scale=1.0):
    if layout == "transposed":
        t = _hf(b, n, h, d, dtype, scale)
        assert t.stride(-1) == 1 and (h == 1 or not t.is_contiguous())
        return t
    if layout == "narrowed":  # the first n rows of a longer buffer: not dense
        return (torch.randn(b, h, n + 5, d, dtype=dtype) * scale)[:, :, :n]
    return torch.randn(b, h, n, d, dtype=dtype) * scale


def _qkv(layout, b=2, hq=4, hkv=2, nq=40, nk=40, d=16, dtype=torch.float32, scale=1.0):
    return (
        _layout(layout, b, hq, nq, d, dtype, scale),
        _layout(layout, b, hkv, nk, d, dtype, scale),
        _layout(layout, b, hkv, nk, d, dtype),
    )


def _ref_grads(q, k, v, dout, cfg, scale=None, q_offset=0):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = gist_attention_reference(q64, k64, v64, cfg, softmax_scale=scale, q_offset=q_offset)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), grads


# ---- HF-style transposed inputs ---------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(50, 50, 0), (20, 64, 44)], ids=["full", "chunk"])
def test_transposed_inputs_match_contiguous_and_reference(seed, dtype, tol, shape):
    nq, nk, off = shape
    b, hq, hkv, d = 2, 4, 2, 32
    bases = [
        torch.randn(b, n, h, d, dtype=dtype, requires_grad=True) for n, h in ((nq, hq), (nk, hkv), (nk, hkv))
    ]
    q, k, v = (t.transpose(1, 2) for t in bases)  # [B, H, N, D], last dim contiguous
    dout = torch.randn(b, nq, hq, d, dtype=dtype).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or dout.is_contiguous())

    out = gist_attention(q, k, v, CFG, q_offset=off)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = gist_attention(qc, kc, vc, CFG, q_offset=off)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout.contiguous())

    ref, ref_grads = _ref_grads(q, k, v, dout, CFG, q_offset=off)
    assert rel_err(out, out_c) < 1e-6, seed
    assert rel_err(out, ref) < tol, seed
    for name, g, gc, rg, like in zip("qkv", grads, grads_c, ref_grads, (q, k, v)):
        assert g.shape == like.shape and g.dtype == dtype, name
        assert rel_err(g, gc) < 1e-6, (name, seed)
        assert rel_err(g, rg) < tol, (name, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_raw_bwd_takes_strided_dout_and_out_returns_grads_like_inputs(seed, dtype):
    q, k, v = _qkv("transposed", d=8, dtype=dtype)
    scale = 8**-0.5
    out, lse = FWD(q, k, v, 2, 5, 1, scale, 0)
    assert out.is_contiguous() and lse.is_contiguous()
    assert lse.dtype == lse_dtype_for(dtype) and lse.shape == q.shape[:3]
    dout = _hf(2, 40, 4, 8, dtype)
    out_t = out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
    assert not out_t.is_contiguous()
    dq, dk, dv = BWD(dout, q, k, v, out_t, lse, 2, 5, 1, scale, 0)
    dq_c, dk_c, dv_c = BWD(dout.contiguous(), q, k, v, out, lse, 2, 5, 1, scale, 0)
    for g, gc, like in ((dq, dq_c, q), (dk, dk_c, k), (dv, dv_c, v)):
        assert g.stride() == gc.stride() == like.stride() and not g.is_contiguous()
        assert g.shape == like.shape and g.dtype == dtype
        assert rel_err(g, gc) < 1e-6
    _, ref_grads = _ref_grads(q, k, v, dout, GistConfig(ratio=2, window=5, num_sink=1), scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for g, rg in zip((dq, dk, dv), ref_grads):
        assert rel_err(g, rg) < tol, seed


def _copy_events(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()} & COPY_EVENTS


def test_profiler_sees_copies():
    """Control for the test below: a copy of a transposed tensor shows in the profile."""
    q = _hf(1, 16, 2, 8)
    assert _copy_events(lambda: q.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_reads_transposed_inputs_without_copy(seed, dtype):
    q, k, v = _qkv("transposed", nq=48, nk=48, d=16, dtype=dtype)
    copies = _copy_events(lambda: FWD(q, k, v, CFG.ratio, CFG.window, CFG.num_sink, 0.25, 0))
    assert not copies, f"the forward op copied its strided inputs: {copies}"
    copies = _copy_events(lambda: gist_attention(q, k, v, CFG))
    assert not copies, f"gist_attention copied its strided inputs: {copies}"


# ---- opcheck and fake kernels ------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(seed, layout, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(layout, b=1, nq=20, nk=20, d=8, dtype=dtype))
    torch.library.opcheck(FWD.default, (q, k, v, 4, 16, 3, 0.125, 0))
    q2 = _layout(layout, 1, 4, 6, 8, dtype).requires_grad_()
    torch.library.opcheck(FWD.default, (q2, k, v, 2, 4, 1, 0.3, 14))  # chunk of queries
    out, lse = FWD(q, k, v, 4, 16, 3, 0.125, 0)
    dout = _layout(layout, 1, 4, 20, 8, dtype)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, 4, 16, 3, 0.125, 0)
    torch.library.opcheck(BWD.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "narrowed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fake_outputs_match_real(seed, layout, dtype):
    """Shapes, dtypes and strides of the fake kernels' outputs equal the real ones."""
    q, k, v = _qkv(layout, b=2, nq=12, nk=30, d=8, dtype=dtype)
    dout = _layout(layout, 2, 4, 12, 8, dtype)
    args = (4, 16, 3, 0.125, 18)
    out, lse = FWD(q, k, v, *args)
    grads = BWD(dout, q, k, v, out, lse, *args)

    mode = FakeTensorMode()
    fq, fk, fv, fdout = (mode.from_tensor(t) for t in (q, k, v, dout))
    assert fq.stride() == q.stride()
    with mode:
        fout, flse = FWD(fq, fk, fv, *args)
        fgrads = BWD(fdout, fq, fk, fv, fout, flse, *args)
    for name, real, fake in zip(["out", "lse", "dq", "dk", "dv"], (out, lse, *grads), (fout, flse, *fgrads)):
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride()), name
    assert out.is_contiguous() and lse.is_contiguous()
    for name, g, like in zip(["dq", "dk", "dv"], grads, (q, k, v)):
        # empty_like: a dense layout kept, a narrowed view's gradient contiguous
        assert g.stride() == (like.stride() if layout != "narrowed" else like.contiguous().stride()), name
    assert lse.dtype == lse_dtype_for(dtype)


def test_meta_tensors_trace():
    q, k, v = _qkv("transposed", d=8)
    mq, mk, mv = (t.to("meta") for t in (q, k, v))
    out, lse = FWD(mq, mk, mv, 4, 16, 3, 0.125, 0)
    assert out.device.type == "meta" and out.shape == q.shape and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert gist_attention(mq.double(), mk.double(), mv.double(), CFG, return_lse=True)[1].dtype == torch.float64


def test_fake_kernels_validate():
    mode = FakeTensorMode()
    q, k, v = (mode.from_tensor(t) for t in _qkv("transposed", nq=10, nk=10, d=8))
    with mode:
        with pytest.raises(RuntimeError, match="multiple of key/value heads"):
            FWD(q[:, :3], k, v, 4, 16, 3, 0.125, 0)
        with pytest.raises(ValueError, match="cover every query"):
            FWD(q, k, v, 4, 16, 3, 0.125, 1)
        with pytest.raises(ValueError, match="q_offset"):
            FWD(q, k, v, 4, 16, 3, 0.125, -1)
        with pytest.raises(ValueError, match="ratio"):
            FWD(q, k, v, 0, 16, 3, 0.125, 0)
        with pytest.raises(ValueError, match="softmax_scale"):
            FWD(q, k, v, 4, 16, 3, float("nan"), 0)
        with pytest.raises(RuntimeError, match="dtype"):
            FWD(q, k.double(), v, 4, 16, 3, 0.125, 0)
        out, lse = FWD(q, k, v, 4, 16, 3, 0.125, 0)
        with pytest.raises(RuntimeError, match="lse"):
            BWD(out, q, k, v, out, lse.double(), 4, 16, 3, 0.125, 0)
        with pytest.raises(RuntimeError, match="lse"):
            BWD(out, q, k, v, out, lse[:, :, :5], 4, 16, 3, 0.125, 0)
        with pytest.raises(RuntimeError, match="dout"):
            BWD(out[:, :, :5], q, k, v, out, lse, 4, 16, 3, 0.125, 0)


# ---- float64 precision -------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,shape",
    [
        (GistConfig(ratio=4, window=16, num_sink=3), (48, 48, 0)),
        (GistConfig(ratio=2, window=5, num_sink=1), (48, 48, 0)),
        (GistConfig(ratio=3, window=8, num_sink=2), (20, 60, 40)),
    ],
    ids=["r4w16s3", "r2w5s1", "r3w8s2-chunk"],
)
def test_float64_exact_at_large_logits(seed, cfg, shape):
    """Logits of ~100: a float32 lse (error ~1e-5 there) would spoil float64 gradients."""
    nq, nk, off = shape
    scale = 0.25
    q, k, v = _qkv("transposed", b=1, hq=4, hkv=2, nq=nq, nk=nk, d=16, dtype=torch.float64, scale=10.0)
    assert (q[:, ::2] @ k.transpose(-1, -2) * scale).abs().amax() > 100  # the logits really are large
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    out, lse = gist_attention(q, k, v, cfg, softmax_scale=scale, q_offset=off, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse = gist_attention_reference(
        q.detach(), k.detach(), v.detach(), cfg, softmax_scale=scale, q_offset=off, return_lse=True
    )
    _, ref_grads = _ref_grads(q, k, v, dout, cfg, scale, off)
    assert lse.dtype == ref_lse.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12, seed
    assert (lse - ref_lse).abs().max().item() < 1e-10 * ref_lse.abs().max().item(), seed
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert rel_err(g, rg) < 1e-10, (name, rel_err(g, rg), seed)


@pytest.mark.parametrize(
    "cfg,hkv,nq,off,layout",
    [
        (GistConfig(ratio=1, window=2, num_sink=0), 2, 12, 0, "contiguous"),
        (GistConfig(ratio=2, window=3, num_sink=1), 1, 12, 0, "transposed"),
        (GistConfig(ratio=3, window=5, num_sink=2), 2, 12, 0, "transposed"),
        (GistConfig(ratio=4, window=16, num_sink=3), 1, 12, 0, "contiguous"),
        (GistConfig(ratio=2, window=4, num_sink=1), 2, 5, 7, "transposed"),
    ],
    ids=["r1w1s0", "r2w3s1-gqa", "r3w5s2", "r4w16s3-gqa", "r2w4s1-chunk"],
)
def test_gradcheck(seed, cfg, hkv, nq, off, layout):
    q = _layout(layout, 1, 2, nq, 8, torch.float64).requires_grad_()
    k = _layout(layout, 1, hkv, 12, 8, torch.float64).requires_grad_()
    v = _layout(layout, 1, hkv, 12, 8, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: gist_attention(a, b, c, cfg, q_offset=off), (q, k, v))


# ---- double backward ---------------------------------------------------------


def test_double_backward_raises(seed):
    q, k, v = (t.requires_grad_() for t in _qkv("contiguous", b=1, nq=16, nk=16, d=8, dtype=torch.float64))
    dout = torch.randn(1, 4, 16, 8, dtype=torch.float64)
    first = torch.autograd.grad(gist_attention(q, k, v, CFG), (q, k, v), dout)
    grads = torch.autograd.grad(gist_attention(q, k, v, CFG), (q, k, v), dout, create_graph=True)
    for g, g1 in zip(grads, first):
        assert g.requires_grad  # part of a graph, not constants that would give zero second derivatives
        assert torch.equal(g.detach(), g1)
    penalty = sum(g.pow(2).sum() for g in grads)
    with pytest.raises(RuntimeError, match=r"second derivatives \(double backward\)"):
        penalty.backward()
    dq, = torch.autograd.grad(gist_attention(q, k, v, CFG), q, dout, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q, k, v))
    assert "not supported" in DOUBLE_BACKWARD_MESSAGE

    # A plain first backward still works.
    q.grad = None
    gist_attention(q, k, v, CFG).backward(dout)
    assert torch.equal(q.grad, first[0])


# ---- input checks, raw op and wrapper ---------------------------------------


def _raw(q, k, v, scale=0.25, q_offset=0):
    return FWD(q, k, v, CFG.ratio, CFG.window, CFG.num_sink, scale, q_offset)


def _wrapped(q, k, v, scale=0.25, q_offset=0):
    return gist_attention(q, k, v, CFG, softmax_scale=scale, q_offset=q_offset)


CALLS = {"raw": _raw, "wrapper": _wrapped}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0], ids=str)
def test_bad_softmax_scale(call, scale):
    q, k, v = _qkv("transposed", b=1, nq=8, nk=8, d=8)
    with pytest.raises(ValueError, match="softmax_scale"):
        CALLS[call](q, k, v, scale=scale)


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("q_offset", [2**62, 2**63 - 1, 2**63 - 9], ids=str)
def test_huge_q_offset(call, q_offset):
    """q_offset + Nq overflows int64 for the larger ones: still an error, no kernel run."""
    q, k, v = _qkv("contiguous", b=1, nq=8, nk=8, d=8)
    with pytest.raises(ValueError, match="cover every query"):
        CALLS[call](q, k, v, q_offset=q_offset)


@pytest.mark.parametrize("call", list(CALLS))
def test_zero_head_dim(call):
    q, k, v = (torch.empty(1, 2, 8, 0) for _ in range(3))
    with pytest.raises(ValueError, match="head_dim"):
        CALLS[call](q, k, v)
    with pytest.raises(ValueError, match="head_dim"):
        gist_attention(q, k, v, CFG)  # default scale 1/sqrt(0): no ZeroDivisionError


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("meta", ["q", "k", "v", "kv"])
def test_meta_mixed_with_cpu(call, meta):
    q, k, v = _qkv("contiguous", b=1, nq=8, nk=8, d=8)
    q, k, v = (t.to("meta") if name in meta else t for name, t in zip("qkv", (q, k, v)))
    with pytest.raises(RuntimeError, match="device"):
        CALLS[call](q, k, v)


def test_raw_bwd_rejects_bad_lse():
    q, k, v = _qkv("contiguous", b=1, nq=8, nk=8, d=8)
    out, lse = _raw(q, k, v)
    with pytest.raises(RuntimeError, match="lse"):
        BWD(out, q, k, v, out, lse.double(), CFG.ratio, CFG.window, CFG.num_sink, 0.25, 0)
    with pytest.raises(RuntimeError, match="lse"):
        BWD(out, q, k, v, out, lse[:, :, :4], CFG.ratio, CFG.window, CFG.num_sink, 0.25, 0)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out64, lse64 = _raw(q64, k64, v64)
    assert lse64.dtype == torch.float64
    with pytest.raises(RuntimeError, match="lse"):
        BWD(out64, q64, k64, v64, out64, lse64.float(), CFG.ratio, CFG.window, CFG.num_sink, 0.25, 0)


# ---- torch.compile of a patched HF model ------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_hf_model_matches_eager(seed, backend):
    """Forward + backward of a patched Llama under torch.compile equal eager. With
    aot_eager a second sequence length also runs the dynamic-shape recompile."""
    from _hf_models import VOCAB, tiny_model

    torch._dynamo.reset()
    model = tiny_model("llama", seed=seed % 1000, num_hidden_layers=1)  # one layer: a shorter compile
    cfg = unigist.patch_model(model, None, GistConfig(ratio=3, window=12, num_sink=4))
    model.train()
    compiled = torch.compile(model, backend=backend)

    def step(fn, inputs):
        model.zero_grad(set_to_none=True)
        loss = fn(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for i, n in enumerate((48, 61) if backend == "aot_eager" else (48,)):
        batch = unigist.layout.insert_gists(torch.randint(0, VOCAB, (2, n)), cfg)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["input_ids"]}
        loss, grads = step(model, inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss_c, grads_c = step(compiled, inputs)
        names = {e.name for e in prof.events()}
        assert {"unigist::gist_attention_fwd", "unigist::gist_attention_bwd"} <= names  # the ops ran, compiled
        assert torch.isfinite(loss) and abs(loss_c.item() - loss.item()) <= 1e-4 * abs(loss.item()), n
        assert grads.keys() == grads_c.keys() and len(grads) >= 8
        for name, g in grads.items():
            if g.norm() > 0:
                assert rel_err(grads_c[name], g) < 1e-4, (n, name)
    torch._dynamo.reset()
