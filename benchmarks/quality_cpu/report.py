"""Tables (markdown), plot (png) and raw numbers (json) of the CPU quality study."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

import numpy as np

from .tasks import BIN_NAMES

LABELS = {
    "full": "Full attention (no budget)",
    "gist_r4": "UniGist r=4",
    "gist_r4_prev": "UniGist r=4, raw-before-gist predicts",
    "gist_r8": "UniGist r=8",
    "gist_r8_prev": "UniGist r=8, raw-before-gist predicts",
    "ft_gist_r4_prev": "UniGist r=4 (raw-before-gist), fine-tuned from the full model",
    "window": "Window-only mask, trained (r=4 budget)",
    "streaming": "StreamingLLM on full model (r=4 budget)",
    "snapkv": "SnapKV on full model (r=4 budget)",
}
ORDER = list(LABELS)
STYLE = {
    "full": ("black", "-", "o"), "gist_r4": ("tab:blue", "-", "s"), "gist_r4_prev": ("tab:blue", "--", "s"),
    "gist_r8": ("tab:green", "-", "^"), "gist_r8_prev": ("tab:green", "--", "^"),
    "ft_gist_r4_prev": ("tab:cyan", "-.", "X"),
    "window": ("tab:red", "-", "v"), "streaming": ("tab:orange", ":", "D"), "snapkv": ("tab:purple", ":", "P"),
}


def _ratio(method: str) -> int:
    return 8 if "r8" in method else 4


def per_seed(samples: List[Dict], method: str) -> Dict:
    """Aggregate one (method, seed): accuracy per bin, passkey per bin, perplexity, splits."""
    r = _ratio(method)
    kv_c = np.concatenate([s["kv_correct"] for s in samples]).astype(float)
    kv_b = np.concatenate([s["kv_bin"] for s in samples])
    kv_a = np.concatenate([s["kv_answer_index"] for s in samples])
    pk_c = np.array([s["pk_correct"] for s in samples], dtype=float)
    pk_b = np.array([s["pk_bin"] for s in samples])
    plen = np.array([s["prompt_len"] for s in samples])
    after_gist = kv_a % r == 0
    div = plen % r == 0
    far = kv_b >= 1
    return {
        "kv": [float(kv_c[kv_b == b].mean()) for b in range(4)],
        "pk": [float(pk_c[pk_b == b].mean()) for b in range(4)],
        "kv_all": float(kv_c.mean()),
        "kv_beyond": float(kv_c[far].mean()),
        "pk_all": float(pk_c.mean()),
        "pk_beyond": float(pk_c[pk_b >= 1].mean()),
        "ppl": math.exp(sum(s["nll"] for s in samples) / sum(s["ntext"] for s in samples)),
        "kv_after_gist": float(kv_c[after_gist].mean()), "kv_not_after_gist": float(kv_c[~after_gist].mean()),
        "pk_div": float(pk_c[div].mean()) if div.any() else float("nan"),
        "pk_nondiv": float(pk_c[~div].mean()) if (~div).any() else float("nan"),
        "peak_kv": int(max(s["peak_kv"] for s in samples)),
        "n_kv": [int((kv_b == b).sum()) for b in range(4)], "n_pk": [int((pk_b == b).sum()) for b in range(4)],
    }


def aggregate(results: List[Dict]) -> Dict[str, Dict]:
    by_method: Dict[str, List[Dict]] = {}
    for res in results:
        for method, samples in res["methods"].items():
            by_method.setdefault(method, []).append(per_seed(samples, method))
    out = {}
    for method, seeds in by_method.items():
        agg = {}
        for key in seeds[0]:
            vals = np.array([s[key] for s in seeds], dtype=float)
            agg[key] = {"mean": np.nanmean(vals, 0).tolist(), "std": np.nanstd(vals, 0).tolist(),
                        "min": np.nanmin(vals, 0).tolist(), "max": np.nanmax(vals, 0).tolist(),
                        "seeds": vals.tolist()}
        out[method] = agg
    return out


def _pm(a, i=None, pct=True):
    """``mean ± std`` over seeds; the mean alone where one seed ran (a std of 0 would claim agreement)."""
    m, s = a["mean"], a["std"]
    if i is not None:
        m, s = m[i], s[i]
    one = len(a["seeds"]) == 1
    if pct:
        return f"{100 * m:.1f}" if one else f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.2f}" if one else f"{m:.2f} ± {s:.2f}"


def tables(agg: Dict[str, Dict]) -> str:
    methods = [m for m in ORDER if m in agg]
    seed_counts = {len(agg[m]["kv"]["seeds"]) for m in methods}
    # runs where some methods have fewer seeds (a device call cut short) say so in the titles
    over = "mean ± std over seeds" + ("; no ± where a method ran one seed" if 1 in seed_counts and len(seed_counts) > 1
                                      else "")
    lines = []
    for key, title in (("kv", "KV recall accuracy (%) by distance beyond the raw window W"),
                       ("pk", "Passkey exact match (%) by distance")):
        lines += ([""] if lines else []) + [
            f"### {title} ({over})", "",
            "| method | " + " | ".join(f"{b} W" for b in BIN_NAMES) + " | all | beyond W |", "|---|" + "---|" * 6]
        for m in methods:
            a = agg[m]
            lines.append(f"| {LABELS[m]} | " + " | ".join(_pm(a[key], i) for i in range(4))
                         + f" | {_pm(a[key + '_all'])} | {_pm(a[key + '_beyond'])} |")
    lines += ["", "### Perplexity on text tokens, peak KV entries, and the gist-boundary splits", "",
              "kv after gist: the answer is the first raw token after a gist of the method's ratio "
              "(for non-gist methods: of r=4); passkey prompt % r = 0: the prompt ends with a gist.", "",
              "| method | text ppl | peak KV rows per layer (budget + one chunk) | kv: after gist | kv: not after gist "
              "| passkey: prompt % r = 0 | passkey: prompt % r != 0 |",
              "|---|---|---|---|---|---|---|"]
    for m in methods:
        a = agg[m]
        lines.append(f"| {LABELS[m]} | {_pm(a['ppl'], pct=False)} | {int(a['peak_kv']['max'])} | "
                     f"{_pm(a['kv_after_gist'])} | {_pm(a['kv_not_after_gist'])} | {_pm(a['pk_div'])} | "
                     f"{_pm(a['pk_nondiv'])} |")
    return "\n".join(lines)


def plot(agg: Dict[str, Dict], path: str, title: str = "", chance: Dict[str, float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    x = np.arange(4)
    for ax, key, name in ((axes[0], "kv", "multi-query kv recall"), (axes[1], "pk", "passkey (exact match)")):
        for m in [m for m in ORDER if m in agg]:
            c, ls, mk = STYLE[m]
            a = agg[m][key]
            ax.errorbar(x + 0.03 * (ORDER.index(m) - 3.5), 100 * np.array(a["mean"]),
                        yerr=100 * np.array(a["std"]), color=c, ls=ls, marker=mk, capsize=3, label=LABELS[m])
        if chance and key in chance:
            ax.axhline(100 * chance[key], color="0.5", ls="--", lw=1)
            ax.text(3.4, 100 * chance[key] + 1, "chance", fontsize=8, color="0.4", ha="right")
        ax.set_xticks(x, [f"{b} W" for b in BIN_NAMES])
        ax.set_xlim(-0.4, 3.4)  # fixed, so a bin without samples (nan) does not rescale the axis
        ax.set_xlabel("distance of the needed tokens (multiples of the raw window W)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.axvspan(-0.4, 0.5, color="0.9", zorder=0)
        ax.text(0.05, 0.97, "inside the window", ha="center", va="top", fontsize=8, color="0.4",
                transform=ax.get_xaxis_transform())
    axes[0].set_ylabel("accuracy (%), mean ± std over seeds")
    axes[0].set_ylim(-3, 104)  # points at 100% stay visible
    # below both panels: inside either one it hides the curves near 100%
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(agg: Dict[str, Dict]) -> List[str]:
    """Mechanical checks of the expected outcome (the hand-written summary interprets them)."""
    out = []

    def far(m, key="kv"):
        return agg[m][key]["mean"][3] if m in agg else float("nan")

    def beyond(m, key="kv_beyond"):
        return agg[m][key]["mean"] if m in agg else float("nan")

    for g in ("gist_r4", "gist_r8"):
        if g not in agg:
            continue
        for ctrl in ("window", "streaming", "snapkv"):
            if ctrl in agg:
                out.append(f"- {LABELS[g]} vs {LABELS[ctrl]}: kv 4-8x W {100 * far(g):.1f}% vs {100 * far(ctrl):.1f}%, "
                           f"passkey 4-8x W {100 * far(g, 'pk'):.1f}% vs {100 * far(ctrl, 'pk'):.1f}%")
        if "full" in agg:
            out.append(f"- {LABELS[g]} vs full attention: kv beyond W {100 * beyond(g):.1f}% vs {100 * beyond('full'):.1f}%, "
                       f"passkey beyond W {100 * beyond(g, 'pk_beyond'):.1f}% vs {100 * beyond('full', 'pk_beyond'):.1f}%")
    for r in (4, 8):
        a, b = f"gist_r{r}", f"gist_r{r}_prev"
        if a in agg and b in agg:
            out.append(f"- label convention r={r}: gist predicts {100 * agg[a]['kv_all']['mean']:.1f}% kv / "
                       f"{100 * agg[a]['pk_all']['mean']:.1f}% passkey / ppl {agg[a]['ppl']['mean']:.2f}; "
                       f"raw-before-gist predicts {100 * agg[b]['kv_all']['mean']:.1f}% / "
                       f"{100 * agg[b]['pk_all']['mean']:.1f}% / {agg[b]['ppl']['mean']:.2f}")
    return out


def write(results: List[Dict], meta: Dict, out_dir: str, name: str = "quality_cpu") -> Dict:
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(results)
    train = {}
    for res in results:
        train.setdefault(res["variant"], []).append((res["train_seconds"], float(np.mean(res["losses"][-20:]))))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "aggregate": agg, "train": train}, f, indent=1)
    t, m = meta["task"], meta["model"]
    title = (f"{m['layers']}-layer Llama, hidden {m['hidden']}, trained from scratch, {len(meta['seeds'])} seeds; "
             f"W = {t['window']} raw tokens; KV budget of the controls = UniGist r=4's")
    vocab = t["vocab"]
    chance = {"kv": 1.0 / vocab["num_values"], "pk": float(vocab["num_digits"]) ** -t["passkey_len"]}
    plot(agg, os.path.join(out_dir, f"{name}.png"), title, chance)
    tr = meta["train"]
    lines = [
        "# Quality on CPU, from scratch: UniGist vs same-budget eviction (generated by "
        "`benchmarks/quality_cpu/report.py`)", "",
        f"![accuracy vs distance]({name}.png)", "",
        "## Setup", "",
        f"- command: `{meta['command']}` (wall {meta['wall_seconds'] / 60:.1f} min, {meta['workers']} worker "
        f"processes of 1 thread)",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, Python {meta['python']}; {meta['date']}",
        f"- seeds {meta['seeds']} (model init = seed, training stream = 1000 + seed, evaluation set = 2000 + seed; "
        f"every variant of a seed sees the same init, token stream, steps and learning rate)",
        f"- model: Llama, {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, MLP {m['mlp']}, "
        f"float32, random init; {m['num_sink']} sink positions",
        f"- training: {tr['steps']} steps x batch {tr['batch']}, AdamW lr {tr['lr']} (warmup {tr['warmup']}, "
        f"cosine to {tr['min_lr_frac']}x), LM loss on every token with answer tokens weighted "
        f"1 + {tr['answer_weight']}",
        f"- task: raw length {t['base_len']}..{t['base_len'] + t['max_offset']}, {t['num_pairs']} kv pairs "
        f"(each asked once; {t['vocab']['num_keys']} keys, {t['vocab']['num_values']} values: chance "
        f"{100 * chance['kv']:.2f}%), passkey of {t['passkey_len']} digits, filler from a fixed Markov chain; "
        f"raw window W = {t['window']}; distance bins in raw tokens: [2, W), [W, 2W), [2W, 4W), [4W, 8W)",
        f"- UniGist: r=4 {meta['gist_r4']['window']}-position window, r=8 {meta['gist_r8']['window']} "
        f"(every raw token < W back visible), {m['num_sink']} sinks; window-only control: window "
        f"{meta['window_control']['window']} + {m['num_sink']} sinks = UniGist r=4's budget at the nominal "
        f"prompt ({meta['nominal_prompt_len']} raw tokens); StreamingLLM / SnapKV: exactly UniGist r=4's "
        f"budget for each prompt (r=8's budget is smaller, so the controls hold more KV than r=8)",
        f"- evaluation: {meta['n_eval']} samples per seed (x {t['num_pairs']} kv queries), prompt streamed in "
        f"chunks of {meta['chunk']} raw tokens, passkey decoded greedily; UniGist and the window control "
        f"through `unigist.generate` (real eviction), the rest through a `DynamicCache` with eviction hooks",
        "",
        "## Results", "",
        tables(agg), "",
        "### Mechanical checks", "",
        *verdict(agg), "",
        "### Training", "",
        "| variant | train seconds (mean) | final loss (mean of last 20 steps, per seed) |",
        "|---|---|---|",
    ]
    for v, rows in train.items():
        lines.append(f"| {v} | {np.mean([r[0] for r in rows]):.0f} | {', '.join(f'{r[1]:.3f}' for r in rows)} |")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return agg
