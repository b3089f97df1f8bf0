"""Hugging Face integration: put UniGist attention into a ``transformers`` model.

:func:`patch_model` works on an already-loaded Llama / Qwen2 / Mistral-style
decoder: it adds the gist token (to the tokenizer if one is given, and a row to
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
  every chunk and every decode step runs the op over that layout (no SDPA, no
  mask). On CUDA the op has no compressed-layout kernel yet: the chunks before the
  first eviction run the interleaved kernel, later ones SDPA with a mask built from
  the keys' positions (none in decoding, where every cached key is visible);
* a ``gist_key_positions`` forward kwarg: SDPA with a mask over those positions;
* otherwise keys sit at positions ``0..Nk-1`` (training, a full-sequence forward,
  a plain ``DynamicCache``): :func:`unigist.gist_attention` (the C++/CUDA op,
  differentiable) with ``q_offset = Nk - Nq``.

:func:`unpatch_model` restores the previous attention implementation. The
extra embedding row (and the tokenizer's gist token) stay: they are harmless
for a model that never sees the gist id.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .config import GistConfig
from .ops import gist_attention, has_cuda_kernels
from .layout import gist_mask, gist_mask_from_positions

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
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set = set()
# CUDA: use the interleaved gist_attention kernel for GistCache chunks before any
# eviction (the first prefill chunk); later chunks run SDPA with a positions mask
# until the CUDA kernels take the compressed layout. (CPU: always the kernel.)
USE_KERNEL_WITH_CACHE = True


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# ---------------------------------------------------------------------------
# attention function
# ---------------------------------------------------------------------------


def _find_gist_config(obj) -> Optional[GistConfig]:
    """The GistConfig patch_model recorded on a model or attention module (on the
    object itself, or as a dict in its HF config so it survives save/load), else None."""
    cfg = getattr(obj, "unigist_config", None)
    if isinstance(cfg, GistConfig):
        return cfg
    stored = getattr(getattr(obj, "config", None), "unigist_config", None)
    if isinstance(stored, dict):
        return GistConfig(**stored)
    return None


def _module_gist_config(module) -> GistConfig:
    cfg = _find_gist_config(module)
    if cfg is not None:
        return cfg
    raise RuntimeError(
        "unigist attention was called on a module that unigist.patch_model did not patch "
        "(no GistConfig found); call unigist.patch_model(model, tokenizer, config) first"
    )


def _op_supports(q: torch.Tensor) -> bool:
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if q.device.type == "cuda":
        return has_cuda_kernels() and q.dtype in _CUDA_DTYPES and q.shape[-1] in _CUDA_HEAD_DIMS
    return False


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


def _check_padding_mask(attention_mask, module) -> None:
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            "unigist attention builds the UniGist mask itself: pass no attention_mask, or a 2-D "
            f"[batch, seq] padding mask with right padding (got {type(attention_mask).__name__}"
            f"{'' if not isinstance(attention_mask, torch.Tensor) else ' of shape ' + str(tuple(attention_mask.shape))})"
        )
    if getattr(module, "layer_idx", 0) == 0:  # checked once per forward
        m = attention_mask.bool()
        if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
            raise ValueError(
                "unigist attention supports right padding only (a padded key never precedes a real one, "
                "so the causal UniGist mask already hides it); this attention_mask has left or inner padding"
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
    otherwise keys are taken to sit at positions ``0..Nk-1`` and queries at the
    last ``Nq`` of them.
    """
    cfg = _module_gist_config(module)
    if dropout:
        raise NotImplementedError(
            "unigist attention has no attention dropout; set model.config.attention_dropout = 0.0"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("unigist attention does not support attention logit softcapping")
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
        if query.device.type == "cpu" and _op_supports(query):
            out = gist_attention(query, key, value, cfg, softmax_scale=scale, q_offset=q_offset, key_layout=key_layout)
            return out.transpose(1, 2).contiguous(), None
        if key_layout.is_interleaved and USE_KERNEL_WITH_CACHE and _op_supports(query):
            # Nothing evicted yet (the first prefill chunk): the interleaved kernel.
            out = gist_attention(query, key, value, cfg, softmax_scale=scale, q_offset=q_offset)
            return out.transpose(1, 2).contiguous(), None
        # CUDA has no kernel for the compressed layout yet: SDPA with a mask over the
        # keys' positions (none when every cached key is visible to one query).
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
        # Keys at positions 0..Nk-1 (training, a full forward, a DynamicCache),
        # queries at the last Nq of them.
        _check_padding_mask(attention_mask, module)
        q_offset = nk - nq
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


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, unigist_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, unigist_mask_function)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _attention_modules(model) -> list:
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ]


def _head_dim(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def _check_supported(model, config: GistConfig, allow_unsupported: bool) -> list:
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("unigist.patch_model: encoder-decoder models are not supported (decoder-only causal LMs)")
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_unsupported:
        raise ValueError(
            f"unigist.patch_model: model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama/Qwen2/Mistral-style decoders). Pass "
            "allow_unsupported=True to try a decoder whose attention calls the AttentionInterface the same way"
        )
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"unigist.patch_model: found no Llama-style attention modules (q/k/v/o_proj with layer_idx) in "
            f"{type(model).__name__}"
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
    if "cuda" in devices and head_dim not in _CUDA_HEAD_DIMS:
        raise ValueError(
            f"unigist.patch_model: head_dim {head_dim} is not supported by the CUDA kernels (64 or 128)"
        )
    return modules


def _resolve_gist_token(model, tokenizer, config: GistConfig) -> tuple[int, bool]:
    """Gist token id, and whether it is new (its embedding must be initialised)."""
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
    stored = getattr(model.config, "unigist_config", None)
    if isinstance(stored, dict) and stored.get("gist_token_id") is not None:
        return int(stored["gist_token_id"]), False
    return model.get_input_embeddings().weight.shape[0], True


@torch.no_grad()
def _init_rows(weight: torch.Tensor, row: int, old_rows: int) -> None:
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[row] = False
    keep[old_rows:] = False
    if not bool(keep.any()):
        keep[:] = True
        keep[row] = False
    weight[row] = weight[keep].float().mean(0).to(weight.dtype)


def patch_model(
    model,
    tokenizer=None,
    config: Optional[GistConfig] = None,
    *,
    allow_unsupported: bool = False,
) -> GistConfig:
    """Switch a loaded ``transformers`` causal LM to UniGist attention, in place.

    Args:
        model: a Llama / Qwen2 / Mistral-style ``...ForCausalLM`` (already loaded, any device).
        tokenizer: optional; the gist token (``config.gist_token``) is added to it as a special token.
        config: the gist layout (default ``GistConfig()``).
        allow_unsupported: try other decoder types whose attention modules call the
            ``AttentionInterface`` like Llama does.

    Returns:
        ``config`` with ``gist_token_id`` filled in (also stored as ``model.unigist_config``
        and, as a dict, in ``model.config.unigist_config`` so it is saved with the model).

    The embedding matrix gets a row for the gist token when needed, initialised
    to the mean of the existing rows (as is the LM head row when it is not tied).
    Raises ``ValueError`` for unsupported models or configurations.
    """
    config = GistConfig() if config is None else config
    if not isinstance(config, GistConfig):
        raise TypeError(f"config must be a unigist.GistConfig, got {type(config).__name__}")
    modules = _check_supported(model, config, allow_unsupported)

    gist_id, is_new = _resolve_gist_token(model, tokenizer, config)
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    wanted = max(gist_id + 1, len(tokenizer) if tokenizer is not None else 0)
    if wanted > old_rows:
        model.resize_token_embeddings(wanted, mean_resizing=False)
        is_new = True
    if is_new:
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
    return isinstance(getattr(model, "unigist_config", None), GistConfig)


def get_gist_config(model) -> GistConfig:
    """The GistConfig :func:`patch_model` recorded on ``model``."""
    cfg = _find_gist_config(model)
    if cfg is not None:
        return cfg
    raise ValueError("model is not patched: call unigist.patch_model(model, tokenizer, config) first")


def unpatch_model(model):
    """Undo :func:`patch_model`: restore the previous attention implementation.

    The gist token's embedding row (and the tokenizer's gist token) are left in
    place; they do nothing unless the gist id is fed. Returns ``model``.
    """
    if not is_patched(model):
        raise ValueError("model is not patched by unigist")
    previous = getattr(model, "_unigist_previous_attn", None) or "sdpa"
    _set_attn_implementation(model, previous)
    for m in _attention_modules(model):
        if hasattr(m, "unigist_config"):
            del m.unigist_config
    del model.unigist_config
    if hasattr(model, "_unigist_previous_attn"):
        del model._unigist_previous_attn
    if hasattr(model.config, "unigist_config"):
        del model.config.unigist_config
    return model
