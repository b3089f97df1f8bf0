"""Inputs the UniGist layout cannot mean: packed rows and other position ids are refused by
the attention function; un-interleaved input ids and positions past max_position_embeddings
warn once. Also the argument checks of unigist.evict_kv and GistConfig's window > ratio."""

import warnings

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

import unigist
from unigist import GistCollator, GistConfig
from unigist.ops import evict_kv

from _hf_models import VOCAB, tiny_model
from conftest import rel_err

CFG = GistConfig(ratio=3, window=12, num_sink=2)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which once-only unigist warnings were given, and record the next ones."""
    monkeypatch.setattr(unigist.hf, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def unigist_messages():
            return [str(w.message) for w in caught if str(w.message).startswith("unigist")]

        yield unigist_messages


def _patched(family="llama", **kw):
    model = tiny_model(family, **kw)
    cfg = unigist.patch_model(model, None, CFG)
    return model, cfg


def _interleaved(cfg, lengths):
    return [unigist.layout.insert_gists(torch.randint(3, VOCAB, (n,)), cfg)["input_ids"].tolist() for n in lengths]


def test_packed_rows_refused():
    model, cfg = _patched()
    features = [{"input_ids": ids} for ids in _interleaved(cfg, [20, 14])]
    packed = DataCollatorWithFlattening()(features)  # position_ids restart at 0 for the second sequence
    assert packed["position_ids"][0, 26].item() == 0
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows: position_ids restart"):
        model(**packed)
    flash = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    with torch.no_grad(), pytest.raises(ValueError, match="packed rows.*cu_seq_lens_q"):
        model(**flash)
    # the same sequences one per row are fine
    with torch.no_grad():
        assert torch.isfinite(model(**GistCollator(cfg, pad_token_id=0)(
            [unigist.layout.remove_gists(torch.tensor(f["input_ids"]), cfg) for f in features])).loss)


def test_positions_must_be_0_to_n_minus_1():
    model, cfg = _patched("qwen2")
    x = unigist.layout.insert_gists(torch.randint(3, VOCAB, (1, 30)), cfg)
    n = x["input_ids"].shape[1]
    with torch.no_grad(), pytest.raises(ValueError, match=r"position_ids 0..N-1.*starting at \[5\]"):
        model(input_ids=x["input_ids"], position_ids=torch.arange(5, 5 + n)[None])


def test_right_padding_with_any_positions_on_pads_is_accepted_and_exact():
    """HF-style position ids put 1 on padded slots (attention_mask.cumsum - 1, filled with 1);
    padded slots are not checked, and the real rows' outputs do not change."""
    model, cfg = _patched()
    batch = GistCollator(cfg, pad_token_id=0, return_attention_mask=True)([list(range(3, 40)), list(range(3, 20))])
    mask = batch["attention_mask"]
    hf_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert not torch.equal(hf_pos, batch["position_ids"])
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        b = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=hf_pos).logits
    keep = mask.bool()
    assert rel_err(b[keep], a[keep]) < 1e-6


def test_uninterleaved_ids_warn_once(fresh_warnings):
    model, cfg = _patched()
    raw = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        model(input_ids=raw)
        model(input_ids=raw)
    got = fresh_warnings()
    assert len(got) == 1 and "not interleaved" in got[0] and "GistCollator" in got[0]


def test_interleaved_batches_do_not_warn(fresh_warnings):
    model, cfg = _patched()
    collate = GistCollator(cfg, pad_token_id=0)
    with torch.no_grad():
        # right padding puts pad ids in gist slots: no warning without an attention mask ...
        model(**collate([torch.randint(3, VOCAB, (n,)) for n in (50, 7, 31)]))
        # ... nor with one
        model(**GistCollator(cfg, pad_token_id=0, return_attention_mask=True)([list(range(3, 30)), [5, 6]]))
        unigist.generate(model, torch.randint(3, VOCAB, (60,)), max_new_tokens=8, progress=False, chunk_size=16)
    assert fresh_warnings() == []


@pytest.mark.parametrize("where", ["gist_slot_holds_raw", "raw_slot_holds_gist", "hole_without_mask"])
def test_broken_interleaving_warns(where, fresh_warnings):
    model, cfg = _patched()
    batch = GistCollator(cfg, pad_token_id=0, return_attention_mask=where != "hole_without_mask")(
        [list(range(3, 40)), list(range(3, 30))])
    ids = batch["input_ids"].clone()
    if where == "gist_slot_holds_raw":
        ids[1, 7] = 5  # position 7 is a gist slot (7 % 4 == 3) of the shorter row's real part
    elif where == "raw_slot_holds_gist":
        ids[0, 4] = cfg.gist_token_id
    else:
        ids[0, 11] = 5  # a gist missing in the middle, gists after it: not padding
    batch["input_ids"] = ids
    with torch.no_grad():
        model(**batch)
    got = fresh_warnings()
    assert len(got) == 1 and "not interleaved" in got[0]


@pytest.mark.cuda
def test_uninterleaved_ids_warn_on_cuda_without_a_host_sync(fresh_warnings):
    """On CUDA the check's result lands in pinned memory and is read at a later forward."""
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4).cuda()  # head_dim 64
    unigist.patch_model(model, None, CFG)
    raw = torch.randint(3, VOCAB, (2, 40), device="cuda")
    with torch.no_grad():
        model(input_ids=raw)
        torch.cuda.synchronize()
        model(input_ids=raw)  # the first forward's flag has landed: read here
        model(input_ids=raw)
    got = [m for m in fresh_warnings() if "not interleaved" in m]
    assert len(got) == 1


def test_positions_past_max_position_embeddings_warn_once(fresh_warnings):
    model, cfg = _patched(max_position_embeddings=64)
    with torch.no_grad():
        model(**GistCollator(cfg)([torch.randint(3, VOCAB, (45,))]))  # 60 positions: fine
        assert fresh_warnings() == []
        model(**GistCollator(cfg)([torch.randint(3, VOCAB, (60,))]))  # 80 positions
        model(**GistCollator(cfg)([torch.randint(3, VOCAB, (60,))]))
    got = fresh_warnings()
    assert len(got) == 1 and "positions reach 79, past max_position_embeddings=64" in got[0]


def test_generation_past_max_position_embeddings_warns(fresh_warnings):
    model, cfg = _patched(max_position_embeddings=64)
    unigist.generate(model, torch.randint(3, VOCAB, (40,)), max_new_tokens=4, progress=False, eos_token_id=[])
    assert fresh_warnings() == []  # 53 + 6 positions
    unigist.generate(model, torch.randint(3, VOCAB, (40,)), max_new_tokens=20, progress=False, eos_token_id=[],
                     chunk_size=8)
    got = fresh_warnings()
    assert len(got) == 1 and "past max_position_embeddings=64" in got[0]


def test_reloaded_model_without_hook_still_checks(fresh_warnings):
    """A model loaded with attn_implementation="unigist" has no pre-hook: the attention function
    itself refuses packed rows and warns about positions past max_position_embeddings."""
    model, cfg = _patched(max_position_embeddings=64)
    model._unigist_hook.remove()
    with torch.no_grad():
        model(**GistCollator(cfg)([torch.randint(3, VOCAB, (60,))]))
        with pytest.raises(ValueError, match="packed rows"):
            model(**DataCollatorWithFlattening()([{"input_ids": ids} for ids in _interleaved(cfg, [9, 9])]))
    got = fresh_warnings()
    assert len(got) == 1 and "max_position_embeddings=64" in got[0]


# ----------------------------------------------------------------------------- evict_kv


def _cache(capacity=12, d=4):
    key, value = torch.randn(2, 1, 2, capacity, d).unbind(0)
    return key, value, torch.arange(capacity)


def test_evict_kv_refuses_shared_memory():
    cfg = GistConfig(ratio=2, window=3, num_sink=1)
    key, _, pos = _cache()
    with pytest.raises(ValueError, match="key and value share memory"):
        evict_kv(key, key, pos, 12, 12, cfg)
    buf = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="key and value share memory"):
        evict_kv(buf[..., 0:6], buf[..., 2:8], pos, 12, 12, cfg)  # overlapping views of one buffer
    # two halves of one buffer do not overlap: accepted, and the same as separate tensors
    both = torch.randn(2, 1, 2, 12, 4)
    k, v = both.unbind(0)
    k2, v2, p2 = k.clone(), v.clone(), pos.clone()
    n = evict_kv(k, v, pos, 12, 12, cfg)
    assert n == evict_kv(k2, v2, p2, 12, 12, cfg) < 12
    assert torch.equal(k[:, :, :n], k2[:, :, :n]) and torch.equal(v[:, :, :n], v2[:, :, :n])


@pytest.mark.parametrize("name", ["length", "next_query"])
@pytest.mark.parametrize("bad", [7.0, 7.5, True, torch.tensor(7.0), "7"])
def test_evict_kv_refuses_non_integer_lengths(name, bad):
    key, value, pos = _cache()
    args = {"length": 12, "next_query": 12}
    args[name] = bad
    with pytest.raises(TypeError, match=f"evict_kv: {name} must be an int"):
        evict_kv(key, value, pos, args["length"], args["next_query"], GistConfig(ratio=2, window=3, num_sink=1))


def test_evict_kv_takes_integer_likes():
    cfg = GistConfig(ratio=2, window=3, num_sink=1)
    results = []
    for length, nq in ((12, 12), (np.int64(12), torch.tensor(12))):
        key, value, pos = _cache()
        results.append(evict_kv(key, value, pos, length, nq, cfg))
    assert results[0] == results[1] < 12


# ----------------------------------------------------------------------------- GistConfig


def test_gist_config_window_must_exceed_ratio():
    for ratio, window in ((4, 4), (4, 2), (1, 1)):
        with pytest.raises(ValueError, match=rf"window \({window}\) must be > ratio \({ratio}\).*whole group"):
            GistConfig(ratio=ratio, window=window, num_sink=0)
    assert GistConfig(ratio=4, window=5).window == 5
    assert GistConfig().window > GistConfig().ratio  # the defaults hold
    with pytest.raises(ValueError, match="whole group"):
        GistConfig(ratio=8).replace(window=8)
