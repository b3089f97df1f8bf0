"""Python face of the ``torch.ops.unigist`` ops: input checks with clear
errors, autograd, and fake (meta) implementations so ``torch.compile`` can
trace them."""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library and registers torch.ops.unigist)

if not torch.ops.unigist.cpu_isa_runs_here():
    raise ImportError(
        f"unigist's CPU kernels were built for {torch.ops.unigist.cpu_isa()} (the build machine's CPU), which this "
        "CPU lacks; reinstall here, or build with UNIGIST_CPU_ISA=default for a portable build"
    )
from .config import GistConfig
from .layout import KeyLayout

__all__ = [
    "gist_attention",
    "evict_kv",
    "has_cuda_kernels",
    "kernel_supports",
    "check_attention_inputs",
    "lse_dtype_for",
    "GistInputError",
    "KeyLayout",
]



def has_cuda_kernels() -> bool:
    """Whether this build of unigist registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("unigist::gist_attention_fwd", "CUDA")


@torch.compiler.assume_constant_result  # a fixed table: torch.compile reads it at trace time
def kernel_supports(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether unigist has an attention kernel on ``device`` for ``dtype`` and ``head_dim``.

    The table lives in C++ (``csrc/checks.h``), beside the checks the kernels run:
    CPU takes float32/float64/bfloat16/float16 and any head dim, CUDA (when this build
    has CUDA kernels) bfloat16/float16 with head dim 64 or 128.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _kernel_table(device_type, dtype, int(head_dim))


@functools.lru_cache(maxsize=None)
def _kernel_table(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    # The attention function asks at every layer of every decode step; the answer is fixed.
    return bool(torch.ops.unigist.kernel_supports(device_type, dtype, head_dim))


class GistInputError(ValueError, RuntimeError):
    """A malformed gist attention call: rank, dtype, device or shape mismatch.

    Both a ValueError (what :func:`gist_attention` has always raised) and a
    RuntimeError (what the C++ kernels raise for these checks, ``TORCH_CHECK``), so
    the wrapper, the fake kernels and the real kernels can be caught alike. Bad
    values (ratio, window, num_sink, head_dim, q_offset, softmax_scale) raise a
    plain ValueError, like the kernels' ``TORCH_CHECK_VALUE``.
    """


def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """dtype of the log-sum-exp the ops return for inputs of ``dtype``: float64 for
    float64 inputs (so float64 gradients stay exact at large logits), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int = 0,
    *,
    softmax_scale: Optional[float] = None,
    ratio: Optional[int] = None,
    window: Optional[int] = None,
    num_sink: Optional[int] = None,
    where: str = "unigist.gist_attention",
    keys_cover: bool = True,
) -> None:
    """Raise TypeError/ValueError/RuntimeError naming what is wrong with a gist attention call.

    The one set of checks of the Python side: :func:`gist_attention` runs it before
    calling the op, and the fake (meta) kernels run it at trace time, so a bad call
    fails there as it would in the C++ kernel. ``softmax_scale``, ``ratio``, ``window``
    and ``num_sink`` are checked when given. Tensors must all be on one device; an
    all-meta (or all-fake) call is accepted.

    Exception types follow the C++ checks: ValueError for bad values (ratio, window,
    num_sink, head_dim < 1, q_offset, softmax_scale; ``TORCH_CHECK_VALUE`` there),
    :class:`GistInputError` (a ValueError and a RuntimeError) for rank, dtype, device
    and shape mismatches (``TORCH_CHECK`` there), TypeError for a non-tensor and
    RuntimeError for a CUDA call to a build without CUDA kernels.
    """
    for name, low in (("ratio", 1), ("window", 1), ("num_sink", 0)):
        value = {"ratio": ratio, "window": window, "num_sink": num_sink}[name]
        if value is not None and (not _is_int(value) or value < low):
            raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise GistInputError(
                f"{where}: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise GistInputError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise GistInputError(f"{where}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise GistInputError(f"{where}: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape != v.shape:
        raise GistInputError(f"{where}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise GistInputError(
            f"{where}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if q.shape[3] != k.shape[3]:
        raise GistInputError(f"{where}: head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    if q.shape[3] < 1:
        raise ValueError(f"{where}: head_dim must be >= 1, got {q.shape[3]}")
    if not _is_int(q_offset) or q_offset < 0:
        raise ValueError(f"{where}: q_offset must be an int >= 0, got {q_offset!r}")
    # Written as a difference so it cannot overflow in int64 (the C++ check does the same).
    # (A compressed cache, keys_cover=False, has its own check: check_key_layout.)
    if keys_cover and q_offset > k.shape[2] - q.shape[2]:
        raise ValueError(
            f"{where}: keys ({k.shape[2]}) must cover every query position: "
            f"q_offset + q_len = {q_offset} + {q.shape[2]} > {k.shape[2]}"
        )
    if softmax_scale is not None:
        try:
            scale = float(softmax_scale)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: softmax_scale must be a finite float > 0, got {softmax_scale!r}") from None
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{where}: softmax_scale must be a finite float > 0, got {softmax_scale!r}")
    if q.device.type == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError(
                "unigist was built without CUDA kernels (no nvcc or a CPU build of torch at install time); "
                "reinstall on a machine with nvcc and a CUDA build of torch, or run on CPU tensors"
            )
        if not kernel_supports("cuda", q.dtype, q.shape[3]):
            raise GistInputError(
                f"{where}: CUDA kernels take bfloat16 or float16 with head_dim 64 or 128, got {q.dtype} "
                f"with head_dim {q.shape[3]}"
            )
    elif q.device.type == "cpu":
        if not kernel_supports("cpu", q.dtype, q.shape[3]):
            raise GistInputError(f"{where}: CPU kernels take float32, float64, bfloat16 or float16, got {q.dtype}")
    elif q.device.type != "meta":
        raise GistInputError(f"{where}: unsupported device {q.device}; unigist runs on CPU and CUDA")


def _check_bwd_extras(where: str, dout, q, out, lse) -> None:
    """The checks gist_attention_bwd adds to the forward's: dout, out and lse."""
    for name, t in (("dout", dout), ("out", out), ("lse", lse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise GistInputError(f"{where}: {name} must be on q's device {q.device}, got {t.device}")
    for name, t in (("dout", dout), ("out", out)):
        if t.shape != q.shape:
            raise GistInputError(f"{where}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise GistInputError(f"{where}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    want = lse_dtype_for(q.dtype)
    if lse.dtype != want or tuple(lse.shape) != tuple(q.shape[:3]):
        raise GistInputError(
            f"{where}: lse must be {str(want).replace('torch.', '')} [B, Hq, Nq] = {tuple(q.shape[:3])} "
            f"for {q.dtype} inputs, got {lse.dtype} {tuple(lse.shape)}"
        )


def gist_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: GistConfig,
    *,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    return_lse: bool = False,
    key_layout: Optional[KeyLayout] = None,
):
    """UniGist sparse attention over the interleaved layout, or over a compressed cache.

    Args:
        q: ``[B, Hq, Nq, D]`` queries; row ``t`` sits at interleaved position ``q_offset + t``.
        k, v: ``[B, Hkv, Nk, D]`` keys and values at positions ``0..Nk-1`` (``Hq % Hkv == 0``).
            Any strides (e.g. transposed views of ``[B, N, H, D]`` tensors): the kernels read
            them in place.
        config: ratio, window and num_sink of the mask.
        softmax_scale: defaults to ``1 / sqrt(D)``; must be finite and > 0.
        q_offset: position of the first query (chunked prefill over a longer key sequence).
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (float64 for float64
            inputs, else float32; not differentiable).
        key_layout: keys in a compressed-cache layout (:class:`unigist.layout.KeyLayout`:
            ``[sinks | gists | contiguous tail]``) instead of positions ``0..Nk-1``; the
            queries must lie inside the tail. Same mask, same result as the dense mask on
            the keys' positions. Differentiable on CPU; on CUDA forward only (inference:
            prefill chunks and decode steps), and a backward raises NotImplementedError.

    Returns:
        ``out``, contiguous ``[B, Hq, Nq, D]`` in q's dtype (and ``lse`` with ``return_lse``).
        Differentiable in q, k, v (first derivatives only: double backward raises); their
        gradients are laid out like them (``torch.empty_like``), so a transposed view's
        gradient reaches its ``[B, N, H, D]`` base without a copy.
    """
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    if key_layout is not None and not isinstance(key_layout, KeyLayout):
        raise TypeError(f"key_layout must be a unigist.layout.KeyLayout, got {type(key_layout).__name__}")
    if key_layout is None or key_layout.is_interleaved:
        check_attention_inputs(q, k, v, q_offset, softmax_scale=softmax_scale)
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, lse = torch.ops.unigist.gist_attention_fwd(
            q, k, v, config.ratio, config.window, config.num_sink, scale, q_offset
        )
    else:
        _check_cache_call("unigist.gist_attention", q, k, v, config.ratio, config.window, config.num_sink,
                          softmax_scale, q_offset, key_layout)
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, lse = torch.ops.unigist.gist_attention_cache_fwd(
            q, k, v, config.ratio, config.window, config.num_sink, scale, q_offset, *key_layout
        )
    return (out, lse) if return_lse else out


def _check_cache_call(where, q, k, v, ratio, window, num_sink, softmax_scale, q_offset, key_layout) -> None:
    """The checks of a compressed-cache call (wrapper and fakes alike)."""
    check_attention_inputs(
        q, k, v, q_offset, softmax_scale=softmax_scale, ratio=ratio, window=window, num_sink=num_sink, where=where,
        keys_cover=False,
    )
    check_key_layout(where, q, k, q_offset, key_layout, ratio, num_sink)


def check_key_layout(where: str, q, k, q_offset, key_layout: KeyLayout, ratio, num_sink) -> None:
    """ValueError unless ``key_layout`` describes a compressed cache whose tail holds every
    query (the checks of the C++ ``check_key_layout``)."""
    for name, value in zip(KeyLayout._fields, key_layout):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{where}: key_layout.{name} must be an int >= 0, got {value!r}")
    s, g, g0, t0 = key_layout
    nk, nq = k.shape[2], q.shape[2]
    if s + g > nk:
        raise ValueError(f"{where}: cache_sinks ({s}) + cache_gists ({g}) exceed the {nk} key rows")
    if s > num_sink or s > t0:
        raise ValueError(f"{where}: cache_sinks ({s}) must be <= num_sink ({num_sink}) and <= tail_start ({t0})")
    if g > 0 and not (g0 * (ratio + 1) + ratio >= s and (g0 + g - 1) * (ratio + 1) + ratio < t0):
        raise ValueError(
            f"{where}: the cached gists {g0} .. {g0 + g - 1} must sit after the cached sinks ({s}) "
            f"and before tail_start ({t0})"
        )
    tail_rows = nk - s - g
    if q_offset < t0 or nq > tail_rows or q_offset - t0 > tail_rows - nq:
        raise ValueError(
            f"{where}: queries at positions {q_offset} .. {q_offset} + {nq} - 1 must lie inside the tail of "
            f"{tail_rows} keys starting at position {t0}"
        )


# ---------------------------------------------------------------------------
# fake (meta) kernels: the same checks and the same outputs (shapes, dtypes,
# strides: the forwards' outputs are contiguous, the backwards' gradients laid
# out like q, k, v, as torch.empty_like) as the real kernels
# ---------------------------------------------------------------------------


@torch.library.register_fake("unigist::gist_attention_fwd")
def _fwd_fake(q, k, v, ratio, window, num_sink, softmax_scale, q_offset=0):
    check_attention_inputs(
        q, k, v, q_offset, softmax_scale=softmax_scale, ratio=ratio, window=window, num_sink=num_sink,
        where="unigist::gist_attention_fwd",
    )
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype_for(q.dtype))


@torch.library.register_fake("unigist::gist_attention_bwd")
def _bwd_fake(dout, q, k, v, out, lse, ratio, window, num_sink, softmax_scale, q_offset=0):
    where = "unigist::gist_attention_bwd"
    check_attention_inputs(
        q, k, v, q_offset, softmax_scale=softmax_scale, ratio=ratio, window=window, num_sink=num_sink, where=where
    )
    _check_bwd_extras(where, dout, q, out, lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


# unigist::gist_attention_fwd's autograd is registered in C++ (csrc/autograd.cpp:
# the backward is gist_attention_bwd on the saved q, k, v, out, lse), to spare
# every training step the host time of a Python autograd wrapper.

DOUBLE_BACKWARD_MESSAGE = (
    "unigist: second derivatives (double backward) of gist_attention are not supported: "
    "unigist::gist_attention_bwd has no backward. Take first derivatives only (no backward "
    "through gradients computed with create_graph=True), or use unigist.reference."
    "gist_attention_reference for higher-order derivatives"
)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


# Without this the gradients of a create_graph=True backward would be constants
# of the graph, and a second derivative through them would silently be zero.
torch.library.register_autograd("unigist::gist_attention_bwd", _bwd_backward, setup_context=_bwd_setup_context)


@torch.library.register_fake("unigist::gist_attention_cache_fwd")
def _cache_fwd_fake(
    q, k, v, ratio, window, num_sink, softmax_scale, q_offset, cache_sinks, cache_gists, first_gist, tail_start
):
    key_layout = KeyLayout(cache_sinks, cache_gists, first_gist, tail_start)
    _check_cache_call("unigist::gist_attention_cache_fwd", q, k, v, ratio, window, num_sink, softmax_scale,
                      q_offset, key_layout)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype_for(q.dtype))


@torch.library.register_fake("unigist::gist_attention_cache_bwd")
def _cache_bwd_fake(
    dout, q, k, v, out, lse, ratio, window, num_sink, softmax_scale, q_offset, cache_sinks, cache_gists, first_gist,
    tail_start,
):
    key_layout = KeyLayout(cache_sinks, cache_gists, first_gist, tail_start)
    where = "unigist::gist_attention_cache_bwd"
    _check_cache_call(where, q, k, v, ratio, window, num_sink, softmax_scale, q_offset, key_layout)
    _check_bwd_extras(where, dout, q, out, lse)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("unigist::gist_attention_cache_step")
def _cache_step_fake(q, k, v, layout, ratio, window, num_sink, softmax_scale):
    where = "unigist::gist_attention_cache_step"
    check_attention_inputs(
        q, k, v, 0, softmax_scale=softmax_scale, ratio=ratio, window=window, num_sink=num_sink, where=where,
        keys_cover=False,
    )
    if layout.dtype != torch.long or layout.shape != (6,) or layout.device != q.device:
        raise ValueError(
            f"{where}: layout must be an int64 tensor of 6 values [q_offset, cache_sinks, cache_gists, first_gist, "
            f"tail_start, num_keys] on q's device, got {layout.dtype} {tuple(layout.shape)} on {layout.device}"
        )
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype_for(q.dtype))


def _cache_fwd_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.layout_args = tuple(inputs[3:])
    ctx.mark_non_differentiable(lse)


def _cache_fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.unigist.gist_attention_cache_bwd(dout, q, k, v, out, lse, *ctx.layout_args)
    return (dq, dk, dv) + (None,) * len(ctx.layout_args)


torch.library.register_autograd(
    "unigist::gist_attention_cache_fwd", _cache_fwd_backward, setup_context=_cache_fwd_setup_context
)
torch.library.register_autograd(
    "unigist::gist_attention_cache_bwd", _bwd_backward, setup_context=_bwd_setup_context
)


def evict_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    length: int,
    next_query: int,
    config: GistConfig,
) -> int:
    """Evict, in place, the cached rows that no query at position ``>= next_query`` can see.

    Args:
        key, value: ``[B, H, C, D]`` cache buffers of capacity ``C``; rows ``[0, length)`` are valid.
        positions: int64 ``[C]`` interleaved position of every row (same device as ``key``).
        length: number of valid rows (an int).
        next_query: position of the next query that will read the cache (an int).
        config: the gist layout (ratio, window, num_sink).

    Returns:
        The number of kept rows ``n``: rows ``[0, n)`` of ``key``, ``value`` and ``positions``
        now hold the kept rows in their original order; rows past ``n`` are unspecified.

    Raises:
        TypeError: a non-tensor buffer, or a ``length`` / ``next_query`` that is not an int
            (a float is never rounded).
        ValueError: ``key``, ``value`` or ``positions`` share memory, or out-of-range values.
    """
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    tensors = (("key", key), ("value", value), ("positions", positions))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    length = _as_index("length", length)
    next_query = _as_index("next_query", next_query)
    # The op compacts each buffer in place, row by row: buffers sharing memory would
    # overwrite each other's rows while they are being moved.
    for i, (name_a, a) in enumerate(tensors):
        for name_b, b in tensors[i + 1 :]:
            if _may_overlap(a, b):
                raise ValueError(
                    f"unigist.evict_kv: {name_a} and {name_b} share memory (the same tensor, or overlapping views of "
                    "one buffer); evict_kv compacts each of them in place, so each needs its own storage"
                )
    return torch.ops.unigist.evict_kv(
        key, value, positions, length, config.ratio, config.window, config.num_sink, next_query
    )


def _as_index(name: str, x):
    """``x`` as an int: a Python int or SymInt, or anything with ``__index__`` (a NumPy integer,
    a 0-d integer tensor) except a bool; TypeError naming ``name`` else (a float is never rounded)."""
    if _is_int(x):
        return x
    if not isinstance(x, bool) and not (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise TypeError(f"unigist.evict_kv: {name} must be an int, got {type(x).__name__} {x!r}")


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges ``a`` and ``b`` span in one storage intersect (conservative:
    interleaved views that share no element but whose ranges cross count as overlapping)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
        spans = []
        for t in (a, b):
            start = t.data_ptr()
            extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
            spans.append((start, start + extent * t.element_size()))
    except (RuntimeError, NotImplementedError):  # fake or functional tensors under tracing have no storage
        return False
    (a0, a1), (b0, b1) = spans
    return a0 < b1 and b0 < a1


@torch.library.register_fake("unigist::evict_kv")
def _evict_kv_fake(key, value, positions, length, ratio, window, num_sink, next_query):
    return torch.library.get_ctx().new_dynamic_size()
