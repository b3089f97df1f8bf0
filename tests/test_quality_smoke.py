"""CPU smoke test of the quality benchmark's data generator and eviction baselines
(benchmarks/quality): seconds, no GPU, no downloads."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality"))

import data as qdata  # noqa: E402
from baselines import (  # noqa: E402
    EvictEngine,
    FullPolicy,
    GistPolicy,
    SnapKVPolicy,
    StreamingPolicy,
    budget_for,
)

import unigist  # noqa: E402
from unigist import GistConfig  # noqa: E402
from unigist.layout import insert_gists, interleaved_length  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lang():
    return qdata.Language(qdata.Vocab(512, 96))


def _find(seq, sub):
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i : i + n] == sub]


@pytest.mark.parametrize("task", qdata.TASKS)
@pytest.mark.parametrize("length", [64, 300, 1024])
def test_eval_samples_are_answerable(lang, task, length, seed):
    samples = qdata.eval_set(lang, task, length, 12, seed)
    for s in samples:
        assert len(s.prompt) == length
        assert s.prompt[-2] == qdata.ASK
        v = lang.vocab
        assert all(0 <= t < v.size for t in s.prompt + s.answer)
        key = s.prompt[-1]
        marker = qdata.KEY if task == "kv" else qdata.NEEDLE
        hits = _find(s.prompt[:-2], [marker, key])
        assert len(hits) == 1, "the queried key / needle name must occur exactly once"
        i = hits[0]
        assert s.prompt[i + 2 : i + 2 + len(s.answer)] == s.answer
        assert len(s.answer) == (2 if task == "kv" else 5)
        assert not _find(s.prompt[:-2], [qdata.ASK, key]), "the final query is never asked before"
        if task == "passkey":
            assert all(qdata.DIGIT0 <= t < qdata.DIGIT0 + 10 for t in s.answer)
        assert 0 < s.distance <= length
        assert s.prompt[length - s.distance] in (qdata.KEY, qdata.NEEDLE)


def test_generators_deterministic_and_training_batches(lang):
    a = qdata.eval_set(lang, "kv", 200, 3, 5)
    b = qdata.eval_set(lang, "kv", 200, 3, 5)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    batch = next(qdata.train_batches(lang, 4, 257, 0))
    assert batch.shape == (4, 257) and batch.dtype == np.int64
    assert (batch >= 0).all() and (batch < lang.vocab.size).all()
    docs = qdata.text_set(lang, 150, 2, 0)
    assert all(len(d) == 150 and d[0] == qdata.BOS for d in docs)


def _tiny_llama(vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_engine_full_matches_hf(seed):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 90))
    ref = model(ids).logits.float()
    out = EvictEngine(model, FullPolicy()).run(ids, 32, 80, 0)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("make", [
    lambda b: StreamingPolicy(b, sink=4),
    lambda b: SnapKVPolicy(b, window=8, chunked=True),
    lambda b: SnapKVPolicy(b, window=8, chunked=False),
])
def test_baselines_keep_exactly_the_budget(make, seed):
    model = _tiny_llama()
    budget, prompt, total = 37, 100, 104
    policy = make(budget)
    eng = EvictEngine(model, policy)
    ids = torch.randint(0, 128, (3, total))
    logits = eng.run(ids, 16, prompt, prompt - 1)
    assert logits.shape == (3, total - prompt + 1, 128)
    # after the prompt: exactly the budget; the decoding tokens (no eviction) come on top
    for c in eng.caches:
        assert c.length == budget + (total - prompt)
        pos = c.pos[:, :, :budget]
        assert (pos[..., 1:] > pos[..., :-1]).all(), "kept rows stay in position order"
        assert (pos < prompt).all()
    if isinstance(policy, StreamingPolicy):
        expect = torch.cat([torch.arange(4), torch.arange(prompt - (budget - 4), prompt)])
        assert torch.equal(eng.caches[0].pos[0, 0, :budget], expect)
        assert eng.peak_length <= budget + 16
    elif policy.chunked:
        assert eng.peak_length <= budget + 16
        # the observation window (last 8 prompt tokens) is always kept
        assert torch.equal(eng.caches[0].pos[0, 0, budget - 8 : budget], torch.arange(prompt - 8, prompt))
    else:
        assert eng.peak_length == prompt  # one-shot: full prefill, compressed at the end


def test_snapkv_keeps_the_attended_key():
    """A key that the observation window attends to strongly survives SnapKV but not StreamingLLM."""
    torch.manual_seed(0)
    b, h, n = 1, 2, 50
    pos = torch.arange(n).expand(b, h, n)
    scores = torch.rand(b, h, n) * 0.01
    scores[:, :, 5] = 1.0
    idx = SnapKVPolicy(20, window=4, kernel=1).select(pos, scores, n)
    assert idx.shape == (b, h, 20) and (idx == 5).any(-1).all()
    idx = StreamingPolicy(20, sink=2).select(pos, None, n)
    assert not (idx == 5).any()


def test_gist_policy_matches_library_and_budget(seed):
    cfg = GistConfig(ratio=4, window=16, num_sink=4)
    model = _tiny_llama()
    patch = getattr(unigist, "patch_model", None) or __import__("unigist.hf", fromlist=["x"]).patch_model
    cfg = patch(model, None, cfg)
    raw = torch.randint(0, 128, (1, 80))
    x = insert_gists(raw, cfg)
    ref = model(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits.float()
    eng = EvictEngine(model, GistPolicy(cfg))
    out = eng.run(x["input_ids"], 24, x["input_ids"].shape[1], 0)
    assert (out - ref).abs().max().item() < 1e-4
    assert eng.caches[0].length == budget_for(cfg, interleaved_length(80, 4))


@pytest.mark.parametrize("task", ["kv", "passkey"])
def test_training_queries_are_fresh_and_answerable(lang, task, seed):
    """Every training query asks a pair / needle shown earlier and not asked before, and its answer
    tokens (what ``answer_mask`` marks) are exactly that pair's value / needle's digits."""
    rng = np.random.default_rng(seed)
    marker = qdata.KEY if task == "kv" else qdata.NEEDLE
    n_queries = 0
    for _ in range(8):
        seq = lang.kv_train(rng, 512) if task == "kv" else lang.passkey_train(rng, 512)
        mask = qdata.answer_mask(np.asarray(seq))
        asked = set()
        for j in np.flatnonzero(np.asarray(seq) == qdata.ASK):
            if j + 1 >= len(seq):
                continue
            key = seq[j + 1]
            assert key not in asked, "a query repeats an earlier one"
            asked.add(key)
            hits = _find(seq[:j], [marker, key])
            assert len(hits) == 1
            n_ans = 2 if task == "kv" else 5
            src = seq[hits[0] + 2 : hits[0] + 2 + n_ans]
            got = seq[j + 2 : j + 2 + n_ans]
            assert got == src[: len(got)]
            assert mask[j + 2 : j + 2 + n_ans].all() and not mask[j : j + 2].any()
            n_queries += 1
        assert mask.sum() <= n_ans * len(asked)
    assert n_queries > 8


def test_answer_mask_batch_and_copy_task(lang, seed):
    rng = np.random.default_rng(seed)
    batch = np.asarray([lang.train_sequence(rng, 200, (1, 1, 1, 1)) for _ in range(12)])
    mask = qdata.answer_mask(batch)
    assert mask.shape == batch.shape
    for row, m in zip(batch, mask):
        assert (mask_row := qdata.answer_mask(row)).shape == row.shape and (mask_row == m).all()
    seq = lang.copy_train(rng, 300)
    assert len(seq) == 300 and not qdata.answer_mask(np.asarray(seq)).any()
    # each block is followed by its exact repeat
    i, blocks = 1, 0
    while qdata.DOT in seq[i:]:
        j = seq.index(qdata.DOT, i)
        n = j - i
        if j + 1 + n > len(seq):
            break
        assert seq[j + 1 : j + 1 + n] == seq[i:j]
        i, blocks = j + 2 + n, blocks + 1
    assert blocks >= 1


@pytest.mark.parametrize("ratio", [None, 3])
def test_probe_predictions_match_generation(lang, ratio, seed):
    """The training-time recall probe reads the logits at the right positions: its first predicted
    answer token equals unigist.generate's (or a plain greedy step's) on the same model."""
    import argparse

    import run_quality as rq

    a = argparse.Namespace(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, train_len=256, seed=seed)
    torch.manual_seed(seed)
    model = rq.make_model(a, torch.device("cpu")).float().eval()
    cfg = None
    if ratio is not None:
        cfg = unigist.patch_model(model, None, GistConfig(ratio=ratio, window=8, num_sink=2))
    samples = qdata.eval_set(lang, "passkey", 45, 6, seed)
    pred = rq.answer_predictions(model, samples, torch.device("cpu"), cfg)
    assert pred.shape == (6, 5)
    for s, p in zip(samples, pred):
        if cfg is None:
            first = int(model(torch.tensor([s.prompt])).logits[0, -1].argmax())
        else:
            first = unigist.generate(model, torch.tensor(s.prompt), max_new_tokens=1, chunk_size=16,
                                     progress=False, eos_token_id=[]).ids[0]
        assert int(p[0]) == int(first)


def test_weighted_loss_matches_cross_entropy_and_weights_answers(seed):
    import run_quality as rq

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, 11, generator=g)
    labels = torch.randint(0, 11, (3, 9), generator=g)
    labels[0, 4] = -100
    ones = torch.ones(3, 9)
    answers = torch.zeros(3, 9, dtype=torch.bool)
    loss, hits, n = rq.weighted_loss(logits, labels, ones, answers)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6) and int(n) == 0
    # weight 5 on two answer tokens = those tokens counted five times
    answers[1, 3] = answers[2, 7] = True
    w = torch.where(answers, 5.0, 1.0)
    loss_w, hits, n = rq.weighted_loss(logits, labels, w, answers)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp_min(0), reduction="none")
    valid = labels[:, 1:] != -100
    ref_w = (ce * w[:, 1:] * valid).sum() / (w[:, 1:] * valid).sum()
    assert torch.allclose(loss_w, ref_w, atol=1e-6) and int(n) == 2
    pred = logits[:, :-1].argmax(-1)
    assert int(hits) == int((pred[1, 2] == labels[1, 3])) + int((pred[2, 6] == labels[2, 7]))


def _query_distances(seq, marker):
    """(distance from the queried item's marker to the ``ASK``) for every query in ``seq``."""
    start, out = {}, []
    for i, t in enumerate(seq[:-1]):
        if t == marker:
            start.setdefault(seq[i + 1], i)
        elif t == qdata.ASK:
            out.append(i - start[seq[i + 1]])
    return out


@pytest.mark.parametrize("task", ["kv", "passkey"])
def test_distance_bound_is_honoured(task, seed):
    """With ``max_distance`` every training query's item starts at most that many tokens before the
    ``ASK`` (and queries stay fresh); without it the same generator does ask beyond the bound, and
    the bounded documents still carry many queries (default-sized vocabulary: with few symbols the
    pairs run out before the bound lets them be asked)."""
    lang = qdata.Language(qdata.Vocab(2048, 512))
    marker = qdata.KEY if task == "kv" else qdata.NEEDLE
    gen = lang.kv_train if task == "kv" else lang.passkey_train
    bound = 48
    bounded, free = [], []
    rng = np.random.default_rng(seed)
    for _ in range(10):
        seq = gen(rng, 1024, max_distance=bound)
        asked = [seq[j + 1] for j in range(len(seq) - 1) if seq[j] == qdata.ASK]
        assert len(asked) == len(set(asked)), "a query repeats an earlier one"
        bounded += _query_distances(seq, marker)
        free += _query_distances(gen(rng, 1024), marker)
    assert bounded and max(bounded) <= bound
    assert max(bounded) > bound // 2, "the bound is reached, not just respected"
    assert max(free) > 4 * bound and np.median(free) > np.median(bounded)
    assert len(bounded) >= len(free) / 4, "the bound keeps much of the supervision"
    # train_sequence / train_batches pass the bound through
    rng = np.random.default_rng(seed)
    for _ in range(20):
        seq = lang.train_sequence(rng, 512, (0, 1, 1, 0), max_distance=bound)
        m = qdata.KEY if qdata.KEY in seq else qdata.NEEDLE
        assert all(d <= bound for d in _query_distances(seq, m))


def test_distance_bound_none_is_the_old_stream(lang, seed):
    """``max_distance=None`` and a bound longer than the document both draw identical documents
    (the bound consumes no randomness), so earlier runs' data is reproducible."""
    for gen in (lang.kv_train, lang.passkey_train):
        r1, r2, r3 = (np.random.default_rng(seed) for _ in range(3))
        for _ in range(4):
            a = gen(r1, 700)
            assert a == gen(r2, 700, max_distance=None) == gen(r3, 700, max_distance=700)


def test_split_calls_round_trip(tmp_path):
    """The three-call recipe with the tiny preset: A pretrains + fine-tunes the full copy, B the gist
    copy (its own, larger budget), C evaluates only from the saved files. Files, budgets, the base
    fingerprint and the reproducing commands carry over; mismatches are refused."""
    import json

    import run_quality as rq

    common = ["--tiny", "--device", "cpu", "--workers", "0", "--ratios", "4", "--lengths", "128", "--n-eval", "2",
              "--n-text", "1", "--steps", "6", "--ft-steps", "3", "--ft-gist-steps", "5", "--probe-every", "4",
              "--probe-samples", "2", "--probe-len", "64"]
    d = tmp_path
    a_cmd = common + ["--save-base", str(d / "base.pt"), "--finetune", "full", "--save-finetuned", str(d / "a"),
                      "--out", str(d / "outA")]
    rq.main(a_cmd)
    assert (d / "base.pt").exists() and (d / "a" / "full.pt").exists()
    assert not (d / "a" / "r4.pt").exists() and not (d / "outA" / "quality.json").exists(), "A must not evaluate"
    rq.main(common + ["--load-base", str(d / "base.pt"), "--finetune", "4", "--save-finetuned", str(d / "b"),
                      "--no-eval", "--out", str(d / "outB")])
    base = torch.load(d / "base.pt")
    full, r4 = torch.load(d / "a" / "full.pt"), torch.load(d / "b" / "r4.pt")
    assert full["base_id"] == r4["base_id"] == base["base_id"]
    assert (full["ratio"], r4["ratio"]) == (None, 4)
    assert full["info"]["steps"] == 3 and r4["info"]["steps"] == 5, "the gist copy has its own budget"
    assert base["info"]["steps_per_distance_bound"], "stage 1 logs its distance bounds"
    assert all(len(p["recall"]) == 1 for p in base["info"]["probes"])  # one probe length (64)
    assert r4["state_dict"]["model.embed_tokens.weight"].shape[0] == 513  # the gist row

    # a loaded gist copy carries its own fine-tuned weights (incl. the gist row), not the patch's init
    args = rq.parse_args(common)
    model, cfg, saved = rq.load_finetuned(args, str(d / "b" / "r4.pt"), torch.device("cpu"))
    assert cfg.ratio == 4 and cfg.gist_token_id == 512
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, saved["state_dict"]["model.embed_tokens.weight"].float())

    res = rq.main(common + ["--eval-only", "--load-finetuned", str(d / "a"), str(d / "b"), "--out", str(d / "outC")])
    out = json.loads((d / "outC" / "quality.json").read_text())
    for key in ("full", "unigist@r4", "streaming@r4", "snapkv@r4", "snapkv_oneshot@r4"):
        assert set(out["acc"][key]) == {"kv", "passkey"} and "128" in out["acc"][key]["kv"]
    assert [t["name"] for t in out["training"]] == ["base (full attention)", "full attention (fine-tuned)", "unigist r=4"]
    assert out["base_id"] == base["base_id"]
    cmds = out["commands"]
    assert len(cmds) == 3 and "--save-base" in cmds[0] and "--finetune 4" in cmds[1] and "--eval-only" in cmds[2]
    assert all("--out" not in c for c in cmds)
    report = (d / "outC" / "quality.md").read_text()
    assert all(f"`{c}`" in report for c in cmds)
    assert res["eval_seconds"] > 0

    # refused: a missing copy, another layout, a copy of another base
    with pytest.raises(SystemExit, match="r4"):
        rq.main(common + ["--eval-only", "--load-finetuned", str(d / "a"), "--out", str(d / "x")])
    with pytest.raises(SystemExit, match="window"):
        rq.main(common + ["--window", "16", "--eval-only", "--load-finetuned", str(d / "a"), str(d / "b"),
                          "--out", str(d / "x")])
    rq.main(common + ["--seed", "5", "--finetune", "full", "--save-finetuned", str(d / "other"), "--out", str(d / "x")])
    with pytest.raises(SystemExit, match="another base"):
        rq.main(common + ["--eval-only", "--load-finetuned", str(d / "other"), str(d / "b"), "--out", str(d / "x")])


def test_keep_best_restores_the_best_probe(monkeypatch):
    """With keep_best, training ends in the weights of the best held-out probe, not the last step's;
    probe_stop ends training at the first probe that reaches it."""
    import run_quality as rq

    a = rq.parse_args(["--tiny", "--device", "cpu", "--workers", "0", "--probe-every", "2", "--probe-len", "64",
                       "--probe-samples", "2"])
    rq._worker_init(a.vocab, a.symbols)
    lang = qdata.Language(qdata.Vocab(a.vocab, a.symbols))
    scores = iter([0.1, 0.9, 0.2, 0.3, 0.3, 0.3])
    snaps = {}

    def fake_probe(model, lang, length, a, device, gist_config=None):
        v = next(scores)
        snaps[v] = {k: t.clone() for k, t in model.state_dict().items()}
        return {"kv": v, "passkey": v}

    monkeypatch.setattr(rq, "probe_recall", fake_probe)
    model = rq.make_model(a, torch.device("cpu"))
    info = rq.train(model, a, None, torch.device("cpu"), "t", steps=8, seconds=60, lr=1e-3, curriculum="",
                    seed=0, lang=lang, distance_curriculum="16:0.5", keep_best=True)
    assert [p["step"] for p in info["probes"]] == [1, 3, 5, 7]
    assert info["best_probe"] == {"step": 3, "score": 0.9} and info["restored_step"] == 3
    assert all(torch.equal(v, snaps[0.9][k]) for k, v in model.state_dict().items())
    assert info["steps_per_distance_bound"] == {"16": 4, "None": 4}

    scores = iter([0.1, 0.6, 0.7])
    model = rq.make_model(a, torch.device("cpu"))
    info = rq.train(model, a, None, torch.device("cpu"), "t", steps=8, seconds=60, lr=1e-3, curriculum="",
                    seed=0, lang=lang, stop_at=0.5)
    assert info["steps"] == 4 and info["stopped"] and len(info["probes"]) == 2
