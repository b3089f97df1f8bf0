"""Evaluation of one trained model under one inference method, sample by sample.

Every method sees the prompt (everything up to and including ``ASK``) streamed in chunks
and then decodes the passkey greedily; kv queries and text perplexity are read off the
logits of the prompt positions, as computed during that chunked prefill:

* ``full``: the full-attention model, plain ``DynamicCache`` (no eviction);
* ``streaming`` / ``snapkv``: the full-attention model under :mod:`.baselines` eviction at
  UniGist r=4's KV budget for that prompt;
* ``window``: the window-only model under StreamingLLM eviction with its training mask;
* ``gist_*``: ``unigist.generate(model, prompt, max_new_tokens=P,
  output_logits=True, chunk_size=...)``, the library's compressed generation
  (``GistCache``, raw KV really evicted).

For each sample it records, per kv query: correct or not, its distance bin, and whether the
answer follows a gist in the r=4 / r=8 layouts; per passkey: exact match of all digits, its
bin, the prompt length; and the summed negative log-likelihood over text tokens.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

import unigist
from unigist.layout import interleaved_length, raw_positions

from . import baselines
from .models import ModelConfig, gist_budget
from .tasks import Sample, TaskConfig


def predictor_rows(num_raw: int, gcfg) -> np.ndarray:
    """Row of the fed-position logits that predicts raw token ``t`` (for t >= 1); entry 0 unused.

    No gists (``gcfg`` None or a ratio longer than the sequence): row ``t - 1``. With gists the
    raw token after a gist is predicted by the gist (``gist_predicts_next``) or by the raw
    token before the gist.
    """
    if gcfg is None:
        return np.arange(num_raw) - 1
    pos = raw_positions(num_raw, gcfg).numpy()
    rows = pos - 1
    if not gcfg.gist_predicts_next:
        after_gist = (pos % (gcfg.ratio + 1)) == 0
        rows = np.where(after_gist & (pos > 0), rows - 1, rows)
    return rows


def _score(sample: Sample, logits: torch.Tensor, rows: np.ndarray, new_ids: List[int], vocab_size: int,
           task: TaskConfig) -> Dict:
    logits = logits[:, :vocab_size]  # drop the gist token's logit (never emitted)
    ids = sample.ids
    n = sample.prompt_len
    pred = logits.argmax(-1).numpy()
    kv = np.array([pred[rows[q + 1]] == ids[q + 1] for q in sample.kv_query], dtype=bool)
    text_t = np.nonzero(sample.text_mask[:n])[0]
    logp = torch.log_softmax(logits[torch.from_numpy(rows[text_t])], -1)
    nll = float(-logp[torch.arange(len(text_t)), torch.from_numpy(ids[text_t])].sum())
    digits = ids[n : n + task.passkey_len].tolist()
    return {
        "kv_correct": kv.tolist(),
        "kv_bin": sample.kv_bin.tolist(),
        "kv_answer_index": (sample.kv_query + 1).tolist(),
        "pk_correct": bool(list(new_ids) == digits),
        "pk_bin": int(sample.pk_bin),
        "prompt_len": int(n),
        "nll": nll,
        "ntext": int(len(text_t)),
    }


def evaluate_method(model, method: str, gcfg, samples: List[Sample], task: TaskConfig, mcfg: ModelConfig,
                    vocab_size: int, chunk_size: int = 8) -> List[Dict]:
    """Per-sample results of ``method`` (see the module docstring)."""
    out = []
    model.eval()
    for s in samples:
        prompt = torch.from_numpy(s.ids[: s.prompt_len])
        if method == "window":  # trained with sinks + window: StreamingLLM eviction under the same mask
            w, sinks = model.quality_window
            new, logits, peak = baselines.evict_generate(
                model, prompt, task.passkey_len, "streaming", sinks + w, chunk_size=chunk_size, num_sink=sinks,
                window=w)
            rows = predictor_rows(len(s.ids), None)
        elif method in baselines.POLICIES:
            budget = None if method == "full" else gist_budget(s.prompt_len, task, mcfg, 4)
            new, logits, peak = baselines.evict_generate(
                model, prompt, task.passkey_len, method, budget, chunk_size=chunk_size, num_sink=mcfg.num_sink)
            rows = predictor_rows(len(s.ids), None)
        else:
            # the same raw tokens per chunk as the baselines (plus their gists)
            res = unigist.generate(model, prompt, max_new_tokens=task.passkey_len, output_logits=True,
                                   chunk_size=interleaved_length(chunk_size, gcfg.ratio), progress=False)
            new, logits = res.ids, res.logits.float().cpu()
            rows = predictor_rows(len(s.ids), gcfg)
            peak = res.kv["peak_cache_length"]
        r = _score(s, logits, rows, new, vocab_size, task)
        r["peak_kv"] = int(peak)
        out.append(r)
    return out
