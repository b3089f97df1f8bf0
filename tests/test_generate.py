"""THE central correctness test: compressed generation (chunked prefill + decode over
a GistCache that really evicts) gives, at every position, the logits of the
full-sequence forward pass with the dense reference mask on the same interleaved
sequence, for any chunk size; and the cache never holds more than
num_sink + gists + window entries (plus the chunk being processed)."""

import pytest
import torch

import unigist
from unigist import GistConfig
from unigist.cache import GistCacheLayer
from unigist.generate import generate
from unigist.hf import patch_model

from _hf_models import VOCAB, dense_mask, reference_copy, tiny_model, tiny_tokenizer
from conftest import rel_err


@pytest.fixture
def cache_monitor(monkeypatch):
    """Records (seen_before, new_rows, length_after) of every GistCache layer update."""
    log = []
    real = GistCacheLayer.update

    def update(self, k, v, *a, **kw):
        seen = self.seen
        out = real(self, k, v, *a, **kw)
        log.append((self.gist_config, seen, k.shape[-2], self.length))
        return out

    monkeypatch.setattr(GistCacheLayer, "update", update)
    return log


def full_reference_logits(ref_model, seq: torch.Tensor, cfg: GistConfig) -> torch.Tensor:
    n = seq.shape[0]
    with torch.no_grad():
        return ref_model(
            input_ids=seq[None], position_ids=torch.arange(n)[None], attention_mask=dense_mask(n, cfg)
        ).logits[0]


CASES = [
    ("llama", GistConfig(ratio=4, window=16, num_sink=4), 160),
    ("qwen2", GistConfig(ratio=2, window=16, num_sink=4), 120),
    ("mistral", GistConfig(ratio=3, window=16, num_sink=4), 140),
]


@pytest.mark.parametrize("family, cfg, context", CASES, ids=[c[0] for c in CASES])
def test_compressed_generation_equals_full_masked_forward(family, cfg, context, seed, cache_monitor):
    model = tiny_model(family, seed=seed % 1000)
    cfg = patch_model(model, None, cfg)
    ref = reference_copy(model)
    prompt = torch.randint(0, VOCAB, (context,))
    n_prompt = unigist.layout.interleaved_length(context, cfg)
    max_new = 24

    results = {}
    for chunk, eviction in ((1, "lazy"), (7, "lazy"), (64, "lazy"), (n_prompt, "lazy"), (7, "strict")):
        cache_monitor.clear()
        res = generate(model, prompt, max_new_tokens=max_new, chunk_size=chunk, progress=False,
                       output_logits=True, eos_token_id=[], eviction=eviction)
        seq = res.sequence
        assert len(res.ids) == max_new
        assert torch.equal(seq[:n_prompt], unigist.layout.insert_gists(prompt, cfg)["input_ids"])
        # the generated tokens sit at the raw positions of the fed sequence, gists in between
        fed_raw = unigist.layout.remove_gists(seq, cfg)
        assert fed_raw[context:].tolist() == res.ids[:-1]
        assert torch.all(seq[unigist.layout.is_gist(torch.arange(seq.shape[0]), cfg)] == cfg.gist_token_id)
        assert cfg.gist_token_id not in res.ids

        full = full_reference_logits(ref, seq, cfg)
        assert res.logits.shape == full.shape
        assert rel_err(res.logits, full) < 1e-5, chunk
        assert (res.logits - full).abs().max() < 1e-3, chunk
        # greedy: every generated token is the argmax of the reference logits (gist masked)
        ref_scores = full.clone()
        ref_scores[:, cfg.gist_token_id] = float("-inf")
        raw_pos = (~unigist.layout.is_gist(torch.arange(seq.shape[0] + 1), cfg)).nonzero().flatten()
        pred_pos = raw_pos[context:] - 1  # the position whose logits predict each generated token
        assert ref_scores[pred_pos].argmax(-1).tolist() == res.ids

        # the cache bound, at every update of every layer
        assert cache_monitor
        for _cfg, seen, n, length in cache_monitor:
            bound = min(seen, cfg.num_sink + seen // (cfg.ratio + 1) + cfg.window)
            assert length <= bound + n, (chunk, seen, n, length, bound)
        kv = res.kv
        assert kv["cache_length"] <= kv["max_allowed_length"] == min(
            kv["seen_tokens"], cfg.num_sink + kv["seen_tokens"] // (cfg.ratio + 1) + cfg.window
        )
        assert kv["seen_tokens"] == seq.shape[0]
        assert kv["kv_bytes"] < kv["full_cache_bytes"]
        assert kv["peak_kv_bytes"] >= kv["kv_bytes"]
        if eviction == "strict":  # strict: after every update only visible keys remain
            for _cfg, seen, n, length in cache_monitor:
                assert length - n == sum(
                    1 for p in range(seen) if p < cfg.num_sink or cfg.is_gist(p) or seen - p < cfg.window
                )
        results[(chunk, eviction)] = res.ids

    # the same tokens whatever the chunk size
    assert len({tuple(v) for v in results.values()}) == 1


def test_memory_stats_and_eviction_really_happen():
    model = tiny_model("llama")
    cfg = patch_model(model, None, GistConfig(ratio=4, window=16, num_sink=4))
    res = generate(model, torch.randint(0, VOCAB, (400,)), max_new_tokens=10, chunk_size=50, progress=False)
    kv = res.kv
    n = kv["seen_tokens"]
    # sinks + gists + window, evicted for the next query at position n
    assert kv["cache_length"] == sum(1 for p in range(n) if p < 4 or p % 5 == 4 or n - p < 16)
    row = 2 * 1 * 2 * 16 * 4  # k+v, batch 1, 2 kv heads, head_dim 16, float32
    assert kv["kv_bytes"] == 2 * kv["cache_length"] * row  # 2 layers
    assert kv["full_cache_bytes"] == 2 * n * row
    assert kv["peak_kv_bytes"] <= 2 * (kv["max_allowed_length"] + 50) * row
    assert kv["compression"] > 4


def test_sampling_never_emits_gist_and_is_reproducible():
    model = tiny_model("qwen2")
    cfg = patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    with torch.no_grad():  # make the gist the most likely token everywhere
        model.get_output_embeddings().weight[cfg.gist_token_id] = 0
        model.get_output_embeddings().bias = None
        model.lm_head.weight[cfg.gist_token_id] += 100 * model.model.norm.weight.sign()
    prompt = torch.randint(0, VOCAB, (30,))
    greedy = generate(model, prompt, max_new_tokens=12, progress=False, eos_token_id=[])
    assert cfg.gist_token_id not in greedy.ids
    runs = [
        generate(model, prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, top_p=0.9,
                 generator=torch.Generator().manual_seed(7), progress=False, eos_token_id=[]).ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and cfg.gist_token_id not in runs[0]


def test_streaming_tokenizer_and_eos():
    from transformers import TextStreamer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    cfg = patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    got = []
    res = generate(model, tok, "the cat sat on the mat and the dog ran far", max_new_tokens=8,
                   streamer=lambda t, s: got.append((t, s)), progress=False, eos_token_id=[])
    assert [t for t, _ in got] == res.ids
    assert "".join(s for _, s in got) == res.text == tok.decode(res.ids, skip_special_tokens=True)
    # an HF streamer works too
    generate(model, tok, "the sun was warm", max_new_tokens=3, streamer=TextStreamer(tok), progress=False)
    # EOS stops generation
    eos = res.ids[2]
    res2 = generate(model, tok, "the cat sat on the mat and the dog ran far", max_new_tokens=8,
                    progress=False, eos_token_id=eos)
    assert res2.ids == res.ids[: res.ids.index(eos) + 1]
    assert cfg.gist_token_id is not None


def test_generate_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not patched"):
        generate(model, torch.tensor([1, 2, 3]), max_new_tokens=2, progress=False)
    cfg = patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    with pytest.raises(ValueError, match="chunk_size"):
        generate(model, torch.tensor([1, 2, 3]), chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="differs"):
        generate(model, torch.tensor([1, 2, 3]), config=cfg.replace(window=9), progress=False)
    with pytest.raises(ValueError, match="one sequence"):
        generate(model, torch.ones(2, 3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "text without tokenizer", progress=False)


@pytest.mark.cuda
def test_compressed_generation_cuda_bf16(seed):
    """On the GPU (bf16, head_dim 64) generation matches the dense-mask forward within bf16 tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed % 1000)
    mcfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(mcfg).to("cuda", torch.bfloat16).eval()
    cfg = patch_model(model, None, GistConfig(ratio=4, window=64, num_sink=16))
    ref = reference_copy(model)
    prompt = torch.randint(0, 256, (600,), device="cuda")
    res = generate(model, prompt, max_new_tokens=16, chunk_size=128, progress=False, output_logits=True,
                   eos_token_id=[])
    seq = res.sequence.cuda()
    n = seq.shape[0]
    with torch.no_grad():
        full = ref(input_ids=seq[None], position_ids=torch.arange(n, device="cuda")[None],
                   attention_mask=dense_mask(n, cfg, dtype=torch.bfloat16).cuda()).logits[0].float().cpu()
    assert rel_err(res.logits, full) < 3e-2


def test_lazy_eviction_calls_the_op_less_often_with_the_same_logits(monkeypatch):
    import unigist.cache as cache_mod

    model = tiny_model("mistral")
    patch_model(model, None, GistConfig(ratio=2, window=32, num_sink=2))
    calls = []
    real = cache_mod.evict_kv
    monkeypatch.setattr(cache_mod, "evict_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(0, VOCAB, (100,))
    out = {}
    for policy in ("strict", "lazy"):
        calls.clear()
        out[policy] = generate(model, prompt, max_new_tokens=60, chunk_size=32, progress=False,
                               output_logits=True, eos_token_id=[], eviction=policy)
        out[policy + "_calls"] = len(calls)
    assert out["lazy_calls"] < out["strict_calls"] / 3
    assert out["lazy"].ids == out["strict"].ids
    assert rel_err(out["lazy"].logits, out["strict"].logits) < 1e-5
