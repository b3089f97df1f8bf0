"""Layout of the interleaved sequence: where gists sit, how to insert them, and
the gist-shift permutation. Mirrors ``csrc/layout.h`` (tests check both agree).

Position ``p`` of the interleaved sequence is a gist iff ``p % (ratio + 1) == ratio``:
after every ``ratio`` raw tokens one gist token follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch

if TYPE_CHECKING:  # only for annotations: layout is pure arithmetic, config imports it
    from .config import GistConfig

__all__ = [
    "is_gist",
    "num_gists",
    "interleaved_length",
    "raw_positions",
    "insert_gists",
    "remove_gists",
    "gist_shift_permutation",
    "unshift_position",
    "TileVisit",
    "tile_visit",
    "row_nnz",
    "mask_nnz",
    "keep_for_future",
    "KeyLayout",
    "key_positions",
    "gist_mask",
    "gist_mask_from_positions",
]

IntOrTensor = Union[int, torch.Tensor]


def _ratio(config_or_ratio: Union[GistConfig, int]) -> int:
    # Anything with a ``ratio`` (a GistConfig) or the ratio itself.
    config_or_ratio = getattr(config_or_ratio, "ratio", config_or_ratio)
    if isinstance(config_or_ratio, bool) or not isinstance(config_or_ratio, int) or config_or_ratio < 1:
        raise ValueError(f"ratio must be an int >= 1, got {config_or_ratio!r}")
    return config_or_ratio


def is_gist(position: IntOrTensor, ratio: Union[GistConfig, int]) -> IntOrTensor:
    """Whether each interleaved position holds a gist (bool or bool tensor)."""
    r = _ratio(ratio)
    return position % (r + 1) == r


def num_gists(length: int, ratio: Union[GistConfig, int]) -> int:
    """Number of gist positions among the interleaved positions ``[0, length)``."""
    return max(length, 0) // (_ratio(ratio) + 1)


def interleaved_length(num_raw: int, ratio: Union[GistConfig, int]) -> int:
    """Interleaved length of ``num_raw`` raw tokens (a gist closes every full group)."""
    return num_raw + num_raw // _ratio(ratio)


def raw_positions(num_raw: int, ratio: Union[GistConfig, int], device=None) -> torch.Tensor:
    """Interleaved position of each raw token ``0..num_raw-1``."""
    r = _ratio(ratio)
    idx = torch.arange(num_raw, device=device)
    return idx + idx // r


def insert_gists(
    input_ids: torch.Tensor,
    config: GistConfig,
    gist_token_id: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
) -> dict:
    """Interleave gist tokens into a batch of token ids.

    Args:
        input_ids: ``[L]`` or ``[B, L]`` integer token ids (no gists yet).
        config: the layout; ``config.gist_token_id`` is used unless
            ``gist_token_id`` is given.
        labels: optional labels aligned with ``input_ids`` (default: a copy of
            ``input_ids``). The gists get no loss: with ``config.gist_predicts_next``
            (the default) a gist's label is ``-100`` and the position after it (a raw
            token, predicted by the gist under the causal-LM shift) keeps its label;
            otherwise the gist's slot carries the label of the raw token after it (so the
            raw token before the gist predicts it) and that raw token's slot gets ``-100``.

    Returns:
        dict with ``input_ids``, ``labels`` and ``position_ids`` (``0..N-1``), each
        of shape ``[..., N]`` with ``N = L + L // ratio``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("input_ids must be an integer tensor")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(input_ids.shape)}")
    gist_id = config.gist_token_id if gist_token_id is None else gist_token_id
    if gist_id is None:
        raise ValueError("no gist token id: pass gist_token_id or set config.gist_token_id (unigist.patch_model does)")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    num_raw = input_ids.shape[-1]
    n = interleaved_length(num_raw, config)
    pos = raw_positions(num_raw, config, device=input_ids.device)
    out_ids = input_ids.new_full((*input_ids.shape[:-1], n), gist_id)
    out_ids[..., pos] = input_ids
    src_labels = input_ids if labels is None else labels
    out_labels = src_labels.new_full((*input_ids.shape[:-1], n), -100)
    out_labels[..., pos] = src_labels
    if not getattr(config, "gist_predicts_next", True):
        # The causal-LM shift makes slot p's label the target of position p - 1: move
        # each label that follows a gist onto the gist's slot, so the raw token before
        # the gist predicts it and the gist's output is never trained.
        r = _ratio(config)
        gists = torch.arange(r, max(r, n - 1), r + 1, device=input_ids.device)  # gists followed by a raw slot
        out_labels[..., gists] = out_labels[..., gists + 1]
        out_labels[..., gists + 1] = -100
    position_ids = torch.arange(n, device=input_ids.device).expand(*input_ids.shape[:-1], n)
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": position_ids.contiguous()}


def remove_gists(x: torch.Tensor, config: Union[GistConfig, int], dim: int = -1) -> torch.Tensor:
    """Drop the gist positions of ``x`` along ``dim`` (the inverse of :func:`insert_gists`)."""
    n = x.shape[dim]
    keep = ~is_gist(torch.arange(n, device=x.device), config)
    return x.index_select(dim, keep.nonzero().flatten())


def gist_shift_permutation(n: int, tile: int, config: Union[GistConfig, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gist shift: inside each tile of ``tile`` positions, raw tokens keep
    their order and move left, gists move to the tile's right end.

    Returns ``(perm, inverse)`` with ``shifted = x[perm]`` and ``x = shifted[inverse]``.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    r = _ratio(config)
    pos = torch.arange(n)
    gist = is_gist(pos, r)
    tile_id = pos // tile
    # Sort key: tile first, then raws before gists, then original order.
    key = tile_id * 2 * (n + 1) + gist.long() * (n + 1) + pos
    perm = torch.argsort(key)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    return perm, inverse


def unshift_position(shifted: IntOrTensor, tile: int, n: int, config: Union[GistConfig, int]) -> IntOrTensor:
    """Interleaved position of shifted index ``shifted`` (``perm[shifted]`` of
    :func:`gist_shift_permutation`), by arithmetic alone, as ``layout::unshift_position``.

    Works on ints and on integer tensors (elementwise, no data-dependent control
    flow), so it can run inside a FlexAttention ``mask_mod``.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    r = _ratio(config)
    start = (shifted // tile) * tile
    end = torch.clamp(start + tile, max=n) if isinstance(start, torch.Tensor) else min(start + tile, n)
    g0 = start // (r + 1)
    raws = (end - start) - (end // (r + 1) - g0)
    off = shifted - start
    raw_index = start - g0 + off  # the off-th raw token of the tile, counted over the sequence
    raw_pos = raw_index + raw_index // r
    gist_pos = (g0 + off - raws) * (r + 1) + r
    if isinstance(off, torch.Tensor):
        return torch.where(off < raws, raw_pos, gist_pos)
    return raw_pos if off < raws else gist_pos


class TileVisit(NamedTuple):
    """Keys a tile of queries visits; see ``layout::tile_visit`` in csrc/layout.h."""

    sink_end: int
    gist_begin: int
    gist_end: int
    local_lo: int
    local_hi: int


def tile_visit(q_lo: int, q_hi: int, num_keys: int, config: GistConfig) -> TileVisit:
    """Dense keys ``[0, sink_end)`` and ``[local_lo, local_hi)`` (masked element-wise)
    plus gist indices ``[gist_begin, gist_end)`` (seen by every query of the tile)."""
    key_end = min(q_hi + 1, num_keys)
    sink_end = min(config.num_sink, key_end)
    local_lo = min(max(sink_end, q_lo - config.window + 1), key_end)
    gist_begin = num_gists(sink_end, config)
    gist_end = max(gist_begin, num_gists(local_lo, config))
    return TileVisit(sink_end, gist_begin, gist_end, local_lo, key_end)


def row_nnz(q: int, num_keys: int, config: GistConfig) -> int:
    """Visible keys of the query at position ``q`` among keys ``[0, num_keys)``."""
    key_end = min(q + 1, num_keys)
    if key_end <= 0:
        return 0
    sink_end = min(config.num_sink, key_end)
    local_lo = max(sink_end, q - config.window + 1)
    far = num_gists(local_lo, config) - num_gists(sink_end, config)
    return sink_end + far + max(0, key_end - local_lo)


def mask_nnz(q_len: int, k_len: int, config: GistConfig, q_offset: int = 0) -> int:
    """Non-zeros of the mask for queries ``q_offset..q_offset+q_len-1`` over ``k_len`` keys."""
    return sum(row_nnz(q_offset + t, k_len, config) for t in range(q_len))


def keep_for_future(positions: torch.Tensor, next_query: int, config: GistConfig) -> torch.Tensor:
    """Which cached positions a query at position ``>= next_query`` can still see."""
    return (positions < config.num_sink) | is_gist(positions, config) | (next_query - positions < config.window)


class KeyLayout(NamedTuple):
    """Where the keys of an attention call sit (``layout::KeyLayout`` in csrc/layout.h).

    Rows of k/v hold, in order: positions ``0 .. cache_sinks-1``; the gists
    ``first_gist, first_gist+1, ...`` (``cache_gists`` of them); then a contiguous
    tail of positions ``tail_start, tail_start+1, ...``. A compressed cache after
    eviction is ``[sinks | gists older than the tail | tail]``; the interleaved
    layout of training is ``KeyLayout()`` (row ``j`` at position ``j``).
    """

    cache_sinks: int = 0
    cache_gists: int = 0
    first_gist: int = 0
    tail_start: int = 0

    @property
    def is_interleaved(self) -> bool:
        return self == KeyLayout()


def key_positions(key_layout: KeyLayout, num_keys: int, ratio: Union[GistConfig, int], device=None) -> torch.Tensor:
    """Interleaved position of each of the ``num_keys`` key rows of ``key_layout`` (int64)."""
    r = _ratio(ratio)
    s, g = key_layout.cache_sinks, key_layout.cache_gists
    sinks = torch.arange(s, device=device)
    gists = (torch.arange(g, device=device) + key_layout.first_gist) * (r + 1) + r
    tail = torch.arange(num_keys - s - g, device=device) + key_layout.tail_start
    return torch.cat([sinks, gists, tail])


def gist_mask_from_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, config: GistConfig) -> torch.Tensor:
    """Boolean mask ``[len(q_pos), len(k_pos)]``: True where query may attend key.

    Positions are interleaved positions, so this also serves compressed caches
    whose keys are not contiguous.
    """
    i = q_pos.reshape(-1, 1)
    j = k_pos.reshape(1, -1)
    return (j <= i) & ((j < config.num_sink) | is_gist(j, config) | (i - j < config.window))


def gist_mask(
    q_len: int, k_len: int, config: GistConfig, q_offset: int = 0, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Mask for queries at positions ``q_offset + [0, q_len)`` over keys ``[0, k_len)``."""
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return gist_mask_from_positions(q_pos, k_pos, config)
