"""unigist quickstart: patch an HF model, train it chunk-free, generate with a compressed KV cache.

Runs on a CPU in well under a minute, with nothing downloaded:

1. build a tiny byte-level BPE tokenizer from generated text and a tiny random-init Llama;
2. ``unigist.patch_model``: add the gist token, switch attention to UniGist;
3. train a few steps chunk-free (one forward pass per sequence, ``unigist.GistCollator``);
4. ``unigist.generate``: chunked prefill + decoding with a cache that really drops raw
   tokens, and print its KV-memory statistics.

    python examples/quickstart.py
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch

try:
    import unigist
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import unigist

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "elk"]
COLORS = ["red", "blue", "green", "gold", "gray", "pink"]
PLACES = ["barn", "forest", "river", "hill", "garden", "field"]


def story(rng: random.Random, sentences: int) -> str:
    """Generated text with some regularity a tiny model can pick up in a few steps."""
    out = []
    for _ in range(sentences):
        a, c, p = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
        out.append(f"The {c} {a} lives by the {p}. The {a} is {c}.")
    return " ".join(out)


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    t_start = time.perf_counter()

    # 1. a tiny tokenizer and model, built locally
    corpus = [story(rng, 40) for _ in range(64)]
    tokenizer = build_tokenizer(corpus)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    # 2. UniGist: a gist token after every 4 raw tokens, 8 sinks, a 64-position window
    config = unigist.patch_model(model, tokenizer, unigist.GistConfig(ratio=4, window=64, num_sink=8))
    print(f"patched: {config}  (vocabulary {len(tokenizer)}, attention '{model.config._attn_implementation}')")

    # 3. chunk-free training: the whole interleaved sequence in one forward pass
    collate = unigist.GistCollator(config, tokenizer=tokenizer, max_length=128)
    examples = [{"input_ids": tokenizer(text)["input_ids"]} for text in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    steps, batch_size = 80, 8
    for step in range(steps):
        batch = collate(rng.sample(examples, batch_size))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}  (batch {tuple(batch['input_ids'].shape)})")

    # 4. compressed generation over a long context
    prompt = story(random.Random(1), 60) + " The"
    print(f"\nprompt: {len(tokenizer(prompt)['input_ids'])} tokens; generating:")
    result = unigist.generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=24,
        chunk_size=128,
        streamer=lambda token_id, text: print(text, end="", flush=True),
        progress=False,
    )
    print()
    kv = result.kv
    print(
        f"\nKV cache: {kv['cache_length']} entries per layer after {kv['seen_tokens']} positions "
        f"(bound num_sink + gists + window = {kv['max_allowed_length']}); "
        f"{kv['kv_bytes'] / 1024:.1f} KiB now, peak {kv['peak_kv_bytes'] / 1024:.1f} KiB, "
        f"full cache would be {kv['full_cache_bytes'] / 1024:.1f} KiB ({kv['compression']:.1f}x smaller)"
    )
    print(f"decode: {result.decode_tokens_per_s:.1f} tokens/s; total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
