"""Sizes of the GPU quality study and the step budget.

The task, model and training loop are :mod:`benchmarks.quality_cpu`'s; only their sizes live
here (why these sizes: ``README.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import torch

from benchmarks.quality_cpu.models import ModelConfig, TrainConfig, build_model
from benchmarks.quality_cpu.tasks import TaskConfig, Vocab

SEQ_LEN = 4096  # raw tokens per sequence, at least (lengths SEQ_LEN .. SEQ_LEN + 7)
# share of each distance bin among the *training* questions ([2,W), [W,2W), [2W,4W), [4W,8W));
# evaluation keeps the uniform bins of the CPU study
TRAIN_BIN_WEIGHTS = (0.1, 0.3, 0.3, 0.3)


def gpu_configs() -> Tuple[TaskConfig, ModelConfig, TrainConfig]:
    """The study's sizes: 4k-token sequences, W = 256, a 51M-parameter 10-layer Llama."""
    task = TaskConfig(window=256, base_len=SEQ_LEN, max_offset=7, num_pairs=64, passkey_len=1,
                      vocab=Vocab(num_keys=96, num_values=32, num_digits=32, num_filler=64))
    model = ModelConfig(hidden=640, layers=10, heads=10, mlp=1792, num_sink=2, max_positions=8192)
    train = TrainConfig(steps=0, batch=8, lr=1e-3, warmup=40)  # steps: set per call (time budget or --steps)
    return task, model, train


def quick_configs() -> Tuple[TaskConfig, ModelConfig, TrainConfig]:
    """A CPU-sized smoke configuration (numbers meaningless)."""
    task = TaskConfig(window=4, base_len=44, num_pairs=4, passkey_len=1)
    model = ModelConfig(hidden=32, layers=2, heads=2, mlp=64, max_positions=256)
    train = TrainConfig(steps=0, batch=4, lr=3e-3, warmup=2)
    return task, model, train


def train_task(task: TaskConfig) -> TaskConfig:
    """The training stream's task: the same sequences, more questions beyond the window."""
    return dataclasses.replace(task, bin_weights=TRAIN_BIN_WEIGHTS)


def param_count(task: TaskConfig, mcfg: ModelConfig) -> int:
    """Parameters of the full-attention model, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model, _ = build_model("full", task, mcfg, seed=0)
    return sum(p.numel() for p in model.parameters())


def tokens_per_step(task: TaskConfig, tcfg: TrainConfig) -> float:
    """Raw tokens in one training batch (mean sequence length x batch)."""
    return tcfg.batch * (task.base_len + task.max_offset / 2)


# the variants each device call trains (the fine-tune arm trains at gist_r4_prev's speed)
CALLS = (("full", "gist_r4_prev"), ("window", "gist_r4_prev", "gist_r8_prev"))


def steps_for_budget(train_seconds: float, tokens_per_s: Dict[str, float], step_tokens: float,
                     calls: Sequence[Sequence[str]] = CALLS) -> int:
    """Steps (the same for every model) such that every call's training takes at most
    ``train_seconds`` per model it trains: ``min over calls of len(call) * train_seconds /
    sum over its models of step_tokens / tokens_per_s``. Variants not measured are skipped."""
    best = None
    for call in calls:
        rates = [tokens_per_s[v] for v in call if v in tokens_per_s]
        if not rates:
            continue
        steps = len(rates) * train_seconds / sum(step_tokens / r for r in rates)
        best = steps if best is None else min(best, steps)
    if best is None:
        raise ValueError("no measured throughput to size the training from")
    return max(1, int(best))
