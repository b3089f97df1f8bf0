"""Quick device smoke test of both forward kernels (prints, does not assert):
relative error against the float64 reference per path, shape and dtype.
    python3 tests/cuda/smoke_fwd.py"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import unigist  # noqa: E402,F401  (loads the ops)
from unigist import GistConfig  # noqa: E402
from unigist.reference import gist_attention_reference  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# (hq, hkv, nq, nk, q_offset, d, ratio, window, num_sink); also used by smoke_bwd.py
CASES = [
    (2, 2, 64, 64, 0, 128, 4, 16, 0),
    (2, 2, 300, 300, 0, 128, 4, 64, 5),
    (4, 2, 1000, 1000, 0, 64, 8, 200, 64),
    (4, 1, 130, 1030, 900, 128, 4, 128, 9),
    (2, 2, 2053, 2053, 0, 128, 4, 256, 128),
]


def main():
    torch.manual_seed(0)
    for path in ("0", "1"):
        os.environ["UNIGIST_FORCE_SM80"] = path
        arch = torch.ops.unigist.gist_attention_fwd_arch(torch.empty(1, device="cuda"))
        for dtype in (torch.bfloat16, torch.float16):
            for hq, hkv, nq, nk, off, d, r, w, s in CASES:
                cfg = GistConfig(ratio=r, window=w, num_sink=s)
                q = torch.randn(1, hq, nq, d, device="cuda", dtype=dtype)
                k = torch.randn(1, hkv, nk, d, device="cuda", dtype=dtype)
                v = torch.randn(1, hkv, nk, d, device="cuda", dtype=dtype)
                out, lse = torch.ops.unigist.gist_attention_fwd(q, k, v, r, w, s, 1 / math.sqrt(d), off)
                torch.cuda.synchronize()
                ref, ref_lse = gist_attention_reference(q, k, v, cfg, q_offset=off, return_lse=True)
                print(
                    f"arch {arch} {str(dtype)[6:]:8s} hq{hq} hkv{hkv} nq{nq} nk{nk} off{off} d{d} r{r} w{w} s{s}: "
                    f"out rel err {rel(out, ref):.2e}  lse max err {(lse.double() - ref_lse.double()).abs().max().item():.2e}"
                    f"  nan {torch.isnan(out).any().item()}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
