"""Smoke tests of the CPU quality study (benchmarks/quality_cpu): data, eviction baselines
through the HF cache, compressed evaluation vs a masked forward, and a --quick run."""

import json

import numpy as np
import pytest
import torch

import unigist
from unigist.layout import insert_gists, raw_positions

from benchmarks.quality_cpu import baselines, evaluate, models, run, tasks

TINY_TASK = tasks.TaskConfig(window=4, base_len=44, num_pairs=4, passkey_len=2)
TINY_MODEL = models.ModelConfig(hidden=32, layers=2, heads=2, mlp=64)


def test_samples_place_needles_at_their_distance():
    cfg = tasks.TaskConfig()
    ss = tasks.samples(cfg, 64, seed=3)
    assert [s.ids.tolist() for s in ss[:4]] == [s.ids.tolist() for s in tasks.samples(cfg, 4, seed=3)]
    v = cfg.vocab
    for s in ss:
        ask = s.prompt_len - 1
        assert s.ids[ask] == tasks.ASK and len(s.ids) == s.prompt_len + cfg.passkey_len
        first_digit = ask - s.pk_dist
        assert s.ids[first_digit - 1] == tasks.PASS
        assert (s.ids[first_digit : first_digit + cfg.passkey_len] == s.ids[s.prompt_len :]).all()
        assert cfg.bin_of(s.pk_dist) == s.pk_bin
        for q, d, b in zip(s.kv_query, s.kv_dist, s.kv_bin):
            assert v.key0 <= s.ids[q] < v.value0 and s.ids[q] == s.ids[q - d]
            assert s.ids[q + 1] == s.ids[q - d + 1] and cfg.bin_of(d) == b
            assert (s.ids == s.ids[q]).sum() == 2  # the key occurs only as pair and query
        assert s.text_mask.sum() > 20 and (s.ids[s.text_mask] >= v.filler0).all()
    assert len({s.prompt_len % 8 for s in ss}) == 8  # lengths divisible and not divisible by r
    assert len({b for s in ss for b in s.kv_bin}) == 4 and len({s.pk_bin for s in ss}) == 4


@pytest.mark.parametrize("predicts_next", [True, False])
@pytest.mark.parametrize("ratio", [4, 8])
def test_predictor_rows_follow_the_library_labels(ratio, predicts_next):
    cfg = unigist.GistConfig(ratio=ratio, window=12, num_sink=2, gist_token_id=999, gist_predicts_next=predicts_next)
    n = 37
    labels = insert_gists(torch.arange(n), cfg)["labels"]
    rows = evaluate.predictor_rows(n, cfg)
    for t in range(1, n):
        slot = int((labels == t).nonzero().flatten()[0])
        assert rows[t] == slot - 1  # the causal-LM shift: slot s is predicted by position s - 1
    assert (evaluate.predictor_rows(n, None)[1:] == np.arange(n - 1)).all()


def test_eviction_baselines_run_the_model_through_its_cache():
    torch.manual_seed(0)
    model, _ = models.build_model("full", TINY_TASK, TINY_MODEL, seed=0)
    s = tasks.samples(TINY_TASK, 1, seed=1)[0]
    ids = torch.from_numpy(s.ids)
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    prompt = ids[: s.prompt_len]
    new, logits, peak = baselines.evict_generate(model, prompt, 2, "full", None, chunk_size=5)
    torch.testing.assert_close(logits[: s.prompt_len], ref[: s.prompt_len], atol=1e-4, rtol=1e-4)
    assert new[0] == int(ref[s.prompt_len - 1].argmax()) and peak == s.prompt_len + 1
    budget = 12
    for policy in ("streaming", "snapkv"):
        new, logits, peak = baselines.evict_generate(model, prompt, 2, policy, budget, chunk_size=5)
        assert peak <= budget + 5
        # identical until the cache first overflows, different once tokens were dropped
        torch.testing.assert_close(logits[:budget], ref[:budget], atol=1e-4, rtol=1e-4)
        assert (logits[budget + 5 : s.prompt_len] - ref[budget + 5 : s.prompt_len]).abs().max() > 1e-3
    # the hooks are gone afterwards: a plain forward is the full model again
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None]).logits[0], ref)


def _greedy_masked(model, gcfg, prompt, steps):
    """Greedy decoding by full masked forwards over the interleaved sequence (no cache)."""
    seq = prompt.tolist()
    for _ in range(steps):
        b = insert_gists(torch.tensor(seq + [0]), gcfg)  # one slot more: where the next raw token goes
        with torch.no_grad():
            lg = model(input_ids=b["input_ids"][None], position_ids=b["position_ids"][None]).logits[0]
        row = evaluate.predictor_rows(len(seq) + 1, gcfg)[len(seq)]
        seq.append(int(lg[row, : TINY_TASK.vocab.size].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", ["gist_r4", "gist_r4_prev", "gist_r8_prev"])
def test_compressed_eval_equals_masked_forward(variant):
    model, gcfg = models.build_model(variant, TINY_TASK, TINY_MODEL, seed=0)
    with torch.no_grad():  # a random model whose gist embedding matters
        model.get_input_embeddings().weight[gcfg.gist_token_id].normal_()
    samples = tasks.samples(TINY_TASK, 3, seed=7)
    res = evaluate.evaluate_method(model, variant, gcfg, samples, TINY_TASK, TINY_MODEL, TINY_TASK.vocab.size,
                                   chunk_size=3)
    for s, r in zip(samples, res):
        prompt = torch.from_numpy(s.ids[: s.prompt_len])
        gen = unigist.generate(model, prompt, max_new_tokens=2, output_logits=True, chunk_size=3, progress=False)
        b = insert_gists(prompt, gcfg)
        with torch.no_grad():
            ref = model(input_ids=b["input_ids"][None], position_ids=b["position_ids"][None]).logits[0]
        torch.testing.assert_close(gen.logits[: ref.shape[0]], ref, atol=1e-4, rtol=1e-4)
        answer = _greedy_masked(model, gcfg, prompt, 2)
        assert gen.ids == answer
        assert r["pk_correct"] == (answer == s.ids[s.prompt_len :].tolist())
        rows = evaluate.predictor_rows(len(s.ids), gcfg)
        pred = ref[:, : TINY_TASK.vocab.size].argmax(-1)
        assert r["kv_correct"] == [bool(pred[rows[q + 1]] == s.ids[q + 1]) for q in s.kv_query]
        assert r["peak_kv"] < len(b["input_ids"])  # raw KV was really evicted


def test_window_control_eval_equals_its_masked_forward():
    model, _ = models.build_model("window", TINY_TASK, TINY_MODEL, seed=0)
    w, sinks = model.quality_window
    assert sinks + w == models.gist_budget(models.nominal_prompt_len(TINY_TASK), TINY_TASK, TINY_MODEL, 4)
    s = tasks.samples(TINY_TASK, 1, seed=2)[0]
    prompt = torch.from_numpy(s.ids[: s.prompt_len])
    n = s.prompt_len
    with torch.no_grad():
        ref = model(prompt[None], attention_mask=models.window_mask(n, w, sinks)[None, None]).logits[0]
    new, logits, peak = baselines.evict_generate(model, prompt, 1, "streaming", sinks + w, chunk_size=3,
                                                 num_sink=sinks, window=w)
    torch.testing.assert_close(logits[:n], ref, atol=1e-4, rtol=1e-4)
    assert new == [int(ref[-1].argmax())] and peak <= sinks + w + 3 < n


def test_full_model_learns_recall_on_a_trivial_task():
    # one pair, 4 keys x 4 values, short distances: the full model must beat chance (25%) clearly
    task = tasks.TaskConfig(window=3, base_len=28, max_offset=1, num_pairs=1, passkey_len=1,
                            vocab=tasks.Vocab(num_keys=4, num_values=4, num_digits=4, num_filler=8))
    tcfg = models.TrainConfig(steps=150, batch=16, lr=1e-2, warmup=10)
    model, _ = models.build_model("full", task, TINY_MODEL, seed=0)
    losses = models.train(model, None, tasks.train_stream(task, tcfg.steps, tcfg.batch, seed=5), tcfg)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    res = evaluate.evaluate_method(model, "full", None, tasks.samples(task, 100, seed=6), task, TINY_MODEL,
                                   task.vocab.size)
    acc = np.mean([c for r in res for c in r["kv_correct"]])
    assert acc > 0.6, acc


def test_quick_run_writes_the_report(tmp_path):
    assert run.main(["--quick", "--workers", "1", "--variants", "full", "gist_r4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality_cpu.json").read_text())
    agg = data["aggregate"]
    assert set(agg) == {"full", "streaming", "snapkv", "gist_r4"}
    for v in ("full", "gist_r4"):
        losses = json.loads((tmp_path / f"seed0_{v}.json").read_text())["losses"]
        assert np.mean(losses[-5:]) < losses[0] - 0.2
    assert 0 <= agg["gist_r4"]["kv_all"]["mean"] <= 1 and agg["full"]["ppl"]["mean"] > 1
    assert (tmp_path / "quality_cpu.png").stat().st_size > 10_000
    assert "| UniGist r=4 |" in (tmp_path / "quality_cpu.md").read_text()
