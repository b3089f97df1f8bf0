"""Training-free KV-eviction baselines on a Hugging Face Llama model.

:class:`EvictEngine` runs a ``transformers`` Llama-style causal LM layer by
layer (its own modules: embeddings, RMSNorms, q/k/v/o projections, RoPE, MLP,
LM head) over a batch of sequences, in chunks, with a KV cache per layer whose
rows carry their original positions and may differ per KV head. After every
chunk a :class:`Policy` decides which rows stay:

* :class:`FullPolicy`: keep everything (full attention, no budget);
* :class:`StreamingPolicy`: StreamingLLM (Xiao et al., 2023): the first
  ``sink`` tokens plus the most recent ``budget - sink``;
* :class:`SnapKVPolicy`: SnapKV (Li et al., 2024): the last ``window`` queries
  of the chunk (the *observation window*; in the last prompt chunk it holds the
  question) score every cached key; scores are summed over the window, averaged
  over the query heads of a KV head, max-pooled over neighbouring keys
  (``kernel``), and the top ``budget - window`` keys per KV head are kept
  together with the window itself. ``chunked=True`` compresses after every
  chunk (memory-bounded prefill, the same peak as UniGist); ``chunked=False``
  prefills everything and compresses once at the end of the prompt (the
  original SnapKV: question-aware, but the prefill peak is the full cache);
* :class:`GistPolicy`: UniGist's own rule (keep sinks, gists, window; mask from
  :func:`unigist.reference.gist_mask_from_positions`) - a cross-check of the
  library's :class:`unigist.GistCache` path, not a baseline.

Keys are cached after RoPE at their original positions (no position
re-assignment): every context here is within the training length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# policies
# ---------------------------------------------------------------------------


class Policy:
    """Decides which cached rows survive a chunk. ``budget`` None = unbounded."""

    name = "policy"
    budget: Optional[int] = None
    needs_scores = False
    obs_window = 0

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, Hkv, c, n]``: query at ``q_pos[t]`` may see key at ``k_pos[b, h, j]``."""
        return k_pos[:, :, None, :] <= q_pos[None, None, :, None]

    def wants_evict(self, n: int, final: bool) -> bool:
        return self.budget is not None and n > self.budget

    def select(self, pos: torch.Tensor, scores: Optional[torch.Tensor], next_query: int) -> torch.Tensor:
        """Indices ``[B, Hkv, m]`` (ascending) of the rows to keep."""
        raise NotImplementedError


class FullPolicy(Policy):
    name = "full"

    def wants_evict(self, n, final):
        return False


class StreamingPolicy(Policy):
    name = "streaming"

    def __init__(self, budget: int, sink: int = 4):
        if budget <= sink:
            raise ValueError(f"budget ({budget}) must exceed sink ({sink})")
        self.budget, self.sink = int(budget), int(sink)

    def select(self, pos, scores, next_query):
        b, h, n = pos.shape
        recent = self.budget - self.sink
        idx = torch.cat([torch.arange(self.sink), torch.arange(n - recent, n)]).to(pos.device)
        return idx.expand(b, h, -1)


class SnapKVPolicy(Policy):
    needs_scores = True

    def __init__(self, budget: int, window: int = 32, kernel: int = 7, chunked: bool = True):
        if budget <= window:
            raise ValueError(f"budget ({budget}) must exceed the observation window ({window})")
        self.budget, self.obs_window, self.kernel, self.chunked = int(budget), int(window), int(kernel), chunked
        self.name = "snapkv" if chunked else "snapkv_oneshot"

    def wants_evict(self, n, final):
        return n > self.budget and (self.chunked or final)

    def select(self, pos, scores, next_query):
        # scores: [B, Hkv, n] attention mass from the observation window (float32)
        b, h, n = scores.shape
        w = min(self.obs_window, n)
        pooled = F.max_pool1d(scores.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.reshape(b, h, n)[:, :, : n - w]
        top = pooled.topk(self.budget - w, dim=-1).indices
        window = torch.arange(n - w, n, device=scores.device).expand(b, h, -1)
        return torch.cat([top.sort(dim=-1).values, window], dim=-1)


class GistPolicy(Policy):
    """UniGist's mask and eviction rule (cross-check of the library path)."""

    name = "gist_engine"

    def __init__(self, config):
        from unigist.layout import keep_for_future
        from unigist.reference import gist_mask_from_positions

        self.config = config
        self._keep = keep_for_future
        self._mask = gist_mask_from_positions

    def mask(self, q_pos, k_pos):
        b, h, n = k_pos.shape
        # positions are shared by every batch row and head under this policy
        return self._mask(q_pos, k_pos[0, 0], self.config)[None, None].expand(b, h, -1, -1)

    def wants_evict(self, n, final):
        return True

    def select(self, pos, scores, next_query):
        keep = self._keep(pos[0, 0], next_query, self.config).nonzero().flatten()
        return keep.expand(pos.shape[0], pos.shape[1], -1)


# ---------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------


@dataclass
class LayerCache:
    k: Optional[torch.Tensor] = None  # [B, Hkv, n, D]
    v: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None  # [B, Hkv, n] int64

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, m], ...]`` for x ``[B, H, n]`` or ``[B, H, n, D]``."""
    if x.dim() == 3:
        return x.gather(2, idx)
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


class EvictEngine:
    """Chunked forward of an HF Llama-style model with a policy-managed KV cache.

    Works on any ``LlamaForCausalLM`` (also a unigist-patched one: the engine
    does not use the model's attention function, only its weights).
    """

    def __init__(self, model, policy: Policy):
        self.model = model
        self.policy = policy
        inner = model.model
        cfg = model.config
        self.inner = inner
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.caches: List[LayerCache] = []
        self.peak_length = 0

    def reset(self, num_layers: int) -> None:
        self.caches = [LayerCache() for _ in range(num_layers)]
        self.peak_length = 0

    def cache_length(self) -> int:
        return max(c.length for c in self.caches)

    def _attend(self, layer_idx: int, attn, h: torch.Tensor, cos, sin, q_pos: torch.Tensor, evict: bool,
                final: bool, next_query: int) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, c, _ = h.shape
        hq, hkv, d = self.num_heads, self.num_kv, self.head_dim
        q = attn.q_proj(h).view(bsz, c, hq, d).transpose(1, 2)
        k = attn.k_proj(h).view(bsz, c, hkv, d).transpose(1, 2)
        v = attn.v_proj(h).view(bsz, c, hkv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache = self.caches[layer_idx]
        new_pos = q_pos.view(1, 1, c).expand(bsz, hkv, c)
        if cache.k is None:
            K, V, P = k, v, new_pos
        else:
            K = torch.cat([cache.k, k], dim=2)
            V = torch.cat([cache.v, v], dim=2)
            P = torch.cat([cache.pos, new_pos], dim=2)
        self.peak_length = max(self.peak_length, K.shape[2])
        groups = hq // hkv
        mask = self.policy.mask(q_pos, P)  # [B, Hkv, c, n]
        if groups > 1:
            mask = mask.repeat_interleave(groups, dim=1)
            Kr, Vr = K.repeat_interleave(groups, dim=1), V.repeat_interleave(groups, dim=1)
        else:
            Kr, Vr = K, V
        out = F.scaled_dot_product_attention(q, Kr, Vr, attn_mask=mask, scale=attn.scaling)
        out = attn.o_proj(out.transpose(1, 2).reshape(bsz, c, hq * d))

        n = K.shape[2]
        if evict and self.policy.wants_evict(n, final):
            scores = None
            if self.policy.needs_scores:
                w = min(self.policy.obs_window, c)
                qo = q[:, :, c - w :].float()
                s = torch.matmul(qo, Kr.float().transpose(-1, -2)) * attn.scaling  # [B, Hq, w, n]
                s = s.masked_fill(~mask[:, :, c - w :], float("-inf"))
                p = torch.softmax(s, dim=-1).sum(dim=2)  # [B, Hq, n]
                scores = p.view(bsz, hkv, groups, n).mean(dim=2)
            idx = self.policy.select(P, scores, next_query)
            K, V, P = _gather_rows(K, idx), _gather_rows(V, idx), _gather_rows(P, idx)
        cache.k, cache.v, cache.pos = K, V, P
        return out

    @torch.no_grad()
    def forward_chunk(self, ids: torch.Tensor, start: int, evict: bool, final: bool) -> torch.Tensor:
        """Feed ``ids [B, c]`` at positions ``start..start+c-1``; returns hidden states after the final norm."""
        inner = self.inner
        bsz, c = ids.shape
        q_pos = torch.arange(start, start + c, device=ids.device)
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, q_pos[None].expand(bsz, -1))
        for li, layer in enumerate(inner.layers):
            r = h
            a = self._attend(li, layer.self_attn, layer.input_layernorm(h), cos, sin, q_pos, evict, final, start + c)
            h = r + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return inner.norm(h)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, chunk: int, prompt_len: int, score_from: int) -> torch.Tensor:
        """Teacher-forced pass over ``ids [B, L]``.

        The first ``prompt_len`` tokens go in chunks of ``chunk`` and the cache is
        compressed after each (the chunk ending at ``prompt_len`` is the *final*
        one: SnapKV's observation window then holds the question); tokens after
        ``prompt_len`` go as one more chunk with no eviction (the decoding steps;
        equivalent to greedy decoding when the greedy tokens equal ``ids``).

        Returns float32 logits ``[B, L - score_from, V]`` of positions ``score_from..L-1``.
        """
        self.reset(len(self.inner.layers))
        bsz, length = ids.shape
        bounds = [(s, min(s + chunk, prompt_len), True) for s in range(0, prompt_len, chunk)]
        if prompt_len < length:
            bounds.append((prompt_len, length, False))
        outs = []
        for s, e, evict in bounds:
            hidden = self.forward_chunk(ids[:, s:e], s, evict=evict, final=(e == prompt_len))
            lo = max(s, score_from)
            if lo < e:
                outs.append(self.model.lm_head(hidden[:, lo - s :]).float())
        return torch.cat(outs, dim=1)


def budget_for(config, interleaved_len: int) -> int:
    """UniGist's KV entries after a prompt of ``interleaved_len`` positions (exact, via keep_for_future)."""
    from unigist.layout import keep_for_future

    return int(keep_for_future(torch.arange(interleaved_len), interleaved_len, config).sum())
