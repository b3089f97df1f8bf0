"""What does a CTA cost beyond its key blocks? (device diagnostic, H200)

The wgmma kernels launch one CTA per query tile (forward, dQ) or key block
(dK/dV); each starts cold (Q load, pipeline fill) and ends with an epilogue no
GEMM overlaps, since shared memory allows one CTA per SM. A persistent grid
would hide part of that. This sweeps the window at N=32k, D=128, 32 heads,
ratio 64 (few gists) and no sinks, times each kernel alone (CUDA-graph
replay of one call; dQ and dK/dV on one stream), and fits
    time = (tiles * c_tile + blocks * c_block) / SMs
for the forward and dQ over the exact (tile, key block) counts of
layout::tile_visit, so c_tile / c_block says how many key blocks' worth of
time each CTA spends outside its main loop.

    python3 benchmarks/device/diag_cta_cost.py          # the fit above
    python3 benchmarks/device/diag_cta_cost.py --dense  # dK/dV passes per launch, ratio 4

Found (H200, 2026-12-03, NOTES v16): forward c_tile ~2.9 key blocks (7.9% of the
32k r=4 forward), dQ ~3.6 (5.1%); the dK/dV dense pass ~20 us per block beyond its
~2.07 us steps, the gist pass at the step rate. A persistent dK/dV kernel hid the
launch and K/V loads: dense pass -7% at w1024, gist pass +1%, fwd+bwd -1.0-1.3%;
the rest is the consumers' ramp.
"""

import os

os.environ["UNIGIST_CUDA_CONCURRENT_DQ"] = "0"

import torch

import unigist
from graph_timing import graph_replay_ms  # this script's folder
from unigist import GistConfig

N, H, D, RATIO, SINKS = 32768, 32, 128, 64, 0
WINDOWS = [128, 256, 512, 1024, 2048, 4096]


def blocks_of(n, window, bm, bn, ratio=RATIO, sinks=SINKS):
    """(tiles, key blocks) per head of a tile walk with bm queries, bn keys (KeyBlocks)."""
    tiles = blocks = 0
    for q_lo in range(0, n, bm):
        q_hi = min(n, q_lo + bm) - 1
        key_end = q_hi + 1
        sink_end = min(sinks, key_end)
        local_lo = min(max(sink_end, q_lo - window + 1), key_end)
        g0 = sink_end // (ratio + 1)
        g1 = max(g0, local_lo // (ratio + 1))
        blocks += -(-sink_end // bn) + -(-(g1 - g0) // bn) + -(-(key_end - local_lo) // bn)
        tiles += 1
    return tiles, blocks


def short_name(kernel):
    return next((n for n in ("fwd", "dq", "dkdv", "delta") if n in kernel), kernel[:40])


def launches_ms(fn, reps=10):
    """Mean device time of each kernel launch of one call, in launch order (profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "gist" in e.name),
                key=lambda e: e.time_range.start)
    per = len(ev) // reps
    return [
        (short_name(ev[i].name), sum(ev[r * per + i].time_range.elapsed_us() for r in range(reps)) / reps / 1e3)
        for i in range(per)
    ]


def kernel_ms(fn):
    """Device time per call of each kernel (launches of one kernel summed)."""
    out = {}
    for name, ms in launches_ms(fn):
        out[name] = out.get(name, 0.0) + ms
    return out


def fwd_bwd(cfg):
    """A forward+backward call on fresh [1, H, N, D] inputs, and its forward."""
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def fb():
        for x in (q, k, v):
            x.grad = None
        unigist.gist_attention(q, k, v, cfg).backward(dout)

    return fb, lambda: unigist.gist_attention(q, k, v, cfg)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "SMs", sms)
    rows = []
    print("| window | fwd ms (graph) | fwd+bwd ms (graph) | kernels ms (profiler) | fwd tiles, blocks / head | dq tiles, blocks / head |")
    print("|---|---|---|---|---|---|")
    for w in WINDOWS:
        fb, fwd = fwd_bwd(GistConfig(ratio=RATIO, window=w, num_sink=SINKS))
        with torch.no_grad():
            t_f = graph_replay_ms(fwd)
        t_fb = graph_replay_ms(fb)
        ks = kernel_ms(fb)
        ft = blocks_of(N, w, 128, 128)
        dt = blocks_of(N, w, 128, 64)
        rows.append((w, t_f, ks, ft, dt))
        kstr = ", ".join(f"{a} {b:.3f}" for a, b in sorted(ks.items()))
        print(f"| {w} | {t_f:.3f} | {t_fb:.3f} | {kstr} | {ft[0]}, {ft[1]} | {dt[0]}, {dt[1]} |", flush=True)
    fits = {}
    # Least squares: per-SM time = tiles * c_tile + blocks * c_block (all heads).
    for name, idx in (("fwd", 3), ("dq", 4)):
        A, y = [], []
        for r in rows:
            t, b = r[idx]
            if name not in r[2]:
                continue
            A.append([t * H / sms, b * H / sms])
            y.append(r[2][name] * 1e3)  # us
        if len(A) < 2:
            continue
        sol = torch.linalg.lstsq(torch.tensor(A, dtype=torch.float64), torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution
        c_tile, c_block = sol[0, 0].item(), sol[1, 0].item()
        fits[name] = (c_tile, c_block)
        print(f"{name}: c_tile {c_tile:.2f} us, c_block {c_block:.3f} us, c_tile / c_block = {c_tile / c_block:.2f} blocks")
        for r in rows:
            t, b = r[idx]
            if name in r[2]:
                fit = (t * c_tile + b * c_block) * H / sms / 1e3
                print(f"  window {r[0]}: measured {r[2][name]:.3f} ms, fit {fit:.3f}, CTA share {t * c_tile / (t * c_tile + b * c_block):.1%}")
    # The table's 32k row (ratio 4, window 1024, 128 sinks): the fit's CTA share there.
    fb, _ = fwd_bwd(GistConfig(ratio=4, window=1024, num_sink=128))
    ks = kernel_ms(fb)
    print("32k r=4 w1024 s128 kernels:", ", ".join(f"{a} {b:.3f} ms" for a, b in sorted(ks.items())))
    for name, (bm, bn) in (("fwd", (128, 128)), ("dq", (128, 64))):
        if name in fits and name in ks:
            t, b = blocks_of(N, 1024, bm, bn, ratio=4, sinks=128)
            c_tile, c_block = fits[name]
            fit = (t * c_tile + b * c_block) * H / sms / 1e3
            print(f"  {name}: {t} tiles, {b} blocks / head ({b / t:.1f} per tile); fit {fit:.3f} ms vs {ks[name]:.3f}; "
                  f"CTA share {t * c_tile / (t * c_tile + b * c_block):.1%}")


def dense_sweep():
    """The dK/dV launches (gist pass, dense pass) at the table's ratio 4 and 128 sinks."""
    print("| window | launches (ms, launch order) |")
    print("|---|---|")
    for w in (256, 512, 1024, 2048, 4096):
        fb, _ = fwd_bwd(GistConfig(ratio=4, window=w, num_sink=128))
        print(f"| {w} | " + ", ".join(f"{a} {b:.3f}" for a, b in launches_ms(fb)) + " |", flush=True)


if __name__ == "__main__":
    import sys

    if "--dense" in sys.argv:
        dense_sweep()
    else:
        main()
