"""Training-free KV eviction on an unpatched Hugging Face model, through its own cache.

The model runs its own forward (no second hand-written Llama): the prompt streams in chunks
through a ``transformers.DynamicCache``; kvpress-style forward hooks on every attention module
prune that layer's cache rows after the chunk went through, down to a budget:

* ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``num_sink`` rows and the most recent ones;
* ``snapkv`` (SnapKV, Li et al. 2024): the last ``obs_window`` queries of the chunk score every
  cached key (softmax attention, averaged over the window and over the query heads of a KV
  head, max-pooled over ``kernel`` neighbours); per KV head the top ``budget - obs_window`` keys
  are kept, plus the observation window itself. Compressing after every chunk keeps the peak
  memory ``budget + chunk``, the same as UniGist's chunked prefill.

Cached keys keep the RoPE of their original positions (``position_ids`` are passed
explicitly); every chunk gets an explicit 4-D boolean mask (all cached rows visible, causal
inside the chunk), which ``transformers`` takes as-is.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

POLICIES = ("full", "streaming", "snapkv")


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]


class EvictionPress:
    """Forward hooks that shrink each layer's ``DynamicCache`` rows to ``budget`` after a forward.

    Use as a context manager around the chunked forwards (:func:`chunked_logits`).
    """

    def __init__(self, model, policy: str, budget: int, num_sink: int = 2, obs_window: int = 8, kernel: int = 5):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "streaming" and budget <= num_sink:
            raise ValueError("budget must exceed num_sink")
        if policy == "snapkv" and budget <= obs_window:
            raise ValueError("budget must exceed the observation window")
        self.model, self.policy, self.budget = model, policy, int(budget)
        self.num_sink, self.obs_window, self.kernel = num_sink, obs_window, kernel
        self.handles: List = []
        self.peak = 0

    def __enter__(self):
        if self.policy != "full":
            for m in _attention_modules(self.model):
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return
        layer = cache.layers[module.layer_idx]
        n = layer.keys.shape[-2]
        self.peak = max(self.peak, n)
        if n <= self.budget:
            return
        if self.policy == "streaming":
            dev = layer.keys.device
            idx = torch.cat([torch.arange(self.num_sink, device=dev),
                             torch.arange(n - (self.budget - self.num_sink), n, device=dev)])
            layer.keys = layer.keys[:, :, idx]
            layer.values = layer.values[:, :, idx]
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        keep = self._snapkv_keep(module, hidden, cos, sin, layer.keys)
        gather = keep[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)

    def _snapkv_keep(self, module, hidden, cos, sin, keys) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, c, _ = hidden.shape
        w = min(self.obs_window, c)
        hd = module.head_dim
        q = module.q_proj(hidden[:, -w:]).view(b, w, -1, hd).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -w:], sin[:, -w:])
        hkv, n = keys.shape[1], keys.shape[2]
        groups = q.shape[1] // hkv
        k = keys[:, :, None].expand(b, hkv, groups, n, hd).reshape(b, hkv * groups, n, hd)
        att = (q.float() @ k.float().transpose(-1, -2)) * module.scaling  # [b, hq, w, n], float32 scores
        dev = keys.device
        causal = torch.arange(n, device=dev)[None, :] <= (n - w + torch.arange(w, device=dev))[:, None]
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        score = att.sum(2).view(b, hkv, groups, n).mean(2)[..., : n - w]  # window rows are kept anyway
        pooled = F.max_pool1d(score.reshape(b * hkv, 1, n - w), self.kernel, stride=1, padding=self.kernel // 2)
        top = pooled.reshape(b, hkv, n - w).topk(self.budget - w, dim=-1).indices.sort(-1).values
        window = torch.arange(n - w, n, device=dev).expand(b, hkv, w)
        return torch.cat([top, window], dim=-1)


def _chunk_mask(cached: int, c: int, start: int, window: Optional[tuple]) -> torch.Tensor:
    """All cached rows visible, causal inside the chunk; with ``window=(w, sinks)`` (StreamingLLM
    rows: ``[sinks | contiguous tail]``) only keys ``j < sinks or i - j < w``."""
    mask = torch.ones(c, cached + c, dtype=torch.bool)
    mask[:, cached:] = torch.ones(c, c, dtype=torch.bool).tril()
    if window is not None:
        w, sinks = window
        k_pos = torch.cat([torch.arange(min(sinks, cached)), torch.arange(start - (cached - min(sinks, cached)), start + c)])
        q_pos = torch.arange(start, start + c)[:, None]
        mask &= (k_pos[None] < sinks) | (q_pos - k_pos[None] < w)
    return mask[None, None]


def _forward(model, cache, ids: torch.Tensor, start: int, window: Optional[tuple] = None) -> torch.Tensor:
    from unigist.generation import _forward_parameters

    cached = cache.get_seq_length()
    dev = model.get_input_embeddings().weight.device
    # transformers >= 5.24 names the argument `cache`; before, `cache=` would land in **kwargs
    # and the model would fill a DynamicCache of its own, unseen by the eviction hooks
    cache_kw = "cache" if "cache" in _forward_parameters(model) else "past_key_values"
    out = model(
        input_ids=ids[None].to(dev),
        position_ids=torch.arange(start, start + ids.shape[0], device=dev)[None],
        attention_mask=_chunk_mask(cached, ids.shape[0], start, window).to(dev),
        use_cache=True,
        **{cache_kw: cache},
    )
    return out.logits[0]


@torch.inference_mode()
def evict_generate(model, prompt: torch.Tensor, max_new_tokens: int, policy: str, budget: Optional[int],
                   chunk_size: int = 8, num_sink: int = 2, obs_window: int = 8, window: Optional[int] = None):
    """Chunked prefill + greedy decoding under an eviction ``policy``.

    ``window``: with the ``streaming`` policy, also mask every key outside ``num_sink`` +
    the last ``window`` positions (the window-only control's training mask); the budget must
    then be at least ``num_sink + window``.

    Returns ``(new_ids, logits)``: the greedy tokens and float32 logits of every fed position
    (prompt, then each fed decoded token), like ``unigist.generate(..., output_logits=True)``.
    """
    from transformers import DynamicCache

    model.eval()
    cache = DynamicCache(config=model.config)
    press = EvictionPress(model, policy, budget if budget is not None else 1 << 30, num_sink=num_sink,
                          obs_window=obs_window)
    if window is not None and (policy != "streaming" or budget < num_sink + window):
        raise ValueError("window= needs the streaming policy and a budget >= num_sink + window")
    win = None if window is None else (window, num_sink)
    rows = []
    with press:
        for s in range(0, prompt.shape[0], chunk_size):
            rows.append(_forward(model, cache, prompt[s : s + chunk_size], s, win))
        new: List[int] = []
        pos = prompt.shape[0]
        while True:
            tok = int(rows[-1][-1].argmax())
            new.append(tok)
            if len(new) >= max_new_tokens:
                break
            rows.append(_forward(model, cache, torch.tensor([tok]), pos, win))
            pos += 1
    press.peak = max(press.peak, cache.get_seq_length())
    return new, torch.cat(rows).float().cpu(), press.peak
