"""One gist attention forward (and optionally backward) at a benchmark shape, for ncu /
compute-sanitizer on the device:
    ncu --clock-control none -k regex:gist_attn_fwd_sm90 -c 1 --set full python3 benchmarks/device/profile_fwd_device.py
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="calls (ncu -s N skips the first N launches)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = GistConfig(ratio=a.ratio, window=a.window, num_sink=128)
    n = a.n  # positions (raw tokens and gists), as bench_attention.py's N
    q, k, v = (
        torch.randn(1, h, n, a.dim, device="cuda", dtype=torch.bfloat16, requires_grad=a.bwd)
        for h in (a.heads, a.kv_heads or a.heads, a.kv_heads or a.heads)
    )
    for _ in range(a.repeat):
        out = unigist.gist_attention(q, k, v, cfg, softmax_scale=1 / math.sqrt(a.dim))
        if a.bwd:
            out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("ok", out.shape, torch.isnan(out).any().item())
    return 0


if __name__ == "__main__":
    sys.exit(main())
