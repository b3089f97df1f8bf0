"""Every prefill chunk and decode step on CPU runs unigist's kernel over the
compressed cache (no SDPA, no dense mask); the GistCache hands its key layout to
the attention function through an explicit channel, not tensor attributes."""

import pytest
import torch
import torch.nn.functional as F

import unigist
from unigist import GistCache, GistConfig
from unigist.generation import generate
from unigist.hf import patch_model
from unigist.layout import key_positions

from _hf_models import VOCAB, dense_mask, reference_copy, tiny_model
from conftest import rel_err


def _full_logits(ref, seq, cfg):
    n = seq.shape[0]
    with torch.no_grad():
        return ref(input_ids=seq[None], position_ids=torch.arange(n)[None], attention_mask=dense_mask(n, cfg)).logits[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_cpu_generation_runs_no_sdpa(family, seed, monkeypatch):
    model = tiny_model(family, seed=seed % 1000)
    cfg = patch_model(model, None, GistConfig(ratio=3, window=12, num_sink=3))
    calls = {"cache": 0, "plain": 0}
    real_cache, real_plain = torch.ops.unigist.gist_attention_cache_fwd, torch.ops.unigist.gist_attention_fwd

    def no_sdpa(*a, **k):
        raise AssertionError("generation on CPU called scaled_dot_product_attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    monkeypatch.setattr(torch.ops.unigist, "gist_attention_cache_fwd",
                        lambda *a: calls.__setitem__("cache", calls["cache"] + 1) or real_cache(*a), raising=False)
    monkeypatch.setattr(torch.ops.unigist, "gist_attention_fwd",
                        lambda *a: calls.__setitem__("plain", calls["plain"] + 1) or real_plain(*a), raising=False)
    prompt = torch.randint(0, VOCAB, (90,))
    res = generate(model, prompt, max_new_tokens=20, chunk_size=13, progress=False, output_logits=True,
                   eos_token_id=[])
    assert calls["cache"] > 0  # every chunk after the first eviction and every decode step
    monkeypatch.undo()
    full = _full_logits(reference_copy(model), res.sequence, cfg)
    assert rel_err(res.logits, full) < 1e-5


def test_manual_loop_with_gist_cache(seed):
    """A user's own loop with past_key_values=GistCache (no unigist.generate): the cache
    reaches the attention function by itself and the logits are those of the full
    masked forward; key_layout() always describes the rows the layer holds."""
    model = tiny_model("llama", seed=seed % 1000)
    cfg = patch_model(model, None, GistConfig(ratio=2, window=10, num_sink=2))
    seq = unigist.layout.insert_gists(torch.randint(0, VOCAB, (80,)), cfg)["input_ids"]
    cache = GistCache(cfg, model_config=model.config, eviction="strict")
    logits = []
    with torch.no_grad():
        for s in range(0, seq.shape[0], 9):
            chunk = seq[s : s + 9]
            kwargs = dict(input_ids=chunk[None], position_ids=torch.arange(s, s + chunk.shape[0])[None],
                          past_key_values=cache, use_cache=True)
            if cache.explicit_layout:
                kwargs["gist_cache"] = cache
            try:
                out = model(**kwargs)
            except RuntimeError as e:
                # transformers < 5.24 does not hand the cache to attention: refused before
                # anything is appended (not silently wrong); the explicit kwarg then works.
                assert "gist_cache=cache" in str(e)
                cache.explicit_layout = True
                out = model(**kwargs, gist_cache=cache)
            logits.append(out.logits[0])
            for layer in cache.layers:
                assert torch.equal(key_positions(layer.key_layout(), layer.length, cfg), layer.positions)
    assert cache.cache_length() < seq.shape[0]  # eviction really happened
    full = _full_logits(reference_copy(model), seq, cfg)
    assert rel_err(torch.cat(logits), full) < 1e-5


def test_attention_refuses_keys_not_from_the_cache(seed):
    model = tiny_model("llama", seed=seed % 1000)
    cfg = patch_model(model, None, GistConfig(ratio=2, window=10, num_sink=2))
    cache = GistCache(cfg, model_config=model.config)
    ids = unigist.layout.insert_gists(torch.randint(0, VOCAB, (20,)), cfg)["input_ids"]
    with torch.no_grad(), pytest.raises(RuntimeError, match="did not come from this cache"):
        # keys of a plain forward (no cache update) handed with a GistCache: refused
        model(input_ids=ids[None], gist_cache=cache)


def test_evicted_cache_refuses_updates_without_a_layout_channel():
    """Without transformers' attention kwargs (older versions, or a direct update) and
    without explicit_layout=True, an evicted cache refuses: nothing would tell the
    attention where its keys sit."""
    cfg = GistConfig(ratio=2, window=4, num_sink=1)
    cache = GistCache(cfg, num_layers=1, eviction="strict")
    cache.update(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), 0)  # nothing evicted yet
    with pytest.raises(RuntimeError, match="gist_cache=cache"):
        cache.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 0)
    attention_kwargs = {}
    cache.update(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), 0, kwargs=attention_kwargs)
    assert attention_kwargs["gist_cache"] is cache  # the channel transformers >= 5.24 offers


def test_production_paths_never_import_the_reference():
    """unigist.reference is the tests' dense-mask oracle: importing unigist, patching a model,
    training a step and generating must not load it (nor the layout depend on the config)."""
    import subprocess
    import sys

    code = """
import sys, torch, unigist
from transformers import LlamaConfig, LlamaForCausalLM
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
cfg = unigist.patch_model(m, None, unigist.GistConfig(ratio=2, window=4, num_sink=1))
batch = unigist.GistCollator(cfg)([list(range(3, 20))])
m(**batch).loss.backward()
unigist.generate(m, list(range(3, 30)), max_new_tokens=3, chunk_size=8, progress=False)
assert "unigist.reference" not in sys.modules, "reference imported"
import unigist.layout as L
assert "GistConfig" not in vars(L), "layout imports the config"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_gist_cache_refuses_a_changed_batch_or_dtype():
    """A GistCache holds one sequence per batch row: an update with another batch size, head
    count, head dim, dtype or device is refused (it used to reallocate silently); reset() frees it."""
    from unigist import GistCache

    cfg = GistConfig(ratio=2, window=4, num_sink=1)
    cache = GistCache(cfg, num_layers=1, explicit_layout=True)
    k = torch.randn(2, 3, 5, 8)
    cache.update(k, k.clone(), 0)
    for bad, what in ((torch.randn(1, 3, 1, 8), "shape"), (torch.randn(2, 2, 1, 8), "shape"),
                      (torch.randn(2, 3, 1, 4), "shape"), (torch.randn(2, 3, 1, 8, dtype=torch.float64), "float64")):
        with pytest.raises(ValueError, match=what):
            cache.update(bad, bad.clone(), 0)
    assert cache.layers[0].length == 5  # nothing was appended
    cache.reset()
    one = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    keys, _ = cache.update(one, one.clone(), 0)
    assert keys.shape == (1, 3, 4, 8) and keys.dtype == torch.float64 and torch.equal(keys, one)
