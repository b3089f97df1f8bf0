"""Speed of unigist's CPU gist attention against dense causal SDPA, SDPA with the
UniGist boolean mask and FlexAttention with the same mask, measured in one run on
this machine's CPU.

    python benchmarks/bench_attention_cpu.py            # full grid -> benchmarks/results/attention_cpu.md (+ .json)
    python benchmarks/bench_attention_cpu.py --quick --no-flex --out /tmp/x.md    # smoke test
    python benchmarks/bench_attention_cpu.py --n 4096 --d 128 --dtype bfloat16 --windows 1024:128 --ratios 8

One row per (N, D, dtype, window/sinks, ratio, mode); mode is the forward alone
(``fwd``, under no_grad) or forward plus ``out.backward(dout)`` (``fwdbwd``). The
methods of a row run on the same fresh random inputs and are timed interleaved
(A, B, C, D, A, B, C, D, ...) so that the machine's noise hits them alike; the
table gives the median of each. Cells that would take too long (a single call
predicted above --max-call-s from the same method at a smaller N of this run) or
need too much memory are skipped and say so; Flex cells that do not compile or
run say why ("n/a (...)").

Useful FLOPs count only the mask's non-zeros: 4 * D * nnz per head forward, 2.5x
that for the backward (so 3.5x for forward+backward); SDPA causal is counted on
the causal non-zeros N (N + 1) / 2.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# runnable from a source checkout without installing (python benchmarks/bench_attention_cpu.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402
from unigist.layout import mask_nnz  # noqa: E402
from unigist.reference import gist_mask  # noqa: E402

METHODS = ("unigist", "sdpa_causal", "sdpa_masked", "flex")
LABELS = {"unigist": "unigist", "sdpa_causal": "SDPA causal", "sdpa_masked": "SDPA masked", "flex": "Flex"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd")
# Relative L2 error (against SDPA with the mask, else Flex) above which a row is flagged.
CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}

FULL = dict(n=[2048, 4096, 8192, 16384], d=[64, 128], dtype=["float32", "bfloat16"],
            windows=["256:16", "1024:128"], ratios=[4, 8])
QUICK = dict(n=[1024, 2048], d=[64], dtype=["float32", "bfloat16"], windows=["256:16"], ratios=[4])


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> str:
    """Which of the vector extensions that matter here /proc/cpuinfo lists."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    names = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return ", ".join(f"{f}" if f in flags else f"no {f}" for f in names)


def mem_available() -> int:
    """MemAvailable in bytes (a large number where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _median_call_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rates(size: int, bf16_limit_s: float) -> dict:
    """GFLOP/s of a size x size fp32 matmul (2048 by default), and of bf16 ones: 512x512
    first, size x size only if the 512 rate says one product takes under bf16_limit_s
    (without AVX-512 BF16 / AMX a bf16 torch.mm can be ~100x slower than fp32)."""
    out = {"size": size}
    a, b = torch.randn(size, size), torch.randn(size, size)
    out["fp32"] = 2 * size**3 / _median_call_s(lambda: torch.mm(a, b), 5) * 1e-9
    a5, b5 = torch.randn(512, 512, dtype=torch.bfloat16), torch.randn(512, 512, dtype=torch.bfloat16)
    out["bf16_512"] = 2 * 512**3 / _median_call_s(lambda: torch.mm(a5, b5), 3) * 1e-9
    predicted = 2 * size**3 / (out["bf16_512"] * 1e9)
    if predicted <= bf16_limit_s:
        a, b = a.bfloat16(), b.bfloat16()
        out["bf16"] = 2 * size**3 / _median_call_s(lambda: torch.mm(a, b), 3) * 1e-9
    else:
        out["bf16"] = None
        out["bf16_skipped"] = f"one {size}x{size} product would take ~{predicted:.1f} s (> {bf16_limit_s:g} s)"
    return out


# ----------------------------------------------------------------------------- methods


def gist_mask_mod(cfg: GistConfig):
    """FlexAttention mask_mod of the UniGist mask on interleaved positions (the
    numbers are Python constants, so each (N, config) compiles its own kernel)."""
    r1, w, s = cfg.ratio + 1, cfg.window, cfg.num_sink

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < s) | (kv_idx % r1 == r1 - 1) | (q_idx - kv_idx < w))

    return mask_mod


def make_flex(cfg: GistConfig, n: int):
    """Compiled FlexAttention on CPU with the UniGist block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(gist_mask_mod(cfg), B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


_PROBE: dict = {}


def _flex_backward_probe():
    """Raise (once per run, remembered) what FlexAttention raises for a CPU backward, so that
    the fwdbwd rows do not build block masks for nothing."""
    if "bwd" not in _PROBE:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 1, 128, 16, requires_grad=True)
        try:
            flex_attention(q, q, q).sum().backward()
            _PROBE["bwd"] = None
        except Exception as e:  # noqa: BLE001
            _PROBE["bwd"] = e
    if _PROBE["bwd"] is not None:
        raise _PROBE["bwd"]


def work(method: str, n: int, nnz: int) -> float:
    """What a call's time scales with, to predict a larger N from a smaller one:
    the mask's non-zeros for the sparse methods, N^2 for the dense ones."""
    return float(nnz) if method in ("unigist", "flex") else float(n) * n


def memory_estimate(method: str, n: int, itemsize: int, bwd: bool) -> int:
    """Bytes a method needs beyond the inputs (rough, on the high side)."""
    if method == "sdpa_masked":  # the bool mask, plus the additive mask SDPA builds from it per call
        return n * n * (1 + itemsize * (2 if bwd else 1))
    if method == "flex":  # create_block_mask materializes the mask and its int64 index arithmetic
        return n * n * 16
    return 0


def call_limit(method: str, args) -> float:
    """Longest call a method may take (SDPA causal, the baseline of the speedup column, has its own)."""
    return args.max_call_s_causal if method == "sdpa_causal" else args.max_call_s


def limit_flag(method: str) -> str:
    return "--max-call-s-causal" if method == "sdpa_causal" else "--max-call-s"


def history_key(method: str, cell: dict) -> tuple:
    """Cells whose times predict each other's (they differ in N only); the dense
    methods do not depend on the mask's shape."""
    base = (method, cell["d"], cell["dtype"], cell["mode"])
    return base if method in ("sdpa_causal", "sdpa_masked") else base + (cell["window"], cell["sinks"], cell["r"])


def _reason(e: BaseException, limit: int = 90) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, NotImplementedError) and "backward on CPU" in msg:
        return f"no CPU backward in torch {torch.__version__.split('+')[0]}"
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


# ----------------------------------------------------------------------------- one cell


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def run_cell(cell: dict, args, history: dict, seed: int) -> dict:
    n, d, H = cell["n"], cell["d"], args.heads
    dtype = DTYPES[cell["dtype"]]
    bwd = cell["mode"] == "fwdbwd"
    cfg = GistConfig(ratio=cell["r"], window=cell["window"], num_sink=cell["sinks"])
    nnz = mask_nnz(n, n, cfg)
    causal = n * (n + 1) // 2
    row = dict(cell, heads=H, batch=1, nnz=nnz, causal_nnz=causal, density=nnz / causal, seed=seed, methods={})

    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, H, n, d, generator=gen).to(dtype) for _ in range(4))
    if bwd:
        for t in (q, k, v):
            t.requires_grad_()
    itemsize = q.element_size()

    fns = {}
    for m in METHODS:
        info = row["methods"][m] = {"status": "ok"}
        if m == "flex" and args.no_flex:
            info.update(status="n/a", reason="--no-flex")
            continue
        hist = history.get(history_key(m, cell))
        if hist:
            n0, t0 = hist
            predicted = t0 * work(m, n, nnz) / work(m, n0, mask_nnz(n0, n0, cfg))
            if predicted > call_limit(m, args):
                info.update(status="skipped", predicted_s=predicted,
                            reason=f"~{predicted:.3g} s/call predicted > {limit_flag(m)} {call_limit(m, args):g}")
                continue
        need = memory_estimate(m, n, itemsize, bwd)
        if need > args.mem_frac * mem_available():
            reason = f"needs ~{need / 2**30:.1f} GiB, over {args.mem_frac:g} of free memory"
            info.update(status="skipped", reason=reason)
            continue
        try:
            if m == "unigist":
                fns[m] = lambda q, k, v: unigist.gist_attention(q, k, v, cfg)
            elif m == "sdpa_causal":
                fns[m] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif m == "sdpa_masked":
                mask = gist_mask(n, n, cfg)
                fns[m] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                if bwd:
                    _flex_backward_probe()  # raises at once where Flex has no CPU backward
                torch._dynamo.reset()
                t0 = time.perf_counter()
                flex = make_flex(cfg, n)
                info["block_mask_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                _call(flex, q, k, v, dout, bwd)  # compiles (or raises: no CPU backward, no compiler, ...)
                info["compile_s"] = time.perf_counter() - t0
                fns[m] = flex
        except Exception as e:  # noqa: BLE001 - any failure of one method is written into its cell
            info.update(status="n/a" if m == "flex" else "error", reason=_reason(e))
            fns.pop(m, None)

    # Warmup, interleaved: one call each; a method whose call exceeds --max-call-s stops there.
    # The first call's result is kept to check the methods against each other.
    results, last = {}, {}
    for m in list(fns):
        try:
            t0 = time.perf_counter()
            out = _call(fns[m], q, k, v, dout, bwd)
            last[m] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            row["methods"][m].update(status="error", reason=_reason(e))
            del fns[m]
            continue
        row["methods"][m]["warmup_s"] = [last[m]]
        results[m] = [out.detach().float()] + ([t.grad.float() for t in (q, k, v)] if bwd else [])
        if last[m] > call_limit(m, args):
            row["methods"][m].update(
                status="skipped", reason=f"1 call took {last[m]:.3g} s > {limit_flag(m)} {call_limit(m, args):g}"
            )
            history[history_key(m, cell)] = (n, last[m])
            del fns[m]
    # more warmup for short calls (first-touch of buffers, thread pools): up to 2 more rounds within ~1 s
    for _ in range(2):
        if not fns or sum(last[m] for m in fns) > 0.5:
            break
        for m in fns:
            t0 = time.perf_counter()
            _call(fns[m], q, k, v, dout, bwd)
            last[m] = time.perf_counter() - t0
            row["methods"][m]["warmup_s"].append(last[m])

    # Timed rounds, interleaved.
    times = {m: [] for m in fns}
    if fns:
        round_s = sum(last[m] for m in fns)
        reps = max(args.min_reps, min(args.max_reps, int(args.cell_budget_s / max(round_s, 1e-9))))
        t_start = time.perf_counter()
        for i in range(reps):
            for m in list(fns):
                _zero_grads(q, k, v, bwd)
                try:
                    t0 = time.perf_counter()
                    _call(fns[m], q, k, v, dout, bwd)
                    times[m].append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory; the other methods go on
                    row["methods"][m].update(status="error", reason=_reason(e))
                    del fns[m], times[m]
            if i + 1 >= args.min_reps and time.perf_counter() - t_start > 2 * args.cell_budget_s:
                break  # the machine got slower than the warmup said: keep the cell's cap
    for m, ts in times.items():
        med = statistics.median(ts)
        row["methods"][m].update(ms=med * 1e3, times_ms=[t * 1e3 for t in ts], reps=len(ts))
        history[history_key(m, cell)] = (n, med)

    # The same attention? (against SDPA with the mask, else Flex; outputs, and dq, dk, dv with the backward)
    ref_name = next((m for m in ("sdpa_masked", "flex") if m in results), None)
    row["check"] = {}
    if ref_name:
        names = ["out", "dq", "dk", "dv"]
        for m in ("unigist", "flex"):
            if m in results and m != ref_name:
                errs = {names[i]: rel_err(a, b) for i, (a, b) in enumerate(zip(results[m], results[ref_name]))}
                row["check"][m] = dict(against=ref_name, rel_err=errs, ok=max(errs.values()) <= CHECK_TOL[dtype])

    flops = 4.0 * d * H * (3.5 if bwd else 1.0)
    ug, sd = row["methods"]["unigist"].get("ms"), row["methods"]["sdpa_causal"].get("ms")
    row["speedup_vs_sdpa_causal"] = sd / ug if ug and sd else None
    row["gflops_unigist"] = flops * nnz / (ug * 1e-3) * 1e-9 if ug else None
    row["gflops_sdpa_causal"] = flops * causal / (sd * 1e-3) * 1e-9 if sd else None
    for m in ("sdpa_masked", "flex"):  # for the .json: useful rate of the masked methods too
        ms = row["methods"][m].get("ms")
        row["methods"][m]["useful_gflops"] = flops * nnz / (ms * 1e-3) * 1e-9 if ms else None
    return row


def _zero_grads(q, k, v, bwd):
    if bwd:
        q.grad = k.grad = v.grad = None


def _call(fn, q, k, v, dout, bwd):
    if not bwd:
        with torch.no_grad():
            return fn(q, k, v)
    _zero_grads(q, k, v, bwd)
    out = fn(q, k, v)
    out.backward(dout)
    return out


# ----------------------------------------------------------------------------- table


def fmt_ms(x) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def method_cell(info: dict) -> str:
    if info.get("status") == "ok" and info.get("ms") is not None:
        return fmt_ms(info["ms"])
    return f"{info.get('status', '?')} ({_clean(info.get('reason', ''))})"


TABLE_HEADER = (
    "| N | D | dtype | window/sinks | r | mode | mask density | unigist ms | SDPA causal ms | SDPA masked ms "
    "| Flex ms | unigist vs SDPA causal | unigist GFLOP/s | SDPA causal GFLOP/s |"
)


def table_row(r: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    ms = r["methods"]
    return (
        f"| {r['n']} | {r['d']} | {r['dtype']} | {r['window']}/{r['sinks']} | {r['r']} | {r['mode']} "
        f"| {r['density']:.3f} | {method_cell(ms['unigist'])} | {method_cell(ms['sdpa_causal'])} "
        f"| {method_cell(ms['sdpa_masked'])} | {method_cell(ms['flex'])} | {f(r['speedup_vs_sdpa_causal'], '{:.2f}x')} "
        f"| {f(r['gflops_unigist'], '{:.1f}')} | {f(r['gflops_sdpa_causal'], '{:.1f}')} |"
    )


def write_outputs(rows: list, meta: dict, out: str, done: bool) -> str:
    base = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(base + ".json", "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)

    mm = meta["matmul_gflops"]
    sq = f"{mm['size']}x{mm['size']}"
    bf16 = f"bf16 512x512 {mm['bf16_512']:.1f} GFLOP/s, " + (
        f"{sq} {mm['bf16']:.1f} GFLOP/s" if mm.get("bf16") else f"{sq} skipped ({mm['bf16_skipped']})"
    )
    a = meta["args"]
    lines = [
        "# Gist attention speed on CPU",
        "",
        f"- CPU: {meta['cpu']} ({meta['logical_cpus']} logical CPUs; {meta['cpu_flags']}); "
        f"{meta['memory_gib']:.0f} GiB",
        f"- torch {meta['torch']}, torch.get_num_threads() = {meta['threads']}, "
        f"torch.backends.cpu.get_cpu_capability() = {meta['cpu_capability']}",
        f"- date: {meta['date']}; load average (1/5/15 min) at start {meta['load_start']}, "
        f"at end {meta.get('load_end', '(running)')}; {meta.get('wall_s', 0) / 60:.1f} min"
        + ("" if done else " so far (partial table: the run is still going or was stopped)"),
        f"- command: `{meta['command']}`",
        f"- matmul (torch.mm) in this run: fp32 {sq} {mm['fp32']:.1f} GFLOP/s; {bf16}",
        f"- B=1, H={a['heads']} query heads = {a['heads']} kv heads, softmax scale 1/sqrt(D); inputs torch.randn "
        "in the row's dtype, fresh for each row",
        f"- times: median of >= {a['min_reps']} timed calls per method (up to {a['max_reps']}; about "
        f"{a['cell_budget_s']:g} s of timed calls per row) after 1-3 warmup calls, time.perf_counter, methods "
        f"interleaved; calls predicted above {a['max_call_s']:g} s ({a['max_call_s_causal']:g} s for SDPA causal) "
        "are skipped",
        "",
        TABLE_HEADER,
        "|" + "---|" * 14,
    ]
    lines += [table_row(r) for r in rows]
    bad = [
        f"- N={r['n']} D={r['d']} {r['dtype']} {r['window']}/{r['sinks']} r={r['r']} {r['mode']}: {m} vs "
        f"{c['against']} relative error " + ", ".join(f"{k} {v:.2g}" for k, v in c["rel_err"].items())
        for r in rows
        for m, c in r.get("check", {}).items()
        if not c["ok"]
    ]
    if bad:
        lines += ["", "**Rows where the methods disagree** (relative L2 error above "
                  + ", ".join(f"{str(t).replace('torch.', '')} {v:g}" for t, v in CHECK_TOL.items()) + "):", ""] + bad
    lines += [
        "",
        "## Columns",
        "",
        "- **N**: interleaved sequence length (raw tokens and gists), queries = keys = N. **D**: head dim. "
        "**window/sinks**, **r**: the GistConfig (window, num_sink, ratio).",
        "- **mode**: `fwd` is the forward alone under `torch.no_grad()`; `fwdbwd` is the forward plus "
        "`out.backward(dout)` with q, k, v requiring grad (their .grad reset to None between calls, outside "
        "the timing).",
        "- **mask density**: non-zeros of the UniGist mask (unigist.layout.mask_nnz) / causal non-zeros N(N+1)/2.",
        "- **unigist ms**: `unigist.gist_attention(q, k, v, GistConfig(ratio=r, window=w, num_sink=s))`.",
        "- **SDPA causal ms**: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, dense causal attention "
        "(more work than the gist mask: the baseline a long-context model would otherwise run).",
        "- **SDPA masked ms**: the same with `attn_mask=` the boolean UniGist mask "
        "(`unigist.reference.gist_mask(N, N, cfg)`, built once outside the timing; SDPA turns it into an "
        "additive mask in every call, and the CPU kernel does not skip masked blocks).",
        "- **Flex ms**: `torch.compile(flex_attention)` with `create_block_mask` of the same mask (block mask "
        "and compilation outside the timing; each (N, config, D, dtype) compiles its own kernel). "
        "`n/a (...)` says why it did not run (FlexAttention has no CPU backward in this torch).",
        "- **unigist vs SDPA causal**: SDPA causal ms / unigist ms from the same row (> 1: unigist is faster).",
        "- **unigist GFLOP/s**: useful FLOPs only, 4*D*nnz per head for the forward and 3.5x that for "
        "forward+backward (the backward counted as 2.5x the forward), over unigist's time. **SDPA causal "
        "GFLOP/s**: the same on the causal non-zeros N(N+1)/2. Compare them with the matmul rate above.",
        "- `skipped (...)`: not run, because one call was predicted (from the same method at a smaller N in this "
        "run, scaled by nnz for the sparse methods and N^2 for the dense ones) or measured above --max-call-s "
        "(--max-call-s-causal for SDPA causal), "
        "or its memory estimate exceeded --mem-frac of the free memory. `error (...)`: the call raised.",
        "- The .json beside this file holds every timed call, the warmup calls, Flex compile times, the "
        "relative errors of unigist (and Flex) against SDPA with the mask, and the seeds.",
    ]
    text = "\n".join(lines) + "\n"
    with open(out, "w") as fh:
        fh.write(text)
    return text


# ----------------------------------------------------------------------------- main


def _windows(text: str) -> tuple[int, int]:
    try:
        w, s = text.split(":")
        return int(w), int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WINDOW:SINKS like 256:16, got {text!r}") from None


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", help=f"sequence lengths (default {FULL['n']})")
    ap.add_argument("--d", type=int, nargs="+", help=f"head dims (default {FULL['d']})")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), metavar="DTYPE",
                    help=f"float32, bfloat16, float16 (or fp32, bf16, fp16); default {FULL['dtype']}")
    ap.add_argument("--windows", type=_windows, nargs="+", metavar="W:S",
                    help=f"(window, num_sink) pairs (default {' '.join(FULL['windows'])})")
    ap.add_argument("--ratios", type=int, nargs="+", help=f"gist ratios (default {FULL['ratios']})")
    ap.add_argument("--heads", type=int, default=8, help="query heads = kv heads (default 8)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: N 1024 2048, D 64, fp32 and bf16, window 256:16, r 4 (flags given override)")
    ap.add_argument("--no-flex", action="store_true", help="leave out FlexAttention")
    ap.add_argument("--max-call-s", type=float, default=60.0,
                    help="skip a method in a row when one call is predicted (or measured) above this (default 60)")
    ap.add_argument("--max-call-s-causal", type=float, default=120.0,
                    help="the same for SDPA causal, the baseline of the speedup column (default 120)")
    ap.add_argument("--cell-budget-s", type=float, default=15.0,
                    help="seconds of timed calls per row; sets the repetitions between --min-reps and --max-reps")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=25)
    ap.add_argument("--mem-frac", type=float, default=0.5,
                    help="skip a method whose memory estimate exceeds this share of MemAvailable (default 0.5)")
    ap.add_argument("--matmul-size", type=int, default=2048, help="square matmul whose rate the header gives")
    ap.add_argument("--bf16-mm-limit-s", type=float, default=2.0,
                    help="time the --matmul-size bf16 matmul only if the 512x512 one predicts it under this")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, help="base seed of the inputs (default: random)")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention_cpu.md")
    )
    args = ap.parse_args(argv)
    grid = QUICK if args.quick else FULL
    for key in ("n", "d", "dtype", "ratios"):
        if getattr(args, key) is None:
            setattr(args, key, list(grid[key]))
    if args.windows is None:
        args.windows = [_windows(w) for w in grid["windows"]]
    long_names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    args.dtype = list(dict.fromkeys(long_names.get(t, t) for t in args.dtype))
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        ap.error("need 1 <= --min-reps <= --max-reps")
    return args


def main(argv=None) -> int:
    from tqdm import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    t_run = time.perf_counter()
    base_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    meta = dict(
        cpu=cpu_model(),
        cpu_flags=cpu_flags(),
        logical_cpus=os.cpu_count(),
        memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        platform=platform.platform(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        command="python3 benchmarks/bench_attention_cpu.py" + ("" if not argv else " " + shlex.join(argv)),
        load_start=load_average(),
        base_seed=base_seed,
        args={k: v for k, v in vars(args).items()},
    )
    print(f"# {meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_capability']}; "
          "measuring matmul rates ...", file=sys.stderr, flush=True)
    meta["matmul_gflops"] = matmul_rates(args.matmul_size, args.bf16_mm_limit_s)
    print(f"# matmul GFLOP/s: {meta['matmul_gflops']}", file=sys.stderr, flush=True)

    cells = [
        dict(n=n, d=d, dtype=dt, window=w, sinks=s, r=r, mode=mode)
        for n in sorted(args.n)  # ascending N: the smaller rows predict which larger calls are too slow
        for d in args.d
        for dt in args.dtype
        for (w, s) in args.windows
        for r in args.ratios
        for mode in args.modes
    ]
    rows, history = [], {}
    # a bar on a terminal; in a log file (stderr not a tty) only the finished rows, one line each
    bar = tqdm(cells, file=sys.stderr, unit="row", dynamic_ncols=True, disable=None)
    for i, cell in enumerate(bar):
        bar.set_postfix_str(f"N={cell['n']} D={cell['d']} {cell['dtype']} {cell['window']}/{cell['sinks']} "
                            f"r={cell['r']} {cell['mode']}")
        row = run_cell(cell, args, history, (base_seed + i) % 2**63)
        rows.append(row)
        meta["wall_s"] = time.perf_counter() - t_run
        write_outputs(rows, meta, args.out, done=False)
        bar.write(f"[{i + 1}/{len(cells)} {meta['wall_s'] / 60:.1f} min] {table_row(row)}", file=sys.stderr)
        gc.collect()
    bar.close()
    meta["load_end"] = load_average()
    meta["wall_s"] = time.perf_counter() - t_run
    write_outputs(rows, meta, args.out, done=True)
    print(f"# wrote {args.out} and {os.path.splitext(args.out)[0]}.json in {meta['wall_s'] / 60:.1f} min",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
