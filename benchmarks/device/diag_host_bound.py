"""Is a small forward+backward bound by the host? (device diagnostic, H200)

The 4k window-256 fwd+bwd rows of results/attention.md move between ~0.50 and
~0.76 ms from run to run while SDPA's stay put. Hypothesis: at that size the
host's time per call (Python wrapper, autograd, op dispatch, launches) is about
the GPU's, so do_bench measures whichever is slower on that machine at that
moment. Per shape this prints:
  eager   do_bench median of the eager call (what the table reports)
  gpu     one CUDA-graph replay of the same call (GPU time, no host work)
  host    host time per call, measured while the GPU is held busy by a sleep
          kernel (so the host never waits for it)
for unigist and SDPA alike.

    python3 benchmarks/device/diag_host_bound.py
"""

import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import unigist
from graph_timing import graph_replay_ms  # this script's folder
from unigist import GistConfig


def inputs(layout, hq, hkv, n, d):
    def t(h):
        if layout == "hf":
            return torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        return torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = t(hq), t(hkv), t(hkv)
    dout = torch.randn_like(q)
    return q, k, v, dout


def host_ms(fn, calls=10):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time: the host never waits below
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return dt


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    shapes = [
        ("bhnd", 32, 8, 4096, 64, 256),
        ("hf", 32, 8, 4096, 64, 256),
        ("bhnd", 32, 8, 4096, 64, 1024),
        ("hf", 32, 32, 4096, 128, 1024),
        ("bhnd", 32, 32, 32768, 128, 1024),
    ]
    print("| layout | H/Hkv | D | window | N | method | eager ms | gpu ms (graph) | host ms/call | eager/gpu |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout, hq, hkv, n, d, w in shapes:
        cfg = GistConfig(ratio=4, window=w, num_sink=128)
        q, k, v, dout = inputs(layout, hq, hkv, n, d)
        leaves = [q, k, v]
        methods = {
            "unigist": lambda: unigist.gist_attention(q, k, v, cfg).backward(dout),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv).backward(
                dout
            ),
        }
        for name, fn in methods.items():
            for rnd in range(2):
                eager = do_bench(fn, warmup=250, rep=1500, grad_to_none=leaves, return_mode="median")
                host = host_ms(fn)
                gpu = graph_replay_ms(fn, rep=500, grad_to_none=leaves)
                print(
                    f"| {layout} | {hq}/{hkv} | {d} | {w} | {n} | {name} (round {rnd + 1}) | {eager:.3f} | {gpu:.3f} | "
                    f"{host:.3f} | {eager / gpu:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
