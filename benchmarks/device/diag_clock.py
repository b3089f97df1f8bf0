"""Does the 32k forward slow down as the GPU heats? Times N back-to-back calls of the
gist attention forward (CUDA events per call) while nvidia-smi samples the SM clock and
power every 50 ms, after an idle second; prints the per-call times at a few points and the
clock/power samples. Run on the device:  python3 benchmarks/device/diag_clock.py --calls 400
"""

import argparse
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--sdpa", action="store_true", help="time dense causal SDPA instead")
    a = ap.parse_args(argv)
    cfg = GistConfig(ratio=4, window=1024, num_sink=128)
    q, k, v = (torch.randn(1, 32, a.n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if a.sdpa:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        fn = lambda: unigist.gist_attention(q, k, v, cfg, softmax_scale=1 / math.sqrt(128))  # noqa: E731
    fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader", "-lms", "50"],
        stdout=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.calls)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    time.sleep(0.3)
    smi.terminate()
    samples = smi.communicate()[0].strip().splitlines()
    ms = [s.elapsed_time(e) for s, e in ev]
    for i in (0, 1, 2, 5, 10, 20, 50, 100, 200, 300, len(ms) - 1):
        if i < len(ms):
            print(f"call {i:4d}: {ms[i]:.3f} ms")
    print("smi (timestamp, SM MHz, W, C):")
    for line in samples[:: max(1, len(samples) // 30)]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
