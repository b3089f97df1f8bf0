"""What the CUDA forward's tiling costs beyond the mask, counted on the host (no GPU): key blocks
per head, the share of executed (query, key) pairs the mask does not need, and the K/V bytes the
query tiles read from L2, with the kernels' key visit (unigist.layout.tile_visit: sinks, gists,
then the local range, each cut into blocks of --block-keys).
    python benchmarks/block_waste.py --n 32768 --ratio 4
(NOTES v20: 8690 blocks per head, 3.7% waste, 18.2 GB per forward at 32 heads, D=128.)"""

import argparse
import math
import os
import sys

# runnable from a source checkout without installing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unigist import GistConfig  # noqa: E402
from unigist.layout import mask_nnz, tile_visit  # noqa: E402


def block_waste(n: int, config: GistConfig, tile_rows: int, block_keys: int) -> tuple[int, float]:
    """Key blocks per head and the executed pairs' share beyond the mask's non-zeros."""
    blocks = 0
    for q_lo in range(0, n, tile_rows):
        tv = tile_visit(q_lo, min(q_lo + tile_rows, n) - 1, n, config)
        blocks += (math.ceil(tv.sink_end / block_keys) + math.ceil((tv.gist_end - tv.gist_begin) / block_keys)
                   + math.ceil((tv.local_hi - tv.local_lo) / block_keys))
    executed = blocks * tile_rows * block_keys  # a partial last tile still runs full rows
    return blocks, 1 - mask_nnz(n, n, config) / executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--tile-rows", type=int, default=128, help="query rows per CTA (D=128: 2 x 64)")
    parser.add_argument("--block-keys", type=int, default=128)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    config = GistConfig(ratio=args.ratio, window=args.window, num_sink=args.sinks)
    blocks, waste = block_waste(args.n, config, args.tile_rows, args.block_keys)
    kv_bytes = blocks * args.block_keys * args.dim * 2 * 2 * args.heads  # K and V, 2-byte elements
    print(f"N={args.n} r={args.ratio} window={args.window} sinks={args.sinks}: {blocks} key blocks per head, "
          f"executed pairs {100 * waste:.1f}% beyond the mask, K/V read per forward {kv_bytes / 1e9:.1f} GB "
          f"({args.heads} heads, D={args.dim}, 16-bit)")


if __name__ == "__main__":
    main()
