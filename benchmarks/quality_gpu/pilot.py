"""CPU pilot for the GPU quality study: which task/training design makes *full attention* learn
kv recall and the passkey early? (The first H200 run stayed at chance for every model.)

    python -m benchmarks.quality_gpu.pilot --design base --steps 300 --out .qrun/pilot
    python -m benchmarks.quality_gpu.pilot --design curric_dense --steps 300 --out .qrun/pilot

Trains only the ``full`` variant (quality_cpu's model, loss and training loop) at a CPU scale
that keeps the GPU study's geometry in multiples of W (final sequences of 8 W, W = 64, the
GPU's kv density per token unless a design changes it), and evaluates it with quality_cpu's
``evaluate_method(..., "full", ...)`` on a few held-out samples every ``--eval-every`` steps.
One thread (``torch.set_num_threads(1)``); one JSON per design in ``--out``.

A design is a set of changes to the scaled GPU baseline (:data:`DESIGNS`); the length
curriculum is :func:`benchmarks.quality_gpu.config.curriculum_stream` (the GPU study's code):
the first ``frac`` of the steps use sequences ``1/shrink`` as long, ``shrink`` times as many per
batch (same tokens per step), distances bins scaled down with the length (W / shrink).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Dict

import numpy as np
import torch

from benchmarks.quality_cpu import evaluate, models, tasks
from benchmarks.quality_cpu.tasks import TaskConfig, Vocab

from . import config

W = 64
LEN = 8 * W  # final raw length: the last bin [4W, 8W) just fits, as 4096 = 8 x 256 on the GPU

# the GPU study's design at the pilot's scale (kv density 64 pairs / 4096 tokens -> 8 / 512)
BASE_TASK = TaskConfig(window=W, base_len=LEN, max_offset=7, num_pairs=LEN // 64, passkey_len=1,
                       vocab=Vocab(num_keys=96, num_values=32, num_digits=32, num_filler=64))
BASE_MODEL = models.ModelConfig(hidden=128, layers=4, heads=4, mlp=512, num_sink=2, max_positions=2048)
BASE_TRAIN = models.TrainConfig(steps=0, batch=8, lr=1e-3, warmup=40)

# name -> overrides: task fields, train fields, curriculum (frac, shrink) or None
DESIGNS: Dict[str, Dict] = {
    "base": {},
    "curric_dense": {"task": {"num_pairs": LEN // 16}, "curriculum": (0.3, 8)},
    "curric_dense_lr": {"task": {"num_pairs": LEN // 16}, "curriculum": (0.5, 8),
                        "train": {"lr": 3e-3, "warmup": 20, "answer_weight": 10.0}},
    # the CPU study's kv density (8 pairs per 84 tokens: 38% of the tokens are kv), lr 3e-3, answers x11
    "dense38_lr": {"task": {"num_pairs": LEN // 10}, "train": {"lr": 3e-3, "warmup": 20, "answer_weight": 10.0}},
    "curric_dense38_lr": {"task": {"num_pairs": LEN // 10}, "curriculum": (0.5, 8),
                          "train": {"lr": 3e-3, "warmup": 20, "answer_weight": 10.0}},
    # as few keys as the head dim (32 here, 64 on the GPU): every key once per final-length sequence
    "curric_k32_lr": {"task": {"num_pairs": LEN // 16, "vocab": Vocab(num_keys=32, num_values=32, num_digits=32,
                                                                     num_filler=64)},
                      "curriculum": (0.5, 8), "train": {"lr": 3e-3, "warmup": 20, "answer_weight": 10.0}},
    "curric_k32": {"task": {"num_pairs": LEN // 16, "vocab": Vocab(num_keys=32, num_values=32, num_digits=32,
                                                                  num_filler=64)},
                   "curriculum": (0.5, 8), "train": {"answer_weight": 10.0}},
    # the GPU's kv density (8 pairs / 512 tokens), keys = head dim, curriculum: 1 pair per 64-token sequence
    "curric_k32_sparse": {"task": {"vocab": Vocab(num_keys=32, num_values=32, num_digits=32, num_filler=64)},
                          "curriculum": (0.5, 8), "train": {"answer_weight": 10.0}},
    # a progressive curriculum: 1/8, 1/4, 1/2 of the length (30%, 20%, 20% of the steps), then the full length
    "prog_k32": {"task": {"num_pairs": LEN // 16, "vocab": Vocab(num_keys=32, num_values=32, num_digits=32,
                                                                num_filler=64)},
                 "curriculum": ((0.3, 8), (0.2, 4), (0.2, 2)), "train": {"answer_weight": 10.0}},
    # the GPU's 16x jump at the pilot's scale: 1024-token sequences (W = 128), 16 pairs, keys = head dim;
    # the curriculum starts on 64-token sequences with 1 pair (W' = 8), in one stage or two
    "sparse_1k": {"task": {"window": 2 * W, "base_len": 2 * LEN, "num_pairs": 16,
                           "vocab": Vocab(num_keys=32, num_values=32, num_digits=32, num_filler=64)},
                  "curriculum": (0.5, 16), "train": {"answer_weight": 10.0}},
    "sparse_1k_2stage": {"task": {"window": 2 * W, "base_len": 2 * LEN, "num_pairs": 16,
                                  "vocab": Vocab(num_keys=32, num_values=32, num_digits=32, num_filler=64)},
                         "curriculum": ((0.35, 16), (0.15, 4)), "train": {"answer_weight": 10.0}},
    "sparse_1k_f30": {"task": {"window": 2 * W, "base_len": 2 * LEN, "num_pairs": 16,
                               "vocab": Vocab(num_keys=32, num_values=32, num_digits=32, num_filler=64)},
                      "curriculum": (0.3, 16), "train": {"answer_weight": 10.0}},
    "sparse_1k_p8": {"task": {"window": 2 * W, "base_len": 2 * LEN, "num_pairs": 8,
                              "vocab": Vocab(num_keys=32, num_values=32, num_digits=32, num_filler=64)},
                     "curriculum": (0.5, 16), "train": {"answer_weight": 10.0}},
    # the CPU study's own task (84 tokens, W = 8, 8 pairs, 16 keys / 16 values) and lr: a reference learning point
    "cpu_ref": {"task": dict(window=8, base_len=84, num_pairs=8, vocab=Vocab()),
                "train": {"lr": 3e-3, "warmup": 50, "batch": 16}},
    "dense_lr": {"task": {"num_pairs": LEN // 16}, "train": {"lr": 3e-3, "warmup": 20, "answer_weight": 10.0}},
}


def design(name: str):
    d = DESIGNS[name]
    task = dataclasses.replace(BASE_TASK, **d.get("task", {}))
    tcfg = dataclasses.replace(BASE_TRAIN, **d.get("train", {}))
    return task, tcfg, d.get("curriculum")


def score(results) -> Dict:
    kv = np.array([c for r in results for c in r["kv_correct"]], dtype=float)
    kb = np.array([b for r in results for b in r["kv_bin"]])
    pk = np.array([r["pk_correct"] for r in results], dtype=float)
    pb = np.array([r["pk_bin"] for r in results])
    return {"kv_in": float(kv[kb == 0].mean()) if (kb == 0).any() else None,
            "kv_beyond": float(kv[kb > 0].mean()) if (kb > 0).any() else None,
            "kv_bins": [float(kv[kb == b].mean()) if (kb == b).any() else None for b in range(4)],
            "pk": float(pk.mean()), "pk_in": float(pk[pb == 0].mean()) if (pb == 0).any() else None,
            "n_kv": int(len(kv)), "n_pk": int(len(pk)),
            "ppl": float(np.exp(sum(r["nll"] for r in results) / sum(r["ntext"] for r in results)))}


def table(out_dir: str, show=None) -> str:
    """Markdown table of every design's curve in ``out_dir`` (accuracies in %, on the final length;
    ``show``: only these steps, and each run's last)."""
    rows = ["| design | step | raw tokens | train s | loss | kv <W | kv >=W | passkey | short seqs: kv <W' / passkey |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        for c in d["curve"]:
            if show and c["step"] not in show and c is not d["curve"][-1]:
                continue
            pct = lambda x: "-" if x is None else f"{100 * x:.0f}"
            sh = c.get("short")
            rows.append(f"| {d['design']} | {c['step']} | {c['tokens'] / 1e6:.2f}M | {c['train_seconds']:.0f} | "
                        f"{c['loss']:.2f} | {pct(c['kv_in'])} | {pct(c['kv_beyond'])} | {pct(c['pk'])} | "
                        + (f"{pct(sh['kv_in'])} / {pct(sh['pk'])} |" if sh else "- |"))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", choices=sorted(DESIGNS), help="train this design (else: print the table of --out)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-steps", type=int, nargs="*", default=None, help="table: only these steps (and the last)")
    p.add_argument("--out", default=".qrun/pilot")
    args = p.parse_args(argv)
    if args.design is None:
        print(table(args.out, args.show_steps))
        return 0
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    task, tcfg, curric = design(args.design)
    tcfg = dataclasses.replace(tcfg, steps=args.steps)
    t0 = time.time()
    train_task = config.train_task(task)
    stream = config.curriculum_stream(train_task, args.steps, tcfg.batch, seed=1000 + args.seed, curriculum=curric)
    t_stream = time.time() - t0
    evals = tasks.samples(task, args.n_eval, seed=2000 + args.seed)
    short = config.short_task(task, config.curriculum_stages(curric)[0][1]) if curric else None
    short_evals = tasks.samples(short, 4 * args.n_eval, seed=3000 + args.seed) if curric else None
    model, _ = models.build_model("full", task, BASE_MODEL, seed=args.seed)
    raw = np.cumsum([sum(int(e["input_ids"].shape[0]) for e in b) for b in stream])
    curve = []
    t_eval = [0.0]
    t_train0 = time.time()

    def log(step, loss):
        done = step + 1
        if done % args.eval_every and done != args.steps:
            return
        te = time.time()
        with torch.no_grad():
            res = evaluate.evaluate_method(model, "full", None, evals, task, BASE_MODEL, task.vocab.size, chunk_size=W)
        model.train()
        t_eval[0] += time.time() - te
        s = score(res)
        if curric:
            with torch.no_grad():
                rs = evaluate.evaluate_method(model, "full", None, short_evals, short, BASE_MODEL, task.vocab.size,
                                              chunk_size=W)
            model.train()
            s["short"] = score(rs)
        s.update(step=done, tokens=int(raw[step]), loss=float(np.mean(losses_seen[-20:] + [loss])),
                 train_seconds=time.time() - t_train0 - t_eval[0])
        curve.append(s)
        dump(False)
        print(f"[{args.design}] step {done:4d} tok {raw[step] / 1e6:5.2f}M loss {s['loss']:.3f} "
              f"kv<W {100 * (s['kv_in'] or 0):5.1f} kv>W {100 * (s['kv_beyond'] or 0):5.1f} "
              f"pk {100 * s['pk']:5.1f} ppl {s['ppl']:.2f} ({s['train_seconds']:.0f}s train)"
              + (f" | short: kv {100 * s['short']['kv_in']:5.1f} pk {100 * s['short']['pk']:5.1f}" if curric else ""),
              flush=True)

    losses_seen: list = []

    def log_all(step, loss):
        losses_seen.append(loss)
        log(step, loss)

    def dump(final: bool):
        out = {"design": args.design, "overrides": DESIGNS[args.design], "task": dataclasses.asdict(task),
               "model": dataclasses.asdict(BASE_MODEL), "train": dataclasses.asdict(tcfg), "curriculum": curric,
               "params": sum(p.numel() for p in model.parameters()), "stream_seconds": t_stream,
               "train_seconds": time.time() - t_train0 - t_eval[0], "eval_seconds": t_eval[0],
               "raw_tokens": int(raw[-1]), "n_eval": args.n_eval, "curve": curve, "losses": list(losses_seen),
               "command": "python -m benchmarks.quality_gpu.pilot " + " ".join(sys.argv[1:] if argv is None else argv),
               "finished": final}
        with open(os.path.join(args.out, f"{args.design}.json"), "w") as f:
            json.dump(out, f, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))

    models.train(model, None, stream, tcfg, log=log_all, log_every=1)
    dump(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
