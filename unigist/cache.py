"""KV eviction and the compressed cache of unigist.

* :func:`unigist.ops.evict_kv` wraps the ``torch.ops.unigist.evict_kv`` op (CPU and CUDA):
  it removes, in place and in order, the cached rows no future query can see.
* :class:`GistCache` is a ``transformers`` :class:`~transformers.Cache` whose
  layers keep only the sinks, the gists seen so far and the recent window, and
  record the interleaved position of every entry. It calls the eviction op on
  every update (so after every prefill chunk and at every decoding step), and
  reports its memory in bytes, current and peak.

The cache assumes the model is fed the interleaved sequence in order: the
``n`` rows of an update sit at positions ``seen .. seen + n - 1``. A layer never
holds more than ``num_sink + gists_so_far + window`` entries plus the chunk
being processed. Two eviction policies keep that bound:

* ``"strict"``: before every update, evict everything no query at position
  ``>= seen`` can see (one op call per layer and step); in decoding every
  cached key is then visible and attention needs no mask;
* ``"lazy"`` (default): evict only when appending would otherwise break the
  bound. The bound counts the gists inside the window twice, which leaves
  about ``window / (ratio + 1)`` entries of slack, so in decoding the op runs
  about once every ``window / ratio`` steps instead of every step; in between,
  the tail only starts earlier and the attention masks its few stale keys.

The cache alone decides when to evict (``unigist.generate`` never calls
:meth:`GistCache.evict`; a caller may, to shrink an idle cache).

After any eviction a layer holds ``[sinks | gists older than the tail | a
contiguous tail]``; :meth:`GistCacheLayer.key_layout` gives that layout by
arithmetic (a :class:`unigist.layout.KeyLayout`), and the attention function gets
it from the cache itself (the ``gist_cache`` forward kwarg, see ``unigist.hf``),
not from attributes on tensors.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import GistConfig
from .layout import KeyLayout, is_gist, num_gists
from .ops import evict_kv, kernel_supports

__all__ = ["evict_kv", "GistCache", "GistCacheLayer", "GistCacheRows", "GistCacheStep"]

_NO_POSITION = 1 << 62  # after every position: no query sees a key there


class GistCacheLayer(CacheLayerMixin):
    """One layer of a :class:`GistCache`: KV buffers ``[B, H, capacity, D]`` plus positions.

    ``keys``/``values`` are views of the valid rows; ``positions`` holds the
    interleaved position of each of them.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, config: GistConfig, capacity: Optional[int] = None, eviction: str = "lazy", **kwargs):
        super().__init__()
        if eviction not in ("lazy", "strict"):
            raise ValueError(f"eviction must be 'lazy' or 'strict', got {eviction!r}")
        self.eviction = eviction
        self.gist_config = config
        self.capacity_hint = capacity
        self.length = 0  # valid rows
        self.seen = 0  # positions processed so far = position of the next row
        self.evicted_at = 0  # last next_query the layer was evicted for
        self.peak_length = 0
        self.peak_capacity = 0
        self.all_visible = False
        # Set by GistCache.update for a model call that cannot hand the layout to attention.
        self.require_layout_channel = False
        self._k = self._v = self._pos = None

    # ----------------------------------------------------------------- buffers
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._alloc(max(self.capacity_hint or 0, key_states.shape[-2], 1), key_states, value_states)
        self.is_initialized = True

    def _alloc(self, capacity: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        b, h, _, d = key_like.shape
        dv = value_like.shape[-1]
        k = key_like.new_empty((b, h, capacity, d))
        v = value_like.new_empty((b, h, capacity, dv))
        pos = torch.empty(capacity, dtype=torch.long, device=key_like.device)
        if self._k is not None and self.length:
            k[:, :, : self.length].copy_(self._k[:, :, : self.length])
            v[:, :, : self.length].copy_(self._v[:, :, : self.length])
            pos[: self.length].copy_(self._pos[: self.length])
        self._k, self._v, self._pos = k, v, pos
        self.peak_capacity = max(self.peak_capacity, capacity)

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    @property
    def positions(self) -> Optional[torch.Tensor]:
        """Interleaved positions of the valid rows (int64, on the cache's device)."""
        return None if self._pos is None else self._pos[: self.length]

    def _refresh_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    # ---------------------------------------------------------------- eviction
    def expected_length_after_evict(self, next_query: int) -> int:
        """Rows the layer will hold after ``evict(next_query)`` (pure arithmetic)."""
        if next_query <= self.evicted_at or self.length == 0:
            return self.length
        c = self.gist_config
        lo = max(c.num_sink, self.evicted_at - c.window + 1)
        hi = min(self.seen, next_query - c.window + 1)
        raw = max(0, hi - lo) - max(0, num_gists(hi, c) - num_gists(lo, c))  # raw positions in [lo, hi)
        return self.length - raw

    def bound(self, seen: int) -> int:
        """``num_sink + gists in [0, seen) + window`` (capped at ``seen``)."""
        return self.gist_config.max_cache_len(seen)

    def evict(self, next_query: int) -> int:
        """Drop every row no query at position ``>= next_query`` can see; returns the new length."""
        if next_query <= self.evicted_at or self.length == 0:
            return self.length
        expected = self.expected_length_after_evict(next_query)
        if expected != self.length:
            kept = evict_kv(self._k, self._v, self._pos, self.length, next_query, self.gist_config)
            if kept != expected:
                raise RuntimeError(
                    f"unigist: KV eviction kept {kept} rows where the layout predicts {expected}; "
                    "the cache was fed positions out of order"
                )
            self.length = kept
            self._refresh_views()
        self.evicted_at = next_query
        return self.length

    # ------------------------------------------------------------------ update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_like_before(key_states, value_states)
        n = key_states.shape[-2]
        row = self.reserve(n, key_states, value_states)
        self._k[:, :, row : row + n].copy_(key_states)
        self._v[:, :, row : row + n].copy_(value_states)
        torch.arange(self.seen - n, self.seen, out=self._pos[row : row + n])
        return self.keys, self.values

    def reserve(self, n: int, key_like: Optional[torch.Tensor] = None, value_like: Optional[torch.Tensor] = None,
                views: bool = True) -> int:
        """Make room for the next ``n`` positions and count them in; returns the row where they go.

        Evicts first when the policy says so, and grows the buffers (like ``key_like``)
        when they are too small. The caller writes the rows (:meth:`update` does; a CUDA
        graph of a decode step writes them on the device, from a row index it reads there).
        ``views=False`` (a decode step that never reads them, where host time per step is
        the cost) leaves ``keys`` / ``values`` / ``all_visible`` stale until :meth:`_refresh_views`.
        """
        start = self.seen
        # Rows no query of this chunk (or later) can see leave before the chunk comes in:
        # always ("strict"), or when keeping them would break the bound ("lazy").
        if self.eviction == "strict" or self.length > self.bound(start):
            self.evict(start)
        if self.require_layout_channel and not self.key_layout().is_interleaved:
            raise RuntimeError(
                "unigist: this GistCache has evicted rows, but the model's attention would not be told where its "
                "keys sit (transformers < 5.24 does not hand the cache to the attention function) and would "
                "silently take them for the uncompressed sequence. Use unigist.generate, or pass "
                "gist_cache=cache to every model call and build the cache with GistCache(..., explicit_layout=True)"
            )
        all_visible = views and self.expected_length_after_evict(start) == self.length
        row, need = self.length, self.length + n
        if need > self.capacity:
            if key_like is None:
                raise RuntimeError(
                    f"unigist: GistCache layer needs {need} rows but its buffers hold {self.capacity}, and this "
                    "caller cannot let them move (a captured decode step reads them in place)"
                )
            self._alloc(max(need, self.capacity + self.capacity // 4 + 64), key_like, value_like)
        self.length = need
        self.seen = start + n
        self.peak_length = max(self.peak_length, need)
        self.all_visible = all_visible  # every cached key is visible to the chunk's first query
        if views:
            self._refresh_views()
        return row

    def _check_like_before(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The rows of an update must match the cached ones: another batch size, head count,
        head dim, dtype or device would mean another sequence (or a silent reallocation)."""
        for name, new, old in (("key", key_states, self._k), ("value", value_states, self._v)):
            if new.dtype != old.dtype or new.device != old.device:
                raise ValueError(
                    f"unigist.GistCache: {name} states are {new.dtype} on {new.device}, but the cache holds "
                    f"{old.dtype} on {old.device}; use a fresh GistCache (or reset() it) for another model or dtype"
                )
            if new.dim() != 4 or new.shape[0] != old.shape[0] or new.shape[1] != old.shape[1] or (
                new.shape[3] != old.shape[3]
            ):
                raise ValueError(
                    f"unigist.GistCache: {name} states of shape {tuple(new.shape)} do not match the cache's "
                    f"[batch={old.shape[0]}, heads={old.shape[1]}, rows, head_dim={old.shape[3]}]; a batch size "
                    "or head change between updates is a different sequence: use a fresh GistCache or reset() it"
                )

    def key_layout(self) -> KeyLayout:
        """Where the rows sit, by arithmetic: ``[sinks | gists older than the tail | tail]``.

        Eviction for a query at ``evicted_at`` removed exactly the raw positions
        ``num_sink <= p <= evicted_at - window``, so the tail starts after the
        last of them (lazy eviction only moves that point less often).
        """
        c = self.gist_config
        last = min(self.evicted_at - c.window, self.seen - 1)
        if last >= 0 and bool(is_gist(last, c)):
            last -= 1  # the position before a gist is raw
        if last < c.num_sink:
            kl = KeyLayout()
        else:
            first_gist = num_gists(c.num_sink, c)
            kl = KeyLayout(c.num_sink, num_gists(last + 1, c) - first_gist, first_gist, last + 1)
        if kl.cache_sinks + kl.cache_gists + (self.seen - kl.tail_start) != self.length:
            raise RuntimeError(
                f"unigist: the GistCache layer holds {self.length} rows where its layout {kl} predicts "
                f"{kl.cache_sinks + kl.cache_gists + self.seen - kl.tail_start}; it was fed positions out of order"
            )
        return kl

    # --------------------------------------------------------- HF Cache API
    def get_seq_length(self) -> int:
        """Positions processed so far (the position of the next token), not the cached rows."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything, buffers included: the next update may bring another batch size or dtype."""
        self.length = self.seen = self.evicted_at = 0
        self.peak_length = 0
        self._k = self._v = self._pos = None
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("unigist.GistCache cannot be cropped: evicted rows are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._k is not None:
            self._k = self._k.index_select(0, beam_idx.to(self._k.device))
            self._v = self._v.index_select(0, beam_idx.to(self._v.device))
            self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k = self._k[indices]
            self._v = self._v[indices]
            self._refresh_views()

    # ------------------------------------------------------------------ memory
    def row_bytes(self) -> int:
        """Bytes of one cached position (key + value, all batch rows and heads)."""
        if self._k is None:
            return 0
        return self._k[:, :, 0].numel() * self._k.element_size() + self._v[:, :, 0].numel() * self._v.element_size()


class GistCache(Cache):
    """A ``transformers`` cache that keeps only what UniGist still needs.

    Per layer it holds the first ``num_sink`` positions, every gist seen so
    far and the last ``window`` positions, with the interleaved position of
    each entry, evicting the rest (``unigist.evict_kv``) on every update.

    Args:
        config: the gist layout.
        num_layers: number of decoder layers (or pass ``model_config``); when
            neither is given, layers are created as the model asks for them.
        model_config: a ``transformers`` config; its ``num_hidden_layers`` is used.
        capacity: rows to preallocate per layer (``unigist.generate`` passes the
            exact bound so buffers never grow); buffers grow by 25% when needed.
        eviction: ``"lazy"`` (default) or ``"strict"``, see the module docstring.
        explicit_layout: the caller hands the cache's key layout to attention itself:
            it passes ``gist_cache=cache`` to every model call (as :func:`unigist.generate`
            does) or uses the cache without a model and reads :meth:`GistCacheLayer.key_layout`.
            Without it, an evicted cache refuses updates that do not come with
            transformers' (>= 5.24) attention kwargs, where it puts itself for the attention
            function: older versions would otherwise take the evicted keys for the
            uncompressed sequence, silently.

    Memory: :meth:`memory_bytes` / :meth:`peak_memory_bytes` count the valid
    entries (keys + values, all layers); :meth:`allocated_bytes` counts the
    buffers. :meth:`get_seq_length` returns the positions processed so far, so
    a model called without ``position_ids`` still numbers tokens correctly.
    """

    def __init__(
        self,
        config: GistConfig,
        num_layers: Optional[int] = None,
        model_config=None,
        capacity: Optional[int] = None,
        eviction: str = "lazy",
        explicit_layout: bool = False,
    ):
        if not isinstance(config, GistConfig):
            raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
        self.explicit_layout = bool(explicit_layout)
        if num_layers is None and model_config is not None:
            text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
            num_layers = text_config.num_hidden_layers
        self.gist_config = config
        self._peak_bytes = 0
        # Masks shared by all layers of one forward pass (every layer holds the same positions).
        self._mask_memo: dict = {}
        if num_layers is not None:
            super().__init__(layers=[GistCacheLayer(config, capacity, eviction) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(GistCacheLayer, config, capacity, eviction))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # The attention function needs this cache to know where the keys sit (their
        # positions after eviction). transformers (>= 5.24) hands the attention
        # module's kwargs to the cache update and then on to the attention function:
        # the cache puts itself there. Older versions do not; then the model call must
        # carry gist_cache=cache (unigist.generate does, and says so with
        # explicit_layout=True), or an evicted layer refuses the update.
        explicit_layouts = kwargs.get("kwargs")
        channel = isinstance(explicit_layouts, dict)
        if layer_idx < len(self.layers):
            self.layers[layer_idx].require_layout_channel = not channel and not self.explicit_layout
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if channel:
            explicit_layouts["gist_cache"] = self
        if layer_idx == len(self.layers) - 1:  # every layer has appended: the forward's peak
            self._peak_bytes = max(self._peak_bytes, self.memory_bytes())
        return keys, values

    def attention_args(self, layer_idx: int, num_keys: int, num_queries: int) -> tuple[KeyLayout, int]:
        """``(key_layout, q_offset)`` of layer ``layer_idx``'s keys for the chunk of
        ``num_queries`` queries just appended (what the attention function needs)."""
        layer = self.layers[layer_idx]
        if num_keys != layer.length or num_queries > layer.length:
            raise RuntimeError(
                f"unigist: attention got {num_keys} keys and {num_queries} queries but GistCache layer {layer_idx} "
                f"holds {layer.length} rows; the keys did not come from this cache's last update"
            )
        return layer.key_layout(), layer.seen - num_queries

    def reset(self) -> None:
        super().reset()
        self._mask_memo.clear()
        self._peak_bytes = 0

    def evict(self, next_query: Optional[int] = None) -> None:
        """Evict every layer for a query at ``next_query`` (default: the next position)."""
        for layer in self.layers:
            layer.evict(layer.seen if next_query is None else next_query)

    # ------------------------------------------------------------------ stats
    @property
    def seen_tokens(self) -> int:
        """Interleaved positions processed so far."""
        return max((layer.seen for layer in self.layers), default=0)

    def cache_length(self, layer_idx: Optional[int] = None) -> int:
        """Entries held by one layer (default: the largest over layers)."""
        if layer_idx is not None:
            return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0
        return max((layer.length for layer in self.layers), default=0)

    def peak_cache_length(self) -> int:
        return max((layer.peak_length for layer in self.layers), default=0)

    def max_allowed_length(self, seen: Optional[int] = None) -> int:
        """``num_sink + gists_so_far + window``: what the cache may hold between chunks."""
        return self.gist_config.max_cache_len(self.seen_tokens if seen is None else seen)

    def memory_bytes(self) -> int:
        """Bytes of the valid key/value entries of all layers now."""
        return sum(layer.length * layer.row_bytes() for layer in self.layers)

    def peak_memory_bytes(self) -> int:
        """Largest :meth:`memory_bytes` seen after any update."""
        return max(self._peak_bytes, self.memory_bytes())

    def allocated_bytes(self) -> int:
        """Bytes of the key/value buffers (capacity) of all layers, plus positions."""
        total = 0
        for layer in self.layers:
            if layer._k is not None:
                total += layer._k.numel() * layer._k.element_size() + layer._v.numel() * layer._v.element_size()
                total += layer._pos.numel() * layer._pos.element_size()
        return total

    def full_cache_bytes(self, seen: Optional[int] = None) -> int:
        """Bytes an uncompressed cache would hold for the positions processed so far."""
        seen = self.seen_tokens if seen is None else seen
        return sum(seen * layer.row_bytes() for layer in self.layers)

    def stats(self) -> dict:
        return {
            "seen_tokens": self.seen_tokens,
            "cache_length": self.cache_length(),
            "peak_cache_length": self.peak_cache_length(),
            "max_allowed_length": self.max_allowed_length(),
            "kv_bytes": self.memory_bytes(),
            "peak_kv_bytes": self.peak_memory_bytes(),
            "allocated_bytes": self.allocated_bytes(),
            "full_cache_bytes": self.full_cache_bytes(),
        }


class GistCacheRows:
    """Rows of one batch that each keep their own :class:`GistCache`, attended in one forward.

    Prompts of different lengths sit at different positions, so their compressed caches
    have different layouts and cannot share one ``[B, H, N, D]`` buffer. ``unigist.generate``
    decodes such rows together: it calls the model on ``[rows, 1]`` new tokens with
    ``use_cache=False`` and ``gist_cache=GistCacheRows(...)``, and the attention function
    hands each row's keys and values to that row's cache and attends over it
    (:meth:`attend`), while everything else in the model runs batched.
    """

    def __init__(self, caches: list):
        if not caches or not all(isinstance(c, GistCache) for c in caches):
            raise TypeError("GistCacheRows takes a non-empty list of unigist.GistCache")
        self.caches = list(caches)
        self.active = list(range(len(self.caches)))  # which caches the batch rows are, in order

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.caches[i].get_seq_length() for i in self.active)

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        """Attention output ``[rows, Nq, Hq, D]``: row ``b`` appends its new keys/values to
        ``caches[active[b]]`` and attends over that cache (``unigist.hf`` attention)."""
        from .hf import unigist_attention_forward

        if query.shape[0] != len(self.active):
            raise RuntimeError(
                f"unigist: the batch has {query.shape[0]} rows but GistCacheRows has {len(self.active)} active caches"
            )
        outs = []
        for b, i in enumerate(self.active):
            cache = self.caches[i]
            k, v = cache.update(key[b : b + 1], value[b : b + 1], module.layer_idx)
            out, _ = unigist_attention_forward(module, query[b : b + 1], k, v, None, gist_cache=cache, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=0)


class GistCacheStep:
    """A decode step over a :class:`GistCache` whose every tensor has a fixed shape and address.

    ``unigist.generate`` captures one model call per feed length (1 or 2 positions: a token,
    or a gist and a token) in a CUDA graph and replays it at every step, so a step costs
    the GPU's time rather than the host's. What changes from step to step lives on the
    device, in :attr:`meta` (the fed ids, their positions and the cache rows they go to),
    written by :meth:`prepare` before each call:

    * the attention function (``gist_cache=step``) writes each layer's new keys, values and
      positions into the cache buffers at those rows (``index_copy_``) and attends over them:
      ``attention="kernel"`` runs ``torch.ops.unigist.gist_attention_cache_step``, the
      compressed-cache kernel reading the key layout from :attr:`layout` (device memory);
      ``"sdpa"`` (and any dtype or head dim the kernels lack) runs SDPA over a fixed number of
      leading rows, :attr:`rows`, with a mask built on the device from the rows' positions;
    * eviction stays on the host, between steps: :meth:`prepare` lets every layer evict
      (in place, so the buffers keep their addresses) and count the new rows in.

    The same object runs eagerly (CPU, or CUDA without graphs); the tests compare both with
    the ordinary cache path.
    """

    def __init__(self, cache: GistCache, num_positions: int, rows: int, device: torch.device,
                 attention: str = "kernel"):
        self.cache = cache
        self.n = num_positions
        layer = cache.layers[0]
        if layer._k is None:
            raise RuntimeError("unigist: GistCacheStep needs a GistCache that was prefilled")
        self.rows = min(layer.capacity, rows)
        self.device = device
        # Rows past the valid ones are masked, but a masked row still multiplies a zero weight
        # into its value: fresh buffer memory (NaN, inf) must not be there.
        for lay in cache.layers:
            lay._k[:, :, lay.length : self.rows].zero_()
            lay._v[:, :, lay.length : self.rows].zero_()
        # ids | positions | cache rows | the key layout of gist_attention_cache_step (q_offset,
        # cache_sinks, cache_gists, first_gist, tail_start, num_keys): one host-to-device copy per step
        self.meta = torch.zeros(3 * num_positions + 6, dtype=torch.long, device=device)
        self._host = torch.zeros(3 * num_positions + 6, dtype=torch.long, pin_memory=device.type == "cuda")
        self.layout = self.meta[3 * num_positions :]
        self.attention = attention
        self._key_rows = torch.arange(self.rows, device=device)
        self.ones = torch.ones(1, num_positions, dtype=torch.long, device=device)  # the model call's padding mask
        self._bytes_per_row = sum(lay.row_bytes() for lay in cache.layers)
        self._mask: Optional[torch.Tensor] = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.meta[: self.n][None]

    @property
    def position_ids(self) -> torch.Tensor:
        return self.meta[self.n : 2 * self.n][None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length()

    def prepare(self, ids: list, start: int) -> None:
        """Host side of a step feeding ``ids`` at positions ``start..``: evict and reserve rows in
        every layer (the buffers never move), then send ids, positions and rows to :attr:`meta`."""
        n = self.n
        if len(ids) != n:
            raise ValueError(f"unigist: this decode step feeds {n} positions, got {len(ids)}")
        first, *others = self.cache.layers
        row = first.reserve(n, views=False)
        if {o.reserve(n, views=False) for o in others} - {row}:
            raise RuntimeError("unigist: GistCache layers disagree about their rows; the cache was fed out of order")
        if first.seen != start + n:
            raise RuntimeError(f"unigist: the decode step feeds position {start} but the cache is at {first.seen - n}")
        if row + n > self.rows:
            raise RuntimeError(
                f"unigist: the decode step attends over {self.rows} cache rows but the cache holds {row + n}"
            )
        kl = first.key_layout()  # checks the rows against the layout arithmetic, too
        self._host.copy_(torch.tensor(
            list(ids) + list(range(start, start + n)) + list(range(row, row + n)) + [start, *kl, row + n]
        ))
        self.meta.copy_(self._host, non_blocking=True)
        # Every layer holds row + n rows now (they reserved alike).
        self.cache._peak_bytes = max(self.cache._peak_bytes, (row + n) * self._bytes_per_row)

    def begin(self) -> None:
        """Start of a model call: the first layer builds the mask that every layer shares."""
        self._mask = None

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: Optional[float] = None) -> torch.Tensor:
        """Attention output ``[1, n, Hq, D]`` of the step, device work only (graph-safe)."""
        layer = self.cache.layers[module.layer_idx]
        rows = self.meta[2 * self.n : 3 * self.n]
        q_pos = self.meta[self.n : 2 * self.n]
        layer._k.index_copy_(2, rows, key.to(layer._k.dtype))
        layer._v.index_copy_(2, rows, value.to(layer._v.dtype))
        layer._pos.index_copy_(0, rows, q_pos)
        query = query.to(layer._k.dtype)  # autocast hands RoPE's float32 q over
        c = self.cache.gist_config
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.attention == "kernel" and kernel_supports(query.device, query.dtype, query.shape[-1]):
            out, _ = torch.ops.unigist.gist_attention_cache_step(
                query, layer._k, layer._v, self.layout, c.ratio, c.window, c.num_sink, scale
            )
            return out.transpose(1, 2)
        from .hf import _additive_mask, _sdpa

        if self._mask is None:
            # Rows past the last one written take a position no query reaches (masked by causality).
            positions = torch.where(self._key_rows <= rows[-1], layer._pos[: self.rows], _NO_POSITION)
            self._mask = _additive_mask(q_pos, positions, c, query.dtype)
        keys, values = layer._k[:, :, : self.rows], layer._v[:, :, : self.rows]
        return _sdpa(query, keys, values, self._mask, scale).transpose(1, 2)
