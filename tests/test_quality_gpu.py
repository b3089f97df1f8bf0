"""Tests of the GPU quality study (benchmarks/quality_gpu), on CPU at tiny sizes: the issue's size
constraints, the step budget, checkpoints and the fine-tune start, the evaluation caps, and both
device calls end to end followed by the report."""

import json
import math

import pytest
import torch

from unigist.layout import interleaved_length

from benchmarks.quality_cpu import models, tasks
from benchmarks.quality_gpu import config, report, run


def test_gpu_configs_meet_the_issue():
    task, mcfg, tcfg = config.gpu_configs()
    assert 30e6 <= config.param_count(task, mcfg) <= 100e6
    assert task.base_len >= 4096 and 256 <= task.window <= 1024
    assert task.bins()[-1][1] <= task.base_len  # every distance bin fits in a sequence
    assert mcfg.hidden // mcfg.heads in (64, 128) and mcfg.hidden % mcfg.heads == 0  # the CUDA kernel's head dims
    assert mcfg.max_positions >= interleaved_length(task.base_len + task.max_offset, 4)
    assert task.passkey_len == 1 and task.vocab.num_keys >= task.num_pairs
    # the controls' budget is UniGist r=4's, and more than the window: gists can matter only beyond it
    assert models.window_size(task, mcfg) + mcfg.num_sink == models.gist_budget(
        models.nominal_prompt_len(task), task, mcfg, 4)
    assert 4 * task.window < models.window_size(task, mcfg) < 8 * task.window
    # the training stream leans on beyond-window questions, evaluation stays uniform
    assert config.train_task(task).bin_weights == config.TRAIN_BIN_WEIGHTS and task.bin_weights is None
    tiny = config.train_task(config.quick_configs()[0])
    bins = [b for s in tasks.samples(tiny, 200, seed=0) for b in s.kv_bin]
    assert bins.count(0) / len(bins) < 0.18 < 0.25 < bins.count(3) / len(bins)


def test_steps_for_budget():
    tps = {"full": 200e3, "window": 100e3, "gist_r4_prev": 150e3, "gist_r8_prev": 160e3}
    step = 32e3
    n = config.steps_for_budget(120, tps, step)
    for call in config.CALLS:
        seconds = sum(n * step / tps[v] for v in call)
        assert seconds <= 120 * len(call)
    # call B (the slower models) is the binding one, and one step more would overrun it
    call_b = config.CALLS[1]
    assert sum((n + 1) * step / tps[v] for v in call_b) > 120 * len(call_b)
    assert config.steps_for_budget(120, {"full": 200e3}, step) == int(120 * 200e3 / step)
    assert config.steps_for_budget(1e-6, tps, step) == 1
    with pytest.raises(ValueError):
        config.steps_for_budget(120, {}, step)
    assert config.tokens_per_step(*config.gpu_configs()[::2]) == 8 * (4096 + 3.5)


def test_checkpoint_round_trip_and_fine_tune_start(tmp_path):
    task, mcfg, tcfg = config.quick_configs()
    dev = torch.device("cpu")
    full, _ = run.build("full", task, mcfg, 0, dev, str(tmp_path))
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from the seed's init
    run.save_checkpoint(str(tmp_path / "seed0_full.pt"), full, {"losses": [1.0], "train_seconds": 1.0})
    again, _ = run.build("full", task, mcfg, 0, dev, str(tmp_path))
    assert run.load_checkpoint(str(tmp_path / "seed0_full.pt"), again) == {"losses": [1.0], "train_seconds": 1.0}
    ids = torch.from_numpy(tasks.samples(task, 1, seed=0)[0].ids)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, full(ids).logits)
    # the fine-tune arm: the trained full model's weights, patched with UniGist r=4 (memory-only gists)
    ft, gcfg = run.build("ft_gist_r4_prev", task, mcfg, 0, dev, str(tmp_path))
    assert gcfg.ratio == 4 and not gcfg.gist_predicts_next and gcfg.gist_token_id == task.vocab.size
    fs, gs = full.state_dict(), ft.state_dict()
    for k, v in fs.items():
        w = gs[k]
        torch.testing.assert_close(w[: v.shape[0]] if "embed" in k or "lm_head" in k else w, v)
    # a gist checkpoint restores the patched model exactly
    run.save_checkpoint(str(tmp_path / "ft.pt"), ft, {})
    ft2, _ = run.build("ft_gist_r4_prev", task, mcfg, 0, dev, str(tmp_path))
    run.load_checkpoint(str(tmp_path / "ft.pt"), ft2)
    for k, v in ft.state_dict().items():
        torch.testing.assert_close(ft2.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        run.build("ft_gist_r4_prev", task, mcfg, 0, dev, str(tmp_path / "none"))


def test_evaluation_stops_at_its_caps():
    task, mcfg, _ = config.quick_configs()
    model, _ = models.build_model("full", task, mcfg, seed=0)
    ss = tasks.samples(task, 3, seed=1)
    every = run.evaluate_round_robin(model, ("full", "streaming"), None, ss, task, mcfg, 8, 1e9, math.inf)
    assert {m: len(r) for m, r in every.items()} == {"full": 3, "streaming": 3}
    assert run.evaluate_round_robin(model, ("full",), None, ss, task, mcfg, 8, 1e9, 0.0) == {}  # past the deadline
    one = run.evaluate_round_robin(model, ("full", "snapkv"), None, ss, task, mcfg, 8, 0.0, math.inf)
    assert {m: len(r) for m, r in one.items()} == {"full": 1, "snapkv": 1}  # the time cap, the same samples


def test_both_calls_then_report(tmp_path, capsys):
    out_a, out_b, ck = tmp_path / "A", tmp_path / "B", str(tmp_path / "ck")
    common = ["--quick", "--n-eval", "3", "--ckpt-dir", ck]
    assert run.main(["--variants", "full", "ft_gist_r4_prev", "--steps", "3", "--probe", "full", "gist_r4_prev",
                     "--out", str(out_a)] + common) == 0
    plan = json.loads((out_a / "plan.json").read_text())
    assert plan["steps"] == 3 and set(plan["probe_raw_tokens_per_s"]) == {"full", "gist_r4_prev"}
    assert plan["curriculum"] == list(config.QUICK_CURRICULUM) and plan["meta"]["curriculum_task"]["base_len"] == 22
    assert all(v > 0 for v in plan["probe_raw_tokens_per_s"].values())
    assert run.main(["--variants", "window", "gist_r4_prev", "gist_r8_prev", "--steps", str(plan["steps"]),
                     "--out", str(out_b)] + common) == 0
    jobs = {p.stem: json.loads(p.read_text()) for p in list(out_a.glob("seed*.json")) + list(out_b.glob("seed*.json"))}
    assert set(jobs) == {f"seed0_{v}" for v in ("full", "ft_gist_r4_prev", "window", "gist_r4_prev", "gist_r8_prev")}
    for name, j in jobs.items():
        assert j["steps"] == 3 and len(j["losses"]) == 3 and j["throughput"]["raw_tokens_per_s"] > 0
        assert all(n == 3 for n in j["n_eval"].values())
    assert set(jobs["seed0_full"]["methods"]) == {"full", "streaming", "snapkv"}
    assert jobs["seed0_ft_gist_r4_prev"]["init"].startswith("trained full")
    assert jobs["seed0_ft_gist_r4_prev"]["gist_config"]["gist_predicts_next"] is False
    assert "CUDA" not in jobs["seed0_gist_r4_prev"]["throughput"]["attention"]  # CPU here: the CPU op
    # a second call with the same configuration reuses the finished jobs instead of training again
    capsys.readouterr()
    assert run.main(["--variants", "full", "--steps", "3", "--out", str(tmp_path / "A2")] + common) == 0
    assert "reused" in capsys.readouterr().out
    assert json.loads((tmp_path / "A2" / "seed0_full.json").read_text()) == jobs["seed0_full"]

    assert report.main(["--results", str(out_a), str(out_b), "--out-dir", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "quality_gpu.md").read_text()
    for heading in ("## Outcome", "## Training throughput", "## Fine-tuning vs from scratch",
                    "## The CPU study's conclusions at this scale", "| UniGist r=4, raw-before-gist predicts |",
                    "length curriculum: the first 50% of the steps on 2x shorter sequences (22..29 raw tokens"):
        assert heading in md
    assert (tmp_path / "rep" / "quality_gpu.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "rep" / "quality_gpu.json").read_text())
    assert set(data["aggregate"]) == {"full", "streaming", "snapkv", "ft_gist_r4_prev", "window", "gist_r4_prev",
                                      "gist_r8_prev"}


def test_compare_uses_the_standard_error():
    assert report.compare((0.60, 1000), (0.50, 1000)) == ">"
    assert report.compare((0.52, 100), (0.50, 100)) == "="
    assert report.compare((0.0, 100), (0.3, 100)) == "<"
    assert report.compare((0.5, 0), (0.5, 10)) == "?"


def test_report_calls_a_study_uninformative_when_full_attention_learned_nothing(tmp_path, monkeypatch):
    """The first H200 run (committed JSONs): every model, full attention included, stayed at chance.
    The report must say so instead of comparing chance-level numbers as if they meant something."""
    runs = "benchmarks/results/quality_gpu_runs/2026-12-02"
    assert report.main(["--results", f"{runs}/A", f"{runs}/B", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "quality_gpu.md").read_text()
    assert "**Uninformative: full attention did not learn either task**" in md
    assert "**Not testable: neither arm learned the tasks" in md
    assert "Fine-tuning recovers" not in md
    conclusions = md.split("## The CPU study's conclusions at this scale")[1]
    assert conclusions.count("not testable (full attention at chance on this task)") == 5
    # each task is gated on its own: kv well above chance over 1000 questions, the passkey at chance
    chance = {"kv": 1 / 32, "pk": 1 / 32}
    monkeypatch.setattr(report, "_stat", lambda agg, m, key, b=None: (0.5, 1000) if key == "kv" else (1 / 32, 100))
    assert report.full_learned({"full": {}}, chance) == {"kv": True, "pk": False}
    assert report.full_learned({}, chance) == {"kv": True, "pk": True}  # no full model: nothing to gate on


def test_curriculum_stream():
    """Without a curriculum the stream is quality_cpu's exactly; with ``(frac, shrink)`` the first
    steps hold ``shrink`` times as many sequences ``shrink`` times shorter (about the same tokens per
    step), distances scaled with the window, and the rest is the full-length stream."""
    task = config.train_task(config.quick_configs()[0])
    plain = config.curriculum_stream(task, 4, 3, seed=5)
    ref = tasks.train_stream(task, 4, 3, seed=5)
    assert [[(e["input_ids"].tolist(), e["answer_labels"].tolist()) for e in b] for b in plain] == \
        [[(e["input_ids"].tolist(), e["answer_labels"].tolist()) for e in b] for b in ref]
    assert config.curriculum_stream(task, 4, 3, seed=5, curriculum=None)[0][0]["input_ids"].equal(ref[0][0]["input_ids"])
    frac, shrink = 0.5, 2
    cur = config.curriculum_stream(task, 4, 3, seed=5, curriculum=(frac, shrink))
    assert [len(b) for b in cur] == [6, 6, 3, 3]
    short = config.short_task(task, shrink)
    assert short.window == task.window // 2 and short.num_pairs == task.num_pairs // 2 and short.vocab == task.vocab
    assert all(short.base_len <= len(e["input_ids"]) <= short.base_len + short.max_offset for e in cur[0])
    tok = [sum(len(e["input_ids"]) for e in b) for b in cur]
    assert abs(tok[0] - tok[-1]) / tok[-1] < 0.2
    # the GPU curriculum: short sequences still hold every bin of the scaled window, same tokens per step
    gtask, _, gtcfg = config.gpu_configs()
    if config.CURRICULUM:
        g = config.short_task(config.train_task(gtask), config.CURRICULUM[1])
        assert g.bins()[-1][1] <= g.base_len and g.num_pairs >= 1 and g.window >= 4
        s = tasks.samples(g, 100, seed=0)
        assert {b for x in s for b in x.kv_bin} == {0, 1, 2, 3}
        assert abs(config.CURRICULUM[1] * g.base_len - gtask.base_len) <= config.CURRICULUM[1]


def test_report_of_the_second_run_with_two_seeds(tmp_path):
    """The second H200 run (committed JSONs; seed 1 only for full attention and the fine-tune arm):
    full attention learned the passkey, so the outcome is a real comparison, seeds aggregate per
    method, and a method that ran one seed is printed without a spread."""
    runs = "benchmarks/results/quality_gpu_runs/2026-12-02-run2"
    assert report.main(["--results", f"{runs}/A", f"{runs}/B", f"{runs}/A_seed1", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "quality_gpu.md").read_text()
    assert "Uninformative" not in md and "seeds [0, 1]" in md
    outcome = md.split("## Outcome")[1].split("## Setup")[0]
    assert outcome.count("loses to the best same-budget control") >= 4  # every gist variant on the passkey
    assert "From-scratch UniGist r=4 stayed at chance beyond the window on both tasks" in md
    passkey = md.split("### Passkey exact match")[1].split("###")[0]
    assert "| Full attention (no budget) | 100.0 ± 0.0 |" in passkey  # two seeds: mean ± std
    assert "| UniGist r=4, raw-before-gist predicts | 4.3 | 4.8 |" in passkey  # one seed: no ±
    throughput = md.split("## Training throughput")[1].split("## Results")[0]
    assert throughput.count("| full | ") == 2  # one row per seed
