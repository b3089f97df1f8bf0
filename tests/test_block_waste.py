"""benchmarks/block_waste.py counts the CUDA forward's key blocks and the pairs they execute
beyond the mask (NOTES v20 quotes it)."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from block_waste import block_waste  # noqa: E402

from unigist import GistConfig  # noqa: E402
from unigist.reference import gist_mask  # noqa: E402


def test_causal_case_by_hand():
    # Window past the sequence, no sinks: tile 0 runs keys [0, 128) (1 block), tile 1 keys
    # [0, 256) (2 blocks); the mask is causal.
    blocks, waste = block_waste(256, GistConfig(ratio=4, window=1024, num_sink=0), 128, 128)
    assert blocks == 3
    assert waste == pytest.approx(1 - (256 * 257 // 2) / (3 * 128 * 128))


def test_one_row_one_key_blocks_execute_only_the_mask(seed):
    # With 1-row tiles and 1-key blocks every visited key is visible: the sinks, the gists
    # before the window and the window itself, so nothing beyond the mask runs.
    rng = random.Random(seed)
    n = rng.randrange(50, 200)
    config = GistConfig(ratio=rng.randrange(1, 8), window=rng.randrange(8, 80), num_sink=rng.randrange(0, 20))
    blocks, waste = block_waste(n, config, 1, 1)
    assert waste == 0
    assert blocks == int(gist_mask(n, n, config).sum())


def test_waste_against_the_mask(seed):
    rng = random.Random(seed)
    n = rng.randrange(100, 400)
    config = GistConfig(ratio=rng.randrange(1, 8), window=rng.randrange(8, 120), num_sink=rng.randrange(0, 40))
    rows, keys = rng.choice([16, 64]), rng.choice([16, 32])
    blocks, waste = block_waste(n, config, rows, keys)
    nnz = int(gist_mask(n, n, config).sum())
    assert waste == pytest.approx(1 - nnz / (blocks * rows * keys))
    assert 0 <= waste < 1
