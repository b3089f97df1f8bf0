"""CPU checks of the attention benchmark's FlexAttention masks
(benchmarks/bench_attention.py): the mask_mod on the interleaved layout is the
UniGist mask, and the one on the gist-shifted layout is that mask permuted, so
that Flex (d) computes the same attention."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_attention as ba  # noqa: E402

from unigist import GistConfig  # noqa: E402
from unigist.layout import gist_shift_permutation  # noqa: E402
from unigist.reference import gist_attention_reference, gist_mask  # noqa: E402

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")

CONFIGS = [GistConfig(ratio=4, window=16, num_sink=5), GistConfig(ratio=2, window=40, num_sink=0)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
@pytest.mark.parametrize("n,tile", [(97, 32), (256, 64), (130, 1000)])
def test_flex_mask_mods(cfg, n, tile):
    ref = gist_mask(n, n, cfg)
    interleaved = flex_attention.create_mask(ba.gist_mask_mod(cfg), None, None, n, n, device="cpu")
    assert torch.equal(interleaved[0, 0], ref)
    perm, _ = gist_shift_permutation(n, tile, cfg)
    shifted = flex_attention.create_mask(ba.shifted_mask_mod(cfg, n, tile), None, None, n, n, device="cpu")
    assert torch.equal(shifted[0, 0], ref[perm][:, perm])


def test_flex_shifted_attention_matches_reference(seed):
    """Eager FlexAttention (CPU, float32) on the shifted layout, un-permuted,
    equals the dense reference: what Flex (d) times is the same attention."""
    cfg, n, tile = GistConfig(ratio=4, window=48, num_sink=8), 256, 128
    q, k, v = (torch.randn(1, 2, n, 32) for _ in range(3))
    perm, inverse = gist_shift_permutation(n, tile, cfg)
    bm = flex_attention.create_block_mask(
        ba.shifted_mask_mod(cfg, n, tile), B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu"
    )
    visited, partial = ba.blocks_visited(bm)
    assert 0 < visited <= 1 and 0 <= partial <= 1
    out = flex_attention.flex_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], block_mask=bm)
    ref = gist_attention_reference(q, k, v, cfg)
    err = ((out[:, :, inverse] - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
