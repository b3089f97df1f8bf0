"""THE central correctness test: compressed generation (chunked prefill + decode over
a GistCache that really evicts) gives, at every position, the logits of the
full-sequence forward pass with the dense reference mask on the same interleaved
sequence, for any chunk size; and the cache never holds more than
num_sink + gists + window entries (plus the chunk being processed)."""

import pytest
import torch

import unigist
from unigist import GistConfig
from unigist.cache import GistCacheLayer, GistCacheStep
from unigist.generation import generate
from unigist.hf import patch_model

from _hf_models import VOCAB, dense_mask, reference_copy, tiny_model, tiny_tokenizer
from conftest import rel_err


@pytest.fixture
def cache_monitor(monkeypatch):
    """Records (seen_before, new_rows, length_after) of every GistCache layer update (the rows
    reserved for it: an update, or a fixed-shape decode step that writes them on the device)."""
    log = []
    real = GistCacheLayer.reserve

    def reserve(self, n, *a, **kw):
        seen = self.seen
        out = real(self, n, *a, **kw)
        log.append((self.gist_config, seen, n, self.length))
        return out

    monkeypatch.setattr(GistCacheLayer, "reserve", reserve)
    return log


def full_reference_logits(ref_model, seq: torch.Tensor, cfg: GistConfig) -> torch.Tensor:
    n = seq.shape[0]
    with torch.no_grad():
        return ref_model(
            input_ids=seq[None], position_ids=torch.arange(n)[None], attention_mask=dense_mask(n, cfg)
        ).logits[0]


def predicting_positions(n_fed: int, context: int, cfg: GistConfig, n_new: int) -> torch.Tensor:
    """The position whose logits predict each of the ``n_new`` generated tokens: the one before
    it, or with gist_predicts_next=False, the raw token before a gist that sits in between."""
    raw_pos = (~unigist.layout.is_gist(torch.arange(n_fed + 2), cfg)).nonzero().flatten()[context:context + n_new]
    pred = raw_pos - 1
    if not cfg.gist_predicts_next:
        pred = torch.where(unigist.layout.is_gist(pred, cfg), pred - 1, pred)
    return pred


CASES = [  # both label conventions (the default is the memory-only gist)
    ("llama", GistConfig(ratio=4, window=16, num_sink=4), 160),
    ("qwen2", GistConfig(ratio=2, window=16, num_sink=4, gist_predicts_next=True), 120),
    ("mistral", GistConfig(ratio=3, window=16, num_sink=4), 140),
]


@pytest.mark.parametrize("family, cfg, context", CASES, ids=[c[0] for c in CASES])
def test_compressed_generation_equals_full_masked_forward(family, cfg, context, seed, cache_monitor, monkeypatch):
    model = tiny_model(family, seed=seed % 1000)
    cfg = patch_model(model, None, cfg)
    ref = reference_copy(model)
    prompt = torch.randint(0, VOCAB, (context,))
    n_prompt = unigist.layout.interleaved_length(context, cfg)
    max_new = 24

    results = {}
    # decode "static": the fixed-shape steps CUDA graphs replay (GistCacheStep), run eagerly here
    # ("static", the op gist_attention_cache_step), ("static-sdpa", SDPA with a device-built mask)
    runs = [(1, "lazy", "eager"), (7, "lazy", "eager"), (64, "lazy", "eager"), (n_prompt, "lazy", "eager"),
            (7, "strict", "eager"), (7, "lazy", "static"), (n_prompt, "strict", "static"),
            (7, "lazy", "static-sdpa")]
    steps = []
    real_prepare = GistCacheStep.prepare
    monkeypatch.setattr(GistCacheStep, "prepare", lambda self, *a: steps.append(self.n) or real_prepare(self, *a))
    for chunk, eviction, decode in runs:
        cache_monitor.clear()
        steps.clear()
        monkeypatch.setattr(unigist.generation, "GRAPH_ATTENTION", "sdpa" if decode == "static-sdpa" else "kernel")
        monkeypatch.setattr(unigist.generation, "_decode_mode", lambda device, cuda_graph: decode.split("-")[0])
        res = generate(model, prompt, max_new_tokens=max_new, chunk_size=chunk, progress=False,
                       output_logits=True, eos_token_id=[], eviction=eviction)
        # every decode forward went through the fixed-shape step in "static" (both feed lengths), none in "eager"
        assert (sorted(set(steps)), len(steps)) == (([1, 2], max_new - 1) if decode != "eager" else ([], 0))
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
        assert rel_err(res.logits, full) < 1e-5, (chunk, decode)
        assert (res.logits - full).abs().max() < 1e-3, (chunk, decode)
        # greedy: every generated token is the argmax of the reference logits (gist masked)
        ref_scores = full.clone()
        ref_scores[:, cfg.gist_token_id] = float("-inf")
        pred_pos = predicting_positions(seq.shape[0], context, cfg, len(res.ids))
        assert ref_scores[pred_pos].argmax(-1).tolist() == res.ids

        # the cache bound, at every update of every layer
        assert cache_monitor
        for _cfg, seen, n, length in cache_monitor:
            bound = min(seen, cfg.num_sink + seen // (cfg.ratio + 1) + cfg.window)
            assert length <= bound + n, (chunk, seen, n, length, bound)
        kv = res.kv
        # the bound plus the last forward's rows (a token and maybe a gist)
        assert kv["cache_length"] <= kv["max_allowed_length"] + 2
        assert kv["max_allowed_length"] == min(
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
        results[(chunk, eviction, decode)] = res.ids

    # the same tokens whatever the chunk size
    assert len({tuple(v) for v in results.values()}) == 1


def test_memory_stats_and_eviction_really_happen():
    model = tiny_model("llama")
    cfg = patch_model(model, None, GistConfig(ratio=4, window=16, num_sink=4))
    res = generate(model, torch.randint(0, VOCAB, (400,)), max_new_tokens=10, chunk_size=50, progress=False,
                   eviction="strict")
    kv = res.kv
    n = kv["seen_tokens"]
    # The last forward fed the sampled token (and a gist, after it or before it by the label
    # convention, when one closed its group) from `start` on;
    # strict eviction had left only sinks + gists + window as seen from `start`.
    gist_in_last = cfg.is_gist(n - 1) if cfg.gist_predicts_next else cfg.is_gist(n - 2)  # [tok, gist] / [gist, tok]
    start = n - 2 if gist_in_last else n - 1
    visible = sum(1 for p in range(start) if p < 4 or p % 5 == 4 or start - p < 16)
    assert kv["cache_length"] == visible + (n - start)
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
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "text without tokenizer", progress=False)
    ids = torch.tensor([5, 6, 7])
    for bad in (2.0, "3", -1, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, ids, max_new_tokens=bad, progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, ids.float(), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, do_sample=True, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, do_sample=True, top_p=float("nan"), progress=False)
    with pytest.raises(ValueError, match="gist token id"):
        generate(model, torch.tensor([5, cfg.gist_token_id, 7]), progress=False)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, ids, stop_strings=["x"], progress=False)
    with pytest.raises(ValueError, match="streamer"):
        generate(model, [[5, 6], [7]], streamer=lambda t, s: None, progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on CUDA"):
        generate(model, ids, cuda_graph=True, progress=False)
    with pytest.raises(TypeError, match="cuda_graph must be"):
        generate(model, ids, cuda_graph="yes", progress=False)
    with pytest.raises(ValueError, match="cuda_graph=True decodes a single prompt"):
        generate(model, [[5, 6], [7]], cuda_graph=True, progress=False)


def test_batch_of_prompts_equals_each_prompt_alone():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    cfg = patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    prompts = ["the cat sat on the mat", "a dog ran far and then slept under the tree", "the sun"]
    batch = generate(model, tok, prompts, max_new_tokens=6, progress=False, eos_token_id=[])
    assert isinstance(batch, list) and len(batch) == 3
    for p, res in zip(prompts, batch):
        alone = generate(model, tok, p, max_new_tokens=6, progress=False, eos_token_id=[])
        assert res.ids == alone.ids and res.text == alone.text
    # id lists (different lengths) and a [B, L] tensor without a tokenizer
    id_prompts = [torch.randint(4, cfg.gist_token_id, (n,)).tolist() for n in (9, 4)]
    out = generate(model, id_prompts, max_new_tokens=5, progress=False, eos_token_id=[])
    assert [r.ids for r in out] == [generate(model, p, max_new_tokens=5, progress=False, eos_token_id=[]).ids
                                    for p in id_prompts]
    # one forward per decoding step for the whole batch (plus one prefill forward per prompt),
    # each row at its own positions; logits as each prompt's alone, both label conventions
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        out = generate(model, id_prompts, max_new_tokens=7, chunk_size=None, progress=False, eos_token_id=[],
                       output_logits=True)
    finally:
        hook.remove()
    decode_steps = max(r.sequence.shape[0] - unigist.layout.interleaved_length(len(p), cfg)
                       for r, p in zip(out, id_prompts))
    assert len(calls) == len(id_prompts) + decode_steps
    for p, r in zip(id_prompts, out):
        alone = generate(model, p, max_new_tokens=7, progress=False, eos_token_id=[], output_logits=True)
        assert r.ids == alone.ids and torch.equal(r.sequence, alone.sequence)
        assert rel_err(r.logits, alone.logits) < 1e-5
    rows = torch.randint(4, cfg.gist_token_id, (2, 7))
    assert [r.ids for r in generate(model, rows, max_new_tokens=3, progress=False, eos_token_id=[])] == [
        generate(model, rows[i], max_new_tokens=3, progress=False, eos_token_id=[]).ids for i in range(2)]


def test_generation_config_and_transformers_processors():
    from transformers import GenerationConfig

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    cfg = patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    prompt = "the cat sat on the mat and the dog ran far"
    greedy = generate(model, tok, prompt, max_new_tokens=10, progress=False, eos_token_id=[])
    # the model's own generation config is read: its max_new_tokens and eos ids
    model.generation_config = GenerationConfig(max_new_tokens=4, eos_token_id=[])
    assert generate(model, tok, prompt, progress=False).ids == greedy.ids[:4]
    eos = greedy.ids[3]
    model.generation_config = GenerationConfig(max_new_tokens=10, eos_token_id=eos)
    assert generate(model, tok, prompt, progress=False).ids == greedy.ids[: greedy.ids.index(eos) + 1]
    # generation_config= overrides the model's; explicit arguments override both
    gc = GenerationConfig(max_new_tokens=2, eos_token_id=[])
    assert generate(model, tok, prompt, generation_config=gc, progress=False).ids == greedy.ids[:2]
    assert generate(model, tok, prompt, generation_config=gc, max_new_tokens=3, progress=False).ids == greedy.ids[:3]
    # repetition penalty: transformers' processor on the raw ids (prompt + new tokens, no gists)
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    rep = generate(model, tok, prompt, max_new_tokens=10, repetition_penalty=1.5, progress=False, eos_token_id=[],
                   output_logits=True)
    assert rep.ids != greedy.ids and cfg.gist_token_id not in rep.ids
    prompt_ids = tok(prompt)["input_ids"]
    pred_pos = predicting_positions(rep.sequence.shape[0], len(prompt_ids), cfg, len(rep.ids))
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    for i, tok_id in enumerate(rep.ids):  # each token: argmax of the penalised logits of the raw history
        history = torch.tensor([prompt_ids + rep.ids[:i]])
        scores = penalty(history, rep.logits[pred_pos[i]][None].clone())
        scores[0, cfg.gist_token_id] = float("-inf")
        assert int(scores.argmax()) == tok_id, i
    # min_p / top_k sampling: reproducible with a generator, top_k=1 is greedy
    s1 = generate(model, tok, prompt, max_new_tokens=8, do_sample=True, min_p=0.05, progress=False,
                  generator=torch.Generator().manual_seed(3), eos_token_id=[])
    s2 = generate(model, tok, prompt, max_new_tokens=8, do_sample=True, min_p=0.05, progress=False,
                  generator=torch.Generator().manual_seed(3), eos_token_id=[])
    assert s1.ids == s2.ids
    assert generate(model, tok, prompt, max_new_tokens=8, do_sample=True, top_k=1, progress=False,
                    eos_token_id=[]).ids == greedy.ids[:8]


def test_temperature_without_sampling_warns():
    """transformers' GenerationConfig.validate runs on the merged config and says, through its
    logger, that a temperature without do_sample is ignored."""
    import logging

    from transformers.utils import logging as hf_logging

    model = tiny_model("llama")
    patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    hf_logger = hf_logging.get_logger("transformers")
    hf_logging.warning_once.cache_clear()  # transformers says some things once per process
    hf_logger.addHandler(handler)
    try:
        generate(model, torch.tensor([5, 6, 7]), max_new_tokens=2, temperature=0.7, progress=False)
    finally:
        hf_logger.removeHandler(handler)
    assert any("temperature" in m for m in said), said


def test_decode_progress_bar(capsys):
    model = tiny_model("llama")
    patch_model(model, None, GistConfig(ratio=2, window=8, num_sink=2))
    generate(model, torch.tensor([5, 6, 7, 8]), max_new_tokens=5, decode_progress=True, progress=False,
             eos_token_id=[])
    assert "unigist decode" in capsys.readouterr().err
    res = generate(model, torch.tensor([5, 6, 7, 8]), max_new_tokens=5, chunk_size=None, progress=False,
                   eos_token_id=[])
    assert len(res.ids) == 5 and "unigist" not in capsys.readouterr().err


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


@pytest.mark.cuda
@pytest.mark.parametrize("gist_predicts_next, eviction, attention",
                         [(False, "lazy", "kernel"), (True, "lazy", "kernel"), (False, "strict", "kernel"),
                          (False, "lazy", "sdpa")])
def test_cuda_graph_decode(gist_predicts_next, eviction, attention, seed, monkeypatch):
    """CUDA-graph decoding (the default on CUDA) replays two captured steps and gives the logits of
    the same fixed-shape steps run eagerly (bitwise: same kernels), and of the eager cache path and
    the dense-mask forward within bf16 tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed % 1000)
    mcfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(mcfg).to("cuda", torch.bfloat16).eval()
    cfg = patch_model(model, None, GistConfig(ratio=4, window=64, num_sink=16, gist_predicts_next=gist_predicts_next))
    ref = reference_copy(model)
    prompt = torch.randint(0, 256, (500,), device="cuda")
    decoders = []
    real = unigist.generation._StaticDecoder

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            decoders.append(self)

    monkeypatch.setattr(unigist.generation, "_StaticDecoder", Spy)
    monkeypatch.setattr(unigist.generation, "GRAPH_ATTENTION", attention)
    kw = dict(max_new_tokens=40, chunk_size=128, progress=False, output_logits=True, eos_token_id=[],
              eviction=eviction)
    graph = generate(model, prompt, **kw)  # default: CUDA graphs
    assert len(decoders) == 1 and decoders[0].use_graph and sorted(decoders[0].graphs) == [1, 2]
    eager = generate(model, prompt, cuda_graph=False, **kw)
    assert len(decoders) == 1  # cuda_graph=False: the eager cache path
    monkeypatch.setattr(unigist.generation, "_decode_mode", lambda device, cuda_graph: "static")
    static = generate(model, prompt, **kw)
    assert len(decoders) == 2 and not decoders[1].use_graph
    assert graph.ids == static.ids and torch.equal(graph.logits, static.logits)
    assert torch.equal(graph.sequence, static.sequence)
    # Two bf16 computations of the same logits (with attention="sdpa" the graph's steps run SDPA,
    # the eager path the cache kernel): the dense forward's tolerance, not a tighter one (a seed
    # gave 0.021 here on an H200 on 2026-12-03; 12 more runs of the test passed at 2e-2).
    assert rel_err(graph.logits, eager.logits) < 3e-2
    seq = graph.sequence.cuda()
    n = seq.shape[0]
    with torch.no_grad():
        full = ref(input_ids=seq[None], position_ids=torch.arange(n, device="cuda")[None],
                   attention_mask=dense_mask(n, cfg, dtype=torch.bfloat16).cuda()).logits[0].float().cpu()
    assert rel_err(graph.logits, full) < 3e-2
    assert graph.kv["cache_length"] <= graph.kv["max_allowed_length"] + 2
    assert graph.kv == eager.kv  # the same rows kept, evicted at the same steps


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


@pytest.mark.parametrize("context", [96, 98])  # the prompt ends with a gist (96 = 24 groups of 4) or not
def test_gist_memory_only_convention_generates_exactly(context, seed):
    """GistConfig(gist_predicts_next=False): training labels skip the gist (the raw token before
    it predicts the raw token after it) and generation reads the next token off that raw token;
    compressed generation still equals the full masked forward, for any chunk size."""
    model = tiny_model("llama", seed=seed % 1000)
    cfg = patch_model(model, None, GistConfig(ratio=4, window=12, num_sink=2, gist_predicts_next=False))
    ref = reference_copy(model)
    prompt = torch.randint(0, VOCAB, (context,))
    ids = {}
    for chunk in (1, 9, 500):
        res = generate(model, prompt, max_new_tokens=20, chunk_size=chunk, progress=False, output_logits=True,
                       eos_token_id=[])
        seq = res.sequence
        full = full_reference_logits(ref, seq, cfg)
        assert rel_err(res.logits, full) < 1e-5
        scores = full.clone()
        scores[:, cfg.gist_token_id] = float("-inf")
        pred_pos = predicting_positions(seq.shape[0], context, cfg, len(res.ids))
        assert scores[pred_pos].argmax(-1).tolist() == res.ids
        ids[chunk] = res.ids
    assert ids[1] == ids[9] == ids[500]
    # and the labels train exactly those predictions: slot p's label is what position p - 1 predicts
    labels = unigist.layout.insert_gists(prompt, cfg)["labels"]
    trained = (labels[1:] != -100).nonzero().flatten()  # positions whose output is trained
    assert not unigist.layout.is_gist(trained, cfg).any()
    assert labels[1:][trained].tolist() == prompt[1:].tolist()


def _byte_level_tokenizer():
    """A small byte-level BPE tokenizer trained here (transformers' stop-string matching
    needs a tokenizer that can spell any string, which the word-level test tokenizer cannot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the cat sat on the mat and the dog ran far away"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def test_stop_strings_end_generation():
    tok = _byte_level_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    patch_model(model, tok, GistConfig(ratio=2, window=8, num_sink=2))
    prompt = "the cat sat on the mat"
    greedy = generate(model, tok, prompt, max_new_tokens=12, progress=False, eos_token_id=[])
    # stop at the first token whose text is a new, non-empty piece, once the output holds it
    text = ""
    for i, t in enumerate(greedy.ids):
        piece = tok.decode(greedy.ids[: i + 1])[len(text):]
        text += piece
        if i >= 2 and piece.strip() and piece not in text[: -len(piece)]:
            break
    else:  # the model and tokenizer are seeded, so this does not happen
        raise AssertionError(f"greedy output has no fresh text piece to stop at: {greedy.ids}")
    stopped = generate(model, tok, prompt, max_new_tokens=12, stop_strings=[piece], progress=False, eos_token_id=[])
    assert stopped.ids == greedy.ids[: i + 1], (piece, greedy.ids)


def test_batch_with_the_predicting_gist_convention():
    model = tiny_model("mistral")
    cfg = patch_model(model, None, GistConfig(ratio=3, window=10, num_sink=2, gist_predicts_next=True))
    prompts = [torch.randint(0, cfg.gist_token_id, (n,)).tolist() for n in (30, 17, 24)]
    out = generate(model, prompts, max_new_tokens=11, chunk_size=8, progress=False, eos_token_id=[])
    for p, r in zip(prompts, out):
        alone = generate(model, p, max_new_tokens=11, chunk_size=8, progress=False, eos_token_id=[])
        assert r.ids == alone.ids and torch.equal(r.sequence, alone.sequence)
