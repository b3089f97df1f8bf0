"""CUDA attention over a compressed GistCache: the compressed-cache kernel
(gist_attention_cache_fwd) against what unigist.hf ran before it, SDPA over the
cache with a positions mask (no mask for a decode step that sees every key).

Per (model shape, context): a decode step (1 query) and a prefill chunk after
eviction. Inputs are laid out as in generation: q a transposed view of
[B, N, H, D], k/v the first rows of a [B, H, capacity, D] buffer. Times are GPU
times per call from CUDA-graph replay (no launch overhead), median of repeats.

    python3 benchmarks/bench_cache_cuda.py --out benchmarks/results/attention_cache_cuda.md
"""

import argparse
import datetime
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402
from unigist.hf import _additive_mask, _sdpa  # noqa: E402
from unigist.layout import KeyLayout, key_positions, keep_for_future, num_gists  # noqa: E402


def gpu_time_ms(fn, iters=20, reps=7):
    """Median GPU time of one fn() call, from replays of a graph of `iters` calls
    (eager timing of the same loop when capture fails)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)")
        graph = None

        def run():
            for _ in range(iters):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return statistics.median(times)


def cache_state(cfg: GistConfig, seen: int, chunk: int):
    """KeyLayout and key rows of a cache evicted (strictly) for the query at `seen`,
    with `chunk` new positions appended."""
    t0 = seen - cfg.window + 1
    while t0 > cfg.num_sink and bool(keep_for_future(torch.tensor([t0 - 1]), seen, cfg)):
        t0 -= 1
    if t0 <= cfg.num_sink:
        return KeyLayout(), seen + chunk
    g0 = num_gists(cfg.num_sink, cfg)
    kl = KeyLayout(cfg.num_sink, num_gists(t0, cfg) - g0, g0, t0)
    return kl, cfg.num_sink + kl.cache_gists + (seen - t0) + chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768,131072", help="positions seen before the call")
    ap.add_argument("--chunks", default="1,2,4096", help="queries per call (1-2: decode; larger: a prefill chunk)")
    ap.add_argument("--shapes", default="32/8/128,32/4/64", help="Hq/Hkv/D")
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--num-sink", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = GistConfig(ratio=args.ratio, window=args.window, num_sink=args.num_sink)
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    rows = []
    for shape in args.shapes.split(","):
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for seen in (int(x) for x in args.contexts.split(",")):
            for nq in (int(x) for x in args.chunks.split(",")):
                kl, nk = cache_state(cfg, seen, nq)
                torch.manual_seed(0)
                q = torch.randn(1, nq, hq, d, dtype=dtype, device=dev).transpose(1, 2)
                kbuf = torch.randn(1, hkv, nk + 256, d, dtype=dtype, device=dev)
                vbuf = torch.randn(1, hkv, nk + 256, d, dtype=dtype, device=dev)
                k, v = kbuf[:, :, :nk], vbuf[:, :, :nk]
                scale = 1.0 / math.sqrt(d)
                kpos = key_positions(kl, nk, cfg, device=dev)
                mask = _additive_mask(kpos[-nq:], kpos, cfg, dtype)
                all_visible = bool((mask == 0).all())
                op = torch.ops.unigist.gist_attention_cache_fwd

                def kern():
                    return op(q, k, v, cfg.ratio, cfg.window, cfg.num_sink, scale, seen, *kl)[0]

                def sdpa_mask():
                    return _sdpa(q, k, v, mask, scale)

                def sdpa_nomask():
                    return _sdpa(q, k, v, None, scale)

                ref = sdpa_mask().float()
                err = (kern().float() - ref).norm().item() / ref.norm().item()
                t_kern = gpu_time_ms(kern)
                os.environ["UNIGIST_CACHE_SPLITS"] = "1"
                t_kern1 = gpu_time_ms(kern)
                del os.environ["UNIGIST_CACHE_SPLITS"]
                # The mma.sync kernel alone (a prefill chunk takes the wgmma forward on sm_90a).
                os.environ["UNIGIST_FORCE_SM80"] = "1"
                t_sm80 = gpu_time_ms(kern)
                del os.environ["UNIGIST_FORCE_SM80"]
                t_mask = gpu_time_ms(sdpa_mask)
                # What hf.py ran: no mask when the one query sees every key.
                t_hf = gpu_time_ms(sdpa_nomask) if (nq == 1 and all_visible) else t_mask
                # Bytes of K and V the kernel must read (each row once per key head).
                mb = 2 * nk * hkv * d * 2 / 1e6
                row = dict(shape=f"{hq}/{hkv}/{d}", seen=seen, nq=nq, nk=nk, kern=t_kern, kern1=t_kern1, sm80=t_sm80,
                           mask=t_mask, hf=t_hf, err=err, gbs=mb / 1e3 / (t_kern / 1e3))
                rows.append(row)
                print(
                    f"Hq/Hkv/D={row['shape']} seen={seen} nq={nq} nk={nk}: kernel {t_kern*1e3:.1f} us "
                    f"(splits=1: {t_kern1*1e3:.1f}, mma.sync: {t_sm80*1e3:.1f}), SDPA+mask {t_mask*1e3:.1f} us, hf before {t_hf*1e3:.1f} us, "
                    f"speedup vs hf {t_hf/t_kern:.2f}x, K/V read {row['gbs']:.0f} GB/s, rel err {err:.1e}",
                    flush=True,
                )
    if args.out:
        props = torch.cuda.get_device_properties(0)
        lines = [
            "# Compressed-cache attention on CUDA: kernel vs SDPA with a positions mask",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- device: {props.name}; torch {torch.__version__}; bf16, B=1",
            f"- layout: ratio {cfg.ratio}, window {cfg.window}, num_sink {cfg.num_sink}; cache evicted (strict) "
            "for the first query of the call, then the call's queries appended",
            "- times: GPU time per call (CUDA-graph replay of 20 calls, median of 7); `kernel` is "
            "`gist_attention_cache_fwd` as dispatched (wgmma forward for chunks that fill the GPU, else mma.sync with "
            "its split-KV heuristic), `splits=1` without split-KV, `mma.sync` with UNIGIST_FORCE_SM80=1; "
            "`hf before` is what unigist.hf ran on CUDA before the kernel (SDPA over the cache, no mask for a "
            "decode step that sees every key, else an additive positions mask, built once per forward)",
            "- produced by `python3 benchmarks/bench_cache_cuda.py --out ...`",
            "",
            "| Hq/Hkv/D | seen | queries | keys | kernel (us) | splits=1 (us) | mma.sync (us) | SDPA+mask (us) "
            "| hf before (us) | speedup vs hf before | K/V GB/s | rel err vs SDPA |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['shape']} | {r['seen']} | {r['nq']} | {r['nk']} | {r['kern']*1e3:.1f} | {r['kern1']*1e3:.1f} "
                f"| {r['sm80']*1e3:.1f} "
                f"| {r['mask']*1e3:.1f} | {r['hf']*1e3:.1f} | {r['hf']/r['kern']:.2f}x | {r['gbs']:.0f} "
                f"| {r['err']:.1e} |"
            )
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
