"""Sizes of the GPU quality study and the step budget.

The task, model and training loop are :mod:`benchmarks.quality_cpu`'s; only their sizes live
here (why these sizes: ``README.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.quality_cpu.models import ModelConfig, TrainConfig, build_model
from benchmarks.quality_cpu import tasks
from benchmarks.quality_cpu.tasks import TaskConfig, Vocab

SEQ_LEN = 4096  # raw tokens per sequence, at least (lengths SEQ_LEN .. SEQ_LEN + 7)
# share of each distance bin among the *training* questions ([2,W), [W,2W), [2W,4W), [4W,8W));
# evaluation keeps the uniform bins of the CPU study
TRAIN_BIN_WEIGHTS = (0.1, 0.3, 0.3, 0.3)
# length curriculum of the training stream (``curriculum_stream``): the first FRAC of the steps
# on sequences SHRINK times shorter (W and the kv pairs scaled with them), SHRINK times as many
# per batch; the rest at the full length. None: full length throughout (the first H200 run).
CURRICULUM: Optional[Tuple[float, int]] = (0.6, 16)
QUICK_CURRICULUM: Optional[Tuple[float, int]] = (0.5, 2)


def gpu_configs() -> Tuple[TaskConfig, ModelConfig, TrainConfig]:
    """The study's sizes: 4k-token sequences, W = 256, a 51M-parameter 10-layer Llama."""
    # 16 kv pairs from 64 keys (= the head dim): with CURRICULUM's 16x shorter sequences each of those
    # holds 1 pair and 1 passkey, the start the CPU pilot (README "Pilot (CPU)") found to learn both
    task = TaskConfig(window=256, base_len=SEQ_LEN, max_offset=7, num_pairs=16, passkey_len=1,
                      vocab=Vocab(num_keys=64, num_values=32, num_digits=32, num_filler=64))
    model = ModelConfig(hidden=640, layers=10, heads=10, mlp=1792, num_sink=2, max_positions=8192)
    # steps: set per call (time budget or --steps); answers x11 (x6 in the first run)
    train = TrainConfig(steps=0, batch=8, lr=1e-3, warmup=40, answer_weight=10.0)
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


def short_task(task: TaskConfig, shrink: int) -> TaskConfig:
    """The curriculum's short sequences: length, window (hence every distance bin) and kv pairs
    divided by ``shrink``; vocabulary, passkey and bin weights unchanged."""
    return dataclasses.replace(task, base_len=task.base_len // shrink, window=max(2, task.window // shrink),
                               num_pairs=max(1, task.num_pairs // shrink))


def curriculum_stages(curriculum) -> List[Tuple[float, int]]:
    """``(frac, shrink)`` or a sequence of them -> the list of stages (empty for None)."""
    if not curriculum:
        return []
    if isinstance(curriculum[0], (int, float)):
        return [tuple(curriculum)]
    return [tuple(c) for c in curriculum]


def curriculum_stream(task: TaskConfig, steps: int, batch: int, seed: int, curriculum=None) -> List[List[dict]]:
    """The training stream, optionally with a length curriculum: stages ``(frac, shrink)`` (one, or
    a sequence run in order), each ``round(frac * steps)`` batches of ``shrink * batch`` sequences of
    :func:`short_task` (about the same raw tokens per step); the remaining steps are
    ``tasks.train_stream(task, ...)``'s first batches. Without a curriculum it is
    ``tasks.train_stream(task, steps, batch, seed)`` exactly. Models, masks and positions are the
    final task's throughout (only the data is shorter)."""
    out: List[List[dict]] = []
    for i, (frac, shrink) in enumerate(curriculum_stages(curriculum)):
        n = min(steps - len(out), int(round(frac * steps)))
        if n > 0:
            out += tasks.train_stream(short_task(task, shrink), n, batch * shrink, seed + 7919 * (i + 1))
    return out + tasks.train_stream(task, steps - len(out), batch, seed)


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
