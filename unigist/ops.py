"""Python face of the ``torch.ops.unigist`` ops: input checks with clear
errors, autograd, and fake (meta) implementations so ``torch.compile`` can
trace them."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library and registers torch.ops.unigist)
from .config import GistConfig

__all__ = ["gist_attention", "evict_kv", "has_cuda_kernels", "check_attention_inputs"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_HEAD_DIMS = (64, 128)


def has_cuda_kernels() -> bool:
    """Whether this build of unigist registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("unigist::gist_attention_fwd", "CUDA")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> None:
    """Raise ValueError/TypeError/RuntimeError naming what is wrong with q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if k.shape[2] < q_offset + q.shape[2]:
        raise ValueError(
            f"keys ({k.shape[2]}) must cover every query position: q_offset + q_len = {q_offset + q.shape[2]}"
        )
    if q.device.type == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError(
                "unigist was built without CUDA kernels (no nvcc or a CPU build of torch at install time); "
                "reinstall on a machine with nvcc and a CUDA build of torch, or run on CPU tensors"
            )
        if q.dtype not in _CUDA_DTYPES:
            raise ValueError(f"CUDA kernels take bfloat16 or float16, got {q.dtype}")
        if q.shape[3] not in _CUDA_HEAD_DIMS:
            raise ValueError(f"CUDA kernels take head_dim 64 or 128, got {q.shape[3]}")
    elif q.device.type == "cpu":
        if q.dtype not in _CPU_DTYPES:
            raise ValueError(f"CPU kernels take float32, float64, bfloat16 or float16, got {q.dtype}")
    elif q.device.type != "meta":
        raise ValueError(f"unsupported device {q.device}; unigist runs on CPU and CUDA")


def gist_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: GistConfig,
    *,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    return_lse: bool = False,
):
    """UniGist sparse attention over the interleaved layout.

    Args:
        q: ``[B, Hq, Nq, D]`` queries; row ``t`` sits at interleaved position ``q_offset + t``.
        k, v: ``[B, Hkv, Nk, D]`` keys and values at positions ``0..Nk-1`` (``Hq % Hkv == 0``).
        config: ratio, window and num_sink of the mask.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        q_offset: position of the first query (chunked prefill over a longer key sequence).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Nq]`` (not differentiable).

    Returns:
        ``out`` of q's shape and dtype (and ``lse`` with ``return_lse``). Differentiable in q, k, v.
    """
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    check_attention_inputs(q, k, v, q_offset)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale must be a finite positive float, got {softmax_scale!r}")
    out, lse = torch.ops.unigist.gist_attention_fwd(
        q, k, v, config.ratio, config.window, config.num_sink, scale, q_offset
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("unigist::gist_attention_fwd")
def _fwd_fake(q, k, v, ratio, window, num_sink, softmax_scale, q_offset=0):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("unigist::gist_attention_bwd")
def _bwd_fake(dout, q, k, v, out, lse, ratio, window, num_sink, softmax_scale, q_offset=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, ratio, window, num_sink, softmax_scale, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.layout_args = (ratio, window, num_sink, softmax_scale, q_offset)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.unigist.gist_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.layout_args)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("unigist::gist_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context)


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
        length: number of valid rows.
        next_query: position of the next query that will read the cache.
        config: the gist layout (ratio, window, num_sink).

    Returns:
        The number of kept rows ``n``: rows ``[0, n)`` of ``key``, ``value`` and ``positions``
        now hold the kept rows in their original order; rows past ``n`` are unspecified.
    """
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    for name, t in (("key", key), ("value", value), ("positions", positions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return torch.ops.unigist.evict_kv(
        key, value, positions, int(length), config.ratio, config.window, config.num_sink, int(next_query)
    )


@torch.library.register_fake("unigist::evict_kv")
def _evict_kv_fake(key, value, positions, length, ratio, window, num_sink, next_query):
    return torch.library.get_ctx().new_dynamic_size()
