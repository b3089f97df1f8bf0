"""Tiny random-init HF models and a local tokenizer for the HF-integration tests."""

import copy

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import unigist
from unigist.reference import gist_mask

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
}
# Families patch_model refuses (attention-logit softcapping; a fused qkv_proj).
REFUSED_FAMILIES = {
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
VOCAB = 97


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB, **overrides):
    cfg_cls, model_cls = FAMILIES[family] if family in FAMILIES else REFUSED_FAMILIES[family]
    kw = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        kw["sliding_window"] = None
    if family in ("gemma3_text", "gemma2"):
        # Gemma's head_dim is not hidden / heads; one local and one global layer, whose
        # window (64) is at least every test's GistConfig.window (the gist mask replaces it).
        kw.update(head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":
        kw.update(sliding_window=None)
    if family in ("olmo2", "phi3"):
        kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # their defaults lie outside VOCAB
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).float().eval()
    # Random-init LMs are nearly uniform; sharpen them so logits differ clearly.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def reference_copy(patched_model):
    """The patched model's weights in a model running eager attention (no unigist)."""
    ref = copy.deepcopy(patched_model)
    unigist.hf.unpatch_model(ref)
    ref.set_attn_implementation("eager")
    return ref


def dense_mask(n: int, config, batch: int = 1, dtype=torch.float32):
    """4-D additive mask [B, 1, n, n] of the UniGist rule (the reference)."""
    mask = gist_mask(n, n, config)
    add = torch.zeros(n, n, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return add[None, None].expand(batch, 1, n, n)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat on mat ran far and then slept under tree sun was warm".split()
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
