"""Quick device smoke test of both backward paths (wgmma dQ and dK/dV, and
mma.sync; prints, does not assert): relative error of dq, dk, dv against the
float64 reference.
    python3 tests/cuda/smoke_bwd.py
With the argument "quick": default path, bf16 only, no reference (for
compute-sanitizer)."""

import math
import os
import sys

import torch

from smoke_fwd import CASES, rel  # also puts the repo root on sys.path

# + sinks ending inside a 64-key consumer of the wgmma dK/dV kernel, a window
# that is not a multiple of the 64-row query tile, GQA 4.
BWD_CASES = CASES + [(4, 1, 1500, 1500, 0, 128, 4, 100, 200)]
from unigist import GistConfig
from unigist.reference import gist_attention_reference


def main():
    torch.manual_seed(0)
    quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    for path in ("0",) if quick else ("0", "1"):
        os.environ["UNIGIST_FORCE_SM80"] = path
        arch = torch.ops.unigist.gist_attention_fwd_arch(torch.empty(1, device="cuda"))
        for dtype in dtypes:
            for hq, hkv, nq, nk, off, d, r, w, s in BWD_CASES:
                cfg = GistConfig(ratio=r, window=w, num_sink=s)
                q = torch.randn(1, hq, nq, d, device="cuda", dtype=dtype)
                k = torch.randn(1, hkv, nk, d, device="cuda", dtype=dtype)
                v = torch.randn(1, hkv, nk, d, device="cuda", dtype=dtype)
                dout = torch.randn_like(q)
                scale = 1 / math.sqrt(d)
                out, lse = torch.ops.unigist.gist_attention_fwd(q, k, v, r, w, s, scale, off)
                dq, dk, dv = torch.ops.unigist.gist_attention_bwd(dout, q, k, v, out, lse, r, w, s, scale, off)
                torch.cuda.synchronize()
                if quick:
                    print(f"arch {arch} nq{nq} nk{nk} d{d}: nan {torch.isnan(dq).any().item()}", flush=True)
                    continue
                q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
                gist_attention_reference(q64, k64, v64, cfg, q_offset=off).backward(dout.double())
                print(
                    f"arch {arch} {str(dtype)[6:]:8s} hq{hq} hkv{hkv} nq{nq} nk{nk} off{off} d{d} r{r} w{w} s{s}: "
                    f"dq {rel(dq, q64.grad):.2e} dk {rel(dk, k64.grad):.2e} dv {rel(dv, v64.grad):.2e}"
                    f"  nan {torch.isnan(dq).any().item()}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
