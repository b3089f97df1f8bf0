import itertools

import pytest
import torch

from unigist import GistConfig, layout
from unigist.reference import gist_mask, gist_mask_from_positions

CONFIGS = [
    GistConfig(ratio=r, window=w, num_sink=s)
    for r, w, s in itertools.product((1, 2, 4, 8), (2, 3, 9, 16), (0, 1, 5))
    if w > r  # a gist sees its whole group
]


def test_config_validation():
    with pytest.raises(ValueError, match="ratio"):
        GistConfig(ratio=0)
    with pytest.raises(ValueError, match="window"):
        GistConfig(window=0)
    with pytest.raises(ValueError, match="num_sink"):
        GistConfig(num_sink=-1)
    with pytest.raises(TypeError, match="ratio"):
        GistConfig(ratio=2.5)
    with pytest.raises(ValueError, match="gist_token_id"):
        GistConfig(gist_token_id=-3)
    cfg = GistConfig(ratio=8)
    assert cfg.replace(window=9).window == 9 and cfg.replace(window=9).ratio == 8
    with pytest.raises(ValueError):
        cfg.replace(window=-1)


def test_is_gist_and_counts():
    for r in (1, 2, 3, 4, 8):
        cfg = GistConfig(ratio=r)
        pos = torch.arange(200)
        gists = layout.is_gist(pos, cfg)
        # r raw tokens, then one gist, repeated.
        expect = torch.tensor([(p + 1) % (r + 1) == 0 for p in range(200)])
        assert torch.equal(gists, expect)
        for n in range(60):
            assert layout.num_gists(n, cfg) == int(gists[:n].sum())
        for raw in range(60):
            n = layout.interleaved_length(raw, cfg)
            assert int((~gists[:n]).sum()) == raw
            assert torch.equal(layout.raw_positions(raw, cfg), (~gists[:n]).nonzero().flatten())


def test_insert_and_remove_gists(seed):
    cfg = GistConfig(ratio=3, gist_token_id=999, gist_predicts_next=True)
    ids = torch.randint(0, 500, (2, 17))
    out = layout.insert_gists(ids, cfg)
    n = 17 + 17 // 3
    assert out["input_ids"].shape == (2, n)
    gist = layout.is_gist(torch.arange(n), cfg)
    assert torch.all(out["input_ids"][:, gist] == 999)
    assert torch.all(out["labels"][:, gist] == -100)
    assert torch.equal(out["labels"][:, ~gist], ids)
    assert torch.equal(layout.remove_gists(out["input_ids"], cfg), ids)
    assert torch.equal(out["position_ids"][1], torch.arange(n))
    labels = ids.clone()
    labels[:, :4] = -100
    out = layout.insert_gists(ids[0], cfg, labels=labels[0])
    assert torch.equal(layout.remove_gists(out["labels"], cfg), labels[0])
    with pytest.raises(ValueError, match="gist token id"):
        layout.insert_gists(ids, GistConfig())
    with pytest.raises(ValueError, match="shape"):
        layout.insert_gists(torch.zeros(2, 3, 4, dtype=torch.long), cfg)
    with pytest.raises(TypeError):
        layout.insert_gists(ids.float(), cfg)


@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
@pytest.mark.parametrize("tile", [1, 5, 16, 64])
def test_gist_shift_permutation(ratio, tile):
    cfg = GistConfig(ratio=ratio)
    for n in (0, 1, tile - 1, tile, 3 * tile + 2, 131):
        if n < 0:
            continue
        perm, inv = layout.gist_shift_permutation(n, tile, cfg)
        assert torch.equal(perm[inv], torch.arange(n))
        pos = torch.arange(n)
        gist = layout.is_gist(pos, cfg)
        for start in range(0, n, tile):
            chunk = perm[start : start + tile]
            # a permutation of its own tile, raws (in order) then gists (in order)
            assert torch.equal(chunk.sort().values, pos[start : start + tile])
            g = gist[chunk]
            k = int((~g).sum())
            assert not g[:k].any() and g[k:].all()
            assert torch.all(chunk[:k].diff() > 0) and torch.all(chunk[k:].diff() > 0)


@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
@pytest.mark.parametrize("tile", [1, 5, 16, 64])
def test_unshift_position(ratio, tile):
    """The arithmetic inverse (ints and tensors) equals the argsort permutation."""
    cfg = GistConfig(ratio=ratio)
    for n in (1, tile - 1, tile, 3 * tile + 2, 131):
        if n < 1:
            continue
        perm, _ = layout.gist_shift_permutation(n, tile, cfg)
        assert torch.equal(layout.unshift_position(torch.arange(n), tile, n, cfg), perm)
        assert [layout.unshift_position(s, tile, n, cfg) for s in range(n)] == perm.tolist()
    with pytest.raises(ValueError, match="tile"):
        layout.unshift_position(0, 0, 10, cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c.ratio}w{c.window}s{c.num_sink}")
def test_tile_visit_partitions_the_mask(cfg):
    """Every visible (q, k) pair of a query tile is in exactly one part, the gist
    part needs no mask, and nothing invisible is in the gist part."""
    n = 40
    mask = gist_mask(n, n, cfg)
    for q_lo in range(n):
        for q_hi in range(q_lo, min(n, q_lo + 9)):
            t = layout.tile_visit(q_lo, q_hi, n, cfg)
            dense = torch.zeros(n, dtype=torch.bool)
            dense[: t.sink_end] = True
            dense[t.local_lo : t.local_hi] = True
            gists = torch.zeros(n, dtype=torch.bool)
            gpos = torch.arange(t.gist_begin, t.gist_end) * (cfg.ratio + 1) + cfg.ratio
            gists[gpos] = True
            assert not (dense & gists).any()
            rows = mask[q_lo : q_hi + 1]
            # gist part: visible to every query of the tile
            assert rows[:, gists].all()
            # everything visible is covered
            assert not (rows & ~(dense | gists)).any()
    for q in range(n):
        assert layout.row_nnz(q, n, cfg) == int(mask[q].sum())
    assert layout.mask_nnz(n, n, cfg) == int(mask.sum())


def test_mask_from_positions_matches_dense():
    cfg = GistConfig(ratio=3, window=5, num_sink=2)
    full = gist_mask(30, 30, cfg)
    kpos = torch.tensor([0, 1, 3, 7, 11, 20, 21, 22, 23])
    qpos = torch.arange(20, 30)
    assert torch.equal(gist_mask_from_positions(qpos, kpos, cfg), full[20:30][:, kpos])
    assert torch.equal(gist_mask(10, 30, cfg, q_offset=20), full[20:30])


def test_keep_for_future_is_what_future_queries_see():
    cfg = GistConfig(ratio=2, window=4, num_sink=3)
    n = 40
    mask = gist_mask(n, n, cfg)
    for nxt in range(n):
        keep = layout.keep_for_future(torch.arange(nxt), nxt, cfg)
        seen_later = mask[nxt:, :nxt].any(dim=0)
        assert torch.equal(keep, seen_later)
    assert cfg.max_cache_len(1000) == 3 + 1000 // 3 + 4
