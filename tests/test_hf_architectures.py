"""Architectures beyond Llama / Qwen2 / Mistral: Qwen3 (per-head q/k norms), OLMo2 (q/k norms
over the whole projection) and Gemma3 text (query_pre_attn_scalar scaling, scaled embeddings,
local + global layers with their own RoPE) are accepted by default, and compressed generation
equals the full forward with the dense reference mask, for any chunk size, as in
tests/test_generate.py. Gemma2 (attention-logit softcapping) and Phi-3 (fused qkv_proj) are
refused at patch_model with a reason."""

import pytest
import torch

import unigist
from unigist import GistConfig
from unigist.generation import generate
from unigist.hf import SUPPORTED_MODEL_TYPES, patch_model

from _hf_models import VOCAB, dense_mask, reference_copy, tiny_model
from conftest import rel_err
from test_generate import predicting_positions

CASES = [
    ("qwen3", GistConfig(ratio=4, window=16, num_sink=4), 130),
    ("olmo2", GistConfig(ratio=3, window=13, num_sink=2, gist_predicts_next=True), 110),  # both conventions
    ("gemma3_text", GistConfig(ratio=2, window=16, num_sink=4), 100),
]


@pytest.mark.parametrize("family, cfg, context", CASES, ids=[c[0] for c in CASES])
def test_compressed_generation_equals_full_masked_forward(family, cfg, context, seed):
    assert family in SUPPORTED_MODEL_TYPES
    model = tiny_model(family, seed=seed % 1000)
    cfg = patch_model(model, None, cfg)
    assert model.config._attn_implementation == "unigist"
    ref = reference_copy(model)
    prompt = torch.randint(0, VOCAB, (context,))
    n_prompt = unigist.layout.interleaved_length(context, cfg)
    ids = {}
    for chunk, eviction in ((1, "lazy"), (7, "strict"), (n_prompt, "lazy")):
        res = generate(model, prompt, max_new_tokens=20, chunk_size=chunk, progress=False, output_logits=True,
                       eos_token_id=[], eviction=eviction)
        seq = res.sequence
        assert res.kv["cache_length"] < seq.shape[0]  # it really evicted
        n = seq.shape[0]
        with torch.no_grad():
            full = ref(input_ids=seq[None], position_ids=torch.arange(n)[None],
                       attention_mask=dense_mask(n, cfg)).logits[0]
        assert rel_err(res.logits, full) < 1e-5, chunk
        # greedy tokens are the reference's argmax (gist masked) at the positions that predict them
        scores = full.clone()
        scores[:, cfg.gist_token_id] = float("-inf")
        assert scores[predicting_positions(n, context, cfg, len(res.ids))].argmax(-1).tolist() == res.ids
        ids[chunk] = res.ids
    assert len({tuple(v) for v in ids.values()}) == 1


def test_gemma3_mask_replaces_both_layer_kinds():
    """Both Gemma3 layer kinds (local and global) run the unigist op, and the result differs
    from the model's own attention once the sequence outgrows the gist window."""
    model = tiny_model("gemma3_text")
    cfg = patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    ref = reference_copy(model)
    x = unigist.layout.insert_gists(torch.randint(0, VOCAB, (1, 40)), cfg)
    with torch.no_grad():
        out = model(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits
        own = ref(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits  # its sliding/causal masks
        dense = ref(input_ids=x["input_ids"], position_ids=x["position_ids"],
                    attention_mask=dense_mask(x["input_ids"].shape[1], cfg)).logits
    assert rel_err(out, dense) < 1e-5
    assert rel_err(out, own) > 1e-3


def test_softcapping_and_fused_qkv_refused_with_reason():
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0.*plain softmax"):
        patch_model(tiny_model("gemma2"), None, GistConfig(ratio=2, window=8, num_sink=2))
    # softcapping is refused even when the caller allows unsupported models: the scores would be wrong
    with pytest.raises(ValueError, match="softcapping|cap attention logits"):
        patch_model(tiny_model("gemma2"), None, GistConfig(ratio=2, window=8, num_sink=2), allow_unsupported=True)
    phi3 = tiny_model("phi3")
    with pytest.raises(ValueError, match="fused-qkv.*qkv_proj.*separate q_proj"):
        patch_model(phi3, None, GistConfig(ratio=2, window=8, num_sink=2))
    assert phi3.config._attn_implementation != "unigist"  # nothing was changed
    # a Gemma3 whose local window is shorter than the gist window is refused too
    with pytest.raises(ValueError, match="sliding-window attention of 64"):
        patch_model(tiny_model("gemma3_text"), None, GistConfig(ratio=2, window=128, num_sink=2))
