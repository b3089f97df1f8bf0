"""Are two builds' CUDA attention kernels bitwise the same? For a change that should not move a
single bit (an instruction-count change, a refactor), run `save` in each tree (fixed seed, so
the same inputs), then `compare`:
    (cd A && PYTHONPATH=$PWD python3 benchmarks/device/diag_bitwise.py save /tmp/a.pt)
    (cd B && PYTHONPATH=$PWD python3 benchmarks/device/diag_bitwise.py save /tmp/b.pt)
    python3 benchmarks/device/diag_bitwise.py compare /tmp/a.pt /tmp/b.pt
Covers the forward, both backward kernels and the cache forward, on both CUDA paths (wgmma and
mma.sync), bf16 and fp16, D 64 and 128, [B, H, N, D] tensors and HF's transposed views."""

import math
import os
import sys

import torch

# (heads, kv heads, queries, keys, q_offset, head dim, ratio, window, sinks)
CASES = [
    (2, 2, 300, 300, 0, 128, 4, 64, 5),
    (4, 1, 130, 1030, 900, 128, 4, 128, 9),
    (4, 2, 1000, 1000, 0, 64, 8, 200, 64),
    (8, 2, 4096, 4096, 0, 128, 4, 1024, 128),
    (8, 2, 4096, 4096, 0, 64, 4, 1024, 128),
]


def tensors(hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, hf: bool):
    """q, k, v, dout; with hf, transposed views of [1, N, H, D] tensors."""

    def make(h: int, n: int) -> torch.Tensor:
        if hf:
            return torch.randn(1, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        return torch.randn(1, h, n, d, device="cuda", dtype=dtype)

    return make(hq, nq), make(hkv, nk), make(hkv, nk), make(hq, nq)


def save(path: str) -> None:
    import unigist  # noqa: F401  (registers torch.ops.unigist; `compare` runs without it)

    torch.manual_seed(0)
    results = {}
    for force_sm80 in ("0", "1"):
        os.environ["UNIGIST_FORCE_SM80"] = force_sm80
        for dtype in (torch.bfloat16, torch.float16):
            for hf in (False, True):
                for case in CASES:
                    hq, hkv, nq, nk, off, d, r, w, s = case
                    q, k, v, dout = tensors(hq, hkv, nq, nk, d, dtype, hf)
                    scale = 1 / math.sqrt(d)
                    out, lse = torch.ops.unigist.gist_attention_fwd(q, k, v, r, w, s, scale, off)
                    grads = torch.ops.unigist.gist_attention_bwd(dout, q, k, v, out, lse, r, w, s, scale, off)
                    name = f"sm80={force_sm80} {str(dtype)[6:]} hf={hf} {case}"
                    for label, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
                        results[f"{name} {label}"] = t.cpu()
                    if off == 0 and not hf:
                        # The cache forward over the same keys: no sinks or gists kept apart,
                        # the whole sequence as the tail.
                        cout, clse = torch.ops.unigist.gist_attention_cache_fwd(
                            q, k, v, r, w, s, scale, 0, 0, 0, 0, 0)
                        results[f"{name} cache_out"] = cout.cpu()
                        results[f"{name} cache_lse"] = clse.cpu()
    torch.cuda.synchronize()
    torch.save(results, path)
    print(f"saved {len(results)} tensors to {path}")


def compare(path_a: str, path_b: str) -> int:
    a, b = torch.load(path_a), torch.load(path_b)
    if a.keys() != b.keys():
        print(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
        return 1
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    print(f"bitwise: {len(a) - len(differ)} of {len(a)} tensors equal")
    for key in differ[:10]:
        print(f"  differs: {key}: max abs diff {(a[key].double() - b[key].double()).abs().max().item():.3e}")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
