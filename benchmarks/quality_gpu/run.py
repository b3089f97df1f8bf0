"""One call of the GPU quality study: train some variants of one seed, evaluate them.

    # call A: size the training from a throughput probe, train full attention (SDPA) and
    # evaluate it as is / under StreamingLLM / SnapKV; then fine-tune a copy with UniGist r=4
    python -m benchmarks.quality_gpu.run --variants full ft_gist_r4_prev --train-seconds 115 --out OUT_A
    # call B: the from-scratch masks, with call A's steps (OUT_A/plan.json "steps")
    python -m benchmarks.quality_gpu.run --variants window gist_r4_prev gist_r8_prev --steps N --out OUT_B
    python -m benchmarks.quality_gpu.run --quick ...      # tiny sizes, CPU, seconds

Training, masks, tasks and evaluation are :mod:`benchmarks.quality_cpu`'s (same variants,
same code) at the sizes of :mod:`.config`, on CUDA with bf16 autocast: gist variants through
``unigist.patch_model`` (the library's CUDA kernel), full attention through SDPA. Every
from-scratch variant of a seed gets the same init, token stream, steps and learning rate;
``ft_<gist variant>`` starts from the trained ``full`` model of the seed and trains the same
number of steps on the same stream. The stream follows ``config.CURRICULUM`` (the first steps on
shorter sequences, same tokens per step; ``--no-curriculum``: full length throughout).

Writes into ``--out``: ``plan.json`` (steps, probe throughput) and one
``seed{S}_{variant}.json`` per job (quality_cpu's result format plus ``steps`` and
``throughput``), rewritten after training and after each evaluation method, so a call cut
short keeps what it finished. Checkpoints and finished results also go to ``--ckpt-dir``
(default ``/tmp/qgpu``) and are reused by a later call with the same configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.quality_cpu import evaluate, models, tasks
from benchmarks.quality_cpu.run import METHODS

from . import config

FROM_SCRATCH = ("full", "window", "gist_r4", "gist_r4_prev", "gist_r8", "gist_r8_prev")
VARIANTS = FROM_SCRATCH + tuple(f"ft_{v}" for v in FROM_SCRATCH if v.startswith("gist_"))
PROBE_DEFAULT = ("full", "window", "gist_r4_prev", "gist_r8_prev")


def attention_path(variant: str, device: torch.device) -> str:
    if variant == "full":
        return "SDPA (causal)"
    if variant == "window":
        return "SDPA (4-D boolean window mask)"
    if device.type == "cuda":
        return "unigist gist_attention (CUDA kernel)"
    return "unigist gist_attention (CPU op)"


def base_variant(variant: str) -> str:
    """The mask a variant trains with: ``ft_gist_r4_prev`` -> ``gist_r4_prev``."""
    return variant[3:] if variant.startswith("ft_") else variant


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_train(model, gcfg, stream, tcfg, device, autocast_dtype, skip: int = 3) -> Dict:
    """:func:`quality_cpu.models.train` with a timestamp per step; throughput over steps after ``skip``."""
    stamps: List[float] = []
    _sync(device)
    t0 = time.perf_counter()
    losses = models.train(model, gcfg, stream, tcfg, log=lambda step, loss: stamps.append(time.perf_counter()),
                          log_every=1, autocast_dtype=autocast_dtype)
    _sync(device)
    total = time.perf_counter() - t0
    raw = [sum(int(e["input_ids"].shape[0]) for e in batch) for batch in stream[: len(losses)]]
    first = min(skip, len(losses) - 1)
    span = stamps[-1] - (stamps[first - 1] if first > 0 else t0)
    tok = sum(raw[first:])
    return {"losses": losses, "train_seconds": total,
            "throughput": {"raw_tokens_per_s": tok / span if span > 0 else float("nan"),
                           "steps_timed": len(losses) - first, "raw_tokens": sum(raw)}}


def probe(variants, task, mcfg, tcfg, device, autocast_dtype, warmup: int = 3, timed: int = 5) -> Dict[str, float]:
    """Raw training tokens/s of each variant over ``timed`` steps after ``warmup`` (throwaway models)."""
    stream = tasks.train_stream(config.train_task(task), warmup + timed, tcfg.batch, seed=999)
    pcfg = dataclasses.replace(tcfg, steps=warmup + timed)
    out = {}
    for v in variants:
        model, gcfg = models.build_model(v, task, mcfg, seed=0)
        model.to(device)
        out[v] = timed_train(model, gcfg, stream, pcfg, device, autocast_dtype, skip=warmup)["throughput"][
            "raw_tokens_per_s"]
        print(f"probe {v}: {out[v]:,.0f} raw tokens/s ({attention_path(v, device)})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def config_key(task, mcfg, tcfg, device: torch.device, curriculum=None) -> str:
    key = [dataclasses.asdict(task), dataclasses.asdict(mcfg), dataclasses.asdict(tcfg), device.type]
    if curriculum:
        key.append(list(curriculum))
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def save_checkpoint(path: str, model, record: Dict) -> None:
    """fp32 weights + the training record, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "record": record}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model) -> Dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ck["state_dict"])
    return ck["record"]


def build(variant, task, mcfg, seed, device, ckpt_dir: str):
    """The variant's model on ``device``; ``ft_*`` starts from the seed's trained full model."""
    if not variant.startswith("ft_"):
        model, gcfg = models.build_model(variant, task, mcfg, seed)
        return model.to(device), gcfg
    import unigist

    full_ckpt = os.path.join(ckpt_dir, f"seed{seed}_full.pt")
    if not os.path.exists(full_ckpt):
        raise FileNotFoundError(f"{variant} fine-tunes the full model: train 'full' first ({full_ckpt} missing)")
    model, _ = models.build_model("full", task, mcfg, seed)
    load_checkpoint(full_ckpt, model)
    gcfg = unigist.patch_model(model, None, models.variant_config(base_variant(variant), task, mcfg))
    return model.to(device), gcfg


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


def evaluate_round_robin(model, methods, gcfg, samples, task, mcfg, chunk: int, seconds: float,
                         deadline: float) -> Dict[str, List[Dict]]:
    """quality_cpu's :func:`evaluate.evaluate_method`, one sample at a time for every method in
    turn, until the samples, ``seconds`` per method or the ``deadline`` run out (every method
    then has the same samples)."""
    out = {m: [] for m in methods}
    t0 = time.time()
    for i, s in enumerate(samples):
        # the time cap lets the first sample through, so every method has at least one
        if time.time() > deadline or (i and time.time() - t0 > seconds * len(methods)):
            break
        for m in methods:
            out[m] += evaluate.evaluate_method(model, m, gcfg, [s], task, mcfg, task.vocab.size, chunk_size=chunk)
    return {m: r for m, r in out.items() if r}


# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------


def _write(path: str, data: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run_job(variant: str, ctx: Dict) -> Dict:
    task, mcfg, tcfg, seed, device = ctx["task"], ctx["model"], ctx["train"], ctx["seed"], ctx["device"]
    name = f"seed{seed}_{variant}"
    out_path = os.path.join(ctx["out"], name + ".json")
    cached = os.path.join(ctx["ckpt_dir"], name + ".json")
    methods = METHODS.get(variant, (variant,))
    if os.path.exists(cached):
        with open(cached) as f:
            res = json.load(f)
        if set(res["methods"]) == set(methods):
            shutil.copyfile(cached, out_path)
            print(f"{name}: reused {cached}", flush=True)
            return res
    model, gcfg = build(variant, task, mcfg, seed, device, ctx["ckpt_dir"])
    ckpt = os.path.join(ctx["ckpt_dir"], name + ".pt")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if os.path.exists(ckpt):
        record = load_checkpoint(ckpt, model)
        print(f"{name}: loaded {ckpt}", flush=True)
    else:
        record = timed_train(model, gcfg, ctx["stream"](), tcfg, device, ctx["autocast"])
        record["throughput"]["attention"] = attention_path(variant, device)
        record["throughput"]["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                                   if device.type == "cuda" else None)
        save_checkpoint(ckpt, model, record)
    res = {"seed": seed, "variant": variant, "steps": tcfg.steps, **record,
           "gist_config": None if gcfg is None else gcfg.to_dict(),
           "init": "trained full model of the seed" if variant.startswith("ft_") else f"random (seed {seed})",
           "params": sum(p.numel() for p in model.parameters()), "methods": {}, "meta": ctx["meta"]}
    _write(out_path, res)
    losses = res["losses"]
    print(f"{name}: {tcfg.steps} steps in {res['train_seconds']:.0f}s, "
          f"{res['throughput']['raw_tokens_per_s']:,.0f} raw tokens/s, loss {losses[0]:.2f} -> "
          f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    if ctx["eval_dtype"] is not None:
        model.to(ctx["eval_dtype"])
    t1 = time.time()
    res["methods"] = evaluate_round_robin(model, methods, gcfg, ctx["samples"](), task, mcfg, ctx["chunk"],
                                          ctx["eval_seconds"], ctx["deadline"])
    res["eval_seconds"] = time.time() - t1
    res["n_eval"] = {m: len(r) for m, r in res["methods"].items()}
    _write(out_path, res)
    if set(res["methods"]) == set(methods) and len(next(iter(res["methods"].values()))) == ctx["n_eval"]:
        shutil.copyfile(out_path, cached)  # complete: a later call may reuse it
    print(f"{name}: eval {res['eval_seconds']:.0f}s, samples {res['n_eval']}", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def meta(args, argv, task, mcfg, device) -> Dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"command": "python -m benchmarks.quality_gpu.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
            "params_full": config.param_count(task, mcfg)}


def main(argv=None) -> int:
    t_start = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", required=True, choices=VARIANTS,
                   help="trained in this order; ft_* needs full (this call or --ckpt-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps of every variant (default: from --train-seconds)")
    p.add_argument("--train-seconds", type=float, default=115.0,
                   help="without --steps: steps such that each device call (config.CALLS) trains its models "
                        "in this many seconds per model, at the probed throughput")
    p.add_argument("--probe", nargs="*", default=None, choices=FROM_SCRATCH,
                   help=f"variants whose throughput is measured first (default without --steps: {' '.join(PROBE_DEFAULT)})")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ft-lr", type=float, default=None, help="peak learning rate of ft_* (default lr / 2)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluation samples (default 96; quick 6)")
    p.add_argument("--eval-seconds", type=float, default=25.0, help="evaluation time per method at most")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds from start after which no new evaluation sample is begun")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk, raw tokens (default W = 256; quick 8)")
    p.add_argument("--no-curriculum", action="store_true",
                   help="train on full-length sequences from the first step (default: config.CURRICULUM)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-dir", default="/tmp/qgpu")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    task, mcfg, tcfg = config.quick_configs() if args.quick else config.gpu_configs()
    tcfg = dataclasses.replace(tcfg, **{k: v for k, v in (("batch", args.batch), ("lr", args.lr)) if v is not None})
    autocast = torch.bfloat16 if device.type == "cuda" else None
    os.makedirs(args.out, exist_ok=True)

    probed = {}
    probe_variants = args.probe if args.probe is not None else ([] if args.steps else list(PROBE_DEFAULT))
    if probe_variants:
        probed = probe(probe_variants, task, mcfg, tcfg, device, autocast)
    step_tokens = config.tokens_per_step(task, tcfg)
    steps = args.steps or config.steps_for_budget(args.train_seconds, probed, step_tokens)
    tcfg = dataclasses.replace(tcfg, steps=steps)
    ft_tcfg = dataclasses.replace(tcfg, lr=args.ft_lr or tcfg.lr / 2)
    plan = {"steps": steps, "batch": tcfg.batch, "tokens_per_step": step_tokens, "train_seconds_target": args.train_seconds,
            "probe_raw_tokens_per_s": {v: probed[v] for v in probed},
            "probe_attention": {v: attention_path(v, device) for v in probed}, "lr": tcfg.lr, "ft_lr": ft_tcfg.lr}
    print(f"STEPS={steps} (batch {tcfg.batch}, {step_tokens:.0f} raw tokens/step)", flush=True)

    curriculum = config.QUICK_CURRICULUM if args.quick else config.CURRICULUM
    if args.no_curriculum:
        curriculum = None
    plan["curriculum"] = curriculum
    ckpt_dir = os.path.join(args.ckpt_dir, config_key(task, mcfg, tcfg, device, curriculum) + f"_ftlr{ft_tcfg.lr:g}")
    os.makedirs(ckpt_dir, exist_ok=True)
    n_eval = args.n_eval or (6 if args.quick else 96)
    cache: Dict = {}

    def stream():
        if "stream" not in cache:
            t = time.time()
            cache["stream"] = config.curriculum_stream(config.train_task(task), steps, tcfg.batch, seed=1000 + args.seed,
                                                       curriculum=curriculum)
            n_seq = sum(len(b) for b in cache["stream"])
            print(f"training stream: {steps} steps, {n_seq} sequences (curriculum {curriculum}) in "
                  f"{time.time() - t:.0f}s", flush=True)
        return cache["stream"]

    def samples():
        if "samples" not in cache:
            cache["samples"] = tasks.samples(task, n_eval, seed=2000 + args.seed)
        return cache["samples"]

    m = meta(args, argv, task, mcfg, device)
    m.update(task=dataclasses.asdict(task), model=dataclasses.asdict(mcfg), train=dataclasses.asdict(tcfg),
             ft_lr=ft_tcfg.lr, seed=args.seed, curriculum=curriculum,
             curriculum_task=(dataclasses.asdict(config.short_task(task, config.curriculum_stages(curriculum)[0][1]))
                              if curriculum else None), chunk=args.chunk or (8 if args.quick else task.window),
             n_eval=n_eval, train_bin_weights=config.TRAIN_BIN_WEIGHTS,
             nominal_prompt_len=models.nominal_prompt_len(task),
             gist_r4=models.gist_config(task, mcfg, 4).to_dict(), gist_r8=models.gist_config(task, mcfg, 8).to_dict(),
             window_control={"window": models.window_size(task, mcfg), "num_sink": mcfg.num_sink})
    plan["meta"] = m
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1)
    deadline = t_start + args.time_limit if args.time_limit else float("inf")
    ctx = {"task": task, "model": mcfg, "seed": args.seed, "device": device, "autocast": autocast,
           "eval_dtype": torch.bfloat16 if device.type == "cuda" else None, "out": args.out, "ckpt_dir": ckpt_dir,
           "stream": stream, "samples": samples, "chunk": m["chunk"], "eval_seconds": args.eval_seconds,
           "deadline": deadline, "n_eval": n_eval, "meta": m}
    for v in args.variants:
        run_job(v, {**ctx, "train": ft_tcfg if v.startswith("ft_") else tcfg})
    print(f"done in {time.time() - t_start:.0f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
