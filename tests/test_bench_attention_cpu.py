"""The CPU attention benchmark (benchmarks/bench_attention_cpu.py) run in-process on
a tiny configuration: it writes the table and the .json, the rows are the ones
asked for and their numbers parse; a too-slow call is skipped and says so."""

import importlib.util
import json
import os

import pytest
import torch

from unigist import GistConfig
from unigist.layout import mask_nnz
from unigist.reference import gist_mask

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(_ROOT, "benchmarks", "bench_attention_cpu.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attention_cpu", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| N |")]


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


TINY = ["--n", "256", "--d", "64", "--dtype", "float32", "--windows", "64:8", "--ratios", "4", "--no-flex",
        "--cell-budget-s", "0.2", "--max-reps", "3", "--matmul-size", "512", "--bf16-mm-limit-s", "0"]


def test_tiny_table(bench, tmp_path):
    out = str(tmp_path / "attention_cpu.md")
    assert bench.main(TINY + ["--modes", "fwd", "fwdbwd", "--out", out]) == 0
    text = open(out).read()
    assert "torch.get_num_threads()" in text and torch.__version__ in text and "fp32 512x512" in text
    assert "## Columns" in text and "--no-flex" in text
    header = [line for line in text.splitlines() if line.startswith("| N |")]
    assert len(header) == 1 and len(_cells(header[0])) == 14
    rows = [_cells(line) for line in _table_rows(text)]
    assert [r[:6] for r in rows] == [["256", "64", "float32", "64/8", "4", m] for m in ("fwd", "fwdbwd")]
    cfg = GistConfig(ratio=4, window=64, num_sink=8)
    nnz = mask_nnz(256, 256, cfg)
    assert nnz == int(gist_mask(256, 256, cfg).sum())
    for r in rows:
        assert len(r) == 14
        assert float(r[6]) == pytest.approx(nnz / (256 * 257 / 2), abs=5e-4)
        ug, sdpa, masked = float(r[7]), float(r[8]), float(r[9])
        assert ug > 0 and sdpa > 0 and masked > 0
        assert r[10] == "n/a (--no-flex)"
        assert r[11].endswith("x") and float(r[11][:-1]) == pytest.approx(sdpa / ug, rel=0.02)
        assert float(r[12]) > 0 and float(r[13]) > 0

    data = json.load(open(str(tmp_path / "attention_cpu.json")))
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["matmul_gflops"]["fp32"] > 0
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["nnz"] == nnz
        for m in ("unigist", "sdpa_causal", "sdpa_masked"):
            info = row["methods"][m]
            assert info["status"] == "ok" and len(info["times_ms"]) == 3
        # the first calls were compared: unigist computes the masked attention (and its gradients)
        check = row["check"]["unigist"]
        assert check["against"] == "sdpa_masked" and check["ok"]
        assert set(check["rel_err"]) == ({"out"} if row["mode"] == "fwd" else {"out", "dq", "dk", "dv"})


def test_slow_calls_are_skipped(bench, tmp_path):
    """A call over --max-call-s stops after one call; at the next N it is predicted and not run."""
    out = str(tmp_path / "t.md")
    limits = ["--max-call-s", "1e-9", "--max-call-s-causal", "1e-9"]
    argv = TINY + ["--n", "128", "256", "--modes", "fwd", *limits, "--out", out]
    assert bench.main(argv) == 0
    rows = {r[0]: r for r in map(_cells, _table_rows(open(out).read()))}
    assert set(rows) == {"128", "256"}
    for col in (7, 8, 9):
        assert rows["128"][col].startswith("skipped (1 call took")
        assert rows["256"][col].startswith("skipped (~") and "predicted" in rows["256"][col]
    assert rows["256"][11] == "-" and rows["256"][12] == "-"


def test_flex_mask_mod(bench):
    """The Flex mask_mod is the UniGist mask."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    for cfg in (GistConfig(ratio=4, window=16, num_sink=5), GistConfig(ratio=8, window=40, num_sink=0)):
        dense = flex_attention.create_mask(bench.gist_mask_mod(cfg), None, None, 97, 97, device="cpu")
        assert torch.equal(dense[0, 0], gist_mask(97, 97, cfg))
