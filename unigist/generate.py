"""Compressed generation: chunked prefill and decoding over a :class:`GistCache`.

The context streams in as the interleaved sequence: after every ``ratio`` raw
tokens one gist token is fed (the same layout training used). The prefill runs
in chunks of ``chunk_size`` interleaved positions (any size; the result does not
depend on it), each chunk attending to the compressed cache; after every chunk
the cache drops the raw tokens no future query can see. Decoding goes token by
token; whenever the next position is a gist position the gist token is fed
together with the sampled token (one forward pass), and the next raw token is
predicted from the gist's output. The gist token is never emitted (its logit is
masked).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from .cache import GistCache
from .config import GistConfig
from .hf import get_gist_config
from .layout import insert_gists, interleaved_length

__all__ = ["generate", "GenerationResult"]


@dataclass
class GenerationResult:
    """What :func:`unigist.generate` returns.

    Attributes:
        ids: the new raw token ids (no gists; includes the EOS token if one ended generation).
        text: ``ids`` decoded (special tokens skipped) when a tokenizer was given, else ``None``.
        prompt_tokens: raw prompt tokens.
        sequence: every id fed to the model, interleaved (prompt with gists, generated tokens with gists).
        kv: KV-cache statistics: ``cache_length`` / ``peak_cache_length`` (entries per layer),
            ``max_allowed_length`` (num_sink + gists + window), ``kv_bytes`` / ``peak_kv_bytes``
            (all layers, keys + values), ``allocated_bytes`` (buffers), ``full_cache_bytes`` (what a full,
            uncompressed cache would hold for ``seen_tokens`` positions), ``compression``.
        prefill_seconds, decode_seconds, decode_tokens_per_s: timings.
        logits: with ``output_logits=True``, float32 logits ``[len(sequence) - 1 or so, vocab]`` of
            every position fed, in order (the last sampled token is not fed, so it has none).
    """

    ids: List[int]
    text: Optional[str]
    prompt_tokens: int
    sequence: torch.Tensor
    kv: dict = field(default_factory=dict)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_tokens_per_s: float = 0.0
    logits: Optional[torch.Tensor] = None

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.text if self.text is not None else str(self.ids)


def _is_tokenizer(obj) -> bool:
    return hasattr(obj, "encode") and hasattr(obj, "decode") and not isinstance(obj, torch.Tensor)


def _as_ids(x, device) -> torch.Tensor:
    ids = x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"unigist.generate handles one sequence at a time, got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("the prompt must be a non-empty 1-D sequence of token ids")
    return ids.to(device=device, dtype=torch.long)


def _eos_ids(model, tokenizer, eos_token_id) -> set:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos_token_id is None:
        gen_cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(int(e) for e in eos_token_id)


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    logits = logits / max(float(temperature), 1e-6)
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (probs.cumsum(-1) - probs) > top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Streamer:
    """Feeds new tokens to an HF streamer (``put``/``end``) or a callback ``f(token_id, text)``."""

    def __init__(self, streamer, tokenizer, prompt_ids: torch.Tensor):
        self.streamer = streamer
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""
        if streamer is not None and hasattr(streamer, "put"):
            streamer.put(prompt_ids[None].cpu())  # HF streamers take the prompt first (skip_prompt)
        elif streamer is not None and not callable(streamer):
            raise TypeError("streamer must be an HF streamer (put/end) or a callable f(token_id, text)")

    def put(self, token: int) -> None:
        if self.streamer is None:
            return
        if hasattr(self.streamer, "put"):
            self.streamer.put(torch.tensor([token]))
            return
        self.ids.append(token)
        piece = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            piece, self.text = text[len(self.text):], text
        self.streamer(token, piece)

    def end(self) -> None:
        if self.streamer is not None and hasattr(self.streamer, "end"):
            self.streamer.end()


def _supports_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


@torch.inference_mode()
def generate(
    model,
    tokenizer_or_ids: Any = None,
    prompt: Union[str, torch.Tensor, Sequence[int], None] = None,
    *,
    max_new_tokens: int = 128,
    chunk_size: int = 2048,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    streamer: Union[Callable[[int, Optional[str]], None], Any, None] = None,
    progress: bool = True,
    config: Optional[GistConfig] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    output_logits: bool = False,
    eviction: str = "lazy",
) -> GenerationResult:
    """Generate with UniGist compression: the KV cache holds ``num_sink + gists + window`` entries.

    Args:
        model: a model patched by :func:`unigist.patch_model`.
        tokenizer_or_ids: a tokenizer (then ``prompt`` is a string or ids), or the prompt's
            token ids (tensor ``[L]``/``[1, L]`` or list) when there is no tokenizer.
        prompt: the prompt text (with a tokenizer) or token ids. Raw tokens: gists are inserted here.
        max_new_tokens: raw tokens to generate at most (stops early at EOS).
        chunk_size: interleaved positions per prefill forward pass (any size >= 1; the
            output does not depend on it, the peak memory does).
        do_sample, temperature, top_k, top_p: greedy decoding (default) or sampling.
        streamer: an HF streamer (``TextStreamer``; gets ``put``/``end``) or a callable
            ``f(token_id, text_piece)`` called for every new token (``text_piece`` is None
            without a tokenizer).
        progress: show a tqdm bar over the prefill (when it takes more than one chunk).
        config: optional check: must match the GistConfig the model was patched with.
        eos_token_id: stop token(s); defaults to the tokenizer's / generation config's.
        generator: ``torch.Generator`` for reproducible sampling.
        output_logits: also return float32 logits of every fed position (tests use this).
        eviction: the :class:`GistCache` policy while decoding: ``"lazy"`` (default: evict when
            the bound ``num_sink + gists + window`` would be exceeded, about every ``window / ratio``
            steps) or ``"strict"`` (every step). Prefill chunks are always followed by a strict eviction.

    Returns:
        :class:`GenerationResult` with the new ids, text, and KV-memory statistics.
    """
    gcfg = get_gist_config(model)
    if config is not None and (config.ratio, config.window, config.num_sink) != (
        gcfg.ratio,
        gcfg.window,
        gcfg.num_sink,
    ):
        raise ValueError(f"config {config} differs from the one the model was patched with ({gcfg})")
    if gcfg.gist_token_id is None:
        raise ValueError("the model's GistConfig has no gist_token_id; patch the model with unigist.patch_model")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    device = model.get_input_embeddings().weight.device
    tokenizer = tokenizer_or_ids if _is_tokenizer(tokenizer_or_ids) else None
    if tokenizer is None:
        src = tokenizer_or_ids if prompt is None else prompt
        if src is None or isinstance(src, str):
            raise ValueError("pass a tokenizer with a text prompt, or the prompt's token ids")
        raw = _as_ids(src, device)
    else:
        if prompt is None:
            raise ValueError("pass the prompt (text or token ids)")
        raw = _as_ids(tokenizer(prompt, return_tensors="pt")["input_ids"] if isinstance(prompt, str) else prompt, device)

    gist_id = gcfg.gist_token_id
    r = gcfg.ratio
    x = insert_gists(raw, gcfg)["input_ids"]
    n_prompt = x.shape[0]
    total = n_prompt + interleaved_length(max_new_tokens, r) + 1
    step = max(chunk_size, 2)
    capacity = min(total, gcfg.max_cache_len(total) + step)
    cache = GistCache(gcfg, model_config=model.config, capacity=capacity, eviction=eviction, explicit_layout=True)
    keep_kw = _supports_logits_to_keep(model)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    was_training = model.training
    model.eval()

    def forward(ids: torch.Tensor, start: int) -> torch.Tensor:
        kwargs = dict(
            input_ids=ids[None],
            position_ids=torch.arange(start, start + ids.shape[0], device=device)[None],
            past_key_values=cache,
            use_cache=True,
            gist_cache=cache,  # the explicit channel of the cache's key layout to unigist attention
        )
        if keep_kw:
            kwargs["logits_to_keep"] = 0 if output_logits else 1
        out = model(**kwargs)
        return out.logits[0]

    all_logits: List[torch.Tensor] = []
    fed: List[torch.Tensor] = [x]
    try:
        # ---------------------------------------------------------------- prefill
        t0 = time.perf_counter()
        bar = None
        if progress and n_prompt > chunk_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_prompt, desc="unigist prefill", unit="tok", leave=False)
        logits = None
        for s in range(0, n_prompt, chunk_size):
            chunk = x[s : s + chunk_size]
            logits = forward(chunk, s)
            if output_logits:
                all_logits.append(logits.float())
            cache.evict()  # drop what no later query can see, right after the chunk
            if bar is not None:
                bar.update(chunk.shape[0])
        if bar is not None:
            bar.close()
        next_logits = logits[-1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()

        # ----------------------------------------------------------------- decode
        stream = _Streamer(streamer, tokenizer, raw)
        new_ids: List[int] = []
        pos = n_prompt
        while len(new_ids) < max_new_tokens:
            scores = next_logits.float().clone()
            scores[gist_id] = float("-inf")  # never emit the gist token
            tok = _sample(scores, do_sample, temperature, top_k, top_p, generator)
            new_ids.append(tok)
            stream.put(tok)
            if tok in eos or len(new_ids) == max_new_tokens:
                break
            feed = [tok]
            if gcfg.is_gist(pos + 1):
                feed.append(gist_id)  # the gist closes this group; the next token is read off it
            feed_t = torch.tensor(feed, device=device)
            fed.append(feed_t)
            logits = forward(feed_t, pos)
            if output_logits:
                all_logits.append(logits.float())
            pos += len(feed)
            next_logits = logits[-1]
        stream.end()
        cache.evict()  # what the cache holds for the next query
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
    finally:
        if was_training:
            model.train()

    kv = cache.stats()
    kv["compression"] = kv["full_cache_bytes"] / kv["kv_bytes"] if kv["kv_bytes"] else 1.0
    decode_s = t2 - t1
    return GenerationResult(
        ids=new_ids,
        text=tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else None,
        prompt_tokens=int(raw.shape[0]),
        sequence=torch.cat(fed).cpu(),
        kv=kv,
        prefill_seconds=t1 - t0,
        decode_seconds=decode_s,
        decode_tokens_per_s=(len(new_ids) / decode_s) if decode_s > 0 else float("inf"),
        logits=torch.cat(all_logits).cpu() if output_logits else None,
    )
