#!/usr/bin/env python3
"""Quality benchmark: does chunk-free gist training keep the details that
same-budget KV eviction loses?

End to end, with no downloads:

1. a fixed synthetic language plus long-context recall tasks (``data.py``);
2. one small Llama model (``transformers.LlamaForCausalLM``, random init)
   pretrained with full causal attention (stage 1), then copies of it
   fine-tuned on the same stream for the same steps (stage 2): one with full
   attention, and one per gist ratio (default r=4 and r=8) patched with
   ``unigist.patch_model`` and trained chunk-free on ``unigist.gist_batch``
   (``GistCollator`` layout) batches - the paper's setting;
3. evaluation at several context lengths of
   * recall accuracy (greedy exact match of the answer) on key-value retrieval
     and multi-needle passkey,
   * perplexity on held-out text (last ``--ppl-tokens`` tokens of each document),
   for: full attention (no budget); UniGist compressed generation
   (``unigist.generate``: chunked prefill, real eviction); and training-free
   eviction on the fine-tuned full-attention model (``baselines.py``:
   StreamingLLM, SnapKV chunked, SnapKV one-shot) given exactly UniGist's KV
   entries.
4. ``quality.md`` (tables, command, device, seeds), ``quality.png`` and
   ``quality.json`` under ``--out``.

``python benchmarks/quality/run_quality.py --tiny --device cpu`` runs the whole
pipeline in under a minute on a CPU with a tiny model (a smoke run: the
numbers mean nothing). The defaults are sized for one H100, ~20 minutes in
one process; ``--save-base`` / ``--load-base``, ``--finetune``,
``--save-finetuned`` / ``--load-finetuned`` and ``--eval-only`` split it into
calls of under 10 minutes (README.md gives the three-call recipe).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from typing import List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data import TASKS, Language, Vocab, eval_set, text_set  # noqa: E402

try:  # stage 1 and the full-attention copy need no extension: a call may run them before (or while) it builds
    import unigist  # noqa: E402
except ImportError:  # pragma: no cover - depends on the build
    unigist = None


def need_unigist(a=None):
    """The ``unigist`` package, imported on first use (after ``--wait-for``, if given)."""
    global unigist
    if unigist is None:
        if a is not None and a.wait_for:
            t = time.perf_counter()
            while not os.path.exists(a.wait_for):
                time.sleep(1)
            log(f"waited {time.perf_counter() - t:.0f}s for {a.wait_for}")
        import importlib

        unigist = importlib.import_module("unigist")
    return unigist


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

PRESETS = {
    # 7.3M parameters (incl. 0.8M tied embeddings); one H100, bf16 autocast. Measured there: ~32 steps/s
    # of 32768 tokens with full attention at every length 256-4096 and ~12 steps/s for the gist models
    # (unigist kernel). Pretraining 400 s (~12.5k steps), the full-attention copy 60 s, each gist copy
    # 220 s, evaluation ~1.2 s per sample index (all lengths, tasks and methods): see README.md for the
    # three-call recipe that fits the 10-minute device limit.
    #
    # Distance curriculum (``distance_curriculum``: bound:fraction of steps, unbounded afterwards): the
    # last runs' base models learned lookups only within ~128 tokens when queries were mostly short, and
    # no kv lookup at all in 210 s when queries were spread over the whole context. So the first 28% of
    # stage 1 (~3.5k steps; recall took 1-2k steps to emerge in those runs) asks only about pairs at most
    # 32, 64, then 128 tokens back, at length 256; then the bound doubles every ~10% (~1.3k steps), kept
    # at half the document length so that every document has both nearer and farther candidates; the
    # last 30% (~3.8k steps at 4096) is unbounded, as in the evaluation (final query anywhere).
    "default": dict(
        vocab=2048, symbols=512, hidden=384, layers=4, heads=6, kv_heads=3, inter=1024,
        train_len=4096, batch=8, steps=13000, lr=2e-3, train_seconds=400.0,
        curriculum="256:0.28,512:0.1,1024:0.1,2048:0.1,4096:0.42",
        distance_curriculum="32:0.08,64:0.1,128:0.1,256:0.1,512:0.1,1024:0.1,2048:0.12", mix="1,3,2,2",
        ft_steps=1500, ft_seconds=60.0, ft_lr=1e-3, ft_curriculum="2048:0.4,4096:0.6",
        ft_gist_steps=3000, ft_gist_seconds=220.0, answer_weight=5.0,
        probe_len=[1024, 4096],
        lengths=[512, 1024, 2048, 4096], n_eval=200, n_text=16, ppl_tokens=512, chunk=512,
        window=256, sink=16, eval_batch=40,
    ),
    # a small model on a CPU (2 cores: ~20 minutes), contexts 64-256
    "small": dict(
        vocab=512, symbols=96, hidden=256, layers=2, heads=4, kv_heads=4, inter=512,
        train_len=256, batch=8, steps=2000, lr=3e-3, train_seconds=480.0,
        curriculum="64:0.5,128:0.25,256:0.25", distance_curriculum="16:0.15,32:0.15,64:0.2,128:0.2",
        mix="0,3,2,2", ft_steps=400, ft_seconds=200.0, ft_lr=1e-3, ft_curriculum="",
        ft_gist_steps=800, ft_gist_seconds=400.0, answer_weight=5.0, probe_len=[128, 256],
        lengths=[64, 128, 256], n_eval=32, n_text=8, ppl_tokens=64, chunk=32,
        window=32, sink=4, eval_batch=32,
    ),
    # seconds on a CPU; numbers meaningless, the pipeline is exercised end to end.
    "tiny": dict(
        vocab=512, symbols=96, hidden=128, layers=2, heads=2, kv_heads=1, inter=256,
        train_len=256, batch=8, steps=40, lr=3e-3, train_seconds=20.0,
        curriculum="128:0.5,256:0.5", distance_curriculum="32:0.25,64:0.25", mix="1,2,2",
        ft_steps=20, ft_seconds=15.0, ft_lr=1e-3, ft_curriculum="", ft_gist_steps=30, ft_gist_seconds=20.0,
        answer_weight=5.0, probe_len=[128, 256],
        lengths=[128, 256], n_eval=8, n_text=4, ppl_tokens=64, chunk=64,
        window=32, sink=4, eval_batch=8,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and contexts (CPU smoke run; = --preset tiny)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: sized for one H100; small: a CPU-sized model; tiny: smoke run")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--seed", type=int, default=0, help="model init + training data seed")
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--ratios", type=int, nargs="+", default=[4, 8])
    p.add_argument("--wait-for", default=None, help="wait until this file exists before importing unigist "
                   "(lets the extension build while the full-attention model trains)")
    p.add_argument("--workers", type=int, default=None, help="data-generation processes")
    p.add_argument("--save-base", default=None, help="save the pretrained base model here (bf16 state dict)")
    p.add_argument("--load-base", default=None, help="skip pretraining: load the base model saved by --save-base")
    p.add_argument("--base-only", action="store_true", help="stop after pretraining (and --save-base)")
    p.add_argument("--finetune", nargs="+", default=None, metavar="MODEL",
                   help="which copies stage 2 fine-tunes in this call: 'full' and/or ratios ('4' or 'r4'), "
                        "'all' (default) or 'none'")
    p.add_argument("--save-finetuned", default=None, metavar="DIR",
                   help="save each copy fine-tuned in this call as DIR/full.pt, DIR/r<ratio>.pt (bf16)")
    p.add_argument("--load-finetuned", nargs="+", default=None, metavar="DIR",
                   help="load fine-tuned copies saved by --save-finetuned (those not fine-tuned in this call)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate the copies loaded with --load-finetuned (all must be there)")
    p.add_argument("--no-eval", action="store_true", help="stop after fine-tuning (and --save-finetuned)")
    p.add_argument("--probe-every", type=int, default=500, help="held-out recall probe every N training steps (0: off)")
    p.add_argument("--probe-samples", type=int, default=32, help="probe samples per task and length")
    p.add_argument("--keep-best", choices=("base", "all", "none"), default="base",
                   help="after training, restore the state with the best held-out probe (mean exact match over "
                        "tasks and --probe-len lengths) rather than the last step: for the base model (default), "
                        "for every model, or never")
    p.add_argument("--probe-stop", type=float, default=0.0,
                   help="stop stage 1 once the held-out probe score reaches this (0 < x <= 1; 0: off)")
    for k, v in PRESETS["default"].items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, list):
            p.add_argument(flag, type=int, nargs="+", default=None)
        else:
            p.add_argument(flag, type=type(v), default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.preset = "tiny"
    a.preset = a.preset or "default"
    a.tiny = a.preset == "tiny"
    preset = PRESETS[a.preset]
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# data workers (numpy only; forked before CUDA is touched)
# ---------------------------------------------------------------------------

_LANG = None


def _worker_init(vocab_size, symbols):
    global _LANG
    _LANG = Language(Vocab(vocab_size, symbols))


def _make_batch(args):
    seed, step, batch, length, mix, max_distance = args
    rng = np.random.default_rng([seed, 7, step])
    return np.asarray([_LANG.train_sequence(rng, length, mix, max_distance) for _ in range(batch)], dtype=np.int64)


def _phases(spec: str):
    """``"512:0.4,1024:0.6"`` -> ``[(512, 0.4), (1024, 0.6)]`` (value:fraction of steps)."""
    phases = []
    for part in filter(None, (spec or "").replace(" ", "").split(",")):
        n, frac = part.split(":")
        if int(n) < 0 or float(frac) < 0:
            raise ValueError(f"bad curriculum phase {part!r} in {spec!r}")
        phases.append((int(n), float(frac)))
    if sum(f for _, f in phases) > 1.0 + 1e-9:
        raise ValueError(f"curriculum {spec!r}: fractions add up to more than 1")
    return phases


def parse_curriculum(spec: str, batch: int, length: int, steps: int):
    """``"512:0.4,1024:0.6"`` -> per-step (batch, length) with ``batch * length`` tokens per step
    (the last phase runs at ``--train-len``; an empty spec means ``--train-len`` throughout)."""
    phases = _phases(spec)
    if not phases or phases[-1][0] != length:
        phases.append((length, 0.0 if phases else 1.0))
    tokens = batch * length
    bounds, acc = [], 0.0
    for n, frac in phases:
        acc += frac
        bounds.append((round(acc * steps), max(1, tokens // n), n))

    def at(step):
        for end, b, n in bounds:
            if step < end:
                return b, n
        return bounds[-1][1], bounds[-1][2]

    return at


def parse_distance_curriculum(spec: str, steps: int):
    """``"32:0.1,256:0.2"`` -> per-step bound on how far back a training query may look (``max_distance``
    of ``data.Language.train_sequence``): 32 tokens for the first 10% of the steps, 256 for the next
    20%, unbounded (None) afterwards; a bound of 0 means unbounded too. An empty spec: never bounded."""
    bounds, acc = [], 0.0
    for d, frac in _phases(spec):
        acc += frac
        bounds.append((round(acc * steps), d or None))

    def at(step):
        for end, d in bounds:
            if step < end:
                return d
        return None

    return at


class BatchStream:
    """Deterministic training batches (batch ``i`` depends on (seed, i) only), generated ahead in a pool."""

    def __init__(self, pool, seed, schedule, mix, ahead=6, distance=None):
        self.pool, self.seed, self.schedule, self.mix, self.ahead = pool, seed, schedule, mix, ahead
        self.distance = distance or (lambda step: None)
        self.pending = []
        self.next_step = 0

    def _submit(self, at_step):
        b, n = self.schedule(at_step)
        d = self.distance(at_step)
        args = (self.seed, self.next_step, b, n, self.mix, None if d is None or d >= n else d)
        if self.pool is None:
            self.pending.append((_make_batch(args), args[-1]))
        else:
            self.pending.append((self.pool.apply_async(_make_batch, (args,)), args[-1]))
        self.next_step += 1

    def get(self, at_step):
        """Next batch; new work is shaped by the curricula (length and distance) at ``at_step`` (>= the
        batch index when training runs behind its time budget, so the last phase is always reached)."""
        while len(self.pending) < self.ahead:
            self._submit(at_step + len(self.pending))
        item, self.last_distance = self.pending.pop(0)  # the batch and its query-distance bound
        return item if isinstance(item, np.ndarray) else item.get()


# ---------------------------------------------------------------------------
# models and training
# ---------------------------------------------------------------------------


def make_model(a, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
        max_position_embeddings=2 * a.train_len + 64, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=None, pad_token_id=0, attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(cfg)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:
        pass
    return model.to(device)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bf16_autocast(device):
    """bf16 autocast on a GPU (training and probes); plain float32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def weighted_loss(logits, labels, weights, answers):
    """Next-token cross-entropy with per-token weights (``labels`` ``-100`` ignored), plus the
    greedy hits and count on the ``answers`` tokens (a free recall probe)."""
    logits, labels, weights, answers = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:], answers[:, 1:]
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    w = weights * valid
    loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
    ans = valid & answers
    hits = (logits.argmax(-1) == labels) & ans
    return loss, hits.sum(), ans.sum()


@torch.no_grad()
def answer_predictions(model, samples, device, gist_config=None) -> torch.Tensor:
    """Greedy, teacher-forced predictions ``[n, len(answer)]`` of each sample's answer, in one
    chunk-free forward over ``prompt + answer[:-1]`` (for gist models over the interleaved layout
    through the gist attention, which equals compressed generation). Samples share one length."""
    length, n_ans = len(samples[0].prompt), len(samples[0].answer)
    raw = torch.tensor([s.prompt + s.answer[:-1] for s in samples])
    # the logits that predict raw token j sit one position before it (a gist's, after a full group)
    if gist_config is None:
        batch, pos = {"input_ids": raw}, torch.arange(raw.shape[1] + 1)
    else:
        ug = need_unigist()
        batch = ug.gist_batch(raw, gist_config)
        batch.pop("labels")
        pos = ug.layout.raw_positions(raw.shape[1] + 1, gist_config)
    pos = pos[length : length + n_ans] - 1
    autocast = bf16_autocast(device)
    with autocast:
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
    return logits[:, pos.to(device)].argmax(-1).cpu()


def probe_recall(model, lang, length: int, a, device, gist_config=None) -> dict:
    """Held-out recall probe: exact match of ``answer_predictions`` on ``--probe-samples`` evaluation
    samples per task of ``length`` tokens. Unlike the training answer accuracy, it asks pairs never
    asked before at evaluation distances: the number the evaluation will report. The samples come
    from their own seed (``--eval-seed`` + 17), so selecting a checkpoint on them does not touch the
    evaluation samples."""
    was_training = model.training
    model.eval()
    out = {}
    for task in TASKS:
        samples = eval_set(lang, task, length, a.probe_samples, a.eval_seed + 17)
        pred = torch.cat([answer_predictions(model, group, device, gist_config)
                          for group in _batches(samples, max(1, a.eval_batch))])
        out[task] = float((pred == torch.tensor([s.answer for s in samples])).all(dim=1).float().mean())
    model.train(was_training)
    return out


def probe_score(pr: dict) -> float:
    """One number per probe: mean exact match over tasks and probe lengths."""
    return float(np.mean([v for per_len in pr.values() for v in per_len.values()]))


def train(model, a, pool, device, name: str, *, steps: int, seconds: float, lr: float, curriculum: str,
          seed: int, gist_config=None, lang=None, distance_curriculum: str = "", keep_best: bool = False,
          stop_at: float = 0.0) -> dict:
    """Train on the shared stream (seeded by ``seed``): raw batches for full attention, the
    ``unigist.gist_batch`` (GistCollator) layout for gist models. The loss weights answer tokens by
    ``--answer-weight``; their greedy accuracy is logged, and every ``--probe-every`` steps (and at
    the end) the held-out final-query probe (``probe_recall``) at each ``--probe-len`` length.

    ``distance_curriculum`` bounds how far back the training queries look (``parse_distance_curriculum``).
    ``keep_best``: at the end, restore the state of the best probe (ties: the later one) instead of
    the last step's. ``stop_at`` > 0: stop as soon as a probe scores at least that much."""
    from data import answer_mask

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    schedule = parse_curriculum(curriculum, a.batch, a.train_len, steps)
    stream = BatchStream(pool, seed, schedule, tuple(float(x) for x in a.mix.split(",")),
                         distance=parse_distance_curriculum(distance_curriculum, steps))
    autocast = bf16_autocast(device)
    warm = max(10, steps // 30)
    model.train()
    curve, t0, step, tokens_seen, phase_log, dist_log = [], time.perf_counter(), 0, 0, {}, {}
    run_loss, run_hits, run_ans = [], 0, 0
    probes, best, stopped = [], None, None
    probing = lang is not None and a.probe_every > 0

    def probe(at_step):
        nonlocal best
        t = time.perf_counter()
        pr = {str(n): probe_recall(model, lang, n, a, device, gist_config) for n in a.probe_len}
        score = probe_score(pr)
        probes.append(dict(step=at_step, score=round(score, 4),
                           recall={n: {k: round(v, 4) for k, v in r.items()} for n, r in pr.items()}))
        new_best = best is None or score >= best["score"]
        if new_best:
            best = dict(step=at_step, score=score)
            if keep_best:  # a CPU copy of the weights (7.3M parameters: ~30 MB, milliseconds)
                best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log(f"  {name} step {at_step} held-out recall " + ", ".join(
            f"@{n}: kv {100 * r['kv']:.0f}% passkey {100 * r['passkey']:.0f}%" for n, r in pr.items())
            + f" (score {100 * score:.1f}%{', best so far' if new_best else ''}; {time.perf_counter() - t:.1f}s)")
        return score

    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    while step < steps:
        elapsed = time.perf_counter() - t0
        if elapsed > seconds:
            break
        progress = max(step / steps, elapsed / seconds)
        lr_now = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr_now
        raw_np = stream.get(max(step, int(progress * steps)))
        dist_log[str(stream.last_distance)] = dist_log.get(str(stream.last_distance), 0) + 1
        raw = torch.from_numpy(raw_np)
        ans_raw = torch.from_numpy(answer_mask(raw_np))
        w_raw = torch.where(ans_raw, a.answer_weight, 1.0)
        if gist_config is None:
            batch = {"input_ids": raw, "position_ids": None}
            labels, weights, answers = raw, w_raw, ans_raw
        else:
            batch = unigist.gist_batch(raw, gist_config)
            labels = batch.pop("labels")
            at = unigist.layout.raw_positions(raw.shape[1], gist_config)
            weights = torch.zeros(labels.shape, dtype=torch.float32)
            answers = torch.zeros(labels.shape, dtype=torch.bool)
            weights[:, at], answers[:, at] = w_raw, ans_raw
        tokens_seen += raw.numel()
        phase_log[raw.shape[1]] = phase_log.get(raw.shape[1], 0) + 1
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if v is not None}
        labels, weights, answers = (t.to(device, non_blocking=True) for t in (labels, weights, answers))
        with autocast:
            logits = model(**batch, use_cache=False).logits
        loss, hits, n_ans = weighted_loss(logits, labels, weights, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            run_loss.append(float(loss.detach()))
            run_hits += int(hits)
            run_ans += int(n_ans)
        if step % 50 == 0 or step == steps - 1:
            acc = run_hits / max(1, run_ans)
            curve.append((step, round(float(np.mean(run_loss)), 4), round(acc, 4), raw.shape[1]))
            if step % 100 == 0 or step == steps - 1:
                log(f"  {name} step {step} len {raw.shape[1]} loss {curve[-1][1]:.4f} answer-acc {100 * acc:.1f}% "
                    f"lr {lr_now:.2e} ({time.perf_counter() - t0:.0f}s)")
            run_loss, run_hits, run_ans = [], 0, 0
        if probing and step % a.probe_every == a.probe_every - 1:
            score = probe(step)
            if stop_at > 0 and score >= stop_at:
                stopped = f"held-out probe {100 * score:.1f}% >= {100 * stop_at:.1f}% at step {step}"
                log(f"  {name}: stopping, {stopped}")
                step += 1
                break
        step += 1
    if probing and step > 0 and (not probes or probes[-1]["step"] != step - 1):
        probe(step - 1)
    sync()
    dt = time.perf_counter() - t0
    info = dict(name=name, steps=step, seconds=round(dt, 1), raw_tokens=int(tokens_seen),
                final_loss=curve[-1][1] if curve else float("nan"),
                final_answer_acc=curve[-1][2] if curve else float("nan"),
                curve=curve, probes=probes, steps_per_length=phase_log, steps_per_distance_bound=dist_log,
                stopped=stopped,
                settings=dict(max_steps=steps, seconds_cap=seconds, lr=lr, curriculum=curriculum or str(a.train_len),
                              distance_curriculum=distance_curriculum, tokens_per_step=a.batch * a.train_len,
                              mix=a.mix, answer_weight=a.answer_weight, seed=seed, keep_best=keep_best,
                              probe_len=list(a.probe_len), probe_samples=a.probe_samples))
    if best is not None:
        info["best_probe"] = dict(step=best["step"], score=round(best["score"], 4))
        info["last_probe"] = dict(step=probes[-1]["step"], score=probes[-1]["score"])
        if keep_best and best["step"] != probes[-1]["step"]:
            model.load_state_dict(best["state"])
            info["restored_step"] = best["step"]
            log(f"  {name}: restored the best held-out probe state, step {best['step']} ({100 * best['score']:.1f}%), "
                f"instead of the last, step {probes[-1]['step']} ({100 * probes[-1]['score']:.1f}%)")
        elif keep_best:
            log(f"  {name}: the last step has the best held-out probe ({100 * best['score']:.1f}%); keeping it")
    log(f"trained {name}: {step} steps in {dt:.0f}s ({info['raw_tokens'] / dt / 1e3:.0f}k raw tok/s), "
        f"loss {info['final_loss']:.4f}, answer-acc {100 * info['final_answer_acc']:.1f}%")
    model.eval()
    return info


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def eval_engine(model, policy, samples, a, device) -> dict:
    """Recall accuracy of a (full-attention) model under a baseline eviction policy."""
    from baselines import EvictEngine

    eng = EvictEngine(model, policy)
    correct, peaks = [], []
    for group in _batches(samples, a.eval_batch):
        p = len(group[0].prompt)
        ids = torch.tensor([s.prompt + s.answer[:-1] for s in group], device=device)
        logits = eng.run(ids, a.chunk, p, p - 1)  # [B, len(answer), V]
        pred = logits.argmax(-1).cpu()
        ans = torch.tensor([s.answer for s in group])
        correct += (pred == ans).all(dim=1).tolist()
        peaks.append(eng.peak_length)
    return dict(acc=float(np.mean(correct)), n=len(correct), peak_entries=max(peaks))


@torch.no_grad()
def ppl_engine(model, policy, docs, a, device) -> dict:
    from baselines import EvictEngine

    eng = EvictEngine(model, policy)
    nll, count = 0.0, 0
    for group in _batches(docs, a.eval_batch):
        ids = torch.tensor(group, device=device)
        L = ids.shape[1]
        s = L - min(a.ppl_tokens, L // 2)
        logits = eng.run(ids, a.chunk, L, s - 1)[:, :-1]  # predicts tokens s..L-1
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, s:, None]).squeeze(-1)
        nll -= float(lp.sum())
        count += lp.numel()
    return dict(ppl=math.exp(nll / count), nll=nll / count)


@torch.no_grad()
def _engine_gist_logits(model, config, ids_raw: List[int], a, score_raw_from: int):
    """Fallback path: teacher-forced logits over the interleaved sequence through the independent engine
    (reference mask + keep_for_future eviction after every chunk). Returns logits predicting raw tokens
    ``score_raw_from..len(ids_raw)-1``."""
    from baselines import EvictEngine, GistPolicy
    from unigist.layout import insert_gists, raw_positions

    device = model.get_input_embeddings().weight.device
    full = insert_gists(torch.tensor(ids_raw), config)["input_ids"][None].to(device)
    pos = raw_positions(len(ids_raw), config)[score_raw_from:]
    logits = EvictEngine(model, GistPolicy(config)).run(full, a.chunk, full.shape[1], 0)
    return logits[0, (pos - 1).to(device)]


GIST_EVAL_PATH = {}


@torch.no_grad()
def eval_unigist(model, samples, a, device, config) -> dict:
    """Recall accuracy with ``unigist.generate`` (greedy, chunked prefill, real eviction)."""
    generate = unigist.generate
    correct, peak = [], 0
    for s in samples:
        if GIST_EVAL_PATH.get(config.ratio, "unigist.generate") == "unigist.generate":
            try:
                res = generate(model, torch.tensor(s.prompt, device=device), max_new_tokens=len(s.answer),
                               chunk_size=a.chunk, progress=False, eos_token_id=[])
                correct.append(list(res.ids) == s.answer)
                peak = max(peak, res.kv["peak_cache_length"])
                GIST_EVAL_PATH[config.ratio] = "unigist.generate"
                continue
            except Exception as exc:
                import traceback

                traceback.print_exc()
                GIST_EVAL_PATH[config.ratio] = f"engine fallback (unigist.generate failed: {type(exc).__name__}: {exc})"
                log(f"unigist.generate failed for r={config.ratio}; falling back to the reference engine")
        logits = _engine_gist_logits(model, config, s.prompt + s.answer, a, len(s.prompt))
        correct.append(bool((logits.argmax(-1).cpu() == torch.tensor(s.answer)).all()))
    return dict(acc=float(np.mean(correct)), n=len(correct), peak_entries=peak)


@torch.no_grad()
def ppl_unigist(model, docs, a, device, config) -> dict:
    from unigist.layout import raw_positions

    generate = unigist.generate
    nll, count = 0.0, 0
    for doc in docs:
        L = len(doc)
        s = L - min(a.ppl_tokens, L // 2)
        if GIST_EVAL_PATH.get(config.ratio, "unigist.generate") == "unigist.generate":
            res = generate(model, torch.tensor(doc, device=device), max_new_tokens=0, chunk_size=a.chunk,
                           progress=False, output_logits=True, eos_token_id=[])
            logits = res.logits[raw_positions(L, config)[s:] - 1].float()
        else:
            logits = _engine_gist_logits(model, config, doc, a, s).float().cpu()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(doc[s:])[:, None]).squeeze(-1)
        nll -= float(lp.sum())
        count += lp.numel()
    return dict(ppl=math.exp(nll / count), nll=nll / count)


@torch.no_grad()
def crosscheck_unigist(model, samples, a, device, config) -> dict:
    """Teacher-forced answers through the independent engine (GistPolicy: reference mask + keep_for_future)
    versus unigist.generate's greedy answers: how often do they agree on exact match?"""
    generate = unigist.generate
    agree = 0
    for s in samples:
        logits = _engine_gist_logits(model, config, s.prompt + s.answer, a, len(s.prompt))
        ok_engine = bool((logits.argmax(-1).cpu() == torch.tensor(s.answer)).all())
        res = generate(model, torch.tensor(s.prompt, device=device), max_new_tokens=len(s.answer),
                       chunk_size=a.chunk, progress=False, eos_token_id=[])
        agree += ok_engine == (list(res.ids) == s.answer)
    return dict(n=len(samples), agree=agree)


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

LABELS = {
    "full": "Full attention (no budget)",
    "unigist": "UniGist r={r} (compressed generation)",
    "streaming": "StreamingLLM @ UniGist r={r} budget",
    "snapkv": "SnapKV chunked @ UniGist r={r} budget",
    "snapkv_oneshot": "SnapKV one-shot* @ UniGist r={r} budget",
}


def method_key(kind, r=None):
    return kind if r is None else f"{kind}@r{r}"


def method_label(key):
    kind, _, r = key.partition("@r")
    return LABELS[kind].format(r=r)


def _probe_text(t) -> str:
    """The held-out probe of one training run, for the report: last (and best, when restored)."""
    probes = t.get("probes") or []
    if not probes:
        return ""
    last = probes[-1]
    if isinstance(last, (list, tuple)):  # older files: (step, length, kv, passkey)
        return f", held-out final-query recall at {last[1]} tokens kv {100 * last[2]:.0f}% / passkey {100 * last[3]:.0f}%"

    def one(p):
        return "; ".join(f"{n} tokens kv {100 * r['kv']:.0f}% / passkey {100 * r['passkey']:.0f}%"
                         for n, r in p["recall"].items())

    out = f", held-out final-query recall at the last step ({last['step']}): {one(last)}"
    if t.get("restored_step") is not None:
        best = next(p for p in probes if p["step"] == t["restored_step"])
        out += f"; **kept the best probe's state, step {best['step']}**: {one(best)}"
    if t.get("stopped"):
        out += f"; stopped early ({t['stopped']})"
    return out


def _stage_settings(t, a, stage: int) -> dict:
    """Training settings of a run, from its info (files of earlier calls) or, for older files, from ``a``."""
    st = dict(t.get("settings") or {})
    if stage == 1:
        st.setdefault("max_steps", a.steps)
        st.setdefault("seconds_cap", a.train_seconds)
        st.setdefault("lr", a.lr)
        st.setdefault("curriculum", a.curriculum)
        st.setdefault("distance_curriculum", "")
    st.setdefault("tokens_per_step", a.batch * a.train_len)
    st.setdefault("mix", a.mix)
    st.setdefault("answer_weight", a.answer_weight)
    return st


def write_report(res: dict, a, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "quality.json"), "w") as f:
        json.dump(res, f, indent=1)
    lengths = res["lengths"]
    methods = res["methods"]
    L = []
    L.append("# Quality: UniGist vs. same-budget KV eviction\n")
    L.append(res.get("headline", ""))
    L.append("## Setup\n")
    env = res["env"]
    L.append(f"- Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"unigist CUDA kernels: {env.get('cuda_kernels')}; training attention for the gist models: "
             f"{env.get('gist_train_attention')}; UniGist evaluation path: {env.get('gist_eval_path', 'unigist.generate')}.")
    cmds = res.get("commands") or []
    if len(cmds) == 1:
        L.append(f"- Command: `{cmds[0]}`")
    else:
        L.append("- Commands (one per device call, in this order; each saves the models the next one loads; "
                 "see benchmarks/quality/README.md):")
        L += [f"  {i}. `{c}`" for i, c in enumerate(cmds, 1)]
    L.append(f"- Seeds: model init + training data `--seed {a.seed}`, evaluation data `--eval-seed {a.eval_seed}`; "
             f"grammar seed {res['grammar_seed']} (fixed). Wall time of the evaluating call "
             f"{res.get('wall_seconds', 0):.0f} s (evaluation {res.get('eval_seconds', 0):.0f} s).")
    m = res["model"]
    L.append(f"- Model: Llama ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} KV heads, "
             f"head dim {m['head_dim']}, MLP {m['inter']}, vocab {m['vocab']} (+1 gist), tied embeddings): "
             f"{m['params'] / 1e6:.1f}M parameters, random init; all fine-tuned copies come from one base "
             f"(weights fingerprint `{res.get('base_id')}`).")
    trs = res["training"]
    base = next((t for t in trs if t["name"].startswith("base")), None)
    if base is not None:
        st = _stage_settings(base, a, 1)
        dist = st["distance_curriculum"]
        dist = (f"distance curriculum `{dist}` (bound on how far back a training query's pair / needle may be: "
                f"tokens:fraction of steps, unbounded afterwards)") if dist else "no distance curriculum"
        L.append(f"- Training, stage 1 (pretraining one base model with full attention from random init): text/kv/"
                 f"passkey/copy mixed {st['mix']}; up to {st['max_steps']} steps of {st['tokens_per_step']} raw tokens, "
                 f"length curriculum `{st['curriculum']}` (length:fraction of steps) ending at {a.train_len}; {dist}; "
                 f"AdamW lr {st['lr']}, warmup + cosine, bf16 autocast on GPU, loss weight {st['answer_weight']} on "
                 f"answer tokens; capped at {st['seconds_cap']:.0f} s (past the cap the curricula move on by time and "
                 f"training stops)" + ("; the state with the best held-out probe is kept" if st.get("keep_best") else "")
                 + ".")
    ft = [t for t in trs if not t["name"].startswith("base")]
    if ft:
        budgets = "; ".join(f"{t['name']}: up to {_stage_settings(t, a, 2).get('max_steps', '?')} steps, capped at "
                            f"{_stage_settings(t, a, 2).get('seconds_cap', float('nan')):.0f} s" for t in ft)
        st = _stage_settings(ft[0], a, 2)
        L.append(f"- Training, stage 2 (fine-tuning copies of the base on the same stream, seed + 1, lr {st.get('lr')}, "
                 f"curriculum `{st.get('curriculum')}`): full attention, and unigist per ratio (`unigist.patch_model` + "
                 f"`unigist.gist_batch` layout, chunk-free through the gist kernel). Budgets: {budgets}. The gist "
                 f"copies get more steps: the full copy keeps the architecture it was pretrained in and is already "
                 f"converged on this data, a gist copy must learn a new layout (shifted positions, a new token); "
                 f"they get more training compute only, not more data per step nor KV memory.")
    L.append("- Per model (answer accuracy: greedy teacher-forced accuracy on the answer tokens of the last training "
             "batches; held-out final-query recall: `probe_recall`, fresh final queries at evaluation distances, "
             "teacher-forced, on samples of their own seed):")
    for t in trs:
        acc = t.get("final_answer_acc")
        acc = "" if acc is None else f", answer accuracy {100 * acc:.1f}%"
        acc += _probe_text(t)
        extra = ""
        if t.get("steps_per_distance_bound") and set(t["steps_per_distance_bound"]) != {"None"}:
            extra = f", steps per distance bound: {t['steps_per_distance_bound']}"
        L.append(f"  - {t['name']}: {t['steps']} steps, {t['raw_tokens'] / 1e6:.1f}M raw tokens, {t['seconds']} s, "
                 f"final train loss {t['final_loss']}{acc} (steps per length: {t['steps_per_length']}{extra})")
    L.append(f"- UniGist layout: window {a.window} positions, {a.sink} sink positions, ratios {a.ratios}; chunked "
             f"prefill in chunks of {a.chunk} positions for every method (baselines: {a.chunk} raw tokens), "
             f"eviction after every chunk.")
    L.append(f"- Evaluation: {a.n_eval} samples per task and length (greedy exact match of the whole answer; "
             f"one sample = {100 / a.n_eval:.1f} points), {a.n_text} text documents per length for perplexity "
             f"(last {a.ppl_tokens} tokens, or the last half when shorter).\n")

    L.append("## KV budget (entries per layer after the prompt)\n")
    L.append("| context (raw tokens) | " + " | ".join(str(n) for n in lengths) + " |")
    L.append("|---|" + "---|" * len(lengths))
    L.append("| full attention | " + " | ".join(str(n) for n in lengths) + " |")
    for r in a.ratios:
        L.append(f"| UniGist r={r} (= baselines' budget) | " + " | ".join(
            f"{res['budgets'][str(r)][str(n)]} ({100 * res['budgets'][str(r)][str(n)] / n:.0f}%)" for n in lengths) + " |")
    L.append("")

    for task in TASKS:
        L.append(f"## Recall accuracy, {task} (% exact match)\n")
        L.append("| method | " + " | ".join(f"{n}" for n in lengths) + " |")
        L.append("|---|" + "---|" * len(lengths))
        for key in methods:
            row = [res["acc"].get(key, {}).get(task, {}).get(str(n)) for n in lengths]
            L.append(f"| {method_label(key)} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in row) + " |")
        L.append("")
    L.append(f"## Perplexity on held-out text (last {a.ppl_tokens} tokens)\n")
    L.append("| method | " + " | ".join(f"{n}" for n in lengths) + " |")
    L.append("|---|" + "---|" * len(lengths))
    for key in methods:
        row = [res["ppl"].get(key, {}).get(str(n)) for n in lengths]
        L.append(f"| {method_label(key)} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in row) + " |")
    L.append("")
    L.append("\\* SnapKV one-shot prefills the whole prompt with a full cache and compresses once, with the "
             "question in its observation window: its *decoding* cache has the budget, its prefill peak is the full "
             "cache. Every other method holds at most budget + one chunk at any time.\n")
    if res.get("crosscheck"):
        L.append("## Cross-check\n")
        for r, c in res["crosscheck"].items():
            L.append(f"- r={r}: an independent engine (reference mask + keep_for_future, teacher-forced) agrees with "
                     f"`unigist.generate` on exact match for {c['agree']}/{c['n']} samples.")
        L.append("")
    if res.get("errors"):
        L.append("## Errors during the run\n")
        for e in res["errors"]:
            L.append(f"- {e}")
        L.append("")
    with open(os.path.join(out_dir, "quality.md"), "w") as f:
        f.write("\n".join(L) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover
        log(f"no matplotlib ({exc}); skipping the plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"full": "black", "unigist": "tab:red", "streaming": "tab:blue", "snapkv": "tab:green",
              "snapkv_oneshot": "tab:olive"}
    styles = {None: "-", "4": "-", "8": "--"}
    for ax, task in zip(axes[:2], TASKS):
        for key in methods:
            kind, _, r = key.partition("@r")
            ys = [res["acc"].get(key, {}).get(task, {}).get(str(n)) for n in lengths]
            ax.plot(lengths, [np.nan if y is None else 100 * y for y in ys], styles.get(r or None, ":"),
                    color=colors[kind], marker="o", label=method_label(key))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("context length (raw tokens)")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"{task} recall")
        ax.grid(alpha=0.3)
    ax = axes[2]
    for key in methods:
        kind, _, r = key.partition("@r")
        ys = [res["ppl"].get(key, {}).get(str(n)) for n in lengths]
        ax.plot(lengths, [np.nan if y is None else y for y in ys], styles.get(r or None, ":"), color=colors[kind],
                marker="o", label=method_label(key))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (raw tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"text perplexity (last {a.ppl_tokens} tokens)")
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"UniGist vs. same-budget eviction: {res['model']['params'] / 1e6:.0f}M Llama, pretrained from scratch, "
                 f"fine-tuned per method "
                 f"({res['env']['device']}; solid: r=4 budget, dashed: r=8 budget)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(os.path.join(out_dir, "quality.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


MODEL_DIMS = ("layers", "hidden", "heads", "kv_heads", "inter", "vocab")


def resolve_finetune(spec, ratios) -> List[str]:
    """``--finetune`` -> model names (``full``, ``r4``, ...) in canonical order."""
    names = ["full"] + [f"r{r}" for r in ratios]
    if spec is None or "all" in spec:
        return names
    if spec == ["none"]:
        return []
    want = set()
    for x in spec:
        x = x.strip().lower()
        nm = "full" if x == "full" else "r" + x.lstrip("r")
        if nm not in names:
            raise SystemExit(f"--finetune {x!r}: expected 'full', one of the ratios {ratios}, 'all' or 'none'")
        want.add(nm)
    return [nm for nm in names if nm in want]


def fingerprint(model) -> str:
    """Identity of a base model's weights (sha1 of its bf16 state dict): every fine-tuned copy records
    it, and an evaluation refuses to compare copies of different bases."""
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(path, net, **meta):
    """``net``'s weights in bf16 (~15 MB for the default 7.3M-parameter model) plus ``meta``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": {k: v.detach().to("cpu", torch.bfloat16) for k, v in net.state_dict().items()},
                **meta}, path)
    log(f"saved {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def model_dims(a, model) -> dict:
    return dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                inter=a.inter, vocab=a.vocab, params=n_params(model))


def load_finetuned(a, path, device):
    """A copy saved by ``--save-finetuned``: ``(model, gist config or None, saved dict)``; checks that the
    model and layout flags of this call match the saved ones."""
    saved = torch.load(path, map_location="cpu")
    for k in MODEL_DIMS:
        if saved["model"][k] != getattr(a, k):
            raise SystemExit(f"{path}: saved with --{k.replace('_', '-')} {saved['model'][k]}, this call has {getattr(a, k)}")
    model, cfg = make_model(a, device), None
    if saved["ratio"] is not None:
        if (saved["window"], saved["sink"]) != (a.window, a.sink):
            raise SystemExit(f"{path}: saved with --window {saved['window']} --sink {saved['sink']}, this call has "
                             f"--window {a.window} --sink {a.sink}")
        ug = need_unigist(a)
        cfg = ug.patch_model(model, None, ug.GistConfig(ratio=saved["ratio"], window=a.window, num_sink=a.sink))
    model.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
    model.eval()
    return model, cfg, saved


def reproducing_command(argv) -> str:
    """This call's command line, minus the flags that change no number (--out, --wait-for, --workers)."""
    keep, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--out", "--wait-for", "--workers"):
            skip = True
            continue
        keep.append(x)
    return "python " + " ".join(shlex.quote(x) for x in ["benchmarks/quality/run_quality.py"] + keep)


def main(argv=None):
    a = parse_args(argv)
    t_start = time.perf_counter()
    cmd = reproducing_command(list(sys.argv[1:] if argv is None else argv))
    names = ["full"] + [f"r{r}" for r in a.ratios]
    to_tune = [] if a.eval_only else resolve_finetune(a.finetune, a.ratios)
    vocab = Vocab(a.vocab, a.symbols)
    lang = Language(vocab)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    res = dict(lengths=a.lengths, grammar_seed=1234, training=[], acc=defaultdict(lambda: defaultdict(dict)),
               ppl=defaultdict(dict), budgets={}, errors=[], methods=[], args=vars(a))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    res["env"] = dict(device=dev_name, torch=torch.__version__, transformers=transformers.__version__)

    # ---- copies fine-tuned in earlier calls -------------------------------------------------------
    found = {}
    for d in a.load_finetuned or []:
        for nm in names:
            f = os.path.join(d, nm + ".pt")
            if nm not in to_tune and nm not in found and os.path.exists(f):
                found[nm] = f
    if a.load_finetuned:
        log(f"fine-tuned copies found: {found or 'none'}")
    if a.eval_only:
        missing = [nm for nm in names if nm not in found]
        if missing:
            raise SystemExit(f"--eval-only: no saved copy for {missing} in --load-finetuned {a.load_finetuned} "
                             f"(expected files {', '.join(nm + '.pt' for nm in missing)})")
    workers = a.workers if a.workers is not None else max(0, min(8, (os.cpu_count() or 2) - 2))
    training = bool(to_tune) or (a.base_only and not a.load_base)
    pool = None
    if training:
        pool = mp.get_context("fork").Pool(workers, _worker_init, (a.vocab, a.symbols)) if workers > 0 else None
        if pool is None:
            _worker_init(a.vocab, a.symbols)

    # ---- 1. base model: full attention, from random init (needs no unigist) ---------------------
    base, base_id, base_cmd, base_info = None, None, None, None
    if to_tune or a.base_only or a.save_base:
        base = make_model(a, device)
        res["model"] = model_dims(a, base)
        log(f"device {dev_name}; model: {res['model']['params'] / 1e6:.2f}M parameters")
        if a.load_base:
            saved = torch.load(a.load_base, map_location="cpu")
            base.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
            base_info, base_cmd = saved["info"], saved.get("cmd")
            log(f"loaded the base model from {a.load_base} ({saved['info']['steps']} steps)")
        else:
            log("pretraining the base model (full attention)")
            base_info, base_cmd = train(
                base, a, pool, device, "base (full attention)", steps=a.steps, seconds=a.train_seconds, lr=a.lr,
                curriculum=a.curriculum, seed=a.seed, lang=lang, distance_curriculum=a.distance_curriculum,
                keep_best=a.keep_best in ("base", "all"), stop_at=a.probe_stop), cmd
        base_id = fingerprint(base)
        if a.save_base:
            save_model(a.save_base, base, info=base_info, args=vars(a), cmd=base_cmd, base_id=base_id)
    if a.base_only:
        if pool is not None:
            pool.terminate()
        res["training"].append(base_info)
        return res

    # ---- 2. fine-tuning: copies of the base, with full attention and with unigist per ratio -------
    # Same data (seed + 1), learning rate and curriculum for every copy, so the full-attention model
    # that the eviction baselines run on saw the stream the gist models saw. Budgets differ (fairness
    # note in README.md): the full copy continues the architecture it was pretrained in and is
    # already converged on this data (--ft-steps / --ft-seconds, short); a gist copy must learn a new
    # layout (every position shifts, a token it has never seen), so it gets --ft-gist-steps /
    # --ft-gist-seconds. Training compute is the only thing UniGist gets more of: not data, not KV.
    models, cfgs, infos, cmds = {}, {}, {}, {}

    def finetune(model, name, gist_config=None):
        steps, seconds = (a.ft_steps, a.ft_seconds) if gist_config is None else (a.ft_gist_steps, a.ft_gist_seconds)
        return train(model, a, pool, device, name, steps=steps, seconds=seconds, lr=a.ft_lr,
                     curriculum=a.ft_curriculum, seed=a.seed + 1, gist_config=gist_config, lang=lang,
                     keep_best=a.keep_best == "all")

    for nm in to_tune:
        model, cfg = copy.deepcopy(base), None
        if nm == "full":
            log("fine-tuning the full-attention copy")
            infos[nm] = finetune(model, "full attention (fine-tuned)")
        else:
            ug = need_unigist(a)
            cfg = ug.patch_model(model, None, ug.GistConfig(ratio=int(nm[1:]), window=a.window, num_sink=a.sink))
            log(f"fine-tuning unigist r={cfg.ratio} ({cfg})")
            infos[nm] = finetune(model, f"unigist r={cfg.ratio}", gist_config=cfg)
        models[nm], cfgs[nm], cmds[nm] = model, cfg, cmd
        if a.save_finetuned:
            save_model(os.path.join(a.save_finetuned, nm + ".pt"), model, info=infos[nm], base_info=base_info,
                       base_cmd=base_cmd, base_id=base_id, cmd=cmd, ratio=None if cfg is None else cfg.ratio,
                       window=a.window, sink=a.sink, model=res["model"], args=vars(a))
    del base
    if pool is not None:
        pool.terminate()
    for nm, f in found.items():
        model, cfg, saved = load_finetuned(a, f, device)
        models[nm], cfgs[nm], infos[nm], cmds[nm] = model, cfg, saved["info"], saved.get("cmd")
        log(f"loaded {nm} from {f} ({saved['info']['steps']} steps, base {saved.get('base_id')})")
        if base_id is None:
            base_id, base_info, base_cmd = saved.get("base_id"), saved.get("base_info"), saved.get("base_cmd")
        elif saved.get("base_id") != base_id:
            raise SystemExit(f"{f} was fine-tuned from another base model ({saved.get('base_id')}, this call: "
                             f"{base_id}): its numbers would not be comparable")
        res.setdefault("model", saved["model"])
    res["base_id"] = base_id
    res["training"] = [base_info] + [infos[nm] for nm in names if nm in infos]
    res["training"] = [t for t in res["training"] if t]
    res["commands"] = list(dict.fromkeys(c for c in [base_cmd] + [cmds.get(nm) for nm in names] + [cmd] if c))
    missing = [nm for nm in names if nm not in models]
    if a.no_eval or missing:
        log("no evaluation: " + ("--no-eval" if a.no_eval else f"missing {missing} (fine-tune them here, or "
                                 f"load them with --load-finetuned)"))
        res["wall_seconds"] = time.perf_counter() - t_start
        return res
    ug = need_unigist(a)
    res["env"]["cuda_kernels"] = bool(ug.has_cuda_kernels())
    if device.type == "cuda":
        res["env"]["gist_train_attention"] = ("unigist CUDA kernel (gist_attention_fwd/bwd)" if ug.has_cuda_kernels()
                                              else "dense UniGist mask in SDPA (reference path; no CUDA kernels)")
    else:
        res["env"]["gist_train_attention"] = "unigist CPU kernel"
    full = models["full"]
    gist_models = {r: models[f"r{r}"] for r in a.ratios}
    gist_cfgs = {r: cfgs[f"r{r}"] for r in a.ratios}
    log(f"evaluating: {a.n_eval} samples per task and length, lengths {a.lengths}")
    t_eval = time.perf_counter()

    # ---- 3. evaluation ---------------------------------------------------------------------------
    from baselines import FullPolicy, SnapKVPolicy, StreamingPolicy, budget_for
    from unigist.layout import interleaved_length

    if device.type == "cuda":
        for mdl in [full, *gist_models.values()]:
            mdl.to(torch.bfloat16)
    for r in a.ratios:
        res["budgets"][str(r)] = {str(n): budget_for(gist_cfgs[r], interleaved_length(n, r)) for n in a.lengths}
    methods = ["full"] + [method_key("unigist", r) for r in a.ratios]
    for kind in ("streaming", "snapkv", "snapkv_oneshot"):
        methods += [method_key(kind, r) for r in a.ratios]
    res["methods"] = methods

    def policy_for(kind, n, r):
        b = res["budgets"][str(r)][str(n)]
        if b >= n:
            return None
        if kind == "streaming":
            return StreamingPolicy(b, sink=a.sink)
        if kind == "snapkv":
            return SnapKVPolicy(b, window=max(4, min(32, b // 4)), chunked=True)
        return SnapKVPolicy(b, window=max(4, min(32, b // 4)), chunked=False)

    def guard(what, fn):
        try:
            return fn()
        except Exception as exc:  # keep going: one broken method must not lose the rest
            import traceback

            traceback.print_exc()
            res["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    res["eval_seconds_per_length"] = {}
    for n in sorted(a.lengths, reverse=True):  # longest first: the most telling numbers survive a time-out
        t_len = time.perf_counter()
        sets = {task: eval_set(lang, task, n, a.n_eval, a.eval_seed) for task in TASKS}
        docs = text_set(lang, n, a.n_text, a.eval_seed)
        for task, samples in sets.items():
            out = guard(f"full/{task}/{n}", lambda: eval_engine(full, FullPolicy(), samples, a, device))
            if out:
                res["acc"]["full"][task][str(n)] = out["acc"]
            for r in a.ratios:
                out = guard(f"unigist r={r}/{task}/{n}", lambda: eval_unigist(gist_models[r], samples, a, device, gist_cfgs[r]))
                if out:
                    res["acc"][method_key("unigist", r)][task][str(n)] = out["acc"]
                for kind in ("streaming", "snapkv", "snapkv_oneshot"):
                    pol = policy_for(kind, n, r)
                    out = guard(f"{kind} r={r}/{task}/{n}",
                                lambda: eval_engine(full, pol or FullPolicy(), samples, a, device))
                    if out:
                        res["acc"][method_key(kind, r)][task][str(n)] = out["acc"]
        out = guard(f"full/ppl/{n}", lambda: ppl_engine(full, FullPolicy(), docs, a, device))
        if out:
            res["ppl"]["full"][str(n)] = out["ppl"]
        for r in a.ratios:
            out = guard(f"unigist r={r}/ppl/{n}", lambda: ppl_unigist(gist_models[r], docs, a, device, gist_cfgs[r]))
            if out:
                res["ppl"][method_key("unigist", r)][str(n)] = out["ppl"]
            for kind in ("streaming", "snapkv"):  # one-shot SnapKV compresses after the scored tokens: = full
                pol = policy_for(kind, n, r)
                out = guard(f"{kind} r={r}/ppl/{n}", lambda: ppl_engine(full, pol or FullPolicy(), docs, a, device))
                if out:
                    res["ppl"][method_key(kind, r)][str(n)] = out["ppl"]
        summary = " ".join(f"{k}:{100 * res['acc'][k]['kv'].get(str(n), float('nan')):.0f}/"
                           f"{100 * res['acc'][k]['passkey'].get(str(n), float('nan')):.0f}" for k in methods)
        log(f"len {n}: kv/passkey acc {summary}")
        log(f"len {n}: ppl " + " ".join(f"{k}:{res['ppl'][k].get(str(n), float('nan')):.3f}" for k in methods))
        res["eval_seconds_per_length"][str(n)] = round(time.perf_counter() - t_len, 2)
        log(f"len {n}: evaluated in {time.perf_counter() - t_len:.1f}s "
            f"({(time.perf_counter() - t_len) / a.n_eval:.3f}s per sample index)")
        res["wall_seconds"] = time.perf_counter() - t_start
        write_report(res, a, a.out)  # partial results survive a time-out

    # cross-check of the library's compressed generation against an independent engine
    res["crosscheck"] = {}
    n = a.lengths[-1]
    samples = eval_set(lang, "passkey", n, min(8, a.n_eval), a.eval_seed + 1)
    for r in a.ratios:
        out = guard(f"crosscheck r={r}", lambda: crosscheck_unigist(gist_models[r], samples, a, device, gist_cfgs[r]))
        if out:
            res["crosscheck"][str(r)] = out
    res["env"]["gist_eval_path"] = {str(r): GIST_EVAL_PATH.get(r, "unigist.generate") for r in a.ratios}
    res["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
    res["wall_seconds"] = time.perf_counter() - t_start
    log(f"evaluation took {res['eval_seconds']:.0f}s ({res['eval_seconds'] / a.n_eval:.3f}s per sample index: "
        f"every length, task and method)")
    write_report(res, a, a.out)
    log(f"done in {res['wall_seconds']:.0f}s; wrote {a.out}/quality.md, quality.png, quality.json")
    return res


if __name__ == "__main__":
    main()
