"""Where a CUDA-graph decode step of unigist.generate spends its time (the 1.1B model of
bench_generate.py, bf16, on the GPU): host time per phase (prepare = eviction and row
bookkeeping, the graph replay until the GPU is done, sampling), then torch.profiler's kernel table.

    python3 benchmarks/device/profile_decode_device.py [--context 8192] [--new-tokens 64]
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import unigist  # noqa: E402
import unigist.generation as gen  # noqa: E402
from bench_generate import model_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(model_config("gpu")).to(torch.bfloat16).eval()
    unigist.patch_model(model, None, unigist.GistConfig(ratio=4, window=1024, num_sink=128))
    ids = torch.randint(0, 30000, (args.context,), device="cuda")
    kw = dict(max_new_tokens=args.new_tokens, chunk_size=args.chunk, progress=False, eos_token_id=[])
    unigist.generate(model, ids, **kw)  # warm-up

    acc = defaultdict(float)
    calls = defaultdict(int)
    first = defaultdict(list)  # the first calls' times: a step's first call also captures its graph

    def timed(name, fn, sync=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if sync:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            acc[name] += dt
            calls[name] += 1
            if len(first[name]) < 6:
                first[name].append(round(1e3 * dt, 2))
            return out
        return wrapper

    real_prepare, real_call, real_sample = gen.GistCacheStep.prepare, gen._StaticDecoder.__call__, gen._Sampler.__call__
    gen.GistCacheStep.prepare = timed("prepare", real_prepare)
    gen._StaticDecoder.__call__ = timed("step (prepare + replay, synced)", real_call, sync=True)
    gen._Sampler.__call__ = timed("sample", real_sample)
    for graph, attention in ((True, "kernel"), (True, "sdpa"), (False, "-"), (True, "kernel")):
        acc.clear(), calls.clear(), first.clear()
        gen.GRAPH_ATTENTION = attention
        t = time.perf_counter()
        r = unigist.generate(model, ids, cuda_graph=graph, **kw)
        total = time.perf_counter() - t
        print(f"\ncuda_graph={graph}, attention in the graph {attention}: decode {r.decode_tokens_per_s:.1f} tok/s, "
              f"{1e3 * r.decode_seconds / max(1, len(r.ids)):.2f} ms per token; total {total:.2f} s")
        for name in acc:
            print(f"  {name:34s} {1e3 * acc[name] / max(1, calls[name]):7.3f} ms x {calls[name]}; first calls "
                  f"{first[name]} ms")
    gen.GistCacheStep.prepare, gen._StaticDecoder.__call__, gen._Sampler.__call__ = real_prepare, real_call, real_sample
    gen.GRAPH_ATTENTION = "kernel"

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        unigist.generate(model, ids, **kw)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    key = "self_cuda_time_total" if hasattr(ka[0], "self_cuda_time_total") else "self_device_time_total"
    print(ka.table(sort_by=key, row_limit=30, max_name_column_width=90))


if __name__ == "__main__":
    main()
