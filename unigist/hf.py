"""Hugging Face integration: put UniGist attention into a ``transformers`` model.

:func:`patch_model` works on an already-loaded decoder of a supported family
(:data:`SUPPORTED_MODEL_TYPES`): it adds the gist token (to the tokenizer if one is given, and a row to
the embedding matrix initialised as the mean of the existing rows), registers
the ``"unigist"`` attention function with ``transformers.AttentionInterface``
and switches the model to it. The ``"unigist"`` entry of
``AttentionMaskInterface`` builds no dense mask: it only passes a 2-D padding
mask through (right padding is allowed), and the attention function derives the
UniGist mask from positions.

The attention function has three paths:

* keys from a :class:`unigist.GistCache` (chunked prefill and decoding): the cache
  reaches the attention function through the ``gist_cache`` forward kwarg (which
  :func:`unigist.generate` passes, and which the cache puts into the attention
  kwargs itself on transformers >= 5.24) and says where its rows sit, a
  :class:`unigist.layout.KeyLayout` ``[sinks | gists | contiguous tail]``. On CPU
  and CUDA every chunk and every decode step runs the op over that layout (no SDPA,
  no mask); on CUDA ``UNIGIST_CUDA_CACHE_KERNEL=0`` (or a forward that needs
  gradients, which the CUDA compressed-layout op lacks) runs chunks after the first
  eviction through SDPA with a mask built from the keys' positions;
* a :class:`unigist.cache.GistCacheRows` as ``gist_cache`` (:func:`unigist.generate` decoding a
  batch of prompts whose caches differ): each row goes through the first path with its own cache;
* a :class:`unigist.cache.GistCacheStep` as ``gist_cache`` (:func:`unigist.generate` decoding with
  fixed shapes, replayed as a CUDA graph): ``gist_attention_cache_step`` over the cache buffers, the
  layout read from device memory (SDPA with a mask built on the device where the kernels lack the
  dtype or head dim);
* a ``gist_key_positions`` forward kwarg: SDPA with a mask over those positions;
* otherwise queries and keys are positions ``0..N-1`` (training, a full-sequence
  forward): :func:`unigist.gist_attention` (the C++/CUDA op, differentiable). Keys from
  any other cache (transformers' ``model.generate``, a ``DynamicCache``), packed rows
  (``cu_seq_lens_*`` kwargs, restarting ``position_ids``) and other position ids raise.

Loading: ``import unigist`` registers ``"unigist"`` with transformers, so a model
saved after :func:`patch_model` (its config carries ``unigist_config``) comes back
patched from ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="unigist")``:
its attention modules read the GistConfig from the model config. Loaded with any
other attention it warns at its first forward, and :func:`get_gist_config` (hence
:func:`unigist.generate`) raises. :func:`patch_model` also installs two guards on the
instance: ``model.generate`` raises (pointing to :func:`unigist.generate`), and a
forward pre-hook warns once about un-interleaved input ids and positions past
``max_position_embeddings``.

:func:`unpatch_model` restores the previous attention implementation. The
extra embedding row (and the tokenizer's gist token) stay: they are harmless
for a model that never sees the gist id.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .cache import GistCacheRows, GistCacheStep
from .config import GistConfig
from .ops import gist_attention, has_cuda_kernels, kernel_supports
from .layout import gist_mask, gist_mask_from_positions
from .layout import is_gist as is_gist_position

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "patch_model",
    "unpatch_model",
    "get_gist_config",
    "is_patched",
    "unigist_attention_forward",
]

ATTENTION_NAME = "unigist"
# Decoders whose attention modules call transformers' AttentionInterface with separate
# q/k/v projections, each covered by an exact generation test (tests/test_generate.py,
# tests/test_hf_architectures.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma3_text")
# Attention modules that compute q, k and v with one fused projection.
_FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "W_pack", "c_attn", "Wqkv")
_warned: set = set()
# CUDA: use the interleaved gist_attention kernel for GistCache chunks before any
# eviction (the first prefill chunk); later chunks run SDPA with a positions mask
# until the CUDA kernels take the compressed layout. (CPU: always the kernel.)
USE_KERNEL_WITH_CACHE = True
# CUDA: run GistCache chunks after an eviction (later prefill chunks, decode steps)
# through the compressed-cache kernel (gist_attention(..., key_layout=)) instead of
# SDPA with a positions mask (benchmarks/results/attention_cache_cuda.md).
# UNIGIST_CUDA_CACHE_KERNEL=0 (or setting this to False) brings SDPA back.
USE_CUDA_CACHE_KERNEL = os.environ.get("UNIGIST_CUDA_CACHE_KERNEL", "1") != "0"


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# ---------------------------------------------------------------------------
# attention function
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _gist_config_from_items(items: tuple) -> GistConfig:
    return GistConfig(**dict(items))


def _stored_gist_config(model_config) -> Optional[GistConfig]:
    """The GistConfig saved in a ``transformers`` config (``config.unigist_config``), else None.

    Memoised on the dict's items: attention modules of a reloaded model look it up at
    every call.
    """
    stored = getattr(model_config, "unigist_config", None)
    if stored is None or isinstance(stored, GistConfig):
        return stored
    if not isinstance(stored, dict):
        raise TypeError(f"model.config.unigist_config must be a dict, got {type(stored).__name__}")
    if "gist_predicts_next" not in stored:
        # Saved before the option existed: those models were trained with the gist predicting.
        stored = {**stored, "gist_predicts_next": True}
    try:
        return _gist_config_from_items(tuple(sorted(stored.items())))
    except TypeError as e:
        raise TypeError(
            f"model.config.unigist_config={stored!r} is not a GistConfig this unigist version reads ({e}); "
            "it was saved by another unigist version"
        ) from None


def _find_gist_config(obj) -> Optional[GistConfig]:
    """The GistConfig of a model or attention module: the one :func:`patch_model` put on the
    object, else the dict in its ``transformers`` config (so it survives save and load), else None."""
    cfg = getattr(obj, "unigist_config", None)
    if isinstance(cfg, GistConfig):
        return cfg
    return _stored_gist_config(getattr(obj, "config", None))


def _module_gist_config(module) -> GistConfig:
    cfg = _find_gist_config(module)
    if cfg is not None:
        return cfg
    raise RuntimeError(
        "unigist attention was called on a module that unigist.patch_model did not patch "
        "(no GistConfig found); call unigist.patch_model(model, tokenizer, config) first"
    )


def _op_supports(q: torch.Tensor) -> bool:
    return kernel_supports(q.device, q.dtype, q.shape[-1])


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # For a few queries (decoding) skip the cuDNN backend: it plans a new graph
    # for every key length, ~2 ms of CPU per call, which dominates a decode step.
    _FEW_QUERY_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # pragma: no cover - older torch
    sdpa_kernel = None


def _sdpa(q, k, v, mask, scale):
    if sdpa_kernel is not None and q.is_cuda and q.shape[2] <= 16:
        with sdpa_kernel(_FEW_QUERY_BACKENDS):
            return _sdpa_call(q, k, v, mask, scale)
    return _sdpa_call(q, k, v, mask, scale)


def _sdpa_call(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and groups > 1:
        # One query: fold the query heads of a group into the query axis, so
        # keys are read once per kv head (no repeat of the cache); a [1, Nk]
        # mask broadcasts over the folded heads.
        b, hq, _, d = q.shape
        out = F.scaled_dot_product_attention(q.reshape(b, k.shape[1], groups, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(b, hq, 1, d)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _additive_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: GistConfig, dtype) -> torch.Tensor:
    """``[Nq, Nk]`` additive mask (0 / -inf) in ``dtype``; its rows are 16-element aligned
    so SDPA's memory-efficient kernel takes it without a copy."""
    visible = gist_mask_from_positions(q_pos, k_pos, cfg)
    nq, nk = visible.shape
    storage = torch.full((nq, nk + (-nk) % 16), float("-inf"), dtype=dtype, device=visible.device)
    mask = storage[:, :nk]
    mask.masked_fill_(visible, 0.0)
    return mask


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _check_full_forward(module, cfg: GistConfig, attention_mask, nq: int, nk: int, kwargs: dict) -> None:
    """Refuse what the full-forward path cannot compute: keys from a cache that is not a
    GistCache, packed rows, positions other than ``0..N-1``, left or inner padding.

    The tensor checks run at layer 0 only, once per forward, with one host sync
    (transformers' own packed-sequence detection costs the same), and not while
    ``torch.compile`` traces.
    """
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise ValueError(
            "unigist attention does not support packed rows (cu_seq_lens_q / cu_seq_lens_k, as from "
            "DataCollatorWithFlattening): the UniGist mask is laid out over one sequence per row, starting at "
            "position 0. Give every sequence its own row (unigist.GistCollator pads them on the right)"
        )
    if nq != nk:
        raise RuntimeError(
            f"unigist attention got {nk} keys for {nq} queries from a cache that is not a unigist.GistCache "
            "(transformers' model.generate, or a DynamicCache passed by hand). That cache keeps every key and "
            "generate does not insert gist tokens, so this is not what the model was trained for; generate with "
            "unigist.generate(model, tokenizer, prompt, max_new_tokens=...)"
        )
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError(
            "unigist attention builds the UniGist mask itself: pass no attention_mask, or a 2-D "
            f"[batch, seq] padding mask with right padding (got {type(attention_mask).__name__}"
            f"{'' if not isinstance(attention_mask, torch.Tensor) else ' of shape ' + str(tuple(attention_mask.shape))})"
        )
    if getattr(module, "layer_idx", 0) != 0:
        return
    _warn_past_max_positions(getattr(module, "config", None), nk)
    if _is_compiling():
        return
    valid = attention_mask.bool() if attention_mask is not None else None
    flags = []
    if valid is not None and valid.shape[-1] > 1:
        flags.append(("padding", (valid[:, 1:] & ~valid[:, :-1]).any()))
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == nq:
        wrong = pos != torch.arange(nq, device=pos.device)
        if valid is not None:
            wrong = wrong & valid  # padded slots may hold any position
        flags.append(("positions", wrong.any()))
    if not flags:
        return
    found = dict(zip([name for name, _ in flags], torch.stack([f for _, f in flags]).tolist()))
    if found.get("padding"):
        raise ValueError(
            "unigist attention supports right padding only (a padded key never precedes a real one, "
            "so the causal UniGist mask already hides it); this attention_mask has left or inner padding"
        )
    if found.get("positions"):
        step = pos[:, 1:] - pos[:, :-1]
        if valid is not None:
            step = torch.where(valid[:, 1:], step, 1)
        if bool((step <= 0).any()):
            raise ValueError(
                "unigist attention does not support packed rows: position_ids restart within a row (as from "
                "DataCollatorWithFlattening). The UniGist mask and the gist slots are laid out over one sequence "
                "per row, positions 0..N-1; give every sequence its own row (unigist.GistCollator pads them)"
            )
        raise ValueError(
            "unigist attention needs position_ids 0..N-1 in every row of a full forward (the gist slots and "
            f"the mask are laid out by position); got rows starting at {pos[:, 0].tolist()[:8]}. Feed the "
            "whole interleaved sequence, or generate with unigist.generate (it passes a GistCache)"
        )


def _warn_past_max_positions(model_config, end: int) -> None:
    """Warn once when positions ``0..end-1`` run past the model's ``max_position_embeddings``."""
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and end > max_pos:
        _warn_once(
            f"max-positions-{max_pos}",
            f"unigist: positions reach {end - 1}, past max_position_embeddings={max_pos}. The interleaved "
            "sequence holds one gist per `ratio` raw tokens, so it is (ratio + 1) / ratio times longer than the "
            "text; RoPE extrapolates beyond the positions the model was trained on and quality may drop",
        )


def unigist_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """``transformers`` attention function of UniGist.

    query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]``; returns
    ``(attn_output [B, Nq, Hq, D], None)`` like every ``AttentionInterface`` function.
    Key positions come from a :class:`unigist.GistCache` (the ``gist_cache`` kwarg,
    see the module docstring) or from a ``gist_key_positions`` forward kwarg;
    otherwise queries and keys are the same positions ``0..N-1`` (a full forward):
    keys from any other cache (``model.generate``), packed rows and other position
    ids raise, see :func:`_check_full_forward`.
    """
    cfg = _module_gist_config(module)
    if dropout:
        raise NotImplementedError(
            "unigist attention has no attention dropout; set model.config.attention_dropout = 0.0"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("unigist attention does not support attention logit softcapping")
    if isinstance(kwargs.get("gist_cache"), GistCacheStep):
        # A decode step with fixed shapes (unigist.generate, replayed as a CUDA graph).
        return kwargs["gist_cache"].attend(module, query, key, value, scaling=scaling), None
    if isinstance(kwargs.get("gist_cache"), GistCacheRows):
        # Rows with caches of their own (unigist.generate decoding a batch): one call per row.
        rest = {k: v for k, v in kwargs.items() if k not in ("gist_cache", "position_ids")}
        return kwargs["gist_cache"].attend(module, query, key, value, scaling=scaling, **rest), None
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    nq, nk = query.shape[2], key.shape[2]

    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        # Under autocast RoPE hands back float32 q/k. SDPA would compute in the
        # autocast dtype, and so does the kernel (it takes 16-bit inputs only).
        amp_dtype = torch.get_autocast_dtype("cuda")
        query, key, value = (t if t.dtype == amp_dtype else t.to(amp_dtype) for t in (query, key, value))

    cache = kwargs.get("gist_cache")
    k_pos = kwargs.get("gist_key_positions")
    if cache is not None:
        # Keys from a GistCache: its layer says where they sit ([sinks | gists | tail]).
        key_layout, q_offset = cache.attention_args(module.layer_idx, nk, nq)
        # The CUDA kernel has no backward over this layout: a forward that needs
        # gradients keeps SDPA.
        cuda_kernel = (
            query.is_cuda
            and USE_CUDA_CACHE_KERNEL
            and not key_layout.is_interleaved
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
        )
        if _op_supports(query) and (query.device.type == "cpu" or cuda_kernel):
            if key_layout.is_interleaved:
                out = gist_attention(query, key, value, cfg, softmax_scale=scale, q_offset=q_offset)
            else:
                # The op itself, without gist_attention's Python checks: the cache built this
                # layout and the C++ entry checks it again. Decoding is bound by per-call host
                # time, and these checks cost as much as the op's own dispatch.
                out, _ = torch.ops.unigist.gist_attention_cache_fwd(
                    query, key, value, cfg.ratio, cfg.window, cfg.num_sink, scale, q_offset, *key_layout
                )
            return out.transpose(1, 2).contiguous(), None
        if key_layout.is_interleaved and USE_KERNEL_WITH_CACHE and _op_supports(query):
            # Nothing evicted yet (the first prefill chunk): the interleaved kernel.
            out = gist_attention(query, key, value, cfg, softmax_scale=scale, q_offset=q_offset)
            return out.transpose(1, 2).contiguous(), None
        # CUDA without the compressed-cache kernel: SDPA with a mask over the keys'
        # positions (none when every cached key is visible to one query).
        layer = cache.layers[module.layer_idx]
        if layer.all_visible and nq == 1:
            mask = None
        else:
            memo_key = (q_offset, nq, nk, query.dtype, query.device)
            mask = cache._mask_memo.get(memo_key)
            if mask is None:
                k_pos = layer.positions.to(query.device)
                mask = _additive_mask(k_pos[-nq:], k_pos, cfg, query.dtype)
                cache._mask_memo.clear()
                cache._mask_memo[memo_key] = mask
        out = _sdpa(query, key, value, mask, scale)
    elif k_pos is not None:
        if k_pos.shape[-1] != nk:
            raise ValueError(f"gist key positions ({k_pos.shape[-1]}) do not match the number of keys ({nk})")
        k_pos = k_pos.to(query.device)
        out = _sdpa(query, key, value, _additive_mask(k_pos[-nq:], k_pos, cfg, query.dtype), scale)
    else:
        # Queries and keys at positions 0..N-1 (training, a full-sequence forward).
        _check_full_forward(module, cfg, attention_mask, nq, nk, kwargs)
        q_offset = 0
        if _op_supports(query):
            out = gist_attention(query, key, value, cfg, softmax_scale=scale, q_offset=q_offset)
        else:
            _warn_once(
                f"dense-{query.device.type}-{query.dtype}-{query.shape[-1]}",
                f"unigist: no gist_attention kernel for {query.device.type}/{query.dtype}/head_dim "
                f"{query.shape[-1]}; using SDPA with a dense UniGist mask (slow, O(N^2) memory)",
            )
            mask = gist_mask(nq, nk, cfg, q_offset=q_offset, device=query.device)
            out = _sdpa(query, key, value, mask, scale)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------


def unigist_mask_function(*args, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """``AttentionMaskInterface`` entry of ``"unigist"``: builds no dense mask, it only hands
    the 2-D padding mask (or None) through to the attention function, which checks that
    padding is on the right (where the causal UniGist mask already hides it)."""
    return attention_mask


def _warn_unpatched(attn_name: str) -> None:
    _warn_once(
        f"unpatched-{attn_name}",
        f"unigist: this model's config carries a unigist_config (it was trained with UniGist gist tokens) but "
        f"the model runs {attn_name!r} attention, which ignores the UniGist mask, so its forward passes do not "
        "compute what it was trained for. Load it with AutoModelForCausalLM.from_pretrained(path, "
        "attn_implementation=\"unigist\") after `import unigist`, or call unigist.patch_model(model, tokenizer); "
        "unigist.unpatch_model(model) drops the config if full attention is what you want",
    )


def _guard_unpatched(attn_name: str, mask_fn):
    """Wrap one of transformers' mask builders so that a model that carries a ``unigist_config``
    but runs that attention warns at its first forward. transformers calls the mask builder
    once per forward with the model config; no other per-model hook exists for a model that
    ``from_pretrained`` loaded without ``attn_implementation="unigist"``."""

    @functools.wraps(mask_fn)
    def guarded(*args, **kwargs):
        if getattr(kwargs.get("config"), "unigist_config", None) is not None:
            _warn_unpatched(attn_name)
        return mask_fn(*args, **kwargs)

    guarded._unigist_guard = True
    return guarded


def _register() -> None:
    """Register ``"unigist"`` with transformers (runs at ``import unigist``) and guard the
    other mask builders (see :func:`_guard_unpatched`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, unigist_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, unigist_mask_function)
    for name in list(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()):
        fn = ALL_MASK_ATTENTION_FUNCTIONS[name]
        if name != ATTENTION_NAME and not getattr(fn, "_unigist_guard", False):
            AttentionMaskInterface.register(name, _guard_unpatched(name, fn))


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _fused_qkv(module) -> Optional[str]:
    return next((n for n in _FUSED_QKV_NAMES if isinstance(getattr(module, n, None), torch.nn.Module)), None)


def _attention_modules(model) -> list:
    """Attention modules: a ``layer_idx`` and separate q/k/v/o projections, or a fused one."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and (all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or _fused_qkv(m) is not None)
    ]


def _head_dim(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _check_supported(model, config: GistConfig, allow_unsupported: bool) -> list:
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("unigist.patch_model: encoder-decoder models are not supported (decoder-only causal LMs)")
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    if softcap is not None:
        # Not even with allow_unsupported: the scores would be wrong, not merely untested.
        raise ValueError(
            f"unigist.patch_model: models that cap attention logits are not supported: {model_type!r} has "
            f"attn_logit_softcapping={softcap} (Gemma 2 style), and the unigist kernels compute a plain "
            "softmax(q k^T * scale), so every attention score would differ from what the model was trained with"
        )
    modules = _attention_modules(model)
    fused = sorted({_fused_qkv(m) for m in modules} - {None})
    if fused and not allow_unsupported:
        raise ValueError(
            f"unigist.patch_model: fused-qkv models are not supported: {type(model).__name__} computes q, k and v "
            f"with one projection ({', '.join(fused)}, Phi-3 style). unigist is verified (exact generation tests) "
            "only on attention with separate q_proj / k_proj / v_proj, which its PEFT recipe targets too; pass "
            "allow_unsupported=True to try it anyway"
        )
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_unsupported:
        raise ValueError(
            f"unigist.patch_model: model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Pass allow_unsupported=True to try a decoder whose attention "
            "calls the AttentionInterface the same way"
        )
    if not modules:
        raise ValueError(
            f"unigist.patch_model: found no attention modules (q/k/v/o_proj with layer_idx) in {type(model).__name__}"
        )
    if getattr(model, "_can_set_attn_implementation", None) is not None:
        try:
            ok = model._can_set_attn_implementation()
        except Exception:  # pragma: no cover - private API drift
            ok = True
        if not ok:
            raise ValueError(
                f"unigist.patch_model: {type(model).__name__} does not dispatch attention through "
                "transformers' AttentionInterface"
            )
    # Sliding-window attention: the gist mask replaces the model's window; it
    # conflicts when the model never attended as far back as the gist window.
    sw = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    uses_sw = sw is not None and (
        model_type == "mistral"
        or "sliding_attention" in layer_types
        or bool(getattr(cfg, "use_sliding_window", False))
    )
    if uses_sw and sw < config.window:
        raise ValueError(
            f"unigist.patch_model: the model uses sliding-window attention of {sw} positions, shorter than "
            f"GistConfig.window={config.window}; use window <= {sw} (the UniGist mask replaces the sliding window)"
        )
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        raise ValueError(
            "unigist.patch_model: attention_dropout > 0 is not supported; set model.config.attention_dropout = 0.0"
        )
    head_dim = _head_dim(cfg)
    devices = {p.device.type for p in model.parameters()}
    if "cuda" in devices and has_cuda_kernels() and not kernel_supports("cuda", torch.bfloat16, head_dim):
        raise ValueError(
            f"unigist.patch_model: head_dim {head_dim} is not supported by the CUDA kernels (64 or 128)"
        )
    return modules


def _resolve_gist_token(model, tokenizer, config: GistConfig) -> tuple[int, bool]:
    """Gist token id, and whether it is new to the tokenizer (or to a model without one)."""
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if config.gist_token in vocab:
            gid = vocab[config.gist_token]
            added = False
        else:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(config.gist_token, special=True, normalized=False)], special_tokens=True)
            gid = tokenizer.convert_tokens_to_ids(config.gist_token)
            added = True
        if config.gist_token_id is not None and config.gist_token_id != gid:
            raise ValueError(
                f"unigist.patch_model: config.gist_token_id={config.gist_token_id} but the tokenizer maps "
                f"{config.gist_token!r} to {gid}"
            )
        return gid, added
    if config.gist_token_id is not None:
        return config.gist_token_id, False
    stored = _stored_gist_config(model.config)
    if stored is not None and stored.gist_token_id is not None:
        return stored.gist_token_id, False
    return model.get_input_embeddings().weight.shape[0], True


def _gist_row_trained(model, gist_id: int) -> bool:
    """Whether the gist row is one UniGist training (or this process's patch_model) produced:
    the model config carries a unigist_config with this id (a saved fine-tuned model), or this
    instance was patched before (unpatch_model keeps the row)."""
    stored = _stored_gist_config(model.config)
    if stored is not None and stored.gist_token_id == gist_id:
        return True
    return getattr(model, "_unigist_gist_token_id", None) == gist_id


@torch.no_grad()
def _init_rows(weight: torch.Tensor, row: int, old_rows: int) -> None:
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[row] = False
    keep[old_rows:] = False
    if not bool(keep.any()):
        keep[:] = True
        keep[row] = False
    weight[row] = weight[keep].float().mean(0).to(weight.dtype)


def _refuse_hf_generate(model, *args, **kwargs):
    """What ``model.generate`` is on a patched model (see :func:`patch_model`)."""
    raise RuntimeError(
        "model.generate() does not run UniGist: transformers' generation feeds the raw tokens without gist "
        "tokens and keeps every key in a plain cache, which is not what the model was trained for. Use "
        "unigist.generate(model, tokenizer, prompt, max_new_tokens=...), which interleaves the gists and evicts "
        "the cache (unigist.unpatch_model(model) gives back plain attention and model.generate)"
    )


class _InputCheck:
    """Forward pre-hook :func:`patch_model` puts on the decoder; warns once about inputs the
    UniGist layout cannot mean:

    * positions past ``max_position_embeddings`` (from the input length and the cache's
      ``get_seq_length()``; no tensor is read);
    * on forwards without a cache (training, a full forward), ``input_ids`` that are not
      interleaved: a gist slot (position ``p % (ratio + 1) == ratio``) holding another id
      outside padding, or a raw slot holding the gist id. Without an attention mask, padding
      is taken to be a row's tail after its last gist. The result is read without a host
      sync on CUDA (a pinned copy, looked at on a later call once it has landed), and
      checking stops after the first warning.
    """

    def __init__(self) -> None:
        self._pending: list = []

    def __deepcopy__(self, memo):
        return _InputCheck()  # pending CUDA events stay with the original

    def __getstate__(self):
        return {"_pending": []}

    def __call__(self, module, args, kwargs):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # a CUDA graph being captured (unigist.generate): no event queries, no host reads
        self._drain()
        cfg = _stored_gist_config(getattr(module, "config", None))
        if cfg is None or cfg.gist_token_id is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        cache = next((kwargs[k] for k in ("gist_cache", "cache", "past_key_values") if kwargs.get(k) is not None), None)
        start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        _warn_past_max_positions(module.config, start + x.shape[1])
        if cache is None and isinstance(ids, torch.Tensor) and "uninterleaved" not in _warned and not _is_compiling():
            self._defer(_uninterleaved(ids, kwargs.get("attention_mask"), cfg))
        return None

    def _defer(self, flag: torch.Tensor) -> None:
        if flag.device.type != "cuda":
            if bool(flag):
                _warn_uninterleaved()
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host))

    def _drain(self) -> None:
        if not self._pending:
            return
        waiting = []
        for event, host in self._pending:
            if not event.query():
                waiting.append((event, host))
            elif bool(host):
                _warn_uninterleaved()
        self._pending = waiting


def _uninterleaved(ids: torch.Tensor, attention_mask, cfg: GistConfig) -> torch.Tensor:
    """0-d bool tensor: ``ids [B, N]`` (positions ``0..N-1``) break the gist layout outside padding."""
    r = cfg.ratio
    n = ids.shape[-1]
    slots = is_gist_position(torch.arange(n, device=ids.device), r)
    is_gist = ids == cfg.gist_token_id
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == ids.shape:
        return ((is_gist != slots) & attention_mask.bool()).any()
    bad = (is_gist & ~slots).any()
    if n > r:
        at_slots = is_gist[:, slots]
        # A row's gist slots hold gists up to where its padding starts, then none.
        bad = bad | (at_slots[:, 1:] & ~at_slots[:, :-1]).any() | ~is_gist.any()
    return bad


def _warn_uninterleaved() -> None:
    _warn_once(
        "uninterleaved",
        "unigist: input_ids are not interleaved with gist tokens: a gist slot (every (ratio + 1)-th position) "
        "holds another id outside padding, or a raw slot holds the gist id. The UniGist mask treats every "
        "(ratio + 1)-th position as a gist whatever it holds; build inputs with unigist.GistCollator or "
        "unigist.layout.insert_gists",
    )


def _install_guards(model) -> None:
    _remove_guards(model)
    # An instance attribute, as transformers itself does for a custom generate; PEFT's
    # generate reaches it through the wrapped model.
    model.generate = functools.partial(_refuse_hf_generate, model)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    target = decoder if isinstance(decoder, torch.nn.Module) else model
    # On the decoder, not the LM: PEFT calls the LM's forward() directly, which skips its hooks.
    model._unigist_hook = target.register_forward_pre_hook(_InputCheck(), with_kwargs=True)


def _remove_guards(model) -> None:
    g = model.__dict__.get("generate")
    if isinstance(g, functools.partial) and g.func is _refuse_hf_generate:
        del model.__dict__["generate"]
    handle = model.__dict__.pop("_unigist_hook", None)
    if handle is not None:
        handle.remove()


def patch_model(
    model,
    tokenizer=None,
    config: Optional[GistConfig] = None,
    *,
    allow_unsupported: bool = False,
    init_gist_embedding: Union[str, bool] = "auto",
) -> GistConfig:
    """Switch a loaded ``transformers`` causal LM to UniGist attention, in place.

    Args:
        model: a ``...ForCausalLM`` of a supported family (:data:`SUPPORTED_MODEL_TYPES`:
            Llama, Mistral, Qwen2, Qwen3, OLMo2, Gemma3 text), already loaded, any device.
        tokenizer: optional; the gist token (``config.gist_token``) is added to it as a special token.
        config: the gist layout; default: the one saved in the model config (a model saved
            after patching), else ``GistConfig()``.
        allow_unsupported: try other decoder types whose attention modules call the
            ``AttentionInterface`` like Llama does (fused-qkv models included).
        init_gist_embedding: set the gist token's embedding row (and the LM head's row when
            untied) to the mean of the other rows. ``"auto"`` (default): when the row is new,
            or the vocabulary already has the token but the row was not trained with UniGist
            (the model config carries no ``unigist_config``); ``True``: always; ``False``:
            never (a new row keeps ``resize_token_embeddings``' initialisation).

    Returns:
        ``config`` with ``gist_token_id`` filled in (also stored as ``model.unigist_config``
        and, as a dict, in ``model.config.unigist_config`` so it is saved with the model).

    Besides the attention, the instance gets two guards: ``model.generate`` raises (it would
    not insert gists; use :func:`unigist.generate`), and a forward pre-hook on the decoder
    warns once about un-interleaved ``input_ids`` and positions past
    ``max_position_embeddings``. :func:`unpatch_model` removes both.

    Raises ``ValueError`` for unsupported models or configurations (softcapped attention
    logits, fused q/k/v projections, sliding windows shorter than ``config.window``, ...).
    """
    if config is None:
        config = _stored_gist_config(model.config) or GistConfig()
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    if not (init_gist_embedding == "auto" or isinstance(init_gist_embedding, bool)):
        raise ValueError(f"init_gist_embedding must be 'auto', True or False, got {init_gist_embedding!r}")
    modules = _check_supported(model, config, allow_unsupported)

    gist_id, added = _resolve_gist_token(model, tokenizer, config)
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    wanted = max(gist_id + 1, len(tokenizer) if tokenizer is not None else 0)
    resized = wanted > old_rows
    if resized:
        model.resize_token_embeddings(wanted, mean_resizing=False)
    if init_gist_embedding == "auto":
        init = added or resized or not _gist_row_trained(model, gist_id)
    else:
        init = init_gist_embedding
    if init:
        emb = model.get_input_embeddings()
        _init_rows(emb.weight, gist_id, old_rows)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
            _init_rows(out.weight, gist_id, old_rows)
            if getattr(out, "bias", None) is not None:
                with torch.no_grad():
                    out.bias[gist_id] = out.bias[:old_rows].mean()
    config = config.replace(gist_token_id=int(gist_id))

    _register()
    if not is_patched(model):
        model._unigist_previous_attn = model.config._attn_implementation
    _set_attn_implementation(model, ATTENTION_NAME)
    for m in modules:
        m.unigist_config = config
    model.unigist_config = config
    model.config.unigist_config = config.to_dict()
    model._unigist_gist_token_id = int(gist_id)
    _install_guards(model)
    return config


def _set_attn_implementation(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:  # pragma: no cover - older API
        for cfg in {id(c): c for c in [model.config, _text_config(model)]}.values():
            cfg._attn_implementation = name
    if model.config._attn_implementation != name:  # pragma: no cover
        model.config._attn_implementation = name


def is_patched(model) -> bool:
    """Whether ``model`` runs UniGist attention: it has a GistConfig (from :func:`patch_model`
    or its saved config) and its attention implementation is ``"unigist"``."""
    return (
        _find_gist_config(model) is not None
        and getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME
    )


def get_gist_config(model) -> GistConfig:
    """The GistConfig of a model that runs UniGist attention (what :func:`unigist.generate` calls).

    Raises ``ValueError`` when the model has none (never patched), and when its config
    carries one but the model runs another attention (a saved UniGist model loaded without
    ``attn_implementation="unigist"``).
    """
    cfg = _find_gist_config(model)
    if cfg is None:
        raise ValueError("model is not patched: call unigist.patch_model(model, tokenizer, config) first")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != ATTENTION_NAME:
        raise ValueError(
            f"model is not patched: its config carries a unigist_config (it was trained with UniGist) but it runs "
            f"{impl!r} attention. Load it with AutoModelForCausalLM.from_pretrained(path, "
            "attn_implementation=\"unigist\") after `import unigist`, or call unigist.patch_model(model, tokenizer)"
        )
    return cfg


def unpatch_model(model):
    """Undo :func:`patch_model` (or a load with ``attn_implementation="unigist"``): restore the
    previous attention implementation (sdpa when unknown), remove the guards and the saved
    ``unigist_config``.

    The gist token's embedding row (and the tokenizer's gist token) are left in
    place; they do nothing unless the gist id is fed, and a later :func:`patch_model`
    keeps the row. Returns ``model``.
    """
    if not is_patched(model):
        raise ValueError("model is not patched by unigist")
    previous = getattr(model, "_unigist_previous_attn", None) or "sdpa"
    _set_attn_implementation(model, previous)
    for m in _attention_modules(model):
        m.__dict__.pop("unigist_config", None)
    model.__dict__.pop("unigist_config", None)
    model.__dict__.pop("_unigist_previous_attn", None)
    _remove_guards(model)
    if hasattr(model.config, "unigist_config"):
        del model.config.unigist_config
    return model


# `import unigist` registers the attention, so from_pretrained(..., attn_implementation="unigist") works.
_register()
