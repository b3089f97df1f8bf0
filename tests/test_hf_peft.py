"""PEFT recipe (README "PEFT / LoRA"): patch first, then LoRA on q/k/v/o with the gist row as a
trainable token; the gist row trains, the adapter saves and reloads onto a freshly patched
base, and merge_and_unload keeps generation exact. Also patch_model's init_gist_embedding."""

import pytest
import torch

import unigist
from unigist import GistCollator, GistConfig

from _hf_models import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

CFG = GistConfig(ratio=2, window=8, num_sink=2)
TEXT = "the cat sat on the mat and the dog ran far then slept under the tree and the sun was warm"


def _base(seed, tok):
    model = tiny_model("llama", seed=seed, vocab=len(tok))
    return model, unigist.patch_model(model, tok, CFG)


def _gen(model, tok):
    return unigist.generate(model, tok, TEXT, max_new_tokens=10, progress=False, eos_token_id=[], output_logits=True)


def test_lora_with_trainable_gist_row_saves_reloads_and_merges(tmp_path, seed):
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = tiny_tokenizer()
    base, cfg = _base(seed % 1000, tok)
    gid = cfg.gist_token_id
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      trainable_token_indices={"embed_tokens": [gid]}, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    embed = model.get_input_embeddings()
    probe = torch.tensor([gid, 5, 7])
    with torch.no_grad():
        before = embed(probe).clone()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collate = GistCollator(cfg, tokenizer=tok)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**collate([tok(TEXT)["input_ids"]] * 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        after = embed(probe)
    assert not torch.allclose(after[0], before[0])  # the gist row trained ...
    assert torch.equal(after[1:], before[1:])  # ... and no other row did

    trained = _gen(model, tok)
    with pytest.raises(RuntimeError, match="unigist.generate"):  # PEFT's generate reaches the guard
        model.generate(**tok(TEXT, return_tensors="pt"), max_new_tokens=2)
    model.save_pretrained(tmp_path / "adapter")

    # a fresh base, patched the same way (same mean-initialised gist row), plus the adapter
    tok2 = tiny_tokenizer()
    base2, cfg2 = _base(seed % 1000, tok2)
    assert cfg2 == cfg
    reloaded = PeftModel.from_pretrained(base2, tmp_path / "adapter")
    again = _gen(reloaded, tok2)
    assert again.ids == trained.ids
    torch.testing.assert_close(again.logits, trained.logits, rtol=1e-5, atol=1e-5)

    merged = reloaded.merge_and_unload()
    assert not any("lora" in n or "token_adapter" in n for n, _ in merged.named_parameters())
    assert unigist.hf.is_patched(merged)
    out = _gen(merged, tok2)
    assert out.ids == trained.ids
    torch.testing.assert_close(out.logits, trained.logits, rtol=1e-4, atol=1e-4)

    # the merged model saves like any patched model and loads back patched with its trained row
    from transformers import AutoModelForCausalLM

    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="unigist")
    assert _gen(loaded, tok2).ids == trained.ids


def _mean_row(weight, row):
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[row] = False
    return weight[keep].mean(0)


def test_init_gist_embedding_existing_untrained_row():
    """The vocabulary already has the gist token (its row random, never trained): "auto"
    initialises it like a new one; False leaves it; a model whose config says it was trained
    with UniGist keeps its row under "auto", and True re-initialises it anyway."""
    tok = tiny_tokenizer()
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken("<|gist|>", special=True, normalized=False)], special_tokens=True)
    gid = tok.convert_tokens_to_ids("<|gist|>")
    model = tiny_model("llama", vocab=len(tok))  # has a (random) row for the gist id already
    emb = model.get_input_embeddings().weight
    random_row = emb[gid].detach().clone()

    kept = tiny_model("llama", vocab=len(tok))
    unigist.patch_model(kept, tok, CFG, init_gist_embedding=False)
    assert torch.equal(kept.get_input_embeddings().weight[gid], random_row)

    unigist.patch_model(model, tok, CFG)  # "auto"
    assert not torch.equal(emb[gid], random_row)
    torch.testing.assert_close(emb[gid], _mean_row(emb.detach(), gid))
    torch.testing.assert_close(model.get_output_embeddings().weight[gid],
                               _mean_row(model.get_output_embeddings().weight.detach(), gid))

    # "trained": a fresh instance whose config carries unigist_config (as a saved fine-tuned model's does)
    trained = tiny_model("llama", vocab=len(tok))
    trained.config.unigist_config = CFG.replace(gist_token_id=gid).to_dict()
    row = trained.get_input_embeddings().weight[gid].detach().clone()
    unigist.patch_model(trained, tok)  # config=None: the saved one
    assert torch.equal(trained.get_input_embeddings().weight[gid], row)
    unigist.patch_model(trained, tok, init_gist_embedding=True)
    assert not torch.equal(trained.get_input_embeddings().weight[gid], row)

    with pytest.raises(ValueError, match="init_gist_embedding"):
        unigist.patch_model(tiny_model("llama", vocab=len(tok)), tok, CFG, init_gist_embedding="yes")
