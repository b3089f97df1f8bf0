"""Report of the GPU quality study, built on any machine from the JSONs the device calls return.

    python -m benchmarks.quality_gpu.report --results DIR_A DIR_B   # -> benchmarks/results/quality_gpu.{md,png,json}

Aggregation, tables, plot and the control comparisons are :mod:`benchmarks.quality_cpu.report`'s;
this module adds the device's throughput table, the fine-tune arm and the check of the CPU
study's conclusions at this scale. Every verdict here is mechanical: a difference counts when
it exceeds twice its binomial standard error over the evaluated questions.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from benchmarks.quality_cpu import report as cpu_report
from benchmarks.quality_cpu.report import LABELS
from benchmarks.quality_cpu.tasks import BIN_NAMES

CONTROLS = ("window", "streaming", "snapkv")


def load(dirs: List[str]) -> Tuple[List[Dict], List[Dict]]:
    """Job results (``seed*_*.json``, newest per (seed, variant)) and call plans (``plan.json``) under ``dirs``."""
    jobs: Dict[Tuple[int, str], Dict] = {}
    plans = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "**", "*.json"), recursive=True)):
            name = os.path.basename(path)
            with open(path) as f:
                data = json.load(f)
            if name == "plan.json":
                plans.append(data)
            elif name.startswith("seed") and data.get("methods"):
                jobs[(data["seed"], data["variant"])] = data
    return [jobs[k] for k in sorted(jobs)], plans


def _stat(agg: Dict, method: str, key: str, b: Optional[int] = None) -> Tuple[float, int]:
    """Mean over seeds of ``key`` (bin ``b``) and the number of questions behind it."""
    a = agg[method]
    m = a[key]["mean"] if b is None else a[key]["mean"][b]
    if key == "kv":
        n = sum(a["n_kv"]["seeds"][s][b] for s in range(len(a["n_kv"]["seeds"])))
    elif key == "pk":
        n = sum(a["n_pk"]["seeds"][s][b] for s in range(len(a["n_pk"]["seeds"])))
    elif key.startswith("kv"):
        n = sum(sum(x) for x in a["n_kv"]["seeds"]) if key == "kv_all" else sum(sum(x[1:]) for x in a["n_kv"]["seeds"])
    else:
        n = sum(sum(x) for x in a["n_pk"]["seeds"]) if key == "pk_all" else sum(sum(x[1:]) for x in a["n_pk"]["seeds"])
    return float(m), int(n)


def compare(a: Tuple[float, int], b: Tuple[float, int]) -> str:
    """``'>'``, ``'<'`` or ``'='``: ``a`` vs ``b`` beyond twice the standard error of the difference."""
    (pa, na), (pb, nb) = a, b
    if not (na and nb) or math.isnan(pa) or math.isnan(pb):
        return "?"
    se = math.sqrt(max(pa * (1 - pa), 0.25 / na) / na + max(pb * (1 - pb), 0.25 / nb) / nb)
    if pa - pb > 2 * se:
        return ">"
    if pb - pa > 2 * se:
        return "<"
    return "="


def _pct(x: Tuple[float, int]) -> str:
    return f"{100 * x[0]:.1f}% (n={x[1]})"


def full_learned(agg: Dict, chance: Dict[str, float]) -> Dict[str, bool]:
    """Whether full attention, the reference every comparison needs, beats chance on each task:
    kv recall inside the window, the passkey at any distance. A task that full attention did
    not learn cannot tell gists from eviction."""
    if "full" not in agg:
        return {"kv": True, "pk": True}
    return {"kv": compare(_stat(agg, "full", "kv", 0), (chance["kv"], 10 ** 6)) == ">",
            "pk": compare(_stat(agg, "full", "pk_all"), (chance["pk"], 10 ** 6)) == ">"}


def outcome(agg: Dict, chance: Dict[str, float]) -> List[str]:
    """The headline: UniGist vs the same-budget controls beyond the window, and the fine-tune arm."""
    lines = []
    learned = full_learned(agg, chance)
    if not any(learned.values()):
        lines += [
            f"- **Uninformative: full attention did not learn either task** (kv inside the window "
            f"{_pct(_stat(agg, 'full', 'kv', 0))}, passkey {_pct(_stat(agg, 'full', 'pk_all'))}; chance "
            f"{100 * chance['kv']:.1f}% / {100 * chance['pk']:.1f}%). In this training budget no model formed the "
            "retrieval circuit, so the comparisons below set chance-level numbers against each other and say "
            "nothing about gists vs eviction.", ""]
    elif not all(learned.values()):
        lines += [f"- full attention did not learn the {'kv recall' if not learned['kv'] else 'passkey'} task "
                  "(at chance): comparisons on it are uninformative", ""]
    ctrls = [c for c in CONTROLS if c in agg]
    for g in ("gist_r4_prev", "gist_r8_prev", "gist_r4", "gist_r8", "ft_gist_r4_prev"):
        if g not in agg or not ctrls:
            continue
        for key, task in (("kv", "kv recall"), ("pk", "passkey")):
            far = _stat(agg, g, key, 3)
            best = max(ctrls, key=lambda c: _stat(agg, c, key, 3)[0])
            rel = compare(far, _stat(agg, best, key, 3))
            word = {">": "beats", "<": "loses to", "=": "ties", "?": "cannot be compared with"}[rel]
            lines.append(f"- {LABELS[g]} {word} the best same-budget control ({LABELS[best]}) on {task} at 4-8x W: "
                         f"{_pct(far)} vs {_pct(_stat(agg, best, key, 3))} (chance {100 * chance[key]:.1f}%)")
    return lines


def fine_tune_arm(agg: Dict, chance: Dict[str, float]) -> List[str]:
    """Does fine-tuning the full model with UniGist reach what from-scratch UniGist training reaches?"""
    ft, scratch = "ft_gist_r4_prev", "gist_r4_prev"
    if ft not in agg or scratch not in agg:
        return ["- fine-tune arm or its from-scratch counterpart missing"]
    lines = []
    verdicts = []
    for key, b, what in [("kv", i, f"kv {BIN_NAMES[i]} W") for i in range(4)] + [
            ("pk", i, f"passkey {BIN_NAMES[i]} W") for i in range(4)] + [
            ("kv_beyond", None, "kv beyond W"), ("pk_beyond", None, "passkey beyond W")]:
        a, s = _stat(agg, ft, key, b), _stat(agg, scratch, key, b)
        rel = compare(a, s)
        if b is None:
            verdicts.append(rel)
        lines.append(f"| {what} | {_pct(a)} | {_pct(s)} | {rel} |")
    ppl = (agg[ft]["ppl"]["mean"], agg[scratch]["ppl"]["mean"])
    lines.append(f"| text perplexity | {ppl[0]:.3f} | {ppl[1]:.3f} | |")
    recovered = all(v in (">", "=") for v in verdicts)
    verdict = (f"**Fine-tuning {'recovers' if recovered else 'does not recover'} what from-scratch UniGist r=4 "
               "reaches beyond the window**")
    above = [compare(_stat(agg, scratch, k), (chance[k[:2]], 10 ** 6)) == ">" for k in ("kv_beyond", "pk_beyond")]
    if not any(above):  # "recovers" chance level says nothing
        verdict = ("**From-scratch UniGist r=4 stayed at chance beyond the window on both tasks, so there was nothing "
                   "to recover; the comparison that matters is the fine-tuned model against the same-budget controls "
                   "(Outcome)**")
    if not any(full_learned(agg, chance).values()):
        verdict = "**Not testable: neither arm learned the tasks (full attention itself stayed at chance)**"
    head = [f"{verdict} (same steps; `>`/`<`/`=`: difference beyond / within twice its standard error).", "",
            f"| measure | {LABELS[ft]} | {LABELS[scratch]} (from scratch) | ft vs scratch |", "|---|---|---|---|"]
    return head + lines


def cpu_conclusions(agg: Dict, chance: Dict[str, float]) -> List[str]:
    """The CPU study's findings (benchmarks/results/quality_cpu.md), checked on these numbers."""
    out = []
    g = next((x for x in ("gist_r4_prev", "gist_r4") if x in agg), None)
    has = lambda *ms: all(m in agg for m in ms)  # noqa: E731

    learned = full_learned(agg, chance)

    def line(claim: str, held: Optional[bool], detail: str, task: Optional[str] = None) -> None:
        verdict = "n/a" if held is None else ("held" if held else "did not hold")
        if task is not None and not learned[task]:
            verdict = "not testable (full attention at chance on this task)"
        out.append(f"| {claim} | {verdict} | {detail} |")

    if g and has("full"):
        a, f = _stat(agg, g, "kv", 0), _stat(agg, "full", "kv", 0)
        line("inside the window UniGist recalls kv at least as well as full attention", compare(a, f) in (">", "="),
             f"{_pct(a)} vs {_pct(f)}", "kv")
    if g and has("window", "streaming", "snapkv"):
        a = _stat(agg, g, "kv", 3)
        best = max(_stat(agg, c, "kv", 3)[0] for c in CONTROLS)
        c = max(CONTROLS, key=lambda c: _stat(agg, c, "kv", 3)[0])
        line("beyond every budget (4-8x W) UniGist adds nothing over the controls on kv",
             compare(a, _stat(agg, c, "kv", 3)) != ">", f"UniGist {_pct(a)}, best control {100 * best:.1f}%", "kv")
    if g and has("window"):
        rels = [compare(_stat(agg, "window", "kv", b), _stat(agg, g, "kv", b)) for b in (1, 2)]
        line("the window-only control beats UniGist at 1-2x and 2-4x W (its window holds them)",
             all(r == ">" for r in rels),
             ", ".join(f"{BIN_NAMES[b]} W: {_pct(_stat(agg, 'window', 'kv', b))} vs {_pct(_stat(agg, g, 'kv', b))}"
                       for b in (1, 2)), "kv")
    if g:
        pk = _stat(agg, g, "pk_all")
        line("UniGist never learns the passkey", compare(pk, (chance["pk"], 10 ** 6)) != ">", f"{_pct(pk)}, chance "
             f"{100 * chance['pk']:.1f}%", "pk")
    if has("full"):
        pks = [_stat(agg, "full", "pk", b)[0] for b in range(4)]
        line("full attention solves the passkey at every distance (>= 90%, the 4000-step CPU run)",
             min(pks) >= 0.9, ", ".join(f"{100 * p:.0f}%" for p in pks))
    if has("streaming"):
        s = [_stat(agg, "streaming", "pk", b) for b in range(4)]
        line("StreamingLLM keeps the passkey up to 4x W and loses it at 4-8x W",
             compare(s[2], s[3]) == ">", f"2-4x W {_pct(s[2])}, 4-8x W {_pct(s[3])}", "pk")
    trained = [m for m in ("full", "window", "gist_r4_prev", "gist_r8_prev", "gist_r4", "gist_r8") if m in agg]
    if len(trained) > 1:
        ppl = [agg[m]["ppl"]["mean"] for m in trained]
        line("text perplexity is about the same for every trained model (within 2%)",
             max(ppl) / min(ppl) < 1.02, ", ".join(f"{m} {p:.3f}" for m, p in zip(trained, ppl)))
    if has("full", "streaming", "snapkv"):
        f = agg["full"]["ppl"]["mean"]
        line("evicting from the full model costs a little perplexity",
             min(agg["streaming"]["ppl"]["mean"], agg["snapkv"]["ppl"]["mean"]) > f,
             f"full {f:.3f}, StreamingLLM {agg['streaming']['ppl']['mean']:.3f}, SnapKV {agg['snapkv']['ppl']['mean']:.3f}")
    if not out:
        return []
    return ["| CPU study's conclusion | at this scale | numbers |", "|---|---|---|"] + out


def throughput_table(results: List[Dict], plans: List[Dict]) -> List[str]:
    probe: Dict[str, float] = {}
    paths: Dict[str, str] = {}
    for p in plans:
        probe.update(p.get("probe_raw_tokens_per_s", {}))
        paths.update(p.get("probe_attention", {}))
    lines = ["| variant | seed | attention in training | probe, raw tokens/s | training, raw tokens/s | train seconds "
             "| steps | peak GPU memory (GiB) | final loss (mean of last 20 steps) |", "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in results:
        t = r.get("throughput", {})
        v = r["variant"]
        seen.add(v)
        mem = t.get("peak_memory_gib")
        cells = [v, str(r["seed"]), t.get("attention", paths.get(v, "?")), f"{probe[v]:,.0f}" if v in probe else "-",
                 f"{t.get('raw_tokens_per_s', float('nan')):,.0f}", f"{r['train_seconds']:.0f}", str(r["steps"]),
                 "-" if mem is None else f"{mem:.1f}", f"{np.mean(r['losses'][-20:]):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for v in probe:
        if v not in seen:
            lines.append(f"| {v} | - | {paths.get(v, '?')} | {probe[v]:,.0f} | - | - | - | - | - |")
    return lines


def write(results: List[Dict], plans: List[Dict], out_dir: str, name: str = "quality_gpu") -> Dict:
    if not results:
        raise ValueError("no job results with evaluations found")
    os.makedirs(out_dir, exist_ok=True)
    agg = cpu_report.aggregate(results)
    meta = results[0]["meta"]
    t, m = meta["task"], meta["model"]
    vocab = t["vocab"]
    chance = {"kv": 1.0 / vocab["num_values"], "pk": float(vocab["num_digits"]) ** -t["passkey_len"]}
    seeds = sorted({r["seed"] for r in results})
    title = (f"{m['layers']}-layer Llama, hidden {m['hidden']} ({meta['params_full'] / 1e6:.0f}M), {meta['device']}, "
             f"seeds {seeds}; W = {t['window']} raw tokens; KV budget of the controls = UniGist r=4's")
    cpu_report.plot(agg, os.path.join(out_dir, f"{name}.png"), title, chance)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "aggregate": agg, "plans": [{k: v for k, v in p.items() if k != "meta"} for p in plans],
                   "train": {r["variant"]: {"seed": r["seed"], "steps": r["steps"], "train_seconds": r["train_seconds"],
                                            "throughput": r.get("throughput"), "n_eval": r.get("n_eval"),
                                            "final_loss": float(np.mean(r["losses"][-20:]))} for r in results}},
                  f, indent=1)
    tr = meta["train"]
    commands = sorted({r["meta"]["command"] for r in results} | {p["meta"]["command"] for p in plans if "meta" in p})
    n_eval = sorted({n for r in results for n in (r.get("n_eval") or {}).values()})
    lines = [
        "# Quality on GPU, from scratch and fine-tuned: UniGist vs same-budget eviction (generated by "
        "`benchmarks/quality_gpu/report.py`)", "",
        f"![accuracy vs distance]({name}.png)", "",
        "## Outcome (mechanical; a difference counts beyond twice its binomial standard error)", "",
        *outcome(agg, chance), "",
        "## Setup", "",
        f"- device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, "
        f"Python {meta['python']}; {meta['date']}",
        "- commands (one per device call, each after building the extension; "
        "`benchmarks/device/run_quality_gpu_device.sh`):",
        *[f"  - `{c}`" for c in commands],
        f"- seeds {seeds} (model init = seed, training stream = 1000 + seed, evaluation set = 2000 + seed; every "
        f"from-scratch variant of a seed sees the same init, token stream, steps and learning rate)",
        f"- model: Llama, {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads (head dim "
        f"{m['hidden'] // m['heads']}), {m.get('kv_heads') or m['heads']} KV heads, MLP {m['mlp']}, "
        f"{meta['params_full'] / 1e6:.1f}M parameters, fp32 weights, bf16 autocast on CUDA; {m['num_sink']} sinks",
        f"- training: {tr['steps']} steps x batch {tr['batch']} sequences, AdamW lr {tr['lr']} (warmup {tr['warmup']}, "
        f"cosine to {tr['min_lr_frac']}x), answer tokens weighted 1 + {tr['answer_weight']}; distance bins of the "
        f"training questions drawn with weights {meta['train_bin_weights']} (evaluation: uniform)"
        + curriculum_note(meta),
        f"- fine-tune arm: a copy of the trained full model, `unigist.patch_model` with UniGist r=4 (memory-only gists, "
        f"`gist_predicts_next=False`), trained {tr['steps']} steps (the window-only control's budget) on the same "
        f"stream, peak lr {meta['ft_lr']}",
        f"- task: raw length {t['base_len']}..{t['base_len'] + t['max_offset']}, {t['num_pairs']} kv pairs "
        f"({vocab['num_keys']} keys, {vocab['num_values']} values: chance {100 * chance['kv']:.2f}%), passkey of "
        f"{t['passkey_len']} token(s) from {vocab['num_digits']} (chance {100 * chance['pk']:.2f}%), Markov filler; "
        f"raw window W = {t['window']}; distance bins [2, W), [W, 2W), [2W, 4W), [4W, 8W)",
        f"- UniGist: r=4 window {meta['gist_r4']['window']} positions, r=8 {meta['gist_r8']['window']}; window-only "
        f"control: window {meta['window_control']['window']} + {m['num_sink']} sinks = UniGist r=4's budget at the "
        f"nominal prompt ({meta['nominal_prompt_len']} raw tokens); StreamingLLM / SnapKV: UniGist r=4's budget per prompt",
        f"- evaluation: {n_eval} samples per method (capped by time; same samples for the methods of one model), "
        f"prompts streamed in chunks of {meta['chunk']} raw tokens, bf16 weights; UniGist through `unigist.generate` "
        f"(real eviction)",
        "",
        "## Training throughput (raw tokens/s; gist positions are extra work the gist variants do)", "",
        *throughput_table(results, plans), "",
        "## Results", "",
        cpu_report.tables(agg), "",
        "## Fine-tuning vs from scratch", "",
        *fine_tune_arm(agg, chance), "",
        "## The CPU study's conclusions at this scale", "",
        *cpu_conclusions(agg, chance), "",
    ]
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return agg


def curriculum_note(meta: Dict) -> str:
    """The training line's length-curriculum clause (empty for a run without one)."""
    cur, st = meta.get("curriculum"), meta.get("curriculum_task")
    if not cur or not st:
        return ""
    if not isinstance(cur[0], (int, float)):  # several stages: the first one's sequences are described
        return "; length curriculum in stages (frac, shrink) " + ", ".join(f"({f:g}, {k})" for f, k in cur) + (
            f", the first on {st['base_len']}-token sequences, W {st['window']}, {st['num_pairs']} kv pairs")
    frac, shrink = cur
    return (f"; length curriculum: the first {frac:.0%} of the steps on {shrink}x shorter sequences "
            f"({st['base_len']}..{st['base_len'] + st['max_offset']} raw tokens, W {st['window']}, {st['num_pairs']} kv "
            f"pairs, {shrink}x as many per batch), same model, mask and positions")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, help="folders with the calls' JSONs (searched recursively)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="quality_gpu")
    args = p.parse_args(argv)
    results, plans = load(args.results)
    write(results, plans, args.out_dir, args.name)
    print(f"{len(results)} jobs -> {os.path.join(args.out_dir, args.name)}.md/.png/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
