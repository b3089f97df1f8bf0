"""The CPU quality study in one command.

    python -m benchmarks.quality_cpu.run            # full study (~40 min on 2 cores)
    python -m benchmarks.quality_cpu.run --quick    # CI-sized smoke run (seconds)

Trains every variant of :mod:`.models` from scratch for every seed (same token stream, steps
and learning rate within a seed), evaluates each under its inference methods
(:mod:`.evaluate`), and writes ``results.json``, ``quality_cpu.md`` and ``quality_cpu.png``
into ``--out``. Jobs run in ``--workers`` processes of one thread each; a job whose result
file exists in ``--out`` is not run again (resume after an interruption).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List

VARIANTS = ("full", "window", "gist_r4", "gist_r4_prev", "gist_r8", "gist_r8_prev")
DEFAULT_VARIANTS = ("full", "window", "gist_r4", "gist_r4_prev", "gist_r8")
# inference methods per trained variant
METHODS = {"full": ("full", "streaming", "snapkv")}


def _configs(args):
    from .models import ModelConfig, TrainConfig
    from .tasks import TaskConfig

    if args.quick:
        task = TaskConfig(window=4, base_len=44, num_pairs=4, passkey_len=2)
        mcfg = ModelConfig(hidden=32, layers=2, heads=2, mlp=64)
        tcfg = TrainConfig(steps=args.steps or 30, batch=8, lr=args.lr or 3e-3, warmup=5)
    else:
        task = TaskConfig()
        mcfg = ModelConfig()
        tcfg = TrainConfig(steps=args.steps or 1500, lr=args.lr or 3e-3)
    return task, mcfg, tcfg


def run_job(job: Dict) -> Dict:
    """Train one variant for one seed and evaluate it; writes ``job['path']`` (JSON)."""
    import torch

    torch.set_num_threads(1)
    from . import evaluate, models, tasks

    task = tasks.TaskConfig(**{**job["task"], "vocab": tasks.Vocab(**job["task"]["vocab"])})
    mcfg = models.ModelConfig(**job["model"])
    tcfg = models.TrainConfig(**job["train"])
    seed, variant = job["seed"], job["variant"]
    t0 = time.time()
    stream = tasks.train_stream(task, tcfg.steps, tcfg.batch, seed=1000 + seed)
    model, gcfg = models.build_model(variant, task, mcfg, seed)
    losses = models.train(model, gcfg, stream, tcfg)
    t1 = time.time()
    samples = tasks.samples(task, job["n_eval"], seed=2000 + seed)
    result = {"seed": seed, "variant": variant, "train_seconds": t1 - t0, "losses": losses,
              "gist_config": None if gcfg is None else gcfg.to_dict(),
              "params": sum(p.numel() for p in model.parameters()), "methods": {}}
    for method in METHODS.get(variant, (variant,)):
        result["methods"][method] = evaluate.evaluate_method(
            model, method, gcfg, samples, task, mcfg, task.vocab.size, chunk_size=job["chunk"])
    result["eval_seconds"] = time.time() - t1
    tmp = job["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, job["path"])
    print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {variant}: train {t1 - t0:.0f}s "
          f"loss {losses[0]:.2f}->{sum(losses[-20:]) / len(losses[-20:]):.2f}, eval {time.time() - t1:.0f}s", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run: tiny task, model and steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n-eval", type=int, default=None, help="evaluation samples per seed (default 200; quick 16)")
    p.add_argument("--chunk", type=int, default=8, help="prefill chunk, raw tokens")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="per-job results (default .qrun/quality_cpu, quick: .qrun/quality_cpu_quick)")
    p.add_argument("--report-dir", default=None,
                   help="write quality_cpu.md/.png/.json here (default benchmarks/results; quick: --out)")
    p.add_argument("--report-name", default="quality_cpu", help="file stem of the report (.md/.png/.json)")
    args = p.parse_args(argv)

    task, mcfg, tcfg = _configs(args)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    n_eval = args.n_eval or (16 if args.quick else 200)
    if args.out is None:
        args.out = ".qrun/quality_cpu_quick" if args.quick else ".qrun/quality_cpu"
    if args.report_dir is None:
        args.report_dir = args.out if args.quick else "benchmarks/results"
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for seed in seeds:
        for v in args.variants:
            path = os.path.join(args.out, f"seed{seed}_{v}.json")
            jobs.append({"seed": seed, "variant": v, "path": path, "task": dataclasses.asdict(task),
                         "model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
                         "n_eval": n_eval, "chunk": args.chunk})
    todo = [j for j in jobs if not os.path.exists(j["path"])]
    t0 = time.time()
    print(f"{len(jobs)} jobs ({len(jobs) - len(todo)} done already), {args.workers} workers", flush=True)
    if args.workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for j in todo:
                run_job(j)
        finally:
            torch.set_num_threads(threads)  # run_job takes one thread; give the caller its own back
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as ex:
            for f in [ex.submit(run_job, j) for j in todo]:
                f.result()
    wall = time.time() - t0
    wall_file = os.path.join(args.out, "wall_seconds.json")
    if todo or not os.path.exists(wall_file):
        with open(wall_file, "w") as f:  # a later call that finds every job done reports this run's time
            json.dump({"wall_seconds": wall, "jobs_run": len(todo)}, f)
    else:
        with open(wall_file) as f:
            wall = json.load(f)["wall_seconds"]

    from . import report

    results = []
    for j in jobs:
        with open(j["path"]) as f:
            results.append(json.load(f))
    meta = _meta(args, argv, task, mcfg, tcfg, seeds, n_eval, wall)
    report.write(results, meta, args.report_dir, args.report_name)
    print(f"done in {wall:.0f}s -> {args.report_dir}", flush=True)
    return 0


def _meta(args, argv, task, mcfg, tcfg, seeds, n_eval, wall) -> Dict:
    import torch
    import transformers

    from .models import gist_config, nominal_prompt_len, window_size

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "command": "python -m benchmarks.quality_cpu.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "seeds": seeds, "n_eval": n_eval, "chunk": args.chunk, "workers": args.workers,
        "wall_seconds": wall, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
        "task": dataclasses.asdict(task), "model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
        "nominal_prompt_len": nominal_prompt_len(task),
        "gist_r4": gist_config(task, mcfg, 4).to_dict(), "gist_r8": gist_config(task, mcfg, 8).to_dict(),
        "window_control": {"window": window_size(task, mcfg), "num_sink": mcfg.num_sink},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    sys.exit(main())
