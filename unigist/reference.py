"""Dense-mask reference of every unigist op, in plain PyTorch.

This file *defines* the ops: the kernels in csrc/ are tested against it.
Everything is computed in float64 (or float32 where asked) over an explicit
``[q_len, k_len]`` boolean mask, so it is slow and memory-hungry on purpose.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import GistConfig
# The mask builders live in layout.py (production code uses them); re-exported here.
from .layout import gist_mask, gist_mask_from_positions, keep_for_future

__all__ = [
    "gist_mask",
    "gist_mask_from_positions",
    "gist_attention_reference",
    "evict_kv_reference",
]


def gist_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: GistConfig,
    softmax_scale: Optional[float] = None,
    q_offset: int = 0,
    return_lse: bool = False,
    dtype: torch.dtype = torch.float64,
    k_positions: Optional[torch.Tensor] = None,
):
    """Masked attention: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``.

    Computed in ``dtype`` (float64 by default) and returned in q's dtype;
    with ``return_lse`` also the log-sum-exp ``[B, Hq, Nq]`` of the scaled
    scores, in the op's lse dtype: float64 when q is float64, else float32.
    Rows that see no key give zeros and ``-inf``. Keys sit at positions
    ``0..Nk-1``, or at ``k_positions`` (e.g. a compressed cache's,
    :func:`unigist.layout.key_positions`).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [batch, heads, seq, head_dim]")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = hq // hkv
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    if k_positions is None:
        mask = gist_mask(q.shape[2], k.shape[2], config, q_offset, device=q.device)
    else:  # keys at arbitrary positions (a compressed cache)
        q_pos = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)
        mask = gist_mask_from_positions(q_pos, k_positions.to(q.device), config)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(dtype).min))
    probs = probs.masked_fill(~mask, 0.0)
    out = torch.matmul(probs, vf).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out


def evict_kv_reference(
    key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, length: int, next_query: int, config: GistConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``key``/``value`` (``[B, H, C, D]``) and ``positions`` among the first
    ``length`` that a query at position ``>= next_query`` can still see, in order."""
    keep = keep_for_future(positions[:length], next_query, config).nonzero().flatten()
    return key[:, :, keep], value[:, :, keep], positions[keep]
