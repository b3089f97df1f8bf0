"""Speed of unigist's CUDA gist attention against dense causal SDPA and
FlexAttention with the same mask, measured in one run on one GPU.

    python benchmarks/bench_attention.py                 # full table -> benchmarks/results/attention.md
    python benchmarks/bench_attention.py --no-flex --n 8192 32768 --out /tmp/x.md
    python benchmarks/bench_attention.py --n 32768 --append   # replace/add rows, keep the others
    # training/serving shapes: GQA, D=64, HF's [B, N, H, D] tensors seen as [B, H, N, D]
    python benchmarks/bench_attention.py --n 4096 8192 --ratio 4 --heads 32 --kv-heads 8 --dim 64 \
        --window 256 --layout hf --no-flex-shifted --append

Flex runs twice: (c) with the UniGist mask on the interleaved layout, and (d) on
the gist-shifted layout (tokens permuted inside tiles of --shift-tile positions so
each tile's gists sit at its right end; the mask_mod maps shifted indices back to
positions with unigist.layout.unshift_position). In (d) the inputs are permuted
once outside the timing; the permutation's own cost (gather q, k, v and scatter
the output back) is timed separately.

Useful FLOPs count only the mask's non-zeros: 4 * D * nnz per head forward,
2.5x that for the backward (so 3.5x for forward+backward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

# runnable from a source checkout without installing (python benchmarks/bench_attention.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402
from unigist.layout import gist_shift_permutation, unshift_position  # noqa: E402

try:
    from triton.testing import do_bench as _do_bench
except Exception:  # pragma: no cover
    _do_bench = None


# Milliseconds of warmup and of timed calls per measurement. triton's defaults
# (25 / 150) give a 32k fwd+bwd (26-55 ms) one warmup call and 3-6 timed ones:
# its median then moved by up to 1.7 ms between two runs of one build (NOTES v10).
WARMUP_MS, REP_MS = 250, 1500


def bench_ms(fn, grad_to_none=None):
    """Median time in ms (CUDA events)."""
    if _do_bench is not None:
        return _do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median")
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(30):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def mask_nnz(n: int, cfg: GistConfig) -> int:
    """Non-zeros of the n x n mask (closed form per row, as layout::row_nnz)."""
    i = torch.arange(n, dtype=torch.int64)
    key_end = i + 1
    sink_end = key_end.clamp(max=cfg.num_sink)
    local_lo = torch.maximum(sink_end, i - cfg.window + 1)
    far = local_lo // (cfg.ratio + 1) - sink_end // (cfg.ratio + 1)
    return int((sink_end + far + key_end - local_lo).sum())


def make_flex(cfg: GistConfig, n: int, device, gqa: bool = False):
    """FlexAttention with the UniGist mask_mod, compiled. The layout numbers are
    Python constants of the mask_mod, so each (N, ratio) compiles its own kernel
    (as a user would write it). With the numbers as captured 0-d tensors instead (no
    recompiles) Flex ran 3.5x slower on the H100 (98 ms vs 28 ms forward at 32k)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(gist_mask_mod(cfg), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa), block_mask


def gist_mask_mod(cfg: GistConfig):
    """FlexAttention mask_mod of the UniGist mask on interleaved positions."""
    r1, w, s = cfg.ratio + 1, cfg.window, cfg.num_sink

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < s) | (kv_idx % r1 == r1 - 1) | (q_idx - kv_idx < w))

    return mask_mod


def shifted_mask_mod(cfg: GistConfig, n: int, tile: int):
    """The same mask on the gist-shifted layout: index i holds interleaved
    position unshift_position(i)."""
    base = gist_mask_mod(cfg)

    def mask_mod(b, h, q_idx, kv_idx):
        return base(b, h, unshift_position(q_idx, tile, n, cfg), unshift_position(kv_idx, tile, n, cfg))

    return mask_mod


def make_flex_shifted(cfg: GistConfig, n: int, tile: int, device):
    """FlexAttention on the gist-shifted layout (inputs and output in shifted
    order), its block mask, and the permutation (shifted = x[:, :, perm])."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(
        shifted_mask_mod(cfg, n, tile), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device
    )
    flex = torch.compile(flex_attention, dynamic=False)
    perm, inverse = gist_shift_permutation(n, tile, cfg)
    return (lambda q, k, v: flex(q, k, v, block_mask=block_mask)), block_mask, perm.to(device), inverse.to(device)


def blocks_visited(block_mask) -> tuple[float, float]:
    """Share of causal 128x128 blocks the block mask visits, and the partial
    (mask-evaluated) share of those."""
    nb = block_mask.kv_num_blocks.shape[-1]
    partial = int(block_mask.kv_num_blocks.sum())
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    return (partial + full) / (nb * (nb + 1) / 2), partial / max(partial + full, 1)


def bench_flex_shifted(cfg: GistConfig, n: int, args, q, k, v, dout, dev) -> dict:
    """Times of Flex (d) on the shifted layout, its permutation, and its block counts."""
    flex, bm, perm, inverse = make_flex_shifted(cfg, n, args.shift_tile, dev)
    with torch.no_grad():
        qs, ks, vs, dos = (t[:, :, perm].contiguous() for t in (q, k, v, dout))
        out = flex(qs, ks, vs)
        # the shifted run is the same attention: check it once (un-permuted) against the interleaved one
        ref = unigist.gist_attention(q, k, v, cfg)
        err = ((out[:, :, inverse].float() - ref.float()).norm() / ref.float().norm()).item()
        if err > 2e-2:
            raise RuntimeError(f"Flex on the shifted layout disagrees with unigist: relative error {err:.3g}")
        fs_f = bench_ms(lambda: flex(qs, ks, vs))
        perm_ms = bench_ms(lambda: [t[:, :, perm] for t in (q, k, v)] + [out[:, :, inverse]])
    fs_fb = None
    if not args.no_bwd:
        qs, ks, vs = (t.detach().requires_grad_() for t in (qs, ks, vs))
        fs_fb = bench_ms(lambda: flex(qs, ks, vs).backward(dos), grad_to_none=[qs, ks, vs])
    return dict(fs_f=fs_f, fs_fb=fs_fb, perm_ms=perm_ms, blocks_sh="{:.2f} ({:.2f})".format(*blocks_visited(bm)))


def _stamp() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def merged_rows(rows, args):
    """With --append, the rows of earlier runs (saved next to the table as
    <out>.json) that this run did not measure, then this run's; every row keeps
    the date of its run. A table too long for one call is built over several."""
    path = args.out + ".json"
    keys = {row_key(r) for r in rows}
    prev = []
    if args.append and os.path.exists(path):
        with open(path) as fh:
            prev = [r for r in json.load(fh) if row_key(r) not in keys]
        for r in prev:
            here = (torch.cuda.get_device_name(), torch.__version__, args.shift_tile, args.sinks)
            there = (r["device"], r["torch"], r.get("shift_tile"), r.get("sinks"))
            if here != there:
                raise SystemExit(
                    f"--append: {path} holds rows of (device, torch, shift tile, sinks) = {there}, "
                    f"this run is {here}"
                )
    return sorted(prev + rows, key=row_key)


def row_key(r) -> tuple:
    """A row is one (shape, layout, N, ratio); rows written before the shape columns
    existed were all H=32 (MHA), D=128, [B, H, N, D] inputs."""
    h = r.get("heads", 32)
    return (r.get("layout", "bhnd"), r.get("dim", 128), h, r.get("kv_heads", h), -r["window"], r["n"], r["r"])


def write_table(rows, args, final=False):
    rows = merged_rows(rows, args)
    with open(args.out + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    lines = [
        "# Gist attention speed",
        "",
        f"- device: {torch.cuda.get_device_name()}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, date {', '.join(sorted({r['date'] for r in rows}))}",
        f"- B=1, bf16, {args.sinks} sinks; times are medians in ms "
        f"(triton.testing.do_bench, {WARMUP_MS} ms warmup, {REP_MS} ms timed, L2 flushed before each call); "
        "all columns of a row measured in one run"
        + ("" if len({r["date"] for r in rows}) == 1 else " (rows from runs at the dates above, see the .json)"),
        "- TFLOP/s count only the mask's non-zeros: 4*D*nnz per head forward, 3.5x that for forward+backward",
        "- speedup columns: other method's time / unigist's time (>1 means unigist is faster)",
        "- H/Hkv: query/key-value heads (SDPA and Flex with enable_gqa where Hkv < H); layout `bhnd`: contiguous "
        "[B, H, N, D] tensors; `hf`: HF's [B, N, H, D] projections seen as [B, H, N, D] (transposed views, "
        "dout too), as the attention of a transformers model receives them",
        "",
        "| layout | H/Hkv | D | window | N | r | mask density | unigist fwd | TF/s | SDPA causal fwd | Flex fwd | vs SDPA | vs Flex "
        "| unigist fwd+bwd | TF/s | SDPA fwd+bwd | Flex fwd+bwd | vs SDPA | vs Flex |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = r.get("heads", 32)
        lines.append(
            f"| {r.get('layout', 'bhnd')} | {h}/{r.get('kv_heads', h)} | {r.get('dim', 128)} | {r['window']} | {r['n']} | {r['r']} | {r['density']:.3f} | {f(r['ug_f'])} | {f(r['tflops_f'], '{:.0f}')} "
            f"| {f(r['sdpa_f'])} | {f(r['fx_f'])} | {ratio(r['sdpa_f'], r['ug_f'])} | {ratio(r['fx_f'], r['ug_f'])} "
            f"| {f(r['ug_fb'])} | {f(r['tflops_fb'], '{:.0f}')} | {f(r['sdpa_fb'])} | {f(r['fx_fb'])} "
            f"| {ratio(r['sdpa_fb'], r['ug_fb'])} | {ratio(r['fx_fb'], r['ug_fb'])} |"
        )
    if any(r.get("fs_f") is not None for r in rows):
        lines += [
            "",
            f"FlexAttention (d) on the gist-shifted layout, tiles of {args.shift_tile} positions (inputs permuted "
            "outside the timing; `permute` is that gather of q, k, v plus the scatter of the output, timed alone). "
            "Blocks: share of the causal 128x128 blocks each block mask visits (in brackets the share of those "
            "that evaluate the mask).",
            "",
            "| N | r | blocks interleaved | blocks shifted | Flex shifted fwd | Flex shifted / unigist "
            "| Flex shifted fwd+bwd | Flex shifted / unigist | permute |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("fs_f") is None:
                continue
            lines.append(
                f"| {r['n']} | {r['r']} | {r['blocks_il'] or '-'} | {r['blocks_sh'] or '-'} | {f(r['fs_f'])} "
                f"| {ratio(r['fs_f'], r['ug_f'])} | {f(r['fs_fb'])} | {ratio(r['fs_fb'], r['ug_fb'])} "
                f"| {f(r['perm_ms'])} |"
            )
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    if final:
        print(text)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--ratio", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument(
        "--layout",
        default="bhnd",
        choices=["bhnd", "hf"],
        help="hf: q/k/v/dout are transposed views of [B, N, H, D] tensors, as HF attention gets them",
    )
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--no-flex", action="store_true", help="leave out both Flex columns")
    ap.add_argument("--no-flex-shifted", action="store_true", help="leave out Flex on the shifted layout")
    ap.add_argument(
        "--shift-tile",
        type=int,
        default=4096,
        help="tile of the gist shift for Flex (d); at 32k r=4 tiles of 1024/2048/4096/8192 leave 32/33/30/28%% "
        "of the causal blocks, 52/36/29/25%% of them partial",
    )
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a kernel-time table of one fwd+bwd and exit")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of earlier runs in --out (from <out>.json) that this run does not measure",
    )
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "attention.md")
    )
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    dev = torch.device("cuda")
    dt = torch.bfloat16
    H, D = args.heads, args.dim
    Hkv = args.kv_heads or H
    if H % Hkv:
        raise SystemExit(f"--heads {H} is not a multiple of --kv-heads {Hkv}")
    gqa = Hkv != H

    def inputs(n, heads, grad):
        """A [1, heads, n, D] tensor (a transposed view for --layout hf) and its leaf."""
        if args.layout == "hf":
            leaf = torch.randn(1, n, heads, D, device=dev, dtype=dt, requires_grad=grad)
            return leaf.transpose(1, 2), leaf
        leaf = torch.randn(1, heads, n, D, device=dev, dtype=dt, requires_grad=grad)
        return leaf, leaf

    rows = []
    stamp = _stamp()
    sdpa_cache = {}
    if args.profile:
        n, cfg = args.n[-1], GistConfig(ratio=args.ratio[0], window=args.window, num_sink=args.sinks)
        q, k, v = (torch.randn(1, H, n, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        for _ in range(3):
            unigist.gist_attention(q, k, v, cfg).backward(dout)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                unigist.gist_attention(q, k, v, cfg).backward(dout)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        return 0
    for n in args.n:
        (q, ql), (k, kl), (v, vl) = inputs(n, H, True), inputs(n, Hkv, True), inputs(n, Hkv, True)
        dout, _ = inputs(n, H, False)
        leaves = [ql, kl, vl]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        with torch.no_grad():
            sdpa_f = bench_ms(lambda: sdpa(q, k, v))
        sdpa_fb = None
        if not args.no_bwd:
            sdpa_fb = bench_ms(lambda: sdpa(q, k, v).backward(dout), grad_to_none=leaves)
        sdpa_cache[n] = (sdpa_f, sdpa_fb)
        for r in args.ratio:
            cfg = GistConfig(ratio=r, window=args.window, num_sink=args.sinks)
            nnz = mask_nnz(n, cfg)
            with torch.no_grad():
                ug_f = bench_ms(lambda: unigist.gist_attention(q, k, v, cfg))
            ug_fb = None
            if not args.no_bwd:
                ug_fb = bench_ms(lambda: unigist.gist_attention(q, k, v, cfg).backward(dout), grad_to_none=leaves)
            fx_f = fx_fb = None
            shifted = dict(fs_f=None, fs_fb=None, perm_ms=None, blocks_il=None, blocks_sh=None)
            if not args.no_flex:
                flex, bm = make_flex(cfg, n, dev, gqa)
                with torch.no_grad():
                    fx_f = bench_ms(lambda: flex(q, k, v))
                if not args.no_bwd:
                    fx_fb = bench_ms(lambda: flex(q, k, v).backward(dout), grad_to_none=leaves)
                if not args.no_flex_shifted:
                    if gqa or args.layout != "bhnd":
                        raise SystemExit("Flex on the shifted layout is measured for MHA bhnd only: add --no-flex-shifted")
                    shifted.update(bench_flex_shifted(cfg, n, args, q, k, v, dout, dev))
                    shifted["blocks_il"] = "{:.2f} ({:.2f})".format(*blocks_visited(bm))
            flops_f = 4.0 * D * nnz * H
            row = dict(
                n=n,
                r=r,
                density=nnz / (n * (n + 1) / 2),
                ug_f=ug_f,
                ug_fb=ug_fb,
                sdpa_f=sdpa_f,
                sdpa_fb=sdpa_fb,
                fx_f=fx_f,
                fx_fb=fx_fb,
                tflops_f=flops_f / ug_f * 1e-9,
                tflops_fb=(3.5 * flops_f / ug_fb * 1e-9) if ug_fb else None,
                **shifted,
                date=stamp,
                device=torch.cuda.get_device_name(),
                torch=torch.__version__,
                shift_tile=args.shift_tile,
                window=args.window,
                sinks=args.sinks,
                heads=H,
                kv_heads=Hkv,
                dim=D,
                layout=args.layout,
            )
            rows.append(row)
            write_table(rows, args)
            print(
                f"N={n:6d} r={r} density={row['density']:.3f} unigist fwd {ug_f:.3f} ms "
                f"({row['tflops_f']:.0f} TF/s)  sdpa {sdpa_f:.3f}  flex {fx_f}  | fwd+bwd unigist {ug_fb} "
                f"sdpa {sdpa_fb} flex {fx_fb} | flex shifted {shifted['fs_f']} / {shifted['fs_fb']} "
                f"(permute {shifted['perm_ms']})",
                flush=True,
            )
        del q, k, v, dout, leaves, ql, kl, vl
        torch.cuda.empty_cache()

    write_table(rows, args, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
