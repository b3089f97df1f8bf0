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
pipeline in a minute or two on a CPU with a tiny model (a smoke run: the
numbers mean nothing). The defaults are sized for one H100, ~11 minutes
(``--base-only --save-base`` / ``--load-base`` split it in two runs).
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

import unigist  # noqa: E402

# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

PRESETS = {
    # 7.3M parameters (incl. 0.8M tied embeddings); one H100, bf16 autocast. Pretraining ~3.5 minutes
    # (recall emerges at short lengths first, then the curriculum stretches it to 4096), fine-tuning
    # ~1 minute for full attention and ~2 minutes per ratio, evaluation ~1.5 minutes.
    "default": dict(
        vocab=2048, symbols=512, hidden=384, layers=4, heads=6, kv_heads=3, inter=1024,
        train_len=4096, batch=8, steps=7000, lr=2e-3, train_seconds=210.0,
        curriculum="256:0.45,512:0.15,1024:0.15,2048:0.1,4096:0.15", mix="1,3,2,2",
        ft_steps=1500, ft_seconds=140.0, ft_lr=1e-3, ft_curriculum="2048:0.4,4096:0.6", answer_weight=5.0,
        lengths=[512, 1024, 2048, 4096], n_eval=48, n_text=8, ppl_tokens=512, chunk=512,
        window=256, sink=16, eval_batch=24,
    ),
    # a small model on a CPU (2 cores: ~20 minutes), contexts 64-256
    "small": dict(
        vocab=512, symbols=96, hidden=256, layers=2, heads=4, kv_heads=4, inter=512,
        train_len=256, batch=8, steps=2000, lr=3e-3, train_seconds=480.0,
        curriculum="64:0.5,128:0.25,256:0.25", mix="0,3,2,2",
        ft_steps=400, ft_seconds=200.0, ft_lr=1e-3, ft_curriculum="", answer_weight=5.0,
        lengths=[64, 128, 256], n_eval=32, n_text=8, ppl_tokens=64, chunk=32,
        window=32, sink=4, eval_batch=32,
    ),
    # seconds on a CPU; numbers meaningless, the pipeline is exercised end to end.
    "tiny": dict(
        vocab=512, symbols=96, hidden=128, layers=2, heads=2, kv_heads=1, inter=256,
        train_len=256, batch=8, steps=40, lr=3e-3, train_seconds=20.0,
        curriculum="128:0.5,256:0.5", mix="1,2,2",
        ft_steps=20, ft_seconds=15.0, ft_lr=1e-3, ft_curriculum="", answer_weight=5.0,
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
    p.add_argument("--probe-every", type=int, default=500, help="held-out recall probe every N training steps (0: off)")
    p.add_argument("--probe-len", type=int, default=1024, help="context length of the probe (at most the training length)")
    p.add_argument("--probe-samples", type=int, default=32, help="probe samples per task")
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
    seed, step, batch, length, mix = args
    rng = np.random.default_rng([seed, 7, step])
    return np.asarray([_LANG.train_sequence(rng, length, mix) for _ in range(batch)], dtype=np.int64)


def parse_curriculum(spec: str, batch: int, length: int, steps: int):
    """``"512:0.4,1024:0.6"`` -> per-step (batch, length) with ``batch * length`` tokens per step
    (the last phase runs at ``--train-len``; an empty spec means ``--train-len`` throughout)."""
    phases = []
    for part in filter(None, (spec or "").split(",")):
        n, frac = part.split(":")
        phases.append((int(n), float(frac)))
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


class BatchStream:
    """Deterministic training batches (batch ``i`` depends on (seed, i) only), generated ahead in a pool."""

    def __init__(self, pool, seed, schedule, mix, ahead=6):
        self.pool, self.seed, self.schedule, self.mix, self.ahead = pool, seed, schedule, mix, ahead
        self.pending = []
        self.next_step = 0

    def _submit(self, at_step):
        b, n = self.schedule(at_step)
        args = (self.seed, self.next_step, b, n, self.mix)
        if self.pool is None:
            self.pending.append(_make_batch(args))
        else:
            self.pending.append(self.pool.apply_async(_make_batch, (args,)))
        self.next_step += 1

    def get(self, at_step):
        """Next batch; new work is shaped by the curriculum at ``at_step`` (>= the batch index when
        training runs behind its time budget, so the last phase is always reached)."""
        while len(self.pending) < self.ahead:
            self._submit(at_step + len(self.pending))
        item = self.pending.pop(0)
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
    from unigist.layout import raw_positions

    length, n_ans = len(samples[0].prompt), len(samples[0].answer)
    raw = torch.tensor([s.prompt + s.answer[:-1] for s in samples])
    # the logits that predict raw token j sit one position before it (a gist's, after a full group)
    if gist_config is None:
        batch, pos = {"input_ids": raw}, torch.arange(raw.shape[1] + 1)
    else:
        batch = unigist.gist_batch(raw, gist_config)
        batch.pop("labels")
        pos = raw_positions(raw.shape[1] + 1, gist_config)
    pos = pos[length : length + n_ans] - 1
    autocast = bf16_autocast(device)
    with autocast:
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
    return logits[:, pos.to(device)].argmax(-1).cpu()


def probe_recall(model, lang, length: int, a, device, gist_config=None) -> dict:
    """Held-out recall probe: exact match of ``answer_predictions`` on ``--probe-samples`` evaluation
    samples per task of ``length`` tokens. Unlike the training answer accuracy, it asks pairs never
    asked before at evaluation distances: the number the evaluation will report."""
    was_training = model.training
    model.eval()
    out = {}
    for task in TASKS:
        samples = eval_set(lang, task, length, a.probe_samples, a.eval_seed + 17)
        pred = answer_predictions(model, samples, device, gist_config)
        out[task] = float((pred == torch.tensor([s.answer for s in samples])).all(dim=1).float().mean())
    model.train(was_training)
    return out


def train(model, a, pool, device, name: str, *, steps: int, seconds: float, lr: float, curriculum: str,
          seed: int, gist_config=None, lang=None) -> dict:
    """Train on the shared stream (seeded by ``seed``): raw batches for full attention, the
    ``unigist.gist_batch`` (GistCollator) layout for gist models. The loss weights answer tokens by
    ``--answer-weight``; their greedy accuracy is logged, and every ``--probe-every`` steps the
    held-out final-query probe (``probe_recall``) at the current length (at most ``--probe-len``)."""
    from data import answer_mask

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    schedule = parse_curriculum(curriculum, a.batch, a.train_len, steps)
    stream = BatchStream(pool, seed, schedule, tuple(float(x) for x in a.mix.split(",")))
    autocast = bf16_autocast(device)
    warm = max(10, steps // 30)
    model.train()
    curve, t0, step, tokens_seen, phase_log = [], time.perf_counter(), 0, 0, {}
    run_loss, run_hits, run_ans = [], 0, 0
    probes = []

    def probe(at_step, train_len):
        n_probe = min(train_len, a.probe_len)
        pr = probe_recall(model, lang, n_probe, a, device, gist_config)
        probes.append((at_step, n_probe, round(pr["kv"], 4), round(pr["passkey"], 4)))
        log(f"  {name} step {at_step} held-out recall @ {n_probe} tokens: kv {100 * pr['kv']:.0f}% "
            f"passkey {100 * pr['passkey']:.0f}%")

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
        if lang is not None and a.probe_every > 0 and step % a.probe_every == a.probe_every - 1:
            probe(step, raw.shape[1])
        step += 1
    if lang is not None and a.probe_every > 0 and step > 0 and (not probes or probes[-1][0] != step - 1):
        probe(step - 1, raw.shape[1])
    sync()
    dt = time.perf_counter() - t0
    info = dict(name=name, steps=step, seconds=round(dt, 1), raw_tokens=int(tokens_seen),
                final_loss=curve[-1][1] if curve else float("nan"),
                final_answer_acc=curve[-1][2] if curve else float("nan"),
                curve=curve, probes=probes, steps_per_length=phase_log)
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


def write_report(res: dict, a, out_dir: str, cmd: str) -> None:
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
    note = (" (run in two calls here, to fit a 10-minute device limit: the same command with `--base-only "
            "--save-base base.pt`, then with `--load-base base.pt`)") if a.load_base else ""
    L.append(f"- Command: `{cmd}`{note}")
    L.append(f"- Seeds: model init + training data `--seed {a.seed}`, evaluation data `--eval-seed {a.eval_seed}`; "
             f"grammar seed {res['grammar_seed']} (fixed). Total wall time {res.get('wall_seconds', 0):.0f} s.")
    m = res["model"]
    L.append(f"- Model: Llama ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} KV heads, "
             f"head dim {m['head_dim']}, MLP {m['inter']}, vocab {m['vocab']} (+1 gist), tied embeddings): "
             f"{m['params'] / 1e6:.1f}M parameters, random init.")
    L.append(f"- Training, stage 1 (pretraining one base model with full attention from random init): text/kv/"
             f"passkey/copy mixed {a.mix}; {a.steps} steps of {a.batch * a.train_len} raw tokens, length curriculum "
             f"`{a.curriculum}` (length:fraction of steps) ending at {a.train_len}; AdamW lr {a.lr}, warmup + cosine, "
             f"bf16 autocast on GPU, loss weight {a.answer_weight} on answer tokens; capped at {a.train_seconds:.0f} s "
             f"(past the cap the curriculum moves on by time and training stops).")
    L.append(f"- Training, stage 2 (fine-tuning copies of the base on the same stream, seed + 1, same steps for every "
             f"copy): full attention, and unigist per ratio (`unigist.patch_model` + `unigist.gist_batch` layout, "
             f"chunk-free through the gist kernel); {a.ft_steps} steps, lr {a.ft_lr}, curriculum "
             f"`{a.ft_curriculum or a.train_len}`, capped at {a.ft_seconds:.0f} s. Answer accuracy is the greedy "
             f"teacher-forced accuracy on the answer tokens of the last training batches; held-out final-query "
             f"recall is `probe_recall` (fresh final queries at evaluation distances, teacher-forced) at the end:")
    for t in res["training"]:
        acc = t.get("final_answer_acc")
        acc = "" if acc is None else f", answer accuracy {100 * acc:.1f}%"
        if t.get("probes"):
            at, n, kv, pk = t["probes"][-1]
            acc += f", held-out final-query recall at {n} tokens kv {100 * kv:.0f}% / passkey {100 * pk:.0f}%"
        L.append(f"  - {t['name']}: {t['steps']} steps, {t['raw_tokens'] / 1e6:.1f}M raw tokens, {t['seconds']} s, "
                 f"final train loss {t['final_loss']}{acc} (steps per length: {t['steps_per_length']})")
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


def main(argv=None):
    a = parse_args(argv)
    t_start = time.perf_counter()
    # the reproducing command: every flag that changes the numbers (not --out / --wait-for / --workers,
    # nor the base checkpoint's path: saving and reloading it changes nothing)
    given, keep, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for x in given:
        if skip:
            skip = False
            continue
        if x in ("--out", "--wait-for", "--workers", "--save-base", "--load-base"):
            skip = True
            continue
        keep.append(x)
    cmd = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/quality/run_quality.py"] + keep)
    vocab = Vocab(a.vocab, a.symbols)
    lang = Language(vocab)
    workers = a.workers if a.workers is not None else max(0, min(8, (os.cpu_count() or 2) - 2))
    pool = mp.get_context("fork").Pool(workers, _worker_init, (a.vocab, a.symbols)) if workers > 0 else None
    if pool is None:
        _worker_init(a.vocab, a.symbols)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    res = dict(lengths=a.lengths, grammar_seed=1234, training=[], acc=defaultdict(lambda: defaultdict(dict)),
               ppl=defaultdict(dict), budgets={}, errors=[], methods=[], args=vars(a))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    res["env"] = dict(device=dev_name, torch=torch.__version__, transformers=transformers.__version__)

    # ---- 1. base model: full attention, from random init (needs no unigist) ---------------------
    base = make_model(a, device)
    m = dict(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.hidden // a.heads,
             inter=a.inter, vocab=a.vocab, params=n_params(base))
    res["model"] = m
    log(f"device {dev_name}; model: {m['params'] / 1e6:.2f}M parameters")
    if a.load_base:
        saved = torch.load(a.load_base, map_location="cpu")
        base.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
        res["training"].append(saved["info"])
        log(f"loaded the base model from {a.load_base} ({saved['info']['steps']} steps)")
    else:
        log("pretraining the base model (full attention)")
        res["training"].append(train(base, a, pool, device, "base (full attention)", steps=a.steps,
                                     seconds=a.train_seconds, lr=a.lr, curriculum=a.curriculum, seed=a.seed,
                                     lang=lang))
    if a.save_base:
        os.makedirs(os.path.dirname(os.path.abspath(a.save_base)), exist_ok=True)
        torch.save({"state_dict": {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()},
                    "info": res["training"][0], "args": vars(a)}, a.save_base)
        log(f"saved the base model to {a.save_base}")
    if a.base_only:
        if pool is not None:
            pool.terminate()
        return res

    # ---- 2. fine-tuning: copies of the base, with full attention and with unigist per ratio -------
    # Same steps, data (seed + 1) and learning rate for every copy, so the full-attention model that
    # the eviction baselines run on had exactly the training the gist models had.
    def finetune(model, name, gist_config=None):
        return train(model, a, pool, device, name, steps=a.ft_steps, seconds=a.ft_seconds, lr=a.ft_lr,
                     curriculum=a.ft_curriculum, seed=a.seed + 1, gist_config=gist_config, lang=lang)

    full = copy.deepcopy(base)
    log("fine-tuning the full-attention copy")
    res["training"].append(finetune(full, "full attention (fine-tuned)"))
    if a.wait_for:
        t = time.perf_counter()
        while not os.path.exists(a.wait_for):
            time.sleep(1)
        log(f"waited {time.perf_counter() - t:.0f}s for {a.wait_for}")
    from unigist import GistConfig

    res["env"]["cuda_kernels"] = bool(unigist.has_cuda_kernels())
    if device.type == "cuda":
        res["env"]["gist_train_attention"] = ("unigist CUDA kernel (gist_attention_fwd/bwd)" if unigist.has_cuda_kernels()
                                              else "dense UniGist mask in SDPA (reference path; no CUDA kernels)")
    else:
        res["env"]["gist_train_attention"] = "unigist CPU kernel"
    gist_models, gist_cfgs = {}, {}
    for r in a.ratios:
        model = copy.deepcopy(base)
        cfg = unigist.patch_model(model, None, GistConfig(ratio=r, window=a.window, num_sink=a.sink))
        log(f"fine-tuning unigist r={r} ({cfg})")
        res["training"].append(finetune(model, f"unigist r={r}", gist_config=cfg))
        gist_models[r], gist_cfgs[r] = model, cfg
    del base
    if pool is not None:
        pool.terminate()

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

    for n in sorted(a.lengths, reverse=True):  # longest first: the most telling numbers survive a time-out
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
        res["wall_seconds"] = time.perf_counter() - t_start
        write_report(res, a, a.out, cmd)  # partial results survive a time-out

    # cross-check of the library's compressed generation against an independent engine
    res["crosscheck"] = {}
    n = a.lengths[-1]
    samples = eval_set(lang, "passkey", n, min(8, a.n_eval), a.eval_seed + 1)
    for r in a.ratios:
        out = guard(f"crosscheck r={r}", lambda: crosscheck_unigist(gist_models[r], samples, a, device, gist_cfgs[r]))
        if out:
            res["crosscheck"][str(r)] = out
    res["env"]["gist_eval_path"] = {str(r): GIST_EVAL_PATH.get(r, "unigist.generate") for r in a.ratios}
    res["wall_seconds"] = time.perf_counter() - t_start
    write_report(res, a, a.out, cmd)
    log(f"done in {res['wall_seconds']:.0f}s; wrote {a.out}/quality.md, quality.png, quality.json")
    return res


if __name__ == "__main__":
    main()
