"""Models of the CPU quality study: one tiny random-init Llama per variant, variants differ
only in the attention mask (and, for gist variants, the gist tokens the mask needs).

* ``full``: causal attention (SDPA);
* ``gist_r{r}`` / ``gist_r{r}_prev``: UniGist through the library's public API
  (``unigist.patch_model`` + ``unigist.GistCollator``), ratio ``r``, the gist predicts the
  next raw token (``gist_predicts_next=True``) or, ``_prev``, the raw token before it does;
* ``window``: sinks + window only (``j <= i and (j < num_sink or i - j < window)``), at
  UniGist r=4's KV budget: the unpatched model trained with that mask (a 4-D boolean mask
  handed to SDPA) and evaluated under StreamingLLM eviction with the same mask
  (:mod:`.baselines`, ``window=``), so it never sees a key it could not see in training.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import unigist
from unigist import GistConfig
from unigist.layout import interleaved_length

from .tasks import PAD, TaskConfig



@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    mlp: int = 512
    num_sink: int = 2
    kv_heads: Optional[int] = None  # None: = heads (no GQA)
    max_positions: int = 1024


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    min_lr_frac: float = 0.1
    answer_weight: float = 5.0  # extra weight of the answer tokens' loss (kv values, passkey digits)


def gist_window(task: TaskConfig, ratio: int) -> int:
    """Interleaved window so that every raw token fewer than ``task.window`` raw tokens back is
    visible (and at least ``ratio + 1``: a gist must see its whole group)."""
    return max(task.window + task.window // ratio, ratio + 1)


def gist_config(task: TaskConfig, mcfg: ModelConfig, ratio: int, predicts_next: bool = True) -> GistConfig:
    return GistConfig(ratio=ratio, window=gist_window(task, ratio), num_sink=mcfg.num_sink,
                      gist_predicts_next=predicts_next)


def gist_budget(raw_len: int, task: TaskConfig, mcfg: ModelConfig, ratio: int = 4) -> int:
    """KV entries UniGist (ratio ``ratio``) may hold after a prompt of ``raw_len`` raw tokens."""
    return gist_config(task, mcfg, ratio).max_cache_len(interleaved_length(raw_len, ratio))


def nominal_prompt_len(task: TaskConfig) -> int:
    return task.base_len + (task.max_offset + 1) // 2 - task.passkey_len


def window_size(task: TaskConfig, mcfg: ModelConfig) -> int:
    """The window-only control's window: ``num_sink`` + window = UniGist r=4's budget at the nominal prompt."""
    return gist_budget(nominal_prompt_len(task), task, mcfg, 4) - mcfg.num_sink


@functools.lru_cache(maxsize=16)  # the window control builds one per batch; read-only
def window_mask(n: int, window: int, num_sink: int) -> torch.Tensor:
    """``[n, n]`` bool: query i sees key j iff ``j <= i and (j < num_sink or i - j < window)``."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((j < num_sink) | (i - j < window))


def variant_config(name: str, task: TaskConfig, mcfg: ModelConfig) -> Optional[GistConfig]:
    if name in ("full", "window"):
        return None
    if name.startswith("gist_r"):
        rest = name[len("gist_r"):]
        prev = rest.endswith("_prev")
        return gist_config(task, mcfg, int(rest.split("_")[0]), predicts_next=not prev)
    raise ValueError(f"unknown variant {name!r}")


def build_model(name: str, task: TaskConfig, mcfg: ModelConfig, seed: int):
    """Random-init Llama (same init for every variant of a seed), patched for the variant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=task.vocab.size, hidden_size=mcfg.hidden, intermediate_size=mcfg.mlp,
        num_hidden_layers=mcfg.layers, num_attention_heads=mcfg.heads, num_key_value_heads=mcfg.kv_heads or mcfg.heads,
        max_position_embeddings=mcfg.max_positions, tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    gcfg = variant_config(name, task, mcfg)
    if gcfg is not None:
        gcfg = unigist.patch_model(model, None, gcfg)
    if name == "window":
        model.quality_window = (window_size(task, mcfg), mcfg.num_sink)
    return model, gcfg


def collate(examples: List[dict], gcfg: Optional[GistConfig], window: Optional[tuple] = None
            ) -> Dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (every token) and ``answer_labels`` (answers only), in the variant's
    layout: for gist variants both label sets go through ``unigist.GistCollator``, so gists and
    the label convention (``gist_predicts_next``) are the library's."""
    if gcfg is not None:
        coll = unigist.GistCollator(gcfg, pad_token_id=PAD)
        batch = coll([{"input_ids": e["input_ids"]} for e in examples])
        ans = coll([{"input_ids": e["input_ids"], "labels": e["answer_labels"]} for e in examples])
        batch["answer_labels"] = ans["labels"]
        return batch
    n = max(e["input_ids"].shape[0] for e in examples)
    ids = torch.full((len(examples), n), PAD, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    answers = labels.clone()
    for i, e in enumerate(examples):
        k = e["input_ids"].shape[0]
        ids[i, :k] = e["input_ids"]
        labels[i, :k] = e["input_ids"]
        answers[i, :k] = e["answer_labels"]
    out = {"input_ids": ids, "labels": labels, "answer_labels": answers}
    if window is not None:  # the window-only control: [B, 1, N, N] boolean mask, taken as-is by transformers
        out["attention_mask"] = window_mask(n, *window).expand(len(examples), 1, n, n)
    return out


def weighted_loss(model, batch: Dict[str, torch.Tensor], answer_weight: float) -> torch.Tensor:
    """Causal-LM loss over every labelled token, answers counted ``1 + answer_weight`` times."""
    kwargs = {"input_ids": batch["input_ids"]}
    for key in ("position_ids", "attention_mask"):
        if key in batch:
            kwargs[key] = batch[key]
    logits = model(**kwargs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    answers = batch["answer_labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    w = (labels.reshape(-1) != -100).float() + answer_weight * (answers.reshape(-1) != -100).float()
    return (ce * w).sum() / w.sum()


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """``batch`` on ``device``; a broadcast (expanded) mask is moved once and expanded there."""
    out = {}
    for k, v in batch.items():
        if v.dim() > 0 and v.stride(0) == 0:
            out[k] = v[:1].to(device, non_blocking=True).expand(v.shape)
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


def train(model, gcfg, stream: List[List[torch.Tensor]], tcfg: TrainConfig,
          log: Optional[Callable[[int, float], None]] = None, log_every: int = 50,
          autocast_dtype: Optional[torch.dtype] = None) -> List[float]:
    """Plain AdamW loop, warmup + cosine; returns the loss of every step. Batches go to the
    model's device; on CUDA ``autocast_dtype`` (e.g. bfloat16) runs the forward under autocast."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.98))
    steps = min(tcfg.steps, len(stream))

    def lr_at(step):
        if step < tcfg.warmup:
            return (step + 1) / tcfg.warmup
        t = (step - tcfg.warmup) / max(1, steps - tcfg.warmup)
        return tcfg.min_lr_frac + (1 - tcfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    device = next(model.parameters()).device
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    losses = []
    for step in range(steps):
        batch = to_device(collate(stream[step], gcfg, getattr(model, "quality_window", None)), device)
        with amp:
            loss = weighted_loss(model, batch, tcfg.answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(step, losses[-1])
    model.eval()
    return losses
