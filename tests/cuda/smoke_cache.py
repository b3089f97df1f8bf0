"""Small compressed-cache forwards on CUDA (prefill chunk, decode with and without
split-KV, strided inputs) for compute-sanitizer; prints the relative error
against the float32 reference, asserts nothing.
    compute-sanitizer --tool memcheck python3 tests/cuda/smoke_cache.py"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from unigist import GistConfig, gist_attention  # noqa: E402
from unigist.layout import KeyLayout, key_positions, num_gists  # noqa: E402
from unigist.reference import gist_attention_reference  # noqa: E402


def main():
    torch.manual_seed(0)
    cfg = GistConfig(ratio=4, window=100, num_sink=16)
    t0 = 701  # position 700 is raw and outside the window of a query at 801
    g0 = num_gists(16, cfg)
    kl = KeyLayout(16, num_gists(t0, cfg) - g0, g0, t0)
    # (600 queries x 32 heads fill an H200: the wgmma path there)
    for nq, splits in ((130, None), (1, "1"), (1, "5"), (2, None), (600, None)):
        if splits:
            os.environ["UNIGIST_CACHE_SPLITS"] = splits
        else:
            os.environ.pop("UNIGIST_CACHE_SPLITS", None)
        seen = 801
        nk = 16 + kl.cache_gists + (seen - t0) + nq
        for d in (64, 128):
            hq = 32 if nq == 600 else 8
            q = torch.randn(1, nq, hq, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
            kb = torch.randn(1, 2, nk + 9, d, dtype=torch.bfloat16, device="cuda")
            vb = torch.randn(1, 2, nk + 9, d, dtype=torch.bfloat16, device="cuda")
            k, v = kb[:, :, :nk], vb[:, :, :nk]
            out = gist_attention(q, k, v, cfg, q_offset=seen, key_layout=kl)
            ref = gist_attention_reference(q, k, v, cfg, q_offset=seen, dtype=torch.float32,
                                           k_positions=key_positions(kl, nk, cfg, device="cuda"))
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"nq={nq} d={d} splits={splits or 'auto'}: rel err {err:.2e}")


if __name__ == "__main__":
    main()
