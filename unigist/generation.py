"""Compressed generation: chunked prefill and decoding over a :class:`GistCache`.

The context streams in as the interleaved sequence: after every ``ratio`` raw
tokens one gist token is fed (the same layout training used). The prefill runs
in chunks of ``chunk_size`` interleaved positions (any size; the result does not
depend on it), each chunk attending to the compressed cache, which drops the raw
tokens no query can see any more as new rows come in (the :class:`GistCache`
alone decides when). Decoding goes token by token, one forward pass per token;
a gist due at the next position goes in the same pass. By default
(``GistConfig.gist_predicts_next=False``) the gist is memory only: the sampled
token is read off the raw token before it, and the gist goes in with the next
token. With ``gist_predicts_next=True`` the gist goes in right after the token
that closes its group and the next token is read off the gist's output. The
gist token is never emitted (its logit is suppressed).

On CUDA a single prompt decodes through two CUDA graphs (a step feeding one position, and one
feeding two), captured at their first use and replayed at every step (``cuda_graph``): a decode
step of a 1B model runs ~900 small kernels, whose launch from Python costs several times the GPU's
own time. Eviction and row bookkeeping stay on the host between replays
(:class:`unigist.cache.GistCacheStep`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .cache import GistCache, GistCacheRows, GistCacheStep
from .config import GistConfig
from .hf import _warn_past_max_positions, get_gist_config
from .layout import insert_gists, interleaved_length

__all__ = ["generate", "GenerationResult"]

# Attention inside the fixed-shape decode steps (GistCacheStep): "kernel" (the compressed-cache
# kernel reading the key layout from device memory) or "sdpa" (SDPA over the cache buffers with
# a mask built on the device). UNIGIST_GRAPH_ATTENTION=sdpa brings SDPA back.
GRAPH_ATTENTION = os.environ.get("UNIGIST_GRAPH_ATTENTION", "kernel")


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


def _as_ids(x, device, where: str = "prompt") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"unigist.generate: {where} must hold integer token ids, got a {x.dtype} tensor")
        ids = x
    else:
        items = list(x)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            raise TypeError(f"unigist.generate: {where} must be a sequence of int token ids")
        ids = torch.tensor(items, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"unigist.generate: {where} must be a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}"
        )
    return ids.to(device=device, dtype=torch.long)


def _is_batch(prompt) -> bool:
    """A list/tuple of prompts (strings or id sequences), or a 2-D tensor of several rows."""
    if isinstance(prompt, torch.Tensor):
        return prompt.dim() == 2 and prompt.shape[0] > 1
    if isinstance(prompt, (list, tuple)) and prompt:
        return all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt)
    return False


def _raw_ids(prompt, tokenizer, gcfg: GistConfig, device, where: str) -> torch.Tensor:
    """A prompt (text with a tokenizer, or ids) as a 1-D tensor of raw token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("unigist.generate: text prompts need a tokenizer: generate(model, tokenizer, prompt)")
        prompt = tokenizer(prompt, return_tensors="pt")["input_ids"]
    raw = _as_ids(prompt, device, where)
    hits = (raw == gcfg.gist_token_id).nonzero()
    if hits.numel():
        raise ValueError(
            f"unigist.generate: {where} holds the gist token id {gcfg.gist_token_id} (at raw position "
            f"{int(hits[0])}); pass raw tokens only, gists are inserted here"
        )
    return raw


def _generation_config(model, generation_config: Optional[GenerationConfig], overrides: dict) -> GenerationConfig:
    """The model's own generation config (or the one given) with the explicit arguments on
    top, validated by transformers (which warns, e.g., for a temperature without sampling)."""
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if base is not None and not isinstance(base, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(base).__name__}")
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.update(**{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"unigist.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def _check_sampling(cfg: GenerationConfig) -> None:
    if not cfg.do_sample:
        return
    t = cfg.temperature
    if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"unigist.generate: temperature must be a finite number > 0 when sampling, got {t!r}")
    p = cfg.top_p
    if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):  # NaN fails both comparisons
        raise ValueError(f"unigist.generate: top_p must be in (0, 1], got {p!r}")
    m = cfg.min_p
    if m is not None and not (isinstance(m, (int, float)) and 0 <= m <= 1):
        raise ValueError(f"unigist.generate: min_p must be in [0, 1], got {m!r}")
    k = cfg.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"unigist.generate: top_k must be an int >= 0, got {k!r}")


def _eos_ids(cfg: GenerationConfig, tokenizer, eos_token_id) -> set:
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(int(e) for e in eos_token_id)


def _logits_processors(cfg: GenerationConfig, gist_id: int) -> LogitsProcessorList:
    """transformers' own processors for the options of ``cfg`` (in the order its generate
    applies them), after one that keeps the gist token from ever being emitted."""
    procs = LogitsProcessorList([SuppressTokensLogitsProcessor([gist_id])])
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=cfg.repetition_penalty))
    if cfg.do_sample:
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(top_k=cfg.top_k))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=cfg.top_p))
        if cfg.min_p is not None and cfg.min_p > 0:
            procs.append(MinPLogitsWarper(min_p=cfg.min_p))
    return procs


class _Sampler:
    """Picks each new token as transformers' generate would (its processors on the raw history,
    greedy or multinomial) and says when a row must stop (EOS, length, stop strings)."""

    def __init__(self, gen_cfg: GenerationConfig, tokenizer, gist_id: int, eos_token_id, max_new_tokens: int,
                 generator: Optional[torch.Generator]):
        self.do_sample = bool(gen_cfg.do_sample)
        self.eos = _eos_ids(gen_cfg, tokenizer, eos_token_id)
        self.processors = _logits_processors(gen_cfg, gist_id)
        self.stopping = StoppingCriteriaList()
        if gen_cfg.stop_strings:
            self.stopping.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gen_cfg.stop_strings))
        self.max_new_tokens = max_new_tokens
        self.generator = generator

    def __call__(self, history: torch.Tensor, logits: torch.Tensor, n_new: int) -> tuple[int, torch.Tensor, bool]:
        """``(token, history with it, stop)`` for raw ``history [1, L]`` and next-token ``logits``;
        ``n_new`` tokens were generated before this one."""
        scores = self.processors(history, logits.float()[None])
        if self.do_sample:
            tok = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        else:
            tok = int(scores.argmax(-1))
        history = torch.cat([history, history.new_tensor([[tok]])], dim=1)
        stop = tok in self.eos or n_new + 1 >= self.max_new_tokens or bool(self.stopping(history, scores).any())
        return tok, history, stop


def _result(raw, ids, tokenizer, fed, cache, prefill_s, decode_s, logits) -> GenerationResult:
    kv = cache.stats()
    kv["compression"] = kv["full_cache_bytes"] / kv["kv_bytes"] if kv["kv_bytes"] else 1.0
    return GenerationResult(
        ids=ids,
        text=tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None,
        prompt_tokens=int(raw.shape[0]),
        sequence=torch.cat([t.cpu() for t in fed]),
        kv=kv,
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        decode_tokens_per_s=(len(ids) / decode_s) if decode_s > 0 else float("inf"),
        logits=torch.cat([t.cpu() for t in logits]) if logits is not None else None,
    )


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


def _forward_parameters(model) -> set:
    """Parameters of the model's forward (a PEFT wrapper's forward takes **kwargs: read its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


@torch.inference_mode()
def generate(
    model,
    tokenizer_or_ids: Any = None,
    prompt: Union[str, torch.Tensor, Sequence[int], Sequence[Union[str, Sequence[int]]], None] = None,
    *,
    max_new_tokens: Optional[int] = None,
    chunk_size: Optional[int] = 2048,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    stop_strings: Union[str, Sequence[str], None] = None,
    generation_config: Optional[GenerationConfig] = None,
    streamer: Union[Callable[[int, Optional[str]], None], Any, None] = None,
    progress: bool = True,
    decode_progress: bool = False,
    config: Optional[GistConfig] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    output_logits: bool = False,
    eviction: str = "lazy",
    cuda_graph: Optional[bool] = None,
) -> Union[GenerationResult, List[GenerationResult]]:
    """Generate with UniGist compression: the KV cache holds ``num_sink + gists + window`` entries.

    Args:
        model: a model patched by :func:`unigist.patch_model`.
        tokenizer_or_ids: a tokenizer (then ``prompt`` is a string or ids), or the prompt's
            token ids (tensor ``[L]``/``[1, L]`` or list) when there is no tokenizer.
        prompt: the prompt text (with a tokenizer) or token ids: raw tokens, gists are inserted
            here. A list of prompts (strings or id lists of any lengths, or a ``[B, L]`` tensor)
            returns a list of results, each equal to generating that prompt alone: each
            prompt is prefilled into a compressed cache of its own, then all decode together,
            one forward pass per step for the batch (see :class:`unigist.cache.GistCacheRows`).
            With sampling the rows draw from one generator, row after row, so a sampled
            batch does not repeat the samples of separate calls (greedy results do).
        max_new_tokens: raw tokens to generate at most (default: the generation config's
            ``max_new_tokens``, else 128); stops early at EOS or a stop string.
        chunk_size: interleaved positions per prefill forward pass (any size >= 1, ``None``:
            the whole prompt at once; the output does not depend on it, the peak memory does).
        do_sample, temperature, top_k, top_p, min_p, repetition_penalty, stop_strings: as in
            ``transformers`` ``generate``; applied by transformers' own logits processors and
            stopping criteria (``stop_strings`` needs a tokenizer). They override
            ``generation_config``.
        generation_config: a ``transformers.GenerationConfig``; default ``model.generation_config``.
            Its EOS ids, sampling options and ``max_new_tokens`` are used; transformers' checks
            run on it (a ``temperature`` without ``do_sample`` warns, as in transformers).
        streamer: an HF streamer (``TextStreamer``; gets ``put``/``end``) or a callable
            ``f(token_id, text_piece)`` called for every new token (``text_piece`` is None
            without a tokenizer). One prompt only.
        progress: show a tqdm bar (``tqdm.auto``: a widget in notebooks) over the prefill when it
            takes more than one chunk.
        decode_progress: also show one over the new tokens.
        config: optional check: must match the GistConfig the model was patched with.
        eos_token_id: stop token(s), overriding the generation config's (``[]``: none).
        generator: ``torch.Generator`` for reproducible sampling.
        output_logits: also return float32 logits of every fed position (tests use this).
        eviction: the :class:`GistCache` policy: ``"lazy"`` (default: evict when the bound
            ``num_sink + gists + window`` would be exceeded, about every ``window / ratio`` steps)
            or ``"strict"`` (before every forward pass). The cache alone decides when to evict.
        cuda_graph: decode a single prompt on CUDA by replaying two CUDA graphs (a step feeding
            one position, and one feeding a gist and a token), captured at their first use: a
            step then costs the GPU's time, not the host's time of the model's Python code
            (~5x faster decoding for a 1B model). Attention in those steps is the
            compressed-cache kernel reading the cache's layout from device memory
            (:class:`unigist.cache.GistCacheStep`); its split over keys may differ from
            ``cuda_graph=False`` by rounding. Capturing costs two eager steps per call. Default
            (``None``): on for a single prompt on CUDA, off otherwise (a batch of prompts
            decodes eagerly); ``True`` on a CPU model raises.

    Returns:
        :class:`GenerationResult` with the new ids, text, and KV-memory statistics (a list of
        them for a list of prompts).
    """
    gcfg = get_gist_config(model)
    if config is not None and (config.ratio, config.window, config.num_sink, config.gist_predicts_next) != (
        gcfg.ratio,
        gcfg.window,
        gcfg.num_sink,
        gcfg.gist_predicts_next,
    ):
        raise ValueError(f"config {config} differs from the one the model was patched with ({gcfg})")
    if gcfg.gist_token_id is None:
        raise ValueError("the model's GistConfig has no gist_token_id; patch the model with unigist.patch_model")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"unigist.generate: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if max_new_tokens is not None:
        _check_max_new_tokens(max_new_tokens)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"unigist.generate: cuda_graph must be True, False or None, got {cuda_graph!r}")
    gen_cfg = _generation_config(model, generation_config, dict(
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, stop_strings=stop_strings,
    ))
    if max_new_tokens is None:
        max_new_tokens = gen_cfg.max_new_tokens if gen_cfg.max_new_tokens is not None else 128
    _check_max_new_tokens(max_new_tokens)
    _check_sampling(gen_cfg)

    tokenizer = tokenizer_or_ids if _is_tokenizer(tokenizer_or_ids) else None
    src = prompt if tokenizer is not None or prompt is not None else tokenizer_or_ids
    if tokenizer is not None and src is None:
        raise ValueError("unigist.generate: pass the prompt (text or token ids)")
    if src is None or (tokenizer is None and isinstance(src, str)):
        raise ValueError("unigist.generate: pass a tokenizer with a text prompt, or the prompt's token ids")
    if tokenizer is None and isinstance(src, (list, tuple)) and any(isinstance(p, str) for p in src):
        raise ValueError("unigist.generate: text prompts need a tokenizer: generate(model, tokenizer, prompts)")
    if gen_cfg.stop_strings and tokenizer is None:
        raise ValueError("unigist.generate: stop_strings need a tokenizer")
    if _is_batch(src):
        if streamer is not None:
            raise ValueError("unigist.generate: a streamer follows one prompt; pass a single prompt")
        if cuda_graph:
            raise ValueError("unigist.generate: cuda_graph=True decodes a single prompt; a batch of prompts "
                             "decodes eagerly (leave cuda_graph unset)")
        device = model.get_input_embeddings().weight.device
        prompts = list(src.unbind(0)) if isinstance(src, torch.Tensor) else list(src)
        raws = [_raw_ids(p, tokenizer, gcfg, device, f"prompt {i}") for i, p in enumerate(prompts)]
        return _generate_batch(model, gcfg, gen_cfg, tokenizer, raws, max_new_tokens, chunk_size, progress,
                               decode_progress, eos_token_id, generator, output_logits, eviction)

    device = model.get_input_embeddings().weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"unigist.generate: cuda_graph=True needs a model on CUDA; this one is on {device}")
    raw = _raw_ids(src, tokenizer, gcfg, device, "prompt")
    decode = _decode_mode(device, cuda_graph)
    return _generate_one(model, gcfg, gen_cfg, tokenizer, raw, max_new_tokens, chunk_size, streamer, progress,
                         decode_progress, eos_token_id, generator, output_logits, eviction, decode)


def _decode_mode(device: torch.device, cuda_graph: Optional[bool]) -> str:
    """How a single prompt decodes: ``"graph"`` (CUDA graphs) or ``"eager"``; the tests also
    run ``"static"`` (the graphs' fixed-shape steps, uncaptured) on the CPU."""
    return "graph" if (device.type == "cuda" if cuda_graph is None else cuda_graph) else "eager"


def _now(device: torch.device) -> float:
    """A timestamp after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _session(model):
    """Eval mode and a list for tqdm bars during one generate call; afterwards the bars
    are closed and the model's training mode comes back."""
    bars: list = []
    was_training = model.training
    model.eval()
    try:
        yield bars
    finally:
        for bar in bars:
            bar.close()
        if was_training:
            model.train()


def _prefill(model, gcfg: GistConfig, raw: torch.Tensor, max_new_tokens: int, chunk_size: Optional[int],
             progress: bool, output_logits: bool, eviction: str, bars: list):
    """Feed the prompt ``raw`` (gists inserted) in chunks into a fresh :class:`GistCache`.

    Returns ``(cache, x, logits, next_logits, forward)``: the cache, the interleaved prompt,
    the float32 logits of every position (with ``output_logits``), the logits that predict the
    first new token, and ``forward(ids, start)`` for more tokens over the same cache.
    """
    device = raw.device
    x = insert_gists(raw, gcfg)["input_ids"]
    n_prompt = x.shape[0]
    chunk_size = n_prompt if chunk_size is None else chunk_size
    total = n_prompt + interleaved_length(max_new_tokens, gcfg.ratio) + 1
    _warn_past_max_positions(model.config, total)  # up front: gists make positions run ahead of tokens
    capacity = min(total, gcfg.max_cache_len(total) + max(chunk_size, 2))
    cache = GistCache(gcfg, model_config=model.config, capacity=capacity, eviction=eviction, explicit_layout=True)
    params = _forward_parameters(model)
    keep_kw = "logits_to_keep" in params
    # transformers >= 5.24 names the cache argument `cache` (`past_key_values` goes in 5.40).
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(ids: torch.Tensor, start: int) -> torch.Tensor:
        kwargs = dict(
            input_ids=ids[None],
            position_ids=torch.arange(start, start + ids.shape[0], device=device)[None],
            use_cache=True,
            gist_cache=cache,  # the explicit channel of the cache's key layout to unigist attention
        )
        kwargs[cache_kw] = cache
        if keep_kw:
            # Two rows: the next token may be read off the raw token before a trailing gist.
            kwargs["logits_to_keep"] = 0 if output_logits else 2
        return model(**kwargs).logits[0]

    logits_out: List[torch.Tensor] = []
    bar = None
    if progress and n_prompt > chunk_size:
        bar = tqdm(total=n_prompt, desc="unigist prefill", unit="tok", leave=False)
        bars.append(bar)
    tail = None  # the last two rows of logits fed so far (a chunk may hold one)
    for s in range(0, n_prompt, chunk_size):
        chunk = x[s : s + chunk_size]
        logits = forward(chunk, s)
        if output_logits:
            logits_out.append(logits.float())
        tail = logits[-2:] if tail is None else torch.cat([tail, logits[-2:]])[-2:]
        if bar is not None:
            bar.update(chunk.shape[0])
    return cache, x, logits_out, _predictor(gcfg, tail, n_prompt), forward


def _predictor(gcfg: GistConfig, logits: torch.Tensor, end: int) -> torch.Tensor:
    """Of the last rows of ``logits`` (positions up to ``end - 1``), the one that predicts the
    next raw token."""
    if not gcfg.gist_predicts_next and gcfg.is_gist(end - 1) and end >= 2:
        return logits[-2]  # the gist is memory only: the raw token before it predicts
    return logits[-1]


class _StaticDecoder:
    """Decode steps with fixed shapes through :class:`GistCacheStep` (one per feed length, 1 or 2
    positions), each captured once as a CUDA graph and replayed (``use_graph``), or run eagerly.

    A step's first call runs it eagerly (on a side stream: the warm-up CUDA graphs need, which
    also gives that step's logits), then captures it; every later call replays the graph. The
    logits returned live in the graph's memory: read them before the next call.
    """

    def __init__(self, model, cache: GistCache, rows: int, device: torch.device, use_graph: bool, keep_logits: int,
                 keep_kw: bool):
        self.model, self.cache, self.rows, self.device = model, cache, rows, device
        self.use_graph = use_graph
        self.keep_logits, self.keep_kw = keep_logits, keep_kw
        self.steps: dict = {}
        self.graphs: dict = {}
        self.outputs: dict = {}

    def _call(self, step: GistCacheStep) -> torch.Tensor:
        step.begin()
        kwargs = dict(
            input_ids=step.input_ids,
            position_ids=step.position_ids,
            # A padding mask of ones: transformers then skips its packed-sequence check, a host sync.
            attention_mask=step.ones,
            use_cache=False,
            gist_cache=step,
        )
        if self.keep_kw:
            kwargs["logits_to_keep"] = self.keep_logits
        return self.model(**kwargs).logits[0]

    def finish(self) -> None:
        """Decoding is over: the layers' ``keys`` / ``values`` views cover their rows again
        (the steps reserved rows without them)."""
        for layer in self.cache.layers:
            layer._refresh_views()

    def __call__(self, ids: List[int], start: int) -> torch.Tensor:
        n = len(ids)
        step = self.steps.get(n)
        if step is None:
            step = self.steps[n] = GistCacheStep(self.cache, n, self.rows, self.device, GRAPH_ATTENTION)
        step.prepare(ids, start)
        if not self.use_graph:
            return self._call(step)
        graph = self.graphs.get(n)
        if graph is not None:
            graph.replay()
            return self.outputs[n]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            logits = self._call(step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # A memory pool per graph: the two replay in any order, so neither may reuse the
        # other's memory.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs[n] = self._call(step)
        except Exception as exc:  # the model's forward did something a graph cannot hold (a host sync)
            warnings.warn(
                f"unigist.generate: capturing the decode step in a CUDA graph failed ({type(exc).__name__}: "
                f"{exc}); decoding without graphs (pass cuda_graph=False to skip the attempt)",
                stacklevel=4,
            )
            self.use_graph = False
            return logits
        self.graphs[n] = graph
        return logits


def _generate_one(model, gcfg: GistConfig, gen_cfg: GenerationConfig, tokenizer, raw: torch.Tensor,
                  max_new_tokens: int, chunk_size: Optional[int], streamer, progress: bool, decode_progress: bool,
                  eos_token_id, generator, output_logits: bool, eviction: str,
                  decode: str = "eager") -> GenerationResult:
    """One prompt. ``decode``: ``"eager"`` (a model call per step over the cache), ``"static"``
    (fixed-shape steps, :class:`_StaticDecoder` without graphs) or ``"graph"`` (those steps
    replayed as CUDA graphs)."""
    device = raw.device
    gist_id = gcfg.gist_token_id
    sampler = _Sampler(gen_cfg, tokenizer, gist_id, eos_token_id, max_new_tokens, generator)
    with _session(model) as bars:
        # ---------------------------------------------------------------- prefill
        t0 = time.perf_counter()
        cache, x, all_logits, next_logits, forward = _prefill(
            model, gcfg, raw, max_new_tokens, chunk_size, progress, output_logits, eviction, bars
        )
        fed: List[torch.Tensor] = [x]
        n_prompt = x.shape[0]
        if decode != "eager" and max_new_tokens > 1:
            total = n_prompt + interleaved_length(max_new_tokens, gcfg.ratio) + 1
            keep_kw = "logits_to_keep" in _forward_parameters(model)
            # A step's rows fit under the cache bound at the last position, plus the step's own.
            forward = _StaticDecoder(model, cache, gcfg.max_cache_len(total) + 2, device, decode == "graph",
                                     0 if output_logits else 1, keep_kw)
        else:
            eager = forward
            forward = lambda ids, start: eager(torch.tensor(ids, device=device), start)  # noqa: E731
        t1 = _now(device)

        # ----------------------------------------------------------------- decode
        stream = _Streamer(streamer, tokenizer, raw)
        dbar = None
        if decode_progress and max_new_tokens > 0:
            dbar = tqdm(total=max_new_tokens, desc="unigist decode", unit="tok", leave=False)
            bars.append(dbar)
        history = raw[None]  # raw ids so far (no gists), as the processors and criteria see them
        new_ids: List[int] = []
        pos = n_prompt
        while len(new_ids) < max_new_tokens:
            tok, history, stop = sampler(history, next_logits, len(new_ids))
            new_ids.append(tok)
            stream.put(tok)
            if dbar is not None:
                dbar.update(1)
            if stop:
                break
            if gcfg.gist_predicts_next:
                # The gist that closes this group goes in with the token: its output predicts next.
                feed = [tok, gist_id] if gcfg.is_gist(pos + 1) else [tok]
            else:
                # The token predicts next; a gist due before it goes in with it (none after the last).
                feed = [gist_id, tok] if gcfg.is_gist(pos) else [tok]
            fed.append(torch.tensor(feed))
            logits = forward(feed, pos)
            if output_logits:
                all_logits.append(logits.float())
            pos += len(feed)
            next_logits = _predictor(gcfg, logits, pos)
        stream.end()
        if isinstance(forward, _StaticDecoder):
            forward.finish()
        t2 = _now(device)
    return _result(raw, new_ids, tokenizer, fed, cache, t1 - t0, t2 - t1, all_logits if output_logits else None)


def _generate_batch(model, gcfg: GistConfig, gen_cfg: GenerationConfig, tokenizer, raws: List[torch.Tensor],
                    max_new_tokens: int, chunk_size: Optional[int], progress: bool, decode_progress: bool,
                    eos_token_id, generator, output_logits: bool, eviction: str) -> List[GenerationResult]:
    """Several prompts: each is prefilled alone into its own cache, then all decode together,
    one forward per step over ``[rows, 1]`` new tokens (each row's next position: its sampled
    token, or a gist when one closes the row's group) through :class:`GistCacheRows`."""
    device = raws[0].device
    gist_id = gcfg.gist_token_id
    sampler = _Sampler(gen_cfg, tokenizer, gist_id, eos_token_id, max_new_tokens, generator)
    keep_kw = "logits_to_keep" in _forward_parameters(model)

    def predicts(p: int) -> bool:
        """Whether the output at position ``p`` predicts the next raw token."""
        return not gcfg.is_gist(p + 1) if gcfg.gist_predicts_next else not gcfg.is_gist(p)

    rows = []
    with _session(model) as bars:
        for raw in raws:
            start = time.perf_counter()
            cache, x, logits, next_logits, _ = _prefill(
                model, gcfg, raw, max_new_tokens, chunk_size, progress, output_logits, eviction, bars
            )
            rows.append(dict(raw=raw, cache=cache, next_logits=next_logits, pos=x.shape[0], fed=[x],
                             logits=[piece.cpu() for piece in logits], history=raw[None], ids=[], pending=None,
                             done=max_new_tokens == 0, prefill_s=_now(device) - start))
        t1 = time.perf_counter()
        dbar = None
        if decode_progress and max_new_tokens > 0:
            dbar = tqdm(total=max_new_tokens * len(rows), desc="unigist decode", unit="tok", leave=False)
            bars.append(dbar)
        group = GistCacheRows([row["cache"] for row in rows])

        def sample(row, logits: torch.Tensor) -> None:
            tok, row["history"], row["done"] = sampler(row["history"], logits, len(row["ids"]))
            row["ids"].append(tok)
            row["pending"] = tok
            if dbar is not None:
                dbar.update(1)

        for row in rows:
            if not row["done"]:
                sample(row, row["next_logits"])
        while True:
            active = [i for i, row in enumerate(rows) if not row["done"]]
            if not active:
                break
            feed = []
            for i in active:
                row = rows[i]
                tok = gist_id if gcfg.is_gist(row["pos"]) else row["pending"]
                feed.append(tok)
                row["fed"].append(torch.tensor([tok], device=device))
            group.active = active
            kwargs = dict(
                input_ids=torch.tensor(feed, device=device)[:, None],
                position_ids=torch.tensor([rows[i]["pos"] for i in active], device=device)[:, None],
                use_cache=False,
                gist_cache=group,
            )
            if keep_kw:
                kwargs["logits_to_keep"] = 1
            logits = model(**kwargs).logits[:, -1]
            for b, i in enumerate(active):
                row = rows[i]
                if output_logits:
                    row["logits"].append(logits[b : b + 1].float().cpu())
                p = row["pos"]
                row["pos"] = p + 1
                if predicts(p):
                    sample(row, logits[b])
        t2 = _now(device)
    return [
        _result(row["raw"], row["ids"], tokenizer, row["fed"], row["cache"], row["prefill_s"], t2 - t1,
                row["logits"] if output_logits else None)
        for row in rows
    ]
