"""CPU checks of the attention benchmark's FlexAttention masks
(benchmarks/bench_attention.py): the mask_mod on the interleaved layout is the
UniGist mask, and the one on the gist-shifted layout is that mask permuted, so
that Flex (d) computes the same attention."""

import json
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


def _row(n, r, date, **kw):
    row = dict(n=n, r=r, density=0.5, ug_f=1.0, tflops_f=100.0, sdpa_f=2.0, fx_f=4.0, ug_fb=3.0, tflops_fb=90.0)
    row.update(sdpa_fb=6.0, fx_fb=12.0, fs_f=None, fs_fb=None, perm_ms=None, blocks_il=None, blocks_sh=None)
    row.update(date=date, device="dev", torch=torch.__version__, shift_tile=4096, window=1024, sinks=128)
    row.update(kw)
    return row


def test_table_append(tmp_path, monkeypatch):
    """--append keeps earlier rows it does not remeasure, dates each row, keeps rows of
    other shapes or input layouts apart, and refuses rows from another device."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "dev")
    out = str(tmp_path / "t.md")
    args = types.SimpleNamespace(out=out, window=1024, sinks=128, shift_tile=4096, append=True)
    # rows written before the shape columns existed (no heads / dim / layout): H=32 MHA, D=128, bhnd
    ba.write_table([_row(4096, 4, "run1"), _row(32768, 4, "run1")], args)
    ba.write_table([_row(32768, 4, "run2", ug_f=0.5, fs_f=1.0, fs_fb=2.0, perm_ms=0.1, blocks_sh="0.30 (0.29)")], args)
    text = open(out).read()
    main = [line for line in text.splitlines() if line.startswith("| bhnd |")]
    assert len(main) == 2
    assert "| bhnd | 32/32 | 128 | 1024 | 32768 | 4 | 0.500 | 0.500 |" in text and "run1, run2" in text
    assert "| 32768 | 4 | - | 0.30 (0.29) | 1.000 | 2.00x | 2.000 | 0.67x | 0.100 |" in text
    # the same N and ratio at another shape, window or layout is another row, not a replacement
    gqa = dict(heads=32, kv_heads=8, dim=64)
    ba.write_table([_row(4096, 4, "run3", layout="hf", **gqa), _row(4096, 4, "run3", window=256, **gqa)], args)
    text = open(out).read()
    assert "| bhnd | 32/32 | 128 | 1024 | 4096 | 4 |" in text
    assert "| hf | 32/8 | 64 | 1024 | 4096 | 4 |" in text and "| bhnd | 32/8 | 64 | 256 | 4096 | 4 |" in text
    assert len([line for line in text.splitlines() if line.startswith(("| bhnd |", "| hf |"))]) == 4
    args.append = False
    ba.write_table([_row(8192, 4, "run4")], args)
    assert "| 4096 |" not in open(out).read()
    args.append = True
    with open(out + ".json", "w") as fh:
        json.dump([_row(4096, 8, "old", device="other")], fh)
    with pytest.raises(SystemExit, match="--append"):
        ba.write_table([_row(8192, 4, "run5")], args)
