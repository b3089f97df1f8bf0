"""Save and reload: after `import unigist`, from_pretrained(path, attn_implementation="unigist")
gives back a patched model that generates exactly what it did before saving (checked in a
fresh process). Loaded with another attention, unigist.generate refuses it and a training
forward warns. Plain model.generate on a patched model raises, pointing to unigist.generate."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import unigist
from unigist import GistConfig

from _hf_models import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "the cat sat on the mat and the dog ran far then slept under the tree " * 3
NEW = 12

# Runs in a fresh interpreter: nothing of the saving process (registrations, patched
# classes) carries over. Prints one JSON line.
CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import unigist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(path)
    out = {}
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="unigist")
    out["patched"] = unigist.hf.is_patched(model)
    cfg = unigist.hf.get_gist_config(model)
    out["config"] = cfg.to_dict()
    res = unigist.generate(model, tok, prompt, max_new_tokens=new, progress=False, eos_token_id=[],
                           output_logits=True)
    out["ids"], out["logits"] = res.ids, res.logits[-3:].tolist()
    try:
        model.generate(tok(prompt, return_tensors="pt")["input_ids"], max_new_tokens=3, do_sample=False)
        out["hf_generate"] = "ran"
    except RuntimeError as e:
        out["hf_generate"] = str(e)

    # patch_model on the reloaded model: the saved config by default, the trained row kept
    row = model.get_input_embeddings().weight[cfg.gist_token_id].detach().clone()
    out["repatched_config_same"] = unigist.patch_model(model, tok) == cfg
    out["row_kept"] = torch.equal(row, model.get_input_embeddings().weight[cfg.gist_token_id])
    try:
        model.generate(tok(prompt, return_tensors="pt")["input_ids"], max_new_tokens=3)
        out["hf_generate_patched"] = "ran"
    except RuntimeError as e:
        out["hf_generate_patched"] = str(e)

    plain = AutoModelForCausalLM.from_pretrained(path)  # default attention (sdpa), config still carries it
    out["plain_patched"] = unigist.hf.is_patched(plain)
    try:
        unigist.generate(plain, tok, prompt, max_new_tokens=2, progress=False)
        out["plain_generate"] = "ran"
    except ValueError as e:
        out["plain_generate"] = str(e)
    plain.train()
    batch = unigist.GistCollator(cfg, tokenizer=tok)([tok(prompt)["input_ids"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain(**batch).loss.backward()
        plain(**batch)
    out["plain_train_warnings"] = [str(w.message) for w in caught if "unigist" in str(w.message)]
    print("RESULT " + json.dumps(out))
    """
)


def _run_child(path: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-c", CHILD, path, PROMPT, str(NEW)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_reload_in_fresh_process_generates_the_same(tmp_path, seed):
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=seed % 1000, vocab=len(tok))
    cfg = unigist.patch_model(model, tok, GistConfig(ratio=3, window=12, num_sink=2))
    with torch.no_grad():  # a trained gist row, unlike the mean patch_model starts from
        model.get_input_embeddings().weight[cfg.gist_token_id] = torch.randn(model.config.hidden_size)
    before = unigist.generate(model, tok, PROMPT, max_new_tokens=NEW, progress=False, eos_token_id=[],
                              output_logits=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["unigist_config"] == cfg.to_dict()

    got = _run_child(str(tmp_path))
    assert got["patched"] and got["config"] == cfg.to_dict()
    assert got["ids"] == before.ids
    torch.testing.assert_close(torch.tensor(got["logits"]), before.logits[-3:], rtol=1e-5, atol=1e-5)
    # the reloaded model refuses transformers' generate (at its first decoding step) ...
    assert "unigist.generate" in got["hf_generate"] and "GistCache" in got["hf_generate"]
    # ... and after patch_model at once, with the saved config and the trained row kept
    assert got["repatched_config_same"] and got["row_kept"]
    assert "unigist.generate" in got["hf_generate_patched"]
    # loaded with sdpa: generate refuses, training warns once
    assert not got["plain_patched"]
    assert "not patched" in got["plain_generate"] and "'sdpa'" in got["plain_generate"]
    assert 'attn_implementation="unigist"' in got["plain_generate"]
    assert len(got["plain_train_warnings"]) == 1
    assert "unigist_config" in got["plain_train_warnings"][0] and "ignores the UniGist mask" in got["plain_train_warnings"][0]


def test_plain_generate_on_patched_model_raises():
    model = tiny_model("qwen2")
    unigist.patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    ids = torch.randint(0, 50, (1, 10))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(RuntimeError, match=r"unigist\.generate\(model, tokenizer, prompt"):
        model.generate(ids, max_new_tokens=4)
    assert not calls  # refused before any forward pass
    # unigist.generate itself is unaffected
    assert len(unigist.generate(model, ids[0], max_new_tokens=3, progress=False, eos_token_id=[]).ids) == 3
    # a DynamicCache handed over by hand reaches the attention check
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers >= 5.24 names the argument `cache`, older 5.x `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kw: cache})
        with pytest.raises(RuntimeError, match="not a unigist.GistCache"):
            model(input_ids=ids[:, :1], use_cache=True, **{cache_kw: cache})
    # unpatch gives plain generation back
    unigist.unpatch_model(model)
    assert "generate" not in model.__dict__
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 12)


def test_get_gist_config_and_is_patched_states():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not patched: call unigist.patch_model"):
        unigist.hf.get_gist_config(model)
    cfg = unigist.patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    assert unigist.hf.is_patched(model) and unigist.hf.get_gist_config(model) == cfg
    # a copy that carries the config but switched attention back (as a load with sdpa does)
    model.set_attn_implementation("sdpa")
    assert not unigist.hf.is_patched(model)
    with pytest.raises(ValueError, match="carries a unigist_config.*'sdpa' attention"):
        unigist.hf.get_gist_config(model)
    model.config.unigist_config = {"ratio": 2, "window": 8, "unknown_field": 1}
    model.set_attn_implementation("unigist")
    del model.unigist_config
    with pytest.raises(TypeError, match="another unigist version"):
        unigist.hf.get_gist_config(model)
